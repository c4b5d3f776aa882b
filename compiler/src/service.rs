//! Services (`v1`) and EndpointSlices (`discovery.k8s.io/v1`) as the service compiler reads
//! them: what a proxy needs of each, checked once when the object is stored.
//!
//! What the compiler cannot use is reported as a [`ServiceDiagnostic`] for that object and
//! left out — one port of a Service, one endpoint of a slice — so a mistake in one object
//! never disturbs another (the API server rejects most of these; manifest directories do
//! not have one).
//!
//! API references: <https://kubernetes.io/docs/reference/kubernetes-api/service-resources/service-v1/>,
//! <https://kubernetes.io/docs/reference/kubernetes-api/service-resources/endpoint-slice-v1/>.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::util::intstr::IntOrString,
};
use weir_api::{BackendState, canonical_ip};

use super::{Error, Result, policy::Protocol};

/// Label on an EndpointSlice naming the Service it belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` when unset (three hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The API server's bound on `sessionAffinityConfig.clientIP.timeoutSeconds` (one day).
const MAX_AFFINITY_TIMEOUT_S: i32 = 86_400;

/// A namespaced object by namespace and name (a Service or an EndpointSlice).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectName {
    pub namespace: String,
    pub name: String,
}

impl ObjectName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            // A cluster-scoped object.
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// Something the service compiler cannot use in one object, which it leaves out.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceDiagnostic {
    /// `Service` or `EndpointSlice`.
    pub kind: &'static str,
    pub object: ObjectName,
    /// Path of the field, as the API server writes it.
    pub field: String,
    pub problem: String,
}

impl fmt::Display for ServiceDiagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}: {}",
            self.kind, self.object, self.field, self.problem
        )
    }
}

/// A Service port's `targetPort`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TargetPort {
    Number(u16),
    /// A container port name, resolved per backend pod.
    Name(String),
}

/// One usable port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// Position in `spec.ports` (for diagnostics).
    pub index: usize,
    /// Empty for an unnamed port (allowed only when the Service has one port).
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub target: TargetPort,
    /// Set for types NodePort and LoadBalancer (the API server allocates it).
    pub node_port: Option<u16>,
}

