//! The plugin ⇄ agent protocol on the agent's unix socket.
//!
//! # Wire format
//!
//! One request per connection. The plugin connects, writes one [`RequestFrame`] as
//! compact JSON followed by `\n`, and shuts down its write side; the agent answers with
//! one [`ResponseFrame`] as compact JSON followed by `\n` and closes the connection.
//! Compact JSON never contains a raw newline, so the newline is an unambiguous frame end.
//! A frame larger than [`MAX_FRAME_BYTES`] is refused.
//!
//! Both frames carry [`PROTOCOL_VERSION`]. A peer that receives another version answers
//! (or reports) CNI code 11, "try again later": a mismatch only happens while a node is
//! mid-upgrade (new plugin binary, old agent, or the reverse), which resolves by itself.
//!
//! ```text
//! → {"protocolVersion":1,"request":{"command":"ADD","containerId":"…","ifname":"eth0",
//!    "netns":"/var/run/netns/cni-…","args":{"k8sPodNamespace":"default",…},
//!    "config":{"cniVersion":"1.1.0","name":"weir","type":"weir-cni",…}}}
//! ← {"protocolVersion":1,"reply":{"success":{"result":{"interfaces":[…],"ips":[…]}}}}
//! ← {"protocolVersion":1,"reply":{"error":{"code":11,"msg":"…","details":"…"}}}
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::spec::{Attachment, CniArgs, CniError, CniResult, Command, NetworkConfig, PortMapping};

/// The version of this protocol; bump it on any incompatible change of the frames.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest frame either side accepts, newline included. Real requests are a few KiB
/// (a configuration plus a `prevResult`); the cap stops a broken peer from making the
/// other buffer without bound.
pub const MAX_FRAME_BYTES: usize = 1 << 20;

/// What the plugin sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestFrame {
    /// Always [`PROTOCOL_VERSION`] when sent by this crate.
    pub protocol_version: u32,
    /// The command and its parameters.
    pub request: Request,
}

/// One CNI command for the agent. `VERSION` never reaches the agent: the plugin answers
/// it itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "UPPERCASE")]
pub enum Request {
    /// `ADD`.
    Add(AddRequest),
    /// `DEL`.
    Del(DelRequest),
    /// `CHECK`.
    Check(CheckRequest),
    /// `STATUS`.
    Status(StatusRequest),
    /// `GC`.
    Gc(GcRequest),
}

impl Request {
    /// The CNI command this request carries.
    pub fn command(&self) -> Command {
        match self {
            Request::Add(_) => Command::Add,
            Request::Del(_) => Command::Del,
            Request::Check(_) => Command::Check,
            Request::Status(_) => Command::Status,
            Request::Gc(_) => Command::Gc,
        }
    }

    /// The network configuration of the invocation.
    pub fn config(&self) -> &NetworkConfig {
        match self {
            Request::Add(r) => &r.config,
            Request::Del(r) => &r.config,
            Request::Check(r) => &r.config,
            Request::Status(r) => &r.config,
            Request::Gc(r) => &r.config,
        }
    }
}

/// `ADD`: create the pod interface `ifname` in `netns` and return what was configured.
///
/// The runtime should not call `ADD` twice for the same `(container_id, ifname)` without
/// a `DEL` in between (SPEC.md §2 `ADD`); the agent may still treat a repeat as a retry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddRequest {
    /// `CNI_CONTAINERID`: the sandbox (pause) container id.
    pub container_id: String,
    /// `CNI_IFNAME`: the interface name inside the pod, usually `eth0`.
    pub ifname: String,
    /// `CNI_NETNS`: path of the pod's network namespace.
    pub netns: PathBuf,
    /// `CNI_ARGS`, parsed (pod namespace, name, uid).
    pub args: CniArgs,
    /// The validated network configuration.
    pub config: NetworkConfig,
    /// `prevResult`, when weir runs chained after another plugin; `None` when first.
    /// SPEC.md §2 `ADD`: the answer must then be this result with weir's changes merged
    /// in, not a fresh one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_result: Option<CniResult>,
    /// The pod's `hostPort`s (`runtimeConfig.portMappings`, validated by the plugin); absent
    /// from the frames of plugins that predate them, which is the same as none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_mappings: Vec<PortMapping>,
}

