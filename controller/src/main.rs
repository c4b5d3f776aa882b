//! `weir-controller`: compiles the cluster's NetworkPolicies into per-node state and streams
//! it to the node agents over mutual TLS.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use clap::Parser;
use tracing::info;
use weir_controller::{
    events::{DiagnosticEvents, run_diagnostic_events},
    http::{CompileMetrics, ControllerEndpoint},
    kube::{
        AgentServing, KubeOptions, KubeTokenReviewer, LeaderEndpointSlice, TokenReviewConfig,
        ca::{CaSource, load_controller_tls},
        cidr_store::{self, CidrStoreConfig},
        run_kube, serve_agents_while_leading,
    },
    leader::{LeaderElector, Leadership, LeaseConfig, unique_identity},
    node_cidrs::{FamilyCidr, FileCidrStore, NodeCidrAllocator},
    run::{Controller, run_directory},
};
use weir_transport::{
    Bootstrap, BootstrapLimits, NodeStateServer, ServerTls, StatePublisher, TlsFiles,
};

#[derive(Parser, Debug)]
#[command(version, about = "weir controller")]
struct Args {
    /// Read cluster objects from this directory of manifests (watched for changes) instead
    /// of the Kubernetes API.
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// Address agents connect to.
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// Directory with ca.crt, tls.crt and tls.key (the controller's serving certificate).
    /// In Kubernetes mode also ca.key; missing files are supplied from --ca-secret (see the
    /// `kube::ca` module documentation).
    #[arg(long, env = "WEIR_TLS_DIR", default_value = "/etc/weir/tls")]
    tls_dir: PathBuf,
    /// With --manifests: write the enforced sync token here (see the manifest source docs).
    #[arg(long)]
    status_file: Option<PathBuf>,
    /// Pods' addresses, at most one CIDR per address family (comma-separated or repeated:
    /// `10.244.0.0/16,fd00:10:244::/56` for dual stack, an IPv6 CIDR alone for IPv6 only);
    /// nodes get a range of each family spec.podCIDRs does not give them.
    #[arg(
        long,
        env = "WEIR_CLUSTER_CIDR",
        value_delimiter = ',',
        default_value = "10.244.0.0/16"
    )]
    cluster_cidr: Vec<ipnet::IpNet>,
    /// Prefix length of each node's IPv4 range.
    #[arg(long, env = "WEIR_NODE_CIDR_MASK", default_value_t = 24)]
    node_cidr_mask: u8,
    /// Prefix length of each node's IPv6 range.
    #[arg(long, env = "WEIR_NODE_CIDR_MASK_IPV6", default_value_t = 64)]
    node_cidr_mask_ipv6: u8,
    /// Where node pod-CIDR assignments are kept (with --manifests).
    #[arg(long, default_value = "/var/lib/weir-controller")]
    state_dir: PathBuf,
    /// Give nodes without spec.podCIDRs a range of --cluster-cidr. Nodes whose spec.podCIDRs
    /// is set (kube-controller-manager --allocate-node-cidrs) keep that range either way.
    #[arg(
        long,
        env = "WEIR_ALLOCATE_NODE_CIDRS",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    allocate_node_cidrs: bool,
    /// Address of the HTTP endpoint: /readyz (the whole cluster compiled once) and /metrics.
    #[arg(long, env = "WEIR_METRICS_ADDR", default_value = "0.0.0.0:9963")]
    metrics_addr: SocketAddr,

    // ---- Kubernetes mode (without --manifests): in-cluster config, or KUBECONFIG.
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "WEIR_LEASE_NAMESPACE", default_value = LeaseConfig::DEFAULT_NAMESPACE)]
    lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "WEIR_LEASE_NAME", default_value = LeaseConfig::DEFAULT_NAME)]
    lease_name: String,
    /// How long followers wait after the Lease last changed before taking it over.
    #[arg(long, env = "WEIR_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// How long the leader keeps trying to renew before it steps down.
    #[arg(long, env = "WEIR_RENEW_DEADLINE", default_value = "10s", value_parser = parse_duration)]
    renew_deadline: Duration,
    /// Interval between leader-election attempts.
    #[arg(long, env = "WEIR_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    retry_period: Duration,
    /// This replica's pod (downward API `metadata.name`): the base of its Lease identity, and
    /// the target named in the leader's EndpointSlice.
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// This replica's namespace (downward API `metadata.namespace`), where the leader writes
    /// the EndpointSlice `weir-controller-leader`.
    #[arg(long, env = "POD_NAMESPACE", default_value = "weir-system")]
    pod_namespace: String,
    /// This replica's address (downward API `status.podIP`). The leader writes it, with the
    /// --listen port, into the EndpointSlice `weir-controller-leader` of --service, so the
    /// agents' Service points at the leader; without an address no slice is written.
    #[arg(long, env = "POD_IP")]
    pod_ip: Option<std::net::IpAddr>,
    /// The selectorless Service (in --pod-namespace) agents dial; its port named `grpc` is the
    /// one the leader's EndpointSlice fills.
    #[arg(long, env = "WEIR_SERVICE", default_value = "weir-controller")]
    service: String,
    /// The ServiceAccount (NAMESPACE/NAME) whose tokens may obtain node certificates.
    #[arg(long, env = "WEIR_AGENT_SERVICE_ACCOUNT", default_value = "weir-system/weir-agent", value_parser = parse_namespaced)]
    agent_service_account: (String, String),
    /// Certificate requests one source address may make at once (each costs a TokenReview).
    #[arg(long, env = "WEIR_BOOTSTRAP_BURST_PER_SOURCE", default_value_t = BootstrapLimits::default().per_source_burst, value_parser = clap::value_parser!(u32).range(1..))]
    bootstrap_burst_per_source: u32,
    /// Certificate requests per second one source address regains.
    #[arg(long, env = "WEIR_BOOTSTRAP_RATE_PER_SOURCE", default_value_t = BootstrapLimits::default().per_source_rate, value_parser = parse_rate)]
    bootstrap_rate_per_source: f64,
    /// Certificate requests all sources together may make at once.
    #[arg(long, env = "WEIR_BOOTSTRAP_BURST", default_value_t = BootstrapLimits::default().global_burst, value_parser = clap::value_parser!(u32).range(1..))]
    bootstrap_burst: u32,
    /// Certificate requests per second all sources together regain.
    #[arg(long, env = "WEIR_BOOTSTRAP_RATE", default_value_t = BootstrapLimits::default().global_rate, value_parser = parse_rate)]
    bootstrap_rate: f64,
    /// Audience agents request for their projected ServiceAccount token.
    #[arg(long, env = "WEIR_TOKEN_AUDIENCE", default_value = "weir-controller")]
    token_audience: String,
    /// Secret (NAMESPACE/NAME) holding the cluster CA when --tls-dir has none; created with a
    /// new CA if absent. Empty: no such Secret.
    #[arg(long, env = "WEIR_CA_SECRET", default_value = "weir-system/weir-ca")]
    ca_secret: String,
    /// ConfigMap (NAMESPACE/NAME) the CA certificate is published to, for agents to mount.
    /// Empty: not published.
    #[arg(long, env = "WEIR_CA_CONFIGMAP", default_value = "weir-system/weir-ca")]
    ca_configmap: String,
    /// ConfigMap (NAMESPACE/NAME) where the leader keeps the node pod CIDRs it allocated, so
    /// that every replica and every restart hands a node the same range.
    #[arg(long, env = "WEIR_NODE_CIDRS_CONFIGMAP", default_value = "weir-system/weir-node-cidrs", value_parser = parse_namespaced)]
    node_cidrs_configmap: (String, String),
    /// DNS names of the serving certificate, when the controller issues it itself (no
    /// tls.crt in --tls-dir). Comma-separated.
    #[arg(
        long,
        env = "WEIR_TLS_SANS",
        value_delimiter = ',',
        default_value = "weir-controller,weir-controller.weir-system,weir-controller.weir-system.svc,weir-controller.weir-system.svc.cluster.local"
    )]
    tls_san: Vec<String>,
    /// After every (incremental) compile, compile every node again from scratch and stop at
    /// the first difference: a self-check for tests, costly on a large cluster.
    #[arg(long, env = "WEIR_CHECK_INCREMENTAL_COMPILES")]
    check_incremental_compiles: bool,
}

