//! The window on the demo fleet, as a new operator meets it: a VM dragged to the remote site
//! with its transfer on screen, Migrate to… by keyboard, a VM its agent cannot move refused
//! before anything stops, the charts of 30 days on one time axis, a small window, and an
//! image dropped onto the window imported into the library.

mod gui_support;

use dunes_console::{
    engine::EngineHandle,
    ui::{ConsoleApp, TimeRange, plot_id},
};
use dunes_shared::model::VmState;
use dunes_tests::{AgentProcess, enroll_online};
use egui::Role;
use egui_kittest::{
    Harness,
    kittest::{NodeT as _, Queryable as _},
};
use gui_support::{demo_engine, drag_to, step_for_until, step_until, window, window_sized};

fn host_of(engine: &EngineHandle, vm: &str) -> Option<(String, VmState)> {
    engine
        .snapshot()
        .find_vm(vm)
        .ok()
        .map(|(h, v)| (h.to_string(), v.state))
}

/// A demo VM dragged onto the remote site's host: the card's verdict, the confirmation, the
/// transfer's progress, rate and time left in the Migrations list, then the VM running on
/// the target and the status bar saying how it ended.
#[test]
fn a_demo_vm_dragged_to_the_remote_site_shows_its_transfer_then_runs_there() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, engine, fleet) = demo_engine(dir.path());
    let _enter = runtime.enter();
    let mut harness = window(&engine);
    step_until(&mut harness, "the demo's chips and the remote host", |h| {
        h.query_by_role_and_label(Role::Button, "intranet")
            .is_some()
            && h.query_by_role_and_label(Role::Button, "gva-1").is_some()
    });
    let from = harness
        .get_by_role_and_label(Role::Button, "intranet")
        .rect()
        .center();
    let to = harness
        .get_by_role_and_label(Role::Button, "gva-1")
        .rect()
        .center();
    drag_to(&mut harness, from, to);
    harness.drop_at(to);
    step_until(&mut harness, "the estimate", |h| {
        h.query_by_label("Migrate intranet to gva-1?").is_some()
    });
    // The demo VM has a real disk to stream: 192 MiB of data, said in the estimate.
    let allocated = engine.snapshot().find_vm("intranet").unwrap().1.disk_bytes;
    assert!(allocated >= 192 << 20, "allocated {allocated}");
    assert!(
        harness
            .query_by_label_contains(&format!(
                "its disk ({:.1} MiB allocated)",
                allocated as f64 / 1048576.0
            ))
            .is_some()
    );
    harness.get_by_label("Migrate").click();
    step_until(&mut harness, "the status bar's start", |h| {
        h.query_by_label_contains("of intranet to gva-1 started")
            .is_some()
    });
    // Capped at 200 Mbit/s, 192 MiB take seconds: the progress shows with its rate and
    // what is left.
    step_for_until(&mut harness, 60, "the transfer's progress", |h| {
        h.query_by_label_contains("MiB/s · ").is_some()
            && h.query_by_label_contains(" s left").is_some()
    });
    step_for_until(&mut harness, 120, "the VM running on gva-1", |h| {
        host_of(&engine, "intranet") == Some(("gva-1".into(), VmState::Running))
            && h.query_by_label_contains("of intranet: done, it runs on gva-1")
                .is_some()
    });
    assert!(
        harness.query_by_label("done").is_some(),
        "the Migrations list"
    );
    drop(harness);
    runtime.block_on(fleet.stop());
}

