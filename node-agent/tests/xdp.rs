//! The XDP program of the uplink on synthetic frames through the real kernel
//! (`BPF_PROG_TEST_RUN`), then attached to a veth of a namespace the test creates. Each
//! program test builds a frame, sets up maps, and checks the verdict and the counters.

mod support;

use std::{collections::BTreeSet, net::Ipv4Addr};

use ipnet::IpNet;
use support::{
    IP_A, IP_B, MAC_A, NODE_IP, UPLINK_MAC, XDP_DROP, XDP_PASS,
    packet::{self, TCP_SYN},
};
use weir_agent::{
    dataplane::{Dataplane, PinLayout, XdpMode},
    maps::DataplaneMaps,
};
use weir_common::{
    TUNNEL_MAC, TUNNEL_PORT, TUNNEL_SOURCE_MAC, config::NodeConfig, endpoint::EndpointInfo,
    event::DropReason, ip::IpKey,
};

const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
/// Another node of the cluster, and a host that is none.
const PEER_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 3);
const STRANGER: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 66);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);

/// A node with pods A and B, one other node it tunnels with, and an uplink.
struct Node {
    dp: Dataplane,
    maps: DataplaneMaps,
    uplink: u32,
}

impl Node {
    fn new() -> Self {
        support::private_netns();
        let uplink = support::dummy_interface("uplink");
        let veth_a = support::dummy_interface("veth-a");
        let mut dp = Dataplane::load(None).expect("loading the programs");
        let mut maps = DataplaneMaps::take(&mut dp).expect("maps");
        let eps = [
            (
                IpKey::from(IP_A),
                EndpointInfo::new(veth_a, MAC_A, [0xee; 6]),
            ),
            (
                IpKey::from(IP_B),
                EndpointInfo::new(veth_a, MAC_A, [0xee; 6]),
            ),
        ];
        maps.sync_endpoints(&eps.into_iter().collect()).unwrap();
        maps.sync_host_addrs(&[NODE_IP.into()]).unwrap();
        maps.sync_tunnel_peers(&BTreeSet::from([IpKey::from(PEER_NODE)]))
            .unwrap();
        Node { dp, maps, uplink }
    }

    fn arrives(&mut self, frame: &[u8]) -> u32 {
        let (verdict, out) = support::test_run_xdp(&mut self.dp, self.uplink, frame);
        if verdict == XDP_PASS {
            assert_eq!(out, frame, "a passing frame is untouched");
        }
        verdict
    }

    fn drops(&self, reason: DropReason) -> u64 {
        self.maps
            .drop_counts()
            .into_iter()
            .find(|(r, _)| *r == reason)
            .map(|(_, n)| n)
            .unwrap()
    }

    fn prefilter(&mut self, nets: &[&str]) -> std::collections::BTreeMap<IpNet, u32> {
        let nets: BTreeSet<IpNet> = nets.iter().map(|n| n.parse().unwrap()).collect();
        self.maps.sync_prefilter(&nets, false).unwrap()
    }

    fn prefilter_drops(&self, id: u32) -> u64 {
        DataplaneMaps::counter_totals(&self.maps.prefilter_drops, [id])[&id]
    }
}

/// A TCP SYN from `src` to B, as it arrives on the uplink.
fn syn_from(src: Ipv4Addr) -> Vec<u8> {
    packet::tcp(ROUTER_MAC, UPLINK_MAC, src, IP_B, 40000, 80, TCP_SYN)
}

/// A VXLAN datagram from `outer` to this node, carrying a SYN from `inner` to B.
fn vxlan_from(outer: Ipv4Addr, inner: Ipv4Addr) -> Vec<u8> {
    let inner = packet::tcp(
        TUNNEL_SOURCE_MAC,
        TUNNEL_MAC,
        inner,
        IP_B,
        40000,
        80,
        TCP_SYN,
    );
    packet::vxlan(ROUTER_MAC, UPLINK_MAC, outer, NODE_IP, &inner)
}

