//! Which cluster weirctl talks to, and how it reaches its agents and controller.
//!
//! * **Local cluster** (`cargo xtask up`, the end-to-end tests): the run directories under
//!   `/run/weir-local` record every run's nodes and namespaces. weirctl picks the newest (or
//!   `--run`), reaches each agent's HTTP endpoint from inside the node's network namespace
//!   (so the agent sees a connection from the node itself, as `/flows` and `/state`
//!   require), the controller's from inside its namespace, reads the pod list from the run's
//!   manifest directory and the policy tables from the node's pinned maps. Needs root.
//! * **Kubernetes** (`--kubeconfig`, or in a pod: the in-cluster configuration): agents are
//!   the pods of the `weir-agent` DaemonSet, the controllers those of the `weir-controller`
//!   Deployment, both in `--weir-namespace`; their endpoints are reached through the API
//!   server's pod proxy with the caller's own credentials (RBAC: `get` on `pods/proxy` in
//!   that namespace, `list` on pods cluster-wide for names). The agent serves `/flows` and
//!   `/state` only to its own node unless it runs with `--flows-from-anywhere`: through the
//!   proxy they answer 403 otherwise, and weirctl says so.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use weir_compiler::{Cluster, PodInfo};
use weir_localcluster::{AGENT_HTTP_PORT, netns::Netns, record::RunRecord};

/// Port of the controller's HTTP endpoint (its `--metrics-addr` default).
pub const CONTROLLER_HTTP_PORT: u16 = 9963;

/// A local cluster, from its run record.
#[derive(Clone, Debug)]
pub struct LocalRun {
    pub record: RunRecord,
}

impl LocalRun {
    /// The run `run` (an id or a run directory), or the newest one on this machine.
    pub fn find(runs_dir: &Path, run: Option<&str>) -> Result<Self> {
        if let Some(run) = run {
            let dir = if run.contains('/') {
                PathBuf::from(run)
            } else {
                runs_dir.join(run)
            };
            let record = RunRecord::load(&dir)
                .with_context(|| format!("no local cluster run at {}", dir.display()))?;
            return Ok(Self { record });
        }
        let mut runs: Vec<(std::time::SystemTime, RunRecord)> = std::fs::read_dir(runs_dir)
            .with_context(|| {
                format!(
                    "no local cluster on this machine ({} is missing); start one with cargo xtask up",
                    runs_dir.display()
                )
            })?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let record = RunRecord::load(&e.path()).ok()?;
                let modified = std::fs::metadata(e.path()).ok()?.modified().ok()?;
                Some((modified, record))
            })
            .collect();
        runs.sort_by_key(|(t, _)| *t);
        let (_, record) = runs.pop().with_context(|| {
            format!(
                "no local cluster on this machine (nothing under {}); start one with cargo xtask up",
                runs_dir.display()
            )
        })?;
        Ok(Self { record })
    }

    pub fn node_netns(&self, node: &str) -> String {
        format!("weir-{node}")
    }

    fn controller_netns(&self) -> Option<String> {
        let name = format!("weir-{}-ctl", self.record.run);
        self.record.namespaces.contains(&name).then_some(name)
    }

    pub fn manifests(&self) -> PathBuf {
        self.record.dir.join("manifests")
    }

    pub fn bpffs(&self) -> &Path {
        &self.record.bpffs
    }
}

/// Agents and controllers of a Kubernetes cluster.
#[derive(Clone)]
pub struct KubeTarget {
    pub client: kube::Client,
    pub namespace: String,
    /// Node → agent pod.
    pub agents: BTreeMap<String, String>,
    pub controllers: Vec<String>,
}

