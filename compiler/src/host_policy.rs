//! `HostPolicy` (`weir.dev/v1alpha1`, cluster-scoped): a firewall for the nodes themselves,
//! selected by node labels, in NetworkPolicy's rule shapes.
//!
//! ```yaml
//! apiVersion: weir.dev/v1alpha1
//! kind: HostPolicy
//! metadata: {name: workers}
//! spec:
//!   nodeSelector: {matchLabels: {node-role.kubernetes.io/worker: ""}}
//!   ingress:
//!   - from: [{ipBlock: {cidr: 10.0.0.0/8}}]
//!     ports: [{protocol: TCP, port: 9100}]
//!   - from: [{nodeSelector: {}}]
//!   - from: [{namespaceSelector: {matchLabels: {team: ops}}, podSelector: {}}]
//!   egress:
//!   - to: [{nodeSelector: {}}]
//!   untracked:
//!   - from: [{ipBlock: {cidr: 203.0.113.0/24}}]
//!     ports: [{protocol: UDP, port: 161}]
//! ```
//!
//! Like a NetworkPolicy that selects a pod, a HostPolicy whose `nodeSelector` matches a node
//! isolates the node's own addresses for ingress: traffic from the network to them is
//! allowed only if a rule of some HostPolicy selecting the node allows it, or it is a reply
//! of the node's own connections, or it reaches a failsafe port (the agent's; no policy can
//! close those). Rules are NetworkPolicy ingress rules; a peer is an `ipBlock`, pods
//! (`namespaceSelector` and/or `podSelector`; a `podSelector` alone means pods in every
//! namespace, since the object has none), or `nodeSelector` (the addresses of the Nodes whose
//! labels match). Named ports have no meaning on a node and are refused.
//!
//! `policyTypes` works as in a NetworkPolicy: absent, it is `Ingress`, plus `Egress` when
//! `egress` is present. A node isolated for egress sends only what an egress rule allows,
//! replies of connections to it, and connections to the agent's outbound failsafe ports.
//!
//! `untracked` rules deny, without conntrack, in XDP on the uplink: a packet to the node's
//! addresses from a source and to a port one of them matches is dropped before the kernel
//! allocates anything for it, replies of the node's own connections included (that is what
//! untracked means; failsafe ports excepted). Their peers are `ipBlock`s and `nodeSelector`s
//! (addresses the outer header carries). They are compiled into a second policy
//! ([`PolicyKind::UntrackedHostPolicy`]) of Deny rules, so the XDP program decides them with
//! the same peer classes and verdict lookups as the TC programs. They take no part in
//! `policyTypes`: a HostPolicy with `policyTypes: []` only drops what its untracked rules
//! name.
//!
//! The node is compiled as one more endpoint of its node state, under
//! [`weir_api::PodKey::host`], with the same rule sets, peer classes and verdicts as pods.
//! An object that cannot be read in full fails closed: it isolates the nodes its selector
//! selects (every node if the selector cannot be read) and allows nothing.

use k8s_openapi::{
    api::networking::v1::{IPBlock, NetworkPolicyPort},
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use serde::{Deserialize, Serialize};

use super::{
    Error, Result,
    policy::{
        HOST_POLICY_KIND, NamespaceScope, Peer, PodPeer, Policy, PolicyKey, PolicyKind, PortMatch,
        Rule, RuleAction, Tier,
    },
    selector::Selector,
    validate::{Problem, ValidatedPolicy, Validator},
};

pub const KIND: &str = HOST_POLICY_KIND;
pub const GROUP: &str = "weir.dev";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "weir.dev/v1alpha1";
pub const PLURAL: &str = "hostpolicies";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: HostPolicySpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostPolicySpec {
    /// The nodes the policy applies to; `{}` is every node. Required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// `Ingress` and/or `Egress`; absent: `Ingress`, plus `Egress` if `egress` is present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_types: Option<Vec<String>>,
    /// What may reach the selected nodes' addresses from the network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<HostIngressRule>>,
    /// Where the selected nodes may connect to through their uplink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<HostEgressRule>>,
    /// What is dropped in XDP, without conntrack, before any other rule looks at it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub untracked: Option<Vec<HostIngressRule>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostIngressRule {
    /// Absent or empty: every source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<HostPeer>>,
    /// Absent or empty: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<NetworkPolicyPort>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostEgressRule {
    /// Absent or empty: every destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<HostPeer>>,
    /// Absent or empty: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<NetworkPolicyPort>>,
}

/// A source or destination: `ipBlock`, pods, or nodes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IPBlock>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
}

/// A HostPolicy as the compiler uses it: the tracked policy, and the untracked one if the
/// object has `untracked` rules.
pub struct ValidatedHostPolicy {
    pub tracked: ValidatedPolicy,
    pub untracked: Option<ValidatedPolicy>,
}

