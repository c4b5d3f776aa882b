//! Section `verdict`: what weir's programs cost per packet, measured with `BPF_PROG_TEST_RUN`
//! on the real programs and maps, the maps filled from a real compile.
//!
//! For each (policies, peer pods) configuration a synthetic cluster
//! ([`synthetic::verdict_cluster`]) is compiled by the controller's compiler; the node's state
//! goes into a freshly loaded dataplane with [`DataplaneMaps::sync_policy`] and endpoint
//! entries for the two local pods, as the agent would write them. Every configuration keeps
//! its own loaded programs and maps, so runs interleave configurations without rewriting maps.
//!
//! Two paths, both ending in a redirect to the server's veth:
//! * *same node*: `from_pod` on the client's veth, client → server (the client's egress rule
//!   set, not isolated, and the server's ingress rule set);
//! * *other node*: `from_network` on the uplink, a peer pod on another node → server (the
//!   server's ingress rule set against the peer's class). New flows cycle over every peer,
//!   so the traffic grows with the configuration: 10 peers keep their entries in cache, 10k
//!   do not.
//! * *other node, the same 1k peers*: the same path with the same traffic in every
//!   configuration: new flows from the first 1,000 peers (in 1,000 groups: as many classes,
//!   verdicts and rules), so only the cluster around them grows.
//! * *other node, a warm set of 10 peers*: the same path with new flows from the first 10
//!   peers only, whose class, verdict and counter entries stay in cache: what the spread-out
//!   traffic of the largest configuration is compared with (cold peers against warm ones).
//!
//! Two kinds of packets:
//! * *new flow*: a SYN whose 5-tuple conntrack has not seen, so the program classifies the
//!   peer, looks up the verdict and creates the conntrack entry. `BPF_PROG_TEST_RUN` repeats
//!   one packet, and the second repetition would already hit conntrack, so each new-flow
//!   packet is its own call with `repeat = 1`, and every packet of a run has a distinct
//!   5-tuple (other node: cycling over all peers); conntrack is emptied between runs. The
//!   kernel's per-call time then includes one clock read (tens of ns), the same in every
//!   configuration. A run's figure is the median of its packets (many packets per run:
//!   thousands in the full set).
//! * *established*: ACKs of a few flows whose SYNs went through first, one call each too:
//!   with `repeat > 1` the kernel runs the program again on the packet it just rewrote for
//!   the redirect (new MACs), which the anti-spoofing check then drops — the repetitions
//!   would measure a drop, not a forwarded packet.
//!
//! IPv6: the measured pods are dual-stack (the peers too, so the class and verdict tables
//! hold both families), and new flows over IPv6 are measured on the same-node and the
//! fixed-traffic other-node paths with the same programs and maps; a goal compares them with
//! the IPv4 figures of the same configuration.
//!
//! Baseline: the eBPF object has no trivial program to compare with, so the baseline is the
//! same programs with no policy at all (the server not isolated: conntrack, no class or
//! verdict lookup). Ratios show what policies add; flatness is the ratio between the
//! smallest and the largest configuration.
//!
//! ClusterNetworkPolicies: one more configuration, the largest NetworkPolicy one with 1k
//! ClusterNetworkPolicies added in both tiers
//! ([`synthetic::verdict_cluster_with_cluster_policies`]), measured with the same packets;
//! its baseline is that NetworkPolicy-only configuration. There the tiers decide the
//! measured flows: on the other-node paths a tenth of the peers are denied by an Admin Deny
//! rule (their packets are dropped, which the harness checks), a tenth accepted by an Admin
//! Accept rule, the rest passed to the NetworkPolicies; the same-node client's egress is
//! decided by the Baseline tier. Besides every packet's figure, the admitted and the denied
//! packets' medians are reported on their own.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    maps::{MapData, RingBuf},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use weir_agent::{dataplane::Dataplane, maps::DataplaneMaps};
use weir_api::PodKey;
use weir_common::{
    config::NodeConfig,
    conntrack::CtKey,
    endpoint::EndpointInfo,
    ip::IpKey,
    programs::{FROM_NETWORK, FROM_POD},
};
use weir_compiler::Compiler;

