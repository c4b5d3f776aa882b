//! Section `compile`: the controller's full compile of a large cluster (time and peak
//! memory), and what one pod label change and one policy change cost at that scale.
//!
//! Each measurement runs in a child process (`xtask bench-child compile <shape>`), so that
//! the peak resident set (`VmHWM` in `/proc/self/status`) is that measurement's alone. The
//! child builds the cluster store, compiles every node (timed; the peak RSS read right after
//! covers the store, the compiler's memory and the output), then changes one pod's labels and
//! compiles the change incrementally, as the controller does: the nodes the change touches
//! are recompiled and diffed against their previous state (timed together: that is the
//! latency a change adds before agents hear of it). It does the same for one edited policy
//! and for one policy added. Diff sizes are counted in table entries and in protobuf bytes as
//! sent to agents (the `NodeStateDiff` message, without gRPC/TLS framing).
//!
//! Shape `b-cnp` is shape B with 1k ClusterNetworkPolicies added: its figures are compared
//! with shape B's of the same run.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};
use weir_api::{NodeState, PodKey};
use weir_compiler::{Cluster, Compiler};

use super::{
    harness::child_json,
    report::{Better, Goal, Report},
    synthetic::Shape,
};

const SECTION: &str = "compile";

/// What the incremental measurements report.
const CHANGE_FIELDS: [(&str, &str, &str); 5] = [
    ("seconds", "time to recompile and diff", "s"),
    ("recompiled", "nodes recompiled", "nodes"),
    ("nodes", "nodes with a diff", "nodes"),
    ("entries", "diff entries, all nodes", "entries"),
    ("bytes", "diff bytes sent, all nodes", "bytes"),
];

