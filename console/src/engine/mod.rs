//! The management engine: no egui here. It owns the fleet state, talks to agents and
//! publishes an immutable [`Snapshot`] after every change. The UI, ctl and tests drive it
//! through [`EngineHandle`].

mod actor;
pub mod audit;
pub mod autoscale;
mod commands;
pub mod console_pki;
pub mod consoles;
pub mod evacuation;
mod event_log;
pub mod fleet;
pub mod images;
pub mod migration;
pub mod networks;
pub mod notify;
pub mod operators;
mod publish;
pub mod records;
mod run;
pub mod services;
pub mod snapshot;
pub mod statistics;
pub mod store;
#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use dunes_shared::{
    model::{HostId, VmName, VmSpec, VmStatus},
    pki::{self, Fingerprint},
};
use tokio::sync::{mpsc, oneshot, watch};

pub use autoscale::{AutoscaleView, ReplayAnswer};
pub use fleet::client::{AGENT_CALL_TIMEOUT, CREATE_CALL_TIMEOUT, STOP_CALL_TIMEOUT};
pub use records::{
    EventRecord, HostRecord, InstanceKey, InstanceRecord, InstanceState, Level, Maintenance,
    MovePhase, ServiceMove, ServiceRecord,
};
pub use services::views::{InstanceView, OperationReport, ServicePlan, ServiceStatus, ServiceView};
pub use snapshot::{HostView, LinkState, Snapshot};

use self::{
    actor::{Actor, Internal},
    console_pki::{ConsolePki, ConsolePkiError},
    fleet::link::LinkContext,
    store::{Store, StoreError},
};

/// Commands waiting for the engine; the UI's `try_send` fails (and says so) beyond this.
const COMMAND_QUEUE: usize = 256;
/// Results of background work waiting for the engine; senders wait beyond this.
const INTERNAL_QUEUE: usize = 1024;
/// Enrollments under way, each asking once whether it may take its host id.
const GATE_QUEUE: usize = 64;
/// Agent events waiting for the engine; a full queue slows the links, then the agents.
const LINK_QUEUE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("host {0} is not enrolled")]
    UnknownHost(HostId),
    #[error("host {0} is unreachable")]
    Unreachable(HostId),
    #[error("{0}")]
    Invalid(String),
    /// The agent refused or failed the request, and said why with a code.
    #[error("{message}")]
    Agent {
        code: dunes_shared::protocol::ErrorCode,
        message: String,
    },
    /// The agent took the request but gave no answer in time: what it did is not known.
    #[error("the agent on {host} did not answer within {secs} s")]
    NoAnswer { host: HostId, secs: u64 },
    #[error("{0}")]
    Enroll(String),
    #[error("the change was not saved: {0}")]
    Store(String),
    #[error("the engine is busy; try again")]
    Busy,
    #[error("the engine has stopped")]
    Stopped,
}

impl EngineError {
    /// A failure of the engine's own, as an agent's would be reported (`Runtime`).
    pub fn agent_failed(message: impl Into<String>) -> EngineError {
        EngineError::Agent {
            code: dunes_shared::protocol::ErrorCode::Runtime,
            message: message.into(),
        }
    }

