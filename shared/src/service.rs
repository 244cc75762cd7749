//! Services: named groups of applications with the rules that say where their instances may
//! run. Pure types and their checks; placement lives in the console's engine.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::model::{AppName, HostId, ImageName, RuntimeKind, ServiceName, SiteName, TemplateName};

/// How the console tells that an instance is ready for the applications that depend on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Readiness {
    /// The instance runs.
    Running,
    /// qemu-guest-agent answers a ping inside the VM.
    GuestAgent,
    /// A TCP port accepts connections.
    Tcp { port: u16 },
    /// A command exits 0.
    Command { command: String },
}

/// A number an application's instances report, for statistics and autoscaling: what a
/// command prints (requests per second, a queue's length), or the TCP connections
/// established to a port. For a VM both are read inside the guest, through its guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AppMetric {
    /// A shell command whose output starts with a number.
    Command { command: String },
    /// Established TCP connections whose local port is this one.
    Tcp { port: u16 },
}

impl AppMetric {
    /// As the operator reads it: "`cat /run/queue`", "connections to port 80".
    pub fn describe(&self) -> String {
        match self {
            AppMetric::Command { command } => format!("`{command}`"),
            AppMetric::Tcp { port } => format!("connections to port {port}"),
        }
    }
}

/// An interpreter an application needs on its host (the seed's catalogue of machines having
/// an interpreter of a particular type).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterpreterNeed {
    /// As hosts report it: `python3`, `java`.
    pub name: String,
    /// The lowest version that will do, compared by dotted numbers (`3.11`).
    #[serde(default)]
    pub min_version: Option<String>,
}

/// An application that runs inside the VMs of another (libvirt) application: one instance in
/// each of its VMs, seen through the guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestAppSpec {
    pub name: AppName,
    /// Its processes' name in the guest (`/proc/PID/comm`, at most 15 bytes): alive while
    /// one runs; their CPU and memory are its statistics.
    #[serde(default)]
    pub process: Option<String>,
    /// A shell command run in the guest every few seconds: healthy when it exits 0.
    #[serde(default)]
    pub check: Option<String>,
}

/// The longest process name Linux keeps (`TASK_COMM_LEN` less its NUL).
pub const PROCESS_NAME_MAX: usize = 15;

/// A unit of a service, with one or more instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplicationSpec {
    pub name: AppName,
    pub runtime: RuntimeKind,
    /// A VM image for libvirt; a process template for the process runtime. For an
    /// application made from a library image, the image's name (hosts keep a library image
    /// as the template of its name).
    pub template: TemplateName,
    /// The library image its VMs boot from, on a qcow2 overlay of their own.
    #[serde(default)]
    pub image: Option<ImageName>,
    /// The size of each VM's disk made from `image`; its image's size when not given.
    #[serde(default)]
    pub disk_gib: Option<u64>,
    /// cloud-init user-data for each VM made from `image`, in which `{{name}}`, `{{index}}`,
    /// `{{service}}`, `{{application}}` and `{{addresses.APP}}` (the addresses of the
    /// instances of an application it depends on) are filled in when the instance starts.
    #[serde(default)]
    pub user_data: Option<String>,
    #[serde(default)]
    pub interpreter: Option<InterpreterNeed>,
    pub vcpus: u32,
    pub memory_mib: u64,
    #[serde(default)]
    pub storage_mib: u64,
    /// The link bandwidth its instances need to serve well.
    #[serde(default)]
    pub bandwidth_mbps: u32,
    pub instances: u32,
    pub readiness: Readiness,
    /// Applications whose instances must all be ready before this one starts.
    #[serde(default)]
    pub depends_on: Vec<AppName>,
    /// Applications running inside each of this application's VMs.
    #[serde(default)]
    pub guest_apps: Vec<GuestAppSpec>,
    /// The number its instances report (its statistics' `app-metric` series).
    #[serde(default)]
    pub metric: Option<AppMetric>,
}

