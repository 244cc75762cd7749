//! The real egui app, driven by egui_kittest against a real engine and live agents.

mod gui_support;

use std::time::Duration;

use dunes_console::{
    engine::{Command, EngineHandle, LinkState},
    ui::{ConsoleApp, Selection},
};
use dunes_shared::model::{TemplateName, VmName, VmSpec, VmState};
use dunes_tests::{AgentProcess, enroll_online, start_engine};
use egui::Role;
use egui_kittest::{
    Harness,
    kittest::{NodeT as _, Queryable as _},
};
use gui_support::{drag_to, step_for_until, step_until, window};

fn vm_state(engine: &EngineHandle, vm: &str) -> Option<VmState> {
    let snap = engine.snapshot();
    snap.find_vm(vm).ok().map(|(_, v)| v.state)
}

/// A runtime, an agent on the test driver and an engine that has enrolled it and sees it online.
fn live_host(
    dir: &std::path::Path,
    host_id: &str,
    site: &str,
) -> (tokio::runtime::Runtime, AgentProcess, EngineHandle) {
    live_host_on(dir, host_id, site, "test:///default")
}

/// Like [`live_host`], with the agent on libvirt at `uri`.
fn live_host_on(
    dir: &std::path::Path,
    host_id: &str,
    site: &str,
    uri: &str,
) -> (tokio::runtime::Runtime, AgentProcess, EngineHandle) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let agent = AgentProcess::spawn(&dir.join(host_id), host_id, site, uri).unwrap();
    let engine = runtime.block_on(async {
        let engine = start_engine(&dir.join("console")).await.unwrap();
        enroll_online(&engine, &agent).await.unwrap();
        engine
    });
    (runtime, agent, engine)
}

/// Like [`live_host`], on a test-driver host of 16 CPUs and 64 GiB with no VM of its own.
fn roomy_host(
    dir: &std::path::Path,
    host_id: &str,
    site: &str,
) -> (tokio::runtime::Runtime, AgentProcess, EngineHandle) {
    let node = dir.join("node.xml");
    std::fs::write(
        &node,
        "<node><cpu><mode>host</mode></cpu><memory>67108864</memory></node>",
    )
    .unwrap();
    live_host_on(dir, host_id, site, &format!("test://{}", node.display()))
}

#[test]
fn the_window_shows_the_live_fleet_and_drives_real_vms() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, a, engine) = live_host(dir.path(), "gui-a", "lausanne");
    // The second host is enrolled through the dialog below.
    let b =
        AgentProcess::spawn(&dir.path().join("b"), "gui-b", "geneva", "test:///default").unwrap();
    let host = a.host_id.clone();
    runtime.block_on(async {
        engine
            .request(|reply| Command::CreateVm {
                host,
                spec: VmSpec {
                    name: VmName::new("gui-vm").unwrap(),
                    template: TemplateName::new("tiny").unwrap(),
                    vcpus: Some(1),
                    memory_mib: Some(64),
                },
                start: false,
                reply,
            })
            .await
            .unwrap();
    });
    let _enter = runtime.enter();
    let mut harness = window(&engine);

    // Enroll the second host through the "Add host" dialog, as an operator would.
    step_until(&mut harness, "the first host", |h| {
        h.query_by_role_and_label(Role::Button, "gui-a").is_some()
    });
    harness.get_by_label("Add host…").click();
    step_until(&mut harness, "the dialog", |h| {
        h.query_by_role_and_label(Role::TextInput, "Address")
            .is_some()
    });
    harness
        .get_by_role_and_label(Role::TextInput, "Address")
        .focus();
    harness.step();
    harness
        .get_by_role_and_label(Role::TextInput, "Address")
        .type_text(&b.address);
    harness
        .get_by_role_and_label(Role::TextInput, "Join token")
        .focus();
    harness.step();
    harness
        .get_by_role_and_label(Role::TextInput, "Join token")
        .type_text(b.token.as_deref().unwrap());
    harness.step();
    harness.get_by_label("Enroll").click();
    // First the key the agent presents, to compare with what it printed; nothing enrolled yet.
    let presented = b.fingerprint.to_string();
    step_until(&mut harness, "the presented key to trust", |h| {
        h.query_by_label(&presented).is_some()
            && h.query_by_role_and_label(Role::Button, "Trust and enroll")
                .is_some()
    });
    assert!(engine.snapshot().host(&b.host_id).is_none());
    harness
        .get_by_role_and_label(Role::Button, "Trust and enroll")
        .click();
    step_until(&mut harness, "the enrolled host and its pinned key", |h| {
        h.query_by_label("Enrolled host gui-b.").is_some() && h.query_by_label(&presented).is_some()
    });
    assert_eq!(
        engine
            .snapshot()
            .host(&b.host_id)
            .unwrap()
            .record
            .fingerprint,
        b.fingerprint
    );
    harness.key_press(egui::Key::Escape);

    // Hosts and VMs appear, as cards and chips.
    step_until(&mut harness, "both hosts and the VM", |h| {
        h.query_by_role_and_label(Role::Button, "gui-a").is_some()
            && h.query_by_role_and_label(Role::Button, "gui-b").is_some()
            && h.query_by_role_and_label(Role::Button, "gui-vm").is_some()
            && h.state()
                .snapshot()
                .hosts
                .iter()
                .all(|h| h.link == LinkState::Online)
    });
    harness
        .query_by_label_contains("2/2 hosts online")
        .expect("the toolbar counts hosts");

    // Selecting the VM shows its details.
    harness
        .get_by_role_and_label(Role::Button, "gui-vm")
        .click();
    step_until(&mut harness, "the VM's details", |h| {
        h.query_by_label("VM gui-vm").is_some()
    });
    assert_eq!(
        harness.state().selection(),
        &Selection::Vm(a.host_id.clone(), VmName::new("gui-vm").unwrap())
    );
    assert!(
        harness.query_by_label("shutoff").is_some(),
        "the details show the state"
    );

    // Start from the UI: the real VM runs.
    harness.get_by_role_and_label(Role::Button, "Start").click();
    step_until(&mut harness, "the VM running", |_| {
        vm_state(&engine, "gui-vm") == Some(VmState::Running)
    });
    step_until(&mut harness, "the state in the details", |h| {
        h.query_by_label("running").is_some()
    });

    // Stop from the UI: the real VM is shut off.
    harness.get_by_role_and_label(Role::Button, "Stop").click();
    step_until(&mut harness, "the VM shut off", |_| {
        vm_state(&engine, "gui-vm") == Some(VmState::Shutoff)
    });

    // Selecting a host card shows the host.
    harness.get_by_role_and_label(Role::Button, "gui-b").click();
    step_until(&mut harness, "the host's details", |h| {
        h.query_by_label("Host gui-b").is_some()
    });
    assert!(harness.query_by_label("geneva").is_some());

    if let Ok(path) = std::env::var("DUNES_GUI_SNAPSHOT") {
        harness.render().expect("render").save(path).expect("save");
    }
}

