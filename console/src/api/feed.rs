//! The snapshot as a window elsewhere receives it: the whole snapshot once, then a delta per
//! change that carries only what changed (the hosts whose view changed, the events that are
//! new, the lists that changed), at most [`FRAMES_PER_SEC`] a second: a slow window gets the
//! latest state, never a backlog.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use dunes_shared::model::HostId;
use serde::{Deserialize, Serialize};

use crate::engine::{
    EventRecord, HostView, ServiceView, Snapshot, evacuation::DrainProgress,
    migration::MigrationJournal,
};

/// The most frames a watcher gets in a second; changes in between are sent together.
pub const FRAMES_PER_SEC: u32 = 20;
/// Events a snapshot keeps, as the engine's own.
const EVENTS_KEPT: usize = 1000;
/// The largest frame a watcher reads.
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// The pause between two frames.
pub fn frame_gap() -> Duration {
    Duration::from_secs(1) / FRAMES_PER_SEC
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SnapshotFrame {
    Full(Snapshot),
    Delta(SnapshotDelta),
}

/// What changed between two snapshots.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SnapshotDelta {
    pub version: u64,
    /// Every host's id in order, when one came, went or moved.
    pub host_order: Option<Vec<HostId>>,
    /// The hosts whose view changed.
    pub hosts: Vec<HostView>,
    /// The events newer than the last one sent.
    pub events: Vec<EventRecord>,
    pub services: Option<Vec<Arc<ServiceView>>>,
    pub migrations: Option<Vec<MigrationJournal>>,
    pub drains: Option<Vec<DrainProgress>>,
    pub generated_until_secs: Option<u64>,
}

/// What changed from `before` to `now`; the engine shares what did not change between its
/// snapshots, so a pointer comparison tells.
pub fn delta(before: &Snapshot, now: &Snapshot) -> SnapshotDelta {
    let old: BTreeMap<&HostId, &Arc<HostView>> = before.hosts.iter().map(|h| (h.id(), h)).collect();
    let hosts = now
        .hosts
        .iter()
        .filter(|h| old.get(h.id()).is_none_or(|o| !Arc::ptr_eq(o, h)))
        .map(|h| HostView::clone(h))
        .collect();
    let order_changed = before.hosts.len() != now.hosts.len()
        || before
            .hosts
            .iter()
            .zip(now.hosts.iter())
            .any(|(a, b)| a.id() != b.id());
    let last_seq = before.events.last().map(|e| e.seq);
    SnapshotDelta {
        version: now.version,
        host_order: order_changed.then(|| now.hosts.iter().map(|h| h.id().clone()).collect()),
        hosts,
        events: now
            .events
            .iter()
            .filter(|e| last_seq.is_none_or(|last| e.seq > last))
            .cloned()
            .collect(),
        services: (!Arc::ptr_eq(&before.services, &now.services))
            .then(|| now.services.as_ref().clone()),
        migrations: (!Arc::ptr_eq(&before.migrations, &now.migrations))
            .then(|| now.migrations.as_ref().clone()),
        drains: (!Arc::ptr_eq(&before.drains, &now.drains)).then(|| now.drains.as_ref().clone()),
        generated_until_secs: now.generated_until_secs,
    }
}

/// `base` with `delta` applied.
pub fn apply(base: &Snapshot, delta: SnapshotDelta) -> Snapshot {
    let mut changed: BTreeMap<HostId, Arc<HostView>> = delta
        .hosts
        .into_iter()
        .map(|h| (h.id().clone(), Arc::new(h)))
        .collect();
    let kept: BTreeMap<&HostId, &Arc<HostView>> = base.hosts.iter().map(|h| (h.id(), h)).collect();
    let order: Vec<HostId> = delta
        .host_order
        .unwrap_or_else(|| base.hosts.iter().map(|h| h.id().clone()).collect());
    let hosts = order
        .iter()
        .filter_map(|id| {
            changed
                .remove(id)
                .or_else(|| kept.get(id).map(|h| Arc::clone(h)))
        })
        .collect();
    let events = if delta.events.is_empty() {
        base.events.clone()
    } else {
        let mut all: Vec<EventRecord> = base.events.as_ref().clone();
        all.extend(delta.events);
        let skip = all.len().saturating_sub(EVENTS_KEPT);
        Arc::new(all.split_off(skip))
    };
    Snapshot {
        hosts,
        events,
        services: delta
            .services
            .map_or_else(|| base.services.clone(), Arc::new),
        migrations: delta
            .migrations
            .map_or_else(|| base.migrations.clone(), Arc::new),
        drains: delta.drains.map_or_else(|| base.drains.clone(), Arc::new),
        generated_until_secs: delta.generated_until_secs,
        version: delta.version,
    }
}

/// A frame on the wire: its length (`u32`, big-endian), then its JSON.
pub fn encode(frame: &SnapshotFrame) -> Result<Vec<u8>, serde_json::Error> {
    let body = serde_json::to_vec(frame)?;
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{HostRecord, Level, LinkState};
    use dunes_shared::pki::Fingerprint;

    fn host(id: &str, link: LinkState) -> Arc<HostView> {
        Arc::new(HostView {
            record: HostRecord {
                id: HostId::new(id).unwrap(),
                address: format!("{id}:7443"),
                fingerprint: Fingerprint([7; 32]),
                enrolled_at_ms: 1,
                inventory: None,
                cert_expires_ms: None,
                maintenance: None,
            },
            link,
            link_error: None,
            status: None,
            vms: Vec::new(),
            skipped_events: Default::default(),
        })
    }

    fn event(seq: u64) -> EventRecord {
        EventRecord {
            seq,
            time_ms: seq,
            level: Level::Info,
            host: None,
            message: format!("event {seq}"),
        }
    }

    fn json(s: &Snapshot) -> serde_json::Value {
        serde_json::to_value(s).unwrap()
    }

    #[test]
    fn a_delta_carries_what_changed_and_rebuilds_the_snapshot() {
        let a = host("a", LinkState::Online);
        let b = host("b", LinkState::Online);
        let before = Snapshot {
            hosts: vec![a.clone(), b.clone()],
            events: Arc::new(vec![event(1), event(2)]),
            version: 1,
            ..Default::default()
        };
        // b goes down, c arrives, one event; the lists stay shared.
        let now = Snapshot {
            hosts: vec![
                a.clone(),
                host("b", LinkState::Unreachable),
                host("c", LinkState::Connecting),
            ],
            events: Arc::new(vec![event(1), event(2), event(3)]),
            services: before.services.clone(),
            migrations: before.migrations.clone(),
            drains: before.drains.clone(),
            generated_until_secs: None,
            version: 2,
        };
        let d = delta(&before, &now);
        assert_eq!(d.hosts.len(), 2, "a did not change");
        assert_eq!(d.events.len(), 1);
        assert!(d.host_order.is_some());
        assert!(d.services.is_none() && d.migrations.is_none() && d.drains.is_none());
        // It travels as JSON and rebuilds what the engine has.
        let frame = SnapshotFrame::Delta(d);
        let bytes = encode(&frame).unwrap();
        let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 4);
        let SnapshotFrame::Delta(d) = serde_json::from_slice(&bytes[4..]).unwrap() else {
            panic!("not a delta")
        };
        let rebuilt = apply(&before, d);
        assert_eq!(json(&rebuilt), json(&now));
        // Nothing changed: an empty delta, and the same snapshot.
        let same = delta(&now, &now);
        assert!(same.hosts.is_empty() && same.events.is_empty() && same.host_order.is_none());
        assert_eq!(json(&apply(&now, same)), json(&now));
    }
}
