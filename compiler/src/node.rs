//! One node's compile, in four steps:
//!
//! 1. [`View::endpoints`]: each local pod's selecting policies per direction; pods with the
//!    same policies (and, for ingress, the same meaning of the port names those policies use,
//!    since ingress named ports resolve against the local pod) share a *rule set*.
//! 2. [`View::rules`]: the rules of those rule sets, their ids, and the peers they refer to.
//! 3. Peer classes over those peers ([`Classification`]).
//! 4. [`View::verdicts`]: for each rule set and class, the union of what the rules allow
//!    towards the class, as longest-prefix verdict keys (allows only: the dataplane denies
//!    what matches nothing in an isolated direction).
//!
//! Ids come from the node's [`NodeMemory`], keyed by content (policy ids, class
//! signatures), so they stay stable across compiles.

use std::collections::{BTreeMap, BTreeSet};

use weir_api::{
    Action, CLASS_UNMATCHED, Direction, EndpointPolicy, NOT_ISOLATED, NodeState, PodKey,
    PolicyTier, RuleRef, RuleSetInfo, TieredAction, TieredRule, VerdictEntry, VerdictMatch,
};

use super::{
    HashMap, HashSet,
    classes::{Activation, ClassSignature, Classification, NodePeers},
    cluster::{Cluster, NsIdx, PodIdx, PodRecord},
    ids::IdAllocator,
    peers::{AtomKey, AtomMembers, CachedPolicy, PortNumbers, RuleAtoms, selects},
    policy::{PolicyKey, PolicyKind, PortMatch, Rule, RuleAction, Tier},
    ports::Allowances,
    subjects::SubjectIndex,
    tiers::{Coverage, Decision, TierEntry, TierRule, Tiers},
};

/// Id memory of one node.
#[derive(Debug, Default)]
pub(crate) struct NodeMemory {
    classes: IdAllocator<ClassSignature>,
    rule_sets: IdAllocator<RuleSetKey>,
    rules: IdAllocator<RuleKey>,
    /// The atoms the node's last compile read the members of (its rules' peers and egress
    /// named ports), sorted: when one of them changes, the node is recompiled.
    pub atoms: Box<[u32]>,
}

/// What a rule set is: its direction, its policies (ids, in policy-key order), and for
/// ingress what the port names they use mean on the pods it applies to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct RuleSetKey {
    direction: Direction,
    policies: Box<[u32]>,
    ports: Box<[(u32, Box<[u16]>)]>,
}

/// What a rule is: (policy id, direction, index in the policy's list).
type RuleKey = (u32, Direction, u32);

/// What every node's compile reads (shared by the compile threads).
pub(crate) struct View<'a> {
    pub cluster: &'a Cluster,
    pub members: &'a AtomMembers<'a>,
    pub policies: &'a HashMap<PolicyKey, CachedPolicy>,
    /// Policies per namespace, in key order (built once for a full compile; a one-node
    /// compile looks them up per namespace).
    pub by_namespace: Option<HashMap<NsIdx, Vec<&'a CachedPolicy>>>,
    /// Every ClusterNetworkPolicy, in evaluation order.
    pub cluster_policies: Vec<&'a CachedPolicy>,
    /// Every HostPolicy, in name order.
    pub host_policies: Vec<&'a CachedPolicy>,
    /// The pods each ClusterNetworkPolicy applies to, inverted; built by the first node
    /// compile that needs it, then shared by all.
    pub subjects: std::sync::OnceLock<SubjectIndex>,
    /// Test each ClusterNetworkPolicy's subject on each local pod instead of building the
    /// index: cheaper when only a few nodes are compiled.
    pub direct_subjects: bool,
}

