//! `--demo`: three local agents on libvirt's test driver, enrolled automatically, with VMs
//! created through the console on disks that hold data, so that migrations have something
//! to stream.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use dunes_shared::{
    model::{HostId, Prices, SiteName, TemplateName, VmName, VmSpec},
    pki::Fingerprint,
};
use serde::Deserialize;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, ChildStdout},
};

use crate::engine::{Command, EngineHandle, LinkState};

pub mod history;

const FLEET: &str = include_str!("../../../assets/demo-fleet.toml");
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(30);
/// The template every demo VM is made from: a sparse disk with data in it.
const DEMO_TEMPLATE: &str = "demo";
/// What the guest sees of a demo disk.
const DEMO_DISK_BYTES: u64 = 4 << 30;
/// The data is written in runs this long, spread over the disk, with holes between them.
const DEMO_RUN_MIB: u64 = 8;

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
    /// The storage the host plans with; the test driver's disks are sparse stand-ins, so the
    /// machine's own free space does not limit it.
    storage_capacity_gib: u64,
    #[serde(default)]
    transfer_limit_mbps: Option<u32>,
    prices: Prices,
    /// Data in the template's disk, and so in each VM's copy of it.
    disk_data_mib: u64,
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
    #[error("demo VM {vm} on {host}: {message}")]
    Vm {
        host: HostId,
        vm: VmName,
        message: String,
    },
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

/// The node the test driver pretends to be; its VMs come later, through the console.
fn node_xml(agent: &DemoAgent) -> String {
    // The test driver reports nodes*sockets*cores*threads CPUs and <memory> KiB.
    format!(
        "<node>\n  <cpu><mhz>2600</mhz><model>dunes-demo</model><nodes>1</nodes><sockets>1</sockets><cores>{}</cores><threads>1</threads></cpu>\n  <memory>{}</memory>\n</node>\n",
        agent.cpus,
        agent.memory_mib * 1024
    )
}

/// Puts the `demo` template in the agent's image library (as an operator would put one
/// there): a sparse disk of [`DEMO_DISK_BYTES`] holding `data_mib` of data in runs spread
/// over it. Done once per agent directory.
fn write_demo_template(agent_dir: &Path, data_mib: u64) -> Result<(), DemoError> {
    use std::io::{Seek, SeekFrom, Write};
    let dir = agent_dir.join("storage").join("images").join(DEMO_TEMPLATE);
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| DemoError::Io { path, source }
    };
    let manifest = dir.join("template.toml");
    if manifest.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let disk = dir.join("disk.img");
    let mut file = std::fs::File::create(&disk).map_err(io(&disk))?;
    file.set_len(DEMO_DISK_BYTES).map_err(io(&disk))?;
    let runs = data_mib.div_ceil(DEMO_RUN_MIB).max(1);
    let stride = DEMO_DISK_BYTES / runs;
    let mut block = vec![0u8; 1 << 20];
    // Data that does not compress: a remote site's stream is compressed, and zeros would
    // cross it at once.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in block.chunks_exact_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes());
    }
    let mut written = 0;
    for run in 0..runs {
        file.seek(SeekFrom::Start(run * stride))
            .map_err(io(&disk))?;
        for mib in 0..DEMO_RUN_MIB.min(data_mib - written) {
            // Every MiB differs from the others in its first bytes.
            block[..8].copy_from_slice(&(run * DEMO_RUN_MIB + mib).to_le_bytes());
            file.write_all(&block).map_err(io(&disk))?;
            written += 1;
        }
    }
    file.sync_all().map_err(io(&disk))?;
    let text = format!(
        "description = \"Demo disk: {data_mib} MiB of data on {} GiB (libvirt's test driver only)\"\ndefault_vcpus = 1\ndefault_memory_mib = 512\nplaceholder = true\n",
        DEMO_DISK_BYTES >> 30
    );
    std::fs::write(&manifest, text).map_err(io(&manifest))
}

fn agent_toml(agent: &DemoAgent) -> String {
    format!(
        "host_id = \"{}\"\nsecurity_level = {}\nstorage_capacity_gib = {}\nstop_timeout_secs = 10\nservice_networks = false\n[site]\nname = \"{}\"\nremote = {}\nlink_bandwidth_mbps = {}\nlink_latency_ms = {}\n{}[prices]\nper_gb_month_stored = {:?}\nper_gb_transferred = {:?}\nper_cpu_hour = {:?}\nper_gb_memory_hour = {:?}\n",
        agent.host_id,
        agent.security_level,
        agent.storage_capacity_gib,
        agent.site,
        agent.remote,
        agent.link_bandwidth_mbps,
        agent.link_latency_ms,
        agent
            .transfer_limit_mbps
            .map_or(String::new(), |l| format!("transfer_limit_mbps = {l}\n")),
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

/// Feeds the fleet's generated history into the engine, once per data dir; a demo started
/// again on its data dir only tells the engine where the generated part ends. The history
/// ends an hour ago, so the last hour's charts show live readings alone.
async fn import_history(engine: &EngineHandle, fleet: &Fleet) -> Result<(), DemoError> {
    let marker = engine.data_dir().join("demo-agents").join("history-until");
    let io = |source| DemoError::Io {
        path: marker.display().to_string(),
        source,
    };
    let known = std::fs::read_to_string(&marker)
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok());
    let until = match known {
        Some(until) => until,
        None => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            now.saturating_sub(3600)
        }
    };
    for (n, agent) in fleet.agent.iter().enumerate() {
        let samples = if known.is_some() {
            Vec::new()
        } else {
            let host = history::HistoryHost {
                cpus: agent.cpus,
                memory_mib: agent.memory_mib,
                vms: agent
                    .vms
                    .iter()
                    .map(|vm| history::HistoryVm {
                        name: &vm.name,
                        vcpus: vm.vcpus,
                        memory_mib: vm.memory_mib,
                        running: vm.running,
                    })
                    .collect(),
            };
            history::host_history(&host, n as u64 + 1, until)
        };
        engine
            .request(|reply| Command::ImportHistory {
                host: agent.host_id.clone(),
                samples,
                generated_until_secs: until,
                reply,
            })
            .await
            .map_err(|e| DemoError::Agent {
                host: agent.host_id.clone(),
                message: format!("its history: {e}"),
            })?;
    }
    if known.is_none() {
        std::fs::create_dir_all(marker.parent().expect("in demo-agents")).map_err(io)?;
        std::fs::write(&marker, until.to_string()).map_err(io)?;
    }
    Ok(())
}

