//! `cargo xtask image --verify`: proves the archive is a working image with a real container
//! runtime, without touching any runtime the machine may already run.
//!
//! A private containerd runs with its root, state, socket, runc root and FIFO directory in a
//! temporary directory, with only the native snapshotter in use (no mounts left behind) and
//! the CRI plugin disabled (no CNI, no Kubernetes). Then:
//!
//! 1. `ctr images import` the archive, and check the image is listed under its full name;
//! 2. run `weir-controller --help`, `weir-agent --help` and `weir-cni` (`CNI_COMMAND=VERSION`)
//!    from it, and check what they print;
//! 3. run the agent DaemonSet's CNI-install init container as `manifests/` defines it (command,
//!    user, read-only root), with its hostPath volumes bound to temporary directories and its
//!    ConfigMap volume filled from the rendered ConfigMap, then check the installed plugin is
//!    the static `weir-cni` and runs on this host, and the conflist is the ConfigMap's;
//! 4. list the environment variables the manifests set that a binary's `--help` does not
//!    mention (settings a binary does not read yet).
//!
//! The daemon is stopped by its PID (SIGTERM, then SIGKILL) and the directory removed, also
//! when a step fails; a container that hangs is killed after a minute. containerd 1.6 keeps
//! shim sockets in `/run/containerd/s/` whatever the state directory; they are named by a hash
//! of the private socket path and removed when the shims exit (every container runs with
//! `--rm`), and the directories are removed again if this run created them.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Container};
use serde_json::Value;

use weir_localcluster::containerd::{self, SHIM_SOCKET_DIR};

use super::{BIN_DIR, BuiltImage};
use crate::manifests;

const NAMESPACE: &str = "weir-verify";
/// Longest a container of the checks may run.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Reads a child's pipe to the end on a thread of its own (so a full pipe never blocks it).
fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

