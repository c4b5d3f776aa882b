//! A cluster that keeps kube-proxy: agents started with `--service-proxy kube-proxy` leave
//! Services to the host's netfilter, and pods reach a ClusterIP that only netfilter
//! translates (rules written here the way kube-proxy's nftables mode writes them), with
//! the backend on the client's node and on the other node, in both topologies. Without the
//! mode the backend's replies skip the host and never get translated back.

mod support;

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    process::Command,
    time::Duration,
};

use support::{cluster_with_agent_args, pod};
use weir_localcluster::{Topology, netns::Netns};

const CLUSTER_IP: &str = "10.96.0.90";
const PORT: u16 = 80;
const TARGET: u16 = 8080;

/// DNAT from the ClusterIP to `backend` for pods' packets (prerouting).
fn kube_proxy_rules(node: &Netns, table: &str, backend: IpAddr) {
    let rules = format!(
        "table ip {table} {{
            chain pre {{ type nat hook prerouting priority dstnat; policy accept;
                ip daddr {CLUSTER_IP} tcp dport {PORT} dnat to {backend}:{TARGET}
                ip daddr {CLUSTER_IP} udp dport {PORT} dnat to {backend}:{TARGET}
            }}
        }}"
    );
    let file = std::env::temp_dir().join(format!("{table}.nft"));
    std::fs::write(&file, rules).expect("rules file");
    let status = node
        .spawn(Command::new("nft").arg("-f").arg(&file))
        .expect("nft")
        .wait()
        .expect("nft finished");
    let _ = std::fs::remove_file(&file);
    assert!(status.success(), "nft -f failed");
}

/// TCP and UDP from `client` to the ClusterIP, answered by a server in `backend`.
fn reaches_cluster_ip(backend: &Netns, backend_ip: IpAddr, client: &Netns, what: &str) {
    let (tcp, udp) = backend
        .within(move || {
            (
                support::listen_retrying(SocketAddr::new(backend_ip, TARGET)),
                UdpSocket::bind((backend_ip, TARGET)).expect("udp bind"),
            )
        })
        .expect("backend namespace");
    let server = std::thread::spawn(move || {
        let (mut stream, _) = tcp.accept().expect("accept");
        stream.write_all(b"hi").expect("greeting");
        udp.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 16];
        let (n, peer) = udp.recv_from(&mut buf).expect("udp request");
        udp.send_to(&buf[..n], peer).expect("udp reply");
    });
    let what = what.to_string();
    client
        .within(move || {
            let ip: IpAddr = CLUSTER_IP.parse().unwrap();
            let mut stream =
                TcpStream::connect_timeout(&SocketAddr::new(ip, PORT), Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("{what}: TCP to the ClusterIP: {e}"));
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut reply = [0u8; 2];
            stream
                .read_exact(&mut reply)
                .unwrap_or_else(|e| panic!("{what}: TCP reply: {e}"));
            let sock = UdpSocket::bind(("0.0.0.0", 0)).expect("udp");
            sock.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            sock.connect((ip, PORT)).expect("udp connect");
            sock.send(b"ping").expect("udp send");
            let mut buf = [0u8; 16];
            let n = sock
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("{what}: UDP reply from the ClusterIP: {e}"));
            assert_eq!(&buf[..n], b"ping");
        })
        .expect("client namespace");
    server.join().expect("backend server");
}

async fn pods_reach_a_cluster_ip_kube_proxy_translates(topology: Topology) {
    let mut c = cluster_with_agent_args(2, topology, &["--service-proxy", "kube-proxy"]).await;
    let web = pod(&mut c, "default", "web", 0).await;
    let near = pod(&mut c, "default", "near", 0).await;
    let far = pod(&mut c, "default", "far", 1).await;
    for (i, node) in c.nodes().iter().enumerate() {
        kube_proxy_rules(&node.netns, &format!("{}-kp{i}", c.run_id()), web.ip);
    }
    reaches_cluster_ip(
        &web.netns,
        web.ip,
        &near.netns,
        &format!("{topology}: same node"),
    );
    reaches_cluster_ip(
        &web.netns,
        web.ip,
        &far.netns,
        &format!("{topology}: other node"),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_reach_a_cluster_ip_kube_proxy_translates_on_one_segment() {
    pods_reach_a_cluster_ip_kube_proxy_translates(Topology::L2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_reach_a_cluster_ip_kube_proxy_translates_across_subnets() {
    pods_reach_a_cluster_ip_kube_proxy_translates(Topology::Routed).await;
}
