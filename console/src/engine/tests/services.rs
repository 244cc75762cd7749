//! Services: plans on the fleet as it is, start order and readiness, adopted VMs, desktop
//! notices of status changes.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_is_planned_on_the_fleet_as_it_is_now() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), "planning").await;
    let engine = engine_with(dir.path(), &agent).await;
    let source = "name = \"site\"\n[[application]]\nname = \"web\"\nruntime = \"libvirt\"\ntemplate = \"tiny\"\nvcpus = 1\nmemory_mib = 512\ninstances = 2\n";
    let name = engine
        .request(|reply| Command::DefineService {
            source: source.into(),
            replace: false,
            reply,
        })
        .await
        .unwrap();
    assert_eq!(engine.snapshot().services.len(), 1);
    let plan = |engine: EngineHandle| {
        let name = name.clone();
        async move {
            engine
                .request(|reply| Command::PlanService {
                    name,
                    overrides: Vec::new(),
                    reply,
                })
                .await
                .unwrap()
        }
    };
    let first = plan(engine.clone()).await;
    assert!(first.plan.is_feasible(), "{:?}", first.plan.unplaced);
    assert!(
        first
            .plan
            .placements
            .iter()
            .all(|p| p.host == agent.host_id)
    );
    assert_eq!(plan(engine.clone()).await.fingerprint, first.fingerprint);
    // The fleet changes in a way that decides nothing differently (a running VM takes some
    // memory; everything still goes to the one host): the plan, and its fingerprint, stay.
    engine
        .request(|reply| Command::CreateVm {
            host: agent.host_id.clone(),
            spec: spec("taker"),
            start: true,
            reply,
        })
        .await
        .unwrap();
    assert_eq!(plan(engine.clone()).await.fingerprint, first.fingerprint);
    // A service is refused as a whole when its file is wrong, and nothing is kept.
    let err = engine
        .request(|reply| Command::DefineService {
            source: "name = \"other\"\n[[application]]\nname = \"x\"\n".into(),
            replace: false,
            reply,
        })
        .await
        .unwrap_err();
    assert!(err.to_string().starts_with("line 2: "), "{err}");
    assert_eq!(engine.snapshot().services.len(), 1);
}

/// An application starts only once every instance it depends on is ready: here the database
/// is gone behind the service's back, so the web front is not started at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependent_is_not_started_when_what_it_needs_is_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), "gated").await;
    let engine = engine_with(dir.path(), &agent).await;
    let app = |name: &str, deps: &str| {
        format!(
            "[[application]]\nname = \"{name}\"\nruntime = \"libvirt\"\ntemplate = \"tiny\"\nvcpus = 1\nmemory_mib = 64\nreadiness = \"guest-agent\"\ndepends_on = [{deps}]\n"
        )
    };
    let source = format!("name = \"gate\"\n{}{}", app("db", ""), app("web", "\"db\""));
    let name = engine
        .request(|reply| Command::DefineService {
            source,
            replace: false,
            reply,
        })
        .await
        .unwrap();
    let deployed = engine
        .request(|reply| Command::DeployService {
            name: name.clone(),
            fingerprint: None,
            overrides: Vec::new(),
            reply,
        })
        .await
        .unwrap();
    assert_eq!(deployed.done.len(), 2, "{deployed:?}");
    engine
        .request(|reply| Command::DeleteVm {
            host: agent.host_id.clone(),
            name: VmName::new("gate-db-0").unwrap(),
            reply,
        })
        .await
        .unwrap();
    let started = engine
        .request(|reply| Command::StartService {
            name: name.clone(),
            reply,
        })
        .await
        .unwrap();
    assert_eq!(started.failed.len(), 2, "{started:?}");
    assert_eq!(started.failed[0].0, "db-0");
    assert_eq!(
        started.failed[1],
        (
            "web-0".to_string(),
            "not started: db is not ready".to_string()
        )
    );
    let snap = engine.snapshot();
    let web = snap
        .host(&agent.host_id)
        .unwrap()
        .vm(&VmName::new("gate-web-0").unwrap())
        .cloned()
        .unwrap();
    assert_eq!(web.state, VmState::Shutoff);
    assert_eq!(snap.services[0].status.as_str(), "down");
}

