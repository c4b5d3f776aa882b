//! Pod CIDRs for nodes: carved out of the cluster CIDRs when the cluster does not assign them
//! itself. A CIDR the cluster set (`Node.spec.podCIDRs`) is respected as is.
//!
//! Every address family is handled on its own: the cluster has at most one pod CIDR per
//! family (IPv4, IPv6, or both for dual stack), and each node gets one range per configured
//! family. A family the cluster set on the Node (`spec.podCIDRs`) is taken from there; a
//! family it did not set is allocated here (a cluster that assigns only IPv4 ranges still
//! gets IPv6 ones from weir when weir has an IPv6 cluster CIDR).
//!
//! Allocation is pure (no I/O); persistence goes through [`CidrStore`], so that a restarted
//! controller hands every node the ranges it had, never gives one range to two nodes, and
//! releases a range only when its node is deleted.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    net::IpAddr,
    path::PathBuf,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Ranges per node, at most one per address family, IPv4 first.
pub type Assignments = BTreeMap<String, Vec<IpNet>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error(
        "cluster CIDR {cluster} has no free /{mask} for node {node}: {used} node ranges in use"
    )]
    Exhausted {
        cluster: IpNet,
        mask: u8,
        node: String,
        used: usize,
    },
    #[error("node mask /{mask} does not fit the cluster CIDR {cluster} (it must be longer than /{} and at most /{})", .cluster.prefix_len(), max_mask(.cluster))]
    BadMask { cluster: IpNet, mask: u8 },
    #[error("no cluster CIDR given")]
    NoClusterCidr,
    #[error("cluster CIDRs {0} and {1} are of one address family: give at most one per family")]
    SameFamily(IpNet, IpNet),
    #[error("node {node}'s podCIDR {cidr} overlaps {other_cidr} of node {other}")]
    Overlap {
        node: String,
        cidr: IpNet,
        other: String,
        other_cidr: IpNet,
    },
    #[error("pod CIDR state {path}: {message}")]
    Store { path: PathBuf, message: String },
}

/// The longest node mask of a family: a node range keeps at least four addresses.
fn max_mask(cluster: &IpNet) -> u8 {
    match cluster {
        IpNet::V4(_) => 30,
        IpNet::V6(_) => 126,
    }
}

/// Where assignments are kept between controller runs.
pub trait CidrStore {
    fn load(&self) -> Result<Assignments, CidrError>;
    fn save(&self, assignments: &Assignments) -> Result<(), CidrError>;

    /// Assignments another writer of a shared store made since the last call, for the
    /// allocator to adopt before it assigns (a controller replica that does not lead follows
    /// the leader's choices this way); `None` when there is nothing new. A store with a
    /// single writer has nothing to offer.
    fn refresh(&self) -> Option<Assignments> {
        None
    }

    /// Whether [`Self::refresh`] has something to offer: the controller then compiles even
    /// though no object changed, so a replica that takes over serves the leader's ranges.
    fn has_fresh(&self) -> bool {
        false
    }
}

/// Assignments in a JSON file, replaced atomically: `{"<node>": ["<cidr>", …]}`. A file
/// written before dual stack (`{"<node>": "<cidr>"}`) loads as one range per node.
pub struct FileCidrStore {
    path: PathBuf,
}

impl FileCidrStore {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }
}

/// One node's entry in the file: a list, or the single range of older files.
#[derive(Deserialize, Serialize)]
#[serde(untagged)]
enum FileEntry {
    One(IpNet),
    Many(Vec<IpNet>),
}

