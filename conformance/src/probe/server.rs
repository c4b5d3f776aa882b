//! Servers that answer probes inside a pod's network namespace.
//!
//! One thread per [`Servers`] joins the namespace, opens every socket there and serves them
//! all with `poll(2)`; an eventfd wakes it to stop. A pod needs a handful of sockets and
//! answers a few hundred probes per step, so one thread per pod is plenty, and keeping the
//! thread in the namespace avoids switching namespaces back and forth.
//!
//! * TCP: every connection is accepted and closed at once; completing the handshake is the
//!   whole point. A server started with an identity ([`Servers::start_as`], e.g. the pod's
//!   `ns/pod`) first writes it on the connection, so a client can tell who answered (through
//!   a Service, that is the backend).
//! * UDP: every datagram is echoed back, from the address it was sent to (`IP_PKTINFO` /
//!   `IPV6_PKTINFO`), so a connected client socket accepts the reply; with an identity the
//!   echo is followed by `@` and the identity.
//! * SCTP: a stateless responder on a raw IP socket (protocol 132), because the kernels this
//!   runs on may have no SCTP at all: INIT on a served port gets an INIT ACK with a state
//!   cookie, a valid COOKIE ECHO gets a COOKIE ACK (carrying the identity as its chunk value
//!   when there is one), INIT on any other port gets an ABORT
//!   (what a kernel SCTP stack answers for a port nobody listens on). Everything else is
//!   ignored: the raw socket also sees the answers meant for probes running in the same
//!   namespace, and answering those would break them. Having a raw socket for the protocol
//!   open also stops the kernel from answering with ICMP protocol-unreachable.
//!
//! Every socket exists for IPv4 and, when the kernel has IPv6, for IPv6 (`IPV6_V6ONLY`, so
//! both can bind the same port).

use std::io::{ErrorKind, IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::thread::JoinHandle;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn, SockaddrIn6, SockaddrStorage,
    recvmsg, sendmsg, setsockopt, sockopt,
};
use socket2::{Domain, Protocol as SocketProtocol, Socket, Type};

use super::sctp::{self, Header, InitFields};
use super::{random_u32, socket_error};
use crate::Result;
use crate::cases::Protocol;

/// TCP, UDP and SCTP servers on some ports inside one network namespace. Dropping it stops
/// the serving thread and closes every socket.
#[derive(Debug)]
pub struct Servers {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Servers {
    /// Starts serving `ports` on `protocols` in the network namespace at `netns`. Returns
    /// once every socket is bound, so a probe sent afterwards finds them.
    pub fn start(netns: &Path, ports: &[u16], protocols: &[Protocol]) -> Result<Servers> {
        Servers::start_as(netns, ports, protocols, "")
    }

