//! What the services domain holds: each service's definition and its instances, what their
//! running instances last answered, and what was last published of them.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use dunes_shared::{
    model::{AppName, ImageDisk, ImageName, ServiceName, VmSpec},
    protocol::{GuestAppsReply, MetricReply, ReadinessProbe},
    service::ServiceSpec,
};

use crate::engine::{
    EngineError, ServiceView,
    records::{InstanceKey, InstanceRecord, ServiceRecord},
    services::{
        guest_apps::GuestLook, readiness::LastCheck, service_file::parse_service_file,
        views::Operation,
    },
};

/// Services: their definitions, their instances, what their running instances last
/// answered, and what was last published of them.
pub(in crate::engine) struct ServicesState {
    pub(in crate::engine) entries: BTreeMap<ServiceName, ServiceEntry>,
    /// Every service's instances.
    pub(in crate::engine) instances: BTreeMap<InstanceKey, InstanceRecord>,
    /// Something changed that their published views show.
    pub(in crate::engine) dirty: bool,
    pub(in crate::engine) published: Arc<Vec<Arc<ServiceView>>>,
    /// The last readiness answer of each running instance.
    pub(in crate::engine) readiness: Probed<LastCheck>,
    /// The last look at each running instance's guest applications.
    pub(in crate::engine) guest_looks: Probed<GuestLook>,
    /// The last read of each running instance's application metric.
    pub(in crate::engine) metric_reads: Probed<Result<f64, String>>,
}

impl Default for ServicesState {
    fn default() -> Self {
        ServicesState {
            entries: BTreeMap::new(),
            instances: BTreeMap::new(),
            // Published once at start, empty or not.
            dirty: true,
            published: Arc::new(Vec::new()),
            readiness: Default::default(),
            guest_looks: Default::default(),
            metric_reads: Default::default(),
        }
    }
}

/// A service as the engine keeps it.
#[derive(Debug, Clone)]
pub(in crate::engine) struct ServiceEntry {
    pub record: ServiceRecord,
    pub spec: Result<ServiceSpec, String>,
    pub busy: Option<Operation>,
    /// Whether the operator last started it (`Some(true)`) or stopped it; `None` before
    /// either since the console started. Only a started service whose instances are off is
    /// down; otherwise it is stopped.
    pub started: Option<bool>,
}

impl ServiceEntry {
    pub(in crate::engine) fn new(record: ServiceRecord) -> Self {
        let spec = parse_service_file(&record.source).map_err(|e| e.to_string());
        ServiceEntry {
            record,
            spec,
            busy: None,
            started: None,
        }
    }
}

/// How an instance's VM is made from a library image.
#[derive(Debug, Clone)]
pub(in crate::engine) struct ImageBoot {
    pub image: ImageName,
    pub disk: ImageDisk,
    pub user_data: Option<String>,
}

/// What an instance's start waits for: the user-data to write into its seed first.
#[derive(Debug)]
pub(in crate::engine) enum StartInputs {
    /// Its application has no user-data (`None`), or this is it, filled in.
    Ready(Option<String>),
    /// A dependency's address is not known yet; asked again shortly.
    Waiting(String),
    Refused(EngineError),
}

/// One agent call of an operation.
pub(in crate::engine) enum Step {
    Create {
        instance: InstanceRecord,
        spec: VmSpec,
        /// For an application made from a library image: the image, the disk, and the
        /// user-data its seed starts with (written again each time the service starts it).
        image: Option<ImageBoot>,
        /// Its place on its service's network, when the service has one.
        nic: Option<dunes_shared::network::InstanceNic>,
    },
    Remove {
        instance: InstanceRecord,
    },
    Start {
        instance: InstanceRecord,
        probe: ReadinessProbe,
        depends_on: Vec<AppName>,
    },
    Stop {
        instance: InstanceRecord,
    },
}

/// What one kind of probe last heard from each running instance, and whom it is asking.
#[derive(Debug)]
pub(in crate::engine) struct Probed<T> {
    last: BTreeMap<InstanceKey, T>,
    asking: BTreeSet<InstanceKey>,
}

impl<T> Default for Probed<T> {
    fn default() -> Self {
        Probed {
            last: BTreeMap::new(),
            asking: BTreeSet::new(),
        }
    }
}

impl<T> Probed<T> {
    pub(in crate::engine) fn get(&self, key: &InstanceKey) -> Option<&T> {
        self.last.get(key)
    }

    /// Keeps `value`, answering what it replaces.
    pub(in crate::engine) fn replace(&mut self, key: InstanceKey, value: T) -> Option<T> {
        self.last.insert(key, value)
    }

    /// Marks a question to the instance as under way; answers false when one already is.
    pub(in crate::engine) fn start_asking(&mut self, key: InstanceKey) -> bool {
        self.asking.insert(key)
    }

    pub(in crate::engine) fn done_asking(&mut self, key: &InstanceKey) {
        self.asking.remove(key);
    }

    /// Forgets an instance's answer; answers whether there was one.
    pub(in crate::engine) fn forget(&mut self, key: &InstanceKey) -> bool {
        self.last.remove(key).is_some()
    }
}

impl<T: PartialEq> Probed<T> {
    /// Keeps `value`; answers whether it differs from what was kept.
    pub(in crate::engine) fn keep(&mut self, key: InstanceKey, value: T) -> bool {
        match self.last.get(&key) {
            Some(kept) if *kept == value => false,
            _ => {
                self.last.insert(key, value);
                true
            }
        }
    }
}

/// An answer on its way back to the engine.
#[derive(Debug)]
pub(in crate::engine) enum ProbeAnswer {
    Readiness(InstanceKey, LastCheck),
    GuestApps(InstanceKey, Result<GuestAppsReply, String>),
    AppMetric(InstanceKey, Result<MetricReply, String>),
}

impl ServicesState {
    pub(in crate::engine) fn entry(
        &self,
        name: &ServiceName,
    ) -> Result<&ServiceEntry, EngineError> {
        self.entries
            .get(name)
            .ok_or_else(|| EngineError::Invalid(format!("service {name} does not exist")))
    }

    pub(in crate::engine) fn instances_of(&self, name: &ServiceName) -> Vec<InstanceRecord> {
        self.instances
            .values()
            .filter(|i| &i.service == name)
            .cloned()
            .collect()
    }

    /// Services and instances loaded from the store at start. An operation the last run cut
    /// short is left as its journal says: the next deploy finds what exists.
    pub(in crate::engine) fn load(
        &mut self,
        records: Vec<ServiceRecord>,
        instances: Vec<InstanceRecord>,
    ) {
        let mut services = BTreeMap::new();
        for record in records {
            let entry = ServiceEntry::new(record);
            if let Err(e) = &entry.spec {
                tracing::warn!("service {} no longer reads: {e}", entry.record.name);
            }
            services.insert(entry.record.name.clone(), entry);
        }
        self.entries = services;
        self.instances = instances.into_iter().map(|i| (i.key(), i)).collect();
        self.dirty = true;
    }
}
