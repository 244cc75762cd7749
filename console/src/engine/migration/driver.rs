//! The migration driver: carries out the effects the state machine in [`super::machine`]
//! asks for, on the two agents, and feeds their outcomes back. Each new step is written to
//! the store before its effects run; a host that does not answer leaves the journal waiting
//! (tried again every few seconds), an agent that refuses rolls the migration back.

use std::time::{SystemTime, UNIX_EPOCH};

use dunes_shared::{
    model::{HostId, RuntimeKind, VmName, VmState},
    protocol::{
        CancelTransfer, DeleteVm, DiscardDisk, ExportVm, HashDisk, ImportVm, PrepareReceive,
        ProbeKind, ReadinessProbe, SendDisk, StartVm, StopVm,
    },
    transfer::TransferTicket,
};

use crate::engine::{
    EngineError, LinkState, Reply,
    actor::{Actor, Internal},
    fleet::client::AgentClient,
    migration::{
        DiskMove, Effect, Learned, MigrationJournal, MigrationOptions, MigrationOrigin,
        MigrationStep, Outcome, advance, resume,
    },
    records::InstanceRecord,
    records::Level,
    records::now_ms,
    services::readiness::probe_of,
};

/// How long a target holds a ticket.
const TICKET_SECS: u64 = 3600;
/// How long a graceful stop of the source may take before it is forced.
const STOP_TIMEOUT_SECS: u32 = 120;

/// Fault injection for the test suites: with `DUNES_FAILPOINT=migration-exit-after:STEP`, the
/// console dies after that step's side effects, before their outcome is journaled. Only in a
/// build with the `failpoints` feature.
#[cfg(feature = "failpoints")]
fn exit_after_effects_of(step: MigrationStep) {
    static STEP: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let wanted = STEP.get_or_init(|| {
        std::env::var("DUNES_FAILPOINT")
            .ok()
            .and_then(|v| v.strip_prefix("migration-exit-after:").map(str::to_string))
    });
    if wanted.as_deref() == Some(step.as_str()) {
        tracing::error!(
            "DUNES_FAILPOINT: exiting after the effects of {}",
            step.as_str()
        );
        std::process::exit(86);
    }
}

/// Without the `failpoints` feature (a release build) nothing is injected.
#[cfg(not(feature = "failpoints"))]
fn exit_after_effects_of(_step: MigrationStep) {}

fn outcome_of(e: EngineError) -> Outcome {
    match e {
        EngineError::Unreachable(_) | EngineError::NoAnswer { .. } => {
            Outcome::Waiting(e.to_string())
        }
        other => Outcome::Failed(other.to_string()),
    }
}

impl Actor {
    /// Plans a cold migration of `vm` from `host` to `to`, after checking that it can go.
    pub(in crate::engine) fn migrate_vm(
        &mut self,
        host: &HostId,
        vm: &VmName,
        to: &HostId,
        options: MigrationOptions,
        reply: Reply<MigrationJournal>,
    ) {
        let Some(reply) = self.send_image_before_migration(host, vm, to, options, reply) else {
            return;
        };
        match self.start_migration(host, vm, to, MigrationOrigin::Operator, options) {
            Ok(journal) => self.reply_after_commit(reply, journal),
            Err(e) => {
                let _ = reply.send(Err(EngineError::Invalid(e)));
            }
        }
    }

