//! The controller's loop: changes in, compile, publish per-node states that changed.
//!
//! I/O stays at the edges: [`Controller`] applies [`Change`]s to the typed [`Cluster`], calls
//! the pure compiler and hands new node states to the [`StatePublisher`], which streams
//! them to agents. Sources ([`run_directory`], the Kubernetes watchers) only feed changes.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};
use weir_api::{NodeState, PodKey};
use weir_transport::StatePublisher;

use crate::{
    Cluster, Compiler, PolicyKey,
    source::{Change, ManifestDir, Object},
};

/// The cluster as the controller knows it, and what it published.
pub struct Controller {
    cluster: Cluster,
    compiler: Compiler,
    publisher: StatePublisher,
    published: BTreeMap<String, (u64, Arc<NodeState>)>,
    /// Diagnostics already reported, so each is logged once.
    reported: BTreeSet<String>,
}

impl Controller {
    pub fn new(publisher: StatePublisher) -> Self {
        Self {
            cluster: Cluster::new(),
            compiler: Compiler::new(),
            publisher,
            published: BTreeMap::new(),
            reported: BTreeSet::new(),
        }
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Applies source changes to the cluster. A malformed object is reported and skipped;
    /// everything else still applies.
    pub fn apply(&mut self, changes: Vec<Change>) {
        for change in changes {
            let result = match &change {
                Change::Upsert(o) => match o.as_ref() {
                    Object::Namespace(o) => self.cluster.upsert_namespace(o),
                    Object::Pod(o) => self.cluster.upsert_pod(o),
                    Object::Node(o) => self.cluster.upsert_node(o),
                    Object::NetworkPolicy(o) => self.cluster.upsert_policy(o).map(|_| ()),
                },
                Change::Delete(k) => {
                    match k.kind {
                        "Namespace" => self.cluster.delete_namespace(&k.name),
                        "Pod" => self.cluster.delete_pod(&PodKey::new(&k.namespace, &k.name)),
                        "Node" => self.cluster.delete_node(&k.name),
                        "NetworkPolicy" => self
                            .cluster
                            .delete_policy(&PolicyKey::new(&k.namespace, &k.name)),
                        _ => {}
                    }
                    Ok(())
                }
            };
            if let Err(e) = result {
                warn!(error = %e, "ignoring a malformed object");
            }
        }
    }

    /// Compiles every node and publishes the states that changed. Returns the version each
    /// node is now at.
    pub fn recompute(&mut self) -> BTreeMap<String, u64> {
        let out = self.compiler.compile_all(&self.cluster);
        let mut current = BTreeSet::new();
        for d in &out.diagnostics {
            let line = d.to_string();
            current.insert(line.clone());
            if !self.reported.contains(&line) {
                warn!(diagnostic = %line, "invalid policy (it fails closed for the pods it selects)");
            }
        }
        self.reported = current;
        let mut versions = BTreeMap::new();
        for (node, state) in out.nodes {
            let (version, changed) = match self.published.get(&node) {
                Some((v, old)) if **old == state => (*v, false),
                Some((v, _)) => (v + 1, true),
                None => (1, true),
            };
            if changed {
                let state = Arc::new(state);
                match self.publisher.publish(&node, version, state.clone()) {
                    Ok(()) => {
                        debug!(%node, version, "published");
                        self.published.insert(node.clone(), (version, state));
                    }
                    Err(e) => warn!(%node, error = %e, "publishing node state"),
                }
            }
            versions.insert(node, version);
        }
        let gone: Vec<String> = self
            .published
            .keys()
            .filter(|n| !versions.contains_key(*n))
            .cloned()
            .collect();
        for node in gone {
            info!(%node, "node gone");
            self.publisher.remove_node(&node);
            self.compiler.forget_node(&node);
            self.published.remove(&node);
        }
        versions
    }
}

/// What the controller reports for writers of a manifest directory.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SyncStatus {
    /// The highest sync token whose changes every node's agent has applied.
    pub synced: u64,
}

/// Runs the controller on a directory of manifests: every change to the directory is
/// applied within milliseconds; with `status_file`, the sync token (see
/// [`crate::source::SYNC_FILE`]) is written there once every agent enforces it.
pub async fn run_directory(
    dir: PathBuf,
    publisher: StatePublisher,
    status_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    use notify::Watcher as _;

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event| {
        let _ = tx.send(event);
    })?;
    watcher.watch(&dir, notify::RecursiveMode::Recursive)?;

    let (sync_tx, sync_rx) = watch::channel((0u64, BTreeMap::new()));
    if let Some(path) = status_file {
        tokio::spawn(report_sync(publisher.clone(), sync_rx, path));
    }
    let mut manifests = ManifestDir::new(&dir);
    let mut controller = Controller::new(publisher);
    let mut reported_errors = BTreeSet::new();
    loop {
        let token = manifests.sync_token();
        let scan = manifests.scan();
        let errors: BTreeSet<String> = scan.errors.iter().map(|e| e.to_string()).collect();
        for e in errors.difference(&reported_errors) {
            warn!(error = %e, "skipping a manifest file that does not parse (its last good contents stay)");
        }
        reported_errors = errors;
        if !scan.changes.is_empty() {
            debug!(changes = scan.changes.len(), "manifests changed");
            controller.apply(scan.changes);
        }
        let versions = controller.recompute();
        sync_tx.send_if_modified(|cur| {
            let next = (token, versions);
            let changed = *cur != next;
            *cur = next;
            changed
        });
        // Wait for the next change (events arrive in bursts: gather them briefly), with a
        // periodic rescan as a safety net for missed events.
        if let Ok(None) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            anyhow::bail!("the directory watcher stopped");
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
        while rx.try_recv().is_ok() {}
    }
}

/// Writes `{"synced": token}` to `path` whenever every agent has applied the node versions
/// computed from the manifests of that token.
async fn report_sync(
    publisher: StatePublisher,
    mut rx: watch::Receiver<(u64, BTreeMap<String, u64>)>,
    path: PathBuf,
) {
    loop {
        let (token, targets) = rx.borrow_and_update().clone();
        tokio::select! {
            _ = publisher.wait_for_applied(&targets) => {
                let status = SyncStatus { synced: token };
                let tmp = path.with_extension("tmp");
                let body = serde_json::to_vec(&status).expect("status serialises");
                if std::fs::write(&tmp, body).and_then(|_| std::fs::rename(&tmp, &path)).is_err() {
                    warn!(path = %path.display(), "writing the sync status");
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
            r = rx.changed() => {
                if r.is_err() {
                    return;
                }
            }
        }
    }
}
