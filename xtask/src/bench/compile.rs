//! Section `compile`: the controller's full compile of a large cluster (time and peak
//! memory), and what one pod label change and one policy change cost at that scale.
//!
//! Each measurement runs in a child process (`xtask bench-child compile <shape>`), so that
//! the peak resident set (`VmHWM` in `/proc/self/status`) is that measurement's alone. The
//! child builds the cluster store, compiles every node (timed; the peak RSS read right after
//! covers the store, the compiler's memory and the output), then changes one pod's labels,
//! recompiles and diffs every node against its previous state, as the controller does on
//! every change (timed together: that is the latency a change adds before agents hear of it),
//! and does the same for one edited policy. Diff sizes are counted in table entries and in
//! protobuf bytes as sent to agents (the `NodeStateDiff` message, without gRPC/TLS framing).
//!
//! Shape `b-cnp` is shape B with 1k ClusterNetworkPolicies added: its figures are compared
//! with shape B's of the same run.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use weir_api::PodKey;
use weir_compiler::{CompileOutput, Compiler};

use super::{
    report::{Better, Goal, Report},
    synthetic::Shape,
};

const SECTION: &str = "compile";

/// What the incremental measurements report.
const CHANGE_FIELDS: [(&str, &str, &str); 4] = [
    ("seconds", "time to recompile and diff", "s"),
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
        for change in ["pod_change", "policy_change"] {
            let what = if change == "pod_change" {
                "one pod label change"
            } else {
                "one policy change"
            };
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
            if !out.status.success() {
                bail!(
                    "the compile benchmark child for shape {} failed ({}): {}",
                    shape.name(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let stdout = String::from_utf8_lossy(&out.stdout);
            let line = stdout
                .lines()
                .last()
                .context("the compile benchmark child printed nothing")?;
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("the compile benchmark child printed {line:?}"))?;
            let s = shape.name();
            let mut record = |key: String, value: &Value| {
                if let Some(x) = value.as_f64() {
                    report.record(&key, x);
                }
            };
            record(format!("{SECTION}.{s}.full.seconds"), &v["full_seconds"]);
            record(format!("{SECTION}.{s}.full.peak_mb"), &v["full_peak_mb"]);
            record(format!("{SECTION}.{s}.store_mb"), &v["store_mb"]);
            for change in ["pod_change", "policy_change"] {
                for (field, _, _) in CHANGE_FIELDS {
                    record(format!("{SECTION}.{s}.{change}.{field}"), &v[change][field]);
                }
            }
            println!(
                "  [compile run {run}/{runs}] shape {s}: full compile {:.2} s, peak {} MB; pod change {:.2} s ({} nodes, {} entries, {} bytes); policy change {:.2} s ({} nodes, {} entries, {} bytes) [{:.0?} in all]",
                v["full_seconds"].as_f64().unwrap_or(f64::NAN),
                v["full_peak_mb"],
                v["pod_change"]["seconds"].as_f64().unwrap_or(f64::NAN),
                v["pod_change"]["nodes"],
                v["pod_change"]["entries"],
                v["pod_change"]["bytes"],
                v["policy_change"]["seconds"].as_f64().unwrap_or(f64::NAN),
                v["policy_change"]["nodes"],
                v["policy_change"]["entries"],
                v["policy_change"]["bytes"],
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
            "Compiler threads: {} (one per core, at most 8). Peak RSS includes the cluster store. An incremental change is a full recompile plus a diff of every node's state, as the controller does it today.",
            std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
        ),
    );
    Ok(())
}

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

    let key = PodKey::new(Shape::CHANGED_NAMESPACE, Shape::CHANGED_POD);
    let mut pod = cluster
        .pod(&key)
        .with_context(|| format!("shape {} has no pod {key}", shape.name()))?
        .clone();
    let (k, v) = shape.relabel();
    pod.labels.insert(k.to_owned(), v.to_owned());
    cluster.upsert_pod_info(pod);
    let ((second, pod_change), pod_time) = timed(|| {
        let next = compiler.compile_all(&cluster);
        let change = diff_all(&first, &next);
        (next, change)
    });
    drop(first);

    for np in shape.policies(Shape::CHANGED_NAMESPACE, true)? {
        cluster.upsert_policy(&np)?;
    }
    let ((_, policy_change), policy_time) = timed(|| {
        let next = compiler.compile_all(&cluster);
        let change = diff_all(&second, &next);
        (next, change)
    });
    let out = json!({
        "shape": shape.name(),
        "pods": cluster.pods().count(),
        "policies": cluster.policies().count(),
        "cluster_policies": cluster.cluster_policies().count(),
        "store_mb": store_mb,
        "full_seconds": full.as_secs_f64(),
        "full_peak_mb": full_peak_mb,
        "pod_change": pod_change.to_json(pod_time),
        "policy_change": policy_change.to_json(policy_time),
    });
    println!("{out}");
    Ok(())
}

#[derive(Default)]
struct Change {
    nodes: usize,
    entries: usize,
    bytes: usize,
}

impl Change {
    fn to_json(&self, t: Duration) -> Value {
        json!({
            "seconds": t.as_secs_f64(),
            "nodes": self.nodes,
            "entries": self.entries,
            "bytes": self.bytes,
        })
    }
}

/// The diffs the controller would send: one per node whose state changed.
fn diff_all(old: &CompileOutput, new: &CompileOutput) -> Change {
    let mut c = Change::default();
    let empty = weir_api::NodeState::default();
    for (node, state) in &new.nodes {
        let before = old.nodes.get(node).unwrap_or(&empty);
        if before == state {
            continue;
        }
        let diff = before.diff(state, 1, 2);
        c.nodes += 1;
        c.entries += diff.len();
        c.bytes += prost::Message::encoded_len(&weir_transport::pb::NodeStateDiff::from(&diff));
    }
    c
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
