//! hostPort with a `hostIP`, end to end: node 1 gets a second address on its uplink (inside
//! the test's own namespaces); a pod whose hostPort names the node's address is reached
//! there from the other node, while the same port on the node's second address is not
//! translated (the node's own socket there gets the connection); a second pod may then map
//! the same port on the second address, and each address leads to its own pod. A third pod
//! on the same address, one on every address, and one naming an address the node does not
//! have are refused.

mod support;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use support::{cluster, source_seen_by};
use weir_localcluster::{LocalCluster, PodSpec, Topology};

const HOST_PORT: u16 = 8082;
const TARGET: u16 = 8080;

/// The value of an unlabelled metric of node `node`'s agent.
fn metric(c: &LocalCluster, node: usize, name: &str) -> Option<i64> {
    let (_, metrics) = c.agent_http(node, "/metrics").expect("metrics");
    metrics.lines().find_map(|l| {
        l.strip_prefix(name)?
            .strip_prefix(' ')
            .and_then(|v| v.parse().ok())
    })
}

fn spec(name: &str) -> PodSpec {
    PodSpec {
        namespace: "default".into(),
        name: name.into(),
        node: 0,
        labels: BTreeMap::from([("pod".to_string(), name.to_string())]),
        ports: vec![],
        host_ports: vec![(HOST_PORT, TARGET, "TCP".into())],
    }
}

async fn host_ip_opens_the_port_on_that_address_alone(topology: Topology) {
    let mut c = cluster(2, topology).await;
    let node1 = c.nodes()[0].netns.clone();
    let node2 = c.nodes()[1].netns.clone();
    let (ip1, ip2) = (c.nodes()[0].ip, IpAddr::V4(c.nodes()[1].ip));
    // A second address of node 1, in its segment's /24 but outside the addresses the local
    // cluster hands out (.1 routers, .2 controller, .11 and up nodes).
    let [a, b, s, _] = ip1.octets();
    let second = Ipv4Addr::new(a, b, s, 200);
    node1
        .ip(&["addr", "add", &format!("{second}/24"), "dev", "eth0"])
        .expect("second address on the uplink");
    let (ip1, second) = (IpAddr::V4(ip1), IpAddr::V4(second));

    let web1 = c
        .add_pod_with_host_ip(spec("web1"), ip1)
        .await
        .expect("hostPort on the node's address");
    c.sync().await.expect("sync");
    assert_eq!(
        metric(&c, 0, "weir_agent_host_ports"),
        Some(1),
        "{topology}"
    );

    // Reached at the node's address from the other node, with the client's address kept.
    let seen = source_seen_by(
        &web1.netns,
        web1.ip,
        TARGET,
        &node2,
        SocketAddr::new(ip1, HOST_PORT),
    );
    assert_eq!(seen, ip2, "{topology}: web1 through {ip1}");
    // The same port on the node's second address is not translated: a socket of the node's
    // own on that address gets the connection.
    let seen = source_seen_by(
        &node1,
        second,
        HOST_PORT,
        &node2,
        SocketAddr::new(second, HOST_PORT),
    );
    assert_eq!(seen, ip2, "{topology}: the node's own socket on {second}");

    // So another pod may map the same port there; each address leads to its own pod.
    let web2 = c
        .add_pod_with_host_ip(spec("web2"), second)
        .await
        .expect("the same port on the node's second address");
    c.sync().await.expect("sync");
    assert_eq!(
        metric(&c, 0, "weir_agent_host_ports"),
        Some(2),
        "{topology}"
    );
    for (pod, to) in [(&web2, second), (&web1, ip1), (&web2, second)] {
        let seen = source_seen_by(
            &pod.netns,
            pod.ip,
            TARGET,
            &node2,
            SocketAddr::new(to, HOST_PORT),
        );
        assert_eq!(seen, ip2, "{topology}: {} through {to}", pod.name);
    }

    // Refused: the same address again, every address, an address the node does not have.
    let refused = c
        .add_pod_with_host_ip(spec("web3"), ip1)
        .await
        .expect_err("the port is taken on that address");
    assert!(
        format!("{refused:#}")
            .contains("already in use on this node by the hostPort of pod default/web1"),
        "{topology}: {refused:#}"
    );
    let refused = c
        .add_pod(spec("web4"))
        .await
        .expect_err("the port is taken on some address");
    assert!(
        format!("{refused:#}").contains("already in use on this node by the hostPort of pod"),
        "{topology}: {refused:#}"
    );
    let stranger = IpAddr::V4(Ipv4Addr::new(a, b, s, 201));
    let refused = c
        .add_pod_with_host_ip(spec("web5"), stranger)
        .await
        .expect_err("not an address of the node");
    assert!(
        format!("{refused:#}")
            .contains(&format!("hostIP {stranger} is not an address of this node")),
        "{topology}: {refused:#}"
    );
    assert_eq!(
        metric(&c, 0, "weir_agent_host_ports"),
        Some(2),
        "{topology}"
    );

    // Deleted: its address is the node's own again.
    c.remove_pod("default", "web1").await.expect("delete");
    let seen = source_seen_by(
        &node1,
        ip1,
        HOST_PORT,
        &node2,
        SocketAddr::new(ip1, HOST_PORT),
    );
    assert_eq!(seen, ip2, "{topology}: the node's own socket on {ip1}");
    assert_eq!(
        metric(&c, 0, "weir_agent_host_ports"),
        Some(1),
        "{topology}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn host_ip_opens_the_port_on_that_address_alone_on_one_segment() {
    host_ip_opens_the_port_on_that_address_alone(Topology::L2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn host_ip_opens_the_port_on_that_address_alone_across_subnets() {
    host_ip_opens_the_port_on_that_address_alone(Topology::Routed).await;
}
