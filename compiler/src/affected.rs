//! Which nodes a set of [`Changes`] touches: those an incremental compile recompiles.
//!
//! A node's state is a function of its own pods (labels, addresses, named ports), the
//! NetworkPolicies of their namespaces, its Node object (HostPolicies select by node
//! labels), and the members of the peers its rules refer to (recorded in its memory at each
//! compile). So a node is touched when:
//!
//! * a pod on it changed (before or after the change);
//! * a NetworkPolicy that selected or selects one of its pods changed;
//! * its Node object changed;
//! * a peer it refers to changed members: a pod joined or left a pod selector (by its labels
//!   or its namespace's), a member's addresses changed (or its claim on an address another
//!   pod also has), a pod with a port name an egress rule uses changed, or a Node a `nodes`
//!   peer selects changed;
//! * ClusterNetworkPolicies exist and a namespace's labels changed: their subjects select by
//!   namespace, so the nodes of that namespace's pods.
//!
//! Every check is conservative: touching a node too many costs a recompile whose state is
//! unchanged, touching one too few would leave a stale state (the property tests compare
//! every incremental compile with a full one).

use std::collections::BTreeSet;

use weir_api::PodKey;

use super::{
    HashMap,
    changes::Changes,
    cluster::{Cluster, NAMESPACE_NAME_LABEL, PodInfo},
    node::NodeMemory,
    peers::{AtomKey, AtomTable, selects},
    policy::{NamespaceScope, PodPeer},
    selector::{Labels, Selector},
};

/// The nodes `changes` touch (some may be gone from `cluster`). `policies` holds, for every
/// changed NetworkPolicy, its namespace and the pod selectors of its old and new versions.
pub(crate) fn nodes(
    cluster: &Cluster,
    changes: &Changes,
    policies: &[(&str, Selector)],
    atoms: &AtomTable,
    memories: &HashMap<String, NodeMemory>,
) -> BTreeSet<String> {
    let mut touched = BTreeSet::new();
    let mut dirty: BTreeSet<u32> = BTreeSet::new();
    let keys: Vec<(u32, &AtomKey)> = atoms.iter().collect();
    let has_node_peers = keys.iter().any(|(_, k)| matches!(k, AtomKey::Nodes(_)));
    let has_cluster_policies = cluster.cluster_policies().next().is_some();

    // Pods, and the pods that share an address with one (who owns it may have moved).
    let mut sharing: BTreeSet<PodKey> = BTreeSet::new();
    for (key, before) in &changes.pods {
        let after = cluster.pod(key);
        let before = before.as_ref();
        for info in before.into_iter().chain(after) {
            if let Some(node) = &info.node {
                touched.insert(node.clone());
            }
            for ip in &info.ips {
                for other in cluster.pods_at(*ip) {
                    if other.key != *key {
                        sharing.insert(other.key.clone());
                    }
                }
            }
        }
        let pod = PodChange {
            before,
            after,
            ns_before: namespace_labels_before(cluster, changes, &key.namespace),
            ns_after: namespace_labels(cluster, &key.namespace),
            ips_changed: before.map(|p| &p.ips) != after.map(|p| &p.ips),
        };
        pod.moved_atoms(&keys, &mut dirty);
    }
    for key in sharing.iter().filter(|k| !changes.pods.contains_key(*k)) {
        let Some(info) = cluster.pod(key) else {
            continue;
        };
        if let Some(node) = &info.node {
            touched.insert(node.clone());
        }
        // Whether it still owns its address may have changed: as if its addresses had.
        let ns = namespace_labels(cluster, &key.namespace);
        let pod = PodChange {
            before: Some(info),
            after: Some(info),
            ns_before: ns.clone(),
            ns_after: ns,
            ips_changed: true,
        };
        pod.moved_atoms(&keys, &mut dirty);
    }

    // Namespaces: selectors of namespace labels gain or lose the namespace's pods.
    for (name, before) in &changes.namespaces {
        let pods: Vec<&PodInfo> = cluster.pods_in(name).collect();
        if pods.is_empty() {
            continue;
        }
        let before = before.clone().unwrap_or_else(|| name_only(name));
        let after = namespace_labels(cluster, name);
        for (id, atom) in &keys {
            if let AtomKey::Pods(PodPeer {
                namespaces: NamespaceScope::Matching(sel),
                ..
            }) = atom
                && sel.matches(&before) != sel.matches(&after)
            {
                dirty.insert(*id);
            }
        }
        if has_cluster_policies {
            touched.extend(pods.iter().filter_map(|p| p.node.clone()));
        }
    }

    // Node objects: the node itself, and the `nodes` peers selecting it.
    for (name, before) in &changes.nodes {
        touched.insert(name.clone());
        if !has_node_peers {
            continue;
        }
        let after = cluster.node(name);
        for (id, atom) in &keys {
            if let AtomKey::Nodes(sel) = atom {
                let was = before.as_ref().is_some_and(|n| sel.matches(&n.labels));
                let is = after.is_some_and(|n| sel.matches(&n.labels));
                if was || is {
                    dirty.insert(*id);
                }
            }
        }
    }

    // NetworkPolicies: the nodes of the pods they selected or select (their rule sets
    // change; the policy is nobody else's).
    for (ns, selector) in policies {
        touched.extend(
            cluster
                .pods_in(ns)
                .filter(|p| selector.matches(&p.labels))
                .filter_map(|p| p.node.clone()),
        );
    }

    // Nodes whose peers moved.
    if !dirty.is_empty() {
        for (name, memory) in memories {
            if !touched.contains(name)
                && dirty.iter().any(|a| memory.atoms.binary_search(a).is_ok())
            {
                touched.insert(name.clone());
            }
        }
    }
    touched
}

