//! The request configuration a runtime writes to the plugin's stdin (SPEC.md §1 plugin
//! configuration objects, as transformed by §3 "Deriving request configuration").

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::env::is_valid_identifier;
use super::error::CniError;
use super::result::CniResult;
use super::version::{CniVersion, VersionError};

/// Where the agent listens when the configuration does not say (`agentSocket`).
pub const DEFAULT_AGENT_SOCKET: &str = "/run/weir/cni.sock";

/// Keys of the request configuration that [`NetworkConfig`] and [`PluginInput`] model;
/// everything else goes to [`NetworkConfig::extra`].
const MODELLED_KEYS: [&str; 10] = [
    "cniVersion",
    "name",
    "type",
    "agentSocket",
    "logLevel",
    "runtimeConfig",
    "args",
    "prevResult",
    VALID_ATTACHMENTS_KEY,
    LEGACY_ATTACHMENTS_KEY,
];

/// The `GC` list of still-valid attachments (SPEC.md §2 `GC`).
pub const VALID_ATTACHMENTS_KEY: &str = "cni.dev/valid-attachments";

/// The name SPEC.md 1.1.0 printed by mistake; libcni sends both (containernetworking/cni
/// #1101), so either is accepted. When both are present, the correct one wins.
pub const LEGACY_ATTACHMENTS_KEY: &str = "cni.dev/attachments";

/// How much the plugin logs to stderr (`logLevel`); nothing when unset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Failures only.
    Error,
    /// Failures and suspicious input.
    Warn,
    /// One line per invocation.
    Info,
    /// Everything, including the agent exchange.
    Debug,
}

impl LogLevel {
    /// Parses the `logLevel` spelling.
    pub fn parse(value: &str) -> Option<LogLevel> {
        match value {
            "error" => Some(LogLevel::Error),
            "warn" => Some(LogLevel::Warn),
            "info" => Some(LogLevel::Info),
            "debug" => Some(LogLevel::Debug),
            _ => None,
        }
    }

    /// The `logLevel` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
        }
    }
}

/// One attachment, as listed in `cni.dev/valid-attachments`: the `(CNI_CONTAINERID,
/// CNI_IFNAME)` pair that identifies it (SPEC.md §3 "Attachment Parameters").
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Attachment {
    /// `CNI_CONTAINERID` of the `ADD`.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// `CNI_IFNAME` of the `ADD`.
    pub ifname: String,
}

/// The validated network configuration of one invocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfig {
    /// The version the runtime selected; results are returned in it.
    pub cni_version: CniVersion,
    /// Network name (matches `[a-zA-Z0-9][a-zA-Z0-9_.\-]*`).
    pub name: String,
    /// The plugin binary name (`type`).
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The agent's unix socket; [`DEFAULT_AGENT_SOCKET`] unless `agentSocket` is set.
    pub agent_socket: PathBuf,
    /// `logLevel`: whether and how much the plugin logs to stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<LogLevel>,
    /// Capability arguments (`runtimeConfig`, SPEC.md §3 "Deriving runtimeConfig"), e.g.
    /// `portMappings`, `bandwidth`, `ips`, `mac`; empty when absent.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub runtime_config: Map<String, Value>,
    /// The `args` key (CONVENTIONS.md "Args in network config"), passed through as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    /// Every other key of the configuration, unchanged (e.g. `mtu`, `dns`, `ipam`).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Map<String, Value>,
}

