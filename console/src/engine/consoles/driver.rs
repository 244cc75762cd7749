//! Opening a VM's console: the agent's stream is opened off the engine's loop, and the
//! console it makes is shared with every later viewer until its VM stops or everyone has
//! left. The relay runs in a task of its own; only its end comes back to the engine.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use dunes_shared::{
    codec::{MAX_FRAME_BYTES, read_frame_limited, write_frame},
    model::{HostId, VmName, VmState},
    protocol::{OpenConsole, Rpc, WireError, features},
};
use tokio::sync::{broadcast, mpsc};

use super::state::{ConsoleAttach, ConsoleSession, INPUT_QUEUE, VIEWER_QUEUE, remember};
use crate::engine::{
    EngineError, Reply,
    actor::{Actor, Internal},
    records::Level,
};

/// How long an agent may take to open a console.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a console nobody watches is looked at, to close it.
const UNWATCHED_CHECK: Duration = Duration::from_secs(2);

/// A console the agent opened, on its way back to the engine.
#[derive(Debug)]
pub(in crate::engine) struct ConsoleStreams {
    pub(in crate::engine) host: HostId,
    pub(in crate::engine) vm: VmName,
    pub(in crate::engine) opened: Result<(quinn::SendStream, quinn::RecvStream), EngineError>,
    pub(in crate::engine) wants_keyboard: bool,
    pub(in crate::engine) reply: Reply<ConsoleAttach>,
}

impl Actor {
    /// Attaches a viewer to `vm`'s console, opening it on its agent first if nobody has.
    pub(in crate::engine) fn open_console(
        &mut self,
        host: HostId,
        vm: VmName,
        wants_keyboard: bool,
        reply: Reply<ConsoleAttach>,
    ) {
        if let Err(e) = self.check_running(&host, &vm, "open its console") {
            let _ = reply.send(Err(e));
            return;
        }
        if let Some(session) = self.consoles.sessions.get(&(host.clone(), vm.clone())) {
            let _ = reply.send(Ok(session.attach(wants_keyboard)));
            return;
        }
        let conn = match self.stream_link(&host, features::SERIAL_CONSOLE, "serial consoles") {
            Ok(conn) => conn,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            let opened = open_stream(&conn, OpenConsole { name: vm.clone() }, "the console", &vm)
                .await
                .map(|(send, recv, _)| (send, recv));
            let _ = internal
                .send(Internal::ConsoleOpened(Box::new(ConsoleStreams {
                    host,
                    vm,
                    opened,
                    wants_keyboard,
                    reply,
                })))
                .await;
        });
    }

    /// Why `vm` on `host` cannot be watched, if it cannot: it must exist and run. `hint`
    /// ends the sentence for a stopped VM ("open its console").
    pub(super) fn check_running(
        &self,
        host: &HostId,
        vm: &VmName,
        hint: &str,
    ) -> Result<(), EngineError> {
        let state = self
            .fleet
            .hosts
            .get(host)
            .and_then(|e| e.view.vm(vm))
            .map(|v| v.state);
        match state {
            None => Err(EngineError::Invalid(format!("{host} has no VM named {vm}"))),
            Some(VmState::Running | VmState::Paused) => Ok(()),
            Some(state) => Err(EngineError::Invalid(format!(
                "VM {vm} is {}: start it to {hint}",
                state.as_str()
            ))),
        }
    }

    /// The link to `host`'s agent for a stream of its own, if the agent offers `feature`
    /// (`what` names it in the refusal: "serial consoles").
    pub(super) fn stream_link(
        &self,
        host: &HostId,
        feature: &str,
        what: &str,
    ) -> Result<quinn::Connection, EngineError> {
        let client = self.fleet.client(host)?;
        if !client.peer.offers(feature) {
            return Err(EngineError::Invalid(format!(
                "host {host}'s agent has no {what}: update it"
            )));
        }
        Ok(client.peer.conn.clone())
    }

    /// The agent opened a console (or did not): it is shared from now on.
    pub(in crate::engine) fn console_opened(&mut self, streams: ConsoleStreams) {
        let ConsoleStreams {
            host,
            vm,
            opened,
            wants_keyboard,
            reply,
        } = streams;
        let key = (host.clone(), vm.clone());
        let (send, recv) = match opened {
            Ok(streams) => streams,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        // Two viewers asked at once: the second stream goes, the first console is shared.
        if let Some(session) = self.consoles.sessions.get(&key) {
            let _ = reply.send(Ok(session.attach(wants_keyboard)));
            return;
        }
        self.consoles.next_id += 1;
        let id = self.consoles.next_id;
        let (output, _) = broadcast::channel(VIEWER_QUEUE);
        let (input, input_rx) = mpsc::channel(INPUT_QUEUE);
        let session = ConsoleSession {
            id,
            output: output.clone(),
            backlog: Arc::default(),
            input,
            keyboard: Arc::default(),
        };
        let attach = session.attach(wants_keyboard);
        let backlog = session.backlog.clone();
        let keyboard = session.keyboard.clone();
        self.consoles.sessions.insert(key, session);
        self.log(
            Level::Info,
            Some(host.clone()),
            format!("console of {vm} opened"),
        );
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            relay(send, recv, output, backlog, keyboard, input_rx).await;
            let _ = internal.send(Internal::ConsoleEnded { host, vm, id }).await;
        });
        let _ = reply.send(Ok(attach));
    }

    /// A console's relay ended: its VM stopped, its link broke, or nobody watches it.
    pub(in crate::engine) fn console_ended(&mut self, host: HostId, vm: VmName, id: u64) {
        let key = (host.clone(), vm.clone());
        if self.consoles.sessions.get(&key).is_some_and(|s| s.id == id) {
            self.consoles.sessions.remove(&key);
            self.log(Level::Info, Some(host), format!("console of {vm} closed"));
        }
    }
}

