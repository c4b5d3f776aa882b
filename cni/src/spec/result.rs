//! The `ADD` success result (SPEC.md §5 "ADD Success") and its per-version wire forms.
//!
//! [`CniResult`] is the newest (1.1.0) shape; it is what the agent returns and what the
//! plugin parses `prevResult` into, whatever version it came in (older forms only differ
//! by the extra `version` field of `ips` entries, which is ignored on input and recomputed
//! from the address on output). [`CniResult::to_json`] renders it in the version the
//! runtime asked for, dropping fields that version does not define.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::version::CniVersion;

/// The result of a successful `ADD`, and the `prevResult` of `CHECK`/`DEL`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    /// Every interface the attachment created, host side included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    /// Addresses assigned by the attachment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    /// Routes created by the attachment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// Resolver configuration the attachment knows about.
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

/// An interface in a [`CniResult`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    /// Interface name (inside the sandbox for container interfaces).
    pub name: String,
    /// Hardware address, if meaningful.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// MTU (1.1.0 and later only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The `CNI_NETNS` path for container interfaces; absent for host interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// Socket path tied to the interface (1.1.0 and later only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_path: Option<String>,
    /// PCI device identifier (1.1.0 and later only).
    #[serde(default, rename = "pciID", skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

/// An address in a [`CniResult`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpConfig {
    /// The address with its prefix length, e.g. `10.244.1.5/24`.
    pub address: IpNet,
    /// The default gateway for this subnet, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into [`CniResult::interfaces`] of the interface carrying the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// A route in a [`CniResult`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// Destination prefix.
    pub dst: IpNet,
    /// Next hop; when absent, the `gateway` of the matching `ips` entry may be used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    /// Path MTU (1.1.0 and later only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Advertised MSS (1.1.0 and later only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    /// Route priority, lower is preferred (1.1.0 and later only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// Routing table (1.1.0 and later only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    /// Route scope: 0 global, 253 link, 254 host (1.1.0 and later only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u8>,
}

impl Route {
    /// A route to `dst` via `gw` with no 1.1.0 attributes.
    pub fn new(dst: IpNet, gw: Option<IpAddr>) -> Self {
        Route {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

/// Resolver configuration in a [`CniResult`] (also the well-known `dns` config key).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Dns {
    /// Name servers in priority order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// Local domain for short names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Search domains in priority order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    /// Resolver options.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    /// Whether nothing is set (then the key is left out of results).
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

impl CniResult {
    /// Renders the result as the runtime expects it for `version`, with `cniVersion` set.
    ///
    /// * 0.3.0, 0.3.1, 0.4.0: `ips` entries carry `"version": "4"` or `"6"`; interfaces
    ///   have only `name`/`mac`/`sandbox`; routes only `dst`/`gw`.
    /// * 1.0.0: no `version` in `ips`; interfaces and routes as in 0.4.0.
    /// * 1.1.0: everything.
    ///
    /// Conversion downwards drops fields the older version does not define rather than
    /// failing: they are informational, and the runtime could not read them anyway.
    pub fn to_json(&self, version: CniVersion) -> serde_json::Value {
        let rich = version >= CniVersion::V1_1_0;
        let mut shaped = self.clone();
        if !rich {
            for interface in &mut shaped.interfaces {
                interface.mtu = None;
                interface.socket_path = None;
                interface.pci_id = None;
            }
            for route in &mut shaped.routes {
                *route = Route::new(route.dst, route.gw);
            }
        }
        let mut json = match serde_json::to_value(&shaped) {
            Ok(serde_json::Value::Object(map)) => map,
            // Plain data with string/number leaves: serialising cannot fail or change shape.
            _ => serde_json::Map::new(),
        };
        if version.has_ip_version_field()
            && let Some(serde_json::Value::Array(ips)) = json.get_mut("ips")
        {
            for (entry, ip) in ips.iter_mut().zip(&shaped.ips) {
                if let serde_json::Value::Object(fields) = entry {
                    let family = if ip.address.addr().is_ipv4() {
                        "4"
                    } else {
                        "6"
                    };
                    fields.insert("version".into(), family.into());
                }
            }
        }
        json.insert("cniVersion".into(), version.as_str().into());
        serde_json::Value::Object(json)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn dual_stack_result() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "weir1a2b3c".into(),
                    mac: Some("0a:00:00:00:00:01".into()),
                    mtu: Some(1450),
                    ..Interface::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("0a:00:00:00:00:02".into()),
                    mtu: Some(1450),
                    sandbox: Some("/run/netns/pod".into()),
                    socket_path: None,
                    pci_id: Some("0000:00:01.0".into()),
                },
            ],
            ips: vec![
                IpConfig {
                    address: "10.244.1.5/24".parse().unwrap(),
                    gateway: Some("169.254.1.1".parse().unwrap()),
                    interface: Some(1),
                },
                IpConfig {
                    address: "fd00:10:244:1::5/80".parse().unwrap(),
                    gateway: None,
                    interface: Some(1),
                },
            ],
            routes: vec![Route {
                mtu: Some(1450),
                scope: Some(0),
                ..Route::new("0.0.0.0/0".parse().unwrap(), "169.254.1.1".parse().ok())
            }],
            dns: Dns {
                nameservers: vec!["10.96.0.10".into()],
                ..Dns::default()
            },
        }
    }

