//! Snapshots, diffs, reconnects and slow readers, over real TLS connections on loopback.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use ipnet::IpNet;
use weir_api::{EndpointPolicy, NodeState, PodKey};
use weir_transport::{
    AgentReport, Backoff, NodeStateTracker, NodeUpdate, StatePublisher, StateVersion, WatchLoop,
    connect,
};

use crate::common::{Pki, Proxy, RecordingSink, TestServer, random_states, soon, wait_for_version};

fn fast_backoff() -> Backoff {
    Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
    }
}

fn spawn_agent(
    endpoint: String,
    pki: &Pki,
    node: &str,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::watch::Receiver<crate::common::AgentView>,
) {
    let (mut sink, view) = RecordingSink::new();
    let agent = WatchLoop::new(endpoint, pki.agent(node), node).with_backoff(fast_backoff());
    let task = tokio::spawn(async move {
        agent.run(&mut sink).await;
    });
    (task, view)
}

#[tokio::test]
async fn agent_applies_every_published_version_through_snapshot_then_exact_diffs() {
    let pki = Pki::new();
    let publisher = StatePublisher::new();
    let server = TestServer::start(&publisher, &pki.server, None).await;
    let (agent, mut view) = spawn_agent(server.endpoint(), &pki, "node-a");

    let states = random_states(25);
    for (i, state) in states.iter().enumerate() {
        let version = u64::try_from(i).unwrap() + 1;
        publisher
            .publish("node-a", version, Arc::new(state.clone()))
            .unwrap();
        let applied = wait_for_version(&mut view, version).await;
        assert_eq!(&applied.state, state, "agent state at version {version}");
    }

    let view = view.borrow().clone();
    assert_eq!(view.snapshots, 1, "one snapshot, then only diffs");
    assert_eq!(view.diffs.len(), states.len() - 1);
    for (i, diff) in view.diffs.iter().enumerate() {
        // The agent waited for each version, so each diff spans exactly one step and holds
        // exactly the changes between the two states, nothing unchanged.
        let from = u64::try_from(i).unwrap() + 1;
        assert_eq!(*diff, states[i].diff(&states[i + 1], from, from + 1));
    }

    // The agent reported each version; the controller sees the last one.
    soon(
        "the report of the last version",
        publisher.wait_for_applied(&publisher.published()),
    )
    .await;
    let reports = publisher.applied().borrow().clone();
    assert_eq!(
        reports["node-a"].applied,
        Some(StateVersion {
            epoch: publisher.epoch(),
            version: 25
        })
    );
    agent.abort();
}

fn pod_state(pods: &[(&str, u32)]) -> NodeState {
    let mut s = NodeState::default();
    for (name, ingress) in pods {
        s.endpoints.insert(
            PodKey::new("default", *name),
            EndpointPolicy {
                ingress: *ingress,
                egress: 0,
            },
        );
    }
    s
}

#[tokio::test]
async fn stream_sends_a_snapshot_first_and_then_only_the_changed_entries() {
    let pki = Pki::new();
    let publisher = StatePublisher::new();
    let server = TestServer::start(&publisher, &pki.server, None).await;
    let client = connect(&server.endpoint(), &pki.agent("node-a"))
        .await
        .unwrap();

    // The stream opens before anything is published and waits.
    let mut updates = client.watch("node-a", None).await.unwrap();
    let v1 = pod_state(&[("a", 1), ("b", 1), ("c", 1)]);
    publisher
        .publish("node-a", 1, Arc::new(v1.clone()))
        .unwrap();
    let first = soon("the snapshot", updates.next()).await.unwrap().unwrap();
    assert_eq!(
        first,
        NodeUpdate::Snapshot {
            at: StateVersion {
                epoch: publisher.epoch(),
                version: 1
            },
            state: v1.clone()
        }
    );

    // One pod changes policy, one leaves.
    let v2 = pod_state(&[("a", 1), ("b", 2)]);
    publisher.publish("node-a", 2, Arc::new(v2)).unwrap();
    let NodeUpdate::Diff(diff) = soon("the diff", updates.next()).await.unwrap().unwrap() else {
        panic!("expected a diff after the snapshot");
    };
    assert_eq!((diff.from_version, diff.to_version), (1, 2));
    assert_eq!(
        diff.endpoints.upsert,
        vec![(
            PodKey::new("default", "b"),
            EndpointPolicy {
                ingress: 2,
                egress: 0
            }
        )]
    );
    assert_eq!(diff.endpoints.remove, vec![PodKey::new("default", "c")]);
    assert_eq!(diff.len(), 2, "untouched entries are not sent");
}

