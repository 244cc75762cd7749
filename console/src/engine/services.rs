//! Services in the engine: defined from the operator's file, kept in the store, planned
//! against the fleet as the engine sees it now.

use std::{
    collections::BTreeMap,
    hash::{DefaultHasher, Hasher},
    sync::Arc,
};

use dunes_shared::{model::ServiceName, service::ServiceSpec};

use super::{
    EngineError, LinkState, Reply,
    actor::{Actor, now_ms},
    placement::{Existing, HostOffer, Plan, Resources, place_instances},
    service_file::parse_service_file,
    snapshot::HostView,
    store::{Level, ServiceRecord},
};

/// A service as the snapshot shows it.
#[derive(Debug, Clone)]
pub struct ServiceView {
    pub record: ServiceRecord,
    /// `Err` when the stored file no longer reads (a release that changed the format).
    pub spec: Result<ServiceSpec, String>,
}

impl ServiceView {
    fn new(record: ServiceRecord) -> Self {
        let spec = parse_service_file(&record.source).map_err(|e| e.to_string());
        ServiceView { record, spec }
    }

    pub fn name(&self) -> &ServiceName {
        &self.record.name
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
        site: inv.site.name.clone(),
        security_level: inv.security_level,
        prices: inv.prices,
        link_bandwidth_mbps: inv.site.link_bandwidth_mbps,
        runtimes: inv.runtimes.iter().map(|r| r.kind).collect(),
        interpreters: Vec::new(),
        free: Resources {
            vcpus: inv.cpus.saturating_sub(vcpus),
            memory_mib: inv.memory_mib.saturating_sub(memory_mib),
            storage_mib: storage_free_mib,
        },
    })
}

/// A digest of what a plan depends on.
pub fn fingerprint(spec: &ServiceSpec, hosts: &[HostOffer], existing: &[Existing]) -> String {
    let mut hasher = DefaultHasher::new();
    hasher.write(format!("{spec:?}|{hosts:?}|{existing:?}").as_bytes());
    format!("{:016x}", hasher.finish())
}

impl Actor {
    pub(super) fn define_service(
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
        let existed = self.services.contains_key(&name);
        if existed && !replace {
            let _ = reply.send(Err(EngineError::Invalid(format!(
                "service {name} exists already; replace it to change it"
            ))));
            return;
        }
        let record = ServiceRecord {
            name: name.clone(),
            source,
            defined_at_ms: now_ms(),
        };
        self.store.put_service(&record);
        self.services
            .insert(name.clone(), Arc::new(ServiceView::new(record)));
        self.services_dirty = true;
        let verb = if existed { "changed" } else { "defined" };
        self.log(Level::Info, None, format!("service {name} {verb}"));
        self.reply_after_commit(reply, name);
    }

    pub(super) fn delete_service(&mut self, name: &ServiceName, reply: Reply<()>) {
        if self.services.remove(name).is_none() {
            let _ = reply.send(Err(EngineError::Invalid(format!(
                "service {name} does not exist"
            ))));
            return;
        }
        self.store.delete_service(name);
        self.services_dirty = true;
        self.log(Level::Info, None, format!("service {name} deleted"));
        self.reply_after_commit(reply, ());
    }

    pub(super) fn plan_service(&self, name: &ServiceName) -> Result<ServicePlan, EngineError> {
        let view = self
            .services
            .get(name)
            .ok_or_else(|| EngineError::Invalid(format!("service {name} does not exist")))?;
        let spec = view
            .spec
            .as_ref()
            .map_err(|e| EngineError::Invalid(format!("service {name} no longer reads: {e}")))?;
        let mut hosts: Vec<HostOffer> = self
            .hosts
            .values()
            .filter_map(|e| host_offer(&e.view))
            .collect();
        hosts.sort_by(|a, b| a.id.cmp(&b.id));
        // Deployed instances are tracked once deploy exists; until then every plan starts
        // from nothing.
        let existing: Vec<Existing> = Vec::new();
        let plan = place_instances(spec, &hosts, &existing);
        Ok(ServicePlan {
            service: name.clone(),
            fingerprint: fingerprint(spec, &hosts, &existing),
            plan,
        })
    }

    /// Services loaded from the store at start.
    pub(super) fn load_services(&mut self, records: Vec<ServiceRecord>) {
        let mut services = BTreeMap::new();
        for record in records {
            let view = ServiceView::new(record);
            if let Err(e) = &view.spec {
                tracing::warn!("service {} no longer reads: {e}", view.name());
            }
            services.insert(view.name().clone(), Arc::new(view));
        }
        self.services = services;
        self.services_dirty = true;
    }
}
