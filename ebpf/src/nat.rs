//! Service load balancing: a flow's first packet to a frontend picks a backend in O(1), the
//! translation is remembered in `SERVICE_NAT`, and every later packet is rewritten the same
//! way — the original direction to the backend (`translate`), the replies back to the
//! frontend (`reverse`). Both happen on weir's own redirect paths, so the host's netfilter
//! never sees these packets and cannot un-translate them.
//!
//! Both families: a frontend and its backends are of one family (the controller keeps them
//! apart), so a flow is rewritten within its family. The rewrite fixes the IPv4 header
//! checksum (IPv6 has none), the TCP/UDP checksums (pseudo header and port) and SCTP's
//! CRC32c, which covers the ports but not the addresses: a port change updates it in place
//! in O(log n) (`weir_common::sctp`), for the packet's length as its IPv4 header (IPv6:
//! payload length less the extension headers) gives it. Left as they are: an SCTP checksum
//! field of zero (a sender offloading the CRC, `CHECKSUM_PARTIAL`, leaves it zero for the
//! device or segmentation to fill in over the final packet; a real CRC of zero, one packet
//! in 2^32, then arrives wrong and is retransmitted) and the first fragment of a fragmented
//! IPv4 SCTP packet, whose full length is not known (Linux's SCTP sets DF and avoids
//! fragmenting; over IPv6 it never fragments but to the path MTU, and a first fragment's
//! CRC would be rewritten for the wrong length).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::TcContext,
};
use weir_common::{
    conntrack::CtKey,
    event::DropReason,
    ip::IpKey,
    policy::proto,
    sctp,
    service::{AffinityKey, AffinityValue, NatEntry, ServiceKey, ServiceValue},
};

use crate::{
    events::record_drop,
    maps::{AFFINITY, ENDPOINTS, HOST_ADDRS, SCRATCH_KEYS, SERVICE_NAT, SERVICES, TUNNEL_PEERS},
    parse::{ETH_HLEN, Packet},
    route,
};

/// Ports this node's address takes as the source of NodePort flows it forwards to a backend
/// on another node: above Linux's default ephemeral range (32768–60999), so they never
/// collide with the node's own connections.
const SNAT_PORT_FIRST: u16 = 61_000;
const SNAT_PORTS: u32 = 65_536 - SNAT_PORT_FIRST as u32;
/// Random ports tried for a new source-translated flow before it is refused.
const SNAT_TRIES: u32 = 4;
/// `BPF_NOEXIST`: insert only if the key is free (claims a source port atomically).
const BPF_NOEXIST: u64 = 1;

/// What [`inbound`] did with a packet from the network.
pub enum Inbound {
    /// Not a Service packet.
    Pass,
    /// Translated to its backend, which is on this node (or, for a flow a pod of this node
    /// opened, wherever its backend is).
    ToBackend,
    /// Translated to a backend on another node, source rewritten to this node's address.
    ToRemoteBackend,
    /// A reply of a flow translated as `ToRemoteBackend`: rewritten back (from the
    /// frontend, to the client). It leaves by the node's routing table.
    ReplyToClient,
    /// Translated to a backend that is one of this node's own addresses: for the node's
    /// stack.
    ToHost,
}

const IPV4_MF: u16 = 0x2000;
const IPV4_CHECK: usize = ETH_HLEN + 10;
const IPV4_SADDR: usize = ETH_HLEN + 12;
const IPV4_DADDR: usize = ETH_HLEN + 16;
const IPV6_HLEN: usize = 40;
const IPV6_SADDR: usize = ETH_HLEN + 8;
const IPV6_DADDR: usize = ETH_HLEN + 24;
const TCP_CHECK: usize = 16;
const UDP_CHECK: usize = 6;
const SCTP_CHECK: usize = 8;
/// Common header: ports, verification tag, checksum.
const SCTP_HLEN: u16 = 12;

/// What [`translate`] did with a pod's packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Translated {
    /// Not addressed to a frontend.
    No,
    /// Rewritten to the flow's backend.
    Yes,
    /// Rewritten to the flow's backend, which is the client itself (hairpin): the source is
    /// now the frontend's address with a port of the flow's own, so the pod accepts the
    /// packet and its reply comes back to be translated (see [`hairpin_reply`]).
    Hairpin,
}

