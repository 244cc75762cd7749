//! Disk transfers, agent to agent: the target's side of `dunes-transfer/1` (a CA-signed host
//! certificate, the ticket the console gave this agent for exactly that peer and VM, then
//! verified chunks into the storage dir), and the control requests that set one up.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use dunes_shared::{
    codec::{
        MAX_FRAME_BYTES, decode_borrowed, decode_payload, read_frame_limited, read_payload,
        write_frame,
    },
    error_chain, pki,
    protocol::{ErrorCode, PrepareReceive, SendDisk, SendReport, WireError, codes},
    transfer::{ChunkFrameRef, TransferFrame, TransferTicket},
};
use rustls::pki_types::CertificateDer;

use super::{Shared, lock};
use crate::{
    storage::{DiskFormat, Storage},
    transfer::{
        extents::{CHUNK_BYTES, ChunkRecord},
        image::DiskImage,
        receive::{ReceiveError, Receiving},
        send::{SendJob, send_disk},
    },
};

/// The file a transfer under `ticket` writes on the target: the overlay as it is, or a
/// whole raw image.
fn received_format(ticket: &TransferTicket) -> DiskFormat {
    if ticket.overlay_on.is_some() {
        DiskFormat::Qcow2
    } else {
        DiskFormat::Raw
    }
}

/// How long the source may take to open its stream after connecting.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Chunks written between two syncs (and acknowledgements): 16 MiB.
const CHUNKS_PER_ACK: usize = 16;
/// Frames read ahead of the writer, at most (1 MiB each).
const RECEIVE_QUEUE_FRAMES: usize = 16;

/// What the reader hands the writer: a chunk whose data lies in the payload read off the
/// stream (not copied out of it), or any other frame.
enum Incoming {
    Chunk {
        offset: u64,
        hash: Vec<u8>,
        payload: Vec<u8>,
        data: std::ops::Range<usize>,
    },
    Frame(TransferFrame),
}

/// Stops a task when its owner goes away.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn refuse(message: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::BadRequest, message.into())
}

/// `PrepareReceive`: keep the ticket for the source to present.
pub(super) fn prepare_receive(shared: &Shared, request: PrepareReceive) -> Result<(), WireError> {
    let ticket = request.ticket;
    let own = lock(&shared.identity).host_id.clone();
    if !TransferTicket::valid_id(&ticket.id) {
        return Err(refuse("the ticket id is not 32 hex digits"));
    }
    if ticket.target != own {
        return Err(refuse(format!(
            "the ticket is for {}, not this host ({own})",
            ticket.target
        )));
    }
    if ticket.expires_unix_secs <= now_secs() {
        return Err(refuse("the ticket has expired"));
    }
    if let Some(wanted) = &ticket.overlay_on {
        // The overlay's backing file is this host's copy of the template: it must be the
        // same image, or the guest would read another disk.
        match shared.storage.template_disk(&wanted.template) {
            Ok(here) if here.blake3 == wanted.blake3 => {}
            Ok(_) => {
                return Err(WireError::new(
                    ErrorCode::Conflict,
                    format!(
                        "template {} here is another image than the source's",
                        wanted.template
                    ),
                ));
            }
            Err(e) => {
                return Err(WireError::new(
                    ErrorCode::NotFound,
                    format!("template {}: {}", wanted.template, error_chain(&e)),
                ));
            }
        }
    }
    if shared.storage.vm_disk(&ticket.vm).is_some()
        || shared
            .storage
            .definition(&ticket.vm)
            .ok()
            .flatten()
            .is_some()
    {
        return Err(WireError::new(
            ErrorCode::AlreadyExists,
            format!("VM {} already has a disk or a definition here", ticket.vm),
        ));
    }
    let mut tickets = lock(&shared.tickets);
    tickets.retain(|_, t| t.expires_unix_secs > now_secs());
    tickets.insert(ticket.id.clone(), ticket);
    Ok(())
}

