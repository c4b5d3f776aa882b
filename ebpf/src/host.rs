//! Host policy: the node's own addresses as a policy endpoint (`HOST_ENDPOINT`), stateful in
//! TC on the uplink. `from_network` judges new flows from the network to the node with the
//! node's ingress rule set; `to_network` (and `to_tunnel`, for the node's packets to pods of
//! other nodes) judges the node's own new flows with its egress rule set, and records them
//! in conntrack so that their replies are let in. The failsafe ports (`FAILSAFE`) come
//! first: no policy closes them. Nothing runs while no host policy selects the node. The
//! untracked rules are the XDP program's (see [`crate::xdp`]).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use weir_common::{
    endpoint::{EndpointInfo, FailsafeKey},
    policy::NOT_ISOLATED,
};

use crate::{
    conntrack::enforce,
    maps::{FAILSAFE, HOST_ADDRS, HOST_ENDPOINT},
    parse::Packet,
};

/// The node's host-policy endpoint, if a host policy isolates it in some direction.
#[inline(always)]
fn endpoint() -> Option<EndpointInfo> {
    let host = HOST_ENDPOINT.get(EndpointInfo::HOST_SLOT).copied()?;
    (host.ingress_policy() != NOT_ISOLATED || host.egress_policy() != NOT_ISOLATED).then_some(host)
}

/// Is the packet on a failsafe port: to one of the node's `local` ports (inbound entries) or
/// to a `remote` one (outbound entries)?
#[inline(always)]
pub fn failsafe(proto: u8, local_port: u16, remote_port: u16) -> bool {
    let local = FailsafeKey::new(proto, local_port, true);
    let remote = FailsafeKey::new(proto, remote_port, false);
    // SAFETY: existence checks only.
    unsafe { FAILSAFE.get(&local).is_some() || FAILSAFE.get(&remote).is_some() }
}

/// A packet from the network to one of the node's own addresses (not a Service's): pass or
/// drop by the node's host policy. Recorded in conntrack whenever a host policy isolates
/// the node in either direction, so that the node's replies pass its egress rules.
#[inline(always)]
pub fn ingress(ctx: &TcContext, pkt: &mut Packet) -> i32 {
    let Some(host) = endpoint() else {
        return TC_ACT_OK;
    };
    // Neighbour discovery is the link's machinery, not a flow: no policy judges it.
    if pkt.is_link_control(ctx) {
        return TC_ACT_OK;
    }
    let (dport, sport) = (u16::from_be(pkt.dport_be), u16::from_be(pkt.sport_be));
    if host.ingress_policy() != NOT_ISOLATED && failsafe(pkt.proto, dport, sport) {
        return TC_ACT_OK;
    }
    match enforce(ctx, pkt, None, Some(&host), 0) {
        Ok(_) => TC_ACT_OK,
        Err(()) => TC_ACT_SHOT,
    }
}

/// The node's own packets (not forwarded or redirected ones) leaving it (`to_network`,
/// `to_tunnel`): pass or drop by the node's egress rule set, through conntrack, while a host
/// policy isolates the node in either direction.
#[inline(always)]
pub fn egress(ctx: &TcContext, pkt: &mut Packet) -> i32 {
    let Some(host) = endpoint() else {
        return TC_ACT_OK;
    };
    if pkt.is_link_control(ctx) {
        return TC_ACT_OK;
    }
    // Locally generated: no interface received it.
    // SAFETY: reading a field of the socket buffer the program was given.
    if unsafe { (*ctx.skb.skb).ingress_ifindex } != 0 {
        return TC_ACT_OK;
    }
    // SAFETY: existence check only.
    if unsafe { HOST_ADDRS.get(&pkt.saddr).is_none() } {
        return TC_ACT_OK;
    }
    let (sport, dport) = (u16::from_be(pkt.sport_be), u16::from_be(pkt.dport_be));
    if host.egress_policy() != NOT_ISOLATED && failsafe(pkt.proto, sport, dport) {
        return TC_ACT_OK;
    }
    match enforce(ctx, pkt, Some(&host), None, 0) {
        Ok(_) => TC_ACT_OK,
        // Egress not isolated, the flow only recorded: a full table refuses nothing here
        // (the packet leaves; its replies then meet the host policy as new flows).
        Err(()) if host.egress_policy() == NOT_ISOLATED => TC_ACT_OK,
        Err(()) => TC_ACT_SHOT,
    }
}
