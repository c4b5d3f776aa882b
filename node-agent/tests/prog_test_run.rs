//! The TC programs on synthetic packets through the real kernel (`BPF_PROG_TEST_RUN`):
//! each test builds packets, sets up maps, and checks the verdict and the output packet.

mod support;

use support::{
    GW_A, GW_B, IP_A, IP_B, IP6_A, IP6_B, MAC_A, MAC_B, NODE_IP, TC_ACT_OK, TC_ACT_REDIRECT,
    TC_ACT_SHOT, UPLINK_MAC,
};

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use support::packet::{self, TCP_ACK, TCP_FIN, TCP_SYN};
use weir_agent::{
    dataplane::Dataplane,
    maps::{DataplaneMaps, monotonic_ns},
};
use weir_api::{Action, PortPrefix, VerdictEntry, VerdictMatch};
use weir_common::{
    config::{CtTimeouts, NodeConfig},
    conntrack::{CtEntry, CtKey},
    endpoint::EndpointInfo,
    event::DropReason,
    ip::IpKey,
    programs::{FROM_NETWORK, FROM_POD, FROM_TUNNEL, TO_POD, TO_TUNNEL},
    route::RouteEntry,
    {TUNNEL_MAC, TUNNEL_SOURCE_MAC, capacity},
};

const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// Two pods on this node: A behind interface `veth_a`, B behind `veth_b`.
struct Node {
    dp: Dataplane,
    maps: DataplaneMaps,
    veth_a: u32,
    veth_b: u32,
}

impl Node {
    fn new() -> Self {
        support::private_netns();
        let veth_a = support::dummy_interface("veth-a");
        let veth_b = support::dummy_interface("veth-b");
        let mut dp = Dataplane::load(None).expect("loading the programs");
        let mut maps = DataplaneMaps::take(&mut dp).expect("maps");
        maps.set_config(NodeConfig::new(1, 0, 0)).unwrap();
        let mut node = Node {
            dp,
            maps,
            veth_a,
            veth_b,
        };
        node.set_endpoints(0, 0, 0, 0);
        node.maps.sync_host_addrs(&[NODE_IP.into()]).unwrap();
        node
    }

    /// (Re)writes both endpoints, each with an IPv4 and an IPv6 address, with the given rule
    /// sets (0: not isolated).
    fn set_endpoints(&mut self, a_in: u32, a_out: u32, b_in: u32, b_out: u32) {
        let a = EndpointInfo::new(self.veth_a, MAC_A, GW_A).with_policies(a_in, a_out);
        let b = EndpointInfo::new(self.veth_b, MAC_B, GW_B).with_policies(b_in, b_out);
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

    fn classify(&mut self, net: &str, class: u32) {
        let net: IpNet = net.parse().unwrap();
        self.maps.set_peer_class(&net, class).unwrap();
    }

    fn allow(
        &mut self,
        rule_set: u32,
        class: u32,
        proto: Option<u8>,
        ports: Option<PortPrefix>,
        rule: u32,
    ) {
        let m = VerdictMatch {
            rule_set,
            class,
            proto,
            ports,
        };
        let v = VerdictEntry {
            action: Action::Allow,
            rule,
        };
        self.maps.set_verdict(&m, &v).unwrap();
    }

    /// Runs `program` on `frame` as if it arrived on `ifindex`.
    fn run(&mut self, program: &'static str, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        support::test_run(&mut self.dp, program, ifindex, frame)
    }

    fn sent_by_a(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let ifindex = self.veth_a;
        self.run(FROM_POD, ifindex, frame)
    }

    fn sent_by_b(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let ifindex = self.veth_b;
        self.run(FROM_POD, ifindex, frame)
    }

    fn drops(&self, reason: DropReason) -> u64 {
        self.maps
            .drop_counts()
            .into_iter()
            .find(|(r, _)| *r == reason)
            .map(|(_, n)| n)
            .unwrap()
    }
}

fn syn_a_to_b(sport: u16, dport: u16) -> Vec<u8> {
    packet::tcp(MAC_A, GW_A, IP_A, IP_B, sport, dport, TCP_SYN)
}

#[test]
fn pod_to_local_pod_is_redirected_to_the_peer_with_rewritten_macs() {
    let mut node = Node::new();
    let (verdict, out) = node.sent_by_a(&syn_a_to_b(40000, 80));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(packet::dst_mac(&out), MAC_B, "delivered to B's MAC");
    assert_eq!(packet::src_mac(&out), GW_B, "from B's gateway MAC");
}

#[test]
fn pod_to_host_goes_up_the_stack_untouched() {
    let mut node = Node::new();
    let frame = packet::tcp(MAC_A, GW_A, IP_A, NODE_IP, 40000, 10250, TCP_SYN);
    let (verdict, out) = node.sent_by_a(&frame);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, frame);
}

#[test]
fn spoofed_source_address_is_dropped() {
    let mut node = Node::new();
    let frame = packet::tcp(
        MAC_A,
        GW_A,
        Ipv4Addr::new(10, 244, 0, 99),
        IP_B,
        1,
        80,
        TCP_SYN,
    );
    assert_eq!(node.sent_by_a(&frame).0, TC_ACT_SHOT);
    // Another local pod's address, sent from A's interface.
    let frame = packet::tcp(MAC_A, GW_A, IP_B, IP_A, 1, 80, TCP_SYN);
    assert_eq!(node.sent_by_a(&frame).0, TC_ACT_SHOT);
    assert_eq!(node.drops(DropReason::Spoofed), 2);
}

#[test]
fn spoofed_source_mac_is_dropped() {
    let mut node = Node::new();
    let frame = packet::tcp([0x02, 9, 9, 9, 9, 9], GW_A, IP_A, IP_B, 1, 80, TCP_SYN);
    assert_eq!(node.sent_by_a(&frame).0, TC_ACT_SHOT);
    assert_eq!(node.drops(DropReason::Spoofed), 1);
}

#[test]
fn non_ip_frames_from_a_pod_are_dropped_and_counted() {
    let mut node = Node::new();
    let mut lldp = packet::eth(MAC_A, [0x01, 0x80, 0xc2, 0, 0, 0x0e], 0x88cc);
    lldp.extend_from_slice(&[0u8; 46]);
    assert_eq!(node.sent_by_a(&lldp).0, TC_ACT_SHOT);
    assert_eq!(node.drops(DropReason::UnsupportedL3), 1);
}

#[test]
fn ip_header_longer_than_the_packet_is_dropped_as_malformed() {
    let mut node = Node::new();
    let mut frame = syn_a_to_b(40000, 80);
    // Claim a 60-byte IP header: the TCP ports would lie beyond the end of the frame.
    frame[14] = 0x4f;
    frame.truncate(14 + 40);
    assert_eq!(node.sent_by_a(&frame).0, TC_ACT_SHOT);
    assert_eq!(node.drops(DropReason::Malformed), 1);
}

#[test]
fn arp_request_for_the_gateway_is_answered_with_the_host_veth_mac() {
    let mut node = Node::new();
    let (verdict, out) = node.sent_by_a(&packet::arp_request(MAC_A, IP_A, GATEWAY));
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back out of the same veth");
    assert_eq!(packet::dst_mac(&out), MAC_A);
    assert_eq!(packet::src_mac(&out), GW_A);
    let arp = &out[14..];
    assert_eq!(&arp[6..8], &[0, 2], "an ARP reply");
    assert_eq!(&arp[8..14], &GW_A, "sender MAC is the gateway's");
    assert_eq!(
        &arp[14..18],
        &GATEWAY.octets(),
        "for the address asked about"
    );
    assert_eq!(&arp[18..24], &MAC_A);
    assert_eq!(&arp[24..28], &IP_A.octets());
}

#[test]
fn arp_from_a_spoofed_sender_is_dropped() {
    let mut node = Node::new();
    let (verdict, _) = node.sent_by_a(&packet::arp_request(MAC_A, IP_B, GATEWAY));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(node.drops(DropReason::Spoofed), 1);
}

