//! Service translation at the socket, for the node's own processes (kubelet, host-network
//! pods). Their packets never pass `from_pod`, and a connection to one of the node's own
//! addresses goes over loopback where no TC program runs, so the cgroup hooks rewrite the
//! address a socket connects or sends to instead: the kernel then routes the connection to
//! the backend like any node-to-pod traffic (policy included), and no packet needs
//! translating.
//!
//! Each hook comes in both families (`connect4` and `connect6`, …); the IPv6 ones also see
//! IPv6 sockets reaching IPv4 addresses (IPv4-mapped), which the map keys hold alike.
//!
//! * `connect4` (TCP, connected UDP) and `sendmsg4` (each datagram of unconnected UDP): a
//!   frontend — a ClusterIP, or one of the node's addresses (`HOST_ADDRS`) on a nodePort —
//!   becomes a backend picked as `nat` picks one (the node is a client inside the cluster:
//!   `externalTrafficPolicy: Local` does not restrict it). No backend: the call fails with
//!   ECONNREFUSED, counted and reported as `service_no_backend`.
//! * `recvmsg4` and `getpeername4`: the backend is reported as the frontend the socket asked
//!   for (`SOCK_REVNAT`, keyed by socket cookie and backend), so e.g. a DNS client accepts
//!   the answer.
//!
//! The hooks sit on the cgroup v2 root, shared by every network namespace of the kernel:
//! they act only on sockets of the node's own namespace (`NODE_NETNS`), so pods (translated
//! by `from_pod`) and other namespaces are left alone.

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use weir_common::{
    conntrack::CtKey,
    event::{DropReason, FlowEvent},
    ip::IpKey,
    policy::proto,
    service::{NatEntry, ServiceKey, SockRevKey},
};

use crate::{
    events::emit_on,
    maps::{DROPS, HOST_ADDRS, NODE_NETNS, SERVICES, SOCK_REVNAT, count},
    nat::{for_cluster_client, pick_backend},
};

/// Return values of a cgroup sock_addr program.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// `connect4`/`6` and `sendmsg4`/`6`: translates a frontend to a backend. Refuses the call
/// when the frontend has no backend.
#[inline(always)]
pub fn forward(ctx: &SockAddrContext, v6: bool) -> i32 {
    match forward_inner(ctx, v6) {
        Ok(()) => ALLOW,
        Err(reason) => {
            count(&DROPS, reason as u32);
            // SAFETY: the context the kernel passed this program.
            let sa = unsafe { &*ctx.sock_addr };
            // The source is not chosen yet: the event names the frontend only.
            let flow = CtKey::new(
                IpKey::UNSPECIFIED,
                destination(sa, v6),
                0,
                sa.user_port as u16,
                l4_proto(sa).unwrap_or(0),
            );
            emit_on(0, Some(&flow), FlowEvent::VERDICT_DROP, reason as u32, 0, 0);
            // SAFETY: helper without preconditions; the kernel returns this errno instead of
            // EPERM for the rejected call.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            REJECT
        }
    }
}

/// `recvmsg4`/`6` and `getpeername4`/`6`: reports a backend as the frontend the socket
/// asked for. These hooks cannot refuse.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, v6: bool) -> i32 {
    if own_netns(ctx) {
        reverse_inner(ctx, v6);
    }
    ALLOW
}

/// The address the socket call names.
#[inline(always)]
fn destination(sa: &bpf_sock_addr, v6: bool) -> IpKey {
    if v6 {
        // One 32-bit load per word, each at its fixed offset in the context: the verifier
        // refuses a copy through a pointer into it.
        // SAFETY: fields of the context the kernel passed this program.
        let words = unsafe {
            [
                core::ptr::read_volatile(&sa.user_ip6[0]),
                core::ptr::read_volatile(&sa.user_ip6[1]),
                core::ptr::read_volatile(&sa.user_ip6[2]),
                core::ptr::read_volatile(&sa.user_ip6[3]),
            ]
        };
        IpKey::from_words(words)
    } else {
        IpKey::from_v4(sa.user_ip4.to_ne_bytes())
    }
}

