//! Services whose backends are node addresses, not pods — the `kubernetes` Service (the API
//! server on the control-plane nodes' addresses) is one in every cluster, and what CoreDNS
//! and every in-cluster client needs when weir replaces kube-proxy. Pods reach such a
//! backend on their own node and on another node, and the replies come back from the
//! frontend.

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
    [
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "clusterIP": ip.to_string(),
                "clusterIPs": [ip.to_string()],
                "ports": [{"name": "https", "protocol": "TCP", "port": PORT, "targetPort": TARGET}],
            },
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
