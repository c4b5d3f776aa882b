//! Fast refusal of a pod's new flow to a Service that has no usable backend: the pod gets a
//! TCP reset, or an ICMP (ICMPv6) port unreachable for UDP, at once — what a closed port answers —
//! instead of waiting out its timeout. The answer is the pod's own packet turned around
//! (so it quotes the untranslated frontend the pod asked for) and handed straight back to
//! the pod.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::generated::bpf_skb_change_tail,
    programs::TcContext,
};
use weir_common::{endpoint::EndpointInfo, policy::proto};

use crate::{
    forward,
    parse::{ETH_HLEN, Packet, TCP_RST},
};

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const IPV4_HLEN: usize = 20;
const ICMP_HLEN: usize = 8;
/// What an ICMP error quotes here: the IPv4 header and the first 8 bytes of the datagram.
const QUOTE: usize = IPV4_HLEN + 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const IPV6_HLEN: usize = 40;
/// What an ICMPv6 error quotes here: the IPv6 header and the first 8 bytes of the datagram.
const QUOTE6: usize = IPV6_HLEN + 8;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;

/// Answers `pkt` (from the pod behind `ep`) as a closed port would; TC_ACT_SHOT when it
/// cannot (not the first packet of a TCP or UDP flow, IPv4 options or IPv6 extension
/// headers, a helper failed).
#[inline(always)]
pub fn refuse(ctx: &TcContext, pkt: &Packet, ep: &EndpointInfo) -> i32 {
    let v4 = pkt.saddr.is_v4();
    let ip_hlen = if v4 { IPV4_HLEN } else { IPV6_HLEN };
    if usize::from(pkt.l4) != ETH_HLEN + ip_hlen {
        return TC_ACT_SHOT;
    }
    let answered = match pkt.proto {
        proto::TCP if pkt.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN => {
            tcp_reset(ctx, pkt, v4)
        }
        proto::UDP if v4 => port_unreachable(ctx, pkt),
        proto::UDP => port_unreachable6(ctx, pkt),
        _ => Err(()),
    };
    match answered {
        Ok(()) => forward::to_local_pod(ctx, ep),
        Err(()) => TC_ACT_SHOT,
    }
}

/// The SYN becomes its RST+ACK: addresses and ports swapped (which leaves every checksum
/// as it was), sequence 0, acknowledging the SYN and any data it carried.
#[inline(always)]
fn tcp_reset(ctx: &TcContext, pkt: &Packet, v4: bool) -> Result<(), ()> {
    let l4 = usize::from(pkt.l4);
    // The IP packet's length: IPv4's total length, or IPv6's payload length and its header.
    let (length_at, ip_hlen) = if v4 {
        (ETH_HLEN + 2, IPV4_HLEN)
    } else {
        (ETH_HLEN + 4, 0)
    };
    let total = u16::from_be(ctx.load::<u16>(length_at).map_err(|_| ())?);
    let seq = ctx.load::<u32>(l4 + 4).map_err(|_| ())?;
    let ack = ctx.load::<u32>(l4 + 8).map_err(|_| ())?;
    let word = ctx.load::<u16>(l4 + 12).map_err(|_| ())?;
    let header_len = usize::from(u16::from_be(word) >> 12) * 4;
    let data = usize::from(total).saturating_sub(ip_hlen + header_len) as u32;
    let new_ack = u32::from_be(seq).wrapping_add(1 + data).to_be();
    let new_word = ((u16::from_be(word) & 0xf000) | u16::from(TCP_RST | TCP_ACK)).to_be();
    let check = l4 + 16;
    ctx.l4_csum_replace(check, u64::from(seq), 0, 4)
        .map_err(|_| ())?;
    ctx.l4_csum_replace(check, u64::from(ack), u64::from(new_ack), 4)
        .map_err(|_| ())?;
    ctx.l4_csum_replace(check, u64::from(word), u64::from(new_word), 2)
        .map_err(|_| ())?;
    ctx.store(l4 + 4, &0u32, 0).map_err(|_| ())?;
    ctx.store(l4 + 8, &new_ack, 0).map_err(|_| ())?;
    ctx.store(l4 + 12, &new_word, 0).map_err(|_| ())?;
    ctx.store(l4, &pkt.dport_be, 0).map_err(|_| ())?;
    ctx.store(l4 + 2, &pkt.sport_be, 0).map_err(|_| ())?;
    if v4 {
        swap_addresses(ctx, pkt)
    } else {
        ctx.store(ETH_HLEN + 8, &pkt.daddr.words(), 0)
            .map_err(|_| ())?;
        ctx.store(ETH_HLEN + 24, &pkt.saddr.words(), 0)
            .map_err(|_| ())
    }
}

#[inline(always)]
fn swap_addresses(ctx: &TcContext, pkt: &Packet) -> Result<(), ()> {
    let src = u32::from_ne_bytes(pkt.saddr.v4_octets());
    let dst = u32::from_ne_bytes(pkt.daddr.v4_octets());
    ctx.store(ETH_HLEN + 12, &dst, 0).map_err(|_| ())?;
    ctx.store(ETH_HLEN + 16, &src, 0).map_err(|_| ())
}

