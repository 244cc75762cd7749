//! One task per enrolled host: connect, verify, hello, follow the event stream, reconnect.

use std::{net::SocketAddr, time::Duration};

use dunes_shared::{
    codec::read_frame_opt,
    error_chain,
    model::HostId,
    pki::{self, Fingerprint},
    protocol::{AgentEvent, Hello, HelloReply, PROTOCOL_VERSION},
    rpc::call,
};
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};

/// How long one connection attempt, or the hello, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(4);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(3);

#[derive(Debug)]
pub enum LinkMessage {
    Connected {
        host: HostId,
        conn: quinn::Connection,
        hello: Box<HelloReply>,
    },
    Event {
        host: HostId,
        event: AgentEvent,
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
) -> Result<(quinn::Connection, HelloReply), LinkError> {
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
                protocol_version: PROTOCOL_VERSION,
                console_name: "dunes-console".into(),
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
    Ok((conn, hello))
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
        match connect(&endpoint, &config, &host, &addr, pinned).await {
            Ok((conn, hello)) => {
                backoff = BACKOFF_MIN;
                let stable_id = conn.stable_id();
                if tx
                    .send(LinkMessage::Connected {
                        host: host.clone(),
                        conn: conn.clone(),
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
                if tx
                    .send(LinkMessage::Lost {
                        host: host.clone(),
                        stable_id: Some(stable_id),
                        reason,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                if tx
                    .send(LinkMessage::Lost {
                        host: host.clone(),
                        stable_id: None,
                        reason: error_chain(&e),
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = address.changed() => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
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
    loop {
        match read_frame_opt::<_, AgentEvent>(&mut stream).await {
            Ok(Some(event)) => {
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
