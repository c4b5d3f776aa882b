//! TC ingress of the node's uplink (and, through `from_tunnel`, of its VXLAN device): traffic
//! from other nodes. Packets for a pod on this node get its ingress policy and are handed
//! straight to the pod. A packet to one of the node's own addresses on a NodePort is
//! translated to a backend (on this node: as above; on another: sent on with this node's
//! address as its source), and the replies of the latter are translated back and sent to
//! the client; a backend on the node's own address (a host-network pod) gets it up the host
//! stack, whose replies `to_network` translates back. Everything else (the node's own
//! traffic) goes up the host stack.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use weir_common::{config::NodeConfig, conntrack::CtEntry, event::DropReason};

use crate::{
    conntrack::enforce,
    events::record_drop,
    forward, host,
    maps::{ENDPOINTS, HOST_ADDRS, node_config},
    nat::{self, Inbound},
    parse::{self, L3},
    route,
};

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    let mut pkt = match parse::parse(ctx) {
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
    let flags = node_config().flags();
    if flags & NodeConfig::FLAG_HOST_PATH != 0 {
        // Another proxy translates in the host's netfilter: the host routes every packet;
        // a pod's ingress rules are enforced on its veth (`to_pod`).
        return TC_ACT_OK;
    }
    // SAFETY: value copied out of the map.
    let mut dst_ep = (unsafe { ENDPOINTS.get(&pkt.daddr) }).copied();
    let host_addr_frontends = flags & NodeConfig::FLAG_HOST_ADDR_FRONTENDS != 0;
    let mut flags = 0;
    // SAFETY: existence check only.
    if dst_ep.is_none() && unsafe { HOST_ADDRS.get(&pkt.daddr).is_some() } {
        match nat::inbound(ctx, &mut pkt, host_addr_frontends) {
            Ok(Inbound::Pass) => return host::ingress(ctx, &mut pkt),
            Ok(Inbound::ReplyToClient) => return forward::by_fib(ctx, &pkt.saddr, &pkt.daddr),
            Ok(Inbound::ToRemoteBackend) => return to_remote_backend(ctx, &pkt),
            // A backend on the node's own stack (a host-network pod): its replies are
            // translated back as they leave the node (`to_network`, `to_tunnel`).
            Ok(Inbound::ToHost) => return TC_ACT_OK,
            Ok(Inbound::ToBackend) => {
                flags = CtEntry::FLAG_SERVICE;
                // SAFETY: value copied out of the map.
                dst_ep = (unsafe { ENDPOINTS.get(&pkt.daddr) }).copied();
            }
            Err(()) => return TC_ACT_SHOT,
        }
    }
    let Some(dst_ep) = dst_ep else {
        return TC_ACT_OK;
    };
    match enforce(ctx, &mut pkt, None, Some(&dst_ep), flags) {
        Ok(_) => forward::to_local_pod(ctx, &dst_ep),
        Err(()) => TC_ACT_SHOT,
    }
}

/// A NodePort flow on its way to a backend on another node, with this node's address as
/// its source: the backend's node enforces the backend's ingress rules.
#[inline(always)]
fn to_remote_backend(ctx: &TcContext, pkt: &parse::Packet) -> i32 {
    if route::lookup(&pkt.daddr).is_some() {
        route::to_remote(&pkt.daddr)
    } else {
        // A backend outside the pod network (a host-network pod on another node).
        forward::by_fib(ctx, &pkt.saddr, &pkt.daddr)
    }
}
