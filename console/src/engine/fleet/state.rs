//! What the fleet holds: every enrolled host with its link and view, and the host ids that
//! enrollments under way hold; and what comes back to it from the agents.

use std::{collections::BTreeMap, sync::Arc};

use dunes_shared::{
    model::{HostId, RuntimeKind, VmName, VmState, VmStatus},
    pki::Fingerprint,
    rpc::Peer,
};
use tokio::{sync::watch, task::JoinHandle};

use crate::engine::{
    EngineError, HostView, LinkState, Reply, VmCloned,
    fleet::client::AgentClient,
    fleet::enroll,
    records::{InstanceRecord, InstanceState},
};

pub(in crate::engine) struct HostEntry {
    pub(in crate::engine) view: HostView,
    pub(in crate::engine) published: Arc<HostView>,
    pub(in crate::engine) dirty: bool,
    /// Only its live readings changed (CPU load, memory in use): published, but a window
    /// repaints for them only where it shows them.
    pub(in crate::engine) readings_dirty: bool,
    pub(in crate::engine) peer: Option<Peer>,
    /// Event kinds from a newer agent already reported in the event log.
    pub(in crate::engine) skipped_kinds: std::collections::BTreeSet<String>,
    pub(in crate::engine) address: watch::Sender<String>,
    pub(in crate::engine) link_task: JoinHandle<()>,
    /// The digest of the site addresses this host's agent was last told on its current link.
    pub(in crate::engine) site_addresses_told: Option<u64>,
    /// The digest of the service networks this host's agent was last told on its current
    /// link.
    pub(in crate::engine) networks_told: Option<u64>,
}

impl HostEntry {
    /// The host's address as this console (and so its peers) reach it: where its live
    /// connection comes from, else its recorded address when that is a literal one.
    pub(in crate::engine) fn reached_at(&self) -> Option<std::net::IpAddr> {
        self.peer
            .as_ref()
            .map(|p| p.conn.remote_address().ip().to_canonical())
            .or_else(|| {
                self.view
                    .record
                    .address
                    .parse::<std::net::SocketAddr>()
                    .ok()
                    .map(|a| a.ip().to_canonical())
            })
    }
}

impl Drop for HostEntry {
    fn drop(&mut self) {
        self.link_task.abort();
    }
}

/// The fleet: every enrolled host with its link and view, and the host ids that
/// enrollments under way hold.
#[derive(Default)]
pub(in crate::engine) struct FleetState {
    pub(in crate::engine) hosts: BTreeMap<HostId, HostEntry>,
    pub(in crate::engine) enrolling: enroll::HeldHostIds,
}

impl FleetState {
    /// The VM as the engine knows it.
    pub(in crate::engine) fn vm_of(
        &self,
        host: &HostId,
        name: &dunes_shared::model::VmName,
    ) -> Result<VmStatus, EngineError> {
        self.hosts
            .get(host)
            .ok_or_else(|| EngineError::UnknownHost(host.clone()))?
            .view
            .vm(name)
            .cloned()
            .ok_or_else(|| EngineError::Invalid(format!("host {host} has no VM {name}")))
    }

    /// The runtime a host reports for a workload; libvirt for one it does not know.
    pub(in crate::engine) fn runtime_of(
        &self,
        host: &HostId,
        name: &dunes_shared::model::VmName,
    ) -> RuntimeKind {
        self.hosts
            .get(host)
            .and_then(|h| h.view.vm(name))
            .map_or(RuntimeKind::Libvirt, |v| v.runtime)
    }

    /// The client of a host's agent, when its link is up.
    pub(in crate::engine) fn client(&self, host: &HostId) -> Result<AgentClient, EngineError> {
        let entry = self
            .hosts
            .get(host)
            .ok_or_else(|| EngineError::UnknownHost(host.clone()))?;
        let peer = entry
            .peer
            .clone()
            .ok_or_else(|| EngineError::Unreachable(host.clone()))?;
        Ok(AgentClient {
            host: host.clone(),
            peer,
        })
    }

    /// An agent did not take the site's address list: it is sent again at the next tick,
    /// unless the link it went out on is gone or a newer list went out since.
    pub(in crate::engine) fn site_addresses_refused(
        &mut self,
        host: &HostId,
        stable_id: usize,
        digest: u64,
        reason: &str,
    ) {
        let Some(entry) = self.hosts.get_mut(host) else {
            return;
        };
        let same_link = entry
            .peer
            .as_ref()
            .is_some_and(|p| p.conn.stable_id() == stable_id);
        if same_link && entry.site_addresses_told == Some(digest) {
            entry.site_addresses_told = None;
            tracing::debug!("{host}: site addresses not taken: {reason}");
        }
    }

    /// May this enrollment take its host id? Not if another enrollment holds it, nor if an
    /// enrolled host has it with another key (unless the operator asked to replace it).
    pub(in crate::engine) fn gate(&mut self, request: enroll::GateRequest) {
        let enroll::GateRequest {
            host_id,
            fingerprint,
            replace,
            answer,
        } = request;
        let taken_by: Option<Fingerprint> = self
            .hosts
            .get(&host_id)
            .map(|e| e.view.record.fingerprint)
            .filter(|enrolled| *enrolled != fingerprint && !replace);
        let verdict = match taken_by {
            Some(enrolled) => Err(enroll::EnrollError::HostIdTaken {
                host: host_id,
                enrolled,
            }),
            None => enroll::HostIdHold::take(host_id.clone(), &self.enrolling)
                .ok_or(enroll::EnrollError::HostIdBusy(host_id)),
        };
        // If the enrollment is gone already, its hold is dropped here and released.
        let _ = answer.send(verdict);
    }

    /// Whether an instance's workload runs on a host that is online now: what the checks
    /// of its applications need.
    pub(in crate::engine) fn runs(&self, instance: &InstanceRecord) -> bool {
        instance.state == InstanceState::Created
            && self.hosts.get(&instance.host).is_some_and(|h| {
                h.view.link == LinkState::Online
                    && h.view
                        .vm(&instance.vm)
                        .is_some_and(|v| v.state == VmState::Running)
            })
    }
}

/// A VM copied on its host by its agent, or why not.
#[derive(Debug)]
pub(in crate::engine) struct VmCopied {
    pub(in crate::engine) host: HostId,
    pub(in crate::engine) source: VmName,
    /// Where the copy goes: its host, or another one it migrates to.
    pub(in crate::engine) to: HostId,
    pub(in crate::engine) what: String,
    pub(in crate::engine) result: Result<VmStatus, EngineError>,
    pub(in crate::engine) reply: Reply<VmCloned>,
}
