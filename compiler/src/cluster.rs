//! The typed input of the compiler: a store of Namespaces, Pods, Nodes and NetworkPolicies
//! with the indexes selector evaluation needs (namespace → pods, label → pods, label →
//! namespaces, node → pods, named port → pods, address → pods), kept up to date on every
//! upsert and delete so a compile never rebuilds them.
//!
//! Only what policy needs is kept of each object. In particular:
//!
//! * Pods that are terminal (`status.phase` Succeeded or Failed) are dropped: their IPs may
//!   already belong to a new pod.
//! * Host-network pods are dropped: they are neither policy endpoints nor selector peers
//!   (their traffic is node traffic; an ipBlock can still match node addresses).
//! * Pods without an IP stay: they are endpoints (their policy must be in place before their
//!   first packet, which precedes the IP's publication), but they are nobody's peer yet.
//! * Namespaces that have pods but no Namespace object are treated as existing with only the
//!   `kubernetes.io/metadata.name` label, which the API server sets on every namespace.

use std::{
    collections::{BTreeMap, BTreeSet, btree_map},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::{NetworkPolicy, NetworkPolicySpec},
};
use weir_api::{PodKey, canonical_ip};

pub use super::records::{NamedPort, NodeRecord, PodInfo};
use super::{
    Error, HashMap, Result,
    changes::Changes,
    cnp::{self, ClusterNetworkPolicy, ClusterNetworkPolicySpec},
    drop_cidrs::{self, DropCidrSet, DropSet},
    host_policy::{self, HostPolicy},
    policy::{PolicyKey, PolicyKind, Protocol},
    selector::Labels,
    service::{ObjectName, ServiceDiagnostic, ServiceInfo, SliceInfo},
    validate::{self, PolicyDiagnostic, ValidatedPolicy},
};

/// The label the API server puts on every namespace, holding its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Index of a pod in the store; reused after the pod is deleted.
pub(crate) type PodIdx = u32;
/// Index of a namespace in the store; reused after the namespace is gone.
pub(crate) type NsIdx = u32;

/// A stored NetworkPolicy: its validated form, and its spec as written if the store
/// retains specs ([`Cluster::retaining_policy_specs`]).
#[derive(Clone, Debug)]
pub struct PolicyRecord {
    pub spec: Option<NetworkPolicySpec>,
    pub validated: Arc<ValidatedPolicy>,
}

/// A stored ClusterNetworkPolicy: its validated form, and its spec as written if the store
/// retains specs ([`Cluster::retaining_policy_specs`]).
#[derive(Clone, Debug)]
pub struct ClusterPolicyRecord {
    pub spec: Option<ClusterNetworkPolicySpec>,
    pub validated: Arc<ValidatedPolicy>,
}

#[derive(Clone, Debug)]
pub(crate) struct NamespaceRecord {
    pub name: String,
    pub labels: Labels,
    /// A Namespace object exists (otherwise the namespace is implied by its pods).
    declared: bool,
    pub pods: BTreeSet<PodIdx>,
}

#[derive(Clone, Debug)]
pub(crate) struct PodRecord {
    pub info: PodInfo,
    pub namespace: NsIdx,
}

/// A slab: stable small indexes, reused after removal.
#[derive(Clone, Debug)]
pub(crate) struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<u32>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Slab<T> {
    fn insert(&mut self, item: T) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.items[i as usize] = Some(item);
                i
            }
            None => {
                self.items.push(Some(item));
                u32::try_from(self.items.len() - 1).unwrap_or(u32::MAX)
            }
        }
    }

    fn remove(&mut self, i: u32) -> Option<T> {
        let item = self.items.get_mut(i as usize)?.take();
        if item.is_some() {
            self.free.push(i);
        }
        item
    }

    pub fn get(&self, i: u32) -> Option<&T> {
        self.items.get(i as usize)?.as_ref()
    }

    fn get_mut(&mut self, i: u32) -> Option<&mut T> {
        self.items.get_mut(i as usize)?.as_mut()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.items
            .iter()
            .enumerate()
            .filter_map(|(i, t)| Some((u32::try_from(i).ok()?, t.as_ref()?)))
    }
}

