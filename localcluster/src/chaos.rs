//! Fault scenarios on a running local cluster, measured: what traffic between policy-isolated
//! pods sees while agents crash. Used by the bounded fault tests and by `cargo xtask chaos`,
//! which runs them longer and writes the figures down.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;
use weir_conformance::cases::Protocol;
use weir_conformance::probe::{ProbeOutcome, Servers, probe};

use crate::cluster::{LocalCluster, Pod, PodSpec};
use crate::netns::Netns;

const NAMESPACE: &str = "chaos";
/// The long-lived TCP stream, the UDP exchange, new connections that policy allows, and a
/// port it does not.
const STREAM_PORT: u16 = 9000;
const UDP_PORT: u16 = 5353;
const ALLOWED_PORT: u16 = 80;
const DENIED_PORT: u16 = 81;
/// How often the UDP client sends a datagram.
const UDP_INTERVAL: Duration = Duration::from_millis(5);
/// How long a probe waits for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// What [`agent_kills`] measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AgentKillReport {
    /// Agents killed with SIGKILL (alternating between the server's and the clients' node).
    pub kills: usize,
    /// From each kill until the new agent reported ready, in milliseconds (median, max).
    pub restart_ms: (u64, u64),
    /// The established TCP stream broke (a reset or an error on either side).
    pub stream_broke: bool,
    /// Longest time, in milliseconds, in which the established stream delivered nothing.
    pub stream_longest_stall_ms: u64,
    /// Datagrams of the continuous UDP exchange sent, and those that got no echo.
    pub udp_sent: u64,
    pub udp_lost: u64,
    /// New connections that policy allows: attempted while an agent was down or starting,
    /// and those that failed.
    pub allowed_attempts: u64,
    pub allowed_refused: u64,
    /// New connections that policy denies (from an unselected pod, and to a port not
    /// admitted): attempted, and those that got through. Must be 0.
    pub denied_attempts: u64,
    pub denied_admitted: u64,
}

impl fmt::Display for AgentKillReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} agent kills (restart to ready: median {} ms, max {} ms): established TCP stream \
             {} (longest stall {} ms); UDP {} of {} datagrams lost; allowed new connections \
             refused {} of {}; denied connections admitted {} of {}",
            self.kills,
            self.restart_ms.0,
            self.restart_ms.1,
            if self.stream_broke { "broke" } else { "kept" },
            self.stream_longest_stall_ms,
            self.udp_lost,
            self.udp_sent,
            self.allowed_refused,
            self.allowed_attempts,
            self.denied_admitted,
            self.denied_attempts,
        )
    }
}

/// The pods of a scenario: `server` on the last node, `client` and `intruder` on the first.
struct Pods {
    server: Pod,
    client: Pod,
    intruder: Pod,
}

async fn add(c: &mut LocalCluster, name: &str, app: &str, node: usize) -> Result<Pod> {
    c.add_pod(PodSpec {
        namespace: NAMESPACE.into(),
        name: name.into(),
        node,
        labels: BTreeMap::from([("app".to_string(), app.to_string())]),
        ports: vec![],
        host_ports: vec![],
    })
    .await
    .with_context(|| format!("creating pod {name}"))
}

/// Creates the pods and isolates them: the server admits the client on the stream, UDP and
/// allowed ports only; the client may send only to the server.
async fn setup(c: &mut LocalCluster) -> Result<Pods> {
    let last = c.nodes().len() - 1;
    let server = add(c, "server", "server", last).await?;
    let client = add(c, "client", "client", 0).await?;
    let intruder = add(c, "intruder", "intruder", 0).await?;
    admit_client_on(c, ALLOWED_PORT)?;
    c.apply_object(&json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "client-to-server", "namespace": NAMESPACE},
        "spec": {
            "podSelector": {"matchLabels": {"app": "client"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "server"}}}]}],
        },
    }))?;
    c.sync().await?;
    Ok(Pods {
        server,
        client,
        intruder,
    })
}

/// (Re)writes the server's policy: it admits the client on the stream and UDP ports and on
/// `port`.
fn admit_client_on(c: &LocalCluster, port: u16) -> Result<()> {
    let p = |p: u16, proto: &str| json!({"protocol": proto, "port": p});
    c.apply_object(&json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "server-from-client", "namespace": NAMESPACE},
        "spec": {
            "podSelector": {"matchLabels": {"app": "server"}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                "ports": [p(STREAM_PORT, "TCP"), p(port, "TCP"), p(UDP_PORT, "UDP")],
            }],
        },
    }))
}

