//! TC ingress of the node's uplink (and, through `from_tunnel`, of its VXLAN device): traffic
//! from other nodes. Packets for a pod on this node get its ingress policy and are handed
//! straight to the pod; everything else (the node's own traffic) goes up the host stack.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use weir_common::event::DropReason;

use crate::{
    conntrack::enforce,
    events::record_drop,
    forward,
    maps::{ENDPOINTS, HOST_ADDRS},
    parse::{self, L3},
};

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    let pkt = match parse::parse(ctx) {
        Ok(L3::Ip(pkt)) => pkt,
        // Not ours to judge: ARP, malformed frames and the like are the host's business.
        _ => return TC_ACT_OK,
    };
    // No packet from the network may claim this node's addresses (the node-to-pod policy
    // exemption is keyed on them) or a local pod's (those come only from the pod's veth).
    // This is what the kernel's martian-source and strict reverse-path checks would do; a
    // redirect into a pod bypasses them, so they are done here, for every packet.
    // SAFETY: existence checks only.
    if unsafe { HOST_ADDRS.get(&pkt.saddr).is_some() || ENDPOINTS.get(&pkt.saddr).is_some() } {
        record_drop(ctx, Some(&pkt.ct_key()), DropReason::Spoofed, 0, 0);
        return TC_ACT_SHOT;
    }
    // SAFETY: value copied out of the map.
    let Some(dst_ep) = (unsafe { ENDPOINTS.get(&pkt.daddr) }).copied() else {
        return TC_ACT_OK;
    };
    match enforce(ctx, &pkt, None, Some(&dst_ep), 0) {
        Ok(()) => forward::to_local_pod(ctx, &dst_ep),
        Err(()) => TC_ACT_SHOT,
    }
}
