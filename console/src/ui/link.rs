//! The window's way to its engine: the engine in this process, or one elsewhere reached with
//! an operator's credential. A lost session is tried again with a growing pause; each new
//! session starts the snapshot feed with the whole snapshot, so the window catches up on
//! whatever happened meanwhile.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::{oneshot, watch};

use crate::{
    api::{
        ApiError, Caller, EngineClient, Operation,
        credential::Credential,
        remote::{ConnectError, RemoteEngine, Welcome},
    },
    engine::{EngineHandle, Snapshot, operators::access},
};

/// How long one request of the window may take, answer included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest pause between two tries to reach a lost engine.
const MAX_RETRY_SECS: u64 = 30;

/// An answer of the engine on its way to a panel.
pub type Answer<T> = oneshot::Receiver<Result<T, ApiError>>;

/// Takes an answer once it has come.
pub fn take<T>(pending: &mut Option<Answer<T>>) -> Option<Result<T, String>> {
    let rx = pending.as_mut()?;
    let got = match rx.try_recv() {
        Ok(result) => result.map_err(|e| e.message),
        Err(oneshot::error::TryRecvError::Empty) => return None,
        Err(oneshot::error::TryRecvError::Closed) => Err("the engine has stopped".into()),
    };
    *pending = None;
    Some(got)
}

/// Where the window stands with its engine.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkStatus {
    /// The engine runs in this process; the window is its administrator.
    InProcess,
    /// A session with an engine elsewhere, as an operator.
    Connected { address: String, welcome: Welcome },
    /// The session ended. What the window shows is as of `since`; the next try is at
    /// `retry_at`.
    Lost {
        address: String,
        /// Why the session ended.
        why: String,
        /// Why the last try to reach it again failed, once one has.
        last_try: Option<String>,
        since: SystemTime,
        retry_at: Instant,
        attempts: u32,
    },
}

/// The window's engine: its API, its snapshot as it changes, and where it stands.
#[derive(Clone)]
pub struct EngineLink {
    runtime: tokio::runtime::Handle,
    client: watch::Receiver<EngineClient>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    status: watch::Receiver<LinkStatus>,
    /// Who the engine takes the window for; `None`: its local administrator.
    caller: watch::Receiver<Option<Caller>>,
    exports_dir: PathBuf,
    local: Option<EngineHandle>,
}

impl EngineLink {
    /// The engine in this process.
    pub fn in_process(engine: EngineHandle) -> EngineLink {
        fn fixed<T>(value: T) -> watch::Receiver<T> {
            watch::channel(value).1
        }
        EngineLink {
            runtime: engine.runtime().clone(),
            client: fixed(EngineClient::InProcess(engine.clone())),
            snapshots: engine.subscribe(),
            status: fixed(LinkStatus::InProcess),
            caller: fixed(None),
            exports_dir: engine.data_dir().join("exports"),
            local: Some(engine),
        }
    }

    /// Connects to the engine a credential names, and keeps following it from `runtime`:
    /// a lost session is tried again until the window closes. Exports go to
    /// `exports_dir`. The first connection must succeed: its error says why it did not.
    pub async fn connect(
        credential_path: &Path,
        exports_dir: PathBuf,
    ) -> Result<EngineLink, LinkError> {
        let mut credential = Credential::load(credential_path)?;
        let fingerprint = credential_fingerprint(&credential)?;
        let (session, feed) = open_session(&mut credential, credential_path).await?;
        let address = session.address.clone();
        let (client_tx, client) = watch::channel(remote_client(&session));
        let (snapshots_tx, snapshots) = watch::channel(feed.borrow().clone());
        let (status_tx, status) = watch::channel(LinkStatus::Connected {
            address: address.clone(),
            welcome: session.welcome.clone(),
        });
        let (caller_tx, caller) = watch::channel(caller_of(&session.welcome, &fingerprint));
        let follower = Follower {
            credential,
            credential_path: credential_path.to_path_buf(),
            fingerprint,
            client: client_tx,
            snapshots: snapshots_tx,
            status: status_tx,
            caller: caller_tx,
        };
        tokio::spawn(follower.run(session, feed));
        Ok(EngineLink {
            runtime: tokio::runtime::Handle::current(),
            client,
            snapshots,
            status,
            caller,
            exports_dir,
            local: None,
        })
    }

