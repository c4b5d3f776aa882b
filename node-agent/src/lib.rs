//! weir's node agent: loads and pins the dataplane, configures pod networking for the CNI
//! plugin, and applies the controller's per-node state to the eBPF maps.

pub mod dataplane;
pub mod maps;
pub mod netlink;
