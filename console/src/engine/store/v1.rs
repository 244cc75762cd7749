//! Schema 1, as the first release wrote it: postcard records laid out like the model types of
//! that release. Frozen: these types only ever read old stores, so they never change.

use serde::Deserialize;

use super::rows::{EventRow, HostRow, InventoryRow, NicRow, PricesRow, RuntimeRow, SiteRow, VmRow};

#[derive(Deserialize)]
pub struct Host {
    id: String,
    address: String,
    fingerprint: [u8; 32],
    enrolled_at_ms: u64,
    inventory: Option<Inventory>,
}

#[derive(Deserialize)]
struct Inventory {
    _host_id: String,
    hostname: String,
    cpus: u32,
    cpu_model: String,
    memory_mib: u64,
    storage_total_mib: u64,
    storage_free_mib: u64,
    network: Vec<Nic>,
    runtimes: Vec<Runtime>,
    site: Site,
    prices: Prices,
    security_level: u8,
    agent_version: String,
}

#[derive(Deserialize)]
struct Nic {
    name: String,
    mac: String,
    speed_mbps: Option<u32>,
}

#[derive(Deserialize)]
enum RuntimeKind {
    Libvirt,
    Process,
}

#[derive(Deserialize)]
struct Runtime {
    kind: RuntimeKind,
    driver: String,
    version: String,
}

#[derive(Deserialize)]
struct Site {
    name: String,
    remote: bool,
    link_bandwidth_mbps: u32,
    link_latency_ms: u32,
}

#[derive(Deserialize)]
struct Prices {
    per_gb_month_stored: f64,
    per_gb_transferred: f64,
    per_cpu_hour: f64,
}

#[derive(Deserialize)]
enum VmState {
    Running,
    Shutoff,
    Paused,
    ShuttingDown,
    Crashed,
    Suspended,
    Blocked,
    Unknown,
}

#[derive(Deserialize)]
pub struct Vm {
    uuid: String,
    name: String,
    state: VmState,
    vcpus: u32,
    memory_mib: u64,
    template: Option<String>,
    disk_bytes: u64,
}

#[derive(Deserialize)]
enum Level {
    Info,
    Warning,
    Error,
}

#[derive(Deserialize)]
pub struct Event {
    seq: u64,
    time_ms: u64,
    level: Level,
    host: Option<String>,
    message: String,
}

impl From<Host> for HostRow {
    fn from(h: Host) -> Self {
        HostRow {
            id: h.id,
            address: h.address,
            fingerprint: h.fingerprint,
            enrolled_at_ms: h.enrolled_at_ms,
            cert_expires_ms: None,
            maintenance: None,
            inventory: h.inventory.map(|i| InventoryRow {
                hostname: i.hostname,
                cpus: i.cpus,
                cpu_model: i.cpu_model,
                memory_mib: i.memory_mib,
                storage_total_mib: i.storage_total_mib,
                storage_free_mib: i.storage_free_mib,
                network: i
                    .network
                    .into_iter()
                    .map(|n| NicRow {
                        name: n.name,
                        mac: n.mac,
                        speed_mbps: n.speed_mbps,
                    })
                    .collect(),
                runtimes: i
                    .runtimes
                    .into_iter()
                    .map(|r| RuntimeRow {
                        kind: match r.kind {
                            RuntimeKind::Libvirt => "libvirt",
                            RuntimeKind::Process => "process",
                        }
                        .to_string(),
                        driver: r.driver,
                        version: r.version,
                        limits: None,
                        users: None,
                    })
                    .collect(),
                site: SiteRow {
                    name: i.site.name,
                    remote: i.site.remote,
                    link_bandwidth_mbps: i.site.link_bandwidth_mbps,
                    link_latency_ms: i.site.link_latency_ms,
                    transfer_limit_mbps: None,
                },
                prices: PricesRow {
                    per_gb_month_stored: i.prices.per_gb_month_stored,
                    per_gb_transferred: i.prices.per_gb_transferred,
                    per_cpu_hour: i.prices.per_cpu_hour,
                    per_gb_memory_hour: 0.0,
                },
                security_level: i.security_level,
                agent_version: i.agent_version,
                sizes_from: None,
                interpreters: Vec::new(),
                template_disks: Vec::new(),
            }),
        }
    }
}

impl From<Vm> for VmRow {
    fn from(v: Vm) -> Self {
        VmRow {
            uuid: v.uuid,
            name: v.name,
            state: match v.state {
                VmState::Running => "running",
                VmState::Shutoff => "shutoff",
                VmState::Paused => "paused",
                VmState::ShuttingDown => "shutting-down",
                VmState::Crashed => "crashed",
                VmState::Suspended => "suspended",
                VmState::Blocked => "blocked",
                VmState::Unknown => "unknown",
            }
            .to_string(),
            vcpus: v.vcpus,
            memory_mib: v.memory_mib,
            template: v.template,
            disk_bytes: v.disk_bytes,
            runtime: None,
            overlay_on: None,
        }
    }
}

impl From<Event> for EventRow {
    fn from(e: Event) -> Self {
        EventRow {
            seq: e.seq,
            time_ms: e.time_ms,
            level: match e.level {
                Level::Info => "info",
                Level::Warning => "warning",
                Level::Error => "error",
            }
            .to_string(),
            host: e.host,
            message: e.message,
        }
    }
}
