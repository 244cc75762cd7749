//! Statistics from the agents' readings: which series there are (a host's or a workload's
//! CPU, memory, disk and network), the values a reading gives against the one before it
//! (counters become rates; a counter that went down started again), and the rollups they
//! feed. Pure: the store keeps what closes, the engine holds what is open.

use std::collections::HashMap;

use dunes_shared::model::{AppName, Counters, HostId, Sample, ServiceName, VmName};

use crate::engine::statistics::rollup::{Bucket, RESOLUTIONS, Rollup};

/// What a series measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    /// Percent of the subject's CPUs.
    Cpu,
    /// MiB in use.
    Memory,
    /// Bytes per second.
    DiskRead,
    DiskWrite,
    NetRx,
    NetTx,
    /// Of what a workload sent, what went out of its site (where its agent can tell).
    NetTxOutOfSite,
    /// The number an application's instances report (its service file's `metric`).
    AppMetric,
    /// What its workloads cost per hour at their hosts' prices: computed by a query from
    /// CPU and sent bytes, never stored.
    Cost,
}

impl Metric {
    pub const ALL: [Metric; 8] = [
        Metric::Cpu,
        Metric::Memory,
        Metric::DiskRead,
        Metric::DiskWrite,
        Metric::NetRx,
        Metric::NetTx,
        Metric::NetTxOutOfSite,
        Metric::AppMetric,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Cpu => "cpu",
            Metric::Memory => "memory",
            Metric::DiskRead => "disk-read",
            Metric::DiskWrite => "disk-write",
            Metric::NetRx => "net-rx",
            Metric::NetTx => "net-tx",
            Metric::NetTxOutOfSite => "net-tx-out",
            Metric::AppMetric => "app-metric",
            Metric::Cost => "cost",
        }
    }

    /// The metric [`Metric::as_str`] names; `None` for a name this version does not know.
    pub fn from_name(name: &str) -> Option<Metric> {
        Metric::ALL
            .into_iter()
            .chain([Metric::Cost])
            .find(|m| m.as_str() == name)
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::Cpu => "%",
            Metric::Memory => "MiB",
            Metric::AppMetric => "",
            Metric::Cost => "/h",
            _ => "B/s",
        }
    }
}

/// Whose series: a host's, or a workload's (a VM or a process instance, by its name, which
/// stays when it migrates); or the sum of several of them: an application's or a service's
/// instances, a site's hosts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    Host(HostId),
    Workload(VmName),
    /// An application inside a VM (a guest application of its service), by the VM.
    GuestApp(VmName, AppName),
    Application(ServiceName, AppName),
    Service(ServiceName),
    Site(String),
}

impl Subject {
    /// The subject's part of a series key: `host/NAME` or `vm/NAME`; an aggregate's own name
    /// (`service/NAME`, ...), which no series has.
    pub fn key(&self) -> String {
        match self {
            Subject::Host(h) => format!("host/{h}"),
            Subject::Workload(v) => format!("vm/{v}"),
            Subject::GuestApp(v, a) => format!("guest/{v}/{a}"),
            Subject::Application(s, a) => format!("app/{s}-{a}"),
            Subject::Service(s) => format!("service/{s}"),
            Subject::Site(s) => format!("site/{s}"),
        }
    }

    /// As the operator reads it: "host lsn-1", "service shop".
    pub fn describe(&self) -> String {
        match self {
            Subject::Host(h) => format!("host {h}"),
            Subject::Workload(v) => format!("workload {v}"),
            Subject::GuestApp(v, a) => format!("application {a} in {v}"),
            Subject::Application(s, a) => format!("application {s}/{a}"),
            Subject::Service(s) => format!("service {s}"),
            Subject::Site(s) => format!("site {s}"),
        }
    }
}

