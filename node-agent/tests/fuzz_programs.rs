//! The TC programs against random and mutated frames through the real kernel
//! (`BPF_PROG_TEST_RUN`): truncated headers, IP options, fragments, odd ethertypes, VXLAN
//! inside VXLAN, forged addresses. Whatever arrives, a node whose pods admit nothing
//! delivers nothing to them, lets no pod packet leave, and counts every drop.
//!
//! Failing inputs are kept by proptest under `tests/fuzz_programs.proptest-regressions` and
//! replayed first on every run; `PROPTEST_CASES` raises the number of frames per program.

mod support;

use support::{
    GW_A, GW_B, IP_A, IP_B, MAC_A, MAC_B, NODE_IP, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
    UPLINK_MAC,
};

use std::net::Ipv4Addr;

use ipnet::IpNet;
use proptest::{
    prelude::*,
    test_runner::{Config, TestCaseError, TestRunner},
};
use support::packet;
use weir_agent::{dataplane::Dataplane, maps::DataplaneMaps};
use weir_api::{
    BackendState, FrontendKind, ServiceBackend, ServiceEntry, ServiceFrontend, ServiceRef,
    TableDiff,
};
use weir_common::{
    config::NodeConfig,
    endpoint::EndpointInfo,
    ip::IpKey,
    programs::{FROM_NETWORK, FROM_POD, FROM_TUNNEL, TO_POD},
    route::RouteEntry,
    {TUNNEL_MAC, TUNNEL_SOURCE_MAC},
};

const ETH_HLEN: usize = 14;

const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const REMOTE_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 3);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE_PORT: u16 = 30080;
/// A rule set with no verdicts: isolated, nothing admitted.
const DENY_ALL: u32 = 9;

/// One node, two pods that admit nothing in; A may send nothing either. Another node's pod
/// CIDR is routed through the tunnel; B backs a ClusterIP and a NodePort on every protocol.
struct Node {
    dp: Dataplane,
    maps: DataplaneMaps,
    veth_a: u32,
    veth_b: u32,
    uplink: u32,
    tunnel: u32,
}

impl Node {
    fn new() -> Self {
        support::private_netns();
        let veth_a = support::dummy_interface("veth-a");
        let veth_b = support::dummy_interface("veth-b");
        let uplink = support::dummy_interface("uplink");
        let tunnel = support::dummy_interface("tunnel");
        let mut dp = Dataplane::load(None).expect("loading the programs");
        let mut maps = DataplaneMaps::take(&mut dp).expect("maps");
        maps.set_config(NodeConfig::new(1, 0, 0)).unwrap();
        let eps = [
            (
                IpKey::from(IP_A),
                EndpointInfo::new(veth_a, MAC_A, GW_A).with_policies(DENY_ALL, DENY_ALL),
            ),
            (
                IpKey::from(IP_B),
                EndpointInfo::new(veth_b, MAC_B, GW_B).with_policies(DENY_ALL, 0),
            ),
        ];
        maps.sync_endpoints(&eps.into_iter().collect()).unwrap();
        maps.sync_host_addrs(&[NODE_IP.into()]).unwrap();
        let routes = [(
            "10.244.1.0/24".parse::<IpNet>().unwrap(),
            RouteEntry::new(REMOTE_NODE.into(), RouteEntry::MODE_VXLAN, tunnel),
        )];
        maps.sync_routes(&routes.into_iter().collect()).unwrap();
        let mut services = std::collections::BTreeMap::new();
        for proto in [packet::TCP, packet::UDP, packet::SCTP] {
            for (kind, ip, port) in [
                (FrontendKind::ClusterIp, CLUSTER_IP, 80),
                (FrontendKind::NodePort, Ipv4Addr::UNSPECIFIED, NODE_PORT),
            ] {
                let frontend = ServiceFrontend {
                    kind,
                    ip: ip.into(),
                    port,
                    proto,
                };
                let entry = ServiceEntry {
                    service: ServiceRef {
                        namespace: "default".into(),
                        name: "web".into(),
                        port_name: String::new(),
                    },
                    id: 7,
                    backends: vec![ServiceBackend {
                        ip: IP_B.into(),
                        port: 8080,
                        node: String::new(),
                        state: BackendState::Ready,
                    }],
                    affinity_timeout_s: None,
                    masquerade_external: false,
                };
                services.insert(frontend, entry);
            }
        }
        let diff = TableDiff::between(&Default::default(), &services);
        maps.apply_service_diff(&diff, &Default::default()).unwrap();
        Node {
            dp,
            maps,
            veth_a,
            veth_b,
            uplink,
            tunnel,
        }
    }

