//! The controller's ids → the ids this agent writes into its maps.
//!
//! Within one stream of states the controller never gives an id another meaning while the
//! maps may still hold the old one (an id released by one compile is handed out again only in
//! a later one). A restarted controller or a new leader, however, numbers peer classes, rule
//! sets and rules afresh, and an agent that restarted meanwhile does not know what its maps
//! hold. Written as they come, such a snapshot would let a packet meet, for a moment,
//! verdicts written for another rule set or class: the new verdicts are written before the
//! endpoints and prefixes move to them.
//!
//! So the agent translates. On every snapshot it matches the snapshot's classes and rule sets
//! to what its maps already hold, by content: a class by its exact set of address prefixes,
//! a rule set by its exact verdicts (over the matched classes), a rule by what it refers to.
//! A match keeps the dataplane id it has; everything else gets an id the maps do not use.
//! Diffs are translated through the same table, extended with unused ids for the controller
//! ids they introduce. A translated snapshot is then, against the maps, a diff in which no id
//! changes meaning, and the apply order that keeps every pod enforced at every instant holds.
//! Without a restart the controller's ids and the agent's are the same (an id is kept
//! whenever it is free).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use ipnet::IpNet;
use weir_api::{
    Action, CLASS_UNMATCHED, EndpointPolicy, IpProto, NOT_ISOLATED, NodeState, NodeStateDiff,
    PeerClasses, PortPrefix, RuleRef, TableDiff, VerdictEntry, VerdictMatch,
};
use weir_common::policy::FAIL_CLOSED;

/// What a node's policy maps hold, as far as matching needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyTables {
    pub peer_classes: PeerClasses,
    pub verdicts: BTreeMap<VerdictMatch, VerdictEntry>,
    /// What each rule id refers to, where known (not after an agent restart).
    pub rules: BTreeMap<u32, RuleRef>,
    /// Rule-set ids endpoints point at (some have no verdicts).
    pub rule_sets_in_use: BTreeSet<u32>,
}

impl PolicyTables {
    /// The tables of a state this agent applied.
    pub fn of(state: &NodeState) -> Self {
        let mut rule_sets_in_use: BTreeSet<u32> = state.rule_sets.keys().copied().collect();
        rule_sets_in_use.extend(state.endpoints.values().flat_map(|e| [e.ingress, e.egress]));
        Self {
            peer_classes: state.peer_classes.clone(),
            verdicts: state.verdicts.clone(),
            rules: state.rules.clone(),
            rule_sets_in_use,
        }
    }
}

/// Ids that stand for themselves in every table (none, unmatched, fail closed).
fn reserved(id: u32) -> bool {
    id == NOT_ISOLATED || id == CLASS_UNMATCHED || id == FAIL_CLOSED
}

/// One id space: controller id → dataplane id, a bijection.
#[derive(Clone, Debug, Default)]
struct Table {
    local: HashMap<u32, u32>,
    /// The image of `local`.
    taken: HashSet<u32>,
}

impl Table {
    fn insert(&mut self, id: u32, local: u32) {
        self.local.insert(id, local);
        self.taken.insert(local);
    }

    /// The dataplane id of `id`, given one if it has none: `id` itself when it is free,
    /// else the smallest free one. `avoid` holds ids the maps use beyond the table.
    fn get(&mut self, id: u32, avoid: &HashSet<u32>, cursor: &mut u32) -> u32 {
        if reserved(id) {
            return id;
        }
        if let Some(l) = self.local.get(&id) {
            return *l;
        }
        let free = |l: &u32| !reserved(*l) && !self.taken.contains(l) && !avoid.contains(l);
        let local = if free(&id) {
            id
        } else {
            while !free(cursor) {
                *cursor += 1;
            }
            *cursor
        };
        self.insert(id, local);
        local
    }

    fn peek(&self, id: u32) -> u32 {
        if reserved(id) {
            return id;
        }
        self.local.get(&id).copied().unwrap_or(id)
    }
}

/// The translation of one controller stream's ids.
#[derive(Clone, Debug, Default)]
pub struct IdTranslation {
    classes: Table,
    rule_sets: Table,
    rules: Table,
}

/// What a rule set's verdicts are, over dataplane class ids.
type Content = Vec<(u32, Option<IpProto>, Option<PortPrefix>, Action)>;

