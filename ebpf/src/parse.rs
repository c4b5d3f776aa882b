//! Header parsing with direct packet access.

use core::mem::size_of;

use aya_ebpf::programs::TcContext;
use weir_common::{
    conntrack::{CtKey, FragKey, FragPorts},
    event::DropReason,
    ip::IpKey,
    policy::proto,
};

use crate::maps::FRAGMENTS;

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

#[repr(C)]
struct Ipv4Hdr {
    ver_ihl: u8,
    tos: u8,
    tot_len: u16,
    id_be: u16,
    frag_off_be: u16,
    ttl: u8,
    proto: u8,
    check: u16,
    saddr: [u8; 4],
    daddr: [u8; 4],
}

#[repr(C)]
struct Ipv6Hdr {
    ver_tc_flow: [u8; 4],
    payload_len: u16,
    next_hdr: u8,
    hop_limit: u8,
    saddr: [u8; 16],
    daddr: [u8; 16],
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
}

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
    };
    let more_fragments = frag_off & 0x2000 != 0;
    let offset = frag_off & 0x1fff;
    if offset != 0 {
        // A later fragment: no L4 header. Use the ports the first fragment recorded; without
        // them the datagram is classified as portless (and a port-restricted rule drops it).
        let fk = FragKey::new(saddr, daddr, id_be, p);
        // SAFETY: plain value copy out of the map.
        if let Some(ports) = unsafe { FRAGMENTS.get(&fk) } {
            pkt.sport_be = ports.sport_be;
            pkt.dport_be = ports.dport_be;
        }
        return Ok(pkt);
    }
    l4_ports(ctx, l4, &mut pkt, proto::ICMP, 8, 0)?;
    if more_fragments {
        let fk = FragKey::new(saddr, daddr, id_be, p);
        let ports = FragPorts {
            sport_be: pkt.sport_be,
            dport_be: pkt.dport_be,
        };
        let _ = FRAGMENTS.insert(&fk, &ports, 0);
    }
    Ok(pkt)
}

#[inline(always)]
fn parse_v6(ctx: &TcContext) -> Result<Packet, DropReason> {
    let ip = ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at.
    let (next, saddr, daddr) = unsafe {
        (
            (*ip).next_hdr,
            IpKey::from_v6((*ip).saddr),
            IpKey::from_v6((*ip).daddr),
        )
    };
    let mut pkt = Packet {
        saddr,
        daddr,
        sport_be: 0,
        dport_be: 0,
        proto: next,
        tcp_flags: 0,
    };
    // Extension headers are not walked: such packets are classified as portless.
    l4_ports(
        ctx,
        ETH_HLEN + size_of::<Ipv6Hdr>(),
        &mut pkt,
        proto::ICMPV6,
        128,
        129,
    )?;
    Ok(pkt)
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
