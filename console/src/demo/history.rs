//! Thirty days of made-up readings for the demo's hosts and VMs, so that the charts of long
//! ranges and the capacity forecast have something to show on the first start. Pure and
//! deterministic: the same fleet and times give the same readings.

use dunes_shared::model::{Counters, Sample, VmName, WorkloadSample};

/// How far back the history goes.
pub const HISTORY_SECS: u64 = 30 * 86_400;
/// A reading every 5 minutes over the last week (the 1-minute charts), every 20 minutes
/// before (only hourly buckets are kept that far back; three readings make a band).
const RECENT_STEP_SECS: u64 = 300;
const OLD_STEP_SECS: u64 = 1200;
const RECENT_SECS: u64 = 7 * 86_400;

/// A VM as the history needs it.
pub struct HistoryVm<'a> {
    pub name: &'a VmName,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Only a running VM has readings.
    pub running: bool,
}

/// A host as the history needs it.
pub struct HistoryHost<'a> {
    pub cpus: u32,
    pub memory_mib: u64,
    pub vms: Vec<HistoryVm<'a>>,
}

/// A small generator of noise (xorshift64), seeded per host.
struct Noise(u64);

impl Noise {
    /// A factor around 1, within ±`spread`.
    fn factor(&mut self, spread: f64) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let unit = (self.0 >> 11) as f64 / (1u64 << 53) as f64;
        1.0 + spread * (2.0 * unit - 1.0)
    }
}

/// A name's own level of load, between 0.2 and 0.6, the same on every run.
fn base_load(name: &str) -> f64 {
    let hash = name.bytes().fold(2_166_136_261u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(16_777_619)
    });
    0.2 + f64::from(hash % 1000) / 1000.0 * 0.4
}

/// How busy the fleet is at `t` (unix seconds), from about 0.1 to 1: a day that peaks in
/// the afternoon (UTC), quieter weekends, and growth over the month, so that a forecast
/// has a trend to find.
fn activity(t: u64, from: u64, to: u64) -> f64 {
    let hour = (t % 86_400) as f64 / 3600.0;
    let daily = 0.5 - 0.5 * ((hour - 3.0) / 24.0 * std::f64::consts::TAU).cos();
    // 1 January 1970 was a Thursday: days 2 and 3 after it are the weekend.
    let weekend = matches!((t / 86_400) % 7, 2 | 3);
    let growth = 0.55 + 0.45 * (t.saturating_sub(from)) as f64 / (to - from).max(1) as f64;
    let week = if weekend { 0.6 } else { 1.0 };
    (0.25 + 0.75 * daily) * week * growth
}

