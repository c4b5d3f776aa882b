//! `aya::Pod` for every map type: plain old data, no padding left implicit.

use crate::{
    config::NodeConfig,
    conntrack::{CtEntry, CtKey, FragKey, FragPorts},
    endpoint::{EndpointInfo, FailsafeKey, HostAddr},
    event::FlowEvent,
    ip::IpKey,
    policy::{PeerClass, Verdict, VerdictKey},
    prefilter::PrefilterEntry,
    route::{RouteEntry, TunnelPeer},
    service::{AffinityKey, AffinityValue, NatEntry, ServiceKey, ServiceValue, SockRevKey},
};

// SAFETY: all of these are #[repr(C)], contain only integers and byte arrays, and spell out
// their padding as fields, so every bit pattern is valid and none is uninitialised.
unsafe impl aya::Pod for IpKey {}
unsafe impl aya::Pod for EndpointInfo {}
unsafe impl aya::Pod for HostAddr {}
unsafe impl aya::Pod for TunnelPeer {}
unsafe impl aya::Pod for PeerClass {}
unsafe impl aya::Pod for VerdictKey {}
unsafe impl aya::Pod for Verdict {}
unsafe impl aya::Pod for CtKey {}
unsafe impl aya::Pod for CtEntry {}
unsafe impl aya::Pod for FragKey {}
unsafe impl aya::Pod for FragPorts {}
unsafe impl aya::Pod for RouteEntry {}
unsafe impl aya::Pod for NodeConfig {}
unsafe impl aya::Pod for FlowEvent {}
unsafe impl aya::Pod for ServiceKey {}
unsafe impl aya::Pod for ServiceValue {}
unsafe impl aya::Pod for NatEntry {}
unsafe impl aya::Pod for AffinityKey {}
unsafe impl aya::Pod for AffinityValue {}
unsafe impl aya::Pod for SockRevKey {}
unsafe impl aya::Pod for PrefilterEntry {}
unsafe impl aya::Pod for FailsafeKey {}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    /// The kernel and user space must agree on these sizes; a change is an ABI change.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<IpKey>(), 16);
        assert_eq!(size_of::<EndpointInfo>(), 32);
        assert_eq!(size_of::<VerdictKey>(), 12);
        assert_eq!(size_of::<Verdict>(), 8);
        assert_eq!(size_of::<CtKey>(), 40);
        assert_eq!(size_of::<CtEntry>(), 24);
        assert_eq!(size_of::<RouteEntry>(), 24);
        assert_eq!(size_of::<NodeConfig>(), 48);
        assert_eq!(size_of::<FlowEvent>(), 64);
        assert_eq!(size_of::<ServiceKey>(), 24);
        assert_eq!(size_of::<ServiceValue>(), 32);
        assert_eq!(size_of::<NatEntry>(), 44);
        assert_eq!(size_of::<AffinityKey>(), 20);
        assert_eq!(size_of::<AffinityValue>(), 32);
        assert_eq!(size_of::<SockRevKey>(), 32);
        assert_eq!(size_of::<PrefilterEntry>(), 4);
    }

    #[test]
    fn verdict_key_is_big_endian_for_prefix_matching() {
        let k = VerdictKey::new(0x0102_0304, 7, 6, 0x1f90);
        let bytes: &[u8] = unsafe {
            core::slice::from_raw_parts((&k as *const VerdictKey).cast(), size_of::<VerdictKey>())
        };
        assert_eq!(bytes, &[1, 2, 3, 4, 0, 0, 0, 7, 6, 0, 0x1f, 0x90]);
        assert_eq!(k.port(), 8080);
    }

    #[test]
    fn ct_key_reverses() {
        let a = IpKey::from_v4([10, 0, 0, 1]);
        let b = IpKey::from_v4([10, 0, 0, 2]);
        let k = CtKey::new(a, b, 1000u16.to_be(), 80u16.to_be(), 6);
        assert_eq!(k.reversed().reversed(), k);
        assert_eq!(k.reversed().sport(), 80);
        assert_eq!(k.reversed().saddr(), &b);
    }
}
