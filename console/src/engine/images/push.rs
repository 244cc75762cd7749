//! A library image pushed to a host's agent (`ReceiveImage`, on a stream of its own on the
//! control connection): the agent says whether it holds the bytes already and where to go on
//! from, then the image's allocated chunks follow, each with its BLAKE3 hash, and the digest
//! of them all closes the stream. A chunk the agent finds corrupt is sent again with
//! everything after it. No engine state here: the driver spawns it and hears how it ended.

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use dunes_shared::{
    codec::{MAX_FRAME_BYTES, read_frame_limited, write_frame},
    extents::{ChunkRecord, allocated_extents, chunks_of, image_digest, read_chunk},
    model::{ImageFormat, TemplateName},
    protocol::{ImageOffer, ReceiveImage, Request, WireError},
    transfer::{TransferFrame, chunk_frame_head},
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

/// How long the agent may take to make its offer (it may link a copy it has first).
const OFFER_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("{0}")]
    Refused(String),
    #[error("the host did not verify the image: {0}")]
    NotVerified(String),
    #[error("the link to the host broke: {0}")]
    Link(String),
    #[error("reading the console's copy {path}: {source}")]
    Copy {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn link<E: std::fmt::Display>(e: E) -> PushError {
    PushError::Link(e.to_string())
}

/// How a push to one host went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pushed {
    /// The host held the bytes already: nothing was sent.
    pub held: bool,
    /// Image bytes sent now (holes and what an earlier push left are not sent).
    pub sent_bytes: u64,
    /// Where this push went on from.
    pub resumed_from: u64,
    /// Chunks the host asked for again.
    pub resent_chunks: u32,
}

/// Fault injection for the test suites: with `DUNES_FAILPOINT=image-push-cut-after:N`, the
/// first push the console makes stops after N chunks, once the host has acknowledged some,
/// as a cut link would. Only in a build with the `failpoints` feature.
#[cfg(feature = "failpoints")]
fn cut_after_chunks() -> Option<usize> {
    static CUT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let n = std::env::var("DUNES_FAILPOINT")
        .ok()?
        .strip_prefix("image-push-cut-after:")?
        .parse()
        .ok()?;
    (!CUT.swap(true, std::sync::atomic::Ordering::SeqCst)).then_some(n)
}

#[cfg(not(feature = "failpoints"))]
fn cut_after_chunks() -> Option<usize> {
    None
}

/// Fault injection for the test suites: in a build with the `failpoints` feature, an image
/// named `failpoint-slow-…` goes a chunk each 100 ms, so that a test sees its push under way.
#[cfg(feature = "failpoints")]
fn chunk_delay(template: &TemplateName) -> Option<Duration> {
    template
        .as_str()
        .starts_with("failpoint-slow-")
        .then_some(Duration::from_millis(100))
}

#[cfg(not(feature = "failpoints"))]
fn chunk_delay(_: &TemplateName) -> Option<Duration> {
    None
}

/// What is pushed: the console's copy, and the template the host keeps it as.
#[derive(Debug, Clone)]
pub struct PushJob {
    pub file: PathBuf,
    pub template: TemplateName,
    pub format: ImageFormat,
    pub blake3: String,
}

