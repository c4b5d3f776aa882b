//! The runner against an in-memory cluster: a tiny policy engine (ingress isolation by
//! podSelector labels, allow-all rules) plus scripted probe outcomes for flakiness.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use weir_conformance::cases::{Labels, ObjectRef};
use weir_conformance::runner::{CaseStatus, Probe, RetryPolicy, RunOptions, RunSummary, run};
use weir_conformance::{CaseFile, Driver, Families, Family, PodRef, ProbeOutcome, Protocol};

const MODEL: &str = "
format: weir-reachability/v1
model:
  namespaces: [x, y]
  pods: [a, b]
  ports: [80, 81]
  protocols: [TCP, UDP]
cases:
";

const DENY_INGRESS_X: &str = "
          - apiVersion: networking.k8s.io/v1
            kind: NetworkPolicy
            metadata: {name: deny-ingress, namespace: x}
            spec: {podSelector: {}, policyTypes: [Ingress]}
";

type PairKey = (PodRef, PodRef, u16, Protocol);

/// An in-memory cluster.
struct FakeCluster {
    pod_labels: BTreeMap<PodRef, Labels>,
    namespace_labels: BTreeMap<String, Labels>,
    /// Every pod's addresses: IPv4 10.0.0.x and IPv6 fd00::x (a dual-stack cluster).
    ips: BTreeMap<PodRef, Vec<IpAddr>>,
    initial_pod_labels: BTreeMap<PodRef, Labels>,
    initial_namespace_labels: BTreeMap<String, Labels>,
    policies: BTreeMap<(String, String), Value>,
    /// When false the dataplane ignores every policy (a broken implementation).
    enforce: bool,
    experimental: bool,
    /// Outcomes handed out, in order, before the policy engine answers for a pair.
    scripted: Mutex<BTreeMap<PairKey, VecDeque<ProbeOutcome>>>,
    /// Every probe made, in order.
    probes: Mutex<Vec<Probe>>,
    /// Every state-changing call, in order.
    calls: Vec<String>,
    /// Object name whose apply fails.
    fail_apply: Option<String>,
}

impl FakeCluster {
    fn new(file: &CaseFile) -> FakeCluster {
        let model = &file.model;
        let pods = model.pod_refs();
        let pod_labels: BTreeMap<_, _> = pods
            .iter()
            .map(|pod| (pod.clone(), model.pod_labels(pod)))
            .collect();
        let namespace_labels: BTreeMap<_, _> = model
            .namespaces
            .iter()
            .map(|namespace| (namespace.clone(), model.namespace_labels(namespace)))
            .collect();
        let ips = pods
            .iter()
            .enumerate()
            .map(|(index, pod)| {
                let last = u8::try_from(index + 10).expect("small model");
                let v4 = IpAddr::V4(Ipv4Addr::new(10, 0, 0, last));
                let v6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last.into()));
                (pod.clone(), vec![v4, v6])
            })
            .collect();
        FakeCluster {
            initial_pod_labels: pod_labels.clone(),
            initial_namespace_labels: namespace_labels.clone(),
            pod_labels,
            namespace_labels,
            ips,
            policies: BTreeMap::new(),
            enforce: true,
            experimental: false,
            scripted: Mutex::new(BTreeMap::new()),
            probes: Mutex::new(Vec::new()),
            calls: Vec::new(),
            fail_apply: None,
        }
    }

    fn script(
        &self,
        from: &str,
        to: &str,
        port: u16,
        protocol: Protocol,
        outcomes: &[ProbeOutcome],
    ) {
        let key = (pod(from), pod(to), port, protocol);
        self.scripted
            .lock()
            .expect("script lock")
            .entry(key)
            .or_default()
            .extend(outcomes.iter().cloned());
    }

    fn probes_of(&self, from: &str, to: &str, port: u16, protocol: Protocol) -> Vec<Probe> {
        self.probes
            .lock()
            .expect("probe log")
            .iter()
            .filter(|probe| {
                probe.from == pod(from)
                    && probe.to == pod(to)
                    && probe.target.port() == port
                    && probe.protocol == protocol
            })
            .cloned()
            .collect()
    }

    /// Ingress isolation: a policy selecting the destination with Ingress in policyTypes
    /// isolates it; an `ingress: [{}]` rule allows everything again.
    fn verdict(&self, probe: &Probe) -> ProbeOutcome {
        if probe.from == probe.to || !self.enforce {
            return ProbeOutcome::Connected;
        }
        let labels = &self.pod_labels[&probe.to];
        let selecting: Vec<&Value> = self
            .policies
            .iter()
            .filter(|((namespace, _), _)| *namespace == probe.to.namespace)
            .map(|(_, policy)| policy)
            .filter(|policy| {
                let selector = &policy["spec"]["podSelector"]["matchLabels"];
                selector.as_object().is_none_or(|wanted| {
                    wanted
                        .iter()
                        .all(|(key, value)| labels.get(key).map(String::as_str) == value.as_str())
                })
            })
            .filter(|policy| {
                policy["spec"]["policyTypes"]
                    .as_array()
                    .is_some_and(|types| types.iter().any(|kind| kind == "Ingress"))
            })
            .collect();
        if selecting.is_empty()
            || selecting.iter().any(|policy| {
                policy["spec"]["ingress"]
                    .as_array()
                    .is_some_and(|rules| !rules.is_empty())
            })
        {
            ProbeOutcome::Connected
        } else {
            ProbeOutcome::TimedOut
        }
    }
}

