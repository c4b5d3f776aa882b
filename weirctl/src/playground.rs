//! The playground: a directory of manifests (namespaces, pods with labels, node names and
//! addresses, policies, Services) compiled by the controller's own compiler, so that a
//! trace or a policy listing answers offline what a cluster running these objects would do.
//! Pods without `spec.nodeName` go to one node named `playground`.

use std::path::Path;

use anyhow::Result;
use weir_controller::{Cluster, Compiler, PodInfo};

use crate::{
    objects::{PLAYGROUND_NODE, load_dir},
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
    let mut cluster = load_dir(dir, Some(PLAYGROUND_NODE))?;
    cluster.derive_endpoint_slices();
    let out = Compiler::new().compile_all(&cluster);
    let pods: Vec<PodInfo> = cluster.pods().cloned().collect();
    let views = views_from_states(
        &out.nodes,
        &pods,
        &format!("compiled from {}", dir.display()),
    );
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