    /// Checks, journals and starts a migration; the journal as planned, or why it cannot go.
    pub(in crate::engine) fn start_migration(
        &mut self,
        host: &HostId,
        vm: &VmName,
        to: &HostId,
        origin: MigrationOrigin,
        options: MigrationOptions,
    ) -> Result<MigrationJournal, String> {
        if host == to {
            return Err(format!("{vm} is on {to} already"));
        }
        let source = self
            .fleet
            .hosts
            .get(host)
            .ok_or_else(|| format!("host {host} is not enrolled"))?;
        let status = source
            .view
            .vm(vm)
            .ok_or_else(|| format!("host {host} has no VM {vm}"))?;
        let target = self
            .fleet
            .hosts
            .get(to)
            .ok_or_else(|| format!("host {to} is not enrolled"))?;
        if let Some(m) = self
            .migrations
            .journals
            .values()
            .find(|m| &m.vm == vm && !m.step.is_finished())
        {
            return Err(format!("{vm} is migrating already (migration {})", m.id));
        }
        // The same pre-check as a drop in the window: capacity, runtime, name and the rules
        // of the VM's service, every reason at once.
        let estimate = crate::engine::migration::precheck(
            status,
            &source.view,
            &target.view,
            &self.service_views(),
            &self.migrations.open(),
        )
        .map_err(|reasons| format!("{vm} cannot go to {to}: {}", reasons.join("; ")))?;
        let (limit_mbps, compress) = estimate.transfer_settings(options);
        // An image this console just sent: the overlay goes alone, though the target's
        // inventory may not say yet that it holds the image.
        let disk_move = match (&estimate.disk_move, &status.overlay_on) {
            (DiskMove::Flattened(_), Some(base))
                if self
                    .images
                    .sent
                    .contains(&(to.clone(), base.blake3.clone())) =>
            {
                DiskMove::Overlay(base.clone())
            }
            (chosen, _) => chosen.clone(),
        };
        let was_running = status.state.is_active();
        let id = self
            .migrations
            .journals
            .keys()
            .next_back()
            .map_or(1, |k| k + 1);
        let now = now_ms();
        let planned = MigrationJournal {
            id,
            vm: vm.clone(),
            from: host.clone(),
            to: to.clone(),
            step: MigrationStep::Planned,
            was_running,
            error: None,
            bytes_done: 0,
            bytes_total: 0,
            ticket: None,
            digest: None,
            started_ms: now,
            updated_ms: now,
            rate_bps: None,
            origin,
            limit_mbps,
            compress,
            failed_at: None,
            waiting: None,
            disk_move: disk_move.clone(),
        };
        let (journal, effects) = advance(&planned, Outcome::Done);
        let why = match &journal.origin {
            MigrationOrigin::Operator => String::new(),
            MigrationOrigin::Drain(h) => format!(" (drain of {h})"),
            MigrationOrigin::ServiceMove(s) => format!(" (move of service {s})"),
        };
        self.log(
            Level::Info,
            Some(host.clone()),
            format!(
                "migration {id}: {vm} from {host} to {to}{why}, disk: {}",
                disk_move.describe()
            ),
        );
        self.commit_migration(journal.clone(), effects);
        Ok(journal)
    }

    /// Asks a migration to stop and roll back (before it is confirmed).
    pub(in crate::engine) fn cancel_migration(&mut self, id: u64, reply: Reply<MigrationJournal>) {
        let Some(journal) = self.migrations.journals.get(&id).cloned() else {
            let _ = reply.send(Err(EngineError::Invalid(format!("no migration {id}"))));
            return;
        };
        if journal.step.is_committed() || journal.step.is_finished() {
            let _ = reply.send(Err(EngineError::Invalid(format!(
                "migration {id} is {}: too late to cancel",
                journal.step.as_str()
            ))));
            return;
        }
        if self.migrations.running.contains(&id) {
            // Applied when the running effect ends; a disk stream is stopped at once.
            self.migrations.cancelled.insert(id);
            if journal.step == MigrationStep::Transferring
                && let (Ok(source), Some(ticket)) =
                    (self.client(&journal.from), journal.ticket.clone())
            {
                tokio::spawn(async move {
                    if let Err(e) = source.call(CancelTransfer { ticket }).await {
                        tracing::warn!("stopping the transfer: {e}");
                    }
                });
            }
            let _ = reply.send(Ok(journal));
            return;
        }
        let (next, effects) = advance(&journal, Outcome::Cancelled);
        self.commit_migration(next.clone(), effects);
        self.reply_after_commit(reply, next);
    }

