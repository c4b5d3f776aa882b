//! Service translation in the TC programs on synthetic packets (`BPF_PROG_TEST_RUN`): a
//! pod's packet to a ClusterIP is rewritten to a backend with valid checksums, the reply is
//! rewritten back, the choice sticks to the flow, and policy judges the translated flow.
//! A NodePort packet from the network reaches a backend on this node with the client's
//! address, or one on another node with this node's address, and the replies leave as if
//! from the node's port; a backend on the node's own address gets it up the host stack, and
//! the stack's reply is translated back on the uplink's egress. Under
//! `externalTrafficPolicy: Local` pods and nodes use the ClusterIP's backends while the
//! outside is refused. SCTP's CRC32c, which covers the ports, is right after every port
//! change. IPv6 frontends are translated the same way, and the two node ports of a
//! dual-stack Service each keep to their family.

mod support;

use support::{
    GW_A, GW_B, IP_A, IP_B, IP6_A, IP6_B, MAC_A, MAC_B, NODE_IP, TC_ACT_OK, TC_ACT_REDIRECT,
    TC_ACT_SHOT, UPLINK_MAC,
};

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
};

use etherparse::{
    IpHeaders, PacketBuilder, PacketBuilderStep, SlicedPacket, TcpSlice, TransportSlice, UdpSlice,
};
use weir_agent::{
    dataplane::Dataplane,
    maps::{DataplaneMaps, monotonic_ns},
};
use weir_api::{
    Action, BackendState, FrontendKind, PortPrefix, ServiceBackend, ServiceEntry, ServiceFrontend,
    ServiceRef, VerdictEntry, VerdictMatch,
};
use weir_common::{
    config::{CtTimeouts, NodeConfig},
    conntrack::CtKey,
    endpoint::EndpointInfo,
    event::DropReason,
    ip::IpKey,
    programs::{FROM_NETWORK, FROM_POD, TO_NETWORK},
    route::RouteEntry,
};

/// A backend on another node.
const IP_REMOTE: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 20);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// A host outside the cluster, on the uplink's segment.
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 9);
/// The node that owns `IP_REMOTE`.
const OTHER_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 3);
const NODE_PORT: u16 = 30080;
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;
const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x0a);
/// The node's IPv6 address on the uplink, and a host beside it.
const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 2);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 9);

/// Two pods on this node: A (the client) behind `veth_a`, B behind `veth_b`; the node's
/// uplink `uplink` has `NODE_IP` on a /24 shared with `CLIENT` and `OTHER_NODE`.
struct Node {
    dp: Dataplane,
    maps: DataplaneMaps,
    veth_a: u32,
    veth_b: u32,
    uplink: u32,
    services: BTreeMap<ServiceFrontend, ServiceEntry>,
    /// Session-affinity timeout of the Services `service` writes with affinity.
    affinity_s: u32,
}

impl Node {
    fn new() -> Self {
        support::private_netns();
        let veth_a = support::dummy_interface("veth-a");
        let veth_b = support::dummy_interface("veth-b");
        let uplink = support::dummy_interface("uplink");
        for args in [
            &["ip", "addr", "add", "192.168.50.2/24", "dev", "uplink"][..],
            &[
                "ip",
                "addr",
                "add",
                "fd00:50::2/64",
                "dev",
                "uplink",
                "nodad",
            ],
            &["ip", "link", "set", "uplink", "up"],
            &["sysctl", "-qw", "net.ipv4.ip_forward=1"],
            &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"],
        ] {
            let ok = Command::new(args[0]).args(&args[1..]).status().unwrap();
            assert!(ok.success(), "{args:?}");
        }
        let mut dp = Dataplane::load(None).expect("loading the programs");
        let mut maps = DataplaneMaps::take(&mut dp).expect("maps");
        maps.set_config(NodeConfig::new(1, 0, 0)).unwrap();
        maps.sync_host_addrs(&[NODE_IP.into(), NODE_IP6.into()])
            .unwrap();
        let mut node = Node {
            dp,
            maps,
            veth_a,
            veth_b,
            uplink,
            services: BTreeMap::new(),
            affinity_s: 10800,
        };
        let routes = [(
            "10.244.1.0/24".parse().unwrap(),
            RouteEntry::new(OTHER_NODE.into(), RouteEntry::MODE_DIRECT, uplink),
        )];
        node.maps
            .sync_routes(&routes.into_iter().collect())
            .unwrap();
        node.set_endpoints(0, 0);
        node
    }

    /// (Re)writes both endpoints (each with an IPv4 and an IPv6 address), A with egress rule
    /// set `a_out`, B with ingress `b_in`.
    fn set_endpoints(&mut self, a_out: u32, b_in: u32) {
        let a = EndpointInfo::new(self.veth_a, MAC_A, GW_A).with_policies(0, a_out);
        let b = EndpointInfo::new(self.veth_b, MAC_B, GW_B).with_policies(b_in, 0);
        let eps = [
            (IpKey::from(IP_A), a),
            (IpKey::from(IP6_A), a),
            (IpKey::from(IP_B), b),
            (IpKey::from(IP6_B), b),
        ];
        self.maps
            .sync_endpoints(&eps.into_iter().collect())
            .unwrap();
    }

    /// (Re)writes both endpoints, A isolated by rule sets `ingress` and `egress`, B not.
    fn isolate_a(&mut self, ingress: u32, egress: u32) {
        let eps = [
            (
                IpKey::from(IP_A),
                EndpointInfo::new(self.veth_a, MAC_A, GW_A).with_policies(ingress, egress),
            ),
            (
                IpKey::from(IP_B),
                EndpointInfo::new(self.veth_b, MAC_B, GW_B),
            ),
        ];
        self.maps
            .sync_endpoints(&eps.into_iter().collect())
            .unwrap();
    }

    /// Sets (or replaces) a ClusterIP frontend on `port`/`proto` with `backends`.
    fn service(
        &mut self,
        port: u16,
        proto: u8,
        backends: &[(Ipv4Addr, u16, BackendState)],
        affinity: bool,
    ) {
        self.frontend(FrontendKind::ClusterIp, port, proto, backends, affinity);
    }

    /// Sets (or replaces) a NodePort frontend on `port`/`proto` with ready `backends`.
    fn node_port(&mut self, port: u16, proto: u8, backends: &[(Ipv4Addr, u16)]) {
        let backends: Vec<_> = backends
            .iter()
            .map(|(ip, port)| (*ip, *port, BackendState::Ready))
            .collect();
        self.frontend(FrontendKind::NodePort, port, proto, &backends, false);
    }

    fn frontend(
        &mut self,
        kind: FrontendKind,
        port: u16,
        proto: u8,
        backends: &[(Ipv4Addr, u16, BackendState)],
        affinity: bool,
    ) {
        let ip = match kind {
            FrontendKind::ClusterIp => CLUSTER_IP.into(),
            FrontendKind::NodePort => Ipv4Addr::UNSPECIFIED.into(),
        };
        let backends: Vec<_> = backends
            .iter()
            .map(|(ip, port, state)| (IpAddr::V4(*ip), *port, *state))
            .collect();
        self.frontend_at(kind, ip, port, proto, &backends, affinity);
    }

