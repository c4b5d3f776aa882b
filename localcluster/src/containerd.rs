//! `--runtime containerd`: every node runs its own containerd (Debian's 1.6 with runc) in
//! the node's network namespace, and pods are real containers started through its CRI
//! plugin, the way kubelet starts them: RunPodSandbox makes containerd create the pod's
//! network namespace and call the node's CNI plugin (ADD, with the `K8S_POD_*` arguments)
//! from the node's own `net.d`; StopPodSandbox calls DEL.
//!
//! Everything a node's containerd keeps is under `<node dir>/containerd/` (root, state,
//! socket, runc root, the pods' network namespace mounts and logs). containerd 1.6 keeps its
//! shims' sockets in `/run/containerd/s/` whatever the configuration; they go away with the
//! shims, which exit when their pod sandbox is removed. [`cleanup`] removes what a crashed
//! run left: sandboxes through CRI while the daemon answers, then the daemon (by its recorded
//! PID), the shims started for its socket and every mount under the run directory.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::oci::{self, ImageConfig, ImageRef, Layer};

/// The generated CRI (`runtime.v1`) messages and clients.
#[allow(clippy::all, clippy::pedantic)]
pub mod cri {
    tonic::include_proto!("runtime.v1");
}

use cri::{image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient};

/// The image every pod runs (sandbox and app container): a static busybox.
pub const POD_IMAGE: &str = "localhost/weir-local-pod:1";
/// The containerd namespace the CRI plugin uses.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The app container's command: sleeps until the pod is removed.
pub const APP_COMMAND: [&str; 2] = ["/bin/sleep", "2147483647"];
/// The reference loopback plugin (Debian's containernetworking-plugins), which containerd's
/// CRI runs for every pod besides the configured network.
pub const LOOPBACK_PLUGIN: &str = "/usr/lib/cni/loopback";
/// containerd 1.6 creates its shims' socket directory here whatever its configuration.
pub const SHIM_SOCKET_DIR: &str = "/run/containerd/s";
const BUSYBOX_CANDIDATES: [&str; 2] = ["/bin/busybox", "/usr/bin/busybox"];
const APPLETS: [&str; 6] = ["sh", "sleep", "cat", "ls", "kill", "true"];

/// Which runtime creates pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Runtime {
    /// The cluster calls the CNI plugin itself and a pod is a bare network namespace.
    #[default]
    Direct,
    /// Each node runs containerd; pods are containers started through its CRI plugin.
    Containerd,
}

impl std::fmt::Display for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Runtime::Direct => "direct",
            Runtime::Containerd => "containerd",
        })
    }
}

impl std::str::FromStr for Runtime {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "direct" => Ok(Runtime::Direct),
            "containerd" => Ok(Runtime::Containerd),
            other => Err(format!("unknown runtime {other:?} (direct or containerd)")),
        }
    }
}

/// The programs a private containerd runs.
pub const DAEMON_TOOLS: [&str; 4] = ["containerd", "ctr", "runc", "containerd-shim-runc-v2"];

/// Whether `tool` is an executable file in a directory of `PATH`.
pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

/// Checks the machine has what `--runtime containerd` runs.
pub fn check_tools() -> Result<()> {
    if !Path::new(LOOPBACK_PLUGIN).is_file() {
        bail!(
            "--runtime containerd needs {LOOPBACK_PLUGIN} (Debian: apt-get install \
             containernetworking-plugins, or `cargo xtask setup`)"
        );
    }
    for tool in DAEMON_TOOLS {
        if !on_path(tool) {
            bail!(
                "--runtime containerd needs {tool} (Debian: apt-get install containerd runc \
                 containernetworking-plugins busybox-static, or `cargo xtask setup`)"
            );
        }
    }
    Ok(())
}

/// A statically linked busybox on this machine (Debian's busybox-static): the pod image's
/// programs, and the shell of weir's own image.
pub fn static_busybox() -> Result<PathBuf> {
    for candidate in BUSYBOX_CANDIDATES {
        let Ok(bytes) = fs::read(candidate) else {
            continue;
        };
        if crate::elf::is_static(&bytes) {
            return Ok(PathBuf::from(candidate));
        }
    }
    bail!("no static busybox found; install it: apt-get install busybox-static")
}

