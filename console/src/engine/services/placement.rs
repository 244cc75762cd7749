//! Placement: on which host each instance of a service runs. Pure and deterministic: the same
//! fleet and service give the same plan, and nothing here does I/O.
//!
//! Hard rules filter hosts (runtime, interpreter, security level, sites, pinning, free
//! resources, distinct hosts, anti-affinity, affinity, the service's cost ceiling); among the
//! hosts left, the cheapest wins, then the one running fewest of the service's instances, then
//! the one whose link serves the application's bandwidth best, then the lowest host id. Every
//! host that cannot take an application gets a sentence saying why; an instance that fits
//! nowhere gets one saying what would make it fit.

use std::{collections::BTreeMap, fmt::Write as _};

use dunes_shared::{
    model::{AppName, HostId, ImageName, Prices, RuntimeKind, SiteName},
    service::{ApplicationSpec, ServiceSpec},
};

/// Hours in a month, for prices per month.
const HOURS_PER_MONTH: f64 = 730.0;

/// What a host can still give.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resources {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub storage_mib: u64,
}

/// An interpreter a host found, with its version (`python3`, `3.11.2`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interpreter {
    pub name: String,
    pub version: String,
}

/// A host as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostOffer {
    pub id: HostId,
    pub online: bool,
    /// In maintenance: keeps what it runs, takes nothing new.
    pub maintenance: bool,
    pub site: SiteName,
    pub security_level: u8,
    pub prices: Prices,
    pub link_bandwidth_mbps: u32,
    pub runtimes: Vec<RuntimeKind>,
    pub interpreters: Vec<Interpreter>,
    /// What is free once everything already running is counted, this service's kept
    /// instances included.
    pub free: Resources,
    /// Names of VMs on the host that are not this service's: an instance of the same name
    /// cannot be created there.
    pub taken_names: std::collections::BTreeSet<String>,
    /// BLAKE3 digests of the images the host holds: an image it holds is not sent again.
    pub images_held: std::collections::BTreeSet<String>,
}

/// A library image an application's VMs boot from, as placement counts it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageNeed {
    pub blake3: String,
    /// What a host's storage takes for its copy.
    pub mib: u64,
}

/// The library's images by name.
pub type ImageNeeds = BTreeMap<ImageName, ImageNeed>;

/// An image a placement sends to its host before the instance is made there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageTransfer {
    pub image: ImageName,
    pub mib: u64,
    /// Its time over the host's link, rounded up; `None` when the link's speed is unknown.
    pub secs: Option<u64>,
}

impl ImageTransfer {
    fn over(image: &ImageName, mib: u64, link_mbps: u32) -> ImageTransfer {
        // 1 MiB is 8.388608 Mbit.
        let secs =
            (link_mbps > 0).then(|| (mib as f64 * 8.388608 / f64::from(link_mbps)).ceil() as u64);
        ImageTransfer {
            image: image.clone(),
            mib,
            secs,
        }
    }
}

/// An instance of the service that runs already.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Existing {
    pub app: AppName,
    pub index: u32,
    pub host: HostId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    Keep,
}

/// One instance and where it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub app: AppName,
    pub index: u32,
    pub host: HostId,
    pub action: Action,
    pub cost_per_hour: f64,
    /// The image that goes to the host first, for the first of the service's instances made
    /// from it there.
    pub image_transfer: Option<ImageTransfer>,
}

/// An instance that fits nowhere, and what would make it fit.
#[derive(Debug, Clone, PartialEq)]
pub struct Unplaced {
    pub app: AppName,
    pub index: u32,
    pub would_fit: String,
}

/// Why one host cannot take an application: `"gva-1: security level 1 < required 3"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub host: HostId,
    pub reason: String,
}

/// What a deploy would do.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub placements: Vec<Placement>,
    /// Instances beyond the wanted count, or of applications the service no longer has.
    pub removals: Vec<Existing>,
    pub unplaced: Vec<Unplaced>,
    /// For each application, every host that runs none of its instances and why.
    pub rejections: BTreeMap<AppName, Vec<Rejection>>,
    pub cost_per_hour: f64,
    /// The operator's overrides and whether each holds: `Err` is the rule it breaks.
    pub overrides: Vec<OverrideVerdict>,
}

/// The operator's choice of host for one instance, over what placement would pick.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Override {
    pub app: AppName,
    pub index: u32,
    pub host: HostId,
}

/// Whether an override holds.
#[derive(Debug, Clone, PartialEq)]
pub struct OverrideVerdict {
    pub placement: Override,
    /// `Err`: the sentence of the rule or resource it breaks on that host.
    pub verdict: Result<(), String>,
}

impl Plan {
    pub fn is_feasible(&self) -> bool {
        self.unplaced.is_empty()
    }

    /// Whether applying it would change anything.
    pub fn changes(&self) -> bool {
        !self.removals.is_empty() || self.placements.iter().any(|p| p.action == Action::Create)
    }

    pub fn cost_of(&self, app: &AppName) -> f64 {
        self.placements
            .iter()
            .filter(|p| &p.app == app)
            .fold(0.0, |sum, p| sum + p.cost_per_hour)
    }
}

/// The cost per hour of an instance on a host with `prices`.
pub fn instance_cost_per_hour(app: &ApplicationSpec, prices: &Prices) -> f64 {
    f64::from(app.vcpus) * prices.per_cpu_hour
        + app.memory_mib as f64 / 1024.0 * prices.per_gb_memory_hour
        + app.storage_mib as f64 / 1024.0 * prices.per_gb_month_stored / HOURS_PER_MONTH
}

