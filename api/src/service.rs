//! Services as a node's dataplane sees them: frontends (an address, port and protocol that
//! clients connect to) and, for each, the backends a new flow is spread over.
//!
//! The controller resolves everything Kubernetes leaves to the proxy before the state
//! reaches the node: named target ports per backend pod, `internalTrafficPolicy` and
//! `externalTrafficPolicy: Local` (a node's list then holds only its own backends), and
//! the terminating-endpoint fallback (serving-terminating backends are listed only when no
//! ready one is). The agent writes the list as it is; the dataplane picks among
//! [`BackendState::Ready`] entries, or among the others when the list has no ready one.

use std::{fmt, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::IpProto;

/// How clients reach a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FrontendKind {
    /// The Service's ClusterIP (`ServiceFrontend::ip` holds it).
    ClusterIp,
    /// `nodePort` on every address of every node (`ServiceFrontend::ip` is the unspecified
    /// address of the family).
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