/// A TCP connection that sends 1 KiB every 2 ms; the receiving side records the longest
/// time without data.
struct Stream {
    stop: Arc<AtomicBool>,
    broke: Arc<AtomicBool>,
    longest_stall: Arc<Mutex<Duration>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Stream {
    fn start(client: &Netns, server: &Netns, server_ip: IpAddr) -> Result<Stream> {
        let addr = SocketAddr::new(server_ip, STREAM_PORT);
        let listener = server.within(move || TcpListener::bind(addr))??;
        let accepted = std::thread::spawn(move || listener.accept().map(|(conn, _)| conn));
        let mut sending = client
            .within(move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)))?
            .context("connecting the stream")?;
        let mut receiving = accepted
            .join()
            .map_err(|_| anyhow::anyhow!("accept thread panicked"))??;
        let stop = Arc::new(AtomicBool::new(false));
        let broke = Arc::new(AtomicBool::new(false));
        let longest_stall = Arc::new(Mutex::new(Duration::ZERO));
        let reader = {
            let (stop, broke, longest_stall) = (stop.clone(), broke.clone(), longest_stall.clone());
            std::thread::spawn(move || {
                let _ = receiving.set_read_timeout(Some(Duration::from_millis(50)));
                let mut buf = vec![0u8; 64 * 1024];
                let mut last = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let read = receiving.read(&mut buf);
                    let gap = last.elapsed();
                    {
                        let mut l = longest_stall.lock().unwrap();
                        *l = (*l).max(gap);
                    }
                    match read {
                        Ok(n) if n > 0 => last = Instant::now(),
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        // The end of the stream or an error, unless we are the ones stopping.
                        _ => {
                            if !stop.load(Ordering::Relaxed) {
                                broke.store(true, Ordering::Relaxed);
                            }
                            return;
                        }
                    }
                }
            })
        };
        let writer = {
            let (stop, broke) = (stop.clone(), broke.clone());
            std::thread::spawn(move || {
                let _ = sending.set_write_timeout(Some(Duration::from_secs(5)));
                let chunk = [0x5au8; 1024];
                while !stop.load(Ordering::Relaxed) {
                    if sending.write_all(&chunk).is_err() {
                        if !stop.load(Ordering::Relaxed) {
                            broke.store(true, Ordering::Relaxed);
                        }
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        Ok(Stream {
            stop,
            broke,
            longest_stall,
            threads: vec![reader, writer],
        })
    }

    /// Stops the stream; returns whether it broke and its longest stall.
    fn finish(mut self) -> (bool, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        (
            self.broke.load(Ordering::Relaxed),
            *self.longest_stall.lock().unwrap(),
        )
    }
}

/// Numbered datagrams from the client every [`UDP_INTERVAL`], echoed by the server.
struct UdpExchange {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    echoed: Arc<Mutex<HashSet<u64>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl UdpExchange {
    fn start(client: &Netns, server: &Netns, server_ip: IpAddr) -> Result<UdpExchange> {
        let addr = SocketAddr::new(server_ip, UDP_PORT);
        let echo = server.within(move || UdpSocket::bind(addr))??;
        let socket = client.within(move || -> std::io::Result<UdpSocket> {
            let s = UdpSocket::bind(("0.0.0.0", 0))?;
            s.connect(addr)?;
            Ok(s)
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let echoed = Arc::new(Mutex::new(HashSet::new()));
        echo.set_read_timeout(Some(Duration::from_millis(50)))?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let server_thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = echo.recv_from(&mut buf) {
                        let _ = echo.send_to(&buf[..n], from);
                    }
                }
            })
        };
        let receiver = socket.try_clone()?;
        let receiver_thread = {
            let (stop, echoed) = (stop.clone(), echoed.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(8) = receiver.recv(&mut buf) {
                        let seq = u64::from_be_bytes(buf[..8].try_into().unwrap());
                        echoed.lock().unwrap().insert(seq);
                    }
                }
            })
        };
        let sender_thread = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // A send refused by a local ICMP error is lost like any other.
                    let _ = socket.send(&seq.to_be_bytes());
                    seq += 1;
                    sent.store(seq, Ordering::Relaxed);
                    std::thread::sleep(UDP_INTERVAL);
                }
            })
        };
        Ok(UdpExchange {
            stop,
            sent,
            echoed,
            threads: vec![sender_thread, receiver_thread, server_thread],
        })
    }

    /// Stops sending, lets the last echoes arrive, and returns (sent, lost).
    fn finish(mut self) -> (u64, u64) {
        let sent = self.sent.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let echoed = self.echoed.lock().unwrap();
        let lost = (0..sent).filter(|s| !echoed.contains(s)).count() as u64;
        (sent, lost)
    }
}

