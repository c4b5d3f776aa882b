//! One test per NetworkPolicy semantic point: each compiles a small cluster and checks
//! connections through the emulated dataplane, which the harness also checks against the
//! reference oracle.

mod support;

use support::*;
use weir_api::{NOT_ISOLATED, PodKey};

/// prod {team: a, env: prod}, dev {team: b, env: dev}, ops {team: ops}; pods spread over
/// two nodes.
fn fixture_pods() -> Vec<PodBuilder> {
    vec![
        pod("prod/web")
            .labels(&[("app", "web")])
            .ip("10.0.0.1")
            .node("node-1")
            .port("http", 8080, "TCP"),
        pod("prod/db")
            .labels(&[("app", "db")])
            .ip("10.0.0.2")
            .node("node-2")
            .port("pg", 5432, "TCP"),
        pod("prod/cache")
            .labels(&[("app", "cache"), ("tier", "back")])
            .ip("10.0.0.3")
            .node("node-1"),
        pod("dev/web")
            .labels(&[("app", "web")])
            .ip("10.0.1.1")
            .node("node-2")
            .port("http", 9090, "TCP"),
        pod("ops/mon")
            .labels(&[("app", "mon")])
            .ip("10.0.2.1")
            .node("node-1"),
    ]
}

fn fixture_namespaces() -> Vec<k8s_openapi::api::core::v1::Namespace> {
    vec![
        namespace("prod", &[("team", "a"), ("env", "prod")]),
        namespace("dev", &[("team", "b"), ("env", "dev")]),
        namespace("ops", &[("team", "ops")]),
    ]
}

fn harness(policies: &[&str]) -> Harness {
    let policies: Vec<_> = policies.iter().map(|p| policy(p)).collect();
    Harness::new(cluster(&fixture_namespaces(), &fixture_pods(), &policies))
}

const ALL_PODS: [&str; 5] = ["prod/web", "prod/db", "prod/cache", "dev/web", "ops/mon"];

#[test]
fn without_policies_everything_is_allowed_and_nothing_is_isolated() {
    let h = harness(&[]);
    for a in ALL_PODS {
        for b in ALL_PODS {
            assert!(h.tcp(a, b, 80));
        }
    }
    for state in h.out.nodes.values() {
        assert!(state.verdicts.is_empty());
        assert!(state.peer_classes.is_empty());
        assert!(
            state
                .endpoints
                .values()
                .all(|e| e.ingress == NOT_ISOLATED && e.egress == NOT_ISOLATED)
        );
    }
}

