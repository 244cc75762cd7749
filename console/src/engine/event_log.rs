//! The event log: every event goes to the tracing log, the store, and the last
//! [`EVENTS_IN_VIEW`] to every snapshot.

use super::records::EventRecord;

/// Events kept in memory and in every snapshot.
pub(super) const EVENTS_IN_VIEW: usize = 1000;

/// The newest events, owned by the engine, and the number the next one gets.
#[derive(Debug)]
pub(super) struct EventsState {
    pub(super) recent: std::collections::VecDeque<EventRecord>,
    pub(super) dirty: bool,
    pub(super) published: std::sync::Arc<Vec<EventRecord>>,
    pub(super) next_seq: u64,
}

impl EventsState {
    pub(super) fn new(loaded: Vec<EventRecord>, next_seq: u64) -> EventsState {
        EventsState {
            recent: loaded.into_iter().collect(),
            dirty: true,
            published: std::sync::Arc::new(Vec::new()),
            next_seq,
        }
    }
}
