//! The model: hosts, their inventory and status, VMs, templates.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest name accepted for hosts, VMs, sites and templates (a DNS label).
pub const NAME_MAX_LEN: usize = 63;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid {kind} {value:?}: use 1 to 63 characters a-z, 0-9 and '-', not starting or ending with '-'"
)]
pub struct NameError {
    pub kind: &'static str,
    pub value: String,
}

fn is_valid_name(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= NAME_MAX_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-')
}

/// Defines a validated name type. Deserialization validates too, so a name from the network
/// or a file is as safe to use in a path or a domain XML as one typed by the operator.
macro_rules! validated_name {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                if is_valid_name(&value) {
                    Ok(Self(value))
                } else {
                    Err(NameError { kind: $kind, value })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(value: String) -> Result<Self, NameError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(value: &str) -> Result<Self, NameError> {
                Self::new(value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

validated_name!(
    /// Stable identity of a host; its certificate names it.
    HostId,
    "host id"
);
validated_name!(
    /// Name of a VM, unique on its host.
    VmName,
    "VM name"
);
validated_name!(
    /// Name of a site (a group of hosts sharing a location and a link).
    SiteName,
    "site name"
);
validated_name!(
    /// Name of a VM template in an agent's image library.
    TemplateName,
    "template name"
);
validated_name!(
    /// Name of an image in the console's library: an operating system's disk or installer.
    ImageName,
    "image name"
);
validated_name!(
    /// Name of a service: a group of applications run as one.
    ServiceName,
    "service name"
);
validated_name!(
    /// Name of an application, unique in its service.
    AppName,
    "application name"
);
validated_name!(
    /// Name of a person or program that drives the engine from elsewhere; their
    /// certificate names them.
    OperatorName,
    "operator name"
);
validated_name!(
    /// Name of a service network: a service's own (named as the service), or one that
    /// several services join.
    NetworkName,
    "network name"
);

/// What runs workloads on a host. Messages from before runtimes were named meant libvirt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum RuntimeKind {
    #[default]
    Libvirt,
    Process,
    /// A runtime a newer agent added.
    #[serde(other)]
    Unknown,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Libvirt => "libvirt",
            RuntimeKind::Process => "process",
            RuntimeKind::Unknown => "unknown",
        }
    }
}

/// One runtime on a host, with what it reports about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuntimeInfo {
    pub kind: RuntimeKind,
    /// For libvirt: the hypervisor type as libvirt names it (`Test`, `QEMU`).
    pub driver: String,
    pub version: String,
    /// How CPU and memory limits are applied to what it runs, or why they are not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<String>,
    /// As which user what it runs runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<String>,
}

/// Where a host stands, and what its link to the rest of the fleet is like.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Site {
    pub name: SiteName,
    /// A remote site is reached over a wide-area link (the seed's dotted line).
    pub remote: bool,
    pub link_bandwidth_mbps: u32,
    pub link_latency_ms: u32,
    /// The most one disk transfer to or from this site may use of its link, in Mbit/s.
    #[serde(default)]
    pub transfer_limit_mbps: Option<u32>,
}

impl Default for Site {
    fn default() -> Self {
        Site {
            name: SiteName::new("default").expect("valid literal"),
            remote: false,
            link_bandwidth_mbps: 1000,
            link_latency_ms: 1,
            transfer_limit_mbps: None,
        }
    }
}

/// Operating prices of a host, in the fleet's currency unit.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Prices {
    pub per_gb_month_stored: f64,
    pub per_gb_transferred: f64,
    pub per_cpu_hour: f64,
    /// Memory allocated to workloads, per GiB and hour.
    pub per_gb_memory_hour: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkInterface {
    pub name: String,
    pub mac: String,
    pub speed_mbps: Option<u32>,
}

/// Where a host's CPU and memory figures come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum SizesFrom {
    /// Read from the machine (/proc).
    #[default]
    Machine,
    /// Declared by libvirt's test driver for its mock host (the demo fleet).
    TestDriver,
    /// A source a newer agent added.
    #[serde(other)]
    Unknown,
}

