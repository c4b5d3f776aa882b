//! A mocked API server for the Kubernetes tests: a `kube::Client` whose requests land in a
//! script (`tower_test::mock`), and builders for the JSON the API server sends.
//!
//! Requests are answered per resource path from a queue of [`Step`]s, so the concurrent
//! watchers of the controller never race each other's script. A script that says nothing
//! about ClusterNetworkPolicies lists none (a cluster with the CRD and no such object). A request that
//! finds its queue empty, or paused, stays pending (a quiet watch). Everything that was
//! requested is logged for assertions.

#![allow(
    dead_code,
    reason = "each test file uses a different subset of the helpers"
)]

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Request, Response, StatusCode};
use kube::{Client, client::Body};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tower_test::mock::{self, SendResponse};

/// Resource paths of the kinds the controller watches.
pub const NAMESPACES: &str = "/api/v1/namespaces";
pub const PODS: &str = "/api/v1/pods";
pub const NODES: &str = "/api/v1/nodes";
pub const POLICIES: &str = "/apis/networking.k8s.io/v1/networkpolicies";
pub const SERVICES: &str = "/api/v1/services";
pub const ENDPOINT_SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
pub const CLUSTER_POLICIES: &str = "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies";
pub const DROP_CIDR_SETS: &str = "/apis/weir.dev/v1alpha1/dropcidrsets";
pub const HOST_POLICIES: &str = "/apis/weir.dev/v1alpha1/hostpolicies";

/// Long enough for the watcher's first backoff (0.8 s, jittered up to twice that), short
/// enough to be nothing in paused time.
pub const QUIET: Duration = Duration::from_secs(10);

/// One request as the API server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub body: Option<Value>,
    pub content_type: Option<String>,
}

impl Seen {
    pub fn is_watch(&self) -> bool {
        self.query.get("watch").map(String::as_str) == Some("true")
    }

    pub fn resource_version(&self) -> Option<&str> {
        self.query.get("resourceVersion").map(String::as_str)
    }
}

/// What the API server answers next on one path.
#[derive(Clone, Debug)]
pub enum Step {
    /// A list response (any list request).
    List {
        resource_version: String,
        items: Vec<Value>,
    },
    /// A watch response: these events, then the stream ends (as when a connection drops or
    /// the server-side timeout passes). With `from`, the request must ask for that
    /// `resourceVersion`.
    Watch {
        from: Option<String>,
        events: Vec<Value>,
    },
    /// Any request answered with this HTTP status (a Kubernetes `Status` body).
    Fail { code: u16, reason: String },
    /// Hold requests on this path until [`FakeApi::resume`] with this name.
    Pause(&'static str),
    /// Any request answered with this JSON object.
    Reply { code: u16, body: Value },
}

pub fn list(resource_version: &str, items: Vec<Value>) -> Step {
    Step::List {
        resource_version: resource_version.into(),
        items,
    }
}

pub fn watch_from(resource_version: &str, events: Vec<Value>) -> Step {
    Step::Watch {
        from: Some(resource_version.into()),
        events,
    }
}

pub fn fail(code: u16, reason: &str) -> Step {
    Step::Fail {
        code,
        reason: reason.into(),
    }
}

/// A script: per path, the steps in order.
#[derive(Clone, Debug, Default)]
pub struct Script {
    pub paths: BTreeMap<String, VecDeque<Step>>,
}

impl Script {
    pub fn new() -> Self {
        Self::default()
    }

    /// Empty lists of Services and EndpointSlices (then quiet watches), for tests about
    /// the other kinds.
    pub fn without_services(self) -> Self {
        self.on(SERVICES, [list("1", vec![])])
            .on(ENDPOINT_SLICES, [list("1", vec![])])
    }

