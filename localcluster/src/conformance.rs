//! Runs reachability case files against a local cluster: the [`Driver`] of the conformance
//! runner, backed by real pods, real servers in them and real probes.
//!
//! The local cluster has no API server, so this driver does what one would for Services:
//! it allocates ClusterIPs from [`SERVICE_CIDR`] and [`SERVICE_CIDR_V6`] for a Service that
//! leaves `clusterIP` unset (not for headless ones, `clusterIP: None`) and a nodePort from
//! [`NODE_PORT_RANGE`] for each port of a NodePort Service that leaves `nodePort` unset,
//! keeps both when the Service is applied again (as an update does), and writes the
//! completed object for the controller. The controller derives the EndpointSlices.
//!
//! Address families follow the cluster's: on an IPv6 cluster a Service gets an IPv6
//! ClusterIP; on a dual-stack one a Service without `ipFamilyPolicy` is made
//! `RequireDualStack` and gets one of each (IPv4 first), and each pass of the run probes the
//! ClusterIP of its family.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use anyhow::{Context, Result, bail};
use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::Value;
use weir_conformance::{
    Family, PodRef,
    cases::{Endpoint, Labels, Model, ObjectRef, Protocol, ServiceRef, Topology as CaseTopology},
    family::Need,
    probe::{ProbeOutcome, ProbeRequest, Servers, probe_many, probe_many_answered},
    runner::{Answer, Driver, EndpointProbe, Probe},
};

use crate::{
    ClusterOptions, IpFamily, LocalCluster, PodSpec, Topology,
    cluster::{NODE_PORT_RANGE, SERVICE_CIDR},
};

/// The range IPv6 ClusterIPs are allocated from (a /112, as kubeadm's IPv6 default is).
pub const SERVICE_CIDR_V6: &str = "fd00:10:96::/112";

/// What the driver allocated for one Service.
#[derive(Clone, Debug, Default)]
struct ServiceAddresses {
    /// Empty for a headless Service; one per family otherwise, IPv4 first.
    cluster_ips: Vec<IpAddr>,
    /// `(port, protocol, nodePort)` of every Service port.
    ports: Vec<(u16, Protocol, Option<u16>)>,
}

