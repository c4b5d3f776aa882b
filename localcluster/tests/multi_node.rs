//! End to end across nodes, in both topologies: nodes on one L2 segment (direct routing) and
//! nodes in two subnets joined by a router (VXLAN between them).

mod support;

use std::{net::IpAddr, time::Duration};

use support::{LiveStream, cluster, ping, pod, probe};
use weir_conformance::{Protocol, probe::Servers};
use weir_localcluster::{LocalCluster, Topology};

/// Pods on different nodes reach each other over TCP, UDP, SCTP and ICMP, and the nodes
/// reach the other nodes' pods.
async fn cross_node_connectivity(topology: Topology) {
    let mut c = cluster(2, topology).await;
    let a = pod(&mut c, "default", "a", 0).await;
    let b = pod(&mut c, "default", "b", 1).await;
    assert_ne!(a.node, b.node);
    let _sb = Servers::start(&b.netns.path(), &[80], &Protocol::ALL).expect("servers");
    let _sa = Servers::start(&a.netns.path(), &[80], &Protocol::ALL).expect("servers");
    for protocol in Protocol::ALL {
        let there = probe(&a.netns, b.ip, 80, protocol).await;
        assert!(
            there.is_connected(),
            "{topology}: a -> b over {protocol}: {there:?}"
        );
        let back = probe(&b.netns, a.ip, 80, protocol).await;
        assert!(
            back.is_connected(),
            "{topology}: b -> a over {protocol}: {back:?}"
        );
    }
    assert!(ping(&a.netns, b.ip), "{topology}: a pings b");
    // Host-originated traffic to another node's pod goes through kernel routes.
    let node1 = c.nodes()[0].netns.clone();
    assert!(
        probe(&node1, b.ip, 80, Protocol::Tcp).await.is_connected(),
        "{topology}: node 1 -> pod on node 2"
    );
    // A pod reaches another node's own address.
    let node2_ip = IpAddr::V4(c.nodes()[1].ip);
    assert!(
        ping(&a.netns, node2_ip),
        "{topology}: pod on node 1 pings node 2"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_on_different_nodes_of_one_segment_talk_over_every_protocol() {
    cross_node_connectivity(Topology::L2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_on_nodes_in_different_subnets_talk_over_every_protocol() {
    cross_node_connectivity(Topology::Routed).await;
}

/// A bulk transfer with full-size segments (the pod MTU leaves room for encapsulation, so
/// nothing needs fragmenting and no packet is lost to a too-small path).
async fn large_transfer(topology: Topology) {
    let mut c = cluster(2, topology).await;
    let a = pod(&mut c, "default", "a", 0).await;
    let b = pod(&mut c, "default", "b", 1).await;
    let stream = LiveStream::start_bulk(&a.netns, &b.netns, b.ip, 9100, 64 * 1024 * 1024);
    let received = stream.wait_done(Duration::from_secs(30)).await;
    assert_eq!(
        received,
        64 * 1024 * 1024,
        "{topology}: the whole transfer arrived"
    );
    // Datagrams as large as the pod MTU allows get through unfragmented, both ways.
    for (from, to) in [(&a, &b), (&b, &a)] {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                from.netns.name(),
                "ping",
                "-c",
                "2",
                "-W",
                "2",
                "-M",
                "do",
                "-s",
            ])
            .arg((1450 - 28).to_string())
            .arg(to.ip.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{topology}: MTU-sized ping with DF: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn transfers_with_full_size_packets_cross_one_segment() {
    large_transfer(Topology::L2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn transfers_with_full_size_packets_cross_the_tunnel() {
    large_transfer(Topology::Routed).await;
}

async fn first_ip_on(c: &LocalCluster, node: usize) -> IpAddr {
    c.pods()
        .find(|p| p.node == c.nodes()[node].name)
        .unwrap()
        .ip
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_join_and_leave_while_traffic_flows() {
    let mut c = cluster(2, Topology::Routed).await;
    let a = pod(&mut c, "default", "a", 0).await;
    let b = pod(&mut c, "default", "b", 1).await;
    let stream = LiveStream::start(&a.netns, &b.netns, b.ip, 9200);
    stream
        .assert_flowing("before", Duration::from_millis(500))
        .await;

    // A third node joins (in the first subnet): it gets its own pod CIDR, and pods on it
    // reach the others, directly or through the tunnel.
    let idx = c.add_node().await.expect("node joins");
    let d = pod(&mut c, "default", "d", idx).await;
    assert!(
        !c.nodes()[..2].iter().any(|n| n.name == d.node),
        "d runs on the new node"
    );
    let _sb = Servers::start(&b.netns.path(), &[80], &[Protocol::Tcp]).unwrap();
    let _sa = Servers::start(&a.netns.path(), &[80], &[Protocol::Tcp]).unwrap();
    assert!(
        probe(&d.netns, b.ip, 80, Protocol::Tcp)
            .await
            .is_connected(),
        "new node -> node 2"
    );
    assert!(
        probe(&d.netns, a.ip, 80, Protocol::Tcp)
            .await
            .is_connected(),
        "new node -> node 1"
    );
    stream
        .assert_flowing("after a node joined", Duration::from_millis(500))
        .await;
    let d_ip = first_ip_on(&c, idx).await;

    // It leaves: the others stop routing to it, and traffic between them never stopped.
    c.remove_node(idx).await.expect("node leaves");
    stream
        .assert_flowing("after a node left", Duration::from_millis(500))
        .await;
    assert!(
        !ping(&a.netns, d_ip),
        "nothing answers for the departed node's pods"
    );
    assert!(!stream.failed());
    stream.stop();
}
