//! Helpers for the end-to-end suites: real agent processes, a real engine, real QUIC.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, bail};
use dunes_console::engine::{self, Command as EngineCommand, EngineHandle, HostAdded};
use dunes_shared::{model::HostId, pki::Fingerprint};

pub mod demo;
pub mod netns;

/// How long an agent gets to print its startup lines (QEMU's first probe takes ~8 s).
pub const AGENT_START_TIMEOUT: Duration = Duration::from_secs(60);

pub fn agent_binary() -> PathBuf {
    dunes_console::demo::agent_binary()
        .expect("build the workspace first: cargo build --workspace --bins")
}

pub fn console_binary() -> PathBuf {
    agent_binary().with_file_name("dunes-console")
}

/// A `dunes-agent` child process.
#[derive(Debug)]
pub struct AgentProcess {
    pub child: Child,
    pub host_id: HostId,
    pub address: String,
    pub fingerprint: Fingerprint,
    pub token: Option<String>,
    pub data_dir: PathBuf,
    site: String,
    libvirt_uri: String,
    extra_args: Vec<String>,
    /// The network namespace it runs in, if not this one.
    pub netns: Option<String>,
}

impl AgentProcess {
    /// Starts an agent with its own data dir and a config naming its host id and site.
    pub fn spawn(
        data_dir: &Path,
        host_id: &str,
        site: &str,
        libvirt_uri: &str,
    ) -> anyhow::Result<Self> {
        Self::spawn_with(
            data_dir,
            host_id,
            site,
            libvirt_uri,
            "127.0.0.1:0",
            Vec::new(),
        )
    }

    pub fn spawn_with(
        data_dir: &Path,
        host_id: &str,
        site: &str,
        libvirt_uri: &str,
        listen: &str,
        extra_args: Vec<String>,
    ) -> anyhow::Result<Self> {
        Self::spawn_in(
            None,
            data_dir,
            host_id,
            site,
            libvirt_uri,
            listen,
            extra_args,
        )
    }

    /// As [`AgentProcess::spawn_with`], run from `cwd` with `data_dir` given as it is (a
    /// relative data dir, as a new user types it).
    pub fn spawn_in(
        cwd: Option<&Path>,
        data_dir: &Path,
        host_id: &str,
        site: &str,
        libvirt_uri: &str,
        listen: &str,
        extra_args: Vec<String>,
    ) -> anyhow::Result<Self> {
        Self::spawn_full(
            None,
            cwd,
            data_dir,
            host_id,
            site,
            libvirt_uri,
            listen,
            extra_args,
        )
    }

    /// An agent in network namespace `netns` (see [`netns::Lab`]), listening on `listen`.
    pub fn spawn_in_netns(
        netns: &str,
        data_dir: &Path,
        host_id: &str,
        libvirt_uri: &str,
        listen: &str,
        extra_args: Vec<String>,
    ) -> anyhow::Result<Self> {
        Self::spawn_full(
            Some(netns),
            None,
            data_dir,
            host_id,
            "lab",
            libvirt_uri,
            listen,
            extra_args,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn_full(
        netns: Option<&str>,
        cwd: Option<&Path>,
        data_dir: &Path,
        host_id: &str,
        site: &str,
        libvirt_uri: &str,
        listen: &str,
        extra_args: Vec<String>,
    ) -> anyhow::Result<Self> {
        let here = match cwd {
            Some(cwd) => cwd.join(data_dir),
            None => data_dir.to_path_buf(),
        };
        std::fs::create_dir_all(&here)?;
        let config = here.join("agent.toml");
        std::fs::write(
            &config,
            format!("host_id = \"{host_id}\"\nstop_timeout_secs = 20\n[site]\nname = \"{site}\"\n"),
        )?;
        // `ip netns exec` runs the agent itself in the namespace: its pid is the agent's.
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(agent_binary());
                c
            }
            None => Command::new(agent_binary()),
        };
        if let Some(cwd) = cwd {
            command.current_dir(cwd);
        }
        let mut child = command
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", listen, "--libvirt", libvirt_uri, "--config"])
            .arg(&config)
            .args(&extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(here.join("agent.log"))?))
            .spawn()
            .context("starting dunes-agent")?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut address, mut fingerprint, mut token, mut enrolled) = (None, None, None, false);
        while address.is_none() || fingerprint.is_none() || (token.is_none() && !enrolled) {
            let line = match rx.recv_timeout(AGENT_START_TIMEOUT) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    let log = std::fs::read_to_string(here.join("agent.log")).unwrap_or_default();
                    bail!("agent {host_id} did not start: {log}");
                }
            };
            match line.split_once(": ") {
                Some(("listening", v)) => address = Some(v.to_string()),
                Some(("fingerprint", v)) => fingerprint = Some(v.parse()?),
                Some(("join-token", v)) => token = Some(v.to_string()),
                Some(("enrolled", _)) => enrolled = true,
                _ => {}
            }
        }
        Ok(AgentProcess {
            child,
            host_id: HostId::new(host_id)?,
            address: address.expect("loop ends with it"),
            fingerprint: fingerprint.expect("loop ends with it"),
            token,
            data_dir: here,
            site: site.to_string(),
            libvirt_uri: libvirt_uri.to_string(),
            extra_args,
            netns: netns.map(str::to_string),
        })
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the agent again on the same data dir and address.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let mut again = Self::spawn_full(
            self.netns.as_deref(),
            None,
            &self.data_dir,
            self.host_id.as_str(),
            &self.site,
            &self.libvirt_uri,
            &self.address,
            self.extra_args.clone(),
        )?;
        // `again` now holds the dead child and drops it.
        std::mem::swap(&mut self.child, &mut again.child);
        Ok(())
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An agent in lab host `i`'s namespace, on a node of its own of libvirt's test driver with
/// room for a few VMs, its data dir `dir/name`.
pub fn spawn_lab_agent(
    lab: &netns::Lab,
    i: usize,
    dir: &Path,
    name: &str,
) -> anyhow::Result<AgentProcess> {
    spawn_lab_agent_at_site(lab, i, dir, name, "lab")
}

