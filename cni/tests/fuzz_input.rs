//! The plugin against random and mutated input, the way a confused or hostile runtime could
//! call it: configurations with every key of any type, broken JSON, odd environments and
//! `CNI_ARGS`. It never panics, answers every failure with a CNI error of a documented code
//! as JSON on stdout, and what reaches the agent is decoded by the agent's side as well.
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
    spec::{CniArgs, PluginInput, code},
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
