//! Typed access to the dataplane maps, and the translation of the controller's
//! [`NodeState`] into map entries.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
    path::Path,
};

use aya::{
    Pod,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues, lpm_trie::Key},
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use thiserror::Error;
use weir_api::{
    Action, MapCapacities, NodeState, NodeStateDiff, PortPrefix, VerdictEntry, VerdictMatch,
};
use weir_common::{
    capacity,
    config::NodeConfig,
    conntrack::{CtEntry, CtKey},
    endpoint::{EndpointInfo, FailsafeKey, HostAddr},
    event::DropReason,
    ip::{IpKey, V4_MAPPED_PREFIX, trie_prefix_len},
    maps as names,
    policy::{NOT_ISOLATED, PeerClass, Verdict, VerdictKey},
    prefilter::PrefilterEntry,
    route::{RouteEntry, TunnelPeer},
    service::{NatEntry, ServiceKey, ServiceValue},
};

use crate::dataplane::{Dataplane, DataplaneError};

#[derive(Debug, Error)]
pub enum MapsError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("reading the possible CPUs")]
    Cpus {
        #[source]
        source: std::io::Error,
    },
    #[error("map {map}: {needed} entries needed, it holds {capacity}; nothing was written")]
    Capacity {
        map: &'static str,
        needed: usize,
        capacity: u32,
    },
    #[error("map {map}: {action}")]
    Map {
        map: &'static str,
        action: String,
        #[source]
        source: Box<MapError>,
    },
}

pub type Result<T, E = MapsError> = std::result::Result<T, E>;

/// What a conntrack sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtSweep {
    /// Entries left in the table.
    pub entries: usize,
    /// Expired entries deleted.
    pub removed: usize,
}

/// Conntrack and the node configuration through handles of their own (opened from the
/// pins): a sweep walks the whole table, and on these it runs without holding up the agent
/// (CNI, state applies), in a blocking task.
pub struct ConntrackSweeper {
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    config: Array<MapData, NodeConfig>,
}

impl ConntrackSweeper {
    pub fn new(conntrack: MapData, config: MapData) -> Result<Self> {
        Ok(Self {
            conntrack: HashMap::try_from(aya::maps::Map::HashMap(conntrack))
                .map_err(map_err(names::CONNTRACK, "opening"))?,
            config: Array::try_from(aya::maps::Map::Array(config))
                .map_err(map_err(names::NODE_CONFIG, "opening"))?,
        })
    }

    /// Deletes expired entries (see [`DataplaneMaps::sweep_conntrack`]).
    pub fn sweep(&mut self, now_ns: u64, max: usize) -> Result<CtSweep> {
        let config = self
            .config
            .get(&0, 0)
            .map_err(map_err(names::NODE_CONFIG, "reading"))?;
        Ok(sweep_table(
            &mut self.conntrack,
            config.ct_timeouts(),
            now_ns,
            max,
        ))
    }
}

fn sweep_table(
    conntrack: &mut HashMap<MapData, CtKey, CtEntry>,
    timeouts: &weir_common::config::CtTimeouts,
    now_ns: u64,
    max: usize,
) -> CtSweep {
    let mut entries = 0;
    let mut expired = Vec::new();
    for (k, e) in conntrack.iter().filter_map(|r| r.ok()) {
        entries += 1;
        if expired.len() < max && timeouts.expired(k.proto(), e.flags(), e.last_seen_ns(), now_ns) {
            expired.push(k);
        }
    }
    let mut removed = 0;
    for k in &expired {
        // Deleted only if still expired: a packet may have refreshed it meanwhile.
        match conntrack.get(k, 0) {
            Ok(now) if timeouts.expired(k.proto(), now.flags(), now.last_seen_ns(), now_ns) => {}
            _ => continue,
        }
        if conntrack.remove(k).is_ok() {
            removed += 1;
        }
    }
    CtSweep {
        entries: entries - removed,
        removed,
    }
}

/// The `CLOCK_MONOTONIC` time in nanoseconds: the clock of `bpf_ktime_get_ns`, which stamps
/// conntrack entries.
pub fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    assert_eq!(rc, 0, "CLOCK_MONOTONIC is always available");
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn map_err(map: &'static str, action: impl Into<String>) -> impl FnOnce(MapError) -> MapsError {
    let action = action.into();
    move |source| MapsError::Map {
        map,
        action,
        source: Box::new(source),
    }
}

/// The LPM key of an address prefix.
pub fn prefix_key(net: &IpNet) -> Key<IpKey> {
    Key::new(
        trie_prefix_len(net.addr(), net.prefix_len()),
        IpKey::from(net.network()),
    )
}

/// The LPM key of a verdict match.
pub fn verdict_key(m: &VerdictMatch) -> Key<VerdictKey> {
    let (prefix, proto, port) = match (m.proto, m.ports) {
        (None, _) => (VerdictKey::PREFIX_ANY_PROTO, 0, 0),
        (Some(p), None) => (VerdictKey::PREFIX_ANY_PORT, p, 0),
        (Some(p), Some(ports)) => (
            VerdictKey::PREFIX_PORT_BASE + u32::from(ports.len),
            p,
            ports.port,
        ),
    };
    Key::new(prefix, VerdictKey::new(m.rule_set, m.class, proto, port))
}

pub fn verdict_value(v: &VerdictEntry) -> Verdict {
    match v.action {
        Action::Allow => Verdict::allow(v.rule),
        Action::Deny => Verdict::deny(v.rule),
    }
}

/// The address prefix a key of a 128-bit trie stands for (IPv4 is stored IPv4-mapped).
pub fn trie_net(prefix_len: u32, data: IpKey) -> Option<IpNet> {
    let addr = IpAddr::from(data);
    match addr {
        IpAddr::V4(v4) if prefix_len >= V4_MAPPED_PREFIX => {
            Ipv4Net::new(v4, u8::try_from(prefix_len - V4_MAPPED_PREFIX).ok()?)
                .ok()
                .map(IpNet::V4)
        }
        IpAddr::V4(v4) => Ipv6Net::new(v4.to_ipv6_mapped(), u8::try_from(prefix_len).ok()?)
            .ok()
            .map(IpNet::V6),
        IpAddr::V6(v6) => Ipv6Net::new(v6, u8::try_from(prefix_len).ok()?)
            .ok()
            .map(IpNet::V6),
    }
}

