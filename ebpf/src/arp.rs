//! ARP without a bridge: the host-side veth answers every ARP request of its pod with its
//! own MAC, so the pod's link-local gateway (and anything else it asks for) resolves to the
//! host. The agent also installs a permanent neighbour entry; this covers pods that flush it.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::bpf_redirect,
    programs::TcContext,
};
use weir_common::{event::DropReason, ip::IpKey};

use crate::{
    events::record_drop,
    maps::ENDPOINTS,
    parse::{ETH_HLEN, EthHdr, ptr_at},
};

#[repr(C)]
struct ArpEth {
    htype: u16,
    ptype: u16,
    hlen: u8,
    plen: u8,
    oper_be: u16,
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
}

const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;

/// Handles an ARP packet sent by the pod behind this veth.
#[inline(always)]
pub fn from_pod(ctx: &TcContext) -> i32 {
    let (Ok(eth), Ok(arp)) = (ptr_at::<EthHdr>(ctx, 0), ptr_at::<ArpEth>(ctx, ETH_HLEN)) else {
        record_drop(ctx, None, DropReason::Malformed, 0, 0);
        return TC_ACT_SHOT;
    };
    // SAFETY: bounds checked by ptr_at.
    let (oper, sha, spa, tpa, eth_src) = unsafe {
        (
            u16::from_be((*arp).oper_be),
            (*arp).sha,
            (*arp).spa,
            (*arp).tpa,
            (*eth).src,
        )
    };
    // Only the pod's own address and MAC may speak ARP here (also for gratuitous ARP).
    // SAFETY: value copied out of the map.
    let Some(ep) = (unsafe { ENDPOINTS.get(&IpKey::from_v4(spa)) }).copied() else {
        record_drop(ctx, None, DropReason::Spoofed, 0, 0);
        return TC_ACT_SHOT;
    };
    // SAFETY: context pointer valid for the program's lifetime.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if ep.ifindex() != ifindex || ep.pod_mac() != sha || ep.pod_mac() != eth_src {
        record_drop(ctx, None, DropReason::Spoofed, 0, 0);
        return TC_ACT_SHOT;
    }
    if oper != ARP_REQUEST || tpa == spa {
        // Replies to the host and gratuitous announcements go to the host stack.
        return TC_ACT_OK as i32;
    }
    let gw = ep.gateway_mac();
    // SAFETY: bounds checked by ptr_at; TC programs may write packet data directly.
    unsafe {
        (*arp).oper_be = ARP_REPLY.to_be();
        (*arp).tha = sha;
        (*arp).tpa = spa;
        (*arp).sha = gw;
        (*arp).spa = tpa;
        (*eth).dst = sha;
        (*eth).src = gw;
    }
    // Out of the same veth, back to the pod.
    // SAFETY: helper without memory arguments.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}
