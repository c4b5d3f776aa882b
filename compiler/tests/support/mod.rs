//! Builders for test clusters: namespaces, pods and policies in a few words.

#![allow(
    dead_code,
    reason = "each test file uses a different subset of the helpers"
)]

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::{
    api::{
        core::v1::{Container, ContainerPort, Namespace, Node, Pod, PodIP, PodSpec, PodStatus},
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use weir_api::PodKey;
use weir_compiler::{
    Cluster, CompileOutput, Compiler,
    oracle::{self, Endpoint},
};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
pub const ICMP: u8 = 1;

pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A Node with these labels and `status.addresses` (`(type, address)`: `InternalIP`,
/// `ExternalIP`, `Hostname`, ...).
pub fn node(name: &str, pairs: &[(&str, &str)], addresses: &[(&str, &str)]) -> Node {
    let addresses: Vec<_> = addresses
        .iter()
        .map(|(kind, address)| serde_json::json!({"type": kind, "address": address}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels(pairs)},
        "status": {"addresses": addresses},
    }))
    .expect("Node")
}

pub fn namespace(name: &str, pairs: &[(&str, &str)]) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(labels(pairs)),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A pod spec builder.
#[derive(Clone, Debug)]
pub struct PodBuilder {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub node: Option<String>,
    pub ips: Vec<String>,
    /// (name, number, protocol)
    pub ports: Vec<(String, i32, String)>,
    pub host_network: bool,
    pub phase: Option<String>,
}

pub fn pod(key: &str) -> PodBuilder {
    let (namespace, name) = key.split_once('/').expect("ns/name");
    PodBuilder {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        labels: BTreeMap::new(),
        node: Some("node-1".to_owned()),
        ips: Vec::new(),
        ports: Vec::new(),
        host_network: false,
        phase: Some("Running".to_owned()),
    }
}

impl PodBuilder {
    pub fn labels(mut self, pairs: &[(&str, &str)]) -> Self {
        self.labels = labels(pairs);
        self
    }
    pub fn node(mut self, node: &str) -> Self {
        self.node = Some(node.to_owned());
        self
    }
    pub fn ip(mut self, ip: &str) -> Self {
        self.ips.push(ip.to_owned());
        self
    }
    pub fn port(mut self, name: &str, number: i32, protocol: &str) -> Self {
        self.ports
            .push((name.to_owned(), number, protocol.to_owned()));
        self
    }
    pub fn host_network(mut self) -> Self {
        self.host_network = true;
        self
    }
    pub fn phase(mut self, phase: &str) -> Self {
        self.phase = Some(phase.to_owned());
        self
    }
    pub fn key(&self) -> PodKey {
        PodKey::new(&self.namespace, &self.name)
    }
    pub fn build(&self) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(self.labels.clone()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: self.node.clone(),
                host_network: Some(self.host_network),
                containers: vec![Container {
                    name: "main".to_owned(),
                    ports: Some(
                        self.ports
                            .iter()
                            .map(|(name, number, protocol)| ContainerPort {
                                name: Some(name.clone()),
                                container_port: *number,
                                protocol: Some(protocol.clone()),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: self.phase.clone(),
                pod_ip: self.ips.first().cloned(),
                pod_ips: Some(self.ips.iter().map(|ip| PodIP { ip: ip.clone() }).collect()),
                ..Default::default()
            }),
        }
    }
}

/// A NetworkPolicy from YAML.
pub fn policy(yaml: &str) -> NetworkPolicy {
    serde_norway::from_str(yaml).expect("test policy YAML")
}

/// A cluster built from namespaces, pods and policies (policies may be invalid).
pub fn cluster(
    namespaces: &[Namespace],
    pods: &[PodBuilder],
    policies: &[NetworkPolicy],
) -> Cluster {
    let mut c = Cluster::retaining_policy_specs();
    for n in namespaces {
        c.upsert_namespace(n).expect("namespace");
    }
    for p in pods {
        c.upsert_pod(&p.build()).expect("pod");
    }
    for p in policies {
        c.upsert_policy(p).expect("policy");
    }
    c
}

pub fn pod_ep(key: &str) -> Endpoint {
    let (ns, name) = key.split_once('/').expect("ns/name");
    Endpoint::Pod(PodKey::new(ns, name))
}

pub fn ip_ep(ip: &str) -> Endpoint {
    Endpoint::Ip(ip.parse::<IpAddr>().expect("ip"))
}

/// Compiles and checks that the emulated dataplane and the oracle agree on the connection;
/// returns the verdict.
pub struct Harness {
    pub cluster: Cluster,
    pub compiler: Compiler,
    pub out: CompileOutput,
}

impl Harness {
    pub fn new(cluster: Cluster) -> Self {
        let mut compiler = Compiler::new().with_threads(1);
        let out = compiler.compile_all(&cluster);
        Self {
            cluster,
            compiler,
            out,
        }
    }

    pub fn recompile(&mut self) {
        self.out = self.compiler.compile_all(&self.cluster);
    }

    /// The verdict, asserting the dataplane emulation and the oracle agree.
    pub fn allows(&self, src: &Endpoint, dst: &Endpoint, protocol: u8, port: u16) -> bool {
        let dataplane = oracle::emulated_allows(&self.cluster, &self.out, src, dst, protocol, port);
        let reference =
            oracle::allowed(&self.cluster, src, dst, protocol, port).expect("specs retained");
        assert_eq!(
            dataplane, reference,
            "dataplane {dataplane} vs oracle {reference} for {src:?} -> {dst:?} proto {protocol} port {port}\nstate: {:#?}",
            self.out.nodes
        );
        reference
    }

    pub fn tcp(&self, src: &str, dst: &str, port: u16) -> bool {
        self.allows(&parse_ep(src), &parse_ep(dst), TCP, port)
    }
}

/// "ns/pod" or an IP address.
pub fn parse_ep(s: &str) -> Endpoint {
    if s.contains('/') && !s.contains(':') && s.parse::<IpAddr>().is_err() {
        pod_ep(s)
    } else {
        ip_ep(s)
    }
}
