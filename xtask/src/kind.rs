//! `cargo xtask e2e-kind`: weir on a real Kubernetes cluster, for machines with Docker and
//! kind.
//!
//! 1. Checks that `docker info`, `kind` and `kubectl` work (and stops there, saying what is
//!    missing, if not), loads the case files, builds the image (`cargo xtask image`).
//! 2. Creates a kind cluster without its default CNI and without kube-proxy (weir proxies
//!    Services) (1 control-plane + 2 workers), whose pod subnet is weir's cluster CIDR from
//!    `manifests/` (`weir-config` `cluster-cidr`), with its kubeconfig in the work directory
//!    (the user's kubeconfig is not touched).
//! 3. `kind load image-archive`, then `kubectl apply -k` of an overlay of `manifests/` that
//!    sets the image and the API server's address (the control-plane node's, port 6443:
//!    nothing routes the `kubernetes` ClusterIP before weir runs), and waits for the agent
//!    DaemonSet, the controller Deployment and every node to be ready.
//! 4. Runs every case file through [`driver::KubeDriver`]: the model's namespaces and agnhost
//!    pods, policies applied and deleted through the API, probes by `agnhost connect` exec'd
//!    in the client pods.
//! 5. Deletes the cluster, unless `--keep`.

mod driver;

use std::{
    path::{Component, Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::json;
use weir_conformance::{CaseFile, RunOptions, runner};

use crate::{
    image::{self, ImageRef},
    manifests,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Reachability case files (weir-reachability/v1) to run in the cluster.
    #[arg(
        long = "cases",
        default_value = "conformance/cases/upstream-netpol.yaml"
    )]
    pub cases: Vec<PathBuf>,
    /// Name of the kind cluster (it must not exist yet).
    #[arg(long, default_value = "weir-e2e")]
    pub name: String,
    /// Image tag to build, load and install.
    #[arg(long, default_value = image::DEFAULT_TAG)]
    pub tag: String,
    /// Leave the cluster running afterwards (delete it with `kind delete cluster --name NAME`).
    #[arg(long)]
    pub keep: bool,
    /// Run only cases whose name contains this text.
    #[arg(long)]
    pub case: Option<String>,
    /// Print every truth table, not only failing ones.
    #[arg(long)]
    pub verbose: bool,
    /// Also write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Seconds to let a policy or label change reach the dataplane before probing.
    #[arg(long, default_value_t = 2.0)]
    pub settle: f64,
}

/// The kind node roles: the control plane runs no test pods (it is tainted), the workers
/// carry them, so pod-to-pod traffic crosses nodes.
const WORKERS: usize = 2;
/// How long installation and test pods may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(300);

