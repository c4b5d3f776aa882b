//! Builds a synthetic cluster and measures a full compile, a recompile of the unchanged
//! cluster, and the diffs a one-pod label change causes.
//!
//! ```text
//! cargo run --release -p weir-controller --example scale -- a   # 5k nodes, 150k pods, 10k policies
//! cargo run --release -p weir-controller --example scale -- b   # 25k namespaces, 100k pods, 75k policies
//! ```
//!
//! Optional second argument: number of compile threads (default: all cores). With
//! `SCALE_HEAP=1` the live heap is counted too (cluster store, compiler memory, output), at
//! some cost in speed.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::BTreeMap,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        core::v1::{Container, ContainerPort, Namespace, Node, Pod, PodIP, PodSpec, PodStatus},
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use weir_controller::{Cluster, CompileOutput, Compiler};

/// Counts live heap bytes, to tell the cluster store, the compiler's memory and the output
/// apart (RSS also holds what the allocator keeps after frees).
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Counting costs a contended atomic per allocation: `SCALE_HEAP=1` turns it on.
static COUNTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

// SAFETY: forwards to the system allocator, only counting sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_add(new_size, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live_mb() -> usize {
    LIVE.load(Ordering::Relaxed) >> 20
}

struct Shape {
    nodes: usize,
    namespaces: usize,
    pods_per_namespace: usize,
    /// Builds the policies of one namespace.
    policies: fn(ns: &str) -> Vec<NetworkPolicy>,
    /// The label a one-pod change flips (to a value that matters to some policy).
    relabel: (&'static str, &'static str),
}

fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    )
}

fn namespace(name: &str, pairs: &[(&str, &str)]) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: labels(pairs),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn pod(ns: &str, name: &str, pairs: &[(&str, &str)], node: &str, ip: String) -> Pod {
    let port = |name: &str, port: i32, protocol: &str| ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some(protocol.to_owned()),
        ..Default::default()
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(ns.to_owned()),
            labels: labels(pairs),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.to_owned()),
            containers: vec![Container {
                name: "main".to_owned(),
                ports: Some(vec![
                    port("http", 8080, "TCP"),
                    port("metrics", 9090, "TCP"),
                    port("dns", 53, "UDP"),
                ]),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".to_owned()),
            pod_ips: Some(vec![PodIP { ip: ip.clone() }]),
            pod_ip: Some(ip),
            ..Default::default()
        }),
    }
}

fn policy(yaml: &str) -> NetworkPolicy {
    serde_norway::from_str(yaml).expect("policy yaml")
}

/// Shape A: per namespace a default deny, an allow chain between apps, scraping from the
/// monitoring namespace on a named port, and egress to DNS, the namespace and the internet.
fn policies_a(ns: &str) -> Vec<NetworkPolicy> {
    let mut v = vec![policy(&format!(
        "metadata: {{name: default-deny, namespace: {ns}}}\nspec: {{podSelector: {{}}, policyTypes: [Ingress]}}"
    ))];
    for k in 1..8 {
        v.push(policy(&format!(
            r#"
metadata: {{name: app-{k}, namespace: {ns}}}
spec:
  podSelector: {{matchLabels: {{app: app-{k}}}}}
  ingress:
  - from: [{{podSelector: {{matchLabels: {{app: app-{}}}}}}}]
    ports: [{{port: 8080}}, {{port: 8443, endPort: 8450}}]
"#,
            k - 1
        )));
    }
    v.push(policy(&format!(
        r#"
metadata: {{name: scrape, namespace: {ns}}}
spec:
  podSelector: {{}}
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{team: monitoring}}}}}}]
    ports: [{{port: metrics}}]
"#
    )));
    v.push(policy(&format!(
        r#"
metadata: {{name: egress, namespace: {ns}}}
spec:
  podSelector: {{matchLabels: {{tier: back}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: kube-system}}}}, podSelector: {{matchLabels: {{k8s-app: kube-dns}}}}}}]
    ports: [{{protocol: UDP, port: 53}}, {{protocol: TCP, port: 53}}]
  - to: [{{podSelector: {{}}}}]
  - to: [{{ipBlock: {{cidr: 0.0.0.0/0, except: [10.0.0.0/8, 192.168.0.0/16]}}}}]
    ports: [{{port: 443}}]
