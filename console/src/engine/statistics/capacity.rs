//! Capacity per site: for CPU, memory and storage, what the hosts have, what their workloads
//! are given (allocated), what is measured in use, and what is free. Pure: built from the
//! snapshot's hosts; the forecast of when a resource is full is added by the engine from the
//! stored history ([`site_history`] says which series make it).

use std::collections::BTreeMap;

use dunes_shared::model::HostId;

use crate::engine::{
    snapshot::HostView,
    statistics::forecast::Forecast,
    statistics::series::{Metric, Subject, series_key},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Cpu,
    Memory,
    Storage,
}

impl Resource {
    pub const ALL: [Resource; 3] = [Resource::Cpu, Resource::Memory, Resource::Storage];

    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Cpu => "cpu",
            Resource::Memory => "memory",
            Resource::Storage => "storage",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Resource::Cpu => "CPUs",
            Resource::Memory | Resource::Storage => "MiB",
        }
    }
}

/// One resource of a site.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceUse {
    pub resource: Resource,
    pub capacity: f64,
    /// Given to workloads: vCPUs, memory, disk bytes of every VM (running or not).
    pub allocated: f64,
    /// Measured by the agents now (CPU load, memory in use, storage used); `None` when no
    /// host of the site has said.
    pub used: Option<f64>,
    /// When it is full, from the daily peaks of its use (memory and CPU only).
    pub forecast: Option<Forecast>,
    /// The daily peaks of its use the forecast was made from: `(UTC day number, peak)`.
    pub peaks: Vec<(f64, f64)>,
}

impl ResourceUse {
    /// What is left: capacity less the larger of the allocated and the used.
    pub fn free(&self) -> f64 {
        (self.capacity - self.allocated.max(self.used.unwrap_or(0.0))).max(0.0)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SiteCapacity {
    pub site: String,
    pub hosts: Vec<HostId>,
    pub resources: Vec<ResourceUse>,
}

impl SiteCapacity {
    pub fn resource(&self, r: Resource) -> Option<&ResourceUse> {
        self.resources.iter().find(|u| u.resource == r)
    }
}

/// Workloads a what-if adds: an instance of a plan on the host it would go to.
#[derive(Debug, Clone, PartialEq)]
pub struct Extra {
    pub host: HostId,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub storage_mib: u64,
}

/// What a what-if changes: hosts drained away, workloads added.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WhatIf {
    pub leave_out: Vec<HostId>,
    pub add: Vec<Extra>,
}

/// Capacity of every site with at least one host whose inventory is known, by site name.
/// Hosts in `what_if.leave_out` count for nothing (what a drain would leave), and the
/// workloads of `what_if.add` count as allocated on their hosts.
pub fn site_capacity<'a>(
    hosts: impl IntoIterator<Item = &'a HostView>,
    what_if: &WhatIf,
) -> Vec<SiteCapacity> {
    #[derive(Default)]
    struct Sums {
        hosts: Vec<HostId>,
        capacity: [f64; 3],
        allocated: [f64; 3],
        used: [Option<f64>; 3],
    }
    let mut sites: BTreeMap<String, Sums> = BTreeMap::new();
    for host in hosts {
        let Some(inv) = host.inventory() else {
            continue;
        };
        let sums = sites.entry(inv.site.name.to_string()).or_default();
        if what_if.leave_out.contains(host.id()) {
            continue;
        }
        for extra in what_if.add.iter().filter(|e| &e.host == host.id()) {
            sums.allocated[0] += f64::from(extra.vcpus);
            sums.allocated[1] += extra.memory_mib as f64;
            sums.allocated[2] += extra.storage_mib as f64;
        }
        sums.hosts.push(host.id().clone());
        sums.capacity[0] += f64::from(inv.cpus);
        sums.capacity[1] += inv.memory_mib as f64;
        sums.capacity[2] += inv.storage_total_mib as f64;
        for vm in &host.vms {
            sums.allocated[0] += f64::from(vm.vcpus);
            sums.allocated[1] += vm.memory_mib as f64;
            sums.allocated[2] += vm.disk_bytes as f64 / 1_048_576.0;
        }
        if let Some(status) = host.status {
            let used = [
                f64::from(status.cpu_load_percent) / 100.0 * f64::from(inv.cpus),
                status.memory_used_mib as f64,
                inv.storage_total_mib
                    .saturating_sub(status.storage_free_mib) as f64,
            ];
            for (slot, value) in sums.used.iter_mut().zip(used) {
                *slot = Some(slot.unwrap_or(0.0) + value);
            }
        }
    }
    sites
        .into_iter()
        .map(|(site, s)| SiteCapacity {
            site,
            hosts: s.hosts,
            resources: Resource::ALL
                .iter()
                .enumerate()
                .map(|(i, &resource)| ResourceUse {
                    resource,
                    capacity: s.capacity[i],
                    allocated: s.allocated[i],
                    used: s.used[i],
                    forecast: None,
                    peaks: Vec::new(),
                })
                .collect(),
        })
        .collect()
}

/// The series whose sum over a site's hosts is its use of `resource` over time (hourly
/// means), and the factor from the series' unit to the resource's: CPU % of a host's CPUs
/// to CPUs, memory MiB as it is. Storage has no series yet.
pub fn site_history(
    site: &SiteCapacity,
    resource: Resource,
    cpus_of: impl Fn(&HostId) -> f64,
) -> Vec<(String, f64)> {
    site.hosts
        .iter()
        .filter_map(|h| {
            let subject = Subject::Host(h.clone());
            match resource {
                Resource::Cpu => Some((series_key(&subject, Metric::Cpu), cpus_of(h) / 100.0)),
                Resource::Memory => Some((series_key(&subject, Metric::Memory), 1.0)),
                Resource::Storage => None,
            }
        })
        .collect()
}

