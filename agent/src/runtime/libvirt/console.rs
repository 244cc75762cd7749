//! A running VM's serial console through libvirt's console stream: opened non-blocking, and
//! pumped by a thread of its own between the stream and two channels, so a console never
//! holds one of the runtime's call permits while it is open.

use std::{
    os::fd::{FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

use tokio::sync::mpsc::{self, error::TryRecvError};
use virt::{domain::Domain, stream::Stream, sys};

use super::{Inner, lv};
use crate::runtime::{ConsolePipe, RuntimeError};
use dunes_shared::model::{VmName, VmState};

/// Chunks of output waiting for the agent's stream, at most.
const OUTPUT_QUEUE: usize = 64;
/// Keystrokes waiting for the guest, at most.
const INPUT_QUEUE: usize = 64;
/// How long the pump sleeps when neither side had anything: a keystroke's echo comes back
/// within about this.
const IDLE: Duration = Duration::from_millis(10);
/// What `virStreamRecv` and `virStreamSend` answer on a non-blocking stream with nothing to do.
const WOULD_BLOCK: isize = -2;

impl Inner {
    /// The domain of the running (or paused) VM `name`; `hint` ends the refusal otherwise.
    fn running_domain(&self, name: &VmName, hint: &'static str) -> Result<Domain, RuntimeError> {
        let dom: Domain = self.lookup(name)?;
        match self.state_of(name)? {
            VmState::Running | VmState::Paused => Ok(dom),
            state => Err(RuntimeError::WrongState {
                name: name.clone(),
                state,
                hint,
            }),
        }
    }

    /// Opens the console stream of the running VM `name`, taking it over from any earlier
    /// session (a console has one reader at libvirt; the console fans it out).
    pub(super) fn open_console(&self, name: &VmName) -> Result<Stream, RuntimeError> {
        let dom = self.running_domain(name, "start it to open its console")?;
        let stream =
            Stream::new(&self.conn, sys::VIR_STREAM_NONBLOCK).map_err(lv("opening a stream"))?;
        dom.open_console(None, &stream, sys::VIR_DOMAIN_CONSOLE_FORCE)
            .map_err(lv("opening the console"))?;
        Ok(stream)
    }

    /// A new client connection to the running VM `name`'s VNC display, made by libvirt as a
    /// socket pair (the display listens nowhere); each viewer gets one of its own.
    pub(super) fn open_screen(&self, name: &VmName) -> Result<OwnedFd, RuntimeError> {
        let dom = self.running_domain(name, "start it to see its screen")?;
        let has_screen = dom
            .xml_desc(0)
            .ok()
            .and_then(|xml| super::definition::DomainXml::parse(&xml).ok())
            .is_some_and(|doc| doc.screen);
        if !has_screen {
            return Err(RuntimeError::Unsupported(
                "this VM has no screen: only VMs this release created under QEMU have one",
            ));
        }
        let fd = dom
            .open_graphics_fd(0, 0)
            .map_err(lv("connecting to the screen"))?;
        let fd = RawFd::try_from(fd).map_err(|_| RuntimeError::WorkerGone)?;
        // SAFETY: virDomainOpenGraphicsFD returns a new descriptor that the caller owns;
        // nothing else holds or closes it.
        #[allow(unsafe_code)]
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(fd)
    }
}

/// Starts the pump of an opened console stream.
pub(super) fn pipe(stream: Stream, name: &VmName) -> Result<ConsolePipe, RuntimeError> {
    let (output_tx, output) = mpsc::channel(OUTPUT_QUEUE);
    let (input, input_rx) = mpsc::channel(INPUT_QUEUE);
    std::thread::Builder::new()
        .name(format!("console-{name}"))
        .spawn(move || pump(stream, output_tx, input_rx))
        .map_err(|_| RuntimeError::WorkerGone)?;
    Ok(ConsolePipe { output, input })
}

/// Moves bytes both ways until the console ends (the VM stopped), or both channels' other
/// ends are gone; then the stream is closed.
fn pump(stream: Stream, output: mpsc::Sender<Vec<u8>>, mut input: mpsc::Receiver<Vec<u8>>) {
    let mut buf = vec![0u8; 16 * 1024];
    // Typed bytes not yet taken by the stream, and how far it took them.
    let mut typed: Option<(Vec<u8>, usize)> = None;
    loop {
        let mut busy = false;
        match stream.recv(&mut buf) {
            Ok(n) if n > 0 => {
                busy = true;
                if output.blocking_send(buf[..n as usize].to_vec()).is_err() {
                    break;
                }
            }
            Ok(WOULD_BLOCK) => {}
            // The end of the console, or a broken stream.
            Ok(_) | Err(_) => break,
        }
        if typed.is_none() {
            match input.try_recv() {
                Ok(bytes) => typed = Some((bytes, 0)),
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => break,
            }
        }
        if let Some((bytes, at)) = &mut typed {
            match stream.send(&bytes[*at..]) {
                Ok(n) if n > 0 => {
                    busy = true;
                    *at += n as usize;
                    if *at >= bytes.len() {
                        typed = None;
                    }
                }
                Ok(WOULD_BLOCK) => {}
                Ok(_) | Err(_) => break,
            }
        }
        if output.is_closed() {
            break;
        }
        if !busy {
            std::thread::sleep(IDLE);
        }
    }
    let _ = stream.abort();
}
