//! `--demo`: three local agents on libvirt's test driver, enrolled automatically.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use dunes_shared::{
    model::{HostId, Prices, SiteName, VmName},
    pki::Fingerprint,
};
use serde::Deserialize;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, ChildStdout},
};

use crate::engine::{Command, EngineHandle};

const FLEET: &str = include_str!("../../assets/demo-fleet.toml");
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Deserialize)]
struct Fleet {
    agent: Vec<DemoAgent>,
}

#[derive(Debug, Deserialize)]
struct DemoAgent {
    host_id: HostId,
    site: SiteName,
    remote: bool,
    link_bandwidth_mbps: u32,
    link_latency_ms: u32,
    cpus: u32,
    memory_mib: u64,
    security_level: u8,
    prices: Prices,
    vms: Vec<DemoVm>,
}

#[derive(Debug, Deserialize)]
struct DemoVm {
    name: VmName,
    vcpus: u32,
    memory_mib: u64,
    running: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("the demo fleet description is invalid: {0}")]
    Fleet(String),
    #[error(
        "dunes-agent was not found at {0}; build the workspace (cargo build) or set DUNES_AGENT_BIN"
    )]
    NoAgentBinary(String),
    #[error("demo agent {host}: {message}")]
    Agent { host: HostId, message: String },
    #[error("cannot prepare {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The running demo agents; they are killed when this is dropped (and if the console dies).
#[derive(Debug)]
pub struct DemoFleet {
    children: Vec<(Child, ChildStdout)>,
    pub hosts: Vec<HostId>,
}

/// The agent binary: `DUNES_AGENT_BIN`, or `dunes-agent` next to this executable.
pub fn agent_binary() -> Result<PathBuf, DemoError> {
    let path = match std::env::var_os("DUNES_AGENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            let exe =
                std::env::current_exe().map_err(|e| DemoError::NoAgentBinary(e.to_string()))?;
            let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
            // Test binaries live one level deeper, in target/*/deps.
            let beside = dir.join("dunes-agent");
            if beside.exists() {
                beside
            } else {
                dir.parent()
                    .map(|p| p.join("dunes-agent"))
                    .unwrap_or(beside)
            }
        }
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(DemoError::NoAgentBinary(path.display().to_string()))
    }
}

fn node_xml(agent: &DemoAgent) -> String {
    // The test driver reports nodes*sockets*cores*threads CPUs and <memory> KiB.
    let mut xml = format!(
        "<node>\n  <cpu><mhz>2600</mhz><model>dunes-demo</model><nodes>1</nodes><sockets>1</sockets><cores>{}</cores><threads>1</threads></cpu>\n  <memory>{}</memory>\n",
        agent.cpus,
        agent.memory_mib * 1024
    );
    for vm in &agent.vms {
        let runstate = if vm.running {
            ""
        } else {
            "<test:runstate>5</test:runstate>"
        };
        xml.push_str(&format!(
            "  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'><name>{}</name><memory unit='MiB'>{}</memory><vcpu>{}</vcpu><os><type>hvm</type></os>{runstate}</domain>\n",
            vm.name, vm.memory_mib, vm.vcpus
        ));
    }
    xml.push_str("</node>\n");
    xml
}

fn agent_toml(agent: &DemoAgent) -> String {
    format!(
        "host_id = \"{}\"\nsecurity_level = {}\nstop_timeout_secs = 10\n[site]\nname = \"{}\"\nremote = {}\nlink_bandwidth_mbps = {}\nlink_latency_ms = {}\n[prices]\nper_gb_month_stored = {:?}\nper_gb_transferred = {:?}\nper_cpu_hour = {:?}\nper_gb_memory_hour = {:?}\n",
        agent.host_id,
        agent.security_level,
        agent.site,
        agent.remote,
        agent.link_bandwidth_mbps,
        agent.link_latency_ms,
        agent.prices.per_gb_month_stored,
        agent.prices.per_gb_transferred,
        agent.prices.per_cpu_hour,
        agent.prices.per_gb_memory_hour,
    )
}

/// What a starting agent printed on stdout.
#[derive(Debug, Default)]
struct Started {
    address: Option<String>,
    fingerprint: Option<Fingerprint>,
    token: Option<String>,
    enrolled: bool,
}

