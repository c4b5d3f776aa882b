//! Section `fanout`: one policy change reaching every agent of a large cluster.
//!
//! Namespaces hold the nodes of a local cluster by the handful; beyond that, agents are
//! simulated: each is a task that speaks the real protocol to the real controller (the
//! `weir-controller` library's [`Controller`] and the transport's server) over mTLS with a
//! node certificate of its own, exactly as an agent's watch loop does, and records when it
//! received each version of its node's state. It applies nothing (no dataplane).
//!
//! Each measurement is a child process (`xtask bench-child fanout <agents>`) inside a network
//! namespace of its own (the controller listens on its loopback). The child builds a cluster
//! of `<agents>` nodes, each with 20 pods in 10 namespaces and a default deny in every
//! namespace, publishes it, connects the agents and waits until each holds its node's state.
//! Then it writes one NetworkPolicy that selects a pod on every node (an allow rule in a
//! namespace spread over all nodes) and measures, from that instant:
//! * *compile*: the controller's incremental compile and publish;
//! * *apply → received*: until each agent has received the version with the change (p50,
//!   p99 and the last agent).
//!
//! Reported beside them: the process's resident memory per connected agent (controller and
//! simulated agents together: an upper bound for the controller's share) and its CPU time
//! per agent for the change (both sides too).

use std::{
    net::{IpAddr, Ipv4Addr},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use futures::StreamExt as _;
use serde_json::{Value, json};
use weir_controller::{
    run::Controller,
    source::{Change, Object},
};
use weir_transport::{
    ClientTls, ClusterCa, NodeStateServer, NodeUpdate, ServerTls, StatePublisher,
};

use super::{
    harness::child_json,
    report::{Better, Goal, Report, percentile},
};

const SECTION: &str = "fanout";
const SERVER_NAME: &str = "weir-controller";
/// Pods per node and namespaces they are spread over.
const PODS_PER_NODE: usize = 20;
const NAMESPACES: usize = 10;
/// How long every agent may take to receive a state before the run is a failure.
const DEADLINE: Duration = Duration::from_secs(120);

/// The cluster sizes measured, in simulated agents.
pub const AGENTS: [usize; 3] = [10, 100, 1000];

pub fn run(report: &mut Report, counts: &[usize], runs: usize) -> Result<()> {
    let fields = [
        ("compile_ms", "controller compile and publish", "ms"),
        ("p50_ms", "apply → received, p50 over agents", "ms"),
        ("p99_ms", "apply → received, p99 over agents", "ms"),
        ("max_ms", "apply → received by the last agent", "ms"),
        (
            "rss_kb_per_agent",
            "resident memory per connected agent",
            "KB",
        ),
        (
            "cpu_ms_per_agent",
            "CPU time per agent for the change",
            "ms",
        ),
    ];
    for &n in counts {
        for (field, label, unit) in fields {
            report.define(
                SECTION,
                format!("{SECTION}.{n}.{field}"),
                format!("{n} simulated agents: {label}"),
                unit,
                Better::Lower,
                None,
            );
        }
    }
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    for run in 1..=runs {
        for &n in counts {
            let netns = format!("weir-fanout-{}-{n}", std::process::id());
            let ns = weir_localcluster::netns::Netns::create(&netns)?;
            let _guard = NetnsGuard(netns.clone());
            let started = Instant::now();
            let child = ns.spawn(
                Command::new(&exe)
                    .args(["bench-child", "fanout", &n.to_string()])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped()),
            )?;
            let out = child
                .wait_with_output()
                .context("running the fanout benchmark child")?;
            let v = child_json(&out, &format!("the fanout child for {n} agents"))?;
            for (field, _, _) in fields {
                if let Some(x) = v[field].as_f64() {
                    report.record(&format!("{SECTION}.{n}.{field}"), x);
                }
            }
            println!(
                "  [fanout run {run}/{runs}] {n} agents: compile {:.1} ms, received p50 {:.1} ms, p99 {:.1} ms, last {:.1} ms; {:.0} KB and {:.2} ms CPU per agent [{:.0?} in all]",
                v["compile_ms"].as_f64().unwrap_or(f64::NAN),
                v["p50_ms"].as_f64().unwrap_or(f64::NAN),
                v["p99_ms"].as_f64().unwrap_or(f64::NAN),
                v["max_ms"].as_f64().unwrap_or(f64::NAN),
                v["rss_kb_per_agent"].as_f64().unwrap_or(f64::NAN),
                v["cpu_ms_per_agent"].as_f64().unwrap_or(f64::NAN),
                started.elapsed(),
            );
        }
    }
    if let Some(&most) = counts.iter().max() {
        let p99 = report.stats(&format!("{SECTION}.{most}.p99_ms"));
        report.goals.push(Goal {
            goal: format!("one policy change reaching all of {most} simulated agents: p99 ≤ 1 s"),
            measured: p99.map_or("—".into(), |s| format!("{:.0} ms", s.median)),
            met: p99.map(|s| s.median <= 1000.0),
        });
    }
    report.note(
        SECTION,
        format!(
            "Simulated agents: tasks speaking the real protocol over mTLS to the real controller in one process, in a network namespace of its own; each node has {PODS_PER_NODE} pods in {NAMESPACES} namespaces. Memory and CPU per agent count both sides."
        ),
    );
    Ok(())
}

