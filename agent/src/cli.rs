//! Command line of `dunes-agent`.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};

use crate::{
    config::AgentConfig,
    identity::AgentIdentity,
    server::{AgentOptions, RunningAgent},
};

#[derive(Debug, Parser)]
#[command(
    name = "dunes-agent",
    version,
    about = "Dunes host agent: runs this host's VMs through libvirt and reports to the console",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a fresh join token (replacing any earlier one; good once, for 24 h) and the key
    /// fingerprint. An enrolled agent offers enrollment only while such a token is unused.
    Token {
        /// The agent's data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// The agent's configuration file, for the host id on a data dir's first use.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Where the agent keeps its identity, templates and VM disks [default: $XDG_DATA_HOME/dunes-agent]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// UDP address to listen on for QUIC.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:7443")]
    pub listen: String,
    /// libvirt URI: test:///default, test:///FILE, qemu:///system, or qemu:///embed (QEMU run by the
    /// agent itself, needs root; its state goes to DATA_DIR/qemu, or ?root=DIR inside the data dir).
    #[arg(long = "libvirt", value_name = "URI", default_value = "qemu:///system")]
    pub libvirt_uri: String,
    /// Configuration file (TOML): host_id, [site], [prices], security_level, stop_timeout_secs.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory holding the tiny guest (vmlinuz, initrd.img, disk.img) for the `tiny` template.
    #[arg(long, value_name = "DIR")]
    pub guest_dir: Option<PathBuf>,
}

fn default_data_dir() -> anyhow::Result<PathBuf> {
    directories::ProjectDirs::from("", "", "dunes-agent")
        .map(|d| d.data_dir().to_path_buf())
        .ok_or_else(|| anyhow::anyhow!("no home directory to put the data dir in; pass --data-dir"))
}

/// Checks a libvirt URI against the forms the agent supports.
pub fn validate_libvirt_uri(uri: &str) -> anyhow::Result<()> {
    let ok = uri.starts_with("test:///")
        || uri == "qemu:///system"
        || uri == "qemu:///session"
        || uri == "qemu:///embed"
        || uri
            .strip_prefix("qemu:///embed?root=")
            .is_some_and(|root| !root.is_empty() && !root.contains(['&', '\0', '\'', '"']));
    if ok {
        Ok(())
    } else {
        anyhow::bail!(
            "unsupported libvirt URI {uri:?}: use test:///default, test:///FILE, qemu:///system, qemu:///embed or qemu:///embed?root=DIR"
        )
    }
}

const NAME: &str = "dunes-agent";

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
    let filter = tracing_subscriber::EnvFilter::try_from_env("DUNES_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Some(Command::Token { data_dir, config }) => token(data_dir, config),
        None => run(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("{NAME}: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}

fn token(data_dir: Option<PathBuf>, config: Option<PathBuf>) -> anyhow::Result<()> {
    let config = match &config {
        Some(path) => AgentConfig::load(path)?,
        None => AgentConfig::default(),
    };
    let data_dir = data_dir.map_or_else(default_data_dir, Ok)?;
    let identity = AgentIdentity::load_or_create(&data_dir, config.host_id.as_ref())?;
    let token = identity.issue_token()?;
    println!("host: {}", identity.host_id);
    println!("fingerprint: {}", identity.fingerprint()?);
    println!("join-token: {token}");
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let listen: SocketAddr = args.listen.parse().map_err(|_| {
        anyhow::anyhow!(
            "invalid --listen address {:?}: expected IP:PORT",
            args.listen
        )
    })?;
    validate_libvirt_uri(&args.libvirt_uri)?;
    let config = match &args.config {
        Some(path) => AgentConfig::load(path)?,
        None => AgentConfig::default(),
    };
    let data_dir = args.data_dir.map_or_else(default_data_dir, Ok)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("dunes-agent")
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let agent = RunningAgent::start(AgentOptions {
            data_dir,
            listen,
            libvirt_uri: args.libvirt_uri.clone(),
            config,
            guest_dir: args.guest_dir,
        })
        .await?;
        // key: value lines, for people and for scripts (the demo reads them).
        println!("host: {}", agent.host_id);
        println!("listening: {}", agent.local_addr);
        println!("libvirt: {}", args.libvirt_uri);
        println!("fingerprint: {}", agent.fingerprint);
        match &agent.join_token {
            Some(token) => println!("join-token: {token}"),
            None => println!("enrolled: yes"),
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        shutdown_signal().await;
        agent.shutdown().await;
        anyhow::Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_uris() {
        for ok in [
            "test:///default",
            "test:///tmp/x.xml",
            "qemu:///system",
            "qemu:///embed",
            "qemu:///embed?root=/var/x",
        ] {
            assert!(validate_libvirt_uri(ok).is_ok(), "{ok}");
        }
        for bad in ["xen:///", "qemu:///embed?root=", "qemu+ssh://h/system", ""] {
            assert!(validate_libvirt_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cli_parses() {
        let cli = Cli::try_parse_from([
            "dunes-agent",
            "--data-dir",
            "/d",
            "--libvirt",
            "test:///default",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        let cli = Cli::try_parse_from(["dunes-agent", "token", "--data-dir", "/d"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Token { .. })));
    }
}
