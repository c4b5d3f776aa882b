//! Service load balancing: a flow's first packet to a frontend picks a backend in O(1), the
//! translation is remembered in `SERVICE_NAT`, and every later packet is rewritten the same
//! way — the original direction to the backend (`translate`), the replies back to the
//! frontend (`reverse`). Both happen on weir's own redirect paths, so the host's netfilter
//! never sees these packets and cannot un-translate them.
//!
//! IPv4 only for now: the rewrite fixes the IPv4 header checksum and the TCP/UDP checksums
//! (pseudo header and port). SCTP's CRC32c covers the ports but not the addresses; a port
//! change is left to the checksum offload of the virtual devices pods sit behind.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_get_prandom_u32,
    programs::TcContext,
};
use weir_common::{
    conntrack::CtKey,
    event::DropReason,
    ip::IpKey,
    policy::proto,
    service::{NatEntry, ServiceKey, ServiceValue},
};

use crate::{
    events::record_drop,
    maps::{SCRATCH_KEYS, SERVICE_NAT, SERVICES},
    parse::{ETH_HLEN, Packet},
};

const IPV4_CHECK: usize = ETH_HLEN + 10;
const IPV4_SADDR: usize = ETH_HLEN + 12;
const IPV4_DADDR: usize = ETH_HLEN + 16;
const TCP_CHECK: usize = 16;
const UDP_CHECK: usize = 6;

/// If `pkt` is addressed to a Service frontend, rewrites it to the flow's backend (picking
/// one on the flow's first packet) and updates `pkt`. Ok(true) when translated, Ok(false)
/// when the destination is not a frontend, Err when the flow is refused (counted and
/// reported here; the keys live in per-CPU scratch space, not on the stack).
#[inline(always)]
pub fn translate(ctx: &TcContext, pkt: &mut Packet) -> Result<bool, ()> {
    match translate_inner(ctx, pkt) {
        Ok(translated) => Ok(translated),
        Err(reason) => {
            record_drop(ctx, scratch_key(0), reason, 0, 0);
            Err(())
        }
    }
}

/// A scratch key as last written by this program run (None if the slot is missing).
#[inline(always)]
fn scratch_key(i: u32) -> Option<&'static CtKey> {
    // SAFETY: per-CPU scratch value, used by this program run alone.
    SCRATCH_KEYS.get_ptr(i).map(|k| unsafe { &*k })
}

#[inline(always)]
fn translate_inner(ctx: &TcContext, pkt: &mut Packet) -> Result<bool, DropReason> {
    // A later fragment carries no ports to rewrite; IPv6 Services come with dual stack.
    if pkt.l4 == 0 || !pkt.daddr.is_v4() {
        return Ok(false);
    }
    let frontend_key = ServiceKey::new(pkt.daddr, pkt.dport_be, pkt.proto, 0);
    // SAFETY: value copied out of the map.
    let Some(frontend) = (unsafe { SERVICES.get(&frontend_key) }).copied() else {
        return Ok(false);
    };
    let Some(original) = SCRATCH_KEYS.get_ptr_mut(0) else {
        return Err(DropReason::ServiceNatLost);
    };
    // SAFETY: per-CPU scratch value, used by this program run alone.
    let original = unsafe { &mut *original };
    *original = pkt.ct_key();
    // SAFETY: value copied out of the map.
    let (backend, backend_port_be) = match unsafe { SERVICE_NAT.get(&*original) } {
        Some(nat) => (*nat.addr(), nat.port_be()),
        None => {
            let b = pick_backend(&frontend_key, &frontend, &pkt.saddr)?;
            let (backend, port_be) = (*b.backend_addr(), b.backend_port_be());
            remember(original, pkt, &backend, port_be, frontend.id())?;
            (backend, port_be)
        }
    };
    let frontend_addr = pkt.daddr;
    rewrite(
        ctx,
        pkt,
        IPV4_DADDR,
        2,
        &frontend_addr,
        &backend,
        pkt.dport_be,
        backend_port_be,
    )
    .map_err(|()| DropReason::ServiceNatLost)?;
    pkt.daddr = backend;
    pkt.dport_be = backend_port_be;
    Ok(true)
}

