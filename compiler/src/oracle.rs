//! A reference evaluator of NetworkPolicy, written straight from the specification
//! (<https://kubernetes.io/docs/concepts/services-networking/network-policies/>) and
//! deliberately naive: for one connection it walks every policy and every rule of the raw
//! objects. It shares no code with the compiler beyond the store of pods and namespaces and
//! the decision which objects are invalid, so tests can check the compiler (and the
//! dataplane's lookup, emulated by [`weir_api::NodeState::verdict`]) against it.
//!
//! A connection from `src` to `dst` is allowed iff
//! * `src` is a pod whose egress evaluation allows `dst` (address, protocol, port), **and**
//! * `dst` is a pod whose ingress evaluation allows `src`.
//!
//! One direction's evaluation, for a pod (ClusterNetworkPolicy, `policy.networking.k8s.io/v1alpha2`):
//! 1. the Admin tier: the ClusterNetworkPolicies with `tier: Admin` whose subject selects the
//!    pod, by `priority` (then name), their rules of that direction in order: the first
//!    rule that matches decides — Accept allows, Deny denies, Pass ends the tier;
//! 2. NetworkPolicies: if one selecting the pod isolates it in that direction, the
//!    connection is allowed iff one of their rules allows it;
//! 3. the Baseline tier, like the Admin tier (Pass ends it);
//! 4. allowed.
//!
//! Implementation-defined choices are the compiler's (see `docs/policy-semantics.md`):
//! ipBlocks match pod addresses too; named ports resolve against the destination pod and
//! never match a non-pod address; invalid policies fail closed. Traffic between a node and
//! its own pods is not this module's business.

use std::net::IpAddr;

use k8s_openapi::{
    api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use weir_api::{Action, Direction, PodKey};

use super::{
    Error, Result,
    cluster::{Cluster, PodInfo, PolicyRecord},
    cnp::{ClusterNetworkPolicySpec, MAX_PRIORITY, NamespacedPod, ProtocolMatch, RulePeer},
    compile::CompileOutput,
    policy::Protocol,
    selector::Labels,
    validate::{self, Severity},
};

/// One end of a connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A stored pod, at its first address.
    Pod(PodKey),
    /// A stored pod, at one of its addresses (dual stack).
    PodAt(PodKey, IpAddr),
    /// Any address. If a pod owns it, selectors match it as that pod; no pod's own policy
    /// applies to it.
    Ip(IpAddr),
}

impl Endpoint {
    fn pod<'c>(&self, cluster: &'c Cluster) -> Option<&'c PodInfo> {
        match self {
            Endpoint::Pod(k) | Endpoint::PodAt(k, _) => cluster.pod(k),
            Endpoint::Ip(_) => None,
        }
    }

    /// The address the connection uses; `None` for a pod without addresses.
    pub fn address(&self, cluster: &Cluster) -> Option<IpAddr> {
        match self {
            Endpoint::Pod(k) => cluster.pod(k)?.ips.first().copied(),
            Endpoint::PodAt(_, ip) | Endpoint::Ip(ip) => Some(*ip),
        }
    }
}

/// Does policy allow a connection from `src` to `dst` with IP protocol `protocol` to
/// destination port `port`? False if either end has no address. Fails if the store did not
/// retain policy specs ([`Cluster::retaining_policy_specs`]).
pub fn allowed(
    cluster: &Cluster,
    src: &Endpoint,
    dst: &Endpoint,
    protocol: u8,
    port: u16,
) -> Result<bool> {
    let (Some(src_ip), Some(dst_ip)) = (src.address(cluster), dst.address(cluster)) else {
        return Ok(false);
    };
    if let Some(pod) = src.pod(cluster) {
        // Named ports of egress rules resolve against the destination pod, if any.
        let owner = cluster.pod_at(dst_ip);
        if !direction_allows(
            cluster,
            pod,
            Direction::Egress,
            dst_ip,
            owner,
            protocol,
            port,
        )? {
            return Ok(false);
        }
    }
    if let Some(pod) = dst.pod(cluster)
        && !direction_allows(
            cluster,
            pod,
            Direction::Ingress,
            src_ip,
            Some(pod),
            protocol,
            port,
        )?
    {
        return Ok(false);
    }
    Ok(true)
}

/// A rule as written: its peers (`from` / `to`) and ports.
type RawRule<'a> = (
    Option<&'a Vec<NetworkPolicyPeer>>,
    Option<&'a Vec<NetworkPolicyPort>>,
);

