//! Wire protocol v2: one request per bidirectional stream, the response type tied to the
//! request, status pushed by the agent on one long-lived unidirectional stream.
//!
//! The major version is in the ALPN; what a peer can do beyond it is its feature set, sent
//! in the hello. Messages only grow: a new field carries `#[serde(default)]`, a new variant
//! is added and announced by a feature, nothing is renamed or removed. The golden-bytes tests
//! below keep old messages decodable; the rules are in `docs/PROTOCOL.md`.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::model::{
    HostId, HostInventory, HostStatus, RuntimeKind, Sample, SnapshotInfo, TemplateInfo, VmName,
    VmSpec, VmStatus,
};

/// ALPN of the control protocol between console and agent.
pub const ALPN_CONTROL: &[u8] = b"dunes/2";
/// ALPN of the enrollment protocol: a console proves a join token and installs a certificate.
pub const ALPN_ENROLL: &[u8] = b"dunes-enroll/2";

/// Feature names a peer announces in its hello. A request is sent only to a peer that
/// announced its feature; a name this release does not know is ignored.
pub mod features {
    /// `ListVms`, `CreateVm`, `StartVm`, `StopVm`, `DeleteVm`.
    pub const VM_LIFECYCLE: &str = "vm-lifecycle";
    /// `ListTemplates`.
    pub const TEMPLATES: &str = "templates";
    /// `RenewBegin`, `RenewFinish`: the host certificate renewed over the live connection.
    pub const CERT_RENEWAL: &str = "cert-renewal";
    /// `CheckReady`: the readiness checks of service applications.
    pub const READINESS: &str = "readiness";
    /// `PrepareReceive`, `SendDisk`: disks streamed agent to agent (`dunes-transfer/1`).
    pub const DISK_TRANSFER: &str = "disk-transfer";
    /// `ExportVm`, `ImportVm`, `HashDisk`, `DiscardDisk`: what a migration needs of each end.
    pub const MIGRATION: &str = "migration";
    /// `CancelTransfer`: a disk stream under way stopped at once.
    pub const TRANSFER_CANCEL: &str = "transfer-cancel";
    /// Disks that are qcow2 overlays on a template: `TransferTicket::overlay_on`, and the
    /// `flat` of `HashDisk` and `ExportVm`.
    pub const DISK_OVERLAY: &str = "disk-overlay";
    /// `AgentEvent::Samples`: the host's and its workloads' readings, once a second, sent
    /// in batches. An agent sends them only to a console that announced this feature too.
    pub const SAMPLES: &str = "samples";
    /// `GuestApps`, `GuestExec`: applications inside a VM, seen and run through its guest
    /// agent (qemu-guest-agent).
    pub const GUEST_APPS: &str = "guest-apps";
    /// `ReadMetric`: the number an application's instance reports (a command's output, or
    /// the connections to a port), for statistics and autoscaling.
    pub const APP_METRIC: &str = "app-metric";
    /// `SiteAddresses`: the console tells an agent the addresses of its site's hosts,
    /// and the agent counts what its process instances and user-network VMs send elsewhere
    /// as leaving the site
    /// (`Counters::net_tx_out_of_site_bytes`).
    pub const SITE_TRAFFIC: &str = "site-traffic";
    /// `PowerVm`: reboot, pause and resume a running VM.
    pub const VM_POWER: &str = "vm-power";
    /// `ConfigureVm`: a VM's vCPUs, memory and autostart changed.
    pub const VM_CONFIGURE: &str = "vm-configure";
    /// `SnapshotVm`: snapshots of a VM on qcow2 disks taken, listed, reverted to, deleted.
    pub const VM_SNAPSHOTS: &str = "vm-snapshots";
    /// `CloneVm`: a stopped VM copied on its host under a new name.
    pub const VM_CLONE: &str = "vm-clone";
    /// `ReceiveImage`: a library image streamed from the console, on a stream of its own,
    /// kept as a template of the image's name.
    pub const IMAGES: &str = "images";
    /// `OpenConsole`: a running VM's serial console, on a stream of its own.
    pub const SERIAL_CONSOLE: &str = "serial-console";
    /// `OpenScreen`: a running VM's screen (its VNC display), on a stream of its own.
    pub const SCREEN: &str = "screen";
    /// `ConfigureVm { eject_cdrom }`: an installer taken out of a VM's CD-ROM drive.
    pub const VM_EJECT: &str = "vm-eject";
    /// `StartVm { user_data }`: a VM's cloud-init user-data written anew before it starts.
    pub const START_USER_DATA: &str = "start-user-data";
    /// `SetNetworks`, and `CreateVm { network }`: service networks (a bridge per network,
    /// VXLAN between hosts, the instance's NIC or namespace on it, names, published ports).
    pub const SERVICE_NETWORKS: &str = "service-networks";

    /// What this release of the agent offers.
    pub const AGENT: &[&str] = &[
        VM_LIFECYCLE,
        TEMPLATES,
        CERT_RENEWAL,
        READINESS,
        DISK_TRANSFER,
        MIGRATION,
        TRANSFER_CANCEL,
        DISK_OVERLAY,
        SAMPLES,
        GUEST_APPS,
        APP_METRIC,
        SITE_TRAFFIC,
        VM_POWER,
        VM_CONFIGURE,
        VM_SNAPSHOTS,
        VM_CLONE,
        IMAGES,
        SERIAL_CONSOLE,
        SCREEN,
        VM_EJECT,
        START_USER_DATA,
        SERVICE_NETWORKS,
    ];
    /// What this release of the console offers to agents.
    pub const CONSOLE: &[&str] = &[SAMPLES];

    /// A feature set as sent in a hello.
    pub fn announce(set: &[&str]) -> Vec<String> {
        set.iter().map(|f| f.to_string()).collect()
    }
}

/// QUIC application error codes on connections and streams.
pub mod codes {
    use quinn::VarInt;
    /// Orderly close.
    pub const CLOSE_NORMAL: VarInt = VarInt::from_u32(0);
    /// The peer did not present an acceptable certificate for this protocol.
    pub const CLOSE_UNAUTHENTICATED: VarInt = VarInt::from_u32(0x10);
    /// The first stream was not a valid hello.
    pub const CLOSE_BAD_HELLO: VarInt = VarInt::from_u32(0x11);
    /// Too many connections of this kind at once; try again later.
    pub const CLOSE_BUSY: VarInt = VarInt::from_u32(0x12);
    /// The peer took longer than the deadline of this kind of connection.
    pub const CLOSE_TIMEOUT: VarInt = VarInt::from_u32(0x13);
    /// A frame exceeded the size limit.
    pub const STREAM_FRAME_TOO_LARGE: VarInt = VarInt::from_u32(0x20);
    /// A frame did not decode.
    pub const STREAM_UNDECODABLE: VarInt = VarInt::from_u32(0x21);
}

/// Why a request failed, as sent on the wire: a code plus a human sentence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    BadRequest,
    NotFound,
    AlreadyExists,
    Conflict,
    Unauthorized,
    InvalidToken,
    Runtime,
    Storage,
    Internal,
    WrongProtocol,
    Unsupported,
    /// A code this release does not know, from a newer peer.
    #[serde(other)]
    Unknown,
}

