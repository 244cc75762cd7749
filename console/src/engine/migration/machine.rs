//! The migration state machine: pure, no I/O. A migration moves one VM from a source host to
//! a target host through
//! `planned → stopping → transferring → verifying → defining → starting → confirmed →
//! source-deleted`. The journal is written before each step's side effect, and every side
//! effect can be repeated, so a console that stops anywhere picks the migration up from its
//! journal. Before `confirmed`, a failure rolls back: the target's data goes, and the VM runs
//! again on the source if it ran before. The source's data is deleted only after the target
//! has confirmed the VM running with data whose hash matched.
//!
//! The driver beside this module carries the effects out and feeds their outcomes back in.

use dunes_shared::model::{HostId, VmName};

/// Where a migration stands.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum MigrationStep {
    Planned,
    Stopping,
    Transferring,
    Verifying,
    Defining,
    Starting,
    Confirmed,
    SourceDeleted,
    /// A failure before `confirmed`: undoing on the target, then back to the source.
    RollingBack,
    RolledBack,
}

impl MigrationStep {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStep::Planned => "planned",
            MigrationStep::Stopping => "stopping",
            MigrationStep::Transferring => "transferring",
            MigrationStep::Verifying => "verifying",
            MigrationStep::Defining => "defining",
            MigrationStep::Starting => "starting",
            MigrationStep::Confirmed => "confirmed",
            MigrationStep::SourceDeleted => "source-deleted",
            MigrationStep::RollingBack => "rolling-back",
            MigrationStep::RolledBack => "rolled-back",
        }
    }

    /// How the window and the event log say it: a finished migration is `done`.
    pub fn label(self) -> &'static str {
        match self {
            MigrationStep::SourceDeleted => "done",
            MigrationStep::RollingBack => "rolling back",
            MigrationStep::RolledBack => "rolled back",
            other => other.as_str(),
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "planned" => MigrationStep::Planned,
            "stopping" => MigrationStep::Stopping,
            "transferring" => MigrationStep::Transferring,
            "verifying" => MigrationStep::Verifying,
            "defining" => MigrationStep::Defining,
            "starting" => MigrationStep::Starting,
            "confirmed" => MigrationStep::Confirmed,
            "source-deleted" => MigrationStep::SourceDeleted,
            "rolling-back" => MigrationStep::RollingBack,
            "rolled-back" => MigrationStep::RolledBack,
            _ => return None,
        })
    }

    /// Whether the migration is over, one way or the other.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            MigrationStep::SourceDeleted | MigrationStep::RolledBack
        )
    }

    /// Whether the target holds the only running copy: from here on nothing rolls back.
    pub fn is_committed(self) -> bool {
        matches!(
            self,
            MigrationStep::Confirmed | MigrationStep::SourceDeleted
        )
    }

    /// The step after this one when it succeeded.
    fn next(self) -> Self {
        match self {
            MigrationStep::Planned => MigrationStep::Stopping,
            MigrationStep::Stopping => MigrationStep::Transferring,
            MigrationStep::Transferring => MigrationStep::Verifying,
            MigrationStep::Verifying => MigrationStep::Defining,
            MigrationStep::Defining => MigrationStep::Starting,
            MigrationStep::Starting => MigrationStep::Confirmed,
            MigrationStep::Confirmed | MigrationStep::SourceDeleted => MigrationStep::SourceDeleted,
            MigrationStep::RollingBack | MigrationStep::RolledBack => MigrationStep::RolledBack,
        }
    }
}

