//! The audit log's driver: appends each record in the engine's order, committed before the
//! request goes on.

use std::sync::Arc;

use super::chain::{self, AuditEntry};
use crate::engine::{EngineError, Reply, actor::Actor, store::AuditReader};

impl Actor {
    /// Appends `entry`; the reply (its sequence number) waits for the commit.
    pub(in crate::engine) fn append_audit(&mut self, entry: AuditEntry, reply: Reply<u64>) {
        if audit_write_fails() {
            let _ = reply.send(Err(EngineError::Store(
                "the audit log refused the write (failpoint)".into(),
            )));
            return;
        }
        let record = chain::seal(self.audit.last.as_ref(), entry);
        let seq = record.seq;
        self.store.put_audit(&record);
        self.audit.last = Some(record);
        self.reply_after_commit(reply, seq);
    }

    /// A reader of the whole log, for listing and checking it off the engine's thread.
    pub(in crate::engine) fn audit_reader(&self) -> Arc<AuditReader> {
        Arc::new(self.store.audit_reader())
    }
}

/// Fault injection for the test suites: with `DUNES_FAILPOINT=audit-write`, every audit
/// write fails. Only in a build with the `failpoints` feature.
#[cfg(feature = "failpoints")]
fn audit_write_fails() -> bool {
    static FAILS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FAILS.get_or_init(|| std::env::var("DUNES_FAILPOINT").is_ok_and(|v| v == "audit-write"))
}

#[cfg(not(feature = "failpoints"))]
fn audit_write_fails() -> bool {
    false
}
