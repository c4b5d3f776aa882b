//! The playground: a directory of manifests (namespaces, pods with labels, node names and
//! addresses, Nodes with theirs, policies, Services) compiled by the controller's own
//! compiler, so that a trace or a policy listing answers offline what a cluster running
//! these objects would do.
//! Pods without `spec.nodeName` go to one node named `playground`.

use std::path::Path;

use anyhow::Result;
use weir_compiler::{Cluster, Compiler, PodInfo};

use crate::{
    objects::{PLAYGROUND_NODE, load_dir_with_node_addresses},
    trace::{NodeView, views_from_states},
};

pub struct Playground {
    pub views: Vec<NodeView>,
    pub pods: Vec<PodInfo>,
    /// What the compiler says about the policies (invalid ones fail closed).
    pub diagnostics: Vec<String>,
    /// The store the states were compiled from.
    pub cluster: Cluster,
}

pub fn compile(dir: &Path) -> Result<Playground> {
    let (mut cluster, node_addresses) = load_dir_with_node_addresses(dir, Some(PLAYGROUND_NODE))?;
    cluster.derive_endpoint_slices();
    let out = Compiler::new().compile_all(&cluster);
    let pods: Vec<PodInfo> = cluster.pods().cloned().collect();
    let mut views = views_from_states(
        &out.nodes,
        &pods,
        &format!("compiled from {}", dir.display()),
    );
    // A Node's addresses are its own, as the agent's `HOST_ADDRS` (nodePorts are on them).
    for view in &mut views {
        if let Some(addrs) = node_addresses.get(&view.node) {
            view.host_addrs.extend(addrs.iter().copied());
        }
    }
    let diagnostics = out
        .diagnostics
        .iter()
        .map(|d| d.to_string())
        .chain(out.service_diagnostics.iter().map(|d| d.to_string()))
        .collect();
    Ok(Playground {
        views,
        pods,
        diagnostics,
        cluster,
    })
}