/// If `pkt` is addressed to a Service frontend, rewrites it to the flow's backend (picking
/// one on the flow's first packet) and updates `pkt`. Err when the flow is refused, with
/// the reason (counted and reported here; the keys live in per-CPU scratch space, not on
/// the stack).
#[inline(always)]
pub fn translate(ctx: &TcContext, pkt: &mut Packet) -> Result<Translated, DropReason> {
    // The drop event names the Service port (in its rule field).
    let mut service = 0;
    translate_inner(ctx, pkt, &mut service).inspect_err(|reason| {
        record_drop(ctx, scratch_key(0), *reason, 0, service);
    })
}

/// A scratch key as last written by this program run (None if the slot is missing).
#[inline(always)]
fn scratch_key(i: u32) -> Option<&'static CtKey> {
    // SAFETY: per-CPU scratch value, used by this program run alone.
    SCRATCH_KEYS.get_ptr(i).map(|k| unsafe { &*k })
}

#[inline(always)]
fn translate_inner(
    ctx: &TcContext,
    pkt: &mut Packet,
    service: &mut u32,
) -> Result<Translated, DropReason> {
    // A later fragment carries no ports to rewrite.
    if pkt.l4 == 0 {
        return Ok(Translated::No);
    }
    let mut frontend_key = ServiceKey::new(pkt.daddr, pkt.dport_be, pkt.proto, 0);
    // SAFETY: value copied out of the map.
    let frontend = match unsafe { SERVICES.get(&frontend_key) } {
        Some(f) => f,
        // A NodePort on one of this node's own addresses.
        // SAFETY: existence check, then a value copied out of the map.
        None if unsafe { HOST_ADDRS.get(&pkt.daddr).is_some() } => {
            frontend_key = ServiceKey::new(IpKey::any_like(&pkt.daddr), pkt.dport_be, pkt.proto, 0);
            match unsafe { SERVICES.get(&frontend_key) } {
                // A pod is a client inside the cluster.
                Some(f) => for_cluster_client(&mut frontend_key, f),
                None => return Ok(Translated::No),
            }
        }
        None => return Ok(Translated::No),
    };
    *service = frontend.id();
    let Some(original) = SCRATCH_KEYS.get_ptr_mut(0) else {
        return Err(DropReason::ServiceNatLost);
    };
    // SAFETY: per-CPU scratch value, used by this program run alone.
    let original = unsafe { &mut *original };
    *original = pkt.ct_key();
    // SAFETY: value copied out of the map.
    if let Some(nat) = unsafe { SERVICE_NAT.get(&*original) } {
        set_destination(ctx, pkt, nat.addr(), nat.port_be())?;
        if nat.is_snat() {
            set_source(ctx, pkt, nat.other(), nat.other_port_be())?;
            return Ok(Translated::Hairpin);
        }
        return Ok(Translated::Yes);
    }
    let b = pick_backend(&frontend_key, frontend, &pkt.saddr)?;
    let (backend, port_be) = (b.backend_addr(), b.backend_port_be());
    if *backend != pkt.saddr {
        remember(original, pkt, backend, port_be, frontend.id(), 0)?;
        set_destination(ctx, pkt, backend, port_be)?;
        return Ok(Translated::Yes);
    }
    // The client is its own backend. A packet from its own address would be a martian to
    // it, so the flow comes from the frontend's address and a port of its own.
    let frontend_addr = pkt.daddr;
    let snat_port_be = claim_snat_port(pkt, backend, port_be, frontend.id())?;
    SERVICE_NAT
        .insert(
            &*original,
            &NatEntry::new(
                *backend,
                port_be,
                frontend.id(),
                frontend_addr,
                snat_port_be,
                NatEntry::FLAG_SNAT,
            ),
            0,
        )
        .map_err(|_| DropReason::ServiceNatLost)?;
    set_destination(ctx, pkt, backend, port_be)?;
    set_source(ctx, pkt, &frontend_addr, snat_port_be)?;
    Ok(Translated::Hairpin)
}