    /// The agent's code, when the agent answered with an error.
    pub fn agent_code(&self) -> Option<dunes_shared::protocol::ErrorCode> {
        match self {
            EngineError::Agent { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The agent says what the request names does not exist.
    pub fn is_not_found(&self) -> bool {
        self.agent_code() == Some(dunes_shared::protocol::ErrorCode::NotFound)
    }

    /// The agent has what it was asked to create.
    pub fn is_exists(&self) -> bool {
        self.agent_code() == Some(dunes_shared::protocol::ErrorCode::AlreadyExists)
    }
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

/// A VM copied on its host, and the migration that takes the copy to another host when one
/// was asked.
#[derive(Debug, Clone)]
pub struct VmCloned {
    pub host: HostId,
    pub status: VmStatus,
    pub migration: Option<migration::MigrationJournal>,
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
    /// Reboots, pauses or resumes a VM.
    PowerVm {
        host: HostId,
        name: VmName,
        action: dunes_shared::protocol::PowerAction,
        reply: Reply<VmStatus>,
    },
    /// Changes a VM's vCPUs, memory or autostart; a running VM gets new vCPUs and memory at
    /// its next start.
    ConfigureVm {
        host: HostId,
        name: VmName,
        vcpus: Option<u32>,
        memory_mib: Option<u64>,
        autostart: Option<bool>,
        /// Take the installer out of its CD-ROM drive.
        eject_cdrom: bool,
        reply: Reply<dunes_shared::protocol::VmConfigured>,
    },
    /// Lists a VM's snapshots, or takes, reverts to or deletes one; answered with the list.
    SnapshotVm {
        host: HostId,
        name: VmName,
        action: dunes_shared::protocol::SnapshotAction,
        snapshot: Option<String>,
        reply: Reply<Vec<dunes_shared::model::SnapshotInfo>>,
    },
    /// Copies a stopped VM as `new_name` on its host; with `to` another host, the copy then
    /// migrates there.
    CloneVm {
        host: HostId,
        name: VmName,
        new_name: VmName,
        to: Option<HostId>,
        reply: Reply<VmCloned>,
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
    /// Runs a shell command inside a running VM, through its guest agent.
    GuestExec {
        host: HostId,
        name: VmName,
        command: String,
        timeout_secs: u32,
        reply: Reply<dunes_shared::protocol::GuestExecReply>,
    },
    /// Defines a service from the text of its file (or replaces it, with `replace`).
    DefineService {
        source: String,
        replace: bool,
        reply: Reply<dunes_shared::model::ServiceName>,
    },
    /// Removes every instance of the service, then its definition.
    DeleteService {
        name: dunes_shared::model::ServiceName,
        reply: Reply<OperationReport>,
    },
    /// Applies the plan made now; with a fingerprint, only if it is still the plan shown.
    DeployService {
        name: dunes_shared::model::ServiceName,
        fingerprint: Option<String>,
        /// Instances the operator placed by hand.
        overrides: Vec<services::placement::Override>,
        reply: Reply<OperationReport>,
    },
    /// Starts the instances in dependency order: an application after everything it needs
    /// is ready.
    StartService {
        name: dunes_shared::model::ServiceName,
        reply: Reply<OperationReport>,
    },
    /// Stops the instances in reverse dependency order.
    StopService {
        name: dunes_shared::model::ServiceName,
        reply: Reply<OperationReport>,
    },
    /// Makes an existing VM an instance of one of the service's applications.
    AdoptVm {
        service: dunes_shared::model::ServiceName,
        app: dunes_shared::model::AppName,
        host: HostId,
        vm: VmName,
        reply: Reply<InstanceRecord>,
    },
    /// A cold migration of a VM to another host: journaled, verified, rolled back on failure.
    MigrateVm {
        host: HostId,
        vm: VmName,
        to: HostId,
        options: migration::MigrationOptions,
        reply: Reply<migration::MigrationJournal>,
    },
    /// Puts a host in maintenance and moves everything off it, or resumes its paused drain.
    DrainHost {
        host: HostId,
        reply: Reply<evacuation::DrainProgress>,
    },
    /// Starts no further migration of a drain; the one under way finishes.
    PauseDrain { host: HostId, reply: Reply<()> },
    /// Ends a host's maintenance.
    UndrainHost { host: HostId, reply: Reply<()> },
    /// Moves every instance of a service to the hosts of a site.
    MoveService {
        name: dunes_shared::model::ServiceName,
        site: String,
        reply: Reply<ServiceMove>,
    },
    /// Stops a migration and rolls it back, if it is not confirmed yet.
    CancelMigration {
        id: u64,
        reply: Reply<migration::MigrationJournal>,
    },
    /// Readings from elsewhere (history kept by another system, a load generator) taken in
    /// as if `host`'s agent had sent them; answers how many were taken.
    ImportSamples {
        host: HostId,
        samples: Vec<dunes_shared::model::Sample>,
        reply: Reply<usize>,
    },
    /// Sets an application's autoscaling rule, or removes it (`rule: None`).
    SetAutoscale {
        service: dunes_shared::model::ServiceName,
        app: dunes_shared::model::AppName,
        rule: Option<autoscale::AutoscaleRule>,
        reply: Reply<Option<AutoscaleView>>,
    },
    /// Every application's autoscaling and what it last said.
    AutoscaleShow { reply: Reply<Vec<AutoscaleView>> },
    /// What an application's rule would have done over the recorded history.
    ReplayAutoscale {
        service: dunes_shared::model::ServiceName,
        app: dunes_shared::model::AppName,
        since_secs: u64,
        reply: Reply<ReplayAnswer>,
    },
    /// What the workloads used since `since_secs` ago (CPU-hours, GB-months stored, GB
    /// sent) and its cost at their hosts' prices, grouped.
    Cost {
        by: statistics::cost::CostBy,
        since_secs: u64,
        reply: Reply<Vec<statistics::cost::CostLine>>,
    },
    /// The newest value of every time series, by series key (`host/a/cpu`).
    LatestValues { reply: Reply<Vec<(String, f64)>> },
    /// Capacity per site now, with when CPU and memory are full from the stored history;
    /// with a what-if, as if hosts were drained away or a plan's instances added.
    Capacity {
        what_if: statistics::capacity::WhatIf,
        reply: Reply<Vec<statistics::capacity::SiteCapacity>>,
    },
    /// A subject's time series since `since_secs` ago, at `resolution_secs` (by default the
    /// finest level that holds the range in at most [`statistics::series::MAX_POINTS`] buckets).
    Stats {
        subject: statistics::series::Subject,
        since_secs: u64,
        resolution_secs: Option<u64>,
        reply: Reply<statistics::series::StatsAnswer>,
    },
    /// Readings made up for a demo, fed through the ingest path like an agent's; the charts
    /// say that what comes before `generated_until_secs` was generated. Empty `samples` only
    /// set that mark (a demo restarted on its data dir).
    ImportHistory {
        host: HostId,
        samples: Vec<dunes_shared::model::Sample>,
        generated_until_secs: u64,
        reply: Reply<usize>,
    },
    /// Signs an operator's key request and records them with a role.
    AddOperator {
        name: dunes_shared::model::OperatorName,
        role: operators::Role,
        scopes: Vec<operators::access::Scope>,
        consoles: Option<bool>,
        csr_der: Vec<u8>,
        reply: Reply<operators::OperatorIssued>,
    },
    /// A fresh certificate for an operator's own key.
    RenewOperator {
        name: dunes_shared::model::OperatorName,
        csr_der: Vec<u8>,
        reply: Reply<operators::OperatorIssued>,
    },
    /// Appends a record to the audit log; answered with its number once committed.
    Audit {
        entry: audit::AuditEntry,
        reply: Reply<u64>,
    },
    /// A reader of the audit log as committed.
    AuditReader {
        reply: Reply<Arc<store::AuditReader>>,
    },
    /// Imports the file at `path` (on the engine's machine) into the image library.
    ImportImage {
        name: dunes_shared::model::ImageName,
        path: PathBuf,
        reply: Reply<images::ImageRecord>,
    },
    /// The image library.
    ListImages {
        reply: Reply<Vec<images::ImageRecord>>,
    },
    /// Creates a VM from a library image on `host`, pushing the image there first when the
    /// host does not hold it.
    CreateVmFromImage(images::CreateFromImage),
    /// Attaches to a running VM's serial console (with the keyboard, if asked and free).
    OpenConsole {
        host: HostId,
        vm: VmName,
        wants_keyboard: bool,
        reply: Reply<consoles::ConsoleAttach>,
    },
    /// Attaches to a running VM's screen (with keys and the pointer, if asked).
    OpenScreen {
        host: HostId,
        vm: VmName,
        wants_input: bool,
        reply: Reply<consoles::ScreenAttach>,
    },
    /// Sends an image to hosts that do not hold it.
    PushImage {
        name: dunes_shared::model::ImageName,
        hosts: Vec<dunes_shared::model::HostId>,
        reply: Reply<Vec<images::ImagePushReport>>,
    },
    /// Removes an image that no VM uses.
    DeleteImage {
        name: dunes_shared::model::ImageName,
        reply: Reply<images::ImageRecord>,
    },
    /// Ends an operator's sessions and refuses their certificate from now on.
    RevokeOperator {
        name: dunes_shared::model::OperatorName,
        reply: Reply<operators::OperatorRecord>,
    },
    /// A dry run: where every instance would go, and why hosts were left out.
    PlanService {
        name: dunes_shared::model::ServiceName,
        /// Instances the operator placed by hand; each gets a verdict.
        overrides: Vec<services::placement::Override>,
        reply: Reply<ServicePlan>,
    },
}

type Repaint = Arc<Mutex<Option<Box<dyn Fn(Published) + Send + Sync>>>>;

/// What a publish changed, for a window to decide whether to draw again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Only hosts' live readings changed (CPU load, memory in use), which the window shows
    /// only in a host's details.
    pub readings_only: bool,
    /// The hosts whose live readings changed.
    pub readings_of: Vec<HostId>,
}

/// The way in: send commands, read snapshots.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    repaint: Repaint,
    data_dir: PathBuf,
    operators: watch::Receiver<Arc<Vec<operators::OperatorRecord>>>,
    /// The console's certificate and key, as renewed.
    identity: watch::Receiver<Arc<pki::Identity>>,
    ca_der: rustls::pki_types::CertificateDer<'static>,
    /// Where the operator endpoint listens, once it does.
    operator_address: Arc<Mutex<Option<std::net::SocketAddr>>>,
    /// The runtime the engine runs on, for work a window hands it.
    runtime: tokio::runtime::Handle,
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

    /// Every operator, revoked ones included; it changes once a change is committed.
    pub fn operators(&self) -> watch::Receiver<Arc<Vec<operators::OperatorRecord>>> {
        self.operators.clone()
    }

    /// The console's own certificate and key, which it renews.
    pub fn identity(&self) -> watch::Receiver<Arc<pki::Identity>> {
        self.identity.clone()
    }

    /// The runtime the engine runs on.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// Where the operator endpoint listens, once it does.
    pub fn operator_address(&self) -> Option<std::net::SocketAddr> {
        *self
            .operator_address
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_operator_address(&self, address: std::net::SocketAddr) {
        *self
            .operator_address
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(address);
    }

    /// The cluster CA's certificate.
    pub fn ca_der(&self) -> &rustls::pki_types::CertificateDer<'static> {
        &self.ca_der
    }

    /// Called after every publish, e.g. to repaint a window.
    pub fn set_repaint(&self, repaint: impl Fn(Published) + Send + Sync + 'static) {
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

/// How an engine is set up beyond its data dir.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// How long the certificates the cluster CA signs last (hosts' and the console's own);
    /// each is renewed at two thirds of it.
    pub cert_lifetime: Duration,
    /// Where service status changes go as desktop notifications.
    pub desktop_notifications: notify::DesktopNotifications,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            cert_lifetime: pki::DEFAULT_CERT_LIFETIME,
            desktop_notifications: notify::DesktopNotifications::Off,
        }
    }
}

/// Starts the engine on the current tokio runtime, with the default options.
pub async fn start(data_dir: &Path) -> Result<EngineHandle, EngineStartError> {
    start_with(data_dir, EngineOptions::default()).await
}

/// Starts the engine on the current tokio runtime.
pub async fn start_with(
    data_dir: &Path,
    options: EngineOptions,
) -> Result<EngineHandle, EngineStartError> {
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
    let pki = Arc::new(ConsolePki::load_or_create_with(
        data_dir,
        options.cert_lifetime,
    )?);
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
    let (gate_tx, gate_rx) = mpsc::channel(GATE_QUEUE);
    let (config_tx, config_rx) = watch::channel(client_config);
    let (identity_tx, identity_rx) = watch::channel(Arc::new(pki::Identity {
        key_pem: pki.identity.key_pem.clone(),
        cert_der: pki.identity.cert_der.clone(),
    }));
    tokio::spawn(renew_console_cert(
        pki.clone(),
        pki.identity.cert_der.clone(),
        (config_tx, identity_tx),
        internal_tx.clone(),
    ));
    let links = LinkContext {
        endpoint: endpoint.clone(),
        config: config_rx,
        ca: Some(pki.clone()),
        tx: link_tx,
    };
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(Snapshot::default()));
    let repaint: Repaint = Arc::new(Mutex::new(None));
    let next_seq = loaded.events.last().map_or(0, |e| e.seq + 1);
    let (operators, operators_rx) = operators::OperatorsState::new(loaded.operators);
    let audit = audit::AuditState::new(loaded.audit_last);
    let ca_der = pki.ca.cert_der().clone();
    let loaded_upgrade = loaded.upgraded_from;
    let mut actor = Actor {
        store,
        pki,
        endpoint,
        links,
        fleet: Default::default(),
        events: event_log::EventsState::new(loaded.events, next_seq),
        services: Default::default(),
        internal_tx,
        gate_tx,
        snapshot_tx,
        repaint: repaint.clone(),
        version: 0,
        notices: notify::start(&options.desktop_notifications),
        migrations: migration::MigrationsState::new(&loaded.migrations),
        statistics: Default::default(),
        autoscaling: Default::default(),
        drains: Default::default(),
        operators,
        audit,
        images: images::state::ImagesState::new(data_dir.join("images"), loaded.images),
        networks: networks::state::NetworksState {
            records: loaded
                .networks
                .into_iter()
                .map(|r| (r.name.clone(), r))
                .collect(),
            dirty: true,
            published: Default::default(),
            tell: true,
            refusals: Default::default(),
        },
        consoles: consoles::state::ConsolesState::default(),
    };
    let mut vms_by_host: BTreeMap<HostId, Vec<VmStatus>> = BTreeMap::new();
    for (host, vm) in loaded.vms {
        vms_by_host.entry(host).or_default().push(vm);
    }
    actor.services.load(loaded.services, loaded.instances);
    actor.autoscaling.load(loaded.autoscale);
    actor.statistics.series.restore(loaded.stats_open);
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
    tokio::spawn(actor.run(run::Inbox {
        commands: cmd_rx,
        links: link_rx,
        gates: gate_rx,
        internal: internal_rx,
    }));
    Ok(EngineHandle {
        commands: cmd_tx,
        snapshot: snapshot_rx,
        repaint,
        data_dir: data_dir.to_path_buf(),
        operators: operators_rx,
        identity: identity_rx,
        ca_der,
        operator_address: Arc::default(),
        runtime: tokio::runtime::Handle::current(),
    })
}

/// Renews the console's own certificate at two thirds of its life: new connections present
/// the new one, live ones go on. A failure is logged and tried again a little later.
async fn renew_console_cert(
    pki: Arc<ConsolePki>,
    mut cert: rustls::pki_types::CertificateDer<'static>,
    (config, identity_tx): (
        watch::Sender<quinn::ClientConfig>,
        watch::Sender<Arc<pki::Identity>>,
    ),
    internal: mpsc::Sender<Internal>,
) {
    loop {
        let validity = match pki::cert_validity(&cert) {
            Ok(v) => v,
            Err(e) => {
                let message = Internal::Log {
                    level: Level::Error,
                    host: None,
                    message: format!(
                        "the console certificate does not parse ({}); it will not be renewed",
                        dunes_shared::error_chain(&e)
                    ),
                };
                let _ = internal.send(message).await;
                return;
            }
        };
        fleet::link::sleep_until_wall(validity.renew_at()).await;
        let renewed = {
            let pki = pki.clone();
            tokio::task::spawn_blocking(move || {
                let identity = pki
                    .renewed_identity()
                    .map_err(|e| dunes_shared::error_chain(&e))?;
                let tls = pki::control_client_config(pki.ca.cert_der(), &identity)
                    .and_then(pki::quic_client_config)
                    .map_err(|e| dunes_shared::error_chain(&e))?;
                Ok::<_, String>((identity, tls))
            })
            .await
        };
        match renewed {
            Ok(Ok((identity, tls))) => {
                cert = identity.cert_der.clone();
                identity_tx.send_replace(Arc::new(identity));
                if config.send(tls).is_err() {
                    return;
                }
                tracing::info!("console certificate renewed");
            }
            failed => {
                let reason = match failed {
                    Ok(Err(e)) => e,
                    _ => "the renewal task failed".into(),
                };
                let message = Internal::Log {
                    level: Level::Error,
                    host: None,
                    message: format!("renewing the console certificate failed: {reason}"),
                };
                if internal.send(message).await.is_err() {
                    return;
                }
                tokio::time::sleep((validity.lifetime() / 20).max(Duration::from_secs(1))).await;
            }
        }
    }
}
