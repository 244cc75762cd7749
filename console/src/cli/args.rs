//! The command line's arguments, as clap reads them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "dunes-console",
    version,
    about = "Dunes console: manage the VMs of many hosts from one window (or headless)"
)]
pub struct Cli {
    /// Where the console keeps its CA, store and control socket [default: $XDG_DATA_HOME/dunes-console; with --demo a fresh temporary dir, printed at start, to pass to ctl]
    #[arg(long, value_name = "DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Run the engine without a window, until interrupted.
    #[arg(long)]
    pub headless: bool,
    /// Start three local demo agents on libvirt's test driver and enroll them.
    #[arg(long)]
    pub demo: bool,
    /// Days the certificates of hosts and of this console last. Each is renewed at two thirds
    /// of its life: a host's over its live connection, the console's own for new connections.
    #[arg(long, value_name = "DAYS", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=365))]
    pub cert_days: u32,
    /// Serve the newest statistics of hosts, workloads and services for Prometheus at
    /// http://ADDR/metrics (off unless given; for example 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Serve the engine's API to operators (windows and ctl elsewhere, each with a
    /// credential from `ctl operator add`) on ADDR:PORT, over QUIC with mutual TLS.
    #[arg(long, value_name = "ADDR:PORT")]
    pub operator_listen: Option<std::net::SocketAddr>,
    /// Open the window on an engine elsewhere (a console started with --operator-listen),
    /// as the operator whose credential FILE is (from `ctl operator add`); no engine runs
    /// here. A lost link is tried again until the window closes. CSV exports go to the
    /// data dir's `exports`.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = ["headless", "demo", "operator_listen", "metrics_listen"]
    )]
    pub connect: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<TopCommand>,
}

