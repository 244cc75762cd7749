//! Service networks as a service file declares them: a subnet, the services it may reach,
//! and the ports published to the outside. Pure types and their checks; the console chooses
//! subnets and addresses, the agents build the bridges and tunnels.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::model::{AppName, HostId, ServiceName, SiteName};

/// The domain the agents' resolvers answer: `APP.SERVICE.dunes`.
pub const DNS_DOMAIN: &str = "dunes";
/// The shortest and longest prefixes a service network's subnet may have: a /29 holds the
/// gateway and a few instances, a /16 is as large as one bridge should carry.
pub const PREFIX_MIN: u8 = 16;
pub const PREFIX_MAX: u8 = 29;

/// A service's network: its instances reach each other (and the services it connects to) by
/// name, across hosts and sites.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetworkSpec {
    /// A network several services join; the service's own network (named as the service)
    /// when not given.
    #[serde(default)]
    pub name: Option<crate::model::NetworkName>,
    /// Chosen by the console when not given.
    #[serde(default)]
    pub subnet: Option<Ipv4Net>,
    /// Services whose instances this service's instances may open connections to.
    #[serde(default)]
    pub connect: Vec<ServiceName>,
    /// Ports of the outside balanced over an application's ready instances.
    #[serde(default)]
    pub publish: Vec<PublishSpec>,
}

/// A port of some hosts that reaches an application's ready instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishSpec {
    pub app: AppName,
    /// The instances' port.
    pub port: u16,
    /// The port the chosen hosts accept on.
    pub host_port: u16,
    pub hosts: PublishHosts,
}

/// Which hosts accept on a published port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PublishHosts {
    /// Every host of the service's network.
    All,
    Site(SiteName),
    Host(HostId),
}

impl PublishHosts {
    /// Whether a host of `site` named `host` accepts.
    pub fn includes(&self, host: &HostId, site: &SiteName) -> bool {
        match self {
            PublishHosts::All => true,
            PublishHosts::Site(s) => s == site,
            PublishHosts::Host(h) => h == host,
        }
    }
}

impl fmt::Display for PublishHosts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishHosts::All => f.write_str("all"),
            PublishHosts::Site(s) => write!(f, "site:{s}"),
            PublishHosts::Host(h) => write!(f, "host:{h}"),
        }
    }
}

impl FromStr for PublishHosts {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |e: crate::model::NameError| e.to_string();
        match s.split_once(':') {
            None if s == "all" => Ok(PublishHosts::All),
            Some(("site", name)) => SiteName::new(name).map(PublishHosts::Site).map_err(bad),
            Some(("host", id)) => HostId::new(id).map(PublishHosts::Host).map_err(bad),
            _ => Err(format!(
                "hosts must be \"all\", \"site:NAME\" or \"host:ID\", not {s:?}"
            )),
        }
    }
}

impl Serialize for PublishHosts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PublishHosts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a network declaration is refused; each says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    #[error("subnet {subnet} has host bits set: did you mean {}?", subnet.trunc())]
    HostBits { subnet: Ipv4Net },
    #[error("subnet {subnet} must have a prefix between /{PREFIX_MIN} and /{PREFIX_MAX}")]
    Prefix { subnet: Ipv4Net },
    #[error(
        "subnet {subnet} is reserved (loopback, link-local, multicast or this-network): use a private range such as 10.0.0.0/8"
    )]
    Reserved { subnet: Ipv4Net },
    #[error("publish names application {0}, which the service does not have")]
    UnknownApp(AppName),
    #[error("a published port must not be 0")]
    ZeroPort,
    #[error("host port {0} is published twice")]
    HostPortTwice(u16),
    #[error("a service does not connect to itself: its instances reach each other already")]
    ConnectSelf,
}

impl NetworkSpec {
    /// Checks what a file alone can tell; the console checks the rest against the other
    /// networks (overlaps, the services it connects to, the hosts' ports). Names need no
    /// check: a service's and an application's are DNS labels already.
    pub fn check(&self, service: &ServiceName, apps: &[&AppName]) -> Result<(), NetworkError> {
        if let Some(subnet) = self.subnet {
            check_subnet(subnet)?;
        }
        if self.connect.contains(service) {
            return Err(NetworkError::ConnectSelf);
        }
        let mut host_ports = std::collections::BTreeSet::new();
        for p in &self.publish {
            if !apps.contains(&&p.app) {
                return Err(NetworkError::UnknownApp(p.app.clone()));
            }
            if p.port == 0 || p.host_port == 0 {
                return Err(NetworkError::ZeroPort);
            }
            if !host_ports.insert(p.host_port) {
                return Err(NetworkError::HostPortTwice(p.host_port));
            }
        }
        Ok(())
    }
}

