//! A console facing an agent of another release, over real quinn with real certificates: the
//! "agent" here is a hand-driven peer that speaks the wire protocol byte for byte, so it can
//! send what a newer agent would (an unknown event kind, features this console lacks) or
//! misbehave (drop every link at once).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use dunes_console::engine::{
    console_pki::ConsolePki,
    fleet::link::{LinkContext, LinkMessage, connect, run_link},
};
use dunes_shared::{
    codec::{encode_frame, read_frame},
    model::{HostId, HostInventory, HostStatus, Prices, Site},
    pki::{self, Fingerprint, Identity},
    protocol::{AgentEvent, HelloReply, ListVms, Request, WireError, codes},
    rpc::CallError,
};
use tokio::sync::{mpsc, watch};

/// How a fake agent treats each control connection after answering the hello.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Pushes an unknown event kind among known ones, then keeps the link up.
    NewerEvents,
    /// Closes the connection at once.
    DropAtOnce,
    /// Keeps the link up and counts the requests it gets.
    Quiet,
}

struct FakeAgent {
    host: HostId,
    address: String,
    fingerprint: Fingerprint,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    _endpoint: quinn::Endpoint,
}

fn inventory(host: &HostId) -> HostInventory {
    HostInventory {
        host_id: host.clone(),
        hostname: "fake".into(),
        cpus: 1,
        cpu_model: "fake".into(),
        memory_mib: 1024,
        storage_total_mib: 1,
        storage_free_mib: 1,
        network: Vec::new(),
        runtimes: Vec::new(),
        site: Site::default(),
        prices: Prices::default(),
        security_level: 0,
        agent_version: "9.9.9".into(),
        sizes_from: Default::default(),
        interpreters: Vec::new(),
        template_disks: Vec::new(),
    }
}

/// Bytes of `{"AppChanged": {"app": "shop", "instances": 3}}`: an event kind of a later release.
fn future_event_frame() -> Vec<u8> {
    use rmp::encode::{write_map_len, write_str, write_uint};
    let mut payload = Vec::new();
    write_map_len(&mut payload, 1).unwrap();
    write_str(&mut payload, "AppChanged").unwrap();
    write_map_len(&mut payload, 2).unwrap();
    write_str(&mut payload, "app").unwrap();
    write_str(&mut payload, "shop").unwrap();
    write_str(&mut payload, "instances").unwrap();
    write_uint(&mut payload, 3).unwrap();
    let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
    frame.extend(payload);
    frame
}

async fn fake_agent(
    console: &ConsolePki,
    name: &str,
    features: &[&str],
    behaviour: Behaviour,
) -> FakeAgent {
    let host = HostId::new(name).unwrap();
    let key_pem = pki::generate_key_pem().unwrap();
    let csr = pki::host_csr(&key_pem, &host).unwrap();
    let cert_der = console.ca.sign_host_csr(&csr, &host).unwrap();
    let fingerprint = pki::key_fingerprint(&key_pem).unwrap();
    let identity = Identity { key_pem, cert_der };
    let tls = pki::agent_server_config(&identity, Some(console.ca.cert_der()), false).unwrap();
    let endpoint = quinn::Endpoint::server(
        pki::quic_server_config(tls).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let address = endpoint.local_addr().unwrap().to_string();
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let features: Vec<String> = features.iter().map(|f| f.to_string()).collect();
    {
        let (endpoint, host, connections, requests) = (
            endpoint.clone(),
            host.clone(),
            connections.clone(),
            requests.clone(),
        );
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let Ok(conn) = incoming.await else { continue };
                connections.fetch_add(1, Ordering::SeqCst);
                let (host, features, requests) = (host.clone(), features.clone(), requests.clone());
                tokio::spawn(async move {
                    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                        return;
                    };
                    let Ok(Request::Hello(_)) = read_frame::<_, Request>(&mut recv).await else {
                        return;
                    };
                    let reply: Result<HelloReply, WireError> = Ok(HelloReply {
                        inventory: inventory(&host),
                        status: HostStatus::default(),
                        vms: Vec::new(),
                        features,
                    });
                    send.write_all(&encode_frame(&reply).unwrap())
                        .await
                        .unwrap();
                    let _ = send.finish();
                    match behaviour {
                        Behaviour::DropAtOnce => {
                            conn.close(codes::CLOSE_NORMAL, b"bye");
                        }
                        Behaviour::NewerEvents => {
                            let mut events = conn.open_uni().await.unwrap();
                            let known = |e: AgentEvent| encode_frame(&e).unwrap();
                            for frame in [
                                future_event_frame(),
                                known(AgentEvent::HostStatus(HostStatus {
                                    vms_running: 7,
                                    ..HostStatus::default()
                                })),
                                future_event_frame(),
                                known(AgentEvent::VmRemoved {
                                    name: "gone".parse().unwrap(),
                                }),
                            ] {
                                events.write_all(&frame).await.unwrap();
                            }
                            conn.closed().await;
                        }
                        Behaviour::Quiet => {
                            let _events = conn.open_uni().await;
                            while conn.accept_bi().await.is_ok() {
                                requests.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                });
            }
        });
    }
    FakeAgent {
        host,
        address,
        fingerprint,
        connections,
        requests,
        _endpoint: endpoint,
    }
}