async fn read_startup(stdout: &mut BufReader<ChildStdout>) -> std::io::Result<Started> {
    let mut started = Started::default();
    let mut line = String::new();
    while started.address.is_none() || (started.token.is_none() && !started.enrolled) {
        line.clear();
        if stdout.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the agent exited",
            ));
        }
        match line.trim().split_once(": ") {
            Some(("listening", v)) => started.address = Some(v.to_string()),
            Some(("fingerprint", v)) => started.fingerprint = v.parse().ok(),
            Some(("join-token", v)) => started.token = Some(v.to_string()),
            Some(("enrolled", _)) => started.enrolled = true,
            _ => {}
        }
    }
    Ok(started)
}

#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

/// Starts the demo agents under `data_dir/demo-agents/` and enrolls them.
pub async fn start(engine: &EngineHandle) -> Result<DemoFleet, DemoError> {
    let fleet: Fleet = toml::from_str(FLEET).map_err(|e| DemoError::Fleet(e.to_string()))?;
    let binary = agent_binary()?;
    let mut demo = DemoFleet {
        children: Vec::new(),
        hosts: Vec::new(),
    };
    for agent in &fleet.agent {
        let dir = engine
            .data_dir()
            .join("demo-agents")
            .join(agent.host_id.as_str());
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| DemoError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let node = dir.join("node.xml");
        std::fs::write(&node, node_xml(agent)).map_err(io(&node))?;
        let config = dir.join("agent.toml");
        std::fs::write(&config, agent_toml(agent)).map_err(io(&config))?;
        let log = dir.join("agent.log");
        let log_file = std::fs::File::create(&log).map_err(io(&log))?;
        let fail = |message: String| DemoError::Agent {
            host: agent.host_id.clone(),
            message,
        };
        let mut cmd = tokio::process::Command::new(&binary);
        cmd.arg("--data-dir")
            .arg(&dir)
            .args(["--listen", "127.0.0.1:0"])
            .arg("--libvirt")
            .arg(format!("test://{}", node.display()))
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true);
        die_with_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .map_err(|e| fail(format!("cannot start {}: {e}", binary.display())))?;
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let started = tokio::time::timeout(AGENT_START_TIMEOUT, read_startup(&mut stdout))
            .await
            .map_err(|_| fail("did not start in time".into()))?
            .map_err(|e| fail(format!("{e}; see {}", log.display())))?;
        let address = started.address.expect("loop ends with an address");
        let known = engine.snapshot().host(&agent.host_id).is_some();
        if known {
            engine
                .request(|reply| Command::SetHostAddress {
                    host: agent.host_id.clone(),
                    address: address.clone(),
                    reply,
                })
                .await
                .map_err(|e| fail(e.to_string()))?;
        } else {
            let token = match started.token {
                Some(t) => t,
                None => fresh_token(&binary, &dir).await.map_err(fail)?,
            };
            engine
                .request(|reply| Command::AddHost {
                    address: address.clone(),
                    token,
                    expected_fingerprint: started.fingerprint,
                    replace: false,
                    reply,
                })
                .await
                .map_err(|e| fail(e.to_string()))?;
        }
        demo.hosts.push(agent.host_id.clone());
        demo.children.push((child, stdout.into_inner()));
    }
    Ok(demo)
}

async fn fresh_token(binary: &Path, dir: &Path) -> Result<String, String> {
    let out = tokio::process::Command::new(binary)
        .arg("token")
        .arg("--data-dir")
        .arg(dir)
        .output()
        .await
        .map_err(|e| e.to_string())?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("join-token: ").map(str::to_string))
        .ok_or_else(|| "no join token from `dunes-agent token`".to_string())
}

impl DemoFleet {
    /// Stops the agents and waits for them.
    pub async fn stop(mut self) {
        for (child, _) in &mut self.children {
            let _ = child.start_kill();
        }
        for (child, _) in &mut self.children {
            let _ = child.wait().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_parses() {
        let fleet: Fleet = toml::from_str(FLEET).unwrap();
        assert_eq!(fleet.agent.len(), 3);
        assert_eq!(fleet.agent.iter().filter(|a| a.remote).count(), 1);
        let xml = node_xml(&fleet.agent[0]);
        assert!(xml.contains("<cores>16</cores>"));
        assert!(xml.contains("<test:runstate>5</test:runstate>"));
        let config = dunes_agent_config_check(&agent_toml(&fleet.agent[2]));
        assert!(config.contains("remote = true"));
    }

    fn dunes_agent_config_check(text: &str) -> String {
        toml::from_str::<toml::Value>(text).unwrap();
        text.to_string()
    }
}
