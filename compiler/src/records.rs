//! What the store keeps of a Pod and of a Node: plain records, read from the API objects
//! (see the [`cluster`](super::cluster) module for which pods are kept).

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Container, Pod};
use weir_api::{PodKey, canonical_ip};

use super::{Error, Result, policy::Protocol, selector::Labels};

/// A named container port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// What policy needs to know about a pod that is a policy endpoint and peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub key: PodKey,
    pub labels: Labels,
    /// `spec.nodeName`; `None` while unscheduled.
    pub node: Option<String>,
    /// `status.podIPs` (or `status.podIP`), IPv4-mapped IPv6 written as IPv4, no duplicates.
    pub ips: Vec<IpAddr>,
    /// Named ports of the containers (and restartable init containers, i.e. sidecars).
    pub named_ports: Vec<NamedPort>,
    /// Running and not reported unready (its `Ready` condition is `True`, or absent as in
    /// manifests written by hand): it could serve a Service.
    pub serving: bool,
    /// Has a `deletionTimestamp`: shutting down.
    pub terminating: bool,
}

impl PodInfo {
    /// Extracts what policy needs from `pod`; `None` if the pod is terminal or uses the
    /// host network (see the module documentation). Unparseable IPs and container ports with
    /// an unknown protocol or an out-of-range number are skipped (the API server does not
    /// accept them).
    pub fn from_pod(pod: &Pod) -> Result<Option<Self>> {
        let name = pod
            .metadata
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or(Error::MissingName { kind: "Pod" })?;
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| Error::MissingNamespace {
                kind: "Pod",
                name: name.clone(),
            })?;
        let status = pod.status.as_ref();
        let terminal = status
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed");
        let spec = pod.spec.as_ref();
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        if terminal || host_network {
            return Ok(None);
        }
        let mut ips: Vec<IpAddr> = Vec::new();
        let listed = status.and_then(|s| s.pod_ips.as_ref());
        let texts: Vec<&str> = match listed {
            Some(list) if !list.is_empty() => list.iter().map(|p| p.ip.as_str()).collect(),
            _ => status
                .and_then(|s| s.pod_ip.as_deref())
                .into_iter()
                .collect(),
        };
        for text in texts {
            if let Ok(ip) = text.parse::<IpAddr>() {
                let ip = canonical_ip(ip);
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
        let mut named_ports = Vec::new();
        if let Some(spec) = spec {
            let sidecars = spec
                .init_containers
                .iter()
                .flatten()
                .filter(|c| c.restart_policy.as_deref() == Some("Always"));
            for container in spec.containers.iter().chain(sidecars) {
                named_ports.extend(container_named_ports(container));
            }
        }
        named_ports.sort_unstable();
        named_ports.dedup();
        let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
        let ready_condition = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status == "True");
        Ok(Some(Self {
            serving: running && ready_condition.unwrap_or(true),
            terminating: pod.metadata.deletion_timestamp.is_some(),
            key: PodKey::new(namespace, name),
            labels: pod.metadata.labels.clone().unwrap_or_default().into(),
            node: spec
                .and_then(|s| s.node_name.clone())
                .filter(|n| !n.is_empty()),
            ips,
            named_ports,
        }))
    }

    /// The port numbers `name` stands for on this pod for `protocol` (sorted).
    pub fn resolve_port(&self, name: &str, protocol: Protocol) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .named_ports
            .iter()
            .filter(|p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

fn container_named_ports(container: &Container) -> impl Iterator<Item = NamedPort> + '_ {
    container.ports.iter().flatten().filter_map(|p| {
        let name = p.name.as_ref().filter(|n| !n.is_empty())?;
        let protocol = match p.protocol.as_deref() {
            None => Protocol::Tcp,
            Some(s) => Protocol::from_api(s)?,
        };
        let port = u16::try_from(p.container_port).ok().filter(|p| *p > 0)?;
        Some(NamedPort {
            name: name.clone(),
            protocol,
            port,
        })
    })
}

/// What policy needs of a Node object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeRecord {
    pub labels: Labels,
    /// The IP addresses of `status.addresses` (InternalIP, ExternalIP), canonical, sorted.
    pub ips: Vec<IpAddr>,
}
