//! `weirctl trace`: what the dataplane decides for one packet, and why, step by step, from
//! the tables a node holds: the endpoint entries of both ends, their rule sets, the peer
//! class of the other end, the verdict entry that matches (longest match, as the kernel's
//! lookup) and the policy rule it came from, on the egress side (the source's node) and the
//! ingress side (the destination's node). A ClusterIP is translated first, as the source's
//! node does, and a nodePort on a node's address as that node does; each backend is traced.
//!
//! The lookups are `weir_api`'s emulation of the kernel's (`NodeState::longest_class_match`
//! and `longest_verdict_match`), run over entries read from the node's pinned maps in a
//! local cluster, over the agent's applied state in Kubernetes, and over freshly compiled
//! states in the playground (`--manifests`).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
    str::FromStr,
};

use anyhow::{Result, bail};
use serde::Serialize;
use weir_api::{
    Action, BackendState, CLASS_UNMATCHED, ClusterFrontends, Direction, EndpointPolicy,
    FrontendKind, IpProto, NOT_ISOLATED, NodeState, PodKey, ServiceBackend, ServiceEntry,
    ServiceFrontend,
};
use weir_common::policy::FAIL_CLOSED;
use weir_compiler::PodInfo;

use crate::flows::proto_name;

/// What one node holds for policy.
#[derive(Clone, Debug, Default)]
pub struct NodeView {
    pub node: String,
    /// Local pod address → its rule sets.
    pub endpoints: BTreeMap<IpAddr, EndpointPolicy>,
    /// The node's own addresses (traffic from them to local pods is always allowed).
    pub host_addrs: BTreeSet<IpAddr>,
    /// Classes and verdicts as the dataplane holds them; rule and rule-set names and
    /// Services as the agent (or compiler) knows them.
    pub state: NodeState,
    /// Where the tables come from, for the report.
    pub source: String,
}

/// One end of the traced packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Spec {
    Pod(PodKey),
    Ip(IpAddr),
}

impl FromStr for Spec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(ip) = s.parse() {
            return Ok(Spec::Ip(ip));
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Spec::Pod(PodKey::new(ns, name)))
            }
            _ => Err(format!("{s:?} is neither namespace/pod nor an IP address")),
        }
    }
}

/// `--to`: an end with an optional port (`ns/pod:80`, `10.0.0.1:80`, `[2001:db8::1]:80`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecPort(pub Spec, pub Option<u16>);

