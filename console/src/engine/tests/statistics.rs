//! Statistics from real agents, kept across a restart, and cost reports.

use super::*;

/// Readings from a real agent become series of a host and of its running VM, and what was
/// stored is read again by a console started afresh on the same store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_come_in_batches_and_survive_a_console_restart() {
    use crate::engine::statistics::series::{Metric, StatsAnswer, Subject};
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), "stats-a").await;
    let engine = engine_with(dir.path(), &agent).await;
    let host = agent.host_id.clone();
    engine
        .request(|reply| Command::CreateVm {
            host: host.clone(),
            spec: spec("busy"),
            start: true,
            reply,
        })
        .await
        .unwrap();
    let vm = Subject::Workload(VmName::new("busy").unwrap());
    let query = |engine: EngineHandle, subject: Subject| async move {
        engine
            .request(|reply| Command::Stats {
                subject,
                since_secs: 600,
                resolution_secs: Some(1),
                reply,
            })
            .await
            .unwrap()
    };
    let points = |a: &StatsAnswer, m: Metric| {
        a.series
            .iter()
            .find(|s| s.metric == m)
            .map_or(0, |s| s.points.len())
    };
    // Batches of five readings: two batches give rates for both subjects.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (host_answer, vm_answer) = loop {
        let h = query(engine.clone(), Subject::Host(host.clone())).await;
        let v = query(engine.clone(), vm.clone()).await;
        if points(&h, Metric::Cpu) >= 5 && points(&v, Metric::Cpu) >= 5 {
            break (h, v);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no series after 60 s: host {h:?}, vm {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(host_answer.resolution_secs, 1);
    let memory = host_answer
        .series
        .iter()
        .find(|s| s.metric == Metric::Memory)
        .unwrap();
    assert!(memory.points.iter().all(|b| b.mean() > 0.0), "{memory:?}");
    // The test driver's VM has the 64 MiB it was given.
    let vm_memory = vm_answer
        .series
        .iter()
        .find(|s| s.metric == Metric::Memory)
        .unwrap();
    assert!(
        vm_memory.points.iter().all(|b| b.mean() == 64.0),
        "{vm_memory:?}"
    );
    // What it costs per hour, bucket by bucket, from its CPU and what it sent.
    let cost = vm_answer
        .series
        .iter()
        .find(|s| s.metric == Metric::Cost)
        .expect("a cost series");
    assert!(
        cost.points.len() >= 5 && cost.points.iter().all(|b| b.mean() >= 0.0),
        "{cost:?}"
    );
    // An unknown resolution is a clear error.
    let err = engine
        .request(|reply| Command::Stats {
            subject: vm.clone(),
            since_secs: 60,
            resolution_secs: Some(7),
            reply,
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no 7 s resolution"), "{err}");

    // The same numbers for Prometheus, on a local port.
    let server = crate::metrics::serve(
        crate::api::EngineClient::InProcess(engine.clone()),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let bound = server.address;
    let get = |path: &'static str| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(bound).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        text
    };
    let text = get("/metrics").await;
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    for wanted in [
        "dunes_host_up{host=\"stats-a\",site=\"default\"} 1",
        "dunes_workload_memory_used_mib{workload=\"busy\",host=\"stats-a\"} 64",
        "# TYPE dunes_host_cpu_percent gauge",
        "dunes_host_cpu_percent{host=\"stats-a\"} ",
    ] {
        assert!(text.contains(wanted), "{wanted:?} not in {text}");
    }
    assert!(get("/").await.starts_with("HTTP/1.1 404"));
    drop(server);

    // A clean stop writes what is open; a new console reads it back.
    let before = points(&vm_answer, Metric::Cpu);
    agent.shutdown().await;
    drop(engine);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let engine = loop {
        match start_with(&dir.path().join("console"), EngineOptions::default()).await {
            Ok(e) => break e,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "{e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let after = query(engine.clone(), vm).await;
    assert!(
        points(&after, Metric::Cpu) >= before,
        "{before} points before the restart, {after:?} after"
    );
    let host_after = query(engine, Subject::Host(host)).await;
    assert!(points(&host_after, Metric::Memory) >= 5, "{host_after:?}");
}

/// A workload deleted within a report's range still counts, up to when it went, under its
/// instance, its service (deleted too) and its site.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_workload_still_counts_in_cost_reports() {
    use crate::engine::statistics::cost::{CostBy, CostLine};
    let dir = tempfile::tempdir().unwrap();
    let agent = agent_with(
        dir.path(),
        "costs",
        "127.0.0.1:0",
        AgentConfig {
            prices: dunes_shared::model::Prices {
                per_cpu_hour: 1.0,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let template = dir.path().join("costs/storage/images/spinner");
    std::fs::create_dir_all(&template).unwrap();
    std::fs::write(
        template.join("process.toml"),
        "description = \"uses some CPU\"\ncommand = [\"/bin/sh\", \"-c\", \"while :; do i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; sleep 0.5; done\"]\ndefault_vcpus = 1\ndefault_memory_mib = 16\n",
    )
    .unwrap();
    let engine = engine_with(dir.path(), &agent).await;
    let source = "name = \"costly\"\n[[application]]\nname = \"job\"\nruntime = \"process\"\ntemplate = \"spinner\"\nvcpus = 1\nmemory_mib = 16\n";
    let service = engine
        .request(|reply| Command::DefineService {
            source: source.into(),
            replace: false,
            reply,
        })
        .await
        .unwrap();
    deploy_and_start(&engine, &service).await;
    let vm = engine.snapshot().services[0].instances[0]
        .record
        .vm
        .to_string();
    let report = |engine: EngineHandle, by: CostBy| async move {
        engine
            .request(|reply| Command::Cost {
                by,
                since_secs: 3600,
                reply,
            })
            .await
            .unwrap()
    };
    let line = |lines: &[CostLine], key: &str| lines.iter().find(|l| l.key == key).cloned();
    // Its CPU-hours while it runs.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let before = loop {
        let lines = report(engine.clone(), CostBy::Instance).await;
        if let Some(l) = line(&lines, &vm).filter(|l| l.usage.cpu_hours > 0.0) {
            break l;
        }
        assert!(std::time::Instant::now() < deadline, "no cost: {lines:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let deleted = engine
        .request(|reply| Command::DeleteService {
            name: service,
            reply,
        })
        .await
        .unwrap();
    assert!(deleted.failed.is_empty(), "{deleted:?}");
    let after = report(engine.clone(), CostBy::Instance).await;
    let gone = line(&after, &vm).expect("the deleted instance is in the report");
    assert!(
        gone.usage.cpu_hours >= before.usage.cpu_hours && gone.cost > 0.0,
        "before {before:?}, after {gone:?}"
    );
    let by_service = report(engine.clone(), CostBy::Service).await;
    assert!(
        line(&by_service, "costly").is_some_and(|l| l.cost == gone.cost),
        "{by_service:?}"
    );
    let by_site = report(engine, CostBy::Site).await;
    assert!(
        line(&by_site, "default").is_some_and(|l| l.cost >= gone.cost),
        "{by_site:?}"
    );
}
