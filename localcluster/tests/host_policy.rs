//! HostPolicy end to end: a node that a HostPolicy selects (by a node label) accepts from the
//! network only what the policy allows, the replies of its own connections and its failsafe
//! ports; the drops are counted and reported with the policy; its agent keeps talking to the
//! controller; the label's removal opens the node again, and nodes no policy selects are
//! never affected.

mod support;

use std::net::IpAddr;

use serde_json::json;
use support::{cluster, pod, probe};
use weir_conformance::{Protocol, probe::Servers};
use weir_localcluster::{ExternalHost, LocalCluster, Topology, netns::Netns};

/// A port of node 1 the policy opens to the other nodes only, one it does not open, and a
/// failsafe port (SSH).
const OPEN_TO_NODES: u16 = 8080;
const CLOSED: u16 = 8081;
const SSH: u16 = 22;

async fn reaches(from: &Netns, to: IpAddr, port: u16, protocol: Protocol) -> bool {
    probe(from, to, port, protocol).await.is_connected()
}

fn drops(c: &LocalCluster, node: usize, reason: &str) -> u64 {
    let (_, metrics) = c.agent_http(node, "/metrics").expect("metrics");
    let prefix = format!("weir_agent_drops_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or(0)
}

/// The external host, and both nodes' namespaces and addresses.
struct Hosts {
    external: ExternalHost,
    node0: Netns,
    node1: Netns,
    node0_ip: IpAddr,
    node1_ip: IpAddr,
}

fn hosts(c: &LocalCluster) -> Hosts {
    Hosts {
        external: c.external().expect("external host").clone(),
        node0: c.nodes()[0].netns.clone(),
        node1: c.nodes()[1].netns.clone(),
        node0_ip: IpAddr::V4(c.nodes()[0].ip),
        node1_ip: IpAddr::V4(c.nodes()[1].ip),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_policy_firewalls_the_nodes_it_selects_and_never_closes_the_failsafe_ports() {
    let mut c = cluster(2, Topology::Routed).await;
    let remote_pod = pod(&mut c, "default", "client", 1).await;
    let Hosts {
        external,
        node0,
        node1,
        node0_ip,
        node1_ip,
    } = hosts(&c);
    let _servers = Servers::start(
        &node0.path(),
        &[OPEN_TO_NODES, CLOSED, SSH],
        &[Protocol::Tcp, Protocol::Udp],
    )
    .unwrap();
    let _other = Servers::start(&node1.path(), &[CLOSED], &[Protocol::Tcp]).unwrap();
    let _outside = Servers::start(&external.netns.path(), &[CLOSED], &[Protocol::Tcp]).unwrap();
    c.apply_object(&json!({
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "HostPolicy",
        "metadata": {"name": "firewalled"},
        "spec": {"nodeSelector": {"matchLabels": {"firewall": "on"}},
                 "ingress": [{"from": [{"nodeSelector": {}}],
                              "ports": [{"protocol": "TCP", "port": OPEN_TO_NODES}]}]},
    }))
    .unwrap();
    c.sync().await.unwrap();
    assert!(
        reaches(&external.netns, node0_ip, CLOSED, Protocol::Tcp).await,
        "no node is selected yet"
    );

    c.set_node_labels(0, [("firewall".to_owned(), "on".to_owned())].into())
        .unwrap();
    c.sync()
        .await
        .expect("the agent still hears the controller");
    let before = drops(&c, 0, "host_policy");
    assert!(reaches(&node1, node0_ip, OPEN_TO_NODES, Protocol::Tcp).await);
    assert!(!reaches(&node1, node0_ip, CLOSED, Protocol::Tcp).await);
    assert!(
        !reaches(&node1, node0_ip, OPEN_TO_NODES, Protocol::Udp).await,
        "TCP only"
    );
    assert!(!reaches(&external.netns, node0_ip, OPEN_TO_NODES, Protocol::Tcp).await);
    assert!(
        !reaches(&remote_pod.netns, node0_ip, OPEN_TO_NODES, Protocol::Tcp).await,
        "a pod is not a node"
    );
    assert!(
        reaches(&external.netns, node0_ip, SSH, Protocol::Tcp).await,
        "failsafe"
    );
    assert!(
        reaches(&node0, external.ip.into(), CLOSED, Protocol::Tcp).await,
        "the node's own connections get their replies"
    );
    assert!(reaches(&node0, node1_ip, CLOSED, Protocol::Tcp).await);
    assert!(
        reaches(&external.netns, node1_ip, CLOSED, Protocol::Tcp).await,
        "node 2 is not selected"
    );
    assert!(drops(&c, 0, "host_policy") >= before + 4, "drops counted");
    let (_, flows) = c.agent_http(0, "/flows?limit=200").unwrap();
    let flows: serde_json::Value = serde_json::from_str(&flows).unwrap();
    let drop = flows
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["reason"] == "host_policy" && f["src"] == external.ip.to_string())
        .unwrap_or_else(|| panic!("no host_policy drop from the external host in {flows:#}"));
    assert_eq!(
        drop["policies"],
        json!(["HostPolicy/firewalled"]),
        "{drop:#}"
    );

    // An agent restart keeps the firewall (the maps are pinned).
    c.kill_agent(0);
    c.start_agent(0).await.unwrap();
    assert!(!reaches(&external.netns, node0_ip, CLOSED, Protocol::Tcp).await);
    assert!(reaches(&external.netns, node0_ip, SSH, Protocol::Tcp).await);

    c.set_node_labels(0, Default::default()).unwrap();
    c.sync().await.unwrap();
    assert!(
        reaches(&external.netns, node0_ip, CLOSED, Protocol::Tcp).await,
        "unselected again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn egress_rules_judge_the_nodes_own_connections_and_untracked_rules_drop_in_xdp() {
    let mut c = cluster(2, Topology::Routed).await;
    let local_pod = pod(&mut c, "default", "local", 0).await;
    let Hosts {
        external,
        node0,
        node1,
        node0_ip,
        node1_ip,
    } = hosts(&c);
    let _servers = Servers::start(
        &node0.path(),
        &[OPEN_TO_NODES, CLOSED],
        &[Protocol::Tcp, Protocol::Udp],
    )
    .unwrap();
    let _other = Servers::start(&node1.path(), &[CLOSED], &[Protocol::Tcp]).unwrap();
    let _outside = Servers::start(&external.netns.path(), &[CLOSED], &[Protocol::Tcp]).unwrap();
    c.set_node_labels(0, [("firewall".to_owned(), "on".to_owned())].into())
        .unwrap();
    c.apply_object(&json!({
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "HostPolicy",
        "metadata": {"name": "edge"},
        "spec": {"nodeSelector": {"matchLabels": {"firewall": "on"}},
                 "policyTypes": ["Egress"],
                 "egress": [{"to": [{"nodeSelector": {}}]}],
                 "untracked": [{"from": [{"ipBlock": {"cidr": format!("{}/32", external.ip)}}],
                                "ports": [{"protocol": "UDP", "port": CLOSED}]}]},
    }))
    .unwrap();
    c.sync()
        .await
        .expect("the agent still hears the controller (a failsafe port)");
    // The untracked rules are XDP's to enforce: it runs on the selected node alone.
    assert_eq!(
        support::xdp_mode(&c, 0).as_deref(),
        Some("weir_agent_xdp_mode{interface=\"eth0\",mode=\"native\"} 1")
    );
    assert_eq!(
        support::xdp_mode(&c, 1).as_deref(),
        Some("weir_agent_xdp_mode{interface=\"\",mode=\"none\"} 1")
    );

    // Egress: the node reaches the other node, not the outside; its pods still do.
    let before = drops(&c, 0, "host_policy");
    assert!(reaches(&node0, node1_ip, CLOSED, Protocol::Tcp).await);
    assert!(
        !reaches(&node0, external.ip.into(), CLOSED, Protocol::Tcp).await,
        "not allowed by the egress rules"
    );
    assert!(
        reaches(&local_pod.netns, external.ip.into(), CLOSED, Protocol::Tcp).await,
        "a pod's traffic is not the node's"
    );
    // Ingress is not isolated, and the node's replies pass its egress rules.
    assert!(reaches(&external.netns, node0_ip, CLOSED, Protocol::Tcp).await);
    assert!(reaches(&external.netns, node0_ip, OPEN_TO_NODES, Protocol::Udp).await);
    // Untracked: the external host's UDP to that port is dropped in XDP.
    let hits_before = drops(&c, 0, "host_policy");
    assert!(hits_before > before, "the egress drop is counted");
    assert!(!reaches(&external.netns, node0_ip, CLOSED, Protocol::Udp).await);
    assert!(
        reaches(&node1, node0_ip, CLOSED, Protocol::Udp).await,
        "another source"
    );
    assert!(drops(&c, 0, "host_policy") > hits_before);
    let (_, flows) = c.agent_http(0, "/flows?limit=500").unwrap();
    let flows: serde_json::Value = serde_json::from_str(&flows).unwrap();
    let flows = flows.as_array().unwrap();
    let untracked = flows
        .iter()
        .find(|f| {
            f["reason"] == "host_policy" && f["src"] == external.ip.to_string() && f["proto"] == 17
        })
        .unwrap_or_else(|| panic!("no untracked drop from the external host in {flows:#?}"));
    assert_eq!(
        untracked["policies"],
        json!(["HostPolicy/edge"]),
        "{untracked:#}"
    );
    assert_eq!(
        untracked["rule"], "HostPolicy/edge/untracked[0] (untracked)",
        "{untracked:#}"
    );
    let egress = flows
        .iter()
        .find(|f| f["reason"] == "host_policy" && f["dst"] == external.ip.to_string())
        .unwrap_or_else(|| panic!("no egress drop to the external host in {flows:#?}"));
    assert_eq!(egress["policies"], json!(["HostPolicy/edge"]), "{egress:#}");

    c.delete_object("HostPolicy", None, "edge").unwrap();
    c.sync().await.unwrap();
    assert!(reaches(&node0, external.ip.into(), CLOSED, Protocol::Tcp).await);
    assert!(reaches(&external.netns, node0_ip, CLOSED, Protocol::Udp).await);
}
