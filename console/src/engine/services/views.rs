//! What the engine shows of a service, and the pure functions behind it: its status from its
//! instances, what placement starts from, a plan's fingerprint, an instance's VM name.

use std::hash::{DefaultHasher, Hasher};

use dunes_shared::{
    model::{AppName, HostId, ServiceName, VmName, VmState},
    service::ServiceSpec,
};

use crate::engine::{
    LinkState,
    records::{InstanceRecord, InstanceState, ServiceRecord},
    services::placement::{Existing, HostOffer, Override, Plan, Resources},
    snapshot::HostView,
};

/// What a service is busy with, when it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Deploying,
    Starting,
    Stopping,
    Deleting,
}

/// How a service stands, from every instance in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ServiceStatus {
    /// Defined, with no instance deployed.
    Defined,
    /// Every instance ready.
    Available,
    /// Every application has a ready instance, but not every instance is.
    Degraded,
    Down,
    /// Deployed, and every instance cleanly off: stopped on purpose, not failing.
    Stopped,
    Deploying,
    Starting,
    Stopping,
    Deleting,
    /// The stored file no longer reads.
    Unreadable,
}

impl ServiceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceStatus::Defined => "defined",
            ServiceStatus::Available => "available",
            ServiceStatus::Degraded => "degraded",
            ServiceStatus::Down => "down",
            ServiceStatus::Stopped => "stopped",
            ServiceStatus::Deploying => "deploying",
            ServiceStatus::Starting => "starting",
            ServiceStatus::Stopping => "stopping",
            ServiceStatus::Deleting => "deleting",
            ServiceStatus::Unreadable => "unreadable",
        }
    }
}

/// An instance as the snapshot shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct InstanceView {
    pub record: InstanceRecord,
    /// Its VM's state, when its host reports the VM.
    pub vm_state: Option<VmState>,
    pub ready: bool,
    /// What the last readiness check said, for applications checked beyond "running".
    pub ready_detail: Option<String>,
    pub cost_per_hour: f64,
    /// The applications inside its VM, as the guest agent last showed them.
    pub guest_apps: Vec<crate::engine::services::guest_apps::GuestAppView>,
    /// Its application metric's last value, or why it could not be read; `None` without
    /// a metric or before the first read.
    pub metric: Option<Result<f64, String>>,
}

/// A service as the snapshot shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ServiceView {
    pub record: ServiceRecord,
    /// `Err` when the stored file no longer reads (a release that changed the format).
    pub spec: Result<ServiceSpec, String>,
    pub instances: Vec<InstanceView>,
    pub status: ServiceStatus,
}

impl ServiceView {
    pub fn name(&self) -> &ServiceName {
        &self.record.name
    }

    pub fn cost_per_hour(&self) -> f64 {
        self.instances
            .iter()
            .fold(0.0, |sum, i| sum + i.cost_per_hour)
    }

    pub fn instance_of_vm(&self, host: &HostId, vm: &VmName) -> Option<&InstanceView> {
        self.instances
            .iter()
            .find(|i| &i.record.host == host && &i.record.vm == vm)
    }
}

/// A plan and the fleet it was made for.
#[derive(Debug, Clone)]
pub struct ServicePlan {
    pub service: ServiceName,
    pub plan: Plan,
    /// Of the hosts, instances and definition the plan saw; a deploy of this plan refuses
    /// when it no longer matches.
    pub fingerprint: String,
}

/// What a deploy, start, stop or delete did, step by step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OperationReport {
    /// `(instance, host, what happened)`, in order.
    pub done: Vec<(String, HostId, String)>,
    /// `(instance, why it failed)`.
    pub failed: Vec<(String, String)>,
}

/// The VM that is an instance: `SERVICE-APP-INDEX`.
pub fn instance_vm_name(
    service: &ServiceName,
    app: &AppName,
    index: u32,
) -> Result<VmName, String> {
    VmName::new(format!("{service}-{app}-{index}")).map_err(|_| {
        format!(
            "the VM name {service}-{app}-{index} would be longer than 63 characters: shorten the service or application name"
        )
    })
}

/// A host as placement sees it, from what the engine knows of it. CPUs and memory held by
/// active VMs are taken; storage is what the agent reports free.
pub fn host_offer(host: &HostView) -> Option<HostOffer> {
    let inv = host.inventory()?;
    let active = host.vms.iter().filter(|v| v.state.is_active());
    let (vcpus, memory_mib) = active.fold((0u32, 0u64), |(c, m), v| {
        (c.saturating_add(v.vcpus), m.saturating_add(v.memory_mib))
    });
    let storage_free_mib = host
        .status
        .map_or(inv.storage_free_mib, |s| s.storage_free_mib);
    Some(HostOffer {
        id: host.id().clone(),
        online: host.link == LinkState::Online,
        maintenance: host.record.maintenance.is_some(),
        site: inv.site.name.clone(),
        security_level: inv.security_level,
        prices: inv.prices,
        link_bandwidth_mbps: inv.site.link_bandwidth_mbps,
        runtimes: inv.runtimes.iter().map(|r| r.kind).collect(),
        interpreters: inv
            .interpreters
            .iter()
            .map(|i| crate::engine::services::placement::Interpreter {
                name: i.name.clone(),
                version: i.version.clone(),
            })
            .collect(),
        free: Resources {
            vcpus: inv.cpus.saturating_sub(vcpus),
            memory_mib: inv.memory_mib.saturating_sub(memory_mib),
            storage_mib: storage_free_mib,
        },
        taken_names: Default::default(),
        images_held: inv
            .template_disks
            .iter()
            .map(|d| d.blake3.clone())
            .collect(),
    })
}

