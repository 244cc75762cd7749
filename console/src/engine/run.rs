//! The actor's loop: one message at a time (a command, a link message, an enrollment's
//! question, the result of background work), then one publish and one store batch; and the
//! timers that drive the per-instance probes, autoscaling, statistics and retries.

use tokio::sync::mpsc;

use super::{
    Command,
    actor::{Actor, Internal},
    fleet::{enroll::GateRequest, link::LinkMessage},
    records::now_ms,
};

/// What the actor reads: the operators' commands, the links' messages, enrollments'
/// questions, and the results of its own background work.
pub(super) struct Inbox {
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) links: mpsc::Receiver<LinkMessage>,
    pub(super) gates: mpsc::Receiver<GateRequest>,
    pub(super) internal: mpsc::Receiver<Internal>,
}

/// How often autoscaling rules look for a period that ended.
const AUTOSCALE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// How often a share of the time series' open part is written: every series once in
/// [`super::statistics::series::FLUSH_SHARES`] of these (10 s), which is what a crash can lose.
const STATS_FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Actor {
    pub(super) async fn run(
        mut self,
        Inbox {
            mut commands,
            mut links,
            mut gates,
            mut internal,
        }: Inbox,
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
                    self.poll_instances::<super::services::probes::GuestAppsProbe>();
                    self.poll_instances::<super::services::probes::AppMetricProbe>();
                }
                _ = stats_flush.tick() => {
                    flush_share = flush_share.wrapping_add(1);
                    let writes = self.statistics.series.flush_share(now_ms() / 1000, flush_share);
                    self.store.put_stats(writes);
                }
                _ = readiness.tick() => {
                    self.poll_instances::<super::services::probes::Readiness>();
                    self.tell_site_addresses();
                    self.tell_networks();
                    self.retry_migrations();
                    self.advance_evacuations();
                }
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                Some(msg) = links.recv() => self.link(msg),
                Some(request) = gates.recv() => self.fleet.gate(request),
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
            if std::mem::take(&mut self.networks.tell) {
                self.tell_networks();
            }
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
            Internal::AgentAnswered(answer) => self.agent_answered(answer),
            Internal::VmCopied(copied) => self.vm_copied(copied),
            Internal::MigrationEnded {
                id,
                outcome,
                learned,
            } => self.migration_outcome(id, outcome, learned),
            Internal::NetworksRefused {
                host,
                stable_id,
                digest,
                reason,
            } => self.networks_refused(&host, stable_id, digest, &reason),
            Internal::SiteAddressesRefused {
                host,
                stable_id,
                digest,
                reason,
            } => self
                .fleet
                .site_addresses_refused(&host, stable_id, digest, &reason),
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
            Internal::StartInputs { instance, answer } => {
                let _ = answer.send(self.instance_user_data(&instance, true));
            }
            Internal::CreateVmFromImage(create) => self.create_vm_from_image(create),
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
            Internal::ImageCopied {
                name,
                result,
                reply,
            } => self.image_copied(name, result, reply),
            Internal::ImagePushedForVm(done) => self.image_pushed_for_vm(*done),
            Internal::ImagePushedForMigration(done) => self.image_pushed_for_migration(*done),
            Internal::ConsoleOpened(streams) => self.console_opened(*streams),
            Internal::ConsoleEnded { host, vm, id } => self.console_ended(host, vm, id),
            Internal::ScreenOpened(streams) => self.screen_opened(*streams),
            Internal::ScreenEnded {
                host,
                vm,
                id,
                error,
            } => self.screen_ended(host, vm, id, error),
            Internal::ImageTransfer {
                image,
                host,
                progress,
            } => self.image_transfer(image, host, progress),
            Internal::ImagePushed {
                name,
                results,
                reply,
            } => self.image_pushed(name, results, reply),
        }
    }
}
