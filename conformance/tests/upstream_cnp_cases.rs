//! The repository's translation of the network-policy-api ClusterNetworkPolicy conformance
//! suite (`cases/upstream-cnp.yaml`).

use std::path::Path;

use weir_conformance::cases::{PodRef, Verdict};
use weir_conformance::{CaseFile, Protocol};

fn load() -> CaseFile {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("cases/upstream-cnp.yaml");
    CaseFile::load(&path).unwrap_or_else(|error| panic!("{error}"))
}

fn pod(text: &str) -> PodRef {
    text.parse().expect("test pod")
}

fn kind(object: &serde_json::Value) -> &str {
    object["kind"].as_str().unwrap_or_default()
}

#[test]
fn cnp_suite_has_one_case_per_translatable_upstream_subtest_and_validates() {
    let file = load();
    // 92 upstream subtests, less the 5 of the two node-peer tests (no node destination).
    assert_eq!(file.cases.len(), 87);
    assert_eq!(
        file.model.namespaces,
        ["gryffindor", "slytherin", "hufflepuff", "ravenclaw"]
    );
    assert_eq!(file.model.pods, ["0", "1"]);
    assert_eq!(file.model.ports, [53, 80, 5353, 8080, 9003, 9005]);
    assert_eq!(file.model.protocols, Protocol::ALL);
    assert!(
        file.source
            .as_deref()
            .is_some_and(|source| source.contains("network-policy-api"))
    );
    assert!(file.cases.iter().all(|case| !case.is_experimental()));
}

#[test]
fn cnp_suite_probes_only_the_upstream_pairs_292_in_all() {
    let file = load();
    let mut probed = 0;
    for case in &file.cases {
        for step in &case.steps {
            for block in &step.expect {
                assert_eq!(block.default, None, "{}: probes unnamed pairs", case.name);
                assert_eq!(block.ports.len(), 1, "{}", case.name);
                assert_eq!(block.protocols.len(), 1, "{}", case.name);
                probed += block.allow.len() + block.deny.len();
            }
        }
    }
    assert_eq!(probed, 292);
}

#[test]
fn every_cnp_case_starts_by_applying_a_cluster_network_policy_of_its_tier() {
    let file = load();
    for case in &file.cases {
        let tier = if case.tags.iter().any(|tag| tag == "baseline") {
            "Baseline"
        } else {
            "Admin"
        };
        let first = &case.steps[0];
        assert!(
            first.apply.iter().any(|object| {
                kind(object) == "ClusterNetworkPolicy" && object["spec"]["tier"] == tier
            }),
            "{}: no {tier} ClusterNetworkPolicy in its first step",
            case.name
        );
    }
}

#[test]
fn rule_swap_case_applies_the_patched_policy_in_a_second_step() {
    let file = load();
    let case = file
        .cases
        .iter()
        .find(|case| {
            case.name
                == "CNPAdminTierIngressTCP: Should support an 'deny-ingress' policy for \
                          TCP protocol; ensure rule ordering is respected"
        })
        .expect("deny-ingress TCP case");
    assert_eq!(case.steps.len(), 2);
    let rule_names = |step: usize| -> Vec<String> {
        case.steps[step].apply[0]["spec"]["ingress"]
            .as_array()
            .expect("ingress rules")
            .iter()
            .map(|rule| rule["name"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    // Upstream swaps rules 0 and 1: Deny now precedes Accept for ravenclaw.
    assert_eq!(
        rule_names(0)[..2],
        [
            "allow-from-ravenclaw-everything",
            "deny-from-ravenclaw-everything"
        ]
    );
    assert_eq!(
        rule_names(1)[..2],
        [
            "deny-from-ravenclaw-everything",
            "allow-from-ravenclaw-everything"
        ]
    );
    assert!(case.steps[0].expect.is_empty());
    let verdicts: Vec<_> = case.steps[1]
        .expect
        .iter()
        .map(|block| block.verdict(&pod("ravenclaw/0"), &pod("gryffindor/1")))
        .collect();
    assert_eq!(verdicts[0], Some(Verdict::Deny));
}

#[test]
fn integration_case_passes_from_admin_tier_to_network_policy() {
    let file = load();
    let case = file
        .cases
        .iter()
        .find(|case| {
            case.name
                == "CNPAdminTierIntegration: Should support a 'pass-ingress' policy for \
                          admin CNP and respect the match for network policy"
        })
        .expect("integration pass-ingress case");
    let last = case.steps.last().expect("steps");
    let cnp = last
        .apply
        .iter()
        .find(|object| kind(object) == "ClusterNetworkPolicy")
        .expect("patched policy");
    assert_eq!(cnp["spec"]["ingress"][0]["action"], "Pass");
    let kinds: Vec<_> = case.steps[0].apply.iter().map(kind).collect();
    assert!(kinds.contains(&"NetworkPolicy"));
    assert_eq!(
        last.expect[0].verdict(&pod("slytherin/0"), &pod("gryffindor/0")),
        Some(Verdict::Allow)
    );
}
