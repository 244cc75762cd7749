//! The libvirt runtime. libvirt calls block, so one dedicated thread owns the connection and
//! runs jobs sent to it; between jobs it polls domain states and publishes every change.

use std::{collections::HashMap, sync::mpsc, time::Duration};

use dunes_shared::{
    model::{RuntimeInfo, RuntimeKind, SpecError, TemplateName, VmName, VmSpec, VmState, VmStatus},
    protocol::AgentEvent,
};
use tokio::sync::{broadcast, oneshot};
use virt::{
    connect::Connect,
    domain::{Domain, DomainState},
};

use crate::storage::{Storage, StorageError, Template};

/// How often domain states are compared with what was last published.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

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
    #[error(
        "template {0} has nothing to boot on this host: build the tiny guest with assets/guest/build-tiny-guest.sh DIR and restart the agent with --guest-dir DIR"
    )]
    NoGuest(TemplateName),
    #[error("the libvirt worker stopped")]
    WorkerGone,
}

fn lv(action: &'static str) -> impl FnOnce(virt::error::Error) -> RuntimeError {
    move |e| RuntimeError::Libvirt {
        action,
        message: e.message().to_string(),
    }
}

/// What `qemu:///embed` needs in its root to run as root without a system daemon's setup.
const EMBED_QEMU_CONF: &str = "# Written by dunes-agent for the embedded QEMU driver.
user = \"root\"
group = \"root\"
security_driver = \"none\"
cgroup_controllers = [ ]
stdio_handler = \"file\"
dynamic_ownership = 0
remember_owner = 0
";

/// Resolves `.` and `..` without touching the file system, so a path can be checked before
/// anything is created there.
fn normalize_lexically(path: &std::path::Path) -> std::path::PathBuf {
    let mut out = std::path::PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// The embed root travels inside a URI: characters with a meaning there would change it.
fn uri_safe(root: &std::path::Path) -> Result<(), RuntimeError> {
    let shown = root.display().to_string();
    if shown.chars().any(|c| {
        matches!(c, '?' | '&' | '#' | '%' | '\'' | '"') || c.is_whitespace() || c.is_control()
    }) {
        return Err(RuntimeError::Libvirt {
            action: "checking the embed root",
            message: format!(
                "{shown} has characters a libvirt URI cannot carry; use a plainer data dir path"
            ),
        });
    }
    Ok(())
}

/// Resolves the operator's libvirt URI against the data dir: `qemu:///embed` means an
/// embedded QEMU driver rooted at `DATA_DIR/qemu`, and an explicit embed root must lie
/// inside the data dir (the agent writes its configuration there).
pub fn resolve_uri(uri: &str, data_dir: &std::path::Path) -> Result<String, RuntimeError> {
    let root = match uri {
        "qemu:///embed" => None,
        _ => match uri.strip_prefix("qemu:///embed?root=") {
            Some(root) => Some(std::path::PathBuf::from(root)),
            None => return Ok(uri.to_string()),
        },
    };
    let resolving = |e: std::io::Error| RuntimeError::Libvirt {
        action: "resolving the data dir",
        message: e.to_string(),
    };
    // Both spellings of the data dir count: as given (perhaps through a symlink) and resolved.
    let given = normalize_lexically(&std::path::absolute(data_dir).map_err(resolving)?);
    let data_dir = data_dir.canonicalize().map_err(resolving)?;
    let absolute = match root {
        None => data_dir.join("qemu"),
        Some(root) if root.is_absolute() => normalize_lexically(&root),
        Some(root) => normalize_lexically(&data_dir.join(root)),
    };
    let inside = |path: &std::path::Path, lexical: bool| {
        if path.starts_with(&data_dir) || (lexical && path.starts_with(&given)) {
            Ok(())
        } else {
            Err(RuntimeError::Libvirt {
                action: "checking the embed root",
                message: format!(
                    "{} is outside the data dir {}",
                    path.display(),
                    data_dir.display()
                ),
            })
        }
    };
    // Checked before anything is created, and again below once symlinks are resolved.
    inside(&absolute, true)?;
    uri_safe(&absolute)?;
    std::fs::create_dir_all(absolute.join("etc")).map_err(|e| RuntimeError::Libvirt {
        action: "creating the embed root",
        message: format!("{}: {e}", absolute.display()),
    })?;
    let root = absolute.canonicalize().map_err(|e| RuntimeError::Libvirt {
        action: "resolving the embed root",
        message: e.to_string(),
    })?;
    inside(&root, false)?;
    uri_safe(&root)?;
    let conf = root.join("etc/qemu.conf");
    if !conf.exists() {
        std::fs::write(&conf, EMBED_QEMU_CONF).map_err(|e| RuntimeError::Libvirt {
            action: "writing qemu.conf",
            message: e.to_string(),
        })?;
    }
    Ok(format!("qemu:///embed?root={}", root.display()))
}

/// Facts about the hypervisor's host, read once at start.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub cpus: u32,
    pub memory_mib: u64,
    pub model: String,
    pub runtime: RuntimeInfo,
}

