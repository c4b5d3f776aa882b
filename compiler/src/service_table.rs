//! The service compiler: Services and their EndpointSlices → each node's
//! [`NodeState::services`](weir_api::NodeState::services). Pure, like the policy compiler.
//!
//! Per Service port (`ServiceRef`, id kept stable by an [`IdAllocator`] shared by all nodes):
//!
//! * one ClusterIP frontend per ClusterIP, on every node, with the backends of the
//!   ClusterIP's family;
//! * for types NodePort and LoadBalancer, one NodePort frontend per family of the Service
//!   (address: the unspecified address of the family), on every node;
//! * backends come from the slices' endpoints whose slice port has the Service port's name
//!   and protocol (the slice port's number is the resolved target port); an address listed
//!   twice counts once, ready winning over terminating;
//! * `internalTrafficPolicy: Local` keeps only the node's own backends in its ClusterIP
//!   entries, `externalTrafficPolicy: Local` in its NodePort entries (which then do not
//!   masquerade);
//! * the terminating fallback is applied last, to what is left for the node: serving and
//!   terminating backends are listed only when no ready one is (KEP-1669).
//!
//! A frontend two Services claim (the API server prevents this; manifests cannot) goes to
//! the first Service in (namespace, name) order and is reported for the other.
//!
//! Semantics: <https://kubernetes.io/docs/reference/networking/virtual-ips/>.

use std::{
    collections::{BTreeMap, btree_map},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use weir_api::{
    BackendState, FrontendKind, ServiceBackend, ServiceEntry, ServiceFrontend, ServiceRef,
};

use super::{
    cluster::Cluster,
    ids::IdAllocator,
    service::{ServiceDiagnostic, ServiceInfo, ServicePort},
};

/// One frontend with every backend it could use, before the per-node filter.
#[derive(Clone, Debug)]
struct Frontend {
    frontend: ServiceFrontend,
    service: ServiceRef,
    id: u32,
    backends: Vec<ServiceBackend>,
    /// Only the node's own backends (the traffic policy of this frontend's kind is Local).
    local: bool,
    affinity_timeout_s: Option<u32>,
    masquerade_external: bool,
}

/// Every frontend of the cluster; [`ServiceTable::for_node`] gives one node's table.
#[derive(Clone, Debug, Default)]
pub(crate) struct ServiceTable {
    frontends: Vec<Frontend>,
}

impl ServiceTable {
    /// Builds the table from the stored Services, giving each Service port an id from `ids`
    /// (the caller brackets full compiles with `begin`/`finish`). Returns the frontends
    /// refused because another Service holds them.
    pub fn build(
        cluster: &Cluster,
        ids: &mut IdAllocator<ServiceRef>,
    ) -> (Self, Vec<ServiceDiagnostic>) {
        let mut claimed: BTreeMap<ServiceFrontend, ServiceRef> = BTreeMap::new();
        let mut frontends = Vec::new();
        let mut diagnostics = Vec::new();
        for record in cluster.services() {
            let svc = &record.info;
            let refs: Vec<ServiceRef> = svc
                .ports
                .iter()
                .map(|p| ServiceRef {
                    namespace: svc.key.namespace.clone(),
                    name: svc.key.name.clone(),
                    port_name: p.name.clone(),
                })
                .collect();
            let port_ids = ids.assign(&refs);
            for ((port, service), id) in svc.ports.iter().zip(refs).zip(port_ids) {
                let backends = backends(cluster, svc, port);
                let of_family = |v6: bool| -> Vec<ServiceBackend> {
                    backends
                        .iter()
                        .filter(|b| b.ip.is_ipv6() == v6)
                        .cloned()
                        .collect()
                };
                let mut wanted = Vec::new();
                for ip in &svc.cluster_ips {
                    wanted.push((
                        ServiceFrontend {
                            kind: FrontendKind::ClusterIp,
                            ip: *ip,
                            port: port.port,
                            proto: port.protocol.number(),
                        },
                        svc.internal_local,
                        false,
                        format!("spec.ports[{}].port", port.index),
                    ));
                }
                if let Some(node_port) = port.node_port {
                    for v6 in svc.families() {
                        let ip = if v6 {
                            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                        } else {
                            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                        };
                        wanted.push((
                            ServiceFrontend {
                                kind: FrontendKind::NodePort,
                                ip,
                                port: node_port,
                                proto: port.protocol.number(),
                            },
                            svc.external_local,
                            !svc.external_local,
                            format!("spec.ports[{}].nodePort", port.index),
                        ));
                    }
                }
                for (frontend, local, masquerade_external, field) in wanted {
                    match claimed.entry(frontend) {
                        btree_map::Entry::Occupied(holder) => {
                            diagnostics.push(ServiceDiagnostic {
                                kind: "Service",
                                object: svc.key.clone(),
                                field,
                                problem: format!(
                                    "{} {}:{} ({}) is already the frontend of {}",
                                    kind_name(frontend.kind),
                                    frontend.ip,
                                    frontend.port,
                                    port.protocol.as_api(),
                                    holder.get()
                                ),
                            });
                        }
                        btree_map::Entry::Vacant(slot) => {
                            slot.insert(service.clone());
                            frontends.push(Frontend {
                                frontend,
                                service: service.clone(),
                                id,
                                backends: of_family(frontend.ip.is_ipv6()),
                                local,
                                affinity_timeout_s: svc.affinity_timeout_s,
                                masquerade_external,
                            });
                        }
                    }
                }
            }
        }
        (Self { frontends }, diagnostics)
    }

    /// The service table of `node`.
    pub fn for_node(&self, node: &str) -> BTreeMap<ServiceFrontend, ServiceEntry> {
        self.frontends
            .iter()
            .map(|f| {
                let candidates = f.backends.iter().filter(|b| !f.local || b.node == node);
                (
                    f.frontend,
                    ServiceEntry {
                        service: f.service.clone(),
                        id: f.id,
                        backends: with_terminating_fallback(candidates),
                        affinity_timeout_s: f.affinity_timeout_s,
                        masquerade_external: f.masquerade_external,
                    },
                )
            })
            .collect()
    }
}

fn kind_name(kind: FrontendKind) -> &'static str {
    match kind {
        FrontendKind::ClusterIp => "ClusterIP",
        FrontendKind::NodePort => "nodePort",
    }
}

