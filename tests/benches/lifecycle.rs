//! How quickly the engine learns what an agent did, over real QUIC + mTLS with a real agent
//! process on libvirt's test driver. Run: `cargo bench -p dunes-tests --bench lifecycle`
//! (build the binaries first: `cargo build --release --workspace --bins`).
//!
//! Measures, for `CYCLES` start/stop pairs of one VM:
//! - reply: from handing the command to the engine until its reply arrives;
//! - visible: from handing the command to the engine until the published snapshot shows the
//!   new state (the bound is 1 s);
//!
//! and for `OUTAGES` kill/restart rounds of the agent:
//! - unreachable: from SIGKILL until the snapshot marks the host unreachable (bound 5 s);
//! - online: from the restarted agent printing its address until the host is online again.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use dunes_console::engine::{Command, EngineHandle, LinkState};
use dunes_shared::model::{HostId, TemplateName, VmName, VmSpec, VmState};
use dunes_tests::{AgentProcess, enroll, start_engine};

const CYCLES: usize = 200;
const OUTAGES: usize = 5;

/// Percentiles of a set of durations, for one line of the report.
fn summary(name: &str, samples: &mut [Duration]) -> String {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    format!(
        "{name:<12} n={:<4} p50={:>10.3?} p95={:>10.3?} max={:>10.3?}",
        samples.len(),
        at(0.5),
        at(0.95),
        samples[samples.len() - 1]
    )
}

async fn state_change(
    engine: &EngineHandle,
    host: &HostId,
    name: &VmName,
    start: bool,
) -> anyhow::Result<(Duration, Duration)> {
    let sent = Instant::now();
    let want = if start {
        VmState::Running
    } else {
        VmState::Shutoff
    };
    let visible = {
        let engine = engine.clone();
        let (host, name) = (host.clone(), name.clone());
        tokio::spawn(async move {
            engine
                .wait_for(Duration::from_secs(5), |s| {
                    s.host(&host)
                        .and_then(|h| h.vm(&name))
                        .is_some_and(|v| v.state == want)
                })
                .await
                .map(|_| sent.elapsed())
                .map_err(|_| anyhow::anyhow!("{name} never became {want}"))
        })
    };
    if start {
        engine
            .request(|reply| Command::StartVm {
                host: host.clone(),
                name: name.clone(),
                reply,
            })
            .await?;
    } else {
        engine
            .request(|reply| Command::StopVm {
                host: host.clone(),
                name: name.clone(),
                force: true,
                reply,
            })
            .await?;
    }
    let reply = sent.elapsed();
    Ok((reply, visible.await??))
}

async fn run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut agent =
        AgentProcess::spawn(&dir.path().join("a"), "bench-a", "lab", "test:///default")?;
    let engine = start_engine(&dir.path().join("console")).await?;
    enroll(&engine, &agent).await?;
    let host = agent.host_id.clone();
    let online = |engine: &EngineHandle| {
        let host = host.clone();
        let engine = engine.clone();
        async move {
            engine
                .wait_for(Duration::from_secs(30), |s| {
                    s.host(&host).is_some_and(|h| h.link == LinkState::Online)
                })
                .await
                .map_err(|_| anyhow::anyhow!("{host} never came online"))
        }
    };
    online(&engine).await?;
    let name = VmName::new("bench-vm")?;
    let template = TemplateName::new("tiny")?;
    engine
        .request(|reply| Command::CreateVm {
            host: host.clone(),
            spec: VmSpec {
                name: name.clone(),
                template,
                vcpus: Some(1),
                memory_mib: Some(64),
            },
            start: false,
            reply,
        })
        .await?;

    let (mut replies, mut visible) = (Vec::new(), Vec::new());
    for _ in 0..CYCLES {
        for start in [true, false] {
            let (r, v) = state_change(&engine, &host, &name, start).await?;
            replies.push(r);
            visible.push(v);
        }
    }

    let (mut unreachable, mut back_online) = (Vec::new(), Vec::new());
    for _ in 0..OUTAGES {
        agent.kill();
        let killed = Instant::now();
        engine
            .wait_for(Duration::from_secs(10), |s| {
                s.host(&host)
                    .is_some_and(|h| h.link == LinkState::Unreachable)
            })
            .await
            .map_err(|_| anyhow::anyhow!("never marked unreachable"))?;
        unreachable.push(killed.elapsed());
        agent.restart().context("restarting the agent")?;
        let restarted = Instant::now();
        online(&engine).await?;
        back_online.push(restarted.elapsed());
    }

    println!("engine ⇄ agent over QUIC + mTLS, test:///default, {CYCLES} start/stop cycles");
    println!("{}", summary("reply", &mut replies));
    println!("{}", summary("visible", &mut visible));
    println!("{}", summary("unreachable", &mut unreachable));
    println!("{}", summary("online", &mut back_online));
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --benches` would too: both just run it.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run())
}
