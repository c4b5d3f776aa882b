//! The `CNI_*` environment parameters (SPEC.md §2 "Parameters").

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::CniError;

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    /// Add a container to the network.
    Add,
    /// Remove a container from the network; idempotent.
    Del,
    /// Check that a container's networking is as `ADD` left it (0.4.0+).
    Check,
    /// Report whether the plugin can service `ADD` (1.1.0+).
    Status,
    /// Clean up everything not in the list of valid attachments (1.1.0+).
    Gc,
    /// Report the supported spec versions.
    Version,
}

impl Command {
    /// The `CNI_COMMAND` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }

    /// Parses a `CNI_COMMAND` value (exact, upper case, as runtimes send it).
    pub fn parse(value: &str) -> Option<Command> {
        [
            Command::Add,
            Command::Del,
            Command::Check,
            Command::Status,
            Command::Gc,
            Command::Version,
        ]
        .into_iter()
        .find(|command| command.as_str() == value)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is wrong with the environment; every variant is CNI error code 4 and names the
/// variable, as SPEC.md §5 requires.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    /// A variable the command requires is unset or empty.
    #[error("required environment variables [{}] missing", names.join(","))]
    Missing {
        /// The missing variables, in the order the spec lists them.
        names: Vec<&'static str>,
    },
    /// `CNI_COMMAND` is not one of the defined operations.
    #[error("unknown CNI_COMMAND {value:?}")]
    UnknownCommand {
        /// The value given.
        value: String,
    },
    /// `CNI_CONTAINERID` has characters outside `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
    #[error("invalid characters in CNI_CONTAINERID {value:?}")]
    InvalidContainerId {
        /// The value given.
        value: String,
    },
    /// `CNI_IFNAME` is not a usable Linux interface name.
    #[error("invalid CNI_IFNAME {value:?}: {reason}")]
    InvalidIfname {
        /// The value given.
        value: String,
        /// Which kernel rule it breaks.
        reason: &'static str,
    },
    /// A `CNI_ARGS` item is not `KEY=VALUE`.
    #[error("invalid CNI_ARGS item {item:?}: expected KEY=VALUE pairs separated by ';'")]
    InvalidArgs {
        /// The offending item.
        item: String,
    },
}

impl From<EnvError> for CniError {
    fn from(error: EnvError) -> Self {
        CniError::invalid_environment(error.to_string())
    }
}

/// Parsed `CNI_ARGS`: the keys Kubernetes runtimes (containerd, CRI-O) always pass as
/// named fields, everything else in [`other`](Self::other).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniArgs {
    /// `K8S_POD_NAMESPACE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_pod_namespace: Option<String>,
    /// `K8S_POD_NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_pod_name: Option<String>,
    /// `K8S_POD_UID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_pod_uid: Option<String>,
    /// `K8S_POD_INFRA_CONTAINER_ID` (the sandbox container's id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_pod_infra_container_id: Option<String>,
    /// Every other key (e.g. `IgnoreUnknown`), in key order.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub other: BTreeMap<String, String>,
}

impl CniArgs {
    /// Parses `KEY=VALUE;KEY=VALUE` (empty items, e.g. a trailing `;`, are skipped; a
    /// value may be empty and may itself contain `=`).
    pub fn parse(raw: &str) -> Result<CniArgs, EnvError> {
        let mut args = CniArgs::default();
        for item in raw.split(';').filter(|item| !item.is_empty()) {
            let Some((key, value)) = item.split_once('=') else {
                return Err(EnvError::InvalidArgs { item: item.into() });
            };
            if key.is_empty() {
                return Err(EnvError::InvalidArgs { item: item.into() });
            }
            let value = value.to_owned();
            match key {
                "K8S_POD_NAMESPACE" => args.k8s_pod_namespace = Some(value),
                "K8S_POD_NAME" => args.k8s_pod_name = Some(value),
                "K8S_POD_UID" => args.k8s_pod_uid = Some(value),
                "K8S_POD_INFRA_CONTAINER_ID" => args.k8s_pod_infra_container_id = Some(value),
                _ => {
                    args.other.insert(key.to_owned(), value);
                }
            }
        }
        Ok(args)
    }
}

