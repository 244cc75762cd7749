//! Console sessions over the control socket: the `vm-console` request is checked and audited
//! as any change, its answer line follows, and then the same connection carries the
//! console's bytes both ways until either end closes it; the session's end is audited with
//! how long it lasted.

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::broadcast::error::RecvError,
};

use super::{
    ops::ConsoleVm,
    session::{Served, open_served},
    types::{Caller, Envelope},
};
use crate::engine::EngineHandle;

/// Serves a `vm-console` request on a connection: `early` is what the client sent after its
/// request line (the first keystrokes), `read` and `write` the connection's halves.
pub async fn serve_session(
    engine: &EngineHandle,
    envelope: Envelope,
    caller: Option<&Caller>,
    early: Vec<u8>,
    mut read: impl AsyncRead + Unpin,
    mut write: impl AsyncWrite + Unpin,
) -> std::io::Result<()> {
    let Some(Served {
        mut attach,
        end: _end,
    }) = open_served::<ConsoleVm>(engine, envelope, caller, &mut write).await?
    else {
        return Ok(());
    };
    write.write_all(&attach.backlog).await?;
    write.flush().await?;
    if let Some(keyboard) = &attach.keyboard
        && !early.is_empty()
    {
        keyboard.send(Bytes::from(early)).await;
    }
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            out = attach.output.recv() => match out {
                Ok(bytes) => {
                    write.write_all(&bytes).await?;
                    write.flush().await?;
                }
                // A viewer that fell behind misses some output, not the session.
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => break,
            },
            typed = read.read(&mut buf) => match typed {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    // A viewer without the keyboard only watches: its keys go nowhere.
                    if let Some(keyboard) = &attach.keyboard
                        && !keyboard.send(Bytes::copy_from_slice(&buf[..n])).await
                    {
                        break;
                    }
                }
            },
        }
    }
    drop(attach);
    let _ = write.shutdown().await;
    // `_end` goes here: the session's end is audited with how long it lasted.
    Ok(())
}