/// An aggregate's buckets from its members': CPU is the members' mean (each member's percent
/// of its own CPUs), the rest their sum. Min and max are the members' lowest and highest
/// for CPU, and the sums of their mins and maxes otherwise (bounds: the members' lows need
/// not have come at the same moment).
pub fn aggregate(metric: Metric, members: &[Vec<Bucket>]) -> Vec<Bucket> {
    let mut by_start: std::collections::BTreeMap<u64, Vec<&Bucket>> = Default::default();
    for buckets in members {
        for b in buckets {
            by_start.entry(b.start_secs).or_default().push(b);
        }
    }
    by_start
        .into_iter()
        .map(|(start_secs, bs)| {
            let n = bs.len() as f64;
            let means: f64 = bs.iter().map(|b| b.mean()).sum();
            let (min, max, mean) = if metric == Metric::Cpu {
                (
                    bs.iter().map(|b| b.min).fold(f64::INFINITY, f64::min),
                    bs.iter().map(|b| b.max).fold(f64::NEG_INFINITY, f64::max),
                    means / n,
                )
            } else {
                (
                    bs.iter().map(|b| b.min).sum(),
                    bs.iter().map(|b| b.max).sum(),
                    means,
                )
            };
            Bucket {
                start_secs,
                min,
                max,
                sum: mean,
                count: 1,
            }
        })
        .collect()
}

/// The key a series is stored under: `host/a/cpu`.
pub fn series_key(subject: &Subject, metric: Metric) -> String {
    format!("{}/{}", subject.key(), metric.as_str())
}

/// The values a reading at `now_ms` gives, against the subject's reading before it. Memory
/// needs no earlier reading; rates need one that is older and whose counters did not go down
/// (a restart: no rate this time).
pub fn values(
    previous: Option<(u64, &Counters)>,
    now_ms: u64,
    now: &Counters,
) -> Vec<(Metric, f64)> {
    let mut out = vec![(Metric::Memory, now.memory_used_mib as f64)];
    let Some((before_ms, before)) = previous else {
        return out;
    };
    if before_ms >= now_ms {
        return out;
    }
    let secs = (now_ms - before_ms) as f64 / 1000.0;
    let delta = |a: u64, b: u64| b.checked_sub(a).map(|d| d as f64);
    if let Some(cpu_ns) = delta(before.cpu_ns, now.cpu_ns)
        && now.cpus > 0
    {
        out.push((
            Metric::Cpu,
            cpu_ns / 1e9 / secs / f64::from(now.cpus) * 100.0,
        ));
    }
    for (metric, a, b) in [
        (
            Metric::DiskRead,
            before.disk_read_bytes,
            now.disk_read_bytes,
        ),
        (
            Metric::DiskWrite,
            before.disk_write_bytes,
            now.disk_write_bytes,
        ),
        (Metric::NetRx, before.net_rx_bytes, now.net_rx_bytes),
        (Metric::NetTx, before.net_tx_bytes, now.net_tx_bytes),
    ] {
        if let Some(d) = delta(a, b) {
            out.push((metric, d / secs));
        }
    }
    if let (Some(a), Some(b)) = (
        before.net_tx_out_of_site_bytes,
        now.net_tx_out_of_site_bytes,
    ) && let Some(d) = delta(a, b)
    {
        out.push((Metric::NetTxOutOfSite, d / secs));
    }
    out
}

/// A query answers at most this many buckets per series unless a resolution is asked for.
pub const MAX_POINTS: u64 = 2000;

/// One metric's buckets, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesPoints {
    pub metric: Metric,
    pub points: Vec<Bucket>,
}

/// A subject's series over a range.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsAnswer {
    pub subject: Subject,
    pub resolution_secs: u64,
    pub from_secs: u64,
    pub to_secs: u64,
    pub series: Vec<SeriesPoints>,
}

/// Adds the open buckets to the stored ones: an open bucket stands for a stored one of the
/// same start (a flush wrote an earlier state of it). Buckets before `from_secs` stay out.
pub fn merge_open(stored: &mut Vec<Bucket>, open: Vec<Bucket>, from_secs: u64) {
    for bucket in open.into_iter().filter(|b| b.start_secs >= from_secs) {
        match stored.binary_search_by_key(&bucket.start_secs, |b| b.start_secs) {
            Ok(i) => stored[i] = bucket,
            Err(i) => stored.insert(i, bucket),
        }
    }
}

