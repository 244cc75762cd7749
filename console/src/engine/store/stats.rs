//! Time series in the store: one row per closed bucket (levels 1 and 2) or per minute of
//! one-second values (level 0), keyed by `(LEVEL|SERIES, start)` so that a series' range is
//! one range read. Rows older than their level keeps are pruned as new ones come.

use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::StoreError;
use crate::engine::{
    statistics::rollup::{Bucket, RESOLUTIONS},
    statistics::series::{OpenState, StatsWrite},
};

pub(super) const STATS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("stats");
/// What each series had open at the last flush, by series: picked up after a restart.
pub(super) const STATS_OPEN: TableDefinition<&str, &[u8]> = TableDefinition::new("stats_open");

fn level_key(level: usize, series: &str) -> String {
    format!("{level}|{series}")
}

fn encode_bucket(b: &Bucket) -> [u8; 28] {
    let mut out = [0u8; 28];
    out[..8].copy_from_slice(&b.min.to_le_bytes());
    out[8..16].copy_from_slice(&b.max.to_le_bytes());
    out[16..24].copy_from_slice(&b.sum.to_le_bytes());
    out[24..].copy_from_slice(&b.count.to_le_bytes());
    out
}

fn decode_bucket(start_secs: u64, bytes: &[u8]) -> Option<Bucket> {
    let f = |i: usize| Some(f64::from_le_bytes(bytes.get(i..i + 8)?.try_into().ok()?));
    Some(Bucket {
        start_secs,
        min: f(0)?,
        max: f(8)?,
        sum: f(16)?,
        count: u32::from_le_bytes(bytes.get(24..28)?.try_into().ok()?),
    })
}

fn encode_seconds(values: &[(u8, f32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 5);
    for (second, value) in values {
        out.push(*second);
        out.extend_from_slice(&value.to_le_bytes());
    }
    out
}

fn decode_seconds(minute_start_secs: u64, bytes: &[u8]) -> Vec<Bucket> {
    bytes
        .chunks_exact(5)
        .map(|c| {
            let value = f32::from_le_bytes([c[1], c[2], c[3], c[4]]);
            Bucket::new(minute_start_secs + u64::from(c[0]), f64::from(value))
        })
        .collect()
}

fn encode_open(state: &OpenState) -> Vec<u8> {
    let mut out = state.minute_start_secs.to_le_bytes().to_vec();
    for bucket in [&state.minute, &state.hour] {
        match bucket {
            Some(b) => {
                out.push(1);
                out.extend_from_slice(&b.start_secs.to_le_bytes());
                out.extend_from_slice(&encode_bucket(b));
            }
            None => out.push(0),
        }
    }
    out.extend_from_slice(&encode_seconds(&state.seconds));
    out
}

fn decode_open(series: &str, bytes: &[u8]) -> Option<OpenState> {
    let minute_start_secs = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let mut at = 8;
    let mut buckets = [None, None];
    for slot in &mut buckets {
        match bytes.get(at)? {
            0 => at += 1,
            1 => {
                let start = u64::from_le_bytes(bytes.get(at + 1..at + 9)?.try_into().ok()?);
                *slot = Some(decode_bucket(start, bytes.get(at + 9..at + 37)?)?);
                at += 37;
            }
            _ => return None,
        }
    }
    let rest = bytes.get(at..)?;
    let seconds = rest
        .chunks_exact(5)
        .map(|c| (c[0], f32::from_le_bytes([c[1], c[2], c[3], c[4]])))
        .collect();
    let [minute, hour] = buckets;
    Some(OpenState {
        series: series.to_string(),
        minute_start_secs,
        seconds,
        minute,
        hour,
    })
}

/// Every series' open state kept at the last flush (one that does not decode is skipped).
pub(super) fn load_open(tx: &redb::ReadTransaction) -> Result<Vec<OpenState>, StoreError> {
    let table = tx.open_table(STATS_OPEN)?;
    let mut out = Vec::new();
    for row in table.iter()? {
        let (k, v) = row?;
        if let Some(state) = decode_open(k.value(), v.value()) {
            out.push(state);
        }
    }
    Ok(out)
}

/// Turns open states older than an hour into rows and drops them: their series have had no
/// reading since (a console stopped that long), and flushes keep only the open state.
pub(super) fn prune_open(tx: &redb::WriteTransaction, now_secs: u64) -> Result<(), StoreError> {
    let mut open = tx.open_table(STATS_OPEN)?;
    let mut stale = Vec::new();
    for row in open.iter()? {
        let (k, v) = row?;
        match decode_open(k.value(), v.value()) {
            Some(state) if state.minute_start_secs + 3600 < now_secs => stale.push(state),
            Some(_) => {}
            None => stale.push(OpenState {
                series: k.value().to_string(),
                minute_start_secs: 0,
                seconds: Vec::new(),
                minute: None,
                hour: None,
            }),
        }
    }
    let mut table = tx.open_table(STATS)?;
    for state in stale {
        open.remove(state.series.as_str())?;
        if !state.seconds.is_empty() {
            write(
                &mut table,
                &mut open,
                &StatsWrite::Seconds {
                    series: state.series.clone(),
                    minute_start_secs: state.minute_start_secs,
                    values: state.seconds.clone(),
                },
            )?;
        }
        for (level, bucket) in [(1, state.minute), (2, state.hour)] {
            if let Some(bucket) = bucket {
                write(
                    &mut table,
                    &mut open,
                    &StatsWrite::Bucket {
                        series: state.series.clone(),
                        level,
                        bucket,
                    },
                )?;
            }
        }
    }
    Ok(())
}

/// Writes one row (a later write of the same bucket replaces it) and drops the rows of its
/// series that its level no longer keeps.
pub(super) fn write(
    table: &mut redb::Table<(&str, u64), &[u8]>,
    open: &mut redb::Table<&str, &[u8]>,
    w: &StatsWrite,
) -> Result<(), StoreError> {
    let (level, series, start) = match w {
        StatsWrite::Open(state) => {
            open.insert(state.series.as_str(), encode_open(state).as_slice())?;
            return Ok(());
        }
        StatsWrite::Bucket {
            series,
            level,
            bucket,
        } => {
            let key = level_key(*level, series);
            table.insert(
                (key.as_str(), bucket.start_secs),
                encode_bucket(bucket).as_slice(),
            )?;
            (*level, series, bucket.start_secs)
        }
        StatsWrite::Seconds {
            series,
            minute_start_secs,
            values,
        } => {
            let key = level_key(0, series);
            table.insert(
                (key.as_str(), *minute_start_secs),
                encode_seconds(values).as_slice(),
            )?;
            (0, series, *minute_start_secs)
        }
    };
    // Pruned once per minute of level 0, per hour of level 1 and per day of level 2.
    let every = [60, 3600, 86_400][level.min(2)];
    if start % every == 0 {
        let key = level_key(level, series);
        let res = RESOLUTIONS[level.min(2)];
        // A level-0 row holds a minute: it goes once its last second is too old.
        let cutoff = res
            .oldest_kept(start)
            .saturating_sub(if level == 0 { 59 } else { 0 });
        table.retain_in((key.as_str(), 0u64)..(key.as_str(), cutoff), |_, _| false)?;
    }
    Ok(())
}

/// Reads time series from the store, off the engine's thread (redb readers do not wait for
/// the writer).
#[derive(Clone)]
pub struct StatsReader {
    pub(super) db: Arc<Database>,
    /// The writer's progress and the batch to wait for before the first read.
    pub(super) written: Option<(Arc<super::Committed>, u64)>,
    /// Set once that wait is over: a query reads many series, and waits only once.
    pub(super) waited: std::sync::OnceLock<()>,
}

/// The longest a read waits for the writer: past it, it reads what is committed.
const WRITES_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl std::fmt::Debug for StatsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatsReader")
    }
}