/// `DEL`: undo `ADD`. Must succeed for unknown containers, repeated calls and a netns that
/// no longer exists (SPEC.md §2 `DEL`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DelRequest {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_NETNS`; `None` when the runtime has already removed the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// `CNI_ARGS`, parsed.
    pub args: CniArgs,
    /// The validated network configuration.
    pub config: NetworkConfig,
    /// `prevResult`: the cached `ADD` result, when the runtime has one (0.4.0+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_result: Option<CniResult>,
}

/// `CHECK`: verify the attachment is still as `prev_result` describes (SPEC.md §2 `CHECK`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckRequest {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_NETNS`.
    pub netns: PathBuf,
    /// `CNI_ARGS`, parsed.
    pub args: CniArgs,
    /// The validated network configuration.
    pub config: NetworkConfig,
    /// The result of the preceding `ADD` (required for `CHECK`).
    pub prev_result: CniResult,
}

/// `STATUS`: can the agent service `ADD` right now? Answer 50 (or 51) if not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusRequest {
    /// The validated network configuration.
    pub config: NetworkConfig,
}

/// `GC`: release everything that belongs to attachments not in `valid_attachments`
/// (SPEC.md §2 `GC`). The runtime runs no `ADD`/`DEL` while a `GC` is in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GcRequest {
    /// The validated network configuration.
    pub config: NetworkConfig,
    /// `cni.dev/valid-attachments`: the attachments that must be kept.
    pub valid_attachments: Vec<Attachment>,
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResponseFrame {
    /// Always [`PROTOCOL_VERSION`] when sent by this crate.
    pub protocol_version: u32,
    /// Success or failure.
    pub reply: Reply,
}

/// The outcome of one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Reply {
    /// The command succeeded; `result` is set for `ADD` only.
    Success {
        /// The `ADD` result, in [`CniResult`]'s newest form; the plugin converts it to the
        /// runtime's version.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<CniResult>,
    },
    /// The command failed; the plugin prints this error.
    Error(CniError),
}

impl RequestFrame {
    /// Wraps `request` in a frame of the current protocol version.
    pub fn new(request: Request) -> Self {
        RequestFrame {
            protocol_version: PROTOCOL_VERSION,
            request,
        }
    }

    /// Decodes one received frame (without or with its trailing newline).
    ///
    /// Errors are the CNI errors to send back: a frame of another protocol version is
    /// code 11 (see the module docs), anything undecodable is code 6.
    pub fn decode(frame: &[u8]) -> Result<RequestFrame, CniError> {
        let value: serde_json::Value = serde_json::from_slice(frame).map_err(|error| {
            CniError::decoding_failure("agent request is not valid JSON")
                .with_details(error.to_string())
        })?;
        let version = value
            .get("protocolVersion")
            .and_then(serde_json::Value::as_u64);
        if version != Some(u64::from(PROTOCOL_VERSION)) {
            return Err(CniError::try_again_later(format!(
                "weir-cni and the weir agent speak different protocol versions \
                 (agent: {PROTOCOL_VERSION}, plugin: {}); expected while the node is being upgraded",
                version.map_or_else(|| "none".to_owned(), |v| v.to_string())
            )));
        }
        serde_json::from_value(value).map_err(|error| {
            CniError::decoding_failure("malformed agent request").with_details(error.to_string())
        })
    }
}

impl ResponseFrame {
    /// Wraps `reply` in a frame of the current protocol version.
    pub fn new(reply: Reply) -> Self {
        ResponseFrame {
            protocol_version: PROTOCOL_VERSION,
            reply,
        }
    }
}

