//! What the store keeps, as storage types: they change only with the schema version, never
//! with the wire protocol. Encoded as MessagePack maps keyed by field name, so a field added
//! later with `#[serde(default)]` reads from older rows without an upgrade step.

use dunes_shared::{
    model::{
        HostId, HostInventory, NetworkInterface, Prices, RuntimeInfo, RuntimeKind, Site, SiteName,
        SizesFrom, TemplateName, VmName, VmState, VmStatus,
    },
    pki::Fingerprint,
};
use serde::{Deserialize, Serialize};

use crate::engine::records::{
    EventRecord, HostRecord, InstanceRecord, InstanceState, Level, Maintenance, MovePhase,
    ServiceMove, ServiceRecord,
};

/// A row that does not make a valid record (a name that no longer validates, say).
#[derive(Debug, thiserror::Error)]
#[error("stored {what} is invalid: {why}")]
pub struct RowError {
    pub what: &'static str,
    pub why: String,
}

fn invalid(what: &'static str) -> impl Fn(dunes_shared::model::NameError) -> RowError {
    move |e| RowError {
        what,
        why: e.to_string(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRow {
    pub id: String,
    pub address: String,
    pub fingerprint: [u8; 32],
    pub enrolled_at_ms: u64,
    #[serde(default)]
    pub inventory: Option<InventoryRow>,
    #[serde(default)]
    pub cert_expires_ms: Option<u64>,
    #[serde(default)]
    pub maintenance: Option<MaintenanceRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaintenanceRow {
    pub since_ms: u64,
    pub paused: bool,
    #[serde(default)]
    pub resumed_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InventoryRow {
    pub hostname: String,
    pub cpus: u32,
    pub cpu_model: String,
    pub memory_mib: u64,
    pub storage_total_mib: u64,
    pub storage_free_mib: u64,
    pub network: Vec<NicRow>,
    pub runtimes: Vec<RuntimeRow>,
    pub site: SiteRow,
    pub prices: PricesRow,
    pub security_level: u8,
    pub agent_version: String,
    /// As [`SizesFrom::as_str`]; rows of schema 1 have none (the machine's).
    #[serde(default)]
    pub sizes_from: Option<String>,
    /// `(name, version)` of each interpreter found.
    #[serde(default)]
    pub interpreters: Vec<(String, String)>,
    #[serde(default)]
    pub template_disks: Vec<TemplateDiskRow>,
}

/// A template image's digest, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateDiskRow {
    pub template: String,
    pub blake3: String,
    pub allocated_bytes: u64,
}

impl From<&dunes_shared::model::TemplateDisk> for TemplateDiskRow {
    fn from(t: &dunes_shared::model::TemplateDisk) -> Self {
        TemplateDiskRow {
            template: t.template.to_string(),
            blake3: t.blake3.clone(),
            allocated_bytes: t.allocated_bytes,
        }
    }
}

impl TemplateDiskRow {
    /// `None` for a name that no longer validates: the digest is only a hint for migrations.
    fn into_model(self) -> Option<dunes_shared::model::TemplateDisk> {
        Some(dunes_shared::model::TemplateDisk {
            template: TemplateName::new(self.template).ok()?,
            blake3: self.blake3,
            allocated_bytes: self.allocated_bytes,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NicRow {
    pub name: String,
    pub mac: String,
    pub speed_mbps: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuntimeRow {
    /// `libvirt`, `process`, or a kind a newer console stored.
    pub kind: String,
    pub driver: String,
    pub version: String,
    #[serde(default)]
    pub limits: Option<String>,
    #[serde(default)]
    pub users: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteRow {
    pub name: String,
    pub remote: bool,
    pub link_bandwidth_mbps: u32,
    pub link_latency_ms: u32,
    #[serde(default)]
    pub transfer_limit_mbps: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct PricesRow {
    pub per_gb_month_stored: f64,
    pub per_gb_transferred: f64,
    pub per_cpu_hour: f64,
    #[serde(default)]
    pub per_gb_memory_hour: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRow {
    pub uuid: String,
    pub name: String,
    /// As [`VmState::as_str`].
    pub state: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub template: Option<String>,
    pub disk_bytes: u64,
    /// `libvirt` or `process`; rows from before runtimes were named are libvirt VMs.
    #[serde(default)]
    pub runtime: Option<String>,
    #[serde(default)]
    pub overlay_on: Option<TemplateDiskRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRow {
    pub seq: u64,
    pub time_ms: u64,
    /// `info`, `warning` or `error`.
    pub level: String,
    pub host: Option<String>,
    pub message: String,
}

impl From<&HostRecord> for HostRow {
    fn from(h: &HostRecord) -> Self {
        HostRow {
            id: h.id.to_string(),
            address: h.address.clone(),
            fingerprint: h.fingerprint.0,
            enrolled_at_ms: h.enrolled_at_ms,
            inventory: h.inventory.as_ref().map(InventoryRow::from),
            cert_expires_ms: h.cert_expires_ms,
            maintenance: h.maintenance.map(|m| MaintenanceRow {
                since_ms: m.since_ms,
                paused: m.paused,
                resumed_ms: m.resumed_ms,
            }),
        }
    }
}

impl TryFrom<HostRow> for HostRecord {
    type Error = RowError;
    fn try_from(row: HostRow) -> Result<Self, RowError> {
        let id = HostId::new(row.id).map_err(invalid("host id"))?;
        let inventory = match row.inventory {
            Some(inv) => Some(inv.into_model(&id)?),
            None => None,
        };
        Ok(HostRecord {
            id,
            address: row.address,
            fingerprint: Fingerprint(row.fingerprint),
            enrolled_at_ms: row.enrolled_at_ms,
            inventory,
            cert_expires_ms: row.cert_expires_ms,
            maintenance: row.maintenance.map(|m| Maintenance {
                since_ms: m.since_ms,
                paused: m.paused,
                resumed_ms: m.resumed_ms,
            }),
        })
    }
}

impl From<&HostInventory> for InventoryRow {
    fn from(i: &HostInventory) -> Self {
        InventoryRow {
            hostname: i.hostname.clone(),
            cpus: i.cpus,
            cpu_model: i.cpu_model.clone(),
            memory_mib: i.memory_mib,
            storage_total_mib: i.storage_total_mib,
            storage_free_mib: i.storage_free_mib,
            network: i
                .network
                .iter()
                .map(|n| NicRow {
                    name: n.name.clone(),
                    mac: n.mac.clone(),
                    speed_mbps: n.speed_mbps,
                })
                .collect(),
            runtimes: i
                .runtimes
                .iter()
                .map(|r| RuntimeRow {
                    kind: r.kind.as_str().to_string(),
                    driver: r.driver.clone(),
                    version: r.version.clone(),
                    limits: r.limits.clone(),
                    users: r.users.clone(),
                })
                .collect(),
            site: SiteRow {
                name: i.site.name.to_string(),
                remote: i.site.remote,
                link_bandwidth_mbps: i.site.link_bandwidth_mbps,
                link_latency_ms: i.site.link_latency_ms,
                transfer_limit_mbps: i.site.transfer_limit_mbps,
            },
            prices: PricesRow {
                per_gb_month_stored: i.prices.per_gb_month_stored,
                per_gb_transferred: i.prices.per_gb_transferred,
                per_cpu_hour: i.prices.per_cpu_hour,
                per_gb_memory_hour: i.prices.per_gb_memory_hour,
            },
            security_level: i.security_level,
            agent_version: i.agent_version.clone(),
            sizes_from: Some(i.sizes_from.as_str().to_string()),
            interpreters: i
                .interpreters
                .iter()
                .map(|x| (x.name.clone(), x.version.clone()))
                .collect(),
            template_disks: i.template_disks.iter().map(TemplateDiskRow::from).collect(),
        }
    }
}

impl InventoryRow {
    fn into_model(self, host_id: &HostId) -> Result<HostInventory, RowError> {
        Ok(HostInventory {
            host_id: host_id.clone(),
            hostname: self.hostname,
            cpus: self.cpus,
            cpu_model: self.cpu_model,
            memory_mib: self.memory_mib,
            storage_total_mib: self.storage_total_mib,
            storage_free_mib: self.storage_free_mib,
            network: self
                .network
                .into_iter()
                .map(|n| NetworkInterface {
                    name: n.name,
                    mac: n.mac,
                    speed_mbps: n.speed_mbps,
                })
                .collect(),
            runtimes: self
                .runtimes
                .into_iter()
                .map(|r| RuntimeInfo {
                    kind: match r.kind.as_str() {
                        "libvirt" => RuntimeKind::Libvirt,
                        "process" => RuntimeKind::Process,
                        _ => RuntimeKind::Unknown,
                    },
                    driver: r.driver,
                    version: r.version,
                    limits: r.limits,
                    users: r.users,
                })
                .collect(),
            site: Site {
                name: SiteName::new(self.site.name).map_err(invalid("site name"))?,
                remote: self.site.remote,
                link_bandwidth_mbps: self.site.link_bandwidth_mbps,
                link_latency_ms: self.site.link_latency_ms,
                transfer_limit_mbps: self.site.transfer_limit_mbps,
            },
            prices: Prices {
                per_gb_month_stored: self.prices.per_gb_month_stored,
                per_gb_transferred: self.prices.per_gb_transferred,
                per_cpu_hour: self.prices.per_cpu_hour,
                per_gb_memory_hour: self.prices.per_gb_memory_hour,
            },
            security_level: self.security_level,
            agent_version: self.agent_version,
            sizes_from: match self.sizes_from.as_deref() {
                None | Some("machine") => SizesFrom::Machine,
                Some("test-driver") => SizesFrom::TestDriver,
                Some(_) => SizesFrom::Unknown,
            },
            interpreters: self
                .interpreters
                .into_iter()
                .map(|(name, version)| dunes_shared::model::InterpreterInfo { name, version })
                .collect(),
            template_disks: self
                .template_disks
                .into_iter()
                .filter_map(TemplateDiskRow::into_model)
                .collect(),
        })
    }
}

const VM_STATES: [VmState; 8] = [
    VmState::Running,
    VmState::Shutoff,
    VmState::Paused,
    VmState::ShuttingDown,
    VmState::Crashed,
    VmState::Suspended,
    VmState::Blocked,
    VmState::Unknown,
];

impl From<&VmStatus> for VmRow {
    fn from(v: &VmStatus) -> Self {
        VmRow {
            uuid: v.uuid.clone(),
            name: v.name.to_string(),
            state: v.state.as_str().to_string(),
            vcpus: v.vcpus,
            memory_mib: v.memory_mib,
            template: v.template.as_ref().map(|t| t.to_string()),
            disk_bytes: v.disk_bytes,
            runtime: Some(v.runtime.as_str().to_string()),
            overlay_on: v.overlay_on.as_ref().map(TemplateDiskRow::from),
        }
    }
}

impl TryFrom<VmRow> for VmStatus {
    type Error = RowError;
    fn try_from(row: VmRow) -> Result<Self, RowError> {
        Ok(VmStatus {
            uuid: row.uuid,
            name: VmName::new(row.name).map_err(invalid("VM name"))?,
            state: VM_STATES
                .into_iter()
                .find(|s| s.as_str() == row.state)
                .unwrap_or(VmState::Unknown),
            vcpus: row.vcpus,
            memory_mib: row.memory_mib,
            runtime: runtime_kind(row.runtime.as_deref()),
            // A template name that no longer validates is only a label: drop it.
            template: row.template.and_then(|t| TemplateName::new(t).ok()),
            disk_bytes: row.disk_bytes,
            overlay_on: row.overlay_on.and_then(TemplateDiskRow::into_model),
            // Only a live agent says: a stored VM is one nobody can move until it does.
            disks: None,
            nics: None,
            autostart: None,
            next_start: None,
            addresses: None,
            snapshots: None,
            installer: None,
            screen: false,
        })
    }
}

impl From<&EventRecord> for EventRow {
    fn from(e: &EventRecord) -> Self {
        EventRow {
            seq: e.seq,
            time_ms: e.time_ms,
            level: e.level.as_str().to_string(),
            host: e.host.as_ref().map(|h| h.to_string()),
            message: e.message.clone(),
        }
    }
}

impl From<EventRow> for EventRecord {
    fn from(row: EventRow) -> Self {
        EventRecord {
            seq: row.seq,
            time_ms: row.time_ms,
            level: match row.level.as_str() {
                "error" => Level::Error,
                "warning" => Level::Warning,
                _ => Level::Info,
            },
            host: row.host.and_then(|h| HostId::new(h).ok()),
            message: row.message,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceRow {
    pub name: String,
    /// The service file as the operator wrote it.
    pub source: String,
    pub defined_at_ms: u64,
    #[serde(default)]
    pub moving: Option<ServiceMoveRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceMoveRow {
    pub site: String,
    /// As [`MovePhase::as_str`].
    pub phase: String,
    pub was_running: bool,
    pub since_ms: u64,
    #[serde(default)]
    pub error: Option<String>,
}

impl From<&ServiceRecord> for ServiceRow {
    fn from(s: &ServiceRecord) -> Self {
        ServiceRow {
            name: s.name.to_string(),
            source: s.source.clone(),
            defined_at_ms: s.defined_at_ms,
            moving: s.moving.as_ref().map(|m| ServiceMoveRow {
                site: m.site.clone(),
                phase: m.phase.as_str().to_string(),
                was_running: m.was_running,
                since_ms: m.since_ms,
                error: m.error.clone(),
            }),
        }
    }
}

impl TryFrom<ServiceRow> for ServiceRecord {
    type Error = RowError;
    fn try_from(row: ServiceRow) -> Result<Self, RowError> {
        Ok(ServiceRecord {
            name: dunes_shared::model::ServiceName::new(row.name)
                .map_err(invalid("service name"))?,
            source: row.source,
            defined_at_ms: row.defined_at_ms,
            moving: match row.moving {
                Some(m) => Some(ServiceMove {
                    phase: MovePhase::parse(&m.phase).ok_or_else(|| RowError {
                        what: "service move phase",
                        why: m.phase.clone(),
                    })?,
                    site: m.site,
                    was_running: m.was_running,
                    since_ms: m.since_ms,
                    error: m.error,
                }),
                None => None,
            },
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRow {
    pub service: String,
    pub app: String,
    pub index: u32,
    pub host: String,
    pub vm: String,
    /// As [`InstanceState::as_str`].
    pub state: String,
    #[serde(default)]
    pub runtime: Option<String>,
    #[serde(default)]
    pub adopted: bool,
    /// Its service network's name, its address on it and its MAC.
    #[serde(default)]
    pub network: Option<(String, String, String)>,
}

impl From<&InstanceRecord> for InstanceRow {
    fn from(i: &InstanceRecord) -> Self {
        InstanceRow {
            service: i.service.to_string(),
            app: i.app.to_string(),
            index: i.index,
            host: i.host.to_string(),
            vm: i.vm.to_string(),
            state: i.state.as_str().to_string(),
            runtime: Some(i.runtime.as_str().to_string()),
            adopted: i.adopted,
            network: i
                .address
                .as_ref()
                .map(|a| (a.network.to_string(), a.ip.to_string(), a.mac.clone())),
        }
    }
}

impl TryFrom<InstanceRow> for InstanceRecord {
    type Error = RowError;
    fn try_from(row: InstanceRow) -> Result<Self, RowError> {
        use dunes_shared::model::{AppName, ServiceName};
        Ok(InstanceRecord {
            service: ServiceName::new(row.service).map_err(invalid("service name"))?,
            app: AppName::new(row.app).map_err(invalid("application name"))?,
            index: row.index,
            host: HostId::new(row.host).map_err(invalid("host id"))?,
            vm: VmName::new(row.vm).map_err(invalid("VM name"))?,
            state: match row.state.as_str() {
                "created" => InstanceState::Created,
                "removing" => InstanceState::Removing,
                _ => InstanceState::Creating,
            },
            runtime: runtime_kind(row.runtime.as_deref()),
            adopted: row.adopted,
            address: match row.network {
                None => None,
                Some((network, ip, mac)) => Some(crate::engine::records::InstanceAddress {
                    network: dunes_shared::model::NetworkName::new(network)
                        .map_err(invalid("network name"))?,
                    ip: ip.parse().map_err(|e: std::net::AddrParseError| RowError {
                        what: "instance address",
                        why: e.to_string(),
                    })?,
                    mac,
                }),
            },
        })
    }
}

/// A runtime kind as stored; none is libvirt (rows from before runtimes were named).
fn runtime_kind(stored: Option<&str>) -> RuntimeKind {
    match stored {
        None | Some("libvirt") => RuntimeKind::Libvirt,
        Some("process") => RuntimeKind::Process,
        Some(_) => RuntimeKind::Unknown,
    }
}

/// How a stored migration's disk travels. An unknown kind (a newer console's) reads as a
/// whole image: the source agent flattens an overlay for any transfer that is not an overlay's.
fn disk_move_of(row: &MigrationRow) -> Result<crate::engine::migration::DiskMove, RowError> {
    use crate::engine::migration::DiskMove;
    let template = || {
        TemplateName::new(row.disk_template.clone().unwrap_or_default())
            .map_err(invalid("template name"))
    };
    Ok(match (row.disk_move.as_str(), &row.disk_blake3) {
        ("overlay", Some(blake3)) => DiskMove::Overlay(dunes_shared::model::TemplateDisk {
            template: template()?,
            blake3: blake3.clone(),
            allocated_bytes: row.disk_base_bytes,
        }),
        ("flattened", _) => DiskMove::Flattened(template()?),
        _ => DiskMove::Image,
    })
}

/// A migration's journal as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationRow {
    pub id: u64,
    pub vm: String,
    pub from: String,
    pub to: String,
    /// As [`crate::engine::migration::MigrationStep::as_str`].
    pub step: String,
    pub was_running: bool,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub bytes_done: u64,
    #[serde(default)]
    pub bytes_total: u64,
    #[serde(default)]
    pub ticket: Option<String>,
    #[serde(default)]
    pub digest: Option<String>,
    #[serde(default)]
    pub started_ms: u64,
    #[serde(default)]
    pub updated_ms: u64,
    /// As [`crate::engine::migration::MigrationOrigin::as_string`].
    #[serde(default)]
    pub origin: String,
    /// As [`crate::engine::migration::MigrationStep::as_str`].
    #[serde(default)]
    pub failed_at: Option<String>,
    #[serde(default)]
    pub limit_mbps: Option<u32>,
    #[serde(default)]
    pub compress: bool,
    /// As [`crate::engine::migration::DiskMove::kind`]; with the template, and for an
    /// overlay its image's BLAKE3 and allocated bytes.
    #[serde(default)]
    pub disk_move: String,
    #[serde(default)]
    pub disk_template: Option<String>,
    #[serde(default)]
    pub disk_blake3: Option<String>,
    #[serde(default)]
    pub disk_base_bytes: u64,
}

impl From<&crate::engine::migration::MigrationJournal> for MigrationRow {
    fn from(j: &crate::engine::migration::MigrationJournal) -> Self {
        MigrationRow {
            id: j.id,
            vm: j.vm.to_string(),
            from: j.from.to_string(),
            to: j.to.to_string(),
            step: j.step.as_str().to_string(),
            was_running: j.was_running,
            error: j.error.clone(),
            bytes_done: j.bytes_done,
            bytes_total: j.bytes_total,
            ticket: j.ticket.clone(),
            digest: j.digest.clone(),
            started_ms: j.started_ms,
            updated_ms: j.updated_ms,
            origin: j.origin.as_string(),
            failed_at: j.failed_at.map(|s| s.as_str().to_string()),
            limit_mbps: j.limit_mbps,
            compress: j.compress,
            disk_move: j.disk_move.kind().to_string(),
            disk_template: j.disk_move.template().map(|t| t.to_string()),
            disk_blake3: match &j.disk_move {
                crate::engine::migration::DiskMove::Overlay(t) => Some(t.blake3.clone()),
                _ => None,
            },
            disk_base_bytes: match &j.disk_move {
                crate::engine::migration::DiskMove::Overlay(t) => t.allocated_bytes,
                _ => 0,
            },
        }
    }
}

impl TryFrom<MigrationRow> for crate::engine::migration::MigrationJournal {
    type Error = RowError;
    fn try_from(row: MigrationRow) -> Result<Self, RowError> {
        use crate::engine::migration::MigrationStep;
        let disk_move = disk_move_of(&row)?;
        Ok(crate::engine::migration::MigrationJournal {
            id: row.id,
            vm: VmName::new(row.vm).map_err(invalid("VM name"))?,
            from: HostId::new(row.from).map_err(invalid("host id"))?,
            to: HostId::new(row.to).map_err(invalid("host id"))?,
            step: MigrationStep::parse(&row.step).ok_or_else(|| RowError {
                what: "migration step",
                why: row.step.clone(),
            })?,
            was_running: row.was_running,
            error: row.error,
            bytes_done: row.bytes_done,
            bytes_total: row.bytes_total,
            ticket: row.ticket,
            digest: row.digest,
            started_ms: row.started_ms,
            updated_ms: row.updated_ms,
            rate_bps: None,
            origin: crate::engine::migration::MigrationOrigin::parse(&row.origin),
            failed_at: row.failed_at.as_deref().and_then(MigrationStep::parse),
            limit_mbps: row.limit_mbps,
            compress: row.compress,
            waiting: None,
            disk_move,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::migration::{DiskMove, MigrationJournal, MigrationOrigin, MigrationStep};

    #[test]
    fn a_migration_keeps_how_its_disk_travels() {
        let base = dunes_shared::model::TemplateDisk {
            template: TemplateName::new("base").unwrap(),
            blake3: "cd".repeat(32),
            allocated_bytes: 2 << 20,
        };
        for disk_move in [
            DiskMove::Image,
            DiskMove::Overlay(base.clone()),
            DiskMove::Flattened(base.template.clone()),
        ] {
            let journal = MigrationJournal {
                id: 3,
                vm: VmName::new("web").unwrap(),
                from: HostId::new("a").unwrap(),
                to: HostId::new("b").unwrap(),
                step: MigrationStep::Transferring,
                was_running: true,
                error: None,
                bytes_done: 1,
                bytes_total: 2,
                ticket: Some("t".into()),
                digest: None,
                started_ms: 4,
                updated_ms: 5,
                rate_bps: None,
                origin: MigrationOrigin::Operator,
                limit_mbps: None,
                compress: false,
                failed_at: None,
                waiting: None,
                disk_move,
            };
            let row = MigrationRow::from(&journal);
            assert_eq!(MigrationJournal::try_from(row.clone()).unwrap(), journal);
            // A row from before overlays, or a kind a newer console stored, is a whole image.
            let older = MigrationRow {
                disk_move: String::new(),
                ..row
            };
            assert_eq!(
                MigrationJournal::try_from(older).unwrap().disk_move,
                DiskMove::Image
            );
        }
    }
}