fn contents(
    verdicts: &BTreeMap<VerdictMatch, VerdictEntry>,
    class: impl Fn(u32) -> u32,
) -> BTreeMap<u32, Content> {
    let mut out: BTreeMap<u32, Content> = BTreeMap::new();
    for (m, v) in verdicts {
        out.entry(m.rule_set)
            .or_default()
            .push((class(m.class), m.proto, m.ports, v.action));
    }
    for c in out.values_mut() {
        c.sort_unstable_by_key(|(class, proto, ports, action)| {
            (*class, *proto, *ports, *action == Action::Allow)
        });
    }
    out
}

fn prefix_sets(peer_classes: &PeerClasses) -> BTreeMap<u32, Vec<IpNet>> {
    let mut out: BTreeMap<u32, Vec<IpNet>> = BTreeMap::new();
    for (net, class) in peer_classes {
        out.entry(class).or_default().push(net);
    }
    out
}

impl IdTranslation {
    /// The translation for `snapshot` over maps holding `applied`: matches by content, keeps
    /// the matched ids, and gives every other id one `applied` does not use.
    pub fn for_snapshot(snapshot: &NodeState, applied: &PolicyTables) -> Self {
        let mut t = Self::default();

        // Classes: the same set of prefixes.
        let old_classes = prefix_sets(&applied.peer_classes);
        let mut by_prefixes: HashMap<&[IpNet], u32> = old_classes
            .iter()
            .filter(|(c, _)| !reserved(**c))
            .map(|(c, nets)| (nets.as_slice(), *c))
            .collect();
        for (class, nets) in &prefix_sets(&snapshot.peer_classes) {
            if reserved(*class) {
                continue;
            }
            if let Some(old) = by_prefixes.remove(nets.as_slice()) {
                t.classes.insert(*class, old);
            }
        }
        let mut avoid: HashSet<u32> = old_classes.keys().copied().collect();
        avoid.extend(applied.verdicts.keys().map(|m| m.class));
        let mut cursor = 1;
        for class in snapshot
            .peer_classes
            .iter()
            .map(|(_, c)| c)
            .chain(snapshot.verdicts.keys().map(|m| m.class))
        {
            t.classes.get(class, &avoid, &mut cursor);
        }

        // Rule sets: the same verdicts over the matched classes.
        let mut by_content: HashMap<Content, Vec<u32>> = HashMap::new();
        let old_contents = contents(&applied.verdicts, |c| c);
        let mut avoid: HashSet<u32> = applied.rule_sets_in_use.iter().copied().collect();
        avoid.extend(old_contents.keys().copied());
        for id in &applied.rule_sets_in_use {
            if !reserved(*id) && !old_contents.contains_key(id) {
                by_content.entry(Vec::new()).or_default().push(*id);
            }
        }
        for (id, content) in old_contents {
            if !reserved(id) {
                by_content.entry(content).or_default().push(id);
            }
        }
        let new_contents = contents(&snapshot.verdicts, |c| t.classes.peek(c));
        let mut new_ids: BTreeSet<u32> = snapshot.rule_sets.keys().copied().collect();
        new_ids.extend(new_contents.keys().copied());
        new_ids.extend(
            snapshot
                .endpoints
                .values()
                .flat_map(|e| [e.ingress, e.egress]),
        );
        let empty = Content::new();
        for id in &new_ids {
            if reserved(*id) {
                continue;
            }
            let content = new_contents.get(id).unwrap_or(&empty);
            if let Some(old) = by_content.get_mut(content).and_then(|ids| ids.pop()) {
                t.rule_sets.insert(*id, old);
            }
        }
        let mut cursor = 1;
        for id in &new_ids {
            t.rule_sets.get(*id, &avoid, &mut cursor);
        }

        // Rules: what they refer to, when the maps' rules are known.
        let mut by_ref: HashMap<&RuleRef, u32> =
            applied.rules.iter().map(|(id, r)| (r, *id)).collect();
        for (id, r) in &snapshot.rules {
            if let Some(old) = by_ref.remove(r) {
                t.rules.insert(*id, old);
            }
        }
        // Then (the maps do not name rules after an agent restart) the rule of a verdict
        // that the maps hold at the same place.
        for (m, v) in &snapshot.verdicts {
            if reserved(v.rule) || t.rules.local.contains_key(&v.rule) {
                continue;
            }
            if let Some(old) = applied.verdicts.get(&t.verdict_match(m))
                && !reserved(old.rule)
                && !t.rules.taken.contains(&old.rule)
                && !applied.rules.contains_key(&old.rule)
            {
                t.rules.insert(v.rule, old.rule);
            }
        }
        let mut avoid: HashSet<u32> = applied.rules.keys().copied().collect();
        avoid.extend(applied.verdicts.values().map(|v| v.rule));
        let mut cursor = 1;
        for id in snapshot
            .rules
            .keys()
            .chain(snapshot.verdicts.values().map(|v| &v.rule))
        {
            t.rules.get(*id, &avoid, &mut cursor);
        }
        t
    }

