//! Pods reach a host outside the cluster, which sees their node's address (masquerade), in
//! both topologies; an egress policy towards the outside still applies to the pod.

mod support;

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use serde_json::json;
use support::{cluster, pod, probe};
use weir_conformance::{Protocol, probe::Servers};
use weir_localcluster::{Topology, netns::Netns};

/// Where the external host saw a TCP connection and a UDP datagram from `client` come from.
fn sources_seen_by(external: &Netns, ip: IpAddr, client: &Netns) -> (SocketAddr, SocketAddr) {
    let (tcp, udp) = external
        .within(move || {
            let tcp = TcpListener::bind((ip, 8080)).expect("tcp listen");
            let udp = UdpSocket::bind((ip, 8081)).expect("udp bind");
            (tcp, udp)
        })
        .expect("external namespace");
    let server = std::thread::spawn(move || {
        let (mut stream, tcp_peer) = tcp.accept().expect("accept");
        stream.write_all(b"hi").expect("tcp reply");
        udp.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 16];
        let (n, udp_peer) = udp.recv_from(&mut buf).expect("udp request");
        udp.send_to(&buf[..n], udp_peer).expect("udp reply");
        (tcp_peer, udp_peer)
    });
    client
        .within(move || {
            let mut stream =
                TcpStream::connect_timeout(&SocketAddr::new(ip, 8080), Duration::from_secs(5))
                    .expect("pod connects to the external host over TCP");
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut reply = [0u8; 2];
            stream
                .read_exact(&mut reply)
                .expect("TCP reply reaches the pod");
            let any = if ip.is_ipv6() { "::" } else { "0.0.0.0" };
            let udp = UdpSocket::bind((any, 0)).expect("udp client");
            udp.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            udp.send_to(b"ping", (ip, 8081)).expect("udp send");
            let mut buf = [0u8; 16];
            let (n, _) = udp.recv_from(&mut buf).expect("UDP reply reaches the pod");
            assert_eq!(&buf[..n], b"ping");
        })
        .expect("pod namespace");
    server.join().expect("external server")
}

/// IPv6 too: pods' unique local IPv6 addresses are masqueraded to their node's IPv6
/// address, on nodes known by IPv6 addresses (the external host has an IPv6 address there),
/// across a router.
#[tokio::test(flavor = "multi_thread")]
async fn pods_reach_the_outside_over_ipv6_with_their_node_address() {
    let mut c = support::cluster_with(2, Topology::Routed, |o| {
        o.ip_family = weir_localcluster::IpFamily::Dual;
        o.ipv6_underlay = true;
    })
    .await;
    let external = c.external().expect("external host").clone();
    let ext_ip = IpAddr::V6(external.ip6.expect("an IPv6 external host"));
    for (name, node) in [("a", 0), ("b", 1)] {
        let p = pod(&mut c, "default", name, node).await;
        assert!(p.ips.iter().any(IpAddr::is_ipv6), "{:?}", p.ips);
        let node_ip = IpAddr::V6(c.nodes()[node].ip6.expect("an IPv6 node address"));
        let (tcp, udp) = sources_seen_by(&external.netns, ext_ip, &p.netns);
        assert_eq!(
            tcp.ip(),
            node_ip,
            "TCP from pod {name} arrives from its node"
        );
        assert_eq!(
            udp.ip(),
            node_ip,
            "UDP from pod {name} arrives from its node"
        );
    }
}

async fn pods_reach_the_outside_with_their_node_address(topology: Topology) {
    let mut c = cluster(2, topology).await;
    let external = c.external().expect("external host").clone();
    let ext_ip = IpAddr::V4(external.ip);
    for (name, node) in [("a", 0), ("b", 1)] {
        let p = pod(&mut c, "default", name, node).await;
        let node_ip = IpAddr::V4(c.nodes()[node].ip);
        let (tcp, udp) = sources_seen_by(&external.netns, ext_ip, &p.netns);
        assert_eq!(
            tcp.ip(),
            node_ip,
            "{topology}: TCP from pod {name} arrives from its node"
        );
        assert_eq!(
            udp.ip(),
            node_ip,
            "{topology}: UDP from pod {name} arrives from its node"
        );
    }

    // An egress policy denying the external address blocks pod a, and only pod a.
    let _servers =
        Servers::start(&external.netns.path(), &[80], &[Protocol::Tcp]).expect("servers");
    let a = c.pod("default", "a").expect("pod a").clone();
    let b = c.pod("default", "b").expect("pod b").clone();
    assert!(
        probe(&a.netns, ext_ip, 80, Protocol::Tcp)
            .await
            .is_connected()
    );
    c.apply_object(&json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "no-outside", "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"pod": "a"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": [format!("{ext_ip}/32")]}}]}],
        },
    }))
    .expect("apply");
    c.sync().await.expect("sync");
    let denied = probe(&a.netns, ext_ip, 80, Protocol::Tcp).await;
    assert!(
        denied.is_denied(),
        "{topology}: egress ipBlock except blocks the outside: {denied:?}"
    );
    assert!(
        probe(&b.netns, ext_ip, 80, Protocol::Tcp)
            .await
            .is_connected(),
        "{topology}: a pod the policy does not select still reaches the outside"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_on_one_segment_reach_the_outside_with_their_node_address() {
    pods_reach_the_outside_with_their_node_address(Topology::L2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_in_different_subnets_reach_the_outside_with_their_node_address() {
    pods_reach_the_outside_with_their_node_address(Topology::Routed).await;
}