/// The allocator for --cluster-cidr, each family with its mask.
fn node_cidr_allocator(args: &Args) -> Result<NodeCidrAllocator> {
    let families: Vec<FamilyCidr> = args
        .cluster_cidr
        .iter()
        .map(|&cluster| FamilyCidr {
            cluster,
            mask: match cluster {
                ipnet::IpNet::V4(_) => args.node_cidr_mask,
                ipnet::IpNet::V6(_) => args.node_cidr_mask_ipv6,
            },
        })
        .collect();
    Ok(NodeCidrAllocator::per_family(&families)?)
}

/// mimalloc: the compile allocates and frees millions of small objects, and glibc's
/// allocator spent about a third of a full compile's time on them (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    match args.manifests.clone() {
        Some(dir) => run_manifests(args, dir).await,
        None => run_in_cluster(args).await,
    }
}

/// Serves /readyz and /metrics on --metrics-addr; a failure to bind ends the process (the
/// probes would fail anyway).
async fn spawn_endpoint(addr: SocketAddr, endpoint: ControllerEndpoint) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} (--metrics-addr)"))?;
    info!(%addr, "serving /readyz and /metrics");
    tokio::spawn(async move {
        if let Err(e) = endpoint.serve(listener).await {
            tracing::error!(error = %e, %addr, "HTTP endpoint stopped");
        }
    });
    Ok(())
}

