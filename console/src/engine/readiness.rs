//! Readiness kept up to date after a start: every few seconds, each running instance whose
//! application has a check beyond "running" (guest agent, TCP port, command) is checked
//! again on its agent, so a service's status follows what its applications can do, not only
//! whether their VMs run.

use std::time::Duration;

use dunes_shared::protocol::{CheckReady, ProbeKind};

use super::{
    LinkState,
    actor::{Actor, Internal},
    services::probe_of,
    store::InstanceState,
};
use dunes_shared::model::VmState;

/// How often readiness is checked again.
pub(super) const READINESS_EVERY: Duration = Duration::from_secs(3);

/// The last answer for one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LastCheck {
    pub ready: bool,
    pub detail: String,
}

impl Actor {
    /// Whether an instance's workload runs on a host that is online now: what the checks
    /// of its applications need.
    pub(super) fn instance_runs(&self, instance: &super::store::InstanceRecord) -> bool {
        instance.state == InstanceState::Created
            && self.hosts.get(&instance.host).is_some_and(|h| {
                h.view.link == LinkState::Online
                    && h.view
                        .vm(&instance.vm)
                        .is_some_and(|v| v.state == VmState::Running)
            })
    }

    /// Starts a check for every running instance that needs one and has none under way, and
    /// forgets the answers of instances that no longer run.
    pub(super) fn check_readiness(&mut self) {
        let mut to_check = Vec::new();
        let mut stale = Vec::new();
        for (key, instance) in &self.instances {
            let Some(probe) = self
                .services
                .get(&instance.service)
                .and_then(|s| s.spec.as_ref().ok())
                .and_then(|spec| spec.application(&instance.app))
                .map(|app| probe_of(&app.readiness))
                .filter(|p| p.kind != ProbeKind::Running)
            else {
                continue;
            };
            let running = self.instance_runs(instance);
            if !running {
                if self.readiness.contains_key(key) {
                    stale.push(key.clone());
                }
                continue;
            }
            if !self.checking.contains(key) {
                to_check.push((key.clone(), instance.clone(), probe));
            }
        }
        for key in stale {
            self.readiness.remove(&key);
            self.services_dirty = true;
        }
        for (key, instance, probe) in to_check {
            let Ok(client) = self.client(&instance.host) else {
                continue;
            };
            self.checking.insert(key.clone());
            let internal = self.internal_tx.clone();
            tokio::spawn(async move {
                let answer = client
                    .call(CheckReady {
                        name: instance.vm.clone(),
                        probe,
                        runtime: instance.runtime,
                    })
                    .await;
                let check = match answer {
                    Ok(a) => LastCheck {
                        ready: a.ready,
                        detail: a.detail,
                    },
                    Err(e) => LastCheck {
                        ready: false,
                        detail: e.to_string(),
                    },
                };
                let done = move |actor: &mut Actor| actor.readiness_checked(key, check);
                let _ = internal.send(Internal::CallDone(Box::new(done))).await;
            });
        }
    }

    /// Takes in one answer; the services are published again only when it changed.
    pub(super) fn readiness_checked(&mut self, key: String, check: LastCheck) {
        self.checking.remove(&key);
        if !self.instances.contains_key(&key) {
            return;
        }
        if self.readiness.get(&key) != Some(&check) {
            self.readiness.insert(key, check);
            self.services_dirty = true;
        }
    }
}