#[test]
fn new_vm_dialog_and_context_menu_manage_a_vm() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, agent, engine) = live_host(dir.path(), "menu-a", "lausanne");
    let _enter = runtime.enter();
    let mut harness = window(&engine);
    step_until(&mut harness, "the host", |h| {
        h.query_by_role_and_label(Role::Button, "menu-a").is_some()
    });

    // Ctrl+N opens the dialog with the name field focused.
    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::N);
    step_until(&mut harness, "the New VM dialog", |h| {
        h.query_by_role_and_label(Role::TextInput, "Name")
            .is_some_and(|n| n.is_focused())
    });

    // A bad name is refused in place, with the reason.
    harness
        .get_by_role_and_label(Role::TextInput, "Name")
        .type_text("Web");
    step_until(&mut harness, "the name's error", |h| {
        h.query_by_label_contains("invalid VM name \"Web\"")
            .is_some()
    });
    assert!(
        harness
            .get_by_label("Create")
            .accesskit_node()
            .is_disabled(),
        "Create waits for a valid name"
    );
    harness.get_by_label("Create").click();
    harness.step();
    harness
        .get_by_role_and_label(Role::TextInput, "Name")
        .focus();
    harness.step();
    for _ in 0..3 {
        harness.key_press(egui::Key::Backspace);
    }
    harness.step();
    assert!(
        !engine
            .snapshot()
            .events
            .iter()
            .any(|e| e.message.starts_with("creating VM")),
        "a disabled Create sends nothing"
    );

    // A good one is created on the only host and started.
    harness
        .get_by_role_and_label(Role::TextInput, "Name")
        .type_text("web-9");
    step_until(&mut harness, "the error to go", |h| {
        h.query_by_label_contains("invalid VM name").is_none()
    });
    harness.get_by_label("Create").click();
    step_until(&mut harness, "the new VM running on its chip", |h| {
        vm_state(&engine, "web-9") == Some(VmState::Running)
            && h.query_by_role_and_label(Role::Button, "web-9").is_some()
    });
    let (host, vm) = {
        let snap = engine.snapshot();
        let (host, vm) = snap.find_vm("web-9").unwrap();
        (host.clone(), vm.clone())
    };
    assert_eq!(host, agent.host_id);
    assert_eq!(vm.template.as_ref().map(|t| t.as_str()), Some("tiny"));
    assert!(
        harness.query_by_label("New VM").is_none(),
        "the dialog closes after Create"
    );

    // Delete while typing in the filter edits the text; on a selected VM it asks first, and
    // Escape keeps the VM.
    harness.get_by_role_and_label(Role::Button, "web-9").click();
    harness.step();
    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::F);
    step_until(&mut harness, "the filter focused", |h| {
        h.query_by_role_and_label(Role::TextInput, "Filter")
            .is_some_and(|n| n.is_focused())
    });
    harness
        .get_by_role_and_label(Role::TextInput, "Filter")
        .type_text("web");
    harness.key_press(egui::Key::Delete);
    for _ in 0..3 {
        harness.step();
    }
    assert!(
        harness.query_by_label("Delete VM web-9?").is_none(),
        "Delete in a text field is not a VM delete"
    );
    harness.get_by_role_and_label(Role::Button, "web-9").click();
    step_until(&mut harness, "the filter to let go of the keyboard", |h| {
        h.query_by_role_and_label(Role::TextInput, "Filter")
            .is_some_and(|n| !n.is_focused())
    });
    // web-9 runs: Delete says it must be stopped first, and offers nothing to confirm.
    harness.key_press(egui::Key::Delete);
    step_until(&mut harness, "the word that it runs", |h| {
        h.query_by_label("web-9 is running").is_some()
    });
    assert!(
        harness
            .query_by_label_contains("only a stopped VM can be deleted")
            .is_some()
    );
    assert!(harness.query_by_label("Delete VM web-9?").is_none());
    // The notice is modal: Ctrl+N opens nothing beneath it.
    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::N);
    harness.step();
    assert!(
        harness
            .query_by_role_and_label(Role::TextInput, "Name")
            .is_none()
    );
    harness.key_press(egui::Key::Escape);
    step_until(&mut harness, "the notice to close", |h| {
        h.query_by_label("web-9 is running").is_none()
    });
    assert!(
        engine.snapshot().find_vm("web-9").is_ok(),
        "Escape keeps the VM"
    );
    assert!(
        matches!(harness.state().selection(), Selection::Vm(_, name) if name.as_str() == "web-9"),
        "Escape closed the confirmation only, not the selection"
    );
    // With no dialog in front, Escape clears the selection.
    harness.key_press(egui::Key::Escape);
    step_until(&mut harness, "the selection cleared", |h| {
        *h.state().selection() == Selection::None
    });

    // Right-click on the chip: force it off once confirmed, then delete it after confirming.
    harness
        .get_by_role_and_label(Role::Button, "web-9")
        .click_secondary();
    step_until(&mut harness, "the context menu", |h| {
        h.query_by_label("VM web-9 on menu-a").is_some()
    });
    harness
        .get_by_role_and_label(Role::Button, "Force off…")
        .click();
    step_until(&mut harness, "the confirmation of force off", |h| {
        h.query_by_label("Force web-9 off?").is_some()
    });
    assert!(
        harness
            .query_by_label_contains("like pulling its power cord")
            .is_some()
    );
    assert_eq!(
        vm_state(&engine, "web-9"),
        Some(VmState::Running),
        "nothing happens before the operator confirms"
    );
    harness
        .get_by_role_and_label(Role::Button, "Force off")
        .click();
    step_until(&mut harness, "the VM shut off", |_| {
        vm_state(&engine, "web-9") == Some(VmState::Shutoff)
    });
    harness
        .get_by_role_and_label(Role::Button, "web-9")
        .click_secondary();
    step_until(&mut harness, "the context menu", |h| {
        h.query_by_role_and_label(Role::Button, "Delete…").is_some()
    });
    harness
        .get_by_role_and_label(Role::Button, "Delete…")
        .click();
    step_until(&mut harness, "the confirmation", |h| {
        h.query_by_label("Delete VM web-9?").is_some()
    });
    assert!(
        engine.snapshot().find_vm("web-9").is_ok(),
        "nothing is deleted before the operator confirms"
    );
    harness
        .get_by_role_and_label(Role::Button, "Delete")
        .click();
    step_until(&mut harness, "the VM gone", |h| {
        engine.snapshot().find_vm("web-9").is_err()
            && h.query_by_role_and_label(Role::Button, "web-9").is_none()
    });

    // Enter in a dialog's field submits that dialog.
    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::N);
    step_until(&mut harness, "the New VM dialog", |h| {
        h.query_by_role_and_label(Role::TextInput, "Name")
            .is_some_and(|n| n.is_focused())
    });
    harness
        .get_by_role_and_label(Role::TextInput, "Name")
        .type_text("web-10");
    harness.step();
    harness.key_press(egui::Key::Enter);
    step_until(&mut harness, "web-10 created by Enter", |_| {
        vm_state(&engine, "web-10") == Some(VmState::Running)
    });

    // One dialog at a time; Enter typed elsewhere (the filter) submits nothing.
    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::N);
    step_until(&mut harness, "the New VM dialog", |h| {
        h.query_by_role_and_label(Role::TextInput, "Name").is_some()
    });
    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::H);
    step_until(&mut harness, "Add host instead of New VM", |h| {
        h.query_by_role_and_label(Role::TextInput, "Address")
            .is_some_and(|n| n.is_focused())
            && h.query_by_role_and_label(Role::TextInput, "Name").is_none()
    });
    harness
        .get_by_role_and_label(Role::TextInput, "Address")
        .type_text(&agent.address);
    harness
        .get_by_role_and_label(Role::TextInput, "Join token")
        .focus();
    harness.step();
    harness
        .get_by_role_and_label(Role::TextInput, "Join token")
        .type_text("not-the-token");
    harness.step();
    assert_eq!(
        harness
            .get_by_role_and_label(Role::TextInput, "Join token")
            .accesskit_node()
            .value()
            .as_deref(),
        Some("not-the-token")
    );
    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::F);
    step_until(&mut harness, "the filter focused", |h| {
        h.query_by_role_and_label(Role::TextInput, "Filter")
            .is_some_and(|n| n.is_focused())
    });
    harness.key_press(egui::Key::Enter);
    for _ in 0..10 {
        harness.step();
    }
    assert!(
        harness.query_by_label("reading the agent's key…").is_none()
            && harness
                .query_by_label_contains("presents this key")
                .is_none(),
        "Enter in the filter did not submit Add host"
    );
    assert!(
        harness
            .query_by_role_and_label(Role::TextInput, "Address")
            .is_some()
    );
    // Escape closes the dialog and leaves the rest alone.
    harness.key_press(egui::Key::Escape);
    step_until(&mut harness, "Add host closed", |h| {
        h.query_by_role_and_label(Role::TextInput, "Address")
            .is_none()
    });
}