/// New-connection probes, repeated until stopped: the client to the allowed port (must
/// connect), the intruder to it and the client to a port not admitted (must not).
#[derive(Default)]
struct Probes {
    allowed_attempts: u64,
    allowed_refused: u64,
    denied_attempts: u64,
    denied_admitted: u64,
}

struct ProbeTargets {
    client: PathBuf,
    intruder: PathBuf,
    server_ip: IpAddr,
}

impl ProbeTargets {
    /// One round of the three probes, concurrently.
    async fn round(&self, into: &mut Probes) {
        let allowed = SocketAddr::new(self.server_ip, ALLOWED_PORT);
        let closed = SocketAddr::new(self.server_ip, DENIED_PORT);
        let (a, i, p) = tokio::join!(
            probe(&self.client, allowed, Protocol::Tcp, PROBE_TIMEOUT),
            probe(&self.intruder, allowed, Protocol::Tcp, PROBE_TIMEOUT),
            probe(&self.client, closed, Protocol::Tcp, PROBE_TIMEOUT),
        );
        into.allowed_attempts += 1;
        if a != ProbeOutcome::Connected {
            into.allowed_refused += 1;
        }
        for outcome in [i, p] {
            into.denied_attempts += 1;
            if outcome == ProbeOutcome::Connected {
                into.denied_admitted += 1;
            }
        }
    }
}