#[test]
fn valid_packets_pass_untouched() {
    let mut node = Node::new();
    assert_eq!(node.arrives(&syn_from(REMOTE_POD)), XDP_PASS);
    let dns = packet::udp_with(
        ROUTER_MAC, UPLINK_MAC, STRANGER, NODE_IP, 5353, 53, b"query",
    );
    assert_eq!(node.arrives(&dns), XDP_PASS);
    let arp = packet::arp_request(ROUTER_MAC, STRANGER, NODE_IP);
    assert_eq!(node.arrives(&arp), XDP_PASS);
    // Padded to Ethernet's minimum: the padding beyond the IP total length is no error.
    let mut short = packet::udp_with(ROUTER_MAC, UPLINK_MAC, STRANGER, NODE_IP, 1, 2, b"");
    short.resize(60, 0);
    assert_eq!(node.arrives(&short), XDP_PASS);
    assert!(node.maps.drop_counts().iter().all(|(_, n)| *n == 0));
}

#[test]
fn truncated_or_inconsistent_ipv4_headers_are_dropped_as_malformed() {
    let mut node = Node::new();
    let whole = syn_from(REMOTE_POD);
    // The IPv4 header cut short.
    assert_eq!(node.arrives(&whole[..14 + 12]), XDP_DROP);
    // A total length longer than the frame (the frame was truncated on the way).
    let mut longer = whole.clone();
    longer[16..18].copy_from_slice(&200u16.to_be_bytes());
    assert_eq!(node.arrives(&longer), XDP_DROP);
    // A header length below 20 bytes.
    let mut short_ihl = whole.clone();
    short_ihl[14] = 0x44;
    assert_eq!(node.arrives(&short_ihl), XDP_DROP);
    // Not version 4 under the IPv4 ethertype.
    let mut version = whole.clone();
    version[14] = 0x65;
    assert_eq!(node.arrives(&version), XDP_DROP);
    // (A frame shorter than an Ethernet header cannot be tested: BPF_PROG_TEST_RUN refuses
    // it, as drivers do not deliver one.)
    assert_eq!(node.drops(DropReason::Malformed), 4);
}

#[test]
fn truncated_or_inconsistent_udp_headers_are_dropped_as_malformed() {
    let mut node = Node::new();
    let whole = packet::udp_with(ROUTER_MAC, UPLINK_MAC, STRANGER, NODE_IP, 5353, 53, b"q");
    // The UDP header cut short, IP total length saying so.
    let mut cut = whole[..14 + 20 + 4].to_vec();
    cut[16..18].copy_from_slice(&24u16.to_be_bytes());
    assert_eq!(node.arrives(&cut), XDP_DROP);
    // A UDP length beyond the IP payload.
    let mut long = whole.clone();
    long[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&100u16.to_be_bytes());
    assert_eq!(node.arrives(&long), XDP_DROP);
    // A UDP length shorter than its header.
    let mut tiny = whole.clone();
    tiny[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&4u16.to_be_bytes());
    assert_eq!(node.arrives(&tiny), XDP_DROP);
    assert_eq!(node.drops(DropReason::Malformed), 3);
    // A later fragment carries no UDP header: its payload is not read as one.
    let mut later = whole.clone();
    later[20..22].copy_from_slice(&1u16.to_be_bytes());
    assert_eq!(node.arrives(&later), XDP_PASS);
}

#[test]
fn vxlan_from_a_host_that_is_not_a_node_is_dropped_before_decapsulation() {
    let mut node = Node::new();
    assert_eq!(node.arrives(&vxlan_from(STRANGER, REMOTE_POD)), XDP_DROP);
    assert_eq!(node.drops(DropReason::TunnelUntrusted), 1);
    assert_eq!(
        node.drops(DropReason::UnknownTunnelPeer),
        0,
        "counted as XDP's drop, not TC's"
    );
    // UDP 4789 to an address that is not the node's (a pod's own VXLAN) is no tunnel
    // traffic of weir's.
    let to_pod = packet::udp_with(
        ROUTER_MAC,
        UPLINK_MAC,
        STRANGER,
        IP_B,
        40000,
        TUNNEL_PORT,
        b"not weir's",
    );
    assert_eq!(node.arrives(&to_pod), XDP_PASS);
}

#[test]
fn vxlan_from_a_known_node_passes() {
    let mut node = Node::new();
    assert_eq!(node.arrives(&vxlan_from(PEER_NODE, REMOTE_POD)), XDP_PASS);
    assert!(node.maps.drop_counts().iter().all(|(_, n)| *n == 0));
}

