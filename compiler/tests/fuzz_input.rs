//! The controller against malformed input the API server could hand it (fields of the right
//! type with any value: bad CIDRs, ports out of range, unknown protocols and operators,
//! addresses that are not addresses, conflicting ports), mixed into a cluster whose other
//! objects are sound. Nothing panics, and the sound part compiles exactly as it does alone:
//! the same verdicts (checked against the reference oracle) and the same Service table.
//!
//! Failing inputs are kept by proptest under `tests/fuzz_input.proptest-regressions` and
//! replayed first on every run; `PROPTEST_CASES` raises the number of cases.

mod support;

use k8s_openapi::api::{
    core::v1::Service, discovery::v1::EndpointSlice, networking::v1::NetworkPolicy,
};
use proptest::{
    prelude::*,
    test_runner::{Config, FileFailurePersistence, TestRunner},
};
use serde_json::{Value, json};
use support::*;
use weir_api::{FrontendKind, ServiceEntry, ServiceFrontend};
use weir_compiler::Cluster;

const TCP: u8 = 6;

fn node(name: &str) -> k8s_openapi::api::core::v1::Node {
    serde_json::from_value(json!({"metadata": {"name": name}})).unwrap()
}

/// Two namespaces; `prod/web` admits only `prod/client` on TCP 8080 and backs the Service
/// `prod/web` (10.96.0.10:80).
fn sound_cluster() -> Cluster {
    let mut c = cluster(
        &[namespace("prod", &[]), namespace("other", &[])],
        &[
            pod("prod/web")
                .labels(&[("app", "web")])
                .node("node-1")
                .ip("10.244.0.2")
                .port("http", 8080, "TCP"),
            pod("prod/client")
                .labels(&[("app", "client")])
                .node("node-2")
                .ip("10.244.1.3"),
            pod("other/c")
                .labels(&[("app", "client")])
                .node("node-1")
                .ip("10.244.0.4"),
        ],
        &[policy(
            r#"
metadata: {name: web, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{protocol: TCP, port: http}]
"#,
        )],
    );
    for n in ["node-1", "node-2"] {
        c.upsert_node(&node(n)).unwrap();
    }
    let web: Service = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "prod"},
        "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    c.upsert_service(&web).unwrap();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "web-1", "namespace": "prod",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.0.2"], "nodeName": "node-1",
                       "conditions": {"ready": true}}],
    }))
    .unwrap();
    c.upsert_endpoint_slice(&slice).unwrap();
    c
}

/// What must not change: verdicts of flows between the sound pods, and the Service table
/// entry of `prod/web` (ids aside) on each node.
fn sound_outcome(c: Cluster) -> (Vec<bool>, Vec<Option<(ServiceEntry, usize)>>) {
    let h = Harness::new(c);
    let verdicts = vec![
        h.tcp("prod/client", "prod/web", 8080),
        h.tcp("prod/client", "prod/web", 80),
        h.tcp("other/c", "prod/web", 8080),
        h.tcp("prod/web", "prod/client", 80),
        h.tcp("10.0.0.1", "prod/web", 8080),
    ];
    let frontend = ServiceFrontend {
        kind: FrontendKind::ClusterIp,
        ip: "10.96.0.10".parse().unwrap(),
        port: 80,
        proto: TCP,
    };
    let services = ["node-1", "node-2"]
        .iter()
        .map(|n| {
            let state = h.out.nodes.get(*n)?;
            let mut entry = state.services.get(&frontend)?.clone();
            entry.id = 0;
            Some((entry, state.endpoints.len()))
        })
        .collect();
    (verdicts, services)
}

fn pick<T: Clone + std::fmt::Debug + 'static>(values: &[T]) -> impl Strategy<Value = T> + use<T> {
    proptest::sample::select(values.to_vec())
}

fn any_text() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => pick(&[
            "", "TCP", "UDP", "SCTP", "ICMP", "tcp", "http", "a b", "-1", "10.0.0.0/8",
            "10.0.0.0/33", "300.1.1.1/8", "fd00::/64", "10.96.0.11", "None", "::", "0.0.0.0",
            "app", "In", "NotIn", "Exists", "DoesNotExist", "Gt", "kubernetes.io/metadata.name",
            "Ingress", "Egress", "Both", "IPv4", "IPv6", "FQDN", "Local", "Cluster", "ClientIP",
        ])
        .prop_map(|s| Value::String(s.into())),
        1 => ".{0,10}".prop_map(Value::String),
    ]
}