pub fn run(built: &BuiltImage) -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "--verify runs containerd and runc: run it as root"
    );
    for tool in containerd::DAEMON_TOOLS {
        ensure!(
            containerd::on_path(tool),
            "--verify needs {tool} (Debian: apt-get install containerd runc)"
        );
    }
    let objects = manifests::render(&crate::workspace_root().join("manifests"))?;
    let dir = tempfile::Builder::new()
        .prefix("weir-image-verify-")
        .tempdir()
        .context("creating a temporary directory")?;
    println!(
        "Verifying {} with a private containerd in {}",
        built.path.display(),
        dir.path().display()
    );
    let daemon = Containerd::start(dir.path())?;
    let result = checks(&daemon, built, &objects);
    let stopped = daemon.stop();
    if result.is_err() {
        let log = std::fs::read_to_string(dir.path().join("containerd.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        eprintln!("containerd log (last lines):");
        for line in tail.iter().rev() {
            eprintln!("  {line}");
        }
    }
    result?;
    stopped?;
    println!("Image verified: imported, binaries run, CNI install works.");
    Ok(())
}

/// A containerd started by this process, stopped by PID.
struct Containerd {
    child: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
    next_id: std::cell::Cell<u32>,
    /// The shim socket directories this daemon created (removed again if left empty).
    created_dirs: Vec<PathBuf>,
}

impl Containerd {
    fn start(dir: &Path) -> Result<Containerd> {
        let socket = containerd::socket_path(dir);
        let config = dir.join("config.toml");
        std::fs::write(&config, config_toml(dir))?;
        let created_dirs = Path::new(SHIM_SOCKET_DIR)
            .ancestors()
            .filter(|dir| dir.starts_with("/run/") && !dir.exists())
            .map(Path::to_path_buf)
            .collect();
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        let daemon = Containerd {
            child: Some(child),
            dir: dir.to_owned(),
            socket,
            next_id: std::cell::Cell::new(0),
            created_dirs,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if daemon.ctr(&["version"]).is_ok_and(|o| o.status.success()) {
                return Ok(daemon);
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd did not answer on {} within 30 s",
                    daemon.socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn ctr(&self, args: &[&str]) -> Result<Output> {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running ctr {}", args.join(" ")))
    }

    /// Runs `command` in a new container of `image` and returns its output, whatever its
    /// exit status.
    fn run(&self, image: &str, options: &RunOptions, command: &[String]) -> Result<Output> {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let runc_root = self.dir.join("runc");
        let fifo = self.dir.join("fifo");
        let mut args: Vec<String> = vec![
            "run".into(),
            "--rm".into(),
            "--snapshotter".into(),
            "native".into(),
            "--runc-root".into(),
            runc_root.display().to_string(),
            "--fifo-dir".into(),
            fifo.display().to_string(),
            // No cgroup: nothing to clean up in the host's hierarchy.
            "--cgroup".into(),
            String::new(),
        ];
        if options.read_only {
            args.push("--read-only".into());
        }
        for capability in ctr_capabilities(&options.drop_capabilities) {
            args.push("--cap-drop".into());
            args.push(capability);
        }
        for (name, value) in &options.env {
            args.push("--env".into());
            args.push(format!("{name}={value}"));
        }
        for (host, container, read_only) in &options.mounts {
            args.push("--mount".into());
            args.push(format!(
                "type=bind,src={},dst={container},options=rbind:{}",
                host.display(),
                if *read_only { "ro" } else { "rw" }
            ));
        }
        let container = format!("weir-verify-{}-{id}", std::process::id());
        args.push(image.into());
        args.push(container.clone());
        args.extend(command.iter().cloned());
        let mut child = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE])
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running ctr run")?;
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        let deadline = Instant::now() + RUN_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                // Kill the container's task (not just ctr), so nothing outlives the check.
                let _ = self.ctr(&["tasks", "kill", "--signal", "SIGKILL", &container]);
                let _ = child.wait();
                bail!(
                    "{} in the image did not finish within {RUN_TIMEOUT:?}",
                    command.join(" ")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Ok(Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        })
    }

    fn stop(mut self) -> Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stopped = false;
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                stopped = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !stopped {
            child.kill().context("killing containerd")?;
            child.wait()?;
        }
        // Deepest first; remove_dir refuses a directory that is not empty.
        for dir in &self.created_dirs {
            let _ = std::fs::remove_dir(dir);
        }
        Ok(())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}

#[derive(Default)]
struct RunOptions {
    read_only: bool,
    /// Capabilities to drop (`ALL` for every one).
    drop_capabilities: Vec<String>,
    env: Vec<(String, String)>,
    /// (host path, container path, read-only)
    mounts: Vec<(PathBuf, String, bool)>,
}

/// The capabilities `ctr run` grants by default (containerd's `oci.defaultUnixCaps`), which
/// is what Kubernetes' `drop: [ALL]` removes.
const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Kubernetes capability names (`NET_ADMIN`, `ALL`) as `ctr run --cap-drop` takes them
/// (containerd 1.6 wants the `CAP_` prefix and knows no `ALL`).
fn ctr_capabilities(kubernetes: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for name in kubernetes {
        if name == "ALL" {
            out.extend(DEFAULT_CAPABILITIES.iter().map(|c| (*c).to_owned()));
        } else if name.starts_with("CAP_") {
            out.push(name.clone());
        } else {
            out.push(format!("CAP_{name}"));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// containerd's configuration: everything under `dir`, only what `ctr run` needs (the local
/// cluster's private daemon without its CRI plugin, so no CNI and no Kubernetes).
fn config_toml(dir: &Path) -> String {
    containerd::daemon_config_toml(dir, &["io.containerd.grpc.v1.cri"])
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn checks(daemon: &Containerd, built: &BuiltImage, objects: &[Value]) -> Result<()> {
    let image = built.image.full();
    let archive = built.path.display().to_string();
    let import = daemon.ctr(&["images", "import", "--snapshotter", "native", &archive])?;
    ensure!(
        import.status.success(),
        "ctr images import failed:\n{}",
        text(&import)
    );
    let listed = daemon.ctr(&["images", "ls", "--quiet"])?;
    ensure!(
        String::from_utf8_lossy(&listed.stdout)
            .lines()
            .any(|l| l.trim() == image),
        "the import did not create {image}; ctr images ls:\n{}",
        text(&listed)
    );
    println!("  ok  ctr images import: {image}");

    let mut help = BTreeMap::new();
    for (binary, expected) in [
        ("weir-controller", "weir controller"),
        ("weir-agent", "weir node agent"),
    ] {
        let output = daemon.run(
            &image,
            &RunOptions {
                read_only: true,
                ..RunOptions::default()
            },
            &[format!("{BIN_DIR}/{binary}"), "--help".into()],
        )?;
        let printed = text(&output);
        ensure!(
            output.status.success() && printed.contains(expected),
            "{binary} --help in the image failed ({}):\n{printed}",
            output.status
        );
        println!("  ok  {binary} --help runs in the image");
        help.insert(binary, printed);
    }

    // A plugin reads its configuration on stdin, and `ctr run` never closes the container's
    // stdin: the image's shell pipes it one.
    let version = daemon.run(
        &image,
        &RunOptions {
            read_only: true,
            env: vec![("CNI_COMMAND".into(), "VERSION".into())],
            ..RunOptions::default()
        },
        &[
            "/bin/sh".into(),
            "-c".into(),
            format!("echo '{{\"cniVersion\":\"1.1.0\"}}' | {BIN_DIR}/weir-cni"),
        ],
    )?;
    check_cni_version(&version.stdout).context("weir-cni VERSION in the image")?;
    println!("  ok  weir-cni answers VERSION in the image");

    install_cni(daemon, built, objects)?;

    for (workload, binary) in [
        ("weir-controller", "weir-controller"),
        ("weir-agent", "weir-agent"),
    ] {
        let unread = unread_env(objects, workload, &help[binary]);
        if unread.is_empty() {
            println!("  ok  {binary} reads every variable its manifest sets");
        } else {
            println!(
                "  note {binary} --help does not mention {} (set by manifests/, not read yet)",
                unread.join(", ")
            );
        }
    }
    Ok(())
}

fn check_cni_version(stdout: &[u8]) -> Result<()> {
    let answer: Value = serde_json::from_slice(stdout).with_context(|| {
        format!(
            "VERSION printed no JSON: {}",
            String::from_utf8_lossy(stdout)
        )
    })?;
    let versions = answer["supportedVersions"].as_array();
    ensure!(
        versions.is_some_and(|v| v.iter().any(|v| v == "1.1.0")),
        "VERSION does not list 1.1.0: {answer}"
    );
    Ok(())
}

/// The agent DaemonSet's init container, run as the manifests define it.
fn install_cni(daemon: &Containerd, built: &BuiltImage, objects: &[Value]) -> Result<()> {
    let daemon_set: DaemonSet = serde_json::from_value(
        manifests::find(objects, "DaemonSet", "weir-agent")
            .context("manifests/ has no DaemonSet weir-agent")?
            .clone(),
    )?;
    let pod = daemon_set
        .spec
        .and_then(|s| s.template.spec)
        .context("the DaemonSet has no pod spec")?;
    let init: &Container = pod
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "install-cni")
        .context("the DaemonSet has no install-cni init container")?;
    let host_root = daemon.dir.join("host");
    let security = init.security_context.clone().unwrap_or_default();
    // `ctr run` (containerd 1.6) cannot choose a user; the image's default is root, which is
    // what the init container asks for.
    ensure!(
        security.run_as_user.is_none_or(|uid| uid == 0),
        "install-cni runs as uid {:?}; the check can only run it as root",
        security.run_as_user
    );
    let mut options = RunOptions {
        read_only: security.read_only_root_filesystem.unwrap_or(false),
        drop_capabilities: security
            .capabilities
            .and_then(|c| c.drop)
            .unwrap_or_default(),
        ..RunOptions::default()
    };
    if options.drop_capabilities.iter().any(|c| c == "ALL") {
        // Proves the claim the manifest makes: no capability is needed to install the files.
        let status = daemon.run(
            &built.image.full(),
            &options,
            &["/bin/cat".into(), "/proc/self/status".into()],
        )?;
        let effective = String::from_utf8_lossy(&status.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_owned()))
            .unwrap_or_default();
        ensure!(
            effective.chars().all(|c| c == '0') && !effective.is_empty(),
            "dropping ALL capabilities left CapEff {effective:?}:\n{}",
            text(&status)
        );
    }
    for mount in init.volume_mounts.iter().flatten() {
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .with_context(|| format!("no volume {}", mount.name))?;
        let host = if let Some(host_path) = &volume.host_path {
            let dir = host_root.join(host_path.path.trim_start_matches('/'));
            std::fs::create_dir_all(&dir)?;
            dir
        } else if let Some(source) = &volume.config_map {
            let map = manifests::find(objects, "ConfigMap", &source.name)
                .with_context(|| format!("no ConfigMap {}", source.name))?;
            let dir = daemon.dir.join("configmaps").join(&source.name);
            std::fs::create_dir_all(&dir)?;
            for (key, value) in map["data"].as_object().into_iter().flatten() {
                std::fs::write(dir.join(key), value.as_str().unwrap_or_default())?;
            }
            dir
        } else {
            bail!(
                "volume {} of install-cni is neither hostPath nor ConfigMap",
                volume.name
            );
        };
        options.mounts.push((
            host,
            mount.mount_path.clone(),
            mount.read_only == Some(true),
        ));
    }
    let command: Vec<String> = init
        .command
        .iter()
        .flatten()
        .chain(init.args.iter().flatten())
        .cloned()
        .collect();
    let output = daemon.run(&built.image.full(), &options, &command)?;
    ensure!(
        output.status.success(),
        "the install-cni init container failed ({}):\n{}",
        output.status,
        text(&output)
    );

    let installed = host_root.join("opt/cni/bin/weir-cni");
    let installed_bytes = std::fs::read(&installed)
        .with_context(|| format!("install-cni wrote no {}", installed.display()))?;
    ensure!(
        installed_bytes == std::fs::read(&built.cni_binary)?,
        "the installed weir-cni differs from the static build {}",
        built.cni_binary.display()
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&installed)?.permissions());
    ensure!(
        mode & 0o777 == 0o755,
        "installed weir-cni has mode {mode:o}"
    );
    let conflist = std::fs::read_to_string(host_root.join("etc/cni/net.d/10-weir.conflist"))
        .context("install-cni wrote no 10-weir.conflist")?;
    let expected = manifests::find(objects, "ConfigMap", "weir-cni-config")
        .and_then(|m| m["data"]["10-weir.conflist"].as_str())
        .unwrap_or_default();
    ensure!(
        conflist == expected,
        "the installed conflist differs from the ConfigMap's"
    );
    for dir in ["opt/cni/bin", "etc/cni/net.d"] {
        let leftovers: Vec<String> = std::fs::read_dir(host_root.join(dir))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        ensure!(
            leftovers.is_empty(),
            "install-cni left {leftovers:?} in {dir}"
        );
    }
    println!(
        "  ok  install-cni (as in manifests/: read-only root, capabilities {:?}) installs \
         weir-cni and 10-weir.conflist",
        options.drop_capabilities
    );

    // The node's runtime execs the installed plugin directly: it must run outside any image.
    let host_run = Command::new(&installed)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .output()
        .with_context(|| format!("running {}", installed.display()))?;
    check_cni_version(&host_run.stdout).context("the installed weir-cni on this host")?;
    println!("  ok  the installed weir-cni runs on the host (static)");
    Ok(())
}

/// Environment variables the manifests give `workload`'s main container that its binary's
/// `--help` does not mention (clap lists every variable it reads as `[env: NAME=]`).
fn unread_env(objects: &[Value], workload: &str, help: &str) -> Vec<String> {
    let object = objects
        .iter()
        .find(|o| manifests::name_of(o) == workload && o.pointer("/spec/template").is_some());
    let containers = object
        .and_then(|o| o.pointer("/spec/template/spec/containers"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    containers
        .first()
        .and_then(|c| c["env"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .filter(|name| !help.contains(&format!("[env: {name}=")))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_private_containerd_keeps_everything_in_its_directory() {
        let dir = Path::new("/tmp/weir-image-verify-x");
        let config = config_toml(dir);
        for line in [
            "root = \"/tmp/weir-image-verify-x/root\"",
            "state = \"/tmp/weir-image-verify-x/state\"",
            "address = \"/tmp/weir-image-verify-x/containerd.sock\"",
            "address = \"/tmp/weir-image-verify-x/containerd.sock.ttrpc\"",
            "path = \"/tmp/weir-image-verify-x/opt\"",
            "\"io.containerd.grpc.v1.cri\",",
        ] {
            assert!(
                config.lines().any(|l| l.trim() == line),
                "{line} in\n{config}"
            );
        }
    }

    #[test]
    fn variables_missing_from_help_are_reported() {
        let objects = vec![serde_json::json!({
            "kind": "Deployment",
            "metadata": {"name": "weir-controller"},
            "spec": {"template": {"spec": {"containers": [{"env": [
                {"name": "WEIR_CLUSTER_CIDR"}, {"name": "POD_NAME"}
            ]}]}}}
        })];
        let help = "--cluster-cidr <CLUSTER_CIDR>  [env: WEIR_CLUSTER_CIDR=] [default: x]";
        assert_eq!(unread_env(&objects, "weir-controller", help), ["POD_NAME"]);
    }

    #[test]
    fn kubernetes_capability_names_become_ctr_names() {
        assert_eq!(
            ctr_capabilities(&["NET_ADMIN".into(), "CAP_BPF".into()]),
            ["CAP_BPF", "CAP_NET_ADMIN"]
        );
        let all = ctr_capabilities(&["ALL".into(), "CHOWN".into()]);
        assert_eq!(all.len(), DEFAULT_CAPABILITIES.len());
        assert!(all.iter().all(|c| c.starts_with("CAP_")));
    }

    #[test]
    fn cni_version_answers_must_list_1_1_0() {
        assert!(check_cni_version(br#"{"supportedVersions":["1.0.0","1.1.0"]}"#).is_ok());
        assert!(check_cni_version(br#"{"supportedVersions":["1.0.0"]}"#).is_err());
        assert!(check_cni_version(b"not json").is_err());
    }
}
