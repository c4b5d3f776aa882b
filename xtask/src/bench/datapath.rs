//! Sections `throughput`, `latency` and `connections`: traffic between two pods through weir,
//! through iptables/ipset/nftables rule sets of the same size, and through plain routed
//! veths (the baseline), on the same node and — when the local cluster routes between nodes
//! — across nodes; over IPv4, and over IPv6 through weir and plain IPv6 routing.
//!
//! weir runs as it is deployed: a local cluster ([`LocalCluster`]) with the real agents and
//! controller, pods created through the CNI plugin, policies written as manifests and waited
//! for with `sync()`. The clusters are dual-stack, so each one carries the IPv4 and the IPv6
//! traffic with the same pods and policies, and their nodes have addresses of both families
//! (as the baseline networks' nodes do), so both families are routed directly between them. Its rule sets are NetworkPolicies selecting the
//! server pod: `count − 1` each allowing one /32 and one /128 that are not clients (ipBlock),
//! and one allowing the client pods (podSelector) on the measured ports. The iptables, ipset
//! and nftables networks enforce the same IPv4 rules (see [`RuleSet`]) on a baseline network
//! built without weir; the IPv6 baseline is the same network built for IPv6, without a filter.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use weir_localcluster::{ClusterOptions, IpFamily, LocalCluster, Pod, PodSpec, netns::Netns};

use super::{
    report::{Better, Goal, Report},
    topology::{BenchRun, Family, Filter, OTHER_PORT, PlainNetwork, RuleSet},
    traffic::{
        self, CRR_PORTS, IPERF_PORT, PingPongServer, RR_PORT, TupleCursor, connection_rate,
        request_response,
    },
    verdict::count,
};

pub const NAMESPACE: &str = "bench";

pub struct Settings {
    pub runs: usize,
    /// Also measure across nodes.
    pub cross: bool,
    /// Policy counts of the weir clusters (0: no policy selects the measured pods).
    pub weir_policies: Vec<usize>,
    pub filters: Vec<Filter>,
    pub iperf_seconds: u32,
    pub iperf_omit: u32,
    /// Parallel streams of the multi-stream throughput figure (None: not measured).
    pub multi_streams: Option<usize>,
    pub rr: Duration,
    pub crr: Duration,
    /// How long the idle control plane is watched.
    pub idle_window: Duration,
}

impl Settings {
    pub fn new(quick: bool, runs: usize) -> Self {
        let sizes: &[usize] = if quick { &[10_000] } else { &[1_000, 10_000] };
        let mut filters = Vec::new();
        for make in [Filter::Iptables, Filter::Ipset, Filter::Nft] {
            for &count in sizes {
                filters.push(make(RuleSet { count }));
            }
        }
        Self {
            runs,
            cross: !quick,
            weir_policies: if quick {
                vec![0, 10_000]
            } else {
                vec![0, 1_000, 10_000]
            },
            filters,
            iperf_seconds: if quick { 1 } else { 4 },
            iperf_omit: if quick { 0 } else { 1 },
            multi_streams: if quick { None } else { Some(4) },
            rr: Duration::from_millis(if quick { 500 } else { 2_000 }),
            crr: Duration::from_millis(if quick { 500 } else { 2_000 }),
            idle_window: Duration::from_secs(if quick { 3 } else { 10 }),
        }
    }
}

/// A weir local cluster with the benchmark's pods, all of them dual-stack.
pub struct WeirCluster {
    pub policies: usize,
    pub cluster: LocalCluster,
    pub server: Pod,
    pub client: Pod,
    pub remote_client: Option<Pod>,
    /// A pod no rule set selects, for the propagation benchmark.
    pub target: Pod,
}

impl WeirCluster {
    pub fn id(&self) -> String {
        format!("weir-{}", count(self.policies))
    }
    pub fn label(&self) -> String {
        format!("weir, {} policies", count(self.policies))
    }
}

