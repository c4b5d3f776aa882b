//! Validation and normalization of NetworkPolicy objects.
//!
//! The checks mirror the API server's (`pkg/apis/networking/validation/validation.go`:
//! `ValidateNetworkPolicySpec`, `ValidateNetworkPolicyPort`, `ValidateNetworkPolicyPeer`,
//! `ValidateIPBlock`, and apimachinery's `ValidateLabelSelector`), so that objects read from
//! manifests are held to the same rules as objects read from a cluster. Field paths are
//! written the way the API server writes them (`spec.ingress[0].from[1].ipBlock.except[0]`).
//!
//! An object with an [`Severity::Error`] **fails closed**: it still isolates the pods it
//! selects in the directions it declares, and allows nothing itself (see
//! [`fail_closed_directions`]). If its `podSelector` is unusable it isolates every pod in
//! its namespace. Other policies are unaffected.

use std::{net::IpAddr, str::FromStr};

use ipnet::IpNet;
use k8s_openapi::{
    api::networking::v1::{
        IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use super::{
    Error, Result, names,
    policy::{
        IpBlockPeer, NamespaceScope, Peer, PodPeer, Policy, PolicyKey, PortMatch, Protocol, Rule,
        RuleAction, Tier,
    },
    selector::{Operator, Requirement, Selector},
};

/// Whether a diagnostic stops the policy from allowing anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Severity {
    /// The policy fails closed.
    Error,
    /// The value was accepted in a normalized form (what the API server accepts with a
    /// warning).
    Warning,
}

/// What is wrong with one field.
#[derive(Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Problem {
    #[error("invalid CIDR {value:?}: {reason}")]
    InvalidCidr { value: String, reason: &'static str },
    #[error("CIDR {value:?} has bits set beyond the prefix length; using {normalized}")]
    CidrHostBits { value: String, normalized: IpNet },
    #[error("required value: cidr")]
    MissingCidr,
    #[error("except {except:?} must be a strict subset of cidr {cidr}")]
    ExceptNotInsideCidr { except: String, cidr: IpNet },
    #[error("unsupported protocol {value:?}: supported values are \"TCP\", \"UDP\", \"SCTP\"")]
    UnsupportedProtocol { value: String },
    #[error("invalid port {value}: {reason}")]
    InvalidPortNumber { value: i32, reason: &'static str },
    #[error("invalid port name {value:?}: {reason}")]
    InvalidPortName { value: String, reason: &'static str },
    #[error("endPort {end_port} must be greater than or equal to port {port}")]
    EndPortBelowPort { port: i32, end_port: i32 },
    #[error("endPort {end_port} may not be specified when port is non-numeric ({port:?})")]
    EndPortWithNamedPort { port: String, end_port: i32 },
    #[error("endPort {end_port} may not be specified when port is not specified")]
    EndPortWithoutPort { end_port: i32 },
    #[error("must specify a peer")]
    EmptyPeer,
    #[error("may not specify both ipBlock and another peer")]
    IpBlockWithSelector,
    #[error("invalid label key {key:?}: {reason}")]
    InvalidLabelKey { key: String, reason: &'static str },
    #[error("invalid label value {value:?}: {reason}")]
    InvalidLabelValue { value: String, reason: &'static str },
    #[error(
        "unsupported operator {operator:?}: supported values are \"In\", \"NotIn\", \"Exists\", \"DoesNotExist\""
    )]
    UnsupportedOperator { operator: String },
    #[error("values must be non-empty when operator is {operator}")]
    MissingValues { operator: &'static str },
    #[error("values may not be specified when operator is {operator}")]
    ValuesNotAllowed { operator: &'static str },
    #[error("unsupported policy type {value:?}: supported values are \"Ingress\", \"Egress\"")]
    UnsupportedPolicyType { value: String },
    #[error("may not specify more than two policyTypes ({count} given)")]
    TooManyPolicyTypes { count: usize },
    #[error("unsupported value {value:?}: supported values are {supported}")]
    UnsupportedValue {
        value: String,
        supported: &'static str,
    },
    #[error("invalid value {value:?}: {reason}")]
    InvalidValue { value: String, reason: &'static str },
    #[error("required value")]
    Required,
    #[error("exactly one field must be set")]
    ExactlyOneField,
    #[error("unsupported: {what}")]
    Unsupported { what: String },
}

/// A problem with one field of one policy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("{policy}: {field}: {problem}")]
pub struct PolicyDiagnostic {
    pub policy: PolicyKey,
    /// Path of the field, as the API server writes it.
    pub field: String,
    pub severity: Severity,
    pub problem: Problem,
}

/// The outcome of validating one NetworkPolicy: the policy to compile (fail-closed if
/// invalid) and what was wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidatedPolicy {
    pub policy: Policy,
    pub diagnostics: Vec<PolicyDiagnostic>,
}

impl ValidatedPolicy {
    pub fn is_valid(&self) -> bool {
        self.policy.valid
    }
}

/// Validates and normalizes one NetworkPolicy. Fails only when the object has no name or
/// namespace (it cannot be named, so it cannot be stored).
pub fn validate(np: &NetworkPolicy) -> Result<ValidatedPolicy> {
    let name = np
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or(Error::MissingName {
            kind: "NetworkPolicy",
        })?;
    let namespace = np
        .metadata
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| Error::MissingNamespace {
            kind: "NetworkPolicy",
            name: name.clone(),
        })?;
    let key = PolicyKey::new(namespace, name);
    let default_spec = NetworkPolicySpec::default();
    let spec = np.spec.as_ref().unwrap_or(&default_spec);
    let mut v = Validator {
        key: key.clone(),
        diagnostics: Vec::new(),
    };

    let pod_selector = v.selector(spec.pod_selector.as_ref(), "spec.podSelector");
    let ingress: Vec<Rule> = spec
        .ingress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            let path = format!("spec.ingress[{i}]");
            v.rule(i, r.from.as_deref(), r.ports.as_deref(), &path, "from")
        })
        .collect();
    let egress: Vec<Rule> = spec
        .egress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            let path = format!("spec.egress[{i}]");
            v.rule(i, r.to.as_deref(), r.ports.as_deref(), &path, "to")
        })
        .collect();
    v.policy_types(spec.policy_types.as_deref());

    let valid = !v.diagnostics.iter().any(|d| d.severity == Severity::Error);
    let (isolates_ingress, isolates_egress) = fail_closed_directions(spec);
    let policy = if valid {
        Policy {
            tier: Tier::NetworkPolicy,
            priority: 0,
            namespaces: NamespaceScope::Own(key.namespace.clone()),
            key,
            pod_selector: pod_selector.unwrap_or_default(),
            ingress: isolates_ingress.then_some(ingress),
            egress: isolates_egress.then_some(egress),
            valid,
        }
    } else {
        Policy {
            tier: Tier::NetworkPolicy,
            priority: 0,
            namespaces: NamespaceScope::Own(key.namespace.clone()),
            key,
            // An unusable podSelector cannot tell which pods the author meant: all of them.
            pod_selector: pod_selector.unwrap_or_else(Selector::everything),
            ingress: isolates_ingress.then(Vec::new),
            egress: isolates_egress.then(Vec::new),
            valid,
        }
    };
    Ok(ValidatedPolicy {
        policy,
        diagnostics: v.diagnostics,
    })
}

