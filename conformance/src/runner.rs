//! Plays case files through a cluster [`Driver`] and reports, case by case, whether the
//! observed reachability matches the expected one.
//!
//! # Flow
//!
//! For every case: [`Driver::reset`], then for every step, in the order the format
//! prescribes: pod labels, namespace labels (with `kubernetes.io/metadata.name` kept),
//! `apply` in list order (after `{{ip ns/pod}}` substitution), `delete`, [`Driver::sync`],
//! and finally each expect block: the full matrix of probes (every from pod × every to pod,
//! self pairs included, × every port × every protocol of the block) in one concurrent
//! [`Driver::probe`] call. A case keeps running after a step with mismatches (later steps
//! often tell what went wrong) but stops at the first driver error, since the cluster's
//! state is then unknown.
//!
//! # Re-probing: few false failures, no false passes
//!
//! A first observation that disagrees with the expectation is re-probed before it is
//! reported, with rules that differ by direction because the two kinds of error differ:
//!
//! * **Expected allow, observed denied.** A denial can be an accident (a lost SYN inside a
//!   short timeout, a slow first neighbour resolution). The pair is re-probed up to
//!   [`RetryPolicy::allow_retries`] times, one round after another, each with the longer
//!   [`RetryPolicy::retry_timeout`]. A completed connection is positive proof that the path
//!   is open, so any connected attempt makes the pair pass; it is still listed as re-probed
//!   in the report.
//! * **Expected deny, observed connected.** A connection is never an accident: a packet got
//!   through. The only excuse is that the change had not reached the dataplane yet, and
//!   propagation is monotonic — once a policy is in force every later probe is denied. So
//!   after [`RetryPolicy::propagation_grace`] the pair is probed
//!   [`RetryPolicy::deny_confirmations`] more times, sequentially, each a fresh attempt with
//!   the *longer* timeout (so a slow but open path shows as connected rather than timing out
//!   into a pass). The pair passes only if every one of those attempts is denied; the first
//!   connected attempt ends the retries and the pair fails. With
//!   `deny_confirmations == 0` a connected expected-deny pair fails at once.
//! * **Probe errors** (the probe could not be made at all) are never retried and always
//!   fail: they say nothing about the dataplane, and hiding them would hide a broken
//!   harness.
//!
//! Re-probes of all pairs that need them run together, one round per attempt, so a step
//! with mismatches costs a few timeouts, not a few timeouts per pair.
//!
//! # Services, nodes and the outside
//!
//! Pairs with a `node:N` client or a `svc:`, `nodeport:` or `external` destination are
//! probed only where a pattern names them (as are pod pairs of a block without `default`),
//! through [`Driver::probe_endpoints`]. A nodePort pair is one pair per node address.
//! A Service or nodePort pair is judged on rounds of [`SERVICE_ATTEMPTS`] fresh connections
//! made one after another (a new source port each), so that every backend the Service may
//! pick gets its chance to show a wrong verdict: a round is *connected* when all of its
//! attempts connected and *denied* when none did. The rules above then apply with rounds in
//! place of attempts: expected allow passes on a connected round (a retry is a complete new
//! round, never a completion of a partial one); expected deny passes on a denied first
//! round, or, after the grace period, when every confirmation round is denied. A round with
//! a mix of outcomes is neither, so it never passes a pair.
//!
//! `backends` and `same_backend` checks make [`BACKEND_ATTEMPTS`] and
//! [`SAME_BACKEND_ATTEMPTS`] sequential connections with the retry timeout and are not
//! retried: `backends` passes when the pods that answered are exactly the listed set,
//! `same_backend` when every connection connected and one pod answered them all. An answer
//! without the server's identity fails both.
//!
//! A case tagged `nodes=N` runs only when the cluster has exactly N nodes
//! ([`Driver::node_count`], else the model's `nodes`); otherwise it is skipped.
//!
//! # IP families
//!
//! [`RunOptions::families`] says which families the run uses; every case runs once per
//! family (a pass), the IPv4 pass first, and under dual stack each report's name ends in
//! ` [ipv4]` or ` [ipv6]`. A pass takes pod, Service and external addresses of its family
//! only. An IPv6 pass rewrites applied objects first ([`crate::family::adapt_object`]) and
//! skips cases that are IPv4-only ([`crate::family::ipv4_only_reason`]) or need what the
//! cluster lacks in that family ([`Driver::unsupported`]), with the reason in the report.
//!
//! # Output
//!
//! For a failing step, every (port, protocol) of each failing block gets the expected and
//! the observed matrix in the upstream truth-table style (rows = from, columns = to, `.`
//! allowed, `X` denied, `?` probe error, `*` after a cell that does not match), followed by
//! one line per mismatching pair with every attempt's outcome. Each case ends with
//! `PASS|FAIL|SKIP <name> (<duration>)` and the run with `N passed, M failed` (then
//! `, K skipped` when any case was skipped). [`RunOptions::verbose`] prints the tables of
//! every block, passing or not. [`run`] also returns a [`RunSummary`] (serializable to JSON)
//! with the same facts.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::future::Future;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::cases::{
    BACKEND_ATTEMPTS, Case, CaseFile, Endpoint, Expectation, Labels, Model, NAMESPACE_NAME_LABEL,
    ObjectRef, PodRef, Protocol, SAME_BACKEND_ATTEMPTS, SERVICE_ATTEMPTS, ServiceRef, Step,
    Verdict, placeholder_pods, substitute, uses_external_ip,
};
use crate::family::{Families, Family, Need, adapt_object, case_needs, ipv4_only_reason};
use crate::probe::ProbeOutcome;
use crate::{Error, Result};

/// One connectivity check for [`Driver::probe`]: a client in pod `from` connects to
/// `target` (pod `to`'s IP and a port) over `protocol`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub from: PodRef,
    pub to: PodRef,
    pub target: SocketAddr,
    pub protocol: Protocol,
    /// How long the driver waits for the connection before reporting
    /// [`ProbeOutcome::TimedOut`].
    pub timeout: Duration,
}

/// One connectivity check for [`Driver::probe_endpoints`]: a client at `from` (a pod or a
/// node's host network namespace) connects to `target` over `protocol`; `to` says what the
/// target stands for (a pod, a Service's ClusterIP, a nodePort, the external host).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointProbe {
    pub from: Endpoint,
    pub to: Endpoint,
    pub target: SocketAddr,
    pub protocol: Protocol,
    pub timeout: Duration,
}