impl Driver for FakeCluster {
    type Error = String;

    fn supports_experimental(&self) -> bool {
        self.experimental
    }

    async fn pod_ip(&self, pod: &PodRef, family: Family) -> Option<IpAddr> {
        family.pick(self.ips.get(pod)?)
    }

    async fn reset(&mut self) -> Result<(), String> {
        self.calls.push("reset".to_owned());
        self.policies.clear();
        self.pod_labels = self.initial_pod_labels.clone();
        self.namespace_labels = self.initial_namespace_labels.clone();
        Ok(())
    }

    async fn set_pod_labels(&mut self, pod: &PodRef, labels: Labels) -> Result<(), String> {
        self.calls.push(format!("pod-labels {pod} {labels:?}"));
        self.pod_labels.insert(pod.clone(), labels);
        Ok(())
    }

    async fn set_namespace_labels(
        &mut self,
        namespace: &str,
        labels: Labels,
    ) -> Result<(), String> {
        self.calls
            .push(format!("namespace-labels {namespace} {labels:?}"));
        self.namespace_labels.insert(namespace.to_owned(), labels);
        Ok(())
    }

    async fn apply(&mut self, object: Value) -> Result<(), String> {
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        self.calls
            .push(format!("apply {namespace}/{name} {}", object["spec"]));
        if self.fail_apply.as_deref() == Some(name.as_str()) {
            return Err("admission webhook said no".to_owned());
        }
        self.policies.insert((namespace, name), object);
        Ok(())
    }

    async fn delete(&mut self, object: &ObjectRef) -> Result<(), String> {
        self.calls.push(format!("delete {object}"));
        let key = (
            object.namespace.clone().unwrap_or_default(),
            object.name.clone(),
        );
        self.policies
            .remove(&key)
            .map(drop)
            .ok_or_else(|| format!("{object} not found"))
    }

    async fn sync(&mut self) -> Result<(), String> {
        self.calls.push("sync".to_owned());
        Ok(())
    }

    async fn probe(&self, probes: &[Probe]) -> Vec<ProbeOutcome> {
        let mut outcomes = Vec::with_capacity(probes.len());
        for probe in probes {
            self.probes.lock().expect("probe log").push(probe.clone());
            if !self
                .ips
                .get(&probe.to)
                .is_some_and(|ips| ips.contains(&probe.target.ip()))
            {
                outcomes.push(ProbeOutcome::Error(
                    "probe target is not the pod's IP".to_owned(),
                ));
                continue;
            }
            let key = (
                probe.from.clone(),
                probe.to.clone(),
                probe.target.port(),
                probe.protocol,
            );
            let scripted = self
                .scripted
                .lock()
                .expect("script lock")
                .get_mut(&key)
                .and_then(VecDeque::pop_front);
            outcomes.push(scripted.unwrap_or_else(|| self.verdict(probe)));
        }
        outcomes
    }
}

fn pod(text: &str) -> PodRef {
    text.parse().expect("test pod")
}