/// `SendDisk`: stream the VM's disk to the target the ticket names.
pub(super) async fn send(shared: &Arc<Shared>, request: SendDisk) -> Result<SendReport, WireError> {
    let ticket = request.ticket;
    let (own, identity, ca) = {
        let id = lock(&shared.identity);
        (id.host_id.clone(), id.tls_identity(), id.ca_der.clone())
    };
    if ticket.source != own {
        return Err(refuse(format!(
            "the ticket is from {}, not this host ({own})",
            ticket.source
        )));
    }
    let Some(ca) = ca else {
        return Err(refuse("this agent is not enrolled"));
    };
    let address = tokio::net::lookup_host(request.target_address.as_str())
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| refuse(format!("cannot resolve {}", request.target_address)))?;
    let Some(disk) = shared.storage.vm_disk(&ticket.vm) else {
        return Err(WireError::new(
            ErrorCode::NotFound,
            format!("VM {} has no disk on this host", ticket.vm),
        ));
    };
    if ticket.overlay_on.is_some() && disk.format != DiskFormat::Qcow2 {
        return Err(refuse(format!(
            "VM {}'s disk here is a whole image, not an overlay",
            ticket.vm
        )));
    }
    let flatten = disk.format == DiskFormat::Qcow2 && ticket.overlay_on.is_none();
    let image = open_image(shared, disk.path.clone(), flatten).await?;
    let config = pki::transfer_client_config(&ca, &identity)
        .and_then(pki::quic_client_config)
        .map_err(|e| WireError::new(ErrorCode::Internal, error_chain(&e)))?;
    let corrupt_first_chunk = std::mem::take(&mut *lock(&shared.transfer_faults));
    let (events, ticket_id) = (shared.events.clone(), ticket.id.clone());
    // Told on the event stream of every control connection: the console shows it live.
    let progress = move |bytes_done, bytes_total| {
        let _ = events.send(dunes_shared::protocol::AgentEvent::TransferProgress {
            ticket: ticket_id.clone(),
            bytes_done,
            bytes_total,
        });
    };
    let mut outcome = {
        let mut sends = lock(&shared.sends);
        sends.retain(|_, s| s.expires_unix_secs > now_secs());
        match sends.get(&ticket.id) {
            // Under way or done: the same transfer, not a second one.
            Some(existing) => existing.result.clone(),
            None => {
                let (tx, rx) = tokio::sync::watch::channel(None);
                let tx = Arc::new(tx);
                let ticket_id = ticket.id.clone();
                let expires_unix_secs = ticket.expires_unix_secs;
                let job = SendJob {
                    ticket,
                    address,
                    disk: disk.path,
                    image,
                    corrupt_first_chunk,
                    limit_mbps: request.limit_mbps,
                    compress: request.compress,
                };
                // Its own task: a control stream that closes does not stop the transfer.
                let endpoint = shared.endpoint.clone();
                let done = tx.clone();
                let task = tokio::spawn(async move {
                    let result = send_with_reconnects(&endpoint, config, job, progress).await;
                    let _ = done.send(Some(result));
                });
                sends.insert(
                    ticket_id,
                    SendOutcome {
                        expires_unix_secs,
                        result: rx.clone(),
                        outcome: tx,
                        task: task.abort_handle(),
                    },
                );
                rx
            }
        }
    };
    let done = outcome
        .wait_for(|r| r.is_some())
        .await
        .map_err(|_| WireError::new(ErrorCode::Internal, "the transfer task stopped"))?;
    done.clone().expect("waited for it")
}

/// What a send ends with, as everyone waiting for it hears it.
type SendResult = Option<Result<SendReport, WireError>>;

/// A transfer of this agent's, under way or done.
#[derive(Debug)]
pub(super) struct SendOutcome {
    expires_unix_secs: u64,
    result: tokio::sync::watch::Receiver<SendResult>,
    outcome: Arc<tokio::sync::watch::Sender<SendResult>>,
    task: tokio::task::AbortHandle,
}