/// One migration as the journal keeps it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MigrationJournal {
    pub id: u64,
    pub vm: VmName,
    pub from: HostId,
    pub to: HostId,
    pub step: MigrationStep,
    /// Whether the VM ran before: a rollback starts it again, and the target starts it.
    pub was_running: bool,
    /// Why it rolled back, or what it waits for.
    pub error: Option<String>,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// The transfer's ticket, made before the transfer starts and kept for its retries
    /// (the engine's own: not sent to windows).
    #[serde(skip)]
    pub ticket: Option<String>,
    /// The image digest the target verified, in hex.
    pub digest: Option<String>,
    pub started_ms: u64,
    pub updated_ms: u64,
    /// The transfer's rate as last measured, in bytes per second (not kept in the store).
    pub rate_bps: Option<u64>,
    /// Who asked for it: the operator, a host drain or a service move.
    pub origin: MigrationOrigin,
    /// The most the transfer may use, in Mbit/s: the operator's limit and, between sites,
    /// each site's transfer limit.
    pub limit_mbps: Option<u32>,
    /// Whether chunks travel compressed (where the target reads zstd and a chunk shrinks).
    pub compress: bool,
    /// The step that failed or was cancelled, once rolling back: it says what the target may
    /// hold, and so what the rollback undoes first.
    pub failed_at: Option<MigrationStep>,
    /// The host it waits for, while one does not answer (not kept in the store: a restart
    /// tries again anyway).
    pub waiting: Option<String>,
    /// How the disk travels: a whole image, an overlay as it is, or an overlay flattened.
    pub disk_move: DiskMove,
}

/// How a VM's disk travels in a migration.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum DiskMove {
    /// A whole image (sparse).
    #[default]
    Image,
    /// A qcow2 overlay, as it is: the target holds the same template image (same BLAKE3).
    Overlay(dunes_shared::model::TemplateDisk),
    /// A qcow2 overlay flattened into a whole image: the target does not hold the same
    /// template image, so the guest's view of overlay and template travels.
    Flattened(dunes_shared::model::TemplateName),
}

impl DiskMove {
    /// `image`, `overlay` or `flattened`, as stored and in `migrations --json`.
    pub fn kind(&self) -> &'static str {
        match self {
            DiskMove::Image => "image",
            DiskMove::Overlay(_) => "overlay",
            DiskMove::Flattened(_) => "flattened",
        }
    }

    /// The template the overlay is on, if the disk is one.
    pub fn template(&self) -> Option<&dunes_shared::model::TemplateName> {
        match self {
            DiskMove::Image => None,
            DiskMove::Overlay(t) => Some(&t.template),
            DiskMove::Flattened(t) => Some(t),
        }
    }

    /// For the operator: how the disk goes and why.
    pub fn describe(&self) -> String {
        match self {
            DiskMove::Image => "whole image".into(),
            DiskMove::Overlay(t) => format!(
                "overlay only: the target holds the same template {} image",
                t.template
            ),
            DiskMove::Flattened(t) => {
                format!("flattened: the target does not hold the same template {t} image")
            }
        }
    }

    /// What the VM's disk takes on the target and on the link: flattened, the template's
    /// allocated bytes come too (at most: the overlay hides some of them).
    pub fn bytes(&self, vm: &dunes_shared::model::VmStatus) -> u64 {
        match (self, &vm.overlay_on) {
            (DiskMove::Flattened(_), Some(base)) => vm.disk_bytes + base.allocated_bytes,
            _ => vm.disk_bytes,
        }
    }

    /// How a VM's disk would go to a host whose inventory is `to`.
    pub fn choose(
        vm: &dunes_shared::model::VmStatus,
        to: Option<&dunes_shared::model::HostInventory>,
    ) -> DiskMove {
        let Some(base) = &vm.overlay_on else {
            return DiskMove::Image;
        };
        let same = to.is_some_and(|i| {
            i.template_disks
                .iter()
                .any(|t| t.template == base.template && t.blake3 == base.blake3)
        });
        if same {
            DiskMove::Overlay(base.clone())
        } else {
            DiskMove::Flattened(base.template.clone())
        }
    }
}

/// What the operator may ask of one migration's transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MigrationOptions {
    /// At most this many Mbit/s (site limits apply too, between sites).
    pub limit_mbps: Option<u32>,
    /// Compress or not; `None`: compress when it crosses to or from a remote site.
    pub compress: Option<bool>,
}

/// Why a migration was started, kept with it for the history.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum MigrationOrigin {
    /// Asked for by the operator (a drop in the window, ctl).
    #[default]
    Operator,
    /// Part of draining this host.
    Drain(HostId),
    /// Part of moving this service to another site.
    ServiceMove(dunes_shared::model::ServiceName),
}

