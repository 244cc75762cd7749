//! A real VM: an agent on QEMU embedded through `qemu:///embed` boots the tiny guest (TCG),
//! the engine sees it running; a stop the guest ignores is forced after the timeout, and a
//! graceful stop of the booted guest shuts it off. The agent's data dir is given relative.
//!
//! Needs root and the guest from `assets/guest/build-tiny-guest.sh` in `DUNES_GUEST_DIR`
//! (`scripts/test.sh` provides both). Under CI a missing prerequisite fails the test.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

mod gui_support;

use dunes_console::engine::Command;
use dunes_shared::model::{TemplateName, VmName, VmSpec, VmState};
use dunes_tests::{AgentProcess, enroll_online, start_engine};

fn prerequisites() -> Option<PathBuf> {
    let guest = std::env::var_os("DUNES_GUEST_DIR").map(PathBuf::from);
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let missing = match (&guest, root) {
        (None, _) => Some(
            "DUNES_GUEST_DIR is not set (run scripts/test.sh, or build the guest with assets/guest/build-tiny-guest.sh)",
        ),
        (Some(dir), _) if !dir.join("vmlinuz").exists() => Some("DUNES_GUEST_DIR has no vmlinuz"),
        (_, false) => Some("qemu:///embed needs root"),
        _ => None,
    };
    match missing {
        None => guest,
        Some(why) if std::env::var_os("CI").is_some() => {
            panic!("the real-VM test cannot run: {why}")
        }
        Some(why) => {
            eprintln!("\n*** SKIPPING the real-VM test: {why} ***\n");
            None
        }
    }
}

/// QEMU outlives a killed agent by design; make sure none is left behind by this test.
struct KillQemu(PathBuf);

impl Drop for KillQemu {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pkill")
            .arg("-f")
            .arg(self.0.display().to_string())
            .status();
    }
}

/// An agent on QEMU (`qemu:///embed`) in `agent_dir`, with the tiny guest from `guest`.
fn qemu_agent(agent_dir: &std::path::Path, host_id: &str, guest: &std::path::Path) -> AgentProcess {
    AgentProcess::spawn_in(
        None,
        agent_dir,
        host_id,
        "lausanne",
        "qemu:///embed",
        "127.0.0.1:0",
        vec!["--guest-dir".into(), guest.display().to_string()],
    )
    .unwrap()
}

/// Creates and starts a VM of 1 vCPU and 256 MiB from `template`.
async fn create_started(
    engine: &dunes_console::engine::EngineHandle,
    host: &dunes_shared::model::HostId,
    name: &VmName,
    template: &str,
) -> dunes_shared::model::VmStatus {
    engine
        .request(|reply| Command::CreateVm {
            host: host.clone(),
            spec: VmSpec {
                name: name.clone(),
                template: TemplateName::new(template).unwrap(),
                vcpus: Some(1),
                memory_mib: Some(256),
            },
            start: true,
            reply,
        })
        .await
        .unwrap()
}

