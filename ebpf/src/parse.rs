//! Header parsing with direct packet access.

use core::mem::size_of;

use aya_ebpf::programs::TcContext;
use weir_common::{
    conntrack::{CtKey, FragKey, FragPorts},
    event::DropReason,
    ip::IpKey,
    policy::proto,
};

use crate::{
    hdr::{Ipv4Hdr, Ipv6Hdr},
    maps::{FRAGMENTS, SCRATCH_IPV6_WALK},
};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;

/// Returns a pointer to a `T` at `offset` into the packet, if the packet is long enough.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Result<*mut T, DropReason> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(DropReason::Malformed);
    }
    Ok((start + offset) as *mut T)
}

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto_be: u16,
}

/// First four bytes of TCP, UDP and SCTP headers: the ports.
#[repr(C)]
struct Ports {
    sport_be: u16,
    dport_be: u16,
}

#[repr(C)]
struct IcmpEcho {
    ty: u8,
    code: u8,
    check: u16,
    id_be: u16,
    seq: u16,
}

const TCP_FLAGS_OFFSET: usize = 13;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;

/// What the datapath needs to know of an IP packet.
pub struct Packet {
    pub saddr: IpKey,
    pub daddr: IpKey,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    /// Offset of the L4 header (0 for a later fragment, which has none).
    pub l4: u16,
}

impl Packet {
    #[inline(always)]
    pub fn ct_key(&self) -> CtKey {
        CtKey::new(
            self.saddr,
            self.daddr,
            self.sport_be,
            self.dport_be,
            self.proto,
        )
    }

    /// IPv6 neighbour discovery (router and neighbour solicitation and advertisement,
    /// redirect) or multicast listener discovery: the link's own machinery, which policy never
    /// judges and which never leaves the link.
    #[inline(always)]
    pub fn is_link_control(&self, ctx: &TcContext) -> bool {
        self.icmpv6_type(ctx).is_some_and(|t| {
            matches!(
                t,
                ICMPV6_MLD_QUERY
                    | ICMPV6_MLD_REPORT
                    | ICMPV6_MLD_DONE
                    | ICMPV6_MLD2_REPORT
                    | ICMPV6_ROUTER_SOLICITATION..=ICMPV6_REDIRECT
            )
        })
    }

    /// The type of an ICMPv6 message (read from the packet: it is rarely needed).
    #[inline(always)]
    pub fn icmpv6_type(&self, ctx: &TcContext) -> Option<u8> {
        if self.proto != proto::ICMPV6 || self.l4 == 0 {
            return None;
        }
        // The parser bounded the offset; the mask tells the verifier so.
        let l4 = usize::from(self.l4) & (2 * MAX_IPV6_L4_OFFSET - 1);
        // The type, code and checksum: the parser saw all four bytes.
        let hdr = ptr_at::<[u8; 4]>(ctx, l4).ok()?;
        // SAFETY: bounds checked by ptr_at.
        Some(unsafe { (*hdr)[0] })
    }
}

pub const ICMPV6_MLD_QUERY: u8 = 130;
pub const ICMPV6_MLD_REPORT: u8 = 131;
pub const ICMPV6_MLD_DONE: u8 = 132;
pub const ICMPV6_ROUTER_SOLICITATION: u8 = 133;
pub const ICMPV6_ROUTER_ADVERTISEMENT: u8 = 134;
pub const ICMPV6_REDIRECT: u8 = 137;
pub const ICMPV6_MLD2_REPORT: u8 = 143;

pub enum L3 {
    Arp,
    Ip(Packet),
    Other,
}

#[inline(always)]
pub fn eth(ctx: &TcContext) -> Result<*mut EthHdr, DropReason> {
    ptr_at::<EthHdr>(ctx, 0)
}

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<L3, DropReason> {
    let eth = eth(ctx)?;
    // SAFETY: bounds checked by ptr_at.
    let ethertype = u16::from_be(unsafe { (*eth).proto_be });
    match ethertype {
        ETH_P_IP => parse_v4(ctx).map(L3::Ip),
        ETH_P_IPV6 => parse_v6(ctx).map(L3::Ip),
        ETH_P_ARP => Ok(L3::Arp),
        _ => Ok(L3::Other),
    }
}

