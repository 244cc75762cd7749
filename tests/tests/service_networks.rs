//! Service networks over real links: three agents in network namespaces of their own (the
//! lab's bridge is their underlay), the console here. Each process instance of a service
//! with a network runs in a namespace of its own with a veth on its network's bridge; hosts
//! are joined by VXLAN. An instance reaches another on another host by name; a service
//! without `connect` cannot reach another's instances, and can once it connects; the host
//! is not reachable from an instance but through its resolver; deleting the services leaves
//! no device, namespace or firewall table behind.
//!
//! Needs root, iproute2, nftables and python3 (`scripts/test.sh` installs them and runs as
//! root in CI); under CI a missing prerequisite fails the test instead of skipping it.

use std::{path::Path, process::Command, time::Duration};

use dunes_console::engine::{Command as EngineCommand, EngineHandle};
use dunes_tests::{
    AgentProcess, deploy_service, enroll_online, netns, spawn_lab_agent, start_engine,
};

const PORT: u16 = 8000;

/// The process template `echo` in an agent's data dir: it answers every connection to
/// port 8000 with the address it was reached at.
fn install_echo(agent_dir: &Path) {
    let template = agent_dir.join("storage/images/echo");
    std::fs::create_dir_all(&template).unwrap();
    let script = format!(
        "import socket\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {PORT}))\n\
         s.listen()\n\
         while True:\n    c, _ = s.accept()\n    c.sendall((c.getsockname()[0] + '\\n').encode())\n    c.close()\n"
    );
    std::fs::write(
        template.join("process.toml"),
        format!(
            "description = \"says where it was reached\"\ncommand = [\"python3\", \"-c\", {script:?}]\ndefault_vcpus = 1\ndefault_memory_mib = 64\n"
        ),
    )
    .unwrap();
}

/// The process of instance `vm`: its namespaces are the instance's (the agent, itself in
/// a namespace of the lab, makes the instance's where only it and its children see them).
fn process_of(agent: &AgentProcess, vm: &str) -> Option<String> {
    let pid =
        std::fs::read_to_string(agent.data_dir.join("processes").join(vm).join("pid")).ok()?;
    let pid = pid.trim().to_string();
    std::path::Path::new("/proc")
        .join(&pid)
        .exists()
        .then_some(pid)
}

/// Connects from the namespaces of process `pid` (its network, and its files: its resolver)
/// to `target` port `port` (a name or an address): what the other end said, or why not.
fn reach(pid: &str, target: &str, port: u16) -> Result<String, String> {
    let script = "import socket, sys\n\
                  c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)\n\
                  print(c.recv(100).decode().strip())\n";
    let out = Command::new("nsenter")
        .args(["-t", pid, "-n", "-m", "python3", "-c", script, target])
        .arg(port.to_string())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("")
            .to_string())
    }
}

/// Defines a service again, replacing the one of its name.
async fn redefine(engine: &EngineHandle, source: &str) {
    engine
        .request(|reply| EngineCommand::DefineService {
            source: source.to_string(),
            replace: true,
            reply,
        })
        .await
        .unwrap();
}

/// The address the console gave instance `vm`.
fn address_of(engine: &EngineHandle, vm: &str) -> String {
    engine
        .snapshot()
        .services
        .iter()
        .flat_map(|s| &s.instances)
        .find(|i| i.record.vm.as_str() == vm)
        .and_then(|i| i.record.address.as_ref())
        .map(|a| a.ip.to_string())
        .unwrap_or_else(|| panic!("{vm} has no address"))
}

/// The agent whose host runs `vm`.
fn agent_of<'a>(engine: &EngineHandle, agents: &'a [AgentProcess], vm: &str) -> &'a AgentProcess {
    let host = engine
        .snapshot()
        .services
        .iter()
        .flat_map(|s| &s.instances)
        .find(|i| i.record.vm.as_str() == vm)
        .map(|i| i.record.host.clone())
        .unwrap_or_else(|| panic!("no instance {vm}"));
    agents.iter().find(|a| a.host_id == host).unwrap()
}

