//! `DropCIDRSet` (`weir.dev/v1alpha1`, cluster-scoped): lists of source prefixes that every
//! node drops on its uplink before anything else looks at the packet (the XDP prefilter),
//! for deny lists and floods.
//!
//! ```yaml
//! apiVersion: weir.dev/v1alpha1
//! kind: DropCIDRSet
//! metadata: {name: scanners}
//! spec:
//!   cidrs: ["192.0.2.0/24", "198.51.100.7", "2001:db8::/32"]
//! ```
//!
//! Every set applies to every node; the node state carries the union ([`prefilter_table`]),
//! each prefix naming the first set (by name) that lists it, which the agent's metrics and
//! flow events report. An entry that is not a CIDR (an address alone means that address) is
//! reported for its set alone and left out: the set's other entries, and every other set,
//! still apply. A prefix with host bits is applied without them, with a warning. A prefix
//! that holds a node's address or overlaps a node's pod CIDR would cut the cluster off from
//! itself: it is left out with a warning (the set's other entries apply). Prefixes beyond the
//! dataplane's table are left out, sets in name order, each with a warning.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::{
    Error, Result,
    service::{ObjectName, ServiceDiagnostic},
};

pub const KIND: &str = "DropCIDRSet";
pub const GROUP: &str = "weir.dev";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "weir.dev/v1alpha1";
pub const PLURAL: &str = "dropcidrsets";
/// Prefixes the dataplane's prefilter holds (its table less the id 0 it never uses).
pub const CAPACITY: usize = weir_common::capacity::PREFILTER as usize - 1;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DropCidrSet {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: DropCidrSetSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DropCidrSetSpec {
    /// CIDRs (or single addresses) whose packets are dropped.
    #[serde(default)]
    pub cidrs: Vec<String>,
    /// Free text for operators; not read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// What the compiler keeps of a set: its usable prefixes (host bits cleared), each with its
/// first position in `spec.cidrs`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DropSet {
    pub name: String,
    pub nets: BTreeMap<IpNet, usize>,
}

/// A set's usable prefixes, and what is wrong with the rest.
pub fn validate(set: &DropCidrSet) -> Result<(DropSet, Vec<ServiceDiagnostic>)> {
    let name = set
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or(Error::MissingName { kind: KIND })?;
    let mut out = DropSet {
        name: name.clone(),
        nets: BTreeMap::new(),
    };
    let mut diags = Vec::new();
    for (i, text) in set.spec.cidrs.iter().enumerate() {
        let field = format!("spec.cidrs[{i}]");
        let entry = text.trim();
        let parsed = entry
            .parse::<IpNet>()
            .ok()
            .or_else(|| entry.parse::<IpAddr>().ok().map(IpNet::from));
        match parsed {
            Some(net) => {
                let net = canonical(net);
                if net.trunc() != net {
                    diags.push(diagnostic(
                        &name,
                        field,
                        format!("{entry:?} has host bits set: {} is dropped", net.trunc()),
                    ));
                }
                out.nets.entry(net.trunc()).or_insert(i);
            }
            None => diags.push(diagnostic(
                &name,
                field,
                format!("{entry:?} is not a CIDR or an address: left out"),
            )),
        }
    }
    Ok((out, diags))
}

/// IPv4-mapped IPv6 prefixes written as IPv4 (as the dataplane keys them).
fn canonical(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).unwrap_or(net),
            None => net,
        },
        other => other,
    }
}

fn diagnostic(set: &str, field: String, problem: String) -> ServiceDiagnostic {
    ServiceDiagnostic {
        kind: KIND,
        object: ObjectName::new("", set),
        field,
        problem,
    }
}

