//! Migrations under faults, over real links: each agent runs in a network namespace of its
//! own, joined to this one by a veth pair on a bridge, and the console runs here. A test kills
//! the target agent mid-transfer or cuts its link and restores it, and checks that nothing is
//! lost: the source's data stays until the target has confirmed, a cut transfer goes on from
//! where it stopped, and a failed one leaves nothing behind on the target.
//!
//! Needs root and iproute2 (`scripts/test.sh` runs as root in CI); under CI a missing
//! prerequisite fails the test instead of skipping it.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::sync::{Mutex, MutexGuard};

use dunes_console::engine::{
    Command, EngineHandle, LinkState,
    migration::{MigrationJournal, MigrationStep},
};
use dunes_shared::model::{TemplateName, VmName, VmSpec, VmState};
use dunes_tests::{
    AgentProcess, enroll,
    netns::{self, Lab},
    spawn_lab_agent, start_engine,
};

/// One lab at a time in this process: they share its subnet and device names.
static LAB: Mutex<()> = Mutex::const_new(());

/// The data a migration moves: enough to stream for seconds over the shaped link.
const DATA_MIB: usize = 48;
/// What reaches the target, in Mbit/s: 48 MiB take about 10 s.
const SHAPED_MBIT: u32 = 40;

fn lab() -> Option<Lab> {
    match netns::unavailable() {
        Some(why) if std::env::var_os("CI").is_some() => {
            panic!("the fault tests cannot run here: {why}")
        }
        Some(why) => {
            eprintln!("SKIPPED: {why}");
            None
        }
        None => Some(Lab::new(2).expect("the lab is set up")),
    }
}

/// Fields drop in order: the agents, then the lab, then its lock.
struct Fleet {
    engine: EngineHandle,
    source: AgentProcess,
    target: AgentProcess,
    lab: Lab,
    _dir: tempfile::TempDir,
    _lab_lock: MutexGuard<'static, ()>,
}

/// The lab and an agent in each of its two namespaces, not enrolled yet. Fields drop in
/// order: the agents, then the lab, then its lock.
struct Agents {
    source: AgentProcess,
    target: AgentProcess,
    lab: Lab,
    dir: tempfile::TempDir,
    lock: MutexGuard<'static, ()>,
}

fn agents(lock: MutexGuard<'static, ()>) -> Option<Agents> {
    let lab = lab()?;
    let dir = tempfile::tempdir().unwrap();
    let agent = |i: usize, name: &str| spawn_lab_agent(&lab, i, dir.path(), name).unwrap();
    let source = agent(0, "fault-a");
    let target = agent(1, "fault-b");
    Some(Agents {
        lock,
        lab,
        source,
        target,
        dir,
    })
}

async fn fleet() -> Option<Fleet> {
    let Agents {
        lock,
        lab,
        source,
        target,
        dir,
    } = agents(LAB.lock().await)?;
    let engine = start_engine(&dir.path().join("console")).await.unwrap();
    for a in [&source, &target] {
        enroll(&engine, a).await.unwrap();
        let host = a.host_id.clone();
        engine
            .wait_for(Duration::from_secs(30), |s| {
                s.host(&host).is_some_and(|h| h.link == LinkState::Online)
            })
            .await
            .expect("the host comes online over its link");
    }
    lab.shape(1, SHAPED_MBIT).unwrap();
    Some(Fleet {
        _lab_lock: lock,
        lab,
        source,
        target,
        engine,
        _dir: dir,
    })
}

fn disk(agent: &AgentProcess, vm: &str) -> PathBuf {
    agent
        .data_dir
        .canonicalize()
        .unwrap()
        .join("storage/disks")
        .join(format!("{vm}.img"))
}

/// Leftovers of a transfer on the target: the temporary image and its chunk journal.
fn partial_files(agent: &AgentProcess, vm: &str) -> Vec<PathBuf> {
    let dir = disk(agent, vm).parent().unwrap().to_path_buf();
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{vm}.img")))
        })
        .collect()
}

/// A running VM whose disk holds `DATA_MIB` of data that does not repeat; its bytes.
async fn vm_with_data(f: &Fleet, name: &str) -> Vec<u8> {
    f.engine
        .request(|reply| Command::CreateVm {
            host: f.source.host_id.clone(),
            spec: VmSpec {
                name: VmName::new(name).unwrap(),
                template: TemplateName::new("tiny").unwrap(),
                vcpus: Some(1),
                memory_mib: Some(64),
            },
            start: true,
            reply,
        })
        .await
        .unwrap();
    fill(&disk(&f.source, name), DATA_MIB)
}

/// Writes `mib` MiB that neither repeat nor compress at the start of the disk at `path`;
/// the disk's bytes after.
fn fill(path: &Path, mib: usize) -> Vec<u8> {
    let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for b in block.chunks_mut(8) {
            // xorshift: cheap bytes that neither repeat nor compress.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            b.copy_from_slice(&state.to_le_bytes());
        }
        file.write_all(&block).unwrap();
    }
    file.sync_all().unwrap();
    std::fs::read(path).unwrap()
}