/// A pod before and after the changes.
struct PodChange<'a> {
    before: Option<&'a PodInfo>,
    after: Option<&'a PodInfo>,
    ns_before: Labels,
    ns_after: Labels,
    ips_changed: bool,
}

impl PodChange<'_> {
    /// Adds to `dirty` the atoms whose members (or what they say of them) the change moves.
    fn moved_atoms(&self, keys: &[(u32, &AtomKey)], dirty: &mut BTreeSet<u32>) {
        let (before, after) = (self.before, self.after);
        for (id, atom) in keys {
            let moved = match atom {
                AtomKey::Pods(peer) => {
                    let was = before.is_some_and(|p| selects(peer, p, &self.ns_before));
                    let is = after.is_some_and(|p| selects(peer, p, &self.ns_after));
                    was != is || ((was || is) && self.ips_changed)
                }
                AtomKey::NamedPort { name, protocol } => {
                    let has = |p: &PodInfo| {
                        p.named_ports
                            .iter()
                            .any(|n| n.name == *name && n.protocol == *protocol)
                    };
                    before.is_some_and(has) || after.is_some_and(has)
                }
                // A pod address that is also a node's is no node peer's host entry.
                AtomKey::Nodes(_) => self.ips_changed,
                AtomKey::Namespaces(_) | AtomKey::Block(_) => false,
            };
            if moved {
                dirty.insert(*id);
            }
        }
    }
}

/// A namespace's labels now (only its name label if it is implied or gone).
fn namespace_labels(cluster: &Cluster, name: &str) -> Labels {
    cluster
        .namespace_labels(name)
        .cloned()
        .unwrap_or_else(|| name_only(name))
}

/// A namespace's labels before `changes`.
fn namespace_labels_before(cluster: &Cluster, changes: &Changes, name: &str) -> Labels {
    match changes.namespaces.get(name) {
        Some(before) => before.clone().unwrap_or_else(|| name_only(name)),
        None => namespace_labels(cluster, name),
    }
}

fn name_only(name: &str) -> Labels {
    [(NAMESPACE_NAME_LABEL, name)].into_iter().collect()
}