/// Refuses a subnet that is not a network address, is too small or too large, or is
/// reserved.
pub fn check_subnet(subnet: Ipv4Net) -> Result<(), NetworkError> {
    if subnet.trunc() != subnet {
        return Err(NetworkError::HostBits { subnet });
    }
    if !(PREFIX_MIN..=PREFIX_MAX).contains(&subnet.prefix_len()) {
        return Err(NetworkError::Prefix { subnet });
    }
    let a = subnet.network();
    if a.is_loopback()
        || a.is_link_local()
        || a.is_multicast()
        || a.is_broadcast()
        || a.octets()[0] == 0
        || a.octets()[0] >= 240
    {
        return Err(NetworkError::Reserved { subnet });
    }
    Ok(())
}

/// Whether two subnets share an address.
pub fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The gateway of a subnet: its first address, the same on every host of the network
/// (each host's bridge answers it, so an instance keeps it wherever it moves).
pub fn gateway(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()).saturating_add(1))
}

/// An address's MAC: locally administered, its four octets after `02:d5`. Unique as long
/// as the networks' subnets do not overlap, and the same wherever the instance runs.
pub fn mac_of(address: Ipv4Addr) -> String {
    let [a, b, c, d] = address.octets();
    format!("02:d5:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// The name of an application's ready instances: `APP.SERVICE.dunes`.
pub fn app_dns_name(app: &AppName, service: &ServiceName) -> String {
    format!("{app}.{service}.{DNS_DOMAIN}")
}

/// The name of one instance: `INDEX.APP.SERVICE.dunes`.
pub fn instance_dns_name(index: u32, app: &AppName, service: &ServiceName) -> String {
    format!("{index}.{app}.{service}.{DNS_DOMAIN}")
}

/// The overhead of VXLAN over IPv4 (outer IPv4, UDP, VXLAN and inner Ethernet headers).
pub const VXLAN_OVERHEAD: u32 = 50;

/// The bridge of a network on every host: `dnb` and its VXLAN identifier (a device name has
/// at most 15 bytes).
pub fn bridge_name(vni: u32) -> String {
    format!("dnb{vni}")
}

/// The VXLAN device of a network on every host.
pub fn vxlan_name(vni: u32) -> String {
    format!("dnv{vni}")
}

/// The host's own link into a network (a veth whose other end, [`host_port_name`], is on
/// the bridge): the host's address on the network is there, with a MAC of its own, and the
/// subnet's route, so that the host's own connections and the packets it routes to
/// instances leave through it.
pub fn host_link_name(vni: u32) -> String {
    format!("dnh{vni}")
}

/// The bridge's end of the host's link.
pub fn host_port_name(vni: u32) -> String {
    format!("dnk{vni}")
}

/// An instance's place on its service network, as its agent sets it up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceNic {
    pub network: crate::model::NetworkName,
    pub vni: u32,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub mac: String,
    /// The gateway and resolver every host of the network answers.
    pub gateway: Ipv4Addr,
    pub mtu: u32,
    /// Domains a short name is looked up in (`shop.dunes`).
    #[serde(default)]
    pub search: Vec<String>,
}

/// A service network as one host takes part in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostNetwork {
    pub name: crate::model::NetworkName,
    pub vni: u32,
    pub subnet: Ipv4Net,
    pub mtu: u32,
    /// This host's own address on the network: connections it makes to instances elsewhere
    /// (to a published port's instances) come from it.
    pub host_address: Ipv4Addr,
    /// The other hosts of the network, as this one reaches them.
    pub peers: Vec<std::net::IpAddr>,
    /// Every instance on the network, wherever it runs.
    pub members: Vec<NetworkMember>,
    /// What the network's resolver answers.
    pub names: Vec<DnsEntry>,
    /// Subnets of other networks this one's instances may open connections to.
    #[serde(default)]
    pub reach: Vec<Ipv4Net>,
    /// Host ports this host accepts on for the network's applications.
    #[serde(default)]
    pub published: Vec<PublishedPort>,
}

