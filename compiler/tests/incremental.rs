//! Incremental compiles on hand-written scenarios: which nodes a change recompiles, and that
//! their states are what a full compile gives. (Random change sequences are in the property
//! tests.)

mod support;

use std::collections::{BTreeMap, BTreeSet};

use support::*;
use weir_api::NodeState;
use weir_compiler::{Cluster, Compiler, PolicyKey};

/// A compiler fed only changes, the states it has published, and a second compiler that
/// compiles everything each time, to compare with.
struct Twin {
    cluster: Cluster,
    incremental: Compiler,
    full: Compiler,
    states: BTreeMap<String, NodeState>,
}

impl Twin {
    fn new(mut cluster: Cluster) -> Self {
        let mut incremental = Compiler::new().with_threads(1);
        let changes = cluster.take_changes();
        let first = incremental.compile_changes(&cluster, &changes);
        assert!(first.everything);
        let mut full = Compiler::new().with_threads(1);
        assert_eq!(first.nodes, full.compile_all(&cluster).nodes);
        Self {
            cluster,
            incremental,
            full,
            states: first.nodes,
        }
    }

    fn upsert(&mut self, pod: PodBuilder) {
        self.cluster.upsert_pod(&pod.build()).unwrap();
    }

    /// Compiles the changes made since the last call; returns the nodes recompiled.
    fn compile(&mut self) -> BTreeSet<String> {
        let changes = self.cluster.take_changes();
        let update = self.incremental.compile_changes(&self.cluster, &changes);
        assert!(!update.everything);
        for node in &update.removed {
            self.states.remove(node);
        }
        let recompiled: BTreeSet<String> = update.nodes.keys().cloned().collect();
        self.states.extend(update.nodes);
        let expected = self.full.compile_all(&self.cluster);
        assert_eq!(self.states, expected.nodes);
        recompiled
    }
}

/// A pod labelled `app: <app>` on `node` at `ip`.
fn app_pod(key: &str, app: &str, node: &str, ip: &str) -> PodBuilder {
    pod(key).labels(&[("app", app)]).node(node).ip(ip)
}

fn names(nodes: &[&str]) -> BTreeSet<String> {
    nodes.iter().map(|n| (*n).to_owned()).collect()
}

/// Three nodes: `db` on node-1 admits `app=web` pods; `web` runs on node-0; `other` on
/// node-2 is nobody's peer.
fn three_nodes() -> Cluster {
    cluster(
        &[namespace("prod", &[("env", "prod")])],
        &[
            app_pod("prod/web", "web", "node-0", "10.0.0.1"),
            app_pod("prod/db", "db", "node-1", "10.0.1.1"),
            app_pod("prod/other", "other", "node-2", "10.0.2.1"),
        ],
        &[policy(
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: web}}
"#,
        )],
    )
}

#[test]
fn a_pod_leaving_a_peer_recompiles_its_node_and_the_nodes_that_refer_to_the_peer() {
    let mut t = Twin::new(three_nodes());
    t.upsert(app_pod("prod/web", "cache", "node-0", "10.0.0.1"));
    assert_eq!(t.compile(), names(&["node-0", "node-1"]));
}

#[test]
fn a_label_change_nobody_refers_to_recompiles_only_the_pods_node() {
    let mut t = Twin::new(three_nodes());
    t.upsert(app_pod("prod/other", "batch", "node-2", "10.0.2.1"));
    assert_eq!(t.compile(), names(&["node-2"]));
}

#[test]
fn a_peer_changing_address_recompiles_the_nodes_that_refer_to_it() {
    let mut t = Twin::new(three_nodes());
    t.upsert(app_pod("prod/web", "web", "node-0", "10.0.0.9"));
    assert_eq!(t.compile(), names(&["node-0", "node-1"]));
}

#[test]
fn a_namespace_relabel_recompiles_the_nodes_whose_peers_select_by_it() {
    let mut c = three_nodes();
    c.upsert_policy(&policy(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: other, namespace: prod}
spec:
  podSelector: {matchLabels: {app: other}}
  egress:
  - to:
    - namespaceSelector: {matchLabels: {env: prod}}
"#,
    ))
    .unwrap();
    let mut t = Twin::new(c);
    t.cluster
        .upsert_namespace(&namespace("prod", &[("env", "staging")]))
        .unwrap();
    assert_eq!(t.compile(), names(&["node-2"]));
}

#[test]
fn a_policy_change_recompiles_the_nodes_of_the_pods_it_selected_or_selects() {
    let mut c = three_nodes();
    c.upsert_pod(&pod("dev/x").node("node-2").ip("10.0.2.7").build())
        .unwrap();
    let mut t = Twin::new(c);
    t.cluster.delete_policy(&PolicyKey::new("prod", "db"));
    assert_eq!(t.compile(), names(&["node-1"]));
    let isolate = |app: &str| {
        policy(&format!(
            "metadata: {{name: db, namespace: prod}}\nspec: {{podSelector: {{matchLabels: {{app: {app}}}}}}}\n"
        ))
    };
    t.cluster.upsert_policy(&isolate("web")).unwrap();
    assert_eq!(t.compile(), names(&["node-0"]));
    // Now selecting `db` instead of `web`.
    t.cluster.upsert_policy(&isolate("db")).unwrap();
    assert_eq!(t.compile(), names(&["node-0", "node-1"]));
    t.cluster
        .upsert_policy(&policy(
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: dev}
spec:
  podSelector: {}
"#,
        ))
        .unwrap();
    assert_eq!(t.compile(), names(&["node-2"]));
}

#[test]
fn pods_added_moved_and_deleted_and_nodes_gone() {
    let mut t = Twin::new(three_nodes());
    t.upsert(app_pod("prod/web2", "web", "node-3", "10.0.3.1"));
    assert_eq!(t.compile(), names(&["node-1", "node-3"]));
    t.upsert(app_pod("prod/web2", "web", "node-2", "10.0.3.1"));
    // node-3 has no pod left and no Node object: it is gone. The peer's members are the
    // same: node-1 stays as it is.
    assert_eq!(t.compile(), names(&["node-2"]));
    assert!(!t.states.contains_key("node-3"));
    t.cluster.delete_pod(&weir_api::PodKey::new("prod", "web"));
    assert_eq!(t.compile(), names(&["node-1"]));
    assert!(!t.states.contains_key("node-0"));
}

#[test]
fn an_unchanged_cluster_recompiles_nothing() {
    let mut t = Twin::new(three_nodes());
    t.upsert(app_pod("prod/web", "web", "node-0", "10.0.0.1"));
    assert_eq!(t.compile(), BTreeSet::new());
}
