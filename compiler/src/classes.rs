//! Peer classes of one node: a partition of all addresses such that two addresses share a
//! class iff every peer the node's rule sets refer to treats them alike (DESIGN.md, "Scale
//! rule": classes are computed per node, over that node's peers only).
//!
//! An address's *signature* is what those peers say about it: the pod-peer and ipBlock atoms
//! that contain it, and, for port names that egress rules resolve against the destination,
//! the port numbers the name stands for on the pod at that address. Equal signatures are one
//! class. The signature of an address that no peer matches is empty: class 0
//! ([`weir_api::CLASS_UNMATCHED`]).
//!
//! Encoding for the dataplane's longest-prefix match: the ipBlock CIDRs and excepts cut the
//! address space into *regions* (addresses whose longest matching CIDR is the same); every
//! ipBlock treats a region uniformly, so a region's signature is the set of blocks that
//! contain its prefix and no except of which does. A region gets a prefix entry only where
//! its class differs from its enclosing region's; a pod address gets a host entry only where
//! its class differs from its region's.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use weir_api::PeerClasses;

use super::{
    HashMap,
    cluster::{Cluster, PodIdx},
    peers::{AtomKey, AtomMembers, PortNumbers},
};

/// What the node's peers say about an address. Ordered, hashable: the key of a class id.
///
/// Stored flat, so that the signatures of thousands of pod addresses can be looked up
/// without allocating: the sorted pod-peer and ipBlock atoms containing the address, then
/// [`PORTS_MARK`] and, for each port name some egress rule matching the address uses (sorted
/// by atom), the named-port atom, the count of numbers, and the port numbers it stands for
/// on the pod at the address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ClassSignature(Box<[u32]>);

/// Separates atoms from named-port resolutions in a [`ClassSignature`] (atom ids never
/// reach it).
const PORTS_MARK: u32 = u32::MAX;

impl ClassSignature {
    /// The atoms containing the address.
    pub fn atoms(&self) -> &[u32] {
        let end = self
            .0
            .iter()
            .position(|a| *a == PORTS_MARK)
            .unwrap_or(self.0.len());
        &self.0[..end]
    }

    /// What port names stand for at the address, as stored after the atoms (empty if
    /// nothing): two signatures with the same resolutions give every named port the same
    /// numbers.
    pub fn port_resolutions(&self) -> &[u32] {
        &self.0[self.atoms().len()..]
    }

    /// The numbers `named_atom` stands for at the address (empty if none).
    pub fn port_numbers(&self, named_atom: u32) -> Vec<u16> {
        let Some(mark) = self.0.iter().position(|a| *a == PORTS_MARK) else {
            return Vec::new();
        };
        let mut rest = &self.0[mark + 1..];
        while let [atom, count, tail @ ..] = rest {
            let n = (*count as usize).min(tail.len());
            if *atom == named_atom {
                return tail[..n]
                    .iter()
                    .filter_map(|p| u16::try_from(*p).ok())
                    .collect();
            }
            rest = &tail[n..];
        }
        Vec::new()
    }
}

/// Writes a flat signature into `out`: `atoms` must be sorted, `ports` sorted by atom.
fn encode(out: &mut Vec<u32>, atoms: impl Iterator<Item = u32>, ports: &[(u32, Box<[u16]>)]) {
    out.clear();
    out.extend(atoms);
    if !ports.is_empty() {
        out.push(PORTS_MARK);
        for (atom, numbers) in ports {
            out.push(*atom);
            out.push(u32::try_from(numbers.len()).unwrap_or(0));
            out.extend(numbers.iter().map(|p| u32::from(*p)));
        }
    }
}

/// Where a port name must be resolved against destination pods: pods matched by these
/// peers (egress rules using the name), or every pod (a rule with no `to`).
#[derive(Clone, Debug)]
pub(crate) enum Activation {
    Everywhere,
    Peers(BTreeSet<u32>),
}

impl Activation {
    pub fn merge(&mut self, peers: Option<&[u32]>) {
        match (&mut *self, peers) {
            (Activation::Everywhere, _) => {}
            (_, None) => *self = Activation::Everywhere,
            (Activation::Peers(set), Some(ids)) => set.extend(ids.iter().copied()),
        }
    }
}

