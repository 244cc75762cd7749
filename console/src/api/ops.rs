//! Every operation of the engine's API: its request, its response and how the engine runs
//! it. Names of things arrive as text (a VM as `NAME` or `HOST/NAME`) and are checked here,
//! so a bad one gets the same sentence from every client.

use std::time::Duration;

use dunes_shared::{
    model::{
        AppName, Firmware, HostId, ImageDisk, ImageName, ServiceName, TemplateName, VmName, VmSpec,
        VmStatus,
    },
    pki::Fingerprint,
    protocol::{PowerAction, SnapshotAction},
};
use serde::{Deserialize, Serialize};

use super::{ApiError, Operation, views::*};
use crate::engine::{
    Command, EngineHandle, Snapshot,
    autoscale::{AutoscaleMetric, AutoscaleRule},
    images::CreateFromImage,
    migration::MigrationOptions,
    operators::access::Target,
    services::placement::{Action, Override},
    statistics::capacity::{Extra, WhatIf},
    statistics::cost::CostBy,
    statistics::series::Subject,
};

/// `SERVICE/APP` as names.
fn service_app(target: &str) -> Result<(ServiceName, AppName), ApiError> {
    let (service, app) = target
        .split_once('/')
        .ok_or_else(|| format!("{target:?}: name the application as SERVICE/APP"))?;
    Ok((
        ServiceName::new(service).map_err(|e| e.to_string())?,
        AppName::new(app).map_err(|e| e.to_string())?,
    ))
}

fn host_id(text: &str) -> Result<HostId, ApiError> {
    Ok(HostId::new(text).map_err(|e| e.to_string())?)
}

fn service_name(text: &str) -> Result<ServiceName, ApiError> {
    Ok(ServiceName::new(text).map_err(|e| e.to_string())?)
}

/// A VM by `NAME` or `HOST/NAME`, as the engine sees it now.
fn find_vm(engine: &EngineHandle, reference: &str) -> Result<(HostId, VmStatus), ApiError> {
    Ok(engine.snapshot().find_vm(reference)?)
}

/// `APP-INDEX=HOST` choices, as `--place` takes them.
fn parse_overrides(place: &[String]) -> Result<Vec<Override>, ApiError> {
    place
        .iter()
        .map(|p| {
            let bad = || format!("--place {p}: write APP-INDEX=HOST, as in web-1=lsn-2");
            let (instance, host) = p.split_once('=').ok_or_else(bad)?;
            let (app, index) = instance.rsplit_once('-').ok_or_else(bad)?;
            Ok(Override {
                app: AppName::new(app).map_err(|e| format!("--place {p}: {e}"))?,
                index: index.parse().map_err(|_| bad())?,
                host: HostId::new(host).map_err(|e| format!("--place {p}: {e}"))?,
            })
        })
        .collect()
}

/// A VM or process named `NAME` or `HOST/NAME`, as a scope sees it; none when it does not
/// exist.
fn workload(snap: &Snapshot, reference: &str) -> Vec<Target> {
    let Ok((host, vm)) = snap.find_vm(reference) else {
        return Vec::new();
    };
    vec![Target::Workload {
        name: vm.name.to_string(),
        site: snap
            .host(&host)
            .map_or("unknown", |h| h.site_name())
            .to_string(),
        service: snap
            .services
            .iter()
            .find(|s| s.instance_of_vm(&host, &vm.name).is_some())
            .map(|s| s.name().clone()),
    }]
}

/// A host, as a scope sees it; none when it is not enrolled.
fn host_target(snap: &Snapshot, host: &str) -> Vec<Target> {
    HostId::new(host)
        .ok()
        .and_then(|id| snap.host(&id).map(|h| h.site_name().to_string()))
        .map(|site| Target::Host {
            name: host.to_string(),
            site,
        })
        .into_iter()
        .collect()
}

/// A new workload on `host`, which belongs to no service yet.
fn new_workload(snap: &Snapshot, name: &str, host: &str) -> Vec<Target> {
    host_target(snap, host)
        .into_iter()
        .map(|h| match h {
            Target::Host { site, .. } => Target::Workload {
                name: name.to_string(),
                site,
                service: None,
            },
            other => other,
        })
        .collect()
}

fn service_target(name: &str) -> Vec<Target> {
    ServiceName::new(name)
        .map(Target::Service)
        .into_iter()
        .collect()
}

macro_rules! read_only {
    () => {
        fn changes(&self) -> bool {
            false
        }
    };
}

macro_rules! changes {
    () => {
        fn changes(&self) -> bool {
            true
        }
    };
}

/// Every enrolled host, with its maintenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListHosts {}

impl Operation for ListHosts {
    const NAME: &'static str = "hosts";
    const ACTION: &'static str = "list hosts";
    type Response = Vec<HostSummary>;
    read_only!();
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let snap = engine.snapshot();
        Ok(snap
            .hosts
            .iter()
            .map(|h| HostSummary::new(h, snap.drain(h.id())))
            .collect())
    }
}

/// Every VM and process of every host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListVms {}

impl Operation for ListVms {
    const NAME: &'static str = "vms";
    const ACTION: &'static str = "list VMs";
    type Response = Vec<FleetVm>;
    read_only!();
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        Ok(FleetVm::all(&engine.snapshot()))
    }
}

/// The newest `limit` events, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListEvents {
    pub limit: usize,
}

impl Operation for ListEvents {
    const NAME: &'static str = "events";
    const ACTION: &'static str = "read the event log";
    type Response = Vec<EventView>;
    read_only!();
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let snap = engine.snapshot();
        let skip = snap.events.len().saturating_sub(self.limit);
        Ok(snap.events[skip..].iter().map(EventView::from).collect())
    }
}

/// The key an agent presents, read without enrolling it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeHost {
    pub address: String,
}

impl Operation for ProbeHost {
    const NAME: &'static str = "host-probe";
    const ACTION: &'static str = "probe hosts";
    type Response = ProbedKey;
    read_only!();
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let address = self.address;
        let fingerprint = engine
            .request(|reply| Command::ProbeHost { address, reply })
            .await?;
        Ok(ProbedKey {
            fingerprint: fingerprint.to_string(),
        })
    }
}

/// Enrolls the agent at `address` with its one-time token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AddHost {
    pub address: String,
    pub token: String,
    /// The key the agent printed; enrollment fails if it presents another.
    pub fingerprint: Option<String>,
    /// Take over an enrolled host's id even though the agent has another key.
    #[serde(default)]
    pub replace: bool,
}

impl Operation for AddHost {
    const NAME: &'static str = "host-add";
    const ACTION: &'static str = "enroll hosts";
    type Response = HostEnrolled;
    changes!();
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let expected_fingerprint = self
            .fingerprint
            .map(|f| f.parse::<Fingerprint>())
            .transpose()
            .map_err(|e| e.to_string())?;
        let (address, token, replace) = (self.address, self.token, self.replace);
        let added = engine
            .request(|reply| Command::AddHost {
                address,
                token,
                expected_fingerprint,
                replace,
                reply,
            })
            .await?;
        Ok(HostEnrolled {
            id: added.host_id,
            fingerprint: added.fingerprint.to_string(),
        })
    }
}

/// Puts a host in maintenance and moves everything off it, or resumes its paused drain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainHost {
    pub host: String,
}

impl Operation for DrainHost {
    const NAME: &'static str = "host-drain";
    const ACTION: &'static str = "drain hosts";
    type Response = DrainView;
    changes!();
    fn targets(&self, snap: &Snapshot) -> Vec<Target> {
        host_target(snap, &self.host)
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let host = host_id(&self.host)?;
        let progress = engine
            .request(|reply| Command::DrainHost { host, reply })
            .await?;
        Ok(DrainView::from(&progress))
    }
}

