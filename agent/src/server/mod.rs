//! The agent's QUIC endpoint: enrollment, the control protocol and the event stream, each in
//! a module of its own (`endpoint`, `control`, `enrollment`, `status`), over the runtimes of
//! [`crate::runtime`].

mod console;
mod control;
mod endpoint;
mod enrollment;
mod images;
mod screen;
mod status;
mod transfer;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use dunes_shared::{
    error_chain,
    model::{HostInventory, HostStatus, SizesFrom, TemplateName},
    pki::{self, Fingerprint},
    protocol::{AgentEvent, codes},
};
use tokio::sync::broadcast;

use crate::{
    config::AgentConfig,
    identity::AgentIdentity,
    inventory,
    runtime::{
        RuntimeRegistry,
        libvirt::{LibvirtRuntime, NodeFacts, embed},
        process::ProcessRuntime,
    },
    storage::Storage,
};

use self::endpoint::{TlsConfigs, bind_endpoint};

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// An enrollment connection is closed after this, finished or not.
const ENROLL_DEADLINE: Duration = Duration::from_secs(10);
/// Enrollment connections served at once; more are closed at once.
const ENROLL_CONCURRENT: usize = 4;
/// TLS handshakes in progress at once; more are refused before any crypto is done.
const HANDSHAKES_CONCURRENT: usize = 64;
/// Events waiting for the slowest console connection; one that falls further behind gets the
/// whole VM list instead of the backlog.
const EVENTS_QUEUE: usize = 1024;

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub libvirt_uri: String,
    pub config: AgentConfig,
    /// Directory with the tiny guest (vmlinuz, initrd.img, disk.img) for the `tiny` template.
    pub guest_dir: Option<PathBuf>,
}