    fn run(&mut self, program: &'static str, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        support::test_run(&mut self.dp, program, ifindex, frame)
    }

    fn dropped(&self) -> u64 {
        self.maps.drop_counts().iter().map(|(_, n)| n).sum()
    }

    /// Runs `program` and checks that a drop is always counted.
    fn judge(
        &mut self,
        program: &'static str,
        ifindex: u32,
        frame: &[u8],
    ) -> Result<(u32, Vec<u8>), TestCaseError> {
        let before = self.dropped();
        let (verdict, out) = self.run(program, ifindex, frame);
        let counted = self.dropped() - before;
        prop_assert!(
            verdict == TC_ACT_OK || verdict == TC_ACT_SHOT || verdict == TC_ACT_REDIRECT,
            "{program}: unexpected verdict {verdict}"
        );
        if verdict == TC_ACT_SHOT {
            prop_assert_eq!(counted, 1, "{}: a drop that no counter shows", program);
        } else {
            prop_assert_eq!(counted, 0, "{}: a counted drop that passed", program);
        }
        Ok((verdict, out))
    }

    /// A frame that passed towards the host stack and is addressed to a local pod would be
    /// routed to the pod's veth, where `to_pod` trusts what the host sends: it must not get
    /// there with anything the pod does not admit.
    fn host_stack_delivers(&mut self, out: &[u8]) -> Option<&'static str> {
        let dst = ipv4_dst(out)?;
        let (ifindex, name) = if dst == IP_A {
            (self.veth_a, "A")
        } else if dst == IP_B {
            (self.veth_b, "B")
        } else {
            return None;
        };
        (self.run(TO_POD, ifindex, out).0 != TC_ACT_SHOT).then_some(name)
    }
}

fn ethertype(frame: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?))
}

/// Destination of a well-formed-enough IPv4 header.
fn ipv4_dst(frame: &[u8]) -> Option<Ipv4Addr> {
    if ethertype(frame)? != 0x0800 || frame.get(14)? >> 4 != 4 {
        return None;
    }
    let d: [u8; 4] = frame.get(30..34)?.try_into().ok()?;
    Some(Ipv4Addr::from(d))
}

fn mac() -> impl Strategy<Value = [u8; 6]> + Clone {
    prop_oneof![
        Just(MAC_A),
        Just(MAC_B),
        Just(GW_A),
        Just(GW_B),
        Just(ROUTER_MAC),
        Just(UPLINK_MAC),
        Just(TUNNEL_MAC),
        Just(TUNNEL_SOURCE_MAC),
        Just([0xff; 6]),
        any::<[u8; 6]>(),
    ]
}

fn addr() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![
        Just(IP_A),
        Just(IP_B),
        Just(NODE_IP),
        Just(REMOTE_POD),
        Just(REMOTE_NODE),
        Just(CLUSTER_IP),
        Just(Ipv4Addr::new(10, 244, 0, 1)),
        Just(Ipv4Addr::BROADCAST),
        Just(Ipv4Addr::UNSPECIFIED),
        any::<u32>().prop_map(Ipv4Addr::from),
    ]
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![
        Just(53u16),
        Just(80),
        Just(8080),
        Just(NODE_PORT),
        Just(4789),
        any::<u16>()
    ]
}