/// The peers one node's rule sets refer to.
#[derive(Clone, Debug, Default)]
pub(crate) struct NodePeers {
    /// `Pods` atoms.
    pub selectors: BTreeSet<u32>,
    /// `Block` atoms.
    pub blocks: BTreeSet<u32>,
    /// `Nodes` atoms.
    pub nodes: BTreeSet<u32>,
    /// `NamedPort` atoms of egress rules, and where they apply.
    pub egress_ports: BTreeMap<u32, Activation>,
}

/// The classes of one node.
#[derive(Clone, Debug)]
pub(crate) struct Classification {
    /// Distinct signatures; index 0 is the empty one.
    pub signatures: Vec<ClassSignature>,
    regions: Regions,
    /// Pod addresses, and node addresses `nodes` peers select, with their signature index.
    pub pod_addresses: Vec<(IpAddr, usize)>,
}

impl Classification {
    pub fn classify(cluster: &Cluster, members: &AtomMembers<'_>, peers: &NodePeers) -> Self {
        let mut interner = SignatureInterner::default();
        let regions = Regions::new(members, &peers.blocks, &mut interner);

        // (pod, atom) for every selector atom's member; sorted, each pod's atoms are a run.
        let mut selected: Vec<(PodIdx, u32)> = Vec::new();
        for &atom in &peers.selectors {
            selected.extend(members.pods(atom).iter().map(|&pod| (pod, atom)));
        }
        selected.sort_unstable();
        let resolved = resolve_egress_ports(cluster, members, peers);

        let mut candidates: Vec<PodIdx> = selected
            .iter()
            .map(|(p, _)| *p)
            .chain(resolved.keys().copied())
            .collect();
        candidates.sort_unstable();
        candidates.dedup();
        let mut pod_addresses = Vec::new();
        let mut buffer: Vec<u32> = Vec::new();
        let mut run = 0;
        for pod in candidates {
            let start = run;
            while run < selected.len() && selected[run].0 == pod {
                run += 1;
            }
            let pod_atoms = &selected[start..run];
            let Some(record) = cluster.pod_record(pod) else {
                continue;
            };
            let ports = resolved.get(&pod).map_or(&[][..], Vec::as_slice);
            for &ip in &record.info.ips {
                if !cluster.owns_ip(pod, ip) {
                    continue;
                }
                let (_, region) = regions.lookup(ip);
                let region_atoms = interner.signatures[region].atoms();
                let mut atoms: Vec<u32> = Vec::new();
                let merged: &[u32] = if region_atoms.is_empty() {
                    // The common case: no ipBlock contains the address.
                    buffer.clear();
                    buffer.extend(pod_atoms.iter().map(|(_, a)| *a));
                    &buffer
                } else {
                    atoms.extend(region_atoms);
                    atoms.extend(pod_atoms.iter().map(|(_, a)| *a));
                    atoms.sort_unstable();
                    &atoms
                };
                let mut flat = Vec::with_capacity(merged.len());
                encode(&mut flat, merged.iter().copied(), ports);
                pod_addresses.push((ip, interner.intern(&flat)));
            }
        }
        // Node addresses a `nodes` peer selects: host entries like pods' (a node address is
        // never a pod's: host-network pods are not stored).
        let mut node_atoms: BTreeMap<IpAddr, Vec<u32>> = BTreeMap::new();
        for &atom in &peers.nodes {
            for &ip in members.node_addresses(atom) {
                node_atoms.entry(ip).or_default().push(atom);
            }
        }
        for (ip, mut atoms) in node_atoms {
            if cluster.pod_at(ip).is_some() {
                continue;
            }
            let (_, region) = regions.lookup(ip);
            atoms.extend(interner.signatures[region].atoms());
            atoms.sort_unstable();
            atoms.dedup();
            let mut flat = Vec::with_capacity(atoms.len());
            encode(&mut flat, atoms.into_iter(), &[]);
            pod_addresses.push((ip, interner.intern(&flat)));
        }
        Self {
            signatures: interner.signatures,
            regions,
            pod_addresses,
        }
    }

    /// Which signatures some address has.
    pub fn present(&self) -> Vec<bool> {
        let mut present = vec![false; self.signatures.len()];
        let regions = self.regions.list.iter().map(|(_, s)| *s);
        for s in regions.chain(self.pod_addresses.iter().map(|(_, s)| *s)) {
            present[s] = true;
        }
        present
    }