fn port_number() -> impl Strategy<Value = Value> {
    pick(&[
        0i64,
        1,
        53,
        80,
        8080,
        30080,
        32767,
        65535,
        65536,
        -1,
        100000,
        i32::MAX as i64,
    ])
    .prop_map(Value::from)
}

/// A port number or name (an `IntOrString`).
fn any_port() -> impl Strategy<Value = Value> {
    prop_oneof![port_number(), any_text()]
}

fn selector() -> impl Strategy<Value = Value> {
    (
        proptest::option::of(proptest::collection::btree_map(
            prop_oneof!["app|tier|kubernetes.io/metadata.name", ".{0,8}"],
            prop_oneof!["web|client|prod|other", ".{0,8}"],
            0..3,
        )),
        proptest::option::of(proptest::collection::vec(
            (
                any_text(),
                any_text(),
                proptest::option::of(proptest::collection::vec(any_text(), 0..3)),
            ),
            0..3,
        )),
    )
        .prop_map(|(labels, exprs)| {
            let mut s = serde_json::Map::new();
            if let Some(l) = labels {
                s.insert("matchLabels".into(), json!(l));
            }
            if let Some(e) = exprs {
                let e: Vec<Value> = e
                    .into_iter()
                    .map(|(key, op, values)| {
                        let mut m = json!({"key": key, "operator": op});
                        if let Some(v) = values {
                            m["values"] = json!(v);
                        }
                        m
                    })
                    .collect();
                s.insert("matchExpressions".into(), json!(e));
            }
            Value::Object(s)
        })
}

fn peer() -> impl Strategy<Value = Value> {
    prop_oneof![
        (any_text(), proptest::collection::vec(any_text(), 0..3))
            .prop_map(|(cidr, except)| json!({"ipBlock": {"cidr": cidr, "except": except}})),
        (
            proptest::option::of(selector()),
            proptest::option::of(selector())
        )
            .prop_map(|(pods, namespaces)| {
                let mut p = serde_json::Map::new();
                if let Some(s) = pods {
                    p.insert("podSelector".into(), s);
                }
                if let Some(s) = namespaces {
                    p.insert("namespaceSelector".into(), s);
                }
                Value::Object(p)
            }),
    ]
}

fn policy_port() -> impl Strategy<Value = Value> {
    (
        proptest::option::of(any_text()),
        proptest::option::of(any_port()),
        proptest::option::of(any_port()),
    )
        .prop_map(|(protocol, port, end)| {
            let mut p = serde_json::Map::new();
            if let Some(v) = protocol {
                p.insert("protocol".into(), v);
            }
            if let Some(v) = port {
                p.insert("port".into(), v);
            }
            if let Some(Value::Number(n)) = end {
                p.insert("endPort".into(), Value::Number(n));
            }
            Value::Object(p)
        })
}

fn rule(peers: &'static str) -> impl Strategy<Value = Value> {
    (
        proptest::collection::vec(peer(), 0..3),
        proptest::collection::vec(policy_port(), 0..3),
    )
        .prop_map(move |(p, ports)| json!({peers: p, "ports": ports}))
}

/// A policy in namespace `other` (it may select nothing of `prod`'s but name `prod`'s pods
/// as peers).
fn bad_policy(i: usize) -> impl Strategy<Value = Value> {
    (
        selector(),
        proptest::collection::vec(rule("from"), 0..3),
        proptest::collection::vec(rule("to"), 0..3),
        proptest::collection::vec(any_text(), 0..3),
    )
        .prop_map(move |(pods, ingress, egress, types)| {
            json!({
                "metadata": {"name": format!("bad-{i}"), "namespace": "other"},
                "spec": {"podSelector": pods, "ingress": ingress, "egress": egress,
                         "policyTypes": types},
            })
        })
}

