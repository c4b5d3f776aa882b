//! weir's node agent: loads and pins the dataplane, configures pod networking for the CNI
//! plugin, and applies the controller's per-node state to the eBPF maps.

pub mod agent;
pub mod bootstrap;
pub mod bpffs;
pub mod cni_service;
pub mod controller_link;
pub mod controller_service;
pub mod dataplane;
pub mod endpoints;
pub mod failsafe;
pub mod host_ports;
pub mod http;
pub mod install_cni;
pub mod maps;
pub mod masquerade;
pub mod netlink;
pub mod observe;
pub mod podnet;
pub mod prefilter;
pub mod renumber;
pub mod routing;
pub mod services;
pub mod sockets;

/// Bytes VXLAN adds to a packet (outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8); pod MTUs
/// leave room for it so that encapsulated traffic never needs fragmenting.
pub const VXLAN_OVERHEAD: u32 = 50;
