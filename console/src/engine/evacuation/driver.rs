//! Drains and service moves, driven: each tick (and after each migration) every host in
//! maintenance and every moving service takes its next step from [`super::plan`].
//! Their state is in the store (the host's maintenance mark, the service's move), so a
//! console that restarts goes on where it stopped.

use std::sync::Arc;

use dunes_shared::model::{HostId, ServiceName};

use crate::engine::{
    EngineError, Reply,
    actor::{Actor, Internal},
    evacuation::{AfterMoveOperation, DrainProgress, FleetParts, drain_step, service_move_step},
    migration::{MigrationOrigin, MigrationStep},
    records::{Level, Maintenance, MovePhase, ServiceMove, now_ms},
};

impl Actor {
    /// Marks `host` as in maintenance and moves everything off it; resumes a paused drain.
    pub(in crate::engine) fn drain_host(&mut self, host: &HostId, reply: Reply<DrainProgress>) {
        let Some(entry) = self.fleet.hosts.get_mut(host) else {
            let _ = reply.send(Err(EngineError::UnknownHost(host.clone())));
            return;
        };
        let now = now_ms();
        let (maintenance, verb) = match entry.view.record.maintenance {
            Some(m) if !m.paused => (
                Maintenance {
                    resumed_ms: now,
                    ..m
                },
                "drain retried",
            ),
            Some(m) => (
                Maintenance {
                    paused: false,
                    resumed_ms: now,
                    ..m
                },
                "drain resumed",
            ),
            None => (
                Maintenance {
                    since_ms: now,
                    paused: false,
                    resumed_ms: now,
                },
                "in maintenance: draining",
            ),
        };
        entry.view.record.maintenance = Some(maintenance);
        entry.dirty = true;
        self.store.put_host(&entry.view.record);
        self.log(Level::Info, Some(host.clone()), verb.to_string());
        self.advance_evacuations();
        match self.drains.progress.get(host).cloned() {
            Some(progress) => self.reply_after_commit(reply, progress),
            None => {
                let _ = reply.send(Err(EngineError::UnknownHost(host.clone())));
            }
        }
    }

    /// Stops a drain from starting further migrations; the one under way finishes.
    pub(in crate::engine) fn pause_drain(&mut self, host: &HostId, reply: Reply<()>) {
        let Some(entry) = self.fleet.hosts.get_mut(host) else {
            let _ = reply.send(Err(EngineError::UnknownHost(host.clone())));
            return;
        };
        let Some(m) = entry.view.record.maintenance.filter(|m| !m.paused) else {
            let _ = reply.send(Err(EngineError::Invalid(format!(
                "host {host} is not draining"
            ))));
            return;
        };
        entry.view.record.maintenance = Some(Maintenance { paused: true, ..m });
        entry.dirty = true;
        self.store.put_host(&entry.view.record);
        self.log(
            Level::Info,
            Some(host.clone()),
            "drain paused; the migration under way finishes".into(),
        );
        self.drains.dirty = true;
        self.advance_evacuations();
        self.reply_after_commit(reply, ());
    }

    /// Ends maintenance: the host takes new work again and its drain stops.
    pub(in crate::engine) fn undrain_host(&mut self, host: &HostId, reply: Reply<()>) {
        let Some(entry) = self.fleet.hosts.get_mut(host) else {
            let _ = reply.send(Err(EngineError::UnknownHost(host.clone())));
            return;
        };
        if entry.view.record.maintenance.is_none() {
            let _ = reply.send(Err(EngineError::Invalid(format!(
                "host {host} is not in maintenance"
            ))));
            return;
        }
        entry.view.record.maintenance = None;
        entry.dirty = true;
        self.store.put_host(&entry.view.record);
        self.drains.progress.remove(host);
        self.drains.dirty = true;
        self.log(
            Level::Info,
            Some(host.clone()),
            "out of maintenance: takes new work again".into(),
        );
        self.reply_after_commit(reply, ());
    }

