//! The tables of a running cluster's nodes, for `trace` and `policy`.

use anyhow::{Context, Result, bail};
use weir_api::NodeState;
use weir_compiler::PodInfo;

use crate::{
    pinned,
    target::Target,
    trace::{NodeView, views_from_states},
};

/// The controller state an agent applied last (`/state`).
pub async fn agent_state(target: &Target, node: &str) -> Result<NodeState> {
    let (code, body) = target.agent_get(node, "/state").await?;
    match code {
        200 => serde_json::from_str(&body)
            .with_context(|| format!("the agent of {node} sent a state weirctl does not read")),
        403 => bail!(
            "the agent of {node} refuses /state to this client (it serves it to its own node only unless started with --flows-from-anywhere)"
        ),
        _ => bail!(
            "the agent of {node} answered /state with {code}: {}",
            body.trim()
        ),
    }
}

/// Every node's view. Local cluster: endpoints, node addresses, classes and verdicts from the
/// pinned maps (what the programs read), names of rules, rule sets and Services from the
/// agent; a node whose agent does not answer is still traced, with rule ids unnamed.
/// Kubernetes: the agent's applied state. `warnings` collects what could not be read.
pub async fn views(
    target: &Target,
    pods: &[PodInfo],
    warnings: &mut Vec<String>,
) -> Result<Vec<NodeView>> {
    let mut views = Vec::new();
    for node in target.nodes() {
        let state = agent_state(target, &node).await;
        match target {
            Target::Local(local) => {
                let tables = pinned::read(local.bpffs(), &node)
                    .with_context(|| format!("reading the maps of {node}"))?;
                let (mut state, source) = match state {
                    Ok(s) => (s, "pinned maps, names from the agent"),
                    Err(e) => {
                        warnings.push(format!("{e:#}: policy and rule names unknown on {node}"));
                        (
                            NodeState::default(),
                            "pinned maps, names unknown (agent unreachable)",
                        )
                    }
                };
                state.peer_classes = tables.peer_classes.into();
                state.verdicts = tables.verdicts;
                views.push(NodeView {
                    node: node.clone(),
                    endpoints: tables.endpoints,
                    host_addrs: tables.host_addrs,
                    state,
                    source: source.into(),
                });
            }
            Target::Kube(_) => match state {
                Ok(s) => views.extend(views_from_states(
                    &[(node.clone(), s)].into_iter().collect(),
                    pods,
                    "the agent's applied state",
                )),
                Err(e) => warnings.push(format!("{e:#}: {node} left out")),
            },
        }
    }
    Ok(views)
}
