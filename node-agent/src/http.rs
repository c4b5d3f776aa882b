//! The agent's HTTP endpoint: `/readyz` for the DaemonSet's readiness probe, `/metrics` for
//! Prometheus, `/flows` for the most recent flow events.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::{Query, State},
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
}

pub async fn serve(
    addr: SocketAddr,
    agent: Arc<Mutex<Agent>>,
    flows: Arc<FlowLog>,
    follows_controller: bool,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/flows", get(flows_handler))
        .with_state(AppState {
            agent,
            flows,
            follows_controller,
        });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}

/// Ready means: the dataplane is loaded, the node's pod CIDR is known (pods can be
/// attached) and, with a controller, its state is enforced.
async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let agent = s.agent.lock().await;
    if !agent.ready() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for this node's pod CIDR\n",
        );
    }
    if s.follows_controller && !agent.has_controller_state() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the controller's state\n",
        );
    }
    (StatusCode::OK, "ready\n")
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let snapshot = {
        let agent = s.agent.lock().await;
        let addresses = agent.endpoints().iter().map(|e| e.ips.len()).sum();
        let mut snapshot = MetricsSnapshot::read(
            agent.maps(),
            agent.policy(),
            addresses,
            agent.ready(),
            s.flows.total(),
        );
        snapshot.pods_started_before_policy = agent.pods_started_before_policy();
        snapshot.host_addrs_left_out = agent.host_addrs_left_out();
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
    Query(q): Query<FlowQuery>,
) -> Json<Vec<FlowRecord>> {
    let recent = s.flows.recent(q.limit.unwrap_or(100));
    let agent = s.agent.lock().await;
    Json(
        recent
            .into_iter()
            .map(|r| r.resolve(agent.policy()))
            .collect(),
    )
}
