//! `weir-agent`: the node agent (a DaemonSet pod: hostNetwork, privileged).

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ipnet::IpNet;
use tokio::{signal::unix::SignalKind, sync::Mutex};
use tracing::{debug, info, warn};
use weir_agent::{
    agent::{Agent, AgentConfig},
    bootstrap::{BootstrapConfig, CertificateKeeper},
    bpffs::{self, BpffsMount},
    cni_service::CniService,
    install_cni::{self, ConflistSource, InstallCni},
};
use weir_common::config::CtTimeouts;
use weir_transport::Backoff;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "weir node agent",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    agent: Args,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Install the weir-cni plugin and its network configuration on the node, then exit (the
    /// DaemonSet's init container). Idempotent; every file is replaced atomically.
    InstallCni(InstallCniArgs),
}

#[derive(clap::Args, Debug)]
struct InstallCniArgs {
    /// The plugin to install [default: weir-cni next to this program].
    #[arg(long)]
    from: Option<PathBuf>,
    /// The node's CNI binary directory.
    #[arg(long, default_value = "/host/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The node's CNI configuration directory; the configuration is written there as
    /// 10-weir.conflist.
    #[arg(long, default_value = "/host/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// Install this configuration list (it must use weir-cni) instead of weir's own.
    #[arg(long)]
    conflist_from: Option<PathBuf>,
    /// The agent's socket, in weir's own configuration.
    #[arg(long, default_value = weir_cni::spec::DEFAULT_AGENT_SOCKET)]
    agent_socket: PathBuf,
    /// The configuration's cniVersion (0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0), written over the
    /// one of --conflist-from's file too. The newest the node's container runtime reads:
    /// 1.1.0 needs libcni 1.2 (containerd 2.0) [default: 1.0.0, or the file's].
    #[arg(long, env = "WEIR_CNI_VERSION")]
    cni_version: Option<weir_cni::spec::CniVersion>,
}