/// Deletes the namespace when the measurement ends, however it ends.
struct NetnsGuard(String);

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        weir_localcluster::netns::delete(&self.0);
    }
}

fn node_name(i: usize) -> String {
    format!("node-{i}")
}

/// Node `i`'s pod range: 10.(100 + i / 256).(i % 256).0/24.
fn pod_ip(node: usize, pod: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        (100 + node / 256) as u8,
        (node % 256) as u8,
        (pod + 2) as u8,
    )
}

fn object(v: Value) -> Result<Change> {
    let o = match v["kind"].as_str() {
        Some("Node") => Object::Node(serde_json::from_value(v)?),
        Some("Pod") => Object::Pod(serde_json::from_value(v)?),
        Some("Namespace") => Object::Namespace(serde_json::from_value(v)?),
        Some("NetworkPolicy") => Object::NetworkPolicy(serde_json::from_value(v)?),
        other => bail!("no fanout objects of kind {other:?}"),
    };
    Ok(Change::Upsert(Box::new(o)))
}

/// The cluster: nodes with pod ranges, pods spread over namespaces, a default deny per
/// namespace.
fn cluster(agents: usize) -> Result<Vec<Change>> {
    let mut changes = Vec::new();
    for ns in 0..NAMESPACES {
        changes.push(object(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("ns-{ns}"), "labels": {"team": format!("team-{ns}")}},
        }))?);
        changes.push(object(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "default-deny", "namespace": format!("ns-{ns}")},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
        }))?);
    }
    for n in 0..agents {
        let cidr = format!("10.{}.{}.0/24", 100 + n / 256, n % 256);
        changes.push(object(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node_name(n)},
            "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
            "status": {"addresses": [{"type": "InternalIP", "address": format!("172.31.{}.{}", n / 250, n % 250 + 1)}]},
        }))?);
        for p in 0..PODS_PER_NODE {
            changes.push(object(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": format!("pod-{n}-{p}"),
                    "namespace": format!("ns-{}", p % NAMESPACES),
                    "labels": {"app": format!("app-{}", p % 4)},
                },
                "spec": {"nodeName": node_name(n), "containers": []},
                "status": {"phase": "Running", "podIPs": [{"ip": pod_ip(n, p).to_string()}]},
            }))?);
        }
    }
    Ok(changes)
}

/// When each agent received which version: (version, instant) per agent.
type Received = Arc<Mutex<Vec<Vec<(u64, Instant)>>>>;

