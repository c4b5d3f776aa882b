//! The controller's manifest source against mutated objects: valid Namespaces, Pods,
//! NetworkPolicies, ClusterNetworkPolicies, Services and EndpointSlices of the namespace
//! `other` with fields removed, values of the wrong type, huge numbers, unicode, deep
//! nesting, bad CIDRs, ports out of range, unknown fields and enum values, empty selectors,
//! then written out as YAML or JSON with duplicated keys, cut short or with a byte flipped.
//! The text goes through the same parser as a manifest directory
//! ([`source::parse_manifests`]) and the objects through [`Controller::apply`] and
//! [`Controller::recompute`], next to a sound cluster in the namespace `prod`.
//!
//! Properties: nothing panics; a document the parser refuses is reported with its file and
//! document number; and what `prod` sees (every verdict from and to its pods, its Service
//! table entry on every node) is exactly what it sees without the mutated object. The
//! exception is a ClusterNetworkPolicy whose subject changed: it may select `prod` by
//! design (an unreadable subject selects every pod and fails closed), so only the first
//! two properties hold for it.
//!
//! Failing inputs are kept by proptest under `tests/fuzz_manifests.proptest-regressions`
//! and replayed first on every run; `PROPTEST_CASES` raises the number of cases.

use std::{
    cell::Cell,
    sync::{Arc, Mutex},
};

use proptest::{
    prelude::*,
    sample::Index,
    test_runner::{Config, FileFailurePersistence, TestRunner},
};
use serde_json::{Value, json};
use weir_api::{FrontendKind, PodKey, ServiceEntry, ServiceFrontend};
use weir_controller::{
    Cluster, Compiler, PolicyKey, Severity,
    compiler::{
        cnp::ClusterNetworkPolicy,
        oracle::{self, Endpoint},
        service::ObjectName,
    },
    run::{CompileReport, Controller},
    source::{Change, ManifestError, Object, parse_manifests},
};
use weir_transport::StatePublisher;

const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;

/// `prod/web` admits only `prod/client` on TCP `http` (8080) and backs the Service
/// `prod/web` (10.96.0.10:80); `other/c` and `third/t` are clients in other namespaces.
const SOUND: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-1}
---
apiVersion: v1
kind: Node
metadata: {name: node-2}
---
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {kubernetes.io/metadata.name: prod}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other, labels: {kubernetes.io/metadata.name: other}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: prod, labels: {app: web}}
spec:
  nodeName: node-1
  containers: [{name: web, ports: [{name: http, containerPort: 8080, protocol: TCP}]}]
status: {phase: Running, podIPs: [{ip: 10.244.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: prod, labels: {app: client}}
spec: {nodeName: node-2, containers: [{name: client}]}
status: {phase: Running, podIPs: [{ip: 10.244.1.3}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: other, labels: {app: client}}
spec: {nodeName: node-1, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.244.0.4}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: third, labels: {kubernetes.io/metadata.name: third}}
---
apiVersion: v1
kind: Pod
metadata: {name: t, namespace: third, labels: {app: client}}
spec: {nodeName: node-2, containers: [{name: t}]}
status: {phase: Running, podIPs: [{ip: 10.244.1.8}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{protocol: TCP, port: http}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: prod}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: prod, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.244.0.2], nodeName: node-1, conditions: {ready: true}}]
"#;

