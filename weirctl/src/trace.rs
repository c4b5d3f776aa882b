//! `weirctl trace`: what the dataplane decides for one packet, and why, step by step, from
//! the tables a node holds: the endpoint entries of both ends, their rule sets, the peer
//! class of the other end, the verdict entry that matches (longest match, as the kernel's
//! lookup) and the policy rule it came from, on the egress side (the source's node) and the
//! ingress side (the destination's node). A ClusterIP is translated first, as the source's
//! node does, and each backend is traced.
//!
//! The lookups are `weir_api`'s emulation of the kernel's (`NodeState::longest_class_match`
//! and `longest_verdict_match`), run over entries read from the node's pinned maps in a
//! local cluster, over the agent's applied state in Kubernetes, and over freshly compiled
//! states in the playground (`--manifests`).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    str::FromStr,
};

use anyhow::{Result, bail};
use serde::Serialize;
use weir_api::{
    Action, CLASS_UNMATCHED, Direction, EndpointPolicy, FrontendKind, IpProto, NOT_ISOLATED,
    NodeState, PodKey, ServiceFrontend,
};
use weir_common::policy::FAIL_CLOSED;
use weir_controller::PodInfo;

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
    pub port: u16,
    pub egress: Option<SideTrace>,
    pub ingress: Option<SideTrace>,
    /// Why a side was not checked.
    pub notes: Vec<String>,
    pub allowed: bool,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ServiceStep {
    pub node: String,
    pub service: String,
    pub frontend: String,
    pub backends: Vec<String>,
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

fn trace_path(
    views: &[NodeView],
    pods: &[PodInfo],
    src: IpAddr,
    dst: IpAddr,
    proto: IpProto,
    port: u16,
) -> PathTrace {
    let mut notes = Vec::new();
    let egress = match view_of(views, src) {
        Some(v) => Some(check_side(
            v,
            Direction::Egress,
            pod_at(pods, src).unwrap_or_else(|| src.to_string()),
            v.endpoints[&src].egress,
            dst,
            proto,
            port,
        )),
        None => {
            notes.push(format!("{src} is no node's pod: no egress check"));
            None
        }
    };
    let ingress = match view_of(views, dst) {
        Some(v) => Some(check_side(
            v,
            Direction::Ingress,
            pod_at(pods, dst).unwrap_or_else(|| dst.to_string()),
            v.endpoints[&dst].ingress,
            src,
            proto,
            port,
        )),
        None => {
            notes.push(format!("{dst} is no node's pod: no ingress check"));
            None
        }
    };
    let allowed =
        egress.as_ref().is_none_or(|s| s.allowed) && ingress.as_ref().is_none_or(|s| s.allowed);
    PathTrace {
        dst,
        dst_pod: pod_at(pods, dst),
        port,
        egress,
        ingress,
        notes,
        allowed,
    }
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
    // A ClusterIP is translated on the source's node (any node's table if the source is not
    // a pod: every node holds the same ClusterIPs).
    let frontend = ServiceFrontend {
        kind: FrontendKind::ClusterIp,
        ip: dst,
        port: req.port,
        proto: req.proto,
    };
    let service = views
        .iter()
        .filter(|v| src_node.as_ref().is_none_or(|n| *n == v.node))
        .find_map(|v| Some((v, v.state.services.get(&frontend)?)));
    let (service, targets) = match service {
        Some((v, entry)) => {
            let ready: Vec<_> = entry
                .backends
                .iter()
                .filter(|b| b.state == weir_api::BackendState::Ready)
                .collect();
            let usable = if ready.is_empty() {
                entry.backends.iter().collect()
            } else {
                ready
            };
            (
                Some(ServiceStep {
                    node: v.node.clone(),
                    service: entry.service.to_string(),
                    frontend: format!("{dst}:{} {}", req.port, proto_name(req.proto)),
                    backends: usable
                        .iter()
                        .map(|b| {
                            let name = pod_at(pods, b.ip)
                                .map(|p| format!("{p} "))
                                .unwrap_or_default();
                            format!("{name}{}:{}", b.ip, b.port)
                        })
                        .collect(),
                }),
                usable.iter().map(|b| (b.ip, b.port)).collect::<Vec<_>>(),
            )
        }
        None => (None, vec![(dst, req.port)]),
    };
    let paths: Vec<PathTrace> = if service.is_none() && src == dst {
        // Packets to the pod's own address stay inside it: the dataplane never sees them.
        vec![PathTrace {
            dst,
            dst_pod: pod_at(pods, dst),
            port: req.port,
            egress: None,
            ingress: None,
            notes: vec![format!(
                "{src} reaches its own address: the packet never leaves it and no policy applies"
            )],
            allowed: true,
        }]
    } else {
        targets
            .iter()
            .map(|(ip, port)| trace_path(views, pods, src, *ip, req.proto, *port))
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
            "service {} is {} on {}: {}\n",
            s.frontend,
            s.service,
            s.node,
            if s.backends.is_empty() {
                "no backend, new flows refused".to_string()
            } else {
                format!("backends {}", s.backends.join(", "))
            }
        ));
    }
    for p in &t.paths {
        if t.service.is_some() {
            out.push_str(&format!(
                "to backend {}:{}\n",
                Named(p.dst, p.dst_pod.as_deref()),
                p.port
            ));
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
    use super::*;

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
}
