//! The engine's side of the operator endpoint: TLS, the hello, the role of each session,
//! its requests, its snapshot feed, and the end of a revoked operator's sessions.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use dunes_shared::{
    model::OperatorName,
    pki::{self, Fingerprint},
};
use rustls::pki_types::CertificateDer;

use super::hello::{
    HELLO_BYTES, HELLO_TIMEOUT, Hello, HelloAnswer, MAX_REQUEST_BYTES, STREAMS_PER_SESSION,
    UNAUTHENTICATED_CONCURRENT, WATCH, Welcome, close, read_message,
};
use crate::{
    api::{
        console,
        dispatch::dispatch_as,
        feed, ops,
        types::{Answer, ApiError, ApiErrorCode, Caller, Envelope, Operation},
    },
    engine::{EngineHandle, operators::access},
};

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

/// The operator endpoint while it serves; dropping it closes it.
#[derive(Debug)]
pub struct OperatorEndpoint {
    pub address: SocketAddr,
    endpoint: quinn::Endpoint,
    task: tokio::task::JoinHandle<()>,
}

/// What an operator's session is told when the engine stops.
const STOPPING: &[u8] = b"it was stopped";

impl OperatorEndpoint {
    /// Ends every session with a word to its operator, and waits (a little) until they
    /// heard it: a window then says at once that the engine stopped.
    pub async fn close(self) {
        self.task.abort();
        self.endpoint.close(close::DONE, STOPPING);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

impl Drop for OperatorEndpoint {
    fn drop(&mut self) {
        self.task.abort();
        self.endpoint.close(close::DONE, STOPPING);
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
                    let grant = access::admit(&engine.operators().borrow(), &name, &fingerprint)?;
                    Ok(Caller {
                        name,
                        fingerprint,
                        role: grant.role,
                        scopes: grant.scopes,
                        consoles: grant.consoles,
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
                    consoles: Some(caller.consoles),
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

async fn request(
    engine: EngineHandle,
    caller: Arc<Caller>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let answer = match read_message(&mut recv, MAX_REQUEST_BYTES).await {
        Err(e) => Err(ApiError::invalid(format!("the request is unreadable: {e}"))),
        Ok((bytes, early)) => match serde_json::from_slice::<Envelope>(&bytes) {
            Err(e) => Err(ApiError::invalid(format!("bad request: {e}"))),
            Ok(envelope) if envelope.cmd == WATCH => return feed_snapshots(engine, send).await,
            // A console session goes on, on this stream, after its answer line.
            Ok(envelope) if envelope.cmd == <ops::ConsoleVm as Operation>::NAME => {
                let _ = console::serve_session(&engine, envelope, Some(&caller), early, recv, send)
                    .await;
                return;
            }
            // So does a screen session.
            Ok(envelope) if envelope.cmd == <ops::ScreenVm as Operation>::NAME => {
                let _ = super::super::screen::serve_session(
                    &engine,
                    envelope,
                    Some(&caller),
                    early,
                    recv,
                    send,
                )
                .await;
                return;
            }
            // An image's bytes follow its import request.
            Ok(envelope)
                if envelope.cmd == <ops::ImportImage as Operation>::NAME
                    && envelope.fields.contains_key("upload_bytes") =>
            {
                return super::super::upload::serve_upload(
                    &engine, envelope, &caller, early, recv, send,
                )
                .await;
            }
            Ok(envelope) => dispatch_as(&engine, envelope, Some(&caller)).await,
        },
    };
    let bytes = serde_json::to_vec(&Answer::from_result(answer)).unwrap_or_default();
    let _ = send.write_all(&bytes).await;
    let _ = send.finish();
}

/// Sends the engine's snapshot as it changes, until the watcher or the engine goes; every
/// role may watch.
async fn feed_snapshots(engine: EngineHandle, send: quinn::SendStream) {
    feed::send_feed(engine.subscribe(), send).await;
}

fn engine_name(engine: &EngineHandle) -> String {
    engine
        .data_dir()
        .file_name()
        .map_or_else(|| "dunes".into(), |n| n.to_string_lossy().into_owned())
}
