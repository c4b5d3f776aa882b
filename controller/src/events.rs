//! Kubernetes Events for the objects the controller finds fault with — NetworkPolicies and
//! ClusterNetworkPolicies the validator rejects or normalizes, Services and EndpointSlices it
//! cannot use in part — and the counters behind them.
//!
//! Every distinct diagnostic becomes one `events.k8s.io/v1` Event of type `Warning`
//! regarding the object (so `kubectl describe
//! networkpolicy|clusternetworkpolicy|service|endpointslice` shows it), with the diagnostic —
//! field path included — as its note. Events are namespaced; those about a
//! ClusterNetworkPolicy (cluster-scoped) are written to [`CLUSTER_SCOPED_EVENT_NAMESPACE`],
//! as the kubelet does for Nodes:
//!
//! * reason [`INVALID_POLICY_REASON`] for policy errors (a NetworkPolicy fails closed: it
//!   isolates the pods it selects and allows nothing; in a ClusterNetworkPolicy the rule
//!   that cannot be read fails closed: as `Accept` it matches nothing, as `Deny` or `Pass`
//!   it denies everything it could have matched);
//! * reason [`NORMALIZED_POLICY_REASON`] for policy values accepted in a normalized form
//!   (what the API server accepts with a warning, e.g. a CIDR with host bits);
//! * reason [`INVALID_SERVICE_REASON`] / [`INVALID_ENDPOINT_SLICE_REASON`] for a Service or
//!   EndpointSlice part weir leaves out (an unknown protocol, a named `targetPort` no
//!   backend has, a frontend another Service already holds); the rest of the Service, and
//!   every other Service, is proxied as usual;
//! * reason [`INVALID_DROP_CIDR_SET_REASON`] for a DropCIDRSet entry weir leaves out (not a
//!   CIDR, holding a node's address or a pod CIDR, beyond the prefilter's room); the set's
//!   other entries, and every other set, still apply;
//! * reason [`POLICY_TOO_LARGE_REASON`] for a NetworkPolicy whose rule set does not fit a
//!   node's dataplane with the node's other policies (the pods it selects on that node fail
//!   closed in that direction; every other pod keeps its policies).
//!
//! "Distinct" is per object *and generation* (`metadata.generation` grows with every spec
//! change; objects without one — Services — are identified by their uid alone): an edit
//! that keeps the mistake is reported again, a recompile is not. The Event's name is derived
//! from that identity (`<object>.<hash>`), so when the leader
//! changes, or the controller restarts, the new leader's create of an Event that exists
//! answers `409 AlreadyExists` and counts as done: one Event per diagnostic cluster-wide
//! (until the API server's event TTL, one hour by default, removes it).
//!
//! kube-runtime's `Recorder` is not used: it keys its de-duplication on (object, reason,
//! action) without the note, so two different diagnostics of one policy would merge into one
//! Event series carrying the first note.
//!
//! API reference: <https://kubernetes.io/docs/reference/kubernetes-api/cluster-resources/event-v1/>.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::watch;
use tracing::{debug, warn};

use weir_api::PolicyRef;
use weir_compiler::{
    PolicyDiagnostic, Severity, capacity::TooLarge, policy::PolicyKind, service::ServiceDiagnostic,
};

use crate::leader::Leadership;

/// Reason of the Event for a policy that fails closed.
pub const INVALID_POLICY_REASON: &str = "InvalidNetworkPolicy";
/// Reason of the Event for a value accepted in a normalized form.
pub const NORMALIZED_POLICY_REASON: &str = "NetworkPolicyValueNormalized";
/// Reason of the Event for a Service part weir leaves out.
pub const INVALID_SERVICE_REASON: &str = "InvalidService";
/// Reason of the Event for an EndpointSlice part weir leaves out.
pub const INVALID_ENDPOINT_SLICE_REASON: &str = "InvalidEndpointSlice";
/// Reason of the Event for a DropCIDRSet entry weir leaves out.
pub const INVALID_DROP_CIDR_SET_REASON: &str = "InvalidDropCIDRSet";
/// Reason of the Event for a policy whose rule set does not fit a node's maps.
pub const POLICY_TOO_LARGE_REASON: &str = "PolicyTooLarge";
/// `reportingController` of weir's Events (must be a qualified name).
pub const REPORTING_CONTROLLER: &str = "weir.dev/controller";
/// `action` of weir's Events.
pub const VALIDATE_ACTION: &str = "Validate";
/// Namespace of the Events about cluster-scoped objects (ClusterNetworkPolicies).
pub const CLUSTER_SCOPED_EVENT_NAMESPACE: &str = "default";
/// The API server's limit on `note` (bytes).
const NOTE_LIMIT: usize = 1024;