    /// Like [`Servers::start`], and every answer tells `identity` (see the module docs);
    /// an empty identity tells nothing.
    pub fn start_as(
        netns: &Path,
        ports: &[u16],
        protocols: &[Protocol],
        identity: &str,
    ) -> Result<Servers> {
        let stop = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|errno| socket_error("creating the stop eventfd", errno.into()))?;
        let stop_for_thread = stop
            .as_fd()
            .try_clone_to_owned()
            .map_err(|error| socket_error("duplicating the stop eventfd", error))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let netns = netns.to_owned();
        let ports = ports.to_vec();
        let protocols = protocols.to_vec();
        let identity = identity.as_bytes().to_vec();
        let thread = std::thread::Builder::new()
            .name("probe-servers".to_owned())
            .spawn(move || {
                let sockets = crate::netns::enter(&netns)
                    .and_then(|()| ServerSockets::open(&ports, &protocols, identity));
                match sockets {
                    Ok(sockets) => {
                        let _ = ready_tx.send(Ok(()));
                        sockets.serve(&stop_for_thread);
                    }
                    Err(error) => {
                        let _ = ready_tx.send(Err(error));
                    }
                }
            })
            .map_err(|error| socket_error("spawning the server thread", error))?;
        let mut servers = Servers {
            stop,
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(servers),
            Ok(Err(error)) => Err(error),
            Err(_) => {
                servers.thread.take();
                Err(socket_error(
                    "starting servers",
                    std::io::Error::other("the server thread ended before binding"),
                ))
            }
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        // A failed write can only mean the eventfd counter is saturated, i.e. already
        // signalled.
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What a socket in the serving loop is for.
enum Role {
    TcpListener,
    UdpEcho,
    SctpResponder,
}

struct ServerSocket {
    socket: Socket,
    role: Role,
    ipv6: bool,
}

struct ServerSockets {
    sockets: Vec<ServerSocket>,
    sctp_ports: Vec<u16>,
    /// Key of the state cookie's check value; random per server.
    cookie_secret: [u8; 16],
    /// What answers tell about who answered (empty: nothing).
    identity: Vec<u8>,
}

/// Length of the state cookie this responder hands out: server tag, client tag, source port,
/// destination port, check value.
const COOKIE_LEN: usize = 16;

impl ServerSockets {
    fn open(ports: &[u16], protocols: &[Protocol], identity: Vec<u8>) -> Result<ServerSockets> {
        let mut sockets = Vec::new();
        let mut cookie_secret = [0u8; 16];
        super::random_fill(&mut cookie_secret);
        for ipv6 in [false, true] {
            let domain = if ipv6 { Domain::IPV6 } else { Domain::IPV4 };
            for &protocol in protocols {
                match protocol {
                    Protocol::Tcp | Protocol::Udp => {
                        for &port in ports {
                            match bind_port(domain, protocol, port) {
                                Ok(socket) => sockets.push(ServerSocket {
                                    socket,
                                    role: if protocol == Protocol::Tcp {
                                        Role::TcpListener
                                    } else {
                                        Role::UdpEcho
                                    },
                                    ipv6,
                                }),
                                Err(error) if ipv6 && ipv6_unavailable(&error) => break,
                                Err(error) => {
                                    return Err(socket_error(
                                        &format!("binding {protocol} port {port} ({domain:?})"),
                                        error,
                                    ));
                                }
                            }
                        }
                    }
                    Protocol::Sctp => match raw_sctp_socket(domain) {
                        Ok(socket) => sockets.push(ServerSocket {
                            socket,
                            role: Role::SctpResponder,
                            ipv6,
                        }),
                        Err(error) if ipv6 && ipv6_unavailable(&error) => {}
                        Err(error) => {
                            return Err(socket_error(
                                &format!("opening a raw SCTP socket ({domain:?})"),
                                error,
                            ));
                        }
                    },
                }
            }
        }
        let sctp_ports = if protocols.contains(&Protocol::Sctp) {
            ports.to_vec()
        } else {
            Vec::new()
        };
        Ok(ServerSockets {
            sockets,
            sctp_ports,
            cookie_secret,
            identity,
        })
    }

    fn serve(&self, stop: &impl AsFd) {
        let mut buffer = vec![0u8; 65536];
        loop {
            let mut fds = Vec::with_capacity(self.sockets.len() + 1);
            fds.push(PollFd::new(stop.as_fd(), PollFlags::POLLIN));
            fds.extend(
                self.sockets
                    .iter()
                    .map(|server| PollFd::new(server.socket.as_fd(), PollFlags::POLLIN)),
            );
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(errno) => {
                    eprintln!("warning: probe servers stopped: poll failed: {errno}");
                    return;
                }
            }
            let ready: Vec<bool> = fds
                .iter()
                .map(|fd| fd.revents().is_some_and(|events| !events.is_empty()))
                .collect();
            drop(fds);
            if ready[0] {
                return;
            }
            for (index, server) in self.sockets.iter().enumerate() {
                if !ready[index + 1] {
                    continue;
                }
                match server.role {
                    Role::TcpListener => accept_all(&server.socket, &self.identity),
                    Role::UdpEcho => {
                        echo_all(&server.socket, server.ipv6, &mut buffer, &self.identity)
                    }
                    Role::SctpResponder => self.answer_sctp(server, &mut buffer),
                }
            }
        }
    }

    /// Reads every pending SCTP packet on a raw socket and answers the ones addressed to
    /// this responder.
    fn answer_sctp(&self, server: &ServerSocket, buffer: &mut [u8]) {
        loop {
            let Some((len, peer, local)) = recv_from(&server.socket, server.ipv6, buffer) else {
                return;
            };
            // An IPv4 raw socket receives the IP header too (raw(7)); IPv6 raw sockets never
            // do (raw(7), ipv6(7)).
            let (payload, peer, local) = if server.ipv6 {
                (&buffer[..len], peer.ip(), local)
            } else {
                match super::ipv4_payload(&buffer[..len]) {
                    Some((src, dst, payload)) => (payload, IpAddr::V4(src), IpAddr::V4(dst)),
                    None => continue,
                }
            };
            if let Some(reply) = self.sctp_reply(payload) {
                // Raw sockets take no port: the SCTP header carries it.
                send_to(&server.socket, &reply, SocketAddr::new(peer, 0), local);
            }
        }
    }

    /// The answer to one incoming SCTP packet, if it gets one.
    fn sctp_reply(&self, payload: &[u8]) -> Option<Vec<u8>> {
        let packet = sctp::parse(payload)?;
        let header = packet.header;
        let first = packet.chunks.first()?;
        let served = self.sctp_ports.contains(&header.dst_port);
        let reply_header = |verification_tag| Header {
            src_port: header.dst_port,
            dst_port: header.src_port,
            verification_tag,
        };
        match first.kind {
            // RFC 9260 §8.5.1: an INIT travels alone with verification tag 0.
            sctp::CHUNK_INIT if header.verification_tag == 0 && packet.chunks.len() == 1 => {
                let (init, _) = sctp::parse_init(first.value, sctp::PARAM_STATE_COOKIE)?;
                if !served {
                    // RFC 9260 §8.4 (3): the ABORT carries the INIT's initiate tag, T bit
                    // clear.
                    return Some(sctp::build(
                        reply_header(init.initiate_tag),
                        &[(sctp::CHUNK_ABORT, 0, &[])],
                    ));
                }
                let server_tag = nonzero_random();
                let cookie = self.cookie(server_tag, init.initiate_tag, header);
                let value = sctp::init_value(
                    InitFields {
                        initiate_tag: server_tag,
                        a_rwnd: 65535,
                        // At most what the INIT offered to receive (RFC 9260 §5.1.1); one
                        // stream each way is all a handshake needs.
                        outbound_streams: 1,
                        inbound_streams: 1,
                        initial_tsn: random_u32(),
                    },
                    &[(sctp::PARAM_STATE_COOKIE, &cookie)],
                );
                Some(sctp::build(
                    reply_header(init.initiate_tag),
                    &[(sctp::CHUNK_INIT_ACK, 0, &value)],
                ))
            }
            sctp::CHUNK_COOKIE_ECHO if served => {
                let client_tag = self.check_cookie(first.value, header)?;
                Some(sctp::build(
                    reply_header(client_tag),
                    &[(sctp::CHUNK_COOKIE_ACK, 0, &self.identity)],
                ))
            }
            _ => None,
        }
    }

    /// A stateless cookie (RFC 9260 §5.1.3 suggests one): the tags and ports it was issued
    /// for, and a keyed check value so a COOKIE ECHO cannot be forged by accident. It is a
    /// test responder's cookie, not a cryptographic one.
    fn cookie(&self, server_tag: u32, client_tag: u32, init: Header) -> [u8; COOKIE_LEN] {
        let mut cookie = [0u8; COOKIE_LEN];
        cookie[0..4].copy_from_slice(&server_tag.to_be_bytes());
        cookie[4..8].copy_from_slice(&client_tag.to_be_bytes());
        cookie[8..10].copy_from_slice(&init.src_port.to_be_bytes());
        cookie[10..12].copy_from_slice(&init.dst_port.to_be_bytes());
        let check = crc32c::crc32c_append(crc32c::crc32c(&self.cookie_secret), &cookie[..12]);
        cookie[12..16].copy_from_slice(&check.to_be_bytes());
        cookie
    }

    /// Validates a COOKIE ECHO against the packet carrying it; returns the client's tag.
    fn check_cookie(&self, cookie: &[u8], header: Header) -> Option<u32> {
        let cookie: [u8; COOKIE_LEN] = cookie.try_into().ok()?;
        let server_tag = u32::from_be_bytes([cookie[0], cookie[1], cookie[2], cookie[3]]);
        let client_tag = u32::from_be_bytes([cookie[4], cookie[5], cookie[6], cookie[7]]);
        let expected = self.cookie(
            server_tag,
            client_tag,
            Header {
                src_port: header.src_port,
                dst_port: header.dst_port,
                verification_tag: 0,
            },
        );
        // RFC 9260 §5.1.5: the packet's tag must be the one this end chose.
        (expected == cookie && header.verification_tag == server_tag).then_some(client_tag)
    }
}

fn nonzero_random() -> u32 {
    loop {
        let value = random_u32();
        if value != 0 {
            return value;
        }
    }
}

fn ipv6_unavailable(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL | libc::EPROTONOSUPPORT)
    )
}

