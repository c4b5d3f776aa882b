//! The agent's end of the controller stream: every update lands in the dataplane maps.

use std::sync::Arc;

use tokio::sync::Mutex;
use tracing::info;
use weir_api::NodeState;
use weir_transport::{Applied, StateSink, StateVersion};

use crate::agent::{Agent, AgentError};

pub struct DataplaneSink {
    agent: Arc<Mutex<Agent>>,
}

impl DataplaneSink {
    pub fn new(agent: Arc<Mutex<Agent>>) -> Self {
        Self { agent }
    }
}

impl StateSink for DataplaneSink {
    type Error = AgentError;

    async fn apply(
        &mut self,
        at: StateVersion,
        change: &Applied,
        state: &NodeState,
    ) -> Result<(), AgentError> {
        {
            let mut agent = self.agent.lock().await;
            // Policy and services are applied even when routes fail, and the other way
            // round: a part that does not fit never holds up the rest.
            let policy = agent.apply_controller_state(change, state);
            // Route sync costs a netlink dump and a write per route: only when they changed.
            let routes_changed = match change {
                Applied::Snapshot => true,
                Applied::Diff(d) => !d.routes.is_empty(),
                Applied::Unchanged => false,
            };
            let routes = if routes_changed {
                agent.apply_routes(state).await
            } else {
                Ok(())
            };
            let prefilter_changed = match change {
                Applied::Snapshot => true,
                Applied::Diff(d) => !d.prefilter.is_empty(),
                Applied::Unchanged => false,
            };
            let prefilter = if prefilter_changed {
                agent.apply_prefilter(state)
            } else {
                Ok(())
            };
            let outcome = policy.and(routes).and(prefilter);
            agent.record_apply(outcome.as_ref().map(|_| ()));
            outcome?;
        }
        let kind = match change {
            Applied::Snapshot => "snapshot".to_string(),
            Applied::Unchanged => "unchanged".to_string(),
            Applied::Diff(d) => format!("diff of {} entries", d.len()),
        };
        info!(
            version = %at,
            change = %kind,
            endpoints = state.endpoints.len(),
            classes = state.peer_classes.len(),
            verdicts = state.verdicts.len(),
            routes = state.routes.len(),
            "applied controller state"
        );
        Ok(())
    }
}
