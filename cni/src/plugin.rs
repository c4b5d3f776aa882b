//! What the `weir-cni` binary does for one invocation: validate the environment and the
//! configuration, answer `VERSION` itself, forward everything else to the agent, and
//! render the answer in the runtime's CNI version.
//!
//! Kept in the library, with the process's environment, stdin and stderr passed in, so
//! that the whole flow is unit-testable; `main` only wires the real ones.

use std::io::{Read, Write};

use crate::client::AgentClient;
use crate::protocol::{AddRequest, CheckRequest, DelRequest, GcRequest, Request, StatusRequest};
use crate::spec::{
    CniError, CniVersion, Command, Invocation, LogLevel, PluginInput, PortMapping,
    VALID_ATTACHMENTS_KEY, code, is_well_formed, requested_version,
};

/// What the process prints on stdout and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Printed on stdout as is (empty for `DEL`, `CHECK`, `STATUS`, `GC` successes).
    pub stdout: String,
    /// 0 on success, 1 on a CNI error (printed on stdout, SPEC.md §2 "Errors").
    pub exit_code: u8,
}

impl Outcome {
    fn success(stdout: String) -> Self {
        Outcome {
            stdout,
            exit_code: 0,
        }
    }

    fn failure(error: &CniError, cni_version: &str) -> Self {
        Outcome {
            stdout: error.to_json(cni_version).to_string(),
            exit_code: 1,
        }
    }
}

/// Runs one plugin invocation.
///
/// `var` looks up environment variables (`None` when unset), `stdin` is the request
/// configuration, `stderr` receives log lines when the configuration's `logLevel` asks
/// for them (nothing otherwise, so the runtime's logs stay clean).
pub fn run(
    var: impl Fn(&str) -> Option<String>,
    mut stdin: impl Read,
    stderr: impl Write,
) -> Outcome {
    let mut input = Vec::new();
    if let Err(error) = stdin.read_to_end(&mut input) {
        let error = CniError::io_failure("reading the network configuration from stdin failed")
            .with_details(error.to_string());
        return Outcome::failure(&error, CniVersion::LATEST.as_str());
    }
    // Errors found before the configuration is validated still answer in the version the
    // runtime asked for, when it is readable.
    let echoed_version =
        requested_version(&input).unwrap_or_else(|| CniVersion::LATEST.as_str().to_owned());

    let invocation = match Invocation::from_env(var) {
        Ok(invocation) => invocation,
        Err(error) => return Outcome::failure(&error.into(), &echoed_version),
    };
    if invocation.command == Command::Version {
        return version(&input);
    }
    let parsed = match PluginInput::parse(&input) {
        Ok(parsed) => parsed,
        Err(error) => return Outcome::failure(&error.into(), &echoed_version),
    };
    let version = parsed.config.cni_version;
    let mut log = Log::new(parsed.config.log_level, stderr);
    log.write(LogLevel::Info, || {
        format!(
            "{} container={} ifname={} netns={} network={}",
            invocation.command,
            invocation.container_id.as_deref().unwrap_or("-"),
            invocation.ifname.as_deref().unwrap_or("-"),
            invocation
                .netns
                .as_deref()
                .map_or_else(|| "-".into(), |p| p.display().to_string()),
            parsed.config.name,
        )
    });

    let outcome = build_request(invocation, parsed).and_then(|request| {
        log.write(LogLevel::Debug, || {
            format!(
                "request to {}: {}",
                request.config().agent_socket.display(),
                serde_json::to_string(&request).unwrap_or_default()
            )
        });
        forward(&request)
    });
    match outcome {
        Ok(stdout) => {
            log.write(LogLevel::Debug, || format!("success: {stdout}"));
            Outcome::success(stdout)
        }
        Err(error) => {
            log.write(LogLevel::Error, || error.to_string());
            Outcome::failure(&error, version.as_str())
        }
    }
}

/// `VERSION`: answered locally, the agent is not needed (SPEC.md §2 `VERSION`, §5).
///
/// Any well-formed input version is echoed, supported or not: the runtime learns what we
/// support from `supportedVersions` and decides; refusing would break a newer runtime's
/// probe. Empty stdin, or an object without `cniVersion`, is answered for the newest
/// version.
fn version(input: &[u8]) -> Outcome {
    let echoed = if input.iter().all(u8::is_ascii_whitespace) {
        CniVersion::LATEST.as_str().to_owned()
    } else {
        // None: not a JSON object; Some(None): an object without a cniVersion string.
        let requested = serde_json::from_slice::<serde_json::Value>(input)
            .ok()
            .filter(serde_json::Value::is_object)
            .map(|value| {
                value
                    .get("cniVersion")
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_owned)
            });
        match requested {
            Some(Some(version)) if is_well_formed(&version) => version,
            // A JSON object without `cniVersion`: libcni reads that as the oldest version;
            // answering for the newest is as good, the runtime only needs the list.
            Some(None) => CniVersion::LATEST.as_str().to_owned(),
            _ => {
                let error = CniError::decoding_failure(
                    "VERSION input must be a JSON object with a semantic-version cniVersion",
                );
                return Outcome::failure(&error, CniVersion::LATEST.as_str());
            }
        }
    };
    let supported: Vec<&str> = CniVersion::SUPPORTED.iter().map(|v| v.as_str()).collect();
    let answer = serde_json::json!({
        "cniVersion": echoed,
        "supportedVersions": supported,
    });
    Outcome::success(answer.to_string())
}

