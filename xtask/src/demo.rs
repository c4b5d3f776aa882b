//! `cargo xtask demo`: a throwaway local cluster, pods created through the CNI plugin, and
//! a reachability table measured with real connections.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Result;
use weir_conformance::{
    Protocol,
    probe::{ProbeRequest, Servers, probe_many},
};
use weir_localcluster::{ClusterOptions, LocalCluster, Pod, PodSpec, Topology};

const PORT: u16 = 80;

pub async fn run(bin: PathBuf, nodes: usize, topology: Topology) -> Result<()> {
    let mut opts = ClusterOptions::new(bin);
    opts.nodes = nodes;
    opts.topology = topology;
    println!(
        "Starting a local weir cluster ({nodes} node(s), network namespaces on this machine)..."
    );
    let mut cluster = LocalCluster::up(opts).await?;
    let layout = [
        ("shop", "frontend"),
        ("shop", "backend"),
        ("shop", "db"),
        ("tools", "debug"),
    ];
    let mut pods = Vec::new();
    for (i, (ns, name)) in layout.iter().enumerate() {
        let pod = cluster
            .add_pod(PodSpec {
                namespace: ns.to_string(),
                name: name.to_string(),
                node: i % nodes,
                labels: BTreeMap::from([("app".to_string(), name.to_string())]),
                ports: vec![],
                host_ports: vec![],
            })
            .await?;
        pods.push(pod);
    }
    println!("\nPods (each created by a CNI ADD through the node's weir agent):");
    for p in &pods {
        println!(
            "  {:<16} {:<12} on node {}",
            format!("{}/{}", p.namespace, p.name),
            p.ip,
            p.node
        );
    }
    let _servers: Vec<Servers> = pods
        .iter()
        .map(|p| Servers::start(&p.netns.path(), &[PORT], &Protocol::ALL))
        .collect::<Result<_, _>>()?;
    for protocol in Protocol::ALL {
        let table = matrix(&pods, protocol).await;
        print_table(&format!("{protocol} port {PORT}"), &pods, &table);
    }
    println!("\n`.` = connected, `X` = no connection. Every packet between pods went through");
    println!("weir's eBPF programs on the pods' host-side veths.");

    let policy = serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "db-from-backend", "namespace": "shop"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "db"}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"app": "backend"}}}],
                "ports": [{"protocol": "TCP", "port": PORT}],
            }],
        },
    });
    println!(
        "\nApplying NetworkPolicy shop/db-from-backend: db accepts TCP/{PORT} from backend only."
    );
    println!("{}", serde_norway::to_string(&policy)?);
    let started = std::time::Instant::now();
    cluster.apply_object(&policy)?;
    cluster.sync().await?;
    println!(
        "Enforced on every node {:.0?} after it was written.",
        started.elapsed()
    );
    let table = matrix(&pods, Protocol::Tcp).await;
    print_table(&format!("TCP port {PORT}, with the policy"), &pods, &table);

    let db_node = cluster.node_index(&pods[2].node)?;
    let (_, metrics) = cluster.agent_http(db_node, "/metrics")?;
    println!("\nThe agent counts what the policy dropped (its /metrics endpoint):");
    for line in metrics.lines().filter(|l| {
        l.starts_with("weir_agent_policy_denied_flows_total")
            || l.starts_with("weir_agent_drops_total{reason=\"policy_ingress\"}")
    }) {
        println!("  {line}");
    }
    cluster.down();
    println!("Cluster torn down.");
    Ok(())
}

async fn matrix(pods: &[Pod], protocol: Protocol) -> Vec<Vec<bool>> {
    let requests: Vec<ProbeRequest> = pods
        .iter()
        .flat_map(|from| {
            pods.iter().map(move |to| ProbeRequest {
                netns: from.netns.path(),
                target: SocketAddr::new(to.ip, PORT),
                protocol,
                timeout: Duration::from_secs(1),
            })
        })
        .collect();
    let outcomes = probe_many(&requests).await;
    outcomes
        .chunks(pods.len())
        .map(|row| row.iter().map(|o| o.is_connected()).collect())
        .collect()
}

fn print_table(title: &str, pods: &[Pod], table: &[Vec<bool>]) {
    println!("\nReachability, {title} (rows: from, columns: to):");
    let names: Vec<String> = pods
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    let width = names.iter().map(|n| n.len()).max().unwrap_or(4) + 3;
    print!("  {:width$}", "");
    for (i, _) in names.iter().enumerate() {
        print!(" {:>3}", i + 1);
    }
    println!();
    for (i, row) in table.iter().enumerate() {
        print!("  {:width$}", format!("{} {}", i + 1, names[i]));
        for ok in row {
            print!(" {:>3}", if *ok { "." } else { "X" });
        }
        println!();
    }
}