/// What the store is to write: a bucket that closed, at a level. Level 0's one-second
/// buckets travel a minute at a time ([`StatsWrite::Seconds`]) to keep rows few.
#[derive(Debug, Clone, PartialEq)]
pub enum StatsWrite {
    Bucket {
        series: String,
        level: usize,
        bucket: Bucket,
    },
    /// The seconds of one minute of a series (each second's sample value).
    Seconds {
        series: String,
        minute_start_secs: u64,
        values: Vec<(u8, f32)>,
    },
    /// What a series has open (its minute's seconds, its minute and hour buckets), so that
    /// a restart goes on filling them rather than starting them again.
    Open(OpenState),
}

/// The open part of one series, as a flush keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenState {
    pub series: String,
    pub minute_start_secs: u64,
    pub seconds: Vec<(u8, f32)>,
    pub minute: Option<Bucket>,
    pub hour: Option<Bucket>,
}

#[derive(Debug, Default)]
struct Series {
    rollup: Rollup,
    /// The current minute's seconds, not yet written.
    minute_start_secs: u64,
    seconds: Vec<(u8, f32)>,
    /// When its last reading was taken.
    last_at_secs: u64,
    /// Readings since the last flush wrote it.
    dirty: bool,
    /// Which of the [`FLUSH_SHARES`] flushes write it.
    share: u32,
}

/// The open part is written a share at a time: each flush takes one of this many shares of
/// the series, so that no single flush holds the engine long.
pub const FLUSH_SHARES: u32 = 10;

/// A series without a reading for this long is written one last time and forgotten: its
/// workload is gone or stopped. A reading after that belongs to a later hour (and minute)
/// than anything it had open, so nothing stored is overwritten.
pub const IDLE_FORGET_SECS: u64 = 3600 + 60;

/// The open part of every series, and each subject's last reading.
/// A series' open part as the rows it will have once closed: its minute's seconds, and its
/// open minute and hour buckets (a later write of the same bucket replaces them).
fn open_rows(key: &str, s: &Series) -> Vec<StatsWrite> {
    let mut out = Vec::new();
    if !s.seconds.is_empty() {
        out.push(StatsWrite::Seconds {
            series: key.to_string(),
            minute_start_secs: s.minute_start_secs,
            values: s.seconds.clone(),
        });
    }
    for level in 1..RESOLUTIONS.len() {
        if let Some(bucket) = s.rollup.open_bucket(level) {
            out.push(StatsWrite::Bucket {
                series: key.to_string(),
                level,
                bucket: *bucket,
            });
        }
    }
    out
}

#[derive(Debug, Default)]
pub struct TimeSeries {
    series: HashMap<String, Series>,
    last: HashMap<Subject, (u64, Counters)>,
    /// Series made so far, to deal them out to the flush shares.
    made: u32,
}

impl TimeSeries {
    /// Takes a batch of `host`'s readings; returns what closed.
    pub fn ingest(&mut self, host: &HostId, samples: &[Sample]) -> Vec<StatsWrite> {
        let mut writes = Vec::new();
        for sample in samples {
            let at_secs = sample.at_unix_ms / 1000;
            let readings = std::iter::once((Subject::Host(host.clone()), &sample.host)).chain(
                sample
                    .workloads
                    .iter()
                    .map(|w| (Subject::Workload(w.name.clone()), &w.counters)),
            );
            for (subject, counters) in readings {
                let previous = self.last.get(&subject).map(|(ms, c)| (*ms, c));
                let values = values(previous, sample.at_unix_ms, counters);
                for (metric, value) in values {
                    self.add(series_key(&subject, metric), at_secs, value, &mut writes);
                }
                self.last.insert(subject, (sample.at_unix_ms, *counters));
            }
        }
        writes
    }