impl SizesFrom {
    pub fn as_str(self) -> &'static str {
        match self {
            SizesFrom::Machine => "machine",
            SizesFrom::TestDriver => "test-driver",
            SizesFrom::Unknown => "unknown",
        }
    }
}

/// Everything the console needs to know about a host to place work on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostInventory {
    pub host_id: HostId,
    pub hostname: String,
    pub cpus: u32,
    pub cpu_model: String,
    pub memory_mib: u64,
    pub storage_total_mib: u64,
    pub storage_free_mib: u64,
    pub network: Vec<NetworkInterface>,
    pub runtimes: Vec<RuntimeInfo>,
    pub site: Site,
    pub prices: Prices,
    /// Higher is more trusted; services can demand a minimum.
    pub security_level: u8,
    pub agent_version: String,
    /// Where `cpus` and `memory_mib` come from.
    #[serde(default)]
    pub sizes_from: SizesFrom,
    /// Interpreters found on the host, for applications that need one.
    #[serde(default)]
    pub interpreters: Vec<InterpreterInfo>,
    /// The templates whose images VM disks can be overlays on, with their digests, so that
    /// a migration knows whether an overlay can move as it is.
    #[serde(default)]
    pub template_disks: Vec<TemplateDisk>,
}

/// An interpreter a host has, with its version (`python3`, `3.11.2`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterpreterInfo {
    pub name: String,
    pub version: String,
}

/// One reading of a host or a workload: gauges as they are now, counters as totals since
/// the host booted or the workload started (the console takes the differences; a counter
/// that went down started again).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Counters {
    /// CPU time used, in nanoseconds, over `cpus` CPUs.
    pub cpu_ns: u64,
    pub cpus: u32,
    pub memory_used_mib: u64,
    pub memory_total_mib: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    /// Of `net_tx_bytes`, what went to addresses outside the host's site, where the agent
    /// sees each connection's peer (the TCP sockets of a process instance, or of a VM's QEMU
    /// process on the user-mode network); `None` where it cannot tell (a bridged VM, whose
    /// guest's connections are its own; a VM without a NIC) or does not know its site's
    /// addresses yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_tx_out_of_site_bytes: Option<u64>,
}

/// A workload's reading within a [`Sample`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadSample {
    pub name: VmName,
    pub counters: Counters,
}

/// What an agent measured at one moment: its host and every running workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// When, in milliseconds since the Unix epoch (the agent's clock).
    pub at_unix_ms: u64,
    pub host: Counters,
    pub workloads: Vec<WorkloadSample>,
}

/// What changes about a host from second to second.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct HostStatus {
    pub cpu_load_percent: f32,
    pub memory_used_mib: u64,
    pub memory_total_mib: u64,
    pub storage_free_mib: u64,
    pub vms_running: u32,
    pub uptime_secs: u64,
}

/// Lifecycle state of a VM, as libvirt reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum VmState {
    Running,
    Shutoff,
    Paused,
    ShuttingDown,
    Crashed,
    Suspended,
    Blocked,
    /// A state this release cannot tell, or one a newer agent added.
    #[serde(other)]
    Unknown,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Shutoff => "shutoff",
            VmState::Paused => "paused",
            VmState::ShuttingDown => "shutting-down",
            VmState::Crashed => "crashed",
            VmState::Suspended => "suspended",
            VmState::Blocked => "blocked",
            VmState::Unknown => "unknown",
        }
    }

    /// Whether the VM holds CPU and memory on its host.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            VmState::Running | VmState::Paused | VmState::ShuttingDown | VmState::Blocked
        )
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

pub const VCPUS_MAX: u32 = 256;
pub const MEMORY_MIB_MIN: u64 = 16;
pub const MEMORY_MIB_MAX: u64 = 4 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    #[error("vcpus must be between 1 and {VCPUS_MAX}, not {0}")]
    Vcpus(u32),
    #[error("memory must be between {MEMORY_MIB_MIN} and {MEMORY_MIB_MAX} MiB, not {0}")]
    Memory(u64),
    #[error(
        "snapshot name {0:?} must be 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'"
    )]
    SnapshotName(String),
}

