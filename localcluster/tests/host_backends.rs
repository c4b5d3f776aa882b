//! Services whose backends are node addresses, not pods — the `kubernetes` Service (the API
//! server on the control-plane nodes' addresses) is one in every cluster, and what CoreDNS
//! and every in-cluster client needs when weir replaces kube-proxy; an ingress controller
//! running with hostNetwork behind a NodePort is another. Pods reach such a backend on their
//! own node and on another node, and the replies come back from the frontend. Through a
//! NodePort, every kind of client reaches it — pods and processes of both nodes, and a host
//! outside the cluster — on the backend's own node (which takes the flow up its own stack)
//! and on the other node (which forwards it).

mod support;

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde_json::json;
use support::{cluster, pod};
use weir_localcluster::{Topology, netns::Netns};

const PORT: u16 = 443;
const TARGET: u16 = 16443;

/// A TCP server on a node's address answering every connection with `name`.
struct HostServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HostServer {
    fn start(netns: &Netns, addr: SocketAddr, name: &str) -> Self {
        let listener = netns
            .within(move || TcpListener::bind(addr))
            .expect("enter node namespace")
            .expect("listen on the node's address");
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, name) = (stop.clone(), name.as_bytes().to_vec());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut conn, _)) => {
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.write_all(&name);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for HostServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A Service without a selector and its EndpointSlice listing `backend`, as the API server
/// writes them for `kubernetes`.
fn host_service(name: &str, ip: Ipv4Addr, backend: Ipv4Addr) -> [serde_json::Value; 2] {
    host_service_with(name, ip, backend, None)
}

/// The same, of type NodePort on `node_port` when given.
fn host_service_with(
    name: &str,
    ip: Ipv4Addr,
    backend: Ipv4Addr,
    node_port: Option<u16>,
) -> [serde_json::Value; 2] {
    let mut port = json!({"name": "https", "protocol": "TCP", "port": PORT, "targetPort": TARGET});
    let mut spec = json!({
        "clusterIP": ip.to_string(),
        "clusterIPs": [ip.to_string()],
    });
    if let Some(node_port) = node_port {
        port["nodePort"] = json!(node_port);
        spec["type"] = json!("NodePort");
    }
    spec["ports"] = json!([port]);
    [
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": spec,
        }),
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [backend.to_string()], "conditions": {"ready": true}}],
            "ports": [{"name": "https", "protocol": "TCP", "port": TARGET}],
        }),
    ]
}

/// What a TCP connection from `from` to `to` reads, and the peer its socket reports.
fn tcp_name(from: &Netns, to: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    from.within(move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let peer = s.peer_addr()?;
        let mut name = String::new();
        s.read_to_string(&mut name)?;
        Ok((name, peer))
    })
    .expect("enter pod namespace")
}

async fn pods_reach_node_backends(topology: Topology) {
    let mut c = cluster(2, topology).await;
    let client = pod(&mut c, "default", "client", 0).await;
    let nodes: Vec<(Netns, Ipv4Addr)> = c.nodes().iter().map(|n| (n.netns.clone(), n.ip)).collect();
    let _servers: Vec<HostServer> = nodes
        .iter()
        .enumerate()
        .map(|(i, (netns, ip))| {
            HostServer::start(netns, SocketAddr::from((*ip, TARGET)), &format!("node-{i}"))
        })
        .collect();
    let frontends = [
        (
            "same-node",
            Ipv4Addr::new(10, 96, 0, 31),
            nodes[0].1,
            "node-0",
        ),
        (
            "other-node",
            Ipv4Addr::new(10, 96, 0, 32),
            nodes[1].1,
            "node-1",
        ),
    ];
    for (name, ip, backend, _) in frontends {
        for object in host_service(name, ip, backend) {
            c.apply_object(&object).unwrap();
        }
    }
    c.sync().await.unwrap();

    for (what, ip, _, expected) in frontends {
        let frontend = SocketAddr::from((ip, PORT));
        // Each round is a new connection (a new source port, a new translation).
        for round in 0..3 {
            let (name, peer) = tcp_name(&client.netns, frontend).unwrap_or_else(|e| {
                panic!("{topology}: pod -> {what} backend via {frontend} (round {round}): {e}")
            });
            assert_eq!(name, expected, "{topology}: {what}");
            assert_eq!(peer, frontend, "{topology}: the peer is the frontend");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_reach_node_address_backends_on_one_segment() {
    pods_reach_node_backends(Topology::L2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_reach_node_address_backends_across_subnets() {
    pods_reach_node_backends(Topology::Routed).await;
}

const NODE_PORT: u16 = 30443;

/// A NodePort whose one backend is node 0's own address (a host-network server), reached on
/// both nodes' addresses by a pod of each node, each node's own processes and the external
/// host, and through its ClusterIP by the pods and processes; every reply comes from the
/// address and port the client asked for.
async fn node_port_reaches_node_backends(topology: Topology) {
    let mut c = cluster(2, topology).await;
    let pods = [
        pod(&mut c, "default", "client-0", 0).await,
        pod(&mut c, "default", "client-1", 1).await,
    ];
    let nodes: Vec<(Netns, Ipv4Addr)> = c.nodes().iter().map(|n| (n.netns.clone(), n.ip)).collect();
    let external = c.external().expect("external host").clone();
    let _servers: Vec<HostServer> = nodes
        .iter()
        .enumerate()
        .map(|(i, (netns, ip))| {
            HostServer::start(netns, SocketAddr::from((*ip, TARGET)), &format!("node-{i}"))
        })
        .collect();
    let cluster_ip = Ipv4Addr::new(10, 96, 0, 33);
    for object in host_service_with("ingress", cluster_ip, nodes[0].1, Some(NODE_PORT)) {
        c.apply_object(&object).unwrap();
    }
    c.sync().await.unwrap();

    let clients: Vec<(&str, Netns)> = vec![
        ("pod on node 0", pods[0].netns.clone()),
        ("pod on node 1", pods[1].netns.clone()),
        ("node 0", nodes[0].0.clone()),
        ("node 1", nodes[1].0.clone()),
        ("the external host", external.netns.clone()),
    ];
    let frontends = [
        ("the ClusterIP", SocketAddr::from((cluster_ip, PORT))),
        (
            "the backend's node",
            SocketAddr::from((nodes[0].1, NODE_PORT)),
        ),
        ("the other node", SocketAddr::from((nodes[1].1, NODE_PORT))),
    ];
    let mut failures = Vec::new();
    for (client, netns) in &clients {
        for (what, frontend) in frontends {
            if what == "the ClusterIP" && *client == "the external host" {
                continue;
            }
            // Each round is a new connection (a new source port, a new translation).
            for round in 0..2 {
                match tcp_name(netns, frontend) {
                    Ok((name, peer)) if name == "node-0" && peer == frontend => {}
                    other => failures.push(format!(
                        "{client} -> {what} {frontend} (round {round}): {other:?}"
                    )),
                }
            }
        }
    }
    assert!(failures.is_empty(), "{topology}: {failures:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn node_port_reaches_node_address_backends_on_one_segment() {
    node_port_reaches_node_backends(Topology::L2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn node_port_reaches_node_address_backends_across_subnets() {
    node_port_reaches_node_backends(Topology::Routed).await;
}