    /// Takes readings from the past (generated ones: the demo's history) like an agent's,
    /// and drops the writes the store would prune at once (seconds and minutes older than
    /// their level keeps). The last counters are forgotten afterwards, so that the first
    /// live reading of a subject is not compared with made-up ones.
    pub fn ingest_history(
        &mut self,
        host: &HostId,
        samples: &[Sample],
        now_secs: u64,
    ) -> Vec<StatsWrite> {
        let kept = |level: usize, start: u64| start + RESOLUTIONS[level].keep_secs >= now_secs;
        let mut writes = self.ingest(host, samples);
        writes.retain(|w| match w {
            StatsWrite::Bucket { level, bucket, .. } => kept(*level, bucket.start_secs),
            StatsWrite::Seconds {
                minute_start_secs, ..
            } => kept(0, *minute_start_secs),
            StatsWrite::Open(_) => true,
        });
        self.last.remove(&Subject::Host(host.clone()));
        let workloads: std::collections::BTreeSet<&VmName> = samples
            .iter()
            .flat_map(|s| s.workloads.iter().map(|w| &w.name))
            .collect();
        for name in workloads {
            self.last.remove(&Subject::Workload(name.clone()));
        }
        writes
    }

    /// Takes one look at the applications inside `vm`; only those in `with_process` have
    /// readings (the others are checks alone). CPU is a share of the VM's vCPUs.
    pub fn ingest_guest(
        &mut self,
        vm: &VmName,
        reply: &dunes_shared::protocol::GuestAppsReply,
        with_process: &[AppName],
    ) -> Vec<StatsWrite> {
        let mut writes = Vec::new();
        let at_secs = reply.at_unix_ms / 1000;
        for report in &reply.apps {
            let Some(app) = with_process.iter().find(|a| a.as_str() == report.app) else {
                continue;
            };
            let subject = Subject::GuestApp(vm.clone(), app.clone());
            let counters = Counters {
                cpu_ns: report.cpu_ns,
                cpus: reply.vcpus,
                ..Counters::default()
            };
            let previous = self.last.get(&subject).map(|(ms, c)| (*ms, c));
            // A guest's /proc gives CPU and memory; no disk or network of its own.
            let readings = values(previous, reply.at_unix_ms, &counters)
                .into_iter()
                .filter(|(m, _)| matches!(m, Metric::Cpu | Metric::Memory));
            for (metric, value) in readings {
                // Memory to the KiB: a guest's processes are often under a MiB.
                let value = if metric == Metric::Memory {
                    report.rss_kib as f64 / 1024.0
                } else {
                    value
                };
                self.add(series_key(&subject, metric), at_secs, value, &mut writes);
            }
            self.last.insert(subject, (reply.at_unix_ms, counters));
        }
        writes
    }

    /// Takes one value of a series that is read as it is (no counter): an application's
    /// metric.
    pub fn ingest_value(
        &mut self,
        subject: &Subject,
        metric: Metric,
        at_unix_ms: u64,
        value: f64,
    ) -> Vec<StatsWrite> {
        let mut writes = Vec::new();
        self.add(
            series_key(subject, metric),
            at_unix_ms / 1000,
            value,
            &mut writes,
        );
        writes
    }

    fn add(&mut self, key: String, at_secs: u64, value: f64, writes: &mut Vec<StatsWrite>) {
        let made = &mut self.made;
        let series = self.series.entry(key.clone()).or_insert_with(|| {
            *made = made.wrapping_add(1);
            Series {
                share: *made % FLUSH_SHARES,
                ..Series::default()
            }
        });
        series.last_at_secs = series.last_at_secs.max(at_secs);
        series.dirty = true;
        let ingested = series.rollup.ingest(at_secs, value);
        for (level, bucket) in ingested.closed {
            if level > 0 {
                writes.push(StatsWrite::Bucket {
                    series: key.clone(),
                    level,
                    bucket,
                });
            }
        }
        let minute = RESOLUTIONS[1].bucket_start(at_secs);
        if minute != series.minute_start_secs && !series.seconds.is_empty() {
            writes.push(StatsWrite::Seconds {
                series: key.clone(),
                minute_start_secs: series.minute_start_secs,
                values: std::mem::take(&mut series.seconds),
            });
        }
        if minute >= series.minute_start_secs || series.seconds.is_empty() {
            series.minute_start_secs = minute;
            let second = (at_secs - minute) as u8;
            // Two readings in one second: the later stands for it.
            match series.seconds.last_mut() {
                Some(last) if last.0 == second => last.1 = value as f32,
                _ => series.seconds.push((second, value as f32)),
            }
        }
    }

