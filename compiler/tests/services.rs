//! The service table: Services and EndpointSlices (declared, or derived from pods as a
//! manifest directory does) compiled into each node's frontends and backends.

use std::net::IpAddr;

use k8s_openapi::api::{core::v1::Pod, core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::{Value, json};
use weir_api::{
    BackendState, FrontendKind, NodeState, ServiceBackend, ServiceEntry, ServiceFrontend,
};
use weir_compiler::{Cluster, Compiler, service::ObjectName};

const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;

fn service(name: &str, spec: Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "prod"},
        "spec": spec,
    }))
    .unwrap()
}

/// An endpoint: (address, node, ready, serving, terminating).
type Ep<'a> = (&'a str, &'a str, bool, bool, bool);

fn slice(name: &str, svc: &str, ports: Value, endpoints: &[Ep]) -> EndpointSlice {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, node, ready, serving, terminating)| {
            json!({"addresses": [ip], "nodeName": node,
                   "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
        })
        .collect();
    let family = if endpoints
        .first()
        .and_then(|e| e["addresses"][0].as_str())
        .is_some_and(|a| a.contains(':'))
    {
        "IPv6"
    } else {
        "IPv4"
    };
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "prod",
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": family,
        "ports": ports,
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn ready<'a>(ip: &'a str, node: &'a str) -> Ep<'a> {
    (ip, node, true, true, false)
}

fn terminating<'a>(ip: &'a str, node: &'a str) -> Ep<'a> {
    (ip, node, false, true, true)
}

fn node(name: &str) -> k8s_openapi::api::core::v1::Node {
    serde_json::from_value(json!({"metadata": {"name": name}})).unwrap()
}

fn cluster_with_nodes() -> Cluster {
    let mut c = Cluster::new();
    for n in ["node-1", "node-2"] {
        c.upsert_node(&node(n)).unwrap();
    }
    c
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn cluster_ip(addr: &str, port: u16, proto: u8) -> ServiceFrontend {
    ServiceFrontend {
        kind: FrontendKind::ClusterIp,
        ip: ip(addr),
        port,
        proto,
    }
}

fn node_port(v6: bool, port: u16, proto: u8) -> ServiceFrontend {
    ServiceFrontend {
        kind: FrontendKind::NodePort,
        ip: ip(if v6 { "::" } else { "0.0.0.0" }),
        port,
        proto,
    }
}

fn addrs(entry: &ServiceEntry) -> Vec<(String, u16)> {
    entry
        .backends
        .iter()
        .map(|b| (b.ip.to_string(), b.port))
        .collect()
}

fn compile(c: &Cluster) -> std::collections::BTreeMap<String, NodeState> {
    Compiler::new().compile_all(c).nodes
}

fn web_service(extra: Value) -> Service {
    let mut spec = json!({
        "clusterIP": "10.96.0.10",
        "selector": {"app": "web"},
        "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
    });
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    service("web", spec)
}

fn web_slice(endpoints: &[Ep]) -> EndpointSlice {
    slice(
        "web-abc",
        "web",
        json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
        endpoints,
    )
}

#[test]
fn cluster_ip_frontend_on_every_node_lists_ready_backends_sorted() {
    let mut c = cluster_with_nodes();
    c.upsert_service(&web_service(json!({}))).unwrap();
    c.upsert_endpoint_slice(&web_slice(&[
        ready("10.1.0.9", "node-2"),
        ready("10.1.0.5", "node-1"),
        (
            "10.1.0.7", "node-1", false, false, false, // not ready, not serving: no traffic
        ),
    ]))
    .unwrap();
    let nodes = compile(&c);
    for n in ["node-1", "node-2"] {
        let entry = &nodes[n].services[&cluster_ip("10.96.0.10", 80, TCP)];
        assert_eq!(
            addrs(entry),
            [("10.1.0.5".into(), 8080), ("10.1.0.9".into(), 8080)]
        );
        assert_eq!(entry.service.to_string(), "prod/web:http");
        assert_ne!(entry.id, 0);
        assert_eq!(entry.affinity_timeout_s, None);
        assert!(!entry.masquerade_external);
        assert_eq!(nodes[n].services.len(), 1, "no NodePort for type ClusterIP");
    }
}

#[test]
fn headless_and_unallocated_services_have_no_cluster_ip_frontend() {
    let mut c = cluster_with_nodes();
    c.upsert_service(&web_service(json!({"clusterIP": "None"})))
        .unwrap();
    c.upsert_service(&service(
        "pending",
        json!({"selector": {"app": "web"}, "ports": [{"port": 80}]}),
    ))
    .unwrap();
    c.upsert_endpoint_slice(&web_slice(&[ready("10.1.0.5", "node-1")]))
        .unwrap();
    assert!(compile(&c)["node-1"].services.is_empty());
}

#[test]
fn node_port_frontends_use_the_unspecified_address_and_masquerade_for_cluster_policy() {
    let mut c = cluster_with_nodes();
    c.upsert_service(&web_service(json!({
        "type": "NodePort",
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}],
    })))
    .unwrap();
    c.upsert_endpoint_slice(&web_slice(&[
        ready("10.1.0.5", "node-1"),
        ready("10.1.0.9", "node-2"),
    ]))
    .unwrap();
    let nodes = compile(&c);
    for n in ["node-1", "node-2"] {
        let np = &nodes[n].services[&node_port(false, 30080, TCP)];
        assert_eq!(np.backends.len(), 2);
        assert!(np.masquerade_external);
        let cip = &nodes[n].services[&cluster_ip("10.96.0.10", 80, TCP)];
        assert_eq!(np.id, cip.id, "one id per Service port");
    }
}