/// What an [`EndpointProbe`] saw: the outcome and, for a connection, who answered (`ns/pod`
/// of the serving pod, `external` for the external host) when the server told.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Answer {
    pub outcome: ProbeOutcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answered_by: Option<String>,
}

impl Answer {
    pub fn error(message: impl Into<String>) -> Self {
        Answer {
            outcome: ProbeOutcome::Error(message.into()),
            answered_by: None,
        }
    }

    fn describe(&self) -> String {
        match &self.answered_by {
            Some(who) => format!("{} by {who}", self.outcome.describe()),
            None => self.outcome.describe(),
        }
    }
}

/// A cluster the runner can drive: the local netns cluster, a kind cluster, or a fake.
///
/// The driver is built from the case file's [`Model`] (with any command-line overrides of
/// `nodes`/`topology` already written into it) before [`run`] is called: every namespace
/// holds every pod, each pod serves every model port on every model protocol under the
/// container port names of [`Model::container_ports`], and labels are
/// [`Model::namespace_labels`] / [`Model::pod_labels`].
///
/// Methods return `Send` futures so that a run can be spawned on a multi-threaded runtime;
/// implementations may simply write `async fn`.
pub trait Driver {
    /// What the driver's operations fail with; only ever displayed.
    type Error: fmt::Display;

    /// Whether cases tagged `experimental` (fields of an API's experimental channel) can
    /// run. Cases the driver cannot run are reported as skipped, never as passed.
    fn supports_experimental(&self) -> bool {
        false
    }

    /// The pod's address of `family`, for probes and for `{{ip ns/pod}}`, or `None` if the
    /// pod has none.
    fn pod_ip(&self, pod: &PodRef, family: Family) -> impl Future<Output = Option<IpAddr>> + Send;

    /// Returns the cluster to the model's initial state: deletes every object created by
    /// `apply` in earlier cases (policies of every kind) and restores every pod's and
    /// namespace's initial labels. Need not wait for the dataplane; the runner calls
    /// [`Driver::sync`] before probing.
    fn reset(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Replaces all labels of a pod.
    fn set_pod_labels(
        &mut self,
        pod: &PodRef,
        labels: Labels,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Replaces all labels of a namespace. The runner has already added
    /// `kubernetes.io/metadata.name`.
    fn set_namespace_labels(
        &mut self,
        namespace: &str,
        labels: Labels,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Creates or replaces an object (placeholders already substituted).
    fn apply(&mut self, object: Value) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Deletes an object.
    fn delete(
        &mut self,
        object: &ObjectRef,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Returns once the dataplane reflects every change made so far (a barrier: the runner
    /// probes right after it).
    fn sync(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Runs every probe, concurrently, and returns one outcome per probe in the same order.
    /// [`crate::probe::probe_many`] does exactly this given each pod's network namespace.
    fn probe(&self, probes: &[Probe]) -> impl Future<Output = Vec<ProbeOutcome>> + Send;

    /// How many nodes the cluster has, if known (cases tagged `nodes=N` run only when it is
    /// N; the model's `nodes` is used when this is `None`).
    fn node_count(&self) -> Option<usize> {
        None
    }

    /// The address of `family` of the host outside the cluster (`external`,
    /// `{{ip external}}`).
    fn external_ip(&self, family: Family) -> Option<IpAddr> {
        let _ = family;
        None
    }

    /// The ClusterIP of `family` and the Service port a client uses for `service`'s port
    /// `port`/`protocol`.
    fn service_target(
        &self,
        service: &ServiceRef,
        port: u16,
        protocol: Protocol,
        family: Family,
    ) -> Result<SocketAddr, String> {
        let _ = (port, protocol, family);
        Err(format!("this cluster cannot probe Service {service}"))
    }

    /// Every node's address of `family` with the nodePort of `service`'s port
    /// `port`/`protocol`, in node order.
    fn node_port_targets(
        &self,
        service: &ServiceRef,
        port: u16,
        protocol: Protocol,
        family: Family,
    ) -> Result<Vec<SocketAddr>, String> {
        let _ = (port, protocol, family);
        Err(format!("this cluster cannot probe nodePorts of {service}"))
    }

    /// Why cases that use `need` cannot run in this cluster's `family` pass, if they cannot
    /// (they are then reported skipped with this reason, never passed). By default an IPv6
    /// pass lacks the external host when [`Driver::external_ip`] has no IPv6 address.
    fn unsupported(&self, family: Family, need: Need) -> Option<String> {
        match (family, need) {
            (Family::Ipv6, Need::External) if self.external_ip(family).is_none() => {
                Some("the external host has no IPv6 address".to_owned())
            }
            _ => None,
        }
    }

    /// Runs probes from any source to any target, concurrently, one answer per probe in the
    /// same order. Drivers that cannot make them answer every probe with an error, which
    /// fails the pairs (never passes them).
    fn probe_endpoints(
        &self,
        probes: &[EndpointProbe],
    ) -> impl Future<Output = Vec<Answer>> + Send {
        let count = probes.len();
        async move {
            (0..count)
                .map(|_| Answer::error("this cluster cannot probe from nodes or to Services"))
                .collect()
        }
    }
}

/// How suspicious first observations are re-probed (see the module docs for the rules).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Extra attempts for a pair expected allowed but observed denied.
    pub allow_retries: u32,
    /// Attempts after the grace period that must all be denied for a pair expected denied
    /// but first observed connected.
    pub deny_confirmations: u32,
    /// Timeout of every re-probe (longer than the first probe's).
    pub retry_timeout: Duration,
    /// Wait before re-probing a pair that connected but should be denied.
    pub propagation_grace: Duration,
    /// Wait between other re-probe rounds.
    pub retry_pause: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            allow_retries: 2,
            deny_confirmations: 2,
            retry_timeout: Duration::from_secs(3),
            propagation_grace: Duration::from_secs(1),
            retry_pause: Duration::from_millis(200),
        }
    }
}

/// Options of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOptions {
    /// Timeout of each first probe.
    pub probe_timeout: Duration,
    pub retry: RetryPolicy,
    /// Print every block's tables, not only failing ones.
    pub verbose: bool,
    /// Run only cases whose name contains this text (others are not counted).
    pub case_filter: Option<String>,
    /// Cases with any of these tags are reported skipped (a known gap of the cluster under
    /// test), never run and never passed.
    pub skip_tags: Vec<String>,
    /// The run's IP families: one pass per family over every case (see [`crate::family`]).
    pub families: Families,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            probe_timeout: Duration::from_secs(1),
            retry: RetryPolicy::default(),
            verbose: false,
            case_filter: None,
            skip_tags: Vec::new(),
            families: Families::default(),
        }
    }
}