impl FromStr for SpecPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(SpecPort(Spec::Ip(ip), None));
        }
        if let Some(rest) = s.strip_prefix('[') {
            let (ip, port) = rest
                .split_once("]:")
                .ok_or_else(|| format!("{s:?}: expected [address]:port"))?;
            let ip = ip
                .parse()
                .map_err(|_| format!("{ip:?} is not an address"))?;
            let port = port
                .parse()
                .map_err(|_| format!("{port:?} is not a port"))?;
            return Ok(SpecPort(Spec::Ip(ip), Some(port)));
        }
        match s.rsplit_once(':') {
            Some((end, port)) => {
                let port = port
                    .parse()
                    .map_err(|_| format!("{port:?} is not a port number"))?;
                Ok(SpecPort(end.parse()?, Some(port)))
            }
            None => Ok(SpecPort(s.parse()?, None)),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Request {
    pub from: Spec,
    pub to: Spec,
    pub proto: IpProto,
    pub port: u16,
}

/// One side's check.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SideTrace {
    pub direction: &'static str,
    pub node: String,
    /// The pod whose rule set is checked.
    pub endpoint: String,
    pub rule_set: u32,
    /// The policies whose union the rule set is (as the agent names them).
    pub policies: Vec<String>,
    /// The other end, whose class is looked up.
    pub peer: IpAddr,
    /// The prefix that classified the peer, and its class.
    pub class_prefix: Option<String>,
    pub class: Option<u32>,
    /// The verdict entry matched: rule set, class, protocol, ports.
    pub entry: Option<String>,
    pub allowed: bool,
    /// The deciding rule: `NetworkPolicy/<ns>/<name> <direction> #<index>` or
    /// `ClusterNetworkPolicy/<name>/<rule> <direction> (<tier> tier, priority <n>)`.
    pub rule: Option<String>,
    /// Why, in words.
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PathTrace {
    pub dst: IpAddr,
    pub dst_pod: Option<String>,
    /// The source the destination sees (the client, or the address of the node that
    /// forwarded a nodePort flow).
    pub src: IpAddr,
    pub port: u16,
    pub egress: Option<SideTrace>,
    pub ingress: Option<SideTrace>,
    /// Why a side was not checked.
    pub notes: Vec<String>,
    pub allowed: bool,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ServiceStep {
    /// The node that translates.
    pub node: String,
    /// `ClusterIP` or `NodePort`.
    pub kind: &'static str,
    pub service: String,
    pub frontend: String,
    pub backends: Vec<String>,
    /// How the frontend is translated, in words.
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Trace {
    pub src: IpAddr,
    pub src_pod: Option<String>,
    pub src_node: Option<String>,
    pub dst: IpAddr,
    pub dst_pod: Option<String>,
    pub proto: String,
    pub port: u16,
    pub service: Option<ServiceStep>,
    pub paths: Vec<PathTrace>,
    pub allowed: bool,
    /// Where each node's tables came from.
    pub sources: BTreeMap<String, String>,
}

fn pod_address(pods: &[PodInfo], key: &PodKey) -> Result<IpAddr> {
    let Some(pod) = pods.iter().find(|p| &p.key == key) else {
        bail!("no pod {key}");
    };
    match pod.ips.first() {
        Some(ip) => Ok(*ip),
        None => bail!("pod {key} has no address yet"),
    }
}

fn pod_at(pods: &[PodInfo], ip: IpAddr) -> Option<String> {
    pods.iter()
        .find(|p| p.ips.contains(&ip))
        .map(|p| p.key.to_string())
}

fn view_of(views: &[NodeView], ip: IpAddr) -> Option<&NodeView> {
    views.iter().find(|v| v.endpoints.contains_key(&ip))
}

fn ports_text(proto: Option<IpProto>, ports: Option<weir_api::PortPrefix>) -> String {
    match (proto, ports) {
        (None, _) => "any protocol".into(),
        (Some(p), None) => format!("{} any port", proto_name(p)),
        (Some(p), Some(pp)) if pp.first() == pp.last() => {
            format!("{} {}", proto_name(p), pp.first())
        }
        (Some(p), Some(pp)) => format!("{} {}-{}", proto_name(p), pp.first(), pp.last()),
    }
}

/// Checks one side: `rule_set` of `endpoint` on `view` against `peer`.
fn check_side(
    view: &NodeView,
    direction: Direction,
    endpoint: String,
    rule_set: u32,
    peer: IpAddr,
    proto: IpProto,
    port: u16,
) -> SideTrace {
    let dir = match direction {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    };
    let mut side = SideTrace {
        direction: dir,
        node: view.node.clone(),
        endpoint,
        rule_set,
        policies: view
            .state
            .rule_sets
            .get(&rule_set)
            .map(|i| i.policies.iter().map(|p| p.to_string()).collect())
            .unwrap_or_default(),
        peer,
        class_prefix: None,
        class: None,
        entry: None,
        allowed: false,
        rule: None,
        reason: String::new(),
    };
    if rule_set == NOT_ISOLATED {
        side.allowed = true;
        side.reason = format!("no policy selects it for {dir}");
        return side;
    }
    if rule_set == FAIL_CLOSED {
        side.reason =
            "its rule set could not be written in full: fail closed, every new flow denied".into();
        return side;
    }
    if direction == Direction::Ingress && view.host_addrs.contains(&peer) {
        side.allowed = true;
        side.reason = "from the node itself: always allowed (kubelet probes)".into();
        return side;
    }
    let matched = view.state.longest_class_match(peer);
    let class = matched.map_or(CLASS_UNMATCHED, |(_, c)| c);
    side.class_prefix = matched.map(|(net, _)| net.to_string());
    side.class = Some(class);
    match view
        .state
        .longest_verdict_match(rule_set, class, proto, port)
    {
        Some(m) => {
            let entry = view.state.verdicts[&m];
            side.entry = Some(format!(
                "rule set {}, class {}, {}",
                m.rule_set,
                m.class,
                ports_text(m.proto, m.ports)
            ));
            side.allowed = entry.action == Action::Allow;
            side.rule = view.state.rules.get(&entry.rule).map(|r| r.to_string());
            if side.rule.is_none() && entry.rule != 0 {
                side.rule = Some(format!("rule id {} (name unknown)", entry.rule));
            }
            side.reason = match (side.allowed, &side.rule) {
                (true, Some(r)) => format!("allowed by {r}"),
                (true, None) => "allowed".into(),
                (false, Some(r)) => format!("denied by {r}"),
                (false, None) => "denied".into(),
            };
        }
        None => {
            side.reason = format!(
                "no verdict entry matches: isolated for {dir} and no rule of {} allows it",
                if side.policies.is_empty() {
                    format!("rule set {rule_set}")
                } else {
                    side.policies.join(", ")
                }
            );
        }
    }
    side
}

/// One path to check: the source's egress towards what it addresses, then the
/// destination's ingress against the source its packets arrive with.
struct Hop {
    /// What the source's egress rules judge: the address and port the packet leaves with.
    egress_to: (IpAddr, u16),
    /// The pod (or address) that receives it, and on which port.
    dst: IpAddr,
    port: u16,
    /// The source the destination's ingress rules see.
    peer: IpAddr,
    /// A pod reaching itself through a frontend its node translates: no policy applies.
    hairpin: bool,
    notes: Vec<String>,
}

impl Hop {
    /// A packet that reaches `dst` as sent: no translation on the way.
    fn direct(src: IpAddr, dst: IpAddr, port: u16) -> Self {
        Hop {
            egress_to: (dst, port),
            dst,
            port,
            peer: src,
            hairpin: false,
            notes: Vec::new(),
        }
    }
}

fn trace_path(
    views: &[NodeView],
    pods: &[PodInfo],
    src: IpAddr,
    hop: Hop,
    proto: IpProto,
) -> PathTrace {
    let Hop {
        egress_to,
        dst,
        port,
        peer,
        hairpin,
        mut notes,
    } = hop;
    if hairpin {
        notes.push(format!(
            "{src} is its own backend (hairpin): not subject to policy"
        ));
        return PathTrace {
            dst,
            dst_pod: pod_at(pods, dst),
            src: peer,
            port,
            egress: None,
            ingress: None,
            notes,
            allowed: true,
        };
    }
    let egress = match view_of(views, src) {
        Some(v) => Some(check_side(
            v,
            Direction::Egress,
            pod_at(pods, src).unwrap_or_else(|| src.to_string()),
            v.endpoints[&src].egress,
            egress_to.0,
            proto,
            egress_to.1,
        )),
        None => match node_with_address(views, src)
            .filter(|v| host_policy(v, &PodKey::host()).egress != NOT_ISOLATED)
        {
            Some(v) => {
                let host = host_policy(v, &PodKey::host());
                notes.push(format!(
                    "{src} is node {}'s: its host policy's egress rules apply (the agent's \
                     outbound failsafe ports pass whatever they say)",
                    v.node
                ));
                Some(check_side(
                    v,
                    Direction::Egress,
                    format!("node {}", v.node),
                    host.egress,
                    egress_to.0,
                    proto,
                    egress_to.1,
                ))
            }
            None => {
                notes.push(format!("{src} is no node's pod: no egress check"));
                None
            }
        },
    };
    let ingress = match view_of(views, dst) {
        Some(v) => Some(check_side(
            v,
            Direction::Ingress,
            pod_at(pods, dst).unwrap_or_else(|| dst.to_string()),
            v.endpoints[&dst].ingress,
            peer,
            proto,
            port,
        )),
        None => match node_with_address(views, dst).filter(|v| {
            host_policy(v, &PodKey::host()).ingress != NOT_ISOLATED
                || host_policy(v, &PodKey::host_untracked()).ingress != NOT_ISOLATED
        }) {
            Some(v) => Some(host_ingress(v, &mut notes, dst, peer, proto, port)),
            None => {
                notes.push(format!("{dst} is no node's pod: no ingress check"));
                None
            }
        },
    };
    let allowed =
        egress.as_ref().is_none_or(|s| s.allowed) && ingress.as_ref().is_none_or(|s| s.allowed);
    PathTrace {
        dst,
        dst_pod: pod_at(pods, dst),
        src: peer,
        port,
        egress,
        ingress,
        notes,
        allowed,
    }
}

/// The rule sets of the node's host-policy endpoint `key` ([`PodKey::host`],
/// [`PodKey::host_untracked`]); not isolated when no host policy selects the node.
fn host_policy(view: &NodeView, key: &PodKey) -> EndpointPolicy {
    view.state
        .endpoints
        .get(key)
        .copied()
        .unwrap_or(EndpointPolicy {
            ingress: NOT_ISOLATED,
            egress: NOT_ISOLATED,
        })
}

/// A packet from the network to node `view`'s address `dst`: its untracked rules (in XDP)
/// first, then its host policy's ingress rules.
fn host_ingress(
    view: &NodeView,
    notes: &mut Vec<String>,
    dst: IpAddr,
    peer: IpAddr,
    proto: IpProto,
    port: u16,
) -> SideTrace {
    let endpoint = format!("node {}", view.node);
    let untracked = host_policy(view, &PodKey::host_untracked()).ingress;
    if untracked != NOT_ISOLATED {
        let side = check_side(
            view,
            Direction::Ingress,
            endpoint.clone(),
            untracked,
            peer,
            proto,
            port,
        );
        // Untracked rules only deny: no rule, no decision.
        if !side.allowed && side.rule.is_some() {
            notes.push(format!(
                "{dst} is node {}'s: dropped in XDP by an untracked rule, before conntrack \
                 (unless the port is one of the agent's failsafe ports)",
                view.node
            ));
            return side;
        }
    }
    let host = host_policy(view, &PodKey::host());
    notes.push(format!(
        "{dst} is node {}'s: its host policy's ingress rules apply (the agent's inbound \
         failsafe ports pass whatever they say)",
        view.node
    ));
    check_side(
        view,
        Direction::Ingress,
        endpoint,
        host.ingress,
        peer,
        proto,
        port,
    )
}

/// The node `ip` is an address of: its pinned `HOST_ADDRS`, or the route table's address of
/// the node (where the view has no host addresses, as in Kubernetes).
fn node_with_address(views: &[NodeView], ip: IpAddr) -> Option<&NodeView> {
    views.iter().find(|v| {
        v.host_addrs.contains(&ip)
            || v.state
                .routes
                .values()
                .any(|r| r.node == v.node && r.node_ip == ip)
    })
}

/// The backends the node's dataplane picks from: the ready ones, or all (the terminating
/// fallback) when none is ready — as the agent writes the slots.
fn usable(entry: &ServiceEntry) -> Vec<&ServiceBackend> {
    let ready: Vec<_> = entry
        .backends
        .iter()
        .filter(|b| b.state == BackendState::Ready)
        .collect();
    if ready.is_empty() {
        entry.backends.iter().collect()
    } else {
        ready
    }
}

fn service_step(
    view: &NodeView,
    pods: &[PodInfo],
    kind: &'static str,
    frontend: String,
    entry: &ServiceEntry,
    backends: &[&ServiceBackend],
) -> ServiceStep {
    ServiceStep {
        node: view.node.clone(),
        kind,
        service: entry.service.to_string(),
        frontend,
        backends: backends
            .iter()
            .map(|b| {
                let name = pod_at(pods, b.ip)
                    .map(|p| format!("{p} "))
                    .unwrap_or_default();
                format!("{name}{}:{}", b.ip, b.port)
            })
            .collect(),
        notes: Vec::new(),
    }
}

/// A packet a pod sends to a frontend its own node translates (`from_pod`), or a node's
/// process connects to (the socket hooks): to the backend, from the client, egress judged
/// against the backend. A pod that is its own backend (hairpin) gets the frontend's address
/// as its peer and no policy applies.
fn translated_at_source(src: IpAddr, backend: &ServiceBackend) -> Hop {
    let mut hop = Hop::direct(src, backend.ip, backend.port);
    hop.hairpin = backend.ip == src;
    hop
}

/// A ClusterIP, translated on the source's node (any node's table if the source is not a
/// pod: every node holds the same ClusterIPs).
fn cluster_ip(
    views: &[NodeView],
    pods: &[PodInfo],
    src: IpAddr,
    src_node: Option<&str>,
    dst: IpAddr,
    req: &Request,
) -> Option<(ServiceStep, Vec<Hop>)> {
    let frontend = ServiceFrontend {
        kind: FrontendKind::ClusterIp,
        ip: dst,
        port: req.port,
        proto: req.proto,
    };
    let (view, entry) = views
        .iter()
        .filter(|v| src_node.is_none_or(|n| n == v.node))
        .find_map(|v| Some((v, v.state.services.get(&frontend)?)))?;
    let backends = usable(entry);
    let step = service_step(
        view,
        pods,
        "ClusterIP",
        format!("{dst}:{} {}", req.port, proto_name(req.proto)),
        entry,
        &backends,
    );
    let hops = backends
        .iter()
        .map(|b| translated_at_source(src, b))
        .collect();
    Some((step, hops))
}

/// A nodePort on one of a node's addresses, translated by that node: by `from_pod` (like a
/// ClusterIP) for its own pods and, through the socket hooks, its own processes; by
/// `from_network` for everyone else, which keeps the client's address for a backend on the
/// node and forwards to a backend elsewhere with the node's address as the source.
fn node_port(
    views: &[NodeView],
    pods: &[PodInfo],
    src: IpAddr,
    src_node: Option<&str>,
    dst: IpAddr,
    req: &Request,
) -> Option<(ServiceStep, Vec<Hop>)> {
    // The dataplane translates IPv4 only (IPv6 frontends come with dual stack).
    if !dst.is_ipv4() {
        return None;
    }
    let view = node_with_address(views, dst)?;
    let frontend = ServiceFrontend {
        kind: FrontendKind::NodePort,
        ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        port: req.port,
        proto: req.proto,
    };
    let mut entry = view.state.services.get(&frontend)?;
    let own_node = src_node == Some(view.node.as_str())
        || node_with_address(views, src).is_some_and(|v| v.node == view.node);
    // Inside the cluster as the receiving node's programs see it: its own pods and
    // processes, another node's address, a pod of another node's CIDR.
    let in_cluster = own_node
        || src_node.is_some()
        || node_with_address(views, src).is_some()
        || view.state.routes.keys().any(|cidr| cidr.contains(&src));
    let cluster = ClusterFrontends::new(&view.state.services)
        .of(&frontend, entry)
        .and_then(|f| view.state.services.get(&f).map(|e| (f, e)));
    let mut local_note = None;
    if !entry.masquerade_external {
        local_note = Some(match cluster {
            Some((f, cluster_entry)) if in_cluster => {
                entry = cluster_entry;
                format!(
                    "externalTrafficPolicy Local spares clients inside the cluster: the backends of {}:{}",
                    f.ip, f.port
                )
            }
            _ => format!(
                "externalTrafficPolicy Local: {}'s own backends only",
                view.node
            ),
        });
    }
    let backends = usable(entry);
    let mut step = service_step(
        view,
        pods,
        "NodePort",
        format!("{dst}:{} {}", req.port, proto_name(req.proto)),
        entry,
        &backends,
    );
    step.notes.extend(local_note);
    let hops = if own_node {
        step.notes.push(format!(
            "from {}'s own {}: translated at the source, like a ClusterIP",
            view.node,
            if src_node.is_some() { "pod" } else { "address" }
        ));
        backends
            .iter()
            .map(|b| translated_at_source(src, b))
            .collect()
    } else {
        step.notes
            .push(format!("from the network: translated on {}", view.node));
        backends
            .iter()
            .map(|b| {
                let mut hop = Hop {
                    egress_to: (dst, req.port),
                    dst: b.ip,
                    port: b.port,
                    peer: src,
                    hairpin: false,
                    notes: Vec::new(),
                };
                if view.host_addrs.contains(&b.ip) {
                    // One of the receiving node's own addresses: up its stack, the
                    // client's address kept; the replies are translated as they leave.
                    hop.notes.push(format!(
                        "to {}'s own stack (a host-network backend)",
                        view.node
                    ));
                } else if !view.endpoints.contains_key(&b.ip) {
                    // Not a pod of the receiving node: forwarded with the node's address
                    // as the source, so that the replies come back through it.
                    hop.peer = dst;
                    hop.notes.push(format!(
                        "source translated to {dst}: the backend is not on {}",
                        view.node
                    ));
                }
                hop
            })
            .collect()
    };
    Some((step, hops))
}

/// Traces `req` over `views`.
pub fn trace(views: &[NodeView], pods: &[PodInfo], req: &Request) -> Result<Trace> {
    let resolve = |s: &Spec| match s {
        Spec::Pod(k) => pod_address(pods, k),
        Spec::Ip(ip) => Ok(*ip),
    };
    let src = resolve(&req.from)?;
    let dst = resolve(&req.to)?;
    let src_node = view_of(views, src).map(|v| v.node.clone());
    // A ClusterIP first, then a nodePort on a node's address, as the dataplane looks them up.
    let translated = cluster_ip(views, pods, src, src_node.as_deref(), dst, req)
        .or_else(|| node_port(views, pods, src, src_node.as_deref(), dst, req));
    let (service, hops) = match translated {
        Some((step, hops)) => (Some(step), hops),
        None => (None, vec![Hop::direct(src, dst, req.port)]),
    };
    let paths: Vec<PathTrace> = if service.is_none() && src == dst {
        // Packets to the pod's own address stay inside it: the dataplane never sees them.
        vec![PathTrace {
            dst,
            dst_pod: pod_at(pods, dst),
            src,
            port: req.port,
            egress: None,
            ingress: None,
            notes: vec![format!(
                "{src} reaches its own address: the packet never leaves it and no policy applies"
            )],
            allowed: true,
        }]
    } else {
        hops.into_iter()
            .map(|hop| trace_path(views, pods, src, hop, req.proto))
            .collect()
    };
    // A Service without a usable backend refuses new flows.
    let allowed = !paths.is_empty() && paths.iter().all(|p| p.allowed);
    Ok(Trace {
        src,
        src_pod: pod_at(pods, src),
        src_node,
        dst,
        dst_pod: pod_at(pods, dst),
        proto: proto_name(req.proto),
        port: req.port,
        service,
        paths,
        allowed,
        sources: views
            .iter()
            .map(|v| (v.node.clone(), v.source.clone()))
            .collect(),
    })
}

struct Named<'a>(IpAddr, Option<&'a str>);

impl fmt::Display for Named<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            Some(p) => write!(f, "{p} ({})", self.0),
            None => write!(f, "{}", self.0),
        }
    }
}