/// A started agent.
#[derive(Debug)]
pub struct RunningAgent {
    pub host_id: dunes_shared::model::HostId,
    pub local_addr: SocketAddr,
    pub fingerprint: Fingerprint,
    /// A fresh join token, when the agent is not enrolled yet.
    pub join_token: Option<String>,
    shared: Arc<Shared>,
    /// The agent's own tasks; stopped by `shutdown` or when this is dropped.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

struct Shared {
    /// The two TLS setups of the current identity; each connection gets one (see
    /// [`Shared::server_config_now`]).
    tls: Mutex<TlsConfigs>,
    handshakes: Arc<tokio::sync::Semaphore>,
    enroll_slots: Arc<tokio::sync::Semaphore>,
    identity: Mutex<AgentIdentity>,
    runtimes: RuntimeRegistry,
    storage: Storage,
    config: AgentConfig,
    events: broadcast::Sender<AgentEvent>,
    endpoint: quinn::Endpoint,
    libvirt_uri: String,
    /// The mock host's sizes, on libvirt's test driver; the machine's otherwise.
    declared: Option<NodeFacts>,
    interpreters: Vec<dunes_shared::model::InterpreterInfo>,
    cpu: Mutex<inventory::CpuLoad>,
    /// Bumped by every enrollment: control connections trusted under the previous one close.
    enrollments: tokio::sync::watch::Sender<u64>,
    /// Transfers the console announced to this agent as their target, by ticket id.
    tickets: Mutex<std::collections::BTreeMap<String, dunes_shared::transfer::TransferTicket>>,
    /// A test hook: the next disk this agent sends has its first chunk corrupted on the wire.
    transfer_faults: Mutex<bool>,
    /// Disks being sent (and the outcome of those sent), by ticket id: a `SendDisk` repeated
    /// by a console that lost its answer waits for the transfer under way instead of
    /// starting a second one.
    sends: Mutex<std::collections::BTreeMap<String, transfer::SendOutcome>>,
    /// Library images being received, by digest: a second push of one waits its turn.
    receiving_images: Mutex<std::collections::BTreeSet<String>>,
    /// The TCP traffic of process instances, and where the site ends.
    traffic: Arc<Mutex<crate::traffic::TrafficMeter>>,
    /// Service networks on this host, as the console last described them.
    networks: crate::network::NetworkHost,
}

impl RunningAgent {
    /// Opens the data dir and libvirt, binds the endpoint and starts serving.
    pub async fn start(opts: AgentOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&opts.data_dir).map_err(|e| {
            anyhow::anyhow!("cannot create data dir {}: {e}", opts.data_dir.display())
        })?;
        // Absolute from here on: libvirt and QEMU resolve paths from their own directories.
        let data_dir = opts.data_dir.canonicalize().map_err(|e| {
            anyhow::anyhow!("cannot resolve data dir {}: {e}", opts.data_dir.display())
        })?;
        let opts = AgentOptions { data_dir, ..opts };
        let identity = AgentIdentity::load_or_create(&opts.data_dir, opts.config.host_id.as_ref())?;
        let storage = Storage::open(&opts.data_dir)?;
        storage.ensure_tiny_template(opts.guest_dir.as_deref())?;
        // Hashes the overlay templates' images now, not in the first hello.
        let overlay_templates = storage.overlay_template_disks();
        if !overlay_templates.is_empty() {
            tracing::info!(
                "overlay templates: {}",
                overlay_templates
                    .iter()
                    .map(|t| t.template.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let (events, _) = broadcast::channel(EVENTS_QUEUE);
        let libvirt_uri = embed::resolve_uri(&opts.libvirt_uri, &opts.data_dir)?;
        let libvirt = {
            let (uri, storage) = (libvirt_uri.clone(), storage.clone());
            tokio::task::spawn_blocking(move || LibvirtRuntime::start(&uri, storage)).await??
        };
        let declared = libvirt.declared_sizes().cloned();
        let mut runtimes = RuntimeRegistry::default();
        runtimes.register(Arc::new(libvirt))?;
        let processes = ProcessRuntime::start(&opts.data_dir)?;
        processes.build_networks(opts.config.service_networks);
        let interpreters = processes.interpreters().to_vec();
        runtimes.register(Arc::new(processes))?;
        if !libvirt_uri.starts_with("test:")
            && let Ok(tiny) = storage.template(&TemplateName::new("tiny").expect("valid literal"))
            && tiny.placeholder
        {
            tracing::warn!(
                "the tiny template has nothing to boot under QEMU: pass --guest-dir with the output of assets/guest/build-tiny-guest.sh"
            );
        }
        if let Some(ca) = &identity.ca_der
            && let Err(e) = pki::verify_host_cert(&identity.cert_der, ca, &identity.host_id)
        {
            tracing::warn!(
                "this agent's certificate is not valid now ({}): check the clock, or enroll the host again with a fresh token (dunes-agent token)",
                error_chain(&e)
            );
        }
        let join_token = if identity.is_enrolled() {
            None
        } else {
            Some(identity.issue_token()?)
        };
        let tls = TlsConfigs::new(&identity)?;
        let endpoint = bind_endpoint(opts.listen, (*tls.control_only).clone())?;
        let local_addr = endpoint.local_addr()?;
        std::fs::write(opts.data_dir.join("listen-addr"), format!("{local_addr}\n"))?;
        let shared = Arc::new(Shared {
            tls: Mutex::new(tls),
            handshakes: Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_CONCURRENT)),
            enroll_slots: Arc::new(tokio::sync::Semaphore::new(ENROLL_CONCURRENT)),
            identity: Mutex::new(identity),
            runtimes,
            storage,
            config: opts.config.clone(),
            events,
            endpoint,
            libvirt_uri,
            declared,
            interpreters,
            cpu: Mutex::new(inventory::CpuLoad::default()),
            enrollments: tokio::sync::watch::Sender::new(0),
            tickets: Mutex::new(Default::default()),
            transfer_faults: Mutex::new(false),
            sends: Mutex::new(Default::default()),
            receiving_images: Mutex::new(Default::default()),
            traffic: Arc::new(Mutex::new(crate::traffic::TrafficMeter::new(
                opts.config.site.networks.clone(),
            ))),
            networks: crate::network::NetworkHost::new(opts.config.service_networks),
        });
        let (host_id, fingerprint) = {
            let id = lock(&shared.identity);
            (id.host_id.clone(), id.fingerprint()?)
        };
        let mut tasks: Vec<_> = shared
            .runtimes
            .all()
            .map(|runtime| {
                tokio::spawn(status::forward_changes(
                    runtime.clone(),
                    shared.events.clone(),
                ))
            })
            .collect();
        tasks.push(tokio::spawn(endpoint::accept_loop(shared.clone())));
        tasks.push(tokio::spawn(status::status_loop(shared.clone())));
        tasks.push(tokio::spawn(status::sample_loop(shared.clone())));
        Ok(RunningAgent {
            host_id,
            local_addr,
            fingerprint,
            join_token,
            shared,
            tasks,
        })
    }

