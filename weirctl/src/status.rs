//! `weirctl status`: per node, whether the agent is ready, which state version it enforces
//! against the one published for it, how full its tables are and what it dropped; the
//! controller's readiness, leadership and compile time. Healthy means: every agent answers
//! and is ready, every controller answers and is ready, one leads, and every node enforces
//! the version published for it.

use serde::Serialize;
use weir_common::capacity;

use crate::{promtext::Scrape, target::Target};

/// Entries of one table and what it holds at most.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TableFill {
    pub table: String,
    pub entries: u64,
    pub capacity: u64,
}

impl TableFill {
    pub fn percent(&self) -> f64 {
        if self.capacity == 0 {
            0.0
        } else {
            self.entries as f64 * 100.0 / self.capacity as f64
        }
    }
}

#[derive(Clone, Debug, Serialize, Default)]
pub struct NodeStatus {
    pub node: String,
    /// Why the agent could not be asked, if it could not.
    pub unreachable: Option<String>,
    pub ready: bool,
    /// The agent's `/readyz` answer.
    pub readiness: String,
    /// State version the controller publishes for this node (None: no controller answer).
    pub published_version: Option<u64>,
    /// Version the agent reports enforcing, as the controller saw it.
    pub applied_version: Option<u64>,
    pub tables: Vec<TableFill>,
    /// Non-zero drop counters by reason, since the agent's maps were created.
    pub drops: Vec<(String, u64)>,
    pub state_apply_errors: u64,
}

#[derive(Clone, Debug, Serialize, Default)]
pub struct ControllerStatus {
    pub name: String,
    pub unreachable: Option<String>,
    pub ready: bool,
    pub leader: bool,
    pub compiles: u64,
    /// Mean compile time over this replica's life (seconds).
    pub compile_seconds_mean: Option<f64>,
    pub agents_in_sync: u64,
    pub published_nodes: u64,
}

#[derive(Clone, Debug, Serialize, Default)]
pub struct Status {
    pub controllers: Vec<ControllerStatus>,
    pub nodes: Vec<NodeStatus>,
    /// What is unhealthy; empty when all is well.
    pub problems: Vec<String>,
}

/// The tables reported in the agent's metrics, with their map capacities.
const TABLES: &[(&str, &str, u32)] = &[
    ("endpoints", "weir_agent_endpoints", capacity::ENDPOINTS),
    (
        "peer_classes",
        "weir_agent_peer_classes",
        capacity::PEER_CLASSES + capacity::PEER_HOSTS,
    ),
    (
        "verdicts",
        "weir_agent_verdicts",
        capacity::VERDICTS + capacity::VERDICTS_EXACT,
    ),
    ("routes", "weir_agent_routes", capacity::ROUTES),
    ("services", "weir_agent_services", capacity::SERVICES),
    (
        "conntrack",
        "weir_agent_conntrack_entries",
        capacity::CONNTRACK,
    ),
];

/// Reads a node's status from the agent's answers (`/readyz` and `/metrics`).
pub fn node_from_agent(node: &str, readyz: (u16, String), metrics: &Scrape) -> NodeStatus {
    let tables = TABLES
        .iter()
        .filter_map(|(table, metric, cap)| {
            Some(TableFill {
                table: table.to_string(),
                entries: metrics.get(metric, &[])? as u64,
                capacity: u64::from(*cap),
            })
        })
        .collect();
    let drops = metrics
        .all("weir_agent_drops_total")
        .filter(|s| s.value > 0.0)
        .map(|s| {
            (
                s.labels.get("reason").cloned().unwrap_or_default(),
                s.value as u64,
            )
        })
        .collect();
    NodeStatus {
        node: node.to_string(),
        unreachable: None,
        ready: readyz.0 == 200,
        readiness: readyz.1.trim().to_string(),
        published_version: None,
        applied_version: None,
        tables,
        drops,
        state_apply_errors: metrics
            .get("weir_agent_state_apply_errors_total", &[])
            .unwrap_or(0.0) as u64,
    }
}

pub fn controller_from_metrics(name: &str, metrics: &Scrape) -> ControllerStatus {
    let count = metrics
        .get("weir_controller_compile_duration_seconds_count", &[])
        .unwrap_or(0.0);
    let sum = metrics
        .get("weir_controller_compile_duration_seconds_sum", &[])
        .unwrap_or(0.0);
    ControllerStatus {
        name: name.to_string(),
        unreachable: None,
        ready: metrics.get("weir_controller_ready", &[]) == Some(1.0),
        leader: metrics.get("weir_controller_leader", &[]) == Some(1.0),
        compiles: count as u64,
        compile_seconds_mean: (count > 0.0).then(|| sum / count),
        agents_in_sync: metrics
            .get("weir_controller_agents_in_sync", &[])
            .unwrap_or(0.0) as u64,
        published_nodes: metrics
            .get("weir_controller_published_nodes", &[])
            .unwrap_or(0.0) as u64,
    }
}

