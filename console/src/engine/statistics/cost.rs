//! Measured cost: CPU-hours used, GB-months stored and GB transferred out of a site, from a
//! workload's periodic readings, priced at its host's prices. Pure: the statistics store
//! gives the readings, the caller says which traffic leaves the site.

use std::collections::BTreeMap;

use dunes_shared::model::Prices;

/// Hours in a month for GB-months: a year's hours over twelve.
pub const HOURS_PER_MONTH: f64 = 365.0 * 24.0 / 12.0;
const GB: f64 = 1e9;

/// One reading of a workload: cumulative counters and what it stores now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub at_secs: u64,
    /// CPU time used since the workload started, in nanoseconds.
    pub cpu_ns: u64,
    /// Bytes its disks hold now.
    pub stored_bytes: u64,
    /// Bytes sent out of its site since it started.
    pub sent_out_of_site_bytes: u64,
}

/// What a workload used over a range.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub cpu_hours: f64,
    pub gb_months: f64,
    pub gb_transferred: f64,
}

impl Usage {
    pub fn add(&mut self, other: &Usage) {
        self.cpu_hours += other.cpu_hours;
        self.gb_months += other.gb_months;
        self.gb_transferred += other.gb_transferred;
    }

    /// Its price at `prices`.
    pub fn cost(&self, prices: &Prices) -> f64 {
        self.cpu_hours * prices.per_cpu_hour
            + self.gb_months * prices.per_gb_month_stored
            + self.gb_transferred * prices.per_gb_transferred
    }
}

/// A counter's growth from `before` to `now`; a counter that went back started again (the
/// workload restarted), so all of `now` is new.
fn growth(before: u64, now: u64) -> u64 {
    if now >= before { now - before } else { now }
}

/// What `readings` (in time order) say was used between `from_secs` and `to_secs`. Counters
/// count between two readings inside the range; storage counts for the time each reading
/// holds until the next (or `to_secs`), cut to the range.
pub fn usage(readings: &[Reading], from_secs: u64, to_secs: u64) -> Usage {
    let mut out = Usage::default();
    for (i, r) in readings.iter().enumerate() {
        if let Some(prev) = i.checked_sub(1).map(|p| readings[p])
            && r.at_secs > from_secs
            && r.at_secs <= to_secs
            && r.at_secs >= prev.at_secs
        {
            out.cpu_hours += growth(prev.cpu_ns, r.cpu_ns) as f64 / 1e9 / 3600.0;
            out.gb_transferred +=
                growth(prev.sent_out_of_site_bytes, r.sent_out_of_site_bytes) as f64 / GB;
        }
        let held_until = readings
            .get(i + 1)
            .map_or(to_secs, |next| next.at_secs)
            .min(to_secs);
        let held_from = r.at_secs.max(from_secs);
        if held_until > held_from {
            let hours = (held_until - held_from) as f64 / 3600.0;
            out.gb_months += r.stored_bytes as f64 / GB * hours / HOURS_PER_MONTH;
        }
    }
    out
}

/// How a cost report is grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CostBy {
    Instance,
    Application,
    Service,
    Site,
}

impl CostBy {
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "instance" => CostBy::Instance,
            "application" | "app" => CostBy::Application,
            "service" => CostBy::Service,
            "site" => CostBy::Site,
            _ => return None,
        })
    }
}

/// One group of a cost report: what it used and what that cost at its hosts' prices.
#[derive(Debug, Clone, PartialEq)]
pub struct CostLine {
    pub key: String,
    pub usage: Usage,
    pub cost: f64,
}

/// What of a workload's sending a cost counts, bucket by bucket: what left its site, where
/// its agent measured that (`out_of_site`: the TCP peers of a process instance or of a VM on
/// QEMU's user-mode network); everything it sent (`all`) where no one could tell (a bridged
/// VM, whose connections are its guest's).
pub fn billed_sent(
    all: Vec<crate::engine::statistics::rollup::Bucket>,
    out_of_site: Vec<crate::engine::statistics::rollup::Bucket>,
) -> Vec<crate::engine::statistics::rollup::Bucket> {
    let mut billed: BTreeMap<u64, crate::engine::statistics::rollup::Bucket> =
        all.into_iter().map(|b| (b.start_secs, b)).collect();
    for b in out_of_site {
        billed.insert(b.start_secs, b);
    }
    billed.into_values().collect()
}