/// Rewrites a reply of a translated flow (backend → client) to come from the frontend.
/// Err: counted and reported, drop.
#[inline(always)]
pub fn reverse(ctx: &TcContext, pkt: &Packet) -> Result<(), ()> {
    reverse_inner(ctx, pkt).map_err(|reason| {
        record_drop(ctx, scratch_key(0), reason, 0, 0);
    })
}

#[inline(always)]
fn reverse_inner(ctx: &TcContext, pkt: &Packet) -> Result<(), DropReason> {
    if pkt.l4 == 0 || !pkt.saddr.is_v4() {
        return Err(DropReason::ServiceNatLost);
    }
    let Some(reply) = SCRATCH_KEYS.get_ptr_mut(0) else {
        return Err(DropReason::ServiceNatLost);
    };
    // SAFETY: per-CPU scratch value, used by this program run alone.
    let reply = unsafe { &mut *reply };
    *reply = pkt.ct_key();
    // SAFETY: value copied out of the map.
    let Some(nat) = (unsafe { SERVICE_NAT.get(&*reply) }).copied() else {
        return Err(DropReason::ServiceNatLost);
    };
    rewrite(
        ctx,
        pkt,
        IPV4_SADDR,
        0,
        &pkt.saddr,
        nat.addr(),
        pkt.sport_be,
        nat.port_be(),
    )
    .map_err(|()| DropReason::ServiceNatLost)
}

/// Slot 1..=count, by the client's address under session affinity (its flows keep one
/// backend while the backend set is unchanged), at random otherwise. Shared with the socket
/// hooks (`sock`).
#[inline(always)]
pub fn pick_backend(
    frontend_key: &ServiceKey,
    frontend: &ServiceValue,
    client: &IpKey,
) -> Result<ServiceValue, DropReason> {
    let count = frontend.count();
    if count == 0 {
        return Err(DropReason::NoBackend);
    }
    let spread = if frontend.flags() & ServiceValue::FLAG_AFFINITY != 0 {
        let o = client.v4_octets();
        u32::from_ne_bytes(o).wrapping_mul(0x9e37_79b1) >> 8
    } else {
        // SAFETY: helper without preconditions.
        unsafe { bpf_get_prandom_u32() }
    };
    let slot = 1 + spread % count;
    // SAFETY: value copied out of the map.
    match unsafe { SERVICES.get(&frontend_key.with_slot(slot)) } {
        Some(b) => Ok(*b),
        None => Err(DropReason::NoBackend),
    }
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
) -> Result<(), DropReason> {
    SERVICE_NAT
        .insert(
            original,
            &NatEntry::new(*backend, backend_port_be, service),
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
    SERVICE_NAT
        .insert(reply, &NatEntry::new(pkt.daddr, pkt.dport_be, service), 0)
        .map_err(|_| DropReason::ServiceNatLost)
}

/// Replaces the IPv4 address at `addr_offset` and the L4 port at `port_offset` (0: source,
/// 2: destination), fixing the IPv4 header checksum and the TCP/UDP checksum.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "one rewrite, spelled out for the verifier"
)]
fn rewrite(
    ctx: &TcContext,
    pkt: &Packet,
    addr_offset: usize,
    port_offset: usize,
    old_addr: &IpKey,
    new_addr: &IpKey,
    old_port_be: u16,
    new_port_be: u16,
) -> Result<(), ()> {
    let old = u32::from_ne_bytes(old_addr.v4_octets());
    let new = u32::from_ne_bytes(new_addr.v4_octets());
    let l4 = usize::from(pkt.l4);
    let l4_check = match pkt.proto {
        proto::TCP => Some((l4 + TCP_CHECK, 0)),
        proto::UDP => Some((l4 + UDP_CHECK, u64::from(BPF_F_MARK_MANGLED_0))),
        _ => None,
    };
    if let Some((check, extra)) = l4_check {
        ctx.l4_csum_replace(
            check,
            u64::from(old),
            u64::from(new),
            u64::from(BPF_F_PSEUDO_HDR) | extra | 4,
        )
        .map_err(|_| ())?;
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
    ctx.l3_csum_replace(IPV4_CHECK, u64::from(old), u64::from(new), 4)
        .map_err(|_| ())?;
    ctx.store(addr_offset, &new, 0).map_err(|_| ())?;
    if old_port_be != new_port_be {
        ctx.store(l4 + port_offset, &new_port_be, 0)
            .map_err(|_| ())?;
    }
    Ok(())
}