/// Valid objects of the namespace `other`, one per kind, each using most of its kind's
/// fields. Their addresses differ from the sound ones in more than one byte, so that one
/// flipped byte cannot make them claim a sound pod's address.
fn seeds() -> Vec<Value> {
    vec![
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "other", "labels": {"kubernetes.io/metadata.name": "other", "team": "a"}}}),
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "extra", "namespace": "other", "labels": {"app": "client", "tier": "db"}},
               "spec": {"nodeName": "node-1", "hostNetwork": false,
                        "containers": [{"name": "app", "ports": [
                            {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                            {"name": "metrics", "containerPort": 9090}]}],
                        "initContainers": [{"name": "side", "restartPolicy": "Always",
                                            "ports": [{"name": "side", "containerPort": 7070}]}]},
               "status": {"phase": "Running", "podIP": "10.244.7.9", "podIPs": [{"ip": "10.244.7.9"}],
                          "conditions": [{"type": "Ready", "status": "True"}]}}),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "np", "namespace": "other"},
               "spec": {
                   "podSelector": {"matchLabels": {"app": "client"},
                                   "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["web"]}]},
                   "policyTypes": ["Ingress", "Egress"],
                   "ingress": [{"from": [
                                    {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
                                    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "prod"}},
                                     "podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}}],
                                "ports": [{"protocol": "TCP", "port": 8000, "endPort": 8100},
                                          {"protocol": "UDP", "port": "dns"}]}],
                   "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                               "ports": [{"port": 80}, {"protocol": "SCTP", "port": 9}]}]}}),
        json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
               "metadata": {"name": "cnp"},
               "spec": {
                   "tier": "Admin", "priority": 10,
                   "subject": {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "other"}}},
                   "ingress": [
                       {"name": "from-prod", "action": "Deny",
                        "from": [{"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "prod"}}}],
                        "protocols": [{"tcp": {"destinationPort": {"number": 22}}},
                                      {"udp": {"destinationPort": {"range": {"start": 1000, "end": 2000}}}}]},
                       {"action": "Pass",
                        "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}}]}],
                   "egress": [
                       {"action": "Accept", "to": [{"networks": ["10.0.0.0/8", "fd00::/64"]}],
                        "protocols": [{"destinationNamedPort": "http"}]}]}}),
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "svc", "namespace": "other"},
               "spec": {"type": "NodePort", "clusterIP": "10.96.7.77", "clusterIPs": ["10.96.7.77"],
                        "ipFamilies": ["IPv4"], "selector": {"app": "client"},
                        "externalTrafficPolicy": "Local", "sessionAffinity": "ClientIP",
                        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                        "ports": [{"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP", "nodePort": 30053},
                                  {"name": "metrics", "port": 9090, "targetPort": 9090}]}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "svc-1", "namespace": "other",
                            "labels": {"kubernetes.io/service-name": "svc"}},
               "addressType": "IPv4",
               "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}],
               "endpoints": [{"addresses": ["10.244.7.9"], "nodeName": "node-1",
                              "conditions": {"ready": true, "serving": true, "terminating": false}}]}),
    ]
}

// ------------------------------------------------------------------ what prod sees

/// Everything `prod` sees: verdicts of flows to and from its pods (over several protocols
/// and ports) from peers outside `other`, and its Service's entry on each node (the entry's
/// id aside).
#[derive(Clone, Debug, PartialEq)]
struct ProdView {
    verdicts: Vec<bool>,
    web_service: Vec<Option<ServiceEntry>>,
}

fn pod_ep(ns: &str, name: &str) -> Endpoint {
    Endpoint::Pod(PodKey::new(ns, name))
}

fn ip_ep(ip: &str) -> Endpoint {
    Endpoint::Ip(ip.parse().unwrap())
}