"#
    )));
    v
}

/// Shape B: per namespace a default deny (both directions), an allow within the namespace
/// and from monitoring, and egress to DNS and the internet.
fn policies_b(ns: &str) -> Vec<NetworkPolicy> {
    vec![
        policy(&format!(
            "metadata: {{name: default-deny, namespace: {ns}}}\nspec: {{podSelector: {{}}, policyTypes: [Ingress, Egress]}}"
        )),
        policy(&format!(
            r#"
metadata: {{name: same-namespace, namespace: {ns}}}
spec:
  podSelector: {{}}
  ingress:
  - from: [{{podSelector: {{}}}}]
  - from: [{{namespaceSelector: {{matchLabels: {{team: monitoring}}}}}}]
    ports: [{{port: metrics}}]
  egress:
  - to: [{{podSelector: {{}}}}]
"#
        )),
        policy(&format!(
            r#"
metadata: {{name: egress, namespace: {ns}}}
spec:
  podSelector: {{matchLabels: {{tier: back}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: kube-system}}}}, podSelector: {{matchLabels: {{k8s-app: kube-dns}}}}}}]
    ports: [{{protocol: UDP, port: 53}}, {{protocol: TCP, port: 53}}]
  - to: [{{ipBlock: {{cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}}}]
    ports: [{{port: 443}}, {{port: 80}}]
"#
        )),
    ]
}

