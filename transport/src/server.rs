//! The controller's side: [`StatePublisher`] holds the newest state of every node, and
//! [`NodeStateServer`] streams it to agents.
//!
//! # Streams, versions and slow agents
//!
//! Each node has one slot holding its newest published `(version, state)`; publishing replaces
//! it and never waits for anyone. Every `Watch` stream remembers the state it sent last and,
//! whenever the transport can take another message, sends the diff from that state to the
//! slot's newest one. A stream whose agent reads slowly therefore never queues anything: the
//! versions it missed fold into its next diff, and memory per stream is one `Arc` of the state
//! last sent plus the HTTP/2 flow-control window.
//!
//! The first message of a stream is a full snapshot, except when the agent's `WatchRequest`
//! names exactly the current epoch and version: then it is an `Unchanged` marker and the
//! agent keeps its state. Epochs (random per [`StatePublisher`]) make this safe across
//! controller restarts, whose version numbers may repeat with different content.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    num::NonZeroU64,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use futures::Stream;
use rustls_pki_types::CertificateDer;
use tokio::{net::TcpListener, sync::watch};
use tonic::{Request, Response, Status};
use weir_api::{MapCapacities, NodeState};

use crate::{
    TransportError,
    bootstrap::{Bootstrap, ReviewError},
    pb::{self, node_state_service_server::NodeStateServiceServer},
    pki::{self, PkiError},
    tls::ServerTls,
    update::StateVersion,
};

/// How often the server pings an idle connection, and how long it waits for the answer,
/// so the streams of vanished agents are noticed and released.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// What an agent last reported about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentReport {
    /// The state the agent enforces, None if it has none yet.
    pub applied: Option<StateVersion>,
    /// True when `applied` is fully in the dataplane.
    pub ready: bool,
    /// Detail, e.g. why applying failed.
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("node {node}: version 0 is reserved for \"no state\"")]
    VersionZero { node: String },
    #[error("node {node}: version {version} is older than version {published}, published before")]
    VersionRegressed {
        node: String,
        version: u64,
        published: u64,
    },
    #[error(
        "node {node}: version {version} was already published with a different state (agents may hold it)"
    )]
    VersionReused { node: String, version: u64 },
}

#[derive(Clone)]
struct Published {
    version: u64,
    state: Arc<NodeState>,
}

struct NodeSlot {
    /// Newest state, None before the first publish and after removal.
    tx: watch::Sender<Option<Published>>,
    /// Highest version ever published for the node; kept after removal so a version number
    /// never names two states within one epoch.
    high_water: u64,
}

struct PublisherInner {
    epoch: NonZeroU64,
    nodes: Mutex<HashMap<String, NodeSlot>>,
    reports: watch::Sender<BTreeMap<String, AgentReport>>,
    /// The table sizes each agent reported when it opened its stream.
    capacities: watch::Sender<BTreeMap<String, MapCapacities>>,
}

/// The newest state of every node, shared by all streams. Cheap to clone.
#[derive(Clone)]
pub struct StatePublisher {
    inner: Arc<PublisherInner>,
}

impl std::fmt::Debug for StatePublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatePublisher")
            .field("epoch", &self.inner.epoch)
            .finish_non_exhaustive()
    }
}

impl Default for StatePublisher {
    fn default() -> Self {
        Self::new()
    }
}

fn random_epoch() -> NonZeroU64 {
    let mut bytes = [0u8; 8];
    loop {
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .expect("the operating system's random source works");
        if let Some(epoch) = NonZeroU64::new(u64::from_le_bytes(bytes)) {
            return epoch;
        }
    }
}

impl StatePublisher {
    /// A publisher with a random epoch.
    pub fn new() -> Self {
        Self::with_epoch(random_epoch())
    }