/// What a workload used, from its rolled-up series of `step_secs` buckets: CPU in percent of
/// its `cpus` CPUs, and bytes sent out of its site per second (see [`billed_sent`]). Each bucket stands for its whole step. Its disks' `stored_bytes` count
/// from its first bucket (or `from_secs`) to `to_secs`.
pub fn usage_from_buckets(
    cpu: &[crate::engine::statistics::rollup::Bucket],
    sent: &[crate::engine::statistics::rollup::Bucket],
    cpus: u32,
    stored_bytes: u64,
    step_secs: u64,
    from_secs: u64,
    to_secs: u64,
) -> Usage {
    let hours_per_bucket = step_secs as f64 / 3600.0;
    let cpu_hours = cpu
        .iter()
        .map(|b| b.mean().max(0.0) / 100.0 * f64::from(cpus) * hours_per_bucket)
        .sum();
    let gb_transferred = sent
        .iter()
        .map(|b| b.mean().max(0.0) * step_secs as f64 / GB)
        .sum();
    let first = cpu
        .iter()
        .chain(sent)
        .map(|b| b.start_secs)
        .min()
        .map_or(to_secs, |f| f.max(from_secs));
    let held_hours = to_secs.saturating_sub(first) as f64 / 3600.0;
    Usage {
        cpu_hours,
        gb_months: stored_bytes as f64 / GB * held_hours / HOURS_PER_MONTH,
        gb_transferred,
    }
}

/// A workload's cost per hour at each bucket of its series: its CPU (percent of `cpus`) and
/// what it sent (bytes per second) in that bucket, and its disks held meanwhile, at `prices`.
/// A bucket where the workload has no CPU reading did not run: no cost.
pub fn cost_per_hour_series(
    cpu: &[crate::engine::statistics::rollup::Bucket],
    sent: &[crate::engine::statistics::rollup::Bucket],
    cpus: u32,
    stored_bytes: u64,
    prices: &Prices,
) -> Vec<(u64, f64)> {
    let storage = stored_bytes as f64 / GB / HOURS_PER_MONTH * prices.per_gb_month_stored;
    cpu.iter()
        .map(|b| {
            let sent_bps = sent
                .binary_search_by_key(&b.start_secs, |s| s.start_secs)
                .map_or(0.0, |i| sent[i].mean().max(0.0));
            let compute = b.mean().max(0.0) / 100.0 * f64::from(cpus) * prices.per_cpu_hour;
            let traffic = sent_bps * 3600.0 / GB * prices.per_gb_transferred;
            (b.start_secs, compute + traffic + storage)
        })
        .collect()
}

/// Several workloads' costs per hour added up by bucket start, as buckets of one value.
pub fn sum_series(
    members: impl IntoIterator<Item = Vec<(u64, f64)>>,
) -> Vec<crate::engine::statistics::rollup::Bucket> {
    let mut by_start: BTreeMap<u64, f64> = BTreeMap::new();
    for series in members {
        for (start, cost) in series {
            *by_start.entry(start).or_default() += cost;
        }
    }
    by_start
        .into_iter()
        .map(|(start, cost)| crate::engine::statistics::rollup::Bucket::new(start, cost))
        .collect()
}

