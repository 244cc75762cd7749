//! Layout snapshots of the window (egui_kittest), at 1600×1000 and at 800×500: the topology
//! with a migration under way, a VM's details, the plan of the example shop service, 30 days
//! of a host's charts and the capacity view. The demo's fleet is real; what changes from run to run (keys, UUIDs, readings, free
//! storage, times) is set to fixed values, and the window is pinned to that snapshot; the
//! charts and the capacity view are given fixed answers. A change in the picture is then a
//! change in the layout.
//! The images are in tests/snapshots; kittest.toml holds the tolerance. After an intended
//! change, look at the new images and keep them: `UPDATE_SNAPSHOTS=1 cargo test --test layout`.

mod gui_support;

use std::sync::Arc;

use dunes_console::{
    api::views::{SiteCapacityView, StatsView},
    demo,
    engine::{
        EngineHandle, Snapshot,
        migration::{DiskMove, MigrationJournal, MigrationOrigin, MigrationStep},
        records::{EventRecord, Level},
        statistics::capacity::{Resource, ResourceUse, SiteCapacity},
        statistics::forecast::{self, Method},
        statistics::rollup::Bucket,
        statistics::series::{Metric, SeriesPoints, StatsAnswer, Subject},
    },
    ui::{ConsoleApp, TimeRange},
};
use dunes_shared::model::{HostId, HostStatus, VmName};
use egui::Role;
use egui_kittest::{Harness, kittest::Queryable as _};
use gui_support::{step_until, window_sized};

/// 2025-12-01 12:00 UTC.
const NOON_MS: u64 = 1_764_590_400_000;

/// The demo's fleet under a real engine once its seven VMs are made, with the example shop
/// service defined (not deployed): its plan is the engine's answer.
fn demo_engine(dir: &std::path::Path) -> (tokio::runtime::Runtime, EngineHandle, demo::DemoFleet) {
    let (runtime, engine, fleet) = gui_support::demo_engine(dir);
    runtime.block_on(async {
        engine
            .wait_for(std::time::Duration::from_secs(60), |s| {
                s.hosts.iter().map(|h| h.vms.len()).sum::<usize>() == 7
            })
            .await
            .expect("the demo's seven VMs");
        let source = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/examples/shop.toml"),
        )
        .unwrap();
        engine
            .request(|reply| dunes_console::engine::Command::DefineService {
                source,
                replace: false,
                reply,
            })
            .await
            .unwrap();
        engine
            .wait_for(std::time::Duration::from_secs(10), |s| {
                s.services.len() == 1
            })
            .await
            .expect("the shop service in view");
    });
    (runtime, engine, fleet)
}

