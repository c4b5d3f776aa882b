//! The `weir-reachability/v1` case file: typed model, loader, validator and the evaluation
//! of expectations.
//!
//! The format is specified in the repository's conformance `FORMAT.md`; the rules that
//! matter for evaluation are restated on the items that implement them. Loading happens in
//! two stages: serde reads the YAML into loosely typed `raw` structs (so a typo in a key is
//! rejected with a line number), then the checks in [`CaseFile::parse`] turn them into the
//! public types, with errors that name the case and the step.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Result, StepLocation};

/// The only format this crate reads.
pub const FORMAT: &str = "weir-reachability/v1";

/// Label key every model namespace carries with its own name. Kubernetes sets it on every
/// namespace and it is immutable
/// (<https://kubernetes.io/docs/reference/labels-annotations-taints/#kubernetes-io-metadata-name>),
/// so label changes in a case never remove it.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Labels of a pod or namespace.
pub type Labels = BTreeMap<String, String>;

/// A transport protocol the model's pods serve, spelled as in Kubernetes
/// (`core/v1 Protocol`: `TCP`, `UDP`, `SCTP`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    /// Every protocol, in the order the upstream suite lists them.
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The Kubernetes spelling (`TCP`, `UDP`, `SCTP`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// The IP protocol number (IANA "Assigned Internet Protocol Numbers").
    pub fn ip_protocol(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = ();

    /// Parses the Kubernetes spelling; case matters, as in the Kubernetes API.
    fn from_str(text: &str) -> Result<Self, ()> {
        Protocol::ALL
            .into_iter()
            .find(|protocol| protocol.as_str() == text)
            .ok_or(())
    }
}

/// How the local cluster joins its nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Topology {
    /// All nodes share one L2 segment.
    L2,
    /// Nodes sit on two subnets joined by a router, so cross-subnet pod traffic is
    /// encapsulated.
    Routed,
}

impl FromStr for Topology {
    type Err = ();

    fn from_str(text: &str) -> Result<Self, ()> {
        match text {
            "l2" => Ok(Topology::L2),
            "routed" => Ok(Topology::Routed),
            _ => Err(()),
        }
    }
}

/// One pod of the model, `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl PodRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        PodRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for PodRef {
    type Err = &'static str;

    /// Parses `ns/pod`; neither side may be empty or `*`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (namespace, name) = text.split_once('/').ok_or("expected namespace/pod")?;
        if !is_model_name(namespace) || !is_model_name(name) {
            return Err("expected namespace/pod with non-empty names");
        }
        Ok(PodRef::new(namespace, name))
    }
}

impl Serialize for PodRef {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A name usable for a namespace or pod in the model: non-empty, no `/`, `*`, whitespace or
/// braces (those carry meaning in patterns and placeholders).
fn is_model_name(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c == '/' || c == '*' || c == '{' || c == '}' || c.is_whitespace())
}

/// The cluster a case file runs on: every namespace holds every pod; every pod serves every
/// port on every protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Model {
    pub namespaces: Vec<String>,
    pub pods: Vec<String>,
    pub ports: Vec<u16>,
    pub protocols: Vec<Protocol>,
    /// Spread pods round-robin over this many nodes (the local cluster's default when
    /// absent). `cargo xtask conformance --nodes N` overrides it by setting this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<u32>,
    /// How nodes are joined; `--topology` overrides it by setting this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<Topology>,
}

impl Model {
    /// Every pod of the model, namespace-major in model order (`x/a, x/b, ..., y/a, ...`):
    /// the row and column order of the truth tables.
    pub fn pod_refs(&self) -> Vec<PodRef> {
        self.namespaces
            .iter()
            .flat_map(|namespace| self.pods.iter().map(move |pod| PodRef::new(namespace, pod)))
            .collect()
    }

    /// Whether `pod` is one of the model's pods.
    pub fn has_pod(&self, pod: &PodRef) -> bool {
        self.namespaces.contains(&pod.namespace) && self.pods.contains(&pod.name)
    }

    /// The labels a namespace starts every case with: `{ns: <name>,
    /// kubernetes.io/metadata.name: <name>}`.
    pub fn namespace_labels(&self, namespace: &str) -> Labels {
        Labels::from([
            ("ns".to_owned(), namespace.to_owned()),
            (NAMESPACE_NAME_LABEL.to_owned(), namespace.to_owned()),
        ])
    }

    /// The labels a pod starts every case with: `{pod: <name>}`.
    pub fn pod_labels(&self, pod: &PodRef) -> Labels {
        Labels::from([("pod".to_owned(), pod.name.clone())])
    }

    /// The container ports every pod declares, as `(name, port, protocol)`, with upstream's
    /// naming `serve-<port>-<protocol lowercase>` (e.g. `serve-80-tcp`), which named ports
    /// in policies resolve against.
    pub fn container_ports(&self) -> Vec<(String, u16, Protocol)> {
        self.ports
            .iter()
            .flat_map(|&port| {
                self.protocols
                    .iter()
                    .map(move |&protocol| (container_port_name(port, protocol), port, protocol))
            })
            .collect()
    }

    /// Checks the model's lists: non-empty, no duplicates, usable names, non-zero ports.
    pub fn validate(&self) -> Result<()> {
        check_list("namespaces", &self.namespaces, |name| {
            is_model_name(name)
                .then_some(())
                .ok_or("must be non-empty without '/', '*', braces or whitespace")
        })?;
        check_list("pods", &self.pods, |name| {
            is_model_name(name)
                .then_some(())
                .ok_or("must be non-empty without '/', '*', braces or whitespace")
        })?;
        check_list("ports", &self.ports, |&port| {
            (port != 0).then_some(()).ok_or("must be 1-65535")
        })?;
        check_list("protocols", &self.protocols, |_| Ok(()))?;
        if self.nodes == Some(0) {
            return Err(Error::InvalidModel {
                field: "nodes",
                reason: "must be at least 1".to_owned(),
            });
        }
        Ok(())
    }
}

/// Upstream's container port name for `port`/`protocol` (`serve-80-tcp`).
pub fn container_port_name(port: u16, protocol: Protocol) -> String {
    format!("serve-{port}-{}", protocol.as_str().to_lowercase())
}

fn check_list<T: fmt::Debug + Ord>(
    field: &'static str,
    items: &[T],
    check: impl Fn(&T) -> Result<(), &'static str>,
) -> Result<()> {
    if items.is_empty() {
        return Err(Error::InvalidModel {
            field,
            reason: "must not be empty".to_owned(),
        });
    }
    let mut seen = BTreeSet::new();
    for item in items {
        check(item).map_err(|reason| Error::InvalidModel {
            field,
            reason: format!("entry {item:?} {reason}"),
        })?;
        if !seen.insert(item) {
            return Err(Error::InvalidModel {
                field,
                reason: format!("lists {item:?} twice"),
            });
        }
    }
    Ok(())
}

/// A whole case file.
#[derive(Clone, Debug, PartialEq)]
pub struct CaseFile {
    /// Free text saying where the cases come from.
    pub source: Option<String>,
    pub model: Model,
    pub cases: Vec<Case>,
}

/// One case: a named sequence of steps run on a cluster reset to the model's initial state.
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    pub name: String,
    pub tags: Vec<String>,
    pub steps: Vec<Step>,
}

/// Tag of cases that use fields of an API's experimental channel.
pub const EXPERIMENTAL_TAG: &str = "experimental";