/// A pod's packet that is the reply of a hairpin flow (to the frontend's address and the
/// flow's port): rewritten to come from the frontend and go to the pod's own client socket.
/// Ok(true) when it was one.
#[inline(always)]
pub fn hairpin_reply(ctx: &TcContext, pkt: &mut Packet) -> Result<bool, ()> {
    hairpin_reply_inner(ctx, pkt).map_err(|reason| {
        record_drop(ctx, scratch_key(0), reason, 0, 0);
    })
}

#[inline(always)]
fn hairpin_reply_inner(ctx: &TcContext, pkt: &mut Packet) -> Result<bool, DropReason> {
    if pkt.l4 == 0 {
        return Ok(false);
    }
    let Some(key) = SCRATCH_KEYS.get_ptr_mut(0) else {
        return Ok(false);
    };
    // SAFETY: per-CPU scratch value, used by this program run alone.
    let key = unsafe { &mut *key };
    *key = pkt.ct_key();
    // SAFETY: value copied out of the map.
    let Some(nat) = (unsafe { SERVICE_NAT.get(&*key) }) else {
        return Ok(false);
    };
    if !(nat.is_reply() && nat.is_snat() && *nat.other() == pkt.saddr) {
        return Ok(false);
    }
    set_source(ctx, pkt, nat.addr(), nat.port_be())?;
    set_destination(ctx, pkt, nat.other(), nat.other_port_be())?;
    Ok(true)
}

/// A packet from the network to one of this node's addresses (`from_network`): the first
/// and later packets of a NodePort flow, and the replies of those this node forwarded to a
/// backend on another node. Updates `pkt` to what was written. Err: counted and reported,
/// drop.
#[inline(always)]
pub fn inbound(
    ctx: &TcContext,
    pkt: &mut Packet,
    host_addr_frontends: bool,
) -> Result<Inbound, ()> {
    let mut service = 0;
    inbound_inner(ctx, pkt, host_addr_frontends, &mut service).map_err(|reason| {
        record_drop(ctx, scratch_key(0), reason, 0, service);
    })
}