#[test]
fn empty_pod_selector_isolates_every_pod_of_its_namespace_only() {
    let h = harness(&[r#"
metadata: {name: deny, namespace: prod}
spec: {podSelector: {}, policyTypes: [Ingress]}
"#]);
    assert!(!h.tcp("dev/web", "prod/web", 80));
    assert!(!h.tcp("prod/db", "prod/web", 80));
    assert!(!h.tcp("203.0.113.9", "prod/cache", 80));
    assert!(h.tcp("prod/web", "dev/web", 80), "egress is not isolated");
    assert!(
        h.tcp("ops/mon", "dev/web", 80),
        "other namespaces are not isolated"
    );
}

#[test]
fn peer_with_only_a_pod_selector_means_the_policy_namespace() {
    let h = harness(&[r#"
metadata: {name: from-web, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]
"#]);
    assert!(h.tcp("prod/web", "prod/db", 5432));
    assert!(
        !h.tcp("dev/web", "prod/db", 5432),
        "same labels, other namespace"
    );
    assert!(!h.tcp("prod/cache", "prod/db", 5432));
    assert!(
        h.tcp("dev/web", "prod/cache", 80),
        "prod/cache is not selected"
    );
}

#[test]
fn empty_namespace_selector_means_every_pod_of_every_namespace_but_no_external_address() {
    let h = harness(&[r#"
metadata: {name: from-pods, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{namespaceSelector: {}}]}]
"#]);
    for src in ALL_PODS {
        assert!(h.tcp(src, "prod/db", 5432), "{src}");
    }
    assert!(!h.tcp("203.0.113.9", "prod/db", 5432));
    assert!(
        !h.tcp("10.0.0.77", "prod/db", 5432),
        "an unused pod-range address is no pod"
    );
}

#[test]
fn namespace_and_pod_selectors_in_one_peer_are_anded_in_two_peers_ored() {
    let and = harness(&[r#"
metadata: {name: and, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: b}}
      podSelector: {matchLabels: {app: web}}
"#]);
    assert!(and.tcp("dev/web", "prod/db", 1));
    assert!(!and.tcp("prod/web", "prod/db", 1));
    assert!(!and.tcp("ops/mon", "prod/db", 1));

    let or = harness(&[r#"
metadata: {name: or, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: ops}}
    - podSelector: {matchLabels: {app: web}}
"#]);
    assert!(or.tcp("ops/mon", "prod/db", 1));
    assert!(or.tcp("prod/web", "prod/db", 1));
    assert!(
        !or.tcp("dev/web", "prod/db", 1),
        "pod selector alone is own namespace"
    );
    assert!(!or.tcp("prod/cache", "prod/db", 1));
}

#[test]
fn match_expression_operators_follow_label_selector_semantics() {
    let case = |expr: &str| {
        harness(&[&format!(
            r#"
metadata: {{name: expr, namespace: prod}}
spec:
  podSelector: {{matchLabels: {{app: db}}}}
  ingress: [{{from: [{{namespaceSelector: {{}}, podSelector: {{matchExpressions: [{expr}]}}}}]}}]
"#
        )])
    };
    let allowed_from = |h: &Harness| -> Vec<&str> {
        ALL_PODS
            .into_iter()
            .filter(|s| *s != "prod/db" && h.tcp(s, "prod/db", 1))
            .collect()
    };
    let h = case("{key: app, operator: In, values: [web, mon]}");
    assert_eq!(allowed_from(&h), ["prod/web", "dev/web", "ops/mon"]);
    let h = case("{key: tier, operator: NotIn, values: [back]}");
    assert_eq!(
        allowed_from(&h),
        ["prod/web", "dev/web", "ops/mon"],
        "pods without the key match NotIn"
    );
    let h = case("{key: tier, operator: Exists}");
    assert_eq!(allowed_from(&h), ["prod/cache"]);
    let h = case("{key: tier, operator: DoesNotExist}");
    assert_eq!(allowed_from(&h), ["prod/web", "dev/web", "ops/mon"]);
}

#[test]
fn ip_block_with_except_applies_to_pod_addresses_too() {
    let h = harness(&[r#"
metadata: {name: to-block, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.0.0.2/32]}}]}]
"#]);
    assert!(h.tcp("prod/web", "prod/cache", 80), "pod inside the block");
    assert!(!h.tcp("prod/web", "prod/db", 80), "pod in the except");
    assert!(
        h.tcp("prod/web", "10.0.0.200", 80),
        "non-pod address inside the block"
    );
    assert!(!h.tcp("prod/web", "dev/web", 80), "pod outside the block");
    assert!(!h.tcp("prod/web", "8.8.8.8", 80));
    assert!(h.tcp("dev/web", "prod/db", 80), "dev/web is not selected");
}

#[test]
fn ip_block_ingress_admits_external_sources() {
    let h = harness(&[r#"
metadata: {name: from-lb, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{ipBlock: {cidr: 192.168.0.0/16}}], ports: [{port: 443}]}]
"#]);
    assert!(h.tcp("192.168.7.7", "prod/web", 443));
    assert!(!h.tcp("192.168.7.7", "prod/web", 80));
    assert!(!h.tcp("172.16.0.1", "prod/web", 443));
    assert!(!h.tcp("prod/db", "prod/web", 443));
}

#[test]
fn ipv6_blocks_do_not_capture_ipv4_addresses() {
    let pods = vec![
        pod("prod/web")
            .labels(&[("app", "web")])
            .ip("10.0.0.1")
            .ip("fd00::1")
            .node("node-1"),
        pod("prod/db")
            .labels(&[("app", "db")])
            .ip("10.0.0.2")
            .ip("fd00::2")
            .node("node-2"),
    ];
    let p = policy(
        r#"
metadata: {name: v6-only, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress: [{to: [{ipBlock: {cidr: "::/0", except: ["fd00::2/128"]}}]}]
"#,
    );
    let h = Harness::new(cluster(&fixture_namespaces(), &pods, &[p]));
    let web = |ip: &str| {
        weir_compiler::oracle::Endpoint::PodAt(PodKey::new("prod", "web"), ip.parse().unwrap())
    };
    let db = |ip: &str| {
        weir_compiler::oracle::Endpoint::PodAt(PodKey::new("prod", "db"), ip.parse().unwrap())
    };
    assert!(h.allows(&web("fd00::1"), &ip_ep("2001:db8::1"), TCP, 80));
    assert!(!h.allows(&web("fd00::1"), &db("fd00::2"), TCP, 80));
    assert!(!h.allows(&web("10.0.0.1"), &db("10.0.0.2"), TCP, 80));
    assert!(!h.allows(&web("10.0.0.1"), &ip_ep("8.8.8.8"), TCP, 80));
    let state = &h.out.nodes["node-1"];
    assert_eq!(
        state.peer_classes.get(&weir_api::ipv4_root()),
        Some(0),
        "{state:#?}"
    );
}

#[test]
fn policy_types_are_inferred_from_the_rules_when_absent() {
    // Egress rules and no policyTypes: isolates for ingress and egress.
    let h = harness(&[r#"
metadata: {name: egress-only-rules, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  egress: [{to: [{podSelector: {matchLabels: {app: db}}}]}]
"#]);
    assert!(h.tcp("prod/web", "prod/db", 1));
    assert!(!h.tcp("prod/web", "prod/cache", 1));
    assert!(
        !h.tcp("prod/cache", "prod/web", 1),
        "ingress isolated by default"
    );
}

#[test]
fn explicit_policy_types_ignore_rules_of_other_directions() {
    let h = harness(&[r#"
metadata: {name: egress-type, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  ingress: [{from: [{podSelector: {matchLabels: {app: db}}}]}]
  egress: [{to: [{podSelector: {matchLabels: {app: db}}}]}]
"#]);
    assert!(
        h.tcp("prod/cache", "prod/web", 1),
        "ingress is not isolated"
    );
    assert!(!h.tcp("prod/web", "prod/cache", 1));
    assert!(h.tcp("prod/web", "prod/db", 1));
}

#[test]
fn policies_selecting_one_pod_are_a_union() {
    let h = harness(&[
        r#"
metadata: {name: from-web, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 5432}]}]
"#,
        r#"
metadata: {name: from-ops, namespace: prod}
spec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: ops}}}]}]
"#,
    ]);
    assert!(h.tcp("prod/web", "prod/db", 5432));
    assert!(!h.tcp("prod/web", "prod/db", 5433));
    assert!(h.tcp("ops/mon", "prod/db", 9999));
    assert!(h.tcp("ops/mon", "prod/web", 9999));
    assert!(!h.tcp("prod/db", "prod/web", 5432));
}

#[test]
fn rules_without_ports_allow_every_protocol_including_icmp() {
    let h = harness(&[r#"
metadata: {name: all-ports, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {}}]}, {from: [{namespaceSelector: {}}], ports: []}]
"#]);
    for proto in [TCP, UDP, SCTP, ICMP, 47] {
        assert!(
            h.allows(&pod_ep("prod/web"), &pod_ep("prod/db"), proto, 7),
            "{proto}"
        );
        assert!(
            h.allows(&pod_ep("dev/web"), &pod_ep("prod/db"), proto, 7),
            "{proto}"
        );
    }
}

