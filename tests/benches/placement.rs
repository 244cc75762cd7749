//! How fast the placement engine places: 10,000 instances of one service on 1,000 hosts, with
//! every rule kind in play, on one core (placement is single-threaded).
//! Run: `cargo bench -p dunes-tests --bench placement`.

use std::time::{Duration, Instant};

use dunes_console::engine::services::placement::{
    HostOffer, Interpreter, Resources, place_instances,
};
use dunes_shared::{
    model::{AppName, HostId, Prices, RuntimeKind, ServiceName, SiteName, TemplateName},
    service::{
        ApplicationSpec, InterpreterNeed, PinRule, Readiness, SecurityRule, ServiceRules,
        ServiceSpec,
    },
};

const HOSTS: usize = 1_000;
const SITES: usize = 10;
const ROUNDS: usize = 7;

fn hosts() -> Vec<HostOffer> {
    (0..HOSTS)
        .map(|i| HostOffer {
            id: HostId::new(format!("host-{i:04}")).unwrap(),
            online: i % 97 != 0,
            maintenance: false,
            site: SiteName::new(format!("site-{}", i % SITES)).unwrap(),
            security_level: (i % 4) as u8,
            prices: Prices {
                per_cpu_hour: 0.01 + (i % 13) as f64 * 0.001,
                per_gb_memory_hour: 0.002 + (i % 7) as f64 * 0.0001,
                per_gb_month_stored: 0.03,
                per_gb_transferred: 0.0,
            },
            link_bandwidth_mbps: [100, 1_000, 10_000][i % 3],
            runtimes: if i % 5 == 0 {
                vec![RuntimeKind::Libvirt]
            } else {
                vec![RuntimeKind::Libvirt, RuntimeKind::Process]
            },
            interpreters: if i % 2 == 0 {
                vec![Interpreter {
                    name: "python3".into(),
                    version: if i % 4 == 0 { "3.11.2" } else { "3.8.10" }.into(),
                }]
            } else {
                Vec::new()
            },
            free: Resources {
                vcpus: 64,
                memory_mib: 256 * 1024,
                storage_mib: 4 * 1024 * 1024,
            },
            taken_names: Default::default(),
            images_held: Default::default(),
        })
        .collect()
}

fn app(name: &str, instances: u32, runtime: RuntimeKind) -> ApplicationSpec {
    ApplicationSpec {
        name: AppName::new(name).unwrap(),
        runtime,
        template: TemplateName::new("tiny").unwrap(),
        image: None,
        disk_gib: None,
        user_data: None,
        interpreter: None,
        vcpus: 1,
        memory_mib: 1024,
        storage_mib: 10 * 1024,
        bandwidth_mbps: 0,
        instances,
        readiness: Readiness::Running,
        depends_on: Vec::new(),
        guest_apps: Vec::new(),
        metric: None,
    }
}

fn service() -> ServiceSpec {
    let n = |s: &str| AppName::new(s).unwrap();
    let mut web = app("web", 3_000, RuntimeKind::Libvirt);
    web.bandwidth_mbps = 1_000;
    let mut db = app("db", 500, RuntimeKind::Libvirt);
    db.storage_mib = 500 * 1024;
    let mut reports = app("reports", 1_500, RuntimeKind::Process);
    reports.interpreter = Some(InterpreterNeed {
        name: "python3".into(),
        min_version: Some("3.9".into()),
    });
    let spec = ServiceSpec {
        name: ServiceName::new("bench").unwrap(),
        applications: vec![
            web,
            app("api", 2_000, RuntimeKind::Libvirt),
            db,
            app("cache", 2_000, RuntimeKind::Libvirt),
            app("payment", 200, RuntimeKind::Libvirt),
            reports,
            app("batch", 800, RuntimeKind::Process),
        ],
        rules: ServiceRules {
            distinct_hosts: vec![n("db")],
            anti_affinity: vec![[n("api"), n("db")]],
            affinity: vec![[n("api"), n("cache")]],
            pin: vec![PinRule {
                application: n("payment"),
                hosts: Vec::new(),
                sites: (0..4)
                    .map(|i| SiteName::new(format!("site-{i}")).unwrap())
                    .collect(),
            }],
            never_relocate: vec![n("payment")],
            min_security_level: vec![SecurityRule {
                application: Some(n("payment")),
                level: 3,
            }],
            allowed_sites: (0..9)
                .map(|i| SiteName::new(format!("site-{i}")).unwrap())
                .collect(),
            max_cost_per_hour: Some(1_000.0),
        },
        network: None,
    };
    spec.validate().expect("the benchmark's service is valid");
    spec
}

fn main() {
    let hosts = hosts();
    let service = service();
    let wanted: u32 = service.applications.iter().map(|a| a.instances).sum();
    let mut times: Vec<Duration> = Vec::new();
    let mut placed = 0;
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let plan = std::hint::black_box(place_instances(&service, &hosts, &[]));
        times.push(started.elapsed());
        placed = plan.placements.len();
        assert!(
            plan.is_feasible(),
            "the benchmark's service must fit: {:?}",
            plan.unplaced.first()
        );
    }
    times.sort();
    let median = times[times.len() / 2];
    println!(
        "{placed} of {wanted} instances on {HOSTS} hosts: median {median:.1?}, best {:.1?} over {ROUNDS} rounds",
        times[0]
    );
    println!(
        "placements per second: {:.0} (median), {:.0} (best)",
        placed as f64 / median.as_secs_f64(),
        placed as f64 / times[0].as_secs_f64()
    );
}
