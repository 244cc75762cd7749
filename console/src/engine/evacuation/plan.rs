//! Moving VMs off a host (a drain) or a service to another site: pure, no I/O. For each VM
//! this says where it goes next, chosen by the placement engine among the hosts the
//! migration pre-check accepts, or why it cannot move. One migration of a drain or a move
//! runs at a time, and the pre-check counts instances on their way to a host as already
//! there, so two anti-affine instances never share a host, not even for a moment.

use std::sync::Arc;

use dunes_shared::model::{HostId, VmName, VmStatus};

use crate::engine::{
    HostView, ServiceView,
    migration::{MigrationEstimate, MigrationJournal, MigrationOrigin, MigrationStep, precheck},
    records::{InstanceRecord, Maintenance},
    services::placement::{Action, place_instances},
    services::views::{host_offer, plan_inputs},
};

/// A VM and where it goes next.
#[derive(Debug, Clone, PartialEq)]
pub struct MoveChoice {
    pub vm: VmName,
    pub from: HostId,
    pub to: HostId,
    pub estimate: MigrationEstimate,
}

/// A VM that cannot move, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Blocked {
    pub vm: VmName,
    pub reason: String,
}

/// Where a drain stands, as the snapshot shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DrainProgress {
    pub host: HostId,
    pub paused: bool,
    /// VMs this drain has moved away.
    pub moved: u32,
    /// VMs still on the host, the one on its way included.
    pub remaining: u32,
    /// The migration under way, if one is.
    pub migrating: Option<u64>,
    /// VMs that cannot move, each with its reason.
    pub blocked: Vec<Blocked>,
}

impl DrainProgress {
    /// Nothing is left to move, or what is left cannot move.
    pub fn is_settled(&self) -> bool {
        self.migrating.is_none() && self.remaining as usize == self.blocked.len()
    }
}

/// What the fleet looks like to an evacuation.
pub struct Fleet<'a> {
    pub hosts: &'a [Arc<HostView>],
    pub services: &'a [Arc<ServiceView>],
    pub instances: &'a [InstanceRecord],
    pub migrations: &'a [MigrationJournal],
}

/// The parts of a [`Fleet`], owned: what the engine hands over for one step.
pub struct FleetParts {
    pub hosts: Vec<Arc<HostView>>,
    pub services: Vec<Arc<ServiceView>>,
    pub instances: Vec<InstanceRecord>,
    pub migrations: Vec<MigrationJournal>,
}

impl FleetParts {
    pub fn fleet(&self) -> Fleet<'_> {
        Fleet {
            hosts: &self.hosts,
            services: &self.services,
            instances: &self.instances,
            migrations: &self.migrations,
        }
    }
}

impl Fleet<'_> {
    fn open_migrations(&self) -> Vec<MigrationJournal> {
        self.migrations
            .iter()
            .filter(|m| !m.step.is_finished())
            .cloned()
            .collect()
    }
}

/// Where `vm` on `from` should go, among the hosts of `site` when one is given: the hosts the
/// pre-check accepts, and among them the placement engine's choice for a service instance
/// (its rules, cost and spread), the host with the most free memory for any other VM. `Err`
/// says why no host can take it.
pub fn choose_target(
    vm: &VmStatus,
    from: &HostView,
    fleet: &Fleet<'_>,
    site: Option<&str>,
) -> Result<(HostId, MigrationEstimate), String> {
    let open = fleet.open_migrations();
    let mut accepted: Vec<(&HostView, MigrationEstimate)> = Vec::new();
    let mut reasons: Vec<String> = Vec::new();
    for host in fleet.hosts.iter().map(|h| h.as_ref()) {
        if host.id() == from.id() || site.is_some_and(|s| host.site_name() != s) {
            continue;
        }
        match precheck(vm, from, host, fleet.services, &open) {
            Ok(estimate) => accepted.push((host, estimate)),
            Err(why) => {
                for reason in why {
                    if !reasons.contains(&reason) {
                        reasons.push(reason);
                    }
                }
            }
        }
    }
    if accepted.is_empty() {
        return Err(match (reasons.is_empty(), site) {
            (true, Some(site)) => format!("site {site} has no other host"),
            (true, None) => "there is no other host".to_string(),
            (false, _) => format!("no host can take it: {}", reasons.join("; ")),
        });
    }
    let instance = fleet
        .instances
        .iter()
        .find(|i| &i.host == from.id() && i.vm == vm.name);
    let spec = instance.and_then(|i| {
        fleet
            .services
            .iter()
            .find(|s| s.name() == &i.service)
            .and_then(|s| s.spec.as_ref().ok())
    });
    let (Some(instance), Some(spec)) = (instance, spec) else {
        // Not a service instance: the host with the most memory free, then the lowest id.
        let best = accepted.iter().max_by(|(a, _), (b, _)| {
            let free = |h: &HostView| host_offer(h).map_or(0, |o| o.free.memory_mib);
            free(a).cmp(&free(b)).then_with(|| b.id().cmp(a.id()))
        });
        let (host, estimate) = best.expect("accepted is not empty");
        return Ok((host.id().clone(), estimate.clone()));
    };
    // The placement engine places the instance as if it were missing, with the service's
    // other instances kept where they are; a host the pre-check refused takes nothing new.
    let others: Vec<InstanceRecord> = fleet
        .instances
        .iter()
        .filter(|i| i.service == instance.service && i.key() != instance.key())
        .cloned()
        .collect();
    let (mut offers, existing) = plan_inputs(spec, fleet.hosts.iter().map(|h| h.as_ref()), &others);
    for offer in &mut offers {
        if !accepted.iter().any(|(h, _)| h.id() == &offer.id) {
            offer.maintenance = true;
        }
    }
    let plan = place_instances(spec, &offers, &existing);
    let placed = plan
        .placements
        .iter()
        .find(|p| p.app == instance.app && p.index == instance.index && p.action == Action::Create);
    match placed {
        Some(p) => {
            let estimate = accepted
                .iter()
                .find(|(h, _)| h.id() == &p.host)
                .map(|(_, e)| e.clone())
                .expect("placement chose among the accepted hosts");
            Ok((p.host.clone(), estimate))
        }
        None => {
            let why = plan
                .unplaced
                .iter()
                .find(|u| u.app == instance.app && u.index == instance.index)
                .map_or_else(
                    || "placement found no host for it".to_string(),
                    |u| u.would_fit.clone(),
                );
            Err(why)
        }
    }
}