/// The position of each of `policies` (by id) in the order of its [`weir_api::PolicyRef`]
/// (kind name, namespace, name), which leads the order of [`RuleRef`]s. A rule's rank for
/// attribution is then (position, direction, index), compared as integers: sorting a
/// node's rules by their `RuleRef`s compares kind and policy name strings, and a node with
/// ClusterNetworkPolicies has hundreds of rules of one kind. Only the node's own policies are
/// ordered (ranks are relative), so a change elsewhere costs the node nothing.
fn policy_order<'p>(policies: impl Iterator<Item = (u32, &'p PolicyKey)>) -> HashMap<u32, u32> {
    let mut by_ref: Vec<(u32, &PolicyKey)> = policies.collect();
    by_ref.sort_unstable_by(|(_, a), (_, b)| {
        (a.kind.as_str(), &a.namespace, &a.name)
            .cmp(&(b.kind.as_str(), &b.namespace, &b.name))
            // A HostPolicy's untracked part is named like it.
            .then(a.kind.cmp(&b.kind))
    });
    by_ref.dedup_by_key(|(id, _)| *id);
    by_ref
        .iter()
        .enumerate()
        .map(|(position, (id, _))| (*id, u32::try_from(position).unwrap_or(u32::MAX)))
        .collect()
}

/// The key of the node itself among its endpoints.
static HOST: std::sync::LazyLock<PodKey> = std::sync::LazyLock::new(PodKey::host);
static HOST_UNTRACKED: std::sync::LazyLock<PodKey> =
    std::sync::LazyLock::new(PodKey::host_untracked);

/// A rule set of one node during its compile.
struct LocalRuleSet<'a> {
    direction: Direction,
    /// Selecting policies, in key order.
    policies: Vec<&'a CachedPolicy>,
    /// Ingress: what the port names of its rules mean on its endpoints.
    ports: PortNumbers,
}

/// A local endpoint and the indexes of its rule sets.
struct LocalEndpoint<'a> {
    key: &'a PodKey,
    ingress: Option<usize>,
    egress: Option<usize>,
}

/// The rules of a node's rule sets, in the order first met, and the peers they refer to.
struct NodeRules {
    refs: Vec<RuleRef>,
    ids: Vec<u32>,
    /// Attribution priority of each rule (its rank in [`RuleRef`] order).
    rank: Vec<u32>,
    /// Inverse of `rank`.
    by_rank: Vec<usize>,
    /// First rule of each (policy id, direction); its rules follow in order.
    start: HashMap<(u32, Direction), usize>,
    peers: NodePeers,
}

impl<'a> View<'a> {
    pub fn compile_node(&self, memory: &mut NodeMemory, node: &str) -> NodeState {
        memory.classes.begin();
        memory.rule_sets.begin();
        memory.rules.begin();
        let state = self.build(memory, node);
        memory.classes.finish();
        memory.rule_sets.finish();
        memory.rules.finish();
        state
    }

    fn build(&self, memory: &mut NodeMemory, node: &str) -> NodeState {
        let (rule_sets, endpoints) = self.endpoints(node);
        let rules = self.rules(&rule_sets, memory);
        let peers = &rules.peers;
        let mut atoms: Vec<u32> = peers
            .selectors
            .iter()
            .chain(&peers.blocks)
            .chain(&peers.nodes)
            .chain(peers.egress_ports.keys())
            .copied()
            .collect();
        atoms.sort_unstable();
        atoms.dedup();
        memory.atoms = atoms.into_boxed_slice();

        let classes = Classification::classify(self.cluster, self.members, &rules.peers);
        let mut class_of = vec![CLASS_UNMATCHED];
        class_of.extend(memory.classes.assign(&classes.signatures[1..]));

        let set_keys: Vec<RuleSetKey> = rule_sets
            .iter()
            .map(|s| RuleSetKey {
                direction: s.direction,
                policies: s.policies.iter().map(|p| p.id).collect(),
                ports: s.ports.clone().into_boxed_slice(),
            })
            .collect();
        let set_ids = memory.rule_sets.assign(&set_keys);

        let verdicts = self.verdicts(&rule_sets, &set_ids, &rules, &classes, &class_of);
        let set_id = |s: Option<usize>| s.map_or(NOT_ISOLATED, |i| set_ids[i]);
        NodeState {
            endpoints: endpoints
                .into_iter()
                .map(|e| {
                    let policy = EndpointPolicy {
                        ingress: set_id(e.ingress),
                        egress: set_id(e.egress),
                    };
                    (e.key.clone(), policy)
                })
                .collect(),
            peer_classes: classes.peer_class_entries(&class_of),
            verdicts,
            rules: rules.ids.iter().copied().zip(rules.refs).collect(),
            rule_sets: set_ids
                .iter()
                .zip(&rule_sets)
                .map(|(id, s)| {
                    let info = RuleSetInfo {
                        direction: s.direction,
                        policies: s.policies.iter().map(|p| p.reference.clone()).collect(),
                    };
                    (*id, info)
                })
                .collect(),
            routes: Default::default(),
            // The same for every node but for the traffic policies: filled in by the
            // compiler from one table of the cluster's frontends.
            services: Default::default(),
            // The same for every node: filled in with the route table.
            prefilter: Default::default(),
        }
    }