    /// `state` in dataplane ids (every id in it must have one: call after
    /// [`Self::for_snapshot`] on the same state).
    pub fn state(&self, state: &NodeState) -> NodeState {
        NodeState {
            endpoints: state
                .endpoints
                .iter()
                .map(|(k, e)| (k.clone(), self.endpoint(e)))
                .collect(),
            peer_classes: state
                .peer_classes
                .iter()
                .map(|(n, c)| (n, self.classes.peek(c)))
                .collect(),
            verdicts: state
                .verdicts
                .iter()
                .map(|(m, v)| (self.verdict_match(m), self.verdict_entry(v)))
                .collect(),
            rules: state
                .rules
                .iter()
                .map(|(id, r)| (self.rules.peek(*id), r.clone()))
                .collect(),
            rule_sets: state
                .rule_sets
                .iter()
                .map(|(id, r)| (self.rule_sets.peek(*id), r.clone()))
                .collect(),
            routes: state.routes.clone(),
            services: state.services.clone(),
            prefilter: state.prefilter.clone(),
        }
    }

    /// `diff` in dataplane ids; controller ids it introduces get ids the translation has not
    /// handed out (a controller id keeps its dataplane id for the whole stream, so an id the
    /// controller reuses is reused here in the same diff, as safely).
    pub fn diff(&mut self, diff: &NodeStateDiff) -> NodeStateDiff {
        let none = HashSet::new();
        let (mut c1, mut c2, mut c3) = (1, 1, 1);
        for (_, e) in &diff.endpoints.upsert {
            self.rule_sets.get(e.ingress, &none, &mut c2);
            self.rule_sets.get(e.egress, &none, &mut c2);
        }
        for (_, c) in &diff.peer_classes.upsert {
            self.classes.get(*c, &none, &mut c1);
        }
        for (m, v) in &diff.verdicts.upsert {
            self.classes.get(m.class, &none, &mut c1);
            self.rule_sets.get(m.rule_set, &none, &mut c2);
            self.rules.get(v.rule, &none, &mut c3);
        }
        for (id, _) in &diff.rules.upsert {
            self.rules.get(*id, &none, &mut c3);
        }
        for (id, _) in &diff.rule_sets.upsert {
            self.rule_sets.get(*id, &none, &mut c2);
        }
        NodeStateDiff {
            from_version: diff.from_version,
            to_version: diff.to_version,
            endpoints: map_table(&diff.endpoints, |k| k.clone(), |e| self.endpoint(e)),
            peer_classes: map_table(&diff.peer_classes, |n| *n, |c| self.classes.peek(*c)),
            verdicts: map_table(
                &diff.verdicts,
                |m| self.verdict_match(m),
                |v| self.verdict_entry(v),
            ),
            rules: map_table(&diff.rules, |id| self.rules.peek(*id), |r| r.clone()),
            rule_sets: map_table(
                &diff.rule_sets,
                |id| self.rule_sets.peek(*id),
                |r| r.clone(),
            ),
            routes: diff.routes.clone(),
            services: diff.services.clone(),
            prefilter: diff.prefilter.clone(),
        }
    }

    fn endpoint(&self, e: &EndpointPolicy) -> EndpointPolicy {
        EndpointPolicy {
            ingress: self.rule_sets.peek(e.ingress),
            egress: self.rule_sets.peek(e.egress),
        }
    }

    fn verdict_match(&self, m: &VerdictMatch) -> VerdictMatch {
        VerdictMatch {
            rule_set: self.rule_sets.peek(m.rule_set),
            class: self.classes.peek(m.class),
            ..*m
        }
    }

    fn verdict_entry(&self, v: &VerdictEntry) -> VerdictEntry {
        VerdictEntry {
            rule: self.rules.peek(v.rule),
            ..*v
        }
    }

    /// Whether every id stands for itself (nothing was renumbered).
    pub fn is_identity(&self) -> bool {
        [&self.classes, &self.rule_sets, &self.rules]
            .iter()
            .all(|t| t.local.iter().all(|(a, b)| a == b))
    }
}

