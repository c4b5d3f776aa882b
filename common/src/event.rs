//! Why packets are dropped, and the flow events sent over the `EVENTS` ring buffer.

use crate::ip::IpKey;

/// Index into the per-CPU `DROPS` counter array, and the reason carried by drop events.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Packet too short or malformed headers.
    Malformed = 1,
    /// Source address or MAC is not the pod's own, or a packet from the network claims one
    /// of this node's addresses or a local pod's.
    Spoofed = 2,
    /// Denied by the source pod's egress policy.
    PolicyEgress = 3,
    /// Denied by the destination pod's ingress policy.
    PolicyIngress = 4,
    /// An established flow that a policy change no longer allows.
    PolicyRevoked = 5,
    /// Ethertype the datapath does not forward for pods (e.g. IPv6 before dual stack).
    UnsupportedL3 = 6,
    /// A redirect helper failed.
    RedirectFailed = 7,
    /// No route to the destination node.
    NoRoute = 8,
    /// A new flow to a Service that has no usable backend on this node.
    NoBackend = 9,
    /// A packet of a translated Service flow whose translation is gone (evicted, or the
    /// backend was removed).
    ServiceNatLost = 10,
    /// A VXLAN packet whose outer source is not another node.
    UnknownTunnelPeer = 11,
    /// A new flow that conntrack had no room for (the table is full of live flows). Only
    /// the new flow is refused: established flows keep their entries.
    ConntrackFull = 12,
    /// A VXLAN datagram to this node whose outer source is not another node, dropped by the
    /// XDP program on the uplink before the kernel decapsulates it (`unknown_tunnel_peer` is
    /// the same check in TC, where XDP did not run).
    TunnelUntrusted = 13,
    /// A packet from a source in the XDP prefilter.
    Prefilter = 14,
    /// A new flow to one of this node's own addresses that no `HostPolicy` selecting the
    /// node allows (and not to a failsafe port).
    HostPolicy = 15,
}

impl DropReason {
    /// Size of the `DROPS` array (reasons are 1-based; slot 0 stays unused).
    pub const COUNT: u32 = 16;
    pub const ALL: [DropReason; 15] = [
        DropReason::Malformed,
        DropReason::Spoofed,
        DropReason::PolicyEgress,
        DropReason::PolicyIngress,
        DropReason::PolicyRevoked,
        DropReason::UnsupportedL3,
        DropReason::RedirectFailed,
        DropReason::NoRoute,
        DropReason::NoBackend,
        DropReason::ServiceNatLost,
        DropReason::UnknownTunnelPeer,
        DropReason::ConntrackFull,
        DropReason::TunnelUntrusted,
        DropReason::Prefilter,
        DropReason::HostPolicy,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Spoofed => "spoofed",
            DropReason::PolicyEgress => "policy_egress",
            DropReason::PolicyIngress => "policy_ingress",
            DropReason::PolicyRevoked => "policy_revoked",
            DropReason::UnsupportedL3 => "unsupported_l3",
            DropReason::RedirectFailed => "redirect_failed",
            DropReason::NoRoute => "no_route",
            DropReason::NoBackend => "service_no_backend",
            DropReason::ServiceNatLost => "service_nat_lost",
            DropReason::UnknownTunnelPeer => "unknown_tunnel_peer",
            DropReason::ConntrackFull => "conntrack_full",
            DropReason::TunnelUntrusted => "tunnel_untrusted",
            DropReason::Prefilter => "prefilter",
            DropReason::HostPolicy => "host_policy",
        }
    }

    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(DropReason::Malformed),
            2 => Some(DropReason::Spoofed),
            3 => Some(DropReason::PolicyEgress),
            4 => Some(DropReason::PolicyIngress),
            5 => Some(DropReason::PolicyRevoked),
            6 => Some(DropReason::UnsupportedL3),
            7 => Some(DropReason::RedirectFailed),
            8 => Some(DropReason::NoRoute),
            9 => Some(DropReason::NoBackend),
            10 => Some(DropReason::ServiceNatLost),
            11 => Some(DropReason::UnknownTunnelPeer),
            12 => Some(DropReason::ConntrackFull),
            13 => Some(DropReason::TunnelUntrusted),
            14 => Some(DropReason::Prefilter),
            15 => Some(DropReason::HostPolicy),
            _ => None,
        }
    }
}

/// A flow event: every drop, and a sample of newly admitted flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEvent {
    pub ts_ns: u64,
    pub saddr: IpKey,
    pub daddr: IpKey,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// [`FlowEvent::VERDICT_ALLOW`] or [`FlowEvent::VERDICT_DROP`].
    pub verdict: u8,
    pub _pad: [u8; 2],
    /// A [`DropReason`] for drops, 0 otherwise.
    pub reason: u32,
    /// Interface the packet was seen on.
    pub ifindex: u32,
    /// Rule set that decided (0 if none).
    pub policy: u32,
    /// Rule that decided (0 if none, e.g. a default deny).
    pub rule: u32,
}

impl FlowEvent {
    pub const VERDICT_ALLOW: u8 = 1;
    pub const VERDICT_DROP: u8 = 2;
}