/// `CancelTransfer`: the send of this ticket stops now, and its `SendDisk` answers so.
pub(super) fn cancel_send(shared: &Shared, ticket: &str) -> Result<(), WireError> {
    let sends = lock(&shared.sends);
    let Some(send) = sends.get(ticket) else {
        return Err(WireError::new(
            ErrorCode::NotFound,
            "no transfer of this ticket here",
        ));
    };
    if send.result.borrow().is_none() {
        send.task.abort();
        let _ = send.outcome.send(Some(Err(WireError::new(
            ErrorCode::Conflict,
            "the transfer was cancelled",
        ))));
        tracing::info!("transfer cancelled");
    }
    Ok(())
}

/// How long a broken link may keep a transfer from making progress before it fails.
const RECONNECT_WINDOW: Duration = Duration::from_secs(60);

/// Sends the disk, and after a broken link connects again and goes on from the last chunk
/// the target acknowledged, for as long as the link comes back within [`RECONNECT_WINDOW`].
async fn send_with_reconnects(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    job: SendJob,
    progress: impl Fn(u64, u64) + Send + Sync,
) -> Result<SendReport, WireError> {
    let mut reconnects = 0u32;
    // The furthest the target has got: a try that goes beyond it made progress.
    let mut furthest = 0u64;
    let mut corrupt_first_chunk = job.corrupt_first_chunk;
    let mut broken_since: Option<tokio::time::Instant> = None;
    let mut pause = Duration::from_millis(500);
    loop {
        let attempt = SendJob {
            ticket: job.ticket.clone(),
            address: job.address,
            disk: job.disk.clone(),
            image: job.image.clone(),
            corrupt_first_chunk: std::mem::take(&mut corrupt_first_chunk),
            limit_mbps: job.limit_mbps,
            compress: job.compress,
        };
        let sent_now = std::sync::atomic::AtomicU64::new(0);
        let result = send_disk(endpoint, config.clone(), attempt, |done, total| {
            sent_now.store(done, std::sync::atomic::Ordering::Relaxed);
            progress(done, total);
        })
        .await;
        match result {
            Ok(report) => {
                if reconnects > 0 {
                    tracing::info!(
                        vm = %job.ticket.vm,
                        reconnects,
                        resumed_from = report.resumed_from,
                        "transfer done after the link broke"
                    );
                }
                return Ok(SendReport {
                    reconnects,
                    ..report
                });
            }
            Err(e) if e.is_link() => {
                let now = tokio::time::Instant::now();
                // Progress since the last break starts the window again.
                let reached = sent_now.load(std::sync::atomic::Ordering::Relaxed);
                if reached > furthest {
                    furthest = reached;
                    broken_since = None;
                    pause = Duration::from_millis(500);
                }
                let since = *broken_since.get_or_insert(now);
                if now.duration_since(since) >= RECONNECT_WINDOW {
                    return Err(WireError::new(
                        ErrorCode::Internal,
                        format!(
                            "{}; no progress for {} s",
                            error_chain(&e),
                            RECONNECT_WINDOW.as_secs()
                        ),
                    ));
                }
                tracing::warn!(vm = %job.ticket.vm, "transfer interrupted, trying again: {e}");
                reconnects += 1;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(4));
            }
            Err(e) => return Err(WireError::new(ErrorCode::Internal, error_chain(&e))),
        }
    }
}

/// The image a VM's disk here is to a transfer: the file as it is, or with `flatten` the
/// raw image its overlay shows the guest (qemu-img runs: off the async workers).
async fn open_image(
    shared: &Shared,
    path: std::path::PathBuf,
    flatten: bool,
) -> Result<Arc<DiskImage>, WireError> {
    let root = shared.storage.root().to_path_buf();
    tokio::task::spawn_blocking(move || {
        if flatten {
            DiskImage::flattened(&path, &root)
        } else {
            DiskImage::file(&path)
        }
    })
    .await
    .map_err(|_| WireError::new(ErrorCode::Internal, "reading the disk stopped"))?
    .map(Arc::new)
    .map_err(|e| WireError::new(ErrorCode::Storage, error_chain(&e)))
}