/// Result of a whole run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunSummary {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub cases: Vec<CaseReport>,
}

impl RunSummary {
    /// No case failed (skipped cases do not count against a run).
    pub fn success(&self) -> bool {
        self.failed == 0
    }

    /// The summary as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail (no maps with non-string keys, no
        // custom serializers that error).
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The closing line: `N passed, M failed` and `, K skipped` when any were skipped.
    pub fn closing_line(&self) -> String {
        let mut line = format!("{} passed, {} failed", self.passed, self.failed);
        if self.skipped > 0 {
            let _ = write!(line, ", {} skipped", self.skipped);
        }
        line
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CaseStatus {
    Pass,
    Fail,
    Skip,
}

impl fmt::Display for CaseStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CaseStatus::Pass => "PASS",
            CaseStatus::Fail => "FAIL",
            CaseStatus::Skip => "SKIP",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CaseReport {
    pub name: String,
    pub status: CaseStatus,
    pub duration_seconds: f64,
    /// Why the case was skipped, or the driver error that ended it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub steps: Vec<StepReport>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepReport {
    /// 1-based step number.
    pub step: usize,
    /// The driver error that stopped the case at this step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub blocks: Vec<BlockReport>,
}

impl StepReport {
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.blocks.iter().all(BlockReport::passed)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BlockReport {
    /// 1-based index of the expect block within its step.
    pub block: usize,
    /// Number of (from, to, port, protocol) pairs checked.
    pub pairs: usize,
    /// Pairs whose final result does not match.
    pub mismatches: Vec<PairReport>,
    /// Pairs that match only after re-probing.
    pub reprobed: Vec<PairReport>,
    /// Every pair with a node source or a Service, nodePort or external destination.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub named: Vec<NamedPairReport>,
    /// Every `backends` and `same_backend` check.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendReport>,
}

impl BlockReport {
    pub fn passed(&self) -> bool {
        self.mismatches.is_empty()
            && self.named.iter().all(|pair| pair.passed)
            && self.backends.iter().all(|check| check.passed)
    }
}

/// A pair with a non-pod side: every round of attempts (one attempt a round, or
/// [`SERVICE_ATTEMPTS`] for a Service or nodePort), first round first.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NamedPairReport {
    pub from: Endpoint,
    pub to: Endpoint,
    /// For a nodePort: the node (1-based) whose address was probed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<usize>,
    pub port: u16,
    pub protocol: Protocol,
    pub expected: Verdict,
    pub passed: bool,
    pub rounds: Vec<Vec<Answer>>,
}

impl fmt::Display for NamedPairReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.from, self.to)?;
        if let Some(node) = self.node {
            write!(f, " (node {node})")?;
        }
        write!(
            f,
            " {}/{}: expected {}, observed ",
            self.protocol, self.port, self.expected
        )?;
        let rounds: Vec<String> = self.rounds.iter().map(|round| summarize(round)).collect();
        f.write_str(&rounds.join("; then "))
    }
}

/// `connected by y/a ×3, timed out ×1` for a list of answers, in first-seen order.
fn summarize(answers: &[Answer]) -> String {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for answer in answers {
        let text = answer.describe();
        match counts.iter_mut().find(|(seen, _)| *seen == text) {
            Some((_, count)) => *count += 1,
            None => counts.push((text, 1)),
        }
    }
    counts
        .into_iter()
        .map(|(text, count)| format!("{text} x{count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A `backends` or `same_backend` check and every answer it got.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendReport {
    pub from: Endpoint,
    pub to: Endpoint,
    pub port: u16,
    pub protocol: Protocol,
    /// `backends [y/a, y/b]` or `one backend`.
    pub expected: String,
    pub passed: bool,
    pub answers: Vec<Answer>,
}

impl fmt::Display for BackendReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} {}/{}: expected {}, observed {}",
            self.from,
            self.to,
            self.protocol,
            self.port,
            self.expected,
            summarize(&self.answers)
        )
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PairReport {
    pub from: PodRef,
    pub to: PodRef,
    pub port: u16,
    pub protocol: Protocol,
    pub expected: Verdict,
    /// Every attempt's outcome, first probe first.
    pub attempts: Vec<ProbeOutcome>,
}

impl fmt::Display for PairReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} {}/{}: expected {}, observed {}",
            self.from,
            self.to,
            self.protocol,
            self.port,
            self.expected,
            self.attempts
                .iter()
                .map(ProbeOutcome::describe)
                .collect::<Vec<_>>()
                .join(", then "),
        )
    }
}

/// Runs every case of `file` through `driver`, writing the human report to `out`.
///
/// Fails only if writing to `out` fails; driver errors and mismatches are part of the
/// summary.
pub async fn run<D: Driver>(
    file: &CaseFile,
    driver: &mut D,
    options: &RunOptions,
    out: &mut (dyn Write + Send),
) -> Result<RunSummary> {
    let mut summary = RunSummary {
        passed: 0,
        failed: 0,
        skipped: 0,
        cases: Vec::new(),
    };
    for case in &file.cases {
        if let Some(filter) = &options.case_filter
            && !case.name.contains(filter.as_str())
        {
            continue;
        }
        let passes = options.families.passes();
        for &family in passes {
            let mut text = String::new();
            let mut report = run_case(&file.model, case, family, driver, options, &mut text).await;
            // Under dual stack every case runs once per family: the name says which pass.
            if passes.len() > 1 {
                report.name = format!("{} [{family}]", report.name);
            }
            let _ = writeln!(
                text,
                "{} {} ({:.2}s)",
                report.status, report.name, report.duration_seconds
            );
            out.write_all(text.as_bytes()).map_err(Error::Output)?;
            out.flush().map_err(Error::Output)?;
            match report.status {
                CaseStatus::Pass => summary.passed += 1,
                CaseStatus::Fail => summary.failed += 1,
                CaseStatus::Skip => summary.skipped += 1,
            }
            summary.cases.push(report);
        }
    }
    writeln!(out, "{}", summary.closing_line()).map_err(Error::Output)?;
    Ok(summary)
}

