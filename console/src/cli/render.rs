//! How `ctl` shows each response to a person: tables and sentences.

use std::fmt::Display;

use crate::api::views::*;

/// A value, or `-` when there is none.
fn or_dash<T: Display>(value: Option<T>) -> String {
    value.map_or("-".into(), |v| v.to_string())
}

pub fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
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

pub fn hosts(hosts: &[HostSummary]) -> String {
    table(
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
        hosts
            .iter()
            .map(|h| {
                vec![
                    h.id.to_string(),
                    if h.maintenance.is_some() {
                        format!("{}, maintenance", h.state)
                    } else {
                        h.state.clone()
                    },
                    h.site.clone(),
                    h.address.clone(),
                    or_dash(h.cpus),
                    or_dash(h.memory_mib),
                    h.vms.to_string(),
                    h.runtimes.join(","),
                ]
            })
            .collect(),
    )
}

pub fn vms(vms: &[FleetVm]) -> String {
    table(
        &["NAME", "HOST", "STATE", "VCPUS", "MEMORY_MIB", "TEMPLATE"],
        vms.iter()
            .map(|v| {
                let v = &v.vm;
                vec![
                    v.name.to_string(),
                    v.host.to_string(),
                    v.state.clone(),
                    v.vcpus.to_string(),
                    v.memory_mib.to_string(),
                    or_dash(v.template.as_ref()),
                ]
            })
            .collect(),
    )
}

pub fn events(events: &[EventView]) -> String {
    table(
        &["TIME", "LEVEL", "HOST", "MESSAGE"],
        events
            .iter()
            .map(|e| {
                vec![
                    crate::ui::clock(e.time_ms),
                    e.level.clone(),
                    or_dash(e.host.as_ref()),
                    e.message.clone(),
                ]
            })
            .collect(),
    )
}

/// A drain as `host drain` shows it.
pub fn drain(host: &str, paused: bool, d: &DrainCounts) -> String {
    let mut out = format!(
        "{host} is in maintenance{}: {} moved, {} left",
        if paused { ", drain paused" } else { "" },
        d.moved,
        d.remaining,
    );
    if let Some(id) = d.migrating {
        out.push_str(&format!(", migration {id} under way"));
    }
    out.push('\n');
    for b in &d.blocked {
        out.push_str(&format!("  {} cannot move: {}\n", b.vm, b.reason));
    }
    out
}

pub fn vm_state(vm: &VmSummary) -> String {
    format!("{} on {}: {}\n", vm.name, vm.host, vm.state)
}

pub fn vm_settings(vm: &VmSummary) -> String {
    let mut out = format!(
        "{} on {}: {}, {} vCPUs, {} MiB, autostart {}",
        vm.name,
        vm.host,
        vm.state,
        vm.vcpus,
        vm.memory_mib,
        if vm.autostart == Some(true) {
            "on"
        } else {
            "off"
        }
    );
    if let Some(next) = vm.next_start {
        out.push_str(&format!(
            "; at its next start: {} vCPUs, {} MiB",
            next.vcpus, next.memory_mib
        ));
    }
    out + "\n"
}

pub fn vm_clone(c: &VmClonedView) -> String {
    let mut out = format!(
        "{} on {}: a copy of {}, {}\n",
        c.vm.name, c.vm.host, c.clone_of, c.vm.state
    );
    if let Some(m) = &c.migration {
        out.push_str(&format!("migration {} takes it to {}\n", m.id, m.to));
    }
    out
}

pub fn snapshots(list: &SnapshotList) -> String {
    table(
        &["NAME", "CREATED", "STATE", "MEMORY_MIB", "CURRENT"],
        list.iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    crate::ui::date_time(s.created_unix_secs),
                    s.state.as_str().to_string(),
                    s.memory_state_bytes
                        .map_or("-".into(), |b| b.div_ceil(1 << 20).to_string()),
                    if s.current { "*".into() } else { String::new() },
                ]
            })
            .collect(),
    )
}