/// Starts no further migration of a host's drain; the one under way finishes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PauseDrain {
    pub host: String,
}

impl Operation for PauseDrain {
    const NAME: &'static str = "host-drain-pause";
    const ACTION: &'static str = "pause drains";
    /// The host's maintenance as it now stands.
    type Response = Option<MaintenanceView>;
    changes!();
    fn targets(&self, snap: &Snapshot) -> Vec<Target> {
        host_target(snap, &self.host)
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let host = host_id(&self.host)?;
        engine
            .request(|reply| Command::PauseDrain {
                host: host.clone(),
                reply,
            })
            .await?;
        let snap = engine.snapshot();
        let view = snap.host(&host).ok_or("the host is gone")?;
        Ok(MaintenanceView::new(view, snap.drain(&host)))
    }
}

/// Ends a host's maintenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UndrainHost {
    pub host: String,
}

impl Operation for UndrainHost {
    const NAME: &'static str = "host-undrain";
    const ACTION: &'static str = "end host maintenance";
    type Response = Undrained;
    changes!();
    fn targets(&self, snap: &Snapshot) -> Vec<Target> {
        host_target(snap, &self.host)
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let host = host_id(&self.host)?;
        engine
            .request(|reply| Command::UndrainHost {
                host: host.clone(),
                reply,
            })
            .await?;
        Ok(Undrained {
            host,
            maintenance: false,
        })
    }
}

/// A new VM from a template on a host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateVm {
    pub name: String,
    /// A template of the host's; empty with `image`.
    #[serde(default)]
    pub template: String,
    pub host: String,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub start: bool,
    /// An image of the library instead of a template: pushed to the host first when it
    /// does not hold it.
    #[serde(default)]
    pub image: Option<String>,
    /// The disk's size in GiB, for a VM from an image.
    #[serde(default)]
    pub disk_gib: Option<u64>,
    /// Boot a VM from an image with UEFI instead of the BIOS.
    #[serde(default)]
    pub uefi: bool,
    /// cloud-init user-data for a VM from an image (`#cloud-config` YAML or a `#!` script).
    #[serde(default)]
    pub user_data: Option<String>,
    /// A user cloud-init makes (with sudo) who logs in with `ssh_key`: instead of user-data.
    #[serde(default)]
    pub user: Option<String>,
    /// The user's SSH public key, one `authorized_keys` line.
    #[serde(default)]
    pub ssh_key: Option<String>,
}

impl CreateVm {
    /// The user-data asked: the operator's, checked, or the usual user with a key.
    fn user_data(&self) -> Result<Option<String>, ApiError> {
        use dunes_shared::cloud_init::{check_user_data, parse_ssh_key, user_with_key};
        let asked = self.user_data.is_some() || self.user.is_some() || self.ssh_key.is_some();
        if asked && self.image.is_none() {
            return Err("cloud-init data is for VMs from images".to_string().into());
        }
        match (&self.user_data, &self.user, &self.ssh_key) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                Err("give user-data, or a user with an SSH key, not both"
                    .to_string()
                    .into())
            }
            (Some(text), None, None) => {
                check_user_data(text).map_err(|e| e.to_string())?;
                Ok(Some(text.clone()))
            }
            (None, Some(user), Some(key)) => {
                let key = parse_ssh_key(key).map_err(|e| e.to_string())?;
                Ok(Some(user_with_key(user, &key).map_err(|e| e.to_string())?))
            }
            (None, Some(_), None) => Err("a user needs the SSH key they log in with"
                .to_string()
                .into()),
            (None, None, Some(_)) => Err("an SSH key needs the user it is for".to_string().into()),
            (None, None, None) => Ok(None),
        }
    }
}

impl Operation for CreateVm {
    const NAME: &'static str = "vm-create";
    const ACTION: &'static str = "create VMs";
    type Response = VmSummary;
    changes!();
    fn targets(&self, snap: &Snapshot) -> Vec<Target> {
        new_workload(snap, &self.name, &self.host)
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let user_data = self.user_data()?;
        let template = match (&self.image, self.template.is_empty()) {
            (Some(_), false) => {
                return Err("give a template or an image, not both".to_string().into());
            }
            (None, _) if self.disk_gib.is_some() || self.uefi => {
                return Err("a disk size and UEFI are for VMs from images"
                    .to_string()
                    .into());
            }
            (Some(image), true) => image.clone(),
            (None, _) => self.template.clone(),
        };
        let spec = VmSpec {
            name: VmName::new(self.name).map_err(|e| e.to_string())?,
            template: TemplateName::new(template).map_err(|e| e.to_string())?,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
        };
        let host = host_id(&self.host)?;
        let start = self.start;
        let vm = match self.image {
            Some(image) => {
                let image = image_name(&image)?;
                let disk = ImageDisk {
                    disk_gib: self.disk_gib,
                    firmware: if self.uefi {
                        Firmware::Uefi
                    } else {
                        Firmware::Bios
                    },
                };
                engine
                    .request(|reply| {
                        Command::CreateVmFromImage(CreateFromImage {
                            host: host.clone(),
                            spec,
                            image,
                            disk,
                            user_data,
                            start,
                            network: None,
                            reply,
                        })
                    })
                    .await?
            }
            None => {
                engine
                    .request(|reply| Command::CreateVm {
                        host: host.clone(),
                        spec,
                        start,
                        reply,
                    })
                    .await?
            }
        };
        Ok(VmSummary::new(&host, &vm))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartVm {
    /// `NAME` or `HOST/NAME`.
    pub vm: String,
}

impl Operation for StartVm {
    const NAME: &'static str = "vm-start";
    const ACTION: &'static str = "start VMs";
    type Response = VmSummary;
    changes!();
    fn targets(&self, snap: &Snapshot) -> Vec<Target> {
        workload(snap, &self.vm)
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let (host, found) = find_vm(engine, &self.vm)?;
        let vm = engine
            .request(|reply| Command::StartVm {
                host: host.clone(),
                name: found.name,
                reply,
            })
            .await?;
        Ok(VmSummary::new(&host, &vm))
    }
}

/// Reboots, pauses or resumes a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PowerVm {
    pub vm: String,
    pub action: PowerAction,
}

impl Operation for PowerVm {
    const NAME: &'static str = "vm-power";
    const ACTION: &'static str = "reboot, pause or resume VMs";
    type Response = VmSummary;
    changes!();
    fn targets(&self, snap: &Snapshot) -> Vec<Target> {
        workload(snap, &self.vm)
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let (host, found) = find_vm(engine, &self.vm)?;
        let action = self.action;
        let vm = engine
            .request(|reply| Command::PowerVm {
                host: host.clone(),
                name: found.name,
                action,
                reply,
            })
            .await?;
        Ok(VmSummary::new(&host, &vm))
    }
}

/// Shuts a VM down (forced off after its agent's timeout), or pulls its plug with `force`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StopVm {
    pub vm: String,
    pub force: bool,
}

impl Operation for StopVm {
    const NAME: &'static str = "vm-stop";
    const ACTION: &'static str = "stop VMs";
    type Response = VmSummary;
    changes!();
    fn targets(&self, snap: &Snapshot) -> Vec<Target> {
        workload(snap, &self.vm)
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let (host, found) = find_vm(engine, &self.vm)?;
        let force = self.force;
        let vm = engine
            .request(|reply| Command::StopVm {
                host: host.clone(),
                name: found.name,
                force,
                reply,
            })
            .await?;
        Ok(VmSummary::new(&host, &vm))
    }
}