/// Migrate to… without a mouse: the button from the VM's details, the first host that fits
/// already focused, Tab to the next, Enter to choose and Enter to confirm. A VM defined
/// outside Dunes (no disk in its agent's storage) is refused there with the reason, before
/// anything stops.
#[test]
fn migrate_to_by_keyboard_and_a_vm_without_a_disk_refused_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, engine, fleet) = demo_engine(dir.path());
    // A host whose `test` VM was defined outside Dunes (libvirt's default test domain).
    let outside = AgentProcess::spawn(
        &dir.path().join("outside"),
        "outside",
        "lausanne",
        "test:///default",
    )
    .unwrap();
    runtime.block_on(async { enroll_online(&engine, &outside).await.unwrap() });
    let _enter = runtime.enter();
    let mut harness = window(&engine);
    step_until(&mut harness, "wiki's chip", |h| {
        h.query_by_role_and_label(Role::Button, "wiki").is_some()
    });
    harness.get_by_role_and_label(Role::Button, "wiki").click();
    step_until(&mut harness, "wiki's details", |h| {
        h.query_by_label("VM wiki").is_some()
    });
    assert!(
        harness
            .query_by_label_contains("wiki.img (raw)\n4.00 GiB virtual, 192 MiB allocated")
            .is_some(),
        "the details show the disk"
    );
    harness
        .get_by_role_and_label(Role::Button, "Migrate to…")
        .focus();
    harness.step();
    harness.key_press(egui::Key::Enter);
    step_until(&mut harness, "the hosts with their verdicts", |h| {
        h.query_by_label("Migrate wiki to…").is_some()
    });
    // The remote site comes first and fits; Tab goes on to lsn-1. (Each host's card is a
    // button of its name too, behind the dialog.)
    let focused = |h: &Harness<'_, ConsoleApp>, host: &str| {
        h.query_all_by_role_and_label(Role::Button, host)
            .any(|n| n.is_focused())
    };
    assert!(focused(&harness, "gva-1"));
    harness.key_press(egui::Key::Tab);
    harness.step();
    assert!(focused(&harness, "lsn-1"));
    harness.key_press(egui::Key::Enter);
    step_until(&mut harness, "the confirmation", |h| {
        h.query_by_label("Migrate wiki to lsn-1?").is_some()
    });
    harness.key_press(egui::Key::Enter);
    step_for_until(&mut harness, 60, "wiki running on lsn-1", |h| {
        host_of(&engine, "wiki") == Some(("lsn-1".into(), VmState::Running))
            && h.query_by_label_contains("of wiki: done, it runs on lsn-1")
                .is_some()
    });

    // `test` has no disk its agent could stream: every host says why, and nothing moves.
    harness
        .get_by_role_and_label(Role::Button, "test")
        .click_secondary();
    step_until(&mut harness, "the context menu", |h| {
        h.query_by_label("VM test on outside").is_some()
    });
    harness
        .get_by_role_and_label(Role::Button, "Migrate to…")
        .click();
    step_until(&mut harness, "the refusals", |h| {
        h.query_by_label("Migrate test to…").is_some()
    });
    let reason = "test has no disk in outside's storage (it was defined outside Dunes)";
    assert_eq!(
        harness.query_all_by_label_contains(reason).count(),
        3,
        "each of the three other hosts names the reason"
    );
    for host in ["gva-1", "lsn-1", "lsn-2"] {
        assert!(
            harness
                .query_all_by_role_and_label(Role::Button, host)
                .any(|n| n.accesskit_node().is_disabled()),
            "{host} cannot be chosen"
        );
    }
    harness.key_press(egui::Key::Escape);
    step_until(&mut harness, "the dialog closed", |h| {
        h.query_by_label("Migrate test to…").is_none()
    });
    assert_eq!(
        host_of(&engine, "test"),
        Some(("outside".into(), VmState::Running)),
        "nothing stopped"
    );
    assert!(
        engine
            .snapshot()
            .migrations
            .iter()
            .all(|m| m.vm.as_str() != "test")
    );
    drop(harness);
    runtime.block_on(fleet.stop());
}

