//! The controller's HTTP endpoint (`--metrics-addr`, port 9963 in `manifests/`), served in
//! both modes.
//!
//! * `/readyz` answers 200 once the controller has compiled the whole cluster once: in
//!   Kubernetes mode after the initial list of every kind (see [`crate::kube::sync`]), with a
//!   manifest directory after its first scan; 503 before. It does not depend on leadership:
//!   every replica compiles, and the agents' Service selects the leader by a label, not by
//!   readiness. A follower that counted as unready would stall every rolling update of the
//!   Deployment.
//! * `/metrics` is OpenMetrics 1.0 text
//!   (<https://prometheus.io/docs/specs/om/open_metrics_spec/>), as the agent serves, from
//!   one prometheus-client registry. Counters are families whose samples end in `_total`, so
//!   no counter may be named after a gauge: the count of invalid policy generations is
//!   `invalid_policy_generations_total`, beside the gauge `invalid_policies`.
//!
//! What is measured, all prefixed `weir_controller_`: `ready`, `leader`; the published state
//! (`published_nodes`, `node_published_version{node}`); what agents report
//! (`node_applied_version{node}`, `node_agent_ready{node}`, `agents_in_sync`); the compile loop
//! (`compile_duration_seconds` histogram, `node_cidr_errors`, `invalid_service_objects`:
//! Services and EndpointSlices with a part the compiler left out, `invalid_drop_cidr_sets`:
//! DropCIDRSets with an entry left out); invalid policies
//! (`invalid_policies`), from [`PolicyEventMetrics`] in Kubernetes mode and from the compiler
//! with a manifest directory; in Kubernetes mode also the policy diagnostics counters
//! (`invalid_policy_generations_total`, `normalized_policy_values_total`,
//! `policy_events_total`, `policy_event_errors_total`).

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        MetricType,
        counter::ConstCounter,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::net::TcpListener;
use weir_transport::StatePublisher;

use crate::{events::PolicyEventMetrics, leader::Leadership, run::CompileReport};

/// `Content-Type` of `/metrics`.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the compile loop reports, kept for `/readyz` and `/metrics`. Feed it with
/// [`crate::run::Controller::observe_compiles`].
#[derive(Debug)]
pub struct CompileMetrics {
    compiled: AtomicBool,
    duration: Histogram,
    invalid_policies: AtomicU64,
    node_cidr_errors: AtomicU64,
    invalid_service_objects: AtomicU64,
    invalid_drop_cidr_sets: AtomicU64,
    rule_sets_too_large: AtomicU64,
}

impl Default for CompileMetrics {
    fn default() -> Self {
        Self {
            compiled: AtomicBool::new(false),
            // 1 ms to 16 s: a small cluster compiles in a millisecond, the benchmark's largest
            // clusters in seconds.
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            invalid_policies: AtomicU64::new(0),
            node_cidr_errors: AtomicU64::new(0),
            invalid_service_objects: AtomicU64::new(0),
            invalid_drop_cidr_sets: AtomicU64::new(0),
            rule_sets_too_large: AtomicU64::new(0),
        }
    }
}

impl CompileMetrics {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Takes in one compile.
    pub fn record(&self, report: &CompileReport) {
        self.duration.observe(report.duration.as_secs_f64());
        self.invalid_policies
            .store(report.invalid_policies as u64, Ordering::Relaxed);
        self.node_cidr_errors
            .store(report.node_cidr_errors as u64, Ordering::Relaxed);
        self.invalid_service_objects
            .store(report.invalid_service_objects as u64, Ordering::Relaxed);
        self.invalid_drop_cidr_sets
            .store(report.invalid_drop_cidr_sets as u64, Ordering::Relaxed);
        self.rule_sets_too_large
            .store(report.rule_sets_too_large as u64, Ordering::Relaxed);
        self.compiled.store(true, Ordering::Release);
    }

    /// True once a compile happened.
    pub fn is_ready(&self) -> bool {
        self.compiled.load(Ordering::Acquire)
    }
}

/// The endpoint's view of the controller.
#[derive(Clone, Debug)]
pub struct ControllerEndpoint {
    compiles: Arc<CompileMetrics>,
    publisher: StatePublisher,
    /// None: this process serves agents whenever it runs (manifest mode).
    leadership: Option<Leadership>,
    /// Kubernetes mode: the counters behind the policy Events.
    policy_events: Option<Arc<PolicyEventMetrics>>,
    /// Kubernetes mode: certificate bootstrap, for its refusal count; set once the CA is
    /// loaded (the endpoint is up before that), never without a CA key.
    bootstrap: Arc<std::sync::OnceLock<weir_transport::Bootstrap>>,
}