#[inline(always)]
fn parse_v4(ctx: &TcContext) -> Result<Packet, DropReason> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at.
    let (ver_ihl, id_be, frag_off, p, saddr, daddr) = unsafe {
        (
            (*ip).ver_ihl,
            (*ip).id_be,
            u16::from_be((*ip).frag_off_be),
            (*ip).proto,
            IpKey::from_v4((*ip).saddr),
            IpKey::from_v4((*ip).daddr),
        )
    };
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ihl < 20 {
        return Err(DropReason::Malformed);
    }
    let l4 = ETH_HLEN + ihl;
    let mut pkt = Packet {
        saddr,
        daddr,
        sport_be: 0,
        dport_be: 0,
        proto: p,
        tcp_flags: 0,
        l4: 0,
    };
    let more_fragments = frag_off & 0x2000 != 0;
    let offset = frag_off & 0x1fff;
    if offset != 0 {
        // A later fragment: no L4 header. Use the ports the first fragment recorded; without
        // them the datagram is classified as portless (and a port-restricted rule drops it).
        let fk = FragKey::v4(saddr, daddr, id_be, p);
        // SAFETY: plain value copy out of the map.
        if let Some(ports) = unsafe { FRAGMENTS.get(&fk) } {
            pkt.sport_be = ports.sport_be;
            pkt.dport_be = ports.dport_be;
        }
        return Ok(pkt);
    }
    l4_ports(ctx, l4, &mut pkt, proto::ICMP, 8, 0)?;
    pkt.l4 = l4 as u16;
    if more_fragments {
        let fk = FragKey::v4(saddr, daddr, id_be, p);
        let ports = FragPorts {
            sport_be: pkt.sport_be,
            dport_be: pkt.dport_be,
        };
        let _ = FRAGMENTS.insert(&fk, &ports, 0);
    }
    Ok(pkt)
}

/// IPv6 extension headers, as next-header values.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

/// The most IPv6 extension headers walked before the upper-layer header; a longer chain is
/// dropped as malformed. Real traffic carries one or two (RFC 8200 recommends at most one of
/// each, destination options twice).
pub const MAX_IPV6_EXT_HEADERS: usize = 6;

/// The farthest into the frame an IPv6 packet's upper-layer header may start (after the
/// extension headers): a chain ending farther is dropped as malformed. It keeps packet offsets
/// bounded for the verifier, and is far beyond what real extension headers take.
pub const MAX_IPV6_L4_OFFSET: usize = 1024;

/// The first two bytes of every extension header but the fragment header.
#[repr(C)]
struct Ipv6ExtHdr {
    next_hdr: u8,
    len: u8,
}

#[repr(C)]
struct Ipv6FragHdr {
    next_hdr: u8,
    _reserved: u8,
    frag_off_be: u16,
    id: u32,
}

