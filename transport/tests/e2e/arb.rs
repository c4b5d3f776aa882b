//! Random node states for property tests. Key domains are small on purpose, so two random
//! states share keys (some with equal, some with different values) and their diffs contain
//! upserts, removals and untouched entries alike.
//!
//! Shared by the crate's unit tests and the end-to-end tests.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use proptest::{collection::btree_map, prelude::*};
use weir_api::{
    Action, BackendState, Direction, EndpointPolicy, FrontendKind, NodeRoute, NodeState, PodKey,
    PolicyRef, PolicyTier, PortPrefix, RuleRef, RuleSetInfo, ServiceBackend, ServiceEntry,
    ServiceFrontend, ServiceRef, TieredAction, TieredRule, VerdictEntry, VerdictMatch,
};

fn arb_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (0u32..64).prop_map(|low| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | low))),
        any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
    ]
}

/// Prefixes with host bits left as generated: the wire must carry them unchanged.
fn arb_net() -> impl Strategy<Value = IpNet> {
    arb_ip().prop_flat_map(|ip| {
        let max: u8 = if ip.is_ipv4() { 32 } else { 128 };
        (0..=max).prop_map(move |len| IpNet::new(ip, len).expect("length within bounds"))
    })
}

fn arb_pod() -> impl Strategy<Value = PodKey> {
    (
        prop::sample::select(vec!["default", "kube-system", "prod"]),
        0u8..12,
    )
        .prop_map(|(ns, i)| PodKey::new(ns, format!("pod-{i}")))
}

fn arb_policy() -> impl Strategy<Value = PolicyRef> {
    (
        prop::sample::select(vec!["NetworkPolicy", "ClusterNetworkPolicy"]),
        prop::sample::select(vec!["", "default", "prod"]),
        "[a-z]{1,6}",
    )
        .prop_map(|(kind, ns, name)| PolicyRef::new(kind, ns, name))
}

fn arb_direction() -> impl Strategy<Value = Direction> {
    prop_oneof![Just(Direction::Ingress), Just(Direction::Egress)]
}

fn arb_tiered() -> impl Strategy<Value = Option<TieredRule>> {
    prop::option::of(
        (
            prop_oneof![
                Just(PolicyTier::Admin),
                Just(PolicyTier::Baseline),
                Just(PolicyTier::Untracked)
            ],
            0u32..=1000,
            prop_oneof![Just(String::new()), "[a-z]{1,8}"],
            prop_oneof![
                Just(TieredAction::Accept),
                Just(TieredAction::Deny),
                Just(TieredAction::Pass)
            ],
        )
            .prop_map(|(tier, priority, name, action)| TieredRule {
                tier,
                priority,
                name,
                action,
            }),
    )
}

fn arb_port_prefix() -> impl Strategy<Value = PortPrefix> {
    (any::<u16>(), 0u8..=16).prop_map(|(port, len)| {
        let mask = u16::MAX.checked_shl(16 - u32::from(len)).unwrap_or(0);
        PortPrefix::new(port & mask, len).expect("masked port is aligned")
    })
}

pub fn arb_verdict_match() -> impl Strategy<Value = VerdictMatch> {
    (
        0u32..4,
        0u32..4,
        prop::option::of((any::<u8>(), prop::option::of(arb_port_prefix()))),
    )
        .prop_map(|(rule_set, class, proto_ports)| VerdictMatch {
            rule_set,
            class,
            proto: proto_ports.map(|(p, _)| p),
            ports: proto_ports.and_then(|(_, ports)| ports),
        })
}

