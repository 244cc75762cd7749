//! Drains and service moves under the services' rules.

use super::*;

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
        (crate::engine::statistics::cost::CostBy::Service, "duo"),
        (crate::engine::statistics::cost::CostBy::Site, "lsn"),
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
