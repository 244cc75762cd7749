//! The event log: every event goes to the tracing log, the store, and the last
//! [`EVENTS_IN_VIEW`] to every snapshot.

use dunes_shared::model::HostId;

use super::{
    actor::{Actor, now_ms},
    records::{EventRecord, Level},
};

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

impl Actor {
    pub(super) fn log(&mut self, level: Level, host: Option<HostId>, message: String) {
        // "-" for fleet-wide events keeps the log line greppable by host.
        let host_name = host.as_ref().map_or("-", |h| h.as_str());
        match level {
            Level::Info => tracing::info!(host = host_name, "{message}"),
            Level::Warning => tracing::warn!(host = host_name, "{message}"),
            Level::Error => tracing::error!(host = host_name, "{message}"),
        }
        let event = EventRecord {
            seq: self.events.next_seq,
            time_ms: now_ms(),
            level,
            host,
            message,
        };
        self.events.next_seq += 1;
        self.store.put_event(&event);
        self.events.recent.push_back(event);
        while self.events.recent.len() > EVENTS_IN_VIEW {
            self.events.recent.pop_front();
        }
        self.events.dirty = true;
    }
}
