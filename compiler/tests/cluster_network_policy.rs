//! ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`): the typed objects read the
//! upstream project's manifests, and one test per semantic point, each checked through the
//! emulated dataplane against the reference oracle (the harness asserts they agree).

mod support;

use std::path::Path;

use serde::Deserialize;
use support::*;
use weir_api::{Action, NOT_ISOLATED, PodKey, PolicyTier, TieredAction, TieredRule};
use weir_compiler::{
    Problem, Severity,
    cnp::{self, ClusterNetworkPolicy},
};

/// Manifests copied from kubernetes-sigs/network-policy-api (`conformance/base`).
const UPSTREAM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/network-policy-api");

fn upstream_policies() -> Vec<(String, ClusterNetworkPolicy)> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(Path::new(UPSTREAM))
        .expect("test data")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        // Some upstream manifests are Go templates (ports of host-network test pods).
        let text = render(&std::fs::read_to_string(&file).expect("read"));
        for document in serde_norway::Deserializer::from_str(&text) {
            let object = serde_json::Value::deserialize(document).expect("parses");
            if object["kind"] == cnp::KIND {
                assert_eq!(object["apiVersion"], cnp::API_VERSION, "{name}");
                out.push((name.clone(), serde_json::from_value(object).expect("a CNP")));
            }
        }
    }
    out
}

/// Replaces every `{{ ... }}` with a port number: `{{ index .HostNetworkPorts N }}` with
/// 34567 + N (upstream's ranges go from one of them to a later one).
fn render(template: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("}}").expect("closed template action") + start + 2;
        let index: u16 = rest[start + 2..end - 2]
            .split_whitespace()
            .last()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        out.push_str(&(34567 + index).to_string());
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[test]
fn upstream_manifests_parse_and_standard_ones_validate_cleanly() {
    let policies = upstream_policies();
    assert!(policies.len() >= 19, "found {}", policies.len());
    for (file, p) in &policies {
        // Nothing of the object is lost in the typed round trip.
        let back = serde_json::to_value(p).unwrap();
        let again: ClusterNetworkPolicy = serde_json::from_value(back).unwrap();
        assert_eq!(&again, p, "{file}");
        let validated = cnp::validate(p).unwrap();
        let errors: Vec<_> = validated
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .collect();
        let domain_names = p
            .spec
            .egress
            .iter()
            .flatten()
            .flat_map(|r| r.to.iter().flatten())
            .any(|peer| peer.domain_names.is_some());
        if domain_names {
            // domainNames peers: reported as unsupported, never passed silently.
            assert!(
                errors
                    .iter()
                    .any(|d| matches!(d.problem, Problem::Unsupported { .. })),
                "{file}: {errors:?}"
            );
        } else {
            assert!(errors.is_empty(), "{file}: {errors:?}");
            assert!(validated.policy.valid, "{file}");
        }
    }
}

#[test]
fn unknown_fields_fail_closed_with_a_report() {
    let p: ClusterNetworkPolicy = serde_norway::from_str(
        r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: future}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {}}
  ingress:
  - action: Accept
    from: [{someFuturePeer: {}}]
  - action: Pass
    from: [{namespaces: {}}]
    protocols: [{icmp: {}}]
"#,
    )
    .unwrap();
    let v = cnp::validate(&p).unwrap();
    let fields: Vec<&str> = v.diagnostics.iter().map(|d| d.field.as_str()).collect();
    assert!(
        fields.contains(&"spec.ingress[0].from[0].someFuturePeer"),
        "{fields:?}"
    );
    assert!(
        fields.contains(&"spec.ingress[1].protocols[0].icmp"),
        "{fields:?}"
    );
    let rules = v.policy.ingress.as_ref().unwrap();
    // The Accept rule matches nothing; the Pass rule denies everything.
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].index, 1);
    assert_eq!(rules[0].action, weir_compiler::policy::RuleAction::Deny);
    assert!(rules[0].peers.is_none() && rules[0].ports.is_none());
}

// ------------------------------------------------------------------ semantics

fn pods() -> Vec<PodBuilder> {
    vec![
        pod("prod/web")
            .labels(&[("app", "web")])
            .ip("10.0.0.1")
            .node("node-1")
            .port("http", 8080, "TCP")
            .port("dns", 53, "UDP"),
        pod("prod/db")
            .labels(&[("app", "db")])
            .ip("10.0.0.2")
            .node("node-2"),
        pod("dev/web")
            .labels(&[("app", "web")])
            .ip("10.0.1.1")
            .node("node-2")
            .port("http", 9090, "TCP"),
        pod("kube-system/dns")
            .labels(&[("app", "dns")])
            .ip("10.0.2.1")
            .node("node-1"),
    ]
}

