//! The engine's command and event handling against real agents run in-process (the agent is a
//! library) on 127.0.0.1, each on a private copy of libvirt's test driver.

use std::{path::Path, time::Duration};

use dunes_agent::{
    config::AgentConfig,
    server::{AgentOptions, RunningAgent},
};
use dunes_shared::model::{AppName, HostId, TemplateName, VmName, VmSpec, VmState};

use super::{Command, EngineError, EngineHandle, EngineOptions, LinkState, start_with};

async fn agent(dir: &Path, host: &str) -> RunningAgent {
    agent_on(dir, host, "127.0.0.1:0").await
}

async fn agent_on(dir: &Path, host: &str, listen: &str) -> RunningAgent {
    agent_with(dir, host, listen, AgentConfig::default()).await
}

/// An agent on a node of its own of libvirt's test driver, with room for a few VMs.
async fn agent_with(dir: &Path, host: &str, listen: &str, config: AgentConfig) -> RunningAgent {
    let data_dir = dir.join(host);
    std::fs::create_dir_all(&data_dir).unwrap();
    let node = data_dir.join("node.xml");
    std::fs::write(
        &node,
        "<node><cpu><mode>host</mode></cpu><memory>2097152</memory></node>",
    )
    .unwrap();
    RunningAgent::start(AgentOptions {
        data_dir,
        listen: listen.parse().unwrap(),
        libvirt_uri: format!("test://{}", node.display()),
        config: AgentConfig {
            host_id: Some(HostId::new(host).unwrap()),
            ..config
        },
        guest_dir: None,
    })
    .await
    .unwrap()
}

async fn engine_with(dir: &Path, agent: &RunningAgent) -> EngineHandle {
    engine_with_options(dir, agent, EngineOptions::default()).await
}

async fn engine_with_options(
    dir: &Path,
    agent: &RunningAgent,
    options: EngineOptions,
) -> EngineHandle {
    let engine = start_with(&dir.join("console"), options).await.unwrap();
    enroll_host(&engine, agent).await;
    engine
}

