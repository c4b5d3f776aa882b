//! weir's controller: compiles Kubernetes NetworkPolicies into per-node dataplane state.
//!
//! The heart is the [`compile`] module, a pure function (no I/O, no clocks) from a
//! [`Cluster`] snapshot to one [`weir_api::NodeState`] per node. The semantics it implements,
//! and every choice made where Kubernetes leaves one open, are described in
//! `docs/policy-semantics.md`.
//!
//! * [`Cluster`]: the typed store (Namespaces, Pods, Nodes, NetworkPolicies, Services,
//!   EndpointSlices) with its indexes; [`service`] reads Services and EndpointSlices, and
//!   manifest directories derive EndpointSlices from pods ([`Cluster::derive_endpoint_slices`]).
//! * [`validate`]: NetworkPolicy → normalized [`policy::Policy`] plus diagnostics; invalid
//!   policies fail closed.
//! * [`Compiler`]: [`Compiler::compile_all`] / [`Compiler::compile_node`], with per-node id
//!   memory so that successive compiles diff small; each node's service table comes from
//!   the `service_table` module.
//! * [`oracle`]: a naive reference evaluator, and the emulated dataplane decision over
//!   compiled state, for tests and debugging tools.
//!
//! ```
//! use k8s_openapi::api::{core::v1::Pod, networking::v1::NetworkPolicy};
//! use weir_controller::{Cluster, Compiler};
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

pub mod capacity;
mod classes;
pub mod cluster;
pub mod cnp;
pub mod compile;
mod endpoint_slices;
pub mod events;
pub mod http;
mod ids;
pub mod kube;
pub mod labels;
pub mod leader;
pub mod names;
mod node;
pub mod node_cidrs;
pub mod oracle;
mod peers;
pub mod policy;
pub mod ports;
pub mod run;
pub mod selector;
pub mod service;
mod service_table;
pub mod source;
#[cfg(feature = "synthetic")]
pub mod synthetic;
mod tiers;
pub mod validate;

pub use cluster::{Cluster, NamedPort, PodInfo};
pub use compile::{CompileOutput, Compiler};
pub use endpoint_slices::derive as derive_endpoint_slices;
pub use labels::Labels;
pub use policy::{PolicyKey, Protocol};
pub use validate::{PolicyDiagnostic, Problem, Severity};

/// Errors of the controller library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{kind} object has no metadata.name")]
    MissingName { kind: &'static str },
    #[error("{kind} {name:?} has no metadata.namespace")]
    MissingNamespace { kind: &'static str, name: String },
    #[error("the store did not retain the spec of {policy} (use Cluster::retaining_policy_specs)")]
    PolicySpecNotRetained { policy: PolicyKey },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Hash maps keyed by cluster data use a fast seeded hash (the keys are small: ids,
/// addresses, label strings).
pub(crate) type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub(crate) type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
