//! The plugin against random and mutated input, the way a confused or hostile runtime could
//! call it: configurations with every key of any type, broken JSON, odd environments and
//! `CNI_ARGS`. It never panics, answers every failure with a CNI error of a documented code
//! as JSON on stdout, and what reaches the agent is decoded by the agent's side as well.
//! Valid configurations carrying anything in `runtimeConfig`, `args` and unknown keys
//! (huge numbers, unicode, deep nesting) still parse and pass those on unchanged; mutated
//! ones (keys removed, values of the wrong type, nesting beyond the parser's limit) are
//! refused with a CNI error (`code` and `msg`) unless what the plugin reads is still sound.
//!
//! Failing inputs are kept by proptest under `tests/fuzz_input.proptest-regressions` and
//! replayed first on every run; `PROPTEST_CASES` raises the number of cases.

mod common;

use std::collections::BTreeMap;

use common::FakeAgent;
use proptest::{
    prelude::*,
    test_runner::{Config, FileFailurePersistence, TestRunner},
};
use serde_json::{Map, Value};
use weir_cni::{
    plugin,
    protocol::RequestFrame,
    spec::{CniArgs, CniError, PluginInput, code},
};

/// Codes a failing plugin may answer with (CNI's well-known ones and weir's documented
/// ones); anything else means an error path nobody designed.
const CODES: [u32; 12] = [
    code::INCOMPATIBLE_VERSION,
    code::UNSUPPORTED_FIELD,
    code::UNKNOWN_CONTAINER,
    code::INVALID_ENVIRONMENT_VARIABLES,
    code::IO_FAILURE,
    code::DECODING_FAILURE,
    code::INVALID_NETWORK_CONFIG,
    code::INVALID_NETNS,
    code::TRY_AGAIN_LATER,
    code::PLUGIN_NOT_AVAILABLE,
    code::LIMITED_CONNECTIVITY,
    code::INTERNAL,
];

fn runner(default_cases: u32) -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default_cases);
    TestRunner::new(Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        source_file: Some(file!()),
        ..Config::default()
    })
}

/// Any JSON value, shallow.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
        Just(Value::String("1.0.0".into())),
        Just(Value::String("10.244.0.5/24".into())),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-zA-Z]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A value for one of the keys the plugin reads: mostly plausible, sometimes anything.
fn value_for(key: &'static str) -> BoxedStrategy<Value> {
    let plausible: BoxedStrategy<Value> = match key {
        "cniVersion" => prop_oneof![
            Just("0.3.0"),
            Just("0.3.1"),
            Just("0.4.0"),
            Just("1.0.0"),
            Just("1.1.0"),
            Just("2.0.0"),
            Just("1.0"),
            Just(""),
        ]
        .prop_map(|v| Value::String(v.into()))
        .boxed(),
        "name" => prop_oneof![4 => "[a-z0-9][a-z0-9._-]{0,9}", 1 => ".{0,6}"]
            .prop_map(Value::String)
            .boxed(),
        "type" => prop_oneof![4 => Just("weir".to_owned()), 1 => ".{0,8}"]
            .prop_map(Value::String)
            .boxed(),
        "logLevel" => prop_oneof![
            Just("debug"),
            Just("info"),
            Just("error"),
            Just("verbose"),
            Just("")
        ]
        .prop_map(|v| Value::String(v.into()))
        .boxed(),
        "prevResult" => prev_result().boxed(),
        "cni.dev/valid-attachments" => proptest::collection::vec(
            ("[a-f0-9]{1,8}", "eth0|net1")
                .prop_map(|(id, ifname)| serde_json::json!({"containerID": id, "ifname": ifname})),
            0..3,
        )
        .prop_map(Value::Array)
        .boxed(),
        // runtimeConfig, args: objects.
        _ => proptest::collection::btree_map("[a-zA-Z]{1,8}", json(), 0..3)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
            .boxed(),
    };
    prop_oneof![9 => plausible, 1 => json()].boxed()
}