fn harness(policies: &[&str], cnps: &[&str]) -> Harness {
    let namespaces = [
        namespace("prod", &[("env", "prod")]),
        namespace("dev", &[("env", "dev")]),
        namespace("kube-system", &[]),
    ];
    let policies: Vec<_> = policies.iter().map(|p| policy(p)).collect();
    let mut c = cluster(&namespaces, &pods(), &policies);
    for p in cnps {
        let p: ClusterNetworkPolicy = serde_norway::from_str(p).expect("CNP YAML");
        c.upsert_cluster_policy(&p).expect("stored");
    }
    Harness::new(c)
}

fn udp(h: &Harness, src: &str, dst: &str, port: u16) -> bool {
    h.allows(&parse_ep(src), &parse_ep(dst), UDP, port)
}

const TENANT_ISOLATION: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: tenants}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {matchLabels: {env: prod}}}
  ingress:
  - name: deny-dev
    action: Deny
    from: [{namespaces: {matchLabels: {env: dev}}}]
"#;

#[test]
fn admin_deny_overrides_a_network_policy_allow() {
    let allow_all = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-all, namespace: prod}
spec:
  podSelector: {}
  ingress: [{}]
"#;
    let h = harness(&[allow_all], &[TENANT_ISOLATION]);
    assert!(!h.tcp("dev/web", "prod/web", 80));
    assert!(h.tcp("prod/db", "prod/web", 80));
    assert!(h.tcp("kube-system/dns", "prod/web", 80));
    // The drop names the ClusterNetworkPolicy rule.
    let node = &h.out.nodes["node-1"];
    let rs = node.endpoints[&PodKey::new("prod", "web")].ingress;
    let (action, rule) = node.verdict(rs, "10.0.1.1".parse().unwrap(), TCP, 80);
    assert_eq!(action, Action::Deny);
    let r = &node.rules[&rule];
    assert_eq!(r.policy.to_string(), "ClusterNetworkPolicy/tenants");
    assert_eq!(r.index, 0);
    // With its tier, priority, name and action, for flow events and metrics.
    assert_eq!(
        r.tiered,
        Some(TieredRule {
            tier: PolicyTier::Admin,
            priority: 10,
            name: "deny-dev".into(),
            action: TieredAction::Deny,
        })
    );
    assert_eq!(
        r.to_string(),
        "ClusterNetworkPolicy/tenants/deny-dev ingress (Admin tier, priority 10)"
    );
    // NetworkPolicy rules carry none of it.
    let (action, rule) = node.verdict(rs, "10.0.0.2".parse().unwrap(), TCP, 80);
    assert_eq!(action, Action::Allow);
    assert_eq!(node.rules[&rule].tiered, None);
    assert_eq!(
        node.rules[&rule].to_string(),
        "NetworkPolicy/prod/allow-all ingress #0"
    );
}

#[test]
fn a_pod_selected_only_by_a_cluster_policy_is_isolated_only_where_a_rule_matches() {
    let h = harness(&[], &[TENANT_ISOLATION]);
    let node = &h.out.nodes["node-1"];
    assert_ne!(
        node.endpoints[&PodKey::new("prod", "web")].ingress,
        NOT_ISOLATED
    );
    assert_eq!(
        node.endpoints[&PodKey::new("prod", "web")].egress,
        NOT_ISOLATED,
        "no egress rules: egress unaffected"
    );
    assert!(!h.tcp("dev/web", "prod/web", 80));
    assert!(h.tcp("prod/db", "prod/web", 80));
    assert!(h.allows(&ip_ep("192.0.2.1"), &pod_ep("prod/web"), ICMP, 0));
    assert!(h.tcp("prod/web", "dev/web", 80));
}

#[test]
fn pass_hands_over_to_network_policies_and_baseline_applies_only_without_them() {
    let admin = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: pass-dns}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {}}
  egress:
  - name: pass-dns
    action: Pass
    to: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: kube-system}}}]
    protocols: [{udp: {destinationPort: {number: 53}}}]
  - name: deny-kube-system
    action: Deny
    to: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: kube-system}}}]
"#;
    let baseline = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: default-deny}
spec:
  tier: Baseline
  priority: 1
  subject: {namespaces: {}}
  egress:
  - name: deny-all
    action: Deny
    to: [{networks: ["0.0.0.0/0"]}]
