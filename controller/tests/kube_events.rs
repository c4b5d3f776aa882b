//! Kubernetes Events for invalid NetworkPolicies and ClusterNetworkPolicies and unusable
//! Service parts: one Warning per distinct diagnostic, emitted by the leader only, counted
//! in the metrics.

mod kube_support;

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kube_support::*;
use serde_json::{Value, json};
use weir_controller::{
    compiler::capacity::Capacities,
    events::{
        DiagnosticEvents, INVALID_POLICY_REASON, INVALID_SERVICE_REASON, POLICY_TOO_LARGE_REASON,
        REPORTING_CONTROLLER, ReportedDiagnostic,
    },
    http::{CompileMetrics, ControllerEndpoint},
    kube::{ClusterSync, WatchOptions, watch_cluster},
    run::Controller,
};
use weir_transport::StatePublisher;

const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/prod/events";
/// Where Events about cluster-scoped objects go.
const DEFAULT_EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

fn bad_cidr_policy(rv: &str, generation: i64) -> Value {
    let mut p = policy(
        "prod",
        "bad",
        rv,
        json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}),
    );
    p["metadata"]["generation"] = json!(generation);
    p
}

/// The diagnostics the controller reports after syncing a cluster with these policies.
async fn diagnostics_of(policies: Vec<Value>) -> Vec<ReportedDiagnostic> {
    diagnostics_with_services(policies, vec![]).await
}

/// The diagnostics the controller reports after syncing a cluster with these policies and
/// Services (and no EndpointSlices).
async fn diagnostics_with_services(
    policies: Vec<Value>,
    services: Vec<Value>,
) -> Vec<ReportedDiagnostic> {
    diagnostics_in(
        Controller::new(StatePublisher::new()),
        policies,
        services,
        vec![],
    )
    .await
}

/// The diagnostics `controller` reports after syncing a cluster of one node with these
/// objects.
async fn diagnostics_in(
    controller: Controller,
    policies: Vec<Value>,
    services: Vec<Value>,
    pods: Vec<Value>,
) -> Vec<ReportedDiagnostic> {
    let script = Script::new()
        .on(SERVICES, [list("1", services)])
        .on(POLICIES, [list("1", policies)]);
    synced(controller, script, pods)
        .await
        .reported_diagnostics()
}

/// The store of a controller synced with a cluster of one node, the namespace `prod`, these
/// pods, and what `script` says about the other kinds (nothing: none).
async fn synced(controller: Controller, script: Script, pods: Vec<Value>) -> ClusterSync {
    let mut script = script
        .on(NAMESPACES, [list("1", vec![namespace("prod", "1")])])
        .on(NODES, [list("1", vec![node("node-1", "1")])])
        .on(PODS, [list("1", pods)]);
    for path in [SERVICES, ENDPOINT_SLICES, POLICIES] {
        if !script.paths.contains_key(path) {
            script = script.on(path, [list("1", vec![])]);
        }
    }
    let api = FakeApi::start(script);
    let mut sync = ClusterSync::new(controller);
    let mut events = Box::pin(watch_cluster(api.client(), &WatchOptions::default()));
    while let Ok(Some(e)) = tokio::time::timeout(QUIET, events.next()).await {
        sync.observe(e);
    }
    assert!(sync.flush().versions.is_some());
    sync
}

/// An events API that records creates and answers with `code`.
fn events_api(code: u16) -> (kube::Client, Arc<Mutex<Vec<Seen>>>) {
    let created = Arc::new(Mutex::new(Vec::new()));
    let log = created.clone();
    let (client, _task) = handler_client(move |seen| {
        log.lock().unwrap().push(seen.clone());
        Some(if code == 201 {
            json_response(201, seen.body.as_ref().unwrap())
        } else {
            json_response(code, &status(code, "AlreadyExists", "exists"))
        })
    });
    (client, created)
}

