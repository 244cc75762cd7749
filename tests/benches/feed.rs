//! The snapshot feed that a window elsewhere follows, at datacenter scale: 1,000 hosts with
//! 10 VMs each, every host's status changing once a second (as agents report it) and 100 VM
//! events a second. The engine's own feed code (`api::feed::send_feed`) sends it over real
//! QUIC with mutual TLS (the operator endpoint's configs, the cluster CA's certificates) on
//! loopback to 1 and then 4 windows, each reading it with the window's code
//! (`api::feed::receive_feed`). A generator stands in for the agents and the engine's actor:
//! it publishes snapshots as the engine does, sharing every host that did not change.
//!
//! Measured, per run of 20 s:
//! - from a publish to the window's snapshot holding it, p50 / p99 / max;
//! - the bytes per second the stream costs a window (QUIC's UDP bytes, sender side);
//! - the CPU of the sending side (delta, JSON, QUIC, TLS) per window, from the threads' own
//!   counters in /proc.
//!
//! Run: `cargo bench -p dunes-tests --bench feed` (release); figures in docs/BENCHMARKS.md.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use dunes_console::{
    api::feed::{receive_feed, send_feed},
    engine::{EventRecord, HostRecord, HostView, Level, LinkState, Snapshot},
};
use dunes_shared::{
    model::{
        HostId, HostInventory, HostStatus, NetworkInterface, OperatorName, Prices, RuntimeInfo,
        RuntimeKind, Site, SizesFrom, TemplateName, VmName, VmNicInfo, VmState, VmStatus,
    },
    pki::{self, CertificateAuthority, Identity},
};
use tokio::sync::watch;

const HOSTS: usize = 1000;
const VMS_PER_HOST: usize = 10;
const VM_EVENTS_PER_SEC: u64 = 100;
const RUN_SECS: u64 = 20;

fn vm(host: usize, i: usize) -> VmStatus {
    VmStatus {
        uuid: format!("6f1c2a4e-9a55-4b0e-{host:04}-{i:012}"),
        name: VmName::new(format!("vm-{host}-{i}")).unwrap(),
        state: VmState::Running,
        vcpus: 2,
        memory_mib: 4096,
        template: Some(TemplateName::new("debian-12").unwrap()),
        disk_bytes: 3_221_225_472,
        runtime: RuntimeKind::Libvirt,
        overlay_on: None,
        disks: None,
        nics: Some(vec![VmNicInfo {
            model: "virtio".into(),
            network: "bridge br0".into(),
            mac: Some(format!(
                "52:54:00:{:02x}:{:02x}:{i:02x}",
                host / 256,
                host % 256
            )),
        }]),
        autostart: Some(true),
        next_start: None,
        addresses: Some(vec![format!("10.{}.{}.{i}/16", host / 256, host % 256)]),
        snapshots: Some(0),
        installer: None,
        screen: false,
    }
}

fn host(n: usize) -> HostView {
    let id = HostId::new(format!("node-{n:04}")).unwrap();
    let site = Site {
        name: dunes_shared::model::SiteName::new(format!("dc-{}", n / 250)).unwrap(),
        ..Site::default()
    };
    HostView {
        record: HostRecord {
            id: id.clone(),
            address: format!("10.0.{}.{}:7440", n / 256, n % 256),
            fingerprint: pki::Fingerprint([n as u8; 32]),
            enrolled_at_ms: 1_790_000_000_000,
            inventory: Some(HostInventory {
                host_id: id,
                hostname: format!("node-{n:04}.dc.example"),
                cpus: 64,
                cpu_model: "AMD EPYC 7543 32-Core Processor".into(),
                memory_mib: 512 * 1024,
                storage_total_mib: 8_000_000,
                storage_free_mib: 3_500_000,
                network: vec![NetworkInterface {
                    name: "eno1".into(),
                    mac: "52:54:00:12:34:56".into(),
                    speed_mbps: Some(25_000),
                }],
                runtimes: vec![RuntimeInfo {
                    kind: RuntimeKind::Libvirt,
                    driver: "QEMU".into(),
                    version: "9.0.0".into(),
                    limits: None,
                    users: None,
                }],
                site,
                prices: Prices::default(),
                security_level: 2,
                agent_version: "0.1.0".into(),
                sizes_from: SizesFrom::Machine,
                interpreters: Vec::new(),
                template_disks: Vec::new(),
            }),
            cert_expires_ms: Some(1_800_000_000_000),
            maintenance: None,
        },
        link: LinkState::Online,
        link_error: None,
        status: Some(HostStatus {
            cpu_load_percent: 37.5,
            memory_used_mib: 200_000,
            memory_total_mib: 512 * 1024,
            storage_free_mib: 3_500_000,
            vms_running: VMS_PER_HOST as u32,
            uptime_secs: 1_234_567,
        }),
        vms: (0..VMS_PER_HOST).map(|i| vm(n, i)).collect(),
        skipped_events: BTreeMap::new(),
    }
}