/// `HashDisk`: the image digest of a VM's disk here, read from disk; with `flat`, of the raw
/// image an overlay shows its guest.
pub(super) async fn hash_disk(
    shared: &Arc<Shared>,
    name: dunes_shared::model::VmName,
    flat: bool,
) -> Result<String, WireError> {
    let Some(disk) = shared.storage.vm_disk(&name) else {
        return Err(WireError::new(
            ErrorCode::NotFound,
            format!("VM {name} has no disk here"),
        ));
    };
    let image = open_image(shared, disk.path, flat && disk.format == DiskFormat::Qcow2).await?;
    tokio::task::spawn_blocking(move || image.digest())
        .await
        .map_err(|_| WireError::new(ErrorCode::Internal, "hashing the disk stopped"))?
        .map(hex::encode)
        .map_err(|e| WireError::new(ErrorCode::Storage, e.to_string()))
}

/// `DiscardDisk`: what a transfer left for a VM that is not defined here.
pub(super) async fn discard(
    shared: &Arc<Shared>,
    name: dunes_shared::model::VmName,
) -> Result<(), WireError> {
    if shared.storage.definition(&name).ok().flatten().is_some() {
        return Err(WireError::new(
            ErrorCode::Conflict,
            format!("VM {name} is defined here: delete the VM instead"),
        ));
    }
    for format in [DiskFormat::Raw, DiskFormat::Qcow2] {
        Receiving::abandon(
            &shared.storage.disks_dir(),
            &Storage::disk_file_name(&name, format),
        );
    }
    shared
        .storage
        .delete_disk(&name)
        .map_err(|e| WireError::new(ErrorCode::Storage, error_chain(&e)))
}

fn peer_host(shared: &Shared, conn: &quinn::Connection) -> Option<dunes_shared::model::HostId> {
    let cert = conn
        .peer_identity()
        .and_then(|a| a.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|certs| certs.first().cloned())?;
    let ca = lock(&shared.identity).ca_der.clone()?;
    let host = pki::cert_host_id(&cert)?;
    pki::verify_host_cert(&cert, &ca, &host).ok()?;
    Some(host)
}

/// One transfer connection, on the target.
pub(super) async fn serve_transfer(shared: Arc<Shared>, conn: quinn::Connection) {
    let Some(peer) = peer_host(&shared, &conn) else {
        tracing::warn!(remote = %conn.remote_address(), "transfer without a host certificate from the cluster CA refused");
        conn.close(
            codes::CLOSE_UNAUTHENTICATED,
            b"a host certificate from this cluster's CA is required",
        );
        return;
    };
    let Ok(Ok((mut send, mut recv))) = tokio::time::timeout(OPEN_TIMEOUT, conn.accept_bi()).await
    else {
        conn.close(codes::CLOSE_TIMEOUT, b"no transfer stream");
        return;
    };
    let opened = read_frame_limited::<_, TransferFrame>(&mut recv, MAX_FRAME_BYTES).await;
    let Ok(Some(TransferFrame::Open {
        ticket,
        vm,
        size,
        zstd,
    })) = opened
    else {
        conn.close(
            codes::CLOSE_BAD_HELLO,
            b"expected the opening of a transfer",
        );
        return;
    };
    // The ticket stays until the image is verified: a cut link comes back with it.
    let found = lock(&shared.tickets).get(&ticket).cloned();
    let refusal = match &found {
        None => Some("no such ticket (unknown, used or expired)".to_string()),
        Some(t) if t.source != peer => Some(format!("the ticket is not for {peer}")),
        Some(t) if t.vm != vm => Some(format!("the ticket is not for VM {vm}")),
        Some(t) if t.expires_unix_secs <= now_secs() => Some("the ticket has expired".into()),
        Some(_) => None,
    };
    if let Some(reason) = refusal {
        tracing::warn!(%peer, "transfer refused: {reason}");
        let _ = write_frame(&mut send, &TransferFrame::Refused { reason }).await;
        let _ = send.finish();
        // The source closes once it has read why.
        let _ = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
        return;
    }
    let dir = shared.storage.disks_dir();
    let file_name =
        Storage::disk_file_name(&vm, found.as_ref().map_or(DiskFormat::Raw, received_format));
    let opened = {
        let (dir, file_name) = (dir.clone(), file_name.clone());
        tokio::task::spawn_blocking(move || Receiving::open(&dir, &file_name, size)).await
    };
    let receiving = match opened {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let _ = write_frame(
                &mut send,
                &TransferFrame::Refused {
                    reason: e.to_string(),
                },
            )
            .await;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
            return;
        }
        Err(_) => return,
    };
    let resume_from = receiving.resume_from();
    tracing::info!(%peer, %vm, size, resume_from, "receiving a disk");
    // This agent reads zstd chunks: it says yes when the source asks.
    if write_frame(&mut send, &TransferFrame::Accepted { resume_from, zstd })
        .await
        .is_err()
    {
        return;
    }
    let what = format!("disk of {vm} from {peer}");
    let ended = receive_chunks(&mut send, recv, receiving, &what).await;
    let frame = match ended {
        Ended::Cut => return,
        Ended::Failed(detail) => TransferFrame::Finished { ok: false, detail },
        Ended::Finished(Ok(_)) => {
            // Used: the ticket goes.
            lock(&shared.tickets).remove(&ticket);
            tracing::info!(%peer, %vm, "disk received and verified");
            TransferFrame::Finished {
                ok: true,
                detail: "verified".into(),
            }
        }
        Ended::Finished(Err(e)) => {
            tracing::warn!(%peer, %vm, "disk not verified: {e}");
            Receiving::abandon(&dir, &file_name);
            TransferFrame::Finished {
                ok: false,
                detail: e.to_string(),
            }
        }
    };
    let _ = write_frame(&mut send, &frame).await;
    let _ = send.finish();
    // The source closes once it has read the answer.
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
}