#[test]
fn ingress_policy_allows_only_the_listed_port_and_peer() {
    let mut node = Node::new();
    // B is isolated for ingress by rule set 7, which allows class 3 on TCP/80 (rule 70).
    node.set_endpoints(0, 0, 7, 0);
    node.classify("10.244.0.10/32", 3);
    node.allow(7, 3, Some(packet::TCP), PortPrefix::new(80, 16), 70);
    assert_eq!(node.sent_by_a(&syn_a_to_b(40000, 80)).0, TC_ACT_REDIRECT);
    assert_eq!(node.sent_by_a(&syn_a_to_b(40001, 81)).0, TC_ACT_SHOT);
    assert_eq!(node.drops(DropReason::PolicyIngress), 1);
    // UDP/80 is not TCP/80.
    let udp = packet::ipv4(MAC_A, GW_A, IP_A, IP_B, packet::UDP, 40002, 80, 0);
    assert_eq!(node.sent_by_a(&udp).0, TC_ACT_SHOT);
    let hits = DataplaneMaps::counter_totals(&node.maps.rule_hits, [70]);
    assert_eq!(hits.get(&70), Some(&1), "the allowing rule is counted");
    let by_policy = DataplaneMaps::counter_totals(&node.maps.policy_drops, [7]);
    assert_eq!(
        by_policy.get(&7),
        Some(&2),
        "drops counted against rule set 7"
    );

    // The controller gives ids 70 and 7 new meanings: their counters start again from zero.
    let policy = weir_api::PolicyRef::new("NetworkPolicy", "default", "other");
    let mut diff = weir_api::NodeStateDiff::default();
    diff.rules.upsert.push((
        70,
        weir_api::RuleRef {
            policy: policy.clone(),
            direction: weir_api::Direction::Ingress,
            index: 0,
            tiered: None,
        },
    ));
    diff.rule_sets.upsert.push((
        7,
        weir_api::RuleSetInfo {
            direction: weir_api::Direction::Ingress,
            policies: vec![policy],
        },
    ));
    node.maps.apply_policy_diff(&diff).unwrap();
    let hits = DataplaneMaps::counter_totals(&node.maps.rule_hits, [70]);
    assert_eq!(hits.get(&70), Some(&0), "rule 70 restarts from zero");
    let by_policy = DataplaneMaps::counter_totals(&node.maps.policy_drops, [7]);
    assert_eq!(by_policy.get(&7), Some(&0), "rule set 7 restarts from zero");
}

#[test]
fn a_snapshot_keeps_the_counts_of_rules_that_mean_the_same_and_zeroes_the_others() {
    let mut node = Node::new();
    node.set_endpoints(0, 0, 7, 0);
    node.classify("10.244.0.10/32", 3);
    node.allow(7, 3, Some(packet::TCP), PortPrefix::new(80, 16), 70);
    node.allow(7, 3, Some(packet::TCP), PortPrefix::new(81, 16), 71);
    assert_eq!(node.sent_by_a(&syn_a_to_b(40000, 80)).0, TC_ACT_REDIRECT);
    assert_eq!(node.sent_by_a(&syn_a_to_b(40001, 81)).0, TC_ACT_REDIRECT);
    let rule = |name: &str| weir_api::RuleRef {
        policy: weir_api::PolicyRef::new("NetworkPolicy", "default", name),
        direction: weir_api::Direction::Ingress,
        index: 0,
        tiered: None,
    };
    let mut before = weir_api::NodeState::default();
    before.rules.insert(70, rule("web"));
    before.rules.insert(71, rule("api"));
    // A new controller's snapshot: 70 still means "web", 71 now means something else.
    let mut after = weir_api::NodeState::default();
    after.rules.insert(70, rule("web"));
    after.rules.insert(71, rule("db"));
    node.maps.sync_policy(&after, &before).unwrap();
    let hits = DataplaneMaps::counter_totals(&node.maps.rule_hits, [70, 71]);
    assert_eq!(hits[&70], 1, "same rule, count kept");
    assert_eq!(hits[&71], 0, "another rule under the id, count zeroed");
    // After an agent start nothing says what pinned counts meant.
    node.maps
        .sync_policy(&after, &weir_api::NodeState::default())
        .unwrap();
    let hits = DataplaneMaps::counter_totals(&node.maps.rule_hits, [70]);
    assert_eq!(hits[&70], 0);
}

#[test]
fn port_range_prefix_covers_exactly_its_block() {
    let mut node = Node::new();
    node.set_endpoints(0, 0, 7, 0);
    node.classify("10.244.0.0/24", 3);
    // 8080-8087 as one /13 port prefix.
    node.allow(7, 3, Some(packet::TCP), PortPrefix::new(8080, 13), 1);
    for (port, expect) in [
        (8079, TC_ACT_SHOT),
        (8080, TC_ACT_REDIRECT),
        (8087, TC_ACT_REDIRECT),
        (8088, TC_ACT_SHOT),
    ] {
        assert_eq!(
            node.sent_by_a(&syn_a_to_b(30000 + port, port)).0,
            expect,
            "port {port}"
        );
    }
}

#[test]
fn a_single_port_entry_beats_a_whole_protocol_entry() {
    let mut node = Node::new();
    node.set_endpoints(0, 0, 7, 0);
    node.classify("10.244.0.10/32", 3);
    node.allow(7, 3, Some(packet::TCP), None, 1);
    // A more specific deny for TCP/80 (as a tiered policy would compile to).
    let m = VerdictMatch {
        rule_set: 7,
        class: 3,
        proto: Some(packet::TCP),
        ports: PortPrefix::new(80, 16),
    };
    node.maps
        .set_verdict(
            &m,
            &VerdictEntry {
                action: Action::Deny,
                rule: 2,
            },
        )
        .unwrap();
    assert_eq!(node.sent_by_a(&syn_a_to_b(40000, 80)).0, TC_ACT_SHOT);
    assert_eq!(node.sent_by_a(&syn_a_to_b(40001, 81)).0, TC_ACT_REDIRECT);
    // A prefix-wide class for the rest of the pod CIDR, overridden by the pod's own entry.
    node.classify("10.244.0.0/24", 4);
    assert_eq!(
        node.sent_by_a(&syn_a_to_b(40002, 81)).0,
        TC_ACT_REDIRECT,
        "A is still class 3"
    );
}

#[test]
fn a_drop_by_a_deny_rule_is_counted_by_that_rule_and_a_default_deny_by_the_rule_set() {
    let mut node = Node::new();
    node.set_endpoints(0, 0, 7, 0);
    node.classify("10.244.0.10/32", 3);
    // A ClusterNetworkPolicy Deny rule (id 2) for TCP/80; nothing allows TCP/81.
    let m = VerdictMatch {
        rule_set: 7,
        class: 3,
        proto: Some(packet::TCP),
        ports: PortPrefix::new(80, 16),
    };
    node.maps
        .set_verdict(
            &m,
            &VerdictEntry {
                action: Action::Deny,
                rule: 2,
            },
        )
        .unwrap();
    assert_eq!(node.sent_by_a(&syn_a_to_b(40000, 80)).0, TC_ACT_SHOT);
    assert_eq!(node.sent_by_a(&syn_a_to_b(40001, 80)).0, TC_ACT_SHOT);
    assert_eq!(node.sent_by_a(&syn_a_to_b(40002, 81)).0, TC_ACT_SHOT);
    assert_eq!(node.drops(DropReason::PolicyIngress), 3);
    let by_rule = DataplaneMaps::counter_totals(&node.maps.rule_hits, [2]);
    assert_eq!(by_rule.get(&2), Some(&2), "the Deny rule's drops");
    let by_set = DataplaneMaps::counter_totals(&node.maps.policy_drops, [7]);
    assert_eq!(
        by_set.get(&7),
        Some(&1),
        "only the drop no rule decided is counted against the rule set"
    );
}

#[test]
fn portless_rule_allows_every_protocol_including_icmp() {
    let mut node = Node::new();
    node.set_endpoints(0, 0, 7, 0);
    node.allow(7, 0, None, None, 1);
    let icmp = packet::ipv4(MAC_A, GW_A, IP_A, IP_B, packet::ICMP, 77, 0, 0);
    assert_eq!(node.sent_by_a(&icmp).0, TC_ACT_REDIRECT);
    let sctp = packet::ipv4(MAC_A, GW_A, IP_A, IP_B, packet::SCTP, 5000, 80, 0);
    assert_eq!(node.sent_by_a(&sctp).0, TC_ACT_REDIRECT);
}