/// Makes the socket call name `addr` (of the family the call's address is of).
#[inline(always)]
fn set_destination(sa: &mut bpf_sock_addr, v6: bool, addr: &IpKey, port_be: u16) {
    if v6 {
        // One 32-bit store per word, at fixed offsets (as the loads in `destination`).
        // SAFETY: fields of the context the kernel passed this program.
        unsafe {
            core::ptr::write_volatile(&mut sa.user_ip6[0], addr.word(0));
            core::ptr::write_volatile(&mut sa.user_ip6[1], addr.word(1));
            core::ptr::write_volatile(&mut sa.user_ip6[2], addr.word(2));
            core::ptr::write_volatile(&mut sa.user_ip6[3], addr.word(3));
        }
    } else {
        sa.user_ip4 = addr.v4_word();
    }
    sa.user_port = u32::from(port_be);
}

/// Whether the socket belongs to this node's network namespace.
#[inline(always)]
fn own_netns(ctx: &SockAddrContext) -> bool {
    let Some(&mine) = NODE_NETNS.get(0) else {
        return false;
    };
    // SAFETY: helper called with the program's own context.
    mine != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == mine
}

#[inline(always)]
fn l4_proto(sa: &bpf_sock_addr) -> Option<u8> {
    match sa.protocol {
        6 => Some(proto::TCP),
        17 => Some(proto::UDP),
        _ => None,
    }
}

#[inline(always)]
fn forward_inner(ctx: &SockAddrContext, v6: bool) -> Result<(), DropReason> {
    if !own_netns(ctx) {
        return Ok(());
    }
    // SAFETY: the context the kernel passed this program.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = l4_proto(sa) else {
        return Ok(());
    };
    // The port is in network byte order in the field's low 16 bits.
    let dport_be = sa.user_port as u16;
    let addr = destination(sa, v6);
    let mut key = ServiceKey::new(addr, dport_be, proto, 0);
    // SAFETY: value copied out of the map.
    let frontend = match unsafe { SERVICES.get(&key) } {
        Some(f) => f,
        None => {
            // A nodePort on one of the node's own addresses.
            // SAFETY: only checks presence.
            if unsafe { HOST_ADDRS.get(&addr) }.is_none() {
                return Ok(());
            }
            key = ServiceKey::new(IpKey::any_like(&addr), dport_be, proto, 0);
            // SAFETY: value copied out of the map.
            match unsafe { SERVICES.get(&key) } {
                // The node is a client inside the cluster.
                Some(f) => for_cluster_client(&mut key, f),
                None => return Ok(()),
            }
        }
    };
    // The client is the node: under session affinity, all of its sockets share a backend.
    let backend = pick_backend(&key, frontend, &IpKey::UNSPECIFIED)?;
    let backend_addr = *backend.backend_addr();
    let backend_port_be = backend.backend_port_be();
    // SAFETY: helper called with the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rev_key = SockRevKey::new(cookie, backend_addr, backend_port_be);
    let rev = NatEntry::reply(addr, dport_be, frontend.id());
    // Each datagram of an unconnected socket comes here: write only what changed.
    // SAFETY: value copied out of the map.
    if unsafe { SOCK_REVNAT.get(&rev_key) }.copied() != Some(rev) {
        // Without the entry, replies and the peer name show the backend; the connection
        // itself still works.
        let _ = SOCK_REVNAT.insert(&rev_key, &rev, 0);
    }
    set_destination(sa, v6, &backend_addr, backend_port_be);
    Ok(())
}

#[inline(always)]
fn reverse_inner(ctx: &SockAddrContext, v6: bool) {
    // SAFETY: the context the kernel passed this program.
    let sa = unsafe { &mut *ctx.sock_addr };
    if l4_proto(sa).is_none() {
        return;
    }
    let addr = destination(sa, v6);
    // SAFETY: helper called with the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey::new(cookie, addr, sa.user_port as u16);
    // SAFETY: value copied out of the map.
    let Some(frontend) = (unsafe { SOCK_REVNAT.get(&key) }).copied() else {
        return;
    };
    set_destination(sa, v6, frontend.addr(), frontend.port_be());
}