/// Every chart of a window spans the range chosen, on one time axis: 30 days of the demo's
/// generated history, said to be generated.
#[test]
fn the_charts_of_a_window_share_the_range_and_say_what_was_generated() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, engine, fleet) = demo_engine(dir.path());
    let _enter = runtime.enter();
    let mut harness = window(&engine);
    step_until(&mut harness, "lsn-1", |h| {
        h.query_by_role_and_label(Role::Button, "lsn-1").is_some()
    });
    harness.get_by_role_and_label(Role::Button, "lsn-1").click();
    step_until(&mut harness, "the host's details", |h| {
        h.query_by_label("Host lsn-1").is_some()
    });
    harness
        .get_by_role_and_label(Role::Button, "Statistics…")
        .click();
    step_until(&mut harness, "the charts", |h| {
        h.query_by_label("Statistics of host lsn-1").is_some()
    });
    harness.get_by_label("30 days").click();
    step_for_until(&mut harness, 60, "a month of hours", |h| {
        h.query_by_label_contains("Every 3600 s").is_some()
            && h.query_by_label_contains("demo history (generated) until")
                .is_some()
    });
    assert_eq!(harness.state().charts_range(), TimeRange::Month);
    let ctx = harness.ctx.clone();
    let bounds = |title: &str| {
        let memory = egui_plot::PlotMemory::load(&ctx, plot_id(title))
            .unwrap_or_else(|| panic!("no plot {title}"));
        let b = memory.bounds();
        (b.min()[0], b.max()[0])
    };
    let cpu = bounds("CPU use");
    // The range is 30 days, whatever the series hold.
    assert!(
        (cpu.1 - cpu.0 - 30.0 * 86_400.0).abs() < 2.0 * 86_400.0,
        "CPU spans {cpu:?}"
    );
    for title in [
        "Memory in use",
        "Disk I/O",
        "Network traffic",
        "Cost per hour",
    ] {
        let other = bounds(title);
        assert!(
            (other.0 - cpu.0).abs() < 1.0 && (other.1 - cpu.1).abs() < 1.0,
            "{title} spans {other:?}, CPU {cpu:?}"
        );
    }
    drop(harness);
    runtime.block_on(fleet.stop());
}

/// At 800×500 the side panels fold to strips, a whole host card stays on screen, and a panel
/// opens over the topology as a drawer.
#[test]
fn at_800_by_500_the_topology_keeps_a_whole_host_card() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, engine, fleet) = demo_engine(dir.path());
    let _enter = runtime.enter();
    let mut harness: Harness<'_, ConsoleApp> = window_sized(&engine, [800.0, 500.0]);
    step_until(&mut harness, "the hosts", |h| {
        h.query_by_role_and_label(Role::Button, "lsn-1").is_some()
    });
    let screen = egui::Rect::from_min_size(egui::Pos2::ZERO, egui::vec2(800.0, 500.0));
    let strip = harness
        .get_by_role_and_label(Role::Button, "Services")
        .rect();
    let details = harness
        .get_by_role_and_label(Role::Button, "Details")
        .rect();
    assert!(strip.width() < 40.0 && details.width() < 40.0, "strips");
    let card = harness.get_by_role_and_label(Role::Button, "lsn-1").rect();
    assert!(
        card.left() >= strip.right() && card.right() <= details.left(),
        "the card {card:?} lies between the strips"
    );
    assert!(
        screen.contains_rect(card) && card.height() > 100.0,
        "the whole card {card:?} is on screen"
    );
    // Its chips are whole too.
    for vm in ["build-runner", "crm-db", "intranet"] {
        let chip = harness.get_by_role_and_label(Role::Button, vm).rect();
        assert!(card.contains_rect(chip), "{vm} {chip:?} in {card:?}");
    }
    // Selecting a VM opens its details over the topology.
    harness
        .get_by_role_and_label(Role::Button, "crm-db")
        .click();
    step_until(&mut harness, "the details drawer", |h| {
        h.query_by_label("VM crm-db").is_some()
    });
    harness.key_press(egui::Key::Escape);
    step_until(&mut harness, "the drawer closed", |h| {
        h.query_by_label("VM crm-db").is_none()
    });
    drop(harness);
    runtime.block_on(fleet.stop());
}

