//! Which hosts each network spans, and what each host is told of its networks: pure, from
//! the networks' records, the services (their files and instances) and the hosts.
//!
//! A network spans the hosts of its instances, the hosts that publish its ports, and the
//! hosts of every network it is connected with (packets between two networks are routed on
//! the host of the instance that sends them, which needs both bridges).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use dunes_shared::{
    model::{HostId, NetworkName, ServiceName, SiteName},
    network::{
        DnsEntry, HostNetwork, NetworkMember, PublishedPort, app_dns_name, instance_dns_name,
        mac_of,
    },
    protocol::SetNetworks,
};

use super::{plan::network_name, state::NetworkRecord};
use crate::engine::ServiceView;

/// The MTU of service networks: a 1500-byte link less VXLAN's headers.
pub const NETWORK_MTU: u32 = 1500 - dunes_shared::network::VXLAN_OVERHEAD;

/// A host as the networks see it.
#[derive(Debug, Clone)]
pub struct HostFacts {
    pub id: HostId,
    pub site: Option<SiteName>,
    /// Its address as the other hosts reach it.
    pub underlay: Option<IpAddr>,
}

/// The services on each network.
type ServicesOn = BTreeMap<NetworkName, Vec<Arc<ServiceView>>>;
/// The networks each network is connected with, both ways.
type Connected = BTreeMap<NetworkName, BTreeSet<NetworkName>>;

/// The services on each network, with the networks each is connected with.
fn graph(
    records: &BTreeMap<NetworkName, NetworkRecord>,
    services: &[Arc<ServiceView>],
) -> (ServicesOn, Connected) {
    let mut on: BTreeMap<NetworkName, Vec<Arc<ServiceView>>> = BTreeMap::new();
    let mut network_of: BTreeMap<ServiceName, NetworkName> = BTreeMap::new();
    for s in services {
        if let Some(n) = s.spec.as_ref().ok().and_then(network_name)
            && records.contains_key(&n)
        {
            network_of.insert(s.name().clone(), n.clone());
            on.entry(n).or_default().push(s.clone());
        }
    }
    let mut connected: BTreeMap<NetworkName, BTreeSet<NetworkName>> = BTreeMap::new();
    for s in services {
        let (Some(from), Ok(spec)) = (network_of.get(s.name()), s.spec.as_ref()) else {
            continue;
        };
        for target in spec.network.iter().flat_map(|n| &n.connect) {
            if let Some(to) = network_of.get(target)
                && to != from
            {
                connected
                    .entry(from.clone())
                    .or_default()
                    .insert(to.clone());
                connected
                    .entry(to.clone())
                    .or_default()
                    .insert(from.clone());
            }
        }
    }
    (on, connected)
}

/// The hosts each network spans.
pub fn network_hosts(
    records: &BTreeMap<NetworkName, NetworkRecord>,
    services: &[Arc<ServiceView>],
    hosts: &[HostFacts],
) -> BTreeMap<NetworkName, BTreeSet<HostId>> {
    let (on, connected) = graph(records, services);
    let mut own: BTreeMap<NetworkName, BTreeSet<HostId>> = BTreeMap::new();
    for (network, services) in &on {
        let set = own.entry(network.clone()).or_default();
        for s in services {
            for i in &s.instances {
                if i.record
                    .address
                    .as_ref()
                    .is_some_and(|a| &a.network == network)
                {
                    set.insert(i.record.host.clone());
                }
            }
            for p in s
                .spec
                .iter()
                .flat_map(|spec| &spec.network)
                .flat_map(|n| &n.publish)
            {
                for h in hosts {
                    if h.site
                        .as_ref()
                        .is_some_and(|site| p.hosts.includes(&h.id, site))
                    {
                        set.insert(h.id.clone());
                    }
                }
            }
        }
    }
    own.iter()
        .map(|(network, set)| {
            let mut all = set.clone();
            for other in connected.get(network).into_iter().flatten() {
                all.extend(own.get(other).into_iter().flatten().cloned());
            }
            (network.clone(), all)
        })
        .collect()
}

