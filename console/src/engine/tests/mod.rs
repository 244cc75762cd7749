//! The engine's command and event handling against real agents run in-process (the agent is a
//! library) on 127.0.0.1, each on a private copy of libvirt's test driver.

use std::{path::Path, time::Duration};

use dunes_agent::{
    config::AgentConfig,
    server::{AgentOptions, RunningAgent},
};
use dunes_shared::model::{AppName, HostId, TemplateName, VmName, VmSpec, VmState};

use super::{Command, EngineError, EngineHandle, EngineOptions, LinkState, start_with};

mod autoscaling;
mod evacuation;
mod links;
mod migration;
mod services;
mod statistics;
mod vms;

async fn agent(dir: &Path, host: &str) -> RunningAgent {
    agent_on(dir, host, "127.0.0.1:0").await
}

async fn agent_on(dir: &Path, host: &str, listen: &str) -> RunningAgent {
    agent_with(dir, host, listen, AgentConfig::default()).await
}

/// An agent on a node of its own of libvirt's test driver, with room for a few VMs.
async fn agent_with(dir: &Path, host: &str, listen: &str, config: AgentConfig) -> RunningAgent {
    let data_dir = dir.join(host);
    std::fs::create_dir_all(&data_dir).unwrap();
    let node = data_dir.join("node.xml");
    std::fs::write(
        &node,
        "<node><cpu><mode>host</mode></cpu><memory>2097152</memory></node>",
    )
    .unwrap();
    RunningAgent::start(AgentOptions {
        data_dir,
        listen: listen.parse().unwrap(),
        libvirt_uri: format!("test://{}", node.display()),
        config: AgentConfig {
            host_id: Some(HostId::new(host).unwrap()),
            ..config
        },
        guest_dir: None,
    })
    .await
    .unwrap()
}

async fn engine_with(dir: &Path, agent: &RunningAgent) -> EngineHandle {
    engine_with_options(dir, agent, EngineOptions::default()).await
}

async fn engine_with_options(
    dir: &Path,
    agent: &RunningAgent,
    options: EngineOptions,
) -> EngineHandle {
    let engine = start_with(&dir.join("console"), options).await.unwrap();
    enroll_host(&engine, agent).await;
    engine
}

fn spec(name: &str) -> VmSpec {
    VmSpec {
        name: VmName::new(name).unwrap(),
        template: TemplateName::new("tiny").unwrap(),
        vcpus: Some(1),
        memory_mib: Some(64),
    }
}

fn log_of(engine: &EngineHandle, host: &HostId) -> Vec<String> {
    engine
        .snapshot()
        .events
        .iter()
        .filter(|e| e.host.as_ref() == Some(host))
        .map(|e| e.message.clone())
        .collect()
}

/// Deploys a defined service as planned and starts it; nothing may fail.
async fn deploy_and_start(engine: &EngineHandle, name: &dunes_shared::model::ServiceName) {
    let report = engine
        .request(|reply| Command::DeployService {
            name: name.clone(),
            fingerprint: None,
            overrides: Vec::new(),
            reply,
        })
        .await
        .unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
    let report = engine
        .request(|reply| Command::StartService {
            name: name.clone(),
            reply,
        })
        .await
        .unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
}

async fn enroll_host(engine: &EngineHandle, agent: &RunningAgent) {
    engine
        .request(|reply| Command::AddHost {
            address: agent.local_addr.to_string(),
            token: agent.join_token.clone().unwrap(),
            expected_fingerprint: Some(agent.fingerprint),
            replace: false,
            reply,
        })
        .await
        .unwrap();
    let host = agent.host_id.clone();
    engine
        .wait_for(Duration::from_secs(20), |s| {
            s.host(&host).is_some_and(|h| h.link == LinkState::Online)
        })
        .await
        .expect("the host comes online");
}

fn disk_of(dir: &Path, host: &str, vm: &str) -> std::path::PathBuf {
    dir.join(host)
        .canonicalize()
        .unwrap()
        .join("storage/disks")
        .join(format!("{vm}.img"))
}

async fn migration_ends(
    engine: &EngineHandle,
    id: u64,
) -> crate::engine::migration::MigrationJournal {
    let snap = engine
        .wait_for(Duration::from_secs(60), |s| {
            s.migrations
                .iter()
                .any(|m| m.id == id && m.step.is_finished())
        })
        .await
        .unwrap_or_else(|s| panic!("migration {id} never ended: {:?}", s.migrations));
    snap.migrations
        .iter()
        .find(|m| m.id == id)
        .cloned()
        .unwrap()
}

async fn agent_at_site(dir: &Path, host: &str, site: &str) -> RunningAgent {
    let config = AgentConfig {
        site: dunes_agent::config::SiteConfig {
            name: dunes_shared::model::SiteName::new(site).unwrap(),
            remote: false,
            link_bandwidth_mbps: 1000,
            link_latency_ms: 1,
            // Geneva keeps transfers to 800 Mbit/s of its link.
            transfer_limit_mbps: (site == "gva").then_some(800),
            networks: Vec::new(),
        },
        ..AgentConfig::default()
    };
    agent_with(dir, host, "127.0.0.1:0", config).await
}

async fn define_and_deploy(
    engine: &EngineHandle,
    source: &str,
    place: &[(&str, u32, &HostId)],
) -> dunes_shared::model::ServiceName {
    let name = engine
        .request(|reply| Command::DefineService {
            source: source.into(),
            replace: false,
            reply,
        })
        .await
        .unwrap();
    let overrides = place
        .iter()
        .map(
            |(app, index, host)| crate::engine::services::placement::Override {
                app: AppName::new(*app).unwrap(),
                index: *index,
                host: (*host).clone(),
            },
        )
        .collect();
    let report = engine
        .request(|reply| Command::DeployService {
            name: name.clone(),
            fingerprint: None,
            overrides,
            reply,
        })
        .await
        .unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
    name
}

/// Hosts that hold a VM of each of two names at once, in any snapshot.
fn watch_for_sharing(
    engine: &EngineHandle,
    first: &'static str,
    second: &'static str,
) -> tokio::task::JoinHandle<Vec<String>> {
    let mut updates = engine.subscribe();
    tokio::spawn(async move {
        let mut shared = Vec::new();
        while updates.changed().await.is_ok() {
            let snap = updates.borrow_and_update().clone();
            for host in &snap.hosts {
                let has = |n: &str| host.vms.iter().any(|v| v.name.as_str() == n);
                if has(first) && has(second) {
                    shared.push(format!("{} at version {}", host.id(), snap.version));
                }
            }
        }
        shared
    })
}
