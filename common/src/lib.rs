//! Map keys and values shared by weir's eBPF programs and its user-space agent.
//!
//! Every type here is `#[repr(C)]` with explicit padding fields, so a key built in user space
//! hashes to the same bytes as one built in the kernel (uninitialised padding in a hash-map key
//! silently breaks lookups). Fields are private: constructors and accessors own byte order.
//!
//! Addresses are always 16 bytes: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`), so IPv6 is an
//! addition to the maps' contents, not to their layout.
#![no_std]

pub mod config;
pub mod conntrack;
pub mod endpoint;
pub mod event;
pub mod ip;
pub mod policy;
pub mod prefilter;
pub mod route;
pub mod sctp;
pub mod service;

#[cfg(feature = "user")]
mod pod;

/// Version of the map layouts. It is part of every pin path, so an agent with a different
/// layout never reuses maps pinned by another one.
///
/// 2: `RULE_HITS` and `POLICY_DROPS` became per-CPU arrays indexed by id (were per-CPU hashes).
/// 3: `SERVICES` and `SERVICE_NAT` (Service load balancing); `DROPS` has more reasons;
///    `HOST_ADDRS` holds 65,536 addresses (was 256); new map `TUNNEL_PEERS`.
/// 4: `SERVICE_NAT` values carry a second address and port (NodePort source translation);
///    new maps `NODE_NETNS` and `SOCK_REVNAT` (Service translation at the socket, for the
///    node's own processes); new map `AFFINITY` (session affinity with its timeout).
/// 5: `CONNTRACK` is a plain hash (was an LRU hash) whose entries expire; `NODE_CONFIG`
///    carries the conntrack timeouts; `DROPS` has the reason `conntrack_full`.
/// 6: the XDP program on the uplink: `DROPS` has the reasons `tunnel_untrusted` and
///    `prefilter`; new maps `PREFILTER` and `PREFILTER_DROPS`.
/// 7: `PREFILTER` and `PREFILTER_DROPS` hold 131,072 slots (were 65,536).
/// 8: host policy: new maps `HOST_ENDPOINT` and `FAILSAFE`; `DROPS` has the reason
///    `host_policy`.
/// 9: `HOST_ENDPOINT` has two slots: the node's host policy (now with an egress rule set) and
///    its untracked rules, which the XDP program applies.
/// 10: `FRAGMENTS` keys hold a 32-bit identification (IPv6 fragments).
/// 11: `SERVICES` keys node ports on any IPv4 address by `0.0.0.0` (IPv4-mapped), those on
///    any IPv6 address by `::` (was `::` for both); IPv6 frontends are translated.
pub const ABI_VERSION: u32 = 11;

/// Names of the maps, shared by the programs and the loader.
pub mod maps {
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const PEER_CLASSES: &str = "PEER_CLASSES";
    pub const PEER_HOSTS: &str = "PEER_HOSTS";
    pub const VERDICTS: &str = "VERDICTS";
    pub const VERDICTS_EXACT: &str = "VERDICTS_EXACT";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const ROUTES: &str = "ROUTES";
    pub const HOST_ADDRS: &str = "HOST_ADDRS";
    pub const NODE_CONFIG: &str = "NODE_CONFIG";
    pub const DROPS: &str = "DROPS";
    pub const RULE_HITS: &str = "RULE_HITS";
    pub const POLICY_DROPS: &str = "POLICY_DROPS";
    pub const EVENTS: &str = "EVENTS";
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const SERVICES: &str = "SERVICES";
    pub const SERVICE_NAT: &str = "SERVICE_NAT";
    pub const AFFINITY: &str = "AFFINITY";
    pub const TUNNEL_PEERS: &str = "TUNNEL_PEERS";
    pub const NODE_NETNS: &str = "NODE_NETNS";
    pub const SOCK_REVNAT: &str = "SOCK_REVNAT";
    pub const PREFILTER: &str = "PREFILTER";
    pub const PREFILTER_DROPS: &str = "PREFILTER_DROPS";
    pub const HOST_ENDPOINT: &str = "HOST_ENDPOINT";
    pub const FAILSAFE: &str = "FAILSAFE";

    /// Every map the agent pins.
    pub const ALL: &[&str] = &[
        ENDPOINTS,
        PEER_CLASSES,
        PEER_HOSTS,
        VERDICTS,
        VERDICTS_EXACT,
        CONNTRACK,
        ROUTES,
        HOST_ADDRS,
        NODE_CONFIG,
        DROPS,
        RULE_HITS,
        POLICY_DROPS,
        EVENTS,
        FRAGMENTS,
        SERVICES,
        SERVICE_NAT,
        AFFINITY,
        TUNNEL_PEERS,
        NODE_NETNS,
        SOCK_REVNAT,
        PREFILTER,
        PREFILTER_DROPS,
        HOST_ENDPOINT,
        FAILSAFE,
    ];
}

