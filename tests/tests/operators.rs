//! Operators: a headless engine serves its API on `--operator-listen`; `ctl operator add`
//! writes credentials; `ctl --connect` and the library's `RemoteEngine` use them, each with
//! its role checked by the engine.

use std::{
    path::Path,
    process::Output,
    time::{Duration, Instant},
};

use dunes_console::api::{credential::Credential, remote::RemoteEngine};
use dunes_shared::{model::OperatorName, pki};
use dunes_tests::demo::{ctl, demo_with, json};
use serde_json::Value;

fn remote(credential: &Path, args: &[&str]) -> Output {
    let mut all = vec!["--connect", credential.to_str().unwrap()];
    all.extend_from_slice(args);
    ctl(Path::new("/nonexistent"), &all)
}

fn refusal(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

fn add(data: &Path, dir: &Path, name: &str, role: &str) -> std::path::PathBuf {
    let file = dir.join(format!("{name}.toml"));
    let added = json(&ctl(
        data,
        &[
            "--json",
            "operator",
            "add",
            name,
            "--role",
            role,
            "--out",
            file.to_str().unwrap(),
        ],
    ));
    assert_eq!(added["name"], name);
    assert_eq!(added["role"], role);
    file
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn operators_reach_the_engine_with_their_role_checked_on_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let (_console, data) = demo_with(dir.path(), &["--operator-listen", "127.0.0.1:0"]);
    let viewer = add(&data, dir.path(), "alice", "viewer");
    let operator = add(&data, dir.path(), "olga", "operator");
    let admin = add(&data, dir.path(), "root", "admin");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&viewer).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // A file that exists is not overwritten, and a second alice needs the first revoked.
    let again = ctl(
        &data,
        &[
            "operator",
            "add",
            "alice",
            "--role",
            "admin",
            "--out",
            viewer.to_str().unwrap(),
        ],
    );
    assert!(refusal(&again).contains("exists"));
    let twice = ctl(
        &data,
        &[
            "operator",
            "add",
            "alice",
            "--role",
            "admin",
            "--out",
            dir.path().join("alice2.toml").to_str().unwrap(),
        ],
    );
    assert!(refusal(&twice).contains("revoke them first"));

    // Consoles and screens are a permission of their own: a viewer may be given it, and an
    // operator refused it.
    let cleo = dir.path().join("cleo.toml");
    let otto = dir.path().join("otto.toml");
    for (name, role, flag, file) in [
        ("cleo", "viewer", "--consoles", &cleo),
        ("otto", "operator", "--no-consoles", &otto),
    ] {
        json(&ctl(
            &data,
            &[
                "--json",
                "operator",
                "add",
                name,
                "--role",
                role,
                flag,
                "--out",
                file.to_str().unwrap(),
            ],
        ));
    }
    let listed = json(&ctl(&data, &["--json", "operator", "list"]));
    let consoles = |name: &str| {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == name)
            .map(|o| o["consoles"].clone())
    };
    for (name, may) in [
        ("alice", false),
        ("olga", true),
        ("cleo", true),
        ("otto", false),
    ] {
        assert_eq!(consoles(name), Some(serde_json::Value::Bool(may)), "{name}");
    }
    let screenshot = |file: &Path| {
        remote(
            file,
            &[
                "vm",
                "screenshot",
                "crm-db",
                "--out",
                dir.path().join("x.png").to_str().unwrap(),
            ],
        )
    };
    for (file, who) in [(&viewer, "viewer alice"), (&otto, "operator otto")] {
        assert!(
            refusal(&screenshot(file)).contains(&format!(
                "{who} may not see VM screens: they have no console permission"
            )),
            "{who}"
        );
    }
    // Cleo gets past the check: the demo's VMs run on libvirt's test driver, without screens
    // (asked again while the demo may still be starting crm-db).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let said = refusal(&screenshot(&cleo));
        if said.contains("this VM has no screen") {
            break;
        }
        assert!(Instant::now() < deadline, "cleo's screenshot: {said}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!dir.path().join("x.png").exists());

    // Every read prints the same JSON remotely as locally (taken again while the fleet
    // moves on: a reading may change between the two).
    let shop = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/examples/shop.toml");
    json(&ctl(&data, &["--json", "service", "create", "-f", shop]));
    for read in [
        &["hosts"][..],
        &["vms"],
        &["services"],
        &["service", "show", "shop"],
        &["migrations"],
        &["autoscale", "show"],
        &["operator", "list"],
        &["forecast"],
        &["whatif", "drain", "lsn-2"],
        &["cost", "--by", "site"],
        &["whatif", "deploy", "shop"],
        &["events", "--limit", "10"],
        &["stats", "gva-1", "--since", "10m", "--resolution", "1m"],
        &[
            "stats",
            "site:geneva",
            "--since",
            "10m",
            "--resolution",
            "1m",
        ],
        &["audit"],
        &["audit", "verify"],
    ] {
        let mut args = vec!["--json"];
        args.extend_from_slice(read);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let there = remote(&viewer, &args);
            let here = ctl(&data, &args);
            assert!(
                there.status.success(),
                "{read:?}: {}",
                String::from_utf8_lossy(&there.stderr)
            );
            if json(&there) == json(&here) {
                break;
            }
            assert!(Instant::now() < deadline, "{read:?} differs remotely");
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    // A read the engine refuses says the same there as here.
    let snapshots = ["vm", "snapshot", "list", "wiki"];
    let (there, here) = (remote(&viewer, &snapshots), ctl(&data, &snapshots));
    assert!(!there.status.success() && !here.status.success());
    assert_eq!(refusal(&there), refusal(&here));
    assert!(
        refusal(&there).contains("its disk is raw"),
        "{}",
        refusal(&there)
    );
    // A plan's JSON and its exit code travel too (1: changes to make).
    let plan = ["--json", "service", "plan", "shop"];
    let (there, here) = (remote(&viewer, &plan), ctl(&data, &plan));
    assert_eq!(there.status.code(), Some(1));
    assert_eq!(here.status.code(), Some(1));
    assert_eq!(
        serde_json::from_slice::<Value>(&there.stdout).unwrap(),
        serde_json::from_slice::<Value>(&here.stdout).unwrap()
    );

    // What each role may not do, refused by the engine with the permission it lacks.
    let vm_stop = ["vm", "stop", "--force", "wiki"];
    let drain = ["host", "drain", "gva-1"];
    let define = ["service", "create", "-f", shop, "--replace"];
    let add_op = [
        "operator",
        "add",
        "mallory",
        "--role",
        "admin",
        "--out",
        "/tmp/never-written.toml",
    ];
    assert_eq!(
        refusal(&remote(&viewer, &vm_stop)),
        "dunes-console: viewer alice may not stop VMs: operators and admins only"
    );
    assert_eq!(
        refusal(&remote(&viewer, &["service", "deploy", "shop"])),
        "dunes-console: viewer alice may not deploy services: operators and admins only"
    );
    for (who, file) in [("viewer alice", &viewer), ("operator olga", &operator)] {
        assert_eq!(
            refusal(&remote(file, &drain)),
            format!("dunes-console: {who} may not drain hosts: admin only")
        );
        assert_eq!(
            refusal(&remote(file, &define)),
            format!("dunes-console: {who} may not define services: admin only")
        );
        assert!(
            refusal(&remote(file, &add_op)).ends_with("may not add operators: admin only"),
            "{who}"
        );
    }
    assert!(!Path::new("/tmp/never-written.toml").exists());
    // An image imported through --connect: its bytes go from where ctl runs (sparse on the
    // engine's side); a viewer's upload and a taken name are refused before any byte is
    // taken, and no upload is left behind.
    let disk = dir.path().join("far.raw");
    {
        let mut bytes = vec![0u8; 3 << 20];
        bytes[510] = 0x55;
        bytes[511] = 0xaa;
        bytes[(2 << 20)..(2 << 20) + 4].copy_from_slice(b"data");
        std::fs::write(&disk, &bytes).unwrap();
    }
    let upload = |who: &Path, name: &str| {
        remote(
            who,
            &[
                "--json",
                "image",
                "import",
                disk.to_str().unwrap(),
                "--name",
                name,
            ],
        )
    };
    let imported = json(&upload(&admin, "far"));
    assert_eq!(imported["format"], "raw", "{imported}");
    assert_eq!(
        imported["blake3"],
        blake3::hash(&std::fs::read(&disk).unwrap())
            .to_hex()
            .to_string()
    );
    assert!(
        refusal(&upload(&viewer, "near"))
            .contains("viewer alice may not import images: admin only")
    );
    assert!(refusal(&upload(&admin, "far")).contains("an image named far is in the library"));
    assert!(
        std::fs::read_dir(data.join("images/uploads"))
            .unwrap()
            .next()
            .is_none()
    );

    // What each may do.
    let stopped = json(&remote(
        &operator,
        &["--json", "vm", "stop", "--force", "wiki"],
    ));
    assert_eq!(stopped["state"], "shutoff");
    let started = json(&remote(&operator, &["--json", "vm", "start", "wiki"]));
    assert_eq!(started["state"], "running");
    // (A drain would start migrations under the rest of this test: a definition instead.)
    let defined = json(&remote(
        &admin,
        &["--json", "service", "create", "-f", shop, "--replace"],
    ));
    assert_eq!(defined["name"], "shop");
    let listed = json(&remote(&admin, &["--json", "operator", "list"]));
    assert_eq!(listed.as_array().unwrap().len(), 5, "{listed}");

    // Scopes limit what an operator changes: a service's instances and the service, or
    // what runs on a site's hosts, both ends of a move included.
    let scoped = |name: &str, scope: &str| {
        let file = dir.path().join(format!("{name}.toml"));
        json(&ctl(
            &data,
            &[
                "--json",
                "operator",
                "add",
                name,
                "--role",
                "operator",
                "--scope",
                scope,
                "--out",
                file.to_str().unwrap(),
            ],
        ));
        file
    };
    let sam = scoped("sam", "service:shop");
    let gina = scoped("gina", "site:geneva");
    assert_eq!(
        refusal(&remote(&sam, &vm_stop)),
        "dunes-console: operator sam may not stop VMs on wiki: outside service:shop"
    );
    let rule = [
        "autoscale",
        "set",
        "shop/web",
        "--above",
        "80",
        "--below",
        "10",
        "--max",
        "3",
    ];
    json(&remote(&sam, &[&["--json"][..], &rule].concat()));
    json(&remote(
        &sam,
        &["--json", "autoscale", "remove", "shop/web"],
    ));
    assert_eq!(
        refusal(&remote(&gina, &vm_stop)),
        "dunes-console: operator gina may not stop VMs on wiki: outside site:geneva"
    );
    assert_eq!(
        refusal(&remote(
            &gina,
            &["vm", "migrate", "bi-warehouse", "--to", "lsn-1"]
        )),
        "dunes-console: operator gina may not migrate VMs on host lsn-1: outside site:geneva"
    );
    assert!(refusal(&remote(&gina, &rule)).contains("on service shop: outside site:geneva"));
    let stopped = json(&remote(
        &gina,
        &["--json", "vm", "stop", "--force", "bi-warehouse"],
    ));
    assert_eq!(stopped["state"], "shutoff");
    // Reads are not limited: gina sees the VMs of lausanne too.
    let seen = json(&remote(&gina, &["--json", "vms"]));
    assert!(
        seen.as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "wiki" && v["host"] == "lsn-2"),
        "{seen}"
    );
    let bad = ctl(
        &data,
        &[
            "operator",
            "add",
            "x",
            "--role",
            "viewer",
            "--scope",
            "pool:a",
            "--out",
            dir.path().join("x.toml").to_str().unwrap(),
        ],
    );
    assert!(refusal(&bad).contains("write service:NAME or site:NAME"));
    assert!(!dir.path().join("x.toml").exists());
}

