//! Disk transfers between two real agents over `dunes-transfer/1`, with real certificates
//! from one cluster CA: only with the console's ticket, only from the named peer, only
//! allocated bytes, verified, resumed, and a corrupt chunk asked again and never written.

use std::{
    io::{Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use dunes_agent::{
    config::AgentConfig,
    server::{AgentOptions, RunningAgent},
    storage::{DiskFormat, Storage},
    transfer::{
        extents::{allocated_extents, chunks_of, read_chunk},
        receive::Receiving,
    },
};
use dunes_console::engine::{
    console_pki::ConsolePki,
    fleet::enroll::{EnrollPolicy, enroll},
};
use dunes_shared::{
    model::{HostId, RuntimeKind, VmName},
    model::{TemplateName, VmSpec},
    pki,
    protocol::{
        CreateVm, DiscardDisk, ExportVm, HashDisk, Hello, ImportVm, ListVms, PrepareReceive,
        SendDisk, SendReport,
    },
    rpc::{CallError, call},
    transfer::TransferTicket,
};

struct Host {
    agent: RunningAgent,
    data_dir: PathBuf,
    conn: quinn::Connection,
}

async fn host(dir: &Path, id: &str, console: &ConsolePki, endpoint: &quinn::Endpoint) -> Host {
    let data_dir = dir.join(id);
    // A test driver of its own: `test:///default` is one state shared by the whole process.
    std::fs::create_dir_all(&data_dir).unwrap();
    let node = data_dir.join("node.xml");
    std::fs::write(
        &node,
        "<node>\n  <cpu><mhz>2600</mhz><model>t</model><nodes>1</nodes><sockets>1</sockets><cores>8</cores><threads>1</threads></cpu>\n  <memory>16777216</memory>\n</node>\n",
    )
    .unwrap();
    let agent = RunningAgent::start(AgentOptions {
        data_dir: data_dir.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        libvirt_uri: format!("test://{}", node.display()),
        config: AgentConfig {
            host_id: Some(HostId::new(id).unwrap()),
            ..AgentConfig::default()
        },
        guest_dir: None,
    })
    .await
    .unwrap();
    enroll(
        endpoint,
        console,
        &agent.local_addr.to_string(),
        agent.join_token.as_deref().unwrap(),
        Some(agent.fingerprint),
        EnrollPolicy::default(),
    )
    .await
    .unwrap();
    let config = pki::quic_client_config(
        pki::control_client_config(console.ca.cert_der(), &console.identity).unwrap(),
    )
    .unwrap();
    let conn = endpoint
        .connect_with(
            config,
            agent.local_addr,
            &pki::host_cert_name(&agent.host_id),
        )
        .unwrap()
        .await
        .unwrap();
    call(
        &conn,
        Hello {
            console_name: "test".into(),
            features: Vec::new(),
        },
    )
    .await
    .unwrap();
    let data_dir = data_dir.canonicalize().unwrap();
    Host {
        agent,
        data_dir,
        conn,
    }
}

impl Host {
    fn disk(&self, vm: &VmName) -> PathBuf {
        Storage::open(&self.data_dir)
            .unwrap()
            .disk_file(&Storage::disk_file_name(vm, DiskFormat::Raw))
    }
}

/// A 64 MiB image holding 3 MiB of data in two places.
fn write_image(path: &Path, seed: u8) {
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(64 << 20).unwrap();
    for (at, n) in [(4u64 << 20, 1u64 << 20), (40 << 20, 2 << 20)] {
        f.seek(SeekFrom::Start(at)).unwrap();
        let data: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(seed)).collect();
        f.write_all(&data).unwrap();
    }
    f.sync_all().unwrap();
}

fn ticket(vm: &VmName, source: &Host, target: &Host, n: u8) -> TransferTicket {
    TransferTicket {
        id: format!("{n:02x}").repeat(16),
        vm: vm.clone(),
        source: source.agent.host_id.clone(),
        target: target.agent.host_id.clone(),
        expires_unix_secs: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600,
        overlay_on: None,
    }
}

async fn send(source: &Host, target: &Host, ticket: TransferTicket) -> Result<SendReport, String> {
    send_with(source, target, ticket, None, false).await
}

async fn send_with(
    source: &Host,
    target: &Host,
    ticket: TransferTicket,
    limit_mbps: Option<u32>,
    compress: bool,
) -> Result<SendReport, String> {
    let sent = tokio::time::timeout(
        Duration::from_secs(60),
        call(
            &source.conn,
            SendDisk {
                ticket,
                target_address: target.agent.local_addr.to_string(),
                limit_mbps,
                compress,
            },
        ),
    )
    .await
    .expect("the transfer ended");
    sent.map_err(|e| match e {
        CallError::Remote(w) => w.message,
        other => other.to_string(),
    })
}

fn allocated_bytes(path: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(path).unwrap()) * 512
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_move_only_with_a_ticket_sparse_verified_resumed_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let console = ConsolePki::load_or_create(&dir.path().join("console")).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let a = host(dir.path(), "xfer-a", &console, &endpoint).await;
    let b = host(dir.path(), "xfer-b", &console, &endpoint).await;
    let c = host(dir.path(), "xfer-c", &console, &endpoint).await;

    // The source's event stream: its transfers' progress.
    let (progress_tx, mut progress) = tokio::sync::mpsc::unbounded_channel();
    {
        let conn = a.conn.clone();
        tokio::spawn(async move {
            let Ok(mut events) = conn.accept_uni().await else {
                return;
            };
            while let Ok(Some(payload)) =
                dunes_shared::codec::read_payload(&mut events, 4 << 20).await
            {
                if let Ok(dunes_shared::codec::Decoded::Known(
                    dunes_shared::protocol::AgentEvent::TransferProgress {
                        bytes_done,
                        bytes_total,
                        ..
                    },
                )) = dunes_shared::codec::decode_message(&payload)
                {
                    let _ = progress_tx.send((bytes_done, bytes_total));
                }
            }
        });
    }

    // A plain transfer: only the allocated 3 MiB travel, and the copy is the image.
    let vm = VmName::new("moved").unwrap();
    write_image(&a.disk(&vm), 3);
    let t = ticket(&vm, &a, &b, 1);
    call(&b.conn, PrepareReceive { ticket: t.clone() })
        .await
        .unwrap();
    let report = send(&a, &b, t.clone()).await.unwrap();
    assert_eq!(report.size_bytes, 64 << 20);
    assert!(
        report.allocated_bytes >= 3 << 20 && report.allocated_bytes < 8 << 20,
        "{report:?}"
    );
    assert_eq!(report.sent_bytes, report.allocated_bytes);
    assert_eq!((report.resumed_from, report.resent_chunks), (0, 0));
    // Its progress was told from the start to the end.
    let first = progress.recv().await.unwrap();
    assert_eq!(first, (0, report.allocated_bytes));
    // The last word may come on the event stream after the answer.
    let mut last = first;
    while last != (report.allocated_bytes, report.allocated_bytes) {
        let p = tokio::time::timeout(Duration::from_secs(20), progress.recv())
            .await
            .unwrap_or_else(|_| panic!("no progress to the end after {last:?}"))
            .unwrap();
        assert!(p.0 >= last.0, "progress only goes forward");
        last = p;
    }
    assert_eq!(
        std::fs::read(b.disk(&vm)).unwrap(),
        std::fs::read(a.disk(&vm)).unwrap()
    );
    assert!(
        allocated_bytes(&b.disk(&vm)) < 8 << 20,
        "sparse on the target too"
    );
    // Asked again (a console that lost the answer), the source gives the same transfer's
    // outcome: no second stream.
    let again = send(&a, &b, t).await.unwrap();
    assert_eq!(again, report);

    // Only the peer the ticket names may use it; the target says why, and keeps nothing.
    let vm2 = VmName::new("second").unwrap();
    write_image(&c.disk(&vm2), 5);
    let for_a = ticket(&vm2, &a, &b, 2);
    call(
        &b.conn,
        PrepareReceive {
            ticket: for_a.clone(),
        },
    )
    .await
    .unwrap();
    let stolen = TransferTicket {
        source: c.agent.host_id.clone(),
        ..for_a
    };
    let refused = send(&c, &b, stolen).await.unwrap_err();
    assert!(
        refused.contains("the ticket is not for xfer-c"),
        "{refused}"
    );
    assert!(!b.disk(&vm2).exists());
    // Nor is a ticket taken for another host, or expired.
    let elsewhere = call(
        &c.conn,
        PrepareReceive {
            ticket: ticket(&vm2, &a, &b, 3),
        },
    )
    .await
    .unwrap_err();
    assert!(
        elsewhere.to_string().contains("not this host"),
        "{elsewhere}"
    );
    let mut old = ticket(&vm2, &c, &b, 4);
    old.expires_unix_secs = 1;
    let expired = call(&b.conn, PrepareReceive { ticket: old })
        .await
        .unwrap_err();
    assert!(expired.to_string().contains("expired"), "{expired}");

    // A corrupt chunk on the wire is caught, asked again, and the copy still verifies.
    let t = ticket(&vm2, &c, &b, 5);
    call(&b.conn, PrepareReceive { ticket: t.clone() })
        .await
        .unwrap();
    c.agent.corrupt_next_sent_chunk();
    let report = send(&c, &b, t).await.unwrap();
    assert!(report.resent_chunks >= 1, "{report:?}");
    assert_eq!(
        std::fs::read(b.disk(&vm2)).unwrap(),
        std::fs::read(c.disk(&vm2)).unwrap()
    );

    // A transfer cut after half its chunks goes on from there, never from zero.
    let vm3 = VmName::new("resumed").unwrap();
    write_image(&a.disk(&vm3), 7);
    {
        let src = std::fs::File::open(a.disk(&vm3)).unwrap();
        let chunks = chunks_of(&allocated_extents(&src).unwrap());
        let disks = b.disk(&vm3).parent().unwrap().to_path_buf();
        let mut rx = Receiving::open(
            &disks,
            &Storage::disk_file_name(&vm3, DiskFormat::Raw),
            64 << 20,
        )
        .unwrap();
        for &(offset, len) in &chunks[..chunks.len() / 2] {
            let (data, record) = read_chunk(&src, offset, len).unwrap();
            rx.write_chunk(record, &data).unwrap();
        }
        rx.checkpoint().unwrap();
    }
    let t = ticket(&vm3, &a, &c, 6);
    // The target is b: the half-done files are b's.
    let t = TransferTicket {
        target: b.agent.host_id.clone(),
        ..t
    };
    call(&b.conn, PrepareReceive { ticket: t.clone() })
        .await
        .unwrap();
    let report = send(&a, &b, t).await.unwrap();
    assert!(report.resumed_from > 0, "{report:?}");
    assert!(report.sent_bytes < report.allocated_bytes, "{report:?}");
    assert_eq!(
        std::fs::read(b.disk(&vm3)).unwrap(),
        std::fs::read(a.disk(&vm3)).unwrap()
    );

    // What a migration does with them: a defined VM's disk sent, its digest the same on both
    // ends, its portable definition exported and imported, the same VM (same UUID) there.
    let vm4 = VmName::new("migrant").unwrap();
    let created = call(
        &a.conn,
        CreateVm {
            spec: VmSpec {
                name: vm4.clone(),
                template: TemplateName::new("tiny").unwrap(),
                vcpus: Some(1),
                memory_mib: Some(64),
            },
            start: false,
            image_disk: None,
            cloud_init: None,
            network: None,
            runtime: RuntimeKind::Libvirt,
        },
    )
    .await
    .unwrap();
    let t = ticket(&vm4, &a, &b, 7);
    call(&b.conn, PrepareReceive { ticket: t.clone() })
        .await
        .unwrap();
    let report = send(&a, &b, t).await.unwrap();
    for side in [&a, &b] {
        let digest = call(
            &side.conn,
            HashDisk {
                name: vm4.clone(),
                flat: false,
            },
        )
        .await
        .unwrap();
        assert_eq!(digest, report.digest);
    }
    let record = call(
        &a.conn,
        ExportVm {
            name: vm4.clone(),
            flat: false,
        },
    )
    .await
    .unwrap();
    assert!(
        !record.contains(a.data_dir.to_str().unwrap()),
        "no path of the source"
    );
    let imported = call(
        &b.conn,
        ImportVm {
            record: record.clone(),
        },
    )
    .await
    .unwrap();
    assert_eq!(imported.uuid, created.uuid);
    let listed = call(&b.conn, ListVms).await.unwrap();
    assert!(listed.iter().any(|v| v.name == vm4));
    // A defined VM's disk is not discarded; an undefined one's is.
    let refused = call(&b.conn, DiscardDisk { name: vm4.clone() })
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("delete the VM instead"),
        "{refused}"
    );
    let again = call(&b.conn, ImportVm { record }).await.unwrap_err();
    assert!(again.to_string().contains("already exists"), "{again}");
    call(&b.conn, DiscardDisk { name: vm.clone() })
        .await
        .unwrap();
    assert!(!b.disk(&vm).exists());
}