    #[test]
    fn results_before_1_0_0_carry_the_ip_family_in_ips() {
        for version in [CniVersion::V0_3_0, CniVersion::V0_3_1, CniVersion::V0_4_0] {
            let json = dual_stack_result().to_json(version);
            assert_eq!(json["cniVersion"], version.as_str());
            assert_eq!(json["ips"][0]["version"], "4");
            assert_eq!(json["ips"][1]["version"], "6");
            assert_eq!(json["ips"][0]["address"], "10.244.1.5/24");
            assert_eq!(json["ips"][0]["interface"], 1);
        }
    }

    #[test]
    fn results_from_1_0_0_have_no_ip_family_field() {
        for version in [CniVersion::V1_0_0, CniVersion::V1_1_0] {
            let json = dual_stack_result().to_json(version);
            assert!(json["ips"][0].get("version").is_none(), "{version}: {json}");
        }
    }

    #[test]
    fn fields_new_in_1_1_0_are_dropped_for_older_versions() {
        let old = dual_stack_result().to_json(CniVersion::V1_0_0);
        assert!(old["interfaces"][1].get("mtu").is_none());
        assert!(old["interfaces"][1].get("pciID").is_none());
        assert_eq!(
            old["routes"][0],
            json!({"dst": "0.0.0.0/0", "gw": "169.254.1.1"})
        );

        let new = dual_stack_result().to_json(CniVersion::V1_1_0);
        assert_eq!(new["interfaces"][1]["mtu"], 1450);
        assert_eq!(new["interfaces"][1]["pciID"], "0000:00:01.0");
        assert_eq!(new["routes"][0]["mtu"], 1450);
        assert_eq!(new["routes"][0]["scope"], 0);
    }

    #[test]
    fn result_of_any_version_parses_back_to_the_same_addresses() {
        let original = dual_stack_result();
        for version in CniVersion::SUPPORTED {
            let parsed: CniResult = serde_json::from_value(original.to_json(version)).unwrap();
            assert_eq!(parsed.ips, original.ips, "{version}");
            assert_eq!(parsed.dns, original.dns, "{version}");
        }
        let latest: CniResult =
            serde_json::from_value(original.to_json(CniVersion::V1_1_0)).unwrap();
        assert_eq!(latest, original);
    }

    #[test]
    fn a_0_4_0_prev_result_from_a_runtime_parses() {
        let prev = json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "eth0", "sandbox": "/run/netns/x"}],
            "ips": [{"version": "4", "address": "10.1.0.5/16", "gateway": "10.1.0.1", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {}
        });
        let parsed: CniResult = serde_json::from_value(prev).unwrap();
        assert_eq!(
            parsed.ips[0].address,
            "10.1.0.5/16".parse::<IpNet>().unwrap()
        );
        assert_eq!(parsed.routes[0].gw, None);
        assert!(parsed.dns.is_empty());
    }

    #[test]
    fn empty_sections_are_left_out() {
        let json = CniResult::default().to_json(CniVersion::V1_1_0);
        assert_eq!(json, json!({"cniVersion": "1.1.0"}));
    }
}
