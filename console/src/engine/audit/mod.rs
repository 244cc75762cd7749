//! The audit log: every change an operator asks for and every refusal, appended to a
//! hash-chained table and committed before the request goes on. `chain` seals and checks
//! records (pure); the driver here appends them in the engine's order.

pub mod chain;
mod driver;

pub use chain::{AuditEntry, AuditRecord, Verdict};

/// The end of the chain, owned by the engine: the next record follows it.
#[derive(Debug, Default)]
pub(in crate::engine) struct AuditState {
    last: Option<AuditRecord>,
}

impl AuditState {
    pub(in crate::engine) fn new(last: Option<AuditRecord>) -> AuditState {
        AuditState { last }
    }
}
