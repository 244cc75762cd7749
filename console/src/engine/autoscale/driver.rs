//! The engine's side of autoscaling: at the end of each period of a rule, the mean of its
//! application's instances is read from the time series (off the engine's thread), the rule
//! decides, and a change sets the application's instance count and deploys it (placement
//! picks the host of a new instance, a scale-in removes the newest). Every change goes in
//! the event log with the numbers behind it.

use std::collections::BTreeMap;

use dunes_shared::model::{AppName, ServiceName};

use crate::engine::{
    EngineError, Reply,
    actor::{Actor, Internal},
    autoscale::{
        AutoscaleEntry, AutoscaleMetric, AutoscaleRule, Change, Decision, decide, period_means,
        replay, state::key,
    },
    records::{InstanceState, Level, now_ms},
    services::placement::Action,
    statistics::rollup,
    statistics::series::{self, Metric, Subject},
    store::AutoscaleRecord,
};

/// Readings come in batches of 5 s: a period is measured this long after it ends.
const SAMPLE_DELAY_SECS: u64 = 7;

/// An application's autoscaling as `autoscale show` prints it.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoscaleView {
    pub service: ServiceName,
    pub app: AppName,
    pub rule: AutoscaleRule,
    /// The instance count the rule set.
    pub desired: u32,
    /// Instances that exist now.
    pub instances: u32,
    pub last_change_secs: Option<u64>,
    /// What the rule said at the end of its last period.
    pub last_reason: Option<String>,
}

/// What a rule would have done over recorded history.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayAnswer {
    pub service: ServiceName,
    pub app: AppName,
    pub rule: AutoscaleRule,
    /// The period the replay used (at least the stored resolution of that range).
    pub period_secs: u64,
    pub periods: usize,
    pub from_secs: u64,
    pub to_secs: u64,
    pub start_instances: u32,
    pub changes: Vec<(u64, Decision)>,
}

/// The per-second (or per-bucket) mean over instances of their series, from each instance's
/// buckets: `(start, mean of the instances that have it)`.
fn mean_over_instances(per_instance: &[Vec<rollup::Bucket>]) -> Vec<(u64, f64)> {
    let mut sums: BTreeMap<u64, (f64, u32)> = BTreeMap::new();
    for buckets in per_instance {
        for b in buckets {
            let slot = sums.entry(b.start_secs).or_default();
            slot.0 += b.mean();
            slot.1 += 1;
        }
    }
    sums.into_iter()
        .map(|(t, (sum, n))| (t, sum / f64::from(n)))
        .collect()
}

impl Actor {
    /// The application whose instances a rule on `app` adds and removes: itself, or for an
    /// application inside VMs, the one whose VMs hold it. `None` when the service has no
    /// such application (or no longer reads).
    fn scaled_app(&self, service: &ServiceName, app: &AppName) -> Option<AppName> {
        let spec = self.services.entries.get(service)?.spec.as_ref().ok()?;
        if spec.application(app).is_some() {
            return Some(app.clone());
        }
        spec.guest_app(app).map(|(holder, _)| holder.name.clone())
    }

    /// The series a rule on `app` reads for `metric`, one per instance, with their open
    /// buckets at `level`: each instance's own (CPU, application metric), or the CPU of the
    /// application inside each VM.
    fn watched_series(
        &self,
        service: &ServiceName,
        app: &AppName,
        metric: AutoscaleMetric,
        level: usize,
        created_only: bool,
    ) -> Vec<(String, Vec<rollup::Bucket>)> {
        let Some(scaled) = self.scaled_app(service, app) else {
            return Vec::new();
        };
        let inside = &scaled != app;
        self.services
            .instances
            .values()
            .filter(|i| {
                &i.service == service
                    && i.app == scaled
                    && (!created_only || i.state == InstanceState::Created)
            })
            .map(|i| {
                let (subject, m) = match (metric, inside) {
                    (AutoscaleMetric::Cpu, true) => {
                        (Subject::GuestApp(i.vm.clone(), app.clone()), Metric::Cpu)
                    }
                    (AutoscaleMetric::Cpu, false) => (Subject::Workload(i.vm.clone()), Metric::Cpu),
                    (AutoscaleMetric::AppMetric, _) => {
                        (Subject::Workload(i.vm.clone()), Metric::AppMetric)
                    }
                };
                let k = series::series_key(&subject, m);
                let open = self.statistics.series.open(&k, level);
                (k, open)
            })
            .collect()
    }

