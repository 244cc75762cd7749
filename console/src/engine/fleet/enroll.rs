//! Enrollment of a new host: prove the join token, pin the key, sign the agent's CSR.

use std::time::Duration;

use dunes_shared::{
    codec::PREAUTH_FRAME_BYTES,
    model::HostId,
    pki::{self, Fingerprint},
    protocol::{EnrollBegin, EnrollFinish, codes},
    rpc::{CallError, call_limited},
};

use crate::engine::{
    console_pki::ConsolePki,
    fleet::link::{LinkError, peer_certificate, resolve},
};

const ENROLL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("invalid address {0:?}: expected HOST:PORT")]
    BadAddress(String),
    #[error("IPv6 addresses are not supported yet: use an IPv4 address or a host name, not {0:?}")]
    Ipv6(String),
    #[error("cannot reach {address}")]
    Unreachable {
        address: String,
        #[source]
        source: LinkError,
    },
    #[error("enrollment timed out")]
    Timeout,
    #[error("the agent's fingerprint is {presented}, not the expected {expected}")]
    FingerprintMismatch {
        expected: Fingerprint,
        presented: Fingerprint,
    },
    #[error("{0}")]
    Refused(String),
    #[error("enrollment failed")]
    Call(#[source] CallError),
    #[error("the agent's certificate request is unusable")]
    Csr(#[from] pki::PkiError),
    #[error("the agent's certificate request is for another key than the one it presented")]
    KeyMismatch,
    #[error(
        "host {host} is already enrolled with another key ({enrolled}); to replace it, enroll again with replace"
    )]
    HostIdTaken { host: HostId, enrolled: Fingerprint },
    #[error("another enrollment of host {0} is under way")]
    HostIdBusy(HostId),
    #[error("the engine stopped")]
    EngineGone,
    #[error(
        "the agent is enrolled and offers no enrollment now: run `dunes-agent token` on the host for a fresh token"
    )]
    EnrollmentClosed,
}

/// What enrollment may do with the host id an agent claims. The engine answers through the
/// gate with its live host list, so two agents claiming one id at once cannot both pass:
/// a new agent must not silently take over an enrolled host's id (a cloned machine, say).
#[derive(Default)]
pub struct EnrollPolicy {
    pub(in crate::engine) gate: Option<tokio::sync::mpsc::Sender<GateRequest>>,
    pub replace: bool,
}

impl std::fmt::Debug for EnrollPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollPolicy")
            .field("gated", &self.gate.is_some())
            .field("replace", &self.replace)
            .finish()
    }
}

/// Asks the engine to hold a host id for an enrollment under way.
#[derive(Debug)]
pub(in crate::engine) struct GateRequest {
    pub host_id: HostId,
    pub fingerprint: Fingerprint,
    pub replace: bool,
    pub answer: tokio::sync::oneshot::Sender<Result<HostIdHold, EnrollError>>,
}

/// A host id held for one enrollment; released when dropped, which the engine does only once
/// the enrolled host is in its list.
#[derive(Debug)]
pub struct HostIdHold {
    host_id: HostId,
    held: HeldHostIds,
}

/// Host ids held by enrollments under way; shared so that a hold is released by its drop,
/// wherever that happens, without a message.
pub(in crate::engine) type HeldHostIds =
    std::sync::Arc<std::sync::Mutex<std::collections::HashSet<HostId>>>;

impl HostIdHold {
    /// Holds `host_id`, or returns `None` when another enrollment holds it.
    pub(in crate::engine) fn take(host_id: HostId, held: &HeldHostIds) -> Option<Self> {
        let inserted = held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host_id.clone());
        inserted.then(|| HostIdHold {
            host_id,
            held: held.clone(),
        })
    }
}

impl Drop for HostIdHold {
    fn drop(&mut self) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.host_id);
    }
}

impl From<CallError> for EnrollError {
    fn from(e: CallError) -> Self {
        match e.remote() {
            Some(remote) => EnrollError::Refused(remote.message.clone()),
            None => EnrollError::Call(e),
        }
    }
}

#[derive(Debug)]
pub struct Enrolled {
    pub host_id: HostId,
    pub fingerprint: Fingerprint,
    /// Keeps the id held until the engine has recorded the host.
    pub hold: Option<HostIdHold>,
}

/// Checks `HOST:PORT` syntax without resolving.
pub fn validate_address(address: &str) -> Result<(), EnrollError> {
    let bad = || EnrollError::BadAddress(address.to_string());
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(bad());
    }
    // The console's endpoint is bound to IPv4 and host names resolve to IPv4 only.
    if host.starts_with('[') || host.contains(':') {
        return Err(EnrollError::Ipv6(address.to_string()));
    }
    Ok(())
}

