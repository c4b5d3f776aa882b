//! The controller in a Kubernetes cluster: the API server as the source of objects.
//!
//! * [`watch`]: watches of Namespaces, Pods, Nodes, NetworkPolicies, Services,
//!   EndpointSlices and ClusterNetworkPolicies (kube-runtime watchers with backoff; a
//!   missing ClusterNetworkPolicy CRD is an empty list), objects slimmed to what the
//!   compiler reads.
//! * [`sync`]: watcher events → [`crate::source::Change`]s (the same changes the manifest
//!   directory produces), deletions missed while disconnected found at relists, and the gate
//!   that compiles only once every kind is listed.
//! * [`run_kube`]: the loop — gather a burst of events, apply, compile, publish — mirroring
//!   [`crate::run::run_directory`].
//! * [`serve`]: serving agents only while leading ([`crate::leader`]), and the pod label the
//!   agents' Service selects.
//! * [`token_review`]: agents' bootstrap tokens reviewed by the TokenReview API.
//! * [`ca`]: the CA and serving certificate, from files or a Secret.
//! * [`cidr_store`]: node pod-CIDR assignments in a ConfigMap, shared by the replicas.

pub mod ca;
pub mod cidr_store;
pub mod serve;
pub mod sync;
pub mod token_review;
pub mod watch;

use std::time::Duration;

use futures::StreamExt;
use kube::Client;
use tokio::{
    sync::watch as channel,
    time::{Instant, timeout_at},
};
use tracing::debug;

pub use self::{
    serve::{
        AgentServing, LEADER_SLICE, LeaderEndpointSlice, SLICE_MANAGER, mark_until_done,
        serve_agents_while_leading,
    },
    sync::{ClusterSync, Flushed},
    token_review::{KubeTokenReviewer, TokenReviewConfig},
    watch::{Kind, KindEvent, WatchOptions, watch_cluster},
};
use crate::{events::ReportedDiagnostic, run::Controller};

/// Errors of the Kubernetes source.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("the watch streams ended")]
    WatchesEnded,
}

/// How [`run_kube`] runs.
#[derive(Debug)]
pub struct KubeOptions {
    pub watch: WatchOptions,
    /// A burst of events is gathered until the API server is quiet for this long...
    pub debounce: Duration,
    /// ...or for at most this long after its first event...
    pub max_batch_delay: Duration,
    /// ...or until this many changes are pending.
    pub max_batch: usize,
    /// How often to check for node pod-CIDR assignments another replica wrote.
    pub adopt_interval: Duration,
    /// Receives the policy diagnostics after every compile (for [`crate::events`]).
    pub diagnostics: Option<channel::Sender<Vec<ReportedDiagnostic>>>,
}

impl Default for KubeOptions {
    fn default() -> Self {
        Self {
            watch: WatchOptions::default(),
            debounce: Duration::from_millis(20),
            max_batch_delay: Duration::from_millis(250),
            max_batch: 10_000,
            adopt_interval: Duration::from_secs(1),
            diagnostics: None,
        }
    }
}

/// Runs the controller on the API server: watches, and after every burst of changes applies
/// them, compiles and publishes the node states that changed. Nothing is compiled before the
/// initial list of every kind is complete. Runs until the watches end (they do not).
///
/// Every replica runs this, leader or not: followers keep a compiled, published state that
/// nobody reads, so a new leader serves at once ([`serve_agents_while_leading`]).
pub async fn run_kube(
    client: Client,
    controller: Controller,
    opts: KubeOptions,
) -> Result<(), KubeError> {
    let events = watch_cluster(client, &opts.watch);
    let mut events = std::pin::pin!(events);
    let mut sync = ClusterSync::new(controller);
    let mut adopt = tokio::time::interval(opts.adopt_interval);
    adopt.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            event = events.next() => event.ok_or(KubeError::WatchesEnded)?,
            _ = adopt.tick() => {
                if sync.adopt_node_cidrs().is_some() {
                    debug!("recompiled for node pod CIDRs another replica assigned or map capacities an agent reported");
                }
                continue;
            }
        };
        sync.observe(first);
        let hard_stop = Instant::now() + opts.max_batch_delay;
        while sync.pending() < opts.max_batch {
            let until = (Instant::now() + opts.debounce).min(hard_stop);
            match timeout_at(until, events.next()).await {
                Ok(Some(event)) => sync.observe(event),
                Ok(None) => return Err(KubeError::WatchesEnded),
                Err(_) => break,
            }
        }
        let flushed = sync.flush();
        debug!(
            changes = flushed.changes,
            compiled = flushed.versions.is_some(),
            "batch"
        );
        if flushed.versions.is_some()
            && let Some(tx) = &opts.diagnostics
        {
            let current = sync.reported_diagnostics();
            tx.send_if_modified(|old| {
                let changed = *old != current;
                *old = current;
                changed
            });
        }
    }
}