/// Objects by label (key, value), looked up without allocating.
#[derive(Clone, Debug, Default)]
pub(crate) struct LabelIndex {
    by_key: HashMap<String, HashMap<String, BTreeSet<u32>>>,
}

impl LabelIndex {
    fn insert(&mut self, key: &str, value: &str, id: u32) {
        self.by_key
            .entry(key.to_owned())
            .or_default()
            .entry(value.to_owned())
            .or_default()
            .insert(id);
    }

    fn remove(&mut self, key: &str, value: &str, id: u32) {
        let Some(values) = self.by_key.get_mut(key) else {
            return;
        };
        if let Some(ids) = values.get_mut(value) {
            ids.remove(&id);
            if ids.is_empty() {
                values.remove(value);
            }
        }
        if values.is_empty() {
            self.by_key.remove(key);
        }
    }

    pub fn get(&self, key: &str, value: &str) -> Option<&BTreeSet<u32>> {
        self.by_key.get(key)?.get(value)
    }
}

/// A snapshot of the cluster objects policy depends on, with its indexes.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    namespaces: Slab<NamespaceRecord>,
    namespace_ids: HashMap<String, NsIdx>,
    namespaces_by_label: LabelIndex,
    pods: Slab<PodRecord>,
    pod_ids: HashMap<PodKey, PodIdx>,
    pods_by_label: LabelIndex,
    pods_by_node: BTreeMap<String, BTreeSet<PodIdx>>,
    pods_by_ip: HashMap<IpAddr, Vec<PodIdx>>,
    /// Addresses more than one stored pod reports (rare: a stale object during IP reuse).
    contested_ips: BTreeSet<IpAddr>,
    pods_by_port_name: HashMap<(String, Protocol), BTreeSet<PodIdx>>,
    nodes: BTreeMap<String, NodeRecord>,
    policies: BTreeMap<PolicyKey, PolicyRecord>,
    cluster_policies: BTreeMap<PolicyKey, ClusterPolicyRecord>,
    host_policies: BTreeMap<PolicyKey, Arc<ValidatedPolicy>>,
    retain_specs: bool,
    services: BTreeMap<ObjectName, ServiceRecord>,
    /// EndpointSlices from the API server or the manifests.
    slices: BTreeMap<ObjectName, SliceRecord>,
    /// Declared slices by the Service they belong to.
    slices_by_service: BTreeMap<ObjectName, BTreeSet<ObjectName>>,
    /// Slices derived from pods (manifest directories, which have no EndpointSlice
    /// controller), by Service; see [`Cluster::derive_endpoint_slices`].
    derived_slices: BTreeMap<ObjectName, SliceRecord>,
    /// DropCIDRSets by name, with what could not be used of each.
    drop_sets: BTreeMap<String, (DropSet, Vec<ServiceDiagnostic>)>,
    /// What changed since [`Cluster::take_changes`] (everything until it is first called).
    journal: Changes,
}

/// A stored Service and what could not be used of it.
#[derive(Clone, Debug)]
pub struct ServiceRecord {
    pub info: Arc<ServiceInfo>,
    pub diagnostics: Vec<ServiceDiagnostic>,
}

/// Stored EndpointSlices (one declared, or all derived for one Service) and what could not
/// be used of them.
#[derive(Clone, Debug, Default)]
pub struct SliceRecord {
    pub slices: Vec<SliceInfo>,
    pub diagnostics: Vec<ServiceDiagnostic>,
}

impl Cluster {
    /// A store that keeps only what compiling needs.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store that also keeps every policy's spec as written, which the reference
    /// [`oracle`](super::oracle) evaluates. (The compiler needs only the validated form;
    /// keeping the raw objects roughly doubles the memory of a policy.)
    pub fn retaining_policy_specs() -> Self {
        Self {
            retain_specs: true,
            ..Self::default()
        }
    }

    // ---------------------------------------------------------------- namespaces

    /// Creates or replaces a namespace. Its `kubernetes.io/metadata.name` label is set to its
    /// name whatever the object says, as the API server does.
    pub fn upsert_namespace(&mut self, ns: &Namespace) -> Result<()> {
        let name = ns
            .metadata
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or(Error::MissingName { kind: "Namespace" })?;
        let labels = ns.metadata.labels.clone().unwrap_or_default().into();
        self.set_namespace(&name, labels, true);
        Ok(())
    }

