//! Host policy: the node's own addresses as a policy endpoint (`HOST_ENDPOINT`), stateful in
//! TC on the uplink. `from_network` judges new flows from the network to the node with the
//! node's `HostPolicy` rule set, after the failsafe ports (`FAILSAFE`), which no policy
//! closes; `to_network` records the node's own flows in conntrack so that their replies
//! are let in. Nothing runs while no host policy selects the node.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use weir_common::{endpoint::FailsafeKey, policy::NOT_ISOLATED};

use crate::{
    conntrack::enforce,
    maps::{FAILSAFE, HOST_ADDRS, HOST_ENDPOINT},
    parse::Packet,
};

/// A packet from the network to one of the node's own addresses (not a Service's): pass or
/// drop by the node's host policy.
#[inline(always)]
pub fn ingress(ctx: &TcContext, pkt: &mut Packet) -> i32 {
    let Some(host) = HOST_ENDPOINT.get(0).copied() else {
        return TC_ACT_OK;
    };
    if host.ingress_policy() == NOT_ISOLATED {
        return TC_ACT_OK;
    }
    let dport = FailsafeKey::new(pkt.proto, u16::from_be(pkt.dport_be), true);
    let sport = FailsafeKey::new(pkt.proto, u16::from_be(pkt.sport_be), false);
    // SAFETY: existence checks only.
    if unsafe { FAILSAFE.get(&dport).is_some() || FAILSAFE.get(&sport).is_some() } {
        return TC_ACT_OK;
    }
    match enforce(ctx, pkt, None, Some(&host), 0) {
        Ok(_) => TC_ACT_OK,
        Err(()) => TC_ACT_SHOT,
    }
}

/// On the uplink's egress (`to_network`): the node's own packets (not forwarded or
/// redirected ones) open or refresh their flow's conntrack entry while a host policy
/// isolates the node.
#[inline(always)]
pub fn track(ctx: &TcContext, pkt: &mut Packet) {
    let Some(host) = HOST_ENDPOINT.get(0).copied() else {
        return;
    };
    if host.ingress_policy() == NOT_ISOLATED {
        return;
    }
    // Locally generated: no interface received it.
    // SAFETY: reading a field of the socket buffer the program was given.
    if unsafe { (*ctx.skb.skb).ingress_ifindex } != 0 {
        return;
    }
    // SAFETY: existence check only.
    if unsafe { HOST_ADDRS.get(&pkt.saddr).is_none() } {
        return;
    }
    // The node's egress is not isolated: this only records the flow. A full table refuses
    // nothing here (the packet leaves; its replies then meet the host policy as new flows).
    let _ = enforce(ctx, pkt, Some(&host), None, 0);
}