#[test]
fn vxlan_whose_inner_source_claims_the_node_or_a_local_pod_is_dropped_as_spoofed() {
    let mut node = Node::new();
    assert_eq!(node.arrives(&vxlan_from(PEER_NODE, NODE_IP)), XDP_DROP);
    assert_eq!(node.arrives(&vxlan_from(PEER_NODE, IP_A)), XDP_DROP);
    assert_eq!(node.drops(DropReason::Spoofed), 2);
    // An inner frame cut short inside a datagram from a node.
    let mut cut = vxlan_from(PEER_NODE, REMOTE_POD);
    let keep = cut.len() - 30;
    cut.truncate(keep);
    let (ip_len, udp_len) = ((keep - 14) as u16, (keep - 14 - 20) as u16);
    cut[16..18].copy_from_slice(&ip_len.to_be_bytes());
    cut[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&udp_len.to_be_bytes());
    assert_eq!(node.arrives(&cut), XDP_DROP);
    assert_eq!(node.drops(DropReason::Malformed), 1);
}

#[test]
fn packets_from_the_network_claiming_the_node_or_a_local_pod_are_dropped_as_spoofed() {
    let mut node = Node::new();
    assert_eq!(node.arrives(&syn_from(NODE_IP)), XDP_DROP);
    assert_eq!(node.arrives(&syn_from(IP_A)), XDP_DROP);
    assert_eq!(node.drops(DropReason::Spoofed), 2);
}

#[test]
fn prefilter_hits_are_dropped_and_counted_per_entry_and_misses_pass() {
    let mut node = Node::new();
    let ids = node.prefilter(&["203.0.113.0/24", "198.51.100.7/32", "2001:db8::/32"]);
    let net = |s: &str| s.parse::<IpNet>().unwrap();
    let (wide, host) = (ids[&net("203.0.113.0/24")], ids[&net("198.51.100.7/32")]);
    assert_ne!(wide, host);
    assert_eq!(
        node.arrives(&syn_from(Ipv4Addr::new(203, 0, 113, 9))),
        XDP_DROP
    );
    assert_eq!(
        node.arrives(&syn_from(Ipv4Addr::new(203, 0, 113, 200))),
        XDP_DROP
    );
    assert_eq!(
        node.arrives(&syn_from(Ipv4Addr::new(198, 51, 100, 7))),
        XDP_DROP
    );
    // Misses: next to the prefixes.
    assert_eq!(
        node.arrives(&syn_from(Ipv4Addr::new(203, 0, 114, 1))),
        XDP_PASS
    );
    assert_eq!(
        node.arrives(&syn_from(Ipv4Addr::new(198, 51, 100, 8))),
        XDP_PASS
    );
    // The inner source of a datagram from a node is checked too.
    let inner = vxlan_from(PEER_NODE, Ipv4Addr::new(203, 0, 113, 10));
    assert_eq!(node.arrives(&inner), XDP_DROP);
    assert_eq!(node.drops(DropReason::Prefilter), 4);
    assert_eq!(node.prefilter_drops(wide), 3);
    assert_eq!(node.prefilter_drops(host), 1);

    // Rewriting the prefilter keeps the ids (and counts) of the prefixes that stay; a new
    // prefix starts from zero.
    let again = node.prefilter(&["203.0.113.0/24", "192.0.2.0/24"]);
    assert_eq!(again[&net("203.0.113.0/24")], wide);
    assert_eq!(node.prefilter_drops(wide), 3);
    let new = again[&net("192.0.2.0/24")];
    assert_eq!(node.prefilter_drops(new), 0);
    assert_eq!(
        node.arrives(&syn_from(Ipv4Addr::new(198, 51, 100, 7))),
        XDP_PASS,
        "a prefix taken out no longer drops"
    );
}

/// A bpffs directory of the test's own under the machine's bpffs, removed (with every
/// link pinned in it, which detaches them) when dropped.
struct Pins(PinLayout);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = self.0.remove_all();
    }
}

