//! `cargo xtask conformance`: runs a reachability case file on a fresh local cluster.

use std::path::PathBuf;

use anyhow::{Context, Result};
use weir_conformance::{CaseFile, RunOptions, cases::Topology as CaseTopology, runner};
use weir_localcluster::{ClusterOptions, Runtime, Topology, conformance::ClusterDriver};

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
        "Conformance: {} ({} cases) on {nodes} node(s), {topology:?} topology, runtime {}",
        args.cases.display(),
        file.cases.len(),
        args.runtime
    );
    let started = std::time::Instant::now();
    let mut opts = ClusterOptions::new(bin);
    opts.runtime = args.runtime;
    let mut driver = ClusterDriver::start(&file.model, opts).await?;
    println!("Cluster ready in {:.1?}.", started.elapsed());
    let opts = RunOptions {
        verbose: args.verbose,
        case_filter: args.filter,
        skip_tags: args.skip_tags,
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
