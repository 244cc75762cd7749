//! What the API answers: plain serde types built from the engine's snapshot and replies.
//! Their serde form is what `ctl --json` prints, so a field once printed keeps its name;
//! new fields are added. An absent value is `null`, not a missing key.

use std::time::{Duration, UNIX_EPOCH};

use dunes_shared::model::{
    AppName, HostId, Prices, ServiceName, SnapshotInfo, TemplateName, VmDiskInfo, VmName,
    VmNicInfo, VmResources, VmStatus,
};
use serde::{Deserialize, Serialize};

use crate::engine::{
    AutoscaleView, EventRecord, HostView, OperationReport, ReplayAnswer, ServicePlan, ServiceView,
    Snapshot,
    autoscale::Change,
    evacuation::DrainProgress,
    migration::{MigrationEstimate, MigrationJournal, MigrationOptions},
    services::placement::Action,
    snapshot::rfc3339,
    statistics::capacity::SiteCapacity,
    statistics::cost::CostLine,
    statistics::forecast::Outlook,
    statistics::series::StatsAnswer,
};

fn rfc3339_ms(ms: u64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_millis(ms))
}

/// A host as `hosts` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostSummary {
    pub id: HostId,
    /// Its host name, once its agent has said.
    pub name: Option<String>,
    pub address: String,
    pub site: String,
    pub remote: bool,
    /// `connecting`, `online` or `unreachable`.
    pub state: String,
    pub link_error: Option<String>,
    pub fingerprint: String,
    pub cert_expires: Option<String>,
    /// Events of kinds this console does not know, by kind.
    pub skipped_events: std::collections::BTreeMap<String, u64>,
    pub cpus: Option<u32>,
    pub sizes_from: Option<String>,
    pub memory_mib: Option<u64>,
    pub storage_total_mib: Option<u64>,
    pub storage_free_mib: Option<u64>,
    pub runtimes: Vec<String>,
    pub runtime_details: Vec<RuntimeDetail>,
    pub interpreters: Vec<Interpreter>,
    pub security_level: Option<u8>,
    pub prices: Option<Prices>,
    /// How many VMs and processes it runs.
    pub vms: usize,
    /// Its maintenance and drain; `None` when it is not in maintenance.
    pub maintenance: Option<MaintenanceView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuntimeDetail {
    pub kind: String,
    pub driver: String,
    pub version: String,
    pub limits: Option<String>,
    pub users: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interpreter {
    pub name: String,
    pub version: String,
}

impl HostSummary {
    pub fn new(h: &HostView, drain: Option<&DrainProgress>) -> HostSummary {
        let inv = h.inventory();
        HostSummary {
            id: h.id().clone(),
            name: inv.map(|i| i.hostname.clone()),
            address: h.record.address.clone(),
            site: h.site_name().to_string(),
            remote: h.is_remote(),
            state: h.link.as_str().to_string(),
            link_error: h.link_error.clone(),
            fingerprint: h.record.fingerprint.to_string(),
            cert_expires: h.cert_expires().map(rfc3339),
            skipped_events: h.skipped_events.clone(),
            cpus: inv.map(|i| i.cpus),
            sizes_from: inv.map(|i| i.sizes_from.as_str().to_string()),
            memory_mib: inv.map(|i| i.memory_mib),
            storage_total_mib: inv.map(|i| i.storage_total_mib),
            storage_free_mib: inv.map(|i| i.storage_free_mib),
            runtimes: inv
                .map(|i| i.runtimes.iter().map(|r| r.kind.as_str().into()).collect())
                .unwrap_or_default(),
            runtime_details: inv
                .map(|i| {
                    i.runtimes
                        .iter()
                        .map(|r| RuntimeDetail {
                            kind: r.kind.as_str().into(),
                            driver: r.driver.clone(),
                            version: r.version.clone(),
                            limits: r.limits.clone(),
                            users: r.users.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            interpreters: inv
                .map(|i| {
                    i.interpreters
                        .iter()
                        .map(|x| Interpreter {
                            name: x.name.clone(),
                            version: x.version.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            security_level: inv.map(|i| i.security_level),
            prices: inv.map(|i| i.prices),
            vms: h.vms.len(),
            maintenance: MaintenanceView::new(h, drain),
        }
    }
}

/// A host's maintenance mark, with its drain when one runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaintenanceView {
    pub since: String,
    pub paused: bool,
    #[serde(flatten)]
    pub drain: Option<DrainCounts>,
}

impl MaintenanceView {
    pub fn new(host: &HostView, drain: Option<&DrainProgress>) -> Option<MaintenanceView> {
        let m = host.record.maintenance?;
        Some(MaintenanceView {
            since: rfc3339_ms(m.since_ms),
            paused: m.paused,
            drain: drain.map(DrainCounts::new),
        })
    }
}

/// Where a drain stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainCounts {
    pub host: HostId,
    pub moved: u32,
    pub remaining: u32,
    /// The migration under way.
    pub migrating: Option<u64>,
    /// Nothing left to move and nothing moving.
    pub settled: bool,
    pub blocked: Vec<BlockedVm>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockedVm {
    pub vm: VmName,
    pub reason: String,
}

impl DrainCounts {
    fn new(d: &DrainProgress) -> DrainCounts {
        DrainCounts {
            host: d.host.clone(),
            moved: d.moved,
            remaining: d.remaining,
            migrating: d.migrating,
            settled: d.is_settled(),
            blocked: d
                .blocked
                .iter()
                .map(|b| BlockedVm {
                    vm: b.vm.clone(),
                    reason: b.reason.clone(),
                })
                .collect(),
        }
    }
}

/// A drain as `host drain` answers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainView {
    pub paused: bool,
    #[serde(flatten)]
    pub counts: DrainCounts,
}

impl From<&DrainProgress> for DrainView {
    fn from(d: &DrainProgress) -> DrainView {
        DrainView {
            paused: d.paused,
            counts: DrainCounts::new(d),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Undrained {
    pub host: HostId,
    /// Always false: the host left maintenance.
    pub maintenance: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateRef {
    pub template: TemplateName,
    pub blake3: String,
}

/// A VM or process as `vms` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmSummary {
    /// Its UUID.
    pub id: String,
    pub name: VmName,
    pub host: HostId,
    pub state: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub template: Option<TemplateName>,
    pub disk_bytes: u64,
    pub overlay_on: Option<TemplateRef>,
    /// Its disks as its agent holds them (`None` from an agent that does not say).
    pub disks: Option<Vec<VmDiskInfo>>,
    pub nics: Option<Vec<VmNicInfo>>,
    /// From its guest agent while it runs; `None` when nobody answered.
    pub addresses: Option<Vec<String>>,
    pub autostart: Option<bool>,
    /// The vCPUs and memory its next start brings, when they differ from now's.
    pub next_start: Option<VmResources>,
    pub snapshots: Option<u32>,
    /// The installer (an image) in its CD-ROM drive, booted before its disk.
    pub installer: Option<TemplateName>,
    /// It has a display to watch (`vm screenshot`, the window's Screen…).
    pub screen: bool,
}

impl VmSummary {
    pub fn new(host: &HostId, vm: &VmStatus) -> VmSummary {
        VmSummary {
            id: vm.uuid.clone(),
            name: vm.name.clone(),
            host: host.clone(),
            state: vm.state.as_str().to_string(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            template: vm.template.clone(),
            disk_bytes: vm.disk_bytes,
            overlay_on: vm.overlay_on.as_ref().map(|t| TemplateRef {
                template: t.template.clone(),
                blake3: t.blake3.clone(),
            }),
            disks: vm.disks.clone(),
            nics: vm.nics.clone(),
            addresses: vm.addresses.clone(),
            autostart: vm.autostart,
            next_start: vm.next_start,
            snapshots: vm.snapshots,
            installer: vm.installer.clone(),
            screen: vm.screen,
        }
    }
}

/// A VM in the fleet list, with the service instance it is, when it is one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetVm {
    #[serde(flatten)]
    pub vm: VmSummary,
    pub service: Option<ServiceName>,
    pub application: Option<AppName>,
    /// `libvirt` or `process`.
    pub runtime: String,
}

impl FleetVm {
    pub fn all(snap: &Snapshot) -> Vec<FleetVm> {
        snap.hosts
            .iter()
            .flat_map(|h| {
                h.vms.iter().map(|v| {
                    let instance = snap
                        .services
                        .iter()
                        .find_map(|s| s.instance_of_vm(h.id(), &v.name).map(|i| (s.name(), i)));
                    FleetVm {
                        vm: VmSummary::new(h.id(), v),
                        service: instance.map(|(s, _)| s.clone()),
                        application: instance.map(|(_, i)| i.record.app.clone()),
                        runtime: v.runtime.as_str().to_string(),
                    }
                })
            })
            .collect()
    }
}

/// A VM after `vm set`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmConfiguredView {
    #[serde(flatten)]
    pub vm: VmSummary,
    /// The vCPUs or memory changed at its next start, not now.
    pub at_next_start: bool,
}

/// A copy made by `vm clone`, and the migration that takes it elsewhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmClonedView {
    #[serde(flatten)]
    pub vm: VmSummary,
    pub clone_of: String,
    pub migration: Option<MigrationView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmDeleted {
    pub deleted: VmName,
    pub host: HostId,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecOutput {
    /// `None` when the command still ran at its timeout.
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// A VM's snapshots.
pub type SnapshotList = Vec<SnapshotInfo>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbedKey {
    pub fingerprint: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostEnrolled {
    pub id: HostId,
    pub fingerprint: String,
}

/// An event of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventView {
    pub seq: u64,
    pub time_ms: u64,
    /// `info`, `warn` or `error`.
    pub level: String,
    pub host: Option<HostId>,
    pub message: String,
}

impl From<&EventRecord> for EventView {
    fn from(e: &EventRecord) -> EventView {
        EventView {
            seq: e.seq,
            time_ms: e.time_ms,
            level: e.level.as_str().to_string(),
            host: e.host.clone(),
            message: e.message.clone(),
        }
    }
}

/// A migration, with its rate and time left while its transfer reports progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationView {
    pub id: u64,
    pub vm: VmName,
    pub from: HostId,
    pub to: HostId,
    pub state: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub rate_bps: Option<u64>,
    pub eta_secs: Option<u64>,
    pub digest: Option<String>,
    pub error: Option<String>,
    /// What it waits for, when it waits.
    pub waiting: Option<String>,
    pub limit_mbps: Option<u32>,
    pub compress: bool,
    pub origin: String,
    pub disk: String,
    pub disk_template: Option<TemplateName>,
}

impl From<&MigrationJournal> for MigrationView {
    fn from(m: &MigrationJournal) -> MigrationView {
        MigrationView {
            id: m.id,
            vm: m.vm.clone(),
            from: m.from.clone(),
            to: m.to.clone(),
            state: m.step.as_str().to_string(),
            bytes_done: m.bytes_done,
            bytes_total: m.bytes_total,
            rate_bps: m.rate_bps,
            eta_secs: m.eta_secs(),
            digest: m.digest.clone(),
            error: m.error.clone(),
            waiting: m.waiting.clone(),
            limit_mbps: m.limit_mbps,
            compress: m.compress,
            origin: m.origin.as_string(),
            disk: m.disk_move.kind().to_string(),
            disk_template: m.disk_move.template().cloned(),
        }
    }
}

/// What `vm migrate --dry-run` finds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationCheck {
    pub vm: VmName,
    pub from: HostId,
    pub to: HostId,
    pub can_go: bool,
    /// Why it cannot go; empty when it can.
    pub reasons: Vec<String>,
    #[serde(flatten)]
    pub estimate: Option<MigrationEstimateView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationEstimateView {
    pub bytes: u64,
    pub link_mbps: u32,
    pub seconds: f64,
    pub limit_mbps: Option<u32>,
    pub compress: bool,
    pub cost: f64,
    pub crosses_sites: bool,
    pub disk: String,
    pub disk_detail: String,
}

impl MigrationEstimateView {
    pub fn new(e: &MigrationEstimate, options: MigrationOptions) -> MigrationEstimateView {
        let (limit, compress) = e.transfer_settings(options);
        let mbps = limit.map_or(e.link_mbps, |l| l.min(e.link_mbps)).max(1);
        MigrationEstimateView {
            bytes: e.bytes,
            link_mbps: e.link_mbps,
            seconds: (e.bytes as f64 * 8.0 / (f64::from(mbps) * 1e6)).ceil(),
            limit_mbps: limit,
            compress,
            cost: e.cost,
            crosses_sites: e.crosses_sites,
            disk: e.disk_move.kind().to_string(),
            disk_detail: e.disk_move.describe(),
        }
    }
}

/// A service's move to another site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoveView {
    pub site: String,
    pub phase: String,
    pub was_running: bool,
    pub error: Option<String>,
}

impl From<&crate::engine::ServiceMove> for MoveView {
    fn from(m: &crate::engine::ServiceMove) -> MoveView {
        MoveView {
            site: m.site.clone(),
            phase: m.phase.as_str().to_string(),
            was_running: m.was_running,
            error: m.error.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceMoving {
    pub service: ServiceName,
    pub moving: MoveView,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceDefined {
    pub name: ServiceName,
}

/// What a service operation did, one line per instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportView {
    pub done: Vec<StepDone>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepDone {
    pub instance: String,
    pub host: HostId,
    pub result: String,
}

impl ReportView {
    /// The steps done; an error naming each instance that failed when one did, so that
    /// nothing is left half-done without being said.
    pub fn new(report: &OperationReport) -> Result<ReportView, String> {
        if !report.failed.is_empty() {
            return Err(format!(
                "{} of {} steps failed: {}",
                report.failed.len(),
                report.failed.len() + report.done.len(),
                report
                    .failed
                    .iter()
                    .map(|(i, why)| format!("{i}: {why}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        Ok(ReportView {
            done: report
                .done
                .iter()
                .map(|(instance, host, result)| StepDone {
                    instance: instance.clone(),
                    host: host.clone(),
                    result: result.clone(),
                })
                .collect(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Adopted {
    pub service: ServiceName,
    pub application: AppName,
    pub index: u32,
    pub host: HostId,
    pub vm: VmName,
}

/// A service as `services` lists it; `error` is set (and its lists empty) when its file no
/// longer reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceSummary {
    pub name: ServiceName,
    /// `stopped`, `starting`, `running`, `degraded`, ... or `unreadable`.
    pub status: String,
    pub defined_at: String,
    pub error: Option<String>,
    pub instances: Vec<InstanceSummary>,
    pub moving: Option<MoveView>,
    pub applications: Vec<ApplicationSummary>,
    /// Its applications in the order they start; `None` when their dependencies loop.
    pub start_order: Option<Vec<String>>,
    /// Of its instances once deployed; of its plan before.
    pub cost_per_hour: Option<f64>,
    /// Its file's text (`service show` only).
    pub source: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceSummary {
    pub instance: String,
    pub application: AppName,
    pub host: HostId,
    pub vm: VmName,
    pub state: String,
    pub vm_state: Option<String>,
    pub ready: bool,
    pub ready_detail: Option<String>,
    pub adopted: bool,
    pub cost_per_hour: f64,
    pub metric: Option<MetricReading>,
    pub guest_apps: Vec<GuestAppSummary>,
}

/// An application metric's value, or why it could not be read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MetricReading {
    Value { value: f64 },
    Error { error: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestAppSummary {
    pub name: AppName,
    pub state: String,
    pub detail: String,
    pub processes: u32,
    pub cpu_percent: Option<f64>,
    pub memory_mib: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplicationSummary {
    pub name: AppName,
    pub runtime: String,
    pub instances: u32,
    pub cost_per_hour: Option<f64>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub storage_mib: u64,
    pub depends_on: Vec<AppName>,
    pub guest_apps: Vec<GuestAppDefinition>,
    pub metric: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestAppDefinition {
    pub name: AppName,
    pub process: Option<String>,
    pub check: Option<String>,
}

impl ServiceSummary {
    pub fn new(view: &ServiceView, plan: Option<&ServicePlan>) -> ServiceSummary {
        let defined_at = rfc3339_ms(view.record.defined_at_ms);
        let spec = match &view.spec {
            Ok(spec) => spec,
            Err(e) => {
                return ServiceSummary {
                    name: view.name().clone(),
                    status: "unreadable".into(),
                    defined_at,
                    error: Some(e.clone()),
                    instances: Vec::new(),
                    moving: None,
                    applications: Vec::new(),
                    start_order: None,
                    cost_per_hour: None,
                    source: None,
                };
            }
        };
        let deployed = !view.instances.is_empty();
        ServiceSummary {
            name: view.name().clone(),
            status: view.status.as_str().to_string(),
            defined_at,
            error: None,
            instances: view
                .instances
                .iter()
                .map(|i| InstanceSummary {
                    instance: format!("{}-{}", i.record.app, i.record.index),
                    application: i.record.app.clone(),
                    host: i.record.host.clone(),
                    vm: i.record.vm.clone(),
                    state: i.record.state.as_str().to_string(),
                    vm_state: i.vm_state.map(|s| s.as_str().to_string()),
                    ready: i.ready,
                    ready_detail: i.ready_detail.clone(),
                    adopted: i.record.adopted,
                    cost_per_hour: i.cost_per_hour,
                    metric: i.metric.as_ref().map(|m| match m {
                        Ok(v) => MetricReading::Value { value: *v },
                        Err(e) => MetricReading::Error { error: e.clone() },
                    }),
                    guest_apps: i
                        .guest_apps
                        .iter()
                        .map(|g| GuestAppSummary {
                            name: g.name.clone(),
                            state: g.state.as_str().to_string(),
                            detail: g.detail.clone(),
                            processes: g.processes,
                            cpu_percent: g.cpu_percent,
                            memory_mib: g.memory_mib,
                        })
                        .collect(),
                })
                .collect(),
            moving: view.record.moving.as_ref().map(MoveView::from),
            applications: spec
                .applications
                .iter()
                .map(|a| ApplicationSummary {
                    name: a.name.clone(),
                    runtime: a.runtime.as_str().to_string(),
                    instances: a.instances,
                    cost_per_hour: if deployed {
                        Some(
                            view.instances
                                .iter()
                                .filter(|i| i.record.app == a.name)
                                .fold(0.0, |sum, i| sum + i.cost_per_hour),
                        )
                    } else {
                        plan.map(|p| p.plan.cost_of(&a.name))
                    },
                    vcpus: a.vcpus,
                    memory_mib: a.memory_mib,
                    storage_mib: a.storage_mib,
                    depends_on: a.depends_on.clone(),
                    guest_apps: a
                        .guest_apps
                        .iter()
                        .map(|g| GuestAppDefinition {
                            name: g.name.clone(),
                            process: g.process.clone(),
                            check: g.check.clone(),
                        })
                        .collect(),
                    metric: a.metric.as_ref().map(|m| m.describe()),
                })
                .collect(),
            start_order: spec
                .start_order()
                .map(|o| o.iter().map(|a| a.name.to_string()).collect()),
            cost_per_hour: if deployed {
                Some(view.cost_per_hour())
            } else {
                plan.map(|p| p.plan.cost_per_hour)
            },
            source: None,
        }
    }

    /// How many instances its applications ask for.
    pub fn instances_wanted(&self) -> u32 {
        self.applications.iter().map(|a| a.instances).sum()
    }
}

/// A placement plan, every rule explained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanView {
    pub service: ServiceName,
    /// Deploying with it applies this plan only if it is still the plan made then.
    pub fingerprint: String,
    /// Every instance has a host.
    pub feasible: bool,
    /// Deploying it would change something.
    pub changes: bool,
    pub cost_per_hour: f64,
    pub placements: Vec<PlannedInstance>,
    pub removals: Vec<PlannedRemoval>,
    pub unplaced: Vec<UnplacedInstance>,
    /// By application: why each host was left out.
    pub rejections: std::collections::BTreeMap<String, Vec<String>>,
    pub overrides: Vec<OverrideView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedInstance {
    pub application: AppName,
    pub index: u32,
    pub instance: String,
    pub host: HostId,
    /// `create` or `keep`.
    pub action: String,
    pub cost_per_hour: f64,
    /// The library image sent to the host first, when it does not hold it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_transfer: Option<ImageTransferView>,
}

/// An image a deploy sends to a host before it makes the instance there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageTransferView {
    pub image: dunes_shared::model::ImageName,
    pub mib: u64,
    /// Its time over the host's link at the link's speed; absent when the speed is unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedRemoval {
    pub instance: String,
    pub host: HostId,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnplacedInstance {
    pub application: AppName,
    pub index: u32,
    pub instance: String,
    pub would_fit: String,
}

/// An instance placed by hand, and whether that holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OverrideView {
    pub instance: String,
    pub host: HostId,
    pub holds: bool,
    pub breaks: Option<String>,
}

impl From<&ServicePlan> for PlanView {
    fn from(sp: &ServicePlan) -> PlanView {
        let plan = &sp.plan;
        PlanView {
            service: sp.service.clone(),
            fingerprint: sp.fingerprint.clone(),
            feasible: plan.is_feasible(),
            changes: plan.changes(),
            cost_per_hour: plan.cost_per_hour,
            placements: plan
                .placements
                .iter()
                .map(|p| PlannedInstance {
                    application: p.app.clone(),
                    index: p.index,
                    instance: format!("{}-{}", p.app, p.index),
                    host: p.host.clone(),
                    action: match p.action {
                        Action::Create => "create",
                        Action::Keep => "keep",
                    }
                    .into(),
                    cost_per_hour: p.cost_per_hour,
                    image_transfer: p.image_transfer.as_ref().map(|t| ImageTransferView {
                        image: t.image.clone(),
                        mib: t.mib,
                        secs: t.secs,
                    }),
                })
                .collect(),
            removals: plan
                .removals
                .iter()
                .map(|e| PlannedRemoval {
                    instance: format!("{}-{}", e.app, e.index),
                    host: e.host.clone(),
                })
                .collect(),
            unplaced: plan
                .unplaced
                .iter()
                .map(|u| UnplacedInstance {
                    application: u.app.clone(),
                    index: u.index,
                    instance: format!("{}-{}", u.app, u.index),
                    would_fit: u.would_fit.clone(),
                })
                .collect(),
            rejections: plan
                .rejections
                .iter()
                .map(|(app, list)| {
                    (
                        app.to_string(),
                        list.iter().map(|r| r.reason.clone()).collect(),
                    )
                })
                .collect(),
            overrides: plan
                .overrides
                .iter()
                .map(|o| OverrideView {
                    instance: format!("{}-{}", o.placement.app, o.placement.index),
                    host: o.placement.host.clone(),
                    holds: o.verdict.is_ok(),
                    breaks: o.verdict.as_ref().err().cloned(),
                })
                .collect(),
        }
    }
}

/// An application's autoscaling rule and what it last said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoscaleSummary {
    pub service: ServiceName,
    pub app: AppName,
    pub rule: String,
    pub metric: String,
    pub scale_out_above: f64,
    pub scale_in_below: f64,
    pub period_secs: u64,
    pub periods: u32,
    pub cooldown_secs: u64,
    pub min_instances: u32,
    pub max_instances: u32,
    pub desired: u32,
    pub instances: u32,
    /// Unix seconds of its last change.
    pub last_change: Option<u64>,
    pub last_reason: Option<String>,
}

impl From<&AutoscaleView> for AutoscaleSummary {
    fn from(view: &AutoscaleView) -> AutoscaleSummary {
        AutoscaleSummary {
            service: view.service.clone(),
            app: view.app.clone(),
            rule: view.rule.describe(),
            metric: view.rule.metric.as_str().to_string(),
            scale_out_above: view.rule.scale_out_above,
            scale_in_below: view.rule.scale_in_below,
            period_secs: view.rule.period_secs,
            periods: view.rule.periods,
            cooldown_secs: view.rule.cooldown_secs,
            min_instances: view.rule.min_instances,
            max_instances: view.rule.max_instances,
            desired: view.desired,
            instances: view.instances,
            last_change: view.last_change_secs,
            last_reason: view.last_reason.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoscaleRemoved {
    pub removed: String,
}

/// What a rule would have done over the recorded history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayView {
    pub service: ServiceName,
    pub app: AppName,
    pub rule: String,
    pub period_secs: u64,
    pub periods: usize,
    pub from: u64,
    pub to: u64,
    pub start_instances: u32,
    pub changes: Vec<ReplayedChange>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayedChange {
    /// Unix seconds.
    pub at: u64,
    /// `out`, `in` or `hold`.
    pub change: String,
    pub instances: u32,
    pub reason: String,
}

impl From<&ReplayAnswer> for ReplayView {
    fn from(answer: &ReplayAnswer) -> ReplayView {
        ReplayView {
            service: answer.service.clone(),
            app: answer.app.clone(),
            rule: answer.rule.describe(),
            period_secs: answer.period_secs,
            periods: answer.periods,
            from: answer.from_secs,
            to: answer.to_secs,
            start_instances: answer.start_instances,
            changes: answer
                .changes
                .iter()
                .map(|(at, d)| ReplayedChange {
                    at: *at,
                    change: match d.change {
                        Some(Change::Out) => "out",
                        Some(Change::In) => "in",
                        None => "hold",
                    }
                    .into(),
                    instances: d.instances,
                    reason: d.reason.clone(),
                })
                .collect(),
        }
    }
}

/// Usage and its cost, grouped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostView {
    pub since_secs: u64,
    pub total_cost: f64,
    pub lines: Vec<CostLineView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostLineView {
    pub key: String,
    pub cpu_hours: f64,
    pub gb_months: f64,
    pub gb_sent: f64,
    pub cost: f64,
}

impl CostView {
    pub fn new(since_secs: u64, lines: &[CostLine]) -> CostView {
        CostView {
            since_secs,
            total_cost: lines.iter().map(|l| l.cost).sum(),
            lines: lines
                .iter()
                .map(|l| CostLineView {
                    key: l.key.clone(),
                    cpu_hours: l.usage.cpu_hours,
                    gb_months: l.usage.gb_months,
                    gb_sent: l.usage.gb_transferred,
                    cost: l.cost,
                })
                .collect(),
        }
    }
}

/// A site's capacity, with when it is full.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteCapacityView {
    pub site: String,
    pub hosts: Vec<HostId>,
    pub resources: Vec<ResourceView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceView {
    pub resource: String,
    pub unit: String,
    pub capacity: f64,
    pub allocated: f64,
    pub used: Option<f64>,
    pub free: f64,
    pub fits: bool,
    pub forecast: Option<ForecastView>,
    /// The daily peaks of its use the forecast was made from: `[UTC day number, peak]`.
    #[serde(default)]
    pub peaks: Vec<[f64; 2]>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForecastView {
    pub text: String,
    pub method: String,
    pub full_in_days: Option<f64>,
    pub earliest_days: Option<f64>,
    pub latest_days: Option<f64>,
    pub slope_per_day: f64,
    pub daily_peaks: usize,
    /// The trend's value when it was made, where a chart starts its line.
    #[serde(default)]
    pub trend_now: Option<f64>,
    /// When it was made, in days since the Unix epoch (UTC).
    #[serde(default)]
    pub as_of_day: f64,
}

impl From<&SiteCapacity> for SiteCapacityView {
    fn from(s: &SiteCapacity) -> SiteCapacityView {
        SiteCapacityView {
            site: s.site.clone(),
            hosts: s.hosts.clone(),
            resources: s
                .resources
                .iter()
                .map(|r| ResourceView {
                    resource: r.resource.as_str().to_string(),
                    unit: r.resource.unit().to_string(),
                    capacity: r.capacity,
                    allocated: r.allocated,
                    used: r.used,
                    free: r.free(),
                    fits: r.allocated <= r.capacity,
                    forecast: r.forecast.as_ref().map(|f| {
                        let (days, earliest, latest) = match &f.outlook {
                            Outlook::Full {
                                days,
                                earliest,
                                latest,
                            } => (Some(*days), Some(*earliest), *latest),
                            Outlook::AlreadyFull => (Some(0.0), Some(0.0), Some(0.0)),
                            _ => (None, None, None),
                        };
                        ForecastView {
                            text: f.describe(&format!("{} {}", s.site, r.resource.as_str())),
                            method: f.method.describe().to_string(),
                            full_in_days: days,
                            earliest_days: earliest,
                            latest_days: latest,
                            slope_per_day: f.slope_per_day,
                            daily_peaks: f.points,
                            trend_now: f.trend_now,
                            as_of_day: f.as_of_day,
                        }
                    }),
                    peaks: r.peaks.iter().map(|&(d, v)| [d, v]).collect(),
                })
                .collect(),
        }
    }
}

/// Capacity before and after a what-if (a drain, a deploy).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WhatIfView {
    /// The host drained away, for `whatif drain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<HostId>,
    /// The service deployed, for `whatif deploy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy: Option<ServiceName>,
    /// Instances the plan could not place (`whatif deploy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unplaced: Option<Vec<String>>,
    pub before: Vec<SiteCapacityView>,
    pub after: Vec<SiteCapacityView>,
    /// Everything still fits after it.
    pub fits: bool,
}

/// One request in the audit log, with its outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditView {
    /// The number of its first record.
    pub seq: u64,
    pub time: String,
    pub time_ms: u64,
    /// Who asked: an operator's name, or `local`.
    pub operator: String,
    pub fingerprint: Option<String>,
    pub operation: String,
    pub target: String,
    /// The request's fields as JSON, secrets left out.
    pub parameters: String,
    /// `ok`, `failed: …`, `refused: …`, or `unknown` when no outcome was recorded.
    pub outcome: String,
    pub duration_ms: Option<u64>,
}

impl AuditView {
    /// One line per request: a request's record joined with the record of its outcome.
    pub fn join(records: &[crate::engine::audit::AuditRecord]) -> Vec<AuditView> {
        let outcomes: std::collections::BTreeMap<u64, &crate::engine::audit::AuditEntry> = records
            .iter()
            .filter_map(|r| r.entry.request.map(|of| (of, &r.entry)))
            .collect();
        records
            .iter()
            .filter(|r| r.entry.request.is_none())
            .map(|r| {
                let e = &r.entry;
                let outcome = match (e.outcome.as_str(), outcomes.get(&r.seq)) {
                    ("started", Some(done)) => Some(*done),
                    _ => None,
                };
                AuditView {
                    seq: r.seq,
                    time: rfc3339_ms(e.time_ms),
                    time_ms: e.time_ms,
                    operator: e.operator.clone(),
                    fingerprint: e.fingerprint.clone(),
                    operation: e.operation.clone(),
                    target: e.target.clone(),
                    parameters: e.parameters.clone(),
                    outcome: match (e.outcome.as_str(), outcome) {
                        (_, Some(done)) => done.outcome.clone(),
                        ("started", None) => "unknown: no outcome was recorded".into(),
                        (other, None) => other.to_string(),
                    },
                    duration_ms: outcome.and_then(|done| done.duration_ms),
                }
            })
            .collect()
    }
}

/// What a check of the audit log's chain found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditCheck {
    pub records: u64,
    pub intact: bool,
    /// The first record that is not what the chain says.
    pub first_bad: Option<u64>,
    pub problem: Option<String>,
}

/// Which engine answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineInfoView {
    pub name: String,
    pub version: String,
    /// Where its operator endpoint listens, when it serves one.
    pub operator_address: Option<String>,
}

/// An operator: who, with which role and key, and since when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperatorView {
    pub name: dunes_shared::model::OperatorName,
    pub role: String,
    /// What their changes are limited to (`service:shop`, `site:geneva`); empty: everything
    /// their role allows.
    pub scopes: Vec<String>,
    /// Of their key (`sha256:…`).
    pub fingerprint: String,
    pub added: String,
    /// When they were revoked; `None` while they are active.
    pub revoked: Option<String>,
    /// Whether they may open VMs' consoles and screens.
    pub consoles: bool,
}

impl From<&crate::engine::operators::OperatorRecord> for OperatorView {
    fn from(r: &crate::engine::operators::OperatorRecord) -> OperatorView {
        OperatorView {
            name: r.name.clone(),
            role: r.role.as_str().to_string(),
            consoles: r.may_use_consoles(),
            scopes: r.scopes.iter().map(|s| s.to_string()).collect(),
            fingerprint: r.fingerprint.to_string(),
            added: rfc3339_ms(r.added_ms),
            revoked: r.revoked_ms.map(rfc3339_ms),
        }
    }
}

/// An image of the library: an operating system's disk or installer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageView {
    pub name: dunes_shared::model::ImageName,
    /// `raw`, `qcow2` or `iso`.
    pub format: String,
    /// What a guest sees: the disk's size, or the volume's.
    pub virtual_bytes: u64,
    /// What the console's copy takes on its storage.
    pub allocated_bytes: u64,
    /// BLAKE3 of the whole file, in hex.
    pub blake3: String,
    pub imported: String,
    /// Hosts that hold a copy.
    pub hosts: Vec<String>,
    /// Hosts it is on its way to now, with the bytes through.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sending: Vec<ImageSendingView>,
}

/// An image on its way to a host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageSendingView {
    pub host: HostId,
    /// The image's allocated bytes through so far, of `total_bytes`.
    pub done_bytes: u64,
    pub total_bytes: u64,
}

impl ImageView {
    /// The view with the pushes of this image under way among `transfers`.
    pub fn with_transfers(
        mut self,
        transfers: &[crate::engine::images::ImageTransferProgress],
    ) -> ImageView {
        self.sending = transfers
            .iter()
            .filter(|t| t.image == self.name)
            .map(|t| ImageSendingView {
                host: t.host.clone(),
                done_bytes: t.done_bytes,
                total_bytes: t.total_bytes,
            })
            .collect();
        self
    }
}

impl From<&crate::engine::images::ImageRecord> for ImageView {
    fn from(r: &crate::engine::images::ImageRecord) -> ImageView {
        ImageView {
            name: r.name.clone(),
            format: r.format.as_str().to_string(),
            virtual_bytes: r.virtual_bytes,
            allocated_bytes: r.allocated_bytes,
            blake3: r.blake3.clone(),
            imported: rfc3339_ms(r.imported_ms),
            hosts: r.hosts.iter().map(|h| h.to_string()).collect(),
            sending: Vec::new(),
        }
    }
}

/// A viewer's console session: which VM, and whether this viewer types. The console's bytes
/// travel beside it (after the answer line on the control socket; in the window, through
/// `attach`).
#[derive(Debug, Serialize, Deserialize)]
pub struct ConsoleSession {
    pub vm: dunes_shared::model::VmName,
    pub host: dunes_shared::model::HostId,
    /// This viewer holds the keyboard; when false another viewer does (or watching only was
    /// asked).
    pub typing: bool,
    #[serde(skip)]
    pub attach: Option<crate::engine::consoles::ConsoleAttach>,
    /// Audits the session's end, with how long it lasted, when dropped: the viewer keeps it
    /// as long as the console is open.
    #[serde(skip)]
    pub end: Option<super::dispatch::SessionEnd>,
}

/// A viewer's screen session: which VM. The pictures travel beside it (in the window,
/// through `attach`).
#[derive(Debug, Serialize, Deserialize)]
pub struct ScreenSession {
    pub vm: dunes_shared::model::VmName,
    pub host: dunes_shared::model::HostId,
    /// This viewer holds the keys and the pointer; when false another viewer does (or
    /// watching only was asked).
    #[serde(default)]
    pub typing: bool,
    #[serde(skip)]
    pub attach: Option<crate::engine::consoles::ScreenAttach>,
    /// Audits the session's end when dropped, as a console's.
    #[serde(skip)]
    pub end: Option<super::dispatch::SessionEnd>,
}

/// A VM's screen as it was, as a PNG file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Screenshot {
    pub vm: dunes_shared::model::VmName,
    pub host: dunes_shared::model::HostId,
    pub width: u32,
    pub height: u32,
    /// The PNG file's bytes, in hex.
    pub png: String,
}

/// How a push of an image to one host went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImagePushView {
    pub host: String,
    /// The host held the image's bytes already: nothing was sent.
    pub held: bool,
    /// Bytes sent now: holes, and what an earlier push that was cut left there, are not.
    pub sent_bytes: u64,
    /// Where this push went on from (0: from the start).
    pub resumed_from: u64,
    /// Chunks the host found corrupt and asked for again.
    pub resent_chunks: u32,
}

impl From<&crate::engine::images::ImagePushReport> for ImagePushView {
    fn from(r: &crate::engine::images::ImagePushReport) -> ImagePushView {
        ImagePushView {
            host: r.host.to_string(),
            held: r.pushed.held,
            sent_bytes: r.pushed.sent_bytes,
            resumed_from: if r.pushed.held {
                0
            } else {
                r.pushed.resumed_from
            },
            resent_chunks: r.pushed.resent_chunks,
        }
    }
}

/// A new operator's certificate, with the CA that signed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperatorIssuedView {
    pub operator: OperatorView,
    pub certificate_pem: String,
    pub ca_pem: String,
}

/// The newest value of one time series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesValue {
    /// `host/NAME/METRIC` or `vm/NAME/METRIC` (`host/lsn-1/cpu`).
    pub series: String,
    pub value: f64,
}

/// A time series answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsView {
    pub subject: String,
    pub resolution_secs: u64,
    pub from: u64,
    pub to: u64,
    pub series: Vec<SeriesView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesView {
    pub metric: String,
    pub unit: String,
    pub points: Vec<PointView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointView {
    /// Unix seconds of the bucket's start.
    pub t: u64,
    pub min: f64,
    pub mean: f64,
    pub max: f64,
}

impl From<&StatsAnswer> for StatsView {
    fn from(answer: &StatsAnswer) -> StatsView {
        StatsView {
            subject: answer.subject.describe(),
            resolution_secs: answer.resolution_secs,
            from: answer.from_secs,
            to: answer.to_secs,
            series: answer
                .series
                .iter()
                .map(|s| SeriesView {
                    metric: s.metric.as_str().to_string(),
                    unit: s.metric.unit().to_string(),
                    points: s
                        .points
                        .iter()
                        .map(|b| PointView {
                            t: b.start_secs,
                            min: b.min,
                            mean: b.mean(),
                            max: b.max,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use dunes_shared::model::{RuntimeKind, VmState};

    use super::*;

    fn keys(value: &impl Serialize) -> Vec<String> {
        let mut keys: Vec<String> = match serde_json::to_value(value).unwrap() {
            serde_json::Value::Object(map) => map.keys().cloned().collect(),
            other => panic!("not an object: {other}"),
        };
        keys.sort();
        keys
    }

    fn sorted(names: &[&str]) -> Vec<String> {
        let mut names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        names.sort();
        names
    }

    fn vm() -> VmSummary {
        VmSummary::new(
            &HostId::new("h1").unwrap(),
            &VmStatus {
                uuid: "u".into(),
                name: VmName::new("web").unwrap(),
                state: VmState::Running,
                vcpus: 2,
                memory_mib: 512,
                template: None,
                disk_bytes: 0,
                runtime: RuntimeKind::Libvirt,
                overlay_on: None,
                disks: None,
                nics: None,
                autostart: None,
                next_start: None,
                addresses: None,
                snapshots: None,
                installer: None,
                screen: false,
            },
        )
    }

    /// Scripts read these names: an absent value is `null`, never a missing key.
    #[test]
    fn a_vm_prints_every_field_it_printed_before() {
        assert_eq!(
            keys(&vm()),
            sorted(&[
                "id",
                "name",
                "host",
                "state",
                "vcpus",
                "memory_mib",
                "template",
                "disk_bytes",
                "overlay_on",
                "disks",
                "nics",
                "addresses",
                "autostart",
                "next_start",
                "snapshots",
                "installer",
                "screen",
            ])
        );
        let listed = FleetVm {
            vm: vm(),
            service: None,
            application: None,
            runtime: "libvirt".into(),
        };
        let mut expected = keys(&vm());
        expected.extend(["application", "runtime", "service"].map(String::from));
        expected.sort();
        assert_eq!(keys(&listed), expected);
        let back: FleetVm = serde_json::from_value(serde_json::to_value(&listed).unwrap()).unwrap();
        assert_eq!(back, listed);
    }

    #[test]
    fn a_migration_check_says_why_or_what_it_takes() {
        let refused = MigrationCheck {
            vm: VmName::new("web").unwrap(),
            from: HostId::new("a").unwrap(),
            to: HostId::new("b").unwrap(),
            can_go: false,
            reasons: vec!["no room".into()],
            estimate: None,
        };
        assert_eq!(
            keys(&refused),
            sorted(&["vm", "from", "to", "can_go", "reasons"])
        );
        let allowed = MigrationCheck {
            can_go: true,
            reasons: Vec::new(),
            estimate: Some(MigrationEstimateView {
                bytes: 1,
                link_mbps: 10,
                seconds: 1.0,
                limit_mbps: None,
                compress: false,
                cost: 0.5,
                crosses_sites: false,
                disk: "whole".into(),
                disk_detail: "a whole disk".into(),
            }),
            ..refused.clone()
        };
        assert!(keys(&allowed).contains(&"disk_detail".to_string()));
        for check in [refused, allowed] {
            let back: MigrationCheck =
                serde_json::from_value(serde_json::to_value(&check).unwrap()).unwrap();
            assert_eq!(back, check);
        }
    }

    #[test]
    fn a_maintenance_without_a_drain_has_its_own_fields_only() {
        let idle = MaintenanceView {
            since: "2026-12-07T00:00:00Z".into(),
            paused: true,
            drain: None,
        };
        assert_eq!(keys(&idle), sorted(&["since", "paused"]));
        let draining = MaintenanceView {
            drain: Some(DrainCounts {
                host: HostId::new("a").unwrap(),
                moved: 1,
                remaining: 2,
                migrating: Some(7),
                settled: false,
                blocked: Vec::new(),
            }),
            ..idle.clone()
        };
        let back: MaintenanceView =
            serde_json::from_value(serde_json::to_value(&draining).unwrap()).unwrap();
        assert_eq!(back, draining);
        let back: MaintenanceView =
            serde_json::from_value(serde_json::to_value(&idle).unwrap()).unwrap();
        assert_eq!(back, idle);
    }
}