/// A stop that takes a service's instance down is asked first, saying so; Cancel leaves it
/// running, Stop stops it. A reboot is asked first too; pause, resume and the stop of a VM of
/// no service act at once.
#[test]
fn stopping_a_service_instance_is_confirmed_with_what_it_does() {
    use dunes_console::engine::Command;
    let dir = tempfile::tempdir().unwrap();
    let (runtime, engine, fleet) = demo_engine(dir.path());
    let source = "name = \"desk\"\n[[application]]\nname = \"web\"\nruntime = \"libvirt\"\ntemplate = \"tiny\"\nvcpus = 1\nmemory_mib = 256\ninstances = 1\n[rules]\npin = [{ application = \"web\", hosts = [\"lsn-2\"] }]\n";
    runtime.block_on(async {
        let name = engine
            .request(|reply| Command::DefineService {
                source: source.to_string(),
                replace: false,
                reply,
            })
            .await
            .unwrap();
        engine
            .request(|reply| Command::DeployService {
                name: name.clone(),
                fingerprint: None,
                overrides: Vec::new(),
                reply,
            })
            .await
            .unwrap();
        engine
            .request(|reply| Command::StartService { name, reply })
            .await
            .unwrap();
    });
    let _enter = runtime.enter();
    let mut harness = window(&engine);
    step_until(&mut harness, "the instance's chip", |h| {
        h.query_by_role_and_label(Role::Button, "desk-web-0")
            .is_some()
    });
    let stop_from_menu = |harness: &mut Harness<'_, ConsoleApp>, vm: &str| {
        harness
            .get_by_role_and_label(Role::Button, vm)
            .click_secondary();
        step_until(harness, "the context menu", |h| {
            h.query_by_label(&format!("VM {vm} on lsn-2")).is_some()
        });
        // The menu's Stop, not the Stop of the services panel on the left.
        harness
            .query_all_by_role_and_label(Role::Button, "Stop")
            .max_by(|a, b| a.rect().left().total_cmp(&b.rect().left()))
            .unwrap()
            .click();
    };
    stop_from_menu(&mut harness, "desk-web-0");
    step_until(&mut harness, "the confirmation", |h| {
        h.query_by_label("Stop desk-web-0?").is_some()
    });
    assert!(
        harness
            .query_by_label_contains("is an instance of service desk")
            .is_some()
    );
    harness.get_by_label("Cancel").click();
    step_until(&mut harness, "the confirmation gone", |h| {
        h.query_by_label("Stop desk-web-0?").is_none()
    });
    assert_eq!(
        host_of(&engine, "desk-web-0"),
        Some(("lsn-2".into(), VmState::Running)),
        "Cancel leaves it running"
    );
    stop_from_menu(&mut harness, "desk-web-0");
    step_until(&mut harness, "the confirmation", |h| {
        h.query_by_label("Stop desk-web-0?").is_some()
    });
    harness
        .get_by_role_and_label(Role::Button, "Stop the instance")
        .click();
    step_for_until(&mut harness, 60, "the instance stopped", |_| {
        host_of(&engine, "desk-web-0") == Some(("lsn-2".into(), VmState::Shutoff))
    });
    // Reboot is asked first; Pause and Resume act at once.
    let menu = |harness: &mut Harness<'_, ConsoleApp>, vm: &str, item: &str| {
        harness
            .get_by_role_and_label(Role::Button, vm)
            .click_secondary();
        step_until(harness, "the context menu", |h| {
            h.query_by_label(&format!("VM {vm} on lsn-2")).is_some()
        });
        harness.get_by_role_and_label(Role::Button, item).click();
    };
    menu(&mut harness, "wiki", "Reboot…");
    step_until(&mut harness, "the reboot's confirmation", |h| {
        h.query_by_label("Reboot wiki?").is_some()
    });
    assert!(
        harness
            .query_by_label_contains("work it has not saved is lost")
            .is_some()
    );
    harness
        .get_by_role_and_label(Role::Button, "Reboot")
        .click();
    step_until(&mut harness, "the reboot done", |h| {
        h.query_by_label("Rebooting wiki: done").is_some()
    });
    menu(&mut harness, "wiki", "Pause");
    step_for_until(&mut harness, 30, "wiki paused", |_| {
        host_of(&engine, "wiki") == Some(("lsn-2".into(), VmState::Paused))
    });
    menu(&mut harness, "wiki", "Resume");
    step_for_until(&mut harness, 30, "wiki running again", |_| {
        host_of(&engine, "wiki") == Some(("lsn-2".into(), VmState::Running))
    });
    // wiki belongs to no service: Stop acts at once.
    stop_from_menu(&mut harness, "wiki");
    step_for_until(&mut harness, 60, "wiki stopped", |_| {
        host_of(&engine, "wiki") == Some(("lsn-2".into(), VmState::Shutoff))
    });
    assert!(harness.query_by_label("Stop wiki?").is_none());
    // What the window did went through the engine's API: it is in the audit log, as the
    // local operator's, in a chain that checks.
    harness
        .get_by_role_and_label(Role::Button, "Audit…")
        .click();
    step_for_until(
        &mut harness,
        30,
        "the window's changes in the audit log",
        |h| {
            h.query_all_by_label("vm-stop").count() >= 2
                && h.query_all_by_label("vm-power").count() >= 3
        },
    );
    harness
        .get_by_role_and_label(Role::Button, "Verify chain")
        .click();
    step_until(&mut harness, "the chain checked", |h| {
        h.query_by_label_contains("records is intact").is_some()
    });
    drop(harness);
    runtime.block_on(fleet.stop());
}

