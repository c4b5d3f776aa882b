//! HostPolicy: the node itself as an endpoint of its own state, isolated for ingress by the
//! HostPolicies whose node selector matches its labels.

mod support;

use support::*;
use weir_api::{Action, NOT_ISOLATED, NodeState, PodKey};
use weir_compiler::{Cluster, host_policy::HostPolicy};

const WORKERS: &str = r#"
apiVersion: weir.dev/v1alpha1
kind: HostPolicy
metadata: {name: workers}
spec:
  nodeSelector: {matchLabels: {role: worker}}
  ingress:
  - from: [{ipBlock: {cidr: 192.0.2.0/24}}]
    ports: [{protocol: TCP, port: 9100}]
  - from: [{nodeSelector: {matchLabels: {role: control-plane}}}]
  - from: [{namespaceSelector: {matchLabels: {env: prod}}, podSelector: {matchLabels: {app: web}}}]
    ports: [{protocol: UDP, port: 53}]
"#;

fn cluster_with(policies: &[&str]) -> Cluster {
    let namespaces = [
        namespace("prod", &[("env", "prod")]),
        namespace("dev", &[("env", "dev")]),
    ];
    let pods = [
        pod("prod/web")
            .labels(&[("app", "web")])
            .ip("10.0.0.1")
            .node("node-1"),
        pod("dev/web")
            .labels(&[("app", "web")])
            .ip("10.0.1.1")
            .node("node-2"),
    ];
    let mut c = cluster(&namespaces, &pods, &[]);
    c.upsert_node(&node(
        "cp",
        &[("role", "control-plane")],
        &[("InternalIP", "192.168.1.10")],
    ))
    .unwrap();
    c.upsert_node(&node(
        "node-1",
        &[("role", "worker")],
        &[("InternalIP", "192.168.1.1")],
    ))
    .unwrap();
    c.upsert_node(&node(
        "node-2",
        &[("role", "worker")],
        &[("InternalIP", "192.168.1.2")],
    ))
    .unwrap();
    for p in policies {
        let hp: HostPolicy = serde_norway::from_str(p).unwrap();
        c.upsert_host_policy(&hp).unwrap();
    }
    c
}

fn host_allows(state: &NodeState, src: &str, protocol: u8, port: u16) -> bool {
    let rs = state.endpoints[&PodKey::host()].ingress;
    state.verdict(rs, src.parse().unwrap(), protocol, port).0 == Action::Allow
}

#[test]
fn a_host_policy_isolates_the_nodes_it_selects_and_allows_what_its_rules_say() {
    let c = cluster_with(&[WORKERS]);
    let mut h = Harness::new(c);
    assert!(h.out.diagnostics.is_empty(), "{:?}", h.out.diagnostics);
    assert!(
        !h.out.nodes["cp"].endpoints.contains_key(&PodKey::host()),
        "not selected: not isolated"
    );
    let n1 = &h.out.nodes["node-1"];
    let host = n1.endpoints[&PodKey::host()];
    assert_ne!(host.ingress, NOT_ISOLATED);
    assert_eq!(host.egress, NOT_ISOLATED);
    assert!(host_allows(n1, "192.0.2.7", TCP, 9100));
    assert!(!host_allows(n1, "192.0.2.7", TCP, 22));
    assert!(!host_allows(n1, "198.51.100.1", TCP, 9100));
    assert!(
        host_allows(n1, "192.168.1.10", TCP, 10250),
        "control plane: anything"
    );
    assert!(
        !host_allows(n1, "192.168.1.2", TCP, 10250),
        "another worker"
    );
    assert!(host_allows(n1, "10.0.0.1", UDP, 53), "prod/web");
    assert!(!host_allows(n1, "10.0.0.1", TCP, 53));
    assert!(!host_allows(n1, "10.0.1.1", UDP, 53), "dev/web");
    // Drops name the policy.
    let (_, rule) = n1.verdict(host.ingress, "192.0.2.7".parse().unwrap(), TCP, 9100);
    assert_eq!(n1.rules[&rule].policy.to_string(), "HostPolicy/workers");
    assert_eq!(
        n1.rule_sets[&host.ingress].policies[0].to_string(),
        "HostPolicy/workers"
    );
    // Pods keep their own state: no policy selects them.
    assert_eq!(
        n1.endpoints[&PodKey::new("prod", "web")].ingress,
        NOT_ISOLATED
    );

    // A label change moves a node out (and the control plane in).
    h.cluster
        .upsert_node(&node(
            "node-1",
            &[("role", "spare")],
            &[("InternalIP", "192.168.1.1")],
        ))
        .unwrap();
    h.cluster
        .upsert_node(&node(
            "cp",
            &[("role", "worker")],
            &[("InternalIP", "192.168.1.10")],
        ))
        .unwrap();
    h.recompile();
    assert!(
        !h.out.nodes["node-1"]
            .endpoints
            .contains_key(&PodKey::host())
    );
    assert!(h.out.nodes["cp"].endpoints.contains_key(&PodKey::host()));
    h.cluster.delete_host_policy("workers");
    h.recompile();
    assert!(
        h.out
            .nodes
            .values()
            .all(|n| !n.endpoints.contains_key(&PodKey::host()))
    );
}

