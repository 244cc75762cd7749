//! The libvirt runtime. libvirt calls block, so each runs on the blocking pool (at most
//! [`CONCURRENT_CALLS`] at once), with one connection that libvirt makes thread-safe. Calls for
//! one VM are ordered by a lock of that VM; calls for different VMs run side by side, so a slow
//! QEMU define or start holds back neither the others nor the status push. A poller thread
//! compares domain states with what it published last, on its own clock: its cost is the
//! number of VMs per interval, whatever the number of requests.

mod console;
pub mod definition;
pub mod embed;
pub mod guest;
pub mod snapshots;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use dunes_shared::{
    cloud_init::CloudInitData,
    model::{
        Counters, DISK_GIB_MAX, Firmware, ImageDisk, ImageFormat, RuntimeInfo, RuntimeKind,
        SnapshotInfo, TemplateName, VmName, VmResources, VmSpec, VmState, VmStatus, WorkloadSample,
    },
    protocol::{
        CloneVm, ConfigureVm, GuestApps, GuestAppsReply, GuestExec, GuestExecReply, MetricKind,
        MetricProbe, PowerAction, ProbeKind, ReadinessProbe, ReadyReply, SnapshotAction,
        SnapshotVm, VmConfigured,
    },
};
use tokio::sync::{Semaphore, broadcast};
use virt::{
    connect::Connect,
    domain::{Domain, DomainState},
};

use self::definition::{Devices, DirectBoot, DiskDefinition, DomainType, VmDefinition};
use super::{Capabilities, Runtime, RuntimeError, RuntimeFuture, StatusChange};
use crate::storage::{DiskFormat, Storage, Template};

/// How often domain states are compared with what was published last.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// libvirt calls running at once on the blocking pool.
pub const CONCURRENT_CALLS: usize = 8;
/// Guest-agent passes (status, commands) running at once on the blocking pool.
const GUEST_CALLS: usize = 4;
/// How long a guest command runs when the request names no timeout.
const GUEST_EXEC_DEFAULT_SECS: u32 = 30;
/// The longest a guest command may be waited for (as `ctl vm exec --timeout-secs` allows).
const GUEST_EXEC_MAX_SECS: u32 = 600;
/// How long a guest-agent ping may take.
const GUEST_PING_TIMEOUT_SECS: i32 = 2;
/// How often an eject is asked while the guest holds the CD-ROM's tray shut, and how long
/// apart.
const EJECT_ATTEMPTS: u32 = 20;
const EJECT_RETRY: Duration = Duration::from_millis(500);
/// How often running VMs' guest agents are asked for their addresses.
const ADDRESSES_EVERY: Duration = Duration::from_secs(5);
/// How long one such question may take.
const ADDRESSES_TIMEOUT_SECS: i32 = 2;
/// Status changes a slow subscriber may fall behind by before it must list again.
const CHANGES_QUEUE: usize = 1024;

fn lv(action: &'static str) -> impl FnOnce(virt::error::Error) -> RuntimeError {
    move |e| RuntimeError::Libvirt {
        action,
        message: e.message().to_string(),
    }
}

/// What the hypervisor says about its host, read once at start.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub cpus: u32,
    pub memory_mib: u64,
    pub model: String,
}

/// Handle to the libvirt runtime; cheap to clone.
#[derive(Clone)]
pub struct LibvirtRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Connect,
    storage: Storage,
    domain_type: DomainType,
    info: RuntimeInfo,
    node: NodeFacts,
    changes: broadcast::Sender<StatusChange>,
    active: AtomicU32,
    calls: Semaphore,
    /// Guest-agent work running at once: apart from `calls`, since a check may take seconds.
    guest_calls: Semaphore,
    /// One lock per VM name: calls for one VM are ordered.
    vm_locks: Mutex<HashMap<VmName, Arc<tokio::sync::Mutex<()>>>>,
    /// Template of each domain, by UUID: read from its XML once.
    templates: Mutex<HashMap<String, Learned>>,
    /// Disk and interface devices of each running domain, by UUID, for its counters: read
    /// from its XML once.
    devices: Mutex<HashMap<String, Arc<CountedDevices>>>,
    /// Where the QEMU driver keeps each running domain's pid file (`NAME.pid`), when known.
    pid_dir: Option<std::path::PathBuf>,
    /// Running domains whose only NICs are on QEMU's user-mode network, as the last sample
    /// saw them: their traffic is their QEMU process's sockets.
    user_network_vms: Mutex<Vec<VmName>>,
    /// What each VM's definition record says of its resources and autostart: its next
    /// start's resources, which a running VM may not have yet.
    records: Mutex<HashMap<VmName, RecordFacts>>,
    /// Each running VM's addresses, as its guest agent last told them.
    addresses: Mutex<HashMap<VmName, Vec<String>>>,
}

/// What a definition record says that the status shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RecordFacts {
    resources: VmResources,
    autostart: bool,
    /// An installer is in its CD-ROM drive.
    installer: bool,
    /// It has a display (under QEMU).
    screen: bool,
}

impl RecordFacts {
    fn of(def: &VmDefinition) -> Self {
        RecordFacts {
            resources: VmResources {
                vcpus: def.vcpus,
                memory_mib: def.memory_mib,
            },
            autostart: def.autostart,
            installer: def.cdrom.is_some(),
            screen: def.devices.screen,
        }
    }
}

/// A domain's devices with counters: disk targets (`vda`) and host-side interfaces (`vnet0`).
#[derive(Debug, Default)]
struct CountedDevices {
    disks: Vec<String>,
    interfaces: Vec<String>,
    /// A NIC on QEMU's user-mode network, which has no host-side device to count.
    user_network: bool,
}

/// Whether `cmdline` (`/proc/PID/cmdline`: arguments each ending in a NUL) is the QEMU
/// libvirt started for the domain `name`: it has `-name guest=NAME[,…]` (or `-name NAME`).
fn is_qemu_of(cmdline: &[u8], name: &str) -> bool {
    let mut args = cmdline.split(|&b| b == 0);
    while let Some(arg) = args.next() {
        if arg == b"-name" {
            let Some(value) = args.next() else {
                return false;
            };
            let value = value.strip_prefix(b"guest=").unwrap_or(value);
            let named = value.split(|&b| b == b',').next().unwrap_or_default();
            return named == name.as_bytes();
        }
    }
    false
}

/// Where the QEMU driver behind `uri` keeps its running domains' pid files: in the embed
/// root, or the system daemon's run directory.
fn qemu_pid_dir(uri: &str) -> Option<std::path::PathBuf> {
    if let Some(root) = uri.strip_prefix("qemu:///embed?root=") {
        return Some(std::path::Path::new(root).join("run/qemu"));
    }
    match uri {
        "qemu:///system" => Some("/run/libvirt/qemu".into()),
        "qemu:///session" => std::env::var_os("XDG_RUNTIME_DIR")
            .map(|run| std::path::Path::new(&run).join("libvirt/qemu/run")),
        _ => None,
    }
}

impl std::fmt::Debug for LibvirtRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtRuntime")
            .field("info", &self.inner.info)
            .finish_non_exhaustive()
    }
}

/// What a domain's XML said once, by UUID: its template and its NICs.
type Learned = (Option<TemplateName>, Vec<dunes_shared::model::VmNicInfo>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a poll compares: everything but the disk usage, which changes all the time and
/// belongs to the statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Lifecycle {
    uuid: String,
    state: VmState,
    vcpus: u32,
    memory_mib: u64,
    template: Option<TemplateName>,
    nics: Vec<dunes_shared::model::VmNicInfo>,
    autostart: Option<bool>,
    next_start: Option<VmResources>,
    addresses: Option<Vec<String>>,
    snapshots: Option<u32>,
    installer: bool,
    screen: bool,
}

/// What came of asking a guest to shut down.
enum ShutdownAsked {
    AlreadyOff,
    Asked,
    CannotAsk(String),
}