    /// Writes the journal, then (once committed) runs its effects.
    fn commit_migration(&mut self, mut journal: MigrationJournal, effects: Vec<Effect>) {
        journal.updated_ms = now_ms();
        if journal.step == MigrationStep::Transferring && journal.ticket.is_none() {
            let mut id = [0u8; 16];
            dunes_shared::pki::fill_random(&mut id);
            journal.ticket = Some(id.iter().map(|b| format!("{b:02x}")).collect());
        }
        let changed = self
            .migrations
            .journals
            .get(&journal.id)
            .map(|j| (j.step, j.error.clone(), j.waiting.clone()));
        if changed != Some((journal.step, journal.error.clone(), journal.waiting.clone())) {
            let level = if journal.error.is_some() || journal.waiting.is_some() {
                Level::Warning
            } else {
                Level::Info
            };
            let why = match (&journal.error, &journal.waiting) {
                (_, Some(w)) => format!(" (waiting: {w})"),
                (Some(e), None) => format!(" ({e})"),
                (None, None) => String::new(),
            };
            self.log(
                level,
                Some(journal.from.clone()),
                format!(
                    "migration {} of {}: {}{why}",
                    journal.id,
                    journal.vm,
                    journal.step.label()
                ),
            );
        }
        self.store.put_migration(&journal);
        self.migrations.journals.insert(journal.id, journal.clone());
        self.migrations.dirty = true;
        if effects.is_empty() {
            return;
        }
        self.migrations.running.insert(journal.id);
        let clients = (self.client(&journal.from), self.client(&journal.to));
        let target_address = self
            .fleet
            .hosts
            .get(&journal.to)
            .map(|h| h.view.record.address.clone())
            .unwrap_or_default();
        let readiness = self.readiness_on_target(&journal);
        let internal = self.internal_tx.clone();
        let runtime = tokio::runtime::Handle::current();
        self.store.after_commit(Box::new(move |committed| {
            if committed.is_err() {
                return;
            }
            runtime.spawn(async move {
                let (outcome, learned) = run_effects(
                    &journal,
                    &effects,
                    clients,
                    &target_address,
                    readiness.as_ref(),
                )
                .await;
                let ended = Internal::MigrationEnded {
                    id: journal.id,
                    outcome,
                    learned,
                };
                let _ = internal.send(ended).await;
            });
        }));
    }

    pub(in crate::engine) fn migration_outcome(
        &mut self,
        id: u64,
        outcome: Outcome,
        learned: Learned,
    ) {
        self.migrations.running.remove(&id);
        let Some(mut journal) = self.migrations.journals.get(&id).cloned() else {
            return;
        };
        exit_after_effects_of(journal.step);
        if let Some(total) = learned.bytes_total {
            journal.bytes_total = total;
        }
        if let Some(done) = learned.bytes_done {
            journal.bytes_done = done;
        }
        if learned.digest.is_some() {
            journal.digest = learned.digest;
        }
        if let Some(note) = learned.note {
            self.log(
                Level::Warning,
                Some(journal.from.clone()),
                format!("migration {} of {}: {note}", journal.id, journal.vm),
            );
        }
        // What the target said is what the fleet shows, before its own event arrives.
        if let Some(vm) = &learned.target_vm {
            self.apply_vm(&journal.to, vm);
        }
        // A cancel asked while the effect ran wins over how it ended (a stopped transfer
        // ends in an error), but not over a committed step.
        let outcome = if self.migrations.cancelled.remove(&id) && !journal.step.is_committed() {
            Outcome::Cancelled
        } else {
            outcome
        };
        self.migrations.transfer_samples.remove(&id);
        let (next, effects) = advance(&journal, outcome);
        if next.step == MigrationStep::Confirmed && journal.step != MigrationStep::Confirmed {
            // The instance is where its VM now runs, written in the journal's batch.
            let moved: Vec<InstanceRecord> = self
                .services
                .instances
                .values()
                .filter(|i| i.host == next.from && i.vm == next.vm)
                .map(|i| InstanceRecord {
                    host: next.to.clone(),
                    ..i.clone()
                })
                .collect();
            for instance in moved {
                self.store.put_instance(&instance);
                self.services.readiness.forget(&instance.key());
                self.services.instances.insert(instance.key(), instance);
                self.services.dirty = true;
            }
        }
        if next.step == MigrationStep::SourceDeleted {
            self.remove_vm(&next.from, &next.vm);
        }
        let finished = next.step.is_finished();
        self.commit_migration(next, effects);
        if finished {
            // A drain or a service move takes its next step at once.
            self.advance_evacuations();
        }
    }

