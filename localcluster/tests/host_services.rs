//! The node's own processes (kubelet, host-network pods) reach Services: the socket hooks
//! connect them to a backend, on this node or another, and report the frontend as their
//! peer. Only the node's own sockets are translated by its agent's hooks.

mod support;

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::json;
use support::cluster;
use weir_localcluster::{LocalCluster, PodSpec, Topology, netns::Netns};

const LOCAL_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const REMOTE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const NODE_LOCAL_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
const NODE_PORT: u16 = 30080;
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const TCP_TARGET: u16 = 8080;
const UDP_TARGET: u16 = 5353;

/// A TCP and a UDP server in a pod, answering every connection and datagram with the pod's
/// name. Stopped (threads joined) when dropped.
struct NameServer {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl NameServer {
    fn start(netns: &Netns, ip: IpAddr, name: &str) -> Self {
        let tcp = netns
            .within(move || TcpListener::bind(SocketAddr::new(ip, TCP_TARGET)))
            .expect("enter pod namespace")
            .expect("tcp listen");
        let udp = netns
            .within(move || UdpSocket::bind(SocketAddr::new(ip, UDP_TARGET)))
            .expect("enter pod namespace")
            .expect("udp bind");
        tcp.set_nonblocking(true).unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let tcp_thread = {
            let (stop, name) = (stop.clone(), name.as_bytes().to_vec());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((mut conn, _)) => {
                            use std::io::Write as _;
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.write_all(&name);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        let udp_thread = {
            let (stop, name) = (stop.clone(), name.as_bytes().to_vec());
            std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, from)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(&name, from);
                    }
                }
            })
        };
        Self {
            stop,
            threads: vec![tcp_thread, udp_thread],
        }
    }
}

impl Drop for NameServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn service(name: &str, ip: Ipv4Addr, selector: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "clusterIP": ip.to_string(),
            "clusterIPs": [ip.to_string()],
            "selector": selector,
            "ports": [
                {"name": "tcp", "protocol": "TCP", "port": TCP_PORT, "targetPort": TCP_TARGET},
                {"name": "udp", "protocol": "UDP", "port": UDP_PORT, "targetPort": UDP_TARGET},
            ],
        },
    })
}

async fn web_pod(c: &mut LocalCluster, name: &str, node: usize) -> weir_localcluster::Pod {
    c.add_pod(PodSpec {
        namespace: "default".into(),
        name: name.into(),
        node,
        labels: BTreeMap::from([
            ("pod".to_string(), name.to_string()),
            ("app".to_string(), "web".to_string()),
        ]),
        ports: vec![],
        host_ports: vec![],
    })
    .await
    .expect("pod created")
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
    .expect("enter node namespace")
}

/// The answer to a datagram sent from `from` to `to` and where it came from, over an
/// unconnected socket (`connected`: false) or a connected one (then with its peer name).
fn udp_name(
    from: &Netns,
    to: SocketAddr,
    connected: bool,
) -> std::io::Result<(String, SocketAddr, Option<SocketAddr>)> {
    from.within(move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let peer = if connected {
            s.connect(to)?;
            s.send(b"who")?;
            Some(s.peer_addr()?)
        } else {
            s.send_to(b"who", to)?;
            None
        };
        let mut buf = [0u8; 64];
        let (n, src) = s.recv_from(&mut buf)?;
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), src, peer))
    })
    .expect("enter node namespace")
}

