//! A VM's screen for the console (`OpenScreen`, on a stream of its own): a new connection to
//! the VM's VNC display, made by libvirt, relayed byte for byte to the stream until either
//! end closes. The console speaks RFB through it; the agent never looks inside.

use std::sync::Arc;

use dunes_shared::{
    protocol::{OpenScreen, ScreenOpened},
    rpc::{encode_reply, send_reply},
};
use tokio::io::AsyncWriteExt;

use super::Shared;
use crate::runtime::RuntimeError;

/// Serves one `OpenScreen` stream.
pub(super) async fn serve_screen(
    shared: Arc<Shared>,
    request: OpenScreen,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let opened = match shared.runtimes.vms() {
        Ok(rt) => rt.open_screen(request.name.clone()).await,
        Err(e) => Err(e),
    };
    let display = opened.and_then(|fd| {
        let socket = std::os::unix::net::UnixStream::from(fd);
        socket
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(socket))
            .map_err(|e| RuntimeError::Libvirt {
                action: "taking the screen's socket",
                message: e.to_string(),
            })
    });
    let display = match display {
        Ok(display) => display,
        Err(e) => {
            tracing::info!(vm = %request.name, "screen refused: {e}");
            if let Ok(frame) = encode_reply::<OpenScreen>(Err(e.to_wire())) {
                let _ = send_reply(&mut send, &frame).await;
            }
            return;
        }
    };
    let opened = ScreenOpened {
        protocol: "vnc".into(),
    };
    match encode_reply::<OpenScreen>(Ok(opened)) {
        Ok(frame) if send.write_all(&frame).await.is_ok() => {}
        _ => return,
    }
    tracing::info!(vm = %request.name, "screen attached");
    let (mut from_display, mut to_display) = display.into_split();
    tokio::select! {
        _ = tokio::io::copy(&mut from_display, &mut send) => {}
        _ = tokio::io::copy(&mut recv, &mut to_display) => {}
    }
    let _ = send.finish();
    let _ = to_display.shutdown().await;
    tracing::info!(vm = %request.name, "screen detached");
}
