//! `weirctl flows`: the flow events of every node, merged in time order, with pod names,
//! filtered in the spirit of `hubble observe`, as text, JSON lines or aggregated counts.
//!
//! Times are the kernel's monotonic clock of the node that saw the flow (seconds since its
//! boot): on one machine (the local cluster) they order flows across nodes exactly; across
//! machines only roughly.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    str::FromStr,
};

use anyhow::{Context, Result, bail};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use weir_compiler::PodInfo;

use crate::target::Target;

/// One flow event as the agent serves it, with the node and the pod names added.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Flow {
    #[serde(default)]
    pub node: String,
    pub time: f64,
    pub verdict: String,
    pub reason: Option<String>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    #[serde(default)]
    pub policies: Vec<String>,
    #[serde(default)]
    pub rule: Option<String>,
    /// The deciding ClusterNetworkPolicy rule's tier and its policy's priority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// `namespace/name` of the pod holding `src`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_pod: Option<String>,
    /// Workloads (see [`workload`]), for the aggregated view.
    #[serde(skip)]
    pub src_workload: Option<String>,
    #[serde(skip)]
    pub dst_workload: Option<String>,
}

/// A pod's workload: `namespace/<app label>` when it has an `app.kubernetes.io/name` or
/// `app` label, else `namespace/name`.
pub fn workload(pod: &PodInfo) -> String {
    let app = ["app.kubernetes.io/name", "app"]
        .iter()
        .find_map(|k| pod.labels.get(k));
    format!("{}/{}", pod.key.namespace, app.unwrap_or(&pod.key.name))
}

impl Flow {
    /// Adds pod names and workloads from the cluster's pod list.
    pub fn name_pods(&mut self, pods: &BTreeMap<IpAddr, PodInfo>) {
        if let Some(p) = pods.get(&self.src) {
            self.src_pod = Some(p.key.to_string());
            self.src_workload = Some(workload(p));
        }
        if let Some(p) = pods.get(&self.dst) {
            self.dst_pod = Some(p.key.to_string());
            self.dst_workload = Some(workload(p));
        }
    }

    /// Identity of one event (for `--follow`, which sees events again).
    fn id(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}|{}|{}|{}",
            self.node,
            self.time,
            self.src,
            self.sport,
            self.dst,
            self.dport,
            self.proto,
            self.verdict
        )
    }
}

/// One end of a flow, as `--from` / `--to` name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    Pod { namespace: String, name: String },
    Namespace(String),
    Net(IpNet),
}

impl FromStr for Peer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Peer::Net(IpNet::from(ip)));
        }
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(Peer::Net(net.trunc()));
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Peer::Pod {
                    namespace: ns.into(),
                    name: name.into(),
                })
            }
            None if !s.is_empty() => Ok(Peer::Namespace(s.into())),
            _ => Err(format!(
                "{s:?} is none of: namespace/pod, namespace, IP address, CIDR"
            )),
        }
    }
}

impl Peer {
    fn matches(&self, ip: IpAddr, pod: Option<&str>) -> bool {
        match self {
            Peer::Net(net) => net.contains(&ip),
            Peer::Pod { namespace, name } => pod == Some(&format!("{namespace}/{name}")),
            Peer::Namespace(ns) => {
                pod.is_some_and(|p| p.split_once('/').is_some_and(|(n, _)| n == ns))
            }
        }
    }
}

/// An IP protocol by name or number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proto(pub u8);

impl FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(Proto(match s.to_ascii_lowercase().as_str() {
            "icmp" => 1,
            "tcp" => 6,
            "udp" => 17,
            "icmpv6" => 58,
            "sctp" => 132,
            n => n.parse().map_err(|_| {
                format!("unknown protocol {s:?} (tcp, udp, sctp, icmp, icmpv6 or a number)")
            })?,
        }))
    }
}

pub fn proto_name(p: u8) -> String {
    match p {
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        58 => "ICMPv6".into(),
        132 => "SCTP".into(),
        n => format!("proto-{n}"),
    }
}

