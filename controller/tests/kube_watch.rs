//! The Kubernetes source against a mocked API server: lists, watches, restarts, `410 Gone`,
//! bookmarks, and the gate that keeps the controller from publishing a partial cluster.
//!
//! Each test plays one [`Scenario`]: a script of what the API server answers per resource.
//! Time is paused, so watcher backoffs and quiet periods cost nothing and nothing is flaky.

mod kube_support;

use futures::{Stream, StreamExt};
use kube::runtime::watcher::Event;
use kube_support::*;
use serde_json::json;
use weir_api::{NOT_ISOLATED, PodKey};
use weir_controller::{
    Compiler,
    kube::{ClusterSync, Kind, KindEvent, WatchOptions, watch::POD_FIELD_SELECTOR, watch_cluster},
    run::Controller,
    source::{Change, ObjectKey},
};
use weir_transport::StatePublisher;

/// What the API server does in one test.
enum Scenario {
    /// Every kind listed, then watch events on pods and policies.
    InitialListThenWatchEvents,
    /// The NetworkPolicy list is slow to come.
    SlowPolicyList,
    /// The policy watch drops; while disconnected the policy is deleted and the history
    /// compacted, so the re-watch gets `410 Gone` and the watcher lists again.
    PolicyDeletedWhileDisconnected,
    /// The pod watch ends; restarting it fails once with a server error; the retry resumes
    /// from the last version seen.
    PodWatchErrorThenRestart,
    /// A bookmark moves the namespace watch's version forward without any object.
    NamespaceBookmark,
    /// The ClusterNetworkPolicy CRD is not installed (`404` to every request, three times),
    /// then it is, with one policy.
    ClusterPolicyCrdMissingThenInstalled,
    /// The ClusterNetworkPolicy CRD is deleted: the watch ends and the API server answers
    /// `404` from then on.
    ClusterPolicyCrdDeleted,
    /// The controller may not list ClusterNetworkPolicies (`403`, RBAC missing).
    ClusterPolicyForbidden,
}

fn deny_all() -> serde_json::Value {
    policy("prod", "deny-all", "5", json!({"policyTypes": ["Ingress"]}))
}

/// An Admin-tier ClusterNetworkPolicy denying every pod's ingress from every pod.
fn admin_deny(rv: &str) -> serde_json::Value {
    cluster_policy(
        "guardrail",
        rv,
        json!({"tier": "Admin", "priority": 10, "subject": {"namespaces": {}},
               "ingress": [{"name": "no-pods", "action": "Deny",
                            "from": [{"namespaces": {}}]}]}),
    )
}

fn db_pod(rv: &str) -> serde_json::Value {
    pod("prod", "db", "node-1", "10.0.0.2", "db", rv)
}

