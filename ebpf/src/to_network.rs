//! TC egress of the node's uplink: what leaves the node. Two things are done here: the
//! reverse translation of NodePort flows whose backend is the node's own stack (a
//! host-network pod): `from_network` handed their packets up the stack with the destination
//! rewritten, and the stack's replies come from the backend's port; they leave from the
//! frontend. And, while a host policy selects the node, the node's own flows are judged by
//! its egress rules and tracked ([`crate::host::egress`]). Every other packet passes untouched, after one `HOST_ADDRS`
//! lookup (and, for the node's own packets, one `SERVICE_NAT` lookup).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};

use crate::{
    host, nat,
    parse::{self, L3},
};

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    let mut pkt = match parse::parse(ctx) {
        Ok(L3::Ip(pkt)) => pkt,
        // Not ours: ARP, and whatever the node sends that weir does not parse.
        _ => return TC_ACT_OK,
    };
    if nat::host_reply(ctx, &mut pkt).is_err() {
        return TC_ACT_SHOT;
    }
    host::egress(ctx, &mut pkt)
}
