//! Applications inside a VM, through qemu-guest-agent: commands run with `guest-exec`, and
//! the processes of each application read from the guest's `/proc` by one such command.

use std::time::{Duration, Instant};

use dunes_shared::protocol::{GuestAppProbe, GuestAppReport, GuestExecReply};
use serde::Deserialize;
use virt::domain::Domain;

/// How long one guest-agent call may take before libvirt gives up on it.
const AGENT_CALL_TIMEOUT_SECS: i32 = 5;
/// How long a check command may run.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Between two looks at a running command.
const STATUS_EVERY: Duration = Duration::from_millis(50);
/// What a check's output is cut to in a report.
const DETAIL_MAX_CHARS: usize = 160;
/// Clock ticks per second of `/proc/PID/stat` (USER_HZ: 100 in every Linux ABI Dunes runs).
const USER_HZ: u64 = 100;

/// Prints `P COMM UTIME STIME RSS_KIB` for every process whose name is one of the arguments.
/// The names travel as arguments, never inside the script, so no name needs quoting.
const PROCESSES_SCRIPT: &str = r#"f() { echo "P $c ${12} ${13} $r"; }
for p in /proc/[0-9]*; do
  read -r c < "$p/comm" 2>/dev/null || continue
  for n in "$@"; do
    [ "$c" = "$n" ] || continue
    s=$(cat "$p/stat" 2>/dev/null) || continue
    r=0
    while read -r k v _; do [ "$k" = VmRSS: ] && r=$v; done < "$p/status"
    f ${s##*") "}
  done
done"#;

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("the guest agent does not answer: {0}")]
    Agent(String),
    #[error("the guest agent answered what Dunes cannot read: {0}")]
    Reply(String),
}

/// A command that ran in the guest.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// `None` while still running at the deadline; a command killed by a signal has none
    /// either, and says which in `signal`.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

#[derive(Deserialize)]
struct Reply<T> {
    #[serde(rename = "return")]
    value: T,
}

#[derive(Deserialize)]
struct Pid {
    pid: i64,
}

#[derive(Deserialize)]
struct ExecStatus {
    exited: bool,
    #[serde(default)]
    exitcode: Option<i32>,
    #[serde(default)]
    signal: Option<i32>,
    #[serde(rename = "out-data", default)]
    out_data: Option<String>,
    #[serde(rename = "err-data", default)]
    err_data: Option<String>,
}

fn agent_call(dom: &Domain, command: &serde_json::Value) -> Result<String, GuestError> {
    dom.qemu_agent_command(&command.to_string(), AGENT_CALL_TIMEOUT_SECS, 0)
        .map_err(|e| GuestError::Agent(e.message().to_string()))
}

fn decode(data: Option<String>) -> Result<Vec<u8>, GuestError> {
    data.map_or(Ok(Vec::new()), |d| {
        data_encoding::BASE64
            .decode(d.as_bytes())
            .map_err(|e| GuestError::Reply(format!("output is not base64: {e}")))
    })
}

/// Starts `path args…` in the guest.
fn start(dom: &Domain, path: &str, args: &[&str]) -> Result<i64, GuestError> {
    let answer = agent_call(
        dom,
        &serde_json::json!({
            "execute": "guest-exec",
            "arguments": {"path": path, "arg": args, "capture-output": true},
        }),
    )?;
    serde_json::from_str::<Reply<Pid>>(&answer)
        .map(|r| r.value.pid)
        .map_err(|e| GuestError::Reply(e.to_string()))
}

/// Looks at a started command: `None` while it runs.
fn status(dom: &Domain, pid: i64) -> Result<Option<Finished>, GuestError> {
    let answer = agent_call(
        dom,
        &serde_json::json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}),
    )?;
    let s = serde_json::from_str::<Reply<ExecStatus>>(&answer)
        .map_err(|e| GuestError::Reply(e.to_string()))?
        .value;
    if !s.exited {
        return Ok(None);
    }
    Ok(Some(Finished {
        exit_code: s.exitcode,
        signal: s.signal,
        stdout: decode(s.out_data)?,
        stderr: decode(s.err_data)?,
    }))
}

/// Runs each `(path, args)` in the guest side by side and waits for all of them, at most
/// `timeout`; those still running then are reported as such and left to run.
pub fn run_all(
    dom: &Domain,
    commands: &[(&str, Vec<&str>)],
    timeout: Duration,
) -> Result<Vec<Finished>, GuestError> {
    let deadline = Instant::now() + timeout;
    let pids = commands
        .iter()
        .map(|(path, args)| start(dom, path, args))
        .collect::<Result<Vec<_>, _>>()?;
    let mut done: Vec<Option<Finished>> = vec![None; pids.len()];
    loop {
        for (slot, pid) in done.iter_mut().zip(&pids) {
            if slot.is_none() {
                *slot = status(dom, *pid)?;
            }
        }
        if done.iter().all(Option::is_some) || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(STATUS_EVERY);
    }
    Ok(done
        .into_iter()
        .map(|d| {
            d.unwrap_or(Finished {
                exit_code: None,
                signal: None,
                stdout: Vec::new(),
                stderr: Vec::new(),
            })
        })
        .collect())
}