/// A `prevResult`-shaped object with fields of right and wrong types.
fn prev_result() -> impl Strategy<Value = Value> {
    (
        proptest::option::of(value_for_leaf("cniVersion")),
        proptest::collection::vec(
            (
                prop_oneof![Just("10.244.0.5/24"), Just("fe80::1/64"), Just("nonsense")],
                proptest::option::of(any::<i64>()),
            ),
            0..3,
        ),
        proptest::option::of(json()),
    )
        .prop_map(|(version, ips, interfaces)| {
            let mut m = Map::new();
            if let Some(v) = version {
                m.insert("cniVersion".into(), v);
            }
            let ips: Vec<Value> = ips
                .into_iter()
                .map(|(address, interface)| {
                    let mut ip = Map::new();
                    ip.insert("address".into(), Value::String(address.into()));
                    if let Some(i) = interface {
                        ip.insert("interface".into(), Value::from(i));
                    }
                    Value::Object(ip)
                })
                .collect();
            m.insert("ips".into(), Value::Array(ips));
            if let Some(i) = interfaces {
                m.insert("interfaces".into(), i);
            }
            Value::Object(m)
        })
}

fn value_for_leaf(_key: &'static str) -> impl Strategy<Value = Value> {
    prop_oneof![Just("1.0.0"), Just("0.4.0"), Just("x")].prop_map(|v| Value::String(v.into()))
}

/// A network configuration: each key the plugin reads present or not, plus unknown keys.
/// `agentSocket` always names `socket` (or is of a wrong type): nothing may reach another
/// agent than the test's.
fn config(socket: String) -> impl Strategy<Value = Map<String, Value>> {
    const KEYS: [&str; 8] = [
        "cniVersion",
        "name",
        "type",
        "logLevel",
        "runtimeConfig",
        "args",
        "prevResult",
        "cni.dev/valid-attachments",
    ];
    // The keys every configuration needs are there most of the time, the others less.
    let keys: Vec<_> = KEYS
        .iter()
        .enumerate()
        .map(|(i, k)| proptest::option::weighted(if i < 3 { 0.95 } else { 0.3 }, value_for(k)))
        .collect();
    (
        keys,
        proptest::collection::btree_map("[a-zA-Z]{1,10}", json(), 0..3),
        prop_oneof![
            9 => Just(Value::String(socket)),
            1 => prop_oneof![Just(Value::from(7)), Just(Value::String("relative.sock".into()))],
        ],
    )
        .prop_map(|(values, extra, socket)| {
            let mut m: Map<String, Value> = extra.into_iter().collect();
            for (k, v) in KEYS.iter().zip(values) {
                if let Some(v) = v {
                    m.insert((*k).into(), v);
                }
            }
            m.insert("agentSocket".into(), socket);
            m
        })
}

/// The runtime's environment: each variable set to something plausible, anything, or unset.
fn environment() -> impl Strategy<Value = BTreeMap<&'static str, String>> {
    let command = prop_oneof![
        Just("ADD"),
        Just("DEL"),
        Just("CHECK"),
        Just("VERSION"),
        Just("STATUS"),
        Just("GC"),
        Just("add"),
        Just(""),
    ]
    .prop_map(str::to_owned);
    (
        proptest::option::weighted(0.98, command),
        proptest::option::weighted(0.97, prop_oneof![9 => "[a-f0-9]{1,16}", 1 => ".{0,8}"]),
        proptest::option::weighted(
            0.97,
            prop_oneof![9 => "/proc/1/ns/nonexistent-[a-z]{3}", 1 => ".{0,8}"],
        ),
        proptest::option::weighted(0.97, prop_oneof![9 => "eth0", 1 => ".{0,16}"]),
        proptest::option::weighted(
            0.7,
            prop_oneof![
                4 => "K8S_POD_NAMESPACE=[a-z]{1,5};K8S_POD_NAME=[a-z]{1,5};IgnoreUnknown=1",
                1 => ".{0,24}",
            ],
        ),
    )
        .prop_map(|(command, id, netns, ifname, args)| {
            let mut env = BTreeMap::new();
            env.insert("CNI_PATH", "/opt/cni/bin".to_owned());
            for (k, v) in [
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", id),
                ("CNI_NETNS", netns),
                ("CNI_IFNAME", ifname),
                ("CNI_ARGS", args),
            ] {
                if let Some(v) = v {
                    env.insert(k, v);
                }
            }
            env
        })
}

