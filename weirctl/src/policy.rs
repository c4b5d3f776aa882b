//! `weirctl policy ns/pod`: which policies select a pod in each direction, and the effective
//! rules of the union as the node holds them: every verdict entry of the pod's rule set, with
//! the addresses of its peer class.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use ipnet::IpNet;
use serde::Serialize;
use weir_api::{Action, CLASS_UNMATCHED, Direction, NOT_ISOLATED, PodKey};
use weir_common::policy::FAIL_CLOSED;
use weir_compiler::PodInfo;

use crate::{flows::proto_name, trace::NodeView};

/// Prefixes of a class listed before "and N more".
const PREFIXES_SHOWN: usize = 6;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct EffectiveRule {
    pub action: &'static str,
    pub class: u32,
    /// The class's prefixes (pods named), or a description of the unmatched class.
    pub peers: Vec<String>,
    pub peers_total: usize,
    pub protocol: String,
    pub ports: String,
    pub rule: Option<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DirectionReport {
    pub direction: &'static str,
    pub rule_set: u32,
    pub isolated: bool,
    pub policies: Vec<String>,
    pub rules: Vec<EffectiveRule>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PolicyReport {
    pub pod: String,
    pub node: String,
    pub ip: std::net::IpAddr,
    pub directions: Vec<DirectionReport>,
}

pub fn report(views: &[NodeView], pods: &[PodInfo], key: &PodKey) -> Result<PolicyReport> {
    let Some(pod) = pods.iter().find(|p| &p.key == key) else {
        bail!("no pod {key}");
    };
    let Some((view, ip)) = pod.ips.iter().find_map(|ip| {
        views
            .iter()
            .find(|v| v.endpoints.contains_key(ip))
            .map(|v| (v, *ip))
    }) else {
        bail!("pod {key} is no node's endpoint (not running yet, or on the host network)");
    };
    let ep = view.endpoints[&ip];
    let by_ip: BTreeMap<_, _> = crate::target::pods_by_ip(pods);
    let mut class_prefixes: BTreeMap<u32, Vec<IpNet>> = BTreeMap::new();
    for (net, class) in &view.state.peer_classes {
        class_prefixes.entry(class).or_default().push(net);
    }
    let describe = |net: &IpNet| {
        let single = net.prefix_len() == net.max_prefix_len();
        match by_ip.get(&net.addr()) {
            Some(p) if single => format!("{} ({})", p.key, net.addr()),
            _ => net.to_string(),
        }
    };
    let mut directions = Vec::new();
    for (direction, rule_set) in [
        (Direction::Ingress, ep.ingress),
        (Direction::Egress, ep.egress),
    ] {
        let name = match direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        let policies = view
            .state
            .rule_sets
            .get(&rule_set)
            .map(|i| i.policies.iter().map(|p| p.to_string()).collect())
            .unwrap_or_default();
        let rules = view
            .state
            .verdicts
            .iter()
            .filter(|(m, _)| m.rule_set == rule_set && rule_set != NOT_ISOLATED)
            .map(|(m, v)| {
                let prefixes = class_prefixes.get(&m.class).cloned().unwrap_or_default();
                let mut peers: Vec<String> =
                    prefixes.iter().take(PREFIXES_SHOWN).map(describe).collect();
                if m.class == CLASS_UNMATCHED {
                    peers.insert(0, "any address in no other class".into());
                }
                EffectiveRule {
                    action: if v.action == Action::Allow {
                        "allow"
                    } else {
                        "deny"
                    },
                    class: m.class,
                    peers,
                    peers_total: prefixes.len(),
                    protocol: m.proto.map_or("any".into(), proto_name),
                    ports: match m.ports {
                        None => "any".into(),
                        Some(p) if p.first() == p.last() => p.first().to_string(),
                        Some(p) => format!("{}-{}", p.first(), p.last()),
                    },
                    rule: view.state.rules.get(&v.rule).map(|r| r.to_string()),
                }
            })
            .collect();
        directions.push(DirectionReport {
            direction: name,
            rule_set,
            isolated: rule_set != NOT_ISOLATED,
            policies,
            rules,
        });
    }
    Ok(PolicyReport {
        pod: key.to_string(),
        node: view.node.clone(),
        ip,
        directions,
    })
}

pub fn render(r: &PolicyReport) -> String {
    let mut out = format!("pod {} ({}) on {}\n", r.pod, r.ip, r.node);
    for d in &r.directions {
        if !d.isolated {
            out.push_str(&format!(
                "{}: no policy selects it, everything allowed\n",
                d.direction
            ));
            continue;
        }
        if d.rule_set == FAIL_CLOSED {
            out.push_str(&format!(
                "{}: fail closed (its rule set could not be written in full), everything denied\n",
                d.direction
            ));
            continue;
        }
        out.push_str(&format!(
            "{}: rule set {} = {}\n",
            d.direction,
            d.rule_set,
            if d.policies.is_empty() {
                "(names unknown)".to_string()
            } else {
                d.policies.join(" + ")
            }
        ));
        for rule in &d.rules {
            let more = rule.peers_total.saturating_sub(PREFIXES_SHOWN);
            let traffic = match (rule.protocol.as_str(), rule.ports.as_str()) {
                ("any", _) => "any protocol".to_string(),
                (p, "any") => format!("{p} any port"),
                (p, ports) => format!("{p} {ports}"),
            };
            out.push_str(&format!(
                "  {:<5} {traffic} {} class {}: {}{}{}\n",
                rule.action,
                if d.direction == "ingress" {
                    "from"
                } else {
                    "to"
                },
                rule.class,
                rule.peers.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                },
                rule.rule
                    .as_deref()
                    .map_or(String::new(), |r| format!(" [{r}]")),
            ));
        }
        out.push_str("  deny  everything else\n");
    }
    out
}
