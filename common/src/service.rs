//! Services: the frontend table the programs translate new flows with, and the NAT entries
//! that remember each translated flow.
//!
//! Layout, after Cilium's service map: one hash keyed by (frontend address, port, protocol,
//! slot). Slot 0 is the frontend itself and holds the number of backends; slots 1..=n hold
//! one backend each. A new flow costs two lookups whatever the number of Services or
//! backends: the frontend, then the slot its hash picks.

use crate::ip::IpKey;

/// Key of the `SERVICES` hash.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    /// The ClusterIP, or for a NodePort on any of the node's addresses that family's "any"
    /// ([`IpKey::ANY_V4`] or [`IpKey::UNSPECIFIED`], see [`IpKey::any_like`]).
    addr: IpKey,
    port_be: u16,
    proto: u8,
    _pad: u8,
    /// 0: the frontend; 1..=n: the backends.
    slot: u32,
}

impl ServiceKey {
    pub const fn new(addr: IpKey, port_be: u16, proto: u8, slot: u32) -> Self {
        Self {
            addr,
            port_be,
            proto,
            _pad: 0,
            slot,
        }
    }
    pub const fn addr(&self) -> &IpKey {
        &self.addr
    }
    pub const fn port(&self) -> u16 {
        u16::from_be(self.port_be)
    }
    pub const fn proto(&self) -> u8 {
        self.proto
    }
    pub const fn slot(&self) -> u32 {
        self.slot
    }
    /// The key of backend slot `slot` of the same frontend.
    pub const fn with_slot(&self, slot: u32) -> Self {
        Self::new(self.addr, self.port_be, self.proto, slot)
    }
}

/// Value of the `SERVICES` hash: a frontend (slot 0) or one of its backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Backend slots: the backend's address. Frontend with [`Self::FLAG_CLUSTER_FRONTEND`]:
    /// the address of the frontend clients inside the cluster use instead; other frontends:
    /// unused (zero).
    backend: IpKey,
    /// Backend slots: the target port. Frontend with [`Self::FLAG_CLUSTER_FRONTEND`]: that
    /// frontend's port; other frontends: unused (zero).
    backend_port_be: u16,
    flags: u16,
    /// Frontend: the number of backend slots (0: the Service has no backend here).
    count: u32,
    /// Id of the Service port (flow events and counters name the Service through it).
    id: u32,
    /// Frontend with `FLAG_AFFINITY`: seconds a client sticks to its backend.
    affinity_s: u32,
}

impl ServiceValue {
    /// `sessionAffinity: ClientIP`: a client's flows go to one backend.
    pub const FLAG_AFFINITY: u16 = 1 << 0;
    /// NodePort with `externalTrafficPolicy: Cluster`.
    pub const FLAG_MASQUERADE_EXTERNAL: u16 = 1 << 1;
    /// NodePort with `externalTrafficPolicy: Local`: its own slots (this node's backends)
    /// serve clients outside the cluster; pods and nodes are served by the frontend its
    /// backend fields name (the Service port's ClusterIP, same protocol), as kube-proxy
    /// serves them.
    pub const FLAG_CLUSTER_FRONTEND: u16 = 1 << 2;

    pub const fn frontend(id: u32, count: u32, flags: u16, affinity_s: u32) -> Self {
        Self {
            backend: IpKey::UNSPECIFIED,
            backend_port_be: 0,
            flags,
            count,
            id,
            affinity_s,
        }
    }
    /// This frontend, with [`Self::FLAG_CLUSTER_FRONTEND`] naming `addr`:`port` as the
    /// frontend of clients inside the cluster.
    pub const fn with_cluster_frontend(self, addr: IpKey, port: u16) -> Self {
        Self {
            backend: addr,
            backend_port_be: port.to_be(),
            flags: self.flags | Self::FLAG_CLUSTER_FRONTEND,
            ..self
        }
    }
    /// The frontend clients inside the cluster use instead of this one (address, port in
    /// network byte order), if it names one.
    pub const fn cluster_frontend(&self) -> Option<(&IpKey, u16)> {
        if self.flags & Self::FLAG_CLUSTER_FRONTEND != 0 {
            Some((&self.backend, self.backend_port_be))
        } else {
            None
        }
    }
    pub const fn backend(id: u32, addr: IpKey, port: u16) -> Self {
        Self {
            backend: addr,
            backend_port_be: port.to_be(),
            flags: 0,
            count: 0,
            id,
            affinity_s: 0,
        }
    }
    pub const fn backend_addr(&self) -> &IpKey {
        &self.backend
    }
    pub const fn backend_port_be(&self) -> u16 {
        self.backend_port_be
    }
    pub const fn backend_port(&self) -> u16 {
        u16::from_be(self.backend_port_be)
    }
    pub const fn flags(&self) -> u16 {
        self.flags
    }
    pub const fn count(&self) -> u32 {
        self.count
    }
    pub const fn id(&self) -> u32 {
        self.id
    }
    pub const fn affinity_s(&self) -> u32 {
        self.affinity_s
    }
}

