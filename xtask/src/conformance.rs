//! `cargo xtask conformance`: runs a reachability case file on a fresh local cluster.

use std::path::PathBuf;

use anyhow::{Context, Result};
use weir_conformance::{CaseFile, Families, RunOptions, cases::Topology as CaseTopology, runner};
use weir_localcluster::{ClusterOptions, IpFamily, Runtime, Topology, conformance::ClusterDriver};

pub struct Args {
    pub cases: PathBuf,
    pub nodes: Option<usize>,
    pub topology: Option<Topology>,
    /// How the cluster creates pods.
    pub runtime: Runtime,
    pub verbose: bool,
    pub filter: Option<String>,
    pub json: Option<PathBuf>,
    /// Cases with these tags are reported skipped.
    pub skip_tags: Vec<String>,
    /// The pods' address families; under `dual` every case runs once per family.
    pub ip_family: IpFamily,
    /// The nodes reach each other over IPv6 (and have IPv6 addresses node ports are
    /// probed on).
    pub ipv6_underlay: bool,
}

/// Returns whether every case passed.
pub async fn run(bin: PathBuf, args: Args) -> Result<bool> {
    let mut file =
        CaseFile::load(&args.cases).with_context(|| format!("loading {}", args.cases.display()))?;
    if let Some(n) = args.nodes {
        file.model.nodes = Some(n as u32);
    }
    if let Some(t) = args.topology {
        file.model.topology = Some(match t {
            Topology::L2 => CaseTopology::L2,
            Topology::Routed => CaseTopology::Routed,
        });
    }
    if let Some(filter) = &args.filter
        && !file.cases.iter().any(|c| c.name.contains(filter.as_str()))
    {
        anyhow::bail!(
            "--case {filter:?} matches no case in {}: nothing would run",
            args.cases.display()
        );
    }
    let nodes = file.model.nodes.unwrap_or(1);
    let topology = file.model.topology.unwrap_or(CaseTopology::L2);
    println!(
        "Conformance: {} ({} cases) on {nodes} node(s), {topology:?} topology, runtime {}, {}",
        args.cases.display(),
        file.cases.len(),
        args.runtime,
        match args.ip_family {
            IpFamily::Ipv4 => "IPv4",
            IpFamily::Ipv6 => "IPv6",
            IpFamily::Dual => "dual-stack (every case once per family)",
        }
    );
    if args.ipv6_underlay {
        println!("The nodes' underlay is IPv6.");
    }
    let started = std::time::Instant::now();
    let mut opts = ClusterOptions::new(bin);
    opts.runtime = args.runtime;
    opts.ip_family = args.ip_family;
    opts.ipv6_underlay = args.ipv6_underlay;
    // Every change the cases make is also compiled from scratch and compared.
    opts.check_incremental_compiles = true;
    let mut driver = ClusterDriver::start(&file.model, opts).await?;
    println!("Cluster ready in {:.1?}.", started.elapsed());
    let opts = RunOptions {
        verbose: args.verbose,
        case_filter: args.filter,
        skip_tags: args.skip_tags,
        families: match args.ip_family {
            IpFamily::Ipv4 => Families::Ipv4,
            IpFamily::Ipv6 => Families::Ipv6,
            IpFamily::Dual => Families::Dual,
        },
        ..RunOptions::default()
    };
    let mut out = std::io::stdout();
    let summary = runner::run(&file, &mut driver, &opts, &mut out).await;
    driver.shutdown();
    let summary = summary?;
    if let Some(path) = args.json {
        std::fs::write(&path, summary.to_json())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("(total {:.1?})", started.elapsed());
    Ok(summary.success())
}
