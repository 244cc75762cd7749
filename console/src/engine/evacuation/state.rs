//! What the drains domain holds: the progress of each drain, and what a service's move does
//! once the stop or start it asked for has ended.

use dunes_shared::model::HostId;

use crate::engine::{evacuation::DrainProgress, records::ServiceMove};

/// What a service's move does once the stop or start it asked for has ended.
#[derive(Debug)]
pub(in crate::engine) enum AfterMoveOperation {
    /// Stopped: its instances move next (this is the move's next state).
    Stopped { next: ServiceMove },
    /// Started again on the new site (or where it stands): the move ends.
    Started,
}

/// Where each host in maintenance stands with its drain, owned by the engine, and what was
/// last published.
#[derive(Debug)]
pub(in crate::engine) struct DrainsState {
    pub(in crate::engine) progress: std::collections::BTreeMap<HostId, DrainProgress>,
    pub(in crate::engine) dirty: bool,
    pub(in crate::engine) published: std::sync::Arc<Vec<DrainProgress>>,
}

impl Default for DrainsState {
    fn default() -> Self {
        DrainsState {
            progress: Default::default(),
            dirty: true,
            published: std::sync::Arc::new(Vec::new()),
        }
    }
}
