//! NodePort end to end, in both topologies: a Service whose only backend runs on node 1 is
//! reached on every node's address from a host outside the cluster, from another node and
//! from a pod. A connection arriving at the backend's own node keeps the client's address;
//! one arriving at the other node is forwarded with that node's address, and its replies
//! are translated back there. Under `externalTrafficPolicy: Local` the node without a
//! backend refuses the outside but serves pods and nodes, as kube-proxy does.

mod support;

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
};

use serde_json::json;
use support::{cluster, pod, probe};
use weir_conformance::{Protocol, probe::Servers};
use weir_localcluster::{Topology, netns::Netns};

const NODE_PORT: u16 = 30080;
const TARGET: u16 = 8080;
/// The Service port.
const SERVICE_PORT: u16 = 80;

/// Connects from `client` to `to` (port NODE_PORT unless given) over TCP, gets the
/// backend's greeting, and returns the address the backend saw the connection come from.
fn seen_by_backend(
    backend: &Netns,
    backend_ip: IpAddr,
    client: &Netns,
    to: impl Into<SocketAddr>,
) -> IpAddr {
    support::source_seen_by(backend, backend_ip, TARGET, client, to.into())
}

async fn node_port_is_open_on_every_node(topology: Topology) {
    let mut c = cluster(2, topology).await;
    let web = pod(&mut c, "default", "web", 0).await;
    let client = pod(&mut c, "default", "client", 1).await;
    c.apply_object(&json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "type": "NodePort",
            "clusterIP": "10.96.0.80",
            "selector": {"pod": "web"},
            "ports": [
                {"name": "tcp", "port": SERVICE_PORT, "targetPort": TARGET, "protocol": "TCP", "nodePort": NODE_PORT},
                {"name": "udp", "port": SERVICE_PORT, "targetPort": TARGET, "protocol": "UDP", "nodePort": NODE_PORT},
            ],
        },
    }))
    .expect("apply");
    c.apply_object(&json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "nobody", "namespace": "default"},
        "spec": {
            "clusterIP": "10.96.0.81",
            "selector": {"pod": "nobody"},
            "ports": [
                {"name": "tcp", "port": SERVICE_PORT, "protocol": "TCP"},
                {"name": "udp", "port": SERVICE_PORT, "protocol": "UDP"},
            ],
        },
    }))
    .expect("apply");
    c.sync().await.expect("sync");
    // Each node holds the ClusterIP and the NodePort frontends of both ports of `web`, one
    // backend slot each, and the two ClusterIP frontends of `nobody`, without backends.
    for node in 0..2 {
        let (_, metrics) = c.agent_http(node, "/metrics").expect("metrics");
        for line in ["weir_agent_services 6", "weir_agent_service_backends 4"] {
            assert!(
                metrics.lines().any(|l| l == line),
                "{topology}: node {node} has no `{line}`:\n{metrics}"
            );
        }
    }
    let external = c.external().expect("external host").clone();
    let (node1, node2) = (&c.nodes()[0], &c.nodes()[1]);
    let (ip1, ip2) = (IpAddr::V4(node1.ip), IpAddr::V4(node2.ip));

    // From outside: the backend's node keeps the client's address, the other node forwards
    // with its own.
    let seen = seen_by_backend(&web.netns, web.ip, &external.netns, (ip1, NODE_PORT));
    assert_eq!(
        seen,
        IpAddr::V4(external.ip),
        "{topology}: via the backend's node"
    );
    let seen = seen_by_backend(&web.netns, web.ip, &external.netns, (ip2, NODE_PORT));
    assert_eq!(seen, ip2, "{topology}: via the other node");
    // From the other node's host and from a pod on it, to both nodes (a node's processes
    // reach its own address over loopback, translated at the socket).
    for to in [ip1, ip2] {
        seen_by_backend(&web.netns, web.ip, &node2.netns, (to, NODE_PORT));
        seen_by_backend(&web.netns, web.ip, &client.netns, (to, NODE_PORT));
    }

    // The backend reaches itself through its ClusterIP and its node's NodePort (hairpin),
    // seeing the frontend's address as its peer.
    let cluster_ip: IpAddr = "10.96.0.80".parse().unwrap();
    let seen = seen_by_backend(&web.netns, web.ip, &web.netns, (cluster_ip, SERVICE_PORT));
    assert_eq!(
        seen, cluster_ip,
        "{topology}: hairpin through the ClusterIP"
    );
    let seen = seen_by_backend(&web.netns, web.ip, &web.netns, (ip1, NODE_PORT));
    assert_eq!(seen, ip1, "{topology}: hairpin through the NodePort");

    // A Service without backends refuses at once, as a closed port does.
    client
        .netns
        .within(|| {
            let ip: IpAddr = "10.96.0.81".parse().unwrap();
            let err = TcpStream::connect_timeout(
                &SocketAddr::new(ip, SERVICE_PORT),
                Duration::from_secs(5),
            )
            .expect_err("nothing serves it");
            assert_eq!(
                err.kind(),
                std::io::ErrorKind::ConnectionRefused,
                "TCP: {err}"
            );
            let udp = std::net::UdpSocket::bind(("0.0.0.0", 0)).expect("udp");
            udp.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            udp.connect((ip, SERVICE_PORT)).expect("connect");
            udp.send(b"ping").expect("send");
            let err = udp.recv(&mut [0u8; 8]).expect_err("nothing serves it");
            assert_eq!(
                err.kind(),
                std::io::ErrorKind::ConnectionRefused,
                "UDP: {err}"
            );
        })
        .expect("client namespace");

    // The refusals are drop events naming the Service port (read from the ring buffer by
    // the agent as they come: give it a moment).
    for port in ["default/nobody:tcp", "default/nobody:udp"] {
        let mut flows = serde_json::Value::Null;
        let mut found = false;
        for _ in 0..50 {
            let (_, body) = c.agent_http(1, "/flows?limit=100").expect("flows");
            flows = serde_json::from_str(&body).expect("JSON");
            found = flows
                .as_array()
                .into_iter()
                .flatten()
                .any(|f| f["reason"] == "service_no_backend" && f["service"] == port);
            if found {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            found,
            "{topology}: no drop event naming {port} in {flows:#}"
        );
    }

    // UDP, with fresh sockets each time.
    let _servers = Servers::start(&web.netns.path(), &[TARGET], &[Protocol::Udp]).expect("servers");
    for (from, to) in [
        (&external.netns, ip1),
        (&external.netns, ip2),
        (&node2.netns, ip1),
        (&node2.netns, ip2),
        (&client.netns, ip1),
        (&client.netns, ip2),
    ] {
        for _ in 0..3 {
            let outcome = probe(from, to, NODE_PORT, Protocol::Udp).await;
            assert!(
                outcome.is_connected(),
                "{topology}: UDP {} -> {to}:{NODE_PORT}: {outcome:?}",
                from.name()
            );
        }
    }
    // A port that is not a nodePort is still the node's own business: nothing listens.
    let closed = probe(&external.netns, ip2, NODE_PORT + 1, Protocol::Tcp).await;
    assert!(!closed.is_connected(), "{topology}: {closed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn node_port_is_open_on_every_node_on_one_segment() {
    node_port_is_open_on_every_node(Topology::L2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn node_port_is_open_on_every_node_across_subnets() {
    node_port_is_open_on_every_node(Topology::Routed).await;
}

/// `externalTrafficPolicy: Local`, as kube-proxy implements it: a node without a backend of
/// its own refuses clients from outside the cluster, but pods and nodes — the node's own
/// and the others — reach the Service through it on any backend of the cluster. A node with
/// a backend serves the outside with the client's address kept.
async fn external_traffic_policy_local_spares_cluster_clients(topology: Topology) {
    let mut c = cluster(2, topology).await;
    let web = pod(&mut c, "default", "web", 0).await;
    let pods = [
        pod(&mut c, "default", "client-0", 0).await,
        pod(&mut c, "default", "client-1", 1).await,
    ];
    c.apply_object(&json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web-local", "namespace": "default"},
        "spec": {
            "type": "NodePort",
            "clusterIP": "10.96.0.82",
            "externalTrafficPolicy": "Local",
            "selector": {"pod": "web"},
            "ports": [
                {"name": "tcp", "port": SERVICE_PORT, "targetPort": TARGET, "protocol": "TCP", "nodePort": NODE_PORT},
                {"name": "udp", "port": SERVICE_PORT, "targetPort": TARGET, "protocol": "UDP", "nodePort": NODE_PORT},
            ],
        },
    }))
    .expect("apply");
    c.sync().await.expect("sync");
    let external = c.external().expect("external host").clone();
    let nodes: Vec<(Netns, IpAddr)> = c
        .nodes()
        .iter()
        .map(|n| (n.netns.clone(), IpAddr::V4(n.ip)))
        .collect();
    let (ip0, ip1) = (nodes[0].1, nodes[1].1);

    // From outside: the backend's node serves with the client's address kept, the other
    // node has no backend of its own and refuses.
    let seen = seen_by_backend(&web.netns, web.ip, &external.netns, (ip0, NODE_PORT));
    assert_eq!(
        seen,
        IpAddr::V4(external.ip),
        "{topology}: via the backend's node"
    );
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let _servers = Servers::start(&web.netns.path(), &[TARGET], &[protocol]).expect("servers");
        let outcome = probe(&external.netns, ip1, NODE_PORT, protocol).await;
        assert!(
            !outcome.is_connected(),
            "{topology}: {protocol:?} from outside via the node without a backend: {outcome:?}"
        );
    }

    // From inside the cluster, every node's port leads to the backend: pods of both nodes,
    // both nodes' own processes.
    let clients = [
        ("pod on node 0", &pods[0].netns),
        ("pod on node 1", &pods[1].netns),
        ("node 0", &nodes[0].0),
        ("node 1", &nodes[1].0),
    ];
    let _servers = Servers::start(
        &web.netns.path(),
        &[TARGET],
        &[Protocol::Tcp, Protocol::Udp],
    )
    .expect("servers");
    let mut failures = Vec::new();
    for (client, netns) in clients {
        for to in [ip0, ip1] {
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                // Twice: each time a new flow.
                for _ in 0..2 {
                    let outcome = probe(netns, to, NODE_PORT, protocol).await;
                    if !outcome.is_connected() {
                        failures.push(format!("{protocol:?} {client} -> {to}: {outcome:?}"));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{topology}: {failures:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn external_traffic_policy_local_on_one_segment() {
    external_traffic_policy_local_spares_cluster_clients(Topology::L2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn external_traffic_policy_local_across_subnets() {
    external_traffic_policy_local_spares_cluster_clients(Topology::Routed).await;
}
