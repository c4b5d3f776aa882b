//! EndpointSlices derived from pods, for manifest directories (which have no EndpointSlice
//! controller), following what Kubernetes' EndpointSlice controller writes
//! (<https://kubernetes.io/docs/concepts/services-networking/endpoint-slices/>,
//! `pkg/controller/endpointslice` in kubernetes/kubernetes):
//!
//! * only Services with a non-empty selector get derived slices (an empty selector is
//!   stored as none by the API server); the selector matches pods of the Service's namespace;
//! * a pod is listed when it has an address of the slice's family; terminal and
//!   host-network pods are not stored at all;
//! * `ready` = serving and not terminating; `serving` = running and not reported unready;
//!   `terminating` = the pod has a `deletionTimestamp`. Endpoints that are neither ready
//!   nor serving-terminating take no traffic and are left out here;
//! * a named `targetPort` is resolved per pod from its container ports (first match by
//!   name and protocol); a pod without that port is left out of that port only, and pods
//!   are grouped into one slice per family and set of resolved ports, as Kubernetes does.
//!
//! A named `targetPort` that no selected pod has is reported for the Service.

use std::collections::BTreeMap;

use weir_api::BackendState;

use super::{
    cluster::{Cluster, PodInfo, SliceRecord},
    service::{
        ObjectName, ServiceDiagnostic, ServiceInfo, SliceEndpoint, SliceInfo, SlicePort, TargetPort,
    },
};

impl Cluster {
    /// Recomputes the derived slices of every Service from the stored pods.
    pub fn derive_endpoint_slices(&mut self) {
        let services: Vec<_> = self.services().map(|r| r.info.clone()).collect();
        let stale: Vec<ObjectName> = self
            .derived_services()
            .filter(|k| self.service(k).is_none())
            .cloned()
            .collect();
        for key in stale {
            self.set_derived_slices(key, SliceRecord::default());
        }
        for svc in services {
            let record = derive(self, &svc);
            self.set_derived_slices(svc.key.clone(), record);
        }
    }
}

/// The slices Kubernetes would write for `svc`, and the named target ports no pod has.
pub fn derive(cluster: &Cluster, svc: &ServiceInfo) -> SliceRecord {
    let mut record = SliceRecord::default();
    let Some(selector) = svc.selector.as_ref().filter(|s| !s.is_empty()) else {
        return record;
    };
    let pods: Vec<&PodInfo> = cluster
        .namespace_id(&svc.key.namespace)
        .and_then(|ns| cluster.namespace_record(ns))
        .into_iter()
        .flat_map(|ns| ns.pods.iter())
        .filter_map(|idx| cluster.pod_record(*idx))
        .map(|r| &r.info)
        .filter(|p| selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
        .collect();
    let mut resolved_anywhere = vec![false; svc.ports.len()];
    for v6 in svc.families() {
        // Endpoints grouped by their set of resolved ports: one slice per group.
        let mut groups: BTreeMap<Vec<SlicePort>, Vec<SliceEndpoint>> = BTreeMap::new();
        for pod in &pods {
            let Some(ip) = pod.ips.iter().find(|ip| ip.is_ipv6() == v6) else {
                continue;
            };
            let state = match (pod.serving, pod.terminating) {
                (true, false) => BackendState::Ready,
                (true, true) => BackendState::Terminating,
                (false, _) => continue,
            };
            let mut ports = Vec::new();
            for (i, p) in svc.ports.iter().enumerate() {
                let number = match &p.target {
                    TargetPort::Number(n) => Some(*n),
                    TargetPort::Name(name) => pod.resolve_port(name, p.protocol).first().copied(),
                };
                if let Some(port) = number {
                    resolved_anywhere[i] = true;
                    ports.push(SlicePort {
                        name: p.name.clone(),
                        protocol: p.protocol,
                        port,
                    });
                }
            }
            if ports.is_empty() {
                continue;
            }
            ports.sort();
            groups.entry(ports).or_default().push(SliceEndpoint {
                ips: vec![*ip],
                node: pod.node.clone().unwrap_or_default(),
                state,
            });
        }
        let family = if v6 { "ipv6" } else { "ipv4" };
        for (i, (ports, mut endpoints)) in groups.into_iter().enumerate() {
            endpoints.sort();
            record.slices.push(SliceInfo {
                key: ObjectName::new(&svc.key.namespace, format!("{}-{family}-{i}", svc.key.name)),
                service: Some(svc.key.name.clone()),
                ports,
                endpoints,
            });
        }
    }
    let any_serving = pods.iter().any(|p| p.serving && !p.ips.is_empty());
    for (i, p) in svc.ports.iter().enumerate() {
        if let (TargetPort::Name(name), false, true) =
            (&p.target, resolved_anywhere[i], any_serving)
        {
            record.diagnostics.push(ServiceDiagnostic {
                kind: "Service",
                object: svc.key.clone(),
                field: format!("spec.ports[{}].targetPort", p.index),
                problem: format!(
                    "no selected pod has a container port named {name:?} ({}); the port has no backends",
                    p.protocol.as_api()
                ),
            });
        }
    }
    record
}
