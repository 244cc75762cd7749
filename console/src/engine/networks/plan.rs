//! The choices and checks of service networks, pure: a new network's subnet and VXLAN
//! identifier, an instance's address, and a service's declaration checked against the other
//! services and their networks.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use dunes_shared::{
    model::{HostId, NetworkName, ServiceName, SiteName},
    network::{NetworkSpec, PublishHosts, gateway, overlaps},
    service::ServiceSpec,
};
use ipnet::Ipv4Net;

use super::state::NetworkRecord;

/// Where the console takes a subnet from when a declaration gives none, and its size.
pub const POOL: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 0);
pub const POOL_PREFIX: u8 = 16;
pub const CHOSEN_PREFIX: u8 = 24;
/// VXLAN identifiers the console hands out: below are left to the operator's own tunnels.
pub const VNI_FIRST: u32 = 4096;
pub const VNI_LAST: u32 = (1 << 24) - 1;

/// The first /24 of the pool that overlaps none of `taken`.
pub fn choose_subnet(taken: &[Ipv4Net]) -> Option<Ipv4Net> {
    Ipv4Net::new(POOL, POOL_PREFIX)
        .ok()?
        .subnets(CHOSEN_PREFIX)
        .ok()?
        .find(|s| !taken.iter().any(|t| overlaps(*s, *t)))
}

/// The lowest VXLAN identifier not in `taken`.
pub fn choose_vni(taken: &BTreeSet<u32>) -> Option<u32> {
    (VNI_FIRST..=VNI_LAST).find(|v| !taken.contains(v))
}

/// The lowest address of `subnet` that is neither its gateway nor in `taken`.
pub fn free_address(subnet: Ipv4Net, taken: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let gateway = gateway(subnet);
    subnet.hosts().find(|a| *a != gateway && !taken.contains(a))
}

/// The highest address of `subnet` below its broadcast address that is not in `taken`: a
/// host's own, so that hosts and instances take from opposite ends.
pub fn free_address_from_top(subnet: Ipv4Net, taken: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let gateway = gateway(subnet);
    let hosts: Vec<Ipv4Addr> = subnet.hosts().collect();
    hosts
        .into_iter()
        .rev()
        .find(|a| *a != gateway && !taken.contains(a))
}

/// The network a service's instances are on: the one it names, or its own.
pub fn network_name(spec: &ServiceSpec) -> Option<NetworkName> {
    let network = spec.network.as_ref()?;
    match &network.name {
        Some(name) => Some(name.clone()),
        // A service's name is a valid network name: the two follow the same rules.
        None => NetworkName::new(spec.name.as_str()).ok(),
    }
}

/// A defined service, as the checks of another's network see it.
#[derive(Debug, Clone)]
pub struct DefinedService<'a> {
    pub name: &'a ServiceName,
    pub network: Option<&'a NetworkSpec>,
    pub network_name: Option<NetworkName>,
    /// Whether it has instances (with an address or without).
    pub has_instances: bool,
}

/// What defining a service does to the networks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkChoice {
    /// It has no network.
    None,
    /// It joins a network that exists, as it is.
    Join(NetworkName),
    /// A network made for it (or made again, with another subnet, when only it was on it
    /// and it had no instances).
    Create(NetworkRecord),
}