/// Sums per-host series into the site's: `(unix secs, value)` for every bucket start any of
/// them has, each host's value scaled by its factor.
pub fn sum_series(series: &[(Vec<(u64, f64)>, f64)]) -> Vec<(u64, f64)> {
    let mut sums: BTreeMap<u64, f64> = BTreeMap::new();
    for (points, factor) in series {
        for &(at, value) in points {
            *sums.entry(at).or_default() += value * factor;
        }
    }
    sums.into_iter().collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::engine::records::HostRecord;
    use dunes_shared::model::{
        HostInventory, HostStatus, Prices, RuntimeKind, Site, SizesFrom, VmName, VmState, VmStatus,
    };

    /// A host online with `vms` running (`vm0`, `vm1`…, 100 MiB of disk each), 600 MiB of
    /// storage free.
    pub(crate) fn host(
        id: &str,
        site: &str,
        cpus: u32,
        memory_mib: u64,
        vms: &[(u32, u64)],
    ) -> HostView {
        let id = HostId::new(id).unwrap();
        HostView {
            record: HostRecord {
                inventory: Some(HostInventory {
                    host_id: id.clone(),
                    hostname: id.to_string(),
                    cpus,
                    cpu_model: "x".into(),
                    memory_mib,
                    storage_total_mib: 1000,
                    storage_free_mib: 600,
                    network: vec![],
                    runtimes: vec![],
                    site: Site {
                        name: dunes_shared::model::SiteName::new(site).unwrap(),
                        ..Site::default()
                    },
                    prices: Prices::default(),
                    security_level: 0,
                    agent_version: String::new(),
                    sizes_from: SizesFrom::default(),
                    interpreters: vec![],
                    template_disks: vec![],
                }),
                id,
                address: "127.0.0.1:1".into(),
                fingerprint: dunes_shared::pki::Fingerprint::of_public_key(b"k"),
                enrolled_at_ms: 0,
                cert_expires_ms: None,
                maintenance: None,
            },
            link: crate::engine::LinkState::Online,
            link_error: None,
            status: Some(HostStatus {
                cpu_load_percent: 50.0,
                memory_used_mib: memory_mib / 4,
                memory_total_mib: memory_mib,
                storage_free_mib: 600,
                vms_running: 0,
                uptime_secs: 1,
            }),
            vms: vms
                .iter()
                .enumerate()
                .map(|(i, &(vcpus, memory_mib))| VmStatus {
                    uuid: String::new(),
                    name: VmName::new(format!("vm{i}")).unwrap(),
                    state: VmState::Running,
                    vcpus,
                    memory_mib,
                    template: None,
                    disk_bytes: 100 << 20,
                    runtime: RuntimeKind::Libvirt,
                    overlay_on: None,
                    disks: None,
                    nics: None,
                    autostart: None,
                    next_start: None,
                    addresses: None,
                    snapshots: None,
                    installer: None,
                    screen: false,
                })
                .collect(),
            skipped_events: Default::default(),
        }
    }

    #[test]
    fn sites_sum_their_hosts_and_a_drained_host_counts_for_nothing() {
        let hosts = [
            host("a1", "lsn", 4, 8192, &[(2, 2048), (1, 1024)]),
            host("a2", "lsn", 8, 16384, &[(4, 4096)]),
            host("b1", "gva", 2, 4096, &[]),
        ];
        let sites = site_capacity(&hosts, &WhatIf::default());
        assert_eq!(sites.len(), 2);
        let lsn = sites.iter().find(|s| s.site == "lsn").unwrap();
        let cpu = lsn.resource(Resource::Cpu).unwrap();
        assert_eq!(
            (cpu.capacity, cpu.allocated, cpu.used),
            (12.0, 7.0, Some(6.0))
        );
        assert_eq!(cpu.free(), 5.0);
        let memory = lsn.resource(Resource::Memory).unwrap();
        assert_eq!((memory.capacity, memory.allocated), (24576.0, 7168.0));
        assert_eq!(memory.used, Some(6144.0));
        let storage = lsn.resource(Resource::Storage).unwrap();
        assert_eq!(
            (storage.capacity, storage.allocated, storage.used),
            (2000.0, 300.0, Some(800.0))
        );
        assert_eq!(storage.free(), 1200.0);
        // Draining a2: its capacity and its workloads' allocation leave the sums.
        let drained = site_capacity(
            &hosts,
            &WhatIf {
                leave_out: vec![HostId::new("a2").unwrap()],
                add: vec![Extra {
                    host: HostId::new("a1").unwrap(),
                    vcpus: 1,
                    memory_mib: 512,
                    storage_mib: 10,
                }],
            },
        );
        let lsn = drained.iter().find(|s| s.site == "lsn").unwrap();
        let cpu = lsn.resource(Resource::Cpu).unwrap();
        // a1's own 3 vCPUs and the one a deploy would add.
        assert_eq!((cpu.capacity, cpu.allocated), (4.0, 4.0));
        assert_eq!(lsn.hosts, vec![HostId::new("a1").unwrap()]);
        // CPU history: each host's % of its own CPUs, summed as CPUs.
        let series = site_history(lsn, Resource::Cpu, |_| 4.0);
        assert_eq!(series, vec![("host/a1/cpu".to_string(), 0.04)]);
        let summed = sum_series(&[
            (vec![(0, 50.0), (3600, 100.0)], 0.04),
            (vec![(0, 10.0)], 1.0),
        ]);
        assert_eq!(summed, vec![(0, 12.0), (3600, 4.0)]);
    }
}
