//! The window on an engine that runs in another process, reached with an operator's
//! credential over QUIC (`dunes-console --connect FILE`): it shows that engine's fleet, its
//! changes are the operator's (checked and audited there: a stop, a new VM, a drag to
//! migrate), its charts read from there and export here, what the role may not do is greyed out, and a lost engine is a banner until the
//! window has caught up with it again.

mod gui_support;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use dunes_console::ui::{ConsoleApp, EngineLink};
use dunes_tests::{
    console_binary,
    demo::{Console, ctl, demo_with, json},
};
use egui::accesskit::Role;
use egui_kittest::{
    Harness,
    kittest::{NodeT as _, Queryable as _},
};
use gui_support::{drag_to, step_for_until, step_until};

fn add_operator(data: &Path, dir: &Path, name: &str, role: &str) -> PathBuf {
    let file = dir.join(format!("{name}.toml"));
    json(&ctl(
        data,
        &[
            "--json",
            "operator",
            "add",
            name,
            "--role",
            role,
            "--out",
            file.to_str().unwrap(),
        ],
    ));
    file
}

/// A window on the engine the credential names.
fn remote_window(
    runtime: &tokio::runtime::Runtime,
    credential: &Path,
    exports: PathBuf,
) -> Harness<'static, ConsoleApp> {
    let link = runtime
        .block_on(EngineLink::connect(credential, exports))
        .unwrap();
    Harness::builder()
        .with_size([1400.0, 900.0])
        .build_eframe(move |cc| ConsoleApp::with_link(&cc.egui_ctx, link))
}

fn disabled(harness: &Harness<'_, ConsoleApp>, button: &str) -> bool {
    harness
        .get_by_role_and_label(Role::Button, button)
        .accesskit_node()
        .is_disabled()
}

/// The toolbar's count of hosts and VMs, from ctl's answers.
fn counts(data: &Path) -> String {
    let hosts = json(&ctl(data, &["--json", "hosts"]));
    let hosts = hosts.as_array().unwrap();
    let vms = json(&ctl(data, &["--json", "vms"]));
    let vms = vms.as_array().unwrap();
    format!(
        "{}/{} hosts online · {}/{} VMs running",
        hosts.iter().filter(|h| h["state"] == "online").count(),
        hosts.len(),
        vms.iter().filter(|v| v["state"] == "running").count(),
        vms.len()
    )
}