impl StatsReader {
    /// Waits until the writes handed out before this reader was made are committed.
    fn wait_for_writes(&self) {
        if let Some((committed, seq)) = &self.written {
            self.waited
                .get_or_init(|| committed.wait_through(*seq, WRITES_WAIT));
        }
    }

    /// The workloads deleted since `from_secs`, oldest first (one that does not decode is
    /// skipped).
    pub fn departed_since(&self, from_secs: u64) -> Result<Vec<super::DepartedRecord>, StoreError> {
        self.wait_for_writes();
        let tx = self.db.begin_read()?;
        let table = match tx.open_table(super::DEPARTED) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for row in table.range((from_secs, "")..)? {
            let (_, v) = row?;
            if let Ok(record) = super::decode::<super::DepartedRecord>(v.value()) {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// The stored buckets of `series` at `level` that start in `from_secs..to_secs`.
    pub fn buckets(
        &self,
        series: &str,
        level: usize,
        from_secs: u64,
        to_secs: u64,
    ) -> Result<Vec<Bucket>, StoreError> {
        self.wait_for_writes();
        let tx = self.db.begin_read()?;
        let table = match tx.open_table(STATS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let key = level_key(level, series);
        // A level-0 row starts at its minute: the one holding `from_secs` starts before it.
        let first = if level == 0 {
            RESOLUTIONS[1].bucket_start(from_secs)
        } else {
            from_secs
        };
        let mut out = Vec::new();
        for row in table.range((key.as_str(), first)..(key.as_str(), to_secs))? {
            let (k, v) = row?;
            let start = k.value().1;
            if level == 0 {
                out.extend(
                    decode_seconds(start, v.value())
                        .into_iter()
                        .filter(|b| b.start_secs >= from_secs && b.start_secs < to_secs),
                );
            } else if let Some(b) = decode_bucket(start, v.value()) {
                out.push(b);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, Arc<Database>) {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("s.redb")).unwrap();
        (dir, Arc::new(db))
    }

    fn put(db: &Database, writes: &[StatsWrite]) {
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(STATS).unwrap();
            let mut o = tx.open_table(STATS_OPEN).unwrap();
            for w in writes {
                write(&mut t, &mut o, w).unwrap();
            }
        }
        tx.commit().unwrap();
    }

    #[test]
    fn rows_read_back_by_range_and_old_ones_go() {
        let (_dir, db) = db();
        let reader = StatsReader {
            db: db.clone(),
            written: None,
            waited: Default::default(),
        };
        let minute = |start: u64, mean: f64| StatsWrite::Bucket {
            series: "host/a/cpu".into(),
            level: 1,
            bucket: Bucket {
                start_secs: start,
                min: mean - 1.0,
                max: mean + 1.0,
                sum: mean * 60.0,
                count: 60,
            },
        };
        put(&db, &[minute(0, 5.0), minute(60, 6.0), minute(120, 7.0)]);
        let got = reader.buckets("host/a/cpu", 1, 60, 1000).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].start_secs, got[0].mean(), got[0].max),
            (60, 6.0, 7.0)
        );
        // Another series and another level do not mix in.
        assert!(
            reader
                .buckets("host/a/memory", 1, 0, 1000)
                .unwrap()
                .is_empty()
        );
        assert!(reader.buckets("host/a/cpu", 2, 0, 1000).unwrap().is_empty());
        // Seconds: a minute per row, read back second by second within the range.
        put(
            &db,
            &[StatsWrite::Seconds {
                series: "host/a/cpu".into(),
                minute_start_secs: 600,
                values: vec![(0, 1.0), (30, 2.0), (59, 3.0)],
            }],
        );
        let got = reader.buckets("host/a/cpu", 0, 620, 700).unwrap();
        let seconds: Vec<(u64, f64)> = got.iter().map(|b| (b.start_secs, b.mean())).collect();
        assert_eq!(seconds, vec![(630, 2.0), (659, 3.0)]);
        // A week and a day later, the first minutes are pruned when the hour's row lands.
        let later = 8 * 86_400;
        put(&db, &[minute(later, 9.0)]);
        let all = reader.buckets("host/a/cpu", 1, 0, u64::MAX).unwrap();
        assert_eq!(all.len(), 1, "{all:?}");
        // An hour after it, the second-rows go too.
        put(
            &db,
            &[StatsWrite::Seconds {
                series: "host/a/cpu".into(),
                minute_start_secs: 600 + 7200,
                values: vec![(0, 1.0)],
            }],
        );
        assert!(reader.buckets("host/a/cpu", 0, 0, 700).unwrap().is_empty());
        assert_eq!(decode_bucket(0, &[1, 2, 3]), None);
        // Open states read back as they were written; an hour later they are pruned.
        let state = OpenState {
            series: "vm/web/cpu".into(),
            minute_start_secs: 7200,
            seconds: vec![(3, 1.5), (4, 2.5)],
            minute: Some(Bucket::new(7200, 2.0)),
            hour: None,
        };
        put(&db, &[StatsWrite::Open(state.clone())]);
        let tx = db.begin_read().unwrap();
        assert_eq!(load_open(&tx).unwrap(), vec![state]);
        drop(tx);
        let tx = db.begin_write().unwrap();
        prune_open(&tx, 7200 + 3601).unwrap();
        tx.commit().unwrap();
        assert!(load_open(&db.begin_read().unwrap()).unwrap().is_empty());
        assert_eq!(decode_open("x", &[1, 2]), None);
    }

    #[test]
    fn an_open_state_over_an_hour_old_becomes_rows() {
        let (_dir, db) = db();
        let reader = StatsReader {
            db: db.clone(),
            written: None,
            waited: Default::default(),
        };
        let state = |series: &str, minute_start_secs: u64| {
            StatsWrite::Open(OpenState {
                series: series.into(),
                minute_start_secs,
                seconds: vec![(0, 10.0), (1, 20.0)],
                minute: Some(Bucket::new(minute_start_secs, 15.0)),
                hour: Some(Bucket::new(
                    minute_start_secs - minute_start_secs % 3600,
                    15.0,
                )),
            })
        };
        put(
            &db,
            &[state("vm/old/cpu", 7200), state("vm/new/cpu", 20_000)],
        );
        let tx = db.begin_write().unwrap();
        prune_open(&tx, 20_030).unwrap();
        tx.commit().unwrap();
        // The old one's seconds and buckets are rows now; the recent one stays open.
        assert_eq!(reader.buckets("vm/old/cpu", 0, 0, 30_000).unwrap().len(), 2);
        assert_eq!(
            reader.buckets("vm/old/cpu", 1, 0, 30_000).unwrap()[0].mean(),
            15.0
        );
        assert_eq!(
            reader.buckets("vm/old/cpu", 2, 0, 30_000).unwrap()[0].start_secs,
            7200
        );
        assert!(
            reader
                .buckets("vm/new/cpu", 1, 0, 30_000)
                .unwrap()
                .is_empty()
        );
        let open = load_open(&db.begin_read().unwrap()).unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].series, "vm/new/cpu");
    }
}