fn options() -> RunOptions {
    RunOptions {
        probe_timeout: Duration::from_millis(100),
        retry: RetryPolicy {
            allow_retries: 2,
            deny_confirmations: 2,
            retry_timeout: Duration::from_millis(300),
            propagation_grace: Duration::from_millis(1),
            retry_pause: Duration::from_millis(1),
        },
        verbose: false,
        case_filter: None,
        skip_tags: Vec::new(),
        families: Families::Ipv4,
    }
}

fn load(cases: &str) -> CaseFile {
    CaseFile::parse(&format!("{MODEL}{cases}"), "test").expect("valid test file")
}

async fn run_file(
    file: &CaseFile,
    cluster: &mut FakeCluster,
    options: &RunOptions,
) -> (RunSummary, String) {
    let mut out = Vec::new();
    let summary = run(file, cluster, options, &mut out)
        .await
        .expect("report written");
    (summary, String::from_utf8(out).expect("utf-8 report"))
}

fn deny_case(name: &str) -> String {
    format!(
        "
  - name: {name}
    steps:
      - apply:{DENY_INGRESS_X}        expect:
          - ports: [80]
            protocols: [TCP]
            default: allow
            deny: [\"*/* -> x/*\"]
"
    )
}

#[tokio::test]
async fn enforcing_cluster_passes_and_counts() {
    let file = load(&deny_case("deny ingress in x"));
    let mut cluster = FakeCluster::new(&file);
    let (summary, out) = run_file(&file, &mut cluster, &options()).await;
    assert_eq!((summary.passed, summary.failed, summary.skipped), (1, 0, 0));
    assert!(summary.success());
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("PASS deny ingress in x ("), "{out}");
    assert!(lines[0].ends_with("s)"), "{out}");
    assert_eq!(lines.last().copied(), Some("1 passed, 0 failed"));
    // 4 pods squared, one port, one protocol.
    assert_eq!(summary.cases[0].steps[0].blocks[0].pairs, 16);
}

#[tokio::test]
async fn broken_dataplane_fails_with_truth_tables_marking_mismatches() {
    let file = load(&deny_case("deny ingress in x"));
    let mut cluster = FakeCluster::new(&file);
    cluster.enforce = false;
    let (summary, out) = run_file(&file, &mut cluster, &options()).await;
    assert_eq!((summary.passed, summary.failed), (0, 1));
    assert!(!summary.success());
    let expected_table = "\
    TCP/80 expected:
    -    x/a  x/b  y/a  y/b
    x/a  .    X    .    .
    x/b  X    .    .    .
    y/a  X    X    .    .
    y/b  X    X    .    .
    TCP/80 observed (* = mismatch):
    -    x/a  x/b  y/a  y/b
    x/a  .    .*   .    .
    x/b  .*   .    .    .
    y/a  .*   .*   .    .
    y/b  .*   .*   .    .
";
    assert!(out.contains(expected_table), "{out}");
    assert!(
        out.contains("  step 1, expect block 1: 6 of 16 pairs do not match"),
        "{out}"
    );
    assert!(
        out.contains(
            "    mismatch: y/a -> x/b TCP/80: expected deny, observed connected, then connected"
        ),
        "{out}"
    );
    assert!(out.contains("FAIL deny ingress in x ("), "{out}");
    assert!(out.ends_with("0 passed, 1 failed\n"), "{out}");
    let mismatches = &summary.cases[0].steps[0].blocks[0].mismatches;
    assert_eq!(mismatches.len(), 6);
}

#[tokio::test]
async fn expected_allow_recovers_after_a_lost_first_attempt_with_longer_timeouts() {
    let file = load(&deny_case("deny ingress in x"));
    let mut cluster = FakeCluster::new(&file);
    cluster.script(
        "x/a",
        "y/b",
        80,
        Protocol::Tcp,
        &[ProbeOutcome::TimedOut, ProbeOutcome::TimedOut],
    );
    let (summary, out) = run_file(&file, &mut cluster, &options()).await;
    assert_eq!(summary.cases[0].status, CaseStatus::Pass, "{out}");
    let probes = cluster.probes_of("x/a", "y/b", 80, Protocol::Tcp);
    let timeouts: Vec<u128> = probes
        .iter()
        .map(|probe| probe.timeout.as_millis())
        .collect();
    assert_eq!(timeouts, vec![100, 300, 300]);
    let reprobed = &summary.cases[0].steps[0].blocks[0].reprobed;
    assert_eq!(reprobed.len(), 1);
    assert_eq!(reprobed[0].attempts.len(), 3);
    assert!(
        out.contains("re-probed: x/a -> y/b TCP/80: expected allow, observed timed out, then timed out, then connected"),
        "{out}"
    );
}

