//! Serving agents only while leading, and steering the Service to the leader.
//!
//! # How agents reach the leader
//!
//! Agents dial one Service. Its selector includes the label [`LEADER_LABEL`]`: "true"`, which
//! only the leader's pod carries:
//!
//! * on becoming leader, a replica starts listening, labels its own pod and removes the label
//!   from any other pod of its namespace that still has it (a predecessor that lost the lease
//!   while cut off from the API server could not remove its own), retrying with backoff for
//!   as long as its term lasts if the API server refuses;
//! * on losing the lease (or shutting down), it stops listening at once — open `Watch`
//!   streams end with `UNAVAILABLE`, and new connections are refused — then removes its
//!   label (best effort; the next leader removes it anyway).
//!
//! Agents reconnect with backoff and land on the new leader as soon as the Endpoints follow
//! the labels. Readiness does not reflect leadership, so followers are Ready and rolling
//! updates of the Deployment proceed normally.
//!
//! Without a pod name (running outside the cluster) no label is managed.

use std::{net::SocketAddr, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams},
};
use tokio::net::TcpListener;
use tracing::{info, warn};
use weir_transport::{NodeStateServer, ServerTls};

use crate::leader::Leadership;

/// The label of the leader's pod, which the agents' Service selects.
pub const LEADER_LABEL: &str = "weir.dev/controller-leader";

/// Puts [`LEADER_LABEL`] on this replica's pod (and only there).
#[derive(Clone)]
pub struct LeaderPodLabel {
    pods: Api<Pod>,
    pod: String,
}

impl std::fmt::Debug for LeaderPodLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderPodLabel")
            .field("pod", &self.pod)
            .finish_non_exhaustive()
    }
}

fn label_patch(value: Option<&str>) -> Patch<serde_json::Value> {
    Patch::Merge(serde_json::json!({"metadata": {"labels": {LEADER_LABEL: value}}}))
}

impl LeaderPodLabel {
    pub fn new(client: Client, namespace: &str, pod: impl Into<String>) -> Self {
        Self {
            pods: Api::namespaced(client, namespace),
            pod: pod.into(),
        }
    }

    /// Labels this pod and unlabels every other pod of the namespace.
    pub async fn mark(&self) -> kube::Result<()> {
        self.pods
            .patch(
                &self.pod,
                &PatchParams::default(),
                &label_patch(Some("true")),
            )
            .await?;
        let labelled = self
            .pods
            .list_metadata(&ListParams::default().labels(LEADER_LABEL))
            .await?;
        for other in labelled.items {
            let Some(name) = other.metadata.name else {
                continue;
            };
            if name != self.pod {
                info!(pod = %name, "removing the leader label of a former leader");
                self.pods
                    .patch(&name, &PatchParams::default(), &label_patch(None))
                    .await?;
            }
        }
        Ok(())
    }

    /// Removes the label from this pod.
    pub async fn unmark(&self) -> kube::Result<()> {
        self.pods
            .patch(&self.pod, &PatchParams::default(), &label_patch(None))
            .await
            .map(|_| ())
    }
}

/// What serving agents needs.
#[derive(Clone, Debug)]
pub struct AgentServing {
    pub listen: SocketAddr,
    pub server: NodeStateServer,
    pub tls: ServerTls,
    pub label: Option<LeaderPodLabel>,
}

/// Serves agents during every leadership term; returns when the elector is gone.
pub async fn serve_agents_while_leading(serving: AgentServing, mut leadership: Leadership) {
    loop {
        if !leadership.wait_for(true).await {
            return;
        }
        let listener = match TcpListener::bind(serving.listen).await {
            Ok(l) => l,
            Err(e) => {
                warn!(listen = %serving.listen, error = %e, "cannot listen for agents; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        info!(listen = %serving.listen, "leading: serving agents");
        // Agents reach this replica only once its pod carries the label: keep trying for as
        // long as the term lasts.
        let marking = serving
            .label
            .clone()
            .map(|label| tokio::spawn(mark_until_done(label, leadership.clone())));
        let mut lost = leadership.clone();
        let stop = async move {
            lost.wait_for(false).await;
        };
        if let Err(e) = serving
            .server
            .clone()
            .serve(listener, serving.tls.clone(), stop)
            .await
        {
            warn!(error = %e, "agent server failed");
        }
        info!("not leading: stopped serving agents");
        if let Some(marking) = marking {
            marking.abort();
        }
        if let Some(label) = &serving.label
            && let Err(e) = label.unmark().await
        {
            warn!(error = %e, "removing the leader label from this pod");
        }
        // A server that failed while still leading: do not spin.
        if leadership.is_leader() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Labels this pod as the leader's, retrying with backoff (200 ms doubling to 10 s) until it
/// succeeds or the term ends.
pub async fn mark_until_done(label: LeaderPodLabel, mut leadership: Leadership) {
    let mut delay = Duration::from_millis(200);
    loop {
        match label.mark().await {
            Ok(()) => return,
            Err(e) => warn!(
                error = %e,
                retry_in = ?delay,
                "labelling this pod as the leader's (agents cannot reach it until this succeeds)"
            ),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = leadership.wait_for(false) => return,
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}