/// Presses on `from`, moves to `to` in small steps (as a hand does), and stays there.
/// Services in the window: a service written in the editor (checked as it is typed), its
/// plan with the hosts left out and why, an instance dragged by hand onto a host that breaks
/// a rule (the verdict shows while it hovers and stays after the drop, and deploy waits),
/// the deploy, and a VM chip dragged onto the service to adopt it.
#[test]
fn services_are_written_planned_placed_by_hand_deployed_and_adopt_vms() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, a, engine) = live_host(dir.path(), "svc-a", "lausanne");
    let b =
        AgentProcess::spawn(&dir.path().join("b"), "svc-b", "geneva", "test:///default").unwrap();
    runtime.block_on(async {
        enroll_online(&engine, &b).await.unwrap();
        // libvirt's test driver starts each host with a running `test` VM of 8 GiB, more than
        // the host's declared memory: off, so that the service has room.
        for host in [a.host_id.clone(), b.host_id.clone()] {
            engine
                .request(|reply| Command::StopVm {
                    host,
                    name: VmName::new("test").unwrap(),
                    force: true,
                    reply,
                })
                .await
                .unwrap();
        }
        let host = a.host_id.clone();
        engine
            .request(|reply| Command::CreateVm {
                host,
                spec: VmSpec {
                    name: VmName::new("loose").unwrap(),
                    template: TemplateName::new("tiny").unwrap(),
                    vcpus: Some(1),
                    memory_mib: Some(64),
                },
                start: true,
                reply,
            })
            .await
            .unwrap();
    });
    let _enter = runtime.enter();
    let mut harness = window(&engine);
    step_until(&mut harness, "both hosts", |h| {
        h.query_by_role_and_label(Role::Button, "svc-a").is_some()
            && h.query_by_role_and_label(Role::Button, "svc-b").is_some()
    });

    // The editor checks the file as it is typed, and says what is wrong on which line.
    harness.get_by_label("New service…").click();
    step_until(&mut harness, "the editor", |h| {
        h.query_by_role_and_label(Role::MultilineTextInput, "Service file")
            .is_some()
            || h.query_by_role_and_label(Role::TextInput, "Service file")
                .is_some()
    });
    let editor = |h: &Harness<'_, ConsoleApp>| {
        h.query_by_role_and_label(Role::MultilineTextInput, "Service file")
            .map(|n| n.rect())
            .or_else(|| {
                h.query_by_role_and_label(Role::TextInput, "Service file")
                    .map(|n| n.rect())
            })
            .unwrap()
    };
    let field = editor(&harness);
    harness.hover_at(field.center());
    harness.drag_at(field.center());
    harness.drop_at(field.center());
    harness.step();
    harness.step();
    let source = "name = \"site\"\n[[application]]\nname = \"web\"\nruntime = \"libvirt\"\ntemplate = \"tiny\"\nvcpus = 1\nmemory_mib = 64\ninstances = 2\ncolour = 3\n";
    harness.event(egui::Event::Text(source.into()));
    step_until(&mut harness, "the line of the unknown field", |h| {
        h.query_by_label_contains("line 9").is_some()
    });
    assert!(
        harness
            .get_by_label("Define")
            .accesskit_node()
            .is_disabled()
    );
    // Take the bad line out: the file reads, with what it defines beside it.
    for _ in 0.."colour = 3\n".len() {
        harness.key_press(egui::Key::Backspace);
    }
    let rules = "[[application]]\nname = \"db\"\nruntime = \"libvirt\"\ntemplate = \"tiny\"\nvcpus = 1\nmemory_mib = 64\n[[application]]\nname = \"pay\"\nruntime = \"libvirt\"\ntemplate = \"tiny\"\nvcpus = 1\nmemory_mib = 64\ninstances = 0\n[rules]\ndistinct_hosts = [\"web\"]\npin = [{ application = \"db\", sites = [\"lausanne\"] }]\nmin_security_level = [{ application = \"pay\", level = 3 }]\n";
    harness.event(egui::Event::Text(rules.into()));
    step_until(&mut harness, "the file to read", |h| {
        h.query_by_label_contains("reads: 3 applications").is_some()
            && h.query_by_label("web: instances on different hosts")
                .is_some()
    });
    harness.get_by_label("Define").click();
    step_until(&mut harness, "the service in the panel", |h| {
        h.query_by_role_and_label(Role::Button, "service site")
            .is_some()
    });

    // Its plan names every host left out and why.
    harness.get_by_label("Plan…").click();
    step_until(&mut harness, "the plan with its rejections", |h| {
        h.query_by_label("pay: svc-a: security level 1 < required 3")
            .is_some()
            && h.query_by_label_contains("web-1 -> ").is_some()
    });
    let host_of = |h: &Harness<'_, ConsoleApp>, instance: &str| {
        let label = h
            .query_by_label_contains(&format!("{instance} -> "))
            .unwrap()
            .accesskit_node()
            .value()
            .unwrap_or_default();
        label
            .split(" -> ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .to_string()
    };
    let web0_host = host_of(&harness, "web-0");
    assert_ne!(web0_host, host_of(&harness, "web-1"), "distinct hosts");

    // db-0, pinned to lausanne, dragged onto the geneva host: the verdict while it hovers,
    // then after the drop.
    let from = harness.get_by_label_contains("db-0 -> ").rect().center();
    let to = harness
        .get_by_role_and_label(Role::Group, "host svc-b")
        .rect()
        .center();
    drag_to(&mut harness, from, to);
    let broken = "svc-b: db is pinned to other sites";
    assert!(
        harness
            .query_by_label(&format!("db-0 breaks a rule: {broken}"))
            .is_some(),
        "no live verdict while hovering"
    );
    harness.drop_at(to);
    step_until(&mut harness, "the verdict of the hand placement", |h| {
        h.query_by_label(&format!("db-0 on svc-b: breaks {broken}"))
            .is_some()
    });
    assert!(
        harness
            .get_by_label("Deploy")
            .accesskit_node()
            .is_disabled(),
        "a plan that breaks a rule is not deployed"
    );
    assert!(engine.snapshot().services[0].instances.is_empty());

    // Without it, the plan deploys.
    harness.get_by_label("Clear hand placements").click();
    step_until(&mut harness, "the plan without hand placements", |h| {
        h.query_by_label("Placed by hand").is_none()
            && h.query_by_label("Deploy")
                .is_some_and(|d| !d.accesskit_node().is_disabled())
    });
    harness.get_by_label("Deploy").click();
    step_until(&mut harness, "three deployed instances", |h| {
        engine.snapshot().services[0].instances.len() == 3
            && h.query_by_role_and_label(Role::Button, "site-web-1")
                .is_some()
    });

    // The loose VM's chip dropped onto the service: it becomes web-2.
    let from = harness
        .get_by_role_and_label(Role::Button, "loose")
        .rect()
        .center();
    let to = harness
        .get_by_role_and_label(Role::Button, "service site")
        .rect()
        .center();
    drag_to(&mut harness, from, to);
    harness.drop_at(to);
    step_until(&mut harness, "the adopt dialog", |h| {
        h.query_by_label("Adopt loose into site?").is_some()
    });
    harness.get_by_label("Adopt").click();
    step_until(&mut harness, "the adopted instance", |h| {
        let snap = engine.snapshot();
        let _ = h;
        snap.services[0]
            .instances
            .iter()
            .any(|i| i.record.vm.as_str() == "loose" && i.record.adopted && i.record.index == 2)
    });
}