/// A VM on a qcow2 disk, from its details: a snapshot taken by name and listed with its
/// time, a revert and a delete each confirmed with what they do; a name taken is refused
/// before anything is asked. A raw-disk VM says why it has none.
#[test]
fn snapshots_are_taken_reverted_and_deleted_from_a_vms_details() {
    use dunes_console::engine::Command;
    use dunes_shared::model::{TemplateName, VmName, VmSpec};
    let dir = tempfile::tempdir().unwrap();
    let (runtime, engine, _fleet) = demo_engine(dir.path());
    // An overlay template on lsn-2: its VMs get qcow2 disks.
    let template = dir
        .path()
        .join("console/demo-agents/lsn-2/storage/images/cow");
    std::fs::create_dir_all(&template).unwrap();
    std::fs::write(
        template.join("template.toml"),
        "description = \"copy on write\"\ndefault_vcpus = 1\ndefault_memory_mib = 256\nplaceholder = true\noverlay = true\n",
    )
    .unwrap();
    std::fs::File::create(template.join("disk.img"))
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    runtime.block_on(async {
        engine
            .request(|reply| Command::CreateVm {
                host: dunes_shared::model::HostId::new("lsn-2").unwrap(),
                spec: VmSpec {
                    name: VmName::new("notes").unwrap(),
                    template: TemplateName::new("cow").unwrap(),
                    vcpus: None,
                    memory_mib: None,
                },
                start: true,
                reply,
            })
            .await
            .unwrap();
    });
    let _enter = runtime.enter();
    let mut harness = window(&engine);
    step_until(&mut harness, "the wiki chip", |h| {
        h.query_by_role_and_label(Role::Button, "wiki").is_some()
    });
    harness.get_by_role_and_label(Role::Button, "wiki").click();
    step_until(&mut harness, "why wiki has no snapshots", |h| {
        h.query_by_label_contains("wiki cannot have snapshots: its disk is raw")
            .is_some()
    });
    harness.get_by_role_and_label(Role::Button, "notes").click();
    step_until(&mut harness, "notes without snapshots", |h| {
        h.query_by_label("None yet.").is_some()
    });
    let take = |harness: &mut Harness<'_, ConsoleApp>, name: &str| {
        harness
            .get_by_role_and_label(Role::TextInput, "New snapshot")
            .focus();
        harness.step();
        harness
            .get_by_role_and_label(Role::TextInput, "New snapshot")
            .type_text(name);
        harness.step();
        harness.step();
    };
    take(&mut harness, "before-upgrade");
    harness
        .get_by_role_and_label(Role::Button, "Take snapshot")
        .click();
    step_until(&mut harness, "the snapshot listed", |h| {
        h.query_by_label("before-upgrade (current)").is_some()
    });
    assert!(
        harness.query_by_label_contains("UTC, running").is_some(),
        "the snapshot's time and state"
    );
    // The same name again: the button is off, nothing is asked.
    take(&mut harness, "before-upgrade");
    assert!(
        harness
            .get_by_role_and_label(Role::Button, "Take snapshot")
            .accesskit_node()
            .is_disabled()
    );
    harness
        .get_by_role_and_label(Role::Button, "Revert…")
        .click();
    step_until(&mut harness, "the revert's confirmation", |h| {
        h.query_by_label("Revert notes to before-upgrade?")
            .is_some()
    });
    assert!(
        harness
            .query_by_label_contains("everything it wrote and did since is lost")
            .is_some()
    );
    harness
        .get_by_role_and_label(Role::Button, "Revert")
        .click();
    step_until(&mut harness, "the revert done", |h| {
        h.query_by_label_contains("Reverting notes to snapshot before-upgrade: done")
            .is_some()
    });
    // The Delete… of the snapshot row (the VM's own Delete… is disabled: it runs).
    harness
        .query_all_by_role_and_label(Role::Button, "Delete…")
        .find(|b| !b.accesskit_node().is_disabled())
        .unwrap()
        .click();
    step_until(&mut harness, "the delete's confirmation", |h| {
        h.query_by_label("Delete snapshot before-upgrade?")
            .is_some()
    });
    harness
        .get_by_role_and_label(Role::Button, "Delete")
        .click();
    step_until(&mut harness, "no snapshot left", |h| {
        h.query_by_label("None yet.").is_some()
    });
    step_for_until(
        &mut harness,
        30,
        "the VM's status without snapshots",
        |_| engine.snapshot().find_vm("notes").unwrap().1.snapshots == Some(0),
    );
}

