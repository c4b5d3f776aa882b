//! Lossless conversions between [`weir_api`] types and their wire form in [`crate::pb`].
//!
//! Encoding cannot fail. Decoding checks everything the Rust types assume and the protobuf
//! types cannot express (address lengths, prefix lengths, enum values, aligned port prefixes,
//! unique map keys) and reports the first violation as a [`ProtoError`]; it never panics, so a
//! malformed message from the wire costs one error, not the process.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use weir_api::{
    Action, BackendState, Direction, EndpointPolicy, FrontendKind, IpProto, MapCapacities,
    NodeRoute, NodeState, NodeStateDiff, PodKey, PolicyRef, PolicyTier, PortPrefix, RuleRef,
    RuleSetInfo, ServiceBackend, ServiceEntry, ServiceFrontend, ServiceRef, TableDiff,
    TieredAction, TieredRule, VerdictEntry, VerdictMatch,
};

use crate::pb;

/// A message from the wire that does not describe a valid [`NodeState`] or [`NodeStateDiff`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("{field} is missing")]
    MissingField { field: &'static str },
    #[error("{field}: address has {len} bytes, expected 4 (IPv4) or 16 (IPv6)")]
    AddressLength { field: &'static str, len: usize },
    #[error("{field}: prefix length {len} is longer than the {max} bits of {address}")]
    PrefixTooLong {
        field: &'static str,
        address: IpAddr,
        len: u32,
        max: u8,
    },
    #[error("{field}: {value} is not a known value of enum {enum_name}")]
    UnknownEnum {
        field: &'static str,
        enum_name: &'static str,
        value: i32,
    },
    #[error("{field}: port prefix {port}/{len} is not a 16-bit port aligned to its prefix length")]
    PortPrefixInvalid {
        field: &'static str,
        port: u32,
        len: u32,
    },
    #[error("{field}: {value} is out of range (at most {max})")]
    OutOfRange {
        field: &'static str,
        value: u32,
        max: u32,
    },
    #[error("{field}: a port prefix without a protocol (ports only exist per protocol)")]
    PortsWithoutProto { field: &'static str },
    #[error("{field}: 0 is reserved (ids start at 1)")]
    ZeroId { field: &'static str },
    #[error(
        "{field}: a node-port frontend has address {address}, expected the unspecified address"
    )]
    NodePortAddress {
        field: &'static str,
        address: IpAddr,
    },
    #[error("{table}: key {key} appears more than once")]
    DuplicateKey { table: &'static str, key: String },
    #[error("snapshot has neither a state nor the unchanged marker")]
    EmptySnapshot,
    #[error("node update has neither a snapshot nor a diff")]
    EmptyUpdate,
}

// ---- encoding -------------------------------------------------------------------------------

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn ip_prefix(net: &IpNet) -> pb::IpPrefix {
    pb::IpPrefix {
        address: ip_bytes(net.addr()),
        prefix_len: u32::from(net.prefix_len()),
    }
}

fn pod_key(pod: &PodKey) -> pb::PodKey {
    pb::PodKey {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
    }
}

fn endpoint(pod: &PodKey, policy: &EndpointPolicy) -> pb::Endpoint {
    pb::Endpoint {
        pod: Some(pod_key(pod)),
        ingress_rule_set: policy.ingress,
        egress_rule_set: policy.egress,
    }
}

fn peer_class(prefix: &IpNet, class: u32) -> pb::PeerClass {
    pb::PeerClass {
        prefix: Some(ip_prefix(prefix)),
        class,
    }
}

fn verdict_match(m: &VerdictMatch) -> pb::VerdictMatch {
    pb::VerdictMatch {
        rule_set: m.rule_set,
        class: m.class,
        proto: m.proto.map(u32::from),
        ports: m.ports.map(|p| pb::PortPrefix {
            port: u32::from(p.port),
            len: u32::from(p.len),
        }),
    }
}

fn action(a: Action) -> pb::Action {
    match a {
        Action::Allow => pb::Action::Allow,
        Action::Deny => pb::Action::Deny,
    }
}

fn direction(d: Direction) -> pb::Direction {
    match d {
        Direction::Ingress => pb::Direction::Ingress,
        Direction::Egress => pb::Direction::Egress,
    }
}

fn verdict(m: &VerdictMatch, e: &VerdictEntry) -> pb::Verdict {
    pb::Verdict {
        key: Some(verdict_match(m)),
        action: action(e.action).into(),
        rule: e.rule,
    }
}

fn policy_ref(p: &PolicyRef) -> pb::PolicyRef {
    pb::PolicyRef {
        kind: p.kind.to_string(),
        namespace: p.namespace.to_string(),
        name: p.name.to_string(),
    }
}

fn rule(id: u32, r: &RuleRef) -> pb::Rule {
    pb::Rule {
        id,
        rule: Some(pb::RuleRef {
            policy: Some(policy_ref(&r.policy)),
            direction: direction(r.direction).into(),
            index: r.index,
            tiered: r.tiered.as_ref().map(|t| pb::TieredRule {
                tier: match t.tier {
                    PolicyTier::Admin => pb::PolicyTier::Admin,
                    PolicyTier::Baseline => pb::PolicyTier::Baseline,
                    PolicyTier::Untracked => pb::PolicyTier::Untracked,
                }
                .into(),
                priority: t.priority,
                name: t.name.clone(),
                action: match t.action {
                    TieredAction::Accept => pb::TieredAction::Accept,
                    TieredAction::Deny => pb::TieredAction::Deny,
                    TieredAction::Pass => pb::TieredAction::Pass,
                }
                .into(),
            }),
        }),
    }
}

fn rule_set(id: u32, info: &RuleSetInfo) -> pb::RuleSet {
    pb::RuleSet {
        id,
        info: Some(pb::RuleSetInfo {
            direction: direction(info.direction).into(),
            policies: info.policies.iter().map(policy_ref).collect(),
        }),
    }
}

fn drop_prefix(net: &IpNet, source: &str) -> pb::DropPrefix {
    pb::DropPrefix {
        prefix: Some(ip_prefix(net)),
        source: source.to_owned(),
    }
}

fn route(cidr: &IpNet, r: &NodeRoute) -> pb::Route {
    pb::Route {
        pod_cidr: Some(ip_prefix(cidr)),
        route: Some(pb::NodeRoute {
            node: r.node.clone(),
            node_ip: ip_bytes(r.node_ip),
            other_ips: r.other_ips.iter().map(|ip| ip_bytes(*ip)).collect(),
        }),
    }
}

fn frontend_kind(k: FrontendKind) -> pb::FrontendKind {
    match k {
        FrontendKind::ClusterIp => pb::FrontendKind::ClusterIp,
        FrontendKind::NodePort => pb::FrontendKind::NodePort,
    }
}

fn service_frontend(f: &ServiceFrontend) -> pb::ServiceFrontend {
    pb::ServiceFrontend {
        kind: frontend_kind(f.kind).into(),
        ip: ip_bytes(f.ip),
        port: u32::from(f.port),
        proto: u32::from(f.proto),
    }
}

fn backend_state(s: BackendState) -> pb::BackendState {
    match s {
        BackendState::Ready => pb::BackendState::Ready,
        BackendState::Terminating => pb::BackendState::Terminating,
    }
}

fn service(f: &ServiceFrontend, e: &ServiceEntry) -> pb::Service {
    pb::Service {
        frontend: Some(service_frontend(f)),
        entry: Some(pb::ServiceEntry {
            service: Some(pb::ServiceRef {
                namespace: e.service.namespace.clone(),
                name: e.service.name.clone(),
                port_name: e.service.port_name.clone(),
            }),
            id: e.id,
            backends: e
                .backends
                .iter()
                .map(|b| pb::ServiceBackend {
                    ip: ip_bytes(b.ip),
                    port: u32::from(b.port),
                    node: b.node.clone(),
                    state: backend_state(b.state).into(),
                })
                .collect(),
            affinity_timeout_s: e.affinity_timeout_s,
            masquerade_external: e.masquerade_external,
        }),
    }
}

impl From<&MapCapacities> for pb::MapCapacities {
    fn from(c: &MapCapacities) -> Self {
        Self {
            endpoints: c.endpoints,
            peer_classes: c.peer_classes,
            peer_hosts: c.peer_hosts,
            verdicts: c.verdicts,
            verdicts_exact: c.verdicts_exact,
            conntrack: c.conntrack,
            services: c.services,
            service_nat: c.service_nat,
            routes: c.routes,
        }
    }
}

impl From<&pb::MapCapacities> for MapCapacities {
    /// A table reported as 0 (an agent that does not know it) has its default size.
    fn from(c: &pb::MapCapacities) -> Self {
        let d = MapCapacities::default();
        let or = |v: u32, default: u32| if v == 0 { default } else { v };
        Self {
            endpoints: or(c.endpoints, d.endpoints),
            peer_classes: or(c.peer_classes, d.peer_classes),
            peer_hosts: or(c.peer_hosts, d.peer_hosts),
            verdicts: or(c.verdicts, d.verdicts),
            verdicts_exact: or(c.verdicts_exact, d.verdicts_exact),
            conntrack: or(c.conntrack, d.conntrack),
            services: or(c.services, d.services),
            service_nat: or(c.service_nat, d.service_nat),
            routes: or(c.routes, d.routes),
        }
    }
}

impl From<&NodeState> for pb::NodeState {
    fn from(s: &NodeState) -> Self {
        Self {
            endpoints: s.endpoints.iter().map(|(k, v)| endpoint(k, v)).collect(),
            peer_classes: s
                .peer_classes
                .iter()
                .map(|(k, v)| peer_class(&k, v))
                .collect(),
            verdicts: s.verdicts.iter().map(|(k, v)| verdict(k, v)).collect(),
            rules: s.rules.iter().map(|(k, v)| rule(*k, v)).collect(),
            rule_sets: s.rule_sets.iter().map(|(k, v)| rule_set(*k, v)).collect(),
            routes: s.routes.iter().map(|(k, v)| route(k, v)).collect(),
            services: s.services.iter().map(|(k, v)| service(k, v)).collect(),
            prefilter: s.prefilter.iter().map(|(k, v)| drop_prefix(k, v)).collect(),
        }
    }
}

impl From<&NodeStateDiff> for pb::NodeStateDiff {
    fn from(d: &NodeStateDiff) -> Self {
        Self {
            from_version: d.from_version,
            to_version: d.to_version,
            upsert_endpoints: d
                .endpoints
                .upsert
                .iter()
                .map(|(k, v)| endpoint(k, v))
                .collect(),
            remove_endpoints: d.endpoints.remove.iter().map(pod_key).collect(),
            upsert_peer_classes: d
                .peer_classes
                .upsert
                .iter()
                .map(|(k, v)| peer_class(k, *v))
                .collect(),
            remove_peer_classes: d.peer_classes.remove.iter().map(ip_prefix).collect(),
            upsert_verdicts: d
                .verdicts
                .upsert
                .iter()
                .map(|(k, v)| verdict(k, v))
                .collect(),
            remove_verdicts: d.verdicts.remove.iter().map(verdict_match).collect(),
            upsert_rules: d.rules.upsert.iter().map(|(k, v)| rule(*k, v)).collect(),
            remove_rules: d.rules.remove.clone(),
            upsert_rule_sets: d
                .rule_sets
                .upsert
                .iter()
                .map(|(k, v)| rule_set(*k, v))
                .collect(),
            remove_rule_sets: d.rule_sets.remove.clone(),
            upsert_routes: d.routes.upsert.iter().map(|(k, v)| route(k, v)).collect(),
            remove_routes: d.routes.remove.iter().map(ip_prefix).collect(),
            upsert_services: d
                .services
                .upsert
                .iter()
                .map(|(k, v)| service(k, v))
                .collect(),
            remove_services: d.services.remove.iter().map(service_frontend).collect(),
            upsert_prefilter: d
                .prefilter
                .upsert
                .iter()
                .map(|(k, v)| drop_prefix(k, v))
                .collect(),
            remove_prefilter: d.prefilter.remove.iter().map(ip_prefix).collect(),
        }
    }
}

// ---- decoding -------------------------------------------------------------------------------

fn required<T>(value: Option<T>, field: &'static str) -> Result<T, ProtoError> {
    value.ok_or(ProtoError::MissingField { field })
}

fn decode_ip(bytes: &[u8], field: &'static str) -> Result<IpAddr, ProtoError> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        Ok(IpAddr::V4(Ipv4Addr::from(v4)))
    } else if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        Ok(IpAddr::V6(Ipv6Addr::from(v6)))
    } else {
        Err(ProtoError::AddressLength {
            field,
            len: bytes.len(),
        })
    }
}