/// The filters: each flag's values are alternatives, different flags must all match.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Filter {
    /// Source: namespace/pod, namespace, IP address or CIDR (repeatable).
    #[arg(long)]
    pub from: Vec<Peer>,
    /// Destination, likewise.
    #[arg(long)]
    pub to: Vec<Peer>,
    /// Destination port.
    #[arg(long)]
    pub port: Vec<u16>,
    /// Protocol: tcp, udp, sctp, icmp, icmpv6 or a number.
    #[arg(long)]
    pub protocol: Vec<Proto>,
    /// allow or drop.
    #[arg(long, value_parser = ["allow", "drop"])]
    pub verdict: Vec<String>,
    /// Drop reason, as in the agent's metrics (policy_ingress, policy_egress, ...).
    #[arg(long)]
    pub reason: Vec<String>,
    /// A deciding policy: `namespace/name` or `Kind/namespace/name` (matches the rule set's
    /// policies and the deciding rule).
    #[arg(long)]
    pub policy: Vec<String>,
    /// Node that saw the flow.
    #[arg(long)]
    pub node: Vec<String>,
}

fn any_or_all<T>(values: &[T], f: impl Fn(&T) -> bool) -> bool {
    values.is_empty() || values.iter().any(f)
}

fn names_policy(name: &str, wanted: &str) -> bool {
    // `Kind/ns/name` or `Kind/ns/name direction #i`: compare the ns/name part too.
    let head = name.split(' ').next().unwrap_or(name);
    head == wanted || head.split_once('/').is_some_and(|(_, rest)| rest == wanted)
}

impl Filter {
    pub fn matches(&self, f: &Flow) -> bool {
        any_or_all(&self.from, |p| p.matches(f.src, f.src_pod.as_deref()))
            && any_or_all(&self.to, |p| p.matches(f.dst, f.dst_pod.as_deref()))
            && any_or_all(&self.port, |p| *p == f.dport)
            && any_or_all(&self.protocol, |p| p.0 == f.proto)
            && any_or_all(&self.verdict, |v| *v == f.verdict)
            && any_or_all(&self.reason, |r| f.reason.as_deref() == Some(r.as_str()))
            && any_or_all(&self.policy, |wanted| {
                f.policies.iter().any(|p| names_policy(p, wanted))
                    || f.rule.as_deref().is_some_and(|r| names_policy(r, wanted))
            })
            && any_or_all(&self.node, |n| *n == f.node)
    }
}

fn endpoint(ip: IpAddr, port: u16, pod: Option<&str>, proto: u8) -> String {
    let with_port = |s: String| {
        if matches!(proto, 6 | 17 | 132) {
            format!("{s}:{port}")
        } else {
            s
        }
    };
    match pod {
        Some(p) => with_port(format!("{p}({ip})")),
        None => with_port(match ip {
            IpAddr::V6(_) => format!("[{ip}]"),
            IpAddr::V4(_) => ip.to_string(),
        }),
    }
}

/// One line per flow.
pub fn render_line(f: &Flow) -> String {
    let mut line = format!(
        "{:>12.6} {} {} -> {} {} {}",
        f.time,
        f.node,
        endpoint(f.src, f.sport, f.src_pod.as_deref(), f.proto),
        endpoint(f.dst, f.dport, f.dst_pod.as_deref(), f.proto),
        proto_name(f.proto),
        f.verdict.to_uppercase()
    );
    if let Some(r) = &f.reason {
        line.push_str(&format!(" {r}"));
    }
    if let Some(r) = &f.rule {
        line.push_str(&format!(" by {r}"));
    } else if !f.policies.is_empty() {
        line.push_str(&format!(" by {}", f.policies.join(",")));
    }
    if let Some(s) = &f.service {
        line.push_str(&format!(" service {s}"));
    }
    line
}

/// The aggregated view: flows per (source workload, destination workload, port, protocol,
/// verdict, policy).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct AggregateKey {
    pub src: String,
    pub dst: String,
    pub port: u16,
    pub proto: String,
    pub verdict: String,
    pub policy: String,
}

pub fn aggregate(flows: &[Flow]) -> BTreeMap<AggregateKey, u64> {
    let mut out = BTreeMap::new();
    for f in flows {
        let key = AggregateKey {
            src: f.src_workload.clone().unwrap_or_else(|| f.src.to_string()),
            dst: f.dst_workload.clone().unwrap_or_else(|| f.dst.to_string()),
            port: f.dport,
            proto: proto_name(f.proto),
            verdict: f.verdict.clone(),
            policy: f
                .rule
                .clone()
                .or_else(|| (!f.policies.is_empty()).then(|| f.policies.join(",")))
                .unwrap_or_else(|| "-".into()),
        };
        *out.entry(key).or_insert(0) += 1;
    }
    out
}