/// `pod`'s evaluation for `direction`: the Admin tier, NetworkPolicies, the Baseline tier.
fn direction_allows(
    cluster: &Cluster,
    pod: &PodInfo,
    direction: Direction,
    peer: IpAddr,
    port_owner: Option<&PodInfo>,
    protocol: u8,
    port: u16,
) -> Result<bool> {
    let packet = Packet {
        peer,
        port_owner,
        protocol,
        port,
    };
    if let Some(allowed) = tier_decides(cluster, pod, direction, "Admin", &packet)? {
        return Ok(allowed);
    }
    if let Some(allowed) =
        network_policies_decide(cluster, pod, direction, peer, port_owner, protocol, port)?
    {
        return Ok(allowed);
    }
    Ok(tier_decides(cluster, pod, direction, "Baseline", &packet)?.unwrap_or(true))
}

/// A ClusterNetworkPolicy rule as written: action, peers, protocols.
type CnpRawRule<'a> = (
    &'a str,
    Option<&'a Vec<RulePeer>>,
    Option<&'a Vec<ProtocolMatch>>,
);

/// What a connection looks like to one direction's rules.
struct Packet<'a> {
    peer: IpAddr,
    port_owner: Option<&'a PodInfo>,
    protocol: u8,
    port: u16,
}

/// One ClusterNetworkPolicy tier for `pod`: `Some(allowed)` if a rule decides, `None` if
/// none matches or one passes.
fn tier_decides(
    cluster: &Cluster,
    pod: &PodInfo,
    direction: Direction,
    tier: &str,
    packet: &Packet<'_>,
) -> Result<Option<bool>> {
    let mut policies = Vec::new();
    for (key, record) in cluster.cluster_policies() {
        let spec = record
            .spec
            .as_ref()
            .ok_or_else(|| Error::PolicySpecNotRetained {
                policy: key.clone(),
            })?;
        let errors: Vec<&str> = record
            .validated
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .map(|d| d.field.as_str())
            .collect();
        // An unreadable tier is the Admin tier; an out-of-range priority is clamped.
        let policy_tier = match spec.tier.as_str() {
            "Baseline" => "Baseline",
            _ => "Admin",
        };
        if policy_tier != tier {
            continue;
        }
        let priority = spec.priority.unwrap_or(0).clamp(0, i64::from(MAX_PRIORITY));
        policies.push((priority, key.name.as_str(), spec, errors));
    }
    policies.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    for (_, _, spec, errors) in policies {
        let failed = |path: &str| {
            errors
                .iter()
                .any(|f| *f == path || f.starts_with(&format!("{path}.")))
        };
        // An unreadable subject selects every pod.
        if !failed("spec.subject") && !subject_selects(cluster, spec, pod) {
            continue;
        }
        let rules: Vec<CnpRawRule<'_>> = match direction {
            Direction::Ingress => spec
                .ingress
                .iter()
                .flatten()
                .map(|r| (r.action.as_str(), r.from.as_ref(), r.protocols.as_ref()))
                .collect(),
            Direction::Egress => spec
                .egress
                .iter()
                .flatten()
                .map(|r| (r.action.as_str(), r.to.as_ref(), r.protocols.as_ref()))
                .collect(),
        };
        let list = match direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        for (i, (action, peers, protocols)) in rules.into_iter().enumerate() {
            if failed(&format!("spec.{list}[{i}]")) {
                // Fails closed: an Accept rule matches nothing, any other denies everything.
                if action == "Accept" {
                    continue;
                }
                return Ok(Some(false));
            }
            let peer_ok = peers
                .into_iter()
                .flatten()
                .any(|p| cnp_peer_matches(cluster, p, packet.peer));
            let protocol_ok = match protocols {
                None => true,
                Some(list) => list.iter().any(|p| cnp_protocol_matches(p, packet)),
            };
            if peer_ok && protocol_ok {
                return Ok(match action {
                    "Accept" => Some(true),
                    "Pass" => None,
                    _ => Some(false),
                });
            }
        }
    }
    Ok(None)
}

fn namespaced_pod_matches(cluster: &Cluster, sel: &NamespacedPod, pod: &PodInfo) -> bool {
    let ns_ok = cluster
        .namespace_labels(&pod.key.namespace)
        .is_some_and(|labels| {
            sel.namespace_selector
                .as_ref()
                .is_none_or(|s| selector_matches(s, labels))
        });
    ns_ok
        && sel
            .pod_selector
            .as_ref()
            .is_none_or(|s| selector_matches(s, &pod.labels))
}