fn spec(name: &str) -> VmSpec {
    VmSpec {
        name: VmName::new(name).unwrap(),
        template: TemplateName::new("tiny").unwrap(),
        vcpus: Some(1),
        memory_mib: Some(64),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_call_is_applied_to_the_view_before_its_reply() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), "engine-apply").await;
    let engine = engine_with(dir.path(), &agent).await;
    let host = agent.host_id.clone();
    let vm_of = |engine: &EngineHandle, name: &str| {
        engine
            .snapshot()
            .host(&host)
            .and_then(|h| h.vms.iter().find(|v| v.name.as_str() == name).cloned())
    };
    let created = engine
        .request(|reply| Command::CreateVm {
            host: host.clone(),
            spec: spec("apply-1"),
            start: true,
            reply,
        })
        .await
        .unwrap();
    assert_eq!(created.state, VmState::Running);
    // No waiting: the reply came after the engine took the result in.
    assert_eq!(
        vm_of(&engine, "apply-1").map(|v| v.state),
        Some(VmState::Running)
    );
    let stopped = engine
        .request(|reply| Command::StopVm {
            host: host.clone(),
            name: created.name.clone(),
            force: true,
            reply,
        })
        .await
        .unwrap();
    assert_eq!(stopped.state, VmState::Shutoff);
    assert_eq!(
        vm_of(&engine, "apply-1").map(|v| v.state),
        Some(VmState::Shutoff)
    );
    engine
        .request(|reply| Command::DeleteVm {
            host: host.clone(),
            name: created.name.clone(),
            reply,
        })
        .await
        .unwrap();
    assert!(vm_of(&engine, "apply-1").is_none());
    // What each command did is in the event log.
    let log: Vec<String> = engine
        .snapshot()
        .events
        .iter()
        .map(|e| e.message.clone())
        .collect();
    for wanted in [
        "creating VM apply-1 on engine-apply",
        "forcing VM apply-1 off",
        "deleting VM apply-1",
    ] {
        assert!(log.iter().any(|m| m == wanted), "{wanted:?} not in {log:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_error_is_the_callers_and_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), "engine-errors").await;
    let engine = engine_with(dir.path(), &agent).await;
    let host = agent.host_id.clone();
    let err = engine
        .request(|reply| Command::StartVm {
            host: host.clone(),
            name: VmName::new("nowhere").unwrap(),
            reply,
        })
        .await
        .unwrap_err();
    assert_eq!(err, EngineError::Agent("VM nowhere does not exist".into()));
    let snap = engine.snapshot();
    let last = snap.events.last().unwrap();
    assert_eq!(
        last.message,
        "starting VM nowhere failed: VM nowhere does not exist"
    );
    // A spec the engine can check is refused before any agent is asked.
    let mut bad = spec("bad");
    bad.vcpus = Some(0);
    let err = engine
        .request(|reply| Command::CreateVm {
            host: host.clone(),
            spec: bad,
            start: false,
            reply,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::Invalid(_)), "{err}");
    let err = engine
        .request(|reply| Command::StartVm {
            host: HostId::new("no-such-host").unwrap(),
            name: VmName::new("a").unwrap(),
            reply,
        })
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "host no-such-host is not enrolled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_agent_is_unreachable_and_refuses_calls_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), "engine-lost").await;
    let engine = engine_with(dir.path(), &agent).await;
    let host = agent.host_id.clone();
    agent.shutdown().await;
    let snap = engine
        .wait_for(Duration::from_secs(20), |s| {
            s.host(&host)
                .is_some_and(|h| h.link == LinkState::Unreachable)
        })
        .await
        .expect("the host is seen unreachable");
    assert!(
        snap.events
            .iter()
            .any(|e| e.host.as_ref() == Some(&host) && e.message.starts_with("unreachable: ")),
        "the loss is in the event log"
    );
    let asked = std::time::Instant::now();
    let err = engine
        .request(|reply| Command::StartVm {
            host: host.clone(),
            name: VmName::new("a").unwrap(),
            reply,
        })
        .await
        .unwrap_err();
    assert_eq!(err, EngineError::Unreachable(host));
    assert!(asked.elapsed() < Duration::from_secs(1));
}

fn log_of(engine: &EngineHandle, host: &HostId) -> Vec<String> {
    engine
        .snapshot()
        .events
        .iter()
        .filter(|e| e.host.as_ref() == Some(host))
        .map(|e| e.message.clone())
        .collect()
}

/// Certificates of a few seconds, renewed again and again: the link is never lost, VM
/// commands work throughout, and a new connection after the first certificates expired
/// comes up with the renewed ones on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renew_over_the_live_link_and_commands_work_throughout() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), "renewing").await;
    let lifetime = Duration::from_secs(6);
    let engine = engine_with_options(
        dir.path(),
        &agent,
        EngineOptions {
            cert_lifetime: lifetime,
            ..EngineOptions::default()
        },
    )
    .await;
    let host = agent.host_id.clone();
    let first_expiry = engine
        .snapshot()
        .host(&host)
        .unwrap()
        .cert_expires()
        .unwrap();
    let mut link_changes = engine.subscribe();
    let began = std::time::Instant::now();
    let mut round = 0;
    while began.elapsed() < Duration::from_secs(18) {
        let name = VmName::new(format!("r-{round}")).unwrap();
        engine
            .request(|reply| Command::CreateVm {
                host: host.clone(),
                spec: spec(name.as_str()),
                start: true,
                reply,
            })
            .await
            .unwrap();
        engine
            .request(|reply| Command::StopVm {
                host: host.clone(),
                name: name.clone(),
                force: true,
                reply,
            })
            .await
            .unwrap();
        engine
            .request(|reply| Command::DeleteVm {
                host: host.clone(),
                name,
                reply,
            })
            .await
            .unwrap();
        assert_eq!(
            link_changes.borrow_and_update().host(&host).unwrap().link,
            LinkState::Online
        );
        round += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let log = log_of(&engine, &host);
    let renewals = log
        .iter()
        .filter(|m| m.starts_with("certificate renewed"))
        .count();
    assert!(renewals >= 3, "{renewals} renewals in 18 s: {log:?}");
    assert_eq!(log.iter().filter(|m| *m == "online").count(), 1, "{log:?}");
    assert!(!log.iter().any(|m| m.starts_with("unreachable")), "{log:?}");
    let expires = engine
        .snapshot()
        .host(&host)
        .unwrap()
        .cert_expires()
        .unwrap();
    assert!(
        expires > first_expiry + lifetime,
        "the known expiry moves on"
    );

    // Both first certificates expired long ago: a new connection needs the renewed ones.
    engine
        .request(|reply| Command::SetHostAddress {
            host: host.clone(),
            address: format!("localhost:{}", agent.local_addr.port()),
            reply,
        })
        .await
        .unwrap();
    // Online again after the address changed: the old link may still read online for a
    // moment, so the event log says when the new one came up.
    engine
        .wait_for(Duration::from_secs(20), |s| {
            let since_address: Vec<&str> = s
                .events
                .iter()
                .filter(|e| e.host.as_ref() == Some(&host))
                .map(|e| e.message.as_str())
                .skip_while(|m| !m.starts_with("address set to localhost"))
                .collect();
            s.host(&host).is_some_and(|h| h.link == LinkState::Online)
                && since_address.contains(&"online")
        })
        .await
        .expect("a new connection with the renewed certificates");
    let log = log_of(&engine, &host);
    let online = log.iter().filter(|m| *m == "online").count();
    // Once for the new address; under load a renewal due at that moment may take one more.
    assert!((2..=3).contains(&online), "reconnected: {log:?}");
    engine
        .request(|reply| Command::CreateVm {
            host: host.clone(),
            spec: spec("after"),
            start: false,
            reply,
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_certificate_expired_offline_says_re_enroll() {
    let dir = tempfile::tempdir().unwrap();
    let first = agent(dir.path(), "expired").await;
    let address = first.local_addr;
    let engine = engine_with_options(
        dir.path(),
        &first,
        EngineOptions {
            cert_lifetime: Duration::from_secs(3),
            ..EngineOptions::default()
        },
    )
    .await;
    let host = first.host_id.clone();
    first.shutdown().await;
    drop(first);
    let expires = engine
        .snapshot()
        .host(&host)
        .unwrap()
        .cert_expires()
        .unwrap();
    tokio::time::sleep(
        expires
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            + Duration::from_secs(1),
    )
    .await;
    let _again = agent_on(dir.path(), "expired", &address.to_string()).await;
    // Reached again, the agent's certificate itself is refused: the TLS handshake says so.
    let snap = engine
        .wait_for(Duration::from_secs(20), |s| {
            s.host(&host).is_some_and(|h| {
                h.link_error.as_deref().is_some_and(|e| {
                    e.starts_with("certificate expired: re-enroll")
                        && e.contains("invalid peer certificate: certificate expired")
                })
            })
        })
        .await
        .expect("the host says its certificate expired");
    let h = snap.host(&host).unwrap();
    assert_eq!(h.link, LinkState::Unreachable);
    assert!(h.cert_expired());
    let err = h.link_error.as_deref().unwrap();
    assert!(
        err.contains("dunes-agent token") && err.contains(&format!("ctl host add {address}")),
        "{err}"
    );
}

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
        .filter(|p| p.action == crate::engine::placement::Action::Create)
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
            desktop_notifications: super::notify::DesktopNotifications::Address(address),
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

/// Deploys a defined service as planned and starts it; nothing may fail.
async fn deploy_and_start(engine: &EngineHandle, name: &dunes_shared::model::ServiceName) {
    let report = engine
        .request(|reply| Command::DeployService {
            name: name.clone(),
            fingerprint: None,
            overrides: Vec::new(),
            reply,
        })
        .await
        .unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
    let report = engine
        .request(|reply| Command::StartService {
            name: name.clone(),
            reply,
        })
        .await
        .unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
}

async fn enroll_host(engine: &EngineHandle, agent: &RunningAgent) {
    engine
        .request(|reply| Command::AddHost {
            address: agent.local_addr.to_string(),
            token: agent.join_token.clone().unwrap(),
            expected_fingerprint: Some(agent.fingerprint),
            replace: false,
            reply,
        })
        .await
        .unwrap();
    let host = agent.host_id.clone();
    engine
        .wait_for(Duration::from_secs(20), |s| {
            s.host(&host).is_some_and(|h| h.link == LinkState::Online)
        })
        .await
        .expect("the host comes online");
}

fn disk_of(dir: &Path, host: &str, vm: &str) -> std::path::PathBuf {
    dir.join(host)
        .canonicalize()
        .unwrap()
        .join("storage/disks")
        .join(format!("{vm}.img"))
}

async fn migration_ends(
    engine: &EngineHandle,
    id: u64,
) -> crate::engine::migration::MigrationJournal {
    let snap = engine
        .wait_for(Duration::from_secs(60), |s| {
            s.migrations
                .iter()
                .any(|m| m.id == id && m.step.is_finished())
        })
        .await
        .unwrap_or_else(|s| panic!("migration {id} never ended: {:?}", s.migrations));
    snap.migrations
        .iter()
        .find(|m| m.id == id)
        .cloned()
        .unwrap()
}

/// A running VM moves with its disk: stopped, streamed, verified, defined and started on the
/// target, and only then deleted on the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_migrates_cold_with_its_disk_and_the_source_goes_last() {
    use crate::engine::migration::MigrationStep;
    use std::io::{Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().unwrap();
    let a = agent(dir.path(), "mig-a").await;
    let b = agent(dir.path(), "mig-b").await;
    let engine = engine_with(dir.path(), &a).await;
    enroll_host(&engine, &b).await;
    let created = engine
        .request(|reply| Command::CreateVm {
            host: a.host_id.clone(),
            spec: spec("mover"),
            start: true,
            reply,
        })
        .await
        .unwrap();
    // The agent lists the VM's disk: a sparse copy of the template's image.
    let disks = created.disks.clone().expect("the agent lists its disks");
    assert_eq!(disks.len(), 1, "{disks:?}");
    assert_eq!(disks[0].file, "mover.img");
    assert_eq!(disks[0].format, dunes_shared::model::DiskImageFormat::Raw);
    assert_eq!(disks[0].virtual_bytes, 64 << 20);
    assert!(disks[0].allocated_bytes < 64 << 20 && disks[0].backing.is_none());
    // What the guest wrote: it must be read back on the target.
    let written = b"written before the migration";
    {
        let mut disk = std::fs::OpenOptions::new()
            .write(true)
            .open(disk_of(dir.path(), "mig-a", "mover"))
            .unwrap();
        disk.seek(SeekFrom::Start(3 << 20)).unwrap();
        disk.write_all(written).unwrap();
        disk.sync_all().unwrap();
    }
    let journal = engine
        .request(|reply| Command::MigrateVm {
            host: a.host_id.clone(),
            vm: VmName::new("mover").unwrap(),
            to: b.host_id.clone(),
            options: Default::default(),
            reply,
        })
        .await
        .unwrap();
    assert_eq!(journal.step, MigrationStep::Stopping);
    let done = migration_ends(&engine, journal.id).await;
    assert_eq!(done.step, MigrationStep::SourceDeleted, "{done:?}");
    assert!(done.digest.is_some() && done.bytes_total > 0, "{done:?}");
    let snap = engine
        .wait_for(Duration::from_secs(10), |s| {
            s.host(&a.host_id)
                .is_some_and(|h| h.vm(&VmName::new("mover").unwrap()).is_none())
                && s.host(&b.host_id).is_some_and(|h| {
                    h.vm(&VmName::new("mover").unwrap())
                        .is_some_and(|v| v.state == VmState::Running)
                })
        })
        .await
        .expect("the VM runs on the target only");
    let moved = snap
        .host(&b.host_id)
        .unwrap()
        .vm(&VmName::new("mover").unwrap())
        .cloned()
        .unwrap();
    assert_eq!(moved.uuid, created.uuid, "the same VM");
    let copy = std::fs::read(disk_of(dir.path(), "mig-b", "mover")).unwrap();
    assert_eq!(&copy[3 << 20..(3 << 20) + written.len()], written);
    assert!(!disk_of(dir.path(), "mig-a", "mover").exists());
    // Every step is an event.
    let said: Vec<String> = snap.events.iter().map(|e| e.message.clone()).collect();
    for step in [
        "transferring",
        "verifying",
        "defining",
        "starting",
        "confirmed",
        "done",
    ] {
        assert!(
            said.iter()
                .any(|m| m.ends_with(&format!("of mover: {step}"))),
            "{step}: {said:?}"
        );
    }
}

/// Reboot, pause and resume through the agent's runtime: each leaves the VM as asked, and
/// what its state does not allow is refused with the reason and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_reboots_pauses_and_resumes_and_what_cannot_be_is_refused() {
    use dunes_shared::protocol::PowerAction;
    let dir = tempfile::tempdir().unwrap();
    let a = agent(dir.path(), "pw-a").await;
    let engine = engine_with(dir.path(), &a).await;
    let vm = VmName::new("pw").unwrap();
    engine
        .request(|reply| Command::CreateVm {
            host: a.host_id.clone(),
            spec: spec("pw"),
            start: true,
            reply,
        })
        .await
        .unwrap();
    let power = |action| {
        let (engine, host, vm) = (engine.clone(), a.host_id.clone(), vm.clone());
        async move {
            engine
                .request(|reply| Command::PowerVm {
                    host,
                    name: vm,
                    action,
                    reply,
                })
                .await
        }
    };
    assert_eq!(
        power(PowerAction::Reboot).await.unwrap().state,
        VmState::Running
    );
    assert_eq!(
        power(PowerAction::Pause).await.unwrap().state,
        VmState::Paused
    );
    let again = power(PowerAction::Pause).await.unwrap_err().to_string();
    assert!(
        again.contains("pw is paused; only a running VM pauses"),
        "{again}"
    );
    let reboot = power(PowerAction::Reboot).await.unwrap_err().to_string();
    assert!(reboot.contains("only a running VM reboots"), "{reboot}");
    assert_eq!(
        power(PowerAction::Resume).await.unwrap().state,
        VmState::Running
    );
    let resume = power(PowerAction::Resume).await.unwrap_err().to_string();
    assert!(resume.contains("only a paused VM resumes"), "{resume}");
    // The view follows, and the state stayed as the last success left it.
    let snap = engine
        .wait_for(Duration::from_secs(10), |s| {
            s.host(&a.host_id)
                .and_then(|h| h.vm(&vm))
                .is_some_and(|v| v.state == VmState::Running)
        })
        .await;
    assert!(snap.is_ok());
}

/// A VM defined outside Dunes has no disk its agent can stream: the pre-check says so, and
/// the migration is refused before the VM is stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_without_a_disk_of_its_agents_is_refused_before_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("out-a");
    std::fs::create_dir_all(&data_dir).unwrap();
    let node = data_dir.join("node.xml");
    std::fs::write(
        &node,
        "<node><cpu><mode>host</mode></cpu><memory>2097152</memory><domain type='test'><name>outsider</name><memory unit='MiB'>128</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain></node>",
    )
    .unwrap();
    let a = RunningAgent::start(AgentOptions {
        data_dir,
        listen: "127.0.0.1:0".parse().unwrap(),
        libvirt_uri: format!("test://{}", node.display()),
        config: AgentConfig {
            host_id: Some(HostId::new("out-a").unwrap()),
            ..AgentConfig::default()
        },
        guest_dir: None,
    })
    .await
    .unwrap();
    let b = agent(dir.path(), "out-b").await;
    let engine = engine_with(dir.path(), &a).await;
    enroll_host(&engine, &b).await;
    let outsider = VmName::new("outsider").unwrap();
    let snap = engine
        .wait_for(Duration::from_secs(20), |s| {
            s.host(&a.host_id)
                .is_some_and(|h| h.vm(&outsider).is_some())
        })
        .await
        .unwrap();
    let from = snap.host(&a.host_id).unwrap();
    let status = from.vm(&outsider).unwrap();
    assert_eq!(status.disks.as_deref(), Some(&[][..]));
    let reasons = crate::engine::migration::precheck(
        status,
        from,
        snap.host(&b.host_id).unwrap(),
        &snap.services,
        &snap.migrations,
    )
    .unwrap_err();
    assert!(
        reasons[0].contains("outsider has no disk in out-a's storage"),
        "{reasons:?}"
    );
    let refused = engine
        .request(|reply| Command::MigrateVm {
            host: a.host_id.clone(),
            vm: outsider.clone(),
            to: b.host_id.clone(),
            options: Default::default(),
            reply,
        })
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("has no disk"), "{refused}");
    let snap = engine.snapshot();
    assert!(snap.migrations.is_empty());
    assert_eq!(
        snap.host(&a.host_id).unwrap().vm(&outsider).unwrap().state,
        VmState::Running
    );
}

/// A migration the target refuses rolls back: the VM runs on the source again, and the
/// target keeps nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_migration_rolls_back_to_the_source() {
    use crate::engine::migration::MigrationStep;
    let dir = tempfile::tempdir().unwrap();
    let a = agent(dir.path(), "back-a").await;
    let b = agent(dir.path(), "back-b").await;
    let engine = engine_with(dir.path(), &a).await;
    enroll_host(&engine, &b).await;
    engine
        .request(|reply| Command::CreateVm {
            host: a.host_id.clone(),
            spec: spec("stuck"),
            start: true,
            reply,
        })
        .await
        .unwrap();
    // The target cannot write the transfer's file: a directory is in the way.
    let in_the_way = disk_of(dir.path(), "back-b", "stuck").with_extension("img.transfer");
    std::fs::create_dir_all(&in_the_way).unwrap();
    let journal = engine
        .request(|reply| Command::MigrateVm {
            host: a.host_id.clone(),
            vm: VmName::new("stuck").unwrap(),
            to: b.host_id.clone(),
            options: Default::default(),
            reply,
        })
        .await
        .unwrap();
    let done = migration_ends(&engine, journal.id).await;
    assert_eq!(done.step, MigrationStep::RolledBack, "{done:?}");
    assert!(
        done.error
            .as_deref()
            .unwrap()
            .starts_with("transferring failed"),
        "{done:?}"
    );
    engine
        .wait_for(Duration::from_secs(10), |s| {
            s.host(&a.host_id).is_some_and(|h| {
                h.vm(&VmName::new("stuck").unwrap())
                    .is_some_and(|v| v.state == VmState::Running)
            }) && s
                .host(&b.host_id)
                .is_some_and(|h| h.vm(&VmName::new("stuck").unwrap()).is_none())
        })
        .await
        .expect("back on the source, running");
    assert!(disk_of(dir.path(), "back-a", "stuck").exists());
    assert!(!disk_of(dir.path(), "back-b", "stuck").exists());
    // Refused before anything starts: a VM onto its own host, or one that does not exist.
    let err = engine
        .request(|reply| Command::MigrateVm {
            host: a.host_id.clone(),
            vm: VmName::new("stuck").unwrap(),
            to: a.host_id.clone(),
            options: Default::default(),
            reply,
        })
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "stuck is on back-a already");
    // The pre-check of a drop in the window holds for ctl too: every reason at once.
    for host in [&a.host_id, &b.host_id] {
        engine
            .request(|reply| Command::CreateVm {
                host: host.clone(),
                spec: spec("twin"),
                start: false,
                reply,
            })
            .await
            .unwrap();
    }
    let err = engine
        .request(|reply| Command::MigrateVm {
            host: a.host_id.clone(),
            vm: VmName::new("twin").unwrap(),
            to: b.host_id.clone(),
            options: Default::default(),
            reply,
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "twin cannot go to back-b: back-b: already has a VM named twin"
    );
}

