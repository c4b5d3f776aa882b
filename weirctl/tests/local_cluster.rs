//! weirctl against a local cluster (real agents, real packets; needs root): status healthy and
//! unhealthy, flows with filters and --follow, traces that agree with real probes on every
//! pair, and the policy listing.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::json;
use weir_conformance::{
    Protocol,
    probe::{self, Servers},
};
use weir_localcluster::{ClusterOptions, LocalCluster, PodSpec, Topology};

fn bin_dir() -> PathBuf {
    let dir = std::env::var_os("WEIR_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    assert!(
        dir.join("weir-agent").exists() && dir.join("weir-cni").exists(),
        "weir binaries not found in {}: run the tests through `cargo xtask test`",
        dir.display()
    );
    dir
}

/// Runs weirctl on the cluster: exit code, stdout, stderr.
fn weirctl(c: &LocalCluster, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_weirctl"))
        .arg("--run")
        .arg(c.dir())
        .args(args)
        .output()
        .expect("weirctl runs");
    // Shown with --nocapture: the examples in docs/operations.md come from here.
    println!(
        "$ weirctl {}\n{}{}(exit {:?})\n",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        out.status.code()
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn connects(c: &LocalCluster, from: &str, to: &str, port: u16, proto: Protocol) -> bool {
    let (fns, fname) = from.split_once('/').unwrap();
    let (tns, tname) = to.split_once('/').unwrap();
    let from = c.pod(fns, fname).unwrap();
    let to = c.pod(tns, tname).unwrap();
    probe::probe(
        &from.netns.path(),
        SocketAddr::new(to.ip, port),
        proto,
        Duration::from_secs(2),
    )
    .await
    .is_connected()
}

#[tokio::test(flavor = "multi_thread")]
async fn status_flows_trace_and_policy_on_a_local_cluster() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "end-to-end tests need root (network namespaces, eBPF)"
    );
    let mut opts = ClusterOptions::new(bin_dir());
    opts.nodes = 2;
    opts.topology = Topology::L2;
    let mut c = LocalCluster::up(opts).await.expect("cluster up");
    let pods = [
        ("default", "a", 0, "client"),
        ("default", "b", 1, "web"),
        ("other", "c", 0, "web"),
    ];
    let mut servers = Vec::new();
    for (ns, name, node, role) in pods {
        let pod = c
            .add_pod(PodSpec {
                namespace: ns.into(),
                name: name.into(),
                node,
                labels: BTreeMap::from([
                    ("pod".to_string(), name.to_string()),
                    ("role".to_string(), role.to_string()),
                ]),
                ports: vec![],
                host_ports: vec![],
            })
            .await
            .expect("pod created");
        servers.push(
            Servers::start(
                &pod.netns.path(),
                &[80, 81],
                &[Protocol::Tcp, Protocol::Udp],
            )
            .unwrap(),
        );
    }

    // Healthy: every agent ready and enforcing the published version.
    let (code, out, err) = weirctl(&c, &["status"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("healthy") && !out.contains("UNHEALTHY"),
        "{out}"
    );
    assert!(
        out.contains("controller controller: ready, leader"),
        "{out}"
    );
    let (code, out, _) = weirctl(&c, &["status", "-o", "json"]);
    assert_eq!(code, Some(0));
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["nodes"].as_array().unwrap().len(), 2);
    for n in status["nodes"].as_array().unwrap() {
        assert_eq!(n["ready"], true, "{n}");
        assert!(n["applied_version"].as_u64().unwrap() > 0, "{n}");
        assert_eq!(n["applied_version"], n["published_version"], "{n}");
    }

    // Web pods take TCP 80 from clients only; c may send nothing but DNS-like UDP 81 to
    // default.
    c.apply_object(&json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "web-from-clients", "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"role": "web"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "client"}}}],
                         "ports": [{"protocol": "TCP", "port": 80}]}],
        },
    }))
    .unwrap();
    c.apply_object(&json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "c-out", "namespace": "other"},
        "spec": {
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "default"}}}],
                        "ports": [{"protocol": "UDP", "port": 81}]}],
        },
    }))
    .unwrap();
    c.sync().await.unwrap();

    // Every ordered pair, two ports, two protocols: the trace's verdict is what packets do.
    let names = ["default/a", "default/b", "other/c"];
    let mut table = Vec::new();
    for from in names {
        for to in names {
            if from == to {
                continue;
            }
            for (proto, pname) in [(Protocol::Tcp, "tcp"), (Protocol::Udp, "udp")] {
                for port in [80u16, 81] {
                    let real = connects(&c, from, to, port, proto).await;
                    let (code, out, err) = weirctl(
                        &c,
                        &[
                            "trace",
                            "--from",
                            from,
                            "--to",
                            &format!("{to}:{port}"),
                            "--protocol",
                            pname,
                        ],
                    );
                    let traced = match code {
                        Some(0) => true,
                        Some(1) => false,
                        other => panic!("trace failed ({other:?}): {out}{err}"),
                    };
                    assert_eq!(
                        traced, real,
                        "{from} -> {to} {pname} {port}: probe {real}, trace says\n{out}{err}"
                    );
                    table.push((from, to, pname, port, real));
                }
            }
        }
    }
    assert!(
        table.iter().any(|r| r.4) && table.iter().any(|r| !r.4),
        "{table:?}"
    );

    // The trace names the deciding rule, on the node that holds it.
    let (code, out, _) = weirctl(
        &c,
        &["trace", "--from", "default/a", "--to", "default/b:80"],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("NetworkPolicy/default/web-from-clients ingress #0"),
        "{out}"
    );
    assert!(
        out.contains(&format!("ingress  on {}", c.nodes()[1].name)),
        "{out}"
    );
    assert!(out.contains("pinned maps"), "{out}");

    // Flows: the denied probes appear with pod names and the policy; filters narrow them.
    let (code, out, err) = weirctl(
        &c,
        &[
            "flows",
            "--verdict",
            "drop",
            "--to",
            "default/b",
            "-o",
            "json",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let flows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!flows.is_empty(), "no drops to default/b:\n{out}");
    for f in &flows {
        assert_eq!(f["dst_pod"], "default/b", "{f}");
        assert_eq!(f["verdict"], "drop", "{f}");
    }
    assert!(
        flows
            .iter()
            .any(|f| f["src_pod"] == "other/c" && f["reason"] == "policy_egress"),
        "c's egress drops towards b: {flows:#?}"
    );
    assert!(
        flows.iter().any(|f| f["reason"] == "policy_ingress"
            && f["policies"] == json!(["NetworkPolicy/default/web-from-clients"])),
        "{flows:#?}"
    );
    let (_, out, _) = weirctl(&c, &["flows", "--policy", "other/c-out"]);
    assert!(
        !out.is_empty() && out.lines().all(|l| l.contains("other/c")),
        "{out}"
    );
    let (_, out, _) = weirctl(&c, &["flows", "--from", "default/a", "--verdict", "drop"]);
    assert!(out.lines().all(|l| l.contains("default/a")), "{out}");
    let (_, out, _) = weirctl(&c, &["flows", "--aggregate", "--verdict", "drop"]);
    assert!(out.starts_with("FLOWS"), "{out}");
    assert!(out.contains("other/c"), "{out}");

    // --follow prints a drop that happens after it started.
    let mut follow = Command::new(env!("CARGO_BIN_EXE_weirctl"))
        .arg("--run")
        .arg(c.dir())
        .args([
            "flows",
            "--follow",
            "-o",
            "json",
            "--to",
            "default/a",
            "--port",
            "81",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Earlier drops to a:81 were printed at start; skip them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    while rx.try_recv().is_ok() {}
    // c may send only UDP 81: its TCP to a:81 is dropped on its egress.
    assert!(!connects(&c, "other/c", "default/a", 81, Protocol::Tcp).await);
    let c_ip = c.pod("other", "c").unwrap().ip.to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = None;
    while std::time::Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            let f: serde_json::Value = serde_json::from_str(&line).unwrap();
            if f["src"] == c_ip.as_str() {
                seen = Some(f);
                break;
            }
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let _ = reader.join();
    let seen = seen.expect("--follow printed the new drop");
    assert_eq!(seen["dst_pod"], "default/a");
    assert_eq!(seen["dport"], 81);
    assert_eq!(seen["reason"], "policy_egress");

    // Policy listing.
    let (code, out, err) = weirctl(&c, &["policy", "default/b"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("ingress: rule set"), "{out}");
    assert!(
        out.contains("NetworkPolicy/default/web-from-clients"),
        "{out}"
    );
    assert!(out.contains("egress: no policy selects it"), "{out}");
    assert!(out.contains("default/a ("), "the allowed peer named: {out}");

    // NodePorts: b behind one Service on every node's address (TCP 30080, UDP 30081) and one
    // with externalTrafficPolicy Local (TCP 30082, served by b's node only); b also takes
    // TCP 80 from the external range. From pods on either node, from the host outside and
    // from a node's own processes, to both nodes' addresses: the trace's verdict is what
    // packets do (b's node keeps the client's address, the other node forwards with its
    // own, which b's rules do not admit).
    for (name, ip, node_port, local) in [
        ("web", "10.96.0.80", 30080, false),
        ("web-local", "10.96.0.82", 30082, true),
    ] {
        let mut ports = vec![
            json!({"name": "tcp", "port": 80, "targetPort": 80, "protocol": "TCP", "nodePort": node_port}),
        ];
        if !local {
            ports.push(json!({"name": "udp", "port": 81, "targetPort": 81, "protocol": "UDP", "nodePort": 30081}));
        }
        c.apply_object(&json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "type": "NodePort",
                "clusterIP": ip,
                "externalTrafficPolicy": if local { "Local" } else { "Cluster" },
                "selector": {"pod": "b"},
                "ports": ports,
            },
        }))
        .unwrap();
    }
    let external = c.external().expect("the external host").clone();
    c.apply_object(&json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "b-from-outside", "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"pod": "b"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"ipBlock": {"cidr": format!("{}/32", external.ip)}}],
                         "ports": [{"protocol": "TCP", "port": 80}]}],
        },
    }))
    .unwrap();
    c.sync().await.unwrap();
    let node_ips: Vec<std::net::IpAddr> = c.nodes().iter().map(|n| n.ip.into()).collect();
    let mut clients = vec![
        (
            "default/a".to_string(),
            c.pod("default", "a").unwrap().netns.path(),
        ),
        (
            "other/c".to_string(),
            c.pod("other", "c").unwrap().netns.path(),
        ),
        (external.ip.to_string(), external.netns.path()),
    ];
    clients.push((node_ips[0].to_string(), c.nodes()[0].netns.path()));
    let mut table = Vec::new();
    for (from, netns) in &clients {
        for to in &node_ips {
            for (proto, pname, port) in [
                (Protocol::Tcp, "tcp", 30080u16),
                (Protocol::Udp, "udp", 30081),
                (Protocol::Tcp, "tcp", 30082),
            ] {
                let target = SocketAddr::new(*to, port);
                let probe_once = || probe::probe(netns, target, proto, Duration::from_secs(2));
                let (code, out, err) = weirctl(
                    &c,
                    &[
                        "trace",
                        "--from",
                        from,
                        "--to",
                        &target.to_string(),
                        "--protocol",
                        pname,
                    ],
                );
                let traced = match code {
                    Some(0) => true,
                    Some(1) => false,
                    other => panic!("trace failed ({other:?}): {out}{err}"),
                };
                assert!(
                    out.contains("(NodePort)"),
                    "{from} -> {target}: not translated\n{out}"
                );
                // A disagreement is probed again (a probe may time out under load).
                let mut real = probe_once().await.is_connected();
                for _ in 0..2 {
                    if real == traced {
                        break;
                    }
                    real = probe_once().await.is_connected();
                }
                assert_eq!(
                    traced, real,
                    "{from} -> {target} {pname}: probe {real}, trace says\n{out}{err}"
                );
                table.push((from.clone(), target, pname, real));
            }
        }
    }
    // Both verdicts occur, and the external host is admitted through b's node only.
    let (n1, n2) = (node_ips[0], node_ips[1]);
    let ext = external.ip.to_string();
    let verdict = |from: &str, to: std::net::IpAddr, port: u16| {
        table
            .iter()
            .find(|r| r.0 == from && r.1 == SocketAddr::new(to, port))
            .map(|r| r.3)
            .unwrap()
    };
    assert!(verdict(&ext, n2, 30080), "{table:?}");
    assert!(!verdict(&ext, n1, 30080), "{table:?}");
    assert!(verdict(&ext, n2, 30082), "{table:?}");
    assert!(!verdict(&ext, n1, 30082), "{table:?}");
    assert!(verdict("default/a", n1, 30080), "{table:?}");
    let (code, out, _) = weirctl(
        &c,
        &["trace", "--from", &ext, "--to", &format!("{n1}:30080")],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("source translated to {n1}")), "{out}");
    let (code, out, _) = weirctl(
        &c,
        &["trace", "--from", &ext, "--to", &format!("{n2}:30080")],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("NetworkPolicy/default/b-from-outside ingress #0"),
        "{out}"
    );

    // Unhealthy: an agent stopped.
    c.kill_agent(1);
    let (code, out, _) = weirctl(&c, &["status"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("UNHEALTHY"), "{out}");
    assert!(
        out.contains(&format!("{}: agent unreachable", c.nodes()[1].name)),
        "{out}"
    );
    // The other node still reports healthy by itself.
    assert!(
        !out.contains(&format!("{}: agent", c.nodes()[0].name)),
        "{out}"
    );
    // Its maps still enforce; the trace still reads them (without names from the agent).
    let (code, out, err) = weirctl(&c, &["trace", "--from", "other/c", "--to", "default/b:80"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("names unknown"), "{err}");
    drop(servers);
    c.down();
}