/// An existing VM adopted into a service is an instance like a deployed one: the plan keeps
/// it, and a deploy never removes an adopted VM beyond the instance count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_vms_are_adopted_into_a_service() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), "adopting").await;
    let engine = engine_with(dir.path(), &agent).await;
    let source = "name = \"site\"\n[[application]]\nname = \"web\"\nruntime = \"libvirt\"\ntemplate = \"tiny\"\nvcpus = 1\nmemory_mib = 64\ninstances = 2\n[[application]]\nname = \"jobs\"\nruntime = \"process\"\ntemplate = \"reports\"\nvcpus = 1\nmemory_mib = 64\ninstances = 0\n";
    let name = engine
        .request(|reply| Command::DefineService {
            source: source.into(),
            replace: false,
            reply,
        })
        .await
        .unwrap();
    for vm in ["legacy", "older", "third"] {
        engine
            .request(|reply| Command::CreateVm {
                host: agent.host_id.clone(),
                spec: spec(vm),
                start: true,
                reply,
            })
            .await
            .unwrap();
    }
    let adopt = |vm: &str, app: &str| {
        let (engine, name, host) = (engine.clone(), name.clone(), agent.host_id.clone());
        let (vm, app) = (VmName::new(vm).unwrap(), AppName::new(app).unwrap());
        async move {
            engine
                .request(|reply| Command::AdoptVm {
                    service: name,
                    app,
                    host,
                    vm,
                    reply,
                })
                .await
        }
    };
    let web = adopt("legacy", "web").await.unwrap();
    assert_eq!((web.index, web.adopted), (0, true));
    let err = adopt("legacy", "web").await.unwrap_err().to_string();
    assert_eq!(err, "legacy is already instance web-0 of service site");
    let err = adopt("older", "jobs").await.unwrap_err().to_string();
    assert_eq!(
        err,
        "older runs on the libvirt runtime; application jobs needs process"
    );
    let err = adopt("older", "cache").await.unwrap_err().to_string();
    assert_eq!(err, "service site has no application cache");
    let err = adopt("ghost", "web").await.unwrap_err().to_string();
    assert!(err.contains("has no VM ghost"), "{err}");

    let plan = engine
        .request(|reply| Command::PlanService {
            name: name.clone(),
            overrides: Vec::new(),
            reply,
        })
        .await
        .unwrap();
    let creates: Vec<u32> = plan
        .plan
        .placements
        .iter()
        .filter(|p| p.action == crate::engine::services::placement::Action::Create)
        .map(|p| p.index)
        .collect();
    assert_eq!(creates, [1], "the adopted VM is web-0: {:?}", plan.plan);

    // Two more: web-1, then one beyond the count of 2, which a deploy leaves alone.
    assert_eq!(adopt("older", "web").await.unwrap().index, 1);
    assert_eq!(adopt("third", "web").await.unwrap().index, 2);
    let deployed = engine
        .request(|reply| Command::DeployService {
            name: name.clone(),
            fingerprint: None,
            overrides: Vec::new(),
            reply,
        })
        .await
        .unwrap();
    assert!(deployed.done.is_empty(), "{deployed:?}");
    let snap = engine.snapshot();
    let host = snap.host(&agent.host_id).unwrap();
    assert!(host.vm(&VmName::new("third").unwrap()).is_some());
    let view = &snap.services[0];
    assert_eq!(view.instances.len(), 3);
    assert_eq!(view.status.as_str(), "available");
}

/// What the stand-in notification server heard: summary, body, urgency.
type Heard = tokio::sync::mpsc::UnboundedSender<(String, String, u8)>;

/// The freedesktop notification interface, served on a private bus by the test: the engine's
/// calls cross a real dbus-daemon.
struct NotificationServer {
    heard: Heard,
}

#[zbus::interface(name = "org.freedesktop.Notifications")]
impl NotificationServer {
    #[allow(clippy::too_many_arguments)]
    async fn notify(
        &self,
        app_name: String,
        _replaces_id: u32,
        _app_icon: String,
        summary: String,
        body: String,
        _actions: Vec<String>,
        hints: std::collections::HashMap<String, zbus::zvariant::OwnedValue>,
        _expire_timeout: i32,
    ) -> u32 {
        assert_eq!(app_name, "Dunes");
        let urgency = hints
            .get("urgency")
            .and_then(|v| u8::try_from(v).ok())
            .unwrap_or(9);
        let _ = self.heard.send((summary, body, urgency));
        7
    }
}