#[test]
fn load_balancer_services_open_their_node_ports() {
    let mut c = cluster_with_nodes();
    c.upsert_service(&web_service(json!({
        "type": "LoadBalancer",
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 31000}],
    })))
    .unwrap();
    assert!(
        compile(&c)["node-2"]
            .services
            .contains_key(&node_port(false, 31000, TCP))
    );
}

#[test]
fn external_traffic_policy_local_keeps_node_ports_to_local_backends_without_masquerade() {
    let mut c = cluster_with_nodes();
    c.upsert_service(&web_service(json!({
        "type": "NodePort",
        "externalTrafficPolicy": "Local",
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}],
    })))
    .unwrap();
    c.upsert_endpoint_slice(&web_slice(&[
        ready("10.1.0.5", "node-1"),
        ready("10.1.0.9", "node-2"),
    ]))
    .unwrap();
    c.upsert_node(&node("node-3")).unwrap();
    let nodes = compile(&c);
    let np = |n: &str| nodes[n].services[&node_port(false, 30080, TCP)].clone();
    assert_eq!(addrs(&np("node-1")), [("10.1.0.5".into(), 8080)]);
    assert_eq!(addrs(&np("node-2")), [("10.1.0.9".into(), 8080)]);
    assert!(
        np("node-3").backends.is_empty(),
        "no local backend: refused"
    );
    assert!(!np("node-1").masquerade_external);
    // The ClusterIP is not affected by the external policy.
    assert_eq!(
        nodes["node-3"].services[&cluster_ip("10.96.0.10", 80, TCP)]
            .backends
            .len(),
        2
    );
}

#[test]
fn internal_traffic_policy_local_keeps_the_cluster_ip_to_local_backends() {
    let mut c = cluster_with_nodes();
    c.upsert_service(&web_service(json!({
        "type": "NodePort",
        "internalTrafficPolicy": "Local",
        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}],
    })))
    .unwrap();
    c.upsert_endpoint_slice(&web_slice(&[
        ready("10.1.0.5", "node-1"),
        ready("10.1.0.9", "node-2"),
    ]))
    .unwrap();
    let nodes = compile(&c);
    let cip = &nodes["node-1"].services[&cluster_ip("10.96.0.10", 80, TCP)];
    assert_eq!(addrs(cip), [("10.1.0.5".into(), 8080)]);
    assert_eq!(
        nodes["node-1"].services[&node_port(false, 30080, TCP)]
            .backends
            .len(),
        2,
        "node ports follow the external policy"
    );
}