type Job = Box<dyn FnOnce(&mut Worker) + Send>;

/// Handle to the libvirt thread; cheap to clone.
#[derive(Clone)]
pub struct LibvirtRuntime {
    jobs: mpsc::Sender<Job>,
    pub node: NodeFacts,
    storage: Storage,
    /// VMs being created: their disks are copied off the libvirt thread, so a second create
    /// of the same name must be refused here rather than by libvirt.
    creating: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<VmName>>>,
}

/// Holds a VM name in `LibvirtRuntime::creating` until dropped.
struct CreateClaim {
    creating: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<VmName>>>,
    name: VmName,
}

impl CreateClaim {
    fn take(runtime: &LibvirtRuntime, name: &VmName) -> Result<Self, RuntimeError> {
        let mut set = runtime.creating.lock().unwrap_or_else(|p| p.into_inner());
        if !set.insert(name.clone()) {
            return Err(RuntimeError::AlreadyExists(name.clone()));
        }
        Ok(CreateClaim {
            creating: runtime.creating.clone(),
            name: name.clone(),
        })
    }
}

impl Drop for CreateClaim {
    fn drop(&mut self) {
        self.creating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

impl std::fmt::Debug for LibvirtRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtRuntime")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

fn start_event_loop() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The embedded QEMU driver and keep-alives need libvirt's event loop running.
        if virt::event::event_register_default_impl().is_ok() {
            let _ = std::thread::Builder::new()
                .name("libvirt-events".into())
                .spawn(|| while virt::event::event_run_default_impl().is_ok() {});
        }
        virt::error::clear_error_callback();
    });
}

