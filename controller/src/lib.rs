//! weir's controller: compiles Kubernetes NetworkPolicies into per-node dataplane state.
//!
//! The heart is the [`compiler`], a pure function (no I/O, no clocks) from a [`Cluster`]
//! snapshot to one [`weir_api::NodeState`] per node: the typed store, validation, peers,
//! peer classes, ids, each node's compile, the service table, capacity checks and the
//! reference evaluator ([`compiler::oracle`]). Its semantics are described in
//! `docs/policy-semantics.md`.
//!
//! Around it, the runtime, which does the I/O and imports the compiler (never the other way):
//!
//! * [`source`]: objects from a directory of manifests, as [`source::Change`]s;
//! * [`kube`]: objects from the API server (watchers, relists, the first-compile gate), agent
//!   serving while leading, certificates, TokenReview, node pod-CIDR assignments in a
//!   ConfigMap;
//! * [`run`]: the loop — changes in, compile, check capacities, publish the node states that
//!   changed to the agents;
//! * [`leader`] (Lease election), [`node_cidrs`] (pod CIDRs for nodes), [`events`]
//!   (diagnostics as Kubernetes Events), [`http`] (`/readyz`, `/metrics`);
//! * `synthetic` (feature `synthetic`): generated clusters for measurements.
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

pub mod compiler;
pub mod events;
pub mod http;
pub mod kube;
pub mod leader;
pub mod node_cidrs;
pub mod run;
pub mod source;
#[cfg(feature = "synthetic")]
pub mod synthetic;

// The compiler's front door: what tests, tools and the runtime name most.
pub use compiler::{
    cluster::{Cluster, PodInfo},
    compile::{CompileOutput, Compiler},
    policy::PolicyKey,
    validate::{PolicyDiagnostic, Problem, Severity},
};
