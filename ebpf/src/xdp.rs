//! XDP on the node's uplink: the checks that need no conntrack, before the kernel allocates a
//! socket buffer for the packet. Whatever they drop, TC (`from_network`, `from_tunnel`) never
//! sees; everything else passes untouched, to TC and the host stack.
//!
//! * **Malformed headers**: an Ethernet frame too short for its header; an IPv4 header that
//!   is truncated, not version 4, shorter than 20 bytes or longer than its total length, or
//!   whose total length runs past the frame; a UDP header (first fragment) that is
//!   truncated, or whose length is shorter than the header or (unfragmented) longer than the
//!   IP payload; an IPv6 header that is truncated. The kernel would drop all of these too,
//!   later and at greater cost.
//! * **Prefilter**: a source (outer, and the inner one of a VXLAN datagram) in a prefix of
//!   the `PREFILTER` trie: one LPM lookup, whatever the number of prefixes.
//! * **Spoofed sources**: no packet from the network may claim this node's addresses or a
//!   local pod's (the node-to-pod policy exemption is keyed on them), as outer or as inner
//!   source of a VXLAN datagram. The same check as `from_network`'s (reason `spoofed`).
//! * **Untracked host-policy rules**: a packet to one of this node's addresses that the
//!   node's untracked rule set (`HOST_ENDPOINT`'s second slot) denies, failsafe ports
//!   excepted (looked up only while `NodeConfig::FLAG_HOST_UNTRACKED` says one is set): reason `host_policy`, naming the rule. Decided by the same peer-class and
//!   verdict lookups as the TC programs' policy, without conntrack (replies of the node's
//!   own connections included). A later IPv4 fragment (no ports) is not judged, nor an
//!   IPv6 packet with extension headers (TC walks them) or neighbour discovery.
//! * **Tunnel admission**: a VXLAN datagram to one of this node's addresses, over IPv4 or (an
//!   IPv6 underlay, UDP right after the fixed header) IPv6, is accepted only from another
//!   node (`TUNNEL_PEERS`): reason `tunnel_untrusted`. `from_tunnel` checks the
//!   same after decapsulation (reason `unknown_tunnel_peer`) for the packets XDP did not see
//!   (an interface without the XDP program, fragmented datagrams reassembled by the kernel).
//!
//! The TC checks stay in place: they are the fallback where XDP cannot run, and they cost
//! a packet that XDP passed two hash lookups.

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::generated::bpf_xdp_get_buff_len,
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use weir_common::{
    TUNNEL_PORT,
    config::NodeConfig,
    conntrack::CtKey,
    endpoint::EndpointInfo,
    event::DropReason,
    ip::IpKey,
    policy::{NOT_ISOLATED, proto},
};

use crate::{
    events::record_xdp_drop,
    hdr::{Ipv4Hdr, Ipv6Hdr},
    host,
    maps::{
        ENDPOINTS, HOST_ADDRS, HOST_ENDPOINT, PREFILTER, PREFILTER_DROPS, RULE_HITS, TUNNEL_PEERS,
        count, node_flags,
    },
    parse::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, EthHdr},
    policy,
};

/// Why a packet is dropped, and by which prefilter entry or rule (0: none) of which rule
/// set (`policy`, 0 for a prefilter entry).
struct Drop {
    reason: DropReason,
    entry: u32,
    flow: CtKey,
    policy: u32,
}

impl Drop {
    #[inline(always)]
    fn malformed() -> Self {
        Self::new(
            DropReason::Malformed,
            0,
            CtKey::new(IpKey::UNSPECIFIED, IpKey::UNSPECIFIED, 0, 0, 0),
        )
    }

    #[inline(always)]
    fn new(reason: DropReason, entry: u32, flow: CtKey) -> Self {
        Self {
            reason,
            entry,
            flow,
            policy: 0,
        }
    }
}

#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    match check(ctx) {
        Ok(()) => XDP_PASS,
        Err(d) => {
            if d.entry != 0 {
                count(
                    if d.policy == 0 {
                        &PREFILTER_DROPS
                    } else {
                        &RULE_HITS
                    },
                    d.entry,
                );
            }
            // SAFETY: the xdp_md the kernel passed this program.
            let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
            record_xdp_drop(ifindex, &d.flow, d.reason, d.policy, d.entry);
            XDP_DROP
        }
    }
}

/// Returns a pointer to a `T` at `offset` into the packet, if the packet is long enough.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, Drop> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(Drop::malformed());
    }
    Ok((start + offset) as *const T)
}

#[repr(C)]
struct UdpHdr {
    sport_be: u16,
    dport_be: u16,
    len_be: u16,
    check: u16,
}

/// VXLAN header (RFC 7348): flags, reserved bits, the VNI.
const VXLAN_HLEN: usize = 8;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

#[inline(always)]
fn check(ctx: &XdpContext) -> Result<(), Drop> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let datagram = match u16::from_be(unsafe { (*eth).proto_be }) {
        ETH_P_IP => outer_v4(ctx)?,
        ETH_P_IPV6 => outer_v6(ctx)?,
        // ARP, VLAN tags and the rest: not ours to judge here.
        _ => None,
    };
    match datagram {
        Some(d) => tunnel(ctx, &d),
        None => Ok(()),
    }
}

