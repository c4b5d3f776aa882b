//! Delivery without the host stack.

use aya_ebpf::{bindings::TC_ACT_SHOT, helpers::generated::bpf_redirect_peer, programs::TcContext};
use weir_common::endpoint::EndpointInfo;

use crate::parse::{EthHdr, eth};

/// Rewrites the Ethernet header to gateway → pod and hands the packet straight to the
/// pod's interface inside its namespace. `bpf_redirect_peer` (kernel ≥ 5.10) only works
/// from TC ingress, and it skips the destination veth's TC egress hook, so callers must
/// have enforced the destination's ingress policy already.
#[inline(always)]
pub fn to_local_pod(ctx: &TcContext, dst: &EndpointInfo) -> i32 {
    if set_macs(ctx, dst.gateway_mac(), dst.pod_mac()).is_err() {
        return TC_ACT_SHOT;
    }
    // SAFETY: helper without memory arguments; the ifindex comes from our own map.
    unsafe { bpf_redirect_peer(dst.ifindex(), 0) as i32 }
}

#[inline(always)]
pub fn set_macs(ctx: &TcContext, src: [u8; 6], dst: [u8; 6]) -> Result<(), ()> {
    let eth: *mut EthHdr = eth(ctx).map_err(|_| ())?;
    // SAFETY: bounds checked by ptr_at; TC programs may write packet data directly.
    unsafe {
        (*eth).src = src;
        (*eth).dst = dst;
    }
    Ok(())
}
