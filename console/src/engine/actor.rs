//! The engine's actor: the state it owns and its loop. One message at a time (a command, a
//! link message, the result of background work), then one publish and one store batch.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use dunes_shared::{model::HostId, rpc::Peer};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use super::{
    Command, HostAdded, HostView, Repaint, Reply, Snapshot,
    console_pki::ConsolePki,
    fleet::enroll::{self, Enrolled},
    fleet::link::{LinkContext, LinkMessage},
    records::Level,
    store::Store,
};

pub(super) struct HostEntry {
    pub(super) view: HostView,
    pub(super) published: Arc<HostView>,
    pub(super) dirty: bool,
    /// Only its live readings changed (CPU load, memory in use): published, but a window
    /// repaints for them only where it shows them.
    pub(super) readings_dirty: bool,
    pub(super) peer: Option<Peer>,
    /// Event kinds from a newer agent already reported in the event log.
    pub(super) skipped_kinds: std::collections::BTreeSet<String>,
    pub(super) address: watch::Sender<String>,
    pub(super) link_task: JoinHandle<()>,
    /// The digest of the site addresses this host's agent was last told on its current link.
    pub(super) site_addresses_told: Option<u64>,
}

impl Drop for HostEntry {
    fn drop(&mut self) {
        self.link_task.abort();
    }
}

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
    GateHostId(enroll::GateRequest),
    /// An agent answered a call the engine made for an operator: what it changes here.
    AgentAnswered(super::fleet::client::AgentAnswer),
    /// A VM was copied on its host (or the copy failed); a copy for another host moves there.
    VmCopied(super::fleet::vm_changes::VmCopied),
    /// A migration's side effects ran: its outcome, and what was learned on the way.
    MigrationEnded {
        id: u64,
        outcome: super::migration::Outcome,
        learned: super::migration::Learned,
    },
    /// A host's agent refused the site's address list sent on link `stable_id`.
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
    /// One step of a service operation ran on its agent; the engine records it and answers
    /// what to report.
    StepDone {
        step: super::services::driver::Step,
        result: Result<Option<dunes_shared::model::VmStatus>, super::EngineError>,
        answer: tokio::sync::oneshot::Sender<Result<String, String>>,
    },
    /// Every step of a service operation ran.
    OperationEnded {
        service: dunes_shared::model::ServiceName,
        operation: super::services::driver::Operation,
        report: super::OperationReport,
        reply: super::Reply<super::OperationReport>,
    },
    /// The stop or start a service's move to another site asked for ended.
    MoveOperationEnded {
        service: dunes_shared::model::ServiceName,
        after: super::evacuation::AfterMoveOperation,
        failed: Option<String>,
    },
    /// A running instance answered one of the questions asked of it every few seconds.
    Probe(super::services::probes::ProbeAnswer),
}

/// The fleet: every enrolled host with its link and view, and the host ids that
/// enrollments under way hold.
#[derive(Default)]
pub(super) struct FleetState {
    pub(super) hosts: BTreeMap<HostId, HostEntry>,
    pub(super) enrolling: enroll::HeldHostIds,
}

/// Services: their definitions, their instances, what their running instances last
/// answered, and what was last published of them.
pub(super) struct ServicesState {
    pub(super) entries:
        BTreeMap<dunes_shared::model::ServiceName, super::services::driver::ServiceEntry>,
    /// Every service's instances.
    pub(super) instances: BTreeMap<super::records::InstanceKey, super::records::InstanceRecord>,
    /// Something changed that their published views show.
    pub(super) dirty: bool,
    pub(super) published: Arc<Vec<Arc<super::ServiceView>>>,
    /// The last readiness answer of each running instance.
    pub(super) readiness: super::services::probes::Probed<super::services::readiness::LastCheck>,
    /// The last look at each running instance's guest applications.
    pub(super) guest_looks: super::services::probes::Probed<super::services::guest_apps::GuestLook>,
    /// The last read of each running instance's application metric.
    pub(super) metric_reads: super::services::probes::Probed<Result<f64, String>>,
}

impl Default for ServicesState {
    fn default() -> Self {
        ServicesState {
            entries: BTreeMap::new(),
            instances: BTreeMap::new(),
            // Published once at start, empty or not.
            dirty: true,
            published: Arc::new(Vec::new()),
            readiness: Default::default(),
            guest_looks: Default::default(),
            metric_reads: Default::default(),
        }
    }
}

/// Statistics: the open part of every time series (what closed is in the store).
#[derive(Default)]
pub(super) struct StatisticsState {
    pub(super) series: super::statistics::series::TimeSeries,
    /// Readings before this time (unix seconds) were made up (the demo's history).
    pub(super) generated_until_secs: Option<u64>,
}

