//! The repository's translation of the upstream Kubernetes NetworkPolicy e2e suite.

use std::path::Path;

use weir_conformance::cases::{PodRef, Verdict};
use weir_conformance::{CaseFile, Protocol};

fn load() -> CaseFile {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("cases/upstream-netpol.yaml");
    CaseFile::load(&path).unwrap_or_else(|error| panic!("{error}"))
}

fn pod(text: &str) -> PodRef {
    text.parse().expect("test pod")
}

#[test]
fn upstream_suite_has_all_48_cases_and_validates() {
    let file = load();
    assert_eq!(file.cases.len(), 48);
    assert_eq!(file.model.namespaces, ["x", "y", "z"]);
    assert_eq!(file.model.pods, ["a", "b", "c"]);
    assert_eq!(file.model.ports, [80, 81]);
    assert_eq!(file.model.protocols, Protocol::ALL);
    assert!(
        file.source
            .as_deref()
            .is_some_and(|source| source.contains("network_policy.go"))
    );
}

#[test]
fn every_upstream_case_starts_with_an_all_allowed_readiness_step() {
    let file = load();
    for case in &file.cases {
        let first = &case.steps[0];
        assert!(
            first.apply.is_empty() && first.delete.is_empty(),
            "{}",
            case.name
        );
        assert!(!first.expect.is_empty(), "{}", case.name);
        for block in &first.expect {
            assert!(
                block.default == Some(Verdict::Allow) && block.deny.is_empty(),
                "{}: readiness step denies something",
                case.name
            );
        }
        assert!(case.steps.len() >= 2, "{}: no policy step", case.name);
    }
}

#[test]
fn upstream_suite_covers_every_protocol_and_no_case_is_experimental() {
    let file = load();
    for protocol in Protocol::ALL {
        let probed = file.cases.iter().any(|case| {
            case.steps.iter().any(|step| {
                step.expect
                    .iter()
                    .any(|block| block.protocols.contains(&protocol))
            })
        });
        assert!(probed, "no case probes {protocol}");
    }
    assert!(file.cases.iter().all(|case| !case.is_experimental()));
}

#[test]
fn default_deny_ingress_case_expects_upstream_truth_table() {
    let file = load();
    let case = file
        .cases
        .iter()
        .find(|case| case.name == "should support a 'default-deny-ingress' policy")
        .expect("case present");
    let block = &case.steps[1].expect[0];
    assert_eq!(block.ports, [80]);
    assert_eq!(block.protocols, [Protocol::Tcp]);
    for from in file.model.pod_refs() {
        for to in file.model.pod_refs() {
            let expected = if to.namespace == "x" && from != to {
                Verdict::Deny
            } else {
                Verdict::Allow
            };
            assert_eq!(block.verdict(&from, &to), Some(expected), "{from} -> {to}");
        }
    }
    assert_eq!(
        block.verdict(&pod("x/a"), &pod("x/a")),
        Some(Verdict::Allow)
    );
}

#[test]
fn upstream_service_suite_validates_and_names_its_sources() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("cases/upstream-services.yaml");
    let file = CaseFile::load(&path).unwrap_or_else(|error| panic!("{error}"));
    assert!(
        file.source
            .as_deref()
            .is_some_and(|source| source.contains("service.go"))
    );
    let text = std::fs::read_to_string(&path).expect("readable");
    for case in &file.cases {
        // Every case is preceded by a comment naming where it comes from.
        let at = text
            .find(&format!("name: \"{}\"", case.name))
            .unwrap_or_else(|| panic!("{} not found", case.name));
        let before = &text[..at];
        let comment = before.lines().rev().nth(1).unwrap_or_default().trim_start();
        assert!(
            comment.starts_with('#'),
            "{}: no comment before it",
            case.name
        );
    }
    let itp = file
        .cases
        .iter()
        .find(|case| case.name == "should respect internalTrafficPolicy=Local Pod to Pod")
        .expect("internalTrafficPolicy case");
    assert_eq!(itp.required_nodes(), Some(2));
}