#[test]
fn terminating_backends_are_used_only_when_no_backend_is_ready() {
    let mut c = cluster_with_nodes();
    c.upsert_service(&web_service(json!({"internalTrafficPolicy": "Local"})))
        .unwrap();
    c.upsert_endpoint_slice(&web_slice(&[
        ready("10.1.0.5", "node-1"),
        terminating("10.1.0.6", "node-1"),
        terminating("10.1.0.9", "node-2"),
        // Terminating and no longer serving: never a backend.
        ("10.1.0.10", "node-2", false, false, true),
    ]))
    .unwrap();
    let nodes = compile(&c);
    let at = |n: &str| nodes[n].services[&cluster_ip("10.96.0.10", 80, TCP)].clone();
    assert_eq!(addrs(&at("node-1")), [("10.1.0.5".into(), 8080)]);
    // node-2's local list has no ready backend: the fallback applies per node.
    let fallback = at("node-2");
    assert_eq!(addrs(&fallback), [("10.1.0.9".into(), 8080)]);
    assert_eq!(fallback.backends[0].state, BackendState::Terminating);
}

#[test]
fn client_ip_affinity_defaults_to_three_hours_and_takes_the_configured_timeout() {
    let mut c = cluster_with_nodes();
    c.upsert_service(&web_service(json!({"sessionAffinity": "ClientIP"})))
        .unwrap();
    c.upsert_service(&service(
        "api",
        json!({"clusterIP": "10.96.0.11", "ports": [{"port": 443}],
               "sessionAffinity": "ClientIP",
               "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
    ))
    .unwrap();
    let nodes = compile(&c);
    let s = &nodes["node-1"].services;
    assert_eq!(
        s[&cluster_ip("10.96.0.10", 80, TCP)].affinity_timeout_s,
        Some(10_800)
    );
    assert_eq!(
        s[&cluster_ip("10.96.0.11", 443, TCP)].affinity_timeout_s,
        Some(60)
    );
}

#[test]
fn protocols_and_dual_stack_give_one_frontend_per_address_port_and_protocol() {
    let mut c = cluster_with_nodes();
    c.upsert_service(&service(
        "dns",
        json!({"clusterIP": "10.96.0.53", "clusterIPs": ["10.96.0.53", "fd00::53"],
               "type": "NodePort", "selector": {"app": "dns"},
               "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053},
                         {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                         {"name": "sig", "port": 2905, "protocol": "SCTP"}]}),
    ))
    .unwrap();
    c.upsert_endpoint_slice(&slice(
        "dns-v4",
        "dns",
        json!([{"name": "dns", "port": 5353, "protocol": "UDP"}]),
        &[ready("10.1.0.5", "node-1")],
    ))
    .unwrap();
    c.upsert_endpoint_slice(&slice(
        "dns-v6",
        "dns",
        json!([{"name": "dns", "port": 5353, "protocol": "UDP"}]),
        &[ready("fd00:1::5", "node-1")],
    ))
    .unwrap();
    let s = &compile(&c)["node-2"].services;
    assert_eq!(
        addrs(&s[&cluster_ip("10.96.0.53", 53, UDP)]),
        [("10.1.0.5".into(), 5353)]
    );
    assert_eq!(
        addrs(&s[&cluster_ip("fd00::53", 53, UDP)]),
        [("fd00:1::5".into(), 5353)],
        "each family its own backends"
    );
    assert!(s[&cluster_ip("10.96.0.53", 53, TCP)].backends.is_empty());
    assert!(s.contains_key(&cluster_ip("fd00::53", 2905, SCTP)));
    assert!(s.contains_key(&node_port(false, 30053, UDP)));
    assert_eq!(
        addrs(&s[&node_port(true, 30053, UDP)]),
        [("fd00:1::5".into(), 5353)]
    );
    assert_eq!(s.len(), 8);
}

#[test]
fn ids_stay_with_their_service_port_and_an_unchanged_cluster_diffs_empty() {
    let mut c = cluster_with_nodes();
    c.upsert_service(&web_service(json!({}))).unwrap();
    c.upsert_service(&service(
        "api",
        json!({"clusterIP": "10.96.0.11", "ports": [{"port": 443}]}),
    ))
    .unwrap();
    c.upsert_endpoint_slice(&web_slice(&[ready("10.1.0.5", "node-1")]))
        .unwrap();
    let mut compiler = Compiler::new();
    let first = compiler.compile_all(&c).nodes;
    let again = compiler.compile_all(&c).nodes;
    for (n, state) in &first {
        let diff = state.diff(&again[n], 1, 2);
        assert!(diff.services.is_empty(), "{n}: {diff:?}");
        assert!(diff.is_empty());
    }
    let web_id = first["node-1"].services[&cluster_ip("10.96.0.10", 80, TCP)].id;
    let api_id = first["node-1"].services[&cluster_ip("10.96.0.11", 443, TCP)].id;
    assert_ne!(web_id, api_id);
    // Another Service arrives (sorting before both) and a backend changes: ids stay.
    c.upsert_service(&service(
        "aaa",
        json!({"clusterIP": "10.96.0.12", "ports": [{"port": 1}]}),
    ))
    .unwrap();
    c.upsert_endpoint_slice(&web_slice(&[ready("10.1.0.6", "node-2")]))
        .unwrap();
    let next = compiler.compile_all(&c).nodes;
    let s = &next["node-1"].services;
    assert_eq!(s[&cluster_ip("10.96.0.10", 80, TCP)].id, web_id);
    assert_eq!(s[&cluster_ip("10.96.0.11", 443, TCP)].id, api_id);
    let diff = first["node-1"].diff(&next["node-1"], 1, 2);
    assert_eq!(
        diff.services.upsert.len(),
        2,
        "the new Service and web's backend"
    );
    assert!(diff.services.remove.is_empty());
    // compile_node agrees with compile_all.
    assert_eq!(compiler.compile_node(&c, "node-1").services, *s);
}

#[test]
fn a_deleted_slice_or_service_takes_its_backends_and_frontends_away() {
    let mut c = cluster_with_nodes();
    c.upsert_service(&web_service(json!({}))).unwrap();
    c.upsert_endpoint_slice(&web_slice(&[ready("10.1.0.5", "node-1")]))
        .unwrap();
    c.delete_endpoint_slice(&ObjectName::new("prod", "web-abc"));
    let s = compile(&c)["node-1"].services.clone();
    assert!(s[&cluster_ip("10.96.0.10", 80, TCP)].backends.is_empty());
    c.delete_service(&ObjectName::new("prod", "web"));
    assert!(compile(&c)["node-1"].services.is_empty());
}

// ---- bad input ------------------------------------------------------------------------

fn diagnostics(c: &Cluster) -> Vec<String> {
    Compiler::new()
        .compile_all(c)
        .service_diagnostics
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn a_port_with_an_unknown_protocol_or_out_of_range_number_is_reported_and_left_out_alone() {
    let mut c = cluster_with_nodes();
    c.upsert_service(&service(
        "odd",
        json!({"clusterIP": "10.96.0.20",
               "ports": [{"name": "a", "port": 80, "protocol": "ICMP"},
                         {"name": "b", "port": 70000},
                         {"name": "c", "port": 81, "targetPort": 0},
                         {"name": "ok", "port": 82}]}),
    ))
    .unwrap();
    c.upsert_service(&web_service(json!({}))).unwrap();
    let d = diagnostics(&c);
    assert_eq!(d.len(), 3, "{d:?}");
    assert!(
        d[0].contains("spec.ports[0].protocol") && d[0].contains("ICMP"),
        "{d:?}"
    );
    assert!(d[1].contains("spec.ports[1].port"), "{d:?}");
    assert!(d[2].contains("spec.ports[2].targetPort"), "{d:?}");
    let s = &compile(&c)["node-1"].services;
    assert!(
        s.contains_key(&cluster_ip("10.96.0.20", 82, TCP)),
        "the good port stays"
    );
    assert!(
        s.contains_key(&cluster_ip("10.96.0.10", 80, TCP)),
        "others undisturbed"
    );
    assert_eq!(s.len(), 2);
}

#[test]
fn a_bad_cluster_ip_is_reported_and_the_service_keeps_its_other_frontends() {
    let mut c = cluster_with_nodes();
    c.upsert_service(&service(
        "bad",
        json!({"clusterIP": "10.96.0.300", "type": "NodePort",
               "ports": [{"port": 80, "nodePort": 30001}]}),
    ))
    .unwrap();
    let d = diagnostics(&c);
    assert_eq!(d.len(), 1);
    assert!(
        d[0].starts_with("Service prod/bad: spec.clusterIP:"),
        "{d:?}"
    );
    let s = &compile(&c)["node-1"].services;
    assert_eq!(
        s.keys().collect::<Vec<_>>(),
        [&node_port(false, 30001, TCP)]
    );
}

#[test]
fn a_frontend_two_services_claim_goes_to_the_first_and_is_reported_for_the_other() {
    let mut c = cluster_with_nodes();
    c.upsert_service(&service(
        "a",
        json!({"clusterIP": "10.96.0.30", "ports": [{"port": 80}]}),
    ))
    .unwrap();
    c.upsert_service(&service(
        "b",
        json!({"clusterIP": "10.96.0.30", "ports": [{"port": 80}, {"name": "x", "port": 81}]}),
    ))
    .unwrap();
    let d = diagnostics(&c);
    assert_eq!(d.len(), 1);
    assert!(
        d[0].starts_with("Service prod/b: spec.ports[0].port"),
        "{d:?}"
    );
    let s = &compile(&c)["node-1"].services;
    assert_eq!(s[&cluster_ip("10.96.0.30", 80, TCP)].service.name, "a");
    assert_eq!(s[&cluster_ip("10.96.0.30", 81, TCP)].service.name, "b");
}

#[test]
fn a_bad_endpoint_slice_entry_is_reported_and_the_rest_of_the_slice_applies() {
    let mut c = cluster_with_nodes();
    c.upsert_service(&web_service(json!({}))).unwrap();
    let mut bad = web_slice(&[ready("10.1.0.5", "node-1"), ready("fd00::1", "node-1")]);
    bad.ports
        .as_mut()
        .unwrap()
        .push(serde_json::from_value(json!({"name": "x", "port": 0})).unwrap());
    c.upsert_endpoint_slice(&bad).unwrap();
    let d = diagnostics(&c);
    assert_eq!(d.len(), 2, "{d:?}");
    assert!(d.iter().any(|l| l.contains("ports[1].port")), "{d:?}");
    assert!(
        d.iter().any(|l| l.contains("endpoints[1].addresses[0]")),
        "{d:?}"
    );
    let s = &compile(&c)["node-1"].services;
    assert_eq!(
        addrs(&s[&cluster_ip("10.96.0.10", 80, TCP)]),
        [("10.1.0.5".into(), 8080)]
    );
}

// ---- slices derived from pods (manifest directories) --------------------------------------

fn pod(name: &str, node: &str, ip: &str, labels: Value, extra: Value) -> Pod {
    let mut v = json!({
        "metadata": {"name": name, "namespace": "prod", "labels": labels},
        "spec": {"nodeName": node, "containers": [
            {"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIPs": [{"ip": ip}]},
    });
    merge(&mut v, extra);
    serde_json::from_value(v).unwrap()
}

fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

fn backends(c: &mut Cluster, frontend: &ServiceFrontend) -> Vec<ServiceBackend> {
    c.derive_endpoint_slices();
    compile(c)["node-1"].services[frontend].backends.clone()
}

#[test]
fn derived_slices_select_pods_and_resolve_named_ports_per_pod() {
    let mut c = cluster_with_nodes();
    c.upsert_service(&web_service(json!({
        "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
    })))
    .unwrap();
    let web = json!({"app": "web"});
    c.upsert_pod(&pod("a", "node-1", "10.1.0.5", web.clone(), json!({})))
        .unwrap();
    // Its container calls the port differently: resolved per pod.
    c.upsert_pod(&pod(
        "b",
        "node-2",
        "10.1.0.6",
        web.clone(),
        json!({"spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 9090}]}]}}),
    ))
    .unwrap();
    // No port of that name: left out.
    c.upsert_pod(&pod(
        "c",
        "node-2",
        "10.1.0.7",
        web.clone(),
        json!({"spec": {"containers": [{"name": "c", "ports": []}]}}),
    ))
    .unwrap();
    // Another app, another namespace, no IP yet, not running: none of them.
    c.upsert_pod(&pod(
        "d",
        "node-1",
        "10.1.0.8",
        json!({"app": "db"}),
        json!({}),
    ))
    .unwrap();
    let mut other = pod("e", "node-1", "10.1.0.9", web.clone(), json!({}));
    other.metadata.namespace = Some("dev".into());
    c.upsert_pod(&other).unwrap();
    c.upsert_pod(&pod(
        "f",
        "node-1",
        "10.1.0.10",
        web.clone(),
        json!({"status": {"podIPs": []}}),
    ))
    .unwrap();
    c.upsert_pod(&pod(
        "g",
        "node-1",
        "10.1.0.11",
        web.clone(),
        json!({"status": {"phase": "Pending"}}),
    ))
    .unwrap();
    c.upsert_pod(&pod(
        "h",
        "node-1",
        "10.1.0.12",
        web.clone(),
        json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
    ))
    .unwrap();
    let got: Vec<(String, u16, BackendState)> =
        backends(&mut c, &cluster_ip("10.96.0.10", 80, TCP))
            .into_iter()
            .map(|b| (b.ip.to_string(), b.port, b.state))
            .collect();
    assert_eq!(
        got,
        [
            ("10.1.0.5".into(), 8080, BackendState::Ready),
            ("10.1.0.6".into(), 9090, BackendState::Ready),
        ]
    );
    assert!(diagnostics(&c).is_empty(), "{:?}", diagnostics(&c));
}

#[test]
fn derived_slices_list_terminating_pods_and_follow_label_changes() {
    let mut c = cluster_with_nodes();
    c.upsert_service(&web_service(json!({}))).unwrap();
    let web = json!({"app": "web"});
    c.upsert_pod(&pod(
        "old",
        "node-1",
        "10.1.0.5",
        web.clone(),
        json!({"metadata": {"deletionTimestamp": "2024-01-01T00:00:00Z"}}),
    ))
    .unwrap();
    let front = cluster_ip("10.96.0.10", 80, TCP);
    let only_old = backends(&mut c, &front);
    assert_eq!(only_old.len(), 1);
    assert_eq!(only_old[0].state, BackendState::Terminating, "fallback");
    assert_eq!(only_old[0].node, "node-1");

    c.upsert_pod(&pod(
        "new",
        "node-2",
        "10.1.0.6",
        json!({"app": "other"}),
        json!({}),
    ))
    .unwrap();
    assert_eq!(backends(&mut c, &front).len(), 1, "not selected yet");
    c.upsert_pod(&pod("new", "node-2", "10.1.0.6", web.clone(), json!({})))
        .unwrap();
    let now = backends(&mut c, &front);
    assert_eq!(
        now.iter().map(|b| b.ip.to_string()).collect::<Vec<_>>(),
        ["10.1.0.6"],
        "a ready backend: the terminating one is no longer used"
    );
    c.upsert_pod(&pod(
        "new",
        "node-2",
        "10.1.0.6",
        json!({"app": "other"}),
        json!({}),
    ))
    .unwrap();
    assert_eq!(backends(&mut c, &front)[0].ip, ip("10.1.0.5"));
    c.delete_service(&ObjectName::new("prod", "web"));
    c.derive_endpoint_slices();
    assert!(compile(&c)["node-1"].services.is_empty());
}

#[test]
fn a_named_target_port_no_selected_pod_has_is_reported_for_that_service_alone() {
    let mut c = cluster_with_nodes();
    c.upsert_service(&web_service(json!({
        "ports": [{"name": "http", "port": 80, "targetPort": "metrics"},
                  {"name": "plain", "port": 81, "targetPort": 8081}],
    })))
    .unwrap();
    c.upsert_service(&service(
        "api",
        json!({"clusterIP": "10.96.0.11", "selector": {"app": "web"},
               "ports": [{"port": 443, "targetPort": "http"}]}),
    ))
    .unwrap();
    c.upsert_pod(&pod(
        "a",
        "node-1",
        "10.1.0.5",
        json!({"app": "web"}),
        json!({}),
    ))
    .unwrap();
    c.derive_endpoint_slices();
    let d = diagnostics(&c);
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(
        d[0].starts_with("Service prod/web: spec.ports[0].targetPort:") && d[0].contains("metrics"),
        "{d:?}"
    );
    let s = &compile(&c)["node-1"].services;
    assert!(s[&cluster_ip("10.96.0.10", 80, TCP)].backends.is_empty());
    assert_eq!(
        addrs(&s[&cluster_ip("10.96.0.10", 81, TCP)]),
        [("10.1.0.5".into(), 8081)]
    );
    assert_eq!(
        addrs(&s[&cluster_ip("10.96.0.11", 443, TCP)]),
        [("10.1.0.5".into(), 8080)]
    );
}
