//! Connectivity probes between network namespaces: the data path of conformance runs.
//!
//! [`Servers`] answers in a pod's namespace; [`probe`] (or [`probe_many`] for a batch)
//! checks from another pod's namespace whether a connection to an address, port and
//! protocol completes:
//!
//! * TCP: `connect` completes (the three-way handshake).
//! * UDP: a request carrying a random nonce is echoed back. The request is re-sent a few
//!   times within the timeout, so one lost datagram does not read as a deny.
//! * SCTP: the 4-way association setup (INIT, INIT ACK, COOKIE ECHO, COOKIE ACK) done in
//!   user space over a raw IP socket, because the kernel may have no SCTP support; replies
//!   are matched on ports and verification tag, since a raw socket sees every SCTP packet
//!   of its namespace and many probes run at once. INIT and COOKIE ECHO are re-sent like
//!   UDP requests.
//!
//! [`probe_many_answered`] also reports who answered, when the server was started with an
//! identity ([`Servers::start_as`]): TCP reads what the server writes before closing, UDP
//! reads it after the echo, SCTP from the COOKIE ACK's chunk value.
//!
//! Each probe creates its socket inside the client namespace on a short-lived thread (see
//! [`crate::netns`]) and then runs on the caller's tokio runtime, so hundreds of probes run
//! concurrently on a couple of threads. Every probe owns exactly one socket, closed when the
//! probe ends, whatever the outcome.

mod sctp;
mod server;

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use socket2::{Domain, Protocol as SocketProtocol, SockAddr, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::{Instant, timeout_at};

pub use server::Servers;

use crate::Error;
use crate::cases::Protocol;

/// What a probe observed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeOutcome {
    /// The connection completed (TCP/SCTP handshake, or the UDP echo came back).
    Connected,
    /// An explicit negative answer: TCP RST, SCTP ABORT, ICMP port or protocol unreachable.
    Refused,
    /// An ICMP host/network unreachable or administratively prohibited, or no route from the
    /// client.
    Unreachable,
    /// No answer within the timeout.
    TimedOut,
    /// The probe could not be made (e.g. the client namespace does not exist). Neither an
    /// allow nor a deny: conformance runs report it as a failure of its own.
    Error(String),
}

impl ProbeOutcome {
    /// The connection completed.
    pub fn is_connected(&self) -> bool {
        matches!(self, ProbeOutcome::Connected)
    }

    /// The connection was denied one way or another (refused, unreachable, timed out).
    pub fn is_denied(&self) -> bool {
        matches!(
            self,
            ProbeOutcome::Refused | ProbeOutcome::Unreachable | ProbeOutcome::TimedOut
        )
    }

    /// Short lower-case description (`connected`, `refused`, ...; errors with their text).
    pub fn describe(&self) -> String {
        match self {
            ProbeOutcome::Connected => "connected".to_owned(),
            ProbeOutcome::Refused => "refused".to_owned(),
            ProbeOutcome::Unreachable => "unreachable".to_owned(),
            ProbeOutcome::TimedOut => "timed out".to_owned(),
            ProbeOutcome::Error(message) => format!("error: {message}"),
        }
    }
}

/// One probe of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeRequest {
    /// Network namespace of the client (e.g. `/run/netns/<pod>`).
    pub netns: PathBuf,
    pub target: SocketAddr,
    pub protocol: Protocol,
    pub timeout: Duration,
}

/// Probes `target` over `protocol` from inside the network namespace at `netns`, giving up
/// after `timeout` (socket creation included). Must run on a tokio runtime with I/O and
/// time enabled.
pub async fn probe(
    netns: &Path,
    target: SocketAddr,
    protocol: Protocol,
    timeout: Duration,
) -> ProbeOutcome {
    let deadline = Instant::now() + timeout;
    let socket = match timeout_at(deadline, client_socket(netns, target, protocol)).await {
        Ok(Ok(socket)) => socket,
        Ok(Err(error)) => return ProbeOutcome::Error(error.to_string()),
        Err(_) => return ProbeOutcome::TimedOut,
    };
    run_probe(socket, target, protocol, deadline, false).await.0
}

/// Runs every request concurrently; outcomes are in request order. Sockets are created
/// with one namespace switch per distinct namespace rather than one per probe, and each
/// request's timeout counts from the call. Must run on a tokio runtime with I/O and time
/// enabled.
pub async fn probe_many(requests: &[ProbeRequest]) -> Vec<ProbeOutcome> {
    probe_batch(requests, false)
        .await
        .into_iter()
        .map(|(outcome, _)| outcome)
        .collect()
}

