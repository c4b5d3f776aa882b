//! `ClusterNetworkPolicy` (`policy.networking.k8s.io/v1alpha2`, from the Kubernetes SIG
//! Network network-policy-api project): the typed object as written, and its validation
//! into the normalized [`Policy`] the compiler works on.
//!
//! The types follow the upstream Go types (`apis/v1alpha2/clusternetworkpolicy_types.go`)
//! field for field, standard and experimental channel. Fields this implementation does not
//! know are kept (`unknown`) so that validation can fail closed on them instead of dropping
//! them silently.
//!
//! Fail-closed rules (upstream's, for peers it cannot read, applied to every unreadable part
//! of a rule): an `Accept` rule that cannot be read matches nothing; a `Deny` or `Pass` rule
//! that cannot be read, or a rule whose action cannot be read, denies everything. A
//! `subject` that cannot be read selects every pod; a `tier` that cannot be read is the
//! Admin tier; a `priority` out of range is clamped to 0..=1000. See
//! `docs/policy-semantics.md`.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::{Deserialize, Serialize};

use super::{
    Error, Result, names,
    policy::{
        IpBlockPeer, NamespaceScope, Peer, PodPeer, Policy, PolicyKey, PortMatch, Protocol, Rule,
        RuleAction, Tier,
    },
    selector::Selector,
    validate::{Problem, Severity, ValidatedPolicy, Validator},
};

/// The kind.
pub const KIND: &str = super::policy::CLUSTER_NETWORK_POLICY_KIND;
/// API group and version.
pub const API_VERSION: &str = "policy.networking.k8s.io/v1alpha2";
/// API group.
pub const GROUP: &str = "policy.networking.k8s.io";
/// API version within [`GROUP`].
pub const VERSION: &str = "v1alpha2";
/// The resource name (plural) the API server serves the kind under.
pub const PLURAL: &str = "clusternetworkpolicies";
/// Highest `spec.priority`.
pub const MAX_PRIORITY: u32 = 1000;

/// Fields of an object this implementation does not know, by name.
pub type UnknownFields = BTreeMap<String, serde_json::Value>;

/// A cluster-wide network policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworkPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ClusterNetworkPolicySpec,
    /// Written by implementations; not read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworkPolicySpec {
    /// `Admin` or `Baseline`.
    #[serde(default)]
    pub tier: String,
    /// 0..=1000, lower first.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "integer"
    )]
    pub priority: Option<i64>,
    #[serde(default)]
    pub subject: Subject,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<IngressRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<EgressRule>>,
    #[serde(flatten)]
    pub unknown: UnknownFields,
}

/// The pods a policy applies to; exactly one field set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
    #[serde(flatten)]
    pub unknown: UnknownFields,
}

/// Pods by namespace selector AND pod selector.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespacedPod {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(flatten)]
    pub unknown: UnknownFields,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `Accept`, `Deny` or `Pass`.
    #[serde(default)]
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<RulePeer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocols: Option<Vec<ProtocolMatch>>,
    #[serde(flatten)]
    pub unknown: UnknownFields,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `Accept`, `Deny` or `Pass`.
    #[serde(default)]
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<RulePeer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocols: Option<Vec<ProtocolMatch>>,
    #[serde(flatten)]
    pub unknown: UnknownFields,
}

/// A peer of a rule; exactly one field set. Ingress peers may only be `namespaces` or
/// `pods`; `nodes` and `domainNames` are experimental-channel egress peers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RulePeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_names: Option<Vec<String>>,
    #[serde(flatten)]
    pub unknown: UnknownFields,
}

/// Protocol-specific matches; exactly one field set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<ProtocolPorts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<ProtocolPorts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sctp: Option<ProtocolPorts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_named_port: Option<String>,
    #[serde(flatten)]
    pub unknown: UnknownFields,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolPorts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<Port>,
    #[serde(flatten)]
    pub unknown: UnknownFields,
}

/// A port number or a range; exactly one field set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "integer"
    )]
    pub number: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<PortRange>,
    #[serde(flatten)]
    pub unknown: UnknownFields,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortRange {
    #[serde(default, deserialize_with = "required_integer")]
    pub start: i32,
    #[serde(default, deserialize_with = "required_integer")]
    pub end: i32,
    #[serde(flatten)]
    pub unknown: UnknownFields,
}

