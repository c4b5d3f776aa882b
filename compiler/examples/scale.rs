//! Builds a synthetic cluster and measures a full compile, a recompile of the unchanged
//! cluster, and the diffs a one-pod label change causes.
//!
//! ```text
//! cargo run --release -p weir-compiler --features synthetic --example scale -- a   # 5k nodes, 150k pods, 10k policies
//! cargo run --release -p weir-compiler --features synthetic --example scale -- b   # 25k namespaces, 100k pods, 75k policies
//! cargo run --release -p weir-compiler --features synthetic --example scale -- b-cnp   # b + 1k ClusterNetworkPolicies
//! ```
//!
//! Optional second argument: number of compile threads (default: all cores). With
//! `SCALE_HEAP=1` the live heap is counted too (cluster store, compiler memory, output), at
//! some cost in speed. With `SCALE_DIGEST=1` a digest of the full compile's output is printed,
//! so that a change to the compiler can be checked to give the same state on every node.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use weir_compiler::{CompileOutput, Compiler, synthetic::Shape};

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
    let mut rules = 0usize;
    let mut listed = 0usize;
    for s in out.nodes.values() {
        rules += s.rules.len();
        listed += s
            .rule_sets
            .values()
            .map(|r| r.policies.len())
            .sum::<usize>();
        classes += s.peer_classes.len();
        max_classes = max_classes.max(s.peer_classes.len());
        verdicts += s.verdicts.len();
        max_verdicts = max_verdicts.max(s.verdicts.len());
        rule_sets += s.rule_sets.len();
    }
    format!(
        "{} nodes; peer_classes entries {classes} (max/node {max_classes}); verdicts {verdicts} (max/node {max_verdicts}); rule sets {rule_sets} (listing {listed} policies); rules {rules}",
        out.nodes.len()
    )
}

/// Feeds formatted text into a hasher.
struct HashWriter<'h>(&'h mut std::hash::DefaultHasher);

impl std::fmt::Write for HashWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        std::hash::Hasher::write(self.0, s.as_bytes());
        Ok(())
    }
}

/// A digest of every node's state (its debug form, which lists every table in order).
fn digest(out: &CompileOutput) -> u64 {
    use std::fmt::Write;
    let mut hasher = std::hash::DefaultHasher::new();
    for (name, state) in &out.nodes {
        let _ = write!(HashWriter(&mut hasher), "{name}{state:?}");
    }
    std::hash::Hasher::finish(&hasher)
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
    let Some(shape) = Shape::parse(which) else {
        eprintln!("unknown shape {which:?}: use a, b or b-cnp");
        std::process::exit(2);
    };
    let (cluster, t_build) = timed(|| shape.build());
    let mut cluster = cluster.expect("the synthetic cluster builds");
    let (rss, _) = rss_mb();
    let heap = if COUNTING.load(Ordering::Relaxed) {
        format!("live heap {} MB", live_mb())
    } else {
        "SCALE_HEAP=1 to count the live heap".to_owned()
    };
    println!(
        "shape {which} ({}): {} pods, {} policies; built in {t_build:.2?}, RSS {rss} MB, {heap}",
        shape.describe(),
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
    if std::env::var_os("SCALE_DIGEST").is_some() {
        println!("  output digest {:016x}", digest(&first));
    }
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
        .pod(&weir_api::PodKey::new(
            Shape::CHANGED_NAMESPACE,
            Shape::CHANGED_POD,
        ))
        .unwrap()
        .clone();
    let (label, value) = shape.relabel();
    p.labels.insert(label.to_owned(), value.to_owned());
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