async fn node_processes_reach_services(topology: Topology) {
    let mut c = cluster(2, topology).await;
    let a = web_pod(&mut c, "a", 0).await;
    let b = web_pod(&mut c, "b", 1).await;
    let _sa = NameServer::start(&a.netns, a.ip, "a");
    let _sb = NameServer::start(&b.netns, b.ip, "b");
    c.apply_object(&service("local", LOCAL_IP, json!({"pod": "a"})))
        .unwrap();
    c.apply_object(&service("remote", REMOTE_IP, json!({"pod": "b"})))
        .unwrap();
    c.apply_object(&service("empty", EMPTY_IP, json!({"pod": "none"})))
        .unwrap();
    let mut nodeport = service("np", Ipv4Addr::new(10, 96, 0, 14), json!({"pod": "b"}));
    nodeport["spec"]["type"] = json!("NodePort");
    nodeport["spec"]["ports"][0]["nodePort"] = json!(NODE_PORT);
    c.apply_object(&nodeport).unwrap();
    // Each node's frontend lists its own backends only.
    let mut node_local = service("node-local", NODE_LOCAL_IP, json!({"app": "web"}));
    node_local["spec"]["internalTrafficPolicy"] = json!("Local");
    c.apply_object(&node_local).unwrap();
    c.sync().await.unwrap();

    let node0 = c.nodes()[0].netns.clone();
    let node0_ip = c.nodes()[0].ip;
    for (ip, backend) in [(LOCAL_IP, "a"), (REMOTE_IP, "b")] {
        let frontend = SocketAddr::from((ip, TCP_PORT));
        let (name, peer) = tcp_name(&node0, frontend)
            .unwrap_or_else(|e| panic!("{topology}: node -> {frontend} over TCP: {e}"));
        assert_eq!(name, backend, "{topology}: TCP to {frontend}");
        assert_eq!(peer, frontend, "{topology}: the TCP peer is the frontend");

        let frontend = SocketAddr::from((ip, UDP_PORT));
        for connected in [false, true] {
            let (name, src, peer) = udp_name(&node0, frontend, connected).unwrap_or_else(|e| {
                panic!("{topology}: node -> {frontend} over UDP (connected: {connected}): {e}")
            });
            assert_eq!(name, backend, "{topology}: UDP to {frontend}");
            assert_eq!(
                src, frontend,
                "{topology}: the answer comes from the frontend (connected: {connected})"
            );
            if let Some(peer) = peer {
                assert_eq!(peer, frontend, "{topology}: the UDP peer is the frontend");
            }
        }
    }

    // No backend: refused at once, and counted.
    let started = Instant::now();
    let refused = tcp_name(&node0, SocketAddr::from((EMPTY_IP, TCP_PORT)));
    assert_eq!(
        refused.as_ref().map_err(|e| e.kind()).err(),
        Some(ErrorKind::ConnectionRefused),
        "{topology}: TCP to a Service without backends: {refused:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{topology}: refused in {:?}",
        started.elapsed()
    );
    let refused = udp_name(&node0, SocketAddr::from((EMPTY_IP, UDP_PORT)), false);
    assert_eq!(
        refused.as_ref().map_err(|e| e.kind()).err(),
        Some(ErrorKind::ConnectionRefused),
        "{topology}: UDP to a Service without backends: {refused:?}"
    );
    let (_, metrics) = c.agent_http(0, "/metrics").unwrap();
    let drops = metrics
        .lines()
        .find(|l| l.starts_with("weir_agent_drops_total{reason=\"service_no_backend\"}"))
        .unwrap_or_else(|| panic!("no service_no_backend counter in\n{metrics}"));
    assert!(!drops.ends_with(" 0"), "{topology}: {drops}");
    let (_, flows) = c.agent_http(0, "/flows?limit=50").unwrap();
    let flows: serde_json::Value = serde_json::from_str(&flows).unwrap();
    assert!(
        flows
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["reason"] == "service_no_backend"
                && f["dst"] == EMPTY_IP.to_string()
                && f["dport"] == TCP_PORT),
        "{topology}: no drop event for the refused connection in {flows:#}"
    );

    // A nodePort on the node's own address (over loopback: no TC program sees it).
    let (name, peer) = tcp_name(&node0, SocketAddr::from((node0_ip, NODE_PORT)))
        .unwrap_or_else(|e| panic!("{topology}: node -> own address:{NODE_PORT}: {e}"));
    assert_eq!(name, "b", "{topology}: nodePort on the node's address");
    assert_eq!(peer, SocketAddr::from((node0_ip, NODE_PORT)));

    // Every node's hooks sit on the same cgroup, and the first to run would translate any
    // socket: were they not limited to their own node's namespace, one of the nodes would
    // get the other's backend of this Service.
    for (idx, backend) in [(0, "a"), (1, "b")] {
        let node = c.nodes()[idx].netns.clone();
        for _ in 0..10 {
            let (name, _) = tcp_name(&node, SocketAddr::from((NODE_LOCAL_IP, TCP_PORT)))
                .unwrap_or_else(|e| panic!("{topology}: node {idx} -> node-local Service: {e}"));
            assert_eq!(
                name, backend,
                "{topology}: node {idx} reaches its own backend only"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn node_processes_reach_services_on_one_segment() {
    node_processes_reach_services(Topology::L2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn node_processes_reach_services_across_subnets() {
    node_processes_reach_services(Topology::Routed).await;
}

/// The hooks' links are pinned: they keep translating while no agent runs, and a restarted
/// agent — of the same layout version or a newer one — swaps its programs into them.
#[tokio::test(flavor = "multi_thread")]
async fn the_socket_hooks_survive_agent_restarts_and_upgrades() {
    let mut c = cluster(1, Topology::L2).await;
    let a = web_pod(&mut c, "a", 0).await;
    let _sa = NameServer::start(&a.netns, a.ip, "a");
    c.apply_object(&service("local", LOCAL_IP, json!({"pod": "a"})))
        .unwrap();
    c.sync().await.unwrap();
    let node = c.nodes()[0].netns.clone();
    let reach = |what: &str| {
        let frontend = SocketAddr::from((LOCAL_IP, TCP_PORT));
        let (name, peer) =
            tcp_name(&node, frontend).unwrap_or_else(|e| panic!("{what}: TCP to {frontend}: {e}"));
        assert_eq!((name.as_str(), peer), ("a", frontend), "{what}");
    };
    reach("before");

    c.kill_agent(0);
    reach("while no agent runs");
    c.start_agent(0).await.expect("agent restarts");
    reach("after a restart");

    // The pins become those of an older layout version; the new agent takes their links.
    let node_dir = std::path::Path::new("/sys/fs/bpf/weir").join(&c.nodes()[0].name);
    let current = node_dir.join(format!("v{}", weir_common::ABI_VERSION));
    let older = node_dir.join("v0");
    c.kill_agent(0);
    std::fs::rename(&current, &older).expect("renaming the pin directory");
    reach("while no agent runs, pins renamed");
    c.start_agent(0).await.expect("agent starts");
    reach("after the takeover");
    assert!(!older.exists(), "the older version's pins are removed");
    for program in weir_common::programs::SOCK {
        let pin = current.join("links").join(format!("cgroup-{program}"));
        assert!(pin.exists(), "{} is pinned", pin.display());
    }
}
