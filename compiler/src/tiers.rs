//! The decision of a rule set that ClusterNetworkPolicies take part in, towards one peer
//! class, over the whole (protocol, port) space, and its encoding as verdict keys.
//!
//! Order of evaluation (upstream `policy.networking.k8s.io/v1alpha2`):
//! 1. Admin tier rules, in order (policy priority, then name, then rule order): the first
//!    that matches decides — Accept allows, Deny denies, Pass skips the rest of the tier.
//! 2. NetworkPolicies: if they isolate the endpoint in this direction, the traffic is allowed
//!    iff one of their rules allows it, and denied otherwise.
//! 3. Baseline tier rules, in order, like the Admin tier (Pass skips the rest of the tier).
//! 4. Otherwise the traffic is allowed.
//!
//! The result is a function of (protocol, port) that is constant on few segments; it is
//! encoded as longest-prefix verdict keys: one key for every protocol, one per protocol
//! for its most common decision, and power-of-two port blocks for the rest. So the
//! dataplane still decides with one lookup, whatever the number of tiers and rules.

use weir_api::{Action, PortPrefix};

use super::{
    policy::{Protocol, RuleAction},
    ports::aligned_blocks,
};

/// The part of the (protocol, port) space a rule matches towards one class.
#[derive(Clone, Debug, Default)]
pub(crate) struct Coverage {
    everything: bool,
    all_ports: [bool; 3],
    ranges: [Vec<(u16, u16)>; 3],
}

fn slot(p: Protocol) -> usize {
    match p {
        Protocol::Tcp => 0,
        Protocol::Udp => 1,
        Protocol::Sctp => 2,
    }
}

impl Coverage {
    /// Every protocol (ICMP and others included) and every port.
    pub fn everything() -> Self {
        Self {
            everything: true,
            ..Self::default()
        }
    }

    pub fn add_protocol(&mut self, protocol: Protocol) {
        self.all_ports[slot(protocol)] = true;
    }

    pub fn add_ports(&mut self, protocol: Protocol, first: u16, last: u16) {
        if first <= last {
            self.ranges[slot(protocol)].push((first, last));
        }
    }

    /// Does it match `port` of `protocol` (`None`: a protocol without ports weir knows,
    /// such as ICMP)?
    fn covers(&self, protocol: Option<Protocol>, port: u16) -> bool {
        if self.everything {
            return true;
        }
        let Some(p) = protocol else { return false };
        let s = slot(p);
        self.all_ports[s] || self.ranges[s].iter().any(|&(f, l)| f <= port && port <= l)
    }

    /// Segment starts this coverage introduces for `protocol`.
    fn cuts(&self, protocol: Protocol, out: &mut Vec<u32>) {
        for &(f, l) in &self.ranges[slot(protocol)] {
            out.push(u32::from(f));
            out.push(u32::from(l) + 1);
        }
    }
}

/// An action and the rule (id) that took it; rule 0: no rule (the defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Decision {
    pub action: Action,
    pub rule: u32,
}

impl Decision {
    /// What the dataplane decides when no key matches.
    pub const IMPLICIT: Decision = Decision {
        action: Action::Deny,
        rule: 0,
    };
    const DEFAULT_ALLOW: Decision = Decision {
        action: Action::Allow,
        rule: 0,
    };
}

/// A ClusterNetworkPolicy rule that matches the class.
#[derive(Clone, Debug)]
pub(crate) struct TierRule {
    pub action: RuleAction,
    pub rule: u32,
    pub coverage: Coverage,
}

/// The rules of one rule set that match one class, by tier.
#[derive(Clone, Debug, Default)]
pub(crate) struct Tiers {
    pub admin: Vec<TierRule>,
    /// `None`: no NetworkPolicy isolates the endpoint in this direction. `Some`: the
    /// NetworkPolicy rules that match the class, each with the rule to attribute it to, in
    /// attribution order.
    pub network_policy: Option<Vec<(u32, Coverage)>>,
    pub baseline: Vec<TierRule>,
}

/// The verdict keys of one class: (protocol, port block, decision); `(None, None)` is
/// every protocol.
pub(crate) type TierEntry = (Option<Protocol>, Option<PortPrefix>, Decision);

