//! What changed in a [`Cluster`](super::Cluster) since its changes were last taken: the
//! input of an incremental compile
//! ([`Compiler::compile_changes`](super::Compiler::compile_changes)).
//!
//! The store records, for each object changed since [`Cluster::take_changes`]
//! (super::Cluster::take_changes), what it was *before* the first of those changes (the
//! current state is in the store). That is what deciding which peers' members moved needs:
//! a pod that left a selector is found by its old labels.
//!
//! A new store starts with [`Changes::everything`] set, and records nothing until its
//! changes are first taken: a user that only ever compiles everything pays nothing for the
//! journal.

use std::collections::{BTreeMap, BTreeSet};

use weir_api::PodKey;

use super::{
    policy::PolicyKey,
    records::{NodeRecord, PodInfo},
    selector::Labels,
};

/// Changes to a cluster store since they were last taken.
#[derive(Clone, Debug)]
pub struct Changes {
    /// Everything may have changed: compile every node.
    pub(crate) everything: bool,
    /// Pods changed, each with what it was before (`None`: it did not exist).
    pub(crate) pods: BTreeMap<PodKey, Option<PodInfo>>,
    /// Namespaces changed (created, relabelled, gone), with their labels before.
    pub(crate) namespaces: BTreeMap<String, Option<Labels>>,
    /// Node objects changed, with what they were before.
    pub(crate) nodes: BTreeMap<String, Option<NodeRecord>>,
    /// NetworkPolicies added, changed or deleted.
    pub(crate) policies: BTreeSet<PolicyKey>,
    /// A ClusterNetworkPolicy or HostPolicy was added, changed or deleted.
    pub(crate) tiers: bool,
    /// A Service or EndpointSlice was added, changed or deleted.
    pub(crate) services: bool,
}

impl Default for Changes {
    /// Everything: what a new store reports.
    fn default() -> Self {
        Self {
            everything: true,
            ..Self::none()
        }
    }
}

impl Changes {
    /// No change.
    pub fn none() -> Self {
        Self {
            everything: false,
            pods: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            nodes: BTreeMap::new(),
            policies: BTreeSet::new(),
            tiers: false,
            services: false,
        }
    }

    /// Number of objects changed (pods, namespaces, nodes and NetworkPolicies).
    pub(crate) fn len(&self) -> usize {
        self.pods.len() + self.namespaces.len() + self.nodes.len() + self.policies.len()
    }

    pub(crate) fn note_pod(&mut self, key: &PodKey, before: impl FnOnce() -> Option<PodInfo>) {
        if !self.everything && !self.pods.contains_key(key) {
            self.pods.insert(key.clone(), before());
        }
    }

    pub(crate) fn note_namespace(&mut self, name: &str, before: impl FnOnce() -> Option<Labels>) {
        if !self.everything && !self.namespaces.contains_key(name) {
            self.namespaces.insert(name.to_owned(), before());
        }
    }

    pub(crate) fn note_node(&mut self, name: &str, before: impl FnOnce() -> Option<NodeRecord>) {
        if !self.everything && !self.nodes.contains_key(name) {
            self.nodes.insert(name.to_owned(), before());
        }
    }

    pub(crate) fn note_policy(&mut self, key: &PolicyKey) {
        if !self.everything {
            self.policies.insert(key.clone());
        }
    }

    pub(crate) fn note_tiers(&mut self) {
        self.tiers = true;
    }

    pub(crate) fn note_services(&mut self) {
        self.services = true;
    }
}
