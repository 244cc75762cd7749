//! Links to agents: calls applied before their replies, errors, a lost agent, certificates
//! renewed over the live link or expired offline.

use super::*;

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
    assert_eq!(
        err,
        EngineError::Agent {
            code: dunes_shared::protocol::ErrorCode::NotFound,
            message: "VM nowhere does not exist".into()
        }
    );
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
