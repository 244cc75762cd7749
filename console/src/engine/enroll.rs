//! Enrollment of a new host: prove the join token, pin the key, sign the agent's CSR.

use std::time::Duration;

use dunes_shared::{
    model::HostId,
    pki::{self, Fingerprint},
    protocol::{EnrollBegin, EnrollFinish, codes},
    rpc::{CallError, call},
};

use super::{
    console_pki::ConsolePki,
    link::{LinkError, peer_certificate, resolve},
};

const ENROLL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("invalid address {0:?}: expected HOST:PORT")]
    BadAddress(String),
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
}

impl From<CallError> for EnrollError {
    fn from(e: CallError) -> Self {
        match e.remote() {
            Some(remote) => EnrollError::Refused(remote.message.clone()),
            None => EnrollError::Call(e),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Enrolled {
    pub host_id: HostId,
    pub fingerprint: Fingerprint,
}

/// Checks `HOST:PORT` syntax without resolving.
pub fn validate_address(address: &str) -> Result<(), EnrollError> {
    let bad = || EnrollError::BadAddress(address.to_string());
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(bad());
    }
    Ok(())
}

pub async fn enroll(
    endpoint: &quinn::Endpoint,
    pki: &ConsolePki,
    address: &str,
    token: &str,
    expected: Option<Fingerprint>,
) -> Result<Enrolled, EnrollError> {
    validate_address(address)?;
    tokio::time::timeout(
        ENROLL_TIMEOUT,
        enroll_inner(endpoint, pki, address, token, expected),
    )
    .await
    .map_err(|_| EnrollError::Timeout)?
}

async fn enroll_inner(
    endpoint: &quinn::Endpoint,
    pki: &ConsolePki,
    address: &str,
    token: &str,
    expected: Option<Fingerprint>,
) -> Result<Enrolled, EnrollError> {
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
    let result = async {
        let cert = peer_certificate(&conn).ok_or(EnrollError::Unreachable {
            address: address.to_string(),
            source: LinkError::NoCertificate,
        })?;
        let presented = Fingerprint::of_certificate(&cert)?;
        if let Some(expected) = expected.filter(|e| *e != presented) {
            return Err(EnrollError::FingerprintMismatch {
                expected,
                presented,
            });
        }
        let begin = call(
            &conn,
            EnrollBegin {
                token: token.to_string(),
                ca_cert_der: pki.ca.cert_der().to_vec(),
            },
        )
        .await?;
        let cert = pki.ca.sign_host_csr(&begin.csr_der, &begin.host_id)?;
        // Pinning: the key we sign must be the key that answered the TLS handshake.
        if Fingerprint::of_certificate(&cert)? != presented {
            return Err(EnrollError::KeyMismatch);
        }
        call(
            &conn,
            EnrollFinish {
                token: token.to_string(),
                cert_der: cert.to_vec(),
            },
        )
        .await?;
        Ok(Enrolled {
            host_id: begin.host_id,
            fingerprint: presented,
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
        for ok in ["127.0.0.1:7443", "host-a:1", "[::1]:7443"] {
            assert!(validate_address(ok).is_ok(), "{ok}");
        }
        for bad in ["", "127.0.0.1", ":7443", "h:0", "h:99999", "a b:1", "h:x"] {
            assert!(validate_address(bad).is_err(), "{bad}");
        }
    }
}
