//! What the migrations domain holds: every journal by id, which have effects under way, and
//! what their effects learned.

use crate::engine::migration::machine::MigrationJournal;

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
}
