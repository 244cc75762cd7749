//! The protocol over real quinn on 127.0.0.1 with real certificates: what is accepted and
//! what is refused, before and after enrollment.

use std::time::Duration;

use dunes_agent::{
    config::AgentConfig,
    server::{AgentOptions, RunningAgent},
};
use dunes_console::engine::{
    console_pki::ConsolePki,
    fleet::enroll::{EnrollError, EnrollPolicy, enroll, probe},
    fleet::link::{LinkError, connect},
};
use dunes_shared::{
    model::HostId,
    pki::{self, Fingerprint},
    protocol::{Hello, ListVms, codes, features},
    rpc::{CallError, call},
};

struct Fixture {
    dir: tempfile::TempDir,
    agent: RunningAgent,
    console: ConsolePki,
    endpoint: quinn::Endpoint,
}

async fn fixture(host: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let agent = RunningAgent::start(AgentOptions {
        data_dir: dir.path().join("agent"),
        listen: "127.0.0.1:0".parse().unwrap(),
        libvirt_uri: "test:///default".into(),
        config: AgentConfig {
            host_id: Some(HostId::new(host).unwrap()),
            ..AgentConfig::default()
        },
        guest_dir: None,
    })
    .await
    .unwrap();
    let console = ConsolePki::load_or_create(&dir.path().join("console")).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    Fixture {
        dir,
        agent,
        console,
        endpoint,
    }
}

impl Fixture {
    fn address(&self) -> String {
        self.agent.local_addr.to_string()
    }

    async fn enroll(&self) {
        let token = self.agent.join_token.clone().unwrap();
        let done = enroll(
            &self.endpoint,
            &self.console,
            &self.address(),
            &token,
            Some(self.agent.fingerprint),
            EnrollPolicy::default(),
        )
        .await
        .unwrap();
        assert_eq!(done.host_id, self.agent.host_id);
    }

    /// Connects as the enrolled console, with the agent's own name and pinned key.
    async fn connect_console(
        &self,
    ) -> Result<(dunes_shared::rpc::Peer, dunes_shared::protocol::HelloReply), LinkError> {
        connect(
            &self.endpoint,
            &self.control_config(&self.console),
            &self.agent.host_id,
            &self.address(),
            self.agent.fingerprint,
        )
        .await
    }

    fn control_config(&self, console: &ConsolePki) -> quinn::ClientConfig {
        pki::quic_client_config(
            pki::control_client_config(self.console.ca.cert_der(), &console.identity).unwrap(),
        )
        .unwrap()
    }