/// Drag-to-migrate: a VM chip dropped onto a host that cannot take it shows why and moves
/// nothing; dropped onto one that can, it shows the estimate, and Migrate moves it there.
#[test]
fn a_vm_chip_dropped_on_another_host_migrates_after_the_pre_check() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, a, engine) = live_host(dir.path(), "dnd-a", "lausanne");
    let b =
        AgentProcess::spawn(&dir.path().join("b"), "dnd-b", "geneva", "test:///default").unwrap();
    runtime.block_on(async {
        enroll_online(&engine, &b).await.unwrap();
        engine
            .request(|reply| Command::CreateVm {
                host: a.host_id.clone(),
                spec: VmSpec {
                    name: VmName::new("travel").unwrap(),
                    template: TemplateName::new("tiny").unwrap(),
                    vcpus: Some(1),
                    memory_mib: Some(64),
                },
                start: true,
                reply,
            })
            .await
            .unwrap();
    });
    let _enter = runtime.enter();
    let mut harness = window(&engine);
    step_until(&mut harness, "the chip and the other host", |h| {
        h.query_by_role_and_label(Role::Button, "travel").is_some()
            && h.query_by_role_and_label(Role::Button, "dnd-b").is_some()
    });
    let drag_chip = |harness: &mut Harness<'_, ConsoleApp>| {
        let from = harness
            .get_by_role_and_label(Role::Button, "travel")
            .rect()
            .center();
        let to = harness
            .get_by_role_and_label(Role::Button, "dnd-b")
            .rect()
            .center();
        drag_to(harness, from, to);
        harness.drop_at(to);
    };

    // dnd-b's own `test` VM takes all of its declared memory: the pre-check says so.
    drag_chip(&mut harness);
    step_until(&mut harness, "the refusal", |h| {
        h.query_by_label("travel cannot go to dnd-b:").is_some()
    });
    assert!(
        harness
            .query_by_label_contains("dnd-b: memory 0.0 GiB free")
            .is_some()
    );
    assert!(
        harness
            .get_by_label("Migrate")
            .accesskit_node()
            .is_disabled()
    );
    harness.get_by_label("Cancel").click();
    step_until(&mut harness, "the dialog gone", |h| {
        h.query_by_label("Migrate").is_none()
    });
    assert!(engine.snapshot().migrations.is_empty(), "nothing moved");

    // Room made on dnd-b: the estimate, then the migration.
    runtime.block_on(async {
        engine
            .request(|reply| Command::StopVm {
                host: b.host_id.clone(),
                name: VmName::new("test").unwrap(),
                force: true,
                reply,
            })
            .await
            .unwrap();
    });
    step_until(&mut harness, "dnd-b's memory freed", |_| {
        engine
            .snapshot()
            .host(&b.host_id)
            .and_then(|h| h.vm(&VmName::new("test").unwrap()).map(|v| v.state))
            == Some(VmState::Shutoff)
    });
    drag_chip(&mut harness);
    step_until(&mut harness, "the estimate", |h| {
        h.query_by_label("Migrate travel to dnd-b?").is_some()
            && h.query_by_label_contains("which is also the downtime")
                .is_some()
    });
    harness.get_by_label("Migrate").click();
    step_until(&mut harness, "the VM running on dnd-b", |h| {
        let snap = engine.snapshot();
        snap.host(&b.host_id)
            .and_then(|host| host.vm(&VmName::new("travel").unwrap()).map(|v| v.state))
            == Some(VmState::Running)
            && snap
                .host(&a.host_id)
                .is_some_and(|host| host.vm(&VmName::new("travel").unwrap()).is_none())
            && h.query_by_label("done").is_some()
    });

    // The emptied host goes into maintenance from its details, and back.
    harness.get_by_role_and_label(Role::Button, "dnd-a").click();
    step_until(&mut harness, "the host's details", |h| {
        h.query_by_label("Drain").is_some()
    });
    harness.get_by_label("Drain").click();
    step_until(&mut harness, "the maintenance mark", |h| {
        h.query_by_label("In maintenance: takes nothing new")
            .is_some()
            && h.query_by_label("End maintenance").is_some()
    });
    assert!(
        engine
            .snapshot()
            .host(&a.host_id)
            .is_some_and(|h| h.record.maintenance.is_some())
    );
    harness.get_by_label("End maintenance").click();
    step_until(&mut harness, "back in service", |h| {
        h.query_by_label("In service: takes new VMs and instances.")
            .is_some()
    });
}

