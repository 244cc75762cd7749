//! What measuring process instances' TCP traffic costs the agent each second: with this
//! process holding `CONNECTIONS` loopback connections (both ends, so twice as many sockets),
//! one round is what the agent does per sample: list the sockets its instances hold
//! (/proc/PID/fd), dump the kernel's TCP sockets (sock_diag, IPv4 and IPv6) and add up each
//! socket's growth. Run with `cargo bench -p dunes-agent --bench traffic`; method and
//! results in docs/BENCHMARKS.md.

use std::{
    io::Write,
    net::{TcpListener, TcpStream},
    time::Instant,
};

use dunes_agent::traffic::{TrafficMeter, sock_diag, socket_inodes};
use dunes_shared::model::VmName;

const ROUNDS: usize = 200;

fn main() -> anyhow::Result<()> {
    for connections in [10usize, 100, 1000] {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let mut pairs = Vec::with_capacity(connections);
        for _ in 0..connections {
            let mut client = TcpStream::connect(listener.local_addr()?)?;
            let (server, _) = listener.accept()?;
            client.write_all(&[1u8; 1000])?;
            pairs.push((client, server));
        }
        // The instances: ten, each said to hold this process's sockets (the work per socket
        // is what counts; the kernel's dump is one per round whatever the instances).
        let pid = std::process::id();
        let mut meter = TrafficMeter::new(Vec::new());
        meter.set_site_hosts(Vec::new());
        let mut times = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            let started = Instant::now();
            let owned: Vec<(VmName, Vec<u32>)> = (0..10)
                .map(|i| {
                    let inodes = if i == 0 {
                        socket_inodes(&[pid]).unwrap_or_default()
                    } else {
                        Vec::new()
                    };
                    (VmName::new(format!("p{i}")).expect("valid name"), inodes)
                })
                .collect();
            let sockets = sock_diag::tcp_sockets()?;
            meter.account(owned, &sockets);
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        let sent: u64 = meter.totals().map(|(_, t)| t.sent_bytes).sum();
        println!(
            "{connections:>5} connections ({} sockets): round mean {mean:.3} ms, p50 {:.3} ms, p99 {:.3} ms = {:.3} % of a core at 1 Hz (counted {sent} B)",
            2 * connections,
            times[times.len() / 2],
            times[times.len() * 99 / 100],
            mean / 10.0,
        );
    }
    Ok(())
}