impl LibvirtRuntime {
    /// Opens `uri` (blocking: call it off the async workers), turns the first release's saved
    /// domain XML into definition records, restores definitions the test driver forgot, and
    /// starts the poller.
    pub fn start(uri: &str, storage: Storage) -> Result<Self, RuntimeError> {
        embed::start_event_loop();
        let conn = Connect::open(Some(uri)).map_err(lv("opening libvirt"))?;
        let info = conn.node_info().map_err(lv("reading node info"))?;
        let driver = conn.driver_type().unwrap_or_default();
        let version = conn
            .hyp_version()
            .map(|v| format!("{}.{}.{}", v / 1_000_000, v / 1000 % 1000, v % 1000))
            .unwrap_or_default();
        let domain_type = if uri.starts_with("test:") {
            DomainType::Test
        } else {
            DomainType::Qemu
        };
        let inner = Arc::new(Inner {
            conn,
            storage,
            domain_type,
            info: RuntimeInfo {
                kind: RuntimeKind::Libvirt,
                driver,
                version,
                limits: None,
                users: None,
            },
            node: NodeFacts {
                cpus: info.cpus,
                memory_mib: info.memory / 1024,
                model: info.model.clone(),
            },
            changes: broadcast::channel(CHANGES_QUEUE).0,
            active: AtomicU32::new(0),
            calls: Semaphore::new(CONCURRENT_CALLS),
            guest_calls: Semaphore::new(GUEST_CALLS),
            vm_locks: Mutex::new(HashMap::new()),
            templates: Mutex::new(HashMap::new()),
            devices: Mutex::new(HashMap::new()),
            pid_dir: qemu_pid_dir(uri),
            user_network_vms: Mutex::new(Vec::new()),
            records: Mutex::new(HashMap::new()),
            addresses: Mutex::new(HashMap::new()),
        });
        inner.upgrade_legacy_definitions();
        inner.restore_definitions();
        inner.load_records();
        inner.autostart();
        let mut published = HashMap::new();
        inner.poll(&mut published);
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("libvirt-poll".into())
            .spawn(move || poll_loop(weak, published))
            .map_err(|e| RuntimeError::Libvirt {
                action: "starting the poller",
                message: e.to_string(),
            })?;
        if domain_type == DomainType::Qemu {
            let weak = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name("libvirt-addresses".into())
                .spawn(move || addresses_loop(weak))
                .map_err(|e| RuntimeError::Libvirt {
                    action: "starting the address reader",
                    message: e.to_string(),
                })?;
        }
        Ok(LibvirtRuntime { inner })
    }

    /// The sizes libvirt's test driver declares for its mock host; `None` on a real
    /// hypervisor, whose host is the machine itself.
    pub fn declared_sizes(&self) -> Option<&NodeFacts> {
        (self.inner.domain_type == DomainType::Test).then_some(&self.inner.node)
    }

    pub fn is_test_driver(&self) -> bool {
        self.inner.domain_type == DomainType::Test
    }

    /// Runs `f` on the blocking pool, within the limit of concurrent calls.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, RuntimeError> + Send + 'static,
    ) -> Result<T, RuntimeError> {
        let _permit = self
            .inner
            .calls
            .acquire()
            .await
            .map_err(|_| RuntimeError::WorkerGone)?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|_| RuntimeError::WorkerGone)?
    }

    /// The lock that orders calls for `name`.
    async fn lock_vm(&self, name: &VmName) -> tokio::sync::OwnedMutexGuard<()> {
        let vm_lock = lock(&self.inner.vm_locks)
            .entry(name.clone())
            .or_default()
            .clone();
        vm_lock.lock_owned().await
    }

    /// Forgets the lock of a deleted VM once no call holds or waits for it.
    fn release_vm_lock(&self, name: &VmName) {
        let mut locks = lock(&self.inner.vm_locks);
        if locks.get(name).is_some_and(|l| Arc::strong_count(l) == 1) {
            locks.remove(name);
        }
    }

    async fn create_vm(
        &self,
        spec: VmSpec,
        start: bool,
        image_disk: Option<ImageDisk>,
        cloud_init: Option<CloudInitData>,
    ) -> Result<VmStatus, RuntimeError> {
        spec.validate()?;
        let runtime = self.clone();
        // Runs to the end even if the caller goes away, so no disk is left without its domain.
        tokio::spawn(async move {
            let _vm = runtime.lock_vm(&spec.name).await;
            let checked = spec.clone();
            let template = runtime.call(move |i| i.check_create(&checked)).await?;
            if let Some(disk) = &image_disk {
                check_image_disk(&template, disk, runtime.inner.domain_type)?;
            }
            let mut def = definition_for(&spec, &template, image_disk.as_ref());
            def.cloud_init = cloud_init.map(Into::into);
            let (storage, name) = (runtime.inner.storage.clone(), spec.name.clone());
            let disk_gib = image_disk.and_then(|d| d.disk_gib);
            // File I/O, not a libvirt call: it takes no call permit.
            tokio::task::spawn_blocking(move || storage.create_disk(&name, &template, disk_gib))
                .await
                .map_err(|_| RuntimeError::WorkerGone)??;
            runtime.call(move |i| i.define(&def, start)).await
        })
        .await
        .map_err(|_| RuntimeError::WorkerGone)?
    }

    async fn stop_vm(
        &self,
        name: VmName,
        force: bool,
        timeout_secs: u32,
    ) -> Result<VmStatus, RuntimeError> {
        if !force {
            let asked = {
                let _vm = self.lock_vm(&name).await;
                let n = name.clone();
                self.call(move |i| i.request_shutdown(&n)).await?
            };
            match asked {
                ShutdownAsked::AlreadyOff => {}
                // The VM's lock is not held while the guest takes its time: a force off asked
                // meanwhile goes through at once.
                ShutdownAsked::Asked => self.wait_until_off(&name, timeout_secs).await?,
                // The operator asked for the VM to stop, and waiting would change nothing.
                ShutdownAsked::CannotAsk(why) => {
                    tracing::warn!(vm = %name, "the guest cannot be asked to shut down ({why}), forcing it off");
                }
            }
        }
        let _vm = self.lock_vm(&name).await;
        self.call(move |i| i.force_off(&name)).await
    }

    /// Waits for the guest to power off, up to `timeout_secs`.
    async fn wait_until_off(&self, name: &VmName, timeout_secs: u32) -> Result<(), RuntimeError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout_secs.into());
        loop {
            tokio::time::sleep(POLL_INTERVAL).await;
            let n = name.clone();
            if !self.call(move |i| i.state_of(&n)).await?.is_active() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(vm = %name, "guest did not shut down in {timeout_secs}s, forcing it off");
                return Ok(());
            }
        }
    }
}

/// The definition of a new VM from its spec and template.
/// Where OVMF's firmware descriptors are: libvirt picks UEFI builds from them.
const OVMF_DESCRIPTORS: &str = "/usr/share/qemu/firmware";

/// Whether a VM from `template` can have `disk`: the template holds a library image, the
/// size is in range, and UEFI needs OVMF on a QEMU host.
fn check_image_disk(
    template: &Template,
    disk: &ImageDisk,
    domain_type: DomainType,
) -> Result<(), RuntimeError> {
    if template.image_blake3.is_none() {
        return Err(RuntimeError::Invalid(format!(
            "template {} holds no library image: push the image to this host first",
            template.info.name
        )));
    }
    if let Some(gib) = disk.disk_gib
        && !(1..=DISK_GIB_MAX).contains(&gib)
    {
        return Err(RuntimeError::Invalid(format!(
            "a disk is 1 to {DISK_GIB_MAX} GiB, not {gib}"
        )));
    }
    if disk.firmware == Firmware::Uefi
        && domain_type == DomainType::Qemu
        && !ovmf_installed(std::path::Path::new(OVMF_DESCRIPTORS))
    {
        return Err(RuntimeError::Invalid(
            "UEFI needs OVMF on this host: apt-get install ovmf (or create the VM with the BIOS)"
                .into(),
        ));
    }
    Ok(())
}

/// Whether `dir` holds a firmware descriptor of an OVMF build (`*ovmf*` or `*edk2*`).
fn ovmf_installed(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name().to_string_lossy().to_lowercase();
            name.ends_with(".json") && (name.contains("ovmf") || name.contains("edk2"))
        })
    })
}

fn definition_for(
    spec: &VmSpec,
    template: &Template,
    image_disk: Option<&ImageDisk>,
) -> VmDefinition {
    let format = if template.overlay {
        DiskFormat::Qcow2
    } else {
        DiskFormat::Raw
    };
    let file_name = |p: &std::path::Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    VmDefinition {
        name: spec.name.clone(),
        uuid: uuid::Uuid::new_v4().to_string(),
        template: template.info.name.clone(),
        vcpus: spec.vcpus.unwrap_or(template.info.default_vcpus).max(1),
        memory_mib: spec.memory_mib.unwrap_or(template.info.default_memory_mib),
        disks: vec![DiskDefinition {
            file: Storage::disk_file_name(&spec.name, format),
            format: format.as_str().into(),
            target: "vda".into(),
        }],
        boot: template
            .kernel
            .as_deref()
            .and_then(file_name)
            .map(|kernel| DirectBoot {
                kernel,
                initrd: template.initrd.as_deref().and_then(file_name),
                cmdline: template.cmdline.clone(),
            }),
        devices: Devices {
            serial_log: true,
            guest_agent: true,
            user_network: template.network == crate::storage::TemplateNetwork::User,
            mac: (template.network == crate::storage::TemplateNetwork::User)
                .then(definition::random_mac),
            screen: true,
            service_nic: None,
        },
        autostart: false,
        firmware: image_disk.map_or(Firmware::Bios, |d| d.firmware),
        cdrom: (template.format == ImageFormat::Iso)
            .then(|| template.disk.file_name())
            .flatten()
            .map(|n| n.to_string_lossy().into_owned()),
        image_blake3: template.image_blake3.clone(),
        cloud_init: None,
    }
}

