//! The XDP prefilter: address prefixes whose packets are dropped before the kernel allocates
//! anything for them.

/// Value of the `PREFILTER` LPM trie (key data: the [`crate::ip::IpKey`] of a prefix): the
/// entry's id, its slot in the per-CPU `PREFILTER_DROPS` counters. Ids are dense from 1 (0
/// is never used) and stay with their prefix while it is configured, so its counter does
/// too, across agent restarts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PrefilterEntry {
    id: u32,
}

impl PrefilterEntry {
    pub const fn new(id: u32) -> Self {
        Self { id }
    }
    pub const fn id(&self) -> u32 {
        self.id
    }
}
