//! Kubernetes objects into the controller's typed store: the pod list that names addresses,
//! and the playground's input.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

use anyhow::{Result, bail};
use weir_compiler::Cluster;
use weir_controller::source::{Change, ManifestDir, Object};

/// Node a playground pod without `spec.nodeName` is placed on.
pub const PLAYGROUND_NODE: &str = "playground";

/// Reads every manifest under `dir` into a store. A file that does not parse is an error
/// (nothing is guessed); so is an object the store refuses.
pub fn load_dir(dir: &Path, default_node: Option<&str>) -> Result<Cluster> {
    load_dir_with_node_addresses(dir, default_node).map(|(cluster, _)| cluster)
}

/// [`load_dir`], and the addresses each Node object lists in `status.addresses` (the store
/// keeps node names only).
pub fn load_dir_with_node_addresses(
    dir: &Path,
    default_node: Option<&str>,
) -> Result<(Cluster, BTreeMap<String, BTreeSet<IpAddr>>)> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let scan = ManifestDir::new(dir).scan();
    if !scan.errors.is_empty() {
        let errors: Vec<String> = scan.errors.iter().map(|e| e.to_string()).collect();
        bail!("manifests that do not parse:\n  {}", errors.join("\n  "));
    }
    let mut cluster = Cluster::retaining_policy_specs();
    let mut refused = Vec::new();
    let mut node_addresses = BTreeMap::new();
    for change in scan.changes {
        let Change::Upsert(object) = change else {
            continue;
        };
        let mut object = *object;
        if let Object::Node(node) = &object
            && let Some(name) = &node.metadata.name
        {
            let addrs = node
                .status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|a| a.address.parse::<IpAddr>().ok());
            node_addresses
                .entry(name.clone())
                .or_insert_with(BTreeSet::new)
                .extend(addrs);
        }
        if let (Object::Pod(pod), Some(node)) = (&mut object, default_node) {
            let spec = pod.spec.get_or_insert_with(Default::default);
            if spec.node_name.is_none() {
                spec.node_name = Some(node.to_string());
            }
        }
        if let Err(e) = upsert(&mut cluster, &object) {
            refused.push(format!("{}: {e}", object.key()));
        }
    }
    if !refused.is_empty() {
        bail!("objects that cannot be used:\n  {}", refused.join("\n  "));
    }
    Ok((cluster, node_addresses))
}

pub fn upsert(cluster: &mut Cluster, object: &Object) -> weir_compiler::Result<()> {
    match object {
        Object::Namespace(o) => cluster.upsert_namespace(o),
        Object::Pod(o) => cluster.upsert_pod(o),
        Object::Node(o) => cluster.upsert_node(o),
        Object::NetworkPolicy(o) => cluster.upsert_policy(o).map(|_| ()),
        Object::ClusterNetworkPolicy(o) => cluster.upsert_cluster_policy(o).map(|_| ()),
        Object::Service(o) => cluster.upsert_service(o).map(|_| ()),
        Object::EndpointSlice(o) => cluster.upsert_endpoint_slice(o).map(|_| ()),
        Object::DropCidrSet(o) => cluster.upsert_drop_set(o).map(|_| ()),
        Object::HostPolicy(o) => cluster.upsert_host_policy(o).map(|_| ()),
    }
}