/// Autoscaling of applications, by `service/app`.
#[derive(Default)]
pub(super) struct AutoscalingState {
    pub(super) entries: BTreeMap<String, super::autoscale::AutoscaleEntry>,
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
    pub(super) snapshot_tx: watch::Sender<Arc<Snapshot>>,
    pub(super) repaint: Repaint,
    pub(super) version: u64,
    pub(super) migrations: super::migration::MigrationsState,
    pub(super) drains: super::evacuation::DrainsState,
    /// Service status changes for the desktop, when notifications are on.
    pub(super) notices: Option<mpsc::Sender<super::notify::Notice>>,
    pub(super) statistics: StatisticsState,
    pub(super) autoscaling: AutoscalingState,
}

/// How often autoscaling rules look for a period that ended.
const AUTOSCALE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// How often a share of the time series' open part is written: every series once in
/// [`super::statistics::series::FLUSH_SHARES`] of these (10 s), which is what a crash can lose.
const STATS_FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Actor {
    pub(super) async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut links: mpsc::Receiver<LinkMessage>,
        mut internal: mpsc::Receiver<Internal>,
    ) {
        let mut readiness = tokio::time::interval(super::services::readiness::READINESS_EVERY);
        readiness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stats_flush = tokio::time::interval(STATS_FLUSH_EVERY);
        let mut flush_share = 0u32;
        stats_flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut autoscale = tokio::time::interval(AUTOSCALE_EVERY);
        autoscale.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut guest_apps = tokio::time::interval(super::services::guest_apps::GUEST_APPS_EVERY);
        guest_apps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = autoscale.tick() => self.autoscale_tick(),
                _ = guest_apps.tick() => {
                    self.poll_instances::<super::services::guest_apps::GuestAppsProbe>();
                    self.poll_instances::<super::services::app_metrics::AppMetricProbe>();
                }
                _ = stats_flush.tick() => {
                    flush_share = flush_share.wrapping_add(1);
                    let writes = self.statistics.series.flush_share(now_ms() / 1000, flush_share);
                    self.store.put_stats(writes);
                }
                _ = readiness.tick() => {
                    self.poll_instances::<super::services::readiness::Readiness>();
                    self.tell_site_addresses();
                    self.retry_migrations();
                    self.advance_evacuations();
                }
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                Some(msg) = links.recv() => self.link(msg),
                Some(msg) = internal.recv() => self.internal(msg),
            }
            // Take what else is waiting before publishing once.
            for _ in 0..512 {
                match links.try_recv() {
                    Ok(msg) => self.link(msg),
                    Err(_) => break,
                }
            }
            self.publish();
            // Waits while the writer's queue is full: the engine slows down, nothing is lost.
            self.store.submit().await;
        }
        self.endpoint.close(
            dunes_shared::protocol::codes::CLOSE_NORMAL,
            b"console stopping",
        );
        let writes = self.statistics.series.flush(now_ms() / 1000);
        self.store.put_stats(writes);
        let _ = self.store.flush().await;
    }

    fn internal(&mut self, msg: Internal) {
        match msg {
            Internal::Log {
                level,
                host,
                message,
            } => self.log(level, host, message),
            Internal::Enrolled {
                enrolled,
                address,
                reply,
            } => self.enrolled(enrolled, address, reply),
            Internal::GateHostId(request) => self.gate(request),
            Internal::AgentAnswered(answer) => self.agent_answered(answer),
            Internal::VmCopied(copied) => self.vm_copied(copied),
            Internal::MigrationEnded {
                id,
                outcome,
                learned,
            } => self.migration_outcome(id, outcome, learned),
            Internal::SiteAddressesRefused {
                host,
                stable_id,
                digest,
                reason,
            } => self.site_addresses_refused(&host, stable_id, digest, &reason),
            Internal::AutoscaleMeasured { key, end, mean } => {
                self.autoscale_measured(&key, end, mean)
            }
            Internal::AutoscaleMade { service, made } => {
                let (tx, _rx) = tokio::sync::oneshot::channel();
                self.start_stopped(&service, made, tx);
            }
            Internal::ClientFor { host, answer } => {
                let _ = answer.send(self.client(&host));
            }
            Internal::StepDone {
                step,
                result,
                answer,
            } => {
                let _ = answer.send(self.step_done(&step, result));
            }
            Internal::OperationEnded {
                service,
                operation,
                report,
                reply,
            } => self.end_operation(&service, operation, report, reply),
            Internal::MoveOperationEnded {
                service,
                after,
                failed,
            } => self.move_operation_ended(&service, after, failed),
            Internal::Probe(answer) => self.probe_answered(answer),
        }
    }
}