    /// Sets (or replaces) the frontend `kind` on `ip`, `port`, `proto` with `backends`.
    fn frontend_at(
        &mut self,
        kind: FrontendKind,
        ip: IpAddr,
        port: u16,
        proto: u8,
        backends: &[(IpAddr, u16, BackendState)],
        affinity: bool,
    ) {
        let frontend = ServiceFrontend {
            kind,
            ip,
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
            backends: backends
                .iter()
                .map(|(ip, port, state)| ServiceBackend {
                    ip: *ip,
                    port: *port,
                    node: String::new(),
                    state: *state,
                })
                .collect(),
            affinity_timeout_s: affinity.then_some(self.affinity_s),
            masquerade_external: false,
        };
        let mut new = self.services.clone();
        new.insert(frontend, entry);
        let diff = weir_api::TableDiff::between(&self.services, &new);
        self.maps.apply_service_diff(&diff, &self.services).unwrap();
        self.services = new;
    }

    fn run(&mut self, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        support::test_run(&mut self.dp, FROM_POD, ifindex, frame)
    }

    fn sent_by_a(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let ifindex = self.veth_a;
        self.run(ifindex, frame)
    }

    fn sent_by_b(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let ifindex = self.veth_b;
        self.run(ifindex, frame)
    }

    fn arrived(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let ifindex = self.uplink;
        support::test_run(&mut self.dp, FROM_NETWORK, ifindex, frame)
    }

    /// What the node's stack sends out of the uplink (`to_network`).
    fn leaving(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let ifindex = self.uplink;
        support::test_run(&mut self.dp, TO_NETWORK, ifindex, frame)
    }

    fn drops(&self, reason: DropReason) -> u64 {
        self.maps
            .drop_counts()
            .into_iter()
            .find(|(r, _)| *r == reason)
            .map(|(_, n)| n)
            .unwrap()
    }

    fn allow_egress(&mut self, rule_set: u32, class: u32, port: u16, rule: u32) {
        let m = VerdictMatch {
            rule_set,
            class,
            proto: Some(TCP),
            ports: PortPrefix::new(port, 16),
        };
        let v = VerdictEntry {
            action: Action::Allow,
            rule,
        };
        self.maps.set_verdict(&m, &v).unwrap();
    }
}

/// An Ethernet/IPv4 frame with valid checksums: TCP with `syn` (else ACK), UDP, or SCTP.
#[expect(clippy::too_many_arguments, reason = "one argument per header field")]
fn frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    sport: u16,
    dport: u16,
    syn: bool,
) -> Vec<u8> {
    let ip = PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(src.octets(), dst.octets(), 64);
    transport(ip, proto, sport, dport, syn)
}

/// The transport header of [`frame`] and [`frame6`] with a 4-byte payload (37 bytes of
/// data for SCTP), written after `ip`.
fn transport(
    ip: PacketBuilderStep<IpHeaders>,
    proto: u8,
    sport: u16,
    dport: u16,
    syn: bool,
) -> Vec<u8> {
    let payload = b"weir";
    let mut out = Vec::new();
    match proto {
        TCP => {
            let b = ip.tcp(sport, dport, 1000, 64240);
            let b = if syn { b.syn() } else { b.ack(1) };
            b.write(&mut out, payload).unwrap();
        }
        UDP => ip.udp(sport, dport).write(&mut out, payload).unwrap(),
        _ => ip
            .write(
                &mut out,
                etherparse::IpNumber::SCTP,
                &sctp_packet(sport, dport, 37),
            )
            .unwrap(),
    }
    out
}

/// Addresses, ports and the destination MAC of an output frame whose checksums were
/// checked.
struct Seen<A = Ipv4Addr> {
    src: A,
    dst: A,
    sport: u16,
    dport: u16,
    dst_mac: [u8; 6],
}

fn inspect(out: &[u8]) -> Seen {
    let p = SlicedPacket::from_ethernet(out).expect("a parsable frame");
    let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
        panic!("not IPv4");
    };
    let header = ip.header().to_header();
    assert_eq!(
        header.header_checksum,
        header.calc_header_checksum(),
        "IPv4 header checksum"
    );
    let (sport, dport) = checked_ports(
        &p,
        ip.payload().payload,
        |t| t.to_header().calc_checksum_ipv4(&header, t.payload()),
        |u| u.to_header().calc_checksum_ipv4(&header, u.payload()),
    );
    Seen {
        src: header.source.into(),
        dst: header.destination.into(),
        sport,
        dport,
        dst_mac: out[0..6].try_into().unwrap(),
    }
}

/// The ports of the TCP, UDP or SCTP packet in `p` (SCTP: `ip_payload`), after checking its
/// checksum: TCP's and UDP's against what `tcp_sum` and `udp_sum` compute, SCTP's CRC32c.
fn checked_ports<E: std::fmt::Debug>(
    p: &SlicedPacket,
    ip_payload: &[u8],
    tcp_sum: impl Fn(&TcpSlice) -> Result<u16, E>,
    udp_sum: impl Fn(&UdpSlice) -> Result<u16, E>,
) -> (u16, u16) {
    match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            assert_eq!(t.checksum(), tcp_sum(t).unwrap(), "TCP checksum");
            (t.source_port(), t.destination_port())
        }
        Some(TransportSlice::Udp(u)) => {
            assert_eq!(u.checksum(), udp_sum(u).unwrap(), "UDP checksum");
            (u.source_port(), u.destination_port())
        }
        _ => {
            let sctp = ip_payload;
            assert!(sctp.len() >= 12, "no TCP, UDP or SCTP header");
            assert_eq!(
                sctp[8..12],
                sctp_checksum(sctp).to_le_bytes(),
                "SCTP CRC32c"
            );
            (
                u16::from_be_bytes([sctp[0], sctp[1]]),
                u16::from_be_bytes([sctp[2], sctp[3]]),
            )
        }
    }
}

#[test]
fn pod_to_cluster_ip_goes_to_the_backend_and_the_reply_comes_from_the_cluster_ip() {
    let mut node = Node::new();
    node.service(80, TCP, &[(IP_B, 8080, BackendState::Ready)], false);
    let (verdict, out) =
        node.sent_by_a(&frame(MAC_A, GW_A, IP_A, CLUSTER_IP, TCP, 40000, 80, true));
    assert_eq!(verdict, TC_ACT_REDIRECT, "straight to the local backend");
    let seen = inspect(&out);
    assert_eq!((seen.src, seen.sport), (IP_A, 40000));
    assert_eq!((seen.dst, seen.dport), (IP_B, 8080));
    assert_eq!(seen.dst_mac, MAC_B);

    let (verdict, out) = node.sent_by_b(&frame(MAC_B, GW_B, IP_B, IP_A, TCP, 8080, 40000, false));
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "the reply goes straight back to A"
    );
    let seen = inspect(&out);
    assert_eq!(
        (seen.src, seen.sport),
        (CLUSTER_IP, 80),
        "as if from the frontend"
    );
    assert_eq!((seen.dst, seen.dport), (IP_A, 40000));
    assert_eq!(seen.dst_mac, MAC_A);
}

