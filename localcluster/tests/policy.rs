//! NetworkPolicy (and ClusterNetworkPolicy) end to end: the controller compiles, agents
//! enforce; what a user sees when policies change, are wrong, or when weir's own components
//! go away.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{LiveStream, cluster, cluster_with_agent_args, pod, probe};
use weir_conformance::{Protocol, probe::Servers};
use weir_localcluster::{LocalCluster, Topology};

fn deny_ingress(namespace: &str, name: &str, pod: &str) -> serde_json::Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"podSelector": {"matchLabels": {"pod": pod}}, "policyTypes": ["Ingress"]},
    })
}

async fn tcp(c: &LocalCluster, from: &str, to: &str) -> bool {
    let (from, to) = (
        c.pod("default", from).unwrap(),
        c.pod("default", to).unwrap(),
    );
    probe(&from.netns, to.ip, 80, Protocol::Tcp)
        .await
        .is_connected()
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_drops_are_counted_and_reported_with_the_policy_that_caused_them() {
    let mut c = cluster(1, Topology::L2).await;
    pod(&mut c, "default", "a", 0).await;
    let b = pod(&mut c, "default", "b", 0).await;
    let _s = Servers::start(&b.netns.path(), &[80], &[Protocol::Tcp]).unwrap();
    c.apply_object(&deny_ingress("default", "lock-b", "b"))
        .unwrap();
    c.sync().await.unwrap();
    assert!(!tcp(&c, "a", "b").await, "denied by lock-b");

    let (code, metrics) = c.agent_http(0, "/metrics").unwrap();
    assert_eq!(code, 200);
    let drops = metrics
        .lines()
        .find(|l| l.starts_with("weir_agent_drops_total{reason=\"policy_ingress\"}"))
        .unwrap_or_else(|| panic!("no policy_ingress drop counter in\n{metrics}"));
    assert!(!drops.ends_with(" 0"), "{drops}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("weir_agent_policy_denied_flows_total")
                && l.contains("NetworkPolicy/default/lock-b")
                && !l.ends_with(" 0")),
        "denied flows counted against lock-b:\n{metrics}"
    );

    let (_, flows) = c.agent_http(0, "/flows?limit=50").unwrap();
    let flows: serde_json::Value = serde_json::from_str(&flows).unwrap();
    let drop = flows
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["reason"] == "policy_ingress" && f["dst"] == b.ip.to_string())
        .unwrap_or_else(|| panic!("no drop event for b in {flows:#}"));
    assert_eq!(drop["dport"], 80);
    assert_eq!(drop["policies"], json!(["NetworkPolicy/default/lock-b"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_policy_deny_is_reported_with_its_rule_tier_and_priority() {
    let mut c = cluster(1, Topology::L2).await;
    pod(&mut c, "default", "a", 0).await;
    let b = pod(&mut c, "default", "b", 0).await;
    let _s = Servers::start(&b.netns.path(), &[80], &[Protocol::Tcp]).unwrap();
    let pods = |name: &str| json!({"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": name}}});
    c.apply_object(&json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "guardrail"},
        "spec": {"tier": "Admin", "priority": 7, "subject": {"pods": pods("b")},
                 "ingress": [{"name": "no-a", "action": "Deny", "from": [{"pods": pods("a")}]}]},
    }))
    .unwrap();
    c.sync().await.unwrap();
    assert!(!tcp(&c, "a", "b").await, "denied by guardrail");

    let (_, flows) = c.agent_http(0, "/flows?limit=50").unwrap();
    let flows: serde_json::Value = serde_json::from_str(&flows).unwrap();
    let drop = flows
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["reason"] == "policy_ingress" && f["dst"] == b.ip.to_string())
        .unwrap_or_else(|| panic!("no drop event for b in {flows:#}"));
    assert_eq!(
        drop["rule"],
        "ClusterNetworkPolicy/guardrail/no-a ingress (Admin tier, priority 7)"
    );
    assert_eq!(drop["tier"], "Admin");
    assert_eq!(drop["priority"], 7);
    assert_eq!(drop["policies"], json!(["ClusterNetworkPolicy/guardrail"]));

    let (_, metrics) = c.agent_http(0, "/metrics").unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with(
            "weir_agent_cluster_policy_rule_flows_total{policy=\"guardrail\",rule=\"no-a\",\
             direction=\"ingress\",tier=\"Admin\",priority=\"7\",action=\"Deny\"}"
        ) && !l.ends_with(" 0")),
        "the Deny rule counts its drops:\n{metrics}"
    );
}