impl LibvirtRuntime {
    /// Opens `uri` on a new thread and starts polling. Fails if libvirt cannot be opened.
    pub fn start(
        uri: &str,
        storage: Storage,
        events: broadcast::Sender<AgentEvent>,
    ) -> Result<Self, RuntimeError> {
        start_event_loop();
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let uri = uri.to_string();
        let worker_storage = storage.clone();
        std::thread::Builder::new()
            .name("libvirt".into())
            .spawn(move || {
                let worker = Worker::open(&uri, worker_storage, events);
                match worker {
                    Ok((mut worker, facts)) => {
                        let _ = ready_tx.send(Ok(facts));
                        worker.run(jobs_rx);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| RuntimeError::Libvirt {
                action: "starting the libvirt thread",
                message: e.to_string(),
            })?;
        let node = ready_rx.recv().map_err(|_| RuntimeError::WorkerGone)??;
        Ok(LibvirtRuntime {
            jobs: jobs_tx,
            node,
            storage,
            creating: Default::default(),
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Worker) -> T + Send + 'static,
    ) -> Result<T, RuntimeError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move |w: &mut Worker| {
                let _ = tx.send(job(w));
            }))
            .map_err(|_| RuntimeError::WorkerGone)?;
        rx.await.map_err(|_| RuntimeError::WorkerGone)
    }

    pub async fn list_vms(&self) -> Result<Vec<VmStatus>, RuntimeError> {
        self.run(|w| w.list()).await?
    }

    /// Creates a VM. The disk is copied on a blocking-pool thread, so a large template does not
    /// hold up the libvirt thread's state polling. Runs to the end even if the caller goes away,
    /// so no disk is left without its domain.
    pub async fn create_vm(&self, spec: VmSpec, start: bool) -> Result<VmStatus, RuntimeError> {
        spec.validate()?;
        let runtime = self.clone();
        tokio::spawn(async move {
            let _claim = CreateClaim::take(&runtime, &spec.name)?;
            let checked = spec.clone();
            let template = runtime.run(move |w| w.check_create(&checked)).await??;
            let (storage, name, source) =
                (runtime.storage.clone(), spec.name.clone(), template.clone());
            let disk = tokio::task::spawn_blocking(move || storage.create_disk(&name, &source))
                .await
                .map_err(|_| RuntimeError::WorkerGone)??;
            runtime
                .run(move |w| w.define(&spec, &template, &disk, start))
                .await?
        })
        .await
        .map_err(|_| RuntimeError::WorkerGone)?
    }

    pub async fn start_vm(&self, name: VmName) -> Result<VmStatus, RuntimeError> {
        self.run(move |w| w.start(&name)).await?
    }

    /// Asks the guest to shut down and waits up to `timeout_secs` before forcing it off.
    pub async fn stop_vm(
        &self,
        name: VmName,
        force: bool,
        timeout_secs: u32,
    ) -> Result<VmStatus, RuntimeError> {
        if !force {
            let n = name.clone();
            match self.run(move |w| w.request_shutdown(&n)).await?? {
                ShutdownAsked::AlreadyOff => {}
                ShutdownAsked::Asked => self.wait_until_off(&name, timeout_secs).await?,
                // The operator asked for the VM to stop, and waiting would change nothing.
                ShutdownAsked::CannotAsk(why) => {
                    tracing::warn!(vm = %name, "the guest cannot be asked to shut down ({why}), forcing it off");
                }
            }
        }
        self.run(move |w| w.force_off(&name)).await?
    }

    /// Waits for the guest to power off, up to `timeout_secs`.
    async fn wait_until_off(&self, name: &VmName, timeout_secs: u32) -> Result<(), RuntimeError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout_secs.into());
        loop {
            tokio::time::sleep(POLL_INTERVAL).await;
            let n = name.clone();
            if !self.run(move |w| w.state_of(&n)).await??.is_active() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(vm = %name, "guest did not shut down in {timeout_secs}s, forcing it off");
                return Ok(());
            }
        }
    }

    pub async fn delete_vm(&self, name: VmName) -> Result<(), RuntimeError> {
        self.run(move |w| w.delete(&name)).await?
    }
}

/// What came of asking a guest to shut down.
enum ShutdownAsked {
    AlreadyOff,
    Asked,
    CannotAsk(String),
}

struct Worker {
    conn: Connect,
    storage: Storage,
    domain_type: &'static str,
    events: broadcast::Sender<AgentEvent>,
    published: HashMap<VmName, VmStatus>,
    templates: HashMap<String, Option<TemplateName>>,
}

impl Worker {
    fn open(
        uri: &str,
        storage: Storage,
        events: broadcast::Sender<AgentEvent>,
    ) -> Result<(Self, NodeFacts), RuntimeError> {
        let conn = Connect::open(Some(uri)).map_err(lv("opening libvirt"))?;
        let info = conn.node_info().map_err(lv("reading node info"))?;
        let driver = conn.driver_type().unwrap_or_default();
        let version = conn
            .hyp_version()
            .map(|v| format!("{}.{}.{}", v / 1_000_000, v / 1000 % 1000, v % 1000))
            .unwrap_or_default();
        let domain_type = if uri.starts_with("test:") {
            "test"
        } else {
            "qemu"
        };
        let facts = NodeFacts {
            cpus: info.cpus,
            memory_mib: info.memory / 1024,
            model: info.model.clone(),
            runtime: RuntimeInfo {
                kind: RuntimeKind::Libvirt,
                driver,
                version,
            },
        };
        let mut worker = Worker {
            conn,
            storage,
            domain_type,
            events,
            published: HashMap::new(),
            templates: HashMap::new(),
        };
        worker.restore_definitions();
        worker.poll();
        Ok((worker, facts))
    }