fn render_side(out: &mut String, s: &SideTrace) {
    out.push_str(&format!(
        "  {:<8} on {}: {} rule set {}",
        s.direction, s.node, s.endpoint, s.rule_set
    ));
    if !s.policies.is_empty() {
        out.push_str(&format!(" = {}", s.policies.join(" + ")));
    }
    out.push('\n');
    if let Some(class) = s.class {
        out.push_str(&format!(
            "           peer {} is in class {class}{}\n",
            s.peer,
            s.class_prefix
                .as_ref()
                .map_or(" (no prefix matches)".to_string(), |p| format!(
                    " (prefix {p})"
                ))
        ));
    }
    if let Some(e) = &s.entry {
        out.push_str(&format!("           verdict entry: {e}\n"));
    }
    out.push_str(&format!(
        "           {}: {}\n",
        if s.allowed { "ALLOW" } else { "DENY" },
        s.reason
    ));
}

pub fn render(t: &Trace) -> String {
    let mut out = format!(
        "packet  {} -> {} {} port {}\n",
        Named(t.src, t.src_pod.as_deref()),
        Named(t.dst, t.dst_pod.as_deref()),
        t.proto,
        t.port
    );
    out.push_str(&format!(
        "source  {}\n",
        t.src_node
            .as_ref()
            .map_or("not a pod of any node".to_string(), |n| format!(
                "a pod on {n}"
            ))
    ));
    for (node, source) in &t.sources {
        out.push_str(&format!("tables  {node}: {source}\n"));
    }
    if let Some(s) = &t.service {
        out.push_str(&format!(
            "service {} ({}) is {} on {}: {}\n",
            s.frontend,
            s.kind,
            s.service,
            s.node,
            if s.backends.is_empty() {
                "no backend, new flows refused".to_string()
            } else {
                format!("backends {}", s.backends.join(", "))
            }
        ));
        for n in &s.notes {
            out.push_str(&format!("  note     {n}\n"));
        }
    }
    for p in &t.paths {
        if t.service.is_some() {
            out.push_str(&format!(
                "to backend {}:{}",
                Named(p.dst, p.dst_pod.as_deref()),
                p.port
            ));
            if p.src != t.src {
                out.push_str(&format!(" from {}", p.src));
            }
            out.push('\n');
        }
        if let Some(s) = &p.egress {
            render_side(&mut out, s);
        }
        if let Some(s) = &p.ingress {
            render_side(&mut out, s);
        }
        for n in &p.notes {
            out.push_str(&format!("  note     {n}\n"));
        }
    }
    out.push_str(&format!(
        "verdict {}\n",
        if t.allowed { "ALLOWED" } else { "DENIED" }
    ));
    out
}

