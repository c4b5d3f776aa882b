//! Synthetic clusters for measurements: object builders, and two large deterministic shapes
//! (`cargo run --example scale`, `cargo xtask bench`).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, Result};
use k8s_openapi::{
    api::{
        core::v1::{Container, ContainerPort, Namespace, Node, Pod, PodIP, PodSpec, PodStatus},
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde_json::{Value, json};

use crate::{Cluster, cnp::ClusterNetworkPolicy};

pub fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    )
}

pub fn namespace(name: &str, pairs: &[(&str, &str)]) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: labels(pairs),
            ..Default::default()
        },
        ..Default::default()
    }
}

pub fn node(name: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A running pod with the container ports the shapes' policies name.
pub fn pod(ns: &str, name: &str, pairs: &[(&str, &str)], node: &str, ip: Ipv4Addr) -> Pod {
    let port = |name: &str, port: i32, protocol: &str| ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some(protocol.to_owned()),
        ..Default::default()
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(ns.to_owned()),
            labels: labels(pairs),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.to_owned()),
            containers: vec![Container {
                name: "main".to_owned(),
                ports: Some(vec![
                    port("http", 8080, "TCP"),
                    port("metrics", 9090, "TCP"),
                    port("dns", 53, "UDP"),
                ]),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".to_owned()),
            pod_ips: Some(vec![PodIP { ip: ip.to_string() }]),
            pod_ip: Some(ip.to_string()),
            ..Default::default()
        }),
    }
}

/// `pod` made dual-stack: `ip` added to its `status.podIPs` after its IPv4 address.
pub fn with_ipv6(mut pod: Pod, ip: Ipv6Addr) -> Pod {
    if let Some(ips) = pod.status.as_mut().and_then(|s| s.pod_ips.as_mut()) {
        ips.push(PodIP { ip: ip.to_string() });
    }
    pod
}

pub fn policy(v: Value) -> Result<NetworkPolicy> {
    serde_json::from_value(v).context("a synthetic NetworkPolicy does not deserialise")
}

pub fn cluster_policy(v: Value) -> Result<ClusterNetworkPolicy> {
    serde_json::from_value(v).context("a synthetic ClusterNetworkPolicy does not deserialise")
}