/// An instance on a network, and where its frames go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkMember {
    pub address: Ipv4Addr,
    pub mac: String,
    /// The host it runs on, as this host reaches it; `None` for this host.
    pub peer: Option<std::net::IpAddr>,
}

/// A name and its addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsEntry {
    pub name: String,
    pub addresses: Vec<Ipv4Addr>,
}

/// A port of this host balanced over an application's ready instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPort {
    pub host_port: u16,
    pub backends: Vec<std::net::SocketAddrV4>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn subnets_are_checked() {
        assert_eq!(check_subnet(net("10.40.0.0/24")), Ok(()));
        assert_eq!(
            check_subnet(net("10.40.0.7/24")).unwrap_err().to_string(),
            "subnet 10.40.0.7/24 has host bits set: did you mean 10.40.0.0/24?"
        );
        assert!(matches!(
            check_subnet(net("10.0.0.0/8")),
            Err(NetworkError::Prefix { .. })
        ));
        assert!(matches!(
            check_subnet(net("10.0.0.0/30")),
            Err(NetworkError::Prefix { .. })
        ));
        assert!(matches!(
            check_subnet(net("127.1.0.0/24")),
            Err(NetworkError::Reserved { .. })
        ));
        assert!(matches!(
            check_subnet(net("169.254.3.0/24")),
            Err(NetworkError::Reserved { .. })
        ));
    }

    #[test]
    fn overlap_is_either_way() {
        assert!(overlaps(net("10.0.0.0/16"), net("10.0.5.0/24")));
        assert!(overlaps(net("10.0.5.0/24"), net("10.0.0.0/16")));
        assert!(!overlaps(net("10.0.5.0/24"), net("10.0.6.0/24")));
    }

    #[test]
    fn a_mac_is_its_address() {
        assert_eq!(
            mac_of(Ipv4Addr::new(10, 200, 0, 10)),
            "02:d5:0a:c8:00:0a".to_string()
        );
        assert_eq!(gateway(net("10.200.3.0/24")), Ipv4Addr::new(10, 200, 3, 1));
    }

    #[test]
    fn publish_hosts_read_as_written() {
        for text in ["all", "site:lausanne", "host:h1"] {
            let hosts: PublishHosts = text.parse().unwrap();
            assert_eq!(hosts.to_string(), text);
        }
        assert!("site:".parse::<PublishHosts>().is_err());
        assert!("everywhere".parse::<PublishHosts>().is_err());
        let lausanne = SiteName::new("lausanne").unwrap();
        let h1 = HostId::new("h1").unwrap();
        assert!(PublishHosts::Site(lausanne.clone()).includes(&h1, &lausanne));
        assert!(!PublishHosts::Host(HostId::new("h2").unwrap()).includes(&h1, &lausanne));
    }

    #[test]
    fn a_declaration_is_checked_against_its_service() {
        let shop = ServiceName::new("shop").unwrap();
        let web = AppName::new("web").unwrap();
        let apps = [&web];
        let publish = |app: &str, host_port| PublishSpec {
            app: AppName::new(app).unwrap(),
            port: 80,
            host_port,
            hosts: PublishHosts::All,
        };
        let ok = NetworkSpec {
            publish: vec![publish("web", 8080), publish("web", 8443)],
            ..Default::default()
        };
        assert_eq!(ok.check(&shop, &apps), Ok(()));
        let twice = NetworkSpec {
            publish: vec![publish("web", 8080), publish("web", 8080)],
            ..Default::default()
        };
        assert_eq!(
            twice.check(&shop, &apps),
            Err(NetworkError::HostPortTwice(8080))
        );
        let unknown = NetworkSpec {
            publish: vec![publish("db", 8080)],
            ..Default::default()
        };
        assert!(matches!(
            unknown.check(&shop, &apps),
            Err(NetworkError::UnknownApp(_))
        ));
        let zero = NetworkSpec {
            publish: vec![publish("web", 0)],
            ..Default::default()
        };
        assert_eq!(zero.check(&shop, &apps), Err(NetworkError::ZeroPort));
        let itself = NetworkSpec {
            connect: vec![shop.clone()],
            ..Default::default()
        };
        assert_eq!(itself.check(&shop, &apps), Err(NetworkError::ConnectSelf));
        assert_eq!(
            instance_dns_name(1, &web, &shop),
            "1.web.shop.dunes".to_string()
        );
    }
}