#[inline(always)]
fn inbound_inner(
    ctx: &TcContext,
    pkt: &mut Packet,
    host_addr_frontends: bool,
    service: &mut u32,
) -> Result<Inbound, DropReason> {
    if pkt.l4 == 0 {
        return Ok(Inbound::Pass);
    }
    let Some(key) = SCRATCH_KEYS.get_ptr_mut(0) else {
        return Ok(Inbound::Pass);
    };
    // SAFETY: per-CPU scratch value, used by this program run alone.
    let key = unsafe { &mut *key };
    *key = pkt.ct_key();
    // One lookup finds both directions: a NodePort flow's packets and the replies to the
    // source port this node gave a forwarded flow are both addressed to the node.
    // SAFETY: value copied out of the map.
    if let Some(nat) = unsafe { SERVICE_NAT.get(&*key) } {
        *service = nat.service();
        if nat.is_reply() {
            if !nat.is_snat() {
                return Ok(Inbound::Pass);
            }
            // From the frontend, to the client.
            set_source(ctx, pkt, nat.addr(), nat.port_be())?;
            set_destination(ctx, pkt, nat.other(), nat.other_port_be())?;
            return Ok(Inbound::ReplyToClient);
        }
        set_destination(ctx, pkt, nat.addr(), nat.port_be())?;
        if nat.is_snat() {
            set_source(ctx, pkt, nat.other(), nat.other_port_be())?;
            return Ok(Inbound::ToRemoteBackend);
        }
        // A backend on the node's own stack has no endpoint: `from_network` hands the packet
        // up the stack.
        return Ok(Inbound::ToBackend);
    }
    // A frontend on the destination address itself (a host port with a `hostIP`), looked up
    // only while the agent says there may be one; then the frontends on every address of
    // the node (NodePorts, host ports without `hostIP`). The agent never writes both for one
    // port and protocol, so the order decides nothing but the cost.
    let mut frontend_key = ServiceKey::new(pkt.daddr, pkt.dport_be, pkt.proto, 0);
    let exact = if host_addr_frontends {
        // SAFETY: value copied out of the map.
        unsafe { SERVICES.get(&frontend_key) }
    } else {
        None
    };
    let mut frontend = match exact {
        Some(f) => f,
        None => {
            frontend_key = ServiceKey::new(IpKey::any_like(&pkt.daddr), pkt.dport_be, pkt.proto, 0);
            // SAFETY: value copied out of the map.
            match unsafe { SERVICES.get(&frontend_key) } {
                Some(f) => f,
                None => return Ok(Inbound::Pass),
            }
        }
    };
    if frontend.cluster_frontend().is_some() && from_cluster(&pkt.saddr) {
        frontend = for_cluster_client(&mut frontend_key, frontend);
    }
    *service = frontend.id();
    let b = pick_backend(&frontend_key, frontend, &pkt.saddr)?;
    let (backend, port_be) = (b.backend_addr(), b.backend_port_be());
    // SAFETY: existence check only.
    if unsafe { ENDPOINTS.get(backend).is_some() } {
        remember(key, pkt, backend, port_be, frontend.id(), 0)?;
        set_destination(ctx, pkt, backend, port_be)?;
        return Ok(Inbound::ToBackend);
    }
    // A backend outside the pod network on this node (a host-network pod): the flow goes up
    // the node's own stack with the client's address kept, and the stack's replies are
    // rewritten as they leave the node (`host_reply`).
    // SAFETY: existence check only.
    if unsafe { HOST_ADDRS.get(backend).is_some() } {
        remember(
            key,
            pkt,
            backend,
            port_be,
            frontend.id(),
            NatEntry::FLAG_HOST,
        )?;
        set_destination(ctx, pkt, backend, port_be)?;
        return Ok(Inbound::ToHost);
    }
    // The backend is on another node: its replies must come back here to be translated
    // back, so the flow leaves with this node's address and a port of its own.
    let node = pkt.daddr;
    let snat_port_be = claim_snat_port(pkt, backend, port_be, frontend.id())?;
    SERVICE_NAT
        .insert(
            &*key,
            &NatEntry::new(
                *backend,
                port_be,
                frontend.id(),
                node,
                snat_port_be,
                NatEntry::FLAG_SNAT,
            ),
            0,
        )
        .map_err(|_| DropReason::ServiceNatLost)?;
    set_destination(ctx, pkt, backend, port_be)?;
    set_source(ctx, pkt, &node, snat_port_be)?;
    Ok(Inbound::ToRemoteBackend)
}

/// Picks a free source port for a flow this node forwards to `backend` and records the
/// flow's reply direction under it (backend → node:port ⇒ frontend → client).
#[inline(always)]
fn claim_snat_port(
    pkt: &Packet,
    backend: &IpKey,
    backend_port_be: u16,
    service: u32,
) -> Result<u16, DropReason> {
    let Some(reply) = SCRATCH_KEYS.get_ptr_mut(1) else {
        return Err(DropReason::ServiceNatLost);
    };
    // SAFETY: per-CPU scratch value, used by this program run alone.
    let reply = unsafe { &mut *reply };
    let back = NatEntry::new(
        pkt.daddr,
        pkt.dport_be,
        service,
        pkt.saddr,
        pkt.sport_be,
        NatEntry::FLAG_REPLY | NatEntry::FLAG_SNAT,
    );
    for _ in 0..SNAT_TRIES {
        // SAFETY: helper without preconditions.
        let port = SNAT_PORT_FIRST + (unsafe { bpf_get_prandom_u32() } % SNAT_PORTS) as u16;
        let port_be = port.to_be();
        *reply = CtKey::new(*backend, pkt.daddr, backend_port_be, port_be, pkt.proto);
        if SERVICE_NAT.insert(&*reply, &back, BPF_NOEXIST).is_ok() {
            return Ok(port_be);
        }
    }
    Err(DropReason::ServiceNatLost)
}