/// ClusterNetworkPolicy `nodes` peers: a pod's egress to host-network servers on its own
/// node and on another one, by node labels (upstream's CNPAdminTierEgressNodePeers shape:
/// Accept one port, Pass another, Deny the rest), and a node label change moving a node out.
#[tokio::test(flavor = "multi_thread")]
async fn node_peers_decide_a_pods_egress_to_host_network_servers_by_node_labels() {
    let mut c = cluster(2, Topology::Routed).await;
    let a = pod(&mut c, "default", "a", 0).await;
    let b = pod(&mut c, "default", "b", 1).await;
    let _sb = Servers::start(&b.netns.path(), &[80], &[Protocol::Tcp]).unwrap();
    let nodes: Vec<_> = c.nodes().iter().map(|n| (n.netns.path(), n.ip)).collect();
    let _servers: Vec<_> = nodes
        .iter()
        .map(|(netns, _)| {
            Servers::start(
                netns,
                &[34567, 34568, 34569],
                &[Protocol::Tcp, Protocol::Udp],
            )
            .unwrap()
        })
        .collect();
    let to_nodes = |labels: serde_json::Value| json!([{"nodes": {"matchLabels": labels}}]);
    c.apply_object(&json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "node-peers"},
        "spec": {"tier": "Admin", "priority": 75,
                 "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "a"}}}},
                 "egress": [
                     {"name": "allow-34567", "action": "Accept",
                      "to": to_nodes(json!({"kubernetes.io/os": "linux"})),
                      "protocols": [{"tcp": {"destinationPort": {"number": 34567}}}]},
                     {"name": "pass-34569", "action": "Pass",
                      "to": to_nodes(json!({"kubernetes.io/os": "linux"})),
                      "protocols": [{"udp": {"destinationPort": {"number": 34569}}}]},
                     {"name": "deny-locked", "action": "Deny",
                      "to": to_nodes(json!({"access": "locked"}))},
                 ]},
    }))
    .unwrap();
    c.set_node_labels(0, [("access".to_owned(), "locked".to_owned())].into())
        .unwrap();
    c.set_node_labels(1, [("access".to_owned(), "locked".to_owned())].into())
        .unwrap();
    c.sync().await.unwrap();

    let reach = |to: std::net::IpAddr, port: u16, protocol: Protocol| {
        let from = a.netns.clone();
        async move { probe(&from, to, port, protocol).await.is_connected() }
    };
    for (_, ip) in &nodes {
        let ip = std::net::IpAddr::V4(*ip);
        assert!(reach(ip, 34567, Protocol::Tcp).await, "accepted to {ip}");
        assert!(
            reach(ip, 34569, Protocol::Udp).await,
            "passed to {ip}, nothing isolates"
        );
        assert!(!reach(ip, 34568, Protocol::Tcp).await, "denied to {ip}");
        assert!(!reach(ip, 34568, Protocol::Udp).await, "denied to {ip}");
    }
    assert!(
        reach(b.ip, 80, Protocol::Tcp).await,
        "a pod on a node is no node peer"
    );

    // Node 2 leaves the Deny rule's peer when its label goes.
    c.set_node_labels(1, Default::default()).unwrap();
    c.sync().await.unwrap();
    let (node1, node2) = (
        std::net::IpAddr::V4(nodes[0].1),
        std::net::IpAddr::V4(nodes[1].1),
    );
    assert!(
        reach(node2, 34568, Protocol::Tcp).await,
        "node 2 unlabelled"
    );
    assert!(
        !reach(node1, 34568, Protocol::Tcp).await,
        "node 1 still locked"
    );

    let (_, flows) = c.agent_http(0, "/flows?limit=100").unwrap();
    let flows: serde_json::Value = serde_json::from_str(&flows).unwrap();
    let drop = flows
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["reason"] == "policy_egress" && f["dst"] == node1.to_string())
        .unwrap_or_else(|| panic!("no egress drop to node 1 in {flows:#}"));
    assert_eq!(
        drop["rule"],
        "ClusterNetworkPolicy/node-peers/deny-locked egress (Admin tier, priority 75)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_policy_fails_closed_for_its_pods_and_leaves_the_others_alone() {
    let mut c = cluster(1, Topology::L2).await;
    for p in ["a", "b", "c"] {
        pod(&mut c, "default", p, 0).await;
    }
    let _sb = Servers::start(
        &c.pod("default", "b").unwrap().netns.path(),
        &[80],
        &[Protocol::Tcp],
    )
    .unwrap();
    let _sc = Servers::start(
        &c.pod("default", "c").unwrap().netns.path(),
        &[80],
        &[Protocol::Tcp],
    )
    .unwrap();
    // A valid policy: c accepts only a.
    c.apply_object(&json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "c-from-a", "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"pod": "c"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}],
        },
    }))
    .unwrap();
    // An invalid one for b: the CIDR does not parse.
    c.apply_object(&json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "b-broken", "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"pod": "b"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]}],
        },
    }))
    .unwrap();
    c.sync().await.unwrap();
    assert!(!tcp(&c, "a", "b").await, "b fails closed");
    assert!(tcp(&c, "a", "c").await, "c-from-a still applies");
    assert!(!tcp(&c, "b", "c").await, "c-from-a still applies");
    let log = std::fs::read_to_string(c.controller().unwrap().dir.join("controller.log")).unwrap();
    assert!(
        log.contains("NetworkPolicy/default/b-broken")
            && log.contains("spec.ingress[0].from[0].ipBlock.cidr"),
        "the controller names the policy and the field:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_change_also_cuts_established_connections_it_no_longer_allows() {
    let mut c = cluster(2, Topology::L2).await;
    let a = pod(&mut c, "default", "a", 0).await;
    let b = pod(&mut c, "default", "b", 1).await;
    let stream = LiveStream::start(&a.netns, &b.netns, b.ip, 9300);
    stream
        .assert_flowing("before the policy", Duration::from_millis(300))
        .await;
    // An unrelated policy does not disturb the flow.
    c.apply_object(&deny_ingress("default", "lock-a", "a"))
        .unwrap();
    c.sync().await.unwrap();
    stream
        .assert_flowing("after an unrelated policy", Duration::from_millis(300))
        .await;
    // Isolating b revokes the established connection too.
    c.apply_object(&deny_ingress("default", "lock-b", "b"))
        .unwrap();
    c.sync().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cut_at = stream.received();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        stream.received(),
        cut_at,
        "no data crosses after the policy revoked the flow"
    );
    stream.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn enforcement_survives_controller_and_agent_restarts_and_catches_up() {
    let mut c = cluster(2, Topology::Routed).await;
    pod(&mut c, "default", "a", 0).await;
    let b = pod(&mut c, "default", "b", 1).await;
    let _s = Servers::start(&b.netns.path(), &[80], &[Protocol::Tcp]).unwrap();
    c.apply_object(&deny_ingress("default", "lock-b", "b"))
        .unwrap();
    c.sync().await.unwrap();
    assert!(!tcp(&c, "a", "b").await);

    // The controller goes away: nothing changes in the dataplane.
    c.kill_controller();
    assert!(
        !tcp(&c, "a", "b").await,
        "still denied without the controller"
    );
    // Policy edits made meanwhile wait for it...
    c.delete_object("NetworkPolicy", Some("default"), "lock-b")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !tcp(&c, "a", "b").await,
        "agents keep the last state they had"
    );
    // ...and apply once it is back.
    c.restart_controller().unwrap();
    c.sync().await.unwrap();
    assert!(
        tcp(&c, "a", "b").await,
        "caught up after the controller returned"
    );

    // An agent restart does not open a hole either, even before it reconnects.
    c.apply_object(&deny_ingress("default", "lock-b", "b"))
        .unwrap();
    c.sync().await.unwrap();
    assert!(!tcp(&c, "a", "b").await);
    c.kill_controller();
    c.kill_agent(1);
    assert!(!tcp(&c, "a", "b").await, "denied while b's agent is down");
    // It remembers its pod CIDR, so it is ready (pods can start) without the controller.
    c.start_agent(1).await.unwrap();
    assert!(
        !tcp(&c, "a", "b").await,
        "denied after b's agent restarted without a controller"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_pod_is_isolated_before_its_first_packet_and_starts_without_the_controller() {
    let mut c = cluster(1, Topology::L2).await;
    pod(&mut c, "default", "a", 0).await;
    c.apply_object(&deny_ingress("default", "lock-b", "b"))
        .unwrap();
    c.sync().await.unwrap();

    // The policy exists before the pod, and the controller is slow to learn of the pod
    // (frozen for 500 ms). ADD returns only once the pod's rule sets are in the dataplane, so
    // the very first connection to it is already denied.
    c.freeze_controller(true);
    let thaw = {
        let pid = c.controller_pid().expect("the controller runs");
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGCONT,
            );
        })
    };
    let b = pod(&mut c, "default", "b", 0).await;
    let _sb = Servers::start(&b.netns.path(), &[80], &[Protocol::Tcp]).unwrap();
    assert!(!tcp(&c, "a", "b").await, "denied from the first packet on");
    thaw.join().unwrap();

    // Without the controller, ADD still succeeds after the wait, and the pod runs with every
    // new flow to and from it denied until its policies arrive (the default pending pod
    // policy): lock-d, which the agent cannot know selects d, is never bypassed.
    c.apply_object(&deny_ingress("default", "lock-d", "d"))
        .unwrap();
    c.sync().await.unwrap();
    c.kill_controller();
    let started = std::time::Instant::now();
    let d = pod(&mut c, "default", "d", 0).await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "ADD gave up waiting: {:?}",
        started.elapsed()
    );
    let _sd = Servers::start(&d.netns.path(), &[80], &[Protocol::Tcp]).unwrap();
    let _sa = Servers::start(
        &c.pod("default", "a").unwrap().netns.path(),
        &[80],
        &[Protocol::Tcp],
    )
    .unwrap();
    assert!(
        !tcp(&c, "a", "d").await,
        "d is denied while its policies are pending"
    );
    assert!(!tcp(&c, "d", "a").await, "d's own connections too");
    assert!(
        probe(&c.nodes()[0].netns, d.ip, 80, Protocol::Tcp)
            .await
            .is_connected(),
        "the node still reaches d (kubelet's probes)"
    );
    let (_, metrics) = c.agent_http(0, "/metrics").unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "weir_agent_pods_started_before_policy_total 1"),
        "d, and only d, started before its policies were known:\n{metrics}"
    );
    let (_, flows) = c.agent_http(0, "/flows?limit=100").unwrap();
    assert!(
        flows.contains("fail closed: the pod's policies are not known yet"),
        "the drops say why:\n{flows}"
    );
    c.restart_controller().unwrap();
    c.sync().await.unwrap();
    assert!(!tcp(&c, "a", "b").await);
    assert!(!tcp(&c, "a", "d").await, "lock-d applies");
    assert!(tcp(&c, "d", "a").await, "no policy isolates d's egress");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_pending_pod_policy_allow_a_pod_started_without_the_controller_is_unisolated() {
    let mut c = cluster_with_agent_args(1, Topology::L2, &["--pending-pod-policy=allow"]).await;
    pod(&mut c, "default", "a", 0).await;
    c.apply_object(&deny_ingress("default", "lock-d", "d"))
        .unwrap();
    c.sync().await.unwrap();
    c.kill_controller();
    let d = pod(&mut c, "default", "d", 0).await;
    let _sd = Servers::start(&d.netns.path(), &[80], &[Protocol::Tcp]).unwrap();
    assert!(
        tcp(&c, "a", "d").await,
        "unisolated until the controller names d's policies"
    );
    c.restart_controller().unwrap();
    c.sync().await.unwrap();
    assert!(!tcp(&c, "a", "d").await, "isolated once they arrive");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_of_a_new_map_layout_takes_over_flows_and_enforcement_of_the_old_one() {
    // XDP always on, so that its link moves over too.
    let mut c = cluster_with_agent_args(1, Topology::L2, &["--uplink-xdp", "always"]).await;
    let a = pod(&mut c, "default", "a", 0).await;
    let b = pod(&mut c, "default", "b", 0).await;
    let d = pod(&mut c, "default", "d", 0).await;
    let _sd = Servers::start(&d.netns.path(), &[80], &[Protocol::Tcp]).unwrap();
    // a connects to b, b sends.
    let stream = LiveStream::start_download(&a.netns, &b.netns, b.ip, 9000);
    stream
        .assert_flowing("before the policies", Duration::from_millis(500))
        .await;
    // b may not open connections: what it sends to a passes only as part of a's flow, which
    // only conntrack knows. d admits nobody.
    c.apply_object(&json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "b-no-egress", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Egress"]},
    }))
    .unwrap();
    c.apply_object(&deny_ingress("default", "lock-d", "d"))
        .unwrap();
    c.sync().await.unwrap();
    stream
        .assert_flowing("under b's egress isolation", Duration::from_millis(500))
        .await;
    assert!(!tcp(&c, "a", "d").await, "denied by lock-d");

    // The running agent's pins become those of an older layout version, then an agent
    // starts without a controller to tell it the policies.
    let node_dir = std::path::Path::new("/sys/fs/bpf/weir").join(&c.nodes()[0].name);
    let current = node_dir.join(format!("v{}", weir_common::ABI_VERSION));
    let older = node_dir.join("v0");
    c.kill_controller();
    c.kill_agent(0);
    std::fs::rename(&current, &older).expect("renaming the pin directory");
    stream
        .assert_flowing("while no agent runs", Duration::from_millis(500))
        .await;
    c.start_agent(0).await.expect("agent starts");

    // Conntrack came along (b's replies still pass), and so did the policy state.
    stream
        .assert_flowing("after the takeover", Duration::from_secs(1))
        .await;
    assert!(!tcp(&c, "a", "d").await, "still denied by lock-d");
    let _sa = Servers::start(&a.netns.path(), &[80], &[Protocol::Tcp]).unwrap();
    assert!(!tcp(&c, "b", "a").await, "b still may not open connections");
    assert!(
        !older.exists(),
        "the older version's pins are gone (its programs detached)"
    );
    // The uplink (TC both ways and XDP), the tunnel (both ways), three pods (both ways) and
    // the socket hooks: every link moved over.
    assert_eq!(
        current.join("links").read_dir().unwrap().count(),
        3 + 2 + 3 * 2 + weir_common::programs::SOCK.len()
    );
    assert!(!stream.failed());
    stream.stop();
}

