//! Pod address allocation for one node.
//!
//! The agent opens one [`Ipam`] over the node's pod CIDR(s) (an IPv4 range and, for dual
//! stack, an IPv6 one) and a state directory, and allocates one address per pool for each
//! attachment, keyed by the CNI attachment identity `(container_id, ifname)` (CNI spec
//! §3 "Attachment Parameters").
//!
//! # Guarantees
//!
//! * **Durable**: every change is on disk before the call that made it returns, written
//!   atomically to `<state_dir>/allocations.json` (temporary file, fsync, rename, fsync of
//!   the directory; the format is documented in `src/store.rs`); a crash never loses or
//!   duplicates an allocation. Reopening gives the same allocations.
//! * **Unique**: no address is held by two attachments, also under concurrent calls from
//!   many threads (one mutex around the state; the write happens under it).
//! * **Exclusive**: the state directory is `flock`ed for the lifetime of the [`Ipam`], so a
//!   second agent on the same node fails with [`IpamError::Locked`] instead of handing out
//!   the same addresses.
//! * **No immediate reuse**: each pool is walked round robin from the last address handed
//!   out, like the reference `host-local` plugin, so a released address is handed out
//!   again only after the rest of the pool has been used. Conntrack entries, ARP/neighbour
//!   caches and peers' connection state for the old pod then have time to expire before a
//!   new pod gets its address.
//! * **Never** the network address, nor for IPv4 the broadcast address.
//! * **Idempotent**: [`Ipam::allocate`] for an attachment that already has an allocation
//!   returns it unchanged (the agent may retry an `ADD`); [`Ipam::release`] of an unknown
//!   attachment is `Ok(None)` (CNI `DEL` must succeed for unknown containers).
//!
//! # Changed pools
//!
//! When the node's pod CIDR changes between runs, [`Ipam::open`] gets the new pools while
//! the state still holds allocations from the old ones. Those stay readable
//! ([`Ipam::get`], [`Ipam::allocations`]) and releasable ([`Ipam::release`],
//! [`Ipam::gc`]) so the pods using them can be torn down cleanly, and their addresses are
//! never handed out again while held, but new allocations come only from the new pools.
//! [`Ipam::stale_allocations`] lists the allocations with an address outside the current
//! pools, for the agent to report.
//!
//! # Node-side addresses
//!
//! The agent can reserve addresses for itself (e.g. a gateway address on the host side)
//! by allocating for a reserved owner such as `("weir-node", "host")`; it must then list
//! that owner in the `valid` set it passes to [`Ipam::gc`].

mod pool;
mod store;

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::pool::Pool;
use crate::store::{Cursor, FORMAT, StateFile, Store};

/// What failed, and on what.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// `open` was given no pool.
    #[error("no address pool configured for pod IPAM")]
    NoPools,
    /// A pool has no address that may be handed out (IPv4 /31 or /32, IPv6 /128).
    #[error("pod address pool {pool} is too small: it has no usable address")]
    PoolTooSmall {
        /// The pool.
        pool: IpNet,
    },
    /// Two configured pools overlap.
    #[error("pod address pools {first} and {second} overlap")]
    OverlappingPools {
        /// One pool.
        first: IpNet,
        /// The other.
        second: IpNet,
    },
    /// The state directory cannot be created, opened or synced.
    #[error("IPAM state directory {}: {source}", dir.display())]
    StateDir {
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Another process holds the state directory's lock.
    #[error(
        "IPAM state directory {} is locked by another process; is another weir agent running on this node?",
        dir.display()
    )]
    Locked {
        /// The directory.
        dir: PathBuf,
    },
    /// The lock file cannot be opened or locked.
    #[error("cannot lock IPAM state at {}: {source}", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The state file exists but cannot be read.
    #[error("cannot read IPAM state file {}: {source}", path.display())]
    ReadState {
        /// The state file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The state file is not valid JSON of the expected shape, or is inconsistent.
    #[error(
        "IPAM state file {} is corrupt ({reason}); refusing to start with an empty state, \
         which could hand out addresses that running pods still use",
        path.display()
    )]
    CorruptState {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The state file was written by a newer, incompatible version.
    #[error(
        "IPAM state file {} has format {format}; this version reads format {FORMAT} only",
        path.display()
    )]
    UnsupportedFormat {
        /// The state file.
        path: PathBuf,
        /// The format found.
        format: u64,
    },
    /// Writing the new state failed; the change was not made.
    #[error("cannot write IPAM state file {}: {source}", path.display())]
    WriteState {
        /// The state file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Every usable address of the pool is allocated.
    #[error("pod address pool {pool} is exhausted")]
    Exhausted {
        /// The full pool.
        pool: IpNet,
    },
    /// The owner's container id or interface name is empty.
    #[error(
        "invalid allocation owner (container id {container_id:?}, ifname {ifname:?}): both must be non-empty"
    )]
    InvalidOwner {
        /// The container id given.
        container_id: String,
        /// The interface name given.
        ifname: String,
    },
}