/// [`probe_many`], and for each connected probe who answered, if the server told (see the
/// module docs).
pub async fn probe_many_answered(requests: &[ProbeRequest]) -> Vec<(ProbeOutcome, Option<String>)> {
    probe_batch(requests, true).await
}

async fn probe_batch(
    requests: &[ProbeRequest],
    want_answer: bool,
) -> Vec<(ProbeOutcome, Option<String>)> {
    let start = Instant::now();
    let mut by_netns: Vec<(PathBuf, Vec<usize>)> = Vec::new();
    for (index, request) in requests.iter().enumerate() {
        match by_netns
            .iter_mut()
            .find(|(netns, _)| *netns == request.netns)
        {
            Some((_, indices)) => indices.push(index),
            None => by_netns.push((request.netns.clone(), vec![index])),
        }
    }
    let mut sockets: Vec<Option<Result<Socket, Error>>> =
        (0..requests.len()).map(|_| None).collect();
    let creations = by_netns.into_iter().map(|(netns, indices)| {
        let specs: Vec<(SocketAddr, Protocol)> = indices
            .iter()
            .map(|&index| (requests[index].target, requests[index].protocol))
            .collect();
        async move {
            let created = in_netns(&netns, move || {
                specs
                    .into_iter()
                    .map(|(target, protocol)| new_client_socket(target, protocol))
                    .collect::<Vec<_>>()
            })
            .await;
            (indices, created)
        }
    });
    for (indices, created) in futures::future::join_all(creations).await {
        match created {
            Ok(created) => {
                for (index, socket) in indices.into_iter().zip(created) {
                    sockets[index] = Some(socket);
                }
            }
            Err(error) => {
                for index in indices {
                    sockets[index] = Some(Err(Error::Netns {
                        operation: "creating a probe socket in",
                        name: requests[index].netns.display().to_string(),
                        reason: error.to_string(),
                    }));
                }
            }
        }
    }
    let probes = requests
        .iter()
        .zip(sockets)
        .map(|(request, socket)| async move {
            match socket {
                Some(Ok(socket)) => {
                    run_probe(
                        socket,
                        request.target,
                        request.protocol,
                        start + request.timeout,
                        want_answer,
                    )
                    .await
                }
                Some(Err(error)) => (ProbeOutcome::Error(error.to_string()), None),
                None => (
                    ProbeOutcome::Error("no socket was created".to_owned()),
                    None,
                ),
            }
        });
    futures::future::join_all(probes).await
}

/// What one probe saw: the outcome and, when asked for and told, who answered.
type Answer = (ProbeOutcome, Option<String>);

async fn run_probe(
    socket: Socket,
    target: SocketAddr,
    protocol: Protocol,
    deadline: Instant,
    want_answer: bool,
) -> Answer {
    let attempt = async {
        match protocol {
            Protocol::Tcp => probe_tcp(socket, target, deadline, want_answer).await,
            Protocol::Udp => probe_udp(socket, target, deadline).await,
            Protocol::Sctp => probe_sctp(socket, target, deadline).await,
        }
    };
    timeout_at(deadline, attempt)
        .await
        .unwrap_or((ProbeOutcome::TimedOut, None))
}

/// The identity in an answer, if it is non-empty UTF-8.
fn identity_of(bytes: &[u8]) -> Option<String> {
    std::str::from_utf8(bytes)
        .ok()
        .map(str::trim)
        .filter(|text| !text.is_empty())
        .map(str::to_owned)
}

/// Runs `work` on a short-lived thread inside `netns` without blocking the runtime.
async fn in_netns<T, F>(netns: &Path, work: F) -> Result<T, Error>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let path = netns.to_owned();
    std::thread::Builder::new()
        .name("probe-socket".to_owned())
        // Socket creation needs very little stack; hundreds of these may exist at once.
        .stack_size(128 * 1024)
        .spawn(move || {
            let _ = sender.send(crate::netns::enter(&path).map(|()| work()));
        })
        .map_err(|error| socket_error("spawning a probe thread", error))?;
    receiver.await.map_err(|_| Error::Netns {
        operation: "creating a probe socket in",
        name: netns.display().to_string(),
        reason: "the probe thread ended early".to_owned(),
    })?
}

async fn client_socket(
    netns: &Path,
    target: SocketAddr,
    protocol: Protocol,
) -> Result<Socket, Error> {
    in_netns(netns, move || new_client_socket(target, protocol)).await?
}

