//! Reachability conformance for weir.
//!
//! A *case file* (format `weir-reachability/v1`, see `cases/upstream-netpol.yaml` in this
//! crate for the upstream Kubernetes NetworkPolicy e2e suite written in it) describes a
//! small cluster model, a sequence of policy and label changes, and the reachability
//! expected after each change. This crate holds everything about such files that does not
//! depend on how the cluster is built:
//!
//! * [`cases`]: the typed model of a case file, its loader and validator, the evaluation of
//!   expectations (`ns/pod` patterns, specificity, self pairs) and `{{ip ns/pod}}`
//!   substitution.
//! * [`runner`]: the [`runner::Driver`] trait a cluster implements, and [`runner::run`], which
//!   plays every case through a driver, probes the full matrix after each step, re-probes
//!   suspicious pairs without turning a real failure into a pass, and prints upstream-style
//!   truth tables for every mismatch.
//! * [`probe`]: the data path: TCP/UDP/SCTP servers and probes that run inside Linux network
//!   namespaces (SCTP in user space over raw sockets, because kernels without SCTP support
//!   must still be able to test SCTP policies).
//! * [`netns`]: a small helper to create named network namespaces and run code inside one.
//!
//! The crate depends on no other weir crate: the local cluster (in `xtask`) implements the
//! driver and uses [`probe`] for its pods.

pub mod cases;
pub mod family;
pub mod netns;
pub mod probe;
pub mod runner;

use std::path::PathBuf;

pub use cases::{CaseFile, Model, PodRef, Protocol, Verdict};
pub use family::{Families, Family};
pub use probe::ProbeOutcome;
pub use runner::{Driver, RunOptions, RunSummary};

/// Where in a case file a problem was found: the case name and the 1-based step number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepLocation {
    /// The case's `name`.
    pub case: String,
    /// 1-based index of the step within the case.
    pub step: usize,
}

impl std::fmt::Display for StepLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "case \"{}\", step {}", self.case, self.step)
    }
}

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The case file could not be read.
    #[error("reading case file {path}: {source}")]
    ReadCaseFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The case file is not YAML of the expected shape (unknown key, wrong type, ...).
    #[error("parsing case file {origin}: {source}")]
    Yaml {
        origin: String,
        source: serde_norway::Error,
    },
    /// The `format` key names a format this crate does not implement.
    #[error("unknown case file format {found:?}, expected {expected:?}")]
    UnknownFormat {
        found: String,
        expected: &'static str,
    },
    /// A list in `model` is empty, has duplicates or holds a name that cannot be used.
    #[error("invalid model: {field} {reason}")]
    InvalidModel { field: &'static str, reason: String },
    /// A protocol name that is not TCP, UDP or SCTP.
    #[error("{location}: unknown protocol {protocol:?} (expected TCP, UDP or SCTP)")]
    UnknownProtocol { location: String, protocol: String },
    /// Two cases share a name, so reports could not tell them apart.
    #[error("duplicate case name {case:?}")]
    DuplicateCase { case: String },
    /// A case has no steps, or a case name is empty.
    #[error("case {case:?}: {reason}")]
    InvalidCase { case: String, reason: &'static str },
    /// A reachability pattern is not `from -> to` with sides `ns/pod`, `ns/*` or `*/*`.
    #[error("{location}: bad pattern {pattern:?}: {reason}")]
    BadPattern {
        location: StepLocation,
        pattern: String,
        reason: String,
    },
    /// An expect block lists a port the model's pods do not serve.
    #[error("{location}: port {port} is not in the model's ports {model_ports:?}")]
    PortNotInModel {
        location: StepLocation,
        port: u16,
        model_ports: Vec<u16>,
    },
    /// An expect block lists a protocol the model's pods do not serve.
    #[error("{location}: protocol {protocol} is not in the model's protocols")]
    ProtocolNotInModel {
        location: StepLocation,
        protocol: Protocol,
    },
    /// A pattern, label change or placeholder names a pod the model does not have.
    #[error("{location}: pod {pod} is not in the model")]
    PodNotInModel { location: StepLocation, pod: String },
    /// A pattern or label change names a namespace the model does not have.
    #[error("{location}: namespace {namespace:?} is not in the model")]
    NamespaceNotInModel {
        location: StepLocation,
        namespace: String,
    },
    /// A deny pattern names a pod to itself, which the format always expects allowed.
    #[error(
        "{location}: deny pattern {pattern:?} names a self pair, which is always expected allowed"
    )]
    SelfPairDenied {
        location: StepLocation,
        pattern: String,
    },
    /// An `apply` entry is not a Kubernetes object with a kind and a name.
    #[error("{location}: apply entry {index}: {reason}")]
    BadObject {
        location: StepLocation,
        index: usize,
        reason: &'static str,
    },
    /// A `{{ ... }}` placeholder that is not `{{ip ns/pod}}`.
    #[error("{location}: bad placeholder {text:?}: {reason}")]
    BadPlaceholder {
        location: StepLocation,
        text: String,
        reason: &'static str,
    },
    /// A `{{ip ns/pod}}` placeholder names a pod whose address is not known.
    #[error("no IP address known for pod {pod} (needed by {{{{ip {pod}}}}})")]
    MissingPodIp { pod: PodRef },
    /// `{{ip external}}` is used but the cluster has no external host.
    #[error("no external host address known (needed by {{{{ip external}}}})")]
    MissingExternalIp,
    /// A `tags` entry `nodes=N` whose N is not a node count.
    #[error("case {case:?}: tag {tag:?} is not nodes=N with N at least 1")]
    BadNodesTag { case: String, tag: String },
    /// A network namespace operation failed.
    #[error("{operation} network namespace {name}: {reason}")]
    Netns {
        operation: &'static str,
        name: String,
        reason: String,
    },
    /// A socket operation for a server or probe failed.
    #[error("{what}: {source}")]
    Socket {
        what: String,
        source: std::io::Error,
    },
    /// Writing the runner's report failed.
    #[error("writing the conformance report: {0}")]
    Output(#[source] std::io::Error),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