#[tokio::test(start_paused = true)]
async fn an_invalid_policy_yields_exactly_one_warning_event() {
    let diagnostics = diagnostics_of(vec![bad_cidr_policy("5", 1)]).await;
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
    let (client, created) = events_api(201);
    let mut events = DiagnosticEvents::new(client, "weir-controller-abc");

    assert_eq!(events.sync(&diagnostics, true).await, 0);
    // Recompiles report the same diagnostic again: no new Event.
    assert_eq!(events.sync(&diagnostics, true).await, 0);
    assert_eq!(events.sync(&diagnostics, true).await, 0);

    let created = created.lock().unwrap().clone();
    assert_eq!(created.len(), 1, "{created:#?}");
    let request = &created[0];
    assert_eq!(
        (request.method.as_str(), request.path.as_str()),
        ("POST", EVENTS)
    );
    let event = request.body.as_ref().unwrap();
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], INVALID_POLICY_REASON);
    assert_eq!(event["reportingController"], REPORTING_CONTROLLER);
    assert_eq!(event["reportingInstance"], "weir-controller-abc");
    assert!(event["eventTime"].is_string());
    assert!(event["action"].as_str().is_some_and(|a| !a.is_empty()));
    let note = event["note"].as_str().unwrap();
    assert!(
        note.starts_with("spec.ingress[0].from[0].ipBlock.cidr: invalid CIDR \"10.0.0.0/33\""),
        "the note names the field: {note}"
    );
    assert_eq!(
        event["regarding"],
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "namespace": "prod", "name": "bad", "uid": "uid-np-bad"})
    );
    assert_eq!(event["metadata"]["namespace"], "prod");
    assert!(
        event["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("bad.")
    );

    let metrics = events.metrics();
    assert_eq!(metrics.invalid_policy_generations_total(), 1);
    assert_eq!(metrics.events_emitted_total(), 1);
    assert_eq!(metrics.invalid_policies(), 1);
    let text = ControllerEndpoint::new(CompileMetrics::new(), StatePublisher::new())
        .with_policy_events(metrics)
        .render_metrics();
    assert!(
        text.contains("\nweir_controller_invalid_policy_generations_total 1\n"),
        "{text}"
    );
    assert!(
        text.contains("\nweir_controller_invalid_policies 1\n"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn followers_count_without_emitting_and_existing_events_are_not_duplicated() {
    let diagnostics = diagnostics_of(vec![bad_cidr_policy("5", 1)]).await;
    // The previous leader already created the Event: the API answers 409.
    let (client, created) = events_api(409);
    let mut events = DiagnosticEvents::new(client, "replica-2");

    events.sync(&diagnostics, false).await;
    assert!(
        created.lock().unwrap().is_empty(),
        "a follower emits nothing"
    );
    assert_eq!(
        events.metrics().invalid_policy_generations_total(),
        1,
        "but counts"
    );

    assert_eq!(
        events.sync(&diagnostics, true).await,
        0,
        "409 means it exists"
    );
    events.sync(&diagnostics, true).await;
    assert_eq!(created.lock().unwrap().len(), 1, "and is not retried");
    assert_eq!(
        events.metrics().invalid_policy_generations_total(),
        1,
        "counted once"
    );
}

#[tokio::test(start_paused = true)]
async fn an_edit_that_keeps_the_mistake_is_reported_again_and_failures_are_retried() {
    let first = diagnostics_of(vec![bad_cidr_policy("5", 1)]).await;
    let edited = diagnostics_of(vec![bad_cidr_policy("9", 2)]).await;
    let failures = Arc::new(Mutex::new(1));
    let log = Arc::new(Mutex::new(Vec::new()));
    let (client, _task) = {
        let (failures, log) = (failures.clone(), log.clone());
        handler_client(move |seen| {
            log.lock()
                .unwrap()
                .push(seen.body.clone().unwrap()["metadata"]["name"].clone());
            let mut left = failures.lock().unwrap();
            Some(if *left > 0 {
                *left -= 1;
                json_response(500, &status(500, "InternalError", "etcd timeout"))
            } else {
                json_response(201, seen.body.as_ref().unwrap())
            })
        })
    };
    let mut events = DiagnosticEvents::new(client, "replica-1");
    assert_eq!(events.sync(&first, true).await, 1, "the API failed once");
    assert_eq!(events.sync(&first, true).await, 0, "retried");
    assert_eq!(events.sync(&edited, true).await, 0);
    let names = log.lock().unwrap().clone();
    assert_eq!(names.len(), 3);
    assert_eq!(names[0], names[1], "the retry creates the same Event");
    assert_ne!(names[1], names[2], "a new generation is a new Event");
    assert_eq!(events.metrics().event_errors_total(), 1);
    assert_eq!(
        events.metrics().invalid_policy_generations_total(),
        2,
        "two generations"
    );
    assert_eq!(events.metrics().invalid_policies(), 1, "one policy");

    // Fixed: nothing is invalid any more.
    events.sync(&[], true).await;
    assert_eq!(events.metrics().invalid_policies(), 0);
    assert_eq!(log.lock().unwrap().len(), 3, "no Event for a fix");
}

#[tokio::test(start_paused = true)]
async fn an_unusable_service_port_yields_one_event_regarding_the_service_and_nothing_else() {
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "prod", "name": "web", "uid": "uid-svc-web",
                     "resourceVersion": "3"},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                           {"name": "odd", "port": 81, "targetPort": 81, "protocol": "QUIC"}]},
    });
    let good = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "prod", "name": "fine", "uid": "uid-svc-fine",
                     "resourceVersion": "4"},
        "spec": {"clusterIP": "10.96.0.11", "clusterIPs": ["10.96.0.11"],
                 "selector": {"app": "fine"},
                 "ports": [{"port": 80, "targetPort": 80, "protocol": "TCP"}]},
    });
    let diagnostics = diagnostics_with_services(vec![], vec![service, good]).await;
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
    let (client, created) = events_api(201);
    let mut events = DiagnosticEvents::new(client, "weir-controller-abc");
    assert_eq!(events.sync(&diagnostics, true).await, 0);
    assert_eq!(
        events.sync(&diagnostics, true).await,
        0,
        "recompiles add nothing"
    );

    let created = created.lock().unwrap().clone();
    assert_eq!(created.len(), 1, "{created:#?}");
    let event = created[0].body.as_ref().unwrap();
    assert_eq!(created[0].path, EVENTS);
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], INVALID_SERVICE_REASON);
    assert_eq!(
        event["regarding"],
        json!({"apiVersion": "v1", "kind": "Service",
               "namespace": "prod", "name": "web", "uid": "uid-svc-web"})
    );
    let note = event["note"].as_str().unwrap();
    assert!(
        note.starts_with("spec.ports[1].protocol: unknown protocol \"QUIC\""),
        "the note names the field: {note}"
    );
    assert!(note.contains("leaves this part out"), "{note}");
    assert!(
        event["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("web.")
    );
    let metrics = events.metrics();
    assert_eq!(metrics.invalid_policies(), 0, "a Service is not a policy");
    assert_eq!(metrics.invalid_policy_generations_total(), 0);
    assert_eq!(metrics.events_emitted_total(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_policy_too_large_for_a_node_yields_one_event_and_is_not_counted_as_invalid() {
    // Ten single ports: ten exact verdicts, where the node holds eight.
    let ports: Vec<Value> = (1..=10).map(|p| json!({"port": 2 * p + 1})).collect();
    let mut big = policy(
        "prod",
        "big",
        "5",
        json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": ports}]}),
    );
    big["spec"]["podSelector"] = json!({"matchLabels": {"app": "big"}});
    let mut small = policy(
        "prod",
        "small",
        "6",
        json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 80}]}]}),
    );
    small["spec"]["podSelector"] = json!({"matchLabels": {"app": "small"}});
    let controller = Controller::new(StatePublisher::new()).with_capacities(Capacities {
        verdicts_exact: 8,
        ..Capacities::default()
    });
    let diagnostics = diagnostics_in(
        controller,
        vec![big, small],
        vec![],
        vec![
            pod("prod", "big-1", "node-1", "10.244.0.5", "big", "7"),
            pod("prod", "small-1", "node-1", "10.244.0.6", "small", "8"),
        ],
    )
    .await;
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
    let (client, created) = events_api(201);
    let mut events = DiagnosticEvents::new(client, "weir-controller-abc");
    assert_eq!(events.sync(&diagnostics, true).await, 0);
    assert_eq!(events.sync(&diagnostics, true).await, 0, "reported once");

    let created = created.lock().unwrap().clone();
    assert_eq!(created.len(), 1, "{created:#?}");
    let event = created[0].body.as_ref().unwrap();
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], POLICY_TOO_LARGE_REASON);
    assert_eq!(
        event["regarding"],
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "namespace": "prod", "name": "big", "uid": "uid-np-big"})
    );
    let note = event["note"].as_str().unwrap();
    assert!(
        note.contains("node node-1") && note.contains("NetworkPolicy/prod/big"),
        "the note names the node and the policy: {note}"
    );
    let metrics = events.metrics();
    assert_eq!(metrics.invalid_policies(), 0, "the policy itself is valid");
    assert_eq!(metrics.events_emitted_total(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_invalid_cluster_policy_yields_one_event_regarding_it_and_fails_closed_alone() {
    // `networks` is an egress peer: this Deny rule cannot be read, so it denies everything.
    let bad = cluster_policy(
        "bad",
        "5",
        json!({"tier": "Admin", "priority": 5,
               "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "db"}}}},
               "ingress": [{"name": "odd", "action": "Deny", "from": [{"networks": ["10.1.0.0/16"]}]}]}),
    );
    let good = cluster_policy(
        "good",
        "6",
        json!({"tier": "Admin", "priority": 6,
               "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}},
               "egress": [{"name": "no-docs", "action": "Deny", "to": [{"networks": ["192.0.2.0/24"]}]}]}),
    );
    let sync = synced(
        Controller::new(StatePublisher::new()),
        Script::new().on(CLUSTER_POLICIES, [list("1", vec![bad, good])]),
        vec![
            pod("prod", "db", "node-1", "10.244.0.5", "db", "7"),
            pod("prod", "web", "node-1", "10.244.0.6", "web", "8"),
        ],
    )
    .await;
    let diagnostics = sync.reported_diagnostics();
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
    assert_eq!(diagnostics[0].field, "spec.ingress[0].from[0].networks");

    // bad fails closed for db; good applies to web as written.
    let out = weir_controller::Compiler::new().compile_all(sync.controller().cluster());
    let node = &out.nodes["node-1"];
    let db = node.endpoints[&weir_api::PodKey::new("prod", "db")];
    let web = node.endpoints[&weir_api::PodKey::new("prod", "web")];
    let decide = |set, ip: &str, port| node.verdict(set, ip.parse().unwrap(), 6, port).0;
    assert_eq!(
        decide(db.ingress, "10.244.0.6", 5432),
        weir_api::Action::Deny
    );
    assert_eq!(
        decide(db.ingress, "172.16.0.1", 5432),
        weir_api::Action::Deny
    );
    assert_eq!(decide(web.egress, "192.0.2.7", 443), weir_api::Action::Deny);
    assert_eq!(
        decide(web.egress, "198.51.100.7", 443),
        weir_api::Action::Allow
    );
    assert_eq!(
        decide(web.egress, "10.244.0.5", 5432),
        weir_api::Action::Allow
    );

    let (client, created) = events_api(201);
    let mut events = DiagnosticEvents::new(client, "weir-controller-abc");
    assert_eq!(events.sync(&diagnostics, true).await, 0);
    assert_eq!(events.sync(&diagnostics, true).await, 0, "reported once");
    let created = created.lock().unwrap().clone();
    assert_eq!(created.len(), 1, "{created:#?}");
    assert_eq!(
        (created[0].method.as_str(), created[0].path.as_str()),
        ("POST", DEFAULT_EVENTS),
        "a cluster-scoped object's Events go to the default namespace"
    );
    let event = created[0].body.as_ref().unwrap();
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], INVALID_POLICY_REASON);
    assert_eq!(event["metadata"]["namespace"], "default");
    assert_eq!(
        event["regarding"],
        json!({"apiVersion": "policy.networking.k8s.io/v1alpha2",
               "kind": "ClusterNetworkPolicy", "name": "bad", "uid": "uid-cnp-bad"})
    );
    let note = event["note"].as_str().unwrap();
    assert!(
        note.starts_with("spec.ingress[0].from[0].networks: ") && note.contains("fails closed"),
        "{note}"
    );
    let metrics = events.metrics();
    assert_eq!(metrics.invalid_policies(), 1);
    assert_eq!(metrics.invalid_policy_generations_total(), 1);
    assert_eq!(metrics.events_emitted_total(), 1);
}