/// Pushes `job` over `conn`. `progress(done, total)` hears the allocated bytes through, now
/// and then.
pub async fn push_image(
    conn: &quinn::Connection,
    job: PushJob,
    progress: impl Fn(u64, u64) + Send,
) -> Result<Pushed, PushError> {
    let copy_err = |path: &PathBuf| {
        let path = path.display().to_string();
        move |source| PushError::Copy { path, source }
    };
    let file = job.file;
    let delay = chunk_delay(&job.template);
    let size = std::fs::metadata(&file).map_err(copy_err(&file))?.len();
    let request = ReceiveImage {
        template: job.template,
        format: job.format,
        blake3: job.blake3,
        size_bytes: size,
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(link)?;
    write_frame(&mut send, &Request::ReceiveImage(request))
        .await
        .map_err(link)?;
    let offer = tokio::time::timeout(
        OFFER_TIMEOUT,
        read_frame_limited::<_, Result<ImageOffer, WireError>>(&mut recv, MAX_FRAME_BYTES),
    )
    .await
    .map_err(|_| PushError::Link("the host did not answer the push".into()))?
    .map_err(link)?
    .ok_or_else(|| PushError::Link("the host closed the stream".into()))?
    .map_err(|e| PushError::Refused(e.message))?;
    if offer.held {
        let _ = send.finish();
        return Ok(Pushed {
            held: true,
            sent_bytes: 0,
            resumed_from: size,
            resent_chunks: 0,
        });
    }
    let resume_from = offer.resume_from;

    let opened = {
        let path = file.clone();
        tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&path)?;
            let extents = allocated_extents(&f)?;
            Ok::<_, std::io::Error>((Arc::new(f), chunks_of(&extents)))
        })
        .await
        .map_err(link)?
        .map_err(copy_err(&file))?
    };
    let (copy, chunks) = opened;
    let allocated_bytes: u64 = chunks.iter().map(|c| u64::from(c.1)).sum();

    // The host's answers: requests to send again, and the end.
    let (resend_tx, mut resend_rx) = mpsc::channel::<u64>(64);
    let (finished_tx, mut finished_rx) = oneshot::channel::<Result<(), PushError>>();
    let (acked_tx, mut acked) = tokio::sync::watch::channel(0u64);
    tokio::spawn(async move {
        let end = loop {
            match read_frame_limited::<_, TransferFrame>(&mut recv, MAX_FRAME_BYTES).await {
                Ok(Some(TransferFrame::Resend { offset })) => {
                    if resend_tx.send(offset).await.is_err() {
                        break Err(PushError::Link("the push stopped".into()));
                    }
                }
                Ok(Some(TransferFrame::Ack { through })) => {
                    let _ = acked_tx.send(through);
                }
                Ok(Some(TransferFrame::Finished { ok: true, .. })) => break Ok(()),
                Ok(Some(TransferFrame::Finished { ok: false, detail })) => {
                    break Err(PushError::NotVerified(detail));
                }
                Ok(Some(other)) => break Err(link(format!("unexpected frame: {other:?}"))),
                Ok(None) => break Err(PushError::Link("the host closed the stream".into())),
                Err(e) => break Err(link(e)),
            }
        };
        let _ = finished_tx.send(end);
    });

    let cut_after = cut_after_chunks();
    let mut records: Vec<Option<ChunkRecord>> = vec![None; chunks.len()];
    let (mut next, mut sent_chunks, mut sent_bytes, mut resent_chunks) = (0usize, 0usize, 0, 0);
    let position = |offset: u64| chunks.iter().position(|c| c.0 == offset);
    let mut told = std::time::Instant::now();
    let mut done_bytes = 0u64;
    progress(0, allocated_bytes);
    loop {
        while let Ok(offset) = resend_rx.try_recv() {
            if let Some(i) = position(offset) {
                next = next.min(i);
                resent_chunks += 1;
            }
        }
        if next < chunks.len() {
            let (offset, len) = chunks[next];
            let from = copy.clone();
            let (data, record) =
                tokio::task::spawn_blocking(move || read_chunk(&from, offset, len))
                    .await
                    .map_err(link)?
                    .map_err(copy_err(&file))?;
            records[next] = Some(record);
            if record.end() > resume_from {
                if cut_after.is_some_and(|n| sent_chunks >= n) {
                    let _ = acked.wait_for(|through| *through > 0).await;
                    let _ = send.reset(0u32.into());
                    return Err(PushError::Link("cut by DUNES_FAILPOINT".into()));
                }
                if let Some(delay) = delay {
                    tokio::time::sleep(delay).await;
                }
                let head = chunk_frame_head(false, record.offset, &record.hash, data.len());
                send.write_all_chunks(&mut [Bytes::from(head), Bytes::from(data)])
                    .await
                    .map_err(link)?;
                sent_chunks += 1;
                sent_bytes += u64::from(record.len);
            }
            done_bytes += u64::from(record.len);
            next += 1;
            if told.elapsed() >= Duration::from_millis(500) {
                told = std::time::Instant::now();
                progress(done_bytes.min(allocated_bytes), allocated_bytes);
            }
            continue;
        }
        let all: Vec<ChunkRecord> = records.iter().flatten().copied().collect();
        let digest = image_digest(size, &all);
        write_frame(
            &mut send,
            &TransferFrame::Finish {
                digest: digest.to_vec(),
            },
        )
        .await
        .map_err(link)?;
        tokio::select! {
            Some(offset) = resend_rx.recv() => {
                if let Some(i) = position(offset) {
                    next = i;
                    resent_chunks += 1;
                }
            }
            end = &mut finished_rx => {
                end.map_err(|_| PushError::Link("the host's answers stopped".into()))??;
                progress(allocated_bytes, allocated_bytes);
                let _ = send.finish();
                return Ok(Pushed {
                    held: false,
                    sent_bytes,
                    resumed_from: resume_from,
                    resent_chunks,
                });
            }
        }
    }
}