pub fn run(args: Args) -> Result<()> {
    preflight()?;
    let image = ImageRef::parse(&args.tag)?;
    let mut files = Vec::new();
    for path in &args.cases {
        let path = resolve(path);
        let file = CaseFile::load(&path).with_context(|| format!("loading {}", path.display()))?;
        files.push((path, file));
    }
    let existing = capture(Command::new("kind").args(["get", "clusters"]))?;
    if existing.lines().any(|line| line.trim() == args.name) {
        bail!(
            "a kind cluster named {0} exists already: delete it (kind delete cluster --name {0}) \
             or choose another --name",
            args.name
        );
    }
    let work = crate::target_dir().join("e2e-kind").join(&args.name);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let manifests_dir = crate::workspace_root().join("manifests");
    let base = manifests::render(&manifests_dir)?;
    let cluster_cidr = manifests::find(&base, "ConfigMap", "weir-config")
        .and_then(|c| c.pointer("/data/cluster-cidr"))
        .and_then(|v| v.as_str())
        .context("manifests/ has no weir-config cluster-cidr")?
        .to_owned();

    let archive = work.join("weir-image.tar");
    image::build(&image, &archive)?;

    let kind_config = work.join("kind-config.yaml");
    std::fs::write(&kind_config, kind_config_yaml(&cluster_cidr, WORKERS)?)?;
    let kubeconfig = work.join("kubeconfig");
    println!(
        "Creating kind cluster {} (pod subnet {cluster_cidr})",
        args.name
    );
    crate::status(
        Command::new("kind")
            .args(["create", "cluster", "--name", &args.name, "--config"])
            .arg(&kind_config)
            .arg("--kubeconfig")
            .arg(&kubeconfig),
    )?;
    let cluster = ClusterGuard {
        name: args.name.clone(),
        keep: args.keep,
        kubeconfig: kubeconfig.clone(),
    };
    crate::status(
        Command::new("kind")
            .args(["load", "image-archive"])
            .arg(&archive)
            .args(["--name", &args.name]),
    )?;

    let overlay = work.join("overlay");
    let api_server = control_plane_address(&args.name)?;
    write_overlay(&overlay, &manifests_dir, &image, &api_server)?;
    let kubectl = |args: &[&str]| {
        let mut command = Command::new("kubectl");
        command.arg("--kubeconfig").arg(&kubeconfig).args(args);
        command
    };
    crate::status(kubectl(&["apply", "-k"]).arg(&overlay))?;
    let timeout = format!("--timeout={}s", READY_TIMEOUT.as_secs());
    let waits: [&[&str]; 3] = [
        &[
            "-n",
            "weir-system",
            "rollout",
            "status",
            "daemonset/weir-agent",
            &timeout,
        ],
        &[
            "-n",
            "weir-system",
            "rollout",
            "status",
            "deployment/weir-controller",
            &timeout,
        ],
        &["wait", "--for=condition=Ready", "nodes", "--all", &timeout],
    ];
    for wait in waits {
        if let Err(error) = crate::status(&mut kubectl(wait)) {
            diagnose(&kubeconfig);
            return Err(error.context("weir did not become ready"));
        }
    }
    println!("weir is installed and every node is Ready.");

    let all_passed = crate::runtime().block_on(run_cases(&kubeconfig, &files, &args))?;
    drop(cluster);
    if !all_passed {
        bail!("conformance cases failed in the kind cluster");
    }
    Ok(())
}

async fn run_cases(kubeconfig: &Path, files: &[(PathBuf, CaseFile)], args: &Args) -> Result<bool> {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kubeconfig)?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    let client = kube::Client::try_from(config)?;
    let options = RunOptions {
        verbose: args.verbose,
        case_filter: args.case.clone(),
        ..RunOptions::default()
    };
    let driver_options = driver::DriverOptions {
        settle: Duration::from_secs_f64(args.settle.max(0.0)),
        ready_timeout: READY_TIMEOUT,
        ..driver::DriverOptions::default()
    };
    let mut all_passed = true;
    let mut summaries = Vec::new();
    for (path, file) in files {
        println!(
            "Conformance: {} ({} cases) in kind",
            path.display(),
            file.cases.len()
        );
        if file.model.topology == Some(weir_conformance::cases::Topology::Routed) {
            println!("  (the kind nodes share one L2 network; the routed topology is not built)");
        }
        let mut driver =
            driver::KubeDriver::start(client.clone(), &file.model, &driver_options).await?;
        let mut out = std::io::stdout();
        let summary = runner::run(file, &mut driver, &options, &mut out).await;
        driver.shutdown().await?;
        let summary = summary?;
        all_passed &= summary.success();
        summaries.push(serde_json::from_str::<serde_json::Value>(
            &summary.to_json(),
        )?);
    }
    if let Some(path) = &args.json {
        let document = if summaries.len() == 1 {
            summaries.remove(0)
        } else {
            serde_json::Value::Array(summaries)
        };
        std::fs::write(path, serde_json::to_string_pretty(&document)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(all_passed)
}

/// Deletes the cluster when dropped (on success and on every error path), unless kept.
struct ClusterGuard {
    name: String,
    keep: bool,
    kubeconfig: PathBuf,
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        if self.keep {
            println!(
                "Keeping kind cluster {0}: kubectl --kubeconfig {1} ...; delete it with: kind \
                 delete cluster --name {0}",
                self.name,
                self.kubeconfig.display()
            );
            return;
        }
        println!("Deleting kind cluster {}", self.name);
        let _ = Command::new("kind")
            .args(["delete", "cluster", "--name", &self.name])
            .status();
    }
}

