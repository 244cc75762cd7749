//! The agent's QUIC endpoint: enrollment, the control protocol, and the event stream.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use dunes_shared::{
    codec::{MAX_FRAME_BYTES, PREAUTH_FRAME_BYTES},
    error_chain,
    model::{HostInventory, HostStatus, TemplateName},
    pki::{self, Fingerprint},
    protocol::{
        ALPN_CONTROL, ALPN_ENROLL, AgentEvent, CreateVm, DeleteVm, EnrollBegin, EnrollBeginReply,
        EnrollFinish, ErrorCode, Hello, HelloReply, ListTemplates, ListVms, Request, StartVm,
        StopVm, WireError, codes, features,
    },
    rpc::{
        Incoming, encode_reply, frame_error_code, push_event, read_request, send_reply,
        unsupported_reply,
    },
};
use rustls::pki_types::CertificateDer;
use tokio::sync::broadcast;

use crate::{
    config::AgentConfig,
    identity::AgentIdentity,
    inventory,
    libvirt::{LibvirtRuntime, RuntimeError},
    storage::{Storage, StorageError},
};

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// An enrollment connection is closed after this, finished or not.
const ENROLL_DEADLINE: Duration = Duration::from_secs(10);
/// Enrollment connections served at once; more are closed at once.
const ENROLL_CONCURRENT: usize = 4;
/// TLS handshakes in progress at once; more are refused before any crypto is done.
const HANDSHAKES_CONCURRENT: usize = 64;
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
const UDP_BUFFER_BYTES: usize = 4 * 1024 * 1024;

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
}

struct Shared {
    /// The two TLS setups of the current identity; each connection gets one (see
    /// [`Shared::server_config_now`]).
    tls: Mutex<TlsConfigs>,
    handshakes: Arc<tokio::sync::Semaphore>,
    enroll_slots: Arc<tokio::sync::Semaphore>,
    identity: Mutex<AgentIdentity>,
    runtime: LibvirtRuntime,
    storage: Storage,
    config: AgentConfig,
    events: broadcast::Sender<AgentEvent>,
    endpoint: quinn::Endpoint,
    libvirt_uri: String,
    cpu: Mutex<inventory::CpuLoad>,
    vms_running: AtomicU32,
    /// Bumped by every enrollment: control connections trusted under the previous one close.
    enrollments: tokio::sync::watch::Sender<u64>,
}

impl RunningAgent {
    /// Opens the data dir and libvirt, binds the endpoint and starts serving.
    pub async fn start(opts: AgentOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&opts.data_dir).map_err(|e| {
            anyhow::anyhow!("cannot create data dir {}: {e}", opts.data_dir.display())
        })?;
        let identity = AgentIdentity::load_or_create(&opts.data_dir, opts.config.host_id.as_ref())?;
        let storage = Storage::open(&opts.data_dir)?;
        storage.ensure_tiny_template(opts.guest_dir.as_deref())?;
        let (events, _) = broadcast::channel(1024);
        let libvirt_uri = crate::libvirt::resolve_uri(&opts.libvirt_uri, &opts.data_dir)?;
        let runtime = {
            let (uri, storage, events) = (libvirt_uri.clone(), storage.clone(), events.clone());
            tokio::task::spawn_blocking(move || LibvirtRuntime::start(&uri, storage, events))
                .await??
        };
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
            runtime,
            storage,
            config: opts.config.clone(),
            events,
            endpoint,
            libvirt_uri,
            cpu: Mutex::new(inventory::CpuLoad::default()),
            vms_running: AtomicU32::new(0),
            enrollments: tokio::sync::watch::Sender::new(0),
        });
        let (host_id, fingerprint) = {
            let id = lock(&shared.identity);
            (id.host_id.clone(), id.fingerprint()?)
        };
        tokio::spawn(accept_loop(shared.clone()));
        tokio::spawn(status_loop(shared.clone()));
        Ok(RunningAgent {
            host_id,
            local_addr,
            fingerprint,
            join_token,
            shared,
        })
    }

    /// Stops accepting and closes every connection.
    pub async fn shutdown(&self) {
        self.shared
            .endpoint
            .close(codes::CLOSE_NORMAL, b"agent shutting down");
        self.shared.endpoint.wait_idle().await;
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

fn bind_endpoint(addr: SocketAddr, config: quinn::ServerConfig) -> anyhow::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(addr)
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    // Larger buffers keep disk streams from dropping packets; the kernel may cap them.
    let _ = state.set_recv_buffer_size((&socket).into(), UDP_BUFFER_BYTES);
    let _ = state.set_send_buffer_size((&socket).into(), UDP_BUFFER_BYTES);
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?)
}

