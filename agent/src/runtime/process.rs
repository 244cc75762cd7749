//! The process runtime: the seed's non-VM execution layer. An application instance is a
//! supervised process with its own working directory under `DATA_DIR/processes/NAME`, its
//! stdout and stderr kept in rotated logs, and restarted with backoff when it exits on its own.
//!
//! A process template is a directory `storage/images/NAME` with a `process.toml` (the command
//! and default sizes) and the files the command needs, copied into each instance's working
//! directory.
//!
//! Where the agent runs as root, each instance runs as a user of its own: a uid from the
//! range systemd keeps for dynamic users (61184-65519), with no entry in /etc/passwd (nothing
//! outside the data dir is written), owning the instance's working directory. CPU and memory
//! limits come from [`super::cgroup`]; the inventory says how they are applied, or why not.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use dunes_shared::{
    model::{
        InterpreterInfo, RuntimeInfo, RuntimeKind, TemplateName, VmName, VmSpec, VmState, VmStatus,
        WorkloadSample,
    },
    protocol::{MetricKind, MetricProbe, ProbeKind, ReadinessProbe, ReadyReply},
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    sync::{broadcast, watch},
};

use super::{
    Capabilities, Runtime, RuntimeError, RuntimeFuture, StatusChange, cgroup::CgroupLimits,
};
use crate::storage::StorageError;

/// A log is rotated past this size; one older log is kept.
const LOG_ROTATE_BYTES: u64 = 1024 * 1024;
const RESTART_BACKOFF_MIN: Duration = Duration::from_secs(1);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A process that ran this long before it exited is restarted as a fresh start.
const STABLE_RUN: Duration = Duration::from_secs(60);
/// How long a readiness command may run.
const READY_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
const CHANGES_QUEUE: usize = 1024;
/// The uids systemd keeps for dynamic users: no account owns them.
const INSTANCE_UIDS: std::ops::RangeInclusive<u32> = 61184..=65519;
/// The search path of an instance running as its own user, which cannot read root's.
const INSTANCE_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// util-linux's `setpriv`, which every Debian has (util-linux is essential).
const SETPRIV: &str = "/usr/bin/setpriv";

fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Whether instances under `root` can get users of their own: the agent is root, can drop
/// to them, and they can walk down to their working directories (an interpreter opens its
/// script by its full path).
fn own_users_possible(root: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if !running_as_root() {
        return Err("the agent's user: own users need the agent to run as root".into());
    }
    if !Path::new(SETPRIV).exists() {
        return Err("the agent's user: /usr/bin/setpriv (util-linux) is missing".into());
    }
    let root = root
        .canonicalize()
        .map_err(|e| format!("the agent's user: {e}"))?;
    for dir in root.ancestors() {
        let mode = std::fs::metadata(dir).map_or(0, |m| m.permissions().mode());
        if mode & 0o001 == 0 {
            return Err(format!(
                "the agent's user: other users cannot walk {} (mode {:o}), so instances could not reach their files",
                dir.display(),
                mode & 0o777
            ));
        }
    }
    Ok(())
}

/// What a process template's `process.toml` says.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessTemplate {
    pub description: String,
    /// The program and its arguments, run in the instance's working directory.
    pub command: Vec<String>,
    pub default_vcpus: u32,
    pub default_memory_mib: u64,
}

/// An instance, as kept in its `instance.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ProcessDefinition {
    name: VmName,
    uuid: String,
    template: TemplateName,
    vcpus: u32,
    memory_mib: u64,
    command: Vec<String>,
    /// Whether it should run: restored at the agent's next start.
    want_running: bool,
    /// The instance's own user (and group), where the agent runs as root.
    #[serde(default)]
    uid: Option<u32>,
    /// Its place on a service network: it runs in a network namespace of its own there.
    #[serde(default)]
    network: Option<dunes_shared::network::InstanceNic>,
}

impl ProcessDefinition {
    /// The namespace it runs in, on a service network.
    fn namespace(&self) -> Option<String> {
        self.network
            .as_ref()
            .map(|_| crate::network::namespace::namespace_name(&self.uuid))
    }
}

/// What stops a supervised process.
#[derive(Debug, Clone, Copy, PartialEq)]
struct StopRequest {
    force: bool,
    timeout: Duration,
}

struct Instance {
    def: ProcessDefinition,
    state: VmState,
    restarts: u32,
    /// Set while a supervisor runs; a value asks it to stop the process.
    stop: Option<watch::Sender<Option<StopRequest>>>,
}

struct Inner {
    root: PathBuf,
    templates: PathBuf,
    instances: Mutex<BTreeMap<VmName, Instance>>,
    changes: broadcast::Sender<StatusChange>,
    active: AtomicU32,
    interpreters: Vec<InterpreterInfo>,
    limits: CgroupLimits,
    /// Whether instances get users of their own, or why not.
    own_users: Result<(), String>,
    /// Whether an instance on a service network runs in a namespace of its own there (off
    /// where the agent builds no networks).
    build_networks: std::sync::atomic::AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.limits.release();
    }
}

/// Handle to the process runtime; cheap to clone.
#[derive(Clone)]
pub struct ProcessRuntime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ProcessRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessRuntime")
            .field("root", &self.inner.root)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let path = path.display().to_string();
    move |source| {
        RuntimeError::Storage(StorageError::Io {
            action,
            path,
            source,
        })
    }
}

/// The built-in `reports` template: a small python3 job that writes a report every few
/// seconds, as the seed's e-commerce service has.
const REPORTS_PY: &str = r#"# A small reports job: writes reports/last.txt every 5 seconds.
import os, time
os.makedirs("reports", exist_ok=True)
n = 0
while True:
    n += 1
    with open("reports/last.tmp", "w") as f:
        f.write(f"report {n} at {time.time():.0f}\n")
    os.replace("reports/last.tmp", "reports/last.txt")
    print(f"report {n} written", flush=True)
    time.sleep(5)