/// Everything the data-path and propagation benchmarks run on. Dropping it tears it down.
pub struct Networks {
    pub weir: Vec<WeirCluster>,
    plain: Vec<(Option<Filter>, PlainNetwork)>,
    /// Servers stop before the namespaces go.
    servers: Vec<PingPongServer>,
    run: BenchRun,
}

/// The pod's address of `family`.
fn pod_ip(pod: &Pod, family: Family) -> Result<IpAddr> {
    pod.ips
        .iter()
        .copied()
        .find(|ip| Family::of(*ip) == family)
        .with_context(|| {
            format!(
                "pod {}/{} has no {} address ({:?})",
                pod.namespace,
                pod.name,
                family.label(),
                pod.ips
            )
        })
}

/// The baseline networks: for IPv4 plain routing and each filter, for IPv6 plain routing.
fn plain_configs(settings: &Settings) -> Vec<(Family, Option<Filter>)> {
    let mut configs = vec![(Family::V4, None)];
    configs.extend(settings.filters.iter().map(|&f| (Family::V4, Some(f))));
    configs.push((Family::V6, None));
    configs
}

/// A baseline network's configuration id and label (without its family).
fn plain_config(filter: Option<Filter>) -> (String, String) {
    match filter {
        None => ("plain".into(), "plain routing (baseline)".into()),
        Some(f) => (f.id(), f.label()),
    }
}

impl Networks {
    /// Builds the networks: the weir clusters, and (`plain`) the baseline networks (IPv4 with
    /// and without each filter, IPv6 without). Starts the servers in every server pod.
    pub fn up(
        rt: &tokio::runtime::Runtime,
        bin_dir: PathBuf,
        settings: &Settings,
        plain: bool,
    ) -> Result<Self> {
        let mut run = BenchRun::new()?;
        let mut nets = Vec::new();
        let mut servers = Vec::new();
        if plain {
            for (family, filter) in plain_configs(settings) {
                let (id, label) = plain_config(filter);
                let tag = match family {
                    Family::V4 => id,
                    Family::V6 => format!("{id}-v6"),
                };
                let net = PlainNetwork::build(&mut run, &tag, settings.cross, family)
                    .with_context(|| format!("building the {tag} network"))?;
                if let Some(f) = filter {
                    let mut clients = vec![net.client.ip];
                    clients.extend(net.remote_client.as_ref().map(|c| c.ip));
                    let dir = run.dir().to_path_buf();
                    f.install(&net.server_node, &dir, net.server.ip, &clients)
                        .with_context(|| format!("installing {}", f.label()))?;
                }
                start_servers(&mut run, &mut servers, &net.server.netns)?;
                println!("  network ready: {}, {label}", family.label());
                nets.push((filter, net));
            }
        }
        let mut weir = Vec::new();
        for &policies in &settings.weir_policies {
            let started = std::time::Instant::now();
            let w = rt
                .block_on(weir_up(bin_dir.clone(), policies, settings.cross))
                .with_context(|| {
                    format!("starting a local weir cluster with {policies} policies")
                })?;
            start_servers(&mut run, &mut servers, &w.server.netns)?;
            start_servers(&mut run, &mut servers, &w.target.netns)?;
            println!(
                "  network ready: {} (local cluster {}, {:.1?})",
                w.label(),
                w.cluster.run_id(),
                started.elapsed()
            );
            weir.push(w);
        }
        Ok(Self {
            weir,
            plain: nets,
            servers,
            run,
        })
    }
}

impl Drop for Networks {
    fn drop(&mut self) {
        self.servers.clear();
        self.run.stop_processes();
        // The weir clusters tear themselves down; the BenchRun (last field) the rest.
        self.weir.clear();
    }
}