/// Changes a VM's vCPUs, memory or autostart; what is absent stays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigureVm {
    pub vm: String,
    #[serde(default)]
    pub vcpus: Option<u32>,
    #[serde(default)]
    pub memory_mib: Option<u64>,
    #[serde(default)]
    pub autostart: Option<bool>,
}

impl Operation for ConfigureVm {
    const NAME: &'static str = "vm-set";
    const ACTION: &'static str = "change VMs' resources";
    type Response = VmConfiguredView;
    changes!();
    fn targets(&self, snap: &Snapshot) -> Vec<Target> {
        workload(snap, &self.vm)
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let (host, found) = find_vm(engine, &self.vm)?;
        let (vcpus, memory_mib, autostart) = (self.vcpus, self.memory_mib, self.autostart);
        let configured = engine
            .request(|reply| Command::ConfigureVm {
                host: host.clone(),
                name: found.name,
                vcpus,
                memory_mib,
                autostart,
                eject_cdrom: false,
                reply,
            })
            .await?;
        Ok(VmConfiguredView {
            vm: VmSummary::new(&host, &configured.status),
            at_next_start: configured.at_next_start,
        })
    }
}

/// Takes the installer out of a VM's CD-ROM drive, at once if it runs: it boots from its
/// disk from then on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EjectVm {
    pub vm: String,
}

impl Operation for EjectVm {
    const NAME: &'static str = "vm-eject";
    const ACTION: &'static str = "eject VMs' installers";
    type Response = VmConfiguredView;
    changes!();
    fn targets(&self, snap: &Snapshot) -> Vec<Target> {
        workload(snap, &self.vm)
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let (host, found) = find_vm(engine, &self.vm)?;
        let configured = engine
            .request(|reply| Command::ConfigureVm {
                host: host.clone(),
                name: found.name,
                vcpus: None,
                memory_mib: None,
                autostart: None,
                eject_cdrom: true,
                reply,
            })
            .await?;
        Ok(VmConfiguredView {
            vm: VmSummary::new(&host, &configured.status),
            at_next_start: false,
        })
    }
}

/// Copies a stopped VM as `name`; with `to`, the copy then migrates to that host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloneVm {
    pub vm: String,
    pub name: String,
    #[serde(default)]
    pub to: Option<String>,
}

impl Operation for CloneVm {
    const NAME: &'static str = "vm-clone";
    const ACTION: &'static str = "clone VMs";
    type Response = VmClonedView;
    changes!();
    fn targets(&self, snap: &Snapshot) -> Vec<Target> {
        let mut targets = workload(snap, &self.vm);
        let host = match (&self.to, snap.find_vm(&self.vm)) {
            (Some(to), _) => to.clone(),
            (None, Ok((host, _))) => host.to_string(),
            (None, Err(_)) => return targets,
        };
        targets.extend(new_workload(snap, &self.name, &host));
        targets
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let (host, found) = find_vm(engine, &self.vm)?;
        let new_name = VmName::new(self.name).map_err(|e| e.to_string())?;
        let to = self.to.as_deref().map(host_id).transpose()?;
        let cloned = engine
            .request(|reply| Command::CloneVm {
                host,
                name: found.name,
                new_name,
                to,
                reply,
            })
            .await?;
        Ok(VmClonedView {
            vm: VmSummary::new(&cloned.host, &cloned.status),
            clone_of: self.vm,
            migration: cloned.migration.as_ref().map(MigrationView::from),
        })
    }
}

/// Lists a VM's snapshots, or takes, reverts to or deletes one; answered with the list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotVm {
    pub vm: String,
    pub action: SnapshotAction,
    #[serde(default)]
    pub snapshot: Option<String>,
}

impl Operation for SnapshotVm {
    const NAME: &'static str = "vm-snapshot";
    const ACTION: &'static str = "manage VM snapshots";
    type Response = SnapshotList;
    fn changes(&self) -> bool {
        self.action != SnapshotAction::List
    }
    fn targets(&self, snap: &Snapshot) -> Vec<Target> {
        workload(snap, &self.vm)
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let (host, found) = find_vm(engine, &self.vm)?;
        let (action, snapshot) = (self.action, self.snapshot);
        Ok(engine
            .request(|reply| Command::SnapshotVm {
                host,
                name: found.name,
                action,
                snapshot,
                reply,
            })
            .await?)
    }
}

/// Runs a shell command inside a running VM, through its guest agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestExec {
    pub vm: String,
    pub command: String,
    pub timeout_secs: u32,
}