/// A minimum security level, for the whole service or for one application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityRule {
    #[serde(default)]
    pub application: Option<AppName>,
    pub level: u8,
}

/// Pinning: an application's instances only on these hosts, or only in these sites.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinRule {
    pub application: AppName,
    #[serde(default)]
    pub hosts: Vec<HostId>,
    #[serde(default)]
    pub sites: Vec<SiteName>,
}

/// Where a service's instances may run.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ServiceRules {
    /// Applications whose instances all run on different hosts.
    #[serde(default)]
    pub distinct_hosts: Vec<AppName>,
    /// Pairs of applications that never share a host.
    #[serde(default)]
    pub anti_affinity: Vec<[AppName; 2]>,
    /// Pairs whose second application runs only where the first has an instance.
    #[serde(default)]
    pub affinity: Vec<[AppName; 2]>,
    #[serde(default)]
    pub pin: Vec<PinRule>,
    /// Applications whose instances stay where they were first placed.
    #[serde(default)]
    pub never_relocate: Vec<AppName>,
    #[serde(default)]
    pub min_security_level: Vec<SecurityRule>,
    /// Sites the service may use; empty means all.
    #[serde(default)]
    pub allowed_sites: Vec<SiteName>,
    /// In the fleet's currency unit.
    #[serde(default)]
    pub max_cost_per_hour: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: ServiceName,
    pub applications: Vec<ApplicationSpec>,
    #[serde(default)]
    pub rules: ServiceRules,
    /// Its instances' network; without one they have their runtime's own (a VM's
    /// user-mode network, a process's host's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::network::NetworkSpec>,
}

/// Why a service definition is refused; each says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("service {0} has no applications")]
    Empty(ServiceName),
    #[error("application {0} is defined twice")]
    DuplicateApp(AppName),
    #[error("{rule} names application {app}, which the service does not have")]
    UnknownApp { rule: String, app: AppName },
    #[error("the dependencies form a cycle: {}", .0.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(" → "))]
    Cycle(Vec<AppName>),
    #[error("application {app}: {message}")]
    BadApp { app: AppName, message: String },
    #[error("{0}")]
    Contradiction(String),
    #[error("network: {0}")]
    Network(#[from] crate::network::NetworkError),
}

impl ApplicationSpec {
    fn check(&self) -> Result<(), ServiceError> {
        let bad = |message: String| ServiceError::BadApp {
            app: self.name.clone(),
            message,
        };
        if !(1..=crate::model::VCPUS_MAX).contains(&self.vcpus) {
            return Err(bad(format!(
                "vcpus must be between 1 and {}, not {}",
                crate::model::VCPUS_MAX,
                self.vcpus
            )));
        }
        if !(crate::model::MEMORY_MIB_MIN..=crate::model::MEMORY_MIB_MAX).contains(&self.memory_mib)
        {
            return Err(bad(format!(
                "memory_mib must be between {} and {}, not {}",
                crate::model::MEMORY_MIB_MIN,
                crate::model::MEMORY_MIB_MAX,
                self.memory_mib
            )));
        }
        if self.instances > MAX_INSTANCES {
            return Err(bad(format!(
                "instances must be at most {MAX_INSTANCES}, not {}",
                self.instances
            )));
        }
        if self.runtime == RuntimeKind::Unknown {
            return Err(bad("runtime must be libvirt or process".into()));
        }
        if let Readiness::Command { command } = &self.readiness
            && command.trim().is_empty()
        {
            return Err(bad("the readiness command is empty".into()));
        }
        if let Readiness::Tcp { port: 0 } = self.readiness {
            return Err(bad("the readiness port must not be 0".into()));
        }
        if self.runtime == RuntimeKind::Libvirt
            && matches!(
                self.readiness,
                Readiness::Tcp { .. } | Readiness::Command { .. }
            )
        {
            return Err(bad(
                "a VM is ready when it runs or when its guest agent answers: use readiness \"running\" or \"guest-agent\"".into(),
            ));
        }
        match &self.metric {
            Some(AppMetric::Command { command }) if command.trim().is_empty() => {
                return Err(bad("the metric command is empty".into()));
            }
            Some(AppMetric::Tcp { port: 0 }) => {
                return Err(bad("the metric port must not be 0".into()));
            }
            _ => {}
        }
        self.check_image()?;
        if !self.guest_apps.is_empty() && self.runtime != RuntimeKind::Libvirt {
            return Err(bad(
                "only a VM (runtime libvirt) holds guest applications".into()
            ));
        }
        for g in &self.guest_apps {
            let bad = |message: String| ServiceError::BadApp {
                app: g.name.clone(),
                message,
            };
            if g.process.is_none() && g.check.is_none() {
                return Err(bad(
                    "a guest application needs a process name, a check command, or both".into(),
                ));
            }
            if let Some(p) = &g.process
                && (p.is_empty() || p.len() > PROCESS_NAME_MAX || p.contains(['/', '\n', '\0']))
            {
                return Err(bad(format!(
                    "process must be a name of 1 to {PROCESS_NAME_MAX} bytes without '/', as /proc/PID/comm shows it, not {p:?}"
                )));
            }
            if g.check.as_ref().is_some_and(|c| c.trim().is_empty()) {
                return Err(bad("the check command is empty".into()));
            }
        }
        Ok(())
    }
}

