//! The per-node dataplane state: what the controller computes for one node and the node's
//! agent writes into its eBPF maps. It holds only what the node's own endpoints need
//! (their rule sets, the peer classes those rule sets reference, verdicts, routes), so its
//! size follows the node, not the cluster — except the address → class table, which can
//! name any pod in the cluster that a local policy selects.
//!
//! Ids (rule sets, classes, rules) are small integers chosen by the controller and kept
//! stable across recompilations, so that a change in the cluster becomes a small diff.

use std::{collections::BTreeMap, fmt, net::IpAddr, sync::Arc};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

mod capacity;
mod diff;
mod lookup;
mod peer_classes;
mod service;

pub use capacity::{CapacityError, MAX_CAPACITY, MIN_CAPACITY, MapCapacities, table_names};
pub use diff::{NodeStateDiff, TableDiff};
pub use lookup::{canonical_ip, ipv4_root};
pub use peer_classes::PeerClasses;
pub use service::{
    BackendState, ClusterFrontends, FrontendKind, ServiceBackend, ServiceEntry, ServiceFrontend,
    ServiceRef,
};

/// Rule-set id meaning "no policy selects the endpoint in this direction".
pub const NOT_ISOLATED: u32 = 0;
/// Class of addresses that no peer of the node's policies matches.
pub const CLASS_UNMATCHED: u32 = 0;

/// A pod, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl PodKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The node itself as a policy endpoint (its `HostPolicy` rule sets), among a node
    /// state's pods: no pod has an empty namespace.
    pub fn host() -> Self {
        Self::new("", "host")
    }

    /// The node's untracked host-policy rules (a rule set of Deny rules the XDP program
    /// applies to packets for the node's addresses), as its ingress rule set.
    pub fn host_untracked() -> Self {
        Self::new("", "host-untracked")
    }

    /// Whether this is [`PodKey::host`] or [`PodKey::host_untracked`].
    pub fn is_host(&self) -> bool {
        self.namespace.is_empty()
    }
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The compiled rule sets that apply to a local pod (ids into the verdict table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EndpointPolicy {
    /// Rule set for traffic to the pod, [`NOT_ISOLATED`] if no policy selects it for ingress.
    pub ingress: u32,
    /// Rule set for traffic from the pod, likewise for egress.
    pub egress: u32,
}

/// Protocol numbers as in IP headers.
pub type IpProto = u8;

/// A port range aligned to a power of two: `port .. port + 2^(16 - len)`.
/// `len == 16` is a single port; `len == 0` is every port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortPrefix {
    pub port: u16,
    pub len: u8,
}

impl PortPrefix {
    /// Returns None if `len > 16` or `port` has bits set below the prefix.
    pub fn new(port: u16, len: u8) -> Option<Self> {
        if len > 16 {
            return None;
        }
        let host_bits = 16 - u32::from(len);
        let mask = if host_bits == 16 {
            0
        } else {
            u16::MAX << host_bits
        };
        (port & !mask == 0).then_some(Self { port, len })
    }

    pub fn first(&self) -> u16 {
        self.port
    }

    pub fn last(&self) -> u16 {
        let host_bits = 16 - u32::from(self.len);
        if host_bits == 16 {
            u16::MAX
        } else {
            self.port | !(u16::MAX << host_bits)
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first()..=self.last()).contains(&port)
    }
}

/// The match part of a verdict entry. Longest match wins in the dataplane: a key with a
/// protocol beats one without, a longer port prefix beats a shorter one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VerdictMatch {
    pub rule_set: u32,
    pub class: u32,
    /// None: every protocol (and then `ports` must be None).
    pub proto: Option<IpProto>,
    /// None: every port of `proto`.
    pub ports: Option<PortPrefix>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VerdictEntry {
    pub action: Action,
    /// Rule that produced the verdict (an id in [`NodeState::rules`]), 0 if none.
    pub rule: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    /// `ingress` or `egress`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }
}

/// A policy object, by kind, namespace (empty for cluster-scoped kinds) and name.
///
/// A `PolicyRef` is a shared handle: every rule and rule set of every node names its
/// policy, and a controller of 5,000 nodes holds millions of these (2 million rule-set
/// entries with 1k ClusterNetworkPolicies at the Antrea shape), so a copy is one reference
/// count and one pointer. The names are read through it: `policy.kind`, `policy.name`.
/// Equality, order and hashing are the names'; on the wire it is the three names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PolicyRef(Arc<PolicyName>);

/// The names a [`PolicyRef`] stands for.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PolicyName {
    pub kind: Arc<str>,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl PolicyRef {
    pub fn new(
        kind: impl Into<Arc<str>>,
        namespace: impl Into<Arc<str>>,
        name: impl Into<Arc<str>>,
    ) -> Self {
        Self(Arc::new(PolicyName {
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
        }))
    }
}

impl std::ops::Deref for PolicyRef {
    type Target = PolicyName;

    fn deref(&self) -> &PolicyName {
        &self.0
    }
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}/{}", self.kind, self.name)
        } else {
            write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// What a rule id stands for: rule `index` of a policy's ingress or egress list.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RuleRef {
    pub policy: PolicyRef,
    pub direction: Direction,
    pub index: u32,
    /// A ClusterNetworkPolicy rule's tier, priority and name; `None` for NetworkPolicy rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiered: Option<TieredRule>,
}