"#;

/// Interpreters found on this machine, with their versions.
/// Where instances run as users of their own, they are found on [`INSTANCE_PATH`].
pub fn find_interpreters() -> Vec<InterpreterInfo> {
    let mut found = Vec::new();
    for (name, arg) in [("python3", "--version"), ("node", "--version")] {
        let mut command = std::process::Command::new(name);
        if running_as_root() {
            command.env("PATH", INSTANCE_PATH);
        }
        let Ok(out) = command.arg(arg).stdin(Stdio::null()).output() else {
            continue;
        };
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // "Python 3.11.2", "v20.19.2"
        let version = text
            .split_whitespace()
            .map(|w| w.trim_start_matches('v'))
            .find(|w| w.starts_with(|c: char| c.is_ascii_digit()));
        if out.status.success()
            && let Some(version) = version
        {
            found.push(InterpreterInfo {
                name: name.to_string(),
                version: version.to_string(),
            });
        }
    }
    found
}

impl ProcessRuntime {
    /// Opens the runtime under `data_dir`, installs the built-in `reports` template, and
    /// starts again the instances that ran when the agent stopped. Call it from a runtime.
    pub fn start(data_dir: &Path) -> Result<Self, RuntimeError> {
        let root = data_dir.join("processes");
        std::fs::create_dir_all(&root).map_err(io("creating", &root))?;
        let templates = data_dir.join("storage/images");
        install_reports_template(&templates)?;
        let limits = CgroupLimits::detect(data_dir);
        let mut instances = BTreeMap::new();
        for entry in std::fs::read_dir(&root)
            .map_err(io("listing", &root))?
            .flatten()
        {
            let path = entry.path().join("instance.toml");
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            match toml::from_str::<ProcessDefinition>(&text) {
                Ok(def) => {
                    end_orphan(&entry.path());
                    // What the orphan started is in its groups still.
                    if let Ok(Some(groups)) =
                        limits.instance(def.name.as_str(), def.vcpus, def.memory_mib)
                    {
                        groups.kill_all();
                    }
                    instances.insert(
                        def.name.clone(),
                        Instance {
                            def,
                            state: VmState::Shutoff,
                            restarts: 0,
                            stop: None,
                        },
                    );
                }
                Err(e) => tracing::warn!("skipping {}: {}", path.display(), e.message()),
            }
        }
        let own_users = own_users_possible(&root);
        let runtime = ProcessRuntime {
            inner: Arc::new(Inner {
                root,
                templates,
                instances: Mutex::new(instances),
                changes: broadcast::channel(CHANGES_QUEUE).0,
                active: AtomicU32::new(0),
                interpreters: find_interpreters(),
                limits,
                own_users,
                build_networks: std::sync::atomic::AtomicBool::new(true),
            }),
        };
        let wanted: Vec<VmName> = lock(&runtime.inner.instances)
            .values()
            .filter(|i| i.def.want_running)
            .map(|i| i.def.name.clone())
            .collect();
        for name in wanted {
            runtime.launch(&name);
        }
        Ok(runtime)
    }

    /// Whether instances on a service network run in a namespace of their own there.
    pub fn build_networks(&self, build: bool) {
        self.inner
            .build_networks
            .store(build, std::sync::atomic::Ordering::Relaxed);
    }