    fn instance_count(&self, service: &ServiceName, app: &AppName) -> u32 {
        let app = &self.scaled_app(service, app).unwrap_or_else(|| app.clone());
        self.services
            .instances
            .values()
            .filter(|i| {
                &i.service == service && &i.app == app && i.state != InstanceState::Removing
            })
            .count() as u32
    }

    pub(in crate::engine) fn autoscale_views(&self) -> Vec<AutoscaleView> {
        self.autoscaling
            .entries
            .values()
            .map(|e| AutoscaleView {
                service: e.record.service.clone(),
                app: e.record.app.clone(),
                rule: e.record.rule.clone(),
                desired: e.record.desired,
                instances: self.instance_count(&e.record.service, &e.record.app),
                last_change_secs: e.record.last_change_secs,
                last_reason: e.last_reason.clone(),
            })
            .collect()
    }

    /// Sets (or with `None` removes) the rule of an application.
    pub(in crate::engine) fn set_autoscale(
        &mut self,
        service: ServiceName,
        app: AppName,
        rule: Option<AutoscaleRule>,
        reply: Reply<Option<AutoscaleView>>,
    ) {
        let entry_key = key(&service, &app);
        let Some(rule) = rule else {
            if self.autoscaling.entries.remove(&entry_key).is_none() {
                let _ = reply.send(Err(EngineError::Invalid(format!(
                    "{entry_key} has no autoscaling"
                ))));
                return;
            }
            self.store.delete_autoscale(entry_key.clone());
            self.log(
                Level::Info,
                None,
                format!("autoscaling of {entry_key} removed; its instances stay as they are"),
            );
            self.services.dirty = true;
            self.reply_after_commit(reply, None);
            return;
        };
        let checked = (|| {
            rule.validate()
                .map_err(|e| EngineError::Invalid(e.to_string()))?;
            let spec = self
                .services
                .entries
                .get(&service)
                .ok_or_else(|| EngineError::Invalid(format!("service {service} does not exist")))?
                .spec
                .clone()
                .map_err(|e| {
                    EngineError::Invalid(format!("service {service} no longer reads: {e}"))
                })?;
            match (spec.application(&app), spec.guest_app(&app)) {
                (None, None) => {
                    return Err(EngineError::Invalid(format!(
                        "service {service} has no application {app}"
                    )));
                }
                (Some(a), _) if rule.metric == AutoscaleMetric::AppMetric && a.metric.is_none() => {
                    return Err(EngineError::Invalid(format!(
                        "application {app} has no metric: add metric = {{ command = \"...\" }} or {{ tcp = PORT }} to it in the service file"
                    )));
                }
                (None, Some((holder, _))) => {
                    if rule.metric != AutoscaleMetric::Cpu {
                        return Err(EngineError::Invalid(format!(
                            "application {app} runs inside {}'s VMs: its rule watches its cpu",
                            holder.name
                        )));
                    }
                    if self
                        .autoscaling
                        .entries
                        .contains_key(&key(&service, &holder.name))
                    {
                        return Err(EngineError::Invalid(format!(
                            "{} already has a rule, which scales the VMs {app} runs in",
                            key(&service, &holder.name)
                        )));
                    }
                }
                (Some(a), None) => {
                    if let Some(g) = a.guest_apps.iter().find(|g| {
                        self.autoscaling
                            .entries
                            .contains_key(&key(&service, &g.name))
                    }) {
                        return Err(EngineError::Invalid(format!(
                            "{} already has a rule, which scales {app}'s VMs",
                            key(&service, &g.name)
                        )));
                    }
                }
                _ => {}
            }
            Ok(())
        })();
        if let Err(e) = checked {
            let _ = reply.send(Err(e));
            return;
        }
        let now = self.instance_count(&service, &app);
        let desired = now.clamp(rule.min_instances, rule.max_instances);
        let record = AutoscaleRecord {
            service: service.clone(),
            app: app.clone(),
            rule: rule.clone(),
            desired,
            last_change_secs: self
                .autoscaling
                .entries
                .get(&entry_key)
                .and_then(|e| e.record.last_change_secs),
        };
        self.store.put_autoscale(&record);
        self.autoscaling
            .entries
            .insert(entry_key.clone(), AutoscaleEntry::new(record));
        self.log(
            Level::Info,
            None,
            format!("autoscaling of {entry_key}: {}", rule.describe()),
        );
        self.services.dirty = true;
        let view = self
            .autoscale_views()
            .into_iter()
            .find(|v| v.service == service && v.app == app);
        self.reply_after_commit(reply, view);
    }

