//! Observability: Prometheus metrics read from the dataplane's counters at scrape time, and
//! the flow events the programs send over the ring buffer (every drop, a sample of allowed
//! new flows), kept in a bounded log with policy names resolved.

use std::{
    collections::{BTreeMap, VecDeque},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use aya::maps::{MapData, RingBuf};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tracing::debug;
use weir_api::{Direction, NodeState};
use weir_common::event::{DropReason, FlowEvent};

use crate::maps::DataplaneMaps;

/// Counter values read from the maps, with names resolved from the controller's state.
#[derive(Debug, Default)]
pub struct MetricsSnapshot {
    pub ready: bool,
    pub endpoints: usize,
    pub peer_classes: usize,
    pub verdicts: usize,
    pub routes: usize,
    /// Service frontends and backend slots in the `SERVICES` map.
    pub services: u64,
    pub service_backends: u64,
    /// Pods' hostPorts in effect on this node (counted in `services` too).
    pub host_ports: usize,
    pub drops: Vec<(DropReason, u64)>,
    /// NetworkPolicy rules: (namespace, name, direction, rule index) → new flows admitted.
    pub rule_hits: Vec<([(String, String); 4], u64)>,
    /// ClusterNetworkPolicy rules: (policy, rule, direction, tier, priority, action) → new
    /// flows decided (admitted by an Accept rule, denied by a Deny rule).
    pub cluster_rule_hits: Vec<([(String, String); 6], u64)>,
    /// (direction, policies of the rule set) → new flows denied.
    pub policy_drops: Vec<([(String, String); 2], u64)>,
    /// New flows denied because the endpoint's rule set failed closed (its policies did not
    /// fit, or are not known yet).
    pub fail_closed_drops: u64,
    pub flow_events: u64,
    /// Pods whose CNI ADD gave up waiting for their policies.
    pub pods_started_before_policy: u64,
    /// Node addresses that did not fit in `HOST_ADDRS`.
    pub host_addrs_left_out: usize,
    /// Conntrack entries after the last sweep.
    pub conntrack_entries: usize,
    /// Expired conntrack entries deleted by the sweeps.
    pub conntrack_expired: u64,
    /// How the controller's states fared.
    pub apply: crate::agent::ApplyStatus,
    /// Entries each configurable table holds at most (`--map-capacity`).
    pub map_capacities: Vec<(&'static str, u32)>,
    /// The interface the XDP program runs on and its mode (`native`, `generic`); None: not
    /// attached.
    pub xdp: Option<(String, &'static str)>,
    /// Prefilter prefixes and the packets each dropped.
    /// (prefix, the DropCIDRSet that lists it or `file`, drops).
    pub prefilter_drops: Vec<(String, String, u64)>,
    /// Lines of the prefilter file that are not prefixes.
    pub prefilter_invalid: usize,
}

fn direction(d: Direction) -> &'static str {
    d.as_str()
}

impl MetricsSnapshot {
    /// The table sizes are counted in the maps: what the dataplane holds, also when a
    /// state could not be written in full.
    pub fn read(maps: &DataplaneMaps, state: &NodeState, ready: bool, flow_events: u64) -> Self {
        let mut rule_hits = Vec::new();
        let mut cluster_rule_hits = Vec::new();
        for (rule, n) in DataplaneMaps::counter_totals(&maps.rule_hits, state.rules.keys().copied())
        {
            // Rules that decided nothing yet are left out (a node may know tens of thousands).
            let Some(r) = state.rules.get(&rule).filter(|_| n != 0) else {
                continue;
            };
            match &r.tiered {
                None => rule_hits.push((
                    [
                        ("namespace".to_string(), r.policy.namespace.to_string()),
                        ("policy".to_string(), r.policy.name.to_string()),
                        ("direction".to_string(), direction(r.direction).to_string()),
                        ("rule".to_string(), r.index.to_string()),
                    ],
                    n,
                )),
                Some(t) => cluster_rule_hits.push((
                    [
                        ("policy".to_string(), r.policy.name.to_string()),
                        ("rule".to_string(), r.rule_name()),
                        ("direction".to_string(), direction(r.direction).to_string()),
                        ("tier".to_string(), t.tier.as_str().to_string()),
                        ("priority".to_string(), t.priority.to_string()),
                        ("action".to_string(), t.action.as_str().to_string()),
                    ],
                    n,
                )),
            }
        }
        let policy_drops =
            DataplaneMaps::counter_totals(&maps.policy_drops, state.rule_sets.keys().copied())
                .into_iter()
                .filter(|(_, n)| *n != 0)
                .filter_map(|(set, n)| {
                    let info = state.rule_sets.get(&set)?;
                    let policies: Vec<String> =
                        info.policies.iter().map(|p| p.to_string()).collect();
                    Some((
                        [
                            (
                                "direction".to_string(),
                                direction(info.direction).to_string(),
                            ),
                            ("policies".to_string(), policies.join(",")),
                        ],
                        n,
                    ))
                })
                .collect();
        let (services, service_backends) = maps.service_counts();
        let sizes = maps.table_sizes();
        Self {
            ready,
            endpoints: sizes.endpoints,
            peer_classes: sizes.peer_classes,
            verdicts: sizes.verdicts,
            routes: sizes.routes,
            services,
            service_backends,
            host_ports: 0,
            drops: maps.drop_counts(),
            rule_hits,
            cluster_rule_hits,
            policy_drops,
            fail_closed_drops: DataplaneMaps::counter_totals(&maps.policy_drops, [0])
                .into_values()
                .sum(),
            flow_events,
            pods_started_before_policy: 0,
            host_addrs_left_out: 0,
            conntrack_entries: 0,
            conntrack_expired: 0,
            apply: Default::default(),
            map_capacities: maps.capacities.tables(),
            xdp: None,
            prefilter_drops: Vec::new(),
            prefilter_invalid: 0,
        }
    }

    /// Adds the XDP program's mode and the prefilter's counters.
    pub fn with_xdp(
        mut self,
        maps: &DataplaneMaps,
        xdp: Option<(&str, crate::dataplane::XdpMode)>,
        prefilter: &[(ipnet::IpNet, u32, String)],
        invalid: usize,
    ) -> Self {
        self.xdp = xdp.map(|(i, m)| (i.to_string(), m.as_str()));
        let counts = DataplaneMaps::counter_totals(
            &maps.prefilter_drops,
            prefilter.iter().map(|(_, id, _)| *id),
        );
        self.prefilter_drops = prefilter
            .iter()
            .map(|(net, id, source)| {
                (
                    net.to_string(),
                    source.clone(),
                    counts.get(id).copied().unwrap_or(0),
                )
            })
            .collect();
        self.prefilter_invalid = invalid;
        self
    }

    /// Prometheus text exposition.
    pub fn render(self) -> String {
        let mut registry = Registry::with_prefix("weir_agent");
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }
}

impl Collector for MetricsSnapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = |encoder: &mut DescriptorEncoder, name: &str, help: &str, v: i64| {
            let g = ConstGauge::new(v);
            let m = encoder.encode_descriptor(name, help, None, g.metric_type())?;
            g.encode(m)
        };
        gauge(
            &mut encoder,
            "ready",
            "1 once the dataplane is loaded and pods can be attached",
            i64::from(self.ready),
        )?;
        gauge(
            &mut encoder,
            "endpoints",
            "Pod addresses in the dataplane",
            self.endpoints as i64,
        )?;
        gauge(
            &mut encoder,
            "peer_classes",
            "Address prefixes classified for this node's policies",
            self.peer_classes as i64,
        )?;
        gauge(
            &mut encoder,
            "verdicts",
            "Precomputed verdict entries",
            self.verdicts as i64,
        )?;
        gauge(
            &mut encoder,
            "routes",
            "Pod CIDRs of nodes known to this node",
            self.routes as i64,
        )?;
        gauge(
            &mut encoder,
            "services",
            "Service frontends (ClusterIP, NodePort and hostPort, per port and protocol) in the dataplane",
            self.services as i64,
        )?;
        gauge(
            &mut encoder,
            "service_backends",
            "Backend slots of the Service frontends in the dataplane",
            self.service_backends as i64,
        )?;
        gauge(
            &mut encoder,
            "host_ports",
            "Pods' hostPorts served on this node (also counted as Service frontends)",
            self.host_ports as i64,
        )?;

        let mut capacities = encoder.encode_descriptor(
            "map_capacity",
            "Entries a dataplane table holds at most (--map-capacity), to alert on its fill",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (table, n) in &self.map_capacities {
            let labels = [("table".to_string(), table.to_string())];
            ConstGauge::new(i64::from(*n)).encode(capacities.encode_family(&labels)?)?;
        }

        let kind = ConstCounter::new(0u64).metric_type();
        let mut drops =
            encoder.encode_descriptor("drops", "Packets dropped, by reason", None, kind)?;
        for (reason, n) in &self.drops {
            let labels = [("reason".to_string(), reason.as_str().to_string())];
            ConstCounter::new(*n).encode(drops.encode_family(&labels)?)?;
        }
        let mut xdp_mode = encoder.encode_descriptor(
            "xdp_mode",
            "1 for the mode the XDP program runs in on an interface (native: in the driver; \
             generic: after the socket buffer is allocated; none: not attached, TC alone checks)",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        if let Some((interface, mode)) = &self.xdp {
            let labels = [
                ("interface".to_string(), interface.clone()),
                ("mode".to_string(), mode.to_string()),
            ];
            ConstGauge::new(1i64).encode(xdp_mode.encode_family(&labels)?)?;
        } else {
            let labels = [
                ("interface".to_string(), String::new()),
                ("mode".to_string(), "none".to_string()),
            ];
            ConstGauge::new(1i64).encode(xdp_mode.encode_family(&labels)?)?;
        }
        let mut prefilter = encoder.encode_descriptor(
            "prefilter_drops",
            "Packets the XDP prefilter dropped, by prefix",
            None,
            kind,
        )?;
        for (cidr, source, n) in &self.prefilter_drops {
            let labels = [
                ("cidr".to_string(), cidr.clone()),
                ("source".to_string(), source.clone()),
            ];
            ConstCounter::new(*n).encode(prefilter.encode_family(&labels)?)?;
        }
        gauge(
            &mut encoder,
            "prefilter_entries",
            "Prefixes in the XDP prefilter",
            self.prefilter_drops.len() as i64,
        )?;
        gauge(
            &mut encoder,
            "prefilter_invalid_lines",
            "Lines of the prefilter file that are not CIDRs (left out of the prefilter)",
            self.prefilter_invalid as i64,
        )?;
        let mut hits = encoder.encode_descriptor(
            "policy_rule_flows",
            "New flows admitted, by the policy rule that admitted them",
            None,
            kind,
        )?;
        for (labels, n) in &self.rule_hits {
            ConstCounter::new(*n).encode(hits.encode_family(labels)?)?;
        }
        let mut cluster_hits = encoder.encode_descriptor(
            "cluster_policy_rule_flows",
            "New flows decided by a ClusterNetworkPolicy rule: admitted by an Accept rule, \
             denied by a Deny rule",
            None,
            kind,
        )?;
        for (labels, n) in &self.cluster_rule_hits {
            ConstCounter::new(*n).encode(cluster_hits.encode_family(labels)?)?;
        }
        let mut denied = encoder.encode_descriptor(
            "policy_denied_flows",
            "New flows denied because no rule allowed them, by the policies isolating the \
             endpoint (flows a ClusterNetworkPolicy Deny rule denied are counted by that rule)",
            None,
            kind,
        )?;
        for (labels, n) in &self.policy_drops {
            ConstCounter::new(*n).encode(denied.encode_family(labels)?)?;
        }
        let m = encoder.encode_descriptor(
            "fail_closed_denied_flows",
            "New flows denied because the endpoint fails closed: its policies did not fit in \
             the maps, or a pod's policies are not known yet (the pending pod policy)",
            None,
            kind,
        )?;
        ConstCounter::new(self.fail_closed_drops).encode(m)?;
        let events = ConstCounter::new(self.flow_events);
        let m = encoder.encode_descriptor(
            "flow_events",
            "Flow events received from the dataplane",
            None,
            kind,
        )?;
        events.encode(m)?;
        let m = encoder.encode_descriptor(
            "pods_started_before_policy",
            "Pods whose CNI ADD gave up waiting for the controller's state naming their \
             policies: they started with the pending pod policy until it arrived",
            None,
            kind,
        )?;
        ConstCounter::new(self.pods_started_before_policy).encode(m)?;
        gauge(
            &mut encoder,
            "host_addrs_left_out",
            "Addresses of this node that did not fit in the dataplane: traffic from them to \
             local pods is subject to policy",
            self.host_addrs_left_out as i64,
        )?;
        gauge(
            &mut encoder,
            "conntrack_entries",
            "Conntrack entries, as the last sweep counted them",
            self.conntrack_entries as i64,
        )?;
        let m = encoder.encode_descriptor(
            "conntrack_expired_removed",
            "Expired conntrack entries deleted by the agent's sweeps",
            None,
            kind,
        )?;
        ConstCounter::new(self.conntrack_expired).encode(m)?;
        let m = encoder.encode_descriptor(
            "state_apply_errors",
            "Controller states (snapshots or diffs) that could not be applied in full",
            None,
            kind,
        )?;
        ConstCounter::new(self.apply.errors_total).encode(m)?;
        gauge(
            &mut encoder,
            "last_state_apply_success",
            "1 when the controller's last state was applied in full, 0 when it was not or \
             none came yet",
            i64::from(self.apply.last_success_unix.is_some() && self.apply.last_error.is_none()),
        )?;
        gauge(
            &mut encoder,
            "last_state_apply_success_timestamp_seconds",
            "When a controller state was last applied in full (seconds since the epoch, 0: never)",
            self.apply.last_success_unix.unwrap_or(0) as i64,
        )?;
        Ok(())
    }
}

/// One flow event, ready for people.
#[derive(Clone, Debug, Serialize)]
pub struct FlowRecord {
    /// Seconds since boot (the kernel's monotonic clock).
    pub time: f64,
    pub verdict: &'static str,
    pub reason: Option<&'static str>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub ifindex: u32,
    /// Rule set that decided, as policy names.
    pub policies: Vec<String>,
    /// The deciding rule: `NetworkPolicy/<ns>/<name> <direction> #<index>`, or
    /// `ClusterNetworkPolicy/<name>/<rule> <direction> (<tier> tier, priority <n>)`.
    pub rule: Option<String>,
    /// The deciding ClusterNetworkPolicy rule's tier (`Admin`, `Baseline`) ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<&'static str>,
    /// ... and its policy's priority.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// For a Service's drops (no backend, translation lost): the Service port,
    /// `ns/name[:port name]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip)]
    raw: FlowEvent,
}

impl FlowRecord {
    fn new(e: FlowEvent) -> Self {
        Self {
            time: e.ts_ns as f64 / 1e9,
            verdict: if e.verdict == FlowEvent::VERDICT_DROP {
                "drop"
            } else {
                "allow"
            },
            reason: DropReason::from_u32(e.reason).map(|r| r.as_str()),
            src: e.saddr.into(),
            dst: e.daddr.into(),
            proto: e.proto,
            sport: e.sport,
            dport: e.dport,
            ifindex: e.ifindex,
            policies: Vec::new(),
            rule: None,
            tier: None,
            priority: None,
            service: None,
            raw: e,
        }
    }

    /// Fills in policy names from the controller's state, and the names of the node's
    /// host-port Services (`hostPort/<ns>/<pod>`, by id).
    pub fn resolve(mut self, state: &NodeState, host_ports: &BTreeMap<u32, String>) -> Self {
        if let Some(set) = state.rule_sets.get(&self.raw.policy) {
            self.policies = set.policies.iter().map(|p| p.to_string()).collect();
        } else if self.raw.policy == weir_common::policy::FAIL_CLOSED
            && self.raw.verdict == FlowEvent::VERDICT_DROP
        {
            self.rule = Some(
                "fail closed: the pod's policies are not known yet or could not all be written"
                    .into(),
            );
        }
        let by_service = matches!(
            DropReason::from_u32(self.raw.reason),
            Some(DropReason::NoBackend | DropReason::ServiceNatLost)
        );
        if by_service {
            // The rule field carries the Service port's id.
            self.service = state
                .services
                .values()
                .find(|e| e.id == self.raw.rule && self.raw.rule != 0)
                .map(|e| {
                    let s = &e.service;
                    if s.port_name.is_empty() {
                        format!("{}/{}", s.namespace, s.name)
                    } else {
                        format!("{}/{}:{}", s.namespace, s.name, s.port_name)
                    }
                })
                .or_else(|| host_ports.get(&self.raw.rule).cloned());
        } else if DropReason::from_u32(self.raw.reason) == Some(DropReason::Prefilter) {
            // The rule field carries the prefilter entry's id, not a rule's.
        } else if let Some(r) = state.rules.get(&self.raw.rule) {
            self.rule = Some(r.to_string());
            if let Some(t) = &r.tiered {
                self.tier = Some(t.tier.as_str());
                self.priority = Some(t.priority);
            }
        }
        self
    }
}

/// The most recent flow events.
#[derive(Debug)]
pub struct FlowLog {
    capacity: usize,
    inner: Mutex<(VecDeque<FlowRecord>, u64)>,
}

impl FlowLog {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            inner: Mutex::new((VecDeque::with_capacity(capacity), 0)),
        })
    }

    fn push(&self, r: FlowRecord) {
        let mut g = self.inner.lock().expect("flow log lock");
        if g.0.len() == self.capacity {
            g.0.pop_front();
        }
        g.0.push_back(r);
        g.1 += 1;
    }

    /// The newest `limit` events, oldest first.
    pub fn recent(&self, limit: usize) -> Vec<FlowRecord> {
        let g = self.inner.lock().expect("flow log lock");
        g.0.iter()
            .skip(g.0.len().saturating_sub(limit))
            .cloned()
            .collect()
    }

    /// Events received since the agent started.
    pub fn total(&self) -> u64 {
        self.inner.lock().expect("flow log lock").1
    }
}

