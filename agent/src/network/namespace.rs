//! A process instance's own network namespace on its service network: made at its start
//! with a veth whose end `eth0` inside has the instance's address and MAC, and whose other
//! end is on the network's bridge; a resolver file of its own (`ip netns exec` puts
//! `/etc/netns/NAME/resolv.conf` in place of `/etc/resolv.conf` for what it runs); removed
//! with the instance.

use std::path::PathBuf;

use dunes_shared::network::{InstanceNic, bridge_name};

use super::links::{LinkError, delete_link, ip};

/// The namespace of an instance: `dunes-` and the instance's id (its UUID's first 12 hex
/// digits), unique on the machine whichever agent made it.
pub fn namespace_name(uuid: &str) -> String {
    let id: String = uuid
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(12)
        .collect();
    format!("dunes-{id}")
}

/// The bridge's end of an instance's veth: `dnp` and its address in hex.
pub fn port_name(nic: &InstanceNic) -> String {
    format!("dnp{:08x}", u32::from(nic.address))
}

fn resolver_dir(namespace: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(namespace)
}

/// Makes the namespace `namespace` as `nic` describes, or mends what is missing of it.
pub async fn ensure(namespace: &str, nic: &InstanceNic) -> Result<(), LinkError> {
    let listed = ip(&["netns", "list"]).await?;
    if !listed
        .lines()
        .any(|l| l.split_whitespace().next() == Some(namespace))
    {
        ip(&["netns", "add", namespace]).await?;
    }
    let port = port_name(nic);
    let inside = |args: &[&str]| {
        let mut all = vec!["-n", namespace];
        all.extend_from_slice(args);
        all.iter().map(|s| s.to_string()).collect::<Vec<String>>()
    };
    let has_eth0 = ip(&inside(&["link", "show", "eth0"])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>())
    .await
    .is_ok();
    if !has_eth0 {
        // A half-made pair from before goes first.
        delete_link(&port).await?;
        ip(&[
            "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", namespace,
        ])
        .await?;
    }
    let mtu = nic.mtu.to_string();
    let bridge = bridge_name(nic.vni);
    ip(&["link", "set", &port, "master", &bridge, "mtu", &mtu, "up"]).await?;
    let cidr = format!("{}/{}", nic.address, nic.prefix_len);
    let gateway = nic.gateway.to_string();
    for args in [
        vec!["link", "set", "lo", "up"],
        vec![
            "link",
            "set",
            "eth0",
            "address",
            nic.mac.as_str(),
            "mtu",
            &mtu,
            "up",
        ],
        vec!["addr", "replace", &cidr, "dev", "eth0"],
        vec![
            "route", "replace", "default", "via", &gateway, "dev", "eth0",
        ],
    ] {
        let args: Vec<String> = inside(&args);
        ip(&args.iter().map(String::as_str).collect::<Vec<_>>()).await?;
    }
    let dir = resolver_dir(namespace);
    let mut text = format!("nameserver {}\n", nic.gateway);
    if !nic.search.is_empty() {
        text.push_str(&format!("search {}\n", nic.search.join(" ")));
    }
    let written =
        std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(dir.join("resolv.conf"), text));
    if let Err(e) = written {
        return Err(LinkError::Failed {
            command: format!("writing {}", dir.join("resolv.conf").display()),
            stderr: e.to_string(),
        });
    }
    Ok(())
}

/// Removes the namespace `namespace` (its veth goes with it) and its resolver file.
pub async fn remove(namespace: &str) -> Result<(), LinkError> {
    match ip(&["netns", "del", namespace]).await {
        Err(LinkError::Failed { stderr, .. }) if stderr.contains("No such file") => {}
        other => {
            other?;
        }
    }
    let _ = std::fs::remove_dir_all(resolver_dir(namespace));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernels_limits() {
        assert_eq!(
            namespace_name("5f0c2a9e-1b2c-4d5e-8f90-a1b2c3d4e5f6"),
            "dunes-5f0c2a9e1b2c"
        );
        let nic = InstanceNic {
            network: dunes_shared::model::NetworkName::new("shop").unwrap(),
            vni: 4096,
            address: "10.200.0.3".parse().unwrap(),
            prefix_len: 24,
            mac: "02:d5:0a:c8:00:03".into(),
            gateway: "10.200.0.1".parse().unwrap(),
            mtu: 1450,
            search: Vec::new(),
        };
        // A device name holds at most 15 bytes.
        assert_eq!(port_name(&nic), "dnp0ac80003");
    }
}