impl Tiers {
    /// The decision for one packet.
    pub fn decide(&self, protocol: Option<Protocol>, port: u16) -> Decision {
        let tier = |rules: &[TierRule]| -> Option<Decision> {
            for r in rules {
                if r.coverage.covers(protocol, port) {
                    return match r.action {
                        RuleAction::Allow => Some(Decision {
                            action: Action::Allow,
                            rule: r.rule,
                        }),
                        RuleAction::Deny => Some(Decision {
                            action: Action::Deny,
                            rule: r.rule,
                        }),
                        RuleAction::Pass => None,
                    };
                }
            }
            None
        };
        if let Some(d) = tier(&self.admin) {
            return d;
        }
        if let Some(np) = &self.network_policy {
            return np.iter().find(|(_, c)| c.covers(protocol, port)).map_or(
                Decision::IMPLICIT,
                |(rule, _)| Decision {
                    action: Action::Allow,
                    rule: *rule,
                },
            );
        }
        tier(&self.baseline).unwrap_or(Decision::DEFAULT_ALLOW)
    }

    fn coverages(&self) -> impl Iterator<Item = &Coverage> {
        self.admin
            .iter()
            .map(|r| &r.coverage)
            .chain(self.network_policy.iter().flatten().map(|(_, c)| c))
            .chain(self.baseline.iter().map(|r| &r.coverage))
    }

