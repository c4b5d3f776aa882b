//! Pods as real containers (`--runtime containerd`): each node runs its own containerd, and
//! pods are started through its CRI plugin as kubelet starts them, so the plugin is called by
//! containerd itself (ADD on RunPodSandbox, DEL on StopPodSandbox). Container stop, kill -9
//! of the app container and of the sandbox, and a containerd restart must leave the pod's
//! network as it is, and removing the pods must leave nothing behind.

mod support;

use std::{
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::json;
use support::{bin_dir, pod, probe};
use weir_agent::dataplane::{PinLayout, open_pinned_map};
use weir_common::{endpoint::EndpointInfo, ip::IpKey};
use weir_conformance::{Protocol, probe::Servers};
use weir_localcluster::{ClusterOptions, LocalCluster, Pod, Runtime};

async fn cluster() -> LocalCluster {
    assert!(
        nix::unistd::geteuid().is_root(),
        "end-to-end tests need root (network namespaces, eBPF, containerd); run `cargo xtask test` as root"
    );
    let mut opts = ClusterOptions::new(bin_dir());
    opts.runtime = Runtime::Containerd;
    LocalCluster::up(opts).await.expect("cluster up")
}

fn endpoint_entry(c: &LocalCluster, ip: IpAddr) -> Option<EndpointInfo> {
    let pins = PinLayout::new(Path::new("/sys/fs/bpf"), &c.nodes()[0].name);
    let data = open_pinned_map(&pins, weir_common::maps::ENDPOINTS).expect("pinned ENDPOINTS");
    let map: aya::maps::HashMap<_, IpKey, EndpointInfo> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).expect("ENDPOINTS map");
    map.get(&IpKey::from(ip), 0).ok()
}

fn is_mount_point(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&path.display().to_string()))
}

/// Asserts the node holds nothing of a removed pod: no host veth, no endpoint record, no
/// address allocation, no `ENDPOINTS` entry, no network namespace mount.
fn assert_nothing_left(c: &LocalCluster, pod: &Pod, netns: &Path) {
    let node = &c.nodes()[0];
    let host_if = weir_agent::podnet::host_ifname(&pod.container_id, "eth0");
    assert!(
        node.netns.ip(&["link", "show", &host_if]).is_err(),
        "{}: the host end {host_if} is still there",
        pod.name
    );
    for state in ["state/endpoints.json", "state/ipam/allocations.json"] {
        let text = std::fs::read_to_string(node.dir.join(state)).unwrap_or_default();
        assert!(
            !text.contains(&pod.container_id),
            "{}: {state} still names {}:\n{text}",
            pod.name,
            pod.container_id
        );
    }
    let allocations: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(node.dir.join("state/ipam/allocations.json"))
            .expect("the IPAM state"),
    )
    .expect("IPAM state is JSON");
    let ip = format!("\"{}\"", pod.ip);
    assert!(
        !allocations["allocations"].to_string().contains(&ip),
        "{}: {} is still allocated: {allocations}",
        pod.name,
        pod.ip
    );
    assert!(
        endpoint_entry(c, pod.ip).is_none(),
        "{}: ENDPOINTS still has {}",
        pod.name,
        pod.ip
    );
    assert!(
        !is_mount_point(netns),
        "{}: its network namespace {} is still mounted",
        pod.name,
        netns.display()
    );
}

async fn tcp(from: &Pod, to: &Pod) -> bool {
    probe(&from.netns, to.ip, 80, Protocol::Tcp)
        .await
        .is_connected()
}

fn netns_inode(path: impl AsRef<Path>) -> u64 {
    std::fs::metadata(path.as_ref())
        .unwrap_or_else(|e| panic!("{}: {e}", path.as_ref().display()))
        .ino()
}

fn sigkill(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL");
}

