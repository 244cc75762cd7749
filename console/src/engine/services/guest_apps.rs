//! Applications inside VMs: every few seconds, each running instance
//! whose application holds guest applications is asked, through its agent and the VM's guest
//! agent, how they are: their processes, their checks, their CPU and memory. The answers make
//! the instance's guest application views, count in the service's status, and feed the
//! statistics of those applications.

use std::time::Duration;

use dunes_shared::{
    protocol::{GuestAppProbe, GuestAppsReply},
    service::GuestAppSpec,
};

/// How often the applications inside VMs are looked at.
pub(in crate::engine) const GUEST_APPS_EVERY: Duration = Duration::from_secs(5);

/// How a guest application stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum GuestAppState {
    /// Its process runs and its check passes (each as far as it has them).
    Up,
    /// Its process is gone or its check fails.
    Down,
    /// Not known: the VM does not run, its guest agent does not answer, or no look yet.
    Unknown,
}

impl GuestAppState {
    pub fn as_str(self) -> &'static str {
        match self {
            GuestAppState::Up => "up",
            GuestAppState::Down => "down",
            GuestAppState::Unknown => "unknown",
        }
    }
}

/// A guest application in one instance's VM, as the snapshot shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GuestAppView {
    pub name: dunes_shared::model::AppName,
    pub state: GuestAppState,
    /// What the last look saw ("process worker runs; check passed"), or why there is none.
    pub detail: String,
    pub processes: u32,
    /// CPU of its processes, in % of the VM, between the last two looks.
    pub cpu_percent: Option<f64>,
    pub memory_mib: Option<f64>,
}

/// The last look at one instance's guest applications.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestLook {
    pub answer: Result<GuestAppsReply, String>,
    /// CPU of each application between this look and the one before, in % of the VM.
    pub cpu_percent: Vec<(String, f64)>,
}

/// The probe the agent gets for a guest application of the service file.
pub fn probe_of_guest_app(app: &GuestAppSpec) -> GuestAppProbe {
    GuestAppProbe {
        app: app.name.to_string(),
        process: app.process.clone(),
        check: app.check.clone(),
    }
}

/// The views of an instance's guest applications from its last look; every one is unknown
/// while the VM does not run.
pub fn guest_app_views(
    apps: &[GuestAppSpec],
    running: bool,
    look: Option<&GuestLook>,
) -> Vec<GuestAppView> {
    apps.iter()
        .map(|app| {
            let unknown = |detail: String| GuestAppView {
                name: app.name.clone(),
                state: GuestAppState::Unknown,
                detail,
                processes: 0,
                cpu_percent: None,
                memory_mib: None,
            };
            if !running {
                return unknown("its VM does not run".into());
            }
            let (reply, cpu) = match look {
                None => return unknown("not looked at yet".into()),
                Some(GuestLook { answer: Err(e), .. }) => return unknown(e.clone()),
                Some(GuestLook {
                    answer: Ok(reply),
                    cpu_percent,
                }) => (reply, cpu_percent),
            };
            let Some(report) = reply.apps.iter().find(|r| r.app == app.name.as_str()) else {
                return unknown("the agent did not report it".into());
            };
            let process_ok = app.process.is_none() || report.processes > 0;
            let check_ok = app.check.is_none() || report.check_passed == Some(true);
            GuestAppView {
                name: app.name.clone(),
                state: if process_ok && check_ok {
                    GuestAppState::Up
                } else {
                    GuestAppState::Down
                },
                detail: report.detail.clone(),
                processes: report.processes,
                cpu_percent: cpu
                    .iter()
                    .find(|(a, _)| a == app.name.as_str())
                    .map(|(_, c)| *c),
                memory_mib: app
                    .process
                    .is_some()
                    .then_some(report.rss_kib as f64 / 1024.0),
            }
        })
        .collect()
}

