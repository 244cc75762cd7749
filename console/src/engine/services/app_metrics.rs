//! Application metrics: every few seconds, each running instance of an application whose
//! service file names a `metric` (a command printing a number, or the connections to a port)
//! is read on its agent (inside a VM, through its guest agent). The values become the
//! instance's `app-metric` series, which charts show and autoscaling rules can watch.

use dunes_shared::{
    protocol::{MetricKind, MetricProbe},
    service::AppMetric,
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