/// The verdict match a key of `VERDICTS` (or, with [`VerdictKey::PREFIX_FULL`],
/// `VERDICTS_EXACT`) stands for: the inverse of [`verdict_key`].
pub fn verdict_match(prefix_len: u32, k: &VerdictKey) -> Option<VerdictMatch> {
    let (proto, ports) = match prefix_len {
        VerdictKey::PREFIX_ANY_PROTO => (None, None),
        VerdictKey::PREFIX_ANY_PORT => (Some(k.proto()), None),
        l if (VerdictKey::PREFIX_PORT_BASE..=VerdictKey::PREFIX_FULL).contains(&l) => {
            let len = u8::try_from(l - VerdictKey::PREFIX_PORT_BASE).ok()?;
            (Some(k.proto()), Some(PortPrefix::new(k.port(), len)?))
        }
        _ => return None,
    };
    Some(VerdictMatch {
        rule_set: k.policy(),
        class: k.class(),
        proto,
        ports,
    })
}

/// The inverse of [`verdict_value`].
pub fn verdict_entry(v: &Verdict) -> VerdictEntry {
    VerdictEntry {
        action: if v.is_allow() {
            Action::Allow
        } else {
            Action::Deny
        },
        rule: v.rule(),
    }
}

/// What a write of policy entries could not place.
#[derive(Debug, Default)]
pub struct PolicyWrite {
    pub failed_classes: Vec<(IpNet, u32)>,
    pub failed_verdicts: Vec<(VerdictMatch, VerdictEntry)>,
    /// The first failure, for people.
    pub first_error: Option<String>,
}

impl PolicyWrite {
    pub fn is_complete(&self) -> bool {
        self.failed_classes.is_empty() && self.failed_verdicts.is_empty()
    }

    /// How many entries are missing.
    pub fn missing(&self) -> usize {
        self.failed_classes.len() + self.failed_verdicts.len()
    }

    /// The rule sets of `state` the dataplane may not decide as compiled: those with a
    /// verdict missing, and, for each missing class, those with verdicts for it, for the
    /// class of any prefix that contains its prefix (the addresses fall back to that one) or
    /// for unmatched addresses. Their endpoints must fail closed.
    pub fn failed_rule_sets(&self, state: &NodeState) -> BTreeSet<u32> {
        let mut out: BTreeSet<u32> = self
            .failed_verdicts
            .iter()
            .map(|(m, _)| m.rule_set)
            .collect();
        if self.failed_classes.is_empty() {
            return out;
        }
        let mut classes: HashSet<u32> = HashSet::from([weir_api::CLASS_UNMATCHED]);
        for (net, class) in &self.failed_classes {
            classes.insert(*class);
            for (outer, c) in &state.peer_classes {
                let covers = match (&outer, net) {
                    // IPv4 is looked up IPv4-mapped: short IPv6 prefixes cover it too.
                    (IpNet::V6(o), IpNet::V4(n)) => {
                        o.prefix_len() <= 96 && o.contains(&n.addr().to_ipv6_mapped())
                    }
                    _ => outer.contains(net),
                };
                if covers {
                    classes.insert(c);
                }
            }
        }
        out.extend(
            state
                .verdicts
                .keys()
                .filter(|m| classes.contains(&m.class))
                .map(|m| m.rule_set),
        );
        out
    }
}

/// Entries in the dataplane's tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableSizes {
    pub endpoints: usize,
    /// `PEER_CLASSES` and `PEER_HOSTS`.
    pub peer_classes: usize,
    /// `VERDICTS` and `VERDICTS_EXACT`.
    pub verdicts: usize,
    pub routes: usize,
}

/// Handles to every map the agent writes or reads.
pub struct DataplaneMaps {
    pub endpoints: HashMap<MapData, IpKey, EndpointInfo>,
    pub host_addrs: HashMap<MapData, IpKey, HostAddr>,
    pub peer_classes: LpmTrie<MapData, IpKey, PeerClass>,
    pub peer_hosts: HashMap<MapData, IpKey, PeerClass>,
    pub verdicts: LpmTrie<MapData, VerdictKey, Verdict>,
    pub verdicts_exact: HashMap<MapData, VerdictKey, Verdict>,
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    pub routes: LpmTrie<MapData, IpKey, RouteEntry>,
    pub tunnel_peers: HashMap<MapData, IpKey, TunnelPeer>,
    pub config: Array<MapData, NodeConfig>,
    pub drops: PerCpuArray<MapData, u64>,
    /// Admitted flows per rule id.
    pub rule_hits: PerCpuArray<MapData, u64>,
    /// Policy drops per rule-set id.
    pub policy_drops: PerCpuArray<MapData, u64>,
    /// Service frontends and backend slots.
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    /// Translations of Service flows.
    pub service_nat: HashMap<MapData, CtKey, NatEntry>,
    /// Cookie of the node's network namespace, for the socket hooks.
    pub node_netns: Array<MapData, u64>,
    /// The XDP prefilter's prefixes, and its drops per entry id.
    pub prefilter: LpmTrie<MapData, IpKey, PrefilterEntry>,
    pub prefilter_drops: PerCpuArray<MapData, u64>,
    /// The node itself as a policy endpoint (its host policy), and the failsafe ports.
    pub host_endpoint: Array<MapData, EndpointInfo>,
    pub failsafe: HashMap<MapData, FailsafeKey, u8>,
    /// The sizes of the configurable tables, as the kernel holds them.
    pub capacities: MapCapacities,
}

macro_rules! take {
    ($dp:expr, $name:expr) => {
        $dp.take_map($name)?
            .try_into()
            .map_err(map_err($name, "opening"))?
    };
    ($dp:expr, $name:expr, $sizes:expr) => {{
        let map = $dp.take_map($name)?;
        $sizes.push(($name, max_entries(&map, $name)?));
        map.try_into().map_err(map_err($name, "opening"))?
    }};
}

/// The size the kernel created a map with.
fn max_entries(map: &aya::maps::Map, name: &'static str) -> Result<u32> {
    use aya::maps::Map;
    let data = match map {
        Map::HashMap(d) | Map::LruHashMap(d) | Map::LpmTrie(d) | Map::Array(d) => d,
        _ => {
            return Err(MapsError::Map {
                map: name,
                action: "reading its size".into(),
                source: Box::new(MapError::InvalidName {
                    name: name.to_string(),
                }),
            });
        }
    };
    Ok(data
        .info()
        .map_err(map_err(name, "reading its size"))?
        .max_entries())
}

