//! The controller's loop: changes in, compile, publish per-node states that changed.
//!
//! I/O stays at the edges: [`Controller`] applies [`Change`]s to the typed [`Cluster`], calls
//! the pure compiler and hands new node states to the [`StatePublisher`], which streams
//! them to agents. Sources ([`run_directory`], the Kubernetes watchers) only feed changes.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use serde::Serialize;
use std::net::IpAddr;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};
use weir_api::{NodeRoute, NodeState, PodKey};
use weir_compiler::{
    Changes, Cluster, Compiler, PolicyKey, Severity,
    capacity::{self, Capacities, TooLarge},
    drop_cidrs, host_policy,
    service::{ObjectName, ServiceDiagnostic},
};
use weir_transport::StatePublisher;

use crate::{
    node_cidrs::{
        CidrError, CidrStore, NodeCidrAllocator, node_ip, node_other_ips, node_pod_cidrs,
    },
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
    /// What the last compile could not use of the Services and EndpointSlices.
    service_diagnostics: Vec<ServiceDiagnostic>,
    /// What the last compile could not use of the DropCIDRSets.
    drop_set_diagnostics: Vec<ServiceDiagnostic>,
    /// The prefilter every node state shares (replaced only when it changes, like routes).
    prefilter: Arc<BTreeMap<IpNet, String>>,
    /// Node objects: address and the pod CIDRs the cluster set.
    nodes: BTreeMap<String, NodeInfo>,
    node_cidrs: Option<(NodeCidrAllocator, Box<dyn CidrStore + Send>)>,
    /// What the store holds (loaded, adopted or saved): saved again only when it differs.
    cidrs_saved: crate::node_cidrs::Assignments,
    /// The route table every node state shares (replaced only when it changes, so unchanged
    /// node states compare equal by pointer).
    routes: Arc<BTreeMap<IpNet, NodeRoute>>,
    /// Whether ranges of nodes deleted while no controller ran have been released (at the
    /// first compile, when the node list is complete).
    cidrs_pruned: bool,
    /// Allocation errors already reported.
    cidr_errors: BTreeSet<String>,
    /// Told about every compile (metrics, readiness).
    compile_observer: Option<CompileObserver>,
    /// Derive EndpointSlices from pods (a manifest directory has no EndpointSlice
    /// controller).
    derive_endpoint_slices: bool,
    /// The map capacities a node's state is checked against when its agent reports none.
    capacities: Capacities,
    /// The map capacities agents reported (see [`StatePublisher::capacities`]).
    reported_capacities: watch::Receiver<BTreeMap<String, weir_api::MapCapacities>>,
    /// Rule sets too large for their node, as last reported (each is logged once).
    too_large_reported: BTreeSet<String>,
    /// Rule sets too large for their node at the last compile.
    too_large: Vec<TooLarge>,
    /// The same, by node (a compile refits only the nodes it recompiles).
    too_large_by_node: BTreeMap<String, Vec<TooLarge>>,
    /// A compiler that compiles everything after each compile, to check against.
    self_check: Option<Compiler>,
}

type CompileObserver = Box<dyn Fn(&CompileReport) + Send>;

/// What one [`Controller::recompute`] did, for observers (metrics, readiness).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileReport {
    /// Wall-clock time of the compile, route table and publishing included.
    pub duration: Duration,
    /// Nodes with a state after the compile.
    pub nodes: usize,
    /// Stored policies with at least one error (they fail closed).
    pub invalid_policies: usize,
    /// Nodes whose pod CIDR could not be allocated or respected (exhausted, overlapping).
    pub node_cidr_errors: usize,
    /// Services and EndpointSlices with something the compiler could not use (left out).
    pub invalid_service_objects: usize,
    /// DropCIDRSets with an entry left out (not a CIDR, cutting the cluster off, no room).
    pub invalid_drop_cidr_sets: usize,
    /// Rule sets (node, rule set) emptied because the node's state did not fit the agent's
    /// maps: the pods they select fail closed.
    pub rule_sets_too_large: usize,
}

#[derive(Clone, Debug, Default)]
struct NodeInfo {
    ip: Option<IpAddr>,
    other_ips: Vec<IpAddr>,
    preset_cidrs: Vec<IpNet>,
}

impl Controller {
    pub fn new(publisher: StatePublisher) -> Self {
        Self {
            reported_capacities: publisher.capacities(),
            cluster: Cluster::new(),
            compiler: Compiler::new(),
            publisher,
            published: BTreeMap::new(),
            reported: BTreeSet::new(),
            service_diagnostics: Vec::new(),
            drop_set_diagnostics: Vec::new(),
            prefilter: Arc::default(),
            nodes: BTreeMap::new(),
            node_cidrs: None,
            cidrs_saved: BTreeMap::new(),
            routes: Arc::default(),
            cidrs_pruned: false,
            cidr_errors: BTreeSet::new(),
            compile_observer: None,
            capacities: Default::default(),
            too_large_reported: BTreeSet::new(),
            too_large: Vec::new(),
            too_large_by_node: BTreeMap::new(),
            self_check: None,
            derive_endpoint_slices: false,
        }
    }

