//! `ctl vm console`: a VM's serial console on this terminal, like `virsh console`. On a
//! terminal, keys go to the guest as they are typed (raw mode) and Ctrl-] leaves; with stdin
//! from a pipe or a file its text is typed, and ctl leaves once the console has been quiet
//! for a while after it, so scripts can drive a guest's shell.

use std::{
    io::Write as _,
    os::fd::AsFd,
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader},
    net::UnixStream,
};

use crate::api::{Answer, Envelope, ops, remote::RemoteEngine, views::ConsoleSession};

/// The key that leaves: Ctrl-] (group separator), as in telnet and virsh.
const LEAVE: u8 = 0x1d;

/// Puts the terminal back as it was when dropped.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(stdin.as_fd(), rustix::termios::OptionalActions::Now, &raw)
            .ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin().as_fd(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}

/// Attaches to `vm`'s console through the control socket at `socket`.
pub async fn attach_local(
    socket: &Path,
    vm: &str,
    read_only: bool,
    linger: Duration,
) -> anyhow::Result<ExitCode> {
    let data_dir = socket.parent().unwrap_or(socket).display().to_string();
    let stream = UnixStream::connect(socket).await.map_err(|_| {
        anyhow::anyhow!(
            "no console is running on {data_dir} (start dunes-console, or dunes-console --headless)"
        )
    })?;
    let (read, mut write) = stream.into_split();
    let envelope = Envelope::new(&ops::ConsoleVm {
        vm: vm.to_string(),
        read_only,
    })?;
    let mut line = serde_json::to_vec(&envelope)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    let mut reader = BufReader::new(read);
    let mut answer = String::new();
    reader.read_line(&mut answer).await?;
    let answer: Answer = serde_json::from_str(&answer)
        .map_err(|_| anyhow::anyhow!("the console's answer does not parse"))?;
    if let Some(error) = answer.error {
        anyhow::bail!("{}", error.message);
    }
    let session: ConsoleSession = serde_json::from_value(answer.data.unwrap_or_default())?;
    run(session, Vec::new(), reader, &mut write, linger).await
}

/// Attaches to `vm`'s console through an engine's operator endpoint.
pub async fn attach_remote(
    engine: &RemoteEngine,
    vm: &str,
    read_only: bool,
    linger: Duration,
) -> anyhow::Result<ExitCode> {
    let mut streams = engine
        .open_session(&ops::ConsoleVm {
            vm: vm.to_string(),
            read_only,
        })
        .await?;
    let ended = run(
        streams.session,
        streams.early,
        streams.recv,
        &mut streams.send,
        linger,
    )
    .await;
    // The engine ends the session (and frees the keyboard) once it has read the end.
    let _ = tokio::time::timeout(Duration::from_secs(2), streams.send.stopped()).await;
    ended
}

/// The session on this terminal, until it ends or the operator leaves.
async fn run(
    session: ConsoleSession,
    early: Vec<u8>,
    from_console: impl AsyncRead + Unpin,
    to_console: &mut (impl AsyncWrite + Unpin),
    linger: Duration,
) -> anyhow::Result<ExitCode> {
    let terminal = rustix::termios::isatty(std::io::stdin());
    if terminal {
        eprintln!(
            "Connected to {} on {} (Ctrl-] leaves){}",
            session.vm,
            session.host,
            if session.typing {
                ""
            } else {
                "; watching only: another viewer types"
            }
        );
    }
    let raw = terminal.then(RawMode::enter).flatten();
    std::io::stdout().write_all(&early)?;
    let ended = relay(from_console, &mut *to_console, terminal, linger).await;
    // Leaving ends the session at once, not when the link times out.
    let _ = to_console.shutdown().await;
    drop(raw);
    if terminal {
        eprintln!();
    }
    match ended? {
        Ended::Left => Ok(ExitCode::SUCCESS),
        Ended::Closed => {
            eprintln!("dunes-console: the console of {} closed", session.vm);
            Ok(ExitCode::SUCCESS)
        }
    }
}

enum Ended {
    /// The operator left (Ctrl-], or the end of piped input and a quiet console).
    Left,
    /// The console ended: the VM stopped, or the console went away.
    Closed,
}

async fn relay(
    mut from_console: impl AsyncRead + Unpin,
    to_console: &mut (impl AsyncWrite + Unpin),
    terminal: bool,
    linger: Duration,
) -> anyhow::Result<Ended> {
    let mut stdin = tokio::io::stdin();
    let mut stdout = std::io::stdout();
    let (mut keys, mut shown) = (vec![0u8; 1024], vec![0u8; 16 * 1024]);
    let mut stdin_open = true;
    let mut last_output = Instant::now();
    loop {
        // Once piped input has ended: leave after the console has been quiet for `linger`.
        let quiet = async {
            if stdin_open {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep_until((last_output + linger).into()).await;
        };
        tokio::select! {
            n = from_console.read(&mut shown) => {
                let n = n?;
                if n == 0 {
                    return Ok(Ended::Closed);
                }
                stdout.write_all(&shown[..n])?;
                stdout.flush()?;
                last_output = Instant::now();
            }
            n = stdin.read(&mut keys), if stdin_open => {
                let n = n?;
                if n == 0 {
                    if terminal {
                        return Ok(Ended::Left);
                    }
                    stdin_open = false;
                    last_output = Instant::now();
                    continue;
                }
                let typed = &keys[..n];
                if terminal && let Some(at) = typed.iter().position(|b| *b == LEAVE) {
                    to_console.write_all(&typed[..at]).await?;
                    to_console.flush().await?;
                    return Ok(Ended::Left);
                }
                to_console.write_all(typed).await?;
                to_console.flush().await?;
            }
            () = quiet => return Ok(Ended::Left),
        }
    }
}