impl DataplaneMaps {
    /// Takes the maps out of `dp`. [`Self::capacities`] are the sizes the kernel holds.
    pub fn take(dp: &mut Dataplane) -> Result<Self> {
        let mut sizes: Vec<(&'static str, u32)> = Vec::new();
        let mut maps = Self {
            endpoints: take!(dp, names::ENDPOINTS, sizes),
            host_addrs: take!(dp, names::HOST_ADDRS),
            peer_classes: take!(dp, names::PEER_CLASSES, sizes),
            peer_hosts: take!(dp, names::PEER_HOSTS, sizes),
            verdicts: take!(dp, names::VERDICTS, sizes),
            verdicts_exact: take!(dp, names::VERDICTS_EXACT, sizes),
            conntrack: take!(dp, names::CONNTRACK, sizes),
            routes: take!(dp, names::ROUTES, sizes),
            tunnel_peers: take!(dp, names::TUNNEL_PEERS),
            config: take!(dp, names::NODE_CONFIG),
            drops: take!(dp, names::DROPS),
            rule_hits: take!(dp, names::RULE_HITS),
            policy_drops: take!(dp, names::POLICY_DROPS),
            services: take!(dp, names::SERVICES, sizes),
            service_nat: take!(dp, names::SERVICE_NAT, sizes),
            node_netns: take!(dp, names::NODE_NETNS),
            prefilter: take!(dp, names::PREFILTER),
            prefilter_drops: take!(dp, names::PREFILTER_DROPS),
            host_endpoint: take!(dp, names::HOST_ENDPOINT),
            failsafe: take!(dp, names::FAILSAFE),
            capacities: *dp.capacities(),
        };
        for (name, n) in sizes {
            let c = &mut maps.capacities;
            let field = match name {
                names::ENDPOINTS => &mut c.endpoints,
                names::PEER_CLASSES => &mut c.peer_classes,
                names::PEER_HOSTS => &mut c.peer_hosts,
                names::VERDICTS => &mut c.verdicts,
                names::VERDICTS_EXACT => &mut c.verdicts_exact,
                names::CONNTRACK => &mut c.conntrack,
                names::ROUTES => &mut c.routes,
                names::SERVICES => &mut c.services,
                names::SERVICE_NAT => &mut c.service_nat,
                _ => continue,
            };
            *field = n;
        }
        Ok(maps)
    }

    /// Isolates the node's own addresses with host-policy rule sets `ingress` and `egress`,
    /// and drops in XDP what rule set `untracked` denies
    /// ([`NOT_ISOLATED`]: none).
    ///
    /// The XDP program looks the untracked rule set up only while
    /// [`NodeConfig::FLAG_HOST_UNTRACKED`] is set: the bit is set after the slot is written
    /// and cleared before the slot is, so that in between a packet meets the state before or
    /// after the change, never a rule set the bit hides half-way (and a set bit over an
    /// empty slot only costs the lookup).
    pub fn set_host_policy(&mut self, ingress: u32, egress: u32, untracked: u32) -> Result<()> {
        let active = untracked != NOT_ISOLATED;
        if !active {
            self.set_flag(NodeConfig::FLAG_HOST_UNTRACKED, false)?;
        }
        for (slot, host) in [
            (EndpointInfo::HOST_SLOT, EndpointInfo::host(ingress, egress)),
            (
                EndpointInfo::HOST_UNTRACKED_SLOT,
                EndpointInfo::host(untracked, NOT_ISOLATED),
            ),
        ] {
            if self.host_endpoint.get(&slot, 0).ok() != Some(host) {
                self.host_endpoint
                    .set(slot, host, 0)
                    .map_err(map_err(names::HOST_ENDPOINT, "writing"))?;
            }
        }
        if active {
            self.set_flag(NodeConfig::FLAG_HOST_UNTRACKED, true)?;
        }
        Ok(())
    }

    /// The untracked host-policy rule set in `HOST_ENDPOINT` ([`NOT_ISOLATED`]: none).
    pub fn untracked_rule_set(&self) -> Result<u32> {
        Ok(self
            .host_endpoint
            .get(&EndpointInfo::HOST_UNTRACKED_SLOT, 0)
            .map_err(map_err(names::HOST_ENDPOINT, "reading"))?
            .ingress_policy())
    }

    /// Sets (`on`) or clears flag `bit` of the node's settings (`NodeConfig::FLAG_*`),
    /// writing only when it changes.
    pub fn set_flag(&mut self, bit: u32, on: bool) -> Result<()> {
        let c = self.config()?;
        let updated = c.with_flag(bit, on);
        if updated != c {
            self.set_config(updated)?;
        }
        Ok(())
    }

    /// Makes the failsafe ports exactly `keys`.
    pub fn sync_failsafe(&mut self, keys: &[FailsafeKey]) -> Result<()> {
        for k in keys {
            self.failsafe
                .insert(k, 1, 0)
                .map_err(map_err(names::FAILSAFE, "writing"))?;
        }
        remove_hash_keys(&mut self.failsafe, |k| !keys.contains(k));
        Ok(())
    }

    /// Makes the socket hooks act on the sockets of the network namespace with `cookie` (0:
    /// on none).
    pub fn set_node_netns(&mut self, cookie: u64) -> Result<()> {
        self.node_netns
            .set(0, cookie, 0)
            .map_err(map_err(names::NODE_NETNS, "writing"))
    }

    pub fn config(&self) -> Result<NodeConfig> {
        self.config
            .get(&0, 0)
            .map_err(map_err(names::NODE_CONFIG, "reading"))
    }

    pub fn set_config(&mut self, c: NodeConfig) -> Result<()> {
        self.config
            .set(0, c, 0)
            .map_err(map_err(names::NODE_CONFIG, "writing"))
    }

    /// Makes every conntrack entry re-check policy on its next packet.
    pub fn bump_policy_generation(&mut self) -> Result<u32> {
        let mut c = self.config()?;
        let g = c.policy_gen().wrapping_add(1);
        c.set_policy_gen(g);
        self.set_config(c)?;
        Ok(g)
    }

    /// Makes the map hold exactly `desired` (a small map: compared in full).
    pub fn sync_endpoints(&mut self, desired: &BTreeMap<IpKey, EndpointInfo>) -> Result<()> {
        for (k, v) in desired {
            if self.endpoints.get(k, 0).ok().as_ref() != Some(v) {
                self.endpoints
                    .insert(k, v, 0)
                    .map_err(map_err(names::ENDPOINTS, format!("writing {k}")))?;
            }
        }
        remove_hash_keys(&mut self.endpoints, |k| !desired.contains_key(k));
        Ok(())
    }

    /// Makes the map hold `addrs` (in priority order: when there are more than it holds, the
    /// first ones are kept). Returns how many were left out: those get no node-to-pod
    /// exemption, which only makes their traffic subject to policy, so a full map is a
    /// degradation to report, never a reason to stop.
    pub fn sync_host_addrs(&mut self, addrs: &[IpAddr]) -> Result<usize> {
        let mut desired: Vec<IpKey> = Vec::with_capacity(addrs.len());
        let mut seen = HashSet::new();
        for a in addrs {
            let k = IpKey::from(*a);
            if seen.insert(k) {
                desired.push(k);
            }
        }
        let fits: HashSet<IpKey> = desired
            .iter()
            .take(capacity::HOST_ADDRS as usize)
            .copied()
            .collect();
        // Strays first, so they never take the room of a wanted address.
        remove_hash_keys(&mut self.host_addrs, |k| !fits.contains(k));
        let present: HashSet<IpKey> = self.host_addrs.keys().filter_map(|k| k.ok()).collect();
        let mut left_out = 0;
        for k in &desired {
            if present.contains(k) {
                continue;
            }
            if !fits.contains(k) {
                left_out += 1;
                continue;
            }
            match self.host_addrs.insert(k, HostAddr::new(), 0) {
                Ok(()) => {}
                // Full after all (another writer): the same degradation.
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::E2BIG) =>
                {
                    left_out += 1;
                }
                Err(e) => {
                    return Err(map_err(names::HOST_ADDRS, format!("writing {k}"))(e));
                }
            }
        }
        Ok(left_out)
    }