fn subject_selects(cluster: &Cluster, spec: &ClusterNetworkPolicySpec, pod: &PodInfo) -> bool {
    if let Some(ns) = &spec.subject.namespaces {
        return cluster
            .namespace_labels(&pod.key.namespace)
            .is_some_and(|labels| selector_matches(ns, labels));
    }
    spec.subject
        .pods
        .as_ref()
        .is_some_and(|p| namespaced_pod_matches(cluster, p, pod))
}

fn cnp_peer_matches(cluster: &Cluster, peer: &RulePeer, addr: IpAddr) -> bool {
    if let Some(networks) = &peer.networks {
        return networks.iter().any(|n| {
            n.parse::<ipnet::IpNet>()
                .is_ok_and(|net| net.trunc().contains(&addr))
        });
    }
    if let Some(sel) = &peer.nodes {
        // A node's addresses, unless a pod holds one (host-network pods are not stored).
        return cluster.pod_at(addr).is_none()
            && cluster
                .nodes()
                .any(|(_, node)| node.ips.contains(&addr) && selector_matches(sel, &node.labels));
    }
    let Some(pod) = cluster.pod_at(addr) else {
        return false;
    };
    if let Some(ns) = &peer.namespaces {
        return cluster
            .namespace_labels(&pod.key.namespace)
            .is_some_and(|labels| selector_matches(ns, labels));
    }
    peer.pods
        .as_ref()
        .is_some_and(|p| namespaced_pod_matches(cluster, p, pod))
}

fn cnp_protocol_matches(p: &ProtocolMatch, packet: &Packet<'_>) -> bool {
    if let Some(name) = &p.destination_named_port {
        return packet.port_owner.is_some_and(|pod| {
            pod.named_ports.iter().any(|np| {
                np.name == *name
                    && np.protocol.number() == packet.protocol
                    && np.port == packet.port
            })
        });
    }
    let (number, ports) = match (&p.tcp, &p.udp, &p.sctp) {
        (Some(x), _, _) => (Protocol::Tcp.number(), x),
        (_, Some(x), _) => (Protocol::Udp.number(), x),
        (_, _, Some(x)) => (Protocol::Sctp.number(), x),
        _ => return false,
    };
    if number != packet.protocol {
        return false;
    }
    let port = i32::from(packet.port);
    match &ports.destination_port {
        None => true,
        Some(d) => match (d.number, &d.range) {
            (Some(n), _) => n == port,
            (None, Some(r)) => r.start <= port && port <= r.end,
            (None, None) => false,
        },
    }
}

/// `pod`'s NetworkPolicies for `direction`: `None` if none isolates it, else whether some
/// rule allows `peer`.
fn network_policies_decide(
    cluster: &Cluster,
    pod: &PodInfo,
    direction: Direction,
    peer: IpAddr,
    port_owner: Option<&PodInfo>,
    protocol: u8,
    port: u16,
) -> Result<Option<bool>> {
    let mut isolated = false;
    for (key, record) in cluster.policies() {
        let spec = record
            .spec
            .as_ref()
            .ok_or_else(|| Error::PolicySpecNotRetained {
                policy: key.clone(),
            })?;
        if key.namespace != pod.key.namespace
            || !selects(record, spec, pod)
            || !isolates(record, spec, direction)
        {
            continue;
        }
        isolated = true;
        if !record.validated.is_valid() {
            continue; // fails closed: isolates, allows nothing
        }
        let rules: Vec<RawRule<'_>> = match direction {
            Direction::Ingress => spec
                .ingress
                .iter()
                .flatten()
                .map(|r| (r.from.as_ref(), r.ports.as_ref()))
                .collect(),
            Direction::Egress => spec
                .egress
                .iter()
                .flatten()
                .map(|r| (r.to.as_ref(), r.ports.as_ref()))
                .collect(),
        };
        for (peers, ports) in rules {
            let peer_ok = match peers {
                None => true,
                Some(list) if list.is_empty() => true,
                Some(list) => list
                    .iter()
                    .any(|p| peer_matches(cluster, &key.namespace, p, peer)),
            };
            let port_ok = match ports {
                None => true,
                Some(list) if list.is_empty() => true,
                Some(list) => list
                    .iter()
                    .any(|p| port_matches(p, port_owner, protocol, port)),
            };
            if peer_ok && port_ok {
                return Ok(Some(true));
            }
        }
    }
    Ok(isolated.then_some(false))
}