/// What each host in `spans` is told: its networks, each with its peers, its members, the
/// names its resolver answers, the networks it reaches and the ports it publishes. Hosts
/// without a network are told an empty list (which takes down what they had).
pub fn host_descriptions(
    records: &BTreeMap<NetworkName, NetworkRecord>,
    services: &[Arc<ServiceView>],
    hosts: &[HostFacts],
    spans: &BTreeMap<NetworkName, BTreeSet<HostId>>,
) -> BTreeMap<HostId, SetNetworks> {
    let (on, connected) = graph(records, services);
    let underlay: BTreeMap<&HostId, IpAddr> = hosts
        .iter()
        .filter_map(|h| Some((&h.id, h.underlay?)))
        .collect();
    let mut out: BTreeMap<HostId, SetNetworks> = hosts
        .iter()
        .map(|h| {
            (
                h.id.clone(),
                SetNetworks {
                    networks: Vec::new(),
                },
            )
        })
        .collect();
    for (name, record) in records {
        let Some(span) = spans.get(name) else {
            continue;
        };
        let services = on.get(name).map(Vec::as_slice).unwrap_or_default();
        // The names of its services and of those it is connected with.
        let mut named: Vec<&Arc<ServiceView>> = services.iter().collect();
        for other in connected.get(name).into_iter().flatten() {
            named.extend(on.get(other).into_iter().flatten());
        }
        let mut names: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
        for s in &named {
            for i in &s.instances {
                let Some(a) = &i.record.address else {
                    continue;
                };
                names.insert(
                    instance_dns_name(i.record.index, &i.record.app, &i.record.service),
                    vec![a.ip],
                );
                let app = names
                    .entry(app_dns_name(&i.record.app, &i.record.service))
                    .or_default();
                if i.ready {
                    app.push(a.ip);
                }
            }
        }
        let names: Vec<DnsEntry> = names
            .into_iter()
            .map(|(name, mut addresses)| {
                addresses.sort();
                DnsEntry { name, addresses }
            })
            .collect();
        let reach: Vec<ipnet::Ipv4Net> = connected
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|n| records.get(n).map(|r| r.subnet))
            .collect();
        let instances: Vec<(&HostId, Ipv4Addr, &str)> = services
            .iter()
            .flat_map(|s| &s.instances)
            .filter_map(|i| {
                let a = i.record.address.as_ref().filter(|a| &a.network == name)?;
                Some((&i.record.host, a.ip, a.mac.as_str()))
            })
            .collect();
        for host in span {
            let (Some(description), Some(host_address)) =
                (out.get_mut(host), record.hosts.get(host))
            else {
                continue;
            };
            let peer_of = |h: &HostId| (h != host).then(|| underlay.get(h).copied()).flatten();
            let mut members: Vec<NetworkMember> = instances
                .iter()
                .map(|(h, address, mac)| NetworkMember {
                    address: *address,
                    mac: mac.to_string(),
                    peer: peer_of(h),
                })
                .collect();
            members.extend(
                span.iter()
                    .filter(|h| *h != host)
                    .filter_map(|h| Some((h, record.hosts.get(h)?)))
                    .map(|(h, address)| NetworkMember {
                        address: *address,
                        mac: mac_of(*address),
                        peer: peer_of(h),
                    }),
            );
            let site = hosts
                .iter()
                .find(|h| &h.id == host)
                .and_then(|h| h.site.clone());
            let published = services
                .iter()
                .filter_map(|s| Some((s, s.spec.as_ref().ok()?.network.as_ref()?)))
                .flat_map(|(s, n)| n.publish.iter().map(move |p| (s, p)))
                .filter(|(_, p)| {
                    site.as_ref()
                        .is_some_and(|site| p.hosts.includes(host, site))
                })
                .map(|(s, p)| PublishedPort {
                    host_port: p.host_port,
                    backends: s
                        .instances
                        .iter()
                        .filter(|i| i.record.app == p.app && i.ready)
                        .filter_map(|i| i.record.address.as_ref())
                        .map(|a| SocketAddrV4::new(a.ip, p.port))
                        .collect(),
                })
                .collect();
            description.networks.push(HostNetwork {
                name: name.clone(),
                vni: record.vni,
                subnet: record.subnet,
                mtu: NETWORK_MTU,
                host_address: *host_address,
                peers: span
                    .iter()
                    .filter(|h| *h != host)
                    .filter_map(|h| underlay.get(h).copied())
                    .collect(),
                members,
                names: names.clone(),
                reach: reach.clone(),
                published,
            });
        }
    }
    out
}