/// What placement starts from: the hosts as offers (sorted by id) and the instances that
/// exist. The engine plans from its own state with it, and the plan dialog from a snapshot
/// for its live verdicts.
pub fn plan_inputs<'a>(
    spec: &ServiceSpec,
    hosts: impl Iterator<Item = &'a HostView>,
    instances: &[InstanceRecord],
) -> (Vec<HostOffer>, Vec<Existing>) {
    let mut offers: Vec<HostOffer> = hosts
        .filter_map(|view| {
            let mut offer = host_offer(view)?;
            offer.taken_names = view
                .vms
                .iter()
                .filter(|v| {
                    !instances
                        .iter()
                        .any(|i| i.host == offer.id && i.vm == v.name)
                })
                .map(|v| v.name.to_string())
                .collect();
            Some(offer)
        })
        .collect();
    offers.sort_by(|a, b| a.id.cmp(&b.id));
    let count = |app: &AppName| spec.application(app).map_or(0, |a| a.instances);
    let existing = instances
        .iter()
        .filter(|i| i.state != InstanceState::Removing)
        // An adopted VM beyond the instance count is kept as it is: a deploy never removes
        // what the operator brought in (deleting the service does).
        .filter(|i| !(i.adopted && i.index >= count(&i.app)))
        .map(|i| Existing {
            app: i.app.clone(),
            index: i.index,
            host: i.host.clone(),
        })
        .collect();
    (offers, existing)
}

/// A digest of a plan: what it was made for (the definition, the instances there, the
/// operator's choices) and what it decides (each instance's host and action, what goes,
/// what finds no host, the prices). A fleet change that decides nothing differently (a few
/// MiB of disk used elsewhere on a host) leaves it as it was; one that moves an instance does
/// not.
pub fn fingerprint(
    spec: &ServiceSpec,
    existing: &[Existing],
    overrides: &[Override],
    plan: &crate::engine::services::placement::Plan,
) -> String {
    let placements: Vec<_> = plan
        .placements
        .iter()
        .map(|p| {
            format!(
                "{}-{}@{}:{:?}:{:.6}",
                p.app, p.index, p.host, p.action, p.cost_per_hour
            )
        })
        .collect();
    let unplaced: Vec<_> = plan
        .unplaced
        .iter()
        .map(|u| format!("{}-{}", u.app, u.index))
        .collect();
    let verdicts: Vec<bool> = plan.overrides.iter().map(|v| v.verdict.is_ok()).collect();
    let mut hasher = DefaultHasher::new();
    hasher.write(
        format!(
            "{spec:?}|{existing:?}|{overrides:?}|{placements:?}|{:?}|{unplaced:?}|{verdicts:?}",
            plan.removals
        )
        .as_bytes(),
    );
    format!("{:016x}", hasher.finish())
}

/// The status of a service from its instances and what it is busy with.
pub fn service_status(
    spec: &ServiceSpec,
    instances: &[InstanceView],
    busy: Option<Operation>,
    started: Option<bool>,
) -> ServiceStatus {
    match busy {
        Some(Operation::Deploying) => return ServiceStatus::Deploying,
        Some(Operation::Starting) => return ServiceStatus::Starting,
        Some(Operation::Stopping) => return ServiceStatus::Stopping,
        Some(Operation::Deleting) => return ServiceStatus::Deleting,
        None => {}
    }
    if instances.is_empty() {
        return ServiceStatus::Defined;
    }
    // Off because nobody started it, or because the operator stopped it: not an alarm.
    // A started service whose instances went off is down.
    if started != Some(true)
        && instances
            .iter()
            .all(|i| i.vm_state == Some(VmState::Shutoff))
    {
        return ServiceStatus::Stopped;
    }
    let wanted: u32 = spec.applications.iter().map(|a| a.instances).sum();
    let ready = instances.iter().filter(|i| i.ready).count() as u32;
    // An application inside a VM that is not up degrades the service; its VM and the other
    // applications in it still serve, so it never makes the service down by itself.
    let guests_up = instances
        .iter()
        .flat_map(|i| &i.guest_apps)
        .all(|g| g.state == crate::engine::services::guest_apps::GuestAppState::Up);
    if ready >= wanted && instances.iter().all(|i| i.ready) && guests_up {
        return ServiceStatus::Available;
    }
    let every_app_has_one = spec
        .applications
        .iter()
        .filter(|a| a.instances > 0)
        .all(|a| instances.iter().any(|i| i.record.app == a.name && i.ready));
    if every_app_has_one {
        ServiceStatus::Degraded
    } else {
        ServiceStatus::Down
    }
}
