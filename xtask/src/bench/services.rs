//! Section `services`: new connections per second and request/response latency from a client
//! pod to a Service's ClusterIP, compared with the same client reaching the backend's pod IP
//! directly, with 10 and with 10,000 Services in the cluster, through weir and through
//! kube-proxy's iptables and nftables modes built the same way.
//!
//! Every configuration is a two-node local cluster ([`LocalCluster`]) with a client pod on
//! node 1, one backend on node 2 (cross node) and one on node 1 (same node). Its Services are
//! one `List` manifest applied at once: the two measured Services (each selecting one backend;
//! the request/response port and the 16 connection-rate ports, so that every connection uses
//! a 5-tuple never used before, as in the data-path section) and `count − 2` others with one
//! port each, selecting both backends.
//!
//! * weir: the agents translate the Services (the default `--service-proxy weir`);
//! * kube-proxy: the agents run with `--service-proxy kube-proxy` (they write no Service and
//!   hand pods' packets to the node's stack after policy), and each node's namespace gets the
//!   rules kube-proxy would write for the same Services ([`iptables_rules`],
//!   [`nft_rules`]). The measured Services sit halfway down the list, which matters for
//!   iptables' linear `KUBE-SERVICES` chain (kube-proxy's order is arbitrary: halfway is
//!   the average).
//!
//! Every row's ratio is against the pod IP reached directly in the weir cluster with the same
//! number of Services (same placement), measured in the same run.

use std::{fmt::Write as _, net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use weir_localcluster::{ClusterOptions, LocalCluster, PodSpec, netns::Netns};

use super::{
    datapath::PausedControllers,
    report::{Better, Goal, Report},
    topology::exec_with_input,
    traffic::{
        self, CRR_PORTS, PingPongServer, RR_PORT, TupleCursor, connection_rate, request_response,
    },
    verdict::count,
};

pub const SECTION: &str = "services";
const NAMESPACE: &str = "bench";
/// The measured Services' ClusterIPs (cross node, same node).
const FAR_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NEAR_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
/// The other Services' ClusterIPs start here (10.96.1.0 + i).
const OTHER_IPS: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 0);
/// The other Services' port.
const OTHER_PORT: u16 = 80;

pub struct Settings {
    pub runs: usize,
    pub counts: Vec<usize>,
    pub modes: Vec<Mode>,
    pub rr: Duration,
    pub crr: Duration,
}

impl Settings {
    pub fn new(quick: bool, runs: usize) -> Self {
        Self {
            runs,
            counts: vec![10, 10_000],
            modes: vec![Mode::Weir, Mode::Iptables, Mode::Nft],
            rr: Duration::from_millis(if quick { 500 } else { 2_000 }),
            crr: Duration::from_millis(if quick { 500 } else { 2_000 }),
        }
    }
}

/// Who translates the Services.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Weir,
    /// kube-proxy's iptables mode (weir with `--service-proxy kube-proxy`).
    Iptables,
    /// kube-proxy's nftables mode (weir with `--service-proxy kube-proxy`).
    Nft,
}

impl Mode {
    fn id(self) -> &'static str {
        match self {
            Mode::Weir => "weir",
            Mode::Iptables => "kube-proxy-iptables",
            Mode::Nft => "kube-proxy-nft",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Mode::Weir => "weir",
            Mode::Iptables => "kube-proxy iptables",
            Mode::Nft => "kube-proxy nftables",
        }
    }
}

/// One Service port as kube-proxy sees it: port = target port, TCP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<u16>,
    /// Selector (one label).
    pub selector: (String, String),
    pub endpoints: Vec<Ipv4Addr>,
}

