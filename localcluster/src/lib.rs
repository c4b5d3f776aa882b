//! A weir cluster on one Linux machine: network namespaces as nodes and pods, the real
//! agent on every node, pods created through the real CNI plugin, either called directly or
//! by a containerd per node whose CRI starts pods as real containers ([`containerd`]). Used
//! by `cargo xtask up/demo/conformance` and by the end-to-end tests.

pub mod chaos;
pub mod cluster;
pub mod conformance;
pub mod containerd;
pub mod elf;
pub mod http;
pub mod netns;
pub mod oci;
pub mod record;

pub use cluster::{
    AGENT_HTTP_PORT, ClusterOptions, EXTERNAL_IP, ExternalHost, IpFamily, LocalCluster, Node, Pod,
    PodSpec, Topology,
};
pub use containerd::Runtime;