impl RuleRef {
    /// The rule's own part of its name: its `name`, or `#index` when it has none (and for
    /// NetworkPolicy rules, which have no names).
    pub fn rule_name(&self) -> String {
        match &self.tiered {
            Some(t) if !t.name.is_empty() => t.name.clone(),
            _ => format!("#{}", self.index),
        }
    }
}

/// `NetworkPolicy/<ns>/<name> <direction> #<index>` for NetworkPolicy rules;
/// `ClusterNetworkPolicy/<name>/<rule> <direction> (<tier> tier, priority <n>)` for
/// ClusterNetworkPolicy rules, `<rule>` being the rule's name ([`RuleRef::rule_name`]).
impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let direction = self.direction.as_str();
        match &self.tiered {
            None => write!(f, "{} {direction} #{}", self.policy, self.index),
            Some(t) if t.tier == PolicyTier::Untracked => {
                write!(f, "{}/{} (untracked)", self.policy, self.rule_name())
            }
            Some(t) => write!(
                f,
                "{}/{} {direction} ({} tier, priority {})",
                self.policy,
                self.rule_name(),
                t.tier.as_str(),
                t.priority
            ),
        }
    }
}

/// The tier of ClusterNetworkPolicies: Admin before NetworkPolicies, Baseline after them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyTier {
    Admin,
    Baseline,
    /// A `HostPolicy`'s untracked rules: Deny rules applied in XDP before anything else.
    Untracked,
}

impl PolicyTier {
    /// As `spec.tier` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "Admin",
            Self::Baseline => "Baseline",
            Self::Untracked => "Untracked",
        }
    }
}

/// Where a ClusterNetworkPolicy rule sits in the evaluation order, and its name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TieredRule {
    pub tier: PolicyTier,
    /// The policy's `spec.priority` (lower first).
    pub priority: u32,
    /// The rule's `name`; empty when it has none.
    pub name: String,
    pub action: TieredAction,
}

/// A ClusterNetworkPolicy rule's `action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TieredAction {
    Accept,
    Deny,
    /// Never decides: it hands the traffic on to NetworkPolicies (Admin tier) or to the
    /// default allow (Baseline tier).
    Pass,
}

impl TieredAction {
    /// As `action` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accept => "Accept",
            Self::Deny => "Deny",
            Self::Pass => "Pass",
        }
    }
}

/// What a rule-set id stands for: the policies whose union it is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RuleSetInfo {
    pub direction: Direction,
    pub policies: Vec<PolicyRef>,
}

/// Another node's pod CIDR and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeRoute {
    pub node: String,
    /// The address other nodes reach it at (VXLAN's outer address, the next hop of a direct
    /// route).
    pub node_ip: IpAddr,
    /// Its other addresses (the InternalIPs of the other family on a dual-stack node).
    /// Traffic to them is the cluster's own and is never masqueraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_ips: Vec<IpAddr>,
}

impl NodeRoute {
    /// A node reached at `node_ip` that has no other address.
    pub fn new(node: impl Into<String>, node_ip: IpAddr) -> Self {
        Self {
            node: node.into(),
            node_ip,
            other_ips: Vec::new(),
        }
    }

    /// Every address of the node, `node_ip` first.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(self.node_ip).chain(self.other_ips.iter().copied())
    }
}

/// Everything one node's dataplane needs. Maps serialise as lists of `[key, value]` pairs
/// (their keys are not strings).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// Pods scheduled to this node (host-network pods excluded) and their rule sets.
    #[serde(with = "pairs")]
    pub endpoints: BTreeMap<PodKey, EndpointPolicy>,
    /// Address prefix → peer class. Addresses matching no prefix are [`CLASS_UNMATCHED`].
    pub peer_classes: PeerClasses,
    #[serde(with = "pairs")]
    pub verdicts: BTreeMap<VerdictMatch, VerdictEntry>,
    #[serde(with = "pairs")]
    pub rules: BTreeMap<u32, RuleRef>,
    #[serde(with = "pairs")]
    pub rule_sets: BTreeMap<u32, RuleSetInfo>,
    /// Pod CIDRs of every node (an agent finds its own among them). The same table for every node: the
    /// controller shares one copy between all node states, so 5,000 nodes hold one table,
    /// not 5,000.
    #[serde(with = "shared_pairs")]
    pub routes: Arc<BTreeMap<IpNet, NodeRoute>>,
    /// Service frontends this node translates, each with the backends it picks from.
    #[serde(default, with = "pairs")]
    pub services: BTreeMap<ServiceFrontend, ServiceEntry>,
    /// Source prefixes every node drops on its uplink before anything else looks at the
    /// packet (the XDP prefilter), each with the object that lists it (a `DropCIDRSet`'s
    /// name). The same table for every node, shared like `routes`.
    #[serde(default, with = "shared_pairs")]
    pub prefilter: Arc<BTreeMap<IpNet, String>>,
}

/// [`pairs`] for a shared map.
mod shared_pairs {
    use std::{collections::BTreeMap, sync::Arc};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        map: &Arc<BTreeMap<K, V>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        super::pairs::serialize(map, s)
    }

    pub fn deserialize<'de, K, V, D>(d: D) -> Result<Arc<BTreeMap<K, V>>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        super::pairs::deserialize(d).map(Arc::new)
    }
}

/// Serde for maps whose keys are not strings: a list of `[key, value]` pairs.
mod pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        map: &BTreeMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter())
    }

    pub fn deserialize<'de, K, V, D>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}
