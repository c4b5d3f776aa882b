//! Synthetic clusters for the benchmarks: the cluster whose compiled state fills the maps of
//! the per-packet benchmark, with or without ClusterNetworkPolicies; the large shapes of the
//! control-plane benchmark come from [`weir_compiler::synthetic`].

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Result;
use serde_json::json;
pub use weir_compiler::synthetic::Shape;
use weir_compiler::{
    Cluster,
    synthetic::{cluster_policy, namespace, node, nth_ip, pod, policy, with_ipv6},
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

/// The IPv6 address of the dual-stack pod whose IPv4 address is `v4`: `fd00:b::/96` plus
/// the IPv4 address, so IPv6 addresses interleave by group exactly as the IPv4 ones do.
pub fn ipv6_of(v4: Ipv4Addr) -> Ipv6Addr {
    let [a, b, c, d] = v4.octets();
    Ipv6Addr::new(
        0xfd00,
        0xb,
        0,
        0,
        0,
        0,
        u16::from_be_bytes([a, b]),
        u16::from_be_bytes([c, d]),
    )
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
    fill_verdict_cluster(Cluster::new(), policies, peers, 0)
}

/// [`verdict_cluster`] with `cluster_policies` ClusterNetworkPolicies (at least
/// [`DECIDING_CLUSTER_POLICIES`]) added in both tiers, which decide the measured flows
/// differently ([`Lane`]):
///
/// * the Admin tier denies every flow from a [`Lane::Quarantined`] peer (`quarantine`,
///   priority 100), accepts TCP 10000–10999 from a [`Lane::Trusted`] peer (`trusted`, 200)
///   and passes everything else within the bench namespace, both ways (`delegate`, 300), to
///   the NetworkPolicies, ahead of a lockdown that denies the rest (`lockdown`, 400);
/// * the client's egress, which no NetworkPolicy isolates, is decided by the Baseline tier:
///   TCP 10000 to the server is accepted, everything else denied (`client-egress`).
///
/// The other policies ([`filler_cluster_policy`]) select the server, the client, the peers
/// or the pods of 20 tenant namespaces (100 pods on the peer nodes), in both tiers, with
/// priorities over 0..=1000, every action, peers of every kind and ports the measured
/// flows do not use: they grow the compiled tables without deciding a measured flow.
pub fn verdict_cluster_with_cluster_policies(
    policies: usize,
    peers: usize,
    cluster_policies: usize,
) -> Result<Cluster> {
    fill_verdict_cluster(Cluster::new(), policies, peers, cluster_policies)
}

/// ClusterNetworkPolicies of [`verdict_cluster_with_cluster_policies`] that decide measured
/// flows.
pub const DECIDING_CLUSTER_POLICIES: usize = 5;

/// Tenant namespaces of the cluster with ClusterNetworkPolicies, and their pods each.
const TENANTS: usize = 20;
const TENANT_PODS: usize = 5;

/// How the ClusterNetworkPolicies decide the flows of a peer, by its `lane` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Passed by the Admin tier to the NetworkPolicies, which allow it (peers `j` with
    /// `j mod 10 < 8`).
    Passed,
    /// Accepted by the Admin tier (peers `j` with `j mod 10 = 8`).
    Trusted,
    /// Denied by the Admin tier (peers `j` with `j mod 10 = 9`): the packet is dropped.
    Quarantined,
}

impl Lane {
    pub fn of_peer(j: usize) -> Lane {
        match j % 10 {
            8 => Lane::Trusted,
            9 => Lane::Quarantined,
            _ => Lane::Passed,
        }
    }
    fn label(self) -> &'static str {
        match self {
            Lane::Passed => "passed",
            Lane::Trusted => "trusted",
            Lane::Quarantined => "quarantined",
        }
    }
}

/// The measured pods are dual-stack, so one compile serves both families' packets (the
/// same tables, in which IPv4 and IPv6 classes share the tries).
fn dual(pod: k8s_openapi::api::core::v1::Pod) -> k8s_openapi::api::core::v1::Pod {
    let v4 = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse().ok())
        .expect("a synthetic pod has an IPv4 address");
    with_ipv6(pod, ipv6_of(v4))
}