/// The engine's snapshot with every value that differs between runs fixed, and migration
/// 1 of bi-warehouse to lsn-1 a third of the way.
fn fixed(live: &Snapshot) -> Arc<Snapshot> {
    let mut snapshot = live.clone();
    snapshot.hosts = live
        .hosts
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let mut host = (**host).clone();
            let i = i as u64;
            host.record.fingerprint =
                dunes_shared::pki::Fingerprint::of_public_key(host.id().as_str().as_bytes());
            host.record.enrolled_at_ms = NOON_MS;
            host.record.cert_expires_ms = Some(NOON_MS + 30 * 86_400_000);
            if let Some(inventory) = &mut host.record.inventory {
                inventory.storage_total_mib = 258_048;
                inventory.storage_free_mib = 57_344;
                inventory.agent_version = "0.0.0".into();
            }
            host.status = host.status.map(|s| HostStatus {
                cpu_load_percent: 20.0 + 15.0 * i as f32,
                memory_used_mib: s.memory_total_mib / 4,
                storage_free_mib: 57_344,
                uptime_secs: 3600,
                ..s
            });
            for (j, vm) in host.vms.iter_mut().enumerate() {
                vm.uuid = format!("00000000-0000-4000-8000-{:012}", i * 100 + j as u64);
                vm.disk_bytes = 192 << 20;
                for disk in vm.disks.iter_mut().flatten() {
                    disk.allocated_bytes = 192 << 20;
                }
            }
            Arc::new(host)
        })
        .collect();
    let lines = [
        (Level::Info, "lsn-1", "host enrolled"),
        (
            Level::Info,
            "gva-1",
            "migration 1: bi-warehouse from gva-1 to lsn-1, disk: whole image",
        ),
        (
            Level::Info,
            "gva-1",
            "migration 1 of bi-warehouse: transferring",
        ),
    ];
    snapshot.events = Arc::new(
        lines
            .iter()
            .enumerate()
            .map(|(n, (level, host, message))| EventRecord {
                seq: n as u64 + 1,
                time_ms: NOON_MS + n as u64 * 1000,
                level: *level,
                host: Some(HostId::new(*host).unwrap()),
                message: message.to_string(),
            })
            .collect(),
    );
    let total = 192u64 << 20;
    snapshot.migrations = Arc::new(vec![MigrationJournal {
        id: 1,
        vm: VmName::new("bi-warehouse").unwrap(),
        from: HostId::new("gva-1").unwrap(),
        to: HostId::new("lsn-1").unwrap(),
        step: MigrationStep::Transferring,
        was_running: true,
        error: None,
        bytes_done: total / 3,
        bytes_total: total,
        ticket: None,
        digest: None,
        started_ms: NOON_MS,
        updated_ms: NOON_MS + 3000,
        rate_bps: Some(25 << 20),
        origin: MigrationOrigin::Operator,
        limit_mbps: Some(200),
        compress: false,
        failed_at: None,
        waiting: None,
        disk_move: DiskMove::Image,
    }]);
    snapshot.generated_until_secs = Some(NOON_MS / 1000);
    Arc::new(snapshot)
}

