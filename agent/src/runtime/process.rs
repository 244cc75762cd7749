//! The process runtime: the seed's non-VM execution layer. An application instance is a
//! supervised process with its own working directory under `DATA_DIR/processes/NAME`, its
//! stdout and stderr kept in rotated logs, and restarted with backoff when it exits on its own.
//!
//! A process template is a directory `storage/images/NAME` with a `process.toml` (the command
//! and default sizes) and the files the command needs, copied into each instance's working
//! directory. Not done yet: running each instance as a user of its own, and CPU and memory
//! limits through cgroup v2 (the inventory says limits are not applied).

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
    },
    protocol::{ProbeKind, ReadinessProbe, ReadyReply},
};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    sync::{broadcast, watch},
};

use super::{Capabilities, Runtime, RuntimeError, RuntimeFuture, StatusChange};
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
pub fn find_interpreters() -> Vec<InterpreterInfo> {
    let mut found = Vec::new();
    for (name, arg) in [("python3", "--version"), ("node", "--version")] {
        let Ok(out) = std::process::Command::new(name)
            .arg(arg)
            .stdin(Stdio::null())
            .output()
        else {
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
        let runtime = ProcessRuntime {
            inner: Arc::new(Inner {
                root,
                templates,
                instances: Mutex::new(instances),
                changes: broadcast::channel(CHANGES_QUEUE).0,
                active: AtomicU32::new(0),
                interpreters: find_interpreters(),
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
        };
        {
            let mut instances = lock(&self.inner.instances);
            if instances.contains_key(&spec.name) {
                return Err(RuntimeError::AlreadyExists(spec.name.clone()));
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

    fn delete_process(&self, name: &VmName) -> Result<(), RuntimeError> {
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
            return reply(false, format!("the process is {}", status.state));
        }
        match probe.kind {
            ProbeKind::Running => reply(true, "the process runs".into()),
            ProbeKind::Tcp => {
                let port = probe.port.unwrap_or(0);
                let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
                match tokio::time::timeout(Duration::from_secs(1), connect).await {
                    Ok(Ok(_)) => reply(true, format!("port {port} accepts connections")),
                    Ok(Err(e)) => reply(false, format!("port {port}: {e}")),
                    Err(_) => reply(false, format!("port {port} does not answer")),
                }
            }
            ProbeKind::Command => {
                let command = probe.command.unwrap_or_default();
                let run = tokio::process::Command::new("/bin/sh")
                    .arg("-c")
                    .arg(&command)
                    .current_dir(self.dir(&name).join("work"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .kill_on_drop(true)
                    .status();
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
        let Some(command) = lock(&rt.inner.instances)
            .get(&name)
            .map(|i| i.def.command.clone())
            .filter(|c| !c.is_empty())
        else {
            tracing::warn!(process = %name, "has no command to run");
            break;
        };
        let spawned = tokio::process::Command::new(&command[0])
            .args(&command[1..])
            .current_dir(dir.join("work"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
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
                        break;
                    }
                    tracing::warn!(process = %name, "did not stop in {:?}, killing it", request.timeout);
                }
                let _ = child.kill().await;
                break;
            }
            Some(status) => {
                let how = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                tracing::warn!(process = %name, "exited on its own ({how}); restarting in {backoff:?}");
                rt.set_state(&name, VmState::Crashed);
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
    if let Some(i) = lock(&rt.inner.instances).get_mut(&name) {
        i.stop = None;
    }
    rt.set_state(&name, VmState::Shutoff);
}

impl Runtime for ProcessRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Process
    }

    fn info(&self) -> RuntimeInfo {
        RuntimeInfo {
            kind: RuntimeKind::Process,
            driver: "supervised processes (no CPU or memory limits yet)".into(),
            version: env!("CARGO_PKG_VERSION").into(),
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

    fn stop(&self, name: VmName, force: bool, timeout_secs: u32) -> RuntimeFuture<'_, VmStatus> {
        Box::pin(self.stop_process(name, force, timeout_secs))
    }

    fn delete(&self, name: VmName) -> RuntimeFuture<'_, ()> {
        Box::pin(async move { self.delete_process(&name) })
    }

    fn check_ready(&self, name: VmName, probe: ReadinessProbe) -> RuntimeFuture<'_, ReadyReply> {
        Box::pin(self.ready(name, probe))
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_reports_job_becomes_ready_by_its_command_and_comes_back_after_a_restart() {
        if find_interpreters().iter().all(|i| i.name != "python3") {
            panic!("python3 is needed for the built-in reports template");
        }
        let dir = tempfile::tempdir().unwrap();
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