#[inline(always)]
fn set_destination(
    ctx: &TcContext,
    pkt: &mut Packet,
    addr: &IpKey,
    port_be: u16,
) -> Result<(), DropReason> {
    let offset = if pkt.daddr.is_v4() {
        IPV4_DADDR
    } else {
        IPV6_DADDR
    };
    let at = Rewrite {
        addr_offset: offset,
        port_offset: 2,
        old_port_be: pkt.dport_be,
        new_port_be: port_be,
    };
    rewrite(ctx, pkt, &pkt.daddr, addr, at).map_err(|()| DropReason::ServiceNatLost)?;
    pkt.daddr = *addr;
    pkt.dport_be = port_be;
    Ok(())
}

#[inline(always)]
fn set_source(
    ctx: &TcContext,
    pkt: &mut Packet,
    addr: &IpKey,
    port_be: u16,
) -> Result<(), DropReason> {
    let offset = if pkt.saddr.is_v4() {
        IPV4_SADDR
    } else {
        IPV6_SADDR
    };
    let at = Rewrite {
        addr_offset: offset,
        port_offset: 0,
        old_port_be: pkt.sport_be,
        new_port_be: port_be,
    };
    rewrite(ctx, pkt, &pkt.saddr, addr, at).map_err(|()| DropReason::ServiceNatLost)?;
    pkt.saddr = *addr;
    pkt.sport_be = port_be;
    Ok(())
}

/// Rewrites a reply of a translated flow (backend → client) to come from the frontend.
/// Err: counted and reported, drop.
#[inline(always)]
pub fn reverse(ctx: &TcContext, pkt: &mut Packet) -> Result<(), ()> {
    reverse_inner(ctx, pkt).map_err(|reason| {
        record_drop(ctx, scratch_key(0), reason, 0, 0);
    })
}

#[inline(always)]
fn reverse_inner(ctx: &TcContext, pkt: &mut Packet) -> Result<(), DropReason> {
    if pkt.l4 == 0 {
        return Err(DropReason::ServiceNatLost);
    }
    let Some(reply) = SCRATCH_KEYS.get_ptr_mut(0) else {
        return Err(DropReason::ServiceNatLost);
    };
    // SAFETY: per-CPU scratch value, used by this program run alone.
    let reply = unsafe { &mut *reply };
    *reply = pkt.ct_key();
    // SAFETY: value copied out of the map.
    let Some(nat) = (unsafe { SERVICE_NAT.get(&*reply) }) else {
        return Err(DropReason::ServiceNatLost);
    };
    set_source(ctx, pkt, nat.addr(), nat.port_be())
}

/// `externalTrafficPolicy: Local`: a NodePort frontend's own slots hold this node's
/// backends, for clients outside the cluster; a client inside it (a pod, a node) uses the
/// frontend the NodePort names instead — its Service port's ClusterIP, as kube-proxy
/// sends such clients to any backend of the cluster. Returns the frontend to pick from and
/// points `key` at it; the NodePort itself if it names none or the named one is missing
/// (written later, or removed first, by the agent).
#[inline(always)]
pub fn for_cluster_client(
    key: &mut ServiceKey,
    frontend: &'static ServiceValue,
) -> &'static ServiceValue {
    let Some((addr, port_be)) = frontend.cluster_frontend() else {
        return frontend;
    };
    let cluster_key = ServiceKey::new(*addr, port_be, key.proto(), 0);
    // SAFETY: value copied out of the map.
    match unsafe { SERVICES.get(&cluster_key) } {
        Some(f) => {
            *key = cluster_key;
            f
        }
        None => frontend,
    }
}

/// Whether a packet from the network comes from inside the cluster: another node's address
/// (`TUNNEL_PEERS` holds every other node's) or a pod of another node (`ROUTES`).
#[inline(always)]
fn from_cluster(saddr: &IpKey) -> bool {
    // SAFETY: existence check only.
    let node = unsafe { TUNNEL_PEERS.get(saddr).is_some() };
    node || route::lookup(saddr).is_some()
}

