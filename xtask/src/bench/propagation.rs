//! Section `propagation`: how long a NetworkPolicy takes from being written to being
//! enforced, in each local weir cluster of the data-path benchmark (so with 0, 1k or 10k
//! other policies in the cluster).
//!
//! The cluster's `target` pod is first isolated by a deny-all ingress policy. Each sample
//! then writes a policy allowing the client (a manifest file, as `kubectl apply` would be
//! for the API server: the controller watches the directory), and from that instant
//! * a probe in the client pod opens a new TCP connection every ~2 ms (each a new 5-tuple,
//!   each abandoned after 2 ms without an answer) until one completes: *apply → enforced*,
//!   with about 2 ms resolution;
//! * in parallel, `LocalCluster::sync()` waits until the controller reports that every agent
//!   applied the state compiled from the manifests: *apply → all agents synced*.
//!
//! The allowing policy is then deleted and synced (not timed) before the next sample.
//! Samples interleave the clusters. The baseline is the cluster without other policies.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::json;

use super::{
    datapath::{NAMESPACE, WeirCluster},
    report::{Better, Report, percentile},
    traffic::{RR_PORT, can_connect},
};

const SECTION: &str = "propagation";
const ALLOW: &str = "propagation-allow";
const DENY: &str = "propagation-deny";

pub struct Settings {
    pub samples: usize,
}

impl Settings {
    pub fn new(quick: bool) -> Self {
        Self {
            samples: if quick { 5 } else { 20 },
        }
    }
}

fn policy(name: &str, allow: bool) -> serde_json::Value {
    let mut spec = json!({
        "podSelector": {"matchLabels": {"bench-role": "propagation-target"}},
        "policyTypes": ["Ingress"],
    });
    if allow {
        spec["ingress"] = json!([{
            "from": [{"podSelector": {"matchLabels": {"bench-role": "client"}}}],
            "ports": [{"protocol": "TCP", "port": RR_PORT}],
        }]);
    }
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec,
    })
}

fn key(w: &WeirCluster, what: &str) -> String {
    format!("{SECTION}.{}.{what}", w.id())
}

fn target_ip(w: &WeirCluster) -> Result<Ipv4Addr> {
    match w.target.ip {
        std::net::IpAddr::V4(ip) => Ok(ip),
        other => bail!("the target pod has no IPv4 address ({other})"),
    }
}

pub fn run(
    report: &mut Report,
    rt: &tokio::runtime::Runtime,
    clusters: &mut [WeirCluster],
    settings: &Settings,
) -> Result<()> {
    let baseline = clusters.iter().find(|w| w.policies == 0).map(|w| w.id());
    for w in clusters.iter_mut() {
        let base = |what: &str| baseline.as_ref().map(|b| format!("{SECTION}.{b}.{what}"));
        report.define(
            SECTION,
            key(w, "enforced"),
            format!("{}: apply → enforced (first connection through)", w.label()),
            "ms",
            Better::Lower,
            base("enforced"),
        );
        report.define(
            SECTION,
            key(w, "synced"),
            format!("{}: apply → every agent synced", w.label()),
            "ms",
            Better::Lower,
            base("synced"),
        );
        w.cluster.apply_object(&policy(DENY, false))?;
        // Agents may be reconnecting (with backoff) after the controller was paused.
        let mut attempt = 1;
        while let Err(e) = rt.block_on(w.cluster.sync()) {
            if attempt == 3 {
                return Err(e.context(format!("{}: waiting for the agents", w.label())));
            }
            attempt += 1;
        }
        let ip = target_ip(w)?;
        if can_connect(
            &w.client.netns.path(),
            ip,
            RR_PORT,
            Duration::from_millis(300),
        ) {
            bail!(
                "{}: the deny-all policy on the target pod is not enforced",
                w.label()
            );
        }
    }
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); clusters.len()];
    for sample in 1..=settings.samples {
        let mut line = format!("  [propagation sample {sample}/{}]", settings.samples);
        for (i, w) in clusters.iter_mut().enumerate() {
            let (enforced, synced) = one_sample(rt, w)
                .with_context(|| format!("{}: propagation sample {sample}", w.label()))?;
            report.record(&key(w, "enforced"), ms(enforced));
            report.record(&key(w, "synced"), ms(synced));
            samples[i].push(ms(enforced));
            line.push_str(&format!(
                " {}: enforced {:.1} ms, synced {:.1} ms;",
                w.id(),
                ms(enforced),
                ms(synced)
            ));
        }
        println!("{line}");
    }
    for (w, mut s) in clusters.iter().zip(samples) {
        s.sort_by(f64::total_cmp);
        report.note(
            SECTION,
            format!(
                "{}: apply → enforced p50 {:.1} ms, p99 {:.1} ms (nearest rank over {} samples)",
                w.label(),
                percentile(&s, 50.0),
                percentile(&s, 99.0),
                s.len()
            ),
        );
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Writes the allowing policy; returns (apply → first connection, apply → synced).
fn one_sample(rt: &tokio::runtime::Runtime, w: &mut WeirCluster) -> Result<(Duration, Duration)> {
    let ns: PathBuf = w.client.netns.path();
    let target = SocketAddr::from((target_ip(w)?, RR_PORT));
    let started = Instant::now();
    w.cluster.apply_object(&policy(ALLOW, true))?;
    let probe = std::thread::spawn(move || -> Result<Duration> {
        weir_conformance::netns::enter(&ns)?;
        let deadline = started + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect_timeout(&target, Duration::from_millis(2)).is_ok() {
                return Ok(started.elapsed());
            }
        }
        bail!("no connection to {target} within 30 s of the allowing policy")
    });
    rt.block_on(w.cluster.sync())?;
    let synced = started.elapsed();
    let enforced = probe
        .join()
        .map_err(|_| anyhow::anyhow!("the probe thread panicked"))??;
    // Back to denied for the next sample.
    w.cluster
        .delete_object("NetworkPolicy", Some(NAMESPACE), ALLOW)?;
    rt.block_on(w.cluster.sync())?;
    let client = w.client.netns.path();
    let ip = target_ip(w)?;
    if can_connect(&client, ip, RR_PORT, Duration::from_millis(100)) {
        bail!("the target is still reachable after the allowing policy was deleted and synced");
    }
    Ok((enforced, synced))
}