/// An integer field of a struct that keeps unknown fields. Such structs are buffered before
/// their fields are read, and integers do not survive that buffering in every build of the
/// JSON library, so they are read through a JSON value.
fn integer<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i64>,
{
    use serde::de::Error as _;
    let Some(value) = Option::<serde_json::Value>::deserialize(d)? else {
        return Ok(None);
    };
    let n = value
        .as_i64()
        .ok_or_else(|| D::Error::custom(format!("expected an integer, found {value}")))?;
    T::try_from(n)
        .map(Some)
        .map_err(|_| D::Error::custom(format!("integer {n} out of range")))
}

fn required_integer<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i64>,
{
    use serde::de::Error as _;
    integer(d)?.ok_or_else(|| D::Error::custom("expected an integer, found null"))
}

/// Validates and normalizes one ClusterNetworkPolicy. Fails only when the object has no
/// name. Problems are reported as diagnostics and fail closed (module documentation).
pub fn validate(cnp: &ClusterNetworkPolicy) -> Result<ValidatedPolicy> {
    let name = cnp
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or(Error::MissingName {
            kind: "ClusterNetworkPolicy",
        })?;
    let key = PolicyKey::cluster(name);
    let spec = &cnp.spec;
    let mut v = Validator::new(key.clone());
    for field in spec.unknown.keys() {
        v.report(format!("spec.{field}"), unknown_field());
    }
    let tier = match spec.tier.as_str() {
        "Admin" => Tier::Admin,
        "Baseline" => Tier::Baseline,
        other => {
            v.report(
                "spec.tier",
                Problem::UnsupportedValue {
                    value: other.to_owned(),
                    supported: "\"Admin\", \"Baseline\"",
                },
            );
            Tier::Admin
        }
    };
    let priority = match spec.priority {
        Some(p) if (0..=i64::from(MAX_PRIORITY)).contains(&p) => p as u32,
        Some(p) => {
            v.report(
                "spec.priority",
                Problem::InvalidValue {
                    value: p.to_string(),
                    reason: "must be between 0 and 1000",
                },
            );
            p.clamp(0, i64::from(MAX_PRIORITY)) as u32
        }
        None => {
            v.report("spec.priority", Problem::Required);
            0
        }
    };
    let (namespaces, pod_selector) = subject(&mut v, &spec.subject);
    let ingress = spec
        .ingress
        .as_ref()
        .filter(|r| !r.is_empty())
        .map(|rules| {
            rules
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    let path = format!("spec.ingress[{i}]");
                    for field in r.unknown.keys() {
                        v.report(format!("{path}.{field}"), unknown_field());
                    }
                    let unknown = !r.unknown.is_empty();
                    rule(
                        &mut v,
                        RawRule {
                            index: i,
                            name: r.name.as_deref(),
                            action: &r.action,
                            peers: r.from.as_deref(),
                            protocols: r.protocols.as_deref(),
                            ingress: true,
                            unknown,
                        },
                        &path,
                    )
                })
                .collect()
        });
    let egress = spec.egress.as_ref().filter(|r| !r.is_empty()).map(|rules| {
        rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let path = format!("spec.egress[{i}]");
                for field in r.unknown.keys() {
                    v.report(format!("{path}.{field}"), unknown_field());
                }
                let unknown = !r.unknown.is_empty();
                rule(
                    &mut v,
                    RawRule {
                        index: i,
                        name: r.name.as_deref(),
                        action: &r.action,
                        peers: r.to.as_deref(),
                        protocols: r.protocols.as_deref(),
                        ingress: false,
                        unknown,
                    },
                    &path,
                )
            })
            .collect()
    });
    let diagnostics = v.into_diagnostics();
    let valid = !diagnostics.iter().any(|d| d.severity == Severity::Error);
    Ok(ValidatedPolicy {
        policy: Policy {
            key,
            tier,
            priority,
            namespaces,
            pod_selector,
            ingress,
            egress,
            valid,
        },
        diagnostics,
    })
}

fn unknown_field() -> Problem {
    Problem::Unsupported {
        what: "field unknown to this implementation".to_owned(),
    }
}

/// The subject as (namespaces, pods); every pod if it cannot be read.
fn subject(v: &mut Validator, subject: &Subject) -> (NamespaceScope, Selector) {
    let everything = || {
        (
            NamespaceScope::Matching(Selector::everything()),
            Selector::everything(),
        )
    };
    let set = usize::from(subject.namespaces.is_some())
        + usize::from(subject.pods.is_some())
        + subject.unknown.len();
    for field in subject.unknown.keys() {
        v.report(format!("spec.subject.{field}"), unknown_field());
    }
    if set != 1 {
        v.report("spec.subject", Problem::ExactlyOneField);
        return everything();
    }
    let selected = if let Some(ns) = &subject.namespaces {
        v.selector(Some(ns), "spec.subject.namespaces")
            .map(|s| (NamespaceScope::Matching(s), Selector::everything()))
    } else if let Some(pods) = &subject.pods {
        namespaced_pod(v, pods, "spec.subject.pods").map(|p| (p.namespaces, p.pods))
    } else {
        None
    };
    selected.unwrap_or_else(everything)
}