/// The `n`-th address of a /8 (n < 2^24).
pub fn nth_ip(first_octet: u8, n: usize) -> Ipv4Addr {
    let n = n as u32;
    Ipv4Addr::new(first_octet, (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

/// A large synthetic cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// 5,000 nodes, 150,000 pods in 1,000 namespaces, 10,000 policies (10 per namespace: a
    /// default deny, an allow chain between apps, scraping from a monitoring namespace on a
    /// named port, egress to DNS, the namespace and the internet).
    A,
    /// Antrea's controller scale test: 25,000 namespaces, 100,000 pods, 75,000 policies (3
    /// per namespace: default deny both ways, allow within the namespace and from monitoring,
    /// egress to DNS and the internet), over 5,000 nodes.
    B,
    /// Shape B with 1,000 ClusterNetworkPolicies added, in both tiers ([`cluster_policies_b`]).
    BWithClusterPolicies,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::A, Shape::B, Shape::BWithClusterPolicies];

    /// ClusterNetworkPolicies of [`Shape::BWithClusterPolicies`].
    pub const CLUSTER_POLICIES: usize = 1_000;

    pub fn name(self) -> &'static str {
        match self {
            Shape::A => "a",
            Shape::B => "b",
            Shape::BWithClusterPolicies => "b-cnp",
        }
    }

    pub fn parse(s: &str) -> Option<Shape> {
        match s {
            "a" => Some(Shape::A),
            "b" => Some(Shape::B),
            "b-cnp" => Some(Shape::BWithClusterPolicies),
            _ => None,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Shape::A => "5k nodes, 150k pods, 10k policies",
            Shape::B => "Antrea shape: 25k namespaces, 100k pods, 75k policies",
            Shape::BWithClusterPolicies => {
                "shape b + 1k ClusterNetworkPolicies, Admin and Baseline tiers"
            }
        }
    }

    fn namespaces(self) -> usize {
        match self {
            Shape::A => 1_000,
            Shape::B | Shape::BWithClusterPolicies => 25_000,
        }
    }

    fn pods_per_namespace(self) -> usize {
        match self {
            Shape::A => 150,
            Shape::B | Shape::BWithClusterPolicies => 4,
        }
    }

    const NODES: usize = 5_000;

    /// The namespace whose pod and policy the incremental measurements change.
    pub const CHANGED_NAMESPACE: &'static str = "team-7";
    pub const CHANGED_POD: &'static str = "pod-1";

    /// The label a one-pod change sets (a value some policy selects on).
    pub fn relabel(self) -> (&'static str, &'static str) {
        match self {
            Shape::A => ("app", "app-2"),
            Shape::B | Shape::BWithClusterPolicies => ("tier", "front"),
        }
    }

    /// The namespace's policies; `edited` adds one port to one of them (the one-policy
    /// change).
    pub fn policies(self, ns: &str, edited: bool) -> Result<Vec<NetworkPolicy>> {
        match self {
            Shape::A => policies_a(ns, edited),
            Shape::B | Shape::BWithClusterPolicies => policies_b(ns, edited),
        }
    }

    /// Builds the cluster (deterministic).
    pub fn build(self) -> Result<Cluster> {
        let mut c = Cluster::new();
        for n in 0..Self::NODES {
            c.upsert_node(&node(&format!("node-{n}")))?;
        }
        let mut counter = 1usize;
        let mut next = |c: &mut Cluster, ns: &str, name: &str, pairs: &[(&str, &str)]| {
            let node = node_of(counter, Self::NODES);
            let r = c.upsert_pod(&pod(ns, name, pairs, &node, nth_ip(10, counter)));
            counter += 1;
            r
        };
        c.upsert_namespace(&namespace("kube-system", &[]))?;
        for i in 0..20 {
            next(
                &mut c,
                "kube-system",
                &format!("coredns-{i}"),
                &[("k8s-app", "kube-dns")],
            )?;
        }
        c.upsert_namespace(&namespace("monitoring", &[("team", "monitoring")]))?;
        for i in 0..10 {
            next(
                &mut c,
                "monitoring",
                &format!("prometheus-{i}"),
                &[("app", "prometheus")],
            )?;
        }
        for n in 0..self.namespaces() {
            let ns = format!("team-{n}");
            let env = if n % 3 == 0 { "prod" } else { "dev" };
            let owner = format!("group-{}", n % 50);
            c.upsert_namespace(&namespace(&ns, &[("env", env), ("owner", &owner)]))?;
            for p in 0..self.pods_per_namespace() {
                let app = format!("app-{}", p % 8);
                let tier = if p % 2 == 0 { "front" } else { "back" };
                next(
                    &mut c,
                    &ns,
                    &format!("pod-{p}"),
                    &[("app", &app), ("tier", tier)],
                )?;
            }
            for np in self.policies(&ns, false)? {
                c.upsert_policy(&np)?;
            }
        }
        if self == Shape::BWithClusterPolicies {
            for cnp in cluster_policies_b(Self::CLUSTER_POLICIES)? {
                c.upsert_cluster_policy(&cnp)?;
            }
        }
        Ok(c)
    }
}

/// The egress rule of both shapes that allows DNS to kube-system's resolvers.
fn dns_egress() -> Value {
    json!({
        "to": [{
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }],
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
    })
}

/// A deterministic spread of pods over nodes.
fn node_of(n: usize, nodes: usize) -> String {
    format!("node-{}", n.wrapping_mul(2_654_435_761) % nodes)
}