async fn run_case<D: Driver>(
    model: &Model,
    case: &Case,
    family: Family,
    driver: &mut D,
    options: &RunOptions,
    text: &mut String,
) -> CaseReport {
    let started = Instant::now();
    let mut report = CaseReport {
        name: case.name.clone(),
        status: CaseStatus::Pass,
        duration_seconds: 0.0,
        reason: None,
        steps: Vec::new(),
    };
    if case.is_experimental() && !driver.supports_experimental() {
        let reason = "uses experimental API fields this cluster does not support";
        let _ = writeln!(text, "  skipped: {reason}");
        report.status = CaseStatus::Skip;
        report.reason = Some(reason.to_owned());
        return report;
    }
    if let Some(tag) = case.tags.iter().find(|t| options.skip_tags.contains(t)) {
        let reason = format!("tagged {tag}, which this run skips");
        let _ = writeln!(text, "  skipped: {reason}");
        report.status = CaseStatus::Skip;
        report.reason = Some(reason);
        return report;
    }
    let family_gap = match family {
        Family::Ipv4 => None,
        Family::Ipv6 => ipv4_only_reason(case),
    }
    .or_else(|| {
        case_needs(case)
            .into_iter()
            .find_map(|need| driver.unsupported(family, need))
            .map(|reason| format!("{family} pass: {reason}"))
    });
    if let Some(reason) = family_gap {
        let _ = writeln!(text, "  skipped: {reason}");
        report.status = CaseStatus::Skip;
        report.reason = Some(reason);
        return report;
    }
    if let Some(required) = case.required_nodes() {
        let nodes = driver
            .node_count()
            .or(model.nodes.map(|nodes| nodes as usize));
        if nodes != Some(required as usize) {
            let reason = match nodes {
                Some(nodes) => format!("holds only on {required} nodes; this cluster has {nodes}"),
                None => {
                    format!("holds only on {required} nodes; this cluster's node count is unknown")
                }
            };
            let _ = writeln!(text, "  skipped: {reason}");
            report.status = CaseStatus::Skip;
            report.reason = Some(reason);
            report.duration_seconds = started.elapsed().as_secs_f64();
            return report;
        }
    }
    if let Err(error) = driver.reset().await {
        let reason = format!("resetting the cluster: {error}");
        let _ = writeln!(text, "  error: {reason}");
        report.status = CaseStatus::Fail;
        report.reason = Some(reason);
    } else {
        for (index, step) in case.steps.iter().enumerate() {
            let (step_report, tables) =
                run_step(model, step, index + 1, family, driver, options).await;
            let passed = step_report.passed();
            write_step(text, &step_report, &tables, options.verbose);
            if !passed {
                report.status = CaseStatus::Fail;
            }
            let error = step_report.error.clone();
            report.steps.push(step_report);
            if let Some(error) = error {
                report.reason = Some(error);
                break;
            }
        }
    }
    report.duration_seconds = started.elapsed().as_secs_f64();
    report
}

/// Applies a step's changes in the format's order, syncs, and checks its expectations.
async fn run_step<D: Driver>(
    model: &Model,
    step: &Step,
    number: usize,
    family: Family,
    driver: &mut D,
    options: &RunOptions,
) -> (StepReport, Vec<BlockTables>) {
    let mut report = StepReport {
        step: number,
        error: None,
        blocks: Vec::new(),
    };
    if let Err(error) = apply_changes(step, family, driver).await {
        report.error = Some(error);
        return (report, Vec::new());
    }
    if let Err(error) = driver.sync().await {
        report.error = Some(format!("waiting for the dataplane: {error}"));
        return (report, Vec::new());
    }
    let mut tables = Vec::new();
    for (index, block) in step.expect.iter().enumerate() {
        let (block_report, block_tables) =
            check_block(model, block, index + 1, family, driver, options).await;
        report.blocks.push(block_report);
        tables.push(block_tables);
    }
    (report, tables)
}

async fn apply_changes<D: Driver>(
    step: &Step,
    family: Family,
    driver: &mut D,
) -> Result<(), String> {
    for (pod, labels) in &step.set_pod_labels {
        driver
            .set_pod_labels(pod, labels.clone())
            .await
            .map_err(|error| format!("setting labels of pod {pod}: {error}"))?;
    }
    for (namespace, labels) in &step.set_namespace_labels {
        let mut labels = labels.clone();
        labels.insert(NAMESPACE_NAME_LABEL.to_owned(), namespace.clone());
        driver
            .set_namespace_labels(namespace, labels)
            .await
            .map_err(|error| format!("setting labels of namespace {namespace}: {error}"))?;
    }
    for object in &step.apply {
        let object = &adapt_object(object, family);
        let mut ips = BTreeMap::new();
        for pod in placeholder_pods(object) {
            if let Some(ip) = driver.pod_ip(&pod, family).await {
                ips.insert(pod, ip);
            }
        }
        let external = if uses_external_ip(object) {
            driver.external_ip(family)
        } else {
            None
        };
        let object = substitute(object, &ips, external).map_err(|error| error.to_string())?;
        let name = object_name(&object);
        driver
            .apply(object)
            .await
            .map_err(|error| format!("applying {name}: {error}"))?;
    }
    for object in &step.delete {
        driver
            .delete(object)
            .await
            .map_err(|error| format!("deleting {object}: {error}"))?;
    }
    Ok(())
}

/// `Kind namespace/name` of an object, for messages.
fn object_name(object: &Value) -> String {
    let text = |value: Option<&Value>| value.and_then(Value::as_str).unwrap_or("?").to_owned();
    let metadata = object.get("metadata");
    let name = text(metadata.and_then(|metadata| metadata.get("name")));
    match metadata.and_then(|metadata| metadata.get("namespace")) {
        Some(namespace) => format!(
            "{} {}/{name}",
            text(object.get("kind")),
            text(Some(namespace))
        ),
        None => format!("{} {name}", text(object.get("kind"))),
    }
}

/// One (from, to, port, protocol) pair of a block and what was seen for it.
struct Cell {
    from: usize,
    to: usize,
    port: u16,
    protocol: Protocol,
    /// `None`: the block does not name the pair, which is not probed.
    expected: Option<Verdict>,
    target: Option<SocketAddr>,
    attempts: Vec<ProbeOutcome>,
}

