//! Node-wide settings, the single entry of the `NODE_CONFIG` array.

/// Value of `NODE_CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeConfig {
    /// Bumped by the agent after every change to policy maps; conntrack entries stamped with
    /// an older generation are re-checked on their next packet.
    policy_gen: u32,
    flags: u32,
    /// Emit a flow event for one in `sample_rate` new flows (0: none). Drops are always sent.
    sample_rate: u32,
    /// VXLAN network identifier for the tunnel device.
    vni: u32,
    /// How long an idle conntrack entry stays valid.
    ct: CtTimeouts,
}

impl NodeConfig {
    /// Hand every packet to the host stack after policy instead of redirecting it (another
    /// Service proxy, e.g. kube-proxy, translates in the host's netfilter and must see both
    /// directions of a flow).
    pub const FLAG_HOST_PATH: u32 = 1 << 0;
    /// An untracked host-policy rule set is installed (`HOST_ENDPOINT`'s second slot): the
    /// XDP program looks it up. Clear: the XDP program does not look. The agent sets the bit
    /// after writing the slot and clears it before clearing the slot, so a packet never
    /// meets a half-installed state other than "not yet" or "no longer".
    pub const FLAG_HOST_UNTRACKED: u32 = 1 << 1;
    /// `SERVICES` may hold frontends on one of this node's addresses (host ports with a
    /// `hostIP`): a packet from the network to the node looks up its exact destination before
    /// the unspecified address. Clear: only the unspecified address is looked up.
    pub const FLAG_HOST_ADDR_FRONTENDS: u32 = 1 << 2;
    /// The bits the agent derives from the maps' contents (kept across an agent restart).
    pub const DERIVED_FLAGS: u32 = Self::FLAG_HOST_UNTRACKED | Self::FLAG_HOST_ADDR_FRONTENDS;

    pub const fn new(policy_gen: u32, sample_rate: u32, vni: u32) -> Self {
        Self {
            policy_gen,
            flags: 0,
            sample_rate,
            vni,
            ct: CtTimeouts::DEFAULT,
        }
    }
    pub const fn with_ct_timeouts(mut self, ct: CtTimeouts) -> Self {
        self.ct = ct;
        self
    }
    pub const fn ct_timeouts(&self) -> &CtTimeouts {
        &self.ct
    }
    pub const fn policy_gen(&self) -> u32 {
        self.policy_gen
    }
    pub fn set_policy_gen(&mut self, g: u32) {
        self.policy_gen = g;
    }
    pub const fn sample_rate(&self) -> u32 {
        self.sample_rate
    }
    pub const fn vni(&self) -> u32 {
        self.vni
    }
    pub const fn with_flags(mut self, flags: u32) -> Self {
        self.flags = flags;
        self
    }
    pub const fn flags(&self) -> u32 {
        self.flags
    }
    pub const fn host_path(&self) -> bool {
        self.flags & Self::FLAG_HOST_PATH != 0
    }
    pub const fn host_untracked(&self) -> bool {
        self.flags & Self::FLAG_HOST_UNTRACKED != 0
    }
    pub const fn host_addr_frontends(&self) -> bool {
        self.flags & Self::FLAG_HOST_ADDR_FRONTENDS != 0
    }
    /// These flags with `bits` set (`on`) or cleared.
    pub const fn with_flag(mut self, bits: u32, on: bool) -> Self {
        if on {
            self.flags |= bits;
        } else {
            self.flags &= !bits;
        }
        self
    }
}

/// Idle timeouts of conntrack entries, in seconds, per protocol and state (the counterparts
/// of nf_conntrack's `nf_conntrack_*_timeout*` sysctls). An entry idle for longer is
/// treated as absent: the flow's next packet is decided again as a new flow, and the
/// agent's sweep deletes it. Idle time is measured with a resolution of one second (an
/// entry's `last_seen_ns` is refreshed at most once a second).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtTimeouts {
    /// TCP, replies seen, no FIN or RST yet.
    pub tcp_established_s: u32,
    /// TCP after a FIN or RST in either direction.
    pub tcp_closing_s: u32,
    /// TCP, no reply yet (a SYN that was never answered).
    pub tcp_half_open_s: u32,
    /// UDP, no reply yet.
    pub udp_s: u32,
    /// UDP, replies seen.
    pub udp_stream_s: u32,
    /// ICMP and ICMPv6 (echo).
    pub icmp_s: u32,
    /// Every other protocol (SCTP included).
    pub other_s: u32,
    _pad: u32,
}