/// Fills in versions from the leader's metrics and lists what is unhealthy.
pub fn assess(
    mut nodes: Vec<NodeStatus>,
    controllers: Vec<ControllerStatus>,
    leader_metrics: Option<&Scrape>,
    expect_controller: bool,
) -> Status {
    let mut problems = Vec::new();
    for c in &controllers {
        match &c.unreachable {
            Some(why) => problems.push(format!("controller {}: unreachable: {why}", c.name)),
            None if !c.ready => problems.push(format!("controller {}: not ready", c.name)),
            None => {}
        }
    }
    if expect_controller && !controllers.iter().any(|c| c.leader) {
        problems.push("no controller leads".into());
    }
    for n in &mut nodes {
        if let Some(m) = leader_metrics {
            let labels = [("node", n.node.as_str())];
            n.published_version = m
                .get("weir_controller_node_published_version", &labels)
                .map(|v| v as u64);
            n.applied_version = m
                .get("weir_controller_node_applied_version", &labels)
                .map(|v| v as u64);
        }
        if let Some(why) = &n.unreachable {
            problems.push(format!("{}: agent unreachable: {why}", n.node));
            continue;
        }
        if !n.ready {
            problems.push(format!("{}: agent not ready: {}", n.node, n.readiness));
        }
        if leader_metrics.is_some() {
            match (n.applied_version, n.published_version) {
                (_, None) => problems.push(format!("{}: no state published for it", n.node)),
                (Some(a), Some(p)) if a == p => {}
                (a, Some(p)) => problems.push(format!(
                    "{}: enforces state version {} of {p} published",
                    n.node,
                    a.unwrap_or(0)
                )),
            }
        }
    }
    Status {
        controllers,
        nodes,
        problems,
    }
}

/// Asks every agent and controller of `target`.
pub async fn gather(target: &Target) -> Status {
    let mut nodes = Vec::new();
    for node in target.nodes() {
        let status = async {
            let readyz = target.agent_get(&node, "/readyz").await?;
            let (code, metrics) = target.agent_get(&node, "/metrics").await?;
            anyhow::ensure!(code == 200, "/metrics answered {code}");
            Ok(node_from_agent(&node, readyz, &Scrape::parse(&metrics)))
        }
        .await;
        nodes.push(status.unwrap_or_else(|e: anyhow::Error| NodeStatus {
            node: node.clone(),
            unreachable: Some(format!("{e:#}")),
            ..Default::default()
        }));
    }
    let mut controllers = Vec::new();
    let mut leader_metrics = None;
    let replies = target.controllers_get("/metrics").await;
    let expect_controller = !replies.is_empty();
    for reply in replies {
        match reply.reply {
            Ok((200, text)) => {
                let scrape = Scrape::parse(&text);
                let c = controller_from_metrics(&reply.name, &scrape);
                if c.leader {
                    leader_metrics = Some(scrape);
                }
                controllers.push(c);
            }
            Ok((code, body)) => controllers.push(ControllerStatus {
                name: reply.name,
                unreachable: Some(format!("/metrics answered {code}: {}", body.trim())),
                ..Default::default()
            }),
            Err(e) => controllers.push(ControllerStatus {
                name: reply.name,
                unreachable: Some(format!("{e:#}")),
                ..Default::default()
            }),
        }
    }
    assess(
        nodes,
        controllers,
        leader_metrics.as_ref(),
        expect_controller,
    )
}