#[test]
fn xdp_attaches_natively_to_a_veth_and_a_restarted_agent_takes_the_pinned_link_over() {
    support::private_netns();
    support::dummy_interface("uplink");
    let bpffs = std::path::Path::new("/sys/fs/bpf");
    if !weir_agent::bpffs::is_bpffs(bpffs).unwrap_or(false) {
        panic!("no bpffs at /sys/fs/bpf: run the tests through `cargo xtask test`");
    }
    let node = format!("xdp-test-{}", std::process::id());
    let pins = Pins(PinLayout::new(bpffs, &node));
    let mut ids = Vec::new();
    for _ in 0..2 {
        let mut dp = Dataplane::load(Some(pins.0.clone())).expect("loading the programs");
        let mode = dp.attach_uplink_xdp("uplink").expect("attaching XDP");
        assert_eq!(mode, XdpMode::Native, "veth has native XDP");
        ids.push(dp.xdp().unwrap().info().unwrap().id());
        // The agent exits: the pinned link keeps the program attached.
        drop(dp);
        assert_eq!(
            attached_xdp("uplink"),
            Some(("xdp".to_string(), *ids.last().unwrap())),
            "the newest agent's program runs natively"
        );
    }
    assert_ne!(ids[0], ids[1]);
    drop(pins);
    // The last reference goes with the pin; the kernel releases the link after that (later
    // on a busy machine).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while attached_xdp("uplink").is_some() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(attached_xdp("uplink"), None, "unpinning detaches");
}

#[test]
fn without_native_xdp_the_program_runs_in_generic_mode() {
    support::private_netns();
    support::dummy_interface("uplink");
    let mut dp = Dataplane::load(None).expect("loading the programs");
    dp.force_generic_xdp();
    let mode = dp.attach_uplink_xdp("uplink").expect("attaching XDP");
    assert_eq!(mode, XdpMode::Generic);
    let id = dp.xdp().unwrap().info().unwrap().id();
    assert_eq!(attached_xdp("uplink"), Some(("xdpgeneric".to_string(), id)));
}

/// The XDP program on `ifname` as `ip link` reports it (`mtu 1500 xdpgeneric ...` then
/// `prog/xdp id N ...`): its kind (`xdp` is native mode) and its id.
fn attached_xdp(ifname: &str) -> Option<(String, u32)> {
    let out = std::process::Command::new("ip")
        .args(["link", "show", "dev", ifname])
        .output()
        .expect("running ip");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let words: Vec<&str> = text.split_whitespace().collect();
    let kind = words
        .windows(3)
        .find(|w| w[0] == "mtu" && w[2].starts_with("xdp"))?[2]
        .to_string();
    let id = words
        .windows(3)
        .find(|w| w[0] == "prog/xdp" && w[1] == "id")?[2]
        .parse()
        .ok()?;
    Some((kind, id))
}

/// IPv6 frames: a source in a prefiltered IPv6 prefix is dropped and counted for its entry, a
/// truncated IPv6 header is malformed, and other IPv6 traffic passes untouched.
#[test]
fn ipv6_sources_are_prefiltered_truncated_headers_are_malformed_and_the_rest_passes() {
    let mut node = Node::new();
    let ids = node.prefilter(&["2001:db8:bad::/48", "203.0.113.0/24"]);
    let id = ids[&"2001:db8:bad::/48".parse::<IpNet>().unwrap()];
    let to: std::net::Ipv6Addr = "2001:db8:1::1".parse().unwrap();
    let from = |src: &str| {
        packet::udp6(
            ROUTER_MAC,
            UPLINK_MAC,
            src.parse().unwrap(),
            to,
            40000,
            53,
            b"query",
        )
    };
    assert_eq!(node.arrives(&from("2001:db8:bad::7")), XDP_DROP);
    assert_eq!(node.arrives(&from("2001:db8:bad:ffff::1")), XDP_DROP);
    assert_eq!(node.prefilter_drops(id), 2);
    let other = from("2001:db8:bae::7");
    assert_eq!(node.arrives(&other), XDP_PASS);
    // The IPv6 header cut short.
    assert_eq!(node.arrives(&other[..14 + 30]), XDP_DROP);
    assert_eq!(node.drops(DropReason::Prefilter), 2);
    assert_eq!(node.drops(DropReason::Malformed), 1);
}

