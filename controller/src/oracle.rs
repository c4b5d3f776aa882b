//! A reference evaluator of NetworkPolicy, written straight from the specification
//! (<https://kubernetes.io/docs/concepts/services-networking/network-policies/>) and
//! deliberately naive: for one connection it walks every policy and every rule of the raw
//! objects. It shares no code with the compiler beyond the store of pods and namespaces and
//! the decision which objects are invalid, so tests can check the compiler (and the
//! dataplane's lookup, emulated by [`weir_api::NodeState::verdict`]) against it.
//!
//! A connection from `src` to `dst` is allowed iff
//! * `src` is a pod that no policy isolates for egress, or some egress rule of a policy
//!   selecting it allows `dst` (address, protocol, port), **and**
//! * `dst` is a pod that no policy isolates for ingress, or some ingress rule of a policy
//!   selecting it allows `src`.
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

use crate::{
    Error, Result,
    cluster::{Cluster, PodInfo, PolicyRecord},
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

/// `pod`'s policies for `direction`: not isolated, or some rule allows `peer`.
fn direction_allows(
    cluster: &Cluster,
    pod: &PodInfo,
    direction: Direction,
    peer: IpAddr,
    port_owner: Option<&PodInfo>,
    protocol: u8,
    port: u16,
) -> Result<bool> {
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
                return Ok(true);
            }
        }
    }
    Ok(!isolated)
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