/// The human-readable report.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    for c in &s.controllers {
        match &c.unreachable {
            Some(why) => out.push_str(&format!("controller {}: unreachable ({why})\n", c.name)),
            None => out.push_str(&format!(
                "controller {}: {}, {}, {} compiles{}, agents in sync {}/{}\n",
                c.name,
                if c.ready { "ready" } else { "NOT READY" },
                if c.leader { "leader" } else { "follower" },
                c.compiles,
                c.compile_seconds_mean
                    .map(|m| format!(" (mean {:.1} ms)", m * 1000.0))
                    .unwrap_or_default(),
                c.agents_in_sync,
                c.published_nodes,
            )),
        }
    }
    if s.controllers.is_empty() {
        out.push_str("controller: none (networking only, no policy)\n");
    }
    let version = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    for n in &s.nodes {
        out.push_str(&format!("\nnode {}\n", n.node));
        if let Some(why) = &n.unreachable {
            out.push_str(&format!("  agent      UNREACHABLE: {why}\n"));
            continue;
        }
        out.push_str(&format!(
            "  agent      {}\n",
            if n.ready {
                "ready".to_string()
            } else {
                format!("NOT READY: {}", n.readiness)
            }
        ));
        out.push_str(&format!(
            "  state      version {} applied, {} published{}\n",
            version(n.applied_version),
            version(n.published_version),
            if n.state_apply_errors > 0 {
                format!(", {} states not applied in full", n.state_apply_errors)
            } else {
                String::new()
            }
        ));
        let tables: Vec<String> = n
            .tables
            .iter()
            .map(|t| {
                format!(
                    "{} {}/{} ({:.1}%)",
                    t.table,
                    t.entries,
                    t.capacity,
                    t.percent()
                )
            })
            .collect();
        out.push_str(&format!("  tables     {}\n", tables.join(", ")));
        let drops: Vec<String> = n.drops.iter().map(|(r, c)| format!("{r} {c}")).collect();
        out.push_str(&format!(
            "  drops      {}\n",
            if drops.is_empty() {
                "none".to_string()
            } else {
                drops.join(", ")
            }
        ));
    }
    out.push('\n');
    if s.problems.is_empty() {
        out.push_str("healthy\n");
    } else {
        out.push_str("UNHEALTHY:\n");
        for p in &s.problems {
            out.push_str(&format!("  {p}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = "weir_agent_ready 1\nweir_agent_endpoints 3\nweir_agent_peer_classes 5\n\
        weir_agent_verdicts 7\nweir_agent_routes 2\nweir_agent_services 0\nweir_agent_conntrack_entries 4\n\
        weir_agent_drops_total{reason=\"policy_ingress\"} 9\nweir_agent_drops_total{reason=\"policy_egress\"} 0\n\
        weir_agent_state_apply_errors_total 0\n";
    const CONTROLLER: &str = "weir_controller_ready 1\nweir_controller_leader 1\n\
        weir_controller_published_nodes 2\nweir_controller_node_published_version{node=\"n1\"} 4\n\
        weir_controller_node_published_version{node=\"n2\"} 6\nweir_controller_node_applied_version{node=\"n1\"} 4\n\
        weir_controller_node_applied_version{node=\"n2\"} 5\nweir_controller_agents_in_sync 1\n\
        weir_controller_compile_duration_seconds_sum 0.004\nweir_controller_compile_duration_seconds_count 2\n";

    #[test]
    fn a_node_behind_its_published_state_and_a_stopped_agent_are_unhealthy() {
        let agent = Scrape::parse(AGENT);
        let ctl = Scrape::parse(CONTROLLER);
        let n1 = node_from_agent("n1", (200, "ready\n".into()), &agent);
        assert_eq!(n1.drops, vec![("policy_ingress".to_string(), 9)]);
        assert_eq!(
            n1.tables[0],
            TableFill {
                table: "endpoints".into(),
                entries: 3,
                capacity: u64::from(capacity::ENDPOINTS)
            }
        );
        let c = controller_from_metrics("controller", &ctl);
        assert!(c.leader && c.ready);
        assert_eq!(c.compiles, 2);
        assert!((c.compile_seconds_mean.unwrap() - 0.002).abs() < 1e-9);

        let healthy = assess(vec![n1.clone()], vec![c.clone()], Some(&ctl), true);
        assert!(healthy.problems.is_empty(), "{:?}", healthy.problems);
        assert_eq!(healthy.nodes[0].applied_version, Some(4));
        assert!(render(&healthy).ends_with("healthy\n"));

        let n2 = node_from_agent("n2", (200, "ready\n".into()), &agent);
        let behind = assess(vec![n1.clone(), n2], vec![c.clone()], Some(&ctl), true);
        assert_eq!(
            behind.problems,
            vec!["n2: enforces state version 5 of 6 published".to_string()]
        );

        let stopped = NodeStatus {
            node: "n1".into(),
            unreachable: Some("connection refused".into()),
            ..Default::default()
        };
        let s = assess(vec![stopped], vec![c.clone()], Some(&ctl), true);
        assert_eq!(s.problems.len(), 1);
        assert!(s.problems[0].contains("agent unreachable"));
        assert!(render(&s).contains("UNHEALTHY"));

        let not_ready = node_from_agent(
            "n1",
            (503, "waiting for the controller's state\n".into()),
            &agent,
        );
        let s = assess(vec![not_ready], vec![c], Some(&ctl), true);
        assert!(
            s.problems[0].contains("not ready: waiting"),
            "{:?}",
            s.problems
        );

        let follower = controller_from_metrics(
            "c2",
            &Scrape::parse("weir_controller_ready 1\nweir_controller_leader 0\n"),
        );
        let s = assess(vec![n1], vec![follower], None, true);
        assert_eq!(s.problems, vec!["no controller leads".to_string()]);
    }
}
