//! What runs workloads on a host, behind one trait. Each runtime (libvirt today; the process
//! runtime and others later) is one module here plus one registration in [`RuntimeRegistry`];
//! the server dispatches requests through the registry and never names a runtime.

pub mod cgroup;
pub mod libvirt;
pub mod metric;
pub mod process;

use std::{future::Future, pin::Pin, sync::Arc};

use dunes_shared::{
    model::{
        RuntimeInfo, RuntimeKind, SnapshotInfo, SpecError, TemplateName, VmName, VmSpec, VmState,
        VmStatus, WorkloadSample,
    },
    protocol::{
        CloneVm, ConfigureVm, ErrorCode, GuestApps, GuestAppsReply, GuestExec, GuestExecReply,
        MetricProbe, PowerAction, ReadinessProbe, ReadyReply, SnapshotVm, VmConfigured, WireError,
    },
};
use tokio::sync::broadcast;

use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{action} failed: {message}")]
    Libvirt {
        action: &'static str,
        message: String,
    },
    #[error("VM {0} does not exist")]
    NotFound(VmName),
    #[error("VM {0} already exists")]
    AlreadyExists(VmName),
    #[error("VM {name} could not start, so it was not created: {message}")]
    NotStarted { name: VmName, message: String },
    #[error("VM {name} is {state}; {hint}")]
    WrongState {
        name: VmName,
        state: VmState,
        hint: &'static str,
    },
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Definition(#[from] libvirt::definition::DefinitionError),
    #[error(
        "template {0} has nothing to boot on this host: build the tiny guest with assets/guest/build-tiny-guest.sh DIR and restart the agent with --guest-dir DIR"
    )]
    NoGuest(TemplateName),
    #[error("this host has no runtime for {0}")]
    NoRuntime(&'static str),
    #[error("a {0} runtime is registered already")]
    Duplicate(&'static str),
    #[error("the {runtime} runtime cannot check {check} readiness")]
    UnsupportedCheck {
        runtime: &'static str,
        check: &'static str,
    },
    #[error("the runtime stopped")]
    WorkerGone,
    #[error("{0}")]
    NoGuestAgent(&'static str),
    #[error("{0}")]
    Unsupported(&'static str),
    #[error("{0}")]
    Metric(String),
    #[error(transparent)]
    Guest(#[from] libvirt::guest::GuestError),
    #[error("VM {0} was not created by Dunes; change it where it was defined")]
    NotOurs(VmName),
    #[error("VM {name} cannot have snapshots: {reason}")]
    NoSnapshots { name: VmName, reason: &'static str },
    #[error("VM {vm} has a snapshot named {snapshot} already")]
    SnapshotExists { vm: VmName, snapshot: String },
    #[error("VM {vm} has no snapshot named {snapshot}")]
    NoSnapshot { vm: VmName, snapshot: String },
    #[error("{0}")]
    Invalid(String),
}

impl RuntimeError {
    /// The error as sent to the console: a code and a sentence.
    pub fn to_wire(&self) -> WireError {
        let code = match self {
            RuntimeError::NotFound(_)
            | RuntimeError::NoSnapshot { .. }
            | RuntimeError::Storage(StorageError::NoTemplate(_)) => ErrorCode::NotFound,
            RuntimeError::AlreadyExists(_)
            | RuntimeError::SnapshotExists { .. }
            | RuntimeError::Storage(StorageError::DiskExists(_)) => ErrorCode::AlreadyExists,
            RuntimeError::WrongState { .. } => ErrorCode::Conflict,
            RuntimeError::NoGuest(_)
            | RuntimeError::NoRuntime(_)
            | RuntimeError::UnsupportedCheck { .. }
            | RuntimeError::NoGuestAgent(_)
            | RuntimeError::Unsupported(_)
            | RuntimeError::NotOurs(_)
            | RuntimeError::NoSnapshots { .. } => ErrorCode::Unsupported,
            RuntimeError::Spec(_) | RuntimeError::Invalid(_) => ErrorCode::BadRequest,
            RuntimeError::Storage(_) => ErrorCode::Storage,
            RuntimeError::Libvirt { .. }
            | RuntimeError::Definition(_)
            | RuntimeError::NotStarted { .. }
            | RuntimeError::Guest(_)
            | RuntimeError::Metric(_) => ErrorCode::Runtime,
            RuntimeError::Duplicate(_) | RuntimeError::WorkerGone => ErrorCode::Internal,
        };
        WireError::new(code, dunes_shared::error_chain(self))
    }
}

/// What a runtime's operations return.
pub type RuntimeFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, RuntimeError>> + Send + 'a>>;

/// What a runtime can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Virtual machines with disks (`CreateVm` and the rest of the VM lifecycle).
    pub vms: bool,
}

/// A change a runtime saw, pushed as it happens.
#[derive(Debug, Clone, PartialEq)]
pub enum StatusChange {
    Changed(VmStatus),
    Removed(VmName),
}

/// A serial console attached: what the guest writes comes on `output` (which ends when the
/// console does), what is sent on `input` is typed; dropping both detaches.
#[derive(Debug)]
pub struct ConsolePipe {
    pub output: tokio::sync::mpsc::Receiver<Vec<u8>>,
    pub input: tokio::sync::mpsc::Sender<Vec<u8>>,
}

/// A runtime of the host. Operations on different workloads run concurrently; operations on
/// one workload are ordered. The lifecycle is named and typed after VMs (the wire protocol's
/// `CreateVm` and `VmStatus`), but nothing in it is libvirt's: a workload has a name, a
/// template, vCPUs and memory, and a state. A runtime says with [`Capabilities`] which
/// requests reach it; the server finds it in the [`RuntimeRegistry`], never by its type.
pub trait Runtime: Send + Sync + 'static {
    fn kind(&self) -> RuntimeKind;
    /// Driver and version, as shown in the host's inventory.
    fn info(&self) -> RuntimeInfo;
    fn capabilities(&self) -> Capabilities;
    fn list(&self) -> RuntimeFuture<'_, Vec<VmStatus>>;
    fn create(&self, spec: VmSpec, start: bool) -> RuntimeFuture<'_, VmStatus>;
    /// Creates a VM from the library image its template holds, with the disk and firmware
    /// asked, and cloud-init's seed made from `cloud_init`. Not every runtime can.
    fn create_from_image(
        &self,
        spec: VmSpec,
        start: bool,
        disk: dunes_shared::model::ImageDisk,
        cloud_init: Option<dunes_shared::cloud_init::CloudInitData>,
    ) -> RuntimeFuture<'_, VmStatus> {
        let _ = (spec, start, disk, cloud_init);
        Box::pin(async { Err(RuntimeError::NoRuntime("VMs from images")) })
    }
    fn start(&self, name: VmName) -> RuntimeFuture<'_, VmStatus>;
    /// Starts a VM made from an image after writing `user_data` into its cloud-init seed.
    /// Not every runtime can.
    fn start_with_user_data(&self, name: VmName, user_data: String) -> RuntimeFuture<'_, VmStatus> {
        let _ = (name, user_data);
        Box::pin(async { Err(RuntimeError::NoRuntime("cloud-init user-data")) })
    }
    /// Puts a stopped workload on a service network, with the address and MAC the console
    /// chose; it has them from its next start on. Not every runtime can.
    fn join_network(
        &self,
        name: VmName,
        nic: dunes_shared::network::InstanceNic,
    ) -> RuntimeFuture<'_, VmStatus> {
        let _ = (name, nic);
        Box::pin(async { Err(RuntimeError::NoRuntime("service networks")) })
    }
    /// Asks the workload to stop and forces it after `timeout_secs`, or at once with `force`.
    fn stop(&self, name: VmName, force: bool, timeout_secs: u32) -> RuntimeFuture<'_, VmStatus>;
    fn delete(&self, name: VmName) -> RuntimeFuture<'_, ()>;
    /// Defines a workload from a portable definition another agent exported, over a disk
    /// that has arrived already (a migration). Not every runtime can.
    fn import(&self, record: String) -> RuntimeFuture<'_, VmStatus> {
        let _ = record;
        Box::pin(async { Err(RuntimeError::NoRuntime("imported definitions")) })
    }
    /// Attaches to the running VM's serial console. Not every runtime can.
    fn open_console(&self, name: VmName) -> RuntimeFuture<'_, ConsolePipe> {
        let _ = name;
        Box::pin(async { Err(RuntimeError::NoRuntime("serial consoles")) })
    }
    /// A new connection to the running VM's screen, speaking RFB from its first byte. Not
    /// every runtime has screens.
    fn open_screen(&self, name: VmName) -> RuntimeFuture<'_, std::os::fd::OwnedFd> {
        let _ = name;
        Box::pin(async { Err(RuntimeError::NoRuntime("screens")) })
    }
    /// Whether the workload is ready for the applications that depend on it.
    fn check_ready(&self, name: VmName, probe: ReadinessProbe) -> RuntimeFuture<'_, ReadyReply>;
    /// The stream of status changes.
    fn changes(&self) -> broadcast::Receiver<StatusChange>;
    /// Workloads holding CPU and memory, as last seen; no runtime call.
    fn active_count(&self) -> u32;
    /// The counters of every running workload, for statistics.
    fn sample(&self) -> RuntimeFuture<'_, Vec<WorkloadSample>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    /// The processes of every running workload whose connections are the host's own (a
    /// process instance's, a VM's on QEMU's user-mode network; a VM's on a bridge are its
    /// guest's): for the traffic they send. Reads /proc and cgroup or pid files: call it off
    /// the async workers.
    fn process_ids(&self) -> Vec<(VmName, Vec<u32>)> {
        Vec::new()
    }
    /// The applications inside a running workload, through its guest agent.
    fn guest_apps(&self, request: GuestApps) -> RuntimeFuture<'_, GuestAppsReply> {
        let _ = request;
        Box::pin(async {
            Err(RuntimeError::NoGuestAgent(
                "only a VM has a guest agent to ask",
            ))
        })
    }
    /// The application metric of a running workload.
    fn read_metric(&self, name: VmName, probe: MetricProbe) -> RuntimeFuture<'_, f64> {
        let _ = (name, probe);
        Box::pin(async { Err(RuntimeError::NoRuntime("application metrics")) })
    }
    /// Reboots, pauses or resumes a running workload. Not every runtime can.
    fn power(&self, name: VmName, action: PowerAction) -> RuntimeFuture<'_, VmStatus> {
        let _ = (name, action);
        Box::pin(async {
            Err(RuntimeError::Unsupported(
                "only a VM reboots, pauses and resumes; stop and start a process instead",
            ))
        })
    }
    /// Changes a workload's vCPUs, memory or autostart. Not every runtime can.
    fn configure(&self, request: ConfigureVm) -> RuntimeFuture<'_, VmConfigured> {
        let _ = request;
        Box::pin(async {
            Err(RuntimeError::Unsupported(
                "only a VM's vCPUs, memory and autostart are changed; a process instance takes its service's",
            ))
        })
    }
    /// Takes, lists, reverts to or deletes snapshots of a workload. Not every runtime can.
    fn snapshots(&self, request: SnapshotVm) -> RuntimeFuture<'_, Vec<SnapshotInfo>> {
        let _ = request;
        Box::pin(async { Err(RuntimeError::Unsupported("only a VM has snapshots")) })
    }
    /// Copies a stopped workload under a new name on this host. Not every runtime can.
    fn clone_vm(&self, request: CloneVm) -> RuntimeFuture<'_, VmStatus> {
        let _ = request;
        Box::pin(async { Err(RuntimeError::Unsupported("only a VM is cloned")) })
    }
    /// Runs a shell command inside a running workload, through its guest agent.
    fn guest_exec(&self, request: GuestExec) -> RuntimeFuture<'_, GuestExecReply> {
        let _ = request;
        Box::pin(async {
            Err(RuntimeError::NoGuestAgent(
                "only a VM has a guest agent to ask",
            ))
        })
    }
}

