//! The QUIC endpoint: the TLS setup each connection is offered, a cap on handshakes, and the
//! dispatch of a connection by its ALPN.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc};

use dunes_shared::{
    pki,
    protocol::{ALPN_CONTROL, ALPN_ENROLL, codes},
    transfer::ALPN_TRANSFER,
};

use super::{
    HELLO_TIMEOUT, Shared, control::serve_control, enrollment::serve_enroll, lock,
    transfer::serve_transfer,
};
use crate::identity::AgentIdentity;

const UDP_BUFFER_BYTES: usize = 4 * 1024 * 1024;

pub(super) fn bind_endpoint(
    addr: SocketAddr,
    config: quinn::ServerConfig,
) -> anyhow::Result<quinn::Endpoint> {
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

/// Who may reach a protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reach {
    /// Anyone, while enrollment is open: the peer is not known yet.
    Enrollment,
    /// Once enrolled; the handler checks the peer's cluster certificate.
    Cluster,
}

/// Serves one connection of a protocol.
type Serve = fn(Arc<Shared>, quinn::Connection) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// A protocol the agent serves, by ALPN.
pub(super) struct Protocol {
    pub alpn: &'static [u8],
    pub reach: Reach,
    pub serve: Serve,
}

/// Every protocol the agent serves: a new one (disk transfers, say) is a module of its own
/// and one entry here. Enrollment comes first: rustls agrees on the first of these that the
/// client offers, and only enrolling or probing clients offer it.
pub(super) fn protocols() -> [Protocol; 3] {
    [
        Protocol {
            alpn: ALPN_ENROLL,
            reach: Reach::Enrollment,
            serve: |shared, conn| Box::pin(serve_enroll(shared, conn)),
        },
        Protocol {
            alpn: ALPN_CONTROL,
            reach: Reach::Cluster,
            serve: |shared, conn| Box::pin(serve_control(shared, conn)),
        },
        Protocol {
            alpn: ALPN_TRANSFER,
            reach: Reach::Cluster,
            serve: |shared, conn| Box::pin(serve_transfer(shared, conn)),
        },
    ]
}

/// The server configurations of one identity: with the enrollment protocols and without them.
pub(super) struct TlsConfigs {
    with_enroll: Arc<quinn::ServerConfig>,
    pub(super) control_only: Arc<quinn::ServerConfig>,
}

impl TlsConfigs {
    pub(super) fn new(identity: &AgentIdentity) -> Result<Self, pki::PkiError> {
        let enrolled = identity.is_enrolled();
        let make = |offer_enroll: bool| {
            let mut tls = pki::agent_server_config(
                &identity.tls_identity(),
                identity.ca_der.as_ref(),
                offer_enroll,
            )?;
            tls.alpn_protocols = protocols()
                .iter()
                .filter(|p| match p.reach {
                    Reach::Enrollment => offer_enroll,
                    Reach::Cluster => enrolled,
                })
                .map(|p| p.alpn.to_vec())
                .collect();
            pki::quic_server_config(tls).map(Arc::new)
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

pub(super) async fn accept_loop(shared: Arc<Shared>) {
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
    match protocols()
        .into_iter()
        .find(|p| alpn.as_deref() == Some(p.alpn))
    {
        Some(protocol) => (protocol.serve)(shared, conn).await,
        None => conn.close(codes::CLOSE_BAD_HELLO, b"unknown protocol"),
    }
}
