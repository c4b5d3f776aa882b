//! Leader election on a Lease served by a mocked API server with optimistic concurrency,
//! and serving agents only while leading.
//!
//! Election tests run in paused time: the 15 s / 10 s / 2 s timing plays out in virtual
//! seconds, so the assertions can be about exact deadlines without real sleeps.

mod kube_support;

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use kube_support::*;
use tokio::{
    sync::oneshot,
    task::JoinHandle,
    time::{Instant, sleep, timeout},
};
use weir_api::NodeState;
use weir_controller::{
    kube::{AgentServing, serve_agents_while_leading},
    leader::{LeaderElector, Leadership, LeaseConfig},
};
use weir_transport::{ClientTls, NodeStateServer, StatePublisher, connect};

struct Candidate {
    leadership: Leadership,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Candidate {
    fn start(leases: &FakeLeases, identity: &str) -> Self {
        Self::start_with(
            leases,
            LeaseConfig::new("weir-system", "weir-controller", identity),
        )
    }

    fn start_with(leases: &FakeLeases, config: LeaseConfig) -> Self {
        let (elector, leadership) = LeaderElector::new(leases.client(), config).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(elector.run(async move {
            let _ = stopped.await;
        }));
        Self {
            leadership,
            stop: Some(stop),
            task,
        }
    }

    async fn becomes_leader_within(&mut self, limit: Duration) {
        timeout(limit, self.leadership.wait_for(true))
            .await
            .expect("should lead by now");
    }

    /// Graceful shutdown: steps down and releases.
    async fn shut_down(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
        assert!(!self.leadership.is_leader());
    }
}

#[tokio::test(start_paused = true)]
async fn a_free_lease_is_acquired_and_renewed() {
    let leases = FakeLeases::new();
    let mut a = Candidate::start(&leases, "a");
    a.becomes_leader_within(Duration::from_secs(1)).await;
    let first = &leases.writes()[0];
    assert_eq!(
        (
            first.method.as_str(),
            first.holder.as_deref(),
            first.transitions,
            first.duration
        ),
        ("POST", Some("a"), Some(0), Some(15)),
        "created the lease"
    );

    sleep(Duration::from_secs(7)).await;
    let renewals: Vec<_> = leases.writes().into_iter().skip(1).collect();
    assert_eq!(
        renewals.len(),
        3,
        "one renewal per retry period: {renewals:?}"
    );
    assert!(renewals.iter().all(|w| w.method == "PUT"
        && w.holder.as_deref() == Some("a")
        && w.transitions == Some(0)));
    assert!(a.leadership.is_leader());
}

#[tokio::test(start_paused = true)]
async fn a_lease_held_by_a_live_leader_is_respected() {
    let leases = FakeLeases::held_by("other", 0);
    let a = Candidate::start(&leases, "a");
    // The other leader renews every 2 s for a minute.
    for _ in 0..30 {
        sleep(Duration::from_secs(2)).await;
        leases.write_as("other", 0);
        assert!(!a.leadership.is_leader());
    }
    assert!(
        leases.writes().is_empty(),
        "never wrote: {:?}",
        leases.writes()
    );
    assert_eq!(leases.holder().as_deref(), Some("other"));
}

#[tokio::test(start_paused = true)]
async fn an_expired_lease_is_taken_over_only_after_the_lease_duration() {
    let leases = FakeLeases::held_by("crashed", 3);
    let started = Instant::now();
    let mut a = Candidate::start(&leases, "a");
    sleep(Duration::from_secs(14)).await;
    assert!(
        !a.leadership.is_leader(),
        "14 s of an unchanged record is not 15"
    );
    assert!(leases.writes().is_empty());

    a.becomes_leader_within(Duration::from_secs(10)).await;
    assert!(started.elapsed() >= Duration::from_secs(15));
    let takeover = leases.writes().last().cloned().unwrap();
    assert_eq!(
        takeover.method, "PUT",
        "an update with the read resourceVersion"
    );
    assert_eq!(takeover.holder.as_deref(), Some("a"));
    assert_eq!(
        takeover.transitions,
        Some(4),
        "a new holder is a transition"
    );
}

#[tokio::test(start_paused = true)]
async fn a_conflicting_update_ends_leadership_at_once() {
    let leases = FakeLeases::new();
    let mut a = Candidate::start(&leases, "a");
    a.becomes_leader_within(Duration::from_secs(1)).await;

    // Someone writes the lease just before our next renewal: our update conflicts, and the
    // re-read shows another holder.
    leases.steal_on_next_update("usurper");
    let before = Instant::now();
    timeout(Duration::from_secs(3), a.leadership.wait_for(false))
        .await
        .expect("stepped down at the first renewal, not at the renew deadline");
    assert!(before.elapsed() <= Duration::from_secs(3));
    assert_eq!(leases.holder().as_deref(), Some("usurper"));

    // And it respects the new holder's lease from then on.
    sleep(Duration::from_secs(12)).await;
    assert!(!a.leadership.is_leader());
    assert_eq!(leases.holder().as_deref(), Some("usurper"));
}

#[tokio::test(start_paused = true)]
async fn a_leader_cut_off_from_the_api_server_steps_down_within_the_renew_deadline() {
    let leases = FakeLeases::new();
    let mut a = Candidate::start(&leases, "a");
    a.becomes_leader_within(Duration::from_secs(1)).await;
    let acquired = Instant::now();
    leases.set_unreachable(true);
    timeout(Duration::from_secs(11), a.leadership.wait_for(false))
        .await
        .expect("stepped down");
    let led = acquired.elapsed();
    assert!(
        led >= Duration::from_secs(9) && led <= Duration::from_secs(10),
        "stepped down {led:?} after the last renewal: at the 10 s renew deadline, well \
         before the 15 s after which others may take over"
    );
}

#[tokio::test(start_paused = true)]
async fn leadership_hands_over_when_the_leader_shuts_down() {
    let leases = FakeLeases::new();
    let mut a = Candidate::start(&leases, "a");
    a.becomes_leader_within(Duration::from_secs(1)).await;
    let mut b = Candidate::start(&leases, "b");
    sleep(Duration::from_secs(30)).await;
    assert!(a.leadership.is_leader() && !b.leadership.is_leader());

    a.shut_down().await;
    let released = leases.spec().unwrap();
    assert!(released["holderIdentity"].is_null(), "released: {released}");
    assert_eq!(released["leaseDurationSeconds"], 1);

    // A released lease is free at once: b takes it at its next retry (≤ 2 s × 2.2).
    b.becomes_leader_within(Duration::from_millis(4500)).await;
    let spec = leases.spec().unwrap();
    assert_eq!(spec["holderIdentity"], "b");
    assert_eq!(spec["leaseTransitions"], 1);
    b.shut_down().await;
}

#[tokio::test(start_paused = true)]
async fn a_crashed_leader_is_replaced_after_the_lease_expires() {
    let leases = FakeLeases::new();
    let mut a = Candidate::start(&leases, "a");
    a.becomes_leader_within(Duration::from_secs(1)).await;
    let mut b = Candidate::start(&leases, "b");
    sleep(Duration::from_secs(5)).await;

    a.task.abort(); // no release
    sleep(Duration::from_secs(12)).await;
    assert!(
        !b.leadership.is_leader(),
        "the crashed leader's lease is still valid"
    );
    b.becomes_leader_within(Duration::from_secs(10)).await;
    assert_eq!(leases.holder().as_deref(), Some("b"));
}

#[tokio::test(start_paused = true)]
async fn invalid_timing_is_refused() {
    let leases = FakeLeases::new();
    let mut config = LeaseConfig::new("weir-system", "weir-controller", "a");
    config.renew_deadline = Duration::from_secs(20);
    assert!(LeaderElector::new(leases.client(), config).is_err());
}

// ------------------------------------------------------------------ serving while leading

fn free_loopback_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Real time and real TLS on loopback: the agent server runs only during leadership.
#[tokio::test]
async fn a_leader_that_loses_the_lease_stops_serving_agents() {
    let (ca, tls) = loopback_tls();
    let node_cert = ca.issue_node_cert("node-a").unwrap();
    let agent_tls = ClientTls::new(ca.cert_pem(), "localhost")
        .unwrap()
        .with_identity(&node_cert.cert_pem, &node_cert.key_pem)
        .unwrap();
    let publisher = StatePublisher::new();
    publisher
        .publish("node-a", 1, Arc::new(NodeState::default()))
        .unwrap();

    let leases = FakeLeases::new();
    let mut config = LeaseConfig::new("weir-system", "weir-controller", "a");
    config.lease_duration = Duration::from_millis(1500);
    config.renew_deadline = Duration::from_millis(1000);
    config.retry_period = Duration::from_millis(100);
    let mut a = Candidate::start_with(&leases, config);
    let addr = free_loopback_port();
    let serving = AgentServing {
        listen: addr,
        server: NodeStateServer::new(publisher.clone()),
        tls,
        endpoint: None,
    };
    tokio::spawn(serve_agents_while_leading(serving, a.leadership.clone()));
    a.becomes_leader_within(Duration::from_secs(5)).await;

    let endpoint = format!("https://{addr}");
    let mut updates = None;
    for _ in 0..50 {
        if let Ok(client) = connect(&endpoint, &agent_tls).await
            && let Ok(stream) = client.watch("node-a", None).await
        {
            updates = Some(stream);
            break;
        }
        sleep(Duration::from_millis(50)).await;
    }
    let mut updates = updates.expect("the leader serves agents");
    assert!(matches!(updates.next().await, Some(Ok(_))), "snapshot");

    leases.steal_on_next_update("b");
    timeout(Duration::from_secs(5), a.leadership.wait_for(false))
        .await
        .expect("lost the lease");
    let end = timeout(Duration::from_secs(5), updates.next())
        .await
        .expect("the stream ends when leadership ends");
    assert!(
        matches!(&end, None | Some(Err(_))),
        "no more state after losing the lease: {end:?}"
    );
    sleep(Duration::from_millis(200)).await;
    assert!(
        connect(&endpoint, &agent_tls).await.is_err(),
        "a follower does not accept agents"
    );
}

#[tokio::test]
async fn the_leader_applies_its_endpoint_slice_and_never_touches_pods() {
    use std::sync::Mutex;
    use weir_controller::kube::{LEADER_SLICE, LeaderEndpointSlice, SLICE_MANAGER};
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen_log = log.clone();
    let (client, _task) = handler_client(move |seen| {
        seen_log.lock().unwrap().push(seen.clone());
        Some(json_response(
            200,
            &serde_json::json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": LEADER_SLICE, "namespace": "weir-system"},
                "addressType": "IPv4", "endpoints": [],
            }),
        ))
    });
    let slice = LeaderEndpointSlice::new(
        client,
        "weir-system",
        "weir-controller",
        "10.0.0.7".parse().unwrap(),
        7443,
        "grpc",
    )
    .with_pod("ctrl-new");
    slice.mark().await.unwrap();
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 1, "one write, nothing else: {log:?}");
    let write = &log[0];
    assert_eq!(
        (write.method.as_str(), write.path.as_str()),
        (
            "PATCH",
            "/apis/discovery.k8s.io/v1/namespaces/weir-system/endpointslices/weir-controller-leader"
        )
    );
    assert_eq!(
        write.content_type.as_deref(),
        Some("application/apply-patch+yaml"),
        "server-side apply"
    );
    assert_eq!(
        write.query.get("fieldManager").map(String::as_str),
        Some(SLICE_MANAGER)
    );
    assert_eq!(
        write.query.get("force").map(String::as_str),
        Some("true"),
        "takes the fields over from a former leader"
    );
    let body = write.body.as_ref().unwrap();
    assert_eq!(
        body["metadata"]["labels"],
        serde_json::json!({
            "kubernetes.io/service-name": "weir-controller",
            "endpointslice.kubernetes.io/managed-by": "weir.dev/controller",
        })
    );
    assert_eq!(body["addressType"], "IPv4");
    assert_eq!(
        body["endpoints"][0]["addresses"],
        serde_json::json!(["10.0.0.7"])
    );
    assert_eq!(body["endpoints"][0]["conditions"]["ready"], true);
    assert_eq!(body["endpoints"][0]["targetRef"]["name"], "ctrl-new");
    assert_eq!(
        body["ports"],
        serde_json::json!([{"name": "grpc", "port": 7443, "protocol": "TCP"}])
    );
    // What the agents' reader makes of it: exactly the leader.
    let parsed: k8s_openapi::api::discovery::v1::EndpointSlice =
        serde_json::from_value(body.clone()).unwrap();
    assert_eq!(parsed.endpoints.len(), 1);
}