fn start_servers(run: &mut BenchRun, servers: &mut Vec<PingPongServer>, ns: &Netns) -> Result<()> {
    servers.push(PingPongServer::start(&ns.path())?);
    let mut iperf = Command::new("iperf3");
    iperf
        .args(["-s", "-p", &IPERF_PORT.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    run.spawn(ns, &mut iperf, &format!("iperf3 server in {}", ns.name()))?;
    Ok(())
}

/// The rule set as NetworkPolicies: one `List` manifest (one file keeps the controller's
/// directory scan cheap). Each non-matching policy allows one peer of each family, so both
/// families' traffic meets a rule set of `count` policies.
fn policy_list(rules: RuleSet) -> Value {
    let mut items: Vec<Value> = rules
        .other_peers(Family::V4)
        .zip(rules.other_peers(Family::V6))
        .enumerate()
        .map(|(i, (v4, v6))| {
            json!({
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": format!("other-{i}"), "namespace": NAMESPACE},
                "spec": {
                    "podSelector": {"matchLabels": {"bench-role": "server"}},
                    "policyTypes": ["Ingress"],
                    "ingress": [{
                        "from": [
                            {"ipBlock": {"cidr": format!("{v4}/32")}},
                            {"ipBlock": {"cidr": format!("{v6}/128")}},
                        ],
                        "ports": [{"protocol": "TCP", "port": OTHER_PORT}],
                    }],
                },
            })
        })
        .collect();
    items.push(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "allow-clients", "namespace": NAMESPACE},
        "spec": {
            "podSelector": {"matchLabels": {"bench-role": "server"}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"bench-role": "client"}}}],
                "ports": [
                    {"protocol": "TCP", "port": IPERF_PORT},
                    {"protocol": "TCP", "port": RR_PORT},
                    {"protocol": "TCP", "port": CRR_PORTS.start(), "endPort": CRR_PORTS.end()},
                ],
            }],
        },
    }));
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

