//! Forwarding to other nodes: straight out of the uplink to a node on the same L2 segment,
//! or through the VXLAN device to a node in another subnet.

use aya_ebpf::{
    bindings::{BPF_F_TUNINFO_IPV6, TC_ACT_OK, bpf_redir_neigh, bpf_tunnel_key},
    helpers::generated::{bpf_redirect, bpf_redirect_neigh, bpf_skb_set_tunnel_key},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use weir_common::{TUNNEL_MAC, TUNNEL_SOURCE_MAC, ip::IpKey, route::RouteEntry};

use crate::{forward::set_macs, maps::ROUTES};

const AF_INET: u32 = 2;

#[inline(always)]
pub fn lookup(daddr: &IpKey) -> Option<RouteEntry> {
    ROUTES.get(Key::new(128, *daddr)).copied()
}

/// Sends a packet from a local pod to the node that owns its destination, or up the host
/// stack when no node does (the node itself, its peers' addresses, anything else).
#[inline(always)]
pub fn to_remote(daddr: &IpKey) -> i32 {
    match lookup(daddr) {
        Some(route) => via(&route),
        None => TC_ACT_OK,
    }
}

/// Sends a packet on `route` (from [`lookup`]).
#[inline(always)]
pub fn via(route: &RouteEntry) -> i32 {
    match route.mode() {
        RouteEntry::MODE_DIRECT if route.node_ip().is_v4() => {
            // bpf_redirect_neigh (kernel ≥ 5.10) resolves the next hop's MAC and fills in the
            // Ethernet header itself.
            let mut nh = bpf_redir_neigh {
                nh_family: AF_INET,
                __bindgen_anon_1: unsafe { core::mem::zeroed() },
            };
            nh.__bindgen_anon_1.ipv4_nh = u32::from_ne_bytes(route.node_ip().v4_octets());
            // SAFETY: nh lives on our stack for the duration of the call.
            unsafe {
                bpf_redirect_neigh(
                    route.ifindex(),
                    &mut nh,
                    core::mem::size_of::<bpf_redir_neigh>() as i32,
                    0,
                ) as i32
            }
        }
        RouteEntry::MODE_VXLAN => {
            // The tunnel device's egress program (`to_tunnel`) sets the outer destination and
            // the inner MACs.
            // SAFETY: helper without memory arguments.
            unsafe { bpf_redirect(route.ifindex(), 0) as i32 }
        }
        _ => TC_ACT_OK,
    }
}

/// Sets the VXLAN tunnel key for a packet leaving through the tunnel device. Err if no
/// node owns the destination.
#[inline(always)]
pub fn set_tunnel_key(ctx: &TcContext, daddr: &IpKey, vni: u32) -> Result<(), ()> {
    let route = lookup(daddr).ok_or(())?;
    // The inner frame goes to the receiving tunnel device's (shared) MAC, so the receiver
    // accepts it as its own, from a MAC that is not its own, so it is not taken for a loop.
    set_macs(ctx, TUNNEL_SOURCE_MAC, TUNNEL_MAC)?;
    let node_ip = route.node_ip();
    // SAFETY: all-zero is a valid bpf_tunnel_key.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = vni;
    key.tunnel_ttl = 64;
    let flags = if node_ip.is_v4() {
        // The helper takes the remote IPv4 address in host byte order.
        key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(node_ip.v4_octets());
        0
    } else {
        // An IPv6 underlay: the outer header is IPv6, the address an in6_addr's words.
        key.__bindgen_anon_1.remote_ipv6 = node_ip.words();
        u64::from(BPF_F_TUNINFO_IPV6)
    };
    // SAFETY: key lives on our stack; size matches the struct the kernel expects.
    let r = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &mut key,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            flags,
        )
    };
    if r == 0 { Ok(()) } else { Err(()) }
}