/// Sends a UDP datagram from `from` to `to:port` (nothing listens there) and says how the
/// kernel answered within a second: refused (the ICMP port unreachable arrived) or not.
fn udp_refused(from: &weir_localcluster::netns::Netns, to: std::net::IpAddr, port: u16) -> bool {
    from.within(move || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        socket.connect((to, port)).expect("connect");
        socket
            .set_read_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
        let _ = socket.send(b"anyone?");
        let mut buf = [0u8; 16];
        matches!(socket.recv(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    })
    .expect("entering the namespace")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_isolated_pod_hears_that_the_port_it_sent_to_is_closed() {
    let mut c = cluster(2, Topology::Routed).await;
    let a = pod(&mut c, "default", "a", 0).await;
    let b = pod(&mut c, "default", "b", 0).await;
    let d = pod(&mut c, "default", "d", 1).await;
    // a admits nothing in; what it sends is allowed, and so is what the network says about it.
    c.apply_object(&deny_ingress("default", "lock-a", "a"))
        .unwrap();
    c.sync().await.unwrap();
    assert!(
        udp_refused(&a.netns, b.ip, 9),
        "from a pod on the same node"
    );
    assert!(udp_refused(&a.netns, d.ip, 9), "from a pod on another node");
}

/// An agent whose UDP flows expire after 2 s idle: an egress-isolated pod answers a
/// datagram it received, but once the flow has been idle for longer, what it sends on that
/// flow is its own new flow, which its policy denies.
#[tokio::test(flavor = "multi_thread")]
async fn an_isolated_pods_udp_reply_is_refused_once_the_flow_expired() {
    let mut c = cluster_with_agent_args(
        1,
        Topology::L2,
        &[
            "--ct-udp-timeout",
            "2",
            "--ct-udp-stream-timeout",
            "2",
            "--ct-sweep-interval",
            "1",
        ],
    )
    .await;
    let a = pod(&mut c, "default", "a", 0).await;
    let b = pod(&mut c, "default", "b", 0).await;
    c.apply_object(&json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "mute-b", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Egress"]},
    }))
    .unwrap();
    c.sync().await.unwrap();
    let bind = |ns: &weir_localcluster::netns::Netns, port: u16| {
        let socket = ns
            .within(move || std::net::UdpSocket::bind(("0.0.0.0", port)))
            .expect("entering the namespace")
            .expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        socket
    };
    let (client, server) = (bind(&a.netns, 0), bind(&b.netns, 7000));
    let mut buf = [0u8; 16];
    client.send_to(b"ping", (b.ip, 7000)).unwrap();
    let (_, from) = server.recv_from(&mut buf).expect("b hears a");
    server.send_to(b"pong", from).unwrap();
    assert!(client.recv(&mut buf).is_ok(), "the reply of a fresh flow");

    tokio::time::sleep(Duration::from_secs(4)).await;
    server.send_to(b"late", from).unwrap();
    assert!(
        client.recv(&mut buf).is_err(),
        "b's packet on the expired flow is a new flow its egress policy denies"
    );
    let (_, metrics) = c.agent_http(0, "/metrics").unwrap();
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    };
    assert!(value("weir_agent_drops_total{reason=\"policy_egress\"}") >= 1);
    assert!(value("weir_agent_conntrack_expired_removed_total") >= 1);
}
