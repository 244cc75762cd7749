//! What the agent pushes: host status every second, every runtime's status changes, and
//! (to a console that asked for them) readings for statistics in batches, on one
//! unidirectional stream per console connection.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use dunes_shared::{model::Sample, protocol::AgentEvent, rpc::push_event};
use tokio::sync::broadcast;

use super::{Shared, control::list_vms, off_worker};
use crate::runtime::{Runtime, StatusChange};

const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// Readings are taken once a second and sent this many at a time.
const SAMPLES_PER_BATCH: usize = 5;

/// Publishes the host's status every second. Reads /proc and the runtimes' counts, never
/// asks a runtime for its list.
pub(super) async fn status_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    loop {
        tick.tick().await;
        if let Some(status) = off_worker(&shared, Shared::status).await {
            let _ = shared.events.send(AgentEvent::HostStatus(status));
        }
    }
}

/// Takes the host's and every running workload's counters once a second, and publishes them
/// in batches of [`SAMPLES_PER_BATCH`].
pub(super) async fn sample_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut batch = Vec::with_capacity(SAMPLES_PER_BATCH);
    // Only this loop lists sockets' owners; apart from the meter, so that listing /proc never
    // holds the lock the control handler takes.
    let owners = Arc::new(Mutex::new(crate::traffic::SocketOwners::default()));
    loop {
        tick.tick().await;
        let at_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let Ok(host) = tokio::task::spawn_blocking(crate::sampling::host_counters).await else {
            continue;
        };
        let mut workloads = Vec::new();
        for runtime in shared.runtimes.all() {
            // A runtime that cannot say this second is missing from this reading only.
            if let Ok(mut samples) = runtime.sample().await {
                workloads.append(&mut samples);
            }
        }
        add_traffic(&shared, &owners, &mut workloads).await;
        batch.push(Sample {
            at_unix_ms,
            host,
            workloads,
        });
        if batch.len() >= SAMPLES_PER_BATCH {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(SAMPLES_PER_BATCH));
            let _ = shared.events.send(AgentEvent::Samples(full));
        }
    }
}

/// Turns one runtime's status changes into agent events.
pub(super) async fn forward_changes(
    runtime: Arc<dyn Runtime>,
    events: broadcast::Sender<AgentEvent>,
) {
    let mut changes = runtime.changes();
    loop {
        let event = match changes.recv().await {
            Ok(StatusChange::Changed(vm)) => AgentEvent::VmChanged(vm),
            Ok(StatusChange::Removed(name)) => AgentEvent::VmRemoved { name },
            // Fell behind: the whole list replaces what was missed.
            Err(broadcast::error::RecvError::Lagged(_)) => match runtime.list().await {
                Ok(vms) => AgentEvent::VmList(vms),
                Err(_) => continue,
            },
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let _ = events.send(event);
    }
}

/// Sends the events to one console connection, until it closes; readings only to a console
/// that announced it reads them.
pub(super) async fn push_events(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    mut events: broadcast::Receiver<AgentEvent>,
    samples: bool,
) {
    let Ok(mut stream) = conn.open_uni().await else {
        return;
    };
    loop {
        let received = tokio::select! {
            r = events.recv() => r,
            // Ends with its connection, not with the next event.
            _ = conn.closed() => return,
        };
        let event = match received {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(_)) => match list_vms(&shared).await {
                // The console fell behind: replace its view instead of replaying.
                Ok(vms) => AgentEvent::VmList(vms),
                Err(_) => continue,
            },
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if matches!(event, AgentEvent::Samples(_)) && !samples {
            continue;
        }
        if push_event(&mut stream, &event).await.is_err() {
            return;
        }
    }
}

/// Fills in what each process instance (and each VM on QEMU's user-mode network) sent and
/// received over TCP, and what of it left the site. A second whose socket list cannot be read
/// keeps the totals as they were.
async fn add_traffic(
    shared: &Arc<Shared>,
    owners: &Arc<Mutex<crate::traffic::SocketOwners>>,
    workloads: &mut [dunes_shared::model::WorkloadSample],
) {
    let runtimes = shared.runtimes.clone();
    let traffic = shared.traffic.clone();
    let owners = owners.clone();
    let measured = tokio::task::spawn_blocking(move || {
        let pids: Vec<_> = runtimes.all().flat_map(|r| r.process_ids()).collect();
        let sockets = if pids.is_empty() {
            Ok(Vec::new())
        } else {
            crate::traffic::sock_diag::tcp_sockets()
        };
        let owned = match &sockets {
            Ok(sockets) => Some(super::lock(&owners).owned(pids, sockets)),
            Err(_) => None,
        };
        let mut meter = super::lock(&traffic);
        match sockets {
            Ok(sockets) => meter.account(owned.unwrap_or_default(), &sockets),
            Err(e) => {
                // Once a run: a kernel without sock_diag says so every second otherwise.
                static WARNED: std::sync::atomic::AtomicBool =
                    std::sync::atomic::AtomicBool::new(false);
                if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!("workloads' TCP traffic is not measured: {e}");
                }
            }
        }
        let knows_site = meter.knows_site();
        meter
            .totals()
            .map(|(name, t)| (name.clone(), (t, knows_site)))
            .collect::<std::collections::BTreeMap<_, _>>()
    })
    .await;
    let Ok(measured) = measured else {
        return;
    };
    for w in workloads {
        if let Some((t, knows_site)) = measured.get(&w.name) {
            w.counters.net_tx_bytes = t.sent_bytes;
            w.counters.net_rx_bytes = t.received_bytes;
            w.counters.net_tx_out_of_site_bytes = knows_site.then_some(t.sent_out_of_site_bytes);
        }
    }
}