/// The Kubernetes pod an allocation is for (from `K8S_POD_NAMESPACE`/`K8S_POD_NAME`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// Who an allocation is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    /// `CNI_CONTAINERID`: the pod sandbox id.
    pub container_id: String,
    /// `CNI_IFNAME`: the interface in the pod.
    pub ifname: String,
    /// The pod, when known; informational (for listing and debugging).
    pub pod: Option<PodRef>,
}

/// The addresses held by one attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// The pod, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    /// One address per pool, in pool order, each with its pool's prefix length
    /// (e.g. `10.244.1.7/24`): `addr()` is the pod address, `trunc()` the pool.
    pub addresses: Vec<IpNet>,
}

impl Allocation {
    /// The IPv4 address, if any.
    pub fn ipv4(&self) -> Option<IpNet> {
        self.addresses.iter().copied().find(|a| a.addr().is_ipv4())
    }

    /// The IPv6 address, if any.
    pub fn ipv6(&self) -> Option<IpNet> {
        self.addresses.iter().copied().find(|a| a.addr().is_ipv6())
    }

    fn key(&self) -> (String, String) {
        (self.container_id.clone(), self.ifname.clone())
    }
}

/// The allocations of one node, persisted in a state directory. `Send + Sync`: share it
/// with an `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct Ipam {
    pools: Vec<Pool>,
    store: Store,
    state: Mutex<State>,
}

/// The in-memory state; only ever replaced as a whole, after the replacement is on disk.
#[derive(Debug, Clone, Default)]
struct State {
    allocations: BTreeMap<(String, String), Allocation>,
    taken: HashSet<IpAddr>,
    /// Per pool network, the last address handed out.
    cursors: BTreeMap<IpNet, IpAddr>,
}

impl Ipam {
    /// Opens (creating if needed) the state in `state_dir` and allocates from `pools`.
    ///
    /// Host bits of a pool are ignored (`10.244.1.9/24` means `10.244.1.0/24`). Fails if
    /// `pools` is empty, a pool has no usable address, two pools overlap, another process
    /// holds the directory, or the state file is unreadable or corrupt.
    pub fn open(state_dir: &Path, pools: &[IpNet]) -> Result<Ipam, IpamError> {
        let pools = validate_pools(pools)?;
        let store = Store::open(state_dir)?;
        let state = match store.load()? {
            Some(file) => State::from_file(file, &store)?,
            None => State::default(),
        };
        Ok(Ipam {
            pools,
            store,
            state: Mutex::new(state),
        })
    }

    /// Allocates one address from each pool for `owner`, or returns the allocation
    /// `(owner.container_id, owner.ifname)` already has.
    ///
    /// All or nothing: if any pool is exhausted, nothing is allocated and the error names
    /// that pool.
    pub fn allocate(&self, owner: &Owner) -> Result<Allocation, IpamError> {
        if owner.container_id.is_empty() || owner.ifname.is_empty() {
            return Err(IpamError::InvalidOwner {
                container_id: owner.container_id.clone(),
                ifname: owner.ifname.clone(),
            });
        }
        let mut state = self.lock();
        let key = (owner.container_id.clone(), owner.ifname.clone());
        if let Some(existing) = state.allocations.get(&key) {
            return Ok(existing.clone());
        }
        let mut next = state.clone();
        let mut addresses = Vec::with_capacity(self.pools.len());
        for pool in &self.pools {
            let in_use = next.taken.iter().filter(|a| pool.is_usable(**a)).count();
            let cursor = next.cursors.get(&pool.net()).copied();
            let address = pool
                .next_free(cursor, in_use as u128, |a| !next.taken.contains(&a))
                .ok_or(IpamError::Exhausted { pool: pool.net() })?;
            next.taken.insert(address);
            next.cursors.insert(pool.net(), address);
            // The prefix length comes from a valid IpNet, so this cannot fail.
            addresses
                .push(IpNet::new(address, pool.net().prefix_len()).unwrap_or_else(|_| pool.net()));
        }
        let allocation = Allocation {
            container_id: owner.container_id.clone(),
            ifname: owner.ifname.clone(),
            pod: owner.pod.clone(),
            addresses,
        };
        next.allocations.insert(key, allocation.clone());
        self.commit(&mut state, next)?;
        Ok(allocation)
    }

