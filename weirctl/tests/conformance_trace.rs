//! `weirctl trace` against the conformance probes (real agents, real packets; needs root):
//! upstream cases run through the conformance runner on a two-node local cluster, and every
//! probe the runner makes from a pod (to a pod, or to a Service's ClusterIP) is traced too.
//! The trace must say what the packets did, and the cases must pass as they do without it.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
};

use weir_conformance::{
    Family, PodRef,
    cases::{
        CaseFile, Endpoint, Labels, ObjectRef, Protocol, ServiceRef, Topology as CaseTopology,
    },
    family::Need,
    probe::ProbeOutcome,
    runner::{self, Answer, Driver, EndpointProbe, Probe, RunOptions},
};
use weir_localcluster::{ClusterOptions, conformance::ClusterDriver};

fn bin_dir() -> PathBuf {
    let dir = std::env::var_os("WEIR_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    assert!(
        dir.join("weir-agent").exists() && dir.join("weir-cni").exists(),
        "weir binaries not found in {}: run the tests through `cargo xtask test`",
        dir.display()
    );
    dir
}

fn cases(name: &str) -> CaseFile {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../conformance/cases")
        .join(name);
    let mut file = CaseFile::load(&path).expect("the case file");
    file.model.nodes = Some(2);
    file.model.topology = Some(CaseTopology::L2);
    file
}

/// The local cluster's driver, tracing every probe from a pod before reporting it.
struct Tracing {
    inner: ClusterDriver,
    run_dir: PathBuf,
    /// Probes traced, and those whose trace disagreed with the packets.
    compared: Mutex<usize>,
    mismatches: Mutex<Vec<String>>,
}

impl Tracing {
    /// Whether `weirctl trace` says the packet is allowed.
    fn trace(&self, from: &PodRef, to: &str, protocol: Protocol) -> Result<bool, String> {
        let out = Command::new(env!("CARGO_BIN_EXE_weirctl"))
            .arg("--run")
            .arg(&self.run_dir)
            .args(["trace", "--from", &from.to_string(), "--to", to])
            .args(["--protocol", &protocol.as_str().to_ascii_lowercase()])
            .output()
            .map_err(|e| format!("running weirctl: {e}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            other => Err(format!("trace failed ({other:?}):\n{text}")),
        }
    }

    /// The trace's verdict for one probe (counted), or None when the trace failed (recorded
    /// as a disagreement).
    fn traced(&self, from: &PodRef, to: &str, protocol: Protocol) -> Option<bool> {
        *self.compared.lock().unwrap() += 1;
        self.trace(from, to, protocol)
            .map_err(|e| {
                self.mismatches
                    .lock()
                    .unwrap()
                    .push(format!("{from} -> {to} {protocol:?}: {e}"))
            })
            .ok()
    }

    fn record(&self, from: &PodRef, to: &str, protocol: Protocol, traced: bool, connected: bool) {
        if traced != connected {
            self.mismatches.lock().unwrap().push(format!(
                "{from} -> {to} {protocol:?}: packets {}, trace {}",
                if connected { "connect" } else { "are denied" },
                if traced { "allows" } else { "denies" }
            ));
        }
    }
}

impl Driver for Tracing {
    type Error = anyhow::Error;

    async fn pod_ip(&self, pod: &PodRef, family: Family) -> Option<IpAddr> {
        self.inner.pod_ip(pod, family).await
    }

    async fn reset(&mut self) -> anyhow::Result<()> {
        self.inner.reset().await
    }

    async fn set_pod_labels(&mut self, pod: &PodRef, labels: Labels) -> anyhow::Result<()> {
        self.inner.set_pod_labels(pod, labels).await
    }

    async fn set_namespace_labels(
        &mut self,
        namespace: &str,
        labels: Labels,
    ) -> anyhow::Result<()> {
        self.inner.set_namespace_labels(namespace, labels).await
    }

    async fn apply(&mut self, object: serde_json::Value) -> anyhow::Result<()> {
        self.inner.apply(object).await
    }

    async fn delete(&mut self, object: &ObjectRef) -> anyhow::Result<()> {
        self.inner.delete(object).await
    }

