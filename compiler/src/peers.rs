//! Peers as *atoms*: the distinct things peer classes separate addresses by, interned to
//! small ids that stay stable across compiles (so class signatures, built from atom ids,
//! stay stable too), and evaluated at most once per compile through the cluster's indexes.
//!
//! * [`AtomKey::Pods`]: the pods a pod peer (`podSelector` / `namespaceSelector`) selects.
//! * [`AtomKey::Namespaces`]: the namespaces a `namespaceSelector` selects (shared by every
//!   pod peer with that namespace selector).
//! * [`AtomKey::Block`]: the addresses an `ipBlock` selects.
//! * [`AtomKey::Nodes`]: the addresses of the Nodes a `nodes` peer selects.
//! * [`AtomKey::NamedPort`]: what a port name means on a pod (ingress: on the local pod;
//!   egress: on the destination pod).
//!
//! A stored policy with its rules interned this way is a [`CachedPolicy`]: the compiler keeps
//! one per policy and every node's compile reads them.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{Arc, OnceLock},
};

use weir_api::Direction;

use super::{
    HashMap,
    cluster::{Cluster, NsIdx, PodIdx, PodInfo},
    policy::{IpBlockPeer, NamespaceScope, Peer, PodPeer, PortMatch, Protocol, Rule},
    selector::{Labels, Selector},
    validate::ValidatedPolicy,
};

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum AtomKey {
    Pods(PodPeer),
    Namespaces(Selector),
    Block(IpBlockPeer),
    Nodes(Selector),
    NamedPort { name: String, protocol: Protocol },
}

/// The interned atoms. Ids are allocated smallest-free-first; ids of atoms no policy uses
/// any more are released by [`AtomTable::retain`], which only runs after every node's
/// state has been recompiled without them.
#[derive(Clone, Debug, Default)]
pub(crate) struct AtomTable {
    ids: HashMap<Arc<AtomKey>, u32>,
    keys: Vec<Option<Arc<AtomKey>>>,
    /// For `Pods` atoms with a namespace selector: the `Namespaces` atom of that selector.
    namespace_atom: Vec<Option<u32>>,
    /// How many times cached policies refer to each atom.
    refs: Vec<u32>,
    free: BTreeSet<u32>,
}

impl AtomTable {
    pub fn intern(&mut self, key: &AtomKey) -> u32 {
        if let Some(&id) = self.ids.get(key) {
            return id;
        }
        let namespace_atom = match key {
            AtomKey::Pods(PodPeer {
                namespaces: NamespaceScope::Matching(sel),
                ..
            }) => Some(self.intern(&AtomKey::Namespaces(sel.clone()))),
            _ => None,
        };
        let id = match self.free.pop_first() {
            Some(id) => id,
            None => {
                self.keys.push(None);
                self.namespace_atom.push(None);
                self.refs.push(0);
                u32::try_from(self.keys.len() - 1).unwrap_or(u32::MAX)
            }
        };
        let key = Arc::new(key.clone());
        self.keys[id as usize] = Some(key.clone());
        self.namespace_atom[id as usize] = namespace_atom;
        self.ids.insert(key, id);
        id
    }

    pub fn key(&self, id: u32) -> Option<&AtomKey> {
        self.keys.get(id as usize)?.as_deref()
    }

    /// One past the largest id.
    pub fn capacity(&self) -> usize {
        self.keys.len()
    }

    /// Counts the references of a cached policy to its atoms.
    pub fn acquire(&mut self, ids: impl Iterator<Item = u32>) {
        for id in ids {
            if let Some(r) = self.refs.get_mut(id as usize) {
                *r += 1;
            }
        }
    }

    /// Uncounts the references of a cached policy that is dropped.
    pub fn release(&mut self, ids: impl Iterator<Item = u32>) {
        for id in ids {
            if let Some(r) = self.refs.get_mut(id as usize) {
                *r = r.saturating_sub(1);
            }
        }
    }