#[test]
fn statistics_charts_show_a_host_and_a_vm_over_the_range_picked() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, a, engine) = roomy_host(dir.path(), "gui-stats", "lausanne");
    let host = a.host_id.clone();
    runtime.block_on(async {
        engine
            .request(|reply| Command::CreateVm {
                host,
                spec: VmSpec {
                    name: VmName::new("charted").unwrap(),
                    template: TemplateName::new("tiny").unwrap(),
                    vcpus: Some(1),
                    memory_mib: Some(64),
                },
                start: true,
                reply,
            })
            .await
            .unwrap();
    });
    let _enter = runtime.enter();
    let mut harness = window(&engine);
    step_until(&mut harness, "the host card", |h| {
        h.query_by_role_and_label(Role::Button, "gui-stats")
            .is_some()
    });
    harness
        .get_by_role_and_label(Role::Button, "gui-stats")
        .click();
    step_until(&mut harness, "the host's details", |h| {
        h.query_by_label("Host gui-stats").is_some()
    });
    harness
        .get_by_role_and_label(Role::Button, "Statistics…")
        .click();
    // The charts of the last hour, second by second, once the first readings are in.
    step_for_until(&mut harness, 60, "the host's charts", |h| {
        h.query_by_label("Statistics of host gui-stats").is_some()
            && h.query_by_label_contains("Every 1 s").is_some()
            && h.query_all_by_label("no readings").next().is_none()
    });
    for group in [
        "CPU use",
        "Memory in use",
        "Disk I/O",
        "Network traffic",
        "Cost per hour",
    ] {
        assert!(harness.query_by_label(group).is_some(), "{group} missing");
    }
    // Export what is shown: a CSV with every metric's buckets.
    harness
        .get_by_role_and_label(Role::Button, "Export CSV")
        .click();
    step_until(&mut harness, "the export's path", |h| {
        h.query_by_label_contains("Exported to ").is_some()
    });
    let exports = engine.data_dir().join("exports");
    let csv = std::fs::read_dir(&exports)
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .next()
        .expect("an exported file");
    assert!(
        csv.starts_with("time_unix_secs,metric,unit,min,mean,max\n"),
        "{csv}"
    );
    assert!(csv.lines().any(|l| l.contains(",memory,MiB,")), "{csv}");
    assert!(csv.lines().any(|l| l.contains(",cpu,%,")), "{csv}");

    // A day's range asks for minutes.
    harness.get_by_label("1 day").click();
    step_for_until(&mut harness, 60, "the day in minutes", |h| {
        h.query_by_label_contains("Every 60 s").is_some()
    });
    assert_eq!(
        harness.state().charts_range(),
        dunes_console::ui::TimeRange::Day
    );

    // The VM's charts, from its details; Escape closes them.
    harness.key_press(egui::Key::Escape);
    step_until(&mut harness, "the charts closed", |h| {
        h.query_by_label("Statistics of host gui-stats").is_none()
    });
    // The chip in the topology, or the VM in the host's details: either selects it.
    harness
        .query_all_by_role_and_label(Role::Button, "charted")
        .next()
        .expect("the VM's chip")
        .click();
    step_until(&mut harness, "the VM's details", |h| {
        h.query_by_label("VM charted").is_some()
    });
    harness
        .get_by_role_and_label(Role::Button, "Statistics…")
        .click();
    step_for_until(&mut harness, 60, "the VM's charts", |h| {
        h.query_by_label("Statistics of charted").is_some()
            && h.query_by_label_contains("Every 60 s").is_some()
    });

    // A service's charts: its instances' sums (CPU their mean).
    runtime.block_on(async {
        let name = engine
            .request(|reply| Command::DefineService {
                source: "name = \"shopfront\"\n[[application]]\nname = \"web\"\nruntime = \"libvirt\"\ntemplate = \"tiny\"\nvcpus = 1\nmemory_mib = 64\ninstances = 1\n[[application]]\nname = \"api\"\nruntime = \"libvirt\"\ntemplate = \"tiny\"\nvcpus = 1\nmemory_mib = 64\ninstances = 1\n".into(),
                replace: false,
                reply,
            })
            .await
            .unwrap();
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
            .request(|reply| Command::StartService { name, reply })
            .await
            .unwrap();
        assert!(report.failed.is_empty(), "{report:?}");
    });
    harness.key_press(egui::Key::Escape);
    step_until(&mut harness, "the service's card", |h| {
        h.query_by_role_and_label(Role::Button, "service shopfront")
            .is_some()
    });
    harness
        .get_by_role_and_label(Role::Button, "service shopfront")
        .click();
    step_until(&mut harness, "the service's details", |h| {
        h.query_by_label("Service shopfront").is_some()
    });
    harness
        .get_by_role_and_label(Role::Button, "Statistics…")
        .click();
    // Both instances' memory, summed, once readings of them are in.
    step_for_until(&mut harness, 60, "the service's charts", |h| {
        h.query_by_label("Statistics of service shopfront")
            .is_some()
            && h.query_by_label_contains("Every 60 s").is_some()
    });
    // Both instances' memory summed, once a batch holds readings of both.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let answer = runtime.block_on(engine.request(|reply| Command::Stats {
            subject: dunes_console::engine::statistics::series::Subject::Service(
                dunes_shared::model::ServiceName::new("shopfront").unwrap(),
            ),
            since_secs: 600,
            resolution_secs: Some(1),
            reply,
        }));
        let memory = answer
            .unwrap()
            .series
            .into_iter()
            .find(|s| s.metric == dunes_console::engine::statistics::series::Metric::Memory);
        if memory
            .as_ref()
            .is_some_and(|m| m.points.iter().any(|b| b.mean() == 128.0))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "two applications' instances of 64 MiB: {memory:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    if let Ok(path) = std::env::var("DUNES_CHARTS_SNAPSHOT") {
        harness.render().expect("render").save(path).expect("save");
    }
    // One application's charts, from the service's details.
    harness.key_press(egui::Key::Escape);
    step_until(&mut harness, "the service's charts closed", |h| {
        h.query_by_label("Statistics of service shopfront")
            .is_none()
    });
    harness.get_by_role_and_label(Role::Button, "api").click();
    step_for_until(&mut harness, 60, "the application's charts", |h| {
        h.query_by_label("Statistics of application shopfront/api")
            .is_some()
            && h.query_by_label_contains("Every 60 s").is_some()
            && h.query_by_label("Cost per hour").is_some()
    });
}