async fn weir_up(bin_dir: PathBuf, policies: usize, cross: bool) -> Result<WeirCluster> {
    let mut opts = ClusterOptions::new(bin_dir);
    opts.nodes = if cross { 2 } else { 1 };
    opts.log = "info".into();
    opts.ip_family = IpFamily::Dual;
    // Nodes with addresses of both families, like the baseline networks' nodes: each
    // family's pod traffic is routed directly via the other node's address of that family.
    opts.ipv6_underlay = true;
    let mut cluster = LocalCluster::up(opts).await?;
    let spec = |name: &str, node: usize, role: &str| PodSpec {
        namespace: NAMESPACE.into(),
        name: name.into(),
        node,
        labels: [("bench-role".to_string(), role.to_string())].into(),
        ports: vec![],
        host_ports: vec![],
    };
    let server = cluster.add_pod(spec("server", 0, "server")).await?;
    let client = cluster.add_pod(spec("client", 0, "client")).await?;
    let remote_client = if cross {
        Some(cluster.add_pod(spec("client-x", 1, "client")).await?)
    } else {
        None
    };
    let target = cluster
        .add_pod(spec("target", 0, "propagation-target"))
        .await?;
    if policies > 0 {
        let list = policy_list(RuleSet { count: policies });
        cluster.write_manifest(
            &format!("objects/List.{NAMESPACE}.rule-set.yaml"),
            &list.to_string(),
        )?;
    }
    cluster.sync().await?;
    Ok(WeirCluster {
        policies,
        cluster,
        server,
        client,
        remote_client,
        target,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placement {
    SameNode,
    CrossNode,
}

impl Placement {
    fn id(self) -> &'static str {
        match self {
            Placement::SameNode => "same-node",
            Placement::CrossNode => "cross-node",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Placement::SameNode => "same node",
            Placement::CrossNode => "cross node",
        }
    }
}

/// What carries a target's traffic: a baseline network or a weir cluster, and the family.
struct Config {
    family: Family,
    /// `plain`, a filter's id or a weir cluster's id.
    id: String,
    label: String,
    weir: bool,
}

impl Config {
    /// The measured pairs to `server`: one per (placement, client namespace, client address).
    fn targets(
        &self,
        server: IpAddr,
        clients: impl IntoIterator<Item = (Placement, Netns, IpAddr)>,
    ) -> impl Iterator<Item = Target> {
        clients
            .into_iter()
            .map(move |(placement, client_ns, client_ip)| Target {
                placement,
                family: self.family,
                config: self.id.clone(),
                label: self.label.clone(),
                weir: self.weir,
                client_ns,
                client_ip,
                server_ip: server,
                cursor: TupleCursor::default(),
            })
    }
}

/// One measured client → server pair.
struct Target {
    placement: Placement,
    family: Family,
    config: String,
    label: String,
    weir: bool,
    client_ns: Netns,
    client_ip: IpAddr,
    server_ip: IpAddr,
    cursor: TupleCursor,
}

impl Target {
    fn key(&self, metric: Metric) -> String {
        key(self.placement, self.family, &self.config, metric)
    }

    /// Placement, family (IPv6 only: the IPv4 labels predate it) and configuration.
    fn prefix(&self) -> String {
        match self.family {
            Family::V4 => format!("{}, {}", self.placement.label(), self.label),
            Family::V6 => format!("{}, IPv6, {}", self.placement.label(), self.label),
        }
    }
}

/// `<section>.<metric>.<placement>.<config>` for IPv4 (the keys of earlier runs),
/// `<section>.<metric>.<placement>.ipv6.<config>` for IPv6.
fn key(placement: Placement, family: Family, config: &str, metric: Metric) -> String {
    let family = match family {
        Family::V4 => "",
        Family::V6 => "ipv6.",
    };
    format!(
        "{}.{}.{}.{family}{config}",
        metric.section(),
        metric.id(),
        placement.id()
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Metric {
    Throughput(usize),
    RequestResponse,
    ConnectionRate,
}

impl Metric {
    fn section(self) -> &'static str {
        match self {
            Metric::Throughput(_) => "throughput",
            Metric::RequestResponse => "latency",
            Metric::ConnectionRate => "connections",
        }
    }
    fn id(self) -> String {
        match self {
            Metric::Throughput(n) => format!("tcp-{n}"),
            Metric::RequestResponse => "rr".into(),
            Metric::ConnectionRate => "crr".into(),
        }
    }
}

/// The local clusters' controllers, stopped with SIGSTOP until drop (SIGCONT).
pub struct PausedControllers(Vec<weir_localcluster::record::ProcessRecord>);

impl PausedControllers {
    fn pause(nets: &Networks) -> Self {
        Self::pause_clusters(nets.weir.iter().map(|w| &w.cluster))
    }

    pub fn pause_clusters<'a>(clusters: impl IntoIterator<Item = &'a LocalCluster>) -> Self {
        let controllers: Vec<_> = clusters
            .into_iter()
            .filter_map(|c| weir_localcluster::record::RunRecord::load(c.dir()).ok())
            .flat_map(|r| r.processes)
            .filter(|p| p.what == "controller" && p.alive())
            .collect();
        for p in &controllers {
            signal(p, nix::sys::signal::Signal::SIGSTOP);
        }
        Self(controllers)
    }
}

impl Drop for PausedControllers {
    fn drop(&mut self) {
        for p in &self.0 {
            signal(p, nix::sys::signal::Signal::SIGCONT);
        }
    }
}

/// Signals a process this run started, if it is still that process (PID and start time).
fn signal(p: &weir_localcluster::record::ProcessRecord, sig: nix::sys::signal::Signal) {
    if p.alive() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid as i32), sig);
    }
}

/// What the local clusters' agents and controllers cost while nothing changes, as a share
/// of one core over `window`.
fn idle_control_plane(report: &mut Report, nets: &Networks, window: Duration) {
    let before = weir_cpu_seconds(nets);
    std::thread::sleep(window);
    let after = weir_cpu_seconds(nets);
    for (what, seconds) in after {
        let used = seconds - before.get(&what).copied().unwrap_or(0.0);
        let key = format!("idle.{}", what.replace(' ', "."));
        report.define(
            "idle",
            &key,
            format!("{what}, idle"),
            "% of a core",
            Better::Lower,
            None,
        );
        report.record(&key, used / window.as_secs_f64() * 100.0);
    }
}