#[test]
fn egress_default_deny_blocks_new_flows_but_lets_replies_through() {
    let mut node = Node::new();
    // B opens a flow to A before A is isolated for egress.
    let syn = packet::tcp(MAC_B, GW_B, IP_B, IP_A, 5555, 80, TCP_SYN);
    assert_eq!(node.sent_by_b(&syn).0, TC_ACT_REDIRECT);
    // A becomes egress-isolated with nothing allowed (rule set 9 has no verdicts).
    node.set_endpoints(0, 9, 0, 0);
    // A's reply on the established flow passes (B → A was allowed when it started and an
    // egress rule does not cover replies).
    let reply = packet::tcp(MAC_A, GW_A, IP_A, IP_B, 80, 5555, TCP_SYN | TCP_ACK);
    assert_eq!(node.sent_by_a(&reply).0, TC_ACT_REDIRECT);
    // A new flow from A is denied.
    assert_eq!(node.sent_by_a(&syn_a_to_b(40000, 80)).0, TC_ACT_SHOT);
    assert_eq!(node.drops(DropReason::PolicyEgress), 1);
}

#[test]
fn a_policy_change_cuts_an_established_flow_it_no_longer_allows() {
    let mut node = Node::new();
    node.set_endpoints(0, 0, 7, 0);
    node.classify("10.244.0.10/32", 3);
    node.allow(7, 3, Some(packet::TCP), None, 1);
    assert_eq!(node.sent_by_a(&syn_a_to_b(40000, 80)).0, TC_ACT_REDIRECT);
    let ack = packet::tcp(MAC_A, GW_A, IP_A, IP_B, 40000, 80, TCP_ACK);
    assert_eq!(node.sent_by_a(&ack).0, TC_ACT_REDIRECT);
    // The allowing verdict is withdrawn; without a generation bump the flow would survive.
    node.maps.remove_verdict(&VerdictMatch {
        rule_set: 7,
        class: 3,
        proto: Some(packet::TCP),
        ports: None,
    });
    node.maps.bump_policy_generation().unwrap();
    assert_eq!(node.sent_by_a(&ack).0, TC_ACT_SHOT);
    assert_eq!(node.drops(DropReason::PolicyRevoked), 1);
    // And the reply direction of that flow is cut as well (the entry is gone).
    let reply = packet::tcp(MAC_B, GW_B, IP_B, IP_A, 80, 40000, TCP_ACK);
    assert_eq!(
        node.sent_by_b(&reply).0,
        TC_ACT_REDIRECT,
        "B is not egress-isolated: a new flow B→A"
    );
}

#[test]
fn traffic_from_the_node_reaches_an_isolated_pod() {
    let mut node = Node::new();
    node.set_endpoints(0, 0, 7, 0);
    let probe = packet::tcp([0xee; 6], MAC_B, NODE_IP, IP_B, 33000, 8080, TCP_SYN);
    let ifindex = node.veth_b;
    assert_eq!(node.run(TO_POD, ifindex, &probe).0, TC_ACT_OK);
    // From anywhere else the same packet is denied.
    let other = packet::tcp(
        [0xee; 6],
        MAC_B,
        Ipv4Addr::new(192, 168, 50, 3),
        IP_B,
        33000,
        8080,
        TCP_SYN,
    );
    assert_eq!(node.run(TO_POD, ifindex, &other).0, TC_ACT_SHOT);
}

/// A pod on another node, and that node.
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const REMOTE_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 3);
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

impl Node {
    /// Routes the other node's pod CIDR through `ifindex` in `mode`.
    fn route_remote(&mut self, mode: u8, ifindex: u32) {
        let routes = [(
            "10.244.1.0/24".parse::<IpNet>().unwrap(),
            RouteEntry::new(REMOTE_NODE.into(), mode, ifindex),
        )];
        self.maps
            .sync_routes(&routes.into_iter().collect())
            .unwrap();
    }

    fn arrived_on_uplink(&mut self, uplink: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run(FROM_NETWORK, uplink, frame)
    }
}

#[test]
fn traffic_from_another_node_is_delivered_to_the_local_pod_with_its_macs() {
    let mut node = Node::new();
    let uplink = support::dummy_interface("uplink");
    let frame = packet::tcp(ROUTER_MAC, UPLINK_MAC, REMOTE_POD, IP_B, 40000, 80, TCP_SYN);
    let (verdict, out) = node.arrived_on_uplink(uplink, &frame);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(packet::dst_mac(&out), MAC_B, "delivered to B's MAC");
    assert_eq!(packet::src_mac(&out), GW_B, "from B's gateway MAC");
}

#[test]
fn traffic_from_the_network_not_for_a_local_pod_is_the_hosts() {
    let mut node = Node::new();
    let uplink = support::dummy_interface("uplink");
    let frame = packet::tcp(
        ROUTER_MAC,
        UPLINK_MAC,
        REMOTE_NODE,
        NODE_IP,
        40000,
        22,
        TCP_SYN,
    );
    let (verdict, out) = node.arrived_on_uplink(uplink, &frame);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, frame, "untouched");
}

#[test]
fn a_local_pods_address_arriving_from_the_network_is_dropped_as_spoofed() {
    let mut node = Node::new();
    let uplink = support::dummy_interface("uplink");
    let frame = packet::tcp(ROUTER_MAC, UPLINK_MAC, IP_A, IP_B, 40000, 80, TCP_SYN);
    assert_eq!(node.arrived_on_uplink(uplink, &frame).0, TC_ACT_SHOT);
    assert_eq!(node.drops(DropReason::Spoofed), 1);
}

#[test]
fn ingress_policy_applies_to_traffic_from_other_nodes() {
    let mut node = Node::new();
    let uplink = support::dummy_interface("uplink");
    // B admits the other node's pod CIDR (class 3) on TCP/80 only.
    node.set_endpoints(0, 0, 7, 0);
    node.classify("10.244.1.0/24", 3);
    node.allow(7, 3, Some(packet::TCP), PortPrefix::new(80, 16), 70);
    let allowed = packet::tcp(ROUTER_MAC, UPLINK_MAC, REMOTE_POD, IP_B, 40000, 80, TCP_SYN);
    assert_eq!(node.arrived_on_uplink(uplink, &allowed).0, TC_ACT_REDIRECT);
    let denied = packet::tcp(ROUTER_MAC, UPLINK_MAC, REMOTE_POD, IP_B, 40001, 81, TCP_SYN);
    assert_eq!(node.arrived_on_uplink(uplink, &denied).0, TC_ACT_SHOT);
    assert_eq!(node.drops(DropReason::PolicyIngress), 1);
    // The admitted flow's later packets take the conntrack path, also after the first.
    let ack = packet::tcp(ROUTER_MAC, UPLINK_MAC, REMOTE_POD, IP_B, 40000, 80, TCP_ACK);
    assert_eq!(node.arrived_on_uplink(uplink, &ack).0, TC_ACT_REDIRECT);
}

#[test]
fn pod_traffic_to_another_nodes_pod_cidr_is_redirected_to_the_tunnel_or_the_uplink() {
    let mut node = Node::new();
    let tunnel = support::dummy_interface("tunnel");
    let uplink = support::dummy_interface("uplink");
    let frame = packet::tcp(MAC_A, GW_A, IP_A, REMOTE_POD, 40000, 80, TCP_SYN);
    // No node owns the address: up the host stack.
    assert_eq!(node.sent_by_a(&frame).0, TC_ACT_OK);
    node.route_remote(RouteEntry::MODE_VXLAN, tunnel);
    assert_eq!(node.sent_by_a(&frame).0, TC_ACT_REDIRECT);
    node.route_remote(RouteEntry::MODE_DIRECT, uplink);
    let frame = packet::tcp(MAC_A, GW_A, IP_A, REMOTE_POD, 40001, 80, TCP_SYN);
    assert_eq!(node.sent_by_a(&frame).0, TC_ACT_REDIRECT);
}

#[test]
fn the_tunnel_sends_to_the_node_owning_the_destination_with_the_shared_tunnel_macs() {
    let mut node = Node::new();
    let tunnel = support::dummy_interface("tunnel");
    let frame = packet::tcp(MAC_A, GW_A, IP_A, REMOTE_POD, 40000, 80, TCP_SYN);
    // Nobody owns the destination: dropped, counted.
    assert_eq!(node.run(TO_TUNNEL, tunnel, &frame).0, TC_ACT_SHOT);
    assert_eq!(node.drops(DropReason::NoRoute), 1);
    node.route_remote(RouteEntry::MODE_VXLAN, tunnel);
    let (verdict, out) = node.run(TO_TUNNEL, tunnel, &frame);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(packet::dst_mac(&out), TUNNEL_MAC);
    assert_eq!(packet::src_mac(&out), TUNNEL_SOURCE_MAC);
}