impl Runtime for LibvirtRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Libvirt
    }

    fn info(&self) -> RuntimeInfo {
        self.inner.info.clone()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { vms: true }
    }

    fn list(&self) -> RuntimeFuture<'_, Vec<VmStatus>> {
        Box::pin(self.call(|i| i.list()))
    }

    fn create(&self, spec: VmSpec, start: bool) -> RuntimeFuture<'_, VmStatus> {
        Box::pin(self.create_vm(spec, start, None, None))
    }

    fn create_from_image(
        &self,
        spec: VmSpec,
        start: bool,
        disk: ImageDisk,
        cloud_init: Option<CloudInitData>,
    ) -> RuntimeFuture<'_, VmStatus> {
        Box::pin(self.create_vm(spec, start, Some(disk), cloud_init))
    }

    fn start(&self, name: VmName) -> RuntimeFuture<'_, VmStatus> {
        Box::pin(async move {
            let _vm = self.lock_vm(&name).await;
            self.call(move |i| i.start(&name)).await
        })
    }

    fn start_with_user_data(&self, name: VmName, user_data: String) -> RuntimeFuture<'_, VmStatus> {
        Box::pin(async move {
            let _vm = self.lock_vm(&name).await;
            self.call(move |i| {
                i.set_user_data(&name, user_data)?;
                i.start(&name)
            })
            .await
        })
    }

    fn join_network(
        &self,
        name: VmName,
        nic: dunes_shared::network::InstanceNic,
    ) -> RuntimeFuture<'_, VmStatus> {
        Box::pin(async move {
            let _vm = self.lock_vm(&name).await;
            self.call(move |i| i.join_network(&name, nic)).await
        })
    }

    fn import(&self, record: String) -> RuntimeFuture<'_, VmStatus> {
        Box::pin(async move {
            let def = VmDefinition::from_toml(&record)?;
            def.validate()?;
            // An overlay from another host opens what its header names: it must be this
            // host's copy of the template, nothing else.
            let overlays: Vec<String> = def
                .disks
                .iter()
                .filter(|d| d.format == DiskFormat::Qcow2.as_str())
                .map(|d| d.file.clone())
                .collect();
            if !overlays.is_empty() {
                let (storage, template) = (self.inner.storage.clone(), def.template.clone());
                tokio::task::spawn_blocking(move || {
                    overlays
                        .iter()
                        .try_for_each(|f| storage.check_overlay(f, &template))
                })
                .await
                .map_err(|_| RuntimeError::WorkerGone)??;
            }
            let _vm = self.lock_vm(&def.name).await;
            self.call(move |i| i.import(&def)).await
        })
    }

    fn stop(&self, name: VmName, force: bool, timeout_secs: u32) -> RuntimeFuture<'_, VmStatus> {
        Box::pin(self.stop_vm(name, force, timeout_secs))
    }

    fn delete(&self, name: VmName) -> RuntimeFuture<'_, ()> {
        Box::pin(async move {
            let vm = self.lock_vm(&name).await;
            let n = name.clone();
            let result = self.call(move |i| i.delete(&n)).await;
            drop(vm);
            if result.is_ok() {
                self.release_vm_lock(&name);
            }
            result
        })
    }

    fn open_console(&self, name: VmName) -> RuntimeFuture<'_, super::ConsolePipe> {
        Box::pin(async move {
            let n = name.clone();
            let stream = self.call(move |i| i.open_console(&n)).await?;
            console::pipe(stream, &name)
        })
    }

    fn open_screen(&self, name: VmName) -> RuntimeFuture<'_, std::os::fd::OwnedFd> {
        Box::pin(self.call(move |i| i.open_screen(&name)))
    }

    fn check_ready(&self, name: VmName, probe: ReadinessProbe) -> RuntimeFuture<'_, ReadyReply> {
        Box::pin(self.call(move |i| i.check_ready(&name, &probe)))
    }

    fn changes(&self) -> broadcast::Receiver<StatusChange> {
        self.inner.changes.subscribe()
    }

    fn active_count(&self) -> u32 {
        self.inner.active.load(Ordering::Relaxed)
    }

    fn sample(&self) -> RuntimeFuture<'_, Vec<WorkloadSample>> {
        Box::pin(self.call(|i| i.sample()))
    }

    /// The QEMU process of each running VM on the user-mode network: the sockets its
    /// guest's connections go out through are that process's.
    fn process_ids(&self) -> Vec<(VmName, Vec<u32>)> {
        let vms = lock(&self.inner.user_network_vms).clone();
        let Some(dir) = &self.inner.pid_dir else {
            // Once a run: every second otherwise.
            static WARNED: std::sync::atomic::AtomicBool =
                std::sync::atomic::AtomicBool::new(false);
            if !vms.is_empty() && !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "VMs' traffic is not measured: this libvirt URI's QEMU pid files are not known"
                );
            }
            return Vec::new();
        };
        vms.into_iter()
            .filter_map(|name| {
                let pid: u32 = std::fs::read_to_string(dir.join(format!("{name}.pid")))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                // A pid file left from before a crash may name a pid reused by another
                // process: its sockets are not the VM's.
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                is_qemu_of(&cmdline, name.as_str()).then(|| (name, vec![pid]))
            })
            .collect()
    }

    fn guest_apps(&self, request: GuestApps) -> RuntimeFuture<'_, GuestAppsReply> {
        Box::pin(self.guest_call(request.name.clone(), move |dom| {
            let vcpus = dom.info().map_err(lv("reading the VM"))?.nr_virt_cpu;
            let apps = guest::apps_status(dom, &request.apps)?;
            Ok(GuestAppsReply {
                at_unix_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                vcpus,
                apps,
            })
        }))
    }

    fn read_metric(&self, name: VmName, probe: MetricProbe) -> RuntimeFuture<'_, f64> {
        Box::pin(self.guest_call(name, move |dom| {
            let command = match (probe.kind, probe.command, probe.port) {
                (MetricKind::Command, Some(command), _) => command,
                (MetricKind::Tcp, _, Some(_)) => {
                    "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null".into()
                }
                _ => {
                    return Err(RuntimeError::Metric(
                        "this metric probe is not one this agent knows".into(),
                    ));
                }
            };
            let out = guest::exec(dom, &command, guest::CHECK_TIMEOUT)?;
            match (probe.kind, out.exit_code) {
                (MetricKind::Tcp, _) => Ok(f64::from(super::metric::established_on(
                    &out.stdout,
                    probe.port.unwrap_or(0),
                ))),
                (_, Some(0)) => {
                    super::metric::parse_number(&out.stdout).map_err(RuntimeError::Metric)
                }
                (_, Some(code)) => Err(RuntimeError::Metric(format!(
                    "the metric command exited {code}"
                ))),
                (_, None) => Err(RuntimeError::Metric(format!(
                    "the metric command did not end in {} s",
                    guest::CHECK_TIMEOUT.as_secs()
                ))),
            }
        }))
    }

    fn power(&self, name: VmName, action: PowerAction) -> RuntimeFuture<'_, VmStatus> {
        Box::pin(async move {
            let _vm = self.lock_vm(&name).await;
            self.call(move |i| i.power(&name, action)).await
        })
    }

    fn configure(&self, request: ConfigureVm) -> RuntimeFuture<'_, VmConfigured> {
        Box::pin(async move {
            dunes_shared::model::validate_resources(request.vcpus, request.memory_mib)?;
            let _vm = self.lock_vm(&request.name).await;
            self.call(move |i| i.configure(&request)).await
        })
    }

    fn snapshots(&self, request: SnapshotVm) -> RuntimeFuture<'_, Vec<SnapshotInfo>> {
        Box::pin(async move {
            if request.action != SnapshotAction::List {
                match request.snapshot.as_deref() {
                    Some(name) => dunes_shared::model::validate_snapshot_name(name)?,
                    None => {
                        return Err(RuntimeError::Invalid(format!(
                            "name the snapshot to {}",
                            request.action.as_str()
                        )));
                    }
                }
            }
            let _vm = self.lock_vm(&request.name).await;
            self.call(move |i| i.snapshot(&request)).await
        })
    }

    fn clone_vm(&self, request: CloneVm) -> RuntimeFuture<'_, VmStatus> {
        let runtime = self.clone();
        Box::pin(async move {
            // Runs to the end even if the caller goes away: no copied disk without its VM.
            tokio::spawn(async move {
                let _source = runtime.lock_vm(&request.name).await;
                let _clone = runtime.lock_vm(&request.new_name).await;
                let checked = request.clone();
                let (def, copies) = runtime.call(move |i| i.clone_definition(&checked)).await?;
                let storage = runtime.inner.storage.clone();
                // File I/O, not a libvirt call: it takes no call permit.
                tokio::task::spawn_blocking(move || storage.copy_disk_files(&copies))
                    .await
                    .map_err(|_| RuntimeError::WorkerGone)??;
                runtime.call(move |i| i.define(&def, false)).await
            })
            .await
            .map_err(|_| RuntimeError::WorkerGone)?
        })
    }

    fn guest_exec(&self, request: GuestExec) -> RuntimeFuture<'_, GuestExecReply> {
        // A command holds one of the few guest-agent slots while it runs: never past 10 min.
        let secs = match request.timeout_secs {
            0 => GUEST_EXEC_DEFAULT_SECS,
            n => n.min(GUEST_EXEC_MAX_SECS),
        };
        Box::pin(self.guest_call(request.name.clone(), move |dom| {
            Ok(guest::exec(
                dom,
                &request.command,
                Duration::from_secs(u64::from(secs)),
            )?)
        }))
    }
}