    /// Removes a Namespace object. Pods still stored in it keep it alive with only its name
    /// label.
    pub fn delete_namespace(&mut self, name: &str) {
        let Some(&idx) = self.namespace_ids.get(name) else {
            return;
        };
        self.set_namespace(name, Labels::new(), false);
        self.drop_namespace_if_unused(idx);
    }

    fn set_namespace(&mut self, name: &str, mut labels: Labels, declared: bool) -> NsIdx {
        labels.insert(NAMESPACE_NAME_LABEL, name);
        let idx = self.namespace_idx(name);
        let Some(record) = self.namespaces.get_mut(idx) else {
            return idx;
        };
        if record.labels != labels {
            let before = record.labels.clone();
            self.journal.note_namespace(name, || Some(before));
        }
        let old = std::mem::replace(&mut record.labels, labels.clone());
        record.declared = declared;
        for (k, v) in old.iter() {
            self.namespaces_by_label.remove(k, v, idx);
        }
        for (k, v) in labels.iter() {
            self.namespaces_by_label.insert(k, v, idx);
        }
        idx
    }

    /// The index of namespace `name`, creating an implied (undeclared) record if needed.
    fn namespace_idx(&mut self, name: &str) -> NsIdx {
        if let Some(&idx) = self.namespace_ids.get(name) {
            return idx;
        }
        self.journal.note_namespace(name, || None);
        let labels: Labels = [(NAMESPACE_NAME_LABEL, name)].into_iter().collect();
        let idx = self.namespaces.insert(NamespaceRecord {
            name: name.to_owned(),
            labels: labels.clone(),
            declared: false,
            pods: BTreeSet::new(),
        });
        for (k, v) in labels.iter() {
            self.namespaces_by_label.insert(k, v, idx);
        }
        self.namespace_ids.insert(name.to_owned(), idx);
        idx
    }

    fn drop_namespace_if_unused(&mut self, idx: NsIdx) {
        let unused = self
            .namespaces
            .get(idx)
            .is_some_and(|r| !r.declared && r.pods.is_empty());
        if !unused {
            return;
        }
        if let Some(record) = self.namespaces.remove(idx) {
            self.journal
                .note_namespace(&record.name, || Some(record.labels.clone()));
            for (k, v) in record.labels.iter() {
                self.namespaces_by_label.remove(k, v, idx);
            }
            self.namespace_ids.remove(&record.name);
        }
    }

    /// Labels of a namespace (declared or implied by its pods).
    pub fn namespace_labels(&self, name: &str) -> Option<&Labels> {
        let idx = *self.namespace_ids.get(name)?;
        Some(&self.namespaces.get(idx)?.labels)
    }

    /// Names of all namespaces, declared or implied by pods.
    pub fn namespace_names(&self) -> impl Iterator<Item = &str> {
        self.namespaces.iter().map(|(_, r)| r.name.as_str())
    }

    // ---------------------------------------------------------------- pods

    /// Creates or replaces a pod. A terminal or host-network pod is removed instead (see the
    /// module documentation).
    pub fn upsert_pod(&mut self, pod: &Pod) -> Result<()> {
        match PodInfo::from_pod(pod)? {
            Some(info) => self.upsert_pod_info(info),
            None => {
                let key = PodKey::new(
                    pod.metadata.namespace.clone().unwrap_or_default(),
                    pod.metadata.name.clone().unwrap_or_default(),
                );
                self.delete_pod(&key);
            }
        }
        Ok(())
    }