    /// Makes the map hold exactly `peers`: the other nodes, whose encapsulated packets the
    /// tunnel accepts.
    pub fn sync_tunnel_peers(&mut self, peers: &BTreeSet<IpKey>) -> Result<()> {
        for k in peers {
            self.tunnel_peers
                .insert(k, TunnelPeer::new(), 0)
                .map_err(map_err(names::TUNNEL_PEERS, format!("writing {k}")))?;
        }
        remove_hash_keys(&mut self.tunnel_peers, |k| !peers.contains(k));
        Ok(())
    }

    /// Makes the prefilter hold exactly `nets`; returns each prefix with its entry id (the
    /// slot of its drop counter). A prefix already in the map keeps its id, and so its
    /// count, across agent restarts; a new one takes the lowest free id, its counter zeroed.
    /// More prefixes than the map holds is an error, before anything is written. With
    /// `keep_present`, prefixes the map holds that are not in `nets` stay (and are returned).
    pub fn sync_prefilter(
        &mut self,
        nets: &BTreeSet<IpNet>,
        keep_present: bool,
    ) -> Result<BTreeMap<IpNet, u32>> {
        // Host bits do not count (the trie ignores them too).
        let nets: BTreeSet<IpNet> = nets.iter().map(IpNet::trunc).collect();
        let max = capacity::PREFILTER - 1;
        if nets.len() > max as usize {
            return Err(MapsError::Capacity {
                map: names::PREFILTER,
                needed: nets.len(),
                capacity: max,
            });
        }
        let present: Vec<(Key<IpKey>, PrefilterEntry)> =
            self.prefilter.iter().filter_map(|r| r.ok()).collect();
        let mut out = BTreeMap::new();
        for (key, entry) in &present {
            let net = trie_net(key.prefix_len(), key.data());
            match net.filter(|n| keep_present || nets.contains(n)) {
                Some(n) => {
                    out.insert(n, entry.id());
                }
                None => {
                    let _ = self.prefilter.remove(key);
                }
            }
        }
        let mut used: BTreeSet<u32> = out.values().copied().collect();
        let mut next = 1;
        for net in &nets {
            if out.contains_key(net) {
                continue;
            }
            while used.contains(&next) {
                next += 1;
            }
            reset_counter(&mut self.prefilter_drops, next, names::PREFILTER_DROPS)?;
            self.prefilter
                .insert(&prefix_key(net), PrefilterEntry::new(next), 0)
                .map_err(map_err(names::PREFILTER, format!("writing {net}")))?;
            used.insert(next);
            out.insert(*net, next);
        }
        Ok(out)
    }

    /// Sets the class of an address prefix. Full-length prefixes (a pod's address) go to
    /// the hash map the dataplane looks in first; shorter ones to the trie.
    pub fn set_peer_class(&mut self, net: &IpNet, class: u32) -> Result<()> {
        if net.prefix_len() == net.max_prefix_len() {
            self.peer_hosts
                .insert(IpKey::from(net.addr()), PeerClass::new(class), 0)
                .map_err(map_err(names::PEER_HOSTS, format!("writing {net}")))
        } else {
            self.peer_classes
                .insert(&prefix_key(net), PeerClass::new(class), 0)
                .map_err(map_err(names::PEER_CLASSES, format!("writing {net}")))
        }
    }

    pub fn remove_peer_class(&mut self, net: &IpNet) {
        if net.prefix_len() == net.max_prefix_len() {
            let _ = self.peer_hosts.remove(&IpKey::from(net.addr()));
        } else {
            let _ = self.peer_classes.remove(&prefix_key(net));
        }
    }

    /// Sets a verdict. Full-length keys (one port of one protocol) go to the hash map the
    /// dataplane looks in first; everything shorter to the trie.
    pub fn set_verdict(&mut self, m: &VerdictMatch, v: &VerdictEntry) -> Result<()> {
        let key = verdict_key(m);
        if key.prefix_len() == VerdictKey::PREFIX_FULL {
            self.verdicts_exact
                .insert(key.data(), verdict_value(v), 0)
                .map_err(map_err(names::VERDICTS_EXACT, format!("writing {m:?}")))
        } else {
            self.verdicts
                .insert(&key, verdict_value(v), 0)
                .map_err(map_err(names::VERDICTS, format!("writing {m:?}")))
        }
    }

