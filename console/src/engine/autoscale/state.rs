//! What autoscaling holds: each application's rule, with the periods it measured.

use std::collections::BTreeMap;

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