fn map_table<K: Ord + Clone, V: Clone, K2: Ord, V2>(
    t: &TableDiff<K, V>,
    key: impl Fn(&K) -> K2,
    value: impl Fn(&V) -> V2,
) -> TableDiff<K2, V2> {
    TableDiff {
        upsert: t.upsert.iter().map(|(k, v)| (key(k), value(v))).collect(),
        remove: t.remove.iter().map(key).collect(),
    }
}

#[cfg(test)]
mod tests {
    use weir_api::{Direction, PodKey, PolicyRef, RuleSetInfo};

    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn rule(policy: &str, index: u32) -> RuleRef {
        RuleRef {
            policy: PolicyRef::new("NetworkPolicy", "ns", policy),
            direction: Direction::Ingress,
            index,
            tiered: None,
        }
    }

    fn info(policy: &str) -> RuleSetInfo {
        RuleSetInfo {
            direction: Direction::Ingress,
            policies: vec![rule(policy, 0).policy],
        }
    }

    fn allow(rule_set: u32, class: u32, port: u16, rule: u32) -> (VerdictMatch, VerdictEntry) {
        (
            VerdictMatch {
                rule_set,
                class,
                proto: Some(6),
                ports: PortPrefix::new(port, 16),
            },
            VerdictEntry {
                action: Action::Allow,
                rule,
            },
        )
    }

    /// Two rule sets: `a` lets class "10.0.1.0/24" reach port 80, `b` lets class
    /// "10.0.2.0/24" reach port 443; pod x is under `a`, pod y under `b`. Ids as given.
    fn cluster(rs_a: u32, rs_b: u32, c1: u32, c2: u32, r_a: u32, r_b: u32) -> NodeState {
        NodeState {
            endpoints: [
                (
                    PodKey::new("ns", "x"),
                    EndpointPolicy {
                        ingress: rs_a,
                        egress: 0,
                    },
                ),
                (
                    PodKey::new("ns", "y"),
                    EndpointPolicy {
                        ingress: rs_b,
                        egress: 0,
                    },
                ),
            ]
            .into(),
            peer_classes: [(net("10.0.1.0/24"), c1), (net("10.0.2.0/24"), c2)].into(),
            verdicts: [allow(rs_a, c1, 80, r_a), allow(rs_b, c2, 443, r_b)].into(),
            rules: [(r_a, rule("a", 0)), (r_b, rule("b", 0))].into(),
            rule_sets: [(rs_a, info("a")), (rs_b, info("b"))].into(),
            ..Default::default()
        }
    }

    /// Every id the maps hold before and after stands for the same thing in both: the same
    /// prefixes for a class, the same verdicts for a rule set.
    fn assert_no_id_changes_meaning(before: &NodeState, after: &NodeState) {
        let (p0, p1) = (
            prefix_sets(&before.peer_classes),
            prefix_sets(&after.peer_classes),
        );
        for (class, nets) in &p1 {
            if let Some(old) = p0.get(class) {
                assert_eq!(old, nets, "class {class} changed meaning");
            }
        }
        let (v0, v1) = (
            contents(&before.verdicts, |c| c),
            contents(&after.verdicts, |c| c),
        );
        for (id, content) in &v1 {
            if let Some(old) = v0.get(id) {
                assert_eq!(old, content, "rule set {id} changed meaning");
            }
        }
    }

    #[test]
    fn the_same_ids_translate_to_themselves() {
        let applied = cluster(1, 2, 1, 2, 1, 2);
        let t = IdTranslation::for_snapshot(&applied, &PolicyTables::of(&applied));
        assert!(t.is_identity());
        assert_eq!(t.state(&applied), applied);
    }

    #[test]
    fn a_renumbered_snapshot_keeps_the_ids_the_maps_hold() {
        let applied = cluster(1, 2, 1, 2, 1, 2);
        // A restarted controller numbered everything the other way round.
        let snapshot = cluster(2, 1, 2, 1, 2, 1);
        let t = IdTranslation::for_snapshot(&snapshot, &PolicyTables::of(&applied));
        assert!(!t.is_identity());
        assert_eq!(t.state(&snapshot), applied, "nothing to write");
    }