/// Everything the runtime wrote on stdin, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginInput {
    /// The configuration proper.
    pub config: NetworkConfig,
    /// `prevResult`: the result of the `ADD` (on `CHECK` and `DEL`) or of the previous
    /// plugin in the chain (on `ADD`).
    pub prev_result: Option<CniResult>,
    /// `cni.dev/valid-attachments` (`GC` only).
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// What is wrong with the configuration on stdin.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not JSON at all.
    #[error("network configuration on stdin is not valid JSON: {source}")]
    NotJson {
        /// The parser's complaint.
        source: serde_json::Error,
    },
    /// JSON, but not an object.
    #[error("network configuration on stdin must be a JSON object")]
    NotAnObject,
    /// `cniVersion` is absent; libcni reads that as 0.1.0, which is unsupported.
    #[error(
        "network configuration has no cniVersion (0.1.0 implied, which weir-cni does not support)"
    )]
    MissingVersion,
    /// `cniVersion` is malformed or unsupported.
    #[error(transparent)]
    Version(#[from] VersionError),
    /// A required key is absent or empty.
    #[error("network configuration is missing {key:?}")]
    MissingField {
        /// The key.
        key: &'static str,
    },
    /// A key has the wrong JSON type.
    #[error("network configuration key {key:?} must be {expected}, got {value}")]
    WrongType {
        /// The key.
        key: &'static str,
        /// What it must be.
        expected: &'static str,
        /// What it is.
        value: Value,
    },
    /// `name` has characters the spec does not allow.
    #[error(
        "invalid network name {name:?}: must match [a-zA-Z0-9][a-zA-Z0-9_.-]* (CNI spec section 1)"
    )]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// `type` names no usable binary (empty, or contains a path separator).
    #[error("invalid plugin type {plugin_type:?}: must be a file name without '/'")]
    InvalidType {
        /// The type given.
        plugin_type: String,
    },
    /// `agentSocket` is not an absolute path.
    #[error("agentSocket {value:?} must be an absolute path")]
    RelativeAgentSocket {
        /// The path given.
        value: String,
    },
    /// `logLevel` is not one of the known levels.
    #[error("logLevel {value:?} must be one of error, warn, info, debug")]
    UnknownLogLevel {
        /// The level given.
        value: String,
    },
    /// `prevResult` does not decode as a result.
    #[error("prevResult is not a valid CNI result: {source}")]
    PrevResult {
        /// The decoder's complaint.
        source: serde_json::Error,
    },
    /// `cni.dev/valid-attachments` does not decode.
    #[error("{key} is not a list of {{containerID, ifname}} objects: {source}")]
    ValidAttachments {
        /// Which of the two accepted keys.
        key: &'static str,
        /// The decoder's complaint.
        source: serde_json::Error,
    },
}

impl From<ConfigError> for CniError {
    fn from(error: ConfigError) -> Self {
        let message = error.to_string();
        match error {
            ConfigError::NotJson { .. }
            | ConfigError::NotAnObject
            | ConfigError::Version(VersionError::Malformed { .. })
            | ConfigError::PrevResult { .. }
            | ConfigError::ValidAttachments { .. } => CniError::decoding_failure(message),
            ConfigError::MissingVersion
            | ConfigError::Version(VersionError::Unsupported { .. }) => {
                CniError::incompatible_version(message)
            }
            ConfigError::MissingField { .. }
            | ConfigError::WrongType { .. }
            | ConfigError::InvalidName { .. }
            | ConfigError::InvalidType { .. }
            | ConfigError::RelativeAgentSocket { .. }
            | ConfigError::UnknownLogLevel { .. } => CniError::invalid_network_config(message),
        }
    }
}