/// Checks `spec`'s network against `others` (every other defined service) and the
/// `networks` that exist, and says what becomes of it. `this` is the service as it is
/// defined now, when the definition replaces it. Every refusal says what to change; nothing
/// is created before all of them pass.
pub fn choose_network(
    spec: &ServiceSpec,
    this: Option<&DefinedService>,
    others: &[DefinedService],
    networks: &BTreeMap<NetworkName, NetworkRecord>,
    site_of: impl Fn(&HostId) -> Option<SiteName>,
    now_ms: u64,
) -> Result<NetworkChoice, String> {
    let service = &spec.name;
    let wanted = network_name(spec);
    if let Some(this) = this
        && this.has_instances
        && this.network_name != wanted
    {
        let from = this
            .network_name
            .as_ref()
            .map_or("no network".to_string(), |n| format!("network {n}"));
        let to = wanted
            .as_ref()
            .map_or("none".to_string(), |n| format!("network {n}"));
        return Err(format!(
            "service {service} has instances on {from}: it moves to {to} only without instances (deploy it with none first)"
        ));
    }
    let (Some(network), Some(wanted)) = (&spec.network, wanted) else {
        return Ok(NetworkChoice::None);
    };
    for target in &network.connect {
        match others.iter().find(|o| o.name == target) {
            None => {
                return Err(format!(
                    "connect names service {target}, which does not exist: define it first"
                ));
            }
            Some(o) if o.network.is_none() => {
                return Err(format!(
                    "connect names service {target}, which has no network: give it a [network] first"
                ));
            }
            Some(_) => {}
        }
    }
    let site_overlap = |a: &PublishHosts, b: &PublishHosts| match (a, b) {
        (PublishHosts::All, _) | (_, PublishHosts::All) => true,
        (PublishHosts::Site(x), PublishHosts::Site(y)) => x == y,
        (PublishHosts::Host(h), PublishHosts::Host(g)) => h == g,
        (PublishHosts::Site(s), PublishHosts::Host(h))
        | (PublishHosts::Host(h), PublishHosts::Site(s)) => site_of(h).as_ref() == Some(s),
    };
    for p in &network.publish {
        for o in others {
            if let Some(q) = o
                .network
                .into_iter()
                .flat_map(|n| &n.publish)
                .find(|q| q.host_port == p.host_port && site_overlap(&p.hosts, &q.hosts))
            {
                return Err(format!(
                    "host port {} is published by service {} already (on {}): choose another host_port",
                    p.host_port, o.name, q.hosts
                ));
            }
        }
    }
    // Other services on the network: while one is, it stays as it is.
    let shared = others
        .iter()
        .any(|o| o.network_name.as_ref() == Some(&wanted));
    if let Some(record) = networks.get(&wanted) {
        let kept = shared
            || this.is_some_and(|t| t.has_instances && t.network_name.as_ref() == Some(&wanted));
        if kept || network.subnet.is_none_or(|s| s == record.subnet) {
            return match network.subnet {
                Some(subnet) if subnet != record.subnet => Err(format!(
                    "network {wanted} has subnet {}: give that subnet or none",
                    record.subnet
                )),
                _ => Ok(NetworkChoice::Join(wanted)),
            };
        }
    }
    let elsewhere: Vec<&NetworkRecord> = networks.values().filter(|r| r.name != wanted).collect();
    let subnet = match network.subnet {
        Some(subnet) => {
            if let Some(other) = elsewhere.iter().find(|r| overlaps(subnet, r.subnet)) {
                return Err(format!(
                    "subnet {subnet} overlaps network {}'s subnet {}: choose another, or leave it out and one is chosen",
                    other.name, other.subnet
                ));
            }
            subnet
        }
        None => {
            let taken: Vec<Ipv4Net> = elsewhere.iter().map(|r| r.subnet).collect();
            choose_subnet(&taken).ok_or_else(|| {
                format!(
                    "no /{CHOSEN_PREFIX} of {POOL}/{POOL_PREFIX} is free for network {wanted}: give it a subnet"
                )
            })?
        }
    };
    let vnis: BTreeSet<u32> = elsewhere.iter().map(|r| r.vni).collect();
    let vni = choose_vni(&vnis).ok_or("every VXLAN identifier is taken")?;
    Ok(NetworkChoice::Create(NetworkRecord {
        name: wanted,
        subnet,
        vni,
        created_ms: now_ms,
        hosts: BTreeMap::new(),
    }))
}