/// The environment of one plugin invocation, validated for its command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID`; set for `ADD`, `DEL`, `CHECK`.
    pub container_id: Option<String>,
    /// `CNI_NETNS`; set for `ADD` and `CHECK`, optional on `DEL` (the runtime may have
    /// removed the namespace already).
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`; set for `ADD`, `DEL`, `CHECK`.
    pub ifname: Option<String>,
    /// `CNI_ARGS`, parsed; empty when unset.
    pub args: CniArgs,
}

impl Invocation {
    /// Reads and validates the variables `command` needs through `var` (a lookup such as
    /// `std::env::var`, returning `None` for unset).
    ///
    /// Requirements per command follow SPEC.md §2: `ADD` and `CHECK` need
    /// `CNI_CONTAINERID`, `CNI_NETNS` and `CNI_IFNAME`; `DEL` needs `CNI_CONTAINERID` and
    /// `CNI_IFNAME`; `STATUS`, `GC` and `VERSION` need none. `CNI_PATH` is never
    /// required: weir delegates to no other plugin, so it has no use for it.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Invocation, EnvError> {
        let get = |name: &str| var(name).filter(|value| !value.is_empty());
        let Some(raw_command) = get("CNI_COMMAND") else {
            return Err(EnvError::Missing {
                names: vec!["CNI_COMMAND"],
            });
        };
        let command =
            Command::parse(&raw_command).ok_or(EnvError::UnknownCommand { value: raw_command })?;
        let attachment = matches!(command, Command::Add | Command::Del | Command::Check);
        let netns_required = matches!(command, Command::Add | Command::Check);

        let container_id = get("CNI_CONTAINERID");
        let netns = get("CNI_NETNS");
        let ifname = get("CNI_IFNAME");
        let mut missing = Vec::new();
        if attachment && container_id.is_none() {
            missing.push("CNI_CONTAINERID");
        }
        if netns_required && netns.is_none() {
            missing.push("CNI_NETNS");
        }
        if attachment && ifname.is_none() {
            missing.push("CNI_IFNAME");
        }
        if !missing.is_empty() {
            return Err(EnvError::Missing { names: missing });
        }
        if !attachment {
            return Ok(Invocation {
                command,
                container_id: None,
                netns: None,
                ifname: None,
                args: CniArgs::default(),
            });
        }
        if let Some(id) = &container_id {
            validate_container_id(id)?;
        }
        if let Some(name) = &ifname {
            validate_ifname(name)?;
        }
        let args = CniArgs::parse(&get("CNI_ARGS").unwrap_or_default())?;
        Ok(Invocation {
            command,
            container_id,
            netns: netns.map(PathBuf::from),
            ifname,
            args,
        })
    }
}

/// Whether `name` matches `[a-zA-Z0-9][a-zA-Z0-9_.\-]*`, the spec's rule for container
/// ids and network names (SPEC.md §2 "Parameters", §1 `name`).
pub fn is_valid_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn validate_container_id(id: &str) -> Result<(), EnvError> {
    if is_valid_identifier(id) {
        Ok(())
    } else {
        Err(EnvError::InvalidContainerId { value: id.into() })
    }
}

/// The kernel's rules for interface names (`dev_valid_name` in net/core/dev.c): at most
/// 15 bytes, not `.`/`..`, no `/`, `:` or whitespace.
fn validate_ifname(name: &str) -> Result<(), EnvError> {
    let reason = if name.len() > 15 {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("must not be . or ..")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        Some("contains '/', ':' or whitespace")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(EnvError::InvalidIfname {
            value: name.into(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn kubernetes_args_become_named_fields() {
        let args = CniArgs::parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=1234-5678;EXTRA=a=b;",
        )
        .unwrap();
        assert_eq!(args.k8s_pod_namespace.as_deref(), Some("default"));
        assert_eq!(args.k8s_pod_name.as_deref(), Some("web-0"));
        assert_eq!(args.k8s_pod_uid.as_deref(), Some("1234-5678"));
        assert_eq!(args.k8s_pod_infra_container_id.as_deref(), Some("abc"));
        assert_eq!(
            args.other.get("IgnoreUnknown").map(String::as_str),
            Some("1")
        );
        assert_eq!(args.other.get("EXTRA").map(String::as_str), Some("a=b"));
    }

    #[test]
    fn args_item_without_equals_is_rejected() {
        assert_eq!(
            CniArgs::parse("K8S_POD_NAME=x;garbage"),
            Err(EnvError::InvalidArgs {
                item: "garbage".into()
            })
        );
        assert!(CniArgs::parse("=value").is_err());
    }

    #[test]
    fn add_needs_netns_but_del_does_not() {
        let add = Invocation::from_env(env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ]));
        assert_eq!(
            add,
            Err(EnvError::Missing {
                names: vec!["CNI_NETNS"]
            })
        );
        let del = Invocation::from_env(env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ]))
        .unwrap();
        assert_eq!(del.netns, None);
        assert_eq!(del.container_id.as_deref(), Some("c1"));
    }

    #[test]
    fn missing_variables_are_all_named() {
        let error = Invocation::from_env(env(&[("CNI_COMMAND", "CHECK")])).unwrap_err();
        assert_eq!(
            error.to_string(),
            "required environment variables [CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME] missing"
        );
    }

    #[test]
    fn status_gc_and_version_need_no_attachment_variables() {
        for command in ["STATUS", "GC", "VERSION"] {
            let invocation = Invocation::from_env(env(&[("CNI_COMMAND", command)])).unwrap();
            assert_eq!(invocation.command.as_str(), command);
        }
    }

    #[test]
    fn unknown_or_lower_case_command_is_rejected() {
        for bad in ["add", "REMOVE"] {
            assert!(matches!(
                Invocation::from_env(env(&[("CNI_COMMAND", bad)])),
                Err(EnvError::UnknownCommand { .. })
            ));
        }
    }

    #[test]
    fn container_id_and_ifname_are_validated() {
        let base = [("CNI_COMMAND", "DEL"), ("CNI_IFNAME", "eth0")];
        let bad_id = Invocation::from_env(env(&[base[0], base[1], ("CNI_CONTAINERID", "-x")]));
        assert!(matches!(bad_id, Err(EnvError::InvalidContainerId { .. })));
        for bad_ifname in ["eth0/1", "a:b", "..", "abcdefghijklmnop", "a b"] {
            let result = Invocation::from_env(env(&[
                base[0],
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", bad_ifname),
            ]));
            assert!(
                matches!(result, Err(EnvError::InvalidIfname { .. })),
                "{bad_ifname:?}"
            );
        }
    }

    #[test]
    fn identifiers_follow_the_spec_pattern() {
        assert!(is_valid_identifier("k8s-pod-network"));
        assert!(is_valid_identifier("a.b_c-1"));
        assert!(!is_valid_identifier(""));
        assert!(!is_valid_identifier("_x"));
        assert!(!is_valid_identifier("x/y"));
    }
}