/// The prefilter every node gets: the union of `sets` (in name order), each prefix with the
/// first set that lists it, without prefixes that would cut off a node (`node_ips`) or pods
/// (`pod_cidrs`), and no more than `capacity` prefixes. What is left out is reported for the
/// set that lists it.
pub fn prefilter_table<'a>(
    sets: impl IntoIterator<Item = &'a DropSet>,
    node_ips: &BTreeMap<IpAddr, String>,
    pod_cidrs: &BTreeMap<IpNet, String>,
    capacity: usize,
) -> (BTreeMap<IpNet, String>, Vec<ServiceDiagnostic>) {
    let mut table: BTreeMap<IpNet, String> = BTreeMap::new();
    let mut diags = Vec::new();
    for set in sets {
        for (net, i) in &set.nets {
            if table.contains_key(net) {
                continue;
            }
            let field = || format!("spec.cidrs[{i}]");
            // Range lookups in address order: the cost per prefix does not grow with the
            // cluster's nodes (every compile builds this table).
            if let Some((ip, node)) = node_ips.range(net.network()..=net.broadcast()).next() {
                diags.push(diagnostic(
                    &set.name,
                    field(),
                    format!("{net} holds node {node}'s address {ip}: left out, it would cut the node off"),
                ));
                continue;
            }
            if let Some((cidr, node)) = overlapping(pod_cidrs, net) {
                diags.push(diagnostic(
                    &set.name,
                    field(),
                    format!("{net} overlaps node {node}'s pod CIDR {cidr}: left out, it would cut pods off"),
                ));
                continue;
            }
            if table.len() >= capacity {
                diags.push(diagnostic(
                    &set.name,
                    field(),
                    format!("the prefilter is full ({capacity} prefixes): {net} is left out"),
                ));
                continue;
            }
            table.insert(*net, set.name.clone());
        }
    }
    (table, diags)
}

