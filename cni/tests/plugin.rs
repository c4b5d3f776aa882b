//! The `weir-cni` binary, run the way a container runtime runs it: environment variables
//! and the configuration on stdin in, JSON on stdout and the exit status out, against a
//! fake agent serving `weir_cni::server::serve` on a socket in a temporary directory.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{CHECK_MISMATCH, FakeAgent, PANICKING_CONTAINER, VANISHED_CONTAINER};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use weir_cni::protocol::Request;
use weir_cni::spec::{CniError, CniVersion, PortMapping, PortProtocol, code};

const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// What the runtime sees of one plugin execution.
#[derive(Debug)]
struct Run {
    status: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|error| panic!("stdout is not JSON ({error}): {self:?}"))
    }

    /// Asserts success and returns the parsed stdout.
    fn success(&self) -> Value {
        assert_eq!(self.status, 0, "plugin failed: {self:?}");
        if self.stdout.is_empty() {
            Value::Null
        } else {
            self.json()
        }
    }

    /// Asserts failure with a well-formed CNI error and returns it.
    fn error(&self) -> (CniError, Value) {
        assert_ne!(self.status, 0, "plugin unexpectedly succeeded: {self:?}");
        let json = self.json();
        for key in ["cniVersion", "code", "msg", "details"] {
            assert!(json.get(key).is_some(), "error lacks {key}: {json}");
        }
        (serde_json::from_value(json.clone()).unwrap(), json)
    }
}

/// A runtime invocation under construction.
struct Runtime {
    env: Vec<(String, String)>,
    stdin: String,
}

impl Runtime {
    fn command(command: &str) -> Self {
        Runtime {
            env: vec![
                ("CNI_COMMAND".into(), command.into()),
                ("CNI_PATH".into(), "/opt/cni/bin".into()),
            ],
            stdin: String::new(),
        }
    }

    /// `CNI_COMMAND` plus the attachment variables of a Kubernetes pod.
    fn attachment(command: &str, container_id: &str) -> Self {
        Runtime::command(command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_NETNS", &format!("/var/run/netns/cni-{container_id}"))
            .env(
                "CNI_ARGS",
                &format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-{container_id};\
                     K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID=uid-{container_id}"
                ),
            )
    }

    fn env(mut self, name: &str, value: &str) -> Self {
        self.env.retain(|(existing, _)| existing != name);
        self.env.push((name.into(), value.into()));
        self
    }

    fn without(mut self, name: &str) -> Self {
        self.env.retain(|(existing, _)| existing != name);
        self
    }

    fn stdin(mut self, config: &Value) -> Self {
        self.stdin = config.to_string();
        self
    }

    fn raw_stdin(mut self, stdin: &str) -> Self {
        self.stdin = stdin.into();
        self
    }