fn selects(record: &PolicyRecord, spec: &NetworkPolicySpec, pod: &PodInfo) -> bool {
    let selector_unusable = record
        .validated
        .diagnostics
        .iter()
        .any(|d| d.severity == Severity::Error && d.field.starts_with("spec.podSelector"));
    if selector_unusable {
        return true;
    }
    spec.pod_selector
        .as_ref()
        .is_none_or(|s| selector_matches(s, &pod.labels))
}

fn isolates(record: &PolicyRecord, spec: &NetworkPolicySpec, direction: Direction) -> bool {
    let (ingress, egress) = if record.validated.is_valid() {
        match spec.policy_types.as_deref() {
            Some(types) if !types.is_empty() => (
                types.iter().any(|t| t == "Ingress"),
                types.iter().any(|t| t == "Egress"),
            ),
            _ => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
        }
    } else {
        validate::fail_closed_directions(spec)
    };
    match direction {
        Direction::Ingress => ingress,
        Direction::Egress => egress,
    }
}

fn peer_matches(
    cluster: &Cluster,
    namespace: &str,
    peer: &NetworkPolicyPeer,
    addr: IpAddr,
) -> bool {
    if let Some(block) = &peer.ip_block {
        let Ok(cidr) = block.cidr.parse::<ipnet::IpNet>() else {
            return false;
        };
        let excepted = block
            .except
            .iter()
            .flatten()
            .filter_map(|e| e.parse::<ipnet::IpNet>().ok())
            .any(|e| e.trunc().contains(&addr));
        return cidr.trunc().contains(&addr) && !excepted;
    }
    let Some(pod) = cluster.pod_at(addr) else {
        return false;
    };
    let namespace_ok = match &peer.namespace_selector {
        Some(sel) => cluster
            .namespace_labels(&pod.key.namespace)
            .is_some_and(|labels| selector_matches(sel, labels)),
        None => pod.key.namespace == namespace,
    };
    let pod_ok = peer
        .pod_selector
        .as_ref()
        .is_none_or(|sel| selector_matches(sel, &pod.labels));
    namespace_ok && pod_ok
}

fn port_matches(p: &NetworkPolicyPort, owner: Option<&PodInfo>, protocol: u8, port: u16) -> bool {
    let rule_protocol = match p.protocol.as_deref() {
        None => Protocol::Tcp,
        Some(s) => match Protocol::from_api(s) {
            Some(proto) => proto,
            None => return false,
        },
    };
    if rule_protocol.number() != protocol {
        return false;
    }
    match &p.port {
        None => true,
        Some(IntOrString::Int(first)) => {
            let last = p.end_port.unwrap_or(*first);
            (*first..=last).contains(&i32::from(port))
        }
        Some(IntOrString::String(name)) => owner.is_some_and(|pod| {
            pod.named_ports
                .iter()
                .any(|np| np.name == *name && np.protocol == rule_protocol && np.port == port)
        }),
    }
}

fn selector_matches(selector: &LabelSelector, labels: &Labels) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v.as_str()));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
            "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

/// What the dataplane would decide for the same connection, emulated over compiled state:
/// the source pod's egress rule set on its node, then the destination pod's ingress rule set
/// on its node, each with one class lookup and one verdict lookup
/// ([`weir_api::NodeState::verdict`]). Same conventions as [`allowed`].
pub fn emulated_allows(
    cluster: &Cluster,
    compiled: &CompileOutput,
    src: &Endpoint,
    dst: &Endpoint,
    protocol: u8,
    port: u16,
) -> bool {
    let (Some(src_ip), Some(dst_ip)) = (src.address(cluster), dst.address(cluster)) else {
        return false;
    };
    let rule_set = |pod: &PodInfo, direction: Direction| {
        let state = compiled.nodes.get(pod.node.as_deref()?)?;
        let ep = state.endpoints.get(&pod.key)?;
        Some((
            state,
            match direction {
                Direction::Ingress => ep.ingress,
                Direction::Egress => ep.egress,
            },
        ))
    };
    if let Some(pod) = src.pod(cluster)
        && let Some((state, rs)) = rule_set(pod, Direction::Egress)
        && state.verdict(rs, dst_ip, protocol, port).0 != Action::Allow
    {
        return false;
    }
    if let Some(pod) = dst.pod(cluster)
        && let Some((state, rs)) = rule_set(pod, Direction::Ingress)
        && state.verdict(rs, src_ip, protocol, port).0 != Action::Allow
    {
        return false;
    }
    true
}
