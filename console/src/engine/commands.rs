//! Commands from the UI and ctl: checked, then carried out here or by an agent call; the
//! reply waits for the commit of what the command changed.

use dunes_shared::{
    error_chain,
    model::{HostId, RuntimeKind, VmSpec, VmStatus},
    protocol::{CreateVm, DeleteVm, StartVm, StopVm},
};

use super::{
    Command, EngineError, Reply,
    actor::{Actor, Internal},
    fleet::client::StateChange,
    fleet::enroll::{self, enroll},
    records::Level,
};

impl Actor {
    pub(super) fn command(&mut self, cmd: Command) {
        match cmd {
            Command::ProbeHost { address, reply } => {
                let endpoint = self.endpoint.clone();
                tokio::spawn(async move {
                    let result = enroll::probe(&endpoint, &address).await.map_err(|e| {
                        EngineError::Enroll(format!("{address}: {}", error_chain(&e)))
                    });
                    let _ = reply.send(result);
                });
            }
            Command::AddHost {
                address,
                token,
                expected_fingerprint,
                replace,
                reply,
            } => {
                if let Err(e) = enroll::validate_address(&address) {
                    let _ = reply.send(Err(EngineError::Invalid(e.to_string())));
                    return;
                }
                if token.trim().is_empty() {
                    let _ = reply.send(Err(EngineError::Invalid(
                        "the join token is empty: give the one the agent printed".into(),
                    )));
                    return;
                }
                self.log(
                    Level::Info,
                    None,
                    format!("enrolling the agent at {address}"),
                );
                let (endpoint, pki, internal) = (
                    self.endpoint.clone(),
                    self.pki.clone(),
                    self.internal_tx.clone(),
                );
                let policy = enroll::EnrollPolicy {
                    gate: Some(self.gate_tx.clone()),
                    replace,
                };
                tokio::spawn(async move {
                    match enroll(
                        &endpoint,
                        &pki,
                        &address,
                        &token,
                        expected_fingerprint,
                        policy,
                    )
                    .await
                    {
                        Ok(enrolled) => {
                            let _ = internal
                                .send(Internal::Enrolled {
                                    enrolled,
                                    address,
                                    reply,
                                })
                                .await;
                        }
                        Err(e) => {
                            let message =
                                format!("enrolling {address} failed: {}", error_chain(&e));
                            let _ = internal
                                .send(Internal::Log {
                                    level: Level::Error,
                                    host: None,
                                    message: message.clone(),
                                })
                                .await;
                            let _ = reply.send(Err(EngineError::Enroll(message)));
                        }
                    }
                });
            }
            Command::SetHostAddress {
                host,
                address,
                reply,
            } => match self.set_address(&host, address) {
                Ok(()) => self.reply_after_commit(reply, ()),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::CreateVm {
                host,
                spec,
                start,
                reply,
            } => {
                if let Err(e) = self.may_create_vm(&host, &spec) {
                    let _ = reply.send(Err(e));
                    return;
                }
                self.create_vm(host, spec, start, None, None, reply);
            }
            Command::CreateVmFromImage(create) => self.create_vm_from_image(create),
            Command::OpenConsole {
                host,
                vm,
                wants_keyboard,
                reply,
            } => self.open_console(host, vm, wants_keyboard, reply),
            Command::OpenScreen {
                host,
                vm,
                wants_input,
                reply,
            } => self.open_screen(host, vm, wants_input, reply),
            Command::GuestExec {
                host,
                name,
                command,
                timeout_secs,
                reply,
            } => {
                if command.trim().is_empty() {
                    let _ = reply.send(Err(EngineError::Invalid(
                        "the command to run in the guest is empty".into(),
                    )));
                    return;
                }
                self.agent_call(
                    host,
                    format!("running {command:?} in VM {name}"),
                    reply,
                    dunes_shared::protocol::GuestExec {
                        name,
                        command,
                        timeout_secs,
                    },
                    |_| StateChange::Nothing,
                );
            }
            Command::PowerVm {
                host,
                name,
                action,
                reply,
            } => {
                let runtime = self.runtime_of(&host, &name);
                let doing = match action {
                    dunes_shared::protocol::PowerAction::Reboot => "rebooting",
                    dunes_shared::protocol::PowerAction::Pause => "pausing",
                    dunes_shared::protocol::PowerAction::Resume => "resuming",
                };
                self.agent_call(
                    host,
                    format!("{doing} VM {name}"),
                    reply,
                    dunes_shared::protocol::PowerVm {
                        name,
                        action,
                        runtime,
                    },
                    vm_change,
                );
            }
            Command::ConfigureVm {
                host,
                name,
                vcpus,
                memory_mib,
                autostart,
                eject_cdrom,
                reply,
            } => {
                let vm = match self.vm_of(&host, &name) {
                    Ok(vm) => vm,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                };
                let view = &self.fleet.hosts[&host].view;
                if let Some(why) =
                    super::fleet::vm_changes::resize_refusal(&vm, view, vcpus, memory_mib)
                {
                    let _ = reply.send(Err(EngineError::Invalid(why)));
                    return;
                }
                let mut what = Vec::new();
                if let Some(v) = vcpus {
                    what.push(format!("{v} vCPUs"));
                }
                if let Some(m) = memory_mib {
                    what.push(format!("{m} MiB of memory"));
                }
                if let Some(a) = autostart {
                    what.push(format!("autostart {}", if a { "on" } else { "off" }));
                }
                if eject_cdrom {
                    let refusal = match (&vm.installer, self.fleet.client(&host)) {
                        (None, _) => Some(EngineError::Invalid(format!(
                            "VM {name} has no installer in its CD-ROM drive"
                        ))),
                        (_, Err(e)) => Some(e),
                        (Some(_), Ok(client))
                            if !client
                                .peer
                                .offers(dunes_shared::protocol::features::VM_EJECT) =>
                        {
                            Some(EngineError::Invalid(format!(
                                "host {host}'s agent cannot eject CD-ROMs: update it"
                            )))
                        }
                        (Some(image), Ok(_)) => {
                            what.push(format!("no installer ({image} ejected)"));
                            None
                        }
                    };
                    if let Some(e) = refusal {
                        let _ = reply.send(Err(e));
                        return;
                    }
                }
                if what.is_empty() {
                    let _ = reply.send(Err(EngineError::Invalid(
                        "say what to change: vCPUs, memory or autostart".into(),
                    )));
                    return;
                }
                self.agent_call(
                    host,
                    format!("setting VM {name} to {}", what.join(", ")),
                    reply,
                    dunes_shared::protocol::ConfigureVm {
                        name,
                        vcpus,
                        memory_mib,
                        autostart,
                        eject_cdrom,
                    },
                    |configured| StateChange::Resized {
                        status: configured.status.clone(),
                        at_next_start: configured.at_next_start,
                    },
                );
            }
            Command::SnapshotVm {
                host,
                name,
                action,
                snapshot,
                reply,
            } => {
                use dunes_shared::protocol::SnapshotAction;
                if let Some(s) = &snapshot
                    && let Err(e) = dunes_shared::model::validate_snapshot_name(s)
                {
                    let _ = reply.send(Err(EngineError::Invalid(e.to_string())));
                    return;
                }
                let what = match (action, &snapshot) {
                    (SnapshotAction::List, _) => None,
                    (_, None) => {
                        let _ = reply.send(Err(EngineError::Invalid(format!(
                            "name the snapshot to {}",
                            action.as_str()
                        ))));
                        return;
                    }
                    (SnapshotAction::Create, Some(s)) => {
                        Some(format!("taking snapshot {s} of VM {name}"))
                    }
                    (SnapshotAction::Revert, Some(s)) => {
                        Some(format!("reverting VM {name} to snapshot {s}"))
                    }
                    (SnapshotAction::Delete, Some(s)) => {
                        Some(format!("deleting snapshot {s} of VM {name}"))
                    }
                };
                let request = dunes_shared::protocol::SnapshotVm {
                    name,
                    action,
                    snapshot,
                };
                match what {
                    Some(what) => {
                        self.agent_call(host, what, reply, request, |_| StateChange::Nothing)
                    }
                    // A list changes nothing: no event for it.
                    None => match self.client(&host) {
                        Ok(client) => {
                            tokio::spawn(async move {
                                let _ = reply.send(client.call(request).await);
                            });
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    },
                }
            }
            Command::CloneVm {
                host,
                name,
                new_name,
                to,
                reply,
            } => self.clone_vm(host, name, new_name, to, reply),
            Command::StartVm { host, name, reply } => {
                let runtime = self.runtime_of(&host, &name);
                self.agent_call(
                    host,
                    format!("starting VM {name}"),
                    reply,
                    StartVm {
                        runtime,
                        name,
                        user_data: None,
                    },
                    vm_change,
                );
            }
            Command::StopVm {
                host,
                name,
                force,
                reply,
            } => {
                let runtime = self.runtime_of(&host, &name);
                let what = if force {
                    format!("forcing VM {name} off")
                } else {
                    format!("stopping VM {name}")
                };
                self.agent_call(
                    host,
                    what,
                    reply,
                    StopVm {
                        runtime,
                        name,
                        force,
                        timeout_secs: 0,
                    },
                    vm_change,
                );
            }
            Command::DefineService {
                source,
                replace,
                reply,
            } => self.define_service(source, replace, reply),
            Command::DeleteService { name, reply } => self.delete_service(&name, reply),
            Command::DeployService {
                name,
                fingerprint,
                overrides,
                reply,
            } => self.deploy_service(&name, fingerprint, &overrides, reply),
            Command::StartService { name, reply } => self.start_service(&name, reply),
            Command::MigrateVm {
                host,
                vm,
                to,
                options,
                reply,
            } => self.migrate_vm(&host, &vm, &to, options, reply),
            Command::CancelMigration { id, reply } => self.cancel_migration(id, reply),
            Command::Capacity { what_if, reply } => self.capacity_query(what_if, reply),
            Command::SetAutoscale {
                service,
                app,
                rule,
                reply,
            } => self.set_autoscale(service, app, rule, reply),
            Command::AddOperator {
                name,
                role,
                scopes,
                consoles,
                csr_der,
                reply,
            } => self.add_operator(name, (role, scopes, consoles), csr_der, reply),
            Command::RevokeOperator { name, reply } => self.revoke_operator(name, reply),
            Command::ImportImage { name, path, reply } => self.import_image(name, path, reply),
            Command::DeleteImage { name, reply } => self.delete_image(name, reply),
            Command::PushImage { name, hosts, reply } => self.push_image(name, hosts, reply),
            Command::ListImages { reply } => {
                let records = self
                    .images
                    .records
                    .values()
                    .map(|r| super::images::ImageRecord {
                        hosts: self.image_hosts(r),
                        ..r.clone()
                    })
                    .collect();
                let _ = reply.send(Ok(records));
            }
            Command::Audit { entry, reply } => self.append_audit(entry, reply),
            Command::RenewOperator {
                name,
                csr_der,
                reply,
            } => self.renew_operator(name, csr_der, reply),
            Command::AuditReader { reply } => {
                let _ = reply.send(Ok(self.audit_reader()));
            }
            Command::AutoscaleShow { reply } => {
                let _ = reply.send(Ok(self.autoscale_views()));
            }
            Command::ReplayAutoscale {
                service,
                app,
                since_secs,
                reply,
            } => self.replay_autoscale(service, app, since_secs, reply),
            Command::Cost {
                by,
                since_secs,
                reply,
            } => self.cost_query(by, since_secs, reply),
            Command::LatestValues { reply } => {
                let _ = reply.send(Ok(self.statistics.series.latest()));
            }
            Command::ImportSamples {
                host,
                samples,
                reply,
            } => {
                if !self.fleet.hosts.contains_key(&host) {
                    let _ = reply.send(Err(EngineError::UnknownHost(host)));
                    return;
                }
                let writes = self.statistics.series.ingest(&host, &samples);
                self.store.put_stats(writes);
                let taken = samples.len();
                // Answered once what closed is on disk.
                self.reply_after_commit(reply, taken);
            }
            Command::Stats {
                subject,
                since_secs,
                resolution_secs,
                reply,
            } => self.stats_query(subject, since_secs, resolution_secs, reply),
            Command::ImportHistory {
                host,
                samples,
                generated_until_secs,
                reply,
            } => {
                let now_secs = super::records::now_ms() / 1000;
                let writes = self
                    .statistics
                    .series
                    .ingest_history(&host, &samples, now_secs);
                let count = writes.len();
                self.store.put_stats(writes);
                self.statistics.generated_until_secs = Some(
                    self.statistics
                        .generated_until_secs
                        .map_or(generated_until_secs, |t| t.max(generated_until_secs)),
                );
                // Published with the next snapshot.
                self.events.dirty = true;
                let _ = reply.send(Ok(count));
            }
            Command::DrainHost { host, reply } => self.drain_host(&host, reply),
            Command::PauseDrain { host, reply } => self.pause_drain(&host, reply),
            Command::UndrainHost { host, reply } => self.undrain_host(&host, reply),
            Command::MoveService { name, site, reply } => self.move_service(&name, &site, reply),
            Command::AdoptVm {
                service,
                app,
                host,
                vm,
                reply,
            } => self.adopt_vm(&service, &app, &host, &vm, reply),
            Command::StopService { name, reply } => self.stop_service(&name, reply),
            Command::PlanService {
                name,
                overrides,
                reply,
            } => {
                let _ = reply.send(self.plan_service(&name, &overrides));
            }
            Command::DeleteVm { host, name, reply } => {
                let deleted = name.clone();
                let runtime = self.runtime_of(&host, &name);
                self.agent_call(
                    host,
                    format!("deleting VM {name}"),
                    reply,
                    DeleteVm { runtime, name },
                    move |()| StateChange::VmGone(deleted),
                );
            }
        }
    }

    /// The VM as the engine knows it.
    pub(super) fn vm_of(
        &self,
        host: &HostId,
        name: &dunes_shared::model::VmName,
    ) -> Result<VmStatus, EngineError> {
        self.fleet.vm_of(host, name)
    }

    /// The runtime a host reports for a workload; libvirt for one it does not know.
    fn runtime_of(&self, host: &HostId, name: &dunes_shared::model::VmName) -> RuntimeKind {
        self.fleet.runtime_of(host, name)
    }

    fn set_address(&mut self, host: &HostId, address: String) -> Result<(), EngineError> {
        enroll::validate_address(&address).map_err(|e| EngineError::Invalid(e.to_string()))?;
        let entry = self
            .fleet
            .hosts
            .get_mut(host)
            .ok_or_else(|| EngineError::UnknownHost(host.clone()))?;
        if entry.view.record.address != address {
            entry.view.record.address = address.clone();
            entry.dirty = true;
            self.store.put_host(&entry.view.record);
            let _ = entry.address.send(address.clone());
            self.log(
                Level::Info,
                Some(host.clone()),
                format!("address set to {address}"),
            );
        }
        Ok(())
    }

    /// Sends `value` to the caller once every write made so far is committed; a failed commit
    /// is the caller's error.
    pub(super) fn reply_after_commit<T: Send + 'static>(&mut self, reply: Reply<T>, value: T) {
        self.store.after_commit(Box::new(move |committed| {
            let _ = reply.send(committed.map(|()| value).map_err(EngineError::Store));
        }));
    }

    /// Answers a capacity query: the sums from the hosts now, and each site's CPU and memory
    /// history (hourly means over 30 days, summed over its hosts) read off the engine's
    /// thread, with the forecast made from its daily peaks.
    fn capacity_query(
        &mut self,
        what_if: super::statistics::capacity::WhatIf,
        reply: Reply<Vec<super::statistics::capacity::SiteCapacity>>,
    ) {
        use super::{statistics::capacity, statistics::forecast, statistics::series};
        const HISTORY_SECS: u64 = 30 * 86_400;
        let views: Vec<&super::HostView> = self.fleet.hosts.values().map(|e| &e.view).collect();
        let mut sites = capacity::site_capacity(views.iter().copied(), &what_if);
        let cpus: std::collections::HashMap<_, f64> = views
            .iter()
            .filter_map(|v| Some((v.id().clone(), f64::from(v.inventory()?.cpus))))
            .collect();
        let now_secs = super::records::now_ms() / 1000;
        let from_secs = now_secs.saturating_sub(HISTORY_SECS);
        // Which series make each site's use, with what is still open of them.
        let mut wanted = Vec::new();
        for (site, cap) in sites.iter().enumerate() {
            for (slot, resource) in cap.resources.iter().map(|r| r.resource).enumerate() {
                let series: Vec<(String, f64, Vec<super::statistics::rollup::Bucket>)> =
                    capacity::site_history(cap, resource, |h| cpus.get(h).copied().unwrap_or(0.0))
                        .into_iter()
                        .map(|(key, factor)| {
                            let open = self.statistics.series.open(&key, 2);
                            (key, factor, open)
                        })
                        .collect();
                if !series.is_empty() {
                    wanted.push((site, slot, series));
                }
            }
        }
        let reader = self.store.stats_reader();
        tokio::task::spawn_blocking(move || {
            for (site, slot, series) in wanted {
                let mut per_host = Vec::new();
                for (key, factor, open) in series {
                    let mut points = match reader.buckets(&key, 2, from_secs, now_secs + 1) {
                        Ok(p) => p,
                        Err(e) => {
                            let _ = reply.send(Err(EngineError::Store(error_chain(&e))));
                            return;
                        }
                    };
                    series::merge_open(&mut points, open, from_secs);
                    per_host.push((
                        points.iter().map(|b| (b.start_secs, b.mean())).collect(),
                        factor,
                    ));
                }
                let peaks = forecast::daily_peaks(&capacity::sum_series(&per_host));
                // Today's peak is not a day's peak until the day is over: just after
                // midnight it is a few minutes' worth, and would bend the trend down. It
                // still counts when it says the site is full already.
                let today = (now_secs / 86_400) as f64;
                let whole: Vec<(f64, f64)> =
                    peaks.iter().copied().filter(|p| p.0 < today).collect();
                let use_ = &mut sites[site].resources[slot];
                let full_now = peaks.last().is_some_and(|p| p.1 >= use_.capacity);
                let fitted = if whole.is_empty() || full_now {
                    &peaks
                } else {
                    &whole
                };
                use_.forecast = Some(forecast::forecast(
                    fitted,
                    use_.capacity,
                    now_secs as f64 / 86_400.0,
                    forecast::Method::PeakTrend,
                ));
                use_.peaks = peaks;
            }
            let _ = reply.send(Ok(sites));
        });
    }

    /// Answers a cost report: every workload there is now, its CPU and sent bytes from the
    /// stored series (minutes up to 7 days back, hours beyond), its disks as they are now,
    /// priced at its host's prices and summed by `by`. Workloads removed since are not in it.
    fn cost_query(
        &mut self,
        by: super::statistics::cost::CostBy,
        since_secs: u64,
        reply: Reply<Vec<super::statistics::cost::CostLine>>,
    ) {
        use super::{
            statistics::cost::{self, CostBy},
            statistics::rollup,
            statistics::series::{self, Metric, Subject, series_key},
        };
        let now = super::records::now_ms() / 1000;
        let from = now.saturating_sub(since_secs);
        let level = if since_secs <= 7 * 86_400 { 1 } else { 2 };
        let step = rollup::RESOLUTIONS[level].step_secs;
        let service_of: std::collections::HashMap<_, _> = self
            .services
            .instances
            .values()
            .map(|i| (i.vm.clone(), (i.service.clone(), i.app.clone())))
            .collect();
        let mut workloads = Vec::new();
        for entry in self.fleet.hosts.values() {
            let Some(inv) = entry.view.inventory() else {
                continue;
            };
            for vm in &entry.view.vms {
                let owner = service_of.get(&vm.name);
                let key = match by {
                    CostBy::Instance => vm.name.to_string(),
                    CostBy::Application => {
                        owner.map_or("(no service)".to_string(), |(s, a)| format!("{s}/{a}"))
                    }
                    CostBy::Service => {
                        owner.map_or("(no service)".to_string(), |(s, _)| s.to_string())
                    }
                    CostBy::Site => inv.site.name.to_string(),
                };
                let subject = Subject::Workload(vm.name.clone());
                let cpu = series_key(&subject, Metric::Cpu);
                let sent = SentSeries::of(&self.statistics.series, &subject, level);
                let open_cpu = self.statistics.series.open(&cpu, level);
                workloads.push((
                    key,
                    inv.prices,
                    vm.vcpus,
                    vm.disk_bytes,
                    cpu,
                    sent,
                    open_cpu,
                ));
            }
        }
        // Disk streams of migrations between sites: traffic that left the source's site,
        // at its host's price (as many bytes as the stream carried, compressed or not).
        let site_of = |h: &HostId| {
            self.fleet
                .hosts
                .get(h)
                .and_then(|e| e.view.inventory())
                .map(|i| (i.site.name.to_string(), i.prices))
        };
        let mut streams: Vec<(String, f64, f64)> = Vec::new();
        for m in self.migrations.journals.values() {
            let (Some((from_site, prices)), Some((to_site, _))) =
                (site_of(&m.from), site_of(&m.to))
            else {
                continue;
            };
            if from_site == to_site || m.bytes_done == 0 || m.updated_ms / 1000 < from {
                continue;
            }
            let owner = service_of.get(&m.vm);
            let key = match by {
                CostBy::Instance => m.vm.to_string(),
                CostBy::Application => {
                    owner.map_or("(no service)".to_string(), |(s, a)| format!("{s}/{a}"))
                }
                CostBy::Service => owner.map_or("(no service)".to_string(), |(s, _)| s.to_string()),
                CostBy::Site => from_site,
            };
            streams.push((key, m.bytes_done as f64 / 1e9, prices.per_gb_transferred));
        }
        let present: std::collections::BTreeSet<dunes_shared::model::VmName> = self
            .fleet
            .hosts
            .values()
            .flat_map(|e| e.view.vms.iter().map(|v| v.name.clone()))
            .collect();
        let reader = self.store.stats_reader();
        tokio::task::spawn_blocking(move || {
            let mut groups: std::collections::BTreeMap<String, cost::CostLine> =
                std::collections::BTreeMap::new();
            // Workloads deleted within the range count up to when they went; one that came
            // back (a migration's source, a name used again) is counted as it is now.
            let departed = match reader.departed_since(from) {
                Ok(d) => d,
                Err(e) => {
                    let _ = reply.send(Err(EngineError::Store(error_chain(&e))));
                    return;
                }
            };
            let mut latest: std::collections::BTreeMap<_, super::store::DepartedRecord> =
                Default::default();
            for d in departed.into_iter().filter(|d| !present.contains(&d.vm)) {
                latest.insert(d.vm.clone(), d);
            }
            let mut workloads: Vec<_> = workloads.into_iter().map(|w| (w, now)).collect();
            for d in latest.into_values() {
                let key = match by {
                    CostBy::Instance => d.vm.to_string(),
                    CostBy::Application => d
                        .owner
                        .as_ref()
                        .map_or("(no service)".to_string(), |(s, a)| format!("{s}/{a}")),
                    CostBy::Service => d
                        .owner
                        .as_ref()
                        .map_or("(no service)".to_string(), |(s, _)| s.to_string()),
                    CostBy::Site => d.site.clone(),
                };
                let subject = Subject::Workload(d.vm.clone());
                let cpu = series_key(&subject, Metric::Cpu);
                let sent = SentSeries::stored(&subject);
                workloads.push((
                    (key, d.prices, d.vcpus, d.disk_bytes, cpu, sent, Vec::new()),
                    d.removed_at_secs.min(now),
                ));
            }
            for ((key, prices, vcpus, disk_bytes, cpu_key, sent, open_cpu), until) in workloads {
                let cpu = reader
                    .buckets(&cpu_key, level, from, now + 1)
                    .map(|mut points| {
                        series::merge_open(&mut points, open_cpu, from);
                        points
                    });
                let (cpu, sent) = match (cpu, sent.read(&reader, level, from, now + 1)) {
                    (Ok(c), Ok(s)) => (c, s),
                    (Err(e), _) | (_, Err(e)) => {
                        let _ = reply.send(Err(EngineError::Store(error_chain(&e))));
                        return;
                    }
                };
                let usage =
                    cost::usage_from_buckets(&cpu, &sent, vcpus, disk_bytes, step, from, until);
                let line = groups.entry(key.clone()).or_insert(cost::CostLine {
                    key,
                    usage: cost::Usage::default(),
                    cost: 0.0,
                });
                line.usage.add(&usage);
                line.cost += usage.cost(&prices);
            }
            for (key, gb, price) in streams {
                let line = groups.entry(key.clone()).or_insert(cost::CostLine {
                    key,
                    usage: cost::Usage::default(),
                    cost: 0.0,
                });
                line.usage.gb_transferred += gb;
                line.cost += gb * price;
            }
            let _ = reply.send(Ok(groups.into_values().collect()));
        });
    }

    /// The workloads whose cost makes `subject`'s, as they are now: a workload itself, a
    /// host's or a site's workloads, an application's or a service's instances (an
    /// application inside VMs has no cost of its own).
    fn costed_workloads(
        &self,
        subject: &super::statistics::series::Subject,
        level: usize,
    ) -> Vec<Costed> {
        use super::statistics::series::{Metric, Subject, series_key};
        // A service's or an application's instances, once.
        let instances: std::collections::BTreeSet<(&HostId, &dunes_shared::model::VmName)> =
            match subject {
                Subject::Service(s) | Subject::Application(s, _) => self
                    .services
                    .instances
                    .values()
                    .filter(|i| {
                        &i.service == s
                            && match subject {
                                Subject::Application(_, a) => &i.app == a,
                                _ => true,
                            }
                    })
                    .map(|i| (&i.host, &i.vm))
                    .collect(),
                _ => Default::default(),
            };
        let wanted = |host: &HostEntryRef, vm: &dunes_shared::model::VmName| match subject {
            Subject::Workload(v) => v == vm,
            Subject::Host(h) => host.0 == h,
            Subject::Site(site) => host.1 == site.as_str(),
            Subject::Service(_) | Subject::Application(..) => instances.contains(&(host.0, vm)),
            Subject::GuestApp(..) => false,
        };
        let mut out = Vec::new();
        for entry in self.fleet.hosts.values() {
            let Some(inv) = entry.view.inventory() else {
                continue;
            };
            let host_ref: HostEntryRef = (entry.view.id(), inv.site.name.as_str());
            for vm in entry.view.vms.iter().filter(|v| wanted(&host_ref, &v.name)) {
                let workload = Subject::Workload(vm.name.clone());
                let cpu_key = series_key(&workload, Metric::Cpu);
                out.push(Costed {
                    open_cpu: self.statistics.series.open(&cpu_key, level),
                    sent: SentSeries::of(&self.statistics.series, &workload, level),
                    cpu_key,
                    vcpus: vm.vcpus,
                    disk_bytes: vm.disk_bytes,
                    prices: inv.prices,
                });
            }
        }
        out
    }

    /// The hosts and workloads whose series make `subject`: itself, or an aggregate's
    /// members as they are now.
    fn members_of(
        &self,
        subject: &super::statistics::series::Subject,
    ) -> Result<Vec<super::statistics::series::Subject>, EngineError> {
        use super::statistics::series::Subject;
        let instances = |service: &dunes_shared::model::ServiceName,
                         app: Option<&dunes_shared::model::AppName>| {
            self.services
                .instances
                .values()
                .filter(|i| &i.service == service && app.is_none_or(|a| &i.app == a))
                .map(|i| Subject::Workload(i.vm.clone()))
                .collect::<Vec<_>>()
        };
        Ok(match subject {
            Subject::Host(_) | Subject::Workload(_) | Subject::GuestApp(..) => {
                vec![subject.clone()]
            }
            Subject::Service(name) => {
                if !self.services.entries.contains_key(name) {
                    return Err(EngineError::Invalid(format!(
                        "service {name} does not exist"
                    )));
                }
                instances(name, None)
            }
            Subject::Application(name, app) => {
                let Some(entry) = self.services.entries.get(name) else {
                    return Err(EngineError::Invalid(format!(
                        "service {name} does not exist"
                    )));
                };
                // An application inside VMs: its series in each VM of the one holding it.
                let holder = entry
                    .spec
                    .as_ref()
                    .ok()
                    .and_then(|spec| spec.guest_app(app))
                    .map(|(holder, _)| holder.name.clone());
                match holder {
                    Some(holder) => instances(name, Some(&holder))
                        .into_iter()
                        .filter_map(|s| match s {
                            Subject::Workload(vm) => Some(Subject::GuestApp(vm, app.clone())),
                            _ => None,
                        })
                        .collect(),
                    None => instances(name, Some(app)),
                }
            }
            Subject::Site(site) => {
                let hosts: Vec<Subject> = self
                    .fleet
                    .hosts
                    .values()
                    .filter(|e| {
                        e.view
                            .inventory()
                            .is_some_and(|i| i.site.name.as_str() == site)
                    })
                    .map(|e| Subject::Host(e.view.id().clone()))
                    .collect();
                if hosts.is_empty() {
                    return Err(EngineError::Invalid(format!("no host is in site {site}")));
                }
                hosts
            }
        })
    }

    /// Answers a time-series query: the open buckets now, the stored ones read off the
    /// engine's thread, merged there.
    fn stats_query(
        &mut self,
        subject: super::statistics::series::Subject,
        since_secs: u64,
        resolution_secs: Option<u64>,
        reply: Reply<super::statistics::series::StatsAnswer>,
    ) {
        use super::{statistics::rollup, statistics::series};
        let now_secs = super::records::now_ms() / 1000;
        let from_secs = now_secs.saturating_sub(since_secs);
        let level = match resolution_secs {
            Some(step) => match rollup::RESOLUTIONS.iter().position(|r| r.step_secs == step) {
                Some(level) => level,
                None => {
                    let _ = reply.send(Err(EngineError::Invalid(format!(
                        "no {step} s resolution; there are 1 s, 60 s and 3600 s"
                    ))));
                    return;
                }
            },
            None => rollup::level_for(from_secs, now_secs, series::MAX_POINTS),
        };
        // An aggregate reads each of its members' series.
        let members = match self.members_of(&subject) {
            Ok(m) => m,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let aggregate = !matches!(
            subject,
            series::Subject::Host(_) | series::Subject::Workload(_) | series::Subject::GuestApp(..)
        );
        type Wanted = Vec<(series::Metric, Vec<(String, Vec<rollup::Bucket>)>)>;
        let wanted: Wanted = series::Metric::ALL
            .iter()
            .map(|&m| {
                let keys = members
                    .iter()
                    .map(|member| {
                        let key = series::series_key(member, m);
                        let open = self.statistics.series.open(&key, level);
                        (key, open)
                    })
                    .collect();
                (m, keys)
            })
            .collect();
        let costed = self.costed_workloads(&subject, level);
        let reader = self.store.stats_reader();
        let step_secs = rollup::RESOLUTIONS[level].step_secs;
        tokio::task::spawn_blocking(move || {
            let mut series = Vec::new();
            // What its workloads cost per hour, bucket by bucket.
            let mut costs = Vec::new();
            for w in costed {
                let read = |k: &str, open: Vec<rollup::Bucket>| {
                    reader
                        .buckets(k, level, from_secs, now_secs + 1)
                        .map(|mut points| {
                            series::merge_open(&mut points, open, from_secs);
                            points
                        })
                };
                let sent = w.sent.read(&reader, level, from_secs, now_secs + 1);
                match (read(&w.cpu_key, w.open_cpu), sent) {
                    (Ok(cpu), Ok(sent)) => {
                        costs.push(super::statistics::cost::cost_per_hour_series(
                            &cpu,
                            &sent,
                            w.vcpus,
                            w.disk_bytes,
                            &w.prices,
                        ))
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        let _ = reply.send(Err(EngineError::Store(error_chain(&e))));
                        return;
                    }
                }
            }
            let cost = super::statistics::cost::sum_series(costs);
            if !cost.is_empty() {
                series.push(series::SeriesPoints {
                    metric: series::Metric::Cost,
                    points: cost,
                });
            }
            for (metric, keys) in wanted {
                let mut per_member = Vec::new();
                for (key, open) in keys {
                    let mut points = match reader.buckets(&key, level, from_secs, now_secs + 1) {
                        Ok(p) => p,
                        Err(e) => {
                            let _ = reply.send(Err(EngineError::Store(error_chain(&e))));
                            return;
                        }
                    };
                    series::merge_open(&mut points, open, from_secs);
                    if !points.is_empty() {
                        per_member.push(points);
                    }
                }
                let points = if aggregate {
                    series::aggregate(metric, &per_member)
                } else {
                    per_member.pop().unwrap_or_default()
                };
                if !points.is_empty() {
                    series.push(series::SeriesPoints { metric, points });
                }
            }
            let _ = reply.send(Ok(series::StatsAnswer {
                subject,
                resolution_secs: step_secs,
                from_secs,
                to_secs: now_secs,
                series,
            }));
        });
    }
}

/// A host's id and its site's name.
type HostEntryRef<'a> = (&'a HostId, &'a str);

/// A workload whose cost a statistics query adds up: its series and how it is priced.
struct Costed {
    cpu_key: String,
    open_cpu: Vec<super::statistics::rollup::Bucket>,
    sent: SentSeries,
    vcpus: u32,
    disk_bytes: u64,
    prices: dunes_shared::model::Prices,
}

/// The series of what a workload sent that a cost counts (see [`super::statistics::cost::billed_sent`]):
/// what left its site where its agent measured it, all it sent elsewhere.
struct SentSeries {
    all_key: String,
    out_key: String,
    open_all: Vec<super::statistics::rollup::Bucket>,
    open_out: Vec<super::statistics::rollup::Bucket>,
}

impl SentSeries {
    /// A workload's, with what its series hold open at `level`.
    fn of(
        stats: &super::statistics::series::TimeSeries,
        workload: &super::statistics::series::Subject,
        level: usize,
    ) -> Self {
        let mut series = Self::stored(workload);
        series.open_all = stats.open(&series.all_key, level);
        series.open_out = stats.open(&series.out_key, level);
        series
    }

    /// A workload's, as the store has them (one that is gone holds nothing open).
    fn stored(workload: &super::statistics::series::Subject) -> Self {
        use super::statistics::series::{Metric, series_key};
        SentSeries {
            all_key: series_key(workload, Metric::NetTx),
            out_key: series_key(workload, Metric::NetTxOutOfSite),
            open_all: Vec::new(),
            open_out: Vec::new(),
        }
    }

    fn read(
        self,
        reader: &super::store::StatsReader,
        level: usize,
        from_secs: u64,
        to_secs: u64,
    ) -> Result<Vec<super::statistics::rollup::Bucket>, super::store::StoreError> {
        let read = |key: &str, open: Vec<super::statistics::rollup::Bucket>| {
            reader
                .buckets(key, level, from_secs, to_secs)
                .map(|mut points| {
                    super::statistics::series::merge_open(&mut points, open, from_secs);
                    points
                })
        };
        Ok(super::statistics::cost::billed_sent(
            read(&self.all_key, self.open_all)?,
            read(&self.out_key, self.open_out)?,
        ))
    }
}

/// A VM's status in an agent's answer, recorded on its host.
impl Actor {
    /// Why `spec` cannot be created on `host`, if it cannot: a bad spec, or a host in
    /// maintenance.
    pub(in crate::engine) fn may_create_vm(
        &self,
        host: &HostId,
        spec: &VmSpec,
    ) -> Result<(), EngineError> {
        spec.validate()
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        if self
            .fleet
            .hosts
            .get(host)
            .is_some_and(|h| h.view.record.maintenance.is_some())
        {
            return Err(EngineError::Invalid(format!(
                "host {host} is in maintenance and takes nothing new; undrain it first"
            )));
        }
        Ok(())
    }

    /// Asks `host`'s agent to create the VM (from a library image, with cloud-init's data,
    /// when `from_image` is set).
    pub(in crate::engine) fn create_vm(
        &mut self,
        host: HostId,
        spec: VmSpec,
        start: bool,
        from_image: Option<(
            dunes_shared::model::ImageDisk,
            Option<dunes_shared::cloud_init::CloudInitData>,
        )>,
        network: Option<dunes_shared::network::InstanceNic>,
        reply: Reply<VmStatus>,
    ) {
        let what = format!("creating VM {} on {host}", spec.name);
        let (image_disk, cloud_init) = match from_image {
            Some((disk, cloud_init)) => (Some(disk), cloud_init),
            None => (None, None),
        };
        let create = CreateVm {
            spec,
            start,
            runtime: RuntimeKind::Libvirt,
            image_disk,
            cloud_init,
            network,
        };
        self.agent_call(host, what, reply, create, vm_change);
    }
}

fn vm_change(status: &VmStatus) -> StateChange {
    StateChange::Vm(status.clone())
}