/// One edit to the configuration's text: broken JSON, cut input.
fn mutated_text(text: String) -> impl Strategy<Value = Vec<u8>> {
    let n = text.len();
    (
        proptest::option::weighted(0.5, (0..=n, any::<u8>())),
        proptest::option::weighted(0.3, 0..=n),
    )
        .prop_map(move |(flip, cut)| {
            let mut bytes = text.clone().into_bytes();
            if let Some((at, x)) = flip
                && at < bytes.len()
            {
                bytes[at] ^= x | 1;
            }
            if let Some(at) = cut {
                bytes.truncate(at);
            }
            bytes
        })
}

#[test]
fn configurations_and_environments_never_panic_and_fail_with_a_cni_error() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let agent = rt.block_on(FakeAgent::start());
    let socket = agent.socket().to_str().unwrap().to_owned();
    let input =
        (config(socket).prop_map(Value::Object), environment()).prop_flat_map(|(config, env)| {
            let text = config.to_string();
            (
                prop_oneof![3 => Just(text.clone().into_bytes()), 1 => mutated_text(text)],
                Just(env),
            )
        });
    let (successes, failures) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    runner(768)
        .run(&input, |(stdin, env)| {
            let outcome = plugin::run(|k| env.get(k).cloned(), stdin.as_slice(), std::io::sink());
            match outcome.exit_code {
                0 => {
                    successes.set(successes.get() + 1);
                    if !outcome.stdout.is_empty() {
                        let v: Result<Value, _> = serde_json::from_str(&outcome.stdout);
                        prop_assert!(
                            v.is_ok(),
                            "success with non-JSON stdout: {}",
                            outcome.stdout
                        );
                    }
                }
                1 => {
                    failures.set(failures.get() + 1);
                    let v: Value = serde_json::from_str(&outcome.stdout).map_err(|e| {
                        TestCaseError::fail(format!("error is not JSON ({e}): {}", outcome.stdout))
                    })?;
                    let code = v.get("code").and_then(Value::as_u64);
                    prop_assert!(
                        code.is_some_and(|c| CODES.contains(&(c as u32))),
                        "undocumented error code: {v}"
                    );
                    prop_assert!(
                        v.get("msg").and_then(Value::as_str).is_some(),
                        "no msg: {v}"
                    );
                }
                other => prop_assert!(false, "exit code {other}"),
            }
            Ok(())
        })
        .unwrap();
    // Not vacuous: both outcomes were reached, and requests made it to the agent.
    let (successes, failures) = (successes.get(), failures.get());
    assert!(
        successes > 0 && failures > 0,
        "{successes} successes, {failures} failures"
    );
    assert!(
        !agent.handler.requests().is_empty(),
        "no request reached the agent"
    );
}

#[test]
fn the_configuration_parser_never_panics_on_any_bytes() {
    let bytes = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        config("/run/test.sock".into())
            .prop_flat_map(|c| mutated_text(Value::Object(c).to_string())),
    ];
    runner(2048)
        .run(&bytes, |bytes| {
            let _ = PluginInput::parse(&bytes);
            Ok(())
        })
        .unwrap();
}

#[test]
fn cni_args_and_agent_frames_never_panic() {
    runner(2048)
        .run(&".{0,40}", |raw| {
            let _ = CniArgs::parse(&raw);
            Ok(())
        })
        .unwrap();
    // What the agent reads from its socket: anything a local process writes there.
    let frames = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        json().prop_map(|v| v.to_string().into_bytes()),
        (json(), any::<bool>()).prop_map(|(v, right_version)| {
            let mut m = Map::new();
            m.insert(
                "protocolVersion".into(),
                if right_version {
                    Value::from(weir_cni::protocol::PROTOCOL_VERSION)
                } else {
                    Value::from(99)
                },
            );
            m.insert("request".into(), v);
            Value::Object(m).to_string().into_bytes()
        }),
    ];
    runner(2048)
        .run(&frames, |frame| {
            if let Err(error) = RequestFrame::decode(&frame) {
                prop_assert!(
                    error.code == code::DECODING_FAILURE || error.code == code::TRY_AGAIN_LATER,
                    "undocumented error code {}",
                    error.code
                );
            }
            Ok(())
        })
        .unwrap();
}

