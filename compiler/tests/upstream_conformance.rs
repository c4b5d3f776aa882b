//! The upstream Kubernetes NetworkPolicy e2e suite (translated into the
//! `weir-reachability/v1` case format, see `conformance/cases/upstream-netpol.yaml`), run against
//! the compiler: every expected verdict must be what the emulated dataplane decides (and
//! what the reference oracle decides), on one node and on two.
//!
//! The case-file reader here is a small test helper; the production reader lives in the
//! conformance crate.

mod support;

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Deserialize;
use support::*;
use weir_api::PodKey;
use weir_compiler::{
    Cluster, Compiler, PolicyKey,
    oracle::{self, Endpoint},
};

const CASES: &str = include_str!("../../conformance/cases/upstream-netpol.yaml");

#[derive(Debug, Deserialize)]
struct CaseFile {
    format: String,
    model: ModelSpec,
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
struct ModelSpec {
    namespaces: Vec<String>,
    pods: Vec<String>,
    ports: Vec<u16>,
    protocols: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    #[serde(default)]
    tags: Vec<String>,
    steps: Vec<Step>,
}

#[derive(Debug, Deserialize)]
struct Step {
    #[serde(default)]
    apply: Vec<serde_norway::Value>,
    #[serde(default)]
    delete: Vec<DeleteRef>,
    #[serde(default)]
    set_pod_labels: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    set_namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    expect: Vec<Expect>,
}

#[derive(Debug, Deserialize)]
struct DeleteRef {
    kind: String,
    namespace: Option<String>,
    name: String,
}

#[derive(Debug, Deserialize)]
struct Expect {
    ports: Option<Vec<u16>>,
    protocols: Option<Vec<String>>,
    default: Verdict,
    #[serde(default)]
    deny: Vec<String>,
    #[serde(default)]
    allow: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Verdict {
    Allow,
    Deny,
}

/// One side of a pattern: `ns/pod`, `ns/*` or `*/*`.
fn side_matches(pattern: &str, pod: &PodKey) -> Option<u32> {
    let (ns, name) = pattern.split_once('/')?;
    match (ns, name) {
        ("*", "*") => Some(0),
        (ns, "*") => (ns == pod.namespace).then_some(1),
        (ns, name) => (ns == pod.namespace && name == pod.name).then_some(2),
    }
}

/// Specificity of `from -> to` for the pair, if it matches.
fn pattern_matches(pattern: &str, from: &PodKey, to: &PodKey) -> Option<u32> {
    let (a, b) = pattern.split_once("->")?;
    Some(side_matches(a.trim(), from)? + side_matches(b.trim(), to)?)
}

fn expected(e: &Expect, from: &PodKey, to: &PodKey) -> bool {
    let best = |patterns: &[String]| {
        patterns
            .iter()
            .filter_map(|p| pattern_matches(p, from, to))
            .max()
    };
    match (best(&e.allow), best(&e.deny)) {
        (None, None) => e.default == Verdict::Allow,
        (Some(_), None) => true,
        (None, Some(_)) => false,
        (Some(a), Some(d)) => a >= d,
    }
}

fn protocol_number(p: &str) -> u8 {
    match p {
        "TCP" => TCP,
        "UDP" => UDP,
        "SCTP" => SCTP,
        other => panic!("unknown protocol {other}"),
    }
}

struct World {
    model: ModelSpec,
    nodes: usize,
    ips: BTreeMap<PodKey, IpAddr>,
    cluster: Cluster,
    compiler: Compiler,
}

impl World {
    fn new(file: &CaseFile, nodes: usize) -> Self {
        let model = ModelSpec {
            namespaces: file.model.namespaces.clone(),
            pods: file.model.pods.clone(),
            ports: file.model.ports.clone(),
            protocols: file.model.protocols.clone(),
        };
        let mut world = Self {
            model,
            nodes,
            ips: BTreeMap::new(),
            cluster: Cluster::retaining_policy_specs(),
            compiler: Compiler::new().with_threads(1),
        };
        for (n, ns) in world.model.namespaces.clone().iter().enumerate() {
            world.set_namespace_labels(ns, &BTreeMap::from([("ns".to_owned(), ns.clone())]));
            for (p, name) in world.model.pods.clone().iter().enumerate() {
                let key = PodKey::new(ns, name);
                let ip: IpAddr = format!("10.0.{n}.{}", 10 + p).parse().unwrap();
                world.ips.insert(key.clone(), ip);
                world.set_pod_labels(&key, &BTreeMap::from([("pod".to_owned(), name.clone())]));
            }
        }
        world
    }

    fn pod_index(&self, key: &PodKey) -> usize {
        self.ips.keys().position(|k| k == key).unwrap()
    }

    fn set_namespace_labels(&mut self, ns: &str, labels: &BTreeMap<String, String>) {
        let pairs: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.cluster
            .upsert_namespace(&namespace(ns, &pairs))
            .unwrap();
    }

    fn set_pod_labels(&mut self, key: &PodKey, labels: &BTreeMap<String, String>) {
        let mut p = pod(&key.to_string());
        p.labels = labels.clone();
        p.node = Some(format!("node-{}", self.pod_index(key) % self.nodes));
        p.ips = vec![self.ips[key].to_string()];
        for port in &self.model.ports {
            for proto in &self.model.protocols {
                p.ports.push((
                    format!("serve-{port}-{}", proto.to_lowercase()),
                    i32::from(*port),
                    proto.clone(),
                ));
            }
        }
        self.cluster.upsert_pod(&p.build()).unwrap();
    }