/// Checks that the command exists in the configuration's version and has what it needs,
/// and builds the agent request.
fn build_request(invocation: Invocation, parsed: PluginInput) -> Result<Request, CniError> {
    let PluginInput {
        config,
        prev_result,
        valid_attachments,
    } = parsed;
    let version = config.cni_version;
    let command = invocation.command;
    let exists = match command {
        Command::Check => version.supports_check(),
        Command::Status | Command::Gc => version.supports_status_and_gc(),
        Command::Add | Command::Del | Command::Version => true,
    };
    if !exists {
        return Err(CniError::incompatible_version(format!(
            "config version {version} does not allow {command}"
        )));
    }
    // `Invocation::from_env` guarantees these for ADD, DEL and CHECK; the fallbacks keep
    // a broken invariant from panicking.
    let missing = |name: &str| CniError::invalid_environment(format!("{name} missing"));
    let container_id = || {
        invocation
            .container_id
            .clone()
            .ok_or_else(|| missing("CNI_CONTAINERID"))
    };
    let ifname = || {
        invocation
            .ifname
            .clone()
            .ok_or_else(|| missing("CNI_IFNAME"))
    };
    let netns = || invocation.netns.clone().ok_or_else(|| missing("CNI_NETNS"));
    Ok(match command {
        Command::Add => {
            // Checked here, before anything is built: a mapping the agent cannot serve fails
            // the ADD as a whole.
            let port_mappings = PortMapping::from_runtime_config(&config.runtime_config)
                .map_err(|error| CniError::invalid_network_config(error.to_string()))?;
            Request::Add(AddRequest {
                container_id: container_id()?,
                ifname: ifname()?,
                netns: netns()?,
                args: invocation.args.clone(),
                config,
                prev_result,
                port_mappings,
            })
        }
        Command::Del => Request::Del(DelRequest {
            container_id: container_id()?,
            ifname: ifname()?,
            netns: invocation.netns.clone(),
            args: invocation.args.clone(),
            config,
            prev_result,
        }),
        Command::Check => Request::Check(CheckRequest {
            container_id: container_id()?,
            ifname: ifname()?,
            netns: netns()?,
            args: invocation.args.clone(),
            config,
            prev_result: prev_result.ok_or_else(|| {
                CniError::invalid_network_config(
                    "CHECK requires prevResult (the result of the ADD) in the network configuration",
                )
            })?,
        }),
        Command::Status => Request::Status(StatusRequest { config }),
        Command::Gc => Request::Gc(GcRequest {
            config,
            // Without the list every attachment would look stale; refusing is the only
            // safe reading of a GC that does not say what to keep.
            valid_attachments: valid_attachments.ok_or_else(|| {
                CniError::invalid_network_config(format!(
                    "GC requires {VALID_ATTACHMENTS_KEY} in the network configuration"
                ))
            })?,
        }),
        Command::Version => {
            return Err(CniError::internal("VERSION is answered without the agent"));
        }
    })
}

/// Sends the request; renders the `ADD` result in the configuration's version.
fn forward(request: &Request) -> Result<String, CniError> {
    let command = request.command();
    let version = request.config().cni_version;
    match AgentClient::new(&request.config().agent_socket).call(request) {
        Ok(Some(result)) => Ok(result.to_json(version).to_string()),
        Ok(None) => Ok(String::new()),
        // DEL must succeed for containers the agent does not know (SPEC.md §2 `DEL`);
        // the agent should already answer so, this makes sure a runtime never loops on it.
        Err(error) => match error.into_cni_error(command) {
            error if command == Command::Del && error.code == code::UNKNOWN_CONTAINER => {
                Ok(String::new())
            }
            error => Err(error),
        },
    }
}

/// Log lines on stderr, filtered by the configuration's `logLevel`.
struct Log<W: Write> {
    level: Option<LogLevel>,
    sink: W,
}

impl<W: Write> Log<W> {
    fn new(level: Option<LogLevel>, sink: W) -> Self {
        Log { level, sink }
    }