/// The socket for one probe: non-blocking, close-on-exec. Must run inside the client
/// namespace.
fn new_client_socket(target: SocketAddr, protocol: Protocol) -> Result<Socket, Error> {
    let domain = Domain::for_address(target);
    let (kind, proto) = match protocol {
        Protocol::Tcp => (Type::STREAM, SocketProtocol::TCP),
        Protocol::Udp => (Type::DGRAM, SocketProtocol::UDP),
        Protocol::Sctp => (
            Type::RAW,
            SocketProtocol::from(i32::from(Protocol::Sctp.ip_protocol())),
        ),
    };
    let socket = Socket::new(domain, kind.nonblocking().cloexec(), Some(proto))
        .map_err(|error| socket_error(&format!("creating a {protocol} probe socket"), error))?;
    if protocol == Protocol::Tcp {
        // Close with RST instead of FIN: a probe needs no graceful close, and a client
        // socket in TIME_WAIT would pin its port for a minute.
        socket
            .set_linger(Some(Duration::ZERO))
            .map_err(|error| socket_error("setting SO_LINGER on a probe socket", error))?;
    }
    Ok(socket)
}

/// Maps the error of a failed connection attempt to an outcome.
fn outcome_of(error: &std::io::Error) -> ProbeOutcome {
    match error.raw_os_error() {
        // RST, ICMP port unreachable, ICMP protocol unreachable (icmp_err_convert in
        // net/ipv4/icmp.c maps it to ENOPROTOOPT), ICMPv6 parameter problem "unrecognized
        // next header" (icmpv6_err_convert in net/ipv6/icmp.c maps it to EPROTO).
        Some(libc::ECONNREFUSED | libc::ECONNRESET | libc::ENOPROTOOPT | libc::EPROTO) => {
            ProbeOutcome::Refused
        }
        // ICMP host/net unreachable or prohibited, no route, or a local filter verdict.
        Some(
            libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EACCES | libc::EPERM | libc::EHOSTDOWN,
        ) => ProbeOutcome::Unreachable,
        Some(libc::ETIMEDOUT) => ProbeOutcome::TimedOut,
        _ => ProbeOutcome::Error(error.to_string()),
    }
}

async fn probe_tcp(
    socket: Socket,
    target: SocketAddr,
    deadline: Instant,
    want_answer: bool,
) -> Answer {
    let stream = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    let mut stream = match stream.connect(target).await {
        Ok(stream) => stream,
        Err(error) => return (outcome_of(&error), None),
    };
    if !want_answer {
        return (ProbeOutcome::Connected, None);
    }
    // The handshake decided the outcome; what the server writes before closing only says
    // who it is, so a read that fails or runs out of time leaves the answer unknown.
    let mut identity = Vec::new();
    let read = async {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 256];
        while identity.len() < 1024 {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(len) => identity.extend_from_slice(&chunk[..len]),
            }
        }
    };
    let _ = timeout_at(deadline, read).await;
    (ProbeOutcome::Connected, identity_of(&identity))
}

/// How often an unanswered UDP request, INIT or COOKIE ECHO is re-sent within a probe's
/// timeout.
const RESEND_SLICES: u32 = 4;

fn resend_interval(deadline: Instant) -> Duration {
    (deadline.saturating_duration_since(Instant::now()) / RESEND_SLICES)
        .max(Duration::from_millis(50))
}