impl Operation for GuestExec {
    const NAME: &'static str = "vm-exec";
    const ACTION: &'static str = "run commands in VMs";
    type Response = ExecOutput;
    changes!();
    fn targets(&self, snap: &Snapshot) -> Vec<Target> {
        workload(snap, &self.vm)
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let (host, found) = find_vm(engine, &self.vm)?;
        let (command, timeout_secs) = (self.command, self.timeout_secs);
        let out = engine
            .request(|reply| Command::GuestExec {
                host,
                name: found.name,
                command,
                timeout_secs,
                reply,
            })
            .await?;
        Ok(ExecOutput {
            exit_code: out.exit_code,
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeleteVm {
    pub vm: String,
}

impl Operation for DeleteVm {
    const NAME: &'static str = "vm-delete";
    const ACTION: &'static str = "delete VMs";
    type Response = VmDeleted;
    changes!();
    fn targets(&self, snap: &Snapshot) -> Vec<Target> {
        workload(snap, &self.vm)
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let (host, found) = find_vm(engine, &self.vm)?;
        let name = found.name.clone();
        engine
            .request(|reply| Command::DeleteVm {
                host: host.clone(),
                name,
                reply,
            })
            .await?;
        Ok(VmDeleted {
            deleted: found.name,
            host,
        })
    }
}

/// A cold migration of a VM to another host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrateVm {
    /// `NAME` or `HOST/NAME`.
    pub vm: String,
    pub to: String,
    /// At most this many Mbit/s for the disk stream.
    #[serde(default)]
    pub limit_mbps: Option<u32>,
    /// Compress the stream or not; unset: when it crosses to or from a remote site.
    #[serde(default)]
    pub compress: Option<bool>,
}

impl Operation for MigrateVm {
    const NAME: &'static str = "vm-migrate";
    const ACTION: &'static str = "migrate VMs";
    type Response = MigrationView;
    changes!();
    fn targets(&self, snap: &Snapshot) -> Vec<Target> {
        let mut targets = workload(snap, &self.vm);
        targets.extend(host_target(snap, &self.to));
        targets
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let options = MigrationOptions {
            limit_mbps: self.limit_mbps,
            compress: self.compress,
        };
        let (host, found) = find_vm(engine, &self.vm)?;
        let to = host_id(&self.to)?;
        let journal = engine
            .request(|reply| Command::MigrateVm {
                host,
                vm: found.name,
                to,
                options,
                reply,
            })
            .await?;
        Ok(MigrationView::from(&journal))
    }
}

/// Whether a VM can migrate to a host, and what it would take: the pre-check only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckMigration {
    pub vm: String,
    pub to: String,
    #[serde(default)]
    pub limit_mbps: Option<u32>,
    #[serde(default)]
    pub compress: Option<bool>,
}

impl Operation for CheckMigration {
    const NAME: &'static str = "vm-migrate-check";
    const ACTION: &'static str = "check migrations";
    type Response = MigrationCheck;
    read_only!();
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let options = MigrationOptions {
            limit_mbps: self.limit_mbps,
            compress: self.compress,
        };
        let snap = engine.snapshot();
        let (host, found) = snap.find_vm(&self.vm)?;
        let to = host_id(&self.to)?;
        let from_view = snap.host(&host).ok_or("the host is gone")?;
        let to_view = snap
            .host(&to)
            .ok_or_else(|| format!("host {to} is not enrolled"))?;
        let checked = crate::engine::migration::precheck(
            &found,
            from_view,
            to_view,
            &snap.services,
            &snap.migrations,
        );
        let (reasons, estimate) = match checked {
            Ok(e) => (Vec::new(), Some(MigrationEstimateView::new(&e, options))),
            Err(reasons) => (reasons, None),
        };
        Ok(MigrationCheck {
            vm: found.name,
            from: host,
            to,
            can_go: estimate.is_some(),
            reasons,
            estimate,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListMigrations {}

impl Operation for ListMigrations {
    const NAME: &'static str = "migrations";
    const ACTION: &'static str = "list migrations";
    type Response = Vec<MigrationView>;
    read_only!();
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        Ok(engine
            .snapshot()
            .migrations
            .iter()
            .map(MigrationView::from)
            .collect())
    }
}

/// Stops a migration and rolls it back, if it is not confirmed yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelMigration {
    pub id: u64,
}

impl Operation for CancelMigration {
    const NAME: &'static str = "migration-cancel";
    const ACTION: &'static str = "cancel migrations";
    type Response = MigrationView;
    changes!();
    fn targets(&self, snap: &Snapshot) -> Vec<Target> {
        snap.migrations
            .iter()
            .find(|m| m.id == self.id)
            .map(|m| workload(snap, &format!("{}/{}", m.from, m.vm)))
            .unwrap_or_default()
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let id = self.id;
        let journal = engine
            .request(|reply| Command::CancelMigration { id, reply })
            .await?;
        Ok(MigrationView::from(&journal))
    }
}

/// Capacity per site, and when each resource is full.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Forecast {
    /// One site only.
    #[serde(default)]
    pub site: Option<String>,
}

impl Operation for Forecast {
    const NAME: &'static str = "forecast";
    const ACTION: &'static str = "read capacity";
    type Response = Vec<SiteCapacityView>;
    read_only!();
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let sites = capacity(engine, WhatIf::default()).await?;
        if let Some(site) = &self.site
            && !sites.iter().any(|s| &s.site == site)
        {
            return Err(format!("no site {site:?} among the enrolled hosts").into());
        }
        Ok(sites
            .into_iter()
            .filter(|s| self.site.as_ref().is_none_or(|w| &s.site == w))
            .collect())
    }
}

async fn capacity(
    engine: &EngineHandle,
    what_if: WhatIf,
) -> Result<Vec<SiteCapacityView>, ApiError> {
    let sites = engine
        .request(|reply| Command::Capacity { what_if, reply })
        .await?;
    Ok(sites.iter().map(SiteCapacityView::from).collect())
}

/// `subject` as [`Stats`] takes it: one that [`parse_subject`] reads back as itself.
pub fn subject_text(subject: &Subject) -> String {
    match subject {
        Subject::Host(h) => format!("host:{h}"),
        Subject::Workload(v) => format!("vm:{v}"),
        Subject::GuestApp(v, a) => format!("guest:{v}/{a}"),
        Subject::Application(s, a) => format!("app:{s}/{a}"),
        Subject::Service(s) => format!("service:{s}"),
        Subject::Site(s) => format!("site:{s}"),
    }
}

/// A subject named as [`Stats`] takes it; a bare name is a host when one is enrolled by
/// it, else a workload.
pub fn parse_subject(text: &str, snapshot: &Snapshot) -> Result<Subject, ApiError> {
    let workload = |name: &str| {
        VmName::new(name)
            .map_err(|e| ApiError::from(format!("{name:?} is not a workload's name: {e}")))
    };
    Ok(if let Some(name) = text.strip_prefix("service:") {
        Subject::Service(service_name(name)?)
    } else if let Some(target) = text.strip_prefix("app:") {
        let (service, app) = service_app(target)?;
        Subject::Application(service, app)
    } else if let Some(site) = text.strip_prefix("site:") {
        Subject::Site(site.to_string())
    } else if let Some(host) = text.strip_prefix("host:") {
        Subject::Host(host_id(host)?)
    } else if let Some(name) = text.strip_prefix("vm:") {
        Subject::Workload(workload(name)?)
    } else if let Some(target) = text.strip_prefix("guest:") {
        let (vm, app) = target
            .split_once('/')
            .ok_or_else(|| format!("{target:?}: name the application as VM/APP"))?;
        Subject::GuestApp(workload(vm)?, AppName::new(app).map_err(|e| e.to_string())?)
    } else {
        match HostId::new(text) {
            Ok(h) if snapshot.host(&h).is_some() => Subject::Host(h),
            _ => Subject::Workload(VmName::new(text).map_err(|e| {
                format!("{text:?} is neither an enrolled host nor a workload name: {e}")
            })?),
        }
    })
}

/// A subject's time series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// A host id, a workload's name, `host:ID`, `vm:NAME`, `guest:VM/APP` (an application
    /// inside a VM), `service:NAME`, `app:SERVICE/APP` or `site:NAME`.
    pub subject: String,
    pub since_secs: u64,
    /// The finest level that holds the range in at most 500 buckets when absent.
    #[serde(default)]
    pub resolution_secs: Option<u64>,
}

impl Operation for Stats {
    const NAME: &'static str = "stats";
    const ACTION: &'static str = "read statistics";
    type Response = StatsView;
    read_only!();
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let subject = parse_subject(&self.subject, &engine.snapshot())?;
        let (since_secs, resolution_secs) = (self.since_secs, self.resolution_secs);
        let answer = engine
            .request(|reply| Command::Stats {
                subject,
                since_secs,
                resolution_secs,
                reply,
            })
            .await?;
        Ok(StatsView::from(&answer))
    }
}

/// The newest value of every time series that has a finite one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatestValues {}

impl Operation for LatestValues {
    const NAME: &'static str = "latest-values";
    const ACTION: &'static str = "read statistics";
    type Response = Vec<SeriesValue>;
    read_only!();
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let latest = engine
            .request(|reply| Command::LatestValues { reply })
            .await?;
        Ok(latest
            .into_iter()
            .filter(|(_, value)| value.is_finite())
            .map(|(series, value)| SeriesValue { series, value })
            .collect())
    }
}

/// Usage and its cost since `since_secs` ago, grouped `by` instance, application, service
/// or site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    pub by: String,
    pub since_secs: u64,
}

impl Operation for Cost {
    const NAME: &'static str = "cost";
    const ACTION: &'static str = "read costs";
    type Response = CostView;
    read_only!();
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let by = CostBy::parse(&self.by).ok_or_else(|| {
            format!(
                "cannot group by {:?}: instance, application, service or site",
                self.by
            )
        })?;
        let since_secs = self.since_secs;
        let lines = engine
            .request(|reply| Command::Cost {
                by,
                since_secs,
                reply,
            })
            .await?;
        Ok(CostView::new(since_secs, &lines))
    }
}

/// Sets an application's autoscaling rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetAutoscale {
    /// `SERVICE/APP`.
    pub target: String,
    /// `cpu` (also when empty) or `app-metric`.
    #[serde(default)]
    pub metric: String,
    pub above: f64,
    pub below: f64,
    pub period_secs: u64,
    pub periods: u32,
    pub cooldown_secs: u64,
    pub min: u32,
    pub max: u32,
}