/// Opens a stream of its own on the agent for `request` (a console or a screen) and reads
/// the agent's answer; the stream is the caller's from then on.
pub(super) async fn open_stream<R: Rpc>(
    conn: &quinn::Connection,
    request: R,
    what: &str,
    vm: &VmName,
) -> Result<(quinn::SendStream, quinn::RecvStream, R::Response), EngineError> {
    let broke = |e: String| EngineError::Invalid(format!("opening {what} of {vm}: {e}"));
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| broke(e.to_string()))?;
    write_frame(&mut send, &request.into())
        .await
        .map_err(|e| broke(e.to_string()))?;
    let answer = tokio::time::timeout(
        OPEN_TIMEOUT,
        read_frame_limited::<_, Result<R::Response, WireError>>(&mut recv, MAX_FRAME_BYTES),
    )
    .await
    .map_err(|_| broke("the agent did not answer".into()))?
    .map_err(|e| broke(e.to_string()))?
    .ok_or_else(|| broke("the agent closed the stream".into()))?;
    match answer {
        Ok(answer) => Ok((send, recv, answer)),
        Err(e) => Err(EngineError::Agent {
            code: e.code,
            message: e.message,
        }),
    }
}

/// Moves a console's bytes: the agent's to every viewer (and the backlog), the keyboard's to
/// the agent, until the agent ends the stream or nobody watches or types any more.
async fn relay(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    output: broadcast::Sender<Bytes>,
    backlog: Arc<std::sync::Mutex<std::collections::VecDeque<u8>>>,
    keyboard: Arc<std::sync::atomic::AtomicBool>,
    mut input: mpsc::Receiver<Bytes>,
) {
    let from_guest = async {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(Some(n)) = recv.read(&mut buf).await {
            remember(&backlog, &buf[..n]);
            // Nobody watching right now is not an error: the backlog keeps it.
            let _ = output.send(Bytes::copy_from_slice(&buf[..n]));
        }
    };
    let to_guest = async {
        while let Some(bytes) = input.recv().await {
            if send.write_all(&bytes).await.is_err() {
                break;
            }
        }
    };
    let unwatched = async {
        loop {
            tokio::time::sleep(UNWATCHED_CHECK).await;
            if output.receiver_count() == 0 && !keyboard.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
        }
    };
    tokio::select! {
        () = from_guest => {}
        () = to_guest => {}
        () = unwatched => {}
    }
    let _ = send.finish();
}