#[test]
fn revocation_ends_a_live_session_and_foreign_certificates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_console, data) = demo_with(dir.path(), &["--operator-listen", "127.0.0.1:0"]);
    let file = add(&data, dir.path(), "bob", "viewer");
    let credential = Credential::load(&file).unwrap();
    let rt = runtime();
    let session = rt.block_on(RemoteEngine::connect(&credential)).unwrap();
    assert_eq!(session.welcome.operator.as_str(), "bob");
    assert_eq!(session.welcome.role, "viewer");
    let client = dunes_console::api::EngineClient::Remote {
        session: std::sync::Arc::new(session),
        timeout: Duration::from_secs(30),
    };
    let hosts = rt
        .block_on(client.hosts(dunes_console::api::ops::ListHosts {}))
        .unwrap();
    assert_eq!(hosts.len(), 3);

    let revoked = json(&ctl(&data, &["--json", "operator", "revoke", "bob"]));
    assert!(revoked["revoked"].is_string(), "{revoked}");
    let dunes_console::api::EngineClient::Remote { session, .. } = &client else {
        unreachable!()
    };
    let why = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), session.closed()).await })
        .expect("the session ends once the operator is revoked");
    assert!(why.contains("revoked"), "{why}");
    assert!(
        rt.block_on(client.hosts(dunes_console::api::ops::ListHosts {}))
            .is_err()
    );
    let again = rt.block_on(RemoteEngine::connect(&credential)).unwrap_err();
    assert!(again.to_string().contains("bob is revoked"), "{again}");
    let listed = json(&ctl(&data, &["--json", "operator", "list"]));
    assert!(listed[0]["revoked"].is_string(), "{listed}");

    // An agent's certificate from this cluster is no operator's.
    let identity = data.join("demo-agents/lsn-1/identity");
    let cert_pem = |der: Vec<u8>| pem::encode(&pem::Pem::new("CERTIFICATE", der));
    let agent = Credential {
        operator: OperatorName::new("lsn-1").unwrap(),
        key_pem: std::fs::read_to_string(identity.join("key.pem")).unwrap(),
        certificate_pem: cert_pem(std::fs::read(identity.join("cert.der")).unwrap()),
        ..credential.clone()
    };
    let err = rt.block_on(RemoteEngine::connect(&agent)).unwrap_err();
    assert!(
        err.to_string().contains("not an operator certificate"),
        "{err}"
    );
    // An operator certificate from another CA does not get through the handshake.
    let foreign_ca = pki::CertificateAuthority::generate().unwrap();
    let key_pem = pki::generate_key_pem().unwrap();
    let bob = OperatorName::new("bob").unwrap();
    let foreign = Credential {
        key_pem: key_pem.clone(),
        certificate_pem: cert_pem(
            foreign_ca
                .sign_operator_csr(&pki::operator_csr(&key_pem, &bob).unwrap(), &bob)
                .unwrap()
                .to_vec(),
        ),
        ..credential.clone()
    };
    let err = rt.block_on(RemoteEngine::connect(&foreign)).unwrap_err();
    assert!(
        matches!(
            err,
            dunes_console::api::remote::ConnectError::Unreachable { .. }
        ),
        "{err}"
    );
    // Bad credential files say what is wrong in one line.
    let loose = dir.path().join("loose.toml");
    std::fs::copy(&file, &loose).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let out = remote(&loose, &["hosts"]);
    let line = refusal(&out);
    assert!(line.contains("chmod 600") && !line.contains('\n'), "{line}");
    let _: Value = json(&ctl(&data, &["--json", "hosts"]));
}

