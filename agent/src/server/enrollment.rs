//! Enrollment: prove the join token, get a CSR signed, install the certificate. Reached only
//! over the enrollment ALPN, with small frames, a deadline and a cap on connections at once.

use std::sync::Arc;

use dunes_shared::{
    codec::PREAUTH_FRAME_BYTES,
    error_chain,
    pki::{self, Fingerprint},
    protocol::{EnrollBegin, EnrollBeginReply, EnrollFinish, ErrorCode, Request, WireError, codes},
    rpc::{Incoming, encode_reply, frame_error_code, read_request, send_reply, unsupported_reply},
};
use rustls::pki_types::CertificateDer;

use super::{
    ENROLL_DEADLINE, Shared, control::shutting_down, endpoint::TlsConfigs, lock, off_worker,
};

fn invalid_token() -> WireError {
    WireError::new(
        ErrorCode::InvalidToken,
        "the join token is wrong, used or older than 24 h; run `dunes-agent token` on the host for a fresh one",
    )
}

/// Enrollment: prove the token, get a CSR signed, install the certificate.
/// Serves an enrollment connection within the caps on strangers: a few at once, each for a
/// limited time.
pub(super) async fn serve_enroll(shared: Arc<Shared>, conn: quinn::Connection) {
    let Ok(_slot) = shared.enroll_slots.clone().try_acquire_owned() else {
        conn.close(codes::CLOSE_BUSY, b"too many enrollments at once");
        return;
    };
    if tokio::time::timeout(ENROLL_DEADLINE, enroll_steps(shared, conn.clone()))
        .await
        .is_err()
    {
        conn.close(codes::CLOSE_TIMEOUT, b"enrollment took too long");
    }
}

async fn enroll_steps(shared: Arc<Shared>, conn: quinn::Connection) {
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
        let frame = match request {
            // Key material, a CSR and fsyncs under the identity lock: off the workers.
            Request::EnrollBegin(EnrollBegin { token, ca_cert_der }) => {
                let begun = off_worker(&shared, move |s| enroll_begin(s, &token, ca_cert_der))
                    .await
                    .unwrap_or_else(|| Err(shutting_down()));
                let reply = begun.map(|(reply, ca)| {
                    offered_ca = Some(ca);
                    reply
                });
                encode_reply::<EnrollBegin>(reply)
            }
            Request::EnrollFinish(EnrollFinish { token, cert_der }) => {
                let ca = offered_ca.clone();
                encode_reply::<EnrollFinish>(
                    off_worker(&shared, move |s| {
                        enroll_finish(s, &token, cert_der, ca.as_ref())
                    })
                    .await
                    .unwrap_or_else(|| Err(shutting_down())),
                )
            }
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
    install_certificate(shared, &mut identity, CertificateDer::from(cert_der), ca)?;
    identity
        .consume_token()
        .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?;
    shared.enrollments.send_modify(|n| *n += 1);
    tracing::info!(host = %identity.host_id, "enrolled; only peers with certificates from the cluster CA are accepted now");
    Ok(())
}

/// Checks a certificate the console signed (valid now, under `ca`, naming this host, for this
/// agent's key), installs it durably, and offers it to new connections. Live connections go
/// on with what they agreed on.
pub(super) fn install_certificate(
    shared: &Shared,
    identity: &mut crate::identity::AgentIdentity,
    cert: CertificateDer<'static>,
    ca: &CertificateDer<'static>,
) -> Result<(), WireError> {
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
    let tls = TlsConfigs::new(identity).map_err(|e| internal(&e))?;
    shared
        .endpoint
        .set_server_config(Some((*tls.control_only).clone()));
    *lock(&shared.tls) = tls;
    Ok(())
}