"#;
    let dev_egress = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: dns-only, namespace: dev}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - ports: [{protocol: UDP, port: 53}]
"#;
    let h = harness(&[dev_egress], &[admin, baseline]);
    // Passed DNS: prod has no NetworkPolicy, so the Baseline deny applies.
    assert!(!udp(&h, "prod/web", "kube-system/dns", 53));
    // dev's NetworkPolicy allows DNS, and Baseline is not consulted.
    assert!(udp(&h, "dev/web", "kube-system/dns", 53));
    // The Admin deny beats dev's NetworkPolicy.
    assert!(!h.tcp("dev/web", "kube-system/dns", 53));
    // Baseline default deny for prod; dev's NetworkPolicy isolates it.
    assert!(!h.tcp("prod/web", "prod/db", 80));
    assert!(!h.tcp("dev/web", "prod/db", 80));
    assert!(udp(&h, "dev/web", "prod/db", 53));
}

#[test]
fn priorities_order_policies_and_equal_priorities_order_by_name() {
    let deny = |name: &str, priority: u32| {
        format!(
            r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {{name: {name}}}
spec:
  tier: Admin
  priority: {priority}
  subject: {{pods: {{podSelector: {{matchLabels: {{app: db}}}}}}}}
  ingress:
  - action: Deny
    from: [{{namespaces: {{}}}}]
"#
        )
    };
    let accept = |name: &str, priority: u32| {
        format!(
            r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {{name: {name}}}
spec:
  tier: Admin
  priority: {priority}
  subject: {{pods: {{podSelector: {{matchLabels: {{app: db}}}}}}}}
  ingress:
  - action: Accept
    from: [{{pods: {{podSelector: {{matchLabels: {{app: web}}}}}}}}]
    protocols: [{{tcp: {{destinationPort: {{range: {{start: 5000, end: 6000}}}}}}}}]
"#
        )
    };
    let h = harness(&[], &[&deny("b-deny", 5), &accept("a-accept", 6)]);
    assert!(!h.tcp("prod/web", "prod/db", 5432));
    let h = harness(&[], &[&deny("b-deny", 5), &accept("a-accept", 4)]);
    assert!(h.tcp("prod/web", "prod/db", 5432));
    assert!(h.tcp("prod/web", "prod/db", 5000));
    assert!(h.tcp("prod/web", "prod/db", 6000));
    assert!(!h.tcp("prod/web", "prod/db", 6001));
    assert!(!h.tcp("kube-system/dns", "prod/db", 5432));
    // Equal priorities: by name, "a-accept" first.
    let h = harness(&[], &[&deny("b-deny", 5), &accept("a-accept", 5)]);
    assert!(h.tcp("prod/web", "prod/db", 5432));
    let h = harness(&[], &[&deny("a-deny", 5), &accept("b-accept", 5)]);
    assert!(!h.tcp("prod/web", "prod/db", 5432));
}

#[test]
fn named_ports_resolve_against_the_destination_pod() {
    let p = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: http-only}
spec:
  tier: Baseline
  priority: 0
  subject: {pods: {podSelector: {matchLabels: {app: web}}}}
  ingress:
  - action: Accept
    from: [{namespaces: {}}]
    protocols: [{destinationNamedPort: http}]
  - action: Deny
    from: [{namespaces: {}}]
"#;
    let h = harness(&[], &[p]);
    assert!(h.tcp("prod/db", "prod/web", 8080));
    assert!(!h.tcp("prod/db", "prod/web", 9090));
    assert!(h.tcp("prod/db", "dev/web", 9090));
    assert!(!h.tcp("prod/db", "dev/web", 8080));
    assert!(!udp(&h, "prod/db", "prod/web", 53));
}

#[test]
fn unsupported_peers_fail_closed() {
    let p = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: names}
spec:
  tier: Admin
  priority: 0
  subject: {namespaces: {matchLabels: {env: prod}}}
  ingress:
  - action: Accept
    from: [{nodes: {}}]
  egress:
  - action: Accept
    to: [{namespaces: {}}]
    protocols: [{tcp: {destinationPort: {number: 443}}}]
  - action: Pass
    to: [{domainNames: ["example.com"]}]
