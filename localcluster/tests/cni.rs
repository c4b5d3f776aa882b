//! The CNI plugin driven as a container runtime drives it, against a real agent: repeated
//! ADDs (runtimes retry after a timeout), ADDs that fail, and configurations of every CNI
//! version a runtime may write.

mod support;

use std::{net::IpAddr, path::Path, time::Duration};

use serde_json::{Value, json};
use support::{LiveStream, bin_dir, ping};
use weir_agent::dataplane::{PinLayout, open_pinned_map};
use weir_common::{endpoint::EndpointInfo, ip::IpKey};
use weir_localcluster::{ClusterOptions, LocalCluster, cluster::CniOutcome, netns::Netns};

/// One node without a controller: no policy, so ADD never waits for one, and pods made
/// here outside the cluster's own bookkeeping behave like any other.
async fn node() -> LocalCluster {
    assert!(
        nix::unistd::geteuid().is_root(),
        "end-to-end tests need root (network namespaces, eBPF); run `cargo xtask test` as root"
    );
    let mut opts = ClusterOptions::new(bin_dir());
    opts.controller = false;
    LocalCluster::up(opts).await.expect("cluster up")
}

/// A pod sandbox as the runtime sees it: its namespace and container id.
struct Sandbox {
    netns: Netns,
    container_id: String,
    name: String,
}

impl Sandbox {
    fn new(c: &mut LocalCluster, name: &str) -> Self {
        let netns = c.create_netns(name).expect("pod namespace");
        Sandbox {
            netns,
            container_id: format!("{}-{name}", c.run_id()),
            name: name.to_owned(),
        }
    }

    /// Runs `command` for this sandbox with the node's configuration in `cni_version`.
    async fn cni(&self, c: &LocalCluster, command: &str, cni_version: &str) -> CniOutcome {
        self.cni_with(c, command, cni_version, None).await
    }

    async fn cni_with(
        &self,
        c: &LocalCluster,
        command: &str,
        cni_version: &str,
        prev_result: Option<&Value>,
    ) -> CniOutcome {
        let mut config = c.cni_config(0);
        config["cniVersion"] = json!(cni_version);
        if let Some(prev) = prev_result {
            config["prevResult"] = prev.clone();
        }
        c.cni_with_config(
            0,
            command,
            &self.container_id,
            Some(&self.netns.path()),
            Some(("default", &self.name)),
            config,
        )
        .await
        .expect("running weir-cni")
    }

    /// ADD in `cni_version`; the result, asserted successful.
    async fn add(&self, c: &LocalCluster, cni_version: &str) -> Value {
        let out = self.cni(c, "ADD", cni_version).await;
        assert!(out.success, "ADD: {}{}", out.stdout, out.stderr);
        out.json()
    }

    /// The host end of this sandbox's veth on the node.
    fn host_ifname(&self) -> String {
        weir_agent::podnet::host_ifname(&self.container_id, "eth0")
    }
}

fn address(result: &Value) -> IpAddr {
    result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {result}"))
}

/// The node's `ENDPOINTS` entry for `ip`, read from the agent's pinned map.
fn endpoint_entry(c: &LocalCluster, ip: IpAddr) -> Option<EndpointInfo> {
    let pins = PinLayout::new(Path::new("/sys/fs/bpf"), &c.nodes()[0].name);
    let data = open_pinned_map(&pins, weir_common::maps::ENDPOINTS).expect("pinned ENDPOINTS");
    let map: aya::maps::HashMap<_, IpKey, EndpointInfo> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).expect("ENDPOINTS map");
    map.get(&IpKey::from(ip), 0).ok()
}

/// Asserts the node holds nothing of `sandbox`: no interface, no endpoint record, no
/// address allocation, no `ENDPOINTS` entry for `ip`.
fn assert_nothing_left(c: &LocalCluster, sandbox: &Sandbox, ip: IpAddr) {
    let node = &c.nodes()[0];
    assert!(
        node.netns
            .ip(&["link", "show", &sandbox.host_ifname()])
            .is_err(),
        "the host end {} is still there",
        sandbox.host_ifname()
    );
    for state in ["state/endpoints.json", "state/ipam/allocations.json"] {
        let text = std::fs::read_to_string(node.dir.join(state)).unwrap_or_default();
        assert!(
            !text.contains(&sandbox.container_id),
            "{state} still names {}:\n{text}",
            sandbox.container_id
        );
    }
    assert!(endpoint_entry(c, ip).is_none(), "ENDPOINTS still has {ip}");
}