    pub fn remove_verdict(&mut self, m: &VerdictMatch) {
        let key = verdict_key(m);
        if key.prefix_len() == VerdictKey::PREFIX_FULL {
            let _ = self.verdicts_exact.remove(&key.data());
        } else {
            let _ = self.verdicts.remove(&key);
        }
    }

    /// Applies the additions of a policy diff. Call [`DataplaneMaps::remove_policy_entries`]
    /// once the endpoints point at the new rule sets: additions before the endpoint changes
    /// that use them, removals after, so a packet never meets a rule set whose verdicts are
    /// half-written. When an addition does not fit, the diff's removals are made first and
    /// the addition tried again; what still fails is returned, not given up at: every other
    /// entry is written.
    pub fn apply_policy_diff(&mut self, diff: &NodeStateDiff) -> Result<PolicyWrite> {
        // An id new to this node (or standing for something else now) starts from zero, before
        // any verdict can name it.
        for (id, _) in &diff.rules.upsert {
            reset_counter(&mut self.rule_hits, *id, names::RULE_HITS)?;
        }
        for (id, _) in &diff.rule_sets.upsert {
            reset_counter(&mut self.policy_drops, *id, names::POLICY_DROPS)?;
        }
        let mut w = self.write_policy_entries(
            diff.peer_classes.upsert.iter().copied(),
            diff.verdicts.upsert.iter().map(|(m, v)| (m, v)),
        );
        if !w.is_complete() {
            // Short of room: stale entries go first.
            self.remove_policy_entries(diff);
            let failed = std::mem::take(&mut w);
            w = self.write_policy_entries(
                failed.failed_classes.iter().copied(),
                failed.failed_verdicts.iter().map(|(m, v)| (m, v)),
            );
        }
        Ok(w)
    }

    /// The removals of a policy diff (see [`DataplaneMaps::apply_policy_diff`]).
    pub fn remove_policy_entries(&mut self, diff: &NodeStateDiff) {
        for net in &diff.peer_classes.remove {
            self.remove_peer_class(net);
        }
        for m in &diff.verdicts.remove {
            self.remove_verdict(m);
        }
    }