/// The kind of object a diagnostic is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Subject {
    NetworkPolicy,
    ClusterNetworkPolicy,
    HostPolicy,
    Service,
    EndpointSlice,
    DropCidrSet,
}

impl Subject {
    pub fn kind(self) -> &'static str {
        match self {
            Self::NetworkPolicy => "NetworkPolicy",
            Self::ClusterNetworkPolicy => "ClusterNetworkPolicy",
            Self::HostPolicy => weir_compiler::host_policy::KIND,
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::DropCidrSet => weir_compiler::drop_cidrs::KIND,
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Self::NetworkPolicy => "networking.k8s.io/v1",
            Self::ClusterNetworkPolicy => weir_compiler::cnp::API_VERSION,
            Self::HostPolicy => weir_compiler::host_policy::API_VERSION,
            Self::Service => "v1",
            Self::EndpointSlice => "discovery.k8s.io/v1",
            Self::DropCidrSet => weir_compiler::drop_cidrs::API_VERSION,
        }
    }

    fn from_kind(kind: &str) -> Option<Self> {
        [
            Self::NetworkPolicy,
            Self::Service,
            Self::EndpointSlice,
            Self::DropCidrSet,
        ]
        .into_iter()
        .find(|s| s.kind() == kind)
    }
}

/// Identity of an object Events may be about (a NetworkPolicy, ClusterNetworkPolicy, Service
/// or EndpointSlice).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectRef {
    pub uid: Option<String>,
    pub generation: Option<i64>,
}

/// A diagnostic together with the identity of the object it is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportedDiagnostic {
    pub subject: Subject,
    pub namespace: String,
    pub name: String,
    pub object: ObjectRef,
    /// Path of the field, as the API server writes it.
    pub field: String,
    pub severity: Severity,
    pub problem: String,
    /// What kind of fault: the object itself, or its fit in a node's dataplane.
    pub finding: Finding,
}

/// What a diagnostic finds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Finding {
    /// The object (a field of it) is invalid or normalized.
    #[default]
    Validation,
    /// The object is valid, but what it compiles to does not fit a node's maps.
    TooLarge,
}

impl ReportedDiagnostic {
    pub fn policy(d: &PolicyDiagnostic, object: ObjectRef) -> Self {
        let subject = match d.policy.kind {
            PolicyKind::NetworkPolicy => Subject::NetworkPolicy,
            PolicyKind::ClusterNetworkPolicy => Subject::ClusterNetworkPolicy,
            PolicyKind::HostPolicy | PolicyKind::UntrackedHostPolicy => Subject::HostPolicy,
        };
        Self {
            subject,
            namespace: d.policy.namespace.clone(),
            name: d.policy.name.clone(),
            object,
            field: d.field.clone(),
            severity: d.severity,
            problem: d.problem.to_string(),
            finding: Finding::Validation,
        }
    }

    /// `policy`, one of those whose rule set `t` did not fit its node.
    pub fn too_large(t: &TooLarge, policy: &PolicyRef, object: ObjectRef) -> Self {
        let subject = [Subject::ClusterNetworkPolicy, Subject::HostPolicy]
            .into_iter()
            .find(|s| *policy.kind == *s.kind())
            .unwrap_or(Subject::NetworkPolicy);
        Self {
            subject,
            namespace: policy.namespace.to_string(),
            name: policy.name.to_string(),
            object,
            field: "spec".into(),
            severity: Severity::Warning,
            problem: t.to_string(),
            finding: Finding::TooLarge,
        }
    }

