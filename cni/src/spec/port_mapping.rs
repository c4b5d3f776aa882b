//! The `portMappings` capability (CONVENTIONS.md "Port mappings"): the pod's `hostPort`s,
//! which the runtime passes in `runtimeConfig` when the network configuration declares
//! `"capabilities": {"portMappings": true}`.
//!
//! ```json
//! "runtimeConfig": {"portMappings": [
//!     {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}
//! ]}
//! ```
//!
//! Validated by the plugin before anything reaches the agent, so a bad entry fails the
//! `ADD` with a clear error and nothing is built.

use std::{fmt, net::IpAddr};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The `runtimeConfig` key of the capability.
pub const PORT_MAPPINGS_KEY: &str = "portMappings";

/// The transport protocol of a port mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// TCP (the default when `protocol` is absent or empty, as in Kubernetes).
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl PortProtocol {
    /// Parses a protocol name in any case (kubelet writes lower case, others `TCP`).
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "tcp" => Some(Self::Tcp),
            "udp" => Some(Self::Udp),
            "sctp" => Some(Self::Sctp),
            _ => None,
        }
    }

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Sctp => 132,
        }
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

impl fmt::Display for PortProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One validated port mapping: connections to `host_port` on the node (on `host_ip` only,
/// when set) go to the pod's `container_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    /// The node's port, 1–65535.
    pub host_port: u16,
    /// The pod's port, 1–65535.
    pub container_port: u16,
    /// The protocol of both ports.
    pub protocol: PortProtocol,
    /// The one node address the port is opened on; `None` (an absent, empty or
    /// unspecified `hostIP`): every address of the node.
    #[serde(rename = "hostIP", default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
}

impl PortMapping {
    /// Whether `self` and `other` claim the same port on some address of the node: same
    /// port and protocol, and the same host address or either of them on every address.
    pub fn overlaps(&self, other: &PortMapping) -> bool {
        self.host_port == other.host_port
            && self.protocol == other.protocol
            && match (self.host_ip, other.host_ip) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }

    /// `8080/tcp`, or `10.0.0.1:8080/tcp` with a host address.
    pub fn host_side(&self) -> String {
        match self.host_ip {
            Some(ip) => format!(
                "{}/{}",
                std::net::SocketAddr::new(ip, self.host_port),
                self.protocol
            ),
            None => format!("{}/{}", self.host_port, self.protocol),
        }
    }

    /// Reads `runtimeConfig.portMappings`: empty when absent or null. Identical entries
    /// count once (a runtime may repeat one per address family); two entries claiming the
    /// same host port with different targets are refused.
    pub fn from_runtime_config(
        runtime_config: &Map<String, Value>,
    ) -> Result<Vec<PortMapping>, PortMappingError> {
        let list = match runtime_config.get(PORT_MAPPINGS_KEY) {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(list)) => list,
            Some(other) => {
                return Err(PortMappingError::new(
                    None,
                    format!("must be a list, got {other}"),
                ));
            }
        };
        let mut out: Vec<PortMapping> = Vec::with_capacity(list.len());
        for (i, entry) in list.iter().enumerate() {
            let mapping =
                Self::parse_entry(entry).map_err(|msg| PortMappingError::new(Some(i), msg))?;
            if out.contains(&mapping) {
                continue;
            }
            if let Some(other) = out.iter().find(|m| m.overlaps(&mapping)) {
                return Err(PortMappingError::new(
                    Some(i),
                    format!(
                        "host port {} is already mapped to container port {} by an earlier entry",
                        mapping.host_side(),
                        other.container_port
                    ),
                ));
            }
            out.push(mapping);
        }
        Ok(out)
    }

    fn parse_entry(entry: &Value) -> Result<PortMapping, String> {
        let Value::Object(object) = entry else {
            return Err(format!("must be an object, got {entry}"));
        };
        let port = |key: &str| -> Result<u16, String> {
            match object.get(key) {
                None | Some(Value::Null) => Err(format!("{key} is missing")),
                Some(value) => value
                    .as_u64()
                    .filter(|p| (1..=65535).contains(p))
                    .map(|p| p as u16)
                    .ok_or_else(|| format!("{key} must be a port number 1-65535, got {value}")),
            }
        };
        let host_port = port("hostPort")?;
        let container_port = port("containerPort")?;
        let protocol = match object.get("protocol") {
            None | Some(Value::Null) => PortProtocol::Tcp,
            Some(Value::String(name)) if name.is_empty() => PortProtocol::Tcp,
            Some(Value::String(name)) => PortProtocol::parse(name)
                .ok_or_else(|| format!("protocol must be tcp, udp or sctp, got {name:?}"))?,
            Some(other) => return Err(format!("protocol must be a string, got {other}")),
        };
        let host_ip = match object.get("hostIP") {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) if text.is_empty() => None,
            Some(Value::String(text)) => {
                let ip: IpAddr = text
                    .parse()
                    .map_err(|_| format!("hostIP must be an IP address, got {text:?}"))?;
                (!ip.is_unspecified()).then_some(ip)
            }
            Some(other) => return Err(format!("hostIP must be a string, got {other}")),
        };
        Ok(PortMapping {
            host_port,
            container_port,
            protocol,
            host_ip,
        })
    }
}