struct Console {
    _dir: tempfile::TempDir,
    pki: ConsolePki,
    endpoint: quinn::Endpoint,
}

fn console() -> Console {
    let dir = tempfile::tempdir().unwrap();
    let pki = ConsolePki::load_or_create(dir.path()).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    Console {
        _dir: dir,
        pki,
        endpoint,
    }
}

impl Console {
    fn config(&self) -> quinn::ClientConfig {
        pki::quic_client_config(
            pki::control_client_config(self.pki.ca.cert_der(), &self.pki.identity).unwrap(),
        )
        .unwrap()
    }

    /// Runs the console's link task against `agent`; its messages arrive on the receiver.
    /// Keep the address sender: a dropped one reads as an address change.
    fn link(
        &self,
        agent: &FakeAgent,
    ) -> (
        mpsc::Receiver<LinkMessage>,
        tokio::task::JoinHandle<()>,
        watch::Sender<String>,
    ) {
        let (tx, rx) = mpsc::channel(64);
        let (address_tx, address_rx) = watch::channel(agent.address.clone());
        let (_config_tx, config) = watch::channel(self.config());
        let task = tokio::spawn(run_link(
            agent.host.clone(),
            address_rx,
            agent.fingerprint,
            LinkContext {
                endpoint: self.endpoint.clone(),
                config,
                // The fake agents renew nothing.
                ca: None,
                tx,
            },
        ));
        (rx, task, address_tx)
    }
}

async fn next(rx: &mut mpsc::Receiver<LinkMessage>) -> LinkMessage {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a link message within 10 s")
        .expect("link task running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_event_kind_is_skipped_once_counted_and_the_link_stays() {
    let console = console();
    let agent = fake_agent(
        &console.pki,
        "newer",
        &["vm-lifecycle", "apps"],
        Behaviour::NewerEvents,
    )
    .await;
    let (mut rx, task, _address) = console.link(&agent);
    match next(&mut rx).await {
        LinkMessage::Connected { peer, .. } => {
            assert!(peer.offers("apps") && peer.offers("vm-lifecycle"));
        }
        other => panic!("expected Connected, got {other:?}"),
    }
    match next(&mut rx).await {
        LinkMessage::Skipped { kind, count, .. } => {
            assert_eq!((kind.as_str(), count), ("AppChanged", 1))
        }
        other => panic!("expected Skipped, got {other:?}"),
    }
    match next(&mut rx).await {
        LinkMessage::Event {
            event: AgentEvent::HostStatus(s),
            ..
        } => assert_eq!(s.vms_running, 7),
        other => panic!("expected the status after the unknown event, got {other:?}"),
    }
    // The second AppChanged is skipped and counted, and the known event after it arrives.
    match next(&mut rx).await {
        LinkMessage::Skipped { kind, count, .. } => {
            assert_eq!((kind.as_str(), count), ("AppChanged", 2))
        }
        other => panic!("expected the count of skipped events, got {other:?}"),
    }
    match next(&mut rx).await {
        LinkMessage::Event {
            event: AgentEvent::VmRemoved { name },
            ..
        } => assert_eq!(name.as_str(), "gone"),
        other => panic!("expected VmRemoved, got {other:?}"),
    }
    // And the link is not lost.
    let more = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await;
    assert!(
        more.is_err(),
        "nothing more, in particular no Lost: {more:?}"
    );
    assert_eq!(agent.connections.load(Ordering::SeqCst), 1);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_drops_as_soon_as_it_is_up_backs_off() {
    let console = console();
    let agent = fake_agent(
        &console.pki,
        "flaky",
        &["vm-lifecycle"],
        Behaviour::DropAtOnce,
    )
    .await;
    let (mut rx, task, _address) = console.link(&agent);
    let started = Instant::now();
    let mut lost = 0;
    while started.elapsed() < Duration::from_secs(3) {
        if let Ok(Some(LinkMessage::Lost { .. })) =
            tokio::time::timeout(Duration::from_millis(100), rx.recv()).await
        {
            lost += 1;
        }
    }
    task.abort();
    let connections = agent.connections.load(Ordering::SeqCst);
    // Backoff 250 ms, 500 ms, 1 s, 2 s (less up to half, at random): at most 6 links in 3 s.
    // Reconnecting at once would make hundreds.
    assert!(
        (2..=6).contains(&connections),
        "{connections} connections in 3 s ({lost} losses reported)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_agent_did_not_announce_is_refused_before_it_is_sent() {
    let console = console();
    let agent = fake_agent(&console.pki, "older", &[], Behaviour::Quiet).await;
    let (peer, hello) = connect(
        &console.endpoint,
        &console.config(),
        &agent.host,
        &agent.address,
        agent.fingerprint,
    )
    .await
    .unwrap();
    assert_eq!(hello.inventory.agent_version, "9.9.9");
    let err = peer.call(ListVms).await.unwrap_err();
    assert!(
        matches!(
            err,
            CallError::NotOffered {
                request: "list-vms",
                feature: "vm-lifecycle"
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "the peer does not offer vm-lifecycle (needed for list-vms); update it"
    );
    // Nothing reached the agent after the hello.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(agent.requests.load(Ordering::SeqCst), 0);
}