/// The `count` Services: the two measured ones halfway down the list.
pub fn services(count: usize, far: Ipv4Addr, near: Ipv4Addr) -> Vec<ServiceSpec> {
    let measured_ports: Vec<u16> = std::iter::once(RR_PORT).chain(CRR_PORTS).collect();
    let measured = [
        ("measured-far", FAR_IP, "far", far),
        ("measured-near", NEAR_IP, "near", near),
    ]
    .map(|(name, ip, which, backend)| ServiceSpec {
        name: name.into(),
        cluster_ip: ip,
        ports: measured_ports.clone(),
        selector: ("bench-backend".into(), which.into()),
        endpoints: vec![backend],
    });
    let others = count.saturating_sub(measured.len());
    let base = u32::from(OTHER_IPS);
    let mut out: Vec<ServiceSpec> = (0..others)
        .map(|i| ServiceSpec {
            name: format!("other-{i}"),
            cluster_ip: Ipv4Addr::from(base + i as u32),
            ports: vec![OTHER_PORT],
            selector: ("bench-role".into(), "backend".into()),
            endpoints: vec![far, near],
        })
        .collect();
    let middle = out.len() / 2;
    for (i, m) in measured.into_iter().enumerate() {
        out.insert(middle + i, m);
    }
    out
}

