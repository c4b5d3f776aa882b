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
}

impl NodeConfig {
    /// Hand every packet to the host stack after policy instead of redirecting it (another
    /// Service proxy, e.g. kube-proxy, translates in the host's netfilter and must see both
    /// directions of a flow).
    pub const FLAG_HOST_PATH: u32 = 1 << 0;

    pub const fn new(policy_gen: u32, sample_rate: u32, vni: u32) -> Self {
        Self {
            policy_gen,
            flags: 0,
            sample_rate,
            vni,
        }
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
}
