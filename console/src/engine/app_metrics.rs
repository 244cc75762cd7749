//! Application metrics: every few seconds, each running instance of an application whose
//! service file names a `metric` (a command printing a number, or the connections to a port)
//! is read on its agent (inside a VM, through its guest agent). The values become the
//! instance's `app-metric` series, which charts show and autoscaling rules can watch.

use dunes_shared::{
    protocol::{MetricKind, MetricProbe, ReadMetric},
    service::AppMetric,
};

use super::{
    actor::{Actor, Internal},
    stats::{Metric, Subject},
};

/// The probe the agent gets for an application's metric.
pub fn probe_of_metric(metric: &AppMetric) -> MetricProbe {
    match metric {
        AppMetric::Command { command } => MetricProbe {
            kind: MetricKind::Command,
            port: None,
            command: Some(command.clone()),
        },
        AppMetric::Tcp { port } => MetricProbe {
            kind: MetricKind::Tcp,
            port: Some(*port),
            command: None,
        },
    }
}

impl Actor {
    /// Starts a read for every running instance whose application has a metric and has no
    /// read under way; forgets the last reads of instances that no longer run.
    pub(super) fn read_app_metrics(&mut self) {
        let mut to_read = Vec::new();
        let mut stale = Vec::new();
        for (key, instance) in &self.instances {
            let Some(probe) = self
                .services
                .get(&instance.service)
                .and_then(|s| s.spec.as_ref().ok())
                .and_then(|spec| spec.application(&instance.app))
                .and_then(|app| app.metric.as_ref())
                .map(probe_of_metric)
            else {
                continue;
            };
            let running = self.instance_runs(instance);
            if !running {
                if self.metric_reads.contains_key(key) {
                    stale.push(key.clone());
                }
                continue;
            }
            if !self.metric_reading.contains(key) {
                to_read.push((key.clone(), instance.clone(), probe));
            }
        }
        for key in stale {
            self.metric_reads.remove(&key);
            self.services_dirty = true;
        }
        for (key, instance, probe) in to_read {
            let Ok(client) = self.client(&instance.host) else {
                continue;
            };
            self.metric_reading.insert(key.clone());
            let internal = self.internal_tx.clone();
            tokio::spawn(async move {
                let answer = client
                    .call(ReadMetric {
                        name: instance.vm.clone(),
                        probe,
                        runtime: instance.runtime,
                    })
                    .await
                    .map_err(|e| e.to_string());
                let done = move |actor: &mut Actor| actor.app_metric_read(key, answer);
                let _ = internal.send(Internal::CallDone(Box::new(done))).await;
            });
        }
    }

    fn app_metric_read(
        &mut self,
        key: String,
        answer: Result<dunes_shared::protocol::MetricReply, String>,
    ) {
        self.metric_reading.remove(&key);
        let Some(instance) = self.instances.get(&key) else {
            return;
        };
        let shown = match answer {
            Ok(reply) => {
                let writes = self.stats.ingest_value(
                    &Subject::Workload(instance.vm.clone()),
                    Metric::AppMetric,
                    reply.at_unix_ms,
                    reply.value,
                );
                self.store.put_stats(writes);
                Ok(reply.value)
            }
            Err(e) => Err(e),
        };
        if self.metric_reads.get(&key) != Some(&shown) {
            self.metric_reads.insert(key, shown);
            self.services_dirty = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metric_becomes_the_probe_its_agent_reads() {
        let probe = probe_of_metric(&AppMetric::Tcp { port: 80 });
        assert_eq!((probe.kind, probe.port), (MetricKind::Tcp, Some(80)));
        let probe = probe_of_metric(&AppMetric::Command {
            command: "cat /run/q".into(),
        });
        assert_eq!(probe.kind, MetricKind::Command);
        assert_eq!(probe.command.as_deref(), Some("cat /run/q"));
    }
}