pub fn render_aggregate(counts: &BTreeMap<AggregateKey, u64>, json: bool) -> String {
    if json {
        return counts
            .iter()
            .map(|(k, n)| {
                let mut v = serde_json::to_value(k).expect("serialises");
                v["flows"] = (*n).into();
                format!("{v}\n")
            })
            .collect();
    }
    let mut rows = vec![[
        "FLOWS".to_string(),
        "SOURCE".into(),
        "DESTINATION".into(),
        "PORT".into(),
        "VERDICT".into(),
        "POLICY".into(),
    ]];
    for (k, n) in counts {
        rows.push([
            n.to_string(),
            k.src.clone(),
            k.dst.clone(),
            format!("{}/{}", k.port, k.proto),
            k.verdict.clone(),
            k.policy.clone(),
        ]);
    }
    table(&rows)
}

/// Left-aligned columns.
pub fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The recent flows of every node (or of `nodes`), merged in time order, named.
pub async fn fetch(
    target: &Target,
    limit: usize,
    pods: &BTreeMap<IpAddr, PodInfo>,
) -> Result<Vec<Flow>> {
    let mut all = Vec::new();
    for node in target.nodes() {
        let (code, body) = target
            .agent_get(&node, &format!("/flows?limit={limit}"))
            .await?;
        if code == 403 {
            bail!(
                "the agent of {node} refuses /flows to this client (it serves them to its own node only unless started with --flows-from-anywhere)"
            );
        }
        if code != 200 {
            bail!(
                "the agent of {node} answered /flows with {code}: {}",
                body.trim()
            );
        }
        let flows: Vec<Flow> = serde_json::from_str(&body)
            .with_context(|| format!("the agent of {node} sent flows weirctl does not read"))?;
        for mut f in flows {
            f.node = node.clone();
            f.name_pods(pods);
            all.push(f);
        }
    }
    all.sort_by(|a, b| a.time.total_cmp(&b.time));
    Ok(all)
}

/// Remembers which events were shown, for `--follow`.
#[derive(Default)]
pub struct Seen {
    watermark: f64,
    at_watermark: BTreeSet<String>,
}

