//! Several hosts on one machine: network namespaces joined by veth pairs to a bridge in this
//! namespace, so that the console (here) and the agents (there) talk over real links that a
//! test can cut, restore and shape with `tc`. Needs root and iproute2; everything made is
//! removed on drop.

use std::process::Command;

use anyhow::{Context, bail};

/// One host of the lab.
#[derive(Debug)]
pub struct LabHost {
    /// The namespace the host's processes run in.
    pub netns: String,
    /// The host's end of its link, as this namespace sees it (cut, restore and shape it).
    pub link: String,
    /// The host's address on the lab network.
    pub ip: String,
}

/// A bridge and a namespace per host, on a /24 of its own.
#[derive(Debug)]
pub struct Lab {
    bridge: String,
    /// The lab network's first three octets.
    subnet: String,
    pub hosts: Vec<LabHost>,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Why this machine cannot make a lab, if it cannot: not root, or no `ip`.
pub fn unavailable() -> Option<String> {
    // The effective user owns /proc/self.
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if !root {
        return Some("network namespaces need root".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("iproute2's ip is not installed".into());
    }
    None
}

impl Lab {
    /// `hosts` namespaces on a fresh bridge. Names carry the process id, so that suites
    /// running side by side do not meet.
    pub fn new(hosts: usize) -> anyhow::Result<Self> {
        let tag = std::process::id() % 100_000;
        // Tests of one process run one lab at a time (see the suites): one subnet per process.
        let subnet = format!("10.{}.{}", 200 + tag % 50, tag % 250);
        let bridge = format!("dbr{tag}");
        let mut lab = Lab {
            bridge: bridge.clone(),
            subnet: subnet.clone(),
            hosts: Vec::new(),
        };
        let _ = ip(&["link", "del", &bridge]);
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{subnet}.1/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 1..=hosts {
            let netns = format!("dunes{tag}h{i}");
            let link = format!("dv{tag}h{i}");
            let inside = format!("dv{tag}n{i}");
            let address = format!("{subnet}.{}", 10 + i);
            let _ = ip(&["netns", "del", &netns]);
            ip(&["netns", "add", &netns])?;
            lab.hosts.push(LabHost {
                netns: netns.clone(),
                link: link.clone(),
                ip: address.clone(),
            });
            ip(&[
                "link", "add", &link, "type", "veth", "peer", "name", &inside,
            ])?;
            ip(&["link", "set", &inside, "netns", &netns])?;
            ip(&["link", "set", &link, "master", &bridge])?;
            ip(&["link", "set", &link, "up"])?;
            let inns = |args: &[&str]| {
                let mut all = vec!["netns", "exec", netns.as_str(), "ip"];
                all.extend_from_slice(args);
                ip(&all)
            };
            inns(&["link", "set", "lo", "up"])?;
            inns(&["addr", "add", &format!("{address}/24"), "dev", &inside])?;
            inns(&["link", "set", &inside, "up"])?;
        }
        Ok(lab)
    }

    /// The bridge's address: the root namespace (where the engine runs), as the hosts reach it.
    pub fn bridge_ip(&self) -> String {
        format!("{}.1", self.subnet)
    }

    /// Takes host `i`'s link down: nothing reaches it, nothing leaves it.
    pub fn cut(&self, i: usize) -> anyhow::Result<()> {
        ip(&["link", "set", &self.hosts[i].link, "down"])
    }

    pub fn restore(&self, i: usize) -> anyhow::Result<()> {
        ip(&["link", "set", &self.hosts[i].link, "up"])
    }

    /// Turns generic receive offload on for both ends of every host's veth pair, as physical
    /// NICs have it: UDP segments then cross the link as one large packet (benchmarks only).
    pub fn enable_gro(&self) -> anyhow::Result<()> {
        for host in &self.hosts {
            run("ethtool", &["-K", &host.link, "gro", "on"])?;
            // `dv{tag}h{i}` outside, `dv{tag}n{i}` inside (see `new`).
            let inside = host.link.replace('h', "n");
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &host.netns,
                    "ethtool",
                    "-K",
                    &inside,
                    "gro",
                    "on",
                ],
            )?;
        }
        Ok(())
    }

    /// Limits what reaches host `i` to `mbit` Mbit/s (a token bucket on its link).
    pub fn shape(&self, i: usize, mbit: u32) -> anyhow::Result<()> {
        run(
            "tc",
            &[
                "qdisc",
                "replace",
                "dev",
                &self.hosts[i].link,
                "root",
                "tbf",
                "rate",
                &format!("{mbit}mbit"),
                "burst",
                "64kb",
                "latency",
                "200ms",
            ],
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for host in &self.hosts {
            let _ = ip(&["netns", "del", &host.netns]);
            let _ = ip(&["link", "del", &host.link]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// A TCP listener that reads and drops whatever it is sent; killed when dropped.
pub struct Sink(std::process::Child);

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A sink on every address of namespace `netns` (the root namespace when `None`) at `port`,
/// returned once it listens; a port it cannot take is an error.
pub fn sink(netns: Option<&str>, port: u16) -> anyhow::Result<Sink> {
    let script = format!(
        "import socket, threading\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {port}))\n\
         s.listen()\n\
         print('listening', flush=True)\n\
         def drain(c):\n    while c.recv(65536):\n        pass\n\
         while True:\n    c, _ = s.accept()\n    threading.Thread(target=drain, args=(c,), daemon=True).start()\n"
    );
    let mut command = match netns {
        Some(netns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", netns, "python3"]);
            c
        }
        None => Command::new("python3"),
    };
    let mut child = command
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("python3 does not run: {e}"))?;
    let stdout = child.stdout.take().context("the sink's output")?;
    let sink = Sink(child);
    // A bind that fails ends the script before it prints: the line never comes.
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
    if line.trim() != "listening" {
        bail!("the sink on port {port} did not start listening");
    }
    Ok(sink)
}
