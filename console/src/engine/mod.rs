//! The management engine: no egui here. It owns the fleet state, talks to agents and
//! publishes an immutable [`Snapshot`] after every change. The UI, ctl and tests drive it
//! through [`EngineHandle`].

pub mod console_pki;
pub mod enroll;
pub mod link;
pub mod snapshot;
pub mod store;

use std::{
    collections::{BTreeMap, VecDeque},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use dunes_shared::{
    error_chain,
    model::{HostId, VmName, VmSpec, VmStatus},
    pki::{self, Fingerprint},
    protocol::{AgentEvent, CreateVm, DeleteVm, StartVm, StopVm},
    rpc::{CallError, Peer},
};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};

pub use snapshot::{HostView, LinkState, Snapshot};
pub use store::{EventRecord, HostRecord, Level};

use self::{
    console_pki::{ConsolePki, ConsolePkiError},
    enroll::{Enrolled, enroll},
    link::{LinkMessage, run_link},
    store::{Store, StoreError},
};

/// Commands waiting for the engine; the UI's `try_send` fails (and says so) beyond this.
const COMMAND_QUEUE: usize = 256;
/// How long an agent gets to answer a start or a delete: long enough for a slow hypervisor,
/// short enough to tell an agent that hangs with its connection alive.
pub const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// A graceful stop waits for the guest up to the agent's stop timeout (at most 900 s).
pub const STOP_CALL_TIMEOUT: Duration = Duration::from_secs(960);
/// A create copies the template's disk: generous, but an agent that hangs is still told.
pub const CREATE_CALL_TIMEOUT: Duration = Duration::from_secs(3600);
/// Results of background work waiting for the engine; senders wait beyond this.
const INTERNAL_QUEUE: usize = 1024;
/// Agent events waiting for the engine; a full queue slows the links, then the agents.
const LINK_QUEUE: usize = 4096;
/// Events kept in memory and in every snapshot.
const EVENTS_IN_VIEW: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("host {0} is not enrolled")]
    UnknownHost(HostId),
    #[error("host {0} is unreachable")]
    Unreachable(HostId),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Agent(String),
    #[error("{0}")]
    Enroll(String),
    #[error("the change was not saved: {0}")]
    Store(String),
    #[error("the engine is busy; try again")]
    Busy,
    #[error("the engine has stopped")]
    Stopped,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineStartError {
    #[error("cannot set up the data dir {path}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] ConsolePkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot open a QUIC endpoint")]
    Endpoint(#[source] std::io::Error),
    #[error("TLS setup failed")]
    Tls(#[from] pki::PkiError),
}

pub type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

#[derive(Debug, Clone, PartialEq)]
pub struct HostAdded {
    pub host_id: HostId,
    pub fingerprint: Fingerprint,
}

#[derive(Debug)]
#[non_exhaustive]
pub enum Command {
    /// Reads the key an agent presents, without enrolling it, so the operator can compare it
    /// with what the agent printed.
    ProbeHost {
        address: String,
        reply: Reply<Fingerprint>,
    },
    AddHost {
        address: String,
        token: String,
        expected_fingerprint: Option<Fingerprint>,
        /// Take over an enrolled host's id even though the agent has another key.
        replace: bool,
        reply: Reply<HostAdded>,
    },
    SetHostAddress {
        host: HostId,
        address: String,
        reply: Reply<()>,
    },
    CreateVm {
        host: HostId,
        spec: VmSpec,
        start: bool,
        reply: Reply<VmStatus>,
    },
    StartVm {
        host: HostId,
        name: VmName,
        reply: Reply<VmStatus>,
    },
    StopVm {
        host: HostId,
        name: VmName,
        force: bool,
        reply: Reply<VmStatus>,
    },
    DeleteVm {
        host: HostId,
        name: VmName,
        reply: Reply<()>,
    },
}

type Repaint = Arc<Mutex<Option<Box<dyn Fn() + Send + Sync>>>>;

/// The way in: send commands, read snapshots.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    repaint: Repaint,
    data_dir: PathBuf,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl EngineHandle {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.clone()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Called after every publish, e.g. to repaint a window.
    pub fn set_repaint(&self, repaint: impl Fn() + Send + Sync + 'static) {
        *self.repaint.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(repaint));
    }

    /// Queues a command without waiting; for the UI thread.
    pub fn try_send(&self, command: Command) -> Result<(), EngineError> {
        self.commands.try_send(command).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => EngineError::Busy,
            mpsc::error::TrySendError::Closed(_) => EngineError::Stopped,
        })
    }

    /// Sends a command and waits for its reply.
    pub async fn request<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Waits until a snapshot satisfies `pred`, or `timeout` passes.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&Snapshot) -> bool,
    ) -> Result<Arc<Snapshot>, Arc<Snapshot>> {
        let mut rx = self.snapshot.clone();
        let found = tokio::time::timeout(timeout, async {
            loop {
                let snap = rx.borrow_and_update().clone();
                if pred(&snap) {
                    return snap;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await;
        found.map_err(|_| self.snapshot())
    }
}

struct HostEntry {
    view: HostView,
    published: Arc<HostView>,
    dirty: bool,
    peer: Option<Peer>,
    /// Event kinds from a newer agent already reported in the event log.
    skipped_kinds: std::collections::BTreeSet<String>,
    address: watch::Sender<String>,
    link_task: JoinHandle<()>,
}

impl Drop for HostEntry {
    fn drop(&mut self) {
        self.link_task.abort();
    }
}

enum Internal {
    Log {
        level: Level,
        host: Option<HostId>,
        message: String,
    },
    Enrolled {
        enrolled: Enrolled,
        address: String,
        reply: Reply<HostAdded>,
    },
    GateHostId(enroll::GateRequest),
    /// An agent call finished: its result is applied to the engine's state here.
    CallDone(Box<dyn FnOnce(&mut Actor) + Send>),
}

struct Actor {
    store: Store,
    pki: Arc<ConsolePki>,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    hosts: BTreeMap<HostId, HostEntry>,
    /// Host ids held by enrollments under way.
    enrolling: enroll::HeldHostIds,
    events: VecDeque<EventRecord>,
    events_dirty: bool,
    published_events: Arc<Vec<EventRecord>>,
    next_seq: u64,
    link_tx: mpsc::Sender<LinkMessage>,
    internal_tx: mpsc::Sender<Internal>,
    snapshot_tx: watch::Sender<Arc<Snapshot>>,
    repaint: Repaint,
    version: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Starts the engine on the current tokio runtime.
pub async fn start(data_dir: &Path) -> Result<EngineHandle, EngineStartError> {
    let data_dir_error = |source| EngineStartError::DataDir {
        path: data_dir.display().to_string(),
        source,
    };
    // The CA key, the store and the control socket live here: a new data dir is the owner's
    // only. An existing one is the operator's to set; its key files are 0600 either way.
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        match std::fs::metadata(data_dir) {
            Ok(meta) if meta.permissions().mode() & 0o077 != 0 => tracing::warn!(
                "the data dir {} is open to other users (mode {:o}); chmod 700 keeps the control socket and the store to you",
                data_dir.display(),
                meta.permissions().mode() & 0o777
            ),
            Ok(_) => {}
            Err(_) => std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(data_dir)
                .map_err(data_dir_error)?,
        }
    }
    let pki = Arc::new(ConsolePki::load_or_create(data_dir)?);
    let (store, loaded) = Store::open(&data_dir.join("store.redb"))?;
    let client_config = pki::quic_client_config(pki::control_client_config(
        pki.ca.cert_der(),
        &pki.identity,
    )?)?;
    let endpoint = quinn::Endpoint::client("0.0.0.0:0".parse().expect("literal address"))
        .map_err(EngineStartError::Endpoint)?;
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
    let (link_tx, link_rx) = mpsc::channel(LINK_QUEUE);
    let (internal_tx, internal_rx) = mpsc::channel(INTERNAL_QUEUE);
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(Snapshot::default()));
    let repaint: Repaint = Arc::new(Mutex::new(None));
    let next_seq = loaded.events.last().map_or(0, |e| e.seq + 1);
    let loaded_upgrade = loaded.upgraded_from;
    let mut actor = Actor {
        store,
        pki,
        endpoint,
        client_config,
        hosts: BTreeMap::new(),
        enrolling: Default::default(),
        events: loaded.events.into_iter().collect(),
        events_dirty: true,
        published_events: Arc::new(Vec::new()),
        next_seq,
        link_tx,
        internal_tx,
        snapshot_tx,
        repaint: repaint.clone(),
        version: 0,
    };
    let mut vms_by_host: BTreeMap<HostId, Vec<VmStatus>> = BTreeMap::new();
    for (host, vm) in loaded.vms {
        vms_by_host.entry(host).or_default().push(vm);
    }
    for record in loaded.hosts {
        let vms = vms_by_host.remove(&record.id).unwrap_or_default();
        actor.add_host_entry(record, vms);
    }
    if let Some(from) = loaded_upgrade {
        actor.log(
            Level::Info,
            None,
            format!(
                "store upgraded from schema {from} to {}",
                store::SCHEMA_VERSION
            ),
        );
    }
    actor.log(Level::Info, None, "console started".into());
    actor.publish();
    tokio::spawn(actor.run(cmd_rx, link_rx, internal_rx));
    Ok(EngineHandle {
        commands: cmd_tx,
        snapshot: snapshot_rx,
        repaint,
        data_dir: data_dir.to_path_buf(),
    })
}

impl Actor {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut links: mpsc::Receiver<LinkMessage>,
        mut internal: mpsc::Receiver<Internal>,
    ) {
        loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                Some(msg) = links.recv() => self.link(msg),
                Some(msg) = internal.recv() => self.internal(msg),
            }
            // Take what else is waiting before publishing once.
            for _ in 0..512 {
                match links.try_recv() {
                    Ok(msg) => self.link(msg),
                    Err(_) => break,
                }
            }
            self.publish();
            // Waits while the writer's queue is full: the engine slows down, nothing is lost.
            self.store.submit().await;
        }
        self.endpoint.close(
            dunes_shared::protocol::codes::CLOSE_NORMAL,
            b"console stopping",
        );
        let _ = self.store.flush().await;
    }

    fn publish(&mut self) {
        let mut changed = false;
        for entry in self.hosts.values_mut() {
            if entry.dirty {
                entry.published = Arc::new(entry.view.clone());
                entry.dirty = false;
                changed = true;
            }
        }
        if self.events_dirty {
            self.published_events = Arc::new(self.events.iter().cloned().collect());
            self.events_dirty = false;
            changed = true;
        }
        let host_count_changed = self.snapshot_tx.borrow().hosts.len() != self.hosts.len();
        if !changed && !host_count_changed && self.version > 0 {
            return;
        }
        self.version += 1;
        let mut hosts: Vec<Arc<HostView>> =
            self.hosts.values().map(|e| e.published.clone()).collect();
        hosts.sort_by(|a, b| (a.site_name(), a.id()).cmp(&(b.site_name(), b.id())));
        let _ = self.snapshot_tx.send(Arc::new(Snapshot {
            hosts,
            events: self.published_events.clone(),
            version: self.version,
        }));
        if let Some(repaint) = self
            .repaint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            repaint();
        }
    }

    fn log(&mut self, level: Level, host: Option<HostId>, message: String) {
        // "-" for fleet-wide events keeps the log line greppable by host.
        let host_name = host.as_ref().map_or("-", |h| h.as_str());
        match level {
            Level::Info => tracing::info!(host = host_name, "{message}"),
            Level::Warning => tracing::warn!(host = host_name, "{message}"),
            Level::Error => tracing::error!(host = host_name, "{message}"),
        }
        let event = EventRecord {
            seq: self.next_seq,
            time_ms: now_ms(),
            level,
            host,
            message,
        };
        self.next_seq += 1;
        self.store.put_event(&event);
        self.events.push_back(event);
        while self.events.len() > EVENTS_IN_VIEW {
            self.events.pop_front();
        }
        self.events_dirty = true;
    }

    fn add_host_entry(&mut self, record: HostRecord, vms: Vec<VmStatus>) {
        let (address_tx, address_rx) = watch::channel(record.address.clone());
        let link_task = tokio::spawn(run_link(
            record.id.clone(),
            address_rx,
            record.fingerprint,
            self.endpoint.clone(),
            self.client_config.clone(),
            self.link_tx.clone(),
        ));
        let view = HostView {
            record,
            link: LinkState::Connecting,
            link_error: None,
            status: None,
            vms,
        };
        self.hosts.insert(
            view.record.id.clone(),
            HostEntry {
                published: Arc::new(view.clone()),
                view,
                dirty: true,
                peer: None,
                skipped_kinds: Default::default(),
                address: address_tx,
                link_task,
            },
        );
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::ProbeHost { address, reply } => {
                let endpoint = self.endpoint.clone();
                tokio::spawn(async move {
                    let result = enroll::probe(&endpoint, &address).await.map_err(|e| {
                        EngineError::Enroll(format!("{address}: {}", error_chain(&e)))
                    });
                    let _ = reply.send(result);
                });
            }
            Command::AddHost {
                address,
                token,
                expected_fingerprint,
                replace,
                reply,
            } => {
                if let Err(e) = enroll::validate_address(&address) {
                    let _ = reply.send(Err(EngineError::Invalid(e.to_string())));
                    return;
                }
                if token.trim().is_empty() {
                    let _ = reply.send(Err(EngineError::Invalid(
                        "the join token is empty: give the one the agent printed".into(),
                    )));
                    return;
                }
                self.log(
                    Level::Info,
                    None,
                    format!("enrolling the agent at {address}"),
                );
                let (endpoint, pki, internal) = (
                    self.endpoint.clone(),
                    self.pki.clone(),
                    self.internal_tx.clone(),
                );
                let policy = enroll::EnrollPolicy {
                    gate: Some(self.internal_tx.clone()),
                    replace,
                };
                tokio::spawn(async move {
                    match enroll(
                        &endpoint,
                        &pki,
                        &address,
                        &token,
                        expected_fingerprint,
                        policy,
                    )
                    .await
                    {
                        Ok(enrolled) => {
                            let _ = internal
                                .send(Internal::Enrolled {
                                    enrolled,
                                    address,
                                    reply,
                                })
                                .await;
                        }
                        Err(e) => {
                            let message =
                                format!("enrolling {address} failed: {}", error_chain(&e));
                            let _ = internal
                                .send(Internal::Log {
                                    level: Level::Error,
                                    host: None,
                                    message: message.clone(),
                                })
                                .await;
                            let _ = reply.send(Err(EngineError::Enroll(message)));
                        }
                    }
                });
            }
            Command::SetHostAddress {
                host,
                address,
                reply,
            } => match self.set_address(&host, address) {
                Ok(()) => self.reply_after_commit(reply, ()),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::CreateVm {
                host,
                spec,
                start,
                reply,
            } => {
                if let Err(e) = spec.validate() {
                    let _ = reply.send(Err(EngineError::Invalid(e.to_string())));
                    return;
                }
                let what = format!("creating VM {} on {host}", spec.name);
                self.agent_call(
                    host,
                    what,
                    reply,
                    CreateVm { spec, start },
                    CREATE_CALL_TIMEOUT,
                    Actor::apply_vm,
                );
            }
            Command::StartVm { host, name, reply } => {
                self.agent_call(
                    host,
                    format!("starting VM {name}"),
                    reply,
                    StartVm { name },
                    AGENT_CALL_TIMEOUT,
                    Actor::apply_vm,
                );
            }
            Command::StopVm {
                host,
                name,
                force,
                reply,
            } => {
                let what = if force {
                    format!("forcing VM {name} off")
                } else {
                    format!("stopping VM {name}")
                };
                self.agent_call(
                    host,
                    what,
                    reply,
                    StopVm {
                        name,
                        force,
                        timeout_secs: 0,
                    },
                    STOP_CALL_TIMEOUT,
                    Actor::apply_vm,
                );
            }
            Command::DeleteVm { host, name, reply } => {
                let deleted = name.clone();
                self.agent_call(
                    host,
                    format!("deleting VM {name}"),
                    reply,
                    DeleteVm { name },
                    AGENT_CALL_TIMEOUT,
                    move |actor, host, ()| actor.remove_vm(host, &deleted),
                );
            }
        }
    }

    fn set_address(&mut self, host: &HostId, address: String) -> Result<(), EngineError> {
        enroll::validate_address(&address).map_err(|e| EngineError::Invalid(e.to_string()))?;
        let entry = self
            .hosts
            .get_mut(host)
            .ok_or_else(|| EngineError::UnknownHost(host.clone()))?;
        if entry.view.record.address != address {
            entry.view.record.address = address.clone();
            entry.dirty = true;
            self.store.put_host(&entry.view.record);
            let _ = entry.address.send(address.clone());
            self.log(
                Level::Info,
                Some(host.clone()),
                format!("address set to {address}"),
            );
        }
        Ok(())
    }

    /// Sends one request to a host's agent in the background, within `deadline`. The result
    /// comes back to the engine as a message: on success `apply` updates the engine's state,
    /// and the caller gets the reply once that is committed; a failure goes to the event log.
    fn agent_call<R>(
        &mut self,
        host: HostId,
        what: String,
        reply: Reply<R::Response>,
        request: R,
        deadline: Duration,
        apply: impl FnOnce(&mut Actor, &HostId, &R::Response) + Send + 'static,
    ) where
        R: dunes_shared::protocol::Rpc + Send + 'static,
    {
        let Some(entry) = self.hosts.get(&host) else {
            let _ = reply.send(Err(EngineError::UnknownHost(host)));
            return;
        };
        let Some(peer) = entry.peer.clone() else {
            let _ = reply.send(Err(EngineError::Unreachable(host)));
            return;
        };
        self.log(Level::Info, Some(host.clone()), what.clone());
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            let result = match tokio::time::timeout(deadline, peer.call(request)).await {
                Err(_) => Err(EngineError::Agent(format!(
                    "the agent did not answer within {} s",
                    deadline.as_secs()
                ))),
                Ok(Err(e)) => Err(match e {
                    CallError::Remote(remote) => EngineError::Agent(remote.message),
                    e @ CallError::NotOffered { .. } => EngineError::Agent(e.to_string()),
                    _ => EngineError::Unreachable(host.clone()),
                }),
                Ok(Ok(response)) => Ok(response),
            };
            let done = move |actor: &mut Actor| match result {
                Ok(response) => {
                    apply(actor, &host, &response);
                    actor.reply_after_commit(reply, response);
                }
                Err(e) => {
                    actor.log(Level::Error, Some(host), format!("{what} failed: {e}"));
                    let _ = reply.send(Err(e));
                }
            };
            // A full queue makes this wait; a stopped engine has no one to tell.
            let _ = internal.send(Internal::CallDone(Box::new(done))).await;
        });
    }

    /// Sends `value` to the caller once every write made so far is committed; a failed commit
    /// is the caller's error.
    fn reply_after_commit<T: Send + 'static>(&mut self, reply: Reply<T>, value: T) {
        self.store.after_commit(Box::new(move |committed| {
            let _ = reply.send(committed.map(|()| value).map_err(EngineError::Store));
        }));
    }

    /// A VM as an agent's reply reports it: into the view and the store.
    fn apply_vm(&mut self, host: &HostId, vm: &VmStatus) {
        let Some(entry) = self.hosts.get_mut(host) else {
            return;
        };
        match entry.view.vms.iter_mut().find(|v| v.name == vm.name) {
            Some(old) => *old = vm.clone(),
            None => {
                entry.view.vms.push(vm.clone());
                entry.view.vms.sort_by(|a, b| a.name.cmp(&b.name));
            }
        }
        entry.dirty = true;
        self.store.put_vm(host.clone(), vm);
    }

    fn remove_vm(&mut self, host: &HostId, name: &VmName) {
        let Some(entry) = self.hosts.get_mut(host) else {
            return;
        };
        entry.view.vms.retain(|v| &v.name != name);
        entry.dirty = true;
        self.store.delete_vm(host.clone(), name.clone());
    }

    fn internal(&mut self, msg: Internal) {
        match msg {
            Internal::Log {
                level,
                host,
                message,
            } => self.log(level, host, message),
            Internal::Enrolled {
                enrolled,
                address,
                reply,
            } => {
                let Enrolled {
                    host_id,
                    fingerprint,
                    hold,
                } = enrolled;
                if let Some(old) = self.hosts.remove(&host_id)
                    && old.view.record.fingerprint != fingerprint
                {
                    self.log(
                        Level::Warning,
                        Some(host_id.clone()),
                        format!("host replaced: now pinned to the new key {fingerprint}"),
                    );
                }
                let record = HostRecord {
                    id: host_id.clone(),
                    address: address.clone(),
                    fingerprint,
                    enrolled_at_ms: now_ms(),
                    inventory: None,
                };
                self.store.put_host(&record);
                self.add_host_entry(record, Vec::new());
                self.log(
                    Level::Info,
                    Some(host_id.clone()),
                    format!("enrolled at {address}, key {fingerprint}"),
                );
                // Whoever awaits the reply finds the host in the snapshot, and on disk.
                self.publish();
                self.reply_after_commit(
                    reply,
                    HostAdded {
                        host_id,
                        fingerprint,
                    },
                );
                // Released only now that the host is in the list the gate checks.
                drop(hold);
            }
            Internal::GateHostId(request) => {
                let enroll::GateRequest {
                    host_id,
                    fingerprint,
                    replace,
                    answer,
                } = request;
                let verdict = if let Some(entry) = self.hosts.get(&host_id)
                    && entry.view.record.fingerprint != fingerprint
                    && !replace
                {
                    Err(enroll::EnrollError::HostIdTaken {
                        host: host_id,
                        enrolled: entry.view.record.fingerprint,
                    })
                } else {
                    enroll::HostIdHold::take(host_id.clone(), &self.enrolling)
                        .ok_or(enroll::EnrollError::HostIdBusy(host_id))
                };
                // If the enrollment is gone already, its hold is dropped here and released.
                let _ = answer.send(verdict);
            }
            Internal::CallDone(apply) => apply(self),
        }
    }

    fn link(&mut self, msg: LinkMessage) {
        match msg {
            LinkMessage::Connected { host, peer, hello } => {
                let Some(entry) = self.hosts.get_mut(&host) else {
                    return;
                };
                let was = entry.view.link;
                entry.peer = Some(peer);
                entry.view.link = LinkState::Online;
                entry.view.link_error = None;
                entry.view.status = Some(hello.status);
                if entry.view.record.inventory.as_ref() != Some(&hello.inventory) {
                    entry.view.record.inventory = Some(hello.inventory);
                    self.store.put_host(&entry.view.record);
                }
                self.store.replace_vms(host.clone(), &hello.vms);
                entry.view.vms = hello.vms;
                entry.dirty = true;
                if was != LinkState::Online {
                    self.log(Level::Info, Some(host), "online".into());
                }
            }
            LinkMessage::Event { host, event } => self.agent_event(host, event),
            LinkMessage::Skipped { host, kind } => {
                let Some(entry) = self.hosts.get_mut(&host) else {
                    return;
                };
                if entry.skipped_kinds.insert(kind.clone()) {
                    self.log(
                        Level::Warning,
                        Some(host),
                        format!("the agent sends {kind} events, which this console does not know; they are skipped (update the console)"),
                    );
                }
            }
            LinkMessage::Lost {
                host,
                stable_id,
                reason,
            } => {
                let Some(entry) = self.hosts.get_mut(&host) else {
                    return;
                };
                let current = entry.peer.as_ref().map(|p| p.conn.stable_id());
                if stable_id.is_some() && current != stable_id {
                    return;
                }
                entry.peer = None;
                let was = entry.view.link;
                entry.view.link = LinkState::Unreachable;
                entry.view.link_error = Some(reason.clone());
                entry.dirty = true;
                if was != LinkState::Unreachable {
                    self.log(Level::Warning, Some(host), format!("unreachable: {reason}"));
                }
            }
        }
    }

    fn agent_event(&mut self, host: HostId, event: AgentEvent) {
        let Some(entry) = self.hosts.get_mut(&host) else {
            return;
        };
        let mut note = None;
        match event {
            AgentEvent::HostStatus(status) => entry.view.status = Some(status),
            AgentEvent::VmChanged(vm) => {
                match entry.view.vms.iter_mut().find(|v| v.name == vm.name) {
                    Some(old) => {
                        if old.state != vm.state {
                            note = Some(format!("VM {} is {}", vm.name, vm.state));
                        }
                        *old = vm.clone();
                    }
                    None => {
                        note = Some(format!("VM {} appeared ({})", vm.name, vm.state));
                        entry.view.vms.push(vm.clone());
                        entry.view.vms.sort_by(|a, b| a.name.cmp(&b.name));
                    }
                }
                self.store.put_vm(host.clone(), &vm);
            }
            AgentEvent::VmRemoved { name } => {
                entry.view.vms.retain(|v| v.name != name);
                note = Some(format!("VM {name} was deleted"));
                self.store.delete_vm(host.clone(), name);
            }
            AgentEvent::Inventory(inventory) => {
                entry.view.record.inventory = Some(inventory);
                self.store.put_host(&entry.view.record);
            }
            AgentEvent::VmList(vms) => {
                self.store.replace_vms(host.clone(), &vms);
                entry.view.vms = vms;
            }
            _ => {}
        }
        entry.dirty = true;
        if let Some(message) = note {
            self.log(Level::Info, Some(host), message);
        }
    }
}
