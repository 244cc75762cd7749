//! A real operating system: a Debian 12 disk image built from Debian's packages
//! (`assets/guest/build-debian-image.sh`, cached under `target/`) is imported through ctl,
//! pushed to a second agent, and booted under QEMU from a qcow2 overlay on that host's copy.
//! cloud-init sets its host name and makes a user with an SSH key and a password, who logs
//! in through `ctl vm console`, as an operator would, and runs `hostname` and
//! `cloud-init status`.
//!
//! Needs root and the image in `DUNES_DEBIAN_DIR` (`scripts/test.sh` provides both). Under
//! CI a missing prerequisite fails the test.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use dunes_tests::{AgentProcess, console_binary, enroll_online, start_engine};

fn prerequisites() -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let image =
        std::env::var_os("DUNES_DEBIAN_DIR").map(|d| PathBuf::from(d).join("debian-12.qcow2"));
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let missing = match (&image, root) {
        (None, _) => Some(
            "DUNES_DEBIAN_DIR is not set (run scripts/test.sh, or build the image with assets/guest/build-debian-image.sh)",
        ),
        (Some(file), _) if !file.exists() => Some("DUNES_DEBIAN_DIR has no debian-12.qcow2"),
        (_, false) => Some("qemu:///embed needs root"),
        _ => None,
    };
    match missing {
        None => image,
        Some(why) if std::env::var_os("CI").is_some() => {
            panic!("the real-OS test cannot run: {why}")
        }
        Some(why) => {
            eprintln!("\n*** SKIPPING the real-OS test: {why} ***\n");
            None
        }
    }
}

/// QEMU outlives a killed agent by design; none is left behind by this test.
struct KillQemu(PathBuf);

impl Drop for KillQemu {
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .arg("-f")
            .arg(self.0.display().to_string())
            .status();
    }
}

fn ctl(data: &Path, args: &[&str]) -> Output {
    let out = Command::new(console_binary())
        .args(["ctl", "--data-dir"])
        .arg(data)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap()
}

/// An ed25519 public key line, as ssh-keygen writes one.
fn ssh_key_line() -> String {
    use base64::Engine as _;
    let mut data = Vec::new();
    data.extend_from_slice(&11u32.to_be_bytes());
    data.extend_from_slice(b"ssh-ed25519");
    data.extend_from_slice(&32u32.to_be_bytes());
    data.extend_from_slice(&[7u8; 32]);
    format!(
        "ssh-ed25519 {} ops@laptop",
        base64::engine::general_purpose::STANDARD.encode(data)
    )
}

/// A `ctl vm console` session driven line by line, as an operator types at its prompts.
struct ConsoleSession {
    child: std::process::Child,
    shown: Arc<Mutex<String>>,
}

