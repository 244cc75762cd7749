//! One poller for what is asked of each running instance every few seconds: its readiness
//! check, its guest applications, its application metric. Each kind says which instances it
//! asks and what it keeps ([`InstanceProbe`]); the poller asks at most one question at a time
//! per instance, forgets the answers of instances that stopped, and brings each answer back
//! to the engine as a typed message ([`ProbeAnswer`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
};

use dunes_shared::{
    protocol::{GuestAppsReply, MetricReply},
    service::ApplicationSpec,
};

use crate::engine::{
    actor::{Actor, Internal},
    fleet::client::AgentClient,
    records::{InstanceKey, InstanceRecord},
    services::readiness::LastCheck,
};

/// What one kind of probe last heard from each running instance, and whom it is asking.
#[derive(Debug)]
pub(in crate::engine) struct Probed<T> {
    last: BTreeMap<InstanceKey, T>,
    asking: BTreeSet<InstanceKey>,
}

impl<T> Default for Probed<T> {
    fn default() -> Self {
        Probed {
            last: BTreeMap::new(),
            asking: BTreeSet::new(),
        }
    }
}

impl<T> Probed<T> {
    pub(in crate::engine) fn get(&self, key: &InstanceKey) -> Option<&T> {
        self.last.get(key)
    }

    /// Keeps `value`, answering what it replaces.
    pub(in crate::engine) fn replace(&mut self, key: InstanceKey, value: T) -> Option<T> {
        self.last.insert(key, value)
    }

    /// Forgets an instance's answer; answers whether there was one.
    pub(in crate::engine) fn forget(&mut self, key: &InstanceKey) -> bool {
        self.last.remove(key).is_some()
    }
}

impl<T: PartialEq> Probed<T> {
    /// Keeps `value`; answers whether it differs from what was kept.
    pub(in crate::engine) fn keep(&mut self, key: InstanceKey, value: T) -> bool {
        match self.last.get(&key) {
            Some(kept) if *kept == value => false,
            _ => {
                self.last.insert(key, value);
                true
            }
        }
    }
}

/// An answer on its way back to the engine.
#[derive(Debug)]
pub(in crate::engine) enum ProbeAnswer {
    Readiness(InstanceKey, LastCheck),
    GuestApps(InstanceKey, Result<GuestAppsReply, String>),
    AppMetric(InstanceKey, Result<MetricReply, String>),
}

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
                    self.instance_runs(instance),
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
            if !P::probed(self).asking.insert(key.clone()) {
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
            ProbeAnswer::Readiness(key, a) => {
                self.take::<crate::engine::services::readiness::Readiness>(key, a)
            }
            ProbeAnswer::GuestApps(key, a) => {
                self.take::<crate::engine::services::guest_apps::GuestAppsProbe>(key, a)
            }
            ProbeAnswer::AppMetric(key, a) => {
                self.take::<crate::engine::services::app_metrics::AppMetricProbe>(key, a)
            }
        }
    }

    fn take<P: InstanceProbe>(&mut self, key: InstanceKey, answer: P::Answer) {
        P::probed(self).asking.remove(&key);
        if !self.services.instances.contains_key(&key) {
            return;
        }
        if P::answered(self, key, answer) {
            self.services.dirty = true;
        }
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
