//! The snapshot as a window elsewhere receives it: the whole snapshot once, then a delta per
//! change that carries only what changed (the hosts whose view changed, the events that are
//! new, the lists that changed), at most [`FRAMES_PER_SEC`] a second: a slow window gets the
//! latest state, never a backlog.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;

use dunes_shared::model::{HostId, HostStatus};
use serde::{Deserialize, Serialize};

use crate::engine::{
    EventRecord, HostView, ServiceView, Snapshot, evacuation::DrainProgress,
    migration::MigrationJournal,
};

/// The most frames a watcher gets in a second; changes in between are sent together. A
/// change after a quiet spell goes out at once.
pub const FRAMES_PER_SEC: u32 = 30;
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
    /// The hosts whose view changed beyond their live status.
    pub hosts: Vec<HostView>,
    /// The hosts whose live status alone changed (every host, every second), by id: a
    /// few dozen bytes each instead of the whole host.
    #[serde(default)]
    pub statuses: Vec<(HostId, Option<HostStatus>)>,
    /// The events newer than the last one sent.
    pub events: Vec<EventRecord>,
    pub services: Option<Vec<Arc<ServiceView>>>,
    pub migrations: Option<Vec<MigrationJournal>>,
    pub drains: Option<Vec<DrainProgress>>,
    /// The image library as placement counts it, when it changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<crate::engine::services::placement::ImageNeeds>,
    /// Images on their way to hosts, when that changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_transfers: Option<Vec<crate::engine::images::ImageTransferProgress>>,
    /// Service networks, when they changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<crate::engine::networks::NetworkView>>,
    pub generated_until_secs: Option<u64>,
}

/// What changed from `before` to `now`; the engine shares what did not change between its
/// snapshots, so a pointer comparison tells.
pub fn delta(before: &Snapshot, now: &Snapshot) -> SnapshotDelta {
    let old: BTreeMap<&HostId, &Arc<HostView>> = before.hosts.iter().map(|h| (h.id(), h)).collect();
    let (mut hosts, mut statuses) = (Vec::new(), Vec::new());
    for host in &now.hosts {
        match old.get(host.id()) {
            Some(was) if Arc::ptr_eq(was, host) => {}
            Some(was) if only_status_differs(was, host) => {
                statuses.push((host.id().clone(), host.status))
            }
            _ => hosts.push(HostView::clone(host)),
        }
    }
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
        statuses,
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
        images: (!Arc::ptr_eq(&before.images, &now.images)).then(|| now.images.as_ref().clone()),
        image_transfers: (!Arc::ptr_eq(&before.image_transfers, &now.image_transfers))
            .then(|| now.image_transfers.as_ref().clone()),
        networks: (!Arc::ptr_eq(&before.networks, &now.networks))
            .then(|| now.networks.as_ref().clone()),
        generated_until_secs: now.generated_until_secs,
    }
}

/// Whether two views of a host differ in their live status only.
fn only_status_differs(was: &HostView, now: &HostView) -> bool {
    was.record == now.record
        && was.link == now.link
        && was.link_error == now.link_error
        && was.vms == now.vms
        && was.skipped_events == now.skipped_events
}

