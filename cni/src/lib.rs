//! weir's CNI plugin and its protocol with the node agent.
//!
//! The `weir-cni` binary is a thin CNI 1.1.0 plugin: the container runtime executes it for
//! every CNI command, it validates the invocation, answers `VERSION` itself and forwards
//! `ADD`, `DEL`, `CHECK`, `STATUS` and `GC` to the node agent over a unix socket
//! (`agentSocket` in the network configuration, default [`spec::DEFAULT_AGENT_SOCKET`]).
//! The agent does the real work (veth, addresses, routes, eBPF attach).
//!
//! * [`spec`]: the CNI data types (configuration, environment, results, errors, versions).
//! * [`protocol`]: the request and response frames exchanged with the agent.
//! * [`client`]: the blocking client the binary uses.
//! * [`plugin`]: the binary's logic, one invocation in, stdout and exit code out.
//! * `server` (feature `server`): [`serve`](server::serve) and the
//!   [`CniHandler`](server::CniHandler) trait the agent implements.
//!
//! Supported CNI versions: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0. Results are rendered in the
//! version the configuration asked for.

pub mod client;
pub mod plugin;
pub mod protocol;
#[cfg(feature = "server")]
pub mod server;
pub mod spec;