impl PluginInput {
    /// Parses and validates the stdin bytes.
    ///
    /// Checks run in the order libcni's plugin skeleton uses, so the same input fails with
    /// the same code: JSON (6), then `cniVersion` (1, or 6 if malformed), then `name` and
    /// `type` (7), then weir's own keys (7), then `prevResult` and the attachment list (6).
    pub fn parse(stdin: &[u8]) -> Result<PluginInput, ConfigError> {
        let value: Value =
            serde_json::from_slice(stdin).map_err(|source| ConfigError::NotJson { source })?;
        let Value::Object(mut object) = value else {
            return Err(ConfigError::NotAnObject);
        };

        let cni_version: CniVersion = match object.get("cniVersion") {
            None => return Err(ConfigError::MissingVersion),
            Some(Value::String(text)) if text.is_empty() => {
                return Err(ConfigError::MissingVersion);
            }
            Some(Value::String(text)) => text.parse()?,
            Some(other) => return Err(wrong_type("cniVersion", "a string", other)),
        };
        let name = required_string(&object, "name")?;
        if !is_valid_identifier(&name) {
            return Err(ConfigError::InvalidName { name });
        }
        let plugin_type = required_string(&object, "type")?;
        if plugin_type.contains(['/', '\\']) {
            return Err(ConfigError::InvalidType { plugin_type });
        }
        let agent_socket = match object.get("agentSocket") {
            None | Some(Value::Null) => PathBuf::from(DEFAULT_AGENT_SOCKET),
            Some(Value::String(path)) if path.starts_with('/') => PathBuf::from(path),
            Some(Value::String(path)) => {
                return Err(ConfigError::RelativeAgentSocket {
                    value: path.clone(),
                });
            }
            Some(other) => return Err(wrong_type("agentSocket", "a string", other)),
        };
        let log_level = match object.get("logLevel") {
            None | Some(Value::Null) => None,
            Some(Value::String(level)) if level.is_empty() => None,
            Some(Value::String(level)) => {
                Some(
                    LogLevel::parse(level).ok_or_else(|| ConfigError::UnknownLogLevel {
                        value: level.clone(),
                    })?,
                )
            }
            Some(other) => return Err(wrong_type("logLevel", "a string", other)),
        };
        let runtime_config = match object.get("runtimeConfig") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(map)) => map.clone(),
            Some(other) => return Err(wrong_type("runtimeConfig", "an object", other)),
        };
        let args = match object.get("args") {
            None | Some(Value::Null) => None,
            Some(value @ Value::Object(_)) => Some(value.clone()),
            Some(other) => return Err(wrong_type("args", "an object", other)),
        };
        let prev_result = match object.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(value) => Some(
                CniResult::deserialize(value)
                    .map_err(|source| ConfigError::PrevResult { source })?,
            ),
        };
        let valid_attachments = [VALID_ATTACHMENTS_KEY, LEGACY_ATTACHMENTS_KEY]
            .into_iter()
            .find_map(|key| object.get(key).map(|value| (key, value)))
            .map(|(key, value)| {
                Vec::<Attachment>::deserialize(value)
                    .map_err(|source| ConfigError::ValidAttachments { key, source })
            })
            .transpose()?;

        object.retain(|key, _| !MODELLED_KEYS.contains(&key.as_str()));
        Ok(PluginInput {
            config: NetworkConfig {
                cni_version,
                name,
                plugin_type,
                agent_socket,
                log_level,
                runtime_config,
                args,
                extra: object,
            },
            prev_result,
            valid_attachments,
        })
    }
}

/// The `cniVersion` the runtime wrote, if the input is a JSON object with a well-formed
/// one; used to echo the runtime's version in errors raised before (or while) the
/// configuration is validated.
pub fn requested_version(stdin: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(stdin).ok()?;
    let version = value.get("cniVersion")?.as_str()?;
    super::version::is_well_formed(version).then(|| version.to_owned())
}

fn required_string(object: &Map<String, Value>, key: &'static str) -> Result<String, ConfigError> {
    match object.get(key) {
        None | Some(Value::Null) => Err(ConfigError::MissingField { key }),
        Some(Value::String(text)) if text.is_empty() => Err(ConfigError::MissingField { key }),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(other) => Err(wrong_type(key, "a string", other)),
    }
}

