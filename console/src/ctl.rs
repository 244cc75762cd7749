//! `dunes-console ctl`: a local control socket in the data dir (owner-only), one JSON request
//! line and one JSON response line per connection.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use dunes_shared::{
    model::{AppName, HostId, ServiceName, TemplateName, VmName, VmSpec, VmStatus},
    pki::Fingerprint,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::engine::{
    AutoscaleView, Command, EngineError, EngineHandle, HostView, OperationReport, ServicePlan,
    ServiceView, Snapshot,
    autoscale::{AutoscaleMetric, AutoscaleRule, Change},
    capacity::{Extra, SiteCapacity, WhatIf},
    cost::CostBy,
    forecast::Outlook,
    placement::{Action, Override},
    snapshot::rfc3339,
    stats::{StatsAnswer, Subject},
};

/// `SERVICE/APP` as names.
fn service_app(target: &str) -> Result<(ServiceName, AppName), String> {
    let (service, app) = target
        .split_once('/')
        .ok_or_else(|| format!("{target:?}: name the application as SERVICE/APP"))?;
    Ok((
        ServiceName::new(service).map_err(|e| e.to_string())?,
        AppName::new(app).map_err(|e| e.to_string())?,
    ))
}

fn autoscale_json(view: &AutoscaleView) -> Value {
    json!({
        "service": view.service.as_str(),
        "app": view.app.as_str(),
        "rule": view.rule.describe(),
        "metric": view.rule.metric.as_str(),
        "scale_out_above": view.rule.scale_out_above,
        "scale_in_below": view.rule.scale_in_below,
        "period_secs": view.rule.period_secs,
        "periods": view.rule.periods,
        "cooldown_secs": view.rule.cooldown_secs,
        "min_instances": view.rule.min_instances,
        "max_instances": view.rule.max_instances,
        "desired": view.desired,
        "instances": view.instances,
        "last_change": view.last_change_secs,
        "last_reason": view.last_reason,
    })
}