fn proto() -> impl Strategy<Value = u8> {
    prop_oneof![
        Just(packet::TCP),
        Just(packet::UDP),
        Just(packet::SCTP),
        Just(packet::ICMP),
        Just(4u8),  // IP in IP
        Just(41u8), // IPv6 in IPv4
        Just(47u8), // GRE
        Just(58u8), // ICMPv6 in IPv4, nonsense
        any::<u8>(),
    ]
}

/// An IPv4 header (with `options` words of options, any flags and fragment offset) and an
/// L4 header whose ports are either well-known or random, then `payload`.
#[derive(Debug, Clone)]
struct Ipv4Spec {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    options: Vec<u8>,
    frag: u16,
    ttl: u8,
    sport: u16,
    dport: u16,
    l4_flags: u8,
    payload: Vec<u8>,
    /// Claimed total length: right, or anything.
    total_len: Option<u16>,
}

fn ipv4_spec() -> impl Strategy<Value = Ipv4Spec> {
    (
        (addr(), addr(), proto()),
        prop_oneof![
            3 => Just(vec![]),
            1 => (1usize..=10).prop_flat_map(|w| proptest::collection::vec(any::<u8>(), w * 4)),
        ],
        prop_oneof![
            3 => Just(0u16),
            1 => Just(0x2000u16),         // more fragments, first fragment
            1 => 1u16..0x1fff,            // a later fragment
            1 => any::<u16>(),
        ],
        any::<u8>(),
        (port(), port(), any::<u8>()),
        proptest::collection::vec(any::<u8>(), 0..48),
        proptest::option::weighted(0.2, any::<u16>()),
    )
        .prop_map(
            |(
                (src, dst, proto),
                options,
                frag,
                ttl,
                (sport, dport, l4_flags),
                payload,
                total_len,
            )| {
                Ipv4Spec {
                    src,
                    dst,
                    proto,
                    options,
                    frag,
                    ttl,
                    sport,
                    dport,
                    l4_flags,
                    payload,
                    total_len,
                }
            },
        )
}

impl Ipv4Spec {
    /// The IP packet (no Ethernet header).
    fn bytes(&self) -> Vec<u8> {
        let mut l4 = vec![0u8; 20];
        l4[0..2].copy_from_slice(&self.sport.to_be_bytes());
        l4[2..4].copy_from_slice(&self.dport.to_be_bytes());
        match self.proto {
            packet::TCP => {
                l4[12] = 5 << 4;
                l4[13] = self.l4_flags;
            }
            packet::UDP => {
                let len = (8 + 12 + self.payload.len()) as u16;
                l4[4..6].copy_from_slice(&len.to_be_bytes());
            }
            packet::ICMP => {
                l4[0] = self.l4_flags % 20;
                l4[1] = self.l4_flags / 20;
            }
            _ => {}
        }
        l4.extend_from_slice(&self.payload);
        let ihl = 5 + self.options.len() / 4;
        let total = self
            .total_len
            .unwrap_or((ihl * 4 + l4.len()).min(usize::from(u16::MAX)) as u16);
        let mut ip = vec![0u8; 20];
        ip[0] = 0x40 | ihl as u8;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[6..8].copy_from_slice(&self.frag.to_be_bytes());
        ip[8] = self.ttl;
        ip[9] = self.proto;
        ip[12..16].copy_from_slice(&self.src.octets());
        ip[16..20].copy_from_slice(&self.dst.octets());
        ip.extend_from_slice(&self.options);
        ip.extend_from_slice(&l4);
        ip
    }
}