fn vm_host(data: &Path, name: &str) -> String {
    let vms = json(&ctl(data, &["--json", "vms"]));
    vms.as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .map(|v| v["host"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

fn vm_state(data: &Path, name: &str) -> String {
    let vms = json(&ctl(data, &["--json", "vms"]));
    vms.as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .map(|v| v["state"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

/// A UDP port nothing listens on now, so the restarted engine can take the same one.
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_window_elsewhere_acts_as_its_operator_and_catches_up_after_the_engine_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let (console, data) = demo_with(dir.path(), &["--operator-listen", &listen]);
    let olga = add_operator(&data, dir.path(), "olga", "operator");
    let vera = add_operator(&data, dir.path(), "vera", "viewer");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _enter = runtime.enter();

    // A viewer sees the fleet, and every change is greyed out.
    let mut viewer = remote_window(&runtime, &vera, dir.path().join("vera-exports"));
    step_until(&mut viewer, "the fleet, as viewer vera", |h| {
        h.query_by_role_and_label(Role::Button, "intranet")
            .is_some()
            && h.query_by_label_contains("viewer vera").is_some()
    });
    assert!(disabled(&viewer, "New VM…") && disabled(&viewer, "Add host…"));
    viewer
        .get_by_role_and_label(Role::Button, "intranet")
        .click_secondary();
    step_until(&mut viewer, "the VM's menu", |h| {
        h.query_by_label_contains("VM intranet on").is_some()
    });
    let menu_stop = |h: &Harness<'_, ConsoleApp>| {
        // The menu's Stop, not the Stop of the services panel on the left.
        h.query_all_by_role_and_label(Role::Button, "Stop")
            .max_by(|a, b| a.rect().left().total_cmp(&b.rect().left()))
            .unwrap()
            .accesskit_node()
            .is_disabled()
    };
    assert!(menu_stop(&viewer), "a viewer's Stop is greyed out");
    drop(viewer);

    // An operator's window: the same fleet, with the engine and who it takes them for.
    let mut harness = remote_window(&runtime, &olga, dir.path().join("exports"));
    step_until(&mut harness, "the fleet, as operator olga", |h| {
        h.query_by_role_and_label(Role::Button, "intranet")
            .is_some()
            && h.query_by_role_and_label(Role::Button, "gva-1").is_some()
            && h.query_by_label_contains(&format!("at {listen} · operator olga"))
                .is_some()
    });
    assert!(
        disabled(&harness, "Add host…"),
        "enrolling hosts is an admin's"
    );
    assert!(!disabled(&harness, "New VM…"));
    let before = counts(&data);
    assert!(
        harness.query_by_label(&before).is_some(),
        "the toolbar does not say {before:?}"
    );

    // Stop from the VM's menu: done by the engine elsewhere, as olga.
    harness
        .get_by_role_and_label(Role::Button, "intranet")
        .click_secondary();
    step_until(&mut harness, "the VM's menu", |h| {
        h.query_by_label_contains("VM intranet on").is_some()
    });
    harness
        .query_all_by_role_and_label(Role::Button, "Stop")
        .max_by(|a, b| a.rect().left().total_cmp(&b.rect().left()))
        .unwrap()
        .click();
    step_for_until(&mut harness, 60, "the stop", |_| {
        vm_state(&data, "intranet") == "shutoff"
    });
    let stopped = counts(&data);
    assert_ne!(before, stopped);
    step_for_until(&mut harness, 60, "the stop, from the engine's feed", |h| {
        h.query_by_label(&stopped).is_some()
    });
    let audit = json(&ctl(&data, &["--json", "audit", "--operator", "olga"]));
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["operation"] == "vm-stop" && l["outcome"] == "ok"),
        "{audit:#}"
    );

    // A VM made with the New VM dialog, on the host selected: it appears on that agent.
    harness.get_by_role_and_label(Role::Button, "lsn-2").click();
    harness.step();
    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::N);
    step_until(&mut harness, "the New VM dialog", |h| {
        h.query_by_role_and_label(Role::TextInput, "Name")
            .is_some_and(|n| n.is_focused())
    });
    harness
        .get_by_role_and_label(Role::TextInput, "Name")
        .type_text("remote-1");
    harness.step();
    harness.get_by_label("Create").click();
    step_for_until(&mut harness, 60, "the new VM's chip", |h| {
        h.query_all_by_role_and_label(Role::Button, "remote-1")
            .next()
            .is_some()
    });
    assert_eq!(vm_host(&data, "remote-1"), "lsn-2");
    // Nothing selected: the host's details (which list its VMs too) close.
    harness.key_press(egui::Key::Escape);
    step_until(&mut harness, "the selection cleared", |h| {
        h.query_by_label("Host lsn-2").is_none()
    });

    // A drag to the other host of the site, confirmed: the VM runs there.
    let from = harness
        .get_by_role_and_label(Role::Button, "wiki")
        .rect()
        .center();
    let to = harness
        .get_by_role_and_label(Role::Button, "lsn-1")
        .rect()
        .center();
    drag_to(&mut harness, from, to);
    harness.drop_at(to);
    step_until(&mut harness, "the estimate", |h| {
        h.query_by_label("Migrate wiki to lsn-1?").is_some()
    });
    harness.get_by_label("Migrate").click();
    step_for_until(&mut harness, 120, "the migration done", |h| {
        h.query_by_label_contains("of wiki: done, it runs on lsn-1")
            .is_some()
    });
    assert_eq!(vm_host(&data, "wiki"), "lsn-1");
    let last = counts(&data);
    step_for_until(&mut harness, 60, "the counts after the migration", |h| {
        h.query_by_label(&last).is_some()
    });

    // A host's charts, read from the engine elsewhere, and exported here.
    harness.get_by_role_and_label(Role::Button, "lsn-1").click();
    step_until(&mut harness, "the host's details", |h| {
        h.query_by_label("Host lsn-1").is_some()
    });
    harness
        .get_by_role_and_label(Role::Button, "Statistics…")
        .click();
    step_for_until(&mut harness, 60, "the host's charts", |h| {
        h.query_by_label("Statistics of host lsn-1").is_some()
            && h.query_by_label("CPU use").is_some()
            && !h
                .get_by_role_and_label(Role::Button, "Export CSV")
                .accesskit_node()
                .is_disabled()
    });
    harness
        .get_by_role_and_label(Role::Button, "Export CSV")
        .click();
    step_until(&mut harness, "the export's path", |h| {
        h.query_by_label_contains("Exported to ").is_some()
    });
    let csv = std::fs::read_dir(dir.path().join("exports"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .next()
        .expect("an exported file in the window's own exports");
    assert!(csv.lines().any(|l| l.contains(",cpu,%,")), "{csv}");
    harness.key_press(egui::Key::Escape);
    step_until(&mut harness, "the charts closed", |h| {
        h.query_by_label("Statistics of host lsn-1").is_none()
    });

    // The engine goes away (its demo agents with it): the window says so and keeps what
    // it showed.
    drop(console);
    step_for_until(&mut harness, 60, "the lost-engine banner", |h| {
        h.query_by_label(&format!("Lost the engine at {listen}:"))
            .is_some()
    });
    assert!(
        harness.query_by_label(&last).is_some(),
        "the lost window keeps what it showed"
    );
    // Stopped gracefully, the engine said so to its sessions: the band gives its word, not a
    // silence (which would read "it stopped answering").
    assert!(
        harness.query_by_label("it was stopped").is_some(),
        "the band says why the link ended"
    );

    // The engine comes back on the same data dir and address, without the demo's agents:
    // the window reconnects by itself and catches up (the hosts are offline now).
    let _console = Console(
        Command::new(console_binary())
            .args(["--headless", "--operator-listen", &listen, "--data-dir"])
            .arg(&data)
            .stderr(std::fs::File::create(dir.path().join("console-again.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ctl(&data, &["hosts"]).status.success() {
        assert!(Instant::now() < deadline, "the engine did not come back");
        std::thread::sleep(Duration::from_millis(200));
    }
    step_for_until(&mut harness, 120, "the window caught up", |h| {
        h.query_by_label(&format!("Lost the engine at {listen}:"))
            .is_none()
            && h.query_by_label_contains("0/3 hosts online").is_some()
            && h.query_by_label_contains(&format!("at {listen} · operator olga"))
                .is_some()
    });
}