    fn write(&mut self, level: LogLevel, message: impl FnOnce() -> String) {
        if self.level.is_some_and(|wanted| level <= wanted) {
            // Logging is best effort: a closed stderr must not fail the CNI operation.
            let _ignored = writeln!(
                self.sink,
                "weir-cni[{}] {}: {}",
                std::process::id(),
                level.as_str(),
                message()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::{Value, json};

    use super::*;

    struct Case {
        env: HashMap<&'static str, String>,
        stdin: String,
    }

    impl Case {
        fn new(command: &str, config: &Value) -> Self {
            let mut env = HashMap::new();
            env.insert("CNI_COMMAND", command.to_owned());
            Case {
                env,
                stdin: config.to_string(),
            }
        }

        fn attachment(mut self) -> Self {
            self.env.insert("CNI_CONTAINERID", "c1".into());
            self.env.insert("CNI_IFNAME", "eth0".into());
            self.env.insert("CNI_NETNS", "/run/netns/c1".into());
            self
        }

        fn run(&self) -> (Outcome, String) {
            let mut stderr = Vec::new();
            let outcome = run(
                |name| self.env.get(name).cloned(),
                self.stdin.as_bytes(),
                &mut stderr,
            );
            (outcome, String::from_utf8(stderr).unwrap())
        }

        fn error(&self) -> Value {
            let (outcome, _) = self.run();
            assert_eq!(outcome.exit_code, 1, "{outcome:?}");
            serde_json::from_str(&outcome.stdout).unwrap()
        }
    }

    fn config(version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "weir",
            "type": "weir-cni",
            "agentSocket": "/nonexistent/weir/cni.sock",
        })
    }

    #[test]
    fn version_is_answered_without_an_agent() {
        let (outcome, _) = Case::new("VERSION", &json!({"cniVersion": "0.4.0"})).run();
        assert_eq!(outcome.exit_code, 0);
        let answer: Value = serde_json::from_str(&outcome.stdout).unwrap();
        assert_eq!(answer["cniVersion"], "0.4.0");
        assert_eq!(
            answer["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
    }

    #[test]
    fn version_without_cni_version_answers_for_the_newest() {
        let (outcome, _) = Case::new("VERSION", &json!({})).run();
        assert_eq!(outcome.exit_code, 0);
        let answer: Value = serde_json::from_str(&outcome.stdout).unwrap();
        assert_eq!(answer["cniVersion"], "1.1.0");
    }

    #[test]
    fn version_with_a_malformed_cni_version_is_a_decoding_failure() {
        let error = Case::new("VERSION", &json!({"cniVersion": "newest"})).error();
        assert_eq!(error["code"], code::DECODING_FAILURE);
    }

    #[test]
    fn check_in_a_0_3_1_config_is_incompatible() {
        let error = Case::new("CHECK", &config("0.3.1")).attachment().error();
        assert_eq!(error["code"], code::INCOMPATIBLE_VERSION);
        assert_eq!(error["cniVersion"], "0.3.1");
    }

    #[test]
    fn status_and_gc_in_a_1_0_0_config_are_incompatible() {
        for command in ["STATUS", "GC"] {
            let error = Case::new(command, &config("1.0.0")).error();
            assert_eq!(error["code"], code::INCOMPATIBLE_VERSION, "{command}");
        }
    }

    #[test]
    fn check_without_prev_result_is_invalid_config() {
        let error = Case::new("CHECK", &config("1.1.0")).attachment().error();
        assert_eq!(error["code"], code::INVALID_NETWORK_CONFIG);
    }

    #[test]
    fn gc_without_valid_attachments_is_refused_rather_than_releasing_everything() {
        let error = Case::new("GC", &config("1.1.0")).error();
        assert_eq!(error["code"], code::INVALID_NETWORK_CONFIG);
        assert!(
            error["msg"]
                .as_str()
                .unwrap()
                .contains(VALID_ATTACHMENTS_KEY),
            "{error}"
        );
    }

    #[test]
    fn env_error_echoes_the_requested_version() {
        let error = Case::new("ADD", &config("0.4.0")).error();
        assert_eq!(error["code"], code::INVALID_ENVIRONMENT_VARIABLES);
        assert_eq!(error["cniVersion"], "0.4.0");
    }

    #[test]
    fn nothing_is_logged_without_log_level() {
        let (outcome, stderr) = Case::new("ADD", &config("1.1.0")).attachment().run();
        assert_eq!(outcome.exit_code, 1);
        assert_eq!(stderr, "");
    }

    #[test]
    fn log_level_info_logs_the_invocation_and_the_failure() {
        let mut with_logging = config("1.1.0");
        with_logging["logLevel"] = json!("info");
        let (outcome, stderr) = Case::new("ADD", &with_logging).attachment().run();
        assert_eq!(outcome.exit_code, 1);
        assert!(
            stderr.contains("info: ADD container=c1 ifname=eth0"),
            "{stderr}"
        );
        assert!(stderr.contains("error: "), "{stderr}");
        assert!(!stderr.contains("debug: "), "{stderr}");
    }
}