fn fill_verdict_cluster(
    mut c: Cluster,
    policies: usize,
    peers: usize,
    cluster_policies: usize,
) -> Result<Cluster> {
    let with_cnps = cluster_policies > 0;
    c.upsert_node(&node(VERDICT_NODE))?;
    for n in 0..PEER_NODES {
        c.upsert_node(&node(&format!("peer-node-{n}")))?;
    }
    let ns_labels: &[(&str, &str)] = if with_cnps { &[("env", "bench")] } else { &[] };
    c.upsert_namespace(&namespace(VERDICT_NAMESPACE, ns_labels))?;
    c.upsert_pod(&dual(pod(
        VERDICT_NAMESPACE,
        SERVER,
        &[("bench-role", "server")],
        VERDICT_NODE,
        SERVER_IP,
    )))?;
    c.upsert_pod(&dual(pod(
        VERDICT_NAMESPACE,
        CLIENT,
        &[("bench-role", "client"), ("group", "g-0")],
        VERDICT_NODE,
        CLIENT_IP,
    )))?;
    let groups = policies.min(peers).max(1);
    for j in 0..peers {
        let group = format!("g-{}", j % groups);
        let mut labels = vec![("bench-role", "peer"), ("group", group.as_str())];
        if with_cnps {
            labels.push(("lane", Lane::of_peer(j).label()));
        }
        c.upsert_pod(&dual(pod(
            VERDICT_NAMESPACE,
            &format!("peer-{j}"),
            &labels,
            &format!("peer-node-{}", j % PEER_NODES),
            peer_ip(j),
        )))?;
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
    if !with_cnps {
        return Ok(c);
    }
    anyhow::ensure!(
        cluster_policies >= DECIDING_CLUSTER_POLICIES,
        "at least {DECIDING_CLUSTER_POLICIES} ClusterNetworkPolicies"
    );
    for t in 0..TENANTS {
        let ns = format!("tenant-{t}");
        let env = if t % 2 == 0 { "prod" } else { "dev" };
        let owner = format!("owner-{}", t % 5);
        c.upsert_namespace(&namespace(&ns, &[("env", env), ("owner", &owner)]))?;
        for p in 0..TENANT_PODS {
            let n = t * TENANT_PODS + p;
            c.upsert_pod(&pod(
                &ns,
                &format!("pod-{p}"),
                &[("app", &format!("app-{}", p % 3))],
                &format!("peer-node-{}", n % PEER_NODES),
                nth_ip(12, n),
            ))?;
        }
    }
    let bench_ns = json!({"namespaces": {"matchLabels": {"env": "bench"}}});
    let bench_pods = |role: &str| {
        json!({"pods": {
            "namespaceSelector": {"matchLabels": {"env": "bench"}},
            "podSelector": {"matchLabels": {"bench-role": role}},
        }})
    };
    let lane = |lane: Lane| {
        json!({"pods": {
            "namespaceSelector": {"matchLabels": {"env": "bench"}},
            "podSelector": {"matchLabels": {"lane": lane.label()}},
        }})
    };
    let deciding = [
        json!({
            "metadata": {"name": "quarantine"},
            "spec": {
                "tier": "Admin", "priority": 100, "subject": bench_pods("server"),
                "ingress": [{"name": "deny-quarantined", "action": "Deny", "from": [lane(Lane::Quarantined)]}],
            },
        }),
        json!({
            "metadata": {"name": "trusted"},
            "spec": {
                "tier": "Admin", "priority": 200, "subject": bench_ns,
                "ingress": [{
                    "name": "accept-trusted", "action": "Accept", "from": [lane(Lane::Trusted)],
                    "protocols": [{"tcp": {"destinationPort": {"range": {"start": 10000, "end": 10999}}}}],
                }],
            },
        }),
        json!({
            "metadata": {"name": "delegate"},
            "spec": {
                "tier": "Admin", "priority": 300, "subject": bench_ns,
                "ingress": [{"name": "pass-bench", "action": "Pass", "from": [bench_ns]}],
                "egress": [{"name": "pass-bench", "action": "Pass", "to": [bench_ns]}],
            },
        }),
        json!({
            "metadata": {"name": "lockdown"},
            "spec": {
                "tier": "Admin", "priority": 400, "subject": bench_ns,
                "ingress": [{"name": "deny-rest", "action": "Deny", "from": [{"namespaces": {}}]}],
                "egress": [{"name": "deny-rest", "action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}]}],
            },
        }),
        json!({
            "metadata": {"name": "client-egress"},
            "spec": {
                "tier": "Baseline", "priority": 100, "subject": bench_pods("client"),
                "egress": [
                    {
                        "name": "accept-server", "action": "Accept", "to": [bench_pods("server")],
                        "protocols": [{"tcp": {"destinationPort": {"number": ALLOWED_PORT}}}],
                    },
                    {"name": "deny-rest", "action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}]},
                ],
            },
        }),
    ];
    for mut cnp in deciding {
        cnp["apiVersion"] = weir_compiler::cnp::API_VERSION.into();
        cnp["kind"] = "ClusterNetworkPolicy".into();
        c.upsert_cluster_policy(&cluster_policy(cnp)?)?;
    }
    for i in 0..cluster_policies - DECIDING_CLUSTER_POLICIES {
        c.upsert_cluster_policy(&cluster_policy(filler_cluster_policy(i, groups))?)?;
    }
    Ok(c)
}

/// The `i`-th ClusterNetworkPolicy of [`verdict_cluster_with_cluster_policies`] that decides
/// no measured flow: its rules only match ports other than [`ALLOWED_PORT`] (TCP 20000 and
/// up, UDP), and its egress networks are outside the cluster's addresses.
fn filler_cluster_policy(i: usize, groups: usize) -> serde_json::Value {
    let tier = if i % 3 == 2 { "Baseline" } else { "Admin" };
    let action = ["Accept", "Deny", "Pass"][(i / 3) % 3];
    let priority = (i * 37 + 11) % 1001;
    let tenant_owner = format!("owner-{}", i % 5);
    let role = ["server", "client"][i % 2];
    let env = ["prod", "dev"][i % 2];
    let subject = match (i / 9) % 4 {
        0 => json!({"namespaces": {"matchLabels": {"env": "bench"}}}),
        1 => json!({"pods": {
            "namespaceSelector": {"matchLabels": {"env": "bench"}},
            "podSelector": {"matchLabels": {"bench-role": role}},
        }}),
        2 => json!({"namespaces": {"matchLabels": {"owner": tenant_owner}}}),
        _ => json!({"pods": {
            "namespaceSelector": {},
            "podSelector": {"matchLabels": {"bench-role": "peer"}},
        }}),
    };
    let from = match (i / 2) % 3 {
        0 => json!({"pods": {
            "namespaceSelector": {"matchLabels": {"env": "bench"}},
            "podSelector": {"matchLabels": {"group": format!("g-{}", (i * 7_919) % groups)}},
        }}),
        1 => json!({"namespaces": {"matchLabels": {"owner": tenant_owner}}}),
        _ => json!({"pods": {
            "namespaceSelector": {"matchLabels": {"env": env}},
            "podSelector": {"matchLabels": {"app": format!("app-{}", i % 3)}},
        }}),
    };
    let port = 20_000 + (i % 5_000) as u32;
    let ingress_protocols = if i.is_multiple_of(4) {
        json!([{"tcp": {"destinationPort": {"range": {"start": port, "end": port + 3}}}}])
    } else {
        json!([{"tcp": {"destinationPort": {"number": port}}}, {"udp": {"destinationPort": {"number": port}}}])
    };
    let to = if i.is_multiple_of(2) {
        json!({"networks": [format!("172.{}.{}.0/24", 16 + (i >> 8) % 16, i % 256)]})
    } else {
        json!({"namespaces": {"matchLabels": {"owner": tenant_owner}}})
    };
    json!({
        "apiVersion": weir_compiler::cnp::API_VERSION,
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": format!("guard-{i:04}")},
        "spec": {
            "tier": tier,
            "priority": priority,
            "subject": subject,
            "ingress": [{"name": "in", "action": action, "from": [from], "protocols": ingress_protocols}],
            "egress": [{
                "name": "out", "action": action, "to": [to],
                "protocols": [{"udp": {"destinationPort": {"number": 5_000 + (i % 1_000) as u32}}}],
            }],
        },
    })
}

#[cfg(test)]
mod tests {
    use weir_api::{Action, PodKey, PolicyTier, TieredAction};
    use weir_compiler::{
        Compiler,
        oracle::{self, Endpoint},
    };

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

    /// What decided a flow: the deciding rule's kind, tier, action and policy name.
    fn decided_by(state: &weir_api::NodeState, (action, rule): (Action, u32)) -> String {
        let Some(r) = state.rules.get(&rule) else {
            return format!("{action:?} by no rule");
        };
        match &r.tiered {
            Some(t) => format!(
                "{action:?} by {} {} {}",
                t.tier.as_str(),
                t.action.as_str(),
                r.policy.name
            ),
            None => format!("{action:?} by {}", r.policy.kind),
        }
    }

    #[test]
    fn cluster_policies_decide_the_measured_flows_in_every_tier() {
        let (policies, peers, cnps) = (30, 40, 120);
        let cluster =
            fill_verdict_cluster(Cluster::retaining_policy_specs(), policies, peers, cnps).unwrap();
        assert_eq!(cluster.cluster_policies().count(), cnps);
        let problems: Vec<_> = cluster.diagnostics().collect();
        assert!(problems.is_empty(), "{problems:?}");
        let out = Compiler::new().with_threads(1).compile_all(&cluster);
        let state = &out.nodes[VERDICT_NODE];
        let server_key = PodKey::new(VERDICT_NAMESPACE, SERVER);
        let client_key = PodKey::new(VERDICT_NAMESPACE, CLIENT);
        let server = state.endpoints[&server_key];
        let client = state.endpoints[&client_key];
        let oracle = |src: Endpoint, port: u16| {
            let dst = Endpoint::Pod(server_key.clone());
            let want = oracle::allowed(&cluster, &src, &dst, 6, port).unwrap();
            let got = oracle::emulated_allows(&cluster, &out, &src, &dst, 6, port);
            assert_eq!(got, want, "{src:?} → server:{port}: compiled vs. oracle");
            want
        };
        let mut lanes = [0; 3];
        for j in 0..peers {
            let peer = PodKey::new(VERDICT_NAMESPACE, format!("peer-{j}"));
            let got = state.verdict(server.ingress, peer_ip(j).into(), 6, ALLOWED_PORT);
            let (want, allowed, lane) = match Lane::of_peer(j) {
                Lane::Passed => ("Allow by NetworkPolicy", true, 0),
                Lane::Trusted => ("Allow by Admin Accept trusted", true, 1),
                Lane::Quarantined => ("Deny by Admin Deny quarantine", false, 2),
            };
            assert_eq!(decided_by(state, got), want, "peer {j}");
            assert_eq!(oracle(Endpoint::Pod(peer.clone()), ALLOWED_PORT), allowed);
            lanes[lane] += 1;
            // Passed to the NetworkPolicies, which allow port 10000 only; without the Pass
            // the Admin lockdown would have denied it.
            if Lane::of_peer(j) == Lane::Passed {
                let odd = state.verdict(server.ingress, peer_ip(j).into(), 6, ALLOWED_PORT + 1);
                assert_eq!(decided_by(state, odd), "Deny by no rule", "peer {j}");
                assert!(!oracle(Endpoint::Pod(peer), ALLOWED_PORT + 1));
            }
        }
        assert!(lanes.iter().all(|&n| n > 0), "{lanes:?}");
        // The client: its egress is decided by the Baseline tier, the server's ingress by
        // the NetworkPolicies (after the Admin tier's Pass).
        let egress = state.verdict(client.egress, SERVER_IP.into(), 6, ALLOWED_PORT);
        assert_eq!(
            decided_by(state, egress),
            "Allow by Baseline Accept client-egress"
        );
        let ingress = state.verdict(server.ingress, CLIENT_IP.into(), 6, ALLOWED_PORT);
        assert_eq!(decided_by(state, ingress), "Allow by NetworkPolicy");
        assert!(oracle(Endpoint::Pod(client_key.clone()), ALLOWED_PORT));
        let other = state.verdict(client.egress, SERVER_IP.into(), 6, ALLOWED_PORT + 2);
        assert_eq!(
            decided_by(state, other),
            "Deny by Baseline Deny client-egress"
        );
        assert!(!oracle(Endpoint::Pod(client_key), ALLOWED_PORT + 2));
        // The other policies are compiled into the same tables: rules of both tiers decide
        // (Pass rules never do).
        let tiered: std::collections::BTreeSet<_> = state
            .rules
            .values()
            .filter_map(|r| r.tiered.as_ref())
            .map(|t| (t.tier, t.action))
            .collect();
        for tier in [PolicyTier::Admin, PolicyTier::Baseline] {
            for action in [TieredAction::Accept, TieredAction::Deny] {
                assert!(tiered.contains(&(tier, action)), "{tier:?} {action:?}");
            }
        }
    }

    #[test]
    fn without_policies_the_server_is_not_isolated() {
        let cluster = verdict_cluster(0, 10).unwrap();
        let out = Compiler::new().with_threads(1).compile_all(&cluster);
        let server = out.nodes[VERDICT_NODE].endpoints[&PodKey::new(VERDICT_NAMESPACE, SERVER)];
        assert_eq!(server.ingress, weir_api::NOT_ISOLATED);
    }
}