/// What the command needs, each checked by running it; all failures are reported at once.
fn preflight() -> Result<()> {
    let checks: [(&str, &[&str], &str); 3] = [
        (
            "docker",
            &["info", "--format", "{{.ServerVersion}}"],
            "a running Docker daemon (docker info must work)",
        ),
        (
            "kind",
            &["version"],
            "kind (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)",
        ),
        (
            "kubectl",
            &["version", "--client"],
            "kubectl (https://kubernetes.io/docs/tasks/tools/)",
        ),
    ];
    let missing: Vec<&str> = checks
        .iter()
        .filter(|(program, args, _)| {
            !Command::new(program)
                .args(*args)
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(_, _, what)| *what)
        .collect();
    if !missing.is_empty() {
        bail!(
            "e2e-kind needs, and this machine lacks:\n  {}",
            missing.join("\n  ")
        );
    }
    Ok(())
}

fn capture(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A relative path is looked up from the current directory, then from the workspace root
/// (so the default works from anywhere in the repository).
fn resolve(path: &Path) -> PathBuf {
    if path.is_absolute() || path.exists() {
        path.to_owned()
    } else {
        crate::workspace_root().join(path)
    }
}

/// The kind cluster: no default CNI (weir is the CNI), weir's cluster CIDR as pod subnet
/// (so kube-controller-manager allocates Node.spec.podCIDRs from it), one control plane
/// and `workers` workers.
fn kind_config_yaml(pod_subnet: &str, workers: usize) -> Result<String> {
    let mut nodes = vec![json!({"role": "control-plane"})];
    nodes.extend((0..workers).map(|_| json!({"role": "worker"})));
    let config = json!({
        "kind": "Cluster",
        "apiVersion": "kind.x-k8s.io/v1alpha4",
        "networking": {
            "disableDefaultCNI": true,
            "kubeProxyMode": "none",
            "podSubnet": pod_subnet,
        },
        "nodes": nodes,
    });
    Ok(serde_norway::to_string(&config)?)
}

/// The control-plane node's address on kind's Docker network: where its API server listens
/// (port 6443), and a name its certificate carries.
fn control_plane_address(cluster: &str) -> Result<String> {
    let node = format!("{cluster}-control-plane");
    let out = capture(Command::new("docker").args([
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
        &node,
    ]))?;
    out.split_whitespace()
        .find(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
        .map(str::to_owned)
        .with_context(|| format!("no IPv4 address for container {node}: {out:?}"))
}

/// An overlay of `manifests/` for `kubectl apply -k`: the image, and weir-config's API
/// server address (the cluster runs without kube-proxy). kustomize wants resources as paths
/// relative to the kustomization.
fn write_overlay(
    dir: &Path,
    manifests_dir: &Path,
    image: &ImageRef,
    api_server: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let base = relative_path(
        &std::fs::canonicalize(dir)?,
        &std::fs::canonicalize(manifests_dir)?,
    );
    let kustomization = json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [base.display().to_string()],
        "images": [{
            "name": image::IMAGE_NAME,
            "newName": image.familiar_repository(),
            "newTag": image.tag(),
        }],
        "patches": [{
            "target": {"kind": "ConfigMap", "name": "weir-config"},
            "patch": serde_json::to_string(&json!([
                {"op": "add", "path": "/data/kubernetes-service-host", "value": api_server},
                {"op": "add", "path": "/data/kubernetes-service-port", "value": "6443"},
            ]))?,
        }],
    });
    std::fs::write(
        dir.join("kustomization.yaml"),
        serde_norway::to_string(&kustomization)?,
    )?;
    Ok(())
}

/// The path from directory `from` to `to` (both absolute, normalized).
fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component> = from.components().collect();
    let to: Vec<Component> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut path = PathBuf::new();
    for _ in common..from.len() {
        path.push("..");
    }
    for component in &to[common..] {
        path.push(component.as_os_str());
    }
    if path.as_os_str().is_empty() {
        path.push(".");
    }
    path
}

