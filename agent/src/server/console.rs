//! A VM's serial console for the console (`OpenConsole`, on a stream of its own): the
//! runtime's console pipe relayed to the stream, raw bytes both ways, until either ends.

use std::sync::Arc;

use dunes_shared::{
    protocol::{ConsoleOpened, OpenConsole},
    rpc::{encode_reply, send_reply},
};

use super::Shared;

/// Serves one `OpenConsole` stream.
pub(super) async fn serve_console(
    shared: Arc<Shared>,
    request: OpenConsole,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let opened = match shared.runtimes.vms() {
        Ok(rt) => rt.open_console(request.name.clone()).await,
        Err(e) => Err(e),
    };
    let pipe = match opened {
        Ok(pipe) => pipe,
        Err(e) => {
            tracing::info!(vm = %request.name, "console refused: {e}");
            if let Ok(frame) = encode_reply::<OpenConsole>(Err(e.to_wire())) {
                let _ = send_reply(&mut send, &frame).await;
            }
            return;
        }
    };
    let opened = ConsoleOpened {
        device: "serial0".into(),
    };
    match encode_reply::<OpenConsole>(Ok(opened)) {
        Ok(frame) if send.write_all(&frame).await.is_ok() => {}
        _ => return,
    }
    tracing::info!(vm = %request.name, "console attached");
    let (mut output, input) = (pipe.output, pipe.input);
    let guest_to_console = async {
        while let Some(bytes) = output.recv().await {
            if send.write_all(&bytes).await.is_err() {
                return;
            }
        }
        // The console ended (the VM stopped): the stream ends too.
        let _ = send.finish();
    };
    let console_to_guest = async {
        let mut buf = vec![0u8; 4096];
        while let Ok(Some(n)) = recv.read(&mut buf).await {
            if input.send(buf[..n].to_vec()).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = guest_to_console => {}
        () = console_to_guest => {}
    }
    tracing::info!(vm = %request.name, "console detached");
}