/// Frontends from a small domain (a few ClusterIPs and ports) so states share keys; node
/// ports carry the unspecified address of either family, as the contract demands.
fn arb_service_frontend() -> impl Strategy<Value = ServiceFrontend> {
    let cluster_ip = (0u32..4).prop_map(|low| {
        (
            FrontendKind::ClusterIp,
            IpAddr::V4(Ipv4Addr::from(0x0a60_0000 | low)),
        )
    });
    let node_port = prop_oneof![
        Just(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        Just(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
    ]
    .prop_map(|ip| (FrontendKind::NodePort, ip));
    (
        prop_oneof![
            cluster_ip,
            node_port,
            arb_ip().prop_map(|ip| (FrontendKind::ClusterIp, ip))
        ],
        prop::sample::select(vec![53u16, 80, 443, 30080, u16::MAX]),
        prop::sample::select(vec![6u8, 17, 132]),
    )
        .prop_map(|((kind, ip), port, proto)| ServiceFrontend {
            kind,
            ip,
            port,
            proto,
        })
}

fn arb_service_entry() -> impl Strategy<Value = ServiceEntry> {
    let backend = (
        arb_ip(),
        any::<u16>(),
        prop::sample::select(vec!["", "node-0", "node-1"]),
        prop_oneof![Just(BackendState::Ready), Just(BackendState::Terminating)],
    )
        .prop_map(|(ip, port, node, state)| ServiceBackend {
            ip,
            port,
            node: node.into(),
            state,
        });
    (
        (
            prop::sample::select(vec!["default", "prod"]),
            "[a-z]{1,6}",
            prop::sample::select(vec!["", "http", "dns"]),
        ),
        1u32..8,
        prop::collection::vec(backend, 0..4),
        prop::option::of(any::<u32>()),
        any::<bool>(),
    )
        .prop_map(
            |((namespace, name, port_name), id, backends, affinity_timeout_s, masquerade)| {
                ServiceEntry {
                    service: ServiceRef {
                        namespace: namespace.into(),
                        name,
                        port_name: port_name.into(),
                    },
                    id,
                    backends,
                    affinity_timeout_s,
                    masquerade_external: masquerade,
                }
            },
        )
}

pub fn arb_node_state() -> impl Strategy<Value = NodeState> {
    let endpoints = btree_map(
        arb_pod(),
        (0u32..4, 0u32..4).prop_map(|(ingress, egress)| EndpointPolicy { ingress, egress }),
        0..8,
    );
    let peer_classes = btree_map(arb_net(), 0u32..4, 0..8);
    let verdicts = btree_map(
        arb_verdict_match(),
        (
            prop_oneof![Just(Action::Allow), Just(Action::Deny)],
            0u32..4,
        )
            .prop_map(|(action, rule)| VerdictEntry { action, rule }),
        0..8,
    );
    let rules = btree_map(
        0u32..8,
        (arb_policy(), arb_direction(), 0u32..3, arb_tiered()).prop_map(
            |(policy, direction, index, tiered)| RuleRef {
                policy,
                direction,
                index,
                tiered,
            },
        ),
        0..6,
    );
    let rule_sets = btree_map(
        0u32..6,
        (arb_direction(), prop::collection::vec(arb_policy(), 0..3)).prop_map(
            |(direction, policies)| RuleSetInfo {
                direction,
                policies,
            },
        ),
        0..4,
    );
    let routes = btree_map(
        arb_net(),
        (
            "node-[0-9]",
            arb_ip(),
            prop::collection::vec(arb_ip(), 0..2),
        )
            .prop_map(|(node, node_ip, other_ips)| NodeRoute {
                node,
                node_ip,
                other_ips,
            }),
        0..4,
    );
    let services = btree_map(arb_service_frontend(), arb_service_entry(), 0..4);
    let prefilter = btree_map(arb_net(), "[a-z]{0,6}", 0..4);
    (
        endpoints,
        peer_classes,
        verdicts,
        rules,
        rule_sets,
        routes,
        services,
        prefilter,
    )
        .prop_map(
            |(endpoints, peer_classes, verdicts, rules, rule_sets, routes, services, prefilter)| {
                NodeState {
                    endpoints,
                    peer_classes: peer_classes.into(),
                    verdicts,
                    rules,
                    rule_sets,
                    routes: routes.into(),
                    services,
                    prefilter: prefilter.into(),
                }
            },
        )
}
