//! What a node trusts from the network, end to end: forged VXLAN datagrams (real
//! encapsulation, sent over plain UDP to port 4789) must not reach an ingress-isolated pod,
//! whoever sends them, in both topologies. The XDP program on the node's uplink (native on
//! the local cluster's veths; attached always with `--uplink-xdp always`) drops them before
//! decapsulation, so TC never sees them. By default it is attached only while the prefilter
//! has a prefix or a host policy an untracked rule.

mod support;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::json;
use support::{cluster, cluster_with_agent_args, pod, xdp_mode};
use weir_agent::{dataplane::PinLayout, maps::pinned_drop_counts};
use weir_common::event::DropReason;
use weir_localcluster::{LocalCluster, Topology, netns::Netns};

const VXLAN_PORT: u16 = 4789;
/// The port the isolated pod listens on.
const TARGET_PORT: u16 = 7777;

fn deny_ingress(namespace: &str, name: &str, pod: &str) -> serde_json::Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"podSelector": {"matchLabels": {"pod": pod}}, "policyTypes": ["Ingress"]},
    })
}

fn v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => panic!("expected an IPv4 address, got {a}"),
    }
}

/// Sends `datagram` over UDP from inside `from` to `to`:4789 (the kernel adds the outer
/// headers, with the namespace's own source address).
fn send_vxlan(from: &Netns, to: impl Into<IpAddr>, datagram: Vec<u8>) {
    let to: IpAddr = to.into();
    from.within(move || {
        let any: IpAddr = match to {
            IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
        };
        let s = UdpSocket::bind((any, 0))?;
        s.send_to(&datagram, (to, VXLAN_PORT))
    })
    .expect("enter the sender's namespace")
    .expect("send the VXLAN datagram");
}