/// Names of the programs in the eBPF object.
pub mod programs {
    /// TC ingress of a pod's host-side veth: traffic the pod sends.
    pub const FROM_POD: &str = "from_pod";
    /// TC egress of a pod's host-side veth: traffic the host stack delivers to the pod.
    pub const TO_POD: &str = "to_pod";
    /// TC ingress of the node's uplink: delivery to local pods.
    pub const FROM_NETWORK: &str = "from_network";
    /// TC egress of the node's uplink: the node's own replies of NodePort flows whose
    /// backend is its own stack (a host-network pod) are translated back, and the node's own
    /// new flows are tracked while a host policy isolates the node (so their replies get in).
    pub const TO_NETWORK: &str = "to_network";
    /// TC ingress of the tunnel device: only other nodes' packets, then as `from_network`.
    pub const FROM_TUNNEL: &str = "from_tunnel";
    /// TC egress of the tunnel device: picks the remote node to encapsulate towards.
    pub const TO_TUNNEL: &str = "to_tunnel";
    /// XDP on the node's uplink: the checks that need no conntrack (malformed headers, the
    /// tunnel's admission, spoofed sources, the prefilter), before `from_network`.
    pub const XDP_UPLINK: &str = "xdp_uplink";
    /// cgroup `connect4`: a TCP or UDP socket of the node's own namespace connecting to a
    /// Service frontend is connected to a backend instead.
    pub const SOCK_CONNECT4: &str = "sock_connect4";
    /// cgroup `sendmsg4`: the same for each datagram of an unconnected UDP socket.
    pub const SOCK_SENDMSG4: &str = "sock_sendmsg4";
    /// cgroup `recvmsg4`: a datagram from a backend appears to come from its frontend.
    pub const SOCK_RECVMSG4: &str = "sock_recvmsg4";
    /// cgroup `getpeername4`: a connected socket's peer is the frontend it asked for.
    pub const SOCK_GETPEERNAME4: &str = "sock_getpeername4";
    /// The IPv6 counterparts of the four above (also IPv6 sockets connecting to IPv4-mapped
    /// addresses).
    pub const SOCK_CONNECT6: &str = "sock_connect6";
    pub const SOCK_SENDMSG6: &str = "sock_sendmsg6";
    pub const SOCK_RECVMSG6: &str = "sock_recvmsg6";
    pub const SOCK_GETPEERNAME6: &str = "sock_getpeername6";

    /// The socket programs, attached to the cgroup v2 root.
    pub const SOCK: &[&str] = &[
        SOCK_CONNECT4,
        SOCK_SENDMSG4,
        SOCK_RECVMSG4,
        SOCK_GETPEERNAME4,
        SOCK_CONNECT6,
        SOCK_SENDMSG6,
        SOCK_RECVMSG6,
        SOCK_GETPEERNAME6,
    ];
}

/// MAC address of every node's VXLAN device. Sharing one address means the inner frame of
/// a tunnelled packet is addressed to the receiving device whichever node sent it, so the
/// overlay needs neither ARP nor an FDB: it is routed, not bridged.
pub const TUNNEL_MAC: [u8; 6] = [0x02, 0x77, 0x65, 0x69, 0x72, 0x00];

/// Source MAC of tunnelled inner frames. It must differ from [`TUNNEL_MAC`]: the receiving
/// VXLAN driver drops frames "from itself" as loops.
pub const TUNNEL_SOURCE_MAC: [u8; 6] = [0x02, 0x77, 0x65, 0x69, 0x72, 0x01];

/// UDP port of the VXLAN tunnel (IANA's): the agent creates the device with it, and the XDP
/// program admits datagrams to it only from other nodes.
pub const TUNNEL_PORT: u16 = 4789;

/// Map capacities. The peer-class map is the one that grows with the cluster.
pub mod capacity {
    pub const ENDPOINTS: u32 = 4096;
    pub const PEER_CLASSES: u32 = 262_144;
    pub const VERDICTS: u32 = 524_288;
    pub const VERDICTS_EXACT: u32 = 524_288;
    pub const PEER_HOSTS: u32 = 262_144;
    pub const CONNTRACK: u32 = 262_144;
    pub const ROUTES: u32 = 16_384;
    /// Room for kube-proxy's IPVS mode, which binds every ClusterIP to the node. Addresses
    /// beyond it are left out (and counted) rather than failing the agent.
    pub const HOST_ADDRS: u32 = 65_536;
    /// Other nodes' addresses; a node has at least one pod CIDR, so no more than `ROUTES`.
    pub const TUNNEL_PEERS: u32 = ROUTES;
    /// Rule ids are per node, dense from 1: one slot per rule the node's pods use.
    pub const RULE_HITS: u32 = 65_536;
    /// Rule-set ids are per node, dense from 1.
    pub const POLICY_DROPS: u32 = 16_384;
    pub const EVENTS_BYTES: u32 = 1 << 20;
    pub const FRAGMENTS: u32 = 8192;
    /// Frontend and backend slots of every Service port the node translates.
    pub const SERVICES: u32 = 262_144;
    /// Two entries per translated flow (original and reply direction).
    pub const SERVICE_NAT: u32 = 262_144;
    /// Clients of Services with session affinity, per Service port.
    pub const AFFINITY: u32 = 65_536;
    /// Sockets of the node's own processes talking to Services, per backend.
    pub const SOCK_REVNAT: u32 = 65_536;
    /// Prefixes of the XDP prefilter, and their per-CPU drop counters (ids from 1, so one
    /// prefix fewer than slots). The trie's lookup cost does not grow with its entries; the
    /// counters cost 8 bytes per slot per CPU.
    pub const PREFILTER: u32 = 131_072;
    /// Failsafe ports, inbound and outbound.
    pub const FAILSAFE: u32 = 256;
}
