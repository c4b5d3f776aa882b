//! Runs the selected sections in order, printing each section's table as soon as it is done,
//! then the goals, then (with `--json`) the whole report.

use anyhow::{Context as _, Result, bail};
use serde_json::json;

use super::{
    Args, Section, compile, datapath, fanout, flood, propagation,
    report::{self, Report},
    services,
    synthetic::Shape,
    verdict,
};

pub fn run(args: Args) -> Result<()> {
    let quick = args.quick;
    let runs = args.runs.unwrap_or(if quick { 3 } else { 5 }).max(1);
    let all = [
        Section::Verdict,
        Section::Compile,
        Section::Datapath,
        Section::Propagation,
        Section::Fanout,
        Section::Services,
        Section::Flood,
    ];
    let sections: Vec<Section> = all
        .into_iter()
        .filter(|s| args.only.is_empty() || args.only.contains(s))
        .collect();
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmarks need root (BPF_PROG_TEST_RUN, network namespaces)");
    }
    let command = format!(
        "cargo xtask bench{}",
        std::env::args()
            .skip(2)
            .map(|a| format!(" {a}"))
            .collect::<String>()
    );
    let machine = report::machine();
    println!("# weir benchmarks\n\n`{command}`\n");
    print!("{}", report::machine_markdown(&machine));
    println!(
        "* {} runs per figure, interleaved{}\n",
        runs,
        if quick { "; quick set" } else { "" }
    );
    let started = std::time::Instant::now();
    let mut report = Report::default();
    let mut failures = Vec::new();
    let mut fail = |section: &str, e: anyhow::Error, report: &mut Report| {
        let text = format!("section {section} failed: {e:#}");
        eprintln!("error: {text}");
        report.skip(text.clone());
        failures.push(text);
    };

    if sections.contains(&Section::Verdict) {
        println!("## Per-packet verdict cost (BPF_PROG_TEST_RUN)\n");
        if let Err(e) = verdict::run(&mut report, &verdict::Settings::new(quick, runs)) {
            fail("verdict", e, &mut report);
        }
        print_section(&report, "verdict");
    }
    if sections.contains(&Section::Compile) {
        println!("## Control plane: compile time and memory\n");
        let compile_runs = if quick { 1 } else { runs.min(3) };
        if let Err(e) = compile::run(&mut report, &Shape::ALL, compile_runs) {
            fail("compile", e, &mut report);
        }
        print_section(&report, "compile");
    }
    if sections.contains(&Section::Fanout) {
        println!("## Control plane: one change reaching every agent\n");
        let fanout_runs = if quick { 1 } else { runs.min(3) };
        if let Err(e) = fanout::run(&mut report, &fanout::AGENTS, fanout_runs) {
            fail("fanout", e, &mut report);
        }
        print_section(&report, "fanout");
    }
    let want_datapath = sections.contains(&Section::Datapath);
    let want_propagation = sections.contains(&Section::Propagation);
    if want_datapath || want_propagation {
        let rt = crate::runtime();
        let mut dp_settings = datapath::Settings::new(quick, runs);
        dp_settings.cross |= args.cross_node;
        println!("## Data path: setting up networks\n");
        let bin_dir = crate::target_dir().join("release");
        match datapath::Networks::up(&rt, bin_dir, &dp_settings, want_datapath) {
            Ok(mut nets) => {
                if want_datapath {
                    println!("\n## Data path: throughput, latency, connection rate\n");
                    if let Err(e) = datapath::run(&mut report, &mut nets, &dp_settings) {
                        fail("datapath", e, &mut report);
                    }
                    for (title, section) in [
                        ("weir's control plane while idle", "idle"),
                        ("Throughput", "throughput"),
                        ("Request/response", "latency"),
                        ("New connections", "connections"),
                    ] {
                        println!("### {title}\n");
                        print_section(&report, section);
                    }
                }
                if want_propagation {
                    println!("## Policy propagation\n");
                    let settings = propagation::Settings::new(quick);
                    if let Err(e) = propagation::run(&mut report, &rt, &mut nets.weir, &settings) {
                        fail("propagation", e, &mut report);
                    }
                    print_section(&report, "propagation");
                }
                println!("Tearing the networks down.");
                drop(nets);
            }
            Err(e) => fail(
                "datapath",
                e.context("setting up the networks"),
                &mut report,
            ),
        }
    }
    if sections.contains(&Section::Services) {
        let rt = crate::runtime();
        let settings = services::Settings::new(quick, runs);
        println!("## Services: setting up networks\n");
        let bin_dir = crate::target_dir().join("release");
        match services::ServiceNetworks::up(&rt, bin_dir, &settings) {
            Ok(mut nets) => {
                println!("\n## Services: ClusterIP vs. pod IP, weir vs. kube-proxy\n");
                if let Err(e) = services::run(&mut report, &mut nets, &settings) {
                    fail("services", e, &mut report);
                }
                print_section(&report, services::SECTION);
                println!("Tearing the networks down.");
                drop(nets);
            }
            Err(e) => fail(
                "services",
                e.context("setting up the networks"),
                &mut report,
            ),
        }
    }
    if sections.contains(&Section::Flood) {
        let settings = flood::Settings::new(quick, runs);
        println!("## Flood: setting up networks\n");
        match flood::FloodNetworks::up(&settings) {
            Ok(mut nets) => {
                println!("\n## Flood from denied sources: XDP vs. TC vs. nftables\n");
                if let Err(e) = flood::run(&mut report, &mut nets, &settings) {
                    fail("flood", e, &mut report);
                }
                print_section(&report, flood::SECTION);
                println!("Tearing the networks down.");
                drop(nets);
            }
            Err(e) => fail("flood", e.context("setting up the networks"), &mut report),
        }
    }
    println!("## Goals\n");
    println!("{}", report.goals_table());
    if !report.skipped.is_empty() {
        println!("Not measured:");
        for s in &report.skipped {
            println!("* {s}");
        }
        println!();
    }
    println!("(total {:.0?})", started.elapsed());
    if let Some(path) = &args.json {
        let settings = json!({"quick": quick, "runs": runs});
        let v = report.to_json(&machine, &command, settings);
        std::fs::write(path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("Wrote {}", path.display());
    }
    if !failures.is_empty() {
        bail!(
            "{} section(s) failed: {}",
            failures.len(),
            failures.join("; ")
        );
    }
    Ok(())
}

fn print_section(report: &Report, section: &str) {
    let table = report.section_table(section);
    if table.is_empty() {
        println!("(no figures)\n");
    } else {
        println!("{table}");
    }
}

/// `xtask bench-child <kind> …`.
/// The JSON line a benchmark child printed last (`what` names the child in errors).
pub fn child_json(out: &std::process::Output, what: &str) -> Result<serde_json::Value> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .last()
        .with_context(|| format!("{what} printed nothing"))?;
    serde_json::from_str(line).with_context(|| format!("{what} printed {line:?}"))
}

pub fn child(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("compile") => compile::child(&args[1..]),
        Some("fanout") => fanout::child(&args[1..]),
        other => bail!("unknown benchmark child {other:?}"),
    }
}
