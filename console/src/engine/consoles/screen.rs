//! Opening a VM's screen: the agent hands over a new connection to the VM's VNC display on
//! a stream of its own, and the engine speaks RFB on it (the `vnc-rs` client), keeping the
//! screen's pixels. Every viewer of the VM shares that one session: each gets the latest
//! picture as it changes, and keys and pointer moves from any viewer that may type go to
//! the guest. The session closes when nobody watches any more, or the VM stops.

use std::{sync::Arc, time::Duration};

use dunes_shared::{
    model::{HostId, VmName},
    protocol::{OpenScreen, features},
};
use tokio::sync::{mpsc, watch};
use vnc::{PixelFormat, VncConnector, VncEncoding, VncEvent, X11Event};

use super::{
    driver::open_stream,
    frame::{Framebuffer, ScreenFrame},
};
use crate::engine::{
    EngineError, Reply,
    actor::{Actor, Internal},
    records::Level,
};

/// Keys and pointer moves waiting for the display.
const INPUT_QUEUE: usize = 256;
/// How often the client asks the display for what changed; QEMU answers only when
/// something did.
const REFRESH: Duration = Duration::from_millis(100);
/// How often a screen nobody watches is looked at, to close it.
const UNWATCHED_CHECK: Duration = Duration::from_secs(2);

/// What a viewer sends to a screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum ScreenInput {
    /// An X11 keysym pressed or released.
    Key { keysym: u32, down: bool },
    /// The pointer at a pixel of the screen, with its buttons (bit 0 left, 1 middle, 2 right,
    /// 3 and 4 the wheel up and down).
    Pointer { x: u16, y: u16, buttons: u8 },
}

/// A viewer's end of a screen.
#[derive(Debug)]
pub struct ScreenAttach {
    /// The latest picture; it changes as the screen does, and its sender goes when the
    /// session ends.
    pub frames: watch::Receiver<Arc<ScreenFrame>>,
    /// Keys and the pointer; `None` for a viewer who only watches.
    pub input: Option<ScreenKeys>,
    /// For a viewer through `--connect` who only watches: the unused way to type that holds
    /// its stream open.
    _held_open: Option<mpsc::Sender<ScreenInput>>,
}

impl ScreenAttach {
    /// A viewer's end of a screen whose pictures come on a stream of their own (a window
    /// through `--connect`, from `api::screen`): each picture a frame (its length, then a
    /// PNG), `early` being what came behind the answer; keys and the pointer go back as JSON
    /// lines. The stream stays open as long as this end lives.
    pub fn relayed(
        early: Vec<u8>,
        recv: quinn::RecvStream,
        mut send: quinn::SendStream,
        typing: bool,
    ) -> ScreenAttach {
        use tokio::io::AsyncReadExt;
        let blank = ScreenFrame {
            width: 0,
            height: 0,
            rgba: Vec::new(),
            generation: 0,
        };
        let (frames_tx, frames) = watch::channel(Arc::new(blank));
        let (ended_tx, mut ended) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut pictures = std::io::Cursor::new(early).chain(recv);
            let mut generation = 0u64;
            while let Ok(len) = pictures.read_u32().await {
                if len > super::frame::MAX_PICTURE_BYTES {
                    break;
                }
                let mut png = vec![0u8; len as usize];
                if pictures.read_exact(&mut png).await.is_err() {
                    break;
                }
                generation += 1;
                let decoded =
                    tokio::task::spawn_blocking(move || super::frame::decode_png(&png, generation))
                        .await;
                match decoded {
                    Ok(Ok(frame)) => {
                        if frames_tx.send(Arc::new(frame)).is_err() {
                            break;
                        }
                    }
                    _ => break,
                }
            }
            drop(ended_tx);
        });
        let (input, mut events) = mpsc::channel::<ScreenInput>(INPUT_QUEUE);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = events.recv() => {
                        let Some(event) = event else { break };
                        let mut line = serde_json::to_vec(&event).unwrap_or_default();
                        line.push(b'\n');
                        if send.write_all(&line).await.is_err() {
                            break;
                        }
                    }
                    _ = &mut ended => break,
                }
            }
            let _ = send.finish();
        });
        let (keys, held_open) = if typing {
            let held = Arc::new(std::sync::atomic::AtomicBool::new(true));
            (Some(ScreenKeys { input, held }), None)
        } else {
            (None, Some(input))
        };
        ScreenAttach {
            frames,
            input: keys,
            _held_open: held_open,
        }
    }
}