impl Cell {
    fn passed(&self, policy: &RetryPolicy) -> bool {
        let Some(expected) = self.expected else {
            return true;
        };
        let Some(first) = self.attempts.first() else {
            return false;
        };
        match expected {
            Verdict::Allow => self.attempts.iter().any(ProbeOutcome::is_connected),
            Verdict::Deny => {
                first.is_denied()
                    || (first.is_connected()
                        && policy.deny_confirmations > 0
                        && self.attempts.len() == 1 + policy.deny_confirmations as usize
                        && self.attempts[1..].iter().all(ProbeOutcome::is_denied))
            }
        }
    }

    /// Whether another attempt could still change the result.
    fn wants_retry(&self, policy: &RetryPolicy) -> bool {
        let (Some(first), Some(last)) = (self.attempts.first(), self.attempts.last()) else {
            return false;
        };
        if matches!(last, ProbeOutcome::Error(_)) || self.target.is_none() {
            return false;
        }
        let Some(expected) = self.expected else {
            return false;
        };
        match expected {
            Verdict::Allow => {
                !self.attempts.iter().any(ProbeOutcome::is_connected)
                    && self.attempts.len() < 1 + policy.allow_retries as usize
            }
            Verdict::Deny => {
                first.is_connected()
                    && !self.attempts[1..].iter().any(ProbeOutcome::is_connected)
                    && self.attempts.len() < 1 + policy.deny_confirmations as usize
            }
        }
    }

    /// The outcome that decides the cell's observed verdict: a connection if one happened
    /// where allow was expected (proof of an open path) or anywhere after the first attempt
    /// where deny was expected; otherwise the last attempt.
    fn observed(&self) -> Option<&ProbeOutcome> {
        let connected = match self.expected? {
            Verdict::Allow => self.attempts.iter().find(|outcome| outcome.is_connected()),
            Verdict::Deny => self
                .attempts
                .get(1..)
                .unwrap_or_default()
                .iter()
                .rfind(|outcome| outcome.is_connected()),
        };
        connected.or(self.attempts.last())
    }

    fn report(&self, pods: &[PodRef]) -> PairReport {
        PairReport {
            from: pods[self.from].clone(),
            to: pods[self.to].clone(),
            port: self.port,
            protocol: self.protocol,
            // Only probed cells are reported, and only those have an expectation.
            expected: self.expected.unwrap_or(Verdict::Allow),
            attempts: self.attempts.clone(),
        }
    }
}

/// What is needed to print a block's tables.
struct BlockTables {
    pods: Vec<PodRef>,
    /// `(port, protocol, expected marks, observed marks)` with marks indexed
    /// `[from * pods + to]`.
    tables: Vec<(u16, Protocol, Vec<char>, Vec<String>)>,
}

async fn check_block<D: Driver>(
    model: &Model,
    block: &Expectation,
    number: usize,
    family: Family,
    driver: &D,
    options: &RunOptions,
) -> (BlockReport, BlockTables) {
    let pods = model.pod_refs();
    let mut ips = Vec::with_capacity(pods.len());
    for pod in &pods {
        ips.push(driver.pod_ip(pod, family).await);
    }
    let mut cells = Vec::new();
    for (port, protocol) in block.port_protocols() {
        for (from, from_pod) in pods.iter().enumerate() {
            for (to, to_pod) in pods.iter().enumerate() {
                cells.push(Cell {
                    from,
                    to,
                    port,
                    protocol,
                    expected: block.verdict(from_pod, to_pod),
                    target: ips[to].map(|ip| SocketAddr::new(ip, port)),
                    attempts: Vec::new(),
                });
            }
        }
    }

    // First round: every cell the block names.
    let all: Vec<usize> = (0..cells.len())
        .filter(|&index| cells[index].expected.is_some())
        .collect();
    probe_cells(driver, &pods, &mut cells, &all, options.probe_timeout).await;

    // Re-probe rounds (see the module docs).
    let policy = &options.retry;
    loop {
        let pending: Vec<usize> = (0..cells.len())
            .filter(|&index| cells[index].wants_retry(policy))
            .collect();
        if pending.is_empty() {
            break;
        }
        let awaiting_propagation = pending.iter().any(|&index| {
            cells[index].expected == Some(Verdict::Deny) && cells[index].attempts.len() == 1
        });
        tokio::time::sleep(if awaiting_propagation {
            policy.propagation_grace
        } else {
            policy.retry_pause
        })
        .await;
        probe_cells(driver, &pods, &mut cells, &pending, policy.retry_timeout).await;
    }

    let probed = cells.iter().filter(|cell| cell.expected.is_some()).count();
    let mut report = BlockReport {
        block: number,
        pairs: probed,
        mismatches: Vec::new(),
        reprobed: Vec::new(),
        named: check_named_pairs(model, block, family, driver, options).await,
        backends: check_backends(block, family, driver, options).await,
    };
    report.pairs += report.named.len() + report.backends.len();
    let mut tables = BlockTables {
        pods: pods.clone(),
        tables: Vec::new(),
    };
    if probed == 0 {
        return (report, tables);
    }
    let per_table = pods.len() * pods.len();
    for chunk in cells.chunks(per_table.max(1)) {
        let Some(first) = chunk.first() else { continue };
        let mut expected = Vec::with_capacity(chunk.len());
        let mut observed = Vec::with_capacity(chunk.len());
        for cell in chunk {
            let passed = cell.passed(policy);
            expected.push(match cell.expected {
                Some(Verdict::Allow) => '.',
                Some(Verdict::Deny) => 'X',
                None => '-',
            });
            let mark = match cell.observed() {
                _ if cell.expected.is_none() => '-',
                Some(ProbeOutcome::Connected) => '.',
                Some(outcome) if outcome.is_denied() => 'X',
                _ => '?',
            };
            observed.push(format!("{mark}{}", if passed { "" } else { "*" }));
            if !passed {
                report.mismatches.push(cell.report(&pods));
            } else if cell.attempts.len() > 1 {
                report.reprobed.push(cell.report(&pods));
            }
        }
        tables
            .tables
            .push((first.port, first.protocol, expected, observed));
    }
    (report, tables)
}

/// A pair with a node source or a Service, nodePort or external destination, and every
/// round of attempts made for it.
struct NamedCell {
    report: NamedPairReport,
    target: Result<SocketAddr, String>,
    /// Attempts a round: [`SERVICE_ATTEMPTS`] for a Service or nodePort, else 1.
    per_round: usize,
}

