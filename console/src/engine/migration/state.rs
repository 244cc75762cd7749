//! What the migrations domain holds: every journal by id, which have effects under way, and
//! what their effects learned.

use crate::engine::{migration::machine::MigrationJournal, records::now_ms};

/// What an effect learned besides its outcome.
#[derive(Debug, Default)]
pub(in crate::engine) struct Learned {
    pub(in crate::engine) bytes_total: Option<u64>,
    pub(in crate::engine) bytes_done: Option<u64>,
    pub(in crate::engine) digest: Option<String>,
    /// The VM as the target last reported it.
    pub(in crate::engine) target_vm: Option<dunes_shared::model::VmStatus>,
    /// Worth telling the operator, in the event log.
    pub(in crate::engine) note: Option<String>,
}

/// The migrations, owned by the engine: every journal by id (finished ones are history),
/// which have effects under way, and what was last published.
#[derive(Debug)]
pub(in crate::engine) struct MigrationsState {
    pub(in crate::engine) journals: std::collections::BTreeMap<u64, MigrationJournal>,
    /// Migrations with effects under way.
    pub(in crate::engine) running: std::collections::BTreeSet<u64>,
    /// Cancels asked while an effect ran: applied when it ends.
    pub(in crate::engine) cancelled: std::collections::BTreeSet<u64>,
    /// Migrations a restart picked up again.
    pub(in crate::engine) resumed: std::collections::BTreeSet<u64>,
    pub(in crate::engine) dirty: bool,
    /// The last progress of each running transfer: bytes and when, for its rate.
    pub(in crate::engine) transfer_samples: std::collections::BTreeMap<u64, (u64, u64)>,
    pub(in crate::engine) published: std::sync::Arc<Vec<MigrationJournal>>,
}

impl MigrationsState {
    pub(in crate::engine) fn new(loaded: &[MigrationJournal]) -> MigrationsState {
        MigrationsState {
            journals: loaded.iter().map(|m| (m.id, m.clone())).collect(),
            running: Default::default(),
            cancelled: Default::default(),
            resumed: Default::default(),
            dirty: true,
            transfer_samples: Default::default(),
            published: std::sync::Arc::new(Vec::new()),
        }
    }

    /// Open migrations, for the pre-check's view of what is on its way where.
    pub(in crate::engine) fn open(&self) -> Vec<MigrationJournal> {
        self.journals
            .values()
            .filter(|m| !m.step.is_finished())
            .cloned()
            .collect()
    }

    /// A source agent's word on how far a transfer has got: shown live, not journaled (the
    /// journal's step is what a restart needs).
    pub(in crate::engine) fn transfer_progress(
        &mut self,
        ticket: &str,
        bytes_done: u64,
        bytes_total: u64,
    ) {
        let now = now_ms();
        let Some(journal) = self
            .journals
            .values_mut()
            .find(|m| m.ticket.as_deref() == Some(ticket) && !m.step.is_finished())
        else {
            return;
        };
        let (last_bytes, last_ms) = self
            .transfer_samples
            .insert(journal.id, (bytes_done, now))
            .unwrap_or((0, journal.updated_ms));
        let elapsed_ms = now.saturating_sub(last_ms);
        if elapsed_ms > 0 && bytes_done >= last_bytes {
            journal.rate_bps = Some((bytes_done - last_bytes) * 1000 / elapsed_ms);
        }
        journal.bytes_done = bytes_done;
        journal.bytes_total = bytes_total;
        self.dirty = true;
    }
}
