//! Connection tracking: a flow is checked against policy once, then takes the fast path.

use crate::ip::IpKey;

/// Key of the `CONNTRACK` hash: the flow as its first packet carried it.
/// Ports are kept in network byte order, exactly as they appear in the packet.
/// For ICMP echo both ports hold the echo identifier, so a reply's reversed key matches.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    saddr: IpKey,
    daddr: IpKey,
    sport_be: u16,
    dport_be: u16,
    proto: u8,
    _pad: [u8; 3],
}

impl CtKey {
    pub const fn new(saddr: IpKey, daddr: IpKey, sport_be: u16, dport_be: u16, proto: u8) -> Self {
        Self {
            saddr,
            daddr,
            sport_be,
            dport_be,
            proto,
            _pad: [0; 3],
        }
    }

    /// The key of the same flow seen from the other end.
    pub const fn reversed(&self) -> Self {
        Self::new(
            self.daddr,
            self.saddr,
            self.dport_be,
            self.sport_be,
            self.proto,
        )
    }

    pub const fn saddr(&self) -> &IpKey {
        &self.saddr
    }
    pub const fn daddr(&self) -> &IpKey {
        &self.daddr
    }
    pub const fn sport(&self) -> u16 {
        u16::from_be(self.sport_be)
    }
    pub const fn dport(&self) -> u16 {
        u16::from_be(self.dport_be)
    }
    pub const fn proto(&self) -> u8 {
        self.proto
    }
}

/// Value of the `CONNTRACK` hash. It expires after the idle timeout of its protocol and
/// state ([`crate::config::CtTimeouts`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry {
    /// `bpf_ktime_get_ns` of the last packet, refreshed at most once a second.
    last_seen_ns: u64,
    /// Policy generation the flow was last checked against; a flow from an older
    /// generation is checked again, so revoking access also cuts established flows.
    policy_gen: u32,
    flags: u32,
    /// Rules that allowed the flow (0 when the direction was not isolated).
    egress_rule: u32,
    ingress_rule: u32,
}

impl CtEntry {
    /// A packet in the reply direction has been seen.
    pub const FLAG_REPLIED: u32 = 1 << 0;
    /// A TCP FIN or RST was seen: the entry expires after the (short) closing timeout.
    pub const FLAG_CLOSING: u32 = 1 << 1;
    /// The flow was admitted by the egress check of a local source pod.
    pub const FLAG_EGRESS_CHECKED: u32 = 1 << 2;
    /// The flow was admitted by the ingress check of a local destination pod.
    pub const FLAG_INGRESS_CHECKED: u32 = 1 << 3;
    /// The flow was translated by a Service on this node: its original-direction packets
    /// are rewritten to the backend, its replies back to the frontend (`SERVICE_NAT`).
    pub const FLAG_SERVICE: u32 = 1 << 4;

    pub const fn new(
        now_ns: u64,
        policy_gen: u32,
        flags: u32,
        egress_rule: u32,
        ingress_rule: u32,
    ) -> Self {
        Self {
            last_seen_ns: now_ns,
            policy_gen,
            flags,
            egress_rule,
            ingress_rule,
        }
    }
    pub const fn last_seen_ns(&self) -> u64 {
        self.last_seen_ns
    }
    pub fn set_last_seen_ns(&mut self, ns: u64) {
        self.last_seen_ns = ns;
    }
    pub const fn policy_gen(&self) -> u32 {
        self.policy_gen
    }
    pub fn set_policy_gen(&mut self, g: u32) {
        self.policy_gen = g;
    }
    pub const fn flags(&self) -> u32 {
        self.flags
    }
    pub fn set_flags(&mut self, f: u32) {
        self.flags = f;
    }
    pub const fn egress_rule(&self) -> u32 {
        self.egress_rule
    }
    pub const fn ingress_rule(&self) -> u32 {
        self.ingress_rule
    }
}

/// Key of the `FRAGMENTS` LRU hash: identifies an IPv4 or IPv6 datagram being fragmented, so
/// that later fragments (which carry no L4 header) are classified with the first one's ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    saddr: IpKey,
    daddr: IpKey,
    /// The identification field as it is in the packet: IPv4's 16 bits (in the first two
    /// bytes, the others zero), IPv6's 32.
    id: u32,
    proto: u8,
    _pad: [u8; 3],
}

impl FragKey {
    /// For an IPv4 datagram, whose identification is 16 bits.
    pub const fn v4(saddr: IpKey, daddr: IpKey, id_be: u16, proto: u8) -> Self {
        let [a, b] = id_be.to_ne_bytes();
        Self::new(saddr, daddr, u32::from_ne_bytes([a, b, 0, 0]), proto)
    }
    /// For an IPv6 datagram: `id` is the fragment header's identification, read natively.
    pub const fn new(saddr: IpKey, daddr: IpKey, id: u32, proto: u8) -> Self {
        Self {
            saddr,
            daddr,
            id,
            proto,
            _pad: [0; 3],
        }
    }
}

/// Value of the `FRAGMENTS` LRU hash: the ports of the datagram's first fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragPorts {
    pub sport_be: u16,
    pub dport_be: u16,
}