impl NamedCell {
    fn errored(&self) -> bool {
        self.report
            .rounds
            .iter()
            .flatten()
            .any(|answer| matches!(answer.outcome, ProbeOutcome::Error(_)))
    }

    /// The same rules as for pod pairs (see the module docs), with a round of attempts in
    /// place of one attempt: a round is connected when every attempt in it connected and
    /// denied when none did. Expected allow passes on a connected round (each retry round
    /// is a complete, new series); expected deny passes when the first round is denied, or
    /// when every confirmation round after the grace period is.
    fn passed(&self, policy: &RetryPolicy) -> bool {
        let rounds = &self.report.rounds;
        if rounds.is_empty() || self.errored() {
            return false;
        }
        let all_connected = |round: &Vec<Answer>| {
            !round.is_empty() && round.iter().all(|answer| answer.outcome.is_connected())
        };
        let all_denied =
            |round: &Vec<Answer>| round.iter().all(|answer| answer.outcome.is_denied());
        match self.report.expected {
            Verdict::Allow => rounds.iter().any(all_connected),
            Verdict::Deny => {
                all_denied(&rounds[0])
                    || (policy.deny_confirmations > 0
                        && rounds.len() == 1 + policy.deny_confirmations as usize
                        && rounds[1..].iter().all(all_denied))
            }
        }
    }

    fn wants_retry(&self, policy: &RetryPolicy) -> bool {
        let rounds = &self.report.rounds;
        if self.target.is_err() || rounds.is_empty() || self.errored() {
            return false;
        }
        let any_connected =
            |round: &Vec<Answer>| round.iter().any(|answer| answer.outcome.is_connected());
        match self.report.expected {
            Verdict::Allow => {
                !self.passed(policy) && rounds.len() < 1 + policy.allow_retries as usize
            }
            Verdict::Deny => {
                any_connected(&rounds[0])
                    && !rounds[1..].iter().any(any_connected)
                    && rounds.len() < 1 + policy.deny_confirmations as usize
            }
        }
    }
}

/// Where a probe to `to` goes on `port`/`protocol`: one target, or one per node for a
/// nodePort.
fn named_targets<D: Driver>(
    driver: &D,
    ips: &BTreeMap<PodRef, IpAddr>,
    to: &Endpoint,
    port: u16,
    protocol: Protocol,
    family: Family,
) -> Vec<(Option<usize>, Result<SocketAddr, String>)> {
    match to {
        Endpoint::Pod(pod) => vec![(
            None,
            ips.get(pod)
                .map(|ip| SocketAddr::new(*ip, port))
                .ok_or_else(|| format!("pod {pod} has no IP address")),
        )],
        Endpoint::Service(service) => {
            vec![(None, driver.service_target(service, port, protocol, family))]
        }
        Endpoint::NodePort(service) => {
            match driver.node_port_targets(service, port, protocol, family) {
                Ok(targets) => targets
                    .into_iter()
                    .enumerate()
                    .map(|(index, target)| (Some(index + 1), Ok(target)))
                    .collect(),
                Err(error) => vec![(None, Err(error))],
            }
        }
        Endpoint::External => vec![(
            None,
            driver
                .external_ip(family)
                .map(|ip| SocketAddr::new(ip, port))
                .ok_or_else(|| {
                    format!("this cluster has no external host with an {family} address")
                }),
        )],
        Endpoint::Node(node) => vec![(None, Err(format!("node:{node} is not a destination")))],
    }
}

async fn pod_ips<D: Driver>(driver: &D, model: &Model, family: Family) -> BTreeMap<PodRef, IpAddr> {
    let mut ips = BTreeMap::new();
    for pod in model.pod_refs() {
        if let Some(ip) = driver.pod_ip(&pod, family).await {
            ips.insert(pod, ip);
        }
    }
    ips
}

/// Probes every pair the block names with a non-pod side (see [`NamedCell`]).
async fn check_named_pairs<D: Driver>(
    model: &Model,
    block: &Expectation,
    family: Family,
    driver: &D,
    options: &RunOptions,
) -> Vec<NamedPairReport> {
    let pairs = block.named_pairs(model);
    if pairs.is_empty() {
        return Vec::new();
    }
    let ips = pod_ips(driver, model, family).await;
    let mut cells = Vec::new();
    for (port, protocol) in block.port_protocols() {
        for (from, to) in &pairs {
            let Some(expected) = block.endpoint_verdict(from, to) else {
                continue;
            };
            let per_round = match to {
                Endpoint::Service(_) | Endpoint::NodePort(_) => SERVICE_ATTEMPTS,
                _ => 1,
            };
            for (node, target) in named_targets(driver, &ips, to, port, protocol, family) {
                cells.push(NamedCell {
                    report: NamedPairReport {
                        from: from.clone(),
                        to: to.clone(),
                        node,
                        port,
                        protocol,
                        expected,
                        passed: false,
                        rounds: Vec::new(),
                    },
                    target,
                    per_round,
                });
            }
        }
    }
    let all: Vec<usize> = (0..cells.len()).collect();
    probe_named_round(driver, &mut cells, &all, options.probe_timeout).await;
    let policy = &options.retry;
    loop {
        let pending: Vec<usize> = (0..cells.len())
            .filter(|&index| cells[index].wants_retry(policy))
            .collect();
        if pending.is_empty() {
            break;
        }
        let awaiting_propagation = pending.iter().any(|&index| {
            cells[index].report.expected == Verdict::Deny && cells[index].report.rounds.len() == 1
        });
        tokio::time::sleep(if awaiting_propagation {
            policy.propagation_grace
        } else {
            policy.retry_pause
        })
        .await;
        probe_named_round(driver, &mut cells, &pending, policy.retry_timeout).await;
    }
    cells
        .into_iter()
        .map(|cell| {
            let passed = cell.passed(policy);
            NamedPairReport {
                passed,
                ..cell.report
            }
        })
        .collect()
}