/// A packet the node's own stack sends out of the node (egress of the uplink or of the
/// tunnel device) that is the reply of a flow `inbound` handed to the stack (a NodePort
/// whose backend is on this node's own address): rewritten to come from the frontend.
/// Everything else is left alone, for one `HOST_ADDRS` lookup (and one `SERVICE_NAT` lookup
/// for the node's own packets). Err: counted and reported, drop.
#[inline(always)]
pub fn host_reply(ctx: &TcContext, pkt: &mut Packet) -> Result<(), ()> {
    host_reply_inner(ctx, pkt).map_err(|reason| {
        record_drop(ctx, scratch_key(0), reason, 0, 0);
    })
}

#[inline(always)]
fn host_reply_inner(ctx: &TcContext, pkt: &mut Packet) -> Result<(), DropReason> {
    if pkt.l4 == 0 {
        return Ok(());
    }
    // SAFETY: existence check only.
    if unsafe { HOST_ADDRS.get(&pkt.saddr).is_none() } {
        return Ok(());
    }
    let Some(key) = SCRATCH_KEYS.get_ptr_mut(0) else {
        return Ok(());
    };
    // SAFETY: per-CPU scratch value, used by this program run alone.
    let key = unsafe { &mut *key };
    *key = pkt.ct_key();
    // SAFETY: value copied out of the map.
    let Some(nat) = (unsafe { SERVICE_NAT.get(&*key) }) else {
        return Ok(());
    };
    if !(nat.is_reply() && nat.is_host()) {
        return Ok(());
    }
    set_source(ctx, pkt, nat.addr(), nat.port_be())
}

/// Slot 1..=count, by the client's address under session affinity (its flows keep one
/// backend while the backend set is unchanged), at random otherwise. Shared with the socket
/// hooks (`sock`).
#[inline(always)]
pub fn pick_backend(
    frontend_key: &ServiceKey,
    frontend: &ServiceValue,
    client: &IpKey,
) -> Result<&'static ServiceValue, DropReason> {
    let count = frontend.count();
    if count == 0 {
        return Err(DropReason::NoBackend);
    }
    if frontend.flags() & ServiceValue::FLAG_AFFINITY != 0 {
        return pick_with_affinity(frontend_key, frontend, client, count);
    }
    // SAFETY: helper without preconditions.
    let slot = 1 + unsafe { bpf_get_prandom_u32() } % count;
    // SAFETY: value copied out of the map.
    match unsafe { SERVICES.get(&frontend_key.with_slot(slot)) } {
        Some(b) => Ok(b),
        None => Err(DropReason::NoBackend),
    }
}

/// `sessionAffinity: ClientIP`: a client's new flows go to the backend its last one went
/// to, if that was less than the timeout ago and the backend is still in its slot; else to
/// a random one, which it then sticks to.
#[inline(always)]
fn pick_with_affinity(
    frontend_key: &ServiceKey,
    frontend: &ServiceValue,
    client: &IpKey,
    count: u32,
) -> Result<&'static ServiceValue, DropReason> {
    let key = AffinityKey::new(frontend.id(), *client);
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout_ns = u64::from(frontend.affinity_s()) * 1_000_000_000;
    // SAFETY: value copied out of the map.
    if let Some(last) = unsafe { AFFINITY.get(&key) }.copied() {
        if now.wrapping_sub(last.last_ns()) < timeout_ns && last.slot() <= count {
            // SAFETY: value copied out of the map.
            if let Some(b) = unsafe { SERVICES.get(&frontend_key.with_slot(last.slot())) } {
                if b.backend_addr() == last.backend()
                    && b.backend_port_be() == last.backend_port_be()
                {
                    let _ = AFFINITY.insert(
                        &key,
                        &AffinityValue::new(
                            *last.backend(),
                            last.backend_port_be(),
                            last.slot(),
                            now,
                        ),
                        0,
                    );
                    return Ok(b);
                }
            }
        }
    }
    // SAFETY: helper without preconditions.
    let slot = 1 + unsafe { bpf_get_prandom_u32() } % count;
    // SAFETY: value copied out of the map.
    let Some(b) = (unsafe { SERVICES.get(&frontend_key.with_slot(slot)) }) else {
        return Err(DropReason::NoBackend);
    };
    let _ = AFFINITY.insert(
        &key,
        &AffinityValue::new(*b.backend_addr(), b.backend_port_be(), slot, now),
        0,
    );
    Ok(b)
}

