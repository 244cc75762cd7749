//! The way to an engine, whichever it is: [`EngineClient`], with one method per operation.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;

use super::{
    dispatch::run_checked,
    ops, remote,
    types::{Answer, ApiError, Envelope, Operation},
};
use crate::engine::EngineHandle;

macro_rules! client_methods {
    ($($method:ident => $op:ident,)*) => {
        impl EngineClient {
            $(
                pub async fn $method(
                    &self,
                    request: ops::$op,
                ) -> Result<<ops::$op as Operation>::Response, ApiError> {
                    self.call(request).await
                }
            )*
        }
    };
}

with_operations!(client_methods);

/// The way to an engine: the one in this process, the one behind a console's control
/// socket on this machine, or one elsewhere through its operator endpoint.
#[derive(Debug, Clone)]
pub enum EngineClient {
    InProcess(EngineHandle),
    Socket {
        path: PathBuf,
        /// How long one request may take, answer included.
        timeout: Duration,
    },
    Remote {
        session: std::sync::Arc<remote::RemoteEngine>,
        timeout: Duration,
    },
}

impl EngineClient {
    /// The control socket of the console running on `data_dir`.
    pub fn local_socket(data_dir: &Path, timeout: Duration) -> EngineClient {
        EngineClient::Socket {
            path: super::socket::socket_path(data_dir),
            timeout,
        }
    }

    /// The engine's snapshot as it changes: the engine's own in this process, or a full
    /// snapshot then deltas from an engine elsewhere (not over the control socket).
    pub async fn snapshots(
        &self,
    ) -> Result<tokio::sync::watch::Receiver<std::sync::Arc<crate::engine::Snapshot>>, ApiError>
    {
        match self {
            EngineClient::InProcess(engine) => Ok(engine.subscribe()),
            EngineClient::Socket { .. } => Err(ApiError::invalid(
                "the control socket answers requests; a window follows an engine in its process or through --connect",
            )),
            EngineClient::Remote { session, .. } => session.watch().await,
        }
    }

    /// Opens a session (a VM's console, its screen). Through `--connect` what it carries
    /// comes on the request's own stream, relayed to the session's `attach` as the engine
    /// in this process gives it.
    pub async fn open_session<O: super::session::SessionOperation>(
        &self,
        request: O,
    ) -> Result<O::Response, ApiError> {
        match self {
            EngineClient::Remote { session, .. } => {
                let streams = session.open_session(&request).await?;
                let mut opened = streams.session;
                O::relay(&mut opened, streams.early, streams.recv, streams.send);
                Ok(opened)
            }
            _ => self.call(request).await,
        }
    }

    /// Imports the image in `file` into the engine's library as `name`: the engine reads a
    /// file on its own machine (the path made absolute here), and through `--connect` the
    /// file on this one goes to it, `progress` hearing the bytes sent.
    pub async fn import_image_file(
        &self,
        name: String,
        file: PathBuf,
        progress: tokio::sync::watch::Sender<(u64, u64)>,
    ) -> Result<super::views::ImageView, ApiError> {
        match self {
            EngineClient::Remote { session, .. } => {
                session
                    .upload_image(&name, &file, |sent, total| {
                        let _ = progress.send((sent, total));
                    })
                    .await
            }
            _ => {
                let path = std::path::absolute(&file).unwrap_or(file);
                self.call(ops::ImportImage {
                    name,
                    path: path.display().to_string(),
                    upload_bytes: None,
                })
                .await
            }
        }
    }

    /// Sends `request` and waits for its response.
    pub async fn call<O: Operation>(&self, request: O) -> Result<O::Response, ApiError> {
        match self {
            EngineClient::InProcess(engine) => run_checked(engine, request, None).await,
            EngineClient::Socket { .. } | EngineClient::Remote { .. } => {
                let envelope = Envelope::new(&request)?;
                let answer = match self {
                    EngineClient::Socket { path, timeout } => {
                        super::socket::exchange(path, &envelope, *timeout).await?
                    }
                    EngineClient::Remote { session, timeout } => {
                        session.exchange(&envelope, *timeout).await?
                    }
                    EngineClient::InProcess(_) => unreachable!("matched above"),
                };
                match answer {
                    Answer { ok: true, data, .. } => {
                        serde_json::from_value(data.unwrap_or(Value::Null)).map_err(|e| {
                            ApiError::unavailable(format!(
                                "the console's answer does not parse: {e}"
                            ))
                        })
                    }
                    Answer { error, .. } => Err(error
                        .unwrap_or_else(|| ApiError::unavailable("the console gave no reason"))),
                }
            }
        }
    }
}