/// One round for the cells at `indices`: their attempts run one after another for each
/// cell (fresh sockets, so a new source port each), different cells side by side.
async fn probe_named_round<D: Driver>(
    driver: &D,
    cells: &mut [NamedCell],
    indices: &[usize],
    timeout: Duration,
) {
    for &index in indices {
        cells[index].report.rounds.push(Vec::new());
    }
    let most = indices
        .iter()
        .map(|&index| cells[index].per_round)
        .max()
        .unwrap_or(0);
    for attempt in 0..most {
        let mut probes = Vec::new();
        let mut probed = Vec::new();
        for &index in indices {
            let cell = &mut cells[index];
            if attempt >= cell.per_round {
                continue;
            }
            match &cell.target {
                Ok(target) => {
                    probes.push(EndpointProbe {
                        from: cell.report.from.clone(),
                        to: cell.report.to.clone(),
                        target: *target,
                        protocol: cell.report.protocol,
                        timeout,
                    });
                    probed.push(index);
                }
                Err(error) => {
                    if let Some(round) = cell.report.rounds.last_mut() {
                        round.push(Answer::error(error.clone()));
                    }
                }
            }
        }
        let answers = endpoint_answers(driver, &probes).await;
        for (index, answer) in probed.into_iter().zip(answers) {
            if let Some(round) = cells[index].report.rounds.last_mut() {
                round.push(answer);
            }
        }
    }
}

/// [`Driver::probe_endpoints`], with a count mismatch turned into errors.
async fn endpoint_answers<D: Driver>(driver: &D, probes: &[EndpointProbe]) -> Vec<Answer> {
    if probes.is_empty() {
        return Vec::new();
    }
    let answers = driver.probe_endpoints(probes).await;
    if answers.len() == probes.len() {
        return answers;
    }
    let message = format!(
        "the driver returned {} answers for {} probes",
        answers.len(),
        probes.len()
    );
    probes
        .iter()
        .map(|_| Answer::error(message.clone()))
        .collect()
}

/// Runs the block's `backends` and `same_backend` checks on each of its ports and
/// protocols: their connections one after another per check, checks side by side.
async fn check_backends<D: Driver>(
    block: &Expectation,
    family: Family,
    driver: &D,
    options: &RunOptions,
) -> Vec<BackendReport> {
    struct Check {
        report: BackendReport,
        wanted: Option<std::collections::BTreeSet<String>>,
        attempts: usize,
        target: Result<SocketAddr, String>,
    }
    let mut checks = Vec::new();
    for (port, protocol) in block.port_protocols() {
        let target = |to: &Endpoint| match to {
            Endpoint::Service(service) => driver.service_target(service, port, protocol, family),
            other => Err(format!("{other} is not a Service")),
        };
        for (from, to, pods) in &block.backends {
            let wanted: std::collections::BTreeSet<String> =
                pods.iter().map(PodRef::to_string).collect();
            checks.push(Check {
                report: BackendReport {
                    from: from.clone(),
                    to: to.clone(),
                    port,
                    protocol,
                    expected: format!(
                        "backends [{}]",
                        wanted.iter().cloned().collect::<Vec<_>>().join(", ")
                    ),
                    passed: false,
                    answers: Vec::new(),
                },
                wanted: Some(wanted),
                attempts: BACKEND_ATTEMPTS,
                target: target(to),
            });
        }
        for (from, to) in &block.same_backend {
            checks.push(Check {
                report: BackendReport {
                    from: from.clone(),
                    to: to.clone(),
                    port,
                    protocol,
                    expected: "one backend".to_owned(),
                    passed: false,
                    answers: Vec::new(),
                },
                wanted: None,
                attempts: SAME_BACKEND_ATTEMPTS,
                target: target(to),
            });
        }
    }
    let most = checks.iter().map(|check| check.attempts).max().unwrap_or(0);
    for attempt in 0..most {
        let mut probes = Vec::new();
        let mut probed = Vec::new();
        for (index, check) in checks.iter_mut().enumerate() {
            if attempt >= check.attempts {
                continue;
            }
            match &check.target {
                Ok(target) => {
                    probes.push(EndpointProbe {
                        from: check.report.from.clone(),
                        to: check.report.to.clone(),
                        target: *target,
                        protocol: check.report.protocol,
                        // Every attempt is expected to connect: the longer timeout keeps a
                        // slow handshake from reading as a miss.
                        timeout: options.retry.retry_timeout,
                    });
                    probed.push(index);
                }
                Err(error) => check.report.answers.push(Answer::error(error.clone())),
            }
        }
        let answers = endpoint_answers(driver, &probes).await;
        for (index, answer) in probed.into_iter().zip(answers) {
            checks[index].report.answers.push(answer);
        }
    }
    checks
        .into_iter()
        .map(|check| {
            let answers = &check.report.answers;
            let errored = answers
                .iter()
                .any(|answer| matches!(answer.outcome, ProbeOutcome::Error(_)));
            // A connection whose server did not say who it is proves nothing either way.
            let unnamed = answers
                .iter()
                .any(|answer| answer.outcome.is_connected() && answer.answered_by.is_none());
            let answering: std::collections::BTreeSet<String> = answers
                .iter()
                .filter(|answer| answer.outcome.is_connected())
                .filter_map(|answer| answer.answered_by.clone())
                .collect();
            let passed = !errored
                && !unnamed
                && answers.len() == check.attempts
                && match &check.wanted {
                    // Each listed pod answered at least once and no other pod did.
                    Some(wanted) => answering == *wanted,
                    // Every connection made, all to one backend.
                    None => {
                        answers.iter().all(|answer| answer.outcome.is_connected())
                            && answering.len() == 1
                    }
                };
            BackendReport {
                passed,
                ..check.report
            }
        })
        .collect()
}

/// Probes the cells at `indices` once, concurrently, appending each outcome.
async fn probe_cells<D: Driver>(
    driver: &D,
    pods: &[PodRef],
    cells: &mut [Cell],
    indices: &[usize],
    timeout: Duration,
) {
    let mut probes = Vec::new();
    let mut probed = Vec::new();
    for &index in indices {
        let cell = &mut cells[index];
        match cell.target {
            Some(target) => {
                probes.push(Probe {
                    from: pods[cell.from].clone(),
                    to: pods[cell.to].clone(),
                    target,
                    protocol: cell.protocol,
                    timeout,
                });
                probed.push(index);
            }
            None => cell.attempts.push(ProbeOutcome::Error(format!(
                "pod {} has no IP address",
                pods[cell.to]
            ))),
        }
    }
    if probes.is_empty() {
        return;
    }
    let outcomes = driver.probe(&probes).await;
    if outcomes.len() != probes.len() {
        let message = format!(
            "the driver returned {} outcomes for {} probes",
            outcomes.len(),
            probes.len()
        );
        for index in probed {
            cells[index]
                .attempts
                .push(ProbeOutcome::Error(message.clone()));
        }
        return;
    }
    for (index, outcome) in probed.into_iter().zip(outcomes) {
        cells[index].attempts.push(outcome);
    }
}