/// A UDP datagram to the tunnel port of one of this node's addresses, over either family.
struct TunnelDatagram {
    saddr: IpKey,
    daddr: IpKey,
    sport_be: u16,
    dport_be: u16,
    /// The UDP header's offset.
    l4: usize,
    /// The datagram continues in other fragments.
    more_fragments: bool,
}

/// Tunnel admission (one copy for both families): only another node may send VXLAN to this
/// one, and the inner packet's source is checked as an outer one would be.
#[inline(always)]
fn tunnel(ctx: &XdpContext, d: &TunnelDatagram) -> Result<(), Drop> {
    // SAFETY: existence check only.
    if unsafe { TUNNEL_PEERS.get(&d.saddr).is_none() } {
        return Err(Drop::new(
            DropReason::TunnelUntrusted,
            0,
            CtKey::new(d.saddr, d.daddr, d.sport_be, d.dport_be, proto::UDP),
        ));
    }
    if d.more_fragments {
        // The inner packet continues in other fragments: `from_tunnel` and `from_network`
        // check it once the kernel has reassembled it.
        return Ok(());
    }
    inner(ctx, d.l4 + size_of::<UdpHdr>() + VXLAN_HLEN)
}

/// The outer IPv4 header's own checks; the datagram to check as a tunnel's, if it is one.
#[inline(always)]
fn outer_v4(ctx: &XdpContext) -> Result<Option<TunnelDatagram>, Drop> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at.
    let (ver_ihl, tot_len, frag_off, p, saddr, daddr) = unsafe {
        (
            (*ip).ver_ihl,
            usize::from(u16::from_be((*ip).tot_len_be)),
            u16::from_be((*ip).frag_off_be),
            (*ip).proto,
            IpKey::from_v4((*ip).saddr),
            IpKey::from_v4((*ip).daddr),
        )
    };
    // At most 60: the verifier sees the bound.
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    // The whole packet: a multi-buffer packet's linear part holds only its first bytes.
    let frame = unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as usize;
    if ver_ihl >> 4 != 4 || ihl < 20 || tot_len < ihl || ETH_HLEN + tot_len > frame {
        return Err(Drop::malformed());
    }
    check_source(saddr, daddr, p)?;
    untracked(
        ctx,
        saddr,
        daddr,
        p,
        ETH_HLEN + ihl,
        frag_off & IP_OFFSET == 0,
    )?;
    if p != proto::UDP || frag_off & IP_OFFSET != 0 {
        // Not UDP, or a later fragment (no UDP header in it).
        return Ok(None);
    }
    let l4 = ETH_HLEN + ihl;
    let udp = ptr_at::<UdpHdr>(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at.
    let (sport_be, dport_be, ulen) = unsafe {
        (
            (*udp).sport_be,
            (*udp).dport_be,
            u16::from_be((*udp).len_be),
        )
    };
    let ulen = usize::from(ulen);
    // The length of a fragmented datagram is that of the whole datagram.
    if ulen < size_of::<UdpHdr>() || (frag_off & IP_MF == 0 && ulen > tot_len - ihl) {
        return Err(Drop::malformed());
    }
    // SAFETY: existence check only.
    if u16::from_be(dport_be) != TUNNEL_PORT || unsafe { HOST_ADDRS.get(&daddr).is_none() } {
        return Ok(None);
    }
    // A VXLAN datagram to this node: the kernel would decapsulate it whoever sent it.
    Ok(Some(TunnelDatagram {
        saddr,
        daddr,
        sport_be,
        dport_be,
        l4,
        more_fragments: frag_off & IP_MF != 0,
    }))
}

/// The IPv6 fixed header's length.
const IPV6_HLEN: usize = 40;