/// Values the runtime could put anywhere: wrong types, huge and negative numbers, unicode,
/// nesting deeper than any configuration needs (but within the JSON parser's limit).
fn hostile() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => proptest::sample::select(vec![
            Value::Null,
            Value::Bool(true),
            Value::from(-1),
            Value::from(0),
            Value::from(u64::MAX),
            Value::from(i64::MIN),
            Value::from(1e308),
            Value::from(-0.0),
            Value::String(String::new()),
            Value::String("ünïcødé-💥\u{202e}\u{0}".into()),
            Value::String("../../etc/passwd".into()),
            Value::String("a".repeat(4096)),
            Value::Array(vec![]),
            Value::Object(Map::new()),
        ]),
        2 => ".{0,16}".prop_map(Value::String),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<f64>().prop_map(Value::from),
        1 => (1usize..100).prop_map(nested),
        2 => json(),
    ]
}

/// `depth` arrays and objects inside each other.
fn nested(depth: usize) -> Value {
    (0..depth).fold(Value::from("core"), |v, i| {
        if i % 2 == 0 {
            Value::Array(vec![v])
        } else {
            let mut m = Map::new();
            m.insert("n".into(), v);
            Value::Object(m)
        }
    })
}

/// Capability arguments as runtimes pass them (`portMappings`, `bandwidth`, `ips`, `mac`,
/// `dns`, ...), with hostile values mixed in.
fn runtime_config() -> impl Strategy<Value = Map<String, Value>> {
    let capability = prop_oneof![
        Just("portMappings"),
        Just("bandwidth"),
        Just("ips"),
        Just("mac"),
        Just("dns"),
        Just("aliases"),
        Just("cgroupPath"),
        Just("ünïcødé"),
    ]
    .prop_map(str::to_owned);
    let value = prop_oneof![
        (any::<u64>(), any::<i64>(), ".{0,6}").prop_map(|(host, container, proto)| {
            serde_json::json!([{"hostPort": host, "containerPort": container, "protocol": proto}])
        }),
        (any::<u64>(), any::<u64>()).prop_map(
            |(rate, burst)| serde_json::json!({"ingressRate": rate, "ingressBurst": burst})
        ),
        hostile(),
    ];
    proptest::collection::btree_map(capability, value, 0..4).prop_map(|m| m.into_iter().collect())
}