fn wrong_type(key: &'static str, expected: &'static str, value: &Value) -> ConfigError {
    ConfigError::WrongType {
        key,
        expected,
        value: value.clone(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::spec::code;

    fn parse(value: Value) -> Result<PluginInput, CniError> {
        PluginInput::parse(value.to_string().as_bytes()).map_err(CniError::from)
    }

    fn minimal() -> Value {
        json!({"cniVersion": "1.1.0", "name": "weir", "type": "weir-cni"})
    }

    #[test]
    fn minimal_config_gets_the_default_socket_and_no_logging() {
        let input = parse(minimal()).unwrap();
        assert_eq!(input.config.cni_version, CniVersion::V1_1_0);
        assert_eq!(
            input.config.agent_socket,
            PathBuf::from(DEFAULT_AGENT_SOCKET)
        );
        assert_eq!(input.config.log_level, None);
        assert!(input.config.extra.is_empty());
        assert_eq!(input.prev_result, None);
        assert_eq!(input.valid_attachments, None);
    }

    #[test]
    fn unknown_keys_are_kept_in_extra_and_modelled_keys_are_not() {
        let mut config = minimal();
        config["mtu"] = json!(1450);
        config["ipam"] = json!({"type": "weir"});
        config["agentSocket"] = json!("/var/run/weir.sock");
        config["logLevel"] = json!("debug");
        config["runtimeConfig"] = json!({"portMappings": []});
        config["args"] = json!({"cni": {"ips": ["10.0.0.1"]}});
        let input = parse(config).unwrap();
        assert_eq!(input.config.extra.len(), 2);
        assert_eq!(input.config.extra["mtu"], 1450);
        assert_eq!(
            input.config.agent_socket,
            PathBuf::from("/var/run/weir.sock")
        );
        assert_eq!(input.config.log_level, Some(LogLevel::Debug));
        assert_eq!(input.config.runtime_config["portMappings"], json!([]));
        assert_eq!(
            input.config.args,
            Some(json!({"cni": {"ips": ["10.0.0.1"]}}))
        );
    }

    #[test]
    fn undecodable_input_is_code_6() {
        for bad in [&b"{not json"[..], b"", b"[1,2]"] {
            let error = CniError::from(PluginInput::parse(bad).unwrap_err());
            assert_eq!(error.code, code::DECODING_FAILURE, "{bad:?}");
        }
    }

    #[test]
    fn missing_name_or_type_is_code_7() {
        for key in ["name", "type"] {
            let mut config = minimal();
            config.as_object_mut().unwrap().remove(key);
            let error = parse(config).unwrap_err();
            assert_eq!(error.code, code::INVALID_NETWORK_CONFIG, "{key}");
            assert!(error.msg.contains(key), "{}", error.msg);
        }
    }

    #[test]
    fn bad_weir_fields_are_code_7() {
        for (key, value) in [
            ("agentSocket", json!("relative/cni.sock")),
            ("agentSocket", json!(17)),
            ("logLevel", json!("verbose")),
            ("name", json!("bad name")),
            ("type", json!("../evil")),
            ("runtimeConfig", json!([1])),
        ] {
            let mut config = minimal();
            config[key] = value.clone();
            let error = parse(config).unwrap_err();
            assert_eq!(error.code, code::INVALID_NETWORK_CONFIG, "{key}={value}");
        }
    }

    #[test]
    fn old_missing_or_future_versions_are_code_1_and_malformed_ones_code_6() {
        for (version, expected) in [
            (Some("0.2.0"), code::INCOMPATIBLE_VERSION),
            (Some("2.0.0"), code::INCOMPATIBLE_VERSION),
            (None, code::INCOMPATIBLE_VERSION),
            (Some("latest"), code::DECODING_FAILURE),
        ] {
            let mut config = minimal();
            match version {
                Some(v) => config["cniVersion"] = json!(v),
                None => {
                    config.as_object_mut().unwrap().remove("cniVersion");
                }
            }
            assert_eq!(parse(config).unwrap_err().code, expected, "{version:?}");
        }
    }

    #[test]
    fn prev_result_is_parsed_and_a_broken_one_is_code_6() {
        let mut config = minimal();
        config["prevResult"] = json!({"ips": [{"address": "10.0.0.2/24"}]});
        let input = parse(config.clone()).unwrap();
        assert_eq!(
            input.prev_result.unwrap().ips[0].address.to_string(),
            "10.0.0.2/24"
        );
        config["prevResult"] = json!({"ips": [{"address": "not-an-ip"}]});
        assert_eq!(parse(config).unwrap_err().code, code::DECODING_FAILURE);
    }

    #[test]
    fn valid_attachments_are_read_from_either_key() {
        for key in [VALID_ATTACHMENTS_KEY, LEGACY_ATTACHMENTS_KEY] {
            let mut config = minimal();
            config[key] = json!([{"containerID": "c1", "ifname": "eth0"}]);
            let input = parse(config).unwrap();
            assert_eq!(
                input.valid_attachments,
                Some(vec![Attachment {
                    container_id: "c1".into(),
                    ifname: "eth0".into()
                }])
            );
        }
        let mut config = minimal();
        config[VALID_ATTACHMENTS_KEY] = json!([{"containerID": "new", "ifname": "eth0"}]);
        config[LEGACY_ATTACHMENTS_KEY] = json!([]);
        let input = parse(config).unwrap();
        assert_eq!(input.valid_attachments.unwrap()[0].container_id, "new");
    }

    #[test]
    fn requested_version_is_echoed_only_when_well_formed() {
        assert_eq!(
            requested_version(br#"{"cniVersion":"0.2.0"}"#).as_deref(),
            Some("0.2.0")
        );
        assert_eq!(requested_version(br#"{"cniVersion":"junk"}"#), None);
        assert_eq!(requested_version(b"junk"), None);
    }

    #[test]
    fn network_config_round_trips_through_the_agent_wire_form() {
        let mut config = minimal();
        config["mtu"] = json!(1400);
        let input = parse(config).unwrap();
        let wire = serde_json::to_string(&input.config).unwrap();
        let back: NetworkConfig = serde_json::from_str(&wire).unwrap();
        assert_eq!(back, input.config);
    }
}