"#;
    let h = harness(&[], &[p]);
    let d: Vec<_> = h.out.diagnostics.iter().map(|d| d.to_string()).collect();
    assert!(
        d.iter().any(|d| d.contains(
            "ClusterNetworkPolicy/names: spec.ingress[0].from[0].nodes: unsupported: nodes is an egress peer only"
        )),
        "{d:?}"
    );
    assert!(
        d.iter()
            .any(|d| d.contains("ClusterNetworkPolicy/names: spec.egress[1].to[0].domainNames")),
        "{d:?}"
    );
    assert!(h.tcp("prod/web", "dev/web", 443), "before the failed rule");
    assert!(
        !h.tcp("prod/web", "dev/web", 80),
        "the Pass rule denies all"
    );
    assert!(
        h.tcp("dev/web", "prod/web", 80),
        "an unreadable Accept rule matches nothing"
    );
}

#[test]
fn nodes_peers_select_node_addresses_by_label() {
    let p = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: node-access}
spec:
  tier: Admin
  priority: 5
  subject: {namespaces: {matchLabels: {env: prod}}}
  egress:
  - name: kubelet-zone-a
    action: Accept
    to: [{nodes: {matchLabels: {zone: a}}}]
    protocols: [{tcp: {destinationPort: {number: 10250}}}]
  - name: dns-decided-below
    action: Pass
    to: [{nodes: {matchLabels: {kubernetes.io/os: linux}}}]
    protocols: [{udp: {destinationPort: {number: 53}}}]
  - name: no-other-node
    action: Deny
    to: [{nodes: {matchLabels: {kubernetes.io/os: linux}}}]
"#;
    let namespaces = [
        namespace("prod", &[("env", "prod")]),
        namespace("dev", &[("env", "dev")]),
        namespace("kube-system", &[]),
    ];
    let mut c = cluster(&namespaces, &pods(), &[]);
    let linux = ("kubernetes.io/os", "linux");
    c.upsert_node(&node(
        "node-1",
        &[linux, ("zone", "a")],
        &[("InternalIP", "192.168.1.1"), ("Hostname", "node-1")],
    ))
    .unwrap();
    c.upsert_node(&node(
        "node-2",
        &[linux, ("zone", "b")],
        &[("InternalIP", "192.168.1.2"), ("ExternalIP", "203.0.113.2")],
    ))
    .unwrap();
    c.upsert_node(&node(
        "node-3",
        &[("kubernetes.io/os", "windows")],
        &[("InternalIP", "192.168.1.3")],
    ))
    .unwrap();
    c.upsert_cluster_policy(&serde_norway::from_str(p).unwrap())
        .unwrap();
    let mut h = Harness::new(c);
    assert!(h.out.diagnostics.is_empty(), "{:?}", h.out.diagnostics);
    assert!(h.tcp("prod/web", "192.168.1.1", 10250));
    assert!(!h.tcp("prod/web", "192.168.1.2", 10250), "zone b: denied");
    assert!(
        !h.tcp("prod/web", "203.0.113.2", 10250),
        "every address counts"
    );
    assert!(!h.tcp("prod/web", "192.168.1.1", 22));
    assert!(h.tcp("prod/web", "192.168.1.3", 22), "no linux label");
    assert!(
        udp(&h, "prod/web", "192.168.1.2", 53),
        "passed, nothing isolates"
    );
    assert!(h.tcp("prod/web", "192.168.1.4", 22), "not a node");
    assert!(h.tcp("prod/web", "dev/web", 22), "pods are not nodes");
    assert!(h.tcp("dev/web", "192.168.1.2", 10250), "not a subject");
    // The drop names the rule.
    let state = &h.out.nodes["node-1"];
    let rs = state.endpoints[&PodKey::new("prod", "web")].egress;
    let (action, rule) = state.verdict(rs, "192.168.1.2".parse().unwrap(), TCP, 22);
    assert_eq!(action, Action::Deny);
    assert_eq!(
        state.rules[&rule].tiered.as_ref().map(|t| t.name.as_str()),
        Some("no-other-node")
    );

    // A node's labels move it in and out of the peer.
    h.cluster
        .upsert_node(&node("node-3", &[linux], &[("InternalIP", "192.168.1.3")]))
        .unwrap();
    h.cluster
        .upsert_node(&node(
            "node-2",
            &[linux, ("zone", "a")],
            &[("InternalIP", "192.168.1.2")],
        ))
        .unwrap();
    h.recompile();
    assert!(!h.tcp("prod/web", "192.168.1.3", 22));
    assert!(h.tcp("prod/web", "192.168.1.2", 10250));
    assert!(
        h.tcp("prod/web", "203.0.113.2", 10250),
        "no longer its address"
    );
    h.cluster.delete_node("node-3");
    h.recompile();
    assert!(
        h.tcp("prod/web", "192.168.1.3", 22),
        "a deleted node is no peer"
    );
}