impl Operation for SetAutoscale {
    const NAME: &'static str = "autoscale-set";
    const ACTION: &'static str = "set autoscaling";
    type Response = Option<AutoscaleSummary>;
    changes!();
    fn targets(&self, _snap: &Snapshot) -> Vec<Target> {
        service_app(&self.target)
            .map(|(service, _)| vec![Target::Service(service)])
            .unwrap_or_default()
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let (service, app) = service_app(&self.target)?;
        let metric_name = if self.metric.is_empty() {
            "cpu"
        } else {
            &self.metric
        };
        let metric = AutoscaleMetric::parse(metric_name)
            .ok_or_else(|| format!("no metric {:?}: cpu or app-metric", self.metric))?;
        let rule = AutoscaleRule {
            metric,
            scale_out_above: self.above,
            scale_in_below: self.below,
            period_secs: self.period_secs,
            periods: self.periods,
            cooldown_secs: self.cooldown_secs,
            min_instances: self.min,
            max_instances: self.max,
        };
        let view = engine
            .request(|reply| Command::SetAutoscale {
                service,
                app,
                rule: Some(rule),
                reply,
            })
            .await?;
        Ok(view.as_ref().map(AutoscaleSummary::from))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoveAutoscale {
    /// `SERVICE/APP`.
    pub target: String,
}

impl Operation for RemoveAutoscale {
    const NAME: &'static str = "autoscale-remove";
    const ACTION: &'static str = "remove autoscaling";
    type Response = AutoscaleRemoved;
    changes!();
    fn targets(&self, _snap: &Snapshot) -> Vec<Target> {
        service_app(&self.target)
            .map(|(service, _)| vec![Target::Service(service)])
            .unwrap_or_default()
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let (service, app) = service_app(&self.target)?;
        engine
            .request(|reply| Command::SetAutoscale {
                service,
                app,
                rule: None,
                reply,
            })
            .await?;
        Ok(AutoscaleRemoved {
            removed: self.target,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListAutoscale {}

impl Operation for ListAutoscale {
    const NAME: &'static str = "autoscale-show";
    const ACTION: &'static str = "read autoscaling";
    type Response = Vec<AutoscaleSummary>;
    read_only!();
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let views = engine
            .request(|reply| Command::AutoscaleShow { reply })
            .await?;
        Ok(views.iter().map(AutoscaleSummary::from).collect())
    }
}

/// What an application's rule would have done over the recorded history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayAutoscale {
    pub target: String,
    pub since_secs: u64,
}

impl Operation for ReplayAutoscale {
    const NAME: &'static str = "autoscale-replay";
    const ACTION: &'static str = "replay autoscaling";
    type Response = ReplayView;
    read_only!();
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let (service, app) = service_app(&self.target)?;
        let since_secs = self.since_secs;
        let answer = engine
            .request(|reply| Command::ReplayAutoscale {
                service,
                app,
                since_secs,
                reply,
            })
            .await?;
        Ok(ReplayView::from(&answer))
    }
}

/// The capacity of a host's site with and without it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WhatIfDrain {
    pub host: String,
}

impl Operation for WhatIfDrain {
    const NAME: &'static str = "whatif-drain";
    const ACTION: &'static str = "read capacity";
    type Response = WhatIfView;
    read_only!();
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let host = host_id(&self.host)?;
        let site = {
            let snap = engine.snapshot();
            let view = snap
                .host(&host)
                .ok_or_else(|| format!("host {host} is not enrolled"))?;
            view.site_name().to_string()
        };
        let what_if = WhatIf {
            leave_out: vec![host.clone()],
            add: Vec::new(),
        };
        let mut view = what_if_view(engine, what_if, &[site]).await?;
        view.drain = Some(host);
        Ok(view)
    }
}

/// The capacity of the sites a service's plan uses, with and without its new instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WhatIfDeploy {
    pub name: String,
}

impl Operation for WhatIfDeploy {
    const NAME: &'static str = "whatif-deploy";
    const ACTION: &'static str = "read capacity";
    type Response = WhatIfView;
    read_only!();
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let name = service_name(&self.name)?;
        let snap = engine.snapshot();
        let view = snap
            .services
            .iter()
            .find(|s| s.name() == &name)
            .ok_or_else(|| format!("service {name} does not exist"))?;
        let spec = view
            .spec
            .clone()
            .map_err(|e| format!("service {name} does not read: {e}"))?;
        let plan_of = name.clone();
        let plan = engine
            .request(|reply| Command::PlanService {
                name: plan_of,
                overrides: Vec::new(),
                reply,
            })
            .await?;
        let mut add = Vec::new();
        let mut sites = Vec::new();
        for p in &plan.plan.placements {
            if p.action != Action::Create {
                continue;
            }
            let Some(app) = spec.applications.iter().find(|a| a.name == p.app) else {
                continue;
            };
            if let Some(h) = snap.host(&p.host) {
                sites.push(h.site_name().to_string());
            }
            add.push(Extra {
                host: p.host.clone(),
                vcpus: app.vcpus,
                memory_mib: app.memory_mib,
                storage_mib: app.storage_mib,
            });
        }
        sites.sort();
        sites.dedup();
        let unplaced = plan
            .plan
            .unplaced
            .iter()
            .map(|u| format!("{}-{}: {}", u.app, u.index, u.would_fit))
            .collect();
        let what_if = WhatIf {
            leave_out: Vec::new(),
            add,
        };
        let mut view = what_if_view(engine, what_if, &sites).await?;
        view.deploy = Some(name);
        view.unplaced = Some(unplaced);
        Ok(view)
    }
}

/// Capacity of `sites` now and after a what-if.
async fn what_if_view(
    engine: &EngineHandle,
    what_if: WhatIf,
    sites: &[String],
) -> Result<WhatIfView, ApiError> {
    let of = |all: Vec<SiteCapacityView>| -> Vec<SiteCapacityView> {
        all.into_iter()
            .filter(|s| sites.contains(&s.site))
            .collect()
    };
    let before = of(capacity(engine, WhatIf::default()).await?);
    let after = of(capacity(engine, what_if).await?);
    let fits = after.iter().all(|s| s.resources.iter().all(|r| r.fits));
    Ok(WhatIfView {
        drain: None,
        deploy: None,
        unplaced: None,
        before,
        after,
        fits,
    })
}

/// Every service, with its cost per hour (of its plan before it is deployed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListServices {}

impl Operation for ListServices {
    const NAME: &'static str = "services";
    const ACTION: &'static str = "list services";
    type Response = Vec<ServiceSummary>;
    read_only!();
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let services = engine.snapshot().services.clone();
        let mut out = Vec::with_capacity(services.len());
        for view in services.iter() {
            // A plan is only needed for the cost of a service not deployed yet.
            let plan = match &view.spec {
                Ok(_) if view.instances.is_empty() => {
                    let name = view.name().clone();
                    engine
                        .request(|reply| Command::PlanService {
                            name,
                            overrides: Vec::new(),
                            reply,
                        })
                        .await
                        .ok()
                }
                _ => None,
            };
            out.push(ServiceSummary::new(view, plan.as_ref()));
        }
        Ok(out)
    }
}

/// A service with its file's text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShowService {
    pub name: String,
}

impl Operation for ShowService {
    const NAME: &'static str = "service-show";
    const ACTION: &'static str = "read services";
    type Response = ServiceSummary;
    read_only!();
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let name = service_name(&self.name)?;
        let snap = engine.snapshot();
        let view = snap
            .services
            .iter()
            .find(|s| s.name() == &name)
            .ok_or_else(|| format!("service {name} does not exist"))?;
        let mut shown = ServiceSummary::new(view, None);
        shown.source = Some(view.record.source.clone());
        Ok(shown)
    }
}