/// The datagram becomes an ICMP port unreachable quoting its IPv4 header and first 8
/// bytes, from the address the pod sent it to.
#[inline(always)]
fn port_unreachable(ctx: &TcContext, pkt: &Packet) -> Result<(), ()> {
    // SAFETY: the context's own skb; shrinking to the quote keeps the headers.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + QUOTE) as u32, 0) } != 0 {
        return Err(());
    }
    ctx.adjust_room((IPV4_HLEN + ICMP_HLEN) as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| ())?;
    // The new IPv4 header: from the frontend, to the pod.
    let total = (IPV4_HLEN + ICMP_HLEN + QUOTE) as u16;
    let src = pkt.daddr.v4_octets();
    let dst = pkt.saddr.v4_octets();
    let words: [u16; 10] = [
        0x4500,
        total,
        0,
        0,
        (64 << 8) | u16::from(proto::ICMP),
        0,
        u16::from_be_bytes([src[0], src[1]]),
        u16::from_be_bytes([src[2], src[3]]),
        u16::from_be_bytes([dst[0], dst[1]]),
        u16::from_be_bytes([dst[2], dst[3]]),
    ];
    let mut sum = 0u32;
    for w in words {
        sum += u32::from(w);
    }
    let mut header = words;
    header[5] = fold(sum);
    for (i, w) in header.iter().enumerate() {
        ctx.store(ETH_HLEN + 2 * i, &w.to_be(), 0).map_err(|_| ())?;
    }
    // The ICMP header, its checksum over itself and the quote.
    let icmp = ETH_HLEN + IPV4_HLEN;
    let type_code = u16::from_be_bytes([ICMP_DEST_UNREACH, ICMP_PORT_UNREACH]);
    ctx.store(icmp, &type_code.to_be(), 0).map_err(|_| ())?;
    ctx.store(icmp + 2, &0u16, 0).map_err(|_| ())?;
    ctx.store(icmp + 4, &0u32, 0).map_err(|_| ())?;
    let mut sum = u32::from(type_code);
    for i in 0..QUOTE / 2 {
        let w = ctx.load::<u16>(icmp + ICMP_HLEN + 2 * i).map_err(|_| ())?;
        sum += u32::from(u16::from_be(w));
    }
    ctx.store(icmp + 2, &fold(sum).to_be(), 0).map_err(|_| ())
}

/// The datagram becomes an ICMPv6 port unreachable quoting its IPv6 header and first 8
/// bytes, from the address the pod sent it to.
#[inline(always)]
fn port_unreachable6(ctx: &TcContext, pkt: &Packet) -> Result<(), ()> {
    // SAFETY: the context's own skb; shrinking to the quote keeps the headers.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + QUOTE6) as u32, 0) } != 0 {
        return Err(());
    }
    ctx.adjust_room((IPV6_HLEN + ICMP_HLEN) as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| ())?;
    // The new IPv6 header: from the frontend, to the pod.
    let payload = (ICMP_HLEN + QUOTE6) as u16;
    let first = 0x6000_0000u32.to_be();
    let rest = (u32::from(payload) << 16 | u32::from(proto::ICMPV6) << 8 | 64).to_be();
    ctx.store(ETH_HLEN, &first, 0).map_err(|_| ())?;
    ctx.store(ETH_HLEN + 4, &rest, 0).map_err(|_| ())?;
    let (src, dst) = (pkt.daddr.words(), pkt.saddr.words());
    ctx.store(ETH_HLEN + 8, &src, 0).map_err(|_| ())?;
    ctx.store(ETH_HLEN + 24, &dst, 0).map_err(|_| ())?;
    // The ICMPv6 header, its checksum over the pseudo header, itself and the quote.
    let icmp = ETH_HLEN + IPV6_HLEN;
    let type_code = u16::from_be_bytes([ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH]);
    ctx.store(icmp, &type_code.to_be(), 0).map_err(|_| ())?;
    ctx.store(icmp + 2, &0u16, 0).map_err(|_| ())?;
    ctx.store(icmp + 4, &0u32, 0).map_err(|_| ())?;
    let mut sum = u32::from(type_code) + u32::from(payload) + u32::from(proto::ICMPV6);
    sum += halves(src[0]) + halves(src[1]) + halves(src[2]) + halves(src[3]);
    sum += halves(dst[0]) + halves(dst[1]) + halves(dst[2]) + halves(dst[3]);
    for i in 0..QUOTE6 / 2 {
        let w = ctx.load::<u16>(icmp + ICMP_HLEN + 2 * i).map_err(|_| ())?;
        sum += u32::from(u16::from_be(w));
    }
    ctx.store(icmp + 2, &fold(sum).to_be(), 0).map_err(|_| ())
}

/// The sum of the two 16-bit words of an address word (network order, read natively).
#[inline(always)]
fn halves(w: u32) -> u32 {
    let [a, b, c, d] = w.to_ne_bytes();
    u32::from(u16::from_be_bytes([a, b])) + u32::from(u16::from_be_bytes([c, d]))
}

/// The one's-complement checksum of a 16-bit word sum.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