impl MigrationOrigin {
    /// As stored and shown: `operator`, `drain:HOST`, `service-move:NAME`.
    pub fn as_string(&self) -> String {
        match self {
            MigrationOrigin::Operator => "operator".into(),
            MigrationOrigin::Drain(h) => format!("drain:{h}"),
            MigrationOrigin::ServiceMove(s) => format!("service-move:{s}"),
        }
    }

    /// The stored text back; what this console does not know reads as the operator's.
    pub fn parse(text: &str) -> Self {
        let parsed = match text.split_once(':') {
            Some(("drain", h)) => HostId::new(h).ok().map(MigrationOrigin::Drain),
            Some(("service-move", s)) => dunes_shared::model::ServiceName::new(s)
                .ok()
                .map(MigrationOrigin::ServiceMove),
            _ => None,
        };
        parsed.unwrap_or_default()
    }
}

impl MigrationJournal {
    /// Seconds left in the transfer at the last measured rate.
    pub fn eta_secs(&self) -> Option<u64> {
        let rate = self.rate_bps.filter(|r| *r > 0)?;
        (self.step == MigrationStep::Transferring).then(|| {
            self.bytes_total
                .saturating_sub(self.bytes_done)
                .div_ceil(rate)
        })
    }
}

/// A side effect for the driver: each can be carried out again with the same result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Stop the VM on the source: gracefully, then forced after the timeout.
    StopSource,
    /// Stream the disks from the source to the target (from where an earlier try stopped).
    Transfer,
    /// Compare the whole-image hashes on both ends.
    Verify,
    /// Define the VM on the target from the source's portable definition.
    DefineOnTarget,
    /// Start it on the target and wait until it runs (and is ready, where checked).
    StartOnTarget,
    /// Delete the VM and its disks on the source.
    DeleteSource,
    /// Remove whatever the target holds of this VM (partial data, a definition).
    CleanTarget,
    /// Start the VM again on the source.
    StartSource,
}

/// What came of the effect of the current step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// It failed for good: roll back (before `confirmed`), or keep trying (after).
    Failed(String),
    /// A host does not answer: the journal waits, shown as such, and nothing is guessed.
    Waiting(String),
    /// The operator cancelled: roll back, as a failure would.
    Cancelled,
}

/// The effects that carry out the step the journal stands at, in order. A rollback is one
/// step of two effects (clean the target, start the source again if the VM ran), both
/// repeatable, so that the journal says `rolled-back` only once the source runs again.
pub fn effects_of(journal: &MigrationJournal) -> Vec<Effect> {
    match journal.step {
        MigrationStep::Planned | MigrationStep::SourceDeleted | MigrationStep::RolledBack => {
            Vec::new()
        }
        MigrationStep::Stopping => vec![Effect::StopSource],
        MigrationStep::Transferring => vec![Effect::Transfer],
        MigrationStep::Verifying => vec![Effect::Verify],
        MigrationStep::Defining => vec![Effect::DefineOnTarget],
        MigrationStep::Starting => vec![Effect::StartOnTarget],
        MigrationStep::Confirmed => vec![Effect::DeleteSource],
        // Before the target defined the VM, the source runs it again first: it does not wait
        // for a target that may be gone. After, the target's copy stops first, so that the
        // VM never runs twice.
        MigrationStep::RollingBack
            if journal.was_running
                && journal
                    .failed_at
                    .is_some_and(|s| s < MigrationStep::Defining) =>
        {
            vec![Effect::StartSource, Effect::CleanTarget]
        }
        MigrationStep::RollingBack if journal.was_running => {
            vec![Effect::CleanTarget, Effect::StartSource]
        }
        MigrationStep::RollingBack => vec![Effect::CleanTarget],
    }
}