#[tokio::test]
async fn agent_holding_the_current_version_is_told_unchanged_and_others_get_a_snapshot() {
    let pki = Pki::new();
    let publisher = StatePublisher::new();
    let server = TestServer::start(&publisher, &pki.server, None).await;
    let client = connect(&server.endpoint(), &pki.agent("node-a"))
        .await
        .unwrap();
    let state = pod_state(&[("a", 1)]);
    publisher
        .publish("node-a", 7, Arc::new(state.clone()))
        .unwrap();
    let current = StateVersion {
        epoch: publisher.epoch(),
        version: 7,
    };

    let mut updates = client.watch("node-a", Some(current)).await.unwrap();
    let first = soon("the marker", updates.next()).await.unwrap().unwrap();
    assert_eq!(first, NodeUpdate::Unchanged { at: current });

    // Same version number, other epoch (another controller): a full snapshot.
    let stale = StateVersion {
        epoch: current.epoch ^ 1,
        version: 7,
    };
    let mut updates = client.watch("node-a", Some(stale)).await.unwrap();
    let first = soon("the snapshot", updates.next()).await.unwrap().unwrap();
    assert_eq!(first, NodeUpdate::Snapshot { at: current, state });
}

#[tokio::test]
async fn agent_keeps_its_state_while_the_controller_is_away_and_resyncs_from_a_new_one() {
    let pki = Pki::new();
    let first_controller = StatePublisher::new();
    let server = TestServer::start(&first_controller, &pki.server, None).await;
    let addr = server.addr;
    let (agent, mut view) = spawn_agent(server.endpoint(), &pki, "node-a");

    let states = random_states(4);
    for (v, s) in (1..=3).zip(&states) {
        first_controller
            .publish("node-a", v, Arc::new(s.clone()))
            .unwrap();
    }
    wait_for_version(&mut view, 3).await;

    server.stop().await;
    // Nobody to talk to: the agent keeps what it had.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(view.borrow().state, states[2]);

    // A new controller (new epoch) starts on the same address with version numbers that
    // overlap the old ones but mean something else.
    let second_controller = StatePublisher::new();
    second_controller
        .publish("node-a", 3, Arc::new(states[3].clone()))
        .unwrap();
    let _server = TestServer::start_on(addr, &second_controller, &pki.server, None).await;
    let resynced = soon("a snapshot from the new controller", async {
        view.wait_for(|v| v.snapshots == 2).await.unwrap().clone()
    })
    .await;
    assert_eq!(resynced.state, states[3]);
    assert_eq!(
        resynced.at,
        Some(StateVersion {
            epoch: second_controller.epoch(),
            version: 3
        })
    );
    soon(
        "the agent's report to the new controller",
        second_controller.wait_for_applied(&second_controller.published()),
    )
    .await;
    agent.abort();
}

#[tokio::test]
async fn restarted_server_with_the_same_publisher_does_not_resend_what_the_agent_has() {
    let pki = Pki::new();
    let publisher = StatePublisher::new();
    let server = TestServer::start(&publisher, &pki.server, None).await;
    let addr = server.addr;
    let (agent, mut view) = spawn_agent(server.endpoint(), &pki, "node-a");
    publisher
        .publish("node-a", 1, Arc::new(pod_state(&[("a", 1)])))
        .unwrap();
    wait_for_version(&mut view, 1).await;
    soon(
        "the first report",
        publisher.wait_for_applied(&publisher.published()),
    )
    .await;

    server.stop().await;
    // Forget the report so we can tell that the agent reported again after reconnecting.
    let mut reports = publisher.applied();
    reports.mark_unchanged();
    let _server = TestServer::start_on(addr, &publisher, &pki.server, None).await;
    soon("a report after reconnecting", reports.changed())
        .await
        .unwrap();
    let view = view.borrow().clone();
    assert_eq!(
        view.snapshots, 1,
        "the unchanged marker does not reach the sink"
    );
    assert!(view.diffs.is_empty());
    agent.abort();
}