/// A file as the desktop hands a drop to the window.
#[derive(Debug)]
struct Dropped(std::path::PathBuf);

impl egui::DroppedFile for Dropped {
    fn path(&self) -> &std::path::Path {
        &self.0
    }

    fn bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(&self.0).map_err(|e| e.to_string())
    }
}

#[test]
fn an_image_dropped_onto_the_window_is_imported_and_deleted_from_the_library() {
    use std::io::{Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().unwrap();
    let (runtime, engine, _fleet) = demo_engine(dir.path());
    // A raw disk: a partition table's signature in 8 MiB.
    let disk = dir.path().join("Build_Server.raw");
    {
        let mut f = std::fs::File::create(&disk).unwrap();
        f.set_len(8 << 20).unwrap();
        f.seek(SeekFrom::Start(510)).unwrap();
        f.write_all(&[0x55, 0xaa]).unwrap();
    }
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, "not a disk\n").unwrap();
    let _enter = runtime.enter();
    let mut harness = window(&engine);
    step_until(&mut harness, "the toolbar", |h| {
        h.query_by_role_and_label(Role::Button, "Images…").is_some()
    });
    harness
        .input_mut()
        .dropped_files
        .push(std::sync::Arc::new(Dropped(disk.clone())));
    step_until(&mut harness, "the Images view with the drop ready", |h| {
        h.query_by_label("No image yet: import a disk or an installer above.")
            .is_some()
    });
    // The name comes from the file's.
    let name = harness
        .get_by_role_and_label(Role::TextInput, "Name")
        .accesskit_node()
        .value()
        .unwrap_or_default();
    assert_eq!(name, "build-server");
    harness
        .get_by_role_and_label(Role::Button, "Import")
        .click();
    step_until(&mut harness, "the image imported", |h| {
        h.query_by_label_contains("Image build-server imported: raw, 8.00 MiB")
            .is_some()
    });
    step_until(&mut harness, "the image listed", |h| {
        h.query_by_label("build-server").is_some()
    });
    assert_eq!(
        runtime
            .block_on(engine.request(|reply| dunes_console::engine::Command::ListImages { reply }))
            .unwrap()
            .len(),
        1
    );
    // What is no image: the engine's one line, nothing listed.
    harness
        .get_by_role_and_label(Role::TextInput, "File")
        .focus();
    harness.step();
    harness
        .get_by_role_and_label(Role::TextInput, "File")
        .type_text(&notes.display().to_string());
    harness.step();
    harness.step();
    harness
        .get_by_role_and_label(Role::Button, "Import")
        .click();
    step_until(&mut harness, "the refusal", |h| {
        h.query_by_label_contains("Importing notes failed: not a disk image")
            .is_some()
    });
    // Delete, confirmed.
    harness
        .get_by_role_and_label(Role::Button, "Delete…")
        .click();
    step_until(&mut harness, "the confirmation", |h| {
        h.query_by_role_and_label(Role::Button, "Delete").is_some()
    });
    harness
        .get_by_role_and_label(Role::Button, "Delete")
        .click();
    step_until(&mut harness, "the image deleted", |h| {
        h.query_by_label("Image build-server deleted").is_some()
    });
    step_until(&mut harness, "the empty library", |h| {
        h.query_by_label("No image yet: import a disk or an installer above.")
            .is_some()
    });
}