use super::{
    report::{Better, Goal, Report, Stats},
    synthetic::{self, ALLOWED_PORT, CLIENT_IP, Lane, SERVER_IP, ipv6_of, peer_ip},
};

const SECTION: &str = "verdict";

const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const SERVER_GW_MAC: [u8; 6] = [0xee, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];
const CLIENT_GW_MAC: [u8; 6] = [0xee, 0, 0, 0, 0, 0x03];
const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);

pub struct Settings {
    /// (policies, peer pods); the baseline (0 policies) is always added.
    pub configs: Vec<(usize, usize)>,
    /// Packets (calls) per run, path and kind of flow.
    pub packets: usize,
    pub runs: usize,
    /// ClusterNetworkPolicies added to the largest configuration (0: no such configuration).
    pub cluster_policies: usize,
}

impl Settings {
    pub fn new(quick: bool, runs: usize) -> Self {
        let sizes = [10, 1_000, 10_000];
        let configs = if quick {
            vec![(10, 10), (1_000, 1_000), (10_000, 10_000)]
        } else {
            sizes
                .iter()
                .flat_map(|&p| sizes.iter().map(move |&q| (p, q)))
                .collect()
        };
        Self {
            configs,
            packets: if quick { 1_000 } else { 5_000 },
            runs,
            cluster_policies: 1_000,
        }
    }
}

/// Peers of the fixed traffic ([`Path::OtherNodeSamePeers`]).
const SAME_PEERS: usize = 1_000;

/// Peers of the warm set ([`Path::OtherNodeWarmPeers`]).
const WARM_PEERS: usize = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    SameNode,
    OtherNode,
    /// The other-node path with the same traffic in every configuration: new flows from the
    /// first [`SAME_PEERS`] peers (fewer if the configuration has fewer), which fall into as
    /// many groups, so as many distinct classes, verdicts and rules. Only the cluster grows.
    OtherNodeSamePeers,
    /// The other-node path with new flows from the first [`WARM_PEERS`] peers only: their
    /// entries stay in cache, whatever the configuration.
    OtherNodeWarmPeers,
    /// [`Path::SameNode`] over IPv6.
    SameNodeV6,
    /// [`Path::OtherNodeSamePeers`] over IPv6.
    OtherNodeSamePeersV6,
}

impl Path {
    const ALL: [Path; 6] = [
        Path::SameNode,
        Path::OtherNode,
        Path::OtherNodeSamePeers,
        Path::OtherNodeWarmPeers,
        Path::SameNodeV6,
        Path::OtherNodeSamePeersV6,
    ];
    fn id(self) -> &'static str {
        match self {
            Path::SameNode => "same-node",
            Path::OtherNode => "other-node",
            Path::OtherNodeSamePeers => "other-node-same-peers",
            Path::OtherNodeWarmPeers => "other-node-warm-peers",
            Path::SameNodeV6 => "same-node-ipv6",
            Path::OtherNodeSamePeersV6 => "other-node-same-peers-ipv6",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Path::SameNode => "same node (from_pod)",
            Path::OtherNode => "other node (from_network)",
            Path::OtherNodeSamePeers => "other node (from_network), the same 1k peers",
            Path::OtherNodeWarmPeers => "other node (from_network), a warm set of 10 peers",
            Path::SameNodeV6 => "same node (from_pod), IPv6",
            Path::OtherNodeSamePeersV6 => "other node (from_network), the same 1k peers, IPv6",
        }
    }
    /// Established flows only differ by path, not by traffic: measured on the first two.
    fn flows(self) -> &'static [Flow] {
        match self {
            Path::SameNode | Path::OtherNode => &Flow::ALL,
            _ => &[Flow::New],
        }
    }
    fn same_node(self) -> bool {
        matches!(self, Path::SameNode | Path::SameNodeV6)
    }
    fn same_peers(self) -> bool {
        matches!(self, Path::OtherNodeSamePeers | Path::OtherNodeSamePeersV6)
    }
    /// The IPv4 path an IPv6 one is compared with.
    fn ipv4_counterpart(self) -> Option<Path> {
        match self {
            Path::SameNodeV6 => Some(Path::SameNode),
            Path::OtherNodeSamePeersV6 => Some(Path::OtherNodeSamePeers),
            _ => None,
        }
    }
    /// The address a packet of this path carries for a pod whose IPv4 address is `v4`.
    fn addr(self, v4: Ipv4Addr) -> IpAddr {
        if self.ipv4_counterpart().is_some() {
            IpAddr::V6(ipv6_of(v4))
        } else {
            IpAddr::V4(v4)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    New,
    Established,
}

impl Flow {
    const ALL: [Flow; 2] = [Flow::New, Flow::Established];
    fn id(self) -> &'static str {
        match self {
            Flow::New => "new",
            Flow::Established => "established",
        }
    }
}