/// Prints what helps to understand an installation that did not become ready.
fn diagnose(kubeconfig: &Path) {
    let commands: [&[&str]; 4] = [
        &["get", "nodes", "-o", "wide"],
        &["get", "pods", "-A", "-o", "wide"],
        &["-n", "weir-system", "describe", "pods"],
        &[
            "-n",
            "weir-system",
            "logs",
            "-l",
            "app.kubernetes.io/part-of=weir",
            "--all-containers",
            "--prefix",
            "--tail=50",
        ],
    ];
    for args in commands {
        println!("--- kubectl {}", args.join(" "));
        let _ = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kind_cluster_has_no_cni_and_weirs_pod_subnet() {
        let yaml = kind_config_yaml("10.244.0.0/16", 2).unwrap();
        let config: serde_json::Value = serde_norway::from_str(&yaml).unwrap();
        assert_eq!(config["apiVersion"], "kind.x-k8s.io/v1alpha4");
        assert_eq!(config["networking"]["disableDefaultCNI"], true);
        // weir proxies Services.
        assert_eq!(config["networking"]["kubeProxyMode"], "none");
        assert_eq!(config["networking"]["podSubnet"], "10.244.0.0/16");
        let roles: Vec<&str> = config["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["control-plane", "worker", "worker"]);
    }

    #[test]
    fn relative_paths_climb_to_the_common_ancestor() {
        assert_eq!(
            relative_path(
                Path::new("/w/target/e2e/overlay"),
                Path::new("/w/manifests")
            ),
            PathBuf::from("../../../manifests")
        );
        assert_eq!(
            relative_path(Path::new("/tmp/o"), Path::new("/w/manifests")),
            PathBuf::from("../../w/manifests")
        );
        assert_eq!(
            relative_path(Path::new("/a"), Path::new("/a")),
            PathBuf::from(".")
        );
    }

    #[test]
    fn the_overlay_installs_the_built_image_and_names_the_api_server() {
        let dir = tempfile::tempdir().unwrap();
        let overlay = dir.path().join("overlay");
        let image = ImageRef::parse("registry.example:5000/team/weir:e2e").unwrap();
        write_overlay(
            &overlay,
            &crate::workspace_root().join("manifests"),
            &image,
            "172.18.0.3",
        )
        .unwrap();
        let objects = manifests::render(&overlay).unwrap();
        let base = manifests::render(&crate::workspace_root().join("manifests")).unwrap();
        assert_eq!(
            objects.len(),
            base.len(),
            "the overlay changes no object set"
        );
        let mut images = Vec::new();
        for object in &objects {
            for list in ["containers", "initContainers"] {
                let containers = object
                    .pointer(&format!("/spec/template/spec/{list}"))
                    .and_then(|v| v.as_array());
                for container in containers.into_iter().flatten() {
                    images.push(container["image"].as_str().unwrap().to_owned());
                }
            }
        }
        let config = manifests::find(&objects, "ConfigMap", "weir-config").unwrap();
        assert_eq!(config["data"]["kubernetes-service-host"], "172.18.0.3");
        assert_eq!(config["data"]["kubernetes-service-port"], "6443");
        assert_eq!(
            config["data"]["cluster-cidr"],
            manifests::find(&base, "ConfigMap", "weir-config").unwrap()["data"]["cluster-cidr"],
            "the rest of the ConfigMap is kept"
        );
        assert_eq!(images.len(), 3, "controller, agent and its init container");
        assert!(
            images
                .iter()
                .all(|i| i == "registry.example:5000/team/weir:e2e"),
            "{images:?}"
        );
    }
}