/// The Services as one `List` manifest (targetPort = port, TCP).
fn service_list(services: &[ServiceSpec]) -> Value {
    let items: Vec<Value> = services
        .iter()
        .map(|s| {
            let ports: Vec<Value> = s
                .ports
                .iter()
                .map(|&p| json!({"name": format!("p{p}"), "port": p, "targetPort": p, "protocol": "TCP"}))
                .collect();
            let mut selector = serde_json::Map::new();
            selector.insert(s.selector.0.clone(), s.selector.1.clone().into());
            json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": s.name, "namespace": NAMESPACE},
                "spec": {
                    "clusterIP": s.cluster_ip.to_string(),
                    "selector": selector,
                    "ports": ports,
                },
            })
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

/// kube-proxy's iptables mode for `services` (nat table, for `iptables-restore`): one
/// `KUBE-SERVICES` rule per Service port jumping to its `KUBE-SVC-…` chain, which picks an
/// endpoint's `KUBE-SEP-…` chain with `-m statistic --mode random` (probability 1/n, 1/(n−1),
/// …, the last unconditional), which DNATs. Hooked from `PREROUTING` and `OUTPUT`.
pub fn iptables_rules(services: &[ServiceSpec]) -> String {
    let mut chains = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    let mut rules = String::from(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n",
    );
    let mut services_chain = String::new();
    let mut n = 0usize;
    for s in services {
        for &port in &s.ports {
            n += 1;
            let svc = format!("KUBE-SVC-{n:016X}");
            let comment = format!("{NAMESPACE}/{}:p{port}", s.name);
            let _ = writeln!(chains, ":{svc} - [0:0]");
            let _ = writeln!(
                services_chain,
                "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{comment} cluster IP\" -m tcp --dport {port} -j {svc}",
                s.cluster_ip
            );
            let total = s.endpoints.len();
            for (j, ep) in s.endpoints.iter().enumerate() {
                let sep = format!("KUBE-SEP-{n:012X}{j:04X}");
                let _ = writeln!(chains, ":{sep} - [0:0]");
                let left = total - j;
                if left > 1 {
                    let _ = writeln!(
                        rules,
                        "-A {svc} -m comment --comment \"{comment} -> {ep}:{port}\" -m statistic --mode random --probability {:.11} -j {sep}",
                        1.0 / left as f64
                    );
                } else {
                    let _ = writeln!(
                        rules,
                        "-A {svc} -m comment --comment \"{comment} -> {ep}:{port}\" -j {sep}"
                    );
                }
                let _ = writeln!(
                    rules,
                    "-A {sep} -s {ep}/32 -m comment --comment \"{comment}\" -j KUBE-MARK-MASQ"
                );
                let _ = writeln!(
                    rules,
                    "-A {sep} -p tcp -m comment --comment \"{comment}\" -m tcp -j DNAT --to-destination {ep}:{port}"
                );
            }
        }
    }
    chains + &services_chain + &rules + "COMMIT\n"
}

/// kube-proxy's nftables mode for `services` (for `nft -f`): a `service-ips` verdict map
/// from (ClusterIP . protocol . port) to a per-Service-port chain, which picks an endpoint
/// chain with `numgen random mod n`, which DNATs. Hooked at prerouting and output (priority
/// -100, dstnat).
pub fn nft_rules(table: &str, services: &[ServiceSpec]) -> String {
    let mut elements = Vec::new();
    let mut chains = String::new();
    for s in services {
        for &port in &s.ports {
            let svc = format!("service-{}-{}-p{port}", NAMESPACE, s.name);
            elements.push(format!("{} . tcp . {port} : goto {svc}", s.cluster_ip));
            let eps: Vec<String> = s
                .endpoints
                .iter()
                .map(|ep| format!("endpoint-{}-{}-p{port}-{ep}", NAMESPACE, s.name))
                .collect();
            let pick = if eps.len() == 1 {
                format!("goto {}", eps[0])
            } else {
                let arms: Vec<String> = eps
                    .iter()
                    .enumerate()
                    .map(|(j, e)| format!("{j} : goto {e}"))
                    .collect();
                format!(
                    "numgen random mod {} vmap {{ {} }}",
                    eps.len(),
                    arms.join(", ")
                )
            };
            let _ = writeln!(chains, "  chain {svc} {{\n    {pick}\n  }}");
            for (ep, chain) in s.endpoints.iter().zip(&eps) {
                let _ = writeln!(
                    chains,
                    "  chain {chain} {{\n    ip saddr {ep} jump mark-for-masquerade\n    meta l4proto tcp dnat to {ep}:{port}\n  }}"
                );
            }
        }
    }
    let map = if elements.is_empty() {
        String::new()
    } else {
        format!(
            "\n    elements = {{\n      {}\n    }}",
            elements.join(",\n      ")
        )
    };
    format!(
        "table ip {table} {{\n  map service-ips {{\n    type ipv4_addr . inet_proto . inet_service : verdict{map}\n  }}\n  chain mark-for-masquerade {{\n    meta mark set meta mark or 0x4000\n  }}\n  chain services {{\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }}\n  chain nat-prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    jump services\n  }}\n  chain nat-output {{\n    type nat hook output priority -100; policy accept;\n    jump services\n  }}\n{chains}}}\n"
    )
}

/// One local cluster of the section.
struct ServiceCluster {
    mode: Mode,
    count: usize,
    cluster: LocalCluster,
    client_ns: Netns,
    client_ip: Ipv4Addr,
    far: Ipv4Addr,
    near: Ipv4Addr,
}

impl ServiceCluster {
    fn id(&self) -> String {
        format!("{}-{}", self.mode.id(), count(self.count))
    }
    fn label(&self) -> String {
        format!("{}, {} Services", self.mode.label(), count(self.count))
    }
}

/// The section's clusters. Dropping it stops the servers, then tears the clusters down.
pub struct ServiceNetworks {
    servers: Vec<PingPongServer>,
    clusters: Vec<ServiceCluster>,
}

impl Drop for ServiceNetworks {
    fn drop(&mut self) {
        self.servers.clear();
        self.clusters.clear();
    }
}

fn ipv4(ip: std::net::IpAddr) -> Result<Ipv4Addr> {
    match ip {
        std::net::IpAddr::V4(ip) => Ok(ip),
        other => bail!("pod without an IPv4 address ({other})"),
    }
}

impl ServiceNetworks {
    pub fn up(rt: &tokio::runtime::Runtime, bin_dir: PathBuf, settings: &Settings) -> Result<Self> {
        let mut nets = Self {
            servers: Vec::new(),
            clusters: Vec::new(),
        };
        for &count in &settings.counts {
            for &mode in &settings.modes {
                let started = std::time::Instant::now();
                let c = rt
                    .block_on(cluster_up(bin_dir.clone(), mode, count))
                    .with_context(|| {
                        format!(
                            "starting a local cluster for {}, {} Services",
                            mode.label(),
                            count
                        )
                    })?;
                for name in ["backend-far", "backend-near"] {
                    let pod = c
                        .cluster
                        .pod(NAMESPACE, name)
                        .with_context(|| format!("no pod {name}"))?;
                    nets.servers.push(PingPongServer::start(&pod.netns.path())?);
                }
                println!(
                    "  network ready: {} (local cluster {}, {:.1?})",
                    c.label(),
                    c.cluster.run_id(),
                    started.elapsed()
                );
                nets.clusters.push(c);
            }
        }
        Ok(nets)
    }
}

async fn cluster_up(bin_dir: PathBuf, mode: Mode, count: usize) -> Result<ServiceCluster> {
    let mut opts = ClusterOptions::new(bin_dir);
    opts.nodes = 2;
    opts.log = "info".into();
    if mode != Mode::Weir {
        opts.agent_args = vec!["--service-proxy".into(), "kube-proxy".into()];
    }
    let mut cluster = LocalCluster::up(opts).await?;
    let spec = |name: &str, node: usize, labels: &[(&str, &str)]| PodSpec {
        namespace: NAMESPACE.into(),
        name: name.into(),
        node,
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ports: vec![],
        host_ports: vec![],
    };
    let client = cluster
        .add_pod(spec("client", 0, &[("bench-role", "client")]))
        .await?;
    let far = cluster
        .add_pod(spec(
            "backend-far",
            1,
            &[("bench-role", "backend"), ("bench-backend", "far")],
        ))
        .await?;
    let near = cluster
        .add_pod(spec(
            "backend-near",
            0,
            &[("bench-role", "backend"), ("bench-backend", "near")],
        ))
        .await?;
    let (far, near) = (ipv4(far.ip)?, ipv4(near.ip)?);
    let list = services(count, far, near);
    cluster.write_manifest(
        &format!("objects/List.{NAMESPACE}.services.yaml"),
        &service_list(&list).to_string(),
    )?;
    // A large table can take the controller longer than one sync's 30 s on a slow machine.
    let mut synced = cluster.sync().await;
    for _ in 0..3 {
        if synced.is_ok() {
            break;
        }
        synced = cluster.sync().await;
    }
    synced?;
    let dir = cluster.dir().to_path_buf();
    for (i, node) in cluster.nodes().iter().enumerate() {
        match mode {
            Mode::Weir => {}
            Mode::Iptables => exec_with_input(
                &node.netns,
                &dir,
                "iptables-restore",
                &[],
                &iptables_rules(&list),
            )
            .with_context(|| format!("kube-proxy iptables rules on node {i}"))?,
            Mode::Nft => exec_with_input(
                &node.netns,
                &dir,
                "nft",
                &["-f", "-"],
                &nft_rules("kube-proxy", &list),
            )
            .with_context(|| format!("kube-proxy nftables rules on node {i}"))?,
        }
    }
    Ok(ServiceCluster {
        mode,
        count,
        client_ns: client.netns.clone(),
        client_ip: ipv4(client.ip)?,
        cluster,
        far,
        near,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dest {
    PodIp,
    ClusterIp,
}

impl Dest {
    fn id(self) -> &'static str {
        match self {
            Dest::PodIp => "pod-ip",
            Dest::ClusterIp => "cluster-ip",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Dest::PodIp => "pod IP",
            Dest::ClusterIp => "ClusterIP",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Metric {
    ConnectionRate,
    RequestResponse,
}

impl Metric {
    fn id(self) -> &'static str {
        match self {
            Metric::ConnectionRate => "crr",
            Metric::RequestResponse => "rr",
        }
    }
}

fn key(metric: Metric, placement: Placement, config: &str, dest: Dest) -> String {
    format!(
        "{SECTION}.{}.{}.{config}.{}",
        metric.id(),
        placement.id(),
        dest.id()
    )
}

/// One measured client → destination pair.
struct Target {
    placement: Placement,
    dest: Dest,
    mode: Mode,
    count: usize,
    config: String,
    label: String,
    client_ns: Netns,
    client_ip: Ipv4Addr,
    to: Ipv4Addr,
    /// Index into the cursors: a pod IP and a ClusterIP target reaching the same backend
    /// from the same client share one, so that no 5-tuple reaches the backend twice.
    cursor: usize,
}

impl Target {
    fn key(&self, metric: Metric) -> String {
        key(metric, self.placement, &self.config, self.dest)
    }
    fn baseline(&self, metric: Metric) -> String {
        key(
            metric,
            self.placement,
            &format!("{}-{}", Mode::Weir.id(), count(self.count)),
            Dest::PodIp,
        )
    }
}

pub fn run(report: &mut Report, nets: &mut ServiceNetworks, settings: &Settings) -> Result<()> {
    let mut targets = Vec::new();
    let mut cursors = Vec::new();
    for c in &nets.clusters {
        for (placement, backend, vip) in [
            (Placement::CrossNode, c.far, FAR_IP),
            (Placement::SameNode, c.near, NEAR_IP),
        ] {
            cursors.push(TupleCursor::default());
            for (dest, to) in [(Dest::PodIp, backend), (Dest::ClusterIp, vip)] {
                targets.push(Target {
                    placement,
                    dest,
                    mode: c.mode,
                    count: c.count,
                    config: c.id(),
                    label: format!("{}, {}: {}", placement.label(), c.label(), dest.label()),
                    client_ns: c.client_ns.clone(),
                    client_ip: c.client_ip,
                    to,
                    cursor: cursors.len() - 1,
                });
            }
        }
    }
    // Every pair must connect before anything is measured.
    for t in &targets {
        for port in [RR_PORT, *CRR_PORTS.start()] {
            let ok = (0..20).any(|_| {
                traffic::can_connect(&t.client_ns.path(), t.to, port, Duration::from_millis(500))
                    || {
                        std::thread::sleep(Duration::from_millis(100));
                        false
                    }
            });
            if !ok {
                bail!(
                    "{}: the client {} cannot reach {}:{port}",
                    t.label,
                    t.client_ip,
                    t.to
                );
            }
        }
    }
    // Baselines first, so that the tables list them first.
    targets.sort_by_key(|t| {
        (
            t.placement != Placement::CrossNode,
            t.count,
            t.mode != Mode::Weir,
            t.dest == Dest::ClusterIp,
        )
    });
    let metrics = [Metric::ConnectionRate, Metric::RequestResponse];
    for &metric in &metrics {
        for t in &targets {
            define(report, t, metric);
        }
    }
    report.skip(format!(
        "services: kube-proxy's IPVS mode (the benchmark does not build it{})",
        if std::path::Path::new("/proc/net/ip_vs").exists() {
            ""
        } else {
            "; this kernel has no IPVS either: /proc/net/ip_vs is missing"
        }
    ));
    let _paused = PausedControllers::pause_clusters(nets.clusters.iter().map(|c| &c.cluster));
    for run in 1..=settings.runs {
        for &metric in &metrics {
            let mut line = format!("  [services run {run}/{}] {}:", settings.runs, metric.id());
            for t in &targets {
                let value = measure(report, t, &mut cursors[t.cursor], metric, settings)
                    .with_context(|| format!("{} {}", metric.id(), t.label))?;
                let _ = write!(
                    line,
                    " {}/{}/{}={}",
                    t.placement.id(),
                    t.config,
                    t.dest.id(),
                    super::report::num(value)
                );
            }
            println!("{line}");
        }
    }
    report.note(
        SECTION,
        "Baseline of every row: the backend's pod IP reached directly in the weir cluster with the same number of Services and placement. kube-proxy's rules hook every new connection, not only those to a Service: a connection to a pod IP misses every Service rule (in iptables mode it walks the whole KUBE-SERVICES chain; the measured Services sit halfway down it), which is what the kube-proxy pod IP rows show.",
    );
    report.note(
        SECTION,
        "The local clusters' controllers were paused (SIGSTOP) during the measurements; kube-proxy's IPVS mode is not measured.",
    );
    goals(report, settings);
    Ok(())
}

fn define(report: &mut Report, t: &Target, metric: Metric) {
    match metric {
        Metric::ConnectionRate => report.define(
            SECTION,
            t.key(metric),
            format!("{}: new connections (connect, request, close)", t.label),
            "connections/s",
            Better::Higher,
            Some(t.baseline(metric)),
        ),
        Metric::RequestResponse => {
            report.define(
                SECTION,
                t.key(metric) + ".tps",
                format!("{}: request/response rate", t.label),
                "transactions/s",
                Better::Higher,
                Some(t.baseline(metric) + ".tps"),
            );
            for p in ["p50", "p99"] {
                report.define(
                    SECTION,
                    format!("{}.{p}", t.key(metric)),
                    format!("{}: request/response latency {p}", t.label),
                    "µs",
                    Better::Lower,
                    Some(format!("{}.{p}", t.baseline(metric))),
                );
            }
        }
    }
}

fn measure(
    report: &mut Report,
    t: &Target,
    cursor: &mut TupleCursor,
    metric: Metric,
    s: &Settings,
) -> Result<f64> {
    match metric {
        Metric::ConnectionRate => {
            let rate = connection_rate(&t.client_ns.path(), t.client_ip, t.to, s.crr, cursor)?;
            report.record(&t.key(metric), rate);
            Ok(rate)
        }
        Metric::RequestResponse => {
            let r = request_response(&t.client_ns.path(), t.to, s.rr)?;
            report.record(&(t.key(metric) + ".tps"), r.transactions_per_s);
            report.record(&format!("{}.p50", t.key(metric)), r.p50_us);
            report.record(&format!("{}.p99", t.key(metric)), r.p99_us);
            Ok(r.transactions_per_s)
        }
    }
}

/// ClusterIP ≥ 0.95× pod IP connection rate, flat from 10 to 10k Services, ahead of every
/// kube-proxy mode.
fn goals(report: &mut Report, settings: &Settings) {
    let median = |k: &str| report.stats(k).map(|s| s.median);
    let (Some(&low), Some(&high)) = (settings.counts.first(), settings.counts.last()) else {
        return;
    };
    let mut new_goals = Vec::new();
    for placement in [Placement::CrossNode, Placement::SameNode] {
        let weir = |n: usize| format!("{}-{}", Mode::Weir.id(), count(n));
        for &n in &settings.counts {
            let k = key(Metric::ConnectionRate, placement, &weir(n), Dest::ClusterIp);
            if let Some(r) = report.ratio(&k) {
                new_goals.push(Goal {
                    goal: format!(
                        "ClusterIP ≥ 95 % of the pod IP's connection rate, {} Services ({})",
                        count(n),
                        placement.label()
                    ),
                    measured: format!("{:.0} %", r * 100.0),
                    met: Some(r >= 0.95),
                });
            }
        }
        let a = median(&key(
            Metric::ConnectionRate,
            placement,
            &weir(low),
            Dest::ClusterIp,
        ));
        let b = median(&key(
            Metric::ConnectionRate,
            placement,
            &weir(high),
            Dest::ClusterIp,
        ));
        if let (Some(a), Some(b)) = (a, b)
            && a > 0.0
        {
            let r = b / a;
            new_goals.push(Goal {
                goal: format!(
                    "ClusterIP connection rate flat from {} to {} Services (≥ 95 %, {})",
                    count(low),
                    count(high),
                    placement.label()
                ),
                measured: format!("{:.0} %", r * 100.0),
                met: Some(r >= 0.95),
            });
        }
        for &n in &settings.counts {
            let Some(w) = median(&key(
                Metric::ConnectionRate,
                placement,
                &weir(n),
                Dest::ClusterIp,
            )) else {
                continue;
            };
            let mut parts = vec![format!("weir {w:.0}/s")];
            let mut ahead = true;
            for mode in settings.modes.iter().filter(|&&m| m != Mode::Weir) {
                let k = key(
                    Metric::ConnectionRate,
                    placement,
                    &format!("{}-{}", mode.id(), count(n)),
                    Dest::ClusterIp,
                );
                if let Some(m) = median(&k) {
                    parts.push(format!("{} {m:.0}/s", mode.label()));
                    ahead &= w > m;
                }
            }
            parts.push("IPVS not measured".into());
            new_goals.push(Goal {
                goal: format!(
                    "ClusterIP connection rate ahead of every kube-proxy mode, {} Services ({})",
                    count(n),
                    placement.label()
                ),
                measured: parts.join(", "),
                met: Some(ahead),
            });
        }
    }
    report.goals.extend(new_goals);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Vec<ServiceSpec> {
        services(
            3,
            Ipv4Addr::new(10, 244, 1, 2),
            Ipv4Addr::new(10, 244, 0, 3),
        )
    }

    #[test]
    fn the_measured_services_are_among_the_count_halfway_down() {
        let s = services(
            10_000,
            Ipv4Addr::new(10, 244, 1, 2),
            Ipv4Addr::new(10, 244, 0, 3),
        );
        assert_eq!(s.len(), 10_000);
        assert_eq!(s[4999].name, "measured-far");
        assert_eq!(s[5000].name, "measured-near");
        let ips: std::collections::BTreeSet<_> = s.iter().map(|s| s.cluster_ip).collect();
        assert_eq!(ips.len(), s.len());
        assert!(
            s.iter()
                .filter(|s| s.name.starts_with("other"))
                .all(|s| s.ports.len() == 1)
        );
        let list = service_list(&s);
        let svc: k8s_openapi::api::core::v1::Service =
            serde_json::from_value(list["items"][4999].clone()).unwrap();
        assert_eq!(svc.spec.unwrap().cluster_ip.as_deref(), Some("10.96.0.10"));
    }

    #[test]
    fn iptables_rules_have_one_service_rule_per_port_and_split_endpoints_randomly() {
        let text = iptables_rules(&three());
        let services = text
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES"))
            .count();
        // other-0 (one port) and the two measured Services (17 ports each).
        assert_eq!(services, 1 + 2 * 17);
        assert!(text.contains("-d 10.96.1.0/32 -p tcp"));
        assert!(text.contains("--mode random --probability 0.50000000000"));
        assert!(text.contains("-j DNAT --to-destination 10.244.0.3:80"));
        assert!(text.contains("-A PREROUTING") && text.contains("-A OUTPUT"));
        assert!(text.ends_with("COMMIT\n"));
        // Every chain jumped to is declared.
        for l in text.lines().filter(|l| l.starts_with("-A ")) {
            let target = l.rsplit(" -j ").next().unwrap().split(' ').next().unwrap();
            if target.starts_with("KUBE-") {
                assert!(text.contains(&format!(":{target} - [0:0]")), "{target}");
            }
        }
        if let Some(ok) = check("iptables-restore", &["--test"], &text) {
            assert!(ok, "iptables-restore --test refused:\n{text}");
        }
    }

    #[test]
    fn nft_rules_map_each_port_to_a_chain_that_picks_an_endpoint() {
        let text = nft_rules("kp-test", &three());
        assert_eq!(text.matches(" : goto service-").count(), 1 + 2 * 17);
        assert!(text.contains("10.96.1.0 . tcp . 80 : goto service-bench-other-0-p80"));
        assert!(text.contains("numgen random mod 2 vmap { 0 : goto endpoint-"));
        assert!(text.contains("meta l4proto tcp dnat to 10.244.1.2:7000"));
        if let Some(ok) = check("nft", &["-c", "-f", "-"], &text) {
            assert!(ok, "nft -c refused:\n{text}");
        }
    }

    /// Runs a rule checker on `input` if it is installed and usable (root): Some(success).
    fn check(program: &str, args: &[&str], input: &str) -> Option<bool> {
        use std::io::Write as _;
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        let mut child = std::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .ok()?;
        child.stdin.take()?.write_all(input.as_bytes()).ok()?;
        Some(child.wait().ok()?.success())
    }
}