/// The outer IPv6 header: its source, then, when the upper-layer header follows the fixed
/// header directly, the untracked rules and (a VXLAN datagram on an IPv6 underlay) the
/// tunnel's checks. A packet with extension headers is left to TC, which walks them: its
/// untracked rules are not judged, and a VXLAN datagram in it meets `from_tunnel`'s check.
#[inline(always)]
fn outer_v6(ctx: &XdpContext) -> Result<Option<TunnelDatagram>, Drop> {
    let (saddr, daddr, next) = v6_addrs(ctx, ETH_HLEN)?;
    check_source(saddr, daddr, next)?;
    let l4 = ETH_HLEN + IPV6_HLEN;
    let judged = match next {
        proto::TCP | proto::UDP | proto::SCTP => true,
        proto::ICMPV6 => {
            // Neighbour discovery and MLD are the link's machinery, never judged by policy
            // (as in TC).
            let icmp = ptr_at::<[u8; 2]>(ctx, l4)?;
            // SAFETY: bounds checked by ptr_at.
            let icmp_type = unsafe { (*icmp)[0] };
            !matches!(icmp_type, 130..=137 | 143)
        }
        _ => false,
    };
    if judged {
        untracked(ctx, saddr, daddr, next, l4, true)?;
    }
    if next != proto::UDP {
        return Ok(None);
    }
    let udp = ptr_at::<UdpHdr>(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at.
    let (sport_be, dport_be) = unsafe { ((*udp).sport_be, (*udp).dport_be) };
    // SAFETY: existence check only.
    if u16::from_be(dport_be) != TUNNEL_PORT || unsafe { HOST_ADDRS.get(&daddr).is_none() } {
        return Ok(None);
    }
    Ok(Some(TunnelDatagram {
        saddr,
        daddr,
        sport_be,
        dport_be,
        l4,
        more_fragments: false,
    }))
}

/// The inner packet of a VXLAN datagram from another node, whose Ethernet header is at
/// `offset`: its source is checked as an outer one would be.
#[inline(always)]
fn inner(ctx: &XdpContext, offset: usize) -> Result<(), Drop> {
    let eth = ptr_at::<EthHdr>(ctx, offset)?;
    let l3 = offset + ETH_HLEN;
    // SAFETY: bounds checked by ptr_at.
    match u16::from_be(unsafe { (*eth).proto_be }) {
        ETH_P_IP => {
            let ip = ptr_at::<Ipv4Hdr>(ctx, l3)?;
            // SAFETY: bounds checked by ptr_at.
            let (ver_ihl, p, saddr, daddr) = unsafe {
                (
                    (*ip).ver_ihl,
                    (*ip).proto,
                    IpKey::from_v4((*ip).saddr),
                    IpKey::from_v4((*ip).daddr),
                )
            };
            if ver_ihl >> 4 != 4 || ver_ihl & 0x0f < 5 {
                return Err(Drop::malformed());
            }
            check_source(saddr, daddr, p)
        }
        ETH_P_IPV6 => {
            let (saddr, daddr, next) = v6_addrs(ctx, l3)?;
            check_source(saddr, daddr, next)
        }
        _ => Ok(()),
    }
}

/// Source, destination and next header of the IPv6 header at `offset`.
#[inline(always)]
fn v6_addrs(ctx: &XdpContext, offset: usize) -> Result<(IpKey, IpKey, u8), Drop> {
    let ip = ptr_at::<Ipv6Hdr>(ctx, offset)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        Ok((
            IpKey::from_v6((*ip).saddr),
            IpKey::from_v6((*ip).daddr),
            (*ip).next_hdr,
        ))
    }
}

/// The prefilter, then the spoofing check, on a source from the network.
#[inline(always)]
fn check_source(saddr: IpKey, daddr: IpKey, p: u8) -> Result<(), Drop> {
    if let Some(entry) = PREFILTER.get(Key::new(128, saddr)) {
        return Err(Drop::new(
            DropReason::Prefilter,
            entry.id(),
            CtKey::new(saddr, daddr, 0, 0, p),
        ));
    }
    // SAFETY: existence checks only.
    if unsafe { HOST_ADDRS.get(&saddr).is_some() || ENDPOINTS.get(&saddr).is_some() } {
        return Err(Drop::new(
            DropReason::Spoofed,
            0,
            CtKey::new(saddr, daddr, 0, 0, p),
        ));
    }
    Ok(())
}

/// The node's untracked rules, for a packet whose layer-4 header is at `l4` (its ports are
/// there if `first_fragment`).
#[inline(always)]
fn untracked(
    ctx: &XdpContext,
    saddr: IpKey,
    daddr: IpKey,
    p: u8,
    l4: usize,
    first_fragment: bool,
) -> Result<(), Drop> {
    // No untracked rule set installed (the common case): no lookup of the slot.
    if node_flags() & NodeConfig::FLAG_HOST_UNTRACKED == 0 {
        return Ok(());
    }
    let Some(host) = HOST_ENDPOINT.get(EndpointInfo::HOST_UNTRACKED_SLOT) else {
        return Ok(());
    };
    let set = host.ingress_policy();
    // SAFETY: existence check only.
    if set == NOT_ISOLATED || unsafe { HOST_ADDRS.get(&daddr).is_none() } {
        return Ok(());
    }
    let (sport_be, dport_be) = if matches!(p, proto::TCP | proto::UDP | proto::SCTP) {
        if !first_fragment {
            return Ok(());
        }
        // Source and destination port lead all three headers.
        let ports = ptr_at::<[u16; 2]>(ctx, l4)?;
        // SAFETY: bounds checked by ptr_at.
        let (sport_be, dport_be) = unsafe { ((*ports)[0], (*ports)[1]) };
        if host::failsafe(p, u16::from_be(dport_be), u16::from_be(sport_be)) {
            return Ok(());
        }
        (sport_be, dport_be)
    } else {
        (0, 0)
    };
    match policy::check(set, &saddr, p, u16::from_be(dport_be)) {
        // A verdict that names no rule decides nothing here: only Deny rules drop.
        Err(rule) if rule != 0 => Err(Drop {
            reason: DropReason::HostPolicy,
            entry: rule,
            flow: CtKey::new(saddr, daddr, sport_be, dport_be, p),
            policy: set,
        }),
        _ => Ok(()),
    }
}
