//! Policy maps: address → peer class, and (rule set, peer class, protocol, port) → verdict.
//!
//! Per packet the datapath does one LPM lookup to classify the peer address and one LPM lookup
//! for the verdict, whatever the number of policies, rules or pods. The controller compiles
//! everything else (selectors, unions of policies, named ports, port ranges) ahead of time.

/// Rule-set id meaning "no policy selects this endpoint in this direction": allow.
pub const NOT_ISOLATED: u32 = 0;

/// Rule-set id with no verdicts at all: every new flow is denied. The agent points an
/// endpoint at it in place of a rule set whose entries it could not write in full (the
/// controller's ids are dense from 1 and never reach it).
pub const FAIL_CLOSED: u32 = u32::MAX;

/// Class of addresses no peer of any local policy matches (no entry in `PEER_CLASSES`).
pub const CLASS_UNMATCHED: u32 = 0;

/// Value of the `PEER_CLASSES` LPM trie (key data: [`crate::ip::IpKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PeerClass {
    class: u32,
}

impl PeerClass {
    pub const fn new(class: u32) -> Self {
        Self { class }
    }
    pub const fn class(&self) -> u32 {
        self.class
    }
}

/// Protocol numbers used in verdict keys.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// Key data of the `VERDICTS` LPM trie. All fields big-endian so that a prefix length selects
/// "this rule set and class" (64 bits), "… and this protocol" (72) or "… and these ports"
/// (80 + port prefix bits). The pad byte is always zero and sits inside any port prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VerdictKey {
    policy: [u8; 4],
    class: [u8; 4],
    proto: u8,
    _pad: u8,
    port: [u8; 2],
}

impl VerdictKey {
    /// Prefix bits covering rule set and class: matches every protocol and port.
    pub const PREFIX_ANY_PROTO: u32 = 64;
    /// Prefix bits covering rule set, class and protocol: matches every port.
    pub const PREFIX_ANY_PORT: u32 = 72;
    /// Prefix bits before the port: add the port prefix length (0..=16).
    pub const PREFIX_PORT_BASE: u32 = 80;
    /// Full key.
    pub const PREFIX_FULL: u32 = 96;

    pub const fn new(policy: u32, class: u32, proto: u8, port: u16) -> Self {
        Self {
            policy: policy.to_be_bytes(),
            class: class.to_be_bytes(),
            proto,
            _pad: 0,
            port: port.to_be_bytes(),
        }
    }
    pub const fn policy(&self) -> u32 {
        u32::from_be_bytes(self.policy)
    }
    pub const fn class(&self) -> u32 {
        u32::from_be_bytes(self.class)
    }
    pub const fn proto(&self) -> u8 {
        self.proto
    }
    pub const fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }
}

/// Value of the `VERDICTS` LPM trie. The longest matching prefix decides, so a compiled
/// deny for a narrower port range can override an allow for the whole protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Verdict {
    action: u8,
    _pad: [u8; 3],
    /// Rule that produced the verdict, for counters and flow events.
    rule: u32,
}

impl Verdict {
    pub const ALLOW: u8 = 1;
    pub const DENY: u8 = 2;

    pub const fn allow(rule: u32) -> Self {
        Self {
            action: Self::ALLOW,
            _pad: [0; 3],
            rule,
        }
    }
    pub const fn deny(rule: u32) -> Self {
        Self {
            action: Self::DENY,
            _pad: [0; 3],
            rule,
        }
    }
    pub const fn is_allow(&self) -> bool {
        self.action == Self::ALLOW
    }
    pub const fn action(&self) -> u8 {
        self.action
    }
    pub const fn rule(&self) -> u32 {
        self.rule
    }
}