/// The directions a policy isolates: `(ingress, egress)`.
///
/// With readable `policyTypes` those are the declared ones. When `policyTypes` is absent or
/// empty, the API server's defaulting applies: Ingress, plus Egress if the policy has egress
/// rules. When `policyTypes` cannot be read (an unknown value, more than two entries), the
/// recognizable values are taken together with that default, so an unreadable policy
/// isolates at least as much as its author could have meant.
pub fn fail_closed_directions(spec: &NetworkPolicySpec) -> (bool, bool) {
    let has_egress_rules = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
    let inferred = (true, has_egress_rules);
    let types = match spec.policy_types.as_deref() {
        None | Some([]) => return inferred,
        Some(t) => t,
    };
    let ingress = types.iter().any(|t| t == "Ingress");
    let egress = types.iter().any(|t| t == "Egress");
    let readable = types.len() <= 2 && types.iter().all(|t| t == "Ingress" || t == "Egress");
    if readable {
        (ingress, egress)
    } else {
        (ingress || inferred.0, egress || inferred.1)
    }
}

pub(crate) struct Validator {
    key: PolicyKey,
    diagnostics: Vec<PolicyDiagnostic>,
}

impl Validator {
    pub(crate) fn new(key: PolicyKey) -> Self {
        Self {
            key,
            diagnostics: Vec::new(),
        }
    }

    pub(crate) fn error_count(&self) -> usize {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .count()
    }

