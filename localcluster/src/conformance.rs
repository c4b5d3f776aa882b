//! Runs reachability case files against a local cluster: the [`Driver`] of the conformance
//! runner, backed by real pods, real servers in them and real probes.

use std::{collections::BTreeMap, net::IpAddr, net::SocketAddr};

use anyhow::{Context, Result};
use serde_json::Value;
use weir_conformance::{
    PodRef,
    cases::{Labels, Model, ObjectRef, Topology as CaseTopology},
    probe::{ProbeOutcome, ProbeRequest, Servers, probe_many},
    runner::{Driver, Probe},
};

use crate::{ClusterOptions, LocalCluster, PodSpec, Topology};

/// The model's cluster: every namespace × every pod, spread round-robin over the nodes,
/// each pod serving every model port on every model protocol.
pub struct ClusterDriver {
    cluster: LocalCluster,
    model: Model,
    ips: BTreeMap<PodRef, IpAddr>,
    _servers: Vec<Servers>,
}

impl ClusterDriver {
    pub async fn start(model: &Model, mut opts: ClusterOptions) -> Result<Self> {
        opts.nodes = model.nodes.map(|n| n as usize).unwrap_or(1).max(1);
        if let Some(t) = model.topology {
            opts.topology = match t {
                CaseTopology::L2 => Topology::L2,
                CaseTopology::Routed => Topology::Routed,
            };
        }
        let mut cluster = LocalCluster::up(opts).await?;
        for ns in &model.namespaces {
            cluster.set_namespace_labels(ns, &model.namespace_labels(ns))?;
        }
        let ports: Vec<(String, u16, String)> = model
            .container_ports()
            .into_iter()
            .map(|(name, port, proto)| (name, port, proto.as_str().to_string()))
            .collect();
        let nodes = cluster.nodes().len();
        let mut ips = BTreeMap::new();
        let mut servers = Vec::new();
        for (i, pod) in model.pod_refs().into_iter().enumerate() {
            let created = cluster
                .add_pod(PodSpec {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    node: i % nodes,
                    labels: model.pod_labels(&pod),
                    ports: ports.clone(),
                })
                .await
                .with_context(|| format!("creating pod {pod}"))?;
            servers.push(
                Servers::start(&created.netns.path(), &model.ports, &model.protocols)
                    .with_context(|| format!("starting servers in {pod}"))?,
            );
            ips.insert(pod, created.ip);
        }
        cluster.sync().await?;
        Ok(Self {
            cluster,
            model: model.clone(),
            ips,
            _servers: servers,
        })
    }

    pub fn cluster(&self) -> &LocalCluster {
        &self.cluster
    }

    pub fn topology(&self) -> Topology {
        self.cluster.topology()
    }

    pub fn shutdown(self) {
        self.cluster.down();
    }
}

impl Driver for ClusterDriver {
    type Error = anyhow::Error;

    async fn pod_ip(&self, pod: &PodRef) -> Option<IpAddr> {
        self.ips.get(pod).copied()
    }

    async fn reset(&mut self) -> Result<()> {
        for (kind, ns, name) in self.cluster.objects() {
            self.cluster.delete_object(&kind, ns.as_deref(), &name)?;
        }
        for ns in &self.model.namespaces {
            self.cluster
                .set_namespace_labels(ns, &self.model.namespace_labels(ns))?;
        }
        for pod in self.model.pod_refs() {
            let labels = self.model.pod_labels(&pod);
            if self
                .cluster
                .pod(&pod.namespace, &pod.name)
                .map(|p| &p.labels)
                != Some(&labels)
            {
                self.cluster
                    .set_pod_labels(&pod.namespace, &pod.name, labels)?;
            }
        }
        Ok(())
    }

    async fn set_pod_labels(&mut self, pod: &PodRef, labels: Labels) -> Result<()> {
        self.cluster
            .set_pod_labels(&pod.namespace, &pod.name, labels)
    }

    async fn set_namespace_labels(&mut self, namespace: &str, labels: Labels) -> Result<()> {
        self.cluster.set_namespace_labels(namespace, &labels)
    }

    async fn apply(&mut self, object: Value) -> Result<()> {
        self.cluster.apply_object(&object)
    }

    async fn delete(&mut self, object: &ObjectRef) -> Result<()> {
        self.cluster
            .delete_object(&object.kind, object.namespace.as_deref(), &object.name)
    }

    async fn sync(&mut self) -> Result<()> {
        self.cluster.sync().await
    }

    async fn probe(&self, probes: &[Probe]) -> Vec<ProbeOutcome> {
        let requests: Vec<Option<ProbeRequest>> = probes
            .iter()
            .map(|p| {
                self.cluster
                    .pod(&p.from.namespace, &p.from.name)
                    .map(|from| ProbeRequest {
                        netns: from.netns.path(),
                        target: SocketAddr::new(p.target.ip(), p.target.port()),
                        protocol: p.protocol,
                        timeout: p.timeout,
                    })
            })
            .collect();
        let known: Vec<ProbeRequest> = requests.iter().flatten().cloned().collect();
        let mut outcomes = probe_many(&known).await.into_iter();
        requests
            .iter()
            .map(|r| match r {
                Some(_) => outcomes
                    .next()
                    .unwrap_or(ProbeOutcome::Error("missing outcome".into())),
                None => ProbeOutcome::Error("no such pod".into()),
            })
            .collect()
    }
}
