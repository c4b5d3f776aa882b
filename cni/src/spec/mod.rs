//! Typed CNI structures: what a runtime hands the plugin and what the plugin answers,
//! following the CNI specification 1.1.0
//! (<https://github.com/containernetworking/cni/blob/spec-v1.1.0/SPEC.md>; section
//! numbers in comments refer to it).

mod config;
mod env;
mod error;
mod port_mapping;
mod result;
mod version;

pub use config::{
    Attachment, ConfigError, DEFAULT_AGENT_SOCKET, LEGACY_ATTACHMENTS_KEY, LogLevel, NetworkConfig,
    PluginInput, VALID_ATTACHMENTS_KEY, requested_version,
};
pub use env::{CniArgs, Command, EnvError, Invocation, is_valid_identifier};
pub use error::{CniError, code};
pub use port_mapping::{PORT_MAPPINGS_KEY, PortMapping, PortMappingError, PortProtocol};
pub use result::{CniResult, Dns, Interface, IpConfig, Route};
pub use version::{CniVersion, VersionError, is_well_formed};