impl ConsoleSession {
    fn open(data: &Path, vm: &str) -> ConsoleSession {
        let mut child = Command::new(console_binary())
            .args(["ctl", "--data-dir"])
            .arg(data)
            .args(["vm", "console", vm, "--linger-secs", "2"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let shown = Arc::new(Mutex::new(String::new()));
        let mut stdout = child.stdout.take().unwrap();
        let into = shown.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                into.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        ConsoleSession { child, shown }
    }

    /// Waits until the console has shown `needle` since `from` (a length of what it showed),
    /// and answers how much it has shown then.
    fn wait_for(&self, needle: &str, from: usize, secs: u64) -> usize {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            {
                let shown = self.shown.lock().unwrap();
                if let Some(at) = shown.get(from..).and_then(|s| s.find(needle)) {
                    return from + at + needle.len();
                }
                assert!(
                    Instant::now() < deadline,
                    "the console never showed {needle:?}:\n{}",
                    &*shown
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn type_line(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    fn text(&self) -> String {
        self.shown.lock().unwrap().clone()
    }

    /// Leaves: the end of its input, then a quiet console.
    fn leave(mut self) {
        drop(self.child.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "ctl vm console: {status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debian_image_boots_from_its_disk_with_cloud_init_and_a_console_login() {
    let Some(image) = prerequisites() else { return };
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = KillQemu(dir.path().to_path_buf());
    let agent = |name: &str| {
        AgentProcess::spawn_in(
            None,
            &dir.path().join(name),
            name,
            "lausanne",
            "qemu:///embed",
            "127.0.0.1:0",
            Vec::new(),
        )
        .unwrap()
    };
    let (first, second) = (agent("deb-a"), agent("deb-b"));
    let engine = start_engine(&dir.path().join("console")).await.unwrap();
    enroll_online(&engine, &first).await.unwrap();
    enroll_online(&engine, &second).await.unwrap();
    let _ctl = dunes_console::ctl::serve(engine.clone()).await.unwrap();
    let data = dir.path().join("console");
    let files = dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    let key = ssh_key_line();
    let user_data = files.join("user-data.yaml");
    std::fs::write(
        &user_data,
        format!(
            "#cloud-config\nusers:\n  - name: ops\n    sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n    shell: /bin/bash\n    lock_passwd: false\n    plain_text_passwd: dunes-test\n    ssh_authorized_keys:\n      - \"{key}\"\n"
        ),
    )
    .unwrap();

    let (data2, image2, user_data2) = (data.clone(), image.clone(), user_data.clone());
    let second_storage = dir.path().join("deb-b/storage");
    let iso = dir.path().join("installer.iso");
    tokio::task::spawn_blocking(move || {
        let data = data2;
        // Imported through ctl, then pushed to the second host ahead of its VM.
        let imported = json(&ctl(
            &data,
            &[
                "--json",
                "image",
                "import",
                image2.to_str().unwrap(),
                "--name",
                "debian-12",
            ],
        ));
        assert_eq!(imported["format"], "qcow2", "{imported}");
        let pushed = json(&ctl(
            &data,
            &["--json", "image", "push", "debian-12", "--host", "deb-b"],
        ));
        assert_eq!(pushed[0]["held"], false, "{pushed}");
        assert!(
            pushed[0]["sent_bytes"].as_u64().unwrap() > 100 << 20,
            "{pushed}"
        );
        let copy = std::fs::read(second_storage.join("images/debian-12/disk.qcow2")).unwrap();
        assert_eq!(
            blake3::hash(&copy).to_hex().to_string(),
            imported["blake3"].as_str().unwrap()
        );

        // Booted from a qcow2 overlay on the host's copy, grown to 4 GiB.
        let vm = json(&ctl(
            &data,
            &[
                "--json",
                "vm",
                "create",
                "--name",
                "deb-1",
                "--image",
                "debian-12",
                "--disk-gib",
                "4",
                "--host",
                "deb-b",
                "--memory-mib",
                "1024",
                "--user-data",
                user_data2.to_str().unwrap(),
                "--start",
            ],
        ));
        assert_eq!(vm["state"], "running", "{vm}");
        assert_eq!(vm["disks"][0]["format"], "qcow2", "{vm}");
        assert_eq!(vm["disks"][0]["backing"], "debian-12", "{vm}");
        assert_eq!(vm["disks"][0]["virtual_bytes"], 4u64 << 30, "{vm}");

        // Its serial console: the login prompt with the host name cloud-init set, a login
        // as the user it made, and what the guest says of itself.
        let mut console = ConsoleSession::open(&data, "deb-1");
        let started = Instant::now();
        console.type_line("");
        let at = console.wait_for("deb-1 login:", 0, 600);
        eprintln!(
            "login prompt {:?} after the console opened",
            started.elapsed()
        );
        console.type_line("ops");
        let at = console.wait_for("Password:", at, 60);
        console.type_line("dunes-test");
        let at = console.wait_for("$ ", at, 60);
        console.type_line("echo host=$(hostname); cloud-init status --wait; echo END-$((40+2))");
        let end = console.wait_for("END-42", at, 300);
        let text = console.text();
        let answer = &text[at..end];
        assert!(answer.contains("host=deb-1"), "{answer}");
        assert!(answer.contains("status: done"), "{answer}");
        // The markers are computed by the shell: its echo of the line does not match them.
        console.type_line("cat ~/.ssh/authorized_keys; echo KEYS-$((1+1))");
        let keys_end = console.wait_for("KEYS-2", end, 60);
        assert!(
            console.text()[end..keys_end].contains(&key),
            "{}",
            console.text()
        );
        console.type_line("exit");
        console.leave();

        // An installer under QEMU: the ISO in the CD-ROM drive of a running VM, ejected at
        // once; the VM runs on, and boots from its disk from then on. (A cloud-init volume
        // stands in for an installer: nothing boots from it, and the VM waits in its BIOS.)
        let volume = dunes_agent::cidata::build_seed(&dunes_agent::cidata::Seed {
            meta_data: "instance-id: installer\n".into(),
            user_data: "#cloud-config\n".into(),
            network_config: None,
        })
        .unwrap();
        std::fs::write(&iso, volume).unwrap();
        json(&ctl(
            &data,
            &[
                "--json",
                "image",
                "import",
                iso.to_str().unwrap(),
                "--name",
                "installer",
            ],
        ));
        let vm = json(&ctl(
            &data,
            &[
                "--json",
                "vm",
                "create",
                "--name",
                "inst-1",
                "--image",
                "installer",
                "--disk-gib",
                "1",
                "--host",
                "deb-b",
                "--memory-mib",
                "256",
                "--start",
            ],
        ));
        assert_eq!(vm["state"], "running", "{vm}");
        assert_eq!(vm["installer"], "installer", "{vm}");
        let ejected = json(&ctl(&data, &["--json", "vm", "eject", "deb-b/inst-1"]));
        assert_eq!(ejected["state"], "running", "{ejected}");
        assert!(
            ejected.get("installer").is_some_and(|v| v.is_null()),
            "{ejected}"
        );
        let record =
            std::fs::read_to_string(second_storage.join("definitions/inst-1.toml")).unwrap();
        assert!(!record.contains("cdrom"), "{record}");

        // UEFI where OVMF is installed (scripts/install-deps.sh installs it): the VM starts
        // with OVMF's firmware, as its QEMU's command line shows.
        if !Path::new("/usr/share/qemu/firmware").exists() && std::env::var_os("CI").is_none() {
            eprintln!("SKIPPED the UEFI boot: OVMF is not installed (apt-get install ovmf)");
        } else {
            let vm = json(&ctl(
                &data,
                &[
                    "--json",
                    "vm",
                    "create",
                    "--name",
                    "uefi-1",
                    "--image",
                    "installer",
                    "--disk-gib",
                    "1",
                    "--uefi",
                    "--host",
                    "deb-b",
                    "--memory-mib",
                    "256",
                    "--start",
                ],
            ));
            assert_eq!(vm["state"], "running", "{vm}");
            let cmdline = std::fs::read_dir("/proc")
                .unwrap()
                .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .find(|c| c.contains("guest=uefi-1"))
                .expect("the QEMU of uefi-1");
            assert!(cmdline.contains("OVMF"), "{cmdline}");
        }
        // The VMs above make way for a service's.
        for vm in ["deb-1", "inst-1", "uefi-1"] {
            let reference = format!("deb-b/{vm}");
            let stopped = ctl(&data, &["vm", "stop", &reference, "--force"]);
            if stopped.status.success() {
                json(&ctl(&data, &["--json", "vm", "delete", &reference]));
            }
        }

        // A service of two Debian VMs from the image: web's user-data gets db's address, as
        // db's guest agent reports it, when web starts after db is ready.
        let service = files.join("pair.toml");
        std::fs::write(
            &service,
            r##"name = "pair"

[[application]]
name = "db"
runtime = "libvirt"
image = "debian-12"
vcpus = 1
memory_mib = 512
readiness = "guest-agent"

[[application]]
name = "web"
runtime = "libvirt"
image = "debian-12"
vcpus = 1
memory_mib = 512
depends_on = ["db"]
user_data = """#cloud-config
users:
  - name: ops
    shell: /bin/bash
    lock_passwd: false
    plain_text_passwd: dunes-test
write_files:
  - path: /etc/dunes-db
    content: "db={{addresses.db}} me={{name}} index={{index}}"
"""

[rules]
pin = [{ application = "db", hosts = ["deb-b"] }, { application = "web", hosts = ["deb-b"] }]
"##,
        )
        .unwrap();
        json(&ctl(
            &data,
            &[
                "--json",
                "service",
                "create",
                "-f",
                service.to_str().unwrap(),
            ],
        ));
        // deb-b holds the image: nothing is sent. (Exit code 1: there are changes.)
        let plan = Command::new(console_binary())
            .args(["ctl", "--data-dir"])
            .arg(&data)
            .args(["--json", "service", "plan", "pair"])
            .output()
            .unwrap();
        assert_eq!(plan.status.code(), Some(1), "{plan:?}");
        let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
        assert!(
            plan["placements"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p.get("image_transfer").is_none() && p["host"] == "deb-b"),
            "{plan}"
        );
        let deployed = json(&ctl(&data, &["--json", "service", "deploy", "pair"]));
        assert!(deployed.get("failed").is_none(), "{deployed}");
        let started = Instant::now();
        let start = Command::new(console_binary())
            .args(["ctl", "--data-dir"])
            .arg(&data)
            .args(["--json", "service", "start", "pair"])
            .output()
            .unwrap();
        eprintln!("service pair started in {:?}", started.elapsed());
        // What db's guest said, should its address not come.
        let db_console = second_storage.join("disks/pair-db-0.console.log");
        assert!(
            start.status.success(),
            "service start: {}\ndb's console, last lines:\n{}",
            String::from_utf8_lossy(&start.stderr),
            std::fs::read_to_string(&db_console)
                .unwrap_or_default()
                .lines()
                .rev()
                .take(60)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
        let report: serde_json::Value = serde_json::from_slice(&start.stdout).unwrap();
        assert!(report.get("failed").is_none(), "{report}");
        let vms = json(&ctl(&data, &["--json", "vms"]));
        let db_address = vms
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "pair-db-0")
            .and_then(|v| v["addresses"][0].as_str())
            .unwrap_or_else(|| panic!("db's address: {vms}"))
            .split('/')
            .next()
            .unwrap()
            .to_string();
        let mut console = ConsoleSession::open(&data, "pair-web-0");
        console.type_line("");
        let at = console.wait_for("pair-web-0 login:", 0, 600);
        console.type_line("ops");
        let at = console.wait_for("Password:", at, 60);
        console.type_line("dunes-test");
        let at = console.wait_for("$ ", at, 60);
        console.type_line("cat /etc/dunes-db; echo; echo END-$((40+2))");
        let end = console.wait_for("END-42", at, 120);
        let text = console.text();
        let answer = &text[at..end];
        assert!(
            answer.contains(&format!("db={db_address} me=pair-web-0 index=0")),
            "{answer}"
        );
        console.type_line("exit");
        console.leave();

        // The first host never received the image.
    })
    .await
    .unwrap();
    assert!(!dir.path().join("deb-a/storage/images/debian-12").exists());
}