/// Opens every control connection; the connection is trusted only once this is answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub console_name: String,
    /// What the console offers (see [`features`]).
    #[serde(default)]
    pub features: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelloReply {
    pub inventory: HostInventory,
    pub status: HostStatus,
    pub vms: Vec<VmStatus>,
    /// What the agent offers (see [`features`]).
    #[serde(default)]
    pub features: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListVms;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListTemplates;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateVm {
    pub spec: VmSpec,
    pub start: bool,
    /// Which runtime runs it (the template is that runtime's).
    #[serde(default)]
    pub runtime: RuntimeKind,
    /// For a VM from a library image (its template holds the image): the disk's size and
    /// the firmware. Left out otherwise, so older agents read the request as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_disk: Option<crate::model::ImageDisk>,
    /// cloud-init's data: the agent makes the NoCloud seed and attaches it as a CD-ROM.
    /// Left out for a VM without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<crate::cloud_init::CloudInitData>,
    /// Its place on its service's network: a VM's NIC on the network's bridge, a process's
    /// namespace with a veth into it. Only for an agent that offers `service-networks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::network::InstanceNic>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartVm {
    pub name: VmName,
    #[serde(default)]
    pub runtime: RuntimeKind,
    /// cloud-init user-data that replaces what the VM's seed holds before it boots (a
    /// running VM keeps the seed it booted with). Only for an agent that offers
    /// `start-user-data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
}

/// What a running VM can be asked besides stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PowerAction {
    /// The guest restarts (asked through ACPI or its guest agent, as libvirt chooses).
    Reboot,
    /// Its vCPUs stop; its memory stays.
    Pause,
    /// A paused VM goes on.
    Resume,
}

impl PowerAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PowerAction::Reboot => "reboot",
            PowerAction::Pause => "pause",
            PowerAction::Resume => "resume",
        }
    }
}

/// Reboots, pauses or resumes a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PowerVm {
    pub name: VmName,
    pub action: PowerAction,
    #[serde(default)]
    pub runtime: RuntimeKind,
}

/// Changes a VM's vCPUs, memory or autostart; what is `None` stays. A running VM gets new
/// vCPUs and memory at its next start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigureVm {
    pub name: VmName,
    #[serde(default)]
    pub vcpus: Option<u32>,
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Start the VM whenever its agent starts.
    #[serde(default)]
    pub autostart: Option<bool>,
    /// Take the installer out of its CD-ROM drive (at once, if it runs): it boots from its
    /// disk from then on. Only for an agent that offers `vm-eject`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub eject_cdrom: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmConfigured {
    pub status: VmStatus,
    /// The new vCPUs or memory wait for the VM's next start (it runs now).
    pub at_next_start: bool,
}

/// What to do with a VM's snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotAction {
    List,
    Create,
    /// The VM goes back to the snapshot: what it wrote since is lost.
    Revert,
    Delete,
}

impl SnapshotAction {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotAction::List => "list",
            SnapshotAction::Create => "create",
            SnapshotAction::Revert => "revert",
            SnapshotAction::Delete => "delete",
        }
    }
}

/// Takes, reverts to or deletes one snapshot of a VM (`snapshot` names it), or lists them;
/// answered with the VM's snapshots afterwards, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotVm {
    pub name: VmName,
    pub action: SnapshotAction,
    #[serde(default)]
    pub snapshot: Option<String>,
}

/// Copies a stopped VM on its host: a new VM `new_name` with a copy of its disks, its vCPUs
/// and memory, a new UUID and MAC address; it stays off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloneVm {
    pub name: VmName,
    pub new_name: VmName,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StopVm {
    pub name: VmName,
    /// Pull the plug at once instead of asking the guest to shut down.
    pub force: bool,
    /// How long the guest gets to shut down before the plug is pulled.
    pub timeout_secs: u32,
    #[serde(default)]
    pub runtime: RuntimeKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeleteVm {
    pub name: VmName,
    #[serde(default)]
    pub runtime: RuntimeKind,
}

/// First step of enrollment: prove the join token, hand over the cluster CA, get a CSR.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollBegin {
    pub token: String,
    #[serde(with = "serde_bytes")]
    pub ca_cert_der: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollBeginReply {
    pub host_id: HostId,
    #[serde(with = "serde_bytes")]
    pub csr_der: Vec<u8>,
}

/// Second step: install the CA-signed certificate; the token is spent on success.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollFinish {
    pub token: String,
    #[serde(with = "serde_bytes")]
    pub cert_der: Vec<u8>,
}

/// First step of a renewal: the agent's CSR for the key it has (its pinned key stays).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenewBegin;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenewBeginReply {
    #[serde(with = "serde_bytes")]
    pub csr_der: Vec<u8>,
}

/// Second step: the agent checks and installs the renewed certificate; new connections get
/// it, the live one goes on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenewFinish {
    #[serde(with = "serde_bytes")]
    pub cert_der: Vec<u8>,
}

/// Which readiness check to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ProbeKind {
    /// The workload runs.
    Running,
    /// qemu-guest-agent answers a ping inside the VM.
    GuestAgent,
    /// A TCP port accepts connections.
    Tcp,
    /// A command exits 0.
    Command,
    /// A check a newer console added.
    #[serde(other)]
    Unknown,
}

/// A readiness check: its kind, and what that kind needs. A struct, not an enum with data,
/// so that a kind a newer console adds reads as `Unknown` here (docs/PROTOCOL.md, rule 5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadinessProbe {
    pub kind: ProbeKind,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub command: Option<String>,
}

/// Is this workload ready for the applications that depend on it?
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckReady {
    pub name: VmName,
    pub probe: ReadinessProbe,
    #[serde(default)]
    pub runtime: RuntimeKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadyReply {
    pub ready: bool,
    /// What the check saw, for the operator when it is not ready.
    pub detail: String,
}

/// To the target of a transfer: accept the source's stream for this ticket (once, until it
/// expires).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepareReceive {
    pub ticket: crate::transfer::TransferTicket,
}

/// To the source of a transfer: stream the VM's disk to the target at `target_address`, going
/// on from what the target already holds. Answered when the target has verified the image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendDisk {
    pub ticket: crate::transfer::TransferTicket,
    /// HOST:PORT of the target agent.
    pub target_address: String,
    /// The most the stream may use, in Mbit/s (what crosses the wire, after compression).
    #[serde(default)]
    pub limit_mbps: Option<u32>,
    /// Compress chunks with zstd where the target can read them and it pays (a chunk that
    /// does not shrink travels as it is).
    #[serde(default)]
    pub compress: bool,
}

/// To an agent, on a stream of its own: keep the console's library image as the template
/// `template`. The agent answers with an [`ImageOffer`]; unless it holds the image already,
/// the console then streams the image's chunks on the same stream as in a disk transfer
/// ([`crate::transfer::TransferFrame`]: `Chunk`s and `Finish` one way, `Resend`, `Ack` and
/// `Finished` the other), from where the offer says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReceiveImage {
    pub template: crate::model::TemplateName,
    pub format: crate::model::ImageFormat,
    /// BLAKE3 of the whole file, in hex: the same bytes under any template name are not sent
    /// again.
    pub blake3: String,
    pub size_bytes: u64,
}

/// To an agent, on a stream of its own: attach to the running VM's serial console. The agent
/// answers one frame, `Result<ConsoleOpened, WireError>`; then the stream carries the
/// console's bytes as they are, what the guest writes one way and what is typed the other,
/// until either end finishes it (the VM stopping ends it from the agent's side).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenConsole {
    pub name: VmName,
}

/// The agent's answer to [`OpenConsole`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleOpened {
    /// The guest's device the console is (`serial0`).
    pub device: String,
}

/// To an agent, on a stream of its own: connect to the running VM's screen. The agent
/// answers one frame, `Result<ScreenOpened, WireError>`; then the stream carries the RFB
/// (VNC) protocol as QEMU speaks it, from its first byte, until either end finishes it.
/// The display listens nowhere: each session is a new connection handed over by libvirt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenScreen {
    pub name: VmName,
}

/// The agent's answer to [`OpenScreen`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScreenOpened {
    /// The display's protocol (`vnc`).
    pub protocol: String,
}