async fn probe_udp(socket: Socket, target: SocketAddr, deadline: Instant) -> Answer {
    let udp = match tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(socket)) {
        Ok(udp) => udp,
        Err(error) => return (ProbeOutcome::Error(error.to_string()), None),
    };
    // Connected, so the kernel filters replies by source and reports ICMP errors.
    if let Err(error) = udp.connect(target).await {
        return (outcome_of(&error), None);
    }
    let mut request = *b"weir-probe-0000000000000000";
    let mut nonce = [0u8; 8];
    random_fill(&mut nonce);
    for (slot, byte) in request[11..].chunks_mut(2).zip(nonce) {
        slot.copy_from_slice(format!("{byte:02x}").as_bytes());
    }
    let interval = resend_interval(deadline);
    let mut buffer = [0u8; 1100];
    loop {
        if let Err(error) = udp.send(&request).await {
            return (outcome_of(&error), None);
        }
        let resend_at = Instant::now() + interval;
        loop {
            match tokio::time::timeout_at(resend_at, udp.recv(&mut buffer)).await {
                Err(_) => break,
                // The echo, alone or followed by `@` and the server's identity.
                Ok(Ok(len)) if buffer[..len].starts_with(&request) => {
                    let rest = &buffer[request.len()..len];
                    match rest.split_first() {
                        None => return (ProbeOutcome::Connected, None),
                        Some((b'@', identity)) => {
                            return (ProbeOutcome::Connected, identity_of(identity));
                        }
                        Some(_) => {}
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return (outcome_of(&error), None),
            }
        }
    }
}

/// Fills `buffer` with random bytes. Tags, nonces and the cookie secret only need to differ
/// between probes and runs, not to be secret: fastrand (seeded per thread).
pub(crate) fn random_fill(buffer: &mut [u8]) {
    fastrand::fill(buffer);
}

pub(crate) fn random_u32() -> u32 {
    fastrand::u32(..)
}

pub(crate) fn socket_error(what: &str, source: std::io::Error) -> Error {
    Error::Socket {
        what: what.to_owned(),
        source,
    }
}

/// Splits a packet read from an IPv4 raw socket into (source, destination, payload).
/// Returns `None` unless it is an unfragmented SCTP packet with a sane header (raw sockets
/// get reassembled datagrams, so a fragment here is malformed).
pub(crate) fn ipv4_payload(packet: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, &[u8])> {
    let ip = etherparse::Ipv4Slice::from_slice(packet).ok()?;
    if ip.is_payload_fragmented() || ip.payload_ip_number().0 != Protocol::Sctp.ip_protocol() {
        return None;
    }
    let header = ip.header();
    Some((
        header.source_addr(),
        header.destination_addr(),
        ip.payload().payload,
    ))
}

/// What the SCTP client waits for next.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SctpState {
    /// INIT sent; waiting for INIT ACK.
    CookieWait,
    /// COOKIE ECHO sent; waiting for COOKIE ACK.
    CookieEchoed,
}

async fn probe_sctp(socket: Socket, target: SocketAddr, deadline: Instant) -> Answer {
    // Connecting a raw socket makes the kernel deliver only packets from the target address
    // (and report ICMP errors for it); ports and tags are checked below.
    if let Err(error) = socket.connect(&SockAddr::from(SocketAddr::new(target.ip(), 0))) {
        return (outcome_of(&error), None);
    }
    // ICMP errors (protocol unreachable when the target has no SCTP at all) only raise
    // EPOLLERR on a raw socket, hence the error interest next to readability.
    let interest = Interest::READABLE.add(Interest::ERROR);
    // SAFETY: a `socket2::Socket` owns its descriptor and never swaps it; the `AsyncFd`
    // owns the socket until the probe ends.
    let socket = match unsafe { AsyncFd::register_with_interest(socket, interest) } {
        Ok(socket) => socket,
        Err(error) => return (ProbeOutcome::Error(error.to_string()), None),
    };
    let ipv4 = target.is_ipv4();
    let our_port = 49152 + (random_u32() % 16384) as u16;
    let our_tag = loop {
        let tag = random_u32();
        if tag != 0 {
            break tag;
        }
    };
    let init = sctp::build(
        sctp::Header {
            src_port: our_port,
            dst_port: target.port(),
            verification_tag: 0,
        },
        &[(
            sctp::CHUNK_INIT,
            0,
            &sctp::init_value(
                sctp::InitFields {
                    initiate_tag: our_tag,
                    a_rwnd: 65535,
                    outbound_streams: 1,
                    inbound_streams: 1,
                    initial_tsn: random_u32(),
                },
                &[],
            ),
        )],
    );
    let mut state = SctpState::CookieWait;
    let mut request = init;
    // The tag our outgoing packets carry: 0 on INIT, the server's tag afterwards. An ABORT
    // with the T bit reflects it.
    let mut sent_tag = 0u32;
    let mut peer_tag = 0u32;
    let interval = resend_interval(deadline);
    let mut buffer = vec![0u8; 65536];
    loop {
        if let Err(error) = send_raw(socket.get_ref(), &request) {
            return (outcome_of(&error), None);
        }
        let resend_at = Instant::now() + interval;
        loop {
            let read = socket.async_io(interest, |mut socket| socket.read(&mut buffer));
            let received = timeout_at(resend_at, read).await;
            let len = match received {
                Err(_) => break,
                Ok(Ok(len)) => len,
                Ok(Err(error)) => return (outcome_of(&error), None),
            };
            let payload = if ipv4 {
                match ipv4_payload(&buffer[..len]) {
                    Some((src, _, payload)) if IpAddr::V4(src) == target.ip() => payload,
                    _ => continue,
                }
            } else {
                &buffer[..len]
            };
            let Some(packet) = sctp::parse(payload) else {
                continue;
            };
            let header = packet.header;
            if header.src_port != target.port() || header.dst_port != our_port {
                continue;
            }
            let Some(chunk) = packet.chunks.first() else {
                continue;
            };
            if chunk.kind == sctp::CHUNK_ABORT {
                let reflected = chunk.flags & sctp::ABORT_FLAG_T != 0;
                let for_us = if reflected {
                    header.verification_tag == sent_tag
                } else {
                    header.verification_tag == our_tag
                };
                if for_us {
                    return (ProbeOutcome::Refused, None);
                }
                continue;
            }
            if header.verification_tag != our_tag {
                continue;
            }
            match (state, chunk.kind) {
                (SctpState::CookieWait, sctp::CHUNK_INIT_ACK) => {
                    let Some((fields, Some(cookie))) =
                        sctp::parse_init(chunk.value, sctp::PARAM_STATE_COOKIE)
                    else {
                        continue;
                    };
                    peer_tag = fields.initiate_tag;
                    sent_tag = peer_tag;
                    request = sctp::build(
                        sctp::Header {
                            src_port: our_port,
                            dst_port: target.port(),
                            verification_tag: peer_tag,
                        },
                        &[(sctp::CHUNK_COOKIE_ECHO, 0, cookie)],
                    );
                    state = SctpState::CookieEchoed;
                    if let Err(error) = send_raw(socket.get_ref(), &request) {
                        return (outcome_of(&error), None);
                    }
                }
                (SctpState::CookieEchoed, sctp::CHUNK_COOKIE_ACK) => {
                    // Tear the association down again (RFC 9260 §9.1) so a real SCTP stack
                    // on the other side does not keep it; a stateless responder ignores it.
                    let abort = sctp::build(
                        sctp::Header {
                            src_port: our_port,
                            dst_port: target.port(),
                            verification_tag: peer_tag,
                        },
                        &[(sctp::CHUNK_ABORT, 0, &[])],
                    );
                    let _ = send_raw(socket.get_ref(), &abort);
                    return (ProbeOutcome::Connected, identity_of(chunk.value));
                }
                _ => {}
            }
        }
    }
}

