//! The console binary as an operator runs it: `dunes-console --demo --headless` in a
//! temporary data dir, driven with `ctl`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::console_binary;

/// A console process; SIGTERM on drop, so it stops its demo agents the way an operator's
/// Ctrl+C would.
#[derive(Debug)]
pub struct Console(pub Child);

impl Drop for Console {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// `dunes-console ctl --data-dir DIR ARGS…`.
pub fn ctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(console_binary())
        .arg("ctl")
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

/// The JSON a successful command printed.
pub fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A headless demo console in `dir/console`, its log in `dir/console.log`, once its hosts
/// are online and its VMs made.
pub fn demo(dir: &Path) -> (Console, PathBuf) {
    demo_with(dir, &[])
}

/// [`demo`] with more arguments for the console.
pub fn demo_with(dir: &Path, args: &[&str]) -> (Console, PathBuf) {
    demo_with_env(dir, args, &[])
}

/// [`demo`] with more arguments and environment variables for the console.
pub fn demo_with_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (Console, PathBuf) {
    let data = dir.join("console");
    let console = Console(
        Command::new(console_binary())
            .args(["--demo", "--headless", "--data-dir"])
            .arg(&data)
            .args(args)
            .envs(env.iter().copied())
            .stderr(std::fs::File::create(dir.join("console.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    demo_ready(&data);
    (console, data)
}

/// Waits until the demo's three hosts are online and its seven VMs made.
pub fn demo_ready(data: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let hosts = ctl(data, &["--json", "hosts"]);
        let vms = ctl(data, &["--json", "vms"]);
        if hosts.status.success()
            && vms.status.success()
            && json(&hosts)
                .as_array()
                .is_some_and(|h| h.len() == 3 && h.iter().all(|h| h["state"] == "online"))
            && json(&vms).as_array().is_some_and(|v| v.len() == 7)
        {
            return;
        }
        assert!(Instant::now() < deadline, "demo did not come up");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A headless console without demo agents on an existing data dir, once ctl answers.
pub fn headless(data: &Path, log: &Path) -> Console {
    let console = Console(
        Command::new(console_binary())
            .args(["--headless", "--data-dir"])
            .arg(data)
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ctl(data, &["hosts"]).status.success() {
        assert!(Instant::now() < deadline, "the console did not come up");
        std::thread::sleep(Duration::from_millis(200));
    }
    console
}