/// Writes the pod image archive (static busybox, `sleep` as its command) to `path`.
pub fn write_pod_image(path: &Path) -> Result<()> {
    let busybox = static_busybox()?;
    let mut layer = Layer::default();
    layer.add_file("/bin/busybox", 0o755, fs::read(&busybox)?)?;
    for applet in APPLETS {
        layer.add_symlink(&format!("/bin/{applet}"), "busybox")?;
    }
    let config = ImageConfig {
        architecture: match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        }
        .to_string(),
        env: vec!["PATH=/bin".into()],
        cmd: APP_COMMAND.iter().map(|s| s.to_string()).collect(),
        labels: BTreeMap::new(),
        created: 0,
        created_by: "weir local cluster pod image".into(),
    };
    let image = ImageRef::parse(POD_IMAGE)?;
    let layer_tar = layer.to_tar(config.created)?;
    weir_persist::replace_with(path, 0o644, |out| {
        oci::write_archive(out, &image, &layer_tar, &config).map_err(std::io::Error::other)
    })
    .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The plugins no containerd of weir's uses: snapshotters that need kernel modules or
/// special file systems (every daemon uses `native`, which leaves no mounts), and tracing.
const UNUSED_PLUGINS: [&str; 6] = [
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
];

/// The part of a private containerd's configuration every use shares: root, state, socket
/// ([`socket_path`]) and `opt` all under `dir`, no debug or metrics listener, and the
/// [`UNUSED_PLUGINS`] plus `also_disabled` turned off. Used by the local cluster's nodes
/// (which add the CRI plugin's section) and by `cargo xtask image --verify` (which disables
/// the CRI plugin).
pub fn daemon_config_toml(dir: &Path, also_disabled: &[&str]) -> String {
    let disabled: String = also_disabled
        .iter()
        .chain(&UNUSED_PLUGINS)
        .map(|plugin| format!("  \"{plugin}\",\n"))
        .collect();
    let socket = socket_path(dir);
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
{disabled}]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        socket = socket.display(),
        opt = dir.join("opt").display(),
    )
}

/// The containerd configuration of one node: [`daemon_config_toml`] and the CRI plugin,
/// which runs the node's CNI configuration and plugins for every pod sandbox.
pub fn config_toml(dir: &Path, cni_bin_dir: &Path, cni_conf_dir: &Path) -> String {
    let cri = format!(
        r#"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{image}"
  netns_mounts_under_state_dir = true
  # No lower OOM score than containerd's own: some machines refuse negative ones, which
  # the sandbox would otherwise get (-998).
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{runc}"
"#,
        image = POD_IMAGE,
        cni_bin = cni_bin_dir.display(),
        cni_conf = cni_conf_dir.display(),
        runc = dir.join("runc").display(),
    );
    daemon_config_toml(dir, &[]) + &cri
}

/// The daemon's socket under its directory.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("containerd.sock")
}