#[test]
fn icmp_errors_about_an_admitted_flow_reach_an_isolated_pod() {
    let mut node = Node::new();
    let uplink = support::dummy_interface("uplink");
    let tunnel = support::dummy_interface("tunnel");
    node.route_remote(RouteEntry::MODE_VXLAN, tunnel);
    // A admits nothing in (rule set 9 has no verdicts) but may send anywhere.
    node.set_endpoints(9, 0, 0, 0);
    let to_b = packet::ipv4(MAC_A, GW_A, IP_A, IP_B, packet::UDP, 5353, 53, 0);
    assert_eq!(node.sent_by_a(&to_b).0, TC_ACT_REDIRECT);
    let to_remote = packet::tcp(MAC_A, GW_A, IP_A, REMOTE_POD, 40000, 443, TCP_SYN);
    assert_eq!(node.sent_by_a(&to_remote).0, TC_ACT_REDIRECT);

    // B answers "port unreachable": it concerns A's flow, so it reaches A.
    let unreachable = packet::icmp_error(MAC_B, GW_B, IP_B, IP_A, 3, 3, &to_b);
    assert_eq!(node.sent_by_b(&unreachable).0, TC_ACT_REDIRECT);
    // A router on the way to the other node needs smaller packets: the same.
    let router = Ipv4Addr::new(192, 168, 60, 1);
    let frag_needed = packet::icmp_error(ROUTER_MAC, UPLINK_MAC, router, IP_A, 3, 4, &to_remote);
    let (verdict, out) = node.arrived_on_uplink(uplink, &frag_needed);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(packet::dst_mac(&out), MAC_A);

    // An error about a flow nobody opened is judged as what it is: A admits no ICMP.
    let other = packet::tcp(MAC_A, GW_A, IP_A, REMOTE_POD, 40001, 443, TCP_SYN);
    let stray = packet::icmp_error(ROUTER_MAC, UPLINK_MAC, router, IP_A, 3, 4, &other);
    assert_eq!(node.arrived_on_uplink(uplink, &stray).0, TC_ACT_SHOT);
    // Nor does quoting A's flow help an error addressed to someone else.
    let misaddressed = packet::icmp_error(MAC_A, GW_A, IP_A, IP_B, 3, 3, &to_b);
    node.set_endpoints(9, 0, 9, 0);
    assert_eq!(node.sent_by_a(&misaddressed).0, TC_ACT_SHOT);
    assert_eq!(node.drops(DropReason::PolicyIngress), 2);
}

#[test]
fn traffic_from_the_network_claiming_the_nodes_address_is_dropped_as_spoofed() {
    let mut node = Node::new();
    let uplink = support::dummy_interface("uplink");
    // B admits nothing in: only the node itself may reach it.
    node.set_endpoints(0, 0, 9, 0);
    let forged = packet::tcp(ROUTER_MAC, UPLINK_MAC, NODE_IP, IP_B, 33000, 8080, TCP_SYN);
    assert_eq!(node.arrived_on_uplink(uplink, &forged).0, TC_ACT_SHOT);
    assert_eq!(node.drops(DropReason::Spoofed), 1);
    // The same packet from the host stack passes.
    let ifindex = node.veth_b;
    assert_eq!(node.run(TO_POD, ifindex, &forged).0, TC_ACT_OK);
    // Once the host opened that flow, a forged packet of it from the network still is not
    // taken for one of its packets.
    let ack = packet::tcp(ROUTER_MAC, UPLINK_MAC, NODE_IP, IP_B, 33000, 8080, TCP_ACK);
    assert_eq!(node.arrived_on_uplink(uplink, &ack).0, TC_ACT_SHOT);
    assert_eq!(node.drops(DropReason::Spoofed), 2);
}

#[test]
fn packets_to_the_host_claiming_a_local_address_are_dropped_as_spoofed() {
    let mut node = Node::new();
    let uplink = support::dummy_interface("uplink");
    let as_pod = packet::tcp(ROUTER_MAC, UPLINK_MAC, IP_A, NODE_IP, 40000, 22, TCP_SYN);
    assert_eq!(node.arrived_on_uplink(uplink, &as_pod).0, TC_ACT_SHOT);
    let as_node = packet::tcp(ROUTER_MAC, UPLINK_MAC, NODE_IP, NODE_IP, 40000, 22, TCP_SYN);
    assert_eq!(node.arrived_on_uplink(uplink, &as_node).0, TC_ACT_SHOT);
    assert_eq!(node.drops(DropReason::Spoofed), 2);
}

#[test]
fn the_tunnel_drops_packets_from_senders_that_are_not_nodes() {
    let mut node = Node::new();
    let tunnel = support::dummy_interface("tunnel");
    node.route_remote(RouteEntry::MODE_VXLAN, tunnel);
    // A packet the uplink would deliver to B (not isolated)...
    let frame = packet::tcp(
        TUNNEL_SOURCE_MAC,
        TUNNEL_MAC,
        REMOTE_POD,
        IP_B,
        40000,
        80,
        TCP_SYN,
    );
    let uplink = support::dummy_interface("uplink");
    assert_eq!(node.arrived_on_uplink(uplink, &frame).0, TC_ACT_REDIRECT);
    // ...is dropped by the tunnel when nothing says a known node sent it (a test run has no
    // tunnel metadata, as if the sender were nobody the node knows).
    let other = packet::tcp(
        TUNNEL_SOURCE_MAC,
        TUNNEL_MAC,
        REMOTE_POD,
        IP_B,
        40001,
        80,
        TCP_SYN,
    );
    assert_eq!(node.run(FROM_TUNNEL, tunnel, &other).0, TC_ACT_SHOT);
    assert_eq!(node.drops(DropReason::UnknownTunnelPeer), 1);
}

#[test]
fn more_node_addresses_than_the_map_holds_are_left_out_and_counted() {
    let mut node = Node::new();
    node.set_endpoints(0, 0, 9, 0);
    let extra = 10;
    // The node's own address first, then as many ClusterIP-like addresses as would overflow.
    let mut addrs: Vec<std::net::IpAddr> = vec![NODE_IP.into()];
    addrs.extend(
        (0..capacity::HOST_ADDRS - 1 + extra)
            .map(|i| std::net::IpAddr::from(Ipv4Addr::from(0x0a60_0000 + i))),
    );
    let last = *addrs.last().unwrap();
    let left_out = node
        .maps
        .sync_host_addrs(&addrs)
        .expect("overflow is not an error");
    assert_eq!(left_out, extra as usize);
    let ifindex = node.veth_b;
    let probe = packet::tcp([0xee; 6], MAC_B, NODE_IP, IP_B, 33000, 8080, TCP_SYN);
    assert_eq!(
        node.run(TO_POD, ifindex, &probe).0,
        TC_ACT_OK,
        "the first addresses keep the exemption"
    );
    let std::net::IpAddr::V4(last) = last else {
        unreachable!()
    };
    let from_last = packet::tcp([0xee; 6], MAC_B, last, IP_B, 33001, 8080, TCP_SYN);
    assert_eq!(
        node.run(TO_POD, ifindex, &from_last).0,
        TC_ACT_SHOT,
        "an address left out gets policy like any peer"
    );
    // A refresh with fewer addresses makes room again.
    let left_out = node.maps.sync_host_addrs(&addrs[..100]).unwrap();
    assert_eq!(left_out, 0);
}

const SECOND: u64 = 1_000_000_000;

/// Established 100 s, closing 2 s, half-open 3 s, UDP 4 s, UDP stream 5 s, ICMP 6 s,
/// other 7 s.
const SHORT: CtTimeouts = CtTimeouts::new(100, 2, 3, 4, 5, 6, 7);

impl Node {
    fn set_ct_timeouts(&mut self, t: CtTimeouts) {
        let c = self.maps.config().unwrap().with_ct_timeouts(t);
        self.maps.set_config(c).unwrap();
    }

    fn ct_entry(&self, key: &CtKey) -> Option<CtEntry> {
        self.maps.conntrack.get(key, 0).ok()
    }

    /// Makes the entry of `key` look idle for `idle_s` seconds.
    fn age(&mut self, key: &CtKey, idle_s: u64) {
        let mut e = self.ct_entry(key).expect("the flow has an entry");
        e.set_last_seen_ns(monotonic_ns() - idle_s * SECOND);
        self.maps.conntrack.insert(key, e, 0).unwrap();
    }
}

fn ct_key(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, proto: u8) -> CtKey {
    CtKey::new(src.into(), dst.into(), sport.to_be(), dport.to_be(), proto)
}