pub fn migrations(list: &[MigrationView]) -> String {
    table(
        &["ID", "VM", "FROM", "TO", "STATE", "BYTES", "ERROR"],
        list.iter()
            .map(|m| {
                vec![
                    m.id.to_string(),
                    m.vm.to_string(),
                    m.from.to_string(),
                    m.to.to_string(),
                    m.state.clone(),
                    format!("{}/{}", m.bytes_done, m.bytes_total),
                    match &m.waiting {
                        Some(w) => format!("waiting: {w}"),
                        None => or_dash(m.error.as_ref()),
                    },
                ]
            })
            .collect(),
    )
}

pub fn migration(m: &MigrationView) -> String {
    format!(
        "migration {} of {} from {} to {}: {}\n",
        m.id, m.vm, m.from, m.to, m.state
    )
}

pub fn migration_check(c: &MigrationCheck) -> String {
    match &c.estimate {
        Some(e) => format!(
            "{} can go from {} to {}: {} bytes ({}), about {} s over {} Mbit/s{}{} (also the downtime), transfer cost {:.4}\n",
            c.vm,
            c.from,
            c.to,
            e.bytes,
            e.disk_detail,
            e.seconds,
            e.link_mbps,
            e.limit_mbps
                .map_or(String::new(), |l| format!(", limited to {l} Mbit/s")),
            if e.compress { ", compressed" } else { "" },
            e.cost
        ),
        None => {
            let mut out = format!("{} cannot go to {}:\n", c.vm, c.to);
            for r in &c.reasons {
                out.push_str(&format!("  {r}\n"));
            }
            out
        }
    }
}