    /// Step 1: the local endpoints and their rule sets.
    fn endpoints(&self, node: &str) -> (Vec<LocalRuleSet<'a>>, Vec<LocalEndpoint<'a>>) {
        let cluster = self.cluster;
        let mut by_namespace: BTreeMap<NsIdx, Vec<(PodIdx, &'a PodRecord)>> = BTreeMap::new();
        for pod in cluster.pods_on_node(node) {
            if let Some(r) = cluster.pod_record(pod) {
                by_namespace.entry(r.namespace).or_default().push((pod, r));
            }
        }
        let mut rule_sets: Vec<LocalRuleSet<'a>> = Vec::new();
        let mut index: HashMap<(Direction, Vec<u32>, PortNumbers), usize> = HashMap::default();
        let mut endpoints = Vec::new();
        for (namespace, pods) in by_namespace {
            let policies = self.namespace_policies(namespace);
            for (pod, record) in pods {
                let mut selecting: Vec<&'a CachedPolicy> = policies
                    .iter()
                    .copied()
                    .filter(|p| p.validated.policy.pod_selector.matches(&record.info.labels))
                    .collect();
                if !self.cluster_policies.is_empty() {
                    // Evaluation order: Admin tier, NetworkPolicies, Baseline tier.
                    let applying: std::borrow::Cow<'_, [u32]> = if self.direct_subjects {
                        self.subjects_of(record).into()
                    } else {
                        self.subjects().of(pod).into()
                    };
                    let tier = |tier: Tier| {
                        applying
                            .iter()
                            .map(|&i| self.cluster_policies[i as usize])
                            .filter(move |p| p.validated.policy.tier == tier)
                    };
                    selecting = tier(Tier::Admin)
                        .chain(selecting)
                        .chain(tier(Tier::Baseline))
                        .collect();
                }
                let mut set_of = |direction: Direction| -> Option<usize> {
                    let chosen: Vec<&'a CachedPolicy> = selecting
                        .iter()
                        .copied()
                        .filter(|p| p.rules(direction).is_some())
                        .collect();
                    if chosen.is_empty() {
                        return None;
                    }
                    let ports = match direction {
                        Direction::Ingress => self.endpoint_ports(&chosen, record),
                        Direction::Egress => Vec::new(),
                    };
                    let key = (
                        direction,
                        chosen.iter().map(|p| p.id).collect(),
                        ports.clone(),
                    );
                    let next = rule_sets.len();
                    let idx = *index.entry(key).or_insert(next);
                    if idx == next {
                        rule_sets.push(LocalRuleSet {
                            direction,
                            policies: chosen,
                            ports,
                        });
                    }
                    Some(idx)
                };
                let ingress = set_of(Direction::Ingress);
                let egress = set_of(Direction::Egress);
                endpoints.push(LocalEndpoint {
                    key: &record.info.key,
                    ingress,
                    egress,
                });
            }
        }
        // The node itself, isolated by the HostPolicies that select it, and its untracked
        // deny rules (a rule set of their own, for XDP).
        let labels = cluster.node_labels(node);
        let selected = |p: &&&'a CachedPolicy| {
            let selector = &p.validated.policy.pod_selector;
            match labels {
                Some(l) => selector.matches(l),
                // Without a Node object only a policy for every node applies.
                None => selector.matches(&Default::default()),
            }
        };
        let (untracked, host): (Vec<&'a CachedPolicy>, Vec<&'a CachedPolicy>) = self
            .host_policies
            .iter()
            .filter(selected)
            .copied()
            .partition(|p| p.validated.policy.key.kind == PolicyKind::UntrackedHostPolicy);
        let mut host_set = |direction: Direction, policies: &[&'a CachedPolicy]| {
            let chosen: Vec<&'a CachedPolicy> = policies
                .iter()
                .copied()
                .filter(|p| p.rules(direction).is_some())
                .collect();
            if chosen.is_empty() {
                return None;
            }
            rule_sets.push(LocalRuleSet {
                direction,
                policies: chosen,
                ports: Vec::new(),
            });
            Some(rule_sets.len() - 1)
        };
        let ingress = host_set(Direction::Ingress, &host);
        let egress = host_set(Direction::Egress, &host);
        if ingress.is_some() || egress.is_some() {
            endpoints.push(LocalEndpoint {
                key: &HOST,
                ingress,
                egress,
            });
        }
        if let Some(set) = host_set(Direction::Ingress, &untracked) {
            endpoints.push(LocalEndpoint {
                key: &HOST_UNTRACKED,
                ingress: Some(set),
                egress: None,
            });
        }
        (rule_sets, endpoints)
    }

    /// Step 2: the rules of the rule sets (with ids and attribution order) and their peers.
    fn rules(&self, rule_sets: &[LocalRuleSet<'a>], memory: &mut NodeMemory) -> NodeRules {
        let mut refs = Vec::new();
        let mut keys = Vec::new();
        let mut start = HashMap::default();
        let mut seen: HashSet<(u32, Direction)> = HashSet::default();
        let mut mine: Vec<(u32, &PolicyKey)> = Vec::new();
        let mut peers = NodePeers::default();
        for set in rule_sets {
            for &policy in &set.policies {
                if !seen.insert((policy.id, set.direction)) {
                    continue;
                }
                mine.push((policy.id, &policy.validated.policy.key));
                start.insert((policy.id, set.direction), refs.len());
                let written_policy = &policy.validated.policy;
                let tier = match written_policy.tier {
                    _ if written_policy.key.kind == PolicyKind::UntrackedHostPolicy => {
                        Some(PolicyTier::Untracked)
                    }
                    Tier::Admin => Some(PolicyTier::Admin),
                    Tier::Baseline => Some(PolicyTier::Baseline),
                    Tier::NetworkPolicy => None,
                };
                for (rule, atoms) in policy.written_rules(set.direction) {
                    refs.push(RuleRef {
                        policy: policy.reference.clone(),
                        direction: set.direction,
                        index: rule.index,
                        tiered: tier.map(|tier| TieredRule {
                            tier,
                            priority: written_policy.priority,
                            name: rule.name.clone().unwrap_or_default(),
                            action: match rule.action {
                                RuleAction::Allow => TieredAction::Accept,
                                RuleAction::Deny => TieredAction::Deny,
                                RuleAction::Pass => TieredAction::Pass,
                            },
                        }),
                    });
                    keys.push((policy.id, set.direction, rule.index));
                    for &atom in atoms.peers.iter().flatten() {
                        match self.members.key(atom) {
                            Some(AtomKey::Pods(_)) => {
                                peers.selectors.insert(atom);
                            }
                            Some(AtomKey::Block(_)) => {
                                peers.blocks.insert(atom);
                            }
                            Some(AtomKey::Nodes(_)) => {
                                peers.nodes.insert(atom);
                            }
                            _ => {}
                        }
                    }
                    if set.direction == Direction::Egress {
                        for &named in atoms.named.iter().flatten() {
                            peers
                                .egress_ports
                                .entry(named)
                                .or_insert(Activation::Peers(BTreeSet::new()))
                                .merge(atoms.peers.as_deref());
                        }
                    }
                }
            }
        }
        let ids = memory.rules.assign(&keys);
        // `RuleRef` order, from integers: (policy, direction, index) identifies a rule.
        let order = policy_order(mine.into_iter());
        let mut by_rank: Vec<usize> = (0..refs.len()).collect();
        by_rank.sort_unstable_by_key(|&i| {
            let (policy, direction, index) = keys[i];
            (
                order.get(&policy).copied().unwrap_or(u32::MAX),
                direction,
                index,
            )
        });
        let mut rank = vec![0u32; refs.len()];
        for (r, &i) in by_rank.iter().enumerate() {
            rank[i] = u32::try_from(r).unwrap_or(u32::MAX);
        }
        NodeRules {
            refs,
            ids,
            rank,
            by_rank,
            start,
            peers,
        }
    }

    /// Step 4: the verdict table.
    fn verdicts(
        &self,
        rule_sets: &[LocalRuleSet<'a>],
        set_ids: &[u32],
        rules: &NodeRules,
        classes: &Classification,
        class_of: &[u32],
    ) -> BTreeMap<VerdictMatch, VerdictEntry> {
        let present = classes.present();
        let present: Vec<usize> = (0..present.len()).filter(|i| present[*i]).collect();
        let mut classes_with_atom: HashMap<u32, Vec<usize>> = HashMap::default();
        for &s in &present {
            for &atom in classes.signatures[s].atoms() {
                classes_with_atom.entry(atom).or_default().push(s);
            }
        }
        let mut verdicts = Vec::new();
        let mut allowances: Vec<Option<Allowances<u32>>> = vec![None; classes.signatures.len()];
        let mut touched: Vec<usize> = Vec::new();
        let mut all_classes = present.clone();
        if all_classes.first() != Some(&0) {
            all_classes.insert(0, 0);
        }
        // Scratch of the tiered rule sets: the rules matching each class.
        let mut matched: Vec<Vec<u32>> = vec![Vec::new(); classes.signatures.len()];
        for (set, &set_id) in rule_sets.iter().zip(set_ids) {
            let tiered = set
                .policies
                .iter()
                .any(|p| p.validated.policy.tier != Tier::NetworkPolicy);
            if tiered {
                self.tiered_verdicts(
                    set,
                    set_id,
                    rules,
                    classes,
                    class_of,
                    &all_classes,
                    &classes_with_atom,
                    &mut matched,
                    &mut verdicts,
                );
                continue;
            }
            for &policy in &set.policies {
                let Some(&first) = rules.start.get(&(policy.id, set.direction)) else {
                    continue;
                };
                for (i, (rule, atoms)) in policy.written_rules(set.direction).enumerate() {
                    let matched: Vec<usize> = match &atoms.peers {
                        None => present.clone(),
                        Some(ids) => {
                            let mut m: Vec<usize> = ids
                                .iter()
                                .flat_map(|a| classes_with_atom.get(a).into_iter().flatten())
                                .copied()
                                .collect();
                            m.sort_unstable();
                            m.dedup();
                            m
                        }
                    };
                    let rank = rules.rank[first + i];
                    for class in matched {
                        let slot = &mut allowances[class];
                        if slot.is_none() {
                            touched.push(class);
                        }
                        let allow = slot.get_or_insert_with(Allowances::default);
                        add_rule_ports(allow, rank, rule.ports.as_deref(), &atoms.named, |named| {
                            match set.direction {
                                Direction::Ingress => set
                                    .ports
                                    .binary_search_by_key(&named, |(a, _)| *a)
                                    .map_or_else(|_| Vec::new(), |i| set.ports[i].1.to_vec()),
                                Direction::Egress => classes.signatures[class].port_numbers(named),
                            }
                        });
                    }
                }
            }
            for class in touched.drain(..) {
                let Some(allow) = allowances[class].take() else {
                    continue;
                };
                for entry in allow.entries() {
                    let rule = rules.by_rank[entry.rule as usize];
                    verdicts.push((
                        VerdictMatch {
                            rule_set: set_id,
                            class: class_of[class],
                            proto: entry.protocol.map(|p| p.number()),
                            ports: entry.ports,
                        },
                        VerdictEntry {
                            action: Action::Allow,
                            rule: rules.ids[rule],
                        },
                    ));
                }
            }
        }
        verdicts.into_iter().collect()
    }

    /// The verdicts of a rule set that ClusterNetworkPolicies take part in: for every class
    /// (the unmatched one included, as the tiers can allow what no rule names), the
    /// decision of the tiers over every protocol and port (the `tiers` module).
    ///
    /// A class's decision depends only on which of the set's rules match it (and, for
    /// egress, on what port names stand for at its addresses). So each rule's classes are
    /// found through `classes_with_atom`, as for NetworkPolicies; the decision is made once
    /// per distinct set of matching rules; and the classes no rule matches share one
    /// decision, which the dataplane's default already gives when the set is isolated by
    /// NetworkPolicies. A node holds hundreds of classes (every partner namespace of
    /// every ClusterNetworkPolicy of its pods) of which a rule set's rules match a few.
    #[expect(clippy::too_many_arguments, reason = "the parts of one node's compile")]
    fn tiered_verdicts(
        &self,
        set: &LocalRuleSet<'a>,
        set_id: u32,
        rules: &NodeRules,
        classes: &Classification,
        class_of: &[u32],
        all_classes: &[usize],
        classes_with_atom: &HashMap<u32, Vec<usize>>,
        matched: &mut [Vec<u32>],
        out: &mut Vec<(VerdictMatch, VerdictEntry)>,
    ) {
        let isolated = set
            .policies
            .iter()
            .any(|p| p.validated.policy.tier == Tier::NetworkPolicy);
        // The set's rules in evaluation order, and for each class the rules matching it
        // (indexes into `set_rules`, ascending).
        let mut set_rules: Vec<(&CachedPolicy, &Rule, &RuleAtoms, usize)> = Vec::new();
        for &policy in &set.policies {
            let Some(&first) = rules.start.get(&(policy.id, set.direction)) else {
                continue;
            };
            for (i, (rule, ratoms)) in policy.written_rules(set.direction).enumerate() {
                set_rules.push((policy, rule, ratoms, first + i));
            }
        }
        let mut touched: Vec<usize> = Vec::new();
        for (k, (_, _, ratoms, _)) in set_rules.iter().enumerate() {
            let k = u32::try_from(k).unwrap_or(u32::MAX);
            let mut mark = |class: usize| {
                let list = &mut matched[class];
                if list.is_empty() {
                    touched.push(class);
                }
                // A class containing several of the rule's peers is matched once.
                if list.last() != Some(&k) {
                    list.push(k);
                }
            };
            match &ratoms.peers {
                None => all_classes.iter().for_each(|&c| mark(c)),
                Some(ids) => ids
                    .iter()
                    .flat_map(|a| classes_with_atom.get(a).into_iter().flatten())
                    .for_each(|&c| mark(c)),
            }
        }
        let decide = |matching: &[u32], signature: &ClassSignature| -> Vec<TierEntry> {
            let mut tiers = Tiers::default();
            let mut np_rules: Vec<(u32, u32, Coverage)> = Vec::new();
            for &k in matching {
                let (policy, rule, ratoms, position) = set_rules[k as usize];
                let coverage =
                    rule_coverage(rule.ports.as_deref(), &ratoms.named, |named| {
                        match set.direction {
                            Direction::Ingress => set
                                .ports
                                .binary_search_by_key(&named, |(a, _)| *a)
                                .map_or_else(|_| Vec::new(), |i| set.ports[i].1.to_vec()),
                            Direction::Egress => signature.port_numbers(named),
                        }
                    });
                let id = rules.ids[position];
                let tier_rule = TierRule {
                    action: rule.action,
                    rule: id,
                    coverage,
                };
                match policy.validated.policy.tier {
                    Tier::Admin => tiers.admin.push(tier_rule),
                    Tier::Baseline => tiers.baseline.push(tier_rule),
                    Tier::NetworkPolicy => {
                        np_rules.push((rules.rank[position], id, tier_rule.coverage));
                    }
                }
            }
            if isolated {
                np_rules.sort_by_key(|r| r.0);
                tiers.network_policy =
                    Some(np_rules.into_iter().map(|(_, id, c)| (id, c)).collect());
            }
            tiers.entries()
        };
        let mut emit = |class: usize, entries: &[TierEntry]| {
            for &(protocol, ports, decision) in entries {
                out.push((
                    VerdictMatch {
                        rule_set: set_id,
                        class: class_of[class],
                        proto: protocol.map(|p| p.number()),
                        ports,
                    },
                    verdict_entry(decision),
                ));
            }
        };
        // Classes matched by the same rules, with the same port names' meaning (egress
        // resolves them at the destination, i.e. per class), decide alike.
        let mut decided: HashMap<(&[u32], &[u32]), Vec<TierEntry>> = HashMap::default();
        for &class in &touched {
            let signature = &classes.signatures[class];
            let resolutions = match set.direction {
                Direction::Ingress => &[][..],
                Direction::Egress => signature.port_resolutions(),
            };
            let matching = &matched[class][..];
            let entries = decided
                .entry((matching, resolutions))
                .or_insert_with(|| decide(matching, signature));
            emit(class, entries);
        }
        let unmatched = decide(&[], &classes.signatures[0]);
        if !unmatched.is_empty() {
            for &class in all_classes {
                if matched[class].is_empty() {
                    emit(class, &unmatched);
                }
            }
        }
        drop(decided);
        for class in touched {
            matched[class].clear();
        }
    }

    /// The ClusterNetworkPolicies (positions in `cluster_policies`) applying to each pod.
    /// The positions of the ClusterNetworkPolicies whose subject selects the pod, each
    /// subject tested on it.
    fn subjects_of(&self, record: &PodRecord) -> Vec<u32> {
        let Some(ns) = self.cluster.namespace_record(record.namespace) else {
            return Vec::new();
        };
        (0u32..)
            .zip(&self.cluster_policies)
            .filter(|(_, p)| {
                p.subject
                    .and_then(|a| self.members.key(a))
                    .is_some_and(|key| match key {
                        AtomKey::Pods(peer) => selects(peer, &record.info, &ns.labels),
                        _ => false,
                    })
            })
            .map(|(i, _)| i)
            .collect()
    }

    fn subjects(&self) -> &SubjectIndex {
        self.subjects.get_or_init(|| {
            let members: Vec<&[PodIdx]> = self
                .cluster_policies
                .iter()
                .map(|p| p.subject.map_or(&[][..], |a| self.members.pods(a)))
                .collect();
            SubjectIndex::new(&members)
        })
    }

    /// The policies of a namespace, in key order.
    fn namespace_policies(&self, namespace: NsIdx) -> Vec<&'a CachedPolicy> {
        if let Some(map) = &self.by_namespace {
            return map.get(&namespace).cloned().unwrap_or_default();
        }
        let Some(record) = self.cluster.namespace_record(namespace) else {
            return Vec::new();
        };
        self.cluster
            .policies_in(&record.name)
            .filter_map(|r| self.policies.get(&r.validated.policy.key))
            .collect()
    }

    /// What the port names used by `policies`' ingress rules mean on the pod (ingress named
    /// ports resolve against the destination, which is the local pod).
    fn endpoint_ports(&self, policies: &[&CachedPolicy], record: &PodRecord) -> PortNumbers {
        let names: BTreeSet<u32> = policies
            .iter()
            .flat_map(|p| p.ingress.iter())
            .flat_map(|r| r.named.iter().flatten().copied())
            .collect();
        names
            .into_iter()
            .filter_map(|atom| match self.members.key(atom) {
                Some(AtomKey::NamedPort { name, protocol }) => {
                    let numbers = record.info.resolve_port(name, *protocol);
                    (!numbers.is_empty()).then(|| (atom, numbers.into_boxed_slice()))
                }
                _ => None,
            })
            .collect()
    }
}

