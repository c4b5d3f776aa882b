//! The NetworkPolicy compiler: [`Cluster`] → one [`NodeState`] per node, with exact
//! `networking.k8s.io/v1` semantics
//! (<https://kubernetes.io/docs/concepts/services-networking/network-policies/>).
//!
//! Per node the steps are in the `node` module: endpoints and their rule sets, the rules and
//! the peers they refer to, peer classes over those peers, and verdicts.
//!
//! Ids (rule sets, classes, rules) are allocated per node from a memory kept in the
//! [`Compiler`] (the `ids` module), keyed by content, so an unchanged cluster compiles to
//! identical state and a small change to a small diff — none at all on nodes whose rule
//! sets do not refer to what changed.
//!
//! Everything here is pure: no I/O, no clocks, no randomness. [`Compiler::compile_all`]
//! compiles nodes on a few threads; the result does not depend on it.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    thread,
};

use weir_api::{NodeState, ServiceRef};

use super::{
    HashMap,
    changes::Changes,
    cluster::{Cluster, NsIdx},
    ids::IdAllocator,
    node::{NodeMemory, View},
    peers::{AtomKey, AtomMembers, AtomTable, CachedPolicy, RuleAtoms},
    policy::{NamespaceScope, PodPeer, PolicyKey, Rule},
    selector::Selector,
    service::ServiceDiagnostic,
    service_table::ServiceTable,
    validate::{PolicyDiagnostic, ValidatedPolicy},
};

/// The result of compiling every node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompileOutput {
    /// State per node name: every Node object and every node a stored pod is scheduled to.
    pub nodes: BTreeMap<String, NodeState>,
    /// What is wrong with stored policies (those with errors fail closed).
    pub diagnostics: Vec<PolicyDiagnostic>,
    /// What could not be used of Services and EndpointSlices (left out, nothing else
    /// disturbed).
    pub service_diagnostics: Vec<ServiceDiagnostic>,
}

/// The result of an incremental compile ([`Compiler::compile_changes`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// Every node was compiled (the first compile, a change of ClusterNetworkPolicies or
    /// HostPolicies, or too many changes at once): `nodes` holds every node.
    pub everything: bool,
    /// The states of the nodes recompiled (those the changes touch; their state may be
    /// unchanged). Other nodes' states are as before, but for their Services when
    /// `services_changed` ([`Compiler::services_for`]).
    pub nodes: BTreeMap<String, NodeState>,
    /// Nodes that are gone (their memory is forgotten).
    pub removed: BTreeSet<String>,
    /// The service table changed: every node's `services` may have.
    pub services_changed: bool,
    /// What is wrong with stored policies (those with errors fail closed).
    pub diagnostics: Vec<PolicyDiagnostic>,
    /// What could not be used of Services and EndpointSlices.
    pub service_diagnostics: Vec<ServiceDiagnostic>,
}

/// Compiles clusters into node states, remembering the ids it handed out so that
/// successive compiles give small diffs.
#[derive(Debug)]
pub struct Compiler {
    atoms: AtomTable,
    policies: HashMap<PolicyKey, CachedPolicy>,
    policy_ids: PolicyIds,
    nodes: HashMap<String, NodeMemory>,
    /// Ids of Service ports, the same on every node.
    service_ids: IdAllocator<ServiceRef>,
    /// The service table of the last compile, and the frontends it refused.
    services: ServiceTable,
    service_conflicts: Vec<ServiceDiagnostic>,
    /// Whether every node has been compiled once (incremental compiles build on that).
    compiled: bool,
    threads: usize,
}

/// Small persistent ids of policies, so that node memories key rule sets and rules by
/// integers rather than by names (the memories of 5,000 nodes would otherwise hold
/// hundreds of thousands of copies of policy names). An id is released only at the end of a
/// full compile that no longer had the policy, when no node memory can refer to it.
#[derive(Debug, Default)]
struct PolicyIds {
    next: u32,
    free: BTreeSet<u32>,
    released: Vec<u32>,
}

impl PolicyIds {
    fn allocate(&mut self) -> u32 {
        self.free.pop_first().unwrap_or_else(|| {
            let id = self.next;
            self.next = self.next.saturating_add(1);
            id
        })
    }
}

impl Default for Compiler {
    fn default() -> Self {
        Self::new()
    }
}

