//! A restarted agent meeting a controller that numbers policy ids afresh: it reads back what
//! its maps hold and matches the snapshot to it, so no id written there changes meaning.

use std::path::PathBuf;

use weir_agent::{
    bpffs,
    dataplane::{Dataplane, PinLayout},
    maps::DataplaneMaps,
    renumber::{IdTranslation, PolicyTables},
};
use weir_api::{
    Action, Direction, EndpointPolicy, MapCapacities, NodeState, PodKey, PolicyRef, PortPrefix,
    RuleRef, RuleSetInfo, VerdictEntry, VerdictMatch,
};

/// The pins of one test node, removed however the test ends.
struct Pins(PinLayout);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = self.0.remove_all();
    }
}

fn pins(test: &str) -> Pins {
    let bpffs = PathBuf::from("/sys/fs/bpf");
    assert!(
        bpffs::is_bpffs(&bpffs).unwrap_or(false),
        "/sys/fs/bpf must be a bpf file system: run the tests as root (cargo xtask test)"
    );
    let node = format!("ids-{test}-{}", std::process::id());
    let layout = PinLayout::new(&bpffs, &node);
    let _ = layout.remove_all();
    Pins(layout)
}

fn load(pins: &PinLayout) -> (Dataplane, DataplaneMaps) {
    let mut dp = Dataplane::load_with(Some(pins.clone()), &MapCapacities::default())
        .expect("loading the programs");
    let maps = DataplaneMaps::take(&mut dp).expect("taking the maps");
    (dp, maps)
}

fn rule(policy: &str) -> RuleRef {
    RuleRef {
        policy: PolicyRef::new("NetworkPolicy", "ns", policy),
        direction: Direction::Ingress,
        index: 0,
        tiered: None,
    }
}

fn verdict(
    rule_set: u32,
    class: u32,
    ports: Option<PortPrefix>,
    action: Action,
    rule: u32,
) -> (VerdictMatch, VerdictEntry) {
    (
        VerdictMatch {
            rule_set,
            class,
            proto: Some(6),
            ports,
        },
        VerdictEntry { action, rule },
    )
}

/// Rule set `a` admits a /24 on port 80 (an exact verdict) and denies a host on a port range
/// (a trie verdict); rule set `b` admits the host on any TCP port. Ids as given.
fn state(rs: [u32; 2], class: [u32; 2], rules: [u32; 2]) -> NodeState {
    let info = |p: &str| RuleSetInfo {
        direction: Direction::Ingress,
        policies: vec![rule(p).policy],
    };
    NodeState {
        endpoints: [
            (
                PodKey::new("ns", "x"),
                EndpointPolicy {
                    ingress: rs[0],
                    egress: 0,
                },
            ),
            (
                PodKey::new("ns", "y"),
                EndpointPolicy {
                    ingress: rs[1],
                    egress: 0,
                },
            ),
        ]
        .into(),
        peer_classes: [
            ("10.1.0.0/24".parse().unwrap(), class[0]),
            ("10.2.0.7/32".parse().unwrap(), class[1]),
        ]
        .into(),
        verdicts: [
            verdict(
                rs[0],
                class[0],
                PortPrefix::new(80, 16),
                Action::Allow,
                rules[0],
            ),
            verdict(
                rs[0],
                class[1],
                PortPrefix::new(8000, 8),
                Action::Deny,
                rules[0],
            ),
            verdict(rs[1], class[1], None, Action::Allow, rules[1]),
        ]
        .into(),
        rules: [(rules[0], rule("a")), (rules[1], rule("b"))].into(),
        rule_sets: [(rs[0], info("a")), (rs[1], info("b"))].into(),
        ..Default::default()
    }
}

#[test]
fn a_restarted_agent_matches_a_renumbered_snapshot_to_its_maps() {
    let pins = pins("restart");
    let applied = state([1, 2], [1, 2], [1, 2]);
    {
        let (_dp, mut maps) = load(&pins.0);
        let written = maps
            .sync_policy(&applied, &NodeState::default())
            .expect("writing the policy");
        assert!(written.is_complete());
        let read = maps.read_policy_tables();
        assert_eq!(read.peer_classes, applied.peer_classes);
        assert_eq!(read.verdicts, applied.verdicts);
        // The agent exits; its maps stay pinned.
    }
    let (_dp, mut maps) = load(&pins.0);
    let read = maps.read_policy_tables();
    assert_eq!(
        read.verdicts, applied.verdicts,
        "the maps outlive the agent"
    );
    assert!(read.rules.is_empty(), "rules are not in the maps");

    // A restarted controller numbers everything the other way round, and a new rule set
    // appears on an id the maps use.
    let mut snapshot = state([2, 1], [2, 1], [2, 1]);
    snapshot.rule_sets.insert(
        3,
        RuleSetInfo {
            direction: Direction::Ingress,
            policies: vec![rule("c").policy],
        },
    );
    let (m, v) = verdict(3, 2, None, Action::Deny, 2);
    snapshot.verdicts.insert(m, v);
    let t = IdTranslation::for_snapshot(&snapshot, &read);
    let local = t.state(&snapshot);
    for (m, v) in &applied.verdicts {
        assert_eq!(local.verdicts.get(m), Some(v), "{m:?} keeps its meaning");
    }
    assert_eq!(local.peer_classes, applied.peer_classes);
    assert_eq!(local.endpoints, applied.endpoints);
    let new = local.endpoints.len();
    assert_eq!(new, 2);
    let fresh: Vec<u32> = local
        .rule_sets
        .keys()
        .copied()
        .filter(|id| !applied.rule_sets.contains_key(id))
        .collect();
    assert_eq!(fresh.len(), 1, "{:?}", local.rule_sets);
    assert!(![1, 2].contains(&fresh[0]));

    // Writing it changes no entry the maps held, and adds the new rule set's.
    let written = maps
        .sync_policy(&local, &NodeState::default())
        .expect("writing the translated snapshot");
    assert!(written.is_complete());
    maps.prune_policy(&local);
    let after = maps.read_policy_tables();
    assert_eq!(after.verdicts, local.verdicts);
    assert_eq!(PolicyTables::of(&local).peer_classes, after.peer_classes);
}
