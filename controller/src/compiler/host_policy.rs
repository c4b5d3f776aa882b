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
    policy::{NamespaceScope, Peer, PodPeer, Policy, PolicyKey, PortMatch, Rule, RuleAction, Tier},
    selector::Selector,
    validate::{Problem, ValidatedPolicy, Validator},
};

pub const KIND: &str = "HostPolicy";
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
    /// What may reach the selected nodes' addresses from the network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<HostIngressRule>>,
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

/// A source: `ipBlock`, pods, or nodes.
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

/// Validates one HostPolicy into a [`Policy`] whose `pod_selector` selects *nodes* (by their
/// labels) and whose ingress rules apply to their addresses. Fails only without a name.
pub fn validate(hp: &HostPolicy) -> Result<ValidatedPolicy> {
    let name = hp
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or(Error::MissingName { kind: KIND })?;
    let key = PolicyKey::host(name);
    let mut v = Validator::new(key.clone());
    let nodes = match &hp.spec.node_selector {
        Some(sel) => v.selector(Some(sel), "spec.nodeSelector"),
        None => {
            v.report("spec.nodeSelector", Problem::Required);
            None
        }
    };
    let rules: Vec<Rule> = hp
        .spec
        .ingress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| rule(&mut v, i, r))
        .collect();
    let valid = v.error_count() == 0;
    let policy = Policy {
        tier: Tier::NetworkPolicy,
        priority: 0,
        namespaces: NamespaceScope::Own(String::new()),
        key,
        // An unreadable node selector cannot tell which nodes were meant: all of them.
        pod_selector: nodes.unwrap_or_else(Selector::everything),
        ingress: Some(if valid { rules } else { Vec::new() }),
        egress: None,
        valid,
    };
    Ok(ValidatedPolicy {
        policy,
        diagnostics: v.into_diagnostics(),
    })
}

fn rule(v: &mut Validator, index: usize, r: &HostIngressRule) -> Rule {
    let path = format!("spec.ingress[{index}]");
    let mut ports = Vec::new();
    for (i, p) in r.ports.iter().flatten().enumerate() {
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
    for (i, p) in r.from.iter().flatten().enumerate() {
        if let Some(peer) = peer(v, p, &format!("{path}.from[{i}]")) {
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
        ] {
            let mut hp = parse(yaml);
            hp.metadata.name = Some("bad".to_owned());
            let v = validate(&hp).unwrap();
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
}
