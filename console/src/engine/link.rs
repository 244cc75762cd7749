//! One task per enrolled host: connect, verify, hello, follow the event stream, reconnect.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use dunes_shared::{
    codec::{Decoded, MAX_FRAME_BYTES, decode_message, read_payload},
    error_chain,
    model::HostId,
    pki::{self, Fingerprint},
    protocol::{AgentEvent, Hello, HelloReply, features},
    rpc::{Peer, call},
};
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};

/// How long one connection attempt, or the hello, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(4);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(3);
/// A connection that lasted less than this counts as a failed attempt: the backoff goes on
/// growing, so an agent that drops every link at once is not hammered.
pub const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// `base` less up to half of it, at random, so that links lost together do not come back in
/// step.
pub fn jittered(base: Duration) -> Duration {
    let mut bytes = [0u8; 4];
    pki::fill_random(&mut bytes);
    let fraction = f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX);
    base.mul_f64(1.0 - 0.5 * fraction)
}

#[derive(Debug)]
pub enum LinkMessage {
    Connected {
        host: HostId,
        peer: Peer,
        hello: Box<HelloReply>,
    },
    Event {
        host: HostId,
        event: AgentEvent,
    },
    /// An event of a kind this release does not know (from a newer agent) was skipped; sent
    /// for the first one of each kind on a connection.
    Skipped {
        host: HostId,
        kind: String,
    },
    Lost {
        host: HostId,
        /// Which connection was lost; a newer one may already be up.
        stable_id: Option<usize>,
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("connection failed")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection failed")]
    Connection(#[from] quinn::ConnectionError),
    #[error("timed out")]
    Timeout,
    #[error("the agent's key changed: pinned {pinned}, presented {presented}")]
    KeyChanged {
        pinned: Fingerprint,
        presented: Fingerprint,
    },
    #[error("the agent presented no certificate")]
    NoCertificate,
    #[error("hello failed")]
    Hello(#[from] dunes_shared::rpc::CallError),
    #[error("the agent reports host {found}, not {expected}")]
    WrongHost { expected: HostId, found: HostId },
}

pub async fn resolve(address: &str) -> Result<SocketAddr, LinkError> {
    tokio::net::lookup_host(address)
        .await
        .ok()
        .and_then(|mut addrs| addrs.find(|a| a.is_ipv4()))
        .ok_or_else(|| LinkError::Resolve(address.to_string()))
}

pub fn peer_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    conn.peer_identity()
        .and_then(|a| a.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|certs| certs.into_iter().next())
}

/// Connects and completes the hello; only then is the connection trusted.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    host: &HostId,
    address: &str,
    pinned: Fingerprint,
) -> Result<(Peer, HelloReply), LinkError> {
    let addr = resolve(address).await?;
    let conn = tokio::time::timeout(
        CONNECT_TIMEOUT,
        endpoint.connect_with(config.clone(), addr, &pki::host_cert_name(host))?,
    )
    .await
    .map_err(|_| LinkError::Timeout)??;
    let cert = peer_certificate(&conn).ok_or(LinkError::NoCertificate)?;
    let presented = Fingerprint::of_certificate(&cert).map_err(|_| LinkError::NoCertificate)?;
    if presented != pinned {
        conn.close(
            dunes_shared::protocol::codes::CLOSE_UNAUTHENTICATED,
            b"key changed",
        );
        return Err(LinkError::KeyChanged { pinned, presented });
    }
    let hello = tokio::time::timeout(
        CONNECT_TIMEOUT,
        call(
            &conn,
            Hello {
                console_name: "dunes-console".into(),
                features: features::announce(features::CONSOLE),
            },
        ),
    )
    .await
    .map_err(|_| LinkError::Timeout)??;
    if &hello.inventory.host_id != host {
        return Err(LinkError::WrongHost {
            expected: host.clone(),
            found: hello.inventory.host_id,
        });
    }
    Ok((Peer::new(conn, &hello.features), hello))
}

/// Keeps a host connected until `stop` changes or the engine goes away.
pub async fn run_link(
    host: HostId,
    mut address: watch::Receiver<String>,
    pinned: Fingerprint,
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    tx: mpsc::Sender<LinkMessage>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let addr = address.borrow_and_update().clone();
        let (reason, stable_id, lasted) =
            match connect(&endpoint, &config, &host, &addr, pinned).await {
                Ok((peer, hello)) => {
                    let up_at = Instant::now();
                    let conn = peer.conn.clone();
                    let stable_id = conn.stable_id();
                    if tx
                        .send(LinkMessage::Connected {
                            host: host.clone(),
                            peer,
                            hello: Box::new(hello),
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let reason = tokio::select! {
                        r = follow_events(&host, &conn, &tx) => r,
                        _ = address.changed() => "the host's address changed".to_string(),
                    };
                    conn.close(dunes_shared::protocol::codes::CLOSE_NORMAL, b"");
                    (reason, Some(stable_id), up_at.elapsed())
                }
                Err(e) => (error_chain(&e), None, Duration::ZERO),
            };
        if tx
            .send(LinkMessage::Lost {
                host: host.clone(),
                stable_id,
                reason,
            })
            .await
            .is_err()
        {
            return;
        }
        let wait = if lasted >= STABLE_CONNECTION {
            // A link that was up a good while is retried at once, as a fresh start.
            backoff = BACKOFF_MIN;
            jittered(BACKOFF_MIN)
        } else {
            let wait = jittered(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
            wait
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = address.changed() => backoff = BACKOFF_MIN,
        }
        if tx.is_closed() {
            return;
        }
    }
}

async fn follow_events(
    host: &HostId,
    conn: &quinn::Connection,
    tx: &mpsc::Sender<LinkMessage>,
) -> String {
    let mut stream = match conn.accept_uni().await {
        Ok(s) => s,
        Err(e) => return error_chain(&e),
    };
    let mut skipped: HashMap<String, u64> = HashMap::new();
    loop {
        let read = match read_payload(&mut stream, MAX_FRAME_BYTES).await {
            Ok(Some(payload)) => decode_message::<AgentEvent>(&payload).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        match read {
            Ok(Some(Decoded::Unknown(kind))) => {
                let count = skipped.entry(kind.clone()).or_default();
                *count += 1;
                if *count == 1 {
                    tracing::warn!(host = %host, event = %kind, "skipping events of a kind this console does not know (a newer agent?)");
                    if tx
                        .send(LinkMessage::Skipped {
                            host: host.clone(),
                            kind,
                        })
                        .await
                        .is_err()
                    {
                        return "engine stopped".into();
                    }
                }
            }
            Ok(Some(Decoded::Known(event))) => {
                if tx
                    .send(LinkMessage::Event {
                        host: host.clone(),
                        event,
                    })
                    .await
                    .is_err()
                {
                    return "engine stopped".into();
                }
            }
            Ok(None) => return "the agent closed its event stream".into(),
            Err(e) => {
                return match conn.close_reason() {
                    Some(reason) => error_chain(&reason),
                    None => error_chain(&e),
                };
            }
        }
    }
}
