//! Ids stay stable across compiles, so a change becomes a small diff on the nodes whose
//! rule sets care and no diff elsewhere.

mod support;

use support::*;
use weir_api::{NodeState, PodKey};
use weir_compiler::{Compiler, PolicyKey};

/// Two namespaces on separate nodes; `a` has a policy admitting `role: client` pods of `b`.
fn setup() -> Harness {
    let namespaces = vec![namespace("a", &[]), namespace("b", &[])];
    let pods = vec![
        pod("a/server")
            .labels(&[("app", "server")])
            .ip("10.0.0.1")
            .node("node-a"),
        pod("a/other")
            .labels(&[("app", "other")])
            .ip("10.0.0.2")
            .node("node-a"),
        pod("b/client-1")
            .labels(&[("role", "client")])
            .ip("10.0.1.1")
            .node("node-b"),
        pod("b/client-2")
            .labels(&[("role", "client")])
            .ip("10.0.1.2")
            .node("node-b"),
        pod("b/idle")
            .labels(&[("role", "idle")])
            .ip("10.0.1.3")
            .node("node-b"),
        pod("b/far")
            .labels(&[("role", "idle")])
            .ip("10.0.1.4")
            .node("node-c"),
    ];
    let p = policy(
        r#"
metadata: {name: from-clients, namespace: a}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: client}}}]
    ports: [{port: 443}]
"#,
    );
    Harness::new(cluster(&namespaces, &pods, &[p]))
}

fn diff_len(old: &NodeState, new: &NodeState) -> usize {
    old.diff(new, 1, 2).len()
}

fn relabel(h: &mut Harness, key: &str, pairs: &[(&str, &str)], node: &str, ip: &str) {
    let p = pod(key).labels(pairs).ip(ip).node(node);
    h.cluster.upsert_pod(&p.build()).unwrap();
}

#[test]
fn recompiling_an_unchanged_cluster_changes_nothing() {
    let mut h = setup();
    let before = h.out.clone();
    h.recompile();
    assert_eq!(before, h.out);
}

#[test]
fn a_pod_joining_a_peer_set_is_one_host_entry_on_the_node_that_cares() {
    let mut h = setup();
    let before = h.out.clone();
    assert!(!h.tcp("b/idle", "a/server", 443));
    relabel(
        &mut h,
        "b/idle",
        &[("role", "client")],
        "node-b",
        "10.0.1.3",
    );
    h.recompile();
    assert!(h.tcp("b/idle", "a/server", 443));
    let d = before.nodes["node-a"].diff(&h.out.nodes["node-a"], 1, 2);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(d.peer_classes.upsert.len(), 1);
    assert_eq!(diff_len(&before.nodes["node-b"], &h.out.nodes["node-b"]), 0);
    assert_eq!(diff_len(&before.nodes["node-c"], &h.out.nodes["node-c"]), 0);
}

#[test]
fn a_label_change_no_policy_refers_to_changes_no_node() {
    let mut h = setup();
    let before = h.out.clone();
    relabel(
        &mut h,
        "b/far",
        &[("role", "idle"), ("color", "blue")],
        "node-c",
        "10.0.1.4",
    );
    relabel(
        &mut h,
        "a/other",
        &[("app", "other"), ("color", "red")],
        "node-a",
        "10.0.0.2",
    );
    h.recompile();
    for (node, state) in &before.nodes {
        assert_eq!(diff_len(state, &h.out.nodes[node]), 0, "{node}");
    }
}

#[test]
fn a_new_policy_elsewhere_does_not_disturb_this_node() {
    let mut h = setup();
    let before = h.out.clone();
    h.cluster
        .upsert_policy(&policy(
            r#"
metadata: {name: deny-far, namespace: b}
spec: {podSelector: {matchLabels: {role: idle}}, policyTypes: [Ingress, Egress]}
"#,
        ))
        .unwrap();
    h.recompile();
    assert_eq!(diff_len(&before.nodes["node-a"], &h.out.nodes["node-a"]), 0);
    assert_ne!(diff_len(&before.nodes["node-c"], &h.out.nodes["node-c"]), 0);
}

#[test]
fn released_ids_are_not_reused_by_the_next_compile() {
    let mut h = setup();
    let server = PodKey::new("a", "server");
    let old_set = h.out.nodes["node-a"].endpoints[&server].ingress;
    // Replace the policy by a different one: a new rule set appears while the old one goes.
    h.cluster
        .delete_policy(&PolicyKey::new("a", "from-clients"));
    h.cluster
        .upsert_policy(&policy(
            r#"
metadata: {name: replacement, namespace: a}
spec: {podSelector: {matchLabels: {app: server}}}
"#,
        ))
        .unwrap();
    h.recompile();
    let new_set = h.out.nodes["node-a"].endpoints[&server].ingress;
    assert_ne!(
        new_set, old_set,
        "an id never changes meaning within one diff"
    );
    assert!(!h.tcp("b/client-1", "a/server", 443));
}

#[test]
fn peers_no_policy_uses_are_forgotten_after_a_full_compile() {
    let mut h = setup();
    let with_policy = h.compiler.interned_peers();
    assert!(with_policy > 0);
    h.cluster
        .delete_policy(&PolicyKey::new("a", "from-clients"));
    h.recompile();
    assert_eq!(h.compiler.interned_peers(), 0);
    assert!(
        h.out
            .nodes
            .values()
            .all(|s| s.verdicts.is_empty() && s.peer_classes.is_empty())
    );
}

#[test]
fn node_memory_follows_the_nodes_of_the_cluster() {
    let mut h = setup();
    let before = h.out.clone();
    h.cluster.delete_pod(&PodKey::new("b", "far"));
    h.recompile();
    assert!(
        !h.out.nodes.contains_key("node-c"),
        "no Node object, no pods: gone"
    );
    relabel(&mut h, "b/far", &[("role", "idle")], "node-c", "10.0.1.4");
    h.recompile();
    assert_eq!(h.out.nodes["node-c"], before.nodes["node-c"]);
    // And a fresh compiler agrees with one that has a history.
    let again = Compiler::new().with_threads(1).compile_all(&h.cluster);
    assert_eq!(again.nodes["node-c"], h.out.nodes["node-c"]);
}

#[test]
fn a_forgotten_node_compiles_from_fresh_ids() {
    let mut h = setup();
    let before = h.out.nodes["node-a"].clone();
    h.compiler.forget_node("node-a");
    let again = h.compiler.compile_node(&h.cluster, "node-a");
    assert_eq!(again, before, "same content, same history-free ids");
    assert_eq!(
        h.compiler.compile_node(&h.cluster, "node-b"),
        h.out.nodes["node-b"]
    );
}
