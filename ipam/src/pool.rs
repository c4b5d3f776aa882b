//! Address arithmetic on one pool: which addresses may be handed out, and the
//! round-robin walk over them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// One configured range, with its usable addresses as integers (IPv4 in the low 32 bits).
///
/// Usable means: not the network address (for IPv6 the subnet-router anycast address,
/// RFC 4291 §2.6.1), and for IPv4 not the broadcast address either. A pod given either
/// would be unreachable or would receive broadcast traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pool {
    net: IpNet,
    first: u128,
    last: u128,
}

impl Pool {
    /// The pool for `net` (host bits are cleared), or `None` when it has no usable
    /// address (an IPv4 /31 or /32, an IPv6 /128).
    pub(crate) fn new(net: IpNet) -> Option<Pool> {
        let net = net.trunc();
        let network = to_int(net.network());
        let (first, last) = match net {
            IpNet::V4(_) => (network + 1, to_int(net.broadcast()).checked_sub(1)?),
            IpNet::V6(_) => (network.checked_add(1)?, to_int(net.broadcast())),
        };
        (first <= last).then_some(Pool { net, first, last })
    }

    /// The pool as configured, host bits cleared.
    pub(crate) fn net(&self) -> IpNet {
        self.net
    }

    /// How many addresses can be handed out.
    pub(crate) fn capacity(&self) -> u128 {
        // Cannot overflow: the widest pool (IPv6 /0) has last = u128::MAX, first = 1.
        self.last - self.first + 1
    }

    /// Whether `address` is one this pool may hand out.
    pub(crate) fn is_usable(&self, address: IpAddr) -> bool {
        self.same_family(address) && (self.first..=self.last).contains(&to_int(address))
    }

    /// Walks the usable addresses round robin, starting right after `cursor` (the last
    /// address handed out) or at the first usable address when there is no cursor in this
    /// pool, and returns the first one `is_free` accepts.
    ///
    /// `in_use` is the number of usable addresses of this pool that are taken; since the
    /// walk meets at most that many taken addresses before a free one, it stops after
    /// `in_use + 1` steps even in an IPv6 /64.
    pub(crate) fn next_free(
        &self,
        cursor: Option<IpAddr>,
        in_use: u128,
        is_free: impl Fn(IpAddr) -> bool,
    ) -> Option<IpAddr> {
        if in_use >= self.capacity() {
            return None;
        }
        let mut candidate = match cursor.filter(|c| self.is_usable(*c)) {
            Some(cursor) => self.after(to_int(cursor)),
            None => self.first,
        };
        for _ in 0..=in_use {
            let address = self.address_at(candidate);
            if is_free(address) {
                return Some(address);
            }
            candidate = self.after(candidate);
        }
        None
    }

    fn after(&self, value: u128) -> u128 {
        if value >= self.last {
            self.first
        } else {
            value + 1
        }
    }

    fn same_family(&self, address: IpAddr) -> bool {
        matches!(
            (self.net, address),
            (IpNet::V4(_), IpAddr::V4(_)) | (IpNet::V6(_), IpAddr::V6(_))
        )
    }

    fn address_at(&self, value: u128) -> IpAddr {
        match self.net {
            // `value` lies within an IPv4 pool, so it fits in 32 bits.
            IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(u32::try_from(value).unwrap_or_default())),
            IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(value)),
        }
    }
}

fn to_int(address: IpAddr) -> u128 {
    match address {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(net: &str) -> Option<Pool> {
        Pool::new(net.parse().unwrap())
    }

    fn addr(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ipv4_pool_excludes_network_and_broadcast() {
        let p = pool("10.0.0.0/29").unwrap();
        assert_eq!(p.capacity(), 6);
        assert!(!p.is_usable(addr("10.0.0.0")));
        assert!(p.is_usable(addr("10.0.0.1")));
        assert!(p.is_usable(addr("10.0.0.6")));
        assert!(!p.is_usable(addr("10.0.0.7")));
        assert!(!p.is_usable(addr("10.0.0.8")));
    }

    #[test]
    fn ipv6_pool_excludes_only_the_subnet_router_anycast_address() {
        let p = pool("fd00::/125").unwrap();
        assert_eq!(p.capacity(), 7);
        assert!(!p.is_usable(addr("fd00::")));
        assert!(p.is_usable(addr("fd00::7")));
        assert!(!p.is_usable(addr("10.0.0.1")));
    }

    #[test]
    fn pools_without_usable_addresses_are_rejected() {
        for net in ["10.0.0.0/31", "10.0.0.1/32", "fd00::1/128"] {
            assert_eq!(pool(net), None, "{net}");
        }
        assert_eq!(pool("fd00::/127").unwrap().capacity(), 1);
    }

    #[test]
    fn host_bits_of_the_configured_pool_are_ignored() {
        assert_eq!(
            pool("10.0.0.77/24").unwrap().net(),
            "10.0.0.0/24".parse::<IpNet>().unwrap()
        );
    }

    #[test]
    fn huge_pools_do_not_overflow() {
        assert_eq!(pool("::/0").unwrap().capacity(), u128::MAX);
        assert_eq!(pool("0.0.0.0/0").unwrap().capacity(), (1 << 32) - 2);
    }

    #[test]
    fn walk_starts_after_the_cursor_and_wraps_around() {
        let p = pool("10.0.0.0/29").unwrap();
        assert_eq!(p.next_free(None, 0, |_| true), Some(addr("10.0.0.1")));
        assert_eq!(
            p.next_free(Some(addr("10.0.0.3")), 0, |_| true),
            Some(addr("10.0.0.4"))
        );
        assert_eq!(
            p.next_free(Some(addr("10.0.0.6")), 0, |_| true),
            Some(addr("10.0.0.1"))
        );
        let taken = [addr("10.0.0.5"), addr("10.0.0.6"), addr("10.0.0.1")];
        assert_eq!(
            p.next_free(Some(addr("10.0.0.4")), 3, |a| !taken.contains(&a)),
            Some(addr("10.0.0.2"))
        );
    }

    #[test]
    fn full_pool_has_no_free_address() {
        let p = pool("10.0.0.0/30").unwrap();
        assert_eq!(p.next_free(None, 2, |_| true), None);
    }

    #[test]
    fn cursor_outside_the_pool_restarts_at_the_beginning() {
        let p = pool("10.0.1.0/24").unwrap();
        assert_eq!(
            p.next_free(Some(addr("10.0.0.9")), 0, |_| true),
            Some(addr("10.0.1.1"))
        );
    }
}
