//! The QUIC endpoint: the TLS setup each connection is offered, a cap on handshakes, and the
//! dispatch of a connection by its ALPN.

use std::{net::SocketAddr, sync::Arc};

use dunes_shared::{
    pki,
    protocol::{ALPN_CONTROL, ALPN_ENROLL, codes},
};

use super::{
    ENROLL_DEADLINE, HELLO_TIMEOUT, Shared, control::serve_control, enrollment::serve_enroll, lock,
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

/// The server configurations of one identity: with the enrollment ALPN and without it.
pub(super) struct TlsConfigs {
    with_enroll: Arc<quinn::ServerConfig>,
    pub(super) control_only: Arc<quinn::ServerConfig>,
}

impl TlsConfigs {
    pub(super) fn new(identity: &AgentIdentity) -> Result<Self, pki::PkiError> {
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
