//! End to end on dual-stack and IPv6-only clusters: every pod has an address per family, and
//! pods on one node and across nodes reach each other over IPv6 (ICMPv6 and TCP) while the
//! IPv4 path keeps working. The nodes' underlay is IPv4: IPv6 traffic to another node's
//! pods travels over VXLAN.

mod support;

use std::net::IpAddr;

use support::{cluster_with, cluster_with_family, ping, pod, probe, source_seen_by};
use weir_conformance::{Protocol, probe::Servers};
use weir_localcluster::{IpFamily, Pod, Topology};

fn v4(p: &Pod) -> IpAddr {
    *p.ips
        .iter()
        .find(|i| i.is_ipv4())
        .unwrap_or_else(|| panic!("{} has no IPv4 address: {:?}", p.name, p.ips))
}

fn v6(p: &Pod) -> IpAddr {
    *p.ips
        .iter()
        .find(|i| i.is_ipv6())
        .unwrap_or_else(|| panic!("{} has no IPv6 address: {:?}", p.name, p.ips))
}

/// A TCP server on port 80 in each pod, for as long as the result lives.
fn tcp_servers(pods: &[&Pod]) -> Vec<Servers> {
    pods.iter()
        .map(|p| Servers::start(&p.netns.path(), &[80], &[Protocol::Tcp]).expect("servers"))
        .collect()
}