    /// Releases the allocation of `(container_id, ifname)` and returns it; `Ok(None)` when
    /// there is none (nothing is written then).
    pub fn release(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<Allocation>, IpamError> {
        let mut state = self.lock();
        let key = (container_id.to_owned(), ifname.to_owned());
        if !state.allocations.contains_key(&key) {
            return Ok(None);
        }
        let mut next = state.clone();
        let released = next.remove(&key);
        self.commit(&mut state, next)?;
        Ok(released)
    }

    /// The allocation of `(container_id, ifname)`, if any.
    pub fn get(&self, container_id: &str, ifname: &str) -> Option<Allocation> {
        self.lock()
            .allocations
            .get(&(container_id.to_owned(), ifname.to_owned()))
            .cloned()
    }

    /// Releases every allocation whose `(container_id, ifname)` is not in `valid` and
    /// returns the released ones (CNI `GC`, spec §2). One write for the whole batch; none
    /// when nothing is released.
    pub fn gc(&self, valid: &[(String, String)]) -> Result<Vec<Allocation>, IpamError> {
        let valid: HashSet<&(String, String)> = valid.iter().collect();
        let mut state = self.lock();
        let stale: Vec<(String, String)> = state
            .allocations
            .keys()
            .filter(|key| !valid.contains(key))
            .cloned()
            .collect();
        if stale.is_empty() {
            return Ok(Vec::new());
        }
        let mut next = state.clone();
        let released = stale.iter().filter_map(|key| next.remove(key)).collect();
        self.commit(&mut state, next)?;
        Ok(released)
    }

    /// Every allocation, ordered by `(container_id, ifname)`.
    pub fn allocations(&self) -> Vec<Allocation> {
        self.lock().allocations.values().cloned().collect()
    }

    /// The allocations holding an address outside the current pools (left over from a
    /// pod CIDR change; see the crate docs).
    pub fn stale_allocations(&self) -> Vec<Allocation> {
        self.lock()
            .allocations
            .values()
            .filter(|a| {
                a.addresses
                    .iter()
                    .any(|address| !self.pools.iter().any(|p| p.is_usable(address.addr())))
            })
            .cloned()
            .collect()
    }

    /// The pools new allocations come from, host bits cleared, in configuration order.
    pub fn pools(&self) -> Vec<IpNet> {
        self.pools.iter().map(Pool::net).collect()
    }

    /// The state file, for diagnostics.
    pub fn state_file(&self) -> &Path {
        self.store.state_path()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is only replaced after a successful write, never left half-changed,
        // so it is consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes `next`, then makes it the current state. On a write error the current state
    /// stays as it was (the change did not happen).
    fn commit(&self, current: &mut State, mut next: State) -> Result<(), IpamError> {
        // Cursors of pools no longer configured are dropped: they are meaningless now.
        next.cursors
            .retain(|net, _| self.pools.iter().any(|pool| pool.net() == *net));
        self.store.save(&next.to_file(&self.pools))?;
        *current = next;
        Ok(())
    }
}

impl State {
    fn from_file(file: StateFile, store: &Store) -> Result<State, IpamError> {
        let mut state = State::default();
        for allocation in file.allocations {
            let key = allocation.key();
            if key.0.is_empty() || key.1.is_empty() {
                return Err(
                    store.corrupt("an allocation has an empty container id or ifname".into())
                );
            }
            for address in &allocation.addresses {
                if !state.taken.insert(address.addr()) {
                    return Err(
                        store.corrupt(format!("address {} is allocated twice", address.addr()))
                    );
                }
            }
            if state.allocations.insert(key.clone(), allocation).is_some() {
                return Err(
                    store.corrupt(format!("attachment ({}, {}) appears twice", key.0, key.1))
                );
            }
        }
        state.cursors = file.cursors.into_iter().map(|c| (c.pool, c.last)).collect();
        Ok(state)
    }

    fn to_file(&self, pools: &[Pool]) -> StateFile {
        StateFile {
            format: FORMAT,
            pools: pools.iter().map(Pool::net).collect(),
            cursors: self
                .cursors
                .iter()
                .map(|(pool, last)| Cursor {
                    pool: *pool,
                    last: *last,
                })
                .collect(),
            allocations: self.allocations.values().cloned().collect(),
        }
    }

    fn remove(&mut self, key: &(String, String)) -> Option<Allocation> {
        let allocation = self.allocations.remove(key)?;
        for address in &allocation.addresses {
            self.taken.remove(&address.addr());
        }
        Some(allocation)
    }
}

fn validate_pools(pools: &[IpNet]) -> Result<Vec<Pool>, IpamError> {
    if pools.is_empty() {
        return Err(IpamError::NoPools);
    }
    let validated = pools
        .iter()
        .map(|net| Pool::new(*net).ok_or(IpamError::PoolTooSmall { pool: *net }))
        .collect::<Result<Vec<Pool>, IpamError>>()?;
    for (i, first) in validated.iter().enumerate() {
        for second in &validated[i + 1..] {
            if first.net().contains(&second.net()) || second.net().contains(&first.net()) {
                return Err(IpamError::OverlappingPools {
                    first: first.net(),
                    second: second.net(),
                });
            }
        }
    }
    Ok(validated)
}
