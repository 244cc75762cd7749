//! End to end: two real agents on libvirt's test driver, a real engine, real QUIC + mTLS.

use std::time::{Duration, Instant};

use dunes_console::engine::{Command, EngineError, EngineHandle, LinkState, Snapshot};
use dunes_shared::model::{HostId, RuntimeKind, TemplateName, VmName, VmSpec, VmState};
use dunes_tests::{AgentProcess, enroll, start_engine};

/// The issue's bound for a state change to reach the engine.
const STATE_VISIBLE: Duration = Duration::from_secs(1);

fn vm_state(s: &Snapshot, host: &HostId, vm: &str) -> Option<VmState> {
    s.host(host)?.vm(&VmName::new(vm).unwrap()).map(|v| v.state)
}

/// Waits for `pred` and returns how long it took; fails the test past `limit`.
async fn within(
    engine: &EngineHandle,
    limit: Duration,
    what: &str,
    pred: impl Fn(&Snapshot) -> bool,
) -> Duration {
    within_since(Instant::now(), engine, limit, what, pred).await
}

/// Like `within`, counting from `started` (when the command was sent).
async fn within_since(
    started: Instant,
    engine: &EngineHandle,
    limit: Duration,
    what: &str,
    pred: impl Fn(&Snapshot) -> bool,
) -> Duration {
    let limit = limit.saturating_sub(started.elapsed());
    match engine.wait_for(limit, pred).await {
        Ok(_) => started.elapsed(),
        Err(snapshot) => panic!(
            "{what} not seen within {limit:?}; hosts: {:#?}",
            snapshot.hosts
        ),
    }
}

