//! Image imports through the operator endpoint: the file is where the operator runs ctl,
//! so its bytes follow the `image-import` request on the request's stream. The request is
//! checked before any byte is taken (the role, the name, the size against the console's
//! free storage); the bytes land in a file of their own under `images/uploads`, which the
//! import then takes as it takes a local file (and audits), and which goes afterwards.

use std::{
    io::{Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

use serde_json::Value;

use super::{
    dispatch,
    ops::ImportImage,
    types::{ApiError, Caller, Envelope, Operation},
};
use crate::engine::{Command, EngineHandle, images::library};

/// The largest image taken, as the library takes: 64 TiB.
const MAX_UPLOAD_BYTES: u64 = 64 << 40;
/// Bytes written at once; a block of zeros is skipped, so the file stays sparse.
const BLOCK: usize = 1 << 20;

/// Takes an `image-import` whose bytes follow on `recv` (after `early`, what came behind
/// the request line), and answers as any request.
pub async fn serve_upload(
    engine: &EngineHandle,
    envelope: Envelope,
    caller: &Caller,
    early: Vec<u8>,
    mut recv: quinn::RecvStream,
    mut send: quinn::SendStream,
) {
    let answer = receive_and_import(engine, envelope, caller, early, &mut recv).await;
    // Whatever was not read is not wanted.
    let _ = recv.stop(0u32.into());
    let bytes = serde_json::to_vec(&super::types::Answer::from_result(answer)).unwrap_or_default();
    let _ = send.write_all(&bytes).await;
    let _ = send.finish();
}

async fn receive_and_import(
    engine: &EngineHandle,
    envelope: Envelope,
    caller: &Caller,
    early: Vec<u8>,
    recv: &mut quinn::RecvStream,
) -> Result<Value, ApiError> {
    let mut request: ImportImage = serde_json::from_value(Value::Object(envelope.fields))
        .map_err(|e| ApiError::invalid(format!("bad {} request: {e}", ImportImage::NAME)))?;
    let size = request.upload_bytes.take().unwrap_or(0);
    let answer = |r: Result<super::views::ImageView, ApiError>| {
        r.and_then(|v| serde_json::to_value(v).map_err(|e| ApiError::invalid(e.to_string())))
    };
    // A refusal is audited as any: no byte is taken first.
    if caller.permits(&request, &engine.snapshot()).is_err() {
        return answer(dispatch::run_checked(engine, request, Some(caller)).await);
    }
    if let Some(why) = refusal(engine, &request.name, size).await {
        return Err(ApiError::invalid(why));
    }
    let dir = engine.data_dir().join("images").join("uploads");
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let file = dir.join(format!(
        "upload-{}-{}.part",
        crate::engine::snapshot::unix_ms(std::time::SystemTime::now()),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let received = receive(&dir, &file, size, early, recv).await;
    let result = match received {
        Ok(()) => {
            request.path = file.to_string_lossy().into_owned();
            answer(dispatch::run_checked(engine, request, Some(caller)).await)
        }
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_file(&file);
    result
}

/// Why an upload of `size` bytes as `name` is refused before it starts, if it is.
async fn refusal(engine: &EngineHandle, name: &str, size: u64) -> Option<String> {
    if size == 0 || size > MAX_UPLOAD_BYTES {
        return Some(format!(
            "an image of {size} bytes is out of range (1 byte to 64 TiB)"
        ));
    }
    let taken = engine
        .request(|reply| Command::ListImages { reply })
        .await
        .ok()?
        .iter()
        .any(|r| r.name.as_str() == name);
    if taken {
        return Some(format!(
            "an image named {name} is in the library: delete it first or choose another name"
        ));
    }
    // The upload and the library's copy of it are both on the console's storage for a while.
    let free = library::free_bytes(engine.data_dir()).ok()?;
    (size.saturating_mul(2) > free).then(|| {
        format!(
            "the upload and its copy in the library need {} MiB and the console's storage has {} MiB free",
            size.saturating_mul(2).div_ceil(1 << 20),
            free / (1 << 20)
        )
    })
}

/// Writes the stream's bytes to `file`, sparse; exactly `size` of them, or an error.
async fn receive(
    dir: &Path,
    file: &PathBuf,
    size: u64,
    early: Vec<u8>,
    recv: &mut quinn::RecvStream,
) -> Result<(), ApiError> {
    let io = |e: std::io::Error| ApiError::invalid(format!("keeping the upload: {e}"));
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut out = std::fs::File::create(file).map_err(io)?;
    let mut block = early;
    let mut received = 0u64;
    let mut buf = vec![0u8; BLOCK];
    loop {
        let n = recv
            .read(&mut buf)
            .await
            .map_err(|e| ApiError::invalid(format!("the upload broke: {e}")))?;
        let done = n.is_none();
        if let Some(n) = n {
            block.extend_from_slice(&buf[..n]);
        }
        while block.len() >= BLOCK || (done && !block.is_empty()) {
            let take = block.len().min(BLOCK);
            let chunk: Vec<u8> = block.drain(..take).collect();
            received += chunk.len() as u64;
            if received > size {
                return Err(ApiError::invalid(format!(
                    "the upload sent more than the {size} bytes it announced"
                )));
            }
            if chunk.iter().all(|&b| b == 0) {
                out.seek(SeekFrom::Current(chunk.len() as i64))
                    .map_err(io)?;
            } else {
                out.write_all(&chunk).map_err(io)?;
            }
        }
        if done {
            break;
        }
    }
    if received != size {
        return Err(ApiError::invalid(format!(
            "the upload ended after {received} of its {size} bytes"
        )));
    }
    out.set_len(size).map_err(io)?;
    out.sync_all().map_err(io)?;
    Ok(())
}