/// A `runtimeConfig.portMappings` that cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("runtimeConfig.portMappings{}: {message}", .index.map(|i| format!("[{i}]")).unwrap_or_default())]
pub struct PortMappingError {
    /// The offending entry; None when the list itself is wrong.
    pub index: Option<usize>,
    /// What is wrong with it.
    pub message: String,
}

impl PortMappingError {
    fn new(index: Option<usize>, message: String) -> Self {
        Self { index, message }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(mappings: Value) -> Result<Vec<PortMapping>, PortMappingError> {
        let mut config = Map::new();
        config.insert(PORT_MAPPINGS_KEY.into(), mappings);
        PortMapping::from_runtime_config(&config)
    }

    fn mapping(host_port: u16, container_port: u16, protocol: PortProtocol) -> PortMapping {
        PortMapping {
            host_port,
            container_port,
            protocol,
            host_ip: None,
        }
    }

    #[test]
    fn absent_or_null_is_no_mapping() {
        assert_eq!(PortMapping::from_runtime_config(&Map::new()), Ok(vec![]));
        assert_eq!(parse(Value::Null), Ok(vec![]));
        assert_eq!(parse(json!([])), Ok(vec![]));
    }

    #[test]
    fn kubelet_entries_parse() {
        let parsed = parse(json!([
            {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""},
            {"hostPort": 5353, "containerPort": 53, "protocol": "UDP"},
            {"hostPort": 9999, "containerPort": 9999, "protocol": "Sctp", "hostIP": "10.0.0.1"},
            {"hostPort": 7000, "containerPort": 7000},
            {"hostPort": 7001, "containerPort": 7001, "protocol": "", "hostIP": "0.0.0.0"},
            {"hostPort": 7002, "containerPort": 7002, "hostIP": "::"},
        ]))
        .unwrap();
        assert_eq!(
            parsed,
            vec![
                mapping(8080, 80, PortProtocol::Tcp),
                mapping(5353, 53, PortProtocol::Udp),
                PortMapping {
                    host_ip: Some("10.0.0.1".parse().unwrap()),
                    ..mapping(9999, 9999, PortProtocol::Sctp)
                },
                mapping(7000, 7000, PortProtocol::Tcp),
                mapping(7001, 7001, PortProtocol::Tcp),
                mapping(7002, 7002, PortProtocol::Tcp),
            ]
        );
    }

    #[test]
    fn identical_entries_count_once() {
        let entry = json!({"hostPort": 8080, "containerPort": 80, "protocol": "tcp"});
        assert_eq!(
            parse(json!([entry, entry])),
            Ok(vec![mapping(8080, 80, PortProtocol::Tcp)])
        );
    }

    #[test]
    fn same_port_on_other_protocols_or_addresses_is_fine() {
        let parsed = parse(json!([
            {"hostPort": 53, "containerPort": 53, "protocol": "tcp"},
            {"hostPort": 53, "containerPort": 53, "protocol": "udp"},
            {"hostPort": 80, "containerPort": 80, "hostIP": "10.0.0.1"},
            {"hostPort": 80, "containerPort": 81, "hostIP": "10.0.0.2"},
        ]))
        .unwrap();
        assert_eq!(parsed.len(), 4);
    }

    #[test]
    fn bad_entries_name_the_entry_and_the_problem() {
        let cases = [
            (json!({"a": 1}), "portMappings: must be a list"),
            (json!([1]), "[0]: must be an object"),
            (json!([{"containerPort": 80}]), "[0]: hostPort is missing"),
            (json!([{"hostPort": 80}]), "[0]: containerPort is missing"),
            (
                json!([{"hostPort": 0, "containerPort": 80}]),
                "[0]: hostPort must be a port number 1-65535, got 0",
            ),
            (
                json!([{"hostPort": 80, "containerPort": 65536}]),
                "containerPort must be a port number 1-65535, got 65536",
            ),
            (
                json!([{"hostPort": "80", "containerPort": 80}]),
                "hostPort must be a port number",
            ),
            (
                json!([{"hostPort": -1, "containerPort": 80}]),
                "hostPort must be a port number",
            ),
            (
                json!([{"hostPort": 80.5, "containerPort": 80}]),
                "hostPort must be a port number",
            ),
            (
                json!([{"hostPort": 80, "containerPort": 80, "protocol": "icmp"}]),
                "protocol must be tcp, udp or sctp, got \"icmp\"",
            ),
            (
                json!([{"hostPort": 80, "containerPort": 80, "protocol": 6}]),
                "protocol must be a string",
            ),
            (
                json!([{"hostPort": 80, "containerPort": 80, "hostIP": "node1"}]),
                "hostIP must be an IP address, got \"node1\"",
            ),
            (
                json!([
                    {"hostPort": 80, "containerPort": 80},
                    {"hostPort": 80, "containerPort": 81, "hostIP": "10.0.0.1"},
                ]),
                "[1]: host port 10.0.0.1:80/tcp is already mapped to container port 80",
            ),
            (
                json!([
                    {"hostPort": 80, "containerPort": 80, "protocol": "udp"},
                    {"hostPort": 80, "containerPort": 81, "protocol": "UDP"},
                ]),
                "[1]: host port 80/udp is already mapped",
            ),
        ];
        for (value, expected) in cases {
            let error = parse(value.clone()).expect_err(&value.to_string());
            let text = error.to_string();
            assert!(
                text.starts_with("runtimeConfig.portMappings") && text.contains(expected),
                "{value}: {text}"
            );
        }
    }

    #[test]
    fn wire_form_round_trips() {
        let m = PortMapping {
            host_ip: Some("10.0.0.1".parse().unwrap()),
            ..mapping(8080, 80, PortProtocol::Udp)
        };
        let value = serde_json::to_value(m).unwrap();
        assert_eq!(
            value,
            json!({"hostPort": 8080, "containerPort": 80, "protocol": "udp", "hostIP": "10.0.0.1"})
        );
        assert_eq!(serde_json::from_value::<PortMapping>(value).unwrap(), m);
        let any = mapping(8080, 80, PortProtocol::Tcp);
        assert_eq!(
            serde_json::to_value(any).unwrap(),
            json!({"hostPort": 8080, "containerPort": 80, "protocol": "tcp"})
        );
    }

    #[test]
    fn overlap_is_port_protocol_and_address() {
        let any = mapping(80, 80, PortProtocol::Tcp);
        let one = PortMapping {
            host_ip: Some("10.0.0.1".parse().unwrap()),
            ..any
        };
        let two = PortMapping {
            host_ip: Some("10.0.0.2".parse().unwrap()),
            ..any
        };
        assert!(any.overlaps(&one) && one.overlaps(&any));
        assert!(!one.overlaps(&two));
        assert!(!any.overlaps(&mapping(80, 80, PortProtocol::Udp)));
        assert!(!any.overlaps(&mapping(81, 80, PortProtocol::Tcp)));
    }
}