/// Defines a service from its file's text (or replaces it, with `replace`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DefineService {
    pub source: String,
    #[serde(default)]
    pub replace: bool,
}

impl Operation for DefineService {
    const NAME: &'static str = "service-create";
    const ACTION: &'static str = "define services";
    type Response = ServiceDefined;
    changes!();
    fn targets(&self, _snap: &Snapshot) -> Vec<Target> {
        // The service the file defines; a file that does not read names none.
        crate::engine::services::service_file::parse_service_file(&self.source)
            .ok()
            .and_then(|spec| ServiceName::new(spec.name).ok())
            .map(Target::Service)
            .into_iter()
            .collect()
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let (source, replace) = (self.source, self.replace);
        let name = engine
            .request(|reply| Command::DefineService {
                source,
                replace,
                reply,
            })
            .await?;
        Ok(ServiceDefined { name })
    }
}

/// A dry run: where every instance would go, and why hosts were left out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanService {
    pub name: String,
    /// `APP-INDEX=HOST`: instances placed by hand.
    #[serde(default)]
    pub place: Vec<String>,
}

impl Operation for PlanService {
    const NAME: &'static str = "service-plan";
    const ACTION: &'static str = "plan services";
    type Response = PlanView;
    read_only!();
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let name = service_name(&self.name)?;
        let overrides = parse_overrides(&self.place)?;
        let plan = engine
            .request(|reply| Command::PlanService {
                name,
                overrides,
                reply,
            })
            .await?;
        Ok(PlanView::from(&plan))
    }
}

/// Applies the plan made now; with a fingerprint, only if it is still the plan shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeployService {
    pub name: String,
    #[serde(default)]
    pub fingerprint: Option<String>,
    #[serde(default)]
    pub place: Vec<String>,
}

impl Operation for DeployService {
    const NAME: &'static str = "service-deploy";
    const ACTION: &'static str = "deploy services";
    type Response = ReportView;
    changes!();
    fn targets(&self, _snap: &Snapshot) -> Vec<Target> {
        service_target(&self.name)
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let name = service_name(&self.name)?;
        let overrides = parse_overrides(&self.place)?;
        let fingerprint = self.fingerprint;
        let report = engine
            .request(|reply| Command::DeployService {
                name,
                fingerprint,
                overrides,
                reply,
            })
            .await?;
        Ok(ReportView::new(&report)?)
    }
}

/// Starts a service's instances in dependency order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartService {
    pub name: String,
}

impl Operation for StartService {
    const NAME: &'static str = "service-start";
    const ACTION: &'static str = "start services";
    type Response = ReportView;
    changes!();
    fn targets(&self, _snap: &Snapshot) -> Vec<Target> {
        service_target(&self.name)
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let name = service_name(&self.name)?;
        let report = engine
            .request(|reply| Command::StartService { name, reply })
            .await?;
        Ok(ReportView::new(&report)?)
    }
}

/// Stops a service's instances in reverse dependency order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StopService {
    pub name: String,
}

impl Operation for StopService {
    const NAME: &'static str = "service-stop";
    const ACTION: &'static str = "stop services";
    type Response = ReportView;
    changes!();
    fn targets(&self, _snap: &Snapshot) -> Vec<Target> {
        service_target(&self.name)
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let name = service_name(&self.name)?;
        let report = engine
            .request(|reply| Command::StopService { name, reply })
            .await?;
        Ok(ReportView::new(&report)?)
    }
}

/// Removes every instance of a service, then its definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeleteService {
    pub name: String,
}

impl Operation for DeleteService {
    const NAME: &'static str = "service-delete";
    const ACTION: &'static str = "delete services";
    type Response = ReportView;
    changes!();
    fn targets(&self, _snap: &Snapshot) -> Vec<Target> {
        service_target(&self.name)
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let name = service_name(&self.name)?;
        let report = engine
            .request(|reply| Command::DeleteService { name, reply })
            .await?;
        Ok(ReportView::new(&report)?)
    }
}

/// Makes an existing VM an instance of one of a service's applications.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdoptVm {
    pub name: String,
    pub app: String,
    /// `NAME` or `HOST/NAME`.
    pub vm: String,
}

impl Operation for AdoptVm {
    const NAME: &'static str = "service-adopt";
    const ACTION: &'static str = "adopt VMs into services";
    type Response = Adopted;
    changes!();
    fn targets(&self, snap: &Snapshot) -> Vec<Target> {
        let mut targets = service_target(&self.name);
        targets.extend(workload(snap, &self.vm));
        targets
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let service = service_name(&self.name)?;
        let app = AppName::new(self.app).map_err(|e| e.to_string())?;
        let (host, found) = find_vm(engine, &self.vm)?;
        let instance = engine
            .request(|reply| Command::AdoptVm {
                service,
                app,
                host,
                vm: found.name,
                reply,
            })
            .await?;
        Ok(Adopted {
            service: instance.service,
            application: instance.app,
            index: instance.index,
            host: instance.host,
            vm: instance.vm,
        })
    }
}

/// Moves every instance of a service to the hosts of a site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoveService {
    pub name: String,
    pub site: String,
}

impl Operation for MoveService {
    const NAME: &'static str = "service-move";
    const ACTION: &'static str = "move services";
    type Response = ServiceMoving;
    changes!();
    fn targets(&self, _snap: &Snapshot) -> Vec<Target> {
        service_target(&self.name)
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let name = service_name(&self.name)?;
        let site = self.site;
        let moving = engine
            .request(|reply| Command::MoveService {
                name: name.clone(),
                site,
                reply,
            })
            .await?;
        Ok(ServiceMoving {
            service: name,
            moving: MoveView::from(&moving),
        })
    }
}

fn operator_name(text: &str) -> Result<dunes_shared::model::OperatorName, ApiError> {
    Ok(dunes_shared::model::OperatorName::new(text).map_err(|e| e.to_string())?)
}

/// Adds an operator with a role: the engine signs their key's certificate request (the
/// key never leaves the one who made it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AddOperator {
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    /// `service:NAME` or `site:NAME`: what their changes are limited to; none: everything
    /// their role allows.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// The certificate request for their key, PEM.
    pub csr_pem: String,
    /// Whether they may open VMs' consoles and screens; `None`: as their role gives
    /// (operators and admins may, viewers not).
    #[serde(default)]
    pub consoles: Option<bool>,
}

impl Operation for AddOperator {
    const NAME: &'static str = "operator-add";
    const ACTION: &'static str = "add operators";
    type Response = OperatorIssuedView;
    changes!();
    fn targets(&self, _snap: &Snapshot) -> Vec<Target> {
        vec![Target::Operator(self.name.clone())]
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let name = operator_name(&self.name)?;
        let role = crate::engine::operators::Role::parse(&self.role)
            .ok_or_else(|| format!("no role {:?}: viewer, operator or admin", self.role))?;
        let scopes = self
            .scopes
            .iter()
            .map(|s| crate::engine::operators::access::Scope::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        let csr_der = pem::parse(&self.csr_pem)
            .ok()
            .filter(|p| p.tag() == "CERTIFICATE REQUEST")
            .ok_or("the certificate request is not a PEM CERTIFICATE REQUEST")?
            .into_contents();
        let issued = engine
            .request(|reply| Command::AddOperator {
                name,
                role,
                scopes,
                consoles: self.consoles,
                csr_der,
                reply,
            })
            .await?;
        Ok(OperatorIssuedView {
            operator: OperatorView::from(&issued.record),
            certificate_pem: pem::encode(&pem::Pem::new("CERTIFICATE", issued.cert_der)),
            ca_pem: pem::encode(&pem::Pem::new("CERTIFICATE", issued.ca_der)),
        })
    }
}

/// Every operator, revoked ones included.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListOperators {}

impl Operation for ListOperators {
    const NAME: &'static str = "operators";
    const ACTION: &'static str = "list operators";
    type Response = Vec<OperatorView>;
    read_only!();
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        Ok(engine
            .operators()
            .borrow()
            .iter()
            .map(OperatorView::from)
            .collect())
    }
}

