//! weirctl in Kubernetes mode against a mock API server: agents and controllers found by
//! their labels in the weir namespace, their endpoints reached through the API server's pod
//! proxy, pods listed cluster-wide. The agents' `/state` is what the controller's compiler
//! makes of the shared test cluster, so every trace must equal the offline one.

mod support;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use support::{MANIFESTS, POLICIES};
use tower_test::mock;
use weir_api::NodeState;
use weir_localcluster::AGENT_HTTP_PORT;
use weirctl::{
    live, playground, status,
    target::{CONTROLLER_HTTP_PORT, KubeTarget, Target},
    trace::{self, Request as TraceRequest},
};

const NAMESPACE: &str = "weir-system";

fn json_response(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

fn text_response(code: u16, body: &str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .body(Body::from(body.as_bytes().to_vec()))
        .unwrap()
}

fn pod_list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": items})
}

/// What the mock API server holds and serves.
struct ApiServer {
    /// Workload pods (listed cluster-wide).
    pods: Vec<Value>,
    /// Node → the state its agent applied.
    states: BTreeMap<String, NodeState>,
    /// Nodes whose agent refuses `/state` to the proxy (no --flows-from-anywhere).
    refusing: Vec<String>,
    /// Nodes whose agent is not ready.
    unready: Vec<String>,
    /// Every path asked for.
    seen: Vec<String>,
}

impl ApiServer {
    fn answer(&mut self, path: &str, query: &str) -> Response<Body> {
        self.seen.push(format!("{path}?{query}"));
        let proxied = format!("/api/v1/namespaces/{NAMESPACE}/pods/");
        if path == "/api/v1/pods" {
            return json_response(200, &pod_list(self.pods.clone()));
        }
        if path == format!("/api/v1/namespaces/{NAMESPACE}/pods") {
            let items = if query.contains("weir-agent") {
                self.states
                    .keys()
                    .map(|node| {
                        json!({"metadata": {"name": format!("weir-agent-{node}"), "namespace": NAMESPACE},
                               "spec": {"nodeName": node, "containers": []}})
                    })
                    .collect()
            } else if query.contains("weir-controller") {
                vec![
                    json!({"metadata": {"name": "weir-controller-0", "namespace": NAMESPACE},
                           "spec": {"containers": []}}),
                ]
            } else {
                Vec::new()
            };
            return json_response(200, &pod_list(items));
        }
        if let Some(rest) = path.strip_prefix(&proxied) {
            let (pod_port, target) = rest.split_once("/proxy").unwrap_or((rest, ""));
            if pod_port == format!("weir-controller-0:{CONTROLLER_HTTP_PORT}") {
                return text_response(200, "");
            }
            let agent_port = format!(":{AGENT_HTTP_PORT}");
            let Some(node) = pod_port
                .strip_suffix(agent_port.as_str())
                .and_then(|p| p.strip_prefix("weir-agent-"))
            else {
                return json_response(404, &json!({"kind": "Status", "code": 404}));
            };
            return match target {
                "/state" if self.refusing.iter().any(|n| n == node) => text_response(
                    403,
                    "/state is served to this node only (--flows-from-anywhere)",
                ),
                "/state" => json_response(200, &serde_json::to_value(&self.states[node]).unwrap()),
                "/readyz" if self.unready.iter().any(|n| n == node) => {
                    text_response(503, "controller state not applied")
                }
                "/readyz" => text_response(200, "ok"),
                "/metrics" => text_response(200, ""),
                _ => text_response(404, "not found"),
            };
        }
        json_response(404, &json!({"kind": "Status", "code": 404}))
    }
}

fn client(server: Arc<Mutex<ApiServer>>) -> kube::Client {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let path = request.uri().path().to_string();
            let query = request.uri().query().unwrap_or("").to_string();
            send.send_response(server.lock().unwrap().answer(&path, &query));
        }
    });
    kube::Client::new(service, "default")
}

