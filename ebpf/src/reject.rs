//! Fast refusal of a pod's new flow to a Service that has no usable backend: the pod gets a
//! TCP reset, or an ICMP port unreachable for UDP, at once — what a closed port answers —
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

/// Answers `pkt` (from the pod behind `ep`) as a closed port would; TC_ACT_SHOT when it
/// cannot (not the first packet of a TCP or UDP flow, IPv4 options, a helper failed).
#[inline(always)]
pub fn refuse(ctx: &TcContext, pkt: &Packet, ep: &EndpointInfo) -> i32 {
    if !pkt.saddr.is_v4() || usize::from(pkt.l4) != ETH_HLEN + IPV4_HLEN {
        return TC_ACT_SHOT;
    }
    let answered = match pkt.proto {
        proto::TCP if pkt.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN => {
            tcp_reset(ctx, pkt)
        }
        proto::UDP => port_unreachable(ctx, pkt),
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
fn tcp_reset(ctx: &TcContext, pkt: &Packet) -> Result<(), ()> {
    let l4 = usize::from(pkt.l4);
    let total = u16::from_be(ctx.load::<u16>(ETH_HLEN + 2).map_err(|_| ())?);
    let seq = ctx.load::<u32>(l4 + 4).map_err(|_| ())?;
    let ack = ctx.load::<u32>(l4 + 8).map_err(|_| ())?;
    let word = ctx.load::<u16>(l4 + 12).map_err(|_| ())?;
    let header_len = usize::from(u16::from_be(word) >> 12) * 4;
    let data = usize::from(total).saturating_sub(IPV4_HLEN + header_len) as u32;
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
    swap_addresses(ctx, pkt)
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

/// The one's-complement checksum of a 16-bit word sum.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