/// The interfaces the programs see: created in the benchmark thread's private namespace.
struct Interfaces {
    server: u32,
    client: u32,
    uplink: u32,
}

/// One configuration: its own programs and maps.
struct Config {
    policies: usize,
    peers: usize,
    /// ClusterNetworkPolicies on top of the NetworkPolicies.
    cluster_policies: usize,
    dp: Dataplane,
    maps: DataplaneMaps,
    /// The flow events ring, emptied between runs as the agent empties it: a policy drop
    /// reports one, and on a full ring it would skip that work.
    events: RingBuf<MapData>,
}

impl Config {
    fn id(&self) -> String {
        if self.policies == 0 {
            "baseline".into()
        } else if self.cluster_policies > 0 {
            format!(
                "{}-policies-{}-peers-{}-cnps",
                self.policies, self.peers, self.cluster_policies
            )
        } else {
            np_id(self.policies, self.peers)
        }
    }
    fn label(&self) -> String {
        if self.policies == 0 {
            "no policy (baseline)".into()
        } else if self.cluster_policies > 0 {
            format!(
                "{} ClusterNetworkPolicies + {} policies × {} peers",
                count(self.cluster_policies),
                count(self.policies),
                count(self.peers)
            )
        } else {
            format!(
                "{} policies × {} peers",
                count(self.policies),
                count(self.peers)
            )
        }
    }
    /// The configuration its figures are compared with: the NetworkPolicy-only one of the
    /// same size for ClusterNetworkPolicies, no policy otherwise.
    fn baseline_id(&self) -> String {
        if self.cluster_policies > 0 {
            np_id(self.policies, self.peers)
        } else {
            "baseline".into()
        }
    }
    /// Whether the `n`-th packet of `path` is dropped by policy (an Admin Deny rule).
    fn drops(&self, path: Path, n: usize) -> bool {
        self.cluster_policies > 0
            && !path.same_node()
            && Lane::of_peer(peer_of(self, path, n)) == Lane::Quarantined
    }
}

fn np_id(policies: usize, peers: usize) -> String {
    format!("{policies}-policies-{peers}-peers")
}

/// `10000` → `10k`.
pub fn count(n: usize) -> String {
    if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

fn key(path: Path, flow: Flow, config: &str) -> String {
    format!("{SECTION}.{}.{}.{config}", path.id(), flow.id())
}

pub fn run(report: &mut Report, settings: &Settings) -> Result<()> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| run_in_private_netns(report, settings))
            .join()
            .map_err(|_| anyhow::anyhow!("the per-packet benchmark thread panicked"))?
    })
}

