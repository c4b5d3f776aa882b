//! Services as a node's dataplane sees them: frontends (an address, port and protocol that
//! clients connect to) and, for each, the backends a new flow is spread over.
//!
//! The controller resolves everything Kubernetes leaves to the proxy before the state
//! reaches the node: named target ports per backend pod, `internalTrafficPolicy` and
//! `externalTrafficPolicy: Local` (a node's list then holds only its own backends; clients
//! inside the cluster use the Service port's ClusterIP list instead, see
//! [`ClusterFrontends`]), and
//! the terminating-endpoint fallback (serving-terminating backends are listed only when no
//! ready one is). The agent writes the list as it is; the dataplane picks among
//! [`BackendState::Ready`] entries, or among the others when the list has no ready one.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::IpProto;

/// How clients reach a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FrontendKind {
    /// The Service's ClusterIP (`ServiceFrontend::ip` holds it).
    ClusterIp,
    /// `nodePort` on every address of every node (`ServiceFrontend::ip` is the unspecified
    /// address of the family). The agent also writes pods' hostPorts as node ports of its
    /// own node, on one of its addresses when the mapping has a `hostIP`; the controller's
    /// node ports are always on the unspecified address.
    NodePort,
}

/// Key of the service table: what a flow's first packet is addressed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceFrontend {
    pub kind: FrontendKind,
    pub ip: IpAddr,
    pub port: u16,
    pub proto: IpProto,
}

/// One port of a Service, by namespace, name and port name (empty for an unnamed port).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port_name.is_empty() {
            write!(f, "{}/{}", self.namespace, self.name)
        } else {
            write!(f, "{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }
}

/// Condition of a backend, from its EndpointSlice entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum BackendState {
    /// `ready`: takes new flows.
    Ready,
    /// `serving` and `terminating`: takes new flows only when no backend is ready.
    Terminating,
}

/// A backend: the pod address and the (resolved, numeric) target port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceBackend {
    pub ip: IpAddr,
    pub port: u16,
    /// Node the backend runs on (empty if the EndpointSlice does not say).
    pub node: String,
    pub state: BackendState,
}

/// Value of the service table.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceEntry {
    pub service: ServiceRef,
    /// Small id the controller keeps stable while the Service port exists (flow events and
    /// counters name the Service through it). Never 0.
    pub id: u32,
    /// Backends in a stable order (sorted), already filtered for this node: empty means
    /// the Service has no usable endpoint here and new flows are refused.
    pub backends: Vec<ServiceBackend>,
    /// `sessionAffinity: ClientIP`: seconds a client sticks to its backend; None without.
    pub affinity_timeout_s: Option<u32>,
    /// NodePort with `externalTrafficPolicy: Cluster`: traffic from outside the node is
    /// SNATed to the node so replies return through it.
    pub masquerade_external: bool,
}

/// Where clients inside the cluster go on a NodePort with `externalTrafficPolicy: Local`.
///
/// Such a NodePort's own list holds the node's own backends: clients outside the cluster
/// keep their address and reach only those. Pods and nodes are not restricted, as with
/// kube-proxy (which sends them to the Service's cluster-wide endpoints, or, under
/// `internalTrafficPolicy: Local` too, to the node's own): they get the list of the Service
/// port's ClusterIP frontend of the same protocol and family, which is exactly that. An
/// index of a table's ClusterIP frontends by Service port id, protocol and family.
#[derive(Clone, Debug, Default)]
pub struct ClusterFrontends(BTreeMap<(u32, IpProto, bool), ServiceFrontend>);

impl ClusterFrontends {
    pub fn new(table: &BTreeMap<ServiceFrontend, ServiceEntry>) -> Self {
        Self(
            table
                .iter()
                .filter(|(f, _)| f.kind == FrontendKind::ClusterIp)
                .map(|(f, e)| ((e.id, f.proto, f.ip.is_ipv6()), *f))
                .collect(),
        )
    }

    /// The frontend whose backends serve clients inside the cluster instead of `frontend`'s
    /// own: for a NodePort with `externalTrafficPolicy: Local` (one that does not
    /// masquerade), its ClusterIP frontend; None for every other frontend, which serves
    /// every client alike.
    pub fn of(&self, frontend: &ServiceFrontend, entry: &ServiceEntry) -> Option<ServiceFrontend> {
        if frontend.kind != FrontendKind::NodePort || entry.masquerade_external {
            return None;
        }
        self.0
            .get(&(entry.id, frontend.proto, frontend.ip.is_ipv6()))
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn entry(id: u32, masquerade_external: bool) -> ServiceEntry {
        ServiceEntry {
            service: ServiceRef {
                namespace: "default".into(),
                name: format!("s{id}"),
                port_name: String::new(),
            },
            id,
            backends: Vec::new(),
            affinity_timeout_s: None,
            masquerade_external,
        }
    }

    fn frontend(kind: FrontendKind, ip: Ipv4Addr, port: u16, proto: IpProto) -> ServiceFrontend {
        ServiceFrontend {
            kind,
            ip: IpAddr::V4(ip),
            port,
            proto,
        }
    }

    #[test]
    fn local_node_ports_name_the_cluster_ip_of_their_service_port() {
        let cip = frontend(FrontendKind::ClusterIp, Ipv4Addr::new(10, 96, 0, 1), 80, 6);
        let cip_udp = frontend(FrontendKind::ClusterIp, Ipv4Addr::new(10, 96, 0, 1), 80, 17);
        let local = frontend(FrontendKind::NodePort, Ipv4Addr::UNSPECIFIED, 30080, 6);
        let local_udp = frontend(FrontendKind::NodePort, Ipv4Addr::UNSPECIFIED, 30080, 17);
        let cluster = frontend(FrontendKind::NodePort, Ipv4Addr::UNSPECIFIED, 30081, 6);
        let other_id = frontend(FrontendKind::NodePort, Ipv4Addr::UNSPECIFIED, 30082, 6);
        let table: BTreeMap<_, _> = [
            (cip, entry(1, false)),
            (cip_udp, entry(2, false)),
            (local, entry(1, false)),
            (local_udp, entry(2, false)),
            (cluster, entry(1, true)),
            (other_id, entry(3, false)),
        ]
        .into_iter()
        .collect();
        let index = ClusterFrontends::new(&table);
        let of = |f: &ServiceFrontend| index.of(f, &table[f]);
        assert_eq!(of(&local), Some(cip));
        assert_eq!(of(&local_udp), Some(cip_udp), "same protocol");
        assert_eq!(of(&cluster), None, "externalTrafficPolicy Cluster");
        assert_eq!(
            of(&other_id),
            None,
            "no ClusterIP for the port (a hostPort)"
        );
        assert_eq!(of(&cip), None, "a ClusterIP serves everyone");
    }
}
