//! A VM's screen for a viewer elsewhere (the window through `--connect`): the `vm-screen`
//! request is checked and audited as any, its answer line follows, and then the stream
//! carries the screen's pictures to the viewer (each its length as four bytes, big-endian,
//! then a PNG), when it changed and at most one each [`FRAME_GAP`], while the viewer's keys
//! and pointer come the other way, a JSON line each. The session ends when either end closes
//! the stream, and its end is audited with how long it lasted.

use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, BufReader};

use super::{
    ops::ScreenVm,
    session::{Served, open_served},
    types::{Caller, Envelope},
};
use crate::engine::{
    EngineHandle,
    consoles::{ScreenInput, frame::encode_png},
};

/// The shortest time between two pictures sent to one viewer.
pub const FRAME_GAP: Duration = Duration::from_millis(200);
/// The longest input line read from a viewer.
const MAX_INPUT_LINE: u64 = 1024;

/// Serves a `vm-screen` request on a stream: `early` is what the viewer sent after its
/// request line.
pub async fn serve_session(
    engine: &EngineHandle,
    envelope: Envelope,
    caller: Option<&Caller>,
    early: Vec<u8>,
    read: quinn::RecvStream,
    mut write: quinn::SendStream,
) -> std::io::Result<()> {
    let Some(Served { attach, end: _end }) =
        open_served::<ScreenVm>(engine, envelope, caller, &mut write).await?
    else {
        return Ok(());
    };
    let mut frames = attach.frames;
    let keys = attach.input;
    let mut input = BufReader::new(std::io::Cursor::new(early).chain(read));
    let mut typed = String::new();
    // The picture as it is now goes first.
    frames.mark_changed();
    loop {
        tokio::select! {
            changed = frames.changed() => {
                if changed.is_err() {
                    break;
                }
                let frame = frames.borrow_and_update().clone();
                if frame.width == 0 || frame.height == 0 {
                    continue;
                }
                let png = tokio::task::spawn_blocking(move || encode_png(&frame))
                    .await
                    .map_err(std::io::Error::other)?
                    .map_err(std::io::Error::other)?;
                write.write_all(&(png.len() as u32).to_be_bytes()).await?;
                write.write_all(&png).await?;
                tokio::time::sleep(FRAME_GAP).await;
            }
            read = read_input_line(&mut input, &mut typed) => {
                match read {
                    Ok(0) | Err(_) => break,
                    Ok(_) if !typed.ends_with('\n') => break,
                    Ok(_) => {
                        // A viewer who only watches sends nothing that counts.
                        if let (Some(keys), Ok(event)) =
                            (&keys, serde_json::from_str::<ScreenInput>(&typed))
                        {
                            keys.try_send(event);
                        }
                        typed.clear();
                    }
                }
            }
        }
    }
    let _ = write.finish();
    // `_end` goes here: the session's end is audited with how long it lasted.
    Ok(())
}

/// Reads one line of the viewer's input into `typed`, at most [`MAX_INPUT_LINE`] bytes.
async fn read_input_line(
    input: &mut (impl AsyncBufRead + Unpin),
    typed: &mut String,
) -> std::io::Result<usize> {
    input.take(MAX_INPUT_LINE).read_line(typed).await
}