fn write_step(text: &mut String, report: &StepReport, tables: &[BlockTables], verbose: bool) {
    if let Some(error) = &report.error {
        let _ = writeln!(text, "  step {}: error: {error}", report.step);
        return;
    }
    for (block, block_tables) in report.blocks.iter().zip(tables) {
        let failed = !block.passed();
        if failed {
            let failing = block.mismatches.len()
                + block.named.iter().filter(|pair| !pair.passed).count()
                + block.backends.iter().filter(|check| !check.passed).count();
            let _ = writeln!(
                text,
                "  step {}, expect block {}: {} of {} pairs do not match",
                report.step, block.block, failing, block.pairs
            );
        } else if verbose {
            let _ = writeln!(
                text,
                "  step {}, expect block {}: all {} pairs match",
                report.step, block.block, block.pairs
            );
        }
        if !block.mismatches.is_empty() || verbose {
            for (port, protocol, expected, observed) in &block_tables.tables {
                let _ = writeln!(text, "    {protocol}/{port} expected:");
                write_table(text, &block_tables.pods, |index| {
                    expected[index].to_string()
                });
                let _ = writeln!(text, "    {protocol}/{port} observed (* = mismatch):");
                write_table(text, &block_tables.pods, |index| observed[index].clone());
            }
        }
        for pair in &block.mismatches {
            let _ = writeln!(text, "    mismatch: {pair}");
        }
        for pair in &block.reprobed {
            let _ = writeln!(text, "    re-probed: {pair}");
        }
        for pair in &block.named {
            let label = match (pair.passed, pair.rounds.len() > 1) {
                (false, _) => "mismatch",
                (true, true) => "re-probed",
                (true, false) => "match",
            };
            if !pair.passed || pair.rounds.len() > 1 || verbose {
                let _ = writeln!(text, "    {label}: {pair}");
            }
        }
        for check in &block.backends {
            if !check.passed || verbose {
                let label = if check.passed { "match" } else { "mismatch" };
                let _ = writeln!(text, "    {label}: {check}");
            }
        }
    }
}

/// Upstream's truth-table layout: a `-` corner, the to-pods across, one row per from-pod.
fn write_table(text: &mut String, pods: &[PodRef], mark: impl Fn(usize) -> String) {
    let width = pods
        .iter()
        .map(|pod| pod.to_string().len())
        .max()
        .unwrap_or(1)
        .max(2)
        + 2;
    let _ = write!(text, "    {:width$}", "-");
    for pod in pods {
        let _ = write!(text, "{:width$}", pod.to_string());
    }
    trim_line_end(text);
    for (from, pod) in pods.iter().enumerate() {
        let _ = write!(text, "    {:width$}", pod.to_string());
        for to in 0..pods.len() {
            let _ = write!(text, "{:width$}", mark(from * pods.len() + to));
        }
        trim_line_end(text);
    }
}

/// Ends the current line without trailing spaces (they carry no information and make the
/// tables awkward to compare).
fn trim_line_end(text: &mut String) {
    while text.ends_with(' ') {
        text.pop();
    }
    text.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(outcome: ProbeOutcome) -> Answer {
        Answer {
            outcome,
            answered_by: None,
        }
    }

    fn cell(expected: Verdict, rounds: &[&[ProbeOutcome]]) -> NamedCell {
        NamedCell {
            report: NamedPairReport {
                from: Endpoint::Pod(PodRef::new("x", "a")),
                to: Endpoint::Service(ServiceRef {
                    namespace: "y".into(),
                    name: "web".into(),
                }),
                node: None,
                port: 80,
                protocol: Protocol::Tcp,
                expected,
                passed: false,
                rounds: rounds
                    .iter()
                    .map(|round| round.iter().cloned().map(answer).collect())
                    .collect(),
            },
            target: Ok("10.96.0.10:80".parse().expect("address")),
            per_round: rounds.first().map_or(0, |round| round.len()),
        }
    }

    use ProbeOutcome::{Connected as C, Error as E, TimedOut as T};

    #[test]
    fn service_allow_needs_a_round_where_every_attempt_connected() {
        let policy = RetryPolicy::default();
        let mixed = cell(Verdict::Allow, &[&[C, C, T, C]]);
        assert!(!mixed.passed(&policy));
        assert!(mixed.wants_retry(&policy));
        let still_mixed = cell(
            Verdict::Allow,
            &[&[C, C, T, C], &[C, T, C, C], &[T, C, C, C]],
        );
        assert!(
            !still_mixed.passed(&policy),
            "partial rounds never add up to a pass"
        );
        assert!(!still_mixed.wants_retry(&policy));
        let retried = cell(Verdict::Allow, &[&[C, C, T, C], &[C, C, C, C]]);
        assert!(retried.passed(&policy));
    }

    #[test]
    fn service_deny_needs_every_attempt_denied() {
        let policy = RetryPolicy::default();
        assert!(cell(Verdict::Deny, &[&[T, T, T, T]]).passed(&policy));
        let leaky = cell(Verdict::Deny, &[&[T, C, T, T]]);
        assert!(!leaky.passed(&policy));
        assert!(
            leaky.wants_retry(&policy),
            "propagation gets its grace period"
        );
        let confirmed = cell(
            Verdict::Deny,
            &[&[T, C, T, T], &[T, T, T, T], &[T, T, T, T]],
        );
        assert!(confirmed.passed(&policy));
        let leaks_again = cell(Verdict::Deny, &[&[T, C, T, T], &[T, T, C, T]]);
        assert!(!leaks_again.passed(&policy));
        assert!(!leaks_again.wants_retry(&policy));
    }

    #[test]
    fn errors_fail_service_pairs_without_retries() {
        let policy = RetryPolicy::default();
        for expected in [Verdict::Allow, Verdict::Deny] {
            let errored = cell(expected, &[&[T, E("no socket".into()), T, T]]);
            assert!(!errored.passed(&policy));
            assert!(!errored.wants_retry(&policy));
        }
    }

    #[test]
    fn summaries_count_outcomes_and_answering_pods() {
        let answers = [
            Answer {
                outcome: C,
                answered_by: Some("y/a".into()),
            },
            answer(T),
            Answer {
                outcome: C,
                answered_by: Some("y/a".into()),
            },
        ];
        assert_eq!(summarize(&answers), "connected by y/a x2, timed out x1");
    }
}
