//! The agent's record of the pods it has attached, persisted so that a restarted agent
//! re-adopts them (re-attaches programs, rewrites map entries) without touching their
//! traffic.

use std::{
    collections::BTreeMap,
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use weir_api::PodKey;
use weir_cni::spec::PortMapping;

use crate::podnet::PodInterface;

/// One pod attachment (CNI: container id + interface name).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalEndpoint {
    pub container_id: String,
    pub ifname: String,
    /// From the runtime's CNI_ARGS (K8S_POD_NAMESPACE / K8S_POD_NAME); None outside Kubernetes.
    pub pod: Option<PodKey>,
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
    pub mtu: u32,
    pub interface: PodInterface,
    /// The pod's hostPorts (CNI `portMappings`), served as NodePort-like frontends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_ports: Vec<HostPort>,
}

/// One of an endpoint's host ports, with the Service id its frontend carries (ids from
/// [`crate::host_ports::IDS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPort {
    #[serde(flatten)]
    pub mapping: PortMapping,
    pub id: u32,
}

pub type AttachmentId = (String, String);

#[derive(Debug, Error)]
pub enum EndpointStoreError {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("endpoint state {path} is corrupt")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Endpoints by attachment, written atomically on every change.
pub struct EndpointStore {
    path: PathBuf,
    endpoints: BTreeMap<AttachmentId, LocalEndpoint>,
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    endpoints: Vec<LocalEndpoint>,
}

impl EndpointStore {
    pub fn open(state_dir: &Path) -> Result<Self, EndpointStoreError> {
        let path = state_dir.join("endpoints.json");
        let endpoints = match fs::read(&path) {
            Ok(bytes) => {
                let disk: OnDisk = serde_json::from_slice(&bytes).map_err(|source| {
                    EndpointStoreError::Corrupt {
                        path: path.clone(),
                        source,
                    }
                })?;
                disk.endpoints
                    .into_iter()
                    .map(|e| ((e.container_id.clone(), e.ifname.clone()), e))
                    .collect()
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(EndpointStoreError::Io {
                    action: "reading",
                    path,
                    source,
                });
            }
        };
        Ok(Self { path, endpoints })
    }

    pub fn get(&self, container_id: &str, ifname: &str) -> Option<&LocalEndpoint> {
        self.endpoints
            .get(&(container_id.to_string(), ifname.to_string()))
    }

    pub fn iter(&self) -> impl Iterator<Item = &LocalEndpoint> {
        self.endpoints.values()
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    pub fn insert(&mut self, ep: LocalEndpoint) -> Result<(), EndpointStoreError> {
        self.endpoints
            .insert((ep.container_id.clone(), ep.ifname.clone()), ep);
        self.persist()
    }

    pub fn remove(
        &mut self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<LocalEndpoint>, EndpointStoreError> {
        let removed = self
            .endpoints
            .remove(&(container_id.to_string(), ifname.to_string()));
        if removed.is_some() {
            self.persist()?;
        }
        Ok(removed)
    }

    /// Through [`weir_persist::replace`]: a crash leaves the old or the new state, never a
    /// torn one.
    fn persist(&self) -> Result<(), EndpointStoreError> {
        let disk = OnDisk {
            version: 1,
            endpoints: self.endpoints.values().cloned().collect(),
        };
        let bytes = serde_json::to_vec_pretty(&disk).expect("endpoint state serialises");
        weir_persist::replace(&self.path, &bytes, 0o644).map_err(|source| {
            EndpointStoreError::Io {
                action: "replacing",
                path: self.path.clone(),
                source,
            }
        })?;
        Ok(())
    }
}