impl ApplicationSpec {
    fn check_image(&self) -> Result<(), ServiceError> {
        let bad = |message: String| ServiceError::BadApp {
            app: self.name.clone(),
            message,
        };
        if self.image.is_some() && self.runtime != RuntimeKind::Libvirt {
            return Err(bad("only a VM (runtime libvirt) boots from an image".into()));
        }
        if self.image.is_none() && (self.disk_gib.is_some() || self.user_data.is_some()) {
            return Err(bad(
                "disk_gib and user_data are for VMs made from an image: add image = \"NAME\""
                    .into(),
            ));
        }
        if let Some(gib) = self.disk_gib
            && !(1..=crate::model::DISK_GIB_MAX).contains(&gib)
        {
            return Err(bad(format!(
                "disk_gib must be between 1 and {}, not {gib}",
                crate::model::DISK_GIB_MAX
            )));
        }
        if let Some(template) = &self.user_data {
            let sample = self.fill_user_data(template, "service-app-0", 0, "service", |_| {
                Ok(vec!["192.0.2.1".into(), "192.0.2.2".into()])
            });
            sample
                .map_err(|e| e.to_string())
                .and_then(|text| {
                    crate::cloud_init::check_user_data(&text).map_err(|e| e.to_string())
                })
                .map_err(bad)?;
        }
        Ok(())
    }

    /// This application's `user_data` for instance `index` of `service`, whose VM is `vm`:
    /// `addresses` answers
    /// the addresses of a dependency's instances (the application's name as given), or why
    /// they are not known. An application that is not a dependency is refused.
    pub fn fill_user_data(
        &self,
        template: &str,
        vm: &str,
        index: u32,
        service: &str,
        mut addresses: impl FnMut(&AppName) -> Result<Vec<String>, String>,
    ) -> Result<String, crate::cloud_init::SubstitutionError> {
        use crate::cloud_init::Placeholder;
        crate::cloud_init::substitute(template, |placeholder| match placeholder {
            Placeholder::Name => Ok(vm.to_string()),
            Placeholder::Index => Ok(index.to_string()),
            Placeholder::Service => Ok(service.to_string()),
            Placeholder::Application => Ok(self.name.to_string()),
            Placeholder::Addresses(app) => {
                let dep = self.depends_on.iter().find(|d| d.as_str() == app).ok_or_else(|| {
                    format!(
                        "{{{{addresses.{app}}}}} names {app}, which {} does not depend on: add it to depends_on so that it is up first",
                        self.name
                    )
                })?;
                addresses(dep).map(|a| a.join(","))
            }
        })
    }
}

