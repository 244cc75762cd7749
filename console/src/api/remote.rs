//! The engine's API over the network: QUIC with mutual TLS under the cluster CA, ALPN
//! `dunes-operator/1`. An operator's certificate opens a session once its hello is
//! answered; then each request travels on a bidirectional stream of its own, as the JSON of
//! its [`Envelope`], and its [`Answer`] comes back on the same stream. The engine checks the
//! operator's role on every request.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use dunes_shared::{
    model::OperatorName,
    pki::{self, Fingerprint},
};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use super::{Answer, ApiError, ApiErrorCode, Envelope, credential::Credential};
use crate::engine::{
    EngineHandle, Snapshot,
    operators::{Role, access},
};

/// The version of the hello; a newer client's unknown fields are ignored.
const HELLO_VERSION: u32 = 1;
/// Before its hello is answered a connection may send this much, within this long.
const HELLO_BYTES: usize = 4 * 1024;
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes and hellos in progress at once; more are refused before any crypto.
const UNAUTHENTICATED_CONCURRENT: usize = 32;
/// Requests one session may have in flight.
const STREAMS_PER_SESSION: u32 = 64;
/// The largest request (a service file travels in one) and the largest answer.
pub const MAX_REQUEST_BYTES: usize = crate::ctl::MAX_REQUEST_BYTES;
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

mod close {
    use quinn::VarInt;
    pub const DONE: VarInt = VarInt::from_u32(0);
    pub const REFUSED: VarInt = VarInt::from_u32(1);
    pub const REVOKED: VarInt = VarInt::from_u32(2);
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Hello {
    version: u32,
    /// What the client can do beyond the version (none yet).
    #[serde(default)]
    features: Vec<String>,
}

/// The engine's answer to a hello: who it is and who it takes the client for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The engine's name (its data dir's name) and version.
    pub engine: String,
    pub version: String,
    pub operator: OperatorName,
    pub role: String,
    /// What their changes are limited to (`service:shop`); empty: everything.
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub features: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct HelloAnswer {
    #[serde(default)]
    welcome: Option<Welcome>,
    #[serde(default)]
    error: Option<ApiError>,
}

#[derive(Debug, thiserror::Error)]
pub enum OperatorEndpointError {
    #[error("cannot set up the operator endpoint's TLS")]
    Tls(#[from] pki::PkiError),
    #[error("cannot listen for operators on {address}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Who a request comes from, when it comes from an operator.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: OperatorName,
    pub fingerprint: Fingerprint,
    pub role: Role,
    pub scopes: Vec<access::Scope>,
}

impl Caller {
    pub(super) fn check_scope(
        &self,
        action: &str,
        targets: &[access::Target],
    ) -> Result<(), ApiError> {
        access::check_scope(&self.name, self.role, &self.scopes, action, targets).map_err(
            |message| ApiError {
                code: ApiErrorCode::Forbidden,
                message,
            },
        )
    }