#[derive(clap::Args, Debug)]
struct Args {
    /// This node's name (as in the Kubernetes Node object).
    #[arg(long, env = "NODE_NAME", required = true)]
    node_name: Option<String>,
    /// IPAM and endpoint state.
    #[arg(long, env = "WEIR_STATE_DIR", default_value = "/var/lib/weir")]
    state_dir: PathBuf,
    /// Unix socket the CNI plugin talks to.
    #[arg(long, env = "WEIR_CNI_SOCKET", default_value = "/run/weir/cni.sock")]
    cni_socket: PathBuf,
    /// The bpffs mount; pins live under <bpffs>/weir/<node>/. A bpf file system is mounted
    /// there if none is.
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// This node's pod CIDR (repeat for dual stack).
    #[arg(long = "pod-cidr", env = "WEIR_POD_CIDR", value_delimiter = ',')]
    pod_cidrs: Vec<IpNet>,
    /// How to reach other nodes: auto (direct on the uplink's subnets, VXLAN across), direct,
    /// vxlan.
    #[arg(long, env = "WEIR_ROUTING_MODE", default_value = "auto")]
    routing_mode: weir_agent::routing::RoutingMode,
    /// Interface towards the other nodes (default: the first with a global IPv4 address).
    #[arg(long, env = "WEIR_UPLINK")]
    uplink: Option<String>,
    /// MTU of pod interfaces; 0 picks the uplink's MTU minus VXLAN overhead.
    #[arg(long, default_value_t = 0)]
    pod_mtu: u32,
    /// The controller's address, e.g. https://weir-controller.weir-system:7443. Without it
    /// the agent only does networking (no policy).
    #[arg(long, env = "WEIR_CONTROLLER")]
    controller: Option<String>,
    /// Find the controller through the API server instead of --controller: the ready
    /// endpoints of this Service (NAMESPACE/NAME), looked up before every connection attempt.
    /// For clusters where no kube-proxy routes the controller's ClusterIP before weir does.
    #[arg(long, env = "WEIR_CONTROLLER_SERVICE", conflicts_with = "controller")]
    controller_service: Option<weir_agent::controller_service::ServiceRef>,
    /// With --controller-service: the name of the Service port agents are served on.
    #[arg(long, env = "WEIR_CONTROLLER_PORT_NAME", default_value = "grpc")]
    controller_port_name: String,
    /// Directory with ca.crt, tls.crt and tls.key (this node's client certificate). With
    /// --bootstrap-token-file and --ca-file they are obtained from the controller, and renewed.
    #[arg(long, env = "WEIR_TLS_DIR", default_value = "/etc/weir/tls")]
    tls_dir: PathBuf,
    /// A token the controller accepts in exchange for a node certificate (a projected
    /// ServiceAccount token for its audience). Read again before every request.
    #[arg(long, env = "WEIR_BOOTSTRAP_TOKEN_FILE", requires = "ca_file")]
    bootstrap_token_file: Option<PathBuf>,
    /// The controller's CA certificate, to trust while bootstrapping. Read again before every
    /// request; when it changes, a new certificate is requested.
    #[arg(long, env = "WEIR_CA_FILE", requires = "bootstrap_token_file")]
    ca_file: Option<PathBuf>,
    /// Name the controller's certificate must carry.
    #[arg(long, default_value = "weir-controller")]
    controller_name: String,
    /// With --controller: how long CNI ADD waits for the controller's state to name a new
    /// pod's policies, so its containers never start before they are enforced (seconds;
    /// afterwards the pod starts with --pending-pod-policy until the state arrives).
    #[arg(long, env = "WEIR_POD_POLICY_WAIT", default_value_t = 5.0)]
    pod_policy_wait: f64,
    /// With --controller: what a pod gets while the controller has not named its policies
    /// (it was away or behind when the pod started): `deny` every new flow to and from it
    /// (the node still reaches it, for kubelet's probes) or `allow` (unisolated).
    #[arg(long, env = "WEIR_PENDING_POD_POLICY", default_value_t = weir_agent::agent::PendingPodPolicy::Deny)]
    pending_pod_policy: weir_agent::agent::PendingPodPolicy,
    /// Address of the HTTP endpoint (/readyz, /metrics, /flows).
    #[arg(long, env = "WEIR_METRICS_ADDR", default_value = "0.0.0.0:9962")]
    metrics_addr: std::net::SocketAddr,
    /// Serve /flows (flow tuples, pod and policy names) to any client, not only to the node
    /// itself.
    #[arg(long, env = "WEIR_FLOWS_FROM_ANYWHERE")]
    flows_from_anywhere: bool,
    /// Report one in N new flows as a flow event (0: only drops).
    #[arg(long, default_value_t = 0)]
    flow_sample_rate: u32,
    /// Give pod traffic to destinations outside the cluster's pod CIDRs and node addresses
    /// the node's address (kernel masquerade), so that the outside can answer it.
    #[arg(long, env = "WEIR_MASQUERADE", default_value_t = true, action = clap::ArgAction::Set)]
    masquerade: bool,
    /// Destinations pod traffic keeps its pod address towards, besides the cluster's own
    /// ranges (comma-separated CIDRs, like ip-masq-agent's nonMasqueradeCIDRs).
    #[arg(
        long = "non-masquerade-cidr",
        env = "WEIR_NON_MASQUERADE_CIDRS",
        value_delimiter = ','
    )]
    non_masquerade_cidrs: Vec<IpNet>,
    /// Who translates Services: weir (the default; run the cluster without kube-proxy) or
    /// kube-proxy (weir writes no Service and hands every packet to the host stack after
    /// policy, so kube-proxy's NAT sees both directions of every flow).
    #[arg(long, env = "WEIR_SERVICE_PROXY", default_value = "weir")]
    service_proxy: weir_agent::services::ServiceProxy,
    /// cgroup v2 directory the Service socket hooks attach to (they act on the node's
    /// network namespace only) [default: the root of the cgroup v2 mount].
    #[arg(long, env = "WEIR_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// Conntrack: idle timeout of an established TCP flow (seconds).
    #[arg(long, env = "WEIR_CT_TCP_ESTABLISHED_TIMEOUT", default_value_t = CtTimeouts::DEFAULT.tcp_established_s, value_parser = clap::value_parser!(u32).range(1..))]
    ct_tcp_established_timeout: u32,
    /// Conntrack: idle timeout of a TCP flow after a FIN or RST (seconds).
    #[arg(long, env = "WEIR_CT_TCP_CLOSING_TIMEOUT", default_value_t = CtTimeouts::DEFAULT.tcp_closing_s, value_parser = clap::value_parser!(u32).range(1..))]
    ct_tcp_closing_timeout: u32,
    /// Conntrack: idle timeout of a TCP flow not answered yet (seconds).
    #[arg(long, env = "WEIR_CT_TCP_HALF_OPEN_TIMEOUT", default_value_t = CtTimeouts::DEFAULT.tcp_half_open_s, value_parser = clap::value_parser!(u32).range(1..))]
    ct_tcp_half_open_timeout: u32,
    /// Conntrack: idle timeout of a UDP flow not answered yet (seconds).
    #[arg(long, env = "WEIR_CT_UDP_TIMEOUT", default_value_t = CtTimeouts::DEFAULT.udp_s, value_parser = clap::value_parser!(u32).range(1..))]
    ct_udp_timeout: u32,
    /// Conntrack: idle timeout of a UDP flow with replies (seconds).
    #[arg(long, env = "WEIR_CT_UDP_STREAM_TIMEOUT", default_value_t = CtTimeouts::DEFAULT.udp_stream_s, value_parser = clap::value_parser!(u32).range(1..))]
    ct_udp_stream_timeout: u32,
    /// Conntrack: idle timeout of an ICMP flow (seconds).
    #[arg(long, env = "WEIR_CT_ICMP_TIMEOUT", default_value_t = CtTimeouts::DEFAULT.icmp_s, value_parser = clap::value_parser!(u32).range(1..))]
    ct_icmp_timeout: u32,
    /// Conntrack: idle timeout of a flow of any other protocol (seconds).
    #[arg(long, env = "WEIR_CT_OTHER_TIMEOUT", default_value_t = CtTimeouts::DEFAULT.other_s, value_parser = clap::value_parser!(u32).range(1..))]
    ct_other_timeout: u32,
    /// Seconds between two sweeps deleting expired conntrack entries.
    #[arg(long, env = "WEIR_CT_SWEEP_INTERVAL", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    ct_sweep_interval: u64,
    /// Most expired conntrack entries one sweep deletes.
    #[arg(long, env = "WEIR_CT_SWEEP_MAX", default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1..))]
    ct_sweep_max: u64,
    /// Sizes of the dataplane tables, `TABLE=ENTRIES[,…]` (tables: endpoints, peer-classes,
    /// peer-hosts, verdicts, verdicts-exact, conntrack, services, service-nat, routes; each
    /// 1024 to 16777216 entries); tables not named keep their default size. A pinned table of
    /// another size is recreated with its entries carried over.
    #[arg(long, env = "WEIR_MAP_CAPACITY", default_value = "")]
    map_capacity: weir_api::MapCapacities,
    /// Address prefixes whose packets the XDP program drops on the uplink: a file of one CIDR
    /// per line (`#` comments), read at start and again when it changes.
    #[arg(long, env = "WEIR_PREFILTER_FILE")]
    prefilter_file: Option<PathBuf>,
    /// When the XDP program runs on the uplink: `auto` while the prefilter has a prefix or a
    /// HostPolicy has an untracked rule (XDP costs throughput on some drivers, veth and
    /// virtio-net among them), `always`, or `off` (the prefilter and untracked rules are then
    /// not enforced).
    #[arg(long, env = "WEIR_UPLINK_XDP", default_value = "auto")]
    uplink_xdp: weir_agent::agent::UplinkXdp,
    /// Ports of this node that no HostPolicy closes, `PROTOCOL:PORT[,…]` (tcp, udp, sctp;
    /// empty: none). The agent's HTTP port and the tunnel's are always added.
    #[arg(long, env = "WEIR_FAILSAFE_INBOUND", default_value = weir_agent::failsafe::DEFAULT_INBOUND)]
    failsafe_inbound: weir_agent::failsafe::Ports,
    /// Ports of remote hosts whose replies to this node no HostPolicy stops (its control
    /// plane: DNS, the API server, weir's controller), `PROTOCOL:PORT[,…]`.
    #[arg(long, env = "WEIR_FAILSAFE_OUTBOUND", default_value = weir_agent::failsafe::DEFAULT_OUTBOUND)]
    failsafe_outbound: weir_agent::failsafe::Ports,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::InstallCni(args)) => install_cni(args),
        None => run(cli.agent).await,
    }
}