impl ControllerEndpoint {
    pub fn new(compiles: Arc<CompileMetrics>, publisher: StatePublisher) -> Self {
        Self {
            compiles,
            publisher,
            leadership: None,
            policy_events: None,
            bootstrap: Arc::default(),
        }
    }

    /// Reports the certificate requests refused over the rate limits
    /// (`weir_controller_certificate_requests_refused_total`).
    /// `bootstrap` is filled in later, once certificate bootstrap is set up.
    pub fn with_bootstrap(
        mut self,
        bootstrap: Arc<std::sync::OnceLock<weir_transport::Bootstrap>>,
    ) -> Self {
        self.bootstrap = bootstrap;
        self
    }

    /// Reports whether this replica leads (`weir_controller_leader`).
    pub fn with_leadership(mut self, leadership: Leadership) -> Self {
        self.leadership = Some(leadership);
        self
    }

    /// Serves the policy Event counters instead of the compiler's count of invalid policies.
    pub fn with_policy_events(mut self, metrics: Arc<PolicyEventMetrics>) -> Self {
        self.policy_events = Some(metrics);
        self
    }

    /// `/readyz`, `/metrics`.
    pub fn router(self) -> Router {
        Router::new()
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(self)
    }

    /// Serves until the listener fails.
    pub async fn serve(self, listener: TcpListener) -> std::io::Result<()> {
        axum::serve(listener, self.router()).await
    }

    /// The `/metrics` body.
    pub fn render_metrics(&self) -> String {
        let snapshot = Snapshot::read(self);
        let mut registry = Registry::with_prefix("weir_controller");
        registry.register_collector(Box::new(snapshot));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }
}

async fn readyz(State(endpoint): State<ControllerEndpoint>) -> impl IntoResponse {
    if endpoint.compiles.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first complete view of the cluster\n",
        )
    }
}

async fn metrics(State(endpoint): State<ControllerEndpoint>) -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        endpoint.render_metrics(),
    )
}

/// Per node: published version, and what its agent reported.
#[derive(Debug, Default)]
struct NodeView {
    published: u64,
    /// The version of this controller's epoch the agent enforces; 0 if none (or only a state
    /// of an earlier controller).
    applied: u64,
    agent_ready: bool,
}

/// The values of one scrape.
#[derive(Debug)]
struct Snapshot {
    ready: bool,
    leader: bool,
    nodes: Vec<(String, NodeView)>,
    duration: Histogram,
    node_cidr_errors: u64,
    invalid_service_objects: u64,
    invalid_drop_cidr_sets: u64,
    refused_certificate_requests: Option<u64>,
    rule_sets_too_large: u64,
    invalid_policies: u64,
    /// Kubernetes mode: the policy diagnostics counters.
    policy_events: Option<PolicyEventCounts>,
}

#[derive(Debug)]
struct PolicyEventCounts {
    invalid_policy_generations: u64,
    normalized_values: u64,
    events_emitted: u64,
    event_errors: u64,
}

impl Snapshot {
    fn read(endpoint: &ControllerEndpoint) -> Self {
        let epoch = endpoint.publisher.epoch();
        let reports = endpoint.publisher.applied().borrow().clone();
        let nodes = endpoint
            .publisher
            .published()
            .into_iter()
            .map(|(node, published)| {
                let report = reports.get(&node);
                let view = NodeView {
                    published,
                    applied: report
                        .and_then(|r| r.applied)
                        .filter(|a| a.epoch == epoch)
                        .map_or(0, |a| a.version),
                    agent_ready: report.is_some_and(|r| r.ready),
                };
                (node, view)
            })
            .collect();
        Self {
            ready: endpoint.compiles.is_ready(),
            leader: endpoint
                .leadership
                .as_ref()
                .is_none_or(Leadership::is_leader),
            nodes,
            duration: endpoint.compiles.duration.clone(),
            node_cidr_errors: endpoint.compiles.node_cidr_errors.load(Ordering::Relaxed),
            invalid_service_objects: endpoint
                .compiles
                .invalid_service_objects
                .load(Ordering::Relaxed),
            invalid_drop_cidr_sets: endpoint
                .compiles
                .invalid_drop_cidr_sets
                .load(Ordering::Relaxed),
            refused_certificate_requests: endpoint
                .bootstrap
                .get()
                .map(weir_transport::Bootstrap::refused_requests),
            rule_sets_too_large: endpoint
                .compiles
                .rule_sets_too_large
                .load(Ordering::Relaxed),
            // In Kubernetes mode the Event counters' gauge, not the compiler's count.
            invalid_policies: endpoint.policy_events.as_ref().map_or_else(
                || endpoint.compiles.invalid_policies.load(Ordering::Relaxed),
                |events| events.invalid_policies(),
            ),
            policy_events: endpoint
                .policy_events
                .as_ref()
                .map(|events| PolicyEventCounts {
                    invalid_policy_generations: events.invalid_policy_generations_total(),
                    normalized_values: events.normalized_values_total(),
                    events_emitted: events.events_emitted_total(),
                    event_errors: events.event_errors_total(),
                }),
        }
    }
}