fn verdict_entry(d: Decision) -> VerdictEntry {
    VerdictEntry {
        action: d.action,
        rule: d.rule,
    }
}

/// What one rule matches towards one class. `named_ports` gives the numbers a named-port
/// atom stands for there.
fn rule_coverage(
    ports: Option<&[PortMatch]>,
    named: &[Option<u32>],
    named_ports: impl Fn(u32) -> Vec<u16>,
) -> Coverage {
    let Some(ports) = ports else {
        return Coverage::everything();
    };
    let mut c = Coverage::default();
    for (port, atom) in ports.iter().zip(named) {
        match port {
            PortMatch::AllOf(protocol) => c.add_protocol(*protocol),
            PortMatch::Range {
                protocol,
                first,
                last,
            } => c.add_ports(*protocol, *first, *last),
            PortMatch::Named { protocol, .. } => {
                for n in atom.map(&named_ports).unwrap_or_default() {
                    c.add_ports(*protocol, n, n);
                }
            }
        }
    }
    c
}

/// Adds what one rule allows towards one class. `named_ports` gives the numbers a
/// named-port atom stands for there.
fn add_rule_ports(
    allowances: &mut Allowances<u32>,
    rule: u32,
    ports: Option<&[PortMatch]>,
    named: &[Option<u32>],
    named_ports: impl Fn(u32) -> Vec<u16>,
) {
    let Some(ports) = ports else {
        allowances.allow_everything(rule);
        return;
    };
    for (port, atom) in ports.iter().zip(named) {
        match port {
            PortMatch::AllOf(protocol) => allowances.allow_protocol(*protocol, rule),
            PortMatch::Range {
                protocol,
                first,
                last,
            } => allowances.allow_ports(*protocol, *first, *last, rule),
            PortMatch::Named { protocol, .. } => {
                for n in atom.map(&named_ports).unwrap_or_default() {
                    allowances.allow_ports(*protocol, n, n, rule);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use weir_api::PolicyRef;

    use super::*;

    #[test]
    fn policy_order_is_the_order_of_policy_refs() {
        let keys = [
            PolicyKey::new("team-b", "allow"),
            PolicyKey::cluster("guard-2"),
            PolicyKey::new("team-a", "deny"),
            PolicyKey::host("nodes"),
            PolicyKey::cluster("guard-10"),
            PolicyKey::new("team-a", "allow"),
        ];
        // Ids as the compiler hands them out: small, not in key order, with a gap.
        let ids = [4u32, 0, 7, 2, 1, 3];
        let order = policy_order(ids.iter().copied().zip(&keys));
        let mut refs: Vec<(PolicyRef, u32)> = keys
            .iter()
            .zip(ids)
            .map(|(k, id)| (k.policy_ref(), id))
            .collect();
        refs.sort();
        for (position, (_, id)) in refs.iter().enumerate() {
            assert_eq!(order[id], position as u32, "{:?}", refs[position].0);
        }
        assert_eq!(order.len(), keys.len());
    }
}
