//! One typed client for agent calls: every call has a deadline, and its result comes back to
//! the engine as a message, applied to the engine's state before the caller hears of it.

use std::time::Duration;

use dunes_shared::{
    model::HostId,
    protocol::{CreateVm, Rpc, StopVm},
    rpc::{CallError, Peer},
};

use crate::engine::EngineError;

/// How long an agent gets to answer most calls: long enough for a slow hypervisor, short
/// enough to tell an agent that hangs with its connection alive.
pub const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// A graceful stop waits for the guest up to the agent's stop timeout (at most 900 s).
pub const STOP_CALL_TIMEOUT: Duration = Duration::from_secs(960);
/// A create copies the template's disk: generous, but an agent that hangs is still told.
pub const CREATE_CALL_TIMEOUT: Duration = Duration::from_secs(3600);

/// A disk stream takes as long as the disk and the link make it (its progress shows it is
/// alive), and a whole-image hash reads the disk; an agent that hangs is still told.
pub const TRANSFER_CALL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// The deadline of a request kind.
pub fn deadline<R: Rpc>() -> Duration {
    match R::KIND {
        // A clone copies disks, a snapshot of a running VM saves its memory.
        k if k == CreateVm::KIND
            || k == dunes_shared::protocol::CloneVm::KIND
            || k == dunes_shared::protocol::SnapshotVm::KIND =>
        {
            CREATE_CALL_TIMEOUT
        }
        k if k == dunes_shared::protocol::SendDisk::KIND
            || k == dunes_shared::protocol::HashDisk::KIND =>
        {
            TRANSFER_CALL_TIMEOUT
        }
        k if k == StopVm::KIND => STOP_CALL_TIMEOUT,
        _ => AGENT_CALL_TIMEOUT,
    }
}

/// A host's agent, as the engine calls it.
#[derive(Debug, Clone)]
pub struct AgentClient {
    pub host: HostId,
    pub peer: Peer,
}

impl AgentClient {
    /// Sends `request` and waits for the answer, within the deadline of its kind.
    pub async fn call<R: Rpc>(&self, request: R) -> Result<R::Response, EngineError> {
        self.call_within(request, deadline::<R>()).await
    }

    pub async fn call_within<R: Rpc>(
        &self,
        request: R,
        limit: Duration,
    ) -> Result<R::Response, EngineError> {
        match tokio::time::timeout(limit, self.peer.call(request)).await {
            Err(_) => Err(EngineError::NoAnswer {
                host: self.host.clone(),
                secs: limit.as_secs(),
            }),
            Ok(Err(e)) => Err(match e {
                CallError::Remote(remote) => EngineError::Agent {
                    code: remote.code,
                    message: remote.message,
                },
                e @ CallError::NotOffered { .. } => EngineError::Agent {
                    code: dunes_shared::protocol::ErrorCode::Unsupported,
                    message: e.to_string(),
                },
                _ => EngineError::Unreachable(self.host.clone()),
            }),
            Ok(Ok(response)) => Ok(response),
        }
    }
}

/// What an agent's answer changes in the engine's state.
#[derive(Debug, Clone, PartialEq)]
pub(in crate::engine) enum StateChange {
    /// Nothing: the answer only goes back to who asked.
    Nothing,
    /// The VM as its agent reports it now (made, started, stopped, rebooted, paused…).
    Vm(dunes_shared::model::VmStatus),
    /// The VM with its new vCPUs and memory, which may apply only at its next start.
    Resized {
        status: dunes_shared::model::VmStatus,
        at_next_start: bool,
    },
    /// The VM is gone from its host.
    VmGone(dunes_shared::model::VmName),
}

/// An agent's answer, as the engine takes it in.
pub(in crate::engine) struct AgentAnswer {
    pub(in crate::engine) host: HostId,
    /// What was asked, for the event log.
    pub(in crate::engine) what: String,
    /// What the answer changes, or why the call failed.
    pub(in crate::engine) change: Result<StateChange, String>,
    /// Hands the answer to who asked, with whether the change was committed; it changes
    /// nothing in the engine.
    pub(in crate::engine) deliver: Box<dyn FnOnce(Result<(), String>) + Send>,
}

impl std::fmt::Debug for AgentAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentAnswer")
            .field("host", &self.host)
            .field("what", &self.what)
            .field("change", &self.change)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dunes_shared::protocol::{DeleteVm, ListVms, StartVm};

    #[test]
    fn every_call_has_a_deadline() {
        assert_eq!(deadline::<CreateVm>(), CREATE_CALL_TIMEOUT);
        assert_eq!(deadline::<StopVm>(), STOP_CALL_TIMEOUT);
        assert_eq!(
            deadline::<dunes_shared::protocol::SendDisk>(),
            TRANSFER_CALL_TIMEOUT
        );
        for d in [
            deadline::<StartVm>(),
            deadline::<DeleteVm>(),
            deadline::<ListVms>(),
        ] {
            assert_eq!(d, AGENT_CALL_TIMEOUT);
        }
    }
}
