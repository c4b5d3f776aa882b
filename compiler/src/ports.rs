//! What a rule set allows towards one peer class, as protocol and port sets, and their
//! encoding as verdict keys: every protocol, every port of a protocol, or power-of-two
//! aligned port blocks ([`PortPrefix`]), so that the dataplane decides with one
//! longest-prefix lookup.
//!
//! Each allowed port is attributed to the first rule (in rule order) that allows it, for
//! per-rule counters. Overlapping or repeated ranges merge; an allowance covered by a
//! broader one (a port of a protocol whose every port is allowed, anything when every
//! protocol is allowed) is dropped, its traffic counted on the broader rule.

use weir_api::PortPrefix;

use super::policy::Protocol;

/// The allowances of one (rule set, peer class), each attributed to a rule `R` (smaller
/// means earlier in rule order).
#[derive(Clone, Debug)]
pub(crate) struct Allowances<R> {
    everything: Option<R>,
    protocols: [ProtocolAllowance<R>; 3],
}

#[derive(Clone, Debug)]
struct ProtocolAllowance<R> {
    all_ports: Option<R>,
    ranges: Vec<(u16, u16, R)>,
}

impl<R> Default for ProtocolAllowance<R> {
    fn default() -> Self {
        Self {
            all_ports: None,
            ranges: Vec::new(),
        }
    }
}

/// One verdict key's worth of allowance: `protocol: None` is every protocol (and port),
/// `ports: None` every port of the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct AllowEntry<R> {
    pub protocol: Option<Protocol>,
    pub ports: Option<PortPrefix>,
    pub rule: R,
}

impl<R: Copy + Ord> Default for Allowances<R> {
    fn default() -> Self {
        Self {
            everything: None,
            protocols: Default::default(),
        }
    }
}

fn keep_first<R: Copy + Ord>(slot: &mut Option<R>, rule: R) {
    *slot = Some(slot.map_or(rule, |r| r.min(rule)));
}

fn slot(p: Protocol) -> usize {
    match p {
        Protocol::Tcp => 0,
        Protocol::Udp => 1,
        Protocol::Sctp => 2,
    }
}

impl<R: Copy + Ord> Allowances<R> {
    /// Every protocol, every port (a rule without `ports`).
    pub fn allow_everything(&mut self, rule: R) {
        keep_first(&mut self.everything, rule);
    }

    /// Every port of `protocol`.
    pub fn allow_protocol(&mut self, protocol: Protocol, rule: R) {
        keep_first(&mut self.protocols[slot(protocol)].all_ports, rule);
    }

    /// Ports `first ..= last` of `protocol` (ignored if `first > last`).
    pub fn allow_ports(&mut self, protocol: Protocol, first: u16, last: u16, rule: R) {
        if first <= last {
            self.protocols[slot(protocol)]
                .ranges
                .push((first, last, rule));
        }
    }

    /// The verdict-key encoding: a minimal set of aligned entries per rule, broader
    /// allowances absorbing narrower ones.
    pub fn entries(&self) -> Vec<AllowEntry<R>> {
        if let Some(rule) = self.everything {
            return vec![AllowEntry {
                protocol: None,
                ports: None,
                rule,
            }];
        }
        let mut out = Vec::new();
        for protocol in Protocol::ALL {
            let allowance = &self.protocols[slot(protocol)];
            if let Some(rule) = allowance.all_ports {
                out.push(AllowEntry {
                    protocol: Some(protocol),
                    ports: None,
                    rule,
                });
                continue;
            }
            for (first, last, rule) in attribute(&allowance.ranges) {
                out.extend(
                    aligned_blocks(first, last)
                        .into_iter()
                        .map(|ports| AllowEntry {
                            protocol: Some(protocol),
                            ports: Some(ports),
                            rule,
                        }),
                );
            }
        }
        out
    }
}

/// Disjoint ranges covering the union of `ranges`, each port attributed to the smallest rule
/// among the ranges containing it; adjacent ranges of one rule are merged.
fn attribute<R: Copy + Ord>(ranges: &[(u16, u16, R)]) -> Vec<(u16, u16, R)> {
    // Elementary segments start at every range start and after every range end.
    let mut cuts: Vec<u32> = ranges
        .iter()
        .flat_map(|&(f, l, _)| [u32::from(f), u32::from(l) + 1])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut out: Vec<(u16, u16, R)> = Vec::new();
    for pair in cuts.windows(2) {
        let (start, end) = (pair[0], pair[1] - 1);
        let owner = ranges
            .iter()
            .filter(|&&(f, l, _)| u32::from(f) <= start && end <= u32::from(l))
            .map(|&(_, _, r)| r)
            .min();
        let (Some(rule), Ok(start), Ok(end)) = (owner, u16::try_from(start), u16::try_from(end))
        else {
            continue;
        };
        match out.last_mut() {
            Some(last) if last.2 == rule && u32::from(last.1) + 1 == u32::from(start) => {
                last.1 = end;
            }
            _ => out.push((start, end, rule)),
        }
    }
    out
}

