//! Invalid policies: diagnostics name the policy and the field; the policy fails closed
//! without disturbing other policies.

mod support;

use support::*;
use weir_compiler::{Cluster, PolicyDiagnostic, Problem, Severity, validate::validate};

fn diagnostics(yaml: &str) -> Vec<PolicyDiagnostic> {
    validate(&policy(yaml)).expect("named policy").diagnostics
}

fn fields(yaml: &str) -> Vec<String> {
    diagnostics(yaml)
        .into_iter()
        .filter(|d| d.severity == Severity::Error)
        .map(|d| d.field)
        .collect()
}

#[test]
fn bad_cidrs_and_excepts_are_reported_at_their_paths() {
    let f = fields(
        r#"
metadata: {name: p, namespace: n}
spec:
  podSelector: {}
  ingress:
  - from:
    - podSelector: {}
    - ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16, 10.1.0.0/33, 10.0.0.0/8, "fd00::/64"]}
    - ipBlock: {cidr: 300.0.0.0/8, except: [not-a-cidr]}
"#,
    );
    assert_eq!(
        f,
        [
            "spec.ingress[0].from[1].ipBlock.except[0]",
            "spec.ingress[0].from[1].ipBlock.except[1]",
            "spec.ingress[0].from[1].ipBlock.except[2]",
            "spec.ingress[0].from[1].ipBlock.except[3]",
            "spec.ingress[0].from[2].ipBlock.cidr",
        ]
    );
}

#[test]
fn cidr_with_host_bits_is_a_warning_and_is_masked() {
    let v = validate(&policy(
        r#"
metadata: {name: p, namespace: n}
spec:
  podSelector: {}
  egress: [{to: [{ipBlock: {cidr: 10.1.2.3/8}}]}]
"#,
    ))
    .unwrap();
    assert!(v.is_valid());
    assert_eq!(v.diagnostics.len(), 1);
    assert_eq!(v.diagnostics[0].severity, Severity::Warning);
    assert_eq!(v.diagnostics[0].field, "spec.egress[0].to[0].ipBlock.cidr");
    assert!(matches!(
        &v.diagnostics[0].problem,
        Problem::CidrHostBits { normalized, .. } if normalized.to_string() == "10.0.0.0/8"
    ));
}

#[test]
fn port_problems_are_reported_at_their_paths() {
    let d = diagnostics(
        r#"
metadata: {name: p, namespace: n}
spec:
  podSelector: {}
  egress:
  - ports:
    - {port: 2000, endPort: 1000}
    - {port: http, endPort: 90}
    - {endPort: 90}
    - {port: 0}
    - {port: 70000}
    - {protocol: ICMP, port: 1}
    - {protocol: tcp}
    - {port: HTTP}
    - {port: 80, endPort: 65536}
"#,
    );
    let got: Vec<(&str, &Problem)> = d.iter().map(|d| (d.field.as_str(), &d.problem)).collect();
    assert!(matches!(
        got[0],
        (
            "spec.egress[0].ports[0].endPort",
            Problem::EndPortBelowPort {
                port: 2000,
                end_port: 1000
            }
        )
    ));
    assert!(matches!(
        got[1],
        (
            "spec.egress[0].ports[1].endPort",
            Problem::EndPortWithNamedPort { .. }
        )
    ));
    assert!(matches!(
        got[2],
        (
            "spec.egress[0].ports[2].endPort",
            Problem::EndPortWithoutPort { end_port: 90 }
        )
    ));
    assert!(matches!(
        got[3],
        (
            "spec.egress[0].ports[3].port",
            Problem::InvalidPortNumber { value: 0, .. }
        )
    ));
    assert!(matches!(
        got[4],
        (
            "spec.egress[0].ports[4].port",
            Problem::InvalidPortNumber { value: 70000, .. }
        )
    ));
    assert!(matches!(
        got[5],
        (
            "spec.egress[0].ports[5].protocol",
            Problem::UnsupportedProtocol { .. }
        )
    ));
    assert!(matches!(
        got[6],
        (
            "spec.egress[0].ports[6].protocol",
            Problem::UnsupportedProtocol { .. }
        )
    ));
    assert!(matches!(
        got[7],
        (
            "spec.egress[0].ports[7].port",
            Problem::InvalidPortName { .. }
        )
    ));
    assert!(matches!(
        got[8],
        (
            "spec.egress[0].ports[8].endPort",
            Problem::InvalidPortNumber { value: 65536, .. }
        )
    ));
    assert_eq!(got.len(), 9, "{got:#?}");
}

#[test]
fn end_port_equal_to_port_is_valid() {
    assert!(
        fields(
            r#"
metadata: {name: p, namespace: n}
spec:
  podSelector: {}
  egress: [{ports: [{port: 80, endPort: 80}, {protocol: SCTP, port: 1, endPort: 65535}]}]
"#
        )
        .is_empty()
    );
}

#[test]
fn selector_problems_are_reported_at_their_paths() {
    let f = fields(
        r#"
metadata: {name: p, namespace: n}
spec:
  podSelector:
    matchLabels: {"bad key!": x, ok: "-bad-value"}
    matchExpressions:
    - {key: a, operator: Equals, values: [x]}
    - {key: a, operator: Exists, values: [x]}
    - {key: a, operator: In}
    - {key: a, operator: NotIn, values: []}
    - {key: "Example.com/a", operator: DoesNotExist}
    - {key: a, operator: In, values: ["not valid"]}
"#,
    );
    assert_eq!(
        f,
        [
            "spec.podSelector.matchLabels",
            "spec.podSelector.matchLabels[ok]",
            "spec.podSelector.matchExpressions[0].operator",
            "spec.podSelector.matchExpressions[1].values",
            "spec.podSelector.matchExpressions[2].values",
            "spec.podSelector.matchExpressions[3].values",
            "spec.podSelector.matchExpressions[4].key",
            "spec.podSelector.matchExpressions[5].values[0]",
        ]
    );
}

