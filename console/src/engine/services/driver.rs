//! Services in the engine: defined from the operator's file, kept in the store, planned
//! against the fleet as the engine sees it now, deployed step by step (each instance written
//! to the store before its VM is created or removed), started in dependency order and stopped
//! in reverse, with a status made from every instance.

use std::sync::Arc;

use dunes_shared::{
    model::{AppName, HostId, ImageDisk, ServiceName, VmName, VmSpec, VmState, VmStatus},
    protocol::{
        CheckReady, CreateVm, DeleteVm, ProbeKind, ReadinessProbe, StartVm, StopVm, features,
    },
    service::{Readiness, ServiceSpec},
};
use tokio::sync::{mpsc, oneshot};

use crate::engine::{
    EngineError, LinkState, Reply,
    actor::{Actor, Internal},
    fleet::client::AgentClient,
    records::{InstanceRecord, InstanceState, Level, ServiceRecord, now_ms},
    services::placement::{Action, Override, place_instances_with},
    services::{
        readiness::probe_of,
        service_file::parse_service_file,
        state::{ImageBoot, ServiceEntry, StartInputs, Step},
        user_data::ADDRESS_WAIT,
        views::{
            InstanceView, Operation, OperationReport, ServicePlan, ServiceStatus, ServiceView,
            fingerprint, instance_vm_name, plan_inputs, service_status,
        },
    },
};

impl Actor {
    /// The service's definition, with the instance counts autoscaling set.
    pub(in crate::engine) fn readable_spec(
        &self,
        name: &ServiceName,
    ) -> Result<ServiceSpec, EngineError> {
        let spec =
            self.services.entry(name)?.spec.clone().map_err(|e| {
                EngineError::Invalid(format!("service {name} no longer reads: {e}"))
            })?;
        Ok(self.autoscaling.scaled(name, spec))
    }

