//! Command line of `dunes-console`: the window (default), `--headless`, `--demo`, and `ctl`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::{
    ctl::{self, CtlRequest},
    demo, engine,
};

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

#[derive(Debug, Subcommand)]
pub enum WhatifCommand {
    /// The host's site without the host (its workloads would have to go elsewhere).
    Drain { host: String },
    /// The sites a service's plan places instances on, with those instances added.
    Deploy { service: String },
}

/// A span such as `90s`, `10m`, `6h` or `7d`, in seconds.
fn parse_span_secs(text: &str) -> Result<u64, String> {
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
    /// Create a VM from a template.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        template: String,
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

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DUNES_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,dunes_console=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// A fresh, owner-only directory for a demo: the test driver forgets its VMs when the
/// agents stop anyway. Its name is not guessable, so no other user can take it first.
fn demo_data_dir() -> anyhow::Result<PathBuf> {
    let dir = tempfile::Builder::new()
        .prefix("dunes-demo-")
        .tempdir()
        .map_err(|e| anyhow::anyhow!("cannot create a demo data dir: {e}"))?;
    Ok(dir.keep())
}

fn default_data_dir(demo: bool) -> anyhow::Result<PathBuf> {
    if demo {
        return demo_data_dir();
    }
    directories::ProjectDirs::from("", "", "dunes-console")
        .map(|d| d.data_dir().to_path_buf())
        .ok_or_else(|| anyhow::anyhow!("no home directory to put the data dir in; pass --data-dir"))
}

const NAME: &str = "dunes-console";

/// Parses the command line. Help and version print as usual; a usage error is one line on
/// stderr and exit code 2, like every other error of this program.
pub fn parse_args() -> Result<Cli, ExitCode> {
    Cli::try_parse().map_err(|err| {
        if !err.use_stderr()
            || err.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        {
            let _ = err.print();
            return ExitCode::from(err.exit_code() as u8);
        }
        let line = dunes_shared::usage_error_line(&err.render().to_string());
        eprintln!("{NAME}: {line} (see {NAME} --help)");
        ExitCode::from(2)
    })
}

pub fn main(cli: Cli) -> ExitCode {
    init_tracing();
    let result = match cli.command {
        Some(TopCommand::Ctl(args)) => run_ctl(cli.data_dir, args),
        None => {
            let options = engine::EngineOptions {
                cert_lifetime: Duration::from_secs(u64::from(cli.cert_days) * 24 * 3600),
                // The window is on a desktop; a headless console is not.
                desktop_notifications: if cli.headless {
                    engine::notify::DesktopNotifications::Off
                } else {
                    engine::notify::DesktopNotifications::SessionBus
                },
            };
            run_console(
                cli.data_dir,
                cli.headless,
                cli.demo,
                cli.metrics_listen,
                options,
            )
            .map(|()| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("{NAME}: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}

fn run_console(
    data_dir: Option<PathBuf>,
    headless: bool,
    with_demo: bool,
    metrics_listen: Option<std::net::SocketAddr>,
    options: engine::EngineOptions,
) -> anyhow::Result<()> {
    let temporary = with_demo && data_dir.is_none();
    let data_dir = data_dir.map_or_else(|| default_data_dir(with_demo), Ok)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("dunes-engine")
        .enable_all()
        .build()?;
    let started = runtime.block_on(async {
        let engine = engine::start_with(&data_dir, options).await?;
        ctl::serve(engine.clone()).await?;
        let metrics = match metrics_listen {
            Some(address) => {
                let server = crate::metrics::serve(engine.clone(), address).await?;
                eprintln!(
                    "dunes-console: statistics for Prometheus at http://{}/metrics",
                    server.address
                );
                Some(server)
            }
            None => None,
        };
        let fleet = if with_demo {
            Some(demo::start(&engine).await?)
        } else {
            None
        };
        anyhow::Ok((engine, fleet, metrics))
    });
    let (engine, fleet, _metrics) = match started {
        Ok(started) => started,
        Err(e) => {
            if temporary {
                let _ = std::fs::remove_dir_all(&data_dir);
            }
            return Err(e);
        }
    };
    eprintln!(
        "dunes-console: data dir {} (ctl: dunes-console ctl --data-dir {} hosts)",
        data_dir.display(),
        data_dir.display()
    );
    let result = if headless {
        runtime.block_on(shutdown_signal());
        Ok(())
    } else {
        let _guard = runtime.enter();
        run_window(engine, runtime.handle())
    };
    if let Some(fleet) = fleet {
        runtime.block_on(fleet.stop());
    }
    runtime.shutdown_timeout(Duration::from_secs(2));
    if temporary {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    result
}

/// The window icon, drawn for this project (assets/icons/dunes.png).
const ICON_PNG: &[u8] = include_bytes!("../../assets/icons/dunes.png");

fn run_window(
    engine: engine::EngineHandle,
    runtime: &tokio::runtime::Handle,
) -> anyhow::Result<()> {
    let mut viewport = egui::ViewportBuilder::default();
    // A broken icon is cosmetic: the window opens without it.
    match eframe::icon_data::from_png_bytes(ICON_PNG) {
        Ok(icon) => viewport = viewport.with_icon(icon),
        Err(e) => tracing::warn!("window icon unusable: {e}"),
    }
    let options = eframe::NativeOptions {
        viewport: viewport
            .with_title("Dunes console")
            .with_app_id("dunes-console")
            .with_inner_size([1400.0, 860.0])
            .with_min_inner_size([640.0, 420.0]),
        ..Default::default()
    };
    // Ctrl+C or SIGTERM closes the window, so the demo agents and the store are shut down
    // the same way as when the operator closes it. A signal before the window exists is kept
    // for it; a second one, if the window does not close, ends the process at once.
    let window: std::sync::Arc<std::sync::Mutex<WindowCloser>> = Default::default();
    let closer = window.clone();
    runtime.spawn(async move {
        shutdown_signal().await;
        lock(&closer).close();
        shutdown_signal().await;
        eprintln!("{NAME}: interrupted twice, exiting at once");
        std::process::exit(130);
    });
    eframe::run_native(
        "Dunes console",
        options,
        Box::new(move |cc| {
            lock(&window).attach(cc.egui_ctx.clone());
            Ok(Box::new(crate::ui::ConsoleApp::new(&cc.egui_ctx, engine)))
        }),
    )
    .map_err(|e| anyhow::anyhow!("cannot open the window: {e}"))
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Closes the window on a signal, or as soon as it exists when the signal came first.
#[derive(Default)]
struct WindowCloser {
    ctx: Option<egui::Context>,
    requested: bool,
}

impl WindowCloser {
    fn close(&mut self) {
        self.requested = true;
        if let Some(ctx) = &self.ctx {
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
            ctx.request_repaint();
        }
    }

    fn attach(&mut self, ctx: egui::Context) {
        self.ctx = Some(ctx);
        if self.requested {
            self.close();
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn ctl_request(command: &CtlCommand) -> anyhow::Result<CtlRequest> {
    Ok(match command {
        CtlCommand::Services => CtlRequest::Services,
        CtlCommand::Service(ServiceCommand::Create { file, replace }) => {
            let size = std::fs::metadata(file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?
                .len();
            if size > ctl::MAX_REQUEST_BYTES as u64 / 2 {
                anyhow::bail!(
                    "{} is {size} bytes; a service file may have at most {}",
                    file.display(),
                    ctl::MAX_REQUEST_BYTES / 2
                );
            }
            let source = std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            CtlRequest::ServiceCreate {
                source,
                replace: *replace,
            }
        }
        CtlCommand::Service(ServiceCommand::Plan { name, place }) => CtlRequest::ServicePlan {
            name: name.clone(),
            place: place.clone(),
        },
        CtlCommand::Service(ServiceCommand::Show { name }) => {
            CtlRequest::ServiceShow { name: name.clone() }
        }
        CtlCommand::Service(ServiceCommand::Delete { name }) => {
            CtlRequest::ServiceDelete { name: name.clone() }
        }
        CtlCommand::Service(ServiceCommand::Deploy {
            name,
            fingerprint,
            place,
        }) => CtlRequest::ServiceDeploy {
            name: name.clone(),
            fingerprint: fingerprint.clone(),
            place: place.clone(),
        },
        CtlCommand::Service(ServiceCommand::Start { name }) => {
            CtlRequest::ServiceStart { name: name.clone() }
        }
        CtlCommand::Service(ServiceCommand::Stop { name }) => {
            CtlRequest::ServiceStop { name: name.clone() }
        }
        CtlCommand::Service(ServiceCommand::Adopt { name, app, vm }) => CtlRequest::ServiceAdopt {
            name: name.clone(),
            app: app.clone(),
            vm: vm.clone(),
        },
        CtlCommand::Service(ServiceCommand::Move { name, to_site }) => CtlRequest::ServiceMove {
            name: name.clone(),
            site: to_site.clone(),
        },
        CtlCommand::Host(HostCommand::Drain { host, pause }) => CtlRequest::HostDrain {
            host: host.clone(),
            pause: *pause,
        },
        CtlCommand::Host(HostCommand::Undrain { host }) => {
            CtlRequest::HostUndrain { host: host.clone() }
        }
        CtlCommand::Hosts => CtlRequest::Hosts,
        CtlCommand::Vms => CtlRequest::Vms,
        CtlCommand::Events { limit } => CtlRequest::Events { limit: *limit },
        CtlCommand::Host(HostCommand::Probe { address }) => CtlRequest::HostProbe {
            address: address.clone(),
        },
        CtlCommand::Host(HostCommand::Add {
            address,
            token,
            fingerprint,
            replace,
        }) => CtlRequest::HostAdd {
            address: address.clone(),
            token: token.clone(),
            fingerprint: fingerprint.clone(),
            replace: *replace,
        },
        CtlCommand::Vm(VmCommand::Create {
            name,
            template,
            host,
            vcpus,
            memory_mib,
            start,
        }) => CtlRequest::VmCreate {
            name: name.clone(),
            template: template.clone(),
            host: host.clone(),
            vcpus: *vcpus,
            memory_mib: *memory_mib,
            start: *start,
        },
        CtlCommand::Vm(VmCommand::Start { vm }) => CtlRequest::VmStart { vm: vm.clone() },
        CtlCommand::Vm(VmCommand::Reboot { vm }) => CtlRequest::VmPower {
            vm: vm.clone(),
            action: dunes_shared::protocol::PowerAction::Reboot,
        },
        CtlCommand::Vm(VmCommand::Pause { vm }) => CtlRequest::VmPower {
            vm: vm.clone(),
            action: dunes_shared::protocol::PowerAction::Pause,
        },
        CtlCommand::Vm(VmCommand::Resume { vm }) => CtlRequest::VmPower {
            vm: vm.clone(),
            action: dunes_shared::protocol::PowerAction::Resume,
        },
        CtlCommand::Vm(VmCommand::Stop { vm, force }) => CtlRequest::VmStop {
            vm: vm.clone(),
            force: *force,
        },
        CtlCommand::Vm(VmCommand::Delete { vm }) => CtlRequest::VmDelete { vm: vm.clone() },
        CtlCommand::Vm(VmCommand::Set {
            vm,
            vcpus,
            memory_mib,
        }) => CtlRequest::VmSet {
            vm: vm.clone(),
            vcpus: *vcpus,
            memory_mib: *memory_mib,
            autostart: None,
        },
        CtlCommand::Vm(VmCommand::Autostart { vm, state }) => CtlRequest::VmSet {
            vm: vm.clone(),
            vcpus: None,
            memory_mib: None,
            autostart: Some(*state == OnOff::On),
        },
        CtlCommand::Vm(VmCommand::Clone { vm, name, to }) => CtlRequest::VmClone {
            vm: vm.clone(),
            name: name.clone(),
            to: to.clone(),
        },
        CtlCommand::Vm(VmCommand::Snapshot(command)) => {
            use dunes_shared::protocol::SnapshotAction;
            let (vm, action, snapshot) = match command {
                SnapshotCommand::List { vm } => (vm, SnapshotAction::List, None),
                SnapshotCommand::Create { vm, snapshot } => {
                    (vm, SnapshotAction::Create, Some(snapshot))
                }
                SnapshotCommand::Revert { vm, snapshot } => {
                    (vm, SnapshotAction::Revert, Some(snapshot))
                }
                SnapshotCommand::Delete { vm, snapshot } => {
                    (vm, SnapshotAction::Delete, Some(snapshot))
                }
            };
            CtlRequest::VmSnapshot {
                vm: vm.clone(),
                action,
                snapshot: snapshot.cloned(),
            }
        }
        CtlCommand::Vm(VmCommand::Exec {
            vm,
            timeout_secs,
            command,
        }) => CtlRequest::VmExec {
            vm: vm.clone(),
            command: command.join(" "),
            timeout_secs: *timeout_secs,
        },
        CtlCommand::Vm(VmCommand::Migrate {
            vm,
            to,
            dry_run,
            limit_mbps,
            compress,
        }) => CtlRequest::VmMigrate {
            dry_run: *dry_run,
            vm: vm.clone(),
            to: to.clone(),
            limit_mbps: *limit_mbps,
            compress: match compress {
                Compress::Auto => None,
                Compress::On => Some(true),
                Compress::Off => Some(false),
            },
        },
        CtlCommand::Migrations => CtlRequest::Migrations,
        CtlCommand::Forecast { site } => CtlRequest::Forecast { site: site.clone() },
        CtlCommand::Cost { by, since } => CtlRequest::Cost {
            by: by.clone(),
            since_secs: *since,
        },
        CtlCommand::Autoscale(AutoscaleCommand::Set {
            target,
            metric,
            above,
            below,
            period,
            periods,
            cooldown,
            min,
            max,
        }) => CtlRequest::AutoscaleSet {
            target: target.clone(),
            metric: metric.clone(),
            above: *above,
            below: *below,
            period_secs: *period,
            periods: *periods,
            cooldown_secs: *cooldown,
            min: *min,
            max: *max,
        },
        CtlCommand::Autoscale(AutoscaleCommand::Show) => CtlRequest::AutoscaleShow,
        CtlCommand::Autoscale(AutoscaleCommand::Replay { target, since }) => {
            CtlRequest::AutoscaleReplay {
                target: target.clone(),
                since_secs: *since,
            }
        }
        CtlCommand::Autoscale(AutoscaleCommand::Remove { target }) => CtlRequest::AutoscaleRemove {
            target: target.clone(),
        },
        CtlCommand::Whatif(WhatifCommand::Drain { host }) => {
            CtlRequest::WhatifDrain { host: host.clone() }
        }
        CtlCommand::Whatif(WhatifCommand::Deploy { service }) => CtlRequest::WhatifDeploy {
            name: service.clone(),
        },
        CtlCommand::Stats {
            subject,
            since,
            resolution,
        } => CtlRequest::Stats {
            subject: subject.clone(),
            since_secs: *since,
            resolution_secs: *resolution,
        },
        CtlCommand::Migration(MigrationCommand::Cancel { id }) => {
            CtlRequest::MigrationCancel { id: *id }
        }
    })
}

fn run_ctl(data_dir: Option<PathBuf>, args: CtlArgs) -> anyhow::Result<ExitCode> {
    let data_dir = data_dir.map_or_else(|| default_data_dir(false), Ok)?;
    let request = ctl_request(&args.command)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Stopping a guest may take the agent's whole shutdown timeout; the engine gives up on
    // the agent first and says why.
    let timeout = engine::STOP_CALL_TIMEOUT + Duration::from_secs(30);
    let response = runtime.block_on(ctl::request(&data_dir, &request, timeout))?;
    if !response.ok {
        anyhow::bail!("{}", response.error.unwrap_or_else(|| "failed".into()));
    }
    let data = response.data.unwrap_or(Value::Null);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&data)?);
    } else {
        print!("{}", render_table(&args.command, &data));
    }
    // A plan tells by its exit code whether deploying it would do anything.
    if let CtlCommand::Service(ServiceCommand::Plan { .. }) = args.command {
        return Ok(if data["feasible"] == Value::Bool(false) {
            ExitCode::from(2)
        } else if data["changes"] == Value::Bool(true) {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        });
    }
    // A guest command's own exit code, as ssh would give it; 124 when it timed out (as
    // timeout(1) says it).
    if let CtlCommand::Vm(VmCommand::Exec { .. }) = args.command {
        return Ok(match data["exit_code"].as_i64() {
            Some(code) => ExitCode::from(code.clamp(0, 255) as u8),
            None => {
                eprintln!("the command was still running at the timeout");
                ExitCode::from(124)
            }
        });
    }
    // A dry run tells by its exit code whether the VM can go.
    if let CtlCommand::Vm(VmCommand::Migrate { dry_run: true, .. }) = args.command
        && data["can_go"] == Value::Bool(false)
    {
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

/// A drain as `host drain` shows it.
fn render_drain(host: &str, data: &Value) -> String {
    let mut out = format!(
        "{host} is in maintenance{}: {} moved, {} left",
        if data["paused"] == Value::Bool(true) {
            ", drain paused"
        } else {
            ""
        },
        text(&data["moved"]),
        text(&data["remaining"]),
    );
    if let Some(id) = data["migrating"].as_u64() {
        out.push_str(&format!(", migration {id} under way"));
    }
    out.push('\n');
    for b in data["blocked"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {} cannot move: {}\n",
            text(&b["vm"]),
            text(&b["reason"])
        ));
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Sites' capacity as rows: one per resource, with its forecast.
fn capacity_table(sites: &Value) -> String {
    let number = |v: &Value| v.as_f64().map_or("-".to_string(), |n| format!("{n:.0}"));
    let mut rows = Vec::new();
    for site in sites.as_array().into_iter().flatten() {
        for r in site["resources"].as_array().into_iter().flatten() {
            rows.push(vec![
                text(&site["site"]),
                format!("{} ({})", text(&r["resource"]), text(&r["unit"])),
                number(&r["capacity"]),
                number(&r["allocated"]),
                number(&r["used"]),
                number(&r["free"]),
                match &r["forecast"] {
                    Value::Null => "-".into(),
                    f => format!("{} [{}]", text(&f["text"]), text(&f["method"])),
                },
            ]);
        }
    }
    table(
        &[
            "SITE",
            "RESOURCE",
            "CAPACITY",
            "ALLOCATED",
            "USED",
            "FREE",
            "FORECAST",
        ],
        rows,
    )
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>| {
        let mut s: String = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s + "\n"
    };
    out.push_str(&line(headers.iter().map(|h| h.to_string()).collect()));
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

fn render_table(command: &CtlCommand, data: &Value) -> String {
    let items = data.as_array().cloned().unwrap_or_default();
    let pick =
        |item: &Value, keys: &[&str]| keys.iter().map(|k| text(&item[*k])).collect::<Vec<_>>();
    match command {
        CtlCommand::Hosts => table(
            &[
                "ID",
                "STATE",
                "SITE",
                "ADDRESS",
                "CPUS",
                "MEMORY_MIB",
                "VMS",
                "RUNTIMES",
            ],
            items
                .iter()
                .map(|i| {
                    let mut i = i.clone();
                    if !i["maintenance"].is_null() {
                        i["state"] = Value::String(format!("{}, maintenance", text(&i["state"])));
                    }
                    pick(
                        &i,
                        &[
                            "id",
                            "state",
                            "site",
                            "address",
                            "cpus",
                            "memory_mib",
                            "vms",
                            "runtimes",
                        ],
                    )
                })
                .collect(),
        ),
        CtlCommand::Vms => table(
            &["NAME", "HOST", "STATE", "VCPUS", "MEMORY_MIB", "TEMPLATE"],
            items
                .iter()
                .map(|i| {
                    pick(
                        i,
                        &["name", "host", "state", "vcpus", "memory_mib", "template"],
                    )
                })
                .collect(),
        ),
        CtlCommand::Events { .. } => table(
            &["TIME", "LEVEL", "HOST", "MESSAGE"],
            items
                .iter()
                .map(|i| {
                    vec![
                        crate::ui::clock(i["time_ms"].as_u64().unwrap_or(0)),
                        text(&i["level"]),
                        text(&i["host"]),
                        text(&i["message"]),
                    ]
                })
                .collect(),
        ),
        CtlCommand::Host(HostCommand::Probe { address }) => {
            format!("{address} presents key {}\n", text(&data["fingerprint"]))
        }
        CtlCommand::Host(HostCommand::Add { .. }) => {
            format!(
                "enrolled {} with key {}\n",
                text(&data["id"]),
                text(&data["fingerprint"])
            )
        }
        CtlCommand::Host(HostCommand::Drain { host, .. }) => render_drain(host, data),
        CtlCommand::Host(HostCommand::Undrain { host }) => {
            format!("{host} is out of maintenance and takes new work again\n")
        }
        CtlCommand::Service(ServiceCommand::Move { name, to_site }) => format!(
            "service {name} is moving to site {to_site}: {} first; follow it with `services` and `migrations`\n",
            if data["moving"]["was_running"] == Value::Bool(true) {
                "stopping it"
            } else {
                "it is stopped, so migrating"
            }
        ),
        CtlCommand::Forecast { .. } => capacity_table(data),
        CtlCommand::Cost { by, .. } => {
            let number = |v: &Value, digits: usize| {
                v.as_f64()
                    .map_or("-".to_string(), |n| format!("{n:.digits$}"))
            };
            let rows = data["lines"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|l| {
                    vec![
                        text(&l["key"]),
                        number(&l["cpu_hours"], 3),
                        number(&l["gb_months"], 4),
                        number(&l["gb_sent"], 3),
                        number(&l["cost"], 3),
                    ]
                })
                .collect();
            format!(
                "{}total {}\n",
                table(
                    &[
                        &by.to_uppercase(),
                        "CPU-HOURS",
                        "GB-MONTHS",
                        "GB SENT",
                        "COST"
                    ],
                    rows
                ),
                number(&data["total_cost"], 3)
            )
        }
        CtlCommand::Autoscale(AutoscaleCommand::Show) => table(
            &["APPLICATION", "RULE", "INSTANCES", "SET TO", "LAST"],
            items
                .iter()
                .map(|a| {
                    vec![
                        format!("{}/{}", text(&a["service"]), text(&a["app"])),
                        text(&a["rule"]),
                        text(&a["instances"]),
                        text(&a["desired"]),
                        text(&a["last_reason"]),
                    ]
                })
                .collect(),
        ),
        CtlCommand::Autoscale(AutoscaleCommand::Replay { .. }) => {
            let changes = data["changes"].as_array().cloned().unwrap_or_default();
            let outs = changes.iter().filter(|c| c["change"] == "out").count();
            let ins = changes.len() - outs;
            let mut out = format!(
                "{}/{} over {} periods of {} s: would have scaled out {outs} times and in {ins} times\n",
                text(&data["service"]),
                text(&data["app"]),
                text(&data["periods"]),
                text(&data["period_secs"]),
            );
            for c in &changes {
                out.push_str(&format!(
                    "{}  {}\n",
                    crate::ui::clock(c["at"].as_u64().unwrap_or(0) * 1000),
                    text(&c["reason"])
                ));
            }
            out
        }
        CtlCommand::Autoscale(AutoscaleCommand::Set { target, .. }) => {
            format!("autoscaling of {target}: {}\n", text(&data["rule"]))
        }
        CtlCommand::Autoscale(AutoscaleCommand::Remove { target }) => {
            format!("autoscaling of {target} removed; its instances stay as they are\n")
        }
        CtlCommand::Whatif(_) => {
            let mut out = String::new();
            if let Some(unplaced) = data["unplaced"].as_array().filter(|u| !u.is_empty()) {
                out.push_str(&format!(
                    "cannot place: {}\n",
                    text(&Value::Array(unplaced.clone()))
                ));
            }
            out.push_str(if data["fits"] == Value::Bool(true) {
                "after it, every resource fits:\n"
            } else {
                "after it, some resource would be over its capacity:\n"
            });
            out.push_str(&capacity_table(&data["after"]));
            out
        }
        CtlCommand::Stats { .. } => {
            let mut rows = Vec::new();
            for series in data["series"].as_array().into_iter().flatten() {
                let points = series["points"].as_array();
                let last = points.and_then(|p| p.last());
                let mean = |p: &Value| p["mean"].as_f64().unwrap_or(0.0);
                let (low, high) =
                    points
                        .into_iter()
                        .flatten()
                        .fold((f64::MAX, f64::MIN), |(lo, hi), p| {
                            (
                                lo.min(p["min"].as_f64().unwrap_or(lo)),
                                hi.max(p["max"].as_f64().unwrap_or(hi)),
                            )
                        });
                rows.push(vec![
                    text(&series["metric"]),
                    text(&series["unit"]),
                    points.map_or(0, |p| p.len()).to_string(),
                    last.map_or("-".into(), |p| format!("{:.1}", mean(p))),
                    if low <= high {
                        format!("{low:.1}")
                    } else {
                        "-".into()
                    },
                    if low <= high {
                        format!("{high:.1}")
                    } else {
                        "-".into()
                    },
                ]);
            }
            if rows.is_empty() {
                format!(
                    "no statistics for {} in that range yet\n",
                    text(&data["subject"])
                )
            } else {
                format!(
                    "{} every {} s\n{}",
                    text(&data["subject"]),
                    text(&data["resolution_secs"]),
                    table(&["METRIC", "UNIT", "POINTS", "LAST", "MIN", "MAX"], rows)
                )
            }
        }
        CtlCommand::Migrations => table(
            &["ID", "VM", "FROM", "TO", "STATE", "BYTES", "ERROR"],
            items
                .iter()
                .map(|m| {
                    vec![
                        text(&m["id"]),
                        text(&m["vm"]),
                        text(&m["from"]),
                        text(&m["to"]),
                        text(&m["state"]),
                        format!("{}/{}", text(&m["bytes_done"]), text(&m["bytes_total"])),
                        match &m["waiting"] {
                            Value::String(w) => format!("waiting: {w}"),
                            _ => text(&m["error"]),
                        },
                    ]
                })
                .collect(),
        ),
        CtlCommand::Vm(VmCommand::Migrate { dry_run: true, .. }) => {
            match data["can_go"].as_bool() {
                Some(true) => format!(
                    "{} can go from {} to {}: {} bytes ({}), about {} s over {} Mbit/s{}{} (also the downtime), transfer cost {:.4}\n",
                    text(&data["vm"]),
                    text(&data["from"]),
                    text(&data["to"]),
                    text(&data["bytes"]),
                    text(&data["disk_detail"]),
                    text(&data["seconds"]),
                    text(&data["link_mbps"]),
                    data["limit_mbps"]
                        .as_u64()
                        .map_or(String::new(), |l| format!(", limited to {l} Mbit/s")),
                    if data["compress"] == Value::Bool(true) {
                        ", compressed"
                    } else {
                        ""
                    },
                    data["cost"].as_f64().unwrap_or(0.0)
                ),
                _ => {
                    let mut out = format!(
                        "{} cannot go to {}:\n",
                        text(&data["vm"]),
                        text(&data["to"])
                    );
                    for r in data["reasons"].as_array().into_iter().flatten() {
                        out.push_str(&format!("  {}\n", text(r)));
                    }
                    out
                }
            }
        }
        CtlCommand::Vm(VmCommand::Migrate { .. })
        | CtlCommand::Migration(MigrationCommand::Cancel { .. }) => format!(
            "migration {} of {} from {} to {}: {}\n",
            text(&data["id"]),
            text(&data["vm"]),
            text(&data["from"]),
            text(&data["to"]),
            text(&data["state"])
        ),
        CtlCommand::Vm(VmCommand::Delete { .. }) => format!(
            "deleted {} on {}\n",
            text(&data["deleted"]),
            text(&data["host"])
        ),
        CtlCommand::Vm(VmCommand::Exec { .. }) => {
            // What the command wrote to its stderr goes to ours.
            eprint!("{}", data["stderr"].as_str().unwrap_or_default());
            data["stdout"].as_str().unwrap_or_default().to_string()
        }
        CtlCommand::Vm(VmCommand::Snapshot(_)) => table(
            &["NAME", "CREATED", "STATE", "MEMORY_MIB", "CURRENT"],
            items
                .iter()
                .map(|i| {
                    vec![
                        text(&i["name"]),
                        crate::ui::date_time(i["created_unix_secs"].as_u64().unwrap_or(0)),
                        text(&i["state"]),
                        i["memory_state_bytes"]
                            .as_u64()
                            .map_or("-".into(), |b| b.div_ceil(1 << 20).to_string()),
                        if i["current"] == Value::Bool(true) {
                            "*".into()
                        } else {
                            String::new()
                        },
                    ]
                })
                .collect(),
        ),
        CtlCommand::Vm(VmCommand::Set { .. } | VmCommand::Autostart { .. }) => {
            let next = &data["next_start"];
            let mut out = format!(
                "{} on {}: {}, {} vCPUs, {} MiB, autostart {}",
                text(&data["name"]),
                text(&data["host"]),
                text(&data["state"]),
                text(&data["vcpus"]),
                text(&data["memory_mib"]),
                if data["autostart"] == Value::Bool(true) {
                    "on"
                } else {
                    "off"
                }
            );
            if !next.is_null() {
                out.push_str(&format!(
                    "; at its next start: {} vCPUs, {} MiB",
                    text(&next["vcpus"]),
                    text(&next["memory_mib"])
                ));
            }
            out + "\n"
        }
        CtlCommand::Vm(VmCommand::Clone { .. }) => {
            let mut out = format!(
                "{} on {}: a copy of {}, {}\n",
                text(&data["name"]),
                text(&data["host"]),
                text(&data["clone_of"]),
                text(&data["state"])
            );
            let m = &data["migration"];
            if !m.is_null() {
                out.push_str(&format!(
                    "migration {} takes it to {}\n",
                    text(&m["id"]),
                    text(&m["to"])
                ));
            }
            out
        }
        CtlCommand::Vm(_) => format!(
            "{} on {}: {}\n",
            text(&data["name"]),
            text(&data["host"]),
            text(&data["state"])
        ),
        CtlCommand::Services => table(
            &[
                "NAME",
                "STATUS",
                "APPLICATIONS",
                "INSTANCES",
                "COST_PER_HOUR",
            ],
            items
                .iter()
                .map(|s| {
                    let apps = s["applications"].as_array().cloned().unwrap_or_default();
                    let instances: u64 = apps.iter().filter_map(|a| a["instances"].as_u64()).sum();
                    vec![
                        text(&s["name"]),
                        text(&s["status"]),
                        apps.iter()
                            .map(|a| text(&a["name"]))
                            .collect::<Vec<_>>()
                            .join(","),
                        instances.to_string(),
                        s["cost_per_hour"]
                            .as_f64()
                            .map_or("-".into(), |c| format!("{c:.3}")),
                    ]
                })
                .collect(),
        ),
        CtlCommand::Service(ServiceCommand::Create { .. }) => {
            format!("service {} defined\n", text(&data["name"]))
        }
        CtlCommand::Service(
            ServiceCommand::Delete { .. }
            | ServiceCommand::Deploy { .. }
            | ServiceCommand::Start { .. }
            | ServiceCommand::Stop { .. },
        ) => data["done"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                format!(
                    "{} on {}: {}\n",
                    text(&d["instance"]),
                    text(&d["host"]),
                    text(&d["result"])
                )
            })
            .collect(),
        CtlCommand::Service(ServiceCommand::Show { .. }) => text(&data["source"]),
        CtlCommand::Service(ServiceCommand::Adopt { .. }) => format!(
            "{} on {} is now instance {}-{} of service {}\n",
            text(&data["vm"]),
            text(&data["host"]),
            text(&data["application"]),
            text(&data["index"]),
            text(&data["service"])
        ),
        CtlCommand::Service(ServiceCommand::Plan { .. }) => render_plan(data),
    }
}

/// A plan for a person: what goes where at what cost, what cannot, and why hosts were left out.
fn render_plan(plan: &Value) -> String {
    let mut out = format!(
        "plan for service {} (fingerprint {})\n",
        text(&plan["service"]),
        text(&plan["fingerprint"])
    );
    let list = |key: &str| plan[key].as_array().cloned().unwrap_or_default();
    for p in list("placements") {
        let sign = if p["action"] == "create" { "+" } else { "=" };
        out.push_str(&format!(
            "  {sign} {:<16} on {:<12} {:>8.3}/h\n",
            text(&p["instance"]),
            text(&p["host"]),
            p["cost_per_hour"].as_f64().unwrap_or(0.0)
        ));
    }
    for r in list("removals") {
        out.push_str(&format!(
            "  - {:<16} on {}\n",
            text(&r["instance"]),
            text(&r["host"])
        ));
    }
    for u in list("unplaced") {
        out.push_str(&format!(
            "  ! {:<16} cannot be placed: {}\n",
            text(&u["instance"]),
            text(&u["would_fit"])
        ));
    }
    for o in list("overrides") {
        let verdict = match o["breaks"].as_str() {
            Some(why) => format!("breaks a rule: {why}"),
            None => "holds".to_string(),
        };
        out.push_str(&format!(
            "  placed by hand: {} on {}: {verdict}\n",
            text(&o["instance"]),
            text(&o["host"])
        ));
    }
    if let Some(rejections) = plan["rejections"].as_object().filter(|r| !r.is_empty()) {
        out.push_str("hosts left out:\n");
        for (app, reasons) in rejections {
            for reason in reasons.as_array().into_iter().flatten() {
                out.push_str(&format!("  {app}: {}\n", text(reason)));
            }
        }
    }
    out.push_str(&format!(
        "cost: {:.3}/h\n",
        plan["cost_per_hour"].as_f64().unwrap_or(0.0)
    ));
    out
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
    fn the_window_icon_decodes() {
        let icon = eframe::icon_data::from_png_bytes(ICON_PNG).unwrap();
        assert_eq!((icon.width, icon.height), (256, 256));
    }

    #[test]
    fn ctl_arguments_parse() {
        let cli = Cli::try_parse_from([
            "dunes-console",
            "ctl",
            "--json",
            "vm",
            "create",
            "--name",
            "a",
            "--template",
            "tiny",
            "--host",
            "h1",
            "--memory-mib",
            "128",
        ])
        .unwrap();
        let Some(TopCommand::Ctl(args)) = cli.command else {
            panic!()
        };
        assert!(args.json);
        assert!(matches!(
            ctl_request(&args.command).unwrap(),
            CtlRequest::VmCreate {
                memory_mib: Some(128),
                start: false,
                ..
            }
        ));
        assert!(Cli::try_parse_from(["dunes-console", "ctl", "vm", "stop"]).is_err());
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

    #[test]
    fn tables_align() {
        let t = table(&["A", "BB"], vec![vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }
}
