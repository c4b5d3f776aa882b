//! The agent's HTTP endpoint: `/readyz` for the DaemonSet's readiness probe, `/metrics` for
//! Prometheus, `/flows` for the most recent flow events, `/state` for the controller state the
//! agent last applied (JSON, a `weir_api::NodeState`: endpoints, rule and rule-set names,
//! classes, verdicts, Services), which `weirctl trace` reads the policy names from.
//!
//! `/flows` names pods' flows and the policies that decided them, and `/state` names pods and
//! policies, so by default they answer only the node itself (a connection from loopback or to
//! and from the same address); other clients get 403 unless the agent runs with
//! `--flows-from-anywhere`.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::{ConnectInfo, Query, State, connect_info::Connected},
    http::StatusCode,
    response::IntoResponse,
    routing::get,
};
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::{
    agent::Agent,
    observe::{FlowLog, FlowRecord, MetricsSnapshot},
};

#[derive(Clone)]
struct AppState {
    agent: Arc<Mutex<Agent>>,
    flows: Arc<FlowLog>,
    /// Readiness also requires the controller's first state.
    follows_controller: bool,
    /// `/flows` answers clients other than the node itself.
    flows_from_anywhere: bool,
}

/// Both ends of a connection to the endpoint.
#[derive(Clone, Copy, Debug)]
struct Peer {
    local: Option<SocketAddr>,
    remote: SocketAddr,
}

impl Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Self {
            local: stream.io().local_addr().ok(),
            remote: *stream.remote_addr(),
        }
    }
}

impl Peer {
    /// The connection comes from the node itself: over loopback, or from the very address it
    /// reached (no other host can hold the node's own address and complete a handshake).
    fn is_this_node(&self) -> bool {
        let remote = self.remote.ip().to_canonical();
        remote.is_loopback() || self.local.is_some_and(|l| l.ip().to_canonical() == remote)
    }
}

pub async fn serve(
    addr: SocketAddr,
    agent: Arc<Mutex<Agent>>,
    flows: Arc<FlowLog>,
    follows_controller: bool,
    flows_from_anywhere: bool,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/flows", get(flows_handler))
        .route("/state", get(state_handler))
        .with_state(AppState {
            agent,
            flows,
            follows_controller,
            flows_from_anywhere,
        });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app.into_make_service_with_connect_info::<Peer>()).await
}

/// Ready means: the dataplane is loaded, the node's pod CIDR is known (pods can be
/// attached) and, with a controller, its last state is enforced in full.
async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let agent = s.agent.lock().await;
    readiness(
        agent.ready(),
        s.follows_controller,
        agent.has_controller_state(),
        agent.apply_status().last_error.as_deref(),
    )
}

/// The answer of `/readyz`: 503 with the reason while pods cannot be attached, the
/// controller's state has not arrived, or the last state from it could not be applied.
fn readiness(
    pod_cidr_known: bool,
    follows_controller: bool,
    has_controller_state: bool,
    last_apply_error: Option<&str>,
) -> (StatusCode, String) {
    if !pod_cidr_known {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for this node's pod CIDR\n".into(),
        );
    }
    if !follows_controller {
        return (StatusCode::OK, "ready\n".into());
    }
    if let Some(e) = last_apply_error {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the controller's last state could not be applied: {e}\n"),
        );
    }
    if !has_controller_state {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the controller's state\n".into(),
        );
    }
    (StatusCode::OK, "ready\n".into())
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let snapshot = {
        let agent = s.agent.lock().await;
        let (prefilter, invalid) = agent.prefilter();
        let mut snapshot =
            MetricsSnapshot::read(agent.maps(), agent.policy(), agent.ready(), s.flows.total())
                .with_xdp(agent.maps(), agent.xdp(), &prefilter, invalid);
        snapshot.pods_started_before_policy = agent.pods_started_before_policy();
        snapshot.host_addrs_left_out = agent.host_addrs_left_out();
        snapshot.host_ports = agent.host_port_count();
        (snapshot.conntrack_entries, snapshot.conntrack_expired) = agent.conntrack_counts();
        snapshot.apply = agent.apply_status().clone();
        snapshot
    };
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        snapshot.render(),
    )
}

#[derive(Deserialize)]
struct FlowQuery {
    limit: Option<usize>,
}

async fn flows_handler(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Query(q): Query<FlowQuery>,
) -> axum::response::Response {
    if !s.flows_from_anywhere && !peer.is_this_node() {
        return (
            StatusCode::FORBIDDEN,
            "/flows answers this node only (agent flag --flows-from-anywhere opens it)\n",
        )
            .into_response();
    }
    let recent = s.flows.recent(q.limit.unwrap_or(100));
    let agent = s.agent.lock().await;
    let host_ports = agent.host_port_names();
    let records: Vec<FlowRecord> = recent
        .into_iter()
        .map(|r| r.resolve(agent.policy(), &host_ports))
        .collect();
    Json(records).into_response()
}

/// The controller state the agent last applied (empty before the first one).
async fn state_handler(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<Peer>,
) -> axum::response::Response {
    if !s.flows_from_anywhere && !peer.is_this_node() {
        return (
            StatusCode::FORBIDDEN,
            "/state answers this node only (agent flag --flows-from-anywhere opens it)\n",
        )
            .into_response();
    }
    let agent = s.agent.lock().await;
    Json(agent.policy()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(local: &str, remote: &str) -> Peer {
        Peer {
            local: Some(local.parse().unwrap()),
            remote: remote.parse().unwrap(),
        }
    }

    #[test]
    fn readiness_follows_the_last_apply() {
        use crate::agent::ApplyStatus;
        let mut status = ApplyStatus::default();
        let ready =
            |s: &ApplyStatus, has_state| readiness(true, true, has_state, s.last_error.as_deref());
        assert_eq!(ready(&status, false).0, StatusCode::SERVICE_UNAVAILABLE);
        status.record::<String>(Ok(()));
        assert_eq!(ready(&status, true).0, StatusCode::OK);
        // A later state that does not fit: not ready, and the answer says why.
        status.record(Err(&"map VERDICTS: full".to_string()));
        let (code, body) = ready(&status, true);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("map VERDICTS: full"), "{body}");
        assert_eq!(status.errors_total, 1);
        // The next one applied in full: ready again, the error count stays.
        status.record::<String>(Ok(()));
        assert_eq!(ready(&status, true).0, StatusCode::OK);
        assert_eq!(status.errors_total, 1);
        assert!(status.last_success_unix.is_some());
        // Without a controller only the pod CIDR counts.
        assert_eq!(readiness(true, false, false, None).0, StatusCode::OK);
        assert_eq!(
            readiness(false, true, true, None).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn only_the_node_itself_is_the_node() {
        assert!(peer("127.0.0.1:9962", "127.0.0.1:40000").is_this_node());
        assert!(peer("[::1]:9962", "[::1]:40000").is_this_node());
        assert!(peer("172.18.0.2:9962", "172.18.0.2:40000").is_this_node());
        assert!(peer("[::ffff:172.18.0.2]:9962", "172.18.0.2:40000").is_this_node());
        assert!(!peer("172.18.0.2:9962", "10.244.1.5:40000").is_this_node());
        assert!(!peer("172.18.0.2:9962", "172.18.0.3:40000").is_this_node());
    }
}