#[test]
fn udp_to_cluster_ip_is_translated_both_ways_with_valid_checksums() {
    let mut node = Node::new();
    node.service(53, UDP, &[(IP_B, 5353, BackendState::Ready)], false);
    let (verdict, out) =
        node.sent_by_a(&frame(MAC_A, GW_A, IP_A, CLUSTER_IP, UDP, 41000, 53, false));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let seen = inspect(&out);
    assert_eq!((seen.dst, seen.dport), (IP_B, 5353));
    let (_, out) = node.sent_by_b(&frame(MAC_B, GW_B, IP_B, IP_A, UDP, 5353, 41000, false));
    let seen = inspect(&out);
    assert_eq!((seen.src, seen.sport), (CLUSTER_IP, 53));
}

#[test]
fn a_flow_keeps_its_backend_and_new_flows_spread_over_all_backends() {
    let mut node = Node::new();
    node.service(
        80,
        TCP,
        &[
            (IP_B, 8080, BackendState::Ready),
            (IP_REMOTE, 8080, BackendState::Ready),
        ],
        false,
    );
    let mut chosen = std::collections::BTreeSet::new();
    for sport in 40000..40032 {
        let (_, first) =
            node.sent_by_a(&frame(MAC_A, GW_A, IP_A, CLUSTER_IP, TCP, sport, 80, true));
        let first = inspect(&first).dst;
        for _ in 0..3 {
            let (_, again) =
                node.sent_by_a(&frame(MAC_A, GW_A, IP_A, CLUSTER_IP, TCP, sport, 80, false));
            assert_eq!(inspect(&again).dst, first, "the flow keeps its backend");
        }
        chosen.insert(first);
    }
    assert_eq!(
        chosen,
        [IP_B, IP_REMOTE].into_iter().collect(),
        "32 flows reach both backends"
    );
}

#[test]
fn session_affinity_sends_every_flow_of_a_client_to_one_backend() {
    let mut node = Node::new();
    node.service(
        80,
        TCP,
        &[
            (IP_B, 8080, BackendState::Ready),
            (IP_REMOTE, 8080, BackendState::Ready),
        ],
        true,
    );
    let backends: std::collections::BTreeSet<Ipv4Addr> = (40000..40016)
        .map(|sport| {
            let (_, out) =
                node.sent_by_a(&frame(MAC_A, GW_A, IP_A, CLUSTER_IP, TCP, sport, 80, true));
            inspect(&out).dst
        })
        .collect();
    assert_eq!(backends.len(), 1, "one backend for all flows: {backends:?}");
}

#[test]
fn session_affinity_lets_a_client_go_after_its_timeout() {
    let mut node = Node::new();
    node.affinity_s = 1;
    let backends: Vec<_> = (20..24)
        .map(|i| (Ipv4Addr::new(10, 244, 1, i), 8080, BackendState::Ready))
        .collect();
    node.service(80, TCP, &backends, true);
    let mut sport = 40000;
    let mut next_backend = |node: &mut Node| {
        sport += 1;
        let (_, out) = node.sent_by_a(&frame(MAC_A, GW_A, IP_A, CLUSTER_IP, TCP, sport, 80, true));
        inspect(&out).dst
    };
    let first = next_backend(&mut node);
    for _ in 0..8 {
        assert_eq!(next_backend(&mut node), first, "within the timeout");
    }
    // Each flow after a pause longer than the timeout picks anew: over eight of them, four
    // backends all coincide with probability 4^-7.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..8 {
        std::thread::sleep(std::time::Duration::from_millis(1100));
        seen.insert(next_backend(&mut node));
    }
    assert!(seen.len() > 1, "the client was let go: {seen:?}");
}

#[test]
fn terminating_backends_are_used_only_when_none_is_ready() {
    let mut node = Node::new();
    node.service(
        80,
        TCP,
        &[
            (IP_B, 8080, BackendState::Ready),
            (IP_REMOTE, 8080, BackendState::Terminating),
        ],
        false,
    );
    for sport in 40000..40016 {
        let (_, out) = node.sent_by_a(&frame(MAC_A, GW_A, IP_A, CLUSTER_IP, TCP, sport, 80, true));
        assert_eq!(inspect(&out).dst, IP_B, "never the terminating one");
    }
    node.service(
        80,
        TCP,
        &[(IP_REMOTE, 8080, BackendState::Terminating)],
        false,
    );
    let (verdict, out) =
        node.sent_by_a(&frame(MAC_A, GW_A, IP_A, CLUSTER_IP, TCP, 41000, 80, true));
    assert_eq!(
        inspect(&out).dst,
        IP_REMOTE,
        "the fallback when none is ready"
    );
    assert_ne!(verdict, TC_ACT_SHOT);
}

#[test]
fn a_service_without_backends_refuses_new_flows_at_once_and_counts_them() {
    let mut node = Node::new();
    node.service(80, TCP, &[], false);
    node.service(53, UDP, &[], false);

    // TCP: the SYN comes back as a reset from the frontend, acknowledging it.
    let syn = frame(MAC_A, GW_A, IP_A, CLUSTER_IP, TCP, 40000, 80, true);
    let (verdict, out) = node.sent_by_a(&syn);
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "answered straight back to the pod"
    );
    let seen = inspect(&out);
    assert_eq!((seen.src, seen.sport), (CLUSTER_IP, 80));
    assert_eq!((seen.dst, seen.dport), (IP_A, 40000));
    assert_eq!(seen.dst_mac, MAC_A);
    let p = SlicedPacket::from_ethernet(&out).unwrap();
    let Some(TransportSlice::Tcp(t)) = p.transport else {
        panic!("not TCP");
    };
    assert!(t.rst() && t.ack() && !t.syn(), "RST+ACK");
    assert_eq!(
        t.acknowledgment_number(),
        1005,
        "acknowledges the SYN (sequence 1000) and its 4 bytes of data"
    );
    assert_eq!(node.drops(DropReason::NoBackend), 1);

    // UDP: an ICMP port unreachable from the frontend, quoting the datagram as sent.
    let datagram = frame(MAC_A, GW_A, IP_A, CLUSTER_IP, UDP, 40001, 53, false);
    let (verdict, out) = node.sent_by_a(&datagram);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let p = SlicedPacket::from_ethernet(&out).expect("a parsable frame");
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
        panic!("not IPv4");
    };
    let header = ip.header().to_header();
    assert_eq!(header.header_checksum, header.calc_header_checksum());
    assert_eq!(
        (
            Ipv4Addr::from(header.source),
            Ipv4Addr::from(header.destination)
        ),
        (CLUSTER_IP, IP_A)
    );
    let Some(TransportSlice::Icmpv4(icmp)) = p.transport else {
        panic!("not ICMP: {:?}", p.transport);
    };
    assert_eq!((icmp.type_u8(), icmp.code_u8()), (3, 3), "port unreachable");
    let expect = icmp.icmp_type().calc_checksum(icmp.payload());
    assert_eq!(icmp.checksum(), expect, "ICMP checksum");
    assert_eq!(
        icmp.payload(),
        &datagram[14..14 + 28],
        "quotes the header and 8 bytes"
    );
    assert_eq!(node.drops(DropReason::NoBackend), 2);

    // Another port of the same address is not a frontend: it goes up the stack untouched.
    let f = frame(MAC_A, GW_A, IP_A, CLUSTER_IP, TCP, 40000, 81, true);
    assert_eq!(node.sent_by_a(&f), (TC_ACT_OK, f));
}