    /// Creates or replaces a pod from its policy-relevant fields (addresses are normalized
    /// like [`PodInfo::from_pod`] does).
    pub fn upsert_pod_info(&mut self, mut info: PodInfo) {
        let mut ips: Vec<IpAddr> = Vec::with_capacity(info.ips.len());
        for ip in info.ips.iter().map(|ip| canonical_ip(*ip)) {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        info.ips = ips;
        if self.pod(&info.key) == Some(&info) {
            return;
        }
        let before = self.pod(&info.key).cloned();
        self.journal.note_pod(&info.key, || before);
        self.delete_pod(&info.key.clone());
        let namespace = self.namespace_idx(&info.key.namespace);
        let key = info.key.clone();
        let idx = self.pods.insert(PodRecord {
            info: info.clone(),
            namespace,
        });
        self.pod_ids.insert(key, idx);
        if let Some(ns) = self.namespaces.get_mut(namespace) {
            ns.pods.insert(idx);
        }
        for (k, v) in info.labels.iter() {
            self.pods_by_label.insert(k, v, idx);
        }
        if let Some(node) = &info.node {
            self.pods_by_node
                .entry(node.clone())
                .or_default()
                .insert(idx);
        }
        for ip in &info.ips {
            let owners = self.pods_by_ip.entry(*ip).or_default();
            owners.push(idx);
            if owners.len() > 1 {
                self.contested_ips.insert(*ip);
            }
        }
        for p in &info.named_ports {
            self.pods_by_port_name
                .entry((p.name.clone(), p.protocol))
                .or_default()
                .insert(idx);
        }
    }

    pub fn delete_pod(&mut self, key: &PodKey) {
        let Some(idx) = self.pod_ids.remove(key) else {
            return;
        };
        let pods = &self.pods;
        self.journal
            .note_pod(key, || pods.get(idx).map(|r| r.info.clone()));
        let Some(record) = self.pods.remove(idx) else {
            return;
        };
        let info = record.info;
        for (k, v) in info.labels.iter() {
            self.pods_by_label.remove(k, v, idx);
        }
        if let Some(node) = info.node {
            remove_from_btree_index(&mut self.pods_by_node, &node, idx);
        }
        for ip in info.ips {
            if let std::collections::hash_map::Entry::Occupied(mut e) = self.pods_by_ip.entry(ip) {
                e.get_mut().retain(|p| *p != idx);
                if e.get().len() < 2 {
                    self.contested_ips.remove(&ip);
                }
                if e.get().is_empty() {
                    e.remove();
                }
            }
        }
        for p in info.named_ports {
            remove_from_hash_index(&mut self.pods_by_port_name, &(p.name, p.protocol), idx);
        }
        if let Some(ns) = self.namespaces.get_mut(record.namespace) {
            ns.pods.remove(&idx);
        }
        self.drop_namespace_if_unused(record.namespace);
    }

    pub fn pod(&self, key: &PodKey) -> Option<&PodInfo> {
        let idx = *self.pod_ids.get(key)?;
        Some(&self.pods.get(idx)?.info)
    }

    /// Every stored pod (live, not host-network).
    pub fn pods(&self) -> impl Iterator<Item = &PodInfo> {
        self.pods.iter().map(|(_, r)| &r.info)
    }

    /// The pod that owns `ip`. Should two stored pods report the same address (a stale
    /// object during IP reuse), the one with the smallest namespace/name owns it.
    pub fn pod_at(&self, ip: IpAddr) -> Option<&PodInfo> {
        let idx = self.ip_owner(canonical_ip(ip))?;
        Some(&self.pods.get(idx)?.info)
    }

    /// Does `pod` own its address `ip` (see [`Cluster::pod_at`])?
    pub(crate) fn owns_ip(&self, pod: PodIdx, ip: IpAddr) -> bool {
        !self.contested_ips.contains(&ip) || self.ip_owner(ip) == Some(pod)
    }

    pub(crate) fn ip_owner(&self, ip: IpAddr) -> Option<PodIdx> {
        self.pods_by_ip.get(&ip)?.iter().copied().min_by(|a, b| {
            let ka = self.pods.get(*a).map(|r| &r.info.key);
            let kb = self.pods.get(*b).map(|r| &r.info.key);
            ka.cmp(&kb)
        })
    }

    // ---------------------------------------------------------------- nodes

    /// Creates or replaces a Node: its labels and the addresses in `status.addresses` that
    /// are IP addresses (what ClusterNetworkPolicy `nodes` peers select).
    pub fn upsert_node(&mut self, node: &Node) -> Result<()> {
        let name = node
            .metadata
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or(Error::MissingName { kind: "Node" })?;
        let mut ips: Vec<IpAddr> = node
            .status
            .iter()
            .flat_map(|s| s.addresses.iter().flatten())
            .filter_map(|a| a.address.parse::<IpAddr>().ok())
            .map(canonical_ip)
            .collect();
        ips.sort_unstable();
        ips.dedup();
        let labels = node.metadata.labels.clone().unwrap_or_default().into();
        let record = NodeRecord { labels, ips };
        if self.nodes.get(&name) != Some(&record) {
            let nodes = &self.nodes;
            self.journal.note_node(&name, || nodes.get(&name).cloned());
            self.nodes.insert(name, record);
        }
        Ok(())
    }

    /// Node objects with their labels and addresses, by name.
    pub fn nodes(&self) -> impl Iterator<Item = (&str, &NodeRecord)> {
        self.nodes.iter().map(|(n, r)| (n.as_str(), r))
    }

    pub fn delete_node(&mut self, name: &str) {
        if let Some(before) = self.nodes.remove(name) {
            self.journal.note_node(name, || Some(before));
        }
    }

    /// Node names: Node objects, and nodes that stored pods are scheduled to.
    pub fn node_names(&self) -> BTreeSet<&str> {
        self.nodes
            .keys()
            .map(String::as_str)
            .chain(self.pods_by_node.keys().map(String::as_str))
            .collect()
    }

    // ---------------------------------------------------------------- policies

    /// Creates or replaces a NetworkPolicy and returns what validation found wrong with it
    /// (an invalid policy is stored and fails closed).
    pub fn upsert_policy(&mut self, np: &NetworkPolicy) -> Result<&[PolicyDiagnostic]> {
        let validated = validate::validate(np)?;
        let key = validated.policy.key.clone();
        self.journal.note_policy(&key);
        let record = PolicyRecord {
            spec: self
                .retain_specs
                .then(|| np.spec.clone().unwrap_or_default()),
            validated: Arc::new(validated),
        };
        let slot = match self.policies.entry(key) {
            btree_map::Entry::Occupied(mut e) => {
                e.insert(record);
                e.into_mut()
            }
            btree_map::Entry::Vacant(e) => e.insert(record),
        };
        Ok(&slot.validated.diagnostics)
    }

    pub fn delete_policy(&mut self, key: &PolicyKey) {
        if self.policies.remove(key).is_some() {
            self.journal.note_policy(key);
        }
    }

    pub fn policy(&self, key: &PolicyKey) -> Option<&PolicyRecord> {
        self.policies.get(key)
    }

    /// Every policy, in (namespace, name) order.
    pub fn policies(&self) -> impl Iterator<Item = (&PolicyKey, &PolicyRecord)> {
        self.policies.iter()
    }

    /// The policies of one namespace, in name order.
    pub fn policies_in(&self, namespace: &str) -> impl Iterator<Item = &PolicyRecord> {
        let start = PolicyKey::new(namespace, "");
        self.policies
            .range(start..)
            .take_while(move |(k, _)| k.namespace == namespace)
            .map(|(_, r)| r)
    }

    /// Every diagnostic of every stored policy (NetworkPolicies, ClusterNetworkPolicies,
    /// then HostPolicies).
    pub fn diagnostics(&self) -> impl Iterator<Item = &PolicyDiagnostic> {
        self.policies
            .values()
            .flat_map(|r| r.validated.diagnostics.iter())
            .chain(
                self.cluster_policies
                    .values()
                    .flat_map(|r| r.validated.diagnostics.iter()),
            )
            .chain(
                self.host_policies
                    .values()
                    .flat_map(|v| v.diagnostics.iter()),
            )
    }

    /// Creates or replaces a ClusterNetworkPolicy and returns what validation found wrong
    /// with it (an invalid policy is stored and fails closed, see [`cnp`]).
    pub fn upsert_cluster_policy(
        &mut self,
        cnp: &ClusterNetworkPolicy,
    ) -> Result<&[PolicyDiagnostic]> {
        let validated = cnp::validate(cnp)?;
        let key = validated.policy.key.clone();
        self.journal.note_tiers();
        let record = ClusterPolicyRecord {
            spec: self.retain_specs.then(|| cnp.spec.clone()),
            validated: Arc::new(validated),
        };
        let slot = match self.cluster_policies.entry(key) {
            btree_map::Entry::Occupied(mut e) => {
                e.insert(record);
                e.into_mut()
            }
            btree_map::Entry::Vacant(e) => e.insert(record),
        };
        Ok(&slot.validated.diagnostics)
    }

    pub fn delete_cluster_policy(&mut self, name: &str) {
        if self
            .cluster_policies
            .remove(&PolicyKey::cluster(name))
            .is_some()
        {
            self.journal.note_tiers();
        }
    }

    pub fn cluster_policy(&self, name: &str) -> Option<&ClusterPolicyRecord> {
        self.cluster_policies.get(&PolicyKey::cluster(name))
    }

    /// Every ClusterNetworkPolicy, in name order.
    pub fn cluster_policies(&self) -> impl Iterator<Item = (&PolicyKey, &ClusterPolicyRecord)> {
        self.cluster_policies.iter()
    }

    /// The validated form of any stored policy, of either kind.
    pub fn validated_policy(&self, key: &PolicyKey) -> Option<&Arc<ValidatedPolicy>> {
        match key.kind {
            PolicyKind::NetworkPolicy => self.policies.get(key).map(|r| &r.validated),
            PolicyKind::ClusterNetworkPolicy => {
                self.cluster_policies.get(key).map(|r| &r.validated)
            }
            PolicyKind::HostPolicy | PolicyKind::UntrackedHostPolicy => self.host_policies.get(key),
        }
    }

    // ---------------------------------------------------------------- host policies

    /// Creates or replaces a HostPolicy and returns what validation found wrong with it (an
    /// invalid one is stored and fails closed, see [`host_policy`]).
    pub fn upsert_host_policy(&mut self, hp: &HostPolicy) -> Result<&[PolicyDiagnostic]> {
        let validated = host_policy::validate(hp)?;
        let key = validated.tracked.policy.key.clone();
        self.journal.note_tiers();
        let untracked_key = PolicyKey {
            kind: PolicyKind::UntrackedHostPolicy,
            ..key.clone()
        };
        match validated.untracked {
            Some(u) => self.host_policies.insert(untracked_key, Arc::new(u)),
            None => self.host_policies.remove(&untracked_key),
        };
        let slot = match self.host_policies.entry(key) {
            btree_map::Entry::Occupied(mut e) => {
                e.insert(Arc::new(validated.tracked));
                e.into_mut()
            }
            btree_map::Entry::Vacant(e) => e.insert(Arc::new(validated.tracked)),
        };
        Ok(&slot.diagnostics)
    }

    pub fn delete_host_policy(&mut self, name: &str) {
        let key = PolicyKey::host(name);
        self.journal.note_tiers();
        self.host_policies.remove(&PolicyKey {
            kind: PolicyKind::UntrackedHostPolicy,
            ..key.clone()
        });
        self.host_policies.remove(&key);
    }

    /// Every HostPolicy, in name order, each followed by its untracked part if it has one
    /// (kind [`PolicyKind::UntrackedHostPolicy`]).
    pub fn host_policies(&self) -> impl Iterator<Item = (&PolicyKey, &Arc<ValidatedPolicy>)> {
        self.host_policies.iter()
    }

    /// The labels of Node `name` (`None` without a Node object).
    pub fn node_labels(&self, name: &str) -> Option<&Labels> {
        self.nodes.get(name).map(|n| &n.labels)
    }

    // ---------------------------------------------------------------- services

    /// Creates or replaces a Service and returns what could not be used of it (left out).
    pub fn upsert_service(&mut self, svc: &Service) -> Result<&[ServiceDiagnostic]> {
        let (info, diagnostics) = ServiceInfo::from_service(svc)?;
        self.journal.note_services();
        let record = ServiceRecord {
            info: Arc::new(info),
            diagnostics,
        };
        let slot = match self.services.entry(record.info.key.clone()) {
            btree_map::Entry::Occupied(mut e) => {
                e.insert(record);
                e.into_mut()
            }
            btree_map::Entry::Vacant(e) => e.insert(record),
        };
        Ok(&slot.diagnostics)
    }

    pub fn delete_service(&mut self, key: &ObjectName) {
        self.journal.note_services();
        self.services.remove(key);
        self.derived_slices.remove(key);
    }

    /// Every Service, in (namespace, name) order.
    pub fn services(&self) -> impl Iterator<Item = &ServiceRecord> {
        self.services.values()
    }

    pub fn service(&self, key: &ObjectName) -> Option<&ServiceRecord> {
        self.services.get(key)
    }

    /// Creates or replaces an EndpointSlice and returns what could not be used of it.
    pub fn upsert_endpoint_slice(&mut self, slice: &EndpointSlice) -> Result<&[ServiceDiagnostic]> {
        let (info, diagnostics) = SliceInfo::from_endpoint_slice(slice)?;
        self.journal.note_services();
        let key = info.key.clone();
        self.delete_endpoint_slice(&key);
        if let Some(service) = &info.service {
            self.slices_by_service
                .entry(ObjectName::new(&key.namespace, service))
                .or_default()
                .insert(key.clone());
        }
        let record = self.slices.entry(key).or_insert(SliceRecord {
            slices: vec![info],
            diagnostics,
        });
        Ok(&record.diagnostics)
    }

    pub fn delete_endpoint_slice(&mut self, key: &ObjectName) {
        let Some(old) = self.slices.remove(key) else {
            return;
        };
        self.journal.note_services();
        for service in old.slices.iter().filter_map(|s| s.service.as_ref()) {
            remove_from_btree_index_set(
                &mut self.slices_by_service,
                &ObjectName::new(&key.namespace, service),
                key,
            );
        }
    }

    /// The EndpointSlices of a Service: those declared for it and those derived for it.
    pub fn service_slices(&self, service: &ObjectName) -> impl Iterator<Item = &SliceInfo> {
        let declared = self
            .slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
            .flat_map(|r| &r.slices);
        let derived = self
            .derived_slices
            .get(service)
            .into_iter()
            .flat_map(|r| &r.slices);
        declared.chain(derived)
    }

    /// Replaces the slices derived for `service`.
    pub(crate) fn set_derived_slices(&mut self, service: ObjectName, record: SliceRecord) {
        if self
            .derived_slices
            .get(&service)
            .map(|r| (&r.slices, &r.diagnostics))
            != Some((&record.slices, &record.diagnostics))
            && !(record.slices.is_empty()
                && record.diagnostics.is_empty()
                && !self.derived_slices.contains_key(&service))
        {
            self.journal.note_services();
        }
        if record.slices.is_empty() && record.diagnostics.is_empty() {
            self.derived_slices.remove(&service);
        } else {
            self.derived_slices.insert(service, record);
        }
    }

    pub(crate) fn derived_services(&self) -> impl Iterator<Item = &ObjectName> {
        self.derived_slices.keys()
    }

    /// What could not be used of stored Services and EndpointSlices (derived ones included).
    pub fn service_diagnostics(&self) -> impl Iterator<Item = &ServiceDiagnostic> {
        self.services
            .values()
            .flat_map(|r| &r.diagnostics)
            .chain(self.slices.values().flat_map(|r| &r.diagnostics))
            .chain(self.derived_slices.values().flat_map(|r| &r.diagnostics))
    }

    // ---------------------------------------------------------------- drop sets

    /// Creates or replaces a DropCIDRSet and returns what could not be used of it (left out).
    pub fn upsert_drop_set(&mut self, set: &DropCidrSet) -> Result<&[ServiceDiagnostic]> {
        let (set, diagnostics) = drop_cidrs::validate(set)?;
        let slot = match self.drop_sets.entry(set.name.clone()) {
            btree_map::Entry::Occupied(mut e) => {
                e.insert((set, diagnostics));
                e.into_mut()
            }
            btree_map::Entry::Vacant(e) => e.insert((set, diagnostics)),
        };
        Ok(&slot.1)
    }

    pub fn delete_drop_set(&mut self, name: &str) {
        self.drop_sets.remove(name);
    }

    /// Every DropCIDRSet's usable prefixes, in name order.
    pub fn drop_sets(&self) -> impl Iterator<Item = &DropSet> {
        self.drop_sets.values().map(|(s, _)| s)
    }

    /// What could not be used of stored DropCIDRSets.
    pub fn drop_set_diagnostics(&self) -> impl Iterator<Item = &ServiceDiagnostic> {
        self.drop_sets.values().flat_map(|(_, d)| d)
    }

    // ---------------------------------------------------------------- changes

    /// What changed since the last call (everything, the first time), and starts recording
    /// anew.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::replace(&mut self.journal, Changes::none())
    }