/// Prefix of the tag `nodes=N`: the case holds only on exactly N nodes.
pub const NODES_TAG_PREFIX: &str = "nodes=";

impl Case {
    /// Whether the case is tagged `experimental` (skipped by runners without support).
    pub fn is_experimental(&self) -> bool {
        self.tags.iter().any(|tag| tag == EXPERIMENTAL_TAG)
    }

    /// The node count a `nodes=N` tag pins the case to (validated at load).
    pub fn required_nodes(&self) -> Option<u32> {
        self.tags
            .iter()
            .find_map(|tag| tag.strip_prefix(NODES_TAG_PREFIX)?.parse().ok())
    }
}

/// One step. Its parts take effect in this order: pod labels, namespace labels, `apply` in
/// list order, `delete`, then every expectation is checked.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Step {
    /// Replacement label sets for pods (all labels replaced).
    pub set_pod_labels: BTreeMap<PodRef, Labels>,
    /// Replacement label sets for namespaces, as written: the runner adds
    /// `kubernetes.io/metadata.name` before handing them to the driver.
    pub set_namespace_labels: BTreeMap<String, Labels>,
    /// Kubernetes objects to create or replace, in order; strings may hold `{{ip ns/pod}}`.
    pub apply: Vec<Value>,
    /// Objects to delete.
    pub delete: Vec<ObjectRef>,
    /// Expected reachability after the changes above.
    pub expect: Vec<Expectation>,
}

/// An object to delete: `{kind, namespace, name}`, or `{kind, name}` for cluster-scoped
/// kinds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectRef {
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(namespace) => write!(f, "{} {namespace}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// A reachability verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        })
    }
}

/// One expect block: a verdict for every (from pod, to pod) pair on each listed port and
/// protocol (only the pairs its patterns name when it has no `default`), plus the pairs its
/// patterns name with a node source or a Service, nodePort or external destination.
#[derive(Clone, Debug, PartialEq)]
pub struct Expectation {
    /// Ports checked (the model's ports when the block lists none). For Service and nodePort
    /// destinations these are Service ports.
    pub ports: Vec<u16>,
    /// Protocols checked (the model's protocols when the block lists none).
    pub protocols: Vec<Protocol>,
    /// Verdict for pod pairs no pattern matches; `None`: only named pairs are probed.
    pub default: Option<Verdict>,
    pub deny: Vec<PairPattern>,
    pub allow: Vec<PairPattern>,
    /// `backends`: over [`BACKEND_ATTEMPTS`] fresh connections, exactly these pods answer.
    pub backends: Vec<(Endpoint, Endpoint, BTreeSet<PodRef>)>,
    /// `same_backend`: [`SAME_BACKEND_ATTEMPTS`] connections all reach one backend.
    pub same_backend: Vec<(Endpoint, Endpoint)>,
}

/// Fresh connections a `backends` expectation makes.
pub const BACKEND_ATTEMPTS: usize = 32;
/// Connections a `same_backend` expectation makes.
pub const SAME_BACKEND_ATTEMPTS: usize = 16;
/// Fresh connections an `allow` or `deny` to a Service or nodePort is judged on.
pub const SERVICE_ATTEMPTS: usize = 8;

/// A Service, `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One concrete end of a probe: where a client runs or what it connects to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    /// A model pod (source or destination).
    Pod(PodRef),
    /// Node N's host network namespace, 1-based (source only).
    Node(u32),
    /// A Service's ClusterIP (destination only).
    Service(ServiceRef),
    /// A Service's nodePort on every node (destination only).
    NodePort(ServiceRef),
    /// The server outside the cluster (destination only).
    External,
}

impl Endpoint {
    pub fn is_pod(&self) -> bool {
        matches!(self, Endpoint::Pod(_))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Pod(pod) => write!(f, "{pod}"),
            Endpoint::Node(n) => write!(f, "node:{n}"),
            Endpoint::Service(svc) => write!(f, "svc:{svc}"),
            Endpoint::NodePort(svc) => write!(f, "nodeport:{svc}"),
            Endpoint::External => f.write_str("external"),
        }
    }
}

impl Serialize for Endpoint {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl Expectation {
    /// The expected verdict for `from -> to`.
    ///
    /// * A pod connecting to itself is allowed whenever the block covers the pair: the packet
    ///   never leaves the pod, so no policy applies to it.
    /// * Otherwise the most specific matching pattern decides, specificity being the sum
    ///   over both sides of 2 for `ns/pod`, 1 for `ns/*`, 0 for `*/*`; when the best `allow`
    ///   and the best `deny` are equally specific, `allow` wins.
    /// * A pair no pattern matches gets `default` (`None` when the block has none: such a
    ///   pair is not probed).
    pub fn verdict(&self, from: &PodRef, to: &PodRef) -> Option<Verdict> {
        self.endpoint_verdict(&Endpoint::Pod(from.clone()), &Endpoint::Pod(to.clone()))
    }

    /// [`Expectation::verdict`] for any pair of endpoints; `default` applies to pod pairs
    /// only (other pairs are probed only where a pattern names them).
    pub fn endpoint_verdict(&self, from: &Endpoint, to: &Endpoint) -> Option<Verdict> {
        let best = |patterns: &[PairPattern]| {
            patterns
                .iter()
                .filter(|pattern| {
                    pattern.from.matches_endpoint(from) && pattern.to.matches_endpoint(to)
                })
                .map(PairPattern::specificity)
                .max()
        };
        let verdict = match (best(&self.allow), best(&self.deny)) {
            (None, None) if from.is_pod() && to.is_pod() => self.default,
            (None, None) => None,
            (Some(_), None) => Some(Verdict::Allow),
            (None, Some(_)) => Some(Verdict::Deny),
            (Some(allow), Some(deny)) if allow >= deny => Some(Verdict::Allow),
            (Some(_), Some(_)) => Some(Verdict::Deny),
        };
        // A self pair the block covers at all is allowed; one it does not cover (no
        // `default`, no pattern) is not probed.
        if from.is_pod() && from == to {
            return verdict.map(|_| Verdict::Allow);
        }
        verdict
    }

    /// The pairs with a non-pod side that the block's patterns name, in pattern order
    /// without repeats: every pod a pod side matches, paired with the other side.
    pub fn named_pairs(&self, model: &Model) -> Vec<(Endpoint, Endpoint)> {
        let mut pairs = Vec::new();
        for pattern in self.allow.iter().chain(&self.deny) {
            if pattern.from.is_pod_pattern() && pattern.to.is_pod_pattern() {
                continue;
            }
            for from in pattern.from.expand(model) {
                for to in pattern.to.expand(model) {
                    let pair = (from.clone(), to);
                    if !pairs.contains(&pair) {
                        pairs.push(pair);
                    }
                }
            }
        }
        pairs
    }

    /// Every (port, protocol) combination the block checks, ports outer.
    pub fn port_protocols(&self) -> Vec<(u16, Protocol)> {
        self.ports
            .iter()
            .flat_map(|&port| self.protocols.iter().map(move |&protocol| (port, protocol)))
            .collect()
    }
}

/// One side of a pair pattern: pods (`*/*`, `ns/*`, `ns/pod`), or one other endpoint
/// (`node:N`, `svc:ns/name`, `nodeport:ns/name`, `external`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PodPattern {
    /// `*/*`: every pod.
    Any,
    /// `ns/*`: every pod of a namespace.
    Namespace(String),
    /// `ns/pod`: one pod.
    Pod(PodRef),
    /// `node:N`, `svc:ns/name`, `nodeport:ns/name` or `external`: exactly that endpoint.
    Other(Endpoint),
}