impl Compiler {
    pub fn new() -> Self {
        let threads = thread::available_parallelism().map_or(1, |n| n.get().min(8));
        Self {
            atoms: AtomTable::default(),
            policies: HashMap::default(),
            policy_ids: PolicyIds::default(),
            nodes: HashMap::default(),
            service_ids: IdAllocator::default(),
            services: ServiceTable::default(),
            service_conflicts: Vec::new(),
            compiled: false,
            threads,
        }
    }

    /// Uses at most `threads` threads in [`Compiler::compile_all`] (at least one).
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// Compiles one node's state. Gives the same state as [`Compiler::compile_all`] would
    /// for this node. Only a full compile releases the ids of peers that no policy uses any
    /// more, so a long-running user of `compile_node` alone should call `compile_all` now
    /// and then.
    pub fn compile_node(&mut self, cluster: &Cluster, node: &str) -> NodeState {
        self.refresh_policies(cluster, false);
        let members = AtomMembers::new(cluster, &self.atoms);
        let view = Self::view(cluster, &members, &self.policies, None);
        let memory = self.nodes.entry(node.to_owned()).or_default();
        let mut state = view.compile_node(memory, node);
        // Ids of Service ports gone are released only by a full compile, like peers.
        let (services, _) = ServiceTable::build(cluster, &mut self.service_ids);
        state.services = services.for_node(node);
        state
    }

    /// Compiles every node (Node objects and nodes pods are scheduled to), forgets the
    /// memory of nodes that are gone, and returns the states with all policy diagnostics.
    pub fn compile_all(&mut self, cluster: &Cluster) -> CompileOutput {
        self.refresh_policies(cluster, true);
        let names: Vec<String> = cluster
            .node_names()
            .into_iter()
            .map(str::to_owned)
            .collect();
        let wanted: BTreeSet<&str> = names.iter().map(String::as_str).collect();
        self.nodes.retain(|n, _| wanted.contains(n.as_str()));
        for n in &names {
            self.nodes.entry(n.clone()).or_default();
        }
        let mut work: Vec<(&String, &mut NodeMemory)> = self.nodes.iter_mut().collect();
        work.sort_by(|a, b| a.0.cmp(b.0));
        let members = AtomMembers::new(cluster, &self.atoms);
        let mut by_namespace: HashMap<NsIdx, Vec<&CachedPolicy>> = HashMap::default();
        for (key, _) in cluster.policies() {
            if let (Some(ns), Some(p)) =
                (cluster.namespace_id(&key.namespace), self.policies.get(key))
            {
                by_namespace.entry(ns).or_default().push(p);
            }
        }
        let view = Self::view(cluster, &members, &self.policies, Some(by_namespace));
        let mut nodes = compile_nodes(&view, work, self.threads);
        // Every node has been recompiled without atoms no policy uses: release them.
        self.release_unused();
        self.rebuild_services(cluster);
        for (name, state) in &mut nodes {
            state.services = self.services.for_node(name);
        }
        self.compiled = true;
        CompileOutput {
            nodes,
            diagnostics: cluster.diagnostics().cloned().collect(),
            service_diagnostics: self.service_diagnostics(cluster),
        }
    }

