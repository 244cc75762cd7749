//! The immutable picture of the fleet the engine publishes to the UI and to ctl.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use dunes_shared::model::{HostId, HostInventory, HostStatus, VmName, VmStatus};
use serde::Serialize;

use super::records::{EventRecord, HostRecord};

/// How the console's link to an agent stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    Connecting,
    Online,
    Unreachable,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Online => "online",
            LinkState::Unreachable => "unreachable",
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HostView {
    pub record: HostRecord,
    pub link: LinkState,
    /// Why the link is down, when it is.
    pub link_error: Option<String>,
    pub status: Option<HostStatus>,
    pub vms: Vec<VmStatus>,
    /// Events of kinds this console does not know, skipped on the current link, by kind
    /// (counted at powers of two: a lower bound).
    pub skipped_events: std::collections::BTreeMap<String, u64>,
}

impl HostView {
    pub fn id(&self) -> &HostId {
        &self.record.id
    }

    pub fn inventory(&self) -> Option<&HostInventory> {
        self.record.inventory.as_ref()
    }

    pub fn site_name(&self) -> &str {
        self.inventory().map_or("unknown", |i| i.site.name.as_str())
    }

    pub fn is_remote(&self) -> bool {
        self.inventory().is_some_and(|i| i.site.remote)
    }

    pub fn vm(&self, name: &VmName) -> Option<&VmStatus> {
        self.vms.iter().find(|v| &v.name == name)
    }

    /// When the agent's certificate expires, as last seen.
    pub fn cert_expires(&self) -> Option<SystemTime> {
        self.record
            .cert_expires_ms
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
    }

    pub fn cert_expired(&self) -> bool {
        self.cert_expires().is_some_and(|t| t <= SystemTime::now())
    }
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// Sorted by site, then host id.
    pub hosts: Vec<Arc<HostView>>,
    /// The most recent events, oldest first.
    pub events: Arc<Vec<EventRecord>>,
    /// Sorted by name.
    pub services: Arc<Vec<Arc<super::ServiceView>>>,
    /// Every migration, by id.
    pub migrations: Arc<Vec<super::migration::MigrationJournal>>,
    /// Every host in maintenance and its drain, by host id.
    pub drains: Arc<Vec<super::evacuation::DrainProgress>>,
    /// The image library as placement counts it.
    #[serde(default)]
    pub images: Arc<super::services::placement::ImageNeeds>,
    /// Images on their way to hosts, by image and host.
    #[serde(default)]
    pub image_transfers: Arc<Vec<super::images::ImageTransferProgress>>,
    /// Service networks, by name.
    #[serde(default)]
    pub networks: Arc<Vec<super::networks::NetworkView>>,
    /// Readings before this time (unix seconds) were generated, not measured (the demo's).
    pub generated_until_secs: Option<u64>,
    /// Bumped on every publish.
    pub version: u64,
}

impl Snapshot {
    pub fn drain(&self, id: &HostId) -> Option<&super::evacuation::DrainProgress> {
        self.drains.iter().find(|d| &d.host == id)
    }

    pub fn host(&self, id: &HostId) -> Option<&Arc<HostView>> {
        self.hosts.iter().find(|h| h.id() == id)
    }

    /// Finds a VM by name across hosts: `NAME` or `HOST/NAME`.
    pub fn find_vm(&self, reference: &str) -> Result<(HostId, VmStatus), String> {
        let (host, name) = match reference.split_once('/') {
            Some((h, n)) => (Some(HostId::new(h).map_err(|e| e.to_string())?), n),
            None => (None, reference),
        };
        let name = VmName::new(name).map_err(|e| e.to_string())?;
        let matches: Vec<(HostId, VmStatus)> = self
            .hosts
            .iter()
            .filter(|h| host.as_ref().is_none_or(|id| h.id() == id))
            .filter_map(|h| h.vm(&name).map(|v| (h.id().clone(), v.clone())))
            .collect();
        match matches.len() {
            0 => Err(format!("no VM named {reference}")),
            1 => Ok(matches.into_iter().next().expect("one match")),
            _ => Err(format!(
                "VM name {name} exists on hosts {}; say HOST/{name}",
                matches
                    .iter()
                    .map(|(h, _)| h.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A time as RFC 3339 in UTC, to the second.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}