/// B opens a UDP flow to A, which is then isolated for egress with nothing allowed: A's
/// replies pass while the flow is fresh, and are decided as A's own new flow once it has
/// been idle for longer than the UDP timeout.
#[test]
fn the_reply_direction_of_an_expired_flow_is_decided_as_a_new_flow() {
    let mut node = Node::new();
    node.set_ct_timeouts(SHORT);
    let request = packet::ipv4(MAC_B, GW_B, IP_B, IP_A, packet::UDP, 5353, 53, 0);
    let reply = packet::ipv4(MAC_A, GW_A, IP_A, IP_B, packet::UDP, 53, 5353, 0);
    assert_eq!(node.sent_by_b(&request).0, TC_ACT_REDIRECT);
    node.set_endpoints(0, 9, 0, 0);
    assert_eq!(node.sent_by_a(&reply).0, TC_ACT_REDIRECT, "fresh: a reply");
    let flow = ct_key(IP_B, IP_A, 5353, 53, packet::UDP);
    // Replied: the stream timeout (5 s) applies, not the unreplied one (4 s).
    node.age(&flow, 4);
    assert_eq!(node.sent_by_a(&reply).0, TC_ACT_REDIRECT, "idle 4 s of 5");
    node.age(&flow, 6);
    assert_eq!(node.sent_by_a(&reply).0, TC_ACT_SHOT, "idle 6 s of 5");
    assert_eq!(node.drops(DropReason::PolicyEgress), 1);
    assert!(node.ct_entry(&flow).is_none(), "the expired entry is gone");
    // B's next packet is a new flow again, admitted (B is not isolated) with a fresh entry.
    assert_eq!(node.sent_by_b(&request).0, TC_ACT_REDIRECT);
    assert_eq!(node.sent_by_a(&reply).0, TC_ACT_REDIRECT);
}

/// An ICMP error quoting a flow that has expired is not taken for part of it: it is judged
/// as what it is, against the isolated pod's (empty) ingress rules.
#[test]
fn an_icmp_error_about_an_expired_flow_is_judged_on_its_own() {
    let mut node = Node::new();
    node.set_ct_timeouts(SHORT);
    // A admits nothing in but may send anywhere.
    node.set_endpoints(9, 0, 0, 0);
    let to_b = packet::ipv4(MAC_A, GW_A, IP_A, IP_B, packet::UDP, 5353, 53, 0);
    assert_eq!(node.sent_by_a(&to_b).0, TC_ACT_REDIRECT);
    let unreachable = packet::icmp_error(MAC_B, GW_B, IP_B, IP_A, 3, 3, &to_b);
    assert_eq!(
        node.sent_by_b(&unreachable).0,
        TC_ACT_REDIRECT,
        "fresh flow"
    );
    let flow = ct_key(IP_A, IP_B, 5353, 53, packet::UDP);
    // Unreplied UDP: 4 s.
    node.age(&flow, 5);
    assert_eq!(
        node.sent_by_b(&unreachable).0,
        TC_ACT_SHOT,
        "idle 5 s of 4: the error concerns no live flow"
    );
    assert_eq!(node.drops(DropReason::PolicyIngress), 1);
}

/// An expired entry in the original direction is re-decided against the current policy
/// even without a policy change (its generation is current).
#[test]
fn an_expired_flow_is_checked_against_policy_again() {
    let mut node = Node::new();
    node.set_ct_timeouts(SHORT);
    node.set_endpoints(0, 0, 7, 0);
    node.classify("10.244.0.10/32", 3);
    node.allow(7, 3, Some(packet::TCP), None, 1);
    assert_eq!(node.sent_by_a(&syn_a_to_b(40000, 80)).0, TC_ACT_REDIRECT);
    // B becomes isolated with nothing allowed, and the generation is left as it was (as if
    // the change raced the entry): only expiry re-decides the flow.
    node.set_endpoints(0, 0, 8, 0);
    let ack = packet::tcp(MAC_A, GW_A, IP_A, IP_B, 40000, 80, TCP_ACK);
    assert_eq!(node.sent_by_a(&ack).0, TC_ACT_REDIRECT, "fresh");
    let flow = ct_key(IP_A, IP_B, 40000, 80, packet::TCP);
    node.age(&flow, 4);
    assert_eq!(
        node.sent_by_a(&ack).0,
        TC_ACT_SHOT,
        "half-open, idle 4 s of 3"
    );
    assert_eq!(node.drops(DropReason::PolicyIngress), 1);
}

#[test]
fn a_closing_tcp_flow_expires_sooner_than_an_established_one() {
    let mut node = Node::new();
    node.set_ct_timeouts(SHORT);
    let (open, closing) = ((40000, 80), (40001, 80));
    for (sport, dport) in [open, closing] {
        assert_eq!(
            node.sent_by_b(&packet::tcp(MAC_B, GW_B, IP_B, IP_A, sport, dport, TCP_SYN))
                .0,
            TC_ACT_REDIRECT
        );
    }
    node.set_endpoints(0, 9, 0, 0);
    let reply = |(sport, dport): (u16, u16), flags| {
        packet::tcp(MAC_A, GW_A, IP_A, IP_B, dport, sport, flags)
    };
    assert_eq!(
        node.sent_by_a(&reply(open, TCP_SYN | TCP_ACK)).0,
        TC_ACT_REDIRECT
    );
    assert_eq!(
        node.sent_by_a(&reply(closing, TCP_FIN | TCP_ACK)).0,
        TC_ACT_REDIRECT
    );
    for (sport, dport) in [open, closing] {
        node.age(&ct_key(IP_B, IP_A, sport, dport, packet::TCP), 10);
    }
    assert_eq!(
        node.sent_by_a(&reply(open, TCP_ACK)).0,
        TC_ACT_REDIRECT,
        "established: idle 10 s of 100"
    );
    assert_eq!(
        node.sent_by_a(&reply(closing, TCP_ACK)).0,
        TC_ACT_SHOT,
        "closing: idle 10 s of 2"
    );
}

#[test]
fn the_sweep_deletes_expired_entries_and_keeps_fresh_ones() {
    let mut node = Node::new();
    node.set_ct_timeouts(SHORT);
    let now = monotonic_ns();
    let entry = |idle_s: u64, flags| CtEntry::new(now - idle_s * SECOND, 1, flags, 0, 0);
    let replied = CtEntry::FLAG_REPLIED;
    let flows = [
        // (key, entry, expired)
        (ct_key(IP_A, IP_B, 1, 53, packet::UDP), entry(3, 0), false),
        (ct_key(IP_A, IP_B, 2, 53, packet::UDP), entry(6, 0), true),
        (
            ct_key(IP_A, IP_B, 3, 53, packet::UDP),
            entry(4, replied),
            false,
        ),
        (
            ct_key(IP_A, IP_B, 4, 80, packet::TCP),
            entry(50, replied),
            false,
        ),
        (
            ct_key(IP_A, IP_B, 5, 80, packet::TCP),
            entry(50, replied | CtEntry::FLAG_CLOSING),
            true,
        ),
        (ct_key(IP_A, IP_B, 6, 6, packet::ICMP), entry(7, 0), true),
    ];
    for (k, e, _) in &flows {
        node.maps.conntrack.insert(k, e, 0).unwrap();
    }
    // At most one per round.
    let first = node.maps.sweep_conntrack(monotonic_ns(), 1).unwrap();
    assert_eq!((first.removed, first.entries), (1, 5));
    let rest = node.maps.sweep_conntrack(monotonic_ns(), 100).unwrap();
    assert_eq!((rest.removed, rest.entries), (2, 3));
    for (k, _, expired) in &flows {
        assert_eq!(node.ct_entry(k).is_none(), *expired, "{k:?}");
    }
}