/// One real VM test at a time: two TCG guests at once on a small machine would stretch the
/// timings the first test checks.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_guest_boots_under_qemu_and_stops() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(guest) = prerequisites() else { return };
    let dir = tempfile::tempdir().unwrap();
    let agent_dir = dir.path().join("agent");
    let _cleanup = KillQemu(agent_dir.clone());
    // Given relative, as a new user types it: QEMU must still find the disk.
    let agent = AgentProcess::spawn_in(
        Some(dir.path()),
        std::path::Path::new("./agent"),
        "qemu-host",
        "lausanne",
        "qemu:///embed",
        "127.0.0.1:0",
        vec!["--guest-dir".into(), guest.display().to_string()],
    )
    .unwrap();
    let engine = start_engine(&dir.path().join("console")).await.unwrap();
    enroll_online(&engine, &agent).await.unwrap();
    let host = agent.host_id.clone();
    let inventory = engine
        .snapshot()
        .host(&host)
        .unwrap()
        .inventory()
        .cloned()
        .unwrap();
    assert_eq!(inventory.runtimes[0].driver, "QEMU");

    let name = VmName::new("tiny-1").unwrap();
    let vm = create_started(&engine, &host, &name, "tiny").await;
    assert_eq!(vm.state, VmState::Running);
    let created = Instant::now();
    // Its disk and its NIC as the details show them: a raw copy of the template, and a
    // virtio NIC on QEMU's user-mode network with the MAC libvirt gave it.
    let disks = vm.disks.clone().expect("the agent lists its disks");
    assert_eq!(disks.len(), 1, "{disks:?}");
    assert_eq!(disks[0].file, "tiny-1.img");
    let nics = vm.nics.clone().expect("the agent lists its NICs");
    assert_eq!(nics.len(), 1, "{nics:?}");
    assert_eq!(
        (nics[0].model.as_str(), nics[0].network.as_str()),
        ("virtio", "user-mode")
    );
    assert!(
        nics[0].mac.as_deref().is_some_and(|m| m.len() == 17),
        "{nics:?}"
    );

    // A guest that does not answer the power button is forced off after the agent's stop
    // timeout (20 s in the test agents' config). Pressed the moment QEMU starts, before the
    // guest kernel has set up ACPI (and before qemu-guest-agent could answer instead), the
    // press is lost: a guest that ignores it.
    let stopping = Instant::now();
    eprintln!("stop sent {:?} after the VM started", created.elapsed());
    let vm = engine
        .request(|reply| Command::StopVm {
            host: host.clone(),
            name: name.clone(),
            force: false,
            reply,
        })
        .await
        .unwrap();
    assert_eq!(vm.state, VmState::Shutoff);
    let took = stopping.elapsed();
    eprintln!("unanswered stop took {took:?}");
    let log = std::fs::read_to_string(agent_dir.join("agent.log")).unwrap_or_default();
    assert!(
        took >= Duration::from_secs(20) && log.contains("did not shut down in 20s, forcing it off"),
        "the stop was not forced after the timeout ({took:?}); agent log:\n{log}"
    );
    let started = Instant::now();
    engine
        .request(|reply| Command::StartVm {
            host: host.clone(),
            name: name.clone(),
            reply,
        })
        .await
        .unwrap();
    engine
        .wait_for(Duration::from_secs(1), |s| {
            s.find_vm("tiny-1")
                .is_ok_and(|(_, v)| v.state == VmState::Running)
        })
        .await
        .expect("the engine shows running");

    // The guest really boots: its init reports on the serial console.
    let console = agent_dir.join("storage/disks/tiny-1.console.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains("dunes-guest: ready") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest did not boot; console:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("guest ready {:?} after start", started.elapsed());

    // Its serial console through the engine: one viewer watches, `ctl vm console` types a
    // line from a pipe, as a script would, and both see the guest's shell answer it.
    let _ctl = dunes_console::ctl::serve(engine.clone()).await.unwrap();
    let client = dunes_console::api::EngineClient::InProcess(engine.clone());
    let watching = client
        .call(dunes_console::api::ops::ConsoleVm {
            vm: "tiny-1".into(),
            read_only: true,
        })
        .await
        .unwrap();
    assert!(!watching.typing);
    let mut watcher = watching.attach.unwrap();
    let data = dir.path().join("console");
    let typed = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut ctl = std::process::Command::new(dunes_tests::console_binary())
            .args(["ctl", "--data-dir"])
            .arg(&data)
            .args(["vm", "console", "tiny-1", "--linger-secs", "3"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A first line wakes the shell's prompt; the second is the command.
        ctl.stdin
            .take()
            .unwrap()
            .write_all(b"\necho hello-$((6*7))\n")
            .unwrap();
        ctl.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let shown = String::from_utf8_lossy(&typed.stdout);
    assert!(
        typed.status.success() && shown.contains("hello-42"),
        "ctl vm console: {}\nstdout:\n{shown}\nstderr:\n{}",
        typed.status,
        String::from_utf8_lossy(&typed.stderr)
    );
    let mut seen = String::from_utf8_lossy(&watcher.backlog).into_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.contains("hello-42") {
        assert!(
            Instant::now() < deadline,
            "the watcher did not see it:\n{seen}"
        );
        if let Ok(Ok(bytes)) =
            tokio::time::timeout(Duration::from_secs(1), watcher.output.recv()).await
        {
            seen.push_str(&String::from_utf8_lossy(&bytes));
        }
    }
    drop(watcher);

    // Through the operator endpoint: an operator's console works as the local one, a
    // viewer's is refused.
    let endpoint =
        dunes_console::api::remote::serve(engine.clone(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
    let credential = |name: &str, role: &str| {
        let operator = dunes_shared::model::OperatorName::new(name).unwrap();
        let key_pem = dunes_shared::pki::generate_key_pem().unwrap();
        let csr = dunes_shared::pki::operator_csr(&key_pem, &operator).unwrap();
        let client = client.clone();
        let role = role.to_string();
        let engine_address = endpoint.address.to_string();
        let file = dir.path().join(format!("{name}.toml"));
        async move {
            let issued = client
                .add_operator(dunes_console::api::ops::AddOperator {
                    name: operator.to_string(),
                    role,
                    scopes: Vec::new(),
                    csr_pem: pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", csr)),
                    consoles: None,
                })
                .await
                .unwrap();
            dunes_console::api::credential::Credential {
                operator,
                engine: engine_address,
                key_pem,
                certificate_pem: issued.certificate_pem,
                ca_pem: issued.ca_pem,
            }
            .write(&file)
            .unwrap();
            file
        }
    };
    let olga = credential("olga", "operator").await;
    let olga_file = olga.clone();
    let vera = credential("vera", "viewer").await;
    let remote_console = |file: PathBuf, typed: &'static [u8]| {
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut ctl = std::process::Command::new(dunes_tests::console_binary())
                .args(["ctl", "--connect"])
                .arg(&file)
                .args(["vm", "console", "tiny-1", "--linger-secs", "3"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            ctl.stdin.take().unwrap().write_all(typed).unwrap();
            ctl.wait_with_output().unwrap()
        })
    };
    let typed = remote_console(olga, b"echo far-$((7*8))\n").await.unwrap();
    let shown = String::from_utf8_lossy(&typed.stdout);
    assert!(
        typed.status.success() && shown.contains("far-56"),
        "ctl --connect vm console: {}\nstdout:\n{shown}\nstderr:\n{}",
        typed.status,
        String::from_utf8_lossy(&typed.stderr)
    );
    let refused = remote_console(vera.clone(), b"reboot\n").await.unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && said
                .contains("viewer vera may not open VM consoles: they have no console permission"),
        "{said}"
    );

    // The window's console: Console… in the VM's details opens it, the terminal has the
    // focus, and what is typed there runs in the guest's shell.
    {
        use egui_kittest::kittest::Queryable as _;
        let mut harness = gui_support::window(&engine);
        gui_support::step_until(&mut harness, "the VM's chip", |h| {
            h.query_by_role_and_label(egui::Role::Button, "tiny-1")
                .is_some()
        });
        harness
            .get_by_role_and_label(egui::Role::Button, "tiny-1")
            .click();
        gui_support::step_until(&mut harness, "the VM's details", |h| {
            h.query_by_role_and_label(egui::Role::Button, "Console…")
                .is_some()
        });
        harness
            .get_by_role_and_label(egui::Role::Button, "Console…")
            .click();
        gui_support::step_until(&mut harness, "the console's terminal", |h| {
            h.state().console_screen().is_some()
        });
        harness
            .input_mut()
            .events
            .push(egui::Event::Text("echo hi-$((5*5))".into()));
        harness.key_press(egui::Key::Enter);
        gui_support::step_until(&mut harness, "the guest's answer on the terminal", |h| {
            h.state()
                .console_screen()
                .is_some_and(|screen| screen.contains("hi-25"))
        });

        // The VM's screen: a thumbnail of it in the VM's details; Screen… opens it, a
        // picture comes (the guest's shell on its first virtual terminal), and what is typed
        // there changes it by far more than the blinking cursor does.
        gui_support::step_until(&mut harness, "the screen's thumbnail in the details", |h| {
            h.query_by_label("The VM's screen").is_some()
        });
        harness
            .get_by_role_and_label(egui::Role::Button, "Screen…")
            .click();
        gui_support::step_until(&mut harness, "a picture of the screen", |h| {
            h.state()
                .screen_picture()
                .is_some_and(|(_, has_content)| has_content)
        });
        let before = harness.state().screen_frame().unwrap();
        harness
            .input_mut()
            .events
            .push(egui::Event::Text("echo typed-on-the-screen".into()));
        harness.key_press(egui::Key::Enter);
        gui_support::step_until(&mut harness, "the screen after typing", |h| {
            h.state().screen_frame().is_some_and(|after| {
                after.width == before.width
                    && after.height == before.height
                    && after
                        .rgba
                        .chunks_exact(4)
                        .zip(before.rgba.chunks_exact(4))
                        .filter(|(a, b)| a != b)
                        .count()
                        > 1000
            })
        });
    }

    // A window through --connect (olga's): its console's bytes come on a stream of their
    // own, and what is typed there runs in the guest's shell too.
    {
        use egui_kittest::kittest::Queryable as _;
        let link = dunes_console::ui::EngineLink::connect(&olga_file, dir.path().join("exports"))
            .await
            .unwrap();
        let mut harness = egui_kittest::Harness::builder()
            .with_size([1400.0, 900.0])
            .build_eframe(move |cc| dunes_console::ui::ConsoleApp::with_link(&cc.egui_ctx, link));
        gui_support::step_until(&mut harness, "the VM's chip", |h| {
            h.query_by_role_and_label(egui::Role::Button, "tiny-1")
                .is_some()
        });
        harness
            .get_by_role_and_label(egui::Role::Button, "tiny-1")
            .click();
        gui_support::step_until(&mut harness, "the VM's details", |h| {
            h.query_by_role_and_label(egui::Role::Button, "Console…")
                .is_some()
        });
        harness
            .get_by_role_and_label(egui::Role::Button, "Console…")
            .click();
        gui_support::step_until(&mut harness, "the console's terminal", |h| {
            h.state().console_screen().is_some()
        });
        harness
            .input_mut()
            .events
            .push(egui::Event::Text("echo remote-$((9*9))".into()));
        harness.key_press(egui::Key::Enter);
        gui_support::step_until(&mut harness, "the guest's answer through --connect", |h| {
            h.state()
                .console_screen()
                .is_some_and(|screen| screen.contains("remote-81"))
        });
        // The screen too: its pictures come as PNGs on a stream of their own, and keys go
        // back the same way.
        harness
            .get_by_role_and_label(egui::Role::Button, "Screen…")
            .click();
        gui_support::step_until(
            &mut harness,
            "a picture of the screen through --connect",
            |h| {
                h.state()
                    .screen_picture()
                    .is_some_and(|(_, has_content)| has_content)
            },
        );
        let before = harness.state().screen_frame().unwrap();
        harness
            .input_mut()
            .events
            .push(egui::Event::Text("echo typed-from-afar".into()));
        harness.key_press(egui::Key::Enter);
        gui_support::step_until(
            &mut harness,
            "the screen after typing through --connect",
            |h| {
                h.state().screen_frame().is_some_and(|after| {
                    after.width == before.width
                        && after.height == before.height
                        && after
                            .rgba
                            .chunks_exact(4)
                            .zip(before.rgba.chunks_exact(4))
                            .filter(|(a, b)| a != b)
                            .count()
                            > 1000
                })
            },
        );
    }

    // A screenshot through ctl: a PNG of the screen's size.
    let shot = dir.path().join("shot.png");
    let taken = std::process::Command::new(dunes_tests::console_binary())
        .args(["ctl", "--data-dir"])
        .arg(dir.path().join("console"))
        .args(["vm", "screenshot", "tiny-1", "--out"])
        .arg(&shot)
        .output()
        .unwrap();
    assert!(
        taken.status.success(),
        "ctl vm screenshot: {}",
        String::from_utf8_lossy(&taken.stderr)
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    let said = String::from_utf8_lossy(&taken.stdout);
    assert!(
        width >= 320 && height >= 200 && said.contains(&format!("{width}×{height}")),
        "{width}×{height}: {said}"
    );
    // A viewer sees no screen.
    let refused = std::process::Command::new(dunes_tests::console_binary())
        .args(["ctl", "--connect"])
        .arg(&vera)
        .args(["vm", "screenshot", "tiny-1", "--out"])
        .arg(dir.path().join("vera.png"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && said.contains("viewer vera may not see VM screens: they have no console permission")
            && !dir.path().join("vera.png").exists(),
        "{said}"
    );
    // Each session is in the audit log: opened, and ended with how long it lasted (the
    // window's when it let go of them, which is recorded as the window closes).
    let expected = [
        ("vm-console", "local", "session ended after"),
        ("vm-console", "olga", "session ended after"),
        (
            "vm-console",
            "vera",
            "refused: viewer vera may not open VM consoles",
        ),
        ("vm-screen", "local", "session ended after"),
        ("vm-screen", "olga", "session ended after"),
        ("vm-screenshot", "local", "ok"),
        (
            "vm-screenshot",
            "vera",
            "refused: viewer vera may not see VM screens",
        ),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let records: Vec<String> = client
            .call(dunes_console::api::ops::ListAudit {
                since_secs: None,
                operator: None,
            })
            .await
            .unwrap()
            .into_iter()
            .map(|r| format!("{} {}: {}", r.operation, r.operator, r.outcome))
            .collect();
        let missing: Vec<_> = expected
            .iter()
            .filter(|(op, who, outcome)| {
                !records
                    .iter()
                    .any(|r| r.starts_with(&format!("{op} {who}: {outcome}")))
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "{missing:?} in {records:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Graceful stop: the guest powers off by itself, well before the forced-off timeout.
    let stopping = Instant::now();
    let vm = engine
        .request(|reply| Command::StopVm {
            host: host.clone(),
            name: name.clone(),
            force: false,
            reply,
        })
        .await
        .unwrap();
    assert_eq!(vm.state, VmState::Shutoff);
    eprintln!("graceful stop took {:?}", stopping.elapsed());
    assert!(
        stopping.elapsed() < Duration::from_secs(20),
        "the stop was forced, not graceful"
    );
    engine
        .wait_for(Duration::from_secs(1), |s| {
            s.find_vm("tiny-1")
                .is_ok_and(|(_, v)| v.state == VmState::Shutoff)
        })
        .await
        .expect("the engine shows shutoff");
    // A console on a stopped VM: one line, nothing opened.
    let refused = std::process::Command::new(dunes_tests::console_binary())
        .args(["ctl", "--data-dir"])
        .arg(dir.path().join("console"))
        .args(["vm", "console", "tiny-1"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && said.trim().lines().count() == 1
            && said.contains("VM tiny-1 is shutoff: start it to open its console"),
        "{said}"
    );

    engine
        .request(|reply| Command::DeleteVm {
            host: host.clone(),
            name: name.clone(),
            reply,
        })
        .await
        .unwrap();
    assert!(!agent_dir.join("storage/disks/tiny-1.img").exists());

    // A service application on the tiny guest: its start returns once the guest agent
    // answers, which is after the guest has booted.
    let source = "name = \"svc\"\n[[application]]\nname = \"app\"\nruntime = \"libvirt\"\ntemplate = \"tiny\"\nvcpus = 1\nmemory_mib = 256\nreadiness = \"guest-agent\"\n";
    let service = engine
        .request(|reply| Command::DefineService {
            source: source.into(),
            replace: false,
            reply,
        })
        .await
        .unwrap();
    let deployed = engine
        .request(|reply| Command::DeployService {
            name: service.clone(),
            fingerprint: None,
            overrides: Vec::new(),
            reply,
        })
        .await
        .unwrap();
    assert!(deployed.failed.is_empty(), "{deployed:?}");
    let starting = Instant::now();
    let started = engine
        .request(|reply| Command::StartService {
            name: service.clone(),
            reply,
        })
        .await
        .unwrap();
    eprintln!(
        "service start with guest-agent readiness took {:?}",
        starting.elapsed()
    );
    assert_eq!(started.done[0].2, "running, ready", "{started:?}");
    let booted = std::fs::read_to_string(agent_dir.join("storage/disks/svc-app-0.console.log"))
        .unwrap_or_default();
    // The guest's init starts its guest agent last, after this line.
    assert!(
        booted.contains("dunes-guest: httpd started"),
        "the start returned before the guest had booted:\n{booted}"
    );
    let deleted = engine
        .request(|reply| Command::DeleteService {
            name: service,
            reply,
        })
        .await
        .unwrap();
    assert!(deleted.failed.is_empty(), "{deleted:?}");
    assert!(!agent_dir.join("storage/disks/svc-app-0.img").exists());
}

/// Waits for `needle` on a guest's serial console (its log file), and returns the line.
async fn console_line(path: &std::path::Path, needle: &str, after: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = text.lines().skip(after).find(|l| l.contains(needle)) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no \"{needle}\" on {}:\n{text}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A tiny guest under QEMU migrates between two agents in two network namespaces joined by
/// veth: the mark the guest wrote on its disk at its first boot is read back by the guest
/// when it boots on the other host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_guest_migrates_between_two_namespaces_with_its_data() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(guest) = prerequisites() else { return };
    let lab = match dunes_tests::netns::unavailable() {
        None => dunes_tests::netns::Lab::new(2).unwrap(),
        Some(why) if std::env::var_os("CI").is_some() => panic!("no lab: {why}"),
        Some(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = KillQemu(dir.path().to_path_buf());
    let agent = |i: usize, name: &str| {
        AgentProcess::spawn_in_netns(
            &lab.hosts[i].netns,
            &dir.path().join(name),
            name,
            "qemu:///embed",
            &format!("{}:0", lab.hosts[i].ip),
            vec!["--guest-dir".into(), guest.display().to_string()],
        )
        .unwrap()
    };
    let source = agent(0, "qemu-a");
    let target = agent(1, "qemu-b");
    let engine = start_engine(&dir.path().join("console")).await.unwrap();
    for a in [&source, &target] {
        enroll_online(&engine, a).await.unwrap();
    }
    let name = VmName::new("wanderer").unwrap();
    engine
        .request(|reply| Command::CreateVm {
            host: source.host_id.clone(),
            spec: VmSpec {
                name: name.clone(),
                template: TemplateName::new("tiny").unwrap(),
                vcpus: Some(1),
                memory_mib: Some(256),
            },
            start: true,
            reply,
        })
        .await
        .unwrap();
    let disks = |a: &AgentProcess| a.data_dir.canonicalize().unwrap().join("storage/disks");
    let first = console_line(
        &disks(&source).join("wanderer.console.log"),
        "dunes-guest: marker written",
        0,
    )
    .await;
    let mark = first.rsplit(' ').next().unwrap().trim().to_string();
    console_line(
        &disks(&source).join("wanderer.console.log"),
        "dunes-guest: ready",
        0,
    )
    .await;
    let started = Instant::now();
    let journal = engine
        .request(|reply| Command::MigrateVm {
            host: source.host_id.clone(),
            vm: name.clone(),
            to: target.host_id.clone(),
            options: Default::default(),
            reply,
        })
        .await
        .unwrap();
    let done = engine
        .wait_for(Duration::from_secs(300), |s| {
            s.migrations
                .iter()
                .any(|m| m.id == journal.id && m.step.is_finished())
        })
        .await
        .unwrap_or_else(|s| panic!("the migration never ended: {:?}", s.migrations));
    let m = done.migrations.iter().find(|m| m.id == journal.id).unwrap();
    assert_eq!(
        m.step,
        dunes_console::engine::migration::MigrationStep::SourceDeleted,
        "{m:?}"
    );
    eprintln!(
        "migrated in {:?}: {} bytes over the veth link",
        started.elapsed(),
        m.bytes_total
    );
    let found = console_line(
        &disks(&target).join("wanderer.console.log"),
        "dunes-guest: marker found",
        0,
    )
    .await;
    assert!(
        found.ends_with(&mark),
        "the guest read {found:?}, it wrote {mark:?}"
    );
    assert!(!disks(&source).join("wanderer.img").exists());

    // Its NIC came along (QEMU's user-mode network): what it sends goes out through the QEMU
    // process's sockets, which the agent measures. To the other host of its site it stays
    // in the site; to the bridge (not a host of the site) it leaves it.
    vm_traffic_is_split_at_the_site_edge(&engine, &lab, &target, &name).await;

    engine
        .request(|reply| Command::StopVm {
            host: target.host_id.clone(),
            name: name.clone(),
            force: true,
            reply,
        })
        .await
        .unwrap();
    // A forced stop may answer while QEMU is still going away: the clone wants it at rest.
    engine
        .wait_for(Duration::from_secs(60), |s| {
            s.find_vm("wanderer")
                .is_ok_and(|(_, v)| v.state == VmState::Shutoff)
        })
        .await
        .expect("wanderer shut off");

    // A clone to the other host: copied beside the original, then carried to the source
    // host by the disk transfer; the two disks hold the same bytes.
    let copy_name = VmName::new("wanderer-2").unwrap();
    let copy = engine
        .request(|reply| Command::CloneVm {
            host: target.host_id.clone(),
            name: name.clone(),
            new_name: copy_name.clone(),
            to: Some(source.host_id.clone()),
            reply,
        })
        .await
        .unwrap();
    let id = copy.migration.expect("the copy migrates").id;
    let moved = engine
        .wait_for(Duration::from_secs(300), |s| {
            s.migrations
                .iter()
                .any(|m| m.id == id && m.step.is_finished())
        })
        .await
        .unwrap_or_else(|s| panic!("the copy's migration never ended: {:?}", s.migrations));
    let m = moved.migrations.iter().find(|m| m.id == id).unwrap();
    assert_eq!(
        m.step,
        dunes_console::engine::migration::MigrationStep::SourceDeleted,
        "{m:?}"
    );
    assert!(
        moved
            .host(&source.host_id)
            .unwrap()
            .vm(&copy_name)
            .is_some()
    );
    assert!(
        std::fs::read(disks(&target).join("wanderer.img")).unwrap()
            == std::fs::read(disks(&source).join("wanderer-2.img")).unwrap(),
        "the copy's disk on the source host differs from the original's"
    );
    assert!(!disks(&target).join("wanderer-2.img").exists());
    drop(source);
    drop(target);
    drop(lab);
}

/// The guest (on host 1 of `lab`) sends 150 KiB a second to host 0, in its site, and 50 KiB
/// a second to the lab's bridge, outside it; a quarter of what it sends must count as leaving.
async fn vm_traffic_is_split_at_the_site_edge(
    engine: &dunes_console::engine::EngineHandle,
    lab: &dunes_tests::netns::Lab,
    agent: &AgentProcess,
    vm: &VmName,
) {
    const PORT: u16 = 9097;
    const IN_SITE_KIB: u64 = 150;
    const OUT_OF_SITE_KIB: u64 = 50;
    // Each sender keeps its connection open (a closing one's last second is not counted);
    // nc is retried until its sink listens: a refused nc exits, the next dd into its pipe
    // fails, and that ends the pipeline.
    let sender = |ip: &str, kb: u64| {
        format!(
            "(while :; do (while dd if=/dev/zero bs=1k count={kb} 2>/dev/null; do sleep 1; done) \
             | nc {ip} {PORT}; sleep 1; done) </dev/null >/dev/null 2>&1 &"
        )
    };
    let command = format!(
        "{} {}",
        sender(&lab.hosts[0].ip, IN_SITE_KIB),
        sender(&lab.bridge_ip(), OUT_OF_SITE_KIB)
    );
    // The guest agent answers a little after the guest has booted.
    let deadline = Instant::now() + Duration::from_secs(120);
    let started = loop {
        let answer = engine
            .request(|reply| Command::GuestExec {
                host: agent.host_id.clone(),
                name: vm.clone(),
                command: command.clone(),
                timeout_secs: 30,
                reply,
            })
            .await;
        match answer {
            Ok(started) => break started,
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => panic!("the guest agent never ran the senders: {e}"),
        }
    };
    assert_eq!(started.exit_code, Some(0), "{started:?}");
    // The sinks listen only now, so that the senders' retries are tried every run.
    let _sinks = [
        dunes_tests::netns::sink(Some(&lab.hosts[0].netns), PORT).unwrap(),
        dunes_tests::netns::sink(None, PORT).unwrap(),
    ];
    let deadline = Instant::now() + Duration::from_secs(180);
    let (all, out) = loop {
        let (all, out) = dunes_tests::sent_and_out_of_site(engine, vm).await.unwrap();
        if out >= 12.0 * (OUT_OF_SITE_KIB * 1024) as f64 {
            break (all, out);
        }
        if Instant::now() > deadline {
            // What the guest itself says about its network and its senders.
            let inside = engine
                .request(|reply| Command::GuestExec {
                    host: agent.host_id.clone(),
                    name: vm.clone(),
                    command: "ip -o addr; ip route; ps".into(),
                    timeout_secs: 10,
                    reply,
                })
                .await;
            let log = agent
                .data_dir
                .canonicalize()
                .map(|d| d.join(format!("storage/disks/{vm}.console.log")))
                .and_then(std::fs::read_to_string)
                .unwrap_or_default();
            panic!(
                "not enough of the VM's traffic measured: {all} B sent, {out} B out of the \
                 site; in the guest: {inside:?}; its console: {log}"
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let share = out / all;
    eprintln!("the VM sent {all} B, {out} B of it out of its site");
    assert!(
        (0.15..0.35).contains(&share),
        "{out} of {all} B counted as leaving the site"
    );
}

/// The applications inside a tiny guest (its httpd and its worker), seen through the guest
/// agent: both up, with their processes' memory in the statistics; the worker killed inside
/// the guest, the service becomes degraded while the VM and its web server go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applications_inside_a_tiny_guest_are_watched_and_a_killed_one_degrades_the_service() {
    use dunes_console::engine::{
        ServiceStatus,
        services::guest_apps::GuestAppState,
        statistics::series::{Metric, Subject},
    };
    use dunes_shared::model::{AppName, ServiceName};

    let _one = ONE_AT_A_TIME.lock().await;
    let Some(guest) = prerequisites() else { return };
    let dir = tempfile::tempdir().unwrap();
    let agent_dir = dir.path().join("agent");
    let _cleanup = KillQemu(agent_dir.clone());
    let agent = qemu_agent(&agent_dir, "qemu-inside", &guest);
    let engine = start_engine(&dir.path().join("console")).await.unwrap();
    enroll_online(&engine, &agent).await.unwrap();
    let host = agent.host_id.clone();
    let source = r#"name = "inside"

[[application]]
name = "box"
runtime = "libvirt"
template = "tiny"
vcpus = 1
memory_mib = 256
readiness = "guest-agent"

[[application.guest_app]]
name = "web"
process = "httpd"
check = "wget -q -O /dev/null http://127.0.0.1:8080/"

[[application.guest_app]]
name = "worker"
process = "worker"
"#;
    let service = engine
        .request(|reply| Command::DefineService {
            source: source.into(),
            replace: false,
            reply,
        })
        .await
        .unwrap();
    let deployed = engine
        .request(|reply| Command::DeployService {
            name: service.clone(),
            fingerprint: None,
            overrides: Vec::new(),
            reply,
        })
        .await
        .unwrap();
    assert!(deployed.failed.is_empty(), "{deployed:?}");
    let started = engine
        .request(|reply| Command::StartService {
            name: service.clone(),
            reply,
        })
        .await
        .unwrap();
    assert_eq!(started.done[0].2, "running, ready", "{started:?}");
    let view = |s: &dunes_console::engine::Snapshot| {
        s.services.iter().find(|v| v.name() == &service).cloned()
    };
    let states = |s: &dunes_console::engine::Snapshot| {
        view(s)
            .map(|v| {
                v.instances
                    .iter()
                    .flat_map(|i| i.guest_apps.iter().map(|g| (g.name.to_string(), g.state)))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    // Both up, and the service available: seen through the guest agent.
    let up = engine
        .wait_for(Duration::from_secs(120), |s| {
            states(s)
                == [
                    ("web".to_string(), GuestAppState::Up),
                    ("worker".to_string(), GuestAppState::Up),
                ]
                && view(s).is_some_and(|v| v.status == ServiceStatus::Available)
        })
        .await
        .unwrap_or_else(|s| panic!("never both up: {:?}", view(&s).map(|v| v.instances.clone())));
    let box0 = &view(&up).unwrap().instances[0];
    let web = &box0.guest_apps[0];
    assert_eq!(web.detail, "process httpd runs; check passed", "{web:?}");
    assert!(web.memory_mib.is_some_and(|m| m > 0.0), "{web:?}");
    let vm = box0.record.vm.clone();

    // A command in the guest, as `ctl vm exec` runs it: the worker has been counting.
    let count = engine
        .request(|reply| Command::GuestExec {
            host: host.clone(),
            name: vm.clone(),
            command: "cat /run/worker.count".into(),
            timeout_secs: 10,
            reply,
        })
        .await
        .unwrap();
    assert_eq!(count.exit_code, Some(0), "{count:?}");
    assert!(
        count.stdout.trim().parse::<u64>().is_ok_and(|n| n > 0),
        "{count:?}"
    );
    let failing = engine
        .request(|reply| Command::GuestExec {
            host: host.clone(),
            name: vm.clone(),
            command: "echo oops >&2; exit 3".into(),
            timeout_secs: 10,
            reply,
        })
        .await
        .unwrap();
    assert_eq!(
        (failing.exit_code, failing.stderr.as_str()),
        (Some(3), "oops\n")
    );

    // An autoscaling rule on an application inside the VMs watches its CPU in the guest
    // (and would scale the VMs holding it).
    use dunes_console::engine::autoscale::{AutoscaleMetric, AutoscaleRule};
    engine
        .request(|reply| Command::SetAutoscale {
            service: service.clone(),
            app: AppName::new("web").unwrap(),
            rule: Some(AutoscaleRule {
                metric: AutoscaleMetric::Cpu,
                scale_out_above: 90.0,
                scale_in_below: 1.0,
                period_secs: 5,
                periods: 1,
                cooldown_secs: 0,
                min_instances: 1,
                max_instances: 1,
            }),
            reply,
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let reason = loop {
        let shown = engine
            .request(|reply| Command::AutoscaleShow { reply })
            .await
            .unwrap();
        if let Some(reason) = shown[0]
            .last_reason
            .clone()
            .filter(|r| r.contains("web cpu mean"))
        {
            break reason;
        }
        assert!(Instant::now() < deadline, "never measured: {shown:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        reason.contains("but it has its minimum 1 instances") || reason.contains("within"),
        "{reason}"
    );

    // The worker killed inside the guest: down, and the service degraded; web goes on.
    let killed = engine
        .request(|reply| Command::GuestExec {
            host: host.clone(),
            name: vm.clone(),
            command: "kill $(pidof worker)".into(),
            timeout_secs: 10,
            reply,
        })
        .await
        .unwrap();
    assert_eq!(killed.exit_code, Some(0), "{killed:?}");
    let degraded = engine
        .wait_for(Duration::from_secs(60), |s| {
            states(s)
                == [
                    ("web".to_string(), GuestAppState::Up),
                    ("worker".to_string(), GuestAppState::Down),
                ]
                && view(s).is_some_and(|v| v.status == ServiceStatus::Degraded)
        })
        .await
        .unwrap_or_else(|s| {
            panic!(
                "never degraded: {:?}",
                view(&s).map(|v| v.instances.clone())
            )
        });
    let worker = &view(&degraded).unwrap().instances[0].guest_apps[1];
    assert_eq!(worker.detail, "no process worker runs");

    // The applications' own statistics, from the guest's /proc.
    let answer = engine
        .request(|reply| Command::Stats {
            subject: Subject::Application(
                ServiceName::new("inside").unwrap(),
                AppName::new("web").unwrap(),
            ),
            since_secs: 600,
            resolution_secs: Some(1),
            reply,
        })
        .await
        .unwrap();
    let memory = answer
        .series
        .iter()
        .find(|s| s.metric == Metric::Memory)
        .map(|s| s.points.clone())
        .unwrap_or_default();
    assert!(
        memory.len() >= 2 && memory.iter().all(|b| b.max > 0.0),
        "{answer:?}"
    );

    let deleted = engine
        .request(|reply| Command::DeleteService {
            name: service,
            reply,
        })
        .await
        .unwrap();
    assert!(deleted.failed.is_empty(), "{deleted:?}");
}

/// A tiny guest on a qcow2 overlay under QEMU: its guest agent reports its address; it
/// pauses, resumes and reboots; more memory asked while it runs waits for its next start; a
/// snapshot of it running is taken, reverted to (the guest's memory goes back: a file written
/// since in its RAM-backed /tmp is gone) and deleted; a stopped copy of it has the same
/// bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_guest_on_an_overlay_reboots_is_resized_snapshotted_cloned_and_shows_its_address() {
    use dunes_shared::protocol::{PowerAction, SnapshotAction};
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(guest) = prerequisites() else { return };
    let dir = tempfile::tempdir().unwrap();
    let agent_dir = dir.path().join("agent");
    let _cleanup = KillQemu(agent_dir.clone());
    let agent = qemu_agent(&agent_dir, "qemu-host", &guest);
    // An overlay template over the tiny guest's files: its VMs get qcow2 disks.
    let images = agent_dir.join("storage/images");
    std::fs::create_dir_all(images.join("tiny-cow")).unwrap();
    for file in ["vmlinuz", "initrd.img", "disk.img"] {
        std::fs::copy(
            images.join("tiny").join(file),
            images.join("tiny-cow").join(file),
        )
        .unwrap();
    }
    let manifest = std::fs::read_to_string(images.join("tiny/template.toml")).unwrap();
    assert!(manifest.contains("overlay = false"), "{manifest}");
    std::fs::write(
        images.join("tiny-cow/template.toml"),
        manifest.replace("overlay = false", "overlay = true"),
    )
    .unwrap();
    let engine = start_engine(&dir.path().join("console")).await.unwrap();
    enroll_online(&engine, &agent).await.unwrap();
    let host = agent.host_id.clone();
    let name = VmName::new("cow-1").unwrap();
    let vm = create_started(&engine, &host, &name, "tiny-cow").await;
    assert_eq!(
        vm.disks.as_deref().map(|d| d[0].format),
        Some(dunes_shared::model::DiskImageFormat::Qcow2)
    );
    console_line(
        &agent_dir.join("storage/disks/cow-1.console.log"),
        "dunes-guest: ready",
        0,
    )
    .await;
    let exec = |command: &str| {
        let command = command.to_string();
        engine.request(|reply| Command::GuestExec {
            host: host.clone(),
            name: name.clone(),
            command,
            timeout_secs: 10,
            reply,
        })
    };

    // Its address, from its guest agent, in its status.
    engine
        .wait_for(Duration::from_secs(60), |s| {
            s.find_vm("cow-1").is_ok_and(|(_, v)| {
                v.addresses
                    .as_ref()
                    .is_some_and(|a| a.iter().any(|a| a == "10.0.2.15/24"))
            })
        })
        .await
        .expect("the guest's address in its status");

    let power = |action| {
        let (host, name) = (host.clone(), name.clone());
        engine.request(move |reply| Command::PowerVm {
            host,
            name,
            action,
            reply,
        })
    };
    assert_eq!(
        power(PowerAction::Pause).await.unwrap().state,
        VmState::Paused
    );
    assert_eq!(
        power(PowerAction::Resume).await.unwrap().state,
        VmState::Running
    );
    // A reboot: the guest stops in order and boots again in the same QEMU.
    let log = agent_dir.join("storage/disks/cow-1.console.log");
    // Whole lines only: the shell's prompt waits on a line the guest's next words end.
    let before = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .matches('\n')
        .count();
    assert_eq!(
        power(PowerAction::Reboot).await.unwrap().state,
        VmState::Running
    );
    console_line(&log, "dunes-guest: stopping (reboot)", before).await;
    console_line(&log, "dunes-guest: ready", before).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while exec("true").await.is_err() {
        assert!(Instant::now() < deadline, "no guest agent after the reboot");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // More memory while it runs: at its next start.
    let configured = engine
        .request(|reply| Command::ConfigureVm {
            host: host.clone(),
            name: name.clone(),
            vcpus: None,
            memory_mib: Some(320),
            autostart: None,
            eject_cdrom: false,
            reply,
        })
        .await
        .unwrap();
    assert!(configured.at_next_start);
    assert_eq!(configured.status.memory_mib, 256);
    assert_eq!(
        configured.status.next_start.map(|r| r.memory_mib),
        Some(320)
    );

    let snapshot = |action, snapshot: Option<&str>| {
        let snapshot = snapshot.map(str::to_string);
        let (host, name) = (host.clone(), name.clone());
        engine.request(move |reply| Command::SnapshotVm {
            host,
            name,
            action,
            snapshot,
            reply,
        })
    };
    let taken = Instant::now();
    let listed = snapshot(SnapshotAction::Create, Some("before"))
        .await
        .unwrap();
    eprintln!("snapshot of the running guest took {:?}", taken.elapsed());
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        (listed[0].name.as_str(), listed[0].state, listed[0].current),
        ("before", VmState::Running, true)
    );
    assert!(
        listed[0].memory_state_bytes.is_some_and(|b| b > 0),
        "{listed:?}"
    );
    assert!(listed[0].created_unix_secs > 1_700_000_000);
    let taken_again = snapshot(SnapshotAction::Create, Some("before"))
        .await
        .unwrap_err();
    assert!(
        taken_again
            .to_string()
            .contains("has a snapshot named before already"),
        "{taken_again}"
    );
    let long = "x".repeat(65);
    assert!(snapshot(SnapshotAction::Create, Some(&long)).await.is_err());
    assert_eq!(snapshot(SnapshotAction::List, None).await.unwrap().len(), 1);

    let written = exec("echo after > /tmp/marker && cat /tmp/marker")
        .await
        .unwrap();
    assert_eq!(written.exit_code, Some(0), "{written:?}");
    snapshot(SnapshotAction::Revert, Some("before"))
        .await
        .unwrap();
    // The guest's memory is the snapshot's again: its agent answers, without the file.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match exec("test -e /tmp/marker").await {
            Ok(r) if r.exit_code == Some(1) => break,
            Ok(r) => panic!("the file written after the snapshot is still there: {r:?}"),
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no guest agent after the revert: {e}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    // A VM with snapshots is not cloned (its disk carries them).
    let stop = |force| {
        let (host, name) = (host.clone(), name.clone());
        engine.request(move |reply| Command::StopVm {
            host,
            name,
            force,
            reply,
        })
    };
    stop(true).await.unwrap();
    assert!(
        snapshot(SnapshotAction::Delete, Some("before"))
            .await
            .unwrap()
            .is_empty()
    );
    let vm = engine
        .wait_for(Duration::from_secs(10), |s| {
            s.find_vm("cow-1")
                .is_ok_and(|(_, v)| v.state == VmState::Shutoff && v.snapshots == Some(0))
        })
        .await
        .expect("cow-1 off without snapshots");
    let (_, vm) = vm.find_vm("cow-1").unwrap();
    assert_eq!((vm.memory_mib, vm.next_start), (320, None));

    let copy = engine
        .request(|reply| Command::CloneVm {
            host: host.clone(),
            name: name.clone(),
            new_name: VmName::new("cow-2").unwrap(),
            to: None,
            reply,
        })
        .await
        .unwrap();
    assert_eq!(
        (copy.status.memory_mib, copy.status.state),
        (320, VmState::Shutoff)
    );
    let disks = agent_dir.join("storage/disks");
    assert!(
        std::fs::read(disks.join("cow-1.qcow2")).unwrap()
            == std::fs::read(disks.join("cow-2.qcow2")).unwrap(),
        "the copy's overlay differs"
    );
    let nic = |v: &dunes_shared::model::VmStatus| v.nics.clone().unwrap()[0].mac.clone();
    assert_ne!(nic(&copy.status), nic(&vm), "the copy has a MAC of its own");
}