#[test]
fn untracked_host_policy_rules_drop_what_they_deny_to_the_node_and_nothing_else() {
    use weir_api::{Action, PortPrefix, VerdictEntry, VerdictMatch};
    use weir_common::{endpoint::FailsafeKey, policy::NOT_ISOLATED};
    const SET: u32 = 7;
    const CLASS: u32 = 5;
    let mut node = Node::new();
    node.maps
        .set_peer_class(&format!("{STRANGER}/32").parse().unwrap(), CLASS)
        .unwrap();
    let deny = |node: &mut Node, proto: Option<u8>, ports: Option<PortPrefix>, rule: u32| {
        let m = VerdictMatch {
            rule_set: SET,
            class: CLASS,
            proto,
            ports,
        };
        let v = VerdictEntry {
            action: Action::Deny,
            rule,
        };
        node.maps.set_verdict(&m, &v).unwrap();
    };
    // Rule 3: UDP/161 from the stranger. Rule 4: everything from it over TCP.
    deny(&mut node, Some(packet::UDP), PortPrefix::new(161, 16), 3);
    deny(&mut node, Some(packet::TCP), None, 4);
    node.maps
        .sync_failsafe(&[FailsafeKey::new(packet::TCP, 22, true)])
        .unwrap();
    let snmp = |dst: Ipv4Addr, port: u16| {
        packet::udp_with(ROUTER_MAC, UPLINK_MAC, STRANGER, dst, 5000, port, b"get")
    };
    let tcp = |port: u16| {
        packet::tcp(
            ROUTER_MAC, UPLINK_MAC, STRANGER, NODE_IP, 40000, port, TCP_SYN,
        )
    };

    // No untracked rule set: everything passes.
    assert_eq!(node.arrives(&snmp(NODE_IP, 161)), XDP_PASS);
    node.maps
        .set_host_policy(NOT_ISOLATED, NOT_ISOLATED, SET)
        .unwrap();
    assert_eq!(node.arrives(&snmp(NODE_IP, 161)), XDP_DROP);
    assert_eq!(node.arrives(&snmp(NODE_IP, 162)), XDP_PASS, "another port");
    assert_eq!(node.arrives(&snmp(IP_B, 161)), XDP_PASS, "not to the node");
    assert_eq!(node.arrives(&tcp(80)), XDP_DROP);
    assert_eq!(node.arrives(&tcp(22)), XDP_PASS, "a failsafe port");
    let other = packet::udp_with(
        ROUTER_MAC, UPLINK_MAC, PEER_NODE, NODE_IP, 5000, 161, b"get",
    );
    assert_eq!(node.arrives(&other), XDP_PASS, "another source");
    assert_eq!(node.drops(DropReason::HostPolicy), 2);
    let hits = DataplaneMaps::counter_totals(&node.maps.rule_hits, [3, 4]);
    assert_eq!((hits[&3], hits[&4]), (1, 1), "counted by rule");

    // The rule set is looked up only while the node's flag says one is installed:
    // installing it set the flag; with the flag cleared the slot is not read.
    assert!(node.maps.config().unwrap().host_untracked());
    node.maps
        .set_flag(NodeConfig::FLAG_HOST_UNTRACKED, false)
        .unwrap();
    assert_eq!(node.arrives(&snmp(NODE_IP, 161)), XDP_PASS, "flag clear");
    assert_eq!(node.arrives(&tcp(80)), XDP_PASS, "flag clear");
    node.maps
        .set_flag(NodeConfig::FLAG_HOST_UNTRACKED, true)
        .unwrap();
    assert_eq!(
        node.arrives(&snmp(NODE_IP, 161)),
        XDP_DROP,
        "flag set again"
    );
    assert_eq!(node.drops(DropReason::HostPolicy), 3);
    // Removing the rule set clears the flag; the other flags stay.
    node.maps
        .set_flag(NodeConfig::FLAG_HOST_ADDR_FRONTENDS, true)
        .unwrap();
    node.maps
        .set_host_policy(NOT_ISOLATED, NOT_ISOLATED, NOT_ISOLATED)
        .unwrap();
    let config = node.maps.config().unwrap();
    assert!(!config.host_untracked() && config.host_addr_frontends());
    assert_eq!(node.arrives(&snmp(NODE_IP, 161)), XDP_PASS, "removed");
}

/// The node's, another node's and a stranger's IPv6 addresses (an IPv6 underlay).
const NODE_IP6: &str = "fd00:172:30::2";
const PEER_NODE6: &str = "fd00:172:30::3";
const STRANGER6: &str = "fd00:172:30::66";

fn v6(a: &str) -> std::net::Ipv6Addr {
    a.parse().unwrap()
}

/// The node also has an IPv6 address, and its tunnel peer is known by its IPv6 one.
fn ipv6_underlay_node() -> Node {
    let mut node = Node::new();
    node.maps
        .sync_host_addrs(&[NODE_IP.into(), v6(NODE_IP6).into()])
        .unwrap();
    node.maps
        .sync_tunnel_peers(&BTreeSet::from([IpKey::from(v6(PEER_NODE6))]))
        .unwrap();
    node
}