/// Why a host cannot take one instance; rendered into a sentence only when shown.
#[derive(Debug, Clone, PartialEq)]
enum Reject {
    Offline,
    Maintenance,
    NoRuntime(RuntimeKind),
    NoInterpreter(String),
    OldInterpreter {
        name: String,
        found: String,
        needed: String,
    },
    Security {
        level: u8,
        needed: u8,
    },
    Site(SiteName),
    PinnedHosts,
    PinnedSites,
    Vcpus {
        free: u32,
        needed: u32,
    },
    Memory {
        free: u64,
        needed: u64,
    },
    Storage {
        free: u64,
        needed: u64,
        /// Of `needed`, the image the host does not hold yet.
        image_mib: u64,
    },
    Distinct {
        instance: u32,
    },
    AntiAffinity {
        other: usize,
        instance: u32,
    },
    Affinity {
        with: usize,
    },
    NameTaken(String),
    Cost {
        total: f64,
        max: f64,
    },
}

fn gib(mib: u64) -> String {
    format!("{:.1} GiB", mib as f64 / 1024.0)
}

/// Compares dotted version numbers (`3.9` < `3.11`); a part that is not a number counts as 0.
fn version_at_least(found: &str, needed: &str) -> bool {
    let parts = |v: &str| -> Vec<u64> {
        v.split(['.', '-', '+'])
            .map(|p| p.parse().unwrap_or(0))
            .collect()
    };
    let (f, n) = (parts(found), parts(needed));
    for i in 0..f.len().max(n.len()) {
        let (a, b) = (
            f.get(i).copied().unwrap_or(0),
            n.get(i).copied().unwrap_or(0),
        );
        if a != b {
            return a > b;
        }
    }
    true
}

/// The placement of one service: the working state of [`place_instances`].
struct Placer<'a> {
    service: &'a ServiceSpec,
    hosts: &'a [HostOffer],
    free: Vec<Resources>,
    /// `count[app][host]`: instances of an application on a host.
    count: Vec<Vec<u32>>,
    /// An instance of each application on each host, for the sentences.
    some_instance: Vec<Vec<u32>>,
    /// Instances of the whole service on each host, for spreading.
    service_count: Vec<u32>,
    /// Applications each application may not share a host with.
    anti: Vec<Vec<usize>>,
    /// Applications each application must run beside.
    affine: Vec<Vec<usize>>,
    distinct: Vec<bool>,
    /// The first reason each host gave for each application.
    first_reject: Vec<Vec<Option<Reject>>>,
    cost_so_far: f64,
    /// `image[app]`: the image the application's VMs boot from, with its name.
    image: Vec<Option<(&'a ImageName, &'a ImageNeed)>>,
    /// `held[host]`: the images a host holds, with those sent to it by this plan.
    held: Vec<std::collections::BTreeSet<String>>,
}

impl<'a> Placer<'a> {
    fn app_index(&self, name: &AppName) -> Option<usize> {
        self.service
            .applications
            .iter()
            .position(|a| &a.name == name)
    }

    /// The rules that depend only on the host, checked once per application.
    fn static_reject(&self, app: &ApplicationSpec, host: &HostOffer) -> Option<Reject> {
        let rules = &self.service.rules;
        if !host.online {
            return Some(Reject::Offline);
        }
        if !host.runtimes.contains(&app.runtime) {
            return Some(Reject::NoRuntime(app.runtime));
        }
        if let Some(need) = &app.interpreter {
            match host.interpreters.iter().find(|i| i.name == need.name) {
                None => return Some(Reject::NoInterpreter(need.name.clone())),
                Some(found) => {
                    if let Some(min) = &need.min_version
                        && !version_at_least(&found.version, min)
                    {
                        return Some(Reject::OldInterpreter {
                            name: need.name.clone(),
                            found: found.version.clone(),
                            needed: min.clone(),
                        });
                    }
                }
            }
        }
        let needed = rules
            .min_security_level
            .iter()
            .filter(|r| r.application.as_ref().is_none_or(|a| a == &app.name))
            .map(|r| r.level)
            .max();
        if let Some(needed) = needed
            && host.security_level < needed
        {
            return Some(Reject::Security {
                level: host.security_level,
                needed,
            });
        }
        if !rules.allowed_sites.is_empty() && !rules.allowed_sites.contains(&host.site) {
            return Some(Reject::Site(host.site.clone()));
        }
        for pin in rules.pin.iter().filter(|p| p.application == app.name) {
            if !pin.hosts.is_empty() && !pin.hosts.contains(&host.id) {
                return Some(Reject::PinnedHosts);
            }
            if !pin.sites.is_empty() && !pin.sites.contains(&host.site) {
                return Some(Reject::PinnedSites);
            }
        }
        None
    }

    /// The rules that depend on what is placed so far.
    fn dynamic_reject(&self, a: usize, h: usize, cost: f64) -> Option<Reject> {
        self.resource_reject(a, h)
            .or_else(|| self.neighbour_reject(a, h))
            .or_else(|| self.cost_reject(cost))
    }

    /// The MiB of the image application `a`'s instance would send to host `h` first.
    fn image_mib(&self, a: usize, h: usize) -> u64 {
        match self.image[a] {
            Some((_, need)) if !self.held[h].contains(&need.blake3) => need.mib,
            _ => 0,
        }
    }

    fn resource_reject(&self, a: usize, h: usize) -> Option<Reject> {
        let app = &self.service.applications[a];
        let free = self.free[h];
        let image_mib = self.image_mib(a, h);
        if free.vcpus < app.vcpus {
            return Some(Reject::Vcpus {
                free: free.vcpus,
                needed: app.vcpus,
            });
        }
        if free.memory_mib < app.memory_mib {
            return Some(Reject::Memory {
                free: free.memory_mib,
                needed: app.memory_mib,
            });
        }
        if free.storage_mib < app.storage_mib + image_mib {
            return Some(Reject::Storage {
                free: free.storage_mib,
                needed: app.storage_mib + image_mib,
                image_mib,
            });
        }
        None
    }

    /// Distinct hosts, anti-affinity and affinity: what may run beside what.
    fn neighbour_reject(&self, a: usize, h: usize) -> Option<Reject> {
        if self.distinct[a] && self.count[a][h] > 0 {
            return Some(Reject::Distinct {
                instance: self.some_instance[a][h],
            });
        }
        for &other in &self.anti[a] {
            if self.count[other][h] > 0 {
                return Some(Reject::AntiAffinity {
                    other,
                    instance: self.some_instance[other][h],
                });
            }
        }
        for &with in &self.affine[a] {
            if self.count[with][h] == 0 {
                return Some(Reject::Affinity { with });
            }
        }
        None
    }