    #[test]
    fn after_an_agent_restart_matching_reads_the_maps_alone() {
        let applied = cluster(1, 2, 1, 2, 1, 2);
        // What a restarted agent reads back: classes, verdicts and endpoints, no names.
        let tables = PolicyTables {
            rules: BTreeMap::new(),
            rule_sets_in_use: [1, 2].into(),
            ..PolicyTables::of(&applied)
        };
        let snapshot = cluster(2, 1, 2, 1, 2, 1);
        let local = IdTranslation::for_snapshot(&snapshot, &tables).state(&snapshot);
        assert_eq!(local.endpoints, applied.endpoints);
        assert_eq!(local.peer_classes, applied.peer_classes);
        // Rules are paired through the verdicts they decide.
        assert_eq!(local.verdicts, applied.verdicts);
        assert_no_id_changes_meaning(&applied, &local);
    }

    #[test]
    fn a_changed_rule_set_on_a_reused_id_gets_an_unused_one() {
        let applied = cluster(1, 2, 1, 2, 1, 2);
        // Meanwhile policy b changed its port; the new controller gave b's rule set id 1 and
        // a's id 2.
        let mut snapshot = cluster(2, 1, 1, 2, 1, 2);
        let (m, v) = allow(1, 2, 8443, 2);
        snapshot.verdicts.retain(|m, _| m.rule_set != 1);
        snapshot.verdicts.insert(m, v);
        let local =
            IdTranslation::for_snapshot(&snapshot, &PolicyTables::of(&applied)).state(&snapshot);
        assert_no_id_changes_meaning(&applied, &local);
        // a keeps its rule set; b's new one is neither of the ids the maps hold.
        assert_eq!(local.endpoints[&PodKey::new("ns", "x")].ingress, 1);
        let b = local.endpoints[&PodKey::new("ns", "y")].ingress;
        assert!(b != 1 && b != 2, "b got {b}");
        assert_eq!(local.rule_sets[&b], info("b"));
    }

    #[test]
    fn a_new_class_on_a_reused_id_gets_an_unused_one() {
        let applied = cluster(1, 2, 1, 2, 1, 2);
        // The second class now covers another prefix; the controller calls it 1, the first 2.
        let mut snapshot = cluster(1, 2, 2, 1, 1, 2);
        snapshot.peer_classes.remove(&net("10.0.2.0/24"));
        snapshot.peer_classes.insert(net("10.0.3.0/24"), 1);
        let local =
            IdTranslation::for_snapshot(&snapshot, &PolicyTables::of(&applied)).state(&snapshot);
        assert_no_id_changes_meaning(&applied, &local);
        assert_eq!(local.peer_classes.get(&net("10.0.1.0/24")), Some(1));
        assert!(![Some(1), Some(2)].contains(&local.peer_classes.get(&net("10.0.3.0/24"))));
    }

    #[test]
    fn diffs_follow_the_translation_and_new_ids_avoid_the_maps() {
        let applied = cluster(1, 2, 1, 2, 1, 2);
        let snapshot = cluster(2, 1, 2, 1, 2, 1);
        let mut t = IdTranslation::for_snapshot(&snapshot, &PolicyTables::of(&applied));
        let local = t.state(&snapshot);
        // The controller adds a rule set (its id 3 is free here too) and moves pod x to it,
        // then drops a's rule set.
        let mut next = snapshot.clone();
        next.rule_sets.remove(&2);
        next.verdicts.retain(|m, _| m.rule_set != 2);
        next.rule_sets.insert(3, info("c"));
        let (m, v) = allow(3, 1, 22, 1);
        next.verdicts.insert(m, v);
        next.endpoints.insert(
            PodKey::new("ns", "x"),
            EndpointPolicy {
                ingress: 3,
                egress: 0,
            },
        );
        let diff = t.diff(&snapshot.diff(&next, 1, 2));
        let mut after = local.clone();
        after.apply(&diff);
        assert_eq!(after, t.state(&next));
        assert_no_id_changes_meaning(&local, &after);
        assert_eq!(after.rule_sets.keys().copied().collect::<Vec<_>>(), [2, 3]);
        // Then the controller reuses its id 2 (our 1, released by the diff before).
        let mut later = next.clone();
        later.rule_sets.insert(2, info("d"));
        let (m, v) = allow(2, 2, 53, 2);
        later.verdicts.insert(m, v);
        let diff = t.diff(&next.diff(&later, 2, 3));
        let mut again = after.clone();
        again.apply(&diff);
        assert_eq!(again.rule_sets[&1], info("d"));
        assert_no_id_changes_meaning(&after, &again);
    }
}