    /// The pods with address `ip` (more than one while the address is contested).
    pub(crate) fn pods_at(&self, ip: IpAddr) -> impl Iterator<Item = &PodInfo> {
        self.pods_by_ip
            .get(&ip)
            .into_iter()
            .flatten()
            .filter_map(|i| self.pods.get(*i))
            .map(|r| &r.info)
    }

    /// The pods of namespace `name`.
    pub(crate) fn pods_in(&self, name: &str) -> impl Iterator<Item = &PodInfo> {
        self.namespace_ids
            .get(name)
            .and_then(|i| self.namespaces.get(*i))
            .into_iter()
            .flat_map(|r| r.pods.iter())
            .filter_map(|i| self.pods.get(*i))
            .map(|r| &r.info)
    }

    /// Node object `name`.
    pub fn node(&self, name: &str) -> Option<&NodeRecord> {
        self.nodes.get(name)
    }

    /// Whether `name` is a node: a Node object, or a node a stored pod is scheduled to.
    pub fn has_node(&self, name: &str) -> bool {
        self.nodes.contains_key(name) || self.pods_by_node.contains_key(name)
    }

    // ---------------------------------------------------------------- index access

    pub(crate) fn pod_record(&self, idx: PodIdx) -> Option<&PodRecord> {
        self.pods.get(idx)
    }