/// Ends an operator's sessions and refuses their certificate from now on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevokeOperator {
    pub name: String,
}

impl Operation for RevokeOperator {
    const NAME: &'static str = "operator-revoke";
    const ACTION: &'static str = "revoke operators";
    type Response = OperatorView;
    changes!();
    fn targets(&self, _snap: &Snapshot) -> Vec<Target> {
        vec![Target::Operator(self.name.clone())]
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let name = operator_name(&self.name)?;
        let record = engine
            .request(|reply| Command::RevokeOperator { name, reply })
            .await?;
        Ok(OperatorView::from(&record))
    }
}

fn image_name(text: &str) -> Result<ImageName, ApiError> {
    Ok(ImageName::new(text).map_err(|e| e.to_string())?)
}

/// Service networks, with their instances and published ports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListNetworks {}

impl Operation for ListNetworks {
    const NAME: &'static str = "networks";
    const ACTION: &'static str = "list networks";
    type Response = Vec<crate::engine::networks::NetworkView>;
    read_only!();
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        Ok(engine.snapshot().networks.as_ref().clone())
    }
}

/// The image library.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListImages {}

impl Operation for ListImages {
    const NAME: &'static str = "images";
    const ACTION: &'static str = "list images";
    type Response = Vec<ImageView>;
    read_only!();
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let records = engine
            .request(|reply| Command::ListImages { reply })
            .await?;
        let transfers = engine.snapshot().image_transfers.clone();
        Ok(records
            .iter()
            .map(|r| ImageView::from(r).with_transfers(&transfers))
            .collect())
    }
}

/// Copies a file on the engine's machine into the image library: a qcow2 disk, a raw disk
/// with a partition table, or an ISO 9660 installer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportImage {
    pub name: String,
    /// An absolute path on the engine's machine; with `upload_bytes`, the file's name where
    /// ctl runs.
    pub path: String,
    /// Through the operator endpoint: the file's bytes, this many, follow the request on
    /// its stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_bytes: Option<u64>,
}

impl Operation for ImportImage {
    const NAME: &'static str = "image-import";
    const ACTION: &'static str = "import images";
    type Response = ImageView;
    changes!();
    fn targets(&self, _snap: &Snapshot) -> Vec<Target> {
        vec![Target::Image(self.name.clone())]
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let name = image_name(&self.name)?;
        if self.upload_bytes.is_some() {
            return Err(
                "an upload's bytes travel only through the operator endpoint (ctl --connect)"
                    .into(),
            );
        }
        let path = std::path::PathBuf::from(&self.path);
        if !path.is_absolute() {
            return Err(format!("{}: give the image's absolute path", self.path).into());
        }
        let record = engine
            .request(|reply| Command::ImportImage { name, path, reply })
            .await?;
        Ok(ImageView::from(&record))
    }
}

/// Sends an image to a host, or to every host of a site, ahead of the VMs that will use
/// it; a host that holds its bytes receives nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushImage {
    pub name: String,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub site: Option<String>,
}

impl PushImage {
    /// The hosts the push goes to.
    fn hosts(&self, snap: &Snapshot) -> Result<Vec<HostId>, ApiError> {
        match (&self.host, &self.site) {
            (Some(host), None) => {
                let id = HostId::new(host).map_err(|e| e.to_string())?;
                if snap.host(&id).is_none() {
                    return Err(format!("host {host} is not enrolled").into());
                }
                Ok(vec![id])
            }
            (None, Some(site)) => {
                let hosts: Vec<HostId> = snap
                    .hosts
                    .iter()
                    .filter(|h| h.site_name() == site)
                    .map(|h| h.id().clone())
                    .collect();
                if hosts.is_empty() {
                    return Err(format!("site {site} has no hosts").into());
                }
                Ok(hosts)
            }
            _ => Err("give either a host or a site".to_string().into()),
        }
    }
}

impl Operation for PushImage {
    const NAME: &'static str = "image-push";
    const ACTION: &'static str = "push images";
    type Response = Vec<ImagePushView>;
    changes!();
    fn targets(&self, snap: &Snapshot) -> Vec<Target> {
        self.hosts(snap)
            .unwrap_or_default()
            .iter()
            .flat_map(|h| host_target(snap, h.as_str()))
            .collect()
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let name = image_name(&self.name)?;
        let hosts = self.hosts(&engine.snapshot())?;
        let reports = engine
            .request(|reply| Command::PushImage { name, hosts, reply })
            .await?;
        Ok(reports.iter().map(ImagePushView::from).collect())
    }
}

/// Removes an image no VM builds on, and the console's copy of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeleteImage {
    pub name: String,
}

impl Operation for DeleteImage {
    const NAME: &'static str = "image-delete";
    const ACTION: &'static str = "delete images";
    type Response = ImageView;
    changes!();
    fn targets(&self, _snap: &Snapshot) -> Vec<Target> {
        vec![Target::Image(self.name.clone())]
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let name = image_name(&self.name)?;
        let record = engine
            .request(|reply| Command::DeleteImage { name, reply })
            .await?;
        Ok(ImageView::from(&record))
    }
}

/// Attaches to a running VM's serial console: its latest output, then what it writes from
/// now on; the keyboard goes to the first viewer who asks while nobody holds it. Opening a
/// console is an operator's right, and each session is audited with its duration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsoleVm {
    /// `NAME` or `HOST/NAME`.
    pub vm: String,
    /// Watch only, never type.
    #[serde(default)]
    pub read_only: bool,
}

impl Operation for ConsoleVm {
    const NAME: &'static str = "vm-console";
    const ACTION: &'static str = "open VM consoles";
    type Response = ConsoleSession;
    changes!();
    fn targets(&self, snap: &Snapshot) -> Vec<Target> {
        workload(snap, &self.vm)
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        self.execute_as(engine, None).await
    }
    async fn execute_as(
        self,
        engine: &EngineHandle,
        caller: Option<&super::Caller>,
    ) -> Result<Self::Response, ApiError> {
        let (host, found) = find_vm(engine, &self.vm)?;
        let attach = engine
            .request(|reply| Command::OpenConsole {
                host: host.clone(),
                vm: found.name.clone(),
                wants_keyboard: !self.read_only,
                reply,
            })
            .await?;
        Ok(ConsoleSession {
            vm: found.name,
            host,
            typing: attach.keyboard.is_some(),
            attach: Some(attach),
            end: Some(super::dispatch::SessionEnd::begin(engine, caller, &self)),
        })
    }
}

/// Attaches to a running VM's screen: its picture as it changes, and (unless watching only)
/// keys and the pointer. Seeing a screen is an operator's right, as its console is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScreenVm {
    /// `NAME` or `HOST/NAME`.
    pub vm: String,
    /// Watch only, never type or point.
    #[serde(default)]
    pub read_only: bool,
}