/// CPU of each application between two looks, in % of the VM's vCPUs; none for an
/// application whose CPU time went down (its processes started again).
pub fn cpu_between(before: &GuestAppsReply, now: &GuestAppsReply) -> Vec<(String, f64)> {
    if now.at_unix_ms <= before.at_unix_ms || now.vcpus == 0 {
        return Vec::new();
    }
    let secs = (now.at_unix_ms - before.at_unix_ms) as f64 / 1000.0;
    now.apps
        .iter()
        .filter_map(|r| {
            let b = before.apps.iter().find(|b| b.app == r.app)?;
            let used = r.cpu_ns.checked_sub(b.cpu_ns)? as f64 / 1e9;
            Some((r.app.clone(), used / secs / f64::from(now.vcpus) * 100.0))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use dunes_shared::{model::AppName, protocol::GuestAppReport};

    use super::*;

    fn spec(name: &str, process: Option<&str>, check: Option<&str>) -> GuestAppSpec {
        GuestAppSpec {
            name: AppName::new(name).unwrap(),
            process: process.map(Into::into),
            check: check.map(Into::into),
        }
    }

    fn report(app: &str, processes: u32, cpu_ns: u64, check: Option<bool>) -> GuestAppReport {
        GuestAppReport {
            app: app.into(),
            processes,
            cpu_ns,
            rss_kib: 2048,
            check_passed: check,
            detail: format!("{app} seen"),
        }
    }

    fn reply(at_unix_ms: u64, apps: Vec<GuestAppReport>) -> GuestAppsReply {
        GuestAppsReply {
            at_unix_ms,
            vcpus: 2,
            apps,
        }
    }

    #[test]
    fn an_application_is_up_only_when_its_process_runs_and_its_check_passes() {
        let apps = [
            spec("web", Some("httpd"), Some("wget -q -O- localhost")),
            spec("worker", Some("worker"), None),
            spec("probe", None, Some("true")),
            spec("cron", Some("crond"), None),
        ];
        let answer = GuestLook {
            cpu_percent: Vec::new(),
            answer: Ok(reply(
                1000,
                vec![
                    report("web", 1, 0, Some(false)),
                    report("worker", 0, 0, None),
                    report("probe", 0, 0, Some(true)),
                ],
            )),
        };
        let views = guest_app_views(&apps, true, Some(&answer));
        let states: Vec<_> = views.iter().map(|v| v.state).collect();
        assert_eq!(
            states,
            [
                GuestAppState::Down,
                GuestAppState::Down,
                GuestAppState::Up,
                GuestAppState::Unknown
            ]
        );
        assert_eq!(views[1].memory_mib, Some(2.0));
        assert_eq!(views[2].memory_mib, None);
        // A VM that stopped, a guest agent that does not answer: unknown, with the reason.
        let views = guest_app_views(&apps, false, Some(&answer));
        assert!(views.iter().all(|v| v.state == GuestAppState::Unknown));
        assert_eq!(views[0].detail, "its VM does not run");
        let failed = GuestLook {
            answer: Err("the guest agent does not answer: timeout".to_string()),
            cpu_percent: Vec::new(),
        };
        let views = guest_app_views(&apps, true, Some(&failed));
        assert!(views.iter().all(|v| v.state == GuestAppState::Unknown));
        assert_eq!(views[3].detail, "the guest agent does not answer: timeout");
    }

    #[test]
    fn cpu_is_the_share_of_the_vm_between_two_looks() {
        let before = reply(
            10_000,
            vec![
                report("web", 1, 1_000_000_000, None),
                report("w", 1, 500, None),
            ],
        );
        // 1 s of CPU over 5 s on 2 vCPUs: 10 %; `w` started again (its time went down).
        let now = reply(
            15_000,
            vec![
                report("web", 1, 2_000_000_000, None),
                report("w", 1, 100, None),
            ],
        );
        let cpu = cpu_between(&before, &now);
        assert_eq!(cpu.len(), 1);
        assert_eq!(cpu[0].0, "web");
        assert!((cpu[0].1 - 10.0).abs() < 1e-9);
        assert!(cpu_between(&now, &before).is_empty());
    }
}