fn decode_prefix(p: &pb::IpPrefix, field: &'static str) -> Result<IpNet, ProtoError> {
    let address = decode_ip(&p.address, field)?;
    let max: u8 = if address.is_ipv4() { 32 } else { 128 };
    let too_long = ProtoError::PrefixTooLong {
        field,
        address,
        len: p.prefix_len,
        max,
    };
    let len = u8::try_from(p.prefix_len).map_err(|_| too_long.clone())?;
    IpNet::new(address, len).map_err(|_| too_long)
}

fn decode_pod(p: pb::PodKey) -> PodKey {
    PodKey {
        namespace: p.namespace,
        name: p.name,
    }
}

fn decode_endpoint(e: pb::Endpoint) -> Result<(PodKey, EndpointPolicy), ProtoError> {
    let pod = required(e.pod, "Endpoint.pod")?;
    Ok((
        decode_pod(pod),
        EndpointPolicy {
            ingress: e.ingress_rule_set,
            egress: e.egress_rule_set,
        },
    ))
}

fn decode_peer_class(c: &pb::PeerClass) -> Result<(IpNet, u32), ProtoError> {
    let prefix = required(c.prefix.as_ref(), "PeerClass.prefix")?;
    Ok((decode_prefix(prefix, "PeerClass.prefix")?, c.class))
}