#[tokio::test]
async fn an_ipv6_leader_writes_an_ipv6_slice() {
    use weir_controller::kube::LeaderEndpointSlice;
    let (client, _task) = handler_client(|_| None);
    let slice = LeaderEndpointSlice::new(
        client,
        "weir-system",
        "weir-controller",
        "fd00::7".parse().unwrap(),
        7443,
        "grpc",
    );
    let body = slice.desired();
    assert_eq!(body["addressType"], "IPv6");
    assert_eq!(
        body["endpoints"][0]["addresses"],
        serde_json::json!(["fd00::7"])
    );
    assert!(body["endpoints"][0].get("targetRef").is_none());
}

#[tokio::test]
async fn a_failed_slice_write_is_retried_while_leading() {
    use std::sync::Mutex;
    use weir_controller::kube::{LeaderEndpointSlice, mark_until_done};
    let leases = FakeLeases::new();
    let mut a = Candidate::start(&leases, "a");
    a.becomes_leader_within(Duration::from_secs(5)).await;

    // The API server refuses the first two writes.
    let writes = Arc::new(Mutex::new(Vec::new()));
    let seen_writes = writes.clone();
    let (client, _task) = handler_client(move |seen| {
        let mut w = seen_writes.lock().unwrap();
        w.push(seen.clone());
        Some(if w.len() <= 2 {
            json_response(500, &status(500, "InternalError", "etcd is unhappy"))
        } else {
            json_response(
                200,
                &serde_json::json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": "weir-controller-leader", "namespace": "weir-system"},
                    "addressType": "IPv4", "endpoints": [],
                }),
            )
        })
    });
    let slice = LeaderEndpointSlice::new(
        client,
        "weir-system",
        "weir-controller",
        "10.0.0.7".parse().unwrap(),
        7443,
        "grpc",
    );
    timeout(
        Duration::from_secs(5),
        mark_until_done(slice, a.leadership.clone()),
    )
    .await
    .expect("the slice is eventually written");
    let writes = writes.lock().unwrap().clone();
    assert_eq!(writes.len(), 3, "two failures, then success");
    assert!(
        writes
            .iter()
            .all(|w| w.method == "PATCH"
                && w.path.ends_with("/endpointslices/weir-controller-leader")),
        "only the slice is written: {writes:?}"
    );
    a.shut_down().await;
}

#[tokio::test]
async fn a_follower_does_not_write_the_slice() {
    use std::sync::Mutex;
    use weir_controller::kube::{LeaderEndpointSlice, mark_until_done};
    let writes = Arc::new(Mutex::new(0u32));
    let seen_writes = writes.clone();
    let (client, _task) = handler_client(move |_| {
        *seen_writes.lock().unwrap() += 1;
        None
    });
    let slice = LeaderEndpointSlice::new(
        client,
        "weir-system",
        "weir-controller",
        "10.0.0.7".parse().unwrap(),
        7443,
        "grpc",
    );
    timeout(
        Duration::from_secs(5),
        mark_until_done(slice, Leadership::fixed(false)),
    )
    .await
    .expect("returns at once");
    assert_eq!(*writes.lock().unwrap(), 0);
}