impl CtTimeouts {
    /// Established TCP: 6 hours (nf_conntrack: 5 days). Longer than Linux's default TCP
    /// keepalive time (2 hours), so connections that use keepalives never expire, while a
    /// peer that vanished without a FIN holds its entry for hours rather than days.
    /// The others are nf_conntrack's defaults (closing: its `time_wait`; half-open: its
    /// `syn_sent`; other: its `generic`).
    pub const DEFAULT: Self = Self::new(21_600, 120, 120, 30, 120, 30, 600);

    pub const fn new(
        tcp_established_s: u32,
        tcp_closing_s: u32,
        tcp_half_open_s: u32,
        udp_s: u32,
        udp_stream_s: u32,
        icmp_s: u32,
        other_s: u32,
    ) -> Self {
        Self {
            tcp_established_s,
            tcp_closing_s,
            tcp_half_open_s,
            udp_s,
            udp_stream_s,
            icmp_s,
            other_s,
            _pad: 0,
        }
    }

    /// The timeout of an entry of protocol `proto` with conntrack `flags` (`CtEntry::FLAG_*`),
    /// in nanoseconds.
    #[inline(always)]
    pub const fn timeout_ns(&self, proto: u8, flags: u32) -> u64 {
        use crate::{conntrack::CtEntry, policy::proto as p};
        let replied = flags & CtEntry::FLAG_REPLIED != 0;
        let s = match proto {
            p::TCP if flags & CtEntry::FLAG_CLOSING != 0 => self.tcp_closing_s,
            p::TCP if replied => self.tcp_established_s,
            p::TCP => self.tcp_half_open_s,
            p::UDP if replied => self.udp_stream_s,
            p::UDP => self.udp_s,
            p::ICMP | p::ICMPV6 => self.icmp_s,
            _ => self.other_s,
        };
        s as u64 * 1_000_000_000
    }

    /// Whether an entry of protocol `proto` with `flags`, last seen at `last_seen_ns`, has
    /// expired at `now_ns` (both `CLOCK_MONOTONIC`, as `bpf_ktime_get_ns` gives it).
    #[inline(always)]
    pub const fn expired(&self, proto: u8, flags: u32, last_seen_ns: u64, now_ns: u64) -> bool {
        // An entry stamped after `now` (a packet on another CPU in between) is fresh.
        now_ns > last_seen_ns && now_ns - last_seen_ns > self.timeout_ns(proto, flags)
    }
}

impl Default for CtTimeouts {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{conntrack::CtEntry, policy::proto};

    const S: u64 = 1_000_000_000;

    #[test]
    fn each_protocol_and_state_has_its_own_timeout() {
        let t = CtTimeouts::new(1, 2, 3, 4, 5, 6, 7);
        let (r, c) = (CtEntry::FLAG_REPLIED, CtEntry::FLAG_CLOSING);
        assert_eq!(t.timeout_ns(proto::TCP, r), S);
        assert_eq!(t.timeout_ns(proto::TCP, r | c), 2 * S);
        assert_eq!(t.timeout_ns(proto::TCP, c), 2 * S);
        assert_eq!(t.timeout_ns(proto::TCP, 0), 3 * S);
        assert_eq!(t.timeout_ns(proto::UDP, 0), 4 * S);
        assert_eq!(t.timeout_ns(proto::UDP, r), 5 * S);
        assert_eq!(t.timeout_ns(proto::ICMP, r), 6 * S);
        assert_eq!(t.timeout_ns(proto::ICMPV6, 0), 6 * S);
        assert_eq!(t.timeout_ns(proto::SCTP, r), 7 * S);
    }

    #[test]
    fn an_entry_expires_once_idle_for_longer_than_its_timeout() {
        let t = CtTimeouts::new(10, 2, 3, 4, 5, 6, 7);
        let start = 1_000 * S;
        let udp = |now| t.expired(proto::UDP, 0, start, now);
        assert!(!udp(start + 4 * S));
        assert!(udp(start + 4 * S + 1));
        assert!(!udp(start - S), "stamped after now: fresh");
        assert!(!t.expired(proto::TCP, CtEntry::FLAG_REPLIED, start, start + 9 * S));
    }
}