    pub fn on(mut self, path: &str, steps: impl IntoIterator<Item = Step>) -> Self {
        self.paths.entry(path.to_owned()).or_default().extend(steps);
        self
    }
}

struct Shared {
    seen: Vec<Seen>,
    surprises: Vec<String>,
}

/// The running mock API server.
pub struct FakeApi {
    client: Client,
    shared: Arc<Mutex<Shared>>,
    resume: mpsc::UnboundedSender<&'static str>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Pending = (Request<Body>, SendResponse<Response<Body>>);

impl FakeApi {
    pub fn start(script: Script) -> Self {
        // The CRD kinds: empty unless the test says otherwise.
        let mut script = script;
        for path in [CLUSTER_POLICIES, DROP_CIDR_SETS, HOST_POLICIES] {
            if !script.paths.contains_key(path) {
                script = script.on(path, [list("1", vec![])]);
            }
        }
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let shared = Arc::new(Mutex::new(Shared {
            seen: Vec::new(),
            surprises: Vec::new(),
        }));
        let (resume, mut resumed) = mpsc::unbounded_channel::<&'static str>();
        let state = shared.clone();
        let task = tokio::spawn(async move {
            let mut script = script;
            // Requests waiting for a step, per path. Their responders stay here, so requests
            // beyond the script stay pending (a quiet watch).
            let mut waiting: BTreeMap<String, VecDeque<Pending>> = BTreeMap::new();
            loop {
                tokio::select! {
                    next = handle.next_request() => {
                        let Some((request, send)) = next else { return };
                        let path = request.uri().path().to_owned();
                        waiting.entry(path).or_default().push_back((request, send));
                    }
                    Some(name) = resumed.recv() => {
                        for steps in script.paths.values_mut() {
                            if matches!(steps.front(), Some(Step::Pause(p)) if *p == name) {
                                steps.pop_front();
                            }
                        }
                    }
                }
                for (path, queue) in &mut waiting {
                    let steps = script.paths.entry(path.clone()).or_default();
                    while !queue.is_empty() {
                        match steps.front() {
                            None | Some(Step::Pause(_)) => break,
                            Some(_) => {}
                        }
                        let step = steps.pop_front().expect("checked above");
                        let (request, send) = queue.pop_front().expect("checked above");
                        let seen = record(request).await;
                        let response = answer(&step, &seen, &state);
                        state.lock().unwrap().seen.push(seen);
                        send.send_response(response);
                    }
                }
            }
        });
        Self {
            client,
            shared,
            resume,
            task,
        }
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Lets the steps after `Pause(name)` run.
    pub fn resume(&self, name: &'static str) {
        let _ = self.resume.send(name);
    }

    /// Every request answered so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.lock().unwrap().seen.clone()
    }

    /// The answered requests on one path.
    pub fn seen_on(&self, path: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.path == path).collect()
    }

    /// Panics if a request did not match its step.
    pub fn assert_no_surprises(&self) {
        let surprises = self.shared.lock().unwrap().surprises.clone();
        assert!(surprises.is_empty(), "unexpected requests: {surprises:#?}");
    }
}

async fn record(request: Request<Body>) -> Seen {
    let (parts, body) = request.into_parts();
    let content_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let query = parts
        .uri
        .query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    let bytes = body.collect_bytes().await.unwrap_or_default();
    let body = (!bytes.is_empty())
        .then(|| serde_json::from_slice(&bytes).ok())
        .flatten();
    Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query,
        body,
        content_type,
    }
}

fn answer(step: &Step, seen: &Seen, shared: &Mutex<Shared>) -> Response<Body> {
    let surprise = |what: String| shared.lock().unwrap().surprises.push(what);
    match step {
        Step::List {
            resource_version,
            items,
        } => {
            if seen.is_watch() {
                surprise(format!("expected a list on {}, got a watch", seen.path));
            }
            json_response(
                200,
                &json!({
                    "apiVersion": "v1",
                    "kind": "List",
                    "metadata": {"resourceVersion": resource_version},
                    "items": items,
                }),
            )
        }
        Step::Watch { from, events } => {
            if !seen.is_watch() {
                surprise(format!(
                    "expected a watch on {}, got {:?}",
                    seen.path, seen.query
                ));
            }
            if let Some(rv) = from
                && seen.resource_version() != Some(rv.as_str())
            {
                surprise(format!(
                    "watch on {} from resourceVersion {:?}, expected {rv}",
                    seen.path,
                    seen.resource_version()
                ));
            }
            let mut body = Vec::new();
            for e in events {
                body.extend(serde_json::to_vec(e).unwrap());
                body.push(b'\n');
            }
            Response::builder()
                .status(200)
                .body(Body::from(body))
                .unwrap()
        }
        Step::Fail { code, reason } => json_response(*code, &status(*code, reason, reason)),
        Step::Reply { code, body } => json_response(*code, body),
        Step::Pause(_) => unreachable!("pauses are never answered"),
    }
}