/// What the service compiler needs of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub key: ObjectName,
    /// `spec.clusterIPs` (or `spec.clusterIP`); empty for headless Services (`None`) and
    /// for Services the API server has not given one.
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.ipFamilies` (`IPv4`, `IPv6`) as the API server filled it in; may be empty.
    pub ipv6_families: Vec<bool>,
    pub ports: Vec<ServicePort>,
    /// `spec.selector`; None: the Service's EndpointSlices are written by someone else.
    pub selector: Option<BTreeMap<String, String>>,
    /// Type NodePort or LoadBalancer: its ports' nodePorts are open on every node.
    pub node_ports: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// `sessionAffinity: ClientIP`: the timeout in seconds.
    pub affinity_timeout_s: Option<u32>,
}

impl ServiceInfo {
    /// Reads a Service. Fails only without a name or namespace; whatever else is unusable is
    /// left out and described in the returned diagnostics.
    pub fn from_service(svc: &Service) -> Result<(Self, Vec<ServiceDiagnostic>)> {
        let key = object_name("Service", &svc.metadata)?;
        let mut diags = Vec::new();
        let mut problem = |field: String, problem: String| {
            diags.push(ServiceDiagnostic {
                kind: "Service",
                object: key.clone(),
                field,
                problem,
            })
        };
        let spec = svc.spec.clone().unwrap_or_default();
        let listed: Vec<(String, String)> = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips
                .iter()
                .enumerate()
                .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.clone()))
                .collect(),
            _ => spec
                .cluster_ip
                .iter()
                .map(|ip| ("spec.clusterIP".to_owned(), ip.clone()))
                .collect(),
        };
        let mut cluster_ips = Vec::new();
        for (field, text) in listed {
            if text.is_empty() || text == "None" {
                continue;
            }
            match text.parse::<IpAddr>() {
                Ok(ip) if !ip.is_unspecified() && !ip.is_multicast() => {
                    let ip = canonical_ip(ip);
                    if !cluster_ips.contains(&ip) {
                        cluster_ips.push(ip);
                    }
                }
                _ => problem(field, format!("{text:?} is not a usable IP address")),
            }
        }
        let ipv6_families = spec
            .ip_families
            .iter()
            .flatten()
            .filter_map(|f| match f.as_str() {
                "IPv4" => Some(false),
                "IPv6" => Some(true),
                _ => None,
            })
            .collect();
        let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
        let node_ports = matches!(type_, "NodePort" | "LoadBalancer");
        let mut ports = Vec::new();
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            let at = |f: &str| format!("spec.ports[{i}].{f}");
            let protocol = match p.protocol.as_deref() {
                None => Protocol::Tcp,
                Some(s) => match Protocol::from_api(s) {
                    Some(p) => p,
                    None => {
                        problem(at("protocol"), format!("unknown protocol {s:?}"));
                        continue;
                    }
                },
            };
            let Some(port) = port_number(p.port) else {
                problem(at("port"), format!("{} is not a port (1-65535)", p.port));
                continue;
            };
            let target = match &p.target_port {
                None => TargetPort::Number(port),
                Some(IntOrString::Int(n)) => match port_number(*n) {
                    Some(n) => TargetPort::Number(n),
                    None => {
                        problem(at("targetPort"), format!("{n} is not a port (1-65535)"));
                        continue;
                    }
                },
                Some(IntOrString::String(s)) if s.is_empty() => TargetPort::Number(port),
                Some(IntOrString::String(s)) => match s.parse::<i32>() {
                    // The API accepts a number written as a string.
                    Ok(n) => match port_number(n) {
                        Some(n) => TargetPort::Number(n),
                        None => {
                            problem(at("targetPort"), format!("{n} is not a port (1-65535)"));
                            continue;
                        }
                    },
                    Err(_) => TargetPort::Name(s.clone()),
                },
            };
            let node_port = match p.node_port {
                Some(n) if node_ports => match port_number(n) {
                    Some(n) => Some(n),
                    None => {
                        problem(at("nodePort"), format!("{n} is not a port (1-65535)"));
                        None
                    }
                },
                _ => None,
            };
            ports.push(ServicePort {
                index: i,
                name: p.name.clone().unwrap_or_default(),
                protocol,
                port,
                target,
                node_port,
            });
        }
        let affinity_timeout_s = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            let set = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match set {
                None => DEFAULT_AFFINITY_TIMEOUT_S,
                Some(s) if (1..=MAX_AFFINITY_TIMEOUT_S).contains(&s) => s.unsigned_abs(),
                Some(s) => {
                    problem(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                        format!(
                            "{s} is not within 1-{MAX_AFFINITY_TIMEOUT_S}; the default {DEFAULT_AFFINITY_TIMEOUT_S} applies"
                        ),
                    );
                    DEFAULT_AFFINITY_TIMEOUT_S
                }
            }
        });
        let info = Self {
            key,
            cluster_ips,
            ipv6_families,
            ports,
            // The API server stores an empty selector as none.
            selector: spec.selector.clone().filter(|s| !s.is_empty()),
            node_ports,
            internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
            affinity_timeout_s,
        };
        Ok((info, diags))
    }

    /// The address families of the Service (false: IPv4, true: IPv6): those of its
    /// ClusterIPs, else `spec.ipFamilies`, else IPv4 (the API server's single-stack default).
    pub fn families(&self) -> Vec<bool> {
        let mut families: Vec<bool> = if self.cluster_ips.is_empty() {
            self.ipv6_families.clone()
        } else {
            self.cluster_ips.iter().map(IpAddr::is_ipv6).collect()
        };
        families.dedup();
        if families.is_empty() {
            families.push(false);
        }
        families
    }
}

/// One port of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlicePort {
    /// Matches the Service port's name (empty for an unnamed one).
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// One endpoint of an EndpointSlice that may take traffic.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SliceEndpoint {
    pub ips: Vec<IpAddr>,
    /// `nodeName`; empty if the slice does not say.
    pub node: String,
    pub state: BackendState,
}

/// What the service compiler needs of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    pub key: ObjectName,
    /// The Service it belongs to (label `kubernetes.io/service-name`), in the same namespace.
    pub service: Option<String>,
    pub ports: Vec<SlicePort>,
    /// Endpoints that are ready, or serving and terminating; the others take no traffic.
    pub endpoints: Vec<SliceEndpoint>,
}

impl SliceInfo {
    /// Reads an EndpointSlice. Fails only without a name or namespace. FQDN slices have no
    /// addresses a dataplane can use and read as empty.
    pub fn from_endpoint_slice(slice: &EndpointSlice) -> Result<(Self, Vec<ServiceDiagnostic>)> {
        let key = object_name("EndpointSlice", &slice.metadata)?;
        let mut diags = Vec::new();
        let mut problem = |field: String, problem: String| {
            diags.push(ServiceDiagnostic {
                kind: "EndpointSlice",
                object: key.clone(),
                field,
                problem,
            })
        };
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .filter(|s| !s.is_empty())
            .cloned();
        let ip_family = match slice.address_type.as_str() {
            "IPv4" => Some(false),
            "IPv6" => Some(true),
            "FQDN" => None,
            other => {
                problem(
                    "addressType".into(),
                    format!("unknown address type {other:?}"),
                );
                None
            }
        };
        let mut ports = Vec::new();
        let mut endpoints = Vec::new();
        if let Some(v6) = ip_family {
            for (i, p) in slice.ports.iter().flatten().enumerate() {
                let at = |f: &str| format!("ports[{i}].{f}");
                let protocol = match p.protocol.as_deref() {
                    None => Protocol::Tcp,
                    Some(s) => match Protocol::from_api(s) {
                        Some(p) => p,
                        None => {
                            problem(at("protocol"), format!("unknown protocol {s:?}"));
                            continue;
                        }
                    },
                };
                // A slice port without a number does not say where to send traffic.
                let Some(n) = p.port else { continue };
                let Some(port) = port_number(n) else {
                    problem(at("port"), format!("{n} is not a port (1-65535)"));
                    continue;
                };
                ports.push(SlicePort {
                    name: p.name.clone().unwrap_or_default(),
                    protocol,
                    port,
                });
            }
            for (i, e) in slice.endpoints.iter().enumerate() {
                let conditions = e.conditions.clone().unwrap_or_default();
                // Unset conditions: ready is "unknown, take it as ready", serving follows
                // ready, terminating is false (the API's documented meaning).
                let ready = conditions.ready.unwrap_or(true);
                let serving = conditions.serving.unwrap_or(ready);
                let terminating = conditions.terminating.unwrap_or(false);
                let state = if ready && !terminating {
                    BackendState::Ready
                } else if serving && terminating {
                    BackendState::Terminating
                } else {
                    continue;
                };
                let mut ips = Vec::new();
                for (j, text) in e.addresses.iter().enumerate() {
                    match text.parse::<IpAddr>().map(canonical_ip) {
                        Ok(ip) if ip.is_ipv6() == v6 && !ip.is_unspecified() => ips.push(ip),
                        _ => problem(
                            format!("endpoints[{i}].addresses[{j}]"),
                            format!("{text:?} is not an address of type {}", slice.address_type),
                        ),
                    }
                }
                if ips.is_empty() {
                    continue;
                }
                endpoints.push(SliceEndpoint {
                    ips,
                    node: e.node_name.clone().unwrap_or_default(),
                    state,
                });
            }
        }
        ports.sort();
        ports.dedup();
        endpoints.sort();
        Ok((
            Self {
                key,
                service,
                ports,
                endpoints,
            },
            diags,
        ))
    }
}

fn object_name(
    kind: &'static str,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<ObjectName> {
    let name = meta
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or(Error::MissingName { kind })?;
    let namespace = meta
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| Error::MissingNamespace {
            kind,
            name: name.clone(),
        })?;
    Ok(ObjectName { namespace, name })
}

fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p > 0)
}
