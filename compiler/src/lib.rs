//! weir's policy compiler: a pure function (no I/O, no clocks, no async runtime, no API
//! client) from a [`Cluster`] snapshot to one [`weir_api::NodeState`] per node. The
//! semantics it implements, and every choice made where Kubernetes leaves one open, are
//! described in `docs/policy-semantics.md`.
//!
//! Everything here takes plain structs and returns plain structs; the runtime around it
//! (the `weir-controller` crate: manifest and Kubernetes sources, leader election, the
//! publishing loop, Events, the HTTP endpoint) feeds it objects and publishes what it
//! returns. This crate depends on none of it, nor on an async runtime or an API client:
//! its inputs are the `k8s-openapi` types and its own CRD types, its output `weir-api`'s.
//!
//! * [`records`]: what the store keeps of a Pod and of a Node. [`changes`]: the store's
//!   journal of what changed since the last compile, which
//!   [`Compiler::compile_changes`](compile::Compiler::compile_changes) recompiles.
//! * [`cluster`]: the typed store (Namespaces, Pods, Nodes, NetworkPolicies,
//!   ClusterNetworkPolicies, Services, EndpointSlices) with its indexes; [`service`] reads
//!   Services and EndpointSlices, and manifest directories derive EndpointSlices from pods
//!   ([`Cluster::derive_endpoint_slices`](cluster::Cluster::derive_endpoint_slices), the
//!   `endpoint_slices` module).
//! * [`validate`]: NetworkPolicy → normalized [`policy::Policy`] plus diagnostics; invalid
//!   policies fail closed. [`cnp`] does the same for ClusterNetworkPolicies. Both read
//!   label selectors ([`selector`], [`labels`]) and check names ([`names`]).
//! * [`compile::Compiler`]: `compile_all` / `compile_node`, with per-node id memory (the
//!   `ids` module) so that successive compiles diff small. Per node (the `node` module):
//!   rule sets, the peers their rules name (the `peers` module), peer classes over them (the
//!   `classes` module), and verdicts, with ClusterNetworkPolicy tiers decided by the `tiers`
//!   module and port ranges as prefixes by [`ports`]. Each node's service table comes from
//!   the `service_table` module.
//! * [`host_policy`]: `HostPolicy`s, the nodes' own firewall, compiled like NetworkPolicies
//!   with the node as one more endpoint.
//! * [`drop_cidrs`]: `DropCIDRSet`s, and the prefilter table every node gets from them.
//! * [`capacity`]: whether a node's compiled state fits its agent's maps.
//! * [`oracle`]: a naive reference evaluator, and the emulated dataplane decision over
//!   compiled state, for tests and debugging tools.
//! * `synthetic` (feature `synthetic`): generated clusters for measurements (the `scale`
//!   example, `cargo xtask bench`).
//!
//! ```
//! use k8s_openapi::api::{core::v1::Pod, networking::v1::NetworkPolicy};
//! use weir_compiler::{Cluster, Compiler};
//!
//! let mut cluster = Cluster::new();
//! let pod: Pod = serde_json::from_value(serde_json::json!({
//!     "metadata": {"name": "db", "namespace": "prod", "labels": {"app": "db"}},
//!     "spec": {"nodeName": "node-1", "containers": []},
//!     "status": {"phase": "Running", "podIPs": [{"ip": "10.0.0.2"}]},
//! }))?;
//! cluster.upsert_pod(&pod)?;
//! let deny: NetworkPolicy = serde_json::from_value(serde_json::json!({
//!     "metadata": {"name": "deny", "namespace": "prod"},
//!     "spec": {"podSelector": {}},
//! }))?;
//! cluster.upsert_policy(&deny)?;
//!
//! let mut compiler = Compiler::new();
//! let out = compiler.compile_all(&cluster);
//! let node = &out.nodes["node-1"];
//! let db = node.endpoints[&weir_api::PodKey::new("prod", "db")];
//! // Isolated for ingress, and nothing allows any peer in.
//! let (action, _) = node.verdict(db.ingress, "10.0.0.9".parse()?, 6, 5432);
//! assert_eq!(action, weir_api::Action::Deny);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod affected;
pub mod capacity;
pub mod changes;
mod classes;
pub mod cluster;
pub mod cnp;
pub mod compile;
pub mod drop_cidrs;
mod endpoint_slices;
pub mod host_policy;
mod ids;
pub mod labels;
pub mod names;
mod node;
pub mod oracle;
mod peers;
pub mod policy;
pub mod ports;
pub mod records;
pub mod selector;
pub mod service;
mod service_table;
mod subjects;
#[cfg(feature = "synthetic")]
pub mod synthetic;
mod tiers;
pub mod validate;

// The front door: what the runtime, tests and tools name most.
pub use changes::Changes;
pub use cluster::{Cluster, PodInfo};
pub use compile::{CompileOutput, Compiler, Update};
pub use policy::PolicyKey;
pub use validate::{PolicyDiagnostic, Problem, Severity};

/// Errors of the compiler's input: objects the store cannot take.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{kind} object has no metadata.name")]
    MissingName { kind: &'static str },
    #[error("{kind} {name:?} has no metadata.namespace")]
    MissingNamespace { kind: &'static str, name: String },
    #[error("the store did not retain the spec of {policy} (use Cluster::retaining_policy_specs)")]
    PolicySpecNotRetained { policy: policy::PolicyKey },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Hash maps keyed by cluster data use a fast seeded hash (the keys are small: ids,
/// addresses, label strings).
pub(crate) type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub(crate) type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