/// The journal after `outcome` of its current step's effects, and the effects to carry out
/// next, in order. The new journal is written before any of them runs.
pub fn advance(journal: &MigrationJournal, outcome: Outcome) -> (MigrationJournal, Vec<Effect>) {
    let mut next = journal.clone();
    next.waiting = None;
    match outcome {
        Outcome::Waiting(why) => {
            next.waiting = Some(why);
            return (next, Vec::new());
        }
        Outcome::Done if journal.step == MigrationStep::RollingBack => {
            // The reason it rolled back stays with it.
            next.step = MigrationStep::RolledBack;
            return (next, Vec::new());
        }
        Outcome::Done => {
            next.error = None;
            next.step = journal.step.next();
        }
        Outcome::Failed(why) if journal.step.is_committed() => {
            // The target runs the VM: deleting the source is tried again, never undone.
            next.error = Some(format!("deleting the source failed: {why}; trying again"));
            return (next, vec![Effect::DeleteSource]);
        }
        Outcome::Failed(why) if journal.step == MigrationStep::RollingBack => {
            let reason = journal.error.clone().unwrap_or_default();
            next.error = Some(format!(
                "{reason}; the rollback failed ({why}) and is tried again"
            ));
            let effects = effects_of(&next);
            return (next, effects);
        }
        Outcome::Failed(why) => {
            next.step = MigrationStep::RollingBack;
            next.failed_at = Some(journal.step);
            next.error = Some(format!("{} failed: {why}", journal.step.as_str()));
        }
        Outcome::Cancelled => {
            if journal.step.is_committed()
                || journal.step.is_finished()
                || journal.step == MigrationStep::RollingBack
            {
                return (next, Vec::new());
            }
            next.step = MigrationStep::RollingBack;
            next.failed_at = Some(journal.step);
            next.error = Some(format!("cancelled while {}", journal.step.as_str()));
        }
    }
    let effects = effects_of(&next);
    (next, effects)
}

/// What a console that starts again does with a migration its journal left open: the effects
/// of the step it stands at, again (each can be repeated); a plan only starts now.
pub fn resume(journal: &MigrationJournal) -> Vec<Effect> {
    match journal.step {
        MigrationStep::Planned => vec![Effect::StopSource],
        _ => effects_of(journal),
    }
}

/// What moving a VM would take, shown before the operator confirms.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationEstimate {
    /// Allocated bytes of the VM's disk: what crosses the link.
    pub bytes: u64,
    /// The link it crosses, in Mbit/s.
    pub link_mbps: u32,
    /// The transfer's time over that link, which is also the VM's downtime (it moves cold).
    pub seconds: f64,
    /// The transfer's cost at the source's price per GB transferred, between sites.
    pub cost: f64,
    pub crosses_sites: bool,
    /// The transfer's limit from the sites' settings, in Mbit/s (between sites only).
    pub site_limit_mbps: Option<u32>,
    /// Whether chunks would travel compressed by default: to or from a remote site.
    pub compress: bool,
    /// How the disk travels.
    pub disk_move: DiskMove,
}

impl MigrationEstimate {
    /// The limit the transfer gets with the operator's options, and whether it compresses.
    pub fn transfer_settings(&self, options: MigrationOptions) -> (Option<u32>, bool) {
        let limit = match (options.limit_mbps, self.site_limit_mbps) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        (limit, options.compress.unwrap_or(self.compress))
    }
}