/// `ctr` against the daemon at `socket`, in the CRI namespace.
pub fn ctr(socket: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(socket)
        .args(["--namespace", CRI_NAMESPACE])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running ctr {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ctr {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A CRI connection to one containerd.
#[derive(Clone)]
pub struct Cri {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

impl Cri {
    /// Connects to the CRI endpoint on `socket` (a unix socket).
    pub async fn connect(socket: &Path) -> Result<Self> {
        let path = socket.to_path_buf();
        // The URI is required by the API and ignored by the connector.
        let channel = Endpoint::try_from("http://[::1]:50051")?
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await
            .with_context(|| format!("connecting to CRI on {}", socket.display()))?;
        Ok(Self {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    /// The runtime's name and version (`containerd`, `v1.6.20`).
    pub async fn version(&mut self) -> Result<(String, String)> {
        let v = self
            .runtime
            .version(cri::VersionRequest::default())
            .await?
            .into_inner();
        Ok((v.runtime_name, v.runtime_version))
    }

    /// Is the runtime ready, with its network (the CNI configuration) ready too?
    pub async fn ready(&mut self) -> Result<bool> {
        let status = self
            .runtime
            .status(cri::StatusRequest { verbose: false })
            .await?
            .into_inner();
        Ok(status
            .status
            .is_some_and(|s| s.conditions.iter().all(|c| c.status)))
    }

    pub async fn image_present(&mut self, image: &str) -> Result<bool> {
        let r = self
            .images
            .image_status(cri::ImageStatusRequest {
                image: Some(cri::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await?
            .into_inner();
        Ok(r.image.is_some())
    }

    /// RunPodSandbox: containerd creates the network namespace and calls the CNI plugin.
    /// Returns the sandbox id.
    pub async fn run_pod_sandbox(&mut self, config: &cri::PodSandboxConfig) -> Result<String> {
        let r = self
            .runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await?
            .into_inner();
        Ok(r.pod_sandbox_id)
    }

    /// CreateContainer + StartContainer of `command` in the pod. Returns the container id.
    pub async fn start_container(
        &mut self,
        sandbox_id: &str,
        sandbox: &cri::PodSandboxConfig,
        name: &str,
        command: &[&str],
    ) -> Result<String> {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: POD_IMAGE.into(),
                ..Default::default()
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            ..Default::default()
        };
        let id = self
            .runtime
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: sandbox_id.into(),
                config: Some(config),
                sandbox_config: Some(sandbox.clone()),
            })
            .await?
            .into_inner()
            .container_id;
        self.runtime
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await?;
        Ok(id)
    }

    /// The sandbox's state, pod IP, and network namespace path (from the verbose info).
    pub async fn sandbox_status(&mut self, sandbox_id: &str) -> Result<SandboxStatus> {
        let r = self
            .runtime
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: sandbox_id.into(),
                verbose: true,
            })
            .await?
            .into_inner();
        let status = r.status.context("PodSandboxStatus without a status")?;
        let info: serde_json::Value = r
            .info
            .get("info")
            .and_then(|i| serde_json::from_str(i).ok())
            .unwrap_or_default();
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .and_then(|nss| {
                nss.iter()
                    .find(|ns| ns["type"] == "network")
                    .and_then(|ns| ns["path"].as_str())
            })
            .map(PathBuf::from);
        // The pod's first address, then the others (dual stack), as kubelet reads them.
        let ips: Vec<std::net::IpAddr> = status
            .network
            .map(|n| {
                std::iter::once(n.ip)
                    .chain(n.additional_ips.into_iter().map(|a| a.ip))
                    .filter_map(|ip| ip.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        Ok(SandboxStatus {
            ready: status.state == cri::PodSandboxState::SandboxReady as i32,
            ip: ips.first().copied(),
            ips,
            netns,
            pid: info["pid"].as_u64().map(|p| p as u32),
        })
    }

    /// The containers of a sandbox, as (id, running).
    pub async fn containers(&mut self, sandbox_id: &str) -> Result<Vec<(String, bool)>> {
        let r = self
            .runtime
            .list_containers(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter {
                    pod_sandbox_id: sandbox_id.into(),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner();
        Ok(r.containers
            .into_iter()
            .map(|c| {
                (
                    c.id,
                    c.state == cri::ContainerState::ContainerRunning as i32,
                )
            })
            .collect())
    }

    /// The main process of a container (from the verbose status).
    pub async fn container_pid(&mut self, container_id: &str) -> Result<Option<u32>> {
        let r = self
            .runtime
            .container_status(cri::ContainerStatusRequest {
                container_id: container_id.into(),
                verbose: true,
            })
            .await?
            .into_inner();
        let info: serde_json::Value = r
            .info
            .get("info")
            .and_then(|i| serde_json::from_str(i).ok())
            .unwrap_or_default();
        Ok(info["pid"].as_u64().filter(|p| *p > 0).map(|p| p as u32))
    }

    /// StopContainer with no grace period.
    pub async fn stop_container(&mut self, container_id: &str) -> Result<()> {
        self.runtime
            .stop_container(cri::StopContainerRequest {
                container_id: container_id.into(),
                timeout: 0,
            })
            .await?;
        Ok(())
    }

    /// StopPodSandbox (CNI DEL) then RemovePodSandbox.
    pub async fn remove_pod_sandbox(&mut self, sandbox_id: &str) -> Result<()> {
        self.runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: sandbox_id.into(),
            })
            .await
            .with_context(|| format!("StopPodSandbox {sandbox_id}"))?;
        self.runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: sandbox_id.into(),
            })
            .await
            .with_context(|| format!("RemovePodSandbox {sandbox_id}"))?;
        Ok(())
    }

    /// Every sandbox id the runtime knows.
    pub async fn sandboxes(&mut self) -> Result<Vec<String>> {
        let r = self
            .runtime
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await?
            .into_inner();
        Ok(r.items.into_iter().map(|s| s.id).collect())
    }
}

/// What [`Cri::sandbox_status`] reports.
#[derive(Clone, Debug)]
pub struct SandboxStatus {
    pub ready: bool,
    pub ip: Option<std::net::IpAddr>,
    /// All its addresses, `ip` first.
    pub ips: Vec<std::net::IpAddr>,
    pub netns: Option<PathBuf>,
    pub pid: Option<u32>,
}

/// The sandbox configuration kubelet would send for a pod.
pub fn sandbox_config(
    namespace: &str,
    name: &str,
    uid: &str,
    labels: &BTreeMap<String, String>,
    log_dir: &Path,
) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: namespace.into(),
            attempt: 0,
        }),
        hostname: name.chars().take(63).collect(),
        log_directory: log_dir.display().to_string(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .chain([
                ("io.kubernetes.pod.name".into(), name.into()),
                ("io.kubernetes.pod.namespace".into(), namespace.into()),
                ("io.kubernetes.pod.uid".into(), uid.into()),
            ])
            .collect(),
        linux: Some(cri::LinuxPodSandboxConfig::default()),
        ..Default::default()
    }
}

/// Runs `f` with a CRI client on its own thread and runtime: usable from synchronous
/// teardown, also when the caller is itself inside a tokio runtime.
pub fn blocking<T: Send + 'static>(
    socket: &Path,
    f: impl AsyncFnOnce(Cri) -> Result<T> + Send + 'static,
) -> Result<T> {
    let socket = socket.to_path_buf();
    std::thread::spawn(move || -> Result<T> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let cri = tokio::time::timeout(Duration::from_secs(5), Cri::connect(&socket))
                .await
                .context("CRI connect timed out")??;
            f(cri).await
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("CRI thread panicked"))?
}

/// Removes every pod sandbox of the containerd on `socket` (CNI DEL for each), if it answers.
pub fn remove_all_sandboxes(socket: &Path) -> Result<()> {
    if !socket.exists() {
        return Ok(());
    }
    blocking(socket, async |mut cri: Cri| {
        for id in cri.sandboxes().await? {
            let _ =
                tokio::time::timeout(Duration::from_secs(20), cri.remove_pod_sandbox(&id)).await;
        }
        Ok(())
    })
}

/// What a run's containerd may leave after its daemon is gone: its shims (found by the
/// daemon's socket on their command line, so only this daemon's), and mounts under `dir`.
pub fn cleanup_after_daemon(socket: &Path, dir: &Path) {
    let address = socket.display().to_string();
    if let Ok(procs) = fs::read_dir("/proc") {
        for p in procs.filter_map(|e| e.ok()) {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(cmdline) = fs::read(p.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let is_our_shim = args
                .first()
                .is_some_and(|a| a.ends_with(b"containerd-shim-runc-v2"))
                && args
                    .windows(2)
                    .any(|w| w[0] == b"-address" && w[1] == address.as_bytes());
            if is_our_shim {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    unmount_under(dir);
    // Both only if empty: another containerd on the machine keeps its own sockets there.
    let _ = fs::remove_dir(SHIM_SOCKET_DIR);
    let _ = fs::remove_dir("/run/containerd");
}

/// Unmounts (lazily) every mount point under `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut points: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir) && p != dir)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}