pub async fn enroll(
    endpoint: &quinn::Endpoint,
    pki: &ConsolePki,
    address: &str,
    token: &str,
    expected: Option<Fingerprint>,
    policy: EnrollPolicy,
) -> Result<Enrolled, EnrollError> {
    validate_address(address)?;
    tokio::time::timeout(
        ENROLL_TIMEOUT,
        enroll_inner(endpoint, pki, address, token, expected, policy),
    )
    .await
    .map_err(|_| EnrollError::Timeout)?
}

/// Connects on the enrollment protocol and returns the key the agent presents.
/// Connects for enrollment or a probe: the connection, the key presented, and whether the
/// agent offered enrollment on it.
async fn connect_enroll(
    endpoint: &quinn::Endpoint,
    address: &str,
) -> Result<(quinn::Connection, Fingerprint, bool), EnrollError> {
    let unreachable = |source| EnrollError::Unreachable {
        address: address.to_string(),
        source,
    };
    let addr = resolve(address).await.map_err(unreachable)?;
    let config = pki::quic_client_config(pki::enroll_client_config()?)?;
    let conn = endpoint
        .connect_with(config, addr, "enroll.dunes")
        .map_err(|e| unreachable(e.into()))?
        .await
        .map_err(|e| unreachable(e.into()))?;
    let presented = match peer_certificate(&conn) {
        Some(cert) => Fingerprint::of_certificate(&cert),
        None => {
            conn.close(codes::CLOSE_NORMAL, b"");
            return Err(unreachable(LinkError::NoCertificate));
        }
    };
    let enrolling = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol)
        .is_some_and(|p| p == dunes_shared::protocol::ALPN_ENROLL);
    match presented {
        Ok(fingerprint) => Ok((conn, fingerprint, enrolling)),
        Err(e) => {
            conn.close(codes::CLOSE_NORMAL, b"");
            Err(e.into())
        }
    }
}

/// The key an agent presents, for the operator to compare with what the agent printed before
/// trusting it. Sends nothing but the handshake.
pub async fn probe(endpoint: &quinn::Endpoint, address: &str) -> Result<Fingerprint, EnrollError> {
    validate_address(address)?;
    let (conn, fingerprint, _) =
        tokio::time::timeout(ENROLL_TIMEOUT, connect_enroll(endpoint, address))
            .await
            .map_err(|_| EnrollError::Timeout)??;
    conn.close(codes::CLOSE_NORMAL, b"");
    Ok(fingerprint)
}

async fn enroll_inner(
    endpoint: &quinn::Endpoint,
    pki: &ConsolePki,
    address: &str,
    token: &str,
    expected: Option<Fingerprint>,
    policy: EnrollPolicy,
) -> Result<Enrolled, EnrollError> {
    let (conn, presented, enrolling) = connect_enroll(endpoint, address).await?;
    let result = async {
        if let Some(expected) = expected.filter(|e| *e != presented) {
            return Err(EnrollError::FingerprintMismatch {
                expected,
                presented,
            });
        }
        if !enrolling {
            return Err(EnrollError::EnrollmentClosed);
        }
        let begin = call_limited(
            &conn,
            EnrollBegin {
                token: token.to_string(),
                ca_cert_der: pki.ca.cert_der().to_vec(),
            },
            PREAUTH_FRAME_BYTES,
        )
        .await?;
        // Checked before EnrollFinish, so a refusal leaves the agent's token usable.
        let hold = match &policy.gate {
            Some(gate) => {
                let (answer, answered) = tokio::sync::oneshot::channel();
                gate.send(GateRequest {
                    host_id: begin.host_id.clone(),
                    fingerprint: presented,
                    replace: policy.replace,
                    answer,
                })
                .await
                .map_err(|_| EnrollError::EngineGone)?;
                Some(answered.await.map_err(|_| EnrollError::EngineGone)??)
            }
            None => None,
        };
        let cert = pki.ca.sign_host_csr(&begin.csr_der, &begin.host_id)?;
        // Pinning: the key we sign must be the key that answered the TLS handshake.
        if Fingerprint::of_certificate(&cert)? != presented {
            return Err(EnrollError::KeyMismatch);
        }
        call_limited(
            &conn,
            EnrollFinish {
                token: token.to_string(),
                cert_der: cert.to_vec(),
            },
            PREAUTH_FRAME_BYTES,
        )
        .await?;
        Ok(Enrolled {
            host_id: begin.host_id,
            fingerprint: presented,
            hold,
        })
    }
    .await;
    conn.close(codes::CLOSE_NORMAL, b"");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        for ok in ["127.0.0.1:7443", "host-a:1", "node-1.example.org:7443"] {
            assert!(validate_address(ok).is_ok(), "{ok}");
        }
        for bad in ["", "127.0.0.1", ":7443", "h:0", "h:99999", "a b:1", "h:x"] {
            assert!(validate_address(bad).is_err(), "{bad}");
        }
        for v6 in ["[::1]:7443", "fe80::1:7443"] {
            let err = validate_address(v6).unwrap_err().to_string();
            assert!(
                err.starts_with("IPv6 addresses are not supported yet"),
                "{err}"
            );
        }
    }
}