    /// `None` for a diagnostic about a kind Events are not written for.
    pub fn service(d: &ServiceDiagnostic, object: ObjectRef) -> Option<Self> {
        Some(Self {
            subject: Subject::from_kind(d.kind)?,
            namespace: d.object.namespace.clone(),
            name: d.object.name.clone(),
            object,
            field: d.field.clone(),
            severity: Severity::Warning,
            problem: d.problem.clone(),
            finding: Finding::Validation,
        })
    }

    fn is_policy(&self) -> bool {
        matches!(
            self.subject,
            Subject::NetworkPolicy | Subject::ClusterNetworkPolicy | Subject::HostPolicy
        )
    }

    fn is_invalid_policy(&self) -> bool {
        self.is_policy() && self.finding == Finding::Validation && self.severity == Severity::Error
    }

    fn is_normalized_policy_value(&self) -> bool {
        self.is_policy()
            && self.finding == Finding::Validation
            && self.severity == Severity::Warning
    }
}

/// What makes a diagnostic distinct: the object, its generation, and the problem.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct DiagnosticId {
    subject: Subject,
    namespace: String,
    name: String,
    uid: String,
    generation: i64,
    field: String,
    severity: u8,
    problem: String,
}

impl DiagnosticId {
    fn of(r: &ReportedDiagnostic) -> Self {
        Self {
            subject: r.subject,
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            uid: r.object.uid.clone().unwrap_or_default(),
            generation: r.object.generation.unwrap_or_default(),
            field: r.field.clone(),
            severity: match r.severity {
                Severity::Error => 0,
                Severity::Warning => 1,
            },
            problem: r.problem.clone(),
        }
    }

    /// 64-bit FNV-1a over the identity: stable across processes and versions, which the
    /// Event name needs (a standard library hasher may change between releases). A
    /// NetworkPolicy's identity hashes as it did before other kinds were reported, so Events
    /// that exist keep answering for it.
    fn digest(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let kind = match self.subject {
            Subject::NetworkPolicy => None,
            other => Some(other.kind()),
        };
        let parts = [
            self.namespace.as_str(),
            self.name.as_str(),
            self.uid.as_str(),
            &self.generation.to_string(),
            self.field.as_str(),
            if self.severity == 0 { "E" } else { "W" },
            self.problem.as_str(),
        ];
        for part in kind.into_iter().chain(parts) {
            for b in part.bytes().chain([0u8]) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }
}

/// Counters of policy diagnostics, for Prometheus.
#[derive(Debug, Default)]
pub struct PolicyEventMetrics {
    invalid_policies_total: AtomicU64,
    invalid_policies: AtomicU64,
    normalized_values_total: AtomicU64,
    events_emitted_total: AtomicU64,
    event_errors_total: AtomicU64,
}

impl PolicyEventMetrics {
    /// Policies seen invalid (failing closed), counted once per object and generation
    /// (`weir_controller_invalid_policy_generations_total`).
    pub fn invalid_policy_generations_total(&self) -> u64 {
        self.invalid_policies_total.load(Ordering::Relaxed)
    }

    /// Policies invalid (failing closed) now.
    pub fn invalid_policies(&self) -> u64 {
        self.invalid_policies.load(Ordering::Relaxed)
    }

    /// Distinct normalized-value diagnostics seen.
    pub fn normalized_values_total(&self) -> u64 {
        self.normalized_values_total.load(Ordering::Relaxed)
    }

    /// Events created (or found already created).
    pub fn events_emitted_total(&self) -> u64 {
        self.events_emitted_total.load(Ordering::Relaxed)
    }