    /// The check the VM's application must pass on the target before the migration is
    /// confirmed, if it is a service instance with one beyond "running".
    fn readiness_on_target(
        &self,
        journal: &MigrationJournal,
    ) -> Option<(InstanceRecord, ReadinessProbe)> {
        if journal.step != MigrationStep::Starting || !journal.was_running {
            return None;
        }
        let instance = self
            .services
            .instances
            .values()
            .find(|i| i.host == journal.from && i.vm == journal.vm)?;
        let probe = self
            .services
            .entries
            .get(&instance.service)
            .and_then(|s| s.spec.as_ref().ok())
            .and_then(|spec| spec.application(&instance.app))
            .map(|app| probe_of(&app.readiness))
            .filter(|p| p.kind != ProbeKind::Running)?;
        Some((
            InstanceRecord {
                host: journal.to.clone(),
                ..instance.clone()
            },
            probe,
        ))
    }

    /// Migrations the last run left open, and those waiting on a host: their step again.
    pub(in crate::engine) fn retry_migrations(&mut self) {
        let open: Vec<MigrationJournal> = self
            .migrations
            .journals
            .values()
            .filter(|m| !m.step.is_finished() && !self.migrations.running.contains(&m.id))
            .filter(|m| {
                [&m.from, &m.to].iter().all(|h| {
                    self.fleet
                        .hosts
                        .get(*h)
                        .is_some_and(|e| e.view.link == LinkState::Online)
                })
            })
            .filter(|m| {
                // Running effects are not repeated; a fresh step is run by its commit.
                m.waiting.is_some() || self.migrations.resumed.insert(m.id)
            })
            .cloned()
            .collect();
        for journal in open {
            let effects = resume(&journal);
            let mut journal = journal;
            if journal.step == MigrationStep::Planned {
                journal = advance(&journal, Outcome::Done).0;
            }
            self.commit_migration(journal, effects);
        }
    }
}

/// Carries out `effects` in order; the first that does not succeed gives the outcome.
async fn run_effects(
    journal: &MigrationJournal,
    effects: &[Effect],
    clients: (
        Result<AgentClient, EngineError>,
        Result<AgentClient, EngineError>,
    ),
    target_address: &str,
    readiness: Option<&(InstanceRecord, ReadinessProbe)>,
) -> (Outcome, Learned) {
    let mut learned = Learned::default();
    let (source, target) = match clients {
        (Ok(s), Ok(t)) => (s, t),
        (Err(e), _) | (_, Err(e)) => return (outcome_of(e), learned),
    };
    for effect in effects {
        let done = run_effect(
            journal,
            *effect,
            &source,
            &target,
            target_address,
            readiness,
            &mut learned,
        )
        .await;
        if let Err(e) = done {
            return (outcome_of(e), learned);
        }
    }
    (Outcome::Done, learned)
}

fn ignore_missing(result: Result<(), EngineError>) -> Result<(), EngineError> {
    match result {
        Err(e) if e.is_not_found() => Ok(()),
        other => other,
    }
}

/// The image digests of the VM's disk on the target and on the source (the guest's whole
/// image with `flat`).
async fn digests(
    source: &AgentClient,
    target: &AgentClient,
    vm: VmName,
    flat: bool,
) -> Result<(String, String), EngineError> {
    let here = target
        .call(HashDisk {
            name: vm.clone(),
            flat,
        })
        .await?;
    let there = source.call(HashDisk { name: vm, flat }).await?;
    Ok((here, there))
}