/// The runtimes of this host, one per kind.
#[derive(Default, Clone)]
pub struct RuntimeRegistry {
    runtimes: Vec<Arc<dyn Runtime>>,
}

impl std::fmt::Debug for RuntimeRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.runtimes.iter().map(|r| r.kind()))
            .finish()
    }
}

impl RuntimeRegistry {
    pub fn register(&mut self, runtime: Arc<dyn Runtime>) -> Result<(), RuntimeError> {
        if self.get(runtime.kind()).is_some() {
            return Err(RuntimeError::Duplicate(runtime.kind().as_str()));
        }
        self.runtimes.push(runtime);
        Ok(())
    }

    pub fn get(&self, kind: RuntimeKind) -> Option<&Arc<dyn Runtime>> {
        self.runtimes.iter().find(|r| r.kind() == kind)
    }

    /// The runtime that runs VMs.
    pub fn vms(&self) -> Result<&Arc<dyn Runtime>, RuntimeError> {
        self.runtimes
            .iter()
            .find(|r| r.capabilities().vms)
            .ok_or(RuntimeError::NoRuntime("VMs"))
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<dyn Runtime>> {
        self.runtimes.iter()
    }

    pub fn infos(&self) -> Vec<RuntimeInfo> {
        self.runtimes.iter().map(|r| r.info()).collect()
    }

    pub fn active_count(&self) -> u32 {
        self.runtimes.iter().map(|r| r.active_count()).sum()
    }
}
