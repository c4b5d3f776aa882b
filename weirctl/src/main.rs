//! `weirctl` (also `kubectl weir` when installed as `kubectl-weir`): status, flows, traces
//! and policy listings of a weir cluster. Exit status: 0 healthy / allowed, 1 unhealthy /
//! denied, 2 when weirctl could not answer.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use weirctl::{
    flows::{self, Filter, Proto, Seen},
    live, playground, policy, status,
    target::{KubeTarget, LocalRun, Target, pods_by_ip},
    trace::{self, Request, Spec, SpecPort},
};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "weir's command line: status, flows, traces and policies of a weir cluster"
)]
struct Cli {
    /// A local cluster's run (its id, or its directory) instead of the newest one.
    #[arg(long, global = true)]
    run: Option<String>,
    /// Work on a Kubernetes cluster through this kubeconfig.
    #[arg(long, global = true, env = "WEIRCTL_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Work on a Kubernetes cluster with the default configuration (KUBECONFIG, ~/.kube/config
    /// or in-cluster). The default when installed as kubectl-weir.
    #[arg(long, global = true)]
    kube: bool,
    /// Namespace of weir's agents and controller (Kubernetes).
    #[arg(long, global = true, default_value = "weir-system")]
    weir_namespace: String,
    /// Directory holding the local clusters' run records.
    #[arg(long, global = true, default_value = weir_localcluster::record::RUNS_DIR, hide = true)]
    runs_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
enum Output {
    #[default]
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Per node: agent ready, state version applied and published, table fill, drops; the
    /// controller's readiness, leadership and compile time. Exits 1 when unhealthy.
    Status {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Recent flow events of every node, merged in time order, with pod names.
    Flows {
        #[command(flatten)]
        filter: Filter,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
        /// Keep printing new events.
        #[arg(short, long)]
        follow: bool,
        /// Counts per source workload, destination workload, port, verdict and policy.
        #[arg(long, conflicts_with = "follow")]
        aggregate: bool,
        /// Events asked from each agent.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// What the dataplane decides for one packet, step by step from the node's tables. Exits
    /// 0 when allowed, 1 when denied.
    Trace {
        /// Source: namespace/pod or an IP address.
        #[arg(long)]
        from: Spec,
        /// Destination: namespace/pod or an IP address, optionally with :port.
        #[arg(long)]
        to: SpecPort,
        /// tcp, udp, sctp, icmp, icmpv6 or a number.
        #[arg(long, default_value = "tcp")]
        protocol: Proto,
        /// Destination port (or give it with --to).
        #[arg(long)]
        port: Option<u16>,
        /// Answer offline: compile this directory of manifests with the controller's
        /// compiler instead of asking a cluster.
        #[arg(long)]
        manifests: Option<PathBuf>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// The policies selecting a pod in each direction, and the effective rules of their union.
    Policy {
        /// namespace/pod
        pod: String,
        /// Compile this directory of manifests instead of asking a cluster.
        #[arg(long)]
        manifests: Option<PathBuf>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weirctl: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn invoked_as_kubectl_plugin() -> bool {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .is_some_and(|n| n.starts_with("kubectl-weir"))
}

async fn target(cli: &Cli) -> Result<Target> {
    if cli.kubeconfig.is_some() || cli.kube || (invoked_as_kubectl_plugin() && cli.run.is_none()) {
        return Ok(Target::Kube(
            KubeTarget::connect(cli.kubeconfig.as_deref(), &cli.weir_namespace).await?,
        ));
    }
    Ok(Target::Local(LocalRun::find(
        &cli.runs_dir,
        cli.run.as_deref(),
    )?))
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serialises"));
}

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Status { output } => {
            let target = target(&cli).await?;
            let s = status::gather(&target).await;
            match output {
                Output::Text => print!("{}", status::render(&s)),
                Output::Json => print_json(&s),
            }
            Ok(exit(s.problems.is_empty()))
        }
        Command::Flows {
            filter,
            output,
            follow,
            aggregate,
            limit,
        } => {
            let target = target(&cli).await?;
            let pods = pods_by_ip(&target.pods().await?);
            let show = |f: &flows::Flow| match output {
                Output::Text => println!("{}", flows::render_line(f)),
                Output::Json => println!("{}", serde_json::to_string(f).expect("serialises")),
            };
            let batch: Vec<flows::Flow> = flows::fetch(&target, *limit, &pods)
                .await?
                .into_iter()
                .filter(|f| filter.matches(f))
                .collect();
            if *aggregate {
                print!(
                    "{}",
                    flows::render_aggregate(&flows::aggregate(&batch), *output == Output::Json)
                );
                return Ok(ExitCode::SUCCESS);
            }
            let mut seen = Seen::default();
            for f in seen.fresh(batch) {
                show(&f);
            }
            if !*follow {
                return Ok(ExitCode::SUCCESS);
            }
            loop {
                use std::io::Write as _;
                let _ = std::io::stdout().flush();
                tokio::time::sleep(Duration::from_millis(500)).await;
                // New pods get names as they appear.
                let pods = pods_by_ip(&target.pods().await.unwrap_or_default());
                match flows::fetch(&target, *limit, &pods).await {
                    Ok(batch) => {
                        for f in seen.fresh(batch).into_iter().filter(|f| filter.matches(f)) {
                            show(&f);
                        }
                    }
                    Err(e) => eprintln!("weirctl: {e:#}"),
                }
            }
        }
        Command::Trace {
            from,
            to,
            protocol,
            port,
            manifests,
            output,
        } => {
            let SpecPort(to, to_port) = to.clone();
            if let (Some(a), Some(b)) = (to_port, port)
                && a != *b
            {
                anyhow::bail!("--to names port {a} and --port {b}");
            }
            let port = to_port.or(*port).unwrap_or(0);
            let mut warnings = Vec::new();
            let (views, pods) = match manifests {
                Some(dir) => {
                    let p = playground::compile(dir)?;
                    warnings.extend(p.diagnostics);
                    (p.views, p.pods)
                }
                None => {
                    let target = target(&cli).await?;
                    let pods = target.pods().await?;
                    (live::views(&target, &pods, &mut warnings).await?, pods)
                }
            };
            for w in &warnings {
                eprintln!("weirctl: {w}");
            }
            let req = Request {
                from: from.clone(),
                to,
                proto: protocol.0,
                port,
            };
            let t = trace::trace(&views, &pods, &req)?;
            match output {
                Output::Text => print!("{}", trace::render(&t)),
                Output::Json => print_json(&t),
            }
            Ok(exit(t.allowed))
        }
        Command::Policy {
            pod,
            manifests,
            output,
        } => {
            let key = match pod.parse::<Spec>() {
                Ok(Spec::Pod(k)) => k,
                _ => anyhow::bail!("{pod:?}: expected namespace/pod"),
            };
            let mut warnings = Vec::new();
            let (views, pods) = match manifests {
                Some(dir) => {
                    let p = playground::compile(dir)?;
                    warnings.extend(p.diagnostics);
                    (p.views, p.pods)
                }
                None => {
                    let target = target(&cli).await?;
                    let pods = target.pods().await?;
                    (live::views(&target, &pods, &mut warnings).await?, pods)
                }
            };
            for w in &warnings {
                eprintln!("weirctl: {w}");
            }
            let r = policy::report(&views, &pods, &key).context("listing policies")?;
            match output {
                Output::Text => print!("{}", policy::render(&r)),
                Output::Json => print_json(&r),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