    /// Event creations that failed (retried later).
    pub fn event_errors_total(&self) -> u64 {
        self.event_errors_total.load(Ordering::Relaxed)
    }
}

/// Emits one Event per distinct diagnostic.
pub struct DiagnosticEvents {
    client: Client,
    instance: String,
    /// Policy versions counted invalid (every replica counts what it sees).
    counted_invalid: BTreeSet<(String, String, String, i64)>,
    /// Normalized-value diagnostics counted.
    counted_normalized: BTreeSet<DiagnosticId>,
    /// Diagnostics whose Event exists.
    emitted: BTreeSet<DiagnosticId>,
    metrics: Arc<PolicyEventMetrics>,
}

impl DiagnosticEvents {
    /// `instance` is the `reportingInstance` (the pod name; at most 128 bytes are used).
    pub fn new(client: Client, instance: impl Into<String>) -> Self {
        let mut instance = instance.into();
        truncate_at_char(&mut instance, 128);
        Self {
            client,
            instance,
            counted_invalid: BTreeSet::new(),
            counted_normalized: BTreeSet::new(),
            emitted: BTreeSet::new(),
            metrics: Arc::default(),
        }
    }

    pub fn metrics(&self) -> Arc<PolicyEventMetrics> {
        self.metrics.clone()
    }

    /// Takes the current diagnostics: counts new ones, and with `emit` creates the Events not
    /// created yet. Diagnostics that disappeared are forgotten (if they come back with a new
    /// generation, they are new). Returns the number of Events that could not be created.
    pub async fn sync(&mut self, current: &[ReportedDiagnostic], emit: bool) -> usize {
        let ids: Vec<(DiagnosticId, &ReportedDiagnostic)> =
            current.iter().map(|r| (DiagnosticId::of(r), r)).collect();
        let live: BTreeSet<&DiagnosticId> = ids.iter().map(|(id, _)| id).collect();
        self.emitted.retain(|id| live.contains(id));
        self.count(&ids);
        if !emit {
            return 0;
        }
        let mut failed = 0;
        for (id, report) in ids {
            if self.emitted.contains(&id) {
                continue;
            }
            match self.create(&id, report).await {
                Ok(()) => {
                    self.metrics
                        .events_emitted_total
                        .fetch_add(1, Ordering::Relaxed);
                    self.emitted.insert(id);
                }
                Err(e) => {
                    failed += 1;
                    self.metrics
                        .event_errors_total
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(kind = id.subject.kind(), namespace = %id.namespace, name = %id.name, error = %e, "creating an Event");
                }
            }
        }
        failed
    }

    /// Updates the counters: new invalid policy versions, new normalized values, and the
    /// number of policies invalid now.
    fn count(&mut self, ids: &[(DiagnosticId, &ReportedDiagnostic)]) {
        let invalid: BTreeSet<(String, String, String, i64)> = ids
            .iter()
            .filter(|(_, r)| r.is_invalid_policy())
            .map(|(id, _)| {
                (
                    id.namespace.clone(),
                    id.name.clone(),
                    id.uid.clone(),
                    id.generation,
                )
            })
            .collect();
        let new_invalid = invalid.difference(&self.counted_invalid).count();
        self.metrics
            .invalid_policies_total
            .fetch_add(new_invalid as u64, Ordering::Relaxed);
        self.metrics
            .invalid_policies
            .store(invalid.len() as u64, Ordering::Relaxed);
        self.counted_invalid = invalid;
        let normalized: BTreeSet<DiagnosticId> = ids
            .iter()
            .filter(|(_, r)| r.is_normalized_policy_value())
            .map(|(id, _)| id.clone())
            .collect();
        let new_normalized = normalized.difference(&self.counted_normalized).count();
        self.metrics
            .normalized_values_total
            .fetch_add(new_normalized as u64, Ordering::Relaxed);
        self.counted_normalized = normalized;
    }

