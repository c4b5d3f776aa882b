//! Traffic between pods: iperf3 for throughput, and a small ping-pong tool of our own for
//! request/response latency and for new connections per second.
//!
//! The tool's server runs on threads of this process, its sockets created inside the server
//! pod's namespace (listening on both families); its clients run on threads that have
//! entered the client pod's namespace, over the family of the server address they are given.
//! * Request/response (like netperf's TCP_RR): one connection, `TCP_NODELAY`, one byte each
//!   way per transaction, back to back; every transaction's latency is recorded.
//! * Connect/request/close (like netperf's TCP_CRR): one connection at a time — connect,
//!   one byte each way, the server closes, the client reads the end of stream and closes.
//!   Every connection uses a 5-tuple never used before for that client and server (source
//!   ports bound explicitly, destination port moving on when they run out), so neither
//!   weir's conntrack nor netfilter's ever sees a reused tuple.
//!
//! The tool's client and server threads are pinned to one CPU ([`pin_to_bench_cpu`]): a
//! transaction then costs the two TCP stacks and the dataplane between them, and not the
//! wake-up of another, idle CPU — tens of µs on virtual machines, where it made results
//! flip between two modes from run to run.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::RangeInclusive,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};
use weir_localcluster::netns::Netns;

use super::report::percentile;

pub const IPERF_PORT: u16 = 5201;
pub const RR_PORT: u16 = 7000;
pub const CRR_PORTS: RangeInclusive<u16> = 7100..=7115;
/// Source ports the connection-rate client binds.
const CRR_SOURCE_PORTS: RangeInclusive<u16> = 10_000..=60_999;

/// The ping-pong tool's server in one namespace: request/response on [`RR_PORT`], one
/// exchange per connection on each of [`CRR_PORTS`]. Stops on drop.
pub struct PingPongServer {
    stop: Arc<AtomicBool>,
    listeners: Vec<Socket>,
    threads: Vec<JoinHandle<()>>,
}