fn namespaced_pod(v: &mut Validator, pods: &NamespacedPod, path: &str) -> Option<PodPeer> {
    for field in pods.unknown.keys() {
        v.report(format!("{path}.{field}"), unknown_field());
    }
    let namespaces = v.selector(
        pods.namespace_selector.as_ref(),
        &format!("{path}.namespaceSelector"),
    );
    let selector = v.selector(pods.pod_selector.as_ref(), &format!("{path}.podSelector"));
    if !pods.unknown.is_empty() {
        return None;
    }
    Some(PodPeer {
        namespaces: NamespaceScope::Matching(namespaces?),
        pods: selector?,
    })
}

struct RawRule<'a> {
    index: usize,
    name: Option<&'a str>,
    action: &'a str,
    peers: Option<&'a [RulePeer]>,
    protocols: Option<&'a [ProtocolMatch]>,
    ingress: bool,
    unknown: bool,
}

/// One rule, failing closed: `None` for an unreadable Accept rule (matches nothing), a
/// deny-everything rule for any other unreadable rule.
fn rule(v: &mut Validator, raw: RawRule<'_>, path: &str) -> Option<Rule> {
    let before = v.error_count();
    let action = match raw.action {
        "Accept" => Some(RuleAction::Allow),
        "Deny" => Some(RuleAction::Deny),
        "Pass" => Some(RuleAction::Pass),
        other => {
            v.report(
                format!("{path}.action"),
                Problem::UnsupportedValue {
                    value: other.to_owned(),
                    supported: "\"Accept\", \"Deny\", \"Pass\"",
                },
            );
            None
        }
    };
    if let Some(name) = raw.name
        && name.len() > 100
    {
        v.report(
            format!("{path}.name"),
            Problem::InvalidValue {
                value: name.to_owned(),
                reason: "must be no more than 100 characters",
            },
        );
    }
    let peers_field = if raw.ingress { "from" } else { "to" };
    let mut peers = Vec::new();
    match raw.peers {
        None | Some([]) => v.report(format!("{path}.{peers_field}"), Problem::Required),
        Some(list) => {
            for (i, p) in list.iter().enumerate() {
                peer(
                    v,
                    p,
                    raw.ingress,
                    &format!("{path}.{peers_field}[{i}]"),
                    &mut peers,
                );
            }
        }
    }
    let mut ports = Vec::new();
    let mut named = false;
    if let Some(list) = raw.protocols {
        if list.is_empty() {
            v.report(format!("{path}.protocols"), Problem::Required);
        }
        for (i, p) in list.iter().enumerate() {
            named |= p.destination_named_port.is_some();
            protocol(v, p, &format!("{path}.protocols[{i}]"), &mut ports);
        }
    }
    if named
        && peers
            .iter()
            .any(|p| matches!(p, Peer::IpBlock(_) | Peer::Nodes(_)))
    {
        v.report(
            format!("{path}.protocols"),
            Problem::Unsupported {
                what:
                    "destinationNamedPort with a networks or nodes peer (they have no named ports)"
                        .to_owned(),
            },
        );
    }
    let index = u32::try_from(raw.index).unwrap_or(u32::MAX);
    let name = raw.name.map(str::to_owned);
    if v.error_count() > before || raw.unknown {
        return match action {
            Some(RuleAction::Allow) => None,
            _ => Some(Rule {
                index,
                name,
                action: RuleAction::Deny,
                peers: None,
                ports: None,
            }),
        };
    }
    peers.sort();
    peers.dedup();
    Some(Rule {
        index,
        name,
        action: action?,
        peers: Some(peers),
        ports: raw.protocols.map(|_| ports),
    })
}