    /// Compiles what `changes` touch: the nodes whose state may differ from their last
    /// compile's, and nothing else. `changes` are those of `cluster` since the last compile
    /// ([`Cluster::take_changes`]). Every node state is then what
    /// [`Compiler::compile_all`] would give (a property the tests check on random change
    /// sequences); the first compile, a change of ClusterNetworkPolicies or HostPolicies
    /// (their subjects span namespaces), and very large batches compile everything.
    ///
    /// A node is recompiled when a pod on it changed; when a NetworkPolicy of a namespace
    /// it has pods of changed; when its Node object changed; or when the members of a peer
    /// its rules refer to moved (a pod joined or left a selector, or the addresses or
    /// named ports of a member changed).
    pub fn compile_changes(&mut self, cluster: &Cluster, changes: &Changes) -> Update {
        let too_many = changes.len() > INCREMENTAL_MAX_CHANGES
            || changes.pods.len().saturating_mul(self.atoms.len()) > INCREMENTAL_MAX_CHECKS;
        if !self.compiled || changes.everything || changes.tiers || too_many {
            let before: BTreeSet<String> = self.nodes.keys().cloned().collect();
            let out = self.compile_all(cluster);
            return Update {
                everything: true,
                removed: before
                    .into_iter()
                    .filter(|n| !out.nodes.contains_key(n))
                    .collect(),
                nodes: out.nodes,
                services_changed: true,
                diagnostics: out.diagnostics,
                service_diagnostics: out.service_diagnostics,
            };
        }
        // The pods a changed NetworkPolicy selected before and selects now.
        let selections: Vec<(&str, Selector)> = changes
            .policies
            .iter()
            .flat_map(|key| {
                let before = self.policies.get(key).map(|p| &p.validated);
                before
                    .into_iter()
                    .chain(cluster.validated_policy(key))
                    .map(move |v| (key.namespace.as_str(), v.policy.pod_selector.clone()))
            })
            .collect();
        for key in &changes.policies {
            match cluster.validated_policy(key) {
                Some(validated) => self.refresh_policy(key, validated),
                None => {
                    if let Some(old) = self.policies.remove(key) {
                        self.policy_ids.released.push(old.id);
                        self.atoms.release(old.atom_ids());
                    }
                }
            }
        }
        let affected =
            super::affected::nodes(cluster, changes, &selections, &self.atoms, &self.nodes);
        let mut removed = BTreeSet::new();
        for name in &affected {
            if !cluster.has_node(name) {
                self.nodes.remove(name);
                removed.insert(name.clone());
            } else {
                self.nodes.entry(name.clone()).or_default();
            }
        }
        let members = AtomMembers::new(cluster, &self.atoms);
        let mut view = Self::view(cluster, &members, &self.policies, None);
        // Inverting every ClusterNetworkPolicy's subject costs more than testing them on
        // the pods of a few nodes.
        view.direct_subjects = affected.len() <= DIRECT_SUBJECTS_MAX_NODES;
        let mut work: Vec<(&String, &mut NodeMemory)> = self
            .nodes
            .iter_mut()
            .filter(|(name, _)| affected.contains(*name))
            .collect();
        work.sort_by(|a, b| a.0.cmp(b.0));
        let mut nodes = compile_nodes(&view, work, self.threads);
        // The nodes that referred to atoms of changed policies were among those recompiled.
        self.release_unused();
        if changes.services {
            self.rebuild_services(cluster);
        }
        for (name, state) in &mut nodes {
            state.services = self.services.for_node(name);
        }
        Update {
            everything: false,
            nodes,
            removed,
            services_changed: changes.services,
            diagnostics: cluster.diagnostics().cloned().collect(),
            service_diagnostics: self.service_diagnostics(cluster),
        }
    }

    /// One node's Services, as of the last compile.
    pub fn services_for(
        &self,
        node: &str,
    ) -> BTreeMap<weir_api::ServiceFrontend, weir_api::ServiceEntry> {
        self.services.for_node(node)
    }

    /// Releases the atoms and policy ids nothing refers to any more (once every node that
    /// used them has been recompiled).
    fn release_unused(&mut self) {
        self.atoms.retain_referenced();
        let released = std::mem::take(&mut self.policy_ids.released);
        self.policy_ids.free.extend(released);
    }

    fn rebuild_services(&mut self, cluster: &Cluster) {
        self.service_ids.begin();
        let (services, conflicts) = ServiceTable::build(cluster, &mut self.service_ids);
        self.service_ids.finish();
        self.services = services;
        self.service_conflicts = conflicts;
    }

    fn service_diagnostics(&self, cluster: &Cluster) -> Vec<ServiceDiagnostic> {
        cluster
            .service_diagnostics()
            .cloned()
            .chain(self.service_conflicts.iter().cloned())
            .collect()
    }

    /// Drops the id memory of a node (its next compile starts from fresh ids).
    pub fn forget_node(&mut self, node: &str) {
        self.nodes.remove(node);
    }

    /// Interns the atoms of new or changed policies; with `prune`, forgets deleted ones.
    fn refresh_policies(&mut self, cluster: &Cluster, prune: bool) {
        if prune {
            let released = &mut self.policy_ids.released;
            let atoms = &mut self.atoms;
            self.policies.retain(|k, p| {
                let keep = cluster.validated_policy(k).is_some();
                if !keep {
                    released.push(p.id);
                    atoms.release(p.atom_ids());
                }
                keep
            });
        }
        let stored = cluster
            .policies()
            .map(|(k, r)| (k, &r.validated))
            .chain(cluster.cluster_policies().map(|(k, r)| (k, &r.validated)))
            .chain(cluster.host_policies());
        for (key, validated) in stored {
            self.refresh_policy(key, validated);
        }
    }