#[test]
fn the_capacity_view_shows_each_site_and_its_forecast_line() {
    use dunes_shared::model::{Counters, Sample};
    let dir = tempfile::tempdir().unwrap();
    // A host of 16 CPUs and 64 GiB, as its libvirt test driver declares.
    let (runtime, agent, engine) = roomy_host(dir.path(), "gui-cap", "lausanne");
    runtime.block_on(async {
        // Ten days of hourly readings, memory in use growing 1 GiB a day from 8 GiB, with
        // a daily swing: history another system kept, taken in through the ingest path.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        // Up to the hour before this one, so that today's peak is the history's too.
        let start_ms = now_ms - now_ms % 86_400_000 - 10 * 86_400_000;
        let hours = (now_ms - start_ms) / 3_600_000 - 1;
        let samples: Vec<Sample> = (0..hours)
            .map(|h| Sample {
                at_unix_ms: start_ms + h * 3_600_000,
                host: Counters {
                    cpu_ns: h * 3_600_000_000_000,
                    cpus: 16,
                    memory_used_mib: 8192 + h * 1024 / 24 + (h % 24) * 40,
                    memory_total_mib: 65_536,
                    ..Counters::default()
                },
                workloads: Vec::new(),
            })
            .collect();
        let count = samples.len();
        let taken = engine
            .request(|reply| Command::ImportSamples {
                host: agent.host_id.clone(),
                samples,
                reply,
            })
            .await
            .unwrap();
        assert_eq!(taken, count);
    });
    let _enter = runtime.enter();
    let mut harness = window(&engine);
    step_until(&mut harness, "the host card", |h| {
        h.query_by_role_and_label(Role::Button, "gui-cap").is_some()
    });
    harness
        .get_by_role_and_label(Role::Button, "Capacity…")
        .click();
    step_for_until(&mut harness, 60, "the site's capacity and forecast", |h| {
        h.query_by_label_contains("lausanne · 1 host").is_some()
            && h.query_by_label_contains("lausanne memory full in")
                .is_some()
    });
    // The method is named, and the sizes are the host's.
    assert!(
        harness
            .query_all_by_label_contains("Method: trend on daily peaks")
            .next()
            .is_some()
    );
    assert!(harness.query_all_by_label("65536 MiB").next().is_some());
    assert!(harness.query_all_by_label("16 CPUs").next().is_some());
    if let Ok(path) = std::env::var("DUNES_CAPACITY_SNAPSHOT") {
        harness.render().expect("render").save(path).expect("save");
    }
    // The site's charts, from its heading: its host's series.
    harness
        .get_by_role_and_label(Role::Button, "Statistics…")
        .click();
    step_for_until(&mut harness, 60, "the site's charts", |h| {
        h.query_by_label("Statistics of site lausanne").is_some()
            && h.query_by_label_contains("Every 1 s").is_some()
    });
    harness.key_press(egui::Key::Escape);
    step_until(&mut harness, "the charts closed", |h| {
        h.query_by_label("Statistics of site lausanne").is_none()
    });
    harness.key_press(egui::Key::Escape);
    step_until(&mut harness, "the view closed", |h| {
        h.query_by_label_contains("lausanne · 1 host").is_none()
    });
}