impl LibvirtRuntime {
    /// Runs `f` on a running VM's domain, on the blocking pool, within the guest-agent limit.
    async fn guest_call<T: Send + 'static>(
        &self,
        name: VmName,
        f: impl FnOnce(&Domain) -> Result<T, RuntimeError> + Send + 'static,
    ) -> Result<T, RuntimeError> {
        if self.inner.domain_type == DomainType::Test {
            return Err(RuntimeError::NoGuestAgent(
                "libvirt's test driver has no guest agent",
            ));
        }
        let _permit = self
            .inner
            .guest_calls
            .acquire()
            .await
            .map_err(|_| RuntimeError::WorkerGone)?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let state = inner.state_of(&name)?;
            if state != VmState::Running {
                return Err(RuntimeError::WrongState {
                    name,
                    state,
                    hint: "its guest agent answers only while it runs",
                });
            }
            let dom = inner.lookup(&name)?;
            f(&dom)
        })
        .await
        .map_err(|_| RuntimeError::WorkerGone)?
    }
}

/// Asks each running VM's guest agent for its addresses, on its own clock: a guest agent
/// that does not answer holds back no poll.
fn addresses_loop(inner: Weak<Inner>) {
    loop {
        std::thread::sleep(ADDRESSES_EVERY);
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let Ok(running) = inner
            .conn
            .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        else {
            continue;
        };
        let mut found = HashMap::new();
        for dom in &running {
            let Some(name) = dom.name().ok().and_then(|n| VmName::new(n).ok()) else {
                continue;
            };
            if let Ok(addresses) = guest::addresses(dom, ADDRESSES_TIMEOUT_SECS) {
                found.insert(name, addresses);
            }
        }
        *lock(&inner.addresses) = found;
    }
}

fn poll_loop(inner: Weak<Inner>, mut published: HashMap<VmName, Lifecycle>) {
    loop {
        std::thread::sleep(POLL_INTERVAL);
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.poll(&mut published);
    }
}

impl Inner {
    /// Compares every domain with what was published last and pushes the differences.
    fn poll(&self, published: &mut HashMap<VmName, Lifecycle>) {
        let Ok(domains) = self.conn.list_all_domains(0) else {
            return;
        };
        let mut current = HashMap::with_capacity(domains.len());
        for dom in &domains {
            if let Ok(Some((name, life))) = self.lifecycle(dom) {
                current.insert(name, life);
            }
        }
        for (name, life) in &current {
            if published.get(name) != Some(life) {
                let status = self.status_from(name.clone(), life.clone());
                let _ = self.changes.send(StatusChange::Changed(status));
            }
        }
        for name in published.keys() {
            if !current.contains_key(name) {
                let _ = self.changes.send(StatusChange::Removed(name.clone()));
            }
        }
        let active = current.values().filter(|l| l.state.is_active()).count();
        self.active.store(active as u32, Ordering::Relaxed);
        // What was learnt about domains that are gone (removed outside Dunes too) goes.
        lock(&self.templates).retain(|uuid, _| current.values().any(|l| &l.uuid == uuid));
        lock(&self.vm_locks)
            .retain(|name, l| current.contains_key(name) || Arc::strong_count(l) > 1);
        *published = current;
    }

    fn lifecycle(&self, dom: &Domain) -> Result<Option<(VmName, Lifecycle)>, RuntimeError> {
        let raw_name = dom.name().map_err(lv("reading a domain name"))?;
        let Ok(name) = VmName::new(raw_name) else {
            // Domains Dunes did not create may have names it cannot manage; leave them be.
            return Ok(None);
        };
        let info = dom.info().map_err(lv("reading domain info"))?;
        let uuid = dom.uuid_string().map_err(lv("reading a domain uuid"))?;
        let cached = lock(&self.templates).get(&uuid).cloned();
        let (template, nics) = match cached {
            Some(t) => t,
            None => {
                let learned = dom
                    .xml_desc(0)
                    .map(|xml| definition::learned_from(&xml))
                    .unwrap_or_default();
                lock(&self.templates).insert(uuid.clone(), learned.clone());
                learned
            }
        };
        let state = map_state(info.state.known());
        let (vcpus, memory_mib) = (info.nr_virt_cpu, info.max_mem / 1024);
        let record = lock(&self.records).get(&name).copied();
        let next_start = record
            .map(|r| r.resources)
            .filter(|r| state.is_active() && (r.vcpus != vcpus || r.memory_mib != memory_mib));
        let addresses = if state.is_active() {
            lock(&self.addresses).get(&name).cloned()
        } else {
            None
        };
        Ok(Some((
            name,
            Lifecycle {
                uuid,
                state,
                vcpus,
                memory_mib,
                template,
                nics,
                autostart: record.map(|r| r.autostart),
                installer: record.is_some_and(|r| r.installer),
                screen: self.domain_type == DomainType::Qemu && record.is_some_and(|r| r.screen),
                next_start,
                addresses,
                snapshots: dom.num_snapshots(0).ok(),
            },
        )))
    }

    fn status_from(&self, name: VmName, life: Lifecycle) -> VmStatus {
        let overlay_on = match (&life.template, self.storage.vm_disk(&name)) {
            (Some(template), Some(disk)) if disk.format == DiskFormat::Qcow2 => {
                self.storage.template_disk(template).ok()
            }
            _ => None,
        };
        let disks = self.storage.vm_disk_infos(&name, life.template.as_ref());
        VmStatus {
            overlay_on,
            disk_bytes: disks.iter().map(|d| d.allocated_bytes).sum(),
            disks: Some(disks),
            nics: Some(life.nics),
            autostart: life.autostart,
            next_start: life.next_start,
            addresses: life.addresses,
            snapshots: life.snapshots,
            installer: life.installer.then(|| life.template.clone()).flatten(),
            screen: life.screen,
            uuid: life.uuid,
            name,
            state: life.state,
            vcpus: life.vcpus,
            memory_mib: life.memory_mib,
            template: life.template,
            runtime: RuntimeKind::Libvirt,
        }
    }