    async fn run(self) -> Run {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_weir-cni"))
            .env_clear()
            .envs(self.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning weir-cni");
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(self.stdin.as_bytes()).await.unwrap();
        drop(stdin);
        let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .expect("weir-cni did not finish in 30 s")
            .unwrap();
        Run {
            status: output
                .status
                .code()
                .expect("weir-cni was killed by a signal"),
            stdout: String::from_utf8(output.stdout).unwrap(),
            stderr: String::from_utf8(output.stderr).unwrap(),
        }
    }
}

fn config(version: &str, socket: &Path) -> Value {
    json!({
        "cniVersion": version,
        "name": "weir",
        "type": "weir-cni",
        "agentSocket": socket,
        "mtu": 1450,
    })
}

fn with(mut config: Value, key: &str, value: Value) -> Value {
    config[key] = value;
    config
}

async fn add(agent: &FakeAgent, version: &str, container_id: &str) -> Value {
    Runtime::attachment("ADD", container_id)
        .stdin(&config(version, agent.socket()))
        .run()
        .await
        .success()
}

// ---------------------------------------------------------------------------------------
// ADD

#[tokio::test]
async fn add_result_is_rendered_in_each_supported_version() {
    let agent = FakeAgent::start().await;
    for version in SUPPORTED {
        let result = add(
            &agent,
            version,
            &format!("pod-{}", version.replace('.', "-")),
        )
        .await;
        assert_eq!(result["cniVersion"], version);
        assert_eq!(result["ips"].as_array().unwrap().len(), 2);
        let before_1_0 = version.starts_with("0.");
        assert_eq!(
            result["ips"][0].get("version").is_some(),
            before_1_0,
            "{version}: {result}"
        );
        if before_1_0 {
            assert_eq!(result["ips"][0]["version"], "4");
            assert_eq!(result["ips"][1]["version"], "6");
        }
        let is_1_1 = version == "1.1.0";
        assert_eq!(
            result["interfaces"][1].get("mtu").is_some(),
            is_1_1,
            "{version}"
        );
        assert_eq!(
            result["routes"][0].get("mtu").is_some(),
            is_1_1,
            "{version}"
        );
        assert_eq!(result["interfaces"][1]["name"], "eth0");
        assert_eq!(result["ips"][0]["interface"], 1);
        assert_eq!(result["dns"]["nameservers"], json!(["10.96.0.10"]));
    }
    assert_eq!(agent.handler.attachment_keys().len(), SUPPORTED.len());
}

#[tokio::test]
async fn add_forwards_the_invocation_to_the_agent() {
    let agent = FakeAgent::start().await;
    let stdin = with(
        with(
            config("1.1.0", agent.socket()),
            "runtimeConfig",
            json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}),
        ),
        "args",
        json!({"cni": {"labels": [{"key": "app", "value": "web"}]}}),
    );
    let result = Runtime::attachment("ADD", "c1")
        .stdin(&stdin)
        .run()
        .await
        .success();
    assert_eq!(result["interfaces"][1]["sandbox"], "/var/run/netns/cni-c1");

    let requests = agent.handler.requests();
    let [Request::Add(request)] = requests.as_slice() else {
        panic!("expected one ADD, got {requests:?}");
    };
    assert_eq!(request.container_id, "c1");
    assert_eq!(request.ifname, "eth0");
    assert_eq!(request.netns, Path::new("/var/run/netns/cni-c1"));
    assert_eq!(request.args.k8s_pod_namespace.as_deref(), Some("shop"));
    assert_eq!(request.args.k8s_pod_name.as_deref(), Some("web-c1"));
    assert_eq!(request.args.k8s_pod_uid.as_deref(), Some("uid-c1"));
    assert_eq!(
        request.args.k8s_pod_infra_container_id.as_deref(),
        Some("c1")
    );
    assert_eq!(
        request.args.other.get("IgnoreUnknown").map(String::as_str),
        Some("1")
    );
    assert_eq!(request.config.cni_version, CniVersion::V1_1_0);
    assert_eq!(request.config.name, "weir");
    assert_eq!(request.config.agent_socket, agent.socket());
    assert_eq!(
        request.config.runtime_config["portMappings"][0]["hostPort"],
        8080
    );
    assert_eq!(
        request.config.args.as_ref().unwrap()["cni"]["labels"][0]["key"],
        "app"
    );
    assert_eq!(request.config.extra["mtu"], 1450);
    assert_eq!(request.prev_result, None);
    assert_eq!(
        request.port_mappings,
        vec![PortMapping {
            host_port: 8080,
            container_port: 80,
            protocol: PortProtocol::Tcp,
            host_ip: None,
        }]
    );
}

