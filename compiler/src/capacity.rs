//! The check of a node's compiled state against its agent's map capacities (as the agent
//! reported them, the compiled-in defaults if it reports none), before it is published: a
//! state that does not fit would leave the agent unable to apply it.
//!
//! When the verdicts or classes of a node do not fit, the largest rule sets lose their
//! verdicts, one after the other, until the rest fits. A rule set without verdicts denies
//! every new flow: the pods those policies select fail closed, every other pod keeps its
//! policies.

use std::collections::{BTreeMap, BTreeSet};

use weir_api::{NodeState, PolicyRef, VerdictMatch};
use weir_common::capacity;

/// The capacities of the agent's maps that a node's compiled state fills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    /// Verdicts for a single port of one protocol (`VERDICTS_EXACT`).
    pub verdicts_exact: usize,
    /// Every other verdict (`VERDICTS`).
    pub verdicts: usize,
    /// Classes of single addresses (`PEER_HOSTS`).
    pub peer_hosts: usize,
    /// Classes of shorter prefixes (`PEER_CLASSES`).
    pub peer_classes: usize,
}

impl Default for Capacities {
    /// The capacities the agent creates its maps with.
    fn default() -> Self {
        Self {
            verdicts_exact: capacity::VERDICTS_EXACT as usize,
            verdicts: capacity::VERDICTS as usize,
            peer_hosts: capacity::PEER_HOSTS as usize,
            peer_classes: capacity::PEER_CLASSES as usize,
        }
    }
}

impl From<&weir_api::MapCapacities> for Capacities {
    /// The capacities an agent reported.
    fn from(c: &weir_api::MapCapacities) -> Self {
        Self {
            verdicts_exact: c.verdicts_exact as usize,
            verdicts: c.verdicts as usize,
            peer_hosts: c.peer_hosts as usize,
            peer_classes: c.peer_classes as usize,
        }
    }
}

/// A rule set left without verdicts because the node's state did not fit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TooLarge {
    pub node: String,
    pub rule_set: u32,
    pub policies: Vec<PolicyRef>,
    /// Verdict entries it needed.
    pub entries: usize,
}

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.policies.iter().map(|p| p.to_string()).collect();
        write!(
            f,
            "node {}: the rule set of {} needs {} verdict entries and does not fit in the \
             dataplane with the node's other policies; the pods it selects deny every new flow \
             in that direction",
            self.node,
            names.join(", "),
            self.entries
        )
    }
}

fn is_exact(m: &VerdictMatch) -> bool {
    m.proto.is_some() && m.ports.is_some_and(|p| p.len == 16)
}

/// Makes `state` fit `caps`: while its verdicts do not fit, the rule set with the most
/// verdicts in the map that overflows loses all of its verdicts; while its classes do not
/// fit, the rule sets with the most verdicts lose theirs and the classes no verdict names
/// any more go. Returns the rule sets emptied.
pub fn fit(node: &str, state: &mut NodeState, caps: &Capacities) -> Vec<TooLarge> {
    let mut out = Vec::new();
    loop {
        let (mut exact, mut other) = (0usize, 0usize);
        let mut per_set: BTreeMap<u32, (usize, usize)> = BTreeMap::new();
        for m in state.verdicts.keys() {
            let e = per_set.entry(m.rule_set).or_default();
            if is_exact(m) {
                exact += 1;
                e.0 += 1;
            } else {
                other += 1;
                e.1 += 1;
            }
        }
        let (hosts, prefixes) = class_counts(state);
        let classes_over = hosts > caps.peer_hosts || prefixes > caps.peer_classes;
        let pick: Option<u32> = if exact > caps.verdicts_exact {
            largest(&per_set, |c| c.0)
        } else if other > caps.verdicts {
            largest(&per_set, |c| c.1)
        } else if classes_over {
            largest(&per_set, |c| c.0 + c.1)
        } else {
            return out;
        };
        let Some(rule_set) = pick else {
            // Classes that no verdict needs: they only decide nothing; drop the excess.
            drop_unused_classes(state);
            return out;
        };
        let entries = per_set[&rule_set].0 + per_set[&rule_set].1;
        state.verdicts.retain(|m, _| m.rule_set != rule_set);
        if classes_over {
            drop_unused_classes(state);
        }
        out.push(TooLarge {
            node: node.to_string(),
            rule_set,
            policies: state
                .rule_sets
                .get(&rule_set)
                .map(|i| i.policies.clone())
                .unwrap_or_default(),
            entries,
        });
    }
}