/// Runs one shell command in the guest.
pub fn exec(dom: &Domain, command: &str, timeout: Duration) -> Result<GuestExecReply, GuestError> {
    let mut out = run_all(dom, &[("/bin/sh", vec!["-c", command])], timeout)?;
    let f = out.remove(0);
    Ok(GuestExecReply {
        exit_code: f.exit_code.or(f.signal.map(|s| 128 + s)),
        stdout: String::from_utf8_lossy(&f.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&f.stderr).into_owned(),
    })
}

/// One guest pass for `apps`: their processes, and each check.
pub fn apps_status(
    dom: &Domain,
    apps: &[GuestAppProbe],
) -> Result<Vec<GuestAppReport>, GuestError> {
    let names: Vec<&str> = apps.iter().filter_map(|a| a.process.as_deref()).collect();
    let mut commands: Vec<(&str, Vec<&str>)> = Vec::new();
    if !names.is_empty() {
        let mut args = vec!["-c", PROCESSES_SCRIPT, "dunes-ps"];
        args.extend(&names);
        commands.push(("/bin/sh", args));
    }
    for check in apps.iter().filter_map(|a| a.check.as_deref()) {
        commands.push(("/bin/sh", vec!["-c", check]));
    }
    let mut outcomes = run_all(dom, &commands, CHECK_TIMEOUT)?.into_iter();
    let processes = if names.is_empty() {
        Vec::new()
    } else {
        let ps = outcomes.next().unwrap_or_else(|| Finished {
            exit_code: None,
            signal: None,
            stdout: Vec::new(),
            stderr: Vec::new(),
        });
        if ps.exit_code.is_none() {
            return Err(GuestError::Reply(
                "the process listing did not finish in time".into(),
            ));
        }
        parse_processes(&String::from_utf8_lossy(&ps.stdout))
    };
    Ok(apps
        .iter()
        .map(|app| {
            let mut report = GuestAppReport {
                app: app.app.clone(),
                processes: 0,
                cpu_ns: 0,
                rss_kib: 0,
                check_passed: None,
                detail: String::new(),
            };
            if let Some(name) = &app.process {
                for p in processes.iter().filter(|p| &p.name == name) {
                    report.processes += 1;
                    report.cpu_ns += p.cpu_ticks * (1_000_000_000 / USER_HZ);
                    report.rss_kib += p.rss_kib;
                }
                report.detail = match report.processes {
                    0 => format!("no process {name} runs"),
                    1 => format!("process {name} runs"),
                    n => format!("{n} processes {name} run"),
                };
            }
            if app.check.is_some() {
                let f = outcomes.next();
                let (passed, said) = match &f {
                    Some(Finished {
                        exit_code: Some(0), ..
                    }) => (true, "check passed".to_string()),
                    Some(Finished {
                        exit_code: Some(code),
                        ..
                    }) => (false, format!("check exited {code}")),
                    Some(Finished {
                        signal: Some(sig), ..
                    }) => (false, format!("check killed by signal {sig}")),
                    _ => (
                        false,
                        format!("check still running after {} s", CHECK_TIMEOUT.as_secs()),
                    ),
                };
                let output = f
                    .map(|f| last_line(&f.stdout, &f.stderr))
                    .unwrap_or_default();
                report.check_passed = Some(passed);
                let said = if output.is_empty() {
                    said
                } else {
                    format!("{said}: {output}")
                };
                report.detail = if report.detail.is_empty() {
                    said
                } else {
                    format!("{}; {said}", report.detail)
                };
            }
            report
        })
        .collect())
}

/// One process of the listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestProcess {
    pub name: String,
    pub cpu_ticks: u64,
    pub rss_kib: u64,
}

/// Reads the lines of [`PROCESSES_SCRIPT`]; a line that does not read is skipped (a process
/// that went away half-read).
pub fn parse_processes(text: &str) -> Vec<GuestProcess> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("P ")?;
            let mut fields = rest.rsplitn(4, ' ');
            let rss_kib = fields.next()?.parse().ok()?;
            let stime: u64 = fields.next()?.parse().ok()?;
            let utime: u64 = fields.next()?.parse().ok()?;
            let name = fields.next()?.to_string();
            Some(GuestProcess {
                name,
                cpu_ticks: utime.saturating_add(stime),
                rss_kib,
            })
        })
        .collect()
}

