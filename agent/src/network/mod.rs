//! Service networks on this host, as the console last described them (`SetNetworks`): for
//! each network a bridge that answers the gateway address (the same address and MAC on every
//! host, so an instance keeps it wherever it moves), the host's own link into it (its address
//! on the network), a VXLAN device whose forwarding entries send each member's frames to its
//! host only, the network's resolver, and the firewall; each instance of a process in a
//! network namespace of its own with a veth on the bridge. Everything is named from the
//! network's VXLAN identifier with the prefix `dn`, made again from the description at each
//! change, and removed when the description leaves it out, or when the agent starts.

pub mod dns;
pub mod firewall;
pub mod links;
pub mod namespace;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
};

use dunes_shared::{
    network::{
        HostNetwork, VXLAN_OVERHEAD, bridge_name, gateway, host_link_name, host_port_name, mac_of,
        vxlan_name,
    },
    protocol::SetNetworks,
};

use self::links::{Forward, LinkError, ZERO_MAC, ip};

/// Why the networks could not be set as asked.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("the firewall: {0}")]
    Firewall(String),
    #[error("{0}")]
    Invalid(String),
}

/// The most networks one host takes part in.
pub const MAX_NETWORKS: usize = 1024;
/// The most instances one network description lists.
pub const MAX_MEMBERS: usize = 65_536;

/// A network's resolver: its names, and the task answering on its gateway.
struct Resolver {
    names: dns::Names,
    gateway: Ipv4Addr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// This host's service networks.
#[derive(Default)]
pub struct NetworkHost {
    state: tokio::sync::Mutex<BTreeMap<u32, Resolver>>,
    /// Off (the agent's config): descriptions are taken and nothing is built.
    build: bool,
    said_off: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for NetworkHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkHost").finish_non_exhaustive()
    }
}

/// Refuses a description this host should not apply.
fn check(wanted: &SetNetworks) -> Result<(), NetworkError> {
    if wanted.networks.len() > MAX_NETWORKS {
        return Err(NetworkError::Invalid(format!(
            "at most {MAX_NETWORKS} networks on one host"
        )));
    }
    let mut vnis = BTreeSet::new();
    for n in &wanted.networks {
        if !(1..(1 << 24)).contains(&n.vni) || !vnis.insert(n.vni) {
            return Err(NetworkError::Invalid(format!(
                "network {}: VXLAN identifier {} is out of range or given twice",
                n.name, n.vni
            )));
        }
        if n.members.len() > MAX_MEMBERS {
            return Err(NetworkError::Invalid(format!(
                "network {}: at most {MAX_MEMBERS} members",
                n.name
            )));
        }
        if !(576..=9000).contains(&n.mtu) {
            return Err(NetworkError::Invalid(format!(
                "network {}: MTU {} is not between 576 and 9000",
                n.name, n.mtu
            )));
        }
        if !n.subnet.contains(&n.host_address) || n.host_address == gateway(n.subnet) {
            return Err(NetworkError::Invalid(format!(
                "network {}: host address {} is not a host of {}",
                n.name, n.host_address, n.subnet
            )));
        }
        for m in &n.members {
            if !n.subnet.contains(&m.address) || !is_mac(&m.mac) {
                return Err(NetworkError::Invalid(format!(
                    "network {}: member {} ({}) is not on {}",
                    n.name, m.address, m.mac, n.subnet
                )));
            }
        }
    }
    Ok(())
}