impl PodPattern {
    /// 2 for `ns/pod` and the other exact endpoints, 1 for `ns/*`, 0 for `*/*`.
    pub fn specificity(&self) -> u8 {
        match self {
            PodPattern::Any => 0,
            PodPattern::Namespace(_) => 1,
            PodPattern::Pod(_) | PodPattern::Other(_) => 2,
        }
    }

    /// Whether the side matches a pod (never for non-pod endpoints).
    pub fn matches(&self, pod: &PodRef) -> bool {
        match self {
            PodPattern::Any => true,
            PodPattern::Namespace(namespace) => &pod.namespace == namespace,
            PodPattern::Pod(exact) => exact == pod,
            PodPattern::Other(_) => false,
        }
    }

    /// Whether the side matches an endpoint of any kind.
    pub fn matches_endpoint(&self, endpoint: &Endpoint) -> bool {
        match (self, endpoint) {
            (PodPattern::Other(exact), endpoint) => exact == endpoint,
            (pattern, Endpoint::Pod(pod)) => pattern.matches(pod),
            _ => false,
        }
    }

    /// Whether the side stands for pods.
    pub fn is_pod_pattern(&self) -> bool {
        !matches!(self, PodPattern::Other(_))
    }

    /// Every endpoint the side matches in `model`.
    pub fn expand(&self, model: &Model) -> Vec<Endpoint> {
        match self {
            PodPattern::Other(endpoint) => vec![endpoint.clone()],
            pattern => model
                .pod_refs()
                .into_iter()
                .filter(|pod| pattern.matches(pod))
                .map(Endpoint::Pod)
                .collect(),
        }
    }
}

impl fmt::Display for PodPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PodPattern::Any => f.write_str("*/*"),
            PodPattern::Namespace(namespace) => write!(f, "{namespace}/*"),
            PodPattern::Pod(pod) => write!(f, "{pod}"),
            PodPattern::Other(endpoint) => write!(f, "{endpoint}"),
        }
    }
}

/// Parses `ns/name` of a Service.
fn parse_service(text: &str) -> Result<ServiceRef, String> {
    let pod = text
        .parse::<PodRef>()
        .map_err(|_| format!("{text:?} is not ns/name of a Service"))?;
    Ok(ServiceRef {
        namespace: pod.namespace,
        name: pod.name,
    })
}

impl FromStr for PodPattern {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text == "external" {
            return Ok(PodPattern::Other(Endpoint::External));
        }
        if let Some(rest) = text.strip_prefix("svc:") {
            return Ok(PodPattern::Other(Endpoint::Service(parse_service(rest)?)));
        }
        if let Some(rest) = text.strip_prefix("nodeport:") {
            return Ok(PodPattern::Other(Endpoint::NodePort(parse_service(rest)?)));
        }
        if let Some(rest) = text.strip_prefix("node:") {
            return match rest.parse::<u32>() {
                Ok(n) if n >= 1 => Ok(PodPattern::Other(Endpoint::Node(n))),
                _ => Err(format!("side {text:?}: node:N takes a node number from 1")),
            };
        }
        let (namespace, pod) = text
            .split_once('/')
            .ok_or_else(|| format!("side {text:?} is not ns/pod, ns/* or */*"))?;
        match (namespace, pod) {
            ("*", "*") => Ok(PodPattern::Any),
            ("*", _) => Err(format!(
                "side {text:?}: a pod name needs a namespace (only */* may start with *)"
            )),
            (namespace, "*") if is_model_name(namespace) => {
                Ok(PodPattern::Namespace(namespace.to_owned()))
            }
            (namespace, pod) if is_model_name(namespace) && is_model_name(pod) => {
                Ok(PodPattern::Pod(PodRef::new(namespace, pod)))
            }
            _ => Err(format!("side {text:?} is not ns/pod, ns/* or */*")),
        }
    }
}

/// `from -> to`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PairPattern {
    pub from: PodPattern,
    pub to: PodPattern,
}

impl PairPattern {
    /// Sum of both sides' specificity (0 to 4).
    pub fn specificity(&self) -> u8 {
        self.from.specificity() + self.to.specificity()
    }

    pub fn matches(&self, from: &PodRef, to: &PodRef) -> bool {
        self.from.matches(from) && self.to.matches(to)
    }
}

impl fmt::Display for PairPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.from, self.to)
    }
}

impl FromStr for PairPattern {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (from, to) = text
            .split_once("->")
            .ok_or_else(|| "expected \"from -> to\"".to_owned())?;
        Ok(PairPattern {
            from: from.trim().parse()?,
            to: to.trim().parse()?,
        })
    }
}

// ---------------------------------------------------------------------------------------
// `{{ip ns/pod}}` placeholders
// ---------------------------------------------------------------------------------------

/// A piece of a string that may hold placeholders.
pub(crate) enum Segment<'a> {
    Text(&'a str),
    PodIp(PodRef),
    /// `{{ip external}}`: the address of the server outside the cluster.
    ExternalIp,
}

/// Splits `text` into literal text and `{{ip ns/pod}}` placeholders (whitespace inside the
/// braces is free). Any other use of `{{` is an error, so a typo never reaches the API
/// server as a literal.
pub(crate) fn segments(text: &str) -> Result<Vec<Segment<'_>>, (String, &'static str)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            out.push(Segment::Text(&rest[..start]));
        }
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| (rest[start..].to_owned(), "no closing }}"))?;
        let inner = &after[..end];
        let placeholder = format!("{{{{{inner}}}}}");
        let mut words = inner.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("ip"), Some("external"), None) => out.push(Segment::ExternalIp),
            (Some("ip"), Some(pod), None) => {
                let pod = pod
                    .parse::<PodRef>()
                    .map_err(|_| (placeholder, "expected {{ip ns/pod}}"))?;
                out.push(Segment::PodIp(pod));
            }
            _ => {
                return Err((
                    placeholder,
                    "the only placeholders are {{ip ns/pod}} and {{ip external}}",
                ));
            }
        }
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        out.push(Segment::Text(rest));
    }
    Ok(out)
}

pub(crate) fn visit_strings<E>(
    value: &Value,
    visit: &mut impl FnMut(&str) -> Result<(), E>,
) -> Result<(), E> {
    match value {
        Value::String(text) => visit(text),
        Value::Array(items) => items.iter().try_for_each(|item| visit_strings(item, visit)),
        Value::Object(map) => map.values().try_for_each(|item| visit_strings(item, visit)),
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
    }
}

/// The pods whose IP an object's `{{ip ns/pod}}` placeholders need (string values at any
/// depth; keys are never substituted).
pub fn placeholder_pods(object: &Value) -> BTreeSet<PodRef> {
    let mut pods = BTreeSet::new();
    let _: Result<(), ()> = visit_strings(object, &mut |text| {
        if let Ok(segments) = segments(text) {
            pods.extend(segments.into_iter().filter_map(|segment| match segment {
                Segment::PodIp(pod) => Some(pod),
                Segment::Text(_) | Segment::ExternalIp => None,
            }));
        }
        Ok(())
    });
    pods
}