    /// Moves every instance of `name` to the hosts of `site`: it stops the service, migrates
    /// the instances one at a time in start order, then starts it again if it ran.
    pub(in crate::engine) fn move_service(
        &mut self,
        name: &ServiceName,
        site: &str,
        reply: Reply<ServiceMove>,
    ) {
        match self.plan_service_move(name, site) {
            Ok(moving) => {
                if let Some(entry) = self.services.entries.get_mut(name) {
                    entry.record.moving = Some(moving.clone());
                    self.store.put_service(&entry.record);
                }
                self.services.dirty = true;
                self.log(
                    Level::Info,
                    None,
                    format!("service {name}: moving to site {site}"),
                );
                self.advance_evacuations();
                self.reply_after_commit(reply, moving);
            }
            Err(e) => {
                let _ = reply.send(Err(EngineError::Invalid(e)));
            }
        }
    }

    /// Checks that `name` can move to `site` (every instance has a host there, each on its
    /// own); nothing is changed when it cannot.
    fn plan_service_move(&self, name: &ServiceName, site: &str) -> Result<ServiceMove, String> {
        let entry = self
            .services
            .entries
            .get(name)
            .ok_or_else(|| format!("no service named {name}"))?;
        if let Some(m) = &entry.record.moving {
            return Err(format!(
                "service {name} is moving to site {} already",
                m.site
            ));
        }
        if entry.busy.is_some() {
            return Err(format!("service {name} is busy; try again when it is done"));
        }
        if !self
            .fleet
            .hosts
            .values()
            .any(|h| h.view.site_name() == site)
        {
            return Err(format!("no enrolled host is at site {site}"));
        }
        let parts = self.fleet_parts();
        let fleet = parts.fleet();
        let mine: Vec<_> = parts
            .instances
            .iter()
            .filter(|i| &i.service == name)
            .collect();
        if mine.is_empty() {
            return Err(format!("service {name} has no instance to move"));
        }
        let site_of = |h: &HostId| {
            self.fleet
                .hosts
                .get(h)
                .map(|e| e.view.site_name().to_string())
        };
        let outside: Vec<_> = mine
            .iter()
            .filter(|i| site_of(&i.host).as_deref() != Some(site))
            .collect();
        if outside.is_empty() {
            return Err(format!("service {name} is at site {site} already"));
        }
        // Each instance on its own against today's fleet: what cannot go anywhere there
        // stops the move before anything is stopped.
        let mut reasons = Vec::new();
        for i in &outside {
            let Some(from) = self.fleet.hosts.get(&i.host) else {
                reasons.push(format!("{}: host {} is not enrolled", i.vm, i.host));
                continue;
            };
            let Some(vm) = from.view.vm(&i.vm) else {
                reasons.push(format!("{}: {} does not report it", i.vm, i.host));
                continue;
            };
            if let Err(why) =
                crate::engine::evacuation::choose_target(vm, &from.view, &fleet, Some(site))
            {
                reasons.push(format!("{}: {why}", i.vm));
            }
        }
        if !reasons.is_empty() {
            return Err(format!(
                "service {name} cannot move to site {site}: {}",
                reasons.join("; ")
            ));
        }
        let was_running = mine.iter().any(|i| {
            self.fleet
                .hosts
                .get(&i.host)
                .and_then(|h| h.view.vm(&i.vm))
                .is_some_and(|v| v.state.is_active())
        });
        Ok(ServiceMove {
            site: site.to_string(),
            phase: MovePhase::Stopping,
            was_running,
            since_ms: now_ms(),
            error: None,
        })
    }

    /// One step of every drain and service move that can take one.
    pub(in crate::engine) fn advance_evacuations(&mut self) {
        let draining: Vec<(HostId, Maintenance)> = self
            .fleet
            .hosts
            .iter()
            .filter_map(|(id, e)| e.view.record.maintenance.map(|m| (id.clone(), m)))
            .collect();
        let moving: Vec<(ServiceName, ServiceMove)> = self
            .services
            .entries
            .iter()
            .filter_map(|(n, e)| e.record.moving.clone().map(|m| (n.clone(), m)))
            .collect();
        if draining.is_empty() && moving.is_empty() {
            return;
        }
        for (host, maintenance) in draining {
            self.drain_once(&host, &maintenance);
        }
        for (name, moving) in moving {
            self.move_once(&name, moving);
        }
    }

