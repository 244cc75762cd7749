//! The kernel's side of service networks, through iproute2 (`ip`, `bridge`): bridges, VXLAN
//! devices and their forwarding entries, veth pairs and network namespaces. Every device
//! this module makes is named with [`PREFIX`], so that what an agent left behind can be told
//! from everything else and removed.

use std::net::{IpAddr, Ipv4Addr};

use serde::Deserialize;

/// Every device an agent makes starts with this.
pub const PREFIX: &str = "dn";
/// The VXLAN port (IANA's).
pub const VXLAN_PORT: u16 = 4789;

/// Why a change to the kernel's devices failed: the command and what it said.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{command}: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("cannot run {program} (iproute2 is needed for service networks): {source}")]
    Missing {
        program: &'static str,
        source: std::io::Error,
    },
    #[error("{command} printed what does not read: {why}")]
    Unreadable { command: String, why: String },
}

/// Runs `program args`, answering what it printed.
pub async fn run(program: &'static str, args: &[&str]) -> Result<String, LinkError> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(|source| LinkError::Missing { program, source })?;
    if !out.status.success() {
        return Err(LinkError::Failed {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub async fn ip(args: &[&str]) -> Result<String, LinkError> {
    run("ip", args).await
}

/// A device as `ip -j link` shows it.
#[derive(Debug, Deserialize)]
struct LinkJson {
    ifname: String,
    #[serde(default)]
    mtu: u32,
    #[serde(default)]
    master: Option<String>,
}

/// This namespace's devices whose names start with [`PREFIX`], with their MTU and bridge.
pub async fn own_links() -> Result<Vec<(String, u32, Option<String>)>, LinkError> {
    let text = ip(&["-j", "link", "show"]).await?;
    let links: Vec<LinkJson> = serde_json::from_str(&text).map_err(|e| LinkError::Unreadable {
        command: "ip -j link show".into(),
        why: e.to_string(),
    })?;
    Ok(links
        .into_iter()
        .filter(|l| l.ifname.starts_with(PREFIX))
        .map(|l| (l.ifname, l.mtu, l.master))
        .collect())
}

/// Removes a device; one that is gone already is no failure.
pub async fn delete_link(name: &str) -> Result<(), LinkError> {
    match ip(&["link", "del", name]).await {
        Err(LinkError::Failed { stderr, .. })
            if stderr.contains("Cannot find device") || stderr.contains("does not exist") =>
        {
            Ok(())
        }
        other => other.map(|_| ()),
    }
}

/// A bridge named `name` with the MAC and addresses given, up, with `mtu`. Made when
/// missing, changed when not as asked.
pub async fn ensure_bridge(
    name: &str,
    mac: &str,
    addresses: &[(Ipv4Addr, u8)],
    mtu: u32,
) -> Result<(), LinkError> {
    let exists = own_links().await?.iter().any(|(n, _, _)| n == name);
    if !exists {
        ip(&["link", "add", name, "type", "bridge", "stp_state", "0"]).await?;
    }
    let mtu = mtu.to_string();
    ip(&["link", "set", name, "address", mac, "mtu", &mtu, "up"]).await?;
    for (address, prefix) in addresses {
        let cidr = format!("{address}/{prefix}");
        // `replace` adds what is missing and leaves what is there.
        ip(&["addr", "replace", &cidr, "dev", name]).await?;
    }
    Ok(())
}

/// A VXLAN device for network `vni` on `bridge`: no learning and no multicast group, so
/// that frames go only where the forwarding entries (from the console's membership) say.
pub async fn ensure_vxlan(name: &str, vni: u32, bridge: &str, mtu: u32) -> Result<(), LinkError> {
    let exists = own_links().await?.iter().any(|(n, _, _)| n == name);
    if !exists {
        let vni = vni.to_string();
        let port = VXLAN_PORT.to_string();
        ip(&[
            "link",
            "add",
            name,
            "type",
            "vxlan",
            "id",
            &vni,
            "dstport",
            &port,
            "nolearning",
        ])
        .await?;
    }
    let mtu = mtu.to_string();
    ip(&["link", "set", name, "master", bridge, "mtu", &mtu, "up"]).await?;
    // The bridge sends frames for the others' MACs to this port; it must not learn them
    // from what comes in, or flood the port with what it has not learnt.
    run(
        "bridge",
        &[
            "link",
            "set",
            "dev",
            name,
            "learning",
            "off",
            "neigh_suppress",
            "off",
        ],
    )
    .await?;
    Ok(())
}

/// One forwarding entry of a VXLAN device: frames to `mac` go to `peer` (the all-zero MAC:
/// broadcasts and ARP, once to each peer listed).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Forward {
    pub mac: String,
    pub peer: IpAddr,
}

#[derive(Debug, Deserialize)]
struct FdbJson {
    mac: String,
    #[serde(default)]
    dst: Option<String>,
}

/// The forwarding entries of VXLAN device `vxlan` that point at a peer.
pub async fn forwards(vxlan: &str) -> Result<Vec<Forward>, LinkError> {
    let text = run("bridge", &["-j", "fdb", "show", "dev", vxlan]).await?;
    let entries: Vec<FdbJson> = serde_json::from_str(&text).map_err(|e| LinkError::Unreadable {
        command: format!("bridge -j fdb show dev {vxlan}"),
        why: e.to_string(),
    })?;
    Ok(entries
        .into_iter()
        .filter_map(|e| {
            Some(Forward {
                mac: e.mac.to_ascii_lowercase(),
                peer: e.dst?.parse().ok()?,
            })
        })
        .collect())
}

/// Makes `vxlan`'s forwarding entries exactly `wanted`.
pub async fn set_forwards(vxlan: &str, wanted: &[Forward]) -> Result<(), LinkError> {
    let have = forwards(vxlan).await?;
    for f in have.iter().filter(|f| !wanted.contains(f)) {
        let peer = f.peer.to_string();
        run(
            "bridge",
            &["fdb", "del", &f.mac, "dev", vxlan, "dst", &peer],
        )
        .await?;
    }
    for f in wanted.iter().filter(|f| !have.contains(f)) {
        let peer = f.peer.to_string();
        // The all-zero entries are a list (one per peer); the others one place each.
        let verb = if f.mac == ZERO_MAC {
            "append"
        } else {
            "replace"
        };
        run(
            "bridge",
            &[
                "fdb",
                verb,
                &f.mac,
                "dev",
                vxlan,
                "dst",
                &peer,
                "self",
                "permanent",
            ],
        )
        .await?;
    }
    Ok(())
}

/// The forwarding entry of broadcasts.
pub const ZERO_MAC: &str = "00:00:00:00:00:00";

/// The MTU of the device this namespace reaches `peer` through.
pub async fn mtu_towards(peer: IpAddr) -> Result<u32, LinkError> {
    #[derive(Deserialize)]
    struct Route {
        dev: String,
    }
    let peer = peer.to_string();
    let text = ip(&["-j", "route", "get", &peer]).await?;
    let routes: Vec<Route> = serde_json::from_str(&text).map_err(|e| LinkError::Unreadable {
        command: format!("ip -j route get {peer}"),
        why: e.to_string(),
    })?;
    let Some(route) = routes.first() else {
        return Err(LinkError::Unreadable {
            command: format!("ip -j route get {peer}"),
            why: "no route".into(),
        });
    };
    let text = ip(&["-j", "link", "show", "dev", &route.dev]).await?;
    let links: Vec<LinkJson> = serde_json::from_str(&text).map_err(|e| LinkError::Unreadable {
        command: format!("ip -j link show dev {}", route.dev),
        why: e.to_string(),
    })?;
    Ok(links.first().map_or(1500, |l| l.mtu))
}

/// A veth pair: `link` here with `mac`, its peer `port` on `bridge`; both up with `mtu`.
pub async fn ensure_veth(
    link: &str,
    port: &str,
    bridge: &str,
    mac: &str,
    mtu: u32,
) -> Result<(), LinkError> {
    let exists = own_links().await?.iter().any(|(n, _, _)| n == link);
    if !exists {
        ip(&["link", "add", link, "type", "veth", "peer", "name", port]).await?;
    }
    let mtu = mtu.to_string();
    ip(&["link", "set", port, "master", bridge, "mtu", &mtu, "up"]).await?;
    ip(&["link", "set", link, "address", mac, "mtu", &mtu, "up"]).await?;
    Ok(())
}
