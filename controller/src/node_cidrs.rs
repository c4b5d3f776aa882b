//! Pod CIDRs for nodes: carved out of the cluster CIDR when the cluster does not assign them
//! itself. A CIDR the cluster set (`Node.spec.podCIDRs`) is respected as is.
//!
//! Allocation is pure (no I/O); persistence goes through [`CidrStore`], so that a restarted
//! controller hands every node the range it had, never gives one range to two nodes, and
//! releases a range only when its node is deleted.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    net::IpAddr,
    path::PathBuf,
};

use ipnet::{IpNet, Ipv4Net};

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
    #[error("node mask /{mask} does not fit the cluster CIDR {cluster} (it must be longer than /{} and at most /30)", .cluster.prefix_len())]
    BadMask { cluster: IpNet, mask: u8 },
    #[error("only IPv4 cluster CIDRs are supported so far, not {0}")]
    NotIpv4(IpNet),
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

/// Where assignments are kept between controller runs.
pub trait CidrStore {
    fn load(&self) -> Result<BTreeMap<String, IpNet>, CidrError>;
    fn save(&self, assignments: &BTreeMap<String, IpNet>) -> Result<(), CidrError>;

    /// Assignments another writer of a shared store made since the last call, for the
    /// allocator to adopt before it assigns (a controller replica that does not lead follows
    /// the leader's choices this way); `None` when there is nothing new. A store with a
    /// single writer has nothing to offer.
    fn refresh(&self) -> Option<BTreeMap<String, IpNet>> {
        None
    }

    /// Whether [`Self::refresh`] has something to offer: the controller then compiles even
    /// though no object changed, so a replica that takes over serves the leader's ranges.
    fn has_fresh(&self) -> bool {
        false
    }
}

/// Assignments in a JSON file, replaced atomically.
pub struct FileCidrStore {
    path: PathBuf,
}

impl FileCidrStore {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }
}

impl CidrStore for FileCidrStore {
    fn load(&self) -> Result<BTreeMap<String, IpNet>, CidrError> {
        match fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| CidrError::Store {
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

    fn save(&self, assignments: &BTreeMap<String, IpNet>) -> Result<(), CidrError> {
        let err = |e: std::io::Error| CidrError::Store {
            path: self.path.clone(),
            message: e.to_string(),
        };
        let bytes = serde_json::to_vec_pretty(assignments).expect("serialisable");
        weir_persist::replace(&self.path, &bytes, 0o644).map_err(err)?;
        Ok(())
    }
}

/// Carves `/mask` ranges for nodes out of the cluster CIDR.
#[derive(Clone, Debug)]
pub struct NodeCidrAllocator {
    cluster: Ipv4Net,
    mask: u8,
    /// Ranges this allocator handed out.
    allocated: BTreeMap<String, IpNet>,
    /// Ranges the cluster set on Node objects.
    preset: BTreeMap<String, Vec<IpNet>>,
}

impl NodeCidrAllocator {
    pub fn new(cluster: IpNet, mask: u8) -> Result<Self, CidrError> {
        let IpNet::V4(v4) = cluster else {
            return Err(CidrError::NotIpv4(cluster));
        };
        if mask <= v4.prefix_len() || mask > 30 {
            return Err(CidrError::BadMask { cluster, mask });
        }
        Ok(Self {
            cluster: v4.trunc(),
            mask,
            allocated: BTreeMap::new(),
            preset: BTreeMap::new(),
        })
    }

    /// Takes over assignments made by an earlier run.
    pub fn restore(&mut self, saved: BTreeMap<String, IpNet>) {
        self.allocated = saved;
    }

    /// Ranges this allocator handed out (what to persist).
    pub fn allocated(&self) -> &BTreeMap<String, IpNet> {
        &self.allocated
    }

    /// The pod CIDRs of `node`. `preset` is `Node.spec.podCIDRs`: when set it wins (and any
    /// range this allocator gave the node earlier is released).
    pub fn assign(&mut self, node: &str, preset: &[IpNet]) -> Result<Vec<IpNet>, CidrError> {
        if !preset.is_empty() {
            self.allocated.remove(node);
            // The cluster's assignment is authoritative: a range this allocator gave another
            // node that overlaps it is withdrawn (that node gets a new one).
            self.allocated
                .retain(|other, c| other == node || !preset.iter().any(|p| overlaps(p, c)));
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
            return Ok(preset.to_vec());
        }
        self.preset.remove(node);
        if let Some(c) = self.allocated.get(node) {
            return Ok(vec![*c]);
        }
        // Allocated ranges are aligned subnets of the cluster CIDR: a set lookup finds them.
        // Preset ranges can have any size, and are few: check them for overlap.
        let used: HashSet<IpNet> = self.allocated.values().copied().collect();
        let presets: Vec<IpNet> = self.preset.values().flatten().copied().collect();
        let free = self
            .cluster
            .subnets(self.mask)
            .expect("mask checked in new")
            .map(IpNet::V4)
            .find(|candidate| {
                !used.contains(candidate) && !presets.iter().any(|p| overlaps(p, candidate))
            });
        match free {
            Some(c) => {
                self.allocated.insert(node.into(), c);
                Ok(vec![c])
            }
            None => Err(CidrError::Exhausted {
                cluster: IpNet::V4(self.cluster),
                mask: self.mask,
                node: node.into(),
                used: used.len() + presets.len(),
            }),
        }
    }

    /// Forgets a deleted node; its range can go to a new node.
    pub fn release(&mut self, node: &str) {
        self.allocated.remove(node);
        self.preset.remove(node);
    }

    fn in_use(&self) -> impl Iterator<Item = (&str, IpNet)> {
        self.allocated.iter().map(|(n, c)| (n.as_str(), *c)).chain(
            self.preset
                .iter()
                .flat_map(|(n, cs)| cs.iter().map(move |c| (n.as_str(), *c))),
        )
    }

    fn owner_overlapping(&self, cidr: &IpNet, except: &str) -> Option<(String, IpNet)> {
        self.in_use()
            .find(|(n, c)| *n != except && overlaps(c, cidr))
            .map(|(n, c)| (n.to_string(), c))
    }
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
}