/// Six pairs of hex digits, colon-separated: what may be handed to `ip` and `bridge`.
pub fn is_mac(text: &str) -> bool {
    text.len() == 17
        && text.split(':').count() == 6
        && text
            .split(':')
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The VXLAN forwarding entries of `network`: each member elsewhere at its host, each other
/// host's own link at that host, and broadcasts to every other host of the network.
fn forwards_of(network: &HostNetwork) -> Vec<Forward> {
    let mut out: Vec<Forward> = network
        .members
        .iter()
        .filter_map(|m| {
            Some(Forward {
                mac: m.mac.to_ascii_lowercase(),
                peer: m.peer?,
            })
        })
        .collect();
    out.extend(network.peers.iter().map(|peer| Forward {
        mac: ZERO_MAC.to_string(),
        peer: *peer,
    }));
    out.sort();
    out.dedup();
    out
}

impl NetworkHost {
    pub fn new(build: bool) -> Self {
        NetworkHost {
            build,
            ..Default::default()
        }
    }

    /// Makes this host's networks what `wanted` describes, and takes down the others.
    pub async fn apply(&self, wanted: &SetNetworks) -> Result<(), NetworkError> {
        check(wanted)?;
        if !self.build {
            if !wanted.networks.is_empty()
                && !self
                    .said_off
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::info!(
                    "service networks are off on this host (service_networks = false): their addresses are kept, nothing is built"
                );
            }
            return Ok(());
        }
        let mut resolvers = self.state.lock().await;
        let keep: BTreeSet<u32> = wanted.networks.iter().map(|n| n.vni).collect();
        // Taken down first: a network gone frees its addresses for one that comes.
        resolvers.retain(|vni, _| keep.contains(vni));
        for (name, _, _) in links::own_links().await? {
            let vni = ["dnb", "dnv", "dnh", "dnk"]
                .iter()
                .find_map(|p| name.strip_prefix(p))
                .and_then(|v| v.parse::<u32>().ok());
            if vni.is_some_and(|v| !keep.contains(&v)) {
                links::delete_link(&name).await?;
            }
        }
        for network in &wanted.networks {
            self.set_up(network).await?;
            let gw = gateway(network.subnet);
            let names: Vec<(String, Vec<Ipv4Addr>)> = network
                .names
                .iter()
                .map(|e| (e.name.clone(), e.addresses.clone()))
                .collect();
            match resolvers.get(&network.vni) {
                Some(r) if r.gateway == gw && !r.task.is_finished() => r.names.replace(names),
                _ => {
                    let resolver = start_resolver(gw, names).await?;
                    resolvers.insert(network.vni, resolver);
                }
            }
        }
        apply_firewall(&wanted.networks).await?;
        Ok(())
    }

    /// One network's devices, as described.
    async fn set_up(&self, network: &HostNetwork) -> Result<(), NetworkError> {
        let vni = network.vni;
        let bridge = bridge_name(vni);
        let gw = gateway(network.subnet);
        // The gateway: the same address and MAC on every host; only asked for on the bridge.
        links::ensure_bridge(&bridge, &mac_of(gw), &[(gw, 32)], network.mtu).await?;
        sysctl(&format!("net.ipv4.conf.{bridge}.arp_ignore"), "1").await?;
        // What an instance sends to its gateway is routed on from here (to a connected
        // network): forwarding is the way in's, so only the network's own bridge needs it.
        sysctl(&format!("net.ipv4.conf.{bridge}.forwarding"), "1").await?;
        // The host's own link, with its address and the subnet's route.
        let link = host_link_name(vni);
        let port = host_port_name(vni);
        links::ensure_veth(
            &link,
            &port,
            &bridge,
            &mac_of(network.host_address),
            network.mtu,
        )
        .await?;
        let cidr = format!("{}/{}", network.host_address, network.subnet.prefix_len());
        ip(&["addr", "replace", &cidr, "dev", &link]).await?;
        sysctl(&format!("net.ipv4.conf.{link}.arp_ignore"), "1").await?;
        // Its ARP requests name its own address, never the gateway's (a reply from the
        // gateway leaves through it): an instance must keep the gateway at the bridge's MAC.
        sysctl(&format!("net.ipv4.conf.{link}.arp_announce"), "2").await?;
        sysctl(&format!("net.ipv4.conf.{link}.rp_filter"), "0").await?;
        let vxlan = vxlan_name(vni);
        let mtu = match network.peers.first() {
            // Nothing may need to be cut in two on the way to a peer.
            Some(peer) => {
                let underlay = links::mtu_towards(*peer).await?;
                if underlay < network.mtu + VXLAN_OVERHEAD {
                    tracing::warn!(
                        "network {}: the link towards {peer} carries {underlay} bytes, less than the network's {} and VXLAN's {VXLAN_OVERHEAD}",
                        network.name,
                        network.mtu
                    );
                }
                network.mtu
            }
            None => network.mtu,
        };
        links::ensure_vxlan(&vxlan, vni, &bridge, mtu).await?;
        links::set_forwards(&vxlan, &forwards_of(network)).await?;
        // The instances of this host, on the bridge again if it was made anew (their
        // namespace's veth, a VM's tap).
        let own = links::own_links().await?;
        for m in network.members.iter().filter(|m| m.peer.is_none()) {
            let hex = format!("{:08x}", u32::from(m.address));
            for port in [format!("dnp{hex}"), format!("dnt{hex}")] {
                if own
                    .iter()
                    .any(|(n, _, master)| *n == port && master.as_deref() != Some(bridge.as_str()))
                {
                    ip(&["link", "set", &port, "master", &bridge, "up"]).await?;
                }
            }
        }
        Ok(())
    }
}