fn decode_verdict_match(m: &pb::VerdictMatch) -> Result<VerdictMatch, ProtoError> {
    let proto = m
        .proto
        .map(|p| {
            IpProto::try_from(p).map_err(|_| ProtoError::OutOfRange {
                field: "VerdictMatch.proto",
                value: p,
                max: u32::from(IpProto::MAX),
            })
        })
        .transpose()?;
    let ports = m
        .ports
        .as_ref()
        .map(|p| {
            let invalid = ProtoError::PortPrefixInvalid {
                field: "VerdictMatch.ports",
                port: p.port,
                len: p.len,
            };
            let port = u16::try_from(p.port).map_err(|_| invalid.clone())?;
            let len = u8::try_from(p.len).map_err(|_| invalid.clone())?;
            PortPrefix::new(port, len).ok_or(invalid)
        })
        .transpose()?;
    if proto.is_none() && ports.is_some() {
        return Err(ProtoError::PortsWithoutProto {
            field: "VerdictMatch.ports",
        });
    }
    Ok(VerdictMatch {
        rule_set: m.rule_set,
        class: m.class,
        proto,
        ports,
    })
}

fn decode_action(value: i32) -> Result<Action, ProtoError> {
    match pb::Action::try_from(value) {
        Ok(pb::Action::Allow) => Ok(Action::Allow),
        Ok(pb::Action::Deny) => Ok(Action::Deny),
        Ok(pb::Action::Unspecified) | Err(_) => Err(ProtoError::UnknownEnum {
            field: "Verdict.action",
            enum_name: "Action",
            value,
        }),
    }
}

fn decode_direction(value: i32, field: &'static str) -> Result<Direction, ProtoError> {
    match pb::Direction::try_from(value) {
        Ok(pb::Direction::Ingress) => Ok(Direction::Ingress),
        Ok(pb::Direction::Egress) => Ok(Direction::Egress),
        Ok(pb::Direction::Unspecified) | Err(_) => Err(ProtoError::UnknownEnum {
            field,
            enum_name: "Direction",
            value,
        }),
    }
}

fn decode_verdict(v: &pb::Verdict) -> Result<(VerdictMatch, VerdictEntry), ProtoError> {
    let key = required(v.key.as_ref(), "Verdict.key")?;
    Ok((
        decode_verdict_match(key)?,
        VerdictEntry {
            action: decode_action(v.action)?,
            rule: v.rule,
        },
    ))
}

fn decode_policy_ref(p: pb::PolicyRef) -> PolicyRef {
    PolicyRef::new(p.kind, p.namespace, p.name)
}

fn decode_rule(r: pb::Rule) -> Result<(u32, RuleRef), ProtoError> {
    let rule = required(r.rule, "Rule.rule")?;
    let policy = required(rule.policy, "RuleRef.policy")?;
    Ok((
        r.id,
        RuleRef {
            policy: decode_policy_ref(policy),
            direction: decode_direction(rule.direction, "RuleRef.direction")?,
            index: rule.index,
            tiered: rule.tiered.map(decode_tiered_rule).transpose()?,
        },
    ))
}