/// A full table refuses new flows (counted) and never an established one.
#[test]
fn a_full_conntrack_table_drops_only_new_flows() {
    let mut node = Node::new();
    assert_eq!(node.sent_by_a(&syn_a_to_b(40000, 80)).0, TC_ACT_REDIRECT);
    // Fill the rest with live flows of other addresses.
    let now = monotonic_ns();
    let mut n = 0u32;
    // Bounded: a table that evicts instead of refusing never reports full.
    while n < capacity::CONNTRACK {
        let k = CtKey::new(
            Ipv4Addr::from(0x0a63_0000 + n).into(),
            IP_B.into(),
            1u16.to_be(),
            80u16.to_be(),
            packet::TCP,
        );
        if node
            .maps
            .conntrack
            .insert(k, CtEntry::new(now, 1, CtEntry::FLAG_REPLIED, 0, 0), 0)
            .is_err()
        {
            break;
        }
        n += 1;
    }
    assert_eq!(n + 1, capacity::CONNTRACK, "the table is full");
    assert_eq!(node.sent_by_a(&syn_a_to_b(40001, 80)).0, TC_ACT_SHOT);
    assert_eq!(node.drops(DropReason::ConntrackFull), 1);
    let ack = packet::tcp(MAC_A, GW_A, IP_A, IP_B, 40000, 80, TCP_ACK);
    assert_eq!(
        node.sent_by_a(&ack).0,
        TC_ACT_REDIRECT,
        "the established flow"
    );
    let reply = packet::tcp(MAC_B, GW_B, IP_B, IP_A, 80, 40000, TCP_ACK);
    assert_eq!(node.sent_by_b(&reply).0, TC_ACT_REDIRECT, "and its replies");
    assert_eq!(node.drops(DropReason::ConntrackFull), 1);
}