/// Compressed, a chunk that shrinks crosses the wire in fewer bytes and arrives as it was;
/// under a limit, the stream takes at least the time the limit allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_compress_where_it_pays_and_keep_to_their_limit() {
    let dir = tempfile::tempdir().unwrap();
    let console = ConsolePki::load_or_create(&dir.path().join("console")).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let a = host(dir.path(), "pack-a", &console, &endpoint).await;
    let b = host(dir.path(), "pack-b", &console, &endpoint).await;

    // A repeating pattern: it compresses well.
    let vm = VmName::new("packed").unwrap();
    write_image(&a.disk(&vm), 3);
    let t = ticket(&vm, &a, &b, 1);
    call(&b.conn, PrepareReceive { ticket: t.clone() })
        .await
        .unwrap();
    let report = send_with(&a, &b, t, None, true).await.unwrap();
    assert_eq!(report.sent_bytes, report.allocated_bytes);
    assert!(
        report.wire_bytes * 4 < report.sent_bytes,
        "compressed: {report:?}"
    );
    assert_eq!(
        std::fs::read(b.disk(&vm)).unwrap(),
        std::fs::read(a.disk(&vm)).unwrap()
    );

    // Without compression every byte travels; 3 MiB at 24 Mbit/s take at least ~1 s.
    let vm = VmName::new("paced").unwrap();
    write_image(&a.disk(&vm), 5);
    let t = ticket(&vm, &a, &b, 2);
    call(&b.conn, PrepareReceive { ticket: t.clone() })
        .await
        .unwrap();
    let began = std::time::Instant::now();
    let report = send_with(&a, &b, t, Some(24), false).await.unwrap();
    let took = began.elapsed();
    assert_eq!(report.wire_bytes, report.sent_bytes, "{report:?}");
    let least = Duration::from_secs_f64(report.wire_bytes as f64 * 8.0 / 24e6 * 0.9);
    assert!(took >= least, "{took:?} for {report:?} under 24 Mbit/s");
    assert_eq!(
        std::fs::read(b.disk(&vm)).unwrap(),
        std::fs::read(a.disk(&vm)).unwrap()
    );
}
