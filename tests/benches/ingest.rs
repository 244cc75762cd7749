//! Statistics ingest: a sample generator feeding the console's ingest path (the engine's
//! `TimeSeries` rollups and the redb store's writer thread) as agents would, and the store's
//! size per host-day. Run with `cargo bench -p dunes-tests --bench ingest`; method and
//! results in docs/BENCHMARKS.md.
//!
//! - Fleet: HOSTS hosts × 20 VMs, one reading a second each, sent 5 to a batch; every host's
//!   batch is one ingest, timed (rollups plus the hand-over to the store; the store commits
//!   on its own thread, and the ingest waits when its queue is full). The fleet's seconds
//!   are fed as fast as they go: the figure is how many fleet-seconds one core takes in per
//!   wall second, and the p50/p99 of one batch's ingest.
//! - Size: one host with 20 VMs for a simulated day, then the store file's size.

use std::time::Instant;

use dunes_console::engine::{statistics::series::TimeSeries, store::Store};
use dunes_shared::model::{Counters, HostId, Sample, VmName, WorkloadSample};

const VMS_PER_HOST: usize = 20;
const BATCH: u64 = 5;

fn counters(seed: u64, at_secs: u64) -> Counters {
    // Counters that grow at a rate that varies by subject and by time of day.
    let rate = 1 + seed % 7 + (at_secs / 3600) % 5;
    Counters {
        cpu_ns: at_secs * rate * 50_000_000,
        cpus: 2,
        memory_used_mib: 512 + seed % 1024 + (at_secs / 60) % 64,
        memory_total_mib: 4096,
        disk_read_bytes: at_secs * rate * 4096,
        disk_write_bytes: at_secs * rate * 8192,
        net_rx_bytes: at_secs * rate * 10_000,
        net_tx_bytes: at_secs * rate * 20_000,
        // VMs: their guests' peers are out of the agent's sight.
        net_tx_out_of_site_bytes: None,
    }
}

fn batch(host: usize, vms: &[VmName], from_secs: u64) -> Vec<Sample> {
    (from_secs..from_secs + BATCH)
        .map(|at| Sample {
            at_unix_ms: at * 1000,
            host: counters(host as u64, at),
            workloads: vms
                .iter()
                .enumerate()
                .map(|(i, name)| WorkloadSample {
                    name: name.clone(),
                    counters: counters((host * 100 + i) as u64, at),
                })
                .collect(),
        })
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let hosts: usize = std::env::var("DUNES_BENCH_HOSTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let fleet_secs: u64 = std::env::var("DUNES_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let start_secs = 1_800_000_000u64;

    // The fleet, fed as fast as it goes.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store.redb");
    let (mut store, _) = Store::open(&path)?;
    let mut series = TimeSeries::default();
    let ids: Vec<HostId> = (0..hosts)
        .map(|h| HostId::new(format!("h{h}")))
        .collect::<Result<_, _>>()?;
    let vms: Vec<Vec<VmName>> = (0..hosts)
        .map(|h| {
            (0..VMS_PER_HOST)
                .map(|v| VmName::new(format!("h{h}-vm{v}")))
                .collect::<Result<_, _>>()
        })
        .collect::<Result<_, _>>()?;
    let mut latencies = Vec::with_capacity(hosts * (fleet_secs / BATCH) as usize);
    let mut flushes = Vec::new();
    let began = Instant::now();
    let mut t = start_secs;
    while t < start_secs + fleet_secs {
        for h in 0..hosts {
            let samples = batch(h, &vms[h], t);
            let at = Instant::now();
            let writes = series.ingest(&ids[h], &samples);
            store.put_stats(writes);
            runtime.block_on(store.submit());
            latencies.push(at.elapsed().as_secs_f64() * 1000.0);
        }
        t += BATCH;
        // The engine writes a tenth of what is open every second: part of the cost, each
        // share timed apart too.
        for share in t - BATCH..t {
            let at = Instant::now();
            let writes = series.flush_share(t, share as u32);
            store.put_stats(writes);
            runtime.block_on(store.submit());
            flushes.push(at.elapsed().as_secs_f64() * 1000.0);
        }
    }
    runtime.block_on(store.flush())?;
    let wall = began.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let values = hosts as u64 * (VMS_PER_HOST as u64 + 1) * fleet_secs;
    println!(
        "| {hosts} hosts × {VMS_PER_HOST} VMs, {fleet_secs} s of readings | {wall:.1} s | {:.2}× real time | {:.0} readings/s | batch p50 {:.2} ms, p99 {:.2} ms | {} series |",
        fleet_secs as f64 / wall,
        values as f64 / wall,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        series.series_count(),
    );
    println!(
        "| the flushes of what is open, a tenth of the series a second | {} flushes | longest {:.0} ms |",
        flushes.len(),
        flushes.iter().copied().fold(0.0, f64::max),
    );
    drop(store);

    // One host for a simulated day: the store's bytes per host-day.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("day.redb");
    let (mut store, _) = Store::open(&path)?;
    let mut series = TimeSeries::default();
    let empty = std::fs::metadata(&path)?.len();
    let mut t = start_secs;
    while t < start_secs + 86_400 {
        let writes = series.ingest(&ids[0], &batch(0, &vms[0], t));
        store.put_stats(writes);
        runtime.block_on(store.submit());
        t += BATCH;
    }
    let writes = series.flush(t);
    store.put_stats(writes);
    runtime.block_on(store.flush())?;
    drop(store);
    // The writer thread closes the file once the store is dropped.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let size = std::fs::metadata(&path)?.len();
    println!(
        "| one host × {VMS_PER_HOST} VMs for a day | store {:.1} MiB (empty {:.1} MiB): {:.1} MiB per host-day with 1 s kept an hour |",
        size as f64 / 1_048_576.0,
        empty as f64 / 1_048_576.0,
        (size - empty) as f64 / 1_048_576.0,
    );
    Ok(())
}