#[test]
fn peer_shape_and_policy_types_problems_are_reported() {
    let f = fields(
        r#"
metadata: {name: p, namespace: n}
spec:
  podSelector: {}
  policyTypes: [Ingress, Sideways]
  ingress:
  - from:
    - {}
    - {podSelector: {}, ipBlock: {cidr: 10.0.0.0/8}}
    - {namespaceSelector: {matchExpressions: [{key: k, operator: Exists, values: [v]}]}}
"#,
    );
    assert_eq!(
        f,
        [
            "spec.ingress[0].from[0]",
            "spec.ingress[0].from[1]",
            "spec.ingress[0].from[2].namespaceSelector.matchExpressions[0].values",
            "spec.policyTypes[1]",
        ]
    );
    let f = fields(
        r#"
metadata: {name: p, namespace: n}
spec: {podSelector: {}, policyTypes: [Ingress, Egress, Ingress]}
"#,
    );
    assert_eq!(f, ["spec.policyTypes"]);
}

#[test]
fn diagnostics_name_the_policy() {
    let d = diagnostics(
        r#"
metadata: {name: broken, namespace: team-a}
spec: {podSelector: {}, ingress: [{ports: [{port: 0}]}]}
"#,
    );
    assert_eq!(
        d[0].to_string(),
        "NetworkPolicy/team-a/broken: spec.ingress[0].ports[0].port: invalid port 0: must be between 1 and 65535, inclusive"
    );
}

fn fail_closed_cluster(policies: &[&str]) -> Harness {
    let namespaces = vec![namespace("a", &[]), namespace("b", &[])];
    let pods = vec![
        pod("a/web").labels(&[("app", "web")]).ip("10.0.0.1"),
        pod("a/db")
            .labels(&[("app", "db")])
            .ip("10.0.0.2")
            .node("node-2"),
        pod("b/client").labels(&[("app", "client")]).ip("10.0.1.1"),
    ];
    let policies: Vec<_> = policies.iter().map(|p| policy(p)).collect();
    Harness::new(cluster(&namespaces, &pods, &policies))
}

#[test]
fn invalid_policy_isolates_its_pods_and_allows_nothing() {
    let h = fail_closed_cluster(&[r#"
metadata: {name: bad-port, namespace: a}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{namespaceSelector: {}}], ports: [{port: 5432, endPort: 1}]}]
"#]);
    assert!(!h.tcp("a/web", "a/db", 5432));
    assert!(!h.tcp("b/client", "a/db", 1));
    assert!(h.tcp("b/client", "a/web", 5432), "a/web is not selected");
    assert!(
        h.tcp("a/db", "b/client", 1),
        "the policy declares only ingress"
    );
    assert_eq!(h.out.diagnostics.len(), 1);
    assert_eq!(
        h.out.diagnostics[0].field,
        "spec.ingress[0].ports[0].endPort"
    );
}

#[test]
fn invalid_policy_does_not_disturb_valid_ones() {
    let h = fail_closed_cluster(&[
        r#"
metadata: {name: bad, namespace: a}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress, Egress]
  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/8]}}]}]
"#,
        r#"
metadata: {name: good, namespace: a}
spec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {}}], ports: [{port: 80}]}]
"#,
    ]);
    assert!(h.tcp("b/client", "a/db", 80), "allowed by the valid policy");
    assert!(!h.tcp("b/client", "a/db", 81));
    assert!(h.tcp("b/client", "a/web", 80));
    assert!(
        !h.tcp("a/db", "b/client", 80),
        "the invalid policy isolates egress too"
    );
    assert!(h.tcp("a/web", "b/client", 80));
}

#[test]
fn invalid_pod_selector_isolates_every_pod_in_the_namespace() {
    let h = fail_closed_cluster(&[r#"
metadata: {name: bad-selector, namespace: a}
spec:
  podSelector: {matchExpressions: [{key: app, operator: Equals, values: [db]}]}
  ingress: [{}]
"#]);
    assert!(!h.tcp("b/client", "a/web", 80));
    assert!(!h.tcp("b/client", "a/db", 80));
    assert!(h.tcp("a/web", "b/client", 80), "only ingress is declared");
}

#[test]
fn unreadable_policy_types_isolate_ingress() {
    let h = fail_closed_cluster(&[r#"
metadata: {name: bad-types, namespace: a}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Sideways]
"#]);
    assert!(!h.tcp("b/client", "a/web", 80));
    assert!(h.tcp("a/web", "b/client", 80));
}

#[test]
fn fixing_an_invalid_policy_restores_its_rules() {
    let mut h = fail_closed_cluster(&[r#"
metadata: {name: p, namespace: a}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{ports: [{port: 0}]}]
"#]);
    assert!(!h.tcp("a/web", "a/db", 80));
    h.cluster
        .upsert_policy(&policy(
            r#"
metadata: {name: p, namespace: a}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{ports: [{port: 80}]}]
"#,
        ))
        .unwrap();
    h.recompile();
    assert!(h.tcp("a/web", "a/db", 80));
    assert!(h.out.diagnostics.is_empty());
}

#[test]
fn objects_without_names_are_refused() {
    let mut c = Cluster::new();
    let np = policy("metadata: {namespace: a}\nspec: {}");
    assert!(c.upsert_policy(&np).is_err());
    let np = policy("metadata: {name: x}\nspec: {}");
    assert!(c.upsert_policy(&np).is_err());
    assert_eq!(c.policies().count(), 0);
}