impl CidrStore for FileCidrStore {
    fn load(&self) -> Result<Assignments, CidrError> {
        match fs::read(&self.path) {
            Ok(b) => serde_json::from_slice::<BTreeMap<String, FileEntry>>(&b)
                .map(|m| {
                    m.into_iter()
                        .map(|(node, e)| match e {
                            FileEntry::One(c) => (node, vec![c]),
                            FileEntry::Many(cs) => (node, cs),
                        })
                        .collect()
                })
                .map_err(|e| CidrError::Store {
                    path: self.path.clone(),
                    message: format!("corrupt: {e}"),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(CidrError::Store {
                path: self.path.clone(),
                message: e.to_string(),
            }),
        }
    }

    fn save(&self, assignments: &Assignments) -> Result<(), CidrError> {
        let err = |e: std::io::Error| CidrError::Store {
            path: self.path.clone(),
            message: e.to_string(),
        };
        let bytes = serde_json::to_vec_pretty(assignments).expect("serialisable");
        weir_persist::replace(&self.path, &bytes, 0o644).map_err(err)?;
        Ok(())
    }
}

/// One family's cluster CIDR and the prefix length of each node's range of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FamilyCidr {
    pub cluster: IpNet,
    pub mask: u8,
}

/// Carves `/mask` ranges for nodes out of the cluster CIDRs, one per family.
#[derive(Clone, Debug)]
pub struct NodeCidrAllocator {
    /// At most one per family, in the order given (the first is the primary family).
    families: Vec<FamilyCidr>,
    /// Ranges this allocator handed out, at most one per family and node.
    allocated: Assignments,
    /// Ranges the cluster set on Node objects.
    preset: BTreeMap<String, Vec<IpNet>>,
}

impl NodeCidrAllocator {
    /// One family: `cluster` split into `/mask` ranges.
    pub fn new(cluster: IpNet, mask: u8) -> Result<Self, CidrError> {
        Self::per_family(&[FamilyCidr { cluster, mask }])
    }

    /// Every family the cluster's pods have addresses of (one or two, at most one each).
    pub fn per_family(families: &[FamilyCidr]) -> Result<Self, CidrError> {
        if families.is_empty() {
            return Err(CidrError::NoClusterCidr);
        }
        let mut checked: Vec<FamilyCidr> = Vec::new();
        for f in families {
            if let Some(other) = checked.iter().find(|o| same_family(&o.cluster, &f.cluster)) {
                return Err(CidrError::SameFamily(other.cluster, f.cluster));
            }
            if f.mask <= f.cluster.prefix_len() || f.mask > max_mask(&f.cluster) {
                return Err(CidrError::BadMask {
                    cluster: f.cluster,
                    mask: f.mask,
                });
            }
            checked.push(FamilyCidr {
                cluster: f.cluster.trunc(),
                mask: f.mask,
            });
        }
        Ok(Self {
            families: checked,
            allocated: BTreeMap::new(),
            preset: BTreeMap::new(),
        })
    }

    /// The cluster CIDRs, primary family first.
    pub fn families(&self) -> &[FamilyCidr] {
        &self.families
    }

    /// Takes over assignments made by an earlier run.
    pub fn restore(&mut self, saved: Assignments) {
        self.allocated = saved;
    }

    /// Ranges this allocator handed out (what to persist).
    pub fn allocated(&self) -> &Assignments {
        &self.allocated
    }