    /// Releases every atom no cached policy refers to (and that is not the namespace atom of
    /// one that is). Only once every node state that used them has been recompiled.
    pub fn retain_referenced(&mut self) {
        let mut keep = vec![false; self.keys.len()];
        for (id, refs) in self.refs.iter().enumerate() {
            if *refs > 0 {
                keep[id] = true;
                if let Some(Some(ns)) = self.namespace_atom.get(id) {
                    keep[*ns as usize] = true;
                }
            }
        }
        for (id, slot) in self.keys.iter_mut().enumerate() {
            let Ok(id) = u32::try_from(id) else { break };
            if slot.is_some() && !keep[id as usize] {
                if let Some(key) = slot.take() {
                    self.ids.remove(&*key);
                }
                self.namespace_atom[id as usize] = None;
                self.free.insert(id);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Every interned atom with its id.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &AtomKey)> {
        self.keys
            .iter()
            .enumerate()
            .filter_map(|(i, k)| Some((u32::try_from(i).ok()?, k.as_deref()?)))
    }
}

/// What port names mean somewhere: named-port atom → port numbers (non-empty), sorted by
/// atom.
pub(crate) type PortNumbers = Vec<(u32, Box<[u16]>)>;

/// A rule with its peers and named ports as atom ids.
#[derive(Clone, Debug)]
pub(crate) struct RuleAtoms {
    /// `None`: every peer.
    pub peers: Option<Box<[u32]>>,
    /// For each entry of the rule's `ports` that is a named port: its atom id (other
    /// entries: `None`).
    pub named: Box<[Option<u32>]>,
}

impl RuleAtoms {
    pub fn new(rule: &Rule, atoms: &mut AtomTable) -> Self {
        let peers = rule.peers.as_ref().map(|peers| {
            let mut ids: Vec<u32> = peers
                .iter()
                .map(|p| match p {
                    Peer::Pods(pp) => atoms.intern(&AtomKey::Pods(pp.clone())),
                    Peer::IpBlock(b) => atoms.intern(&AtomKey::Block(b.clone())),
                    Peer::Nodes(sel) => atoms.intern(&AtomKey::Nodes(sel.clone())),
                })
                .collect();
            ids.sort_unstable();
            ids.dedup();
            ids.into_boxed_slice()
        });
        let named = rule
            .ports
            .iter()
            .flatten()
            .map(|p| match p {
                PortMatch::Named { protocol, name } => Some(atoms.intern(&AtomKey::NamedPort {
                    name: name.clone(),
                    protocol: *protocol,
                })),
                _ => None,
            })
            .collect();
        Self { peers, named }
    }

    /// Every atom this rule refers to.
    pub fn atom_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.peers
            .iter()
            .flat_map(|p| p.iter().copied())
            .chain(self.named.iter().flatten().copied())
    }
}

/// A policy with its rules' peers and named ports interned, reused while the stored policy
/// is unchanged.
#[derive(Debug)]
pub(crate) struct CachedPolicy {
    /// Persistent small id (see `PolicyIds` in the `compile` module).
    pub id: u32,
    /// How node states name it (shared by every rule and rule set that does).
    pub reference: weir_api::PolicyRef,
    pub validated: Arc<ValidatedPolicy>,
    /// ClusterNetworkPolicy: the `Pods` atom of its subject (the pods it applies to).
    pub subject: Option<u32>,
    pub ingress: Vec<RuleAtoms>,
    pub egress: Vec<RuleAtoms>,
}

impl CachedPolicy {
    /// Every atom the policy refers to (with repetitions): its rules' and its subject's.
    pub fn atom_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.ingress
            .iter()
            .chain(&self.egress)
            .flat_map(RuleAtoms::atom_ids)
            .chain(self.subject)
    }

    /// The rules of one direction as written, each with its interned form (none if the
    /// policy does not isolate that direction).
    pub fn written_rules(
        &self,
        direction: Direction,
    ) -> impl Iterator<Item = (&super::policy::Rule, &RuleAtoms)> {
        let written = self.validated.policy.rules(direction).unwrap_or_default();
        written
            .iter()
            .zip(self.rules(direction).unwrap_or_default())
    }

    /// The interned rules of one direction; `None` if the policy does not isolate it.
    pub fn rules(&self, direction: Direction) -> Option<&[RuleAtoms]> {
        match direction {
            Direction::Ingress => self
                .validated
                .policy
                .ingress
                .as_ref()
                .map(|_| &self.ingress[..]),
            Direction::Egress => self
                .validated
                .policy
                .egress
                .as_ref()
                .map(|_| &self.egress[..]),
        }
    }
}

/// Members of atoms, evaluated on first use during one compile (thread-safe, so nodes can be
/// compiled in parallel).
pub(crate) struct AtomMembers<'a> {
    cluster: &'a Cluster,
    atoms: &'a AtomTable,
    /// `Pods` atoms: sorted pod indexes. `Namespaces` atoms: sorted namespace indexes.
    members: Vec<OnceLock<Box<[u32]>>>,
    /// `Nodes` atoms: the selected nodes' addresses, sorted.
    node_addresses: Vec<OnceLock<Box<[IpAddr]>>>,
}

