//! End to end on one node: real agent, pods created through the real CNI plugin, real
//! packets between network namespaces.

mod support;

use std::{net::IpAddr, time::Duration};

use support::{LiveStream, cluster, ping, pod, probe};
use weir_agent::{dataplane::PinLayout, maps::pinned_drop_counts};
use weir_common::event::DropReason;
use weir_conformance::{Protocol, probe::Servers};
use weir_localcluster::Topology;

fn drops(c: &weir_localcluster::LocalCluster, reason: DropReason) -> u64 {
    let pins = PinLayout::new(std::path::Path::new("/sys/fs/bpf"), &c.nodes()[0].name);
    pinned_drop_counts(&pins)
        .expect("reading pinned drop counters")
        .into_iter()
        .find(|(r, _)| *r == reason)
        .map(|(_, n)| n)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn same_node_pods_reach_each_other_over_tcp_udp_sctp_and_icmp() {
    let mut c = cluster(1, Topology::L2).await;
    let a = pod(&mut c, "default", "a", 0).await;
    let b = pod(&mut c, "default", "b", 0).await;
    let _servers = Servers::start(&b.netns.path(), &[80], &Protocol::ALL).expect("servers");
    for protocol in Protocol::ALL {
        let outcome = probe(&a.netns, b.ip, 80, protocol).await;
        assert!(
            outcome.is_connected(),
            "a -> b over {protocol:?}: {outcome:?}"
        );
    }
    // An unserved port is refused by b itself, which proves the packets got there.
    let refused = probe(&a.netns, b.ip, 81, Protocol::Tcp).await;
    assert!(
        refused.is_denied() && !matches!(refused, weir_conformance::probe::ProbeOutcome::TimedOut)
    );
    assert!(ping(&a.netns, b.ip), "a pings b");
    assert!(ping(&b.netns, a.ip), "b pings a");
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_and_their_node_reach_each_other() {
    let mut c = cluster(1, Topology::L2).await;
    let a = pod(&mut c, "default", "a", 0).await;
    let node = c.nodes()[0].netns.clone();
    let node_ip = IpAddr::V4(c.nodes()[0].ip);
    let _on_pod = Servers::start(&a.netns.path(), &[8080], &[Protocol::Tcp]).expect("servers");
    let _on_node =
        Servers::start(&node.path(), &[10250], &[Protocol::Tcp, Protocol::Udp]).expect("servers");
    assert!(
        probe(&node, a.ip, 8080, Protocol::Tcp).await.is_connected(),
        "node -> pod"
    );
    assert!(
        probe(&a.netns, node_ip, 10250, Protocol::Tcp)
            .await
            .is_connected(),
        "pod -> node TCP"
    );
    assert!(
        probe(&a.netns, node_ip, 10250, Protocol::Udp)
            .await
            .is_connected(),
        "pod -> node UDP"
    );
    assert!(ping(&a.netns, node_ip), "pod pings node");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_cannot_send_from_an_address_or_mac_that_is_not_its_own() {
    let mut c = cluster(1, Topology::L2).await;
    let a = pod(&mut c, "default", "a", 0).await;
    let b = pod(&mut c, "default", "b", 0).await;
    let _servers = Servers::start(&b.netns.path(), &[80], &[Protocol::Tcp]).expect("servers");
    assert!(
        probe(&a.netns, b.ip, 80, Protocol::Tcp)
            .await
            .is_connected()
    );

    // Source address spoofing: a claims another address of the pod CIDR.
    let before = drops(&c, DropReason::Spoofed);
    a.netns
        .ip(&["addr", "add", "10.244.1.250/32", "dev", "eth0"])
        .unwrap();
    a.netns
        .ip(&[
            "route",
            "replace",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
            "onlink",
            "src",
            "10.244.1.250",
        ])
        .unwrap();
    let spoofed = probe(&a.netns, b.ip, 80, Protocol::Tcp).await;
    assert!(
        spoofed.is_denied(),
        "spoofed source got through: {spoofed:?}"
    );
    assert!(
        drops(&c, DropReason::Spoofed) > before,
        "drop counted as spoofing"
    );
    a.netns
        .ip(&[
            "route",
            "replace",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
            "onlink",
            "src",
            &a.ip.to_string(),
        ])
        .unwrap();
    assert!(
        probe(&a.netns, b.ip, 80, Protocol::Tcp)
            .await
            .is_connected(),
        "own address works again"
    );

    // MAC spoofing: the frames no longer come from the MAC the pod was given.
    let before = drops(&c, DropReason::Spoofed);
    a.netns
        .ip(&["link", "set", "eth0", "address", "02:00:00:00:be:ef"])
        .unwrap();
    let spoofed = probe(&a.netns, b.ip, 80, Protocol::Tcp).await;
    assert!(spoofed.is_denied(), "spoofed MAC got through: {spoofed:?}");
    assert!(
        drops(&c, DropReason::Spoofed) > before,
        "drop counted as spoofing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_restart_does_not_interrupt_an_established_tcp_stream() {
    let mut c = cluster(1, Topology::L2).await;
    let a = pod(&mut c, "default", "a", 0).await;
    let b = pod(&mut c, "default", "b", 0).await;
    let stream = LiveStream::start(&a.netns, &b.netns, b.ip, 9000);
    stream
        .assert_flowing("before the restart", Duration::from_millis(500))
        .await;

    c.kill_agent(0);
    stream
        .assert_flowing("while no agent runs", Duration::from_secs(1))
        .await;
    c.start_agent(0).await.expect("agent restarts");
    stream
        .assert_flowing("after the restart", Duration::from_secs(1))
        .await;

    // Once more with another conntrack size: the pinned table is recreated at the new size
    // with the flows it held, and the stream never notices.
    c.kill_agent(0);
    c.set_agent_args(vec!["--map-capacity".into(), "conntrack=65536".into()]);
    c.start_agent(0)
        .await
        .expect("agent restarts with a resized conntrack");
    stream
        .assert_flowing(
            "after the restart with a resized conntrack",
            Duration::from_secs(1),
        )
        .await;
    let (status, metrics) = c.agent_http(0, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("weir_agent_map_capacity{table=\"conntrack\"} 65536\n"),
        "the agent reports the new size"
    );
    let pins = PinLayout::new(std::path::Path::new("/sys/fs/bpf"), &c.nodes()[0].name);
    assert_eq!(
        aya::maps::MapInfo::from_pin(pins.maps_dir().join(weir_common::maps::CONNTRACK))
            .expect("the pinned conntrack")
            .max_entries(),
        65536,
        "the pinned map has the new size"
    );

    // The new agent re-adopted both pods: new connections and new pods work.
    let _servers = Servers::start(&b.netns.path(), &[80], &[Protocol::Tcp]).expect("servers");
    assert!(
        probe(&a.netns, b.ip, 80, Protocol::Tcp)
            .await
            .is_connected()
    );
    let d = pod(&mut c, "default", "d", 0).await;
    assert!(
        probe(&d.netns, b.ip, 80, Protocol::Tcp)
            .await
            .is_connected()
    );
    assert!(!stream.failed());
    stream.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn cni_del_is_idempotent_check_verifies_and_gc_reclaims() {
    let mut c = cluster(1, Topology::L2).await;
    let a = pod(&mut c, "default", "a", 0).await;
    let b = pod(&mut c, "default", "b", 0).await;

    // CHECK of a live pod passes (the plugin sends prevResult, the agent verifies it).
    let mut check_cfg = c.cni_config(0);
    check_cfg["prevResult"] = serde_json::json!({
        "cniVersion": "1.1.0",
        "ips": [{"address": format!("{}/32", a.ip), "interface": 1}],
    });
    let check = c
        .cni_with_config(
            0,
            "CHECK",
            &a.container_id,
            Some(&a.netns.path()),
            Some(("default", "a")),
            check_cfg,
        )
        .await
        .unwrap();
    assert!(check.success, "CHECK: {}", check.stdout);

    // DEL of an unknown container and a repeated DEL both succeed.
    let unknown = c
        .cni(0, "DEL", "no-such-container", None, None)
        .await
        .unwrap();
    assert!(unknown.success, "DEL unknown: {}", unknown.stdout);
    for _ in 0..2 {
        let del = c
            .cni(
                0,
                "DEL",
                &a.container_id,
                Some(&a.netns.path()),
                Some(("default", "a")),
            )
            .await
            .unwrap();
        assert!(del.success, "DEL: {}", del.stdout);
    }
    assert!(!ping(&b.netns, a.ip), "a is unreachable after DEL");

    // ADD into a namespace that does not exist fails with a clear error.
    let bad = c
        .cni(
            0,
            "ADD",
            "c-missing",
            Some(std::path::Path::new("/run/netns/does-not-exist")),
            Some(("default", "x")),
        )
        .await
        .unwrap();
    assert!(!bad.success);
    assert_eq!(bad.json()["code"], 8, "{}", bad.stdout);

    // An attachment the runtime has forgotten (ADD without the cluster knowing it)...
    let stale_ns = c.create_netns("stale").unwrap();
    let stale = c
        .cni(
            0,
            "ADD",
            "c-stale",
            Some(&stale_ns.path()),
            Some(("default", "stale")),
        )
        .await
        .unwrap();
    assert!(stale.success, "{}", stale.stdout);
    let stale_ip: IpAddr = stale.json()["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // (The controller never names its policies, so other pods may not reach it: the node
    // can.)
    let node = &c.nodes()[0].netns;
    assert!(ping(node, stale_ip));
    // ...is reclaimed by GC, which lists only the pods the cluster knows.
    let gc = c.cni(0, "GC", "", None, None).await.unwrap();
    assert!(gc.success, "GC: {}", gc.stdout);
    assert!(!ping(node, stale_ip), "the stale pod was detached");
    assert_eq!(
        stale_ns.ip(&["-o", "link", "show", "eth0"]).ok(),
        None,
        "its interface is gone"
    );
    // b is untouched, and new pods get fresh addresses (a's is not reused right away).
    let _servers = Servers::start(&b.netns.path(), &[80], &[Protocol::Tcp]).expect("servers");
    let e = pod(&mut c, "default", "e", 0).await;
    assert!(
        probe(&e.netns, b.ip, 80, Protocol::Tcp)
            .await
            .is_connected()
    );
    assert_ne!(e.ip, a.ip);
}

/// GET `path` on the agent at `addr` from inside `from`: the status code.
fn http_status(from: &weir_localcluster::netns::Netns, addr: IpAddr, path: &str) -> u16 {
    let agent = std::net::SocketAddr::new(addr, weir_localcluster::AGENT_HTTP_PORT);
    weir_localcluster::http::get_in(from, agent, path)
        .unwrap_or_else(|e| panic!("GET {path} from the namespace: {e:#}"))
        .0
}

/// Flow records name pods and policies: the agent serves them to its node only, while
/// metrics stay open to scrapers in pods.
#[tokio::test(flavor = "multi_thread")]
async fn flows_are_served_to_the_node_only_and_metrics_to_anyone() {
    let mut c = cluster(1, Topology::L2).await;
    let a = pod(&mut c, "default", "a", 0).await;
    let node = c.nodes()[0].netns.clone();
    let node_ip = IpAddr::V4(c.nodes()[0].ip);
    assert_eq!(
        http_status(&a.netns, node_ip, "/flows"),
        403,
        "pod -> /flows"
    );
    assert_eq!(
        http_status(&a.netns, node_ip, "/metrics"),
        200,
        "pod -> /metrics"
    );
    assert_eq!(
        http_status(&node, node_ip, "/flows"),
        200,
        "node address -> /flows"
    );
    let loopback = IpAddr::from([127, 0, 0, 1]);
    assert_eq!(
        http_status(&node, loopback, "/flows"),
        200,
        "loopback -> /flows"
    );
}
