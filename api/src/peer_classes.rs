//! A node's peer class table, stored compactly.
//!
//! Most entries of a node's table are single IPv4 pod addresses. Kept in a `BTreeMap<IpNet,
//! u32>` each costs about 23 bytes, and a controller of 5,000 nodes holds millions of them
//! (shape A of the compile benchmark: 11.5M entries, 300 MB). Here an IPv4 /32 costs 8 bytes
//! in a sorted vector; every other prefix stays in a map. The table behaves like the map it
//! replaces: entries iterate in `IpNet` order and serialise as the same `[key, value]` pairs.

use std::{cmp::Ordering, collections::BTreeMap, fmt, iter::Peekable, net::Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::TableDiff;

/// Address prefix → peer class.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PeerClasses {
    /// IPv4 /32 entries: the address as an integer and its class, sorted by address.
    v4_hosts: Vec<(u32, u32)>,
    /// Every other entry (shorter IPv4 prefixes, IPv6).
    others: BTreeMap<IpNet, u32>,
}

/// The address of an IPv4 /32 entry, as the integer `v4_hosts` is keyed by.
fn v4_host(net: &IpNet) -> Option<u32> {
    match net {
        IpNet::V4(n) if n.prefix_len() == 32 => Some(u32::from(n.addr())),
        _ => None,
    }
}

fn host_net(addr: u32) -> IpNet {
    IpNet::V4(Ipv4Net::from(Ipv4Addr::from(addr)))
}

impl PeerClasses {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.v4_hosts.len() + self.others.len()
    }

    pub fn is_empty(&self) -> bool {
        self.v4_hosts.is_empty() && self.others.is_empty()
    }

    pub fn get(&self, net: &IpNet) -> Option<u32> {
        match v4_host(net) {
            Some(a) => self
                .v4_hosts
                .binary_search_by_key(&a, |&(k, _)| k)
                .ok()
                .map(|i| self.v4_hosts[i].1),
            None => self.others.get(net).copied(),
        }
    }

    pub fn contains_key(&self, net: &IpNet) -> bool {
        self.get(net).is_some()
    }

    /// Inserts or replaces an entry; returns the class it had.
    pub fn insert(&mut self, net: IpNet, class: u32) -> Option<u32> {
        match v4_host(&net) {
            Some(a) => match self.v4_hosts.binary_search_by_key(&a, |&(k, _)| k) {
                Ok(i) => Some(std::mem::replace(&mut self.v4_hosts[i].1, class)),
                Err(i) => {
                    self.v4_hosts.insert(i, (a, class));
                    None
                }
            },
            None => self.others.insert(net, class),
        }
    }

    pub fn remove(&mut self, net: &IpNet) -> Option<u32> {
        match v4_host(net) {
            Some(a) => self
                .v4_hosts
                .binary_search_by_key(&a, |&(k, _)| k)
                .ok()
                .map(|i| self.v4_hosts.remove(i).1),
            None => self.others.remove(net),
        }
    }

    /// Keeps the entries for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&IpNet, u32) -> bool) {
        self.v4_hosts.retain(|&(a, c)| keep(&host_net(a), c));
        self.others.retain(|n, c| keep(n, *c));
    }

    /// Entries in `IpNet` order (that of the map this table replaces).
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            hosts: self.v4_hosts.iter().peekable(),
            others: self.others.iter().peekable(),
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.iter().map(|(n, _)| n)
    }

    /// Applies a diff's removals and upserts. Large diffs rebuild the table in one pass
    /// rather than shifting the vector per entry.
    pub fn apply(&mut self, diff: &TableDiff<IpNet, u32>) {
        let host_changes = diff
            .upsert
            .iter()
            .map(|(n, _)| n)
            .chain(&diff.remove)
            .filter(|n| v4_host(n).is_some())
            .count();
        if host_changes <= 64 {
            for n in &diff.remove {
                self.remove(n);
            }
            for (n, c) in &diff.upsert {
                self.insert(*n, *c);
            }
            return;
        }
        let mut map: BTreeMap<IpNet, u32> = std::mem::take(self).iter().collect();
        diff.apply_to(&mut map);
        *self = map.into_iter().collect();
    }

    /// The diff that turns `self` into `new`, in one merge of the two sorted tables.
    pub fn diff(&self, new: &PeerClasses) -> TableDiff<IpNet, u32> {
        let mut d = TableDiff::default();
        let (mut old, mut new) = (self.iter().peekable(), new.iter().peekable());
        loop {
            match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(_), None) => d.remove.extend(old.by_ref().map(|(n, _)| n)),
                (None, Some(_)) => d.upsert.extend(new.by_ref()),
                (Some(&(o, oc)), Some(&(n, nc))) => match o.cmp(&n) {
                    Ordering::Less => {
                        d.remove.push(o);
                        old.next();
                    }
                    Ordering::Greater => {
                        d.upsert.push((n, nc));
                        new.next();
                    }
                    Ordering::Equal => {
                        if oc != nc {
                            d.upsert.push((n, nc));
                        }
                        old.next();
                        new.next();
                    }
                },
            }
        }
        d
    }
}

/// Entries of a [`PeerClasses`] in `IpNet` order: the /32s merged into the other prefixes.
pub struct Iter<'a> {
    hosts: Peekable<std::slice::Iter<'a, (u32, u32)>>,
    others: Peekable<std::collections::btree_map::Iter<'a, IpNet, u32>>,
}

