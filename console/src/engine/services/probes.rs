//! One poller for what is asked of each running instance every few seconds: its readiness
//! check, its guest applications, its application metric. Each kind says which instances it
//! asks and what it keeps ([`InstanceProbe`]); the poller asks at most one question at a time
//! per instance, forgets the answers of instances that stopped, and brings each answer back
//! to the engine as a typed message ([`ProbeAnswer`]).

use std::future::Future;

use dunes_shared::{
    protocol::{
        CheckReady, GuestAppProbe, GuestApps, GuestAppsReply, MetricProbe, MetricReply, ProbeKind,
        ReadMetric, ReadinessProbe,
    },
    service::ApplicationSpec,
};

use crate::engine::{
    actor::{Actor, Internal},
    fleet::client::AgentClient,
    records::{InstanceKey, InstanceRecord},
    services::{
        app_metrics::probe_of_metric,
        guest_apps::{GuestLook, cpu_between, probe_of_guest_app},
        readiness::{LastCheck, probe_of},
        state::{ProbeAnswer, Probed},
    },
    statistics::series::{Metric, Subject},
};

/// One kind of question asked of running instances.
pub(in crate::engine) trait InstanceProbe {
    type Question: Send + 'static;
    type Answer: Send + 'static;
    type Kept;

    /// The question for an instance of `app`; none when its application asks nothing.
    fn question(app: &ApplicationSpec) -> Option<Self::Question>;

    /// Asks the instance's agent.
    fn ask(
        client: AgentClient,
        instance: InstanceRecord,
        question: Self::Question,
    ) -> impl Future<Output = Self::Answer> + Send + 'static;

    /// The typed message the answer comes back as.
    fn message(key: InstanceKey, answer: Self::Answer) -> ProbeAnswer;

    fn probed(actor: &mut Actor) -> &mut Probed<Self::Kept>;

    /// Takes an answer in (the instance still exists); answers whether what the views
    /// show changed.
    fn answered(actor: &mut Actor, key: InstanceKey, answer: Self::Answer) -> bool;
}

impl Actor {
    /// Asks every running instance whose application asks `P` and that has no question of
    /// `P` under way; forgets `P`'s answers of instances that no longer run.
    pub(in crate::engine) fn poll_instances<P: InstanceProbe>(&mut self) {
        let wanted: Vec<(InstanceKey, InstanceRecord, P::Question, bool)> = self
            .services
            .instances
            .iter()
            .filter_map(|(key, instance)| {
                let question = self
                    .services
                    .entries
                    .get(&instance.service)
                    .and_then(|s| s.spec.as_ref().ok())
                    .and_then(|spec| spec.application(&instance.app))
                    .and_then(P::question)?;
                Some((
                    key.clone(),
                    instance.clone(),
                    question,
                    self.fleet.runs(instance),
                ))
            })
            .collect();
        for (key, instance, question, running) in wanted {
            if !running {
                if P::probed(self).forget(&key) {
                    self.services.dirty = true;
                }
                continue;
            }
            let Ok(client) = self.client(&instance.host) else {
                continue;
            };
            if !P::probed(self).start_asking(key.clone()) {
                continue;
            }
            let internal = self.internal_tx.clone();
            tokio::spawn(async move {
                let answer = P::ask(client, instance, question).await;
                // A full queue makes this wait; a stopped engine has no one to tell.
                let _ = internal
                    .send(Internal::Probe(P::message(key, answer)))
                    .await;
            });
        }
    }

    /// Takes in one answer; the services are published again only when it changed.
    pub(in crate::engine) fn probe_answered(&mut self, answer: ProbeAnswer) {
        match answer {
            ProbeAnswer::Readiness(key, a) => self.take::<Readiness>(key, a),
            ProbeAnswer::GuestApps(key, a) => self.take::<GuestAppsProbe>(key, a),
            ProbeAnswer::AppMetric(key, a) => self.take::<AppMetricProbe>(key, a),
        }
    }

    fn take<P: InstanceProbe>(&mut self, key: InstanceKey, answer: P::Answer) {
        P::probed(self).done_asking(&key);
        if !self.services.instances.contains_key(&key) {
            return;
        }
        if P::answered(self, key, answer) {
            self.services.dirty = true;
        }
    }
}

/// The applications inside an instance's VM, looked at every few seconds.
pub(in crate::engine) struct GuestAppsProbe;

impl InstanceProbe for GuestAppsProbe {
    type Question = Vec<GuestAppProbe>;
    type Answer = Result<GuestAppsReply, String>;
    type Kept = GuestLook;