fn send_raw(socket: &Socket, packet: &[u8]) -> std::io::Result<()> {
    // A raw socket's send buffer only fills under extreme load; a packet that cannot go out
    // now is treated as lost and re-sent with the next attempt.
    match socket.send(packet) {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_errors_map_to_denials() {
        let outcome = |errno| outcome_of(&std::io::Error::from_raw_os_error(errno));
        assert_eq!(outcome(libc::ECONNREFUSED), ProbeOutcome::Refused);
        assert_eq!(outcome(libc::ENOPROTOOPT), ProbeOutcome::Refused);
        assert_eq!(outcome(libc::EHOSTUNREACH), ProbeOutcome::Unreachable);
        assert_eq!(outcome(libc::ETIMEDOUT), ProbeOutcome::TimedOut);
        assert!(matches!(outcome(libc::EMFILE), ProbeOutcome::Error(_)));
        assert!(outcome(libc::ECONNREFUSED).is_denied());
        assert!(!outcome(libc::EMFILE).is_denied());
    }

    #[test]
    fn ipv4_payload_checks_the_header() {
        let mut packet = vec![
            0x45, 0, 0, 24, 0, 0, 0, 0, 64, 132, 0, 0, 192, 0, 2, 1, 192, 0, 2, 2,
        ];
        packet.extend_from_slice(&[1, 2, 3, 4]);
        let (src, dst, payload) = ipv4_payload(&packet).expect("valid");
        assert_eq!(src, Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(dst, Ipv4Addr::new(192, 0, 2, 2));
        assert_eq!(payload, &[1, 2, 3, 4]);
        packet[9] = 6;
        assert!(ipv4_payload(&packet).is_none(), "not SCTP");
        packet[9] = 132;
        packet[6] = 0x20;
        assert!(ipv4_payload(&packet).is_none(), "a fragment");
        packet[6] = 0;
        packet[3] = 200;
        assert!(ipv4_payload(&packet).is_none(), "length beyond the buffer");
    }
}