/// How the chunks of a transfer ended.
pub(super) enum Ended {
    /// The link broke or the stream ended: what is acknowledged stays for the next try.
    Cut,
    /// A chunk could not be written; the source is to hear why (the partial files stay).
    Failed(String),
    /// The source finished: the image verified and has its name, or why not.
    Finished(Result<std::path::PathBuf, ReceiveError>),
}

/// Runs a blocking step on the receiver, off the async workers.
async fn with<T: Send + 'static>(
    receiving: &Arc<Mutex<Option<Receiving>>>,
    f: impl FnOnce(&mut Receiving) -> Result<T, ReceiveError> + Send + 'static,
) -> Result<T, ReceiveError> {
    let receiving = receiving.clone();
    tokio::task::spawn_blocking(move || {
        let mut guard = lock(&receiving);
        let r = guard.as_mut().ok_or(ReceiveError::DigestMismatch)?;
        f(r)
    })
    .await
    .unwrap_or(Err(ReceiveError::DigestMismatch))
}

/// Receives the chunks of a transfer the source was told to send (`Accepted`, or an image
/// offer) into `receiving`, asking again for a corrupt chunk and acknowledging what is on
/// disk, until the source finishes or the link breaks. `what` names the image in logs.
pub(super) async fn receive_chunks(
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
    receiving: Receiving,
    what: &str,
) -> Ended {
    let receiving = Arc::new(Mutex::new(Some(receiving)));
    // Frames are read (and unpacked) while earlier chunks are hashed, written and synced,
    // so the link keeps flowing; at most RECEIVE_QUEUE_FRAMES wait.
    let (frames_tx, mut frames) = tokio::sync::mpsc::channel::<Incoming>(RECEIVE_QUEUE_FRAMES);
    let reader = tokio::spawn(async move {
        while let Ok(Some(payload)) = read_payload(&mut recv, MAX_FRAME_BYTES).await {
            let incoming = match decode_borrowed::<ChunkFrameRef>(&payload) {
                Ok(ChunkFrameRef::Chunk { offset, hash, data }) => {
                    let at = data.as_ptr() as usize - payload.as_ptr() as usize;
                    let (hash, data) = (hash.to_vec(), at..at + data.len());
                    Incoming::Chunk {
                        offset,
                        hash,
                        payload,
                        data,
                    }
                }
                // A compressed chunk is unpacked first, never beyond a chunk's size; one
                // that does not unpack is asked for again like a corrupt one.
                Ok(ChunkFrameRef::ZstdChunk { offset, hash, data }) => {
                    let at = data.as_ptr() as usize - payload.as_ptr() as usize;
                    let (hash, packed) = (hash.to_vec(), at..at + data.len());
                    let unpacked =
                        tokio::task::spawn_blocking(move || {
                            match zstd::bulk::decompress(
                                &payload[packed.clone()],
                                CHUNK_BYTES as usize,
                            ) {
                                Ok(data) => Incoming::Chunk {
                                    offset,
                                    hash,
                                    data: 0..data.len(),
                                    payload: data,
                                },
                                Err(_) => Incoming::Chunk {
                                    offset,
                                    hash: Vec::new(),
                                    payload,
                                    data: packed,
                                },
                            }
                        })
                        .await;
                    match unpacked {
                        Ok(incoming) => incoming,
                        Err(_) => break,
                    }
                }
                Err(_) => match decode_payload::<TransferFrame>(&payload) {
                    Ok(frame) => Incoming::Frame(frame),
                    Err(_) => break,
                },
            };
            if frames_tx.send(incoming).await.is_err() {
                break;
            }
        }
    });
    let _reader = AbortOnDrop(reader);
    let mut awaiting: Option<u64> = None;
    let mut since_ack = 0usize;
    loop {
        // The link broke (or the stream ended): what is acknowledged stays for the next try.
        let Some(frame) = frames.recv().await else {
            let _ = with(&receiving, |r| r.checkpoint()).await;
            return Ended::Cut;
        };
        match frame {
            Incoming::Chunk {
                offset,
                hash,
                payload,
                data,
            } => {
                if let Some(wanted) = awaiting {
                    if offset != wanted {
                        continue;
                    }
                    awaiting = None;
                }
                let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) else {
                    awaiting = Some(offset);
                    let _ = write_frame(send, &TransferFrame::Resend { offset }).await;
                    continue;
                };
                let record = ChunkRecord {
                    offset,
                    len: data.len() as u32,
                    hash,
                };
                match with(&receiving, move |r| r.write_chunk(record, &payload[data])).await {
                    Ok(()) => {}
                    Err(ReceiveError::Corrupt { offset }) => {
                        tracing::warn!(what, offset, "a chunk did not match its hash; asked again");
                        awaiting = Some(offset);
                        if write_frame(send, &TransferFrame::Resend { offset })
                            .await
                            .is_err()
                        {
                            return Ended::Cut;
                        }
                        continue;
                    }
                    Err(e) => return Ended::Failed(e.to_string()),
                }
                since_ack += 1;
                if since_ack >= CHUNKS_PER_ACK {
                    since_ack = 0;
                    match with(&receiving, |r| r.checkpoint()).await {
                        Ok(through) => {
                            let _ = write_frame(send, &TransferFrame::Ack { through }).await;
                        }
                        Err(e) => {
                            tracing::warn!(what, "cannot sync the transfer: {e}");
                            return Ended::Cut;
                        }
                    }
                }
            }
            // The source comes back to the chunk asked for, then finishes again.
            Incoming::Frame(TransferFrame::Finish { .. }) if awaiting.is_some() => {}
            Incoming::Frame(TransferFrame::Finish { digest }) => {
                let digest = <[u8; 32]>::try_from(digest.as_slice()).unwrap_or([0; 32]);
                let taken = lock(&receiving).take();
                let finished = match taken {
                    Some(r) => tokio::task::spawn_blocking(move || r.finish(&digest))
                        .await
                        .unwrap_or(Err(ReceiveError::DigestMismatch)),
                    None => Err(ReceiveError::DigestMismatch),
                };
                return Ended::Finished(finished);
            }
            Incoming::Frame(other) => {
                tracing::warn!(what, "unexpected transfer frame: {other:?}");
                return Ended::Cut;
            }
        }
    }
}
