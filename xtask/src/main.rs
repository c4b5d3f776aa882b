//! `cargo xtask <command>`: the developer and CI entry point.

mod bench;
mod chaos;
mod conformance;
mod demo;
mod image;
mod kind;
mod manifests;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use weir_localcluster::{ClusterOptions, IpFamily, LocalCluster, Runtime, Topology};

#[derive(Parser)]
#[command(about = "weir developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks (packages, nightly rust-src, bpf-linker, bpffs).
    Setup,
    /// Build every binary (the eBPF programs are built by the agent's build script).
    Build,
    /// Start a local cluster in network namespaces and leave it running.
    Up {
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        #[arg(long, default_value = "l2")]
        topology: Topology,
        /// Pods to create on each node.
        #[arg(long, default_value_t = 2)]
        pods_per_node: usize,
        /// direct (the cluster calls the CNI plugin) or containerd (a containerd per node,
        /// pods are containers started through its CRI).
        #[arg(long, default_value = "direct")]
        runtime: Runtime,
        /// The pods' address families: ipv4, ipv6 or dual (the nodes' underlay is IPv4).
        #[arg(long, default_value = "ipv4")]
        ip_family: IpFamily,
        /// Nodes known by IPv6 addresses: VXLAN in IPv6 datagrams (the control plane stays
        /// on IPv4).
        #[arg(long)]
        ipv6_underlay: bool,
    },
    /// Bring up a throwaway local cluster, show which pods reach which, tear it down.
    Demo {
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        #[arg(long, default_value = "l2")]
        topology: Topology,
    },
    /// Run a reachability case file (weir-reachability/v1) on a fresh local cluster.
    Conformance {
        #[arg(long)]
        cases: PathBuf,
        /// Spread the pods over this many nodes (overrides the file's model).
        #[arg(long)]
        nodes: Option<usize>,
        /// l2 or routed (overrides the file's model).
        #[arg(long)]
        topology: Option<Topology>,
        /// direct or containerd: how the cluster creates pods.
        #[arg(long, default_value = "direct")]
        runtime: Runtime,
        /// Print every truth table, not only failing ones.
        #[arg(long)]
        verbose: bool,
        /// Run only cases whose name contains this text.
        #[arg(long)]
        case: Option<String>,
        /// Also write the results as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Report cases with this tag as skipped (repeatable).
        #[arg(long = "skip-tag")]
        skip_tags: Vec<String>,
        /// ipv4, ipv6 or dual: the pods' address families. Under dual every case runs
        /// twice, once over IPv4 and once over IPv6.
        #[arg(long, default_value = "ipv4")]
        ip_family: IpFamily,
        /// Nodes with IPv6 addresses on the fabric, reaching each other over IPv6 (VXLAN in
        /// IPv6 datagrams, or routed directly on one segment); node ports are then probed
        /// over IPv6 too.
        #[arg(long)]
        ipv6_underlay: bool,
    },
    /// Tear down every local cluster on this machine (or one run).
    Down {
        #[arg(long)]
        run: Option<String>,
    },
    /// Run every test: setup, build, unit, kernel and end-to-end tests.
    Test,
    /// Fault scenarios (agents killed under traffic) on fresh local clusters in both
    /// topologies; writes the figures to docs/reliability.md.
    Chaos(chaos::Args),
    /// Build the container image without Docker (default target/weir-image.tar, weir:dev).
    Image(image::Args),
    /// Install weir on a new kind cluster and run reachability cases in it (Docker, kind,
    /// kubectl).
    E2eKind(kind::Args),
    /// Benchmarks: per-packet cost, throughput, latency and connection rate against plain
    /// routing and iptables/ipset/nftables, compile time and memory, policy propagation.
    Bench(bench::Args),
    /// One measurement of `bench` in a process of its own (peak memory per measurement).
    #[command(hide = true)]
    BenchChild {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

impl Cmd {
    /// Whether the command builds weir (the agent's build script needs the eBPF toolchain)
    /// or runs a local cluster (bpffs, iproute2): then `setup` runs first, as on a fresh
    /// machine nothing else would install what it needs.
    fn needs_setup(&self) -> bool {
        match self {
            Cmd::Build
            | Cmd::Up { .. }
            | Cmd::Demo { .. }
            | Cmd::Conformance { .. }
            | Cmd::Test
            | Cmd::Chaos(_)
            | Cmd::Image(_)
            | Cmd::E2eKind(_)
            | Cmd::Bench(_) => true,
            // `setup` is itself; `down` must work on a machine whatever state it is in;
            // `bench-child` runs under `bench`, which has set up.
            Cmd::Setup | Cmd::Down { .. } | Cmd::BenchChild { .. } => false,
        }
    }
}

/// The controller's allocator, so that the compile benchmarks measure what it does.
#[cfg(feature = "bench")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let cli = Cli::parse();
    if cli.command.needs_setup() {
        setup::run()?;
    }
    match cli.command {
        Cmd::Setup => setup::run(),
        Cmd::Build => build().map(|_| ()),
        Cmd::Up {
            nodes,
            topology,
            pods_per_node,
            runtime: pods,
            ip_family,
            ipv6_underlay,
        } => up(
            nodes,
            topology,
            pods_per_node,
            pods,
            ip_family,
            ipv6_underlay,
        ),
        Cmd::Demo { nodes, topology } => {
            let bin = build()?;
            runtime().block_on(demo::run(bin, nodes, topology))
        }
        Cmd::Conformance {
            cases,
            nodes,
            topology,
            runtime: pods,
            verbose,
            case,
            json,
            skip_tags,
            ip_family,
            ipv6_underlay,
        } => {
            let bin = build()?;
            let args = conformance::Args {
                cases,
                nodes,
                topology,
                runtime: pods,
                verbose,
                filter: case,
                json,
                skip_tags,
                ip_family,
                ipv6_underlay,
            };
            if !runtime().block_on(conformance::run(bin, args))? {
                bail!("conformance cases failed");
            }
            Ok(())
        }
        Cmd::Down { run } => down(run),
        Cmd::Test => test(),
        Cmd::Chaos(args) => {
            let bin = build()?;
            runtime().block_on(chaos::run(bin, args))
        }
        Cmd::Image(args) => image::run(args),
        Cmd::E2eKind(args) => kind::run(args),
        Cmd::Bench(args) => bench::run(args),
        Cmd::BenchChild { args } => bench::child(&args),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn status(cmd: &mut Command) -> Result<()> {
    let s = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !s.success() {
        bail!("{cmd:?} failed ({s})");
    }
    Ok(())
}

/// Every package but the eBPF one (built for the BPF target by the agent's build script),
/// with every feature (the benchmark harness included).
const WORKSPACE: &[&str] = &["--workspace", "--exclude", "weir-ebpf", "--all-features"];

/// Packages whose binaries make up a weir installation.
const BIN_PACKAGES: &[&str] = &["weir-agent", "weir-cni", "weir-controller"];

/// Builds weir's binaries; returns the directory holding them.
fn build() -> Result<PathBuf> {
    // The same package and feature selection as `test`, so that one build serves both.
    status(cargo().args(["build", "--bins"]).args(WORKSPACE))?;
    for p in BIN_PACKAGES {
        let bin = target_dir().join("debug").join(p);
        if !bin.exists() {
            bail!("{} was not built", bin.display());
        }
    }
    Ok(target_dir().join("debug"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn up(
    nodes: usize,
    topology: Topology,
    pods_per_node: usize,
    pods: Runtime,
    ip_family: IpFamily,
    ipv6_underlay: bool,
) -> Result<()> {
    let bin = build()?;
    runtime().block_on(async {
        let mut opts = ClusterOptions::new(bin);
        opts.nodes = nodes;
        opts.topology = topology;
        opts.runtime = pods;
        opts.ip_family = ip_family;
        opts.ipv6_underlay = ipv6_underlay;
        let mut cluster = LocalCluster::up(opts).await?;
        for n in 0..nodes {
            for p in 0..pods_per_node {
                cluster
                    .add_pod(weir_localcluster::PodSpec {
                        namespace: "default".into(),
                        name: format!("pod-{}-{}", n + 1, p + 1),
                        node: n,
                        labels: [("app".to_string(), format!("demo-{}", p + 1))].into(),
                        ports: vec![],
                        host_ports: vec![],
                    })
                    .await?;
            }
        }
        println!("Local cluster {} is up.", cluster.run_id());
        for node in cluster.nodes() {
            let ips = match node.ip6 {
                Some(ip6) => format!("{ip6},{}", node.ip),
                None => node.ip.to_string(),
            };
            println!(
                "  node {:<12} ip {:<14} namespace {}",
                node.name,
                ips,
                node.netns.name()
            );
        }
        for pod in cluster.pods() {
            let ips: Vec<String> = pod.ips.iter().map(|i| i.to_string()).collect();
            println!(
                "  pod  {:<24} ip {:<14} on {:<12} namespace {}",
                format!("{}/{}", pod.namespace, pod.name),
                ips.join(","),
                pod.node,
                pod.netns.name()
            );
        }
        if let Some(ext) = cluster.external() {
            let ips = std::iter::once(ext.ip.to_string())
                .chain(ext.ip6.map(|ip| ip.to_string()))
                .collect::<Vec<_>>()
                .join(",");
            println!(
                "  external host          ip {ips:<14} namespace {} (outside the cluster, reached through the nodes)",
                ext.netns.name()
            );
        }
        println!("State, logs and manifests: {}", cluster.dir().display());
        println!("Try: ip netns exec <pod namespace> ping <pod ip>. Tear down: cargo xtask down");
        cluster.detach();
        Ok(())
    })
}

fn down(run: Option<String>) -> Result<()> {
    let removed = match run {
        Some(id) => {
            let dir = Path::new(weir_localcluster::record::RUNS_DIR).join(&id);
            let rec = weir_localcluster::record::RunRecord::load(&dir)
                .with_context(|| format!("no local cluster {id}"))?;
            rec.teardown();
            vec![id]
        }
        None => weir_localcluster::cluster::down_all(),
    };
    if removed.is_empty() {
        println!("No local cluster to tear down.");
    } else {
        println!("Tore down: {}", removed.join(", "));
    }
    Ok(())
}

fn test() -> Result<()> {
    let bin = build()?;
    // One test run for the whole workspace: unit, property, kernel (BPF_PROG_TEST_RUN) and
    // end-to-end tests. The e2e tests find the binaries through WEIR_BIN_DIR.
    status(
        cargo()
            .arg("test")
            .args(WORKSPACE)
            .env("WEIR_BIN_DIR", &bin),
    )?;
    // The upstream NetworkPolicy suite on real clusters: one node, several nodes on one L2
    // segment (direct routing), nodes in two subnets (VXLAN). The upstream Service suite on
    // two nodes in both topologies (its placement-dependent cases need exactly two). And
    // the NetworkPolicy suite once more on one node whose pods are containers started by
    // containerd through its CRI, which calls the plugin as on a kubelet node. The
    // network-policy-api ClusterNetworkPolicy suite on one node and on two nodes in both
    // topologies. Then the NetworkPolicy suite on dual-stack clusters (every case once over
    // IPv4 and once over IPv6) of two nodes in both topologies, and on one IPv6-only node;
    // the Service suite on a dual-stack cluster of two nodes on an IPv6 underlay (the nodes
    // then have addresses of both families, so both passes probe node ports; the IPv4 runs
    // above cover the IPv4 underlay).
    let netpol = workspace_root().join("conformance/cases/upstream-netpol.yaml");
    let services = workspace_root().join("conformance/cases/upstream-services.yaml");
    let cnp = workspace_root().join("conformance/cases/upstream-cnp.yaml");
    let (v4, v6, dual) = (IpFamily::Ipv4, IpFamily::Ipv6, IpFamily::Dual);
    let (direct, containerd) = (Runtime::Direct, Runtime::Containerd);
    // (cases, nodes, topology, runtime, families, IPv6 underlay)
    let runs = [
        (&netpol, 1, Topology::L2, direct, v4, false),
        (&netpol, 2, Topology::L2, direct, v4, false),
        (&netpol, 2, Topology::Routed, direct, v4, false),
        (&services, 2, Topology::L2, direct, v4, false),
        (&services, 2, Topology::Routed, direct, v4, false),
        (&netpol, 1, Topology::L2, containerd, v4, false),
        (&cnp, 1, Topology::L2, direct, v4, false),
        (&cnp, 2, Topology::L2, direct, v4, false),
        (&cnp, 2, Topology::Routed, direct, v4, false),
        (&netpol, 2, Topology::L2, direct, dual, false),
        (&netpol, 2, Topology::Routed, direct, dual, false),
        (&netpol, 1, Topology::L2, direct, v6, false),
        (&services, 2, Topology::L2, direct, dual, true),
    ];
    let mut failed = Vec::new();
    for (cases, nodes, topology, pods, ip_family, ipv6_underlay) in runs {
        let args = conformance::Args {
            cases: cases.clone(),
            nodes: Some(nodes),
            topology: Some(topology),
            runtime: pods,
            verbose: false,
            filter: None,
            json: None,
            skip_tags: Vec::new(),
            ip_family,
            ipv6_underlay,
        };
        if !runtime().block_on(conformance::run(bin.clone(), args))? {
            let file = cases.file_name().unwrap_or_default().to_string_lossy();
            let underlay = if ipv6_underlay { ", IPv6 underlay" } else { "" };
            failed.push(format!(
                "{file} on {nodes} node(s), {topology}, runtime {pods}, {ip_family}{underlay}"
            ));
        }
    }
    if !failed.is_empty() {
        bail!("conformance failed on: {}", failed.join("; "));
    }
    println!("All tests passed.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::Cli;

    /// On a fresh clone nothing has run `setup` (CI's `.ci/run` starts from one): every
    /// command the README lists that builds weir or runs a cluster must install the
    /// toolchain itself, `conformance` among them.
    #[test]
    fn commands_that_build_or_run_a_cluster_set_up_first() {
        let needs = |args: &[&str]| {
            let cli = Cli::try_parse_from(std::iter::once("xtask").chain(args.iter().copied()))
                .unwrap_or_else(|e| panic!("{args:?}: {e}"));
            cli.command.needs_setup()
        };
        for args in [
            &[
                "conformance",
                "--cases",
                "conformance/cases/upstream-netpol.yaml",
            ][..],
            &["build"],
            &["up"],
            &["demo"],
            &["test"],
            &["image"],
        ] {
            assert!(needs(args), "{args:?} must run setup first");
        }
        for args in [&["setup"][..], &["down"]] {
            assert!(!needs(args), "{args:?} must not run setup");
        }
    }
}