impl KubeTarget {
    pub async fn connect(kubeconfig: Option<&Path>, namespace: &str) -> Result<Self> {
        let config = match kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
            }
            None => kube::Config::infer()
                .await
                .context("no kubeconfig given and no in-cluster configuration")?,
        };
        Self::discover(kube::Client::try_from(config)?, namespace).await
    }

    /// Finds weir's agents (by node) and controllers in `namespace` through `client`.
    pub async fn discover(client: kube::Client, namespace: &str) -> Result<Self> {
        let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), namespace);
        let list = |selector: &'static str| {
            let pods = pods.clone();
            async move {
                pods.list(&kube::api::ListParams::default().labels(selector))
                    .await
                    .with_context(|| format!("listing pods {selector} in the weir namespace"))
            }
        };
        let agents = list("app.kubernetes.io/name=weir-agent")
            .await?
            .items
            .into_iter()
            .filter_map(|p| {
                let node = p.spec.as_ref()?.node_name.clone()?;
                Some((node, p.metadata.name?))
            })
            .collect();
        let controllers = list("app.kubernetes.io/name=weir-controller")
            .await?
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        Ok(Self {
            client,
            namespace: namespace.to_string(),
            agents,
            controllers,
        })
    }

    /// GET `path` from port `port` of pod `pod`, through the API server's proxy.
    async fn proxy_get(&self, pod: &str, port: u16, path: &str) -> Result<(u16, String)> {
        let uri = format!(
            "/api/v1/namespaces/{}/pods/{pod}:{port}/proxy{path}",
            self.namespace
        );
        let request = http::Request::get(uri).body(Vec::new())?;
        let response = self
            .client
            .send(request.map(Into::into))
            .await
            .with_context(|| format!("GET {path} from pod {pod}"))?;
        let code = response.status().as_u16();
        let body = response.into_body().collect_bytes().await?;
        Ok((code, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// The cluster weirctl works on.
#[derive(Clone)]
pub enum Target {
    Local(LocalRun),
    Kube(KubeTarget),
}

/// One controller replica's HTTP answer.
pub struct ControllerReply {
    pub name: String,
    pub reply: Result<(u16, String)>,
}

impl Target {
    /// Node names, sorted.
    pub fn nodes(&self) -> Vec<String> {
        match self {
            Target::Local(l) => {
                let mut nodes = l.record.nodes.clone();
                nodes.sort();
                nodes
            }
            Target::Kube(k) => k.agents.keys().cloned().collect(),
        }
    }

    /// GET `path` from the agent of `node`: status code and body.
    pub async fn agent_get(&self, node: &str, path: &str) -> Result<(u16, String)> {
        match self {
            Target::Local(l) => {
                let ns = l.node_netns(node);
                get_in_netns(&ns, AGENT_HTTP_PORT, path)
                    .with_context(|| format!("agent of {node} (namespace {ns})"))
            }
            Target::Kube(k) => {
                let pod = k
                    .agents
                    .get(node)
                    .with_context(|| format!("no agent pod on node {node}"))?;
                k.proxy_get(pod, AGENT_HTTP_PORT, path).await
            }
        }
    }

    /// GET `path` from every controller replica.
    pub async fn controllers_get(&self, path: &str) -> Vec<ControllerReply> {
        match self {
            Target::Local(l) => match l.controller_netns() {
                Some(ns) => vec![ControllerReply {
                    name: "controller".into(),
                    reply: get_in_netns(&ns, CONTROLLER_HTTP_PORT, path)
                        .with_context(|| format!("controller (namespace {ns})")),
                }],
                None => Vec::new(),
            },
            Target::Kube(k) => {
                let mut out = Vec::new();
                for pod in &k.controllers {
                    out.push(ControllerReply {
                        name: pod.clone(),
                        reply: k.proxy_get(pod, CONTROLLER_HTTP_PORT, path).await,
                    });
                }
                out
            }
        }
    }

    /// Every pod the cluster knows, with its addresses and node.
    pub async fn pods(&self) -> Result<Vec<PodInfo>> {
        match self {
            Target::Local(l) => {
                let cluster: Cluster = crate::objects::load_dir(&l.manifests(), None)?;
                Ok(cluster.pods().cloned().collect())
            }
            Target::Kube(k) => {
                let api: kube::Api<Pod> = kube::Api::all(k.client.clone());
                let list = api
                    .list(&Default::default())
                    .await
                    .context("listing pods")?;
                Ok(list
                    .items
                    .iter()
                    .filter_map(|p| PodInfo::from_pod(p).ok().flatten())
                    .collect())
            }
        }
    }
}

/// Pod names by address.
pub fn pods_by_ip(pods: &[PodInfo]) -> BTreeMap<IpAddr, PodInfo> {
    pods.iter()
        .flat_map(|p| p.ips.iter().map(move |ip| (*ip, p.clone())))
        .collect()
}

/// A plain HTTP/1.0 GET of `path` from `127.0.0.1:port` inside network namespace `ns`.
pub fn get_in_netns(ns: &str, port: u16, path: &str) -> Result<(u16, String)> {
    if !Path::new("/run/netns").join(ns).exists() {
        bail!("network namespace {ns} does not exist");
    }
    let addr = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
    weir_localcluster::http::get_in(&Netns::existing(ns), addr, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_run_is_picked_and_a_named_one_found() {
        let dir = tempfile::tempdir().unwrap();
        for (i, run) in ["wold", "wnew"].iter().enumerate() {
            let record = RunRecord {
                run: run.to_string(),
                dir: dir.path().join(run),
                nodes: vec![format!("{run}-n1")],
                ..Default::default()
            };
            std::fs::create_dir_all(&record.dir).unwrap();
            record.save().unwrap();
            if i == 0 {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        // Directory mtimes: make the order explicit.
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        std::fs::File::open(dir.path().join("wold"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        let newest = LocalRun::find(dir.path(), None).unwrap();
        assert_eq!(newest.record.run, "wnew");
        let named = LocalRun::find(dir.path(), Some("wold")).unwrap();
        assert_eq!(named.record.run, "wold");
        assert!(LocalRun::find(dir.path(), Some("nope")).is_err());
        let empty = tempfile::tempdir().unwrap();
        let err = LocalRun::find(empty.path(), None).unwrap_err().to_string();
        assert!(err.contains("no local cluster"), "{err}");
    }
}