/// As [`spawn_lab_agent`], in site `site`.
pub fn spawn_lab_agent_at_site(
    lab: &netns::Lab,
    i: usize,
    dir: &Path,
    name: &str,
    site: &str,
) -> anyhow::Result<AgentProcess> {
    let data_dir = dir.join(name);
    std::fs::create_dir_all(&data_dir)?;
    let node = data_dir.join("node.xml");
    std::fs::write(
        &node,
        "<node><cpu><mode>host</mode></cpu><memory>2097152</memory></node>",
    )?;
    let host = lab.hosts.get(i).context("no such lab host")?;
    AgentProcess::spawn_full(
        Some(&host.netns),
        None,
        &data_dir,
        name,
        site,
        &format!("test://{}", node.display()),
        &format!("{}:0", host.ip),
        Vec::new(),
    )
}

/// Enrolls an agent through the engine, checking its printed fingerprint.
pub async fn enroll(engine: &EngineHandle, agent: &AgentProcess) -> anyhow::Result<HostAdded> {
    let token = agent
        .token
        .clone()
        .context("the agent printed no join token")?;
    Ok(engine
        .request(|reply| EngineCommand::AddHost {
            address: agent.address.clone(),
            token,
            expected_fingerprint: Some(agent.fingerprint),
            replace: false,
            reply,
        })
        .await?)
}

/// Starts an engine on a data dir.
pub async fn start_engine(data_dir: &Path) -> anyhow::Result<EngineHandle> {
    Ok(engine::start(data_dir).await?)
}

/// Enrolls an agent and waits until its host is online over its link.
pub async fn enroll_online(engine: &EngineHandle, agent: &AgentProcess) -> anyhow::Result<()> {
    enroll(engine, agent).await?;
    let host = agent.host_id.clone();
    engine
        .wait_for(Duration::from_secs(30), |s| {
            s.host(&host)
                .is_some_and(|h| h.link == engine::LinkState::Online)
        })
        .await
        .map_err(|_| anyhow::anyhow!("{host} did not come online"))?;
    Ok(())
}

/// What workload `vm` sent, and what of it left its site, in bytes, summed over the seconds
/// of the last ten minutes whose readings tell both.
pub async fn sent_and_out_of_site(
    engine: &EngineHandle,
    vm: &dunes_shared::model::VmName,
) -> anyhow::Result<(f64, f64)> {
    use engine::statistics::series::{Metric, Subject};
    let answer = engine
        .request(|reply| EngineCommand::Stats {
            subject: Subject::Workload(vm.clone()),
            since_secs: 600,
            resolution_secs: Some(1),
            reply,
        })
        .await?;
    let series = |m: Metric| {
        answer
            .series
            .iter()
            .find(|s| s.metric == m)
            .map(|s| s.points.clone())
            .unwrap_or_default()
    };
    let out_points = series(Metric::NetTxOutOfSite);
    let all: f64 = series(Metric::NetTx)
        .iter()
        .filter(|b| out_points.iter().any(|o| o.start_secs == b.start_secs))
        .map(|b| b.mean())
        .sum();
    let out: f64 = out_points.iter().map(|b| b.mean()).sum();
    Ok((all, out))
}

/// Defines a service from its file's text, deploys it as planned and starts it; every step
/// must succeed for every instance.
pub async fn deploy_service(
    engine: &EngineHandle,
    source: &str,
) -> anyhow::Result<dunes_shared::model::ServiceName> {
    let name = engine
        .request(|reply| EngineCommand::DefineService {
            source: source.to_string(),
            replace: false,
            reply,
        })
        .await?;
    let report = engine
        .request(|reply| EngineCommand::DeployService {
            name: name.clone(),
            fingerprint: None,
            overrides: Vec::new(),
            reply,
        })
        .await?;
    anyhow::ensure!(report.failed.is_empty(), "deploy failed: {report:?}");
    let report = engine
        .request(|reply| EngineCommand::StartService {
            name: name.clone(),
            reply,
        })
        .await?;
    anyhow::ensure!(report.failed.is_empty(), "start failed: {report:?}");
    Ok(name)
}

/// Waits, from a blocking test, until `done` holds; panics naming `what` after `timeout`.
pub fn poll_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
