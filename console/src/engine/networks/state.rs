//! What the networks domain holds: every network a defined service declares.

use std::{collections::BTreeMap, sync::Arc};

use dunes_shared::model::NetworkName;
use serde::{Deserialize, Serialize};

use super::views::NetworkView;

/// A service network as the console keeps it (and its store holds it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub name: NetworkName,
    pub subnet: ipnet::Ipv4Net,
    /// Its VXLAN network identifier between hosts.
    pub vni: u32,
    pub created_ms: u64,
    /// Each host's own address on the network, from the top of the subnet down, kept while
    /// the host is part of it.
    #[serde(default)]
    pub hosts: std::collections::BTreeMap<dunes_shared::model::HostId, std::net::Ipv4Addr>,
}

#[derive(Default)]
pub(in crate::engine) struct NetworksState {
    pub(in crate::engine) records: BTreeMap<NetworkName, NetworkRecord>,
    /// Something changed that the published views show.
    pub(in crate::engine) dirty: bool,
    pub(in crate::engine) published: Arc<Vec<NetworkView>>,
    /// What the hosts are told may have changed: told after this publish.
    pub(in crate::engine) tell: bool,
    /// The last refusal of each host's agent, said once in the event log.
    pub(in crate::engine) refusals: BTreeMap<dunes_shared::model::HostId, String>,
}