    fn fleet_parts(&self) -> FleetParts {
        FleetParts {
            hosts: self
                .fleet
                .hosts
                .values()
                .map(|h| Arc::new(h.view.clone()))
                .collect(),
            services: self.service_views(),
            instances: self.services.instances.values().cloned().collect(),
            migrations: self.migrations.journals.values().cloned().collect(),
        }
    }

    fn drain_once(&mut self, host: &HostId, maintenance: &Maintenance) {
        let Some(entry) = self.fleet.hosts.get(host) else {
            return;
        };
        let view = entry.view.clone();
        let parts = self.fleet_parts();
        let (mut progress, next) = drain_step(&view, maintenance, &parts.fleet());
        if let Some(choice) = next {
            match self.start_migration(
                &choice.from,
                &choice.vm,
                &choice.to,
                MigrationOrigin::Drain(host.clone()),
                Default::default(),
            ) {
                Ok(journal) => progress.migrating = Some(journal.id),
                Err(reason) => progress.blocked.push(crate::engine::evacuation::Blocked {
                    vm: choice.vm.clone(),
                    reason,
                }),
            }
        }
        let before = self.drains.progress.get(host);
        if before != Some(&progress) {
            let settled_now = progress.is_settled() && !before.is_some_and(|b| b.is_settled());
            if settled_now {
                let message = if progress.blocked.is_empty() {
                    format!(
                        "drain done: {} moved, nothing left on the host",
                        progress.moved
                    )
                } else {
                    format!(
                        "drain stopped: {} moved; {} cannot move ({})",
                        progress.moved,
                        progress.blocked.len(),
                        progress
                            .blocked
                            .iter()
                            .map(|b| format!("{}: {}", b.vm, b.reason))
                            .collect::<Vec<_>>()
                            .join("; ")
                    )
                };
                let level = if progress.blocked.is_empty() {
                    Level::Info
                } else {
                    Level::Warning
                };
                self.log(level, Some(host.clone()), message);
            }
            self.drains.progress.insert(host.clone(), progress);
            self.drains.dirty = true;
        }
    }

    fn set_move(&mut self, name: &ServiceName, moving: Option<ServiceMove>) {
        if let Some(entry) = self.services.entries.get_mut(name) {
            entry.record.moving = moving;
            self.store.put_service(&entry.record);
            self.services.dirty = true;
        }
    }

    fn move_once(&mut self, name: &ServiceName, moving: ServiceMove) {
        let Some(entry) = self.services.entries.get(name) else {
            return;
        };
        if entry.busy.is_some() {
            return;
        }
        match moving.phase {
            MovePhase::Stopping => {
                let next = ServiceMove {
                    phase: MovePhase::Moving,
                    ..moving.clone()
                };
                if !moving.was_running {
                    self.set_move(name, Some(next));
                    return self.move_once(
                        name,
                        self.services.entries[name]
                            .record
                            .moving
                            .clone()
                            .expect("set"),
                    );
                }
                let (reply, answer) = tokio::sync::oneshot::channel();
                self.stop_service(name, reply);
                self.after_operation(name.clone(), answer, AfterMoveOperation::Stopped { next });
            }
            MovePhase::Moving => {
                let origin = MigrationOrigin::ServiceMove(name.clone());
                let mine = |m: &&crate::engine::migration::MigrationJournal| {
                    m.origin == origin && m.started_ms >= moving.since_ms
                };
                if self
                    .migrations
                    .journals
                    .values()
                    .filter(mine)
                    .any(|m| !m.step.is_finished())
                {
                    return;
                }
                if let Some(failed) = self
                    .migrations
                    .journals
                    .values()
                    .filter(mine)
                    .find(|m| m.step == MigrationStep::RolledBack)
                {
                    let why = format!(
                        "migration {} of {} rolled back: {}",
                        failed.id,
                        failed.vm,
                        failed.error.as_deref().unwrap_or("no reason given")
                    );
                    return self.end_move_early(name, moving, why);
                }
                let parts = self.fleet_parts();
                let Some(view) = parts.services.iter().find(|s| s.name() == name) else {
                    return;
                };
                match service_move_step(view, &moving.site, &parts.fleet()) {
                    Ok(Some(choice)) => {
                        if let Err(why) = self.start_migration(
                            &choice.from,
                            &choice.vm,
                            &choice.to,
                            origin,
                            Default::default(),
                        ) {
                            self.end_move_early(name, moving, why);
                        }
                    }
                    Ok(None) => {
                        self.set_move(
                            name,
                            Some(ServiceMove {
                                phase: MovePhase::Starting,
                                ..moving
                            }),
                        );
                        let moving = self.services.entries[name]
                            .record
                            .moving
                            .clone()
                            .expect("set");
                        self.move_once(name, moving);
                    }
                    Err(blocked) => self.end_move_early(
                        name,
                        moving,
                        format!("{}: {}", blocked.vm, blocked.reason),
                    ),
                }
            }
            MovePhase::Starting => {
                if !moving.was_running {
                    return self.finish_move(name, &moving, None);
                }
                let (reply, answer) = tokio::sync::oneshot::channel();
                self.start_service(name, reply);
                self.after_operation(name.clone(), answer, AfterMoveOperation::Started);
            }
        }
    }