    /// A test hook for the transfer's fault tests: the next disk this agent sends has one byte
    /// of its first chunk flipped on the wire, which the target must catch and ask again.
    pub fn corrupt_next_sent_chunk(&self) {
        *lock(&self.shared.transfer_faults) = true;
    }

    /// Stops accepting and closes every connection.
    /// Once the connections are closed, the agent's tasks stop, and the port and the
    /// runtimes are let go with the last handle.
    pub async fn shutdown(&self) {
        self.shared
            .endpoint
            .close(codes::CLOSE_NORMAL, b"agent shutting down");
        self.shared.endpoint.wait_idle().await;
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("libvirt_uri", &self.libvirt_uri)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    /// What the host is; file I/O, so call it through [`off_worker`].
    fn inventory(&self) -> HostInventory {
        let (storage_total_mib, storage_free_mib) = self.storage_mib();
        let (cpus, cpu_model, memory_mib, sizes_from) = match &self.declared {
            Some(node) => (
                node.cpus,
                node.model.clone(),
                node.memory_mib,
                SizesFrom::TestDriver,
            ),
            None => (
                inventory::cpu_count(),
                inventory::cpu_model(),
                inventory::memory_mib().1,
                SizesFrom::Machine,
            ),
        };
        HostInventory {
            host_id: lock(&self.identity).host_id.clone(),
            hostname: inventory::hostname(),
            cpus,
            cpu_model,
            memory_mib,
            storage_total_mib,
            storage_free_mib,
            network: inventory::network_interfaces(),
            runtimes: self.runtimes.infos(),
            site: (&self.config.site).into(),
            prices: self.config.prices,
            security_level: self.config.security_level,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            sizes_from,
            interpreters: self.interpreters.clone(),
            template_disks: self.storage.overlay_template_disks(),
        }
    }

    /// Total and free storage in MiB; file I/O, so call it through [`off_worker`].
    fn storage_mib(&self) -> (u64, u64) {
        inventory::planned_storage_mib(
            self.storage.root(),
            self.config.storage_capacity_gib,
            self.declared.is_some(),
        )
    }

    /// What changes from second to second; file I/O, so call it through [`off_worker`].
    fn status(&self) -> HostStatus {
        let (memory_used_mib, memory_total_mib) = inventory::memory_mib();
        HostStatus {
            cpu_load_percent: lock(&self.cpu).sample_percent(),
            memory_used_mib,
            memory_total_mib,
            storage_free_mib: self.storage_mib().1,
            vms_running: self.runtimes.active_count(),
            uptime_secs: inventory::uptime_secs(),
        }
    }
}

/// Runs `f` on the blocking pool: reading /proc, /sys and the storage dir is file I/O that
/// must not hold a tokio worker.
async fn off_worker<T: Send + 'static>(
    shared: &Arc<Shared>,
    f: impl FnOnce(&Shared) -> T + Send + 'static,
) -> Option<T> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || f(&shared)).await.ok()
}