impl Seen {
    /// The flows of `batch` (time-ordered) not shown yet; remembers them.
    pub fn fresh(&mut self, batch: Vec<Flow>) -> Vec<Flow> {
        let mut out = Vec::new();
        for f in batch {
            if f.time < self.watermark
                || (f.time == self.watermark && self.at_watermark.contains(&f.id()))
            {
                continue;
            }
            if f.time > self.watermark {
                self.watermark = f.time;
                self.at_watermark.clear();
            }
            self.at_watermark.insert(f.id());
            out.push(f);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(src: &str, dst: &str, dport: u16, verdict: &str) -> Flow {
        Flow {
            node: "n1".into(),
            time: 1.5,
            verdict: verdict.into(),
            reason: (verdict == "drop").then(|| "policy_ingress".to_string()),
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto: 6,
            sport: 40000,
            dport,
            policies: if verdict == "drop" {
                vec!["NetworkPolicy/default/lock-b".into()]
            } else {
                vec![]
            },
            rule: None,
            tier: None,
            priority: None,
            service: None,
            src_pod: None,
            dst_pod: None,
            src_workload: None,
            dst_workload: None,
        }
    }

    fn pods() -> BTreeMap<IpAddr, PodInfo> {
        let pod = |ns: &str, name: &str, ip: &str, app: Option<&str>| PodInfo {
            key: weir_api::PodKey::new(ns, name),
            labels: app
                .map(|a| [("app".to_string(), a.to_string())].into_iter().collect())
                .unwrap_or_default(),
            node: Some("n1".into()),
            ips: vec![ip.parse().unwrap()],
            named_ports: vec![],
            serving: true,
            terminating: false,
        };
        crate::target::pods_by_ip(&[
            pod("default", "a", "10.244.0.2", None),
            pod("default", "b", "10.244.0.3", Some("web")),
            pod("prod", "db", "10.244.1.2", None),
        ])
    }

    fn parse_filter(args: &[&str]) -> Filter {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            f: Filter,
        }
        let mut argv = vec!["x"];
        argv.extend_from_slice(args);
        <Cli as clap::Parser>::try_parse_from(argv).unwrap().f
    }

    #[test]
    fn peers_parse_as_pod_namespace_address_or_cidr() {
        assert_eq!(
            "default/a".parse::<Peer>(),
            Ok(Peer::Pod {
                namespace: "default".into(),
                name: "a".into()
            })
        );
        assert_eq!("prod".parse::<Peer>(), Ok(Peer::Namespace("prod".into())));
        assert_eq!(
            "10.244.0.2".parse::<Peer>(),
            Ok(Peer::Net("10.244.0.2/32".parse().unwrap()))
        );
        assert_eq!(
            "10.244.1.7/24".parse::<Peer>(),
            Ok(Peer::Net("10.244.1.0/24".parse().unwrap()))
        );
        assert!("a/b/c".parse::<Peer>().is_err());
        assert!("/x".parse::<Peer>().is_err());
        assert!("".parse::<Peer>().is_err());
    }

    #[test]
    fn filters_combine_alternatives_and_criteria() {
        let pods = pods();
        let mut flows = vec![
            flow("10.244.0.2", "10.244.0.3", 80, "drop"),
            flow("10.244.0.2", "10.244.1.2", 5432, "allow"),
            flow("203.0.113.10", "10.244.0.3", 80, "allow"),
        ];
        flows[1].proto = 17;
        for f in &mut flows {
            f.name_pods(&pods);
        }
        let pick = |args: &[&str]| -> Vec<usize> {
            let filter = parse_filter(args);
            (0..flows.len())
                .filter(|i| filter.matches(&flows[*i]))
                .collect()
        };
        assert_eq!(pick(&[]), vec![0, 1, 2]);
        assert_eq!(pick(&["--from", "default/a"]), vec![0, 1]);
        assert_eq!(pick(&["--to", "prod"]), vec![1]);
        assert_eq!(pick(&["--to", "default"]), vec![0, 2]);
        assert_eq!(pick(&["--from", "203.0.113.0/24"]), vec![2]);
        assert_eq!(pick(&["--from", "default/a", "--to", "default/b"]), vec![0]);
        assert_eq!(pick(&["--to", "prod", "--to", "default/b"]), vec![0, 1, 2]);
        assert_eq!(pick(&["--port", "5432"]), vec![1]);
        assert_eq!(pick(&["--protocol", "udp"]), vec![1]);
        assert_eq!(pick(&["--protocol", "6"]), vec![0, 2]);
        assert_eq!(pick(&["--verdict", "drop"]), vec![0]);
        assert_eq!(pick(&["--reason", "policy_ingress"]), vec![0]);
        assert_eq!(pick(&["--reason", "policy_egress"]), Vec::<usize>::new());
        assert_eq!(pick(&["--policy", "default/lock-b"]), vec![0]);
        assert_eq!(pick(&["--policy", "NetworkPolicy/default/lock-b"]), vec![0]);
        assert_eq!(pick(&["--policy", "default/lock"]), Vec::<usize>::new());
        assert_eq!(pick(&["--node", "n2"]), Vec::<usize>::new());
        let cli_err = |args: &[&str]| {
            #[derive(clap::Parser)]
            struct Cli {
                #[command(flatten)]
                f: Filter,
            }
            let mut argv = vec!["x"];
            argv.extend_from_slice(args);
            <Cli as clap::Parser>::try_parse_from(argv).is_err()
        };
        assert!(cli_err(&["--verdict", "maybe"]));
        assert!(cli_err(&["--protocol", "gre2"]));
        assert!(cli_err(&["--from", "a/b/c"]));
    }

    #[test]
    fn output_formats() {
        let pods = pods();
        let mut f = flow("10.244.0.2", "10.244.0.3", 80, "drop");
        f.name_pods(&pods);
        assert_eq!(
            render_line(&f),
            "    1.500000 n1 default/a(10.244.0.2):40000 -> default/b(10.244.0.3):80 TCP DROP policy_ingress by NetworkPolicy/default/lock-b"
        );
        let json: serde_json::Value = serde_json::to_value(&f).unwrap();
        assert_eq!(json["src_pod"], "default/a");
        assert_eq!(json["dst_pod"], "default/b");
        assert_eq!(json["node"], "n1");
        // What the agent serves reads back (no node, no pod names).
        let agent = r#"{"time":2.0,"verdict":"allow","reason":null,"src":"10.0.0.1","dst":"10.0.0.2","proto":17,"sport":1,"dport":53,"ifindex":4,"policies":[],"rule":"NetworkPolicy/a/b egress #0"}"#;
        let back: Flow = serde_json::from_str(agent).unwrap();
        assert_eq!(back.rule.as_deref(), Some("NetworkPolicy/a/b egress #0"));
        assert_eq!(
            render_line(&back),
            "    2.000000  10.0.0.1:1 -> 10.0.0.2:53 UDP ALLOW by NetworkPolicy/a/b egress #0"
        );

        let mut flows = vec![
            flow("10.244.0.2", "10.244.0.3", 80, "drop"),
            flow("10.244.0.2", "10.244.0.3", 80, "drop"),
            flow("10.244.1.2", "10.244.0.3", 80, "allow"),
            flow("203.0.113.10", "10.244.0.3", 80, "allow"),
        ];
        for f in &mut flows {
            f.name_pods(&pods);
        }
        let counts = aggregate(&flows);
        assert_eq!(counts.len(), 3);
        let text = render_aggregate(&counts, false);
        assert!(
            text.contains(
                "2      default/a     default/web  80/TCP  drop     NetworkPolicy/default/lock-b"
            ),
            "{text}"
        );
        assert!(text.contains("203.0.113.10"), "{text}");
        let json = render_aggregate(&counts, true);
        let rows: Vec<serde_json::Value> = json
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), 3);
        let dropped = rows.iter().find(|r| r["src"] == "default/a").unwrap();
        assert_eq!(dropped["flows"], 2);
        assert_eq!(dropped["dst"], "default/web");
        assert_eq!(dropped["policy"], "NetworkPolicy/default/lock-b");
    }

    #[test]
    fn a_cluster_policy_drop_reads_renders_and_filters_by_its_policy() {
        // As the agent serves it.
        let served = serde_json::json!([{
            "time": 2.0, "verdict": "drop", "reason": "policy_ingress",
            "src": "10.244.1.2", "dst": "10.244.0.3", "proto": 6, "sport": 40000,
            "dport": 80, "ifindex": 7,
            "policies": ["ClusterNetworkPolicy/tenants"],
            "rule": "ClusterNetworkPolicy/tenants/deny-dev ingress (Admin tier, priority 10)",
            "tier": "Admin", "priority": 10,
        }]);
        let mut flows: Vec<Flow> = serde_json::from_value(served).unwrap();
        let f = &mut flows[0];
        f.node = "n1".into();
        f.name_pods(&pods());
        assert_eq!((f.tier.as_deref(), f.priority), (Some("Admin"), Some(10)));
        assert!(
            render_line(f).ends_with(
                "DROP policy_ingress by ClusterNetworkPolicy/tenants/deny-dev ingress \
                 (Admin tier, priority 10)"
            ),
            "{}",
            render_line(f)
        );
        for wanted in ["tenants", "ClusterNetworkPolicy/tenants"] {
            assert!(parse_filter(&["--policy", wanted]).matches(f), "{wanted}");
        }
        assert!(!parse_filter(&["--policy", "default/tenants"]).matches(f));
        let json = serde_json::to_value(&*f).unwrap();
        assert_eq!(
            (json["tier"].clone(), json["priority"].clone()),
            ("Admin".into(), 10.into())
        );
    }

    #[test]
    fn follow_shows_each_event_once() {
        let mut seen = Seen::default();
        let mut a = flow("10.0.0.1", "10.0.0.2", 80, "drop");
        a.time = 1.0;
        let mut b = a.clone();
        b.sport = 2;
        let mut c = a.clone();
        c.time = 2.0;
        assert_eq!(seen.fresh(vec![a.clone(), b.clone()]).len(), 2);
        assert_eq!(seen.fresh(vec![a.clone(), b.clone()]).len(), 0);
        assert_eq!(seen.fresh(vec![a, b, c.clone()]), vec![c.clone()]);
        assert_eq!(seen.fresh(vec![c]).len(), 0);
    }
}
