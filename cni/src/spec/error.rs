//! The CNI error result (SPEC.md §5 "Error") and the well-known error codes.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::version::CniVersion;

/// Well-known CNI error codes (SPEC.md §5 "Error", and §2 `STATUS` for 50/51).
///
/// Codes 0–99 are reserved by the specification; 100 and above are free for plugins.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in network configuration; the message must name key and value.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist; the runtime need not call `DEL` afterwards.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables; the message must name them.
    pub const INVALID_ENVIRONMENT_VARIABLES: u32 = 4;
    /// I/O failure, e.g. reading the configuration from stdin.
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content (JSON, a version string).
    pub const DECODING_FAILURE: u32 = 6;
    /// Invalid network configuration.
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    /// Invalid network namespace (libcni's code; not in the spec's table).
    pub const INVALID_NETNS: u32 = 8;
    /// A transient condition: the runtime should retry later.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// `STATUS`: the plugin cannot service `ADD` requests.
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// `STATUS`: not available, and existing containers may have limited connectivity.
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// An internal failure of the plugin or the agent (libcni's `ErrInternal`).
    pub const INTERNAL: u32 = 999;
}

/// A CNI error: what the plugin prints on stdout (with `cniVersion` added, see
/// [`CniError::to_json`]) before exiting non-zero, and what the agent answers on failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniError {
    /// A [`code`] constant, or a plugin-specific code ≥ 100.
    pub code: u32,
    /// A short message characterising the error.
    pub msg: String,
    /// A longer description; empty when there is nothing to add.
    #[serde(default)]
    pub details: String,
}

impl CniError {
    /// An error with `code` and `msg` and no details.
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// Replaces the details.
    #[must_use]
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// Code 1: the configuration's version, or the command for it, is not supported.
    pub fn incompatible_version(msg: impl Into<String>) -> Self {
        Self::new(code::INCOMPATIBLE_VERSION, msg)
    }

    /// Code 2: the message must contain the key and value of the field.
    pub fn unsupported_field(key: &str, value: &serde_json::Value) -> Self {
        Self::new(
            code::UNSUPPORTED_FIELD,
            format!("unsupported field in network configuration: {key}={value}"),
        )
    }

    /// Code 3: the container is unknown; the runtime need not clean up after it.
    pub fn unknown_container(msg: impl Into<String>) -> Self {
        Self::new(code::UNKNOWN_CONTAINER, msg)
    }

    /// Code 4: the message must name the invalid variables.
    pub fn invalid_environment(msg: impl Into<String>) -> Self {
        Self::new(code::INVALID_ENVIRONMENT_VARIABLES, msg)
    }

    /// Code 5.
    pub fn io_failure(msg: impl Into<String>) -> Self {
        Self::new(code::IO_FAILURE, msg)
    }

    /// Code 6.
    pub fn decoding_failure(msg: impl Into<String>) -> Self {
        Self::new(code::DECODING_FAILURE, msg)
    }

    /// Code 7.
    pub fn invalid_network_config(msg: impl Into<String>) -> Self {
        Self::new(code::INVALID_NETWORK_CONFIG, msg)
    }

    /// Code 11: a transient condition; the runtime retries.
    pub fn try_again_later(msg: impl Into<String>) -> Self {
        Self::new(code::TRY_AGAIN_LATER, msg)
    }

    /// Code 50 (`STATUS` only): cannot service `ADD` requests.
    pub fn plugin_not_available(msg: impl Into<String>) -> Self {
        Self::new(code::PLUGIN_NOT_AVAILABLE, msg)
    }

    /// Code 51 (`STATUS` only): not available and existing pods may be affected.
    pub fn limited_connectivity(msg: impl Into<String>) -> Self {
        Self::new(code::LIMITED_CONNECTIVITY, msg)
    }

    /// Code 999: an internal failure (a bug, or a failure the runtime cannot act on).
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(code::INTERNAL, msg)
    }

    /// The error result as printed on stdout: `{"cniVersion","code","msg","details"}`.
    ///
    /// `cni_version` is the version string the runtime used (echoed even when this
    /// plugin does not support it, so the runtime can read the error in its own version).
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }

    /// Like [`to_json`](Self::to_json) for a known version.
    pub fn to_json_for(&self, version: CniVersion) -> serde_json::Value {
        self.to_json(version.as_str())
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_the_four_spec_keys() {
        let error = CniError::invalid_network_config("missing network name").with_details("x");
        let json = error.to_json("1.0.0");
        assert_eq!(
            json,
            serde_json::json!({
                "cniVersion": "1.0.0",
                "code": 7,
                "msg": "missing network name",
                "details": "x",
            })
        );
    }

    #[test]
    fn error_without_details_decodes() {
        let error: CniError = serde_json::from_str(r#"{"code":11,"msg":"later"}"#).unwrap();
        assert_eq!(error, CniError::try_again_later("later"));
    }
}
