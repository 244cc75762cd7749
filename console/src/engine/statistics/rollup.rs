//! Rollups of a metric's samples: 1 s buckets kept for an hour, 1 min buckets for 7 days and
//! 1 h buckets for a year, each bucket with the min, mean and max of the samples in it. Every
//! level is aggregated from the samples themselves (not from the level below), so a bucket's
//! mean is exact and its min and max are the samples'. Pure: the store keeps closed buckets,
//! this module says what they hold, when they close and when they expire.

/// One level of the rollup: buckets of `step_secs`, kept for `keep_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolution {
    pub step_secs: u64,
    pub keep_secs: u64,
}

impl Resolution {
    /// Where the bucket holding `at_secs` starts.
    pub fn bucket_start(&self, at_secs: u64) -> u64 {
        at_secs - at_secs % self.step_secs
    }

    /// The most buckets this level holds at once.
    pub fn capacity(&self) -> u64 {
        self.keep_secs / self.step_secs
    }

    /// The first bucket start still kept at `now_secs`; older buckets are dropped.
    pub fn oldest_kept(&self, now_secs: u64) -> u64 {
        self.bucket_start(now_secs.saturating_sub(self.keep_secs - self.step_secs))
    }
}

/// The three levels, finest first.
pub const RESOLUTIONS: [Resolution; 3] = [
    Resolution {
        step_secs: 1,
        keep_secs: 3600,
    },
    Resolution {
        step_secs: 60,
        keep_secs: 7 * 86_400,
    },
    Resolution {
        step_secs: 3600,
        keep_secs: 365 * 86_400,
    },
];

/// The samples of one bucket, summed up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    pub start_secs: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub count: u32,
}

impl Bucket {
    pub fn new(start_secs: u64, value: f64) -> Self {
        Bucket {
            start_secs,
            min: value,
            max: value,
            sum: value,
            count: 1,
        }
    }

    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / f64::from(self.count)
        }
    }

    pub fn add(&mut self, value: f64) {
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.sum += value;
        self.count = self.count.saturating_add(1);
    }

    /// Two summaries of the same bucket (a restart's and a late batch's) as one.
    pub fn merge(&mut self, other: &Bucket) {
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sum += other.sum;
        self.count = self.count.saturating_add(other.count);
    }
}

/// What to do with a sample: which buckets it went into, and which buckets closed before it.
#[derive(Debug, Default, PartialEq)]
pub struct Ingested {
    /// `(level, bucket)` of every bucket that closed: the store writes them.
    pub closed: Vec<(usize, Bucket)>,
    /// Samples older than an open bucket of a level: they belong to a closed bucket, which
    /// the store merges them into (`(level, bucket start, value)`).
    pub late: Vec<(usize, u64, f64)>,
}

/// The open bucket of each level for one metric.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rollup {
    open: [Option<Bucket>; 3],
}

impl Rollup {
    /// Adds a sample taken at `at_secs`. A non-finite value is not a measurement: ignored.
    pub fn ingest(&mut self, at_secs: u64, value: f64) -> Ingested {
        let mut out = Ingested::default();
        if !value.is_finite() {
            return out;
        }
        for (level, res) in RESOLUTIONS.iter().enumerate() {
            let start = res.bucket_start(at_secs);
            match &mut self.open[level] {
                Some(b) if b.start_secs == start => b.add(value),
                Some(b) if b.start_secs > start => out.late.push((level, start, value)),
                slot => {
                    if let Some(done) = slot.take() {
                        out.closed.push((level, done));
                    }
                    *slot = Some(Bucket::new(start, value));
                }
            }
        }
        out
    }

    /// Closes every bucket that ends at or before `now_secs` (no sample came for a while).
    pub fn close_until(&mut self, now_secs: u64) -> Vec<(usize, Bucket)> {
        let mut closed = Vec::new();
        for (level, res) in RESOLUTIONS.iter().enumerate() {
            if let Some(b) = self.open[level]
                && b.start_secs + res.step_secs <= now_secs
            {
                closed.push((level, b));
                self.open[level] = None;
            }
        }
        closed
    }

    /// The bucket a level is filling, if any.
    pub fn open_bucket(&self, level: usize) -> Option<&Bucket> {
        self.open.get(level).and_then(|b| b.as_ref())
    }

    /// Picks up the buckets a level was filling before a restart: later samples of the same
    /// bucket add to it; a later bucket closes it.
    pub fn restore(&mut self, level: usize, bucket: Bucket) {
        if let Some(slot) = self.open.get_mut(level) {
            *slot = Some(bucket);
        }
    }
}

/// The finest level that still holds `from_secs` at `now_secs`, and at most `max_points`
/// buckets between `from_secs` and `now_secs`: what a chart or `stats --since` reads.
pub fn level_for(from_secs: u64, now_secs: u64, max_points: u64) -> usize {
    let span = now_secs.saturating_sub(from_secs).max(1);
    RESOLUTIONS
        .iter()
        .position(|r| r.oldest_kept(now_secs) <= from_secs && span / r.step_secs <= max_points)
        .unwrap_or(RESOLUTIONS.len() - 1)
}