    pub(super) fn check(
        &self,
        operation: &str,
        action: &str,
        changes: bool,
    ) -> Result<(), ApiError> {
        access::check(&self.name, self.role, operation, action, changes).map_err(|message| {
            ApiError {
                code: ApiErrorCode::Forbidden,
                message,
            }
        })
    }
}

/// The operator endpoint while it serves; dropping it closes it.
#[derive(Debug)]
pub struct OperatorEndpoint {
    pub address: SocketAddr,
    endpoint: quinn::Endpoint,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OperatorEndpoint {
    fn drop(&mut self) {
        self.task.abort();
        self.endpoint.close(close::DONE, b"the engine stops");
    }
}

fn server_config(
    identity: &pki::Identity,
    ca: &CertificateDer<'static>,
) -> Result<quinn::ServerConfig, pki::PkiError> {
    let mut config = pki::quic_server_config(pki::operator_server_config(identity, ca)?)?;
    let mut transport = pki::transport_config();
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(STREAMS_PER_SESSION));
    transport.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Serves the engine's API to operators on `address` (port 0 picks one).
pub async fn serve(
    engine: EngineHandle,
    address: SocketAddr,
) -> Result<OperatorEndpoint, OperatorEndpointError> {
    let mut identity = engine.identity();
    let config = server_config(&identity.borrow_and_update(), engine.ca_der())?;
    let endpoint = quinn::Endpoint::server(config, address)
        .map_err(|source| OperatorEndpointError::Listen { address, source })?;
    let bound = endpoint
        .local_addr()
        .map_err(|source| OperatorEndpointError::Listen { address, source })?;
    engine.set_operator_address(bound);
    let serving = endpoint.clone();
    let task = tokio::spawn(async move {
        let slots = Arc::new(tokio::sync::Semaphore::new(UNAUTHENTICATED_CONCURRENT));
        loop {
            tokio::select! {
                incoming = serving.accept() => {
                    let Some(incoming) = incoming else { return };
                    // Refused before any crypto: a flood of handshakes cannot take the CPU.
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        tracing::warn!(remote = %incoming.remote_address(), "too many operator handshakes in progress; refused");
                        incoming.refuse();
                        continue;
                    };
                    tokio::spawn(session(engine.clone(), incoming, slot));
                }
                // A renewed console certificate is presented to new connections.
                changed = identity.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let renewed = server_config(&identity.borrow_and_update(), engine.ca_der());
                    match renewed {
                        Ok(config) => serving.set_server_config(Some(config)),
                        Err(e) => tracing::error!("the operator endpoint keeps its old certificate: {}", dunes_shared::error_chain(&e)),
                    }
                }
            }
        }
    });
    Ok(OperatorEndpoint {
        address: bound,
        endpoint,
        task,
    })
}

/// The operator a connection's certificate names, with its key, once the hello says who.
fn peer_operator(
    conn: &quinn::Connection,
    ca: &CertificateDer<'static>,
) -> Result<(OperatorName, Fingerprint), String> {
    let cert = conn
        .peer_identity()
        .and_then(|a| a.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|certs| certs.first().cloned())
        .ok_or("no client certificate")?;
    let name = pki::verify_operator_cert(&cert, ca)
        .map_err(|e| format!("not an operator certificate of this cluster: {e}"))?;
    let fingerprint = Fingerprint::of_certificate(&cert).map_err(|e| e.to_string())?;
    Ok((name, fingerprint))
}

async fn session(
    engine: EngineHandle,
    incoming: quinn::Incoming,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    let remote = incoming.remote_address();
    let Ok(connecting) = incoming.accept() else {
        return;
    };
    let admitted = tokio::time::timeout(HELLO_TIMEOUT, async {
        let conn = connecting.await.map_err(|e| format!("handshake: {e}"))?;
        let (mut send, mut recv) = conn
            .accept_bi()
            .await
            .map_err(|e| format!("no hello: {e}"))?;
        let hello = recv
            .read_to_end(HELLO_BYTES)
            .await
            .map_err(|e| format!("hello unreadable: {e}"))?;
        let answer = match serde_json::from_slice::<Hello>(&hello) {
            Err(e) => Err(ApiError::invalid(format!("the hello does not parse: {e}"))),
            Ok(_hello) => peer_operator(&conn, engine.ca_der())
                .and_then(|(name, fingerprint)| {
                    let (role, scopes) =
                        access::admit(&engine.operators().borrow(), &name, &fingerprint)?;
                    Ok(Caller {
                        name,
                        fingerprint,
                        role,
                        scopes,
                    })
                })
                .map_err(|message| ApiError {
                    code: ApiErrorCode::Forbidden,
                    message,
                }),
        };
        let reply = match &answer {
            Ok(caller) => HelloAnswer {
                welcome: Some(Welcome {
                    engine: engine_name(&engine),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    operator: caller.name.clone(),
                    role: caller.role.as_str().to_string(),
                    scopes: caller.scopes.iter().map(|s| s.to_string()).collect(),
                    features: Vec::new(),
                }),
                error: None,
            },
            Err(e) => HelloAnswer {
                welcome: None,
                error: Some(e.clone()),
            },
        };
        let bytes = serde_json::to_vec(&reply).unwrap_or_default();
        let _ = send.write_all(&bytes).await;
        let _ = send.finish();
        match answer {
            Ok(caller) => Ok((conn, caller)),
            Err(e) => {
                // Let the refusal reach the client before the connection goes.
                let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
                conn.close(close::REFUSED, e.message.as_bytes());
                Err(e.message)
            }
        }
    })
    .await;
    drop(slot);
    let (conn, caller) = match admitted {
        Ok(Ok(admitted)) => admitted,
        Ok(Err(why)) => {
            tracing::info!(%remote, "operator connection refused: {why}");
            return;
        }
        Err(_) => {
            tracing::info!(%remote, "operator connection refused: no hello in time");
            return;
        }
    };
    tracing::info!(%remote, operator = %caller.name, role = caller.role.as_str(), "operator session opened");
    let mut operators = engine.operators();
    let caller = Arc::new(caller);
    loop {
        tokio::select! {
            stream = conn.accept_bi() => {
                let Ok((send, recv)) = stream else { break };
                tokio::spawn(request(engine.clone(), caller.clone(), send, recv));
            }
            changed = operators.changed() => {
                let admitted = changed.is_ok()
                    && access::admit(&operators.borrow_and_update(), &caller.name, &caller.fingerprint).is_ok();
                if !admitted {
                    tracing::info!(%remote, operator = %caller.name, "operator revoked; session closed");
                    conn.close(close::REVOKED, b"the operator was revoked");
                    break;
                }
            }
        }
    }
}

/// The request that turns its stream into the snapshot's feed.
pub const WATCH: &str = "watch";

async fn request(
    engine: EngineHandle,
    caller: Arc<Caller>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let answer = match recv.read_to_end(MAX_REQUEST_BYTES).await {
        Err(e) => Err(ApiError::invalid(format!("the request is unreadable: {e}"))),
        Ok(bytes) => match serde_json::from_slice::<Envelope>(&bytes) {
            Err(e) => Err(ApiError::invalid(format!("bad request: {e}"))),
            Ok(envelope) if envelope.cmd == WATCH => return feed_snapshots(engine, send).await,
            Ok(envelope) => super::dispatch_as(&engine, envelope, Some(&caller)).await,
        },
    };
    let bytes = serde_json::to_vec(&Answer::from_result(answer)).unwrap_or_default();
    let _ = send.write_all(&bytes).await;
    let _ = send.finish();
}

/// Sends the whole snapshot, then a delta per change, until the watcher or the engine
/// goes; every role may watch.
async fn feed_snapshots(engine: EngineHandle, mut send: quinn::SendStream) {
    use super::feed::{SnapshotFrame, delta, encode, frame_gap};
    let mut snapshots = engine.subscribe();
    let mut last = snapshots.borrow_and_update().clone();
    let Ok(first) = encode(&SnapshotFrame::Full(Snapshot::clone(&last))) else {
        return;
    };
    if send.write_all(&first).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { break },
            // The watcher went away.
            _ = send.stopped() => return,
        }
        // Changes in the gap go in the same frame.
        tokio::time::sleep(frame_gap()).await;
        let now = snapshots.borrow_and_update().clone();
        let Ok(frame) = encode(&SnapshotFrame::Delta(delta(&last, &now))) else {
            break;
        };
        if send.write_all(&frame).await.is_err() {
            return;
        }
        last = now;
    }
    let _ = send.finish();
}