async fn agent_at_site(dir: &Path, host: &str, site: &str) -> RunningAgent {
    let config = AgentConfig {
        site: dunes_agent::config::SiteConfig {
            name: dunes_shared::model::SiteName::new(site).unwrap(),
            remote: false,
            link_bandwidth_mbps: 1000,
            link_latency_ms: 1,
            // Geneva keeps transfers to 800 Mbit/s of its link.
            transfer_limit_mbps: (site == "gva").then_some(800),
            networks: Vec::new(),
        },
        ..AgentConfig::default()
    };
    agent_with(dir, host, "127.0.0.1:0", config).await
}

async fn define_and_deploy(
    engine: &EngineHandle,
    source: &str,
    place: &[(&str, u32, &HostId)],
) -> dunes_shared::model::ServiceName {
    let name = engine
        .request(|reply| Command::DefineService {
            source: source.into(),
            replace: false,
            reply,
        })
        .await
        .unwrap();
    let overrides = place
        .iter()
        .map(|(app, index, host)| crate::engine::placement::Override {
            app: AppName::new(*app).unwrap(),
            index: *index,
            host: (*host).clone(),
        })
        .collect();
    let report = engine
        .request(|reply| Command::DeployService {
            name: name.clone(),
            fingerprint: None,
            overrides,
            reply,
        })
        .await
        .unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
    name
}

