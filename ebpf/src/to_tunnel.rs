//! TC egress of the VXLAN device (collect-metadata mode): every packet leaving through it —
//! redirected by `from_pod` or routed by the host stack — gets the tunnel key of the node
//! that owns its destination.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use weir_common::event::DropReason;

use crate::{
    events::record_drop,
    maps::node_config,
    parse::{self, L3},
    route,
};

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    let pkt = match parse::parse(ctx) {
        Ok(L3::Ip(pkt)) => pkt,
        _ => return TC_ACT_SHOT,
    };
    match route::set_tunnel_key(ctx, &pkt.daddr, node_config().vni()) {
        Ok(()) => TC_ACT_OK,
        Err(()) => {
            record_drop(ctx, Some(&pkt.ct_key()), DropReason::NoRoute, 0, 0);
            TC_ACT_SHOT
        }
    }
}
