//! The control socket: `ctl.sock` in the data dir (owner-only), one JSON request line and
//! one JSON answer line per connection, carrying the engine's API ([`crate::api`]). Whoever
//! can open it is the console's local administrator.

use std::{os::unix::fs::PermissionsExt, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

pub use crate::api::socket::{CtlError, MAX_REQUEST_BYTES, SOCKET_NAME, socket_path};
use crate::{
    api::{self, Answer, ApiError, Envelope},
    engine::EngineHandle,
};

/// How long a client gets to send its request line.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the socket (mode 0600) and serves it until the engine stops.
pub async fn serve(engine: EngineHandle) -> Result<tokio::task::JoinHandle<()>, CtlError> {
    let path = socket_path(engine.data_dir());
    let shown = path.display().to_string();
    if path.exists() {
        if UnixStream::connect(&path).await.is_ok() {
            return Err(CtlError::AlreadyRunning(
                engine.data_dir().display().to_string(),
            ));
        }
        // A socket left by a console that died.
        let _ = std::fs::remove_file(&path);
    }
    let listener = UnixListener::bind(&path).map_err(|source| CtlError::Bind {
        path: shown.clone(),
        source,
    })?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        CtlError::Bind {
            path: shown,
            source,
        }
    })?;
    Ok(tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let engine = engine.clone();
            tokio::spawn(async move {
                let _ = serve_one(engine, stream).await;
            });
        }
    }))
}

async fn serve_one(engine: EngineHandle, stream: UnixStream) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(
        read,
        MAX_REQUEST_BYTES as u64,
    ));
    let mut line = String::new();
    // A client that connects and says nothing does not hold a task forever.
    tokio::time::timeout(REQUEST_READ_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let envelope = serde_json::from_str::<Envelope>(&line);
    // A console session goes on, on this connection, after its answer line.
    if let Ok(envelope) = &envelope
        && envelope.cmd == <api::ops::ConsoleVm as api::Operation>::NAME
    {
        let early = reader.buffer().to_vec();
        let read = reader.into_inner().into_inner();
        return api::console::serve_session(&engine, envelope.clone(), None, early, read, write)
            .await;
    }
    let response = Answer::from_result(match envelope {
        Ok(envelope) => api::dispatch(&engine, envelope).await,
        Err(e) => Err(ApiError::invalid(format!("bad request: {e}"))),
    });
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}