/// The server configurations of one identity: with the enrollment ALPN and without it.
struct TlsConfigs {
    with_enroll: Arc<quinn::ServerConfig>,
    control_only: Arc<quinn::ServerConfig>,
}

impl TlsConfigs {
    fn new(identity: &AgentIdentity) -> Result<Self, pki::PkiError> {
        let make = |offer_enroll| {
            pki::agent_server_config(
                &identity.tls_identity(),
                identity.ca_der.as_ref(),
                offer_enroll,
            )
            .and_then(pki::quic_server_config)
            .map(Arc::new)
        };
        Ok(TlsConfigs {
            with_enroll: make(true)?,
            control_only: make(false)?,
        })
    }
}

impl Shared {
    /// What a connection arriving now is offered: enrollment only while the agent is not
    /// enrolled, or a fresh join token is outstanding.
    fn server_config_now(&self) -> Arc<quinn::ServerConfig> {
        let offer = lock(&self.identity).enrollment_open();
        let tls = lock(&self.tls);
        if offer {
            tls.with_enroll.clone()
        } else {
            tls.control_only.clone()
        }
    }
}

async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        let remote = incoming.remote_address();
        // Refused before any crypto: a flood of handshakes cannot take the agent's CPU.
        let Ok(slot) = shared.handshakes.clone().try_acquire_owned() else {
            tracing::warn!(%remote, "too many handshakes in progress; connection refused");
            incoming.refuse();
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let config = {
                let shared = shared.clone();
                match tokio::task::spawn_blocking(move || shared.server_config_now()).await {
                    Ok(c) => c,
                    Err(_) => return,
                }
            };
            let connecting = match incoming.accept_with(config) {
                Ok(c) => c,
                Err(e) => {
                    tracing::info!(%remote, "connection refused: {e}");
                    return;
                }
            };
            let handshake = tokio::time::timeout(HELLO_TIMEOUT, connecting).await;
            drop(slot);
            match handshake {
                Ok(Ok(conn)) => serve_connection(shared, conn).await,
                Ok(Err(e)) => tracing::info!(%remote, "handshake refused: {e}"),
                Err(_) => tracing::info!(%remote, "handshake timed out"),
            }
        });
    }
}

async fn serve_connection(shared: Arc<Shared>, conn: quinn::Connection) {
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol);
    match alpn.as_deref() {
        Some(p) if p == ALPN_CONTROL => serve_control(shared, conn).await,
        Some(p) if p == ALPN_ENROLL => {
            let Ok(_slot) = shared.enroll_slots.clone().try_acquire_owned() else {
                conn.close(codes::CLOSE_BUSY, b"too many enrollments at once");
                return;
            };
            // Unauthenticated peers get a deadline, finished or not.
            if tokio::time::timeout(ENROLL_DEADLINE, serve_enroll(shared, conn.clone()))
                .await
                .is_err()
            {
                conn.close(codes::CLOSE_TIMEOUT, b"enrollment took too long");
            }
        }
        _ => conn.close(codes::CLOSE_BAD_HELLO, b"unknown protocol"),
    }
}

fn wire(err: RuntimeError) -> WireError {
    let code = match &err {
        RuntimeError::NotFound(_) | RuntimeError::Storage(StorageError::NoTemplate(_)) => {
            ErrorCode::NotFound
        }
        RuntimeError::AlreadyExists(_) | RuntimeError::Storage(StorageError::DiskExists(_)) => {
            ErrorCode::AlreadyExists
        }
        RuntimeError::WrongState { .. } => ErrorCode::Conflict,
        RuntimeError::NoGuest(_) => ErrorCode::Unsupported,
        RuntimeError::Spec(_) => ErrorCode::BadRequest,
        RuntimeError::Storage(_) => ErrorCode::Storage,
        RuntimeError::Libvirt { .. } => ErrorCode::Runtime,
        RuntimeError::WorkerGone => ErrorCode::Internal,
    };
    WireError::new(code, error_chain(&err))
}