    /// Waits for a service operation the move started; the engine then goes on with the move
    /// (or ends it when the operation failed).
    fn after_operation(
        &mut self,
        name: ServiceName,
        answer: tokio::sync::oneshot::Receiver<Result<crate::engine::OperationReport, EngineError>>,
        after: AfterMoveOperation,
    ) {
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            let failed = match answer.await {
                Ok(Ok(report)) if report.failed.is_empty() => None,
                Ok(Ok(report)) => Some(
                    report
                        .failed
                        .iter()
                        .map(|(i, why)| format!("{i}: {why}"))
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("the engine stopped".into()),
            };
            let ended = Internal::MoveOperationEnded {
                service: name,
                after,
                failed,
            };
            let _ = internal.send(ended).await;
        });
    }

    /// The stop or start a move asked for ended: the move goes on, or ends early.
    pub(in crate::engine) fn move_operation_ended(
        &mut self,
        name: &ServiceName,
        after: AfterMoveOperation,
        failed: Option<String>,
    ) {
        let Some(moving) = self
            .services
            .entries
            .get(name)
            .and_then(|e| e.record.moving.clone())
        else {
            return;
        };
        match (after, failed) {
            (AfterMoveOperation::Stopped { next }, None) => {
                self.set_move(name, Some(next));
                self.advance_evacuations();
            }
            (AfterMoveOperation::Stopped { .. }, Some(why)) => {
                self.end_move_early(name, moving, format!("stopping failed: {why}"))
            }
            (AfterMoveOperation::Started, failed) => self.finish_move(name, &moving, failed),
        }
    }

    /// The move cannot go on: the service is started again where it stands, if it ran.
    fn end_move_early(&mut self, name: &ServiceName, moving: ServiceMove, why: String) {
        self.log(
            Level::Error,
            None,
            format!(
                "service {name}: the move to site {} stopped: {why}",
                moving.site
            ),
        );
        self.set_move(
            name,
            Some(ServiceMove {
                phase: MovePhase::Starting,
                error: Some(why),
                ..moving
            }),
        );
        let moving = self.services.entries[name]
            .record
            .moving
            .clone()
            .expect("set");
        self.move_once(name, moving);
    }

    fn finish_move(
        &mut self,
        name: &ServiceName,
        moving: &ServiceMove,
        start_failed: Option<String>,
    ) {
        self.set_move(name, None);
        let (level, message) = match (&moving.error, start_failed) {
            (None, None) => (
                Level::Info,
                format!("service {name} moved to site {}", moving.site),
            ),
            (None, Some(why)) => (
                Level::Error,
                format!(
                    "service {name} moved to site {}, but did not start fully: {why}",
                    moving.site
                ),
            ),
            (Some(error), start) => (
                Level::Error,
                format!(
                    "service {name} did not move to site {}: {error}{}",
                    moving.site,
                    start.map_or(String::new(), |s| format!(
                        "; starting it again failed: {s}"
                    ))
                ),
            ),
        };
        self.log(level, None, message);
    }
}