/// When each snapshot version was published.
type Published = Arc<Mutex<Vec<Instant>>>;

/// Publishes as the engine would for `secs`: each 10 ms one VM changes state (with its
/// event) and a tenth of a second's share of the hosts report their status.
fn generate(tx: watch::Sender<Arc<Snapshot>>, published: Published, secs: u64) {
    let mut snapshot = Snapshot::clone(&tx.borrow());
    let tick = Duration::from_secs(1) / VM_EVENTS_PER_SEC as u32;
    let statuses_per_tick = HOSTS / VM_EVENTS_PER_SEC as usize;
    let mut next = Instant::now();
    let mut events: Vec<EventRecord> = Vec::new();
    let mut random = 0x9e37_79b9_7f4a_7c15u64;
    for n in 0..secs * VM_EVENTS_PER_SEC {
        next += tick;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        for k in 0..statuses_per_tick {
            let h = (n as usize * statuses_per_tick + k) % HOSTS;
            let mut view = HostView::clone(&snapshot.hosts[h]);
            if let Some(status) = &mut view.status {
                status.uptime_secs += 1;
                status.cpu_load_percent = (n % 100) as f32;
            }
            snapshot.hosts[h] = Arc::new(view);
        }
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        let (h, v) = (
            (random % HOSTS as u64) as usize,
            (random / 7 % VMS_PER_HOST as u64) as usize,
        );
        let mut view = HostView::clone(&snapshot.hosts[h]);
        let vm = &mut view.vms[v];
        vm.state = match vm.state {
            VmState::Running => VmState::Shutoff,
            _ => VmState::Running,
        };
        events.push(EventRecord {
            seq: n + 1,
            time_ms: 1_790_000_000_000 + n * 10,
            level: Level::Info,
            host: Some(view.record.id.clone()),
            message: format!("VM {} is {}", vm.name, vm.state.as_str()),
        });
        let keep = events.len().saturating_sub(1000);
        events.drain(..keep);
        snapshot.hosts[h] = Arc::new(view);
        snapshot.events = Arc::new(events.clone());
        snapshot.version += 1;
        published.lock().unwrap().push(Instant::now());
        tx.send_replace(Arc::new(snapshot.clone()));
    }
}

/// User and system CPU seconds of this process's threads whose name starts with `prefix`.
fn thread_cpu_secs(prefix: &str) -> f64 {
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(prefix) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        // utime and stime: fields 14 and 15 of the line, 12 and 13 after the name.
        total += fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
    }
    total as f64 / ticks_per_sec
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

struct Pki {
    ca: CertificateAuthority,
    console: Identity,
    operator: Identity,
}

fn pki() -> anyhow::Result<Pki> {
    let ca = CertificateAuthority::generate()?;
    let console_key = pki::generate_key_pem()?;
    let console = Identity {
        cert_der: ca.issue_console_cert(&console_key)?,
        key_pem: console_key,
    };
    let name = OperatorName::new("bench")?;
    let operator_key = pki::generate_key_pem()?;
    let csr = pki::operator_csr(&operator_key, &name)?;
    let operator = Identity {
        cert_der: ca.sign_operator_csr(&csr, &name)?,
        key_pem: operator_key,
    };
    Ok(Pki {
        ca,
        console,
        operator,
    })
}