    fn list(&self) -> Result<Vec<VmStatus>, RuntimeError> {
        let domains = self
            .conn
            .list_all_domains(0)
            .map_err(lv("listing domains"))?;
        let mut out = Vec::with_capacity(domains.len());
        for dom in &domains {
            if let Some((name, life)) = self.lifecycle(dom)? {
                out.push(self.status_from(name, life));
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Counters of every running domain: CPU time and memory from its info, bytes from its
    /// disks' and interfaces' statistics (a device that cannot say counts nothing).
    fn sample(&self) -> Result<Vec<WorkloadSample>, RuntimeError> {
        let domains = self
            .conn
            .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            .map_err(lv("listing domains"))?;
        let mut out = Vec::with_capacity(domains.len());
        let mut seen = Vec::with_capacity(domains.len());
        let mut user_network_vms = Vec::new();
        for dom in &domains {
            let (Ok(raw_name), Ok(info), Ok(uuid)) = (dom.name(), dom.info(), dom.uuid_string())
            else {
                continue;
            };
            let Ok(name) = VmName::new(raw_name) else {
                continue;
            };
            let cached = lock(&self.devices).get(&uuid).cloned();
            let devices = match cached {
                Some(d) => d,
                None => {
                    let parsed = dom
                        .xml_desc(0)
                        .ok()
                        .and_then(|xml| definition::DomainXml::parse(&xml).ok())
                        .map(|x| CountedDevices {
                            disks: x.disks.into_iter().map(|d| d.1).collect(),
                            interfaces: x.interfaces,
                            user_network: x.user_network,
                        })
                        .unwrap_or_default();
                    let parsed = Arc::new(parsed);
                    lock(&self.devices).insert(uuid.clone(), parsed.clone());
                    parsed
                }
            };
            seen.push(uuid);
            if devices.user_network && devices.interfaces.is_empty() {
                user_network_vms.push(name.clone());
            }
            let mut counters = Counters {
                cpu_ns: info.cpu_time,
                cpus: info.nr_virt_cpu,
                memory_used_mib: info.memory / 1024,
                memory_total_mib: info.max_mem / 1024,
                ..Counters::default()
            };
            let count = |v: i64| u64::try_from(v).unwrap_or(0);
            for disk in &devices.disks {
                if let Ok(b) = dom.block_stats(disk) {
                    counters.disk_read_bytes += count(b.rd_bytes);
                    counters.disk_write_bytes += count(b.wr_bytes);
                }
            }
            for interface in &devices.interfaces {
                if let Ok(n) = dom.interface_stats(interface) {
                    counters.net_rx_bytes += count(n.rx_bytes);
                    counters.net_tx_bytes += count(n.tx_bytes);
                }
            }
            out.push(WorkloadSample { name, counters });
        }
        // Devices of a domain that stopped may change before it runs again.
        lock(&self.devices).retain(|uuid, _| seen.contains(uuid));
        *lock(&self.user_network_vms) = user_network_vms;
        Ok(out)
    }

    fn lookup(&self, name: &VmName) -> Result<Domain, RuntimeError> {
        self.conn
            .lookup_domain_by_name(name.as_str())
            .map_err(|_| RuntimeError::NotFound(name.clone()))
    }

    fn status_of(&self, name: &VmName) -> Result<VmStatus, RuntimeError> {
        let dom = self.lookup(name)?;
        let (name, life) = self
            .lifecycle(&dom)?
            .ok_or_else(|| RuntimeError::NotFound(name.clone()))?;
        Ok(self.status_from(name, life))
    }

    fn state_of(&self, name: &VmName) -> Result<VmState, RuntimeError> {
        let dom = self.lookup(name)?;
        let info = dom.info().map_err(lv("reading domain info"))?;
        Ok(map_state(info.state.known()))
    }

    /// What a create needs before its disk is copied: a free name and a bootable template.
    fn check_create(&self, spec: &VmSpec) -> Result<Template, RuntimeError> {
        if self.conn.lookup_domain_by_name(spec.name.as_str()).is_ok() {
            return Err(RuntimeError::AlreadyExists(spec.name.clone()));
        }
        let template = self.storage.template(&spec.template)?;
        if template.placeholder && self.domain_type != DomainType::Test {
            return Err(RuntimeError::NoGuest(spec.template.clone()));
        }
        Ok(template)
    }

    /// Defines a VM another agent exported, over disks that arrived already; a failure keeps
    /// the disks (the migration decides what becomes of them).
    fn import(&self, def: &VmDefinition) -> Result<VmStatus, RuntimeError> {
        if self.conn.lookup_domain_by_name(def.name.as_str()).is_ok() {
            return Err(RuntimeError::AlreadyExists(def.name.clone()));
        }
        for disk in &def.disks {
            if !self.storage.disk_file(&disk.file).exists() {
                return Err(RuntimeError::Storage(
                    crate::storage::StorageError::MissingDisk(disk.file.clone()),
                ));
            }
        }
        self.define_with(def, false, false)
    }

    /// Keeps the record, then defines (and maybe starts) a VM whose disk is in place; undoes
    /// both, and removes the disk, when the definition fails.
    fn define(&self, def: &VmDefinition, start: bool) -> Result<VmStatus, RuntimeError> {
        self.define_with(def, start, true)
    }

    fn define_with(
        &self,
        def: &VmDefinition,
        start: bool,
        remove_disk_on_failure: bool,
    ) -> Result<VmStatus, RuntimeError> {
        let undo = |storage: &Storage| {
            lock(&self.records).remove(&def.name);
            let _ = storage.delete_definition(&def.name);
            if remove_disk_on_failure {
                let _ = storage.delete_disk(&def.name);
            }
        };
        let xml = match def.domain_xml(self.domain_type, &self.storage) {
            Ok(xml) => xml,
            Err(e) => {
                undo(&self.storage);
                return Err(e.into());
            }
        };
        // The seed is made again wherever the VM is defined: the same bytes from its record.
        if let Some(ci) = &def.cloud_init {
            let written =
                crate::cidata::build_seed(&ci.seed(&def.uuid, def.devices.mac.as_deref()))
                    .map_err(|e| RuntimeError::Invalid(e.to_string()))
                    .and_then(|bytes| Ok(self.storage.write_seed(&def.name, &bytes)?));
            if let Err(e) = written {
                undo(&self.storage);
                return Err(e);
            }
        }
        let saved = def
            .to_toml()
            .map_err(RuntimeError::from)
            .and_then(|record| Ok(self.storage.save_definition(&def.name, &record)?));
        if let Err(e) = saved {
            undo(&self.storage);
            return Err(e);
        }
        lock(&self.records).insert(def.name.clone(), RecordFacts::of(def));
        let dom = match self.conn.define_domain_xml(&xml) {
            Ok(d) => d,
            Err(e) => {
                undo(&self.storage);
                return Err(lv("defining the domain")(e));
            }
        };
        if start && let Err(e) = dom.create() {
            // A create that cannot start leaves nothing behind: the operator can fix the
            // cause and create it again.
            if let Err(gone) = dom.undefine_flags(self.undefine_flags()) {
                tracing::warn!(vm = %def.name, "the VM that could not start stays defined: {}", gone.message());
                return Err(lv("starting the VM")(e));
            }
            undo(&self.storage);
            return Err(RuntimeError::NotStarted {
                name: def.name.clone(),
                message: e.message().to_string(),
            });
        }
        self.status_of(&def.name)
    }

    fn start(&self, name: &VmName) -> Result<VmStatus, RuntimeError> {
        let dom = self.lookup(name)?;
        match self.state_of(name)? {
            VmState::Running => {}
            VmState::Paused => dom.resume().map(drop).map_err(lv("resuming the VM"))?,
            _ => dom.create().map(drop).map_err(lv("starting the VM"))?,
        };
        self.status_of(name)
    }

    /// Reboots a running VM, pauses a running one, resumes a paused one; any other state
    /// says why not and changes nothing.
    fn power(&self, name: &VmName, action: PowerAction) -> Result<VmStatus, RuntimeError> {
        let dom = self.lookup(name)?;
        let state = self.state_of(name)?;
        let wrong = |hint| RuntimeError::WrongState {
            name: name.clone(),
            state,
            hint,
        };
        match (action, state) {
            (PowerAction::Reboot, VmState::Running) => {
                dom.reboot(0).map(drop).map_err(lv("rebooting the VM"))?
            }
            (PowerAction::Reboot, _) => return Err(wrong("only a running VM reboots; start it")),
            (PowerAction::Pause, VmState::Running) => {
                dom.suspend().map(drop).map_err(lv("pausing the VM"))?
            }
            (PowerAction::Pause, _) => return Err(wrong("only a running VM pauses")),
            (PowerAction::Resume, VmState::Paused) => {
                dom.resume().map(drop).map_err(lv("resuming the VM"))?
            }
            (PowerAction::Resume, _) => return Err(wrong("only a paused VM resumes")),
        }
        self.status_of(name)
    }

    /// Asks for a guest shutdown.
    fn request_shutdown(&self, name: &VmName) -> Result<ShutdownAsked, RuntimeError> {
        let dom = self.lookup(name)?;
        if !self.state_of(name)?.is_active() {
            return Ok(ShutdownAsked::AlreadyOff);
        }
        if let Err(e) = dom.shutdown() {
            use virt::error::ErrorNumber;
            // It went off between the look and the request (the guest powered off, or an
            // earlier request took effect): what was asked for is done.
            if !self.state_of(name)?.is_active() {
                return Ok(ShutdownAsked::AlreadyOff);
            }
            // Only "there is no way to ask" (no ACPI, a driver without shutdown); any other
            // failure is reported, and the VM left as it is.
            return match e.code() {
                virt::enumutil::Enum::Known(
                    ErrorNumber::NoSupport
                    | ErrorNumber::OperationUnsupported
                    | ErrorNumber::ArgumentUnsupported,
                ) => Ok(ShutdownAsked::CannotAsk(e.message().to_string())),
                _ => Err(lv("shutting down the VM")(e)),
            };
        }
        if self.state_of(name)?.is_active() {
            Ok(ShutdownAsked::Asked)
        } else {
            Ok(ShutdownAsked::AlreadyOff)
        }
    }

    fn check_ready(
        &self,
        name: &VmName,
        probe: &ReadinessProbe,
    ) -> Result<ReadyReply, RuntimeError> {
        let state = self.state_of(name)?;
        let not_yet = || ReadyReply {
            ready: false,
            detail: format!("the VM is {state}"),
        };
        match probe.kind {
            ProbeKind::Running => Ok(if state == VmState::Running {
                ReadyReply {
                    ready: true,
                    detail: "the VM runs".into(),
                }
            } else {
                not_yet()
            }),
            ProbeKind::GuestAgent if state != VmState::Running => Ok(not_yet()),
            // A mock hypervisor has no guest to ask.
            ProbeKind::GuestAgent if self.domain_type == DomainType::Test => Ok(ReadyReply {
                ready: true,
                detail: "libvirt's test driver has no guest agent: running counts".into(),
            }),
            ProbeKind::GuestAgent => {
                let dom = self.lookup(name)?;
                Ok(
                    match dom.qemu_agent_command(
                        r#"{"execute":"guest-ping"}"#,
                        GUEST_PING_TIMEOUT_SECS,
                        0,
                    ) {
                        Ok(_) => ReadyReply {
                            ready: true,
                            detail: "the guest agent answers".into(),
                        },
                        Err(e) => ReadyReply {
                            ready: false,
                            detail: format!("the guest agent does not answer yet: {}", e.message()),
                        },
                    },
                )
            }
            ProbeKind::Tcp => Err(RuntimeError::UnsupportedCheck {
                runtime: "libvirt",
                check: "tcp",
            }),
            ProbeKind::Command => Err(RuntimeError::UnsupportedCheck {
                runtime: "libvirt",
                check: "command",
            }),
            _ => Err(RuntimeError::UnsupportedCheck {
                runtime: "libvirt",
                check: "this",
            }),
        }
    }

    /// Reads the resources and autostart of every definition record.
    fn load_records(&self) {
        let mut records = lock(&self.records);
        for (name, record) in self.storage.definitions() {
            if let Ok(def) = VmDefinition::from_toml(&record) {
                records.insert(name, RecordFacts::of(&def));
            }
        }
    }

    /// Starts the VMs whose records ask for it and that are off.
    fn autostart(&self) {
        let wanted: Vec<VmName> = lock(&self.records)
            .iter()
            .filter(|(_, r)| r.autostart)
            .map(|(name, _)| name.clone())
            .collect();
        for name in wanted {
            match self.state_of(&name) {
                Ok(state) if state.is_active() => {}
                Ok(_) => match self.start(&name) {
                    Ok(_) => tracing::info!(vm = %name, "started the VM (autostart)"),
                    Err(e) => tracing::warn!(vm = %name, "cannot autostart the VM: {e}"),
                },
                Err(e) => tracing::warn!(vm = %name, "cannot autostart the VM: {e}"),
            }
        }
    }

    /// The VM's definition record; a VM without one was defined outside Dunes.
    fn record_of(&self, name: &VmName) -> Result<VmDefinition, RuntimeError> {
        self.lookup(name)?;
        let record = self
            .storage
            .definition(name)?
            .ok_or_else(|| RuntimeError::NotOurs(name.clone()))?;
        Ok(VmDefinition::from_toml(&record)?)
    }

    /// Writes the new record, and defines the VM again when its resources change: libvirt
    /// keeps a running VM's new definition for its next start.
    /// How a VM is undefined: with its snapshots' metadata, and under QEMU its UEFI variables
    /// file (libvirt keeps one per UEFI VM, and refuses to undefine the VM without the flag;
    /// the test driver takes no such flag).
    fn undefine_flags(&self) -> u32 {
        let nvram = match self.domain_type {
            DomainType::Qemu => virt::sys::VIR_DOMAIN_UNDEFINE_NVRAM,
            DomainType::Test => 0,
        };
        virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | nvram
    }

    /// Writes `user_data` into a stopped VM's cloud-init seed, its record first (the seed is
    /// made from it wherever the VM is defined). A running VM keeps the seed it booted with.
    fn set_user_data(&self, name: &VmName, user_data: String) -> Result<(), RuntimeError> {
        if self.state_of(name)?.is_active() {
            return Ok(());
        }
        let mut def = self.record_of(name)?;
        let (uuid, mac) = (def.uuid.clone(), def.devices.mac.clone());
        let Some(ci) = def.cloud_init.as_mut() else {
            return Err(RuntimeError::Invalid(format!(
                "VM {name} has no cloud-init seed: only VMs made from a disk image have one"
            )));
        };
        if ci.user_data == user_data {
            return Ok(());
        }
        dunes_shared::cloud_init::check_user_data(&user_data)
            .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        ci.user_data = user_data;
        let seed = crate::cidata::build_seed(&ci.seed(&uuid, mac.as_deref()))
            .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        self.storage.save_definition(name, &def.to_toml()?)?;
        self.storage.write_seed(name, &seed)?;
        lock(&self.records).insert(name.clone(), RecordFacts::of(&def));
        Ok(())
    }

    /// Puts a stopped VM's NIC on a service network's bridge, with the address and MAC the
    /// console chose (and its cloud-init seed's network-config, when it has one).
    fn join_network(
        &self,
        name: &VmName,
        nic: dunes_shared::network::InstanceNic,
    ) -> Result<VmStatus, RuntimeError> {
        let state = self.state_of(name)?;
        if state.is_active() {
            return Err(RuntimeError::WrongState {
                name: name.clone(),
                state,
                hint: "stop it first",
            });
        }
        let old = self.record_of(name)?;
        let mut def = old.clone();
        def.devices.user_network = false;
        def.devices.mac = Some(nic.mac.clone());
        if let Some(ci) = def.cloud_init.as_mut() {
            ci.network_config = Some(dunes_shared::cloud_init::static_network_config(&nic));
        }
        def.devices.service_nic = Some(nic);
        if def == old {
            return self.status_of(name);
        }
        let xml = def.domain_xml(self.domain_type, &self.storage)?;
        if let Some(ci) = &def.cloud_init {
            let seed = crate::cidata::build_seed(&ci.seed(&def.uuid, def.devices.mac.as_deref()))
                .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
            self.storage.write_seed(name, &seed)?;
        }
        self.storage.save_definition(name, &def.to_toml()?)?;
        if let Err(e) = self.conn.define_domain_xml(&xml) {
            let _ = old
                .to_toml()
                .map(|r| self.storage.save_definition(name, &r));
            return Err(lv("putting the VM on its network")(e));
        }
        lock(&self.records).insert(name.clone(), RecordFacts::of(&def));
        self.status_of(name)
    }

    fn configure(&self, request: &ConfigureVm) -> Result<VmConfigured, RuntimeError> {
        let name = &request.name;
        let old = self.record_of(name)?;
        let mut def = old.clone();
        def.vcpus = request.vcpus.unwrap_or(def.vcpus);
        def.memory_mib = request.memory_mib.unwrap_or(def.memory_mib);
        def.autostart = request.autostart.unwrap_or(def.autostart);
        let resized = def.vcpus != old.vcpus || def.memory_mib != old.memory_mib;
        if request.eject_cdrom {
            if def.cdrom.is_none() {
                return Err(RuntimeError::Invalid(format!(
                    "VM {name} has no installer in its CD-ROM drive"
                )));
            }
            def.cdrom = None;
        }
        let ejected = def.cdrom != old.cdrom;
        if resized && def.devices.user_network && def.devices.mac.is_none() {
            // Defined before MACs were kept: keep the one libvirt chose.
            let uuid = self.lookup(name)?.uuid_string().unwrap_or_default();
            def.devices.mac = lock(&self.templates)
                .get(&uuid)
                .and_then(|(_, nics)| nics.iter().find_map(|n| n.mac.clone()));
        }
        let running = self.state_of(name)?.is_active();
        if ejected && running {
            // The running guest sees its drive empty now; its next start has no drive. A
            // guest (or its BIOS) that holds the tray locked lets it open a moment later:
            // QEMU then refuses the eject with "Tray ... is not open", so it is asked again.
            let dom = self.lookup(name)?;
            let mut attempt = 1;
            loop {
                match dom.update_device_flags(
                    definition::EMPTY_CDROM_XML,
                    virt::sys::VIR_DOMAIN_AFFECT_LIVE,
                ) {
                    Ok(_) => break,
                    Err(e) if attempt < EJECT_ATTEMPTS && e.message().contains("Tray") => {
                        attempt += 1;
                        std::thread::sleep(EJECT_RETRY);
                    }
                    Err(e) => return Err(lv("ejecting the CD-ROM")(e)),
                }
            }
        }
        if resized || ejected {
            let xml = def.domain_xml(self.domain_type, &self.storage)?;
            self.storage.save_definition(name, &def.to_toml()?)?;
            if let Err(e) = self.conn.define_domain_xml(&xml) {
                // The VM is as it was: so is its record.
                let _ = old
                    .to_toml()
                    .map(|r| self.storage.save_definition(name, &r));
                return Err(lv("defining the VM again")(e));
            }
        } else if def != old {
            self.storage.save_definition(name, &def.to_toml()?)?;
        }
        lock(&self.records).insert(name.clone(), RecordFacts::of(&def));
        Ok(VmConfigured {
            status: self.status_of(name)?,
            at_next_start: resized && running,
        })
    }

    /// Why the VM cannot have snapshots, if it cannot: they live inside qcow2 disks.
    fn snapshot_refusal(&self, name: &VmName) -> Result<Option<&'static str>, RuntimeError> {
        let def = match self.record_of(name) {
            Ok(def) => def,
            Err(RuntimeError::NotOurs(_)) => {
                return Ok(Some(
                    "it was not created by Dunes, and its disks are elsewhere",
                ));
            }
            Err(e) => return Err(e),
        };
        Ok(if def.disks.is_empty() {
            Some("it has no disk")
        } else if def
            .disks
            .iter()
            .any(|d| d.format != DiskFormat::Qcow2.as_str())
        {
            Some(
                "its disk is raw, and snapshots are kept inside qcow2 disks (a VM made from an overlay template has one)",
            )
        } else {
            None
        })
    }

    fn snapshot(&self, request: &SnapshotVm) -> Result<Vec<SnapshotInfo>, RuntimeError> {
        let name = &request.name;
        let dom = self.lookup(name)?;
        if let Some(reason) = self.snapshot_refusal(name)? {
            return Err(RuntimeError::NoSnapshots {
                name: name.clone(),
                reason,
            });
        }
        let snapshot = request.snapshot.clone().unwrap_or_default();
        let existing = || {
            Domain::lookup_snapshot_by_name(&dom, &snapshot, 0).map_err(|_| {
                RuntimeError::NoSnapshot {
                    vm: name.clone(),
                    snapshot: snapshot.clone(),
                }
            })
        };
        match request.action {
            SnapshotAction::List => {}
            SnapshotAction::Create => {
                if existing().is_ok() {
                    return Err(RuntimeError::SnapshotExists {
                        vm: name.clone(),
                        snapshot,
                    });
                }
                let xml = format!("<domainsnapshot><name>{snapshot}</name></domainsnapshot>");
                dom.create_snapshot_xml(&xml, 0)
                    .map_err(lv("taking the snapshot"))?;
            }
            SnapshotAction::Revert => {
                existing()?
                    .revert(0)
                    .map_err(lv("reverting to the snapshot"))?;
            }
            SnapshotAction::Delete => {
                existing()?.delete(0).map_err(lv("deleting the snapshot"))?;
            }
        }
        self.snapshot_list(name, &dom)
    }

    fn snapshot_list(
        &self,
        name: &VmName,
        dom: &Domain,
    ) -> Result<Vec<SnapshotInfo>, RuntimeError> {
        let listed = dom.list_all_snapshots(0).map_err(lv("listing snapshots"))?;
        // The memory each holds is in the disk's snapshot table; the test driver's
        // snapshots are in memory only.
        let sizes = match (self.domain_type, self.storage.vm_disk(name)) {
            (DomainType::Qemu, Some(disk)) => snapshots::image_info_json(&disk.path)
                .map(|json| snapshots::memory_state_sizes(&json))
                .unwrap_or_default(),
            _ => HashMap::new(),
        };
        let mut out: Vec<SnapshotInfo> = listed
            .iter()
            .filter_map(|snap| {
                let snapshot = snap.name().ok()?;
                let facts = snap
                    .xml_desc(0)
                    .map(|xml| snapshots::snapshot_facts(&xml))
                    .ok()?;
                Some(SnapshotInfo {
                    memory_state_bytes: sizes.get(&snapshot).copied(),
                    current: snap.is_current(0).unwrap_or(false),
                    name: snapshot,
                    created_unix_secs: facts.created_unix_secs,
                    state: facts.state,
                })
            })
            .collect();
        out.sort_by(|a, b| (a.created_unix_secs, &a.name).cmp(&(b.created_unix_secs, &b.name)));
        Ok(out)
    }

    /// The definition of a copy of a stopped VM, checked before any byte is copied: a new
    /// name, UUID and MAC, the same resources, disks named after the copy.
    fn clone_definition(
        &self,
        request: &CloneVm,
    ) -> Result<(VmDefinition, Vec<(String, String)>), RuntimeError> {
        let source = self.record_of(&request.name)?;
        let state = self.state_of(&request.name)?;
        if state != VmState::Shutoff {
            return Err(RuntimeError::WrongState {
                name: request.name.clone(),
                state,
                hint: "stop it first: a clone copies its disks as they are at rest",
            });
        }
        if self
            .conn
            .lookup_domain_by_name(request.new_name.as_str())
            .is_ok()
        {
            return Err(RuntimeError::AlreadyExists(request.new_name.clone()));
        }
        let mut def = source;
        let mut copies = Vec::new();
        def.name = request.new_name.clone();
        def.uuid = uuid::Uuid::new_v4().to_string();
        def.autostart = false;
        // A copy is no instance: it leaves its original's place on a service network to
        // it, and has the user-mode network instead.
        if def.devices.service_nic.take().is_some() {
            def.devices.user_network = true;
        }
        if def.devices.user_network {
            def.devices.mac = Some(definition::random_mac());
        }
        for disk in &mut def.disks {
            let format = if disk.format == DiskFormat::Qcow2.as_str() {
                DiskFormat::Qcow2
            } else {
                DiskFormat::Raw
            };
            let copy = Storage::disk_file_name(&request.new_name, format);
            if self.storage.disk_file(&copy).exists() {
                return Err(RuntimeError::Storage(
                    crate::storage::StorageError::DiskExists(request.new_name.clone()),
                ));
            }
            copies.push((std::mem::replace(&mut disk.file, copy.clone()), copy));
        }
        Ok((def, copies))
    }

    fn force_off(&self, name: &VmName) -> Result<VmStatus, RuntimeError> {
        let dom = self.lookup(name)?;
        if self.state_of(name)?.is_active() {
            dom.destroy().map_err(lv("forcing the VM off"))?;
        }
        self.status_of(name)
    }

    fn delete(&self, name: &VmName) -> Result<(), RuntimeError> {
        let dom = self.lookup(name)?;
        let state = self.state_of(name)?;
        if state.is_active() {
            return Err(RuntimeError::WrongState {
                name: name.clone(),
                state,
                hint: "stop it first",
            });
        }
        let uuid = dom.uuid_string().unwrap_or_default();
        // The record goes first: were it left behind, the next start of the agent would
        // define the deleted VM again on the test driver.
        let record = self.storage.definition(name)?;
        self.storage.delete_definition(name)?;
        // Internal snapshots live in the disk, which goes too; libvirt keeps only their
        // metadata, and refuses to undefine a VM that has any (or UEFI variables) unless told.
        if let Err(e) = dom.undefine_flags(self.undefine_flags()) {
            // Keep the VM whole: put its record back.
            if let Some(record) = record
                && let Err(lost) = self.storage.save_definition(name, &record)
            {
                tracing::warn!(vm = %name, "the VM's definition record is gone ({lost})");
            }
            return Err(lv("undefining the VM")(e));
        }
        lock(&self.templates).remove(&uuid);
        lock(&self.records).remove(name);
        // The VM is gone now; a disk that would not go is reported, not a failed delete.
        if let Err(e) = self.storage.delete_disk(name) {
            tracing::warn!(vm = %name, "the deleted VM's disk stays: {e}");
        }
        let _ = std::fs::remove_file(self.storage.console_log_path(name));
        Ok(())
    }

    /// The first release kept each VM's domain XML in `storage/domains`; each becomes a
    /// definition record once, and the XML file goes.
    fn upgrade_legacy_definitions(&self) {
        for (name, path, xml) in self.storage.legacy_definitions() {
            // libvirt's own copy has the UUID it chose; the saved XML had none.
            let xml = self
                .conn
                .lookup_domain_by_name(name.as_str())
                .and_then(|d| d.xml_desc(0))
                .unwrap_or(xml);
            let converted = definition::DomainXml::parse(&xml).and_then(|mut doc| {
                // Defined by the first release and forgotten since: it gets a UUID now.
                doc.uuid
                    .get_or_insert_with(|| uuid::Uuid::new_v4().to_string());
                VmDefinition::from_parsed(doc, &self.storage)
            });
            match converted
                .map_err(RuntimeError::from)
                .and_then(|def| Ok(self.storage.save_definition(&name, &def.to_toml()?)?))
            {
                Ok(()) => {
                    let _ = std::fs::remove_file(&path);
                    tracing::info!(vm = %name, "kept the VM's definition as a record");
                }
                Err(e) => {
                    tracing::warn!(vm = %name, "cannot read the saved definition {}: {e}", path.display())
                }
            }
        }
    }

    /// Defines again the VMs this agent created, which the test driver forgets whenever the
    /// agent stops. QEMU keeps its definitions: a VM missing there was removed on purpose
    /// (with virsh, say) and is not brought back.
    fn restore_definitions(&self) {
        if self.domain_type != DomainType::Test {
            return;
        }
        for (name, record) in self.storage.definitions() {
            if self.conn.lookup_domain_by_name(name.as_str()).is_ok() {
                continue;
            }
            let defined = VmDefinition::from_toml(&record)
                .and_then(|def| def.domain_xml(self.domain_type, &self.storage))
                .map_err(RuntimeError::from)
                .and_then(|xml| {
                    self.conn
                        .define_domain_xml(&xml)
                        .map_err(lv("defining the domain"))
                });
            match defined {
                Ok(_) => tracing::info!(vm = %name, "restored the VM's definition"),
                Err(e) => tracing::warn!(vm = %name, "cannot restore the VM's definition: {e}"),
            }
        }
    }
}

fn map_state(state: Option<DomainState>) -> VmState {
    match state {
        Some(DomainState::Running) => VmState::Running,
        Some(DomainState::Shutoff) => VmState::Shutoff,
        Some(DomainState::Paused) => VmState::Paused,
        Some(DomainState::Shutdown) => VmState::ShuttingDown,
        Some(DomainState::Crashed) => VmState::Crashed,
        Some(DomainState::PMSuspended) => VmState::Suspended,
        Some(DomainState::Blocked) => VmState::Blocked,
        _ => VmState::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn ovmf_is_found_by_its_firmware_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!ovmf_installed(&dir.path().join("missing")));
        std::fs::write(dir.path().join("50-seabios.json"), "{}").unwrap();
        assert!(!ovmf_installed(dir.path()));
        std::fs::write(dir.path().join("60-edk2-x86_64.json"), "{}").unwrap();
        assert!(ovmf_installed(dir.path()));
    }

    #[test]
    fn qemu_pid_files_are_found_where_the_driver_keeps_them() {
        assert_eq!(
            qemu_pid_dir("qemu:///embed?root=/var/lib/dunes/qemu"),
            Some("/var/lib/dunes/qemu/run/qemu".into())
        );
        assert_eq!(
            qemu_pid_dir("qemu:///system"),
            Some("/run/libvirt/qemu".into())
        );
        assert_eq!(qemu_pid_dir("test:///default"), None);
        assert_eq!(qemu_pid_dir("qemu+ssh://elsewhere/system"), None);
    }

    #[test]
    fn a_pid_counts_only_when_its_process_is_the_vms_qemu() {
        let qemu = b"/usr/bin/qemu-system-x86_64\0-name\0guest=web-1,debug-threads=on\0-S\0";
        assert!(is_qemu_of(qemu, "web-1"));
        assert!(!is_qemu_of(qemu, "web"));
        assert!(!is_qemu_of(qemu, "web-10"));
        assert!(is_qemu_of(b"qemu\0-name\0web-1\0", "web-1"));
        // A reused pid: some other program, or one whose arguments merely mention the name.
        assert!(!is_qemu_of(b"/usr/sbin/sshd\0-D\0", "web-1"));
        assert!(!is_qemu_of(b"grep\0guest=web-1\0", "web-1"));
        assert!(!is_qemu_of(b"qemu\0-name\0", "web-1"));
        assert!(!is_qemu_of(b"", "web-1"));
    }

    fn spec(name: &str) -> VmSpec {
        VmSpec {
            name: VmName::new(name).unwrap(),
            template: TemplateName::new("tiny").unwrap(),
            vcpus: Some(1),
            memory_mib: Some(64),
        }
    }

    fn runtime(dir: &std::path::Path) -> LibvirtRuntime {
        let storage = Storage::open(dir).unwrap();
        storage.ensure_tiny_template(None).unwrap();
        // A private copy of the test driver's default host per open.
        let node = dir.join("node.xml");
        std::fs::write(
            &node,
            "<node><cpu><mode>host</mode></cpu><memory>1048576</memory></node>",
        )
        .unwrap();
        LibvirtRuntime::start(&format!("test://{}", node.display()), storage).unwrap()
    }

    /// A call that takes its time (a QEMU define, say) holds back neither another VM's calls
    /// nor the poller.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_call_for_one_vm_holds_back_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(dir.path());
        rt.create(spec("slow"), false).await.unwrap();
        let mut changes = rt.changes();
        let slow = {
            let rt = rt.clone();
            tokio::spawn(async move {
                let _vm = rt.lock_vm(&VmName::new("slow").unwrap()).await;
                rt.call(|_| {
                    std::thread::sleep(Duration::from_secs(3));
                    Ok(())
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let began = Instant::now();
        let other = VmName::new("other").unwrap();
        rt.create(spec("other"), true).await.unwrap();
        rt.stop(other.clone(), true, 1).await.unwrap();
        // The poller saw "other" appear while the slow call still runs.
        let seen = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                if let Ok(StatusChange::Changed(vm)) = changes.recv().await
                    && vm.name == other
                {
                    return;
                }
            }
        })
        .await;
        assert!(seen.is_ok(), "no status change while the slow call ran");
        rt.delete(other).await.unwrap();
        assert!(
            began.elapsed() < Duration::from_secs(2),
            "the other VM's calls waited {:?}",
            began.elapsed()
        );
        assert!(!slow.is_finished(), "the slow call is still running");
        slow.await.unwrap().unwrap();
        // Calls for the same VM are ordered: this start waited for the slow call.
        rt.start(VmName::new("slow").unwrap()).await.unwrap();
    }

    /// Disk usage changes all the time; it is no reason to publish a change.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn disk_usage_alone_publishes_no_change() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(dir.path());
        let name = VmName::new("busy").unwrap();
        rt.create(spec("busy"), true).await.unwrap();
        // Let the poller publish the new VM, then listen.
        tokio::time::sleep(POLL_INTERVAL * 3).await;
        let mut changes = rt.changes();
        let disk = rt.inner.storage.vm_disk(&name).unwrap().path;
        let before = rt.inner.storage.disk_allocated_bytes(&name);
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
            f.seek(SeekFrom::Start(1 << 20)).unwrap();
            f.write_all(&[7u8; 256 * 1024]).unwrap();
            f.sync_all().unwrap();
        }
        assert!(rt.inner.storage.disk_allocated_bytes(&name) > before);
        tokio::time::sleep(POLL_INTERVAL * 4).await;
        assert!(
            matches!(
                changes.try_recv(),
                Err(broadcast::error::TryRecvError::Empty)
            ),
            "a change was published for disk usage alone"
        );
        // A real change still is, with the current usage.
        rt.stop(name.clone(), true, 1).await.unwrap();
        let changed = tokio::time::timeout(Duration::from_secs(2), changes.recv())
            .await
            .unwrap()
            .unwrap();
        match changed {
            StatusChange::Changed(vm) => {
                assert_eq!(vm.state, VmState::Shutoff);
                assert!(vm.disk_bytes > before);
            }
            other => panic!("{other:?}"),
        }
        rt.delete(name).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readiness_follows_the_vm_and_says_what_it_cannot_check() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(dir.path());
        let name = VmName::new("ready").unwrap();
        rt.create(spec("ready"), false).await.unwrap();
        let probe = |kind| ReadinessProbe {
            kind,
            port: Some(80),
            command: None,
        };
        let off = rt
            .check_ready(name.clone(), probe(ProbeKind::GuestAgent))
            .await
            .unwrap();
        assert!(!off.ready && off.detail == "the VM is shutoff", "{off:?}");
        rt.start(name.clone()).await.unwrap();
        for kind in [ProbeKind::Running, ProbeKind::GuestAgent] {
            assert!(
                rt.check_ready(name.clone(), probe(kind))
                    .await
                    .unwrap()
                    .ready
            );
        }
        let err = rt
            .check_ready(name.clone(), probe(ProbeKind::Tcp))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the libvirt runtime cannot check tcp readiness"
        );
        rt.stop(name.clone(), true, 1).await.unwrap();
        rt.delete(name).await.unwrap();
    }
}