fn prod_view(cluster: &Cluster) -> ProdView {
    let out = Compiler::new().with_threads(1).compile_all(cluster);
    let prod = [pod_ep("prod", "web"), pod_ep("prod", "client")];
    // Sources outside prod whose own egress nothing in `other` can restrict (a pod of
    // `other` may lose its egress to a policy of `other`: that is its own namespace's say).
    let outside = [
        pod_ep("third", "t"),
        ip_ep("10.0.0.1"),
        ip_ep("192.0.2.7"),
        ip_ep("10.244.7.9"),
    ];
    let mut verdicts = Vec::new();
    for dst in &prod {
        for src in prod.iter().chain(&outside) {
            for (proto, port) in [
                (TCP, 8080),
                (TCP, 80),
                (TCP, 22),
                (UDP, 53),
                (UDP, 1500),
                (SCTP, 9),
            ] {
                if src != dst {
                    verdicts.push(oracle::emulated_allows(
                        cluster, &out, src, dst, proto, port,
                    ));
                }
            }
        }
    }
    // Egress of prod's pods to addresses outside prod.
    for src in &prod {
        for dst in [ip_ep("10.0.0.1"), ip_ep("192.0.2.7")] {
            for (proto, port) in [(TCP, 80), (UDP, 53)] {
                verdicts.push(oracle::emulated_allows(
                    cluster, &out, src, &dst, proto, port,
                ));
            }
        }
    }
    let frontend = ServiceFrontend {
        kind: FrontendKind::ClusterIp,
        ip: "10.96.0.10".parse().unwrap(),
        port: 80,
        proto: TCP,
    };
    let web_service = ["node-1", "node-2"]
        .iter()
        .map(|n| {
            let mut entry = out.nodes.get(*n)?.services.get(&frontend)?.clone();
            entry.id = 0;
            Some(entry)
        })
        .collect();
    ProdView {
        verdicts,
        web_service,
    }
}

/// A controller fed the sound manifests, and the reports of its compiles.
fn sound_controller() -> (Controller, Arc<Mutex<Vec<CompileReport>>>) {
    let reports = Arc::new(Mutex::new(Vec::new()));
    let seen = reports.clone();
    let mut controller = Controller::new(StatePublisher::new())
        .observe_compiles(move |r| seen.lock().unwrap().push(r.clone()));
    let objects = parse_manifests("sound.yaml", SOUND).expect("sound manifests");
    controller.apply(upserts(objects));
    (controller, reports)
}

fn upserts(objects: Vec<Object>) -> Vec<Change> {
    objects
        .into_iter()
        .map(|o| Change::Upsert(Box::new(o)))
        .collect()
}

fn baseline() -> ProdView {
    let (mut controller, reports) = sound_controller();
    controller.recompute();
    let view = prod_view(controller.cluster());
    let report = reports.lock().unwrap().pop().expect("a compile report");
    assert_eq!(
        (report.invalid_policies, report.invalid_service_objects),
        (0, 0),
        "the sound cluster is valid"
    );
    // Not a view that hides everything: client reaches web on http only, third/t does not,
    // and the Service has web as its backend on both nodes.
    let index = |src: usize, proto_port: usize| src * 6 + proto_port;
    // Destination web first: five sources (web itself skipped), six flows each; then client.
    assert!(view.verdicts[index(0, 0)], "prod/client -> web:8080");
    assert!(!view.verdicts[index(0, 1)], "prod/client -> web:80");
    assert!(!view.verdicts[index(1, 0)], "third/t -> web:8080");
    assert!(
        view.verdicts[30 + index(1, 0)],
        "third/t -> prod/client:8080"
    );
    assert!(
        view.web_service
            .iter()
            .all(|e| e.as_ref().is_some_and(|e| e.backends.len() == 1)),
        "{:?}",
        view.web_service
    );
    view
}

// ------------------------------------------------------------------ mutations

#[derive(Clone, Debug, PartialEq)]
enum Seg {
    Key(String),
    At(usize),
}