/// Views from compiled states (the playground, or Kubernetes where the agent's state is
/// all there is): endpoints by the pods' addresses.
pub fn views_from_states(
    states: &BTreeMap<String, NodeState>,
    pods: &[PodInfo],
    source: &str,
) -> Vec<NodeView> {
    states
        .iter()
        .map(|(node, state)| NodeView {
            node: node.clone(),
            endpoints: state
                .endpoints
                .iter()
                .flat_map(|(key, ep)| {
                    let ep = *ep;
                    pods.iter()
                        .filter(move |p| &p.key == key)
                        .flat_map(move |p| p.ips.iter().map(move |ip| (*ip, ep)))
                })
                .collect(),
            host_addrs: BTreeSet::new(),
            state: state.clone(),
            source: source.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use weir_api::NodeRoute;

    use super::*;
    use crate::playground;

    /// Two nodes with addresses, a web pod on n1 behind two NodePort Services (one with
    /// `externalTrafficPolicy: Local`), clients on n2; web takes 8080 from the external
    /// range, from ops and from db; db may send only to the nodes' 30080.
    const NODE_PORTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: ops, labels: {team: ops}}
---
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 10.0.0.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: n2}
status: {addresses: [{type: InternalIP, address: 10.0.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.244.1.2, podIPs: [{ip: 10.244.1.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {nodeName: n2, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.244.2.2, podIPs: [{ip: 10.244.2.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: probe, namespace: ops, labels: {app: probe}}
spec: {nodeName: n2, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.244.2.3, podIPs: [{ip: 10.244.2.3}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, protocol: TCP, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-local, namespace: shop}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  clusterIP: 10.96.0.11
  selector: {app: web}
  ports: [{port: 81, targetPort: 8080, protocol: TCP, nodePort: 30081}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-in, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
  - from:
    - ipBlock: {cidr: 192.0.2.0/24}
    - namespaceSelector: {matchLabels: {team: ops}}
    - podSelector: {matchLabels: {app: db}}
    ports: [{protocol: TCP, port: 8080}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-out, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 10.0.0.0/24}}]
    ports: [{protocol: TCP, port: 30080}]
"#;

    fn node_ports() -> playground::Playground {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("objects.yaml"), NODE_PORTS).unwrap();
        let p = playground::compile(dir.path()).unwrap();
        assert!(p.diagnostics.is_empty(), "{:?}", p.diagnostics);
        p
    }

    fn tcp(from: &str, to: &str) -> Request {
        let SpecPort(to, port) = to.parse().unwrap();
        Request {
            from: from.parse().unwrap(),
            to,
            proto: 6,
            port: port.unwrap(),
        }
    }

    #[test]
    fn a_node_port_is_translated_by_the_node_that_receives_it() {
        let p = node_ports();
        let run = |from: &str, to: &str| {
            let t = trace(&p.views, &p.pods, &tcp(from, to)).unwrap();
            let text = render(&t);
            (t, text)
        };

        // From outside to the backend's node: the backend sees the client.
        let (t, text) = run("192.0.2.9", "10.0.0.1:30080");
        assert!(t.allowed, "{text}");
        let s = t.service.as_ref().unwrap();
        assert_eq!(
            (s.kind, s.node.as_str(), s.service.as_str()),
            ("NodePort", "n1", "shop/web")
        );
        assert_eq!(s.backends, vec!["shop/web 10.244.1.2:8080"]);
        let path = &t.paths[0];
        assert_eq!((path.dst, path.port), ("10.244.1.2".parse().unwrap(), 8080));
        assert_eq!(path.src, t.src);
        assert!(path.egress.is_none());
        let ingress = path.ingress.as_ref().unwrap();
        assert_eq!(ingress.peer, t.src);
        assert_eq!(
            ingress.rule.as_deref(),
            Some("NetworkPolicy/shop/web-in ingress #0")
        );
        assert!(
            text.contains("service 10.0.0.1:30080 TCP (NodePort) is shop/web on n1"),
            "{text}"
        );

        // From outside to the other node: forwarded with that node's address, which web's
        // rules do not admit.
        let (t, text) = run("192.0.2.9", "10.0.0.2:30080");
        assert!(!t.allowed, "{text}");
        assert_eq!(t.service.as_ref().unwrap().node, "n2");
        let path = &t.paths[0];
        let n2: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(path.src, n2);
        assert_eq!(path.ingress.as_ref().unwrap().peer, n2);
        assert!(text.contains("source translated to 10.0.0.2"), "{text}");
        assert!(text.contains("from 10.0.0.2\n"), "{text}");

        // externalTrafficPolicy Local: n2 has no backend of its own and refuses; n1 serves.
        let (t, text) = run("192.0.2.9", "10.0.0.2:30081");
        assert!(!t.allowed, "{text}");
        assert!(t.paths.is_empty());
        assert!(text.contains("no backend, new flows refused"), "{text}");
        assert!(text.contains("externalTrafficPolicy Local"), "{text}");
        let (t, text) = run("192.0.2.9", "10.0.0.1:30081");
        assert!(t.allowed, "{text}");
        assert!(
            !text.contains("spares clients inside the cluster"),
            "{text}"
        );
        // Clients inside the cluster are not restricted (as with kube-proxy): a pod of n2
        // reaches web through n2's port, translated at the source to the ClusterIP's
        // backends; n1's address through n2's port is forwarded to web with n2's address,
        // which web's rules do not admit.
        let web: IpAddr = "10.244.1.2".parse().unwrap();
        let (t, text) = run("ops/probe", "10.0.0.2:30081");
        assert!(t.allowed, "{text}");
        assert!(
            text.contains("spares clients inside the cluster: the backends of 10.96.0.11:81"),
            "{text}"
        );
        assert_eq!(t.paths[0].dst, web);
        let (t, text) = run("10.0.0.1", "10.0.0.2:30081");
        assert!(!t.allowed, "{text}");
        assert_eq!(t.paths[0].dst, web);
        assert!(text.contains("source translated to 10.0.0.2"), "{text}");

        // A pod to its own node's address: translated there like a ClusterIP, the egress
        // rules judge the backend; to another node's: the egress rules judge the node's
        // address and nodePort, the receiving node translates, the backend sees the pod.
        let (t, text) = run("ops/probe", "10.0.0.2:30080");
        assert!(t.allowed, "{text}");
        assert!(text.contains("translated at the source"), "{text}");
        let (t, text) = run("ops/probe", "10.0.0.1:30080");
        assert!(t.allowed, "{text}");
        assert_eq!(t.paths[0].src, t.src);
        // db may send to the nodes' 30080 only: through its own node the packet leaves
        // for web:8080 and is denied; to n1's address it leaves as sent and web admits db.
        let (t, text) = run("shop/db", "10.0.0.2:30080");
        assert!(!t.allowed, "{text}");
        let egress = t.paths[0].egress.as_ref().unwrap();
        assert!(!egress.allowed, "{text}");
        assert_eq!(egress.peer, "10.244.1.2".parse::<IpAddr>().unwrap());
        let (t, text) = run("shop/db", "10.0.0.1:30080");
        assert!(t.allowed, "{text}");
        let egress = t.paths[0].egress.as_ref().unwrap();
        assert_eq!(egress.peer, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(
            egress.rule.as_deref(),
            Some("NetworkPolicy/shop/db-out egress #0")
        );

        // The node's own processes: translated at the socket, no source translation; web's
        // node is the client.
        let (t, text) = run("10.0.0.2", "10.0.0.2:30080");
        assert!(!t.allowed, "{text}");
        assert_eq!(t.paths[0].src, n2);
        assert!(text.contains("translated at the source"), "{text}");

        // web through its own node's nodePort: hairpin, no policy; through the other node's:
        // forwarded back with that node's address.
        let (t, text) = run("shop/web", "10.0.0.1:30080");
        assert!(t.allowed, "{text}");
        assert!(text.contains("hairpin"), "{text}");
        let (t, text) = run("shop/web", "10.0.0.2:30080");
        assert!(!t.allowed, "{text}");

        // Not a nodePort: the node's own business, as before.
        let (t, text) = run("192.0.2.9", "10.0.0.1:30099");
        assert!(t.service.is_none(), "{text}");
        // The ClusterIP is unchanged.
        let (t, text) = run("ops/probe", "10.96.0.10:80");
        assert!(t.allowed, "{text}");
        assert_eq!(t.service.as_ref().unwrap().kind, "ClusterIP");
    }

    #[test]
    fn node_addresses_come_from_the_route_table_without_host_addresses() {
        // In Kubernetes the views hold the agents' states: node addresses are in `routes`.
        let mut p = node_ports();
        let routes: BTreeMap<_, _> = [
            ("n1", "10.244.1.0/24", "10.0.0.1"),
            ("n2", "10.244.2.0/24", "10.0.0.2"),
        ]
        .into_iter()
        .map(|(node, cidr, ip)| {
            (
                cidr.parse().unwrap(),
                NodeRoute::new(node, ip.parse().unwrap()),
            )
        })
        .collect();
        let routes = Arc::new(routes);
        for v in &mut p.views {
            v.host_addrs.clear();
            v.state.routes = routes.clone();
        }
        let t = trace(&p.views, &p.pods, &tcp("192.0.2.9", "10.0.0.2:30080")).unwrap();
        assert_eq!(t.service.as_ref().unwrap().node, "n2");
        assert_eq!(t.paths[0].src, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert!(!t.allowed);
        let t = trace(&p.views, &p.pods, &tcp("192.0.2.9", "10.0.0.1:30080")).unwrap();
        assert!(t.allowed, "{}", render(&t));
    }

    #[test]
    fn ends_parse() {
        assert_eq!(
            "default/a".parse::<Spec>(),
            Ok(Spec::Pod(PodKey::new("default", "a")))
        );
        assert_eq!(
            "10.0.0.1".parse::<Spec>(),
            Ok(Spec::Ip("10.0.0.1".parse().unwrap()))
        );
        assert!("default".parse::<Spec>().is_err());
        assert_eq!(
            "default/b:80".parse::<SpecPort>(),
            Ok(SpecPort(Spec::Pod(PodKey::new("default", "b")), Some(80)))
        );
        assert_eq!(
            "10.0.0.1:53".parse::<SpecPort>(),
            Ok(SpecPort(Spec::Ip("10.0.0.1".parse().unwrap()), Some(53)))
        );
        assert_eq!(
            "2001:db8::1".parse::<SpecPort>(),
            Ok(SpecPort(Spec::Ip("2001:db8::1".parse().unwrap()), None))
        );
        assert_eq!(
            "[2001:db8::1]:443".parse::<SpecPort>(),
            Ok(SpecPort(
                Spec::Ip("2001:db8::1".parse().unwrap()),
                Some(443)
            ))
        );
        assert!("default/b:http".parse::<SpecPort>().is_err());
        assert!("[::1]443".parse::<SpecPort>().is_err());
    }

    #[test]
    fn host_policy_rules_judge_traffic_to_and_from_a_node() {
        let dir = tempfile::tempdir().unwrap();
        let objects = format!(
            "{NODE_PORTS}---\n{}",
            r#"apiVersion: weir.dev/v1alpha1
kind: HostPolicy
metadata: {name: edge}
spec:
  nodeSelector: {}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{ipBlock: {cidr: 192.0.2.0/24}}]
    ports: [{protocol: TCP, port: 9100}]
  egress:
  - to: [{nodeSelector: {}}]
  untracked:
  - from: [{ipBlock: {cidr: 198.51.100.0/24}}]
"#
        );
        std::fs::write(dir.path().join("objects.yaml"), objects).unwrap();
        let p = playground::compile(dir.path()).unwrap();
        assert!(p.diagnostics.is_empty(), "{:?}", p.diagnostics);
        let run = |from: &str, to: &str| {
            let t = trace(&p.views, &p.pods, &tcp(from, to)).unwrap();
            let text = render(&t);
            (t, text)
        };
        let (t, text) = run("192.0.2.9", "10.0.0.1:9100");
        assert!(t.allowed, "{text}");
        let ingress = t.paths[0].ingress.as_ref().unwrap();
        assert_eq!(ingress.endpoint, "node n1");
        assert_eq!(ingress.rule.as_deref(), Some("HostPolicy/edge ingress #0"));
        let (t, text) = run("192.0.2.9", "10.0.0.1:22");
        assert!(!t.allowed, "{text}");
        assert!(text.contains("failsafe"), "{text}");
        let (t, text) = run("198.51.100.7", "10.0.0.1:9100");
        assert!(!t.allowed, "{text}");
        assert!(
            text.contains("dropped in XDP by an untracked rule"),
            "{text}"
        );
        assert_eq!(
            t.paths[0].ingress.as_ref().unwrap().rule.as_deref(),
            Some("HostPolicy/edge/untracked[0] (untracked)")
        );
        // The node's own connections: to another node, yes; elsewhere, no.
        let (t, text) = run("10.0.0.1", "192.0.2.9:443");
        assert!(!t.allowed, "{text}");
        assert_eq!(
            t.paths[0].egress.as_ref().unwrap().endpoint,
            "node n1",
            "{text}"
        );
        // To the other node: its egress rules allow, n2's ingress rules do not.
        let (t, text) = run("10.0.0.1", "10.0.0.2:9100");
        assert!(t.paths[0].egress.as_ref().unwrap().allowed, "{text}");
        let ingress = t.paths[0].ingress.as_ref().unwrap();
        assert_eq!(ingress.endpoint, "node n2");
        assert!(!t.allowed, "{text}");
    }
}