/// Sites' capacity as rows: one per resource, with its forecast.
pub fn capacity_table(sites: &[SiteCapacityView]) -> String {
    let number = |n: f64| format!("{n:.0}");
    let mut rows = Vec::new();
    for site in sites {
        for r in &site.resources {
            rows.push(vec![
                site.site.clone(),
                format!("{} ({})", r.resource, r.unit),
                number(r.capacity),
                number(r.allocated),
                r.used.map_or("-".into(), number),
                number(r.free),
                r.forecast
                    .as_ref()
                    .map_or("-".into(), |f| format!("{} [{}]", f.text, f.method)),
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

pub fn what_if(w: &WhatIfView) -> String {
    let mut out = String::new();
    if let Some(unplaced) = w.unplaced.as_ref().filter(|u| !u.is_empty()) {
        out.push_str(&format!("cannot place: {}\n", unplaced.join(",")));
    }
    out.push_str(if w.fits {
        "after it, every resource fits:\n"
    } else {
        "after it, some resource would be over its capacity:\n"
    });
    out.push_str(&capacity_table(&w.after));
    out
}

pub fn cost(by: &str, c: &CostView) -> String {
    let rows = c
        .lines
        .iter()
        .map(|l| {
            vec![
                l.key.clone(),
                format!("{:.3}", l.cpu_hours),
                format!("{:.4}", l.gb_months),
                format!("{:.3}", l.gb_sent),
                format!("{:.3}", l.cost),
            ]
        })
        .collect();
    format!(
        "{}total {:.3}\n",
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
        c.total_cost
    )
}

pub fn autoscaling(list: &[AutoscaleSummary]) -> String {
    table(
        &["APPLICATION", "RULE", "INSTANCES", "SET TO", "LAST"],
        list.iter()
            .map(|a| {
                vec![
                    format!("{}/{}", a.service, a.app),
                    a.rule.clone(),
                    a.instances.to_string(),
                    a.desired.to_string(),
                    or_dash(a.last_reason.as_ref()),
                ]
            })
            .collect(),
    )
}

pub fn replay(r: &ReplayView) -> String {
    let outs = r.changes.iter().filter(|c| c.change == "out").count();
    let ins = r.changes.len() - outs;
    let mut out = format!(
        "{}/{} over {} periods of {} s: would have scaled out {outs} times and in {ins} times\n",
        r.service, r.app, r.periods, r.period_secs,
    );
    for c in &r.changes {
        out.push_str(&format!(
            "{}  {}\n",
            crate::ui::clock(c.at * 1000),
            c.reason
        ));
    }
    out
}

pub fn stats(s: &StatsView) -> String {
    let rows: Vec<Vec<String>> = s
        .series
        .iter()
        .map(|series| {
            let (low, high) = series
                .points
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), p| {
                    (lo.min(p.min), hi.max(p.max))
                });
            let bound = |v: f64| {
                if low <= high {
                    format!("{v:.1}")
                } else {
                    "-".into()
                }
            };
            vec![
                series.metric.clone(),
                series.unit.clone(),
                series.points.len().to_string(),
                series
                    .points
                    .last()
                    .map_or("-".into(), |p| format!("{:.1}", p.mean)),
                bound(low),
                bound(high),
            ]
        })
        .collect();
    if rows.is_empty() {
        format!("no statistics for {} in that range yet\n", s.subject)
    } else {
        format!(
            "{} every {} s\n{}",
            s.subject,
            s.resolution_secs,
            table(&["METRIC", "UNIT", "POINTS", "LAST", "MIN", "MAX"], rows)
        )
    }
}

pub fn services(list: &[ServiceSummary]) -> String {
    table(
        &[
            "NAME",
            "STATUS",
            "APPLICATIONS",
            "INSTANCES",
            "COST_PER_HOUR",
        ],
        list.iter()
            .map(|s| {
                vec![
                    s.name.to_string(),
                    s.status.clone(),
                    s.applications
                        .iter()
                        .map(|a| a.name.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                    s.instances_wanted().to_string(),
                    s.cost_per_hour.map_or("-".into(), |c| format!("{c:.3}")),
                ]
            })
            .collect(),
    )
}

pub fn networks(list: &[crate::engine::networks::NetworkView]) -> String {
    let join = |items: Vec<String>| {
        if items.is_empty() {
            "-".to_string()
        } else {
            items.join(",")
        }
    };
    let mut out = table(
        &[
            "NETWORK", "SUBNET", "GATEWAY", "VNI", "SERVICES", "CONNECT", "HOSTS",
        ],
        list.iter()
            .map(|n| {
                vec![
                    n.name.to_string(),
                    n.subnet.to_string(),
                    n.gateway.to_string(),
                    n.vni.to_string(),
                    join(n.services.iter().map(|s| s.to_string()).collect()),
                    join(n.connect.iter().map(|s| s.to_string()).collect()),
                    join(n.hosts.iter().map(|h| h.to_string()).collect()),
                ]
            })
            .collect(),
    );
    let members: Vec<Vec<String>> = list
        .iter()
        .flat_map(|n| {
            n.members.iter().map(|m| {
                vec![
                    n.name.to_string(),
                    m.dns_name.clone(),
                    m.host.to_string(),
                    m.address.to_string(),
                    m.mac.clone(),
                    if m.ready { "yes" } else { "no" }.to_string(),
                ]
            })
        })
        .collect();
    if !members.is_empty() {
        out.push('\n');
        out.push_str(&table(
            &["NETWORK", "INSTANCE", "HOST", "ADDRESS", "MAC", "READY"],
            members,
        ));
    }
    let published: Vec<Vec<String>> = list
        .iter()
        .flat_map(|n| {
            n.published.iter().map(|p| {
                vec![
                    n.name.to_string(),
                    p.host_port.to_string(),
                    format!("{}.{}:{}", p.app, p.service, p.port),
                    p.hosts.clone(),
                ]
            })
        })
        .collect();
    if !published.is_empty() {
        out.push('\n');
        out.push_str(&table(&["NETWORK", "HOST_PORT", "TO", "ON"], published));
    }
    out
}

pub fn images(list: &[ImageView]) -> String {
    table(
        &[
            "NAME",
            "FORMAT",
            "SIZE_MIB",
            "ON_DISK_MIB",
            "HOSTS",
            "SENDING",
            "BLAKE3",
            "IMPORTED",
        ],
        list.iter()
            .map(|i| {
                vec![
                    i.name.to_string(),
                    i.format.clone(),
                    i.virtual_bytes.div_ceil(1 << 20).to_string(),
                    i.allocated_bytes.div_ceil(1 << 20).to_string(),
                    if i.hosts.is_empty() {
                        "-".into()
                    } else {
                        i.hosts.join(",")
                    },
                    if i.sending.is_empty() {
                        "-".into()
                    } else {
                        i.sending
                            .iter()
                            .map(|s| {
                                let percent =
                                    s.done_bytes.saturating_mul(100) / s.total_bytes.max(1);
                                format!("{}:{percent}%", s.host)
                            })
                            .collect::<Vec<_>>()
                            .join(",")
                    },
                    i.blake3.chars().take(16).collect(),
                    i.imported.clone(),
                ]
            })
            .collect(),
    )
}

pub fn operators(list: &[OperatorView]) -> String {
    table(
        &[
            "NAME", "ROLE", "SCOPE", "CONSOLES", "ADDED", "REVOKED", "KEY",
        ],
        list.iter()
            .map(|o| {
                vec![
                    o.name.to_string(),
                    o.role.clone(),
                    if o.scopes.is_empty() {
                        "-".into()
                    } else {
                        o.scopes.join(",")
                    },
                    if o.consoles { "yes" } else { "no" }.into(),
                    o.added.clone(),
                    or_dash(o.revoked.as_ref()),
                    o.fingerprint.clone(),
                ]
            })
            .collect(),
    )
}

pub fn audit(lines: &[AuditView]) -> String {
    table(
        &["TIME", "OPERATOR", "OPERATION", "TARGET", "OUTCOME", "MS"],
        lines
            .iter()
            .map(|l| {
                vec![
                    l.time.clone(),
                    l.operator.clone(),
                    l.operation.clone(),
                    l.target.clone(),
                    l.outcome.clone(),
                    or_dash(l.duration_ms),
                ]
            })
            .collect(),
    )
}

pub fn report(r: &ReportView) -> String {
    r.done
        .iter()
        .map(|d| format!("{} on {}: {}\n", d.instance, d.host, d.result))
        .collect()
}

pub fn plan(plan: &PlanView) -> String {
    let mut out = format!(
        "plan for service {} (fingerprint {})\n",
        plan.service, plan.fingerprint
    );
    for p in &plan.placements {
        let sign = if p.action == "create" { "+" } else { "=" };
        let image = p.image_transfer.as_ref().map_or(String::new(), |t| {
            let time = t.secs.map_or(String::new(), |s| format!(", about {s} s"));
            format!("  (sends image {}, {} MiB{time})", t.image, t.mib)
        });
        out.push_str(&format!(
            "  {sign} {:<16} on {:<12} {:>8.3}/h{image}\n",
            p.instance,
            p.host.as_str(),
            p.cost_per_hour
        ));
    }
    for r in &plan.removals {
        out.push_str(&format!("  - {:<16} on {}\n", r.instance, r.host));
    }
    for u in &plan.unplaced {
        out.push_str(&format!(
            "  ! {:<16} cannot be placed: {}\n",
            u.instance, u.would_fit
        ));
    }
    for o in &plan.overrides {
        let verdict = match &o.breaks {
            Some(why) => format!("breaks a rule: {why}"),
            None => "holds".to_string(),
        };
        out.push_str(&format!(
            "  placed by hand: {} on {}: {verdict}\n",
            o.instance, o.host
        ));
    }
    if !plan.rejections.is_empty() {
        out.push_str("hosts left out:\n");
        for (app, reasons) in &plan.rejections {
            for reason in reasons {
                out.push_str(&format!("  {app}: {reason}\n"));
            }
        }
    }
    let sent: Vec<&crate::api::views::ImageTransferView> = plan
        .placements
        .iter()
        .filter_map(|p| p.image_transfer.as_ref())
        .collect();
    if !sent.is_empty() {
        let mib: u64 = sent.iter().map(|t| t.mib).sum();
        // The deploy makes one instance after another, so the sends add up.
        let secs: u64 = sent.iter().filter_map(|t| t.secs).sum();
        out.push_str(&format!(
            "images to send first: {mib} MiB, about {secs} s over the hosts' links\n"
        ));
    }
    out.push_str(&format!("cost: {:.3}/h\n", plan.cost_per_hour));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(&["A", "BB"], vec![vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }
}