/// The agent's answer to [`ReceiveImage`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageOffer {
    /// The host holds these bytes already; the template is there and nothing is sent.
    pub held: bool,
    /// Where the chunks go on from: the end of what an earlier, cut push left acknowledged.
    pub resume_from: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendReport {
    /// The image's size.
    pub size_bytes: u64,
    /// Allocated bytes in the image: what a transfer from zero sends.
    pub allocated_bytes: u64,
    /// Bytes of chunks sent by this call (a resumed transfer sends less).
    pub sent_bytes: u64,
    /// Where this call went on from.
    pub resumed_from: u64,
    /// Chunks the target asked for again after a hash mismatch.
    pub resent_chunks: u32,
    /// The image digest both ends agreed on, in hex.
    pub digest: String,
    /// Times the link to the target broke and the transfer went on over a new connection
    /// from the last chunk the target acknowledged (the other fields are the last try's).
    #[serde(default)]
    pub reconnects: u32,
    /// Bytes of chunk data that crossed the wire: `sent_bytes` after compression.
    #[serde(default)]
    pub wire_bytes: u64,
}

/// A VM's portable definition (its record, naming disks by file name only), for another agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportVm {
    pub name: VmName,
    /// Name the disk as the raw image its flattened transfer made, not as an overlay.
    #[serde(default)]
    pub flat: bool,
}

/// Defines a VM from another agent's portable definition, over disks that arrived already.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportVm {
    pub record: String,
}

/// The image digest of a VM's disk as it is on this host, in hex (as `SendReport::digest`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HashDisk {
    pub name: VmName,
    /// Hash what the guest sees as one raw image (an overlay flattened onto its template),
    /// not the overlay file.
    #[serde(default)]
    pub flat: bool,
}

/// Removes what a transfer of this VM's disk left here (partial files, or the disk of a VM
/// that was never defined here): a rolled-back migration's target. Refused for a defined VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiscardDisk {
    pub name: VmName,
}

/// To the source of a transfer: stop sending the disk of this ticket now. The `SendDisk`
/// under way answers that it was cancelled; what the target holds stays until discarded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelTransfer {
    pub ticket: String,
}

/// One application inside a VM, as the guest agent is to look at it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestAppProbe {
    pub app: String,
    /// The name its processes have in the guest's `/proc/PID/comm` (at most 15 bytes):
    /// alive while one runs, and the source of its statistics.
    #[serde(default)]
    pub process: Option<String>,
    /// A shell command run in the guest: healthy when it exits 0.
    #[serde(default)]
    pub check: Option<String>,
}

/// How the applications inside a running VM are, through its guest agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestApps {
    pub name: VmName,
    pub apps: Vec<GuestAppProbe>,
}

/// One application inside a VM, as the guest saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestAppReport {
    pub app: String,
    /// Processes named as the probe's `process` (0 when it names none).
    pub processes: u32,
    /// User + system CPU time of those processes, in nanoseconds.
    pub cpu_ns: u64,
    /// Their resident memory, in KiB.
    pub rss_kib: u64,
    /// The check's verdict; `None` without a check.
    pub check_passed: Option<bool>,
    /// What the check printed or why it could not run, for the operator (short).
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestAppsReply {
    /// When the guest was read, in milliseconds since the Unix epoch (the agent's clock).
    pub at_unix_ms: u64,
    /// The VM's vCPUs, to turn CPU time into a share of the VM.
    pub vcpus: u32,
    pub apps: Vec<GuestAppReport>,
}

/// Runs a shell command inside a VM through its guest agent and answers its outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestExec {
    pub name: VmName,
    pub command: String,
    /// How long the command may run; 0 means the agent's default.
    #[serde(default)]
    pub timeout_secs: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestExecReply {
    /// `None` when the command was still running at its timeout (it is left running).
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// What a metric probe reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MetricKind {
    /// The number a shell command prints first.
    Command,
    /// TCP connections established to a local port.
    Tcp,
    /// A kind a newer console added.
    #[serde(other)]
    Unknown,
}

/// A metric probe: its kind and what that kind needs (a struct, like [`ReadinessProbe`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricProbe {
    pub kind: MetricKind,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub command: Option<String>,
}

/// Reads an application metric of a running workload (inside a VM, through its guest agent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadMetric {
    pub name: VmName,
    pub probe: MetricProbe,
    #[serde(default)]
    pub runtime: RuntimeKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricReply {
    pub value: f64,
    /// When it was read, in milliseconds since the Unix epoch (the agent's clock).
    pub at_unix_ms: u64,
}

/// The addresses of the hosts of the agent's site, as the console reaches them (the agent's
/// own among them): traffic to them (and to the networks the agent's own config declares for
/// its site, and to itself) stays in the site; traffic elsewhere leaves it. Each message
/// replaces the one before.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteAddresses {
    /// IPv4 or IPv6 addresses, as text (`10.1.0.12`, `fd00::3`).
    pub addresses: Vec<String>,
}

/// The service networks this host is part of, as the console wants them now. Each message
/// replaces the one before: a network left out is taken down, with everything of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetNetworks {
    pub networks: Vec<crate::network::HostNetwork>,
}

/// Every request, as it travels on a bidirectional stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Request {
    Hello(Hello),
    ListVms(ListVms),
    ListTemplates(ListTemplates),
    CreateVm(CreateVm),
    StartVm(StartVm),
    StopVm(StopVm),
    DeleteVm(DeleteVm),
    EnrollBegin(EnrollBegin),
    EnrollFinish(EnrollFinish),
    RenewBegin(RenewBegin),
    RenewFinish(RenewFinish),
    CheckReady(CheckReady),
    PrepareReceive(PrepareReceive),
    SendDisk(SendDisk),
    ExportVm(ExportVm),
    ImportVm(ImportVm),
    HashDisk(HashDisk),
    DiscardDisk(DiscardDisk),
    CancelTransfer(CancelTransfer),
    GuestApps(GuestApps),
    GuestExec(GuestExec),
    ReadMetric(ReadMetric),
    SiteAddresses(SiteAddresses),
    PowerVm(PowerVm),
    ConfigureVm(ConfigureVm),
    SnapshotVm(SnapshotVm),
    CloneVm(CloneVm),
    ReceiveImage(ReceiveImage),
    OpenConsole(OpenConsole),
    OpenScreen(OpenScreen),
    SetNetworks(SetNetworks),
}

impl Request {
    /// Short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Hello(_) => Hello::KIND,
            Request::ListVms(_) => ListVms::KIND,
            Request::ListTemplates(_) => ListTemplates::KIND,
            Request::CreateVm(_) => CreateVm::KIND,
            Request::StartVm(_) => StartVm::KIND,
            Request::StopVm(_) => StopVm::KIND,
            Request::DeleteVm(_) => DeleteVm::KIND,
            Request::EnrollBegin(_) => EnrollBegin::KIND,
            Request::EnrollFinish(_) => EnrollFinish::KIND,
            Request::RenewBegin(_) => RenewBegin::KIND,
            Request::RenewFinish(_) => RenewFinish::KIND,
            Request::CheckReady(_) => CheckReady::KIND,
            Request::PrepareReceive(_) => PrepareReceive::KIND,
            Request::SendDisk(_) => SendDisk::KIND,
            Request::ExportVm(_) => ExportVm::KIND,
            Request::ImportVm(_) => ImportVm::KIND,
            Request::HashDisk(_) => HashDisk::KIND,
            Request::DiscardDisk(_) => DiscardDisk::KIND,
            Request::CancelTransfer(_) => CancelTransfer::KIND,
            Request::GuestApps(_) => GuestApps::KIND,
            Request::GuestExec(_) => GuestExec::KIND,
            Request::ReadMetric(_) => ReadMetric::KIND,
            Request::SiteAddresses(_) => SiteAddresses::KIND,
            Request::PowerVm(_) => PowerVm::KIND,
            Request::ConfigureVm(_) => ConfigureVm::KIND,
            Request::SnapshotVm(_) => SnapshotVm::KIND,
            Request::CloneVm(_) => CloneVm::KIND,
            Request::ReceiveImage(_) => ReceiveImage::KIND,
            Request::OpenConsole(_) => OpenConsole::KIND,
            Request::OpenScreen(_) => OpenScreen::KIND,
            Request::SetNetworks(_) => SetNetworks::KIND,
        }
    }
}