/// A controller whose compiles are recorded in `metrics`.
fn observed_controller(
    publisher: StatePublisher,
    metrics: &Arc<CompileMetrics>,
    self_check: bool,
) -> Controller {
    let metrics = metrics.clone();
    let controller =
        Controller::new(publisher).observe_compiles(move |report| metrics.record(report));
    if self_check {
        info!("checking every compile against a full compile (--check-incremental-compiles)");
        controller.checking_incremental_compiles()
    } else {
        controller
    }
}

async fn run_manifests(args: Args, dir: PathBuf) -> Result<()> {
    let publisher = StatePublisher::new();
    let compiles = CompileMetrics::new();
    spawn_endpoint(
        args.metrics_addr,
        ControllerEndpoint::new(compiles.clone(), publisher.clone()),
    )
    .await?;
    let tls = ServerTls::load(&TlsFiles::in_dir(&args.tls_dir))
        .with_context(|| format!("loading TLS files from {}", args.tls_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    info!(listen = %args.listen, "serving agents");
    let server = NodeStateServer::new(publisher.clone());
    tokio::spawn(async move {
        if let Err(e) = server.serve(listener, tls, std::future::pending()).await {
            tracing::error!(error = %e, "agent server stopped");
        }
    });
    info!(dir = %dir.display(), "reading cluster objects from manifests");
    let mut controller = observed_controller(publisher, &compiles, args.check_incremental_compiles);
    if args.allocate_node_cidrs {
        std::fs::create_dir_all(&args.state_dir)
            .with_context(|| format!("creating {}", args.state_dir.display()))?;
        let allocator = node_cidr_allocator(&args)?;
        let store = FileCidrStore::new(args.state_dir.join("node-cidrs.json"));
        controller = controller.with_node_cidrs(allocator, Box::new(store))?;
    }
    run_directory(dir, controller, args.status_file).await
}

/// Kubernetes mode: every replica watches and compiles; the Lease holder serves agents,
/// answers bootstrap requests and emits policy Events. SIGTERM steps down and releases the
/// Lease.
async fn run_in_cluster(args: Args) -> Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let publisher = StatePublisher::new();
    let compiles = CompileMetrics::new();
    let instance = args.pod_name.clone().unwrap_or_else(host_name);
    let lease = LeaseConfig {
        lease_duration: args.lease_duration,
        renew_deadline: args.renew_deadline,
        retry_period: args.retry_period,
        ..LeaseConfig::new(
            &args.lease_namespace,
            &args.lease_name,
            unique_identity(&instance).context("drawing the Lease identity's random suffix")?,
        )
    };
    let (elector, leadership) = LeaderElector::new(client.clone(), lease)?;
    let events = DiagnosticEvents::new(client.clone(), &instance);
    let bootstrap_metrics = Arc::new(std::sync::OnceLock::new());
    // Up before anything waits for the API server: the liveness probe dials this port.
    spawn_endpoint(
        args.metrics_addr,
        ControllerEndpoint::new(compiles.clone(), publisher.clone())
            .with_leadership(leadership.clone())
            .with_policy_events(events.metrics())
            .with_bootstrap(bootstrap_metrics.clone()),
    )
    .await?;

    let ca_source = CaSource {
        secret: optional_namespaced(&args.ca_secret).context("--ca-secret")?,
        config_map: optional_namespaced(&args.ca_configmap).context("--ca-configmap")?,
    };
    let tls = load_controller_tls(&client, &args.tls_dir, &ca_source, &args.tls_san)
        .await
        .context("setting up TLS")?;
    let mut server = NodeStateServer::new(publisher.clone());
    match &tls.ca {
        Some(ca) => {
            let (namespace, service_account) = args.agent_service_account.clone();
            let reviewer = KubeTokenReviewer::new(
                client.clone(),
                TokenReviewConfig {
                    audience: args.token_audience.clone(),
                    namespace,
                    service_account,
                },
            );
            let bootstrap =
                Bootstrap::new(ca.clone(), Arc::new(reviewer)).with_limits(BootstrapLimits {
                    per_source_burst: args.bootstrap_burst_per_source,
                    per_source_rate: args.bootstrap_rate_per_source,
                    global_burst: args.bootstrap_burst,
                    global_rate: args.bootstrap_rate,
                });
            let _ = bootstrap_metrics.set(bootstrap.clone());
            server = server.with_bootstrap(bootstrap);
        }
        None => info!("no CA key: agents need provisioned certificates"),
    }

    let mut controller = observed_controller(publisher, &compiles, args.check_incremental_compiles);
    if args.allocate_node_cidrs {
        let allocator = node_cidr_allocator(&args)?;
        let (namespace, name) = args.node_cidrs_configmap.clone();
        let config = CidrStoreConfig::new(namespace, name);
        let (store, sync) = connect_cidr_store(&client, config, &leadership).await;
        tokio::spawn(sync.run());
        controller = controller.with_node_cidrs(allocator, Box::new(store))?;
    } else {
        info!("--allocate-node-cidrs=false: nodes need spec.podCIDRs");
    }

    let serving = AgentServing {
        listen: args.listen,
        server,
        tls: tls.server,
        endpoint: args.pod_ip.map(|ip| {
            let slice = LeaderEndpointSlice::new(
                client.clone(),
                &args.pod_namespace,
                &args.service,
                ip,
                args.listen.port(),
                "grpc",
            );
            match &args.pod_name {
                Some(pod) => slice.with_pod(pod),
                None => slice,
            }
        }),
    };
    let serve = tokio::spawn(serve_agents_while_leading(serving, leadership.clone()));
    let (diagnostics_tx, diagnostics_rx) = tokio::sync::watch::channel(Vec::new());
    tokio::spawn(run_diagnostic_events(events, diagnostics_rx, leadership));
    let mut elect = tokio::spawn(elector.run(shutdown_signal()));

    let opts = KubeOptions {
        diagnostics: Some(diagnostics_tx),
        ..KubeOptions::default()
    };
    tokio::select! {
        r = run_kube(client, controller, opts) => {
            r.context("watching the cluster")?;
            bail!("the cluster watch ended")
        }
        r = &mut elect => {
            r.context("leader election task")?;
            // The elector stepped down and released the Lease; the server has stopped or
            // is finishing its streams.
            serve.await.context("agent server task")?;
            info!("shut down");
            Ok(())
        }
    }
}

/// Reads the node pod-CIDR assignments, retrying while the API server cannot answer: without
/// them a range could go to a second node.
async fn connect_cidr_store(
    client: &kube::Client,
    config: CidrStoreConfig,
    leadership: &Leadership,
) -> (cidr_store::KubeCidrStore, cidr_store::CidrStoreSync) {
    let backoff = config.retry;
    let mut failures = 0;
    loop {
        match cidr_store::connect(client.clone(), config.clone(), leadership.clone()).await {
            Ok(connected) => return connected,
            Err(e) => {
                tracing::warn!(error = %e, "loading node pod CIDR assignments; retrying");
                tokio::time::sleep(backoff.delay(failures)).await;
                failures += 1;
            }
        }
    }
}

/// Completes on SIGTERM (the kubelet stopping the pod) or Ctrl-C.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops gracefully");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    info!("shutting down");
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "weir-controller".to_owned())
}

/// `15s`, `500ms`, `2m`, or a number of seconds.
/// A rate in requests per second: a finite number above zero.
fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "{text:?} is not a rate above zero (requests per second)"
        )),
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((text, "s"), |i| text.split_at(i));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected e.g. 15s, 500ms, 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("invalid duration unit in {text:?}: use ms, s or m")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

/// `NAMESPACE/NAME`.
fn parse_namespaced(text: &str) -> Result<(String, String), String> {
    match text.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_owned(), name.to_owned()))
        }
        _ => Err(format!("expected NAMESPACE/NAME, got {text:?}")),
    }
}

/// `NAMESPACE/NAME`, or nothing for an empty value.
fn optional_namespaced(text: &str) -> Result<Option<(String, String)>> {
    if text.is_empty() {
        return Ok(None);
    }
    parse_namespaced(text).map(Some).map_err(anyhow::Error::msg)
}