/// Validates one HostPolicy into a [`Policy`] whose `pod_selector` selects *nodes* (by their
/// labels) and whose rules apply to their addresses, and, for its `untracked` rules, a
/// second one of Deny rules (see the module doc). Every diagnostic is the tracked one's.
/// Fails only without a name.
pub fn validate(hp: &HostPolicy) -> Result<ValidatedHostPolicy> {
    let name = hp
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or(Error::MissingName { kind: KIND })?;
    let key = PolicyKey::host(name.clone());
    let mut v = Validator::new(key.clone());
    let nodes = match &hp.spec.node_selector {
        Some(sel) => v.selector(Some(sel), "spec.nodeSelector"),
        None => {
            v.report("spec.nodeSelector", Problem::Required);
            None
        }
    };
    let (ingress_type, egress_type) = policy_types(&mut v, &hp.spec);
    let egress_rules: Listed = hp
        .spec
        .egress
        .iter()
        .flatten()
        .map(|r| (r.to.as_deref(), r.ports.as_deref()))
        .collect();
    let ingress = rules(
        &mut v,
        "ingress",
        &listed(hp.spec.ingress.as_deref()),
        "from",
        true,
    );
    let egress = rules(&mut v, "egress", &egress_rules, "to", true);
    let mut untracked = rules(
        &mut v,
        "untracked",
        &listed(hp.spec.untracked.as_deref()),
        "from",
        false,
    );
    for (i, rule) in untracked.iter_mut().enumerate() {
        rule.action = RuleAction::Deny;
        rule.name = Some(format!("untracked[{i}]"));
    }
    let valid = v.error_count() == 0;
    // An unreadable node selector cannot tell which nodes were meant: all of them.
    let selector = nodes.unwrap_or_else(Selector::everything);
    let untracked = (valid && !untracked.is_empty()).then(|| ValidatedPolicy {
        policy: Policy {
            // Deny rules first, then nothing: what they do not match passes.
            tier: Tier::Admin,
            priority: 0,
            namespaces: NamespaceScope::Own(String::new()),
            key: PolicyKey {
                kind: PolicyKind::UntrackedHostPolicy,
                ..PolicyKey::host(name)
            },
            pod_selector: selector.clone(),
            ingress: Some(untracked),
            egress: None,
            valid,
        },
        diagnostics: Vec::new(),
    });
    // Invalid: isolated both ways as written (ingress at least), allowing nothing.
    let policy = Policy {
        tier: Tier::NetworkPolicy,
        priority: 0,
        namespaces: NamespaceScope::Own(String::new()),
        key,
        pod_selector: selector,
        ingress: (ingress_type || !valid).then(|| if valid { ingress } else { Vec::new() }),
        egress: egress_type.then(|| if valid { egress } else { Vec::new() }),
        valid,
    };
    Ok(ValidatedHostPolicy {
        tracked: ValidatedPolicy {
            policy,
            diagnostics: v.into_diagnostics(),
        },
        untracked,
    })
}

/// The directions `spec` isolates: `policyTypes`, or NetworkPolicy's default for it.
fn policy_types(v: &mut Validator, spec: &HostPolicySpec) -> (bool, bool) {
    let Some(types) = &spec.policy_types else {
        return (true, spec.egress.is_some());
    };
    let (mut ingress, mut egress) = (false, false);
    for (i, t) in types.iter().enumerate() {
        match t.as_str() {
            "Ingress" => ingress = true,
            "Egress" => egress = true,
            other => v.report(
                format!("spec.policyTypes[{i}]"),
                Problem::Unsupported {
                    what: format!("policy type {other:?} (Ingress or Egress)"),
                },
            ),
        }
    }
    (ingress, egress)
}

/// Peers and ports of each rule in `rules`.
type Listed<'a> = Vec<(Option<&'a [HostPeer]>, Option<&'a [NetworkPolicyPort]>)>;

fn listed(rules: Option<&[HostIngressRule]>) -> Listed<'_> {
    rules
        .into_iter()
        .flatten()
        .map(|r| (r.from.as_deref(), r.ports.as_deref()))
        .collect()
}

/// The rules of `spec.<section>`, each given as its peer list and ports.
fn rules(
    v: &mut Validator,
    section: &str,
    list: &Listed,
    peers_field: &str,
    pods: bool,
) -> Vec<Rule> {
    list.iter()
        .enumerate()
        .map(|(i, &(peers, ports))| {
            let path = format!("spec.{section}[{i}]");
            rule(v, &path, i, peers, ports, peers_field, pods)
        })
        .collect()
}