fn install_cni(args: InstallCniArgs) -> Result<()> {
    let plugin = match args.from {
        Some(path) => path,
        None => install_cni::plugin_next_to_current_exe()?,
    };
    let spec = InstallCni {
        plugin,
        bin_dir: args.cni_bin_dir,
        conf_dir: args.cni_conf_dir,
        conflist: match args.conflist_from {
            Some(path) => ConflistSource::File(path),
            None => ConflistSource::Generated {
                agent_socket: args.agent_socket,
            },
        },
        cni_version: args.cni_version,
    };
    let done = install_cni::install(&spec).context("installing the CNI plugin")?;
    info!(
        plugin = ?done.plugin,
        conflist = ?done.conflist,
        cni_version = %done.cni_version,
        bin_dir = %spec.bin_dir.display(),
        conf_dir = %spec.conf_dir.display(),
        "CNI plugin installed"
    );
    Ok(())
}

async fn run(args: Args) -> Result<()> {
    let node_name = args
        .node_name
        .clone()
        .context("--node-name (or NODE_NAME) is required")?;
    let endpoints = match (&args.controller, &args.controller_service) {
        (Some(url), _) => Some(weir_transport::Endpoints::fixed(url.clone())),
        (None, Some(service)) => {
            let client = kube::Client::try_default()
                .await
                .context("--controller-service: no API server to ask (in-cluster configuration)")?;
            Some(weir_agent::controller_service::endpoints(
                client,
                service.clone(),
                args.controller_port_name.clone(),
            ))
        }
        (None, None) => None,
    };
    match bpffs::ensure_mounted(&args.bpffs)? {
        BpffsMount::Present => {}
        BpffsMount::Mounted => info!(path = %args.bpffs.display(), "mounted a bpf file system"),
    }
    let cfg = AgentConfig {
        node_name: node_name.clone(),
        state_dir: args.state_dir.clone(),
        bpffs: args.bpffs.clone(),
        pod_cidrs: args.pod_cidrs.clone(),
        routing_mode: args.routing_mode,
        uplink: args.uplink.clone(),
        pod_mtu: args.pod_mtu,
        flow_sample_rate: args.flow_sample_rate,
        masquerade: weir_agent::masquerade::MasqueradeConfig {
            enabled: args.masquerade,
            non_masquerade_cidrs: args.non_masquerade_cidrs.clone(),
        },
        service_proxy: args.service_proxy,
        cgroup: args.cgroup_root.clone(),
        ct_timeouts: CtTimeouts::new(
            args.ct_tcp_established_timeout,
            args.ct_tcp_closing_timeout,
            args.ct_tcp_half_open_timeout,
            args.ct_udp_timeout,
            args.ct_udp_stream_timeout,
            args.ct_icmp_timeout,
            args.ct_other_timeout,
        ),
        // Without a controller no policy ever arrives: pods are unisolated.
        pending_pod_policy: if endpoints.is_some() {
            args.pending_pod_policy
        } else {
            weir_agent::agent::PendingPodPolicy::Allow
        },
        map_capacities: args.map_capacity,
        prefilter_file: args.prefilter_file.clone(),
        uplink_xdp: args.uplink_xdp,
        failsafe_inbound: args.failsafe_inbound.clone(),
        failsafe_outbound: args.failsafe_outbound.clone(),
        http_port: Some(args.metrics_addr.port()),
    };
    let agent = Agent::start(cfg).await.context("starting the dataplane")?;
    info!(
        node = %node_name,
        pod_cidrs = ?args.pod_cidrs,
        pod_mtu = agent.config().pod_mtu,
        "dataplane loaded"
    );
    let mut agent = agent;
    // What the maps hold, reported to the controller, which fits the node's state to it.
    let capacities = agent.maps().capacities;
    info!(%capacities, "dataplane table sizes");
    let flows = weir_agent::observe::FlowLog::new(4096);
    match agent.take_flow_events() {
        Ok(ring) => {
            let log = flows.clone();
            tokio::spawn(async move {
                if let Err(e) = weir_agent::observe::read_flow_events(ring, log).await {
                    warn!(error = %e, "reading flow events stopped");
                }
            });
        }
        Err(e) => warn!(error = %e, "no flow events"),
    }
    let agent = Arc::new(Mutex::new(agent));
    {
        let (agent, flows, addr) = (agent.clone(), flows.clone(), args.metrics_addr);
        let follows_controller = endpoints.is_some();
        let from_anywhere = args.flows_from_anywhere;
        tokio::spawn(async move {
            let served =
                weir_agent::http::serve(addr, agent, flows, follows_controller, from_anywhere);
            if let Err(e) = served.await {
                warn!(error = %e, %addr, "HTTP endpoint stopped");
            }
        });
    }

    // The socket appears only now: a plugin STATUS that reaches us means ADD can be served.
    let listener = weir_cni::server::bind(&args.cni_socket)
        .with_context(|| format!("binding {}", args.cni_socket.display()))?;
    let policy_wait = if endpoints.is_some() {
        Duration::try_from_secs_f64(args.pod_policy_wait).context("--pod-policy-wait")?
    } else {
        Duration::ZERO
    };
    let cni = Arc::new(CniService::new(agent.clone()).with_policy_wait(policy_wait));
    tokio::spawn(async move {
        if let Err(e) = weir_cni::server::serve(listener, cni).await {
            warn!(error = %e, "CNI server stopped");
        }
    });
    info!(socket = %args.cni_socket.display(), "serving the CNI plugin");

    if let Some(endpoints) = endpoints {
        let watch = weir_transport::WatchLoop::from_files(
            endpoints.clone(),
            weir_transport::TlsFiles::in_dir(&args.tls_dir),
            args.controller_name.clone(),
            node_name.clone(),
        )
        .with_capacities(capacities);
        let mut sink = weir_agent::controller_link::DataplaneSink::new(agent.clone());
        let follow = async move {
            let _ = watch.run(&mut sink).await;
        };
        match (&args.bootstrap_token_file, &args.ca_file) {
            (Some(token_file), Some(ca_file)) => {
                let keeper = CertificateKeeper::new(BootstrapConfig {
                    endpoints: endpoints.clone(),
                    server_name: args.controller_name.clone(),
                    node: node_name.clone(),
                    tls_dir: args.tls_dir.clone(),
                    token_file: token_file.clone(),
                    ca_file: ca_file.clone(),
                    backoff: Backoff {
                        initial: Duration::from_secs(1),
                        max: Duration::from_secs(60),
                    },
                });
                // Follow once a certificate is there; keep it renewed from then on.
                tokio::spawn(async move {
                    let renew_at = keeper.ensure_current().await;
                    tokio::spawn(follow);
                    keeper.keep_current(renew_at).await;
                });
            }
            _ => {
                tokio::spawn(follow);
            }
        }
        info!(controller = %endpoints, "following the controller");
    } else {
        warn!("no --controller or --controller-service: pods get networking but no policy");
    }

    let refresher = agent.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tick.tick().await;
            let mut agent = refresher.lock().await;
            if let Err(e) = agent.refresh_host_addrs().await {
                warn!(error = %e, "refreshing node addresses");
            }
            if let Err(e) = agent.refresh_prefilter() {
                warn!(error = %e, "refreshing the prefilter");
            }
        }
    });

    let sweeper = agent.clone();
    let (sweep_every, sweep_max) = (
        Duration::from_secs(args.ct_sweep_interval),
        usize::try_from(args.ct_sweep_max).unwrap_or(usize::MAX),
    );
    // The sweep walks the whole table on handles of its own, in a blocking task: CNI and
    // state applies never wait for it.
    let mut own = agent
        .lock()
        .await
        .conntrack_sweeper()
        .context("opening conntrack for the sweep")?;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(sweep_every);
        loop {
            tick.tick().await;
            let swept = tokio::task::spawn_blocking(move || {
                let r = own.sweep(weir_agent::maps::monotonic_ns(), sweep_max);
                (own, r)
            })
            .await;
            let Ok((back, result)) = swept else {
                warn!("the conntrack sweep panicked; no more sweeps");
                return;
            };
            own = back;
            match result {
                Ok(s) => {
                    sweeper.lock().await.record_sweep(s);
                    debug!(removed = s.removed, entries = s.entries, "conntrack swept");
                }
                Err(e) => warn!(error = %e, "sweeping conntrack"),
            }
        }
    });

    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    // Programs, links and maps stay pinned: pods keep their connectivity and policy while
    // no agent runs, and the next agent takes over without a gap.
    info!("exiting; the dataplane stays in place");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Cli, clap::Error> {
        let mut argv = vec!["weir-agent", "--node-name", "n1"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv)
    }

    #[test]
    fn map_capacities_default_to_the_compiled_in_sizes() {
        let cli = parse(&[]).unwrap();
        assert_eq!(cli.agent.map_capacity, weir_api::MapCapacities::default());
        let cli = parse(&["--map-capacity", "conntrack=1000000,routes=2048"]).unwrap();
        assert_eq!(cli.agent.map_capacity.conntrack, 1_000_000);
        assert_eq!(cli.agent.map_capacity.routes, 2048);
    }

    #[test]
    fn a_map_capacity_of_zero_is_refused_at_start() {
        let err = parse(&["--map-capacity", "conntrack=0"]).unwrap_err();
        assert!(
            err.to_string().contains("out of range (1024 to 16777216)"),
            "{err}"
        );
        let err = parse(&["--map-capacity", "verdict=4096"]).unwrap_err();
        assert!(err.to_string().contains("unknown table"), "{err}");
    }
}