/// The right to type and point on a screen: one viewer holds it at a time; dropping it gives
/// it back.
#[derive(Debug)]
pub struct ScreenKeys {
    input: mpsc::Sender<ScreenInput>,
    held: Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for ScreenKeys {
    fn drop(&mut self) {
        self.held.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl ScreenKeys {
    /// Sends without waiting (the window's events); `false` when the screen has ended or
    /// its queue is full.
    pub fn try_send(&self, input: ScreenInput) -> bool {
        self.input.try_send(input).is_ok()
    }
}

/// A screen open on a VM.
#[derive(Debug)]
pub(in crate::engine) struct ScreenSession {
    /// Tells this session from a later one on the same VM.
    id: u64,
    frames: watch::Sender<Arc<ScreenFrame>>,
    input: mpsc::Sender<ScreenInput>,
    /// Whether a viewer holds the keys and the pointer.
    keyboard: Arc<std::sync::atomic::AtomicBool>,
}

impl ScreenSession {
    /// A new viewer's end: the pictures, and the keys and pointer if it wants them and
    /// nobody holds them.
    fn attach(&self, wants_input: bool) -> ScreenAttach {
        let free = || {
            !self
                .keyboard
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        };
        ScreenAttach {
            frames: self.frames.subscribe(),
            input: (wants_input && free()).then(|| ScreenKeys {
                input: self.input.clone(),
                held: self.keyboard.clone(),
            }),
            _held_open: None,
        }
    }
}

/// A screen the agent connected, on its way back to the engine.
#[derive(Debug)]
pub(in crate::engine) struct ScreenStreams {
    host: HostId,
    vm: VmName,
    opened: Result<(quinn::SendStream, quinn::RecvStream), EngineError>,
    wants_input: bool,
    reply: Reply<ScreenAttach>,
}

impl Actor {
    /// Attaches a viewer to `vm`'s screen, connecting to it through its agent first if
    /// nobody watches it yet.
    pub(in crate::engine) fn open_screen(
        &mut self,
        host: HostId,
        vm: VmName,
        wants_input: bool,
        reply: Reply<ScreenAttach>,
    ) {
        if let Err(e) = self.check_running(&host, &vm, "see its screen") {
            let _ = reply.send(Err(e));
            return;
        }
        if let Some(session) = self.consoles.screens.get(&(host.clone(), vm.clone())) {
            let _ = reply.send(Ok(session.attach(wants_input)));
            return;
        }
        let conn = match self.stream_link(&host, features::SCREEN, "screens") {
            Ok(conn) => conn,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            let opened = open_stream(&conn, OpenScreen { name: vm.clone() }, "the screen", &vm)
                .await
                .map(|(send, recv, _)| (send, recv));
            let _ = internal
                .send(Internal::ScreenOpened(Box::new(ScreenStreams {
                    host,
                    vm,
                    opened,
                    wants_input,
                    reply,
                })))
                .await;
        });
    }

    /// The agent connected a screen (or did not): it is shared from now on.
    pub(in crate::engine) fn screen_opened(&mut self, streams: ScreenStreams) {
        let ScreenStreams {
            host,
            vm,
            opened,
            wants_input,
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
        if let Some(session) = self.consoles.screens.get(&key) {
            let _ = reply.send(Ok(session.attach(wants_input)));
            return;
        }
        self.consoles.next_id += 1;
        let id = self.consoles.next_id;
        let (frames, _) = watch::channel(Arc::new(ScreenFrame::default()));
        let (input, input_rx) = mpsc::channel(INPUT_QUEUE);
        let session = ScreenSession {
            id,
            frames: frames.clone(),
            input,
            keyboard: Arc::default(),
        };
        let attach = session.attach(wants_input);
        self.consoles.screens.insert(key, session);
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            let ended = speak_rfb(send, recv, frames, input_rx).await;
            let _ = internal
                .send(Internal::ScreenEnded {
                    host,
                    vm,
                    id,
                    error: ended.err(),
                })
                .await;
        });
        let _ = reply.send(Ok(attach));
    }

    /// A screen's session ended: its VM stopped, its link broke, nobody watches it, or the
    /// display spoke in a way the client does not follow.
    pub(in crate::engine) fn screen_ended(
        &mut self,
        host: HostId,
        vm: VmName,
        id: u64,
        error: Option<String>,
    ) {
        let key = (host.clone(), vm.clone());
        if self.consoles.screens.get(&key).is_some_and(|s| s.id == id) {
            self.consoles.screens.remove(&key);
        }
        if let Some(error) = error {
            self.log(
                Level::Warning,
                Some(host),
                format!("the screen of {vm} closed: {error}"),
            );
        }
    }
}

/// Speaks RFB on the agent's stream: the pixels go to `frames`, `input` to the display,
/// until the stream ends, nobody watches, or the display sends what cannot be drawn.
async fn speak_rfb(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    frames: watch::Sender<Arc<ScreenFrame>>,
    mut input: mpsc::Receiver<ScreenInput>,
) -> Result<(), String> {
    let rfb = |e: vnc::VncError| e.to_string();
    let client = VncConnector::new(tokio::io::join(recv, send))
        // The display asks for no password: only libvirt makes its connections.
        .set_auth_method(async { Ok(String::new()) })
        .add_encoding(VncEncoding::Zrle)
        .add_encoding(VncEncoding::CopyRect)
        .add_encoding(VncEncoding::Raw)
        .add_encoding(VncEncoding::DesktopSizePseudo)
        .allow_shared(true)
        .set_pixel_format(PixelFormat::rgba())
        .build()
        .map_err(rfb)?
        .try_start()
        .await
        .map_err(rfb)?
        .finish()
        .map_err(rfb)?;
    let mut framebuffer = Framebuffer::default();
    let mut refresh = tokio::time::interval(REFRESH);
    let mut unwatched = tokio::time::interval(UNWATCHED_CHECK);
    let result = loop {
        tokio::select! {
            event = client.recv_event() => {
                let Ok(event) = event else { break Ok(()) };
                // One picture for everything that arrived together.
                let mut changed = false;
                let mut next = Some(event);
                while let Some(event) = next.take() {
                    if let VncEvent::Error(e) = &event {
                        return Err(e.clone());
                    }
                    changed |= framebuffer.apply(&event).map_err(|e| e.to_string())?;
                    next = client.poll_event().await.ok().flatten();
                }
                if changed {
                    frames.send_replace(framebuffer.snapshot());
                }
            }
            Some(event) = input.recv() => {
                let event = match event {
                    ScreenInput::Key { keysym, down } => X11Event::KeyEvent((keysym, down).into()),
                    ScreenInput::Pointer { x, y, buttons } => {
                        X11Event::PointerEvent((x, y, buttons).into())
                    }
                };
                if client.input(event).await.is_err() {
                    break Ok(());
                }
            }
            _ = refresh.tick() => {
                if client.input(X11Event::Refresh).await.is_err() {
                    break Ok(());
                }
            }
            _ = unwatched.tick() => {
                if frames.receiver_count() == 0 {
                    break Ok(());
                }
            }
        }
    };
    let _ = client.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_viewer_holds_the_keys_of_a_screen_until_it_lets_go() {
        let (frames, _) = watch::channel(Arc::new(ScreenFrame::default()));
        let (input, _input_rx) = mpsc::channel(INPUT_QUEUE);
        let session = ScreenSession {
            id: 1,
            frames,
            input,
            keyboard: Arc::default(),
        };
        let first = session.attach(true);
        assert!(first.input.is_some());
        // A second viewer watches: the keys are held.
        assert!(session.attach(true).input.is_none());
        // One who only watches never takes them.
        drop(first);
        assert!(session.attach(false).input.is_none());
        assert!(session.attach(true).input.is_some());
    }
}