async fn run_effect(
    journal: &MigrationJournal,
    effect: Effect,
    source: &AgentClient,
    target: &AgentClient,
    target_address: &str,
    readiness: Option<&(InstanceRecord, ReadinessProbe)>,
    learned: &mut Learned,
) -> Result<(), EngineError> {
    let vm = journal.vm.clone();
    let runtime = RuntimeKind::Libvirt;
    // Unless the overlay moves as it is, both ends compare (and the target defines) the
    // whole image the guest sees.
    let flat = !matches!(journal.disk_move, DiskMove::Overlay(_));
    match effect {
        Effect::StopSource => {
            let stopped = source
                .call(StopVm {
                    name: vm.clone(),
                    force: false,
                    timeout_secs: STOP_TIMEOUT_SECS,
                    runtime,
                })
                .await?;
            if stopped.state != VmState::Shutoff {
                source
                    .call(StopVm {
                        name: vm,
                        force: true,
                        timeout_secs: 0,
                        runtime,
                    })
                    .await?;
            }
            Ok(())
        }
        Effect::Transfer => {
            let ticket = TransferTicket {
                id: journal.ticket.clone().unwrap_or_default(),
                vm: vm.clone(),
                source: journal.from.clone(),
                target: journal.to.clone(),
                overlay_on: match &journal.disk_move {
                    DiskMove::Overlay(t) => Some(t.clone()),
                    _ => None,
                },
                expires_unix_secs: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
                    + TICKET_SECS,
            };
            match target
                .call(PrepareReceive {
                    ticket: ticket.clone(),
                })
                .await
            {
                Ok(()) => {}
                // A transfer that finished before the console could journal it: the target
                // holds the whole image already. It counts only if it is the source's.
                Err(e) if e.is_exists() => {
                    let (here, there) = digests(source, target, vm, flat).await?;
                    if here != there {
                        return Err(e);
                    }
                    learned.digest = Some(here);
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
            let report = source
                .call(SendDisk {
                    ticket,
                    target_address: target_address.to_string(),
                    limit_mbps: journal.limit_mbps,
                    compress: journal.compress,
                })
                .await?;
            learned.bytes_total = Some(report.allocated_bytes);
            learned.bytes_done = Some(report.allocated_bytes);
            learned.digest = Some(report.digest);
            if report.reconnects > 0 {
                learned.note = Some(format!(
                    "the link broke {}; the transfer went on each time from the last chunk the target acknowledged (last from {:.1} MiB, {:.1} MiB sent then of {:.1} MiB)",
                    match report.reconnects {
                        1 => "once".to_string(),
                        n => format!("{n} times"),
                    },
                    report.resumed_from as f64 / 1048576.0,
                    report.sent_bytes as f64 / 1048576.0,
                    report.allocated_bytes as f64 / 1048576.0,
                ));
            }
            Ok(())
        }
        Effect::Verify => {
            let (here, there) = digests(source, target, vm, flat).await?;
            if here != there || journal.digest.as_ref().is_some_and(|d| *d != here) {
                return Err(EngineError::agent_failed(
                    "the target's copy does not match the source's disk",
                ));
            }
            Ok(())
        }
        Effect::DefineOnTarget => {
            let record = source.call(ExportVm { name: vm, flat }).await?;
            match target.call(ImportVm { record }).await {
                Ok(vm) => {
                    learned.target_vm = Some(vm);
                    Ok(())
                }
                // Defined by an earlier try of this step.
                Err(e) if e.is_exists() => Ok(()),
                Err(e) => Err(e),
            }
        }
        Effect::StartOnTarget => {
            if journal.was_running {
                let started = match target
                    .call(StartVm {
                        name: vm,
                        runtime,
                        user_data: None,
                    })
                    .await
                {
                    Ok(vm) => Some(vm),
                    // Started by an earlier try of this step.
                    // libvirt says so in words only.
                    Err(EngineError::Agent { message, .. })
                        if message.contains("already running") =>
                    {
                        None
                    }
                    Err(e) => return Err(e),
                };
                learned.target_vm = started;
                // Confirmed only once its application's check passes there too.
                if let Some((instance, probe)) = readiness {
                    crate::engine::services::driver::wait_until_ready(target, instance, probe)
                        .await?;
                }
            }
            Ok(())
        }
        Effect::DeleteSource => ignore_missing(source.call(DeleteVm { name: vm, runtime }).await),
        Effect::CleanTarget => {
            // The target had no VM of this name when the migration was planned: what is
            // there now is the migration's own.
            match target
                .call(StopVm {
                    name: vm.clone(),
                    force: true,
                    timeout_secs: 0,
                    runtime,
                })
                .await
            {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
            ignore_missing(
                target
                    .call(DeleteVm {
                        name: vm.clone(),
                        runtime,
                    })
                    .await,
            )?;
            target.call(DiscardDisk { name: vm }).await
        }
        Effect::StartSource => match source
            .call(StartVm {
                name: vm,
                runtime,
                user_data: None,
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(EngineError::Agent { message, .. }) if message.contains("already running") => {
                Ok(())
            }
            Err(e) => Err(e),
        },
    }
}