#[tokio::test]
async fn broken_connection_is_reestablished_and_the_agent_converges() {
    let pki = Pki::new();
    let publisher = StatePublisher::new();
    let server = TestServer::start(&publisher, &pki.server, None).await;
    let proxy = Proxy::start(server.addr).await;
    let (agent, mut view) = spawn_agent(proxy.endpoint(), &pki, "node-a");
    let states = random_states(3);
    publisher
        .publish("node-a", 1, Arc::new(states[0].clone()))
        .unwrap();
    wait_for_version(&mut view, 1).await;

    assert!(proxy.cut_connections() >= 1);
    publisher
        .publish("node-a", 2, Arc::new(states[1].clone()))
        .unwrap();
    publisher
        .publish("node-a", 3, Arc::new(states[2].clone()))
        .unwrap();
    let after = wait_for_version(&mut view, 3).await;
    assert_eq!(after.state, states[2]);
    // The cut may land before the agent saw version 2 (then it resyncs with a snapshot) or
    // after (then it gets diffs on the new stream); either way it was a new stream.
    assert!(after.snapshots + after.diffs.len() >= 2);
    agent.abort();
}

/// A state with `n` peer classes that all change from one version to the next, so each
/// diff is large (`n` upserts).
fn churning_state(version: u64, n: u32) -> NodeState {
    let mut s = NodeState::default();
    for i in 0..n {
        let addr = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        s.peer_classes.insert(
            IpNet::new(addr, 32).unwrap(),
            u32::try_from(version % 1000).unwrap() + 1,
        );
    }
    s
}

#[tokio::test]
async fn slow_reader_blocks_nobody_and_catches_up_with_one_folded_diff() {
    const VERSIONS: u64 = 150;
    const ENTRIES: u32 = 10_000;
    let pki = Pki::new();
    let publisher = StatePublisher::new();
    let server = TestServer::start(&publisher, &pki.server, None).await;
    let slow = connect(&server.endpoint(), &pki.agent("node-a"))
        .await
        .unwrap();
    let fast = connect(&server.endpoint(), &pki.agent("node-a"))
        .await
        .unwrap();

    publisher
        .publish("node-a", 1, Arc::new(churning_state(1, ENTRIES)))
        .unwrap();
    let mut slow_updates = slow.watch("node-a", None).await.unwrap();
    let mut slow_tracker = NodeStateTracker::new();
    slow_tracker
        .apply(
            soon("the snapshot", slow_updates.next())
                .await
                .unwrap()
                .unwrap(),
        )
        .unwrap();

    // A healthy agent of the same node keeps reading throughout.
    let fast_reader = tokio::spawn(async move {
        let mut updates = fast.watch("node-a", None).await.unwrap();
        let mut tracker = NodeStateTracker::new();
        while let Some(update) = updates.next().await {
            tracker.apply(update.unwrap()).unwrap();
            if tracker.have().unwrap().version == VERSIONS {
                return tracker;
            }
        }
        panic!("fast stream ended early");
    });

    // The slow agent stops reading while ~150 large diffs (each ~140 kB) are published.
    let started = Instant::now();
    for v in 2..=VERSIONS {
        publisher
            .publish("node-a", v, Arc::new(churning_state(v, ENTRIES)))
            .unwrap();
        tokio::task::yield_now().await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "publishing must not wait for readers"
    );
    let fast_tracker = soon("the fast reader", fast_reader).await.unwrap();
    assert_eq!(*fast_tracker.state(), churning_state(VERSIONS, ENTRIES));
    // Give the server time to fill the slow stream's flow-control window.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The slow agent resumes and converges without receiving every intermediate version.
    let mut received = 0;
    soon("the slow reader to catch up", async {
        while slow_tracker.have().unwrap().version != VERSIONS {
            let update = slow_updates.next().await.unwrap().unwrap();
            slow_tracker.apply(update).unwrap();
            received += 1;
        }
    })
    .await;
    assert_eq!(*slow_tracker.state(), churning_state(VERSIONS, ENTRIES));
    assert!(
        received < (VERSIONS - 1) / 2,
        "expected stalled versions to fold into few diffs, got {received} of {}",
        VERSIONS - 1
    );
}