fn path_text(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) if s.is_empty() => s.push_str(k),
            Seg::Key(k) => {
                s.push('.');
                s.push_str(k);
            }
            Seg::At(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

fn paths(value: &Value, at: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>) {
    match value {
        Value::Object(m) => {
            for (k, v) in m {
                at.push(Seg::Key(k.clone()));
                out.push(at.clone());
                paths(v, at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                at.push(Seg::At(i));
                out.push(at.clone());
                paths(v, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

fn get<'a>(value: &'a Value, path: &[Seg]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, seg| match seg {
        Seg::Key(k) => v.get(k.as_str()),
        Seg::At(i) => v.get(*i),
    })
}

fn get_mut<'a>(value: &'a mut Value, path: &[Seg]) -> Option<&'a mut Value> {
    path.iter().try_fold(value, |v, seg| match seg {
        Seg::Key(k) => v.get_mut(k.as_str()),
        Seg::At(i) => v.get_mut(*i),
    })
}

/// Whether a mutation may touch the field at `path`. The object must stay in `other`: its
/// name and namespace stay as they are (removing them is allowed: the object is then
/// refused), and so do a ClusterNetworkPolicy's subject and everything above it.
fn may_touch(path: &str, remove: bool, is_cnp: bool) -> bool {
    let within = |p: &str| {
        path == p || path.starts_with(&format!("{p}.")) || path.starts_with(&format!("{p}["))
    };
    if is_cnp && (within("spec.subject") || path == "spec") {
        return false;
    }
    remove || !(path == "metadata.name" || path == "metadata.namespace")
}

#[derive(Clone, Debug)]
enum Mutation {
    Remove(Index),
    /// Any value, of any type.
    Replace(Index, Value),
    /// A value of the same JSON type as the one it replaces (it still decodes into the
    /// typed object, so validation has to deal with it).
    Swap(Index, Value),
    /// An unknown (or duplicated-by-name) field added to an object.
    Insert(Index, String, Value),
}

fn same_type(a: &Value, b: &Value) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

fn apply_mutation(value: &mut Value, m: &Mutation, is_cnp: bool) {
    let mut all = Vec::new();
    paths(value, &mut Vec::new(), &mut all);
    let remove = matches!(m, Mutation::Remove(_));
    let fits = |current: &Value| match m {
        Mutation::Swap(_, v) => same_type(current, v),
        Mutation::Insert(..) => current.is_object(),
        Mutation::Remove(_) | Mutation::Replace(..) => true,
    };
    let candidates: Vec<Vec<Seg>> = all
        .into_iter()
        .filter(|p| may_touch(&path_text(p), remove, is_cnp) && get(value, p).is_some_and(fits))
        .collect();
    let (Mutation::Remove(i)
    | Mutation::Replace(i, _)
    | Mutation::Swap(i, _)
    | Mutation::Insert(i, _, _)) = m;
    let Some(path) =
        (!candidates.is_empty()).then(|| candidates[i.index(candidates.len())].clone())
    else {
        return;
    };
    match m {
        Mutation::Remove(_) => {
            let (last, parent) = path.split_last().unwrap();
            match (get_mut(value, parent), last) {
                (Some(Value::Object(o)), Seg::Key(k)) => {
                    o.remove(k);
                }
                (Some(Value::Array(a)), Seg::At(i)) if *i < a.len() => {
                    a.remove(*i);
                }
                _ => {}
            }
        }
        Mutation::Replace(_, v) | Mutation::Swap(_, v) => {
            if let Some(slot) = get_mut(value, &path) {
                *slot = v.clone();
            }
        }
        Mutation::Insert(_, k, v) => {
            if let Some(Value::Object(o)) = get_mut(value, &path) {
                o.insert(k.clone(), v.clone());
            }
        }
    }
}

fn nested(depth: usize) -> Value {
    (0..depth).fold(json!("core"), |v, i| {
        if i % 2 == 0 {
            json!([v])
        } else {
            json!({ "n": v })
        }
    })
}

/// Values of the wrong type, out of range or otherwise hostile.
fn hostile() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => proptest::sample::select(vec![
            json!(null), json!(true), json!(false), json!(-1), json!(0), json!(1),
            json!(65535), json!(65536), json!(70000), json!(i32::MAX), json!(i32::MIN),
            json!(i64::MAX), json!(i64::MIN), json!(u64::MAX), json!(1e308), json!(-0.5),
            json!(""), json!("ünïcødé-💥"), json!("\u{202e}tcp"), json!("10.0.0.0/33"),
            json!("300.1.1.1/8"), json!("10.1.2.3/8"), json!("fd00::/129"), json!("::"),
            json!("0.0.0.0"), json!("0.0.0.0/0"), json!("::/0"), json!("224.0.0.1"),
            json!("10.244.7.10"), json!("ICMP"), json!("tcp"), json!("Gt"), json!("Both"),
            json!("Gold"), json!("NotAnEnum"), json!("IPv5"), json!("None"), json!("1-65535"),
            json!("http"), json!("a".repeat(300)), json!([]), json!({}),
            json!({"matchLabels": {}}), json!({"matchExpressions": []}),
            json!([1, "a", null, {}]), json!({"start": 65535, "end": 1}),
        ]),
        1 => ".{0,12}".prop_map(Value::String),
        1 => any::<i64>().prop_map(Value::from),
        1 => (1usize..200).prop_map(nested),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => any::<Index>().prop_map(Mutation::Remove),
        2 => (any::<Index>(), hostile()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        4 => (any::<Index>(), hostile()).prop_map(|(i, v)| Mutation::Swap(i, v)),
        1 => (
            any::<Index>(),
            prop_oneof![
                proptest::sample::select(vec!["bogus", "ünknown", "x-y", "metadata", "spec", "port"])
                    .prop_map(str::to_owned),
                "[a-zA-Z]{1,8}",
            ],
            hostile(),
        )
            .prop_map(|(i, k, v)| Mutation::Insert(i, k, v)),
    ]
}

/// How the mutated object is written out.
#[derive(Clone, Debug)]
enum Text {
    Yaml,
    Json,
    /// A line repeated: a key given twice in its mapping, or an item twice in its list.
    YamlLineTwice(Index),
    /// JSON with a second `metadata` key in front of the real one.
    JsonKeyTwice,
    Cut(Index),
    Flip(Index, u8),
}

fn text_edit() -> impl Strategy<Value = Text> {
    prop_oneof![
        3 => Just(Text::Yaml),
        1 => Just(Text::Json),
        2 => any::<Index>().prop_map(Text::YamlLineTwice),
        1 => Just(Text::JsonKeyTwice),
        1 => any::<Index>().prop_map(Text::Cut),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(i, x)| Text::Flip(i, x | 1)),
    ]
}

fn write_out(value: &Value, edit: &Text) -> String {
    let yaml = || serde_norway::to_string(value).unwrap();
    match edit {
        Text::Yaml => yaml(),
        Text::Json => value.to_string(),
        Text::YamlLineTwice(i) => {
            let text = yaml();
            let mut lines: Vec<&str> = text.lines().collect();
            let at = i.index(lines.len());
            lines.insert(at, lines[at]);
            lines.join("\n")
        }
        Text::JsonKeyTwice => {
            let text = value.to_string();
            match text.strip_prefix('{') {
                Some(rest) => format!(r#"{{"metadata":{{"name":"dup"}},{rest}"#),
                None => text,
            }
        }
        Text::Cut(i) => {
            let text = yaml();
            let mut at = i.index(text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            text[..at].to_owned()
        }
        Text::Flip(i, x) => {
            let mut bytes = yaml().into_bytes();
            let at = i.index(bytes.len());
            bytes[at] ^= x;
            String::from_utf8_lossy(&bytes).into_owned()
        }
    }
}

fn cases() -> impl Strategy<Value = (usize, Vec<Mutation>, Text)> {
    (
        0..seeds().len(),
        proptest::collection::vec(mutation(), 0..4),
        text_edit(),
    )
}

fn runner(default_cases: u32) -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default_cases);
    TestRunner::new(Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        source_file: Some(file!()),
        ..Config::default()
    })
}