async fn migrate(f: &Fleet, vm: &str) -> u64 {
    f.engine
        .request(|reply| Command::MigrateVm {
            host: f.source.host_id.clone(),
            vm: VmName::new(vm).unwrap(),
            to: f.target.host_id.clone(),
            options: Default::default(),
            reply,
        })
        .await
        .unwrap()
        .id
}

fn journal(f: &Fleet, id: u64) -> MigrationJournal {
    f.engine
        .snapshot()
        .migrations
        .iter()
        .find(|m| m.id == id)
        .cloned()
        .unwrap()
}

/// Waits until the transfer has moved `mib` MiB.
async fn transferred(f: &Fleet, id: u64, mib: u64) {
    f.engine
        .wait_for(Duration::from_secs(60), |s| {
            s.migrations.iter().any(|m| {
                m.id == id && m.step == MigrationStep::Transferring && m.bytes_done >= mib << 20
            })
        })
        .await
        .unwrap_or_else(|s| panic!("the transfer never got to {mib} MiB: {:?}", s.migrations));
}

async fn ends(f: &Fleet, id: u64) -> MigrationJournal {
    f.engine
        .wait_for(Duration::from_secs(150), |s| {
            s.migrations
                .iter()
                .any(|m| m.id == id && m.step.is_finished())
        })
        .await
        .unwrap_or_else(|s| panic!("migration {id} never ended: {:?}", s.migrations));
    journal(f, id)
}

fn runs_on(f: &Fleet, agent: &AgentProcess, vm: &str) -> bool {
    f.engine.snapshot().host(&agent.host_id).is_some_and(|h| {
        h.vm(&VmName::new(vm).unwrap())
            .is_some_and(|v| v.state == VmState::Running)
    })
}

fn same(a: &Path, expected: &[u8]) -> bool {
    std::fs::read(a).is_ok_and(|b| b == expected)
}

/// The target agent dies mid-transfer and comes back without its ticket: the migration
/// rolls back, the VM runs on the source with every byte it had, and the target keeps
/// nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_target_mid_transfer_rolls_back_with_nothing_lost() {
    let Some(mut f) = fleet().await else { return };
    let before = vm_with_data(&f, "victim").await;
    let id = migrate(&f, "victim").await;
    transferred(&f, id, 8).await;
    f.target.kill();
    // The source's data is there while the target is gone.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(same(&disk(&f.source, "victim"), &before));
    assert!(!journal(&f, id).step.is_finished());
    f.target.restart().unwrap();
    let done = ends(&f, id).await;
    assert_eq!(done.step, MigrationStep::RolledBack, "{done:?}");
    assert!(
        done.error
            .as_deref()
            .unwrap()
            .starts_with("transferring failed"),
        "{done:?}"
    );
    f.engine
        .wait_for(Duration::from_secs(30), |_| {
            runs_on(&f, &f.source, "victim")
        })
        .await
        .expect("the VM runs on the source again");
    assert!(
        same(&disk(&f.source, "victim"), &before),
        "source data changed"
    );
    assert_eq!(partial_files(&f.target, "victim"), Vec::<PathBuf>::new());
}

/// A migration cancelled while its disk streams stops the stream at once and rolls back: the
/// VM runs on the source again and the target keeps nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_transfer_stops_and_rolls_back() {
    let Some(f) = fleet().await else { return };
    let before = vm_with_data(&f, "changed-mind").await;
    let id = migrate(&f, "changed-mind").await;
    transferred(&f, id, 4).await;
    f.engine
        .request(|reply| Command::CancelMigration { id, reply })
        .await
        .unwrap();
    let done = ends(&f, id).await;
    assert_eq!(done.step, MigrationStep::RolledBack, "{done:?}");
    assert_eq!(
        done.error.as_deref(),
        Some("cancelled while transferring"),
        "{done:?}"
    );
    // Stopped, not finished: far from all of it crossed.
    assert!(
        done.bytes_done < done.bytes_total || done.bytes_total == 0,
        "{done:?}"
    );
    f.engine
        .wait_for(Duration::from_secs(30), |_| {
            runs_on(&f, &f.source, "changed-mind")
        })
        .await
        .expect("the VM runs on the source again");
    assert!(same(&disk(&f.source, "changed-mind"), &before));
    assert_eq!(
        partial_files(&f.target, "changed-mind"),
        Vec::<PathBuf>::new()
    );
}

/// The target's link goes down mid-transfer for longer than QUIC waits, then comes back:
/// the source connects again and goes on from the last chunk the target acknowledged, and
/// the copy is the source's byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_resumes_the_transfer_where_it_stopped() {
    let Some(f) = fleet().await else { return };
    let before = vm_with_data(&f, "traveller").await;
    let id = migrate(&f, "traveller").await;
    // Past the first acknowledgement (every 16 MiB).
    transferred(&f, id, 20).await;
    f.lab.cut(1).unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(same(&disk(&f.source, "traveller"), &before));
    f.lab.restore(1).unwrap();
    let done = ends(&f, id).await;
    assert_eq!(done.step, MigrationStep::SourceDeleted, "{done:?}");
    assert!(
        same(&disk(&f.target, "traveller"), &before),
        "the copy differs"
    );
    assert!(!disk(&f.source, "traveller").exists());
    let said: Vec<String> = f
        .engine
        .snapshot()
        .events
        .iter()
        .map(|e| e.message.clone())
        .collect();
    let note = said
        .iter()
        .find(|m| m.contains("the link broke"))
        .unwrap_or_else(|| panic!("no word of the broken link: {said:?}"));
    eprintln!("{note}");
    assert!(
        !note.contains("last from 0.0 MiB"),
        "it started again from zero: {note}"
    );
    f.engine
        .wait_for(Duration::from_secs(30), |_| {
            runs_on(&f, &f.target, "traveller")
        })
        .await
        .expect("the VM runs on the target");
}

