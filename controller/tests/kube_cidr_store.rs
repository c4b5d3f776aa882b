//! Node pod-CIDR assignments in a ConfigMap, against a mocked API server with optimistic
//! concurrency: restarts keep ranges, only the leader writes, followers adopt the leader's
//! ranges, lost races are written again, a new leader adopts before it writes.
//!
//! Real time with short intervals: what agents receive is read over TLS on loopback, which
//! paused time would race with its timeouts.

mod kube_support;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube_support::*;
use serde_json::{Value, json};
use tokio::time::sleep;
use weir_controller::{
    kube::cidr_store::{self, CidrStoreConfig},
    leader::{LeaderElector, Leadership, LeaseConfig},
    node_cidrs::NodeCidrAllocator,
    run::Controller,
    source::{Change, Object},
};
use weir_transport::{ClientTls, ClusterCa, NodeStateServer, NodeUpdate, StatePublisher, connect};

const PATH: &str = "/api/v1/namespaces/weir-system/configmaps";
const NAMED: &str = "/api/v1/namespaces/weir-system/configmaps/weir-node-cidrs";

/// One write a client made.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Write {
    method: String,
    /// The `resourceVersion` the write was conditional on.
    resource_version: Option<String>,
    data: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
struct CmState {
    data: Option<BTreeMap<String, String>>,
    version: u64,
    writes: Vec<Write>,
    /// Written by someone else just before the next client write (which then conflicts).
    foreign_write_before_next: Option<BTreeMap<String, String>>,
}

/// The ConfigMap weir-system/weir-node-cidrs behind a mocked API server.
#[derive(Clone, Default)]
struct FakeConfigMap {
    state: Arc<Mutex<CmState>>,
}

impl FakeConfigMap {
    fn with(data: &[(&str, &str)]) -> Self {
        let fake = Self::default();
        fake.foreign_write(data);
        fake
    }

    /// Someone else (the old leader, a person) writes the ConfigMap.
    fn foreign_write(&self, data: &[(&str, &str)]) {
        let mut s = self.state.lock().unwrap();
        s.version += 1;
        s.data = Some(strings(data));
    }

    fn foreign_write_before_next_write(&self, data: &[(&str, &str)]) {
        self.state.lock().unwrap().foreign_write_before_next = Some(strings(data));
    }

    fn data(&self) -> Option<BTreeMap<String, String>> {
        self.state.lock().unwrap().data.clone()
    }

    fn writes(&self) -> Vec<Write> {
        self.state.lock().unwrap().writes.clone()
    }

    fn client(&self) -> kube::Client {
        let state = self.state.clone();
        let (client, _task) = handler_client(move |seen| {
            let mut s = state.lock().unwrap();
            Some(answer(&mut s, seen))
        });
        client
    }
}

fn strings(data: &[(&str, &str)]) -> BTreeMap<String, String> {
    data.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn object(s: &CmState) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "weir-node-cidrs", "namespace": "weir-system",
                     "resourceVersion": s.version.to_string()},
        "data": s.data,
    })
}

fn answer(s: &mut CmState, seen: &Seen) -> http::Response<kube::client::Body> {
    let not_found = || {
        json_response(
            404,
            &status(404, "NotFound", "configmaps \"weir-node-cidrs\" not found"),
        )
    };
    match (seen.method.as_str(), seen.path.as_str()) {
        ("GET", NAMED) => match s.data {
            Some(_) => json_response(200, &object(s)),
            None => not_found(),
        },
        ("POST", PATH) | ("PUT", NAMED) => {
            let body = seen.body.clone().unwrap_or_default();
            let write = Write {
                method: seen.method.clone(),
                resource_version: body["metadata"]["resourceVersion"]
                    .as_str()
                    .map(str::to_owned),
                data: serde_json::from_value(body["data"].clone()).unwrap_or_default(),
            };
            s.writes.push(write.clone());
            if let Some(data) = s.foreign_write_before_next.take() {
                s.version += 1;
                s.data = Some(data);
            }
            if seen.method == "POST" && s.data.is_some() {
                return json_response(409, &status(409, "AlreadyExists", "already exists"));
            }
            if seen.method == "PUT" {
                if s.data.is_none() {
                    return not_found();
                }
                if write.resource_version != Some(s.version.to_string()) {
                    return json_response(
                        409,
                        &status(409, "Conflict", "the object has been modified"),
                    );
                }
            }
            s.version += 1;
            s.data = Some(write.data);
            json_response(if seen.method == "POST" { 201 } else { 200 }, &object(s))
        }
        _ => json_response(404, &status(404, "NotFound", "no such path")),
    }
}

fn config() -> CidrStoreConfig {
    let mut config = CidrStoreConfig::new("weir-system", "weir-node-cidrs");
    config.poll_interval = Duration::from_millis(50);
    config.retry.initial = Duration::from_millis(20);
    config
}

