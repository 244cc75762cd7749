//! What autoscaling holds: each application's rule, with the periods it measured.

use std::collections::BTreeMap;

use dunes_shared::{
    model::{AppName, ServiceName},
    service::ServiceSpec,
};

use crate::engine::store::AutoscaleRecord;

/// Autoscaling of applications, by `service/app`.
#[derive(Default)]
pub(in crate::engine) struct AutoscalingState {
    pub(in crate::engine) entries: BTreeMap<String, crate::engine::autoscale::AutoscaleEntry>,
}

/// An application's autoscaling as the engine holds it.
#[derive(Debug, Clone)]
pub(in crate::engine) struct AutoscaleEntry {
    pub record: AutoscaleRecord,
    /// Means of the last periods in a row, oldest first.
    pub(in crate::engine) recent: Vec<f64>,
    pub(in crate::engine) last_period_end: u64,
    pub(in crate::engine) measuring: bool,
    pub(in crate::engine) last_reason: Option<String>,
}

impl AutoscaleEntry {
    pub fn new(record: AutoscaleRecord) -> Self {
        AutoscaleEntry {
            record,
            recent: Vec::new(),
            last_period_end: 0,
            measuring: false,
            last_reason: None,
        }
    }
}

impl AutoscalingState {
    pub(in crate::engine) fn load(&mut self, records: Vec<AutoscaleRecord>) {
        self.entries = records
            .into_iter()
            .map(|r| (r.key(), AutoscaleEntry::new(r)))
            .collect();
    }

    /// A service's definition with the instance counts its rules set.
    pub(in crate::engine) fn scaled(
        &self,
        name: &ServiceName,
        mut spec: ServiceSpec,
    ) -> ServiceSpec {
        for app in &mut spec.applications {
            // A rule on the application, or on one inside its VMs (which scales the VMs).
            let entry = std::iter::once(&app.name)
                .chain(app.guest_apps.iter().map(|g| &g.name))
                .find_map(|a| self.entries.get(&key(name, a)));
            if let Some(entry) = entry {
                app.instances = entry.record.desired;
            }
        }
        spec
    }
}

pub(in crate::engine) fn key(service: &ServiceName, app: &AppName) -> String {
    format!("{service}/{app}")
}
