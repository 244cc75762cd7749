//! The control socket's client side: `ctl.sock` in a console's data dir, one JSON request
//! line and one JSON answer line per connection.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

use super::types::{Answer, ApiError, ApiErrorCode, Envelope};

pub const SOCKET_NAME: &str = "ctl.sock";
/// Longest request line accepted (a service file travels in one).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("another console is already running on {0}")]
    AlreadyRunning(String),
    #[error("cannot open the control socket {path}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no console is running on {0} (start dunes-console, or dunes-console --headless)")]
    NotRunning(String),
    #[error("the control socket failed")]
    Io(#[from] std::io::Error),
    #[error("the console's answer does not parse")]
    BadResponse(#[from] serde_json::Error),
}

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

/// Sends one request line to the console behind `path` and reads its answer.
pub async fn exchange(
    path: &Path,
    envelope: &Envelope,
    timeout: Duration,
) -> Result<Answer, ApiError> {
    let failed = |e: CtlError| ApiError {
        code: ApiErrorCode::Unavailable,
        message: e.to_string(),
    };
    let data_dir = path.parent().unwrap_or(path).display().to_string();
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|_| failed(CtlError::NotRunning(data_dir)))?;
    let mut line = serde_json::to_vec(envelope).map_err(|e| failed(e.into()))?;
    line.push(b'\n');
    let exchange = async {
        stream.write_all(&line).await?;
        let mut reader = BufReader::new(stream);
        let mut answer = String::new();
        reader.read_line(&mut answer).await?;
        Ok::<_, CtlError>(serde_json::from_str::<Answer>(&answer)?)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| {
            failed(CtlError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the console did not answer in time",
            )))
        })?
        .map_err(failed)
}