/// Records both directions of a new translation: the original key → the backend, the
/// reply key (backend → client) → the frontend.
#[inline(always)]
fn remember(
    original: &CtKey,
    pkt: &Packet,
    backend: &IpKey,
    backend_port_be: u16,
    service: u32,
    reply_flags: u32,
) -> Result<(), DropReason> {
    SERVICE_NAT
        .insert(
            original,
            &NatEntry::original(*backend, backend_port_be, service),
            0,
        )
        .map_err(|_| DropReason::ServiceNatLost)?;
    let Some(reply) = SCRATCH_KEYS.get_ptr_mut(1) else {
        return Err(DropReason::ServiceNatLost);
    };
    // SAFETY: per-CPU scratch value, used by this program run alone.
    let reply = unsafe { &mut *reply };
    *reply = CtKey::new(
        *backend,
        pkt.saddr,
        backend_port_be,
        pkt.sport_be,
        pkt.proto,
    );
    let back = NatEntry::new(
        pkt.daddr,
        pkt.dport_be,
        service,
        IpKey::UNSPECIFIED,
        0,
        NatEntry::FLAG_REPLY | reply_flags,
    );
    SERVICE_NAT
        .insert(reply, &back, 0)
        .map_err(|_| DropReason::ServiceNatLost)
}

/// Where [`rewrite`] writes the address, and the port it changes.
#[derive(Clone, Copy)]
struct Rewrite {
    /// Offset of the address in the frame.
    addr_offset: usize,
    /// Offset of the port in the L4 header (0: source, 2: destination).
    port_offset: usize,
    old_port_be: u16,
    new_port_be: u16,
}

/// Replaces an address and an L4 port as `at` says, fixing the IPv4 header checksum and the
/// TCP/UDP checksum or the SCTP CRC32c. The new address is of the old one's family.
#[inline(always)]
fn rewrite(ctx: &TcContext, pkt: &Packet, old: &IpKey, new: &IpKey, at: Rewrite) -> Result<(), ()> {
    let Rewrite {
        addr_offset,
        port_offset,
        old_port_be,
        new_port_be,
    } = at;
    let l4 = usize::from(pkt.l4);
    let l4_check = match pkt.proto {
        proto::TCP => Some((l4 + TCP_CHECK, 0)),
        proto::UDP => Some((l4 + UDP_CHECK, u64::from(BPF_F_MARK_MANGLED_0))),
        _ => None,
    };
    let v4 = old.is_v4();
    // The words of the address that may differ: the last for IPv4 (the others are the
    // IPv4-mapped prefix), all four for IPv6. (Constant indices, read in place: the
    // verifier refuses the stack arithmetic a loop over them compiles to, and the programs'
    // stack has no room for copies.)
    if let Some((check, extra)) = l4_check {
        let flags = u64::from(BPF_F_PSEUDO_HDR) | extra | 4;
        if !v4 {
            csum_word(ctx, check, old.word(0), new.word(0), flags)?;
            csum_word(ctx, check, old.word(1), new.word(1), flags)?;
            csum_word(ctx, check, old.word(2), new.word(2), flags)?;
        }
        csum_word(ctx, check, old.word(3), new.word(3), flags)?;
        if old_port_be != new_port_be {
            ctx.l4_csum_replace(
                check,
                u64::from(old_port_be),
                u64::from(new_port_be),
                extra | 2,
            )
            .map_err(|_| ())?;
        }
    }
    if v4 {
        let word = new.v4_word();
        ctx.l3_csum_replace(IPV4_CHECK, u64::from(old.v4_word()), u64::from(word), 4)
            .map_err(|_| ())?;
        ctx.store(addr_offset, &word, 0).map_err(|_| ())?;
    } else {
        ctx.store(addr_offset, new, 0).map_err(|_| ())?;
    }
    if old_port_be != new_port_be {
        // TCP and UDP: the checksum moved with the port, so a CHECKSUM_COMPLETE sum over
        // the packet is unchanged. SCTP: it is not (the CRC is no ones' complement sum).
        let (store_flags, sctp) = match pkt.proto {
            proto::SCTP => (u64::from(BPF_F_RECOMPUTE_CSUM), true),
            _ => (0, false),
        };
        ctx.store(l4 + port_offset, &new_port_be, store_flags)
            .map_err(|_| ())?;
        if sctp {
            // The ports' change, as the 4 bytes they are in the packet.
            let x = (old_port_be ^ new_port_be).to_ne_bytes();
            let ports_xor = if port_offset == 0 {
                [x[0], x[1], 0, 0]
            } else {
                [0, 0, x[0], x[1]]
            };
            sctp_ports_changed(ctx, l4, v4, ports_xor)?;
        }
    }
    Ok(())
}