    fn name_reject(&self, h: usize, vm: Option<&str>) -> Option<Reject> {
        let vm = vm?;
        self.hosts[h]
            .taken_names
            .contains(vm)
            .then(|| Reject::NameTaken(vm.to_string()))
    }

    fn cost_reject(&self, cost: f64) -> Option<Reject> {
        if let Some(max) = self.service.rules.max_cost_per_hour
            && self.cost_so_far + cost > max + 1e-9
        {
            return Some(Reject::Cost {
                total: self.cost_so_far + cost,
                max,
            });
        }
        None
    }

    fn note(&mut self, a: usize, h: usize, reject: Reject) {
        let slot = &mut self.first_reject[a][h];
        if slot.is_none() {
            *slot = Some(reject);
        }
    }

    /// Counts an instance of `a` on `h`; answers the image sent there first, if any.
    fn take(
        &mut self,
        a: usize,
        h: usize,
        index: u32,
        count_resources: bool,
    ) -> Option<ImageTransfer> {
        let app = &self.service.applications[a];
        let mut transfer = None;
        if count_resources {
            let image_mib = self.image_mib(a, h);
            let free = &mut self.free[h];
            free.vcpus -= app.vcpus;
            free.memory_mib -= app.memory_mib;
            free.storage_mib -= app.storage_mib + image_mib;
            if let Some((name, need)) = self.image[a]
                && image_mib > 0
            {
                transfer = Some(ImageTransfer::over(
                    name,
                    need.mib,
                    self.hosts[h].link_bandwidth_mbps,
                ));
            }
        }
        if let Some((_, need)) = self.image[a] {
            self.held[h].insert(need.blake3.clone());
        }
        if self.count[a][h] == 0 {
            self.some_instance[a][h] = index;
        }
        self.count[a][h] += 1;
        self.service_count[h] += 1;
        transfer
    }