fn run_in_private_netns(report: &mut Report, settings: &Settings) -> Result<()> {
    // Only this thread moves: the interfaces the programs need (BPF_PROG_TEST_RUN resolves
    // the context's ifindex) never appear in the caller's namespace, and the namespace goes
    // away with the thread.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .context("unshare(CLONE_NEWNET) for the per-packet benchmark")?;
    let ifs = Interfaces {
        server: veth("bench-server")?,
        client: veth("bench-client")?,
        uplink: veth("bench-uplink")?,
    };
    let largest = settings.configs.iter().copied().max_by_key(|(p, q)| p * q);
    let with_cluster_policies = largest
        .filter(|_| settings.cluster_policies > 0)
        .map(|(p, q)| (p, q, settings.cluster_policies));
    let mut configs = Vec::new();
    for (policies, peers, cnps) in std::iter::once((0, 10, 0))
        .chain(settings.configs.iter().map(|&(p, q)| (p, q, 0)))
        .chain(with_cluster_policies)
    {
        let config = load(policies, peers, cnps, &ifs).with_context(|| {
            format!("preparing {policies} policies × {peers} peers, {cnps} ClusterNetworkPolicies")
        })?;
        configs.push(config);
    }
    for path in Path::ALL {
        for &flow in path.flows() {
            for c in &configs {
                let what = format!("{}, {} flow, {}", path.label(), flow.id(), c.label());
                let baseline = Some(key(path, flow, &c.baseline_id()));
                report.define(
                    SECTION,
                    key(path, flow, &c.id()),
                    what.clone(),
                    "ns/packet",
                    Better::Lower,
                    baseline.clone(),
                );
                if flow == Flow::New && c.cluster_policies > 0 && !path.same_node() {
                    for (part, label) in PARTS {
                        report.define(
                            SECTION,
                            key(path, flow, &format!("{}-{part}", c.id())),
                            format!("{what}: {label}"),
                            "ns/packet",
                            Better::Lower,
                            baseline.clone(),
                        );
                    }
                }
            }
        }
    }
    for run in 1..=settings.runs {
        for path in Path::ALL {
            for &flow in path.flows() {
                let mut line = format!(
                    "  [verdict run {run}/{}] {}, {} flow:",
                    settings.runs,
                    path.label(),
                    flow.id()
                );
                for c in &mut configs {
                    let ns = match flow {
                        Flow::New => {
                            let times = new_flows(c, &ifs, path, settings.packets)?;
                            if c.cluster_policies > 0 && !path.same_node() {
                                for (part, _) in PARTS {
                                    let dropped = part == "denied";
                                    let subset: Vec<f64> = times
                                        .iter()
                                        .filter(|&&(_, d)| d == dropped)
                                        .map(|&(t, _)| t)
                                        .collect();
                                    let m = median(&subset);
                                    report
                                        .record(&key(path, flow, &format!("{}-{part}", c.id())), m);
                                    line.push_str(&format!(" {}-{part}={m:.0}", c.id()));
                                }
                            }
                            median(&times.iter().map(|&(t, _)| t).collect::<Vec<_>>())
                        }
                        Flow::Established => established(c, &ifs, path, settings.packets)?,
                    };
                    report.record(&key(path, flow, &c.id()), ns);
                    line.push_str(&format!(" {}={ns:.0}", c.id()));
                }
                println!("{line}");
            }
        }
    }
    flatness_goal(report, settings);
    cold_peers_goal(report, settings);
    ipv6_goal(report, settings);
    if let Some(c) = configs.iter().find(|c| c.cluster_policies > 0) {
        cluster_policy_goal(report, c);
    }
    Ok(())
}

/// The separate figures of the configuration with ClusterNetworkPolicies on the paths where
/// some of its packets are dropped: key suffix and label.
const PARTS: [(&str, &str); 2] = [
    ("admitted", "admitted flows only"),
    ("denied", "flows denied by the Admin tier only"),
];

fn median(values: &[f64]) -> f64 {
    Stats::of(values).map_or(f64::NAN, |s| s.median)
}

/// Records whether ClusterNetworkPolicies cost nothing per packet: new flows in the
/// configuration with them within 1.1× of the same NetworkPolicy-only configuration, for
/// every packet and (where some are denied) for the admitted ones alone, whose work is the
/// NetworkPolicy-only configuration's (a dropped packet skips the conntrack insert).
fn cluster_policy_goal(report: &mut Report, c: &Config) {
    for path in Path::ALL {
        let np = report.stats(&key(path, Flow::New, &c.baseline_id()));
        let all = report.stats(&key(path, Flow::New, &c.id()));
        let admitted = report.stats(&key(path, Flow::New, &format!("{}-admitted", c.id())));
        let (measured, met) = match (np, all) {
            (Some(np), Some(all)) => {
                let r = all.median / np.median;
                let mut text = format!("{:.0} → {:.0} ns/packet ({r:.2}×)", np.median, all.median);
                let mut met = r <= 1.10;
                if let Some(a) = admitted {
                    let ra = a.median / np.median;
                    text.push_str(&format!(
                        "; admitted flows only {:.0} ns/packet ({ra:.2}×)",
                        a.median
                    ));
                    met &= ra <= 1.10;
                }
                (text, Some(met))
            }
            _ => ("—".into(), None),
        };
        report.goals.push(Goal {
            goal: format!(
                "ClusterNetworkPolicy costs nothing per packet, {}: new flow with {} ClusterNetworkPolicies + {} policies × {} peers within 1.1× of the NetworkPolicy-only figure",
                path.label(),
                count(c.cluster_policies),
                count(c.policies),
                count(c.peers)
            ),
            measured,
            met,
        });
    }
}