#[tokio::test]
async fn add_with_a_bad_port_mapping_is_invalid_config_and_never_reaches_the_agent() {
    let agent = FakeAgent::start().await;
    let stdin = with(
        config("1.1.0", agent.socket()),
        "runtimeConfig",
        json!({"portMappings": [
            {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
            {"hostPort": 8081, "containerPort": 81, "protocol": "icmp"},
        ]}),
    );
    let run = Runtime::attachment("ADD", "c1").stdin(&stdin).run().await;
    let (error, _) = run.error();
    common::assert_code(&error, code::INVALID_NETWORK_CONFIG);
    assert!(
        error.msg.contains("portMappings[1]") && error.msg.contains("icmp"),
        "{error}"
    );
    assert!(agent.handler.requests().is_empty());
}

#[tokio::test]
async fn del_ignores_port_mappings_it_could_not_serve() {
    // DEL must succeed whatever ADD made of the configuration.
    let agent = FakeAgent::start().await;
    let stdin = with(
        config("1.1.0", agent.socket()),
        "runtimeConfig",
        json!({"portMappings": [{"hostPort": 0, "containerPort": 80}]}),
    );
    let out = Runtime::attachment("DEL", "c1")
        .stdin(&stdin)
        .run()
        .await
        .success();
    assert_eq!(out, Value::Null);
}

#[tokio::test]
async fn add_without_netns_is_an_environment_error_and_never_reaches_the_agent() {
    let agent = FakeAgent::start().await;
    let run = Runtime::attachment("ADD", "c1")
        .without("CNI_NETNS")
        .stdin(&config("1.0.0", agent.socket()))
        .run()
        .await;
    let (error, json) = run.error();
    common::assert_code(&error, code::INVALID_ENVIRONMENT_VARIABLES);
    assert!(error.msg.contains("CNI_NETNS"), "{error}");
    assert_eq!(json["cniVersion"], "1.0.0");
    assert!(agent.handler.requests().is_empty());
}

#[tokio::test]
async fn concurrent_adds_of_different_pods_all_succeed() {
    let agent = FakeAgent::start().await;
    let runs = (0..16).map(|i| {
        Runtime::attachment("ADD", &format!("pod{i}"))
            .stdin(&config("1.1.0", agent.socket()))
            .run()
    });
    let results = futures_join_all(runs).await;
    let mut addresses: Vec<String> = results
        .iter()
        .map(|run| {
            run.success()["ips"][0]["address"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    addresses.sort();
    addresses.dedup();
    assert_eq!(addresses.len(), 16);
    assert_eq!(agent.handler.attachment_keys().len(), 16);
}

/// Awaits all futures concurrently (keeps the test free of a futures dependency).
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::new();
    for handle in handles {
        outputs.push(handle.await.unwrap());
    }
    outputs
}

// ---------------------------------------------------------------------------------------
// DEL

#[tokio::test]
async fn del_removes_the_attachment_and_prints_nothing() {
    let agent = FakeAgent::start().await;
    add(&agent, "1.1.0", "c1").await;
    let run = Runtime::attachment("DEL", "c1")
        .stdin(&config("1.1.0", agent.socket()))
        .run()
        .await;
    assert_eq!(run.success(), Value::Null);
    assert!(agent.handler.attachment_keys().is_empty());
}

#[tokio::test]
async fn del_of_unknown_container_succeeds() {
    let agent = FakeAgent::start().await;
    Runtime::attachment("DEL", "never-added")
        .stdin(&config("1.1.0", agent.socket()))
        .run()
        .await
        .success();
    assert_eq!(agent.handler.requests().len(), 1);
}

#[tokio::test]
async fn repeated_del_succeeds_every_time() {
    let agent = FakeAgent::start().await;
    add(&agent, "0.4.0", "c1").await;
    for _ in 0..3 {
        Runtime::attachment("DEL", "c1")
            .stdin(&config("0.4.0", agent.socket()))
            .run()
            .await
            .success();
    }
    let dels = agent
        .handler
        .requests()
        .into_iter()
        .filter(|r| matches!(r, Request::Del(_)))
        .count();
    assert_eq!(dels, 3);
}

#[tokio::test]
async fn del_without_netns_succeeds_and_tells_the_agent_the_netns_is_gone() {
    let agent = FakeAgent::start().await;
    add(&agent, "1.1.0", "c1").await;
    Runtime::attachment("DEL", "c1")
        .without("CNI_NETNS")
        .stdin(&config("1.1.0", agent.socket()))
        .run()
        .await
        .success();
    let requests = agent.handler.requests();
    let Some(Request::Del(del)) = requests.last() else {
        panic!("expected a DEL, got {requests:?}");
    };
    assert_eq!(del.netns, None);
    assert!(agent.handler.attachment_keys().is_empty());
}

#[tokio::test]
async fn del_that_the_agent_reports_as_unknown_container_still_succeeds() {
    let agent = FakeAgent::start().await;
    Runtime::attachment("DEL", VANISHED_CONTAINER)
        .stdin(&config("1.1.0", agent.socket()))
        .run()
        .await
        .success();
}

#[tokio::test]
async fn del_forwards_the_cached_add_result() {
    let agent = FakeAgent::start().await;
    let result = add(&agent, "1.0.0", "c1").await;
    Runtime::attachment("DEL", "c1")
        .stdin(&with(
            config("1.0.0", agent.socket()),
            "prevResult",
            result.clone(),
        ))
        .run()
        .await
        .success();
    let requests = agent.handler.requests();
    let Some(Request::Del(del)) = requests.last() else {
        panic!("expected a DEL, got {requests:?}");
    };
    let prev = del.prev_result.as_ref().expect("prevResult forwarded");
    assert_eq!(prev.ips[0].address.to_string(), result["ips"][0]["address"]);
}

// ---------------------------------------------------------------------------------------
// CHECK

#[tokio::test]
async fn check_passes_prev_result_through_to_the_agent() {
    let agent = FakeAgent::start().await;
    // A 0.4.0 result carries `version` in `ips`; it must still parse as prevResult.
    let result = add(&agent, "0.4.0", "c1").await;
    let run = Runtime::attachment("CHECK", "c1")
        .stdin(&with(
            config("0.4.0", agent.socket()),
            "prevResult",
            result.clone(),
        ))
        .run()
        .await;
    assert_eq!(run.success(), Value::Null);
    let requests = agent.handler.requests();
    let Some(Request::Check(check)) = requests.last() else {
        panic!("expected a CHECK, got {requests:?}");
    };
    assert_eq!(check.netns, Path::new("/var/run/netns/cni-c1"));
    assert_eq!(check.prev_result.ips.len(), 2);
    assert_eq!(
        check.prev_result.ips[1].address.to_string(),
        result["ips"][1]["address"]
    );
}

#[tokio::test]
async fn check_reports_the_agents_mismatch_error() {
    let agent = FakeAgent::start().await;
    let mut result = add(&agent, "1.1.0", "c1").await;
    result["ips"][0]["address"] = json!("10.99.0.1/24");
    let (error, _) = Runtime::attachment("CHECK", "c1")
        .stdin(&with(config("1.1.0", agent.socket()), "prevResult", result))
        .run()
        .await
        .error();
    common::assert_code(&error, CHECK_MISMATCH);
}

#[tokio::test]
async fn check_is_not_allowed_before_0_4_0() {
    let agent = FakeAgent::start().await;
    let result = add(&agent, "0.3.1", "c1").await;
    let (error, json) = Runtime::attachment("CHECK", "c1")
        .stdin(&with(config("0.3.1", agent.socket()), "prevResult", result))
        .run()
        .await
        .error();
    common::assert_code(&error, code::INCOMPATIBLE_VERSION);
    assert_eq!(json["cniVersion"], "0.3.1");
    assert_eq!(
        agent.handler.requests().len(),
        1,
        "only the ADD reached the agent"
    );
}

#[tokio::test]
async fn check_without_prev_result_is_an_invalid_config() {
    let agent = FakeAgent::start().await;
    let (error, _) = Runtime::attachment("CHECK", "c1")
        .stdin(&config("1.1.0", agent.socket()))
        .run()
        .await
        .error();
    common::assert_code(&error, code::INVALID_NETWORK_CONFIG);
}

// ---------------------------------------------------------------------------------------
// VERSION

#[tokio::test]
async fn version_echoes_each_supported_version_and_lists_all() {
    for version in SUPPORTED {
        // No agent anywhere: VERSION must not need one.
        let answer = Runtime::command("VERSION")
            .stdin(&json!({"cniVersion": version}))
            .run()
            .await
            .success();
        assert_eq!(answer["cniVersion"], version);
        assert_eq!(answer["supportedVersions"], json!(SUPPORTED));
    }
}

#[tokio::test]
async fn version_probe_of_an_unsupported_version_still_reports_what_is_supported() {
    let answer = Runtime::command("VERSION")
        .stdin(&json!({"cniVersion": "0.2.0"}))
        .run()
        .await
        .success();
    assert_eq!(answer["cniVersion"], "0.2.0");
    let supported = answer["supportedVersions"].as_array().unwrap();
    assert!(!supported.contains(&json!("0.2.0")));
    assert!(supported.contains(&json!("1.1.0")));
}

#[tokio::test]
async fn version_with_empty_stdin_answers_for_the_newest_version() {
    let answer = Runtime::command("VERSION").run().await.success();
    assert_eq!(answer["cniVersion"], "1.1.0");
}

#[tokio::test]
async fn version_with_garbage_stdin_is_a_decoding_failure() {
    let (error, _) = Runtime::command("VERSION")
        .raw_stdin("{{{")
        .run()
        .await
        .error();
    common::assert_code(&error, code::DECODING_FAILURE);
}

#[tokio::test]
async fn commands_with_unsupported_versions_are_incompatible() {
    let agent = FakeAgent::start().await;
    for version in ["0.1.0", "0.2.0", "1.2.0", "2.0.0"] {
        let (error, json) = Runtime::attachment("ADD", "c1")
            .stdin(&config(version, agent.socket()))
            .run()
            .await
            .error();
        common::assert_code(&error, code::INCOMPATIBLE_VERSION);
        assert_eq!(json["cniVersion"], version);
    }
    assert!(agent.handler.requests().is_empty());
}

// ---------------------------------------------------------------------------------------
// STATUS

#[tokio::test]
async fn status_succeeds_silently_when_the_agent_is_ready() {
    let agent = FakeAgent::start().await;
    let run = Runtime::command("STATUS")
        .stdin(&config("1.1.0", agent.socket()))
        .run()
        .await;
    assert_eq!(run.success(), Value::Null);
    assert!(matches!(
        agent.handler.requests().as_slice(),
        [Request::Status(_)]
    ));
}

#[tokio::test]
async fn status_passes_the_agents_unavailability_through() {
    let agent = FakeAgent::start().await;
    *agent.handler.status_error.lock().unwrap() = Some(CniError::limited_connectivity(
        "eBPF programs are not attached",
    ));
    let (error, _) = Runtime::command("STATUS")
        .stdin(&config("1.1.0", agent.socket()))
        .run()
        .await
        .error();
    assert_eq!(
        error,
        CniError::limited_connectivity("eBPF programs are not attached")
    );
}

#[tokio::test]
async fn status_with_the_agent_down_is_plugin_not_available() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    let (error, _) = Runtime::command("STATUS")
        .stdin(&config("1.1.0", &socket))
        .run()
        .await
        .error();
    common::assert_code(&error, code::PLUGIN_NOT_AVAILABLE);
    assert!(error.msg.contains("not running on this node"), "{error}");
}

#[tokio::test]
async fn status_is_not_allowed_before_1_1_0() {
    let agent = FakeAgent::start().await;
    let (error, _) = Runtime::command("STATUS")
        .stdin(&config("1.0.0", agent.socket()))
        .run()
        .await
        .error();
    common::assert_code(&error, code::INCOMPATIBLE_VERSION);
    assert!(agent.handler.requests().is_empty());
}

// ---------------------------------------------------------------------------------------
// GC

#[tokio::test]
async fn gc_passes_the_valid_attachments_and_the_agent_releases_the_rest() {
    let agent = FakeAgent::start().await;
    for id in ["keep1", "keep2", "stale"] {
        add(&agent, "1.1.0", id).await;
    }
    let valid = json!([
        {"containerID": "keep1", "ifname": "eth0"},
        {"containerID": "keep2", "ifname": "eth0"},
    ]);
    let run = Runtime::command("GC")
        .stdin(&with(
            config("1.1.0", agent.socket()),
            "cni.dev/valid-attachments",
            valid,
        ))
        .run()
        .await;
    assert_eq!(run.success(), Value::Null);
    let requests = agent.handler.requests();
    let Some(Request::Gc(gc)) = requests.last() else {
        panic!("expected a GC, got {requests:?}");
    };
    assert_eq!(gc.valid_attachments.len(), 2);
    assert_eq!(gc.valid_attachments[0].container_id, "keep1");
    assert_eq!(
        agent.handler.attachment_keys(),
        vec![
            ("keep1".to_owned(), "eth0".to_owned()),
            ("keep2".to_owned(), "eth0".to_owned())
        ]
    );
}

#[tokio::test]
async fn gc_accepts_the_attachment_key_spelled_as_in_spec_1_1_0() {
    let agent = FakeAgent::start().await;
    add(&agent, "1.1.0", "stale").await;
    Runtime::command("GC")
        .stdin(&with(
            config("1.1.0", agent.socket()),
            "cni.dev/attachments",
            json!([]),
        ))
        .run()
        .await
        .success();
    assert!(agent.handler.attachment_keys().is_empty());
}

#[tokio::test]
async fn gc_is_not_allowed_before_1_1_0() {
    let agent = FakeAgent::start().await;
    let (error, _) = Runtime::command("GC")
        .stdin(&with(
            config("1.0.0", agent.socket()),
            "cni.dev/valid-attachments",
            json!([]),
        ))
        .run()
        .await
        .error();
    common::assert_code(&error, code::INCOMPATIBLE_VERSION);
}

// ---------------------------------------------------------------------------------------
// Invocation errors

#[tokio::test]
async fn missing_or_unknown_command_is_an_environment_error() {
    let agent = FakeAgent::start().await;
    let stdin = config("1.1.0", agent.socket());
    for runtime in [
        Runtime::command("ADD").without("CNI_COMMAND"),
        Runtime::command("FROB"),
        Runtime::attachment("ADD", "c1").env("CNI_CONTAINERID", "has spaces"),
        Runtime::attachment("ADD", "c1").env("CNI_IFNAME", "way-too-long-ifname"),
        Runtime::attachment("ADD", "c1").env("CNI_ARGS", "K8S_POD_NAME"),
        Runtime::attachment("DEL", "c1").without("CNI_IFNAME"),
    ] {
        let (error, _) = runtime.stdin(&stdin).run().await.error();
        common::assert_code(&error, code::INVALID_ENVIRONMENT_VARIABLES);
    }
    assert!(agent.handler.requests().is_empty());
}

#[tokio::test]
async fn undecodable_config_is_a_decoding_failure() {
    for stdin in ["", "not json", "[]", r#"{"cniVersion": "one"}"#] {
        let (error, _) = Runtime::attachment("ADD", "c1")
            .raw_stdin(stdin)
            .run()
            .await
            .error();
        common::assert_code(&error, code::DECODING_FAILURE);
    }
}

#[tokio::test]
async fn invalid_configs_are_code_7() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    let base = config("1.1.0", &socket);
    let mut no_name = base.clone();
    no_name.as_object_mut().unwrap().remove("name");
    let mut no_type = base.clone();
    no_type.as_object_mut().unwrap().remove("type");
    for stdin in [
        no_name,
        no_type,
        with(base.clone(), "agentSocket", json!("run/weir.sock")),
        with(base.clone(), "logLevel", json!("chatty")),
        with(base.clone(), "name", json!("no spaces allowed")),
    ] {
        let (error, _) = Runtime::attachment("ADD", "c1")
            .stdin(&stdin)
            .run()
            .await
            .error();
        common::assert_code(&error, code::INVALID_NETWORK_CONFIG);
    }
}

#[tokio::test]
async fn agent_not_running_is_try_again_later_and_names_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    for command in ["ADD", "DEL", "CHECK"] {
        let stdin = with(
            config("1.1.0", &socket),
            "prevResult",
            json!({"ips": [{"address": "10.244.1.2/24"}]}),
        );
        let (error, _) = Runtime::attachment(command, "c1")
            .stdin(&stdin)
            .run()
            .await
            .error();
        common::assert_code(&error, code::TRY_AGAIN_LATER);
        assert!(
            error.msg.contains("weir agent is not running on this node"),
            "{error}"
        );
        assert!(error.msg.contains(&socket.display().to_string()), "{error}");
    }
}