#[tokio::test]
async fn status_reports_reach_the_publishers_view() {
    let pki = Pki::new();
    let publisher = StatePublisher::new();
    let server = TestServer::start(&publisher, &pki.server, None).await;
    publisher
        .publish("node-a", 4, Arc::new(pod_state(&[("a", 1)])))
        .unwrap();
    let client = connect(&server.endpoint(), &pki.agent("node-a"))
        .await
        .unwrap();
    let at = StateVersion {
        epoch: publisher.epoch(),
        version: 4,
    };
    let mut reports = publisher.applied();

    let failing = AgentReport {
        applied: None,
        ready: false,
        message: "verdict map is full".into(),
    };
    client.report("node-a", &failing).await.unwrap();
    soon(
        "the failure report",
        reports.wait_for(|r| r.contains_key("node-a")),
    )
    .await
    .unwrap();
    assert_eq!(reports.borrow()["node-a"], failing);
    let targets = BTreeMap::from([("node-a".to_owned(), 4)]);
    let not_yet = tokio::time::timeout(
        Duration::from_millis(200),
        publisher.wait_for_applied(&targets),
    )
    .await;
    assert!(not_yet.is_err(), "a failed agent is not counted as applied");

    // A report from another epoch (a previous controller's version 4) does not count either.
    let other_epoch = AgentReport {
        applied: Some(StateVersion {
            epoch: at.epoch ^ 1,
            version: 4,
        }),
        ready: true,
        message: String::new(),
    };
    client.report("node-a", &other_epoch).await.unwrap();
    let not_yet = tokio::time::timeout(
        Duration::from_millis(200),
        publisher.wait_for_applied(&targets),
    )
    .await;
    assert!(
        not_yet.is_err(),
        "versions of another epoch are not counted"
    );

    let ok = AgentReport {
        applied: Some(at),
        ready: true,
        message: String::new(),
    };
    client.report("node-a", &ok).await.unwrap();
    soon(
        "the node to count as applied",
        publisher.wait_for_applied(&targets),
    )
    .await;
    assert_eq!(publisher.applied().borrow()["node-a"], ok);

    publisher.remove_node("node-a");
    assert!(!publisher.applied().borrow().contains_key("node-a"));
}

#[tokio::test]
async fn failed_apply_is_reported_and_repaired_by_a_fresh_snapshot() {
    let pki = Pki::new();
    let publisher = StatePublisher::new();
    let server = TestServer::start(&publisher, &pki.server, None).await;
    let (mut sink, mut view) = RecordingSink::new();
    let fail_next = sink.fail_next.clone();
    let agent = WatchLoop::new(server.endpoint(), pki.agent("node-a"), "node-a")
        .with_backoff(fast_backoff());
    let task = tokio::spawn(async move {
        agent.run(&mut sink).await;
    });
    let states = random_states(2);
    publisher
        .publish("node-a", 1, Arc::new(states[0].clone()))
        .unwrap();
    wait_for_version(&mut view, 1).await;

    *fail_next.lock().unwrap() = Some("map update failed".into());
    let mut reports = publisher.applied();
    publisher
        .publish("node-a", 2, Arc::new(states[1].clone()))
        .unwrap();
    // The failure is reported with the version still enforced...
    soon(
        "the failure report",
        reports.wait_for(|r| r.get("node-a").is_some_and(|r| !r.ready)),
    )
    .await
    .unwrap();
    let failure = reports.borrow()["node-a"].clone();
    assert!(failure.message.contains("map update failed"), "{failure:?}");
    assert_eq!(failure.applied.map(|a| a.version), Some(1));
    // ...and the reconnect brings a snapshot that the sink applies in full.
    let repaired = wait_for_version(&mut view, 2).await;
    assert_eq!(repaired.snapshots, 2);
    assert_eq!(repaired.state, states[1]);
    task.abort();
}

