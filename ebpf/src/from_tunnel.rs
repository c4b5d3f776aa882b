//! TC ingress of the VXLAN device. The device is in collect-metadata mode, so the kernel
//! decapsulates UDP 4789 from any sender; only other nodes may use it. The inner packet
//! then takes the uplink's path (`from_network`).

use aya_ebpf::{
    bindings::{BPF_F_TUNINFO_IPV6, TC_ACT_SHOT, bpf_tunnel_key},
    helpers::generated::bpf_skb_get_tunnel_key,
    programs::TcContext,
};
use weir_common::{conntrack::CtKey, event::DropReason, ip::IpKey};

use crate::{
    events::record_drop,
    from_network,
    maps::{SCRATCH_KEYS, SCRATCH_TUNNEL_KEY, TUNNEL_PEERS},
};

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    let peer = outer_source(ctx);
    // SAFETY: existence check only.
    if peer.is_some_and(|p| unsafe { TUNNEL_PEERS.get(&p).is_some() }) {
        return from_network::run(ctx);
    }
    // The event names the outer sender: that is who to look for. The key goes to per-CPU
    // scratch space, as `from_network`'s path leaves the stack no room for it.
    if let Some(flow) = SCRATCH_KEYS.get_ptr_mut(0) {
        // SAFETY: per-CPU scratch value, used by this program run alone.
        let flow = unsafe { &mut *flow };
        *flow = CtKey::new(
            peer.unwrap_or(IpKey::UNSPECIFIED),
            IpKey::UNSPECIFIED,
            0,
            0,
            0,
        );
        record_drop(ctx, Some(flow), DropReason::UnknownTunnelPeer, 0, 0);
    }
    TC_ACT_SHOT
}

/// The outer source of a decapsulated packet (IPv4 or, on an IPv6 underlay, IPv6); None
/// without tunnel metadata (then nothing says who sent it, so it is not trusted either).
#[inline(always)]
fn outer_source(ctx: &TcContext) -> Option<IpKey> {
    let key: *mut bpf_tunnel_key = SCRATCH_TUNNEL_KEY.get_ptr_mut(0)?;
    let get = |flags: u64| {
        // SAFETY: per-CPU scratch value; its size is the struct the kernel expects.
        unsafe {
            bpf_skb_get_tunnel_key(
                ctx.skb.skb,
                key,
                core::mem::size_of::<bpf_tunnel_key>() as u32,
                flags,
            )
        }
    };
    if get(0) == 0 {
        // SAFETY: without BPF_F_TUNINFO_IPV6 the kernel fills in the IPv4 member, in host
        // byte order.
        let remote = unsafe { (*key).__bindgen_anon_1.remote_ipv4 };
        return Some(IpKey::from_v4(remote.to_be_bytes()));
    }
    // The kernel refuses the IPv4 form for metadata of an IPv6 outer header (and the other
    // way round).
    if get(u64::from(BPF_F_TUNINFO_IPV6)) == 0 {
        // SAFETY: with BPF_F_TUNINFO_IPV6 the kernel fills in the IPv6 member, an in6_addr.
        let remote = unsafe { (*key).__bindgen_anon_1.remote_ipv6 };
        return Some(IpKey::from_words(remote));
    }
    None
}