    async fn create(&self, id: &DiagnosticId, report: &ReportedDiagnostic) -> kube::Result<()> {
        let event = self.event(id, report);
        let api: Api<Event> = Api::namespaced(self.client.clone(), event_namespace(id));
        match api.create(&PostParams::default(), &event).await {
            Ok(_) => {
                debug!(kind = id.subject.kind(), namespace = %id.namespace, name = %id.name, field = %id.field, "Event created");
                Ok(())
            }
            // Another replica (or this one before a restart) created it.
            Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn event(&self, id: &DiagnosticId, report: &ReportedDiagnostic) -> Event {
        let (reason, consequence) = match (report.subject, report.severity) {
            _ if report.finding == Finding::TooLarge => (POLICY_TOO_LARGE_REASON, ""),
            (Subject::NetworkPolicy, Severity::Error) => (
                INVALID_POLICY_REASON,
                "; the policy fails closed: it isolates the pods it selects and allows nothing",
            ),
            (Subject::ClusterNetworkPolicy, Severity::Error) => (
                INVALID_POLICY_REASON,
                "; the rule fails closed: an Accept rule matches nothing, any other denies everything",
            ),
            (Subject::HostPolicy, Severity::Error) => (
                INVALID_POLICY_REASON,
                "; the policy fails closed: the nodes it selects accept only replies and their failsafe ports",
            ),
            (
                Subject::NetworkPolicy | Subject::ClusterNetworkPolicy | Subject::HostPolicy,
                Severity::Warning,
            ) => (NORMALIZED_POLICY_REASON, "; the normalized value applies"),
            (Subject::Service, _) => (
                INVALID_SERVICE_REASON,
                "; weir leaves this part out and proxies the rest",
            ),
            (Subject::EndpointSlice, _) => (
                INVALID_ENDPOINT_SLICE_REASON,
                "; weir leaves this part out and uses the rest",
            ),
            (Subject::DropCidrSet, _) => (
                INVALID_DROP_CIDR_SET_REASON,
                "; weir leaves this entry out and drops the rest",
            ),
        };
        let mut note = format!("{}: {}{consequence}", report.field, report.problem);
        truncate_at_char(&mut note, NOTE_LIMIT);
        // Object names are at most 253 characters; keep room for the suffix.
        let mut prefix = id.name.clone();
        truncate_at_char(&mut prefix, 253 - 17);
        Event {
            metadata: ObjectMeta {
                name: Some(format!("{prefix}.{:016x}", id.digest())),
                namespace: Some(event_namespace(id).to_owned()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(Timestamp::now())),
            type_: Some("Warning".into()),
            reason: Some(reason.into()),
            action: Some(VALIDATE_ACTION.into()),
            note: Some(note),
            regarding: Some(ObjectReference {
                api_version: Some(id.subject.api_version().into()),
                kind: Some(id.subject.kind().into()),
                namespace: (!id.namespace.is_empty()).then(|| id.namespace.clone()),
                name: Some(id.name.clone()),
                uid: report.object.uid.clone(),
                ..ObjectReference::default()
            }),
            reporting_controller: Some(REPORTING_CONTROLLER.into()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        }
    }
}

/// Where the Event about the object goes: its own namespace, or
/// [`CLUSTER_SCOPED_EVENT_NAMESPACE`] for a cluster-scoped object.
fn event_namespace(id: &DiagnosticId) -> &str {
    if id.namespace.is_empty() {
        CLUSTER_SCOPED_EVENT_NAMESPACE
    } else {
        &id.namespace
    }
}

fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// How long to wait before retrying Events that could not be created.
const RETRY_FAILED_EVENTS: Duration = Duration::from_secs(30);

/// Emits Events for the diagnostics published on `diagnostics` while this replica leads
/// (followers only count). Ends when the sender is dropped.
pub async fn run_diagnostic_events(
    mut events: DiagnosticEvents,
    mut diagnostics: watch::Receiver<Vec<ReportedDiagnostic>>,
    mut leadership: Leadership,
) {
    // A fixed leadership (or an elector that is gone) never changes again.
    let mut elector_alive = true;
    loop {
        let current = diagnostics.borrow_and_update().clone();
        let failed = events.sync(&current, leadership.is_leader()).await;
        tokio::select! {
            r = diagnostics.changed() => if r.is_err() { return },
            alive = leadership.changed(), if elector_alive => elector_alive = alive,
            _ = tokio::time::sleep(RETRY_FAILED_EVENTS), if failed > 0 => {}
        }
    }
}