/// Parses an IPv6 packet, walking its extension headers (hop-by-hop, routing, destination
/// options, fragment, authentication; ESP ends the walk: what follows it is encrypted, so
/// the packet is classified as protocol 50 without ports). Dropped as malformed: a
/// truncated header, a payload length beyond the packet, an extension-header chain longer
/// than [`MAX_IPV6_EXT_HEADERS`] or ending beyond [`MAX_IPV6_L4_OFFSET`], a first fragment
/// without its upper-layer header (RFC 7112), an upper-layer header cut short by the
/// payload length.
#[inline(always)]
fn parse_v6(ctx: &TcContext) -> Result<Packet, DropReason> {
    let ip = ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at.
    let (version, payload_len, mut next, saddr, daddr) = unsafe {
        (
            (*ip).ver_tc_flow[0] >> 4,
            usize::from(u16::from_be((*ip).payload_len)),
            (*ip).next_hdr,
            IpKey::from_v6((*ip).saddr),
            IpKey::from_v6((*ip).daddr),
        )
    };
    if version != 6 {
        return Err(DropReason::Malformed);
    }
    let first = ETH_HLEN + size_of::<Ipv6Hdr>();
    let len = ctx.len() as usize;
    let ip_end = if payload_len == 0 && len > first + usize::from(u16::MAX) {
        // A payload beyond 64 KiB (BIG TCP on the host) has no length of its own.
        len
    } else {
        first + payload_len
    };
    if ip_end > len {
        return Err(DropReason::Malformed);
    }
    let walk = SCRATCH_IPV6_WALK
        .get_ptr_mut(0)
        .ok_or(DropReason::Malformed)?;
    let mut off = first;
    // The fragment header's offset and flags (none: 0, like an atomic fragment).
    let mut fragment: u32 = 0;
    let mut id: u32 = 0;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        let hdr_len = match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH => {
                let h = ptr_at::<Ipv6ExtHdr>(ctx, off)?;
                // SAFETY: bounds checked by ptr_at.
                let (n, l) = unsafe { ((*h).next_hdr, usize::from((*h).len)) };
                let auth = next == NEXTHDR_AUTH;
                next = n;
                if auth {
                    // The authentication header counts its length in 4-byte units, minus 2.
                    (l + 2) * 4
                } else {
                    (l + 1) * 8
                }
            }
            NEXTHDR_FRAGMENT => {
                let h = ptr_at::<Ipv6FragHdr>(ctx, off)?;
                // SAFETY: bounds checked by ptr_at.
                let (n, frag_off, frag_id) =
                    unsafe { ((*h).next_hdr, u16::from_be((*h).frag_off_be), (*h).id) };
                next = n;
                fragment = u32::from(frag_off);
                id = frag_id;
                size_of::<Ipv6FragHdr>()
            }
            _ => break,
        };
        off += hdr_len;
        if off > MAX_IPV6_L4_OFFSET || off > ip_end {
            return Err(DropReason::Malformed);
        }
    }
    if matches!(
        next,
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT
    ) {
        return Err(DropReason::Malformed);
    }
    // SAFETY: `walk` points to this CPU's slot of the map, valid for the program's run; the
    // volatile accesses keep the compiler from handing the values over in registers.
    let (off, next, fragment, id) = unsafe {
        let w = &mut *walk;
        core::ptr::write_volatile(&mut w[0], off as u32);
        core::ptr::write_volatile(&mut w[1], u32::from(next));
        core::ptr::write_volatile(&mut w[2], fragment);
        core::ptr::write_volatile(&mut w[3], id);
        (
            core::ptr::read_volatile(&w[0]),
            core::ptr::read_volatile(&w[1]),
            core::ptr::read_volatile(&w[2]),
            core::ptr::read_volatile(&w[3]),
        )
    };
    let next = next as u8;
    // The walk bounded the offset; the mask tells the verifier so.
    let l4 = (off as usize) & (2 * MAX_IPV6_L4_OFFSET - 1);
    let mut pkt = Packet {
        saddr,
        daddr,
        sport_be: 0,
        dport_be: 0,
        proto: next,
        tcp_flags: 0,
        l4: 0,
    };
    let later_fragment = fragment & 0xfff8 != 0;
    let more_fragments = fragment & 1 != 0;
    if later_fragment {
        let fk = FragKey::new(saddr, daddr, id, next);
        // SAFETY: plain value copy out of the map.
        if let Some(ports) = unsafe { FRAGMENTS.get(&fk) } {
            pkt.sport_be = ports.sport_be;
            pkt.dport_be = ports.dport_be;
        }
        return Ok(pkt);
    }
    // The upper-layer header the datapath reads must lie within the payload.
    let needed = match next {
        proto::TCP => 20,
        proto::UDP => 8,
        proto::SCTP => 12,
        proto::ICMPV6 => 4,
        _ => 0,
    };
    if l4 + needed > ip_end {
        return Err(DropReason::Malformed);
    }
    l4_ports(ctx, l4, &mut pkt, proto::ICMPV6, 128, 129)?;
    pkt.l4 = l4 as u16;
    if more_fragments {
        let fk = FragKey::new(saddr, daddr, id, next);
        let ports = FragPorts {
            sport_be: pkt.sport_be,
            dport_be: pkt.dport_be,
        };
        let _ = FRAGMENTS.insert(&fk, &ports, 0);
    }
    Ok(pkt)
}

/// For an ICMP error (destination unreachable, fragmentation needed or packet too big, time
/// exceeded, parameter problem) addressed to the sender of the packet it quotes: writes that
/// packet's flow, as its sender saw it, to `out`. False for anything else.
#[inline(always)]
pub fn quoted(ctx: &TcContext, pkt: &Packet, out: &mut CtKey) -> bool {
    // At most 14 + 60 (IPv4) or MAX_IPV6_L4_OFFSET; the mask tells the verifier so.
    let l4 = usize::from(pkt.l4) & (2 * MAX_IPV6_L4_OFFSET - 1);
    if l4 == 0 {
        return false;
    }
    let key = match pkt.proto {
        proto::ICMP => quoted_v4(ctx, l4, &pkt.daddr),
        proto::ICMPV6 => quoted_v6(ctx, l4, &pkt.daddr),
        _ => None,
    };
    match key {
        Some(k) => {
            *out = k;
            true
        }
        None => false,
    }
}

/// ICMP header before the quoted packet of an error message.
const ICMP_ERROR_HLEN: usize = 8;