fn bind_port(domain: Domain, protocol: Protocol, port: u16) -> std::io::Result<Socket> {
    let (kind, proto) = match protocol {
        Protocol::Tcp => (Type::STREAM, SocketProtocol::TCP),
        _ => (Type::DGRAM, SocketProtocol::UDP),
    };
    let socket = Socket::new(domain, kind.nonblocking().cloexec(), Some(proto))?;
    let address = if domain == Domain::IPV6 {
        socket.set_only_v6(true)?;
        setsockopt(&socket, sockopt::Ipv6RecvPacketInfo, &true)?;
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)
    } else {
        if protocol == Protocol::Udp {
            setsockopt(&socket, sockopt::Ipv4PacketInfo, &true)?;
        }
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)
    };
    if protocol == Protocol::Tcp {
        // Lets a restarted server bind while old connections sit in TIME_WAIT. Not for UDP,
        // where it would let a second server share the port and split the traffic.
        socket.set_reuse_address(true)?;
    }
    socket.bind(&address.into())?;
    if protocol == Protocol::Tcp {
        socket.listen(1024)?;
    }
    Ok(socket)
}

fn raw_sctp_socket(domain: Domain) -> std::io::Result<Socket> {
    let socket = Socket::new(
        domain,
        Type::RAW.nonblocking().cloexec(),
        Some(SocketProtocol::from(i32::from(
            Protocol::Sctp.ip_protocol(),
        ))),
    )?;
    if domain == Domain::IPV6 {
        setsockopt(&socket, sockopt::Ipv6RecvPacketInfo, &true)?;
    }
    Ok(socket)
}