    pub(crate) fn namespace_record(&self, idx: NsIdx) -> Option<&NamespaceRecord> {
        self.namespaces.get(idx)
    }

    pub(crate) fn namespace_id(&self, name: &str) -> Option<NsIdx> {
        self.namespace_ids.get(name).copied()
    }

    pub(crate) fn all_namespaces(&self) -> impl Iterator<Item = (NsIdx, &NamespaceRecord)> {
        self.namespaces.iter()
    }

    pub(crate) fn namespaces_with_label(&self, key: &str, value: &str) -> Option<&BTreeSet<NsIdx>> {
        self.namespaces_by_label.get(key, value)
    }

    pub(crate) fn pods_with_label(&self, key: &str, value: &str) -> Option<&BTreeSet<PodIdx>> {
        self.pods_by_label.get(key, value)
    }

    pub(crate) fn pods_on_node(&self, node: &str) -> impl Iterator<Item = PodIdx> + '_ {
        self.pods_by_node.get(node).into_iter().flatten().copied()
    }

    pub(crate) fn pods_with_port_name(
        &self,
        name: &str,
        protocol: Protocol,
    ) -> impl Iterator<Item = PodIdx> + '_ {
        self.pods_by_port_name
            .get(&(name.to_owned(), protocol))
            .into_iter()
            .flatten()
            .copied()
    }
}

fn remove_from_btree_index<K: Ord>(index: &mut BTreeMap<K, BTreeSet<u32>>, key: &K, id: u32) {
    if let Some(ids) = index.get_mut(key) {
        ids.remove(&id);
        if ids.is_empty() {
            index.remove(key);
        }
    }
}

fn remove_from_btree_index_set<K: Ord, V: Ord>(
    index: &mut BTreeMap<K, BTreeSet<V>>,
    key: &K,
    value: &V,
) {
    if let Some(values) = index.get_mut(key) {
        values.remove(value);
        if values.is_empty() {
            index.remove(key);
        }
    }
}

fn remove_from_hash_index<K: std::hash::Hash + Eq>(
    index: &mut HashMap<K, BTreeSet<u32>>,
    key: &K,
    id: u32,
) {
    if let Some(ids) = index.get_mut(key) {
        ids.remove(&id);
        if ids.is_empty() {
            index.remove(key);
        }
    }
}