    fn sentence(&self, app: &ApplicationSpec, host: &HostOffer, reject: &Reject) -> String {
        let name = |i: usize| self.service.applications[i].name.as_str();
        let mut s = format!("{}: ", host.id);
        let _ = match reject {
            Reject::Offline => write!(s, "unreachable"),
            Reject::Maintenance => write!(s, "in maintenance, takes nothing new"),
            Reject::NoRuntime(r) => write!(s, "has no {} runtime", r.as_str()),
            Reject::NoInterpreter(n) => write!(s, "has no {n} interpreter"),
            Reject::OldInterpreter {
                name,
                found,
                needed,
            } => write!(s, "{name} {found} < {needed} needed"),
            Reject::Security { level, needed } => {
                write!(s, "security level {level} < required {needed}")
            }
            Reject::Site(site) => write!(
                s,
                "site {site} is not allowed ({})",
                self.service
                    .rules
                    .allowed_sites
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Reject::PinnedHosts => write!(s, "{} is pinned to other hosts", app.name),
            Reject::PinnedSites => write!(s, "{} is pinned to other sites", app.name),
            Reject::Vcpus { free, needed } => write!(s, "{free} vCPUs free < {needed} needed"),
            Reject::Memory { free, needed } => {
                write!(s, "memory {} free < {} needed", gib(*free), gib(*needed))
            }
            Reject::Storage {
                free,
                needed,
                image_mib: 0,
            } => write!(s, "storage {} free < {} needed", gib(*free), gib(*needed)),
            Reject::Storage {
                free,
                needed,
                image_mib,
            } => write!(
                s,
                "storage {} free < {} needed (with image {}, {}, which it does not hold yet)",
                gib(*free),
                gib(*needed),
                app.image.as_ref().map_or("", |i| i.as_str()),
                gib(*image_mib)
            ),
            Reject::Distinct { instance } => write!(
                s,
                "already runs {}-{instance} (distinct hosts for {})",
                app.name, app.name
            ),
            Reject::AntiAffinity { other, instance } => write!(
                s,
                "already runs {}-{instance} (anti-affinity {}/{})",
                name(*other),
                app.name,
                name(*other)
            ),
            Reject::NameTaken(vm) => write!(
                s,
                "has a VM named {vm} outside the service (adopt it or remove it)"
            ),
            Reject::Affinity { with } => write!(
                s,
                "runs no {} instance (affinity {}/{})",
                name(*with),
                name(*with),
                app.name
            ),
            Reject::Cost { total, max } => write!(
                s,
                "would bring the service to {total:.3}/h > max {max:.3}/h"
            ),
        };
        s
    }

    /// What would make an instance fit, from the reasons its candidates gave.
    fn would_fit(&self, a: usize, candidates: &[usize]) -> String {
        let app = &self.service.applications[a];
        if candidates.is_empty() {
            let reasons: Vec<String> = self
                .hosts
                .iter()
                .filter_map(|h| {
                    self.static_reject(app, h)
                        .map(|r| self.sentence(app, h, &r))
                })
                .collect();
            return if reasons.is_empty() {
                "no host is enrolled".into()
            } else {
                format!(
                    "no host meets {}'s rules: add or change a host ({})",
                    app.name,
                    reasons.join("; ")
                )
            };
        }
        // The candidate short of the least, in MiB of memory first, then vCPUs, then storage.
        let mut best: Option<(u64, u32, u64, usize)> = None;
        for &h in candidates {
            let free = self.free[h];
            let short = (
                app.memory_mib.saturating_sub(free.memory_mib),
                app.vcpus.saturating_sub(free.vcpus),
                (app.storage_mib + self.image_mib(a, h)).saturating_sub(free.storage_mib),
                h,
            );
            let rules_ok = self.neighbour_reject(a, h).is_none();
            if rules_ok
                && (short.0, short.1, short.2) != (0, 0, 0)
                && best.is_none_or(|b| short < b)
            {
                best = Some(short);
            }
        }
        if let Some((memory, vcpus, storage, h)) = best {
            let mut needs = Vec::new();
            if memory > 0 {
                needs.push(format!("{} more memory", gib(memory)));
            }
            if vcpus > 0 {
                needs.push(format!("{vcpus} more vCPUs"));
            }
            if storage > 0 {
                needs.push(format!("{} more storage", gib(storage)));
            }
            return format!(
                "needs {} on a {} host",
                needs.join(" and "),
                self.hosts[h].site
            );
        }
        if let Some(max) = self.service.rules.max_cost_per_hour {
            let cheapest = candidates
                .iter()
                .map(|&h| instance_cost_per_hour(app, &self.hosts[h].prices))
                .fold(f64::INFINITY, f64::min);
            if self.cost_so_far + cheapest > max + 1e-9 {
                return format!(
                    "needs max_cost_per_hour of at least {:.3}",
                    self.cost_so_far + cheapest
                );
            }
        }
        format!(
            "needs one more host that meets {}'s rules (every candidate already holds what its rules forbid beside it)",
            app.name
        )
    }
}

/// Applications in placement order: the most constrained first (distinct hosts, then
/// anti-affinity), each after the applications it must run beside, then by start order.
fn placement_order(service: &ServiceSpec) -> Vec<usize> {
    let index = |n: &AppName| service.applications.iter().position(|a| &a.name == n);
    let mut by_start: Vec<usize> = match service.start_order() {
        Some(order) => order.iter().filter_map(|a| index(&a.name)).collect(),
        None => (0..service.applications.len()).collect(),
    };
    let rules = &service.rules;
    let constraint = |a: usize| {
        let name = &service.applications[a].name;
        if rules.distinct_hosts.contains(name) {
            0
        } else if rules.anti_affinity.iter().any(|pair| pair.contains(name)) {
            1
        } else {
            2
        }
    };
    // Stable: the start order stays within each group.
    by_start.sort_by_key(|&a| constraint(a));
    let mut placed: Vec<usize> = Vec::with_capacity(by_start.len());
    let mut left = by_start;
    while !left.is_empty() {
        let next = left
            .iter()
            .position(|&a| {
                service
                    .rules
                    .affinity
                    .iter()
                    .filter(|[_, b]| Some(a) == index(b))
                    .all(|[first, _]| index(first).is_none_or(|f| placed.contains(&f)))
            })
            .unwrap_or(0);
        placed.push(left.remove(next));
    }
    placed
}

/// Places every instance of `service` on `hosts`, keeping the instances in `existing` where
/// they are when the rules still allow it (always, for applications that never relocate).
pub fn place_instances(service: &ServiceSpec, hosts: &[HostOffer], existing: &[Existing]) -> Plan {
    place_instances_with(service, hosts, existing, &[], &ImageNeeds::new())
}

/// As [`place_instances`], with instances the operator placed by hand: each goes to its host
/// if every rule and the host's free resources allow it (before the other instances of its
/// application), and is left unplaced with the reason otherwise. An override of an instance
/// that is kept where it runs is not applied: a running instance is not moved by a plan.
/// An application made from a library image counts the image against the storage of each
/// host that does not hold it, once, and its placement there says what goes first and how
/// long that takes over the host's link; an image the library does not have places nothing.
pub fn place_instances_with(
    service: &ServiceSpec,
    hosts: &[HostOffer],
    existing: &[Existing],
    overrides: &[Override],
    images: &ImageNeeds,
) -> Plan {
    let n_apps = service.applications.len();
    let n_hosts = hosts.len();
    let mut p = Placer {
        service,
        hosts,
        free: hosts.iter().map(|h| h.free).collect(),
        count: vec![vec![0; n_hosts]; n_apps],
        some_instance: vec![vec![0; n_hosts]; n_apps],
        service_count: vec![0; n_hosts],
        anti: vec![Vec::new(); n_apps],
        affine: vec![Vec::new(); n_apps],
        distinct: vec![false; n_apps],
        first_reject: vec![vec![None; n_hosts]; n_apps],
        cost_so_far: 0.0,
        image: service
            .applications
            .iter()
            .map(|a| {
                let name = a.image.as_ref()?;
                images.get_key_value(name)
            })
            .collect(),
        held: hosts.iter().map(|h| h.images_held.clone()).collect(),
    };
    for [x, y] in &service.rules.anti_affinity {
        if let (Some(x), Some(y)) = (p.app_index(x), p.app_index(y)) {
            p.anti[x].push(y);
            p.anti[y].push(x);
        }
    }
    for [first, second] in &service.rules.affinity {
        if let (Some(f), Some(s)) = (p.app_index(first), p.app_index(second)) {
            p.affine[s].push(f);
        }
    }
    for name in &service.rules.distinct_hosts {
        if let Some(a) = p.app_index(name) {
            p.distinct[a] = true;
        }
    }
    let host_index = |id: &HostId| hosts.iter().position(|h| &h.id == id);
    let any_taken = hosts.iter().any(|h| !h.taken_names.is_empty());
    let mut verdicts = Vec::new();
    let mut placements = Vec::new();
    let mut removals = Vec::new();
    let mut unplaced = Vec::new();

    // What runs already: kept if wanted and allowed, removed otherwise.
    let mut kept: Vec<Vec<bool>> = service
        .applications
        .iter()
        .map(|a| vec![false; a.instances as usize])
        .collect();
    let mut sorted_existing: Vec<&Existing> = existing.iter().collect();
    sorted_existing.sort_by(|x, y| (&x.app, x.index).cmp(&(&y.app, y.index)));
    for e in sorted_existing {
        let (Some(a), Some(h)) = (p.app_index(&e.app), host_index(&e.host)) else {
            removals.push(e.clone());
            continue;
        };
        let app = &service.applications[a];
        if e.index >= app.instances || kept[a][e.index as usize] {
            removals.push(e.clone());
            continue;
        }
        let never_relocate = service.rules.never_relocate.contains(&app.name);
        let allowed = p.static_reject(app, &hosts[h]).is_none();
        if allowed || never_relocate {
            let cost = instance_cost_per_hour(app, &hosts[h].prices);
            p.cost_so_far += cost;
            p.take(a, h, e.index, false);
            kept[a][e.index as usize] = true;
            placements.push(Placement {
                app: app.name.clone(),
                index: e.index,
                host: hosts[h].id.clone(),
                action: Action::Keep,
                cost_per_hour: cost,
                image_transfer: None,
            });
        } else {
            removals.push(e.clone());
        }
    }

    for a in placement_order(service) {
        let app = &service.applications[a];
        if let Some(image) = app.image.as_ref().filter(|_| p.image[a].is_none()) {
            for index in (0..app.instances).filter(|&i| !kept[a][i as usize]) {
                unplaced.push(Unplaced {
                    app: app.name.clone(),
                    index,
                    would_fit: format!(
                        "needs image {image}, which the library does not have: ctl image import FILE --name {image}"
                    ),
                });
            }
            continue;
        }
        let mut candidates = Vec::with_capacity(n_hosts);
        for (h, host) in hosts.iter().enumerate() {
            if host.maintenance && host.online {
                p.note(a, h, Reject::Maintenance);
                continue;
            }
            match p.static_reject(app, host) {
                None => candidates.push(h),
                Some(r) => p.note(a, h, r),
            }
        }
        let costs: Vec<f64> = candidates
            .iter()
            .map(|&h| instance_cost_per_hour(app, &hosts[h].prices))
            .collect();
        let chosen = |index: u32| {
            overrides
                .iter()
                .find(|o| o.app == app.name && o.index == index)
        };
        // The operator's choices first, so that the others work around them.
        let mut order: Vec<u32> = (0..app.instances)
            .filter(|&i| chosen(i).is_some())
            .collect();
        order.extend((0..app.instances).filter(|&i| chosen(i).is_none()));
        for index in order {
            if kept[a][index as usize] {
                continue;
            }
            // Only where some host has VMs of other names is the instance's name needed.
            let vm = any_taken.then(|| format!("{}-{}-{index}", service.name, app.name));
            let vm = vm.as_deref();
            if let Some(choice) = chosen(index) {
                let verdict = match host_index(&choice.host) {
                    None => Err(format!("{}: not in the fleet", choice.host)),
                    Some(h) => {
                        let cost = instance_cost_per_hour(app, &hosts[h].prices);
                        match p
                            .static_reject(app, &hosts[h])
                            .or_else(|| p.dynamic_reject(a, h, cost))
                            .or_else(|| p.name_reject(h, vm))
                        {
                            Some(r) => Err(p.sentence(app, &hosts[h], &r)),
                            None => {
                                p.cost_so_far += cost;
                                let image_transfer = p.take(a, h, index, true);
                                placements.push(Placement {
                                    app: app.name.clone(),
                                    index,
                                    host: hosts[h].id.clone(),
                                    action: Action::Create,
                                    cost_per_hour: cost,
                                    image_transfer,
                                });
                                Ok(())
                            }
                        }
                    }
                };
                if let Err(why) = &verdict {
                    unplaced.push(Unplaced {
                        app: app.name.clone(),
                        index,
                        would_fit: format!("placed by hand where it cannot run: {why}"),
                    });
                }
                verdicts.push(OverrideVerdict {
                    placement: choice.clone(),
                    verdict,
                });
                continue;
            }
            let mut best: Option<(usize, f64)> = None;
            for (k, &h) in candidates.iter().enumerate() {
                let cost = costs[k];
                if let Some(r) = p
                    .dynamic_reject(a, h, cost)
                    .or_else(|| p.name_reject(h, vm))
                {
                    p.note(a, h, r);
                    continue;
                }
                // In thousandths of the currency per hour: the cost, one per instance of the
                // service already on the host (spread), and up to 100 for a link that serves
                // none of the bandwidth the application needs.
                let spread = f64::from(p.service_count[h]);
                let short = if app.bandwidth_mbps == 0 {
                    0.0
                } else {
                    f64::from(
                        app.bandwidth_mbps
                            .saturating_sub(hosts[h].link_bandwidth_mbps),
                    ) / f64::from(app.bandwidth_mbps)
                };
                let score = cost * 1000.0 + spread + short * 100.0;
                if best.is_none_or(|(_, s)| score < s) {
                    best = Some((h, score));
                }
            }
            match best {
                Some((h, _)) => {
                    let cost = instance_cost_per_hour(app, &hosts[h].prices);
                    p.cost_so_far += cost;
                    let image_transfer = p.take(a, h, index, true);
                    placements.push(Placement {
                        app: app.name.clone(),
                        index,
                        host: hosts[h].id.clone(),
                        action: Action::Create,
                        cost_per_hour: cost,
                        image_transfer,
                    });
                }
                None => unplaced.push(Unplaced {
                    app: app.name.clone(),
                    index,
                    would_fit: p.would_fit(a, &candidates),
                }),
            }
        }
    }

    let mut rejections = BTreeMap::new();
    for (a, app) in service.applications.iter().enumerate() {
        let list: Vec<Rejection> = hosts
            .iter()
            .enumerate()
            .filter(|(h, _)| p.count[a][*h] == 0)
            .filter_map(|(h, host)| {
                p.first_reject[a][h].as_ref().map(|r| Rejection {
                    host: host.id.clone(),
                    reason: p.sentence(app, host, r),
                })
            })
            .collect();
        if !list.is_empty() {
            rejections.insert(app.name.clone(), list);
        }
    }
    placements.sort_by(|x, y| (&x.app, x.index).cmp(&(&y.app, y.index)));
    // From +0.0: a sum of nothing is otherwise -0.0, shown as "-0.000".
    let cost_per_hour = placements.iter().fold(0.0, |sum, p| sum + p.cost_per_hour);
    Plan {
        placements,
        removals,
        unplaced,
        rejections,
        cost_per_hour,
        overrides: verdicts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dunes_shared::{
        model::{ServiceName, TemplateName},
        service::{InterpreterNeed, PinRule, Readiness, SecurityRule, ServiceRules},
    };

    fn name(n: &str) -> AppName {
        AppName::new(n).unwrap()
    }

    fn host(id: &str, site: &str, level: u8, memory_gib: u64) -> HostOffer {
        HostOffer {
            id: HostId::new(id).unwrap(),
            online: true,
            maintenance: false,
            site: SiteName::new(site).unwrap(),
            security_level: level,
            prices: Prices {
                per_cpu_hour: 0.01,
                per_gb_memory_hour: 0.001,
                ..Prices::default()
            },
            link_bandwidth_mbps: 1000,
            runtimes: vec![RuntimeKind::Libvirt, RuntimeKind::Process],
            interpreters: vec![Interpreter {
                name: "python3".into(),
                version: "3.11.2".into(),
            }],
            free: Resources {
                vcpus: 16,
                memory_mib: memory_gib * 1024,
                storage_mib: 100 * 1024,
            },
            taken_names: Default::default(),
            images_held: Default::default(),
        }
    }

    fn app(n: &str, instances: u32, memory_mib: u64) -> ApplicationSpec {
        ApplicationSpec {
            name: name(n),
            runtime: RuntimeKind::Libvirt,
            template: TemplateName::new("tiny").unwrap(),
            image: None,
            disk_gib: None,
            user_data: None,
            interpreter: None,
            vcpus: 1,
            memory_mib,
            storage_mib: 1024,
            bandwidth_mbps: 0,
            instances,
            readiness: Readiness::Running,
            depends_on: Vec::new(),
            guest_apps: Vec::new(),
            metric: None,
        }
    }

    fn service(apps: Vec<ApplicationSpec>, rules: ServiceRules) -> ServiceSpec {
        let s = ServiceSpec {
            name: ServiceName::new("shop").unwrap(),
            applications: apps,
            rules,
            network: None,
        };
        s.validate().unwrap();
        s
    }

    fn fleet() -> Vec<HostOffer> {
        vec![
            host("gva-1", "geneva", 3, 8),
            host("lsn-1", "lausanne", 1, 8),
            host("lsn-2", "lausanne", 1, 3),
        ]
    }

    fn hosts_of(plan: &Plan, app: &str) -> Vec<String> {
        plan.placements
            .iter()
            .filter(|p| p.app.as_str() == app)
            .map(|p| p.host.to_string())
            .collect()
    }

    fn reasons(plan: &Plan, app: &str) -> Vec<String> {
        plan.rejections
            .get(&name(app))
            .map(|r| r.iter().map(|r| r.reason.clone()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn an_image_counts_against_the_storage_of_hosts_without_it_once_and_its_time_is_estimated() {
        let os = ImageName::new("os").unwrap();
        let images: ImageNeeds = [(
            os.clone(),
            ImageNeed {
                blake3: "ab".repeat(32),
                mib: 2000,
            },
        )]
        .into();
        let mut web = app("web", 2, 512);
        web.image = Some(os.clone());
        web.storage_mib = 0;
        let spec = service(vec![web], ServiceRules::default());
        // gva-1 holds the image; lsn-1 has room for it; lsn-2 has room for the overlays
        // alone.
        let mut hosts = fleet();
        hosts[0].images_held.insert("ab".repeat(32));
        hosts[0].free.memory_mib = 512;
        hosts[1].free.storage_mib = 2100;
        hosts[1].link_bandwidth_mbps = 100;
        hosts[2].free.storage_mib = 1500;
        let plan = place_instances_with(&spec, &hosts, &[], &[], &images);
        assert!(plan.is_feasible(), "{plan:?}");
        let by_host = |h: &str| {
            plan.placements
                .iter()
                .find(|p| p.host.as_str() == h)
                .unwrap_or_else(|| panic!("nothing on {h}: {plan:?}"))
        };
        // The host holding it sends nothing; the other gets it once, in 2000 MiB × 8.39 / 100
        // Mbit/s = 168 s.
        assert_eq!(by_host("gva-1").image_transfer, None);
        assert_eq!(
            by_host("lsn-1").image_transfer,
            Some(ImageTransfer {
                image: os.clone(),
                mib: 2000,
                secs: Some(168)
            })
        );
        let lsn2 = reasons(&plan, "web");
        assert!(
            lsn2.iter().any(|r| r
                == "lsn-2: storage 1.5 GiB free < 2.0 GiB needed (with image os, 2.0 GiB, which it does not hold yet)"),
            "{lsn2:?}"
        );
        // A third instance: only lsn-1 has memory left, and it holds the image by then, so
        // nothing more is sent.
        let mut spec3 = spec.clone();
        spec3.applications[0].instances = 3;
        let plan = place_instances_with(&spec3, &hosts, &[], &[], &images);
        let on_lsn1: Vec<&Placement> = plan
            .placements
            .iter()
            .filter(|p| p.host.as_str() == "lsn-1")
            .collect();
        assert_eq!(on_lsn1.len(), 2, "{plan:?}");
        assert_eq!(
            on_lsn1
                .iter()
                .filter(|p| p.image_transfer.is_some())
                .count(),
            1
        );
        // An image the library does not have places nothing, and says how to bring it.
        let plan = place_instances_with(&spec, &hosts, &[], &[], &ImageNeeds::new());
        assert_eq!(plan.unplaced.len(), 2);
        assert_eq!(
            plan.unplaced[0].would_fit,
            "needs image os, which the library does not have: ctl image import FILE --name os"
        );
    }

    #[test]
    fn distinct_hosts_spreads_instances_and_says_why_a_host_is_left_out() {
        let rules = ServiceRules {
            distinct_hosts: vec![name("web")],
            ..Default::default()
        };
        let plan = place_instances(&service(vec![app("web", 3, 512)], rules), &fleet(), &[]);
        let mut hosts = hosts_of(&plan, "web");
        hosts.sort();
        assert_eq!(hosts, ["gva-1", "lsn-1", "lsn-2"]);
        // A fourth instance fits nowhere, and the plan says what would make it fit.
        let rules = ServiceRules {
            distinct_hosts: vec![name("web")],
            ..Default::default()
        };
        let plan = place_instances(&service(vec![app("web", 4, 512)], rules), &fleet(), &[]);
        assert_eq!(plan.unplaced.len(), 1);
        assert!(
            plan.unplaced[0]
                .would_fit
                .starts_with("needs one more host"),
            "{}",
            plan.unplaced[0].would_fit
        );
    }

    #[test]
    fn security_level_pins_payment_and_each_host_is_explained() {
        let rules = ServiceRules {
            min_security_level: vec![SecurityRule {
                application: Some(name("payment")),
                level: 3,
            }],
            ..Default::default()
        };
        let plan = place_instances(
            &service(vec![app("payment", 1, 1024)], rules),
            &fleet(),
            &[],
        );
        assert_eq!(hosts_of(&plan, "payment"), ["gva-1"]);
        assert_eq!(
            reasons(&plan, "payment"),
            [
                "lsn-1: security level 1 < required 3",
                "lsn-2: security level 1 < required 3"
            ]
        );
    }

    #[test]
    fn memory_is_checked_and_an_infeasible_plan_says_what_would_fit() {
        let mut hosts = fleet();
        hosts.truncate(3);
        let rules = ServiceRules {
            allowed_sites: vec![SiteName::new("lausanne").unwrap()],
            ..Default::default()
        };
        let plan = place_instances(&service(vec![app("db", 1, 9 * 1024)], rules), &hosts, &[]);
        assert!(!plan.is_feasible());
        assert_eq!(
            reasons(&plan, "db"),
            [
                "gva-1: site geneva is not allowed (lausanne)",
                "lsn-1: memory 8.0 GiB free < 9.0 GiB needed",
                "lsn-2: memory 3.0 GiB free < 9.0 GiB needed",
            ]
        );
        assert_eq!(
            plan.unplaced[0].would_fit,
            "needs 1.0 GiB more memory on a lausanne host"
        );
    }

    #[test]
    fn anti_affinity_and_affinity() {
        let rules = ServiceRules {
            anti_affinity: vec![[name("web"), name("db")]],
            affinity: vec![[name("db"), name("reports")]],
            ..Default::default()
        };
        let plan = place_instances(
            &service(
                vec![
                    app("web", 2, 512),
                    app("db", 1, 512),
                    app("reports", 1, 256),
                ],
                rules,
            ),
            &fleet(),
            &[],
        );
        assert!(plan.is_feasible(), "{:?}", plan.unplaced);
        let db = hosts_of(&plan, "db");
        assert_eq!(hosts_of(&plan, "reports"), db, "reports beside db");
        assert!(
            !hosts_of(&plan, "web").contains(&db[0]),
            "web never beside db"
        );
        assert!(
            reasons(&plan, "web")
                .iter()
                .any(|r| r == &format!("{}: already runs db-0 (anti-affinity web/db)", db[0])),
            "{:?}",
            reasons(&plan, "web")
        );
    }

    #[test]
    fn pins_runtimes_interpreters_and_offline_hosts() {
        let mut hosts = fleet();
        hosts[1].online = false;
        hosts[2].runtimes = vec![RuntimeKind::Libvirt];
        let mut reports = app("reports", 1, 256);
        reports.runtime = RuntimeKind::Process;
        reports.interpreter = Some(InterpreterNeed {
            name: "python3".into(),
            min_version: Some("3.12".into()),
        });
        let rules = ServiceRules {
            pin: vec![PinRule {
                application: name("db"),
                hosts: vec![HostId::new("lsn-2").unwrap()],
                sites: Vec::new(),
            }],
            ..Default::default()
        };
        let plan = place_instances(
            &service(vec![app("db", 1, 512), reports], rules),
            &hosts,
            &[],
        );
        assert_eq!(hosts_of(&plan, "db"), ["lsn-2"]);
        assert_eq!(
            reasons(&plan, "reports"),
            [
                "gva-1: python3 3.11.2 < 3.12 needed",
                "lsn-1: unreachable",
                "lsn-2: has no process runtime",
            ]
        );
        assert!(
            plan.unplaced[0]
                .would_fit
                .starts_with("no host meets reports's rules")
        );
    }

    #[test]
    fn cost_is_summed_and_capped() {
        let rules = ServiceRules {
            max_cost_per_hour: Some(0.025),
            ..Default::default()
        };
        // 1 vCPU × 0.01 + 0.5 GiB × 0.001 = 0.0105 per instance: two fit under 0.025.
        let plan = place_instances(&service(vec![app("web", 3, 512)], rules), &fleet(), &[]);
        assert_eq!(plan.placements.len(), 2);
        assert!(
            (plan.cost_per_hour - 0.021).abs() < 1e-9,
            "{}",
            plan.cost_per_hour
        );
        assert_eq!(plan.unplaced.len(), 1);
        assert_eq!(
            plan.unplaced[0].would_fit,
            "needs max_cost_per_hour of at least 0.032"
        );
    }

    #[test]
    fn existing_instances_are_kept_extra_ones_removed_and_only_the_difference_created() {
        let rules = ServiceRules {
            distinct_hosts: vec![name("web")],
            ..Default::default()
        };
        let s = service(vec![app("web", 2, 512)], rules);
        let existing = vec![
            Existing {
                app: name("web"),
                index: 0,
                host: HostId::new("lsn-2").unwrap(),
            },
            Existing {
                app: name("web"),
                index: 5,
                host: HostId::new("lsn-1").unwrap(),
            },
            Existing {
                app: name("old"),
                index: 0,
                host: HostId::new("lsn-1").unwrap(),
            },
        ];
        let plan = place_instances(&s, &fleet(), &existing);
        let actions: Vec<(u32, &str, Action)> = plan
            .placements
            .iter()
            .map(|p| (p.index, p.host.as_str(), p.action))
            .collect();
        assert_eq!(actions[0], (0, "lsn-2", Action::Keep));
        assert_eq!(actions[1].2, Action::Create);
        assert_ne!(actions[1].1, "lsn-2", "distinct hosts honours the kept one");
        assert_eq!(plan.removals.len(), 2);
        assert!(plan.changes());
        // Applied, the same plan again changes nothing.
        let now: Vec<Existing> = plan
            .placements
            .iter()
            .map(|p| Existing {
                app: p.app.clone(),
                index: p.index,
                host: p.host.clone(),
            })
            .collect();
        assert!(!place_instances(&s, &fleet(), &now).changes());
    }

    #[test]
    fn never_relocate_keeps_an_instance_its_rules_would_now_refuse() {
        let rules = ServiceRules {
            never_relocate: vec![name("payment")],
            min_security_level: vec![SecurityRule {
                application: Some(name("payment")),
                level: 3,
            }],
            ..Default::default()
        };
        let existing = [Existing {
            app: name("payment"),
            index: 0,
            host: HostId::new("lsn-1").unwrap(),
        }];
        let plan = place_instances(
            &service(vec![app("payment", 1, 512)], rules),
            &fleet(),
            &existing,
        );
        assert_eq!(hosts_of(&plan, "payment"), ["lsn-1"]);
        assert!(!plan.changes());
    }

    #[test]
    fn an_application_that_needs_bandwidth_goes_where_the_link_serves_it() {
        let mut hosts = fleet();
        // gva-1 is the cheapest host, on a slow link.
        hosts[0].prices.per_cpu_hour = 0.001;
        hosts[0].link_bandwidth_mbps = 200;
        let mut web = app("web", 1, 512);
        let s = service(vec![web.clone()], ServiceRules::default());
        assert_eq!(
            hosts_of(&place_instances(&s, &hosts, &[]), "web"),
            ["gva-1"]
        );
        web.bandwidth_mbps = 1000;
        let s = service(vec![web], ServiceRules::default());
        assert_ne!(
            hosts_of(&place_instances(&s, &hosts, &[]), "web"),
            ["gva-1"]
        );
    }

    #[test]
    fn placement_is_deterministic_and_prefers_the_cheaper_host() {
        let mut hosts = fleet();
        hosts[2].prices.per_cpu_hour = 0.001;
        let s = service(vec![app("web", 1, 512)], ServiceRules::default());
        let a = place_instances(&s, &hosts, &[]);
        assert_eq!(hosts_of(&a, "web"), ["lsn-2"]);
        assert_eq!(a, place_instances(&s, &hosts, &[]));
        assert!(version_at_least("3.11.2", "3.9"));
        assert!(!version_at_least("3.9", "3.11"));
    }

    #[test]
    fn an_instance_placed_by_hand_goes_there_or_says_the_rule_it_breaks() {
        let rules = ServiceRules {
            distinct_hosts: vec![name("web")],
            min_security_level: vec![SecurityRule {
                application: Some(name("pay")),
                level: 3,
            }],
            ..ServiceRules::default()
        };
        let s = service(vec![app("web", 2, 512), app("pay", 1, 512)], rules);
        let choice = |app: &str, index: u32, host: &str| Override {
            app: name(app),
            index,
            host: HostId::new(host).unwrap(),
        };
        // Allowed: it goes there, and the other web instance works around it.
        let plan = place_instances_with(
            &s,
            &fleet(),
            &[],
            &[choice("web", 1, "lsn-2")],
            &ImageNeeds::new(),
        );
        assert!(plan.is_feasible(), "{:?}", plan.unplaced);
        assert_eq!(plan.overrides[0].verdict, Ok(()));
        let web1 = plan
            .placements
            .iter()
            .find(|p| p.app.as_str() == "web" && p.index == 1);
        assert_eq!(web1.unwrap().host.as_str(), "lsn-2");
        assert!(!hosts_of(&plan, "web").iter().all(|h| h == "lsn-2"));
        // Two web instances on one host break the distinct-hosts rule.
        let plan = place_instances_with(
            &s,
            &fleet(),
            &[],
            &[choice("web", 0, "lsn-1"), choice("web", 1, "lsn-1")],
            &ImageNeeds::new(),
        );
        assert_eq!(plan.overrides[0].verdict, Ok(()));
        assert_eq!(
            plan.overrides[1].verdict,
            Err("lsn-1: already runs web-0 (distinct hosts for web)".into())
        );
        assert!(!plan.is_feasible());
        // Payment on a host below its security level.
        let plan = place_instances_with(
            &s,
            &fleet(),
            &[],
            &[choice("pay", 0, "lsn-1")],
            &ImageNeeds::new(),
        );
        assert_eq!(
            plan.overrides[0].verdict,
            Err("lsn-1: security level 1 < required 3".into())
        );
        assert!(
            plan.unplaced[0]
                .would_fit
                .contains("security level 1 < required 3")
        );
        // Without overrides it is the plain plan.
        assert_eq!(
            place_instances_with(&s, &fleet(), &[], &[], &ImageNeeds::new()),
            place_instances(&s, &fleet(), &[])
        );
    }

    #[test]
    fn a_host_with_a_vm_of_the_instances_name_is_left_out_and_says_so() {
        let mut hosts = fleet();
        hosts[0].taken_names.insert("shop-web-0".into());
        let s = service(vec![app("web", 1, 512)], ServiceRules::default());
        let plan = place_instances(&s, &hosts, &[]);
        assert_ne!(hosts_of(&plan, "web"), ["gva-1"]);
        let plan = place_instances_with(
            &s,
            &hosts,
            &[],
            &[Override {
                app: name("web"),
                index: 0,
                host: HostId::new("gva-1").unwrap(),
            }],
            &ImageNeeds::new(),
        );
        assert_eq!(
            plan.overrides[0].verdict,
            Err(
                "gva-1: has a VM named shop-web-0 outside the service (adopt it or remove it)"
                    .into()
            )
        );
    }
}