fn spec(name: &str) -> VmSpec {
    VmSpec {
        name: VmName::new(name).unwrap(),
        template: TemplateName::new("tiny").unwrap(),
        vcpus: Some(1),
        memory_mib: Some(128),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_inventory_lifecycle_and_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = AgentProcess::spawn(
        &dir.path().join("a"),
        "node-a",
        "lausanne",
        "test:///default",
    )
    .unwrap();
    let b =
        AgentProcess::spawn(&dir.path().join("b"), "node-b", "geneva", "test:///default").unwrap();
    let engine = start_engine(&dir.path().join("console")).await.unwrap();

    // Enrollment pins the fingerprint each agent printed.
    let added = enroll(&engine, &a).await.unwrap();
    assert_eq!(added.host_id, a.host_id);
    assert_eq!(added.fingerprint, a.fingerprint);
    enroll(&engine, &b).await.unwrap();
    within(&engine, Duration::from_secs(5), "both hosts online", |s| {
        s.hosts.len() == 2 && s.hosts.iter().all(|h| h.link == LinkState::Online)
    })
    .await;

    // Host status keeps coming (every second; the bound here is loose for a loaded machine).
    let uptime = |s: &Snapshot| {
        s.host(&a.host_id)
            .and_then(|h| h.status)
            .map(|st| st.uptime_secs)
    };
    let first = uptime(&engine.snapshot()).expect("status with the hello");
    within(
        &engine,
        Duration::from_secs(5),
        "a newer host status",
        |s| uptime(s).is_some_and(|u| u > first),
    )
    .await;

    // Inventory from the real machine and libvirt's node info.
    let snap = engine.snapshot();
    let host_a = snap.host(&a.host_id).unwrap();
    let inv = host_a.inventory().expect("inventory after hello");
    assert!(inv.cpus > 0 && inv.memory_mib > 0);
    assert!(inv.storage_total_mib > 0);
    assert_eq!(inv.site.name.as_str(), "lausanne");
    assert_eq!(inv.runtimes[0].kind, RuntimeKind::Libvirt);
    assert_eq!(inv.runtimes[0].driver, "TEST");
    assert_eq!(snap.host(&b.host_id).unwrap().site_name(), "geneva");

    // A token is good once: once enrolled, the agent does not even offer enrollment.
    let reused = enroll(&engine, &a).await.unwrap_err().to_string();
    assert!(reused.contains("offers no enrollment"), "{reused}");

    // Create, start, stop, delete: each state reaches the engine within a second.
    let host = a.host_id.clone();
    let sent = Instant::now();
    let created = engine
        .request(|reply| Command::CreateVm {
            host: host.clone(),
            spec: spec("web-1"),
            start: false,
            reply,
        })
        .await
        .unwrap();
    assert_eq!(created.state, VmState::Shutoff);
    assert_eq!(created.template.as_ref().map(|t| t.as_str()), Some("tiny"));
    // Its definition is kept as a record that names no path of this agent.
    let record =
        std::fs::read_to_string(a.data_dir.join("storage/definitions/web-1.toml")).unwrap();
    assert!(record.contains("file = \"web-1.img\""), "{record}");
    assert!(!record.contains(&*a.data_dir.to_string_lossy()), "{record}");
    assert!(
        record.contains(&format!("uuid = \"{}\"", created.uuid)),
        "{record}"
    );
    let t = within_since(sent, &engine, STATE_VISIBLE, "created VM", |s| {
        vm_state(s, &host, "web-1") == Some(VmState::Shutoff)
    })
    .await;
    eprintln!("create visible after {t:?}");
    let name = VmName::new("web-1").unwrap();
    let sent = Instant::now();
    engine
        .request(|reply| Command::StartVm {
            host: host.clone(),
            name: name.clone(),
            reply,
        })
        .await
        .unwrap();
    let t = within_since(sent, &engine, STATE_VISIBLE, "running", |s| {
        vm_state(s, &host, "web-1") == Some(VmState::Running)
    })
    .await;
    eprintln!("start visible after {t:?}");
    let sent = Instant::now();
    engine
        .request(|reply| Command::StopVm {
            host: host.clone(),
            name: name.clone(),
            force: false,
            reply,
        })
        .await
        .unwrap();
    let t = within_since(sent, &engine, STATE_VISIBLE, "shutoff", |s| {
        vm_state(s, &host, "web-1") == Some(VmState::Shutoff)
    })
    .await;
    eprintln!("stop visible after {t:?}");
    let sent = Instant::now();
    engine
        .request(|reply| Command::DeleteVm {
            host: host.clone(),
            name: name.clone(),
            reply,
        })
        .await
        .unwrap();
    within_since(sent, &engine, STATE_VISIBLE, "deleted", |s| {
        vm_state(s, &host, "web-1").is_none()
    })
    .await;
    assert!(
        !a.data_dir.join("storage/disks/web-1.img").exists(),
        "the disk is deleted with the VM"
    );
    assert!(
        !a.data_dir.join("storage/definitions/web-1.toml").exists(),
        "its definition record too, so a restart does not bring it back"
    );

    // Errors come back as readable sentences and change nothing.
    let err = engine
        .request(|reply| Command::CreateVm {
            host: host.clone(),
            spec: VmSpec {
                template: TemplateName::new("nope").unwrap(),
                ..spec("x")
            },
            start: false,
            reply,
        })
        .await
        .unwrap_err();
    assert_eq!(
        err,
        EngineError::Agent {
            code: dunes_shared::protocol::ErrorCode::NotFound,
            message: "template nope does not exist".into()
        }
    );
    let err = engine
        .request(|reply| Command::StartVm {
            host: host.clone(),
            name: VmName::new("ghost").unwrap(),
            reply,
        })
        .await
        .unwrap_err();
    assert_eq!(
        err,
        EngineError::Agent {
            code: dunes_shared::protocol::ErrorCode::NotFound,
            message: "VM ghost does not exist".into()
        }
    );
    let err = engine
        .request(|reply| Command::CreateVm {
            host: host.clone(),
            spec: VmSpec {
                vcpus: Some(0),
                ..spec("x")
            },
            start: false,
            reply,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::Invalid(_)), "{err}");
    let err = engine
        .request(|reply| Command::CreateVm {
            host: HostId::new("nowhere").unwrap(),
            spec: spec("x"),
            start: false,
            reply,
        })
        .await
        .unwrap_err();
    assert_eq!(
        err,
        EngineError::UnknownHost(HostId::new("nowhere").unwrap())
    );

    // Two creates of one name at once: one VM, one clear refusal, no stray disk.
    let create_twin = || {
        engine.request(|reply| Command::CreateVm {
            host: host.clone(),
            spec: spec("twin"),
            start: false,
            reply,
        })
    };
    let (first, second) = tokio::join!(create_twin(), create_twin());
    let refused = match (first, second) {
        (Ok(_), Err(e)) | (Err(e), Ok(_)) => e,
        other => panic!("expected one create to win: {other:?}"),
    };
    assert!(
        refused.to_string().contains("twin already exists"),
        "{refused}"
    );
    within(&engine, STATE_VISIBLE, "the twin", |s| {
        vm_state(s, &host, "twin") == Some(VmState::Shutoff)
    })
    .await;
    let disks: Vec<_> = std::fs::read_dir(a.data_dir.join("storage/disks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        disks,
        vec!["twin.img".to_string()],
        "one disk, no partial copy"
    );

    // A clone of the stopped twin: its own disk with the same bytes, a new UUID; the same
    // name again is refused before anything is copied.
    let clone = |new_name: &str| {
        let new_name = VmName::new(new_name).unwrap();
        engine.request(|reply| Command::CloneVm {
            host: host.clone(),
            name: VmName::new("twin").unwrap(),
            new_name,
            to: None,
            reply,
        })
    };
    let copy = clone("twin-copy").await.unwrap();
    assert_eq!(copy.status.state, VmState::Shutoff);
    let twin_uuid = engine
        .snapshot()
        .host(&host)
        .unwrap()
        .vm(&VmName::new("twin").unwrap())
        .unwrap()
        .uuid
        .clone();
    assert_ne!(copy.status.uuid, twin_uuid);
    let disk = |name: &str| std::fs::read(a.data_dir.join("storage/disks").join(name)).unwrap();
    assert!(
        disk("twin.img") == disk("twin-copy.img"),
        "the copy's bytes differ"
    );
    let again = clone("twin-copy").await.unwrap_err();
    assert!(
        again
            .to_string()
            .contains("already has a VM named twin-copy"),
        "{again}"
    );

    // Autostart: the twin starts whenever its agent does (checked after the restart below).
    let configured = engine
        .request(|reply| Command::ConfigureVm {
            host: host.clone(),
            name: VmName::new("twin").unwrap(),
            vcpus: None,
            memory_mib: None,
            autostart: Some(true),
            eject_cdrom: false,
            reply,
        })
        .await
        .unwrap();
    assert_eq!(configured.status.autostart, Some(true));
    assert!(!configured.at_next_start);

    // Kill an agent: unreachable within 5 s, its VMs still in view.
    engine
        .request(|reply| Command::CreateVm {
            host: host.clone(),
            spec: spec("keep"),
            start: true,
            reply,
        })
        .await
        .unwrap();
    within(&engine, STATE_VISIBLE, "keep running", |s| {
        vm_state(s, &host, "keep") == Some(VmState::Running)
    })
    .await;
    let names = |s: &Snapshot| -> Vec<String> {
        s.host(&host)
            .map(|h| h.vms.iter().map(|v| v.name.to_string()).collect())
            .unwrap_or_default()
    };
    let before = names(&engine.snapshot());
    assert!(before.contains(&"keep".to_string()) && before.contains(&"twin".to_string()));
    let killed = Instant::now();
    a.kill();
    let t = within_since(
        killed,
        &engine,
        Duration::from_secs(5),
        "unreachable",
        |s| {
            s.host(&host)
                .is_some_and(|h| h.link == LinkState::Unreachable)
        },
    )
    .await;
    eprintln!("unreachable after {t:?}");
    let snap = engine.snapshot();
    assert!(
        snap.host(&host)
            .unwrap()
            .vm(&VmName::new("keep").unwrap())
            .is_some(),
        "VMs stay in view"
    );
    assert_eq!(
        snap.host(&b.host_id).unwrap().link,
        LinkState::Online,
        "the other host is unaffected"
    );
    let err = engine
        .request(|reply| Command::StartVm {
            host: host.clone(),
            name: VmName::new("keep").unwrap(),
            reply,
        })
        .await
        .unwrap_err();
    assert_eq!(err, EngineError::Unreachable(host.clone()));

    // Restart it: online again, and the VM it created is still there.
    a.restart().unwrap();
    let t = within(&engine, Duration::from_secs(10), "online again", |s| {
        s.host(&host).is_some_and(|h| h.link == LinkState::Online)
    })
    .await;
    eprintln!("online again after {t:?}");
    assert_eq!(names(&engine.snapshot()), before, "no VM lost");
    // The agent started the twin, which asked for it, and left the others off.
    within(&engine, STATE_VISIBLE, "the twin autostarted", |s| {
        vm_state(s, &host, "twin") == Some(VmState::Running)
    })
    .await;
    assert_eq!(
        vm_state(&engine.snapshot(), &host, "twin-copy"),
        Some(VmState::Shutoff)
    );

    let events: Vec<String> = engine
        .snapshot()
        .events
        .iter()
        .map(|e| e.message.clone())
        .collect();
    assert!(
        events.iter().any(|m| m.starts_with("unreachable")),
        "{events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_restart_keeps_hosts_and_vms() {
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProcess::spawn(
        &dir.path().join("a"),
        "node-r",
        "lausanne",
        "test:///default",
    )
    .unwrap();
    let console_dir = dir.path().join("console");
    {
        let engine = start_engine(&console_dir).await.unwrap();
        enroll(&engine, &agent).await.unwrap();
        within(&engine, Duration::from_secs(5), "online", |s| {
            s.hosts
                .first()
                .is_some_and(|h| h.link == LinkState::Online && !h.vms.is_empty())
        })
        .await;
        drop(engine);
    }
    // The store is released once the old engine's tasks notice their handles are gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    let engine = loop {
        match start_engine(&console_dir).await {
            Ok(e) => break e,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for the store: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    // Known at once from the store, then online over mTLS without a new token.
    let snap = engine.snapshot();
    assert_eq!(snap.hosts.len(), 1);
    assert!(
        !snap.hosts[0].vms.is_empty(),
        "last known VMs come from the store"
    );
    within(
        &engine,
        Duration::from_secs(5),
        "online after console restart",
        |s| s.hosts[0].link == LinkState::Online,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_machine_with_the_same_host_id_needs_replace() {
    let dir = tempfile::tempdir().unwrap();
    let first =
        AgentProcess::spawn(&dir.path().join("a"), "twin", "lausanne", "test:///default").unwrap();
    // Another data dir, so another key, but the same host id: a cloned machine.
    let clone =
        AgentProcess::spawn(&dir.path().join("b"), "twin", "lausanne", "test:///default").unwrap();
    assert_ne!(first.fingerprint, clone.fingerprint);
    let engine = start_engine(&dir.path().join("console")).await.unwrap();
    enroll(&engine, &first).await.unwrap();
    let host = first.host_id.clone();
    within(&engine, Duration::from_secs(5), "online", |s| {
        s.host(&host).is_some_and(|h| h.link == LinkState::Online)
    })
    .await;

    let add = |replace: bool| {
        let engine = engine.clone();
        let (address, token) = (clone.address.clone(), clone.token.clone().unwrap());
        async move {
            engine
                .request(|reply| Command::AddHost {
                    address,
                    token,
                    expected_fingerprint: None,
                    replace,
                    reply,
                })
                .await
        }
    };
    let err = add(false).await.unwrap_err().to_string();
    assert!(
        err.contains("host twin is already enrolled with another key"),
        "{err}"
    );
    let snap = engine.snapshot();
    let still = snap.host(&host).unwrap();
    assert_eq!(
        still.record.fingerprint, first.fingerprint,
        "nothing changed"
    );
    assert_eq!(still.record.address, first.address);

    // The refusal came before the token was used: the operator can still replace on purpose.
    let added = add(true).await.unwrap();
    assert_eq!(added.fingerprint, clone.fingerprint);
    within(&engine, Duration::from_secs(5), "the clone online", |s| {
        s.host(&host).is_some_and(|h| {
            h.link == LinkState::Online && h.record.fingerprint == clone.fingerprint
        })
    })
    .await;
    assert_eq!(engine.snapshot().hosts.len(), 1);

    // An empty token is refused before anything goes on the network.
    let err = engine
        .request(|reply| Command::AddHost {
            address: clone.address.clone(),
            token: "  ".into(),
            expected_fingerprint: None,
            replace: false,
            reply,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::Invalid(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_claiming_one_id_at_once_cannot_both_enroll() {
    let dir = tempfile::tempdir().unwrap();
    let spawn = |sub: &str| {
        AgentProcess::spawn(&dir.path().join(sub), "race", "lausanne", "test:///default").unwrap()
    };
    let (x, y) = (spawn("x"), spawn("y"));
    let engine = start_engine(&dir.path().join("console")).await.unwrap();
    let (rx, ry) = tokio::join!(enroll(&engine, &x), enroll(&engine, &y));
    let (winner, loser, refused) = match (rx, ry) {
        (Ok(_), Err(e)) => (&x, &y, e),
        (Err(e), Ok(_)) => (&y, &x, e),
        other => panic!("expected exactly one enrollment to win: {other:?}"),
    };
    let refused = refused.to_string();
    assert!(
        refused.contains("another enrollment of host race is under way")
            || refused.contains("host race is already enrolled with another key"),
        "{refused}"
    );
    let snap = engine.snapshot();
    assert_eq!(snap.hosts.len(), 1);
    assert_eq!(snap.hosts[0].record.fingerprint, winner.fingerprint);
    // The loser's token was never used.
    let token = loser.token.clone().unwrap();
    let replaced = engine
        .request(|reply| Command::AddHost {
            address: loser.address.clone(),
            token,
            expected_fingerprint: Some(loser.fingerprint),
            replace: true,
            reply,
        })
        .await
        .unwrap();
    assert_eq!(replaced.fingerprint, loser.fingerprint);
}

fn signal(agent: &AgentProcess, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &agent.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// A host that goes away in the middle of a deploy (frozen, as a hung or cut-off machine
/// is): the step on it fails with its instance named, nothing is recorded for it, the other
/// host's instance stays, the service shows what it is, and once the host is back the next
/// deploy makes only what is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_vanishes_during_a_deploy_leaves_the_service_shown_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let a = AgentProcess::spawn(
        &dir.path().join("a"),
        "gone-a",
        "lausanne",
        "test:///default",
    )
    .unwrap();
    let b =
        AgentProcess::spawn(&dir.path().join("b"), "gone-b", "geneva", "test:///default").unwrap();
    let engine = start_engine(&dir.path().join("console")).await.unwrap();
    for agent in [&a, &b] {
        enroll(&engine, agent).await.unwrap();
        let host = agent.host_id.clone();
        within(&engine, Duration::from_secs(10), "online", |s| {
            s.host(&host).is_some_and(|h| h.link == LinkState::Online)
        })
        .await;
        // The test driver's own `test` VM takes more memory than the host declares.
        engine
            .request(|reply| Command::StopVm {
                host: agent.host_id.clone(),
                name: VmName::new("test").unwrap(),
                force: true,
                reply,
            })
            .await
            .unwrap();
    }
    let source = "name = \"front\"\n[[application]]\nname = \"web\"\nruntime = \"libvirt\"\ntemplate = \"tiny\"\nvcpus = 1\nmemory_mib = 64\ninstances = 2\n[rules]\ndistinct_hosts = [\"web\"]\n";
    let name = engine
        .request(|reply| Command::DefineService {
            source: source.into(),
            replace: false,
            reply,
        })
        .await
        .unwrap();
    let deploy = || {
        let (engine, name) = (engine.clone(), name.clone());
        async move {
            engine
                .request(|reply| Command::DeployService {
                    name,
                    fingerprint: None,
                    overrides: Vec::new(),
                    reply,
                })
                .await
                .unwrap()
        }
    };

    signal(&b, "-STOP");
    let report = deploy().await;
    assert_eq!(report.done.len(), 1, "{report:?}");
    assert_eq!(report.done[0].1, a.host_id);
    assert_eq!(report.failed.len(), 1, "{report:?}");
    let (failed, why) = &report.failed[0];
    assert!(failed.starts_with("web-"), "{failed}");
    assert!(!why.is_empty());
    assert!(
        why.contains("stays `creating` until the next deploy"),
        "{why}"
    );
    let snap = engine.snapshot();
    let view = &snap.services[0];
    // The journal shows both: one made, one whose outcome the vanished host holds.
    let state_on = |host: &HostId| {
        view.instances
            .iter()
            .find(|i| &i.record.host == host)
            .map(|i| i.record.state.as_str())
    };
    assert_eq!(state_on(&a.host_id), Some("created"));
    assert_eq!(state_on(&b.host_id), Some("creating"));
    assert_eq!(view.status.as_str(), "down", "deployed, not started");
    let started = engine
        .request(|reply| Command::StartService {
            name: name.clone(),
            reply,
        })
        .await
        .unwrap();
    assert!(started.failed.is_empty(), "{started:?}");
    within(&engine, Duration::from_secs(10), "degraded", |s| {
        s.services[0].status.as_str() == "degraded"
    })
    .await;

    // Back: the next deploy makes only the missing instance.
    signal(&b, "-CONT");
    let host = b.host_id.clone();
    within(
        &engine,
        Duration::from_secs(30),
        "the host back online",
        |s| s.host(&host).is_some_and(|h| h.link == LinkState::Online),
    )
    .await;
    let again = deploy().await;
    assert!(again.failed.is_empty(), "{again:?}");
    assert_eq!(again.done.len(), 1, "{again:?}");
    assert_eq!(again.done[0].1, b.host_id);
    engine
        .request(|reply| Command::StartService {
            name: name.clone(),
            reply,
        })
        .await
        .unwrap();
    within(&engine, Duration::from_secs(10), "available", |s| {
        s.services[0].status.as_str() == "available"
    })
    .await;
}
