//! Autoscaling on CPU and on an application's metric, with its reasons logged.

use super::*;

/// A front-end of the process runtime whose load a flag file turns on: autoscaling adds an
/// instance while it is busy and removes the newest once it is quiet, and says why in the
/// event log; a replay over the recorded history finds the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_front_end_scales_out_and_back_in_with_its_reasons_logged() {
    use crate::engine::autoscale::{AutoscaleMetric, AutoscaleRule, Change};
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // The load switch: readable by the instances' own users.
    let switch = tempfile::tempdir().unwrap();
    std::fs::set_permissions(switch.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let load = switch.path().join("load");
    let agent = agent(dir.path(), "scaling").await;
    let template = dir.path().join("scaling/storage/images/burner");
    std::fs::create_dir_all(&template).unwrap();
    let script = format!(
        "while :; do if [ -e {} ]; then i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; else sleep 0.2; fi; done",
        load.display()
    );
    std::fs::write(
        template.join("process.toml"),
        format!(
            "description = \"busy while the load file exists\"\ncommand = [\"/bin/sh\", \"-c\", {script:?}]\ndefault_vcpus = 1\ndefault_memory_mib = 32\n"
        ),
    )
    .unwrap();
    let engine = engine_with(dir.path(), &agent).await;
    let source = "name = \"front\"\n[[application]]\nname = \"web\"\nruntime = \"process\"\ntemplate = \"burner\"\nvcpus = 1\nmemory_mib = 32\ninstances = 1\n";
    let name = engine
        .request(|reply| Command::DefineService {
            source: source.into(),
            replace: false,
            reply,
        })
        .await
        .unwrap();
    deploy_and_start(&engine, &name).await;
    let web = AppName::new("web").unwrap();
    let rule = AutoscaleRule {
        metric: AutoscaleMetric::Cpu,
        scale_out_above: 40.0,
        scale_in_below: 10.0,
        period_secs: 5,
        periods: 2,
        cooldown_secs: 10,
        min_instances: 1,
        max_instances: 2,
    };
    // A rule without hysteresis is refused, and changes nothing.
    let bad = engine
        .request(|reply| Command::SetAutoscale {
            service: name.clone(),
            app: web.clone(),
            rule: Some(AutoscaleRule {
                scale_in_below: 50.0,
                ..rule.clone()
            }),
            reply,
        })
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("must be below"), "{bad}");
    let view = engine
        .request(|reply| Command::SetAutoscale {
            service: name.clone(),
            app: web.clone(),
            rule: Some(rule.clone()),
            reply,
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!((view.desired, view.instances), (1, 1));
    let running = |s: &crate::engine::Snapshot, n: usize| {
        let instances = &s.services[0].instances;
        instances.len() == n
            && instances
                .iter()
                .all(|i| i.vm_state == Some(dunes_shared::model::VmState::Running))
    };
    let log = |engine: &EngineHandle| -> Vec<String> {
        engine
            .snapshot()
            .events
            .iter()
            .map(|e| e.message.clone())
            .collect()
    };

    // Busy: a second instance, placed and started.
    std::fs::write(&load, "").unwrap();
    let out = engine
        .wait_for(Duration::from_secs(120), |s| running(s, 2))
        .await;
    assert!(out.is_ok(), "no second instance: {:?}", log(&engine));
    let reason = log(&engine)
        .into_iter()
        .find(|m| m.starts_with("autoscale front: web cpu mean"))
        .unwrap();
    assert!(
        reason.contains("> 40 % for 2×5 s → +1 instance on scaling"),
        "{reason}"
    );

    // Quiet: the newest goes, never below the minimum.
    std::fs::remove_file(&load).unwrap();
    let back = engine
        .wait_for(Duration::from_secs(120), |s| running(s, 1))
        .await;
    assert!(back.is_ok(), "still two instances: {:?}", log(&engine));
    assert_eq!(engine.snapshot().services[0].instances[0].record.index, 0);
    let reason = log(&engine)
        .into_iter()
        .find(|m| m.contains("→ −1 instance (the newest)"))
        .unwrap();
    assert!(reason.contains("< 10 % for 2×5 s"), "{reason}");
    let shown = engine
        .request(|reply| Command::AutoscaleShow { reply })
        .await
        .unwrap();
    assert_eq!((shown[0].desired, shown[0].instances), (1, 1));

    // The replay over what was recorded scales out and back in too.
    let replayed = engine
        .request(|reply| Command::ReplayAutoscale {
            service: name.clone(),
            app: web.clone(),
            since_secs: 600,
            reply,
        })
        .await
        .unwrap();
    assert_eq!(replayed.period_secs, 5);
    let kinds: Vec<Change> = replayed
        .changes
        .iter()
        .filter_map(|(_, d)| d.change)
        .collect();
    assert!(
        kinds.contains(&Change::Out) && kinds.contains(&Change::In),
        "{replayed:?}"
    );
}

/// An application metric (a queue's length, printed by a command) drives autoscaling: a long
/// queue adds a worker, an empty one removes it; the values are the instances' `app-metric`
/// series. A rule on a metric the application does not have is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_length_metric_scales_workers_out_and_in() {
    use crate::engine::autoscale::{AutoscaleMetric, AutoscaleRule};
    use crate::engine::statistics::series::{Metric, Subject};
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // The queue: a file the instances' own users can read.
    let shared = tempfile::tempdir().unwrap();
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let queue = shared.path().join("queue");
    std::fs::write(&queue, "0\n").unwrap();
    std::fs::set_permissions(&queue, std::fs::Permissions::from_mode(0o644)).unwrap();
    let agent = agent(dir.path(), "queues").await;
    let template = dir.path().join("queues/storage/images/idler");
    std::fs::create_dir_all(&template).unwrap();
    std::fs::write(
        template.join("process.toml"),
        "description = \"idle\"\ncommand = [\"/bin/sh\", \"-c\", \"while :; do sleep 1; done\"]\ndefault_vcpus = 1\ndefault_memory_mib = 16\n",
    )
    .unwrap();
    let engine = engine_with(dir.path(), &agent).await;
    let source = format!(
        "name = \"jobs\"\n[[application]]\nname = \"worker\"\nruntime = \"process\"\ntemplate = \"idler\"\nvcpus = 1\nmemory_mib = 16\nmetric = {{ command = \"cat {}\" }}\n[[application]]\nname = \"plain\"\nruntime = \"process\"\ntemplate = \"idler\"\nvcpus = 1\nmemory_mib = 16\n",
        queue.display()
    );
    let name = engine
        .request(|reply| Command::DefineService {
            source,
            replace: false,
            reply,
        })
        .await
        .unwrap();
    deploy_and_start(&engine, &name).await;
    let rule = AutoscaleRule {
        metric: AutoscaleMetric::AppMetric,
        scale_out_above: 20.0,
        scale_in_below: 5.0,
        period_secs: 5,
        periods: 1,
        cooldown_secs: 0,
        min_instances: 1,
        max_instances: 2,
    };
    let refused = engine
        .request(|reply| Command::SetAutoscale {
            service: name.clone(),
            app: AppName::new("plain").unwrap(),
            rule: Some(rule.clone()),
            reply,
        })
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("plain has no metric"),
        "{refused}"
    );
    let worker = AppName::new("worker").unwrap();
    engine
        .request(|reply| Command::SetAutoscale {
            service: name.clone(),
            app: worker.clone(),
            rule: Some(rule),
            reply,
        })
        .await
        .unwrap();
    let workers = |s: &crate::engine::Snapshot| -> Vec<crate::engine::InstanceView> {
        s.services[0]
            .instances
            .iter()
            .filter(|i| i.record.app == worker)
            .cloned()
            .collect()
    };
    let log = |engine: &EngineHandle| -> Vec<String> {
        engine
            .snapshot()
            .events
            .iter()
            .map(|e| e.message.clone())
            .collect()
    };
    // The value read shows on the instance.
    engine
        .wait_for(Duration::from_secs(30), |s| {
            workers(s)
                .first()
                .is_some_and(|i| i.metric == Some(Ok(0.0)))
        })
        .await
        .unwrap_or_else(|s| panic!("no metric read: {:?}", workers(&s)));

    std::fs::write(&queue, "30\n").unwrap();
    let out = engine
        .wait_for(Duration::from_secs(120), |s| {
            let w = workers(s);
            w.len() == 2
                && w.iter()
                    .all(|i| i.vm_state == Some(dunes_shared::model::VmState::Running))
        })
        .await;
    assert!(out.is_ok(), "no second worker: {:?}", log(&engine));
    let reason = log(&engine)
        .into_iter()
        .find(|m| m.starts_with("autoscale jobs: worker app-metric mean"))
        .unwrap();
    assert!(
        reason.contains("mean 30.0 > 20 for 1×5 s → +1 instance on queues"),
        "{reason}"
    );

    std::fs::write(&queue, "1\n").unwrap();
    let back = engine
        .wait_for(Duration::from_secs(120), |s| workers(s).len() == 1)
        .await;
    assert!(back.is_ok(), "still two workers: {:?}", log(&engine));
    assert!(
        log(&engine)
            .iter()
            .any(|m| m.contains("worker app-metric mean 1.0 < 5 for 1×5 s → −1 instance")),
        "{:?}",
        log(&engine)
    );
    // The values are a series of the instance, as charts and `ctl stats` show them.
    let vm = workers(&engine.snapshot())[0].record.vm.clone();
    let answer = engine
        .request(|reply| Command::Stats {
            subject: Subject::Workload(vm),
            since_secs: 600,
            resolution_secs: Some(1),
            reply,
        })
        .await
        .unwrap();
    let values: Vec<f64> = answer
        .series
        .iter()
        .find(|s| s.metric == Metric::AppMetric)
        .map(|s| s.points.iter().map(|b| b.max).collect())
        .unwrap_or_default();
    assert!(
        values.contains(&30.0) && values.contains(&1.0),
        "{values:?}"
    );
}