    /// The namespace instance `def` runs in, if it has one.
    fn namespace_of(&self, def: &ProcessDefinition) -> Option<String> {
        if !self
            .inner
            .build_networks
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return None;
        }
        def.namespace()
    }

    pub fn interpreters(&self) -> &[InterpreterInfo] {
        &self.inner.interpreters
    }

    fn dir(&self, name: &VmName) -> PathBuf {
        self.inner.root.join(name.as_str())
    }

    fn status_of(&self, instance: &Instance) -> VmStatus {
        VmStatus {
            uuid: instance.def.uuid.clone(),
            name: instance.def.name.clone(),
            state: instance.state,
            vcpus: instance.def.vcpus,
            memory_mib: instance.def.memory_mib,
            template: Some(instance.def.template.clone()),
            disk_bytes: 0,
            runtime: RuntimeKind::Process,
            overlay_on: None,
            disks: None,
            nics: None,
            autostart: None,
            next_start: None,
            addresses: None,
            snapshots: None,
            installer: None,
            screen: false,
        }
    }

    fn status(&self, name: &VmName) -> Result<VmStatus, RuntimeError> {
        let instances = lock(&self.inner.instances);
        let instance = instances
            .get(name)
            .ok_or_else(|| RuntimeError::NotFound(name.clone()))?;
        Ok(self.status_of(instance))
    }

    /// Records a new state and tells the subscribers.
    fn set_state(&self, name: &VmName, state: VmState) {
        let status = {
            let mut instances = lock(&self.inner.instances);
            let Some(instance) = instances.get_mut(name) else {
                return;
            };
            if instance.state == state {
                return;
            }
            instance.state = state;
            let active = instances.values().filter(|i| i.state.is_active()).count();
            self.inner.active.store(active as u32, Ordering::Relaxed);
            instances.get(name).map(|i| self.status_of(i))
        };
        if let Some(status) = status {
            let _ = self.inner.changes.send(StatusChange::Changed(status));
        }
    }

    fn save(&self, def: &ProcessDefinition) -> Result<(), RuntimeError> {
        let path = self.dir(&def.name).join("instance.toml");
        let text = toml::to_string(def).map_err(|e| RuntimeError::Libvirt {
            action: "writing the instance",
            message: e.to_string(),
        })?;
        dunes_shared::durable::write_file(&path, text.as_bytes(), 0o644)
            .map_err(io("writing", &path))
    }

    /// A uid of the dynamic range that no instance of this agent and no account has; the
    /// same name on the same agent tries the same uid first.
    fn allocate_uid(&self, name: &VmName, instances: &BTreeMap<VmName, Instance>) -> u32 {
        let mut taken: std::collections::BTreeSet<u32> =
            instances.values().filter_map(|i| i.def.uid).collect();
        if let Ok(passwd) = std::fs::read_to_string("/etc/passwd") {
            taken.extend(
                passwd
                    .lines()
                    .filter_map(|l| l.split(':').nth(2)?.parse::<u32>().ok()),
            );
        }
        let first = *INSTANCE_UIDS.start();
        let span = INSTANCE_UIDS.end() - first + 1;
        let mut hasher = Sha256::new();
        hasher.update(self.inner.root.as_os_str().as_encoded_bytes());
        hasher.update(name.as_str().as_bytes());
        let digest = hasher.finalize();
        let seed = u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]) % span;
        (0..span)
            .map(|i| first + (seed + i) % span)
            .find(|uid| !taken.contains(uid))
            .unwrap_or(first + seed)
    }

    /// Starts a supervisor for `name` unless one runs.
    fn launch(&self, name: &VmName) {
        let (tx, rx) = watch::channel(None);
        {
            let mut instances = lock(&self.inner.instances);
            let Some(instance) = instances.get_mut(name) else {
                return;
            };
            if instance.stop.is_some() {
                return;
            }
            instance.stop = Some(tx);
        }
        tokio::spawn(supervise(self.clone(), name.clone(), rx));
    }

    async fn create_process(&self, spec: VmSpec, start: bool) -> Result<VmStatus, RuntimeError> {
        spec.validate()?;
        let template_dir = self.inner.templates.join(spec.template.as_str());
        let manifest = template_dir.join("process.toml");
        let text = match std::fs::read_to_string(&manifest) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RuntimeError::Storage(StorageError::NoTemplate(
                    spec.template.clone(),
                )));
            }
            Err(e) => return Err(io("reading", &manifest)(e)),
        };
        let template: ProcessTemplate =
            toml::from_str(&text).map_err(|e| StorageError::BadTemplate {
                name: spec.template.clone(),
                message: e.message().to_string(),
            })?;
        if template.command.is_empty() {
            return Err(RuntimeError::Storage(StorageError::BadTemplate {
                name: spec.template.clone(),
                message: "its command is empty".into(),
            }));
        }
        let def = ProcessDefinition {
            name: spec.name.clone(),
            uuid: uuid::Uuid::new_v4().to_string(),
            template: spec.template.clone(),
            vcpus: spec.vcpus.unwrap_or(template.default_vcpus).max(1),
            memory_mib: spec.memory_mib.unwrap_or(template.default_memory_mib),
            command: template.command.clone(),
            want_running: start,
            uid: None,
            network: None,
        };
        let mut def = def;
        {
            let mut instances = lock(&self.inner.instances);
            if instances.contains_key(&spec.name) {
                return Err(RuntimeError::AlreadyExists(spec.name.clone()));
            }
            if self.inner.own_users.is_ok() {
                def.uid = Some(self.allocate_uid(&spec.name, &instances));
            }
            instances.insert(
                spec.name.clone(),
                Instance {
                    def: def.clone(),
                    state: VmState::Shutoff,
                    restarts: 0,
                    stop: None,
                },
            );
        }
        let dir = self.dir(&spec.name);
        let made = (|| {
            let work = dir.join("work");
            std::fs::create_dir_all(&work).map_err(io("creating", &work))?;
            copy_template_files(&template_dir, &work)?;
            if let Some(uid) = def.uid {
                give_to(&work, uid)?;
            }
            self.save(&def)
        })();
        if let Err(e) = made {
            lock(&self.inner.instances).remove(&spec.name);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let status = self.status(&spec.name)?;
        let _ = self.inner.changes.send(StatusChange::Changed(status));
        if start {
            return self.start_process(spec.name).await;
        }
        self.status(&def.name)
    }

    async fn start_process(&self, name: VmName) -> Result<VmStatus, RuntimeError> {
        let def = {
            let mut instances = lock(&self.inner.instances);
            let instance = instances
                .get_mut(&name)
                .ok_or_else(|| RuntimeError::NotFound(name.clone()))?;
            instance.def.want_running = true;
            instance.def.clone()
        };
        self.save(&def)?;
        self.launch(&name);
        // Reported running once the process is spawned.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = self.status(&name)?;
            if status.state == VmState::Running || Instant::now() > deadline {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop_process(
        &self,
        name: VmName,
        force: bool,
        timeout_secs: u32,
    ) -> Result<VmStatus, RuntimeError> {
        let (def, stop) = {
            let mut instances = lock(&self.inner.instances);
            let instance = instances
                .get_mut(&name)
                .ok_or_else(|| RuntimeError::NotFound(name.clone()))?;
            instance.def.want_running = false;
            (instance.def.clone(), instance.stop.clone())
        };
        self.save(&def)?;
        if let Some(stop) = stop {
            let _ = stop.send(Some(StopRequest {
                force,
                timeout: Duration::from_secs(timeout_secs.into()),
            }));
            // The supervisor ends by forgetting its sender.
            let deadline = Instant::now() + Duration::from_secs(u64::from(timeout_secs) + 10);
            while lock(&self.inner.instances)
                .get(&name)
                .is_some_and(|i| i.stop.is_some())
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.status(&name)
    }

    async fn delete_process(&self, name: &VmName) -> Result<(), RuntimeError> {
        {
            let instances = lock(&self.inner.instances);
            let instance = instances
                .get(name)
                .ok_or_else(|| RuntimeError::NotFound(name.clone()))?;
            if instance.stop.is_some() || instance.state.is_active() {
                return Err(RuntimeError::WrongState {
                    name: name.clone(),
                    state: instance.state,
                    hint: "stop it first",
                });
            }
        }
        let namespace = lock(&self.inner.instances)
            .get(name)
            .and_then(|i| self.namespace_of(&i.def));
        if let Some(namespace) = namespace
            && let Err(e) = crate::network::namespace::remove(&namespace).await
        {
            tracing::warn!(process = %name, "its network namespace stays: {e}");
        }
        let dir = self.dir(name);
        // The definition goes first: a crash in between leaves no instance to come back.
        let _ = std::fs::remove_file(dir.join("instance.toml"));
        std::fs::remove_dir_all(&dir).map_err(io("deleting", &dir))?;
        lock(&self.inner.instances).remove(name);
        let _ = self.inner.changes.send(StatusChange::Removed(name.clone()));
        Ok(())
    }

    async fn ready(&self, name: VmName, probe: ReadinessProbe) -> Result<ReadyReply, RuntimeError> {
        let status = self.status(&name)?;
        let reply = |ready: bool, detail: String| Ok(ReadyReply { ready, detail });
        if status.state != VmState::Running {
            // What it last said on stderr is usually why.
            let said = std::fs::read_to_string(self.dir(&name).join("stderr.log"))
                .ok()
                .and_then(|t| {
                    t.lines()
                        .rev()
                        .find(|l| !l.trim().is_empty())
                        .map(str::to_string)
                })
                .map(|l| format!(" (stderr: {})", l.chars().take(200).collect::<String>()))
                .unwrap_or_default();
            return reply(false, format!("the process is {}{said}", status.state));
        }
        match probe.kind {
            ProbeKind::Running => reply(true, "the process runs".into()),
            ProbeKind::Tcp => {
                let port = probe.port.unwrap_or(0);
                // On a service network the instance listens in its own namespace: its
                // address is reached through the network's bridge.
                let address = lock(&self.inner.instances)
                    .get(&name)
                    .filter(|i| self.namespace_of(&i.def).is_some())
                    .and_then(|i| i.def.network.as_ref().map(|n| n.address))
                    .unwrap_or(std::net::Ipv4Addr::LOCALHOST);
                let connect = tokio::net::TcpStream::connect((address, port));
                match tokio::time::timeout(Duration::from_secs(1), connect).await {
                    Ok(Ok(_)) => reply(true, format!("port {port} accepts connections")),
                    Ok(Err(e)) => reply(false, format!("port {port}: {e}")),
                    Err(_) => reply(false, format!("port {port} does not answer")),
                }
            }
            ProbeKind::Command => {
                let command = probe.command.unwrap_or_default();
                let mut shell = self.shell(&name, &command);
                let run = shell.stdout(Stdio::null()).stderr(Stdio::null()).status();
                match tokio::time::timeout(READY_COMMAND_TIMEOUT, run).await {
                    Ok(Ok(s)) if s.success() => reply(true, format!("`{command}` exits 0")),
                    Ok(Ok(s)) => reply(false, format!("`{command}` exits {s}")),
                    Ok(Err(e)) => reply(false, format!("`{command}` cannot run: {e}")),
                    Err(_) => reply(false, format!("`{command}` did not end in 10 s")),
                }
            }
            _ => Err(RuntimeError::UnsupportedCheck {
                runtime: "process",
                check: "guest-agent",
            }),
        }
    }
}

impl ProcessRuntime {
    /// A shell command run as instance `name` runs: its user, its working directory, its
    /// network namespace; its input closed, ended if dropped.
    fn shell(&self, name: &VmName, command: &str) -> tokio::process::Command {
        let (uid, namespace) = lock(&self.inner.instances)
            .get(name)
            .map_or((None, None), |i| (i.def.uid, self.namespace_of(&i.def)));
        let mut run = instance_command(
            "/bin/sh",
            uid,
            &self.dir(name).join("work"),
            namespace.as_deref(),
        );
        run.arg("-c")
            .arg(command)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        run
    }

    /// A command run as the instance runs (its user, its work dir), or the connections to a
    /// port on this host (process instances share its network).
    async fn metric(&self, name: VmName, probe: MetricProbe) -> Result<f64, RuntimeError> {
        let status = self.status(&name)?;
        if status.state != VmState::Running {
            return Err(RuntimeError::WrongState {
                name,
                state: status.state,
                hint: "its metric is read only while it runs",
            });
        }
        match (probe.kind, probe.command, probe.port) {
            (MetricKind::Tcp, _, Some(port)) => {
                // A process in a namespace of its own: the tables as it sees them.
                let proc_dir = lock(&self.inner.instances)
                    .get(&name)
                    .filter(|i| self.namespace_of(&i.def).is_some())
                    .and_then(|_| std::fs::read_to_string(self.dir(&name).join("pid")).ok())
                    .map_or("/proc".to_string(), |pid| format!("/proc/{}", pid.trim()));
                let mut text = String::new();
                for table in ["net/tcp", "net/tcp6"] {
                    let path = format!("{proc_dir}/{table}");
                    text.push_str(&tokio::fs::read_to_string(path).await.unwrap_or_default());
                }
                Ok(f64::from(super::metric::established_on(&text, port)))
            }
            (MetricKind::Command, Some(command), _) => {
                let mut shell = self.shell(&name, &command);
                let run = shell.stderr(Stdio::null()).output();
                match tokio::time::timeout(READY_COMMAND_TIMEOUT, run).await {
                    Ok(Ok(out)) if out.status.success() => {
                        super::metric::parse_number(&String::from_utf8_lossy(&out.stdout))
                            .map_err(RuntimeError::Metric)
                    }
                    Ok(Ok(out)) => Err(RuntimeError::Metric(format!(
                        "the metric command exits {}",
                        out.status
                    ))),
                    Ok(Err(e)) => Err(RuntimeError::Metric(format!(
                        "the metric command cannot run: {e}"
                    ))),
                    Err(_) => Err(RuntimeError::Metric(
                        "the metric command did not end in 10 s".into(),
                    )),
                }
            }
            _ => Err(RuntimeError::Metric(
                "this metric probe is not one this agent knows".into(),
            )),
        }
    }
}

fn install_reports_template(templates: &Path) -> Result<(), RuntimeError> {
    let dir = templates.join("reports");
    let manifest = dir.join("process.toml");
    if manifest.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
    let script = dir.join("reports.py");
    dunes_shared::durable::write_file(&script, REPORTS_PY.as_bytes(), 0o644)
        .map_err(io("writing", &script))?;
    let template = ProcessTemplate {
        description: "A small reports job (python3): writes reports/last.txt every 5 s".into(),
        command: vec!["python3".into(), "reports.py".into()],
        default_vcpus: 1,
        default_memory_mib: 128,
    };
    let text = toml::to_string(&template).map_err(|e| RuntimeError::Libvirt {
        action: "writing the reports template",
        message: e.to_string(),
    })?;
    dunes_shared::durable::write_file(&manifest, text.as_bytes(), 0o644)
        .map_err(io("writing", &manifest))
}

/// Makes `work` and what is in it the instance user's, and private to it.
fn give_to(work: &Path, uid: u32) -> Result<(), RuntimeError> {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(work)
        .map_err(io("listing", work))?
        .flatten()
    {
        let path = entry.path();
        std::os::unix::fs::chown(&path, Some(uid), Some(uid)).map_err(io("handing over", &path))?;
    }
    std::os::unix::fs::chown(work, Some(uid), Some(uid)).map_err(io("handing over", work))?;
    std::fs::set_permissions(work, std::fs::Permissions::from_mode(0o700))
        .map_err(io("handing over", work))
}

/// A command that runs as the instance's user where it has one, with an environment of its
/// own rather than the agent's.
///
/// The user is dropped by util-linux's `setpriv` after the agent, still root, has entered the
/// working directory: the instance user need not be able to walk the directories above it
/// (a data dir is private to root).
///
/// On a service network it runs in the instance's namespace, through `ip netns exec`, which
/// also puts the namespace's own resolver file in place.
fn instance_command(
    program: &str,
    uid: Option<u32>,
    work: &Path,
    namespace: Option<&str>,
) -> tokio::process::Command {
    let mut command = match namespace {
        Some(namespace) => {
            let mut command = tokio::process::Command::new("ip");
            command.args(["netns", "exec", namespace]);
            command
        }
        None => tokio::process::Command::new(if uid.is_some() { SETPRIV } else { program }),
    };
    let Some(uid) = uid else {
        if namespace.is_some() {
            command.arg(program);
        }
        command.current_dir(work);
        return command;
    };
    if namespace.is_some() {
        command.arg(SETPRIV);
    }
    let uid = uid.to_string();
    command
        .args([
            "--reuid",
            &uid,
            "--regid",
            &uid,
            "--clear-groups",
            "--no-new-privs",
            "--",
        ])
        .arg(program)
        .current_dir(work)
        .env_clear()
        .env("PATH", INSTANCE_PATH)
        .env("HOME", work)
        .env("LANG", "C.UTF-8");
    command
}

/// Copies a template's files (not its manifest) into a working directory.
fn copy_template_files(from: &Path, to: &Path) -> Result<(), RuntimeError> {
    for entry in std::fs::read_dir(from)
        .map_err(io("listing", from))?
        .flatten()
    {
        let name = entry.file_name();
        if name == "process.toml" || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let target = to.join(&name);
        std::fs::copy(entry.path(), &target).map_err(io("copying", &target))?;
    }
    Ok(())
}

/// Ends the process an agent that was killed outright left running in `dir` (its working
/// directory tells it apart from any other process with a reused pid), so that the instance
/// is not run twice.
fn end_orphan(dir: &Path) {
    let pidfile = dir.join("pid");
    let Some(pid) = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
    else {
        return;
    };
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
    let ours = dir.join("work").canonicalize().ok();
    if cwd.is_some()
        && cwd == ours
        && let Some(pid) = rustix::process::Pid::from_raw(pid)
    {
        tracing::warn!(process = %dir.display(), "ending the process the last agent left running");
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
    let _ = std::fs::remove_file(&pidfile);
}

/// Appends a child's output to `path`, rotating it past [`LOG_ROTATE_BYTES`].
async fn keep_log(mut from: impl AsyncRead + Unpin, path: PathBuf) {
    let open = |path: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(tokio::fs::File::from_std)
    };
    let Ok(mut file) = open(&path) else { return };
    let mut written = std::fs::metadata(&path).map_or(0, |m| m.len());
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if written + n as u64 > LOG_ROTATE_BYTES {
            let _ = file.flush().await;
            let mut old = path.clone().into_os_string();
            old.push(".1");
            let _ = std::fs::rename(&path, &old);
            match open(&path) {
                Ok(f) => file = f,
                Err(_) => return,
            }
            written = 0;
        }
        if file.write_all(&buf[..n]).await.is_err() {
            return;
        }
        written += n as u64;
    }
}

/// Runs one instance: spawns it, keeps its logs, restarts it with backoff when it exits on
/// its own, and stops it when asked (SIGTERM, then SIGKILL after the timeout).
async fn supervise(
    rt: ProcessRuntime,
    name: VmName,
    mut stop: watch::Receiver<Option<StopRequest>>,
) {
    let dir = rt.dir(&name);
    let mut backoff = RESTART_BACKOFF_MIN;
    loop {
        if stop.borrow().is_some() {
            break;
        }
        let Some(def) = lock(&rt.inner.instances)
            .get(&name)
            .map(|i| i.def.clone())
            .filter(|i| !i.command.is_empty())
        else {
            tracing::warn!(process = %name, "has no command to run");
            break;
        };
        let command = &def.command;
        let groups = match rt
            .inner
            .limits
            .instance(name.as_str(), def.vcpus, def.memory_mib)
        {
            Ok(groups) => groups,
            Err(e) => {
                tracing::warn!(process = %name, "runs without limits: {e}");
                None
            }
        };
        let work = dir.join("work");
        let namespace = rt.namespace_of(&def);
        if let (Some(namespace), Some(nic)) = (&namespace, &def.network)
            && let Err(e) = crate::network::namespace::ensure(namespace, nic).await
        {
            // Its network comes with the console's description of it: tried again.
            tracing::warn!(process = %name, "waits for its network: {e}");
            rt.set_state(&name, VmState::Crashed);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => {}
            }
            backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
            continue;
        }
        let mut spawn = if groups.is_some() {
            // The child waits on its stdin until the agent has put it in its groups, so
            // that nothing it runs escapes them.
            let mut wrapper = instance_command("/bin/sh", def.uid, &work, namespace.as_deref());
            wrapper
                .arg("-c")
                .arg("read -r go; exec \"$@\" </dev/null")
                .arg("dunes-start")
                .args(command)
                .stdin(Stdio::piped());
            wrapper
        } else {
            let mut direct = instance_command(&command[0], def.uid, &work, namespace.as_deref());
            direct.args(&command[1..]).stdin(Stdio::null());
            direct
        };
        let spawned = spawn
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .and_then(|mut child| {
                if let (Some(groups), Some(pid)) = (&groups, child.id()) {
                    if let Err(e) = groups.join(pid) {
                        let _ = child.start_kill();
                        return Err(std::io::Error::other(e));
                    }
                    // Its end of the pipe closes: the child goes on to its command.
                    drop(child.stdin.take());
                }
                Ok(child)
            });
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(process = %name, "cannot start {}: {e}", command[0]);
                rt.set_state(&name, VmState::Crashed);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => {}
                }
                backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
                continue;
            }
        };
        // Kept so that an agent killed outright finds the orphan at its next start.
        if let Some(pid) = child.id() {
            let _ = std::fs::write(dir.join("pid"), format!("{pid}\n"));
        }
        if let Some(out) = child.stdout.take() {
            tokio::spawn(keep_log(out, dir.join("stdout.log")));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(keep_log(err, dir.join("stderr.log")));
        }
        rt.set_state(&name, VmState::Running);
        let started = Instant::now();
        let exited = tokio::select! {
            status = child.wait() => Some(status),
            _ = stop.changed() => None,
        };
        match exited {
            None => {
                let request = (*stop.borrow()).unwrap_or(StopRequest {
                    force: true,
                    timeout: Duration::ZERO,
                });
                if !request.force
                    && let Some(pid) = child
                        .id()
                        .and_then(|p| rustix::process::Pid::from_raw(p as i32))
                {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                    if tokio::time::timeout(request.timeout, child.wait())
                        .await
                        .is_ok()
                    {
                        if let Some(groups) = &groups {
                            groups.kill_all();
                        }
                        break;
                    }
                    tracing::warn!(process = %name, "did not stop in {:?}, killing it", request.timeout);
                }
                let _ = child.kill().await;
                if let Some(groups) = &groups {
                    groups.kill_all();
                }
                break;
            }
            Some(status) => {
                let how = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                tracing::warn!(process = %name, "exited on its own ({how}); restarting in {backoff:?}");
                rt.set_state(&name, VmState::Crashed);
                if let Some(groups) = &groups {
                    groups.kill_all();
                }
                if let Some(i) = lock(&rt.inner.instances).get_mut(&name) {
                    i.restarts += 1;
                }
                if started.elapsed() >= STABLE_RUN {
                    backoff = RESTART_BACKOFF_MIN;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => {}
                }
                backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
            }
        }
    }
    // A killed process leaves its groups once it is reaped: wait a little for that.
    for _ in 0..50 {
        if rt.inner.limits.remove_instance(name.as_str()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Shut off before the sender goes: a stop waits for the sender to go, then answers
    // with the state.
    rt.set_state(&name, VmState::Shutoff);
    if let Some(i) = lock(&rt.inner.instances).get_mut(&name) {
        i.stop = None;
    }
}

impl Runtime for ProcessRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Process
    }

    fn info(&self) -> RuntimeInfo {
        RuntimeInfo {
            kind: RuntimeKind::Process,
            driver: "supervised processes".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            limits: Some(self.inner.limits.describe()),
            users: Some(match &self.inner.own_users {
                Ok(()) => "a user of its own per instance (uids 61184-65519)".into(),
                Err(why) => why.clone(),
            }),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { vms: false }
    }

    fn list(&self) -> RuntimeFuture<'_, Vec<VmStatus>> {
        Box::pin(async move {
            Ok(lock(&self.inner.instances)
                .values()
                .map(|i| self.status_of(i))
                .collect())
        })
    }

    fn create(&self, spec: VmSpec, start: bool) -> RuntimeFuture<'_, VmStatus> {
        Box::pin(self.create_process(spec, start))
    }

    fn start(&self, name: VmName) -> RuntimeFuture<'_, VmStatus> {
        Box::pin(self.start_process(name))
    }

    fn join_network(
        &self,
        name: VmName,
        nic: dunes_shared::network::InstanceNic,
    ) -> RuntimeFuture<'_, VmStatus> {
        Box::pin(async move {
            let def = {
                let mut instances = lock(&self.inner.instances);
                let instance = instances
                    .get_mut(&name)
                    .ok_or_else(|| RuntimeError::NotFound(name.clone()))?;
                if instance.state.is_active() {
                    return Err(RuntimeError::WrongState {
                        name: name.clone(),
                        state: instance.state,
                        hint: "stop it first",
                    });
                }
                instance.def.network = Some(nic);
                instance.def.clone()
            };
            self.save(&def)?;
            self.status(&name)
        })
    }

    fn stop(&self, name: VmName, force: bool, timeout_secs: u32) -> RuntimeFuture<'_, VmStatus> {
        Box::pin(self.stop_process(name, force, timeout_secs))
    }

    fn delete(&self, name: VmName) -> RuntimeFuture<'_, ()> {
        Box::pin(async move { self.delete_process(&name).await })
    }

    fn sample(&self) -> RuntimeFuture<'_, Vec<WorkloadSample>> {
        Box::pin(async move {
            let running: Vec<VmName> = lock(&self.inner.instances)
                .iter()
                .filter(|(_, i)| i.state == VmState::Running)
                .map(|(name, _)| name.clone())
                .collect();
            let base = match &self.inner.limits {
                CgroupLimits::V2 { base } => Some(base.clone()),
                _ => None,
            };
            let dirs: Vec<PathBuf> = running.iter().map(|n| self.dir(n)).collect();
            // /proc and cgroup files: read off the async workers.
            tokio::task::spawn_blocking(move || {
                running
                    .into_iter()
                    .zip(dirs)
                    .filter_map(|(name, dir)| {
                        let pid = std::fs::read_to_string(dir.join("pid"))
                            .ok()
                            .and_then(|p| p.trim().parse().ok());
                        let group = base.as_ref().map(|b| b.join(name.as_str()));
                        let counters = crate::sampling::process_counters(group.as_deref(), pid)?;
                        Some(WorkloadSample { name, counters })
                    })
                    .collect()
            })
            .await
            .map_err(|_| RuntimeError::WorkerGone)
        })
    }

    fn process_ids(&self) -> Vec<(VmName, Vec<u32>)> {
        let running: Vec<VmName> = lock(&self.inner.instances)
            .iter()
            .filter(|(_, i)| i.state == VmState::Running)
            .map(|(name, _)| name.clone())
            .collect();
        // Read at most once a round, and only if an instance has no cgroup.
        let mut children: Option<crate::traffic::ProcessChildren> = None;
        running
            .into_iter()
            .filter_map(|name| {
                // Its cgroup holds every process it started; without one, its main process
                // and that one's descendants.
                if let CgroupLimits::V2 { base } = &self.inner.limits
                    && let Ok(procs) =
                        std::fs::read_to_string(base.join(name.as_str()).join("cgroup.procs"))
                {
                    let pids: Vec<u32> = procs.lines().filter_map(|l| l.parse().ok()).collect();
                    return Some((name, pids));
                }
                let pid: u32 = std::fs::read_to_string(self.dir(&name).join("pid"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                let children = children.get_or_insert_with(crate::traffic::ProcessChildren::read);
                Some((name, children.tree(pid)))
            })
            .collect()
    }

    fn check_ready(&self, name: VmName, probe: ReadinessProbe) -> RuntimeFuture<'_, ReadyReply> {
        Box::pin(self.ready(name, probe))
    }

    fn read_metric(&self, name: VmName, probe: MetricProbe) -> RuntimeFuture<'_, f64> {
        Box::pin(self.metric(name, probe))
    }

    fn changes(&self) -> broadcast::Receiver<StatusChange> {
        self.inner.changes.subscribe()
    }

    fn active_count(&self) -> u32 {
        self.inner.active.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, template: &str) -> VmSpec {
        VmSpec {
            name: VmName::new(name).unwrap(),
            template: TemplateName::new(template).unwrap(),
            vcpus: None,
            memory_mib: None,
        }
    }

    /// A template whose process exits after a moment, to be restarted.
    fn crasher(data: &Path) {
        let dir = data.join("storage/images/crasher");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("run.sh"),
            "echo started >> starts.txt\nsleep 0.3\nexit 3\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("process.toml"),
            "description = \"exits\"\ncommand = [\"/bin/sh\", \"run.sh\"]\ndefault_vcpus = 1\ndefault_memory_mib = 16\n",
        )
        .unwrap();
    }

    async fn until(mut f: impl FnMut() -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_process_runs_is_restarted_after_a_crash_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        crasher(dir.path());
        let rt = ProcessRuntime::start(dir.path()).unwrap();
        let name = VmName::new("job").unwrap();
        let status = rt.create(spec("job", "crasher"), true).await.unwrap();
        assert_eq!(status.runtime, RuntimeKind::Process);
        let starts = dir.path().join("processes/job/work/starts.txt");
        until(
            || std::fs::read_to_string(&starts).is_ok_and(|t| t.lines().count() >= 2),
            "the process was not restarted after it exited",
        )
        .await;
        let log = std::fs::read_to_string(dir.path().join("processes/job/stdout.log"));
        assert!(log.is_ok(), "its output is kept");
        let stopped = rt.stop(name.clone(), false, 5).await.unwrap();
        assert_eq!(stopped.state, VmState::Shutoff);
        let after = std::fs::read_to_string(&starts).unwrap().lines().count();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            std::fs::read_to_string(&starts).unwrap().lines().count(),
            after,
            "a stopped process is not restarted"
        );
        rt.delete(name).await.unwrap();
        assert!(!dir.path().join("processes/job").exists());
    }

    fn proc_field(pid: &str, field: &str) -> Option<String> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_instance_runs_as_its_own_user_inside_its_limits() {
        let dir = tempfile::tempdir().unwrap();
        // Instance users walk down to their files, as under /var/lib (a temporary dir is 0700).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let images = dir.path().join("storage/images/forker");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::write(
            images.join("run.sh"),
            "sleep 300 &\necho $! > child.pid\nwait\n",
        )
        .unwrap();
        std::fs::write(
            images.join("process.toml"),
            "description = \"forks\"\ncommand = [\"/bin/sh\", \"run.sh\"]\ndefault_vcpus = 1\ndefault_memory_mib = 64\n",
        )
        .unwrap();
        let rt = ProcessRuntime::start(dir.path()).unwrap();
        let info = rt.info();
        eprintln!("limits: {:?}; users: {:?}", info.limits, info.users);
        let name = VmName::new("job").unwrap();
        let mut job = spec("job", "forker");
        job.vcpus = Some(2);
        rt.create(job, true).await.unwrap();
        let work = dir.path().join("processes/job/work");
        until(
            || std::fs::read_to_string(work.join("child.pid")).is_ok_and(|p| p.ends_with('\n')),
            "the job never forked",
        )
        .await;
        // The agent writes the pid file just after the spawn; the job may fork first.
        let pid_file = dir.path().join("processes/job/pid");
        until(
            || std::fs::read_to_string(&pid_file).is_ok_and(|p| p.ends_with('\n')),
            "the agent never wrote the job's pid",
        )
        .await;
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let pid = pid.trim().to_string();
        let child = std::fs::read_to_string(work.join("child.pid")).unwrap();
        let child = child.trim().to_string();
        let uid = lock(&rt.inner.instances).get(&name).and_then(|i| i.def.uid);
        let possible = own_users_possible(&dir.path().join("processes"));
        if possible.is_ok() {
            let uid = uid.expect("an agent running as root gives each instance a user");
            assert!(INSTANCE_UIDS.contains(&uid));
            assert_eq!(proc_field(&pid, "Uid:"), Some(uid.to_string()));
            assert_eq!(proc_field(&child, "Uid:"), Some(uid.to_string()));
            use std::os::unix::fs::MetadataExt;
            assert_eq!(std::fs::metadata(&work).unwrap().uid(), uid);
            assert_eq!(std::fs::metadata(work.join("run.sh")).unwrap().uid(), uid);
        } else {
            eprintln!("NOT CHECKED: {possible:?}");
            assert_eq!(uid, None);
        }
        match &rt.inner.limits {
            CgroupLimits::Unavailable(why) => {
                eprintln!("NOT CHECKED: no control groups to limit with here: {why}");
            }
            limits => {
                let groups = limits.instance("job", 2, 64).unwrap().unwrap();
                for group in groups.dirs() {
                    let members = std::fs::read_to_string(group.join("cgroup.procs")).unwrap();
                    let members: Vec<&str> = members.lines().collect();
                    assert!(members.contains(&pid.as_str()), "{pid} not in {group:?}");
                    assert!(
                        members.contains(&child.as_str()),
                        "{child} not in {group:?}"
                    );
                }
                let read = |file: &str| {
                    groups
                        .dirs()
                        .iter()
                        .find_map(|d| std::fs::read_to_string(d.join(file)).ok())
                        .unwrap_or_default()
                };
                if let CgroupLimits::V2 { .. } = limits {
                    assert_eq!(read("memory.max").trim(), "67108864");
                    assert_eq!(read("cpu.max").trim(), "200000 100000");
                } else {
                    assert_eq!(read("memory.limit_in_bytes").trim(), "67108864");
                    assert_eq!(read("cpu.cfs_quota_us").trim(), "200000");
                    assert_eq!(read("cpu.cfs_period_us").trim(), "100000");
                }
                rt.stop(name.clone(), false, 5).await.unwrap();
                // What the job left behind is ended with it, and its groups are gone.
                until(
                    || proc_field(&child, "State:").is_none_or(|s| s == "Z"),
                    "the job's child outlived the job",
                )
                .await;
                assert!(groups.dirs().iter().all(|d| !d.exists()));
            }
        }
        rt.stop(name.clone(), true, 1).await.unwrap();
        rt.delete(name).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_reports_job_becomes_ready_by_its_command_and_comes_back_after_a_restart() {
        if find_interpreters().iter().all(|i| i.name != "python3") {
            panic!("python3 is needed for the built-in reports template");
        }
        let dir = tempfile::tempdir().unwrap();
        // Walkable, so that the job runs as a user of its own where the test runs as root.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let rt = ProcessRuntime::start(dir.path()).unwrap();
        let name = VmName::new("reports-0").unwrap();
        rt.create(spec("reports-0", "reports"), true).await.unwrap();
        let probe = ReadinessProbe {
            kind: ProbeKind::Command,
            port: None,
            command: Some("test -s reports/last.txt".into()),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = rt.check_ready(name.clone(), probe.clone()).await.unwrap();
            if r.ready {
                break;
            }
            assert!(Instant::now() < deadline, "never ready: {}", r.detail);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if rt.inner.own_users.is_ok() {
            let pid = std::fs::read_to_string(dir.path().join("processes/reports-0/pid")).unwrap();
            let uid = proc_field(pid.trim(), "Uid:").unwrap();
            assert_ne!(uid, "0", "python3 runs as the instance's user");
        }
        let tcp = rt
            .check_ready(
                name.clone(),
                ReadinessProbe {
                    kind: ProbeKind::Tcp,
                    port: Some(1),
                    command: None,
                },
            )
            .await
            .unwrap();
        assert!(!tcp.ready, "{tcp:?}");
        // A new agent on the same data dir runs it again.
        drop(rt);
        let again = ProcessRuntime::start(dir.path()).unwrap();
        let rt2 = again.clone();
        until(
            || {
                lock(&rt2.inner.instances)
                    .get(&name)
                    .is_some_and(|i| i.state == VmState::Running)
            },
            "not restarted with the agent",
        )
        .await;
        again.stop(name.clone(), true, 1).await.unwrap();
        again.delete(name).await.unwrap();
    }
}