/// The readings of one host and its running VMs from `to_secs - HISTORY_SECS` to
/// `to_secs`, as its agent would have sent them.
pub fn host_history(host: &HistoryHost<'_>, seed: u64, to_secs: u64) -> Vec<Sample> {
    let from = to_secs.saturating_sub(HISTORY_SECS);
    let mut noise = Noise(seed | 1);
    let mut host_counters = Counters {
        cpus: host.cpus,
        memory_total_mib: host.memory_mib,
        ..Counters::default()
    };
    let mut vm_counters: Vec<Counters> = host
        .vms
        .iter()
        .map(|vm| Counters {
            cpus: vm.vcpus,
            memory_total_mib: vm.memory_mib,
            ..Counters::default()
        })
        .collect();
    let mut samples = Vec::new();
    let mut t = from;
    let mut last = from;
    while t <= to_secs {
        let dt = (t - last) as f64;
        let busy = activity(t, from, to_secs);
        let mut host_cpu_ns = 0.0;
        let mut host_memory = 2048.0;
        let mut host_io = 0.0;
        let mut workloads = Vec::new();
        for (vm, counters) in host.vms.iter().zip(&mut vm_counters) {
            if !vm.running {
                continue;
            }
            let base = base_load(vm.name.as_str());
            let cpu = (base * busy * noise.factor(0.25)).clamp(0.0, 1.0);
            let cpu_ns = cpu * f64::from(vm.vcpus) * dt * 1e9;
            let memory =
                vm.memory_mib as f64 * (0.3 + 0.4 * base + 0.2 * busy) * noise.factor(0.03);
            counters.cpu_ns += cpu_ns as u64;
            counters.memory_used_mib = (memory as u64).min(vm.memory_mib);
            let io = busy * base * noise.factor(0.4) * dt;
            host_io += io;
            counters.disk_read_bytes += (io * 600_000.0) as u64;
            counters.disk_write_bytes += (io * 250_000.0) as u64;
            counters.net_rx_bytes += (io * 900_000.0) as u64;
            counters.net_tx_bytes += (io * 1_400_000.0) as u64;
            host_cpu_ns += cpu_ns;
            host_memory += counters.memory_used_mib as f64;
            workloads.push(WorkloadSample {
                name: vm.name.clone(),
                counters: *counters,
            });
        }
        // The host's own work on top of its VMs'.
        host_cpu_ns += 0.03 * f64::from(host.cpus) * dt * 1e9 * noise.factor(0.3);
        host_counters.cpu_ns += host_cpu_ns as u64;
        host_counters.memory_used_mib = (host_memory as u64).min(host.memory_mib);
        // The host's disks and NICs carry its VMs' traffic.
        host_counters.disk_read_bytes += (host_io * 600_000.0) as u64;
        host_counters.disk_write_bytes += (host_io * 250_000.0) as u64;
        host_counters.net_rx_bytes += (host_io * 900_000.0) as u64;
        host_counters.net_tx_bytes += (host_io * 1_400_000.0) as u64;
        samples.push(Sample {
            at_unix_ms: t * 1000,
            host: host_counters,
            workloads,
        });
        last = t;
        t += if to_secs - t <= RECENT_SECS {
            RECENT_STEP_SECS
        } else {
            OLD_STEP_SECS
        };
    }
    samples
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host<'a>(names: &'a [VmName]) -> HistoryHost<'a> {
        HistoryHost {
            cpus: 8,
            memory_mib: 32_768,
            vms: vec![
                HistoryVm {
                    name: &names[0],
                    vcpus: 2,
                    memory_mib: 2048,
                    running: true,
                },
                HistoryVm {
                    name: &names[1],
                    vcpus: 4,
                    memory_mib: 4096,
                    running: false,
                },
            ],
        }
    }

    #[test]
    fn thirty_days_of_readings_that_grow_and_follow_the_day() {
        let names = [VmName::new("web").unwrap(), VmName::new("off").unwrap()];
        let to = 1_800_000_000 - 1_800_000_000 % 86_400;
        let samples = host_history(&host(&names), 7, to);
        assert_eq!(samples, host_history(&host(&names), 7, to), "deterministic");
        assert_eq!(
            samples.first().unwrap().at_unix_ms,
            (to - HISTORY_SECS) * 1000
        );
        assert_eq!(samples.last().unwrap().at_unix_ms, to * 1000);
        // A reading every 5 minutes in the last week, every 20 before.
        let recent = samples
            .iter()
            .filter(|s| s.at_unix_ms >= (to - RECENT_SECS) * 1000)
            .count() as u64;
        assert_eq!(recent, RECENT_SECS / RECENT_STEP_SECS + 1);
        // Only the running VM has readings, and its counters only grow.
        assert!(samples.iter().all(|s| s.workloads.len() == 1));
        assert!(samples.windows(2).all(|w| {
            w[1].workloads[0].counters.cpu_ns >= w[0].workloads[0].counters.cpu_ns
                && w[1].host.cpu_ns > w[0].host.cpu_ns
        }));
        // The CPU the host used in the last day is more than in the first (growth), and an
        // afternoon is busier than a night.
        let used = |from: u64, to: u64| {
            let at = |t: u64| {
                samples
                    .iter()
                    .find(|s| s.at_unix_ms >= t * 1000)
                    .unwrap()
                    .host
                    .cpu_ns
            };
            at(to) - at(from)
        };
        let start = to - HISTORY_SECS;
        assert!(used(to - 86_400, to) > used(start, start + 86_400));
        let day = to - 2 * 86_400;
        assert!(used(day + 14 * 3600, day + 16 * 3600) > used(day + 2 * 3600, day + 4 * 3600));
        assert!(samples.iter().all(|s| s.host.memory_used_mib <= 32_768));
        // The host's traffic is its VMs', growing like their load, not compounding.
        let rx = |from: u64, to: u64| {
            let at = |t: u64| {
                samples
                    .iter()
                    .find(|s| s.at_unix_ms >= t * 1000)
                    .unwrap()
                    .host
                    .net_rx_bytes
            };
            at(to) - at(from)
        };
        let (first, last) = (rx(start, start + 86_400), rx(to - 86_400, to));
        assert!(last > first && last < 3 * first, "{first} then {last}");
    }
}