/// CPU time (user + system, seconds) of each local cluster's agents and controller, to tell
/// whether the control plane competed with the measured traffic.
fn weir_cpu_seconds(nets: &Networks) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for w in &nets.weir {
        let Ok(record) = weir_localcluster::record::RunRecord::load(w.cluster.dir()) else {
            continue;
        };
        for p in record.processes {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", p.pid)) else {
                continue;
            };
            let Some(rest) = stat.rfind(')').and_then(|i| stat.get(i + 2..)) else {
                continue;
            };
            let f: Vec<&str> = rest.split(' ').collect();
            // Fields 14 and 15 of stat (utime, stime), in clock ticks of 1/100 s.
            let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            // "agent <run>-n1" → "agent n1": the same key in every run.
            let what = p.what.replace(&format!("{}-", w.cluster.run_id()), "");
            *out.entry(format!("{} {what}", w.id())).or_insert(0.0) +=
                (ticks(11) + ticks(12)) / 100.0;
        }
    }
    out
}

/// Every measured pair: per baseline network its clients, per weir cluster its clients over
/// each family. IPv4 first, then IPv6, so each family's rows stay together in the tables.
fn targets(nets: &Networks) -> Result<Vec<Target>> {
    let mut targets = Vec::new();
    for family in Family::ALL {
        for (filter, net) in nets.plain.iter().filter(|(_, n)| n.family == family) {
            let (id, label) = plain_config(*filter);
            let config = Config {
                family,
                id,
                label,
                weir: false,
            };
            let clients = [
                (Placement::SameNode, Some(&net.client)),
                (Placement::CrossNode, net.remote_client.as_ref()),
            ]
            .into_iter()
            .filter_map(|(p, c)| c.map(|c| (p, c.netns.clone(), c.ip)));
            targets.extend(config.targets(net.server.ip, clients));
        }
        for w in &nets.weir {
            let config = Config {
                family,
                id: w.id(),
                label: w.label(),
                weir: true,
            };
            let clients = [
                (Placement::SameNode, Some(&w.client)),
                (Placement::CrossNode, w.remote_client.as_ref()),
            ]
            .into_iter()
            .filter_map(|(p, c)| c.map(|c| Ok((p, c.netns.clone(), pod_ip(c, family)?))))
            .collect::<Result<Vec<_>>>()?;
            targets.extend(config.targets(pod_ip(&w.server, family)?, clients));
        }
    }
    Ok(targets)
}