    fn question(app: &ApplicationSpec) -> Option<Vec<GuestAppProbe>> {
        Some(
            app.guest_apps
                .iter()
                .map(probe_of_guest_app)
                .collect::<Vec<_>>(),
        )
        .filter(|apps| !apps.is_empty())
    }

    async fn ask(
        client: AgentClient,
        instance: InstanceRecord,
        apps: Vec<GuestAppProbe>,
    ) -> Result<GuestAppsReply, String> {
        client
            .call(GuestApps {
                name: instance.vm.clone(),
                apps,
            })
            .await
            .map_err(|e| e.to_string())
    }

    fn message(key: InstanceKey, answer: Self::Answer) -> ProbeAnswer {
        ProbeAnswer::GuestApps(key, answer)
    }

    fn probed(actor: &mut Actor) -> &mut Probed<GuestLook> {
        &mut actor.services.guest_looks
    }

    /// Keeps the look, and feeds the statistics of the applications with a process.
    fn answered(actor: &mut Actor, key: InstanceKey, answer: Self::Answer) -> bool {
        let Some(instance) = actor.services.instances.get(&key) else {
            return false;
        };
        let mut cpu_percent = Vec::new();
        if let Ok(reply) = &answer {
            if let Some(GuestLook {
                answer: Ok(before), ..
            }) = actor.services.guest_looks.get(&key)
            {
                cpu_percent = cpu_between(before, reply);
            }
            let with_process: Vec<_> = actor
                .services
                .entries
                .get(&instance.service)
                .and_then(|s| s.spec.as_ref().ok())
                .and_then(|spec| spec.application(&instance.app))
                .map(|app| {
                    app.guest_apps
                        .iter()
                        .filter(|g| g.process.is_some())
                        .map(|g| g.name.clone())
                        .collect()
                })
                .unwrap_or_default();
            let writes = actor
                .statistics
                .series
                .ingest_guest(&instance.vm, reply, &with_process);
            actor.store.put_stats(writes);
        }
        let look = GuestLook {
            answer,
            cpu_percent,
        };
        let before = actor.services.guest_looks.replace(key, look.clone());
        // Republished only when what the views show changed, not at every reading.
        let shown = |l: &GuestLook| {
            l.answer.as_ref().map_err(Clone::clone).map(|r| {
                r.apps
                    .iter()
                    .map(|a| (a.app.clone(), a.processes, a.check_passed, a.detail.clone()))
                    .collect::<Vec<_>>()
            })
        };
        before.as_ref().map(shown) != Some(shown(&look)) || !look.cpu_percent.is_empty()
    }
}

/// The readiness check of an application beyond "running" (guest agent, TCP port,
/// command), asked again every few seconds.
pub(in crate::engine) struct Readiness;

impl InstanceProbe for Readiness {
    type Question = ReadinessProbe;
    type Answer = LastCheck;
    type Kept = LastCheck;

    fn question(app: &ApplicationSpec) -> Option<ReadinessProbe> {
        Some(probe_of(&app.readiness)).filter(|p| p.kind != ProbeKind::Running)
    }

    async fn ask(
        client: AgentClient,
        instance: InstanceRecord,
        probe: ReadinessProbe,
    ) -> LastCheck {
        match client
            .call(CheckReady {
                name: instance.vm.clone(),
                probe,
                runtime: instance.runtime,
            })
            .await
        {
            Ok(a) => LastCheck {
                ready: a.ready,
                detail: a.detail,
            },
            Err(e) => LastCheck {
                ready: false,
                detail: e.to_string(),
            },
        }
    }

    fn message(key: InstanceKey, answer: LastCheck) -> ProbeAnswer {
        ProbeAnswer::Readiness(key, answer)
    }

    fn probed(actor: &mut Actor) -> &mut Probed<LastCheck> {
        &mut actor.services.readiness
    }

    fn answered(actor: &mut Actor, key: InstanceKey, answer: LastCheck) -> bool {
        actor.services.readiness.keep(key, answer)
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

    fn key(index: u32) -> InstanceKey {
        InstanceKey {
            service: dunes_shared::model::ServiceName::new("shop").unwrap(),
            app: dunes_shared::model::AppName::new("web").unwrap(),
            index,
        }
    }

    #[test]
    fn an_answer_counts_as_a_change_only_when_it_differs() {
        let mut probed = Probed::<u32>::default();
        assert!(probed.keep(key(0), 1));
        assert!(!probed.keep(key(0), 1));
        assert!(probed.keep(key(0), 2));
        assert_eq!(probed.get(&key(0)), Some(&2));
        assert!(probed.forget(&key(0)));
        assert!(!probed.forget(&key(0)));
        // Numbered instances sort by number, not as text.
        assert!(key(2) < key(10));
    }
}