async fn read_frame(recv: &mut quinn::RecvStream) -> Result<super::feed::SnapshotFrame, String> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.map_err(|e| e.to_string())?;
    let len = u32::from_be_bytes(len) as usize;
    if len > super::feed::MAX_FRAME_BYTES {
        return Err(format!("a snapshot frame of {len} bytes is over the limit"));
    }
    let mut body = vec![0; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&body).map_err(|e| format!("a snapshot frame does not parse: {e}"))
}

fn engine_name(engine: &EngineHandle) -> String {
    engine
        .data_dir()
        .file_name()
        .map_or_else(|| "dunes".into(), |n| n.to_string_lossy().into_owned())
}

/// A session with an engine elsewhere, as an operator.
#[derive(Debug)]
pub struct RemoteEngine {
    pub welcome: Welcome,
    /// `host:port` as the credential names it.
    pub address: String,
    connection: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("the credential's key and certificates are unusable")]
    Tls(#[from] pki::PkiError),
    #[error("cannot open a QUIC endpoint")]
    Endpoint(#[source] std::io::Error),
    #[error("cannot reach the engine at {address}: {message}")]
    Unreachable { address: String, message: String },
    #[error("the engine at {address} refused: {message}")]
    Refused { address: String, message: String },
    #[error(
        "the credential's certificate expired on {0}; an admin revokes the operator and adds them again for a new one"
    )]
    Expired(String),
}

