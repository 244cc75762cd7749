//! The audit log's chain: each record carries the hash of the one before it, so an edited,
//! removed or reordered record shows. Pure: no I/O.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What one record says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub time_ms: u64,
    /// The operator's name, or `local` for whoever holds the control socket.
    pub operator: String,
    /// Of the operator's key (`sha256:…`); none for the local administrator.
    pub fingerprint: Option<String>,
    /// The operation's name (`vm-stop`).
    pub operation: String,
    /// What it touches, as the engine saw it then.
    pub target: String,
    /// The request's fields as JSON, secrets left out.
    pub parameters: String,
    /// `started`, then in a second record `ok` or `failed: …`; or `refused: …` alone.
    pub outcome: String,
    /// How long it ran, in the record of its outcome.
    pub duration_ms: Option<u64>,
    /// In the record of an outcome: the sequence number of its request's record.
    pub request: Option<u64>,
}

/// A record as stored: its place in the chain and the hashes that hold the chain together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub entry: AuditEntry,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

/// The hash before the first record.
pub const GENESIS: [u8; 32] = [0; 32];

fn hash_of(seq: u64, entry: &AuditEntry, prev_hash: &[u8; 32]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"dunes-audit-1");
    hasher.update(prev_hash);
    hasher.update(seq.to_be_bytes());
    // MessagePack with field names: one encoding for one entry.
    hasher.update(rmp_serde::to_vec_named(entry).unwrap_or_default());
    hasher.finalize().into()
}

/// The record that follows `prev` (none: the first).
pub fn seal(prev: Option<&AuditRecord>, entry: AuditEntry) -> AuditRecord {
    let (seq, prev_hash) = prev.map_or((1, GENESIS), |p| (p.seq + 1, p.hash));
    AuditRecord {
        seq,
        hash: hash_of(seq, &entry, &prev_hash),
        entry,
        prev_hash,
    }
}

/// What a check of the whole log found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Intact {
        records: u64,
    },
    /// The first record that is not what the chain says, and why.
    Broken {
        seq: u64,
        problem: String,
    },
}

/// Checks every record, in the order of their keys: each must decode, sit under its own
/// number, follow the one before it without a gap, and hash to what it says.
pub fn verify(records: impl IntoIterator<Item = (u64, Result<AuditRecord, String>)>) -> Verdict {
    let mut prev: Option<AuditRecord> = None;
    let mut count = 0;
    for (key, record) in records {
        let expected = prev.as_ref().map_or(1, |p| p.seq + 1);
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                return Verdict::Broken {
                    seq: key,
                    problem: format!("record {key} does not decode ({e})"),
                };
            }
        };
        if key != expected {
            let problem = if key > expected {
                if expected + 1 == key {
                    format!("record {expected} is missing")
                } else {
                    format!("records {expected} to {} are missing", key - 1)
                }
            } else {
                format!("record {key} is out of order")
            };
            return Verdict::Broken {
                seq: expected,
                problem,
            };
        }
        if record.seq != key {
            return Verdict::Broken {
                seq: key,
                problem: format!("record {key} says it is record {}", record.seq),
            };
        }
        let prev_hash = prev.as_ref().map_or(GENESIS, |p| p.hash);
        if record.prev_hash != prev_hash {
            return Verdict::Broken {
                seq: key,
                problem: format!(
                    "record {key} does not follow record {}: the one before it was changed or replaced",
                    key - 1
                ),
            };
        }
        if hash_of(record.seq, &record.entry, &record.prev_hash) != record.hash {
            return Verdict::Broken {
                seq: key,
                problem: format!("record {key} was changed after it was written"),
            };
        }
        count += 1;
        prev = Some(record);
    }
    Verdict::Intact { records: count }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(operation: &str) -> AuditEntry {
        AuditEntry {
            time_ms: 1,
            operator: "alice".into(),
            fingerprint: None,
            operation: operation.into(),
            target: "wiki".into(),
            parameters: "{}".into(),
            outcome: "ok".into(),
            duration_ms: Some(3),
            request: None,
        }
    }

    fn chain(n: usize) -> Vec<AuditRecord> {
        let mut out: Vec<AuditRecord> = Vec::new();
        for i in 0..n {
            let next = seal(out.last(), entry(&format!("op-{i}")));
            out.push(next);
        }
        out
    }

    fn keyed(records: &[AuditRecord]) -> Vec<(u64, Result<AuditRecord, String>)> {
        records.iter().map(|r| (r.seq, Ok(r.clone()))).collect()
    }

    #[test]
    fn an_untouched_chain_verifies() {
        assert_eq!(verify(keyed(&chain(5))), Verdict::Intact { records: 5 });
        assert_eq!(verify(Vec::new()), Verdict::Intact { records: 0 });
    }

    #[test]
    fn an_edit_a_removal_or_a_rewrite_names_the_first_bad_record() {
        let mut edited = chain(5);
        edited[2].entry.outcome = "failed: nothing".into();
        assert_eq!(
            verify(keyed(&edited)),
            Verdict::Broken {
                seq: 3,
                problem: "record 3 was changed after it was written".into()
            }
        );
        let mut removed = chain(5);
        removed.remove(1);
        assert!(
            matches!(verify(keyed(&removed)), Verdict::Broken { seq: 2, ref problem } if problem == "record 2 is missing")
        );
        // Rehashing the edited record is not enough: the next one still points at the old.
        let mut rehashed = chain(5);
        rehashed[2].entry.outcome = "ok, honest".into();
        rehashed[2].hash = hash_of(3, &rehashed[2].entry, &rehashed[2].prev_hash);
        assert!(matches!(
            verify(keyed(&rehashed)),
            Verdict::Broken { seq: 4, .. }
        ));
        // The last records cut off cannot be told from a shorter log, but one cut in the
        // middle can; a record that does not decode is named.
        let mut garbled = keyed(&chain(3));
        garbled[1].1 = Err("bad bytes".into());
        assert!(matches!(verify(garbled), Verdict::Broken { seq: 2, .. }));
    }
}
