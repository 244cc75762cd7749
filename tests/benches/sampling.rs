//! What the agent costs while it samples 100 running VMs once a second and sends the
//! readings to a console: the agent process's whole CPU time (user + system, from
//! /proc/PID/stat) over a minute, so it bounds the collection's share from above. Run with
//! `cargo build --release --workspace --bins && cargo bench -p dunes-tests --bench sampling`;
//! method and results in docs/BENCHMARKS.md.

use std::time::{Duration, Instant};

use dunes_console::engine::{Command, LinkState};
use dunes_shared::model::{TemplateName, VmName, VmSpec};
use dunes_tests::{AgentProcess, enroll, start_engine};

const VMS: usize = 100;
const MEASURE_SECS: u64 = 60;

/// User + system CPU seconds of a process so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |r| r.1);
    let fields: Vec<u64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // After ')': state(0) ... utime(11) stime(12), in ticks of 1/100 s.
    (fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0)) as f64 / 100.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // A test-driver host large enough for the VMs.
    let node = dir.path().join("node.xml");
    std::fs::write(
        &node,
        "<node><cpu><mode>host</mode></cpu><memory>268435456</memory></node>",
    )?;
    let agent = AgentProcess::spawn(
        &dir.path().join("agent"),
        "bench-sampling",
        "lab",
        &format!("test://{}", node.display()),
    )?;
    let engine = start_engine(&dir.path().join("console")).await?;
    enroll(&engine, &agent).await?;
    let host = agent.host_id.clone();
    engine
        .wait_for(Duration::from_secs(30), |s| {
            s.host(&host).is_some_and(|h| h.link == LinkState::Online)
        })
        .await
        .map_err(|_| anyhow::anyhow!("the agent did not come online"))?;
    for i in 0..VMS {
        let spec = VmSpec {
            name: VmName::new(format!("s{i}"))?,
            template: TemplateName::new("tiny")?,
            vcpus: Some(1),
            memory_mib: Some(64),
        };
        engine
            .request(|reply| Command::CreateVm {
                host: host.clone(),
                spec,
                start: true,
                reply,
            })
            .await?;
    }
    // Settle, then measure a minute of steady sampling.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let pid = agent.child.id();
    let before = cpu_secs(pid);
    let began = Instant::now();
    tokio::time::sleep(Duration::from_secs(MEASURE_SECS)).await;
    let used = cpu_secs(pid) - before;
    let wall = began.elapsed().as_secs_f64();
    let series = engine
        .request(|reply| Command::LatestValues { reply })
        .await?
        .len();
    println!(
        "| agent with {VMS} running VMs (test driver), sampling at 1 Hz, batches to a console | {wall:.0} s | {used:.2} CPU s | {:.2} % of a core | {series} series at the console |",
        used / wall * 100.0
    );
    Ok(())
}