fn run(windows: usize, pki: &Pki) -> anyhow::Result<()> {
    let engine = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("feed-engine")
        .enable_all()
        .build()?;
    let window = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("feed-window")
        .enable_all()
        .build()?;
    let base = Snapshot {
        hosts: (0..HOSTS).map(|n| Arc::new(host(n))).collect(),
        ..Snapshot::default()
    };
    let (tx, rx) = watch::channel(Arc::new(base));
    let server_config = pki::quic_server_config(pki::operator_server_config(
        &pki.console,
        pki.ca.cert_der(),
    )?)?;
    let server = {
        let _guard = engine.enter();
        quinn::Endpoint::server(server_config, "127.0.0.1:0".parse()?)?
    };
    let address: SocketAddr = server.local_addr()?;
    let connections = Arc::new(Mutex::new(Vec::new()));
    {
        let connections = connections.clone();
        let rx = rx.clone();
        engine.spawn(async move {
            while let Some(incoming) = server.accept().await {
                let Ok(connection) = incoming.await else {
                    continue;
                };
                connections.lock().unwrap().push(connection.clone());
                let rx = rx.clone();
                tokio::spawn(async move {
                    if let Ok((send, mut recv)) = connection.accept_bi().await {
                        let _ = recv.read_to_end(64).await;
                        send_feed(rx, send).await;
                    }
                });
            }
        });
    }
    let client_config = pki::quic_client_config(pki::operator_client_config(
        pki.ca.cert_der(),
        &pki.operator,
    )?)?;
    let connected = Instant::now();
    let mut feeds = Vec::new();
    for _ in 0..windows {
        let config = client_config.clone();
        feeds.push(window.block_on(async move {
            let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
            let connection = endpoint
                .connect_with(config, address, pki::CONSOLE_CERT_NAME)?
                .await?;
            let (mut send, recv) = connection.open_bi().await?;
            send.write_all(b"watch").await?;
            send.finish()?;
            let feed = receive_feed(send, recv)
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            anyhow::Ok((endpoint, connection, feed))
        })?);
    }
    let first_secs = connected.elapsed().as_secs_f64();
    let full_bytes = dunes_console::api::feed::encode(
        &dunes_console::api::feed::SnapshotFrame::Full(Snapshot::clone(&rx.borrow())),
    )?
    .len();

    let published: Published = Arc::default();
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
    for (_, _, feed) in &feeds {
        let (mut feed, published, latencies) = (feed.clone(), published.clone(), latencies.clone());
        window.spawn(async move {
            let mut seen = 0u64;
            while feed.changed().await.is_ok() {
                let version = feed.borrow_and_update().version;
                let now = Instant::now();
                let times = published.lock().unwrap();
                let mut lat = latencies.lock().unwrap();
                for v in seen + 1..=version {
                    if let Some(at) = times.get(v as usize - 1) {
                        lat.push(now.duration_since(*at).as_secs_f64() * 1000.0);
                    }
                }
                seen = version;
            }
        });
    }

    let sent_before: u64 = connections
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.stats().udp_tx.bytes)
        .sum();
    let cpu_before = thread_cpu_secs("feed-engine");
    let started = Instant::now();
    let generator = {
        let published = published.clone();
        std::thread::Builder::new()
            .name("generator".into())
            .spawn(move || generate(tx, published, RUN_SECS))?
    };
    generator.join().expect("the generator");
    // The last frames arrive.
    std::thread::sleep(Duration::from_millis(500));
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = thread_cpu_secs("feed-engine") - cpu_before;
    let sent: u64 = connections
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.stats().udp_tx.bytes)
        .sum::<u64>()
        - sent_before;
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_by(f64::total_cmp);
    let events = published.lock().unwrap().len();
    println!(
        "| {windows} | {HOSTS} × {VMS_PER_HOST} | {events} | {:.1} MB in {first_secs:.2} s | {:.1} ms | {:.1} ms | {:.1} ms | {:.2} MB/s | {:.0} % |",
        full_bytes as f64 / 1e6,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or_default(),
        sent as f64 / elapsed / windows as f64 / 1e6,
        cpu / elapsed / windows as f64 * 100.0,
    );
    drop(feeds);
    window.shutdown_timeout(Duration::from_secs(1));
    engine.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let pki = pki()?;
    println!(
        "| windows | hosts × VMs | VM events | first snapshot | p50 | p99 | max | stream per window | sender CPU per window (of a core) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for windows in [1, 4] {
        run(windows, &pki)?;
    }
    Ok(())
}
