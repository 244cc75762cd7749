//! One task per enrolled host: connect, verify, hello, follow the event stream, reconnect.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use dunes_shared::{
    codec::{Decoded, MAX_FRAME_BYTES, decode_message, read_payload},
    error_chain,
    model::HostId,
    pki::{self, Fingerprint},
    protocol::{AgentEvent, Hello, HelloReply, RenewBegin, RenewFinish, features},
    rpc::{Peer, call},
};
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};

use crate::engine::{EngineError, console_pki::ConsolePki, fleet::client::AgentClient};

/// How long one connection attempt, or the hello, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(4);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(3);
/// The cap for links that drop soon after they come up: an agent that drops every link is
/// tried less and less often, and fills the event log more and more slowly.
const BACKOFF_MAX_FLAPPING: Duration = Duration::from_secs(60);
/// A failed renewal is not tried again sooner than this (less for certificates that short).
const RENEW_RETRY_MIN: Duration = Duration::from_secs(60);
/// Timers that wait for a wall-clock time wake at least this often: a machine that slept
/// does not renew late.
const WALL_CLOCK_CHECK: Duration = Duration::from_secs(60);
/// Kinds of unknown events counted apart; more are counted together as `other`.
const SKIPPED_KINDS_MAX: usize = 32;

/// Why a renewal failed.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error(transparent)]
    Agent(#[from] EngineError),
    #[error("signing the agent's request failed")]
    Sign(#[from] pki::PkiError),
    #[error("the agent asked for a certificate for another key than the pinned one")]
    OtherKey,
}
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
        /// When the certificate the agent presented expires.
        cert_expires: Option<SystemTime>,
    },
    /// The agent's certificate was renewed over the live connection.
    CertRenewed {
        host: HostId,
        expires: SystemTime,
    },
    /// A renewal failed; it is tried again before the certificate expires.
    RenewalFailed {
        host: HostId,
        reason: String,
        expires: SystemTime,
    },
    Event {
        host: HostId,
        event: AgentEvent,
    },
    /// Events of a kind this release does not know (from a newer agent) were skipped: `count`
    /// of them on this connection so far. Sent at the 1st, 2nd, 4th, 8th… of each kind.
    Skipped {
        host: HostId,
        kind: String,
        count: u64,
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

/// What every link task shares.
#[derive(Clone)]
pub struct LinkContext {
    pub endpoint: quinn::Endpoint,
    /// The console's client setup; a renewed console certificate arrives here.
    pub config: watch::Receiver<quinn::ClientConfig>,
    /// Signs renewed host certificates; without it a link renews nothing.
    pub ca: Option<Arc<ConsolePki>>,
    pub tx: mpsc::Sender<LinkMessage>,
}

/// Keeps a host connected until the engine goes away: connects, follows the agent's events,
/// renews its certificate at two thirds of its life, reconnects with backoff.
pub async fn run_link(
    host: HostId,
    mut address: watch::Receiver<String>,
    pinned: Fingerprint,
    ctx: LinkContext,
) {
    let tx = ctx.tx.clone();
    let mut backoff = BACKOFF_MIN;
    loop {
        let addr = address.borrow_and_update().clone();
        let config = ctx.config.borrow().clone();
        let (reason, stable_id, lasted) =
            match connect(&ctx.endpoint, &config, &host, &addr, pinned).await {
                Ok((peer, hello)) => {
                    let up_at = Instant::now();
                    let conn = peer.conn.clone();
                    let stable_id = conn.stable_id();
                    let validity =
                        peer_certificate(&conn).and_then(|c| pki::cert_validity(&c).ok());
                    if tx
                        .send(LinkMessage::Connected {
                            host: host.clone(),
                            peer: peer.clone(),
                            hello: Box::new(hello),
                            cert_expires: validity.map(|v| v.expires),
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let reason = tokio::select! {
                        r = follow_events(&host, &conn, &tx) => r,
                        r = keep_certificate(&host, &peer, pinned, validity, &ctx) => r,
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
            let cap = if stable_id.is_some() {
                BACKOFF_MAX_FLAPPING
            } else {
                BACKOFF_MAX
            };
            backoff = (backoff * 2).min(cap.max(backoff));
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

/// How long from now until `at` (zero when it is past).
fn until(at: SystemTime) -> Duration {
    at.duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}

/// Sleeps until the wall clock reads `at`, looking at it again at least every minute: tokio's
/// timers stand still while the machine sleeps.
pub async fn sleep_until_wall(at: SystemTime) {
    loop {
        let left = until(at);
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(WALL_CLOCK_CHECK)).await;
    }
}

/// Renews the agent's certificate at two thirds of its life, over this connection, for as
/// long as the connection lasts; returns only when the engine is gone.
async fn keep_certificate(
    host: &HostId,
    peer: &Peer,
    pinned: Fingerprint,
    validity: Option<pki::CertValidity>,
    ctx: &LinkContext,
) -> String {
    let (Some(ca), Some(mut validity)) = (ctx.ca.as_ref(), validity) else {
        return std::future::pending().await;
    };
    if !peer.offers(features::CERT_RENEWAL) {
        let _ = ctx
            .tx
            .send(LinkMessage::RenewalFailed {
                host: host.clone(),
                reason: "the agent cannot renew its certificate; update it".into(),
                expires: validity.expires,
            })
            .await;
        return std::future::pending().await;
    }
    let client = AgentClient {
        host: host.clone(),
        peer: peer.clone(),
    };
    let mut renew_at = validity.renew_at();
    let mut failing = false;
    loop {
        sleep_until_wall(renew_at).await;
        let message = match renew(&client, pinned, ca).await {
            Ok(v) => {
                validity = v;
                renew_at = v.renew_at();
                failing = false;
                Some(LinkMessage::CertRenewed {
                    host: host.clone(),
                    expires: v.expires,
                })
            }
            Err(e) => {
                // Tried again after a quarter of what is left, never in a tight loop; told
                // once until it works again.
                let floor = RENEW_RETRY_MIN.min(validity.lifetime() / 10);
                renew_at = SystemTime::now() + (until(validity.expires) / 4).max(floor);
                let first = !failing;
                failing = true;
                first.then(|| LinkMessage::RenewalFailed {
                    host: host.clone(),
                    reason: error_chain(&e),
                    expires: validity.expires,
                })
            }
        };
        if let Some(message) = message
            && ctx.tx.send(message).await.is_err()
        {
            return "engine stopped".into();
        }
    }
}

/// One renewal: the agent's CSR for its pinned key, signed by the CA, installed by the agent.
async fn renew(
    client: &AgentClient,
    pinned: Fingerprint,
    ca: &ConsolePki,
) -> Result<pki::CertValidity, RenewError> {
    let begin = client.call(RenewBegin).await?;
    let cert = ca.ca.sign_host_csr(&begin.csr_der, &client.host)?;
    // The key stays the pinned one: a renewal never changes who the host is.
    if Fingerprint::of_certificate(&cert).ok() != Some(pinned) {
        return Err(RenewError::OtherKey);
    }
    let validity = pki::cert_validity(&cert)?;
    client
        .call(RenewFinish {
            cert_der: cert.to_vec(),
        })
        .await?;
    Ok(validity)
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
                let kind = if skipped.len() >= SKIPPED_KINDS_MAX && !skipped.contains_key(&kind) {
                    "other".to_string()
                } else {
                    kind
                };
                let count = skipped.entry(kind.clone()).or_default();
                *count += 1;
                if count.is_power_of_two() {
                    if *count == 1 {
                        tracing::warn!(host = %host, event = %kind, "skipping events of a kind this console does not know (a newer agent?)");
                    }
                    if tx
                        .send(LinkMessage::Skipped {
                            host: host.clone(),
                            kind,
                            count: *count,
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