impl Scenario {
    fn script(self) -> Script {
        let namespaces = list("10", vec![namespace("prod", "3")]);
        let nodes = list("10", vec![node("node-1", "4")]);
        let pods = list("10", vec![db_pod("6")]);
        let policies = list("10", vec![deny_all()]);
        match self {
            Scenario::InitialListThenWatchEvents => Script::new()
                .without_services()
                .on(NAMESPACES, [namespaces])
                .on(NODES, [nodes])
                .on(
                    PODS,
                    [
                        pods,
                        watch_from(
                            "10",
                            vec![added(pod("prod", "web", "node-1", "10.0.0.3", "web", "11"))],
                        ),
                    ],
                )
                .on(
                    POLICIES,
                    [
                        list("10", vec![]),
                        Step::Pause("policy-added"),
                        watch_from("10", vec![added(deny_all())]),
                    ],
                ),
            Scenario::SlowPolicyList => Script::new()
                .without_services()
                .on(NAMESPACES, [namespaces])
                .on(NODES, [nodes])
                .on(PODS, [pods])
                .on(POLICIES, [Step::Pause("policy-list"), policies]),
            Scenario::PolicyDeletedWhileDisconnected => Script::new()
                .without_services()
                .on(NAMESPACES, [namespaces])
                .on(NODES, [nodes])
                .on(PODS, [pods])
                .on(
                    POLICIES,
                    [
                        policies,
                        // The connection drops with nothing sent...
                        Step::Pause("disconnect"),
                        watch_from("10", vec![]),
                        // ...the re-watch is too old: the history moved on.
                        watch_from("10", vec![gone()]),
                        list("30", vec![]),
                    ],
                ),
            Scenario::PodWatchErrorThenRestart => Script::new()
                .without_services()
                .on(NAMESPACES, [namespaces])
                .on(NODES, [nodes])
                .on(POLICIES, [list("10", vec![])])
                .on(
                    PODS,
                    [
                        pods,
                        watch_from(
                            "10",
                            vec![added(pod("prod", "web", "node-1", "10.0.0.3", "web", "11"))],
                        ),
                        fail(500, "InternalError"),
                        watch_from(
                            "11",
                            vec![modified(pod(
                                "prod", "web", "node-1", "10.0.0.3", "frontend", "12",
                            ))],
                        ),
                    ],
                ),
            Scenario::NamespaceBookmark => Script::new()
                .without_services()
                .on(NODES, [nodes])
                .on(PODS, [pods])
                .on(POLICIES, [list("10", vec![])])
                .on(
                    NAMESPACES,
                    [
                        namespaces,
                        watch_from("10", vec![bookmark("v1", "Namespace", "25")]),
                        watch_from("25", vec![added(namespace("staging", "26"))]),
                    ],
                ),
            Scenario::ClusterPolicyCrdMissingThenInstalled => Script::new()
                .without_services()
                .on(NAMESPACES, [namespaces])
                .on(NODES, [nodes])
                .on(PODS, [pods])
                .on(POLICIES, [list("10", vec![])])
                .on(
                    CLUSTER_POLICIES,
                    [
                        fail(404, "NotFound"),
                        fail(404, "NotFound"),
                        fail(404, "NotFound"),
                        Step::Pause("crd-installed"),
                        list("20", vec![admin_deny("19")]),
                    ],
                ),
            Scenario::ClusterPolicyCrdDeleted => Script::new()
                .without_services()
                .on(NAMESPACES, [namespaces])
                .on(NODES, [nodes])
                .on(PODS, [pods])
                .on(POLICIES, [list("10", vec![])])
                .on(
                    CLUSTER_POLICIES,
                    [
                        list("10", vec![admin_deny("9")]),
                        Step::Pause("crd-deleted"),
                        watch_from("10", vec![]),
                        fail(404, "NotFound"),
                    ],
                ),
            Scenario::ClusterPolicyForbidden => Script::new()
                .without_services()
                .on(NAMESPACES, [namespaces])
                .on(NODES, [nodes])
                .on(PODS, [pods])
                .on(POLICIES, [list("10", vec![])])
                .on(CLUSTER_POLICIES, [fail(403, "Forbidden")]),
        }
    }
}

struct Harness {
    api: FakeApi,
    sync: ClusterSync,
    publisher: StatePublisher,
    events: std::pin::Pin<Box<dyn Stream<Item = KindEvent> + Send>>,
}

impl Harness {
    fn start(scenario: Scenario) -> Self {
        let api = FakeApi::start(scenario.script());
        let publisher = StatePublisher::new();
        let sync = ClusterSync::new(Controller::new(publisher.clone()));
        let events = Box::pin(watch_cluster(api.client(), &WatchOptions::default()));
        Self {
            api,
            sync,
            publisher,
            events,
        }
    }

    /// Takes in events until the API server has been quiet for a while; returns how many.
    async fn take_events(&mut self) -> usize {
        self.take_events_counting(|_| true).await
    }

    /// [`Self::take_events`], counting only the events `count` picks.
    async fn take_events_counting(&mut self, count: impl Fn(&KindEvent) -> bool) -> usize {
        let mut n = 0;
        while let Ok(Some(event)) = tokio::time::timeout(QUIET, self.events.next()).await {
            if count(&event) {
                n += 1;
            }
            self.sync.observe(event);
        }
        n
    }

    fn has_cluster_policy(&self) -> bool {
        self.sync
            .controller()
            .cluster()
            .cluster_policy("guardrail")
            .is_some()
    }

    /// Is `prod/db` isolated for ingress in the state compiled from the store?
    fn db_isolated(&self) -> bool {
        let out = Compiler::new().compile_all(self.sync.controller().cluster());
        let db = out.nodes["node-1"].endpoints[&PodKey::new("prod", "db")];
        db.ingress != NOT_ISOLATED
    }

    fn published_version(&self) -> Option<u64> {
        self.publisher.published().get("node-1").copied()
    }
}

fn key(kind: &'static str, namespace: &str, name: &str) -> ObjectKey {
    ObjectKey {
        kind,
        namespace: namespace.into(),
        name: name.into(),
    }
}