#[tokio::test]
async fn removing_a_node_ends_its_stream_with_not_found() {
    let pki = Pki::new();
    let publisher = StatePublisher::new();
    let server = TestServer::start(&publisher, &pki.server, None).await;
    publisher
        .publish("node-a", 1, Arc::new(pod_state(&[])))
        .unwrap();
    let client = connect(&server.endpoint(), &pki.agent("node-a"))
        .await
        .unwrap();
    let mut updates = client.watch("node-a", None).await.unwrap();
    soon("the snapshot", updates.next()).await.unwrap().unwrap();
    publisher.remove_node("node-a");
    let end = soon("the end of the stream", updates.next())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(end.code(), Some(tonic::Code::NotFound));
    assert!(soon("stream end", updates.next()).await.is_none());
}

/// Endpoints found before every attempt (the agent asks the API server for the controller
/// Service's endpoints): an unreachable one is skipped, a failed lookup retried.
#[tokio::test]
async fn resolved_endpoints_are_tried_in_order_and_looked_up_again_after_a_failure() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let pki = Pki::new();
    let publisher = StatePublisher::new();
    let server = TestServer::start(&publisher, &pki.server, None).await;
    // A port nothing listens on: bind, note, close.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("https://{}", l.local_addr().unwrap())
    };
    let lookups = Arc::new(AtomicUsize::new(0));
    let endpoints = {
        let (lookups, live, dead) = (lookups.clone(), server.endpoint(), dead.clone());
        weir_transport::Endpoints::resolved("Service test/controller", move || {
            let n = lookups.fetch_add(1, Ordering::SeqCst);
            let found = if n == 0 {
                Err("the API server is not there yet".to_owned())
            } else {
                Ok(vec![dead.clone(), live.clone()])
            };
            async move { found }
        })
    };
    let (mut sink, mut view) = RecordingSink::new();
    let agent =
        WatchLoop::new(endpoints, pki.agent("node-a"), "node-a").with_backoff(fast_backoff());
    let task = tokio::spawn(async move {
        agent.run(&mut sink).await;
    });
    let state = random_states(1).remove(0);
    publisher
        .publish("node-a", 1, Arc::new(state.clone()))
        .unwrap();
    let applied = wait_for_version(&mut view, 1).await;
    assert_eq!(applied.state, state);
    assert!(
        lookups.load(Ordering::SeqCst) >= 2,
        "looked up again after the failed lookup"
    );
    task.abort();
}

/// An agent's watch request carries its map capacities, which the controller sees per node;
/// an agent that reports none (an older one) leaves its node out, so the controller uses the
/// defaults for it.
#[tokio::test]
async fn the_controller_sees_the_map_capacities_each_agent_reports() {
    let pki = Pki::new();
    let publisher = StatePublisher::new();
    let server = TestServer::start(&publisher, &pki.server, None).await;
    let caps: weir_api::MapCapacities = "verdicts-exact=4096,conntrack=1000000".parse().unwrap();
    let (mut sink_a, mut view_a) = RecordingSink::new();
    let agent_a = WatchLoop::new(server.endpoint(), pki.agent("node-a"), "node-a")
        .with_backoff(fast_backoff())
        .with_capacities(caps);
    let task_a = tokio::spawn(async move {
        agent_a.run(&mut sink_a).await;
    });
    let (task_b, mut view_b) = spawn_agent(server.endpoint(), &pki, "node-b");
    for node in ["node-a", "node-b"] {
        publisher
            .publish(node, 1, Arc::new(NodeState::default()))
            .unwrap();
    }
    wait_for_version(&mut view_a, 1).await;
    wait_for_version(&mut view_b, 1).await;
    let reported = publisher.capacities().borrow().clone();
    assert_eq!(reported.get("node-a"), Some(&caps));
    assert_eq!(reported.get("node-b"), None, "node-b reports none");
    // A node that leaves the cluster takes its report with it.
    publisher.remove_node("node-a");
    assert_eq!(publisher.capacities().borrow().get("node-a"), None);
    task_a.abort();
    task_b.abort();
}
