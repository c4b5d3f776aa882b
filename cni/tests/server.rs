//! `weir_cni::server::serve` against misbehaving clients, driven through raw sockets and
//! the library's own client.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{FakeAgent, SLOW_ADD, SLOW_CONTAINER};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use weir_cni::client::{AgentClient, CallError, Timeouts};
use weir_cni::protocol::{
    AddRequest, MAX_FRAME_BYTES, PROTOCOL_VERSION, Reply, Request, ResponseFrame, StatusRequest,
};
use weir_cni::spec::{CniArgs, CniError, Command, NetworkConfig, PluginInput, code};

fn network_config(agent: &FakeAgent) -> NetworkConfig {
    let stdin = serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "weir",
        "type": "weir-cni",
        "agentSocket": agent.socket(),
    });
    PluginInput::parse(stdin.to_string().as_bytes())
        .unwrap()
        .config
}

fn add_request(agent: &FakeAgent, container_id: &str) -> Request {
    Request::Add(AddRequest {
        container_id: container_id.into(),
        ifname: "eth0".into(),
        netns: format!("/var/run/netns/{container_id}").into(),
        args: CniArgs::default(),
        config: network_config(agent),
        prev_result: None,
        port_mappings: vec![],
    })
}

/// Sends raw bytes, half-closes, and decodes the single answer line.
async fn raw_exchange(agent: &FakeAgent, bytes: &[u8]) -> ResponseFrame {
    let mut stream = UnixStream::connect(agent.socket()).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("server answered in time")
        .unwrap();
    assert_eq!(answer.last(), Some(&b'\n'), "answer is newline-terminated");
    assert_eq!(answer.iter().filter(|b| **b == b'\n').count(), 1);
    serde_json::from_slice(&answer).unwrap()
}

/// Runs a blocking client call off the async runtime.
async fn call(
    client: AgentClient,
    request: Request,
) -> Result<Option<weir_cni::spec::CniResult>, CallError> {
    tokio::task::spawn_blocking(move || client.call(&request))
        .await
        .unwrap()
}

fn error_of(frame: &ResponseFrame) -> &CniError {
    match &frame.reply {
        Reply::Error(error) => error,
        Reply::Success { .. } => panic!("expected an error, got {frame:?}"),
    }
}

#[tokio::test]
async fn malformed_request_is_answered_with_a_decoding_error_and_serving_continues() {
    let agent = FakeAgent::start().await;
    for garbage in [
        &b"this is not json\n"[..],
        b"{\"protocolVersion\":1,\"request\":{\"command\":\"ADD\"}}\n",
        b"{\"protocolVersion\":1,\"request\":{\"command\":\"LAUNCH\"}}\n",
        b"\n",
    ] {
        let frame = raw_exchange(&agent, garbage).await;
        assert_eq!(frame.protocol_version, PROTOCOL_VERSION);
        common::assert_code(error_of(&frame), code::DECODING_FAILURE);
    }
    let client = AgentClient::new(agent.socket());
    let result = call(client, add_request(&agent, "c1")).await.unwrap();
    assert!(result.is_some());
    assert_eq!(
        agent.handler.requests().len(),
        1,
        "garbage never reached the handler"
    );
}

#[tokio::test]
async fn request_without_trailing_newline_is_accepted_at_eof() {
    let agent = FakeAgent::start().await;
    let frame = serde_json::json!({
        "protocolVersion": PROTOCOL_VERSION,
        "request": {"command": "STATUS", "config": network_config(&agent)},
    });
    let answer = raw_exchange(&agent, frame.to_string().as_bytes()).await;
    assert_eq!(answer.reply, Reply::Success { result: None });
}

#[tokio::test]
async fn request_of_another_protocol_version_is_try_again_later() {
    let agent = FakeAgent::start().await;
    let frame = raw_exchange(&agent, b"{\"protocolVersion\":7,\"request\":{}}\n").await;
    common::assert_code(error_of(&frame), code::TRY_AGAIN_LATER);
}