    pub(crate) fn into_diagnostics(self) -> Vec<PolicyDiagnostic> {
        self.diagnostics
    }

    pub(crate) fn report(&mut self, field: impl Into<String>, problem: Problem) {
        let severity = match problem {
            Problem::CidrHostBits { .. } => Severity::Warning,
            _ => Severity::Error,
        };
        self.diagnostics.push(PolicyDiagnostic {
            policy: self.key.clone(),
            field: field.into(),
            severity,
            problem,
        });
    }

    fn rule(
        &mut self,
        index: usize,
        peers: Option<&[NetworkPolicyPeer]>,
        ports: Option<&[NetworkPolicyPort]>,
        path: &str,
        peers_field: &str,
    ) -> Rule {
        let ports: Vec<PortMatch> = ports
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(|(i, p)| self.port(p, &format!("{path}.ports[{i}]")))
            .collect();
        let peers: Vec<Peer> = peers
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(|(i, p)| self.peer(p, &format!("{path}.{peers_field}[{i}]")))
            .collect();
        Rule {
            index: u32::try_from(index).unwrap_or(u32::MAX),
            name: None,
            action: RuleAction::Allow,
            // An empty list means "everything", like an absent one.
            peers: (!peers.is_empty()).then_some(peers),
            ports: (!ports.is_empty()).then_some(ports),
        }
    }

    pub(crate) fn port(&mut self, port: &NetworkPolicyPort, path: &str) -> Option<PortMatch> {
        let protocol = match port.protocol.as_deref() {
            None => Some(Protocol::Tcp),
            Some(p) => {
                let parsed = Protocol::from_api(p);
                if parsed.is_none() {
                    self.report(
                        format!("{path}.protocol"),
                        Problem::UnsupportedProtocol {
                            value: p.to_owned(),
                        },
                    );
                }
                parsed
            }
        };
        match &port.port {
            None => {
                if let Some(end_port) = port.end_port {
                    self.report(
                        format!("{path}.endPort"),
                        Problem::EndPortWithoutPort { end_port },
                    );
                    return None;
                }
                Some(PortMatch::AllOf(protocol?))
            }
            Some(IntOrString::Int(first)) => {
                let first_ok = self.port_number(*first, &format!("{path}.port"));
                let last_ok = match port.end_port {
                    None => first_ok,
                    Some(end_port) => {
                        let mut ok = true;
                        if end_port < *first {
                            self.report(
                                format!("{path}.endPort"),
                                Problem::EndPortBelowPort {
                                    port: *first,
                                    end_port,
                                },
                            );
                            ok = false;
                        }
                        let last = self.port_number(end_port, &format!("{path}.endPort"));
                        last.filter(|_| ok)
                    }
                };
                Some(PortMatch::Range {
                    protocol: protocol?,
                    first: first_ok?,
                    last: last_ok?,
                })
            }
            Some(IntOrString::String(name)) => {
                if let Some(end_port) = port.end_port {
                    self.report(
                        format!("{path}.endPort"),
                        Problem::EndPortWithNamedPort {
                            port: name.clone(),
                            end_port,
                        },
                    );
                }
                if let Err(reason) = names::check_port_name(name) {
                    self.report(
                        format!("{path}.port"),
                        Problem::InvalidPortName {
                            value: name.clone(),
                            reason,
                        },
                    );
                    return None;
                }
                Some(PortMatch::Named {
                    protocol: protocol?,
                    name: name.clone(),
                })
            }
        }
    }

    pub(crate) fn port_number(&mut self, value: i32, path: &str) -> Option<u16> {
        names::check_port_number(value)
            .map_err(|reason| {
                self.report(path, Problem::InvalidPortNumber { value, reason });
            })
            .ok()
    }

    fn peer(&mut self, peer: &NetworkPolicyPeer, path: &str) -> Option<Peer> {
        let count = [
            peer.pod_selector.is_some(),
            peer.namespace_selector.is_some(),
            peer.ip_block.is_some(),
        ]
        .into_iter()
        .filter(|b| *b)
        .count();
        let pods = peer
            .pod_selector
            .as_ref()
            .map(|s| self.selector(Some(s), &format!("{path}.podSelector")));
        let namespaces = peer
            .namespace_selector
            .as_ref()
            .map(|s| self.selector(Some(s), &format!("{path}.namespaceSelector")));
        let block = peer
            .ip_block
            .as_ref()
            .map(|b| self.ip_block(b, &format!("{path}.ipBlock")));
        if count == 0 {
            self.report(path, Problem::EmptyPeer);
            return None;
        }
        if count > 1 && block.is_some() {
            self.report(path, Problem::IpBlockWithSelector);
            return None;
        }
        if let Some(block) = block {
            return block.map(Peer::IpBlock);
        }
        let pods = match pods {
            Some(s) => s?,
            None => Selector::everything(),
        };
        let namespaces = match namespaces {
            Some(s) => NamespaceScope::Matching(s?),
            None => NamespaceScope::Own(self.key.namespace.clone()),
        };
        Some(Peer::Pods(PodPeer { namespaces, pods }))
    }