fn decode_tiered_rule(t: pb::TieredRule) -> Result<TieredRule, ProtoError> {
    let tier = match pb::PolicyTier::try_from(t.tier) {
        Ok(pb::PolicyTier::Admin) => PolicyTier::Admin,
        Ok(pb::PolicyTier::Baseline) => PolicyTier::Baseline,
        Ok(pb::PolicyTier::Untracked) => PolicyTier::Untracked,
        Ok(pb::PolicyTier::Unspecified) | Err(_) => {
            return Err(ProtoError::UnknownEnum {
                field: "TieredRule.tier",
                enum_name: "PolicyTier",
                value: t.tier,
            });
        }
    };
    let action = match pb::TieredAction::try_from(t.action) {
        Ok(pb::TieredAction::Accept) => TieredAction::Accept,
        Ok(pb::TieredAction::Deny) => TieredAction::Deny,
        Ok(pb::TieredAction::Pass) => TieredAction::Pass,
        Ok(pb::TieredAction::Unspecified) | Err(_) => {
            return Err(ProtoError::UnknownEnum {
                field: "TieredRule.action",
                enum_name: "TieredAction",
                value: t.action,
            });
        }
    };
    Ok(TieredRule {
        tier,
        priority: t.priority,
        name: t.name,
        action,
    })
}

fn decode_rule_set(r: pb::RuleSet) -> Result<(u32, RuleSetInfo), ProtoError> {
    let info = required(r.info, "RuleSet.info")?;
    Ok((
        r.id,
        RuleSetInfo {
            direction: decode_direction(info.direction, "RuleSetInfo.direction")?,
            policies: info.policies.into_iter().map(decode_policy_ref).collect(),
        },
    ))
}

fn decode_drop_prefix(p: pb::DropPrefix) -> Result<(IpNet, String), ProtoError> {
    let prefix = required(p.prefix.as_ref(), "DropPrefix.prefix")?;
    Ok((decode_prefix(prefix, "DropPrefix.prefix")?, p.source))
}

fn decode_route(r: pb::Route) -> Result<(IpNet, NodeRoute), ProtoError> {
    let cidr = required(r.pod_cidr.as_ref(), "Route.pod_cidr")?;
    let cidr = decode_prefix(cidr, "Route.pod_cidr")?;
    let route = required(r.route, "Route.route")?;
    Ok((
        cidr,
        NodeRoute {
            node_ip: decode_ip(&route.node_ip, "NodeRoute.node_ip")?,
            other_ips: route
                .other_ips
                .iter()
                .map(|ip| decode_ip(ip, "NodeRoute.other_ips"))
                .collect::<Result<_, _>>()?,
            node: route.node,
        },
    ))
}

fn decode_port(value: u32, field: &'static str) -> Result<u16, ProtoError> {
    u16::try_from(value).map_err(|_| ProtoError::OutOfRange {
        field,
        value,
        max: u32::from(u16::MAX),
    })
}

fn decode_service_frontend(f: &pb::ServiceFrontend) -> Result<ServiceFrontend, ProtoError> {
    let kind = match pb::FrontendKind::try_from(f.kind) {
        Ok(pb::FrontendKind::ClusterIp) => FrontendKind::ClusterIp,
        Ok(pb::FrontendKind::NodePort) => FrontendKind::NodePort,
        Ok(pb::FrontendKind::Unspecified) | Err(_) => {
            return Err(ProtoError::UnknownEnum {
                field: "ServiceFrontend.kind",
                enum_name: "FrontendKind",
                value: f.kind,
            });
        }
    };
    let ip = decode_ip(&f.ip, "ServiceFrontend.ip")?;
    // The dataplane keys node ports by the unspecified address; any other address would
    // be a frontend no packet ever matches.
    if kind == FrontendKind::NodePort && !ip.is_unspecified() {
        return Err(ProtoError::NodePortAddress {
            field: "ServiceFrontend.ip",
            address: ip,
        });
    }
    Ok(ServiceFrontend {
        kind,
        ip,
        port: decode_port(f.port, "ServiceFrontend.port")?,
        proto: IpProto::try_from(f.proto).map_err(|_| ProtoError::OutOfRange {
            field: "ServiceFrontend.proto",
            value: f.proto,
            max: u32::from(IpProto::MAX),
        })?,
    })
}

fn decode_backend(b: pb::ServiceBackend) -> Result<ServiceBackend, ProtoError> {
    let state = match pb::BackendState::try_from(b.state) {
        Ok(pb::BackendState::Ready) => BackendState::Ready,
        Ok(pb::BackendState::Terminating) => BackendState::Terminating,
        Ok(pb::BackendState::Unspecified) | Err(_) => {
            return Err(ProtoError::UnknownEnum {
                field: "ServiceBackend.state",
                enum_name: "BackendState",
                value: b.state,
            });
        }
    };
    Ok(ServiceBackend {
        ip: decode_ip(&b.ip, "ServiceBackend.ip")?,
        port: decode_port(b.port, "ServiceBackend.port")?,
        node: b.node,
        state,
    })
}

fn decode_service(s: pb::Service) -> Result<(ServiceFrontend, ServiceEntry), ProtoError> {
    let frontend = required(s.frontend.as_ref(), "Service.frontend")?;
    let frontend = decode_service_frontend(frontend)?;
    let entry = required(s.entry, "Service.entry")?;
    let service = required(entry.service, "ServiceEntry.service")?;
    if entry.id == 0 {
        return Err(ProtoError::ZeroId {
            field: "ServiceEntry.id",
        });
    }
    Ok((
        frontend,
        ServiceEntry {
            service: ServiceRef {
                namespace: service.namespace,
                name: service.name,
                port_name: service.port_name,
            },
            id: entry.id,
            backends: entry
                .backends
                .into_iter()
                .map(decode_backend)
                .collect::<Result<_, _>>()?,
            affinity_timeout_s: entry.affinity_timeout_s,
            masquerade_external: entry.masquerade_external,
        },
    ))
}

