//! The engine's actor: the sub-states of its domains, which it owns, and the messages its
//! background work sends back to it. Its loop is in `run`; what each message does is in the
//! domain that owns what it changes.

use std::sync::Arc;

use dunes_shared::model::HostId;
use tokio::sync::{mpsc, watch};

use super::{
    HostAdded, Repaint, Reply, Snapshot,
    autoscale::AutoscalingState,
    console_pki::ConsolePki,
    event_log::EVENTS_IN_VIEW,
    fleet::{
        enroll::{Enrolled, GateRequest},
        link::LinkContext,
        state::FleetState,
    },
    records::{EventRecord, Level, now_ms},
    services::state::ServicesState,
    statistics::state::StatisticsState,
    store::Store,
};

pub(super) enum Internal {
    Log {
        level: Level,
        host: Option<HostId>,
        message: String,
    },
    Enrolled {
        enrolled: Enrolled,
        address: String,
        reply: Reply<HostAdded>,
    },
    /// An agent answered a call the engine made for an operator: what it changes here.
    AgentAnswered(super::fleet::client::AgentAnswer),
    /// A VM was copied on its host (or the copy failed); a copy for another host moves there.
    VmCopied(super::fleet::state::VmCopied),
    /// A migration's side effects ran: its outcome, and what was learned on the way.
    MigrationEnded {
        id: u64,
        outcome: super::migration::Outcome,
        learned: super::migration::Learned,
    },
    /// A host's agent refused the site's address list sent on link `stable_id`.
    /// A host's agent did not take the description of its networks.
    NetworksRefused {
        host: HostId,
        stable_id: usize,
        digest: u64,
        reason: String,
    },
    SiteAddressesRefused {
        host: HostId,
        stable_id: usize,
        digest: u64,
        reason: String,
    },
    /// The mean of an application's metric over the autoscaling period ending at `end`.
    AutoscaleMeasured {
        key: String,
        end: u64,
        mean: Option<f64>,
    },
    /// An autoscaling deploy made these instances of `service`: they are started.
    AutoscaleMade {
        service: dunes_shared::model::ServiceName,
        made: Vec<String>,
    },
    /// The way to a host's agent, for a service operation's next step.
    ClientFor {
        host: HostId,
        answer: tokio::sync::oneshot::Sender<
            Result<super::fleet::client::AgentClient, super::EngineError>,
        >,
    },
    /// What an instance's start writes first: its user-data, filled in.
    StartInputs {
        instance: super::records::InstanceRecord,
        answer: tokio::sync::oneshot::Sender<super::services::state::StartInputs>,
    },
    /// A service instance's VM, made from a library image (pushed to its host first).
    CreateVmFromImage(super::images::CreateFromImage),
    /// One step of a service operation ran on its agent; the engine records it and answers
    /// what to report.
    StepDone {
        step: super::services::state::Step,
        result: Result<Option<dunes_shared::model::VmStatus>, super::EngineError>,
        answer: tokio::sync::oneshot::Sender<Result<String, String>>,
    },
    /// Every step of a service operation ran.
    OperationEnded {
        service: dunes_shared::model::ServiceName,
        operation: super::services::views::Operation,
        report: super::OperationReport,
        reply: super::Reply<super::OperationReport>,
    },
    /// The stop or start a service's move to another site asked for ended.
    MoveOperationEnded {
        service: dunes_shared::model::ServiceName,
        after: super::evacuation::AfterMoveOperation,
        failed: Option<String>,
    },
    /// An image's copy into the library is whole, or failed.
    ImageCopied {
        name: dunes_shared::model::ImageName,
        result: Result<super::images::library::Copied, String>,
        reply: Reply<super::images::ImageRecord>,
    },
    /// An agent opened a VM's console, or said why not.
    ConsoleOpened(Box<super::consoles::driver::ConsoleStreams>),
    /// A console's relay ended.
    ConsoleEnded {
        host: dunes_shared::model::HostId,
        vm: dunes_shared::model::VmName,
        id: u64,
    },
    /// An agent connected a VM's screen, or said why not.
    ScreenOpened(Box<super::consoles::screen::ScreenStreams>),
    /// A screen's session ended, with why if it broke.
    ScreenEnded {
        host: dunes_shared::model::HostId,
        vm: dunes_shared::model::VmName,
        id: u64,
        error: Option<String>,
    },
    /// The push a migration waited for has ended.
    ImagePushedForMigration(Box<super::images::state::PushedForMigration>),
    /// The push a new VM waited for has ended.
    ImagePushedForVm(Box<super::images::state::PushedForVm>),
    /// Every push of an image has ended.
    /// How far a push of an image to a host got; `None` once it ended.
    ImageTransfer {
        image: dunes_shared::model::ImageName,
        host: HostId,
        progress: Option<(u64, u64)>,
    },
    ImagePushed {
        name: dunes_shared::model::ImageName,
        results: Vec<(
            dunes_shared::model::HostId,
            Result<super::images::push::Pushed, String>,
        )>,
        reply: Reply<Vec<super::images::ImagePushReport>>,
    },
    /// A running instance answered one of the questions asked of it every few seconds.
    Probe(super::services::state::ProbeAnswer),
}

pub(super) struct Actor {
    pub(super) store: Store,
    pub(super) operators: super::operators::OperatorsState,
    pub(super) audit: super::audit::AuditState,
    pub(super) pki: Arc<ConsolePki>,
    pub(super) endpoint: quinn::Endpoint,
    /// What every link task gets; its client setup follows console certificate renewals.
    pub(super) links: LinkContext,
    pub(super) fleet: FleetState,
    pub(super) events: super::event_log::EventsState,
    pub(super) services: ServicesState,
    pub(super) internal_tx: mpsc::Sender<Internal>,
    /// Enrollments under way ask here whether they may take a host id.
    pub(super) gate_tx: mpsc::Sender<GateRequest>,
    pub(super) snapshot_tx: watch::Sender<Arc<Snapshot>>,
    pub(super) repaint: Repaint,
    pub(super) version: u64,
    pub(super) migrations: super::migration::MigrationsState,
    pub(super) drains: super::evacuation::DrainsState,
    /// Service status changes for the desktop, when notifications are on.
    pub(super) notices: Option<mpsc::Sender<super::notify::Notice>>,
    pub(super) statistics: StatisticsState,
    pub(super) autoscaling: AutoscalingState,
    pub(super) images: super::images::state::ImagesState,
    pub(super) networks: super::networks::state::NetworksState,
    pub(super) consoles: super::consoles::state::ConsolesState,
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