/// Instances one application may ask for.
pub const MAX_INSTANCES: u32 = 10_000;

impl ServiceSpec {
    /// Checks the whole definition: names, references, the dependency graph, contradictions.
    pub fn validate(&self) -> Result<(), ServiceError> {
        if self.applications.is_empty() {
            return Err(ServiceError::Empty(self.name.clone()));
        }
        let mut names = BTreeSet::new();
        for app in &self.applications {
            if !names.insert(&app.name) {
                return Err(ServiceError::DuplicateApp(app.name.clone()));
            }
            app.check()?;
        }
        // Guest applications share the service's names but are no rule's subject.
        let mut guest_names = BTreeSet::new();
        for g in self.applications.iter().flat_map(|a| &a.guest_apps) {
            if names.contains(&g.name) || !guest_names.insert(&g.name) {
                return Err(ServiceError::DuplicateApp(g.name.clone()));
            }
        }
        let known = |rule: &str, app: &AppName| {
            if names.contains(app) {
                Ok(())
            } else {
                Err(ServiceError::UnknownApp {
                    rule: rule.to_string(),
                    app: app.clone(),
                })
            }
        };
        for app in &self.applications {
            for dep in &app.depends_on {
                known(&format!("application {}'s depends_on", app.name), dep)?;
            }
        }
        let r = &self.rules;
        for a in &r.distinct_hosts {
            known("distinct_hosts", a)?;
        }
        for pair in &r.anti_affinity {
            pair.iter().try_for_each(|a| known("anti_affinity", a))?;
        }
        for pair in &r.affinity {
            pair.iter().try_for_each(|a| known("affinity", a))?;
            if pair[0] == pair[1] {
                return Err(ServiceError::Contradiction(format!(
                    "affinity of {} with itself: list it in distinct_hosts or nowhere",
                    pair[0]
                )));
            }
            if r.anti_affinity
                .iter()
                .any(|aa| aa.contains(&pair[0]) && aa.contains(&pair[1]))
            {
                return Err(ServiceError::Contradiction(format!(
                    "{} and {} are in both affinity and anti_affinity",
                    pair[0], pair[1]
                )));
            }
        }
        for pin in &r.pin {
            known("pin", &pin.application)?;
            if pin.hosts.is_empty() && pin.sites.is_empty() {
                return Err(ServiceError::Contradiction(format!(
                    "the pin of {} names no host and no site",
                    pin.application
                )));
            }
        }
        for a in &r.never_relocate {
            known("never_relocate", a)?;
        }
        for rule in &r.min_security_level {
            if let Some(a) = &rule.application {
                known("min_security_level", a)?;
            }
        }
        if let Some(max) = r.max_cost_per_hour
            && !(max.is_finite() && max >= 0.0)
        {
            return Err(ServiceError::Contradiction(format!(
                "max_cost_per_hour must be a positive number, not {max}"
            )));
        }
        if let Some(cycle) = self.dependency_cycle() {
            return Err(ServiceError::Cycle(cycle));
        }
        if let Some(network) = &self.network {
            let apps: Vec<&AppName> = names.iter().copied().collect();
            network.check(&self.name, &apps)?;
        }
        Ok(())
    }

    pub fn application(&self, name: &AppName) -> Option<&ApplicationSpec> {
        self.applications.iter().find(|a| &a.name == name)
    }

    /// A guest application, with the application whose VMs hold it.
    pub fn guest_app(&self, name: &AppName) -> Option<(&ApplicationSpec, &GuestAppSpec)> {
        self.applications.iter().find_map(|a| {
            a.guest_apps
                .iter()
                .find(|g| &g.name == name)
                .map(|g| (a, g))
        })
    }