    /// Writes classes and verdicts, every one of them even when some fail; returns the ones
    /// that failed.
    fn write_policy_entries<'a>(
        &mut self,
        classes: impl Iterator<Item = (IpNet, u32)>,
        verdicts: impl Iterator<Item = (&'a VerdictMatch, &'a VerdictEntry)>,
    ) -> PolicyWrite {
        let mut w = PolicyWrite::default();
        for (net, class) in classes {
            if let Err(e) = self.set_peer_class(&net, class) {
                w.first_error.get_or_insert(e.to_string());
                w.failed_classes.push((net, class));
            }
        }
        // Smallest rule sets first: when room runs out, the largest ones miss entries (and
        // fail closed), not every tenant's.
        let mut by_rule_set: BTreeMap<u32, Vec<(&VerdictMatch, &VerdictEntry)>> = BTreeMap::new();
        for (m, v) in verdicts {
            by_rule_set.entry(m.rule_set).or_default().push((m, v));
        }
        let mut groups: Vec<_> = by_rule_set.into_values().collect();
        groups.sort_by_key(|g| g.len());
        for (m, v) in groups.into_iter().flatten() {
            if let Err(e) = self.set_verdict(m, v) {
                w.first_error.get_or_insert(e.to_string());
                w.failed_verdicts.push((*m, *v));
            }
        }
        w
    }

    /// Writes `state`'s classes and verdicts over whatever the policy maps held before (a
    /// restarted agent does not know what its predecessor wrote). Call
    /// [`DataplaneMaps::prune_policy`] once the endpoints point at the new rule sets. When an
    /// entry does not fit, the entries `state` does not have are removed first and the
    /// entry tried again; what still fails is returned, every other entry is written.
    ///
    /// `previous` is the state this agent applied last (empty after a start): counters of
    /// rule and rule-set ids that stand for the same thing in both are kept, every other
    /// slot is zeroed. A snapshot after a controller restart may reuse ids for other rules;
    /// after an agent restart nothing says what the pinned counts belonged to, so they start
    /// from zero.
    pub fn sync_policy(&mut self, state: &NodeState, previous: &NodeState) -> Result<PolicyWrite> {
        sync_counters(
            &mut self.rule_hits,
            &state.rules,
            &previous.rules,
            names::RULE_HITS,
        )?;
        sync_counters(
            &mut self.policy_drops,
            &state.rule_sets,
            &previous.rule_sets,
            names::POLICY_DROPS,
        )?;
        let mut w = self.write_policy_entries(state.peer_classes.iter(), state.verdicts.iter());
        if !w.is_complete() {
            self.prune_policy(state);
            let failed = std::mem::take(&mut w);
            w = self.write_policy_entries(
                failed.failed_classes.iter().copied(),
                failed.failed_verdicts.iter().map(|(m, v)| (m, v)),
            );
        }
        Ok(w)
    }

    /// What the policy maps hold, read back (after a restart the agent does not know what
    /// its predecessor wrote): classes, verdicts (an exact entry shadows the trie's, as in
    /// the kernel's lookup) and the rule sets endpoints point at. Rules are not in the maps.
    pub fn read_policy_tables(&self) -> crate::renumber::PolicyTables {
        let mut t = crate::renumber::PolicyTables::default();
        for (k, v) in self.peer_hosts.iter().filter_map(|r| r.ok()) {
            t.peer_classes
                .insert(IpNet::from(IpAddr::from(k)), v.class());
        }
        for (k, v) in self.peer_classes.iter().filter_map(|r| r.ok()) {
            if let Some(net) = trie_net(k.prefix_len(), k.data()) {
                t.peer_classes.insert(net, v.class());
            }
        }
        for (k, v) in self.verdicts_exact.iter().filter_map(|r| r.ok()) {
            if let Some(m) = verdict_match(VerdictKey::PREFIX_FULL, &k) {
                t.verdicts.insert(m, verdict_entry(&v));
            }
        }
        for (k, v) in self.verdicts.iter().filter_map(|r| r.ok()) {
            if let Some(m) = verdict_match(k.prefix_len(), &k.data()) {
                t.verdicts.entry(m).or_insert_with(|| verdict_entry(&v));
            }
        }
        for (_, e) in self.endpoints.iter().filter_map(|r| r.ok()) {
            t.rule_sets_in_use.insert(e.ingress_policy());
            t.rule_sets_in_use.insert(e.egress_policy());
        }
        t
    }

    /// Removes every class and verdict `state` does not have.
    pub fn prune_policy(&mut self, state: &NodeState) {
        let mut wanted_prefixes: HashSet<(u32, IpKey)> = HashSet::new();
        let mut wanted_hosts: HashSet<IpKey> = HashSet::new();
        for n in state.peer_classes.keys() {
            if n.prefix_len() == n.max_prefix_len() {
                wanted_hosts.insert(IpKey::from(n.addr()));
            } else {
                let k = prefix_key(&n);
                wanted_prefixes.insert((k.prefix_len(), k.data()));
            }
        }
        remove_trie_keys(&mut self.peer_classes, |k| {
            !wanted_prefixes.contains(&(k.prefix_len(), k.data()))
        });
        remove_hash_keys(&mut self.peer_hosts, |k| !wanted_hosts.contains(k));
        let mut wanted_verdicts: HashSet<(u32, VerdictKey)> = HashSet::new();
        for m in state.verdicts.keys() {
            let k = verdict_key(m);
            wanted_verdicts.insert((k.prefix_len(), k.data()));
        }
        // Full-length keys belong in VERDICTS_EXACT: one left in the trie (written by an agent
        // from before that map existed) would still match when the exact entry is gone.
        remove_trie_keys(&mut self.verdicts, |k| {
            k.prefix_len() == VerdictKey::PREFIX_FULL
                || !wanted_verdicts.contains(&(k.prefix_len(), k.data()))
        });
        remove_hash_keys(&mut self.verdicts_exact, |k| {
            !wanted_verdicts.contains(&(VerdictKey::PREFIX_FULL, *k))
        });
    }

    /// Makes the route map hold exactly `desired` (remote pod CIDR → node).
    pub fn sync_routes(&mut self, desired: &BTreeMap<IpNet, RouteEntry>) -> Result<()> {
        let wanted: HashSet<(u32, IpKey)> = desired
            .keys()
            .map(|n| {
                let k = prefix_key(n);
                (k.prefix_len(), k.data())
            })
            .collect();
        for (net, entry) in desired {
            self.routes
                .insert(&prefix_key(net), *entry, 0)
                .map_err(map_err(names::ROUTES, format!("writing {net}")))?;
        }
        remove_trie_keys(&mut self.routes, |k| {
            !wanted.contains(&(k.prefix_len(), k.data()))
        });
        Ok(())
    }

    /// Copies the entries of the maps pinned in `maps_dir` by an agent of another ABI version
    /// whose layout has not changed (conntrack, endpoints, policy, routes, configuration), so
    /// that established flows and enforcement carry on while the programs are swapped. Maps
    /// whose layout changed, or that are missing, are skipped: returns each map's outcome.
    pub fn carry_over(&mut self, maps_dir: &Path) -> Vec<(&'static str, Result<Copied, String>)> {
        let open = |name: &'static str| -> Result<aya::maps::Map, String> {
            let data = MapData::from_pin(maps_dir.join(name)).map_err(|e| e.to_string())?;
            aya::maps::Map::from_map_data(data).map_err(|e| e.to_string())
        };
        let mut out: Vec<(&'static str, Result<Copied, String>)> = [
            names::CONNTRACK,
            names::SERVICE_NAT,
            names::SERVICES,
            names::ENDPOINTS,
            names::HOST_ADDRS,
            names::PEER_HOSTS,
            names::VERDICTS_EXACT,
            names::PEER_CLASSES,
            names::VERDICTS,
            names::ROUTES,
        ]
        .into_iter()
        .map(|name| (name, self.carry_map(name, maps_dir, CopyMode::Overwrite)))
        .collect();
        out.extend([
            // Versions before the tunnel checked its senders have no such map: the nodes are
            // the ones the carried-over routes lead to.
            (
                names::TUNNEL_PEERS,
                self.carry_map(names::TUNNEL_PEERS, maps_dir, CopyMode::Overwrite)
                    .or_else(|_| {
                        self.tunnel_peers_from_routes().map(|n| Copied {
                            copied: n,
                            ..Default::default()
                        })
                    }),
            ),
            (
                names::NODE_CONFIG,
                open(names::NODE_CONFIG).and_then(|m| {
                    let c = match Array::<MapData, NodeConfig>::try_from(m) {
                        Ok(old) => old.get(&0, 0).map_err(|e| e.to_string())?,
                        // Versions before 5 had no conntrack timeouts: their policy
                        // generation, sample rate, VNI and flags, with the default timeouts
                        // (the agent writes its own right after).
                        Err(_) => {
                            let m = open(names::NODE_CONFIG)?;
                            let old: Array<MapData, [u32; 4]> =
                                m.try_into().map_err(|e: MapError| e.to_string())?;
                            let [policy_gen, flags, sample_rate, vni] =
                                old.get(&0, 0).map_err(|e| e.to_string())?;
                            NodeConfig::new(policy_gen, sample_rate, vni).with_flags(flags)
                        }
                    };
                    self.config.set(0, c, 0).map_err(|e| e.to_string())?;
                    Ok(Copied {
                        copied: 1,
                        ..Default::default()
                    })
                }),
            ),
        ]);
        out
    }

    /// Copies the entries of the maps an agent set aside for having another size than
    /// configured ([`crate::dataplane::Resized`]; also those an agent that stopped before
    /// copying left there) into the maps that replace them, then removes them. Entries the
    /// new maps already have are kept; entries beyond a smaller map's size are left out and
    /// counted. Returns each map's outcome.
    pub fn carry_over_resized(
        &mut self,
        pins: &crate::dataplane::PinLayout,
    ) -> Vec<(&'static str, Result<Copied, String>)> {
        let dir = pins.resized_dir();
        let mut out = Vec::new();
        for (name, _) in self.capacities.maps() {
            let pin = dir.join(name);
            if !pin.exists() {
                continue;
            }
            let outcome = self.carry_map(name, &dir, CopyMode::Missing);
            if let Err(e) = std::fs::remove_file(&pin) {
                tracing::warn!(map = name, error = %e, "removing the pin of a resized map");
            }
            out.push((name, outcome));
        }
        let _ = std::fs::remove_dir(&dir);
        out
    }

    /// Copies the entries of the map `name` pinned in `dir` into this agent's map of that
    /// name, as far as there is room.
    fn carry_map(
        &mut self,
        name: &'static str,
        dir: &Path,
        mode: CopyMode,
    ) -> Result<Copied, String> {
        let data = MapData::from_pin(dir.join(name)).map_err(|e| e.to_string())?;
        let from = aya::maps::Map::from_map_data(data).map_err(|e| e.to_string())?;
        let room = |capacity: Option<u32>, len: usize| {
            capacity.map_or(usize::MAX, |c| (c as usize).saturating_sub(len))
        };
        let cap = self.capacities.of_map(name);
        match name {
            names::CONNTRACK => {
                let r = room(cap, self.conntrack.keys().count());
                copy_hash(from, &mut self.conntrack, r, mode)
            }
            names::SERVICE_NAT => {
                let r = room(cap, self.service_nat.keys().count());
                copy_hash(from, &mut self.service_nat, r, mode)
            }
            names::SERVICES => {
                let r = room(cap, self.services.keys().count());
                copy_hash(from, &mut self.services, r, mode)
            }
            names::ENDPOINTS => {
                let r = room(cap, self.endpoints.keys().count());
                copy_hash(from, &mut self.endpoints, r, mode)
            }
            names::HOST_ADDRS => {
                let r = room(Some(capacity::HOST_ADDRS), self.host_addrs.keys().count());
                copy_hash(from, &mut self.host_addrs, r, mode)
            }
            names::PEER_HOSTS => {
                let r = room(cap, self.peer_hosts.keys().count());
                copy_hash(from, &mut self.peer_hosts, r, mode)
            }
            names::VERDICTS_EXACT => {
                let r = room(cap, self.verdicts_exact.keys().count());
                copy_hash(from, &mut self.verdicts_exact, r, mode)
            }
            names::TUNNEL_PEERS => {
                let r = room(cap, self.tunnel_peers.keys().count());
                copy_hash(from, &mut self.tunnel_peers, r, mode)
            }
            names::PEER_CLASSES => {
                let r = room(cap, self.peer_classes.keys().count());
                copy_trie(from, &mut self.peer_classes, r, mode)
            }
            names::VERDICTS => {
                let r = room(cap, self.verdicts.keys().count());
                copy_trie(from, &mut self.verdicts, r, mode)
            }
            names::ROUTES => {
                let r = room(cap, self.routes.keys().count());
                copy_trie(from, &mut self.routes, r, mode)
            }
            _ => Err(format!("map {name} is not carried over")),
        }
    }

    /// Fills `TUNNEL_PEERS` with the nodes the `ROUTES` map leads to.
    fn tunnel_peers_from_routes(&mut self) -> Result<usize, String> {
        let peers: BTreeSet<IpKey> = self
            .routes
            .iter()
            .filter_map(|r| r.ok())
            .map(|(_, route)| *route.node_ip())
            .collect();
        self.sync_tunnel_peers(&peers).map_err(|e| e.to_string())?;
        Ok(peers.len())
    }

    /// Deletes conntrack entries that expired by `now_ns` (`CLOCK_MONOTONIC`), at most `max`
    /// of them. Walks the whole table (to count it). The `SERVICE_NAT` entries of expired
    /// translated flows stay, for that map's LRU to reclaim: while they last, a late reply
    /// of such a flow is recognised and dropped rather than delivered untranslated.
    pub fn sweep_conntrack(&mut self, now_ns: u64, max: usize) -> Result<CtSweep> {
        let timeouts = *self.config()?.ct_timeouts();
        Ok(sweep_table(&mut self.conntrack, &timeouts, now_ns, max))
    }

    /// Entries in the policy and route tables, counted in the maps themselves (not taken
    /// from the controller's state, which may not be all written).
    pub fn table_sizes(&self) -> TableSizes {
        TableSizes {
            endpoints: self.endpoints.keys().filter(|k| k.is_ok()).count(),
            peer_classes: self.peer_classes.keys().filter(|k| k.is_ok()).count()
                + self.peer_hosts.keys().filter(|k| k.is_ok()).count(),
            verdicts: self.verdicts.keys().filter(|k| k.is_ok()).count()
                + self.verdicts_exact.keys().filter(|k| k.is_ok()).count(),
            routes: self.routes.keys().filter(|k| k.is_ok()).count(),
        }
    }

    /// Per-reason drop counters, summed over CPUs.
    pub fn drop_counts(&self) -> Vec<(DropReason, u64)> {
        drop_counts(&self.drops)
    }

    /// Sums over CPUs of the slots `ids` of a per-CPU counter array (ids beyond its capacity
    /// have no slot and are left out).
    pub fn counter_totals(
        map: &PerCpuArray<MapData, u64>,
        ids: impl IntoIterator<Item = u32>,
    ) -> BTreeMap<u32, u64> {
        ids.into_iter()
            .filter_map(|id| Some((id, map.get(&id, 0).ok()?.iter().sum())))
            .collect()
    }
}

