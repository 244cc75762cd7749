//! What measuring process instances' TCP traffic costs the agent each second: with this
//! process holding `CONNECTIONS` loopback connections (both ends, so twice as many sockets),
//! one round is what the agent does per sample: list the sockets its instances hold
//! (/proc/PID/fd), dump the kernel's TCP sockets (sock_diag, IPv4 and IPv6) and add up each
//! socket's growth. Descriptors are listed only in rounds where the kernel lists a socket it
//! did not list before (and every 30th): cases with lasting connections and with a new one
//! each round. The
//! cases with 100 instances stand for 100 VMs on QEMU's user-mode network (100 fd tables).
//! Run with `cargo bench -p dunes-agent --bench traffic`; method and
//! results in docs/BENCHMARKS.md.

use std::{
    io::Write,
    net::{TcpListener, TcpStream},
    time::Instant,
};

use dunes_agent::traffic::{SocketOwners, TrafficMeter, sock_diag};
use dunes_shared::model::VmName;

const ROUNDS: usize = 200;

fn main() -> anyhow::Result<()> {
    // (connections, instances, churn): process instances, or VMs on QEMU's user-mode network
    // (one QEMU process each, whose fd table is listed when a round lists descriptors); with
    // churn, a new connection every round, so that every round lists them.
    for (connections, instances, churn) in [
        (10usize, 10usize, false),
        (100, 10, false),
        (1000, 10, false),
        (200, 100, false),
        (1000, 10, true),
        (200, 100, true),
    ] {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let mut pairs = Vec::with_capacity(connections);
        for _ in 0..connections {
            let mut client = TcpStream::connect(listener.local_addr()?)?;
            let (server, _) = listener.accept()?;
            client.write_all(&[1u8; 1000])?;
            pairs.push((client, server));
        }
        // Each instance's process is this one: its fd table is listed once per instance
        // (the cost of /proc/PID/fd), and the sockets are shared out between the instances
        // (the cost of adding up each socket once).
        let pid = std::process::id();
        let pids: Vec<(VmName, Vec<u32>)> = (0..instances)
            .map(|i| (VmName::new(format!("p{i}")).expect("valid name"), vec![pid]))
            .collect();
        let mut meter = TrafficMeter::new(Vec::new());
        meter.set_site_hosts(Vec::new());
        let mut owners = SocketOwners::default();
        let mut times = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            if churn {
                // The oldest connection closes and a new one opens, as a busy host's do.
                pairs.remove(0);
                let client = TcpStream::connect(listener.local_addr()?)?;
                let (server, _) = listener.accept()?;
                pairs.push((client, server));
            }
            let started = Instant::now();
            let sockets = sock_diag::tcp_sockets()?;
            let listed = owners.owned(pids.clone(), &sockets);
            // Shared out: every instance holds a slice of this process's sockets.
            let all = listed.first().map(|(_, i)| i.clone()).unwrap_or_default();
            let share = all.len().div_ceil(instances).max(1);
            let mut shares = all.chunks(share);
            let owned: Vec<(VmName, Vec<u32>)> = listed
                .into_iter()
                .map(|(name, _)| (name, shares.next().map(<[u32]>::to_vec).unwrap_or_default()))
                .collect();
            meter.account(owned, &sockets);
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        println!(
            "{connections:>5} connections ({} sockets), {instances:>3} instances, {}: round mean {mean:.3} ms, p50 {:.3} ms, p99 {:.3} ms = {:.3} % of a core at 1 Hz ({} of {ROUNDS} rounds listed descriptors)",
            2 * connections,
            if churn {
                "a new one each round"
            } else {
                "lasting"
            },
            times[times.len() / 2],
            times[times.len() * 99 / 100],
            mean / 10.0,
            owners.listings(),
        );
    }
    Ok(())
}