impl<'a> AtomMembers<'a> {
    pub fn new(cluster: &'a Cluster, atoms: &'a AtomTable) -> Self {
        Self {
            cluster,
            atoms,
            members: (0..atoms.capacity()).map(|_| OnceLock::new()).collect(),
            node_addresses: (0..atoms.capacity()).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The addresses of the nodes a `Nodes` atom selects (empty for other atoms).
    pub fn node_addresses(&self, id: u32) -> &[IpAddr] {
        let Some(cell) = self.node_addresses.get(id as usize) else {
            return &[];
        };
        cell.get_or_init(|| match self.atoms.key(id) {
            Some(AtomKey::Nodes(sel)) => {
                let mut ips: Vec<IpAddr> = self
                    .cluster
                    .nodes()
                    .filter(|(_, node)| sel.matches(&node.labels))
                    .flat_map(|(_, node)| node.ips.iter().copied())
                    .collect();
                ips.sort_unstable();
                ips.dedup();
                ips.into_boxed_slice()
            }
            _ => Box::default(),
        })
    }

    pub fn key(&self, id: u32) -> Option<&'a AtomKey> {
        self.atoms.key(id)
    }

    /// The pods a `Pods` atom selects (empty for other atoms).
    pub fn pods(&self, id: u32) -> &[PodIdx] {
        let Some(cell) = self.members.get(id as usize) else {
            return &[];
        };
        cell.get_or_init(|| match self.atoms.key(id) {
            Some(AtomKey::Pods(peer)) => {
                let namespaces: Vec<NsIdx> = match &peer.namespaces {
                    NamespaceScope::Own(ns) => self.cluster.namespace_id(ns).into_iter().collect(),
                    NamespaceScope::Matching(_) => {
                        let ns_atom = self
                            .atoms
                            .namespace_atom
                            .get(id as usize)
                            .copied()
                            .flatten();
                        ns_atom
                            .map(|a| self.namespaces(a).to_vec())
                            .unwrap_or_default()
                    }
                };
                select_pods(self.cluster, &namespaces, &peer.pods)
            }
            _ => Box::default(),
        })
    }

    /// The namespaces a `Namespaces` atom selects.
    fn namespaces(&self, id: u32) -> &[NsIdx] {
        let Some(cell) = self.members.get(id as usize) else {
            return &[];
        };
        cell.get_or_init(|| match self.atoms.key(id) {
            Some(AtomKey::Namespaces(sel)) => select_namespaces(self.cluster, sel),
            _ => Box::default(),
        })
    }
}

/// Whether `peer` selects `pod` while its namespace has `ns_labels`.
pub(crate) fn selects(peer: &PodPeer, pod: &PodInfo, ns_labels: &Labels) -> bool {
    let namespace = match &peer.namespaces {
        NamespaceScope::Own(ns) => pod.key.namespace == *ns,
        NamespaceScope::Matching(sel) => sel.matches(ns_labels),
    };
    namespace && peer.pods.matches(&pod.labels)
}

/// Posting lists of the cheapest `In` requirement: every match is in one of them.
fn cheapest_postings<'c>(
    selector: &Selector,
    lookup: impl Fn(&str, &str) -> Option<&'c BTreeSet<u32>>,
) -> Option<(usize, Vec<&'c BTreeSet<u32>>)> {
    selector
        .indexable()
        .map(|(key, values)| {
            let lists: Vec<&BTreeSet<u32>> = values.iter().filter_map(|v| lookup(key, v)).collect();
            (lists.iter().map(|l| l.len()).sum(), lists)
        })
        .min_by_key(|(cost, _)| *cost)
}

/// Namespaces whose labels match `selector`, sorted.
pub(crate) fn select_namespaces(cluster: &Cluster, selector: &Selector) -> Box<[NsIdx]> {
    let matches = |idx: NsIdx| {
        cluster
            .namespace_record(idx)
            .is_some_and(|r| selector.matches(&r.labels))
    };
    let mut out: Vec<NsIdx> =
        match cheapest_postings(selector, |k, v| cluster.namespaces_with_label(k, v)) {
            Some((_, lists)) => lists
                .into_iter()
                .flatten()
                .copied()
                .filter(|i| matches(*i))
                .collect(),
            None => cluster
                .all_namespaces()
                .filter(|(_, r)| selector.matches(&r.labels))
                .map(|(i, _)| i)
                .collect(),
        };
    out.sort_unstable();
    out.dedup();
    out.into_boxed_slice()
}

/// Pods in `namespaces` (sorted) whose labels match `selector`, sorted. Scans the
/// namespaces' pods or the label index, whichever is smaller.
pub(crate) fn select_pods(
    cluster: &Cluster,
    namespaces: &[NsIdx],
    selector: &Selector,
) -> Box<[PodIdx]> {
    let scan_cost: usize = namespaces
        .iter()
        .filter_map(|n| cluster.namespace_record(*n))
        .map(|r| r.pods.len())
        .sum();
    let postings = cheapest_postings(selector, |k, v| cluster.pods_with_label(k, v));
    let mut out: Vec<PodIdx> = match postings {
        Some((cost, lists)) if cost < scan_cost => lists
            .into_iter()
            .flatten()
            .copied()
            .filter(|p| {
                cluster.pod_record(*p).is_some_and(|r| {
                    namespaces.binary_search(&r.namespace).is_ok()
                        && selector.matches(&r.info.labels)
                })
            })
            .collect(),
        _ => namespaces
            .iter()
            .filter_map(|n| cluster.namespace_record(*n))
            .flat_map(|r| r.pods.iter().copied())
            .filter(|p| {
                cluster
                    .pod_record(*p)
                    .is_some_and(|r| selector.matches(&r.info.labels))
            })
            .collect(),
    };
    out.sort_unstable();
    out.dedup();
    out.into_boxed_slice()
}