/// A VXLAN packet in UDP/IPv4 carrying `inner` (an Ethernet frame).
fn vxlan(outer: &Ipv4Spec, vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut udp = vec![0u8; 8];
    udp[0..2].copy_from_slice(&outer.sport.to_be_bytes());
    udp[2..4].copy_from_slice(&4789u16.to_be_bytes());
    udp[4..6].copy_from_slice(&((16 + inner.len()) as u16).to_be_bytes());
    let mut vx = vec![0x08, 0, 0, 0];
    vx.extend_from_slice(&(vni << 8).to_be_bytes());
    udp.extend_from_slice(&vx);
    udp.extend_from_slice(inner);
    let spec = Ipv4Spec {
        proto: packet::UDP,
        options: vec![],
        frag: 0,
        total_len: None,
        ..outer.clone()
    };
    let mut ip = spec.bytes();
    ip.truncate(20);
    let total = (20 + udp.len()) as u16;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&udp);
    ip
}

fn frame() -> impl Strategy<Value = Vec<u8>> {
    let l2 = || (mac(), mac());
    let ip_frame = (l2(), ipv4_spec()).prop_map(|((s, d), ip)| {
        let mut f = packet::eth(s, d, 0x0800);
        f.extend_from_slice(&ip.bytes());
        f
    });
    let vxlan_frame = (
        l2(),
        ipv4_spec(),
        ipv4_spec(),
        ipv4_spec(),
        any::<u32>(),
        any::<bool>(),
    )
        .prop_map(|((s, d), outer, middle, inner, vni, twice)| {
            let mut inner_frame = packet::eth(TUNNEL_SOURCE_MAC, TUNNEL_MAC, 0x0800);
            inner_frame.extend_from_slice(&inner.bytes());
            if twice {
                let mut wrapped = packet::eth(TUNNEL_SOURCE_MAC, TUNNEL_MAC, 0x0800);
                wrapped.extend_from_slice(&vxlan(&middle, vni, &inner_frame));
                inner_frame = wrapped;
            }
            let mut f = packet::eth(s, d, 0x0800);
            f.extend_from_slice(&vxlan(&outer, vni & 0xff_ffff, &inner_frame));
            f
        });
    let other_l3 = (
        l2(),
        prop_oneof![
            Just(0x0806u16),
            Just(0x86dd),
            Just(0x8100),
            Just(0x88a8),
            any::<u16>()
        ],
        proptest::collection::vec(any::<u8>(), 0..80),
    )
        .prop_map(|((s, d), ty, body)| {
            let mut f = packet::eth(s, d, ty);
            f.extend_from_slice(&body);
            f
        });
    let raw = proptest::collection::vec(any::<u8>(), ETH_HLEN..128);
    let structured = prop_oneof![
        6 => ip_frame,
        2 => vxlan_frame,
        1 => other_l3,
        1 => raw,
    ];
    // Then cut it anywhere, sometimes, or flip a byte: truncated and corrupted headers.
    (
        structured,
        proptest::option::weighted(0.2, any::<prop::sample::Index>()),
        proptest::option::weighted(0.2, (any::<prop::sample::Index>(), any::<u8>())),
    )
        .prop_map(|(mut f, cut, flip)| {
            if let Some((at, byte)) = flip
                && !f.is_empty()
            {
                let i = at.index(f.len());
                f[i] ^= byte;
            }
            if let Some(at) = cut
                && !f.is_empty()
            {
                f.truncate(at.index(f.len() + 1));
            }
            // A test run refuses frames shorter than an Ethernet header, and IP frames shorter
            // than their fixed IP header: pad those (truncated L4 headers stay truncated).
            if f.len() < ETH_HLEN {
                f.resize(ETH_HLEN, 0);
            }
            let least = match ethertype(&f) {
                Some(0x0800) => ETH_HLEN + 20,
                Some(0x86dd) => ETH_HLEN + 40,
                _ => ETH_HLEN,
            };
            if f.len() < least {
                f.resize(least, 0);
            }
            f
        })
}

fn runner() -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(1500);
    TestRunner::new(Config {
        cases,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        source_file: Some(file!()),
        ..Config::default()
    })
}

