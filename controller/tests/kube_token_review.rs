//! Bootstrap tokens reviewed by a mocked TokenReview API: who may obtain a node
//! certificate, and for which node.

mod kube_support;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use kube_support::*;
use serde_json::{Value, json};
use weir_controller::kube::{KubeTokenReviewer, TokenReviewConfig};
use weir_transport::{
    Bootstrap, ClientTls, NodeStateServer, ReviewError, StatePublisher, TokenReviewer,
    bootstrap_node_certificate,
};

const REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
const AGENT: &str = "system:serviceaccount:weir-system:weir-agent";

/// How the fake API server reviews each token.
#[derive(Clone)]
struct Review {
    authenticated: bool,
    audiences: Vec<&'static str>,
    username: &'static str,
    extra: Value,
}

fn agent_on(node: &str) -> Review {
    Review {
        authenticated: true,
        audiences: vec!["weir-controller"],
        username: AGENT,
        extra: json!({
            "authentication.kubernetes.io/node-name": [node],
            "authentication.kubernetes.io/pod-name": ["weir-agent-x7k2p"],
            "authentication.kubernetes.io/pod-uid": ["uid-agent"],
        }),
    }
}

/// A TokenReview API with these tokens, and these pods in weir-system. Returns the reviews
/// requested.
fn api(
    tokens: Vec<(&'static str, Review)>,
    pods: Vec<Value>,
) -> (kube::Client, Arc<Mutex<Vec<Value>>>) {
    let tokens: BTreeMap<&str, Review> = tokens.into_iter().collect();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let log = requests.clone();
    let (client, _task) = handler_client(move |seen| {
        if seen.method == "POST" && seen.path == REVIEWS {
            let body = seen.body.clone().unwrap();
            log.lock().unwrap().push(body.clone());
            let token = body["spec"]["token"].as_str().unwrap_or_default();
            let status = match tokens.get(token) {
                Some(r) => json!({
                    "authenticated": r.authenticated,
                    "audiences": r.audiences,
                    "user": {"username": r.username, "uid": "sa-uid",
                             "groups": ["system:serviceaccounts"], "extra": r.extra},
                }),
                None => json!({"authenticated": false, "error": "invalid bearer token"}),
            };
            let mut answer = body;
            answer["status"] = status;
            return Some(json_response(201, &answer));
        }
        if seen.method == "GET"
            && let Some(name) = seen
                .path
                .strip_prefix("/api/v1/namespaces/weir-system/pods/")
        {
            return Some(match pods.iter().find(|p| p["metadata"]["name"] == name) {
                Some(p) => json_response(200, p),
                None => json_response(404, &status(404, "NotFound", "pod not found")),
            });
        }
        Some(json_response(
            500,
            &status(500, "InternalError", "unexpected request"),
        ))
    });
    (client, requests)
}

fn reviewer(client: kube::Client) -> KubeTokenReviewer {
    KubeTokenReviewer::new(client, TokenReviewConfig::default())
}

fn rejected(result: Result<weir_transport::ReviewedIdentity, ReviewError>) -> String {
    match result {
        Err(ReviewError::Rejected { reason }) => reason,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn an_agent_token_is_accepted_for_the_node_it_names() {
    let (client, requests) = api(vec![("t-a", agent_on("node-a"))], vec![]);
    let identity = reviewer(client).review("t-a").await.unwrap();
    assert_eq!(identity.node_name, "node-a");
    assert_eq!(identity.service_account, "weir-system/weir-agent");
    assert_eq!(identity.pod_name.as_deref(), Some("weir-agent-x7k2p"));
    let sent = requests.lock().unwrap()[0].clone();
    assert_eq!(sent["spec"]["audiences"], json!(["weir-controller"]));
    assert_eq!(sent["spec"]["token"], "t-a");
}

#[tokio::test]
async fn without_node_info_the_node_of_the_bound_pod_is_used() {
    let mut review = agent_on("unused");
    review.extra = json!({
        "authentication.kubernetes.io/pod-name": ["weir-agent-old"],
        "authentication.kubernetes.io/pod-uid": ["uid-old"],
    });
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "weir-agent-old", "namespace": "weir-system", "uid": "uid-old"},
        "spec": {"nodeName": "node-b", "containers": []},
    });
    let recreated = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "weir-agent-old", "namespace": "weir-system", "uid": "uid-new"},
        "spec": {"nodeName": "node-c", "containers": []},
    });
    let (client, _) = api(vec![("t", review.clone())], vec![pod]);
    assert_eq!(
        reviewer(client).review("t").await.unwrap().node_name,
        "node-b"
    );

    let (client, _) = api(vec![("t", review)], vec![recreated]);
    let reason = rejected(reviewer(client).review("t").await);
    assert!(reason.contains("no longer exists"), "{reason}");
}

#[tokio::test]
async fn tokens_of_other_service_accounts_are_refused() {
    let mut review = agent_on("node-a");
    review.username = "system:serviceaccount:default:default";
    let (client, _) = api(vec![("t", review)], vec![]);
    let reason = rejected(reviewer(client).review("t").await);
    assert!(
        reason.contains("system:serviceaccount:default:default"),
        "{reason}"
    );
}

#[tokio::test]
async fn unauthenticated_tokens_and_other_audiences_are_refused() {
    let mut other_audience = agent_on("node-a");
    other_audience.audiences = vec!["https://kubernetes.default.svc"];
    let mut unbound = agent_on("node-a");
    unbound.extra = json!({});
    let (client, _) = api(vec![("aud", other_audience), ("unbound", unbound)], vec![]);
    let r = reviewer(client);
    assert!(rejected(r.review("forged").await).contains("invalid bearer token"));
    assert!(rejected(r.review("aud").await).contains("audience"));
    assert!(rejected(r.review("unbound").await).contains("not bound to a pod"));
}

#[tokio::test]
async fn an_unreachable_api_server_is_unavailable_not_a_rejection() {
    let (client, _task) = handler_client(|_| {
        Some(json_response(
            503,
            &status(503, "ServiceUnavailable", "try later"),
        ))
    });
    assert!(matches!(
        reviewer(client).review("t").await,
        Err(ReviewError::Unavailable { .. })
    ));
}

/// Through the real bootstrap RPC over TLS on loopback.
#[tokio::test]
async fn a_token_for_one_node_cannot_obtain_a_certificate_for_another() {
    let (client, _) = api(vec![("t-a", agent_on("node-a"))], vec![]);
    let (ca, tls) = loopback_tls();
    let (listener, endpoint) = loopback_listener().await;
    let server = NodeStateServer::new(StatePublisher::new())
        .with_bootstrap(Bootstrap::new(ca.clone(), Arc::new(reviewer(client))));
    let serving = tokio::spawn(server.serve(listener, tls, std::future::pending()));
    let anonymous = ClientTls::new(ca.cert_pem(), "localhost").unwrap();

    let refused = tokio::time::timeout(
        Duration::from_secs(20),
        bootstrap_node_certificate(&endpoint, &anonymous, "node-b", "t-a"),
    )
    .await
    .unwrap();
    let code = refused.err().and_then(|e| e.code());
    assert_eq!(
        code,
        Some(tonic::Code::PermissionDenied),
        "node-a's token must not get node-b's certificate"
    );

    let issued = tokio::time::timeout(
        Duration::from_secs(20),
        bootstrap_node_certificate(&endpoint, &anonymous, "node-a", "t-a"),
    )
    .await
    .unwrap();
    assert!(issued.is_ok(), "{issued:?}");
    serving.abort();
}