/// Removes the keys of a hash map that `stray` picks (best effort: a key that cannot be
/// removed now is picked again by the next sync).
fn remove_hash_keys<K: Pod, V: Pod>(map: &mut HashMap<MapData, K, V>, stray: impl Fn(&K) -> bool) {
    let keys: Vec<K> = map
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| stray(k))
        .collect();
    for k in keys {
        let _ = map.remove(&k);
    }
}

/// [`remove_hash_keys`] for an LPM trie.
fn remove_trie_keys<K: Pod, V: Pod>(
    map: &mut LpmTrie<MapData, K, V>,
    stray: impl Fn(&Key<K>) -> bool,
) {
    let keys: Vec<Key<K>> = map
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| stray(k))
        .collect();
    for k in keys {
        let _ = map.remove(&k);
    }
}

/// What copying a map's entries into another did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// Entries written.
    pub copied: usize,
    /// Entries the target already had (kept as they were).
    pub present: usize,
    /// Entries that did not fit (the target is smaller) or could not be written.
    pub left_out: usize,
    /// Why the first entry left out for an error (not for room) was.
    pub first_error: Option<String>,
}

impl std::fmt::Display for Copied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} copied, {} already there, {} left out",
            self.copied, self.present, self.left_out
        )?;
        if let Some(e) = &self.first_error {
            write!(f, " (first error: {e})")?;
        }
        Ok(())
    }
}