impl PingPongServer {
    pub fn start(netns: &Path) -> Result<Self> {
        let ports: Vec<u16> = std::iter::once(RR_PORT).chain(CRR_PORTS).collect();
        let created = weir_conformance::netns::run_in(netns, move || {
            ports
                .into_iter()
                .map(|port| listener(port).map(|s| (port, s)))
                .collect::<std::io::Result<Vec<_>>>()
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_context(|| format!("listening in {}", netns.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut listeners = Vec::new();
        let mut threads = Vec::new();
        for (port, socket) in created {
            listeners.push(socket.try_clone()?);
            let stop = stop.clone();
            let once = port != RR_PORT;
            threads.push(std::thread::spawn(move || serve(socket, once, &stop)));
        }
        Ok(Self {
            stop,
            listeners,
            threads,
        })
    }
}

impl Drop for PingPongServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for l in &self.listeners {
            // Wakes the thread blocked in accept (Linux: accept fails once the listening
            // socket is shut down).
            let _ = l.shutdown(std::net::Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A listening socket for both families (`[::]`, not IPv6-only), or for IPv4 alone where
/// the namespace has no IPv6 at all.
fn listener(port: u16) -> std::io::Result<Socket> {
    let dual = || -> std::io::Result<Socket> {
        let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
        s.set_only_v6(false)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
        Ok(s)
    };
    let s = match dual() {
        Ok(s) => s,
        Err(_) => {
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            s.set_reuse_address(true)?;
            s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
            s
        }
    };
    s.listen(1024)?;
    Ok(s)
}

/// Pins the calling thread to the last CPU this process may run on (the same one for every
/// thread of the ping-pong tool). Best effort: an error leaves the thread unpinned.
fn pin_to_bench_cpu() {
    use nix::{sched, unistd::Pid};
    let Ok(allowed) = sched::sched_getaffinity(Pid::from_raw(0)) else {
        return;
    };
    let Some(cpu) = (0..sched::CpuSet::count())
        .rev()
        .find(|&c| allowed.is_set(c).unwrap_or(false))
    else {
        return;
    };
    let mut one = sched::CpuSet::new();
    if one.set(cpu).is_ok() {
        let _ = sched::sched_setaffinity(Pid::from_raw(0), &one);
    }
}

/// Serves connections one after the other: echoes single bytes until the client closes, or
/// (`once`) answers one byte and closes first.
fn serve(listener: Socket, once: bool, stop: &AtomicBool) {
    pin_to_bench_cpu();
    loop {
        let conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(_) if stop.load(Ordering::SeqCst) => return,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
        };
        let mut conn = std::net::TcpStream::from(conn);
        let _ = conn.set_nodelay(true);
        // A client that vanished must not hold the server forever.
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let mut byte = [0u8; 1];
        while let Ok(1) = conn.read(&mut byte) {
            if conn.write_all(&byte).is_err() || once {
                break;
            }
        }
    }
}

/// Result of a request/response run.
pub struct RequestResponse {
    pub transactions_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// One-byte request/response transactions for `duration` over one connection.
pub fn request_response(
    client_ns: &Path,
    server: impl Into<IpAddr>,
    duration: Duration,
) -> Result<RequestResponse> {
    let server = server.into();
    let ns = client_ns.to_path_buf();
    weir_conformance::netns::run_in(&ns, move || -> Result<RequestResponse> {
        pin_to_bench_cpu();
        let addr = SocketAddr::from((server, RR_PORT));
        let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .with_context(|| format!("connecting to {addr}"))?;
        conn.set_nodelay(true)?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut byte = [1u8; 1];
        let mut transact = |conn: &mut std::net::TcpStream| -> Result<()> {
            conn.write_all(&byte)?;
            conn.read_exact(&mut byte)?;
            Ok(())
        };
        for _ in 0..100 {
            transact(&mut conn)?;
        }
        let mut latencies: Vec<f64> = Vec::with_capacity(1 << 20);
        let started = Instant::now();
        while started.elapsed() < duration {
            let t = Instant::now();
            transact(&mut conn).context("request/response transaction")?;
            latencies.push(t.elapsed().as_nanos() as f64 / 1000.0);
        }
        let elapsed = started.elapsed().as_secs_f64();
        latencies.sort_by(f64::total_cmp);
        Ok(RequestResponse {
            transactions_per_s: latencies.len() as f64 / elapsed,
            p50_us: percentile(&latencies, 50.0),
            p99_us: percentile(&latencies, 99.0),
        })
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?
}

/// The next unused (source port, destination port) of one client–server pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TupleCursor {
    sport: u16,
    dport: u16,
}

impl Default for TupleCursor {
    fn default() -> Self {
        Self {
            sport: *CRR_SOURCE_PORTS.start(),
            dport: *CRR_PORTS.start(),
        }
    }
}

impl TupleCursor {
    fn next_tuple(&mut self) -> Option<(u16, u16)> {
        if self.dport > *CRR_PORTS.end() {
            return None;
        }
        let t = (self.sport, self.dport);
        if self.sport == *CRR_SOURCE_PORTS.end() {
            self.sport = *CRR_SOURCE_PORTS.start();
            self.dport += 1;
        } else {
            self.sport += 1;
        }
        Some(t)
    }
}

/// Sequential connect/request/close for `duration`; connections per second. Stops early
/// (and says so) if the pair's fresh tuples run out.
pub fn connection_rate(
    client_ns: &Path,
    client: impl Into<IpAddr>,
    server: impl Into<IpAddr>,
    duration: Duration,
    cursor: &mut TupleCursor,
) -> Result<f64> {
    let (client, server) = (client.into(), server.into());
    let ns = client_ns.to_path_buf();
    let mut c = *cursor;
    let (rate, c) = weir_conformance::netns::run_in(&ns, move || -> Result<(f64, TupleCursor)> {
        pin_to_bench_cpu();
        let started = Instant::now();
        let mut done = 0u64;
        let mut failures = 0u64;
        while started.elapsed() < duration {
            let Some((sport, dport)) = c.next_tuple() else {
                eprintln!(
                    "  warning: fresh tuples exhausted for {client} → {server}; the run ends early"
                );
                break;
            };
            match one_connection(client, sport, server, dport) {
                Ok(()) => done += 1,
                Err(e) => {
                    failures += 1;
                    if failures > 10 {
                        return Err(e.context(format!(
                            "connections {client}:{sport} → {server}:{dport} keep failing"
                        )));
                    }
                }
            }
        }
        Ok((done as f64 / started.elapsed().as_secs_f64(), c))
    })
    .map_err(|e| anyhow::anyhow!("{e}"))??;
    *cursor = c;
    Ok(rate)
}

fn one_connection(client: IpAddr, sport: u16, server: IpAddr, dport: u16) -> Result<()> {
    let to = SocketAddr::from((server, dport));
    let s = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::from((client, sport)).into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(1))?;
    s.set_tcp_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut conn = std::net::TcpStream::from(s);
    conn.write_all(&[1])?;
    let mut buf = [0u8; 1];
    conn.read_exact(&mut buf)?;
    // The server closes first: wait for its end of stream, so the connection is complete.
    let n = conn.read(&mut buf)?;
    if n != 0 {
        bail!("the server sent more than one byte");
    }
    Ok(())
}

/// Whether a TCP connection from `client_ns` to `server:port` completes within `timeout`.
pub fn can_connect(
    client_ns: &Path,
    server: impl Into<IpAddr>,
    port: u16,
    timeout: Duration,
) -> bool {
    let server = server.into();
    let ns: PathBuf = client_ns.to_path_buf();
    weir_conformance::netns::run_in(&ns, move || {
        std::net::TcpStream::connect_timeout(&SocketAddr::from((server, port)), timeout).is_ok()
    })
    .unwrap_or(false)
}

/// iperf3 throughput in Gbit/s (received), `streams` parallel TCP streams.
pub fn iperf3(
    client_ns: &Netns,
    server: impl Into<IpAddr>,
    streams: usize,
    seconds: u32,
    omit: u32,
) -> Result<f64> {
    let server = server.into();
    let mut cmd = std::process::Command::new("iperf3");
    cmd.args(["-c", &server.to_string()])
        .args(["-p", &IPERF_PORT.to_string()])
        .args(["-t", &seconds.to_string()])
        .args(["-O", &omit.to_string()])
        .args(["-P", &streams.to_string()])
        .args(["--connect-timeout", "2000", "-J"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = client_ns.spawn(&mut cmd)?;
    let out = child.wait_with_output().context("waiting for iperf3")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 printed no JSON ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3 to {server}: {e}");
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("iperf3 JSON without end.sum_received.bits_per_second")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuple_cursor_never_repeats_and_moves_to_the_next_port_when_sources_run_out() {
        let mut c = TupleCursor::default();
        let first = c.next_tuple().unwrap();
        assert_eq!(first, (*CRR_SOURCE_PORTS.start(), *CRR_PORTS.start()));
        let per_port = CRR_SOURCE_PORTS.len();
        let mut last = first;
        for _ in 1..per_port {
            last = c.next_tuple().unwrap();
        }
        assert_eq!(last, (*CRR_SOURCE_PORTS.end(), *CRR_PORTS.start()));
        assert_eq!(
            c.next_tuple().unwrap(),
            (*CRR_SOURCE_PORTS.start(), CRR_PORTS.start() + 1)
        );
    }

    #[test]
    fn tuple_cursor_ends_after_the_last_port() {
        let mut c = TupleCursor {
            sport: *CRR_SOURCE_PORTS.end(),
            dport: *CRR_PORTS.end(),
        };
        assert!(c.next_tuple().is_some());
        assert_eq!(c.next_tuple(), None);
    }
}