pub fn json_response(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

/// A Kubernetes `Status` object.
pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    })
}

// ------------------------------------------------------------------ objects and events

pub fn namespace(name: &str, rv: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "resourceVersion": rv, "uid": format!("uid-ns-{name}"),
                     "labels": {"kubernetes.io/metadata.name": name}},
    })
}

pub fn node(name: &str, rv: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "resourceVersion": rv, "uid": format!("uid-node-{name}")},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]},
    })
}

pub fn pod(namespace: &str, name: &str, node: &str, ip: &str, app: &str, rv: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": rv,
                     "uid": format!("uid-pod-{name}"), "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

/// A NetworkPolicy selecting every pod of `namespace` with the given spec extras.
pub fn policy(namespace: &str, name: &str, rv: &str, spec: Value) -> Value {
    let mut spec = spec;
    if spec.get("podSelector").is_none() {
        spec["podSelector"] = json!({});
    }
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": rv,
                     "uid": format!("uid-np-{name}"), "generation": 1},
        "spec": spec,
    })
}

/// A ClusterNetworkPolicy with this spec (`tier`, `priority`, `subject`, rules).
pub fn cluster_policy(name: &str, rv: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name, "resourceVersion": rv,
                     "uid": format!("uid-cnp-{name}"), "generation": 1},
        "spec": spec,
    })
}

pub fn added(object: Value) -> Value {
    json!({"type": "ADDED", "object": object})
}

pub fn modified(object: Value) -> Value {
    json!({"type": "MODIFIED", "object": object})
}

pub fn deleted(object: Value) -> Value {
    json!({"type": "DELETED", "object": object})
}

pub fn bookmark(api_version: &str, kind: &str, rv: &str) -> Value {
    json!({
        "type": "BOOKMARK",
        "object": {"apiVersion": api_version, "kind": kind,
                   "metadata": {"resourceVersion": rv}},
    })
}

/// The watch event the API server sends when the requested version left its history.
pub fn gone() -> Value {
    json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")})
}

// ------------------------------------------------------------------ stateful fakes

/// A mock API server answered by a function of the request (`None`: leave it pending).
/// Every call makes a new client with its own connection to the same handler.
pub fn handler_client<H>(handler: H) -> (Client, tokio::task::JoinHandle<()>)
where
    H: FnMut(&Seen) -> Option<Response<Body>> + Send + 'static,
{
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let mut handler = handler;
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let seen = record(request).await;
            match handler(&seen) {
                Some(response) => send.send_response(response),
                None => held.push(send),
            }
        }
    });
    (client, task)
}

/// What a Lease write looked like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseWrite {
    pub method: String,
    pub holder: Option<String>,
    pub transitions: Option<i64>,
    pub duration: Option<i64>,
}

#[derive(Debug, Default)]
struct LeaseState {
    lease: Option<Value>,
    version: u64,
    writes: Vec<LeaseWrite>,
    /// On the next update, someone else writes first (the update then conflicts).
    steal_on_next_update: Option<String>,
    unreachable: bool,
}

/// A Lease API with optimistic concurrency (`resourceVersion`), shared by several clients.
#[derive(Clone, Default)]
pub struct FakeLeases {
    state: Arc<Mutex<LeaseState>>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

pub const LEASE_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/weir-system/leases";

impl FakeLeases {
    pub fn new() -> Self {
        Self::default()
    }

    /// A lease already held by `holder`, renewed just now.
    pub fn held_by(holder: &str, transitions: i64) -> Self {
        let leases = Self::new();
        leases.write_as(holder, transitions);
        leases
    }

    /// Someone (not a client) writes the lease as `holder`, e.g. a live leader renewing.
    pub fn write_as(&self, holder: &str, transitions: i64) {
        foreign_write(&mut self.state.lock().unwrap(), holder, transitions);
    }

    pub fn steal_on_next_update(&self, holder: &str) {
        self.state.lock().unwrap().steal_on_next_update = Some(holder.to_owned());
    }

    pub fn set_unreachable(&self, unreachable: bool) {
        self.state.lock().unwrap().unreachable = unreachable;
    }

    pub fn holder(&self) -> Option<String> {
        let s = self.state.lock().unwrap();
        s.lease.as_ref()?["spec"]["holderIdentity"]
            .as_str()
            .map(str::to_owned)
    }