/// Kills an agent with SIGKILL `kills` times (alternating nodes) under continuous TCP and UDP
/// traffic between policy-isolated pods on different nodes (or on one, with one node), while
/// new connections, allowed and denied, are attempted during every outage and restart.
pub async fn agent_kills(c: &mut LocalCluster, kills: usize) -> Result<AgentKillReport> {
    let pods = setup(c).await?;
    // Servers on the allowed port and on one policy does not admit (so a hole would show
    // as a connection, not as a refusal by a closed port).
    let _servers = Servers::start(
        &pods.server.netns.path(),
        &[ALLOWED_PORT, DENIED_PORT],
        &[Protocol::Tcp],
    )?;
    let targets = ProbeTargets {
        client: pods.client.netns.path(),
        intruder: pods.intruder.netns.path(),
        server_ip: pods.server.ip,
    };
    // Everything works before the first kill, or the figures would mean nothing.
    let mut before = Probes::default();
    targets.round(&mut before).await;
    if before.allowed_refused != 0 || before.denied_admitted != 0 {
        bail!(
            "the scenario is wrong before any fault: allowed refused {}, denied admitted {}",
            before.allowed_refused,
            before.denied_admitted
        );
    }
    let stream = Stream::start(&pods.client.netns, &pods.server.netns, pods.server.ip)?;
    let udp = UdpExchange::start(&pods.client.netns, &pods.server.netns, pods.server.ip)?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let nodes = c.nodes().len();
    let mut probes = Probes::default();
    let mut restarts = Vec::with_capacity(kills);
    for k in 0..kills {
        let idx = if k % 2 == 0 { nodes - 1 } else { 0 };
        let killed = Instant::now();
        c.kill_agent(idx);
        // Probe continuously while the agent is away and while it starts again.
        let stop = Arc::new(AtomicBool::new(false));
        let prober = {
            let stop = stop.clone();
            let targets = ProbeTargets {
                client: targets.client.clone(),
                intruder: targets.intruder.clone(),
                server_ip: targets.server_ip,
            };
            tokio::spawn(async move {
                let mut p = Probes::default();
                loop {
                    targets.round(&mut p).await;
                    if stop.load(Ordering::Relaxed) {
                        return p;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        // A moment with no agent at all, varying from kill to kill.
        tokio::time::sleep(Duration::from_millis(100 + 97 * (k as u64 % 5))).await;
        c.start_agent(idx)
            .await
            .with_context(|| format!("agent restart {}", k + 1))?;
        restarts.push(killed.elapsed());
        stop.store(true, Ordering::Relaxed);
        let p = prober.await?;
        probes.allowed_attempts += p.allowed_attempts;
        probes.allowed_refused += p.allowed_refused;
        probes.denied_attempts += p.denied_attempts;
        probes.denied_admitted += p.denied_admitted;
        // And right after the restart.
        targets.round(&mut probes).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (stream_broke, stall) = stream.finish();
    let (udp_sent, udp_lost) = udp.finish();
    restarts.sort();
    let ms = |d: &Duration| d.as_millis() as u64;
    Ok(AgentKillReport {
        kills,
        restart_ms: (
            restarts.get(restarts.len() / 2).map_or(0, ms),
            restarts.last().map_or(0, ms),
        ),
        stream_broke,
        stream_longest_stall_ms: ms(&stall),
        udp_sent,
        udp_lost,
        allowed_attempts: probes.allowed_attempts,
        allowed_refused: probes.allowed_refused,
        denied_attempts: probes.denied_attempts,
        denied_admitted: probes.denied_admitted,
    })
}

/// Port the controller scenario moves the client's admission to and back.
const MOVED_PORT: u16 = 8080;

/// What [`controller_kills`] measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ControllerKillReport {
    /// Times the controller was killed, with a policy change made while it was away.
    pub kills: usize,
    /// Checks, while the controller was away, that agents kept the last state, and those
    /// that found something else.
    pub kept_checks: u64,
    pub kept_failures: u64,
    /// From the controller's restart until every agent enforced the change, in
    /// milliseconds (median, max); rounds that did not converge within 30 s fail the run.
    pub converge_ms: (u64, u64),
    /// Connections from an unselected pod, attempted continuously, and those that got
    /// through (a window where the server was unenforced). Must be 0.
    pub denied_attempts: u64,
    pub denied_admitted: u64,
    pub stream_broke: bool,
    pub udp_sent: u64,
    pub udp_lost: u64,
}

impl fmt::Display for ControllerKillReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} controller kills with a policy change each: last state kept {} of {} checks; \
             converged after restart in median {} ms, max {} ms; unselected pod admitted {} \
             of {}; established TCP stream {}; UDP {} of {} datagrams lost",
            self.kills,
            self.kept_checks - self.kept_failures,
            self.kept_checks,
            self.converge_ms.0,
            self.converge_ms.1,
            self.denied_admitted,
            self.denied_attempts,
            if self.stream_broke { "broke" } else { "kept" },
            self.udp_lost,
            self.udp_sent,
        )
    }
}

/// Whether the client reaches the server on `port`.
async fn client_reaches(client: &std::path::Path, server: IpAddr, port: u16) -> bool {
    probe(
        client,
        SocketAddr::new(server, port),
        Protocol::Tcp,
        PROBE_TIMEOUT,
    )
    .await
        == ProbeOutcome::Connected
}

/// Kills the controller `kills` times; while it is away the server's policy moves the
/// client's admission between two ports. Agents must keep the last state while it is away
/// and apply the change once it is back, with an unselected pod never admitted meanwhile and
/// the established flows untouched.
pub async fn controller_kills(c: &mut LocalCluster, kills: usize) -> Result<ControllerKillReport> {
    let pods = setup(c).await?;
    let _servers = Servers::start(
        &pods.server.netns.path(),
        &[ALLOWED_PORT, MOVED_PORT],
        &[Protocol::Tcp],
    )?;
    let client = pods.client.netns.path();
    let server_ip = pods.server.ip;
    if !client_reaches(&client, server_ip, ALLOWED_PORT).await
        || client_reaches(&client, server_ip, MOVED_PORT).await
    {
        bail!("the scenario is wrong before any fault");
    }
    let stream = Stream::start(&pods.client.netns, &pods.server.netns, server_ip)?;
    let udp = UdpExchange::start(&pods.client.netns, &pods.server.netns, server_ip)?;
    // The unselected pod knocks on both ports all along.
    let stop = Arc::new(AtomicBool::new(false));
    let intruder = {
        let (stop, from) = (stop.clone(), pods.intruder.netns.path());
        tokio::spawn(async move {
            let (mut attempts, mut admitted) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                for port in [ALLOWED_PORT, MOVED_PORT] {
                    attempts += 1;
                    if client_reaches(&from, server_ip, port).await {
                        admitted += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (attempts, admitted)
        })
    };
    let (mut kept_checks, mut kept_failures) = (0u64, 0u64);
    let mut converge = Vec::with_capacity(kills);
    let mut admitted_port = ALLOWED_PORT;
    for k in 0..kills {
        let next = if admitted_port == ALLOWED_PORT {
            MOVED_PORT
        } else {
            ALLOWED_PORT
        };
        c.kill_controller();
        admit_client_on(c, next)?;
        // Agents keep what they had: the old port open, the new one closed.
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            kept_checks += 1;
            if !client_reaches(&client, server_ip, admitted_port).await
                || client_reaches(&client, server_ip, next).await
            {
                kept_failures += 1;
            }
        }
        let restarted = Instant::now();
        c.restart_controller()
            .with_context(|| format!("controller restart {}", k + 1))?;
        c.sync()
            .await
            .with_context(|| format!("converging after controller restart {}", k + 1))?;
        converge.push(restarted.elapsed());
        if !client_reaches(&client, server_ip, next).await
            || client_reaches(&client, server_ip, admitted_port).await
        {
            bail!(
                "after controller restart {} the agents do not enforce the change",
                k + 1
            );
        }
        admitted_port = next;
    }
    stop.store(true, Ordering::Relaxed);
    let (denied_attempts, denied_admitted) = intruder.await?;
    let (stream_broke, _) = stream.finish();
    let (udp_sent, udp_lost) = udp.finish();
    converge.sort();
    let ms = |d: &Duration| d.as_millis() as u64;
    Ok(ControllerKillReport {
        kills,
        kept_checks,
        kept_failures,
        converge_ms: (
            converge.get(converge.len() / 2).map_or(0, ms),
            converge.last().map_or(0, ms),
        ),
        denied_attempts,
        denied_admitted,
        stream_broke,
        udp_sent,
        udp_lost,
    })
}

/// What [`cni_cycles`] measured: what a node holds after many pods came and went, against
/// what it held before.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CniCycleReport {
    /// Pods added and deleted through the CNI plugin.
    pub cycles: usize,
    /// Agent restarts (SIGKILL) between them, half of them while a pod was up.
    pub agent_restarts: usize,
    /// Address allocations, host-side veths, endpoint records and endpoints the agent
    /// reports in the dataplane beyond those of the node's pods before the run.
    pub leaked_addresses: i64,
    pub leaked_veths: i64,
    pub leaked_endpoint_records: i64,
    pub leaked_dataplane_endpoints: i64,
}

impl fmt::Display for CniCycleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} CNI ADD/DEL cycles with {} agent restarts: leaked addresses {}, veths {}, \
             endpoint records {}, dataplane endpoints {}",
            self.cycles,
            self.agent_restarts,
            self.leaked_addresses,
            self.leaked_veths,
            self.leaked_endpoint_records,
            self.leaked_dataplane_endpoints,
        )
    }
}