/// The flow of the IPv4 packet an ICMP error at `l4` quotes, if it is an error and the
/// quoted packet was sent by the error's destination `to`.
#[inline(always)]
fn quoted_v4(ctx: &TcContext, l4: usize, to: &IpKey) -> Option<CtKey> {
    let icmp = ptr_at::<IcmpEcho>(ctx, l4).ok()?;
    // SAFETY: bounds checked by ptr_at.
    let ty = unsafe { (*icmp).ty };
    // Destination unreachable (incl. fragmentation needed), time exceeded, parameter problem.
    if !matches!(ty, 3 | 11 | 12) {
        return None;
    }
    let inner = l4 + ICMP_ERROR_HLEN;
    let ip = ptr_at::<Ipv4Hdr>(ctx, inner).ok()?;
    // SAFETY: bounds checked by ptr_at.
    let (ver_ihl, p, saddr, daddr) = unsafe {
        (
            (*ip).ver_ihl,
            (*ip).proto,
            IpKey::from_v4((*ip).saddr),
            IpKey::from_v4((*ip).daddr),
        )
    };
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ihl < 20 || saddr != *to {
        return None;
    }
    quoted_flow(ctx, inner + ihl, saddr, daddr, p, proto::ICMP, 8)
}

/// [`quoted_v4`] for ICMPv6 (the quoted packet's extension headers are not walked).
#[inline(always)]
fn quoted_v6(ctx: &TcContext, l4: usize, to: &IpKey) -> Option<CtKey> {
    let icmp = ptr_at::<IcmpEcho>(ctx, l4).ok()?;
    // SAFETY: bounds checked by ptr_at.
    let ty = unsafe { (*icmp).ty };
    // Destination unreachable, packet too big, time exceeded, parameter problem.
    if !matches!(ty, 1..=4) {
        return None;
    }
    let inner = l4 + ICMP_ERROR_HLEN;
    let ip = ptr_at::<Ipv6Hdr>(ctx, inner).ok()?;
    // SAFETY: bounds checked by ptr_at.
    let (p, saddr, daddr) = unsafe {
        (
            (*ip).next_hdr,
            IpKey::from_v6((*ip).saddr),
            IpKey::from_v6((*ip).daddr),
        )
    };
    if saddr != *to {
        return None;
    }
    quoted_flow(
        ctx,
        inner + size_of::<Ipv6Hdr>(),
        saddr,
        daddr,
        p,
        proto::ICMPV6,
        128,
    )
}

/// The flow key of a quoted packet whose L4 header starts at `l4`: ports, or the echo
/// identifier of a quoted echo request.
#[inline(always)]
fn quoted_flow(
    ctx: &TcContext,
    l4: usize,
    saddr: IpKey,
    daddr: IpKey,
    p: u8,
    icmp_proto: u8,
    echo_request: u8,
) -> Option<CtKey> {
    let (sport_be, dport_be) = match p {
        proto::TCP | proto::UDP | proto::SCTP => {
            let ports = ptr_at::<Ports>(ctx, l4).ok()?;
            // SAFETY: bounds checked by ptr_at.
            unsafe { ((*ports).sport_be, (*ports).dport_be) }
        }
        q if q == icmp_proto => {
            let icmp = ptr_at::<IcmpEcho>(ctx, l4).ok()?;
            // SAFETY: bounds checked by ptr_at.
            let (ty, id) = unsafe { ((*icmp).ty, (*icmp).id_be) };
            if ty != echo_request {
                return None;
            }
            (id, id)
        }
        _ => return None,
    };
    Some(CtKey::new(saddr, daddr, sport_be, dport_be, p))
}

/// Fills in ports (or the ICMP echo identifier, in both port slots) and TCP flags.
#[inline(always)]
fn l4_ports(
    ctx: &TcContext,
    l4: usize,
    pkt: &mut Packet,
    icmp_proto: u8,
    echo_request: u8,
    echo_reply: u8,
) -> Result<(), DropReason> {
    match pkt.proto {
        proto::TCP | proto::UDP | proto::SCTP => {
            let ports = ptr_at::<Ports>(ctx, l4)?;
            // SAFETY: bounds checked by ptr_at.
            unsafe {
                pkt.sport_be = (*ports).sport_be;
                pkt.dport_be = (*ports).dport_be;
            }
            if pkt.proto == proto::TCP {
                let flags = ptr_at::<u8>(ctx, l4 + TCP_FLAGS_OFFSET)?;
                // SAFETY: bounds checked by ptr_at.
                pkt.tcp_flags = unsafe { *flags };
            }
        }
        p if p == icmp_proto => {
            let icmp = ptr_at::<IcmpEcho>(ctx, l4)?;
            // SAFETY: bounds checked by ptr_at.
            let (ty, id) = unsafe { ((*icmp).ty, (*icmp).id_be) };
            // Echo request and reply are matched by identifier; other ICMP stays portless.
            if ty == echo_request || ty == echo_reply {
                pkt.sport_be = id;
                pkt.dport_be = id;
            }
        }
        _ => {}
    }
    Ok(())
}
