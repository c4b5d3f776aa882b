//! Synthetic clusters for the benchmarks: the cluster whose compiled state fills the maps of
//! the per-packet benchmark; the two large shapes of the control-plane benchmark come from
//! [`weir_controller::synthetic`].

use std::net::Ipv4Addr;

use anyhow::Result;
use serde_json::json;
pub use weir_controller::synthetic::Shape;
use weir_controller::{
    Cluster,
    synthetic::{namespace, node, nth_ip, pod, policy},
};

// ---------------------------------------------------------------------------------------
// The per-packet benchmark's cluster.

/// The node whose dataplane the per-packet benchmark runs.
pub const VERDICT_NODE: &str = "bench-node";
pub const VERDICT_NAMESPACE: &str = "bench";
/// The measured destination pod, on [`VERDICT_NODE`], selected by every policy.
pub const SERVER: &str = "server";
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// A pod on [`VERDICT_NODE`] that the policies allow (same-node traffic).
pub const CLIENT: &str = "client";
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
/// The port every peer (and the client) may reach the server on.
pub const ALLOWED_PORT: u16 = 10_000;
/// Peer pods are spread over this many other nodes.
const PEER_NODES: usize = 10;

/// Address of peer pod `j` (all on other nodes).
pub fn peer_ip(j: usize) -> Ipv4Addr {
    nth_ip(11, j)
}

/// A cluster of `peers` peer pods and `policies` NetworkPolicies that all select the
/// server pod.
///
/// Peers fall into `G = min(policies, peers)` groups by a `group` label, interleaved by
/// address so that no two neighbouring addresses share a group (the controller cannot merge
/// them into shorter prefixes). Policy `i` allows group `i mod G` on TCP port
/// `10000 + 2·(i div G)`: ports two apart so that no two ports merge into one port prefix
/// either. So the node's class table grows with the peers and its verdict table with the
/// policies. Every peer's group, and the client's (group 0), is allowed on port 10000 by
/// policy `group`, so every measured packet is allowed. With no policies the server is not
/// isolated: that is the baseline.
pub fn verdict_cluster(policies: usize, peers: usize) -> Result<Cluster> {
    let mut c = Cluster::new();
    c.upsert_node(&node(VERDICT_NODE))?;
    for n in 0..PEER_NODES {
        c.upsert_node(&node(&format!("peer-node-{n}")))?;
    }
    c.upsert_namespace(&namespace(VERDICT_NAMESPACE, &[]))?;
    c.upsert_pod(&pod(
        VERDICT_NAMESPACE,
        SERVER,
        &[("bench-role", "server")],
        VERDICT_NODE,
        SERVER_IP,
    ))?;
    c.upsert_pod(&pod(
        VERDICT_NAMESPACE,
        CLIENT,
        &[("bench-role", "client"), ("group", "g-0")],
        VERDICT_NODE,
        CLIENT_IP,
    ))?;
    let groups = policies.min(peers).max(1);
    for j in 0..peers {
        let group = format!("g-{}", j % groups);
        c.upsert_pod(&pod(
            VERDICT_NAMESPACE,
            &format!("peer-{j}"),
            &[("bench-role", "peer"), ("group", &group)],
            &format!("peer-node-{}", j % PEER_NODES),
            peer_ip(j),
        ))?;
    }
    for i in 0..policies {
        let port = u32::from(ALLOWED_PORT) + 2 * (i / groups) as u32;
        c.upsert_policy(&policy(json!({
            "metadata": {"name": format!("allow-{i}"), "namespace": VERDICT_NAMESPACE},
            "spec": {
                "podSelector": {"matchLabels": {"bench-role": "server"}},
                "policyTypes": ["Ingress"],
                "ingress": [{
                    "from": [{"podSelector": {"matchLabels": {"group": format!("g-{}", i % groups)}}}],
                    "ports": [{"protocol": "TCP", "port": port}],
                }],
            },
        }))?)?;
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use weir_api::{Action, PodKey};
    use weir_controller::Compiler;

    use super::*;

    #[test]
    fn every_peer_and_the_client_may_reach_the_server_on_the_allowed_port_only() {
        let cluster = verdict_cluster(30, 7).unwrap();
        let out = Compiler::new().with_threads(1).compile_all(&cluster);
        let state = &out.nodes[VERDICT_NODE];
        let server = state.endpoints[&PodKey::new(VERDICT_NAMESPACE, SERVER)];
        for peer in (0..7).map(peer_ip).chain([CLIENT_IP]) {
            let allowed = state.verdict(server.ingress, peer.into(), 6, ALLOWED_PORT);
            assert_eq!(allowed.0, Action::Allow, "{peer}");
            let other = state.verdict(server.ingress, peer.into(), 6, ALLOWED_PORT + 1);
            assert_eq!(other.0, Action::Deny, "{peer} on an odd port");
        }
        // Classes follow the peers, verdicts the policies.
        assert!(state.peer_classes.len() >= 7);
        assert!(state.verdicts.len() >= 30);
    }

    #[test]
    fn without_policies_the_server_is_not_isolated() {
        let cluster = verdict_cluster(0, 10).unwrap();
        let out = Compiler::new().with_threads(1).compile_all(&cluster);
        let server = out.nodes[VERDICT_NODE].endpoints[&PodKey::new(VERDICT_NAMESPACE, SERVER)];
        assert_eq!(server.ingress, weir_api::NOT_ISOLATED);
    }
}
