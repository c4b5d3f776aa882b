//! A weir cluster on one Linux machine: network namespaces as nodes and pods, the real
//! agent on every node, pods created through the real CNI plugin. Used by `cargo xtask
//! up/demo/conformance` and by the end-to-end tests.

pub mod chaos;
pub mod cluster;
pub mod conformance;
pub mod netns;
pub mod oci;
pub mod record;

pub use cluster::{
    AGENT_HTTP_PORT, ClusterOptions, EXTERNAL_IP, ExternalHost, LocalCluster, Node, Pod, PodSpec,
    Topology,
};