#[test]
fn egress_policy_judges_the_backend_and_target_port_not_the_frontend() {
    let mut node = Node::new();
    node.service(80, TCP, &[(IP_B, 8080, BackendState::Ready)], false);
    // A may only reach class 1 (B's address) on port 80: the frontend's port, not the
    // backend's. The translated flow (B:8080) is denied.
    node.maps
        .set_peer_class(&"10.244.0.11/32".parse().unwrap(), 1)
        .unwrap();
    node.allow_egress(5, 1, 80, 51);
    node.set_endpoints(5, 0);
    let syn = |sport| frame(MAC_A, GW_A, IP_A, CLUSTER_IP, TCP, sport, 80, true);
    assert_eq!(node.sent_by_a(&syn(40000)).0, TC_ACT_SHOT);
    assert_eq!(node.drops(DropReason::PolicyEgress), 1);
    // Allowing the target port admits it.
    node.allow_egress(5, 1, 8080, 52);
    node.maps.bump_policy_generation().unwrap();
    assert_eq!(node.sent_by_a(&syn(40001)).0, TC_ACT_REDIRECT);
}

#[test]
fn removing_a_backend_forgets_its_flows_so_they_move_to_another() {
    let mut node = Node::new();
    node.service(53, UDP, &[(IP_REMOTE, 53, BackendState::Ready)], false);
    let query = frame(MAC_A, GW_A, IP_A, CLUSTER_IP, UDP, 41000, 53, false);
    let (_, out) = node.sent_by_a(&query);
    assert_eq!(inspect(&out).dst, IP_REMOTE);
    node.service(53, UDP, &[(IP_B, 53, BackendState::Ready)], false);
    let (_, out) = node.sent_by_a(&query);
    assert_eq!(
        inspect(&out).dst,
        IP_B,
        "the same client socket reaches the new backend"
    );
    assert_eq!(
        node.maps.service_counts(),
        (1, 1),
        "one frontend, one backend slot left in the map"
    );
}

#[test]
fn node_port_from_outside_reaches_a_local_backend_with_the_client_address_and_replies_from_the_node_port()
 {
    let mut node = Node::new();
    node.node_port(NODE_PORT, TCP, &[(IP_B, 8080)]);
    let syn = frame(
        CLIENT_MAC, UPLINK_MAC, CLIENT, NODE_IP, TCP, 40000, NODE_PORT, true,
    );
    let (verdict, out) = node.arrived(&syn);
    assert_eq!(verdict, TC_ACT_REDIRECT, "straight into the backend");
    let seen = inspect(&out);
    assert_eq!(
        (seen.src, seen.sport),
        (CLIENT, 40000),
        "client address kept"
    );
    assert_eq!((seen.dst, seen.dport), (IP_B, 8080));
    assert_eq!(seen.dst_mac, MAC_B);

    let reply = frame(MAC_B, GW_B, IP_B, CLIENT, TCP, 8080, 40000, false);
    let (verdict, out) = node.sent_by_b(&reply);
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "out of the uplink, not up the host stack"
    );
    let seen = inspect(&out);
    assert_eq!(
        (seen.src, seen.sport),
        (NODE_IP, NODE_PORT),
        "from the node's port"
    );
    assert_eq!((seen.dst, seen.dport), (CLIENT, 40000));

    // The node's other ports are the host's business.
    let other = frame(
        CLIENT_MAC, UPLINK_MAC, CLIENT, NODE_IP, TCP, 40001, 22, true,
    );
    let (verdict, out) = node.arrived(&other);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, other, "untouched");
}

#[test]
fn node_port_to_a_backend_on_another_node_leaves_with_the_node_address_and_the_reply_is_translated_back()
 {
    let mut node = Node::new();
    node.node_port(NODE_PORT, UDP, &[(IP_REMOTE, 5353)]);
    let first = frame(
        CLIENT_MAC, UPLINK_MAC, CLIENT, NODE_IP, UDP, 40000, NODE_PORT, false,
    );
    let (verdict, out) = node.arrived(&first);
    assert_eq!(verdict, TC_ACT_REDIRECT, "on to the backend's node");
    let seen = inspect(&out);
    assert_eq!((seen.dst, seen.dport), (IP_REMOTE, 5353));
    assert_eq!(
        seen.src, NODE_IP,
        "the node's address, so the reply comes back here"
    );
    let snat_port = seen.sport;
    assert!(
        snat_port >= 61000,
        "a port outside the ephemeral range: {snat_port}"
    );

    let (_, out) = node.arrived(&first);
    assert_eq!(inspect(&out).sport, snat_port, "the flow keeps its port");

    // Another client using the same source port gets its own.
    let other_client = Ipv4Addr::new(192, 168, 50, 10);
    let second = frame(
        CLIENT_MAC,
        UPLINK_MAC,
        other_client,
        NODE_IP,
        UDP,
        40000,
        NODE_PORT,
        false,
    );
    let (_, out) = node.arrived(&second);
    assert_ne!(inspect(&out).sport, snat_port);

    let reply = frame(
        UPLINK_MAC, UPLINK_MAC, IP_REMOTE, NODE_IP, UDP, 5353, snat_port, false,
    );
    let (verdict, out) = node.arrived(&reply);
    assert_eq!(verdict, TC_ACT_REDIRECT, "back out of the uplink");
    let seen = inspect(&out);
    assert_eq!((seen.src, seen.sport), (NODE_IP, NODE_PORT));
    assert_eq!((seen.dst, seen.dport), (CLIENT, 40000));
}

#[test]
fn a_pod_reaches_a_node_port_on_its_own_node_address() {
    let mut node = Node::new();
    node.node_port(NODE_PORT, TCP, &[(IP_B, 8080)]);
    let (verdict, out) = node.sent_by_a(&frame(
        MAC_A, GW_A, IP_A, NODE_IP, TCP, 40000, NODE_PORT, true,
    ));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let seen = inspect(&out);
    assert_eq!((seen.src, seen.dst, seen.dport), (IP_A, IP_B, 8080));

    let (_, out) = node.sent_by_b(&frame(MAC_B, GW_B, IP_B, IP_A, TCP, 8080, 40000, false));
    let seen = inspect(&out);
    assert_eq!((seen.src, seen.sport), (NODE_IP, NODE_PORT));
}

/// A second and a third address of the node, on the uplink's subnet.
const NODE_IP_2: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 4);
const NODE_IP_3: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 5);