/// Gives the name eth0 in `netns` to another interface (a veth pair kept inside it), so the
/// agent cannot create the pod's end there.
fn take_eth0(netns: &Netns) {
    netns
        .ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "squatter",
        ])
        .expect("taking the name eth0");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_add_answers_as_the_first_and_the_pod_keeps_working() {
    let mut c = node().await;
    let peer = Sandbox::new(&mut c, "peer");
    let peer_ip = address(&peer.add(&c, "1.0.0").await);
    let pod = Sandbox::new(&mut c, "retried");
    let first = pod.add(&c, "1.0.0").await;
    let ip = address(&first);

    let stream = LiveStream::start(&peer.netns, &pod.netns, ip, 8080);
    stream
        .assert_flowing("before the repeat", Duration::from_millis(300))
        .await;
    for attempt in 1..=2 {
        let again = pod.add(&c, "1.0.0").await;
        assert_eq!(again, first, "repeat {attempt} answers as the first ADD");
        stream
            .assert_flowing(
                &format!("after repeat {attempt}"),
                Duration::from_millis(300),
            )
            .await;
    }
    stream.stop();
    assert!(ping(&peer.netns, ip), "peer pings the pod");
    assert!(ping(&pod.netns, peer_ip), "the pod pings its peer");

    // The runtime's record of the (first) ADD still describes the pod.
    let check = pod.cni_with(&c, "CHECK", "1.0.0", Some(&first)).await;
    assert!(check.success, "CHECK: {}", check.stdout);
    let del = pod.cni(&c, "DEL", "1.0.0").await;
    assert!(del.success, "DEL: {}", del.stdout);
    assert_nothing_left(&c, &pod, ip);
    assert!(!ping(&peer.netns, ip), "the pod is gone after DEL");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_add_after_the_pod_lost_its_interface_builds_it_anew() {
    let mut c = node().await;
    let peer = Sandbox::new(&mut c, "peer");
    peer.add(&c, "1.0.0").await;
    let pod = Sandbox::new(&mut c, "rebuilt");
    let first = pod.add(&c, "1.0.0").await;
    // Deleting one end deletes the pair: the links the agent pinned on the host end are
    // severed.
    pod.netns
        .ip(&["link", "del", "eth0"])
        .expect("deleting eth0");
    assert!(!ping(&peer.netns, address(&first)));

    let again = pod.add(&c, "1.0.0").await;
    let ip = address(&again);
    assert!(ping(&peer.netns, ip), "peer pings the rebuilt pod");
    let check = pod.cni_with(&c, "CHECK", "1.0.0", Some(&again)).await;
    assert!(check.success, "CHECK: {}", check.stdout);
    assert!(
        endpoint_entry(&c, ip).is_some(),
        "ENDPOINTS has the pod's address"
    );
    // And the rebuilt pod survives a retry too.
    assert_eq!(pod.add(&c, "1.0.0").await, again);
    assert!(ping(&peer.netns, ip));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_add_leaves_nothing_behind_and_the_next_add_succeeds() {
    let mut c = node().await;
    let peer = Sandbox::new(&mut c, "peer");
    peer.add(&c, "1.0.0").await;
    let pod = Sandbox::new(&mut c, "failing");
    let first = pod.add(&c, "1.0.0").await;
    let ip = address(&first);

    // Something else took the name eth0 in the pod: the veth cannot be built there, so the
    // repeated ADD fails, after the broken attachment was taken down.
    pod.netns
        .ip(&["link", "del", "eth0"])
        .expect("deleting eth0");
    take_eth0(&pod.netns);
    let failed = pod.cni(&c, "ADD", "1.0.0").await;
    assert!(!failed.success, "ADD succeeded: {}", failed.stdout);
    assert!(
        failed.json()["code"].as_u64().is_some(),
        "not a CNI error: {}",
        failed.stdout
    );
    assert_nothing_left(&c, &pod, ip);
    // A first ADD that fails leaves nothing either.
    let fresh = Sandbox::new(&mut c, "fresh");
    take_eth0(&fresh.netns);
    let failed = fresh.cni(&c, "ADD", "1.0.0").await;
    assert!(!failed.success, "ADD succeeded: {}", failed.stdout);
    assert_nothing_left(&c, &fresh, ip);

    // The runtime's DEL after a failed ADD succeeds; once the conflict is gone, ADD works.
    let del = pod.cni(&c, "DEL", "1.0.0").await;
    assert!(del.success, "DEL: {}", del.stdout);
    pod.netns
        .ip(&["link", "del", "eth0"])
        .expect("deleting the squatter");
    let ip = address(&pod.add(&c, "1.0.0").await);
    assert!(ping(&peer.netns, ip), "peer pings the pod");
    assert!(endpoint_entry(&c, ip).is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn each_configuration_version_gets_its_own_result_shape_and_verbs() {
    let mut c = node().await;
    let mut pods = Vec::new();
    for version in ["0.4.0", "1.0.0", "1.1.0"] {
        let pod = Sandbox::new(&mut c, &format!("v{}", version.replace('.', "")));
        let result = pod.add(&c, version).await;
        assert_eq!(result["cniVersion"], version, "{result}");
        assert_eq!(result["interfaces"][1]["name"], "eth0", "{result}");
        assert_eq!(result["ips"][0]["interface"], 1, "{result}");
        assert_eq!(result["ips"][0]["gateway"], "169.254.1.1", "{result}");
        // 0.4.0 names the address family in `ips`; 1.0.0 dropped the field.
        match version {
            "0.4.0" => assert_eq!(result["ips"][0]["version"], "4", "{result}"),
            _ => assert!(result["ips"][0].get("version").is_none(), "{result}"),
        }
        // The interface MTU is a 1.1.0 field.
        assert_eq!(
            result["interfaces"][1].get("mtu").is_some(),
            version == "1.1.0",
            "{result}"
        );
        let check = pod.cni_with(&c, "CHECK", version, Some(&result)).await;
        assert!(check.success, "CHECK in {version}: {}", check.stdout);
        pods.push((pod, address(&result)));
    }
    let (first, _) = &pods[0];
    for (pod, ip) in &pods[1..] {
        assert!(
            ping(&first.netns, *ip),
            "{} reaches {}",
            first.name,
            pod.name
        );
    }

    // STATUS and GC do not exist before 1.1.0: refused as incompatible, and a GC that lists
    // nothing valid removes nothing.
    for command in ["STATUS", "GC"] {
        let out = c
            .cni_with_config(0, command, "", None, None, {
                let mut config = c.cni_config(0);
                config["cniVersion"] = json!("1.0.0");
                config
            })
            .await
            .unwrap();
        assert!(!out.success, "{command} in 1.0.0 succeeded");
        assert_eq!(out.json()["code"], 1, "{command}: {}", out.stdout);
        assert_eq!(
            out.json()["cniVersion"],
            "1.0.0",
            "{command}: {}",
            out.stdout
        );
    }
    for (pod, ip) in &pods[1..] {
        assert!(ping(&first.netns, *ip), "{} survived GC", pod.name);
    }
    // In 1.1.0 STATUS answers.
    let status = c.cni(0, "STATUS", "", None, None).await.unwrap();
    assert!(status.success, "STATUS in 1.1.0: {}", status.stdout);

    for (pod, ip) in &pods {
        let version = match pod.name.as_str() {
            "v040" => "0.4.0",
            "v100" => "1.0.0",
            _ => "1.1.0",
        };
        let del = pod.cni(&c, "DEL", version).await;
        assert!(del.success, "DEL in {version}: {}", del.stdout);
        assert_nothing_left(&c, pod, *ip);
    }
}