/// Hosts that hold a VM of each of two names at once, in any snapshot.
fn watch_for_sharing(
    engine: &EngineHandle,
    first: &'static str,
    second: &'static str,
) -> tokio::task::JoinHandle<Vec<String>> {
    let mut updates = engine.subscribe();
    tokio::spawn(async move {
        let mut shared = Vec::new();
        while updates.changed().await.is_ok() {
            let snap = updates.borrow_and_update().clone();
            for host in &snap.hosts {
                let has = |n: &str| host.vms.iter().any(|v| v.name.as_str() == n);
                if has(first) && has(second) {
                    shared.push(format!("{} at version {}", host.id(), snap.version));
                }
            }
        }
        shared
    })
}

/// A drain moves every VM off the host to the hosts placement picks under each service's
/// rules, one at a time, never letting anti-affine instances share a host; what cannot move
/// is named with its reason, and the host takes nothing new until it is undrained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_empties_a_host_under_the_service_rules() {
    let dir = tempfile::tempdir().unwrap();
    let a = agent(dir.path(), "drain-a").await;
    let b = agent(dir.path(), "drain-b").await;
    let c = agent(dir.path(), "drain-c").await;
    let engine = engine_with(dir.path(), &a).await;
    enroll_host(&engine, &b).await;
    enroll_host(&engine, &c).await;
    let source = "name = \"pair\"\n\
        [[application]]\nname = \"db\"\nruntime = \"libvirt\"\ntemplate = \"tiny\"\nvcpus = 1\nmemory_mib = 64\ninstances = 1\n\
        [[application]]\nname = \"web\"\nruntime = \"libvirt\"\ntemplate = \"tiny\"\nvcpus = 1\nmemory_mib = 64\ninstances = 1\ndepends_on = [\"db\"]\n\
        [[application]]\nname = \"vault\"\nruntime = \"libvirt\"\ntemplate = \"tiny\"\nvcpus = 1\nmemory_mib = 64\ninstances = 1\n\
        [rules]\nanti_affinity = [[\"web\", \"db\"]]\nnever_relocate = [\"vault\"]\n";
    define_and_deploy(
        &engine,
        source,
        &[
            ("web", 0, &a.host_id),
            ("db", 0, &b.host_id),
            ("vault", 0, &a.host_id),
        ],
    )
    .await;
    engine
        .request(|reply| Command::CreateVm {
            host: a.host_id.clone(),
            spec: spec("plain"),
            start: true,
            reply,
        })
        .await
        .unwrap();
    let sharing = watch_for_sharing(&engine, "pair-web-0", "pair-db-0");
    let first = engine
        .request(|reply| Command::DrainHost {
            host: a.host_id.clone(),
            reply,
        })
        .await
        .unwrap();
    assert_eq!(first.remaining, 3, "{first:?}");
    let snap = engine
        .wait_for(Duration::from_secs(90), |s| {
            s.drain(&a.host_id).is_some_and(|d| d.is_settled())
        })
        .await
        .unwrap_or_else(|s| panic!("the drain never settled: {:?}", s.drains));
    let drain = snap.drain(&a.host_id).unwrap().clone();
    assert_eq!(drain.moved, 2, "{drain:?}");
    assert_eq!(drain.remaining, 1, "{drain:?}");
    assert_eq!(drain.blocked.len(), 1, "{drain:?}");
    assert_eq!(drain.blocked[0].vm.as_str(), "pair-vault-0");
    assert!(
        drain.blocked[0].reason.contains("never relocates"),
        "{drain:?}"
    );
    let on = |host: &HostId, vm: &str| {
        snap.host(host)
            .unwrap()
            .vm(&VmName::new(vm).unwrap())
            .is_some()
    };
    // The web front went where the database is not.
    assert!(on(&c.host_id, "pair-web-0"), "{:?}", snap.hosts);
    assert!(!on(&a.host_id, "pair-web-0") && !on(&a.host_id, "plain"));
    assert!(on(&b.host_id, "plain") || on(&c.host_id, "plain"));
    let web = snap.services[0]
        .instances
        .iter()
        .find(|i| i.record.app.as_str() == "web")
        .unwrap();
    assert_eq!(web.record.host, c.host_id, "the instance follows its VM");
    assert!(
        snap.migrations.iter().all(
            |m| m.origin == crate::engine::migration::MigrationOrigin::Drain(a.host_id.clone())
        ),
        "{:?}",
        snap.migrations
    );
    // In maintenance: nothing new lands on it.
    let refused = engine
        .request(|reply| Command::CreateVm {
            host: a.host_id.clone(),
            spec: spec("newcomer"),
            start: false,
            reply,
        })
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("in maintenance"), "{refused}");
    let refused = engine
        .request(|reply| Command::MigrateVm {
            host: b.host_id.clone(),
            vm: VmName::new("pair-db-0").unwrap(),
            to: a.host_id.clone(),
            options: Default::default(),
            reply,
        })
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("in maintenance"), "{refused}");
    engine
        .request(|reply| Command::UndrainHost {
            host: a.host_id.clone(),
            reply,
        })
        .await
        .unwrap();
    engine
        .request(|reply| Command::CreateVm {
            host: a.host_id.clone(),
            spec: spec("newcomer"),
            start: false,
            reply,
        })
        .await
        .unwrap();
    drop(engine);
    let shared = tokio::time::timeout(Duration::from_secs(5), sharing)
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
    assert!(shared.is_empty(), "anti-affine instances shared {shared:?}");
}