#[tokio::test]
async fn expected_allow_that_stays_denied_fails_after_the_retries() {
    let file = load(&deny_case("deny ingress in x"));
    let mut cluster = FakeCluster::new(&file);
    cluster.script(
        "x/a",
        "y/b",
        80,
        Protocol::Tcp,
        &vec![ProbeOutcome::Refused; 5],
    );
    let (summary, out) = run_file(&file, &mut cluster, &options()).await;
    assert_eq!(summary.cases[0].status, CaseStatus::Fail);
    assert_eq!(
        cluster.probes_of("x/a", "y/b", 80, Protocol::Tcp).len(),
        3,
        "1 + allow_retries"
    );
    assert!(out.contains("    x/a  .    X    .    X*\n"), "{out}");
}

#[tokio::test]
async fn expected_deny_connected_once_passes_only_when_every_confirmation_is_denied() {
    let file = load(&deny_case("deny ingress in x"));
    let mut cluster = FakeCluster::new(&file);
    // Late propagation: the first probe gets through, later ones are denied by the engine.
    cluster.script("y/a", "x/a", 80, Protocol::Tcp, &[ProbeOutcome::Connected]);
    let (summary, out) = run_file(&file, &mut cluster, &options()).await;
    assert_eq!(summary.cases[0].status, CaseStatus::Pass, "{out}");
    let probes = cluster.probes_of("y/a", "x/a", 80, Protocol::Tcp);
    let timeouts: Vec<u128> = probes
        .iter()
        .map(|probe| probe.timeout.as_millis())
        .collect();
    assert_eq!(
        timeouts,
        vec![100, 300, 300],
        "confirmations use the longer timeout"
    );
    assert!(
        out.contains("re-probed: y/a -> x/a TCP/80: expected deny"),
        "{out}"
    );
}

#[tokio::test]
async fn expected_deny_that_connects_again_after_the_grace_fails() {
    let file = load(&deny_case("deny ingress in x"));
    let mut cluster = FakeCluster::new(&file);
    // Intermittent leak: allowed, denied, allowed. A "retry until it times out" rule would
    // pass this; the runner must not.
    cluster.script(
        "y/a",
        "x/a",
        80,
        Protocol::Tcp,
        &[
            ProbeOutcome::Connected,
            ProbeOutcome::TimedOut,
            ProbeOutcome::Connected,
        ],
    );
    let (summary, out) = run_file(&file, &mut cluster, &options()).await;
    assert_eq!(summary.cases[0].status, CaseStatus::Fail, "{out}");
    assert!(out.contains("    y/a  .*   X    .    .\n"), "{out}");
    assert!(
        out.contains("mismatch: y/a -> x/a TCP/80: expected deny, observed connected, then timed out, then connected"),
        "{out}"
    );
}

#[tokio::test]
async fn expected_deny_that_connects_stops_retrying_at_the_first_connection() {
    let file = load(&deny_case("deny ingress in x"));
    let mut cluster = FakeCluster::new(&file);
    cluster.script(
        "y/a",
        "x/a",
        80,
        Protocol::Tcp,
        &[ProbeOutcome::Connected, ProbeOutcome::Connected],
    );
    let (summary, _) = run_file(&file, &mut cluster, &options()).await;
    assert_eq!(summary.cases[0].status, CaseStatus::Fail);
    assert_eq!(cluster.probes_of("y/a", "x/a", 80, Protocol::Tcp).len(), 2);
}