#[cfg(test)]
mod tests {
    use dunes_shared::{
        model::{AppName, RuntimeKind, TemplateName},
        network::PublishSpec,
        service::{ApplicationSpec, Readiness, ServiceRules},
    };

    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn service(name: &str, network: Option<NetworkSpec>) -> ServiceSpec {
        ServiceSpec {
            name: ServiceName::new(name).unwrap(),
            applications: vec![ApplicationSpec {
                name: AppName::new("web").unwrap(),
                runtime: RuntimeKind::Libvirt,
                template: TemplateName::new("tiny").unwrap(),
                image: None,
                disk_gib: None,
                user_data: None,
                interpreter: None,
                vcpus: 1,
                memory_mib: 128,
                storage_mib: 0,
                bandwidth_mbps: 0,
                instances: 1,
                readiness: Readiness::Running,
                depends_on: Vec::new(),
                guest_apps: Vec::new(),
                metric: None,
            }],
            rules: ServiceRules::default(),
            network,
        }
    }

    fn defined(spec: &ServiceSpec, has_instances: bool) -> DefinedService<'_> {
        DefinedService {
            name: &spec.name,
            network: spec.network.as_ref(),
            network_name: network_name(spec),
            has_instances,
        }
    }

    fn record(name: &str, subnet: &str, vni: u32) -> NetworkRecord {
        NetworkRecord {
            name: NetworkName::new(name).unwrap(),
            subnet: net(subnet),
            vni,
            created_ms: 0,
            hosts: BTreeMap::new(),
        }
    }

    fn networks(records: &[NetworkRecord]) -> BTreeMap<NetworkName, NetworkRecord> {
        records
            .iter()
            .map(|r| (r.name.clone(), r.clone()))
            .collect()
    }

    fn no_site(_: &HostId) -> Option<SiteName> {
        None
    }

    #[test]
    fn addresses_skip_the_gateway_and_what_is_taken() {
        let subnet = net("10.1.2.0/29");
        let mut taken = BTreeSet::new();
        let mut given = Vec::new();
        while let Some(a) = free_address(subnet, &taken) {
            taken.insert(a);
            given.push(a.to_string());
        }
        // .0 is the network, .1 the gateway, .7 the broadcast.
        assert_eq!(
            given,
            ["10.1.2.2", "10.1.2.3", "10.1.2.4", "10.1.2.5", "10.1.2.6"]
        );
        taken.remove(&"10.1.2.4".parse().unwrap());
        assert_eq!(
            free_address(subnet, &taken),
            Some("10.1.2.4".parse().unwrap())
        );
    }

    #[test]
    fn a_chosen_subnet_avoids_the_others() {
        assert_eq!(choose_subnet(&[]), Some(net("10.200.0.0/24")));
        assert_eq!(
            choose_subnet(&[net("10.200.0.0/23"), net("10.200.3.0/24")]),
            Some(net("10.200.2.0/24"))
        );
        assert_eq!(choose_subnet(&[net("10.0.0.0/8")]), None);
        assert_eq!(choose_vni(&[4096, 4097].into()), Some(4098));
    }

    #[test]
    fn a_service_gets_a_network_of_its_own() {
        let shop = service("shop", Some(NetworkSpec::default()));
        let existing = networks(&[record("other", "10.200.0.0/24", 4096)]);
        let choice = choose_network(&shop, None, &[], &existing, no_site, 7).unwrap();
        assert_eq!(
            choice,
            NetworkChoice::Create(NetworkRecord {
                name: NetworkName::new("shop").unwrap(),
                subnet: net("10.200.1.0/24"),
                vni: 4097,
                created_ms: 7,
                hosts: BTreeMap::new(),
            })
        );
        let plain = service("plain", None);
        assert_eq!(
            choose_network(&plain, None, &[], &existing, no_site, 7),
            Ok(NetworkChoice::None)
        );
    }

    #[test]
    fn an_overlapping_subnet_is_refused_with_the_network_it_overlaps() {
        let shop = service(
            "shop",
            Some(NetworkSpec {
                subnet: Some(net("10.200.0.128/25")),
                ..Default::default()
            }),
        );
        let existing = networks(&[record("other", "10.200.0.0/24", 4096)]);
        let err = choose_network(&shop, None, &[], &existing, no_site, 0).unwrap_err();
        assert!(
            err.contains("overlaps network other's subnet 10.200.0.0/24"),
            "{err}"
        );
    }

    #[test]
    fn services_share_a_named_network_as_it_is() {
        let shared = |subnet: Option<&str>| {
            Some(NetworkSpec {
                name: Some(NetworkName::new("backbone").unwrap()),
                subnet: subnet.map(net),
                ..Default::default()
            })
        };
        let first = service("first", shared(Some("10.9.0.0/24")));
        let existing = networks(&[record("backbone", "10.9.0.0/24", 4100)]);
        let others = [defined(&first, true)];
        let second = service("second", shared(None));
        assert_eq!(
            choose_network(&second, None, &others, &existing, no_site, 0),
            Ok(NetworkChoice::Join(NetworkName::new("backbone").unwrap()))
        );
        let other_subnet = service("second", shared(Some("10.9.1.0/24")));
        let err = choose_network(&other_subnet, None, &others, &existing, no_site, 0).unwrap_err();
        assert!(err.contains("has subnet 10.9.0.0/24"), "{err}");
        // Alone on it and without instances, a service may give its network another subnet.
        let alone = choose_network(
            &other_subnet,
            Some(&defined(&first, false)),
            &[],
            &existing,
            no_site,
            0,
        )
        .unwrap();
        assert!(
            matches!(&alone, NetworkChoice::Create(r) if r.subnet == net("10.9.1.0/24")),
            "{alone:?}"
        );
    }

    #[test]
    fn a_service_with_instances_keeps_its_network() {
        let before = service("shop", None);
        let after = service("shop", Some(NetworkSpec::default()));
        let err = choose_network(
            &after,
            Some(&defined(&before, true)),
            &[],
            &BTreeMap::new(),
            no_site,
            0,
        )
        .unwrap_err();
        assert!(err.contains("has instances on no network"), "{err}");
        assert!(
            choose_network(
                &after,
                Some(&defined(&before, false)),
                &[],
                &BTreeMap::new(),
                no_site,
                0
            )
            .is_ok()
        );
    }

    #[test]
    fn connect_names_a_service_with_a_network() {
        let shop = service(
            "shop",
            Some(NetworkSpec {
                connect: vec![ServiceName::new("payments").unwrap()],
                ..Default::default()
            }),
        );
        let err = choose_network(&shop, None, &[], &BTreeMap::new(), no_site, 0).unwrap_err();
        assert!(err.contains("payments, which does not exist"), "{err}");
        let bare = service("payments", None);
        let err = choose_network(
            &shop,
            None,
            &[defined(&bare, false)],
            &BTreeMap::new(),
            no_site,
            0,
        )
        .unwrap_err();
        assert!(err.contains("which has no network"), "{err}");
        let payments = service("payments", Some(NetworkSpec::default()));
        assert!(
            choose_network(
                &shop,
                None,
                &[defined(&payments, false)],
                &BTreeMap::new(),
                no_site,
                0
            )
            .is_ok()
        );
    }

    #[test]
    fn a_host_port_is_published_once_per_host() {
        let lausanne = SiteName::new("lausanne").unwrap();
        let publishing = |name: &str, hosts: PublishHosts| {
            service(
                name,
                Some(NetworkSpec {
                    publish: vec![PublishSpec {
                        app: AppName::new("web").unwrap(),
                        port: 80,
                        host_port: 8080,
                        hosts,
                    }],
                    ..Default::default()
                }),
            )
        };
        let site_of = |h: &HostId| (h.as_str() == "h1").then(|| SiteName::new("lausanne").unwrap());
        let first = publishing("first", PublishHosts::Site(lausanne.clone()));
        let others = [defined(&first, false)];
        for (hosts, refused) in [
            (PublishHosts::All, true),
            (PublishHosts::Site(lausanne.clone()), true),
            (PublishHosts::Site(SiteName::new("geneva").unwrap()), false),
            (PublishHosts::Host(HostId::new("h1").unwrap()), true),
            (PublishHosts::Host(HostId::new("h2").unwrap()), false),
        ] {
            let second = publishing("second", hosts.clone());
            let result = choose_network(&second, None, &others, &BTreeMap::new(), site_of, 0);
            assert_eq!(result.is_err(), refused, "{hosts}: {result:?}");
            if let Err(e) = result {
                assert!(e.contains("published by service first already"), "{e}");
            }
        }
    }
}
