//! weir's controller: compiles Kubernetes NetworkPolicies into per-node dataplane state.
//!
//! The heart is the policy compiler, its own crate ([`weir_compiler`], re-exported here as
//! [`compiler`]): a pure function (no I/O, no clocks) from a [`Cluster`] snapshot to one
//! [`weir_api::NodeState`] per node. This crate is the runtime around it, which does the I/O
//! and imports the compiler (never the other way):
//!
//! * [`source`]: objects from a directory of manifests, as [`source::Change`]s;
//! * [`kube`]: objects from the API server (watchers, relists, the first-compile gate), agent
//!   serving while leading, certificates, TokenReview, node pod-CIDR assignments in a
//!   ConfigMap;
//! * [`run`]: the loop — changes in, compile, check capacities, publish the node states that
//!   changed to the agents;
//! * [`leader`] (Lease election), [`node_cidrs`] (pod CIDRs for nodes), [`events`]
//!   (diagnostics as Kubernetes Events), [`http`] (`/readyz`, `/metrics`).

pub mod events;
pub mod http;
pub mod kube;
pub mod leader;
pub mod node_cidrs;
pub mod run;
pub mod source;

// The compiler, under the path it had while it was a module of this crate, and its front
// door (what the runtime, tests and tools name most).
pub use weir_compiler::{
    self as compiler, Cluster, CompileOutput, Compiler, PodInfo, PolicyDiagnostic, PolicyKey,
    Problem, Severity,
};