/// Value of the node's drop counter for `reason` (0 when absent).
fn drops(c: &LocalCluster, node: usize, reason: &str) -> u64 {
    let (code, metrics) = c.agent_http(node, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    let prefix = format!("weir_agent_drops_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|n| n.trim().parse().expect("a count"))
        .unwrap_or(0)
}

/// Whether the node's flow log holds a drop for `reason` from `src` seen on interface
/// `ifindex`.
fn dropped_on(c: &LocalCluster, node: usize, reason: &str, src: Ipv4Addr, ifindex: u32) -> bool {
    let (_, flows) = c.agent_http(node, "/flows?limit=200").expect("flows");
    let flows: serde_json::Value = serde_json::from_str(&flows).expect("flows as JSON");
    flows.as_array().expect("a list").iter().any(|f| {
        f["verdict"] == "drop"
            && f["reason"] == reason
            && f["src"] == src.to_string()
            && f["ifindex"] == ifindex
    })
}

/// The node's uplink (`eth0` in its namespace).
fn uplink_ifindex(netns: &Netns) -> u32 {
    netns
        .within(|| nix::net::if_::if_nametoindex("eth0"))
        .expect("enter the node's namespace")
        .expect("the node's uplink")
}

/// A UDP listener inside the pod; `received` says whether anything arrived within `wait`.
struct Listener(UdpSocket);

impl Listener {
    fn open(netns: &Netns, ip: IpAddr) -> Self {
        let s = netns
            .within(move || UdpSocket::bind(SocketAddr::new(ip, TARGET_PORT)))
            .expect("enter the pod's namespace")
            .expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Self(s)
    }

    fn received(&self, wait: Duration) -> Option<Vec<u8>> {
        let deadline = std::time::Instant::now() + wait;
        let mut buf = [0u8; 2048];
        while std::time::Instant::now() < deadline {
            if let Ok((n, _)) = self.0.recv_from(&mut buf) {
                return Some(buf[..n].to_vec());
            }
        }
        None
    }
}

/// Without XDP on the uplink (the default while there is nothing to prefilter), TC makes
/// the same checks after decapsulation: a pod's forged datagram is dropped on the tunnel
/// device as from an unknown tunnel peer, a node's datagram with a forged inner source as
/// spoofed.
#[tokio::test(flavor = "multi_thread")]
async fn forged_tunnel_packets_are_dropped_by_tc_without_xdp() {
    let mut c = cluster(2, Topology::L2).await;
    let a = pod(&mut c, "default", "a", 0).await;
    let b = pod(&mut c, "default", "b", 1).await;
    c.apply_object(&deny_ingress("default", "lock-b", "b"))
        .unwrap();
    c.sync().await.unwrap();
    assert_eq!(
        xdp_mode(&c, 1).as_deref(),
        Some("weir_agent_xdp_mode{interface=\"\",mode=\"none\"} 1")
    );
    let listener = Listener::open(&b.netns, b.ip);
    let target_node = c.nodes()[1].ip;
    let forged =
        |payload: &[u8]| support::vxlan_udp(target_node, v4(b.ip), 40000, TARGET_PORT, payload);
    let unknown_before = drops(&c, 1, "unknown_tunnel_peer");
    send_vxlan(&a.netns, target_node, forged(b"from a pod"));
    assert_eq!(listener.received(Duration::from_secs(1)), None);
    assert!(drops(&c, 1, "unknown_tunnel_peer") > unknown_before);
    let spoofed_before = drops(&c, 1, "spoofed");
    send_vxlan(
        &c.nodes()[0].netns.clone(),
        target_node,
        forged(b"from a node"),
    );
    assert_eq!(listener.received(Duration::from_secs(1)), None);
    assert!(drops(&c, 1, "spoofed") > spoofed_before);
}

/// Forged tunnel traffic claiming the target node's own address as its inner source (the
/// node-to-pod exemption) is dropped and counted: from a pod (an unknown tunnel peer) and
/// from another node (a known peer, but the inner source is a lie). The node itself still
/// reaches the pod.
async fn forged_tunnel_packets_are_dropped(topology: Topology) {
    let mut c = cluster_with_agent_args(2, topology, &["--uplink-xdp", "always"]).await;
    let a = pod(&mut c, "default", "a", 0).await;
    let b = pod(&mut c, "default", "b", 1).await;
    c.apply_object(&deny_ingress("default", "lock-b", "b"))
        .unwrap();
    c.sync().await.unwrap();
    let listener = Listener::open(&b.netns, b.ip);
    let target_node = c.nodes()[1].ip;
    let forged =
        |payload: &[u8]| support::vxlan_udp(target_node, v4(b.ip), 40000, TARGET_PORT, payload);

    let uplink = uplink_ifindex(&c.nodes()[1].netns);
    let mode = xdp_mode(&c, 1).expect("an XDP mode metric");
    assert_eq!(
        mode, "weir_agent_xdp_mode{interface=\"eth0\",mode=\"native\"} 1",
        "{topology}: XDP runs natively on the node's veth uplink"
    );

    let untrusted_before = drops(&c, 1, "tunnel_untrusted");
    let unknown_before = drops(&c, 1, "unknown_tunnel_peer");
    send_vxlan(&a.netns, target_node, forged(b"from a pod"));
    assert_eq!(
        listener.received(Duration::from_secs(1)),
        None,
        "{topology}: a pod's forged tunnel packet reached the isolated pod"
    );
    assert!(
        drops(&c, 1, "tunnel_untrusted") > untrusted_before,
        "{topology}: XDP drops the pod's datagram as from an untrusted tunnel sender"
    );
    assert_eq!(
        drops(&c, 1, "unknown_tunnel_peer"),
        unknown_before,
        "{topology}: the datagram never reached TC on the tunnel device"
    );

    let spoofed_before = drops(&c, 1, "spoofed");
    let other_node = c.nodes()[0].netns.clone();
    send_vxlan(&other_node, target_node, forged(b"from a node"));
    assert_eq!(
        listener.received(Duration::from_secs(1)),
        None,
        "{topology}: a forged inner source from a known node reached the isolated pod"
    );
    assert!(
        drops(&c, 1, "spoofed") > spoofed_before,
        "{topology}: the inner source claiming the node's address is counted as spoofed"
    );
    assert!(
        dropped_on(&c, 1, "spoofed", target_node, uplink),
        "{topology}: the spoofed inner source is dropped on the uplink (by XDP), not after \
         decapsulation on the tunnel device"
    );

    // What the node itself sends still passes: the listener would have seen the others.
    let node = c.nodes()[1].netns.clone();
    let to = SocketAddr::new(b.ip, TARGET_PORT);
    node.within(move || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?.send_to(b"probe", to))
        .unwrap()
        .unwrap();
    assert_eq!(
        listener.received(Duration::from_secs(2)).as_deref(),
        Some(&b"probe"[..]),
        "{topology}: the node reaches its isolated pod"
    );
}

/// On an IPv6 underlay the tunnel's outer header is IPv6: a pod's forged VXLAN datagram to
/// the node's IPv6 address is dropped by the XDP program before decapsulation, as its outer
/// source (the pod's IPv6 address) is no tunnel peer (real tunnel traffic over an IPv6
/// underlay: `dual_stack.rs`).
#[tokio::test(flavor = "multi_thread")]
async fn forged_tunnel_packets_over_an_ipv6_underlay_are_dropped() {
    let mut c = support::cluster_with(2, Topology::L2, |o| {
        o.ip_family = weir_localcluster::IpFamily::Dual;
        o.ipv6_underlay = true;
        o.agent_args = vec!["--uplink-xdp".into(), "always".into()];
    })
    .await;
    let a = pod(&mut c, "default", "a", 0).await;
    let b = pod(&mut c, "default", "b", 1).await;
    c.apply_object(&deny_ingress("default", "lock-b", "b"))
        .unwrap();
    c.sync().await.unwrap();
    let listener = Listener::open(&b.netns, b.ip);
    let target = &c.nodes()[1];
    let target_v6 = target.ip6.expect("an IPv6 node address");
    let datagram = support::vxlan_udp(
        target.ip,
        v4(b.ip),
        40000,
        TARGET_PORT,
        b"from a pod over IPv6",
    );
    let untrusted_before = drops(&c, 1, "tunnel_untrusted");
    let unknown_before = drops(&c, 1, "unknown_tunnel_peer");
    send_vxlan(&a.netns, target_v6, datagram);
    assert_eq!(
        listener.received(Duration::from_secs(1)),
        None,
        "a pod's forged IPv6 tunnel datagram reached the isolated pod"
    );
    assert!(
        drops(&c, 1, "tunnel_untrusted") > untrusted_before,
        "XDP drops the datagram: its IPv6 outer source is no node"
    );
    assert_eq!(
        drops(&c, 1, "unknown_tunnel_peer"),
        unknown_before,
        "the datagram never reached TC on the tunnel device"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_tunnel_packets_are_dropped_on_one_segment() {
    forged_tunnel_packets_are_dropped(Topology::L2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_tunnel_packets_are_dropped_across_subnets() {
    forged_tunnel_packets_are_dropped(Topology::Routed).await;
}

/// A UDP listener on every address of `netns`; `received` as [`Listener::received`].
fn node_listener(netns: &Netns) -> Listener {
    let s = netns
        .within(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, TARGET_PORT)))
        .expect("enter the node's namespace")
        .expect("bind");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    Listener(s)
}

/// Value of `weir_agent_prefilter_drops_total{cidr,source}` on a node.
fn prefilter_drops(c: &LocalCluster, node: usize, cidr: &str, source: &str) -> Option<u64> {
    let (_, metrics) = c.agent_http(node, "/metrics").expect("metrics");
    let prefix =
        format!("weir_agent_prefilter_drops_total{{cidr=\"{cidr}\",source=\"{source}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|n| n.trim().parse().expect("a count"))
}

/// A host outside the cluster in a prefiltered prefix is dropped by XDP on the node's
/// uplink (counted per prefix and as `prefilter`) while another node still gets through.
#[tokio::test(flavor = "multi_thread")]
async fn a_prefiltered_sender_is_dropped_at_the_uplink_and_others_pass() {
    let dir = std::env::temp_dir().join(format!("weir-prefilter-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("prefilter");
    let external_net = format!("{}/32", weir_localcluster::EXTERNAL_IP);
    std::fs::write(&file, format!("# test\n{external_net}\nnot-a-cidr\n")).unwrap();
    let c = cluster_with_agent_args(
        2,
        Topology::L2,
        &["--prefilter-file", file.to_str().unwrap()],
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    let external = c.external().expect("external host").clone();
    let target = c.nodes()[0].ip;
    let listener = node_listener(&c.nodes()[0].netns);
    assert_eq!(prefilter_drops(&c, 0, &external_net, "file"), Some(0));

    let send = |from: &Netns, payload: &'static [u8]| {
        from.within(move || {
            UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?.send_to(payload, (target, TARGET_PORT))
        })
        .expect("enter the sender's namespace")
        .expect("send");
    };
    send(&external.netns, b"from the prefiltered host");
    assert_eq!(
        listener.received(Duration::from_secs(1)),
        None,
        "the prefiltered host reached the node"
    );
    assert!(prefilter_drops(&c, 0, &external_net, "file").unwrap() > 0);
    assert!(drops(&c, 0, "prefilter") > 0);

    let other = c.nodes()[1].netns.clone();
    send(&other, b"from another node");
    assert_eq!(
        listener.received(Duration::from_secs(2)).as_deref(),
        Some(&b"from another node"[..]),
        "a sender outside the prefilter passes"
    );
    let (_, metrics) = c.agent_http(0, "/metrics").unwrap();
    assert!(
        metrics.contains("weir_agent_prefilter_invalid_lines 1"),
        "the line that is not a CIDR is reported: {metrics}"
    );
}

/// Sends one UDP datagram from inside `from` to `to`:[`TARGET_PORT`].
fn send_udp(from: &Netns, to: Ipv4Addr, payload: &'static [u8]) {
    from.within(move || {
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?.send_to(payload, (to, TARGET_PORT))
    })
    .expect("enter the sender's namespace")
    .expect("send");
}

/// A DropCIDRSet reaches every node's prefilter: the external host it lists is dropped by
/// XDP on each node (counted under the set's name) while the nodes still reach each other;
/// an entry holding a node's address is left out and reported, the set's other entries
/// apply; an agent that restarts keeps dropping; deleting the set lets the host through.
/// The XDP program is on the uplinks only while the set lists something.
#[tokio::test(flavor = "multi_thread")]
async fn a_drop_cidr_set_reaches_every_node_and_spares_the_cluster() {
    let mut c = cluster(2, Topology::L2).await;
    let external = c.external().expect("external host").clone();
    let external_net = format!("{}/32", weir_localcluster::EXTERNAL_IP);
    let node1_net = format!("{}/32", c.nodes()[1].ip);
    const NO_XDP: &str = "weir_agent_xdp_mode{interface=\"\",mode=\"none\"} 1";
    const NATIVE: &str = "weir_agent_xdp_mode{interface=\"eth0\",mode=\"native\"} 1";
    for node in 0..2 {
        assert_eq!(
            xdp_mode(&c, node).as_deref(),
            Some(NO_XDP),
            "node {node}: no XDP while nothing is prefiltered"
        );
        assert!(!xdp_attached(&c.nodes()[node].netns), "node {node}");
    }
    c.apply_object(&json!({
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "DropCIDRSet",
        "metadata": {"name": "scanners"},
        "spec": {"cidrs": [external_net, node1_net, "not-a-cidr"]},
    }))
    .unwrap();
    c.sync().await.unwrap();

    for node in 0..2 {
        assert_eq!(
            xdp_mode(&c, node).as_deref(),
            Some(NATIVE),
            "node {node}: XDP attached for the set"
        );
        assert!(xdp_attached(&c.nodes()[node].netns), "node {node}");
        let listener = node_listener(&c.nodes()[node].netns);
        send_udp(&external.netns, c.nodes()[node].ip, b"from a listed host");
        assert_eq!(
            listener.received(Duration::from_secs(1)),
            None,
            "the listed host reached node {node}"
        );
        assert!(
            prefilter_drops(&c, node, &external_net, "scanners").unwrap_or(0) > 0,
            "node {node} counts the drop under the set's name"
        );
        assert!(drops(&c, node, "prefilter") > 0);
        assert_eq!(
            prefilter_drops(&c, node, &node1_net, "scanners"),
            None,
            "an entry holding a node's address is left out"
        );
    }
    let listener = node_listener(&c.nodes()[0].netns);
    send_udp(&c.nodes()[1].netns.clone(), c.nodes()[0].ip, b"from node 1");
    assert_eq!(
        listener.received(Duration::from_secs(2)).as_deref(),
        Some(&b"from node 1"[..]),
        "a node listed by mistake still reaches the others"
    );
    let log = std::fs::read_to_string(c.controller().unwrap().dir.join("controller.log")).unwrap();
    for problem in ["holds node", "not a CIDR"] {
        assert!(
            log.lines()
                .any(|l| l.contains("DropCIDRSet scanners") && l.contains(problem)),
            "the controller reports the entry that {problem}: {log}"
        );
    }

    // An agent that restarts keeps the prefilter: while it is down, and once it is back.
    c.kill_agent(0);
    send_udp(&external.netns, c.nodes()[0].ip, b"while no agent runs");
    assert_eq!(listener.received(Duration::from_secs(1)), None);
    c.start_agent(0).await.unwrap();
    send_udp(&external.netns, c.nodes()[0].ip, b"while the agent starts");
    assert_eq!(listener.received(Duration::from_secs(1)), None);
    c.wait_agent_ready(0, Duration::from_secs(30))
        .await
        .unwrap();
    send_udp(&external.netns, c.nodes()[0].ip, b"after the restart");
    assert_eq!(listener.received(Duration::from_secs(1)), None);
    assert!(prefilter_drops(&c, 0, &external_net, "scanners").unwrap_or(0) > 0);

    c.delete_object("DropCIDRSet", None, "scanners").unwrap();
    c.sync().await.unwrap();
    send_udp(&external.netns, c.nodes()[0].ip, b"no longer listed");
    assert_eq!(
        listener.received(Duration::from_secs(2)).as_deref(),
        Some(&b"no longer listed"[..]),
        "a deleted set drops nothing"
    );
    assert_eq!(prefilter_drops(&c, 0, &external_net, "scanners"), None);
    for node in 0..2 {
        assert_eq!(
            xdp_mode(&c, node).as_deref(),
            Some(NO_XDP),
            "node {node}: XDP detached with the set"
        );
        assert!(!xdp_attached(&c.nodes()[node].netns), "node {node}");
    }
}

/// Whether the kernel shows an XDP program on the node's uplink.
fn xdp_attached(node: &Netns) -> bool {
    let out = node.ip(&["link", "show", "dev", "eth0"]).expect("ip link");
    out.contains("prog/xdp")
}

/// Packets the node's pinned drop counters hold under reason `prefilter`. Read from the
/// pinned map, which outlives the agent, so it can be read while no agent runs.
fn pinned_prefilter_drops(c: &LocalCluster, node: usize) -> u64 {
    let pins = PinLayout::new(std::path::Path::new("/sys/fs/bpf"), &c.nodes()[node].name);
    pinned_drop_counts(&pins)
        .expect("reading the pinned drop counters")
        .into_iter()
        .find(|(r, _)| *r == DropReason::Prefilter)
        .map_or(0, |(_, n)| n)
}

/// A UDP sender in its own thread inside `from`, one datagram to `to`:[`TARGET_PORT`]
/// every `every` until dropped.
struct UdpStream {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpStream {
    fn start(from: &Netns, to: Ipv4Addr, payload: &'static [u8], every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (flag, count) = (stop.clone(), sent.clone());
        let path = from.path();
        let thread = std::thread::spawn(move || {
            weir_conformance::netns::enter(&path).expect("enter the sender's namespace");
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
            while !flag.load(Ordering::Relaxed) {
                if s.send_to(payload, (to, TARGET_PORT)).is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(every);
            }
        });
        Self {
            stop,
            sent,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Counts what a [`Listener`] receives, by payload, on a thread of its own.
struct Tally {
    flood: Arc<AtomicU64>,
    benign: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Tally {
    fn start(listener: Listener, flood_payload: &'static [u8]) -> Self {
        let (flood, benign, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (f, b, s) = (flood.clone(), benign.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, _)) = listener.0.recv_from(&mut buf) {
                    let counter = if &buf[..n] == flood_payload { &f } else { &b };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Self {
            flood,
            benign,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An agent killed with SIGKILL and restarted while a host in a `DropCIDRSet` floods its
/// node: the prefilter keeps dropping throughout. The drop counter (read from the pinned
/// maps) rises while the agent runs, while it is dead, while it starts and once it is back;
/// not one flood datagram reaches the node's socket; a sender outside the set gets through
/// in every phase.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_under_a_flood_keeps_dropping() {
    const FLOOD: &[u8] = b"flood from a denied host";
    let mut c = cluster(2, Topology::L2).await;
    let external = c.external().expect("external host").clone();
    let external_net = format!("{}/32", weir_localcluster::EXTERNAL_IP);
    c.apply_object(&json!({
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "DropCIDRSet",
        "metadata": {"name": "flooders"},
        "spec": {"cidrs": [external_net]},
    }))
    .unwrap();
    c.sync().await.unwrap();
    let target = c.nodes()[0].ip;
    let tally = Tally::start(node_listener(&c.nodes()[0].netns), FLOOD);
    // A modest rate: this is about correctness, not speed.
    let flood = UdpStream::start(&external.netns, target, FLOOD, Duration::from_micros(200));
    let benign = UdpStream::start(
        &c.nodes()[1].netns.clone(),
        target,
        b"from another node",
        Duration::from_millis(20),
    );

    // Each phase: the counter rises, benign datagrams arrive, no flood datagram does.
    let mut last = pinned_prefilter_drops(&c, 0);
    let mut check = |c: &LocalCluster, phase: &str| {
        let benign_before = tally.benign.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(500));
        let now = pinned_prefilter_drops(c, 0);
        assert!(
            now > last,
            "{phase}: the prefilter drop counter did not rise ({last} → {now})"
        );
        last = now;
        assert!(
            tally.benign.load(Ordering::Relaxed) > benign_before,
            "{phase}: the benign sender did not get through"
        );
        assert_eq!(
            tally.flood.load(Ordering::Relaxed),
            0,
            "{phase}: a flood datagram reached the node"
        );
    };
    check(&c, "before the kill");
    c.kill_agent(0);
    check(&c, "agent dead");
    check(&c, "agent still dead");
    c.start_agent(0).await.unwrap();
    check(&c, "agent starting");
    c.wait_agent_ready(0, Duration::from_secs(30))
        .await
        .unwrap();
    check(&c, "agent back");
    c.sync().await.unwrap();
    check(&c, "agent back and in sync");
    let sent = flood.sent.load(Ordering::Relaxed);
    drop(flood);
    drop(benign);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        tally.flood.load(Ordering::Relaxed),
        0,
        "flood datagrams reached the node"
    );
    assert!(sent > 1_000, "the flood sent only {sent} datagrams");
    assert!(
        prefilter_drops(&c, 0, &external_net, "flooders").unwrap_or(0) > 0,
        "the restarted agent reports the set's drops"
    );
}