    /// The engine in this process, when it is.
    pub fn local(&self) -> Option<&EngineHandle> {
        self.local.as_ref()
    }

    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    pub fn exports_dir(&self) -> &Path {
        &self.exports_dir
    }

    /// The engine's API as of now (a new session after a reconnection).
    pub fn client(&self) -> EngineClient {
        self.client.borrow().clone()
    }

    /// The newest snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone()
    }

    pub fn status(&self) -> LinkStatus {
        self.status.borrow().clone()
    }

    /// Changes of the snapshot and of the link, to repaint for.
    pub fn watchers(&self) -> (watch::Receiver<Arc<Snapshot>>, watch::Receiver<LinkStatus>) {
        (self.snapshots.clone(), self.status.clone())
    }

    /// Whether the engine would run `request` for this window, and if not why: the same
    /// check the engine makes, so what it would refuse is greyed out.
    pub fn permits<O: Operation>(&self, request: &O, snapshot: &Snapshot) -> Result<(), String> {
        match &*self.caller.borrow() {
            None => Ok(()),
            Some(caller) => caller.permits(request, snapshot).map_err(|e| e.message),
        }
    }

    /// Whether this window's role allows operations of kind `O` at all (before knowing
    /// their targets); if not, why.
    pub fn may<O: Operation>(&self, changes: bool) -> Result<(), String> {
        match &*self.caller.borrow() {
            None => Ok(()),
            Some(caller) => caller
                .check(O::NAME, O::ACTION, changes)
                .map_err(|e| e.message),
        }
    }

    /// Opens a session (a VM's console, its screen) from the runtime, wherever the engine
    /// is.
    pub fn open_session<O: crate::api::session::SessionOperation>(
        &self,
        request: O,
    ) -> Answer<O::Response> {
        let (tx, rx) = oneshot::channel();
        let client = self.client();
        self.runtime.spawn(async move {
            let _ = tx.send(client.open_session(request).await);
        });
        rx
    }

    /// Imports the image in `file` (on this machine when the engine is elsewhere) from the
    /// runtime; the watch hears the bytes sent to an engine elsewhere.
    pub fn import_image(
        &self,
        name: String,
        file: PathBuf,
    ) -> (
        Answer<crate::api::views::ImageView>,
        watch::Receiver<(u64, u64)>,
    ) {
        let (tx, rx) = oneshot::channel();
        let (progress_tx, progress) = watch::channel((0, 0));
        let client = self.client();
        self.runtime.spawn(async move {
            let _ = tx.send(client.import_image_file(name, file, progress_tx).await);
        });
        (rx, progress)
    }

    /// Sends `request` from the runtime; its answer comes back on the channel.
    pub fn ask<O: Operation>(
        &self,
        request: O,
    ) -> oneshot::Receiver<Result<O::Response, ApiError>> {
        let (tx, rx) = oneshot::channel();
        let client = self.client();
        self.runtime.spawn(async move {
            let _ = tx.send(client.call(request).await);
        });
        rx
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Credential(#[from] crate::api::credential::CredentialError),
    #[error("the credential's certificate is unusable")]
    Certificate(#[from] dunes_shared::pki::PkiError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("the engine sends no snapshot: {0}")]
    Feed(String),
}

fn credential_fingerprint(
    credential: &Credential,
) -> Result<dunes_shared::pki::Fingerprint, LinkError> {
    let identity = credential.identity()?;
    Ok(dunes_shared::pki::Fingerprint::of_certificate(
        &identity.cert_der,
    )?)
}

fn remote_client(session: &Arc<RemoteEngine>) -> EngineClient {
    EngineClient::Remote {
        session: session.clone(),
        timeout: REQUEST_TIMEOUT,
    }
}

/// Who the engine said the window is, as its checks see them.
fn caller_of(welcome: &Welcome, fingerprint: &dunes_shared::pki::Fingerprint) -> Option<Caller> {
    let role = access::Role::parse(&welcome.role)?;
    Some(Caller {
        name: welcome.operator.clone(),
        fingerprint: *fingerprint,
        role,
        consoles: welcome
            .consoles
            .unwrap_or_else(|| access::consoles_by_default(role)),
        scopes: welcome
            .scopes
            .iter()
            .filter_map(|s| access::Scope::parse(s).ok())
            .collect(),
    })
}

/// A session and its snapshot feed; the credential is renewed over it when due.
async fn open_session(
    credential: &mut Credential,
    path: &Path,
) -> Result<(Arc<RemoteEngine>, watch::Receiver<Arc<Snapshot>>), LinkError> {
    let session = Arc::new(RemoteEngine::connect(credential).await?);
    if let Err(e) = session.renew_if_due(credential, path).await {
        tracing::warn!("the credential was not renewed: {}", e.message);
    }
    let feed = session
        .watch()
        .await
        .map_err(|e| LinkError::Feed(e.message))?;
    Ok((session, feed))
}

/// The pause before try `attempt` (1, 2, 4 … up to 30 s).
pub fn retry_delay(attempt: u32) -> Duration {
    Duration::from_secs((1u64 << attempt.saturating_sub(1).min(5)).min(MAX_RETRY_SECS))
}

/// Follows a remote engine from the runtime until the window closes.
struct Follower {
    credential: Credential,
    credential_path: PathBuf,
    fingerprint: dunes_shared::pki::Fingerprint,
    client: watch::Sender<EngineClient>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    status: watch::Sender<LinkStatus>,
    caller: watch::Sender<Option<Caller>>,
}

impl Follower {
    async fn run(
        mut self,
        mut session: Arc<RemoteEngine>,
        mut feed: watch::Receiver<Arc<Snapshot>>,
    ) {
        loop {
            let why = self.forward(&session, &mut feed).await;
            tracing::warn!("lost the engine at {}: {why}", session.address);
            let address = session.address.clone();
            let since = SystemTime::now();
            let mut attempts = 0;
            let mut last_try = None;
            loop {
                attempts += 1;
                let delay = retry_delay(attempts);
                self.status.send_replace(LinkStatus::Lost {
                    address: address.clone(),
                    why: why.clone(),
                    last_try: last_try.clone(),
                    since,
                    retry_at: Instant::now() + delay,
                    attempts,
                });
                tokio::time::sleep(delay).await;
                if self.status.is_closed() {
                    // The window is gone.
                    return;
                }
                match open_session(&mut self.credential, &self.credential_path).await {
                    Ok((new_session, new_feed)) => {
                        (session, feed) = (new_session, new_feed);
                        break;
                    }
                    Err(e) => last_try = Some(dunes_shared::error_chain(&e)),
                }
            }
            tracing::info!("reconnected to the engine at {}", session.address);
            self.snapshots
                .send_replace(feed.borrow_and_update().clone());
            self.client.send_replace(remote_client(&session));
            self.caller
                .send_replace(caller_of(&session.welcome, &self.fingerprint));
            self.status.send_replace(LinkStatus::Connected {
                address: session.address.clone(),
                welcome: session.welcome.clone(),
            });
        }
    }

    /// Passes the feed's snapshots on until the session ends; answers why it did.
    async fn forward(
        &self,
        session: &RemoteEngine,
        feed: &mut watch::Receiver<Arc<Snapshot>>,
    ) -> String {
        let closed = session.closed();
        tokio::pin!(closed);
        loop {
            tokio::select! {
                why = &mut closed => {
                    // quinn's word for a peer gone quiet.
                    return match why.as_str() {
                        "timed out" => "it stopped answering".into(),
                        _ => why,
                    };
                }
                changed = feed.changed() => {
                    if changed.is_err() {
                        return "the snapshot feed ended".into();
                    }
                    let next = feed.borrow_and_update().clone();
                    self.snapshots.send_replace(next);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tries_again_after_a_pause_that_doubles_up_to_half_a_minute() {
        let delays: Vec<u64> = (1..=8).map(|a| retry_delay(a).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
    }
}