    /// Defines again the VMs this agent created, which the test driver forgets whenever the
    /// agent stops. QEMU keeps its definitions: a VM missing there was removed on purpose
    /// (with virsh, say) and is not brought back.
    fn restore_definitions(&mut self) {
        if self.domain_type != "test" {
            return;
        }
        for (name, xml) in self.storage.definitions() {
            if self.conn.lookup_domain_by_name(name.as_str()).is_ok() {
                continue;
            }
            match self.conn.define_domain_xml(&xml) {
                Ok(_) => tracing::info!(vm = %name, "restored the VM's definition"),
                Err(e) => {
                    tracing::warn!(vm = %name, "cannot restore the VM's definition: {}", e.message())
                }
            }
        }
    }

    fn run(&mut self, jobs: mpsc::Receiver<Job>) {
        loop {
            match jobs.recv_timeout(POLL_INTERVAL) {
                Ok(job) => job(self),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            self.poll();
        }
    }

    /// Compares every domain with what was published last and pushes the differences.
    fn poll(&mut self) {
        let Ok(list) = self.list() else { return };
        let mut current: HashMap<VmName, VmStatus> =
            list.into_iter().map(|v| (v.name.clone(), v)).collect();
        for (name, status) in &current {
            if self.published.get(name) != Some(status) {
                let _ = self.events.send(AgentEvent::VmChanged(status.clone()));
            }
        }
        for name in self.published.keys() {
            if !current.contains_key(name) {
                let _ = self
                    .events
                    .send(AgentEvent::VmRemoved { name: name.clone() });
            }
        }
        std::mem::swap(&mut self.published, &mut current);
    }

    fn status(&mut self, dom: &Domain) -> Result<Option<VmStatus>, RuntimeError> {
        let raw_name = dom.name().map_err(lv("reading a domain name"))?;
        let Ok(name) = VmName::new(raw_name) else {
            // Domains Dunes did not create may have names it cannot manage; leave them be.
            return Ok(None);
        };
        let info = dom.info().map_err(lv("reading domain info"))?;
        let uuid = dom.uuid_string().map_err(lv("reading a domain uuid"))?;
        let template = match self.templates.get(&uuid) {
            Some(t) => t.clone(),
            None => {
                let t = dom.xml_desc(0).ok().and_then(|xml| template_from_xml(&xml));
                self.templates.insert(uuid.clone(), t.clone());
                t
            }
        };
        Ok(Some(VmStatus {
            disk_bytes: self.storage.disk_allocated_bytes(&name),
            uuid,
            name,
            state: map_state(info.state.known()),
            vcpus: info.nr_virt_cpu,
            memory_mib: info.max_mem / 1024,
            template,
        }))
    }

    fn list(&mut self) -> Result<Vec<VmStatus>, RuntimeError> {
        let domains = self
            .conn
            .list_all_domains(0)
            .map_err(lv("listing domains"))?;
        let mut out = Vec::with_capacity(domains.len());
        for dom in &domains {
            if let Some(status) = self.status(dom)? {
                out.push(status);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn lookup(&self, name: &VmName) -> Result<Domain, RuntimeError> {
        self.conn
            .lookup_domain_by_name(name.as_str())
            .map_err(|_| RuntimeError::NotFound(name.clone()))
    }

    fn status_of(&mut self, name: &VmName) -> Result<VmStatus, RuntimeError> {
        let dom = self.lookup(name)?;
        self.status(&dom)?
            .ok_or_else(|| RuntimeError::NotFound(name.clone()))
    }

    fn state_of(&mut self, name: &VmName) -> Result<VmState, RuntimeError> {
        Ok(self.status_of(name)?.state)
    }

    /// What a create needs before its disk is copied: a free name and a bootable template.
    fn check_create(&mut self, spec: &VmSpec) -> Result<Template, RuntimeError> {
        if self.conn.lookup_domain_by_name(spec.name.as_str()).is_ok() {
            return Err(RuntimeError::AlreadyExists(spec.name.clone()));
        }
        let template = self.storage.template(&spec.template)?;
        if template.placeholder && self.domain_type != "test" {
            return Err(RuntimeError::NoGuest(spec.template.clone()));
        }
        Ok(template)
    }

    /// Defines (and maybe starts) a VM whose disk is in place; removes the disk on failure.
    fn define(
        &mut self,
        spec: &VmSpec,
        template: &Template,
        disk: &std::path::Path,
        start: bool,
    ) -> Result<VmStatus, RuntimeError> {
        let xml = domain_xml(self.domain_type, spec, template, disk, &self.storage);
        let dom = match self.conn.define_domain_xml(&xml) {
            Ok(d) => d,
            Err(e) => {
                let _ = self.storage.delete_disk(&spec.name);
                return Err(lv("defining the domain")(e));
            }
        };
        if let Err(e) = self.storage.save_definition(&spec.name, &xml) {
            let _ = dom.undefine();
            let _ = self.storage.delete_disk(&spec.name);
            return Err(e.into());
        }
        if start {
            dom.create().map_err(lv("starting the VM"))?;
        }
        self.status_of(&spec.name)
    }

    fn start(&mut self, name: &VmName) -> Result<VmStatus, RuntimeError> {
        let dom = self.lookup(name)?;
        let status = self.status_of(name)?;
        match status.state {
            VmState::Running => return Ok(status),
            VmState::Paused => dom.resume().map_err(lv("resuming the VM"))?,
            _ => dom.create().map_err(lv("starting the VM"))?,
        };
        self.status_of(name)
    }

    /// Asks for a guest shutdown; returns whether the VM is already off.
    fn request_shutdown(&mut self, name: &VmName) -> Result<ShutdownAsked, RuntimeError> {
        let dom = self.lookup(name)?;
        if !self.state_of(name)?.is_active() {
            return Ok(ShutdownAsked::AlreadyOff);
        }
        if let Err(e) = dom.shutdown() {
            use virt::error::ErrorNumber;
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

    fn force_off(&mut self, name: &VmName) -> Result<VmStatus, RuntimeError> {
        let dom = self.lookup(name)?;
        if self.state_of(name)?.is_active() {
            dom.destroy().map_err(lv("forcing the VM off"))?;
        }
        self.status_of(name)
    }

    fn delete(&mut self, name: &VmName) -> Result<(), RuntimeError> {
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
        // The saved definition goes first: were it left behind, the next start of the agent
        // would define the deleted VM again.
        self.storage.delete_definition(name)?;
        if let Err(e) = dom.undefine() {
            // Keep the VM whole: without its saved definition the test driver would lose it.
            let saved = dom
                .xml_desc(0)
                .map_err(lv("reading the definition"))
                .and_then(|xml| Ok(self.storage.save_definition(name, &xml)?));
            if let Err(lost) = saved {
                tracing::warn!(vm = %name, "the VM's saved definition is gone ({lost}); the test driver forgets it at the next restart");
            }
            return Err(lv("undefining the VM")(e));
        }
        self.templates.remove(&uuid);
        self.storage.delete_disk(name)?;
        let _ = std::fs::remove_file(self.storage.console_log_path(name));
        Ok(())
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

const METADATA_NS: &str = "https://dunes.invalid/xmlns/vm/1";

fn template_from_xml(xml: &str) -> Option<TemplateName> {
    let start = xml.find("<dunes:template>")? + "<dunes:template>".len();
    let end = start + xml[start..].find("</dunes:template>")?;
    TemplateName::new(&xml[start..end]).ok()
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The domain definition. Names are validated and paths are ours, but paths are escaped
/// anyway: the data dir may hold any character.
fn domain_xml(
    domain_type: &str,
    spec: &VmSpec,
    template: &Template,
    disk: &std::path::Path,
    storage: &Storage,
) -> String {
    let vcpus = spec.vcpus.unwrap_or(template.info.default_vcpus).max(1);
    let memory_mib = spec.memory_mib.unwrap_or(template.info.default_memory_mib);
    let path = |p: &std::path::Path| xml_escape(&p.display().to_string());
    let mut os = String::from(if domain_type == "qemu" {
        "<type arch='x86_64' machine='pc'>hvm</type>"
    } else {
        "<type arch='x86_64'>hvm</type>"
    });
    if let Some(kernel) = &template.kernel {
        os.push_str(&format!("<kernel>{}</kernel>", path(kernel)));
    }
    if let Some(initrd) = &template.initrd {
        os.push_str(&format!("<initrd>{}</initrd>", path(initrd)));
    }
    if let Some(cmdline) = &template.cmdline {
        os.push_str(&format!("<cmdline>{}</cmdline>", xml_escape(cmdline)));
    }
    let mut devices = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>",
        path(disk)
    );
    let mut features = "";
    if domain_type == "qemu" {
        // ACPI lets a graceful stop press the power button; the serial console is logged to
        // a file beside the disk, and qemu-ga gets its channel.
        features = "<features><acpi/><apic/></features>";
        devices.push_str(&format!(
            "<serial type='pty'><log file='{}' append='off'/><target port='0'/></serial><console type='pty'><target type='serial' port='0'/></console>\
             <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
             <controller type='usb' model='none'/><memballoon model='none'/>",
            path(&storage.console_log_path(&spec.name)),
        ));
    }
    format!(
        "<domain type='{domain_type}'><name>{name}</name>\
         <metadata><dunes:vm xmlns:dunes='{METADATA_NS}'><dunes:template>{template}</dunes:template></dunes:vm></metadata>\
         <memory unit='MiB'>{memory_mib}</memory><vcpu>{vcpus}</vcpu><os>{os}</os>{features}\
         <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>\
         <devices>{devices}</devices></domain>",
        name = spec.name,
        template = template.info.name,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_metadata_round_trip() {
        let xml = "<domain><metadata><dunes:vm xmlns:dunes='x'><dunes:template>tiny</dunes:template></dunes:vm></metadata></domain>";
        assert_eq!(template_from_xml(xml).unwrap().as_str(), "tiny");
        assert_eq!(template_from_xml("<domain/>"), None);
        assert_eq!(
            template_from_xml("<dunes:template>../x</dunes:template>"),
            None
        );
        assert_eq!(xml_escape("a'&<b"), "a&apos;&amp;&lt;b");
    }
}

#[cfg(test)]
mod embed_tests {
    use super::*;

    #[test]
    fn embed_roots_stay_inside_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let uri = resolve_uri("qemu:///embed", &data).unwrap();
        let root = data.canonicalize().unwrap().join("qemu");
        assert_eq!(uri, format!("qemu:///embed?root={}", root.display()));
        assert!(
            std::fs::read_to_string(root.join("etc/qemu.conf"))
                .unwrap()
                .contains("security_driver = \"none\"")
        );
        assert!(
            resolve_uri("qemu:///embed?root=vm-root", &data)
                .unwrap()
                .ends_with("/data/vm-root")
        );
        let outside = dir.path().join("elsewhere");
        let err =
            resolve_uri(&format!("qemu:///embed?root={}", outside.display()), &data).unwrap_err();
        assert!(err.to_string().contains("outside the data dir"), "{err}");
        let err = resolve_uri("qemu:///embed?root=../escape", &data).unwrap_err();
        assert!(err.to_string().contains("outside the data dir"), "{err}");
        assert!(
            !outside.exists() && !dir.path().join("escape").exists(),
            "a refused root is never created"
        );
        assert_eq!(
            resolve_uri("test:///default", &data).unwrap(),
            "test:///default"
        );

        let odd = dir.path().join("with space");
        std::fs::create_dir_all(&odd).unwrap();
        let err = resolve_uri("qemu:///embed", &odd).unwrap_err();
        assert!(err.to_string().contains("cannot carry"), "{err}");
        assert!(
            !odd.join("qemu").exists(),
            "nothing is created for a refused root"
        );

        // A data dir reached through a symlink, with the default root or one named through
        // the link, is still the data dir.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&data, &link).unwrap();
        let uri = resolve_uri("qemu:///embed", &link).unwrap();
        assert_eq!(uri, format!("qemu:///embed?root={}", root.display()));
        let through_link = link.join("other-root");
        let uri = resolve_uri(
            &format!("qemu:///embed?root={}", through_link.display()),
            &link,
        )
        .unwrap();
        assert!(uri.ends_with("/data/other-root"), "{uri}");
    }
}