/// Replaces every `{{ip ns/pod}}` in `object`'s string values with the pod's address from
/// `ips`.
pub fn substitute_ips(object: &Value, ips: &BTreeMap<PodRef, IpAddr>) -> Result<Value> {
    substitute(object, ips, None)
}

/// Whether `object` holds `{{ip external}}` anywhere in its string values.
pub fn uses_external_ip(object: &Value) -> bool {
    let mut found = false;
    let _: Result<(), ()> = visit_strings(object, &mut |text| {
        if let Ok(segments) = segments(text) {
            found |= segments
                .iter()
                .any(|segment| matches!(segment, Segment::ExternalIp));
        }
        Ok(())
    });
    found
}

/// Replaces every `{{ip ns/pod}}` with the pod's address from `ips` and every
/// `{{ip external}}` with `external`.
pub fn substitute(
    object: &Value,
    ips: &BTreeMap<PodRef, IpAddr>,
    external: Option<IpAddr>,
) -> Result<Value> {
    Ok(match object {
        Value::String(text) => {
            // Validation at load time rejected malformed placeholders; a string that still
            // fails to split here is kept as written rather than guessed at.
            let Ok(parts) = segments(text) else {
                return Ok(object.clone());
            };
            let mut out = String::with_capacity(text.len());
            for part in parts {
                match part {
                    Segment::Text(text) => out.push_str(text),
                    Segment::PodIp(pod) => {
                        let ip = ips.get(&pod).ok_or(Error::MissingPodIp { pod })?;
                        out.push_str(&ip.to_string());
                    }
                    Segment::ExternalIp => {
                        let ip = external.ok_or(Error::MissingExternalIp)?;
                        out.push_str(&ip.to_string());
                    }
                }
            }
            Value::String(out)
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|item| substitute(item, ips, external))
                .collect::<Result<_>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, item)| Ok((key.clone(), substitute(item, ips, external)?)))
                .collect::<Result<_>>()?,
        ),
        Value::Null | Value::Bool(_) | Value::Number(_) => object.clone(),
    })
}

// ---------------------------------------------------------------------------------------
// Loading and validation
// ---------------------------------------------------------------------------------------

mod raw {
    //! The file as serde reads it: strings where validation wants to say more than serde
    //! can, `Option` wherever the format lets a key be absent or written without a value.

    use std::collections::BTreeMap;

    use serde::Deserialize;
    use serde_json::Value;

    use super::{ObjectRef, Topology, Verdict};

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct File {
        pub format: String,
        pub source: Option<String>,
        pub model: Model,
        pub cases: Option<Vec<Case>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Model {
        pub namespaces: Vec<String>,
        pub pods: Vec<String>,
        pub ports: Vec<u16>,
        pub protocols: Vec<String>,
        pub nodes: Option<u32>,
        pub topology: Option<Topology>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Case {
        pub name: String,
        pub tags: Option<Vec<String>>,
        pub steps: Option<Vec<Step>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Step {
        pub set_pod_labels: Option<BTreeMap<String, BTreeMap<String, String>>>,
        pub set_namespace_labels: Option<BTreeMap<String, BTreeMap<String, String>>>,
        pub apply: Option<Vec<Value>>,
        pub delete: Option<Vec<ObjectRef>>,
        pub expect: Option<Vec<Expect>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Expect {
        pub ports: Option<Vec<u16>>,
        pub protocols: Option<Vec<String>>,
        pub default: Option<Verdict>,
        pub deny: Option<Vec<String>>,
        pub allow: Option<Vec<String>>,
        pub backends: Option<BTreeMap<String, Vec<String>>>,
        pub same_backend: Option<Vec<String>>,
    }
}

impl FromStr for CaseFile {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        CaseFile::parse(text, "<string>")
    }
}

impl CaseFile {
    /// Reads and validates a case file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadCaseFile {
            path: path.to_owned(),
            source,
        })?;
        CaseFile::parse(&text, &path.display().to_string())
    }