    /// The decision over the whole space as verdict keys, leaving out what the dataplane
    /// decides anyway ([`Decision::IMPLICIT`] where nothing matches).
    pub fn entries(&self) -> Vec<TierEntry> {
        let other = self.decide(None, 0);
        let mut out = Vec::new();
        if other != Decision::IMPLICIT {
            out.push((None, None, other));
        }
        for protocol in Protocol::ALL {
            let mut cuts = vec![0u32, 65536];
            for c in self.coverages() {
                c.cuts(protocol, &mut cuts);
            }
            cuts.sort_unstable();
            cuts.dedup();
            // Segments of equal decision, merged.
            let mut segments: Vec<(u16, u16, Decision)> = Vec::new();
            for w in cuts.windows(2) {
                let (Ok(first), Ok(last)) = (u16::try_from(w[0]), u16::try_from(w[1] - 1)) else {
                    continue;
                };
                let d = self.decide(Some(protocol), first);
                match segments.last_mut() {
                    Some(s) if s.2 == d => s.1 = last,
                    _ => segments.push((first, last, d)),
                }
            }
            // The decision covering most ports becomes the protocol's key.
            let mut weights: Vec<(Decision, u32)> = Vec::new();
            for &(f, l, d) in &segments {
                let n = u32::from(l) - u32::from(f) + 1;
                match weights.iter_mut().find(|(x, _)| *x == d) {
                    Some(w) => w.1 += n,
                    None => weights.push((d, n)),
                }
            }
            let Some(&(base, _)) = weights.iter().max_by_key(|(_, n)| *n) else {
                continue;
            };
            // Without a protocol key, the every-protocol key (or nothing) decides.
            if base != other {
                out.push((Some(protocol), None, base));
            }
            for &(f, l, d) in &segments {
                if d != base {
                    out.extend(
                        aligned_blocks(f, l)
                            .into_iter()
                            .map(|b| (Some(protocol), Some(b), d)),
                    );
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn rule(action: RuleAction, rule: u32, coverage: Coverage) -> TierRule {
        TierRule {
            action,
            rule,
            coverage,
        }
    }

    fn tcp(first: u16, last: u16) -> Coverage {
        let mut c = Coverage::default();
        c.add_ports(Protocol::Tcp, first, last);
        c
    }

    /// What a longest-prefix lookup over `entries` decides.
    fn lookup(entries: &[TierEntry], protocol: Option<Protocol>, port: u16) -> Decision {
        let mut best: Option<(u8, Decision)> = None;
        for &(p, block, d) in entries {
            let rank = match (p, block) {
                (None, _) => 0,
                (Some(x), None) if Some(x) == protocol => 1,
                (Some(x), Some(b)) if Some(x) == protocol && b.contains(port) => 2 + b.len,
                _ => continue,
            };
            if best.is_none_or(|(r, _)| rank > r) {
                best = Some((rank, d));
            }
        }
        best.map_or(Decision::IMPLICIT, |(_, d)| d)
    }

    #[test]
    fn admin_deny_beats_network_policy_allow_and_pass_falls_through() {
        let tiers = Tiers {
            admin: vec![
                rule(RuleAction::Pass, 1, tcp(80, 80)),
                rule(RuleAction::Deny, 2, tcp(0, 1000)),
            ],
            network_policy: Some(vec![(3, tcp(80, 90))]),
            baseline: vec![rule(RuleAction::Deny, 4, Coverage::everything())],
        };
        let d = |port| tiers.decide(Some(Protocol::Tcp), port);
        assert_eq!(
            d(80),
            Decision {
                action: Action::Allow,
                rule: 3
            }
        );
        assert_eq!(
            d(81),
            Decision {
                action: Action::Deny,
                rule: 2
            }
        );
        assert_eq!(d(2000), Decision::IMPLICIT, "isolated by NetworkPolicy");
        assert_eq!(tiers.decide(None, 0), Decision::IMPLICIT);
    }

    #[test]
    fn baseline_applies_only_where_network_policies_do_not_isolate() {
        let mut tiers = Tiers {
            admin: vec![],
            network_policy: None,
            baseline: vec![
                rule(RuleAction::Allow, 1, tcp(53, 53)),
                rule(RuleAction::Deny, 2, Coverage::everything()),
            ],
        };
        assert_eq!(tiers.decide(Some(Protocol::Tcp), 53).action, Action::Allow);
        assert_eq!(tiers.decide(Some(Protocol::Udp), 53).rule, 2);
        tiers.network_policy = Some(vec![(9, tcp(1, 2))]);
        assert_eq!(tiers.decide(Some(Protocol::Tcp), 53), Decision::IMPLICIT);
        tiers.network_policy = None;
        tiers.baseline.clear();
        assert_eq!(tiers.decide(None, 0), Decision::DEFAULT_ALLOW);
    }

    fn coverage() -> impl Strategy<Value = Coverage> {
        (
            any::<bool>(),
            proptest::collection::vec((0usize..3, 0u16..200, 0u16..60), 0..3),
            proptest::option::of(0usize..3),
        )
            .prop_map(|(everything, ranges, all)| {
                if everything {
                    return Coverage::everything();
                }
                let mut c = Coverage::default();
                for (p, f, w) in ranges {
                    c.add_ports(Protocol::ALL[p], f, f.saturating_add(w));
                }
                if let Some(p) = all {
                    c.add_protocol(Protocol::ALL[p]);
                }
                c
            })
    }

    fn tier_rules(first: u32) -> impl Strategy<Value = Vec<TierRule>> {
        proptest::collection::vec((0u8..3, coverage()), 0..4).prop_map(move |rules| {
            rules
                .into_iter()
                .enumerate()
                .map(|(i, (a, c))| {
                    let action =
                        [RuleAction::Allow, RuleAction::Deny, RuleAction::Pass][a as usize];
                    rule(action, first + i as u32, c)
                })
                .collect()
        })
    }

    proptest! {
        /// The keys decide every packet as the tiers do.
        #[test]
        fn entries_encode_the_decision(
            admin in tier_rules(1),
            np in proptest::option::of(proptest::collection::vec(coverage(), 0..3)),
            baseline in tier_rules(100),
        ) {
            let tiers = Tiers {
                admin,
                network_policy: np.map(|v| v.into_iter().enumerate().map(|(i, c)| (50 + i as u32, c)).collect()),
                baseline,
            };
            let entries = tiers.entries();
            prop_assert_eq!(lookup(&entries, None, 0), tiers.decide(None, 0));
            for p in Protocol::ALL {
                for port in (0u16..300).chain([1000, 65535]) {
                    prop_assert_eq!(lookup(&entries, Some(p), port), tiers.decide(Some(p), port), "{:?} {}", p, port);
                }
            }
        }
    }
}
