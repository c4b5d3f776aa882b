//! Helpers for the end-to-end tests: a cluster per test, pods, probes, a live TCP stream.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use weir_conformance::{Protocol, probe::ProbeOutcome};
use weir_localcluster::{ClusterOptions, LocalCluster, Pod, PodSpec, Topology, netns::Netns};

/// Where the weir binaries are: `WEIR_BIN_DIR` (set by `cargo xtask test`) or the
/// workspace's debug target directory.
pub fn bin_dir() -> PathBuf {
    let dir = std::env::var_os("WEIR_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    assert!(
        dir.join("weir-agent").exists() && dir.join("weir-cni").exists(),
        "weir binaries not found in {}: run the tests through `cargo xtask test`",
        dir.display()
    );
    dir
}

pub async fn cluster(nodes: usize, topology: Topology) -> LocalCluster {
    cluster_with_agent_args(nodes, topology, &[]).await
}

/// A cluster of `nodes` in `topology` with the options `configure` sets besides.
pub async fn cluster_with(
    nodes: usize,
    topology: Topology,
    configure: impl FnOnce(&mut ClusterOptions),
) -> LocalCluster {
    assert!(
        nix::unistd::geteuid().is_root(),
        "end-to-end tests need root (network namespaces, eBPF); run `cargo xtask test` as root"
    );
    let mut opts = ClusterOptions::new(bin_dir());
    opts.nodes = nodes;
    opts.topology = topology;
    opts.check_incremental_compiles = true;
    configure(&mut opts);
    LocalCluster::up(opts).await.expect("cluster up")
}

/// A cluster whose pods have addresses of `family`.
pub async fn cluster_with_family(
    nodes: usize,
    topology: Topology,
    family: weir_localcluster::IpFamily,
) -> LocalCluster {
    cluster_with(nodes, topology, |o| o.ip_family = family).await
}

/// A cluster whose agents all get `agent_args` besides the usual ones.
pub async fn cluster_with_agent_args(
    nodes: usize,
    topology: Topology,
    agent_args: &[&str],
) -> LocalCluster {
    cluster_with(nodes, topology, |o| {
        o.agent_args = agent_args.iter().map(|a| a.to_string()).collect()
    })
    .await
}

pub async fn pod(c: &mut LocalCluster, namespace: &str, name: &str, node: usize) -> Pod {
    c.add_pod(PodSpec {
        namespace: namespace.into(),
        name: name.into(),
        node,
        labels: BTreeMap::from([("pod".to_string(), name.to_string())]),
        ports: vec![],
        host_ports: vec![],
    })
    .await
    .expect("pod created")
}

pub async fn probe(from: &Netns, to: IpAddr, port: u16, protocol: Protocol) -> ProbeOutcome {
    weir_conformance::probe::probe(
        &from.path(),
        SocketAddr::new(to, port),
        protocol,
        Duration::from_secs(2),
    )
    .await
}