/// Collects decoded entries into a map, refusing a key that repeats: the sender's map cannot
/// hold one twice, so a repeat means a corrupt or hostile message.
fn collect_table<K: Ord + Debug, V, T>(
    table: &'static str,
    items: impl IntoIterator<Item = T>,
    decode: impl Fn(T) -> Result<(K, V), ProtoError>,
) -> Result<BTreeMap<K, V>, ProtoError> {
    let mut map = BTreeMap::new();
    for item in items {
        let (k, v) = decode(item)?;
        if let Some((k, _)) = map.remove_entry(&k) {
            return Err(ProtoError::DuplicateKey {
                table,
                key: format!("{k:?}"),
            });
        }
        map.insert(k, v);
    }
    Ok(map)
}

/// Decodes one table of a diff; a key may appear at most once among the upserts and at most
/// once among the removals (as [`TableDiff::between`] produces them).
fn decode_table_diff<K: Ord + Clone + Debug, V, U, R>(
    table: &'static str,
    upsert: impl IntoIterator<Item = U>,
    remove: impl IntoIterator<Item = R>,
    decode_upsert: impl Fn(U) -> Result<(K, V), ProtoError>,
    decode_remove: impl Fn(R) -> Result<K, ProtoError>,
) -> Result<TableDiff<K, V>, ProtoError> {
    let duplicate = |k: &K| ProtoError::DuplicateKey {
        table,
        key: format!("{k:?}"),
    };
    let mut seen = BTreeSet::new();
    let mut upserts = Vec::new();
    for item in upsert {
        let (k, v) = decode_upsert(item)?;
        if !seen.insert(k.clone()) {
            return Err(duplicate(&k));
        }
        upserts.push((k, v));
    }
    seen.clear();
    let mut removes = Vec::new();
    for item in remove {
        let k = decode_remove(item)?;
        if !seen.insert(k.clone()) {
            return Err(duplicate(&k));
        }
        removes.push(k);
    }
    Ok(TableDiff {
        upsert: upserts,
        remove: removes,
    })
}

impl TryFrom<pb::NodeState> for NodeState {
    type Error = ProtoError;

    fn try_from(s: pb::NodeState) -> Result<Self, ProtoError> {
        Ok(Self {
            endpoints: collect_table("endpoints", s.endpoints, decode_endpoint)?,
            peer_classes: collect_table("peer_classes", &s.peer_classes, decode_peer_class)?.into(),
            verdicts: collect_table("verdicts", &s.verdicts, decode_verdict)?,
            rules: collect_table("rules", s.rules, decode_rule)?,
            rule_sets: collect_table("rule_sets", s.rule_sets, decode_rule_set)?,
            routes: std::sync::Arc::new(collect_table("routes", s.routes, decode_route)?),
            services: collect_table("services", s.services, decode_service)?,
            prefilter: std::sync::Arc::new(collect_table(
                "prefilter",
                s.prefilter,
                decode_drop_prefix,
            )?),
        })
    }
}

impl TryFrom<pb::NodeStateDiff> for NodeStateDiff {
    type Error = ProtoError;

