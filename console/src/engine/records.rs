//! The engine's own records of hosts, events, services and their instances: what it knows
//! of them, which its snapshot shows. The store keeps them as rows of its own
//! (`store/rows.rs`), which change only with the schema version.

use dunes_shared::{
    model::{HostId, VmName},
    pki::Fingerprint,
};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// An enrolled host, as the operator added it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HostRecord {
    pub id: HostId,
    /// `host:port` as the operator typed it.
    pub address: String,
    /// The agent's key, pinned at enrollment.
    pub fingerprint: Fingerprint,
    pub enrolled_at_ms: u64,
    /// Last inventory seen, so an unreachable host still shows what it is.
    pub inventory: Option<dunes_shared::model::HostInventory>,
    /// When the agent's certificate expires, as last seen (ms since the Unix epoch).
    pub cert_expires_ms: Option<u64>,
    /// Set while the host is in maintenance: it takes nothing new, and (unless paused)
    /// everything on it is moved away.
    pub maintenance: Option<Maintenance>,
}

/// A host's maintenance mark and its drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Maintenance {
    /// When the drain began (ms since the Unix epoch).
    pub since_ms: u64,
    /// A paused drain starts no new migration.
    pub paused: bool,
    /// When the drain was last started or resumed: migrations that failed before are tried
    /// again.
    pub resumed_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warning,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

/// An entry of the event log (serialized only for `ctl --json` output; stored as a row).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct EventRecord {
    pub seq: u64,
    pub time_ms: u64,
    pub level: Level,
    pub host: Option<HostId>,
    pub message: String,
}

/// A service as the operator defined it: the file's text is what is kept, so the definition
/// is read by the parser of whichever release opens the store.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ServiceRecord {
    pub name: dunes_shared::model::ServiceName,
    pub source: String,
    pub defined_at_ms: u64,
    /// A move to another site under way.
    pub moving: Option<ServiceMove>,
}

/// A service on its way to another site: stopped top-down, its instances migrated one at a
/// time in start order, then started bottom-up.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServiceMove {
    pub site: String,
    pub phase: MovePhase,
    /// Whether any instance ran: the service is started again at the end.
    pub was_running: bool,
    pub since_ms: u64,
    /// Why the move stopped short; it still starts the service again where it stands.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MovePhase {
    Stopping,
    Moving,
    Starting,
}

impl MovePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            MovePhase::Stopping => "stopping",
            MovePhase::Moving => "moving",
            MovePhase::Starting => "starting",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "stopping" => MovePhase::Stopping,
            "moving" => MovePhase::Moving,
            "starting" => MovePhase::Starting,
            _ => return None,
        })
    }
}

/// Where an instance of a service stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum InstanceState {
    /// Written before its VM is created; the VM may or may not exist yet.
    Creating,
    Created,
    /// Written before its VM is removed.
    Removing,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Creating => "creating",
            InstanceState::Created => "created",
            InstanceState::Removing => "removing",
        }
    }
}

/// One instance of an application of a service, and the VM that is it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InstanceRecord {
    pub service: dunes_shared::model::ServiceName,
    pub app: dunes_shared::model::AppName,
    pub index: u32,
    pub host: HostId,
    pub vm: VmName,
    pub state: InstanceState,
    pub runtime: dunes_shared::model::RuntimeKind,
    /// A VM that existed before and was adopted into the service: a deploy never removes it.
    pub adopted: bool,
    /// Its address on its service's network, kept through stops, starts and migrations.
    #[serde(default)]
    pub address: Option<InstanceAddress>,
}

/// An instance's place on its service's network, chosen by the console.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InstanceAddress {
    pub network: dunes_shared::model::NetworkName,
    pub ip: std::net::Ipv4Addr,
    pub mac: String,
}

impl InstanceRecord {
    pub fn key(&self) -> InstanceKey {
        InstanceKey {
            service: self.service.clone(),
            app: self.app.clone(),
            index: self.index,
        }
    }
}

/// Which instance: a service's application and its index (`shop/web/1` in the store).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceKey {
    pub service: dunes_shared::model::ServiceName,
    pub app: dunes_shared::model::AppName,
    pub index: u32,
}

impl std::fmt::Display for InstanceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.service, self.app, self.index)
    }
}

/// Milliseconds since the Unix epoch (0 for a clock before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