fn seed_subject() -> weir_controller::compiler::cnp::Subject {
    let cnp: ClusterNetworkPolicy = serde_json::from_value(seeds()[3].clone()).unwrap();
    cnp.spec.subject
}

#[test]
fn mutated_manifests_never_panic_and_leave_prod_as_it_was() {
    let baseline = baseline();
    let subject = seed_subject();
    let seeds = seeds();
    let (refused, compared, diagnosed) = (Cell::new(0u32), Cell::new(0u32), Cell::new(0u32));
    runner(512)
        .run(&cases(), |(seed, mutations, edit)| {
            let mut value = seeds[seed].clone();
            for m in &mutations {
                apply_mutation(&mut value, m, seed == 3);
            }
            let text = write_out(&value, &edit);
            let (mut controller, reports) = sound_controller();
            let mut may_select_prod = false;
            match parse_manifests("mutated.yaml", &text) {
                Ok(objects) => {
                    for o in &objects {
                        if let Object::ClusterNetworkPolicy(c) = o {
                            may_select_prod |= c.spec.subject != subject;
                        }
                    }
                    controller.apply(upserts(objects));
                }
                Err(e) => {
                    refused.set(refused.get() + 1);
                    let ManifestError::Invalid {
                        file,
                        document,
                        message,
                    } = &e
                    else {
                        return Err(TestCaseError::fail(format!("not a parse error: {e}")));
                    };
                    prop_assert_eq!(file, "mutated.yaml");
                    prop_assert!(*document >= 1 && !message.is_empty(), "{}", e);
                }
            }
            controller.recompute();
            let report = reports.lock().unwrap().pop();
            prop_assert!(report.is_some(), "recompute reported no compile");
            let report = report.unwrap();
            // Diagnostics name only the mutated object, never a sound one.
            let sound_policies = [PolicyKey::new("prod", "web")];
            for d in controller.cluster().diagnostics() {
                prop_assert!(!sound_policies.contains(&d.policy), "{}", d);
            }
            for d in controller.service_diagnostics() {
                prop_assert!(d.object.namespace != "prod", "{}", d);
            }
            let invalid = report.invalid_policies + report.invalid_service_objects;
            if invalid > 0 {
                diagnosed.set(diagnosed.get() + 1);
            }
            if !may_select_prod {
                compared.set(compared.get() + 1);
                prop_assert_eq!(prod_view(controller.cluster()), baseline.clone());
            }
            Ok(())
        })
        .unwrap();
    // Not vacuous: documents were refused, objects were diagnosed, and prod was compared.
    let (refused, compared, diagnosed) = (refused.get(), compared.get(), diagnosed.get());
    assert!(
        refused > 0 && diagnosed > 0 && compared > 0,
        "{refused} refused, {diagnosed} diagnosed, {compared} compared"
    );
}