/// `ping -c1` from inside `from`.
pub fn ping(from: &Netns, to: IpAddr) -> bool {
    // By path: a container's namespace has no name under /run/netns.
    std::process::Command::new("nsenter")
        .arg(format!("--net={}", from.path().display()))
        .args(["ping", "-c", "1", "-W", "2"])
        .arg(to.to_string())
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A TCP connection that keeps sending, and counts what the other end received, to see
/// whether traffic flows at every moment of a disruption.
pub struct LiveStream {
    received: Arc<AtomicU64>,
    failed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// Set once the server side saw the end of the stream.
    done: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl LiveStream {
    /// A steady trickle (1 KiB every 2 ms) until stopped.
    pub fn start(client: &Netns, server: &Netns, server_ip: IpAddr, port: u16) -> Self {
        Self::open(client, server, server_ip, port, None, false)
    }

    /// A steady trickle the other way: the client connects, the server sends. The client's
    /// only packets are acknowledgements of what arrives, so the data depends on the server
    /// being allowed to answer within the client's connection.
    pub fn start_download(client: &Netns, server: &Netns, server_ip: IpAddr, port: u16) -> Self {
        Self::open(client, server, server_ip, port, None, true)
    }

    /// `total` bytes as fast as possible, then the end of the stream.
    pub fn start_bulk(
        client: &Netns,
        server: &Netns,
        server_ip: IpAddr,
        port: u16,
        total: u64,
    ) -> Self {
        Self::open(client, server, server_ip, port, Some(total), false)
    }

    /// Waits for the end of a bulk stream; returns what the server received.
    pub async fn wait_done(&self, timeout: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.done.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!self.failed(), "the stream broke");
        self.received()
    }

    fn open(
        client: &Netns,
        server: &Netns,
        server_ip: IpAddr,
        port: u16,
        bulk: Option<u64>,
        server_sends: bool,
    ) -> Self {
        let listener = server
            .within(move || TcpListener::bind(SocketAddr::new(server_ip, port)))
            .expect("enter server namespace")
            .expect("listen");
        let accepted = std::thread::spawn(move || listener.accept().map(|(conn, _)| conn));
        let connected = client
            .within(move || {
                TcpStream::connect_timeout(
                    &SocketAddr::new(server_ip, port),
                    Duration::from_secs(2),
                )
            })
            .expect("enter client namespace")
            .expect("connect");
        let accepted = accepted.join().expect("accept thread").expect("accept");
        let (mut reading, mut conn) = if server_sends {
            (connected, accepted)
        } else {
            (accepted, connected)
        };
        let received = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let received = received.clone();
            let failed = failed.clone();
            let done = done.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let conn = &mut reading;
                // Wake up now and then, so that `stop` ends a stream whose path was cut.
                conn.set_read_timeout(Some(Duration::from_millis(200)))
                    .expect("read timeout");
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match conn.read(&mut buf) {
                        Ok(0) => {
                            done.store(true, Ordering::Relaxed);
                            break;
                        }
                        Ok(n) => {
                            received.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => {
                            failed.store(true, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            })
        };
        let writer = {
            let failed = failed.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                conn.set_write_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                if let Some(total) = bulk {
                    let chunk = vec![0x5au8; 64 * 1024];
                    let mut sent = 0u64;
                    while sent < total {
                        let n = chunk.len().min((total - sent) as usize);
                        if conn.write_all(&chunk[..n]).is_err() {
                            failed.store(true, Ordering::Relaxed);
                            return;
                        }
                        sent += n as u64;
                    }
                    let _ = conn.shutdown(std::net::Shutdown::Write);
                    return;
                }
                let chunk = [0x5au8; 1024];
                while !stop.load(Ordering::Relaxed) {
                    if conn.write_all(&chunk).is_err() {
                        failed.store(true, Ordering::Relaxed);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        Self {
            received,
            failed,
            stop,
            done,
            threads: vec![reader, writer],
        }
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Asserts that data keeps arriving over `window`.
    pub async fn assert_flowing(&self, what: &str, window: Duration) {
        let before = self.received();
        tokio::time::sleep(window).await;
        let after = self.received();
        assert!(!self.failed(), "{what}: the stream broke");
        assert!(
            after > before,
            "{what}: no data arrived in {window:?} ({before} bytes total)"
        );
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A VXLAN datagram (the UDP payload, VNI 1) carrying an inner Ethernet + IPv4 + UDP frame
/// from `src`:`sport` to `dst`:`dport`, addressed to the receiving tunnel device's MAC as
/// weir's own encapsulation does.
pub fn vxlan_udp(
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut d = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    d.extend_from_slice(&weir_common::TUNNEL_MAC);
    d.extend_from_slice(&weir_common::TUNNEL_SOURCE_MAC);
    d.extend_from_slice(&0x0800u16.to_be_bytes());
    let udp_len = 8 + payload.len();
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let sum = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    d.extend_from_slice(&ip);
    d.extend_from_slice(&sport.to_be_bytes());
    d.extend_from_slice(&dport.to_be_bytes());
    d.extend_from_slice(&(udp_len as u16).to_be_bytes());
    // A zero UDP checksum: none (allowed over IPv4).
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    d
}

/// Connects from `client` to `to` over TCP, gets a greeting from a server on
/// `server_ip`:`port` inside `server` (a pod, a Service's backend), and returns the address
/// the server saw the connection come from.
pub fn source_seen_by(
    server: &weir_localcluster::netns::Netns,
    server_ip: IpAddr,
    port: u16,
    client: &weir_localcluster::netns::Netns,
    to: SocketAddr,
) -> IpAddr {
    let listener = server
        .within(move || listen_retrying(SocketAddr::new(server_ip, port)))
        .expect("server namespace");
    let accepted = std::thread::spawn(move || {
        let (mut stream, peer) = listener.accept().expect("accept");
        stream.write_all(b"hi").expect("greeting");
        peer.ip()
    });
    client
        .within(move || {
            let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("connect to {to}: {e}"));
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut reply = [0u8; 2];
            stream.read_exact(&mut reply).expect("the server's reply");
            assert_eq!(&reply, b"hi");
        })
        .expect("client namespace");
    accepted.join().expect("server thread")
}

/// Binds a TCP listener, waiting up to two seconds while the port is still held by the
/// previous round's connection.
pub fn listen_retrying(addr: std::net::SocketAddr) -> std::net::TcpListener {
    let mut tries = 0;
    loop {
        match std::net::TcpListener::bind(addr) {
            Ok(l) => return l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 40 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("listen on {addr}: {e}"),
        }
    }
}

/// The metric line `weir_agent_xdp_mode{...}` of node `node`'s agent: which mode the XDP
/// program runs in on the uplink, or `mode="none"`.
pub fn xdp_mode(c: &LocalCluster, node: usize) -> Option<String> {
    let (_, metrics) = c.agent_http(node, "/metrics").expect("metrics");
    metrics
        .lines()
        .find(|l| l.starts_with("weir_agent_xdp_mode{"))
        .map(str::to_owned)
}
