//! NetworkPolicies in the normalized form the compiler works on, produced by
//! [`validate`](super::validate). Defaults are applied (protocol TCP, inferred policyTypes),
//! empty lists that mean "everything" are `None`, and selectors are in canonical form, so
//! equal meanings compare equal.
//!
//! Reference: <https://kubernetes.io/docs/reference/kubernetes-api/policy-resources/network-policy-v1/>.

use std::{fmt, net::IpAddr};

use ipnet::IpNet;
use weir_api::{Direction, PolicyRef};

use super::selector::Selector;

/// The `kind` in [`PolicyRef`]s naming NetworkPolicies.
pub const NETWORK_POLICY_KIND: &str = "NetworkPolicy";
/// The `kind` in [`PolicyRef`]s naming ClusterNetworkPolicies
/// (`policy.networking.k8s.io/v1alpha2`).
pub const CLUSTER_NETWORK_POLICY_KIND: &str = "ClusterNetworkPolicy";
/// The `kind` in [`PolicyRef`]s naming weir's `HostPolicy`s (`weir.dev/v1alpha1`), and
/// their untracked rules.
pub const HOST_POLICY_KIND: &str = "HostPolicy";

/// The kinds of policy objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyKind {
    NetworkPolicy,
    ClusterNetworkPolicy,
    /// weir's `HostPolicy` (see [`super::host_policy`]).
    HostPolicy,
    /// The `untracked` rules of a `HostPolicy`, as a policy of their own (named like it).
    UntrackedHostPolicy,
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NetworkPolicy => NETWORK_POLICY_KIND,
            Self::ClusterNetworkPolicy => CLUSTER_NETWORK_POLICY_KIND,
            Self::HostPolicy | Self::UntrackedHostPolicy => HOST_POLICY_KIND,
        }
    }
}

/// A policy object: a NetworkPolicy by namespace and name, or a ClusterNetworkPolicy by
/// name (`namespace` empty).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub namespace: String,
    pub name: String,
    pub kind: PolicyKind,
}

impl PolicyKey {
    /// A NetworkPolicy.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            kind: PolicyKind::NetworkPolicy,
        }
    }

    /// A ClusterNetworkPolicy.
    pub fn cluster(name: impl Into<String>) -> Self {
        Self {
            namespace: String::new(),
            name: name.into(),
            kind: PolicyKind::ClusterNetworkPolicy,
        }
    }

    /// A HostPolicy.
    pub fn host(name: impl Into<String>) -> Self {
        Self {
            namespace: String::new(),
            name: name.into(),
            kind: PolicyKind::HostPolicy,
        }
    }

    /// The policy as node states name it. Each call allocates its names: the compiler
    /// makes one per policy and shares it.
    pub fn policy_ref(&self) -> PolicyRef {
        PolicyRef::new(
            self.kind.as_str(),
            self.namespace.as_str(),
            self.name.as_str(),
        )
    }
}

impl fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            PolicyKind::NetworkPolicy => {
                write!(f, "{NETWORK_POLICY_KIND}/{}/{}", self.namespace, self.name)
            }
            PolicyKind::ClusterNetworkPolicy
            | PolicyKind::HostPolicy
            | PolicyKind::UntrackedHostPolicy => {
                write!(f, "{}/{}", self.kind.as_str(), self.name)
            }
        }
    }
}

/// Where a policy sits in the evaluation order: the Admin tier of ClusterNetworkPolicies,
/// then NetworkPolicies, then the Baseline tier (declaration order is evaluation order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    Admin,
    NetworkPolicy,
    Baseline,
}

/// What a rule does with the traffic it matches. NetworkPolicy rules only allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuleAction {
    /// `Accept` (and every NetworkPolicy rule).
    Allow,
    Deny,
    /// Skip the rest of the tier.
    Pass,
}

/// The protocols a NetworkPolicy port can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The protocol as the API spells it (`TCP`, `UDP`, `SCTP`; case-sensitive).
    pub fn from_api(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    pub fn as_api(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }

    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Sctp => 132,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.number() == n)
    }
}

/// The namespaces a pod peer looks in.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NamespaceScope {
    /// The policy's own namespace (a peer with only a `podSelector`).
    Own(String),
    /// Namespaces whose labels match (`namespaceSelector`; `{}` is every namespace).
    Matching(Selector),
}

/// Pods selected by namespace and pod labels (`podSelector` and/or `namespaceSelector`;
/// both present means both must match).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodPeer {
    pub namespaces: NamespaceScope,
    pub pods: Selector,
}

/// Addresses in `cidr` and in none of `except` (canonical prefixes, `except` sorted).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpBlockPeer {
    pub cidr: IpNet,
    pub except: Vec<IpNet>,
}

impl IpBlockPeer {
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.cidr.contains(&addr) && !self.except.iter().any(|e| e.contains(&addr))
    }
}

/// One entry of a rule's `from` / `to`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    Pods(PodPeer),
    IpBlock(IpBlockPeer),
    /// The addresses of the Nodes whose labels match (ClusterNetworkPolicy `nodes`, egress).
    Nodes(Selector),
}

/// One entry of a rule's `ports`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortMatch {
    /// Every port of the protocol (`port` absent).
    AllOf(Protocol),
    /// `port` ..= `endPort` (`endPort` absent: `port` alone).
    Range {
        protocol: Protocol,
        first: u16,
        last: u16,
    },
    /// A named port, resolved against the destination pod's container ports of this
    /// protocol.
    Named { protocol: Protocol, name: String },
}

/// One ingress or egress rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Position in the policy's `ingress` / `egress` list.
    pub index: u32,
    /// The rule's `name` (ClusterNetworkPolicy), if any.
    pub name: Option<String>,
    /// Always [`RuleAction::Allow`] for NetworkPolicies.
    pub action: RuleAction,
    /// `None`: every peer (`from`/`to` absent or empty).
    pub peers: Option<Vec<Peer>>,
    /// `None`: every port of every protocol, ICMP included (`ports` absent or empty).
    pub ports: Option<Vec<PortMatch>>,
}

/// A NetworkPolicy or ClusterNetworkPolicy ready to compile.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Policy {
    pub key: PolicyKey,
    /// [`Tier::NetworkPolicy`] for NetworkPolicies.
    pub tier: Tier,
    /// Precedence within the tier, lower first (`spec.priority`; 0 for NetworkPolicies).
    pub priority: u32,
    /// The namespaces of the pods the policy applies to: a NetworkPolicy's own, a
    /// ClusterNetworkPolicy's `subject` namespace selector.
    pub namespaces: NamespaceScope,
    /// The pods (in those namespaces) the policy applies to.
    pub pod_selector: Selector,
    /// NetworkPolicy: `Some` when the policy isolates its pods for ingress (policyTypes),
    /// with the rules that allow traffic; an empty list allows nothing.
    /// ClusterNetworkPolicy: `Some` when it has ingress rules (it affects ingress only then).
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
    /// False when the object failed validation: it then only isolates (fail closed).
    pub valid: bool,
}

impl Policy {
    /// Evaluation order: tier, then priority, then name (the choice for equal priorities,
    /// see `docs/policy-semantics.md`).
    pub fn order(&self) -> (Tier, u32, &str, &str) {
        (
            self.tier,
            self.priority,
            &self.key.name,
            &self.key.namespace,
        )
    }

    pub fn rules(&self, direction: Direction) -> Option<&[Rule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
}