    /// Interns the atoms of a stored policy unless it is cached as it is.
    fn refresh_policy(&mut self, key: &PolicyKey, validated: &Arc<ValidatedPolicy>) {
        {
            let fresh = self
                .policies
                .get(key)
                .is_some_and(|c| Arc::ptr_eq(&c.validated, validated));
            if fresh {
                return;
            }
            let policy = &validated.policy;
            let intern = |rules: Option<&Vec<Rule>>, atoms: &mut AtomTable| {
                rules
                    .into_iter()
                    .flatten()
                    .map(|r| RuleAtoms::new(r, atoms))
                    .collect()
            };
            let ingress = intern(policy.ingress.as_ref(), &mut self.atoms);
            let egress = intern(policy.egress.as_ref(), &mut self.atoms);
            let subject = match &policy.namespaces {
                NamespaceScope::Matching(_) => Some(self.atoms.intern(&AtomKey::Pods(PodPeer {
                    namespaces: policy.namespaces.clone(),
                    pods: policy.pod_selector.clone(),
                }))),
                NamespaceScope::Own(_) => None,
            };
            let id = match self.policies.get(key) {
                Some(old) => old.id,
                None => self.policy_ids.allocate(),
            };
            let cached = CachedPolicy {
                id,
                reference: key.policy_ref(),
                validated: validated.clone(),
                subject,
                ingress,
                egress,
            };
            self.atoms.acquire(cached.atom_ids());
            if let Some(old) = self.policies.insert(key.clone(), cached) {
                self.atoms.release(old.atom_ids());
            }
        }
    }

    /// What every node's compile reads.
    fn view<'a>(
        cluster: &'a Cluster,
        members: &'a AtomMembers<'a>,
        policies: &'a HashMap<PolicyKey, CachedPolicy>,
        by_namespace: Option<HashMap<NsIdx, Vec<&'a CachedPolicy>>>,
    ) -> View<'a> {
        View {
            cluster,
            members,
            policies,
            by_namespace,
            cluster_policies: Self::cluster_policies(policies, cluster),
            host_policies: Self::host_policies(policies, cluster),
            subjects: Default::default(),
            direct_subjects: false,
        }
    }

    /// The ClusterNetworkPolicies, in evaluation order (tier, priority, name).
    fn cluster_policies<'p>(
        policies: &'p HashMap<PolicyKey, CachedPolicy>,
        cluster: &Cluster,
    ) -> Vec<&'p CachedPolicy> {
        let mut out: Vec<&CachedPolicy> = cluster
            .cluster_policies()
            .filter_map(|(k, _)| policies.get(k))
            .collect();
        out.sort_by(|a, b| a.validated.policy.order().cmp(&b.validated.policy.order()));
        out
    }

    /// The HostPolicies, in name order.
    fn host_policies<'p>(
        policies: &'p HashMap<PolicyKey, CachedPolicy>,
        cluster: &Cluster,
    ) -> Vec<&'p CachedPolicy> {
        cluster
            .host_policies()
            .filter_map(|(k, _)| policies.get(k))
            .collect()
    }

    /// Number of interned peers (for tests and metrics).
    pub fn interned_peers(&self) -> usize {
        self.atoms.len()
    }
}

/// Up to this many nodes compiled, each ClusterNetworkPolicy's subject is tested on their
/// pods rather than inverted for the whole cluster.
const DIRECT_SUBJECTS_MAX_NODES: usize = 64;

/// More changes than this at once compile everything.
const INCREMENTAL_MAX_CHANGES: usize = 20_000;
/// Nor more than this many (changed pod, peer) checks.
const INCREMENTAL_MAX_CHECKS: usize = 50_000_000;

/// Compiles `work`'s nodes on up to `threads` threads.
fn compile_nodes(
    view: &View<'_>,
    mut work: Vec<(&String, &mut NodeMemory)>,
    threads: usize,
) -> BTreeMap<String, NodeState> {
    let chunk = work.len().div_ceil(threads).max(1);
    let mut nodes = BTreeMap::new();
    if threads <= 1 || work.len() <= 1 {
        for (name, memory) in work {
            nodes.insert(name.clone(), view.compile_node(memory, name));
        }
        return nodes;
    }
    let results: Vec<Vec<(String, NodeState)>> = thread::scope(|s| {
        let handles: Vec<_> = work
            .chunks_mut(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter_mut()
                        .map(|(name, memory)| ((*name).clone(), view.compile_node(memory, name)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    nodes.extend(results.into_iter().flatten());
    nodes
}