/// A configuration the plugin must accept: every key it reads well formed, everything else
/// (`runtimeConfig`, `args`, unknown keys) anything.
fn valid_config(socket: String) -> impl Strategy<Value = Map<String, Value>> {
    (
        proptest::sample::select(vec!["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]),
        "[a-zA-Z0-9][a-zA-Z0-9_.-]{0,20}",
        prop_oneof![Just("weir".to_owned()), "[a-z][a-z0-9-]{0,8}"],
        proptest::option::of(proptest::sample::select(vec![
            "debug", "info", "warn", "error", "",
        ])),
        proptest::option::of(runtime_config()),
        proptest::option::of(
            proptest::collection::btree_map(".{1,8}", hostile(), 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ),
        proptest::option::of(prev_result_valid()),
        proptest::collection::btree_map("[a-zA-Z][a-zA-Z0-9]{0,8}|.{1,6}", hostile(), 0..4),
    )
        .prop_map(
            move |(version, name, plugin_type, level, runtime, args, prev, extra)| {
                let mut m: Map<String, Value> = extra
                    .into_iter()
                    .filter(|(k, _)| !MODELLED_KEYS.contains(&k.as_str()))
                    .collect();
                m.insert("cniVersion".into(), Value::from(version));
                m.insert("name".into(), Value::from(name));
                m.insert("type".into(), Value::from(plugin_type));
                m.insert("agentSocket".into(), Value::from(socket.clone()));
                if let Some(level) = level {
                    m.insert("logLevel".into(), Value::from(level));
                }
                if let Some(r) = runtime {
                    m.insert("runtimeConfig".into(), Value::Object(r));
                }
                if let Some(a) = args {
                    m.insert("args".into(), a);
                }
                if let Some(p) = prev {
                    m.insert("prevResult".into(), p);
                }
                m
            },
        )
}

/// Keys the parser reads itself; an unknown key must not collide with them.
const MODELLED_KEYS: [&str; 10] = [
    "cniVersion",
    "name",
    "type",
    "agentSocket",
    "logLevel",
    "runtimeConfig",
    "args",
    "prevResult",
    "cni.dev/valid-attachments",
    "cni.dev/attachments",
];

/// A `prevResult` that decodes.
fn prev_result_valid() -> impl Strategy<Value = Value> {
    (
        proptest::collection::vec(
            (any::<[u8; 4]>(), 0u8..=32, proptest::option::of(0usize..4)),
            0..3,
        ),
        proptest::collection::vec(("[a-z0-9]{1,15}", proptest::option::of(any::<u32>())), 0..3),
    )
        .prop_map(|(ips, interfaces)| {
            let ips: Vec<Value> = ips
                .into_iter()
                .map(|(a, len, interface)| {
                    let address = format!("{}.{}.{}.{}/{len}", a[0], a[1], a[2], a[3]);
                    match interface {
                        Some(i) => serde_json::json!({"address": address, "interface": i}),
                        None => serde_json::json!({"address": address}),
                    }
                })
                .collect();
            let interfaces: Vec<Value> = interfaces
                .into_iter()
                .map(|(name, mtu)| match mtu {
                    Some(mtu) => serde_json::json!({"name": name, "mtu": mtu}),
                    None => serde_json::json!({"name": name}),
                })
                .collect();
            serde_json::json!({"cniVersion": "1.0.0", "ips": ips, "interfaces": interfaces})
        })
}

#[test]
fn valid_configurations_with_hostile_extras_still_parse() {
    runner(1024)
        .run(&valid_config("/run/test.sock".into()), |config| {
            let bytes = Value::Object(config).to_string().into_bytes();
            // What the JSON says (floats need not survive a round trip through text).
            let config: Map<String, Value> = serde_json::from_slice(&bytes).unwrap();
            let input = PluginInput::parse(&bytes)
                .map_err(|e| TestCaseError::fail(format!("valid configuration refused: {e}")))?;
            // What the plugin passes on is what the runtime wrote.
            prop_assert_eq!(
                Some(&Value::from(input.config.name.clone())),
                config.get("name")
            );
            prop_assert_eq!(
                Some(&Value::from(input.config.cni_version.as_str())),
                config.get("cniVersion")
            );
            let runtime = config
                .get("runtimeConfig")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            prop_assert_eq!(&input.config.runtime_config, &runtime);
            prop_assert_eq!(input.config.args.as_ref(), config.get("args"));
            prop_assert_eq!(
                input.prev_result.is_some(),
                config.contains_key("prevResult")
            );
            for (k, v) in &config {
                if !MODELLED_KEYS.contains(&k.as_str()) {
                    prop_assert_eq!(input.config.extra.get(k), Some(v), "unknown key {:?}", k);
                }
            }
            Ok(())
        })
        .unwrap();
}

/// One change to a valid configuration.
#[derive(Clone, Debug)]
enum Edit {
    /// A key the parser reads removed.
    Remove(&'static str),
    /// A key the parser reads given a hostile value.
    Replace(&'static str, Value),
    /// The whole configuration wrapped `depth` levels deep in arrays and objects.
    Nest(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let key = proptest::sample::select(MODELLED_KEYS.to_vec());
    prop_oneof![
        key.clone().prop_map(Edit::Remove),
        (key, hostile()).prop_map(|(k, v)| Edit::Replace(k, v)),
        prop_oneof![1usize..8, 120usize..200, Just(100_000usize)].prop_map(Edit::Nest),
    ]
}

#[test]
fn mutated_configurations_are_refused_with_a_cni_error_or_parse() {
    let (accepted, refused) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    let input = (
        valid_config("/run/test.sock".into()),
        proptest::collection::vec(edit(), 1..4),
    );
    runner(1024)
        .run(&input, |(mut config, edits)| {
            let mut wrapper = None;
            for e in &edits {
                match e {
                    Edit::Remove(k) => {
                        config.remove(*k);
                    }
                    Edit::Replace(k, v) => {
                        config.insert((*k).to_owned(), v.clone());
                    }
                    Edit::Nest(depth) => wrapper = Some(*depth),
                }
            }
            let text = Value::Object(config.clone()).to_string();
            // Deep nesting is written as text: a value that deep would overflow the stack
            // of the test itself when built and dropped.
            let text = match wrapper {
                Some(depth) => format!("{}{text}{}", "[".repeat(depth), "]".repeat(depth)),
                None => text,
            };
            match PluginInput::parse(text.as_bytes()) {
                Ok(input) => {
                    accepted.set(accepted.get() + 1);
                    // Accepted only with every key the parser needs, of the right type.
                    prop_assert!(wrapper.is_none(), "a nested array accepted");
                    for key in ["cniVersion", "name", "type"] {
                        prop_assert!(
                            config.get(key).is_some_and(Value::is_string),
                            "accepted without a string {:?}",
                            key
                        );
                    }
                    prop_assert!(input.config.agent_socket.is_absolute());
                }
                Err(error) => {
                    refused.set(refused.get() + 1);
                    let error = CniError::from(error);
                    prop_assert!(CODES.contains(&error.code), "undocumented code: {}", error);
                    prop_assert!(!error.msg.is_empty(), "no message: {}", error);
                    // The shape the runtime reads (SPEC.md section 5 "Error").
                    let shown = error.to_json("1.1.0");
                    prop_assert_eq!(shown["code"].as_u64(), Some(u64::from(error.code)));
                    prop_assert!(shown["msg"].as_str().is_some_and(|m| !m.is_empty()));
                }
            }
            Ok(())
        })
        .unwrap();
    let (accepted, refused) = (accepted.get(), refused.get());
    assert!(
        accepted > 0 && refused > 0,
        "{accepted} accepted, {refused} refused"
    );
}

#[test]
fn cni_args_are_parsed_or_refused_with_code_4() {
    let pair = prop_oneof![
        ("K8S_POD_NAMESPACE|K8S_POD_NAME|K8S_POD_UID|K8S_POD_INFRA_CONTAINER_ID|IgnoreUnknown|[A-Za-z_]{1,8}", "[^;]{0,12}")
            .prop_map(|(k, v)| format!("{k}={v}")),
        "[^;]{0,12}",
    ];
    let raw = proptest::collection::vec(pair, 0..6).prop_map(|items| items.join(";"));
    runner(2048)
        .run(&raw, |raw| {
            match CniArgs::parse(&raw) {
                Ok(args) => {
                    // Every item was KEY=VALUE with a key, and the named keys are read.
                    for item in raw.split(';').filter(|i| !i.is_empty()) {
                        let (key, value) = item.split_once('=').unwrap();
                        prop_assert!(!key.is_empty());
                        let read = match key {
                            "K8S_POD_NAMESPACE" => args.k8s_pod_namespace.as_deref(),
                            "K8S_POD_NAME" => args.k8s_pod_name.as_deref(),
                            "K8S_POD_UID" => args.k8s_pod_uid.as_deref(),
                            "K8S_POD_INFRA_CONTAINER_ID" => {
                                args.k8s_pod_infra_container_id.as_deref()
                            }
                            other => args.other.get(other).map(String::as_str),
                        };
                        // The last occurrence of a key wins.
                        let last = raw
                            .split(';')
                            .filter_map(|i| i.split_once('='))
                            .rfind(|(k, _)| *k == key)
                            .map(|(_, v)| v);
                        prop_assert_eq!(read, last, "{}={}", key, value);
                    }
                }
                Err(error) => {
                    let error = CniError::from(error);
                    prop_assert_eq!(error.code, code::INVALID_ENVIRONMENT_VARIABLES);
                    prop_assert!(error.msg.contains("CNI_ARGS"), "{}", error);
                }
            }
            Ok(())
        })
        .unwrap();
}