fn started_by(m: &MigrationJournal, origin: &MigrationOrigin, since_ms: u64) -> bool {
    &m.origin == origin && m.started_ms >= since_ms
}

/// Where the drain of `host` stands, and the next VM to move (when the drain is not paused
/// and no migration of it is under way). VMs are taken by name; one whose migration rolled
/// back since the drain was last resumed is not tried again until it is resumed.
pub fn drain_step(
    host: &HostView,
    maintenance: &Maintenance,
    fleet: &Fleet<'_>,
) -> (DrainProgress, Option<MoveChoice>) {
    let origin = MigrationOrigin::Drain(host.id().clone());
    let moved = fleet
        .migrations
        .iter()
        .filter(|m| started_by(m, &origin, maintenance.since_ms))
        .filter(|m| m.step.is_committed())
        .count() as u32;
    // Any migration off the host, the operator's too: one at a time.
    let migrating = fleet
        .migrations
        .iter()
        .find(|m| &m.from == host.id() && !m.step.is_finished())
        .map(|m| m.id);
    let mut vms: Vec<&VmStatus> = host.vms.iter().collect();
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    let mut blocked = Vec::new();
    let mut next = None;
    for vm in vms {
        if fleet
            .migrations
            .iter()
            .any(|m| &m.from == host.id() && m.vm == vm.name && !m.step.is_finished())
        {
            continue;
        }
        let failed = fleet.migrations.iter().rfind(|m| {
            started_by(m, &origin, maintenance.resumed_ms)
                && m.vm == vm.name
                && m.step == MigrationStep::RolledBack
        });
        if let Some(failed) = failed {
            blocked.push(Blocked {
                vm: vm.name.clone(),
                reason: format!(
                    "migration {} rolled back: {}; resume the drain to try again",
                    failed.id,
                    failed.error.as_deref().unwrap_or("no reason given")
                ),
            });
            continue;
        }
        match choose_target(vm, host, fleet, None) {
            Ok((to, estimate)) => {
                if next.is_none() {
                    next = Some(MoveChoice {
                        vm: vm.name.clone(),
                        from: host.id().clone(),
                        to,
                        estimate,
                    });
                }
            }
            Err(reason) => blocked.push(Blocked {
                vm: vm.name.clone(),
                reason,
            }),
        }
    }
    let progress = DrainProgress {
        host: host.id().clone(),
        paused: maintenance.paused,
        moved,
        remaining: host.vms.len() as u32,
        migrating,
        blocked,
    };
    let next = next.filter(|_| !maintenance.paused && migrating.is_none());
    (progress, next)
}

/// The instances of `service` not yet on `site`, in the service's start order (what it needs
/// first), and the next one to move with its target there; `Err` names an instance that
/// cannot move and why.
pub fn service_move_step(
    service: &ServiceView,
    site: &str,
    fleet: &Fleet<'_>,
) -> Result<Option<MoveChoice>, Blocked> {
    let Ok(spec) = &service.spec else {
        return Ok(None);
    };
    let order = spec.start_order().unwrap_or_default();
    let site_of = |h: &HostId| {
        fleet
            .hosts
            .iter()
            .find(|v| v.id() == h)
            .map(|v| v.site_name().to_string())
    };
    for app in &order {
        let mut outside: Vec<&InstanceRecord> = fleet
            .instances
            .iter()
            .filter(|i| &i.service == service.name() && i.app == app.name)
            .filter(|i| site_of(&i.host).as_deref() != Some(site))
            .collect();
        outside.sort_by_key(|i| i.index);
        if let Some(i) = outside.first() {
            let from = fleet
                .hosts
                .iter()
                .find(|h| h.id() == &i.host)
                .ok_or_else(|| Blocked {
                    vm: i.vm.clone(),
                    reason: format!("host {} is not enrolled", i.host),
                })?;
            let vm = from.vm(&i.vm).ok_or_else(|| Blocked {
                vm: i.vm.clone(),
                reason: format!("{} does not report it", i.host),
            })?;
            return choose_target(vm, from, fleet, Some(site))
                .map(|(to, estimate)| {
                    Some(MoveChoice {
                        vm: i.vm.clone(),
                        from: i.host.clone(),
                        to,
                        estimate,
                    })
                })
                .map_err(|reason| Blocked {
                    vm: i.vm.clone(),
                    reason,
                });
        }
    }
    Ok(None)
}