fn policies_a(ns: &str, edited: bool) -> Result<Vec<NetworkPolicy>> {
    let mut v = vec![policy(json!({
        "metadata": {"name": "default-deny", "namespace": ns},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }))?];
    for k in 1..8 {
        let mut ports = vec![
            json!({"port": 8080}),
            json!({"port": 8443, "endPort": 8450}),
        ];
        if edited && k == 3 {
            ports.push(json!({"port": 9443}));
        }
        v.push(policy(json!({
            "metadata": {"name": format!("app-{k}"), "namespace": ns},
            "spec": {
                "podSelector": {"matchLabels": {"app": format!("app-{k}")}},
                "ingress": [{
                    "from": [{"podSelector": {"matchLabels": {"app": format!("app-{}", k - 1)}}}],
                    "ports": ports,
                }],
            },
        }))?);
    }
    v.push(policy(json!({
        "metadata": {"name": "scrape", "namespace": ns},
        "spec": {
            "podSelector": {},
            "ingress": [{
                "from": [{"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}],
                "ports": [{"port": "metrics"}],
            }],
        },
    }))?);
    v.push(policy(json!({
        "metadata": {"name": "egress", "namespace": ns},
        "spec": {
            "podSelector": {"matchLabels": {"tier": "back"}},
            "policyTypes": ["Egress"],
            "egress": [
                dns_egress(),
                {"to": [{"podSelector": {}}]},
                {
                    "to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "192.168.0.0/16"]}}],
                    "ports": [{"port": 443}],
                },
            ],
        },
    }))?);
    Ok(v)
}

fn policies_b(ns: &str, edited: bool) -> Result<Vec<NetworkPolicy>> {
    let mut internet_ports = vec![json!({"port": 443}), json!({"port": 80})];
    if edited {
        internet_ports.push(json!({"port": 8443}));
    }
    Ok(vec![
        policy(json!({
            "metadata": {"name": "default-deny", "namespace": ns},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
        }))?,
        policy(json!({
            "metadata": {"name": "same-namespace", "namespace": ns},
            "spec": {
                "podSelector": {},
                "ingress": [
                    {"from": [{"podSelector": {}}]},
                    {
                        "from": [{"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}],
                        "ports": [{"port": "metrics"}],
                    },
                ],
                "egress": [{"to": [{"podSelector": {}}]}],
            },
        }))?,
        policy(json!({
            "metadata": {"name": "egress", "namespace": ns},
            "spec": {
                "podSelector": {"matchLabels": {"tier": "back"}},
                "policyTypes": ["Egress"],
                "egress": [
                    dns_egress(),
                    {
                        "to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}],
                        "ports": internet_ports,
                    },
                ],
            },
        }))?,
    ])
}

/// The ClusterNetworkPolicies of [`Shape::BWithClusterPolicies`]: guardrails a platform team
/// writes per owner group (the `owner` label of shape B's namespaces, 50 groups), in both
/// tiers, with priorities spread over 0..=1000 and every action and kind of peer: policy `i`
/// belongs to group `i mod 50` and is of kind `(i div 50) mod 8`, so every namespace is the
/// subject of about `n / 50` of them, of every kind.
///
/// Subjects are broad (a group's 500 namespaces), peers narrow: one partner namespace
/// (4 pods), the monitoring namespace, the DNS pods, or networks. A peer that selects a
/// large share of the cluster's pods (a whole owner group, every dev namespace) puts those
/// pods' addresses into the class table of every node with a pod it applies to, which at
/// this scale the compiler cannot afford (`docs/benchmarks.md`).
///
/// * Admin: prod namespaces accept HTTP from a partner namespace and deny SSH from its
///   front ends; scraping by the monitoring namespace is passed to the NetworkPolicies;
///   back-end pods may not reach a documentation range (`networks`, one /24 per policy);
///   dev namespaces may always resolve names; nobody reaches the cloud metadata address,
///   and a partner namespace's traffic is passed; another partner's front ends may not
///   reach the databases' ports.
/// * Baseline: monitoring denied by default, and prod egress to the cluster's HTTP ports or
///   nowhere.
///
/// Shape B's NetworkPolicies isolate every pod both ways, so the Baseline tier decides
/// nothing there; it is compiled all the same.
pub fn cluster_policies_b(n: usize) -> Result<Vec<ClusterNetworkPolicy>> {
    let namespaces = Shape::BWithClusterPolicies.namespaces();
    (0..n)
        .map(|i| {
            let owner = format!("group-{}", i % 50);
            let kind = (i / 50) % 8;
            let priority = (i * 37 + 11) % 1001;
            let own_namespaces = json!({"namespaces": {"matchLabels": {"owner": owner}}});
            let partner = |salt: usize| {
                let ns = format!("team-{}", (i * 7_919 + salt) % namespaces);
                json!({"matchLabels": {"kubernetes.io/metadata.name": ns}})
            };
            let monitoring = json!({"pods": {
                "namespaceSelector": {"matchLabels": {"team": "monitoring"}},
                "podSelector": {"matchLabels": {"app": "prometheus"}},
            }});
            let (tier, subject, ingress, egress) = match kind {
                0 => (
                    "Admin",
                    json!({"namespaces": {"matchLabels": {"env": "prod", "owner": owner}}}),
                    json!([
                        {
                            "name": "partner-http",
                            "action": "Accept",
                            "from": [{"namespaces": partner(0)}],
                            "protocols": [{"tcp": {"destinationPort": {"number": 8080}}}],
                        },
                        {
                            "name": "no-ssh",
                            "action": "Deny",
                            "from": [{"pods": {
                                "namespaceSelector": partner(1),
                                "podSelector": {"matchLabels": {"tier": "front"}},
                            }}],
                            "protocols": [{"tcp": {"destinationPort": {"number": 22}}}],
                        },
                    ]),
                    Value::Null,
                ),
                1 => (
                    "Admin",
                    own_namespaces.clone(),
                    json!([{
                        "name": "monitoring",
                        "action": "Pass",
                        "from": [monitoring],
                        "protocols": [{"destinationNamedPort": "metrics"}],
                    }]),
                    Value::Null,
                ),
                2 => (
                    "Admin",
                    json!({"pods": {
                        "namespaceSelector": {"matchLabels": {"owner": owner}},
                        "podSelector": {"matchLabels": {"tier": "back"}},
                    }}),
                    Value::Null,
                    json!([{
                        "name": "blocked-range",
                        "action": "Deny",
                        "to": [{"networks": [format!("198.{}.{}.0/24", 18 + (i >> 8) % 2, i % 256)]}],
                    }]),
                ),
                3 => (
                    "Admin",
                    json!({"namespaces": {"matchLabels": {"env": "dev", "owner": owner}}}),
                    Value::Null,
                    json!([{
                        "name": "dns",
                        "action": "Accept",
                        "to": [{"pods": {
                            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                        }}],
                        "protocols": [
                            {"udp": {"destinationPort": {"number": 53}}},
                            {"tcp": {"destinationPort": {"number": 53}}},
                        ],
                    }]),
                ),
                4 => (
                    "Admin",
                    own_namespaces.clone(),
                    json!([{"name": "partner", "action": "Pass", "from": [{"namespaces": partner(2)}]}]),
                    json!([{"name": "no-metadata", "action": "Deny", "to": [{"networks": ["169.254.169.254/32"]}]}]),
                ),
                5 => (
                    "Baseline",
                    own_namespaces.clone(),
                    json!([{"name": "no-monitoring", "action": "Deny", "from": [monitoring]}]),
                    Value::Null,
                ),
                6 => (
                    "Baseline",
                    json!({"namespaces": {"matchLabels": {"env": "prod", "owner": owner}}}),
                    Value::Null,
                    json!([
                        {
                            "name": "cluster-http",
                            "action": "Accept",
                            "to": [{"networks": ["10.0.0.0/8"]}],
                            "protocols": [{"tcp": {"destinationPort": {"range": {"start": 8000, "end": 8999}}}}],
                        },
                        {"name": "nothing-else", "action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}]},
                    ]),
                ),
                _ => (
                    "Admin",
                    own_namespaces.clone(),
                    json!([{
                        "name": "databases",
                        "action": "Deny",
                        "from": [{"pods": {
                            "namespaceSelector": partner(3),
                            "podSelector": {"matchLabels": {"tier": "front"}},
                        }}],
                        "protocols": [{"tcp": {"destinationPort": {"range": {"start": 5432, "end": 5439}}}}],
                    }]),
                    Value::Null,
                ),
            };
            let mut spec = json!({"tier": tier, "priority": priority, "subject": subject});
            if !ingress.is_null() {
                spec["ingress"] = ingress;
            }
            if !egress.is_null() {
                spec["egress"] = egress;
            }
            cluster_policy(json!({
                "apiVersion": crate::cnp::API_VERSION,
                "kind": "ClusterNetworkPolicy",
                "metadata": {"name": format!("guard-{i:04}")},
                "spec": spec,
            }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_policies_parse_and_the_edit_changes_one_policy() {
        for shape in Shape::ALL {
            let plain = shape.policies("team-7", false).unwrap();
            let edited = shape.policies("team-7", true).unwrap();
            assert_eq!(plain.len(), edited.len());
            let differing = plain.iter().zip(&edited).filter(|(a, b)| a != b).count();
            assert_eq!(differing, 1, "{shape:?}");
        }
    }

    #[test]
    fn shape_cluster_policies_are_valid_and_use_both_tiers_and_every_action() {
        let cnps = cluster_policies_b(Shape::CLUSTER_POLICIES).unwrap();
        assert_eq!(cnps.len(), Shape::CLUSTER_POLICIES);
        let mut c = Cluster::new();
        for cnp in &cnps {
            let problems = c.upsert_cluster_policy(cnp).unwrap();
            assert!(problems.is_empty(), "{:?}: {problems:?}", cnp.metadata.name);
        }
        let spec = |f: fn(&crate::cnp::ClusterNetworkPolicySpec) -> String| {
            cnps.iter()
                .map(|p| f(&p.spec))
                .collect::<std::collections::BTreeSet<_>>()
        };
        assert_eq!(spec(|s| s.tier.clone()).len(), 2);
        let actions = spec(|s| {
            let ingress = s.ingress.iter().flatten().map(|r| r.action.as_str());
            let egress = s.egress.iter().flatten().map(|r| r.action.as_str());
            ingress.chain(egress).collect::<Vec<_>>().join(",")
        });
        for action in ["Accept", "Deny", "Pass"] {
            assert!(actions.iter().any(|a| a.contains(action)), "{action}");
        }
        assert!(spec(|s| format!("{:?}", s.priority)).len() > 500);
    }
}