    /// Replaces `{{ip ns/pod}}` in every string of the object.
    fn substitute(&self, value: &mut serde_norway::Value) {
        match value {
            serde_norway::Value::String(s) => {
                while let Some(start) = s.find("{{ip ") {
                    let end = start + s[start..].find("}}").expect("closing }}");
                    let (ns, name) = s[start + 5..end].trim().split_once('/').expect("ns/pod");
                    let ip = self.ips[&PodKey::new(ns, name)].to_string();
                    s.replace_range(start..end + 2, &ip);
                }
            }
            serde_norway::Value::Sequence(seq) => seq.iter_mut().for_each(|v| self.substitute(v)),
            serde_norway::Value::Mapping(map) => map.values_mut().for_each(|v| self.substitute(v)),
            serde_norway::Value::Tagged(t) => self.substitute(&mut t.value),
            _ => {}
        }
    }

    /// Runs a step; returns a description of every mismatch.
    fn step(&mut self, step: &Step) -> Vec<String> {
        for (key, labels) in &step.set_pod_labels {
            let (ns, name) = key.split_once('/').unwrap();
            self.set_pod_labels(&PodKey::new(ns, name), labels);
        }
        for (ns, labels) in &step.set_namespace_labels {
            self.set_namespace_labels(ns, labels);
        }
        for object in &step.apply {
            let mut object = object.clone();
            self.substitute(&mut object);
            let np: NetworkPolicy = serde_norway::from_value(object).expect("NetworkPolicy");
            let diagnostics = self.cluster.upsert_policy(&np).unwrap();
            assert!(
                diagnostics.is_empty(),
                "upstream policy rejected: {diagnostics:?}"
            );
        }
        for d in &step.delete {
            assert_eq!(d.kind, "NetworkPolicy");
            self.cluster.delete_policy(&PolicyKey::new(
                d.namespace.clone().unwrap(),
                d.name.clone(),
            ));
        }
        let out = self.compiler.compile_all(&self.cluster);
        let mut mismatches = Vec::new();
        for e in &step.expect {
            let ports = e.ports.clone().unwrap_or_else(|| self.model.ports.clone());
            let protocols = e
                .protocols
                .clone()
                .unwrap_or_else(|| self.model.protocols.clone());
            for proto in &protocols {
                for &port in &ports {
                    let mut table = String::new();
                    let mut bad = false;
                    for from in self.ips.keys() {
                        let _ = write!(table, "\n  {from:<4}");
                        for to in self.ips.keys() {
                            let want = expected(e, from, to);
                            let (src, dst) =
                                (Endpoint::Pod(from.clone()), Endpoint::Pod(to.clone()));
                            let (dataplane, reference) = if from == to {
                                (true, true) // never leaves the pod
                            } else {
                                let n = protocol_number(proto);
                                (
                                    oracle::emulated_allows(
                                        &self.cluster,
                                        &out,
                                        &src,
                                        &dst,
                                        n,
                                        port,
                                    ),
                                    oracle::allowed(&self.cluster, &src, &dst, n, port)
                                        .expect("specs retained"),
                                )
                            };
                            let ok = dataplane == want && reference == want;
                            bad |= !ok;
                            let mark = match (dataplane, ok) {
                                (true, true) => " .",
                                (false, true) => " X",
                                (true, false) => "*.",
                                (false, false) => "*X",
                            };
                            table.push_str(mark);
                        }
                    }
                    if bad {
                        mismatches.push(format!(
                            "{proto}/{port} (rows from, columns to, * = mismatch):{table}"
                        ));
                    }
                }
            }
        }
        mismatches
    }
}

fn run(nodes: usize) {
    let file: CaseFile = serde_norway::from_str(CASES).expect("case file");
    assert_eq!(file.format, "weir-reachability/v1");
    let mut failures = Vec::new();
    let mut passed = 0;
    for case in &file.cases {
        if case.tags.iter().any(|t| t == "experimental") {
            continue;
        }
        let mut world = World::new(&file, nodes);
        let mut case_failures = Vec::new();
        for (i, step) in case.steps.iter().enumerate() {
            for m in world.step(step) {
                case_failures.push(format!("step {i}: {m}"));
            }
        }
        if case_failures.is_empty() {
            passed += 1;
        } else {
            failures.push(format!("{}:\n{}", case.name, case_failures.join("\n")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} passed, {} failed on {nodes} node(s):\n{}",
        passed,
        failures.len(),
        failures.join("\n\n")
    );
    assert!(passed >= 48, "only {passed} cases ran");
}

#[test]
fn upstream_netpol_suite_passes_on_one_node() {
    run(1);
}

#[test]
fn upstream_netpol_suite_passes_on_two_nodes() {
    run(2);
}

#[test]
fn pattern_specificity_follows_the_case_format() {
    let e = Expect {
        ports: None,
        protocols: None,
        default: Verdict::Allow,
        deny: vec!["*/* -> x/*".into()],
        allow: vec!["x/a -> x/a".into(), "y/* -> */*".into()],
    };
    let k = |s: &str| {
        let (n, p) = s.split_once('/').unwrap();
        PodKey::new(n, p)
    };
    assert!(expected(&e, &k("x/a"), &k("x/a")), "4 beats 1");
    assert!(!expected(&e, &k("x/b"), &k("x/a")));
    assert!(expected(&e, &k("y/b"), &k("x/a")), "tie: allow wins");
    assert!(expected(&e, &k("z/b"), &k("y/a")), "default");
}