#[tokio::test(start_paused = true)]
async fn initial_lists_then_watch_events_reach_the_store() {
    let mut h = Harness::start(Scenario::InitialListThenWatchEvents);
    h.take_events().await;
    assert!(h.sync.is_synced());
    assert!(h.sync.flush().versions.is_some(), "synced: compiled");
    assert!(
        h.sync
            .controller()
            .cluster()
            .pod(&PodKey::new("prod", "web"))
            .is_some()
    );
    assert!(!h.db_isolated(), "no policy yet");
    assert_eq!(h.published_version(), Some(1));

    h.api.resume("policy-added");
    h.take_events().await;
    let flushed = h.sync.flush();
    assert_eq!(flushed.changes, 1);
    assert!(h.db_isolated(), "the watched policy applies");
    assert_eq!(h.published_version(), Some(2));

    // The pod watch is filtered on the server: no host-network or terminal pods.
    let pod_requests = h.api.seen_on(PODS);
    assert!(
        pod_requests
            .iter()
            .all(|s| s.query.get("fieldSelector").map(String::as_str) == Some(POD_FIELD_SELECTOR)),
        "{pod_requests:?}"
    );
    h.api.assert_no_surprises();
}

#[tokio::test(start_paused = true)]
async fn nothing_is_published_until_every_kind_is_listed() {
    let mut h = Harness::start(Scenario::SlowPolicyList);
    h.take_events().await;
    assert!(!h.sync.is_synced(), "the policy list is still pending");
    let flushed = h.sync.flush();
    assert!(flushed.changes > 0, "other kinds were applied to the store");
    assert_eq!(flushed.versions, None, "but nothing was compiled");
    assert!(
        h.publisher.published().is_empty(),
        "no state without its policies (that would be a fail-open blip)"
    );

    h.api.resume("policy-list");
    h.take_events().await;
    assert!(h.sync.is_synced());
    assert!(h.sync.flush().versions.is_some());
    assert!(
        h.db_isolated(),
        "the first published state already has the policy"
    );
    assert_eq!(h.published_version(), Some(1));
    h.api.assert_no_surprises();
}

#[tokio::test(start_paused = true)]
async fn a_policy_deleted_during_a_disconnect_is_removed_at_the_relist() {
    let mut h = Harness::start(Scenario::PolicyDeletedWhileDisconnected);
    h.take_events().await;
    h.sync.flush();
    assert!(h.db_isolated());
    assert_eq!(h.published_version(), Some(1));

    h.api.resume("disconnect");
    h.take_events().await;
    assert_eq!(
        h.sync.pending_changes(),
        [Change::Delete(key("NetworkPolicy", "prod", "deny-all"))],
        "the relist does not list it, so it was deleted"
    );
    h.sync.flush();
    assert!(
        h.sync
            .controller()
            .cluster()
            .policy(&weir_controller::PolicyKey::new("prod", "deny-all"))
            .is_none()
    );
    assert!(!h.db_isolated(), "the compiled state lost the policy");
    assert_eq!(h.published_version(), Some(2), "and was published");

    let policy_requests = h.api.seen_on(POLICIES);
    let relist = policy_requests.last().unwrap();
    assert!(!relist.is_watch(), "after 410 the watcher lists again");
    h.api.assert_no_surprises();
}

#[tokio::test(start_paused = true)]
async fn a_failed_watch_restarts_from_the_last_version_seen() {
    let mut h = Harness::start(Scenario::PodWatchErrorThenRestart);
    h.take_events().await;
    h.sync.flush();
    let web = h
        .sync
        .controller()
        .cluster()
        .pod(&PodKey::new("prod", "web"))
        .expect("web was added before the error");
    assert_eq!(
        web.labels.get("app"),
        Some("frontend"),
        "and updated after it"
    );

    let watches: Vec<_> = h
        .api
        .seen_on(PODS)
        .into_iter()
        .filter(|s| s.is_watch())
        .collect();
    let versions: Vec<_> = watches.iter().map(|s| s.resource_version()).collect();
    assert_eq!(versions, [Some("10"), Some("11"), Some("11")]);
    let lists = h.api.seen_on(PODS).iter().filter(|s| !s.is_watch()).count();
    assert_eq!(lists, 1, "a failed watch is retried, not relisted");
    h.api.assert_no_surprises();
}

#[tokio::test(start_paused = true)]
async fn bookmarks_advance_the_watch_without_changes() {
    let mut h = Harness::start(Scenario::NamespaceBookmark);
    h.take_events().await;
    let changes: Vec<ObjectKey> = h
        .sync
        .pending_changes()
        .iter()
        .filter_map(|c| match c {
            Change::Upsert(o) => Some(o.key()),
            Change::Delete(_) => None,
        })
        .filter(|k| k.kind == "Namespace")
        .collect();
    assert_eq!(
        changes,
        [
            key("Namespace", "", "prod"),
            key("Namespace", "", "staging")
        ],
        "the bookmark itself is no change"
    );
    let watches: Vec<_> = h
        .api
        .seen_on(NAMESPACES)
        .into_iter()
        .filter(|s| s.is_watch())
        .map(|s| s.resource_version().map(str::to_owned))
        .collect();
    assert_eq!(
        watches,
        [Some("10".to_owned()), Some("25".to_owned())],
        "the watch resumed from the bookmark's version"
    );
    assert_eq!(
        h.api.seen_on(NAMESPACES)[1]
            .query
            .get("allowWatchBookmarks")
            .map(String::as_str),
        Some("true"),
        "bookmarks are requested"
    );
    h.api.assert_no_surprises();
}

