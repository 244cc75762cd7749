//! Service networks as the snapshot shows them (and `ctl networks` prints them): made from
//! the networks' records and the services' published views, pure.

use std::{collections::BTreeSet, net::Ipv4Addr, sync::Arc};

use dunes_shared::{
    model::{AppName, HostId, NetworkName, ServiceName, VmName},
    network::{gateway, instance_dns_name},
};
use serde::{Deserialize, Serialize};

use super::state::NetworkRecord;
use crate::engine::ServiceView;

/// A service network: where it is, who is on it, what it publishes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkView {
    pub name: NetworkName,
    pub subnet: ipnet::Ipv4Net,
    /// Every host of the network answers this address (its gateway and resolver).
    pub gateway: Ipv4Addr,
    pub vni: u32,
    /// Services on it.
    pub services: Vec<ServiceName>,
    /// Services its services may open connections to.
    pub connect: Vec<ServiceName>,
    /// Hosts that hold its instances.
    pub hosts: Vec<HostId>,
    pub members: Vec<NetworkMemberView>,
    pub published: Vec<PublishedPortView>,
}

/// An instance on a network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkMemberView {
    pub service: ServiceName,
    pub app: AppName,
    pub index: u32,
    pub vm: VmName,
    pub host: HostId,
    pub address: Ipv4Addr,
    pub mac: String,
    /// `INDEX.APP.SERVICE.dunes`.
    pub dns_name: String,
    pub ready: bool,
}

/// A port published to the outside.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishedPortView {
    pub service: ServiceName,
    pub app: AppName,
    pub port: u16,
    pub host_port: u16,
    /// As the service file says it: `all`, `site:NAME` or `host:ID`.
    pub hosts: String,
}

/// Every network in `records`, with the instances of `services` on it.
pub fn network_views(
    records: impl IntoIterator<Item = NetworkRecord>,
    services: &[Arc<ServiceView>],
) -> Vec<NetworkView> {
    records
        .into_iter()
        .map(|record| {
            let on_it: Vec<&ServiceView> = services
                .iter()
                .map(|s| s.as_ref())
                .filter(|s| {
                    s.spec.as_ref().ok().is_some_and(|spec| {
                        super::plan::network_name(spec).as_ref() == Some(&record.name)
                    })
                })
                .collect();
            let mut members: Vec<NetworkMemberView> = on_it
                .iter()
                .flat_map(|s| &s.instances)
                .filter_map(|i| {
                    let address = i.record.address.as_ref()?;
                    (address.network == record.name).then(|| NetworkMemberView {
                        service: i.record.service.clone(),
                        app: i.record.app.clone(),
                        index: i.record.index,
                        vm: i.record.vm.clone(),
                        host: i.record.host.clone(),
                        address: address.ip,
                        mac: address.mac.clone(),
                        dns_name: instance_dns_name(
                            i.record.index,
                            &i.record.app,
                            &i.record.service,
                        ),
                        ready: i.ready,
                    })
                })
                .collect();
            members.sort_by_key(|m| m.address);
            let hosts: BTreeSet<HostId> = members.iter().map(|m| m.host.clone()).collect();
            let specs = on_it
                .iter()
                .filter_map(|s| Some((s.name(), s.spec.as_ref().ok()?.network.as_ref()?)));
            let mut connect = BTreeSet::new();
            let mut published = Vec::new();
            for (service, network) in specs {
                connect.extend(network.connect.iter().cloned());
                published.extend(network.publish.iter().map(|p| PublishedPortView {
                    service: service.clone(),
                    app: p.app.clone(),
                    port: p.port,
                    host_port: p.host_port,
                    hosts: p.hosts.to_string(),
                }));
            }
            NetworkView {
                gateway: gateway(record.subnet),
                name: record.name,
                subnet: record.subnet,
                vni: record.vni,
                services: on_it.iter().map(|s| s.name().clone()).collect(),
                connect: connect.into_iter().collect(),
                hosts: hosts.into_iter().collect(),
                members,
                published,
            }
        })
        .collect()
}