/// What node `idx` holds: (address allocations, host-side veths, endpoint records,
/// endpoints the agent reports in its dataplane).
pub fn node_holdings(c: &LocalCluster, idx: usize) -> Result<(i64, i64, i64, i64)> {
    let node = &c.nodes()[idx];
    let count = |file: &str, key: &str| -> Result<i64> {
        let path = node.dir.join(file);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|_| "{}".into());
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(v[key].as_array().map_or(0, |a| a.len() as i64))
    };
    let addresses = count("state/ipam/allocations.json", "allocations")?;
    let records = count("state/endpoints.json", "endpoints")?;
    let veths = node
        .netns
        .ip(&["-o", "link", "show", "type", "veth"])?
        .lines()
        .count() as i64;
    let (_, metrics) = c.agent_http(idx, "/metrics")?;
    let endpoints = metrics
        .lines()
        .find_map(|l| l.strip_prefix("weir_agent_endpoints "))
        .and_then(|v| v.trim().parse::<i64>().ok())
        .context("no weir_agent_endpoints in the agent's metrics")?;
    Ok((addresses, veths, records, endpoints))
}

/// Adds and deletes a pod on the first node `cycles` times through the CNI plugin, killing
/// the node's agent every `restart_every` cycles (alternately between the ADD and the DEL,
/// and after the DEL), then compares what the node holds with what it held before.
pub async fn cni_cycles(
    c: &mut LocalCluster,
    cycles: usize,
    restart_every: usize,
) -> Result<CniCycleReport> {
    let before = node_holdings(c, 0)?;
    let mut restarts = 0;
    for i in 0..cycles {
        let name = format!("cycle-{i}");
        add(c, &name, "cycle", 0).await?;
        let restart = restart_every > 0 && (i + 1) % restart_every == 0;
        // Every other restart comes while the pod is up: the new agent must adopt it.
        let while_up = restarts % 2 == 0;
        if restart && while_up {
            c.kill_agent(0);
            c.start_agent(0).await?;
        }
        c.remove_pod(NAMESPACE, &name)
            .await
            .with_context(|| format!("deleting pod {name}"))?;
        if restart && !while_up {
            c.kill_agent(0);
            c.start_agent(0).await?;
        }
        restarts += usize::from(restart);
        if (i + 1) % 100 == 0 {
            println!("  {} of {cycles} cycles", i + 1);
        }
    }
    let after = node_holdings(c, 0)?;
    Ok(CniCycleReport {
        cycles,
        agent_restarts: restarts,
        leaked_addresses: after.0 - before.0,
        leaked_veths: after.1 - before.1,
        leaked_endpoint_records: after.2 - before.2,
        leaked_dataplane_endpoints: after.3 - before.3,
    })
}