    /// Parses and validates case file text; `origin` names it in errors (e.g. its path).
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let raw: raw::File = serde_norway::from_str(text).map_err(|source| Error::Yaml {
            origin: origin.to_owned(),
            source,
        })?;
        if raw.format != FORMAT {
            return Err(Error::UnknownFormat {
                found: raw.format,
                expected: FORMAT,
            });
        }
        let protocols = raw
            .model
            .protocols
            .iter()
            .map(|name| {
                name.parse::<Protocol>()
                    .map_err(|()| Error::UnknownProtocol {
                        location: "model".to_owned(),
                        protocol: name.clone(),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let model = Model {
            namespaces: raw.model.namespaces,
            pods: raw.model.pods,
            ports: raw.model.ports,
            protocols,
            nodes: raw.model.nodes,
            topology: raw.model.topology,
        };
        model.validate()?;

        let mut names = BTreeSet::new();
        let mut cases = Vec::new();
        for raw_case in raw.cases.unwrap_or_default() {
            if raw_case.name.trim().is_empty() {
                return Err(Error::InvalidCase {
                    case: raw_case.name,
                    reason: "the name is empty",
                });
            }
            if !names.insert(raw_case.name.clone()) {
                return Err(Error::DuplicateCase {
                    case: raw_case.name,
                });
            }
            let raw_steps = raw_case.steps.unwrap_or_default();
            if raw_steps.is_empty() {
                return Err(Error::InvalidCase {
                    case: raw_case.name,
                    reason: "it has no steps",
                });
            }
            let steps = raw_steps
                .into_iter()
                .enumerate()
                .map(|(index, step)| {
                    let location = StepLocation {
                        case: raw_case.name.clone(),
                        step: index + 1,
                    };
                    validate_step(&model, &location, step)
                })
                .collect::<Result<Vec<_>>>()?;
            let tags = raw_case.tags.unwrap_or_default();
            for tag in &tags {
                if let Some(count) = tag.strip_prefix(NODES_TAG_PREFIX)
                    && !matches!(count.parse::<u32>(), Ok(n) if n > 0)
                {
                    return Err(Error::BadNodesTag {
                        case: raw_case.name,
                        tag: tag.clone(),
                    });
                }
            }
            cases.push(Case {
                name: raw_case.name,
                tags,
                steps,
            });
        }
        Ok(CaseFile {
            source: raw.source,
            model,
            cases,
        })
    }
}

fn check_pod(model: &Model, location: &StepLocation, pod: &PodRef) -> Result<()> {
    if model.has_pod(pod) {
        Ok(())
    } else {
        Err(Error::PodNotInModel {
            location: location.clone(),
            pod: pod.to_string(),
        })
    }
}

fn check_namespace(model: &Model, location: &StepLocation, namespace: &str) -> Result<()> {
    if model.namespaces.iter().any(|known| known == namespace) {
        Ok(())
    } else {
        Err(Error::NamespaceNotInModel {
            location: location.clone(),
            namespace: namespace.to_owned(),
        })
    }
}

fn validate_step(model: &Model, location: &StepLocation, raw: raw::Step) -> Result<Step> {
    let mut set_pod_labels = BTreeMap::new();
    for (key, labels) in raw.set_pod_labels.unwrap_or_default() {
        let pod = key.parse::<PodRef>().map_err(|_| Error::PodNotInModel {
            location: location.clone(),
            pod: key.clone(),
        })?;
        check_pod(model, location, &pod)?;
        set_pod_labels.insert(pod, labels);
    }
    let set_namespace_labels = raw.set_namespace_labels.unwrap_or_default();
    for namespace in set_namespace_labels.keys() {
        check_namespace(model, location, namespace)?;
    }

    let apply = raw.apply.unwrap_or_default();
    for (index, object) in apply.iter().enumerate() {
        validate_object(model, location, index + 1, object)?;
    }

    let expect = raw
        .expect
        .unwrap_or_default()
        .into_iter()
        .map(|block| validate_expect(model, location, block))
        .collect::<Result<Vec<_>>>()?;

    Ok(Step {
        set_pod_labels,
        set_namespace_labels,
        apply,
        delete: raw.delete.unwrap_or_default(),
        expect,
    })
}

fn validate_object(
    model: &Model,
    location: &StepLocation,
    index: usize,
    object: &Value,
) -> Result<()> {
    let bad = |reason| Error::BadObject {
        location: location.clone(),
        index,
        reason,
    };
    let map = object.as_object().ok_or_else(|| bad("not a mapping"))?;
    let non_empty_string = |value: Option<&Value>| {
        value
            .and_then(Value::as_str)
            .is_some_and(|text| !text.is_empty())
    };
    if !non_empty_string(map.get("apiVersion")) {
        return Err(bad("no apiVersion"));
    }
    if !non_empty_string(map.get("kind")) {
        return Err(bad("no kind"));
    }
    if !non_empty_string(
        map.get("metadata")
            .and_then(|metadata| metadata.get("name")),
    ) {
        return Err(bad("no metadata.name"));
    }
    visit_strings(object, &mut |text| {
        let parts = segments(text).map_err(|(text, reason)| Error::BadPlaceholder {
            location: location.clone(),
            text,
            reason,
        })?;
        parts.iter().try_for_each(|part| match part {
            Segment::PodIp(pod) => check_pod(model, location, pod),
            Segment::Text(_) | Segment::ExternalIp => Ok(()),
        })
    })
}

fn validate_expect(
    model: &Model,
    location: &StepLocation,
    raw: raw::Expect,
) -> Result<Expectation> {
    let ports = match raw.ports {
        None => model.ports.clone(),
        Some(ports) => {
            for &port in &ports {
                // A block without `default` names every pair it probes, so it may probe
                // Service ports the pods do not serve.
                if raw.default.is_some() && !model.ports.contains(&port) {
                    return Err(Error::PortNotInModel {
                        location: location.clone(),
                        port,
                        model_ports: model.ports.clone(),
                    });
                }
            }
            ports
        }
    };
    let protocols = match raw.protocols {
        None => model.protocols.clone(),
        Some(names) => names
            .iter()
            .map(|name| {
                let protocol = name
                    .parse::<Protocol>()
                    .map_err(|()| Error::UnknownProtocol {
                        location: location.to_string(),
                        protocol: name.clone(),
                    })?;
                if model.protocols.contains(&protocol) {
                    Ok(protocol)
                } else {
                    Err(Error::ProtocolNotInModel {
                        location: location.clone(),
                        protocol,
                    })
                }
            })
            .collect::<Result<Vec<_>>>()?,
    };
    let patterns = |texts: Option<Vec<String>>| {
        texts
            .unwrap_or_default()
            .into_iter()
            .map(|text| parse_pattern(model, location, &text))
            .collect::<Result<Vec<_>>>()
    };
    let deny = patterns(raw.deny)?;
    for pattern in &deny {
        if let (PodPattern::Pod(from), PodPattern::Pod(to)) = (&pattern.from, &pattern.to)
            && from == to
        {
            return Err(Error::SelfPairDenied {
                location: location.clone(),
                pattern: pattern.to_string(),
            });
        }
    }
    let allow = patterns(raw.allow)?;
    let concrete_pair = |text: &str| -> Result<(Endpoint, Endpoint)> {
        let pattern = parse_pattern(model, location, text)?;
        let bad = |reason: &str| Error::BadPattern {
            location: location.clone(),
            pattern: text.to_owned(),
            reason: reason.to_owned(),
        };
        let from = match pattern.from {
            PodPattern::Pod(pod) => Endpoint::Pod(pod),
            PodPattern::Other(node @ Endpoint::Node(_)) => node,
            _ => return Err(bad("the client must be one pod or node:N")),
        };
        let to = match pattern.to {
            PodPattern::Other(svc @ Endpoint::Service(_)) => svc,
            _ => return Err(bad("the destination must be svc:ns/name")),
        };
        Ok((from, to))
    };
    let mut backends = Vec::new();
    for (text, pods) in raw.backends.unwrap_or_default() {
        let (from, to) = concrete_pair(&text)?;
        let mut set = BTreeSet::new();
        for pod in pods {
            let parsed = pod.parse::<PodRef>().map_err(|_| Error::PodNotInModel {
                location: location.clone(),
                pod: pod.clone(),
            })?;
            check_pod(model, location, &parsed)?;
            set.insert(parsed);
        }
        backends.push((from, to, set));
    }
    let same_backend = raw
        .same_backend
        .unwrap_or_default()
        .iter()
        .map(|text| concrete_pair(text))
        .collect::<Result<Vec<_>>>()?;
    Ok(Expectation {
        ports,
        protocols,
        default: raw.default,
        deny,
        allow,
        backends,
        same_backend,
    })
}

fn parse_pattern(model: &Model, location: &StepLocation, text: &str) -> Result<PairPattern> {
    let pattern = text
        .parse::<PairPattern>()
        .map_err(|reason| Error::BadPattern {
            location: location.clone(),
            pattern: text.to_owned(),
            reason,
        })?;
    let bad = |reason: &str| Error::BadPattern {
        location: location.clone(),
        pattern: text.to_owned(),
        reason: reason.to_owned(),
    };
    for (side, is_source) in [(&pattern.from, true), (&pattern.to, false)] {
        match side {
            PodPattern::Any => {}
            PodPattern::Namespace(namespace) => check_namespace(model, location, namespace)?,
            PodPattern::Pod(pod) => check_pod(model, location, pod)?,
            PodPattern::Other(Endpoint::Node(_)) if !is_source => {
                return Err(bad("node:N is a client, not a destination"));
            }
            PodPattern::Other(Endpoint::Node(_)) => {}
            PodPattern::Other(_) if is_source => {
                return Err(bad(
                    "svc:, nodeport: and external are destinations, not clients",
                ));
            }
            PodPattern::Other(Endpoint::Service(svc) | Endpoint::NodePort(svc)) => {
                check_namespace(model, location, &svc.namespace)?;
            }
            PodPattern::Other(_) => {}
        }
    }
    Ok(pattern)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = "
format: weir-reachability/v1
model:
  namespaces: [x, y, z]
  pods: [a, b, c]
  ports: [80, 81]
  protocols: [TCP, UDP, SCTP]
";

    fn file(cases: &str) -> Result<CaseFile> {
        CaseFile::parse(&format!("{MODEL}cases:\n{cases}"), "test")
    }

    fn expectation(default: Verdict, deny: &[&str], allow: &[&str]) -> Expectation {
        let parse = |patterns: &[&str]| {
            patterns
                .iter()
                .map(|pattern| pattern.parse::<PairPattern>().expect("test pattern"))
                .collect()
        };
        Expectation {
            ports: vec![80],
            protocols: vec![Protocol::Tcp],
            default: Some(default),
            deny: parse(deny),
            allow: parse(allow),
            backends: Vec::new(),
            same_backend: Vec::new(),
        }
    }

    fn pod(text: &str) -> PodRef {
        text.parse().expect("test pod")
    }

    #[test]
    fn default_applies_to_pairs_no_pattern_matches() {
        let allow_all = expectation(Verdict::Allow, &[], &[]);
        assert_eq!(
            allow_all.verdict(&pod("x/a"), &pod("y/b")),
            Some(Verdict::Allow)
        );
        let deny_all = expectation(Verdict::Deny, &[], &[]);
        assert_eq!(
            deny_all.verdict(&pod("x/a"), &pod("y/b")),
            Some(Verdict::Deny)
        );
    }

    #[test]
    fn self_pairs_are_allowed_even_under_a_matching_deny_and_deny_default() {
        let block = expectation(Verdict::Deny, &["*/* -> x/*", "x/a -> */*"], &[]);
        assert_eq!(
            block.verdict(&pod("x/a"), &pod("x/a")),
            Some(Verdict::Allow)
        );
        assert_eq!(
            block.verdict(&pod("x/b"), &pod("x/b")),
            Some(Verdict::Allow)
        );
        assert_eq!(block.verdict(&pod("x/b"), &pod("x/a")), Some(Verdict::Deny));
    }

    #[test]
    fn more_specific_allow_beats_deny() {
        let block = expectation(Verdict::Allow, &["*/* -> x/a"], &["x/b -> x/a"]);
        assert_eq!(
            block.verdict(&pod("x/b"), &pod("x/a")),
            Some(Verdict::Allow)
        );
        assert_eq!(block.verdict(&pod("x/c"), &pod("x/a")), Some(Verdict::Deny));
        assert_eq!(block.verdict(&pod("y/b"), &pod("x/a")), Some(Verdict::Deny));
        assert_eq!(
            block.verdict(&pod("x/b"), &pod("x/c")),
            Some(Verdict::Allow)
        );
    }

    #[test]
    fn more_specific_deny_beats_allow() {
        // allow y/* -> x/* (1+1 = 2) vs deny y/a -> x/* (2+1 = 3)
        let block = expectation(Verdict::Deny, &["y/a -> x/*"], &["y/* -> x/*"]);
        assert_eq!(block.verdict(&pod("y/a"), &pod("x/b")), Some(Verdict::Deny));
        assert_eq!(
            block.verdict(&pod("y/b"), &pod("x/b")),
            Some(Verdict::Allow)
        );
        assert_eq!(block.verdict(&pod("z/b"), &pod("x/b")), Some(Verdict::Deny));
    }

    #[test]
    fn equal_specificity_tie_goes_to_allow() {
        // ns/pod -> */* (2) against */* -> ns/pod (2)
        let block = expectation(Verdict::Deny, &["x/a -> */*"], &["*/* -> y/b"]);
        assert_eq!(
            block.verdict(&pod("x/a"), &pod("y/b")),
            Some(Verdict::Allow)
        );
        assert_eq!(block.verdict(&pod("x/a"), &pod("y/c")), Some(Verdict::Deny));
        // ns/* -> ns/* (2) against ns/pod -> */* (2)
        let block = expectation(Verdict::Allow, &["x/* -> y/*"], &["x/a -> */*"]);
        assert_eq!(
            block.verdict(&pod("x/a"), &pod("y/a")),
            Some(Verdict::Allow)
        );
        assert_eq!(block.verdict(&pod("x/b"), &pod("y/a")), Some(Verdict::Deny));
        // the very same pattern on both sides
        let block = expectation(Verdict::Deny, &["x/a -> y/a"], &["x/a -> y/a"]);
        assert_eq!(
            block.verdict(&pod("x/a"), &pod("y/a")),
            Some(Verdict::Allow)
        );
    }

    #[test]
    fn the_best_match_of_each_list_is_compared_not_the_first() {
        // deny has a weak match (0) and a strong one (4); allow has a middle one (2).
        let block = expectation(
            Verdict::Allow,
            &["*/* -> */*", "x/a -> y/a"],
            &["x/* -> y/*"],
        );
        assert_eq!(block.verdict(&pod("x/a"), &pod("y/a")), Some(Verdict::Deny));
        assert_eq!(
            block.verdict(&pod("x/b"), &pod("y/a")),
            Some(Verdict::Allow)
        );
        assert_eq!(block.verdict(&pod("z/b"), &pod("y/a")), Some(Verdict::Deny));
    }

    #[test]
    fn upstream_style_deny_ingress_block_evaluates_over_the_full_matrix() {
        let block = expectation(
            Verdict::Allow,
            &["*/* -> x/*"],
            &["x/a -> x/a", "x/b -> x/b", "x/c -> x/c"],
        );
        let model = CaseFile::parse(&format!("{MODEL}cases: []"), "test")
            .expect("model")
            .model;
        let mut denied = 0;
        for from in model.pod_refs() {
            for to in model.pod_refs() {
                let verdict = block.verdict(&from, &to).expect("a default");
                let expected = if to.namespace == "x" && from != to {
                    Verdict::Deny
                } else {
                    Verdict::Allow
                };
                assert_eq!(verdict, expected, "{from} -> {to}");
                denied += usize::from(verdict == Verdict::Deny);
            }
        }
        assert_eq!(denied, 9 * 3 - 3);
    }

    #[test]
    fn pattern_specificity_sums_both_sides() {
        let spec = |text: &str| text.parse::<PairPattern>().expect("pattern").specificity();
        assert_eq!(spec("*/* -> */*"), 0);
        assert_eq!(spec("x/* -> */*"), 1);
        assert_eq!(spec("x/* -> y/*"), 2);
        assert_eq!(spec("x/a -> */*"), 2);
        assert_eq!(spec("x/a -> y/*"), 3);
        assert_eq!(spec("x/a->y/b"), 4);
    }

    #[test]
    fn malformed_patterns_are_rejected() {
        for text in [
            "x/a",
            "x/a -> ",
            "*/a -> x/a",
            "x -> y/a",
            "x/a -> y/a/b",
            "/a -> x/a",
        ] {
            assert!(text.parse::<PairPattern>().is_err(), "{text} parsed");
        }
    }

    #[test]
    fn loads_a_case_with_defaults_for_ports_and_protocols() {
        let file = file(
            r#"
  - name: deny
    tags: [ingress]
    steps:
      - apply:
          - apiVersion: networking.k8s.io/v1
            kind: NetworkPolicy
            metadata: {name: deny-all, namespace: x}
            spec: {podSelector: {}, policyTypes: [Ingress]}
        delete:
        expect:
          - default: allow
            deny: ["*/* -> x/*"]
"#,
        )
        .expect("valid file");
        let step = &file.cases[0].steps[0];
        assert_eq!(step.expect[0].ports, vec![80, 81]);
        assert_eq!(step.expect[0].protocols, Protocol::ALL.to_vec());
        assert!(step.delete.is_empty());
        assert_eq!(step.apply.len(), 1);
    }

    fn error_of(cases: &str) -> String {
        match file(cases) {
            Ok(_) => panic!("file was accepted"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn unknown_format_is_rejected() {
        let text = MODEL.replace("weir-reachability/v1", "weir-reachability/v2");
        let error = CaseFile::parse(&format!("{text}cases: []"), "test")
            .expect_err("v2 accepted")
            .to_string();
        assert!(error.contains("weir-reachability/v2"), "{error}");
    }

    #[test]
    fn errors_name_the_case_and_step() {
        let error = error_of(
            r#"
  - name: first
    steps:
      - expect: [{default: allow}]
      - expect: [{default: allow, deny: ["x/a => y/a"]}]
"#,
        );
        assert!(error.contains("case \"first\", step 2"), "{error}");
        assert!(error.contains("x/a => y/a"), "{error}");
    }

    #[test]
    fn port_outside_the_model_is_rejected() {
        let error =
            error_of("  - name: p\n    steps: [{expect: [{default: allow, ports: [8080]}]}]\n");
        assert!(error.contains("port 8080"), "{error}");
        assert!(error.contains("case \"p\", step 1"), "{error}");
    }

    #[test]
    fn unknown_protocol_is_rejected() {
        let error =
            error_of("  - name: p\n    steps: [{expect: [{default: allow, protocols: [ICMP]}]}]\n");
        assert!(error.contains("unknown protocol \"ICMP\""), "{error}");
        assert!(error.contains("case \"p\", step 1"), "{error}");
    }

    #[test]
    fn protocol_outside_the_model_is_rejected() {
        let text = MODEL.replace("[TCP, UDP, SCTP]", "[TCP]");
        let error = CaseFile::parse(
            &format!("{text}cases:\n  - name: p\n    steps: [{{expect: [{{default: allow, protocols: [UDP]}}]}}]\n"),
            "test",
        )
        .expect_err("UDP accepted")
        .to_string();
        assert!(
            error.contains("protocol UDP is not in the model"),
            "{error}"
        );
    }

    #[test]
    fn pods_and_namespaces_outside_the_model_are_rejected() {
        let error = error_of(
            "  - name: p\n    steps: [{expect: [{default: allow, deny: [\"x/d -> x/a\"]}]}]\n",
        );
        assert!(error.contains("pod x/d is not in the model"), "{error}");
        let error = error_of(
            "  - name: p\n    steps: [{expect: [{default: allow, allow: [\"w/* -> x/a\"]}]}]\n",
        );
        assert!(error.contains("namespace \"w\""), "{error}");
        let error = error_of("  - name: p\n    steps: [{set_pod_labels: {\"q/a\": {pod: a}}}]\n");
        assert!(error.contains("pod q/a"), "{error}");
        let error = error_of("  - name: p\n    steps: [{set_namespace_labels: {q: {ns: q}}}]\n");
        assert!(error.contains("namespace \"q\""), "{error}");
    }

    #[test]
    fn denying_a_self_pair_is_rejected() {
        let error = error_of(
            "  - name: p\n    steps: [{expect: [{default: allow, deny: [\"x/a -> x/a\"]}]}]\n",
        );
        assert!(error.contains("self pair"), "{error}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let error = error_of("  - name: p\n    steps: [{expcet: [{default: allow}]}]\n");
        assert!(error.contains("expcet"), "{error}");
    }

    #[test]
    fn duplicate_case_names_are_rejected() {
        let error = error_of(
            "  - name: p\n    steps: [{expect: []}]\n  - name: p\n    steps: [{expect: []}]\n",
        );
        assert!(error.contains("duplicate case name"), "{error}");
    }

    #[test]
    fn model_with_duplicate_pods_is_rejected() {
        let text = MODEL.replace("[a, b, c]", "[a, b, a]");
        let error = CaseFile::parse(&format!("{text}cases: []"), "test")
            .expect_err("duplicate pod accepted")
            .to_string();
        assert!(error.contains("pods lists \"a\" twice"), "{error}");
    }

    #[test]
    fn placeholders_are_validated_at_load() {
        let object = |cidr: &str| {
            format!(
                "  - name: p\n    steps:\n      - apply:\n          - apiVersion: networking.k8s.io/v1\n            kind: NetworkPolicy\n            metadata: {{name: n, namespace: x}}\n            spec: {{egress: [{{to: [{{ipBlock: {{cidr: \"{cidr}\"}}}}]}}]}}\n"
            )
        };
        file(&object("{{ip x/b}}/32")).expect("valid placeholder");
        file(&object("{{ ip  x/b }}/32")).expect("whitespace inside braces is free");
        let error = error_of(&object("{{ip x/q}}/32"));
        assert!(error.contains("pod x/q"), "{error}");
        let error = error_of(&object("{{ipx/b}}/32"));
        assert!(error.contains("bad placeholder"), "{error}");
        let error = error_of(&object("{{ip x/b/32"));
        assert!(error.contains("no closing"), "{error}");
    }

    #[test]
    fn apply_entries_need_kind_and_name() {
        let error = error_of(
            "  - name: p\n    steps: [{apply: [{apiVersion: v1, kind: Foo, metadata: {}}]}]\n",
        );
        assert!(error.contains("apply entry 1: no metadata.name"), "{error}");
    }

    #[test]
    fn ip_placeholders_are_substituted_in_every_string_value() {
        let object = serde_json::json!({
            "kind": "NetworkPolicy",
            "metadata": {"name": "{{ip x/a}}"},
            "spec": {"egress": [{"to": [{"ipBlock": {
                "cidr": "0.0.0.0/0",
                "except": ["{{ip x/b}}/32", "{{ ip y/a }}/32 and {{ip x/b}}"],
            }}]}], "n": 5, "flag": true},
        });
        let ips = BTreeMap::from([
            (pod("x/a"), "10.0.0.1".parse().expect("ip")),
            (pod("x/b"), "10.0.0.2".parse().expect("ip")),
            (pod("y/a"), "fd00::3".parse().expect("ip")),
        ]);
        assert_eq!(
            placeholder_pods(&object),
            BTreeSet::from([pod("x/a"), pod("x/b"), pod("y/a")])
        );
        let out = substitute_ips(&object, &ips).expect("all IPs known");
        assert_eq!(
            out,
            serde_json::json!({
                "kind": "NetworkPolicy",
                "metadata": {"name": "10.0.0.1"},
                "spec": {"egress": [{"to": [{"ipBlock": {
                    "cidr": "0.0.0.0/0",
                    "except": ["10.0.0.2/32", "fd00::3/32 and 10.0.0.2"],
                }}]}], "n": 5, "flag": true},
            })
        );
        let missing = substitute_ips(&object, &BTreeMap::new()).expect_err("no IPs");
        assert!(matches!(missing, Error::MissingPodIp { .. }));
    }

    #[test]
    fn model_helpers_follow_upstream_naming() {
        let model = CaseFile::parse(&format!("{MODEL}cases: []"), "test")
            .expect("model")
            .model;
        assert_eq!(model.pod_refs().len(), 9);
        assert_eq!(model.pod_refs()[3], pod("y/a"));
        assert_eq!(model.namespace_labels("y")[NAMESPACE_NAME_LABEL], "y");
        assert_eq!(model.namespace_labels("y")["ns"], "y");
        assert_eq!(model.pod_labels(&pod("y/c"))["pod"], "c");
        let ports = model.container_ports();
        assert_eq!(ports.len(), 6);
        assert!(ports.contains(&("serve-81-sctp".to_owned(), 81, Protocol::Sctp)));
    }
    #[test]
    fn service_node_and_external_sides_parse_and_display() {
        let pattern: PairPattern = "node:2 -> svc:y/web".parse().expect("pattern");
        assert_eq!(pattern.from, PodPattern::Other(Endpoint::Node(2)));
        assert_eq!(
            pattern.to,
            PodPattern::Other(Endpoint::Service(ServiceRef {
                namespace: "y".into(),
                name: "web".into()
            }))
        );
        assert_eq!(pattern.to_string(), "node:2 -> svc:y/web");
        assert_eq!(pattern.specificity(), 4);
        for text in ["x/a -> nodeport:y/web", "x/* -> external"] {
            let pattern: PairPattern = text.parse().expect(text);
            assert_eq!(pattern.to_string(), text);
        }
        for text in [
            "node:0 -> x/a",
            "node:one -> x/a",
            "x/a -> svc:web",
            "x/a -> svc:y/*",
        ] {
            assert!(text.parse::<PairPattern>().is_err(), "{text} parsed");
        }
    }

    #[test]
    fn non_pod_sides_are_checked_for_their_role_and_namespace() {
        for (pattern, wanted) in [
            ("svc:y/web -> x/a", "destinations, not clients"),
            ("external -> x/a", "destinations, not clients"),
            ("x/a -> node:1", "not a destination"),
        ] {
            let error = error_of(&format!(
                "  - name: p\n    steps: [{{expect: [{{allow: [\"{pattern}\"]}}]}}]\n"
            ));
            assert!(error.contains(wanted), "{pattern}: {error}");
        }
        let error =
            error_of("  - name: p\n    steps: [{expect: [{allow: [\"x/a -> svc:w/web\"]}]}]\n");
        assert!(error.contains("namespace \"w\""), "{error}");
    }

    #[test]
    fn default_covers_pod_pairs_only_and_is_optional() {
        let file = file(
            r#"
  - name: p
    steps:
      - expect:
          - ports: [8080]
            protocols: [TCP]
            allow: ["x/* -> svc:y/web", "node:1 -> y/a"]
            deny: ["x/b -> svc:y/web"]
          - default: deny
            allow: ["*/* -> external"]
"#,
        )
        .expect("valid file");
        let named = &file.cases[0].steps[0].expect[0];
        assert_eq!(named.default, None);
        assert_eq!(
            named.ports,
            vec![8080],
            "Service ports need not be model ports"
        );
        assert_eq!(named.verdict(&pod("x/a"), &pod("y/a")), None);
        assert_eq!(
            named.verdict(&pod("x/a"), &pod("x/a")),
            None,
            "unnamed self pair"
        );
        let svc = Endpoint::Service(ServiceRef {
            namespace: "y".into(),
            name: "web".into(),
        });
        let pairs = named.named_pairs(&file.model);
        assert_eq!(pairs.len(), 4);
        assert!(pairs.contains(&(Endpoint::Node(1), Endpoint::Pod(pod("y/a")))));
        assert_eq!(
            named.endpoint_verdict(&Endpoint::Pod(pod("x/a")), &svc),
            Some(Verdict::Allow)
        );
        assert_eq!(
            named.endpoint_verdict(&Endpoint::Pod(pod("x/b")), &svc),
            Some(Verdict::Deny)
        );
        assert_eq!(
            named.endpoint_verdict(&Endpoint::Pod(pod("y/a")), &svc),
            None
        );

        let defaulted = &file.cases[0].steps[0].expect[1];
        // `default` and `*/*` never reach beyond pods...
        assert_eq!(
            defaulted.endpoint_verdict(&Endpoint::Node(1), &Endpoint::Pod(pod("x/a"))),
            None
        );
        assert_eq!(
            defaulted.endpoint_verdict(&Endpoint::Pod(pod("x/a")), &svc),
            None
        );
        // ...while a pattern naming the external host does.
        assert_eq!(
            defaulted.endpoint_verdict(&Endpoint::Pod(pod("z/c")), &Endpoint::External),
            Some(Verdict::Allow)
        );
        assert_eq!(
            defaulted.verdict(&pod("x/a"), &pod("y/b")),
            Some(Verdict::Deny)
        );
        assert_eq!(defaulted.named_pairs(&file.model).len(), 9);
        // A block with `default` still only takes model ports.
        let error =
            error_of("  - name: p\n    steps: [{expect: [{default: allow, ports: [8080]}]}]\n");
        assert!(error.contains("port 8080"), "{error}");
    }

    #[test]
    fn backends_and_same_backend_load() {
        let file = file(
            r#"
  - name: p
    steps:
      - expect:
          - ports: [80]
            protocols: [TCP]
            backends: {"x/a -> svc:y/web": ["y/a", "y/b"], "node:2 -> svc:y/web": ["y/c"]}
            same_backend: ["x/b -> svc:y/web"]
"#,
        )
        .expect("valid file");
        let block = &file.cases[0].steps[0].expect[0];
        assert_eq!(block.backends.len(), 2);
        let (from, _, pods) = block
            .backends
            .iter()
            .find(|(from, _, _)| *from == Endpoint::Pod(pod("x/a")))
            .expect("x/a entry");
        assert_eq!(*from, Endpoint::Pod(pod("x/a")));
        assert_eq!(*pods, BTreeSet::from([pod("y/a"), pod("y/b")]));
        assert_eq!(block.same_backend.len(), 1);
        for bad in [
            "backends: {\"x/* -> svc:y/web\": [\"y/a\"]}",
            "backends: {\"x/a -> y/a\": [\"y/a\"]}",
            "backends: {\"x/a -> svc:y/web\": [\"q/a\"]}",
            "same_backend: [\"x/a -> external\"]",
        ] {
            let text = format!("  - name: p\n    steps: [{{expect: [{{{bad}}}]}}]\n");
            assert!(file_err(&text), "{bad} accepted");
        }
    }

    fn file_err(cases: &str) -> bool {
        file(cases).is_err()
    }

    #[test]
    fn nodes_tag_is_read_and_validated() {
        let file = file("  - name: p\n    tags: [service, nodes=2]\n    steps: [{expect: []}]\n")
            .expect("valid");
        assert_eq!(file.cases[0].required_nodes(), Some(2));
        let error = error_of("  - name: p\n    tags: [nodes=0]\n    steps: [{expect: []}]\n");
        assert!(error.contains("nodes=0"), "{error}");
        let error = error_of("  - name: p\n    tags: [nodes=two]\n    steps: [{expect: []}]\n");
        assert!(error.contains("nodes=two"), "{error}");
    }

    #[test]
    fn external_ip_placeholder_is_substituted() {
        let object = serde_json::json!({"cidr": "{{ip external}}/32", "other": "{{ip x/a}}"});
        assert!(uses_external_ip(&object));
        assert_eq!(placeholder_pods(&object), BTreeSet::from([pod("x/a")]));
        let ips = BTreeMap::from([(pod("x/a"), "10.0.0.1".parse().expect("ip"))]);
        let out = substitute(&object, &ips, Some("203.0.113.10".parse().expect("ip")))
            .expect("substituted");
        assert_eq!(
            out,
            serde_json::json!({"cidr": "203.0.113.10/32", "other": "10.0.0.1"})
        );
        assert!(matches!(
            substitute(&object, &ips, None),
            Err(Error::MissingExternalIp)
        ));
        assert!(!uses_external_ip(
            &serde_json::json!({"cidr": "{{ip x/a}}/32"})
        ));
    }
}
