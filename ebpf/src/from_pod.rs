//! TC ingress of a pod's host-side veth: everything the pod sends.
//!
//! Order: ARP is answered here, IPv6 neighbour discovery goes to the host; the source must be the pod's own address and MAC; a packet
//! to a Service frontend is translated to its backend (a pod that is its own backend gets
//! its packet back at once, from the frontend's address); then conntrack and policy (the
//! pod's egress rules, and the destination's ingress rules when it is a pod on this node);
//! then delivery: straight into a local pod, to the node that owns the destination, out of
//! the node for a NodePort reply, or up the host stack.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use weir_common::{conntrack::CtEntry, event::DropReason};

use crate::{
    arp,
    conntrack::enforce,
    events::record_drop,
    forward,
    maps::{ENDPOINTS, node_config},
    nat::{self, Translated},
    parse::{self, L3},
    reject, route,
};

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    let mut pkt = match parse::parse(ctx) {
        Ok(L3::Ip(pkt)) => pkt,
        Ok(L3::Arp) => return arp::from_pod(ctx),
        Ok(L3::Other) => return drop(ctx, DropReason::UnsupportedL3),
        Err(reason) => return drop(ctx, reason),
    };
    if pkt.is_link_control(ctx) {
        return link_control(ctx, &pkt);
    }
    // Anti-spoofing: the source address must belong to the pod behind this very veth,
    // and the frame must come from that pod's MAC.
    // SAFETY: value copied out of the map.
    let Some(src_ep) = (unsafe { ENDPOINTS.get(&pkt.saddr) }).copied() else {
        return drop(ctx, DropReason::Spoofed);
    };
    // SAFETY: context pointer valid for the program's lifetime.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Ok(eth) = parse::eth(ctx) else {
        return drop(ctx, DropReason::Malformed);
    };
    // SAFETY: bounds checked by parse::eth.
    let eth_src = unsafe { (*eth).src };
    if src_ep.ifindex() != ifindex || src_ep.pod_mac() != eth_src {
        return drop(ctx, DropReason::Spoofed);
    }
    // A Service's frontend becomes the flow's backend here, before policy: the pod's egress
    // rules and the backend's ingress rules judge the translated flow, as Kubernetes requires.
    let flags = match nat::translate(ctx, &mut pkt) {
        Ok(Translated::No) => 0,
        Ok(Translated::Yes) => CtEntry::FLAG_SERVICE,
        // A pod reaching itself through a Service is not subject to policy, any more than
        // its traffic over loopback is.
        Ok(Translated::Hairpin) => return forward::to_local_pod(ctx, &src_ep),
        // Nothing serves the Service here: answer as a closed port would, at once.
        Err(DropReason::NoBackend) => return reject::refuse(ctx, &pkt, &src_ep),
        Err(_) => return TC_ACT_SHOT,
    };
    // SAFETY: value copied out of the map.
    let dst_ep = unsafe { ENDPOINTS.get(&pkt.daddr) }.copied();
    let route = match dst_ep {
        Some(_) => None,
        None => route::lookup(&pkt.daddr),
    };
    if dst_ep.is_none() && route.is_none() {
        // Neither a pod here nor one elsewhere: maybe the reply of a hairpin flow.
        match nat::hairpin_reply(ctx, &mut pkt) {
            Ok(true) => return forward::to_local_pod(ctx, &src_ep),
            Ok(false) => {}
            Err(()) => return TC_ACT_SHOT,
        }
    }
    let Ok(reversed) = enforce(ctx, &mut pkt, Some(&src_ep), dst_ep.as_ref(), flags) else {
        return TC_ACT_SHOT;
    };
    if node_config().host_path() {
        // Another proxy translates in the host's netfilter: the host routes (and sees) every
        // packet; a local destination's ingress rules are enforced on its veth (`to_pod`).
        return TC_ACT_OK;
    }
    match (dst_ep, route) {
        (Some(dst), _) => forward::to_local_pod(ctx, &dst),
        (None, Some(route)) => route::via(&route),
        // A NodePort reply to a client outside the pod network now comes from one of this
        // node's addresses, which the host stack would take for a martian.
        (None, None) if reversed => forward::by_fib(ctx, &pkt.saddr, &pkt.daddr),
        (None, None) => TC_ACT_OK,
    }
}

/// IPv6 neighbour and multicast listener discovery from the pod goes to the host stack,
/// which answers for the pod's gateway (`fe80::1` on the host side of every pod's veth),
/// never to policy. It may come from a link-local or the unspecified address (duplicate
/// address detection), or from one of the pod's own addresses — nothing else. A pod never
/// advertises itself as a router nor redirects the node.
#[inline(always)]
fn link_control(ctx: &TcContext, pkt: &parse::Packet) -> i32 {
    if matches!(
        pkt.icmpv6_type(ctx),
        Some(parse::ICMPV6_ROUTER_ADVERTISEMENT | parse::ICMPV6_REDIRECT)
    ) {
        return drop(ctx, DropReason::Spoofed);
    }
    if pkt.saddr.is_v6_link_local() || pkt.saddr.is_unspecified() {
        return TC_ACT_OK;
    }
    // SAFETY: value copied out of the map; context pointer valid for the program's lifetime.
    let (ep, ifindex) = unsafe { (ENDPOINTS.get(&pkt.saddr).copied(), (*ctx.skb.skb).ifindex) };
    match ep {
        Some(ep) if ep.ifindex() == ifindex => TC_ACT_OK,
        _ => drop(ctx, DropReason::Spoofed),
    }
}

#[inline(always)]
fn drop(ctx: &TcContext, reason: DropReason) -> i32 {
    record_drop(ctx, None, reason, 0, 0);
    TC_ACT_SHOT
}