/// Buckets of a finer level summed up into buckets of `step_secs` (for a chart that shows
/// fewer points than a level has).
pub fn regroup(buckets: &[Bucket], step_secs: u64) -> Vec<Bucket> {
    let step = step_secs.max(1);
    let mut out: Vec<Bucket> = Vec::new();
    for b in buckets {
        let start = b.start_secs - b.start_secs % step;
        match out.last_mut() {
            Some(last) if last.start_secs == start => last.merge(b),
            _ => out.push(Bucket {
                start_secs: start,
                ..*b
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_close_at_their_boundaries_with_exact_min_mean_max() {
        let mut r = Rollup::default();
        // 59.0 s and 59.9 s share the 1 s bucket 59 and the minute bucket 0.
        assert!(r.ingest(59, 1.0).closed.is_empty());
        assert!(r.ingest(59, 3.0).closed.is_empty());
        // 60 s closes second 59 and minute 0, not hour 0.
        let out = r.ingest(60, 10.0);
        let levels: Vec<usize> = out.closed.iter().map(|c| c.0).collect();
        assert_eq!(levels, vec![0, 1]);
        let second = out.closed[0].1;
        assert_eq!((second.start_secs, second.min, second.max), (59, 1.0, 3.0));
        assert_eq!(second.mean(), 2.0);
        let minute = out.closed[1].1;
        assert_eq!((minute.start_secs, minute.count), (0, 2));
        // The hour holds all three samples.
        let hour = r.open_bucket(2).unwrap();
        assert_eq!((hour.min, hour.max, hour.count), (1.0, 10.0, 3));
        assert!((hour.mean() - 14.0 / 3.0).abs() < 1e-12);
        // 3600 s closes the hour too.
        let out = r.ingest(3600, 5.0);
        assert_eq!(
            out.closed.iter().map(|c| c.0).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn a_late_sample_goes_to_its_closed_bucket_and_nonsense_is_ignored() {
        let mut r = Rollup::default();
        r.ingest(120, 1.0);
        let out = r.ingest(119, 2.0);
        assert!(out.closed.is_empty());
        // Second 119 and minute 1 are behind; hour 0 is still open and takes it.
        assert_eq!(out.late, vec![(0, 119, 2.0), (1, 60, 2.0)]);
        assert_eq!(r.open_bucket(2).unwrap().count, 2);
        assert_eq!(r.ingest(121, f64::NAN), Ingested::default());
        assert_eq!(r.ingest(121, f64::INFINITY), Ingested::default());
    }

    #[test]
    fn quiet_metrics_close_on_time_and_levels_keep_what_they_promise() {
        let mut r = Rollup::default();
        r.ingest(10, 1.0);
        assert!(r.close_until(10).is_empty());
        assert_eq!(r.close_until(11).len(), 1);
        assert_eq!(r.close_until(60).len(), 1);
        assert_eq!(r.close_until(3600).len(), 1);
        assert!(r.close_until(99_999).is_empty());

        assert_eq!(RESOLUTIONS[0].capacity(), 3600);
        assert_eq!(RESOLUTIONS[1].capacity(), 10_080);
        assert_eq!(RESOLUTIONS[2].capacity(), 8760);
        let now = 10 * 86_400 + 30;
        // An hour of seconds back, the oldest kept second is 3599 s before now.
        assert_eq!(RESOLUTIONS[0].oldest_kept(now), now - 3599);
        assert_eq!(RESOLUTIONS[0].oldest_kept(5), 0);
    }

    #[test]
    fn a_query_reads_the_finest_level_that_covers_it() {
        let now = 30 * 86_400;
        // 15 minutes: seconds (900 points).
        assert_eq!(level_for(now - 900, now, 4000), 0);
        // 15 minutes but only 300 points wanted: minutes.
        assert_eq!(level_for(now - 900, now, 300), 1);
        // A day: minutes. 7 days: minutes (10,080 points allowed). 30 days: hours.
        assert_eq!(level_for(now - 86_400, now, 20_000), 1);
        assert_eq!(level_for(now - 7 * 86_400 + 60, now, 20_000), 1);
        assert_eq!(level_for(now - 30 * 86_400, now, 20_000), 2);

        let minutes: Vec<Bucket> = (0..10).map(|i| Bucket::new(i * 60, i as f64)).collect();
        let five = regroup(&minutes, 300);
        assert_eq!(five.len(), 2);
        assert_eq!((five[0].min, five[0].max, five[0].mean()), (0.0, 4.0, 2.0));
        assert_eq!((five[1].start_secs, five[1].count), (300, 5));
    }
}