/// Updates the L4 checksum at `check` for one 32-bit word of the pseudo header that
/// changed from `old` to `new`.
#[inline(always)]
fn csum_word(ctx: &TcContext, check: usize, old: u32, new: u32, flags: u64) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(check, u64::from(old), u64::from(new), flags)
        .map_err(|_| ())
}

/// Updates the CRC32c of the SCTP packet at `l4` (an offset into the frame) whose ports
/// changed by `ports_xor` (old ^ new, the 4 bytes as in the packet). Err when the packet
/// could not be written.
#[inline(always)]
fn sctp_ports_changed(ctx: &TcContext, l4: usize, v4: bool, ports_xor: [u8; 4]) -> Result<(), ()> {
    let (Ok(ip), Ok(field)) = (
        ctx.load::<Ipv4Fields>(ETH_HLEN),
        ctx.load::<[u8; 4]>(l4 + SCTP_CHECK),
    ) else {
        return Err(());
    };
    // Zero: the CRC is still to be computed over the final packet (see the module comment).
    if field == [0; 4] {
        return Ok(());
    }
    // The IP packet's length counted from the IP header, and the bytes before the SCTP
    // packet in it (the frame may carry padding).
    let (tot_len, before) = if v4 {
        // A first fragment: the SCTP packet's length is not known here.
        if u16::from_be(ip.frag_off_be) & IPV4_MF != 0 {
            return Ok(());
        }
        (
            u16::from_be(ip.tot_len_be),
            l4.wrapping_sub(ETH_HLEN) as u16,
        )
    } else {
        // The IPv6 payload length (bytes 4–5, where IPv4 has its identification) excludes
        // the fixed header.
        (
            u16::from_be(ip.id_be).wrapping_add(IPV6_HLEN as u16),
            l4.wrapping_sub(ETH_HLEN) as u16,
        )
    };
    let len = tot_len.wrapping_sub(before);
    if len < SCTP_HLEN || len > tot_len {
        return Ok(());
    }
    let delta =
        weir_sctp_checksum_delta(u32::from_ne_bytes(ports_xor), u32::from(len)).to_le_bytes();
    let new = [
        field[0] ^ delta[0],
        field[1] ^ delta[1],
        field[2] ^ delta[2],
        field[3] ^ delta[3],
    ];
    ctx.store(l4 + SCTP_CHECK, &new, u64::from(BPF_F_RECOMPUTE_CSUM))
        .map_err(|_| ())
}

/// The start of the IPv4 header, up to the fields [`sctp_ports_changed`] reads (of an
/// IPv6 header: `id_be` is the payload length).
#[repr(C)]
struct Ipv4Fields {
    ver_ihl: u8,
    tos: u8,
    tot_len_be: u16,
    id_be: u16,
    frag_off_be: u16,
}

/// [`sctp::checksum_delta`] for `ports_xor` (the 4 bytes in native order) and an SCTP packet
/// of `len` bytes.
///
/// A global function (BPF-to-BPF call with BTF linkage global): the verifier checks its few
/// hundred loop iterations once, on their own, instead of on every path through the programs
/// that reaches a port rewrite (which exceeds its budget of a million instructions). Scalars
/// in, a scalar out, no stack.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn weir_sctp_checksum_delta(ports_xor: u32, len: u32) -> u32 {
    sctp::checksum_delta(ports_xor.to_ne_bytes(), len as u16)
}