/// Both directions of every pair, over ICMP and TCP to port 80, to `addr` of the target.
async fn all_pairs_reach(pods: &[&Pod], addr: fn(&Pod) -> IpAddr, what: &str) {
    for from in pods {
        for to in pods {
            if from.name == to.name {
                continue;
            }
            let dst = addr(to);
            assert!(
                ping(&from.netns, dst),
                "{what}: {} pings {} at {dst}",
                from.name,
                to.name
            );
            let tcp = probe(&from.netns, dst, 80, Protocol::Tcp).await;
            assert!(
                tcp.is_connected(),
                "{what}: {} -> {} at {dst}:80 over TCP: {tcp:?}",
                from.name,
                to.name
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dual_stack_pods_reach_each_other_over_ipv6_and_ipv4_on_one_node_and_across_nodes() {
    let mut c = cluster_with_family(2, Topology::L2, IpFamily::Dual).await;
    let a = pod(&mut c, "default", "a", 0).await;
    let b = pod(&mut c, "default", "b", 0).await;
    let r = pod(&mut c, "default", "r", 1).await;
    for p in [&a, &b, &r] {
        assert_eq!(
            p.ips.len(),
            2,
            "{}: one address per family: {:?}",
            p.name,
            p.ips
        );
        assert!(p.ips[0].is_ipv4() && p.ips[1].is_ipv6(), "{:?}", p.ips);
        let v6 = v6(p).to_string();
        assert!(
            v6.starts_with("fd00:10:244:"),
            "{v6} in the cluster's IPv6 CIDR"
        );
    }
    // The pod's IPv6 default route goes via the link-local gateway.
    let routes = a.netns.ip(&["-6", "route", "show", "default"]).unwrap();
    assert!(routes.contains("via fe80::1"), "{routes}");
    let _servers = tcp_servers(&[&a, &b, &r]);
    all_pairs_reach(&[&a, &b, &r], v6, "IPv6").await;
    all_pairs_reach(&[&a, &b, &r], v4, "IPv4").await;

    // The node reaches its own pods and the other node's over IPv6 too: it sends from an
    // IPv6 address of its own pod CIDR (the underlay has none), which the other node routes
    // back to it.
    let node = c.nodes()[0].netns.clone();
    for p in [&a, &r] {
        assert!(ping(&node, v6(p)), "node 0 pings {} at {}", p.name, v6(p));
        let tcp = probe(&node, v6(p), 80, Protocol::Tcp).await;
        assert!(
            tcp.is_connected(),
            "node 0 -> {} over IPv6: {tcp:?}",
            p.name
        );
    }

    // A pod that loses its permanent gateway entry resolves the gateway again by neighbour
    // discovery: the host end answers for fe80::1, as it answers ARP for 169.254.1.1.
    a.netns
        .ip(&["-6", "neigh", "del", "fe80::1", "dev", "eth0"])
        .expect("delete the gateway's neighbour entry");
    let gone = a.netns.ip(&["-6", "neigh", "show", "dev", "eth0"]).unwrap();
    assert!(!gone.contains("PERMANENT"), "{gone}");
    assert!(
        ping(&a.netns, v6(&r)),
        "a pings r over IPv6 after re-resolving its gateway"
    );
    let learned = a
        .netns
        .ip(&["-6", "neigh", "show", "fe80::1", "dev", "eth0"])
        .unwrap();
    assert!(
        learned.contains("lladdr"),
        "gateway resolved by NDP: {learned}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv6_only_pods_reach_each_other_on_one_node_and_across_nodes() {
    let mut c = cluster_with_family(2, Topology::L2, IpFamily::Ipv6).await;
    let a = pod(&mut c, "default", "a", 0).await;
    let b = pod(&mut c, "default", "b", 0).await;
    let r = pod(&mut c, "default", "r", 1).await;
    for p in [&a, &b, &r] {
        assert_eq!(p.ips.len(), 1, "{}: {:?}", p.name, p.ips);
        assert!(p.ip.is_ipv6(), "{}: {}", p.name, p.ip);
        let v4 = p
            .netns
            .ip(&["-4", "address", "show", "dev", "eth0"])
            .unwrap();
        assert!(
            !v4.contains("inet "),
            "no IPv4 address in an IPv6-only pod: {v4}"
        );
    }
    let _servers = tcp_servers(&[&a, &b, &r]);
    all_pairs_reach(&[&a, &b, &r], v6, "IPv6 only").await;
}

/// Packets the node sent as VXLAN in IPv6 datagrams, counted by an nftables rule in its
/// namespace (installed by [`count_ipv6_vxlan`]).
fn ipv6_vxlan_sent(node: &weir_localcluster::Node) -> u64 {
    let out = nft(node, &["list", "table", "ip6", "vxlan_count"]);
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {out}"))
}

fn count_ipv6_vxlan(node: &weir_localcluster::Node) {
    nft(node, &["add", "table", "ip6", "vxlan_count"]);
    nft(
        node,
        &[
            "add",
            "chain",
            "ip6",
            "vxlan_count",
            "out",
            "{",
            "type",
            "filter",
            "hook",
            "output",
            "priority",
            "0",
            ";",
            "}",
        ],
    );
    nft(
        node,
        &[
            "add",
            "rule",
            "ip6",
            "vxlan_count",
            "out",
            "udp",
            "dport",
            "4789",
            "counter",
        ],
    );
}

fn nft(node: &weir_localcluster::Node, args: &[&str]) -> String {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", node.netns.path().display()))
        .arg("nft")
        .args(args)
        .output()
        .expect("nft runs");
    assert!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Nodes known by IPv6 addresses: the controller hands out IPv6 node addresses (and the
/// nodes' IPv4 ones beside them), and pods of both families reach the other node's pods. On
/// one segment both families are routed directly, each via the other node's address of its
/// family; across subnets both go through VXLAN in IPv6 datagrams.
async fn ipv6_underlay(topology: Topology) {
    let mut c = cluster_with(2, topology, |o| {
        o.ip_family = IpFamily::Dual;
        o.ipv6_underlay = true;
    })
    .await;
    let a = pod(&mut c, "default", "a", 0).await;
    let r = pod(&mut c, "default", "r", 1).await;
    let _servers = tcp_servers(&[&a, &r]);
    for node in c.nodes() {
        count_ipv6_vxlan(node);
    }
    all_pairs_reach(&[&a, &r], v4, "IPv4 pods, IPv6 underlay").await;
    for node in c.nodes() {
        let sent = ipv6_vxlan_sent(node);
        match topology {
            Topology::L2 => assert_eq!(
                sent, 0,
                "{}: IPv4 pod traffic is routed directly, via the IPv4 address",
                node.name
            ),
            Topology::Routed => assert!(
                sent >= 2,
                "{} sent IPv4 pod traffic in IPv6 VXLAN datagrams: {sent} packets",
                node.name
            ),
        }
    }
    all_pairs_reach(&[&a, &r], v6, "IPv6 pods, IPv6 underlay").await;
    // A node's own connections to pods, of either family: the remote pod answers the node's
    // IPv4 address directly (no masquerade rewrites it to the other node's address).
    let node0 = c.nodes()[0].netns.clone();
    for p in [&a, &r] {
        for ip in [v4(p), v6(p)] {
            assert!(ping(&node0, ip), "node 0 pings {} at {ip}", p.name);
            let tcp = probe(&node0, ip, 80, Protocol::Tcp).await;
            assert!(tcp.is_connected(), "node 0 -> {} at {ip}: {tcp:?}", p.name);
        }
        let seen = source_seen_by(
            &p.netns,
            v4(p),
            8081,
            &node0,
            std::net::SocketAddr::new(v4(p), 8081),
        );
        assert_eq!(
            seen,
            IpAddr::V4(c.nodes()[0].ip),
            "{} answers node 0 at its own IPv4 address",
            p.name
        );
    }
    dual_stack_service_reaches_its_backend_over_both_families(&mut c, &a, &r).await;
}

/// A dual-stack NodePort Service whose backend is `backend` (on node 1): its ClusterIP and
/// node port of each family lead there, from `client` (a pod of node 0) and from node 0
/// itself (the socket hooks), on either node's address of that family.
async fn dual_stack_service_reaches_its_backend_over_both_families(
    c: &mut weir_localcluster::LocalCluster,
    client: &Pod,
    backend: &Pod,
) {
    const NODE_PORT: u16 = 30080;
    let cluster_ips: [IpAddr; 2] = [
        "10.96.0.80".parse().unwrap(),
        "fd00:10:96::80".parse().unwrap(),
    ];
    c.apply_object(&serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "type": "NodePort",
            "clusterIP": cluster_ips[0].to_string(),
            "clusterIPs": cluster_ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "ipFamilies": ["IPv4", "IPv6"],
            "ipFamilyPolicy": "RequireDualStack",
            "selector": {"pod": backend.name},
            "ports": [{"port": 8080, "targetPort": 80, "protocol": "TCP", "nodePort": NODE_PORT}],
        },
    }))
    .expect("apply");
    c.sync().await.expect("sync");
    let node0 = c.nodes()[0].netns.clone();
    let mut targets: Vec<(IpAddr, u16)> = cluster_ips.iter().map(|ip| (*ip, 8080)).collect();
    for node in c.nodes() {
        targets.push((IpAddr::V4(node.ip), NODE_PORT));
        let ip6 = node.ip6.expect("a node address on the IPv6 underlay");
        targets.push((IpAddr::V6(ip6), NODE_PORT));
    }
    for (ip, port) in targets {
        for (who, from) in [("pod", &client.netns), ("node 0", &node0)] {
            let outcome = probe(from, ip, port, Protocol::Tcp).await;
            assert!(
                outcome.is_connected(),
                "{who} -> {ip}:{port} reaches {}: {outcome:?}",
                backend.name
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv6_underlay_on_one_segment_carries_both_families() {
    ipv6_underlay(Topology::L2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv6_underlay_across_a_router_carries_both_families_over_vxlan() {
    ipv6_underlay(Topology::Routed).await;
}

/// hostPorts on a dual-stack node known by addresses of both families: a mapping without
/// hostIP is served on both families' addresses, each leading to the pod's address of that
/// family; one with an IPv6 hostIP on that address. The clients' addresses are kept.
#[tokio::test(flavor = "multi_thread")]
async fn host_ports_serve_both_families() {
    const TARGET: u16 = 8080;
    let mut c = cluster_with(2, Topology::L2, |o| {
        o.ip_family = IpFamily::Dual;
        o.ipv6_underlay = true;
    })
    .await;
    let spec = |name: &str, host_port: u16| weir_localcluster::PodSpec {
        namespace: "default".into(),
        name: name.into(),
        node: 0,
        labels: [("pod".to_string(), name.to_string())].into(),
        ports: vec![],
        host_ports: vec![(host_port, TARGET, "TCP".into())],
    };
    let web = c.add_pod(spec("web", 8082)).await.expect("hostPort pod");
    let node0_v6 = IpAddr::V6(c.nodes()[0].ip6.expect("an IPv6 node address"));
    let web6 = c
        .add_pod_with_host_ip(spec("web6", 8083), node0_v6)
        .await
        .expect("hostPort on the node's IPv6 address");
    c.sync().await.expect("sync");
    let node0_v4 = IpAddr::V4(c.nodes()[0].ip);
    let client = c.nodes()[1].netns.clone();
    let client_ips = [
        IpAddr::V4(c.nodes()[1].ip),
        IpAddr::V6(c.nodes()[1].ip6.expect("an IPv6 node address")),
    ];
    for (pod, port, node_ip, pod_ip, client_ip) in [
        (&web, 8082, node0_v4, v4(&web), client_ips[0]),
        (&web, 8082, node0_v6, v6(&web), client_ips[1]),
        (&web6, 8083, node0_v6, v6(&web6), client_ips[1]),
    ] {
        let seen = source_seen_by(
            &pod.netns,
            pod_ip,
            TARGET,
            &client,
            std::net::SocketAddr::new(node_ip, port),
        );
        assert_eq!(
            seen, client_ip,
            "{}:{port} leads to {} at {pod_ip}",
            node_ip, pod.name
        );
    }
}

/// Pods as real containers on a dual-stack cluster: containerd reads both addresses from the
/// plugin's result (the sandbox status lists the IPv6 one as an additional IP, as kubelet
/// reads it), and the containers reach each other over both families.
#[tokio::test(flavor = "multi_thread")]
async fn container_pods_get_both_families_from_the_runtime() {
    let mut c = cluster_with(2, Topology::L2, |o| {
        o.ip_family = IpFamily::Dual;
        o.runtime = weir_localcluster::Runtime::Containerd;
    })
    .await;
    let a = pod(&mut c, "default", "a", 0).await;
    let r = pod(&mut c, "default", "r", 1).await;
    for p in [&a, &r] {
        assert_eq!(p.ips.len(), 2, "{}: both families: {:?}", p.name, p.ips);
        assert!(p.ips[0].is_ipv4() && p.ips[1].is_ipv6(), "{:?}", p.ips);
    }
    let _servers = tcp_servers(&[&a, &r]);
    all_pairs_reach(&[&a, &r], v6, "IPv6 container pods").await;
    all_pairs_reach(&[&a, &r], v4, "IPv4 container pods").await;
}