    /// Derives every Service's EndpointSlices from the pods before each compile, as
    /// Kubernetes' EndpointSlice controller would (for manifest directories; see
    /// [`Cluster::derive_endpoint_slices`]).
    pub fn deriving_endpoint_slices(mut self) -> Self {
        self.derive_endpoint_slices = true;
        self
    }

    /// Calls `observer` after every compile with what it did.
    /// Checks the state of every node whose agent reports no map capacities against these
    /// instead of the compiled-in ones.
    pub fn with_capacities(mut self, capacities: Capacities) -> Self {
        self.capacities = capacities;
        self
    }

    pub fn observe_compiles(mut self, observer: impl Fn(&CompileReport) + Send + 'static) -> Self {
        self.compile_observer = Some(Box::new(observer));
        self
    }

    /// Gives nodes without `spec.podCIDRs` a pod CIDR from `allocator`, persisted in `store`
    /// (earlier assignments are restored from it).
    pub fn with_node_cidrs(
        mut self,
        mut allocator: NodeCidrAllocator,
        store: Box<dyn CidrStore + Send>,
    ) -> Result<Self, CidrError> {
        let loaded = store.load()?;
        allocator.restore(loaded.clone());
        self.cidrs_saved = loaded;
        self.node_cidrs = Some((allocator, store));
        Ok(self)
    }

    /// What the last compile could not use of the Services and EndpointSlices.
    pub fn service_diagnostics(&self) -> &[ServiceDiagnostic] {
        &self.service_diagnostics
    }

    /// What the last compile could not use of the DropCIDRSets (left out).
    pub fn drop_set_diagnostics(&self) -> &[ServiceDiagnostic] {
        &self.drop_set_diagnostics
    }