/// How a copy writes an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CopyMode {
    /// Over what the target holds.
    Overwrite,
    /// Only where the target has no entry: what it holds is newer.
    Missing,
}

impl Copied {
    /// Writes one entry through `insert`, if there is room (`room` entries at most).
    fn one(
        &mut self,
        room: usize,
        mode: CopyMode,
        insert: impl FnOnce(u64) -> Result<(), MapError>,
    ) {
        if self.copied >= room {
            self.left_out += 1;
            return;
        }
        let flags = match mode {
            CopyMode::Overwrite => 0,
            CopyMode::Missing => 1, // BPF_NOEXIST
        };
        match insert(flags) {
            Ok(()) => self.copied += 1,
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                self.present += 1
            }
            Err(e) => {
                self.left_out += 1;
                let full = matches!(&e, MapError::SyscallError(s)
                    if matches!(s.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)));
                if !full && self.first_error.is_none() {
                    self.first_error = Some(e.to_string());
                }
            }
        }
    }
}

/// Copies the entries of `from` (a hash or LRU hash map) into `to`, if their key and value
/// sizes agree: at most `room` of them (the target's free room; the rest is left out, and
/// an LRU target would otherwise evict what was copied first).
fn copy_hash<K: Pod, V: Pod>(
    from: aya::maps::Map,
    to: &mut HashMap<MapData, K, V>,
    room: usize,
    mode: CopyMode,
) -> Result<Copied, String> {
    let from: HashMap<MapData, K, V> = from.try_into().map_err(|e: MapError| e.to_string())?;
    let mut out = Copied::default();
    for (k, v) in from.iter().filter_map(|r| r.ok()) {
        out.one(room, mode, |flags| to.insert(k, v, flags));
    }
    Ok(out)
}

/// [`copy_hash`] for LPM tries.
fn copy_trie<K: Pod, V: Pod>(
    from: aya::maps::Map,
    to: &mut LpmTrie<MapData, K, V>,
    room: usize,
    mode: CopyMode,
) -> Result<Copied, String> {
    let from: LpmTrie<MapData, K, V> = from.try_into().map_err(|e: MapError| e.to_string())?;
    let mut out = Copied::default();
    for (k, v) in from.iter().filter_map(|r| r.ok()) {
        out.one(room, mode, |flags| to.insert(&k, v, flags));
    }
    Ok(out)
}

/// Zeroes slot `id` on every CPU. Ids beyond the capacity have no slot: nothing to do.
fn reset_counter(map: &mut PerCpuArray<MapData, u64>, id: u32, name: &'static str) -> Result<()> {
    if id >= map.len() {
        return Ok(());
    }
    let cpus = aya::util::nr_cpus().map_err(|(_, source)| MapsError::Cpus { source })?;
    let zeros =
        PerCpuValues::try_from(vec![0u64; cpus]).map_err(|source| MapsError::Cpus { source })?;
    map.set(id, zeros, 0)
        .map_err(map_err(name, format!("zeroing slot {id}")))
}

/// Zeroes every non-zero counter slot whose id does not mean the same in `state` as in
/// `previous`. Slots that can be non-zero: any, the first time (`previous` empty); after
/// that only those of `previous` and `state` (every other one was zeroed then), so a
/// snapshot reads a few slots instead of the whole array.
fn sync_counters<V: PartialEq>(
    map: &mut PerCpuArray<MapData, u64>,
    state: &BTreeMap<u32, V>,
    previous: &BTreeMap<u32, V>,
    name: &'static str,
) -> Result<()> {
    let keep = |id: &u32| state.get(id).is_some_and(|v| previous.get(id) == Some(v));
    let candidates: Vec<u32> = if previous.is_empty() {
        // Slot 0 is never used.
        (1..map.len()).collect()
    } else {
        previous.keys().chain(state.keys()).copied().collect()
    };
    let stale: Vec<u32> = candidates
        .into_iter()
        .filter(|id| !keep(id))
        .filter(|id| map.get(id, 0).is_ok_and(|v| v.iter().any(|n| *n != 0)))
        .collect();
    for id in stale {
        reset_counter(map, id, name)?;
    }
    Ok(())
}

/// Per-reason drop counters of a node, read from its pinned map (no agent needed).
pub fn pinned_drop_counts(pins: &crate::dataplane::PinLayout) -> Result<Vec<(DropReason, u64)>> {
    let data = crate::dataplane::open_pinned_map(pins, names::DROPS)?;
    let drops: PerCpuArray<MapData, u64> = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
        .map_err(map_err(names::DROPS, "opening"))?;
    Ok(drop_counts(&drops))
}

fn drop_counts(drops: &PerCpuArray<MapData, u64>) -> Vec<(DropReason, u64)> {
    DropReason::ALL
        .iter()
        .map(|r| {
            let n = drops
                .get(&(*r as u32), 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0);
            (*r, n)
        })
        .collect()
}

#[cfg(test)]
mod decode_tests {
    use super::*;

    #[test]
    fn keys_decode_to_what_the_agent_encoded() {
        for net in [
            "10.244.0.0/16",
            "0.0.0.0/0",
            "10.1.2.3/32",
            "2001:db8::/32",
            "::/0",
        ] {
            let net: IpNet = net.parse().unwrap();
            let k = prefix_key(&net);
            assert_eq!(trie_net(k.prefix_len(), k.data()), Some(net), "{net}");
        }
        for m in [
            VerdictMatch {
                rule_set: 3,
                class: 2,
                proto: None,
                ports: None,
            },
            VerdictMatch {
                rule_set: 3,
                class: 2,
                proto: Some(6),
                ports: None,
            },
            VerdictMatch {
                rule_set: 3,
                class: 2,
                proto: Some(17),
                ports: PortPrefix::new(1024, 6),
            },
            VerdictMatch {
                rule_set: 9,
                class: 0,
                proto: Some(132),
                ports: PortPrefix::new(80, 16),
            },
        ] {
            let k = verdict_key(&m);
            assert_eq!(verdict_match(k.prefix_len(), &k.data()), Some(m));
        }
        assert_eq!(verdict_match(65, &VerdictKey::new(1, 1, 6, 0)), None);
        let deny = verdict_entry(&Verdict::deny(7));
        assert_eq!(deny.action, Action::Deny);
        assert_eq!(deny.rule, 7);
    }
}