#[test]
fn the_new_vm_dialog_makes_a_vm_from_an_image() {
    use std::io::{Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().unwrap();
    let (runtime, engine, _fleet) = demo_engine(dir.path());
    let disk = dir.path().join("os.raw");
    {
        let mut f = std::fs::File::create(&disk).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(510)).unwrap();
        f.write_all(&[0x55, 0xaa]).unwrap();
    }
    runtime
        .block_on(
            engine.request(|reply| dunes_console::engine::Command::ImportImage {
                name: dunes_shared::model::ImageName::new("os").unwrap(),
                path: disk.clone(),
                reply,
            }),
        )
        .unwrap();
    let _enter = runtime.enter();
    let mut harness = window(&engine);
    step_until(&mut harness, "the host", |h| {
        h.query_by_role_and_label(Role::Button, "lsn-2").is_some()
    });
    harness.get_by_role_and_label(Role::Button, "lsn-2").click();
    harness.step();
    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::N);
    step_until(&mut harness, "the New VM dialog", |h| {
        h.query_by_role_and_label(Role::TextInput, "Name")
            .is_some_and(|n| n.is_focused())
    });
    harness
        .get_by_role_and_label(Role::TextInput, "Name")
        .type_text("from-image");
    harness.step();
    harness
        .get_by_role_and_label(Role::RadioButton, "Image")
        .click();
    step_until(&mut harness, "the image picker", |h| {
        h.query_by_role_and_label(Role::ComboBox, "Image")
            .is_some_and(|c| c.accesskit_node().value().as_deref() == Some("choose…"))
    });
    // Nothing chosen yet: Create waits, and says why.
    assert!(harness.query_by_label_contains("choose an image").is_some());
    harness
        .get_by_role_and_label(Role::ComboBox, "Image")
        .click();
    step_until(&mut harness, "the library's images", |h| {
        h.query_by_label("os (raw, 64.0 MiB)").is_some()
    });
    harness.get_by_label("os (raw, 64.0 MiB)").click();
    step_until(&mut harness, "the image chosen", |h| {
        h.query_by_label_contains("choose an image").is_none()
    });
    harness.get_by_label("Create").click();
    step_until(&mut harness, "the VM made from the image", |_| {
        engine.snapshot().find_vm("from-image").is_ok()
    });
    let snap = engine.snapshot();
    let (host, vm) = snap.find_vm("from-image").unwrap();
    assert_eq!(host.as_str(), "lsn-2");
    assert_eq!(vm.template.as_ref().map(|t| t.as_str()), Some("os"));
    let disk = &vm.disks.as_ref().unwrap()[0];
    assert_eq!(disk.backing.as_ref().map(|b| b.as_str()), Some("os"));
}