/// Records whether new flows from many peers not seen lately (the other-node path of the
/// largest NetworkPolicy configuration, cycling over all its peers) cost at most 1.3× of new
/// flows from a warm set of peers in the same configuration: what cache misses on the
/// class, verdict and counter entries add.
fn cold_peers_goal(report: &mut Report, settings: &Settings) {
    let Some(&(p, q)) = settings.configs.iter().max_by_key(|(p, q)| p * q) else {
        return;
    };
    let warm = report.stats(&key(Path::OtherNodeWarmPeers, Flow::New, &np_id(p, q)));
    let cold = report.stats(&key(Path::OtherNode, Flow::New, &np_id(p, q)));
    let (measured, met) = match (warm, cold) {
        (Some(w), Some(c)) => {
            let r = c.median / w.median;
            (
                format!(
                    "warm set {:.0} → {} cold peers {:.0} ns/packet ({r:.2}×)",
                    w.median,
                    count(q),
                    c.median
                ),
                Some(r <= 1.30),
            )
        }
        _ => ("—".into(), None),
    };
    report.goals.push(Goal {
        goal: format!(
            "new flows from {} cold peers at {} policies × {} peers ≤ 1.3× of a warm set of {WARM_PEERS} peers (other node, from_network)",
            count(q),
            count(p),
            count(q)
        ),
        measured,
        met,
    });
}

/// Records whether IPv6 costs what IPv4 does: new flows over IPv6 within 1.15× of IPv4 in
/// the largest NetworkPolicy configuration, per path.
fn ipv6_goal(report: &mut Report, settings: &Settings) {
    let Some(&(p, q)) = settings.configs.iter().max_by_key(|(p, q)| p * q) else {
        return;
    };
    for path in Path::ALL {
        let Some(v4) = path.ipv4_counterpart() else {
            continue;
        };
        let a = report.stats(&key(v4, Flow::New, &np_id(p, q)));
        let b = report.stats(&key(path, Flow::New, &np_id(p, q)));
        let (measured, met) = match (a, b) {
            (Some(a), Some(b)) => {
                let r = b.median / a.median;
                (
                    format!(
                        "IPv4 {:.0} → IPv6 {:.0} ns/packet ({r:.2}×)",
                        a.median, b.median
                    ),
                    Some(r <= 1.15),
                )
            }
            _ => ("—".into(), None),
        };
        report.goals.push(Goal {
            goal: format!(
                "IPv6 as fast as IPv4, {}: new flow at {} policies × {} peers within 1.15× of IPv4",
                v4.label(),
                count(p),
                count(q)
            ),
            measured,
            met,
        });
    }
}

/// Records whether the new-flow cost stays flat from the smallest to the largest
/// configuration (within 10 %: more than that is a trend, not noise, at these medians).
///
/// The goal is about the cluster, not the traffic: on the same-node path the traffic is one
/// client in every configuration, and on the fixed-traffic path the same 1k peers; both are
/// compared from the smallest configuration that carries that traffic (10 × 10, and 1k × 1k)
/// to the largest. The other-node path, whose traffic spreads over every peer (10 in the
/// smallest configuration, 10k in the largest), compares warm caches with cold ones: its
/// goal is [`cold_peers_goal`], against a warm set in the same configuration.
fn flatness_goal(report: &mut Report, settings: &Settings) {
    let id = |(p, q): (usize, usize)| format!("{p}-policies-{q}-peers");
    for path in [Path::SameNode, Path::OtherNodeSamePeers] {
        let carries = |(p, q): &&(usize, usize)| match path {
            Path::OtherNodeSamePeers => *p >= SAME_PEERS && *q >= SAME_PEERS,
            _ => true,
        };
        let (Some(&small), Some(&large)) = (
            settings
                .configs
                .iter()
                .filter(carries)
                .min_by_key(|(p, q)| p * q),
            settings
                .configs
                .iter()
                .filter(carries)
                .max_by_key(|(p, q)| p * q),
        ) else {
            continue;
        };
        if small == large {
            continue;
        }
        let a = report.stats(&key(path, Flow::New, &id(small)));
        let b = report.stats(&key(path, Flow::New, &id(large)));
        let (measured, met) = match (a, b) {
            (Some(a), Some(b)) => {
                let r = b.median / a.median;
                (
                    format!("{:.0} → {:.0} ns/packet ({r:.2}×)", a.median, b.median),
                    Some(r <= 1.10),
                )
            }
            _ => ("—".into(), None),
        };
        report.goals.push(Goal {
            goal: format!(
                "flat per-packet cost, {}: new flow at {} policies × {} peers within 1.1× of {} × {}",
                path.label(),
                count(large.0),
                count(large.1),
                count(small.0),
                count(small.1)
            ),
            measured,
            met,
        });
    }
}