/// Creates a map with the raw `bpf(2)` call (a layout no program of this version has) and
/// pins it at `path`.
fn pinned_map(path: &std::path::Path, map_type: u32, key: u32, value: u32, max: u32) {
    use std::os::unix::ffi::OsStrExt;
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    let mut attr = [0u8; 128];
    for (i, v) in [map_type, key, value, max].into_iter().enumerate() {
        attr[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    // SAFETY: `attr` is a zeroed `union bpf_attr` prefix with the map-creation fields set.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, attr.as_ptr(), attr.len()) };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(c_path.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(fd as u32).to_ne_bytes());
    // SAFETY: as above, the object-pinning fields; `c_path` outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, attr.as_ptr(), attr.len()) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: our own descriptor; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
}

/// An agent of this layout upgrading from v4 (conntrack an LRU hash, a 16-byte
/// `NODE_CONFIG`) carries the flows and the policy generation over, with the default
/// timeouts. The old maps are pinned on a bpffs of the test's own mount namespace.
#[test]
fn flows_and_the_policy_generation_carry_over_from_the_v4_layout() {
    use aya::maps::{Array, HashMap, MapData};
    let mut node = Node::new();
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .expect("making mounts private");
    let dir = tempfile::tempdir().unwrap();
    nix::mount::mount(
        Some("bpf"),
        dir.path(),
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .expect("mounting a bpffs");
    const LRU_HASH: u32 = 9;
    const ARRAY: u32 = 2;
    let (ct, cfg) = (dir.path().join("CONNTRACK"), dir.path().join("NODE_CONFIG"));
    pinned_map(&ct, LRU_HASH, 40, 24, 16);
    pinned_map(&cfg, ARRAY, 4, 16, 1);
    let flow = ct_key(IP_A, IP_B, 40000, 80, packet::TCP);
    let entry = CtEntry::new(monotonic_ns(), 42, CtEntry::FLAG_REPLIED, 3, 0);
    let mut old_ct: HashMap<MapData, CtKey, CtEntry> =
        aya::maps::Map::from_map_data(MapData::from_pin(&ct).unwrap())
            .unwrap()
            .try_into()
            .unwrap();
    old_ct.insert(flow, entry, 0).unwrap();
    let mut old_cfg: Array<MapData, [u32; 4]> =
        aya::maps::Map::from_map_data(MapData::from_pin(&cfg).unwrap())
            .unwrap()
            .try_into()
            .unwrap();
    old_cfg.set(0, [42, 0, 0, 7], 0).unwrap();

    let outcome: std::collections::HashMap<_, _> =
        node.maps.carry_over(dir.path()).into_iter().collect();
    let copied = |map: &str| outcome[map].as_ref().map(|c| (c.copied, c.left_out)).ok();
    assert_eq!(copied("CONNTRACK"), Some((1, 0)));
    assert_eq!(copied("NODE_CONFIG"), Some((1, 0)));
    let c = node.maps.config().unwrap();
    assert_eq!((c.policy_gen(), c.vni()), (42, 7));
    assert_eq!(*c.ct_timeouts(), CtTimeouts::DEFAULT);
    assert_eq!(node.ct_entry(&flow), Some(entry));
    // The carried-over flow is established: an isolated B's reply passes.
    node.set_endpoints(0, 0, 0, 9);
    let reply = packet::tcp(MAC_B, GW_B, IP_B, IP_A, 80, 40000, TCP_ACK);
    assert_eq!(node.sent_by_b(&reply).0, TC_ACT_REDIRECT);
    drop(old_ct);
    drop(old_cfg);
    nix::mount::umount(dir.path()).expect("unmounting the bpffs");
}

/// Policy state for A (ingress rule set `large`: every TCP port of classes 1..=`classes`,
/// B's class 5 among them) and B (ingress rule set `small`: TCP 80 from A's class 3).
fn near_capacity_state(large: u32, small: u32, classes: u32) -> weir_api::NodeState {
    let mut s = weir_api::NodeState::default();
    s.peer_classes
        .insert(format!("{IP_A}/32").parse().unwrap(), 3);
    s.peer_classes
        .insert(format!("{IP_B}/32").parse().unwrap(), 5);
    let allow = VerdictEntry {
        action: Action::Allow,
        rule: 1,
    };
    for class in 1..=classes {
        for port in 1..=u16::MAX {
            let m = VerdictMatch {
                rule_set: large,
                class,
                proto: Some(packet::TCP),
                ports: PortPrefix::new(port, 16),
            };
            s.verdicts.insert(m, allow);
        }
    }
    let m = VerdictMatch {
        rule_set: small,
        class: 3,
        proto: Some(packet::TCP),
        ports: PortPrefix::new(80, 16),
    };
    s.verdicts.insert(m, allow);
    s
}

fn syn_b_to_a(sport: u16, dport: u16) -> Vec<u8> {
    packet::tcp(MAC_B, GW_B, IP_B, IP_A, sport, dport, TCP_SYN)
}

#[test]
fn a_snapshot_that_renumbers_rule_sets_near_capacity_applies_in_full() {
    let mut node = Node::new();
    // 8 × 65,535 + 1 entries: fits, but not twice.
    let before = near_capacity_state(1, 2, 8);
    assert!(before.verdicts.len() <= capacity::VERDICTS_EXACT as usize);
    let written = node
        .maps
        .sync_policy(&before, &weir_api::NodeState::default())
        .unwrap();
    assert!(written.is_complete(), "{:?}", written.first_error);
    node.maps.prune_policy(&before);
    node.set_endpoints(1, 0, 2, 0);
    // A restarted controller numbers the same policies the other way round.
    let after = near_capacity_state(2, 1, 8);
    let written = node.maps.sync_policy(&after, &before).unwrap();
    assert!(
        written.is_complete(),
        "{} entries left out: {:?}",
        written.missing(),
        written.first_error
    );
    node.set_endpoints(2, 0, 1, 0);
    node.maps.prune_policy(&after);
    let exact = node.maps.verdicts_exact.keys().count();
    assert_eq!(
        exact,
        after.verdicts.len(),
        "exactly the new state's verdicts"
    );
    assert_eq!(node.sent_by_a(&syn_a_to_b(40000, 80)).0, TC_ACT_REDIRECT);
    assert_eq!(node.sent_by_a(&syn_a_to_b(40001, 81)).0, TC_ACT_SHOT);
    assert_eq!(node.sent_by_b(&syn_b_to_a(40002, 80)).0, TC_ACT_REDIRECT);
}

#[test]
fn a_rule_set_larger_than_the_map_fails_closed_and_the_others_stay_intact() {
    let mut node = Node::new();
    // 9 × 65,535 entries for A's rule set: more than VERDICTS_EXACT holds.
    let state = near_capacity_state(1, 2, 9);
    assert!(state.verdicts.len() > capacity::VERDICTS_EXACT as usize);
    let written = node
        .maps
        .sync_policy(&state, &weir_api::NodeState::default())
        .unwrap();
    assert!(!written.is_complete());
    assert!(
        written
            .first_error
            .as_deref()
            .unwrap()
            .contains("VERDICTS_EXACT"),
        "{:?}",
        written.first_error
    );
    let failed = written.failed_rule_sets(&state);
    assert_eq!(failed, [1].into(), "only the large rule set is incomplete");
    // The endpoints as the agent points them.
    let (a_in, a_out) = weir_agent::agent::fail_closed(1, 0, &failed);
    let (b_in, b_out) = weir_agent::agent::fail_closed(2, 0, &failed);
    assert_eq!(a_in, weir_common::policy::FAIL_CLOSED);
    assert_eq!(b_in, 2);
    node.set_endpoints(a_in, a_out, b_in, b_out);
    // B's policy is intact: A reaches B on 80 only.
    assert_eq!(node.sent_by_a(&syn_a_to_b(40000, 80)).0, TC_ACT_REDIRECT);
    assert_eq!(node.sent_by_a(&syn_a_to_b(40001, 81)).0, TC_ACT_SHOT);
    // A's policy did not fit: denied, although the entry allowing B on 80 was written.
    let written_entry = VerdictMatch {
        rule_set: 1,
        class: 5,
        proto: Some(packet::TCP),
        ports: PortPrefix::new(80, 16),
    };
    assert!(
        !written
            .failed_verdicts
            .iter()
            .any(|(m, _)| *m == written_entry),
        "the test needs the allowing entry in the map"
    );
    assert_eq!(node.sent_by_b(&syn_b_to_a(40002, 80)).0, TC_ACT_SHOT);
    // The table sizes say what the maps hold, not what the state asked for.
    let metrics = weir_agent::observe::MetricsSnapshot::read(&node.maps, &state, true, 0);
    assert_eq!(
        metrics.fail_closed_drops, 1,
        "the fail-closed drop is counted"
    );
    assert_eq!(metrics.verdicts, capacity::VERDICTS_EXACT as usize);
    assert_eq!(metrics.peer_classes, 2);
    // Two pods, an IPv4 and an IPv6 address each.
    assert_eq!(metrics.endpoints, 4);
    // Pointed at the incomplete rule set instead, B would get through.
    node.set_endpoints(1, 0, 2, 0);
    assert_eq!(node.sent_by_b(&syn_b_to_a(40003, 80)).0, TC_ACT_REDIRECT);
}

// IPv6: extension headers, fragments, malformed packets, neighbour discovery and ICMPv6
// errors, through the same programs and maps as IPv4.

const A6_LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x0a);
const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
const ESP: u8 = 50;

fn v6_a_to_b(next: u8, payload: &[u8]) -> Vec<u8> {
    packet::ipv6_raw(MAC_A, GW_A, IP6_A, IP6_B, next, payload)
}

/// A `next`-header chain of `n` destination-options headers ending in a TCP SYN to `dport`.
fn dest_opts_chain(n: usize, dport: u16) -> (u8, Vec<u8>) {
    let mut payload = packet::tcp_header(40000, dport, TCP_SYN);
    let mut next = packet::TCP;
    for _ in 0..n {
        let mut h = packet::ext_options(next, 1);
        h.extend_from_slice(&payload);
        payload = h;
        next = packet::DEST_OPTS;
    }
    (next, payload)
}

/// B admits TCP/80 from A's IPv6 address alone (rule set 7, rule 70).
fn b_admits_tcp_80_from_a6(node: &mut Node) {
    node.set_endpoints(0, 0, 7, 0);
    node.classify("fd00:10:244::a/128", 3);
    node.allow(7, 3, Some(packet::TCP), PortPrefix::new(80, 16), 70);
}

#[test]
fn ipv6_extension_headers_are_walked_to_the_ports_policy_judges() {
    let mut node = Node::new();
    b_admits_tcp_80_from_a6(&mut node);
    let plain = v6_a_to_b(packet::TCP, &packet::tcp_header(40000, 80, TCP_SYN));
    assert_eq!(node.sent_by_a(&plain).0, TC_ACT_REDIRECT);
    // Hop-by-hop, then two destination options headers (one of 24 bytes), then TCP.
    for dport in [80, 81] {
        let mut payload = packet::ext_options(packet::DEST_OPTS, 1);
        payload.extend(packet::ext_options(packet::DEST_OPTS, 3));
        payload.extend(packet::ext_options(packet::TCP, 1));
        payload.extend(packet::tcp_header(40001, dport, TCP_SYN));
        let (verdict, out) = node.sent_by_a(&v6_a_to_b(packet::HOP_BY_HOP, &payload));
        if dport == 80 {
            assert_eq!(
                verdict, TC_ACT_REDIRECT,
                "the port behind the chain is allowed"
            );
            assert_eq!(packet::dst_mac(&out), MAC_B);
        } else {
            assert_eq!(verdict, TC_ACT_SHOT, "the port behind the chain is judged");
        }
    }
    // ESP ends the walk: protocol 50, no ports; a TCP rule does not admit it, an ESP one does.
    let esp = v6_a_to_b(ESP, &[0x11; 24]);
    assert_eq!(node.sent_by_a(&esp).0, TC_ACT_SHOT);
    node.allow(7, 3, Some(ESP), None, 71);
    assert_eq!(node.sent_by_a(&esp).0, TC_ACT_REDIRECT);
    assert_eq!(node.drops(DropReason::PolicyIngress), 2);
    assert_eq!(node.drops(DropReason::Malformed), 0);
}

#[test]
fn malformed_ipv6_is_dropped_and_counted() {
    let mut node = Node::new();
    // The longest chain walked passes; one header more is malformed.
    let (next, payload) = dest_opts_chain(6, 80);
    assert_eq!(
        node.sent_by_a(&v6_a_to_b(next, &payload)).0,
        TC_ACT_REDIRECT
    );
    let tcp = packet::tcp_header(40000, 80, TCP_SYN);
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    let (next, payload) = dest_opts_chain(7, 80);
    cases.push((
        "a chain of seven extension headers",
        v6_a_to_b(next, &payload),
    ));
    // (A truncated IPv6 header cannot be tested here: the kernel refuses to test-run a
    // frame whose IPv6 header it cannot read.)
    cases.push((
        "a truncated extension header",
        v6_a_to_b(packet::DEST_OPTS, &[packet::TCP]),
    ));
    let mut f = v6_a_to_b(packet::TCP, &tcp);
    f[18..20].copy_from_slice(&28u16.to_be_bytes());
    cases.push(("a payload length beyond the packet", f));
    let mut f = v6_a_to_b(packet::TCP, &tcp);
    f[18..20].copy_from_slice(&10u16.to_be_bytes());
    cases.push(("a payload length that cuts the TCP header short", f));
    let mut payload = packet::ext_options(packet::TCP, 4);
    payload.truncate(8);
    cases.push((
        "an extension header longer than the payload",
        v6_a_to_b(packet::DEST_OPTS, &payload),
    ));
    let mut payload = packet::ext_options(packet::TCP, 128);
    payload.extend_from_slice(&tcp);
    cases.push((
        "an extension header chain ending beyond the bound",
        v6_a_to_b(packet::DEST_OPTS, &payload),
    ));
    cases.push((
        "a first fragment without its TCP header",
        v6_a_to_b(
            packet::FRAGMENT,
            &packet::ext_fragment(packet::TCP, 0, true, 9),
        ),
    ));
    let mut f = v6_a_to_b(packet::TCP, &tcp);
    f[14] = 0x40;
    cases.push(("an IPv6 frame whose header says version 4", f));
    for (i, (what, frame)) in cases.iter().enumerate() {
        assert_eq!(node.sent_by_a(frame).0, TC_ACT_SHOT, "{what}");
        assert_eq!(node.drops(DropReason::Malformed), i as u64 + 1, "{what}");
    }
}

#[test]
fn ipv6_fragments_are_judged_by_their_first_fragments_ports() {
    let mut node = Node::new();
    b_admits_tcp_80_from_a6(&mut node);
    let fragment = |id: u32, offset: u16, more: bool, dport: Option<u16>| {
        let mut payload = packet::ext_fragment(packet::TCP, offset, more, id);
        match dport {
            Some(p) => payload.extend(packet::tcp_header(40000, p, TCP_SYN)),
            None => payload.extend_from_slice(&[0x22; 24]),
        }
        v6_a_to_b(packet::FRAGMENT, &payload)
    };
    // The identification is 32 bits: these two differ only in their high half.
    let (to_80, to_81) = (0x0001_0007, 0x0002_0007);
    assert_eq!(
        node.sent_by_a(&fragment(to_80, 0, true, Some(80))).0,
        TC_ACT_REDIRECT
    );
    assert_eq!(
        node.sent_by_a(&fragment(to_81, 0, true, Some(81))).0,
        TC_ACT_SHOT
    );
    assert_eq!(
        node.sent_by_a(&fragment(to_80, 3, false, None)).0,
        TC_ACT_REDIRECT,
        "a later fragment carries its first fragment's ports"
    );
    assert_eq!(
        node.sent_by_a(&fragment(to_81, 3, false, None)).0,
        TC_ACT_SHOT
    );
    assert_eq!(
        node.sent_by_a(&fragment(0x0003_0007, 3, false, None)).0,
        TC_ACT_SHOT,
        "a later fragment of an unknown datagram has no ports for a port rule to match"
    );
    // An atomic fragment (offset 0, no more fragments) is a whole packet.
    assert_eq!(
        node.sent_by_a(&fragment(0x0004_0007, 0, false, Some(80))).0,
        TC_ACT_REDIRECT
    );
    assert_eq!(node.drops(DropReason::Malformed), 0);
}

#[test]
fn ipv6_sources_are_checked_per_family_and_link_local_only_for_neighbour_discovery() {
    let mut node = Node::new();
    // B's IPv6 address, sent from A's interface; an address no pod has.
    let as_b = packet::ipv6_raw(
        MAC_A,
        GW_A,
        IP6_B,
        IP6_A,
        packet::TCP,
        &packet::tcp_header(1, 80, TCP_SYN),
    );
    assert_eq!(node.sent_by_a(&as_b).0, TC_ACT_SHOT);
    let unknown: Ipv6Addr = "fd00:10:244::99".parse().unwrap();
    let frame = packet::ipv6_raw(
        MAC_A,
        GW_A,
        unknown,
        IP6_B,
        packet::TCP,
        &packet::tcp_header(1, 80, TCP_SYN),
    );
    assert_eq!(node.sent_by_a(&frame).0, TC_ACT_SHOT);
    // A's link-local address carries neighbour discovery, nothing else.
    let udp = packet::ipv6_raw(
        MAC_A,
        GW_A,
        A6_LINK_LOCAL,
        IP6_B,
        packet::UDP,
        &[0, 53, 0, 53, 0, 8, 0, 0],
    );
    assert_eq!(node.sent_by_a(&udp).0, TC_ACT_SHOT);
    // A's own IPv6 address, from another MAC.
    let frame = packet::ipv6_raw(
        [0x02, 9, 9, 9, 9, 9],
        GW_A,
        IP6_A,
        IP6_B,
        packet::TCP,
        &packet::tcp_header(1, 80, TCP_SYN),
    );
    assert_eq!(node.sent_by_a(&frame).0, TC_ACT_SHOT);
    assert_eq!(node.drops(DropReason::Spoofed), 4);
}

#[test]
fn neighbour_discovery_goes_to_the_host_and_never_meets_policy() {
    let mut node = Node::new();
    // Both pods isolated both ways, and no rule admits anything.
    node.set_endpoints(9, 9, 9, 9);
    let solicited: Ipv6Addr = "ff02::1:ff00:1".parse().unwrap();
    let mut ns_body = vec![0; 4];
    ns_body.extend_from_slice(&GATEWAY6.octets());
    ns_body.extend_from_slice(&[1, 1]);
    ns_body.extend_from_slice(&MAC_A);
    let ns = packet::icmpv6(135, 0, &ns_body);
    let from_pod_ok: Vec<(&str, Vec<u8>)> = vec![
        (
            "a neighbour solicitation for the gateway",
            packet::ipv6_raw(
                MAC_A,
                [0x33, 0x33, 0xff, 0, 0, 1],
                A6_LINK_LOCAL,
                solicited,
                packet::ICMPV6,
                &ns,
            ),
        ),
        (
            "duplicate address detection",
            packet::ipv6_raw(
                MAC_A,
                [0x33, 0x33, 0xff, 0, 0, 1],
                Ipv6Addr::UNSPECIFIED,
                solicited,
                packet::ICMPV6,
                &packet::icmpv6(135, 0, &ns_body[..20]),
            ),
        ),
        ("a multicast listener report behind a hop-by-hop header", {
            let mut payload = packet::ext_options(packet::ICMPV6, 1);
            payload.extend(packet::icmpv6(143, 0, &[0; 4]));
            packet::ipv6_raw(
                MAC_A,
                [0x33, 0x33, 0, 0, 0, 0x16],
                A6_LINK_LOCAL,
                "ff02::16".parse().unwrap(),
                packet::HOP_BY_HOP,
                &payload,
            )
        }),
        (
            "a neighbour advertisement from the pod's own address",
            packet::ipv6_raw(
                MAC_A,
                GW_A,
                IP6_A,
                GATEWAY6,
                packet::ICMPV6,
                &packet::icmpv6(136, 0, &[0x60, 0, 0, 0]),
            ),
        ),
    ];
    for (what, frame) in &from_pod_ok {
        let (verdict, out) = node.sent_by_a(frame);
        assert_eq!(verdict, TC_ACT_OK, "{what}");
        assert_eq!(&out, frame, "{what} goes up the host stack untouched");
    }
    let from_pod_refused: Vec<(&str, Vec<u8>)> = vec![
        (
            "a router advertisement",
            packet::ipv6_raw(
                MAC_A,
                [0x33, 0x33, 0, 0, 0, 1],
                A6_LINK_LOCAL,
                "ff02::1".parse().unwrap(),
                packet::ICMPV6,
                &packet::icmpv6(134, 0, &[0; 12]),
            ),
        ),
        (
            "a redirect",
            packet::ipv6_raw(
                MAC_A,
                GW_A,
                A6_LINK_LOCAL,
                GATEWAY6,
                packet::ICMPV6,
                &packet::icmpv6(137, 0, &[0; 36]),
            ),
        ),
        (
            "a neighbour advertisement from another pod's address",
            packet::ipv6_raw(
                MAC_A,
                GW_A,
                IP6_B,
                GATEWAY6,
                packet::ICMPV6,
                &packet::icmpv6(136, 0, &[0x60, 0, 0, 0]),
            ),
        ),
    ];
    for (what, frame) in &from_pod_refused {
        assert_eq!(node.sent_by_a(frame).0, TC_ACT_SHOT, "{what}");
    }
    assert_eq!(node.drops(DropReason::Spoofed), 3);
    // The host resolving the pod's address: delivered although A admits nothing.
    let mut body = vec![0; 4];
    body.extend_from_slice(&IP6_A.octets());
    let to_a = packet::ipv6_raw(
        GW_A,
        MAC_A,
        GATEWAY6,
        IP6_A,
        packet::ICMPV6,
        &packet::icmpv6(135, 0, &body),
    );
    let veth_a = node.veth_a;
    assert_eq!(node.run(TO_POD, veth_a, &to_a).0, TC_ACT_OK);
    // Whereas the host's ordinary traffic from that link-local address meets A's rules.
    let ping = packet::ipv6_raw(
        GW_A,
        MAC_A,
        GATEWAY6,
        IP6_A,
        packet::ICMPV6,
        &packet::icmpv6(128, 0, &[0, 1, 0, 1]),
    );
    assert_eq!(node.run(TO_POD, veth_a, &ping).0, TC_ACT_SHOT);
}

#[test]
fn an_icmpv6_packet_too_big_about_an_admitted_flow_reaches_an_isolated_pod() {
    let mut node = Node::new();
    // A admits nothing in (rule set 9 has no verdicts) but may send anywhere.
    node.set_endpoints(9, 0, 0, 0);
    let to_b = v6_a_to_b(packet::TCP, &packet::tcp_header(40000, 443, TCP_SYN));
    assert_eq!(node.sent_by_a(&to_b).0, TC_ACT_REDIRECT);
    let too_big = |quoted: &[u8]| {
        let mut body = 1280u32.to_be_bytes().to_vec();
        body.extend_from_slice(&quoted[14..]);
        packet::ipv6_raw(
            MAC_B,
            GW_B,
            IP6_B,
            IP6_A,
            packet::ICMPV6,
            &packet::icmpv6(2, 0, &body),
        )
    };
    let (verdict, out) = node.sent_by_b(&too_big(&to_b));
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "packet too big about A's flow reaches A"
    );
    assert_eq!(packet::dst_mac(&out), MAC_A);
    // About a flow A never opened: judged on its own, and A admits no ICMPv6.
    let other = v6_a_to_b(packet::TCP, &packet::tcp_header(40001, 443, TCP_SYN));
    assert_eq!(node.sent_by_b(&too_big(&other)).0, TC_ACT_SHOT);
    assert_eq!(node.drops(DropReason::PolicyIngress), 1);
}