impl RemoteEngine {
    /// Connects with an operator's credential and says hello.
    pub async fn connect(credential: &Credential) -> Result<RemoteEngine, ConnectError> {
        let address = credential.engine.clone();
        let resolved = tokio::net::lookup_host(&address)
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| ConnectError::Resolve(address.clone()))?;
        let identity = credential.identity()?;
        let expires = pki::cert_validity(&identity.cert_der)?.expires;
        if expires <= std::time::SystemTime::now() {
            return Err(ConnectError::Expired(crate::engine::snapshot::rfc3339(
                expires,
            )));
        }
        let tls = pki::operator_client_config(&credential.ca_der()?, &identity)?;
        let config = pki::quic_client_config(tls)?;
        let bind: SocketAddr = if resolved.is_ipv6() {
            "[::]:0".parse().expect("literal address")
        } else {
            "0.0.0.0:0".parse().expect("literal address")
        };
        let endpoint = quinn::Endpoint::client(bind).map_err(ConnectError::Endpoint)?;
        let unreachable = |message: String| ConnectError::Unreachable {
            address: address.clone(),
            message,
        };
        let connection = tokio::time::timeout(HELLO_TIMEOUT, async {
            endpoint
                .connect_with(config, resolved, pki::CONSOLE_CERT_NAME)
                .map_err(|e| unreachable(e.to_string()))?
                .await
                .map_err(|e| unreachable(e.to_string()))
        })
        .await
        .map_err(|_| unreachable("no answer in time".into()))??;
        let hello = tokio::time::timeout(HELLO_TIMEOUT, async {
            let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
            let hello = serde_json::to_vec(&Hello {
                version: HELLO_VERSION,
                features: Vec::new(),
            })
            .map_err(|e| e.to_string())?;
            send.write_all(&hello).await.map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            let bytes = recv
                .read_to_end(HELLO_BYTES)
                .await
                .map_err(|e| e.to_string())?;
            serde_json::from_slice::<HelloAnswer>(&bytes).map_err(|e| e.to_string())
        })
        .await
        .map_err(|_| unreachable("no hello in time".into()))?
        .map_err(unreachable)?;
        match hello {
            HelloAnswer {
                welcome: Some(welcome),
                ..
            } => Ok(RemoteEngine {
                welcome,
                address,
                connection,
                _endpoint: endpoint,
            }),
            HelloAnswer { error, .. } => Err(ConnectError::Refused {
                address,
                message: error.map_or_else(|| "no reason given".into(), |e| e.message),
            }),
        }
    }

    /// Sends one request and reads its answer.
    pub(super) async fn exchange(
        &self,
        envelope: &Envelope,
        timeout: Duration,
    ) -> Result<Answer, ApiError> {
        let lost = |message: String| ApiError {
            code: ApiErrorCode::Unavailable,
            message: format!(
                "the link to the engine at {} failed: {message}",
                self.address
            ),
        };
        let exchange = async {
            let (mut send, mut recv) = self
                .connection
                .open_bi()
                .await
                .map_err(|e| lost(e.to_string()))?;
            let bytes = serde_json::to_vec(envelope).map_err(|e| lost(e.to_string()))?;
            send.write_all(&bytes)
                .await
                .map_err(|e| lost(e.to_string()))?;
            send.finish().map_err(|e| lost(e.to_string()))?;
            let bytes = recv
                .read_to_end(MAX_ANSWER_BYTES)
                .await
                .map_err(|e| lost(e.to_string()))?;
            serde_json::from_slice::<Answer>(&bytes)
                .map_err(|e| lost(format!("the answer does not parse: {e}")))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| lost("no answer in time".into()))?
    }

    /// Renews the credential's certificate over this session when it is two thirds into its
    /// life, and writes the credential back to `path`; answers whether it did.
    pub async fn renew_if_due(
        &self,
        credential: &mut Credential,
        path: &std::path::Path,
    ) -> Result<bool, ApiError> {
        let due = credential
            .renew_at()
            .map_err(|e| ApiError::invalid(format!("the credential's certificate: {e}")))?;
        if std::time::SystemTime::now() < due {
            return Ok(false);
        }
        let csr = pki::operator_csr(&credential.key_pem, &credential.operator)
            .map_err(|e| ApiError::invalid(format!("cannot make a certificate request: {e}")))?;
        let request = super::ops::RenewOperator {
            csr_pem: pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", csr)),
        };
        let answer = self
            .exchange(&Envelope::new(&request)?, Duration::from_secs(60))
            .await?;
        let issued: super::views::OperatorIssuedView = match answer {
            Answer { ok: true, data, .. } => serde_json::from_value(data.unwrap_or_default())
                .map_err(|e| {
                    ApiError::invalid(format!("the renewal's answer does not parse: {e}"))
                })?,
            Answer { error, .. } => {
                return Err(error.unwrap_or_else(|| ApiError::invalid("renewal refused")));
            }
        };
        credential.certificate_pem = issued.certificate_pem;
        credential.ca_pem = issued.ca_pem;
        credential
            .write(path)
            .map_err(|e| ApiError::invalid(dunes_shared::error_chain(&e)))?;
        Ok(true)
    }

    /// The engine's snapshot as it changes: the whole of it first, then a delta per change.
    /// The receiver sees no more changes once the session ends.
    pub async fn watch(&self) -> Result<tokio::sync::watch::Receiver<Arc<Snapshot>>, ApiError> {
        use super::feed::{SnapshotFrame, apply};
        let lost = |message: String| ApiError {
            code: ApiErrorCode::Unavailable,
            message: format!("the snapshot of the engine at {}: {message}", self.address),
        };
        let (mut send, mut recv) = self
            .connection
            .open_bi()
            .await
            .map_err(|e| lost(e.to_string()))?;
        let request = serde_json::to_vec(&Envelope {
            cmd: WATCH.to_string(),
            fields: Default::default(),
        })
        .map_err(|e| lost(e.to_string()))?;
        send.write_all(&request)
            .await
            .map_err(|e| lost(e.to_string()))?;
        send.finish().map_err(|e| lost(e.to_string()))?;
        let first = tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut recv))
            .await
            .map_err(|_| lost("no snapshot in time".into()))?
            .map_err(lost)?;
        let SnapshotFrame::Full(base) = first else {
            return Err(lost("the feed did not start with a whole snapshot".into()));
        };
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(base));
        tokio::spawn(async move {
            // The send side stays open while the feed runs: the engine sees a watcher.
            let _send = send;
            while let Ok(frame) = read_frame(&mut recv).await {
                let next = match frame {
                    SnapshotFrame::Full(whole) => whole,
                    SnapshotFrame::Delta(delta) => apply(&tx.borrow(), delta),
                };
                if tx.send(Arc::new(next)).is_err() {
                    break;
                }
            }
        });
        Ok(rx)
    }

    /// Resolves once the session ends, with why.
    pub async fn closed(&self) -> String {
        self.connection.closed().await.to_string()
    }
}
