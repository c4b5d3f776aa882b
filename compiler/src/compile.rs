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
    cluster::{Cluster, NsIdx},
    ids::IdAllocator,
    node::{NodeMemory, View},
    peers::{AtomKey, AtomMembers, AtomTable, CachedPolicy, RuleAtoms},
    policy::{NamespaceScope, PodPeer, PolicyKey, Rule},
    service::ServiceDiagnostic,
    service_table::ServiceTable,
    validate::PolicyDiagnostic,
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
        let view = View {
            cluster,
            members: &members,
            policies: &self.policies,
            by_namespace: None,
            cluster_policies: Self::cluster_policies(&self.policies, cluster),
            host_policies: Self::host_policies(&self.policies, cluster),
            subjects: Default::default(),
            policy_order: Default::default(),
        };
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
        let view = View {
            cluster,
            members: &members,
            policies: &self.policies,
            by_namespace: Some(by_namespace),
            cluster_policies: Self::cluster_policies(&self.policies, cluster),
            host_policies: Self::host_policies(&self.policies, cluster),
            subjects: Default::default(),
            policy_order: Default::default(),
        };
        let chunk = work.len().div_ceil(self.threads).max(1);
        let mut nodes = BTreeMap::new();
        if self.threads <= 1 || work.len() <= 1 {
            for (name, memory) in work {
                nodes.insert(name.clone(), view.compile_node(memory, name));
            }
        } else {
            let view = &view;
            let results: Vec<Vec<(String, NodeState)>> = thread::scope(|s| {
                let handles: Vec<_> = work
                    .chunks_mut(chunk)
                    .map(|part| {
                        s.spawn(move || {
                            part.iter_mut()
                                .map(|(name, memory)| {
                                    ((*name).clone(), view.compile_node(memory, name))
                                })
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
        }
        // Every node has been recompiled without atoms no policy uses: release them.
        let live: BTreeSet<u32> = self
            .policies
            .values()
            .flat_map(|p| {
                p.ingress
                    .iter()
                    .chain(&p.egress)
                    .flat_map(RuleAtoms::atom_ids)
                    .chain(p.subject)
            })
            .collect();
        self.atoms.retain(&live);
        let released = std::mem::take(&mut self.policy_ids.released);
        self.policy_ids.free.extend(released);
        self.service_ids.begin();
        let (services, conflicts) = ServiceTable::build(cluster, &mut self.service_ids);
        self.service_ids.finish();
        for (name, state) in &mut nodes {
            state.services = services.for_node(name);
        }
        let mut service_diagnostics: Vec<ServiceDiagnostic> =
            cluster.service_diagnostics().cloned().collect();
        service_diagnostics.extend(conflicts);
        CompileOutput {
            nodes,
            diagnostics: cluster.diagnostics().cloned().collect(),
            service_diagnostics,
        }
    }

    /// Drops the id memory of a node (its next compile starts from fresh ids).
    pub fn forget_node(&mut self, node: &str) {
        self.nodes.remove(node);
    }

    /// Interns the atoms of new or changed policies; with `prune`, forgets deleted ones.
    fn refresh_policies(&mut self, cluster: &Cluster, prune: bool) {
        if prune {
            let released = &mut self.policy_ids.released;
            self.policies.retain(|k, p| {
                let keep = cluster.validated_policy(k).is_some();
                if !keep {
                    released.push(p.id);
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
            let fresh = self
                .policies
                .get(key)
                .is_some_and(|c| Arc::ptr_eq(&c.validated, validated));
            if fresh {
                continue;
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
            self.policies.insert(
                key.clone(),
                CachedPolicy {
                    id,
                    validated: validated.clone(),
                    subject,
                    ingress,
                    egress,
                },
            );
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
