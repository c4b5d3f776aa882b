//! hostPort end to end, in both topologies: a pod on node 1 with a hostPort (passed to the
//! plugin as `runtimeConfig.portMappings`, as kubelet does) is reached on its node's address
//! from a host outside the cluster, from the other node and from a pod on it; the client's
//! address is kept, so the pod's ingress rules judge the real client; a second pod claiming
//! the same port is refused; a restarted agent keeps serving it; after the pod's deletion
//! the port is closed and no frontend is left in the dataplane.

mod support;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use serde_json::json;
use support::{cluster, pod, probe};
use weir_conformance::{Protocol, probe::Servers};
use weir_localcluster::{LocalCluster, PodSpec, Topology, netns::Netns};

const HOST_PORT: u16 = 8081;
const TARGET: u16 = 8080;

/// Connects from `client` to `to` over TCP and returns the address the pod saw the
/// connection come from.
fn seen_by_pod(pod: &Netns, pod_ip: IpAddr, client: &Netns, to: SocketAddr) -> IpAddr {
    support::source_seen_by(pod, pod_ip, TARGET, client, to)
}

/// The value of an unlabelled metric of node `node`'s agent.
fn metric(c: &LocalCluster, node: usize, name: &str) -> Option<i64> {
    let (_, metrics) = c.agent_http(node, "/metrics").expect("metrics");
    metrics.lines().find_map(|l| {
        l.strip_prefix(name)?
            .strip_prefix(' ')
            .and_then(|v| v.parse().ok())
    })
}

fn spec(name: &str, node: usize) -> PodSpec {
    PodSpec {
        namespace: "default".into(),
        name: name.into(),
        node,
        labels: BTreeMap::from([("pod".to_string(), name.to_string())]),
        ports: vec![],
        host_ports: vec![
            (HOST_PORT, TARGET, "TCP".into()),
            (HOST_PORT, TARGET, "UDP".into()),
        ],
    }
}

async fn host_port_serves_the_pod(topology: Topology) {
    let mut c = cluster(2, topology).await;
    let web = c.add_pod(spec("web", 0)).await.expect("pod with hostPorts");
    let client = pod(&mut c, "default", "client", 1).await;
    c.sync().await.expect("sync");
    assert_eq!(
        metric(&c, 0, "weir_agent_host_ports"),
        Some(2),
        "{topology}"
    );
    assert_eq!(metric(&c, 0, "weir_agent_services"), Some(2), "{topology}");
    assert_eq!(
        metric(&c, 1, "weir_agent_host_ports"),
        Some(0),
        "{topology}"
    );

    // Another pod on the same node cannot have the same port; on the other node it can.
    let refused = c
        .add_pod(spec("web2", 0))
        .await
        .expect_err("the port is taken");
    assert!(
        format!("{refused:#}")
            .contains("already in use on this node by the hostPort of pod default/web"),
        "{topology}: {refused:#}"
    );
    assert_eq!(
        metric(&c, 0, "weir_agent_host_ports"),
        Some(2),
        "{topology}"
    );

    let external = c.external().expect("external host").clone();
    let (node1, node2) = (c.nodes()[0].netns.clone(), c.nodes()[1].netns.clone());
    let (ip1, ip2) = (IpAddr::V4(c.nodes()[0].ip), IpAddr::V4(c.nodes()[1].ip));
    let to = SocketAddr::new(ip1, HOST_PORT);

    // The pod sees the real client: the external host, the other node.
    let seen = seen_by_pod(&web.netns, web.ip, &external.netns, to);
    assert_eq!(seen, IpAddr::V4(external.ip), "{topology}: from outside");
    let seen = seen_by_pod(&web.netns, web.ip, &node2, to);
    assert_eq!(seen, ip2, "{topology}: from the other node");
    // A pod on the other node, and the pod's own node (translated at the socket).
    seen_by_pod(&web.netns, web.ip, &client.netns, to);
    seen_by_pod(&web.netns, web.ip, &node1, to);

    let servers = Servers::start(
        &web.netns.path(),
        &[TARGET],
        &[Protocol::Tcp, Protocol::Udp],
    )
    .expect("servers");
    for from in [&external.netns, &node2, &client.netns] {
        let outcome = probe(from, ip1, HOST_PORT, Protocol::Udp).await;
        assert!(
            outcome.is_connected(),
            "{topology}: UDP {} -> {to}: {outcome:?}",
            from.name()
        );
    }
    // The hostPort is on the pod's node only.
    let elsewhere = probe(&external.netns, ip2, HOST_PORT, Protocol::Tcp).await;
    assert!(!elsewhere.is_connected(), "{topology}: {elsewhere:?}");

    // The pod's ingress rules apply to the translated flow: only the external host may in.
    c.apply_object(&json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "web-from-outside", "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"pod": "web"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"ipBlock": {"cidr": format!("{}/32", external.ip)}}]}],
        },
    }))
    .expect("apply");
    c.sync().await.expect("sync");
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let allowed = probe(&external.netns, ip1, HOST_PORT, protocol).await;
        assert!(
            allowed.is_connected(),
            "{topology}: {protocol:?} from outside: {allowed:?}"
        );
        for from in [&node2, &client.netns] {
            let denied = probe(from, ip1, HOST_PORT, protocol).await;
            assert!(
                !denied.is_connected(),
                "{topology}: {protocol:?} from {} passed the policy: {denied:?}",
                from.name()
            );
        }
    }

    // A restarted agent keeps serving it: the mappings are kept with the endpoint, and the
    // controller's snapshot the new agent applies leaves them in place.
    c.kill_agent(0);
    c.start_agent(0).await.expect("agent restart");
    c.sync().await.expect("sync");
    assert_eq!(
        metric(&c, 0, "weir_agent_host_ports"),
        Some(2),
        "{topology}"
    );
    let again = probe(&external.netns, ip1, HOST_PORT, Protocol::Tcp).await;
    assert!(
        again.is_connected(),
        "{topology}: after an agent restart: {again:?}"
    );
    drop(servers);

    // Deleted: the port closes and the frontends go.
    c.remove_pod("default", "web").await.expect("delete");
    let closed = probe(&external.netns, ip1, HOST_PORT, Protocol::Tcp).await;
    assert!(!closed.is_connected(), "{topology}: {closed:?}");
    assert_eq!(
        metric(&c, 0, "weir_agent_host_ports"),
        Some(0),
        "{topology}"
    );
    assert_eq!(metric(&c, 0, "weir_agent_services"), Some(0), "{topology}");
    assert_eq!(
        metric(&c, 0, "weir_agent_service_backends"),
        Some(0),
        "{topology}"
    );

    // The port is free again.
    c.add_pod(spec("web2", 0)).await.expect("the port is free");
    c.sync().await.expect("sync");
    assert_eq!(
        metric(&c, 0, "weir_agent_host_ports"),
        Some(2),
        "{topology}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn host_port_serves_the_pod_on_one_segment() {
    host_port_serves_the_pod(Topology::L2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn host_port_serves_the_pod_across_subnets() {
    host_port_serves_the_pod(Topology::Routed).await;
}