    pub fn spec(&self) -> Option<Value> {
        let s = self.state.lock().unwrap();
        Some(s.lease.as_ref()?["spec"].clone())
    }

    /// Writes by clients, in order.
    pub fn writes(&self) -> Vec<LeaseWrite> {
        self.state.lock().unwrap().writes.clone()
    }

    pub fn client(&self) -> Client {
        let state = self.state.clone();
        let (client, task) = handler_client(move |seen| {
            let mut s = state.lock().unwrap();
            if s.unreachable {
                return None;
            }
            Some(lease_request(&mut s, seen))
        });
        self.tasks.lock().unwrap().push(task);
        client
    }
}

impl Drop for FakeLeases {
    fn drop(&mut self) {
        if Arc::strong_count(&self.tasks) == 1 {
            for t in self.tasks.lock().unwrap().drain(..) {
                t.abort();
            }
        }
    }
}

fn lease_request(s: &mut LeaseState, seen: &Seen) -> Response<Body> {
    let named = format!("{LEASE_PATH}/weir-controller");
    let write = |method: &str, body: &Value| LeaseWrite {
        method: method.to_owned(),
        holder: body["spec"]["holderIdentity"].as_str().map(str::to_owned),
        transitions: body["spec"]["leaseTransitions"].as_i64(),
        duration: body["spec"]["leaseDurationSeconds"].as_i64(),
    };
    match (seen.method.as_str(), seen.path.as_str()) {
        ("GET", p) if p == named => match &s.lease {
            Some(lease) => json_response(200, lease),
            None => json_response(
                404,
                &status(404, "NotFound", "leases \"weir-controller\" not found"),
            ),
        },
        ("POST", LEASE_PATH) => {
            if s.lease.is_some() {
                return json_response(409, &status(409, "AlreadyExists", "already exists"));
            }
            let mut body = seen.body.clone().unwrap_or_default();
            s.writes.push(write("POST", &body));
            s.version += 1;
            body["metadata"]["resourceVersion"] = json!(s.version.to_string());
            s.lease = Some(body.clone());
            json_response(201, &body)
        }
        ("PUT", p) if p == named => {
            let mut body = seen.body.clone().unwrap_or_default();
            if let Some(thief) = s.steal_on_next_update.take() {
                let transitions = s
                    .lease
                    .as_ref()
                    .and_then(|l| l["spec"]["leaseTransitions"].as_i64());
                foreign_write(s, &thief, transitions.unwrap_or(0) + 1);
            }
            let current = s
                .lease
                .as_ref()
                .and_then(|l| l["metadata"]["resourceVersion"].as_str())
                .map(str::to_owned);
            if body["metadata"]["resourceVersion"]
                .as_str()
                .map(str::to_owned)
                != current
            {
                return json_response(
                    409,
                    &status(409, "Conflict", "the object has been modified"),
                );
            }
            s.writes.push(write("PUT", &body));
            s.version += 1;
            body["metadata"]["resourceVersion"] = json!(s.version.to_string());
            s.lease = Some(body.clone());
            json_response(200, &body)
        }
        _ => json_response(404, &status(404, "NotFound", "no such path")),
    }
}

/// Someone else's write (not logged as a client write).
fn foreign_write(s: &mut LeaseState, holder: &str, transitions: i64) {
    s.version += 1;
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    s.lease = Some(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "weir-controller", "namespace": "weir-system",
                     "resourceVersion": s.version.to_string()},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                 "acquireTime": now, "renewTime": now, "leaseTransitions": transitions},
    }));
}

/// A new cluster CA and a serving certificate from it for `localhost` and 127.0.0.1: the
/// controller's TLS, for servers on loopback.
pub fn loopback_tls() -> (Arc<weir_transport::ClusterCa>, weir_transport::ServerTls) {
    let ca = Arc::new(weir_transport::ClusterCa::generate("test CA").unwrap());
    let cert = ca
        .issue_controller_cert(&["localhost"], &["127.0.0.1".parse().unwrap()])
        .unwrap();
    let tls =
        weir_transport::ServerTls::from_pem(ca.cert_pem(), &cert.cert_pem, &cert.key_pem).unwrap();
    (ca, tls)
}

/// A listener on a free loopback port, and the `https://` endpoint that reaches it.
pub async fn loopback_listener() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("https://{}", listener.local_addr().unwrap());
    (listener, endpoint)
}