/// Value of the `SERVICE_NAT` LRU hash, keyed by a [`crate::conntrack::CtKey`]. A translated
/// flow has two entries: under its original key (client → frontend) the backend it was
/// given, and under its reply key (backend → client) the frontend the reply must appear to
/// come from.
///
/// A flow that arrived from outside for a NodePort and went on to a backend on another node
/// is also source-translated to this node's address (so the backend's replies come back
/// through this node): its entries have [`NatEntry::FLAG_SNAT`], and `other` holds the
/// second address and port to write — the node's address and the port chosen for the flow
/// (original direction, the new source), or the client's (reply direction, the new
/// destination).
///
/// A flow from the network whose backend is one of this node's own addresses (a
/// host-network pod) goes up the node's stack; the reply entry of such a flow has
/// [`NatEntry::FLAG_HOST`]: the stack's replies are rewritten as they leave the node, on the
/// uplink's or the tunnel device's egress.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatEntry {
    /// Original direction: the backend (new destination). Reply: the frontend (new source).
    addr: IpKey,
    port_be: u16,
    other_port_be: u16,
    /// Id of the Service port.
    service: u32,
    other: IpKey,
    flags: u32,
}

impl NatEntry {
    /// The entry is keyed by the reply direction (backend → client).
    pub const FLAG_REPLY: u32 = 1 << 0;
    /// The source (original direction) or destination (reply) is translated too.
    pub const FLAG_SNAT: u32 = 1 << 1;
    /// Reply direction: the backend is this node's own stack, whose replies are rewritten
    /// on their way out of the node.
    pub const FLAG_HOST: u32 = 1 << 2;

    /// The original direction of a flow: its backend.
    pub const fn original(addr: IpKey, port_be: u16, service: u32) -> Self {
        Self::new(addr, port_be, service, IpKey::UNSPECIFIED, 0, 0)
    }
    /// The reply direction of a flow: its frontend.
    pub const fn reply(addr: IpKey, port_be: u16, service: u32) -> Self {
        Self::new(
            addr,
            port_be,
            service,
            IpKey::UNSPECIFIED,
            0,
            Self::FLAG_REPLY,
        )
    }
    pub const fn new(
        addr: IpKey,
        port_be: u16,
        service: u32,
        other: IpKey,
        other_port_be: u16,
        flags: u32,
    ) -> Self {
        Self {
            addr,
            port_be,
            other_port_be,
            service,
            other,
            flags,
        }
    }
    pub const fn addr(&self) -> &IpKey {
        &self.addr
    }
    pub const fn port_be(&self) -> u16 {
        self.port_be
    }
    pub const fn service(&self) -> u32 {
        self.service
    }
    pub const fn other(&self) -> &IpKey {
        &self.other
    }
    pub const fn other_port_be(&self) -> u16 {
        self.other_port_be
    }
    pub const fn flags(&self) -> u32 {
        self.flags
    }
    pub const fn is_reply(&self) -> bool {
        self.flags & Self::FLAG_REPLY != 0
    }
    pub const fn is_snat(&self) -> bool {
        self.flags & Self::FLAG_SNAT != 0
    }
    pub const fn is_host(&self) -> bool {
        self.flags & Self::FLAG_HOST != 0
    }
}

/// Key of the `SOCK_REVNAT` LRU hash: a socket (its cookie) and the backend the socket hooks
/// sent it to. The value, a [`NatEntry`], is the frontend the socket asked for: what
/// `recvmsg` and `getpeername` report instead of the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRevKey {
    cookie: u64,
    addr: IpKey,
    port_be: u16,
    _pad: [u16; 3],
}

impl SockRevKey {
    pub const fn new(cookie: u64, addr: IpKey, port_be: u16) -> Self {
        Self {
            cookie,
            addr,
            port_be,
            _pad: [0; 3],
        }
    }
    pub const fn cookie(&self) -> u64 {
        self.cookie
    }
    pub const fn addr(&self) -> &IpKey {
        &self.addr
    }
    pub const fn port(&self) -> u16 {
        u16::from_be(self.port_be)
    }
}

/// Key of the `AFFINITY` LRU hash: a client of a Service port under `sessionAffinity:
/// ClientIP`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    /// Id of the Service port.
    service: u32,
    client: IpKey,
}

impl AffinityKey {
    pub const fn new(service: u32, client: IpKey) -> Self {
        Self { service, client }
    }
    pub const fn service(&self) -> u32 {
        self.service
    }
    pub const fn client(&self) -> &IpKey {
        &self.client
    }
}

/// Value of the `AFFINITY` LRU hash: the backend a client sticks to, and when it last
/// opened a flow to it (the timeout runs from there, as with kube-proxy).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityValue {
    backend: IpKey,
    backend_port_be: u16,
    _pad: u16,
    /// The backend's slot when it was picked (checked against the slot's content on use).
    slot: u32,
    last_ns: u64,
}

impl AffinityValue {
    pub const fn new(backend: IpKey, backend_port_be: u16, slot: u32, last_ns: u64) -> Self {
        Self {
            backend,
            backend_port_be,
            _pad: 0,
            slot,
            last_ns,
        }
    }
    pub const fn backend(&self) -> &IpKey {
        &self.backend
    }
    pub const fn backend_port_be(&self) -> u16 {
        self.backend_port_be
    }
    pub const fn slot(&self) -> u32 {
        self.slot
    }
    pub const fn last_ns(&self) -> u64 {
        self.last_ns
    }
}