fn node(name: &str, ip: &str, pod_cidr: Option<&str>) -> Change {
    let mut obj = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    });
    if let Some(c) = pod_cidr {
        obj["spec"] = json!({"podCIDR": c, "podCIDRs": [c]});
    }
    let node: Node = serde_json::from_value(obj).unwrap();
    Change::Upsert(Box::new(Object::Node(node)))
}

/// A controller whose allocator keeps its assignments in `fake`'s ConfigMap; the store's
/// task runs in the background.
async fn controller(
    fake: &FakeConfigMap,
    config: CidrStoreConfig,
    leadership: Leadership,
) -> (Controller, StatePublisher) {
    let (store, sync) = cidr_store::connect(fake.client(), config, leadership)
        .await
        .unwrap();
    tokio::spawn(sync.run());
    let publisher = StatePublisher::new();
    let allocator = NodeCidrAllocator::new("10.244.0.0/16".parse().unwrap(), 24).unwrap();
    let controller = Controller::new(publisher.clone())
        .with_node_cidrs(allocator, Box::new(store))
        .unwrap();
    (controller, publisher)
}

/// Serves a publisher's states to agents on loopback, the way agents read them.
struct Agents {
    endpoint: String,
    ca: Arc<ClusterCa>,
}

impl Agents {
    async fn serve(publisher: &StatePublisher) -> Self {
        let (ca, tls) = loopback_tls();
        let (listener, endpoint) = loopback_listener().await;
        let server = NodeStateServer::new(publisher.clone());
        tokio::spawn(server.serve(listener, tls, std::future::pending()));
        Self { endpoint, ca }
    }

    /// Node → pod CIDR, from the route table the agent on `node` receives now.
    async fn ranges(&self, node: &str) -> BTreeMap<String, IpNet> {
        let cert = self.ca.issue_node_cert(node).unwrap();
        let tls = ClientTls::new(self.ca.cert_pem(), "localhost")
            .unwrap()
            .with_identity(&cert.cert_pem, &cert.key_pem)
            .unwrap();
        let client = connect(&self.endpoint, &tls).await.unwrap();
        let mut updates = client.watch(node, None).await.unwrap();
        match updates.next().await {
            Some(Ok(NodeUpdate::Snapshot { state, .. })) => state
                .routes
                .iter()
                .map(|(cidr, route)| (route.node.clone(), *cidr))
                .collect(),
            other => panic!("expected a snapshot, got {other:?}"),
        }
    }
}

fn cidr(text: &str) -> IpNet {
    text.parse().unwrap()
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        sleep(Duration::from_millis(20)).await;
    }
    panic!("not within 10 s: {what}");
}

/// Compiles until `node`'s state is newer than version `seen`: the allocator adopted
/// assignments read from the ConfigMap (every compile offers it what the store read
/// meanwhile).
async fn adopted(controller: &mut Controller, node: &str, seen: u64) {
    for _ in 0..500 {
        if controller.recompute()[node] > seen {
            return;
        }
        sleep(Duration::from_millis(20)).await;
    }
    panic!("the allocator did not adopt the ConfigMap's assignments within 10 s");
}

fn data(entries: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(strings(entries))
}

#[tokio::test]
async fn a_restarted_controller_keeps_every_node_on_its_range() {
    let fake = FakeConfigMap::with(&[("a", "10.244.7.0/24"), ("typo", "10.244.300.0/24")]);
    let (mut controller, publisher) = controller(&fake, config(), Leadership::fixed(true)).await;
    let agents = Agents::serve(&publisher).await;
    controller.apply(vec![
        node("b", "192.0.2.2", None),
        node("a", "192.0.2.1", None),
        node("preset", "192.0.2.3", Some("10.244.0.0/24")),
    ]);
    controller.recompute();

    let expected = BTreeMap::from([
        ("a".to_owned(), cidr("10.244.7.0/24")),
        ("b".to_owned(), cidr("10.244.1.0/24")),
        ("preset".to_owned(), cidr("10.244.0.0/24")),
    ]);
    assert_eq!(agents.ranges("b").await, expected, "a kept its range");
    eventually("the new assignment is written", || {
        fake.data() == data(&[("a", "10.244.7.0/24"), ("b", "10.244.1.0/24")])
    })
    .await;
    let writes = fake.writes();
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert_eq!(
        (
            writes[0].method.as_str(),
            writes[0].resource_version.as_deref()
        ),
        ("PUT", Some("1")),
        "a conditional replace of the version read"
    );
}

#[tokio::test]
async fn the_config_map_is_created_by_the_first_leader() {
    let fake = FakeConfigMap::default();
    let (mut controller, _publisher) = controller(&fake, config(), Leadership::fixed(true)).await;
    controller.apply(vec![node("a", "192.0.2.1", None)]);
    controller.recompute();
    eventually("created", || fake.data() == data(&[("a", "10.244.0.0/24")])).await;
    assert_eq!(fake.writes()[0].method, "POST");
}