/// Ties a request type to its response type; the wire carries `Result<Response, WireError>`.
pub trait Rpc: Into<Request> {
    type Response: Serialize + DeserializeOwned + Send + 'static;
    /// The feature the peer must have announced; `None` for what every peer speaks.
    const FEATURE: Option<&'static str>;
    /// Short name for logs and errors, as [`Request::kind`].
    const KIND: &'static str;
}

macro_rules! rpc {
    ($($req:ident => $resp:ty, $feature:expr, $kind:literal;)*) => {
        $(
            impl Rpc for $req {
                type Response = $resp;
                const FEATURE: Option<&'static str> = $feature;
                const KIND: &'static str = $kind;
            }
            impl From<$req> for Request {
                fn from(value: $req) -> Request {
                    Request::$req(value)
                }
            }
        )*
    };
}

rpc! {
    Hello => HelloReply, None, "hello";
    ListVms => Vec<VmStatus>, Some(features::VM_LIFECYCLE), "list-vms";
    ListTemplates => Vec<TemplateInfo>, Some(features::TEMPLATES), "list-templates";
    CreateVm => VmStatus, Some(features::VM_LIFECYCLE), "create-vm";
    StartVm => VmStatus, Some(features::VM_LIFECYCLE), "start-vm";
    StopVm => VmStatus, Some(features::VM_LIFECYCLE), "stop-vm";
    DeleteVm => (), Some(features::VM_LIFECYCLE), "delete-vm";
    EnrollBegin => EnrollBeginReply, None, "enroll-begin";
    EnrollFinish => (), None, "enroll-finish";
    RenewBegin => RenewBeginReply, Some(features::CERT_RENEWAL), "renew-begin";
    RenewFinish => (), Some(features::CERT_RENEWAL), "renew-finish";
    CheckReady => ReadyReply, Some(features::READINESS), "check-ready";
    PrepareReceive => (), Some(features::DISK_TRANSFER), "prepare-receive";
    SendDisk => SendReport, Some(features::DISK_TRANSFER), "send-disk";
    ExportVm => String, Some(features::MIGRATION), "export-vm";
    ImportVm => VmStatus, Some(features::MIGRATION), "import-vm";
    HashDisk => String, Some(features::MIGRATION), "hash-disk";
    DiscardDisk => (), Some(features::MIGRATION), "discard-disk";
    CancelTransfer => (), Some(features::TRANSFER_CANCEL), "cancel-transfer";
    GuestApps => GuestAppsReply, Some(features::GUEST_APPS), "guest-apps";
    GuestExec => GuestExecReply, Some(features::GUEST_APPS), "guest-exec";
    ReadMetric => MetricReply, Some(features::APP_METRIC), "read-metric";
    SiteAddresses => (), Some(features::SITE_TRAFFIC), "site-addresses";
    PowerVm => VmStatus, Some(features::VM_POWER), "power-vm";
    ConfigureVm => VmConfigured, Some(features::VM_CONFIGURE), "configure-vm";
    SnapshotVm => Vec<SnapshotInfo>, Some(features::VM_SNAPSHOTS), "snapshot-vm";
    CloneVm => VmStatus, Some(features::VM_CLONE), "clone-vm";
    ReceiveImage => ImageOffer, Some(features::IMAGES), "receive-image";
    OpenConsole => ConsoleOpened, Some(features::SERIAL_CONSOLE), "open-console";
    OpenScreen => ScreenOpened, Some(features::SCREEN), "open-screen";
    SetNetworks => (), Some(features::SERVICE_NETWORKS), "set-networks";
}