pub fn run(report: &mut Report, shapes: &[Shape], runs: usize) -> Result<()> {
    for &shape in shapes {
        let s = shape.name();
        let d = shape.describe();
        // Shape B with ClusterNetworkPolicies is compared with shape B.
        let baseline = |figure: &str| {
            (shape == Shape::BWithClusterPolicies && shapes.contains(&Shape::B))
                .then(|| format!("{SECTION}.{}.{figure}", Shape::B.name()))
        };
        report.define(
            SECTION,
            format!("{SECTION}.{s}.full.seconds"),
            format!("shape {s} ({d}): full compile"),
            "s",
            Better::Lower,
            baseline("full.seconds"),
        );
        report.define(
            SECTION,
            format!("{SECTION}.{s}.full.peak_mb"),
            format!("shape {s}: peak RSS after the full compile"),
            "MB",
            Better::Lower,
            baseline("full.peak_mb"),
        );
        report.define(
            SECTION,
            format!("{SECTION}.{s}.store_mb"),
            format!("shape {s}: RSS of the cluster store alone"),
            "MB",
            Better::Lower,
            baseline("store_mb"),
        );
        for (change, what) in CHANGES {
            for (field, label, unit) in CHANGE_FIELDS {
                report.define(
                    SECTION,
                    format!("{SECTION}.{s}.{change}.{field}"),
                    format!("shape {s}: {what}: {label}"),
                    unit,
                    Better::Lower,
                    baseline(&format!("{change}.{field}")),
                );
            }
        }
    }
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    for run in 1..=runs {
        for &shape in shapes {
            let started = Instant::now();
            let out = Command::new(&exe)
                .args(["bench-child", "compile", shape.name()])
                .output()
                .context("running the compile benchmark child")?;
            let v = child_json(
                &out,
                &format!("the compile benchmark child for shape {}", shape.name()),
            )?;
            let s = shape.name();
            let mut record = |key: String, value: &Value| {
                if let Some(x) = value.as_f64() {
                    report.record(&key, x);
                }
            };
            record(format!("{SECTION}.{s}.full.seconds"), &v["full_seconds"]);
            record(format!("{SECTION}.{s}.full.peak_mb"), &v["full_peak_mb"]);
            record(format!("{SECTION}.{s}.store_mb"), &v["store_mb"]);
            for (change, _) in CHANGES {
                for (field, _, _) in CHANGE_FIELDS {
                    record(format!("{SECTION}.{s}.{change}.{field}"), &v[change][field]);
                }
            }
            println!(
                "  [compile run {run}/{runs}] shape {s}: full compile {:.2} s, peak {} MB; {} [{:.0?} in all]",
                v["full_seconds"].as_f64().unwrap_or(f64::NAN),
                v["full_peak_mb"],
                CHANGES
                    .iter()
                    .map(|(change, what)| {
                        let c = &v[*change];
                        format!(
                            "{what}: {:.1} ms ({} recompiled, {} with a diff, {} entries, {} bytes)",
                            c["seconds"].as_f64().unwrap_or(f64::NAN) * 1e3,
                            c["recompiled"],
                            c["nodes"],
                            c["entries"],
                            c["bytes"]
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
                started.elapsed(),
            );
        }
    }
    if shapes.contains(&Shape::B) {
        let time = report.stats(&format!("{SECTION}.b.full.seconds"));
        let mem = report.stats(&format!("{SECTION}.b.full.peak_mb"));
        report.goals.push(Goal {
            goal: "Antrea-shape full compile ≤ 1.5 s (Antrea publishes 5.8–6.4 s on its machine)"
                .into(),
            measured: time.map_or("—".into(), |s| format!("{:.2} s", s.median)),
            met: time.map(|s| s.median <= 1.5),
        });
        report.goals.push(Goal {
            goal: "Antrea-shape peak memory ≤ 600 MB (Antrea publishes 1.5–1.7 GB)".into(),
            measured: mem.map_or("—".into(), |s| format!("{:.0} MB", s.median)),
            met: mem.map(|s| s.median <= 600.0),
        });
    }
    // Issue goals of the incremental control plane.
    for (shape, change, what, limit) in [
        (Shape::A, "pod_change", "one pod's label change", 0.050),
        (Shape::B, "pod_change", "one pod's label change", 0.050),
        (Shape::A, "policy_add", "one policy added", 0.100),
    ] {
        if !shapes.contains(&shape) {
            continue;
        }
        let t = report.stats(&format!("{SECTION}.{}.{change}.seconds", shape.name()));
        report.goals.push(Goal {
            goal: format!(
                "{what} at shape {}: change → diffs ready to publish ≤ {:.0} ms",
                shape.name().to_uppercase(),
                limit * 1e3
            ),
            measured: t.map_or("—".into(), |s| format!("{:.1} ms", s.median * 1e3)),
            met: t.map(|s| s.median <= limit),
        });
    }
    if shapes.contains(&Shape::A) {
        let mem = report.stats(&format!("{SECTION}.a.full.peak_mb"));
        report.goals.push(Goal {
            goal: "peak memory at shape A ≤ 600 MB".into(),
            measured: mem.map_or("—".into(), |s| format!("{:.0} MB", s.median)),
            met: mem.map(|s| s.median <= 600.0),
        });
    }
    if shapes.contains(&Shape::BWithClusterPolicies) {
        let s = Shape::BWithClusterPolicies.name();
        let base = |figure: &str| report.stats(&format!("{SECTION}.b.{figure}"));
        let with = |figure: &str| report.stats(&format!("{SECTION}.{s}.{figure}"));
        let measured = |figure: &str, unit: &str, digits: usize| match (base(figure), with(figure))
        {
            (Some(b), Some(w)) => format!(
                "{:.digits$} {unit} (shape B alone {:.digits$} {unit}, {:.2}×)",
                w.median,
                b.median,
                w.median / b.median
            ),
            (None, Some(w)) => format!("{:.digits$} {unit}", w.median),
            _ => "—".into(),
        };
        let cnps = super::verdict::count(Shape::CLUSTER_POLICIES);
        let goals = [
            Goal {
                goal: format!(
                    "Antrea-shape full compile with {cnps} ClusterNetworkPolicies added ≤ 1.5 s"
                ),
                measured: measured("full.seconds", "s", 2),
                met: with("full.seconds").map(|s| s.median <= 1.5),
            },
            Goal {
                goal: format!(
                    "Antrea-shape peak memory with {cnps} ClusterNetworkPolicies added ≤ 600 MB"
                ),
                measured: measured("full.peak_mb", "MB", 0),
                met: with("full.peak_mb").map(|s| s.median <= 600.0),
            },
        ];
        report.goals.extend(goals);
    }
    report.note(
        SECTION,
        format!(
            "Compiler threads: {} (one per core, at most 8). Peak RSS includes the cluster store. A change is compiled incrementally, as the controller does: only the nodes it touches are recompiled and diffed.",
            std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
        ),
    );
    Ok(())
}

/// The changes measured: (key, label).
const CHANGES: [(&str, &str); 3] = [
    ("pod_change", "one pod label change"),
    ("policy_change", "one policy change"),
    ("policy_add", "one policy added"),
];

/// The child: `compile <shape>`. Prints one JSON line.
pub fn child(args: &[String]) -> Result<()> {
    let shape = args
        .first()
        .and_then(|s| Shape::parse(s))
        .with_context(|| format!("compile child: expected shape a, b or b-cnp, got {args:?}"))?;
    let mut cluster = shape.build()?;
    let store_mb = rss_mb("VmRSS:");
    let mut compiler = Compiler::new();
    let (first, full) = timed(|| compiler.compile_all(&cluster));
    let full_peak_mb = rss_mb("VmHWM:");
    // From here on the store records what changes.
    cluster.take_changes();
    let mut states = first.nodes;

    let key = PodKey::new(Shape::CHANGED_NAMESPACE, Shape::CHANGED_POD);
    let mut pod = cluster
        .pod(&key)
        .with_context(|| format!("shape {} has no pod {key}", shape.name()))?
        .clone();
    let (k, v) = shape.relabel();
    pod.labels.insert(k.to_owned(), v.to_owned());
    cluster.upsert_pod_info(pod);
    let pod_change = incremental(&mut compiler, &mut cluster, &mut states);

    // The policy the edit changes (a watch reports only that one).
    let unedited = shape.policies(Shape::CHANGED_NAMESPACE, false)?;
    for np in shape.policies(Shape::CHANGED_NAMESPACE, true)? {
        if !unedited.contains(&np) {
            cluster.upsert_policy(&np)?;
        }
    }
    let policy_change = incremental(&mut compiler, &mut cluster, &mut states);

    cluster.upsert_policy(&weir_compiler::synthetic::policy(json!({
        "metadata": {"name": "added", "namespace": Shape::CHANGED_NAMESPACE},
        "spec": {
            "podSelector": {"matchLabels": {"app": "app-1"}},
            "ingress": [{
                "from": [{"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}],
                "ports": [{"port": 9100}],
            }],
        },
    }))?)?;
    let policy_add = incremental(&mut compiler, &mut cluster, &mut states);

    let out = json!({
        "shape": shape.name(),
        "pods": cluster.pods().count(),
        "policies": cluster.policies().count(),
        "cluster_policies": cluster.cluster_policies().count(),
        "store_mb": store_mb,
        "full_seconds": full.as_secs_f64(),
        "full_peak_mb": full_peak_mb,
        "pod_change": pod_change,
        "policy_change": policy_change,
        "policy_add": policy_add,
    });
    println!("{out}");
    Ok(())
}

/// Compiles the changes made to `cluster` since the last call and diffs the recompiled
/// nodes against `states` (which it updates), as the controller does; timed together.
fn incremental(
    compiler: &mut Compiler,
    cluster: &mut Cluster,
    states: &mut std::collections::BTreeMap<String, NodeState>,
) -> Value {
    let started = Instant::now();
    let changes = cluster.take_changes();
    let update = compiler.compile_changes(cluster, &changes);
    let recompiled = update.nodes.len();
    let mut c = Change::default();
    let empty = NodeState::default();
    for (node, state) in update.nodes {
        let before = states.get(&node).unwrap_or(&empty);
        let diff = before.diff(&state, 1, 2);
        if !diff.is_empty() {
            c.nodes += 1;
            c.entries += diff.len();
            c.bytes += prost::Message::encoded_len(&weir_transport::pb::NodeStateDiff::from(&diff));
        }
        states.insert(node, state);
    }
    let took = started.elapsed();
    json!({
        "seconds": took.as_secs_f64(),
        "recompiled": recompiled,
        "nodes": c.nodes,
        "entries": c.entries,
        "bytes": c.bytes,
        "everything": update.everything,
    })
}

#[derive(Default)]
struct Change {
    nodes: usize,
    entries: usize,
    bytes: usize,
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let v = f();
    (v, t.elapsed())
}

/// A memory field of `/proc/self/status`, in MB.
fn rss_mb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}