/// Capacity per site as `ctl forecast --json` prints it.
fn capacity_json<'a>(sites: impl IntoIterator<Item = &'a SiteCapacity>) -> Value {
    Value::Array(
        sites
            .into_iter()
            .map(|s| {
                json!({
                    "site": s.site,
                    "hosts": s.hosts.iter().map(|h| h.as_str()).collect::<Vec<_>>(),
                    "resources": s.resources.iter().map(|r| {
                        let forecast = r.forecast.as_ref().map(|f| {
                            let (days, earliest, latest) = match &f.outlook {
                                Outlook::Full { days, earliest, latest } => {
                                    (Some(*days), Some(*earliest), *latest)
                                }
                                Outlook::AlreadyFull => (Some(0.0), Some(0.0), Some(0.0)),
                                _ => (None, None, None),
                            };
                            json!({
                                "text": f.describe(&format!("{} {}", s.site, r.resource.as_str())),
                                "method": f.method.describe(),
                                "full_in_days": days,
                                "earliest_days": earliest,
                                "latest_days": latest,
                                "slope_per_day": f.slope_per_day,
                                "daily_peaks": f.points,
                            })
                        });
                        json!({
                            "resource": r.resource.as_str(),
                            "unit": r.resource.unit(),
                            "capacity": r.capacity,
                            "allocated": r.allocated,
                            "used": r.used,
                            "free": r.free(),
                            "fits": r.allocated <= r.capacity,
                            "forecast": forecast,
                        })
                    }).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

/// Capacity of `sites` now and after a what-if, with `head`'s fields on top.
async fn what_if_json(
    engine: &EngineHandle,
    what_if: WhatIf,
    sites: &[String],
    mut head: Value,
) -> Result<Value, String> {
    let before = engine
        .request(|reply| Command::Capacity {
            what_if: WhatIf::default(),
            reply,
        })
        .await
        .map_err(engine_err)?;
    let after = engine
        .request(|reply| Command::Capacity { what_if, reply })
        .await
        .map_err(engine_err)?;
    let of = |all: &[SiteCapacity]| capacity_json(all.iter().filter(|s| sites.contains(&s.site)));
    let fits = after
        .iter()
        .filter(|s| sites.contains(&s.site))
        .all(|s| s.resources.iter().all(|r| r.allocated <= r.capacity));
    head["before"] = of(&before);
    head["after"] = of(&after);
    head["fits"] = Value::Bool(fits);
    Ok(head)
}

/// A time-series answer as `ctl stats --json` prints it.
fn stats_json(answer: &StatsAnswer) -> Value {
    let subject = answer.subject.describe();
    json!({
        "subject": subject,
        "resolution_secs": answer.resolution_secs,
        "from": answer.from_secs,
        "to": answer.to_secs,
        "series": answer.series.iter().map(|s| json!({
            "metric": s.metric.as_str(),
            "unit": s.metric.unit(),
            "points": s.points.iter().map(|b| json!({
                "t": b.start_secs, "min": b.min, "mean": b.mean(), "max": b.max,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

pub const SOCKET_NAME: &str = "ctl.sock";
/// How long a client gets to send its request line.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request line accepted (a service file travels in one).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum CtlRequest {
    Hosts,
    Vms,
    Events {
        limit: usize,
    },
    HostProbe {
        address: String,
    },
    HostAdd {
        address: String,
        token: String,
        fingerprint: Option<String>,
        #[serde(default)]
        replace: bool,
    },
    VmCreate {
        name: String,
        template: String,
        host: String,
        vcpus: Option<u32>,
        memory_mib: Option<u64>,
        start: bool,
    },
    VmStart {
        vm: String,
    },
    /// Reboot, pause or resume.
    VmPower {
        vm: String,
        action: dunes_shared::protocol::PowerAction,
    },
    VmStop {
        vm: String,
        force: bool,
    },
    /// vCPUs, memory or autostart; what is absent stays.
    VmSet {
        vm: String,
        #[serde(default)]
        vcpus: Option<u32>,
        #[serde(default)]
        memory_mib: Option<u64>,
        #[serde(default)]
        autostart: Option<bool>,
    },
    VmClone {
        vm: String,
        name: String,
        /// Another host the copy then migrates to.
        #[serde(default)]
        to: Option<String>,
    },
    VmSnapshot {
        vm: String,
        action: dunes_shared::protocol::SnapshotAction,
        #[serde(default)]
        snapshot: Option<String>,
    },
    VmExec {
        vm: String,
        command: String,
        timeout_secs: u32,
    },
    VmDelete {
        vm: String,
    },
    VmMigrate {
        /// NAME, or HOST/NAME.
        vm: String,
        to: String,
        /// Only the pre-check and the estimate.
        #[serde(default)]
        dry_run: bool,
        /// At most this many Mbit/s for the disk stream.
        #[serde(default)]
        limit_mbps: Option<u32>,
        /// Compress the stream or not; unset: when it crosses to or from a remote site.
        #[serde(default)]
        compress: Option<bool>,
    },
    Migrations,
    Forecast {
        #[serde(default)]
        site: Option<String>,
    },
    AutoscaleSet {
        target: String,
        /// `cpu` (also when empty: a ctl from before metrics were named) or `app-metric`.
        #[serde(default)]
        metric: String,
        above: f64,
        below: f64,
        period_secs: u64,
        periods: u32,
        cooldown_secs: u64,
        min: u32,
        max: u32,
    },
    AutoscaleShow,
    Cost {
        by: String,
        since_secs: u64,
    },
    AutoscaleReplay {
        target: String,
        since_secs: u64,
    },
    AutoscaleRemove {
        target: String,
    },
    WhatifDrain {
        host: String,
    },
    WhatifDeploy {
        name: String,
    },
    Stats {
        subject: String,
        since_secs: u64,
        #[serde(default)]
        resolution_secs: Option<u64>,
    },
    HostDrain {
        host: String,
        #[serde(default)]
        pause: bool,
    },
    HostUndrain {
        host: String,
    },
    ServiceMove {
        name: String,
        site: String,
    },
    MigrationCancel {
        id: u64,
    },
    Services,
    ServiceCreate {
        /// The service file's text.
        source: String,
        #[serde(default)]
        replace: bool,
    },
    ServicePlan {
        name: String,
        /// `APP-INDEX=HOST`: instances placed by hand.
        #[serde(default)]
        place: Vec<String>,
    },
    ServiceShow {
        name: String,
    },
    ServiceDelete {
        name: String,
    },
    ServiceDeploy {
        name: String,
        #[serde(default)]
        fingerprint: Option<String>,
        #[serde(default)]
        place: Vec<String>,
    },
    ServiceStart {
        name: String,
    },
    ServiceStop {
        name: String,
    },
    ServiceAdopt {
        name: String,
        app: String,
        /// NAME, or HOST/NAME.
        vm: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CtlResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("another console is already running on {0}")]
    AlreadyRunning(String),
    #[error("cannot open the control socket {path}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no console is running on {0} (start dunes-console, or dunes-console --headless)")]
    NotRunning(String),
    #[error("the control socket failed")]
    Io(#[from] std::io::Error),
    #[error("the console's answer does not parse")]
    BadResponse(#[from] serde_json::Error),
}

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

/// Binds the socket (mode 0600) and serves it until the engine stops.
pub async fn serve(engine: EngineHandle) -> Result<tokio::task::JoinHandle<()>, CtlError> {
    let path = socket_path(engine.data_dir());
    let shown = path.display().to_string();
    if path.exists() {
        if UnixStream::connect(&path).await.is_ok() {
            return Err(CtlError::AlreadyRunning(
                engine.data_dir().display().to_string(),
            ));
        }
        // A socket left by a console that died.
        let _ = std::fs::remove_file(&path);
    }
    let listener = UnixListener::bind(&path).map_err(|source| CtlError::Bind {
        path: shown.clone(),
        source,
    })?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        CtlError::Bind {
            path: shown,
            source,
        }
    })?;
    Ok(tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let engine = engine.clone();
            tokio::spawn(async move {
                let _ = serve_one(engine, stream).await;
            });
        }
    }))
}

async fn serve_one(engine: EngineHandle, stream: UnixStream) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(
        read,
        MAX_REQUEST_BYTES as u64,
    ));
    let mut line = String::new();
    // A client that connects and says nothing does not hold a task forever.
    tokio::time::timeout(REQUEST_READ_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let response = match serde_json::from_str::<CtlRequest>(&line) {
        Ok(request) => match handle(&engine, request).await {
            Ok(data) => CtlResponse {
                ok: true,
                data: Some(data),
                error: None,
            },
            Err(error) => CtlResponse {
                ok: false,
                data: None,
                error: Some(error),
            },
        },
        Err(e) => CtlResponse {
            ok: false,
            data: None,
            error: Some(format!("bad request: {e}")),
        },
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

pub fn host_json(h: &HostView) -> Value {
    let inv = h.inventory();
    json!({
        "id": h.id(),
        "name": inv.map(|i| i.hostname.clone()),
        "address": h.record.address,
        "site": h.site_name(),
        "remote": h.is_remote(),
        "state": h.link.as_str(),
        "link_error": h.link_error,
        "fingerprint": h.record.fingerprint.to_string(),
        "cert_expires": h.cert_expires().map(crate::engine::snapshot::rfc3339),
        "skipped_events": h.skipped_events,
        "cpus": inv.map(|i| i.cpus),
        "sizes_from": inv.map(|i| i.sizes_from.as_str()),
        "memory_mib": inv.map(|i| i.memory_mib),
        "storage_total_mib": inv.map(|i| i.storage_total_mib),
        "storage_free_mib": inv.map(|i| i.storage_free_mib),
        "runtimes": inv.map(|i| i.runtimes.iter().map(|r| r.kind.as_str()).collect::<Vec<_>>()).unwrap_or_default(),
        "runtime_details": inv.map(|i| i.runtimes.iter().map(|r| json!({"kind": r.kind.as_str(), "driver": r.driver, "version": r.version, "limits": r.limits, "users": r.users})).collect::<Vec<_>>()).unwrap_or_default(),
        "interpreters": inv.map(|i| i.interpreters.iter().map(|x| json!({"name": x.name, "version": x.version})).collect::<Vec<_>>()).unwrap_or_default(),
        "security_level": inv.map(|i| i.security_level),
        "prices": inv.map(|i| i.prices),
        "vms": h.vms.len(),
    })
}

/// A host's maintenance mark and its drain: `null` when it is not in maintenance.
pub fn maintenance_json(
    host: &HostView,
    drain: Option<&crate::engine::evacuation::DrainProgress>,
) -> Value {
    let Some(m) = host.record.maintenance else {
        return Value::Null;
    };
    let mut shown = drain.map_or_else(|| json!({}), drain_json);
    shown["since"] = json!(rfc3339(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(m.since_ms)
    ));
    shown["paused"] = json!(m.paused);
    shown
}

pub fn drain_json(d: &crate::engine::evacuation::DrainProgress) -> Value {
    json!({
        "host": d.host,
        "paused": d.paused,
        "moved": d.moved,
        "remaining": d.remaining,
        "migrating": d.migrating,
        "settled": d.is_settled(),
        "blocked": d.blocked.iter().map(|b| json!({"vm": b.vm, "reason": b.reason})).collect::<Vec<_>>(),
    })
}

pub fn move_json(m: &crate::engine::ServiceMove) -> Value {
    json!({
        "site": m.site,
        "phase": m.phase.as_str(),
        "was_running": m.was_running,
        "error": m.error,
    })
}

pub fn vm_json(host: &HostId, vm: &VmStatus) -> Value {
    json!({
        "id": vm.uuid,
        "name": vm.name,
        "host": host,
        "state": vm.state.as_str(),
        "vcpus": vm.vcpus,
        "memory_mib": vm.memory_mib,
        "template": vm.template,
        "disk_bytes": vm.disk_bytes,
        "overlay_on": vm.overlay_on.as_ref().map(|t| json!({
            "template": t.template, "blake3": t.blake3,
        })),
        // Its disks as its agent holds them (null from an agent that does not say).
        "disks": vm.disks,
        "nics": vm.nics,
        // From its guest agent while it runs; null when nobody answered.
        "addresses": vm.addresses,
        "autostart": vm.autostart,
        // The vCPUs and memory its next start brings, when they differ from now's.
        "next_start": vm.next_start,
        "snapshots": vm.snapshots,
    })
}

/// What an operation did; an error naming each instance that failed when one did, so that
/// nothing is left half-done without being said.
fn report_json(report: &OperationReport) -> Result<Value, String> {
    if !report.failed.is_empty() {
        return Err(format!(
            "{} of {} steps failed: {}",
            report.failed.len(),
            report.failed.len() + report.done.len(),
            report
                .failed
                .iter()
                .map(|(i, why)| format!("{i}: {why}"))
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    Ok(json!({
        "done": report.done.iter().map(|(instance, host, what)| json!({
            "instance": instance, "host": host, "result": what,
        })).collect::<Vec<_>>(),
    }))
}

/// A service for `services --json`: its name, status, applications and cost per hour (of its
/// instances once deployed; of its plan before).
pub fn service_json(view: &ServiceView, plan: Option<&ServicePlan>) -> Value {
    let defined_at =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(view.record.defined_at_ms);
    match &view.spec {
        Ok(spec) => json!({
            "name": view.name(),
            "status": view.status.as_str(),
            "instances": view.instances.iter().map(|i| json!({
                "instance": format!("{}-{}", i.record.app, i.record.index),
                "application": i.record.app,
                "host": i.record.host,
                "vm": i.record.vm,
                "state": i.record.state.as_str(),
                "vm_state": i.vm_state.map(|s| s.as_str()),
                "ready": i.ready,
                "ready_detail": i.ready_detail,
                "adopted": i.record.adopted,
                "cost_per_hour": i.cost_per_hour,
                "metric": i.metric.as_ref().map(|m| match m {
                    Ok(v) => json!({"value": v}),
                    Err(e) => json!({"error": e}),
                }),
                "guest_apps": i.guest_apps.iter().map(|g| json!({
                    "name": g.name,
                    "state": g.state.as_str(),
                    "detail": g.detail,
                    "processes": g.processes,
                    "cpu_percent": g.cpu_percent,
                    "memory_mib": g.memory_mib,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "defined_at": rfc3339(defined_at),
            "moving": view.record.moving.as_ref().map(move_json),
            "applications": spec.applications.iter().map(|a| json!({
                "name": a.name,
                "runtime": a.runtime.as_str(),
                "instances": a.instances,
                "cost_per_hour": if view.instances.is_empty() {
                    plan.map(|p| p.plan.cost_of(&a.name))
                } else {
                    Some(view.instances.iter().filter(|i| i.record.app == a.name).fold(0.0, |sum, i| sum + i.cost_per_hour))
                },
                "vcpus": a.vcpus,
                "memory_mib": a.memory_mib,
                "storage_mib": a.storage_mib,
                "depends_on": a.depends_on,
                "guest_apps": a.guest_apps.iter().map(|g| json!({
                    "name": g.name, "process": g.process, "check": g.check,
                })).collect::<Vec<_>>(),
                "metric": a.metric.as_ref().map(|m| m.describe()),
            })).collect::<Vec<_>>(),
            "start_order": spec.start_order().map(|o| o.iter().map(|a| a.name.to_string()).collect::<Vec<_>>()),
            "cost_per_hour": if view.instances.is_empty() {
                plan.map(|p| p.plan.cost_per_hour)
            } else {
                Some(view.cost_per_hour())
            },
        }),
        Err(e) => json!({
            "name": view.name(),
            "status": "unreadable",
            "defined_at": rfc3339(defined_at),
            "error": e,
            "applications": [],
            "cost_per_hour": null,
        }),
    }
}

/// A plan as ctl shows it.
pub fn plan_json(sp: &ServicePlan) -> Value {
    let plan = &sp.plan;
    json!({
        "service": sp.service,
        "fingerprint": sp.fingerprint,
        "feasible": plan.is_feasible(),
        "changes": plan.changes(),
        "cost_per_hour": plan.cost_per_hour,
        "placements": plan.placements.iter().map(|p| json!({
            "application": p.app,
            "instance": format!("{}-{}", p.app, p.index),
            "host": p.host,
            "action": match p.action { Action::Create => "create", Action::Keep => "keep" },
            "cost_per_hour": p.cost_per_hour,
        })).collect::<Vec<_>>(),
        "removals": plan.removals.iter().map(|e| json!({
            "instance": format!("{}-{}", e.app, e.index),
            "host": e.host,
        })).collect::<Vec<_>>(),
        "unplaced": plan.unplaced.iter().map(|u| json!({
            "instance": format!("{}-{}", u.app, u.index),
            "would_fit": u.would_fit,
        })).collect::<Vec<_>>(),
        "rejections": plan.rejections.iter().map(|(app, list)| {
            (app.to_string(), Value::Array(list.iter().map(|r| Value::String(r.reason.clone())).collect()))
        }).collect::<serde_json::Map<_, _>>(),
        "overrides": plan.overrides.iter().map(|o| json!({
            "instance": format!("{}-{}", o.placement.app, o.placement.index),
            "host": o.placement.host,
            "holds": o.verdict.is_ok(),
            "breaks": o.verdict.as_ref().err(),
        })).collect::<Vec<_>>(),
    })
}

/// A migration as ctl shows it; `rate_bps` and `eta_secs` while its transfer reports
/// progress.
pub fn migration_json(m: &crate::engine::migration::MigrationJournal) -> Value {
    json!({
        "id": m.id,
        "vm": m.vm,
        "from": m.from,
        "to": m.to,
        "state": m.step.as_str(),
        "bytes_done": m.bytes_done,
        "bytes_total": m.bytes_total,
        "rate_bps": m.rate_bps,
        "eta_secs": m.eta_secs(),
        "digest": m.digest,
        "error": m.error,
        "waiting": m.waiting,
        "limit_mbps": m.limit_mbps,
        "compress": m.compress,
        "origin": m.origin.as_string(),
        "disk": m.disk_move.kind(),
        "disk_template": m.disk_move.template(),
    })
}

/// Every VM, with the service and application it is an instance of, when it is one.
fn all_vms(snap: &Snapshot) -> Vec<Value> {
    snap.hosts
        .iter()
        .flat_map(|h| {
            h.vms.iter().map(|v| {
                let mut vm = vm_json(h.id(), v);
                let instance = snap
                    .services
                    .iter()
                    .find_map(|s| s.instance_of_vm(h.id(), &v.name).map(|i| (s.name(), i)));
                vm["service"] = json!(instance.map(|(s, _)| s));
                vm["application"] = json!(instance.map(|(_, i)| &i.record.app));
                vm["runtime"] = json!(v.runtime.as_str());
                vm
            })
        })
        .collect()
}

fn engine_err(e: EngineError) -> String {
    e.to_string()
}

async fn handle(engine: &EngineHandle, request: CtlRequest) -> Result<Value, String> {
    match request {
        CtlRequest::Hosts => {
            let snap = engine.snapshot();
            Ok(Value::Array(
                snap.hosts
                    .iter()
                    .map(|h| {
                        let mut shown = host_json(h);
                        shown["maintenance"] = maintenance_json(h, snap.drain(h.id()));
                        shown
                    })
                    .collect(),
            ))
        }
        CtlRequest::HostDrain { host, pause } => {
            let host = HostId::new(host).map_err(|e| e.to_string())?;
            if pause {
                engine
                    .request(|reply| Command::PauseDrain {
                        host: host.clone(),
                        reply,
                    })
                    .await
                    .map_err(engine_err)?;
                let snap = engine.snapshot();
                let view = snap.host(&host).ok_or("the host is gone")?;
                return Ok(maintenance_json(view, snap.drain(&host)));
            }
            let progress = engine
                .request(|reply| Command::DrainHost {
                    host: host.clone(),
                    reply,
                })
                .await
                .map_err(engine_err)?;
            Ok(drain_json(&progress))
        }
        CtlRequest::HostUndrain { host } => {
            let host = HostId::new(host).map_err(|e| e.to_string())?;
            engine
                .request(|reply| Command::UndrainHost {
                    host: host.clone(),
                    reply,
                })
                .await
                .map_err(engine_err)?;
            Ok(json!({"host": host, "maintenance": false}))
        }
        CtlRequest::ServiceMove { name, site } => {
            let name = ServiceName::new(name).map_err(|e| e.to_string())?;
            let moving = engine
                .request(|reply| Command::MoveService {
                    name: name.clone(),
                    site,
                    reply,
                })
                .await
                .map_err(engine_err)?;
            Ok(json!({"service": name, "moving": move_json(&moving)}))
        }
        CtlRequest::Vms => Ok(Value::Array(all_vms(&engine.snapshot()))),
        CtlRequest::Events { limit } => {
            let snap = engine.snapshot();
            let skip = snap.events.len().saturating_sub(limit);
            Ok(serde_json::to_value(&snap.events[skip..]).map_err(|e| e.to_string())?)
        }
        CtlRequest::HostProbe { address } => {
            let fingerprint = engine
                .request(|reply| Command::ProbeHost { address, reply })
                .await
                .map_err(engine_err)?;
            Ok(json!({"fingerprint": fingerprint.to_string()}))
        }
        CtlRequest::HostAdd {
            address,
            token,
            fingerprint,
            replace,
        } => {
            let expected_fingerprint = fingerprint
                .map(|f| f.parse::<Fingerprint>())
                .transpose()
                .map_err(|e| e.to_string())?;
            let added = engine
                .request(|reply| Command::AddHost {
                    address,
                    token,
                    expected_fingerprint,
                    replace,
                    reply,
                })
                .await
                .map_err(engine_err)?;
            Ok(json!({"id": added.host_id, "fingerprint": added.fingerprint.to_string()}))
        }
        CtlRequest::VmCreate {
            name,
            template,
            host,
            vcpus,
            memory_mib,
            start,
        } => {
            let spec = VmSpec {
                name: VmName::new(name).map_err(|e| e.to_string())?,
                template: TemplateName::new(template).map_err(|e| e.to_string())?,
                vcpus,
                memory_mib,
            };
            let host = HostId::new(host).map_err(|e| e.to_string())?;
            let vm = engine
                .request(|reply| Command::CreateVm {
                    host: host.clone(),
                    spec,
                    start,
                    reply,
                })
                .await
                .map_err(engine_err)?;
            Ok(vm_json(&host, &vm))
        }
        CtlRequest::VmStart { vm } => {
            let (host, found) = engine.snapshot().find_vm(&vm)?;
            let vm = engine
                .request(|reply| Command::StartVm {
                    host: host.clone(),
                    name: found.name,
                    reply,
                })
                .await
                .map_err(engine_err)?;
            Ok(vm_json(&host, &vm))
        }
        CtlRequest::VmPower { vm, action } => {
            let (host, found) = engine.snapshot().find_vm(&vm)?;
            let vm = engine
                .request(|reply| Command::PowerVm {
                    host: host.clone(),
                    name: found.name,
                    action,
                    reply,
                })
                .await
                .map_err(engine_err)?;
            Ok(vm_json(&host, &vm))
        }
        CtlRequest::VmExec {
            vm,
            command,
            timeout_secs,
        } => {
            let (host, found) = engine.snapshot().find_vm(&vm)?;
            let out = engine
                .request(|reply| Command::GuestExec {
                    host,
                    name: found.name,
                    command,
                    timeout_secs,
                    reply,
                })
                .await
                .map_err(engine_err)?;
            Ok(json!({
                "exit_code": out.exit_code,
                "stdout": out.stdout,
                "stderr": out.stderr,
            }))
        }
        CtlRequest::VmSet {
            vm,
            vcpus,
            memory_mib,
            autostart,
        } => {
            let (host, found) = engine.snapshot().find_vm(&vm)?;
            let configured = engine
                .request(|reply| Command::ConfigureVm {
                    host: host.clone(),
                    name: found.name,
                    vcpus,
                    memory_mib,
                    autostart,
                    reply,
                })
                .await
                .map_err(engine_err)?;
            let mut out = vm_json(&host, &configured.status);
            out["at_next_start"] = Value::Bool(configured.at_next_start);
            Ok(out)
        }
        CtlRequest::VmClone { vm, name, to } => {
            let (host, found) = engine.snapshot().find_vm(&vm)?;
            let new_name = VmName::new(name).map_err(|e| e.to_string())?;
            let to = to
                .map(|t| HostId::new(t).map_err(|e| e.to_string()))
                .transpose()?;
            let cloned = engine
                .request(|reply| Command::CloneVm {
                    host,
                    name: found.name,
                    new_name,
                    to,
                    reply,
                })
                .await
                .map_err(engine_err)?;
            let mut out = vm_json(&cloned.host, &cloned.status);
            out["clone_of"] = json!(vm);
            out["migration"] = cloned
                .migration
                .as_ref()
                .map_or(Value::Null, migration_json);
            Ok(out)
        }
        CtlRequest::VmSnapshot {
            vm,
            action,
            snapshot,
        } => {
            let (host, found) = engine.snapshot().find_vm(&vm)?;
            let listed = engine
                .request(|reply| Command::SnapshotVm {
                    host,
                    name: found.name,
                    action,
                    snapshot,
                    reply,
                })
                .await
                .map_err(engine_err)?;
            Ok(json!(listed))
        }
        CtlRequest::VmStop { vm, force } => {
            let (host, found) = engine.snapshot().find_vm(&vm)?;
            let vm = engine
                .request(|reply| Command::StopVm {
                    host: host.clone(),
                    name: found.name,
                    force,
                    reply,
                })
                .await
                .map_err(engine_err)?;
            Ok(vm_json(&host, &vm))
        }
        CtlRequest::Services => {
            let services = engine.snapshot().services.clone();
            let mut out = Vec::with_capacity(services.len());
            for view in services.iter() {
                let plan = match &view.spec {
                    Ok(_) => {
                        let name = view.name().clone();
                        engine
                            .request(|reply| Command::PlanService {
                                name,
                                overrides: Vec::new(),
                                reply,
                            })
                            .await
                            .ok()
                    }
                    Err(_) => None,
                };
                out.push(service_json(view, plan.as_ref()));
            }
            Ok(Value::Array(out))
        }
        CtlRequest::ServiceCreate { source, replace } => {
            let name = engine
                .request(|reply| Command::DefineService {
                    source,
                    replace,
                    reply,
                })
                .await
                .map_err(engine_err)?;
            Ok(json!({ "name": name }))
        }
        CtlRequest::ServicePlan { name, place } => {
            let name = ServiceName::new(name).map_err(|e| e.to_string())?;
            let overrides = parse_overrides(&place)?;
            let plan = engine
                .request(|reply| Command::PlanService {
                    name,
                    overrides,
                    reply,
                })
                .await
                .map_err(engine_err)?;
            Ok(plan_json(&plan))
        }
        CtlRequest::ServiceShow { name } => {
            let name = ServiceName::new(name).map_err(|e| e.to_string())?;
            let snap = engine.snapshot();
            let view = snap
                .services
                .iter()
                .find(|s| s.name() == &name)
                .ok_or_else(|| format!("service {name} does not exist"))?;
            let mut shown = service_json(view, None);
            shown["source"] = Value::String(view.record.source.clone());
            Ok(shown)
        }
        CtlRequest::ServiceDelete { name } => {
            let name = ServiceName::new(name).map_err(|e| e.to_string())?;
            let report = engine
                .request(|reply| Command::DeleteService { name, reply })
                .await
                .map_err(engine_err)?;
            report_json(&report)
        }
        CtlRequest::ServiceDeploy {
            name,
            fingerprint,
            place,
        } => {
            let name = ServiceName::new(name).map_err(|e| e.to_string())?;
            let overrides = parse_overrides(&place)?;
            let report = engine
                .request(|reply| Command::DeployService {
                    name,
                    fingerprint,
                    overrides,
                    reply,
                })
                .await
                .map_err(engine_err)?;
            report_json(&report)
        }
        CtlRequest::ServiceStart { name } => {
            let name = ServiceName::new(name).map_err(|e| e.to_string())?;
            let report = engine
                .request(|reply| Command::StartService { name, reply })
                .await
                .map_err(engine_err)?;
            report_json(&report)
        }
        CtlRequest::ServiceStop { name } => {
            let name = ServiceName::new(name).map_err(|e| e.to_string())?;
            let report = engine
                .request(|reply| Command::StopService { name, reply })
                .await
                .map_err(engine_err)?;
            report_json(&report)
        }
        CtlRequest::ServiceAdopt { name, app, vm } => {
            let name = ServiceName::new(name).map_err(|e| e.to_string())?;
            let app = AppName::new(app).map_err(|e| e.to_string())?;
            let (host, found) = engine.snapshot().find_vm(&vm)?;
            let instance = engine
                .request(|reply| Command::AdoptVm {
                    service: name,
                    app,
                    host,
                    vm: found.name,
                    reply,
                })
                .await
                .map_err(engine_err)?;
            Ok(json!({
                "service": instance.service,
                "application": instance.app,
                "index": instance.index,
                "host": instance.host,
                "vm": instance.vm,
            }))
        }
        CtlRequest::VmMigrate {
            vm,
            to,
            dry_run,
            limit_mbps,
            compress,
        } => {
            let options = crate::engine::migration::MigrationOptions {
                limit_mbps,
                compress,
            };
            let snap = engine.snapshot();
            let (host, found) = snap.find_vm(&vm)?;
            let to = HostId::new(to).map_err(|e| e.to_string())?;
            if dry_run {
                let from_view = snap.host(&host).ok_or("the host is gone")?;
                let to_view = snap
                    .host(&to)
                    .ok_or_else(|| format!("host {to} is not enrolled"))?;
                let checked = crate::engine::migration::precheck(
                    &found,
                    from_view,
                    to_view,
                    &snap.services,
                    &snap.migrations,
                );
                return Ok(match checked {
                    Ok(e) => {
                        let (limit, compress) = e.transfer_settings(options);
                        let mbps = limit.map_or(e.link_mbps, |l| l.min(e.link_mbps)).max(1);
                        json!({
                            "vm": found.name, "from": host, "to": to, "can_go": true,
                            "bytes": e.bytes, "link_mbps": e.link_mbps,
                            "seconds": (e.bytes as f64 * 8.0 / (f64::from(mbps) * 1e6)).ceil(),
                            "limit_mbps": limit, "compress": compress,
                            "cost": e.cost, "crosses_sites": e.crosses_sites, "reasons": [],
                            "disk": e.disk_move.kind(), "disk_detail": e.disk_move.describe(),
                        })
                    }
                    Err(reasons) => json!({
                        "vm": found.name, "from": host, "to": to, "can_go": false,
                        "reasons": reasons,
                    }),
                });
            }
            let journal = engine
                .request(|reply| Command::MigrateVm {
                    host,
                    vm: found.name,
                    to,
                    options,
                    reply,
                })
                .await
                .map_err(engine_err)?;
            Ok(migration_json(&journal))
        }
        CtlRequest::Migrations => Ok(Value::Array(
            engine
                .snapshot()
                .migrations
                .iter()
                .map(migration_json)
                .collect(),
        )),
        CtlRequest::Forecast { site } => {
            let sites = engine
                .request(|reply| Command::Capacity {
                    what_if: WhatIf::default(),
                    reply,
                })
                .await
                .map_err(engine_err)?;
            if let Some(site) = &site
                && !sites.iter().any(|s| &s.site == site)
            {
                return Err(format!("no site {site:?} among the enrolled hosts"));
            }
            Ok(capacity_json(
                sites
                    .iter()
                    .filter(|s| site.as_ref().is_none_or(|w| &s.site == w)),
            ))
        }
        CtlRequest::AutoscaleSet {
            target,
            metric,
            above,
            below,
            period_secs,
            periods,
            cooldown_secs,
            min,
            max,
        } => {
            let (service, app) = service_app(&target)?;
            let metric = AutoscaleMetric::parse(if metric.is_empty() { "cpu" } else { &metric })
                .ok_or_else(|| format!("no metric {metric:?}: cpu or app-metric"))?;
            let rule = AutoscaleRule {
                metric,
                scale_out_above: above,
                scale_in_below: below,
                period_secs,
                periods,
                cooldown_secs,
                min_instances: min,
                max_instances: max,
            };
            let view = engine
                .request(|reply| Command::SetAutoscale {
                    service,
                    app,
                    rule: Some(rule),
                    reply,
                })
                .await
                .map_err(engine_err)?;
            Ok(view.as_ref().map_or(Value::Null, autoscale_json))
        }
        CtlRequest::AutoscaleRemove { target } => {
            let (service, app) = service_app(&target)?;
            engine
                .request(|reply| Command::SetAutoscale {
                    service,
                    app,
                    rule: None,
                    reply,
                })
                .await
                .map_err(engine_err)?;
            Ok(json!({ "removed": target }))
        }
        CtlRequest::Cost { by, since_secs } => {
            let by = CostBy::parse(&by).ok_or_else(|| {
                format!("cannot group by {by:?}: instance, application, service or site")
            })?;
            let lines = engine
                .request(|reply| Command::Cost {
                    by,
                    since_secs,
                    reply,
                })
                .await
                .map_err(engine_err)?;
            let total: f64 = lines.iter().map(|l| l.cost).sum();
            Ok(json!({
                "since_secs": since_secs,
                "total_cost": total,
                "lines": lines.iter().map(|l| json!({
                    "key": l.key,
                    "cpu_hours": l.usage.cpu_hours,
                    "gb_months": l.usage.gb_months,
                    "gb_sent": l.usage.gb_transferred,
                    "cost": l.cost,
                })).collect::<Vec<_>>(),
            }))
        }
        CtlRequest::AutoscaleShow => {
            let views = engine
                .request(|reply| Command::AutoscaleShow { reply })
                .await
                .map_err(engine_err)?;
            Ok(Value::Array(views.iter().map(autoscale_json).collect()))
        }
        CtlRequest::AutoscaleReplay { target, since_secs } => {
            let (service, app) = service_app(&target)?;
            let answer = engine
                .request(|reply| Command::ReplayAutoscale {
                    service,
                    app,
                    since_secs,
                    reply,
                })
                .await
                .map_err(engine_err)?;
            Ok(json!({
                "service": answer.service.as_str(),
                "app": answer.app.as_str(),
                "rule": answer.rule.describe(),
                "period_secs": answer.period_secs,
                "periods": answer.periods,
                "from": answer.from_secs,
                "to": answer.to_secs,
                "start_instances": answer.start_instances,
                "changes": answer.changes.iter().map(|(at, d)| json!({
                    "at": at,
                    "change": match d.change { Some(Change::Out) => "out", Some(Change::In) => "in", None => "hold" },
                    "instances": d.instances,
                    "reason": d.reason,
                })).collect::<Vec<_>>(),
            }))
        }
        CtlRequest::WhatifDrain { host } => {
            let host = HostId::new(host.clone()).map_err(|e| e.to_string())?;
            let snap = engine.snapshot();
            let view = snap
                .host(&host)
                .ok_or_else(|| format!("host {host} is not enrolled"))?;
            let site = view.site_name().to_string();
            let what_if = WhatIf {
                leave_out: vec![host.clone()],
                add: Vec::new(),
            };
            what_if_json(engine, what_if, &[site], json!({ "drain": host.as_str() })).await
        }
        CtlRequest::WhatifDeploy { name } => {
            let name = ServiceName::new(name).map_err(|e| e.to_string())?;
            let snap = engine.snapshot();
            let view = snap
                .services
                .iter()
                .find(|s| s.name() == &name)
                .ok_or_else(|| format!("service {name} does not exist"))?;
            let spec = view
                .spec
                .clone()
                .map_err(|e| format!("service {name} does not read: {e}"))?;
            let plan = engine
                .request(|reply| Command::PlanService {
                    name: name.clone(),
                    overrides: Vec::new(),
                    reply,
                })
                .await
                .map_err(engine_err)?;
            let mut add = Vec::new();
            let mut sites = Vec::new();
            for p in &plan.plan.placements {
                if p.action != Action::Create {
                    continue;
                }
                let Some(app) = spec.applications.iter().find(|a| a.name == p.app) else {
                    continue;
                };
                if let Some(h) = snap.host(&p.host) {
                    sites.push(h.site_name().to_string());
                }
                add.push(Extra {
                    host: p.host.clone(),
                    vcpus: app.vcpus,
                    memory_mib: app.memory_mib,
                    storage_mib: app.storage_mib,
                });
            }
            sites.sort();
            sites.dedup();
            let unplaced: Vec<String> = plan
                .plan
                .unplaced
                .iter()
                .map(|u| format!("{}-{}: {}", u.app, u.index, u.would_fit))
                .collect();
            let what_if = WhatIf {
                leave_out: Vec::new(),
                add,
            };
            what_if_json(
                engine,
                what_if,
                &sites,
                json!({ "deploy": name.as_str(), "unplaced": unplaced }),
            )
            .await
        }
        CtlRequest::Stats {
            subject,
            since_secs,
            resolution_secs,
        } => {
            let snapshot = engine.snapshot();
            // `service:NAME`, `app:SERVICE/APP` and `site:NAME` name aggregates; otherwise a
            // host id names the host, and anything else is a workload's name.
            let subject = if let Some(name) = subject.strip_prefix("service:") {
                Subject::Service(ServiceName::new(name).map_err(|e| e.to_string())?)
            } else if let Some(target) = subject.strip_prefix("app:") {
                let (service, app) = service_app(target)?;
                Subject::Application(service, app)
            } else if let Some(site) = subject.strip_prefix("site:") {
                Subject::Site(site.to_string())
            } else {
                match HostId::new(subject.clone()) {
                    Ok(h) if snapshot.host(&h).is_some() => Subject::Host(h),
                    _ => Subject::Workload(VmName::new(subject.clone()).map_err(|e| {
                        format!("{subject:?} is neither an enrolled host nor a workload name: {e}")
                    })?),
                }
            };
            let answer = engine
                .request(|reply| Command::Stats {
                    subject,
                    since_secs,
                    resolution_secs,
                    reply,
                })
                .await
                .map_err(engine_err)?;
            Ok(stats_json(&answer))
        }
        CtlRequest::MigrationCancel { id } => {
            let journal = engine
                .request(|reply| Command::CancelMigration { id, reply })
                .await
                .map_err(engine_err)?;
            Ok(migration_json(&journal))
        }
        CtlRequest::VmDelete { vm } => {
            let (host, found) = engine.snapshot().find_vm(&vm)?;
            let name = found.name.clone();
            engine
                .request(|reply| Command::DeleteVm {
                    host: host.clone(),
                    name,
                    reply,
                })
                .await
                .map_err(engine_err)?;
            Ok(json!({"deleted": found.name, "host": host}))
        }
    }
}

/// `APP-INDEX=HOST` choices, as `--place` takes them.
fn parse_overrides(place: &[String]) -> Result<Vec<Override>, String> {
    place
        .iter()
        .map(|p| {
            let bad = || format!("--place {p}: write APP-INDEX=HOST, as in web-1=lsn-2");
            let (instance, host) = p.split_once('=').ok_or_else(bad)?;
            let (app, index) = instance.rsplit_once('-').ok_or_else(bad)?;
            Ok(Override {
                app: AppName::new(app).map_err(|e| format!("--place {p}: {e}"))?,
                index: index.parse().map_err(|_| bad())?,
                host: HostId::new(host).map_err(|e| format!("--place {p}: {e}"))?,
            })
        })
        .collect()
}

/// Sends one request to the console running on `data_dir`.
pub async fn request(
    data_dir: &Path,
    request: &CtlRequest,
    timeout: Duration,
) -> Result<CtlResponse, CtlError> {
    let path = socket_path(data_dir);
    let mut stream = UnixStream::connect(&path)
        .await
        .map_err(|_| CtlError::NotRunning(data_dir.display().to_string()))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    let exchange = async {
        stream.write_all(&line).await?;
        let mut reader = BufReader::new(stream);
        let mut answer = String::new();
        reader.read_line(&mut answer).await?;
        Ok::<_, CtlError>(serde_json::from_str::<CtlResponse>(&answer)?)
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| {
        CtlError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the console did not answer in time",
        ))
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_json_shape() {
        let r = CtlRequest::VmStop {
            vm: "web".into(),
            force: true,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"cmd":"vm-stop","vm":"web","force":true}"#
        );
        assert!(serde_json::from_str::<CtlRequest>(r#"{"cmd":"rm-rf"}"#).is_err());
    }
}