#[tokio::test]
async fn stale_socket_of_a_dead_agent_is_try_again_later() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let (error, _) = Runtime::attachment("ADD", "c1")
        .stdin(&config("1.1.0", &socket))
        .run()
        .await
        .error();
    common::assert_code(&error, code::TRY_AGAIN_LATER);
}

#[tokio::test]
async fn handler_panic_is_an_internal_error_and_the_agent_keeps_serving() {
    let agent = FakeAgent::start().await;
    let (error, _) = Runtime::attachment("ADD", PANICKING_CONTAINER)
        .stdin(&config("1.1.0", agent.socket()))
        .run()
        .await
        .error();
    common::assert_code(&error, code::INTERNAL);
    assert!(error.details.contains("veth setup exploded"), "{error:?}");
    add(&agent, "1.1.0", "after-panic").await;
}

// ---------------------------------------------------------------------------------------
// Logging

#[tokio::test]
async fn stderr_stays_empty_without_log_level() {
    let agent = FakeAgent::start().await;
    let run = Runtime::attachment("ADD", "c1")
        .stdin(&config("1.1.0", agent.socket()))
        .run()
        .await;
    run.success();
    assert_eq!(run.stderr, "");
}

#[tokio::test]
async fn debug_log_level_logs_the_exchange_on_stderr_only() {
    let agent = FakeAgent::start().await;
    let run = Runtime::attachment("ADD", "c1")
        .stdin(&with(
            config("1.1.0", agent.socket()),
            "logLevel",
            json!("debug"),
        ))
        .run()
        .await;
    let result = run.success();
    assert_eq!(
        result["cniVersion"], "1.1.0",
        "stdout holds only the result"
    );
    assert!(
        run.stderr.contains("info: ADD container=c1"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("debug: request to"), "{}", run.stderr);
}
