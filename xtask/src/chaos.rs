//! `cargo xtask chaos`: the fault scenarios of the tests, run longer on fresh local clusters
//! in both topologies; prints the figures and writes them to docs/reliability.md.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use weir_localcluster::{ClusterOptions, LocalCluster, Topology, chaos};

#[derive(Parser, Debug)]
pub struct Args {
    /// Agents to kill per topology, and controller kills (a policy change each).
    #[arg(long, default_value_t = 20)]
    pub kills: usize,
    /// CNI ADD/DEL cycles on one node, with an agent restart every tenth.
    #[arg(long, default_value_t = 1000)]
    pub cycles: usize,
    /// Where to write the figures (relative to the workspace); `-` writes nothing.
    #[arg(long, default_value = "docs/reliability.md")]
    pub output: String,
}

async fn cluster(bin: &std::path::Path, topology: Topology) -> Result<LocalCluster> {
    let mut opts = ClusterOptions::new(bin.to_path_buf());
    opts.nodes = 2;
    opts.topology = topology;
    LocalCluster::up(opts).await
}

pub async fn run(bin: PathBuf, args: Args) -> Result<()> {
    let mut rows = Vec::new();
    let mut controller_rows = Vec::new();
    let mut failed = Vec::new();
    for topology in [Topology::L2, Topology::Routed] {
        println!(
            "Agent kills on two nodes ({topology}): {} kills under traffic...",
            args.kills
        );
        let mut c = cluster(&bin, topology).await?;
        let report = chaos::agent_kills(&mut c, args.kills).await;
        c.down();
        let report = report.with_context(|| format!("agent kills ({topology})"))?;
        println!("  {report}");
        if report.denied_admitted > 0
            || report.stream_broke
            || report.allowed_refused > 0
            || report.udp_lost > 0
        {
            failed.push(format!("agent kills ({topology})"));
        }
        rows.push((topology, report));

        println!(
            "Controller kills on two nodes ({topology}): {} kills, a policy change each...",
            args.kills
        );
        let mut c = cluster(&bin, topology).await?;
        let report = chaos::controller_kills(&mut c, args.kills).await;
        c.down();
        let report = report.with_context(|| format!("controller kills ({topology})"))?;
        println!("  {report}");
        if report.denied_admitted > 0
            || report.kept_failures > 0
            || report.stream_broke
            || report.udp_lost > 0
        {
            failed.push(format!("controller kills ({topology})"));
        }
        controller_rows.push((topology, report));
    }
    println!(
        "CNI ADD/DEL on one node: {} cycles, an agent restart every 10...",
        args.cycles
    );
    let mut opts = ClusterOptions::new(bin.clone());
    opts.nodes = 1;
    let mut c = LocalCluster::up(opts).await?;
    let cycles = chaos::cni_cycles(&mut c, args.cycles, 10).await;
    c.down();
    let cycles = cycles.context("CNI cycles")?;
    println!("  {cycles}");
    if cycles.leaked_addresses != 0
        || cycles.leaked_veths != 0
        || cycles.leaked_endpoint_records != 0
        || cycles.leaked_dataplane_endpoints != 0
    {
        failed.push("CNI cycles".to_string());
    }
    if args.output != "-" {
        let path = crate::workspace_root().join(&args.output);
        std::fs::write(&path, document(&rows, &controller_rows, &cycles))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("Wrote {}", path.display());
    }
    anyhow::ensure!(
        failed.is_empty(),
        "faults let traffic through that policy denies, or broke what it allows, in: {}",
        failed.join(", ")
    );
    Ok(())
}

fn document(
    rows: &[(Topology, chaos::AgentKillReport)],
    controller_rows: &[(Topology, chaos::ControllerKillReport)],
    cycles: &chaos::CniCycleReport,
) -> String {
    let mut d = String::from(
        "# Reliability\n\n\
         Figures from `cargo xtask chaos` (fresh local clusters of two nodes, one per\n\
         topology). `cargo xtask test` runs the same scenarios, shorter, as tests.\n\n\
         ## Agents killed under traffic\n\n\
         An agent is killed with SIGKILL, alternately on the server's node and on the\n\
         clients' node, and started again after a pause of 100 to 500 ms. Meanwhile a client\n\
         pod keeps a TCP stream (1 KiB every 2 ms) and a UDP exchange (a datagram every 5 ms,\n\
         echoed) open to a server pod on the other node; both pods are isolated (the server\n\
         admits the client on three ports, the client may send only to the server). During\n\
         every outage and restart, and right after it, new connections are attempted: the\n\
         client to an admitted port (policy allows), another pod to it and the client to a\n\
         port not admitted (policy denies).\n\n\
         | topology | kills | restart to ready (median / max) | TCP stream | longest stall | UDP lost | allowed refused | denied admitted |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for (t, r) in rows {
        let _ = writeln!(
            d,
            "| {t} | {} | {} / {} ms | {} | {} ms | {} of {} | {} of {} | {} of {} |",
            r.kills,
            r.restart_ms.0,
            r.restart_ms.1,
            if r.stream_broke { "broke" } else { "kept" },
            r.stream_longest_stall_ms,
            r.udp_lost,
            r.udp_sent,
            r.allowed_refused,
            r.allowed_attempts,
            r.denied_admitted,
            r.denied_attempts,
        );
    }
    d.push_str(
        "\n## Controller killed while policies change\n\n\
         The same pods and traffic. The controller is killed; while it is away the server's\n\
         policy moves the client's admission from one port to another; twice, agents must\n\
         still enforce the old state (old port open, new one closed). The controller starts\n\
         again, and the change must reach every agent. All along, a pod the policy does not\n\
         admit knocks on both ports.\n\n\
         | topology | kills | last state kept | converged after restart (median / max) | unselected pod admitted | TCP stream | UDP lost |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for (t, r) in controller_rows {
        let _ = writeln!(
            d,
            "| {t} | {} | {} of {} checks | {} / {} ms | {} of {} | {} | {} of {} |",
            r.kills,
            r.kept_checks - r.kept_failures,
            r.kept_checks,
            r.converge_ms.0,
            r.converge_ms.1,
            r.denied_admitted,
            r.denied_attempts,
            if r.stream_broke { "broke" } else { "kept" },
            r.udp_lost,
            r.udp_sent,
        );
    }
    let _ = write!(
        d,
        "\n## Pods coming and going across agent restarts\n\n\
         {} pods added and deleted one after the other on one node through the CNI plugin, the\n\
         agent killed every tenth ({} restarts, half of them while the pod was up). Left over\n\
         afterwards, against the node before the run:\n\n\
         | address allocations | host veths | endpoint records | dataplane endpoints |\n\
         |---|---|---|---|\n\
         | {} | {} | {} | {} |\n",
        cycles.cycles,
        cycles.agent_restarts,
        cycles.leaked_addresses,
        cycles.leaked_veths,
        cycles.leaked_endpoint_records,
        cycles.leaked_dataplane_endpoints,
    );
    d.push_str(
        "\nThe dataplane's programs and maps are pinned: while no agent runs, the node keeps\n\
         routing and enforcing the last state it had, and a new agent takes the programs over\n\
         without detaching them ([architecture](architecture.md)); an agent whose controller\n\
         is away keeps the last state it applied and takes the controller's snapshot when it\n\
         returns.\n",
    );
    d
}