pub fn run(report: &mut Report, nets: &mut Networks, settings: &Settings) -> Result<()> {
    let targets = targets(nets)?;
    // Every pair must connect before anything is measured. weir across nodes depends on
    // the local cluster routing between nodes; without it those pairs are skipped.
    let mut reachable = Vec::new();
    for t in targets {
        let ok = [RR_PORT, IPERF_PORT, *CRR_PORTS.start()]
            .iter()
            .all(|&port| {
                (0..10).any(|_| {
                    traffic::can_connect(
                        &t.client_ns.path(),
                        t.server_ip,
                        port,
                        Duration::from_millis(500),
                    ) || {
                        std::thread::sleep(Duration::from_millis(100));
                        false
                    }
                })
            });
        if ok {
            reachable.push(t);
        } else if t.placement == Placement::CrossNode && t.weir {
            report.skip(format!(
                "{}: the client cannot reach the server across nodes of the local cluster (no cross-node pod routing yet?)",
                t.prefix()
            ));
        } else {
            bail!(
                "{}: the client {} cannot reach the server {} (ports {RR_PORT}, {IPERF_PORT}, {})",
                t.prefix(),
                t.client_ip,
                t.server_ip,
                CRR_PORTS.start()
            );
        }
    }
    let mut targets = reachable;

    let mut metrics = vec![Metric::Throughput(1)];
    metrics.extend(settings.multi_streams.map(Metric::Throughput));
    metrics.extend([Metric::RequestResponse, Metric::ConnectionRate]);
    for &metric in &metrics {
        for t in &targets {
            define(report, t, metric);
        }
    }
    idle_control_plane(report, nets, settings.idle_window);
    // The local clusters' controllers share this machine's CPUs with the measured traffic,
    // which in a real cluster they do not (the controller runs on some other node); their
    // idle cost was just measured on its own. Paused, they cannot disturb the data path;
    // the agents, which do run on the measured node, keep running.
    let _paused = PausedControllers::pause(nets);
    let cpu_before = weir_cpu_seconds(nets);
    let started = std::time::Instant::now();
    for run in 1..=settings.runs {
        for &metric in &metrics {
            let mut line = format!("  [data path run {run}/{}] {}:", settings.runs, metric.id());
            for t in &mut targets {
                let value = measure(report, t, metric, settings)
                    .with_context(|| format!("{} {}", metric.id(), t.prefix()))?;
                let family = match t.family {
                    Family::V4 => "",
                    Family::V6 => "ipv6/",
                };
                line.push_str(&format!(
                    " {}/{family}{}={}",
                    t.placement.id(),
                    t.config,
                    super::report::num(value)
                ));
            }
            println!("{line}");
        }
    }
    let mut used: Vec<(f64, String)> = weir_cpu_seconds(nets)
        .into_iter()
        .filter(|(what, _)| !what.ends_with("controller"))
        .map(|(what, s)| (s - cpu_before.get(&what).copied().unwrap_or(0.0), what))
        .collect();
    used.sort_by(|a, b| b.0.total_cmp(&a.0));
    let total: f64 = used.iter().map(|(s, _)| s).sum();
    report.note(
        "idle",
        format!(
            "During the data-path measurements that follow, the local clusters' controllers were paused (SIGSTOP); the agents used {total:.1} s of CPU in those {:.0} s ({}).",
            started.elapsed().as_secs_f64(),
            used.iter()
                .map(|(s, what)| format!("{what} {s:.1} s"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    throughput_goals(report);
    Ok(())
}

/// TCP throughput (1 stream) with 10k policies ≥ 0.95× of plain routing of the same family,
/// per family and placement.
fn throughput_goals(report: &mut Report) {
    for family in Family::ALL {
        for placement in [Placement::SameNode, Placement::CrossNode] {
            let k = key(placement, family, "weir-10k", Metric::Throughput(1));
            let Some(r) = report.ratio(&k) else { continue };
            let base = key(placement, family, "plain", Metric::Throughput(1));
            let median = |k: &str| report.stats(k).map_or(f64::NAN, |s| s.median);
            let (goal, measured) = match family {
                Family::V4 => (
                    format!(
                        "≥ 95 % of baseline throughput with 10k policies ({}, 1 stream)",
                        placement.label()
                    ),
                    format!("{:.0} %", r * 100.0),
                ),
                Family::V6 => (
                    format!(
                        "IPv6 throughput, 10k policies ≥ 0.95× plain IPv6 routing ({}, 1 stream)",
                        placement.label()
                    ),
                    format!(
                        "{r:.2}× ({} against {} Gbit/s)",
                        super::report::num(median(&k)),
                        super::report::num(median(&base))
                    ),
                ),
            };
            report.goals.push(Goal {
                goal,
                measured,
                met: Some(r >= 0.95),
            });
        }
    }
}

fn define(report: &mut Report, t: &Target, metric: Metric) {
    let section = metric.section();
    let base = |m: Metric| Some(key(t.placement, t.family, "plain", m));
    let prefix = t.prefix();
    match metric {
        Metric::Throughput(n) => report.define(
            section,
            t.key(metric),
            format!(
                "{prefix}: TCP throughput, {n} stream{}",
                if n == 1 { "" } else { "s" }
            ),
            "Gbit/s",
            Better::Higher,
            base(metric),
        ),
        Metric::RequestResponse => {
            report.define(
                section,
                t.key(metric) + ".tps",
                format!("{prefix}: request/response rate"),
                "transactions/s",
                Better::Higher,
                base(metric).map(|b| b + ".tps"),
            );
            for p in ["p50", "p99"] {
                report.define(
                    section,
                    format!("{}.{p}", t.key(metric)),
                    format!("{prefix}: request/response latency {p}"),
                    "µs",
                    Better::Lower,
                    base(metric).map(|b| format!("{b}.{p}")),
                );
            }
        }
        Metric::ConnectionRate => report.define(
            section,
            t.key(metric),
            format!("{prefix}: new connections (connect, request, close)"),
            "connections/s",
            Better::Higher,
            base(metric),
        ),
    }
}

/// One run of one metric on one target; returns the headline value for the progress line.
fn measure(report: &mut Report, t: &mut Target, metric: Metric, s: &Settings) -> Result<f64> {
    match metric {
        Metric::Throughput(streams) => {
            let g = traffic::iperf3(
                &t.client_ns,
                t.server_ip,
                streams,
                s.iperf_seconds,
                s.iperf_omit,
            )?;
            report.record(&t.key(metric), g);
            Ok(g)
        }
        Metric::RequestResponse => {
            let r = request_response(&t.client_ns.path(), t.server_ip, s.rr)?;
            report.record(&(t.key(metric) + ".tps"), r.transactions_per_s);
            report.record(&format!("{}.p50", t.key(metric)), r.p50_us);
            report.record(&format!("{}.p99", t.key(metric)), r.p99_us);
            Ok(r.transactions_per_s)
        }
        Metric::ConnectionRate => {
            let rate = connection_rate(
                &t.client_ns.path(),
                t.client_ip,
                t.server_ip,
                s.crr,
                &mut t.cursor,
            )?;
            report.record(&t.key(metric), rate);
            Ok(rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_list_holds_one_policy_per_rule_all_selecting_the_server() {
        let list = policy_list(RuleSet { count: 5 });
        let items = list["items"].as_array().unwrap();
        assert_eq!(items.len(), 5);
        // The non-matching policies allow one peer of each family.
        let from = items[0]["spec"]["ingress"][0]["from"].as_array().unwrap();
        assert_eq!(from[0]["ipBlock"]["cidr"], "10.200.0.0/32");
        assert_eq!(from[1]["ipBlock"]["cidr"], "fd00:200::/128");
        for item in items {
            assert_eq!(item["kind"], "NetworkPolicy");
            assert_eq!(
                item["spec"]["podSelector"]["matchLabels"]["bench-role"],
                "server"
            );
            let np: k8s_openapi::api::networking::v1::NetworkPolicy =
                serde_json::from_value(item.clone()).unwrap();
            assert_eq!(np.metadata.namespace.as_deref(), Some(NAMESPACE));
        }
        assert_eq!(items[4]["metadata"]["name"], "allow-clients");
    }

    #[test]
    fn ipv4_keys_are_those_of_earlier_runs_and_ipv6_keys_name_the_family() {
        assert_eq!(
            key(
                Placement::SameNode,
                Family::V4,
                "weir-10k",
                Metric::Throughput(1)
            ),
            "throughput.tcp-1.same-node.weir-10k"
        );
        assert_eq!(
            key(
                Placement::CrossNode,
                Family::V6,
                "plain",
                Metric::ConnectionRate
            ),
            "connections.crr.cross-node.ipv6.plain"
        );
    }

    #[test]
    fn ipv6_has_a_plain_baseline_and_no_filters() {
        let settings = Settings::new(true, 1);
        let configs = plain_configs(&settings);
        assert_eq!(configs.first(), Some(&(Family::V4, None)));
        assert_eq!(
            configs
                .iter()
                .filter(|(f, _)| *f == Family::V6)
                .collect::<Vec<_>>(),
            [&(Family::V6, None)]
        );
        assert_eq!(configs.len(), settings.filters.len() + 2);
    }
}