impl Operation for ScreenVm {
    const NAME: &'static str = "vm-screen";
    const ACTION: &'static str = "see VM screens";
    type Response = ScreenSession;
    changes!();
    fn targets(&self, snap: &Snapshot) -> Vec<Target> {
        workload(snap, &self.vm)
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        self.execute_as(engine, None).await
    }
    async fn execute_as(
        self,
        engine: &EngineHandle,
        caller: Option<&super::Caller>,
    ) -> Result<Self::Response, ApiError> {
        let (host, found) = find_vm(engine, &self.vm)?;
        let attach = engine
            .request(|reply| Command::OpenScreen {
                host: host.clone(),
                vm: found.name.clone(),
                wants_input: !self.read_only,
                reply,
            })
            .await?;
        Ok(ScreenSession {
            vm: found.name,
            host,
            typing: attach.input.is_some(),
            attach: Some(attach),
            end: Some(super::dispatch::SessionEnd::begin(engine, caller, &self)),
        })
    }
}

/// How long a screenshot waits for the display's first picture.
const SCREENSHOT_TIMEOUT: Duration = Duration::from_secs(20);
/// A screenshot is taken once the picture has not changed for this long (a display sends a
/// screen as several updates), or at [`SCREENSHOT_TIMEOUT`].
const SCREENSHOT_SETTLE: Duration = Duration::from_millis(500);

/// A running VM's screen as a PNG, watching only. The same right as seeing the screen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScreenshotVm {
    /// `NAME` or `HOST/NAME`.
    pub vm: String,
}

impl Operation for ScreenshotVm {
    const NAME: &'static str = "vm-screenshot";
    const ACTION: &'static str = "see VM screens";
    type Response = Screenshot;
    changes!();
    fn targets(&self, snap: &Snapshot) -> Vec<Target> {
        workload(snap, &self.vm)
    }
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let (host, found) = find_vm(engine, &self.vm)?;
        let mut attach = engine
            .request(|reply| Command::OpenScreen {
                host: host.clone(),
                vm: found.name.clone(),
                wants_input: false,
                reply,
            })
            .await?;
        let closed = || ApiError::unavailable(format!("the screen of {} closed", found.name));
        let deadline = tokio::time::Instant::now() + SCREENSHOT_TIMEOUT;
        // The first picture, then quiet.
        while attach.frames.borrow_and_update().generation == 0 {
            tokio::time::timeout_at(deadline, attach.frames.changed())
                .await
                .map_err(|_| {
                    ApiError::unavailable(format!(
                        "the screen of {} showed nothing in {} s",
                        found.name,
                        SCREENSHOT_TIMEOUT.as_secs()
                    ))
                })?
                .map_err(|_| closed())?;
        }
        loop {
            let quiet = tokio::time::Instant::now() + SCREENSHOT_SETTLE;
            match tokio::time::timeout_at(quiet.min(deadline), attach.frames.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(closed()),
                Err(_) => break,
            }
        }
        let frame = attach.frames.borrow().clone();
        let png = crate::engine::consoles::frame::encode_png(&frame)
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        Ok(Screenshot {
            vm: found.name,
            host,
            width: frame.width,
            height: frame.height,
            png: hex::encode(png),
        })
    }
}

/// Which engine this is, and where operators reach it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineInfo {}

impl Operation for EngineInfo {
    const NAME: &'static str = "engine-info";
    const ACTION: &'static str = "read the engine's name";
    type Response = EngineInfoView;
    read_only!();
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        Ok(EngineInfoView {
            name: engine
                .data_dir()
                .file_name()
                .map_or_else(|| "dunes".into(), |n| n.to_string_lossy().into_owned()),
            version: env!("CARGO_PKG_VERSION").to_string(),
            operator_address: engine.operator_address().map(|a| a.to_string()),
        })
    }
}

async fn audit_records(
    engine: &EngineHandle,
) -> Result<Vec<(u64, Result<crate::engine::audit::AuditRecord, String>)>, ApiError> {
    let reader = engine
        .request(|reply| Command::AuditReader { reply })
        .await?;
    tokio::task::spawn_blocking(move || reader.read_all())
        .await
        .map_err(|e| ApiError::invalid(format!("the audit read failed: {e}")))?
        .map_err(|e| ApiError {
            code: super::ApiErrorCode::Store,
            message: format!(
                "the audit log cannot be read: {}",
                dunes_shared::error_chain(&e)
            ),
        })
}

/// The audit log: one line per request, with its outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListAudit {
    /// Only what was asked in the last this many seconds.
    #[serde(default)]
    pub since_secs: Option<u64>,
    /// Only what this operator (or `local`) asked.
    #[serde(default)]
    pub operator: Option<String>,
}

impl Operation for ListAudit {
    const NAME: &'static str = "audit";
    const ACTION: &'static str = "read the audit log";
    type Response = Vec<AuditView>;
    read_only!();
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        let records: Vec<_> = audit_records(engine)
            .await?
            .into_iter()
            .filter_map(|(_, r)| r.ok())
            .collect();
        let now_ms = crate::engine::snapshot::unix_ms(std::time::SystemTime::now());
        let since_ms = self
            .since_secs
            .map_or(0, |s| now_ms.saturating_sub(s.saturating_mul(1000)));
        Ok(AuditView::join(&records)
            .into_iter()
            .filter(|v| v.time_ms >= since_ms)
            .filter(|v| self.operator.as_ref().is_none_or(|o| &v.operator == o))
            .collect())
    }
}

/// Checks the audit log's chain from its first record to its last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyAudit {}

impl Operation for VerifyAudit {
    const NAME: &'static str = "audit-verify";
    const ACTION: &'static str = "check the audit log";
    type Response = AuditCheck;
    read_only!();
    async fn execute(self, engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        use crate::engine::audit::Verdict;
        let records = audit_records(engine).await?;
        let total = records.len() as u64;
        Ok(match crate::engine::audit::chain::verify(records) {
            Verdict::Intact { records } => AuditCheck {
                records,
                intact: true,
                first_bad: None,
                problem: None,
            },
            Verdict::Broken { seq, problem } => AuditCheck {
                records: total,
                intact: false,
                first_bad: Some(seq),
                problem: Some(problem),
            },
        })
    }
}

/// A fresh certificate for the calling operator's own key, before theirs expires.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenewOperator {
    /// A certificate request for the key they hold, PEM.
    pub csr_pem: String,
}

impl Operation for RenewOperator {
    const NAME: &'static str = "operator-renew";
    const ACTION: &'static str = "renew their certificate";
    type Response = OperatorIssuedView;
    changes!();
    fn targets(&self, _snap: &Snapshot) -> Vec<Target> {
        // Their own certificate: no scope is needed for it.
        Vec::new()
    }
    async fn execute(self, _engine: &EngineHandle) -> Result<Self::Response, ApiError> {
        Err(ApiError::invalid(
            "a certificate is renewed by its operator, over their own session",
        ))
    }
    async fn execute_as(
        self,
        engine: &EngineHandle,
        caller: Option<&super::Caller>,
    ) -> Result<Self::Response, ApiError> {
        let Some(caller) = caller else {
            return self.execute(engine).await;
        };
        let name = caller.name.clone();
        let csr_der = pem::parse(&self.csr_pem)
            .ok()
            .filter(|p| p.tag() == "CERTIFICATE REQUEST")
            .ok_or("the certificate request is not a PEM CERTIFICATE REQUEST")?
            .into_contents();
        let issued = engine
            .request(|reply| Command::RenewOperator {
                name,
                csr_der,
                reply,
            })
            .await?;
        Ok(OperatorIssuedView {
            operator: OperatorView::from(&issued.record),
            certificate_pem: pem::encode(&pem::Pem::new("CERTIFICATE", issued.cert_der)),
            ca_pem: pem::encode(&pem::Pem::new("CERTIFICATE", issued.ca_der)),
        })
    }
}