fn ip(n: usize) -> String {
    format!("10.{}.{}.{}", (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff)
}

/// A deterministic spread of pods over nodes.
fn node_of(n: usize, nodes: usize) -> String {
    format!("node-{}", n.wrapping_mul(2_654_435_761) % nodes)
}

fn build(shape: &Shape) -> Cluster {
    let mut c = Cluster::new();
    for n in 0..shape.nodes {
        c.upsert_node(&Node {
            metadata: ObjectMeta {
                name: Some(format!("node-{n}")),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
    }
    let mut counter = 1usize;
    c.upsert_namespace(&namespace("kube-system", &[])).unwrap();
    for i in 0..20 {
        let node = node_of(counter, shape.nodes);
        c.upsert_pod(&pod(
            "kube-system",
            &format!("coredns-{i}"),
            &[("k8s-app", "kube-dns")],
            &node,
            ip(counter),
        ))
        .unwrap();
        counter += 1;
    }
    c.upsert_namespace(&namespace("monitoring", &[("team", "monitoring")]))
        .unwrap();
    for i in 0..10 {
        let node = node_of(counter, shape.nodes);
        c.upsert_pod(&pod(
            "monitoring",
            &format!("prometheus-{i}"),
            &[("app", "prometheus")],
            &node,
            ip(counter),
        ))
        .unwrap();
        counter += 1;
    }
    for n in 0..shape.namespaces {
        let ns = format!("team-{n}");
        let env = if n % 3 == 0 { "prod" } else { "dev" };
        c.upsert_namespace(&namespace(
            &ns,
            &[("env", env), ("owner", &format!("group-{}", n % 50))],
        ))
        .unwrap();
        for p in 0..shape.pods_per_namespace {
            let app = format!("app-{}", p % 8);
            let tier = if p % 2 == 0 { "front" } else { "back" };
            let node = node_of(counter, shape.nodes);
            c.upsert_pod(&pod(
                &ns,
                &format!("pod-{p}"),
                &[("app", &app), ("tier", tier)],
                &node,
                ip(counter),
            ))
            .unwrap();
            counter += 1;
        }
        if std::env::var_os("NO_POLICIES").is_none() {
            for np in (shape.policies)(&ns) {
                c.upsert_policy(&np).unwrap();
            }
        }
    }
    c
}

fn rss_mb() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            / 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn summarize(out: &CompileOutput) -> String {
    let mut classes = 0usize;
    let mut max_classes = 0usize;
    let mut verdicts = 0usize;
    let mut max_verdicts = 0usize;
    let mut rule_sets = 0usize;
    for s in out.nodes.values() {
        classes += s.peer_classes.len();
        max_classes = max_classes.max(s.peer_classes.len());
        verdicts += s.verdicts.len();
        max_verdicts = max_verdicts.max(s.verdicts.len());
        rule_sets += s.rule_sets.len();
    }
    format!(
        "{} nodes; peer_classes entries {classes} (max/node {max_classes}); verdicts {verdicts} (max/node {max_verdicts}); rule sets {rule_sets}",
        out.nodes.len()
    )
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let v = f();
    (v, t.elapsed())
}

fn main() {
    // Set before anything is allocated, never changed after: frees match allocations.
    COUNTING.store(std::env::var_os("SCALE_HEAP").is_some(), Ordering::Relaxed);
    let args: Vec<String> = std::env::args().collect();
    let which = args.get(1).map_or("b", String::as_str);
    let shape = match which {
        "a" => Shape {
            nodes: 5_000,
            namespaces: 1_000,
            pods_per_namespace: 150,
            policies: policies_a,
            relabel: ("app", "app-2"),
        },
        "b" => Shape {
            nodes: 5_000,
            namespaces: 25_000,
            pods_per_namespace: 4,
            policies: policies_b,
            relabel: ("tier", "front"),
        },
        other => {
            eprintln!("unknown shape {other:?}: use a or b");
            std::process::exit(2);
        }
    };
    let (mut cluster, t_build) = timed(|| build(&shape));
    let (rss, _) = rss_mb();
    let heap = if COUNTING.load(Ordering::Relaxed) {
        format!("live heap {} MB", live_mb())
    } else {
        "SCALE_HEAP=1 to count the live heap".to_owned()
    };
    println!(
        "shape {which}: {} namespaces, {} pods, {} policies; built in {t_build:.2?}, RSS {rss} MB, {heap}",
        shape.namespaces,
        cluster.pods().count(),
        cluster.policies().count(),
    );
    let heap_cluster = live_mb();
    let mut compiler = Compiler::new();
    if let Some(t) = args.get(2).and_then(|t| t.parse().ok()) {
        compiler = compiler.with_threads(t);
    }
    let (first, t_first) = timed(|| compiler.compile_all(&cluster));
    let (rss, hwm) = rss_mb();
    println!("full compile: {t_first:.2?}; RSS {rss} MB, peak {hwm} MB");
    println!("  {}", summarize(&first));
    let heap_all = live_mb();
    let output_mb = {
        let before = live_mb();
        let copy = first.clone();
        let after = live_mb();
        drop(copy);
        after - before
    };
    if COUNTING.load(Ordering::Relaxed) {
        println!(
            "  live heap: cluster {heap_cluster} MB, compiler memory {} MB, output {output_mb} MB",
            heap_all.saturating_sub(heap_cluster + output_mb)
        );
    }
    let (second, t_second) = timed(|| compiler.compile_all(&cluster));
    let changed = first
        .nodes
        .iter()
        .filter(|(n, s)| !s.diff(&second.nodes[*n], 1, 2).is_empty())
        .count();
    println!("recompile unchanged: {t_second:.2?}; nodes with a diff: {changed}");
    drop(first);

    // One pod changes a label that some policy cares about.
    let mut p = cluster
        .pod(&weir_api::PodKey::new("team-7", "pod-1"))
        .unwrap()
        .clone();
    p.labels
        .insert(shape.relabel.0.to_owned(), shape.relabel.1.to_owned());
    cluster.upsert_pod_info(p);
    let (third, t_third) = timed(|| compiler.compile_all(&cluster));
    let mut sizes: Vec<(usize, String)> = second
        .nodes
        .iter()
        .map(|(n, s)| (s.diff(&third.nodes[n], 2, 3).len(), n.clone()))
        .filter(|(len, _)| *len > 0)
        .collect();
    sizes.sort();
    let total: usize = sizes.iter().map(|(l, _)| l).sum();
    println!(
        "one-pod label change: recompile {t_third:.2?}; {} nodes changed, {total} entries, largest {:?}",
        sizes.len(),
        sizes.last()
    );
    let (_, hwm) = rss_mb();
    println!("peak RSS {hwm} MB");
}