fn ctl(data: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(dunes_tests::console_binary())
        .arg("ctl")
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .output()
        .unwrap()
}

/// `ctl --json ARGS` until it answers (a console starting), within 30 s.
fn ctl_json(data: &Path, args: &[&str]) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    loop {
        let out = ctl(data, &all);
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Polls `ctl --json ARGS` until `pred` holds, within `secs`.
fn until(data: &Path, args: &[&str], secs: u64, pred: impl Fn(&serde_json::Value) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let seen = ctl_json(data, args);
        if pred(&seen) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{args:?}: {seen}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A console process, killed when dropped (a failed assertion leaves none behind).
struct Console(std::process::Child);

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A headless console on `data`, with `failpoint` set (or not).
fn console(data: &Path, log: &Path, failpoint: Option<&str>) -> Console {
    let mut command = std::process::Command::new(dunes_tests::console_binary());
    command
        .args(["--headless", "--data-dir"])
        .arg(data)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    match failpoint {
        Some(f) => command.env("DUNES_FAILPOINT", f),
        None => command.env_remove("DUNES_FAILPOINT"),
    };
    Console(command.spawn().unwrap())
}

/// The console dies after the side effects of each step in turn, before their outcome is
/// journaled; started again, it repeats that step and completes the migration. Until the
/// target has confirmed, the source's disk is there, unchanged.
#[test]
fn a_console_killed_after_each_step_completes_the_migration_on_restart() {
    let Some(agents) = agents(LAB.blocking_lock()) else {
        return;
    };
    let data = agents.dir.path().join("console");
    let log = |n: &str| agents.dir.path().join(format!("console-{n}.log"));
    let running = console(&data, &log("enroll"), None);
    for agent in [&agents.source, &agents.target] {
        ctl_json(
            &data,
            &[
                "host",
                "add",
                &agent.address,
                "--token",
                agent.token.as_deref().unwrap(),
            ],
        );
    }
    drop(running);
    let online = |hosts: &serde_json::Value| {
        hosts
            .as_array()
            .is_some_and(|h| h.len() == 2 && h.iter().all(|h| h["state"] == "online"))
    };
    for step in [
        "stopping",
        "transferring",
        "verifying",
        "defining",
        "starting",
        "confirmed",
    ] {
        let vm = format!("cut-{step}");
        let mut dying = console(
            &data,
            &log(step),
            Some(&format!("migration-exit-after:{step}")),
        );
        until(&data, &["hosts"], 30, online);
        ctl_json(
            &data,
            &[
                "vm",
                "create",
                "--name",
                &vm,
                "--template",
                "tiny",
                "--host",
                "fault-a",
                "--start",
            ],
        );
        let before = fill(&disk(&agents.source, &vm), 4);
        // The console may die before it answers: its journal says what it started.
        let _ = ctl(&data, &["vm", "migrate", &vm, "--to", "fault-b"]);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let code = loop {
            if let Some(status) = dying.0.try_wait().unwrap() {
                break status.code();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the console did not stop after {step}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(
            code,
            Some(86),
            "{step}: {}",
            std::fs::read_to_string(log(step)).unwrap()
        );
        if step != "confirmed" {
            assert!(
                same(&disk(&agents.source, &vm), &before),
                "{step}: the source's data went before the target confirmed"
            );
        }
        let again = console(&data, &log(&format!("{step}-again")), None);
        let all = ctl_json(&data, &["migrations"]);
        let id = all
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["vm"] == vm.as_str())
            .unwrap_or_else(|| panic!("{step}: no migration of {vm} journaled: {all}"))["id"]
            .clone();
        until(&data, &["migrations"], 90, |all| {
            all.as_array().unwrap().iter().any(|m| {
                m["id"] == id && (m["state"] == "source-deleted" || m["state"] == "rolled-back")
            })
        });
        let all = ctl_json(&data, &["migrations"]);
        let m = all
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .unwrap();
        assert_eq!(m["state"], "source-deleted", "{step}: {m}");
        until(&data, &["vms"], 30, |vms| {
            vms.as_array().unwrap().iter().any(|v| {
                v["name"] == vm.as_str() && v["host"] == "fault-b" && v["state"] == "running"
            })
        });
        assert!(
            same(&disk(&agents.target, &vm), &before),
            "{step}: the copy differs"
        );
        assert!(!disk(&agents.source, &vm).exists(), "{step}");
        drop(again);
    }
}