/// The shared test cluster compiled, and the mock API server serving it.
fn cluster() -> (playground::Playground, Arc<Mutex<ApiServer>>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("objects.yaml"), MANIFESTS).unwrap();
    std::fs::write(dir.path().join("policies.yaml"), POLICIES).unwrap();
    let p = playground::compile(dir.path()).unwrap();
    let pods = MANIFESTS
        .split("\n---\n")
        .map(|doc| serde_norway::from_str::<Value>(doc).unwrap())
        .filter(|v| v["kind"] == "Pod")
        .map(|mut v| {
            // What the API server would list: the node the playground put it on.
            if v["spec"]["nodeName"].is_null() {
                v["spec"]["nodeName"] = json!("playground");
            }
            v
        })
        .collect();
    let states = p
        .views
        .iter()
        .map(|v| (v.node.clone(), v.state.clone()))
        .collect();
    let server = ApiServer {
        pods,
        states,
        refusing: Vec::new(),
        unready: Vec::new(),
        seen: Vec::new(),
    };
    (p, Arc::new(Mutex::new(server)))
}

#[tokio::test]
async fn traces_through_the_api_servers_pod_proxy_equal_the_offline_ones() {
    let (p, server) = cluster();
    let target = Target::Kube(
        KubeTarget::discover(client(server.clone()), NAMESPACE)
            .await
            .expect("agents and controllers found"),
    );
    assert_eq!(target.nodes(), ["n1", "n2", "playground"]);
    let pods = target.pods().await.expect("pods listed");
    assert_eq!(pods.len(), 3);
    let mut warnings = Vec::new();
    let views = live::views(&target, &pods, &mut warnings).await.unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let names = ["shop/web", "shop/db", "ops/probe"];
    let mut compared = 0;
    for from in names {
        for to in names {
            for (proto, port) in [(6, 5432), (6, 8080), (17, 53)] {
                let req = TraceRequest {
                    from: from.parse().unwrap(),
                    to: to.parse().unwrap(),
                    proto,
                    port,
                };
                let live = trace::trace(&views, &pods, &req).unwrap();
                let offline = trace::trace(&p.views, &p.pods, &req).unwrap();
                assert_eq!(
                    live.allowed, offline.allowed,
                    "{from} -> {to} {proto}/{port}"
                );
                assert_eq!(live.paths, offline.paths, "{from} -> {to} {proto}/{port}");
                compared += 1;
            }
        }
    }
    assert_eq!(compared, 27);
    let seen = server.lock().unwrap().seen.clone();
    assert!(
        seen.iter().any(|s| s.starts_with(&format!(
            "/api/v1/namespaces/{NAMESPACE}/pods/weir-agent-n1:{AGENT_HTTP_PORT}/proxy/state?"
        ))),
        "{seen:#?}"
    );
    assert!(
        seen.iter()
            .any(|s| s.contains("labelSelector=app.kubernetes.io%2Fname%3Dweir-agent")),
        "{seen:#?}"
    );
}

#[tokio::test]
async fn an_agent_that_refuses_the_proxy_is_named_and_an_unready_one_is_unhealthy() {
    let (_, server) = cluster();
    {
        let mut s = server.lock().unwrap();
        s.refusing.push("n2".into());
        s.unready.push("n1".into());
    }
    let target = Target::Kube(
        KubeTarget::discover(client(server.clone()), NAMESPACE)
            .await
            .unwrap(),
    );
    let pods = target.pods().await.unwrap();
    let mut warnings = Vec::new();
    let views = live::views(&target, &pods, &mut warnings).await.unwrap();
    assert_eq!(views.len(), 2, "n2 is left out");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("n2") && w.contains("--flows-from-anywhere")),
        "{warnings:?}"
    );
    let s = status::gather(&target).await;
    assert!(
        s.problems.iter().any(|p| p.contains("n1")),
        "{:?}",
        s.problems
    );
    let text = status::render(&s);
    assert!(text.contains("UNHEALTHY"), "{text}");
}