/// The next notice with summary `wanted`, skipping others.
async fn until_heard(
    heard: &mut tokio::sync::mpsc::UnboundedReceiver<(String, String, u8)>,
    wanted: &str,
) -> (String, String, u8) {
    let mut seen = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(30), heard.recv())
            .await
            .unwrap_or_else(|_| panic!("never heard {wanted:?}; heard {seen:?}"))
            .unwrap();
        if next.0 == wanted {
            return next;
        }
        seen.push(next);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_status_changes_reach_the_desktop() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("session-bus");
    let address = format!("unix:path={}", socket.display());
    let mut daemon = std::process::Command::new("dbus-daemon")
        .args(["--session", "--nofork", &format!("--address={address}")])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("dbus-daemon (Debian package dbus-daemon) runs the test's session bus");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(std::time::Instant::now() < deadline, "no bus at {address}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (heard_tx, mut heard) = tokio::sync::mpsc::unbounded_channel();
    let _server = zbus::connection::Builder::address(address.as_str())
        .unwrap()
        .name("org.freedesktop.Notifications")
        .unwrap()
        .serve_at(
            "/org/freedesktop/Notifications",
            NotificationServer { heard: heard_tx },
        )
        .unwrap()
        .build()
        .await
        .unwrap();

    let agent = agent(dir.path(), "notifying").await;
    let engine = engine_with_options(
        dir.path(),
        &agent,
        EngineOptions {
            desktop_notifications: crate::engine::notify::DesktopNotifications::Address(address),
            ..EngineOptions::default()
        },
    )
    .await;
    let source = "name = \"site\"\n[[application]]\nname = \"web\"\nruntime = \"libvirt\"\ntemplate = \"tiny\"\nvcpus = 1\nmemory_mib = 64\n";
    let name = engine
        .request(|reply| Command::DefineService {
            source: source.into(),
            replace: false,
            reply,
        })
        .await
        .unwrap();
    for step in ["deploy", "start"] {
        let name = name.clone();
        let report = match step {
            "deploy" => {
                engine
                    .request(|reply| Command::DeployService {
                        name,
                        fingerprint: None,
                        overrides: Vec::new(),
                        reply,
                    })
                    .await
            }
            _ => {
                engine
                    .request(|reply| Command::StartService { name, reply })
                    .await
            }
        };
        assert!(report.unwrap().failed.is_empty());
    }
    let (_, body, urgency) = until_heard(&mut heard, "Service site is available").await;
    assert_eq!((body.as_str(), urgency), ("1 of 1 instances ready", 0));
    // Its only VM stops behind the service's back: down, and urgent.
    engine
        .request(|reply| Command::StopVm {
            host: agent.host_id.clone(),
            name: VmName::new("site-web-0").unwrap(),
            force: true,
            reply,
        })
        .await
        .unwrap();
    let (_, body, urgency) = until_heard(&mut heard, "Service site is down").await;
    assert_eq!((body.as_str(), urgency), ("0 of 1 instances ready", 2));
    let _ = daemon.kill();
    let _ = daemon.wait();
}

/// After a start, readiness keeps being checked: an application whose check stops passing
/// makes the service go down, and comes back when it passes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_checked_again_while_a_service_runs() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), "checking").await;
    let template = dir.path().join("checking/storage/images/flagger");
    std::fs::create_dir_all(&template).unwrap();
    std::fs::write(
        template.join("process.toml"),
        "description = \"ready while ready.flag exists\"\ncommand = [\"/bin/sh\", \"-c\", \"touch ready.flag; exec sleep 1000\"]\ndefault_vcpus = 1\ndefault_memory_mib = 32\n",
    )
    .unwrap();
    let engine = engine_with(dir.path(), &agent).await;
    let source = "name = \"flags\"\n[[application]]\nname = \"job\"\nruntime = \"process\"\ntemplate = \"flagger\"\nvcpus = 1\nmemory_mib = 32\nreadiness = { command = \"test -f ready.flag\" }\n";
    let name = engine
        .request(|reply| Command::DefineService {
            source: source.into(),
            replace: false,
            reply,
        })
        .await
        .unwrap();
    deploy_and_start(&engine, &name).await;
    let status = |engine: &EngineHandle| engine.snapshot().services[0].status.as_str();
    assert_eq!(status(&engine), "available");
    let flag = dir
        .path()
        .join("checking/processes/flags-job-0/work/ready.flag");
    std::fs::remove_file(&flag).unwrap();
    let down = engine
        .wait_for(Duration::from_secs(20), |s| {
            s.services[0].status.as_str() == "down"
        })
        .await;
    assert!(down.is_ok(), "still {}", status(&engine));
    let detail = engine.snapshot().services[0].instances[0]
        .ready_detail
        .clone()
        .unwrap();
    assert!(detail.starts_with("`test -f ready.flag` exits"), "{detail}");
    std::fs::write(&flag, "").unwrap();
    let back = engine
        .wait_for(Duration::from_secs(20), |s| {
            s.services[0].status.as_str() == "available"
        })
        .await;
    assert!(back.is_ok(), "still {}", status(&engine));
}