#[tokio::test]
async fn without_confirmations_a_connected_expected_deny_fails_at_once() {
    let file = load(&deny_case("deny ingress in x"));
    let mut cluster = FakeCluster::new(&file);
    cluster.script("y/a", "x/a", 80, Protocol::Tcp, &[ProbeOutcome::Connected]);
    let mut options = options();
    options.retry.deny_confirmations = 0;
    let (summary, _) = run_file(&file, &mut cluster, &options).await;
    assert_eq!(summary.cases[0].status, CaseStatus::Fail);
    assert_eq!(cluster.probes_of("y/a", "x/a", 80, Protocol::Tcp).len(), 1);
}

#[tokio::test]
async fn probe_errors_are_never_retried_and_always_fail() {
    let file = load(&deny_case("deny ingress in x"));
    let mut cluster = FakeCluster::new(&file);
    cluster.script(
        "y/a",
        "x/a",
        80,
        Protocol::Tcp,
        &[ProbeOutcome::Error("no netns".to_owned())],
    );
    let (summary, out) = run_file(&file, &mut cluster, &options()).await;
    assert_eq!(summary.cases[0].status, CaseStatus::Fail);
    assert_eq!(cluster.probes_of("y/a", "x/a", 80, Protocol::Tcp).len(), 1);
    assert!(out.contains("    y/a  ?*   X    .    .\n"), "{out}");
    assert!(out.contains("observed error: no netns"), "{out}");
}

#[tokio::test]
async fn experimental_cases_are_skipped_unless_the_driver_supports_them() {
    let cases = format!(
        "{}
  - name: future fields
    tags: [experimental]
    steps:
      - expect: [{{default: allow}}]
",
        deny_case("plain")
    );
    let file = load(&cases);
    let mut cluster = FakeCluster::new(&file);
    let (summary, out) = run_file(&file, &mut cluster, &options()).await;
    assert_eq!((summary.passed, summary.failed, summary.skipped), (1, 0, 1));
    assert!(summary.success());
    assert!(out.contains("SKIP future fields ("), "{out}");
    assert!(out.ends_with("1 passed, 0 failed, 1 skipped\n"), "{out}");
    assert_eq!(summary.cases[1].status, CaseStatus::Skip);

    let mut cluster = FakeCluster::new(&file);
    cluster.experimental = true;
    let (summary, out) = run_file(&file, &mut cluster, &options()).await;
    assert_eq!((summary.passed, summary.failed, summary.skipped), (2, 0, 0));
    assert!(out.ends_with("2 passed, 0 failed\n"), "{out}");
}