    /// Every few seconds: measures the periods that ended, and deploys an instance count a
    /// rule set that is not there yet (a deploy refused while the service was busy).
    pub(in crate::engine) fn autoscale_tick(&mut self) {
        let now = now_ms() / 1000;
        let keys: Vec<String> = self.autoscaling.entries.keys().cloned().collect();
        for entry_key in keys {
            let Some(entry) = self.autoscaling.entries.get(&entry_key) else {
                continue;
            };
            let (service, app) = (entry.record.service.clone(), entry.record.app.clone());
            let desired = entry.record.desired;
            // The service or the application went away: so does its rule.
            let gone = self.services.entries.get(&service).is_none_or(|s| {
                s.spec.as_ref().is_ok_and(|spec| {
                    spec.application(&app).is_none() && spec.guest_app(&app).is_none()
                })
            });
            if gone {
                self.autoscaling.entries.remove(&entry_key);
                self.store.delete_autoscale(entry_key.clone());
                self.log(
                    Level::Info,
                    None,
                    format!("autoscaling of {entry_key} removed: the application no longer exists"),
                );
                continue;
            }
            if self.instance_count(&service, &app) != desired && self.not_busy(&service).is_ok() {
                self.apply_scale(&service);
            }
            let Some(entry) = self.autoscaling.entries.get_mut(&entry_key) else {
                continue;
            };
            // The last period whose readings are all in.
            let period = entry.record.rule.period_secs;
            let settled = now.saturating_sub(SAMPLE_DELAY_SECS);
            let end = settled - settled % period;
            if end <= entry.last_period_end || entry.measuring {
                continue;
            }
            entry.measuring = true;
            let metric = entry.record.rule.metric;
            let series = self.watched_series(&service, &app, metric, 0, true);
            let reader = self.store.stats_reader();
            let internal = self.internal_tx.clone();
            let from = end - period;
            tokio::task::spawn_blocking(move || {
                let mut per_instance = Vec::new();
                for (k, open) in series {
                    let mut points = reader.buckets(&k, 0, from, end).unwrap_or_default();
                    series::merge_open(&mut points, open, from);
                    points.retain(|b| b.start_secs < end);
                    if !points.is_empty() {
                        // Each instance counts once, whatever its number of readings.
                        let mean =
                            points.iter().map(|b| b.mean()).sum::<f64>() / points.len() as f64;
                        per_instance.push(mean);
                    }
                }
                let mean = (!per_instance.is_empty())
                    .then(|| per_instance.iter().sum::<f64>() / per_instance.len() as f64);
                let _ = internal.blocking_send(Internal::AutoscaleMeasured {
                    key: entry_key,
                    end,
                    mean,
                });
            });
        }
    }

    pub(in crate::engine) fn autoscale_measured(
        &mut self,
        entry_key: &str,
        end: u64,
        mean: Option<f64>,
    ) {
        let instances = {
            let Some(entry) = self.autoscaling.entries.get(entry_key) else {
                return;
            };
            self.instance_count(&entry.record.service, &entry.record.app)
        };
        let Some(entry) = self.autoscaling.entries.get_mut(entry_key) else {
            return;
        };
        entry.measuring = false;
        let rule = entry.record.rule.clone();
        // A period skipped breaks the run.
        if entry.last_period_end + rule.period_secs != end {
            entry.recent.clear();
        }
        entry.last_period_end = end;
        let Some(mean) = mean else {
            entry.recent.clear();
            entry.last_reason = Some(format!(
                "{}: no readings of its {instances} instances in the period to {end}",
                entry.record.app
            ));
            return;
        };
        entry.recent.push(mean);
        let keep = rule.periods as usize;
        if entry.recent.len() > keep {
            entry.recent.drain(..entry.recent.len() - keep);
        }
        let decision = decide(
            &rule,
            entry.record.app.as_str(),
            &entry.recent,
            entry.record.desired,
            end,
            entry.record.last_change_secs,
        );
        entry.last_reason = Some(decision.reason.clone());
        if decision.change.is_none() {
            return;
        }
        entry.record.desired = decision.instances;
        entry.record.last_change_secs = Some(end);
        entry.recent.clear();
        let record = entry.record.clone();
        self.store.put_autoscale(&record);
        self.services.dirty = true;
        // Where the change lands, for the log: placement's host of a new instance, or the
        // host of the instance that goes.
        let service = record.service.clone();
        let scaled = self
            .scaled_app(&service, &record.app)
            .unwrap_or_else(|| record.app.clone());
        let place = match (decision.change, self.plan_service(&service, &[])) {
            (Some(Change::Out), Ok(plan)) => plan
                .plan
                .placements
                .iter()
                .find(|p| p.app == scaled && p.action == Action::Create)
                .map(|p| format!(" on {}", p.host))
                .unwrap_or_else(|| " (placement finds no host: see `service plan`)".into()),
            (Some(Change::In), Ok(plan)) => plan
                .plan
                .removals
                .iter()
                .find(|r| r.app == scaled)
                .map(|r| format!(" ({}-{}-{} on {})", service, r.app, r.index, r.host))
                .unwrap_or_default(),
            _ => String::new(),
        };
        self.log(
            Level::Info,
            None,
            format!("autoscale {service}: {}{place}", decision.reason),
        );
        self.apply_scale(&service);
    }

