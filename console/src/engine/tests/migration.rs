//! Cold migrations: a VM with its disk, refusals before anything stops, rollbacks, and
//! overlays moved as they are or flattened.

use super::*;

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