/// Starts the demo agents under `data_dir/demo-agents/` and enrolls them.
pub async fn start(engine: &EngineHandle) -> Result<DemoFleet, DemoError> {
    let fleet: Fleet = toml::from_str(FLEET).map_err(|e| DemoError::Fleet(e.to_string()))?;
    let binary = agent_binary()?;
    let mut demo = DemoFleet {
        children: Vec::new(),
        hosts: Vec::new(),
    };
    // Before any agent sends live readings: the history comes first in every series.
    import_history(engine, &fleet).await?;
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
        write_demo_template(&dir, agent.disk_data_mib)?;
        // libvirt's test driver takes an absolute path: a relative data dir is made one.
        let node = std::path::absolute(dir.join("node.xml")).map_err(io(&dir))?;
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
    for agent in &fleet.agent {
        create_vms(engine, agent).await?;
    }
    Ok(demo)
}

/// Creates the agent's demo VMs it does not have yet (a restarted demo keeps its own).
async fn create_vms(engine: &EngineHandle, agent: &DemoAgent) -> Result<(), DemoError> {
    let host = agent.host_id.clone();
    let fail = |vm: &VmName, message: String| DemoError::Vm {
        host: host.clone(),
        vm: vm.clone(),
        message,
    };
    let snapshot = engine
        .wait_for(AGENT_START_TIMEOUT, |s| {
            s.host(&host)
                .is_some_and(|h| h.link == LinkState::Online && h.inventory().is_some())
        })
        .await
        .map_err(|_| DemoError::Agent {
            host: host.clone(),
            message: "did not come online".into(),
        })?;
    let template = TemplateName::new(DEMO_TEMPLATE).expect("valid literal");
    for vm in &agent.vms {
        if snapshot
            .host(&host)
            .is_some_and(|h| h.vm(&vm.name).is_some())
        {
            continue;
        }
        let spec = VmSpec {
            name: vm.name.clone(),
            template: template.clone(),
            vcpus: Some(vm.vcpus),
            memory_mib: Some(vm.memory_mib),
        };
        engine
            .request(|reply| Command::CreateVm {
                host: host.clone(),
                spec,
                start: vm.running,
                reply,
            })
            .await
            .map_err(|e| fail(&vm.name, e.to_string()))?;
    }
    Ok(())
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
        assert!(!xml.contains("<domain"));
        let remote = agent_toml(&fleet.agent[2]);
        assert!(remote.contains("transfer_limit_mbps = 200"), "{remote}");
        let config = dunes_agent_config_check(&agent_toml(&fleet.agent[2]));
        assert!(config.contains("remote = true"));
    }

    #[test]
    fn the_demo_template_is_sparse_and_holds_its_data() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        write_demo_template(dir.path(), 20).unwrap();
        let disk = dir.path().join("storage/images/demo/disk.img");
        let meta = std::fs::metadata(&disk).unwrap();
        assert_eq!(meta.len(), DEMO_DISK_BYTES);
        let allocated = meta.blocks() * 512;
        assert!(
            (20 << 20..=21 << 20).contains(&allocated),
            "allocated {allocated}"
        );
        // Runs of data with holes between them.
        let runs = 20u64.div_ceil(DEMO_RUN_MIB);
        let stride = DEMO_DISK_BYTES / runs;
        let file = std::fs::File::open(&disk).unwrap();
        let read = |at: u64| {
            let mut buf = vec![0u8; 1024];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, at).unwrap();
            buf
        };
        assert!(read(stride).iter().any(|&b| b != 0));
        assert!(read(stride - 1024).iter().all(|&b| b == 0));
        let manifest =
            std::fs::read_to_string(dir.path().join("storage/images/demo/template.toml")).unwrap();
        assert!(manifest.contains("placeholder = true"), "{manifest}");
        // A second call leaves what is there.
        write_demo_template(dir.path(), 40).unwrap();
        assert_eq!(std::fs::metadata(&disk).unwrap().blocks() * 512, allocated);
    }

    fn dunes_agent_config_check(text: &str) -> String {
        toml::from_str::<toml::Value>(text).unwrap();
        text.to_string()
    }
}