impl Iterator for Iter<'_> {
    type Item = (IpNet, u32);

    fn next(&mut self) -> Option<(IpNet, u32)> {
        let host_first = match (self.hosts.peek(), self.others.peek()) {
            (None, None) => return None,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(&&(a, _)), Some(&(n, _))) => host_net(a) < *n,
        };
        if host_first {
            self.hosts.next().map(|&(a, c)| (host_net(a), c))
        } else {
            self.others.next().map(|(n, c)| (*n, *c))
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.hosts.len() + self.others.len();
        (n, Some(n))
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl<'a> IntoIterator for &'a PeerClasses {
    type Item = (IpNet, u32);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl FromIterator<(IpNet, u32)> for PeerClasses {
    fn from_iter<I: IntoIterator<Item = (IpNet, u32)>>(iter: I) -> Self {
        let mut t = PeerClasses::default();
        t.extend(iter);
        t
    }
}

impl Extend<(IpNet, u32)> for PeerClasses {
    /// Later entries replace earlier ones for the same prefix, as in a map.
    fn extend<I: IntoIterator<Item = (IpNet, u32)>>(&mut self, iter: I) {
        let before = self.v4_hosts.len();
        let mut sorted = true;
        for (net, class) in iter {
            match v4_host(&net) {
                Some(a) => {
                    sorted &= self.v4_hosts.last().is_none_or(|&(last, _)| last < a);
                    self.v4_hosts.push((a, class));
                }
                None => {
                    self.others.insert(net, class);
                }
            }
        }
        if !sorted {
            // Stable, so that of equal addresses the last pushed is kept.
            self.v4_hosts.sort_by_key(|&(a, _)| a);
            let mut deduped: Vec<(u32, u32)> = Vec::with_capacity(self.v4_hosts.len());
            for e in self.v4_hosts.drain(..) {
                match deduped.last_mut() {
                    Some(last) if last.0 == e.0 => *last = e,
                    _ => deduped.push(e),
                }
            }
            self.v4_hosts = deduped;
        }
        if self.v4_hosts.len() != before {
            self.v4_hosts.shrink_to_fit();
        }
    }
}

impl<const N: usize> From<[(IpNet, u32); N]> for PeerClasses {
    fn from(entries: [(IpNet, u32); N]) -> Self {
        entries.into_iter().collect()
    }
}

impl From<BTreeMap<IpNet, u32>> for PeerClasses {
    fn from(map: BTreeMap<IpNet, u32>) -> Self {
        map.into_iter().collect()
    }
}

impl fmt::Debug for PeerClasses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// The same `[key, value]` pairs a `BTreeMap<IpNet, u32>` serialises to in a [`NodeState`].
///
/// [`NodeState`]: crate::NodeState
impl Serialize for PeerClasses {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for PeerClasses {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Vec::<(IpNet, u32)>::deserialize(d)?.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Prefixes of a small space, so that /32s, shorter IPv4 prefixes over the same
    /// addresses and IPv6 prefixes interleave and collide.
    fn net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (0u32..16, prop_oneof![Just(32u8), 24u8..=31, 0u8..24]).prop_map(|(a, len)| {
                IpNet::V4(
                    Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 | a), len)
                        .unwrap()
                        .trunc(),
                )
            }),
            (0u32..16, prop_oneof![Just(128u8), 96u8..=127]).prop_map(|(a, len)| {
                let addr = std::net::Ipv6Addr::from(0xfd00_u128 << 112 | u128::from(a));
                IpNet::V6(ipnet::Ipv6Net::new(addr, len).unwrap().trunc())
            }),
        ]
    }

    fn entries() -> impl Strategy<Value = Vec<(IpNet, u32)>> {
        proptest::collection::vec((net(), 0u32..4), 0..40)
    }

    proptest! {
        /// The table is the map it replaces: same entries, same order, same answers, same
        /// diffs, after building, inserting, removing, retaining and applying diffs.
        #[test]
        fn behaves_like_a_map(a in entries(), b in entries(), probes in proptest::collection::vec(net(), 0..20)) {
            let map_a: BTreeMap<IpNet, u32> = a.iter().copied().collect();
            let map_b: BTreeMap<IpNet, u32> = b.iter().copied().collect();
            let mut t: PeerClasses = a.iter().copied().collect();
            let tb: PeerClasses = b.iter().copied().collect();
            prop_assert_eq!(t.iter().collect::<Vec<_>>(), map_a.iter().map(|(n, c)| (*n, *c)).collect::<Vec<_>>());
            prop_assert_eq!(t.len(), map_a.len());
            for p in &probes {
                prop_assert_eq!(t.get(p), map_a.get(p).copied());
            }
            let d = t.diff(&tb);
            prop_assert_eq!(&d, &TableDiff::between(&map_a, &map_b));
            let mut one_by_one = t.clone();
            t.apply(&d);
            prop_assert_eq!(&t, &tb);
            for n in &d.remove {
                one_by_one.remove(n);
            }
            for (n, c) in &d.upsert {
                one_by_one.insert(*n, *c);
            }
            prop_assert_eq!(&one_by_one, &tb);
            let mut kept = tb.clone();
            kept.retain(|_, c| c % 2 == 0);
            let map_kept: BTreeMap<IpNet, u32> = map_b.into_iter().filter(|(_, c)| c % 2 == 0).collect();
            prop_assert_eq!(kept, PeerClasses::from(map_kept));
            let json = serde_json::to_string(&tb).unwrap();
            prop_assert_eq!(serde_json::from_str::<PeerClasses>(&json).unwrap(), tb);
        }
    }

    #[test]
    fn a_large_diff_rebuilds_the_table() {
        let net = |i: u32| host_net(0x0a00_0000 + i);
        let old: PeerClasses = (0..1_000).map(|i| (net(i), 1)).collect();
        let new: PeerClasses = (500..1_500).map(|i| (net(i), i % 3)).collect();
        let mut t = old.clone();
        t.apply(&old.diff(&new));
        assert_eq!(t, new);
    }
}