/// What the operator asks for when creating a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: VmName,
    pub template: TemplateName,
    /// `None` takes the template's default.
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
}

impl VmSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_resources(self.vcpus, self.memory_mib)
    }
}

/// Checks vCPUs and memory asked for a VM (at its creation or later); `None` is not asked.
pub fn validate_resources(vcpus: Option<u32>, memory_mib: Option<u64>) -> Result<(), SpecError> {
    if let Some(vcpus) = vcpus
        && (vcpus == 0 || vcpus > VCPUS_MAX)
    {
        return Err(SpecError::Vcpus(vcpus));
    }
    if let Some(memory) = memory_mib
        && !(MEMORY_MIB_MIN..=MEMORY_MIB_MAX).contains(&memory)
    {
        return Err(SpecError::Memory(memory));
    }
    Ok(())
}

/// A VM as its agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub uuid: String,
    pub name: VmName,
    pub state: VmState,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The template it was made from, when Dunes made it.
    pub template: Option<TemplateName>,
    /// Bytes allocated for its disks in the agent's storage directory.
    pub disk_bytes: u64,
    /// What runs it: a libvirt VM, or a supervised process.
    #[serde(default)]
    pub runtime: RuntimeKind,
    /// The template image its disk is a copy-on-write overlay on (`disk_bytes` counts the
    /// overlay only); `None` for a disk that is a whole image.
    #[serde(default)]
    pub overlay_on: Option<TemplateDisk>,
    /// Its disks in the agent's storage directory. An empty list is a VM the agent cannot
    /// move (defined outside Dunes, its disks elsewhere); `None` is an agent that does not
    /// say (an older release, or a process instance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<VmDiskInfo>>,
    /// Its network interfaces; `None` from an agent that does not say (an older release, or
    /// a process instance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nics: Option<Vec<VmNicInfo>>,
    /// Whether its agent starts it when the agent starts; `None` from an agent that does not
    /// say, or for a VM it did not create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostart: Option<bool>,
    /// The vCPUs and memory it gets at its next start, when they differ from what it runs
    /// with now (changed while it ran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_start: Option<VmResources>,
    /// Its IP addresses (`10.0.2.15/24`), as its guest agent reports them while it runs;
    /// `None` when nobody answered (no guest agent, or not running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<Vec<String>>,
    /// How many snapshots it has; `None` from an agent that does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<u32>,
    /// The installer (an ISO image of the library) in its CD-ROM drive, booted before its
    /// disk until it is ejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installer: Option<TemplateName>,
    /// It has a display to watch (a QEMU VM this release created); absent: it has none.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub screen: bool,
}

/// The vCPUs and memory of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmResources {
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// A snapshot of a VM: its disks (and memory, when it ran) at one moment, kept inside its
/// qcow2 disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub created_unix_secs: u64,
    /// The VM's state when it was taken: a running VM's snapshot reverts to running.
    pub state: VmState,
    /// Bytes of memory state it holds (0 for a VM that was off); `None` when unknown.
    #[serde(default)]
    pub memory_state_bytes: Option<u64>,
    /// The snapshot the VM last was at (taken or reverted to).
    #[serde(default)]
    pub current: bool,
}

/// Longest snapshot name.
pub const SNAPSHOT_NAME_MAX: usize = 64;

/// Checks a snapshot name: 1 to 64 letters, digits, `-`, `_` or `.`, not starting with `.`.
pub fn validate_snapshot_name(name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= SNAPSHOT_NAME_MAX
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(SpecError::SnapshotName(name.chars().take(80).collect()))
    }
}

/// One network interface of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNicInfo {
    /// The device the guest sees (`virtio`, `e1000`, …), or "default".
    pub model: String,
    /// Where it is plugged: `user-mode` (QEMU's user networking), `network NAME` or
    /// `bridge NAME`.
    pub network: String,
    pub mac: Option<String>,
}

/// How a disk image file is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskImageFormat {
    Raw,
    Qcow2,
    /// A format a newer agent knows.
    #[serde(other)]
    Other,
}