    /// Opens a control connection with `config` and says hello.
    async fn hello_with(
        &self,
        config: quinn::ClientConfig,
        server_name: &str,
    ) -> Result<(), String> {
        let connecting = self
            .endpoint
            .connect_with(config, self.agent.local_addr, server_name)
            .map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(Duration::from_secs(5), connecting)
            .await
            .map_err(|_| "timeout".to_string())?
            .map_err(|e| format!("handshake: {e}"))?;
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            call(
                &conn,
                Hello {
                    console_name: "test".into(),
                    features: Vec::new(),
                },
            ),
        )
        .await
        .map_err(|_| "timeout".to_string())?;
        reply.map(|_| ()).map_err(|e| match e {
            CallError::Connection(quinn::ConnectionError::ApplicationClosed(close)) => {
                format!("closed by the agent with code {}", close.error_code)
            }
            other => format!(
                "{other}: {:?}",
                std::error::Error::source(&other).map(|s| s.to_string())
            ),
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_is_accepted_after_enrollment() {
    let f = fixture("proto-ok").await;
    f.enroll().await;
    let (peer, hello) = f.connect_console().await.unwrap();
    let conn = peer.conn;
    assert_eq!(hello.inventory.host_id, f.agent.host_id);
    assert!(hello.features.iter().any(|f| f == features::VM_LIFECYCLE));
    // The certificate the agent now presents is CA-signed, with the same pinned key.
    let cert = dunes_console::engine::fleet::link::peer_certificate(&conn).unwrap();
    pki::verify_host_cert(&cert, f.console.ca.cert_der(), &f.agent.host_id).unwrap();
    assert_eq!(
        Fingerprint::of_certificate(&cert).unwrap(),
        f.agent.fingerprint
    );
    call(&conn, ListVms).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_is_refused_before_enrollment() {
    let f = fixture("proto-new").await;
    // Not enrolled: the agent offers enrollment only, so the control ALPN cannot be agreed.
    let err = f
        .hello_with(
            f.control_config(&f.console),
            &pki::host_cert_name(&f.agent.host_id),
        )
        .await
        .unwrap_err();
    assert!(
        err.contains("peer doesn't support any known protocol"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_without_a_client_certificate() {
    let f = fixture("proto-nocert").await;
    f.enroll().await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(f.console.ca.cert_der().clone()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(pki::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![dunes_shared::protocol::ALPN_CONTROL.to_vec()];
    let config = pki::quic_client_config(tls).unwrap();
    let err = f
        .hello_with(config, &pki::host_cert_name(&f.agent.host_id))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        format!(
            "closed by the agent with code {}",
            codes::CLOSE_UNAUTHENTICATED
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_with_a_certificate_from_another_ca() {
    let f = fixture("proto-otherca").await;
    f.enroll().await;
    let other_dir = tempfile::tempdir().unwrap();
    let other = ConsolePki::load_or_create(other_dir.path()).unwrap();
    // Trusts the right CA for the agent, but presents a console certificate from another CA.
    let err = f
        .hello_with(
            f.control_config(&other),
            &pki::host_cert_name(&f.agent.host_id),
        )
        .await
        .unwrap_err();
    // The agent rejects the certificate during the handshake (TLS alert 51, decrypt_error);
    // the client only learns it when its first request fails.
    assert!(err.contains("invalid peer certificate"), "{err}");
    // And the real console still gets in.
    f.hello_with(
        f.control_config(&f.console),
        &pki::host_cert_name(&f.agent.host_id),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_with_a_host_certificate_from_the_same_ca() {
    let f = fixture("proto-role").await;
    f.enroll().await;
    // Signed by the cluster CA, but for a host: an agent may not drive another agent.
    let imposter = HostId::new("imposter").unwrap();
    let key_pem = pki::generate_key_pem().unwrap();
    let csr = pki::host_csr(&key_pem, &imposter).unwrap();
    let cert_der = f.console.ca.sign_host_csr(&csr, &imposter).unwrap();
    let identity = pki::Identity { key_pem, cert_der };
    let config = pki::quic_client_config(
        pki::control_client_config(f.console.ca.cert_der(), &identity).unwrap(),
    )
    .unwrap();
    let err = f
        .hello_with(config, &pki::host_cert_name(&f.agent.host_id))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        format!(
            "closed by the agent with code {}",
            codes::CLOSE_UNAUTHENTICATED
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolling_again_cuts_off_the_previous_console() {
    let f = fixture("proto-move").await;
    f.enroll().await;
    let (peer, _) = f.connect_console().await.unwrap();
    let old_conn = peer.conn;
    let fresh_token = || {
        dunes_agent::identity::AgentIdentity::load_or_create(&f.dir.path().join("agent"), None)
            .unwrap()
            .issue_token()
            .unwrap()
    };
    // Enrolled again into the same cluster: the console's connection stays.
    enroll(
        &f.endpoint,
        &f.console,
        &f.address(),
        &fresh_token(),
        Some(f.agent.fingerprint),
        EnrollPolicy::default(),
    )
    .await
    .unwrap();
    call(&old_conn, ListVms).await.unwrap();
    // Time for a wrong close to arrive, were one sent.
    tokio::time::sleep(Duration::from_millis(200)).await;
    call(&old_conn, ListVms).await.unwrap();
    assert!(old_conn.close_reason().is_none());

    // The operator moves the host to another cluster: a fresh token, another console's CA.
    let token = fresh_token();
    let new_dir = tempfile::tempdir().unwrap();
    let new_console = ConsolePki::load_or_create(new_dir.path()).unwrap();
    enroll(
        &f.endpoint,
        &new_console,
        &f.address(),
        &token,
        Some(f.agent.fingerprint),
        EnrollPolicy::default(),
    )
    .await
    .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), old_conn.closed())
        .await
        .expect("the old console's connection is closed");
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == codes::CLOSE_UNAUTHENTICATED),
        "{closed}"
    );
    // The old console cannot come back; the new one gets in.
    let new_config = pki::quic_client_config(
        pki::control_client_config(new_console.ca.cert_der(), &new_console.identity).unwrap(),
    )
    .unwrap();
    assert!(f.connect_console().await.is_err());
    connect(
        &f.endpoint,
        &new_config,
        &f.agent.host_id,
        &f.address(),
        f.agent.fingerprint,
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_not_named_as_enrolled_is_refused() {
    let f = fixture("proto-name").await;
    f.enroll().await;
    let wrong = HostId::new("someone-else").unwrap();
    let err = connect(
        &f.endpoint,
        &f.control_config(&f.console),
        &wrong,
        &f.address(),
        f.agent.fingerprint,
    )
    .await
    .unwrap_err();
    // Refused by the name check: the certificate is the agent's own, valid and CA-signed.
    let text = dunes_shared::error_chain(&err);
    assert!(matches!(err, LinkError::Connection(_)), "{text}");
    assert!(
        text.contains("certificate not valid for name \"someone-else.host.dunes\""),
        "{text}"
    );
    // A pinned key that differs is refused too, even with a valid certificate.
    let err = connect(
        &f.endpoint,
        &f.control_config(&f.console),
        &f.agent.host_id,
        &f.address(),
        Fingerprint([7; 32]),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, LinkError::KeyChanged { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_and_reused_tokens_are_refused() {
    let f = fixture("proto-token").await;
    let err = enroll(
        &f.endpoint,
        &f.console,
        &f.address(),
        "0000-0000",
        None,
        EnrollPolicy::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, EnrollError::Refused(ref m) if m.contains("wrong, used or older than 24 h")),
        "{err}"
    );
    // A fingerprint that differs from the agent's key stops enrollment before the token is sent.
    let token = f.agent.join_token.clone().unwrap();
    let err = enroll(
        &f.endpoint,
        &f.console,
        &f.address(),
        &token,
        Some(Fingerprint([1; 32])),
        EnrollPolicy::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, EnrollError::FingerprintMismatch { .. }),
        "{err}"
    );
    f.enroll().await;
    // Spent: the enrolled agent no longer even offers enrollment.
    let err = enroll(
        &f.endpoint,
        &f.console,
        &f.address(),
        &token,
        None,
        EnrollPolicy::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, EnrollError::EnrollmentClosed), "{err}");
    let err = enroll(
        &f.endpoint,
        &f.console,
        "not-an-address",
        &token,
        None,
        EnrollPolicy::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid address \"not-an-address\": expected HOST:PORT"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_the_stream_not_the_agent() {
    let f = fixture("proto-frames").await;
    f.enroll().await;
    let (peer, _) = f.connect_console().await.unwrap();
    let conn = peer.conn;
    for (bytes, code) in [
        (
            ((5 * 1024 * 1024) as u32).to_le_bytes().to_vec(),
            codes::STREAM_FRAME_TOO_LARGE,
        ),
        (
            vec![3, 0, 0, 0, 0xff, 0xff, 0xff],
            codes::STREAM_UNDECODABLE,
        ),
    ] {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&bytes).await.unwrap();
        let _ = send.finish();
        let err = recv.read_to_end(1024).await.unwrap_err();
        assert!(
            matches!(err, quinn::ReadToEndError::Read(quinn::ReadError::Reset(c)) if c == code),
            "{err:?}"
        );
    }
    // The connection and the agent are fine.
    call(&conn, ListVms).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probing_shows_the_key_and_changes_nothing() {
    let f = fixture("proto-probe").await;
    let presented = probe(&f.endpoint, &f.address()).await.unwrap();
    assert_eq!(presented, f.agent.fingerprint);
    // The token is untouched: enrollment still works afterwards.
    f.enroll().await;
    let err = probe(&f.endpoint, "127.0.0.1:1").await.unwrap_err();
    assert!(
        matches!(err, EnrollError::Unreachable { .. } | EnrollError::Timeout),
        "{err}"
    );
}

fn fresh_token(f: &Fixture) -> String {
    dunes_agent::identity::AgentIdentity::load_or_create(&f.dir.path().join("agent"), None)
        .unwrap()
        .issue_token()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_is_offered_again_only_while_a_fresh_token_is_unused() {
    let f = fixture("proto-reopen").await;
    f.enroll().await;
    let again = |token: String| {
        let f = &f;
        async move {
            enroll(
                &f.endpoint,
                &f.console,
                &f.address(),
                &token,
                Some(f.agent.fingerprint),
                EnrollPolicy::default(),
            )
            .await
        }
    };
    // Enrolled, no token: enrollment is closed, yet a probe still shows the key.
    let err = again("0000".into()).await.unwrap_err();
    assert!(matches!(err, EnrollError::EnrollmentClosed), "{err}");
    assert_eq!(
        probe(&f.endpoint, &f.address()).await.unwrap(),
        f.agent.fingerprint
    );
    // A fresh token opens it, for that token only, once.
    let token = fresh_token(&f);
    let err = again("0000".into()).await.unwrap_err();
    assert!(matches!(err, EnrollError::Refused(_)), "{err}");
    again(token.clone()).await.unwrap();
    let err = again(token).await.unwrap_err();
    assert!(matches!(err, EnrollError::EnrollmentClosed), "{err}");
    // A token older than 24 h opens nothing.
    let token = fresh_token(&f);
    let file = std::fs::File::options()
        .write(true)
        .open(f.dir.path().join("agent/identity/token.sha256"))
        .unwrap();
    file.set_modified(std::time::SystemTime::now() - Duration::from_secs(25 * 3600))
        .unwrap();
    let err = again(token).await.unwrap_err();
    assert!(matches!(err, EnrollError::EnrollmentClosed), "{err}");
}

/// Opens an enrollment connection, as anyone on the network can.
async fn enroll_connection(f: &Fixture) -> quinn::Connection {
    let config = pki::quic_client_config(pki::enroll_client_config().unwrap()).unwrap();
    f.endpoint
        .connect_with(config, f.agent.local_addr, "enroll.dunes")
        .unwrap()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_before_authentication_are_limited_to_64_kib() {
    let f = fixture("proto-preauth").await;
    let conn = enroll_connection(&f).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    // 100 KiB announced: refused from the length alone, well under the 4 MiB of control frames.
    send.write_all(&(100 * 1024u32).to_le_bytes())
        .await
        .unwrap();
    send.write_all(&[0x90; 64]).await.unwrap();
    // The stream is reset and the unauthenticated connection closed, both with the named code.
    let err = recv.read_to_end(1024).await.unwrap_err();
    let code = match &err {
        quinn::ReadToEndError::Read(quinn::ReadError::Reset(c)) => *c,
        quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(
            quinn::ConnectionError::ApplicationClosed(close),
        )) => close.error_code,
        other => panic!("{other:?}"),
    };
    assert_eq!(code, codes::STREAM_FRAME_TOO_LARGE);
    // The token is untouched: enrollment still works.
    f.enroll().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrollment_connection_is_closed_after_its_deadline() {
    let f = fixture("proto-deadline").await;
    let conn = enroll_connection(&f).await;
    // Says nothing: the agent closes it after 10 s.
    let started = std::time::Instant::now();
    let reason = tokio::time::timeout(Duration::from_secs(30), conn.closed())
        .await
        .expect("closed by the agent");
    assert!(
        matches!(&reason, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == codes::CLOSE_TIMEOUT),
        "{reason}"
    );
    assert!(started.elapsed() >= Duration::from_secs(9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_kind_the_agent_does_not_know_is_answered_and_the_link_stays() {
    let f = fixture("proto-future").await;
    f.enroll().await;
    let (peer, _) = f.connect_console().await.unwrap();
    // {"MigrateVm": {"name": "a"}}, a request of a later release.
    let mut payload = Vec::new();
    rmp::encode::write_map_len(&mut payload, 1).unwrap();
    rmp::encode::write_str(&mut payload, "MigrateVm").unwrap();
    rmp::encode::write_map_len(&mut payload, 1).unwrap();
    rmp::encode::write_str(&mut payload, "name").unwrap();
    rmp::encode::write_str(&mut payload, "a").unwrap();
    let (mut send, mut recv) = peer.conn.open_bi().await.unwrap();
    send.write_all(&(payload.len() as u32).to_le_bytes())
        .await
        .unwrap();
    send.write_all(&payload).await.unwrap();
    send.finish().unwrap();
    let reply: Result<(), dunes_shared::protocol::WireError> =
        dunes_shared::codec::read_frame(&mut recv).await.unwrap();
    let err = reply.unwrap_err();
    assert_eq!(err.code, dunes_shared::protocol::ErrorCode::Unsupported);
    assert!(err.message.contains("MigrateVm"), "{}", err.message);
    peer.call(ListVms).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_addresses_that_do_not_parse_are_refused_whole() {
    use dunes_shared::protocol::{ErrorCode, SiteAddresses};
    let f = fixture("proto-site").await;
    f.enroll().await;
    let (peer, _) = f.connect_console().await.unwrap();
    let refused = |err: CallError| match err {
        CallError::Remote(e) => (e.code, e.message),
        other => panic!("not the agent's refusal: {other}"),
    };
    let bad = peer
        .call(SiteAddresses {
            addresses: vec!["10.1.0.12".into(), "lausanne-2".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused(bad),
        (
            ErrorCode::BadRequest,
            "\"lausanne-2\" is not an IP address".to_string()
        )
    );
    let too_many = peer
        .call(SiteAddresses {
            addresses: vec!["10.1.0.12".into(); 10_001],
        })
        .await
        .unwrap_err();
    assert_eq!(refused(too_many).0, ErrorCode::BadRequest);
    // The link stays, and a good list is taken.
    peer.call(SiteAddresses {
        addresses: vec!["10.1.0.12".into(), "fd00::3".into()],
    })
    .await
    .unwrap();
}