    /// The `peer_classes` table, given the class id of each signature.
    pub fn peer_class_entries(&self, class_of: &[u32]) -> PeerClasses {
        let mut regions = BTreeMap::new();
        let mut ordered: Vec<&(IpNet, usize)> = self.regions.list.iter().collect();
        ordered.sort_by_key(|(net, _)| (matches!(net, IpNet::V6(_)), net.prefix_len()));
        let mut v6_shadows_v4 = false;
        for (net, sig) in ordered {
            let parent = self
                .regions
                .enclosing(*net)
                .map_or(weir_api::CLASS_UNMATCHED, |s| class_of[s]);
            let class = class_of[*sig];
            if class != parent {
                regions.insert(*net, class);
                if let IpNet::V6(v6) = net {
                    v6_shadows_v4 |= v6.prefix_len() <= 96
                        && v6.contains(&Ipv4Addr::UNSPECIFIED.to_ipv6_mapped());
                }
            }
        }
        // The kernel's trie holds IPv4 IPv4-mapped: an IPv6 prefix covering ::ffff:0:0/96
        // would classify IPv4 addresses no IPv4 prefix matches. Pin the IPv4 root.
        let v4_root = weir_api::ipv4_root();
        if v6_shadows_v4 && !regions.contains_key(&v4_root) {
            let root_class = class_of[self.regions.lookup(IpAddr::V4(Ipv4Addr::UNSPECIFIED)).1];
            regions.insert(v4_root, root_class);
        }
        // Host entries where a pod's class differs from its region's; they replace a
        // region entry for the same prefix (an ipBlock of exactly that address).
        let mut hosts: Vec<(IpNet, u32)> = self
            .pod_addresses
            .iter()
            .filter_map(|&(ip, sig)| {
                let (_, region_sig) = self.regions.lookup(ip);
                (class_of[sig] != class_of[region_sig]).then(|| (IpNet::from(ip), class_of[sig]))
            })
            .collect();
        hosts.extend(regions);
        // Stable: for equal prefixes the host entry (pushed first) stays.
        hosts.sort_by_key(|(net, _)| *net);
        hosts.dedup_by_key(|(net, _)| *net);
        hosts.into_iter().collect()
    }
}

/// Distinct signatures of one node, index 0 the empty one.
struct SignatureInterner {
    ids: HashMap<Box<[u32]>, usize>,
    signatures: Vec<ClassSignature>,
}

impl Default for SignatureInterner {
    fn default() -> Self {
        let mut ids = HashMap::default();
        ids.insert(Box::default(), 0);
        Self {
            ids,
            signatures: vec![ClassSignature::default()],
        }
    }
}

impl SignatureInterner {
    fn intern(&mut self, flat: &[u32]) -> usize {
        if let Some(&i) = self.ids.get(flat) {
            return i;
        }
        let boxed: Box<[u32]> = flat.into();
        self.signatures.push(ClassSignature(boxed.clone()));
        self.ids.insert(boxed, self.signatures.len() - 1);
        self.signatures.len() - 1
    }
}

/// For each destination pod whose port names some egress rule matching it uses: the
/// named-port atoms and the numbers they stand for there (sorted by atom).
fn resolve_egress_ports(
    cluster: &Cluster,
    members: &AtomMembers<'_>,
    peers: &NodePeers,
) -> HashMap<PodIdx, PortNumbers> {
    let mut resolved: HashMap<PodIdx, PortNumbers> = HashMap::default();
    for (&atom, activation) in &peers.egress_ports {
        let Some(AtomKey::NamedPort { name, protocol }) = members.key(atom) else {
            continue;
        };
        let has_port = |pod: &PodIdx| {
            cluster.pod_record(*pod).is_some_and(|r| {
                r.info
                    .named_ports
                    .iter()
                    .any(|p| p.name == *name && p.protocol == *protocol)
            })
        };
        let mut pods: Vec<PodIdx> = match activation {
            Activation::Everywhere => cluster.pods_with_port_name(name, *protocol).collect(),
            Activation::Peers(ids) => {
                let mut v = Vec::new();
                for &id in ids {
                    match members.key(id) {
                        Some(AtomKey::Pods(_)) => {
                            v.extend(members.pods(id).iter().copied().filter(has_port));
                        }
                        Some(AtomKey::Block(block)) => {
                            v.extend(cluster.pods_with_port_name(name, *protocol).filter(|p| {
                                cluster.pod_record(*p).is_some_and(|r| {
                                    r.info.ips.iter().any(|ip| block.contains(*ip))
                                })
                            }));
                        }
                        _ => {}
                    }
                }
                v
            }
        };
        pods.sort_unstable();
        pods.dedup();
        for pod in pods {
            let Some(record) = cluster.pod_record(pod) else {
                continue;
            };
            let numbers = record.info.resolve_port(name, *protocol);
            if !numbers.is_empty() {
                resolved
                    .entry(pod)
                    .or_default()
                    .push((atom, numbers.into_boxed_slice()));
            }
        }
    }
    resolved
}