/// A VXLAN datagram over IPv6 from `outer` to the node, carrying a SYN from `inner` to B.
fn vxlan6_from(outer: &str, inner: Ipv4Addr) -> Vec<u8> {
    let mut payload = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    payload.extend_from_slice(&packet::tcp(
        TUNNEL_SOURCE_MAC,
        TUNNEL_MAC,
        inner,
        IP_B,
        40000,
        80,
        TCP_SYN,
    ));
    packet::udp6(
        ROUTER_MAC,
        UPLINK_MAC,
        v6(outer),
        v6(NODE_IP6),
        40000,
        TUNNEL_PORT,
        &payload,
    )
}

#[test]
fn vxlan_over_ipv6_is_admitted_from_nodes_only_and_its_inner_source_checked() {
    let mut node = ipv6_underlay_node();
    assert_eq!(node.arrives(&vxlan6_from(PEER_NODE6, REMOTE_POD)), XDP_PASS);
    assert!(node.maps.drop_counts().iter().all(|(_, n)| *n == 0));
    assert_eq!(
        node.arrives(&vxlan6_from(STRANGER6, REMOTE_POD)),
        XDP_DROP,
        "a host that is no node"
    );
    assert_eq!(node.drops(DropReason::TunnelUntrusted), 1);
    assert_eq!(
        node.arrives(&vxlan6_from(PEER_NODE6, IP_A)),
        XDP_DROP,
        "a node's datagram whose inner source claims a local pod"
    );
    assert_eq!(node.drops(DropReason::Spoofed), 1);
    // The same datagram to an address that is not the node's is no tunnel traffic of weir's.
    let mut to_other = vxlan6_from(STRANGER6, REMOTE_POD);
    to_other[14 + 24 + 15] ^= 1;
    assert_eq!(node.arrives(&to_other), XDP_PASS);
}

#[test]
fn untracked_rules_judge_ipv6_packets_to_the_node_but_not_neighbour_discovery() {
    use weir_api::{Action, VerdictEntry, VerdictMatch};
    use weir_common::policy::NOT_ISOLATED;
    const SET: u32 = 9;
    const CLASS: u32 = 6;
    let mut node = ipv6_underlay_node();
    node.maps
        .set_peer_class(&format!("{STRANGER6}/128").parse().unwrap(), CLASS)
        .unwrap();
    // Rule 5: everything from the stranger.
    node.maps
        .set_verdict(
            &VerdictMatch {
                rule_set: SET,
                class: CLASS,
                proto: None,
                ports: None,
            },
            &VerdictEntry {
                action: Action::Deny,
                rule: 5,
            },
        )
        .unwrap();
    node.maps
        .set_host_policy(NOT_ISOLATED, NOT_ISOLATED, SET)
        .unwrap();
    let udp = |src: &str, dst: &str| {
        packet::udp6(ROUTER_MAC, UPLINK_MAC, v6(src), v6(dst), 5000, 161, b"get")
    };
    assert_eq!(node.arrives(&udp(STRANGER6, NODE_IP6)), XDP_DROP);
    assert_eq!(
        node.arrives(&udp(PEER_NODE6, NODE_IP6)),
        XDP_PASS,
        "another source"
    );
    assert_eq!(
        node.arrives(&udp(STRANGER6, "fd00:172:30::99")),
        XDP_PASS,
        "not to the node"
    );
    let icmp = |icmp_type: u8| {
        packet::ipv6_raw(
            ROUTER_MAC,
            UPLINK_MAC,
            v6(STRANGER6),
            v6(NODE_IP6),
            packet::ICMPV6,
            &packet::icmpv6(icmp_type, 0, &[0; 20]),
        )
    };
    assert_eq!(node.arrives(&icmp(128)), XDP_DROP, "an echo request");
    assert_eq!(
        node.arrives(&icmp(135)),
        XDP_PASS,
        "a neighbour solicitation is never judged"
    );
    assert_eq!(node.drops(DropReason::HostPolicy), 2);
    let hits = DataplaneMaps::counter_totals(&node.maps.rule_hits, [5]);
    assert_eq!(hits[&5], 2, "counted by rule");
}