    /// The pod CIDRs of `node`, in the order of the configured families (then preset ranges
    /// of families not configured). `preset` is `Node.spec.podCIDRs`: a family it holds wins
    /// (and the range of that family this allocator gave the node earlier is released); a
    /// configured family it lacks is allocated.
    pub fn assign(&mut self, node: &str, preset: &[IpNet]) -> Result<Vec<IpNet>, CidrError> {
        if preset.is_empty() {
            self.preset.remove(node);
        } else {
            // The cluster's assignment is authoritative: a range this allocator gave another
            // node that overlaps it is withdrawn (that node gets a new one), and so is this
            // node's own range of a family the preset covers.
            for ranges in self.allocated.values_mut() {
                ranges.retain(|c| !preset.iter().any(|p| overlaps(p, c)));
            }
            if let Some(own) = self.allocated.get_mut(node) {
                own.retain(|c| !preset.iter().any(|p| same_family(p, c)));
            }
            self.allocated.retain(|_, ranges| !ranges.is_empty());
            for cidr in preset {
                if let Some((other, other_cidr)) = self.owner_overlapping(cidr, node) {
                    return Err(CidrError::Overlap {
                        node: node.into(),
                        cidr: *cidr,
                        other,
                        other_cidr,
                    });
                }
            }
            self.preset.insert(node.into(), preset.to_vec());
        }
        // A range of a family no longer configured is dropped.
        if let Some(own) = self.allocated.get_mut(node) {
            own.retain(|c| self.families.iter().any(|f| same_family(&f.cluster, c)));
            if own.is_empty() {
                self.allocated.remove(node);
            }
        }
        let mut out = Vec::new();
        for family in self.families.clone() {
            if preset.iter().any(|p| same_family(p, &family.cluster)) {
                out.extend(
                    preset
                        .iter()
                        .filter(|p| same_family(p, &family.cluster))
                        .copied(),
                );
                continue;
            }
            let kept = self
                .allocated
                .get(node)
                .and_then(|rs| rs.iter().find(|c| same_family(c, &family.cluster)).copied());
            let range = match kept {
                Some(c) => c,
                None => self.allocate(node, family)?,
            };
            out.push(range);
        }
        // Preset ranges of a family weir has no cluster CIDR of are the cluster's business.
        out.extend(
            preset
                .iter()
                .filter(|p| !self.families.iter().any(|f| same_family(&f.cluster, p)))
                .copied(),
        );
        Ok(out)
    }

    /// A free range of `family` for `node`, recorded.
    fn allocate(&mut self, node: &str, family: FamilyCidr) -> Result<IpNet, CidrError> {
        // Allocated ranges are aligned subnets of the cluster CIDR: a set lookup finds them.
        // Preset ranges can have any size, and are few: check them for overlap.
        let used: HashSet<IpNet> = self
            .allocated
            .values()
            .flatten()
            .filter(|c| same_family(c, &family.cluster))
            .copied()
            .collect();
        let presets: Vec<IpNet> = self
            .preset
            .values()
            .flatten()
            .filter(|c| same_family(c, &family.cluster))
            .copied()
            .collect();
        let free = family
            .cluster
            .subnets(family.mask)
            .expect("mask checked in per_family")
            .find(|candidate| {
                !used.contains(candidate) && !presets.iter().any(|p| overlaps(p, candidate))
            });
        match free {
            Some(c) => {
                let ranges = self.allocated.entry(node.into()).or_default();
                ranges.push(c);
                // IPv4 first, as `spec.podCIDRs` lists them in a dual-stack cluster by default.
                ranges.sort_by_key(|r| matches!(r, IpNet::V6(_)));
                Ok(c)
            }
            None => Err(CidrError::Exhausted {
                cluster: family.cluster,
                mask: family.mask,
                node: node.into(),
                used: used.len() + presets.len(),
            }),
        }
    }

    /// Forgets a deleted node; its ranges can go to a new node.
    pub fn release(&mut self, node: &str) {
        self.allocated.remove(node);
        self.preset.remove(node);
    }

    fn in_use(&self) -> impl Iterator<Item = (&str, IpNet)> {
        self.allocated
            .iter()
            .chain(self.preset.iter())
            .flat_map(|(n, cs)| cs.iter().map(move |c| (n.as_str(), *c)))
    }