    /// A dependency cycle, as the applications along it (the first repeated at the end).
    pub fn dependency_cycle(&self) -> Option<Vec<AppName>> {
        let deps: BTreeMap<&AppName, &Vec<AppName>> = self
            .applications
            .iter()
            .map(|a| (&a.name, &a.depends_on))
            .collect();
        // 0 unvisited, 1 on the current path, 2 done.
        let mut mark: BTreeMap<&AppName, u8> = BTreeMap::new();
        let mut path: Vec<&AppName> = Vec::new();
        fn visit<'a>(
            app: &'a AppName,
            deps: &BTreeMap<&'a AppName, &'a Vec<AppName>>,
            mark: &mut BTreeMap<&'a AppName, u8>,
            path: &mut Vec<&'a AppName>,
        ) -> Option<Vec<AppName>> {
            match mark.get(app) {
                Some(2) => return None,
                Some(1) => {
                    let from = path.iter().position(|a| *a == app).unwrap_or(0);
                    let mut cycle: Vec<AppName> =
                        path[from..].iter().map(|a| (*a).clone()).collect();
                    cycle.push(app.clone());
                    return Some(cycle);
                }
                _ => {}
            }
            mark.insert(app, 1);
            path.push(app);
            for dep in deps.get(app).into_iter().flat_map(|d| d.iter()) {
                if let Some(cycle) = visit(dep, deps, mark, path) {
                    return Some(cycle);
                }
            }
            path.pop();
            mark.insert(app, 2);
            None
        }
        for app in deps.keys() {
            if let Some(cycle) = visit(app, &deps, &mut mark, &mut path) {
                return Some(cycle);
            }
        }
        None
    }

    /// Applications in start order: each after everything it depends on, ties by name.
    /// `None` when the dependencies form a cycle.
    pub fn start_order(&self) -> Option<Vec<&ApplicationSpec>> {
        let mut done: BTreeSet<&AppName> = BTreeSet::new();
        let mut order = Vec::with_capacity(self.applications.len());
        let mut left: Vec<&ApplicationSpec> = self.applications.iter().collect();
        left.sort_by(|a, b| a.name.cmp(&b.name));
        while !left.is_empty() {
            let ready = left
                .iter()
                .position(|a| a.depends_on.iter().all(|d| done.contains(d)))?;
            let app = left.remove(ready);
            done.insert(&app.name);
            order.push(app);
        }
        Some(order)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(name: &str, deps: &[&str]) -> ApplicationSpec {
        ApplicationSpec {
            name: AppName::new(name).unwrap(),
            runtime: RuntimeKind::Libvirt,
            template: TemplateName::new("tiny").unwrap(),
            image: None,
            disk_gib: None,
            user_data: None,
            interpreter: None,
            vcpus: 1,
            memory_mib: 256,
            storage_mib: 1024,
            bandwidth_mbps: 0,
            instances: 1,
            readiness: Readiness::Running,
            depends_on: deps.iter().map(|d| AppName::new(*d).unwrap()).collect(),
            guest_apps: Vec::new(),
            metric: None,
        }
    }

    fn service(apps: Vec<ApplicationSpec>) -> ServiceSpec {
        ServiceSpec {
            name: ServiceName::new("shop").unwrap(),
            applications: apps,
            rules: ServiceRules::default(),
            network: None,
        }
    }

    fn name(n: &str) -> AppName {
        AppName::new(n).unwrap()
    }

    #[test]
    fn a_dependency_cycle_is_refused_and_named() {
        let s = service(vec![
            app("web", &["payment"]),
            app("payment", &["db"]),
            app("db", &["web"]),
        ]);
        let err = s.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "the dependencies form a cycle: db → web → payment → db"
        );
        assert!(s.start_order().is_none());
    }

    #[test]
    fn guest_applications_are_checked_and_found() {
        let guest = |n: &str, process: Option<&str>, check: Option<&str>| GuestAppSpec {
            name: name(n),
            process: process.map(Into::into),
            check: check.map(Into::into),
        };
        let mut vm = app("box", &[]);
        vm.guest_apps = vec![
            guest("web", Some("httpd"), Some("wget -q -O- localhost")),
            guest("worker", Some("worker"), None),
        ];
        let s = service(vec![vm.clone(), app("db", &[])]);
        s.validate().unwrap();
        let (holder, web) = s.guest_app(&name("web")).unwrap();
        assert_eq!(holder.name.as_str(), "box");
        assert_eq!(web.process.as_deref(), Some("httpd"));
        assert!(s.guest_app(&name("db")).is_none());

        let refused = |vm: ApplicationSpec| {
            service(vec![vm, app("db", &[])])
                .validate()
                .unwrap_err()
                .to_string()
        };
        let mut v = vm.clone();
        v.guest_apps.push(guest("db", Some("x"), None));
        assert_eq!(refused(v), "application db is defined twice");
        let mut v = vm.clone();
        v.guest_apps.push(guest("web", Some("x"), None));
        assert_eq!(refused(v), "application web is defined twice");
        let mut v = vm.clone();
        v.guest_apps.push(guest("idle", None, None));
        assert_eq!(
            refused(v),
            "application idle: a guest application needs a process name, a check command, or both"
        );
        let mut v = vm.clone();
        v.guest_apps
            .push(guest("long", Some("a-name-that-is-too-long"), None));
        assert!(
            refused(v).starts_with("application long: process must be a name of 1 to 15 bytes")
        );
        let mut v = vm.clone();
        v.guest_apps.push(guest("blank", None, Some("  ")));
        assert_eq!(refused(v), "application blank: the check command is empty");
        let mut v = vm;
        v.runtime = RuntimeKind::Process;
        assert_eq!(
            refused(v),
            "application box: only a VM (runtime libvirt) holds guest applications"
        );
        // A rule cannot name a guest application: it goes where its VM goes.
        let mut vm = app("box", &[]);
        vm.guest_apps = vec![guest("web", Some("httpd"), None)];
        let mut s = service(vec![vm]);
        s.rules.never_relocate = vec![name("web")];
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            "never_relocate names application web, which the service does not have"
        );
    }

    #[test]
    fn start_order_follows_dependencies() {
        let s = service(vec![
            app("web", &["payment"]),
            app("reports", &[]),
            app("payment", &["db"]),
            app("db", &[]),
        ]);
        s.validate().unwrap();
        let order: Vec<&str> = s
            .start_order()
            .unwrap()
            .iter()
            .map(|a| a.name.as_str())
            .collect();
        assert_eq!(order, ["db", "payment", "reports", "web"]);
    }

    #[test]
    fn rules_naming_unknown_or_contradictory_applications_are_refused() {
        let mut s = service(vec![app("web", &[]), app("db", &[])]);
        s.rules.anti_affinity = vec![[name("web"), name("cache")]];
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            "anti_affinity names application cache, which the service does not have"
        );
        s.rules.anti_affinity = vec![[name("web"), name("db")]];
        s.rules.affinity = vec![[name("db"), name("web")]];
        assert_eq!(
            s.validate().unwrap_err().to_string(),
            "db and web are in both affinity and anti_affinity"
        );
        let s = service(vec![app("web", &["nope"])]);
        assert!(matches!(s.validate(), Err(ServiceError::UnknownApp { .. })));
        let s = service(vec![app("web", &[]), app("web", &[])]);
        assert_eq!(s.validate(), Err(ServiceError::DuplicateApp(name("web"))));
        let mut vm = app("web", &[]);
        vm.readiness = Readiness::Tcp { port: 80 };
        assert!(
            service(vec![vm])
                .validate()
                .unwrap_err()
                .to_string()
                .contains("use readiness \"running\" or \"guest-agent\"")
        );
        let mut bad = app("web", &[]);
        bad.vcpus = 0;
        assert!(
            service(vec![bad])
                .validate()
                .unwrap_err()
                .to_string()
                .starts_with("application web: vcpus must be")
        );
    }
}
