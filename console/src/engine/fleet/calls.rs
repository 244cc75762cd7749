//! Calls the engine makes to an agent for an operator: sent in the background, their answer
//! applied to the engine's state (an [`AgentAnswer`]) before the caller hears of it.

use dunes_shared::{model::HostId, protocol::Rpc};

use crate::engine::{
    EngineError, Reply,
    actor::{Actor, Internal},
    fleet::client::{AgentAnswer, AgentClient, StateChange},
    records::Level,
};

impl Actor {
    /// The client of a host's agent, when its link is up.
    pub(in crate::engine) fn client(&self, host: &HostId) -> Result<AgentClient, EngineError> {
        self.fleet.client(host)
    }

    /// Sends one request to a host's agent in the background. Its answer comes back to the
    /// engine as an [`AgentAnswer`]: `change` says what a successful one changes in the
    /// engine's state (it only describes it: the engine applies it), and the caller gets the answer once that is committed; a failure goes
    /// to the event log.
    pub(in crate::engine) fn agent_call<R>(
        &mut self,
        host: HostId,
        what: String,
        reply: Reply<R::Response>,
        request: R,
        change: impl FnOnce(&R::Response) -> StateChange + Send + 'static,
    ) where
        R: Rpc + Send + 'static,
    {
        let client = match self.client(&host) {
            Ok(c) => c,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        self.log(Level::Info, Some(host.clone()), what.clone());
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            let result = client.call(request).await;
            let change = match &result {
                Ok(response) => Ok(change(response)),
                Err(e) => Err(e.to_string()),
            };
            let answer = AgentAnswer {
                host,
                what,
                change,
                deliver: Box::new(move |committed| {
                    let _ = reply.send(result.and_then(|response| {
                        committed.map(|()| response).map_err(EngineError::Store)
                    }));
                }),
            };
            // A full queue makes this wait; a stopped engine has no one to tell.
            let _ = internal.send(Internal::AgentAnswered(answer)).await;
        });
    }

    /// Takes in an agent's answer: its change to the engine's state, or its failure in the
    /// event log; who asked hears once that is committed.
    pub(in crate::engine) fn agent_answered(&mut self, answer: AgentAnswer) {
        let AgentAnswer {
            host,
            what,
            change,
            deliver,
        } = answer;
        match change {
            Ok(StateChange::Nothing) => {}
            Ok(StateChange::Vm(status)) => self.apply_vm(&host, &status),
            Ok(StateChange::Resized {
                status,
                at_next_start,
            }) => {
                self.apply_vm(&host, &status);
                if at_next_start {
                    self.log(
                        Level::Info,
                        Some(host.clone()),
                        format!(
                            "VM {} runs on; its new vCPUs and memory apply at its next start",
                            status.name
                        ),
                    );
                }
            }
            Ok(StateChange::VmGone(name)) => self.remove_vm(&host, &name),
            Err(e) => self.log(Level::Error, Some(host), format!("{what} failed: {e}")),
        }
        // A failure too: after the logged failure is published and saved, like a success.
        self.store.after_commit(deliver);
    }
}