/// Checks whether `vm` can move from `from` to `to`, and what it would take: every reason it
/// cannot, as a sentence an operator can act on, or the estimate.
pub fn precheck(
    vm: &dunes_shared::model::VmStatus,
    from: &crate::engine::HostView,
    to: &crate::engine::HostView,
    services: &[std::sync::Arc<crate::engine::ServiceView>],
    migrations: &[MigrationJournal],
) -> Result<MigrationEstimate, Vec<String>> {
    use dunes_shared::model::RuntimeKind;
    let mut reasons = Vec::new();
    let target = to.id();
    if from.id() == target {
        return Err(vec![format!("{} is on {target} already", vm.name)]);
    }
    if vm.runtime != RuntimeKind::Libvirt {
        reasons.push(format!(
            "{} is a process instance; only VMs migrate",
            vm.name
        ));
    }
    if vm.runtime == RuntimeKind::Libvirt && vm.disks.as_ref().is_some_and(Vec::is_empty) {
        reasons.push(format!(
            "{} has no disk in {}'s storage (it was defined outside Dunes), so its agent cannot stream it",
            vm.name,
            from.id()
        ));
    }
    if let Some(n) = vm.snapshots.filter(|&n| n > 0) {
        reasons.push(format!(
            "{} has {n} snapshot(s), which its agent cannot move; delete them first",
            vm.name
        ));
    }
    if from.link != crate::engine::LinkState::Online {
        reasons.push(format!("{}: unreachable", from.id()));
    }
    // How the disk would travel, and so what it takes on the target and on the link.
    let disk_move = DiskMove::choose(vm, to.inventory());
    let bytes = disk_move.bytes(vm);
    match crate::engine::services::views::host_offer(to) {
        None => reasons.push(format!("{target}: its inventory is not known yet")),
        Some(offer) => {
            if !offer.online {
                reasons.push(format!("{target}: unreachable"));
            }
            if !offer.runtimes.contains(&RuntimeKind::Libvirt) {
                reasons.push(format!("{target}: has no libvirt runtime"));
            }
            if to.record.maintenance.is_some() {
                reasons.push(format!("{target}: in maintenance, takes nothing new"));
            }
            if to.vm(&vm.name).is_some() {
                reasons.push(format!("{target}: already has a VM named {}", vm.name));
            }
            if vm.state.is_active() {
                if offer.free.vcpus < vm.vcpus {
                    reasons.push(format!(
                        "{target}: {} vCPUs free < {} needed",
                        offer.free.vcpus, vm.vcpus
                    ));
                }
                if offer.free.memory_mib < vm.memory_mib {
                    reasons.push(format!(
                        "{target}: memory {:.1} GiB free < {:.1} GiB needed",
                        offer.free.memory_mib as f64 / 1024.0,
                        vm.memory_mib as f64 / 1024.0
                    ));
                }
            }
            let disk_mib = bytes.div_ceil(1024 * 1024);
            if offer.free.storage_mib < disk_mib {
                reasons.push(format!(
                    "{target}: storage {} MiB free < {disk_mib} MiB needed",
                    offer.free.storage_mib
                ));
            }
            // The rules of the service the VM is an instance of.
            for service in services {
                let Some(instance) = service.instance_of_vm(from.id(), &vm.name) else {
                    continue;
                };
                let Ok(spec) = &service.spec else { continue };
                let app = &instance.record.app;
                let rules = &spec.rules;
                if rules.never_relocate.contains(app) {
                    reasons.push(format!(
                        "{} is {app}-{} of service {}, which never relocates",
                        vm.name,
                        instance.record.index,
                        service.name()
                    ));
                }
                let needed = rules
                    .min_security_level
                    .iter()
                    .filter(|r| r.application.as_ref().is_none_or(|a| a == app))
                    .map(|r| r.level)
                    .max();
                if let Some(needed) = needed
                    && offer.security_level < needed
                {
                    reasons.push(format!(
                        "{target}: security level {} < required {needed}",
                        offer.security_level
                    ));
                }
                if !rules.allowed_sites.is_empty() && !rules.allowed_sites.contains(&offer.site) {
                    reasons.push(format!(
                        "{target}: site {} is not allowed for service {}",
                        offer.site,
                        service.name()
                    ));
                }
                reasons.extend(rule_conflicts(service, instance, target, migrations));
            }
        }
    }
    if !reasons.is_empty() {
        return Err(reasons);
    }
    let crosses_sites = from.site_name() != to.site_name();
    let site_link =
        |h: &crate::engine::HostView| h.inventory().map_or(1000, |i| i.site.link_bandwidth_mbps);
    let nic = |h: &crate::engine::HostView| {
        h.inventory()
            .and_then(|i| i.network.iter().filter_map(|n| n.speed_mbps).max())
            .unwrap_or(1000)
    };
    let site_limit =
        |h: &crate::engine::HostView| h.inventory().and_then(|i| i.site.transfer_limit_mbps);
    let site_limit_mbps = if crosses_sites {
        match (site_limit(from), site_limit(to)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    } else {
        None
    };
    let link_mbps = if crosses_sites {
        site_link(from).min(site_link(to))
    } else {
        nic(from).min(nic(to))
    }
    .min(site_limit_mbps.unwrap_or(u32::MAX))
    .max(1);
    let seconds = bytes as f64 * 8.0 / (f64::from(link_mbps) * 1e6);
    let price = from
        .inventory()
        .map_or(0.0, |i| i.prices.per_gb_transferred);
    let cost = if crosses_sites {
        bytes as f64 / 1e9 * price
    } else {
        0.0
    };
    Ok(MigrationEstimate {
        bytes,
        link_mbps,
        seconds,
        cost,
        crosses_sites,
        site_limit_mbps,
        compress: crosses_sites && (from.is_remote() || to.is_remote()),
        disk_move,
    })
}

/// Whether `instance` of `service` may stand on `target` beside the service's other
/// instances there: those whose host is `target` and those on their way to it, so that two
/// anti-affine instances never share a host, not even while one of them moves.
fn rule_conflicts(
    service: &crate::engine::ServiceView,
    instance: &crate::engine::InstanceView,
    target: &HostId,
    migrations: &[MigrationJournal],
) -> Vec<String> {
    let Ok(spec) = &service.spec else {
        return Vec::new();
    };
    let rules = &spec.rules;
    let app = &instance.record.app;
    let heading_to = |i: &crate::engine::InstanceView| {
        migrations.iter().any(|m| {
            !m.step.is_finished()
                && &m.to == target
                && m.from == i.record.host
                && m.vm == i.record.vm
        })
    };
    let there: Vec<&crate::engine::InstanceView> = service
        .instances
        .iter()
        .filter(|i| i.record.key() != instance.record.key())
        .filter(|i| &i.record.host == target || heading_to(i))
        .collect();
    let mut reasons = Vec::new();
    for other in &there {
        let o = &other.record.app;
        if rules
            .anti_affinity
            .iter()
            .any(|[x, y]| (x == app && y == o) || (x == o && y == app))
        {
            reasons.push(format!(
                "{target}: runs {o}-{} (anti-affinity {app}/{o} in service {})",
                other.record.index,
                service.name()
            ));
        }
        if o == app && rules.distinct_hosts.contains(app) {
            reasons.push(format!(
                "{target}: runs {app}-{} already (service {} keeps {app} on distinct hosts)",
                other.record.index,
                service.name()
            ));
        }
    }
    for [first, second] in &rules.affinity {
        if second == app && !there.iter().any(|i| &i.record.app == first) {
            reasons.push(format!(
                "{target}: has no {first} instance, and {app} runs only beside one"
            ));
        }
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(step: MigrationStep) -> MigrationJournal {
        MigrationJournal {
            id: 1,
            vm: VmName::new("web").unwrap(),
            from: HostId::new("lsn-1").unwrap(),
            to: HostId::new("gva-1").unwrap(),
            step,
            was_running: true,
            error: None,
            bytes_done: 0,
            bytes_total: 0,
            ticket: None,
            digest: None,
            started_ms: 0,
            updated_ms: 0,
            rate_bps: None,
            origin: MigrationOrigin::Operator,
            limit_mbps: None,
            compress: false,
            failed_at: None,
            waiting: None,
            disk_move: DiskMove::Image,
        }
    }

    #[test]
    fn a_migration_walks_every_step_and_deletes_the_source_last() {
        let mut j = journal(MigrationStep::Planned);
        let mut effects = Vec::new();
        j.step = MigrationStep::Stopping;
        while !j.step.is_finished() {
            let (next, fx) = advance(&j, Outcome::Done);
            effects.extend(fx);
            j = next;
        }
        assert_eq!(j.step, MigrationStep::SourceDeleted);
        assert_eq!(
            effects,
            [
                Effect::Transfer,
                Effect::Verify,
                Effect::DefineOnTarget,
                Effect::StartOnTarget,
                Effect::DeleteSource,
            ]
        );
        assert_eq!(effects.last(), Some(&Effect::DeleteSource));
    }

    #[test]
    fn a_failure_before_confirmed_rolls_back_and_the_source_runs_again() {
        for step in [
            MigrationStep::Stopping,
            MigrationStep::Transferring,
            MigrationStep::Verifying,
            MigrationStep::Defining,
            MigrationStep::Starting,
        ] {
            let (rolling, fx) = advance(&journal(step), Outcome::Failed("boom".into()));
            assert_eq!(rolling.step, MigrationStep::RollingBack, "{step:?}");
            // Until the target has a definition, the source runs the VM again first; after,
            // the target's copy is stopped first, so that it never runs twice.
            if step < MigrationStep::Defining {
                assert_eq!(fx, [Effect::StartSource, Effect::CleanTarget], "{step:?}");
            } else {
                assert_eq!(fx, [Effect::CleanTarget, Effect::StartSource], "{step:?}");
            }
            assert_eq!(
                rolling.error.as_deref(),
                Some(format!("{} failed: boom", step.as_str()).as_str())
            );
            assert!(!fx.contains(&Effect::DeleteSource), "never the source");
            let (back, fx) = advance(&rolling, Outcome::Done);
            assert_eq!(back.step, MigrationStep::RolledBack);
            assert!(fx.is_empty());
            assert_eq!(back.error, rolling.error, "the reason is kept");
        }
        // A VM that was off stays off on the source.
        let mut off = journal(MigrationStep::Transferring);
        off.was_running = false;
        assert_eq!(
            advance(&off, Outcome::Failed("x".into())).1,
            [Effect::CleanTarget]
        );
        // A rollback that fails is tried again, keeping the first reason.
        let rolling = advance(
            &journal(MigrationStep::Verifying),
            Outcome::Failed("hash".into()),
        )
        .0;
        let (again, fx) = advance(&rolling, Outcome::Failed("agent busy".into()));
        assert_eq!(again.step, MigrationStep::RollingBack);
        assert_eq!(fx, [Effect::StartSource, Effect::CleanTarget]);
        assert!(
            again
                .error
                .unwrap()
                .starts_with("verifying failed: hash; the rollback failed")
        );
    }

    #[test]
    fn after_confirmed_nothing_rolls_back_and_cancel_is_refused() {
        let confirmed = journal(MigrationStep::Confirmed);
        let (j, fx) = advance(&confirmed, Outcome::Failed("disk busy".into()));
        assert_eq!(j.step, MigrationStep::Confirmed);
        assert_eq!(fx, [Effect::DeleteSource]);
        let (j, fx) = advance(&confirmed, Outcome::Cancelled);
        assert_eq!(j, confirmed);
        assert!(fx.is_empty());
        let (j, fx) = advance(&journal(MigrationStep::Transferring), Outcome::Cancelled);
        assert_eq!(j.step, MigrationStep::RollingBack);
        assert_eq!(j.error.as_deref(), Some("cancelled while transferring"));
        // Nothing is defined on the target yet: the source runs the VM again first.
        assert_eq!(fx, [Effect::StartSource, Effect::CleanTarget]);
    }

    #[test]
    fn a_host_that_does_not_answer_leaves_the_journal_waiting() {
        let j = journal(MigrationStep::Transferring);
        let (waiting, fx) = advance(&j, Outcome::Waiting("gva-1 is unreachable".into()));
        assert_eq!(waiting.step, MigrationStep::Transferring);
        assert!(fx.is_empty());
        assert_eq!(waiting.waiting.as_deref(), Some("gva-1 is unreachable"));
        assert_eq!(waiting.error, None);
        // Back: the same step again.
        assert_eq!(resume(&waiting), [Effect::Transfer]);
    }

    #[test]
    fn a_restarted_console_repeats_the_step_it_stood_at() {
        for (step, effects) in [
            (MigrationStep::Planned, vec![Effect::StopSource]),
            (MigrationStep::Stopping, vec![Effect::StopSource]),
            (MigrationStep::Transferring, vec![Effect::Transfer]),
            (MigrationStep::Verifying, vec![Effect::Verify]),
            (MigrationStep::Defining, vec![Effect::DefineOnTarget]),
            (MigrationStep::Starting, vec![Effect::StartOnTarget]),
            (MigrationStep::Confirmed, vec![Effect::DeleteSource]),
            (
                MigrationStep::RollingBack,
                vec![Effect::CleanTarget, Effect::StartSource],
            ),
            (MigrationStep::SourceDeleted, vec![]),
            (MigrationStep::RolledBack, vec![]),
        ] {
            assert_eq!(resume(&journal(step)), effects, "{step:?}");
        }
        for step in [
            MigrationStep::Planned,
            MigrationStep::RollingBack,
            MigrationStep::SourceDeleted,
        ] {
            assert_eq!(MigrationStep::parse(step.as_str()), Some(step));
        }
        assert_eq!(MigrationStep::parse("teleporting"), None);
    }
}