    async fn sync(&mut self) -> anyhow::Result<()> {
        self.inner.sync().await
    }

    async fn probe(&self, probes: &[Probe]) -> Vec<ProbeOutcome> {
        let outcomes = self.inner.probe(probes).await;
        for (p, o) in probes.iter().zip(&outcomes) {
            let to = format!("{}:{}", p.to, p.target.port());
            let Some(traced) = self.traced(&p.from, &to, p.protocol) else {
                continue;
            };
            // A disagreement is probed again (a probe may time out under load).
            let mut connected = o.is_connected();
            for _ in 0..2 {
                if traced == connected {
                    break;
                }
                connected = self.inner.probe(std::slice::from_ref(p)).await[0].is_connected();
            }
            self.record(&p.from, &to, p.protocol, traced, connected);
        }
        outcomes
    }

    fn node_count(&self) -> Option<usize> {
        self.inner.node_count()
    }

    fn external_ip(&self, family: Family) -> Option<IpAddr> {
        self.inner.external_ip(family)
    }

    fn unsupported(&self, family: Family, need: Need) -> Option<String> {
        self.inner.unsupported(family, need)
    }

    fn service_target(
        &self,
        service: &ServiceRef,
        port: u16,
        protocol: Protocol,
        family: Family,
    ) -> Result<SocketAddr, String> {
        self.inner.service_target(service, port, protocol, family)
    }

    fn node_port_targets(
        &self,
        service: &ServiceRef,
        port: u16,
        protocol: Protocol,
        family: Family,
    ) -> Result<Vec<SocketAddr>, String> {
        self.inner
            .node_port_targets(service, port, protocol, family)
    }

    async fn probe_endpoints(&self, probes: &[EndpointProbe]) -> Vec<Answer> {
        let answers = self.inner.probe_endpoints(probes).await;
        for (p, a) in probes.iter().zip(&answers) {
            // Traces start at a pod; a ClusterIP is translated on the way.
            let (Endpoint::Pod(from), Endpoint::Service(_)) = (&p.from, &p.to) else {
                continue;
            };
            let to = p.target.to_string();
            let Some(traced) = self.traced(from, &to, p.protocol) else {
                continue;
            };
            let mut connected = a.outcome.is_connected();
            for _ in 0..2 {
                if traced == connected {
                    break;
                }
                connected = self.inner.probe_endpoints(std::slice::from_ref(p)).await[0]
                    .outcome
                    .is_connected();
            }
            self.record(from, &to, p.protocol, traced, connected);
        }
        answers
    }
}

async fn run_traced(file: &CaseFile, filter: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "end-to-end tests need root (network namespaces, eBPF)"
    );
    let inner = ClusterDriver::start(&file.model, ClusterOptions::new(bin_dir()))
        .await
        .expect("cluster up");
    let run_dir = inner.cluster().dir().to_path_buf();
    let mut driver = Tracing {
        inner,
        run_dir,
        compared: Mutex::new(0),
        mismatches: Mutex::new(Vec::new()),
    };
    let opts = RunOptions {
        case_filter: Some(filter.to_string()),
        ..RunOptions::default()
    };
    let mut out = std::io::stdout();
    let summary = runner::run(file, &mut driver, &opts, &mut out)
        .await
        .expect("the run");
    let compared = *driver.compared.lock().unwrap();
    let mismatches = driver.mismatches.lock().unwrap().clone();
    driver.inner.shutdown();
    assert!(
        summary.passed > 0 && summary.success(),
        "the cases pass: {}",
        summary.closing_line()
    );
    assert!(compared > 50, "only {compared} probes traced");
    assert!(
        mismatches.is_empty(),
        "{} of {compared} traces disagree with the packets:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn traces_agree_with_the_probes_of_an_upstream_networkpolicy_case() {
    run_traced(
        &cases("upstream-netpol.yaml"),
        "should enforce multiple, stacked policies with overlapping podSelectors",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn traces_through_a_cluster_ip_agree_with_the_probes_of_the_upstream_service_cases() {
    // The three cases where NetworkPolicies judge traffic sent to a ClusterIP.
    run_traced(&cases("upstream-services.yaml"), "NetworkPolicy").await;
}