    /// The rule sets the last compile found too large for their node (they fail closed).
    pub fn too_large(&self) -> &[TooLarge] {
        &self.too_large
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
                    Object::Node(o) => {
                        let name = o.metadata.name.clone().unwrap_or_default();
                        let ip = node_ip(o);
                        self.nodes.insert(
                            name,
                            NodeInfo {
                                ip,
                                other_ips: ip.map(|ip| node_other_ips(o, ip)).unwrap_or_default(),
                                preset_cidrs: node_pod_cidrs(o),
                            },
                        );
                        self.cluster.upsert_node(o)
                    }
                    Object::NetworkPolicy(o) => self.cluster.upsert_policy(o).map(|_| ()),
                    Object::ClusterNetworkPolicy(o) => {
                        self.cluster.upsert_cluster_policy(o).map(|_| ())
                    }
                    Object::Service(o) => self.cluster.upsert_service(o).map(|_| ()),
                    Object::EndpointSlice(o) => self.cluster.upsert_endpoint_slice(o).map(|_| ()),
                    Object::DropCidrSet(o) => self.cluster.upsert_drop_set(o).map(|_| ()),
                    Object::HostPolicy(o) => self.cluster.upsert_host_policy(o).map(|_| ()),
                },
                Change::Delete(k) => {
                    match k.kind {
                        "Namespace" => self.cluster.delete_namespace(&k.name),
                        "Pod" => self.cluster.delete_pod(&PodKey::new(&k.namespace, &k.name)),
                        "Node" => {
                            self.nodes.remove(&k.name);
                            if let Some((alloc, _)) = &mut self.node_cidrs {
                                alloc.release(&k.name);
                            }
                            self.cluster.delete_node(&k.name)
                        }
                        "NetworkPolicy" => self
                            .cluster
                            .delete_policy(&PolicyKey::new(&k.namespace, &k.name)),
                        "ClusterNetworkPolicy" => self.cluster.delete_cluster_policy(&k.name),
                        "Service" => self
                            .cluster
                            .delete_service(&ObjectName::new(&k.namespace, &k.name)),
                        "EndpointSlice" => self
                            .cluster
                            .delete_endpoint_slice(&ObjectName::new(&k.namespace, &k.name)),
                        drop_cidrs::KIND => self.cluster.delete_drop_set(&k.name),
                        host_policy::KIND => self.cluster.delete_host_policy(&k.name),
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

    /// Whether the node pod-CIDR store holds assignments (another replica's) the allocator has
    /// not adopted yet: [`Self::recompute`] adopts them.
    pub fn node_cidrs_pending(&self) -> bool {
        self.node_cidrs
            .as_ref()
            .is_some_and(|(_, store)| store.has_fresh())
    }

    /// Whether an agent reported map capacities other than the last compile used:
    /// [`Self::recompute`] fits its node's state to them.
    pub fn capacities_pending(&self) -> bool {
        self.reported_capacities.has_changed().unwrap_or(false)
    }

    /// Compiles what changed since the last call (every node, the first time and when an
    /// agent reports other map capacities) and publishes the states that changed. Returns
    /// the version each node is now at.
    pub fn recompute(&mut self) -> BTreeMap<String, u64> {
        let started = Instant::now();
        let capacities_changed = self.reported_capacities.has_changed().unwrap_or(false);
        let reported = self.reported_capacities.borrow_and_update().clone();
        if self.derive_endpoint_slices {
            self.cluster.derive_endpoint_slices();
        }
        let mut changes = self.cluster.take_changes();
        if capacities_changed {
            // A state cut down to fit its agent's maps cannot be fitted to others: compile
            // every node again.
            changes = Changes::default();
        }
        let update = self.compiler.compile_changes(&self.cluster, &changes);
        let invalid_policies = update
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .map(|d| &d.policy)
            .collect::<BTreeSet<_>>()
            .len();
        let mut current = BTreeSet::new();
        for d in &update.diagnostics {
            let line = d.to_string();
            current.insert(line.clone());
            if !self.reported.contains(&line) {
                warn!(diagnostic = %line, "invalid policy (it fails closed for the pods it selects)");
            }
        }
        let invalid_service_objects = update
            .service_diagnostics
            .iter()
            .map(|d| (d.kind, &d.object))
            .collect::<BTreeSet<_>>()
            .len();
        for d in &update.service_diagnostics {
            let line = d.to_string();
            current.insert(line.clone());
            if !self.reported.contains(&line) {
                warn!(diagnostic = %line, "unusable part of a Service or EndpointSlice (left out)");
            }
        }
        let routes = self.routes();
        let routes_changed = *self.routes != routes;
        if routes_changed {
            self.routes = Arc::new(routes);
        }
        let (prefilter, mut drop_diags) = self.prefilter_table();
        let prefilter_changed = *self.prefilter != prefilter;
        if prefilter_changed {
            self.prefilter = Arc::new(prefilter);
        }
        drop_diags.splice(0..0, self.cluster.drop_set_diagnostics().cloned());
        for d in &drop_diags {
            let line = d.to_string();
            current.insert(line.clone());
            if !self.reported.contains(&line) {
                warn!(diagnostic = %line, "unusable entry of a DropCIDRSet (left out)");
            }
        }
        let invalid_drop_cidr_sets = drop_diags
            .iter()
            .map(|d| &d.object)
            .collect::<BTreeSet<_>>()
            .len();
        self.drop_set_diagnostics = drop_diags;
        self.reported = current;
        self.service_diagnostics = update.service_diagnostics;

        // Nodes gone.
        let gone: Vec<String> = if update.everything {
            self.published
                .keys()
                .filter(|n| !update.nodes.contains_key(*n))
                .cloned()
                .collect()
        } else {
            update.removed.iter().cloned().collect()
        };
        for node in gone {
            info!(%node, "node gone");
            self.publisher.remove_node(&node);
            self.compiler.forget_node(&node);
            self.published.remove(&node);
            self.too_large_by_node.remove(&node);
        }
        if update.everything {
            self.too_large_by_node.clear();
        }
        // The states to publish: those recompiled (fitted to their agent's maps), and the
        // others' last states where a table every node shares changed.
        let mut states: Vec<(String, NodeState, bool)> = update
            .nodes
            .into_iter()
            .map(|(node, state)| (node, state, true))
            .collect();
        if !update.everything && (routes_changed || prefilter_changed || update.services_changed) {
            let recompiled: BTreeSet<String> = states.iter().map(|(n, _, _)| n.clone()).collect();
            for (node, (_, state)) in &self.published {
                if recompiled.contains(node) {
                    continue;
                }
                let mut state = (**state).clone();
                if update.services_changed {
                    state.services = self.compiler.services_for(node);
                }
                states.push((node.clone(), state, false));
            }
        }
        let mut published = 0usize;
        for (node, mut state, fit) in states {
            state.routes = self.routes.clone();
            state.prefilter = self.prefilter.clone();
            if fit {
                // A state the agent cannot hold is cut down to one it can, failing closed for
                // the policies that do not fit, before anything is published. The node's
                // agent's own map sizes; the defaults if it reports none.
                let caps = reported
                    .get(&node)
                    .map(Capacities::from)
                    .unwrap_or(self.capacities);
                let cut = capacity::fit(&node, &mut state, &caps);
                if cut.is_empty() {
                    self.too_large_by_node.remove(&node);
                } else {
                    self.too_large_by_node.insert(node.clone(), cut);
                }
            }
            let version = match self.published.get(&node) {
                Some((_, old)) if **old == state => continue,
                Some((v, _)) => v + 1,
                None => 1,
            };
            let state = Arc::new(state);
            match self.publisher.publish(&node, version, state.clone()) {
                Ok(()) => {
                    tracing::debug!(
                        %node,
                        version,
                        endpoints = state.endpoints.len(),
                        classes = state.peer_classes.len(),
                        verdicts = state.verdicts.len(),
                        routes = state.routes.len(),
                        services = state.services.len(),
                        "published node state"
                    );
                    self.published.insert(node, (version, state));
                    published += 1;
                }
                Err(e) => warn!(%node, error = %e, "publishing node state"),
            }
        }
        if published > 0 {
            info!(
                nodes = published,
                took = ?started.elapsed(),
                everything = update.everything,
                "published changed node states"
            );
        }
        let mut too_large = BTreeSet::new();
        for t in self.too_large_by_node.values().flatten() {
            let line = t.to_string();
            if !self.too_large_reported.contains(&line) {
                warn!(diagnostic = %line, "policies too large for the node's dataplane (they fail closed)");
            }
            too_large.insert(line);
        }
        let too_large_count = too_large.len();
        self.too_large_reported = too_large;
        self.too_large = self.too_large_by_node.values().flatten().cloned().collect();
        let versions: BTreeMap<String, u64> = self
            .published
            .iter()
            .map(|(n, (v, _))| (n.clone(), *v))
            .collect();
        if let Some(observe) = &self.compile_observer {
            observe(&CompileReport {
                duration: started.elapsed(),
                nodes: versions.len(),
                invalid_policies,
                node_cidr_errors: self.cidr_errors.len(),
                invalid_service_objects,
                invalid_drop_cidr_sets,
                rule_sets_too_large: too_large_count,
            });
        }
        if let Some(twin) = &mut self.self_check {
            let differing = check_against_full_compile(
                twin,
                &self.cluster,
                &self.published,
                &reported,
                self.capacities,
            );
            assert!(
                differing.is_empty(),
                "incremental compile differs from a full compile on {differing:?}"
            );
        }
        versions
    }

    /// Compiles every node with a compiler of its own after each compile and compares with
    /// what was published: a self-check for tests, which stops the controller (a panic) at
    /// the first difference.
    pub fn checking_incremental_compiles(mut self) -> Self {
        self.self_check = Some(Compiler::new());
        self
    }
}

/// Compiles every node with `twin`; returns the nodes whose published state differs.
fn check_against_full_compile(
    twin: &mut Compiler,
    cluster: &Cluster,
    published: &BTreeMap<String, (u64, Arc<NodeState>)>,
    reported: &BTreeMap<String, weir_api::MapCapacities>,
    defaults: Capacities,
) -> Vec<String> {
    let full = twin.compile_all(cluster);
    let mut failures = Vec::new();
    let names: BTreeSet<&String> = full.nodes.keys().chain(published.keys()).collect();
    for node in names {
        let expected = full.nodes.get(node).map(|state| {
            let mut state = state.clone();
            let caps = reported.get(node).map(Capacities::from).unwrap_or(defaults);
            capacity::fit(node, &mut state, &caps);
            state
        });
        let got = published.get(node).map(|(_, state)| {
            let mut state = (**state).clone();
            state.routes = Arc::default();
            state.prefilter = Arc::default();
            state
        });
        if expected != got {
            tracing::error!(%node, "incremental compile differs from a full compile");
            failures.push(node.clone());
        }
    }
    failures
}

impl Controller {
    /// The DropCIDRSets' prefixes every node drops, sparing nodes' addresses and pod CIDRs
    /// (see [`drop_cidrs`]), and what is left out.
    fn prefilter_table(&self) -> (BTreeMap<IpNet, String>, Vec<ServiceDiagnostic>) {
        let node_ips: BTreeMap<IpAddr, String> = self
            .nodes
            .iter()
            .filter_map(|(name, info)| Some((info.ip?, name.clone())))
            .collect();
        let pod_cidrs: BTreeMap<IpNet, String> = self
            .routes
            .iter()
            .map(|(cidr, r)| (*cidr, r.node.clone()))
            .collect();
        drop_cidrs::prefilter_table(
            self.cluster.drop_sets(),
            &node_ips,
            &pod_cidrs,
            drop_cidrs::CAPACITY,
        )
    }

    /// Every node's pod CIDRs and address: the route table every agent gets. Nodes without
    /// an address or a CIDR are left out (their agents wait).
    fn routes(&mut self) -> BTreeMap<IpNet, NodeRoute> {
        let mut routes = BTreeMap::new();
        let mut errors = BTreeSet::new();
        if let Some((alloc, store)) = &mut self.node_cidrs {
            if let Some(shared) = store.refresh() {
                alloc.restore(shared.clone());
                self.cidrs_saved = shared;
            }
            if !self.cidrs_pruned {
                let gone: Vec<String> = alloc
                    .allocated()
                    .keys()
                    .filter(|n| !self.nodes.contains_key(*n))
                    .cloned()
                    .collect();
                for node in gone {
                    info!(%node, "releasing the pod CIDR of a node that no longer exists");
                    alloc.release(&node);
                }
                self.cidrs_pruned = true;
            }
        }
        // Ranges the cluster set first: they win over ranges this controller would hand out.
        let order: Vec<(&String, &NodeInfo)> = self
            .nodes
            .iter()
            .filter(|(_, i)| !i.preset_cidrs.is_empty())
            .chain(self.nodes.iter().filter(|(_, i)| i.preset_cidrs.is_empty()))
            .collect();
        for (name, info) in order {
            let cidrs = match &mut self.node_cidrs {
                Some((alloc, _)) => match alloc.assign(name, &info.preset_cidrs) {
                    Ok(c) => c,
                    Err(e) => {
                        errors.insert(e.to_string());
                        continue;
                    }
                },
                None => info.preset_cidrs.clone(),
            };
            let Some(ip) = info.ip else { continue };
            for cidr in cidrs {
                routes.insert(
                    cidr,
                    NodeRoute {
                        node: name.clone(),
                        node_ip: ip,
                        other_ips: info.other_ips.clone(),
                    },
                );
            }
        }
        if let Some((alloc, store)) = &self.node_cidrs
            && *alloc.allocated() != self.cidrs_saved
        {
            match store.save(alloc.allocated()) {
                Ok(()) => self.cidrs_saved = alloc.allocated().clone(),
                Err(e) => {
                    errors.insert(e.to_string());
                }
            }
        }
        for e in errors.difference(&self.cidr_errors) {
            tracing::error!(error = %e, "pod CIDR allocation");
        }
        self.cidr_errors = errors;
        routes
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
    mut controller: Controller,
    status_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let publisher = controller.publisher.clone();
    let mut capacities = publisher.capacities();
    // No EndpointSlice controller writes into a directory: the slices come from the pods.
    controller.derive_endpoint_slices = true;
    use notify::Watcher as _;

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reads (including our own scans) are not changes: waking up on them would make the
        // controller chase its own tail.
        if let Ok(e) = &event
            && matches!(e.kind, notify::EventKind::Access(_))
        {
            return;
        }
        let _ = tx.send(event);
    })?;
    watcher.watch(&dir, notify::RecursiveMode::Recursive)?;

    let (sync_tx, sync_rx) = watch::channel((0u64, BTreeMap::new()));
    if let Some(path) = status_file {
        tokio::spawn(report_sync(publisher.clone(), sync_rx, path));
    }
    let mut manifests = ManifestDir::new(&dir);
    let mut last_versions: Option<BTreeMap<String, u64>> = None;
    let mut reported_errors = BTreeSet::new();
    loop {
        let token = manifests.sync_token();
        let scan = manifests.scan();
        let errors: BTreeSet<String> = scan.errors.iter().map(|e| e.to_string()).collect();
        for e in errors.difference(&reported_errors) {
            warn!(error = %e, "skipping a manifest file that does not parse (its last good contents stay)");
        }
        reported_errors = errors;
        let changed = !scan.changes.is_empty();
        if changed {
            debug!(changes = scan.changes.len(), "manifests changed");
            controller.apply(scan.changes);
        }
        // Compile only when something changed (and once at start), or when an agent
        // reported other map capacities.
        if changed || last_versions.is_none() || controller.capacities_pending() {
            last_versions = Some(controller.recompute());
        }
        let versions = last_versions.clone().unwrap_or_default();
        sync_tx.send_if_modified(|cur| {
            let next = (token, versions);
            let changed = *cur != next;
            *cur = next;
            changed
        });
        // Wait for the next change (events arrive in bursts: gather them briefly), with a
        // periodic rescan as a safety net for missed events.
        tokio::select! {
            event = tokio::time::timeout(Duration::from_secs(5), rx.recv()) => {
                if let Ok(None) = event {
                    anyhow::bail!("the directory watcher stopped");
                }
            }
            _ = capacities.changed() => {}
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
                let body = serde_json::to_vec(&status).expect("status serialises");
                if let Err(error) = weir_persist::replace(&path, &body, 0o644) {
                    warn!(path = %path.display(), %error, "writing the sync status");
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

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Node;

    use super::*;
    use crate::node_cidrs::FileCidrStore;

    /// A Node with InternalIPs `ips` (comma-separated).
    fn node(name: &str, ips: &str, pod_cidr: Option<&str>) -> Change {
        let addresses: Vec<_> = ips
            .split(',')
            .map(|ip| serde_json::json!({"type": "InternalIP", "address": ip}))
            .collect();
        let mut obj = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name},
            "status": {"addresses": addresses},
        });
        if let Some(c) = pod_cidr {
            obj["spec"] = serde_json::json!({"podCIDR": c, "podCIDRs": [c]});
        }
        let node: Node = serde_json::from_value(obj).unwrap();
        Change::Upsert(Box::new(Object::Node(node)))
    }

    fn controller(dir: &std::path::Path) -> Controller {
        let alloc = NodeCidrAllocator::new("10.244.0.0/16".parse().unwrap(), 24).unwrap();
        Controller::new(StatePublisher::new())
            .checking_incremental_compiles()
            .with_node_cidrs(alloc, Box::new(FileCidrStore::new(dir.join("cidrs.json"))))
            .unwrap()
    }

    fn object(v: serde_json::Value) -> Change {
        let o = match v["kind"].as_str() {
            Some("Pod") => Object::Pod(serde_json::from_value(v).unwrap()),
            Some("NetworkPolicy") => Object::NetworkPolicy(serde_json::from_value(v).unwrap()),
            other => panic!("no test objects of kind {other:?}"),
        };
        Change::Upsert(Box::new(o))
    }

    fn pod(name: &str, node: &str, ip: &str, app: &str) -> Change {
        object(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "prod", "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": []},
            "status": {"phase": "Running", "podIPs": [{"ip": ip}]},
        }))
    }

    #[test]
    fn a_change_publishes_new_states_only_to_the_nodes_it_touches() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = controller(dir.path());
        c.apply(vec![
            node("a", "172.30.0.1", None),
            node("b", "172.30.0.2", None),
            node("c", "172.30.0.3", None),
            pod("web", "a", "10.244.0.5", "web"),
            pod("db", "b", "10.244.1.5", "db"),
            pod("batch", "c", "10.244.2.5", "batch"),
            object(serde_json::json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "db", "namespace": "prod"},
                "spec": {
                    "podSelector": {"matchLabels": {"app": "db"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}],
                },
            })),
        ]);
        let first = c.recompute();
        assert_eq!(first.values().collect::<Vec<_>>(), [&1, &1, &1]);
        // `web` leaves the peer `db` admits: db's node changes; web's is recompiled but no
        // policy selects web, so its state is the same; batch's node is not even recompiled.
        c.apply(vec![pod("web", "a", "10.244.0.5", "cache")]);
        let second = c.recompute();
        let bumped: Vec<&str> = ["a", "b", "c"]
            .into_iter()
            .filter(|n| second[*n] != first[*n])
            .collect();
        assert_eq!(bumped, ["b"]);
        // A node joining changes every node's routes.
        c.apply(vec![node("d", "172.30.0.4", None)]);
        let third = c.recompute();
        assert!(["a", "b", "c"].iter().all(|n| third[*n] > second[*n]));
        assert_eq!(third["d"], 1);
    }

    fn routes_of(c: &Controller, node: &str) -> BTreeMap<IpNet, NodeRoute> {
        (*c.published[node].1.routes).clone()
    }

    #[test]
    fn ranges_of_nodes_deleted_while_no_controller_ran_are_released_and_saved_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = controller(dir.path());
        c.apply(vec![
            node("a", "172.30.0.1", None),
            node("b", "172.30.0.2", None),
        ]);
        c.recompute();
        drop(c);
        let saved = || std::fs::read(dir.path().join("cidrs.json")).unwrap();

        // Restarted after "a" was deleted: its range is free again, and the store says so.
        let mut c = controller(dir.path());
        c.apply(vec![node("b", "172.30.0.2", None)]);
        c.recompute();
        let stored: crate::node_cidrs::Assignments = serde_json::from_slice(&saved()).unwrap();
        assert_eq!(stored.keys().collect::<Vec<_>>(), ["b"]);
        c.apply(vec![node("c", "172.30.0.3", None)]);
        c.recompute();
        assert!(
            routes_of(&c, "b").contains_key(&"10.244.0.0/24".parse::<IpNet>().unwrap()),
            "a's range went to the new node c"
        );

        // Nothing changed: nothing is written.
        let before = std::fs::metadata(dir.path().join("cidrs.json"))
            .unwrap()
            .modified()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        c.apply(vec![node("c", "172.30.0.3", None)]);
        c.recompute();
        let after = std::fs::metadata(dir.path().join("cidrs.json"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(before, after, "an unchanged allocation is not saved again");
    }

    #[test]
    fn dual_stack_nodes_route_one_range_per_family_to_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let alloc = NodeCidrAllocator::per_family(&[
            crate::node_cidrs::FamilyCidr {
                cluster: "10.244.0.0/16".parse().unwrap(),
                mask: 24,
            },
            crate::node_cidrs::FamilyCidr {
                cluster: "fd00:10:244::/56".parse().unwrap(),
                mask: 64,
            },
        ])
        .unwrap();
        let mut c = Controller::new(StatePublisher::new())
            .checking_incremental_compiles()
            .with_node_cidrs(
                alloc,
                Box::new(FileCidrStore::new(dir.path().join("c.json"))),
            )
            .unwrap();
        c.apply(vec![
            node("a", "fd00:172:30::1,172.30.0.1", None),
            node("b", "172.30.0.2", Some("10.244.200.0/24")),
        ]);
        c.recompute();
        let routes = routes_of(&c, "a");
        let a = &routes[&"10.244.0.0/24".parse().unwrap()];
        assert_eq!(
            a.addresses().map(|ip| ip.to_string()).collect::<Vec<_>>(),
            ["fd00:172:30::1", "172.30.0.1"],
            "reached at its first InternalIP, its other address carried beside it"
        );
        let owners: Vec<(String, &str)> = routes
            .iter()
            .map(|(cidr, r)| (cidr.to_string(), r.node.as_str()))
            .collect();
        assert_eq!(
            owners,
            [
                ("10.244.0.0/24".to_string(), "a"),
                ("10.244.200.0/24".to_string(), "b"),
                // Nodes with a preset go first: b's IPv6 range is allocated before a's.
                ("fd00:10:244::/64".to_string(), "b"),
                ("fd00:10:244:1::/64".to_string(), "a"),
            ]
        );
    }

    #[test]
    fn every_node_gets_the_route_table_of_all_nodes_with_distinct_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = controller(dir.path());
        // A burst of nodes joining at once.
        let changes = (1..=100)
            .map(|i| node(&format!("n{i}"), &format!("172.30.0.{i}"), None))
            .chain([node("preset", "172.30.1.1", Some("10.244.0.0/24"))])
            .collect();
        c.apply(changes);
        c.recompute();
        let routes = routes_of(&c, "n1");
        assert_eq!(routes.len(), 101);
        assert_eq!(routes_of(&c, "n50"), routes, "the same table on every node");
        assert_eq!(
            routes[&"10.244.0.0/24".parse().unwrap()].node,
            "preset",
            "a podCIDR the cluster set is respected"
        );
        let owners: BTreeSet<&String> = routes.values().map(|r| &r.node).collect();
        assert_eq!(owners.len(), 101, "one range per node");
        // One table in memory, whatever the number of nodes, kept while routes do not change.
        let shared = |c: &Controller| c.published["n1"].1.routes.clone();
        assert!(Arc::ptr_eq(&shared(&c), &c.published["n77"].1.routes));
        let before = shared(&c);
        c.apply(vec![node("n1", "172.30.0.1", None)]);
        c.recompute();
        assert!(
            Arc::ptr_eq(&before, &shared(&c)),
            "unchanged routes: same copy"
        );
        c.apply(vec![node("n101", "172.30.0.201", None)]);
        c.recompute();
        assert!(
            !Arc::ptr_eq(&before, &shared(&c)),
            "a new node: a new table"
        );
        assert_eq!(shared(&c).len(), 102);
        assert!(Arc::ptr_eq(&shared(&c), &c.published["n101"].1.routes));
    }

    #[test]
    fn a_service_in_a_manifest_directory_reaches_the_published_state_with_derived_backends() {
        let dir = tempfile::tempdir().unwrap();
        let text = r#"
kind: Service
apiVersion: v1
metadata: {name: web, namespace: prod}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
kind: Pod
apiVersion: v1
metadata: {name: web-1, namespace: prod, labels: {app: web}}
spec: {nodeName: a, containers: []}
status: {phase: Running, podIPs: [{ip: 10.244.0.5}]}
"#;
        let objects = crate::source::parse_manifests("svc.yaml", text).unwrap();
        let mut c = controller(dir.path()).deriving_endpoint_slices();
        c.apply(
            objects
                .into_iter()
                .map(|o| Change::Upsert(Box::new(o)))
                .collect(),
        );
        c.recompute();
        let services = &c.published["a"].1.services;
        let (frontend, entry) = services.first_key_value().expect("one frontend");
        assert_eq!(frontend.ip, "10.96.0.10".parse::<IpAddr>().unwrap());
        assert_eq!(entry.backends.len(), 1);
        assert_eq!(entry.backends[0].port, 8080);
    }

    /// Each node's state is fitted to the map capacities its own agent reported: a node
    /// whose `VERDICTS_EXACT` is small fails closed for the large rule set, a node with the
    /// default sizes keeps it; once the small node's agent reports the defaults (or none), it
    /// gets the rule set back.
    #[test]
    fn each_node_is_checked_against_the_capacities_its_agent_reported() {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<String> = (1..=10)
            .map(|p| format!("{{port: {}}}", 2 * p + 1))
            .collect();
        let text = format!(
            r#"
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {{name: big, namespace: prod}}
spec:
  podSelector: {{matchLabels: {{app: big}}}}
  ingress: [{{from: [{{ipBlock: {{cidr: 10.0.0.0/8}}}}], ports: [{}]}}]
---
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {{name: small, namespace: prod}}
spec:
  podSelector: {{matchLabels: {{app: small}}}}
  ingress: [{{from: [{{ipBlock: {{cidr: 10.0.0.0/8}}}}], ports: [{{port: 80}}]}}]
---
kind: Pod
apiVersion: v1
metadata: {{name: big-a, namespace: prod, labels: {{app: big}}}}
spec: {{nodeName: a, containers: []}}
status: {{phase: Running, podIPs: [{{ip: 10.244.0.5}}]}}
---
kind: Pod
apiVersion: v1
metadata: {{name: small-a, namespace: prod, labels: {{app: small}}}}
spec: {{nodeName: a, containers: []}}
status: {{phase: Running, podIPs: [{{ip: 10.244.0.6}}]}}
---
kind: Pod
apiVersion: v1
metadata: {{name: big-b, namespace: prod, labels: {{app: big}}}}
spec: {{nodeName: b, containers: []}}
status: {{phase: Running, podIPs: [{{ip: 10.244.1.5}}]}}
"#,
            ports.join(", ")
        );
        let objects = crate::source::parse_manifests("np.yaml", &text).unwrap();
        let publisher = StatePublisher::new();
        let alloc = NodeCidrAllocator::new("10.244.0.0/16".parse().unwrap(), 24).unwrap();
        let reports = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = reports.clone();
        let mut c = Controller::new(publisher.clone())
            .checking_incremental_compiles()
            .with_node_cidrs(
                alloc,
                Box::new(FileCidrStore::new(dir.path().join("c.json"))),
            )
            .unwrap()
            .observe_compiles(move |r| seen.lock().unwrap().push(r.rule_sets_too_large));
        c.apply(
            objects
                .into_iter()
                .map(|o| Change::Upsert(Box::new(o)))
                .collect(),
        );
        // Node a's agent has room for 8 single-port verdicts; node b's reports nothing (an
        // older agent): the defaults.
        let small = weir_api::MapCapacities {
            verdicts_exact: 8,
            ..Default::default()
        };
        publisher.record_capacities("a", Some(small));
        assert!(c.capacities_pending());
        c.recompute();
        assert!(!c.capacities_pending());
        let peer: IpAddr = "10.1.2.3".parse().unwrap();
        let verdict = |c: &Controller, node: &str, pod: &str, port: u16| {
            let state = &c.published[node].1;
            let set = state.endpoints[&PodKey::new("prod", pod)].ingress;
            assert_ne!(set, weir_api::NOT_ISOLATED);
            state.verdict(set, peer, 6, port).0
        };
        use weir_api::Action::{Allow, Deny};
        assert_eq!(verdict(&c, "a", "big-a", 3), Deny, "fails closed on a");
        assert_eq!(verdict(&c, "a", "small-a", 80), Allow);
        assert_eq!(
            verdict(&c, "b", "big-b", 3),
            Allow,
            "b has the default sizes"
        );
        assert_eq!(*reports.lock().unwrap(), [1]);
        // Node a's agent restarts with the default sizes: the rule set comes back.
        let version = c.published["a"].0;
        publisher.record_capacities("a", Some(weir_api::MapCapacities::default()));
        assert!(c.capacities_pending());
        c.recompute();
        assert_eq!(verdict(&c, "a", "big-a", 3), Allow);
        assert!(c.published["a"].0 > version, "republished");
        assert_eq!(*reports.lock().unwrap(), [1, 0]);
        // Reporting the same again changes nothing.
        publisher.record_capacities("a", Some(weir_api::MapCapacities::default()));
        assert!(!c.capacities_pending());
    }

    #[test]
    fn a_policy_too_large_for_the_node_fails_closed_and_the_others_are_published_intact() {
        let dir = tempfile::tempdir().unwrap();
        // Ten ports no two of which merge into a range: ten single-port verdicts.
        let ports: Vec<String> = (1..=10)
            .map(|p| format!("{{port: {}}}", 2 * p + 1))
            .collect();
        let text = format!(
            r#"
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {{name: big, namespace: prod}}
spec:
  podSelector: {{matchLabels: {{app: big}}}}
  ingress: [{{from: [{{ipBlock: {{cidr: 10.0.0.0/8}}}}], ports: [{}]}}]
---
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {{name: small, namespace: prod}}
spec:
  podSelector: {{matchLabels: {{app: small}}}}
  ingress: [{{from: [{{ipBlock: {{cidr: 10.0.0.0/8}}}}], ports: [{{port: 80}}]}}]
---
kind: Pod
apiVersion: v1
metadata: {{name: big-1, namespace: prod, labels: {{app: big}}}}
spec: {{nodeName: a, containers: []}}
status: {{phase: Running, podIPs: [{{ip: 10.244.0.5}}]}}
---
kind: Pod
apiVersion: v1
metadata: {{name: small-1, namespace: prod, labels: {{app: small}}}}
spec: {{nodeName: a, containers: []}}
status: {{phase: Running, podIPs: [{{ip: 10.244.0.6}}]}}
"#,
            ports.join(", ")
        );
        let objects = crate::source::parse_manifests("np.yaml", &text).unwrap();
        let reports = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = reports.clone();
        let mut c = controller(dir.path())
            .with_capacities(Capacities {
                verdicts_exact: 8,
                ..Default::default()
            })
            .observe_compiles(move |r| seen.lock().unwrap().push(r.rule_sets_too_large));
        c.apply(
            objects
                .into_iter()
                .map(|o| Change::Upsert(Box::new(o)))
                .collect(),
        );
        c.recompute();
        let state = &c.published["a"].1;
        let set = |pod: &str| state.endpoints[&PodKey::new("prod", pod)].ingress;
        let (big, small) = (set("big-1"), set("small-1"));
        assert_ne!(big, weir_api::NOT_ISOLATED);
        let peer = "10.1.2.3".parse().unwrap();
        assert_eq!(state.verdict(big, peer, 6, 3).0, weir_api::Action::Deny);
        assert_eq!(state.verdict(small, peer, 6, 80).0, weir_api::Action::Allow);
        assert_eq!(*reports.lock().unwrap(), [1]);
    }

    #[test]
    fn assignments_survive_a_controller_restart_and_deleted_nodes_release_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = controller(dir.path());
        c.apply(vec![
            node("a", "172.30.0.1", None),
            node("b", "172.30.0.2", None),
        ]);
        c.recompute();
        let before = routes_of(&c, "a");
        drop(c);
        let mut c = controller(dir.path());
        // Joining in the other order does not reshuffle the ranges.
        c.apply(vec![
            node("b", "172.30.0.2", None),
            node("a", "172.30.0.1", None),
        ]);
        c.recompute();
        assert_eq!(routes_of(&c, "a"), before);
        c.apply(vec![Change::Delete(crate::source::ObjectKey {
            kind: "Node",
            namespace: String::new(),
            name: "a".into(),
        })]);
        c.recompute();
        assert!(!routes_of(&c, "b").values().any(|r| r.node == "a"));
    }
}