/// A service moves to another site: stopped, its instances migrated there in start order,
/// started again; the move is refused up front when a site cannot take it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_moves_to_another_site_in_start_order() {
    let dir = tempfile::tempdir().unwrap();
    let a = agent_at_site(dir.path(), "move-a", "lsn").await;
    let a2 = agent_at_site(dir.path(), "move-a2", "lsn").await;
    let b = agent_at_site(dir.path(), "move-b", "gva").await;
    let c = agent_at_site(dir.path(), "move-c", "gva").await;
    let engine = engine_with(dir.path(), &a).await;
    for agent in [&a2, &b, &c] {
        enroll_host(&engine, agent).await;
    }
    let source = "name = \"duo\"\n\
        [[application]]\nname = \"db\"\nruntime = \"libvirt\"\ntemplate = \"tiny\"\nvcpus = 1\nmemory_mib = 64\ninstances = 1\n\
        [[application]]\nname = \"web\"\nruntime = \"libvirt\"\ntemplate = \"tiny\"\nvcpus = 1\nmemory_mib = 64\ninstances = 1\ndepends_on = [\"db\"]\n\
        [rules]\nanti_affinity = [[\"web\", \"db\"]]\n";
    let name = define_and_deploy(
        &engine,
        source,
        &[("db", 0, &a.host_id), ("web", 0, &a2.host_id)],
    )
    .await;
    let report = engine
        .request(|reply| Command::StartService {
            name: name.clone(),
            reply,
        })
        .await
        .unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
    // The database holds data: its disk stream carries it between the sites.
    {
        use std::io::Write;
        let mut disk = std::fs::OpenOptions::new()
            .write(true)
            .open(disk_of(dir.path(), "move-a", "duo-db-0"))
            .unwrap();
        disk.write_all(&vec![7u8; 1 << 20]).unwrap();
        disk.sync_all().unwrap();
    }
    let err = engine
        .request(|reply| Command::MoveService {
            name: name.clone(),
            site: "nowhere".into(),
            reply,
        })
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "no enrolled host is at site nowhere");
    let moving = engine
        .request(|reply| Command::MoveService {
            name: name.clone(),
            site: "gva".into(),
            reply,
        })
        .await
        .unwrap();
    assert!(moving.was_running);
    let snap = engine
        .wait_for(Duration::from_secs(120), |s| {
            s.services[0].record.moving.is_none()
                && s.services[0].instances.iter().all(|i| {
                    i.record.host != a.host_id
                        && i.record.host != a2.host_id
                        && i.vm_state == Some(VmState::Running)
                })
        })
        .await
        .unwrap_or_else(|s| {
            panic!(
                "the move never ended: {:?} {:?}",
                s.services[0].record.moving,
                s.events.iter().rev().take(10).collect::<Vec<_>>()
            )
        });
    let hosts: Vec<&HostId> = snap.services[0]
        .instances
        .iter()
        .map(|i| &i.record.host)
        .collect();
    assert_ne!(
        hosts[0], hosts[1],
        "anti-affine instances on distinct hosts"
    );
    // In start order: the database went first.
    let order: Vec<&str> = snap.migrations.iter().map(|m| m.vm.as_str()).collect();
    assert_eq!(order, ["duo-db-0", "duo-web-0"]);
    // Between sites, the site's transfer limit holds; neither site is remote: no compression.
    assert!(
        snap.migrations
            .iter()
            .all(|m| m.limit_mbps == Some(800) && !m.compress),
        "{:?}",
        snap.migrations
    );
    assert!(
        snap.events
            .iter()
            .any(|e| e.message == "service duo moved to site gva"),
        "{:?}",
        snap.events
    );
    let err = engine
        .request(|reply| Command::MoveService {
            name: name.clone(),
            site: "gva".into(),
            reply,
        })
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "service duo is at site gva already");
    // The disk streams left the first site: its transfer, and the service's.
    let streamed: f64 = snap
        .migrations
        .iter()
        .map(|m| m.bytes_done as f64 / 1e9)
        .sum();
    assert!(streamed > 0.0);
    for (by, key) in [
        (super::cost::CostBy::Service, "duo"),
        (super::cost::CostBy::Site, "lsn"),
    ] {
        let lines = engine
            .request(|reply| Command::Cost {
                by,
                since_secs: 3600,
                reply,
            })
            .await
            .unwrap();
        let line = lines.iter().find(|l| l.key == key);
        assert!(
            line.is_some_and(|l| l.usage.gb_transferred >= streamed),
            "{key}: {lines:?}"
        );
    }
}

/// Writes template `base` into an agent's data dir before it starts: 16 MiB, 2 MiB of data
/// made from `seed`, VM disks as qcow2 overlays on it.
fn overlay_template(dir: &Path, host: &str, seed: u8) {
    use std::io::{Seek, SeekFrom, Write};
    let tdir = dir.join(host).join("storage/images/base");
    std::fs::create_dir_all(&tdir).unwrap();
    std::fs::write(
        tdir.join("template.toml"),
        "description = \"base image\"\ndefault_vcpus = 1\ndefault_memory_mib = 64\nplaceholder = true\noverlay = true\n",
    )
    .unwrap();
    let mut f = std::fs::File::create(tdir.join("disk.img")).unwrap();
    f.set_len(16 << 20).unwrap();
    f.seek(SeekFrom::Start(4 << 20)).unwrap();
    let data: Vec<u8> = (0..2u32 << 20).map(|i| (i % 251) as u8 ^ seed).collect();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
}

