//! Delivery without the host stack.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH, TC_ACT_SHOT, bpf_fib_lookup,
        bpf_redir_neigh,
    },
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use weir_common::{endpoint::EndpointInfo, ip::IpKey};

use crate::{
    maps::SCRATCH_FIB,
    parse::{EthHdr, eth},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

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

/// Sends a packet whose source weir rewrote to one of the node's own addresses (a NodePort
/// flow's reply) out of the interface the node's routing table picks for `daddr`, as the
/// node itself would send it. The host stack cannot take such a packet: a packet arriving
/// with one of the node's addresses as its source is a martian. Both families.
#[inline(always)]
pub fn by_fib(ctx: &TcContext, saddr: &IpKey, daddr: &IpKey) -> i32 {
    let Some(params) = SCRATCH_FIB.get_ptr_mut(0) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: per-CPU scratch value, used by this program run alone.
    let params = unsafe { &mut *params };
    // SAFETY: all-zero is a valid bpf_fib_lookup.
    *params = unsafe { core::mem::zeroed() };
    let v4 = daddr.is_v4();
    // SAFETY: context pointer valid for the program's lifetime.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if v4 {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = saddr.v4_word();
        params.__bindgen_anon_4.ipv4_dst = daddr.v4_word();
    } else {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = saddr.words();
        params.__bindgen_anon_4.ipv6_dst = daddr.words();
    }
    // SAFETY: params points to per-CPU map memory of the size passed.
    let r = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    if r != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return TC_ACT_SHOT;
    }
    // The lookup leaves the next hop (the gateway, or the destination itself) in the
    // destination field; bpf_redirect_neigh resolves its MAC and fills in the Ethernet
    // header.
    let mut nh = bpf_redir_neigh {
        nh_family: u32::from(if v4 { AF_INET } else { AF_INET6 }),
        // SAFETY: all-zero is a valid union value.
        __bindgen_anon_1: unsafe { core::mem::zeroed() },
    };
    if v4 {
        // SAFETY: written by the lookup above for an IPv4 family.
        nh.__bindgen_anon_1.ipv4_nh = unsafe { params.__bindgen_anon_4.ipv4_dst };
    } else {
        // SAFETY: written by the lookup above for an IPv6 family.
        nh.__bindgen_anon_1.ipv6_nh = unsafe { params.__bindgen_anon_4.ipv6_dst };
    }
    // SAFETY: nh lives on our stack for the duration of the call.
    unsafe {
        bpf_redirect_neigh(
            params.ifindex,
            &mut nh,
            core::mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        ) as i32
    }
}