/// Reads the `EVENTS` ring buffer until the process ends.
pub async fn read_flow_events(ring: RingBuf<MapData>, log: Arc<FlowLog>) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns the ring buffer.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<FlowEvent>() {
                continue;
            }
            // SAFETY: the programs submit whole FlowEvents; read_unaligned copes with the
            // ring's 8-byte alignment.
            let event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) };
            let record = FlowRecord::new(event);
            debug!(verdict = record.verdict, reason = ?record.reason, src = %record.src, dst = %record.dst, dport = record.dport, "flow");
            log.push(record);
        }
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node state whose rule 9 is an Admin-tier Deny rule of a ClusterNetworkPolicy and
    /// rule 4 a NetworkPolicy rule, both in rule set 3.
    fn tiered_state() -> NodeState {
        let cnp = weir_api::PolicyRef::new("ClusterNetworkPolicy", "", "guardrail");
        let np = weir_api::PolicyRef::new("NetworkPolicy", "prod", "allow-web");
        let mut state = NodeState::default();
        state.rules.insert(
            9,
            weir_api::RuleRef {
                policy: cnp.clone(),
                direction: Direction::Ingress,
                index: 1,
                tiered: Some(weir_api::TieredRule {
                    tier: weir_api::PolicyTier::Admin,
                    priority: 10,
                    name: "no-pods".into(),
                    action: weir_api::TieredAction::Deny,
                }),
            },
        );
        state.rules.insert(
            4,
            weir_api::RuleRef {
                policy: np.clone(),
                direction: Direction::Ingress,
                index: 0,
                tiered: None,
            },
        );
        state.rule_sets.insert(
            3,
            weir_api::RuleSetInfo {
                direction: Direction::Ingress,
                policies: vec![cnp, np],
            },
        );
        state
    }

    fn event(verdict: u8, reason: u32, rule: u32) -> FlowEvent {
        FlowEvent {
            saddr: std::net::Ipv4Addr::new(10, 244, 1, 7).into(),
            daddr: std::net::Ipv4Addr::new(10, 244, 0, 5).into(),
            sport: 40000,
            dport: 5432,
            proto: 6,
            verdict,
            reason,
            policy: 3,
            rule,
            ..FlowEvent::default()
        }
    }

    #[test]
    fn a_cluster_policy_deny_names_its_rule_tier_and_priority_in_flows() {
        let state = tiered_state();
        let drop = FlowRecord::new(event(
            FlowEvent::VERDICT_DROP,
            DropReason::PolicyIngress as u32,
            9,
        ))
        .resolve(&state, &BTreeMap::new());
        assert_eq!(
            drop.rule.as_deref(),
            Some("ClusterNetworkPolicy/guardrail/no-pods ingress (Admin tier, priority 10)")
        );
        let json = serde_json::to_value(&drop).unwrap();
        assert_eq!(json["tier"], "Admin");
        assert_eq!(json["priority"], 10);
        assert_eq!(json["reason"], "policy_ingress");
        assert_eq!(
            json["policies"],
            serde_json::json!([
                "ClusterNetworkPolicy/guardrail",
                "NetworkPolicy/prod/allow-web"
            ])
        );

        // A NetworkPolicy rule: named as before, no tier or priority.
        let allow = FlowRecord::new(event(FlowEvent::VERDICT_ALLOW, 0, 4))
            .resolve(&state, &BTreeMap::new());
        assert_eq!(
            allow.rule.as_deref(),
            Some("NetworkPolicy/prod/allow-web ingress #0")
        );
        let json = serde_json::to_value(&allow).unwrap();
        assert!(
            json.get("tier").is_none() && json.get("priority").is_none(),
            "{json}"
        );
    }

    #[test]
    fn cluster_policy_rules_are_counted_with_tier_priority_and_action() {
        let snapshot = MetricsSnapshot {
            cluster_rule_hits: vec![(
                [
                    ("policy".to_string(), "guardrail".to_string()),
                    ("rule".to_string(), "no-pods".to_string()),
                    ("direction".to_string(), "ingress".to_string()),
                    ("tier".to_string(), "Admin".to_string()),
                    ("priority".to_string(), "10".to_string()),
                    ("action".to_string(), "Deny".to_string()),
                ],
                3,
            )],
            ..Default::default()
        };
        let text = snapshot.render();
        assert!(
            text.contains(
                "weir_agent_cluster_policy_rule_flows_total{policy=\"guardrail\",rule=\"no-pods\",\
                 direction=\"ingress\",tier=\"Admin\",priority=\"10\",action=\"Deny\"} 3\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn map_capacities_are_one_gauge_per_table() {
        let caps: weir_api::MapCapacities = "conntrack=1000000".parse().unwrap();
        let snapshot = MetricsSnapshot {
            map_capacities: caps.tables(),
            ..Default::default()
        };
        let text = snapshot.render();
        assert!(
            text.contains("weir_agent_map_capacity{table=\"conntrack\"} 1000000\n"),
            "{text}"
        );
        assert!(
            text.contains("weir_agent_map_capacity{table=\"verdicts-exact\"} 524288\n"),
            "{text}"
        );
        assert_eq!(
            text.matches("weir_agent_map_capacity{").count(),
            9,
            "{text}"
        );
    }

    #[test]
    fn apply_metrics_follow_the_last_state() {
        let mut snapshot = MetricsSnapshot::default();
        snapshot.apply.record::<String>(Ok(()));
        snapshot
            .apply
            .record(Err(&"map VERDICTS: full".to_string()));
        let text = snapshot.render();
        assert!(
            text.contains("weir_agent_state_apply_errors_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains("weir_agent_last_state_apply_success 0\n"),
            "{text}"
        );
        let mut snapshot = MetricsSnapshot::default();
        snapshot.apply.record::<String>(Ok(()));
        let text = snapshot.render();
        assert!(
            text.contains("weir_agent_last_state_apply_success 1\n"),
            "{text}"
        );
        assert!(
            !text.contains("weir_agent_last_state_apply_success_timestamp_seconds 0\n"),
            "{text}"
        );
    }
}