#[test]
fn a_host_port_on_one_node_address_is_translated_there_alone() {
    let mut node = Node::new();
    node.maps
        .sync_host_addrs(&[NODE_IP.into(), NODE_IP_2.into(), NODE_IP_3.into()])
        .unwrap();
    // One port, two pods: B on the node's first address, A on its second (as the agent
    // writes host ports with a hostIP), and a NodePort on every address on another port.
    for (addr, backend, id) in [(NODE_IP, IP_B, 0x8000_0001), (NODE_IP_2, IP_A, 0x8000_0002)] {
        let frontend = ServiceFrontend {
            kind: FrontendKind::NodePort,
            ip: addr.into(),
            port: NODE_PORT,
            proto: TCP,
        };
        let entry = ServiceEntry {
            service: ServiceRef {
                namespace: "hostPort".into(),
                name: format!("default/{backend}"),
                port_name: String::new(),
            },
            id,
            backends: vec![ServiceBackend {
                ip: backend.into(),
                port: 8080,
                node: String::new(),
                state: BackendState::Ready,
            }],
            affinity_timeout_s: None,
            masquerade_external: false,
        };
        let mut new = node.services.clone();
        new.insert(frontend, entry);
        let diff = weir_api::TableDiff::between(&node.services, &new);
        node.maps.apply_service_diff(&diff, &node.services).unwrap();
        node.services = new;
    }
    node.node_port(NODE_PORT + 1, TCP, &[(IP_B, 9090)]);
    let syn = |dst: Ipv4Addr, dport: u16, sport: u16| {
        frame(CLIENT_MAC, UPLINK_MAC, CLIENT, dst, TCP, sport, dport, true)
    };

    // Until the agent says frontends on single addresses exist, none is looked up.
    let first = syn(NODE_IP, NODE_PORT, 40000);
    let (verdict, out) = node.arrived(&first);
    assert_eq!((verdict, &out), (TC_ACT_OK, &first), "not looked up");
    node.maps
        .set_flag(NodeConfig::FLAG_HOST_ADDR_FRONTENDS, true)
        .unwrap();

    let (verdict, out) = node.arrived(&syn(NODE_IP, NODE_PORT, 40001));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let seen = inspect(&out);
    assert_eq!((seen.src, seen.sport), (CLIENT, 40001), "client kept");
    assert_eq!((seen.dst, seen.dport, seen.dst_mac), (IP_B, 8080, MAC_B));

    let (verdict, out) = node.arrived(&syn(NODE_IP_2, NODE_PORT, 40002));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let seen = inspect(&out);
    assert_eq!((seen.dst, seen.dport, seen.dst_mac), (IP_A, 8080, MAC_A));
    // A's reply leaves from the address the client used.
    let (_, out) = node.sent_by_a(&frame(MAC_A, GW_A, IP_A, CLIENT, TCP, 8080, 40002, false));
    let seen = inspect(&out);
    assert_eq!((seen.src, seen.sport), (NODE_IP_2, NODE_PORT));

    // The node's third address has no host port on that port: the host's business.
    let third = syn(NODE_IP_3, NODE_PORT, 40003);
    let (verdict, out) = node.arrived(&third);
    assert_eq!((verdict, &out), (TC_ACT_OK, &third), "untouched");
    // The NodePort is still on every address, the flag set or not.
    for addr in [NODE_IP, NODE_IP_3] {
        let (verdict, out) = node.arrived(&syn(addr, NODE_PORT + 1, 40004));
        assert_eq!(verdict, TC_ACT_REDIRECT, "NodePort on {addr}");
        assert_eq!(inspect(&out).dport, 9090);
    }

    // A pod reaches the host port at that address (from_pod looks the exact address up
    // first), and not at the node's third one.
    let (verdict, out) = node.sent_by_a(&frame(
        MAC_A, GW_A, IP_A, NODE_IP, TCP, 41000, NODE_PORT, true,
    ));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let seen = inspect(&out);
    assert_eq!((seen.dst, seen.dport), (IP_B, 8080));
    let (_, out) = node.sent_by_a(&frame(
        MAC_A, GW_A, IP_A, NODE_IP_3, TCP, 41001, NODE_PORT, true,
    ));
    let seen = inspect(&out);
    assert_eq!(
        (seen.dst, seen.dport),
        (NODE_IP_3, NODE_PORT),
        "not translated"
    );
}

#[test]
fn node_port_to_the_node_own_address_goes_up_its_stack_and_the_reply_leaves_from_the_node_port() {
    let mut node = Node::new();
    node.node_port(NODE_PORT, TCP, &[(NODE_IP, 6443)]);
    let syn = frame(
        CLIENT_MAC, UPLINK_MAC, CLIENT, NODE_IP, TCP, 40000, NODE_PORT, true,
    );
    for round in 0..2 {
        let (verdict, out) = node.arrived(&syn);
        assert_eq!(verdict, TC_ACT_OK, "up the host stack (round {round})");
        let seen = inspect(&out);
        assert_eq!((seen.src, seen.sport), (CLIENT, 40000), "client kept");
        assert_eq!((seen.dst, seen.dport), (NODE_IP, 6443));
    }

    let reply = frame(
        UPLINK_MAC, CLIENT_MAC, NODE_IP, CLIENT, TCP, 6443, 40000, false,
    );
    let (verdict, out) = node.leaving(&reply);
    assert_eq!(verdict, TC_ACT_OK);
    let seen = inspect(&out);
    assert_eq!(
        (seen.src, seen.sport),
        (NODE_IP, NODE_PORT),
        "from the node's port"
    );
    assert_eq!((seen.dst, seen.dport), (CLIENT, 40000));

    // The node's other traffic leaves as it is.
    for other in [
        frame(
            UPLINK_MAC, CLIENT_MAC, NODE_IP, CLIENT, TCP, 6443, 40001, false,
        ),
        frame(
            UPLINK_MAC, CLIENT_MAC, NODE_IP, CLIENT, TCP, 22, 40000, false,
        ),
        frame(
            UPLINK_MAC, CLIENT_MAC, IP_A, CLIENT, TCP, 6443, 40000, false,
        ),
    ] {
        let (verdict, out) = node.leaving(&other);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out, other);
    }
}

#[test]
fn external_traffic_policy_local_refuses_the_outside_but_not_pods_and_nodes() {
    let mut node = Node::new();
    node.maps
        .sync_tunnel_peers(&[IpKey::from(OTHER_NODE)].into_iter().collect())
        .unwrap();
    // No backend of this node's own; the ClusterIP lists the one elsewhere. (The test's
    // NodePorts do not masquerade: externalTrafficPolicy Local.)
    node.service(80, TCP, &[(IP_REMOTE, 8080, BackendState::Ready)], false);
    node.node_port(NODE_PORT, TCP, &[]);

    let syn = frame(
        CLIENT_MAC, UPLINK_MAC, CLIENT, NODE_IP, TCP, 40000, NODE_PORT, true,
    );
    let (verdict, _) = node.arrived(&syn);
    assert_eq!(verdict, TC_ACT_SHOT, "the outside is refused");
    assert_eq!(node.drops(DropReason::NoBackend), 1);

    // Another node, and a pod of another node: forwarded to the backend.
    let remote_pod = Ipv4Addr::new(10, 244, 1, 5);
    for client in [OTHER_NODE, remote_pod] {
        let syn = frame(
            CLIENT_MAC, UPLINK_MAC, client, NODE_IP, TCP, 40000, NODE_PORT, true,
        );
        let (verdict, out) = node.arrived(&syn);
        assert_eq!(
            verdict, TC_ACT_REDIRECT,
            "{client}: on to the backend's node"
        );
        let seen = inspect(&out);
        assert_eq!((seen.src, seen.dst, seen.dport), (NODE_IP, IP_REMOTE, 8080));
    }

    // A pod of this node: translated at the source.
    let (verdict, out) = node.sent_by_a(&frame(
        MAC_A, GW_A, IP_A, NODE_IP, TCP, 40000, NODE_PORT, true,
    ));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let seen = inspect(&out);
    assert_eq!((seen.src, seen.dst, seen.dport), (IP_A, IP_REMOTE, 8080));
    assert_eq!(node.drops(DropReason::NoBackend), 1);
}