    pub(crate) fn ip_block(&mut self, block: &IPBlock, path: &str) -> Option<IpBlockPeer> {
        if block.cidr.is_empty() {
            self.report(format!("{path}.cidr"), Problem::MissingCidr);
            return None;
        }
        let cidr = self.cidr(&block.cidr, &format!("{path}.cidr"));
        let Some(cidr) = cidr else {
            // As upstream: excepts are not checked against an unreadable cidr.
            return None;
        };
        let mut except = Vec::new();
        let mut ok = true;
        for (i, e) in block.except.iter().flatten().enumerate() {
            let epath = format!("{path}.except[{i}]");
            let Some(net) = self.cidr(e, &epath) else {
                ok = false;
                continue;
            };
            let inside = same_family(&cidr, &net)
                && cidr.contains(&net.network())
                && net.prefix_len() > cidr.prefix_len();
            if !inside {
                self.report(
                    epath,
                    Problem::ExceptNotInsideCidr {
                        except: e.clone(),
                        cidr,
                    },
                );
                ok = false;
                continue;
            }
            except.push(net);
        }
        except.sort_unstable();
        except.dedup();
        ok.then_some(IpBlockPeer { cidr, except })
    }

    pub(crate) fn cidr(&mut self, value: &str, path: &str) -> Option<IpNet> {
        match parse_cidr(value) {
            Ok(net) => {
                let canonical = net.trunc();
                if canonical != net {
                    self.report(
                        path,
                        Problem::CidrHostBits {
                            value: value.to_owned(),
                            normalized: canonical,
                        },
                    );
                }
                Some(canonical)
            }
            Err(reason) => {
                self.report(
                    path,
                    Problem::InvalidCidr {
                        value: value.to_owned(),
                        reason,
                    },
                );
                None
            }
        }
    }

    /// Validates and normalizes a label selector; `None` if it is unusable. An absent
    /// selector is the empty one.
    pub(crate) fn selector(
        &mut self,
        selector: Option<&LabelSelector>,
        path: &str,
    ) -> Option<Selector> {
        let Some(selector) = selector else {
            return Some(Selector::everything());
        };
        let before = self.diagnostics.len();
        let mut requirements = Vec::new();
        for (k, v) in selector.match_labels.iter().flatten() {
            if let Err(reason) = names::check_label_key(k) {
                self.report(
                    format!("{path}.matchLabels"),
                    Problem::InvalidLabelKey {
                        key: k.clone(),
                        reason,
                    },
                );
            }
            if let Err(reason) = names::check_label_value(v) {
                self.report(
                    format!("{path}.matchLabels[{k}]"),
                    Problem::InvalidLabelValue {
                        value: v.clone(),
                        reason,
                    },
                );
            }
            requirements.push(Requirement::new(k.clone(), Operator::In(vec![v.clone()])));
        }
        for (i, e) in selector.match_expressions.iter().flatten().enumerate() {
            let epath = format!("{path}.matchExpressions[{i}]");
            let values = e.values.clone().unwrap_or_default();
            let operator = match e.operator.as_str() {
                "In" | "NotIn" => {
                    if values.is_empty() {
                        let operator = if e.operator == "In" { "In" } else { "NotIn" };
                        self.report(
                            format!("{epath}.values"),
                            Problem::MissingValues { operator },
                        );
                    }
                    for (j, value) in values.iter().enumerate() {
                        if let Err(reason) = names::check_label_value(value) {
                            self.report(
                                format!("{epath}.values[{j}]"),
                                Problem::InvalidLabelValue {
                                    value: value.clone(),
                                    reason,
                                },
                            );
                        }
                    }
                    if e.operator == "In" {
                        Some(Operator::In(values))
                    } else {
                        Some(Operator::NotIn(values))
                    }
                }
                "Exists" | "DoesNotExist" => {
                    let exists = e.operator == "Exists";
                    if !values.is_empty() {
                        let operator = if exists { "Exists" } else { "DoesNotExist" };
                        self.report(
                            format!("{epath}.values"),
                            Problem::ValuesNotAllowed { operator },
                        );
                    }
                    Some(if exists {
                        Operator::Exists
                    } else {
                        Operator::DoesNotExist
                    })
                }
                other => {
                    self.report(
                        format!("{epath}.operator"),
                        Problem::UnsupportedOperator {
                            operator: other.to_owned(),
                        },
                    );
                    None
                }
            };
            if let Err(reason) = names::check_label_key(&e.key) {
                self.report(
                    format!("{epath}.key"),
                    Problem::InvalidLabelKey {
                        key: e.key.clone(),
                        reason,
                    },
                );
            }
            if let Some(operator) = operator {
                requirements.push(Requirement::new(e.key.clone(), operator));
            }
        }
        (self.diagnostics.len() == before).then(|| Selector::new(requirements))
    }