/// Waits until `f` holds, or fails with `what`.
async fn eventually<F: AsyncFnMut() -> bool>(what: &str, mut f: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn container_pods_keep_their_network_through_kills_and_restarts_and_leave_nothing() {
    let mut c = cluster().await;
    let a = pod(&mut c, "default", "a", 0).await;
    let b = pod(&mut c, "default", "b", 0).await;
    let mut cri = c.cri(0).await.expect("CRI");

    // The pod's namespace is the one its containers run in, made by containerd.
    let app = b.app_container.clone().expect("an app container");
    let app_pid = cri
        .container_pid(&app)
        .await
        .expect("container status")
        .expect("a running app container");
    assert_eq!(
        netns_inode(format!("/proc/{app_pid}/ns/net")),
        netns_inode(b.netns.path()),
        "the app container runs in the pod's network namespace"
    );
    assert!(
        !b.netns.path().starts_with("/run/netns"),
        "containerd keeps the pod's namespace under its own state directory, not {}",
        b.netns.path().display()
    );

    let _servers = Servers::start(&b.netns.path(), &[80], &[Protocol::Tcp]).expect("servers");
    assert!(tcp(&a, &b).await, "a reaches b");

    // The plugin got the pod's name from containerd: a policy selecting b by label isolates it.
    c.apply_object(&json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "lock-b", "namespace": "default"},
        "spec": {"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"]},
    }))
    .expect("policy");
    c.sync().await.expect("sync");
    assert!(!tcp(&a, &b).await, "the policy selecting b isolates it");
    c.delete_object("NetworkPolicy", Some("default"), "lock-b")
        .expect("delete policy");
    c.sync().await.expect("sync");
    assert!(tcp(&a, &b).await, "a reaches b again");

    // containerd restarts while the pods run: they keep their network, and CRI still
    // knows them afterwards.
    c.restart_containerd(0).await.expect("containerd restart");
    assert!(tcp(&a, &b).await, "a reaches b after a containerd restart");
    let mut cri = c.cri(0).await.expect("CRI after the restart");
    let status = cri.sandbox_status(&b.container_id).await.expect("status");
    assert!(status.ready, "b's sandbox is ready after the restart");
    assert_eq!(status.ip, Some(b.ip), "b keeps its address");

    // kill -9 of the app container: the sandbox holds the network.
    sigkill(app_pid);
    eventually("the killed app container is reported exited", async || {
        cri.containers(&b.container_id)
            .await
            .is_ok_and(|cs| cs.iter().all(|(_, running)| !running))
    })
    .await;
    assert!(
        tcp(&a, &b).await,
        "b is reachable with its app container dead"
    );

    // A stopped app container, the same.
    let a_app = a.app_container.clone().expect("an app container");
    cri.stop_container(&a_app).await.expect("StopContainer");
    assert!(
        tcp(&a, &b).await,
        "a still reaches b with its app container stopped"
    );

    // kill -9 of b's sandbox process: the pod is dead (kubelet would recreate it), but
    // its namespace stays until the sandbox is stopped, and removing it cleans up.
    let sandbox_pid = status.pid.expect("sandbox pid");
    sigkill(sandbox_pid);
    eventually("the killed sandbox is reported not ready", async || {
        cri.sandbox_status(&b.container_id)
            .await
            .is_ok_and(|s| !s.ready)
    })
    .await;

    for p in [&a, &b] {
        let netns: PathBuf = p.netns.path();
        c.remove_pod(&p.namespace, &p.name)
            .await
            .unwrap_or_else(|e| panic!("removing {}: {e:#}", p.name));
        assert_nothing_left(&c, p, &netns);
    }
    assert!(
        cri.sandboxes().await.expect("sandboxes").is_empty(),
        "containerd has no sandbox left"
    );

    // Teardown stops containerd and its shims and leaves no mount under the run.
    let dir = c.dir().to_path_buf();
    let containerd_pid = c.nodes()[0].containerd_pid().expect("containerd running");
    c.down();
    assert!(
        !Path::new(&format!("/proc/{containerd_pid}")).exists(),
        "containerd is stopped"
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    assert!(
        !mounts.contains(&dir.display().to_string()),
        "nothing stays mounted under {}",
        dir.display()
    );
    assert!(!dir.exists(), "the run directory is removed");
}

#[tokio::test(flavor = "multi_thread")]
async fn teardown_with_running_container_pods_leaves_no_shim_or_mount() {
    let mut c = cluster().await;
    let a = pod(&mut c, "default", "a", 0).await;
    let host_if = weir_agent::podnet::host_ifname(&a.container_id, "eth0");
    let node_netns = c.nodes()[0].netns.clone();
    assert!(node_netns.ip(&["link", "show", &host_if]).is_ok());
    let socket = c.nodes()[0].containerd_socket();
    let dir = c.dir().to_path_buf();
    let shims_before = shims_of(&socket);
    assert!(!shims_before.is_empty(), "a shim runs the pod");
    c.down();
    assert!(
        shims_of(&socket).is_empty(),
        "no shim of this containerd is left"
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    assert!(
        !mounts.contains(&dir.display().to_string()),
        "nothing stays mounted under {}",
        dir.display()
    );
}

/// PIDs of the shims started for the containerd on `socket`.
fn shims_of(socket: &Path) -> Vec<u32> {
    let address = socket.display().to_string();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            (args.first()?.ends_with(b"containerd-shim-runc-v2")
                && args
                    .windows(2)
                    .any(|w| w[0] == b"-address" && w[1] == address.as_bytes()))
            .then_some(pid)
        })
        .collect()
}