/// The model's cluster: every namespace × every pod, spread round-robin over the nodes
/// (pod k of the model's order on node (k mod N) + 1), each pod serving every model port
/// on every model protocol and telling who it is (`ns/pod`); the external host serves the
/// same ports as `external`.
pub struct ClusterDriver {
    cluster: LocalCluster,
    model: Model,
    ip_family: IpFamily,
    /// Every pod's addresses, one per family, IPv4 first.
    ips: BTreeMap<PodRef, Vec<IpAddr>>,
    services: BTreeMap<ServiceRef, ServiceAddresses>,
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
        let ip_family = opts.ip_family;
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
                    host_ports: vec![],
                })
                .await
                .with_context(|| format!("creating pod {pod}"))?;
            servers.push(
                Servers::start_as(
                    &created.netns.path(),
                    &model.ports,
                    &model.protocols,
                    &pod.to_string(),
                )
                .with_context(|| format!("starting servers in {pod}"))?,
            );
            ips.insert(pod, created.ips.clone());
        }
        if let Some(external) = cluster.external() {
            servers.push(
                Servers::start_as(
                    &external.netns.path(),
                    &model.ports,
                    &model.protocols,
                    "external",
                )
                .context("starting servers on the external host")?,
            );
        }
        cluster.sync().await?;
        Ok(Self {
            cluster,
            model: model.clone(),
            ip_family,
            ips,
            services: BTreeMap::new(),
            _servers: servers,
        })
    }

    /// Fills in `clusterIP`/`clusterIPs` and `nodePort`s a Service leaves unset, and records
    /// what it got.
    fn complete_service(&mut self, mut object: Value) -> Result<Value> {
        let key = ServiceRef {
            namespace: object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned(),
            name: object["metadata"]["name"]
                .as_str()
                .context("Service without metadata.name")?
                .to_owned(),
        };
        let previous = self.services.remove(&key).unwrap_or_default();
        let spec = object
            .as_object_mut()
            .context("Service is not a mapping")?
            .entry("spec")
            .or_insert_with(|| Value::Object(Default::default()));
        let spec = spec
            .as_object_mut()
            .context("Service spec is not a mapping")?;
        let cluster_ips = match spec.get("clusterIP").and_then(Value::as_str) {
            Some("None") => Vec::new(),
            Some(ip) if !ip.is_empty() => {
                let mut ips = vec![
                    ip.parse::<IpAddr>()
                        .with_context(|| format!("Service {key}: clusterIP {ip:?}"))?,
                ];
                for other in spec
                    .get("clusterIPs")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                {
                    let other = other
                        .parse::<IpAddr>()
                        .with_context(|| format!("Service {key}: clusterIPs {other:?}"))?;
                    if !ips.contains(&other) {
                        ips.push(other);
                    }
                }
                ips
            }
            _ => {
                let families = self.service_families(spec);
                let mut ips = Vec::new();
                for family in families {
                    let ip = match family.pick(&previous.cluster_ips) {
                        Some(ip) => ip,
                        None => self.free_cluster_ip(family)?,
                    };
                    ips.push(ip);
                }
                let texts: Vec<String> = ips.iter().map(IpAddr::to_string).collect();
                spec.insert("clusterIP".into(), Value::String(texts[0].clone()));
                spec.insert("clusterIPs".into(), serde_json::json!(texts));
                spec.insert(
                    "ipFamilies".into(),
                    serde_json::json!(
                        ips.iter()
                            .map(|ip| if ip.is_ipv4() { "IPv4" } else { "IPv6" })
                            .collect::<Vec<_>>()
                    ),
                );
                if ips.len() > 1 && !spec.contains_key("ipFamilyPolicy") {
                    spec.insert("ipFamilyPolicy".into(), "RequireDualStack".into());
                }
                ips
            }
        };
        let node_ports = matches!(
            spec.get("type").and_then(Value::as_str),
            Some("NodePort" | "LoadBalancer")
        );
        let mut used = self.used_node_ports();
        let mut ports = Vec::new();
        if let Some(list) = spec.get_mut("ports").and_then(Value::as_array_mut) {
            for entry in list {
                let port = entry["port"]
                    .as_u64()
                    .and_then(|port| u16::try_from(port).ok())
                    .with_context(|| format!("Service {key}: a port without a port number"))?;
                let protocol = match entry["protocol"].as_str() {
                    None => Protocol::Tcp,
                    Some(text) => text
                        .parse()
                        .map_err(|()| anyhow::anyhow!("Service {key}: protocol {text:?}"))?,
                };
                let node_port = if !node_ports {
                    None
                } else if let Some(given) = entry["nodePort"].as_u64() {
                    Some(u16::try_from(given).context("nodePort")?)
                } else {
                    let kept = previous
                        .ports
                        .iter()
                        .find(|(p, proto, _)| *p == port && *proto == protocol)
                        .and_then(|(_, _, node_port)| *node_port)
                        .filter(|node_port| !used.contains(node_port));
                    let node_port = match kept {
                        Some(node_port) => node_port,
                        None => NODE_PORT_RANGE
                            .clone()
                            .find(|candidate| !used.contains(candidate))
                            .context("no free nodePort left")?,
                    };
                    entry["nodePort"] = Value::from(node_port);
                    Some(node_port)
                };
                if let Some(node_port) = node_port {
                    used.insert(node_port);
                }
                ports.push((port, protocol, node_port));
            }
        }
        self.services
            .insert(key, ServiceAddresses { cluster_ips, ports });
        Ok(object)
    }

    /// The families a Service that leaves `clusterIP` unset gets, in order, as an API server
    /// with this cluster's service ranges would give them: `ipFamilies` if the Service
    /// lists them (within the cluster's), else the cluster's first family, or both on a
    /// dual-stack cluster unless `ipFamilyPolicy` is `SingleStack` (the runner makes every
    /// Service without a policy `RequireDualStack` there).
    fn service_families(&self, spec: &serde_json::Map<String, Value>) -> Vec<Family> {
        let cluster: &[Family] = match self.ip_family {
            IpFamily::Ipv4 => &[Family::Ipv4],
            IpFamily::Ipv6 => &[Family::Ipv6],
            IpFamily::Dual => &[Family::Ipv4, Family::Ipv6],
        };
        let listed: Vec<Family> = spec
            .get("ipFamilies")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|family| match family.as_str() {
                Some("IPv4") => Some(Family::Ipv4),
                Some("IPv6") => Some(Family::Ipv6),
                _ => None,
            })
            .filter(|family| cluster.contains(family))
            .collect();
        let single = spec.get("ipFamilyPolicy").and_then(Value::as_str) == Some("SingleStack");
        let mut families = if listed.is_empty() {
            cluster.to_vec()
        } else {
            listed
        };
        if single {
            families.truncate(1);
        }
        families
    }

    fn free_cluster_ip(&self, family: Family) -> Result<IpAddr> {
        let used: BTreeSet<IpAddr> = self
            .services
            .values()
            .flat_map(|service| service.cluster_ips.iter().copied())
            .collect();
        // The first addresses are the API server's and DNS Services in a real cluster;
        // start above them.
        match family {
            Family::Ipv4 => {
                let net: Ipv4Net = SERVICE_CIDR.parse().context("the service CIDR")?;
                net.hosts()
                    .skip(9)
                    .map(IpAddr::V4)
                    .find(|ip| !used.contains(ip))
                    .context("the service CIDR is full")
            }
            Family::Ipv6 => {
                let net: Ipv6Net = SERVICE_CIDR_V6.parse().context("the IPv6 service CIDR")?;
                net.hosts()
                    .skip(10)
                    .map(IpAddr::V6)
                    .find(|ip| !used.contains(ip))
                    .context("the IPv6 service CIDR is full")
            }
        }
    }

    fn used_node_ports(&self) -> BTreeSet<u16> {
        self.services
            .values()
            .flat_map(|service| {
                service
                    .ports
                    .iter()
                    .filter_map(|(_, _, node_port)| *node_port)
            })
            .collect()
    }

    fn service_port(
        &self,
        service: &ServiceRef,
        port: u16,
        protocol: Protocol,
    ) -> Result<(&ServiceAddresses, Option<u16>), String> {
        let addresses = self
            .services
            .get(service)
            .ok_or_else(|| format!("no Service {service} was applied"))?;
        let (_, _, node_port) = addresses
            .ports
            .iter()
            .find(|(p, proto, _)| *p == port && *proto == protocol)
            .ok_or_else(|| format!("Service {service} has no port {protocol}/{port}"))?;
        Ok((addresses, *node_port))
    }

    /// The network namespace a probe from `from` runs in.
    fn client_netns(&self, from: &Endpoint) -> Option<std::path::PathBuf> {
        match from {
            Endpoint::Pod(pod) => self
                .cluster
                .pod(&pod.namespace, &pod.name)
                .map(|pod| pod.netns.path()),
            Endpoint::Node(node) => self
                .cluster
                .nodes()
                .get((*node as usize).checked_sub(1)?)
                .map(|node| node.netns.path()),
            _ => None,
        }
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

    async fn pod_ip(&self, pod: &PodRef, family: Family) -> Option<IpAddr> {
        family.pick(self.ips.get(pod)?)
    }

    async fn reset(&mut self) -> Result<()> {
        for (kind, ns, name) in self.cluster.objects() {
            self.cluster.delete_object(&kind, ns.as_deref(), &name)?;
        }
        self.services.clear();
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
        let object = if object["kind"] == "Service" && object["apiVersion"] == "v1" {
            self.complete_service(object)?
        } else {
            object
        };
        self.cluster.apply_object(&object)
    }

    async fn delete(&mut self, object: &ObjectRef) -> Result<()> {
        if object.kind == "Service" {
            let Some(namespace) = &object.namespace else {
                bail!("a Service is namespaced");
            };
            self.services.remove(&ServiceRef {
                namespace: namespace.clone(),
                name: object.name.clone(),
            });
        }
        self.cluster
            .delete_object(&object.kind, object.namespace.as_deref(), &object.name)
    }

    fn node_count(&self) -> Option<usize> {
        Some(self.cluster.nodes().len())
    }

    /// The external host has an IPv6 address on an IPv6 underlay only.
    fn external_ip(&self, family: Family) -> Option<IpAddr> {
        let external = self.cluster.external()?;
        [Some(IpAddr::V4(external.ip)), external.ip6.map(IpAddr::V6)]
            .into_iter()
            .flatten()
            .find(|ip| family.holds(ip))
    }

    fn unsupported(&self, family: Family, need: Need) -> Option<String> {
        match (family, need) {
            (Family::Ipv4, _) => None,
            (Family::Ipv6, Need::Services) => None,
            // A node's IPv6 address is on the fabric only over an IPv6 underlay.
            (Family::Ipv6, Need::NodePorts) => self
                .cluster
                .nodes()
                .iter()
                .any(|node| node.ip6.is_none())
                .then(|| "nodes have no IPv6 address on the fabric (IPv4 underlay)".to_owned()),
            (Family::Ipv6, Need::External) => self
                .external_ip(family)
                .is_none()
                .then(|| "the external host has no IPv6 address".to_owned()),
        }
    }

    fn service_target(
        &self,
        service: &ServiceRef,
        port: u16,
        protocol: Protocol,
        family: Family,
    ) -> Result<SocketAddr, String> {
        let (addresses, _) = self.service_port(service, port, protocol)?;
        if addresses.cluster_ips.is_empty() {
            return Err(format!(
                "Service {service} is headless: it has no ClusterIP"
            ));
        }
        let ip = family
            .pick(&addresses.cluster_ips)
            .ok_or_else(|| format!("Service {service} has no {family} ClusterIP"))?;
        Ok(SocketAddr::new(ip, port))
    }

    fn node_port_targets(
        &self,
        service: &ServiceRef,
        port: u16,
        protocol: Protocol,
        family: Family,
    ) -> Result<Vec<SocketAddr>, String> {
        let (_, node_port) = self.service_port(service, port, protocol)?;
        let node_port =
            node_port.ok_or_else(|| format!("Service {service} is not of type NodePort"))?;
        self.cluster
            .nodes()
            .iter()
            .map(|node| {
                let ip = match family {
                    Family::Ipv4 => IpAddr::V4(node.ip),
                    Family::Ipv6 => IpAddr::V6(
                        node.ip6
                            .ok_or_else(|| format!("node {} has no IPv6 address", node.name))?,
                    ),
                };
                Ok(SocketAddr::new(ip, node_port))
            })
            .collect()
    }

    async fn probe_endpoints(&self, probes: &[EndpointProbe]) -> Vec<Answer> {
        let requests: Vec<Option<ProbeRequest>> = probes
            .iter()
            .map(|p| {
                self.client_netns(&p.from).map(|netns| ProbeRequest {
                    netns,
                    target: p.target,
                    protocol: p.protocol,
                    timeout: p.timeout,
                })
            })
            .collect();
        let known: Vec<ProbeRequest> = requests.iter().flatten().cloned().collect();
        let mut answers = probe_many_answered(&known).await.into_iter();
        requests
            .iter()
            .zip(probes)
            .map(|(request, probe)| match request {
                Some(_) => match answers.next() {
                    Some((outcome, answered_by)) => Answer {
                        outcome,
                        answered_by,
                    },
                    None => Answer::error("missing outcome"),
                },
                None => Answer::error(format!("{} is not a client in this cluster", probe.from)),
            })
            .collect()
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
