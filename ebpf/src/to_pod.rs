//! TC egress of a pod's host-side veth: what the host stack delivers to the pod — traffic
//! from the node itself (always allowed), and from other nodes' pods routed by the kernel.
//! Pods on this node reach each other through `from_pod` and never pass here.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};

use crate::{
    conntrack::enforce,
    events::record_drop,
    maps::ENDPOINTS,
    parse::{self, L3},
};

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    let mut pkt = match parse::parse(ctx) {
        Ok(L3::Ip(pkt)) => pkt,
        // ARP and the like between the host and the pod.
        Ok(L3::Arp | L3::Other) => return TC_ACT_OK,
        Err(reason) => {
            record_drop(ctx, None, reason, 0, 0);
            return TC_ACT_SHOT;
        }
    };
    if pkt.is_link_control(ctx) {
        // Neighbour discovery between the host and the pod: never policy's to judge.
        return TC_ACT_OK;
    }
    // SAFETY: value copied out of the map.
    let Some(dst_ep) = (unsafe { ENDPOINTS.get(&pkt.daddr) }).copied() else {
        // Not addressed to the pod (e.g. broadcast): nothing to enforce.
        return TC_ACT_OK;
    };
    // SAFETY: value copied out of the map.
    let src_ep = unsafe { ENDPOINTS.get(&pkt.saddr) }.copied();
    match enforce(ctx, &mut pkt, src_ep.as_ref(), Some(&dst_ep), 0) {
        Ok(_) => TC_ACT_OK,
        Err(()) => TC_ACT_SHOT,
    }
}