/// Usages summed by a key (an application, a service, a site).
pub fn sum_by<K: Ord>(items: impl IntoIterator<Item = (K, Usage)>) -> BTreeMap<K, Usage> {
    let mut out: BTreeMap<K, Usage> = BTreeMap::new();
    for (key, usage) in items {
        out.entry(key).or_default().add(&usage);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(at_secs: u64, cpu_secs: u64, stored_gb: u64, sent_gb: u64) -> Reading {
        Reading {
            at_secs,
            cpu_ns: cpu_secs * 1_000_000_000,
            stored_bytes: stored_gb * 1_000_000_000,
            sent_out_of_site_bytes: sent_gb * 1_000_000_000,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn rolled_up_series_give_cpu_hours_storage_and_traffic() {
        use crate::engine::statistics::rollup::Bucket;
        // Two hours of minute buckets at 50 % of 2 CPUs, sending 1 MB/s, 10 GB stored.
        let cpu: Vec<Bucket> = (0..120).map(|m| Bucket::new(m * 60, 50.0)).collect();
        let sent: Vec<Bucket> = (0..120).map(|m| Bucket::new(m * 60, 1e6)).collect();
        let u = usage_from_buckets(&cpu, &sent, 2, 10_000_000_000, 60, 0, 7200);
        assert!(close(u.cpu_hours, 2.0), "{u:?}");
        assert!(close(u.gb_transferred, 7.2), "{u:?}");
        assert!(close(u.gb_months, 10.0 * 2.0 / HOURS_PER_MONTH), "{u:?}");
        // Storage counts from the first reading on, not from the range's start.
        let late = usage_from_buckets(&cpu[60..], &[], 2, 10_000_000_000, 60, 0, 7200);
        assert!(close(late.gb_months, 10.0 / HOURS_PER_MONTH), "{late:?}");
    }

    #[test]
    fn what_left_the_site_is_billed_where_it_was_measured() {
        use crate::engine::statistics::rollup::Bucket;
        // Minutes 0 and 1 only know everything sent; minutes 1 and 2 know what left.
        let all = vec![
            Bucket::new(0, 100.0),
            Bucket::new(60, 100.0),
            Bucket::new(120, 80.0),
        ];
        let out = vec![Bucket::new(60, 30.0), Bucket::new(120, 0.0)];
        let billed: Vec<(u64, f64)> = billed_sent(all, out)
            .iter()
            .map(|b| (b.start_secs, b.mean()))
            .collect();
        assert_eq!(billed, vec![(0, 100.0), (60, 30.0), (120, 0.0)]);
    }

    #[test]
    fn cost_per_hour_follows_each_bucket_and_adds_up_over_workloads() {
        use crate::engine::statistics::rollup::Bucket;
        let prices = Prices {
            per_gb_month_stored: HOURS_PER_MONTH, // 1 per GB-hour
            per_gb_transferred: 1.0,
            per_cpu_hour: 2.0,
            ..Prices::default()
        };
        // Minute 0: 50 % of 2 CPUs, nothing sent; minute 1: idle, 1 MB/s sent.
        let cpu = [Bucket::new(0, 50.0), Bucket::new(60, 0.0)];
        let sent = [Bucket::new(60, 1e6)];
        let series = cost_per_hour_series(&cpu, &sent, 2, 3_000_000_000, &prices);
        // 1 CPU-hour per hour at 2, plus 3 GB held at 1 per GB-hour.
        assert!(close(series[0].1, 2.0 + 3.0), "{series:?}");
        // 3.6 GB sent per hour at 1, plus the storage.
        assert!(close(series[1].1, 3.6 + 3.0), "{series:?}");
        let total = sum_series([series, vec![(60, 1.0), (120, 4.0)]]);
        let values: Vec<(u64, f64)> = total.iter().map(|b| (b.start_secs, b.mean())).collect();
        assert_eq!(values.len(), 3);
        assert!(
            close(values[1].1, 7.6) && close(values[2].1, 4.0),
            "{values:?}"
        );
    }

    #[test]
    fn counters_and_storage_add_up_over_a_range() {
        // An hour at one full core, 2 GB stored, 5 GB sent out of the site.
        let readings = [reading(0, 0, 2, 0), reading(3600, 3600, 2, 5)];
        let u = usage(&readings, 0, 3600);
        assert!(close(u.cpu_hours, 1.0), "{u:?}");
        assert!(close(u.gb_transferred, 5.0), "{u:?}");
        assert!(close(u.gb_months, 2.0 / HOURS_PER_MONTH), "{u:?}");
        // A month of 2 GB is 2 GB-months.
        let month = (HOURS_PER_MONTH * 3600.0) as u64;
        let stored = usage(&[reading(0, 0, 2, 0)], 0, month);
        assert!((stored.gb_months - 2.0).abs() < 1e-6, "{stored:?}");
        // Half of the range, half of the storage; counters count where their reading is.
        let first_half = usage(&readings, 0, 1800);
        assert!(close(first_half.gb_months, 1.0 / HOURS_PER_MONTH));
        assert_eq!(first_half.cpu_hours, 0.0);
    }

    #[test]
    fn a_restarted_workload_counts_from_zero_and_prices_apply() {
        // The counter fell from 1800 s to 600 s: it restarted, 600 s are new.
        let readings = [
            reading(0, 0, 1, 0),
            reading(1800, 1800, 1, 3),
            reading(3600, 600, 1, 1),
        ];
        let u = usage(&readings, 0, 3600);
        assert!(close(u.cpu_hours, 2400.0 / 3600.0), "{u:?}");
        // The byte counter restarted too (3 GB, then 1 GB): 3 + 1 GB went out.
        assert!(close(u.gb_transferred, 4.0), "{u:?}");
        let prices = Prices {
            per_gb_month_stored: 0.1,
            per_gb_transferred: 0.05,
            per_cpu_hour: 0.02,
            per_gb_memory_hour: 0.0,
        };
        let expected = u.cpu_hours * 0.02 + u.gb_months * 0.1 + 4.0 * 0.05;
        assert!(close(u.cost(&prices), expected));
    }

    #[test]
    fn usages_sum_by_service() {
        let one = Usage {
            cpu_hours: 1.0,
            gb_months: 2.0,
            gb_transferred: 3.0,
        };
        let sums = sum_by([("shop", one), ("blog", one), ("shop", one)]);
        assert_eq!(sums.len(), 2);
        assert_eq!(
            sums["shop"],
            Usage {
                cpu_hours: 2.0,
                gb_months: 4.0,
                gb_transferred: 6.0
            }
        );
        assert_eq!(usage(&[], 0, 100), Usage::default());
    }
}