/// Operator certificates are short-lived and renewed over the operator's own session, as
/// the hosts' are over theirs.
#[test]
fn an_operator_certificate_is_renewed_before_it_expires() {
    use dunes_console::{
        api::{EngineClient, ops},
        engine::{EngineOptions, start_with},
    };
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let engine = start_with(
            &dir.path().join("console"),
            EngineOptions {
                cert_lifetime: Duration::from_secs(12),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let endpoint =
            dunes_console::api::remote::serve(engine.clone(), "127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
        let local = EngineClient::InProcess(engine.clone());
        let name = OperatorName::new("rita").unwrap();
        let key_pem = pki::generate_key_pem().unwrap();
        let csr = pki::operator_csr(&key_pem, &name).unwrap();
        let issued = local
            .add_operator(ops::AddOperator {
                name: "rita".into(),
                role: "viewer".into(),
                scopes: Vec::new(),
                csr_pem: pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", csr)),
                consoles: None,
            })
            .await
            .unwrap();
        let file = dir.path().join("rita.toml");
        let mut credential = Credential {
            operator: name,
            engine: endpoint.address.to_string(),
            key_pem,
            certificate_pem: issued.certificate_pem.clone(),
            ca_pem: issued.ca_pem,
        };
        credential.write(&file).unwrap();
        let first = credential.clone();
        let session = RemoteEngine::connect(&credential).await.unwrap();
        // Not due yet; then due at two thirds of its 12 s.
        assert!(!session.renew_if_due(&mut credential, &file).await.unwrap());
        let due = credential.renew_at().unwrap();
        while std::time::SystemTime::now() < due {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(session.renew_if_due(&mut credential, &file).await.unwrap());
        assert_ne!(credential.certificate_pem, issued.certificate_pem);
        assert!(credential.renew_at().unwrap() > due);
        let written = Credential::load(&file).unwrap();
        assert_eq!(written, credential);
        // The renewed certificate opens a session, as the same operator with the same key.
        let again = RemoteEngine::connect(&written).await.unwrap();
        assert_eq!(again.welcome.operator.as_str(), "rita");
        // A credential left unrenewed says so once it has expired.
        let expires = pki::cert_validity(&first.identity().unwrap().cert_der)
            .unwrap()
            .expires;
        while std::time::SystemTime::now() <= expires {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let err = RemoteEngine::connect(&first).await.unwrap_err();
        assert!(err.to_string().contains("certificate expired on"), "{err}");
        // The local administrator has no certificate of their own to renew.
        let err = local
            .renew_operator(ops::RenewOperator {
                csr_pem: String::new(),
            })
            .await
            .unwrap_err();
        assert!(err.message.contains("over their own session"), "{err}");
    });
}

/// A window elsewhere follows the engine through its snapshot feed: the whole snapshot, then
/// what changes.
#[test]
fn a_remote_snapshot_follows_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let (_console, data) = demo_with(dir.path(), &["--operator-listen", "127.0.0.1:0"]);
    let file = add(&data, dir.path(), "wanda", "viewer");
    let credential = Credential::load(&file).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let session = RemoteEngine::connect(&credential).await.unwrap();
        let mut snapshots = session.watch().await.unwrap();
        let first = snapshots.borrow_and_update().clone();
        assert_eq!(first.hosts.len(), 3);
        assert_eq!(first.hosts.iter().map(|h| h.vms.len()).sum::<usize>(), 7);
        let wiki_state = |s: &dunes_console::engine::Snapshot| {
            s.find_vm("wiki")
                .map(|(_, vm)| vm.state.as_str().to_string())
        };
        assert_eq!(wiki_state(&first).as_deref(), Ok("running"));
        // A change made locally reaches the remote snapshot, with its event.
        let stopped = tokio::task::spawn_blocking({
            let data = data.clone();
            move || ctl(&data, &["--json", "vm", "stop", "--force", "wiki"])
        })
        .await
        .unwrap();
        assert!(stopped.status.success());
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let now = snapshots.borrow_and_update().clone();
                if wiki_state(&now).as_deref() == Ok("shutoff")
                    && now
                        .events
                        .iter()
                        .any(|e| e.message.contains("forcing VM wiki off"))
                {
                    break;
                }
                snapshots.changed().await.unwrap();
            }
        })
        .await
        .expect("the stop reaches the remote snapshot");
    });
}