/// What an agent pushes on its event stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AgentEvent {
    HostStatus(HostStatus),
    VmChanged(VmStatus),
    VmRemoved {
        name: VmName,
    },
    /// Boxed: it is by far the largest event (same bytes on the wire).
    Inventory(Box<HostInventory>),
    /// The whole VM list, replacing what the console holds (sent when events were dropped).
    VmList(Vec<VmStatus>),
    /// How far a disk this agent sends has got: at its start, at least twice a second, and at
    /// its end. A console that does not know it skips it.
    TransferProgress {
        ticket: String,
        bytes_done: u64,
        bytes_total: u64,
    },
    /// Readings taken once a second since the last batch, oldest first (feature
    /// [`features::SAMPLES`], announced by both ends).
    Samples(Vec<Sample>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Decoded, decode_message, decode_payload, encode_payload};
    use crate::model::{
        NetworkInterface, Prices, RuntimeInfo, RuntimeKind, Site, TemplateName, VmState,
    };

    /// The bytes of `value` are `hex_bytes`, and those bytes decode to `value`.
    fn golden<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
        value: &T,
        hex_bytes: &str,
    ) {
        let bytes = encode_payload(value).unwrap();
        assert_eq!(
            hex::encode(&bytes),
            hex_bytes,
            "encoding of {value:?} changed"
        );
        let decoded: T = decode_payload(&hex::decode(hex_bytes).unwrap()).unwrap();
        assert_eq!(&decoded, value);
    }

    fn ticket() -> crate::transfer::TransferTicket {
        crate::transfer::TransferTicket {
            id: "ab".into(),
            vm: name(),
            source: HostId::new("a").unwrap(),
            target: HostId::new("b").unwrap(),
            expires_unix_secs: 9,
            overlay_on: Some(crate::model::TemplateDisk {
                template: TemplateName::new("base").unwrap(),
                blake3: "cd".into(),
                allocated_bytes: 5,
            }),
        }
    }

    fn vm() -> VmStatus {
        VmStatus {
            uuid: "u".into(),
            name: VmName::new("a").unwrap(),
            state: VmState::Shutoff,
            vcpus: 1,
            memory_mib: 128,
            template: Some(TemplateName::new("tiny").unwrap()),
            disk_bytes: 0,
            runtime: RuntimeKind::Libvirt,
            overlay_on: None,
            disks: None,
            nics: None,
            autostart: None,
            next_start: None,
            addresses: None,
            snapshots: None,
            installer: None,
            screen: false,
        }
    }

    fn status() -> HostStatus {
        HostStatus {
            cpu_load_percent: 0.5,
            memory_used_mib: 1,
            memory_total_mib: 2,
            storage_free_mib: 3,
            vms_running: 4,
            uptime_secs: 5,
        }
    }

    fn inventory() -> HostInventory {
        HostInventory {
            host_id: HostId::new("h").unwrap(),
            hostname: "n".into(),
            cpus: 2,
            cpu_model: "m".into(),
            memory_mib: 1024,
            storage_total_mib: 10,
            storage_free_mib: 5,
            network: vec![NetworkInterface {
                name: "e".into(),
                mac: "0".into(),
                speed_mbps: Some(1000),
            }],
            runtimes: vec![RuntimeInfo {
                kind: RuntimeKind::Libvirt,
                driver: "Test".into(),
                version: "1".into(),
                limits: None,
                users: None,
            }],
            site: Site::default(),
            prices: Prices::default(),
            security_level: 1,
            agent_version: "0.1.0".into(),
            sizes_from: crate::model::SizesFrom::TestDriver,
            interpreters: vec![crate::model::InterpreterInfo {
                name: "python3".into(),
                version: "3.11.2".into(),
            }],
            template_disks: vec![crate::model::TemplateDisk {
                template: TemplateName::new("base").unwrap(),
                blake3: "cd".into(),
                allocated_bytes: 5,
            }],
        }
    }

    fn name() -> VmName {
        VmName::new("a").unwrap()
    }

    #[test]
    fn golden_requests() {
        let all: Vec<(Request, &str)> = vec![
            (
                Request::Hello(Hello {
                    console_name: "c".into(),
                    features: vec!["f".into()],
                }),
                "81a548656c6c6f82ac636f6e736f6c655f6e616d65a163a8666561747572657391a166",
            ),
            (Request::ListVms(ListVms), "81a74c697374566d7390"),
            (
                Request::ListTemplates(ListTemplates),
                "81ad4c69737454656d706c6174657390",
            ),
            (
                Request::CreateVm(CreateVm {
                    spec: VmSpec {
                        name: name(),
                        template: TemplateName::new("tiny").unwrap(),
                        vcpus: Some(2),
                        memory_mib: None,
                    },
                    start: true,
                    runtime: RuntimeKind::Process,
                    image_disk: None,
                    cloud_init: None,
                    network: None,
                }),
                concat!(
                    "81a8437265617465566d83a47370656384a46e616d65a161a874656d706c617465a474696e79a576",
                    "6370757302aa6d656d6f72795f6d6962c0a57374617274c3a772756e74696d65a770726f63657373",
                ),
            ),
            (
                Request::StartVm(StartVm {
                    name: name(),
                    runtime: RuntimeKind::Libvirt,
                    user_data: None,
                }),
                "81a75374617274566d82a46e616d65a161a772756e74696d65a76c696276697274",
            ),
            (
                Request::StartVm(StartVm {
                    name: name(),
                    runtime: RuntimeKind::Libvirt,
                    user_data: Some("#!/bin/sh\n".into()),
                }),
                concat!(
                    "81a75374617274566d83a46e616d65a161a772756e74696d65a76c696276697274a9757365725f",
                    "64617461aa23212f62696e2f73680a",
                ),
            ),
            (
                Request::PowerVm(PowerVm {
                    name: name(),
                    action: PowerAction::Pause,
                    runtime: RuntimeKind::Libvirt,
                }),
                concat!(
                    "81a7506f776572566d83a46e616d65a161a6616374696f6ea570617573",
                    "65a772756e74696d65a76c696276697274",
                ),
            ),
            (
                Request::ConfigureVm(ConfigureVm {
                    name: name(),
                    vcpus: None,
                    memory_mib: Some(512),
                    autostart: Some(true),
                    eject_cdrom: false,
                }),
                "81ab436f6e666967757265566d84a46e616d65a161a57663707573c0aa6d656d6f72795f6d6962cd0200a96175746f7374617274c3",
            ),
            (
                Request::SnapshotVm(SnapshotVm {
                    name: name(),
                    action: SnapshotAction::Revert,
                    snapshot: Some("s".into()),
                }),
                "81aa536e617073686f74566d83a46e616d65a161a6616374696f6ea6726576657274a8736e617073686f74a173",
            ),
            (
                Request::CloneVm(CloneVm {
                    name: name(),
                    new_name: VmName::new("b").unwrap(),
                }),
                "81a7436c6f6e65566d82a46e616d65a161a86e65775f6e616d65a162",
            ),
            (
                Request::StopVm(StopVm {
                    name: name(),
                    force: false,
                    timeout_secs: 300,
                    runtime: RuntimeKind::Libvirt,
                }),
                concat!(
                    "81a653746f70566d84a46e616d65a161a5666f726365c2ac74696d656f75745f73656373cd012ca7",
                    "72756e74696d65a76c696276697274",
                ),
            ),
            (
                Request::DeleteVm(DeleteVm {
                    name: name(),
                    runtime: RuntimeKind::Libvirt,
                }),
                "81a844656c657465566d82a46e616d65a161a772756e74696d65a76c696276697274",
            ),
            (
                Request::EnrollBegin(EnrollBegin {
                    token: "t".into(),
                    ca_cert_der: vec![1],
                }),
                "81ab456e726f6c6c426567696e82a5746f6b656ea174ab63615f636572745f646572c40101",
            ),
            (
                Request::CheckReady(CheckReady {
                    name: name(),
                    probe: ReadinessProbe {
                        kind: ProbeKind::Tcp,
                        port: Some(80),
                        command: None,
                    },
                    runtime: RuntimeKind::Process,
                }),
                concat!(
                    "81aa436865636b526561647983a46e616d65a161a570726f626583a46b696e64a3746370a4706f72",
                    "7450a7636f6d6d616e64c0a772756e74696d65a770726f63657373",
                ),
            ),
            (
                Request::RenewBegin(RenewBegin),
                "81aa52656e6577426567696e90",
            ),
            (
                Request::RenewFinish(RenewFinish { cert_der: vec![3] }),
                "81ab52656e657746696e69736881a8636572745f646572c40103",
            ),
            (
                Request::EnrollFinish(EnrollFinish {
                    token: "t".into(),
                    cert_der: vec![1, 2],
                }),
                "81ac456e726f6c6c46696e69736882a5746f6b656ea174a8636572745f646572c4020102",
            ),
            (
                Request::PrepareReceive(PrepareReceive { ticket: ticket() }),
                concat!(
                    "81ae507265706172655265636569766581a67469636b657486a26964a26162a2766da161a6736f75",
                    "726365a161a6746172676574a162b1657870697265735f756e69785f7365637309aa6f7665726c61",
                    "795f6f6e83a874656d706c617465a462617365a6626c616b6533a26364af616c6c6f63617465645f",
                    "627974657305",
                ),
            ),
            (
                Request::ExportVm(ExportVm {
                    name: name(),
                    flat: true,
                }),
                "81a84578706f7274566d82a46e616d65a161a4666c6174c3",
            ),
            (
                Request::ImportVm(ImportVm { record: "r".into() }),
                "81a8496d706f7274566d81a67265636f7264a172",
            ),
            (
                Request::HashDisk(HashDisk {
                    name: name(),
                    flat: true,
                }),
                "81a8486173684469736b82a46e616d65a161a4666c6174c3",
            ),
            (
                Request::DiscardDisk(DiscardDisk { name: name() }),
                "81ab446973636172644469736b81a46e616d65a161",
            ),
            (
                Request::CancelTransfer(CancelTransfer {
                    ticket: "ab".into(),
                }),
                "81ae43616e63656c5472616e7366657281a67469636b6574a26162",
            ),
            (
                Request::GuestApps(GuestApps {
                    name: name(),
                    apps: vec![GuestAppProbe {
                        app: "w".into(),
                        process: Some("p".into()),
                        check: Some("c".into()),
                    }],
                }),
                concat!(
                    "81a947756573744170707382a46e616d65a161a4617070739183a3617070a177a770726f63657373",
                    "a170a5636865636ba163",
                ),
            ),
            (
                Request::GuestExec(GuestExec {
                    name: name(),
                    command: "c".into(),
                    timeout_secs: 5,
                }),
                concat!(
                    "81a947756573744578656383a46e616d65a161a7636f6d6d616e64a163ac74696d656f75745f7365",
                    "637305",
                ),
            ),
            (
                Request::ReadMetric(ReadMetric {
                    name: name(),
                    probe: MetricProbe {
                        kind: MetricKind::Tcp,
                        port: Some(80),
                        command: None,
                    },
                    runtime: RuntimeKind::Process,
                }),
                concat!(
                    "81aa526561644d657472696383a46e616d65a161a570726f626583a46b696e64a3746370a4706f72",
                    "7450a7636f6d6d616e64c0a772756e74696d65a770726f63657373",
                ),
            ),
            (
                Request::SiteAddresses(SiteAddresses {
                    addresses: vec!["10.1.0.12".into(), "fd00::3".into()],
                }),
                concat!(
                    "81ad5369746541646472657373657381a961646472657373657392a931302e312e302e3132a76664",
                    "30303a3a33",
                ),
            ),
            (
                Request::SendDisk(SendDisk {
                    ticket: ticket(),
                    target_address: "h:1".into(),
                    limit_mbps: Some(100),
                    compress: true,
                }),
                concat!(
                    "81a853656e644469736b84a67469636b657486a26964a26162a2766da161a6736f75726365a161a6",
                    "746172676574a162b1657870697265735f756e69785f7365637309aa6f7665726c61795f6f6e83a8",
                    "74656d706c617465a462617365a6626c616b6533a26364af616c6c6f63617465645f627974657305",
                    "ae7461726765745f61646472657373a3683a31aa6c696d69745f6d62707364a8636f6d7072657373",
                    "c3",
                ),
            ),
            (
                Request::CreateVm(CreateVm {
                    spec: VmSpec {
                        name: name(),
                        template: TemplateName::new("os").unwrap(),
                        vcpus: None,
                        memory_mib: None,
                    },
                    start: false,
                    runtime: RuntimeKind::Libvirt,
                    image_disk: Some(crate::model::ImageDisk {
                        disk_gib: Some(8),
                        firmware: crate::model::Firmware::Uefi,
                    }),
                    cloud_init: Some(crate::cloud_init::CloudInitData {
                        hostname: "a".into(),
                        user_data: "#!".into(),
                        network_config: None,
                    }),
                    network: None,
                }),
                concat!(
                    "81a8437265617465566d85a47370656384a46e616d65a161a874656d706c617465a26f73a5766370",
                    "7573c0aa6d656d6f72795f6d6962c0a57374617274c2a772756e74696d65a76c696276697274aa69",
                    "6d6167655f6469736b82a86469736b5f67696208a86669726d77617265a475656669aa636c6f7564",
                    "5f696e697483a8686f73746e616d65a161a9757365725f64617461a22321ae6e6574776f726b5f63",
                    "6f6e666967c0",
                ),
            ),
            (
                Request::CreateVm(CreateVm {
                    spec: VmSpec {
                        name: name(),
                        template: TemplateName::new("tiny").unwrap(),
                        vcpus: None,
                        memory_mib: None,
                    },
                    start: false,
                    runtime: RuntimeKind::Process,
                    image_disk: None,
                    cloud_init: None,
                    network: Some(crate::network::InstanceNic {
                        network: crate::model::NetworkName::new("shop").unwrap(),
                        vni: 4096,
                        address: "10.200.0.2".parse().unwrap(),
                        prefix_len: 24,
                        mac: "02:d5:0a:c8:00:02".into(),
                        gateway: "10.200.0.1".parse().unwrap(),
                        mtu: 1450,
                        search: vec!["shop.dunes".into()],
                    }),
                }),
                concat!(
                    "81a8437265617465566d84a47370656384a46e616d65a161a874656d706c617465a474696e79a576",
                    "63707573c0aa6d656d6f72795f6d6962c0a57374617274c2a772756e74696d65a770726f63657373",
                    "a76e6574776f726b88a76e6574776f726ba473686f70a3766e69cd1000a761646472657373940acc",
                    "c80002aa7072656669785f6c656e18a36d6163b130323a64353a30613a63383a30303a3032a76761",
                    "7465776179940accc80001a36d7475cd05aaa673656172636891aa73686f702e64756e6573",
                ),
            ),
            (
                Request::SetNetworks(SetNetworks {
                    networks: vec![crate::network::HostNetwork {
                        name: crate::model::NetworkName::new("shop").unwrap(),
                        vni: 4096,
                        subnet: "10.200.0.0/24".parse().unwrap(),
                        mtu: 1450,
                        host_address: "10.200.0.254".parse().unwrap(),
                        peers: vec!["192.0.2.2".parse().unwrap()],
                        members: vec![crate::network::NetworkMember {
                            address: "10.200.0.2".parse().unwrap(),
                            mac: "02:d5:0a:c8:00:02".into(),
                            peer: None,
                        }],
                        names: vec![crate::network::DnsEntry {
                            name: "db.shop.dunes".into(),
                            addresses: vec!["10.200.0.2".parse().unwrap()],
                        }],
                        reach: Vec::new(),
                        published: vec![crate::network::PublishedPort {
                            host_port: 8080,
                            backends: vec!["10.200.0.2:80".parse().unwrap()],
                        }],
                    }],
                }),
                concat!(
                    "81ab5365744e6574776f726b7381a86e6574776f726b73918aa46e616d65a473686f70a3766e69cd",
                    "1000a67375626e6574950accc8000018a36d7475cd05aaac686f73745f61646472657373940accc8",
                    "00ccfea570656572739181a2563494ccc0000202a76d656d626572739183a761646472657373940a",
                    "ccc80002a36d6163b130323a64353a30613a63383a30303a3032a470656572c0a56e616d65739182",
                    "a46e616d65ad64622e73686f702e64756e6573a961646472657373657391940accc80002a5726561",
                    "636890a97075626c69736865649182a9686f73745f706f7274cd1f90a86261636b656e6473919294",
                    "0accc8000250",
                ),
            ),
            (
                Request::OpenConsole(OpenConsole { name: name() }),
                "81ab4f70656e436f6e736f6c6581a46e616d65a161",
            ),
            (
                Request::OpenScreen(OpenScreen { name: name() }),
                "81aa4f70656e53637265656e81a46e616d65a161",
            ),
            (
                Request::ReceiveImage(ReceiveImage {
                    template: TemplateName::new("os").unwrap(),
                    format: crate::model::ImageFormat::Qcow2,
                    blake3: "ab".into(),
                    size_bytes: 512,
                }),
                concat!(
                    "81ac52656365697665496d61676584a874656d706c617465a26f73a6666f726d6174a571636f",
                    "7732a6626c616b6533a26162aa73697a655f6279746573cd0200",
                ),
            ),
        ];
        // Every variant is pinned.
        let kinds: std::collections::BTreeSet<&str> = all.iter().map(|(r, _)| r.kind()).collect();
        assert_eq!(kinds.len(), crate::codec::enum_variants::<Request>().len());
        for (request, hex_bytes) in &all {
            golden(request, hex_bytes);
        }
    }

    #[test]
    fn golden_responses() {
        golden::<Result<ConsoleOpened, WireError>>(
            &Ok(ConsoleOpened {
                device: "serial0".into(),
            }),
            "81a24f6b81a6646576696365a773657269616c30",
        );
        golden::<Result<ScreenOpened, WireError>>(
            &Ok(ScreenOpened {
                protocol: "vnc".into(),
            }),
            "81a24f6b81a870726f746f636f6ca3766e63",
        );
        golden::<Result<ImageOffer, WireError>>(
            &Ok(ImageOffer {
                held: false,
                resume_from: 1 << 20,
            }),
            "81a24f6b82a468656c64c2ab726573756d655f66726f6dce00100000",
        );
        golden::<Result<HelloReply, WireError>>(
            &Ok(HelloReply {
                inventory: inventory(),
                status: status(),
                vms: vec![vm()],
                features: vec!["f".into()],
            }),
            concat!(
                "81a24f6b84a9696e76656e746f7279de0010a7686f73745f6964a168a8686f73746e616d65a16ea4",
                "6370757302a96370755f6d6f64656ca16daa6d656d6f72795f6d6962cd0400b173746f726167655f",
                "746f74616c5f6d69620ab073746f726167655f667265655f6d696205a76e6574776f726b9183a46e",
                "616d65a165a36d6163a130aa73706565645f6d627073cd03e8a872756e74696d65739183a46b696e",
                "64a76c696276697274a6647269766572a454657374a776657273696f6ea131a47369746585a46e61",
                "6d65a764656661756c74a672656d6f7465c2b36c696e6b5f62616e6477696474685f6d627073cd03",
                "e8af6c696e6b5f6c6174656e63795f6d7301b37472616e736665725f6c696d69745f6d627073c0a6",
                "70726963657384b37065725f67625f6d6f6e74685f73746f726564cb0000000000000000b2706572",
                "5f67625f7472616e73666572726564cb0000000000000000ac7065725f6370755f686f7572cb0000",
                "000000000000b27065725f67625f6d656d6f72795f686f7572cb0000000000000000ae7365637572",
                "6974795f6c6576656c01ad6167656e745f76657273696f6ea5302e312e30aa73697a65735f66726f",
                "6dab746573742d647269766572ac696e746572707265746572739182a46e616d65a7707974686f6e",
                "33a776657273696f6ea6332e31312e32ae74656d706c6174655f6469736b739183a874656d706c61",
                "7465a462617365a6626c616b6533a26364af616c6c6f63617465645f627974657305a67374617475",
                "7386b06370755f6c6f61645f70657263656e74ca3f000000af6d656d6f72795f757365645f6d6962",
                "01b06d656d6f72795f746f74616c5f6d696202b073746f726167655f667265655f6d696203ab766d",
                "735f72756e6e696e6704ab757074696d655f7365637305a3766d739189a475756964a175a46e616d",
                "65a161a57374617465a7736875746f6666a5766370757301aa6d656d6f72795f6d6962cc80a87465",
                "6d706c617465a474696e79aa6469736b5f627974657300a772756e74696d65a76c696276697274aa",
                "6f7665726c61795f6f6ec0a8666561747572657391a166",
            ),
        );
        golden::<Result<Vec<VmStatus>, WireError>>(
            &Ok(vec![vm()]),
            concat!(
                "81a24f6b9189a475756964a175a46e616d65a161a57374617465a7736875746f6666a57663707573",
                "01aa6d656d6f72795f6d6962cc80a874656d706c617465a474696e79aa6469736b5f627974657300",
                "a772756e74696d65a76c696276697274aa6f7665726c61795f6f6ec0",
            ),
        );
        golden::<Result<Vec<TemplateInfo>, WireError>>(
            &Ok(vec![TemplateInfo {
                name: TemplateName::new("tiny").unwrap(),
                description: "d".into(),
                default_vcpus: 1,
                default_memory_mib: 64,
                disk_mib: 8,
            }]),
            concat!(
                "81a24f6b9185a46e616d65a474696e79ab6465736372697074696f6ea164ad64656661756c745f76",
                "6370757301b264656661756c745f6d656d6f72795f6d696240a86469736b5f6d696208",
            ),
        );
        golden::<Result<VmStatus, WireError>>(
            &Ok(vm()),
            concat!(
                "81a24f6b89a475756964a175a46e616d65a161a57374617465a7736875746f6666a5766370757301",
                "aa6d656d6f72795f6d6962cc80a874656d706c617465a474696e79aa6469736b5f627974657300a7",
                "72756e74696d65a76c696276697274aa6f7665726c61795f6f6ec0",
            ),
        );
        golden::<Result<(), WireError>>(&Ok(()), "81a24f6bc0");
        golden::<Result<SendReport, WireError>>(
            &Ok(SendReport {
                size_bytes: 1,
                allocated_bytes: 2,
                sent_bytes: 3,
                resumed_from: 4,
                resent_chunks: 5,
                digest: "d".into(),
                reconnects: 6,
                wire_bytes: 7,
            }),
            concat!(
                "81a24f6b88aa73697a655f627974657301af616c6c6f63617465645f627974657302aa73656e745f",
                "627974657303ac726573756d65645f66726f6d04ad726573656e745f6368756e6b7305a664696765",
                "7374a164aa7265636f6e6e6563747306aa776972655f627974657307",
            ),
        );
        golden::<Result<EnrollBeginReply, WireError>>(
            &Ok(EnrollBeginReply {
                host_id: HostId::new("h").unwrap(),
                csr_der: vec![1],
            }),
            "81a24f6b82a7686f73745f6964a168a76373725f646572c40101",
        );
        golden::<Result<ReadyReply, WireError>>(
            &Ok(ReadyReply {
                ready: false,
                detail: "d".into(),
            }),
            "81a24f6b82a57265616479c2a664657461696ca164",
        );
        golden::<Result<RenewBeginReply, WireError>>(
            &Ok(RenewBeginReply { csr_der: vec![4] }),
            "81a24f6b81a76373725f646572c40104",
        );
        golden::<Result<GuestAppsReply, WireError>>(
            &Ok(GuestAppsReply {
                at_unix_ms: 1,
                vcpus: 2,
                apps: vec![GuestAppReport {
                    app: "w".into(),
                    processes: 1,
                    cpu_ns: 3,
                    rss_kib: 4,
                    check_passed: Some(true),
                    detail: "d".into(),
                }],
            }),
            concat!(
                "81a24f6b83aa61745f756e69785f6d7301a5766370757302a4617070739186a3617070a177a97072",
                "6f63657373657301a66370755f6e7303a77273735f6b696204ac636865636b5f706173736564c3a6",
                "64657461696ca164",
            ),
        );
        golden::<Result<MetricReply, WireError>>(
            &Ok(MetricReply {
                value: 1.5,
                at_unix_ms: 2,
            }),
            "81a24f6b82a576616c7565cb3ff8000000000000aa61745f756e69785f6d7302",
        );
        golden::<Result<GuestExecReply, WireError>>(
            &Ok(GuestExecReply {
                exit_code: Some(1),
                stdout: "o".into(),
                stderr: "e".into(),
            }),
            "81a24f6b83a9657869745f636f646501a67374646f7574a16fa6737464657272a165",
        );
        golden::<Result<(), WireError>>(
            &Err(WireError::new(ErrorCode::NotFound, "x")),
            "81a345727282a4636f6465a84e6f74466f756e64a76d657373616765a178",
        );
    }

    #[test]
    fn golden_events() {
        let all: Vec<(AgentEvent, &str)> = vec![
            (
                AgentEvent::HostStatus(status()),
                concat!(
                    "81aa486f737453746174757386b06370755f6c6f61645f70657263656e74ca3f000000af6d656d6f",
                    "72795f757365645f6d696201b06d656d6f72795f746f74616c5f6d696202b073746f726167655f66",
                    "7265655f6d696203ab766d735f72756e6e696e6704ab757074696d655f7365637305",
                ),
            ),
            (
                AgentEvent::VmChanged(vm()),
                concat!(
                    "81a9566d4368616e67656489a475756964a175a46e616d65a161a57374617465a7736875746f6666",
                    "a5766370757301aa6d656d6f72795f6d6962cc80a874656d706c617465a474696e79aa6469736b5f",
                    "627974657300a772756e74696d65a76c696276697274aa6f7665726c61795f6f6ec0",
                ),
            ),
            (
                AgentEvent::VmRemoved { name: name() },
                "81a9566d52656d6f76656481a46e616d65a161",
            ),
            (
                AgentEvent::Inventory(Box::new(inventory())),
                concat!(
                    "81a9496e76656e746f7279de0010a7686f73745f6964a168a8686f73746e616d65a16ea463707573",
                    "02a96370755f6d6f64656ca16daa6d656d6f72795f6d6962cd0400b173746f726167655f746f7461",
                    "6c5f6d69620ab073746f726167655f667265655f6d696205a76e6574776f726b9183a46e616d65a1",
                    "65a36d6163a130aa73706565645f6d627073cd03e8a872756e74696d65739183a46b696e64a76c69",
                    "6276697274a6647269766572a454657374a776657273696f6ea131a47369746585a46e616d65a764",
                    "656661756c74a672656d6f7465c2b36c696e6b5f62616e6477696474685f6d627073cd03e8af6c69",
                    "6e6b5f6c6174656e63795f6d7301b37472616e736665725f6c696d69745f6d627073c0a670726963",
                    "657384b37065725f67625f6d6f6e74685f73746f726564cb0000000000000000b27065725f67625f",
                    "7472616e73666572726564cb0000000000000000ac7065725f6370755f686f7572cb000000000000",
                    "0000b27065725f67625f6d656d6f72795f686f7572cb0000000000000000ae73656375726974795f",
                    "6c6576656c01ad6167656e745f76657273696f6ea5302e312e30aa73697a65735f66726f6dab7465",
                    "73742d647269766572ac696e746572707265746572739182a46e616d65a7707974686f6e33a77665",
                    "7273696f6ea6332e31312e32ae74656d706c6174655f6469736b739183a874656d706c617465a462",
                    "617365a6626c616b6533a26364af616c6c6f63617465645f627974657305",
                ),
            ),
            (
                AgentEvent::TransferProgress {
                    ticket: "t".into(),
                    bytes_done: 1,
                    bytes_total: 2,
                },
                "81b05472616e7366657250726f677265737383a67469636b6574a174aa62797465735f646f6e6501ab62797465735f746f74616c02",
            ),
            (
                AgentEvent::Samples(vec![crate::model::Sample {
                    at_unix_ms: 1,
                    host: crate::model::Counters {
                        cpu_ns: 2,
                        cpus: 1,
                        memory_used_mib: 3,
                        memory_total_mib: 4,
                        disk_read_bytes: 5,
                        disk_write_bytes: 6,
                        net_rx_bytes: 7,
                        net_tx_bytes: 8,
                        net_tx_out_of_site_bytes: None,
                    },
                    workloads: vec![crate::model::WorkloadSample {
                        name: name(),
                        counters: crate::model::Counters {
                            net_tx_out_of_site_bytes: Some(9),
                            ..Default::default()
                        },
                    }],
                }]),
                concat!(
                    "81a753616d706c65739183aa61745f756e69785f6d7301a4686f737488a66370755f6e7302a46370",
                    "757301af6d656d6f72795f757365645f6d696203b06d656d6f72795f746f74616c5f6d696204af64",
                    "69736b5f726561645f627974657305b06469736b5f77726974655f627974657306ac6e65745f7278",
                    "5f627974657307ac6e65745f74785f627974657308a9776f726b6c6f6164739182a46e616d65a161",
                    "a8636f756e7465727389a66370755f6e7300a46370757300af6d656d6f72795f757365645f6d6962",
                    "00b06d656d6f72795f746f74616c5f6d696200af6469736b5f726561645f627974657300b0646973",
                    "6b5f77726974655f627974657300ac6e65745f72785f627974657300ac6e65745f74785f62797465",
                    "7300b86e65745f74785f6f75745f6f665f736974655f627974657309",
                ),
            ),
            (
                AgentEvent::VmList(vec![vm()]),
                concat!(
                    "81a6566d4c6973749189a475756964a175a46e616d65a161a57374617465a7736875746f6666a576",
                    "6370757301aa6d656d6f72795f6d6962cc80a874656d706c617465a474696e79aa6469736b5f6279",
                    "74657300a772756e74696d65a76c696276697274aa6f7665726c61795f6f6ec0",
                ),
            ),
        ];
        assert_eq!(all.len(), crate::codec::enum_variants::<AgentEvent>().len());
        for (event, hex_bytes) in &all {
            golden(event, hex_bytes);
        }
    }

    /// Bytes a newer peer might send, written out by hand: today's code must read them.
    #[test]
    fn future_messages_decode() {
        use rmp::encode::{write_map_len, write_str, write_uint};
        // A VmRemoved event with a field appended: {"VmRemoved": {"name": "a", "reason": "moved"}}.
        let mut extra = Vec::new();
        write_map_len(&mut extra, 1).unwrap();
        write_str(&mut extra, "VmRemoved").unwrap();
        write_map_len(&mut extra, 2).unwrap();
        write_str(&mut extra, "name").unwrap();
        write_str(&mut extra, "a").unwrap();
        write_str(&mut extra, "reason").unwrap();
        write_str(&mut extra, "moved").unwrap();
        assert_eq!(
            decode_message::<AgentEvent>(&extra).unwrap(),
            Decoded::Known(AgentEvent::VmRemoved { name: name() })
        );

        // An event kind added later: skipped, not an error.
        let mut unknown = Vec::new();
        write_map_len(&mut unknown, 1).unwrap();
        write_str(&mut unknown, "AppChanged").unwrap();
        write_map_len(&mut unknown, 1).unwrap();
        write_str(&mut unknown, "instances").unwrap();
        write_uint(&mut unknown, 3).unwrap();
        assert_eq!(
            decode_message::<AgentEvent>(&unknown).unwrap(),
            Decoded::Unknown("AppChanged".into())
        );

        // A request kind added later: known as unknown, so the agent can answer it.
        let mut request = Vec::new();
        write_map_len(&mut request, 1).unwrap();
        write_str(&mut request, "MigrateVm").unwrap();
        write_map_len(&mut request, 0).unwrap();
        assert_eq!(
            decode_message::<Request>(&request).unwrap(),
            Decoded::Unknown("MigrateVm".into())
        );

        // A VM state and an error code added later read as Unknown.
        let mut changed = encode_payload(&AgentEvent::VmChanged(vm())).unwrap();
        let at = changed
            .windows(7)
            .position(|w| w == b"shutoff")
            .expect("state is encoded by name");
        changed[at..at + 7].copy_from_slice(b"zzzzzzz");
        match decode_message::<AgentEvent>(&changed).unwrap() {
            Decoded::Known(AgentEvent::VmChanged(v)) => assert_eq!(v.state, VmState::Unknown),
            other => panic!("{other:?}"),
        }
        let mut err = Vec::new();
        write_map_len(&mut err, 1).unwrap();
        write_str(&mut err, "Err").unwrap();
        write_map_len(&mut err, 2).unwrap();
        write_str(&mut err, "code").unwrap();
        write_str(&mut err, "Throttled").unwrap();
        write_str(&mut err, "message").unwrap();
        write_str(&mut err, "slow down").unwrap();
        let decoded: Result<(), WireError> = decode_payload(&err).unwrap();
        assert_eq!(decoded.unwrap_err().code, ErrorCode::Unknown);
    }

    /// An older peer's messages, without the fields added since, still decode.
    #[test]
    fn past_messages_decode() {
        // A CreateVm from before runtimes were named: a libvirt VM.
        let before_runtimes = hex::decode(concat!(
            "81a8437265617465566d82a47370656384a46e616d65a161a874656d706c617465a474696e79a576",
            "6370757302aa6d656d6f72795f6d6962c0a57374617274c3",
        ))
        .unwrap();
        match decode_payload::<Request>(&before_runtimes).unwrap() {
            Request::CreateVm(c) => assert_eq!(c.runtime, RuntimeKind::Libvirt),
            other => panic!("{other:?}"),
        }
        // An Inventory event from before `sizes_from`: the machine's sizes.
        let before_sizes_from = hex::decode(concat!(
            "81a9496e76656e746f72798da7686f73745f6964a168a8686f73746e616d65a16ea46370757302a9",
            "6370755f6d6f64656ca16daa6d656d6f72795f6d6962cd0400b173746f726167655f746f74616c5f",
            "6d69620ab073746f726167655f667265655f6d696205a76e6574776f726b9183a46e616d65a165a3",
            "6d6163a130aa73706565645f6d627073cd03e8a872756e74696d65739183a46b696e64a76c696276",
            "697274a6647269766572a454657374a776657273696f6ea131a47369746584a46e616d65a7646566",
            "61756c74a672656d6f7465c2b36c696e6b5f62616e6477696474685f6d627073cd03e8af6c696e6b",
            "5f6c6174656e63795f6d7301a670726963657383b37065725f67625f6d6f6e74685f73746f726564",
            "cb0000000000000000b27065725f67625f7472616e73666572726564cb0000000000000000ac7065",
            "725f6370755f686f7572cb0000000000000000ae73656375726974795f6c6576656c01ad6167656e",
            "745f76657273696f6ea5302e312e30",
        ))
        .unwrap();
        match decode_payload::<AgentEvent>(&before_sizes_from).unwrap() {
            AgentEvent::Inventory(inv) => {
                assert_eq!(inv.sizes_from, crate::model::SizesFrom::Machine);
                assert_eq!(inv.agent_version, "0.1.0");
            }
            other => panic!("{other:?}"),
        }
        use rmp::encode::{write_map_len, write_str};
        // A hello from a console before features: {"Hello": {"console_name": "c"}}.
        let mut hello = Vec::new();
        write_map_len(&mut hello, 1).unwrap();
        write_str(&mut hello, "Hello").unwrap();
        write_map_len(&mut hello, 1).unwrap();
        write_str(&mut hello, "console_name").unwrap();
        write_str(&mut hello, "c").unwrap();
        assert_eq!(
            decode_payload::<Request>(&hello).unwrap(),
            Request::Hello(Hello {
                console_name: "c".into(),
                features: Vec::new(),
            })
        );
    }
}