#[tokio::test]
async fn a_follower_writes_nothing_and_adopts_the_leaders_ranges() {
    let fake = FakeConfigMap::default();
    let (mut controller, publisher) = controller(&fake, config(), Leadership::fixed(false)).await;
    let agents = Agents::serve(&publisher).await;
    controller.apply(vec![
        node("a", "192.0.2.1", None),
        node("b", "192.0.2.2", None),
    ]);
    controller.recompute();
    // The leader saw the nodes in another order.
    fake.foreign_write(&[("a", "10.244.9.0/24"), ("b", "10.244.0.0/24")]);
    // Noticed without any object changing, so the watch loop compiles on its own.
    eventually("the leader's write is noticed", || {
        controller.node_cidrs_pending()
    })
    .await;
    adopted(&mut controller, "a", 1).await;
    assert!(!controller.node_cidrs_pending(), "adopted by the compile");
    controller.apply(vec![node("c", "192.0.2.3", None)]);
    controller.recompute();

    let expected = BTreeMap::from([
        ("a".to_owned(), cidr("10.244.9.0/24")),
        ("b".to_owned(), cidr("10.244.0.0/24")),
        ("c".to_owned(), cidr("10.244.1.0/24")),
    ]);
    assert_eq!(agents.ranges("a").await, expected);
    sleep(Duration::from_millis(300)).await;
    assert!(fake.writes().is_empty(), "{:?}", fake.writes());
}

#[tokio::test]
async fn a_write_that_loses_a_race_is_repeated_on_the_new_version() {
    let fake = FakeConfigMap::with(&[("a", "10.244.0.0/24")]);
    let (mut controller, _publisher) = controller(&fake, config(), Leadership::fixed(true)).await;
    fake.foreign_write_before_next_write(&[("a", "10.244.0.0/24"), ("x", "10.244.5.0/24")]);
    controller.apply(vec![
        node("a", "192.0.2.1", None),
        node("b", "192.0.2.2", None),
    ]);
    controller.recompute();

    eventually("written after the conflict", || {
        fake.data() == data(&[("a", "10.244.0.0/24"), ("b", "10.244.1.0/24")])
    })
    .await;
    let versions: Vec<Option<String>> = fake
        .writes()
        .into_iter()
        .map(|w| w.resource_version)
        .collect();
    assert_eq!(
        versions,
        [Some("1".to_owned()), Some("2".to_owned())],
        "the second write is conditional on the version read after the conflict"
    );
}

#[tokio::test]
async fn a_new_leader_adopts_the_latest_assignments_before_it_writes() {
    let fake = FakeConfigMap::with(&[("a", "10.244.3.0/24")]);
    // The old leader's Lease is gone; this replica competes once the elector runs.
    let leases = FakeLeases::new();
    let lease = LeaseConfig::new("weir-system", "weir-controller", "new");
    let (elector, mut leadership) = LeaderElector::new(leases.client(), lease).unwrap();
    // Polling so rare that only the read on taking over can see the old leader's last write.
    let mut config = config();
    config.poll_interval = Duration::from_secs(3600);
    let (mut controller, publisher) = controller(&fake, config, leadership.clone()).await;
    let agents = Agents::serve(&publisher).await;
    controller.apply(vec![
        node("a", "192.0.2.1", None),
        node("b", "192.0.2.2", None),
    ]);
    controller.recompute();
    assert_eq!(
        agents.ranges("a").await["b"],
        cidr("10.244.0.0/24"),
        "its own choice"
    );

    // The old leader gave b another range, wrote it, and went away.
    fake.foreign_write(&[("a", "10.244.3.0/24"), ("b", "10.244.4.0/24")]);
    tokio::spawn(elector.run(std::future::pending()));
    tokio::time::timeout(Duration::from_secs(10), leadership.wait_for(true))
        .await
        .expect("takes over the lease");
    sleep(Duration::from_millis(300)).await;
    assert!(
        fake.writes().is_empty(),
        "nothing is written before the allocator adopted the read: {:?}",
        fake.writes()
    );
    adopted(&mut controller, "a", 1).await;
    assert!(
        fake.writes().is_empty(),
        "what was adopted is what the ConfigMap holds: {:?}",
        fake.writes()
    );

    controller.apply(vec![node("c", "192.0.2.3", None)]);
    controller.recompute();
    let ranges = agents.ranges("a").await;
    assert_eq!(
        ranges["b"],
        cidr("10.244.4.0/24"),
        "the old leader's choice"
    );
    assert_eq!(ranges["c"], cidr("10.244.0.0/24"));
    eventually("the new leader writes", || {
        fake.data()
            == data(&[
                ("a", "10.244.3.0/24"),
                ("b", "10.244.4.0/24"),
                ("c", "10.244.0.0/24"),
            ])
    })
    .await;
}