#[test]
fn an_unreadable_host_policy_fails_closed_and_leaves_the_others_alone() {
    let bad = r#"
apiVersion: weir.dev/v1alpha1
kind: HostPolicy
metadata: {name: bad}
spec:
  nodeSelector: {matchLabels: {role: control-plane}}
  ingress:
  - from: [{ipBlock: {cidr: not-a-cidr}}]
"#;
    let h = Harness::new(cluster_with(&[WORKERS, bad]));
    let d: Vec<String> = h.out.diagnostics.iter().map(|d| d.to_string()).collect();
    assert!(
        d.iter()
            .any(|d| d.starts_with("HostPolicy/bad: spec.ingress[0].from[0].ipBlock.cidr")),
        "{d:?}"
    );
    let cp = &h.out.nodes["cp"];
    assert!(!host_allows(cp, "192.168.1.1", TCP, 22), "allows nothing");
    assert!(!host_allows(cp, "192.0.2.7", TCP, 9100));
    assert!(
        host_allows(&h.out.nodes["node-1"], "192.0.2.7", TCP, 9100),
        "workers unaffected"
    );
}

#[test]
fn egress_rules_isolate_the_nodes_own_connections() {
    let out = r#"
apiVersion: weir.dev/v1alpha1
kind: HostPolicy
metadata: {name: out}
spec:
  nodeSelector: {matchLabels: {role: worker}}
  policyTypes: [Egress]
  egress:
  - to: [{nodeSelector: {matchLabels: {role: control-plane}}}]
  - to: [{ipBlock: {cidr: 192.0.2.0/24}}]
    ports: [{protocol: UDP, port: 123}]
"#;
    let h = Harness::new(cluster_with(&[out]));
    assert!(h.out.diagnostics.is_empty(), "{:?}", h.out.diagnostics);
    let n1 = &h.out.nodes["node-1"];
    let host = n1.endpoints[&PodKey::host()];
    assert_eq!(host.ingress, NOT_ISOLATED, "policyTypes: [Egress]");
    assert_ne!(host.egress, NOT_ISOLATED);
    let allows = |dst: &str, protocol, port| {
        n1.verdict(host.egress, dst.parse().unwrap(), protocol, port)
            .0
            == Action::Allow
    };
    assert!(allows("192.168.1.10", TCP, 6443), "the control plane");
    assert!(!allows("192.168.1.2", TCP, 6443), "another worker");
    assert!(allows("192.0.2.9", UDP, 123));
    assert!(!allows("192.0.2.9", TCP, 123));
    assert!(!allows("10.0.1.1", TCP, 80), "a pod");
    let (_, rule) = n1.verdict(host.egress, "192.0.2.9".parse().unwrap(), UDP, 123);
    assert_eq!(
        n1.rules[&rule].to_string(),
        "HostPolicy/out egress #1",
        "drops and flows name the rule"
    );
}

#[test]
fn untracked_rules_are_a_deny_rule_set_of_their_own() {
    let edge = r#"
apiVersion: weir.dev/v1alpha1
kind: HostPolicy
metadata: {name: edge}
spec:
  nodeSelector: {matchLabels: {role: worker}}
  policyTypes: []
  untracked:
  - from: [{ipBlock: {cidr: 198.51.100.0/24, except: [198.51.100.128/25]}}]
    ports: [{protocol: UDP, port: 161}]
  - from: [{nodeSelector: {matchLabels: {role: control-plane}}}]
"#;
    let mut h = Harness::new(cluster_with(&[WORKERS, edge]));
    assert!(h.out.diagnostics.is_empty(), "{:?}", h.out.diagnostics);
    let n1 = &h.out.nodes["node-1"];
    let host = n1.endpoints[&PodKey::host()];
    let untracked = n1.endpoints[&PodKey::host_untracked()];
    assert_eq!(untracked.egress, NOT_ISOLATED);
    assert_ne!(untracked.ingress, host.ingress, "a rule set of their own");
    let drops = |src: &str, protocol, port| {
        n1.verdict(untracked.ingress, src.parse().unwrap(), protocol, port)
            .0
            == Action::Deny
    };
    assert!(drops("198.51.100.7", UDP, 161));
    assert!(!drops("198.51.100.7", UDP, 162), "another port passes");
    assert!(!drops("198.51.100.200", UDP, 161), "the except passes");
    assert!(!drops("192.0.2.7", TCP, 9100), "another source passes");
    assert!(
        drops("192.168.1.10", TCP, 22),
        "the control plane, anything"
    );
    let (_, rule) = n1.verdict(untracked.ingress, "198.51.100.7".parse().unwrap(), UDP, 161);
    assert_eq!(
        n1.rules[&rule].to_string(),
        "HostPolicy/edge/untracked[0] (untracked)"
    );
    // The tracked part is WORKERS's alone: `edge` isolates nothing.
    assert_eq!(n1.rule_sets[&host.ingress].policies.len(), 1);
    assert!(
        !h.out.nodes["cp"]
            .endpoints
            .contains_key(&PodKey::host_untracked()),
        "not selected"
    );
    // Removing the untracked rules removes the rule set.
    let mut changed: HostPolicy = serde_norway::from_str(edge).unwrap();
    changed.spec.untracked = None;
    h.cluster.upsert_host_policy(&changed).unwrap();
    h.recompile();
    assert!(
        !h.out.nodes["node-1"]
            .endpoints
            .contains_key(&PodKey::host_untracked())
    );
}
