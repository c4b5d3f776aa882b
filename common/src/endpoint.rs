//! Local endpoints: pods on this node, keyed by address.

/// Value of the `ENDPOINTS` hash map (key: the pod's [`crate::ip::IpKey`]).
///
/// The agent writes one entry per pod address on its node. The entry serves three purposes:
/// anti-spoofing (a packet entering from a pod's veth must carry that pod's address and MAC),
/// local delivery (where to redirect a packet for this address) and policy (which compiled
/// rule set isolates the pod in each direction).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndpointInfo {
    /// Host-side veth of the pod.
    ifindex: u32,
    /// Compiled ingress rule set, [`crate::policy::NOT_ISOLATED`] when no policy selects the pod.
    ingress_policy: u32,
    /// Compiled egress rule set, likewise.
    egress_policy: u32,
    flags: u32,
    /// MAC of the pod's interface.
    pod_mac: [u8; 6],
    /// MAC of the host-side veth: the pod's gateway.
    gateway_mac: [u8; 6],
    _pad: [u8; 4],
}

impl EndpointInfo {
    /// The controller has not yet told the agent which policies select this pod.
    pub const FLAG_POLICY_PENDING: u32 = 1 << 0;
    /// The node itself (`HOST_ENDPOINT`): its rule sets are its `HostPolicy`s'.
    pub const FLAG_HOST: u32 = 1 << 1;

    /// `HOST_ENDPOINT`'s slot for the node's host policy (tracked, in TC).
    pub const HOST_SLOT: u32 = 0;
    /// `HOST_ENDPOINT`'s slot for the node's untracked rules (in XDP): their rule set is the
    /// ingress one.
    pub const HOST_UNTRACKED_SLOT: u32 = 1;

    /// The node as a policy endpoint: isolated by rule sets `ingress` and `egress`
    /// ([`crate::policy::NOT_ISOLATED`]: no host policy isolates that direction).
    pub const fn host(ingress: u32, egress: u32) -> Self {
        Self {
            ifindex: 0,
            ingress_policy: ingress,
            egress_policy: egress,
            flags: Self::FLAG_HOST,
            pod_mac: [0; 6],
            gateway_mac: [0; 6],
            _pad: [0; 4],
        }
    }

    pub const fn is_host(&self) -> bool {
        self.flags & Self::FLAG_HOST != 0
    }

    pub const fn new(ifindex: u32, pod_mac: [u8; 6], gateway_mac: [u8; 6]) -> Self {
        Self {
            ifindex,
            ingress_policy: crate::policy::NOT_ISOLATED,
            egress_policy: crate::policy::NOT_ISOLATED,
            flags: Self::FLAG_POLICY_PENDING,
            pod_mac,
            gateway_mac,
            _pad: [0; 4],
        }
    }

    /// Policy still pending, and every new flow in both directions denied meanwhile (the
    /// reserved rule set [`crate::policy::FAIL_CLOSED`]): a pod that starts before the
    /// controller names its policies runs isolated, not open.
    pub const fn failing_closed_until_assigned(mut self) -> Self {
        self.ingress_policy = crate::policy::FAIL_CLOSED;
        self.egress_policy = crate::policy::FAIL_CLOSED;
        self.flags |= Self::FLAG_POLICY_PENDING;
        self
    }

    pub const fn with_policies(mut self, ingress: u32, egress: u32) -> Self {
        self.ingress_policy = ingress;
        self.egress_policy = egress;
        self.flags &= !Self::FLAG_POLICY_PENDING;
        self
    }

    pub const fn ifindex(&self) -> u32 {
        self.ifindex
    }
    pub const fn ingress_policy(&self) -> u32 {
        self.ingress_policy
    }
    pub const fn egress_policy(&self) -> u32 {
        self.egress_policy
    }
    pub const fn flags(&self) -> u32 {
        self.flags
    }
    pub const fn policy_pending(&self) -> bool {
        self.flags & Self::FLAG_POLICY_PENDING != 0
    }
    pub const fn pod_mac(&self) -> [u8; 6] {
        self.pod_mac
    }
    pub const fn gateway_mac(&self) -> [u8; 6] {
        self.gateway_mac
    }
}

/// Value of the `HOST_ADDRS` hash map (key: an address of this node).
///
/// Traffic from the node to its own pods is always allowed (kubelet probes), so the
/// ingress path checks the source against this map before policy.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HostAddr {
    flags: u32,
}

impl HostAddr {
    pub const fn new() -> Self {
        Self { flags: 0 }
    }
}

/// Key of the `FAILSAFE` hash map: a port no `HostPolicy` can close. `inbound` (1): a
/// connection to this port on the node; outbound (0): replies from this port of a remote
/// host, for the node's own connections to it (its control plane: the API server, DNS).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FailsafeKey {
    port: u16,
    proto: u8,
    inbound: u8,
}

impl FailsafeKey {
    pub const fn new(proto: u8, port: u16, inbound: bool) -> Self {
        Self {
            port,
            proto,
            inbound: inbound as u8,
        }
    }
    pub const fn proto(&self) -> u8 {
        self.proto
    }
    pub const fn port(&self) -> u16 {
        self.port
    }
    pub const fn inbound(&self) -> bool {
        self.inbound != 0
    }
}
