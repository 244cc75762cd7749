//! The source's side of a disk transfer: it opens a `dunes-transfer/1` connection to the
//! target with its host certificate, presents the console's ticket, and streams the image's
//! allocated chunks from where the target says it stands. A chunk the target finds corrupt is
//! sent again, with everything after it (go-back-N); the image digest closes the stream.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use dunes_shared::{
    codec::{MAX_FRAME_BYTES, read_frame_limited, write_frame},
    protocol::SendReport,
    transfer::{TransferFrame, TransferTicket, chunk_frame_head},
};
use tokio::sync::{mpsc, oneshot};

use super::{
    extents::{ChunkRecord, chunks_of, image_digest},
    image::DiskImage,
};

/// How long the target may take to answer the opening of a transfer.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot reach the target at {address}: {message}")]
    Connect { address: String, message: String },
    #[error("the target refused the transfer: {0}")]
    Refused(String),
    #[error("the target did not verify the image: {0}")]
    NotVerified(String),
    #[error("the link to the target broke: {0}")]
    Link(String),
    #[error("reading the disk {path}: {source}")]
    Disk {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where and how to send.
#[derive(Debug)]
pub struct SendJob {
    pub ticket: TransferTicket,
    pub address: SocketAddr,
    /// The disk file, for messages.
    pub disk: PathBuf,
    /// What is sent: the file as it is, or an overlay flattened.
    pub image: Arc<DiskImage>,
    /// A test hook: the first chunk sent has one byte flipped on the wire.
    pub corrupt_first_chunk: bool,
    /// The most the stream may use, in Mbit/s of chunk data on the wire.
    pub limit_mbps: Option<u32>,
    /// Compress chunks with zstd, if the target can read them.
    pub compress: bool,
}

/// zstd's level for chunks: fast enough to keep up with a site link on one core.
const ZSTD_LEVEL: i32 = 3;

/// A chunk's data as it goes on the wire, and whether it is compressed: compressed when
/// that saves at least a sixteenth.
fn wire_data(data: Vec<u8>, zstd: bool) -> (bool, Vec<u8>) {
    if zstd
        && let Ok(packed) = zstd::bulk::compress(&data, ZSTD_LEVEL)
        && packed.len() < data.len() - data.len() / 16
    {
        return (true, packed);
    }
    (false, data)
}

impl SendError {
    /// Whether a new connection may go on with the transfer: the link broke or the target
    /// could not be reached, as opposed to a refusal, a failed verification or a bad disk.
    pub fn is_link(&self) -> bool {
        matches!(self, SendError::Connect { .. } | SendError::Link(_))
    }
}

/// How often progress is told while a transfer runs.
const PROGRESS_EVERY: Duration = Duration::from_millis(400);

fn link<E: std::fmt::Display>(e: E) -> SendError {
    SendError::Link(e.to_string())
}

/// Streams the disk of `job` to its target and returns once the target has verified it.
/// `progress(done, total)` hears how many allocated bytes are through: at the start, every
/// [`PROGRESS_EVERY`], and at the end.
pub async fn send_disk(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    job: SendJob,
    progress: impl Fn(u64, u64) + Send,
) -> Result<SendReport, SendError> {
    let disk_err = |path: &PathBuf| {
        let path = path.display().to_string();
        move |source| SendError::Disk { path, source }
    };
    let image = job.image.clone();
    let size = image.size();
    let plan = image.extents();
    let chunks = chunks_of(&plan);
    let allocated_bytes: u64 = plan.iter().map(|e| e.1).sum();

    let server_name = dunes_shared::pki::host_cert_name(&job.ticket.target);
    let connect_err = |message: String| SendError::Connect {
        address: job.address.to_string(),
        message,
    };
    let conn = endpoint
        .connect_with(config, job.address, &server_name)
        .map_err(|e| connect_err(e.to_string()))?
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(link)?;
    write_frame(
        &mut send,
        &TransferFrame::Open {
            ticket: job.ticket.id.clone(),
            vm: job.ticket.vm.clone(),
            size,
            zstd: job.compress,
        },
    )
    .await
    .map_err(link)?;
    let opened = tokio::time::timeout(
        OPEN_TIMEOUT,
        read_frame_limited::<_, TransferFrame>(&mut recv, MAX_FRAME_BYTES),
    )
    .await
    .map_err(|_| SendError::Link("the target did not answer the transfer".into()))?
    .map_err(link)?;
    let (resume_from, zstd) = match opened {
        Some(TransferFrame::Accepted { resume_from, zstd }) => (resume_from, zstd && job.compress),
        Some(TransferFrame::Refused { reason }) => {
            conn.close(0u32.into(), b"refused");
            return Err(SendError::Refused(reason));
        }
        other => return Err(SendError::Link(format!("unexpected answer: {other:?}"))),
    };

    // The target's answers: requests to send again, and the end.
    let (resend_tx, mut resend_rx) = mpsc::channel::<u64>(64);
    let (finished_tx, mut finished_rx) = oneshot::channel::<Result<(), SendError>>();
    tokio::spawn(async move {
        let end = loop {
            match read_frame_limited::<_, TransferFrame>(&mut recv, MAX_FRAME_BYTES).await {
                Ok(Some(TransferFrame::Resend { offset })) => {
                    if resend_tx.send(offset).await.is_err() {
                        break Err(SendError::Link("the sender stopped".into()));
                    }
                }
                Ok(Some(TransferFrame::Ack { .. })) => {}
                Ok(Some(TransferFrame::Finished { ok: true, .. })) => break Ok(()),
                Ok(Some(TransferFrame::Finished { ok: false, detail })) => {
                    break Err(SendError::NotVerified(detail));
                }
                Ok(Some(other)) => {
                    break Err(SendError::Link(format!("unexpected frame: {other:?}")));
                }
                Ok(None) => break Err(SendError::Link("the target closed the stream".into())),
                Err(e) => break Err(link(e)),
            }
        };
        let _ = finished_tx.send(end);
    });

    // Every chunk is hashed for the digest; only those past `resume_from` travel.
    let mut records: Vec<Option<ChunkRecord>> = vec![None; chunks.len()];
    let mut next = 0usize;
    let mut sent_bytes = 0u64;
    let mut resent_chunks = 0u32;
    let mut corrupt = job.corrupt_first_chunk;
    // Reading and hashing the next chunk overlaps sending this one.
    let start_read = |i: usize| {
        let (offset, len) = chunks[i];
        let image = image.clone();
        tokio::task::spawn_blocking(move || image.read_chunk(offset, len))
    };
    let mut ahead: Option<(usize, tokio::task::JoinHandle<std::io::Result<_>>)> = None;
    // Allocated bytes before each chunk, for progress after a resend moved `next` back.
    let before: Vec<u64> = chunks
        .iter()
        .scan(0u64, |sum, c| {
            let at = *sum;
            *sum += u64::from(c.1);
            Some(at)
        })
        .chain(std::iter::once(allocated_bytes))
        .collect();
    let position = |offset: u64| chunks.iter().position(|c| c.0 == offset);
    // Pacing under a limit: a frame leaves no sooner than its share of the budget allows.
    let began = tokio::time::Instant::now();
    let bytes_per_sec = job.limit_mbps.map(|m| f64::from(m.max(1)) * 1e6 / 8.0);
    let mut wire_bytes = 0u64;
    let mut done_bytes = 0u64;
    let mut told = std::time::Instant::now();
    progress(0, allocated_bytes);
    loop {
        while let Ok(offset) = resend_rx.try_recv() {
            if let Some(i) = position(offset) {
                next = next.min(i);
                resent_chunks += 1;
            }
        }
        if next < chunks.len() {
            let reading = match ahead.take() {
                Some((i, handle)) if i == next => handle,
                other => {
                    if let Some((_, stale)) = other {
                        stale.abort();
                    }
                    start_read(next)
                }
            };
            if next + 1 < chunks.len() {
                ahead = Some((next + 1, start_read(next + 1)));
            }
            let (data, record) = reading.await.map_err(link)?.map_err(disk_err(&job.disk))?;
            records[next] = Some(record);
            if record.end() > resume_from {
                let mut data = data;
                if corrupt {
                    data[0] ^= 0xff;
                    corrupt = false;
                }
                sent_bytes += u64::from(record.len);
                let (packed, data) = if zstd {
                    tokio::task::spawn_blocking(move || wire_data(data, true))
                        .await
                        .map_err(link)?
                } else {
                    (false, data)
                };
                wire_bytes += data.len() as u64;
                if let Some(rate) = bytes_per_sec {
                    let due = began + Duration::from_secs_f64(wire_bytes as f64 / rate);
                    tokio::time::sleep_until(due).await;
                }
                // The data goes to the stream as it was read, behind its frame's head.
                let head = chunk_frame_head(packed, record.offset, &record.hash, data.len());
                send.write_all_chunks(&mut [Bytes::from(head), Bytes::from(data)])
                    .await
                    .map_err(link)?;
            }
            next += 1;
            done_bytes = before[next];
            if told.elapsed() >= PROGRESS_EVERY {
                told = std::time::Instant::now();
                progress(done_bytes, allocated_bytes);
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
                end.map_err(|_| SendError::Link("the target's answers stopped".into()))??;
                progress(done_bytes.max(allocated_bytes), allocated_bytes);
                let _ = send.finish();
                conn.close(0u32.into(), b"transfer done");
                return Ok(SendReport {
                    size_bytes: size,
                    allocated_bytes,
                    sent_bytes,
                    resumed_from: resume_from,
                    resent_chunks,
                    digest: hex::encode(digest),
                    reconnects: 0,
                    wire_bytes,
                });
            }
        }
    }
}