/// `base` with `delta` applied.
pub fn apply(base: &Snapshot, delta: SnapshotDelta) -> Snapshot {
    let mut changed: BTreeMap<HostId, Arc<HostView>> = delta
        .hosts
        .into_iter()
        .map(|h| (h.id().clone(), Arc::new(h)))
        .collect();
    let kept: BTreeMap<&HostId, &Arc<HostView>> = base.hosts.iter().map(|h| (h.id(), h)).collect();
    for (id, status) in delta.statuses {
        if let Some(was) = kept.get(&id) {
            let mut host = HostView::clone(was);
            host.status = status;
            changed.insert(id, Arc::new(host));
        }
    }
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
        images: delta.images.map_or_else(|| base.images.clone(), Arc::new),
        image_transfers: delta
            .image_transfers
            .map_or_else(|| base.image_transfers.clone(), Arc::new),
        networks: delta
            .networks
            .map_or_else(|| base.networks.clone(), Arc::new),
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

/// Sends the whole snapshot, then a delta per change (changes closer than a frame's gap go
/// together), until the watcher stops reading or `snapshots` ends.
pub async fn send_feed(mut snapshots: watch::Receiver<Arc<Snapshot>>, mut send: quinn::SendStream) {
    let mut last = snapshots.borrow_and_update().clone();
    let Ok(first) = encode(&SnapshotFrame::Full(Snapshot::clone(&last))) else {
        return;
    };
    if send.write_all(&first).await.is_err() {
        return;
    }
    let mut sent_at = Instant::now();
    loop {
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { break },
            // The watcher went away.
            _ = send.stopped() => return,
        }
        // At most one frame per gap: what changes meanwhile goes in the next one.
        tokio::time::sleep_until((sent_at + frame_gap()).into()).await;
        let now = snapshots.borrow_and_update().clone();
        let Ok(frame) = encode(&SnapshotFrame::Delta(delta(&last, &now))) else {
            break;
        };
        if send.write_all(&frame).await.is_err() {
            return;
        }
        sent_at = Instant::now();
        last = now;
    }
    let _ = send.finish();
}

async fn read_frame(recv: &mut quinn::RecvStream) -> Result<SnapshotFrame, String> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.map_err(|e| e.to_string())?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(format!("a snapshot frame of {len} bytes is over the limit"));
    }
    let mut body = vec![0; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&body).map_err(|e| format!("a snapshot frame does not parse: {e}"))
}

/// Reads a feed that [`send_feed`] writes: waits for the whole snapshot, then keeps the
/// receiver it answers up to date from a task, until the stream ends. `send` is the
/// request's side of the stream, held open while the feed runs (the engine sees a watcher).
pub async fn receive_feed(
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<watch::Receiver<Arc<Snapshot>>, String> {
    let SnapshotFrame::Full(base) = read_frame(&mut recv).await? else {
        return Err("the feed did not start with a whole snapshot".into());
    };
    let (tx, rx) = watch::channel(Arc::new(base));
    tokio::spawn(async move {
        let _send = send;
        while let Ok(frame) = read_frame(&mut recv).await {
            let next = match frame {
                SnapshotFrame::Full(whole) => whole,
                SnapshotFrame::Delta(delta) => apply(&tx.borrow(), delta),
            };
            if tx.send(Arc::new(next)).is_err() {
                break;
            }
        }
    });
    Ok(rx)
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
            images: before.images.clone(),
            image_transfers: before.image_transfers.clone(),
            networks: before.networks.clone(),
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

    #[test]
    fn a_host_whose_status_alone_changed_travels_as_its_status() {
        let a = host("a", LinkState::Online);
        let before = Snapshot {
            hosts: vec![a.clone()],
            version: 1,
            ..Default::default()
        };
        let mut reported = HostView::clone(&a);
        reported.status = Some(HostStatus {
            cpu_load_percent: 12.5,
            memory_used_mib: 1024,
            memory_total_mib: 4096,
            storage_free_mib: 10_000,
            vms_running: 0,
            uptime_secs: 60,
        });
        let now = Snapshot {
            hosts: vec![Arc::new(reported)],
            version: 2,
            ..before.clone()
        };
        let d = delta(&before, &now);
        assert!(d.hosts.is_empty());
        assert_eq!(d.statuses.len(), 1);
        assert_eq!(json(&apply(&before, d)), json(&now));
        // Anything more than the status, and the whole host goes.
        let mut moved = HostView::clone(&now.hosts[0]);
        moved.link_error = Some("gone".into());
        let later = Snapshot {
            hosts: vec![Arc::new(moved)],
            version: 3,
            ..now.clone()
        };
        let d = delta(&now, &later);
        assert_eq!((d.hosts.len(), d.statuses.len()), (1, 0));
        assert_eq!(json(&apply(&now, d)), json(&later));
    }
}