    fn owner_overlapping(&self, cidr: &IpNet, except: &str) -> Option<(String, IpNet)> {
        self.in_use()
            .find(|(n, c)| *n != except && overlaps(c, cidr))
            .map(|(n, c)| (n.to_string(), c))
    }
}

fn same_family(a: &IpNet, b: &IpNet) -> bool {
    matches!(
        (a, b),
        (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
    )
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The first InternalIP of a Node (else its first address).
pub fn node_ip(node: &k8s_openapi::api::core::v1::Node) -> Option<IpAddr> {
    let addrs = node.status.as_ref()?.addresses.as_ref()?;
    addrs
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .or_else(|| addrs.first())
        .and_then(|a| a.address.parse().ok())
}

/// A Node's InternalIPs other than `node_ip` (the other family's, on a dual-stack node).
pub fn node_other_ips(node: &k8s_openapi::api::core::v1::Node, node_ip: IpAddr) -> Vec<IpAddr> {
    let Some(addrs) = node.status.as_ref().and_then(|s| s.addresses.as_ref()) else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = addrs
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .filter(|ip| *ip != node_ip)
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// `spec.podCIDRs` (or the older `spec.podCIDR`) of a Node; unparseable entries are skipped.
pub fn node_pod_cidrs(node: &k8s_openapi::api::core::v1::Node) -> Vec<IpNet> {
    let Some(spec) = &node.spec else {
        return Vec::new();
    };
    let list = spec
        .pod_cidrs
        .clone()
        .filter(|l| !l.is_empty())
        .or_else(|| spec.pod_cidr.clone().map(|c| vec![c]))
        .unwrap_or_default();
    list.iter().filter_map(|c| c.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc() -> NodeCidrAllocator {
        NodeCidrAllocator::new("10.244.0.0/16".parse().unwrap(), 24).unwrap()
    }

    #[test]
    fn nodes_get_distinct_ranges_and_keep_them() {
        let mut a = alloc();
        let n1 = a.assign("n1", &[]).unwrap();
        let n2 = a.assign("n2", &[]).unwrap();
        assert_ne!(n1, n2);
        assert_eq!(a.assign("n1", &[]).unwrap(), n1, "stable");
    }

    #[test]
    fn preset_pod_cidrs_are_respected_and_skipped_by_allocation() {
        let mut a = alloc();
        let preset: IpNet = "10.244.0.0/24".parse().unwrap();
        assert_eq!(a.assign("n1", &[preset]).unwrap(), vec![preset]);
        let n2 = a.assign("n2", &[]).unwrap();
        assert!(
            !overlaps(&n2[0], &preset),
            "{n2:?} overlaps the preset range"
        );
    }

    #[test]
    fn a_preset_that_overlaps_another_preset_is_refused() {
        let mut a = alloc();
        let r: IpNet = "10.244.7.0/24".parse().unwrap();
        a.assign("n1", &[r]).unwrap();
        let err = a.assign("n2", &[r]).unwrap_err();
        assert!(matches!(err, CidrError::Overlap { .. }), "{err}");
    }

    #[test]
    fn a_preset_takes_over_a_range_the_allocator_gave_away() {
        let mut a = alloc();
        let n1 = a.assign("n1", &[]).unwrap()[0];
        assert_eq!(a.assign("n2", &[n1]).unwrap(), vec![n1]);
        let moved = a.assign("n1", &[]).unwrap()[0];
        assert_ne!(moved, n1, "n1 got another range");
    }

    #[test]
    fn exhaustion_is_a_clear_error_and_release_frees_a_range() {
        assert!(
            NodeCidrAllocator::new("10.0.0.0/30".parse().unwrap(), 30).is_err(),
            "a /30 cannot be split into /30s"
        );
        let mut a = NodeCidrAllocator::new("10.0.0.0/28".parse().unwrap(), 30).unwrap();
        for i in 0..4 {
            a.assign(&format!("n{i}"), &[]).unwrap();
        }
        let err = a.assign("n4", &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cluster CIDR 10.0.0.0/28 has no free /30 for node n4: 4 node ranges in use"
        );
        a.release("n2");
        assert_eq!(
            a.assign("n4", &[]).unwrap(),
            vec!["10.0.0.8/30".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn assignments_survive_a_restart_through_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileCidrStore::new(dir.path().join("node-cidrs.json"));
        let mut a = alloc();
        let n1 = a.assign("n1", &[]).unwrap();
        a.assign("n2", &[]).unwrap();
        store.save(a.allocated()).unwrap();
        let mut b = alloc();
        b.restore(store.load().unwrap());
        // A new node first, then the old one: the old one still gets its range.
        let n3 = b.assign("n3", &[]).unwrap();
        assert_ne!(n3, n1);
        assert_eq!(b.assign("n1", &[]).unwrap(), n1);
    }

    #[test]
    fn many_nodes_never_share_a_range() {
        let mut a = alloc();
        let ranges: Vec<IpNet> = (0..256)
            .map(|i| a.assign(&format!("n{i}"), &[]).unwrap()[0])
            .collect();
        let unique: HashSet<_> = ranges.iter().collect();
        assert_eq!(unique.len(), 256);
        assert!(a.assign("one-too-many", &[]).is_err());
    }

    fn dual() -> NodeCidrAllocator {
        NodeCidrAllocator::per_family(&[
            FamilyCidr {
                cluster: "10.244.0.0/16".parse().unwrap(),
                mask: 24,
            },
            FamilyCidr {
                cluster: "fd00:10:244::/56".parse().unwrap(),
                mask: 64,
            },
        ])
        .unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn dual_stack_nodes_get_one_range_per_family_ipv4_first() {
        let mut a = dual();
        assert_eq!(
            a.assign("n1", &[]).unwrap(),
            nets(&["10.244.0.0/24", "fd00:10:244::/64"])
        );
        assert_eq!(
            a.assign("n2", &[]).unwrap(),
            nets(&["10.244.1.0/24", "fd00:10:244:1::/64"])
        );
        assert_eq!(
            a.assign("n1", &[]).unwrap(),
            nets(&["10.244.0.0/24", "fd00:10:244::/64"]),
            "stable"
        );
    }

    #[test]
    fn the_first_family_given_comes_first() {
        let mut a = NodeCidrAllocator::per_family(&[
            FamilyCidr {
                cluster: "fd00:10:244::/56".parse().unwrap(),
                mask: 80,
            },
            FamilyCidr {
                cluster: "10.244.0.0/16".parse().unwrap(),
                mask: 24,
            },
        ])
        .unwrap();
        a.assign("n0", &[]).unwrap();
        assert_eq!(
            a.assign("n1", &[]).unwrap(),
            nets(&["fd00:10:244:0:1::/80", "10.244.1.0/24"])
        );
    }

    #[test]
    fn ipv6_only_allocates_ipv6_ranges() {
        let mut a = NodeCidrAllocator::new("fd00:10:244::/56".parse().unwrap(), 64).unwrap();
        let ranges: Vec<IpNet> = (0..256)
            .map(|i| a.assign(&format!("n{i}"), &[]).unwrap()[0])
            .collect();
        assert!(
            ranges
                .iter()
                .all(|r| matches!(r, IpNet::V6(_)) && r.prefix_len() == 64)
        );
        assert_eq!(ranges.iter().collect::<HashSet<_>>().len(), 256);
        let err = a.assign("one-too-many", &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cluster CIDR fd00:10:244::/56 has no free /64 for node one-too-many: 256 node ranges in use"
        );
    }

    #[test]
    fn bad_family_configurations_are_refused() {
        let two_v4 = NodeCidrAllocator::per_family(&[
            FamilyCidr {
                cluster: "10.244.0.0/16".parse().unwrap(),
                mask: 24,
            },
            FamilyCidr {
                cluster: "10.245.0.0/16".parse().unwrap(),
                mask: 24,
            },
        ]);
        assert!(
            matches!(two_v4, Err(CidrError::SameFamily(..))),
            "{two_v4:?}"
        );
        assert_eq!(
            NodeCidrAllocator::per_family(&[]).unwrap_err(),
            CidrError::NoClusterCidr
        );
        let err = NodeCidrAllocator::new("fd00::/56".parse().unwrap(), 127).unwrap_err();
        assert_eq!(
            err.to_string(),
            "node mask /127 does not fit the cluster CIDR fd00::/56 (it must be longer than /56 and at most /126)"
        );
        assert!(NodeCidrAllocator::new("fd00::/64".parse().unwrap(), 64).is_err());
        assert!(NodeCidrAllocator::new("fd00::/64".parse().unwrap(), 120).is_ok());
    }

    #[test]
    fn a_preset_of_one_family_leaves_the_other_to_the_allocator() {
        let mut a = dual();
        let v4 = a.assign("n1", &[]).unwrap();
        // The cluster assigns IPv4 only (kube-controller-manager with one cluster CIDR): the
        // node keeps its IPv6 range from weir, and takes the cluster's IPv4 one.
        let preset = nets(&["10.244.9.0/24"]);
        assert_eq!(
            a.assign("n1", &preset).unwrap(),
            nets(&["10.244.9.0/24", "fd00:10:244::/64"])
        );
        assert_eq!(
            a.allocated()["n1"],
            nets(&["fd00:10:244::/64"]),
            "the IPv4 range weir gave is released"
        );
        // Released: the next node gets it.
        assert_eq!(a.assign("n2", &[]).unwrap()[0], v4[0]);
        // A dual-stack preset wins in both families (listed in the configured order).
        let both = nets(&["fd00:10:244:77::/64", "10.244.77.0/24"]);
        assert_eq!(
            a.assign("n3", &both).unwrap(),
            nets(&["10.244.77.0/24", "fd00:10:244:77::/64"])
        );
        assert!(!a.allocated().contains_key("n3"));
        // A preset IPv6 range overlapping another node's allocated one takes it over.
        let n2_v6 = a.assign("n2", &[]).unwrap()[1];
        a.assign("n4", &[n2_v6]).unwrap();
        let moved = a.assign("n2", &[]).unwrap();
        assert_ne!(moved[1], n2_v6);
        assert_eq!(moved[0], v4[0], "n2's IPv4 range stays");
        // And one overlapping another node's preset is refused.
        let err = a.assign("n5", &[n2_v6]).unwrap_err();
        assert!(matches!(err, CidrError::Overlap { .. }), "{err}");
    }

    #[test]
    fn a_preset_of_a_family_weir_has_no_cidr_of_is_passed_on() {
        let mut a = alloc();
        assert_eq!(
            a.assign("n1", &nets(&["fd00:1::/64"])).unwrap(),
            nets(&["10.244.0.0/24", "fd00:1::/64"])
        );
    }

    #[test]
    fn a_state_file_from_before_dual_stack_loads_and_gains_ipv6_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node-cidrs.json");
        std::fs::write(&path, r#"{"n1": "10.244.5.0/24", "n2": "10.244.0.0/24"}"#).unwrap();
        let store = FileCidrStore::new(&path);
        let mut a = dual();
        a.restore(store.load().unwrap());
        assert_eq!(
            a.assign("n3", &[]).unwrap(),
            nets(&["10.244.1.0/24", "fd00:10:244::/64"])
        );
        assert_eq!(
            a.assign("n1", &[]).unwrap(),
            nets(&["10.244.5.0/24", "fd00:10:244:1::/64"]),
            "n1 keeps its IPv4 range and gets an IPv6 one"
        );
        store.save(a.allocated()).unwrap();
        let mut b = dual();
        b.restore(store.load().unwrap());
        assert_eq!(b.allocated(), a.allocated());
        assert_eq!(
            b.assign("n1", &[]).unwrap(),
            nets(&["10.244.5.0/24", "fd00:10:244:1::/64"])
        );
        // Back to IPv4 only: the IPv6 ranges go.
        let mut c = alloc();
        c.restore(store.load().unwrap());
        assert_eq!(c.assign("n1", &[]).unwrap(), nets(&["10.244.5.0/24"]));
        assert_eq!(c.allocated()["n1"], nets(&["10.244.5.0/24"]));
    }
}