/// One rule: its peers (the list under `peers_field`) and ports. Pods are peers only where
/// `pods` (not in untracked rules: XDP sees the outer header only).
fn rule(
    v: &mut Validator,
    path: &str,
    index: usize,
    peer_list: Option<&[HostPeer]>,
    port_list: Option<&[NetworkPolicyPort]>,
    peers_field: &str,
    pods: bool,
) -> Rule {
    let mut ports = Vec::new();
    for (i, p) in port_list.into_iter().flatten().enumerate() {
        let field = format!("{path}.ports[{i}]");
        match v.port(p, &field) {
            Some(PortMatch::Named { .. }) => v.report(
                format!("{field}.port"),
                Problem::Unsupported {
                    what: "named ports (a node has no container ports)".to_owned(),
                },
            ),
            Some(m) => ports.push(m),
            None => {}
        }
    }
    let mut peers = Vec::new();
    for (i, p) in peer_list.into_iter().flatten().enumerate() {
        let field = format!("{path}.{peers_field}[{i}]");
        if !pods && (p.pod_selector.is_some() || p.namespace_selector.is_some()) {
            v.report(
                field,
                Problem::Unsupported {
                    what: "pods as peers of untracked rules (XDP sees the outer header: a \
                           remote pod's packets may carry its node's address)"
                        .to_owned(),
                },
            );
            continue;
        }
        if let Some(peer) = peer(v, p, &field) {
            peers.push(peer);
        }
    }
    Rule {
        index: u32::try_from(index).unwrap_or(u32::MAX),
        name: None,
        action: RuleAction::Allow,
        peers: (!peers.is_empty()).then_some(peers),
        ports: (!ports.is_empty()).then_some(ports),
    }
}

