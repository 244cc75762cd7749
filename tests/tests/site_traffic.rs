//! Traffic that leaves a site, over real links: three agents in network namespaces of their
//! own on one bridge, two in site `north` and one in `south`, and the console here. A process
//! instance on a north host talks to a listener on the other north host and to one on the
//! south host; only what goes south is counted as leaving its site.
//!
//! Needs root, iproute2 and python3 (`scripts/test.sh` installs them and runs as root in
//! CI); under CI a missing prerequisite fails the test instead of skipping it.

use std::time::Duration;

use dunes_console::engine::Command;
use dunes_tests::{
    deploy_service, enroll_online, netns, sent_and_out_of_site, spawn_lab_agent_at_site,
    start_engine,
};

/// What the talker sends each second to its neighbour in the site, and to the other site.
const IN_SITE_BYTES: usize = 100_000;
const OUT_OF_SITE_BYTES: usize = 150_000;
const PORT: u16 = 9099;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_what_leaves_the_site_counts_as_leaving_it() {
    if let Some(why) = netns::unavailable() {
        if std::env::var_os("CI").is_some() {
            panic!("the site traffic test cannot run here: {why}");
        }
        eprintln!("SKIPPED: {why}");
        return;
    }
    let lab = netns::Lab::new(3).expect("the lab is set up");
    let dir = tempfile::tempdir().unwrap();
    // The talker's process template, on the first north host only.
    let (neighbour, elsewhere) = (lab.hosts[1].ip.clone(), lab.hosts[2].ip.clone());
    let template = dir.path().join("north-a/storage/images/talker");
    std::fs::create_dir_all(&template).unwrap();
    let talker = format!(
        "import socket, time\n\
         def connect(host):\n    while True:\n        try:\n            return socket.create_connection((host, {PORT}))\n        except OSError:\n            time.sleep(0.5)\n\
         near, far = connect('{neighbour}'), connect('{elsewhere}')\n\
         while True:\n    near.sendall(b'n' * {IN_SITE_BYTES})\n    far.sendall(b'f' * {OUT_OF_SITE_BYTES})\n    time.sleep(1)\n"
    );
    std::fs::write(
        template.join("process.toml"),
        format!(
            "description = \"talks to two hosts\"\ncommand = [\"python3\", \"-c\", {talker:?}]\ndefault_vcpus = 1\ndefault_memory_mib = 32\n"
        ),
    )
    .unwrap();
    let agents = [
        spawn_lab_agent_at_site(&lab, 0, dir.path(), "north-a", "north").unwrap(),
        spawn_lab_agent_at_site(&lab, 1, dir.path(), "north-b", "north").unwrap(),
        spawn_lab_agent_at_site(&lab, 2, dir.path(), "south-a", "south").unwrap(),
    ];
    let _sinks = [
        netns::sink(Some(&lab.hosts[1].netns), PORT).unwrap(),
        netns::sink(Some(&lab.hosts[2].netns), PORT).unwrap(),
    ];
    let engine = start_engine(&dir.path().join("console")).await.unwrap();
    for a in &agents {
        enroll_online(&engine, a).await.unwrap();
    }
    deploy_service(
        &engine,
        "name = \"chatter\"\n[[application]]\nname = \"talker\"\nruntime = \"process\"\ntemplate = \"talker\"\nvcpus = 1\nmemory_mib = 32\n[rules]\npin = [{ application = \"talker\", hosts = [\"north-a\"] }]\n",
    )
    .await
    .unwrap();
    let vm = engine.snapshot().services[0].instances[0].record.vm.clone();
    // Per second, what it sent and what of that left the site, over the seconds that know
    // both; wait for a dozen rounds of sending.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let (all, out) = loop {
        let (all, out) = sent_and_out_of_site(&engine, &vm).await.unwrap();
        if out >= 12.0 * OUT_OF_SITE_BYTES as f64 {
            break (all, out);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not enough traffic measured: {all} B sent, {out} B out of the site"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    // 150 kB of every 250 kB go south.
    let share = out / all;
    assert!(
        (0.5..0.7).contains(&share),
        "{out} of {all} B counted as leaving the site"
    );
    // The cost report prices what left the site at the host's price.
    let lines = engine
        .request(|reply| Command::Cost {
            by: dunes_console::engine::statistics::cost::CostBy::Site,
            since_secs: 3600,
            reply,
        })
        .await
        .unwrap();
    let north = lines
        .iter()
        .find(|l| l.key == "north")
        .expect("north costs");
    assert!(north.usage.gb_transferred > 0.0, "{lines:?}");
    drop(engine);
    drop(agents);
}