/// The child: `fanout <agents>`. Prints one JSON line.
pub fn child(args: &[String]) -> Result<()> {
    let agents: usize = args
        .first()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("fanout child: expected a number of agents, got {args:?}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let out = rt.block_on(measure(agents))?;
    println!("{out}");
    Ok(())
}

async fn measure(agents: usize) -> Result<Value> {
    let publisher = StatePublisher::new();
    let mut controller = Controller::new(publisher.clone());
    controller.apply(cluster(agents)?);
    let first = controller.recompute();

    let ca = ClusterCa::generate("weir fanout benchmark")?;
    let cert = ca.issue_controller_cert(&[SERVER_NAME], &[IpAddr::V4(Ipv4Addr::LOCALHOST)])?;
    let tls = ServerTls::from_pem(ca.cert_pem(), &cert.cert_pem, &cert.key_pem)?;
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let endpoint = format!("https://{}", listener.local_addr()?);
    let server = NodeStateServer::new(publisher.clone());
    tokio::spawn(server.serve(listener, tls, std::future::pending()));

    let rss_before = rss_kb();
    let received: Received = Arc::new(Mutex::new(vec![Vec::new(); agents]));
    for i in 0..agents {
        let node = node_name(i);
        let issued = ca.issue_node_cert(&node)?;
        let tls = ClientTls::new(ca.cert_pem(), SERVER_NAME)?
            .with_identity(&issued.cert_pem, &issued.key_pem)?;
        let endpoint = endpoint.clone();
        let received = received.clone();
        tokio::spawn(async move {
            let client = weir_transport::connect(&endpoint, &tls).await?;
            let mut updates = client.watch(&node, None).await?;
            while let Some(update) = updates.next().await {
                let version = match update? {
                    NodeUpdate::Snapshot { at, .. } | NodeUpdate::Unchanged { at } => at.version,
                    NodeUpdate::Diff(diff) => diff.to_version,
                };
                if let Ok(mut r) = received.lock() {
                    r[i].push((version, Instant::now()));
                }
            }
            anyhow::Ok(())
        });
    }
    let want = |versions: &std::collections::BTreeMap<String, u64>| -> Vec<u64> {
        (0..agents)
            .map(|i| versions.get(&node_name(i)).copied().unwrap_or(0))
            .collect()
    };
    wait_for(&received, &want(&first)).await?;
    let rss_connected = rss_kb();
    let cpu_before = cpu_ms();

    let applied = Instant::now();
    controller.apply(vec![object(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "allow-monitoring", "namespace": "ns-0"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "app-0"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "team-9"}}}]}],
        },
    }))?]);
    let second = controller.recompute();
    let compile = applied.elapsed();
    let target = want(&second);
    let changed = target
        .iter()
        .zip(want(&first))
        .filter(|(a, b)| **a != *b)
        .count();
    if changed != agents {
        bail!("the change reached {changed} of {agents} nodes' states, not all");
    }
    let arrivals = wait_for(&received, &target).await?;
    let cpu_after = cpu_ms();
    let mut latencies: Vec<f64> = arrivals
        .iter()
        .map(|t| t.saturating_duration_since(applied).as_secs_f64() * 1e3)
        .collect();
    latencies.sort_by(f64::total_cmp);
    Ok(json!({
        "agents": agents,
        "compile_ms": compile.as_secs_f64() * 1e3,
        "p50_ms": percentile(&latencies, 50.0),
        "p99_ms": percentile(&latencies, 99.0),
        "max_ms": latencies.last().copied().unwrap_or(f64::NAN),
        "rss_kb_per_agent": rss_connected.saturating_sub(rss_before) as f64 / agents as f64,
        "cpu_ms_per_agent": (cpu_after - cpu_before) / agents as f64,
    }))
}

/// Waits until every agent received at least its target version; returns when each did.
async fn wait_for(received: &Received, target: &[u64]) -> Result<Vec<Instant>> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        {
            let r = received.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            let reached: Vec<Option<Instant>> = r
                .iter()
                .zip(target)
                .map(|(got, want)| got.iter().find(|(v, _)| v >= want).map(|(_, t)| *t))
                .collect();
            if reached.iter().all(Option::is_some) {
                return Ok(reached.into_iter().flatten().collect());
            }
            if Instant::now() > deadline {
                let missing = reached.iter().filter(|r| r.is_none()).count();
                bail!("{missing} agents did not receive their state within {DEADLINE:?}");
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse().ok())
        .unwrap_or(0)
}

/// CPU time (user and system) of this process so far, in ms.
fn cpu_ms() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return f64::NAN;
    }
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    ms(usage.ru_utime) + ms(usage.ru_stime)
}
