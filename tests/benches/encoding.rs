//! What the self-describing wire encoding costs against the positional one it replaced
//! (postcard, the first release's): bytes per message and time to encode and decode.
//! Run: `cargo bench -p dunes-tests --bench encoding`.
//!
//! Messages: a hello reply with 100 VMs (the largest message a console reads often), a host
//! status event (sent every second by every agent), and a VM change event.

use std::time::{Duration, Instant};

use dunes_shared::{
    codec::{decode_message, decode_payload, encode_payload},
    model::{
        HostId, HostInventory, HostStatus, NetworkInterface, Prices, RuntimeInfo, RuntimeKind,
        Site, SizesFrom, TemplateName, VmName, VmState, VmStatus,
    },
    protocol::{AgentEvent, HelloReply, WireError},
};
use serde::{Serialize, de::DeserializeOwned};

fn vm(i: usize) -> VmStatus {
    VmStatus {
        uuid: format!("6f1c2a4e-9a55-4b0e-8f4d-{i:012}"),
        name: VmName::new(format!("web-{i}")).unwrap(),
        state: if i.is_multiple_of(3) {
            VmState::Shutoff
        } else {
            VmState::Running
        },
        vcpus: 2,
        memory_mib: 2048,
        template: Some(TemplateName::new("tiny").unwrap()),
        disk_bytes: 1_234_567_890 + i as u64,
        runtime: RuntimeKind::Libvirt,
        overlay_on: None,
        disks: None,
        nics: None,
        autostart: None,
        next_start: None,
        addresses: None,
        snapshots: None,
        installer: None,
        screen: false,
    }
}

fn hello() -> Result<HelloReply, WireError> {
    Ok(HelloReply {
        inventory: HostInventory {
            host_id: HostId::new("node-17").unwrap(),
            hostname: "node-17.example".into(),
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
            site: Site::default(),
            prices: Prices::default(),
            security_level: 2,
            agent_version: "0.1.0".into(),
            sizes_from: SizesFrom::Machine,
            interpreters: Vec::new(),
            template_disks: Vec::new(),
        },
        status: status(),
        vms: (0..100).map(vm).collect(),
        features: vec![
            "vm-lifecycle".into(),
            "templates".into(),
            "cert-renewal".into(),
        ],
    })
}

fn status() -> HostStatus {
    HostStatus {
        cpu_load_percent: 37.5,
        memory_used_mib: 200_000,
        memory_total_mib: 512 * 1024,
        storage_free_mib: 3_500_000,
        vms_running: 66,
        uptime_secs: 1_234_567,
    }
}

/// Mean time per call of `f`, over enough calls to take about half a second.
fn time_per_call(mut f: impl FnMut()) -> Duration {
    let started = Instant::now();
    let mut calls = 0u32;
    while started.elapsed() < Duration::from_millis(500) {
        for _ in 0..100 {
            f();
        }
        calls += 100;
    }
    started.elapsed() / calls
}

fn row<T: Serialize + DeserializeOwned>(name: &str, value: &T) {
    let ours = encode_payload(value).unwrap();
    let theirs = postcard::to_allocvec(value).unwrap();
    let enc_ours = time_per_call(|| {
        std::hint::black_box(encode_payload(std::hint::black_box(value)).unwrap());
    });
    let enc_theirs = time_per_call(|| {
        std::hint::black_box(postcard::to_allocvec(std::hint::black_box(value)).unwrap());
    });
    let dec_ours = time_per_call(|| {
        std::hint::black_box(decode_payload::<T>(std::hint::black_box(&ours)).unwrap());
    });
    let dec_theirs = time_per_call(|| {
        std::hint::black_box(postcard::from_bytes::<T>(std::hint::black_box(&theirs)).unwrap());
    });
    println!(
        "| {name} | {} B | {} B | {:.1?} | {:.1?} | {:.1?} | {:.1?} |",
        ours.len(),
        theirs.len(),
        enc_ours,
        enc_theirs,
        dec_ours,
        dec_theirs
    );
}

fn main() {
    println!(
        "| message | MessagePack (now) | postcard (before) | encode now | encode before | decode now | decode before |"
    );
    println!("|---|---|---|---|---|---|---|");
    row("hello reply, 100 VMs", &hello());
    row("host status event", &AgentEvent::HostStatus(status()));
    row("VM changed event", &AgentEvent::VmChanged(vm(7)));
    // The extra step an event takes: telling an unknown variant from garbage on failure
    // only, so a known event costs the plain decode.
    let event = encode_payload(&AgentEvent::HostStatus(status())).unwrap();
    let t = time_per_call(|| {
        std::hint::black_box(decode_message::<AgentEvent>(std::hint::black_box(&event)).unwrap());
    });
    println!("\ndecode_message of a known event: {t:.1?}");
}
