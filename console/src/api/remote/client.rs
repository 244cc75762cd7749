//! An operator's side of the endpoint: a session with an engine elsewhere.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use dunes_shared::pki;

use super::hello::{
    HELLO_BYTES, HELLO_TIMEOUT, HELLO_VERSION, Hello, HelloAnswer, MAX_ANSWER_BYTES, WATCH,
    Welcome, read_message,
};

/// A session (a console, a screen) opened through the operator endpoint.
#[derive(Debug)]
pub struct SessionStreams<S> {
    pub session: S,
    /// The session's first bytes, read behind the answer.
    pub early: Vec<u8>,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

use crate::{
    api::{
        credential::Credential,
        feed, ops,
        types::{Answer, ApiError, ApiErrorCode, Envelope},
        views,
    },
    engine::Snapshot,
};

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
    pub(in crate::api) async fn exchange(
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

    /// Opens a session (a console, a screen) on a stream of its own: the request line, then
    /// its answer line; on success the stream's halves carry what the session carries
    /// (`api::console`, `api::screen`), after `early`.
    pub async fn open_session<O: crate::api::Operation>(
        &self,
        request: &O,
    ) -> Result<SessionStreams<O::Response>, ApiError> {
        let lost = |message: String| ApiError {
            code: ApiErrorCode::Unavailable,
            message: format!(
                "the link to the engine at {} failed: {message}",
                self.address
            ),
        };
        let (mut send, mut recv) = self
            .connection
            .open_bi()
            .await
            .map_err(|e| lost(e.to_string()))?;
        let mut line =
            serde_json::to_vec(&Envelope::new(request)?).map_err(|e| lost(e.to_string()))?;
        line.push(b'\n');
        send.write_all(&line)
            .await
            .map_err(|e| lost(e.to_string()))?;
        let (answer, early) = read_message(&mut recv, MAX_ANSWER_BYTES)
            .await
            .map_err(lost)?;
        let answer = serde_json::from_slice::<Answer>(&answer)
            .map_err(|e| lost(format!("the answer does not parse: {e}")))?;
        if let Some(error) = answer.error {
            return Err(error);
        }
        let session = serde_json::from_value(answer.data.unwrap_or_default())
            .map_err(|e| lost(format!("the answer does not parse: {e}")))?;
        Ok(SessionStreams {
            session,
            early,
            send,
            recv,
        })
    }

    /// Imports the image in `file` (where this runs) into the engine's library: the request
    /// line, the file's bytes, then the answer. `progress(sent, total)` hears the bytes go.
    pub async fn upload_image(
        &self,
        name: &str,
        file: &std::path::Path,
        progress: impl Fn(u64, u64),
    ) -> Result<crate::api::views::ImageView, ApiError> {
        use tokio::io::AsyncReadExt;
        let lost = |message: String| ApiError {
            code: ApiErrorCode::Unavailable,
            message: format!(
                "the link to the engine at {} failed: {message}",
                self.address
            ),
        };
        let read_err =
            |e: std::io::Error| ApiError::invalid(format!("cannot read {}: {e}", file.display()));
        let mut source = tokio::fs::File::open(file).await.map_err(read_err)?;
        let size = source.metadata().await.map_err(read_err)?.len();
        let request = ops::ImportImage {
            name: name.to_string(),
            path: file.display().to_string(),
            upload_bytes: Some(size),
        };
        let (mut send, mut recv) = self
            .connection
            .open_bi()
            .await
            .map_err(|e| lost(e.to_string()))?;
        let mut line =
            serde_json::to_vec(&Envelope::new(&request)?).map_err(|e| lost(e.to_string()))?;
        line.push(b'\n');
        send.write_all(&line)
            .await
            .map_err(|e| lost(e.to_string()))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut sent = 0u64;
        // A refusal comes before the bytes are taken: the engine stops reading, and the
        // answer says why.
        while sent < size {
            let n = source.read(&mut buf).await.map_err(read_err)?;
            if n == 0 {
                break;
            }
            if send.write_all(&buf[..n]).await.is_err() {
                break;
            }
            sent += n as u64;
            progress(sent, size);
        }
        let _ = send.finish();
        let bytes = recv
            .read_to_end(MAX_ANSWER_BYTES)
            .await
            .map_err(|e| lost(e.to_string()))?;
        let answer = serde_json::from_slice::<Answer>(&bytes)
            .map_err(|e| lost(format!("the answer does not parse: {e}")))?;
        if let Some(error) = answer.error {
            return Err(error);
        }
        serde_json::from_value(answer.data.unwrap_or_default())
            .map_err(|e| lost(format!("the answer does not parse: {e}")))
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
        let request = ops::RenewOperator {
            csr_pem: pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", csr)),
        };
        let answer = self
            .exchange(&Envelope::new(&request)?, Duration::from_secs(60))
            .await?;
        let issued: views::OperatorIssuedView = match answer {
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
        let lost = |message: String| ApiError {
            code: ApiErrorCode::Unavailable,
            message: format!("the snapshot of the engine at {}: {message}", self.address),
        };
        let (mut send, recv) = self
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
        tokio::time::timeout(HELLO_TIMEOUT, feed::receive_feed(send, recv))
            .await
            .map_err(|_| lost("no snapshot in time".into()))?
            .map_err(lost)
    }

    /// Resolves once the session ends, with why.
    pub async fn closed(&self) -> String {
        match self.connection.closed().await {
            // The engine's own word: stopped, revoked, refused.
            quinn::ConnectionError::ApplicationClosed(close) => {
                String::from_utf8_lossy(&close.reason).into_owned()
            }
            other => other.to_string(),
        }
    }
}