#[test]
fn a_node_port_without_backends_here_refuses_new_flows() {
    let mut node = Node::new();
    node.node_port(NODE_PORT, TCP, &[]);
    let syn = frame(
        CLIENT_MAC, UPLINK_MAC, CLIENT, NODE_IP, TCP, 40000, NODE_PORT, true,
    );
    let (verdict, _) = node.arrived(&syn);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(node.drops(DropReason::NoBackend), 1);
}

#[test]
fn a_pod_reaches_itself_through_its_service_from_the_frontend_address() {
    let mut node = Node::new();
    // A is isolated for ingress and egress with nothing allowed: its own traffic to itself
    // is still not policy's business.
    node.isolate_a(9, 9);
    node.service(80, TCP, &[(IP_A, 8080, BackendState::Ready)], false);
    let (verdict, out) =
        node.sent_by_a(&frame(MAC_A, GW_A, IP_A, CLUSTER_IP, TCP, 40000, 80, true));
    assert_eq!(verdict, TC_ACT_REDIRECT, "back into A");
    let seen = inspect(&out);
    assert_eq!((seen.dst, seen.dport), (IP_A, 8080));
    assert_eq!(seen.dst_mac, MAC_A);
    assert_eq!(
        seen.src, CLUSTER_IP,
        "from the frontend, not from A's own address"
    );
    let port = seen.sport;

    let (verdict, out) = node.sent_by_a(&frame(
        MAC_A, GW_A, IP_A, CLUSTER_IP, TCP, 8080, port, false,
    ));
    assert_eq!(verdict, TC_ACT_REDIRECT, "the reply goes back into A");
    let seen = inspect(&out);
    assert_eq!((seen.src, seen.sport), (CLUSTER_IP, 80));
    assert_eq!((seen.dst, seen.dport), (IP_A, 40000));
    assert_eq!(node.drops(DropReason::PolicyIngress), 0);
    assert_eq!(node.drops(DropReason::PolicyEgress), 0);
}

/// An Ethernet/IPv4 frame carrying an SCTP packet with `payload_len` bytes after the common
/// header and a correct CRC32c (or a zero checksum field with `zero_checksum`), followed by
/// `padding` bytes of Ethernet padding that are not part of the IP packet.
#[expect(clippy::too_many_arguments, reason = "one argument per header field")]
fn sctp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload_len: usize,
    padding: usize,
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.octets(), dst.octets(), 64)
        .write(
            &mut out,
            etherparse::IpNumber::SCTP,
            &sctp_packet(sport, dport, payload_len),
        )
        .unwrap();
    out.extend(std::iter::repeat_n(0xa5, padding));
    out
}

/// An SCTP packet (common header with a valid CRC32c, then `payload_len` bytes).
fn sctp_packet(sport: u16, dport: u16, payload_len: usize) -> Vec<u8> {
    let mut sctp = Vec::new();
    sctp.extend_from_slice(&sport.to_be_bytes());
    sctp.extend_from_slice(&dport.to_be_bytes());
    sctp.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    sctp.extend_from_slice(&[0; 4]);
    sctp.extend((0..payload_len).map(|i| (i * 7 + 3) as u8));
    let sum = sctp_checksum(&sctp);
    sctp[8..12].copy_from_slice(&sum.to_le_bytes());
    sctp
}

/// CRC32c of an SCTP packet as its checksum field should hold it (the field zeroed).
fn sctp_checksum(sctp: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&sctp[..8]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &sctp[12..])
}

/// Addresses and ports of an output SCTP frame, after checking the IPv4 header checksum
/// and, unless the field is zero (left for offload), the CRC32c over the SCTP packet as the
/// IPv4 header delimits it. Also returns the checksum field.
fn inspect_sctp(out: &[u8]) -> (Seen, [u8; 4]) {
    let p = SlicedPacket::from_ethernet(out).expect("a parsable frame");
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
        panic!("not IPv4");
    };
    let header = ip.header().to_header();
    assert_eq!(
        header.header_checksum,
        header.calc_header_checksum(),
        "IPv4 header checksum"
    );
    assert_eq!(header.protocol, etherparse::IpNumber::SCTP);
    let sctp = ip.payload().payload;
    assert!(sctp.len() >= 12, "an SCTP common header");
    let field: [u8; 4] = sctp[8..12].try_into().unwrap();
    if field != [0; 4] {
        assert_eq!(
            field,
            sctp_checksum(sctp).to_le_bytes(),
            "SCTP CRC32c of {} bytes",
            sctp.len()
        );
    }
    let seen = Seen {
        src: header.source.into(),
        dst: header.destination.into(),
        sport: u16::from_be_bytes([sctp[0], sctp[1]]),
        dport: u16::from_be_bytes([sctp[2], sctp[3]]),
        dst_mac: out[0..6].try_into().unwrap(),
    };
    (seen, field)
}

/// SCTP payload lengths after the common header: none, odd ones, an MTU's worth. With
/// the Ethernet padding each frame gets.
const SCTP_LENGTHS: [(usize, usize); 7] = [
    (0, 14),
    (1, 0),
    (3, 9),
    (4, 0),
    (37, 0),
    (1001, 3),
    (1452, 0),
];

#[test]
fn sctp_to_a_cluster_ip_with_another_target_port_keeps_a_valid_crc32c_both_ways() {
    let mut node = Node::new();
    node.service(100, SCTP, &[(IP_B, 8100, BackendState::Ready)], false);
    for (i, (len, padding)) in SCTP_LENGTHS.into_iter().enumerate() {
        let sport = 40000 + i as u16;
        let (verdict, out) = node.sent_by_a(&sctp_frame(
            MAC_A, GW_A, IP_A, CLUSTER_IP, sport, 100, len, padding,
        ));
        assert_eq!(verdict, TC_ACT_REDIRECT, "{len} bytes");
        let (seen, field) = inspect_sctp(&out);
        assert_ne!(field, [0; 4]);
        assert_eq!((seen.src, seen.sport), (IP_A, sport));
        assert_eq!((seen.dst, seen.dport), (IP_B, 8100), "{len} bytes");
        assert_eq!(seen.dst_mac, MAC_B);

        let (verdict, out) = node.sent_by_b(&sctp_frame(
            MAC_B, GW_B, IP_B, IP_A, 8100, sport, len, padding,
        ));
        assert_eq!(verdict, TC_ACT_REDIRECT, "{len} bytes");
        let (seen, field) = inspect_sctp(&out);
        assert_ne!(field, [0; 4]);
        assert_eq!(
            (seen.src, seen.sport),
            (CLUSTER_IP, 100),
            "the reply from the frontend's port, {len} bytes"
        );
        assert_eq!((seen.dst, seen.dport), (IP_A, sport));
    }
}