#[tokio::test(start_paused = true)]
async fn run_kube_publishes_once_synced_and_reports_policy_diagnostics() {
    let api = FakeApi::start(
        Script::new()
            .without_services()
            .on(NAMESPACES, [list("1", vec![namespace("prod", "1")])])
            .on(NODES, [list("1", vec![node("node-1", "1")])])
            .on(PODS, [list("1", vec![db_pod("2")])])
            .on(
                POLICIES,
                [list(
                    "1",
                    vec![policy(
                        "prod",
                        "bad",
                        "3",
                        json!({"egress": [{"to": [{"ipBlock": {"cidr": "not-a-cidr"}}]}]}),
                    )],
                )],
            ),
    );
    let publisher = StatePublisher::new();
    let (tx, mut diagnostics) = tokio::sync::watch::channel(Vec::new());
    let opts = weir_controller::kube::KubeOptions {
        diagnostics: Some(tx),
        ..Default::default()
    };
    let run = tokio::spawn(weir_controller::kube::run_kube(
        api.client(),
        Controller::new(publisher.clone()),
        opts,
    ));
    tokio::time::timeout(QUIET, diagnostics.changed())
        .await
        .expect("diagnostics after the first compile")
        .unwrap();
    let reported = diagnostics.borrow().clone();
    assert_eq!(reported.len(), 1);
    assert_eq!(reported[0].field, "spec.egress[0].to[0].ipBlock.cidr");
    assert_eq!(reported[0].object.uid.as_deref(), Some("uid-np-bad"));
    assert_eq!(publisher.published().get("node-1"), Some(&1));
    run.abort();
    api.assert_no_surprises();
}

#[tokio::test(start_paused = true)]
async fn a_missing_cluster_policy_crd_is_an_empty_list_until_it_is_installed() {
    let mut h = Harness::start(Scenario::ClusterPolicyCrdMissingThenInstalled);
    let lists_done = h
        .take_events_counting(|e| {
            e.kind == Kind::ClusterNetworkPolicy && matches!(e.event, Event::InitDone)
        })
        .await;
    assert_eq!(
        lists_done, 1,
        "three 404s are one empty list, not one per retry"
    );
    assert!(
        h.sync.is_synced(),
        "a missing CRD does not hold the controller back"
    );
    assert!(
        h.sync.flush().versions.is_some(),
        "everything else compiles"
    );
    assert_eq!(h.published_version(), Some(1));
    assert!(!h.has_cluster_policy());
    assert!(!h.db_isolated());
    let requests = h.api.seen_on(CLUSTER_POLICIES);
    assert_eq!(requests.len(), 3, "retried: {requests:?}");
    assert!(requests.iter().all(|r| !r.is_watch()), "each a list");

    // The CRD is installed: the next retry lists it, without a restart.
    h.api.resume("crd-installed");
    h.take_events().await;
    let flushed = h.sync.flush();
    assert_eq!(flushed.changes, 1);
    assert!(h.has_cluster_policy());
    assert!(h.db_isolated(), "the ClusterNetworkPolicy applies to db");
    assert_eq!(h.published_version(), Some(2));
    h.api.assert_no_surprises();
}

#[tokio::test(start_paused = true)]
async fn a_deleted_cluster_policy_crd_takes_its_policies_with_it() {
    let mut h = Harness::start(Scenario::ClusterPolicyCrdDeleted);
    h.take_events().await;
    h.sync.flush();
    assert!(h.has_cluster_policy());
    assert!(h.db_isolated());

    h.api.resume("crd-deleted");
    h.take_events().await;
    assert_eq!(
        h.sync.pending_changes(),
        [Change::Delete(key("ClusterNetworkPolicy", "", "guardrail"))],
        "no CRD, no ClusterNetworkPolicies"
    );
    h.sync.flush();
    assert!(!h.has_cluster_policy());
    assert!(!h.db_isolated());
    assert_eq!(h.published_version(), Some(2));
    h.api.assert_no_surprises();
}

#[tokio::test(start_paused = true)]
async fn a_forbidden_cluster_policy_list_keeps_the_controller_from_publishing() {
    let mut h = Harness::start(Scenario::ClusterPolicyForbidden);
    h.take_events().await;
    assert!(
        !h.sync.is_synced(),
        "403 is not a missing CRD: the guardrails may exist, unread"
    );
    assert_eq!(h.sync.flush().versions, None);
    assert!(h.publisher.published().is_empty());
    h.api.assert_no_surprises();
}