/// The fewest power-of-two aligned blocks that cover exactly `first ..= last`.
pub fn aligned_blocks(first: u16, last: u16) -> Vec<PortPrefix> {
    let mut blocks = Vec::new();
    let mut start = u32::from(first);
    let end = u32::from(last);
    while start <= end {
        // Largest block aligned at `start` that stays within `end`.
        let mut size_log = if start == 0 {
            16
        } else {
            start.trailing_zeros().min(16)
        };
        while start + (1u32 << size_log) - 1 > end {
            size_log -= 1;
        }
        let len = u8::try_from(16 - size_log).unwrap_or(16);
        if let Some(p) = u16::try_from(start)
            .ok()
            .and_then(|port| PortPrefix::new(port, len))
        {
            blocks.push(p);
        }
        start += 1u32 << size_log;
    }
    blocks
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn covered(blocks: &[PortPrefix]) -> Vec<u16> {
        let mut v: Vec<u16> = blocks.iter().flat_map(|b| b.first()..=b.last()).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn single_port_is_one_full_length_block() {
        assert_eq!(
            aligned_blocks(80, 80),
            vec![PortPrefix::new(80, 16).unwrap()]
        );
    }

    #[test]
    fn whole_port_space_is_one_zero_length_block() {
        assert_eq!(
            aligned_blocks(0, 65535),
            vec![PortPrefix::new(0, 0).unwrap()]
        );
    }

    #[test]
    fn ranges_decompose_into_minimal_aligned_blocks() {
        // 1000-1007, 1008-1023, 1024-1535, 1536-1791, 1792-1919, 1920-1983, 1984-1999, 2000.
        let blocks = aligned_blocks(1000, 2000);
        assert_eq!(covered(&blocks), (1000..=2000).collect::<Vec<_>>());
        let starts: Vec<u16> = blocks.iter().map(|b| b.port).collect();
        assert_eq!(starts, [1000, 1008, 1024, 1536, 1792, 1920, 1984, 2000]);
        assert_eq!(
            aligned_blocks(32768, 65535),
            vec![PortPrefix::new(32768, 1).unwrap()]
        );
        assert_eq!(
            aligned_blocks(1, 65535).len(),
            16,
            "1, 2-3, 4-7, ... 32768-65535"
        );
    }

    #[test]
    fn overlapping_ranges_merge_and_are_attributed_to_the_first_rule() {
        let mut a = Allowances::default();
        a.allow_ports(Protocol::Tcp, 80, 90, 2u32);
        a.allow_ports(Protocol::Tcp, 85, 100, 1u32);
        a.allow_ports(Protocol::Tcp, 80, 80, 2u32);
        let e = a.entries();
        let by_rule = |r: u32| -> Vec<u16> {
            let blocks: Vec<PortPrefix> = e
                .iter()
                .filter(|x| x.rule == r)
                .filter_map(|x| x.ports)
                .collect();
            covered(&blocks)
        };
        assert_eq!(by_rule(2), (80..=84).collect::<Vec<_>>());
        assert_eq!(by_rule(1), (85..=100).collect::<Vec<_>>());
    }

    #[test]
    fn a_protocol_wide_allowance_absorbs_its_port_ranges() {
        let mut a = Allowances::default();
        a.allow_ports(Protocol::Udp, 53, 53, 1u32);
        a.allow_protocol(Protocol::Udp, 2);
        a.allow_ports(Protocol::Tcp, 53, 53, 1);
        let e = a.entries();
        assert_eq!(e.len(), 2);
        assert!(e.contains(&AllowEntry {
            protocol: Some(Protocol::Udp),
            ports: None,
            rule: 2
        }));
    }

    #[test]
    fn allowing_everything_is_a_single_protocol_less_entry() {
        let mut a = Allowances::default();
        a.allow_ports(Protocol::Sctp, 1, 2, 0u32);
        a.allow_everything(3);
        assert_eq!(
            a.entries(),
            vec![AllowEntry {
                protocol: None,
                ports: None,
                rule: 3
            }]
        );
    }

    proptest! {
        /// The blocks cover exactly the range, are aligned, and no two adjacent blocks could
        /// be one.
        #[test]
        fn aligned_blocks_cover_exactly_the_range(a in any::<u16>(), b in any::<u16>()) {
            let (first, last) = (a.min(b), a.max(b));
            let blocks = aligned_blocks(first, last);
            prop_assert_eq!(covered(&blocks), (first..=last).collect::<Vec<_>>());
            for w in blocks.windows(2) {
                let mergeable = w[0].len == w[1].len
                    && w[0].len > 0
                    && PortPrefix::new(w[0].port, w[0].len - 1).is_some();
                prop_assert!(!mergeable, "{:?} and {:?} could merge", w[0], w[1]);
            }
            // At most two blocks per prefix length.
            prop_assert!(blocks.len() <= 32);
        }

        /// The allowed port set is the union of the ranges, whatever their overlaps.
        #[test]
        fn allowances_cover_the_union_of_ranges(
            ranges in proptest::collection::vec((0u16..300, 0u16..40, 0u8..4), 0..6)
        ) {
            let mut a = Allowances::default();
            let mut expected = std::collections::BTreeSet::new();
            for &(first, width, rule) in &ranges {
                let last = first.saturating_add(width);
                a.allow_ports(Protocol::Tcp, first, last, rule);
                expected.extend(first..=last);
            }
            let blocks: Vec<PortPrefix> = a.entries().iter().filter_map(|e| e.ports).collect();
            let got = covered(&blocks);
            prop_assert_eq!(got.clone(), expected.into_iter().collect::<Vec<_>>());
            let mut dedup = got.clone();
            dedup.dedup();
            prop_assert_eq!(dedup, got, "blocks overlap");
        }
    }
}