/// An image on its way to a host: a bar in the toolbar (the slowest push) that opens the
/// Images view, where each push has its bar with the bytes through; both go once it is there.
#[test]
fn an_image_on_its_way_to_a_host_shows_its_progress_until_it_is_there() {
    use std::io::{Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().unwrap();
    let (runtime, engine, _fleet) = demo_engine(dir.path());
    // 24 MiB of data: 24 chunks, one each 100 ms (the test build slows an image of this
    // name down, so that its push is seen under way).
    let disk = dir.path().join("os.raw");
    {
        let mut f = std::fs::File::create(&disk).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all(&vec![7u8; 24 << 20]).unwrap();
        f.seek(SeekFrom::Start(510)).unwrap();
        f.write_all(&[0x55, 0xaa]).unwrap();
    }
    let name = dunes_shared::model::ImageName::new("failpoint-slow-os").unwrap();
    runtime
        .block_on(
            engine.request(|reply| dunes_console::engine::Command::ImportImage {
                name: name.clone(),
                path: disk.clone(),
                reply,
            }),
        )
        .unwrap();
    let _enter = runtime.enter();
    let mut harness = window(&engine);
    step_until(&mut harness, "the host", |h| {
        h.query_by_role_and_label(Role::Button, "lsn-2").is_some()
    });
    let pushing = {
        let engine = engine.clone();
        runtime.spawn(async move {
            engine
                .request(|reply| dunes_console::engine::Command::PushImage {
                    name,
                    hosts: vec![dunes_shared::model::HostId::new("lsn-2").unwrap()],
                    reply,
                })
                .await
        })
    };
    step_until(&mut harness, "the push in the toolbar", |h| {
        h.query_by_label_contains("sending 1 image").is_some()
    });
    harness.get_by_label_contains("sending 1 image").click();
    step_until(&mut harness, "the push in the Images view", |h| {
        h.query_by_label_contains("failpoint-slow-os -> lsn-2: ")
            .is_some()
    });
    let bar = harness
        .get_by_label_contains("failpoint-slow-os -> lsn-2: ")
        .accesskit_node()
        .label()
        .unwrap_or_default();
    assert!(bar.ends_with(" of 24.0 MiB"), "{bar}");
    step_for_until(&mut harness, 60, "the push ended", |h| {
        h.query_by_label_contains("sending 1 image").is_none()
            && h.query_by_label_contains("failpoint-slow-os -> lsn-2: ")
                .is_none()
    });
    let reports = runtime.block_on(pushing).unwrap().unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].pushed.sent_bytes, 24 << 20);
}

#[test]
fn a_console_the_host_cannot_open_says_why_in_its_window() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, engine, _fleet) = demo_engine(dir.path());
    let _enter = runtime.enter();
    let mut harness = window(&engine);
    step_until(&mut harness, "the wiki VM", |h| {
        h.query_by_role_and_label(Role::Button, "wiki").is_some()
    });
    harness.get_by_role_and_label(Role::Button, "wiki").click();
    step_until(&mut harness, "its details", |h| {
        h.query_by_role_and_label(Role::Button, "Console…")
            .is_some()
    });
    // A stopped VM has none to open.
    step_until(&mut harness, "build-runner", |h| {
        h.query_by_role_and_label(Role::Button, "build-runner")
            .is_some()
    });
    harness.get_by_role_and_label(Role::Button, "wiki").click();
    harness.step();
    harness
        .get_by_role_and_label(Role::Button, "Console…")
        .click();
    // libvirt's test driver has no serial consoles: the window says so, in the agent's words.
    step_until(&mut harness, "the agent's refusal", |h| {
        h.query_by_label_contains("opening the console failed")
            .is_some()
    });
    assert!(harness.state().console_screen().is_none());
    harness
        .get_by_role_and_label(Role::Button, "build-runner")
        .click();
    step_until(&mut harness, "a stopped VM's details", |h| {
        h.query_by_role_and_label(Role::Button, "Console…")
            .is_some_and(|b| b.accesskit_node().is_disabled())
    });
}