/// Waits until `done` holds, for up to `secs` seconds.
async fn until(secs: u64, what: &str, mut done: impl FnMut() -> Result<(), String>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match done() {
            Ok(()) => return,
            Err(why) if std::time::Instant::now() > deadline => panic!("{what}: {why}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// The instances' namespaces, as the agents see them.
fn instance_namespaces(agents: &[AgentProcess]) -> Vec<String> {
    let mut all: Vec<String> = agents
        .iter()
        .flat_map(|a| {
            let out = Command::new("nsenter")
                .args(["-t", &a.child.id().to_string(), "-m", "ip", "netns", "list"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with("dunes-"))
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    // And their resolver files.
    all.extend(
        std::fs::read_dir("/etc/netns")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| format!("/etc/netns/{}", e.file_name().to_string_lossy()))
            .filter(|n| n.starts_with("/etc/netns/dunes-")),
    );
    all.sort();
    all.dedup();
    all
}

/// What an agent's namespace holds of service networks: its devices and firewall table.
fn leftovers(agent: &AgentProcess) -> Vec<String> {
    let ns = agent.netns.as_deref().unwrap();
    let links = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show"])
        .output()
        .unwrap();
    let mut left: Vec<String> = String::from_utf8_lossy(&links.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("dn"))
        .collect();
    let tables = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "list", "tables"])
        .output()
        .unwrap();
    left.extend(
        String::from_utf8_lossy(&tables.stdout)
            .lines()
            .filter(|l| l.contains("dunes"))
            .map(str::to_string),
    );
    left
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_reach_each_other_by_name_and_other_services_only_when_connected() {
    let missing = netns::unavailable().or_else(|| {
        Command::new("nft")
            .arg("--version")
            .output()
            .is_err()
            .then(|| "nftables' nft is not installed".to_string())
    });
    if let Some(why) = missing {
        if std::env::var_os("CI").is_some() {
            panic!("the service network test cannot run here: {why}");
        }
        eprintln!("SKIPPED: {why}");
        return;
    }
    let lab = netns::Lab::new(3).expect("the lab is set up");
    let dir = tempfile::tempdir().unwrap();
    for name in ["h1", "h2", "h3"] {
        install_echo(&dir.path().join(name));
    }
    let agents = [
        spawn_lab_agent(&lab, 0, dir.path(), "h1").unwrap(),
        spawn_lab_agent(&lab, 1, dir.path(), "h2").unwrap(),
        spawn_lab_agent(&lab, 2, dir.path(), "h3").unwrap(),
    ];
    let engine = start_engine(&dir.path().join("console")).await.unwrap();
    // Namespaces of other runs (a test killed outright) are not this one's to count.
    let before = instance_namespaces(&agents);
    for a in &agents {
        enroll_online(&engine, a).await.unwrap();
    }
    // The database apart from both web instances: three hosts, one instance each.
    let shop = format!(
        "name = \"shop\"\n\
         [[application]]\nname = \"db\"\nruntime = \"process\"\ntemplate = \"echo\"\nvcpus = 1\nmemory_mib = 64\nreadiness = {{ tcp = {PORT} }}\n\
         [[application]]\nname = \"web\"\nruntime = \"process\"\ntemplate = \"echo\"\nvcpus = 1\nmemory_mib = 64\ninstances = 2\nreadiness = {{ tcp = {PORT} }}\ndepends_on = [\"db\"]\n\
         [rules]\ndistinct_hosts = [\"web\"]\nanti_affinity = [[\"db\", \"web\"]]\n\
         [network]\n"
    );
    deploy_service(&engine, &shop).await.unwrap();
    let outsider = |connect: &str| {
        format!(
            "name = \"outsider\"\n\
             [[application]]\nname = \"box\"\nruntime = \"process\"\ntemplate = \"echo\"\nvcpus = 1\nmemory_mib = 64\nreadiness = {{ tcp = {PORT} }}\n\
             [network]\n{connect}\n"
        )
    };
    deploy_service(&engine, &outsider("")).await.unwrap();

    let db = address_of(&engine, "shop-db-0");
    let web0 = agent_of(&engine, &agents, "shop-web-0");
    let web0_ns = process_of(web0, "shop-web-0").expect("web-0 runs");
    let db_host = agent_of(&engine, &agents, "shop-db-0");
    assert_ne!(db_host.host_id, web0.host_id, "db on another host");
    // By name, across hosts: the database's address answers.
    until(30, "web-0 reaches db.shop.dunes", || {
        match reach(&web0_ns, "db.shop.dunes", PORT) {
            Ok(said) if said == db => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // One instance by its index, and the application's short name in its search domain.
    assert_eq!(
        reach(&web0_ns, "1.web.shop.dunes", PORT),
        Ok(address_of(&engine, "shop-web-1"))
    );
    assert_eq!(reach(&web0_ns, "db", PORT), Ok(db.clone()));

    // Another service's instance cannot reach shop's, by address or by name.
    let boxed = agent_of(&engine, &agents, "outsider-box-0");
    let box_ns = process_of(boxed, "outsider-box-0").expect("box runs");
    assert!(reach(&box_ns, &db, PORT).is_err(), "outsider reached db");
    assert!(
        reach(&box_ns, "db.shop.dunes", PORT).is_err(),
        "outsider resolved db"
    );
    // Nor its host, but through its resolver: a listener on every address of the host
    // (its gateway on the network among them) is not reached.
    let box_host_ns = boxed.netns.clone().unwrap();
    let _host_listener = netns::sink(Some(&box_host_ns), 9555).unwrap();
    let gateway = engine
        .snapshot()
        .networks
        .iter()
        .find(|n| n.name.as_str() == "outsider")
        .map(|n| n.gateway.to_string())
        .unwrap();
    assert!(
        reach(&box_ns, &gateway, 9555).is_err(),
        "box reached its host"
    );
    assert!(
        reach(
            &box_ns,
            &lab.hosts[agents
                .iter()
                .position(|a| a.host_id == boxed.host_id)
                .unwrap()]
            .ip,
            9555
        )
        .is_err(),
        "box reached its host's own address"
    );

    // Connected to shop, it reaches shop's instances, by address and by name.
    redefine(&engine, &outsider("connect = [\"shop\"]")).await;
    until(30, "box reaches db once connected", || {
        match reach(&box_ns, "db.shop.dunes", PORT) {
            Ok(said) if said == db => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Deleted, the services leave nothing behind on any host.
    for name in ["outsider", "shop"] {
        let report = engine
            .request(|reply| EngineCommand::DeleteService {
                name: dunes_shared::model::ServiceName::new(name).unwrap(),
                reply,
            })
            .await
            .unwrap();
        assert!(report.failed.is_empty(), "delete {name}: {report:?}");
    }
    until(30, "nothing left on the hosts", || {
        let left: Vec<String> = agents.iter().flat_map(leftovers).collect();
        let namespaces: Vec<String> = instance_namespaces(&agents)
            .into_iter()
            .filter(|n| !before.contains(n))
            .collect();
        if left.is_empty() && namespaces.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?} {namespaces:?}"))
        }
    })
    .await;
    drop(engine);
    drop(agents);
}