    /// Deploys the counts the rules set, then starts what is not running.
    fn apply_scale(&mut self, service: &ServiceName) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.deploy_service(service, None, &[], tx);
        let internal = self.internal_tx.clone();
        let name = service.clone();
        tokio::spawn(async move {
            let deployed = rx.await.unwrap_or(Err(EngineError::Stopped));
            let report = match deployed {
                Ok(report) => report,
                Err(e) => {
                    let _ = internal
                        .send(Internal::Log {
                            level: Level::Warning,
                            host: None,
                            message: format!("autoscale {name}: the deploy did not run: {e}"),
                        })
                        .await;
                    return;
                }
            };
            for (instance, why) in &report.failed {
                let _ = internal
                    .send(Internal::Log {
                        level: Level::Warning,
                        host: None,
                        message: format!("autoscale {name}: {instance}: {why}"),
                    })
                    .await;
            }
            // The instances this deploy made are started; others stay as the operator left them.
            let made: Vec<String> = report.done.iter().map(|d| d.0.clone()).collect();
            if made.is_empty() {
                return;
            }
            let _ = internal
                .send(Internal::AutoscaleMade {
                    service: name,
                    made,
                })
                .await;
        });
    }

    /// Runs a rule over the recorded CPU of its application's instances since `since_secs`
    /// ago, at the finest stored resolution that holds the range.
    pub(in crate::engine) fn replay_autoscale(
        &mut self,
        service: ServiceName,
        app: AppName,
        since_secs: u64,
        reply: Reply<ReplayAnswer>,
    ) {
        let entry_key = key(&service, &app);
        let Some(entry) = self.autoscaling.entries.get(&entry_key) else {
            let _ = reply.send(Err(EngineError::Invalid(format!(
                "{entry_key} has no autoscaling: set a rule first (autoscale set)"
            ))));
            return;
        };
        let rule = entry.record.rule.clone();
        let now = now_ms() / 1000;
        let from = now.saturating_sub(since_secs);
        let level = rollup::level_for(from, now, u64::MAX);
        let step = rollup::RESOLUTIONS[level].step_secs;
        // Every VM the application had in that range is not known; those it has now are.
        let series = self.watched_series(&service, &app, rule.metric, level, false);
        let start_instances = rule.min_instances;
        let reader = self.store.stats_reader();
        tokio::task::spawn_blocking(move || {
            let mut per_instance = Vec::new();
            for (k, open) in series {
                let mut points = match reader.buckets(&k, level, from, now + 1) {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = reply.send(Err(EngineError::Store(dunes_shared::error_chain(&e))));
                        return;
                    }
                };
                series::merge_open(&mut points, open, from);
                per_instance.push(points);
            }
            let samples = mean_over_instances(&per_instance);
            let period_secs = rule.period_secs.max(step);
            let replayed_rule = AutoscaleRule {
                period_secs,
                ..rule.clone()
            };
            let means = period_means(&samples, period_secs);
            let changes = replay(&replayed_rule, app.as_str(), &means, start_instances);
            let _ = reply.send(Ok(ReplayAnswer {
                service,
                app,
                rule,
                period_secs,
                periods: means.len(),
                from_secs: from,
                to_secs: now,
                start_instances,
                changes,
            }));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_are_averaged_per_bucket() {
        let a = vec![rollup::Bucket::new(10, 80.0), rollup::Bucket::new(11, 60.0)];
        let b = vec![rollup::Bucket::new(10, 40.0)];
        assert_eq!(mean_over_instances(&[a, b]), vec![(10, 60.0), (11, 60.0)]);
    }
}