// ------------------------------------------------------------------ known-invalid objects

/// Where an invalid object must be reported.
#[derive(Clone, Copy, Debug)]
enum Report {
    Policy,
    ClusterPolicy,
    Service,
    Slice,
}

/// One value known to be invalid at one field of a seed: the controller must report it
/// and still compile `prod` as before.
#[test]
fn known_invalid_objects_are_reported_and_leave_prod_as_it_was() {
    let baseline = baseline();
    let np = 2;
    let cnp = 3;
    let svc = 4;
    let slice = 5;
    let cases: Vec<(usize, &str, Value, Report)> = vec![
        (
            np,
            "spec.ingress[0].from[0].ipBlock.cidr",
            json!("10.0.0.0/33"),
            Report::Policy,
        ),
        (
            np,
            "spec.ingress[0].from[0].ipBlock.except[0]",
            json!("192.168.0.0/16"),
            Report::Policy,
        ),
        (
            np,
            "spec.ingress[0].ports[0].port",
            json!(70000),
            Report::Policy,
        ),
        (
            np,
            "spec.ingress[0].ports[0].endPort",
            json!(7999),
            Report::Policy,
        ),
        (
            np,
            "spec.ingress[0].ports[0].protocol",
            json!("ICMP"),
            Report::Policy,
        ),
        (
            np,
            "spec.ingress[0].ports[1].port",
            json!("not a name!"),
            Report::Policy,
        ),
        (
            np,
            "spec.podSelector.matchExpressions[0].operator",
            json!("Gt"),
            Report::Policy,
        ),
        (
            np,
            "spec.podSelector.matchLabels.app",
            json!("-bad-"),
            Report::Policy,
        ),
        (np, "spec.policyTypes[0]", json!("Both"), Report::Policy),
        (np, "spec.egress[0].to[0]", json!({}), Report::Policy),
        (cnp, "spec.priority", json!(5000), Report::ClusterPolicy),
        (cnp, "spec.tier", json!("Gold"), Report::ClusterPolicy),
        (
            cnp,
            "spec.ingress[0].action",
            json!("Maybe"),
            Report::ClusterPolicy,
        ),
        (
            cnp,
            "spec.egress[0].to[0].networks[0]",
            json!("300.1.1.1/8"),
            Report::ClusterPolicy,
        ),
        (
            cnp,
            "spec.ingress[0].from[0].bogus",
            json!({}),
            Report::ClusterPolicy,
        ),
        (svc, "spec.ports[0].port", json!(70000), Report::Service),
        (
            svc,
            "spec.ports[0].protocol",
            json!("ICMP"),
            Report::Service,
        ),
        (
            svc,
            "spec.clusterIPs[0]",
            json!("300.1.1.1"),
            Report::Service,
        ),
        (
            slice,
            "endpoints[0].addresses[0]",
            json!("not-an-address"),
            Report::Slice,
        ),
        (slice, "addressType", json!("IPv5"), Report::Slice),
    ];
    for (seed, field, bad, report) in cases {
        let mut value = seeds()[seed].clone();
        set(&mut value, field, bad.clone());
        let text = serde_norway::to_string(&value).unwrap();
        let (mut controller, reports) = sound_controller();
        let objects = parse_manifests("bad.yaml", &text)
            .unwrap_or_else(|e| panic!("{field} = {bad}: the document parses: {e}"));
        controller.apply(upserts(objects));
        controller.recompute();
        let compile = reports.lock().unwrap().pop().unwrap();
        let what = format!("{field} = {bad}");
        match report {
            Report::Policy | Report::ClusterPolicy => {
                let key = match report {
                    Report::Policy => PolicyKey::new("other", "np"),
                    _ => PolicyKey::cluster("cnp"),
                };
                assert!(
                    controller
                        .cluster()
                        .diagnostics()
                        .any(|d| d.policy == key && d.severity == Severity::Error),
                    "{what}: no error reported for {key}"
                );
                assert_eq!(compile.invalid_policies, 1, "{what}");
            }
            Report::Service | Report::Slice => {
                let (kind, name) = match report {
                    Report::Service => ("Service", "svc"),
                    _ => ("EndpointSlice", "svc-1"),
                };
                let key = ObjectName::new("other", name);
                assert!(
                    controller
                        .service_diagnostics()
                        .iter()
                        .any(|d| d.kind == kind && d.object == key),
                    "{what}: no diagnostic for {kind} {key}: {:?}",
                    controller.service_diagnostics()
                );
                assert_eq!(compile.invalid_service_objects, 1, "{what}");
            }
        }
        assert_eq!(prod_view(controller.cluster()), baseline, "{what}");
    }
}

/// Sets the field at `path` (as `path_text` writes it), which must exist.
fn set(value: &mut Value, path: &str, to: Value) {
    let mut all = Vec::new();
    paths(value, &mut Vec::new(), &mut all);
    if let Some(p) = all.iter().find(|p| path_text(p) == path) {
        *get_mut(value, p).unwrap() = to;
        return;
    }
    // A new field of an existing object.
    let (parent, key) = path.rsplit_once('.').expect("a dotted path");
    let p = all
        .iter()
        .find(|p| path_text(p) == parent)
        .unwrap_or_else(|| panic!("no field {parent}"));
    get_mut(value, p)
        .and_then(Value::as_object_mut)
        .unwrap_or_else(|| panic!("{parent} is not an object"))
        .insert(key.to_owned(), to);
}