/// A network's resolver, answering `names` on its gateway.
async fn start_resolver(
    gateway: Ipv4Addr,
    names: Vec<(String, Vec<Ipv4Addr>)>,
) -> Result<Resolver, NetworkError> {
    let table = dns::Names::default();
    table.replace(names);
    let socket = tokio::net::UdpSocket::bind(SocketAddr::from((gateway, 53)))
        .await
        .map_err(|e| {
            NetworkError::Invalid(format!("the resolver cannot listen on {gateway}:53: {e}"))
        })?;
    let serving = table.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = dns::serve_udp(socket, serving).await {
            tracing::warn!("the resolver on {gateway} stopped: {e}");
        }
    });
    Ok(Resolver {
        names: table,
        gateway,
        task,
    })
}

async fn sysctl(key: &str, value: &str) -> Result<(), NetworkError> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    tokio::fs::write(&path, value)
        .await
        .map_err(|e| NetworkError::Invalid(format!("cannot set {key} to {value}: {e}")))
}

async fn apply_firewall(networks: &[HostNetwork]) -> Result<(), NetworkError> {
    if networks.is_empty() {
        return drop_firewall().await;
    }
    let rules = firewall::ruleset(networks);
    nft(&rules).await
}

async fn drop_firewall() -> Result<(), NetworkError> {
    nft(&format!(
        "table inet {0} {{}}\ndelete table inet {0}\n",
        firewall::TABLE
    ))
    .await
}

/// Runs `nft -f -` with `rules` on its input.
async fn nft(rules: &str) -> Result<(), NetworkError> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            NetworkError::Firewall(format!(
                "cannot run nft (the nftables package is needed for service networks): {e}"
            ))
        })?;
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(rules.as_bytes())
            .await
            .map_err(|e| NetworkError::Firewall(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| NetworkError::Firewall(e.to_string()))?;
    if !out.status.success() {
        return Err(NetworkError::Firewall(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use dunes_shared::network::NetworkMember;

    use super::*;

    #[test]
    fn frames_go_to_each_members_host_and_broadcasts_to_every_peer() {
        let peer_a: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let peer_b: std::net::IpAddr = "192.0.2.2".parse().unwrap();
        let network = HostNetwork {
            name: dunes_shared::model::NetworkName::new("shop").unwrap(),
            vni: 4096,
            subnet: "10.200.0.0/24".parse().unwrap(),
            mtu: 1450,
            host_address: "10.200.0.254".parse().unwrap(),
            peers: vec![peer_a, peer_b],
            members: vec![
                NetworkMember {
                    address: "10.200.0.2".parse().unwrap(),
                    mac: "02:D5:0A:C8:00:02".into(),
                    peer: Some(peer_a),
                },
                NetworkMember {
                    address: "10.200.0.3".parse().unwrap(),
                    mac: "02:d5:0a:c8:00:03".into(),
                    peer: None,
                },
            ],
            names: Vec::new(),
            reach: Vec::new(),
            published: Vec::new(),
        };
        assert_eq!(
            forwards_of(&network),
            vec![
                Forward {
                    mac: ZERO_MAC.into(),
                    peer: peer_a
                },
                Forward {
                    mac: ZERO_MAC.into(),
                    peer: peer_b
                },
                Forward {
                    mac: "02:d5:0a:c8:00:02".into(),
                    peer: peer_a
                },
            ]
        );
        assert_eq!(
            check(&SetNetworks {
                networks: vec![network.clone()],
            })
            .map_err(|e| e.to_string()),
            Ok(())
        );
        let mut bad = network.clone();
        bad.members[0].mac = "02:d5;rm -rf".into();
        assert!(
            check(&SetNetworks {
                networks: vec![bad],
            })
            .is_err()
        );
        let mut outside = network;
        outside.host_address = "10.9.9.9".parse().unwrap();
        assert!(
            check(&SetNetworks {
                networks: vec![outside],
            })
            .is_err()
        );
    }
}