#[test]
fn icmp_is_denied_by_rules_that_name_ports() {
    let h = harness(&[r#"
metadata: {name: tcp-only, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{ports: [{protocol: TCP}]}]
"#]);
    assert!(h.allows(&pod_ep("prod/web"), &pod_ep("prod/db"), TCP, 1));
    assert!(h.allows(&pod_ep("prod/web"), &pod_ep("prod/db"), TCP, 65535));
    assert!(!h.allows(&pod_ep("prod/web"), &pod_ep("prod/db"), UDP, 1));
    assert!(!h.allows(&pod_ep("prod/web"), &pod_ep("prod/db"), ICMP, 0));
}

#[test]
fn protocols_default_to_tcp_and_udp_sctp_are_distinct() {
    let h = harness(&[r#"
metadata: {name: protos, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - ports: [{port: 53}, {protocol: UDP, port: 5353}, {protocol: SCTP, port: 9}]
"#]);
    let allows = |proto, port| h.allows(&pod_ep("prod/web"), &pod_ep("prod/db"), proto, port);
    assert!(allows(TCP, 53));
    assert!(!allows(UDP, 53));
    assert!(allows(UDP, 5353));
    assert!(!allows(TCP, 5353));
    assert!(allows(SCTP, 9));
    assert!(!allows(UDP, 9));
}

#[test]
fn end_port_ranges_are_inclusive_and_overlapping_entries_merge() {
    let h = harness(&[r#"
metadata: {name: range, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - ports: [{port: 1000, endPort: 2000}, {port: 1500, endPort: 2500}, {port: 1000, endPort: 2000}, {port: 32768, endPort: 65535}]
"#]);
    let allows = |port| h.allows(&pod_ep("prod/web"), &pod_ep("prod/db"), TCP, port);
    for port in [1000, 1001, 1999, 2000, 2001, 2500, 32768, 65535] {
        assert!(allows(port), "{port}");
    }
    for port in [999, 2501, 32767, 80] {
        assert!(!allows(port), "{port}");
    }
    let state = &h.out.nodes["node-2"];
    // 1000..=2500 is 8 aligned blocks (1000/13, 1008/12, 1024/6, 2048/8, 2304/9, 2432/10,
    // 2496/14, 2500/16); 32768..=65535 is one.
    assert_eq!(state.verdicts.len(), 9, "{:#?}", state.verdicts);
}

#[test]
fn ingress_named_ports_resolve_per_destination_pod() {
    let pods = vec![
        pod("prod/a")
            .labels(&[("app", "api")])
            .ip("10.0.0.1")
            .port("http", 8080, "TCP"),
        pod("prod/b")
            .labels(&[("app", "api")])
            .ip("10.0.0.2")
            .port("http", 9090, "TCP"),
        pod("prod/c").labels(&[("app", "api")]).ip("10.0.0.3"),
        pod("prod/d")
            .labels(&[("app", "api")])
            .ip("10.0.0.4")
            .port("http", 8080, "TCP"),
        pod("prod/client").ip("10.0.0.9"),
    ];
    let p = policy(
        r#"
metadata: {name: http, namespace: prod}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress: [{ports: [{port: http}]}]
"#,
    );
    let h = Harness::new(cluster(&fixture_namespaces(), &pods, &[p]));
    assert!(h.tcp("prod/client", "prod/a", 8080));
    assert!(!h.tcp("prod/client", "prod/a", 9090));
    assert!(h.tcp("prod/client", "prod/b", 9090));
    assert!(!h.tcp("prod/client", "prod/b", 8080));
    assert!(
        !h.tcp("prod/client", "prod/c", 8080),
        "no such port name: nothing allowed"
    );
    assert!(!h.allows(&pod_ep("prod/client"), &pod_ep("prod/a"), UDP, 8080));
    let eps = &h.out.nodes["node-1"].endpoints;
    let rs = |n: &str| eps[&PodKey::new("prod", n)].ingress;
    assert_ne!(rs("a"), rs("b"));
    assert_ne!(rs("a"), rs("c"));
    assert_eq!(
        rs("a"),
        rs("d"),
        "same policies, same port meaning: one rule set"
    );
}

#[test]
fn egress_named_ports_resolve_against_the_destination_pod_and_never_match_other_addresses() {
    let pods = vec![
        pod("prod/client")
            .labels(&[("app", "client")])
            .ip("10.0.0.9")
            .node("node-1"),
        pod("prod/a")
            .ip("10.0.0.1")
            .node("node-2")
            .port("metrics", 9100, "TCP"),
        pod("prod/b")
            .ip("10.0.0.2")
            .node("node-2")
            .port("metrics", 9200, "TCP"),
        pod("dev/c")
            .ip("10.0.1.3")
            .node("node-2")
            .port("metrics", 9100, "UDP"),
    ];
    let p = policy(
        r#"
metadata: {name: scrape, namespace: prod}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress: [{ports: [{port: metrics}]}]
"#,
    );
    let h = Harness::new(cluster(&fixture_namespaces(), &pods, &[p]));
    assert!(h.tcp("prod/client", "prod/a", 9100));
    assert!(!h.tcp("prod/client", "prod/a", 9200));
    assert!(h.tcp("prod/client", "prod/b", 9200));
    assert!(!h.tcp("prod/client", "prod/b", 9100));
    assert!(
        !h.tcp("prod/client", "dev/c", 9100),
        "the name is UDP there"
    );
    assert!(!h.tcp("prod/client", "198.51.100.1", 9100), "not a pod");
    let state = &h.out.nodes["node-1"];
    let class = |ip: &str| state.classify(ip.parse().unwrap());
    assert_ne!(class("10.0.0.1"), class("10.0.0.2"));
    assert_eq!(class("198.51.100.1"), weir_api::CLASS_UNMATCHED);
}

#[test]
fn host_network_pods_are_neither_endpoints_nor_selector_peers() {
    let mut pods = fixture_pods();
    pods.push(
        pod("prod/agent")
            .labels(&[("app", "web")])
            .ip("192.168.0.10")
            .node("node-1")
            .host_network(),
    );
    let p = policy(
        r#"
metadata: {name: deny, namespace: prod}
spec:
  podSelector: {}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}, {from: [{ipBlock: {cidr: 192.168.0.0/24}}], ports: [{port: 10250}]}]
"#,
    );
    let h = Harness::new(cluster(&fixture_namespaces(), &pods, &[p]));
    assert!(
        h.out.nodes["node-1"]
            .endpoints
            .keys()
            .all(|k| k.name != "agent")
    );
    assert!(
        !h.tcp("192.168.0.10", "prod/db", 5432),
        "labels of a host-network pod do not count"
    );
    assert!(
        h.tcp("192.168.0.10", "prod/db", 10250),
        "its node address matches an ipBlock"
    );
    assert!(h.tcp("prod/web", "prod/db", 5432));
}

#[test]
fn terminal_pods_are_ignored_and_their_addresses_free_for_reuse() {
    let mut pods = fixture_pods();
    pods.push(
        pod("prod/old-web")
            .labels(&[("app", "web")])
            .ip("10.0.0.50")
            .phase("Succeeded"),
    );
    pods.push(
        pod("dev/new")
            .labels(&[("app", "other")])
            .ip("10.0.0.50")
            .node("node-2"),
    );
    pods.push(
        pod("prod/failed")
            .labels(&[("app", "db")])
            .ip("10.0.0.60")
            .phase("Failed"),
    );
    let p = policy(
        r#"
metadata: {name: from-web, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]
"#,
    );
    let h = Harness::new(cluster(&fixture_namespaces(), &pods, &[p]));
    assert!(h.tcp("prod/web", "prod/db", 1));
    assert!(
        !h.tcp("10.0.0.50", "prod/db", 1),
        "the address belongs to dev/new now"
    );
    assert!(
        h.out
            .nodes
            .values()
            .all(|s| !s.endpoints.contains_key(&PodKey::new("prod", "failed")))
    );
}

#[test]
fn pods_without_addresses_are_endpoints_with_their_policy_from_the_start() {
    let mut pods = fixture_pods();
    pods.push(pod("prod/starting").labels(&[("app", "db")]).node("node-2"));
    let p = policy(
        r#"
metadata: {name: deny, namespace: prod}
spec: {podSelector: {matchLabels: {app: db}}}
"#,
    );
    let h = Harness::new(cluster(&fixture_namespaces(), &pods, &[p]));
    let endpoints = &h.out.nodes["node-2"].endpoints;
    let starting = endpoints[&PodKey::new("prod", "starting")];
    assert_ne!(starting.ingress, NOT_ISOLATED);
    assert_eq!(starting, endpoints[&PodKey::new("prod", "db")]);
}

#[test]
fn endpoints_with_identical_policy_share_one_rule_set() {
    let pods: Vec<PodBuilder> = (1..=20)
        .map(|i| {
            pod(&format!("prod/web-{i}"))
                .labels(&[("app", "web")])
                .ip(&format!("10.0.0.{i}"))
        })
        .collect();
    let p = policy(
        r#"
metadata: {name: web, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 80}]}]
"#,
    );
    let h = Harness::new(cluster(&fixture_namespaces(), &pods, &[p]));
    let state = &h.out.nodes["node-1"];
    assert_eq!(state.rule_sets.len(), 1);
    assert_eq!(state.verdicts.len(), 1, "one class (web pods) x one port");
    assert!(h.tcp("prod/web-1", "prod/web-2", 80));
}

#[test]
fn node_state_only_holds_what_its_own_endpoints_need() {
    let h = harness(&[r#"
metadata: {name: from-ops, namespace: ops}
spec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: a}}}]}]
"#]);
    // ops/mon is on node-1 only.
    let n2 = &h.out.nodes["node-2"];
    assert!(n2.peer_classes.is_empty() && n2.verdicts.is_empty() && n2.rules.is_empty());
    let n1 = &h.out.nodes["node-1"];
    assert_eq!(
        n1.peer_classes.len(),
        3,
        "the three prod pods: {:#?}",
        n1.peer_classes
    );
    assert!(h.tcp("prod/db", "ops/mon", 1));
    assert!(!h.tcp("dev/web", "ops/mon", 1));
}