#[derive(Debug, Subcommand)]
pub enum TopCommand {
    /// Talk to the running console (window or headless) through its control socket.
    Ctl(CtlArgs),
}

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Talk to an engine elsewhere as an operator, with the credential file `ctl operator
    /// add` wrote, instead of the console running on the data dir.
    #[arg(long, value_name = "FILE", global = true)]
    pub connect: Option<PathBuf>,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// List enrolled hosts.
    Hosts,
    /// List VMs on all hosts.
    Vms,
    /// Show the latest events.
    Events {
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Manage hosts.
    #[command(subcommand)]
    Host(HostCommand),
    /// Manage VMs. A VM is named NAME, or HOST/NAME when names repeat across hosts.
    #[command(subcommand)]
    Vm(VmCommand),
    /// List services: status, applications and cost per hour.
    Services,
    /// List migrations, running and finished, with their step, bytes and error.
    Migrations,
    /// Cancel a migration (rolled back: the VM runs on its source again).
    #[command(subcommand)]
    Migration(MigrationCommand),
    /// Define, plan and remove services of several applications.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Capacity per site (CPU, memory, storage: capacity, allocated, used, free) and when
    /// CPU and memory are full, from the daily peaks of their use, with the method named.
    Forecast {
        /// Only this site.
        #[arg(long)]
        site: Option<String>,
    },
    /// Capacity before it happens: after draining a host, or after deploying a service's plan.
    #[command(subcommand)]
    Whatif(WhatifCommand),
    /// What the workloads used (CPU-hours, GB-months stored, GB sent) and what it cost at
    /// their hosts' prices, by instance, application, service or site.
    Cost {
        #[arg(long, default_value = "service", value_parser = ["instance", "application", "service", "site"])]
        by: String,
        #[arg(long, default_value = "30d", value_parser = parse_span_secs)]
        since: u64,
    },
    /// Scale an application of a service out and in on its instances' mean CPU.
    #[command(subcommand)]
    Autoscale(AutoscaleCommand),
    /// The audit log: every change asked of the engine and every refusal, who asked and
    /// what came of it; `audit verify` checks that no record was changed or removed.
    Audit(AuditArgs),
    /// Operators: who may drive this engine from elsewhere, and with which role.
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// List the image library: name, format, size for the guest, size on disk, BLAKE3 and
    /// the hosts that hold a copy.
    Images,
    /// Service networks: each one's subnet, services, hosts, instances (address, MAC, name,
    /// readiness) and published ports.
    Networks,
    /// Import or delete operating system images (qcow2, raw disks, ISO installers).
    #[command(subcommand)]
    Image(ImageCommand),
    /// Statistics of a host or a workload (VM or process instance): CPU %, memory MiB, disk
    /// and network bytes per second, each bucket's min, mean and max.
    Stats {
        /// A host id, a workload's name, or service:NAME, app:SERVICE/APP, site:NAME (CPU is
        /// the members' mean, the rest their sum).
        subject: String,
        /// How far back: 90s, 10m, 6h, 7d.
        #[arg(long, default_value = "10m", value_parser = parse_span_secs)]
        since: u64,
        /// Bucket size: 1s, 1m or 1h (by default the finest that keeps the answer short).
        #[arg(long, value_parser = parse_span_secs)]
        resolution: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AutoscaleCommand {
    /// Set the rule of SERVICE/APP: out when the mean is above --above for --periods periods
    /// in a row, in when below --below; no change within --cooldown of the last.
    Set {
        /// SERVICE/APP.
        target: String,
        /// What is watched, as the mean over the application's instances: `cpu` (%; for an
        /// application inside VMs, its processes' share of each VM, read in the guest), or
        /// `app-metric` (the number its service file's `metric` reads: a command's output,
        /// or the connections to a port).
        #[arg(long, default_value = "cpu", value_parser = ["cpu", "app-metric"])]
        metric: String,
        #[arg(long, value_name = "VALUE")]
        above: f64,
        #[arg(long, value_name = "VALUE")]
        below: f64,
        #[arg(long, default_value = "30s", value_parser = parse_span_secs)]
        period: u64,
        #[arg(long, default_value_t = 3)]
        periods: u32,
        #[arg(long, default_value = "300s", value_parser = parse_span_secs)]
        cooldown: u64,
        #[arg(long, default_value_t = 1)]
        min: u32,
        #[arg(long)]
        max: u32,
    },
    /// Every rule, the instances it set and what it said at the end of its last period.
    Show,
    /// What SERVICE/APP's rule would have done over the recorded history.
    Replay {
        target: String,
        #[arg(long, default_value = "1d", value_parser = parse_span_secs)]
        since: u64,
    },
    /// Remove SERVICE/APP's rule (its instances stay as they are).
    Remove { target: String },
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: Option<AuditCommand>,
    /// Only the last 90s, 10m, 6h, 7d.
    #[arg(long, value_parser = parse_span_secs)]
    pub since: Option<u64>,
    /// Only what this operator (or `local`, the control socket) asked.
    #[arg(long)]
    pub operator: Option<String>,
    /// One JSON object per line, for export.
    #[arg(long)]
    pub jsonl: bool,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the chain of records; names the first that was changed or removed (exit 1).
    Verify,
}

#[derive(Debug, Subcommand)]
pub enum OperatorCommand {
    /// Add an operator and write their credential file (their key, their certificate, the
    /// cluster CA and the engine's address; mode 0600) for `--connect`.
    Add {
        name: String,
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
        /// Limit their changes to a service's instances (service:NAME) or to what runs on
        /// a site's hosts (site:NAME); repeat for more. Reads are not limited.
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
        /// Let them open VMs' consoles and screens (a shell on a guest), whatever their role.
        /// Operators and admins may by default, viewers not.
        #[arg(long, conflicts_with = "no_consoles")]
        consoles: bool,
        /// Never let them open VMs' consoles and screens.
        #[arg(long)]
        no_consoles: bool,
        /// Where to write the credential; it must not exist.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// HOST:PORT operators reach the engine at [default: the address it listens on]
        #[arg(long, value_name = "HOST:PORT")]
        address: Option<String>,
    },
    /// List operators, revoked ones included.
    List,
    /// End an operator's sessions and refuse their credential from now on.
    Revoke { name: String },
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Copy FILE into the library as NAME, its format found from its bytes: a qcow2 disk
    /// (one that builds on a backing file or keeps its data in another file is refused), a
    /// raw disk with a partition table, or an ISO 9660 installer. Through --connect, FILE's
    /// bytes go to the engine from here.
    Import {
        file: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Send an image to a host, or to every host of a site, ahead of the VMs that will use
    /// it. A host that holds the same bytes (under any name) receives nothing; a push that
    /// was cut goes on from where it stopped.
    Push {
        name: String,
        #[arg(long, conflicts_with = "site", required_unless_present = "site")]
        host: Option<String>,
        #[arg(long)]
        site: Option<String>,
    },
    /// Remove an image from the library; refused while a VM's disk builds on it.
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
pub enum WhatifCommand {
    /// The host's site without the host (its workloads would have to go elsewhere).
    Drain { host: String },
    /// The sites a service's plan places instances on, with those instances added.
    Deploy { service: String },
}

/// A span such as `90s`, `10m`, `6h` or `7d`, in seconds.
pub(super) fn parse_span_secs(text: &str) -> Result<u64, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a span like 90s, 10m, 6h or 7d"))?;
    let unit_secs = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit is s, m, h or d")),
    };
    if n == 0 {
        return Err("a span of zero".into());
    }
    n.checked_mul(unit_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Define a service from its file (TOML; see assets/examples/shop.toml).
    Create {
        /// The service file; a refusal names its line.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Replace the service of the same name.
        #[arg(long)]
        replace: bool,
    },
    /// Show where every instance would run and why hosts were left out, changing nothing.
    /// Exit code 0: nothing to change; 1: changes; 2: something cannot be placed.
    Plan {
        name: String,
        /// Place an instance by hand, as APP-INDEX=HOST (repeatable); the plan says whether
        /// each holds or the rule it breaks.
        #[arg(long = "place", value_name = "APP-INDEX=HOST")]
        place: Vec<String>,
    },
    /// Apply the plan: create the instances it places, remove those it removes.
    Deploy {
        name: String,
        /// The fingerprint `service plan` printed: refuse if the fleet changed since.
        #[arg(long)]
        fingerprint: Option<String>,
        /// The instances placed by hand in that plan, as APP-INDEX=HOST.
        #[arg(long = "place", value_name = "APP-INDEX=HOST")]
        place: Vec<String>,
    },
    /// Start the instances in dependency order, each application once those it needs are ready.
    Start { name: String },
    /// Stop the instances in reverse dependency order.
    Stop { name: String },
    /// Show a service's definition.
    Show { name: String },
    /// Make an existing VM an instance of one of the service's applications. A deploy never
    /// removes an adopted VM; deleting the service does.
    Adopt {
        name: String,
        /// The application it becomes an instance of.
        #[arg(long)]
        app: String,
        /// The VM: NAME, or HOST/NAME when names repeat across hosts.
        vm: String,
    },
    /// Remove every instance of a service (forced off, disks deleted), then its definition.
    Delete { name: String },
    /// Move a service to the hosts of another site: stopped top-down, its instances migrated
    /// one at a time in start order (placed under its rules), then started again in start
    /// order. Refused, with every reason, when an instance has no host there.
    Move {
        name: String,
        /// The site it goes to.
        #[arg(long = "to-site", value_name = "SITE")]
        to_site: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum MigrationCommand {
    /// Stop a migration that is not confirmed yet and roll it back.
    Cancel { id: u64 },
}

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Show the key fingerprint the agent at ADDR presents, without enrolling it.
    Probe {
        /// HOST:PORT of the agent.
        address: String,
    },
    /// Enroll the agent at ADDR with the join token it printed.
    Add {
        /// HOST:PORT of the agent.
        address: String,
        #[arg(long)]
        token: String,
        /// The fingerprint the agent printed; enrollment fails if the agent's key differs.
        #[arg(long)]
        fingerprint: Option<String>,
        /// Replace an enrolled host of the same id that has another key (a reinstalled host).
        #[arg(long)]
        replace: bool,
    },
    /// Put a host in maintenance and move every VM off it, one at a time, each to the host
    /// placement picks under its service's rules; says which VMs cannot move and why. Again
    /// on a paused or stopped drain: resume it (VMs whose migration failed are tried again).
    Drain {
        host: String,
        /// Start no further migration; the one under way finishes.
        #[arg(long)]
        pause: bool,
    },
    /// End a host's maintenance: it takes new VMs and instances again.
    Undrain { host: String },
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM from a template of the host's, or from an image of the library (pushed
    /// to the host first when it does not hold it).
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, required_unless_present = "image", conflicts_with = "image")]
        template: Option<String>,
        /// An image of the library: a disk image boots from a qcow2 overlay on the host's
        /// copy; an installer (ISO) boots from a CD-ROM beside an empty disk of --disk-gib.
        #[arg(long)]
        image: Option<String>,
        /// The disk's size in GiB (a disk image's by default; an installer needs one).
        #[arg(long, requires = "image")]
        disk_gib: Option<u64>,
        /// Boot with UEFI (OVMF, which the host must have) instead of the BIOS.
        #[arg(long, requires = "image")]
        uefi: bool,
        /// A user cloud-init makes in the guest (with sudo), who logs in with --ssh-key.
        #[arg(long, requires_all = ["image", "ssh_key"], conflicts_with = "user_data")]
        user: Option<String>,
        /// The user's SSH public key file (a .pub, one line), read where ctl runs.
        #[arg(long, value_name = "FILE", requires = "user")]
        ssh_key: Option<PathBuf>,
        /// cloud-init user-data (#cloud-config YAML, or a #! script), read where ctl runs;
        /// checked before anything is made.
        #[arg(long, value_name = "FILE", requires = "image")]
        user_data: Option<PathBuf>,
        #[arg(long)]
        host: String,
        #[arg(long)]
        vcpus: Option<u32>,
        #[arg(long)]
        memory_mib: Option<u64>,
        /// Start it once created.
        #[arg(long)]
        start: bool,
    },
    /// Start a VM.
    Start { vm: String },
    /// Reboot a running VM (the guest is asked to restart).
    Reboot { vm: String },
    /// Pause a running VM: its vCPUs stop, its memory stays.
    Pause { vm: String },
    /// Resume a paused VM.
    Resume { vm: String },
    /// Stop a VM: the guest is asked to shut down, and forced off after the agent's timeout.
    Stop {
        vm: String,
        /// Force it off at once.
        #[arg(long)]
        force: bool,
    },
    /// Delete a stopped VM, its disks and its snapshots.
    Delete { vm: String },
    /// Attach to a running VM's serial console, like virsh console: what the guest writes
    /// goes to stdout, what you type to the guest; Ctrl-] leaves. With stdin from a pipe its
    /// text is typed, and ctl leaves once the console has been quiet for --linger-secs after
    /// it. Several may watch one console; the first to attach types.
    Console {
        /// `NAME` or `HOST/NAME`.
        vm: String,
        /// Watch only, never type.
        #[arg(long)]
        read_only: bool,
        /// With piped input: how long the console must be quiet after it before ctl leaves.
        #[arg(long, default_value_t = 2)]
        linger_secs: u64,
    },
    /// Save a running VM's screen as a PNG file (watching only: nothing is typed).
    Screenshot {
        /// `NAME` or `HOST/NAME`.
        vm: String,
        /// Where to write the PNG; a relative path is taken where ctl runs.
        #[arg(long)]
        out: PathBuf,
    },
    /// Take the installer (an ISO image) out of a VM's CD-ROM drive, at once if it runs: it
    /// boots from its disk from then on.
    Eject {
        /// `NAME` or `HOST/NAME`.
        vm: String,
    },
    /// Change a VM's vCPUs or memory. A running VM keeps what it has until its next start
    /// (the reply says so: `at_next_start`). Refused beyond the host's CPUs or free memory.
    Set {
        vm: String,
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=256))]
        vcpus: Option<u32>,
        #[arg(long)]
        memory_mib: Option<u64>,
    },
    /// Start a VM whenever its host's agent starts, or not.
    Autostart { vm: String, state: OnOff },
    /// Copy a stopped VM: its disks, vCPUs and memory, with a new name, UUID and MAC. The
    /// copy is made on the VM's host and stays off; with --to another host, it then migrates
    /// there (`migrations` follows it).
    Clone {
        vm: String,
        /// The copy's name.
        #[arg(long)]
        name: String,
        #[arg(long)]
        to: Option<String>,
    },
    /// Snapshots of a VM on qcow2 disks (a VM from an overlay template): its disks, and its
    /// memory when it runs, at one moment, kept inside its disk.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Run a shell command inside a running VM through its guest agent (qemu-guest-agent),
    /// print what it printed, and exit with its exit code.
    Exec {
        vm: String,
        /// Give up waiting after this many seconds (the command is left running).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=600))]
        timeout_secs: u32,
        /// The command, run by /bin/sh -c in the guest.
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Move a VM to another host, cold: stopped, its disk streamed and verified, defined and
    /// started there, and only then deleted here. Returns once the migration has started;
    /// `migrations` follows it.
    Migrate {
        vm: String,
        /// The host it goes to.
        #[arg(long)]
        to: String,
        /// Only check: every reason it cannot go, or the data size, time over the link
        /// (also the downtime) and transfer cost. Exit code 0 when it can go, 2 when not.
        #[arg(long)]
        dry_run: bool,
        /// At most this many Mbit/s for the disk stream (a site's transfer limit applies
        /// too between sites).
        #[arg(long, value_name = "MBPS", value_parser = clap::value_parser!(u32).range(1..))]
        limit_mbps: Option<u32>,
        /// Compress the disk stream with zstd: auto (when it crosses to or from a remote
        /// site), on or off. Chunks that do not shrink travel as they are.
        #[arg(long, value_enum, default_value_t = Compress::Auto)]
        compress: Compress,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// List a VM's snapshots, oldest first.
    List { vm: String },
    /// Take a snapshot (1 to 64 letters, digits, '-', '_', '.').
    Create { vm: String, snapshot: String },
    /// Put the VM back as it was at the snapshot: what it wrote since is lost.
    Revert { vm: String, snapshot: String },
    /// Delete a snapshot; the VM stays as it is.
    Delete { vm: String, snapshot: String },
}

/// Whether a migration's disk stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compress {
    Auto,
    On,
    Off,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_with_their_units_and_nonsense_is_refused() {
        assert_eq!(parse_span_secs("90s"), Ok(90));
        assert_eq!(parse_span_secs("10m"), Ok(600));
        assert_eq!(parse_span_secs("6h"), Ok(21_600));
        assert_eq!(parse_span_secs("7d"), Ok(604_800));
        assert_eq!(parse_span_secs("45"), Ok(45));
        for bad in ["", "m", "10x", "0m", "-5m", "99999999999999999999d"] {
            assert!(parse_span_secs(bad).is_err(), "{bad:?}");
        }
        let cli = Cli::try_parse_from([
            "dunes-console",
            "ctl",
            "stats",
            "web-1",
            "--since",
            "1h",
            "--json",
        ]);
        assert!(cli.is_ok(), "{cli:?}");
        let bad =
            Cli::try_parse_from(["dunes-console", "ctl", "stats", "web-1", "--since", "soon"]);
        assert!(bad.is_err());
    }

    #[test]
    fn usage_errors_are_one_line() {
        let err = Cli::try_parse_from(["dunes-console", "ctl", "host", "add", "10.0.0.5:7443"])
            .unwrap_err();
        let line = dunes_shared::usage_error_line(&err.render().to_string());
        assert!(!line.contains('\n'), "{line}");
        assert!(line.contains("--token"), "{line}");
        let err = Cli::try_parse_from(["dunes-console", "ctl", "hots"]).unwrap_err();
        let line = dunes_shared::usage_error_line(&err.render().to_string());
        assert!(line.starts_with("unrecognized subcommand 'hots'"), "{line}");
    }
}