#[tokio::test]
async fn oversized_request_is_refused() {
    let agent = FakeAgent::start().await;
    let mut huge = vec![b' '; MAX_FRAME_BYTES + 10];
    huge.push(b'\n');
    let mut stream = UnixStream::connect(agent.socket()).await.unwrap();
    // The server stops reading at the limit, so the write may fail midway: that is fine.
    let _partial = stream.write_all(&huge).await;
    let mut answer = Vec::new();
    let _read =
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let frame: ResponseFrame = serde_json::from_slice(&answer).unwrap();
    common::assert_code(error_of(&frame), code::DECODING_FAILURE);
}

#[tokio::test]
async fn a_silent_client_does_not_block_others() {
    let agent = FakeAgent::start().await;
    // Connects and never sends anything.
    let _silent = UnixStream::connect(agent.socket()).await.unwrap();
    let _half_sent = {
        let mut stream = UnixStream::connect(agent.socket()).await.unwrap();
        stream.write_all(b"{\"protocolVersion\":1,").await.unwrap();
        stream
    };
    let started = Instant::now();
    let client = AgentClient::new(agent.socket());
    let request = Request::Status(StatusRequest {
        config: network_config(&agent),
    });
    call(client, request).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_slow_add_does_not_delay_other_requests() {
    let agent = FakeAgent::start().await;
    let slow = tokio::spawn(call(
        AgentClient::new(agent.socket()),
        add_request(&agent, SLOW_CONTAINER),
    ));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    call(
        AgentClient::new(agent.socket()),
        add_request(&agent, "fast"),
    )
    .await
    .unwrap();
    assert!(started.elapsed() < SLOW_ADD, "{:?}", started.elapsed());
    slow.await.unwrap().unwrap();
    assert_eq!(
        agent.handler.attachment_keys(),
        vec![
            ("fast".to_owned(), "eth0".to_owned()),
            (SLOW_CONTAINER.to_owned(), "eth0".to_owned())
        ]
    );
}

#[tokio::test]
async fn a_client_that_gives_up_does_not_cancel_the_handler() {
    let agent = FakeAgent::start().await;
    let impatient = AgentClient::new(agent.socket()).with_timeouts(Timeouts {
        connect: Duration::from_secs(1),
        write: Duration::from_secs(1),
        read: Duration::from_millis(200),
    });
    let error = call(impatient, add_request(&agent, SLOW_CONTAINER))
        .await
        .unwrap_err();
    assert!(matches!(error, CallError::NoAnswer { .. }), "{error:?}");
    assert_eq!(
        error.into_cni_error(Command::Add).code,
        code::TRY_AGAIN_LATER
    );
    tokio::time::sleep(SLOW_ADD + Duration::from_millis(500)).await;
    assert_eq!(agent.handler.completed_adds.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn handler_panic_is_answered_with_code_999() {
    let agent = FakeAgent::start().await;
    let error = call(
        AgentClient::new(agent.socket()),
        add_request(&agent, common::PANICKING_CONTAINER),
    )
    .await
    .unwrap_err();
    let CallError::Agent(error) = error else {
        panic!("expected the agent's error, got {error:?}");
    };
    common::assert_code(&error, code::INTERNAL);
    assert!(error.details.contains("panic"), "{error:?}");
}

#[tokio::test]
async fn bind_creates_the_directory_and_replaces_a_stale_socket() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/weir/cni.sock");
    let first = weir_cni::server::bind(&socket).unwrap();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // A live listener must not be stolen.
    let error = weir_cni::server::bind(&socket).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);

    // Once its owner is gone, the socket file is stale and gets replaced.
    drop(first);
    let _second = weir_cni::server::bind(&socket).unwrap();
}

#[tokio::test]
async fn bind_refuses_to_replace_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cni.sock");
    std::fs::write(&path, b"not a socket").unwrap();
    let error = weir_cni::server::bind(&path).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::AlreadyExists);
    assert!(path.is_file());
}