/// A Service in namespace `other`; its ClusterIP and NodePorts may be anything but the
/// sound Service's (the API server keeps those unique).
fn bad_service(i: usize) -> impl Strategy<Value = Value> {
    let port = (
        proptest::option::of(any_text()),
        port_number(),
        proptest::option::of(any_port()),
        proptest::option::of(port_number()),
        proptest::option::of(any_text()),
    )
        .prop_map(|(name, port, target, node_port, protocol)| {
            let mut p = serde_json::Map::new();
            p.insert("port".into(), port);
            for (k, v) in [
                ("name", name),
                ("targetPort", target),
                ("protocol", protocol),
            ] {
                if let Some(v) = v {
                    p.insert(k.into(), v);
                }
            }
            if let Some(n) = node_port {
                p.insert("nodePort".into(), n);
            }
            Value::Object(p)
        });
    (
        any_text(),
        any_text(),
        proptest::collection::vec(any_text(), 0..3),
        proptest::collection::vec(port, 0..4),
        any_text(),
        any_text(),
        proptest::option::of(pick(&[-1i64, 0, 1, 10800, 86401, i32::MAX as i64])),
        proptest::option::of(selector()),
    )
        .prop_map(
            move |(ty, cluster_ip, families, ports, etp, affinity, timeout, sel)| {
                let cluster_ip = match cluster_ip.as_str() {
                    Some("10.96.0.10") => json!("10.96.0.11"),
                    _ => cluster_ip,
                };
                let mut spec = json!({
                    "type": ty, "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                    "ipFamilies": families, "ports": ports,
                    "externalTrafficPolicy": etp, "sessionAffinity": affinity,
                });
                if let Some(t) = timeout {
                    spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": t}});
                }
                if let Some(Value::Object(s)) = sel.map(|s| s["matchLabels"].clone()) {
                    spec["selector"] = Value::Object(s);
                }
                json!({
                    "metadata": {"name": format!("svc-{i}"), "namespace": "other"},
                    "spec": spec,
                })
            },
        )
}

/// An EndpointSlice in namespace `other` for one of the bad Services (or for `web` in the
/// wrong namespace).
fn bad_slice(i: usize) -> impl Strategy<Value = Value> {
    let endpoint = (
        proptest::collection::vec(any_text(), 0..3),
        any_text(),
        proptest::option::of(any::<bool>()),
        proptest::option::of(any::<bool>()),
        proptest::option::of(any::<bool>()),
    )
        .prop_map(|(addresses, node, ready, serving, terminating)| {
            json!({"addresses": addresses, "nodeName": node,
                   "conditions": {"ready": ready, "serving": serving,
                                  "terminating": terminating}})
        });
    let port = (
        proptest::option::of(any_text()),
        proptest::option::of(port_number()),
        proptest::option::of(any_text()),
    )
        .prop_map(|(name, port, protocol)| {
            let mut p = serde_json::Map::new();
            for (k, v) in [("name", name), ("protocol", protocol)] {
                if let Some(v) = v {
                    p.insert(k.into(), v);
                }
            }
            if let Some(n) = port {
                p.insert("port".into(), n);
            }
            Value::Object(p)
        });
    (
        pick(&["svc-0", "svc-1", "svc-2", "web", ""]),
        any_text(),
        proptest::collection::vec(endpoint, 0..4),
        proptest::collection::vec(port, 0..3),
    )
        .prop_map(move |(svc, family, endpoints, ports)| {
            json!({
                "metadata": {"name": format!("slice-{i}"), "namespace": "other",
                             "labels": {"kubernetes.io/service-name": svc}},
                "addressType": family, "endpoints": endpoints, "ports": ports,
            })
        })
}

fn bad_objects() -> impl Strategy<Value = (Vec<Value>, Vec<Value>, Vec<Value>)> {
    (
        (0usize..3).prop_flat_map(|n| (0..n).map(bad_policy).collect::<Vec<_>>()),
        (0usize..3).prop_flat_map(|n| (0..n).map(bad_service).collect::<Vec<_>>()),
        (0usize..3).prop_flat_map(|n| (0..n).map(bad_slice).collect::<Vec<_>>()),
    )
}

#[test]
fn malformed_objects_never_panic_and_leave_the_rest_of_the_cluster_as_it_was() {
    let baseline = sound_outcome(sound_cluster());
    assert_eq!(
        baseline.0,
        [true, false, false, true, false],
        "the sound cluster's verdicts"
    );
    assert!(
        baseline.1.iter().all(Option::is_some),
        "web's ClusterIP on both nodes"
    );
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(1024);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        source_file: Some(file!()),
        ..Config::default()
    });
    runner
        .run(&bad_objects(), |(policies, services, slices)| {
            let mut c = sound_cluster();
            // Objects that do not even decode are what the API server would refuse: skipped.
            for p in policies {
                if let Ok(p) = serde_json::from_value::<NetworkPolicy>(p) {
                    let _ = c.upsert_policy(&p);
                }
            }
            for s in services {
                if let Ok(s) = serde_json::from_value::<Service>(s) {
                    let _ = c.upsert_service(&s);
                }
            }
            for s in slices {
                if let Ok(s) = serde_json::from_value::<EndpointSlice>(s) {
                    let _ = c.upsert_endpoint_slice(&s);
                }
            }
            prop_assert_eq!(sound_outcome(c), baseline.clone());
            Ok(())
        })
        .unwrap();
}