#[test]
fn sctp_node_port_to_another_node_keeps_a_valid_crc32c_with_both_ports_translated() {
    let mut node = Node::new();
    node.node_port(NODE_PORT, SCTP, &[(IP_REMOTE, 8100)]);
    for (i, (len, padding)) in SCTP_LENGTHS.into_iter().enumerate() {
        let sport = 40000 + i as u16;
        let (verdict, out) = node.arrived(&sctp_frame(
            CLIENT_MAC, UPLINK_MAC, CLIENT, NODE_IP, sport, NODE_PORT, len, padding,
        ));
        assert_eq!(verdict, TC_ACT_REDIRECT, "{len} bytes");
        // Destination and source port both rewritten.
        let (seen, _) = inspect_sctp(&out);
        assert_eq!((seen.dst, seen.dport), (IP_REMOTE, 8100), "{len} bytes");
        assert_eq!(seen.src, NODE_IP);
        let snat_port = seen.sport;
        assert_ne!(snat_port, sport);

        let (verdict, out) = node.arrived(&sctp_frame(
            UPLINK_MAC, UPLINK_MAC, IP_REMOTE, NODE_IP, 8100, snat_port, len, padding,
        ));
        assert_eq!(verdict, TC_ACT_REDIRECT, "{len} bytes");
        let (seen, _) = inspect_sctp(&out);
        assert_eq!((seen.src, seen.sport), (NODE_IP, NODE_PORT), "{len} bytes");
        assert_eq!((seen.dst, seen.dport), (CLIENT, sport));
    }
}

#[test]
fn sctp_to_its_own_service_keeps_a_valid_crc32c() {
    let mut node = Node::new();
    node.service(100, SCTP, &[(IP_A, 8100, BackendState::Ready)], false);
    let (verdict, out) = node.sent_by_a(&sctp_frame(
        MAC_A, GW_A, IP_A, CLUSTER_IP, 40000, 100, 20, 0,
    ));
    assert_eq!(verdict, TC_ACT_REDIRECT, "back into A");
    let (seen, _) = inspect_sctp(&out);
    assert_eq!((seen.src, seen.dst, seen.dport), (CLUSTER_IP, IP_A, 8100));
    let port = seen.sport;
    let (verdict, out) = node.sent_by_a(&sctp_frame(
        MAC_A, GW_A, IP_A, CLUSTER_IP, 8100, port, 20, 0,
    ));
    assert_eq!(verdict, TC_ACT_REDIRECT, "the reply goes back into A");
    let (seen, _) = inspect_sctp(&out);
    assert_eq!((seen.src, seen.sport), (CLUSTER_IP, 100));
    assert_eq!((seen.dst, seen.dport), (IP_A, 40000));
}

#[test]
fn an_sctp_checksum_left_to_offload_stays_zero() {
    // A sender offloading the CRC (CHECKSUM_PARTIAL) leaves the field zero to be filled
    // in over the final packet; a delta there would make that wrong.
    let mut node = Node::new();
    node.service(100, SCTP, &[(IP_B, 8100, BackendState::Ready)], false);
    let mut f = sctp_frame(MAC_A, GW_A, IP_A, CLUSTER_IP, 40000, 100, 16, 0);
    f[14 + 20 + 8..14 + 20 + 12].fill(0);
    let (verdict, out) = node.sent_by_a(&f);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (seen, field) = inspect_sctp(&out);
    assert_eq!((seen.dst, seen.dport), (IP_B, 8100));
    assert_eq!(field, [0; 4]);
}

/// Ages the conntrack entry of UDP `src:sport → dst:dport` past the default UDP timeouts.
fn age_udp_flow(node: &mut Node, src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) {
    let key = CtKey::new(src.into(), dst.into(), sport.to_be(), dport.to_be(), UDP);
    let mut e = node
        .maps
        .conntrack
        .get(&key, 0)
        .expect("the flow has an entry");
    let idle = u64::from(CtTimeouts::DEFAULT.udp_stream_s + 1) * 1_000_000_000;
    e.set_last_seen_ns(monotonic_ns() - idle);
    node.maps.conntrack.insert(key, e, 0).unwrap();
}

