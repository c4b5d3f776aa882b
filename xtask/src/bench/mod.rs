//! `cargo xtask bench`: weir's benchmarks, with the alternatives a user would otherwise pick
//! measured in the same run on the same machine.
//!
//! Sections (see `docs/benchmarks.md` for what each figure means and how it is measured):
//! * `verdict`: per-packet cost of the real TC programs and maps under `BPF_PROG_TEST_RUN`,
//!   for growing numbers of policies and peer pods (baseline: the same programs, no policy),
//!   and with 1k ClusterNetworkPolicies added (baseline: the same NetworkPolicies alone);
//! * `datapath`: pod-to-pod TCP throughput (iperf3), request/response rate and latency, and
//!   new connections per second, through weir, through iptables, ipset and nftables rule sets
//!   of the same size, and through plain routed veths (the baseline); over IPv4, and over
//!   IPv6 through weir (the same dual-stack clusters) against plain IPv6 routing;
//! * `compile`: full compile time and peak memory of the controller for large synthetic
//!   clusters (the Antrea shape also with 1k ClusterNetworkPolicies), and the cost of one
//!   pod label change and one policy change;
//! * `propagation`: how long a policy takes from the manifest write to being enforced;
//! * `fanout`: one policy change reaching 10, 100 and 1,000 simulated agents (the real
//!   controller and protocol over mTLS, agents that only receive);
//! * `services`: new connections per second and request/response latency through a
//!   ClusterIP against the backend's pod IP, with 10 and 10k Services, through weir and
//!   through kube-proxy's iptables and nftables modes;
//! * `flood`: a flood of UDP from denied sources into a node (sent by an XDP program in
//!   `BPF_PROG_TEST_RUN` live-frames mode), dropped by weir's XDP prefilter, by the same
//!   lookup in a TC classifier, by nftables on the netdev ingress hook and in the inet input
//!   chain, with 10 and 100k denied prefixes: packets dropped per second and per core of
//!   receive CPU (baseline: the best non-XDP method), and benign TCP throughput through the
//!   node with and without the flood.
//!
//! These are benchmarks, not timed tests: they print figures and never fail on a slow machine.
//! Every figure is the median of several runs, interleaved across the configurations it is
//! compared with (A B C A B C …), so that slow drifts of a shared machine hit all alike.
//!
//! The figures only mean something for optimised code, so `cargo xtask bench` builds xtask
//! (with the `bench` feature) and weir's binaries in release mode and re-executes itself.

use std::path::PathBuf;

use anyhow::Result;

#[cfg(feature = "bench")]
mod compile;
#[cfg(feature = "bench")]
mod datapath;
#[cfg(feature = "bench")]
mod fanout;
#[cfg(feature = "bench")]
mod flood;
#[cfg(feature = "bench")]
mod harness;
#[cfg(feature = "bench")]
mod propagation;
#[cfg(feature = "bench")]
mod rawbpf;
#[cfg(feature = "bench")]
mod report;
#[cfg(feature = "bench")]
mod services;
#[cfg(feature = "bench")]
mod synthetic;
#[cfg(feature = "bench")]
mod topology;
#[cfg(feature = "bench")]
mod traffic;
#[cfg(feature = "bench")]
mod verdict;

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// A reduced set that completes in a few minutes (fewer configurations, shorter runs).
    #[arg(long)]
    pub quick: bool,
    /// Also write every figure, with its runs, as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Runs per figure (default: 3 with --quick, 5 otherwise).
    #[arg(long)]
    pub runs: Option<usize>,
    /// Also measure between pods on different nodes with --quick (the full set always does).
    #[arg(long)]
    pub cross_node: bool,
    /// Only these sections (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<Section>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// Per-packet verdict cost under BPF_PROG_TEST_RUN.
    Verdict,
    /// Throughput, request/response latency and connection rate between pods, IPv4 and IPv6.
    Datapath,
    /// Controller compile time, memory and incremental cost at scale.
    Compile,
    /// Policy apply → enforced latency in the local cluster.
    Propagation,
    /// One policy change reaching 10, 100 and 1,000 simulated agents over mTLS.
    Fanout,
    /// Connection rate and latency through a ClusterIP vs. the pod IP, 10 and 10k Services,
    /// weir vs. kube-proxy's iptables and nftables modes.
    Services,
    /// A flood from denied sources dropped by weir's XDP prefilter, the same lookup in TC,
    /// nftables netdev ingress and inet input; benign TCP during the flood.
    Flood,
}

/// Set in the environment of the re-executed release build, so that a build without the
/// `bench` feature fails instead of re-executing itself forever.
const RELAUNCHED: &str = "WEIR_BENCH_RELAUNCHED";

pub fn run(args: Args) -> Result<()> {
    #[cfg(feature = "bench")]
    if !cfg!(debug_assertions) {
        return harness::run(args);
    }
    let _ = args;
    relaunch_in_release()
}

/// `xtask bench-child …`: one measurement in a process of its own.
pub fn child(args: &[String]) -> Result<()> {
    #[cfg(feature = "bench")]
    {
        harness::child(args)
    }
    #[cfg(not(feature = "bench"))]
    {
        anyhow::bail!("bench-child {args:?}: this xtask was built without the `bench` feature")
    }
}

/// Builds xtask (with the harness) and weir's binaries in release mode, then replaces this
/// process with the release xtask, same arguments.
fn relaunch_in_release() -> Result<()> {
    use std::os::unix::process::CommandExt as _;

    use anyhow::{Context as _, bail};

    if std::env::var_os(RELAUNCHED).is_some() {
        bail!("the release build of xtask was built without the `bench` feature");
    }
    // Before minutes of release builds, not after.
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmarks need root (BPF_PROG_TEST_RUN, network namespaces)");
    }
    let mut build = crate::cargo();
    build.args([
        "build",
        "--release",
        "--bins",
        "--features",
        "xtask/bench",
        "-p",
        "xtask",
    ]);
    for p in crate::BIN_PACKAGES {
        build.args(["-p", p]);
    }
    crate::status(&mut build)?;
    let exe = crate::target_dir().join("release").join("xtask");
    let err = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env(RELAUNCHED, "1")
        .exec();
    Err(err).with_context(|| format!("executing {}", exe.display()))
}