/// The last non-empty line a command printed (stderr first), cut short.
fn last_line(stdout: &[u8], stderr: &[u8]) -> String {
    let pick = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_string)
    };
    let line = pick(stderr).or_else(|| pick(stdout)).unwrap_or_default();
    if line.chars().count() > DETAIL_MAX_CHARS {
        let cut: String = line.chars().take(DETAIL_MAX_CHARS).collect();
        format!("{cut}…")
    } else {
        line
    }
}

#[derive(Deserialize)]
struct GuestInterface {
    name: String,
    #[serde(rename = "ip-addresses", default)]
    ip_addresses: Vec<GuestAddress>,
}

#[derive(Deserialize)]
struct GuestAddress {
    #[serde(rename = "ip-address")]
    address: String,
    prefix: u8,
}

/// The guest's addresses as `ADDRESS/PREFIX`, from `guest-network-get-interfaces`, without
/// loopback and IPv6 link-local ones (they say nothing about where the VM is reached).
pub fn addresses(dom: &Domain, timeout_secs: i32) -> Result<Vec<String>, GuestError> {
    let answer = dom
        .qemu_agent_command(
            r#"{"execute":"guest-network-get-interfaces"}"#,
            timeout_secs,
            0,
        )
        .map_err(|e| GuestError::Agent(e.message().to_string()))?;
    parse_addresses(&answer)
}

pub fn parse_addresses(answer: &str) -> Result<Vec<String>, GuestError> {
    let interfaces = serde_json::from_str::<Reply<Vec<GuestInterface>>>(answer)
        .map_err(|e| GuestError::Reply(e.to_string()))?
        .value;
    let mut out = Vec::new();
    for interface in interfaces.iter().filter(|i| i.name != "lo") {
        for a in &interface.ip_addresses {
            let Ok(ip) = a.address.parse::<std::net::IpAddr>() else {
                continue;
            };
            let link_local = match ip {
                std::net::IpAddr::V4(v4) => v4.is_link_local(),
                std::net::IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
            };
            if !ip.is_loopback() && !link_local {
                out.push(format!("{ip}/{}", a.prefix));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_addresses_leave_out_loopback_and_link_local() {
        let answer = r#"{"return":[
            {"name":"lo","ip-addresses":[{"ip-address-type":"ipv4","ip-address":"127.0.0.1","prefix":8}]},
            {"name":"eth0","hardware-address":"52:54:00:12:34:56","ip-addresses":[
                {"ip-address-type":"ipv4","ip-address":"10.0.2.15","prefix":24},
                {"ip-address-type":"ipv6","ip-address":"fe80::5054:ff:fe12:3456","prefix":64},
                {"ip-address-type":"ipv6","ip-address":"fec0::5054:ff:fe12:3456","prefix":64}]},
            {"name":"eth1"}]}"#;
        assert_eq!(
            parse_addresses(answer).unwrap(),
            vec!["10.0.2.15/24", "fec0::5054:ff:fe12:3456/64"]
        );
        assert!(parse_addresses(r#"{"error":{"class":"x"}}"#).is_err());
    }

    #[test]
    fn the_process_listing_reads_names_with_spaces_and_skips_torn_lines() {
        let text = "P httpd 12 3 1024\nP my worker 5 5 2048\nP half 1\nnoise\nP httpd 1 1 512\n";
        assert_eq!(
            parse_processes(text),
            vec![
                GuestProcess {
                    name: "httpd".into(),
                    cpu_ticks: 15,
                    rss_kib: 1024
                },
                GuestProcess {
                    name: "my worker".into(),
                    cpu_ticks: 10,
                    rss_kib: 2048
                },
                GuestProcess {
                    name: "httpd".into(),
                    cpu_ticks: 2,
                    rss_kib: 512
                },
            ]
        );
    }

    #[test]
    fn the_listing_script_reads_this_machines_proc() {
        // The script runs unchanged under the host's sh: it must find this test's own
        // process by its name, with a CPU time and a resident size.
        let me = std::fs::read_to_string("/proc/self/comm").unwrap();
        let me = me.trim();
        let out = std::process::Command::new("/bin/sh")
            .args(["-c", PROCESSES_SCRIPT, "dunes-ps", me, "no-such-process"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let found = parse_processes(&String::from_utf8_lossy(&out.stdout));
        assert!(!found.is_empty(), "{out:?}");
        assert!(found.iter().all(|p| p.name == me));
        assert!(found.iter().any(|p| p.rss_kib > 0));
    }

    #[test]
    fn a_checks_detail_is_its_last_line_cut_short() {
        assert_eq!(last_line(b"a\nb\n\n", b""), "b");
        assert_eq!(last_line(b"out\n", b"err: refused\n"), "err: refused");
        let long = "x".repeat(500);
        assert_eq!(
            last_line(long.as_bytes(), b"").chars().count(),
            DETAIL_MAX_CHARS + 1
        );
    }
}