    /// What is still open of `series` at `level`: the bucket being filled (levels 1 and 2),
    /// or the current minute's seconds as buckets (level 0).
    pub fn open(&self, series: &str, level: usize) -> Vec<Bucket> {
        let Some(s) = self.series.get(series) else {
            return Vec::new();
        };
        if level == 0 {
            s.seconds
                .iter()
                .map(|(sec, v)| Bucket::new(s.minute_start_secs + u64::from(*sec), f64::from(*v)))
                .collect()
        } else {
            s.rollup.open_bucket(level).copied().into_iter().collect()
        }
    }

    /// Takes back what a flush kept before a restart (the store has turned states over an
    /// hour old into rows already).
    pub fn restore(&mut self, states: Vec<OpenState>) {
        for state in states {
            let series = self.series.entry(state.series).or_default();
            series.last_at_secs = state.minute_start_secs
                + state
                    .seconds
                    .iter()
                    .map(|(s, _)| u64::from(*s))
                    .max()
                    .unwrap_or(0);
            series.minute_start_secs = state.minute_start_secs;
            series.seconds = state.seconds;
            if let Some(b) = state.minute {
                series.rollup.restore(1, b);
            }
            if let Some(b) = state.hour {
                series.rollup.restore(2, b);
            }
        }
    }

    /// What every series that had readings since the last flush has open, one row each
    /// (`StatsWrite::Open`): what a crash or a stop loses otherwise. Queries of a running
    /// console take the open part from memory, so the open buckets need no rows of their own
    /// until they close. Series idle for [`IDLE_FORGET_SECS`] are written as rows one last
    /// time and forgotten, with the last readings of subjects as idle.
    pub fn flush(&mut self, now_secs: u64) -> Vec<StatsWrite> {
        self.flush_where(now_secs, |_, _| true, false)
    }

    /// [`Self::flush`] for one share of the series (`share` of [`FLUSH_SHARES`]): called
    /// once per share in turn, it writes each series as often as a whole flush would.
    pub fn flush_share(&mut self, now_secs: u64, share: u32) -> Vec<StatsWrite> {
        let share = share % FLUSH_SHARES;
        self.flush_where(now_secs, |_, s| s == share, false)
    }

    /// Writes what `subject`'s series have open as rows now (a workload that goes: a report
    /// right after, which reads rows, still finds all of it).
    pub fn flush_subject(&mut self, subject: &Subject, now_secs: u64) -> Vec<StatsWrite> {
        let prefix = format!("{}/", subject.key());
        self.flush_where(now_secs, |key, _| key.starts_with(&prefix), true)
    }

    fn flush_where(
        &mut self,
        now_secs: u64,
        pick: impl Fn(&str, u32) -> bool,
        rows: bool,
    ) -> Vec<StatsWrite> {
        let idle = |at: u64| at + IDLE_FORGET_SECS < now_secs;
        let mut writes = Vec::new();
        self.series.retain(|key, s| {
            if pick(key, s.share) && idle(s.last_at_secs) {
                writes.extend(open_rows(key, s));
                false
            } else {
                true
            }
        });
        self.last.retain(|_, (at_ms, _)| !idle(*at_ms / 1000));
        for (key, s) in &mut self.series {
            if !(pick(key, s.share) && (s.dirty || rows)) {
                continue;
            }
            s.dirty = false;
            writes.push(StatsWrite::Open(OpenState {
                series: key.clone(),
                minute_start_secs: s.minute_start_secs,
                seconds: s.seconds.clone(),
                minute: s.rollup.open_bucket(1).copied(),
                hour: s.rollup.open_bucket(2).copied(),
            }));
            if rows {
                writes.extend(open_rows(key, s));
            }
        }
        writes
    }