fn accept_all(listener: &Socket, identity: &[u8]) {
    loop {
        match listener.accept() {
            // Dropping the accepted socket closes the connection: the handshake is done. The
            // identity is a few bytes, which a fresh connection's send buffer always takes.
            Ok((connection, _)) => {
                if !identity.is_empty() {
                    let _ = connection.set_nonblocking(true);
                    let _ = connection.send(identity);
                }
            }
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            // WouldBlock ends the batch. Other errors (ECONNABORTED for a connection reset
            // while queued, EMFILE) end it too: `poll` is level-triggered, so connections
            // still queued are accepted in the next round, and an error that persists
            // cannot spin this loop.
            Err(_) => return,
        }
    }
}

/// Echoes every pending datagram back to its sender, from the address it was sent to.
fn echo_all(socket: &Socket, ipv6: bool, buffer: &mut [u8], identity: &[u8]) {
    while let Some((len, peer, local)) = recv_from(socket, ipv6, buffer) {
        if identity.is_empty() {
            send_to(socket, &buffer[..len], peer, local);
        } else {
            let mut reply = buffer[..len].to_vec();
            reply.push(b'@');
            reply.extend_from_slice(identity);
            send_to(socket, &reply, peer, local);
        }
    }
}

/// Receives one datagram as (length, sender, address it was sent to). The destination comes
/// from `IP_PKTINFO`/`IPV6_PKTINFO` and is unspecified where the socket has none (raw IPv4
/// sockets carry it in the IP header instead). Returns `None` when nothing is pending.
fn recv_from(
    socket: &Socket,
    ipv6: bool,
    buffer: &mut [u8],
) -> Option<(usize, SocketAddr, IpAddr)> {
    loop {
        let mut cmsg = if ipv6 {
            nix::cmsg_space!(libc::in6_pktinfo)
        } else {
            nix::cmsg_space!(libc::in_pktinfo)
        };
        let mut iov = [IoSliceMut::new(buffer)];
        let message = match recvmsg::<SockaddrStorage>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(message) => message,
            Err(nix::errno::Errno::EINTR) => continue,
            // EAGAIN: drained. Any other error is a pending socket error that this call has
            // now consumed; `poll` is level-triggered, so datagrams still queued are read in
            // the next round (and a persistent error cannot spin this loop).
            Err(_) => return None,
        };
        let len = message.bytes;
        let peer = message.address.and_then(|address| {
            if let Some(v4) = address.as_sockaddr_in() {
                Some(SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
            } else {
                address
                    .as_sockaddr_in6()
                    .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
            }
        });
        let mut local = None;
        if let Ok(cmsgs) = message.cmsgs() {
            for cmsg in cmsgs {
                match cmsg {
                    ControlMessageOwned::Ipv4PacketInfo(info) => {
                        local = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            info.ipi_addr.s_addr,
                        ))));
                    }
                    ControlMessageOwned::Ipv6PacketInfo(info) => {
                        local = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
        }
        let Some(peer) = peer else { continue };
        // Raw IPv4 sockets carry the destination in the IP header instead of a control
        // message; the caller reads it from there.
        let local = local.unwrap_or(if ipv6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        });
        return Some((len, peer, local));
    }
}