    /// A publisher with a chosen epoch. Two publishers must never share an epoch unless
    /// they publish identical states under identical versions.
    pub fn with_epoch(epoch: NonZeroU64) -> Self {
        Self {
            inner: Arc::new(PublisherInner {
                epoch,
                nodes: Mutex::new(HashMap::new()),
                reports: watch::Sender::new(BTreeMap::new()),
                capacities: watch::Sender::new(BTreeMap::new()),
            }),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.inner.epoch.get()
    }

    fn nodes(&self) -> MutexGuard<'_, HashMap<String, NodeSlot>> {
        // The map stays consistent even if a holder panicked: every update is one assignment.
        self.inner
            .nodes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes `state` the newest state of `node`. Never blocks on agents.
    ///
    /// Versions of a node must grow; publishing the current version again is a no-op if the
    /// state is equal and an error otherwise.
    pub fn publish(
        &self,
        node: &str,
        version: u64,
        state: Arc<NodeState>,
    ) -> Result<(), PublishError> {
        if version == 0 {
            return Err(PublishError::VersionZero {
                node: node.to_owned(),
            });
        }
        let mut nodes = self.nodes();
        let slot = nodes.entry(node.to_owned()).or_insert_with(NodeSlot::new);
        if version < slot.high_water {
            return Err(PublishError::VersionRegressed {
                node: node.to_owned(),
                version,
                published: slot.high_water,
            });
        }
        if version == slot.high_water {
            let unchanged = slot
                .tx
                .borrow()
                .as_ref()
                .is_some_and(|p| Arc::ptr_eq(&p.state, &state) || *p.state == *state);
            return if unchanged {
                Ok(())
            } else {
                Err(PublishError::VersionReused {
                    node: node.to_owned(),
                    version,
                })
            };
        }
        slot.high_water = version;
        slot.tx.send_replace(Some(Published { version, state }));
        Ok(())
    }

    /// Forgets `node` (it left the cluster): its streams end with `NOT_FOUND` and its report
    /// is dropped. A later [`Self::publish`] for the same name must use a higher version.
    pub fn remove_node(&self, node: &str) {
        if let Some(slot) = self.nodes().get(node) {
            slot.tx.send_replace(None);
        }
        self.inner
            .reports
            .send_if_modified(|reports| reports.remove(node).is_some());
        self.inner
            .capacities
            .send_if_modified(|caps| caps.remove(node).is_some());
    }

    /// The dataplane table sizes of every agent that reported them (on its latest stream).
    /// Nodes not in it have the compiled-in defaults (their agents report none, or did not
    /// connect yet).
    pub fn capacities(&self) -> watch::Receiver<BTreeMap<String, MapCapacities>> {
        self.inner.capacities.subscribe()
    }

    /// Records the table sizes `node`'s agent reported (None: it reports none).
    pub fn record_capacities(&self, node: &str, capacities: Option<MapCapacities>) {
        self.inner
            .capacities
            .send_if_modified(|caps| match capacities {
                Some(c) => caps.insert(node.to_owned(), c) != Some(c),
                None => caps.remove(node).is_some(),
            });
    }

    /// The currently published version of every node.
    pub fn published(&self) -> BTreeMap<String, u64> {
        self.nodes()
            .iter()
            .filter_map(|(node, slot)| Some((node.clone(), slot.tx.borrow().as_ref()?.version)))
            .collect()
    }

    /// The newest report of every agent that reported (and whose node was not removed since).
    pub fn applied(&self) -> watch::Receiver<BTreeMap<String, AgentReport>> {
        self.inner.reports.subscribe()
    }

    /// Waits until, for every `(node, version)` in `targets`, the node's agent reports being
    /// ready with at least that version of this publisher's epoch. Wrap it in a timeout.
    pub async fn wait_for_applied(&self, targets: &BTreeMap<String, u64>) {
        let epoch = self.epoch();
        let mut reports = self.applied();
        let done = |reports: &BTreeMap<String, AgentReport>| {
            targets.iter().all(|(node, version)| {
                reports.get(node).is_some_and(|r| {
                    r.ready
                        && r.applied
                            .is_some_and(|a| a.epoch == epoch && a.version >= *version)
                })
            })
        };
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = reports.wait_for(done).await;
    }

    fn subscribe(&self, node: &str) -> watch::Receiver<Option<Published>> {
        self.nodes()
            .entry(node.to_owned())
            .or_insert_with(NodeSlot::new)
            .tx
            .subscribe()
    }

    fn record_report(&self, node: &str, report: AgentReport) {
        // A report that arrives after the node was removed would resurrect it in the view.
        if !self
            .nodes()
            .get(node)
            .is_some_and(|s| s.tx.borrow().is_some())
        {
            tracing::debug!(node, "ignoring report for a node that is not published");
            return;
        }
        // Every report notifies, even an unchanged one: it also says the agent is connected.
        self.inner.reports.send_modify(|reports| {
            reports.insert(node.to_owned(), report);
        });
    }
}

impl NodeSlot {
    fn new() -> Self {
        Self {
            tx: watch::Sender::new(None),
            high_water: 0,
        }
    }
}

/// The gRPC server of [`pb::node_state_service_server::NodeStateService`].
#[derive(Clone, Debug)]
pub struct NodeStateServer {
    publisher: StatePublisher,
    bootstrap: Option<Bootstrap>,
}

impl NodeStateServer {
    /// A server without certificate bootstrap (`RequestCertificate` answers `UNIMPLEMENTED`).
    pub fn new(publisher: StatePublisher) -> Self {
        Self {
            publisher,
            bootstrap: None,
        }
    }