#[test]
fn verdicts_name_the_first_rule_that_allows_the_traffic() {
    let h = harness(&[
        r#"
metadata: {name: a-rules, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 80}]
  - ports: [{port: 80, endPort: 90}]
"#,
        r#"
metadata: {name: b-rules, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: ops}}}]}]
"#,
    ]);
    let state = &h.out.nodes["node-2"];
    let rs = state.endpoints[&PodKey::new("prod", "db")].ingress;
    let rule_of = |src: &str, proto: u8, port: u16| {
        let (action, rule) = state.verdict(rs, src.parse().unwrap(), proto, port);
        assert_eq!(action, weir_api::Action::Allow, "{src} {port}");
        let r = &state.rules[&rule];
        (r.policy.name.clone(), r.index)
    };
    assert_eq!(rule_of("10.0.0.1", TCP, 80), ("a-rules".into(), 0));
    assert_eq!(rule_of("10.0.0.1", TCP, 85), ("a-rules".into(), 1));
    assert_eq!(rule_of("10.0.1.1", TCP, 80), ("a-rules".into(), 1));
    assert_eq!(
        rule_of("10.0.2.1", TCP, 85),
        ("b-rules".into(), 0),
        "every protocol wins"
    );
    assert_eq!(rule_of("10.0.2.1", ICMP, 0), ("b-rules".into(), 0));
    let info = &state.rule_sets[&rs];
    let names: Vec<&str> = info.policies.iter().map(|p| &*p.name).collect();
    assert_eq!(names, ["a-rules", "b-rules"]);
    assert_eq!(info.direction, weir_api::Direction::Ingress);
}
