//! Property test: random sequences of allocate / release / gc / reopen against a simple
//! model of the allocator (a map of attachments plus a round-robin cursor per pool).
//! Addresses must never be duplicated, must match the model exactly (so round robin and
//! cursor persistence are checked too) and must survive every reopen.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use proptest::prelude::*;
use weir_ipam::{Allocation, Ipam, IpamError, Owner};

/// 14 usable IPv4 addresses (.1 to .14) and 15 usable IPv6 ones (::1 to ::f): the IPv4
/// pool runs out first once more than 14 attachments exist.
const V4_POOL: &str = "10.20.30.0/28";
const V6_POOL: &str = "fd00:20::/124";
/// More attachment identities than the IPv4 pool has addresses.
const KEYS: u8 = 18;

#[derive(Debug, Clone)]
enum Op {
    Allocate(u8),
    Release(u8),
    Gc(Vec<u8>),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..KEYS).prop_map(Op::Allocate),
        3 => (0..KEYS).prop_map(Op::Release),
        1 => proptest::collection::vec(0..KEYS, 0..8).prop_map(Op::Gc),
        1 => Just(Op::Reopen),
    ]
}

fn key(k: u8) -> (String, String) {
    // Two interfaces per container for some keys, so ifname is part of the identity.
    (
        format!("c{}", k / 2),
        if k.is_multiple_of(2) { "eth0" } else { "net1" }.to_owned(),
    )
}

/// The allocator as a specification.
struct Model {
    pools: Vec<(IpNet, u128, u128)>, // (pool, first usable, last usable) as integers
    cursors: Vec<Option<u128>>,
    allocations: BTreeMap<(String, String), Vec<IpNet>>,
}

fn to_int(address: IpAddr) -> u128 {
    match address {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_int(pool: IpNet, value: u128) -> IpNet {
    let address = match pool {
        IpNet::V4(_) => IpAddr::V4(u32::try_from(value).unwrap().into()),
        IpNet::V6(_) => IpAddr::V6(value.into()),
    };
    IpNet::new(address, pool.prefix_len()).unwrap()
}

impl Model {
    fn new(pools: &[IpNet]) -> Self {
        let pools = pools
            .iter()
            .map(|p| {
                let first = to_int(p.network()) + 1;
                let last = match p {
                    IpNet::V4(_) => to_int(p.broadcast()) - 1,
                    IpNet::V6(_) => to_int(p.broadcast()),
                };
                (*p, first, last)
            })
            .collect::<Vec<_>>();
        Model {
            cursors: vec![None; pools.len()],
            pools,
            allocations: BTreeMap::new(),
        }
    }

    fn taken(&self) -> BTreeSet<u128> {
        self.allocations
            .values()
            .flatten()
            .map(|a| to_int(a.addr()))
            .collect()
    }

    /// `Ok(addresses)` or `Err(exhausted pool)`.
    fn allocate(&mut self, key: &(String, String)) -> Result<Vec<IpNet>, IpNet> {
        if let Some(existing) = self.allocations.get(key) {
            return Ok(existing.clone());
        }
        let taken = self.taken();
        let mut chosen = Vec::new();
        let mut cursors = self.cursors.clone();
        for (i, (pool, first, last)) in self.pools.iter().enumerate() {
            let start = match cursors[i] {
                Some(c) if c >= *last => *first,
                Some(c) => c + 1,
                None => *first,
            };
            let size = last - first + 1;
            let found = (0..size)
                .map(|step| first + (start - first + step) % size)
                .find(|candidate| !taken.contains(candidate))
                .ok_or(*pool)?;
            cursors[i] = Some(found);
            chosen.push(from_int(*pool, found));
        }
        self.cursors = cursors;
        self.allocations.insert(key.clone(), chosen.clone());
        Ok(chosen)
    }

    fn release(&mut self, key: &(String, String)) -> Option<Vec<IpNet>> {
        self.allocations.remove(key)
    }

    fn gc(&mut self, valid: &BTreeSet<(String, String)>) -> BTreeSet<(String, String)> {
        let stale: BTreeSet<_> = self
            .allocations
            .keys()
            .filter(|k| !valid.contains(*k))
            .cloned()
            .collect();
        for key in &stale {
            self.allocations.remove(key);
        }
        stale
    }

    fn as_allocations(&self) -> BTreeMap<(String, String), Vec<IpNet>> {
        self.allocations.clone()
    }
}

fn snapshot(ipam: &Ipam) -> BTreeMap<(String, String), Vec<IpNet>> {
    ipam.allocations()
        .into_iter()
        .map(|a: Allocation| ((a.container_id, a.ifname), a.addresses))
        .collect()
}

fn check_invariants(ipam: &Ipam, model: &Model) -> Result<(), TestCaseError> {
    let actual = snapshot(ipam);
    prop_assert_eq!(&actual, &model.as_allocations());
    let addresses: Vec<IpAddr> = actual.values().flatten().map(IpNet::addr).collect();
    let distinct: BTreeSet<IpAddr> = addresses.iter().copied().collect();
    prop_assert_eq!(
        addresses.len(),
        distinct.len(),
        "duplicate address in {:?}",
        actual
    );
    for address in &addresses {
        let pool = if address.is_ipv4() { V4_POOL } else { V6_POOL };
        let pool: IpNet = pool.parse().unwrap();
        prop_assert!(pool.contains(address));
        prop_assert_ne!(*address, pool.network());
        if address.is_ipv4() {
            prop_assert_ne!(*address, pool.broadcast());
        }
    }
    Ok(())
}

fn open(dir: &Path, pools: &[IpNet]) -> Ipam {
    Ipam::open(dir, pools).expect("opening the state directory")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn allocator_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let pools: Vec<IpNet> = vec![V4_POOL.parse().unwrap(), V6_POOL.parse().unwrap()];
        let mut ipam = open(dir.path(), &pools);
        let mut model = Model::new(&pools);

        for op in ops {
            match op {
                Op::Allocate(k) => {
                    let (container_id, ifname) = key(k);
                    let owner = Owner { container_id, ifname, pod: None };
                    let expected = model.allocate(&key(k));
                    match (ipam.allocate(&owner), expected) {
                        (Ok(actual), Ok(expected)) => prop_assert_eq!(actual.addresses, expected),
                        (Err(IpamError::Exhausted { pool }), Err(expected)) => {
                            prop_assert_eq!(pool, expected);
                        }
                        (actual, expected) => {
                            prop_assert!(false, "allocate {:?}: got {:?}, model {:?}", key(k), actual, expected);
                        }
                    }
                }
                Op::Release(k) => {
                    let (container_id, ifname) = key(k);
                    let actual = ipam.release(&container_id, &ifname).unwrap();
                    let expected = model.release(&key(k));
                    prop_assert_eq!(actual.map(|a| a.addresses), expected);
                }
                Op::Gc(valid) => {
                    let valid: BTreeSet<(String, String)> = valid.into_iter().map(key).collect();
                    let valid_list: Vec<(String, String)> = valid.iter().cloned().collect();
                    let released: BTreeSet<(String, String)> = ipam
                        .gc(&valid_list)
                        .unwrap()
                        .into_iter()
                        .map(|a| (a.container_id, a.ifname))
                        .collect();
                    prop_assert_eq!(released, model.gc(&valid));
                }
                Op::Reopen => {
                    drop(ipam);
                    ipam = open(dir.path(), &pools);
                }
            }
            check_invariants(&ipam, &model)?;
        }

        drop(ipam);
        let reopened = open(dir.path(), &pools);
        check_invariants(&reopened, &model)?;
    }
}