#[tokio::test]
async fn step_parts_run_in_format_order_then_sync_then_probes() {
    let file = load(
        "
  - name: order
    steps:
      - delete:
          - {kind: NetworkPolicy, namespace: x, name: first}
        apply:
          - apiVersion: networking.k8s.io/v1
            kind: NetworkPolicy
            metadata: {name: first, namespace: x}
            spec: {podSelector: {}, policyTypes: [Ingress]}
          - apiVersion: networking.k8s.io/v1
            kind: NetworkPolicy
            metadata: {name: second, namespace: x}
            spec:
              podSelector: {matchLabels: {pod: a}}
              policyTypes: [Egress]
              egress: [{to: [{ipBlock: {cidr: \"{{ip y/b}}/32\"}}]}]
        set_namespace_labels:
          y: {team: blue}
        set_pod_labels:
          x/b: {pod: b, extra: \"1\"}
        expect:
          - default: allow
",
    );
    let mut cluster = FakeCluster::new(&file);
    let (summary, out) = run_file(&file, &mut cluster, &options()).await;
    assert_eq!(summary.cases[0].status, CaseStatus::Pass, "{out}");
    let calls = &cluster.calls;
    assert_eq!(calls.len(), 7, "{calls:#?}");
    assert_eq!(calls[0], "reset");
    assert_eq!(calls[1], r#"pod-labels x/b {"extra": "1", "pod": "b"}"#);
    assert_eq!(
        calls[2],
        r#"namespace-labels y {"kubernetes.io/metadata.name": "y", "team": "blue"}"#
    );
    assert!(calls[3].starts_with("apply x/first "), "{calls:#?}");
    assert!(calls[4].starts_with("apply x/second "), "{calls:#?}");
    assert!(
        calls[4].contains(r#""cidr":"10.0.0.13/32""#),
        "placeholder substituted: {calls:#?}"
    );
    assert_eq!(calls[5], "delete NetworkPolicy x/first");
    assert_eq!(calls[6], "sync");
    // Default ports and protocols: 16 pairs × 2 ports × 2 protocols.
    assert_eq!(summary.cases[0].steps[0].blocks[0].pairs, 64);
    assert_eq!(cluster.probes.lock().expect("probe log").len(), 64);
}

#[tokio::test]
async fn label_changes_from_one_case_do_not_leak_into_the_next() {
    let isolate_labelled = |name: &str, relabelled: bool| {
        let relabel = if relabelled {
            "        set_pod_labels:\n          x/a: {pod: a, target: isolated}\n"
        } else {
            ""
        };
        let deny = if relabelled {
            "deny: [\"*/* -> x/a\"]"
        } else {
            "deny: []"
        };
        format!(
            "
  - name: {name}
    steps:
      - apply:
          - apiVersion: networking.k8s.io/v1
            kind: NetworkPolicy
            metadata: {{name: isolate, namespace: x}}
            spec: {{podSelector: {{matchLabels: {{target: isolated}}}}, policyTypes: [Ingress]}}
{relabel}        expect:
          - ports: [80]
            protocols: [TCP]
            default: allow
            {deny}
"
        )
    };
    let file = load(&format!(
        "{}{}",
        isolate_labelled("relabels", true),
        isolate_labelled("starts clean", false)
    ));
    let mut cluster = FakeCluster::new(&file);
    let (summary, out) = run_file(&file, &mut cluster, &options()).await;
    assert_eq!((summary.passed, summary.failed), (2, 0), "{out}");
}

#[tokio::test]
async fn driver_error_fails_the_case_and_the_next_case_still_runs() {
    let file = load(&format!(
        "{}{}",
        deny_case("rejected"),
        deny_case("accepted").replace("deny-ingress", "deny-ingress-2")
    ));
    let mut cluster = FakeCluster::new(&file);
    cluster.fail_apply = Some("deny-ingress".to_owned());
    let (summary, out) = run_file(&file, &mut cluster, &options()).await;
    assert_eq!((summary.passed, summary.failed), (1, 1), "{out}");
    assert!(
        out.contains(
            "  step 1: error: applying NetworkPolicy x/deny-ingress: admission webhook said no"
        ),
        "{out}"
    );
    assert_eq!(
        summary.cases[0].reason.as_deref(),
        Some("applying NetworkPolicy x/deny-ingress: admission webhook said no")
    );
    // The failed case stopped before syncing or probing: the first sync is the second
    // case's.
    let second_reset = cluster
        .calls
        .iter()
        .enumerate()
        .filter(|(_, call)| *call == "reset")
        .nth(1)
        .map(|(index, _)| index);
    let first_sync = cluster.calls.iter().position(|call| call == "sync");
    assert!(second_reset < first_sync, "{:#?}", cluster.calls);
    assert!(second_reset.is_some());
}

#[tokio::test]
async fn later_steps_still_run_after_a_mismatching_step() {
    let file = load(
        "
  - name: two steps
    steps:
      - expect: [{ports: [80], protocols: [TCP], default: deny}]
      - expect: [{ports: [80], protocols: [TCP], default: allow}]
",
    );
    let mut cluster = FakeCluster::new(&file);
    let (summary, out) = run_file(&file, &mut cluster, &options()).await;
    assert_eq!(summary.cases[0].status, CaseStatus::Fail);
    assert_eq!(summary.cases[0].steps.len(), 2);
    assert!(!summary.cases[0].steps[0].passed());
    assert!(summary.cases[0].steps[1].passed(), "{out}");
}

#[tokio::test]
async fn verbose_prints_tables_of_passing_blocks() {
    let file = load(&deny_case("deny ingress in x"));
    let mut cluster = FakeCluster::new(&file);
    let mut options = options();
    options.verbose = true;
    let (_, out) = run_file(&file, &mut cluster, &options).await;
    assert!(
        out.contains("  step 1, expect block 1: all 16 pairs match"),
        "{out}"
    );
    assert!(
        out.contains("    TCP/80 observed (* = mismatch):\n"),
        "{out}"
    );
    assert!(!out.contains(".*") && !out.contains("X*"), "{out}");
}

#[tokio::test]
async fn case_filter_runs_only_matching_cases() {
    let file = load(&format!(
        "{}{}",
        deny_case("alpha one"),
        deny_case("beta two")
    ));
    let mut cluster = FakeCluster::new(&file);
    let mut options = options();
    options.case_filter = Some("beta".to_owned());
    let (summary, out) = run_file(&file, &mut cluster, &options).await;
    assert_eq!(summary.cases.len(), 1);
    assert_eq!(summary.cases[0].name, "beta two");
    assert!(out.ends_with("1 passed, 0 failed\n"), "{out}");
}

#[tokio::test]
async fn summary_serializes_to_json() {
    let file = load(&deny_case("deny ingress in x"));
    let mut cluster = FakeCluster::new(&file);
    cluster.enforce = false;
    let (summary, _) = run_file(&file, &mut cluster, &options()).await;
    let json: Value = serde_json::from_str(&summary.to_json()).expect("valid JSON");
    assert_eq!(json["failed"], 1);
    assert_eq!(json["cases"][0]["status"], "fail");
    let mismatch = &json["cases"][0]["steps"][0]["blocks"][0]["mismatches"][0];
    assert_eq!(mismatch["expected"], "deny");
    assert_eq!(mismatch["protocol"], "TCP");
    assert_eq!(mismatch["attempts"][0], "connected");
    assert!(
        mismatch["from"]
            .as_str()
            .is_some_and(|from| from.contains('/'))
    );
}

#[tokio::test]
async fn probes_target_the_pod_ip_and_port() {
    let file = load(&deny_case("deny ingress in x"));
    let mut cluster = FakeCluster::new(&file);
    run_file(&file, &mut cluster, &options()).await;
    let probes = cluster.probes_of("y/b", "x/b", 80, Protocol::Tcp);
    assert_eq!(probes.len(), 1);
    assert_eq!(
        probes[0].target,
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 11)), 80)
    );
}

#[test]
fn a_run_can_be_spawned_on_a_multi_threaded_runtime() {
    // Compile-time property: the run future is `Send` for a `Send + Sync` driver.
    fn assert_send<T: Send>(_: &T) {}
    let file = load(&deny_case("deny ingress in x"));
    let mut cluster = FakeCluster::new(&file);
    let mut out = Vec::new();
    let options = options();
    let future = run(&file, &mut cluster, &options, &mut out);
    assert_send(&future);
}

#[tokio::test]
async fn dual_stack_runs_every_case_once_per_family() {
    let file = load(&format!(
        "{}
  - name: \"ipv4 literal\"
    steps:
      - apply:
          - apiVersion: networking.k8s.io/v1
            kind: NetworkPolicy
            metadata: {{name: cidr, namespace: x}}
            spec:
              podSelector: {{}}
              ingress: [{{from: [{{ipBlock: {{cidr: 10.0.0.0/8}}}}]}}]
        expect:
          - default: allow
",
        deny_case("deny ingress in x")
    ));
    let mut cluster = FakeCluster::new(&file);
    let options = RunOptions {
        families: Families::Dual,
        ..options()
    };
    let (summary, _) = run_file(&file, &mut cluster, &options).await;
    let names: Vec<(&str, CaseStatus)> = summary
        .cases
        .iter()
        .map(|case| (case.name.as_str(), case.status))
        .collect();
    assert_eq!(
        names,
        [
            ("deny ingress in x [ipv4]", CaseStatus::Pass),
            ("deny ingress in x [ipv6]", CaseStatus::Pass),
            ("ipv4 literal [ipv4]", CaseStatus::Pass),
            ("ipv4 literal [ipv6]", CaseStatus::Skip),
        ]
    );
    assert_eq!((summary.passed, summary.failed, summary.skipped), (3, 0, 1));
    assert!(
        summary.cases[3]
            .reason
            .as_deref()
            .is_some_and(|reason| reason.contains("10.0.0.0/8"))
    );
    let probes = cluster.probes_of("y/b", "x/b", 80, Protocol::Tcp);
    let targets: Vec<IpAddr> = probes.iter().map(|probe| probe.target.ip()).collect();
    assert!(targets.contains(&IpAddr::V4(Ipv4Addr::new(10, 0, 0, 11))));
    assert!(targets.contains(&IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 11))));
}