/// A pod that may send nothing gets nothing out: only ARP (answered by the node) passes.
#[test]
fn nothing_leaves_a_pod_that_may_send_nothing() {
    let mut node = Node::new();
    let veth_a = node.veth_a;
    // A well-formed packet of A's is dropped: the property is not vacuous.
    let syn = packet::tcp(MAC_A, GW_A, IP_A, IP_B, 40000, 80, packet::TCP_SYN);
    assert_eq!(node.run(FROM_POD, veth_a, &syn).0, TC_ACT_SHOT);
    let arp = packet::arp_request(MAC_A, IP_A, Ipv4Addr::new(10, 244, 0, 1));
    assert_ne!(node.run(FROM_POD, veth_a, &arp).0, TC_ACT_SHOT);
    let node = std::cell::RefCell::new(node);
    runner()
        .run(&frame(), |f| {
            let mut node = node.borrow_mut();
            let (verdict, out) = node.judge(FROM_POD, veth_a, &f)?;
            if verdict != TC_ACT_SHOT {
                prop_assert_eq!(ethertype(&f), Some(0x0806), "a non-ARP frame of A's passed");
                if verdict == TC_ACT_REDIRECT {
                    prop_assert_eq!(packet::dst_mac(&out), MAC_A, "an ARP answer goes back to A");
                }
            }
            Ok(())
        })
        .unwrap();
}

/// Nothing from the network reaches pods that admit nothing, directly or through the host
/// stack, and every frame that is not passed to the host is counted.
#[test]
fn nothing_from_the_network_reaches_pods_that_admit_nothing() {
    let mut node = Node::new();
    let uplink = node.uplink;
    // A packet for B from the other node's pod is dropped by B's policy: not vacuous.
    let syn = packet::tcp(
        ROUTER_MAC,
        UPLINK_MAC,
        REMOTE_POD,
        IP_B,
        40000,
        80,
        packet::TCP_SYN,
    );
    assert_eq!(node.run(FROM_NETWORK, uplink, &syn).0, TC_ACT_SHOT);
    // So is one through B's NodePort.
    let client = Ipv4Addr::new(192, 168, 50, 9);
    let syn = packet::tcp(
        ROUTER_MAC,
        UPLINK_MAC,
        client,
        NODE_IP,
        40000,
        NODE_PORT,
        packet::TCP_SYN,
    );
    assert_eq!(node.run(FROM_NETWORK, uplink, &syn).0, TC_ACT_SHOT);
    let node = std::cell::RefCell::new(node);
    runner()
        .run(&frame(), |f| {
            let mut node = node.borrow_mut();
            let (verdict, out) = node.judge(FROM_NETWORK, uplink, &f)?;
            match verdict {
                TC_ACT_REDIRECT => {
                    let to = packet::dst_mac(&out);
                    prop_assert!(
                        to != MAC_A && to != MAC_B,
                        "delivered to a pod: {:02x?}",
                        out
                    );
                }
                TC_ACT_OK => {
                    let delivered = node.host_stack_delivers(&out);
                    prop_assert!(delivered.is_none(), "through the host to {:?}", delivered);
                }
                _ => {}
            }
            Ok(())
        })
        .unwrap();
}

/// The tunnel device hands over decapsulated frames; without proof of a known sender (a
/// test run carries no tunnel metadata) none of them is delivered or passed.
#[test]
fn nothing_from_an_unknown_tunnel_sender_is_delivered() {
    let node = Node::new();
    let tunnel = node.tunnel;
    let node = std::cell::RefCell::new(node);
    runner()
        .run(&frame(), |f| {
            let mut node = node.borrow_mut();
            let (verdict, out) = node.judge(FROM_TUNNEL, tunnel, &f)?;
            if verdict == TC_ACT_REDIRECT {
                let to = packet::dst_mac(&out);
                prop_assert!(
                    to != MAC_A && to != MAC_B,
                    "delivered to a pod: {:02x?}",
                    out
                );
            }
            if verdict == TC_ACT_OK {
                let delivered = node.host_stack_delivers(&out);
                prop_assert!(delivered.is_none(), "through the host to {:?}", delivered);
            }
            Ok(())
        })
        .unwrap();
}