    fn policy_types(&mut self, types: Option<&[String]>) {
        let types = types.unwrap_or_default();
        if types.len() > 2 {
            self.report(
                "spec.policyTypes",
                Problem::TooManyPolicyTypes { count: types.len() },
            );
            return;
        }
        for (i, t) in types.iter().enumerate() {
            if t != "Ingress" && t != "Egress" {
                self.report(
                    format!("spec.policyTypes[{i}]"),
                    Problem::UnsupportedPolicyType { value: t.clone() },
                );
            }
        }
    }
}

fn same_family(a: &IpNet, b: &IpNet) -> bool {
    matches!(
        (a, b),
        (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
    )
}

/// Parses `addr/len` strictly: no leading zeros in IPv4 octets or in the length (they are
/// read as octal by some software and decimal by other), no IPv4-mapped IPv6 address, no
/// zone. Bits beyond the prefix length are kept (the caller reports and clears them).
pub fn parse_cidr(value: &str) -> std::result::Result<IpNet, &'static str> {
    const EXAMPLE: &str = "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)";
    let (addr, len) = value.split_once('/').ok_or(EXAMPLE)?;
    let addr = IpAddr::from_str(addr).map_err(|_| EXAMPLE)?;
    if len.is_empty()
        || !len.bytes().all(|b| b.is_ascii_digit())
        || (len.len() > 1 && len.starts_with('0'))
    {
        return Err(EXAMPLE);
    }
    let len: u8 = len.parse().map_err(|_| EXAMPLE)?;
    if let IpAddr::V6(v6) = addr
        && v6.to_ipv4_mapped().is_some()
    {
        return Err("must not have an IPv4-mapped IPv6 address");
    }
    IpNet::new(addr, len).map_err(|_| EXAMPLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_are_parsed_strictly() {
        assert_eq!(parse_cidr("10.0.0.0/8"), Ok("10.0.0.0/8".parse().unwrap()));
        assert_eq!(
            parse_cidr("2001:db8::/32"),
            Ok("2001:db8::/32".parse().unwrap())
        );
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "010.0.0.0/8",
            "10.0.0.0/08",
            "10.0.0.0/+8",
            "::ffff:10.0.0.0/104",
            "fe80::1%eth0/64",
            "x/8",
            "10.0.0.0/",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn policy_types_default_to_ingress_plus_egress_when_egress_rules_exist() {
        let mut spec = NetworkPolicySpec::default();
        assert_eq!(fail_closed_directions(&spec), (true, false));
        spec.egress = Some(vec![Default::default()]);
        assert_eq!(fail_closed_directions(&spec), (true, true));
        spec.policy_types = Some(vec!["Egress".into()]);
        assert_eq!(fail_closed_directions(&spec), (false, true));
        spec.policy_types = Some(vec![]);
        assert_eq!(fail_closed_directions(&spec), (true, true));
    }

    #[test]
    fn unreadable_policy_types_isolate_the_declared_and_the_default_directions() {
        let spec = NetworkPolicySpec {
            policy_types: Some(vec!["Egress".into(), "Sideways".into()]),
            ..Default::default()
        };
        assert_eq!(fail_closed_directions(&spec), (true, true));
        let spec = NetworkPolicySpec {
            policy_types: Some(vec!["Sideways".into()]),
            ..Default::default()
        };
        assert_eq!(fail_closed_directions(&spec), (true, false));
    }
}