impl Shared {
    fn inventory(&self) -> HostInventory {
        let (storage_total_mib, storage_free_mib) = inventory::storage_mib(self.storage.root());
        let node = &self.runtime.node;
        HostInventory {
            host_id: lock(&self.identity).host_id.clone(),
            hostname: inventory::hostname(),
            cpus: node.cpus,
            cpu_model: if self.libvirt_uri.starts_with("test:") {
                node.model.clone()
            } else {
                inventory::cpu_model()
            },
            memory_mib: node.memory_mib,
            storage_total_mib,
            storage_free_mib,
            network: inventory::network_interfaces(),
            runtimes: vec![node.runtime.clone()],
            site: (&self.config.site).into(),
            prices: self.config.prices,
            security_level: self.config.security_level,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    fn status(&self) -> HostStatus {
        let (memory_used_mib, memory_total_mib) = inventory::memory_mib();
        HostStatus {
            cpu_load_percent: lock(&self.cpu).sample_percent(),
            memory_used_mib,
            memory_total_mib,
            storage_free_mib: inventory::storage_mib(self.storage.root()).1,
            vms_running: self.vms_running.load(Ordering::Relaxed),
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

async fn status_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    loop {
        tick.tick().await;
        if let Ok(vms) = shared.runtime.list_vms().await {
            let running = vms.iter().filter(|v| v.state.is_active()).count() as u32;
            shared.vms_running.store(running, Ordering::Relaxed);
        }
        if let Some(status) = off_worker(&shared, Shared::status).await {
            let _ = shared.events.send(AgentEvent::HostStatus(status));
        }
    }
}

/// Control connections: a CA-verified console certificate, then the hello, then requests.
async fn serve_control(shared: Arc<Shared>, conn: quinn::Connection) {
    let peer = conn
        .peer_identity()
        .and_then(|a| a.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|certs| certs.first().cloned());
    // Subscribed before the check: an enrollment that lands after it is seen as a change.
    let mut enrollments = shared.enrollments.subscribe();
    // The handshake verified the chain (when a certificate was sent at all) under the CA of
    // that moment; the role is ours to check, and the CA may have changed since.
    let Some(peer) = peer.filter(|c| console_trusted(&shared, c)) else {
        tracing::warn!(remote = %conn.remote_address(), "control connection without a console certificate from the cluster CA refused");
        conn.close(
            codes::CLOSE_UNAUTHENTICATED,
            b"a console certificate from this cluster's CA is required",
        );
        return;
    };
    let hello = tokio::time::timeout(HELLO_TIMEOUT, async {
        let (mut send, mut recv) = conn.accept_bi().await.ok()?;
        let request = read_request(&mut send, &mut recv, PREAUTH_FRAME_BYTES)
            .await
            .ok()?;
        Some((send, request))
    })
    .await;
    let Ok(Some((
        mut send,
        Incoming::Request(Request::Hello(Hello {
            console_name,
            features: console_features,
        })),
    ))) = hello
    else {
        conn.close(codes::CLOSE_BAD_HELLO, b"expected a hello");
        return;
    };
    // Subscribe before listing, so no change falls between the list and the stream.
    let events = shared.events.subscribe();
    let vms = match shared.runtime.list_vms().await {
        Ok(v) => v,
        Err(e) => {
            let frame = encode_reply::<Hello>(Err(wire(e)));
            if let Ok(frame) = frame {
                let _ = send_reply(&mut send, &frame).await;
            }
            return;
        }
    };
    let Some((inventory, status)) = off_worker(&shared, |s| (s.inventory(), s.status())).await
    else {
        return;
    };
    let reply = HelloReply {
        inventory,
        status,
        vms,
        features: features::announce(features::AGENT),
    };
    match encode_reply::<Hello>(Ok(reply)) {
        Ok(frame) if send_reply(&mut send, &frame).await.is_ok() => {}
        _ => return,
    }
    tracing::info!(remote = %conn.remote_address(), console = %console_name, features = ?console_features, "console connected");
    tokio::spawn(push_events(shared.clone(), conn.clone(), events));
    loop {
        let accepted = tokio::select! {
            accepted = conn.accept_bi() => accepted,
            _ = enrollments.changed() => {
                if console_trusted(&shared, &peer) {
                    continue;
                }
                // Enrolled into another cluster: this console's trust is gone.
                tracing::info!(remote = %conn.remote_address(), "closing a console connection the new enrollment no longer trusts");
                conn.close(codes::CLOSE_UNAUTHENTICATED, b"the agent was enrolled again");
                return;
            }
        };
        let (mut send, mut recv) = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(remote = %conn.remote_address(), "console connection ended: {e}");
                return;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let request = match read_request(&mut send, &mut recv, MAX_FRAME_BYTES).await {
                Ok(Incoming::Request(r)) => r,
                Ok(Incoming::Unknown(kind)) => {
                    tracing::warn!(request = %kind, "a request this agent does not know was refused");
                    if let Ok(frame) = unsupported_reply(&kind) {
                        let _ = send_reply(&mut send, &frame).await;
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!("bad request frame: {}", error_chain(&e));
                    return;
                }
            };
            let kind = request.kind();
            match dispatch(&shared, request).await {
                Ok(frame) => {
                    let _ = send_reply(&mut send, &frame).await;
                }
                Err(e) => {
                    tracing::error!(request = kind, "reply does not encode: {}", error_chain(&e))
                }
            }
        });
    }
}

/// Whether `cert` is a console certificate of the CA the agent is enrolled under now.
fn console_trusted(shared: &Shared, cert: &CertificateDer<'static>) -> bool {
    let ca = lock(&shared.identity).ca_der.clone();
    ca.is_some_and(|ca| pki::verify_console_cert(cert, &ca).is_ok())
}

async fn dispatch(
    shared: &Arc<Shared>,
    request: Request,
) -> Result<Vec<u8>, dunes_shared::codec::FrameError> {
    let rt = &shared.runtime;
    match request {
        Request::ListVms(_) => encode_reply::<ListVms>(rt.list_vms().await.map_err(wire)),
        Request::ListTemplates(_) => encode_reply::<ListTemplates>(
            match off_worker(shared, |s| s.storage.templates()).await {
                Some(listed) => {
                    listed.map_err(|e| WireError::new(ErrorCode::Storage, error_chain(&e)))
                }
                None => Err(WireError::new(
                    ErrorCode::Internal,
                    "the agent is shutting down",
                )),
            },
        ),
        Request::CreateVm(CreateVm { spec, start }) => {
            encode_reply::<CreateVm>(rt.create_vm(spec, start).await.map_err(wire))
        }
        Request::StartVm(StartVm { name }) => {
            encode_reply::<StartVm>(rt.start_vm(name).await.map_err(wire))
        }
        Request::StopVm(StopVm {
            name,
            force,
            timeout_secs,
        }) => {
            let timeout = if timeout_secs == 0 {
                shared.config.stop_timeout_secs
            } else {
                timeout_secs
            };
            encode_reply::<StopVm>(rt.stop_vm(name, force, timeout).await.map_err(wire))
        }
        Request::DeleteVm(DeleteVm { name }) => {
            encode_reply::<DeleteVm>(rt.delete_vm(name).await.map_err(wire))
        }
        Request::Hello(_) => encode_reply::<Hello>(Err(WireError::new(
            ErrorCode::BadRequest,
            "hello was already exchanged on this connection",
        ))),
        other => encode_reply::<ListVms>(Err(WireError::new(
            ErrorCode::WrongProtocol,
            format!("{} is not part of the control protocol", other.kind()),
        ))),
    }
}

async fn push_events(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    mut events: broadcast::Receiver<AgentEvent>,
) {
    let Ok(mut stream) = conn.open_uni().await else {
        return;
    };
    loop {
        let event = match events.recv().await {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(_)) => match shared.runtime.list_vms().await {
                // The console fell behind: replace its view instead of replaying.
                Ok(vms) => AgentEvent::VmList(vms),
                Err(_) => continue,
            },
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if push_event(&mut stream, &event).await.is_err() {
            return;
        }
    }
}

fn invalid_token() -> WireError {
    WireError::new(
        ErrorCode::InvalidToken,
        "the join token is wrong, used or older than 24 h; run `dunes-agent token` on the host for a fresh one",
    )
}

/// Enrollment: prove the token, get a CSR signed, install the certificate.
async fn serve_enroll(shared: Arc<Shared>, conn: quinn::Connection) {
    // The CA offered in this connection's first step; the certificate must chain to it.
    let mut offered_ca: Option<CertificateDer<'static>> = None;
    loop {
        let Ok((mut send, mut recv)) = conn.accept_bi().await else {
            return;
        };
        let request = match read_request(&mut send, &mut recv, PREAUTH_FRAME_BYTES).await {
            Ok(Incoming::Request(request)) => request,
            Ok(Incoming::Unknown(kind)) => {
                if let Ok(frame) = unsupported_reply(&kind) {
                    let _ = send_reply(&mut send, &frame).await;
                }
                continue;
            }
            Err(e) => {
                // Before authentication one bad frame ends the connection, with its code.
                if let Some(code) = frame_error_code(&e) {
                    conn.close(code, b"bad frame");
                }
                return;
            }
        };
        let frame =
            match request {
                Request::EnrollBegin(EnrollBegin { token, ca_cert_der }) => {
                    let reply = enroll_begin(&shared, &token, ca_cert_der).map(|(reply, ca)| {
                        offered_ca = Some(ca);
                        reply
                    });
                    encode_reply::<EnrollBegin>(reply)
                }
                Request::EnrollFinish(EnrollFinish { token, cert_der }) => encode_reply::<
                    EnrollFinish,
                >(
                    enroll_finish(&shared, &token, cert_der, offered_ca.as_ref()),
                ),
                other => encode_reply::<EnrollFinish>(Err(WireError::new(
                    ErrorCode::WrongProtocol,
                    format!("{} is not part of enrollment", other.kind()),
                ))),
            };
        match frame {
            Ok(frame) => {
                let _ = send_reply(&mut send, &frame).await;
            }
            Err(_) => return,
        }
    }
}

fn enroll_begin(
    shared: &Shared,
    token: &str,
    ca_cert_der: Vec<u8>,
) -> Result<(EnrollBeginReply, CertificateDer<'static>), WireError> {
    let identity = lock(&shared.identity);
    if !identity.token_matches(token) {
        tracing::warn!("enrollment with a wrong or used token refused");
        return Err(invalid_token());
    }
    if x509_parses(&ca_cert_der).is_none() {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            "the CA certificate does not parse",
        ));
    }
    let csr_der = pki::host_csr(&identity.key_pem, &identity.host_id)
        .map_err(|e| WireError::new(ErrorCode::Internal, error_chain(&e)))?;
    Ok((
        EnrollBeginReply {
            host_id: identity.host_id.clone(),
            csr_der,
        },
        CertificateDer::from(ca_cert_der),
    ))
}

fn x509_parses(der: &[u8]) -> Option<()> {
    pki::cert_dns_names(der).ok().map(|_| ())
}

fn enroll_finish(
    shared: &Shared,
    token: &str,
    cert_der: Vec<u8>,
    offered_ca: Option<&CertificateDer<'static>>,
) -> Result<(), WireError> {
    let mut identity = lock(&shared.identity);
    if !identity.token_matches(token) {
        return Err(invalid_token());
    }
    let Some(ca) = offered_ca else {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            "enrollment must begin before it finishes",
        ));
    };
    let cert = CertificateDer::from(cert_der);
    let bad = |message: String| WireError::new(ErrorCode::BadRequest, message);
    pki::verify_host_cert(&cert, ca, &identity.host_id).map_err(|e| {
        bad(format!(
            "the certificate is not valid for this host: {}",
            error_chain(&e)
        ))
    })?;
    let own = identity.fingerprint().map_err(|e| bad(error_chain(&e)))?;
    if Fingerprint::of_certificate(&cert).ok() != Some(own) {
        return Err(bad("the certificate is for another key".into()));
    }
    let internal = |e: &dyn std::error::Error| WireError::new(ErrorCode::Internal, e.to_string());
    identity
        .install(cert, ca.clone())
        .map_err(|e| internal(&e))?;
    identity.consume_token().map_err(|e| internal(&e))?;
    let tls = TlsConfigs::new(&identity).map_err(|e| internal(&e))?;
    shared
        .endpoint
        .set_server_config(Some((*tls.control_only).clone()));
    *lock(&shared.tls) = tls;
    shared.enrollments.send_modify(|n| *n += 1);
    tracing::info!(host = %identity.host_id, "enrolled; only peers with certificates from the cluster CA are accepted now");
    Ok(())
}