fn peer(v: &mut Validator, peer: &RulePeer, ingress: bool, path: &str, out: &mut Vec<Peer>) {
    for field in peer.unknown.keys() {
        v.report(format!("{path}.{field}"), unknown_field());
    }
    let set = usize::from(peer.namespaces.is_some())
        + usize::from(peer.pods.is_some())
        + usize::from(peer.nodes.is_some())
        + usize::from(peer.networks.is_some())
        + usize::from(peer.domain_names.is_some())
        + peer.unknown.len();
    if set != 1 {
        v.report(path, Problem::ExactlyOneField);
        return;
    }
    if let Some(ns) = &peer.namespaces {
        if let Some(sel) = v.selector(Some(ns), &format!("{path}.namespaces")) {
            out.push(Peer::Pods(PodPeer {
                namespaces: NamespaceScope::Matching(sel),
                pods: Selector::everything(),
            }));
        }
    } else if let Some(pods) = &peer.pods {
        if let Some(p) = namespaced_pod(v, pods, &format!("{path}.pods")) {
            out.push(Peer::Pods(p));
        }
    } else if let Some(networks) = &peer.networks {
        if ingress {
            v.report(
                format!("{path}.networks"),
                Problem::Unsupported {
                    what: "networks is an egress peer only".to_owned(),
                },
            );
            return;
        }
        if networks.is_empty() {
            v.report(format!("{path}.networks"), Problem::Required);
        }
        for (i, n) in networks.iter().enumerate() {
            if let Some(cidr) = v.cidr(n, &format!("{path}.networks[{i}]")) {
                out.push(Peer::IpBlock(IpBlockPeer {
                    cidr,
                    except: Vec::new(),
                }));
            }
        }
    } else if let Some(nodes) = &peer.nodes {
        if ingress {
            v.report(
                format!("{path}.nodes"),
                Problem::Unsupported {
                    what: "nodes is an egress peer only".to_owned(),
                },
            );
            return;
        }
        if let Some(sel) = v.selector(Some(nodes), &format!("{path}.nodes")) {
            out.push(Peer::Nodes(sel));
        }
    } else if peer.domain_names.is_some() {
        v.report(
            format!("{path}.domainNames"),
            Problem::Unsupported {
                what: "domainNames peers (experimental channel) are not implemented".to_owned(),
            },
        );
    }
}

fn protocol(v: &mut Validator, p: &ProtocolMatch, path: &str, out: &mut Vec<PortMatch>) {
    for field in p.unknown.keys() {
        v.report(format!("{path}.{field}"), unknown_field());
    }
    let set = usize::from(p.tcp.is_some())
        + usize::from(p.udp.is_some())
        + usize::from(p.sctp.is_some())
        + usize::from(p.destination_named_port.is_some())
        + p.unknown.len();
    if set != 1 {
        v.report(path, Problem::ExactlyOneField);
        return;
    }
    if let Some(name) = &p.destination_named_port {
        if let Err(reason) = names::check_port_name(name) {
            v.report(
                format!("{path}.destinationNamedPort"),
                Problem::InvalidPortName {
                    value: name.clone(),
                    reason,
                },
            );
            return;
        }
        // A container port name is unique within its pod, whatever its protocol: the name
        // matches the port of whichever protocol declares it.
        out.extend(Protocol::ALL.into_iter().map(|protocol| PortMatch::Named {
            protocol,
            name: name.clone(),
        }));
        return;
    }
    let (protocol, ports, field) = match (&p.tcp, &p.udp, &p.sctp) {
        (Some(ports), _, _) => (Protocol::Tcp, ports, "tcp"),
        (_, Some(ports), _) => (Protocol::Udp, ports, "udp"),
        (_, _, Some(ports)) => (Protocol::Sctp, ports, "sctp"),
        _ => return,
    };
    let path = format!("{path}.{field}");
    for f in ports.unknown.keys() {
        v.report(format!("{path}.{f}"), unknown_field());
    }
    let Some(port) = &ports.destination_port else {
        // The CRD requires destinationPort; without it the protocol's every port matches.
        out.push(PortMatch::AllOf(protocol));
        return;
    };
    let path = format!("{path}.destinationPort");
    for f in port.unknown.keys() {
        v.report(format!("{path}.{f}"), unknown_field());
    }
    match (port.number, &port.range) {
        (Some(n), None) if port.unknown.is_empty() => {
            if let Some(n) = v.port_number(n, &format!("{path}.number")) {
                out.push(PortMatch::Range {
                    protocol,
                    first: n,
                    last: n,
                });
            }
        }
        (None, Some(range)) if port.unknown.is_empty() => {
            for f in range.unknown.keys() {
                v.report(format!("{path}.range.{f}"), unknown_field());
            }
            let first = v.port_number(range.start, &format!("{path}.range.start"));
            let last = v.port_number(range.end, &format!("{path}.range.end"));
            if range.start >= range.end {
                v.report(
                    format!("{path}.range"),
                    Problem::InvalidValue {
                        value: format!("{}-{}", range.start, range.end),
                        reason: "start must be less than end",
                    },
                );
                return;
            }
            if let (Some(first), Some(last)) = (first, last) {
                out.push(PortMatch::Range {
                    protocol,
                    first,
                    last,
                });
            }
        }
        _ => v.report(path, Problem::ExactlyOneField),
    }
}