/// Ready backends if there is one, else the serving-terminating ones; sorted.
fn with_terminating_fallback<'a>(
    candidates: impl Iterator<Item = &'a ServiceBackend> + Clone,
) -> Vec<ServiceBackend> {
    let any_ready = candidates.clone().any(|b| b.state == BackendState::Ready);
    let want = if any_ready {
        BackendState::Ready
    } else {
        BackendState::Terminating
    };
    candidates.filter(|b| b.state == want).cloned().collect()
}

/// Every backend of a Service port, from all its slices, one per (address, port), sorted.
fn backends(cluster: &Cluster, svc: &ServiceInfo, port: &ServicePort) -> Vec<ServiceBackend> {
    let mut best: BTreeMap<(IpAddr, u16), (BackendState, String)> = BTreeMap::new();
    for slice in cluster.service_slices(&svc.key) {
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
        else {
            continue;
        };
        for e in &slice.endpoints {
            for ip in &e.ips {
                let candidate = (e.state, e.node.clone());
                best.entry((*ip, slice_port.port))
                    .and_modify(|cur| {
                        // Ready (ordered first) wins; then the smaller node name, so the
                        // outcome does not depend on slice order.
                        if candidate < *cur {
                            *cur = candidate.clone();
                        }
                    })
                    .or_insert(candidate);
            }
        }
    }
    // In (address, port) order, which is the order of `ServiceBackend`'s fields.
    best.into_iter()
        .map(|((ip, port), (state, node))| ServiceBackend {
            ip,
            port,
            node,
            state,
        })
        .collect()
}