fn qemu_tool(args: &[&str]) -> String {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{} is needed (apt-get install qemu-utils): {e}", args[0]));
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A VM made as an overlay on a template moves as an overlay to a host holding the same
/// template image, and flattened to a host whose image differs; the guest's data and the
/// template's reach the target either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlay_moves_as_it_is_or_flattened_as_the_target_holds_its_template() {
    use crate::engine::migration::{DiskMove, MigrationStep};
    let dir = tempfile::tempdir().unwrap();
    overlay_template(dir.path(), "ov-a", 0);
    overlay_template(dir.path(), "ov-b", 0);
    // Another image under the same name.
    overlay_template(dir.path(), "ov-c", 0x80);
    let a = agent(dir.path(), "ov-a").await;
    let b = agent(dir.path(), "ov-b").await;
    let c = agent(dir.path(), "ov-c").await;
    let engine = engine_with(dir.path(), &a).await;
    enroll_host(&engine, &b).await;
    enroll_host(&engine, &c).await;
    let vm = VmName::new("ov").unwrap();
    let created = engine
        .request(|reply| Command::CreateVm {
            host: a.host_id.clone(),
            spec: VmSpec {
                name: vm.clone(),
                template: TemplateName::new("base").unwrap(),
                vcpus: Some(1),
                memory_mib: Some(64),
            },
            start: true,
            reply,
        })
        .await
        .unwrap();
    let base = created.overlay_on.clone().expect("the disk is an overlay");
    assert_eq!(base.template.as_str(), "base");
    let disks = |host: &str| {
        dir.path()
            .join(host)
            .canonicalize()
            .unwrap()
            .join("storage/disks")
    };
    let overlay_a = disks("ov-a").join("ov.qcow2");
    assert!(overlay_a.exists() && !disks("ov-a").join("ov.img").exists());
    // The guest writes 64 KiB over the template's data and 64 KiB in a hole.
    let path = overlay_a.to_str().unwrap();
    qemu_tool(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 5M 64k", path]);
    qemu_tool(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0xa5 12M 64k",
        path,
    ]);
    let guest_view = |p: &Path, format: &str| {
        let out = dir.path().join("view.raw");
        let _ = std::fs::remove_file(&out);
        qemu_tool(&[
            "qemu-img",
            "convert",
            "-f",
            format,
            "-O",
            "raw",
            p.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        std::fs::read(out).unwrap()
    };
    let seen_on_a = guest_view(&overlay_a, "qcow2");
    let overlay_bytes = std::fs::read(&overlay_a).unwrap();

    // Each target is judged by its template image.
    let snap = engine
        .wait_for(Duration::from_secs(20), |s| {
            s.host(&a.host_id)
                .and_then(|h| h.vm(&vm))
                .is_some_and(|v| v.overlay_on.is_some())
        })
        .await
        .unwrap();
    let from = snap.host(&a.host_id).unwrap();
    let status = from.vm(&vm).unwrap();
    let to_b = crate::engine::migration::precheck(
        status,
        from,
        snap.host(&b.host_id).unwrap(),
        &snap.services,
        &snap.migrations,
    )
    .unwrap();
    assert!(matches!(to_b.disk_move, DiskMove::Overlay(_)), "{to_b:?}");
    assert_eq!(to_b.bytes, status.disk_bytes);
    let to_c = crate::engine::migration::precheck(
        status,
        from,
        snap.host(&c.host_id).unwrap(),
        &snap.services,
        &snap.migrations,
    )
    .unwrap();
    assert!(matches!(to_c.disk_move, DiskMove::Flattened(_)), "{to_c:?}");
    assert_eq!(to_c.bytes, status.disk_bytes + base.allocated_bytes);
    assert!(to_c.disk_move.describe().contains("flattened"));

    // To b: the overlay as it is, over b's own copy of the template.
    let journal = engine
        .request(|reply| Command::MigrateVm {
            host: a.host_id.clone(),
            vm: vm.clone(),
            to: b.host_id.clone(),
            options: Default::default(),
            reply,
        })
        .await
        .unwrap();
    assert!(matches!(journal.disk_move, DiskMove::Overlay(_)));
    let done = migration_ends(&engine, journal.id).await;
    assert_eq!(done.step, MigrationStep::SourceDeleted, "{done:?}");
    let overlay_b = disks("ov-b").join("ov.qcow2");
    assert_eq!(std::fs::read(&overlay_b).unwrap(), overlay_bytes);
    assert!(!disks("ov-b").join("ov.img").exists());
    assert!(!overlay_a.exists(), "the source's overlay goes last");
    assert_eq!(guest_view(&overlay_b, "qcow2"), seen_on_a);
    // Only the overlay's allocation crossed: far less than the 2 MiB of the template.
    assert!(done.bytes_total < 1 << 20, "{done:?}");

    // To c: flattened into a whole image, since c's "base" is another image.
    let journal = engine
        .request(|reply| Command::MigrateVm {
            host: b.host_id.clone(),
            vm: vm.clone(),
            to: c.host_id.clone(),
            options: Default::default(),
            reply,
        })
        .await
        .unwrap();
    assert!(matches!(journal.disk_move, DiskMove::Flattened(_)));
    let done = migration_ends(&engine, journal.id).await;
    assert_eq!(done.step, MigrationStep::SourceDeleted, "{done:?}");
    let raw_c = disks("ov-c").join("ov.img");
    assert!(!disks("ov-c").join("ov.qcow2").exists());
    assert_eq!(std::fs::read(&raw_c).unwrap(), seen_on_a);
    assert!(
        done.bytes_total >= 2 << 20,
        "the template's data travels: {done:?}"
    );
    let snap = engine
        .wait_for(Duration::from_secs(20), |s| {
            s.host(&c.host_id)
                .and_then(|h| h.vm(&vm))
                .is_some_and(|v| v.state == VmState::Running)
        })
        .await
        .expect("the VM runs on c");
    let on_c = snap.host(&c.host_id).unwrap().vm(&vm).unwrap();
    assert_eq!(on_c.uuid, created.uuid);
    assert!(on_c.overlay_on.is_none(), "a whole image now: {on_c:?}");
    let record =
        std::fs::read_to_string(dir.path().join("ov-c/storage/definitions/ov.toml")).unwrap();
    assert!(
        record.contains("ov.img") && !record.contains("qcow2"),
        "{record}"
    );
    // The history says how each disk went.
    let said: Vec<String> = snap.events.iter().map(|e| e.message.clone()).collect();
    assert!(
        said.iter().any(|m| m.contains("disk: overlay only")),
        "{said:?}"
    );
    assert!(
        said.iter().any(|m| m.contains("disk: flattened")),
        "{said:?}"
    );
}

/// Readings from a real agent become series of a host and of its running VM, and what was
/// stored is read again by a console started afresh on the same store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_come_in_batches_and_survive_a_console_restart() {
    use super::stats::{Metric, StatsAnswer, Subject};
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), "stats-a").await;
    let engine = engine_with(dir.path(), &agent).await;
    let host = agent.host_id.clone();
    engine
        .request(|reply| Command::CreateVm {
            host: host.clone(),
            spec: spec("busy"),
            start: true,
            reply,
        })
        .await
        .unwrap();
    let vm = Subject::Workload(VmName::new("busy").unwrap());
    let query = |engine: EngineHandle, subject: Subject| async move {
        engine
            .request(|reply| Command::Stats {
                subject,
                since_secs: 600,
                resolution_secs: Some(1),
                reply,
            })
            .await
            .unwrap()
    };
    let points = |a: &StatsAnswer, m: Metric| {
        a.series
            .iter()
            .find(|s| s.metric == m)
            .map_or(0, |s| s.points.len())
    };
    // Batches of five readings: two batches give rates for both subjects.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (host_answer, vm_answer) = loop {
        let h = query(engine.clone(), Subject::Host(host.clone())).await;
        let v = query(engine.clone(), vm.clone()).await;
        if points(&h, Metric::Cpu) >= 5 && points(&v, Metric::Cpu) >= 5 {
            break (h, v);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no series after 60 s: host {h:?}, vm {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(host_answer.resolution_secs, 1);
    let memory = host_answer
        .series
        .iter()
        .find(|s| s.metric == Metric::Memory)
        .unwrap();
    assert!(memory.points.iter().all(|b| b.mean() > 0.0), "{memory:?}");
    // The test driver's VM has the 64 MiB it was given.
    let vm_memory = vm_answer
        .series
        .iter()
        .find(|s| s.metric == Metric::Memory)
        .unwrap();
    assert!(
        vm_memory.points.iter().all(|b| b.mean() == 64.0),
        "{vm_memory:?}"
    );
    // What it costs per hour, bucket by bucket, from its CPU and what it sent.
    let cost = vm_answer
        .series
        .iter()
        .find(|s| s.metric == Metric::Cost)
        .expect("a cost series");
    assert!(
        cost.points.len() >= 5 && cost.points.iter().all(|b| b.mean() >= 0.0),
        "{cost:?}"
    );
    // An unknown resolution is a clear error.
    let err = engine
        .request(|reply| Command::Stats {
            subject: vm.clone(),
            since_secs: 60,
            resolution_secs: Some(7),
            reply,
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no 7 s resolution"), "{err}");

    // The same numbers for Prometheus, on a local port.
    let server = crate::metrics::serve(engine.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let bound = server.address;
    let get = |path: &'static str| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(bound).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        text
    };
    let text = get("/metrics").await;
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    for wanted in [
        "dunes_host_up{host=\"stats-a\",site=\"default\"} 1",
        "dunes_workload_memory_used_mib{workload=\"busy\",host=\"stats-a\"} 64",
        "# TYPE dunes_host_cpu_percent gauge",
        "dunes_host_cpu_percent{host=\"stats-a\"} ",
    ] {
        assert!(text.contains(wanted), "{wanted:?} not in {text}");
    }
    assert!(get("/").await.starts_with("HTTP/1.1 404"));
    drop(server);

    // A clean stop writes what is open; a new console reads it back.
    let before = points(&vm_answer, Metric::Cpu);
    agent.shutdown().await;
    drop(engine);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let engine = loop {
        match start_with(&dir.path().join("console"), EngineOptions::default()).await {
            Ok(e) => break e,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "{e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let after = query(engine.clone(), vm).await;
    assert!(
        points(&after, Metric::Cpu) >= before,
        "{before} points before the restart, {after:?} after"
    );
    let host_after = query(engine, Subject::Host(host)).await;
    assert!(points(&host_after, Metric::Memory) >= 5, "{host_after:?}");
}

/// A front-end of the process runtime whose load a flag file turns on: autoscaling adds an
/// instance while it is busy and removes the newest once it is quiet, and says why in the
/// event log; a replay over the recorded history finds the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_front_end_scales_out_and_back_in_with_its_reasons_logged() {
    use super::autoscale::{AutoscaleMetric, AutoscaleRule, Change};
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // The load switch: readable by the instances' own users.
    let switch = tempfile::tempdir().unwrap();
    std::fs::set_permissions(switch.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let load = switch.path().join("load");
    let agent = agent(dir.path(), "scaling").await;
    let template = dir.path().join("scaling/storage/images/burner");
    std::fs::create_dir_all(&template).unwrap();
    let script = format!(
        "while :; do if [ -e {} ]; then i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; else sleep 0.2; fi; done",
        load.display()
    );
    std::fs::write(
        template.join("process.toml"),
        format!(
            "description = \"busy while the load file exists\"\ncommand = [\"/bin/sh\", \"-c\", {script:?}]\ndefault_vcpus = 1\ndefault_memory_mib = 32\n"
        ),
    )
    .unwrap();
    let engine = engine_with(dir.path(), &agent).await;
    let source = "name = \"front\"\n[[application]]\nname = \"web\"\nruntime = \"process\"\ntemplate = \"burner\"\nvcpus = 1\nmemory_mib = 32\ninstances = 1\n";
    let name = engine
        .request(|reply| Command::DefineService {
            source: source.into(),
            replace: false,
            reply,
        })
        .await
        .unwrap();
    deploy_and_start(&engine, &name).await;
    let web = AppName::new("web").unwrap();
    let rule = AutoscaleRule {
        metric: AutoscaleMetric::Cpu,
        scale_out_above: 40.0,
        scale_in_below: 10.0,
        period_secs: 5,
        periods: 2,
        cooldown_secs: 10,
        min_instances: 1,
        max_instances: 2,
    };
    // A rule without hysteresis is refused, and changes nothing.
    let bad = engine
        .request(|reply| Command::SetAutoscale {
            service: name.clone(),
            app: web.clone(),
            rule: Some(AutoscaleRule {
                scale_in_below: 50.0,
                ..rule.clone()
            }),
            reply,
        })
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("must be below"), "{bad}");
    let view = engine
        .request(|reply| Command::SetAutoscale {
            service: name.clone(),
            app: web.clone(),
            rule: Some(rule.clone()),
            reply,
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!((view.desired, view.instances), (1, 1));
    let running = |s: &super::Snapshot, n: usize| {
        let instances = &s.services[0].instances;
        instances.len() == n
            && instances
                .iter()
                .all(|i| i.vm_state == Some(dunes_shared::model::VmState::Running))
    };
    let log = |engine: &EngineHandle| -> Vec<String> {
        engine
            .snapshot()
            .events
            .iter()
            .map(|e| e.message.clone())
            .collect()
    };

    // Busy: a second instance, placed and started.
    std::fs::write(&load, "").unwrap();
    let out = engine
        .wait_for(Duration::from_secs(120), |s| running(s, 2))
        .await;
    assert!(out.is_ok(), "no second instance: {:?}", log(&engine));
    let reason = log(&engine)
        .into_iter()
        .find(|m| m.starts_with("autoscale front: web cpu mean"))
        .unwrap();
    assert!(
        reason.contains("> 40 % for 2×5 s → +1 instance on scaling"),
        "{reason}"
    );

    // Quiet: the newest goes, never below the minimum.
    std::fs::remove_file(&load).unwrap();
    let back = engine
        .wait_for(Duration::from_secs(120), |s| running(s, 1))
        .await;
    assert!(back.is_ok(), "still two instances: {:?}", log(&engine));
    assert_eq!(engine.snapshot().services[0].instances[0].record.index, 0);
    let reason = log(&engine)
        .into_iter()
        .find(|m| m.contains("→ −1 instance (the newest)"))
        .unwrap();
    assert!(reason.contains("< 10 % for 2×5 s"), "{reason}");
    let shown = engine
        .request(|reply| Command::AutoscaleShow { reply })
        .await
        .unwrap();
    assert_eq!((shown[0].desired, shown[0].instances), (1, 1));

    // The replay over what was recorded scales out and back in too.
    let replayed = engine
        .request(|reply| Command::ReplayAutoscale {
            service: name.clone(),
            app: web.clone(),
            since_secs: 600,
            reply,
        })
        .await
        .unwrap();
    assert_eq!(replayed.period_secs, 5);
    let kinds: Vec<Change> = replayed
        .changes
        .iter()
        .filter_map(|(_, d)| d.change)
        .collect();
    assert!(
        kinds.contains(&Change::Out) && kinds.contains(&Change::In),
        "{replayed:?}"
    );
}

/// An application metric (a queue's length, printed by a command) drives autoscaling: a long
/// queue adds a worker, an empty one removes it; the values are the instances' `app-metric`
/// series. A rule on a metric the application does not have is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_length_metric_scales_workers_out_and_in() {
    use super::autoscale::{AutoscaleMetric, AutoscaleRule};
    use super::stats::{Metric, Subject};
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // The queue: a file the instances' own users can read.
    let shared = tempfile::tempdir().unwrap();
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let queue = shared.path().join("queue");
    std::fs::write(&queue, "0\n").unwrap();
    std::fs::set_permissions(&queue, std::fs::Permissions::from_mode(0o644)).unwrap();
    let agent = agent(dir.path(), "queues").await;
    let template = dir.path().join("queues/storage/images/idler");
    std::fs::create_dir_all(&template).unwrap();
    std::fs::write(
        template.join("process.toml"),
        "description = \"idle\"\ncommand = [\"/bin/sh\", \"-c\", \"while :; do sleep 1; done\"]\ndefault_vcpus = 1\ndefault_memory_mib = 16\n",
    )
    .unwrap();
    let engine = engine_with(dir.path(), &agent).await;
    let source = format!(
        "name = \"jobs\"\n[[application]]\nname = \"worker\"\nruntime = \"process\"\ntemplate = \"idler\"\nvcpus = 1\nmemory_mib = 16\nmetric = {{ command = \"cat {}\" }}\n[[application]]\nname = \"plain\"\nruntime = \"process\"\ntemplate = \"idler\"\nvcpus = 1\nmemory_mib = 16\n",
        queue.display()
    );
    let name = engine
        .request(|reply| Command::DefineService {
            source,
            replace: false,
            reply,
        })
        .await
        .unwrap();
    deploy_and_start(&engine, &name).await;
    let rule = AutoscaleRule {
        metric: AutoscaleMetric::AppMetric,
        scale_out_above: 20.0,
        scale_in_below: 5.0,
        period_secs: 5,
        periods: 1,
        cooldown_secs: 0,
        min_instances: 1,
        max_instances: 2,
    };
    let refused = engine
        .request(|reply| Command::SetAutoscale {
            service: name.clone(),
            app: AppName::new("plain").unwrap(),
            rule: Some(rule.clone()),
            reply,
        })
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("plain has no metric"),
        "{refused}"
    );
    let worker = AppName::new("worker").unwrap();
    engine
        .request(|reply| Command::SetAutoscale {
            service: name.clone(),
            app: worker.clone(),
            rule: Some(rule),
            reply,
        })
        .await
        .unwrap();
    let workers = |s: &super::Snapshot| -> Vec<super::InstanceView> {
        s.services[0]
            .instances
            .iter()
            .filter(|i| i.record.app == worker)
            .cloned()
            .collect()
    };
    let log = |engine: &EngineHandle| -> Vec<String> {
        engine
            .snapshot()
            .events
            .iter()
            .map(|e| e.message.clone())
            .collect()
    };
    // The value read shows on the instance.
    engine
        .wait_for(Duration::from_secs(30), |s| {
            workers(s)
                .first()
                .is_some_and(|i| i.metric == Some(Ok(0.0)))
        })
        .await
        .unwrap_or_else(|s| panic!("no metric read: {:?}", workers(&s)));

    std::fs::write(&queue, "30\n").unwrap();
    let out = engine
        .wait_for(Duration::from_secs(120), |s| {
            let w = workers(s);
            w.len() == 2
                && w.iter()
                    .all(|i| i.vm_state == Some(dunes_shared::model::VmState::Running))
        })
        .await;
    assert!(out.is_ok(), "no second worker: {:?}", log(&engine));
    let reason = log(&engine)
        .into_iter()
        .find(|m| m.starts_with("autoscale jobs: worker app-metric mean"))
        .unwrap();
    assert!(
        reason.contains("mean 30.0 > 20 for 1×5 s → +1 instance on queues"),
        "{reason}"
    );

    std::fs::write(&queue, "1\n").unwrap();
    let back = engine
        .wait_for(Duration::from_secs(120), |s| workers(s).len() == 1)
        .await;
    assert!(back.is_ok(), "still two workers: {:?}", log(&engine));
    assert!(
        log(&engine)
            .iter()
            .any(|m| m.contains("worker app-metric mean 1.0 < 5 for 1×5 s → −1 instance")),
        "{:?}",
        log(&engine)
    );
    // The values are a series of the instance, as charts and `ctl stats` show them.
    let vm = workers(&engine.snapshot())[0].record.vm.clone();
    let answer = engine
        .request(|reply| Command::Stats {
            subject: Subject::Workload(vm),
            since_secs: 600,
            resolution_secs: Some(1),
            reply,
        })
        .await
        .unwrap();
    let values: Vec<f64> = answer
        .series
        .iter()
        .find(|s| s.metric == Metric::AppMetric)
        .map(|s| s.points.iter().map(|b| b.max).collect())
        .unwrap_or_default();
    assert!(
        values.contains(&30.0) && values.contains(&1.0),
        "{values:?}"
    );
}

/// A workload deleted within a report's range still counts, up to when it went, under its
/// instance, its service (deleted too) and its site.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_workload_still_counts_in_cost_reports() {
    use super::cost::{CostBy, CostLine};
    let dir = tempfile::tempdir().unwrap();
    let agent = agent_with(
        dir.path(),
        "costs",
        "127.0.0.1:0",
        AgentConfig {
            prices: dunes_shared::model::Prices {
                per_cpu_hour: 1.0,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let template = dir.path().join("costs/storage/images/spinner");
    std::fs::create_dir_all(&template).unwrap();
    std::fs::write(
        template.join("process.toml"),
        "description = \"uses some CPU\"\ncommand = [\"/bin/sh\", \"-c\", \"while :; do i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; sleep 0.5; done\"]\ndefault_vcpus = 1\ndefault_memory_mib = 16\n",
    )
    .unwrap();
    let engine = engine_with(dir.path(), &agent).await;
    let source = "name = \"costly\"\n[[application]]\nname = \"job\"\nruntime = \"process\"\ntemplate = \"spinner\"\nvcpus = 1\nmemory_mib = 16\n";
    let service = engine
        .request(|reply| Command::DefineService {
            source: source.into(),
            replace: false,
            reply,
        })
        .await
        .unwrap();
    deploy_and_start(&engine, &service).await;
    let vm = engine.snapshot().services[0].instances[0]
        .record
        .vm
        .to_string();
    let report = |engine: EngineHandle, by: CostBy| async move {
        engine
            .request(|reply| Command::Cost {
                by,
                since_secs: 3600,
                reply,
            })
            .await
            .unwrap()
    };
    let line = |lines: &[CostLine], key: &str| lines.iter().find(|l| l.key == key).cloned();
    // Its CPU-hours while it runs.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let before = loop {
        let lines = report(engine.clone(), CostBy::Instance).await;
        if let Some(l) = line(&lines, &vm).filter(|l| l.usage.cpu_hours > 0.0) {
            break l;
        }
        assert!(std::time::Instant::now() < deadline, "no cost: {lines:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let deleted = engine
        .request(|reply| Command::DeleteService {
            name: service,
            reply,
        })
        .await
        .unwrap();
    assert!(deleted.failed.is_empty(), "{deleted:?}");
    let after = report(engine.clone(), CostBy::Instance).await;
    let gone = line(&after, &vm).expect("the deleted instance is in the report");
    assert!(
        gone.usage.cpu_hours >= before.usage.cpu_hours && gone.cost > 0.0,
        "before {before:?}, after {gone:?}"
    );
    let by_service = report(engine.clone(), CostBy::Service).await;
    assert!(
        line(&by_service, "costly").is_some_and(|l| l.cost == gone.cost),
        "{by_service:?}"
    );
    let by_site = report(engine, CostBy::Site).await;
    assert!(
        line(&by_site, "default").is_some_and(|l| l.cost >= gone.cost),
        "{by_site:?}"
    );
}
