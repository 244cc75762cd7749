//! Library images pushed from the console (`ReceiveImage`, on a stream of its own): received
//! by digest into the incoming directory, resumable, verified chunk by chunk, then kept as a
//! template of the image's name. A host that holds the bytes, under any name, receives
//! nothing: the template is linked to the copy it has.

use std::sync::Arc;

use dunes_shared::{
    codec::write_frame,
    error_chain,
    protocol::{ErrorCode, ImageOffer, ReceiveImage, WireError},
    rpc::encode_reply,
    transfer::TransferFrame,
};

use super::{
    Shared, lock,
    transfer::{Ended, receive_chunks},
};
use crate::{
    storage::{Storage, StorageError},
    transfer::receive::Receiving,
};

/// The largest image a host takes: what the console's library takes.
const MAX_IMAGE_BYTES: u64 = 64 << 40;

/// Holds a digest in [`Shared::receiving_images`] while its push runs.
struct Claim<'a> {
    shared: &'a Shared,
    blake3: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        lock(&self.shared.receiving_images).remove(&self.blake3);
    }
}

/// Tells every console what templates the host holds now (file I/O: off the async workers).
fn announce_inventory(shared: &Shared) {
    let inventory = shared.inventory();
    let _ = shared
        .events
        .send(dunes_shared::protocol::AgentEvent::Inventory(Box::new(
            inventory,
        )));
}

fn storage_error(e: StorageError) -> WireError {
    let code = match e {
        StorageError::TemplateTaken(_) => ErrorCode::Conflict,
        _ => ErrorCode::Storage,
    };
    WireError::new(code, error_chain(&e))
}

/// What the agent does with a push: nothing (it holds the image), or receive from an offset.
enum Plan {
    Held,
    Receive(Receiving),
}

fn plan(storage: &Storage, request: &ReceiveImage) -> Result<Plan, WireError> {
    if let Some(have) = storage.template_with_image(&request.blake3) {
        storage
            .install_image(
                &request.template,
                request.format,
                &request.blake3,
                &have.disk,
                true,
            )
            .map_err(storage_error)?;
        return Ok(Plan::Held);
    }
    if storage.template(&request.template).is_ok() {
        return Err(storage_error(StorageError::TemplateTaken(
            request.template.clone(),
        )));
    }
    let file_name = Storage::incoming_file_name(&request.blake3, request.format);
    Receiving::open(&storage.incoming_dir(), &file_name, request.size_bytes)
        .map(Plan::Receive)
        .map_err(|e| WireError::new(ErrorCode::Storage, error_chain(&e)))
}

fn valid(request: &ReceiveImage) -> Result<(), WireError> {
    let bad = |m: String| Err(WireError::new(ErrorCode::BadRequest, m));
    if request.blake3.len() != 64 || !request.blake3.bytes().all(|b| b.is_ascii_hexdigit()) {
        return bad("an image digest is 64 hex digits".into());
    }
    if request.size_bytes == 0 || request.size_bytes > MAX_IMAGE_BYTES {
        return bad(format!(
            "an image of {} bytes is out of range (1 byte to 64 TiB)",
            request.size_bytes
        ));
    }
    Ok(())
}

/// How long a new push waits for an earlier push of the same image to let go of it.
const CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves one `ReceiveImage` stream: the offer, then the chunks, then whether the template
/// is there.
pub(super) async fn receive_image(
    shared: Arc<Shared>,
    request: ReceiveImage,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let answer = |result: Result<ImageOffer, WireError>| encode_reply::<ReceiveImage>(result);
    let refuse = |mut send: quinn::SendStream, e: WireError| async move {
        tracing::warn!("image push refused: {}", e.message);
        if let Ok(frame) = answer(Err(e)) {
            let _ = dunes_shared::rpc::send_reply(&mut send, &frame).await;
        }
    };
    if let Err(e) = valid(&request) {
        return refuse(send, e).await;
    }
    // A push the console cut a moment ago may hold the image until its stream's reset
    // reaches this side: wait for it a while before calling the new one a second push.
    let deadline = tokio::time::Instant::now() + CLAIM_WAIT;
    while !lock(&shared.receiving_images).insert(request.blake3.clone()) {
        if tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        }
        let e = WireError::new(
            ErrorCode::Conflict,
            "a push of this image to this host is under way",
        );
        return refuse(send, e).await;
    }
    let _claim = Claim {
        shared: &shared,
        blake3: request.blake3.clone(),
    };
    let planned = {
        let (shared, request) = (shared.clone(), request.clone());
        tokio::task::spawn_blocking(move || {
            let planned = plan(&shared.storage, &request);
            if matches!(planned, Ok(Plan::Held)) {
                announce_inventory(&shared);
            }
            planned
        })
        .await
        .unwrap_or_else(|_| Err(WireError::new(ErrorCode::Internal, "the plan stopped")))
    };
    let receiving = match planned {
        Err(e) => return refuse(send, e).await,
        Ok(Plan::Held) => {
            tracing::info!(template = %request.template, "image held already: nothing to receive");
            let offer = ImageOffer {
                held: true,
                resume_from: request.size_bytes,
            };
            if let Ok(frame) = answer(Ok(offer)) {
                let _ = dunes_shared::rpc::send_reply(&mut send, &frame).await;
            }
            return;
        }
        Ok(Plan::Receive(receiving)) => receiving,
    };
    let resume_from = receiving.resume_from();
    tracing::info!(template = %request.template, size = request.size_bytes, resume_from, "receiving an image");
    let offer = ImageOffer {
        held: false,
        resume_from,
    };
    // The offer is the first frame; the stream stays open for the chunks.
    match answer(Ok(offer)) {
        Ok(frame) if send.write_all(&frame).await.is_ok() => {}
        _ => return,
    }
    let what = format!("image {}", request.template);
    let frame = match receive_chunks(&mut send, recv, receiving, &what).await {
        Ended::Cut => return,
        Ended::Failed(detail) => TransferFrame::Finished { ok: false, detail },
        Ended::Finished(Ok(path)) => {
            let (shared, pushed) = (shared.clone(), request.clone());
            let installed = tokio::task::spawn_blocking(move || {
                let result = shared.storage.install_image(
                    &pushed.template,
                    pushed.format,
                    &pushed.blake3,
                    &path,
                    false,
                );
                match &result {
                    Ok(_) => announce_inventory(&shared),
                    Err(_) => {
                        let _ = std::fs::remove_file(&path);
                    }
                }
                result.map(|_| ()).map_err(|e| error_chain(&e))
            })
            .await
            .unwrap_or_else(|_| Err("installing the image stopped".into()));
            match installed {
                Ok(_) => {
                    tracing::info!(template = %request.template, "image received and verified");
                    TransferFrame::Finished {
                        ok: true,
                        detail: "verified".into(),
                    }
                }
                Err(detail) => TransferFrame::Finished { ok: false, detail },
            }
        }
        Ended::Finished(Err(e)) => {
            tracing::warn!(template = %request.template, "image not verified: {e}");
            Receiving::abandon(
                &shared.storage.incoming_dir(),
                &Storage::incoming_file_name(&request.blake3, request.format),
            );
            TransferFrame::Finished {
                ok: false,
                detail: e.to_string(),
            }
        }
    };
    let _ = write_frame(&mut send, &frame).await;
    let _ = send.finish();
}
