//! The maps. The agent pins every one of them under a versioned path, so they outlive the
//! agent (hitless restarts and upgrades); tests load them unpinned.

use aya_ebpf::{
    bindings::{bpf_fib_lookup, bpf_tunnel_key},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use weir_common::{
    capacity,
    config::NodeConfig,
    conntrack::{CtEntry, CtKey, FragKey, FragPorts},
    endpoint::{EndpointInfo, FailsafeKey, HostAddr},
    event::DropReason,
    ip::IpKey,
    policy::{PeerClass, Verdict, VerdictKey},
    prefilter::PrefilterEntry,
    route::{RouteEntry, TunnelPeer},
    service::{AffinityKey, AffinityValue, NatEntry, ServiceKey, ServiceValue, SockRevKey},
};

#[map]
pub static ENDPOINTS: HashMap<IpKey, EndpointInfo> =
    HashMap::with_max_entries(capacity::ENDPOINTS, 0);

#[map]
pub static HOST_ADDRS: HashMap<IpKey, HostAddr> =
    HashMap::with_max_entries(capacity::HOST_ADDRS, 0);

/// The node itself as a policy endpoint: its `HostPolicy` rule sets
/// ([`EndpointInfo::HOST_SLOT`]) and its untracked rules ([`EndpointInfo::HOST_UNTRACKED_SLOT`]).
#[map]
pub static HOST_ENDPOINT: Array<EndpointInfo> = Array::with_max_entries(2, 0);

/// Ports no host policy closes.
#[map]
pub static FAILSAFE: HashMap<FailsafeKey, u8> = HashMap::with_max_entries(capacity::FAILSAFE, 0);

#[map]
pub static PEER_CLASSES: LpmTrie<IpKey, PeerClass> =
    LpmTrie::with_max_entries(capacity::PEER_CLASSES, 0);

/// Full-length (/32, /128) entries of the peer classes: one hash lookup for the common case
/// (a pod's address), the trie only for prefixes.
#[map]
pub static PEER_HOSTS: HashMap<IpKey, PeerClass> =
    HashMap::with_max_entries(capacity::PEER_HOSTS, 0);

/// Full-length verdict keys (a single port of a protocol): one hash lookup; the trie holds
/// only the shorter matches (port ranges, whole protocols, every protocol).
#[map]
pub static VERDICTS_EXACT: HashMap<VerdictKey, Verdict> =
    HashMap::with_max_entries(capacity::VERDICTS_EXACT, 0);

#[map]
pub static VERDICTS: LpmTrie<VerdictKey, Verdict> =
    LpmTrie::with_max_entries(capacity::VERDICTS, 0);

/// A plain hash, not an LRU one: the kernel never evicts a live flow to make room for a new
/// one (one pod's churn cannot break other pods' established flows). Entries expire after
/// their idle timeout (`CtTimeouts`), are treated as absent from then on, and the agent's
/// sweep deletes them; a new flow that finds the table full is dropped (`conntrack_full`).
#[map]
pub static CONNTRACK: HashMap<CtKey, CtEntry> = HashMap::with_max_entries(capacity::CONNTRACK, 0);

#[map]
pub static FRAGMENTS: LruHashMap<FragKey, FragPorts> =
    LruHashMap::with_max_entries(capacity::FRAGMENTS, 0);

/// Service frontends (slot 0) and their backends (slots 1..=n).
#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(capacity::SERVICES, 0);

/// Translations of Service flows, both directions (see `nat`).
#[map]
pub static SERVICE_NAT: LruHashMap<CtKey, NatEntry> =
    LruHashMap::with_max_entries(capacity::SERVICE_NAT, 0);

/// The frontend each socket of the node's own processes asked for, per backend it was sent
/// to (see `sock`).
#[map]
pub static SOCK_REVNAT: LruHashMap<SockRevKey, NatEntry> =
    LruHashMap::with_max_entries(capacity::SOCK_REVNAT, 0);

/// Cookie of the node's network namespace: the socket hooks, attached to a cgroup shared
/// with other namespaces, act on that namespace's sockets only (0: on none).
#[map]
pub static NODE_NETNS: Array<u64> = Array::with_max_entries(1, 0);

/// Session affinity: the backend each client of a Service port sticks to, and when it last
/// opened a flow.
#[map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(capacity::AFFINITY, 0);

#[map]
pub static ROUTES: LpmTrie<IpKey, RouteEntry> = LpmTrie::with_max_entries(capacity::ROUTES, 0);

/// The other nodes' addresses: the only outer sources the tunnel accepts.
#[map]
pub static TUNNEL_PEERS: HashMap<IpKey, TunnelPeer> =
    HashMap::with_max_entries(capacity::TUNNEL_PEERS, 0);

#[map]
pub static NODE_CONFIG: Array<NodeConfig> = Array::with_max_entries(1, 0);

#[map]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DropReason::COUNT, 0);

/// New flows decided per rule, indexed by rule id (ids are small and dense per node):
/// admitted by an allowing rule, or denied by a ClusterNetworkPolicy Deny rule. An array
/// rather than a hash: on a new flow from a cold peer every cache line counts, and an array
/// slot is one load away from its id.
#[map]
pub static RULE_HITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(capacity::RULE_HITS, 0);

/// Policy drops that no rule decided (nothing allowed the flow), per rule set, indexed by
/// rule-set id.
#[map]
pub static POLICY_DROPS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(capacity::POLICY_DROPS, 0);

/// Per-CPU room for flow keys too large for the programs' 512-byte stack (not pinned: it
/// holds nothing between packets).
#[map]
pub static SCRATCH_KEYS: PerCpuArray<CtKey> = PerCpuArray::with_max_entries(3, 0);

/// Per-CPU room for the tunnel metadata of a decapsulated packet (not pinned either).
#[map]
pub static SCRATCH_TUNNEL_KEY: PerCpuArray<bpf_tunnel_key> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU room for a FIB lookup's parameters (not pinned either).
#[map]
pub static SCRATCH_FIB: PerCpuArray<bpf_fib_lookup> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU room where the IPv6 parser leaves the outcome of its extension-header walk
/// (upper-layer offset, next header, fragment offset and flags, identification) and reads
/// it back (not pinned either). Read back from a map, the outcome is the same unknown to the
/// verifier whichever way the walk went, so the rest of a program is verified once rather
/// than once per way through the walk.
#[map]
pub static SCRATCH_IPV6_WALK: PerCpuArray<[u32; 4]> = PerCpuArray::with_max_entries(1, 0);

/// The XDP prefilter: sources in these prefixes are dropped on the uplink (see `xdp`).
#[map]
pub static PREFILTER: LpmTrie<IpKey, PrefilterEntry> =
    LpmTrie::with_max_entries(capacity::PREFILTER, 0);

/// Prefilter drops per entry, indexed by the entry's id (per CPU: a flood from one prefix
/// must not make every CPU fight over one counter's cache line).
#[map]
pub static PREFILTER_DROPS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(capacity::PREFILTER, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(capacity::EVENTS_BYTES, 0);

#[inline(always)]
pub fn node_config() -> NodeConfig {
    match NODE_CONFIG.get(0) {
        Some(c) => *c,
        None => NodeConfig::new(0, 0, 0),
    }
}

/// The node's flags (`NodeConfig::FLAG_*`) alone, without copying the rest of its settings.
#[inline(always)]
pub fn node_flags() -> u32 {
    NODE_CONFIG.get(0).map_or(0, |c| c.flags())
}

/// Adds one to slot `index` of a per-CPU counter array (ids beyond its capacity are not
/// counted).
#[inline(always)]
pub fn count(map: &PerCpuArray<u64>, index: u32) {
    if let Some(v) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU value, only this CPU writes it.
        unsafe { *v += 1 };
    }
}
