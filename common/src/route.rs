//! Routes to other nodes' pod CIDRs.

use crate::ip::IpKey;

/// Value of the `ROUTES` LPM trie (key data: [`IpKey`] of a remote pod CIDR).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RouteEntry {
    /// Address of the node that owns the CIDR: next hop or tunnel endpoint.
    node_ip: IpKey,
    mode: u8,
    _pad: [u8; 3],
    /// Interface to send on (the uplink for direct routing, the tunnel device for VXLAN).
    ifindex: u32,
}

impl RouteEntry {
    /// Same L2 segment: redirect to the uplink, resolving the next hop's MAC.
    pub const MODE_DIRECT: u8 = 1;
    /// Across subnets: encapsulate in VXLAN towards `node_ip`.
    pub const MODE_VXLAN: u8 = 2;

    pub const fn new(node_ip: IpKey, mode: u8, ifindex: u32) -> Self {
        Self {
            node_ip,
            mode,
            _pad: [0; 3],
            ifindex,
        }
    }
    pub const fn node_ip(&self) -> &IpKey {
        &self.node_ip
    }
    pub const fn mode(&self) -> u8 {
        self.mode
    }
    pub const fn ifindex(&self) -> u32 {
        self.ifindex
    }
}

/// Value of the `TUNNEL_PEERS` hash map (key: the [`IpKey`] of another node). Encapsulated
/// packets are accepted only from these addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TunnelPeer {
    flags: u32,
}

impl TunnelPeer {
    pub const fn new() -> Self {
        Self { flags: 0 }
    }
}