/// The backend's reply of a translated flow whose entry expired is not delivered (it would
/// reach the client from the backend's address); the client's next packet is a new flow,
/// translated again, and its replies come from the frontend again.
#[test]
fn the_reply_of_an_expired_translated_flow_is_dropped_not_delivered_untranslated() {
    let mut node = Node::new();
    node.service(53, UDP, &[(IP_B, 5353, BackendState::Ready)], false);
    let request = frame(MAC_A, GW_A, IP_A, CLUSTER_IP, UDP, 41000, 53, false);
    let reply = frame(MAC_B, GW_B, IP_B, IP_A, UDP, 5353, 41000, false);
    assert_eq!(node.sent_by_a(&request).0, TC_ACT_REDIRECT);
    assert_eq!(node.sent_by_b(&reply).0, TC_ACT_REDIRECT);
    age_udp_flow(&mut node, IP_A, IP_B, 41000, 5353);
    assert_eq!(node.sent_by_b(&reply).0, TC_ACT_SHOT);
    assert_eq!(node.drops(DropReason::ServiceNatLost), 1);

    let (verdict, out) = node.sent_by_a(&request);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(inspect(&out).dst, IP_B);
    let (verdict, out) = node.sent_by_b(&reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!((inspect(&out).src, inspect(&out).sport), (CLUSTER_IP, 53));
}

/// The sweep deletes an expired translated flow's conntrack entry and leaves its
/// translations to `SERVICE_NAT`'s LRU: a late reply is recognised by them and dropped, not
/// delivered from the backend's address; the client's next packet opens the flow again.
#[test]
fn a_late_reply_of_a_swept_translated_flow_is_dropped_not_delivered_untranslated() {
    let mut node = Node::new();
    node.service(53, UDP, &[(IP_B, 5353, BackendState::Ready)], false);
    let request = frame(MAC_A, GW_A, IP_A, CLUSTER_IP, UDP, 41000, 53, false);
    let reply = frame(MAC_B, GW_B, IP_B, IP_A, UDP, 5353, 41000, false);
    assert_eq!(node.sent_by_a(&request).0, TC_ACT_REDIRECT);
    assert_eq!(node.sent_by_b(&reply).0, TC_ACT_REDIRECT);
    age_udp_flow(&mut node, IP_A, IP_B, 41000, 5353);
    let sweep = node.maps.sweep_conntrack(monotonic_ns(), 10).unwrap();
    assert_eq!((sweep.removed, sweep.entries), (1, 0));
    assert_eq!(node.maps.conntrack.keys().count(), 0);
    assert_eq!(node.sent_by_b(&reply).0, TC_ACT_SHOT);
    assert_eq!(node.drops(DropReason::ServiceNatLost), 1);

    assert_eq!(node.sent_by_a(&request).0, TC_ACT_REDIRECT);
    let (verdict, out) = node.sent_by_b(&reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!((inspect(&out).src, inspect(&out).sport), (CLUSTER_IP, 53));
}

// IPv6: the same translation over the IPv6 header, which has no checksum of its own.

/// [`frame`] over IPv6.
#[expect(clippy::too_many_arguments, reason = "one argument per header field")]
fn frame6(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    proto: u8,
    sport: u16,
    dport: u16,
    syn: bool,
) -> Vec<u8> {
    let ip = PacketBuilder::ethernet2(src_mac, dst_mac).ipv6(src.octets(), dst.octets(), 64);
    transport(ip, proto, sport, dport, syn)
}

/// [`inspect`] of an IPv6 frame (which has no header checksum).
fn inspect6(out: &[u8]) -> Seen<Ipv6Addr> {
    let p = SlicedPacket::from_ethernet(out).expect("a parsable frame");
    let Some(etherparse::NetSlice::Ipv6(ip)) = &p.net else {
        panic!("not IPv6");
    };
    let header = ip.header().to_header();
    let (sport, dport) = checked_ports(
        &p,
        ip.payload().payload,
        |t| t.to_header().calc_checksum_ipv6(&header, t.payload()),
        |u| u.to_header().calc_checksum_ipv6(&header, u.payload()),
    );
    Seen {
        src: header.source.into(),
        dst: header.destination.into(),
        sport,
        dport,
        dst_mac: out[0..6].try_into().unwrap(),
    }
}

#[test]
fn ipv6_pod_to_cluster_ip_is_translated_both_ways_with_valid_checksums() {
    let mut node = Node::new();
    for (proto, port) in [(TCP, 80), (UDP, 53), (SCTP, 100)] {
        node.frontend_at(
            FrontendKind::ClusterIp,
            CLUSTER_IP6.into(),
            port,
            proto,
            &[(IP6_B.into(), 8000 + port, BackendState::Ready)],
            false,
        );
        let (verdict, out) = node.sent_by_a(&frame6(
            MAC_A,
            GW_A,
            IP6_A,
            CLUSTER_IP6,
            proto,
            40000,
            port,
            true,
        ));
        assert_eq!(verdict, TC_ACT_REDIRECT, "protocol {proto}");
        let seen = inspect6(&out);
        assert_eq!((seen.src, seen.sport), (IP6_A, 40000));
        assert_eq!(
            (seen.dst, seen.dport),
            (IP6_B, 8000 + port),
            "protocol {proto}"
        );
        assert_eq!(seen.dst_mac, MAC_B);

        let reply = frame6(MAC_B, GW_B, IP6_B, IP6_A, proto, 8000 + port, 40000, false);
        let (verdict, out) = node.sent_by_b(&reply);
        assert_eq!(verdict, TC_ACT_REDIRECT, "protocol {proto}");
        let seen = inspect6(&out);
        assert_eq!(
            (seen.src, seen.sport),
            (CLUSTER_IP6, port),
            "the reply from the frontend, protocol {proto}"
        );
        assert_eq!((seen.dst, seen.dport), (IP6_A, 40000));
        assert_eq!(seen.dst_mac, MAC_A);
    }
}

#[test]
fn an_ipv6_service_without_backends_refuses_with_a_reset_and_an_icmpv6_port_unreachable() {
    let mut node = Node::new();
    for (proto, port) in [(TCP, 80), (UDP, 53)] {
        node.frontend_at(
            FrontendKind::ClusterIp,
            CLUSTER_IP6.into(),
            port,
            proto,
            &[],
            false,
        );
    }
    let syn = frame6(MAC_A, GW_A, IP6_A, CLUSTER_IP6, TCP, 40000, 80, true);
    let (verdict, out) = node.sent_by_a(&syn);
    assert_eq!(verdict, TC_ACT_REDIRECT, "answered straight back");
    let seen = inspect6(&out);
    assert_eq!((seen.src, seen.sport), (CLUSTER_IP6, 80));
    assert_eq!((seen.dst, seen.dport), (IP6_A, 40000));
    assert_eq!(seen.dst_mac, MAC_A);
    let p = SlicedPacket::from_ethernet(&out).unwrap();
    let Some(TransportSlice::Tcp(t)) = p.transport else {
        panic!("not TCP");
    };
    assert!(t.rst() && t.ack() && !t.syn(), "RST+ACK");
    assert_eq!(t.acknowledgment_number(), 1005, "acknowledges SYN and data");

    let datagram = frame6(MAC_A, GW_A, IP6_A, CLUSTER_IP6, UDP, 40001, 53, false);
    let (verdict, out) = node.sent_by_a(&datagram);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out[0..6], MAC_A);
    let p = SlicedPacket::from_ethernet(&out).expect("a parsable frame");
    let Some(etherparse::NetSlice::Ipv6(ip)) = &p.net else {
        panic!("not IPv6");
    };
    let header = ip.header().to_header();
    assert_eq!(
        (
            Ipv6Addr::from(header.source),
            Ipv6Addr::from(header.destination)
        ),
        (CLUSTER_IP6, IP6_A)
    );
    let Some(TransportSlice::Icmpv6(icmp)) = &p.transport else {
        panic!("not ICMPv6: {:?}", p.transport);
    };
    assert_eq!((icmp.type_u8(), icmp.code_u8()), (1, 4), "port unreachable");
    let expect = icmp
        .icmp_type()
        .calc_checksum(header.source, header.destination, icmp.payload())
        .unwrap();
    assert_eq!(icmp.checksum(), expect, "ICMPv6 checksum");
    assert_eq!(
        icmp.payload(),
        &datagram[14..14 + 48],
        "quotes the header and 8 bytes"
    );
    assert_eq!(node.drops(DropReason::NoBackend), 2);
}

#[test]
fn the_node_ports_of_a_dual_stack_service_each_keep_to_their_family() {
    let mut node = Node::new();
    let ready = BackendState::Ready;
    node.frontend_at(
        FrontendKind::NodePort,
        Ipv4Addr::UNSPECIFIED.into(),
        NODE_PORT,
        TCP,
        &[(IP_B.into(), 8080, ready)],
        false,
    );
    node.frontend_at(
        FrontendKind::NodePort,
        Ipv6Addr::UNSPECIFIED.into(),
        NODE_PORT,
        TCP,
        &[(IP6_B.into(), 8080, ready)],
        false,
    );
    let syn = frame(
        CLIENT_MAC, UPLINK_MAC, CLIENT, NODE_IP, TCP, 40000, NODE_PORT, true,
    );
    let (verdict, out) = node.arrived(&syn);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let seen = inspect(&out);
    assert_eq!((seen.dst, seen.dport), (IP_B, 8080), "IPv4 to IPv4");

    let syn6 = frame6(
        CLIENT_MAC, UPLINK_MAC, CLIENT6, NODE_IP6, TCP, 40000, NODE_PORT, true,
    );
    let (verdict, out) = node.arrived(&syn6);
    assert_eq!(verdict, TC_ACT_REDIRECT, "straight into the backend");
    let seen = inspect6(&out);
    assert_eq!((seen.src, seen.sport), (CLIENT6, 40000), "client kept");
    assert_eq!((seen.dst, seen.dport), (IP6_B, 8080), "IPv6 to IPv6");
    assert_eq!(seen.dst_mac, MAC_B);

    let reply = frame6(MAC_B, GW_B, IP6_B, CLIENT6, TCP, 8080, 40000, false);
    let (verdict, out) = node.sent_by_b(&reply);
    assert_eq!(verdict, TC_ACT_REDIRECT, "out of the uplink");
    let seen = inspect6(&out);
    assert_eq!(
        (seen.src, seen.sport),
        (NODE_IP6, NODE_PORT),
        "from the node's port"
    );
    assert_eq!((seen.dst, seen.dport), (CLIENT6, 40000));
}
