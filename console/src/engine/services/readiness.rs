//! Readiness kept up to date after a start: every few seconds, each running instance whose
//! application has a check beyond "running" (guest agent, TCP port, command) is checked
//! again on its agent, so a service's status follows what its applications can do, not only
//! whether their VMs run.

use std::time::Duration;

use dunes_shared::{
    protocol::{CheckReady, ProbeKind, ReadinessProbe},
    service::ApplicationSpec,
};

use crate::engine::{
    LinkState,
    actor::Actor,
    fleet::client::AgentClient,
    records::{InstanceKey, InstanceRecord, InstanceState},
    services::driver::probe_of,
    services::probes::{InstanceProbe, ProbeAnswer, Probed},
};
use dunes_shared::model::VmState;

/// How often readiness is checked again.
pub(in crate::engine) const READINESS_EVERY: Duration = Duration::from_secs(3);

/// The last answer for one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::engine) struct LastCheck {
    pub ready: bool,
    pub detail: String,
}

impl Actor {
    /// Whether an instance's workload runs on a host that is online now: what the checks
    /// of its applications need.
    pub(in crate::engine) fn instance_runs(
        &self,
        instance: &crate::engine::records::InstanceRecord,
    ) -> bool {
        instance.state == InstanceState::Created
            && self.fleet.hosts.get(&instance.host).is_some_and(|h| {
                h.view.link == LinkState::Online
                    && h.view
                        .vm(&instance.vm)
                        .is_some_and(|v| v.state == VmState::Running)
            })
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