/// Creates a veth pair in the current (private) namespace; returns the first end's ifindex.
fn veth(name: &str) -> Result<u32> {
    let peer = format!("{name}-p");
    let out = Command::new("ip")
        .args(["link", "add", name, "type", "veth", "peer", "name", &peer])
        .output()
        .context("running ip")?;
    ensure!(
        out.status.success(),
        "ip link add {name}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(nix::net::if_::if_nametoindex(name)?)
}

fn load(policies: usize, peers: usize, cnps: usize, ifs: &Interfaces) -> Result<Config> {
    let started = Instant::now();
    let cluster = if cnps > 0 {
        synthetic::verdict_cluster_with_cluster_policies(policies, peers, cnps)?
    } else {
        synthetic::verdict_cluster(policies, peers)?
    };
    let out = Compiler::new().compile_all(&cluster);
    let compiled = started.elapsed();
    let state = out
        .nodes
        .get(synthetic::VERDICT_NODE)
        .context("the compile has no state for the benchmark node")?;
    let rule_sets = |pod: &str| {
        state
            .endpoints
            .get(&PodKey::new(synthetic::VERDICT_NAMESPACE, pod))
            .copied()
            .with_context(|| format!("the compiled state has no endpoint {pod}"))
    };
    let server = rule_sets(synthetic::SERVER)?;
    let client = rule_sets(synthetic::CLIENT)?;
    ensure!(
        (policies == 0) == (server.ingress == weir_api::NOT_ISOLATED),
        "the server is isolated iff there are policies"
    );
    let started = Instant::now();
    let mut dp = Dataplane::load(None).context("loading the eBPF programs")?;
    let mut maps = DataplaneMaps::take(&mut dp)?;
    let events = RingBuf::try_from(dp.take_map(weir_common::maps::EVENTS)?)
        .context("the flow events map is not a ring buffer")?;
    let loaded = started.elapsed();
    let started = Instant::now();
    maps.set_config(NodeConfig::new(1, 0, 0))?;
    maps.sync_host_addrs(&[NODE_IP.into()])?;
    let written = maps.sync_policy(state, &weir_api::NodeState::default())?;
    ensure!(
        written.is_complete(),
        "{} policy entries did not fit: {:?}",
        written.missing(),
        written.first_error
    );
    let server_ep = EndpointInfo::new(ifs.server, SERVER_MAC, SERVER_GW_MAC)
        .with_policies(server.ingress, server.egress);
    let client_ep = EndpointInfo::new(ifs.client, CLIENT_MAC, CLIENT_GW_MAC)
        .with_policies(client.ingress, client.egress);
    // Both of each pod's addresses, as the agent writes them.
    let endpoints = BTreeMap::from([
        (IpKey::from(SERVER_IP), server_ep),
        (IpKey::from(ipv6_of(SERVER_IP)), server_ep),
        (IpKey::from(CLIENT_IP), client_ep),
        (IpKey::from(ipv6_of(CLIENT_IP)), client_ep),
    ]);
    maps.sync_endpoints(&endpoints)?;
    println!(
        "  prepared {policies} policies × {peers} peers, {cnps} ClusterNetworkPolicies: compile {compiled:.1?}, load {loaded:.1?}, {} classes and {} verdicts written in {:.1?}",
        state.peer_classes.len(),
        state.verdicts.len(),
        started.elapsed()
    );
    Ok(Config {
        policies,
        peers,
        cluster_policies: cnps,
        dp,
        maps,
        events,
    })
}

/// The peers whose new flows an other-node path cycles through.
fn path_peers(c: &Config, path: Path) -> usize {
    if path == Path::OtherNodeWarmPeers {
        c.peers.min(WARM_PEERS)
    } else if path.same_peers() {
        c.peers.min(SAME_PEERS)
    } else {
        c.peers
    }
}

/// The peer that sends the `n`-th packet of an other-node path.
fn peer_of(c: &Config, path: Path, n: usize) -> usize {
    n % path_peers(c, path)
}

/// The packet a flow's `n`-th sender sends: (program, ifindex, frame).
fn packet(
    c: &Config,
    ifs: &Interfaces,
    path: Path,
    n: usize,
    flags: u8,
) -> (&'static str, u32, Vec<u8>) {
    if path.same_node() {
        // One client: the source port makes the flow.
        let sport = 1024 + (n % 64_000) as u16;
        (
            FROM_POD,
            ifs.client,
            tcp_frame(
                CLIENT_MAC,
                CLIENT_GW_MAC,
                path.addr(CLIENT_IP),
                path.addr(SERVER_IP),
                sport,
                ALLOWED_PORT,
                flags,
            ),
        )
    } else {
        let peer = peer_of(c, path, n);
        let sport = 1024 + ((n / path_peers(c, path)) % 64_000) as u16;
        (
            FROM_NETWORK,
            ifs.uplink,
            tcp_frame(
                ROUTER_MAC,
                UPLINK_MAC,
                path.addr(peer_ip(peer)),
                path.addr(SERVER_IP),
                sport,
                ALLOWED_PORT,
                flags,
            ),
        )
    }
}

/// Kernel time of each of `count` new flows, one call each, and whether policy dropped it
/// (as it should: checked).
fn new_flows(
    c: &mut Config,
    ifs: &Interfaces,
    path: Path,
    count: usize,
) -> Result<Vec<(f64, bool)>> {
    clear_conntrack(&mut c.maps);
    let packets: Vec<_> = (0..count)
        .map(|n| (packet(c, ifs, path, n, TCP_SYN), c.drops(path, n)))
        .collect();
    let what = format!("{}, {}", c.label(), path.label());
    let mut times = Vec::with_capacity(count);
    for ((program, ifindex, frame), dropped) in &packets {
        let prog = c.dp.program(program)?;
        let (verdict, t) = test_run(prog, *ifindex, frame)?;
        if *dropped {
            ensure_dropped(verdict, &what)?;
        } else {
            ensure_redirected(verdict, &what)?;
        }
        times.push((t.as_nanos() as f64, *dropped));
    }
    clear_conntrack(&mut c.maps);
    while c.events.next().is_some() {}
    Ok(times)
}

/// Median kernel time of `count` packets of established flows, one call each (see the
/// module docs: a repeated packet would meet its own rewritten MACs).
fn established(c: &mut Config, ifs: &Interfaces, path: Path, count: usize) -> Result<f64> {
    clear_conntrack(&mut c.maps);
    let flows = 8;
    let what = format!("{}, {}", c.label(), path.label());
    let mut acks = Vec::with_capacity(flows);
    for n in 0..flows {
        let (program, ifindex, syn) = packet(c, ifs, path, n, TCP_SYN);
        let (_, _, ack) = packet(c, ifs, path, n, TCP_ACK);
        let (verdict, _) = test_run(c.dp.program(program)?, ifindex, &syn)?;
        ensure_redirected(verdict, &what)?;
        acks.push((program, ifindex, ack));
    }
    let mut times = Vec::with_capacity(count);
    for i in 0..count {
        let (program, ifindex, ack) = &acks[i % flows];
        let (verdict, t) = test_run(c.dp.program(program)?, *ifindex, ack)?;
        ensure_redirected(verdict, &what)?;
        times.push(t.as_nanos() as f64);
    }
    clear_conntrack(&mut c.maps);
    Ok(Stats::of(&times).map_or(f64::NAN, |s| s.median))
}

/// A benchmark of dropped packets would measure the wrong thing: every packet is allowed
/// (but those an Admin Deny rule drops on purpose, [`ensure_dropped`]).
fn ensure_redirected(verdict: u32, what: &str) -> Result<()> {
    if verdict != TC_ACT_REDIRECT {
        bail!(
            "{what}: the program returned {verdict}, not TC_ACT_REDIRECT (the synthetic cluster's policies should allow every measured packet)"
        );
    }
    Ok(())
}

/// The packets of the peers a ClusterNetworkPolicy denies must be dropped.
fn ensure_dropped(verdict: u32, what: &str) -> Result<()> {
    if verdict != TC_ACT_SHOT {
        bail!(
            "{what}: the program returned {verdict}, not TC_ACT_SHOT (the Admin tier should deny this peer)"
        );
    }
    Ok(())
}

fn clear_conntrack(maps: &mut DataplaneMaps) {
    let keys: Vec<CtKey> = maps.conntrack.keys().filter_map(|k| k.ok()).collect();
    for k in keys {
        let _ = maps.conntrack.remove(&k);
    }
}

/// One `BPF_PROG_TEST_RUN` call of one repetition; the program's verdict and the kernel's
/// time for it.
fn test_run(prog: &mut SchedClassifier, ifindex: u32, frame: &[u8]) -> Result<(u32, Duration)> {
    // struct __sk_buff up to and including `ifindex` (offset 40).
    let mut ctx = [0u8; 44];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.ctx_in = Some(&ctx);
    let res = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    Ok((res.return_value, res.duration))
}

/// Ethernet + IPv4 or IPv6 + TCP, no options, no payload, valid checksums. `src` and `dst`
/// are of one family.
fn tcp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    flags: u8,
) -> Vec<u8> {
    let eth = etherparse::PacketBuilder::ethernet2(src_mac, dst_mac);
    let ip = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("{src} and {dst} are of different families"),
    };
    let mut tcp = ip.tcp(sport, dport, 0, 64240);
    if flags & TCP_SYN != 0 {
        tcp = tcp.syn();
    }
    if flags & TCP_ACK != 0 {
        tcp = tcp.ack(0);
    }
    let mut f = Vec::with_capacity(74);
    tcp.write(&mut f, &[]).expect("a frame within IP's size");
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_valid_checksums() {
        let f = tcp_frame(
            CLIENT_MAC,
            CLIENT_GW_MAC,
            CLIENT_IP.into(),
            SERVER_IP.into(),
            1234,
            80,
            TCP_SYN,
        );
        assert_eq!(f.len(), 54);
        let (ip, rest) = etherparse::Ipv4Header::from_slice(&f[14..]).unwrap();
        assert_eq!(ip.header_checksum, ip.calc_header_checksum());
        let (tcp, _) = etherparse::TcpHeader::from_slice(rest).unwrap();
        assert_eq!(tcp.checksum, tcp.calc_checksum_ipv4(&ip, &[]).unwrap());
        assert_eq!(tcp.source_port, 1234);
        assert!(tcp.syn && !tcp.ack);

        let f = tcp_frame(
            CLIENT_MAC,
            CLIENT_GW_MAC,
            Path::SameNodeV6.addr(CLIENT_IP),
            Path::SameNodeV6.addr(SERVER_IP),
            1234,
            80,
            TCP_SYN,
        );
        assert_eq!(f.len(), 74);
        assert_eq!(u16::from_be_bytes([f[12], f[13]]), 0x86dd);
        let (ip, rest) = etherparse::Ipv6Header::from_slice(&f[14..]).unwrap();
        assert_eq!(ip.source, ipv6_of(CLIENT_IP).octets());
        let (tcp, _) = etherparse::TcpHeader::from_slice(rest).unwrap();
        assert_eq!(tcp.checksum, tcp.calc_checksum_ipv6(&ip, &[]).unwrap());
    }

    #[test]
    fn counts_print_in_thousands() {
        assert_eq!(count(10_000), "10k");
        assert_eq!(count(10), "10");
        assert_eq!(count(1_500), "1500");
    }
}
