//! An emulation of the dataplane's policy lookup over a [`NodeState`], for tests and
//! debugging tools: what verdict would the kernel reach for this packet, given this state?
//!
//! It follows the eBPF maps exactly (see `weir_common::policy` and the eBPF `policy` module):
//!
//! * `PEER_CLASSES` is one longest-prefix-match trie over 128-bit keys in which IPv4 is stored
//!   IPv4-mapped (`::ffff:a.b.c.d`, an IPv4 `/n` is a `/96+n`). So an IPv6 prefix that covers
//!   `::ffff:0:0/96` (for example `::/0`) also classifies every IPv4 address that no IPv4 prefix
//!   matches. No match is [`CLASS_UNMATCHED`].
//! * `VERDICTS` is a longest-prefix-match trie over (rule set, class, protocol, port): an entry
//!   with a protocol beats one without, a longer port prefix beats a shorter one. No match is a
//!   deny (the endpoint is isolated and nothing allowed the packet).
//!
//! Map keys are assumed to be in canonical form (no address bits set beyond the prefix), as
//! the controller emits them.

use std::net::{IpAddr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{Action, CLASS_UNMATCHED, IpProto, NOT_ISOLATED, NodeState, PortPrefix, VerdictMatch};

/// Bits an IPv4 prefix length is shifted by when stored IPv4-mapped in the 128-bit trie.
const V4_MAPPED_SHIFT: u8 = 96;

impl NodeState {
    /// The peer class the dataplane gives `addr`: the class of the longest prefix in
    /// [`NodeState::peer_classes`] that contains it, IPv4 compared IPv4-mapped like the kernel.
    pub fn classify(&self, addr: IpAddr) -> u32 {
        self.longest_class_match(addr)
            .map_or(CLASS_UNMATCHED, |(_, class)| class)
    }

    /// The `peer_classes` entry that classifies `addr` (prefix and class), if any.
    pub fn longest_class_match(&self, addr: IpAddr) -> Option<(IpNet, u32)> {
        match canonical_ip(addr) {
            IpAddr::V4(v4) => {
                for len in (0..=32u8).rev() {
                    let net = IpNet::V4(Ipv4Net::new(v4, len).ok()?.trunc());
                    if let Some(class) = self.peer_classes.get(&net) {
                        return Some((net, class));
                    }
                }
                // IPv6 prefixes shorter than the IPv4-mapped range still cover it.
                let mapped = v4.to_ipv6_mapped();
                self.longest_v6_match(mapped, V4_MAPPED_SHIFT - 1)
            }
            IpAddr::V6(v6) => self.longest_v6_match(v6, 128),
        }
    }

    fn longest_v6_match(&self, addr: Ipv6Addr, max_len: u8) -> Option<(IpNet, u32)> {
        for len in (0..=max_len).rev() {
            let net = IpNet::V6(Ipv6Net::new(addr, len).ok()?.trunc());
            if let Some(class) = self.peer_classes.get(&net) {
                return Some((net, class));
            }
        }
        None
    }

    /// The verdict the dataplane reaches for a packet checked against `rule_set` whose peer
    /// (source for ingress, destination for egress) is `peer`: the action and the rule id
    /// that decided it (0 when no policy isolates the endpoint or nothing matched).
    pub fn verdict(&self, rule_set: u32, peer: IpAddr, proto: IpProto, port: u16) -> (Action, u32) {
        if rule_set == NOT_ISOLATED {
            return (Action::Allow, 0);
        }
        let class = self.classify(peer);
        match self.longest_verdict_match(rule_set, class, proto, port) {
            Some(m) => {
                let entry = self.verdicts[&m];
                (entry.action, entry.rule)
            }
            None => (Action::Deny, 0),
        }
    }

    /// The `verdicts` key that decides (rule set, class, protocol, port), if any.
    pub fn longest_verdict_match(
        &self,
        rule_set: u32,
        class: u32,
        proto: IpProto,
        port: u16,
    ) -> Option<VerdictMatch> {
        let key = |proto, ports| VerdictMatch {
            rule_set,
            class,
            proto,
            ports,
        };
        for len in (0..=16u8).rev() {
            let host_bits = 16 - u32::from(len);
            let block = if host_bits == 16 {
                0
            } else {
                port & (u16::MAX << host_bits)
            };
            let prefix = PortPrefix::new(block, len)?;
            let k = key(Some(proto), Some(prefix));
            if self.verdicts.contains_key(&k) {
                return Some(k);
            }
        }
        [key(Some(proto), None), key(None, None)]
            .into_iter()
            .find(|k| self.verdicts.contains_key(k))
    }
}

/// IPv4-mapped IPv6 addresses are IPv4 addresses to the dataplane (and in its keys).
pub fn canonical_ip(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// `0.0.0.0/0`: the controller emits it whenever an IPv6 prefix could shadow IPv4 addresses.
pub fn ipv4_root() -> IpNet {
    IpNet::V4(Ipv4Net::default())
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use ipnet::IpNet;

    use crate::{
        Action, CLASS_UNMATCHED, NodeState, PortPrefix, VerdictEntry, VerdictMatch,
        lookup::ipv4_root,
    };

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn allow(rule: u32) -> VerdictEntry {
        VerdictEntry {
            action: Action::Allow,
            rule,
        }
    }

    #[test]
    fn longest_prefix_decides_the_class() {
        let mut s = NodeState::default();
        s.peer_classes.insert(net("10.0.0.0/8"), 1);
        s.peer_classes.insert(net("10.1.0.0/16"), 2);
        s.peer_classes.insert(net("10.1.2.3/32"), 3);
        assert_eq!(s.classify(ip("10.2.0.1")), 1);
        assert_eq!(s.classify(ip("10.1.0.1")), 2);
        assert_eq!(s.classify(ip("10.1.2.3")), 3);
        assert_eq!(s.classify(ip("::ffff:10.1.2.3")), 3);
        assert_eq!(s.classify(ip("11.0.0.1")), CLASS_UNMATCHED);
    }

    #[test]
    fn ipv6_default_route_shadows_ipv4_unless_an_ipv4_root_exists() {
        let mut s = NodeState::default();
        s.peer_classes.insert(net("::/0"), 7);
        assert_eq!(s.classify(ip("192.0.2.1")), 7);
        assert_eq!(s.classify(ip("2001:db8::1")), 7);
        s.peer_classes.insert(ipv4_root(), 0);
        assert_eq!(s.classify(ip("192.0.2.1")), 0);
        assert_eq!(s.classify(ip("2001:db8::1")), 7);
    }

    #[test]
    fn protocol_and_port_prefixes_are_longest_match() {
        let mut s = NodeState::default();
        s.peer_classes.insert(net("10.0.0.0/8"), 1);
        let m = |proto, ports| VerdictMatch {
            rule_set: 5,
            class: 1,
            proto,
            ports,
        };
        s.verdicts
            .insert(m(Some(6), PortPrefix::new(80, 16)), allow(1));
        s.verdicts
            .insert(m(Some(6), PortPrefix::new(1024, 6)), allow(2));
        s.verdicts.insert(m(Some(17), None), allow(3));
        assert_eq!(s.verdict(5, ip("10.0.0.1"), 6, 80), (Action::Allow, 1));
        assert_eq!(s.verdict(5, ip("10.0.0.1"), 6, 1500), (Action::Allow, 2));
        assert_eq!(s.verdict(5, ip("10.0.0.1"), 6, 2048), (Action::Deny, 0));
        assert_eq!(s.verdict(5, ip("10.0.0.1"), 17, 9), (Action::Allow, 3));
        assert_eq!(s.verdict(5, ip("10.0.0.1"), 1, 0), (Action::Deny, 0));
        assert_eq!(s.verdict(5, ip("11.0.0.1"), 6, 80), (Action::Deny, 0));
        assert_eq!(s.verdict(0, ip("11.0.0.1"), 6, 80), (Action::Allow, 0));
        s.verdicts.insert(m(None, None), allow(4));
        assert_eq!(s.verdict(5, ip("10.0.0.1"), 1, 0), (Action::Allow, 4));
        assert_eq!(s.verdict(5, ip("10.0.0.1"), 6, 80), (Action::Allow, 1));
    }
}