    /// Enables `RequestCertificate`.
    pub fn with_bootstrap(mut self, bootstrap: Bootstrap) -> Self {
        self.bootstrap = Some(bootstrap);
        self
    }

    /// Serves TLS connections from `listener` until `shutdown` completes.
    ///
    /// On shutdown every open `Watch` stream ends with `UNAVAILABLE` (agents reconnect, to
    /// this or the next controller) and the server waits for in-flight calls to finish.
    /// Dropping the returned future instead also ends the streams, but leaves finishing the
    /// connections to the agents.
    pub async fn serve(
        self,
        listener: TcpListener,
        tls: ServerTls,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), TransportError> {
        let local = listener.local_addr().ok();
        let (stop_tx, stop_rx) = watch::channel(false);
        let handler = Handler {
            publisher: self.publisher,
            bootstrap: self.bootstrap,
            stop: stop_rx,
        };
        let service = NodeStateServiceServer::new(handler);
        tracing::info!(addr = ?local, "serving node state");
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .add_service(service)
            .serve_with_incoming_shutdown(tls.incoming(listener), async move {
                shutdown.await;
                stop_tx.send_replace(true);
            })
            .await
            .map_err(|source| TransportError::Serve {
                addr: local,
                source,
            })
    }
}

struct Handler {
    publisher: StatePublisher,
    bootstrap: Option<Bootstrap>,
    /// Becomes true (or closes) when the server stops.
    stop: watch::Receiver<bool>,
}

/// Checks that the caller presented a node certificate for `node`.
fn authorize_node(
    certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    node: &str,
) -> Result<(), Status> {
    let leaf = certs
        .as_deref()
        .and_then(|c| c.first())
        .ok_or_else(|| Status::unauthenticated("a node client certificate is required"))?;
    pki::validate_node_name(node).map_err(|e| Status::invalid_argument(e.to_string()))?;
    match pki::node_identity(leaf) {
        Ok(identity) if identity == node => Ok(()),
        Ok(identity) => {
            tracing::warn!(
                identity,
                node,
                "refusing a node certificate acting for another node"
            );
            Err(Status::permission_denied(format!(
                "the certificate of node {identity} cannot act for node {node}"
            )))
        }
        Err(e) => {
            tracing::warn!(node, error = %e, "refusing a client certificate");
            Err(Status::permission_denied(e.to_string()))
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::NodeUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl pb::node_state_service_server::NodeStateService for Handler {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let req = request.get_ref();
        authorize_node(request.peer_certs(), &req.node)?;
        let have = (req.have_epoch != 0 && req.have_version != 0).then_some(StateVersion {
            epoch: req.have_epoch,
            version: req.have_version,
        });
        tracing::debug!(node = req.node, ?have, "watch stream opened");
        self.publisher
            .record_capacities(&req.node, req.capacities.as_ref().map(MapCapacities::from));
        let source = UpdateSource {
            node: req.node.clone(),
            epoch: self.publisher.inner.epoch,
            have,
            rx: self.publisher.subscribe(&req.node),
            last_sent: None,
            stop: self.stop.clone(),
            done: false,
        };
        let stream = futures::stream::unfold(source, |mut source| async move {
            let item = source.next().await?;
            Some((item, source))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report_status(
        &self,
        request: Request<pb::AgentStatus>,
    ) -> Result<Response<pb::AgentStatusAck>, Status> {
        authorize_node(request.peer_certs(), &request.get_ref().node)?;
        let status = request.into_inner();
        let applied = (status.epoch != 0 && status.applied_version != 0).then_some(StateVersion {
            epoch: status.epoch,
            version: status.applied_version,
        });
        self.publisher.record_report(
            &status.node,
            AgentReport {
                applied,
                ready: status.ready,
                message: status.message,
            },
        );
        Ok(Response::new(pb::AgentStatusAck {}))
    }

    async fn request_certificate(
        &self,
        request: Request<pb::CertificateRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        let Some(bootstrap) = &self.bootstrap else {
            return Err(Status::unimplemented(
                "certificate bootstrap is not enabled on this controller",
            ));
        };
        // Before anything costs the API server a TokenReview.
        let source = request.remote_addr().map(|a| a.ip());
        if let Err(why) = bootstrap.limiter.admit(source) {
            tracing::warn!(?source, "refusing a certificate request: {why}");
            return Err(Status::resource_exhausted(format!("{why}; retry later")));
        }
        let req = request.into_inner();
        pki::validate_node_name(&req.node).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let identity = bootstrap
            .reviewer
            .review(&req.token)
            .await
            .map_err(|e| match e {
                ReviewError::Rejected { .. } => Status::unauthenticated(e.to_string()),
                ReviewError::Unavailable { .. } => Status::unavailable(e.to_string()),
            })?;
        if identity.node_name != req.node {
            tracing::warn!(
                requested = req.node,
                reviewed = identity.node_name,
                service_account = identity.service_account,
                "refusing a certificate for another node"
            );
            return Err(Status::permission_denied(format!(
                "the token belongs to node {}, not {}",
                identity.node_name, req.node
            )));
        }
        let certificate_pem = bootstrap
            .ca
            .sign_node_csr(&req.node, &req.csr_pem)
            .map_err(|e| match e {
                PkiError::BadCsr { .. }
                | PkiError::UnsupportedKey { .. }
                | PkiError::InvalidNodeName { .. } => Status::invalid_argument(e.to_string()),
                _ => Status::internal(e.to_string()),
            })?;
        tracing::info!(
            node = req.node,
            service_account = identity.service_account,
            pod = identity.pod_name,
            "issued a node certificate"
        );
        Ok(Response::new(pb::CertificateResponse {
            certificate_pem,
            ca_pem: bootstrap.ca.cert_pem().to_owned(),
        }))
    }
}

/// The state behind one `Watch` stream.
struct UpdateSource {
    node: String,
    epoch: NonZeroU64,
    have: Option<StateVersion>,
    rx: watch::Receiver<Option<Published>>,
    last_sent: Option<Published>,
    stop: watch::Receiver<bool>,
    done: bool,
}

impl UpdateSource {
    async fn next(&mut self) -> Option<Result<pb::NodeUpdate, Status>> {
        if self.done {
            return None;
        }
        let item = tokio::select! {
            biased;
            // Also fires if the server future was dropped (the sender closes).
            _ = self.stop.wait_for(|stop| *stop) => {
                Some(Err(Status::unavailable("the controller is shutting down")))
            }
            item = next_update(
                &mut self.rx,
                &mut self.last_sent,
                &self.node,
                self.epoch,
                self.have,
            ) => item,
        };
        if !matches!(item, Some(Ok(_))) {
            tracing::debug!(node = self.node, "watch stream ends");
            self.done = true;
        }
        item
    }
}

/// Waits until the node's newest state differs from what the stream sent last, and returns
/// the message that brings the agent there. Cancel-safe: nothing is marked sent before it is
/// returned.
async fn next_update(
    rx: &mut watch::Receiver<Option<Published>>,
    last_sent: &mut Option<Published>,
    node: &str,
    epoch: NonZeroU64,
    have: Option<StateVersion>,
) -> Option<Result<pb::NodeUpdate, Status>> {
    loop {
        let newest = rx.borrow_and_update().clone();
        match (newest, last_sent.as_ref()) {
            (None, None) => {} // Nothing published yet: the agent waits with what it has.
            (None, Some(_)) => {
                return Some(Err(Status::not_found(format!("node {node} was removed"))));
            }
            (Some(newest), None) => {
                let at = StateVersion {
                    epoch: epoch.get(),
                    version: newest.version,
                };
                let content = if have == Some(at) {
                    pb::snapshot::Content::Unchanged(pb::Unchanged {})
                } else {
                    pb::snapshot::Content::State(newest.state.as_ref().into())
                };
                *last_sent = Some(newest);
                return Some(Ok(pb::NodeUpdate {
                    update: Some(pb::node_update::Update::Snapshot(pb::Snapshot {
                        epoch: at.epoch,
                        version: at.version,
                        content: Some(content),
                    })),
                }));
            }
            (Some(newest), Some(last)) if newest.version == last.version => {}
            (Some(newest), Some(last)) => {
                let diff = last.state.diff(&newest.state, last.version, newest.version);
                *last_sent = Some(newest);
                return Some(Ok(pb::NodeUpdate {
                    update: Some(pb::node_update::Update::Diff((&diff).into())),
                }));
            }
        }
        if rx.changed().await.is_err() {
            // The publisher is gone: end the stream; the agent reconnects.
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_api::{EndpointPolicy, PodKey};

    fn state(n: u32) -> Arc<NodeState> {
        let mut s = NodeState::default();
        s.endpoints.insert(
            PodKey::new("default", "p"),
            EndpointPolicy {
                ingress: n,
                egress: 0,
            },
        );
        Arc::new(s)
    }

    #[test]
    fn versions_must_grow() {
        let p = StatePublisher::new();
        p.publish("n1", 5, state(1)).unwrap();
        assert!(matches!(
            p.publish("n1", 4, state(1)),
            Err(PublishError::VersionRegressed { published: 5, .. })
        ));
        // The same version with the same content is a no-op, with other content an error.
        p.publish("n1", 5, state(1)).unwrap();
        assert!(matches!(
            p.publish("n1", 5, state(2)),
            Err(PublishError::VersionReused { version: 5, .. })
        ));
        assert!(matches!(
            p.publish("n1", 0, state(2)),
            Err(PublishError::VersionZero { .. })
        ));
        assert_eq!(p.published(), BTreeMap::from([("n1".to_owned(), 5)]));
    }

    #[test]
    fn removed_node_cannot_reuse_its_versions() {
        let p = StatePublisher::new();
        p.publish("n1", 5, state(1)).unwrap();
        p.remove_node("n1");
        assert!(p.published().is_empty());
        assert!(p.publish("n1", 5, state(1)).is_err());
        p.publish("n1", 6, state(1)).unwrap();
    }

    #[tokio::test]
    async fn stream_starts_with_snapshot_and_folds_missed_versions_into_one_diff() {
        let p = StatePublisher::new();
        let (_stop_tx, stop) = watch::channel(false);
        let mut source = UpdateSource {
            node: "n1".into(),
            epoch: p.inner.epoch,
            have: None,
            rx: p.subscribe("n1"),
            last_sent: None,
            stop,
            done: false,
        };
        p.publish("n1", 1, state(1)).unwrap();
        let first = source.next().await.unwrap().unwrap();
        assert!(matches!(
            first.update,
            Some(pb::node_update::Update::Snapshot(pb::Snapshot {
                version: 1,
                ..
            }))
        ));
        for v in 2..=10 {
            p.publish("n1", v, state(u32::try_from(v).unwrap()))
                .unwrap();
        }
        let Some(pb::node_update::Update::Diff(diff)) =
            source.next().await.unwrap().unwrap().update
        else {
            panic!("expected a diff");
        };
        assert_eq!((diff.from_version, diff.to_version), (1, 10));
        assert_eq!(diff.upsert_endpoints.len(), 1);

        p.remove_node("n1");
        let end = source.next().await.unwrap().unwrap_err();
        assert_eq!(end.code(), tonic::Code::NotFound);
        assert!(source.next().await.is_none());
    }

    #[tokio::test]
    async fn agent_holding_the_current_version_gets_the_unchanged_marker() {
        let p = StatePublisher::new();
        p.publish("n1", 3, state(1)).unwrap();
        let (_stop_tx, stop) = watch::channel(false);
        let mut source = UpdateSource {
            node: "n1".into(),
            epoch: p.inner.epoch,
            have: Some(StateVersion {
                epoch: p.epoch(),
                version: 3,
            }),
            rx: p.subscribe("n1"),
            last_sent: None,
            stop,
            done: false,
        };
        let first = source.next().await.unwrap().unwrap();
        let Some(pb::node_update::Update::Snapshot(s)) = first.update else {
            panic!("expected a snapshot");
        };
        assert!(matches!(
            s.content,
            Some(pb::snapshot::Content::Unchanged(_))
        ));
    }

    #[tokio::test]
    async fn stopping_the_server_ends_streams() {
        let p = StatePublisher::new();
        let (stop_tx, stop) = watch::channel(false);
        let mut source = UpdateSource {
            node: "n1".into(),
            epoch: p.inner.epoch,
            have: None,
            rx: p.subscribe("n1"),
            last_sent: None,
            stop,
            done: false,
        };
        drop(stop_tx);
        let end = source.next().await.unwrap().unwrap_err();
        assert_eq!(end.code(), tonic::Code::Unavailable);
        assert!(source.next().await.is_none());
    }
}
