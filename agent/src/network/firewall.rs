//! The firewall of service networks, one nftables table (`inet dunes`) written whole each
//! time the networks change: instances reach the others of their network (bridged), the
//! networks their services connect to (routed, both ways), the outside (masqueraded), and on
//! their host only the network's resolver; nothing outside reaches them but through
//! published ports, which the agent itself relays.

use std::fmt::Write;

use dunes_shared::network::{HostNetwork, bridge_name, gateway, host_link_name};

/// The table's name, in family `inet`.
pub const TABLE: &str = "dunes";

/// The whole ruleset of `networks`, as `nft -f` reads it: the table is made if missing,
/// emptied, and filled again in one transaction.
pub fn ruleset(networks: &[HostNetwork]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "table inet {TABLE} {{}}");
    let _ = writeln!(out, "delete table inet {TABLE}");
    let _ = writeln!(out, "table inet {TABLE} {{");
    // Forwarded: with the kernel's bridge netfilter, a frame bridged inside a network
    // passes here with the bridge as both its ways in and out; routed packets come in on a
    // bridge (from an instance, to its gateway) and go out on the network's host link.
    let _ = writeln!(out, "  chain forward {{");
    let _ = writeln!(
        out,
        "    type filter hook forward priority filter; policy accept;"
    );
    let _ = writeln!(out, "    iifname \"dnb*\" oifname \"dnb*\" accept");
    let mut pairs = std::collections::BTreeSet::new();
    for n in networks {
        for reach in &n.reach {
            for m in networks.iter().filter(|m| m.subnet == *reach) {
                pairs.insert((n.vni, m.vni));
                pairs.insert((m.vni, n.vni));
            }
        }
    }
    for (from, to) in pairs {
        let (from, to) = (bridge_name(from), host_link_name(to));
        let _ = writeln!(out, "    iifname \"{from}\" oifname \"{to}\" accept");
    }
    let _ = writeln!(out, "    iifname \"dnb*\" oifname \"dnh*\" drop");
    let _ = writeln!(out, "    iifname \"dnb*\" accept");
    let _ = writeln!(
        out,
        "    oifname \"dnh*\" ct state established,related accept"
    );
    let _ = writeln!(out, "    oifname \"dnh*\" drop");
    let _ = writeln!(out, "  }}");
    // To this host: from an instance only its network's resolver (and a ping of its
    // gateway), and the answers to what the host itself opened.
    let _ = writeln!(out, "  chain input {{");
    let _ = writeln!(
        out,
        "    type filter hook input priority filter; policy accept;"
    );
    let _ = writeln!(
        out,
        "    iifname {{ \"dnb*\", \"dnh*\" }} ct state established,related accept"
    );
    for n in networks {
        let bridge = bridge_name(n.vni);
        let gw = gateway(n.subnet);
        let _ = writeln!(
            out,
            "    iifname \"{bridge}\" ip daddr {gw} meta l4proto {{ udp, tcp }} th dport 53 accept"
        );
        let _ = writeln!(
            out,
            "    iifname \"{bridge}\" ip daddr {gw} icmp type echo-request accept"
        );
    }
    let _ = writeln!(out, "    iifname \"dnb*\" drop");
    let _ = writeln!(out, "    iifname \"dnh*\" drop");
    let _ = writeln!(out, "  }}");
    let _ = writeln!(out, "  chain postrouting {{");
    let _ = writeln!(
        out,
        "    type nat hook postrouting priority srcnat; policy accept;"
    );
    for n in networks {
        let _ = writeln!(
            out,
            "    ip saddr {} oifname != \"dnh*\" oifname != \"dnb*\" masquerade",
            n.subnet
        );
    }
    let _ = writeln!(out, "  }}");
    let _ = writeln!(out, "}}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(name: &str, vni: u32, subnet: &str, reach: &[&str]) -> HostNetwork {
        HostNetwork {
            name: dunes_shared::model::NetworkName::new(name).unwrap(),
            vni,
            subnet: subnet.parse().unwrap(),
            mtu: 1450,
            host_address: "10.0.0.254".parse().unwrap(),
            peers: Vec::new(),
            members: Vec::new(),
            names: Vec::new(),
            reach: reach.iter().map(|r| r.parse().unwrap()).collect(),
            published: Vec::new(),
        }
    }

    #[test]
    fn connected_networks_are_routed_both_ways_and_others_not() {
        let text = ruleset(&[
            network("shop", 4096, "10.200.0.0/24", &["10.77.0.0/24"]),
            network("pay", 4097, "10.77.0.0/24", &[]),
            network("other", 4098, "10.78.0.0/24", &[]),
        ]);
        assert!(
            text.contains("iifname \"dnb4096\" oifname \"dnh4097\" accept"),
            "{text}"
        );
        assert!(
            text.contains("iifname \"dnb4097\" oifname \"dnh4096\" accept"),
            "{text}"
        );
        assert!(!text.contains("dnh4098\" accept"), "{text}");
        // The accepts come before the drop of every other pair.
        let accept = text.find("oifname \"dnh4097\" accept").unwrap();
        let drop = text.find("iifname \"dnb*\" oifname \"dnh*\" drop").unwrap();
        assert!(accept < drop);
        assert!(text.contains("iifname \"dnb4098\" ip daddr 10.78.0.1 meta l4proto { udp, tcp } th dport 53 accept"), "{text}");
        assert!(
            text.contains("ip saddr 10.200.0.0/24 oifname != \"dnh*\""),
            "{text}"
        );
        // Written whole: the table is dropped and made again in the same transaction.
        assert!(text.starts_with("table inet dunes {}\ndelete table inet dunes\n"));
    }
}
