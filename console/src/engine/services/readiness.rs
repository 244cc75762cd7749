//! Readiness kept up to date after a start: every few seconds, each running instance whose
//! application has a check beyond "running" (guest agent, TCP port, command) is checked
//! again on its agent, so a service's status follows what its applications can do, not only
//! whether their VMs run.

use std::time::Duration;

use dunes_shared::{
    protocol::{ProbeKind, ReadinessProbe},
    service::Readiness,
};

/// How often readiness is checked again.
pub(in crate::engine) const READINESS_EVERY: Duration = Duration::from_secs(3);

/// The last answer for one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::engine) struct LastCheck {
    pub ready: bool,
    pub detail: String,
}

/// The agent's check for a readiness rule of the service file.
pub fn probe_of(readiness: &Readiness) -> ReadinessProbe {
    let (kind, port, command) = match readiness {
        Readiness::Running => (ProbeKind::Running, None, None),
        Readiness::GuestAgent => (ProbeKind::GuestAgent, None, None),
        Readiness::Tcp { port } => (ProbeKind::Tcp, Some(*port), None),
        Readiness::Command { command } => (ProbeKind::Command, None, Some(command.clone())),
    };
    ReadinessProbe {
        kind,
        port,
        command,
    }
}
