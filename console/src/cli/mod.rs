//! Command line of `dunes-console`: the window (default), `--headless`, `--demo`, and `ctl`.

mod args;
mod console;
mod ctl;
mod render;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;

pub use args::*;

use crate::{demo, engine};

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

pub(super) fn default_data_dir(demo: bool) -> anyhow::Result<PathBuf> {
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
        Some(TopCommand::Ctl(args)) => ctl::run_ctl(cli.data_dir, args),
        None if cli.connect.is_some() => {
            let credential = cli.connect.expect("matched as given");
            run_remote_window(&credential, cli.data_dir).map(|()| ExitCode::SUCCESS)
        }
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
                Listen {
                    metrics: cli.metrics_listen,
                    operators: cli.operator_listen,
                },
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

/// What the console serves beyond its control socket.
struct Listen {
    metrics: Option<std::net::SocketAddr>,
    operators: Option<std::net::SocketAddr>,
}

fn run_console(
    data_dir: Option<PathBuf>,
    headless: bool,
    with_demo: bool,
    listen: Listen,
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
        crate::ctl::serve(engine.clone()).await?;
        let operators = match listen.operators {
            Some(address) => {
                let endpoint = crate::api::remote::serve(engine.clone(), address).await?;
                eprintln!(
                    "dunes-console: operators (dunes-console ctl operator add) at {}",
                    endpoint.address
                );
                Some(endpoint)
            }
            None => None,
        };
        let metrics = match listen.metrics {
            Some(address) => {
                let server = crate::metrics::serve(
                    crate::api::EngineClient::InProcess(engine.clone()),
                    address,
                )
                .await?;
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
        anyhow::Ok((engine, fleet, (metrics, operators)))
    });
    let (engine, fleet, (_metrics, operators)) = match started {
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
        run_window(runtime.handle(), move |ctx| {
            crate::ui::ConsoleApp::new(ctx, engine)
        })
    };
    if let Some(operators) = operators {
        runtime.block_on(operators.close());
    }
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
const ICON_PNG: &[u8] = include_bytes!("../../../assets/icons/dunes.png");

/// The window on an engine elsewhere, reached with the operator's credential.
fn run_remote_window(
    credential: &std::path::Path,
    data_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let data_dir = data_dir.map_or_else(|| default_data_dir(false), Ok)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("dunes-window")
        .enable_all()
        .build()?;
    let link = runtime
        .block_on(crate::ui::EngineLink::connect(
            credential,
            data_dir.join("exports"),
        ))
        .map_err(|e| anyhow::anyhow!(dunes_shared::error_chain(&e)))?;
    if let crate::ui::LinkStatus::Connected { address, welcome } = link.status() {
        eprintln!(
            "dunes-console: connected to engine {} at {address} as {} {}",
            welcome.engine, welcome.role, welcome.operator
        );
    }
    let result = {
        let _guard = runtime.enter();
        run_window(runtime.handle(), move |ctx| {
            crate::ui::ConsoleApp::with_link(ctx, link)
        })
    };
    runtime.shutdown_timeout(Duration::from_secs(2));
    result
}

fn run_window(
    runtime: &tokio::runtime::Handle,
    app: impl FnOnce(&egui::Context) -> crate::ui::ConsoleApp + 'static,
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
            Ok(Box::new(app(&cc.egui_ctx)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_icon_decodes() {
        let icon = eframe::icon_data::from_png_bytes(ICON_PNG).unwrap();
        assert_eq!((icon.width, icon.height), (256, 256));
    }
}