    fn try_from(d: pb::NodeStateDiff) -> Result<Self, ProtoError> {
        Ok(Self {
            from_version: d.from_version,
            to_version: d.to_version,
            endpoints: decode_table_diff(
                "endpoints",
                d.upsert_endpoints,
                d.remove_endpoints,
                decode_endpoint,
                |p| Ok(decode_pod(p)),
            )?,
            peer_classes: decode_table_diff(
                "peer_classes",
                &d.upsert_peer_classes,
                &d.remove_peer_classes,
                decode_peer_class,
                |p| decode_prefix(p, "NodeStateDiff.remove_peer_classes"),
            )?,
            verdicts: decode_table_diff(
                "verdicts",
                &d.upsert_verdicts,
                &d.remove_verdicts,
                decode_verdict,
                decode_verdict_match,
            )?,
            rules: decode_table_diff("rules", d.upsert_rules, d.remove_rules, decode_rule, Ok)?,
            rule_sets: decode_table_diff(
                "rule_sets",
                d.upsert_rule_sets,
                d.remove_rule_sets,
                decode_rule_set,
                Ok,
            )?,
            routes: decode_table_diff(
                "routes",
                d.upsert_routes,
                &d.remove_routes,
                decode_route,
                |p| decode_prefix(p, "NodeStateDiff.remove_routes"),
            )?,
            services: decode_table_diff(
                "services",
                d.upsert_services,
                &d.remove_services,
                decode_service,
                decode_service_frontend,
            )?,
            prefilter: decode_table_diff(
                "prefilter",
                d.upsert_prefilter,
                &d.remove_prefilter,
                decode_drop_prefix,
                |p| decode_prefix(p, "NodeStateDiff.remove_prefilter"),
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use prost::Message;

    use super::*;
    use crate::testing::{arb_node_state, arb_verdict_match};

    #[test]
    fn map_capacities_round_trip_and_unreported_tables_are_the_defaults() {
        let caps: MapCapacities = "conntrack=1000000,routes=2048".parse().unwrap();
        assert_eq!(MapCapacities::from(&pb::MapCapacities::from(&caps)), caps);
        let partial = pb::MapCapacities {
            verdicts_exact: 4096,
            ..Default::default()
        };
        assert_eq!(
            MapCapacities::from(&partial),
            MapCapacities {
                verdicts_exact: 4096,
                ..Default::default()
            }
        );
    }

    fn decode_state(s: pb::NodeState) -> Result<NodeState, ProtoError> {
        NodeState::try_from(s)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// NodeState → bytes on the wire → NodeState is the identity.
        #[test]
        fn node_state_survives_the_wire(state in arb_node_state()) {
            let bytes = pb::NodeState::from(&state).encode_to_vec();
            let wire = pb::NodeState::decode(bytes.as_slice()).expect("decode own encoding");
            prop_assert_eq!(decode_state(wire)?, state);
        }

        /// A diff between two states survives the wire and still turns the old into the new.
        #[test]
        fn node_state_diff_survives_the_wire(
            old in arb_node_state(),
            new in arb_node_state(),
            from in any::<u64>(),
            to in any::<u64>(),
        ) {
            let diff = old.diff(&new, from, to);
            let bytes = pb::NodeStateDiff::from(&diff).encode_to_vec();
            let wire = pb::NodeStateDiff::decode(bytes.as_slice()).expect("decode own encoding");
            let back = NodeStateDiff::try_from(wire)?;
            prop_assert_eq!(&back, &diff);
            let mut applied = old.clone();
            applied.apply(&back);
            prop_assert_eq!(applied, new);
        }

        #[test]
        fn verdict_match_survives_the_wire(m in arb_verdict_match()) {
            prop_assert_eq!(decode_verdict_match(&verdict_match(&m))?, m);
        }
    }

    fn prefix(address: Vec<u8>, prefix_len: u32) -> pb::IpPrefix {
        pb::IpPrefix {
            address,
            prefix_len,
        }
    }

    fn state_with_peer_class(p: pb::IpPrefix) -> pb::NodeState {
        pb::NodeState {
            peer_classes: vec![pb::PeerClass {
                prefix: Some(p),
                class: 1,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn address_of_five_bytes_is_rejected() {
        let err = decode_state(state_with_peer_class(prefix(vec![10, 0, 0, 0, 1], 8))).unwrap_err();
        assert_eq!(
            err,
            ProtoError::AddressLength {
                field: "PeerClass.prefix",
                len: 5
            }
        );
    }

    #[test]
    fn ipv4_prefix_longer_than_32_bits_is_rejected() {
        let err = decode_state(state_with_peer_class(prefix(vec![10, 0, 0, 0], 33))).unwrap_err();
        assert!(
            matches!(
                err,
                ProtoError::PrefixTooLong {
                    len: 33,
                    max: 32,
                    ..
                }
            ),
            "{err}"
        );
        // A length that does not even fit a byte must not wrap around to a valid one.
        let err = decode_state(state_with_peer_class(prefix(vec![0; 16], 256 + 64))).unwrap_err();
        assert!(
            matches!(
                err,
                ProtoError::PrefixTooLong {
                    len: 320,
                    max: 128,
                    ..
                }
            ),
            "{err}"
        );
    }

    fn state_with_verdict(v: pb::Verdict) -> pb::NodeState {
        pb::NodeState {
            verdicts: vec![v],
            ..Default::default()
        }
    }

    fn tcp_match(ports: Option<pb::PortPrefix>) -> pb::VerdictMatch {
        pb::VerdictMatch {
            rule_set: 1,
            class: 2,
            proto: Some(6),
            ports,
        }
    }

    #[test]
    fn unknown_and_unspecified_actions_are_rejected() {
        for value in [0, 3, -1] {
            let err = decode_state(state_with_verdict(pb::Verdict {
                key: Some(tcp_match(None)),
                action: value,
                rule: 0,
            }))
            .unwrap_err();
            assert_eq!(
                err,
                ProtoError::UnknownEnum {
                    field: "Verdict.action",
                    enum_name: "Action",
                    value
                }
            );
        }
    }

    #[test]
    fn unknown_direction_is_rejected() {
        let s = pb::NodeState {
            rule_sets: vec![pb::RuleSet {
                id: 1,
                info: Some(pb::RuleSetInfo {
                    direction: 7,
                    policies: vec![],
                }),
            }],
            ..Default::default()
        };
        assert!(matches!(
            decode_state(s).unwrap_err(),
            ProtoError::UnknownEnum {
                enum_name: "Direction",
                value: 7,
                ..
            }
        ));
    }

    #[test]
    fn port_prefix_with_host_bits_is_rejected() {
        // 8081/15 would cover 8081..=8082, which is not a power-of-two aligned range.
        for (port, len) in [(8081, 15), (1, 17), (70000, 16)] {
            let err = decode_state(state_with_verdict(pb::Verdict {
                key: Some(tcp_match(Some(pb::PortPrefix { port, len }))),
                action: pb::Action::Allow.into(),
                rule: 0,
            }))
            .unwrap_err();
            assert_eq!(
                err,
                ProtoError::PortPrefixInvalid {
                    field: "VerdictMatch.ports",
                    port,
                    len
                }
            );
        }
    }

    #[test]
    fn ports_without_protocol_are_rejected() {
        let mut key = tcp_match(Some(pb::PortPrefix { port: 80, len: 16 }));
        key.proto = None;
        let err = decode_state(state_with_verdict(pb::Verdict {
            key: Some(key),
            action: pb::Action::Deny.into(),
            rule: 0,
        }))
        .unwrap_err();
        assert!(matches!(err, ProtoError::PortsWithoutProto { .. }));
    }

    #[test]
    fn protocol_above_255_is_rejected() {
        let mut key = tcp_match(None);
        key.proto = Some(256);
        let err = decode_verdict_match(&key).unwrap_err();
        assert!(matches!(err, ProtoError::OutOfRange { value: 256, .. }));
    }

    #[test]
    fn missing_nested_message_is_named() {
        let s = pb::NodeState {
            endpoints: vec![pb::Endpoint {
                pod: None,
                ingress_rule_set: 1,
                egress_rule_set: 0,
            }],
            ..Default::default()
        };
        assert_eq!(
            decode_state(s).unwrap_err(),
            ProtoError::MissingField {
                field: "Endpoint.pod"
            }
        );
    }

    #[test]
    fn repeated_key_in_a_snapshot_is_rejected() {
        let entry = pb::Rule {
            id: 4,
            rule: Some(pb::RuleRef {
                policy: Some(pb::PolicyRef::default()),
                direction: pb::Direction::Ingress.into(),
                index: 0,
                tiered: None,
            }),
        };
        let s = pb::NodeState {
            rules: vec![entry.clone(), entry],
            ..Default::default()
        };
        assert_eq!(
            decode_state(s).unwrap_err(),
            ProtoError::DuplicateKey {
                table: "rules",
                key: "4".into()
            }
        );
    }

    #[test]
    fn repeated_removal_in_a_diff_is_rejected() {
        let d = pb::NodeStateDiff {
            remove_rule_sets: vec![3, 3],
            ..Default::default()
        };
        assert!(matches!(
            NodeStateDiff::try_from(d).unwrap_err(),
            ProtoError::DuplicateKey {
                table: "rule_sets",
                ..
            }
        ));
    }

    #[test]
    fn route_with_bad_node_ip_is_rejected() {
        let s = pb::NodeState {
            routes: vec![pb::Route {
                pod_cidr: Some(prefix(vec![10, 1, 0, 0], 24)),
                route: Some(pb::NodeRoute {
                    node: "n".into(),
                    node_ip: vec![],
                    other_ips: vec![],
                }),
            }],
            ..Default::default()
        };
        assert_eq!(
            decode_state(s).unwrap_err(),
            ProtoError::AddressLength {
                field: "NodeRoute.node_ip",
                len: 0
            }
        );
    }

    fn cluster_ip_service() -> pb::Service {
        let frontend = ServiceFrontend {
            kind: FrontendKind::ClusterIp,
            ip: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)),
            port: 53,
            proto: 17,
        };
        let entry = ServiceEntry {
            service: ServiceRef {
                namespace: "kube-system".into(),
                name: "kube-dns".into(),
                port_name: "dns".into(),
            },
            id: 1,
            backends: vec![ServiceBackend {
                ip: IpAddr::V4(Ipv4Addr::new(10, 1, 0, 5)),
                port: 53,
                node: "node-0".into(),
                state: BackendState::Ready,
            }],
            affinity_timeout_s: None,
            masquerade_external: false,
        };
        service(&frontend, &entry)
    }

    fn state_with_service(s: pb::Service) -> pb::NodeState {
        pb::NodeState {
            services: vec![s],
            ..Default::default()
        }
    }

    #[test]
    fn valid_service_decodes() {
        let s = decode_state(state_with_service(cluster_ip_service())).expect("valid service");
        let (frontend, entry) = s.services.first_key_value().expect("one service");
        assert_eq!(frontend.port, 53);
        assert_eq!(entry.backends.len(), 1);
    }

    #[test]
    fn unknown_and_unspecified_frontend_kinds_are_rejected() {
        for value in [0, 3] {
            let mut s = cluster_ip_service();
            s.frontend.as_mut().expect("frontend").kind = value;
            assert_eq!(
                decode_state(state_with_service(s)).unwrap_err(),
                ProtoError::UnknownEnum {
                    field: "ServiceFrontend.kind",
                    enum_name: "FrontendKind",
                    value
                }
            );
        }
    }

    #[test]
    fn node_port_frontend_with_an_address_is_rejected() {
        let mut s = cluster_ip_service();
        s.frontend.as_mut().expect("frontend").kind = pb::FrontendKind::NodePort.into();
        assert_eq!(
            decode_state(state_with_service(s)).unwrap_err(),
            ProtoError::NodePortAddress {
                field: "ServiceFrontend.ip",
                address: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)),
            }
        );
        let mut s = cluster_ip_service();
        let frontend = s.frontend.as_mut().expect("frontend");
        frontend.kind = pb::FrontendKind::NodePort.into();
        frontend.ip = vec![0; 16];
        assert!(decode_state(state_with_service(s)).is_ok());
    }

    #[test]
    fn service_ports_above_65535_are_rejected() {
        let mut s = cluster_ip_service();
        s.frontend.as_mut().expect("frontend").port = 65536;
        assert_eq!(
            decode_state(state_with_service(s)).unwrap_err(),
            ProtoError::OutOfRange {
                field: "ServiceFrontend.port",
                value: 65536,
                max: 65535
            }
        );
        let mut s = cluster_ip_service();
        s.entry.as_mut().expect("entry").backends[0].port = 70000;
        assert_eq!(
            decode_state(state_with_service(s)).unwrap_err(),
            ProtoError::OutOfRange {
                field: "ServiceBackend.port",
                value: 70000,
                max: 65535
            }
        );
    }

    #[test]
    fn service_protocol_above_255_is_rejected() {
        let mut s = cluster_ip_service();
        s.frontend.as_mut().expect("frontend").proto = 256;
        assert!(matches!(
            decode_state(state_with_service(s)).unwrap_err(),
            ProtoError::OutOfRange {
                field: "ServiceFrontend.proto",
                value: 256,
                ..
            }
        ));
    }

    #[test]
    fn unspecified_backend_state_is_rejected() {
        let mut s = cluster_ip_service();
        s.entry.as_mut().expect("entry").backends[0].state = 0;
        assert_eq!(
            decode_state(state_with_service(s)).unwrap_err(),
            ProtoError::UnknownEnum {
                field: "ServiceBackend.state",
                enum_name: "BackendState",
                value: 0
            }
        );
    }

    #[test]
    fn backend_with_bad_address_is_rejected() {
        let mut s = cluster_ip_service();
        s.entry.as_mut().expect("entry").backends[0].ip = vec![10, 1];
        assert_eq!(
            decode_state(state_with_service(s)).unwrap_err(),
            ProtoError::AddressLength {
                field: "ServiceBackend.ip",
                len: 2
            }
        );
    }

    #[test]
    fn service_id_zero_is_rejected() {
        let mut s = cluster_ip_service();
        s.entry.as_mut().expect("entry").id = 0;
        assert_eq!(
            decode_state(state_with_service(s)).unwrap_err(),
            ProtoError::ZeroId {
                field: "ServiceEntry.id"
            }
        );
    }

    #[test]
    fn service_without_entry_or_frontend_is_named() {
        let mut s = cluster_ip_service();
        s.entry = None;
        assert_eq!(
            decode_state(state_with_service(s)).unwrap_err(),
            ProtoError::MissingField {
                field: "Service.entry"
            }
        );
        let mut s = cluster_ip_service();
        s.frontend = None;
        assert_eq!(
            decode_state(state_with_service(s)).unwrap_err(),
            ProtoError::MissingField {
                field: "Service.frontend"
            }
        );
        let mut s = cluster_ip_service();
        s.entry.as_mut().expect("entry").service = None;
        assert_eq!(
            decode_state(state_with_service(s)).unwrap_err(),
            ProtoError::MissingField {
                field: "ServiceEntry.service"
            }
        );
    }

    #[test]
    fn repeated_service_frontend_is_rejected() {
        let s = pb::NodeState {
            services: vec![cluster_ip_service(), cluster_ip_service()],
            ..Default::default()
        };
        assert!(matches!(
            decode_state(s).unwrap_err(),
            ProtoError::DuplicateKey {
                table: "services",
                ..
            }
        ));
        let d = pb::NodeStateDiff {
            remove_services: vec![
                cluster_ip_service().frontend.expect("frontend"),
                cluster_ip_service().frontend.expect("frontend"),
            ],
            ..Default::default()
        };
        assert!(matches!(
            NodeStateDiff::try_from(d).unwrap_err(),
            ProtoError::DuplicateKey {
                table: "services",
                ..
            }
        ));
    }

    #[test]
    fn bad_removed_service_frontend_in_a_diff_is_rejected() {
        let mut frontend = cluster_ip_service().frontend.expect("frontend");
        frontend.kind = 9;
        let d = pb::NodeStateDiff {
            remove_services: vec![frontend],
            ..Default::default()
        };
        assert!(matches!(
            NodeStateDiff::try_from(d).unwrap_err(),
            ProtoError::UnknownEnum {
                field: "ServiceFrontend.kind",
                value: 9,
                ..
            }
        ));
    }

    /// Arbitrary bytes never panic the decoder: they either fail protobuf decoding or are
    /// rejected or accepted by the conversion.
    #[test]
    fn garbage_never_panics() {
        let mut runner = proptest::test_runner::TestRunner::default();
        runner
            .run(&proptest::collection::vec(any::<u8>(), 0..256), |bytes| {
                if let Ok(s) = pb::NodeState::decode(bytes.as_slice()) {
                    let _ = decode_state(s);
                }
                if let Ok(d) = pb::NodeStateDiff::decode(bytes.as_slice()) {
                    let _ = NodeStateDiff::try_from(d);
                }
                Ok(())
            })
            .expect("decoding garbage must not panic");
    }

    /// One edit to an encoded message: what a bit flip, a cut connection or a confused peer
    /// makes of it.
    #[derive(Debug, Clone)]
    enum Mutation {
        Flip(prop::sample::Index, u8),
        Truncate(prop::sample::Index),
        Insert(prop::sample::Index, Vec<u8>),
        Repeat(prop::sample::Index, prop::sample::Index),
    }

    fn mutate(mut bytes: Vec<u8>, edits: &[Mutation]) -> Vec<u8> {
        for edit in edits {
            let n = bytes.len();
            match edit {
                Mutation::Flip(at, x) if n > 0 => bytes[at.index(n)] ^= x | 1,
                Mutation::Truncate(at) => bytes.truncate(at.index(n + 1)),
                Mutation::Insert(at, extra) => {
                    let at = at.index(n + 1);
                    bytes.splice(at..at, extra.iter().copied());
                }
                Mutation::Repeat(a, b) if n > 0 => {
                    let (a, b) = (a.index(n), b.index(n));
                    let piece = bytes[a.min(b)..=a.max(b)].to_vec();
                    bytes.extend(piece);
                }
                _ => {}
            }
        }
        bytes
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            4 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(a, x)| Mutation::Flip(a, x)),
            1 => any::<prop::sample::Index>().prop_map(Mutation::Truncate),
            2 => (any::<prop::sample::Index>(), proptest::collection::vec(any::<u8>(), 1..12))
                .prop_map(|(a, v)| Mutation::Insert(a, v)),
            1 => (any::<prop::sample::Index>(), any::<prop::sample::Index>())
                .prop_map(|(a, b)| Mutation::Repeat(a, b)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Valid states and diffs with a few edits on the wire: decoding and converting never
        /// panic, and a diff that is accepted applies to a state without panicking either.
        #[test]
        fn mutated_messages_never_panic(
            old in arb_node_state(),
            new in arb_node_state(),
            edits in proptest::collection::vec(mutation(), 1..4),
        ) {
            let bytes = mutate(pb::NodeState::from(&new).encode_to_vec(), &edits);
            if let Ok(s) = pb::NodeState::decode(bytes.as_slice()) {
                let _ = decode_state(s);
            }
            let diff = old.diff(&new, 1, 2);
            let bytes = mutate(pb::NodeStateDiff::from(&diff).encode_to_vec(), &edits);
            if let Ok(d) = pb::NodeStateDiff::decode(bytes.as_slice())
                && let Ok(d) = NodeStateDiff::try_from(d)
            {
                let mut applied = old.clone();
                applied.apply(&d);
            }
        }
    }
}
