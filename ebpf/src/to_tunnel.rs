//! TC egress of the VXLAN device (collect-metadata mode): every packet leaving through it —
//! redirected by `from_pod` or routed by the host stack — gets the tunnel key of the node
//! that owns its destination. A reply of the node's own stack to a NodePort flow it served
//! (a host-network backend, for a pod of another node) is first translated back, as on the
//! uplink (`to_network`), and the node's own packets meet its host policy's egress rules
//! ([`crate::host::egress`]) by their inner addresses.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use weir_common::event::DropReason;

use crate::{
    events::record_drop,
    host,
    maps::node_config,
    nat,
    parse::{self, L3},
    route,
};

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    let mut pkt = match parse::parse(ctx) {
        Ok(L3::Ip(pkt)) => pkt,
        _ => return TC_ACT_SHOT,
    };
    if nat::host_reply(ctx, &mut pkt).is_err() {
        return TC_ACT_SHOT;
    }
    if host::egress(ctx, &mut pkt) != TC_ACT_OK {
        return TC_ACT_SHOT;
    }
    match route::set_tunnel_key(ctx, &pkt.daddr, node_config().vni()) {
        Ok(()) => TC_ACT_OK,
        Err(()) => {
            record_drop(ctx, Some(&pkt.ct_key()), DropReason::NoRoute, 0, 0);
            TC_ACT_SHOT
        }
    }
}