/// A prefix of `cidrs` (which do not overlap each other, as nodes' pod CIDRs) that overlaps
/// `net`: one inside it, or the one before it in address order, which is the only one that
/// can hold it.
fn overlapping<'a>(
    cidrs: &'a BTreeMap<IpNet, String>,
    net: &IpNet,
) -> Option<(&'a IpNet, &'a String)> {
    let max = net.max_prefix_len();
    let first = IpNet::new(net.network(), 0).ok()?;
    let last = IpNet::new(net.broadcast(), max).ok()?;
    let inside = cidrs.range(first..=last).next();
    let before = cidrs.range(..first).next_back();
    inside
        .into_iter()
        .chain(before)
        .find(|(cidr, _)| net.contains(*cidr) || cidr.contains(net))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str, cidrs: &[&str]) -> DropCidrSet {
        DropCidrSet {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: DropCidrSetSpec {
                cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
                description: None,
            },
            ..Default::default()
        }
    }

    fn nets(s: &DropSet) -> Vec<String> {
        s.nets.keys().map(|n| n.to_string()).collect()
    }

    #[test]
    fn cidrs_and_addresses_are_kept_and_a_bad_entry_is_reported_alone() {
        let (s, diags) = validate(&set(
            "scanners",
            &[
                "192.0.2.0/24",
                " 198.51.100.7 ",
                "10.0.0.0/33",
                "nope",
                "2001:db8::/32",
            ],
        ))
        .unwrap();
        assert_eq!(
            nets(&s),
            ["192.0.2.0/24", "198.51.100.7/32", "2001:db8::/32"]
        );
        let fields: Vec<&str> = diags.iter().map(|d| d.field.as_str()).collect();
        assert_eq!(fields, ["spec.cidrs[2]", "spec.cidrs[3]"]);
        assert!(
            diags
                .iter()
                .all(|d| d.kind == KIND && d.object.name == "scanners")
        );
    }

    #[test]
    fn host_bits_are_cleared_with_a_warning_and_mapped_addresses_are_ipv4() {
        let (s, diags) = validate(&set("x", &["203.0.113.9/24", "::ffff:192.0.2.1/128"])).unwrap();
        assert_eq!(nets(&s), ["192.0.2.1/32", "203.0.113.0/24"]);
        assert_eq!(diags.len(), 1);
        assert!(diags[0].problem.contains("203.0.113.0/24"), "{}", diags[0]);
    }

    #[test]
    fn a_set_without_a_name_is_an_error() {
        assert!(validate(&set("", &["192.0.2.0/24"])).is_err());
    }

    #[test]
    fn the_table_is_the_union_named_by_the_first_set_and_spares_the_cluster() {
        let (a, _) = validate(&set("a", &["192.0.2.0/24", "10.0.0.0/8", "172.18.0.0/16"])).unwrap();
        let (b, _) = validate(&set("b", &["192.0.2.0/24", "198.51.100.0/24"])).unwrap();
        let node_ips = BTreeMap::from([("172.18.0.2".parse().unwrap(), "n1".to_string())]);
        let pod_cidrs = BTreeMap::from([("10.244.1.0/24".parse().unwrap(), "n1".to_string())]);
        let (table, diags) = prefilter_table([&a, &b], &node_ips, &pod_cidrs, 100);
        let got: Vec<(String, &str)> = table
            .iter()
            .map(|(n, s)| (n.to_string(), s.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("192.0.2.0/24".to_string(), "a"),
                ("198.51.100.0/24".to_string(), "b")
            ]
        );
        assert_eq!(diags.len(), 2, "{diags:?}");
        assert!(diags.iter().all(|d| d.object.name == "a"));
        assert!(diags.iter().any(|d| d.problem.contains("pod CIDR")));
        assert!(
            diags
                .iter()
                .any(|d| d.problem.contains("node n1's address"))
        );
    }

    #[test]
    fn overlap_with_pod_cidrs_is_found_either_way_and_neighbours_are_kept() {
        let cidrs: BTreeMap<IpNet, String> = [
            ("10.244.0.0/24", "n0"),
            ("10.244.1.0/24", "n1"),
            ("10.244.3.0/24", "n3"),
            ("fd00:10:244::/64", "n0"),
        ]
        .into_iter()
        .map(|(c, n)| (c.parse().unwrap(), n.to_string()))
        .collect();
        let hit = |n: &str| overlapping(&cidrs, &n.parse().unwrap()).map(|(c, _)| c.to_string());
        assert_eq!(hit("10.244.1.7/32").as_deref(), Some("10.244.1.0/24"));
        assert_eq!(hit("10.244.1.128/25").as_deref(), Some("10.244.1.0/24"));
        assert_eq!(hit("10.244.0.0/16").as_deref(), Some("10.244.0.0/24"));
        assert_eq!(hit("10.244.2.0/24"), None);
        assert_eq!(hit("10.244.2.0/23").as_deref(), Some("10.244.3.0/24"));
        assert_eq!(hit("0.0.0.0/0").as_deref(), Some("10.244.0.0/24"));
        assert_eq!(
            hit("fd00:10:244::5/128").as_deref(),
            Some("fd00:10:244::/64")
        );
        assert_eq!(hit("192.0.2.0/24"), None);
        let node_ips =
            BTreeMap::from([("172.18.0.9".parse::<IpAddr>().unwrap(), "n1".to_string())]);
        let (s, _) = validate(&set("x", &["172.18.0.0/24", "172.18.0.10/31"])).unwrap();
        let (table, diags) = prefilter_table([&s], &node_ips, &cidrs, 10);
        assert_eq!(
            table.keys().map(|n| n.to_string()).collect::<Vec<_>>(),
            ["172.18.0.10/31"]
        );
        assert_eq!(diags.len(), 1);
    }

    #[test]
    fn prefixes_beyond_the_capacity_are_left_out_and_reported() {
        let (a, _) = validate(&set("a", &["192.0.2.0/24", "198.51.100.0/24"])).unwrap();
        let (b, _) = validate(&set("b", &["203.0.113.0/24"])).unwrap();
        let (table, diags) = prefilter_table([&a, &b], &BTreeMap::new(), &BTreeMap::new(), 2);
        assert_eq!(table.len(), 2);
        assert!(table.values().all(|s| s == "a"));
        assert_eq!(diags.len(), 1);
        assert_eq!(diags[0].object.name, "b");
        assert!(diags[0].problem.contains("full"));
    }
}