fn as_gauge(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = |encoder: &mut DescriptorEncoder, name: &str, help: &str, v: i64| {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(v).encode(m)
        };
        gauge(
            &mut encoder,
            "ready",
            "1 once the controller compiled the whole cluster (the readiness probe)",
            i64::from(self.ready),
        )?;
        gauge(
            &mut encoder,
            "leader",
            "1 while this replica leads and serves the agents",
            i64::from(self.leader),
        )?;
        gauge(
            &mut encoder,
            "invalid_service_objects",
            "Services and EndpointSlices with a part the compiler could not use and left out",
            as_gauge(self.invalid_service_objects),
        )?;
        gauge(
            &mut encoder,
            "invalid_drop_cidr_sets",
            "DropCIDRSets with an entry left out (not a CIDR, holding a node's address or pods, no room)",
            as_gauge(self.invalid_drop_cidr_sets),
        )?;
        let counter = |encoder: &mut DescriptorEncoder, name: &str, help: &str, v: u64| {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v).encode(m)
        };
        if let Some(refused) = self.refused_certificate_requests {
            counter(
                &mut encoder,
                "certificate_requests_refused",
                "Certificate requests refused with RESOURCE_EXHAUSTED, over a --bootstrap-* rate \
                 limit, before any TokenReview",
                refused,
            )?;
        }
        gauge(
            &mut encoder,
            "invalid_policies",
            "NetworkPolicies that are invalid (and fail closed) now",
            as_gauge(self.invalid_policies),
        )?;
        if let Some(events) = &self.policy_events {
            for (name, help, value) in [
                (
                    "invalid_policy_generations",
                    "NetworkPolicies seen invalid (they fail closed), once per object and \
                     generation",
                    events.invalid_policy_generations,
                ),
                (
                    "normalized_policy_values",
                    "Distinct NetworkPolicy values accepted in a normalized form",
                    events.normalized_values,
                ),
                (
                    "policy_events",
                    "Kubernetes Events emitted for NetworkPolicy, Service and EndpointSlice \
                     diagnostics",
                    events.events_emitted,
                ),
                (
                    "policy_event_errors",
                    "Failed attempts to create diagnostic Events",
                    events.event_errors,
                ),
            ] {
                counter(&mut encoder, name, help, value)?;
            }
        }
        gauge(
            &mut encoder,
            "rule_sets_too_large",
            "Rule sets (per node) left without verdicts because the node's state did not fit \
             the agent's maps: the pods their policies select fail closed",
            as_gauge(self.rule_sets_too_large),
        )?;
        gauge(
            &mut encoder,
            "published_nodes",
            "Nodes with a published state",
            self.nodes.len() as i64,
        )?;
        let per_node = |encoder: &mut DescriptorEncoder,
                        name: &str,
                        help: &str,
                        value: &dyn Fn(&NodeView) -> i64| {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (node, view) in &self.nodes {
                let labels = [("node", node.as_str())];
                ConstGauge::new(value(view)).encode(family.encode_family(&labels)?)?;
            }
            Ok::<_, std::fmt::Error>(())
        };
        per_node(
            &mut encoder,
            "node_published_version",
            "Version of the node's state this controller publishes",
            &|v| as_gauge(v.published),
        )?;
        per_node(
            &mut encoder,
            "node_applied_version",
            "Version of this controller's state the node's agent reports enforcing (0: none yet)",
            &|v| as_gauge(v.applied),
        )?;
        per_node(
            &mut encoder,
            "node_agent_ready",
            "1 if the node's agent reported its last state fully applied",
            &|v| i64::from(v.agent_ready),
        )?;
        gauge(
            &mut encoder,
            "agents_in_sync",
            "Nodes whose agent enforces the published version",
            self.nodes
                .iter()
                .filter(|(_, v)| v.agent_ready && v.applied == v.published)
                .count() as i64,
        )?;
        let m = encoder.encode_descriptor(
            "compile_duration_seconds",
            "Time to compile what changed and publish the node states that changed",
            None,
            MetricType::Histogram,
        )?;
        self.duration.encode(m)?;
        gauge(
            &mut encoder,
            "node_cidr_errors",
            "Nodes whose pod CIDR could not be allocated or respected (see the log)",
            as_gauge(self.node_cidr_errors),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

    use k8s_openapi::api::core::v1::Node;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::{
        node_cidrs::{CidrError, CidrStore, NodeCidrAllocator},
        run::Controller,
        source::{Change, Object},
    };

    /// A plain HTTP/1.1 GET: (status, content type, body).
    async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let content_type = head
            .lines()
            .find_map(|l| l.strip_prefix("content-type: "))
            .unwrap_or_default()
            .to_owned();
        (status, content_type, body.to_owned())
    }

    async fn serve(endpoint: ControllerEndpoint) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(endpoint.serve(listener));
        addr
    }

    fn node(name: &str, ip: &str) -> Change {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
        }))
        .unwrap();
        Change::Upsert(Box::new(Object::Node(node)))
    }

    fn invalid_policy() -> Change {
        let policy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "bad", "namespace": "default"},
            "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "not-a-cidr"}}]}]},
        }))
        .unwrap();
        Change::Upsert(Box::new(Object::NetworkPolicy(policy)))
    }

    /// A store that keeps nothing.
    struct NoStore;
    impl CidrStore for NoStore {
        fn load(&self) -> Result<crate::node_cidrs::Assignments, CidrError> {
            Ok(BTreeMap::new())
        }
        fn save(&self, _: &crate::node_cidrs::Assignments) -> Result<(), CidrError> {
            Ok(())
        }
    }

    /// The value of an unlabelled sample, or of the sample with exactly `labels`.
    fn sample(body: &str, name: &str, labels: &str) -> Option<f64> {
        let prefix = if labels.is_empty() {
            format!("{name} ")
        } else {
            format!("{name}{{{labels}}} ")
        };
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.trim().parse().unwrap())
    }

    #[tokio::test]
    async fn readyz_turns_ready_at_the_first_compile_and_metrics_follow_the_publisher() {
        let compiles = CompileMetrics::new();
        let publisher = StatePublisher::new();
        let recorder = compiles.clone();
        // Room for two /30s: the third node is an allocation error.
        let allocator = NodeCidrAllocator::new("10.244.0.0/29".parse().unwrap(), 30).unwrap();
        let mut controller = Controller::new(publisher.clone())
            .with_node_cidrs(allocator, Box::new(NoStore))
            .unwrap()
            .observe_compiles(move |r| recorder.record(r));
        let addr = serve(ControllerEndpoint::new(compiles.clone(), publisher.clone())).await;

        let (status, _, body) = get(addr, "/readyz").await;
        assert_eq!(status, 503, "{body}");
        let (status, content_type, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert_eq!(content_type, METRICS_CONTENT_TYPE);
        assert_eq!(sample(&body, "weir_controller_ready", ""), Some(0.0));

        controller.apply(vec![
            node("n1", "192.0.2.1"),
            node("n2", "192.0.2.2"),
            node("n3", "192.0.2.3"),
            invalid_policy(),
        ]);
        controller.recompute();
        let (status, _, _) = get(addr, "/readyz").await;
        assert_eq!(status, 200);

        let (_, _, body) = get(addr, "/metrics").await;
        assert_eq!(sample(&body, "weir_controller_ready", ""), Some(1.0));
        assert_eq!(sample(&body, "weir_controller_leader", ""), Some(1.0));
        assert_eq!(
            sample(&body, "weir_controller_published_nodes", ""),
            Some(3.0)
        );
        assert_eq!(
            sample(
                &body,
                "weir_controller_node_published_version",
                "node=\"n2\""
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&body, "weir_controller_node_applied_version", "node=\"n2\""),
            Some(0.0),
            "no agent reported yet"
        );
        assert_eq!(
            sample(&body, "weir_controller_agents_in_sync", ""),
            Some(0.0)
        );
        assert_eq!(
            sample(&body, "weir_controller_compile_duration_seconds_count", ""),
            Some(1.0)
        );
        assert_eq!(
            sample(&body, "weir_controller_node_cidr_errors", ""),
            Some(1.0),
            "two /30s in a /29, three nodes:\n{body}"
        );
        assert_eq!(
            sample(&body, "weir_controller_invalid_policies", ""),
            Some(1.0),
            "{body}"
        );
    }

    #[tokio::test]
    async fn refused_certificate_requests_are_counted_once_bootstrap_is_set_up() {
        let slot = Arc::new(std::sync::OnceLock::new());
        let endpoint = ControllerEndpoint::new(CompileMetrics::new(), StatePublisher::new())
            .with_bootstrap(slot.clone());
        let name = "weir_controller_certificate_requests_refused_total";
        let body = endpoint.render_metrics();
        assert_eq!(sample(&body, name, ""), None, "no bootstrap yet:\n{body}");
        let ca = Arc::new(weir_transport::ClusterCa::generate("test").unwrap());
        let reviewer = Arc::new(weir_transport::StaticTokenReviewer::default());
        slot.set(weir_transport::Bootstrap::new(ca, reviewer))
            .unwrap();
        let body = endpoint.render_metrics();
        assert_eq!(sample(&body, name, ""), Some(0.0), "{body}");
    }

    #[tokio::test]
    async fn kubernetes_mode_serves_leadership_and_the_policy_event_counters() {
        let compiles = CompileMetrics::new();
        compiles.record(&CompileReport {
            duration: Duration::from_millis(3),
            nodes: 0,
            invalid_policies: 7,
            node_cidr_errors: 0,
            invalid_service_objects: 2,
            invalid_drop_cidr_sets: 1,
            rule_sets_too_large: 3,
        });
        let endpoint = ControllerEndpoint::new(compiles, StatePublisher::new())
            .with_leadership(Leadership::fixed(false))
            .with_policy_events(Arc::new(PolicyEventMetrics::default()));
        let body = endpoint.render_metrics();
        assert_eq!(sample(&body, "weir_controller_leader", ""), Some(0.0));
        assert_eq!(
            sample(&body, "weir_controller_rule_sets_too_large", ""),
            Some(3.0),
            "{body}"
        );
        assert_eq!(
            sample(&body, "weir_controller_invalid_service_objects", ""),
            Some(2.0),
            "{body}"
        );
        assert_eq!(
            sample(&body, "weir_controller_invalid_drop_cidr_sets", ""),
            Some(1.0),
            "{body}"
        );
        // The Event counters' gauge, not the compiler's count: one family, one value.
        assert_eq!(
            sample(&body, "weir_controller_invalid_policies", ""),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &body,
                "weir_controller_invalid_policy_generations_total",
                ""
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &body,
                "weir_controller_compile_duration_seconds_bucket",
                "le=\"0.004\""
            ),
            Some(1.0),
            "{body}"
        );
    }

    #[test]
    fn every_family_is_declared_once_and_the_body_ends_with_the_openmetrics_eof() {
        let compiles = CompileMetrics::new();
        let publisher = StatePublisher::new();
        publisher
            .publish("n1", 1, Arc::new(weir_api::NodeState::default()))
            .unwrap();
        for endpoint in [
            ControllerEndpoint::new(compiles.clone(), publisher.clone()),
            ControllerEndpoint::new(compiles, publisher)
                .with_policy_events(Arc::new(PolicyEventMetrics::default())),
        ] {
            let body = endpoint.render_metrics();
            assert!(body.ends_with("\n# EOF\n"), "{body}");
            assert_eq!(body.matches("# EOF").count(), 1, "{body}");
            let mut declared = std::collections::BTreeSet::new();
            for line in body.lines().filter(|l| l.starts_with("# TYPE ")) {
                let family = line.split_whitespace().nth(2).unwrap().to_owned();
                assert!(declared.insert(family), "declared twice: {line}\n{body}");
            }
            // Every sample belongs to a declared family (histograms add suffixes).
            for line in body.lines().filter(|l| !l.starts_with('#')) {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count", "_total"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| declared.contains(*f)))
                    .unwrap_or(name);
                assert!(
                    declared.contains(family),
                    "undeclared sample {line}\n{body}"
                );
            }
        }
    }
}