/// 30 days of lsn-1's readings, hourly: a daily swing on a slow rise, with a band.
fn month_of_lsn1() -> StatsAnswer {
    let to = NOON_MS / 1000;
    let hours = 30 * 24;
    let from = to - hours * 3600;
    let scale = |metric: Metric| match metric {
        Metric::Cpu => 30.0,
        Metric::Memory => 12_000.0,
        Metric::DiskRead | Metric::NetRx => 4.0e6,
        Metric::DiskWrite | Metric::NetTx => 1.5e6,
        _ => 2.0e5,
    };
    StatsAnswer {
        subject: Subject::Host(HostId::new("lsn-1").unwrap()),
        resolution_secs: 3600,
        from_secs: from,
        to_secs: to,
        series: Metric::ALL[..7]
            .iter()
            .map(|&metric| SeriesPoints {
                metric,
                points: (0..hours)
                    .map(|h| {
                        let t = from + h * 3600;
                        let day = (t % 86_400) as f64 / 86_400.0 * std::f64::consts::TAU;
                        let mean = scale(metric)
                            * (1.0 + 0.4 * day.sin())
                            * (0.7 + 0.3 * h as f64 / hours as f64);
                        Bucket {
                            start_secs: t,
                            min: mean * 0.8,
                            max: mean * 1.25,
                            sum: mean * 60.0,
                            count: 60,
                        }
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Both sites' capacity as of noon, with forecasts from 30 rising daily peaks.
fn capacity_at_noon(snapshot: &Snapshot) -> Vec<SiteCapacity> {
    let today = (NOON_MS / 86_400_000) as f64;
    let sites = [
        ("geneva", 1.0, 32.0, 131_072.0),
        ("lausanne", 2.0, 24.0, 98_304.0),
    ];
    sites
        .iter()
        .map(|&(site, n, cpus, memory_mib)| {
            let resource = |resource, capacity: f64, allocated: f64, used: f64, rise: f64| {
                let peaks: Vec<(f64, f64)> = (0..30)
                    .map(|d| {
                        let day = today - 30.0 + d as f64;
                        (
                            day,
                            used * (0.6 + rise * d as f64) * (1.0 + 0.05 * (d % 7) as f64),
                        )
                    })
                    .collect();
                let forecast = (resource != Resource::Storage)
                    .then(|| forecast::forecast(&peaks, capacity, today, Method::PeakTrend));
                ResourceUse {
                    resource,
                    capacity,
                    allocated,
                    used: Some(used),
                    forecast,
                    peaks: if resource == Resource::Storage {
                        Vec::new()
                    } else {
                        peaks
                    },
                }
            };
            SiteCapacity {
                site: site.to_string(),
                hosts: snapshot
                    .hosts
                    .iter()
                    .filter(|h| h.inventory().is_some_and(|i| i.site.name.as_str() == site))
                    .map(|h| h.id().clone())
                    .collect(),
                resources: vec![
                    resource(Resource::Cpu, cpus, 7.0 * n, 4.0 * n, 0.02),
                    resource(
                        Resource::Memory,
                        memory_mib,
                        17_408.0 * n,
                        9_000.0 * n,
                        0.03,
                    ),
                    resource(Resource::Storage, 516_096.0, 150_000.0, 200_000.0, 0.0),
                ],
            }
        })
        .collect()
}

fn pinned_window(
    engine: &EngineHandle,
    snapshot: &Arc<Snapshot>,
    size: [f32; 2],
) -> Harness<'static, ConsoleApp> {
    let mut harness = window_sized(engine, size);
    harness.state_mut().pin_snapshot(snapshot.clone());
    step_until(&mut harness, "the demo's chips", |h| {
        h.query_by_role_and_label(Role::Button, "crm-db").is_some()
    });
    harness
}

#[test]
fn the_topology_and_a_vms_details_keep_their_layout_at_both_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let (runtime, engine, _fleet) = demo_engine(dir.path());
    let _enter = runtime.enter();
    let snapshot = fixed(&engine.snapshot());
    let mut results = Vec::new();
    for (w, h) in [(1600.0, 1000.0), (800.0, 500.0)] {
        let size = format!("{w}x{h}");
        let mut harness = pinned_window(&engine, &snapshot, [w, h]);
        harness.run_ok();
        results.push(harness.try_snapshot(format!("topology-{size}")));
        harness
            .get_by_role_and_label(Role::Button, "crm-db")
            .click();
        // Its snapshots are asked of its agent: the answer is part of the picture.
        step_until(&mut harness, "why crm-db has no snapshots", |h| {
            h.query_by_label_contains("crm-db cannot have snapshots")
                .is_some()
        });
        harness.run_ok();
        results.push(harness.try_snapshot(format!("vm-details-{size}")));

        let mut harness = pinned_window(&engine, &snapshot, [w, h]);
        if w < 1100.0 {
            // The services panel is a strip there: its drawer first.
            harness
                .get_by_role_and_label(Role::Button, "Services")
                .click();
            step_until(&mut harness, "the services drawer", |h| {
                h.query_by_role_and_label(Role::Button, "Plan…").is_some()
            });
        }
        harness.get_by_role_and_label(Role::Button, "Plan…").click();
        step_until(&mut harness, "the plan", |h| {
            h.query_all_by_label_contains("fingerprint")
                .next()
                .is_some()
        });
        harness.run_ok();
        results.push(harness.try_snapshot(format!("plan-{size}")));

        let mut harness = pinned_window(&engine, &snapshot, [w, h]);
        harness.state_mut().show_stats(
            month_of_lsn1().subject.clone(),
            StatsView::from(&month_of_lsn1()),
            TimeRange::Month,
        );
        step_until(&mut harness, "the charts", |h| {
            h.query_by_label("Statistics of host lsn-1").is_some()
        });
        harness.run_ok();
        results.push(harness.try_snapshot(format!("charts-{size}")));

        let mut harness = pinned_window(&engine, &snapshot, [w, h]);
        harness.state_mut().show_capacity(
            capacity_at_noon(&snapshot)
                .iter()
                .map(SiteCapacityView::from)
                .collect(),
        );
        step_until(&mut harness, "the capacity view", |h| {
            h.query_all_by_label_contains("full within")
                .next()
                .is_some()
                || h.query_all_by_label_contains("full in").next().is_some()
        });
        harness.run_ok();
        results.push(harness.try_snapshot(format!("capacity-{size}")));
    }
    let failed: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.err().map(|e| e.to_string()))
        .collect();
    assert!(
        failed.is_empty(),
        "layout snapshots differ:\n{}",
        failed.join("\n")
    );
}
