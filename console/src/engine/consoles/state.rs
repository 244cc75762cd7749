//! The consoles open now, and a viewer's end of one.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use dunes_shared::model::{HostId, VmName};
use tokio::sync::{broadcast, mpsc};

/// What a console keeps of its latest output for a viewer who joins: 64 KiB.
pub(in crate::engine) const BACKLOG_BYTES: usize = 64 * 1024;
/// Chunks of output a slow viewer may fall behind before it skips some.
pub(in crate::engine) const VIEWER_QUEUE: usize = 256;
/// Keystrokes waiting for the agent's stream.
pub(in crate::engine) const INPUT_QUEUE: usize = 64;

/// A console open on a VM.
#[derive(Debug)]
pub(in crate::engine) struct ConsoleSession {
    /// Tells this session from a later one on the same VM.
    pub(in crate::engine) id: u64,
    pub(in crate::engine) output: broadcast::Sender<Bytes>,
    pub(in crate::engine) backlog: Arc<Mutex<VecDeque<u8>>>,
    pub(in crate::engine) input: mpsc::Sender<Bytes>,
    /// Whether a viewer holds the keyboard.
    pub(in crate::engine) keyboard: Arc<AtomicBool>,
}

impl ConsoleSession {
    /// A new viewer's end: the backlog, the output from now on, and the keyboard if it
    /// wants it and nobody holds it.
    pub(in crate::engine) fn attach(&self, wants_keyboard: bool) -> ConsoleAttach {
        // Subscribed before the backlog is read: nothing falls between the two.
        let output = self.output.subscribe();
        let backlog = lock(&self.backlog).iter().copied().collect();
        let keyboard =
            (wants_keyboard && !self.keyboard.swap(true, Ordering::SeqCst)).then(|| Keyboard {
                input: self.input.clone(),
                held: self.keyboard.clone(),
            });
        ConsoleAttach {
            backlog,
            output,
            keyboard,
            _held_open: None,
        }
    }
}

#[derive(Debug, Default)]
pub(in crate::engine) struct ConsolesState {
    pub(in crate::engine) sessions: BTreeMap<(HostId, VmName), ConsoleSession>,
    pub(in crate::engine) screens: BTreeMap<(HostId, VmName), super::screen::ScreenSession>,
    pub(in crate::engine) next_id: u64,
}

/// A viewer's end of a console.
#[derive(Debug)]
pub struct ConsoleAttach {
    /// What the console showed lately (up to 64 KiB), so a viewer sees the screen it joins.
    pub backlog: Vec<u8>,
    /// The console's output from now on; closed when the console ends.
    pub output: broadcast::Receiver<Bytes>,
    /// The keyboard, for the one viewer who types; `None` for the others.
    pub keyboard: Option<Keyboard>,
    /// For a watcher through `--connect`: the unused way to type that holds its stream open.
    _held_open: Option<mpsc::Sender<Bytes>>,
}

impl ConsoleAttach {
    /// A viewer's end of a console whose bytes travel on a stream of their own (a window
    /// through `--connect`): `early` is what came behind the answer, what arrives after is
    /// the output, and a viewer who types (`typing`) sends its keys on `send`. The stream is
    /// held open as long as this end lives; the engine's session ends when it closes.
    pub fn relayed(
        early: Vec<u8>,
        mut recv: quinn::RecvStream,
        mut send: quinn::SendStream,
        typing: bool,
    ) -> ConsoleAttach {
        let (output_tx, output) = broadcast::channel(VIEWER_QUEUE);
        let (ended_tx, mut ended) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            // Until the engine ends the session, or the viewer has gone (no one to send to).
            while let Ok(Some(n)) = recv.read(&mut buf).await {
                if output_tx.send(Bytes::copy_from_slice(&buf[..n])).is_err() {
                    break;
                }
            }
            drop(ended_tx);
        });
        let (input, mut keys) = mpsc::channel::<Bytes>(INPUT_QUEUE);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    key = keys.recv() => match key {
                        Some(bytes) if send.write_all(&bytes).await.is_ok() => {}
                        _ => break,
                    },
                    _ = &mut ended => break,
                }
            }
            let _ = send.finish();
        });
        let (keyboard, held_open) = if typing {
            let keyboard = Keyboard {
                input,
                held: Arc::new(AtomicBool::new(true)),
            };
            (Some(keyboard), None)
        } else {
            // A watcher types nothing; the sender it keeps holds the stream open.
            (None, Some(input))
        };
        ConsoleAttach {
            backlog: early,
            output,
            keyboard,
            _held_open: held_open,
        }
    }
}

/// The right to type on a console; dropping it gives it back.
#[derive(Debug)]
pub struct Keyboard {
    input: mpsc::Sender<Bytes>,
    held: Arc<AtomicBool>,
}

impl Keyboard {
    /// Types `bytes`; `false` once the console has ended.
    pub async fn send(&self, bytes: Bytes) -> bool {
        self.input.send(bytes).await.is_ok()
    }
}

impl Keyboard {
    /// Types `bytes` without waiting (the window's keys); `false` when the console has
    /// ended or its queue is full.
    pub fn try_send(&self, bytes: Bytes) -> bool {
        self.input.try_send(bytes).is_ok()
    }
}

impl Drop for Keyboard {
    fn drop(&mut self) {
        self.held.store(false, Ordering::SeqCst);
    }
}

pub(in crate::engine) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keeps the last [`BACKLOG_BYTES`] of a console's output.
pub(in crate::engine) fn remember(backlog: &Mutex<VecDeque<u8>>, bytes: &[u8]) {
    let mut kept = lock(backlog);
    kept.extend(bytes.iter().copied());
    let over = kept.len().saturating_sub(BACKLOG_BYTES);
    kept.drain(..over);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_viewer_types_and_the_backlog_keeps_the_latest_output() {
        let (output, _) = broadcast::channel(VIEWER_QUEUE);
        let (input, _input_rx) = mpsc::channel(INPUT_QUEUE);
        let session = ConsoleSession {
            id: 1,
            output,
            backlog: Arc::default(),
            input,
            keyboard: Arc::default(),
        };
        remember(&session.backlog, &vec![b'a'; BACKLOG_BYTES]);
        remember(&session.backlog, b"login: ");
        let first = session.attach(true);
        assert!(first.keyboard.is_some());
        assert_eq!(first.backlog.len(), BACKLOG_BYTES);
        assert!(first.backlog.ends_with(b"aaalogin: "));
        // A second viewer watches; the keyboard is held.
        let second = session.attach(true);
        assert!(second.keyboard.is_none());
        // The first leaves: the next who asks types.
        drop(first);
        assert!(session.attach(true).keyboard.is_some());
        assert!(session.attach(false).keyboard.is_none());
    }
}