    pub(in crate::engine) fn define_service(
        &mut self,
        source: String,
        replace: bool,
        reply: Reply<ServiceName>,
    ) {
        let spec = match parse_service_file(&source) {
            Ok(spec) => spec,
            Err(e) => {
                let _ = reply.send(Err(EngineError::Invalid(e.to_string())));
                return;
            }
        };
        let name = spec.name.clone();
        if let Some(too_long) = spec
            .applications
            .iter()
            .find_map(|a| instance_vm_name(&name, &a.name, a.instances.saturating_sub(1)).err())
        {
            let _ = reply.send(Err(EngineError::Invalid(too_long)));
            return;
        }
        let existing = self.services.entries.get(&name);
        if let Some(existing) = existing {
            if !replace {
                let _ = reply.send(Err(EngineError::Invalid(format!(
                    "service {name} exists already; replace it to change it"
                ))));
                return;
            }
            if existing.busy.is_some() {
                let _ = reply.send(Err(EngineError::Invalid(format!(
                    "service {name} is busy; try again when it is done"
                ))));
                return;
            }
        }
        let network = match self.network_for(&spec) {
            Ok(choice) => choice,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let existed = existing.is_some();
        let record = ServiceRecord {
            name: name.clone(),
            source,
            defined_at_ms: now_ms(),
            // A move under way goes on under the new definition.
            moving: existing.and_then(|e| e.record.moving.clone()),
        };
        self.store.put_service(&record);
        self.services
            .entries
            .insert(name.clone(), ServiceEntry::new(record));
        self.keep_network(network);
        self.forget_unused_networks();
        self.services.dirty = true;
        let verb = if existed { "changed" } else { "defined" };
        self.log(Level::Info, None, format!("service {name} {verb}"));
        self.reply_after_commit(reply, name);
    }

    pub(in crate::engine) fn plan_service(
        &self,
        name: &ServiceName,
        overrides: &[Override],
    ) -> Result<ServicePlan, EngineError> {
        let spec = self.readable_spec(name)?;
        let (hosts, existing) = plan_inputs(
            &spec,
            self.fleet.hosts.values().map(|e| &e.view),
            &self.services.instances_of(name),
        );
        let plan = place_instances_with(&spec, &hosts, &existing, overrides, &self.images.needs());
        Ok(ServicePlan {
            service: name.clone(),
            fingerprint: fingerprint(&spec, &existing, overrides, &plan),
            plan,
        })
    }

    /// Applies the plan made now, if it is the one the operator saw (`fingerprint`).
    pub(in crate::engine) fn deploy_service(
        &mut self,
        name: &ServiceName,
        fingerprint: Option<String>,
        overrides: &[Override],
        reply: Reply<OperationReport>,
    ) {
        let prepared = (|| {
            let spec = self.readable_spec(name)?;
            self.not_busy(name)?;
            let planned = self.plan_service(name, overrides)?;
            if let Some(seen) = fingerprint
                && seen != planned.fingerprint
            {
                return Err(EngineError::Invalid(format!(
                    "the fleet changed since that plan (fingerprint {seen}, now {}): plan again",
                    planned.fingerprint
                )));
            }
            if !planned.plan.is_feasible() {
                return Err(EngineError::Invalid(format!(
                    "{} instances of {name} cannot be placed; `service plan {name}` says why",
                    planned.plan.unplaced.len()
                )));
            }
            Ok((spec, planned.plan))
        })();
        let (spec, plan) = match prepared {
            Ok(p) => p,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let mut steps = Vec::new();
        let mut addresses_taken = crate::engine::networks::plan::network_name(&spec)
            .map(|n| self.addresses_on(&n))
            .unwrap_or_default();
        // What a deploy cut short left `creating` is created again where it was journaled:
        // the agent creates it, or says it has it.
        let unfinished = |p: &&crate::engine::services::placement::Placement| {
            p.action == Action::Keep
                && self.services.instances.values().any(|i| {
                    &i.service == name
                        && i.app == p.app
                        && i.index == p.index
                        && i.state == InstanceState::Creating
                })
        };
        for p in plan
            .placements
            .iter()
            .filter(|p| p.action == Action::Create || unfinished(p))
        {
            let Some(app) = spec.application(&p.app) else {
                continue;
            };
            let vm = match instance_vm_name(name, &p.app, p.index) {
                Ok(vm) => vm,
                Err(e) => {
                    let _ = reply.send(Err(EngineError::Invalid(e)));
                    return;
                }
            };
            // A VM of that name that no instance accounts for is someone else's.
            if p.action == Action::Create
                && self
                    .fleet
                    .hosts
                    .get(&p.host)
                    .is_some_and(|h| h.view.vm(&vm).is_some())
            {
                let _ = reply.send(Err(EngineError::Invalid(format!(
                    "host {} already has a VM named {vm} that is not part of service {name}: adopt it (service adopt {name} --app {} {}/{vm}) or remove it",
                    p.host, p.app, p.host
                ))));
                return;
            }
            let key = crate::engine::records::InstanceKey {
                service: name.clone(),
                app: p.app.clone(),
                index: p.index,
            };
            let address = match self.address_for(&spec, &key, &mut addresses_taken) {
                Ok(address) => address,
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return;
                }
            };
            let instance = InstanceRecord {
                service: name.clone(),
                app: p.app.clone(),
                index: p.index,
                host: p.host.clone(),
                vm: vm.clone(),
                state: InstanceState::Creating,
                runtime: app.runtime,
                adopted: false,
                address,
            };
            let image = match &app.image {
                None => None,
                Some(image) => {
                    let user_data = match self.instance_user_data(&instance, false) {
                        StartInputs::Ready(text) => text,
                        StartInputs::Waiting(why) => {
                            let _ = reply.send(Err(EngineError::Invalid(why)));
                            return;
                        }
                        StartInputs::Refused(e) => {
                            let _ = reply.send(Err(e));
                            return;
                        }
                    };
                    Some(ImageBoot {
                        image: image.clone(),
                        disk: ImageDisk {
                            disk_gib: app.disk_gib,
                            firmware: Default::default(),
                        },
                        user_data,
                    })
                }
            };
            let nic = instance.address.as_ref().and_then(|a| self.instance_nic(a));
            steps.push(Step::Create {
                nic,
                spec: VmSpec {
                    name: vm,
                    template: app.template.clone(),
                    vcpus: Some(app.vcpus),
                    memory_mib: Some(app.memory_mib),
                },
                instance,
                image,
            });
        }
        for removal in &plan.removals {
            if let Some(instance) = self
                .services
                .instances
                .values()
                .find(|i| &i.service == name && i.app == removal.app && i.index == removal.index)
                .cloned()
            {
                steps.push(Step::Remove { instance });
            }
        }
        self.begin(name, Operation::Deploying, steps, reply);
    }

    pub(in crate::engine) fn start_service(
        &mut self,
        name: &ServiceName,
        reply: Reply<OperationReport>,
    ) {
        self.in_order(name, Operation::Starting, reply, |app, instance| {
            Step::Start {
                instance,
                probe: probe_of(&app.readiness),
                depends_on: app.depends_on.clone(),
            }
        });
    }

    pub(in crate::engine) fn stop_service(
        &mut self,
        name: &ServiceName,
        reply: Reply<OperationReport>,
    ) {
        self.in_order(name, Operation::Stopping, reply, |_, instance| Step::Stop {
            instance,
        });
    }

    /// Runs one step per created instance, application by application: in start order to
    /// start, in reverse to stop.
    fn in_order(
        &mut self,
        name: &ServiceName,
        operation: Operation,
        reply: Reply<OperationReport>,
        step: impl Fn(&dunes_shared::service::ApplicationSpec, InstanceRecord) -> Step,
    ) {
        self.in_order_of(name, operation, reply, |_| true, step);
    }

    /// Starts the instances of `name` named in `only` (`APP-INDEX`) that are not running, in
    /// start order.
    pub(in crate::engine) fn start_stopped(
        &mut self,
        name: &ServiceName,
        only: Vec<String>,
        reply: Reply<OperationReport>,
    ) {
        let running: Vec<crate::engine::records::InstanceKey> = self
            .services
            .instances_of(name)
            .into_iter()
            .filter(|i| {
                self.fleet
                    .hosts
                    .get(&i.host)
                    .and_then(|h| h.view.vm(&i.vm))
                    .is_some_and(|v| v.state == VmState::Running)
            })
            .map(|i| i.key())
            .collect();
        self.in_order_of(
            name,
            Operation::Starting,
            reply,
            |i| !running.contains(&i.key()) && only.contains(&format!("{}-{}", i.app, i.index)),
            |app, instance| Step::Start {
                instance,
                probe: probe_of(&app.readiness),
                depends_on: app.depends_on.clone(),
            },
        );
    }

    fn in_order_of(
        &mut self,
        name: &ServiceName,
        operation: Operation,
        reply: Reply<OperationReport>,
        only: impl Fn(&InstanceRecord) -> bool,
        step: impl Fn(&dunes_shared::service::ApplicationSpec, InstanceRecord) -> Step,
    ) {
        let steps = self.readable_spec(name).and_then(|spec| {
            self.not_busy(name)?;
            let mut order = spec.start_order().unwrap_or_default();
            if operation == Operation::Stopping {
                order.reverse();
            }
            let instances = self.services.instances_of(name);
            Ok(order
                .iter()
                .flat_map(|app| {
                    instances
                        .iter()
                        .filter(|i| {
                            i.app == app.name && i.state == InstanceState::Created && only(i)
                        })
                        .map(|i| step(app, i.clone()))
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>())
        });
        match steps {
            Ok(steps) => self.begin(name, operation, steps, reply),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Removes every instance (forced off, VM and disks deleted), then the definition.
    pub(in crate::engine) fn delete_service(
        &mut self,
        name: &ServiceName,
        reply: Reply<OperationReport>,
    ) {
        if let Err(e) = self
            .services
            .entry(name)
            .and_then(|_| self.not_busy(name))
            .and_then(|_| self.not_connected_to(name))
        {
            let _ = reply.send(Err(e));
            return;
        }
        let steps = self
            .services
            .instances_of(name)
            .into_iter()
            .map(|instance| Step::Remove { instance })
            .collect();
        self.begin(name, Operation::Deleting, steps, reply);
    }

    /// Makes VM `vm` on `host` an instance of application `app` of service `name`: the lowest
    /// free index of the application, counted from then on like a deployed instance.
    pub(in crate::engine) fn adopt_vm(
        &mut self,
        name: &ServiceName,
        app: &AppName,
        host: &HostId,
        vm: &VmName,
        reply: Reply<InstanceRecord>,
    ) {
        let adopted = (|| {
            let spec = self.readable_spec(name)?;
            self.not_busy(name)?;
            let app_spec = spec.application(app).ok_or_else(|| {
                EngineError::Invalid(format!("service {name} has no application {app}"))
            })?;
            if spec.network.is_some() {
                return Err(EngineError::Invalid(format!(
                    "service {name} has a network, which a VM made elsewhere is not on: deploy its instances instead"
                )));
            }
            let status = self
                .fleet
                .hosts
                .get(host)
                .ok_or_else(|| EngineError::Invalid(format!("host {host} is not in the fleet")))?
                .view
                .vm(vm)
                .ok_or_else(|| EngineError::Invalid(format!("host {host} has no VM {vm}")))?;
            if status.runtime != app_spec.runtime {
                return Err(EngineError::Invalid(format!(
                    "{vm} runs on the {} runtime; application {app} needs {}",
                    status.runtime.as_str(),
                    app_spec.runtime.as_str()
                )));
            }
            if let Some(i) = self
                .services
                .instances
                .values()
                .find(|i| &i.host == host && &i.vm == vm)
            {
                return Err(EngineError::Invalid(format!(
                    "{vm} is already instance {}-{} of service {}",
                    i.app, i.index, i.service
                )));
            }
            let used: std::collections::BTreeSet<u32> = self
                .services
                .instances
                .values()
                .filter(|i| &i.service == name && &i.app == app)
                .map(|i| i.index)
                .collect();
            let index = (0..).find(|n| !used.contains(n)).unwrap_or(0);
            Ok(InstanceRecord {
                service: name.clone(),
                app: app.clone(),
                index,
                host: host.clone(),
                vm: vm.clone(),
                state: InstanceState::Created,
                runtime: status.runtime,
                adopted: true,
                address: None,
            })
        })();
        match adopted {
            Ok(instance) => {
                self.store.put_instance(&instance);
                self.services
                    .instances
                    .insert(instance.key(), instance.clone());
                self.services.dirty = true;
                self.log(
                    Level::Info,
                    Some(host.clone()),
                    format!(
                        "{vm} adopted into service {name} as {app}-{}",
                        instance.index
                    ),
                );
                self.reply_after_commit(reply, instance);
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    pub(in crate::engine) fn not_busy(&self, name: &ServiceName) -> Result<(), EngineError> {
        match self.services.entry(name)?.busy {
            Some(op) => Err(EngineError::Invalid(format!(
                "service {name} is busy ({}); try again when it is done",
                match op {
                    Operation::Deploying => "deploying",
                    Operation::Starting => "starting",
                    Operation::Stopping => "stopping",
                    Operation::Deleting => "deleting",
                }
            ))),
            None => Ok(()),
        }
    }

    /// Marks the service busy, writes every step's instance before its side effect, and once
    /// that is committed runs the steps in order.
    fn begin(
        &mut self,
        name: &ServiceName,
        operation: Operation,
        steps: Vec<Step>,
        reply: Reply<OperationReport>,
    ) {
        if let Some(entry) = self.services.entries.get_mut(name) {
            entry.busy = Some(operation);
            match operation {
                Operation::Starting => entry.started = Some(true),
                Operation::Stopping => entry.started = Some(false),
                _ => {}
            }
        }
        self.services.dirty = true;
        for step in &steps {
            match step {
                Step::Create { instance, .. } => {
                    self.store.put_instance(instance);
                    self.services
                        .instances
                        .insert(instance.key(), instance.clone());
                }
                Step::Remove { instance } => {
                    let removing = InstanceRecord {
                        state: InstanceState::Removing,
                        ..instance.clone()
                    };
                    self.store.put_instance(&removing);
                    self.services.instances.insert(removing.key(), removing);
                }
                Step::Start { .. } | Step::Stop { .. } => {}
            }
        }
        let what = match operation {
            Operation::Deploying => "deploying",
            Operation::Starting => "starting",
            Operation::Stopping => "stopping",
            Operation::Deleting => "deleting",
        };
        self.log(
            Level::Info,
            None,
            format!("service {name}: {what}, {} steps", steps.len()),
        );
        let (internal, service) = (self.internal_tx.clone(), name.clone());
        let runtime = tokio::runtime::Handle::current();
        self.store
            .after_commit(Box::new(move |committed| match committed {
                Ok(()) => {
                    runtime.spawn(run_steps(service, operation, steps, internal, reply));
                }
                Err(e) => {
                    let _ = reply.send(Err(EngineError::Store(e)));
                    // The service stays marked busy until the engine restarts: its journal
                    // could not be written, so nothing was done and nothing may be assumed.
                }
            }));
    }

    /// The outcome of one step, applied to the engine's state.
    pub(in crate::engine) fn step_done(
        &mut self,
        step: &Step,
        result: Result<Option<VmStatus>, EngineError>,
    ) -> Result<String, String> {
        match (step, result) {
            (Step::Create { instance, .. }, Ok(vm)) => {
                if let Some(vm) = vm {
                    self.apply_vm(&instance.host, &vm);
                }
                let created = InstanceRecord {
                    state: InstanceState::Created,
                    ..instance.clone()
                };
                self.store.put_instance(&created);
                self.services.instances.insert(created.key(), created);
                Ok("created".into())
            }
            (Step::Create { instance, .. }, Err(e)) => {
                // The VM may exist from a deploy cut short (a host that went away may still
                // have carried out the create): then it is the instance.
                let exists = e.is_exists()
                    || self
                        .fleet
                        .hosts
                        .get(&instance.host)
                        .is_some_and(|h| h.view.vm(&instance.vm).is_some());
                if exists {
                    let created = InstanceRecord {
                        state: InstanceState::Created,
                        ..instance.clone()
                    };
                    self.store.put_instance(&created);
                    self.services.instances.insert(created.key(), created);
                    Ok("found, created before".into())
                } else if matches!(
                    e,
                    EngineError::Unreachable(_) | EngineError::NoAnswer { .. }
                ) {
                    // The host went away with the request: it may have created the VM. The
                    // journal keeps the instance as `creating`, and the next deploy creates
                    // it or finds it.
                    Err(format!("{e}; it stays `creating` until the next deploy"))
                } else {
                    self.store.delete_instance(instance);
                    self.services.instances.remove(&instance.key());
                    Err(e.to_string())
                }
            }
            (Step::Remove { instance }, Ok(_)) => {
                self.remove_vm(&instance.host, &instance.vm);
                self.store.delete_instance(instance);
                self.services.instances.remove(&instance.key());
                Ok("removed".into())
            }
            (Step::Remove { .. }, Err(e)) => Err(e.to_string()),
            (
                Step::Start {
                    instance, probe, ..
                },
                Ok(vm),
            ) => {
                if let Some(vm) = vm {
                    self.apply_vm(&instance.host, &vm);
                }
                if probe.kind != ProbeKind::Running {
                    // It passed its check just now: ready until the next check says otherwise.
                    self.services.readiness.replace(
                        instance.key(),
                        crate::engine::services::readiness::LastCheck {
                            ready: true,
                            detail: "passed its check when it started".into(),
                        },
                    );
                }
                Ok(match probe.kind {
                    ProbeKind::Running => "running".into(),
                    _ => "running, ready".into(),
                })
            }
            (Step::Stop { instance }, Ok(vm)) => {
                let state = vm.as_ref().map_or("", |v| v.state.as_str()).to_string();
                if let Some(vm) = vm {
                    self.apply_vm(&instance.host, &vm);
                }
                Ok(state)
            }
            (Step::Start { .. } | Step::Stop { .. }, Err(e)) => Err(e.to_string()),
        }
    }

    pub(in crate::engine) fn end_operation(
        &mut self,
        name: &ServiceName,
        operation: Operation,
        report: OperationReport,
        reply: Reply<OperationReport>,
    ) {
        if let Some(entry) = self.services.entries.get_mut(name) {
            entry.busy = None;
        }
        if operation == Operation::Deleting && report.failed.is_empty() {
            self.services.entries.remove(name);
            self.store.delete_service(name);
            self.forget_unused_networks();
        }
        self.services.dirty = true;
        let what = match operation {
            Operation::Deploying => "deployed",
            Operation::Starting => "started",
            Operation::Stopping => "stopped",
            Operation::Deleting => "deleted",
        };
        let (level, message) = if report.failed.is_empty() {
            (Level::Info, format!("service {name} {what}"))
        } else {
            (
                Level::Error,
                format!(
                    "service {name} not fully {what}: {}",
                    report
                        .failed
                        .iter()
                        .map(|(i, why)| format!("{i}: {why}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            )
        };
        self.log(level, None, message);
        self.reply_after_commit(reply, report);
    }

    /// The services as the snapshot shows them, with the VM states their hosts report.
    pub(in crate::engine) fn service_views(&self) -> Vec<Arc<ServiceView>> {
        self.services
            .entries
            .values()
            .map(|entry| {
                let instances: Vec<InstanceView> = self
                    .services
                    .instances
                    .values()
                    .filter(|i| i.service == entry.record.name)
                    .map(|i| {
                        let host = self.fleet.hosts.get(&i.host);
                        let vm_state = host.and_then(|h| h.view.vm(&i.vm)).map(|v| v.state);
                        let cost_per_hour =
                            match (&entry.spec, host.and_then(|h| h.view.inventory())) {
                                (Ok(spec), Some(inv)) => {
                                    spec.application(&i.app).map_or(0.0, |a| {
                                        crate::engine::services::placement::instance_cost_per_hour(
                                            a,
                                            &inv.prices,
                                        )
                                    })
                                }
                                _ => 0.0,
                            };
                        let running = i.state == InstanceState::Created
                            && vm_state == Some(VmState::Running)
                            && host.is_some_and(|h| h.view.link == LinkState::Online);
                        // Beyond "running", an instance is ready when its last check said so.
                        let checked = entry
                            .spec
                            .as_ref()
                            .ok()
                            .and_then(|s| s.application(&i.app))
                            .is_some_and(|a| !matches!(a.readiness, Readiness::Running));
                        let (ready, ready_detail) = match (running, checked) {
                            (false, _) => (false, None),
                            (true, false) => (true, None),
                            (true, true) => match self.services.readiness.get(&i.key()) {
                                Some(c) => (c.ready, Some(c.detail.clone())),
                                None => (false, Some("not checked yet".to_string())),
                            },
                        };
                        let guest_apps = entry
                            .spec
                            .as_ref()
                            .ok()
                            .and_then(|s| s.application(&i.app))
                            .map(|a| {
                                crate::engine::services::guest_apps::guest_app_views(
                                    &a.guest_apps,
                                    running,
                                    self.services.guest_looks.get(&i.key()),
                                )
                            })
                            .unwrap_or_default();
                        InstanceView {
                            record: i.clone(),
                            vm_state,
                            ready,
                            ready_detail,
                            cost_per_hour,
                            guest_apps,
                            metric: self.services.metric_reads.get(&i.key()).cloned(),
                        }
                    })
                    .collect();
                let status = match &entry.spec {
                    Ok(spec) => service_status(
                        &self.autoscaling.scaled(&entry.record.name, spec.clone()),
                        &instances,
                        entry.busy,
                        entry.started,
                    ),
                    Err(_) => ServiceStatus::Unreadable,
                };
                Arc::new(ServiceView {
                    record: entry.record.clone(),
                    spec: entry.spec.clone(),
                    instances,
                    status,
                })
            })
            .collect()
    }
}

/// Runs an operation's steps in order, each one an agent call whose outcome the engine takes
/// in before the next; then ends the operation.
async fn run_steps(
    service: ServiceName,
    operation: Operation,
    steps: Vec<Step>,
    internal: mpsc::Sender<Internal>,
    reply: Reply<OperationReport>,
) {
    let mut report = OperationReport::default();
    // Applications with an instance that did not become ready: what needs them waits.
    let mut not_ready: std::collections::BTreeSet<AppName> = Default::default();
    for step in steps {
        if let Step::Start {
            instance,
            depends_on,
            ..
        } = &step
            && let Some(missing) = depends_on.iter().find(|d| not_ready.contains(*d))
        {
            not_ready.insert(instance.app.clone());
            report.failed.push((
                format!("{}-{}", instance.app, instance.index),
                format!("not started: {missing} is not ready"),
            ));
            continue;
        }
        let (host, instance_name) = match &step {
            Step::Create { instance, .. }
            | Step::Remove { instance }
            | Step::Start { instance, .. }
            | Step::Stop { instance } => (
                instance.host.clone(),
                format!("{}-{}", instance.app, instance.index),
            ),
        };
        let client = ask(&internal, |answer| Internal::ClientFor {
            host: host.clone(),
            answer,
        })
        .await;
        let user_data = match &step {
            Step::Start { instance, .. } => match start_inputs(&internal, instance).await {
                None => return,
                Some(inputs) => inputs,
            },
            _ => Ok(None),
        };
        let result = match (client, user_data) {
            (None, _) => return,
            (Some(Err(e)), _) | (_, Err(e)) => Err(e),
            (Some(Ok(client)), Ok(user_data)) => {
                call_step(&client, &internal, &step, user_data).await
            }
        };
        let started_app = match &step {
            Step::Start { instance, .. } => Some(instance.app.clone()),
            _ => None,
        };
        let Some(outcome) = ask(&internal, |answer| Internal::StepDone {
            step,
            result,
            answer,
        })
        .await
        else {
            return;
        };
        if let (Some(app), Err(_)) = (started_app, &outcome) {
            not_ready.insert(app);
        }
        let line = match &outcome {
            Ok(what) => format!("service {service}: {instance_name} on {host}: {what}"),
            Err(why) => format!("service {service}: {instance_name} on {host} failed: {why}"),
        };
        let level = if outcome.is_ok() {
            Level::Info
        } else {
            Level::Error
        };
        let _ = internal
            .send(Internal::Log {
                level,
                host: Some(host.clone()),
                message: line,
            })
            .await;
        match outcome {
            Ok(what) => report.done.push((instance_name, host, what)),
            Err(why) => report.failed.push((instance_name, why)),
        }
    }
    let _ = internal
        .send(Internal::OperationEnded {
            service,
            operation,
            report,
            reply,
        })
        .await;
}

/// How long an instance gets to pass its readiness check after it started.
pub const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
const READY_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Asks the agent until the instance passes its check, within [`READY_TIMEOUT`].
pub(in crate::engine) async fn wait_until_ready(
    client: &AgentClient,
    instance: &InstanceRecord,
    probe: &ReadinessProbe,
) -> Result<(), EngineError> {
    let began = tokio::time::Instant::now();
    loop {
        let answer = client
            .call(CheckReady {
                name: instance.vm.clone(),
                probe: probe.clone(),
                runtime: instance.runtime,
            })
            .await?;
        if answer.ready {
            return Ok(());
        }
        if began.elapsed() >= READY_TIMEOUT {
            return Err(EngineError::agent_failed(format!(
                "not ready after {} s: {}",
                READY_TIMEOUT.as_secs(),
                answer.detail
            )));
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

/// Asks the engine the question `message` carries and waits for its answer; `None` when the
/// engine is gone.
async fn ask<T: Send + 'static>(
    internal: &mpsc::Sender<Internal>,
    message: impl FnOnce(oneshot::Sender<T>) -> Internal,
) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    internal.send(message(tx)).await.ok()?;
    rx.await.ok()
}

/// The user-data an instance's start writes first, once every dependency it names has
/// reported its address (within [`ADDRESS_WAIT`]); `None` when the engine is gone.
async fn start_inputs(
    internal: &mpsc::Sender<Internal>,
    instance: &InstanceRecord,
) -> Option<Result<Option<String>, EngineError>> {
    let began = tokio::time::Instant::now();
    loop {
        let inputs = ask(internal, |answer| Internal::StartInputs {
            instance: instance.clone(),
            answer,
        })
        .await?;
        match inputs {
            StartInputs::Ready(user_data) => return Some(Ok(user_data)),
            StartInputs::Refused(e) => return Some(Err(e)),
            StartInputs::Waiting(why) if began.elapsed() >= ADDRESS_WAIT => {
                return Some(Err(EngineError::Invalid(format!(
                    "not started after {} s: {why}",
                    ADDRESS_WAIT.as_secs()
                ))));
            }
            StartInputs::Waiting(_) => tokio::time::sleep(READY_POLL).await,
        }
    }
}

async fn call_step(
    client: &AgentClient,
    internal: &mpsc::Sender<Internal>,
    step: &Step,
    user_data: Option<String>,
) -> Result<Option<VmStatus>, EngineError> {
    match step {
        Step::Create {
            spec,
            instance,
            image: Some(boot),
            nic,
        } => {
            let created = ask(internal, |reply| {
                Internal::CreateVmFromImage(crate::engine::images::CreateFromImage {
                    host: instance.host.clone(),
                    spec: spec.clone(),
                    image: boot.image.clone(),
                    disk: boot.disk,
                    user_data: boot.user_data.clone(),
                    start: false,
                    network: nic.clone(),
                    reply,
                })
            })
            .await
            .ok_or(EngineError::Stopped)?;
            created.map(Some)
        }
        Step::Create {
            spec,
            instance,
            image: None,
            nic,
        } => client
            .call(CreateVm {
                spec: spec.clone(),
                start: false,
                runtime: instance.runtime,
                image_disk: None,
                cloud_init: None,
                network: nic.clone(),
            })
            .await
            .map(Some),
        Step::Remove { instance } => {
            let stopped = client
                .call(StopVm {
                    name: instance.vm.clone(),
                    force: true,
                    timeout_secs: 0,
                    runtime: instance.runtime,
                })
                .await;
            match stopped {
                // Already gone: nothing left to remove.
                Err(e) if e.is_not_found() => return Ok(None),
                Err(e) => return Err(e),
                Ok(_) => {}
            }
            client
                .call(DeleteVm {
                    name: instance.vm.clone(),
                    runtime: instance.runtime,
                })
                .await
                .map(|()| None)
        }
        Step::Start {
            instance, probe, ..
        } => {
            if user_data.is_some() && !client.peer.offers(features::START_USER_DATA) {
                return Err(EngineError::Invalid(format!(
                    "host {}'s agent cannot write user-data before a start: update it",
                    instance.host
                )));
            }
            let vm = client
                .call(StartVm {
                    name: instance.vm.clone(),
                    runtime: instance.runtime,
                    user_data,
                })
                .await?;
            wait_until_ready(client, instance, probe).await?;
            Ok(Some(vm))
        }
        Step::Stop { instance } => client
            .call(StopVm {
                name: instance.vm.clone(),
                force: false,
                timeout_secs: 0,
                runtime: instance.runtime,
            })
            .await
            .map(Some),
    }
}