/// Serialises a frame: compact JSON and a trailing `\n`.
pub fn encode_frame<T: Serialize>(frame: &T) -> Vec<u8> {
    // The frames are plain data (strings, numbers, maps with string keys); serde_json
    // cannot fail on them, but a failure must not panic the agent: send an error frame.
    let mut bytes = serde_json::to_vec(frame).unwrap_or_else(|error| {
        let reply = ResponseFrame::new(Reply::Error(
            CniError::internal("failed to encode a frame").with_details(error.to_string()),
        ));
        serde_json::to_vec(&reply).unwrap_or_default()
    });
    bytes.push(b'\n');
    bytes
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::spec::{CniVersion, DEFAULT_AGENT_SOCKET, code};

    fn config() -> NetworkConfig {
        NetworkConfig {
            cni_version: CniVersion::V1_1_0,
            name: "weir".into(),
            plugin_type: "weir-cni".into(),
            agent_socket: DEFAULT_AGENT_SOCKET.into(),
            log_level: None,
            runtime_config: serde_json::Map::new(),
            args: None,
            extra: serde_json::Map::new(),
        }
    }

    #[test]
    fn request_frames_round_trip_and_are_one_line() {
        let requests = [
            Request::Add(AddRequest {
                container_id: "c1".into(),
                ifname: "eth0".into(),
                netns: "/run/netns/x".into(),
                args: CniArgs::parse("K8S_POD_NAME=p;K8S_POD_NAMESPACE=n").unwrap(),
                config: config(),
                prev_result: None,
                port_mappings: vec![],
            }),
            Request::Add(AddRequest {
                container_id: "c1".into(),
                ifname: "eth0".into(),
                netns: "/run/netns/x".into(),
                args: CniArgs::default(),
                config: config(),
                prev_result: None,
                port_mappings: vec![PortMapping {
                    host_port: 8080,
                    container_port: 80,
                    protocol: crate::spec::PortProtocol::Udp,
                    host_ip: None,
                }],
            }),
            Request::Del(DelRequest {
                container_id: "c1".into(),
                ifname: "eth0".into(),
                netns: None,
                args: CniArgs::default(),
                config: config(),
                prev_result: None,
            }),
            Request::Status(StatusRequest { config: config() }),
            Request::Gc(GcRequest {
                config: config(),
                valid_attachments: vec![Attachment {
                    container_id: "c2".into(),
                    ifname: "eth0".into(),
                }],
            }),
        ];
        for request in requests {
            let bytes = encode_frame(&RequestFrame::new(request.clone()));
            assert_eq!(bytes.iter().filter(|b| **b == b'\n').count(), 1);
            assert_eq!(bytes.last(), Some(&b'\n'));
            let back = RequestFrame::decode(&bytes).unwrap();
            assert_eq!(back.request, request);
        }
    }

    #[test]
    fn request_names_its_command_on_the_wire() {
        let bytes = encode_frame(&RequestFrame::new(Request::Status(StatusRequest {
            config: config(),
        })));
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["request"]["command"], "STATUS");
        assert_eq!(value["protocolVersion"], PROTOCOL_VERSION);
    }

    #[test]
    fn add_without_port_mappings_is_what_older_peers_send() {
        let frame = json!({"protocolVersion": 1, "request": {
            "command": "ADD", "containerId": "c1", "ifname": "eth0", "netns": "/run/netns/x",
            "args": {}, "config": config(),
        }});
        let decoded = RequestFrame::decode(frame.to_string().as_bytes()).unwrap();
        let Request::Add(add) = &decoded.request else {
            panic!("{decoded:?}");
        };
        assert!(add.port_mappings.is_empty());
        let bytes = encode_frame(&decoded);
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert!(value["request"].get("portMappings").is_none(), "{value}");
    }

    #[test]
    fn other_protocol_version_is_try_again_later() {
        let frame = json!({"protocolVersion": 99, "request": {"command": "STATUS"}});
        let error = RequestFrame::decode(frame.to_string().as_bytes()).unwrap_err();
        assert_eq!(error.code, code::TRY_AGAIN_LATER);
        assert!(error.msg.contains("99"), "{}", error.msg);
    }

    #[test]
    fn garbage_is_a_decoding_failure() {
        for garbage in [
            &b"hello"[..],
            br#"{"protocolVersion":1,"request":{"command":"FLY"}}"#,
        ] {
            let error = RequestFrame::decode(garbage).unwrap_err();
            assert_eq!(error.code, code::DECODING_FAILURE);
        }
    }

    #[test]
    fn replies_round_trip() {
        for reply in [
            Reply::Success { result: None },
            Reply::Success {
                result: Some(CniResult::default()),
            },
            Reply::Error(CniError::try_again_later("busy").with_details("d")),
        ] {
            let bytes = encode_frame(&ResponseFrame::new(reply.clone()));
            let back: ResponseFrame = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(back.reply, reply);
        }
    }
}
