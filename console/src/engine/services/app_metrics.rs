//! Application metrics: every few seconds, each running instance of an application whose
//! service file names a `metric` (a command printing a number, or the connections to a port)
//! is read on its agent (inside a VM, through its guest agent). The values become the
//! instance's `app-metric` series, which charts show and autoscaling rules can watch.

use dunes_shared::{
    protocol::{MetricKind, MetricProbe, MetricReply, ReadMetric},
    service::{AppMetric, ApplicationSpec},
};

use crate::engine::{
    actor::Actor,
    fleet::client::AgentClient,
    records::{InstanceKey, InstanceRecord},
    services::probes::{InstanceProbe, ProbeAnswer, Probed},
    statistics::series::{Metric, Subject},
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

/// An application's metric, read every few seconds on each running instance.
pub(in crate::engine) struct AppMetricProbe;

impl InstanceProbe for AppMetricProbe {
    type Question = MetricProbe;
    type Answer = Result<MetricReply, String>;
    type Kept = Result<f64, String>;

    fn question(app: &ApplicationSpec) -> Option<MetricProbe> {
        app.metric.as_ref().map(probe_of_metric)
    }

    async fn ask(
        client: AgentClient,
        instance: InstanceRecord,
        probe: MetricProbe,
    ) -> Result<MetricReply, String> {
        client
            .call(ReadMetric {
                name: instance.vm.clone(),
                probe,
                runtime: instance.runtime,
            })
            .await
            .map_err(|e| e.to_string())
    }

    fn message(key: InstanceKey, answer: Self::Answer) -> ProbeAnswer {
        ProbeAnswer::AppMetric(key, answer)
    }

    fn probed(actor: &mut Actor) -> &mut Probed<Result<f64, String>> {
        &mut actor.services.metric_reads
    }

    /// Keeps the value and feeds the instance's `app-metric` series.
    fn answered(actor: &mut Actor, key: InstanceKey, answer: Self::Answer) -> bool {
        let Some(instance) = actor.services.instances.get(&key) else {
            return false;
        };
        let shown = match answer {
            Ok(reply) => {
                let writes = actor.statistics.series.ingest_value(
                    &Subject::Workload(instance.vm.clone()),
                    Metric::AppMetric,
                    reply.at_unix_ms,
                    reply.value,
                );
                actor.store.put_stats(writes);
                Ok(reply.value)
            }
            Err(e) => Err(e),
        };
        actor.services.metric_reads.keep(key, shown)
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