/// The regions cut by ipBlock CIDRs: every CIDR and except, plus both roots.
#[derive(Clone, Debug)]
struct Regions {
    by_net: HashMap<IpNet, usize>,
    list: Vec<(IpNet, usize)>,
    /// Prefix lengths present, longest first.
    v4_lens: Vec<u8>,
    v6_lens: Vec<u8>,
}

fn prefix_of(ip: IpAddr, len: u8) -> Option<IpNet> {
    IpNet::new(ip, len).ok().map(|n| n.trunc())
}

impl Regions {
    fn new(
        members: &AtomMembers<'_>,
        blocks: &BTreeSet<u32>,
        interner: &mut SignatureInterner,
    ) -> Self {
        // The roots are regions too: addresses outside every CIDR.
        let mut prefixes: BTreeSet<IpNet> =
            BTreeSet::from([IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())]);
        let mut by_cidr: HashMap<IpNet, Vec<u32>> = HashMap::default();
        let mut cidr_lens: BTreeSet<u8> = BTreeSet::new();
        for &id in blocks {
            if let Some(AtomKey::Block(block)) = members.key(id) {
                prefixes.insert(block.cidr);
                prefixes.extend(block.except.iter().copied());
                by_cidr.entry(block.cidr).or_default().push(id);
                cidr_lens.insert(block.cidr.prefix_len());
            }
        }
        let mut list = Vec::with_capacity(prefixes.len());
        let mut by_net = HashMap::with_capacity_and_hasher(prefixes.len(), Default::default());
        let (mut v4_lens, mut v6_lens) = (BTreeSet::new(), BTreeSet::new());
        for net in prefixes {
            match net {
                IpNet::V4(_) => v4_lens.insert(net.prefix_len()),
                IpNet::V6(_) => v6_lens.insert(net.prefix_len()),
            };
            let mut atoms: Vec<u32> = Vec::new();
            for &len in cidr_lens.iter().filter(|l| **l <= net.prefix_len()) {
                let Some(ancestor) = prefix_of(net.addr(), len) else {
                    continue;
                };
                for &id in by_cidr.get(&ancestor).into_iter().flatten() {
                    let Some(AtomKey::Block(block)) = members.key(id) else {
                        continue;
                    };
                    if !block.except.iter().any(|e| e.contains(&net)) {
                        atoms.push(id);
                    }
                }
            }
            atoms.sort_unstable();
            let sig = interner.intern(&atoms);
            list.push((net, sig));
            by_net.insert(net, sig);
        }
        Self {
            by_net,
            list,
            v4_lens: v4_lens.into_iter().rev().collect(),
            v6_lens: v6_lens.into_iter().rev().collect(),
        }
    }

    fn lens(&self, ip: IpAddr) -> &[u8] {
        match ip {
            IpAddr::V4(_) => &self.v4_lens,
            IpAddr::V6(_) => &self.v6_lens,
        }
    }

    /// The region of `ip` and its signature (the roots are regions, so there always is one).
    fn lookup(&self, ip: IpAddr) -> (IpNet, usize) {
        for &len in self.lens(ip) {
            if let Some(net) = prefix_of(ip, len)
                && let Some(&sig) = self.by_net.get(&net)
            {
                return (net, sig);
            }
        }
        (IpNet::from(ip), 0)
    }

    /// Signature of the nearest region strictly enclosing `net`.
    fn enclosing(&self, net: IpNet) -> Option<usize> {
        self.lens(net.addr())
            .iter()
            .filter(|l| **l < net.prefix_len())
            .find_map(|&len| self.by_net.get(&prefix_of(net.addr(), len)?).copied())
    }
}