fn largest(
    per_set: &BTreeMap<u32, (usize, usize)>,
    n: impl Fn(&(usize, usize)) -> usize,
) -> Option<u32> {
    per_set
        .iter()
        .filter(|(_, c)| n(c) > 0)
        .max_by_key(|(id, c)| (n(c), std::cmp::Reverse(**id)))
        .map(|(id, _)| *id)
}

fn class_counts(state: &NodeState) -> (usize, usize) {
    let hosts = state
        .peer_classes
        .keys()
        .filter(|n| n.prefix_len() == n.max_prefix_len())
        .count();
    (hosts, state.peer_classes.len() - hosts)
}

/// Removes the classes no verdict names (their addresses then fall to a shorter prefix or
/// to unmatched, which only the emptied rule sets could have told apart).
fn drop_unused_classes(state: &mut NodeState) {
    let used: BTreeSet<u32> = state.verdicts.keys().map(|m| m.class).collect();
    state.peer_classes.retain(|_, c| used.contains(&c));
}

#[cfg(test)]
mod tests {
    use weir_api::{Action, Direction, PortPrefix, RuleSetInfo, VerdictEntry};

    use super::*;

    fn state() -> NodeState {
        let mut s = NodeState::default();
        let allow = VerdictEntry {
            action: Action::Allow,
            rule: 1,
        };
        // Rule set 1: 10 single ports; rule set 2: 3 single ports; rule set 3: one whole
        // protocol.
        for (set, ports) in [(1u32, 10u16), (2, 3)] {
            for port in 1..=ports {
                let m = VerdictMatch {
                    rule_set: set,
                    class: 1,
                    proto: Some(6),
                    ports: PortPrefix::new(port, 16),
                };
                s.verdicts.insert(m, allow);
            }
        }
        let m = VerdictMatch {
            rule_set: 3,
            class: 1,
            proto: Some(6),
            ports: None,
        };
        s.verdicts.insert(m, allow);
        for (id, name) in [(1, "big"), (2, "small"), (3, "web")] {
            s.rule_sets.insert(
                id,
                RuleSetInfo {
                    direction: Direction::Ingress,
                    policies: vec![PolicyRef::new("NetworkPolicy", "default", name)],
                },
            );
        }
        s.peer_classes.insert("10.0.0.1/32".parse().unwrap(), 1);
        s
    }

    #[test]
    fn a_state_that_fits_is_left_alone() {
        let mut s = state();
        let before = s.clone();
        assert!(fit("n1", &mut s, &Capacities::default()).is_empty());
        assert_eq!(s, before);
    }

    #[test]
    fn the_largest_rule_set_is_emptied_and_the_others_are_intact() {
        let mut s = state();
        let caps = Capacities {
            verdicts_exact: 12,
            ..Capacities::default()
        };
        let too_large = fit("n1", &mut s, &caps);
        assert_eq!(too_large.len(), 1);
        assert_eq!(too_large[0].rule_set, 1);
        assert_eq!(too_large[0].entries, 10);
        assert_eq!(too_large[0].policies[0].name, "big".into());
        assert!(
            too_large[0].to_string().contains("default/big"),
            "{}",
            too_large[0]
        );
        assert!(s.verdicts.keys().all(|m| m.rule_set != 1), "fails closed");
        assert_eq!(s.verdicts.keys().filter(|m| m.rule_set == 2).count(), 3);
        assert_eq!(s.verdicts.keys().filter(|m| m.rule_set == 3).count(), 1);
        // Rule set 1 denies everything now.
        let ip = "10.0.0.1".parse().unwrap();
        assert_eq!(s.verdict(1, ip, 6, 1).0, Action::Deny);
        assert_eq!(s.verdict(2, ip, 6, 1).0, Action::Allow);
    }

    #[test]
    fn emptying_goes_on_until_the_state_fits() {
        let mut s = state();
        let caps = Capacities {
            verdicts_exact: 2,
            ..Capacities::default()
        };
        let too_large: Vec<u32> = fit("n1", &mut s, &caps)
            .iter()
            .map(|t| t.rule_set)
            .collect();
        assert_eq!(too_large, [1, 2]);
        assert_eq!(s.verdicts.len(), 1);
    }
}
