//! Operators: people and programs that drive the engine from elsewhere, each with a
//! certificate the console's CA signed for their key and a role. `access` decides what a
//! role may do (pure); the driver here adds and revokes them and publishes who they are to
//! the operator endpoint.

pub mod access;
mod driver;

use std::{collections::BTreeMap, sync::Arc};

use dunes_shared::model::OperatorName;
use tokio::sync::watch;

pub use access::{OperatorRecord, Role};

/// The operators, owned by the engine; every change is published to the endpoint, which
/// ends the sessions of a revoked operator.
#[derive(Debug)]
pub(in crate::engine) struct OperatorsState {
    records: BTreeMap<OperatorName, OperatorRecord>,
    published: watch::Sender<Arc<Vec<OperatorRecord>>>,
}

impl OperatorsState {
    pub(in crate::engine) fn new(
        loaded: Vec<OperatorRecord>,
    ) -> (OperatorsState, watch::Receiver<Arc<Vec<OperatorRecord>>>) {
        let records: BTreeMap<_, _> = loaded.into_iter().map(|r| (r.name.clone(), r)).collect();
        let (published, rx) = watch::channel(Arc::new(records.values().cloned().collect()));
        (OperatorsState { records, published }, rx)
    }

    fn list(&self) -> Arc<Vec<OperatorRecord>> {
        Arc::new(self.records.values().cloned().collect())
    }
}

/// An operator's new certificate.
#[derive(Debug, Clone)]
pub struct OperatorIssued {
    pub record: OperatorRecord,
    pub cert_der: Vec<u8>,
    pub ca_der: Vec<u8>,
}