    /// The newest value of every series (its last second, else its open minute's mean), by
    /// series key, in key order.
    pub fn latest(&self) -> Vec<(String, f64)> {
        let mut out: Vec<(String, f64)> = self
            .series
            .iter()
            .filter_map(|(key, s)| {
                let value = match s.seconds.last() {
                    Some((_, v)) => f64::from(*v),
                    None => s.rollup.open_bucket(1)?.mean(),
                };
                Some((key.clone(), value))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    pub fn series_count(&self) -> usize {
        self.series.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dunes_shared::model::WorkloadSample;

    #[test]
    fn what_left_the_site_is_a_rate_only_where_both_readings_tell() {
        let at = |sent: u64, out: Option<u64>| Counters {
            net_tx_bytes: sent,
            net_tx_out_of_site_bytes: out,
            ..Counters::default()
        };
        let rate = |before: Counters, now: Counters| {
            values(Some((1000, &before)), 3000, &now)
                .into_iter()
                .find(|(m, _)| *m == Metric::NetTxOutOfSite)
                .map(|(_, v)| v)
        };
        assert_eq!(rate(at(0, Some(100)), at(1000, Some(700))), Some(300.0));
        // The first reading that tells has nothing to compare with; a VM never tells.
        assert_eq!(rate(at(0, None), at(1000, Some(700))), None);
        assert_eq!(rate(at(0, None), at(1000, None)), None);
        // A restarted instance: no rate this time.
        assert_eq!(rate(at(0, Some(900)), at(1000, Some(100))), None);
    }

    fn counters(cpu_secs: u64, read: u64) -> Counters {
        Counters {
            cpu_ns: cpu_secs * 1_000_000_000,
            cpus: 2,
            memory_used_mib: 100,
            memory_total_mib: 400,
            disk_read_bytes: read,
            ..Counters::default()
        }
    }

    #[test]
    fn aggregates_average_cpu_and_sum_the_rest() {
        let a = vec![Bucket::new(0, 80.0), Bucket::new(1, 60.0)];
        let b = vec![Bucket::new(0, 20.0)];
        let cpu = aggregate(Metric::Cpu, &[a.clone(), b.clone()]);
        assert_eq!(cpu.len(), 2);
        assert_eq!((cpu[0].mean(), cpu[0].min, cpu[0].max), (50.0, 20.0, 80.0));
        assert_eq!(cpu[1].mean(), 60.0);
        let memory = aggregate(Metric::Memory, &[a, b]);
        assert_eq!(
            (memory[0].mean(), memory[0].min, memory[0].max),
            (100.0, 100.0, 100.0)
        );
    }

    #[test]
    fn a_restart_goes_on_filling_the_open_buckets() {
        let host = HostId::new("a").unwrap();
        let reading = |s: u64| Sample {
            at_unix_ms: 3_600_000 + s * 1000,
            host: counters(s, 0),
            workloads: Vec::new(),
        };
        let mut before = TimeSeries::default();
        for s in 0..30 {
            before.ingest(&host, &[reading(s)]);
        }
        let kept: Vec<OpenState> = before
            .flush(3_600 + 30)
            .into_iter()
            .filter_map(|w| match w {
                StatsWrite::Open(state) => Some(state),
                _ => None,
            })
            .collect();
        assert_eq!(kept.len(), before.series_count());
        // The new console takes them back, and the minute goes on from 30 s.
        let mut after = TimeSeries::default();
        after.restore(kept.clone());
        for s in 30..61 {
            let writes = after.ingest(&host, &[reading(s)]);
            for w in writes {
                if let StatsWrite::Bucket {
                    series,
                    level: 1,
                    bucket,
                } = w
                    && series == "host/a/memory"
                {
                    // The whole minute: 30 readings before the restart, 30 after.
                    assert_eq!((bucket.start_secs, bucket.count), (3_600, 60));
                    return;
                }
            }
        }
        panic!("the minute never closed");
    }

    #[test]
    fn counters_become_rates_and_a_restart_gives_none() {
        let first = counters(10, 1000);
        assert_eq!(values(None, 1000, &first), vec![(Metric::Memory, 100.0)]);
        // One CPU-second over 2 CPUs in 1 s: 50 %; 500 bytes in 1 s.
        let next = counters(11, 1500);
        let v = values(Some((1000, &first)), 2000, &next);
        assert!(v.contains(&(Metric::Cpu, 50.0)), "{v:?}");
        assert!(v.contains(&(Metric::DiskRead, 500.0)), "{v:?}");
        // The workload restarted: its counters went down; no rate, memory still.
        let restarted = counters(1, 10);
        let v = values(Some((2000, &next)), 3000, &restarted);
        assert_eq!(v.iter().filter(|(m, _)| *m == Metric::Cpu).count(), 0);
        assert!(v.contains(&(Metric::Memory, 100.0)));
        // A reading from the past (a clock step) gives no rate either.
        assert_eq!(values(Some((5000, &first)), 3000, &next).len(), 1);
    }

    #[test]
    fn seconds_go_out_a_minute_at_a_time_and_minutes_when_they_close() {
        let host = HostId::new("a").unwrap();
        let vm = VmName::new("web").unwrap();
        let mut ts = TimeSeries::default();
        let mut writes = Vec::new();
        // 61 readings: 0 s..=60 s, the VM's CPU counter going up 1 s per second over 2 CPUs.
        for s in 0..=60u64 {
            let sample = Sample {
                at_unix_ms: 120_000 + s * 1000,
                host: counters(s, 0),
                workloads: vec![WorkloadSample {
                    name: vm.clone(),
                    counters: counters(s, s * 10),
                }],
            };
            writes.extend(ts.ingest(&host, &[sample]));
        }
        let key = series_key(&Subject::Workload(vm.clone()), Metric::Cpu);
        // Minute 120 s closed: its 59 rated seconds (the first reading has no rate).
        let seconds = writes
            .iter()
            .find_map(|w| match w {
                StatsWrite::Seconds {
                    series,
                    minute_start_secs,
                    values,
                } if *series == key => Some((*minute_start_secs, values.clone())),
                _ => None,
            })
            .unwrap();
        assert_eq!(seconds.0, 120);
        assert_eq!(seconds.1.len(), 59);
        assert!(seconds.1.iter().all(|(_, v)| *v == 50.0));
        let minute = writes
            .iter()
            .find_map(|w| match w {
                StatsWrite::Bucket {
                    series,
                    level: 1,
                    bucket,
                } if *series == key => Some(*bucket),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            (minute.start_secs, minute.count, minute.mean()),
            (120, 59, 50.0)
        );
        // What is open: second 180 at level 0, the hour at level 2.
        assert_eq!(ts.open(&key, 0).len(), 1);
        assert_eq!(ts.open(&key, 2)[0].count, 60);
        let latest = ts.latest();
        assert!(latest.contains(&(key.clone(), 50.0)), "{latest:?}");
        // A flush keeps what is open as one row per series, not as bucket rows.
        let flushed = ts.flush(181);
        assert!(flushed.iter().all(|w| matches!(w, StatsWrite::Open(_))));
        assert!(flushed.iter().any(
            |w| matches!(w, StatsWrite::Open(o) if o.series == key && o.hour.is_some_and(|h| h.count == 60))
        ));
        // Host and workload, the six metrics a sample gives each (not the application's, nor
        // what left the site: neither says).
        assert_eq!(ts.series_count(), 2 * 6);
        // Shares in turn write what one whole flush writes.
        let mut shared = Vec::new();
        let mut again = TimeSeries::default();
        for s in 0..=60u64 {
            again.ingest(
                &host,
                &[Sample {
                    at_unix_ms: 120_000 + s * 1000,
                    host: counters(s, 0),
                    workloads: Vec::new(),
                }],
            );
        }
        for share in 0..FLUSH_SHARES {
            shared.extend(again.flush_share(181, share));
        }
        assert_eq!(shared.len(), again.series_count());
        assert!(again.flush_share(181, 0).is_empty());
        // Nothing new: nothing written again. Idle past the limit: forgotten, after a last
        // write of what it had.
        assert!(ts.flush(190).is_empty());
        assert_eq!(ts.series_count(), 2 * 6);
        let last = ts.flush(180 + IDLE_FORGET_SECS + 1);
        assert!(
            last.iter().any(
                |w| matches!(w, StatsWrite::Bucket { level: 2, series, .. } if *series == key)
            )
        );
        assert!(!last.iter().any(|w| matches!(w, StatsWrite::Open(_))));
        assert_eq!(ts.series_count(), 0);
        assert!(ts.latest().is_empty());
    }
}