fn peer(v: &mut Validator, p: &HostPeer, path: &str) -> Option<Peer> {
    let pods = p.pod_selector.is_some() || p.namespace_selector.is_some();
    let set = usize::from(p.ip_block.is_some())
        + usize::from(pods)
        + usize::from(p.node_selector.is_some());
    if set != 1 {
        v.report(
            path,
            if set == 0 {
                Problem::EmptyPeer
            } else {
                Problem::ExactlyOneField
            },
        );
        return None;
    }
    if let Some(block) = &p.ip_block {
        return v
            .ip_block(block, &format!("{path}.ipBlock"))
            .map(Peer::IpBlock);
    }
    if let Some(sel) = &p.node_selector {
        return v
            .selector(Some(sel), &format!("{path}.nodeSelector"))
            .map(Peer::Nodes);
    }
    let namespaces = match &p.namespace_selector {
        Some(s) => v.selector(Some(s), &format!("{path}.namespaceSelector"))?,
        None => Selector::everything(),
    };
    let pods = match &p.pod_selector {
        Some(s) => v.selector(Some(s), &format!("{path}.podSelector"))?,
        None => Selector::everything(),
    };
    Some(Peer::Pods(PodPeer {
        namespaces: NamespaceScope::Matching(namespaces),
        pods,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> HostPolicy {
        serde_norway::from_str(yaml).expect("HostPolicy YAML")
    }

    #[test]
    fn rules_read_like_network_policy_ingress_with_node_peers() {
        let v = validate(&parse(
            r#"
metadata: {name: workers}
spec:
  nodeSelector: {matchLabels: {role: worker}}
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.0/8}}, {nodeSelector: {}}, {podSelector: {matchLabels: {app: prom}}}]
    ports: [{protocol: TCP, port: 9100}]
  - {}
"#,
        ))
        .unwrap();
        assert!(v.untracked.is_none());
        let v = v.tracked;
        assert!(v.diagnostics.is_empty(), "{:?}", v.diagnostics);
        assert!(v.policy.valid);
        assert_eq!(v.policy.key.to_string(), "HostPolicy/workers");
        let rules = v.policy.ingress.as_ref().unwrap();
        assert_eq!(rules.len(), 2);
        let peers = rules[0].peers.as_ref().unwrap();
        assert!(matches!(peers[0], Peer::IpBlock(_)));
        assert!(matches!(peers[1], Peer::Nodes(_)));
        assert!(
            matches!(&peers[2], Peer::Pods(p) if p.namespaces == NamespaceScope::Matching(Selector::everything()))
        );
        assert_eq!(rules[1].peers, None, "an empty rule allows everything");
        assert!(v.policy.egress.is_none());
    }

    #[test]
    fn unreadable_objects_fail_closed_and_name_the_field() {
        for (yaml, field) in [
            ("spec: {ingress: [{}]}", "spec.nodeSelector"),
            (
                "spec: {nodeSelector: {}, ingress: [{ports: [{port: http}]}]}",
                "spec.ingress[0].ports[0].port",
            ),
            (
                "spec: {nodeSelector: {}, ingress: [{from: [{nodeSelector: {}, ipBlock: {cidr: 10.0.0.0/8}}]}]}",
                "spec.ingress[0].from[0]",
            ),
            (
                "spec: {nodeSelector: {}, ingress: [{from: [{ipBlock: {cidr: nonsense}}]}]}",
                "spec.ingress[0].from[0].ipBlock.cidr",
            ),
            (
                "spec: {nodeSelector: {}, egress: [{to: [{ipBlock: {cidr: nonsense}}]}]}",
                "spec.egress[0].to[0].ipBlock.cidr",
            ),
            (
                "spec: {nodeSelector: {}, policyTypes: [Sideways]}",
                "spec.policyTypes[0]",
            ),
            (
                "spec: {nodeSelector: {}, untracked: [{from: [{podSelector: {}}]}]}",
                "spec.untracked[0].from[0]",
            ),
        ] {
            let mut hp = parse(yaml);
            hp.metadata.name = Some("bad".to_owned());
            let v = validate(&hp).unwrap();
            assert!(v.untracked.is_none(), "{yaml}");
            let v = v.tracked;
            assert!(!v.policy.valid, "{yaml}");
            assert_eq!(v.policy.ingress, Some(Vec::new()), "allows nothing: {yaml}");
            assert!(
                v.diagnostics.iter().any(|d| d.field == field),
                "{yaml}: {:?}",
                v.diagnostics
            );
        }
        assert!(validate(&HostPolicy::default()).is_err(), "no name");
    }

    #[test]
    fn policy_types_default_as_in_network_policy() {
        for (yaml, ingress, egress) in [
            ("{nodeSelector: {}}", true, false),
            ("{nodeSelector: {}, egress: []}", true, true),
            (
                "{nodeSelector: {}, policyTypes: [Egress], egress: [{}]}",
                false,
                true,
            ),
            ("{nodeSelector: {}, policyTypes: []}", false, false),
        ] {
            let mut hp = parse(&format!("spec: {yaml}"));
            hp.metadata.name = Some("p".to_owned());
            let v = validate(&hp).unwrap().tracked;
            assert!(v.policy.valid, "{yaml}: {:?}", v.diagnostics);
            assert_eq!(v.policy.ingress.is_some(), ingress, "{yaml}");
            assert_eq!(v.policy.egress.is_some(), egress, "{yaml}");
        }
    }

    #[test]
    fn egress_rules_read_like_network_policy_egress() {
        let v = validate(&parse(
            r#"
metadata: {name: out}
spec:
  nodeSelector: {}
  egress:
  - to: [{ipBlock: {cidr: 192.0.2.0/24}}, {nodeSelector: {matchLabels: {role: cp}}}]
    ports: [{protocol: UDP, port: 123}]
"#,
        ))
        .unwrap()
        .tracked;
        assert!(v.diagnostics.is_empty(), "{:?}", v.diagnostics);
        let rules = v.policy.egress.as_ref().unwrap();
        let peers = rules[0].peers.as_ref().unwrap();
        assert!(matches!(peers[0], Peer::IpBlock(_)));
        assert!(matches!(peers[1], Peer::Nodes(_)));
        assert_eq!(rules[0].ports.as_ref().map(Vec::len), Some(1));
        assert_eq!(
            v.policy.ingress,
            Some(Vec::new()),
            "ingress isolated by default"
        );
    }

    #[test]
    fn untracked_rules_become_a_policy_of_deny_rules_for_the_same_nodes() {
        let v = validate(&parse(
            r#"
metadata: {name: edge}
spec:
  nodeSelector: {matchLabels: {role: edge}}
  policyTypes: []
  untracked:
  - from: [{ipBlock: {cidr: 203.0.113.0/24, except: [203.0.113.8/29]}}]
    ports: [{protocol: UDP, port: 161}]
  - from: [{nodeSelector: {matchLabels: {role: retired}}}]
"#,
        ))
        .unwrap();
        assert!(
            v.tracked.diagnostics.is_empty(),
            "{:?}",
            v.tracked.diagnostics
        );
        assert_eq!(v.tracked.policy.ingress, None);
        assert_eq!(v.tracked.policy.egress, None);
        let u = v.untracked.expect("untracked policy").policy;
        assert_eq!(u.key.kind, PolicyKind::UntrackedHostPolicy);
        assert_eq!(
            u.key.to_string(),
            "HostPolicy/edge",
            "named after its object"
        );
        assert_eq!(u.tier, Tier::Admin);
        assert_eq!(u.pod_selector, v.tracked.policy.pod_selector);
        let rules = u.ingress.as_ref().unwrap();
        assert_eq!(rules.len(), 2);
        assert!(rules.iter().all(|r| r.action == RuleAction::Deny));
        assert_eq!(rules[1].name.as_deref(), Some("untracked[1]"));
        assert!(matches!(rules[1].peers.as_deref(), Some([Peer::Nodes(_)])));
    }
}
