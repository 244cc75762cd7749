//! What the agent pushes: host status every second, and every runtime's status changes, on
//! one unidirectional stream per console connection.

use std::{sync::Arc, time::Duration};

use dunes_shared::{protocol::AgentEvent, rpc::push_event};
use tokio::sync::broadcast;

use super::{Shared, control::list_vms, off_worker};
use crate::runtime::{Runtime, StatusChange};

const STATUS_INTERVAL: Duration = Duration::from_secs(1);

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

/// Sends the events to one console connection, until it closes.
pub(super) async fn push_events(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    mut events: broadcast::Receiver<AgentEvent>,
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
        if push_event(&mut stream, &event).await.is_err() {
            return;
        }
    }
}