impl DiskImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskImageFormat::Raw => "raw",
            DiskImageFormat::Qcow2 => "qcow2",
            DiskImageFormat::Other => "other",
        }
    }
}

/// One disk of a VM, as its agent holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDiskInfo {
    /// The file's name inside the agent's disks directory.
    pub file: String,
    pub format: DiskImageFormat,
    /// The size the guest sees.
    pub virtual_bytes: u64,
    /// What the file takes on the host's storage (an overlay: its own clusters only).
    pub allocated_bytes: u64,
    /// The template image an overlay is backed by.
    #[serde(default)]
    pub backing: Option<TemplateName>,
}

/// What an image in the library is: a disk (raw or qcow2), or an installer (ISO 9660).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
    Iso,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Iso => "iso",
        }
    }

    /// The file name extension of an image in this format.
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Raw => "img",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Iso => "iso",
        }
    }
}

/// What boots a VM: the PC BIOS (SeaBIOS), or UEFI (OVMF, which the host must have).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    #[default]
    Bios,
    Uefi,
}

impl Firmware {
    pub fn as_str(self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        }
    }

    pub fn is_bios(&self) -> bool {
        *self == Firmware::Bios
    }
}

/// How a VM made from a library image gets its disk and its firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageDisk {
    /// The disk's size in GiB: a disk image's overlay grown to it (never below the image's
    /// size), or the empty disk an installer installs to (which needs one). `None` keeps a
    /// disk image's size.
    #[serde(default)]
    pub disk_gib: Option<u64>,
    #[serde(default)]
    pub firmware: Firmware,
}

/// The largest disk a VM is given, in GiB.
pub const DISK_GIB_MAX: u64 = 64 * 1024;

/// A template's disk image as its agent holds it: two hosts hold the same image when the
/// BLAKE3 of their files is the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateDisk {
    pub template: TemplateName,
    /// BLAKE3 of the whole image file, in hex.
    pub blake3: String,
    /// Bytes allocated for the image: what flattening an overlay on it adds at most.
    pub allocated_bytes: u64,
}

/// A template in an agent's image library.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateInfo {
    pub name: TemplateName,
    pub description: String,
    pub default_vcpus: u32,
    pub default_memory_mib: u64,
    pub disk_mib: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_dns_labels_only() {
        for good in ["a", "web-1", "0", &"x".repeat(63)] {
            assert!(VmName::new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "a/b",
            "../x",
            &"x".repeat(64),
            "é",
        ] {
            let err = VmName::new(bad).unwrap_err();
            assert_eq!(err.value, bad);
        }
        assert_eq!(
            HostId::new("Bad").unwrap_err().to_string(),
            "invalid host id \"Bad\": use 1 to 63 characters a-z, 0-9 and '-', not starting or ending with '-'"
        );
    }

    #[test]
    fn deserializing_an_invalid_name_fails() {
        let bytes = postcard::to_allocvec(&"../etc".to_string()).unwrap();
        assert!(postcard::from_bytes::<VmName>(&bytes).is_err());
        let bytes = postcard::to_allocvec(&"web".to_string()).unwrap();
        assert_eq!(
            postcard::from_bytes::<VmName>(&bytes).unwrap().as_str(),
            "web"
        );
    }

    #[test]
    fn spec_limits() {
        let mut spec = VmSpec {
            name: VmName::new("a").unwrap(),
            template: TemplateName::new("tiny").unwrap(),
            vcpus: Some(2),
            memory_mib: Some(256),
        };
        assert!(spec.validate().is_ok());
        spec.vcpus = Some(0);
        assert_eq!(spec.validate(), Err(SpecError::Vcpus(0)));
        spec.vcpus = None;
        spec.memory_mib = Some(8);
        assert_eq!(spec.validate(), Err(SpecError::Memory(8)));
    }

    #[test]
    fn states_have_lower_case_names() {
        assert_eq!(VmState::Running.to_string(), "running");
        assert_eq!(VmState::Shutoff.as_str(), "shutoff");
        assert!(VmState::Paused.is_active());
        assert!(!VmState::Shutoff.is_active());
    }
}