/// Sends `data` to `peer` with source address `local` (unless unspecified), so that the
/// answer comes from the address the request was sent to.
fn send_to(socket: &Socket, data: &[u8], peer: SocketAddr, local: IpAddr) {
    let iov = [IoSlice::new(data)];
    let result = match (peer, local) {
        (SocketAddr::V4(peer), IpAddr::V4(local)) => {
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from(local).to_be(),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            let cmsgs: &[ControlMessage] = if local.is_unspecified() {
                &[]
            } else {
                &[ControlMessage::Ipv4PacketInfo(&info)]
            };
            sendmsg(
                socket.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_DONTWAIT,
                Some(&SockaddrIn::from(peer)),
            )
        }
        (SocketAddr::V6(peer), IpAddr::V6(local)) => {
            let info = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: local.octets(),
                },
                ipi6_ifindex: 0,
            };
            let cmsgs: &[ControlMessage] = if local.is_unspecified() {
                &[]
            } else {
                &[ControlMessage::Ipv6PacketInfo(&info)]
            };
            sendmsg(
                socket.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_DONTWAIT,
                Some(&SockaddrIn6::from(peer)),
            )
        }
        _ => return,
    };
    // A reply that cannot be sent (e.g. a full socket buffer) is a lost packet: the probe
    // retransmits or times out, as it would on a real network.
    let _ = result;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn responder(ports: &[u16]) -> ServerSockets {
        ServerSockets {
            sockets: Vec::new(),
            sctp_ports: ports.to_vec(),
            cookie_secret: [7; 16],
            identity: Vec::new(),
        }
    }

    fn init_packet(dst_port: u16, tag: u32) -> Vec<u8> {
        let value = sctp::init_value(
            InitFields {
                initiate_tag: tag,
                a_rwnd: 65535,
                outbound_streams: 1,
                inbound_streams: 1,
                initial_tsn: 1,
            },
            &[],
        );
        sctp::build(
            Header {
                src_port: 40000,
                dst_port,
                verification_tag: 0,
            },
            &[(sctp::CHUNK_INIT, 0, &value)],
        )
    }

    #[test]
    fn init_on_a_served_port_gets_init_ack_and_the_cookie_completes_the_handshake() {
        let server = responder(&[80]);
        let reply = server
            .sctp_reply(&init_packet(80, 0xAABB))
            .expect("INIT ACK");
        let reply = sctp::parse(&reply).expect("valid reply");
        assert_eq!(reply.header.verification_tag, 0xAABB);
        assert_eq!((reply.header.src_port, reply.header.dst_port), (80, 40000));
        assert_eq!(reply.chunks[0].kind, sctp::CHUNK_INIT_ACK);
        let (fields, cookie) =
            sctp::parse_init(reply.chunks[0].value, sctp::PARAM_STATE_COOKIE).expect("fields");
        let cookie = cookie.expect("state cookie");

        let echo = sctp::build(
            Header {
                src_port: 40000,
                dst_port: 80,
                verification_tag: fields.initiate_tag,
            },
            &[(sctp::CHUNK_COOKIE_ECHO, 0, cookie)],
        );
        let ack = server.sctp_reply(&echo).expect("COOKIE ACK");
        let ack = sctp::parse(&ack).expect("valid ack");
        assert_eq!(ack.header.verification_tag, 0xAABB);
        assert_eq!(ack.chunks[0].kind, sctp::CHUNK_COOKIE_ACK);

        // The same cookie under the wrong tag, or from another port, is ignored.
        let wrong_tag = sctp::build(
            Header {
                src_port: 40000,
                dst_port: 80,
                verification_tag: fields.initiate_tag ^ 1,
            },
            &[(sctp::CHUNK_COOKIE_ECHO, 0, cookie)],
        );
        assert!(server.sctp_reply(&wrong_tag).is_none());
        let wrong_port = sctp::build(
            Header {
                src_port: 40001,
                dst_port: 80,
                verification_tag: fields.initiate_tag,
            },
            &[(sctp::CHUNK_COOKIE_ECHO, 0, cookie)],
        );
        assert!(server.sctp_reply(&wrong_port).is_none());
    }

    #[test]
    fn init_on_an_unserved_port_gets_abort_with_the_initiate_tag() {
        let server = responder(&[80]);
        let reply = server.sctp_reply(&init_packet(81, 0x1234)).expect("ABORT");
        let reply = sctp::parse(&reply).expect("valid reply");
        assert_eq!(reply.header.verification_tag, 0x1234);
        assert_eq!(reply.chunks[0].kind, sctp::CHUNK_ABORT);
        assert_eq!(reply.chunks[0].flags & sctp::ABORT_FLAG_T, 0);
    }

    #[test]
    fn answers_meant_for_local_probes_are_left_alone() {
        let server = responder(&[80]);
        for kind in [
            sctp::CHUNK_INIT_ACK,
            sctp::CHUNK_COOKIE_ACK,
            sctp::CHUNK_ABORT,
        ] {
            let packet = sctp::build(
                Header {
                    src_port: 80,
                    dst_port: 40000,
                    verification_tag: 5,
                },
                &[(kind, 0, &[0; 20])],
            );
            assert!(
                server.sctp_reply(&packet).is_none(),
                "answered chunk {kind}"
            );
        }
    }
}
