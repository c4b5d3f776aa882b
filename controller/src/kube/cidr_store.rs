//! Node pod-CIDR assignments kept in the API server, so every controller replica (and every
//! restart) hands each node the range it already has.
//!
//! # Where
//!
//! ConfigMap `weir-system/weir-node-cidrs`, one key per node: `data["<node>"] = "<cidr>"`, or
//! `"<ipv4 cidr>,<ipv6 cidr>"` on a dual-stack cluster (one range per family).
//! Node names are DNS subdomain names, which are valid ConfigMap keys. Only ranges this
//! controller allocated are kept; a node whose `spec.podCIDRs` is set keeps that range and
//! needs no entry (see [`crate::node_cidrs`]).
//!
//! Not annotations on the Nodes: that needs `patch` on Nodes, which RBAC cannot narrow to
//! one annotation (it would allow changing any node's taints and labels, and so where pods
//! run). A ConfigMap in the controller's namespace can be granted by name.
//!
//! # Who writes
//!
//! Only the leader. Every replica compiles and allocates (so a failover needs no
//! recompilation), but a follower polls the ConfigMap and adopts what the leader wrote at its
//! next compile ([`CidrStore::refresh`]): its allocator then holds the leader's choices, and
//! allocation being deterministic (first free range, nodes in name order), the two agree on
//! nodes that joined since. A replica that becomes leader reads the ConfigMap once more and
//! writes nothing until its allocator has adopted that read; from then on its allocator is
//! authoritative and every change is written.
//!
//! # Concurrency
//!
//! A write replaces the ConfigMap with the `resourceVersion` last read (optimistic
//! concurrency, <https://kubernetes.io/docs/reference/using-api/api-concepts/#resource-versions>).
//! A write that loses a race (`409 Conflict`, or `AlreadyExists` on create) reads again and
//! writes the leader's assignments again: only a replica that still believes it leads can
//! have written, and the Lease's renew deadline makes that a stepping-down leader.
//!
//! # A synchronous store over an asynchronous API
//!
//! [`CidrStore`] is called from inside the compile loop and must not block it. [`CidrStore::save`]
//! hands the assignments to [`CidrStoreSync`], a task that writes the newest ones (older ones
//! are skipped), and returns. Failed writes are retried with backoff until one succeeds: the
//! compile loop calls `save` only when an assignment changed, so it would not retry.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use ipnet::IpNet;
use k8s_openapi::{api::core::v1::ConfigMap, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{Api, Client, api::PostParams};
use tokio::sync::Notify;
use tracing::{debug, info, warn};
use weir_transport::Backoff;

use crate::{
    leader::Leadership,
    node_cidrs::{Assignments, CidrError, CidrStore},
};

/// Namespace of the ConfigMap `manifests/` grants access to.
pub const DEFAULT_NAMESPACE: &str = "weir-system";
/// Name of the ConfigMap `manifests/` grants access to.
pub const DEFAULT_NAME: &str = "weir-node-cidrs";

/// How many times one write is tried again after a conflict before waiting for the backoff.
const CONFLICT_RETRIES: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum CidrStoreError {
    #[error("{action} ConfigMap {namespace}/{name}: {source}")]
    Api {
        action: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error(
        "writing ConfigMap {namespace}/{name}: {attempts} writes in a row conflicted with another writer"
    )]
    Contended {
        namespace: String,
        name: String,
        attempts: usize,
    },
}

/// Where the assignments live and how the store keeps up.
#[derive(Clone, Debug)]
pub struct CidrStoreConfig {
    pub namespace: String,
    pub name: String,
    /// How often a follower reads the leader's assignments.
    pub poll_interval: Duration,
    /// Delays between failed reads or writes.
    pub retry: Backoff,
}

impl CidrStoreConfig {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            poll_interval: Duration::from_secs(5),
            retry: Backoff {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(30),
            },
        }
    }
}

/// The ConfigMap as last read or written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Remote {
    assignments: Assignments,
    /// None: the ConfigMap does not exist.
    resource_version: Option<String>,
}

#[derive(Debug, Default)]
struct StoreState {
    /// Read at start, for [`CidrStore::load`].
    initial: Assignments,
    /// What the allocator holds: its last save, or the assignments it last adopted.
    desired: Option<Assignments>,
    /// Read from the API and not adopted by the allocator yet.
    fresh: Option<Assignments>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<StoreState>,
    /// Wakes the task when there is something to write.
    saved: Notify,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, StoreState> {
        // Every update is a plain assignment: the state is consistent even after a panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The [`CidrStore`] the controller's allocator uses in a cluster.
#[derive(Debug)]
pub struct KubeCidrStore {
    shared: Arc<Shared>,
}

/// Reads the ConfigMap once: the store (for [`crate::run::Controller::with_node_cidrs`]) and
/// the task that keeps it in step with the API server (spawn [`CidrStoreSync::run`]).
pub async fn connect(
    client: Client,
    config: CidrStoreConfig,
    leadership: Leadership,
) -> Result<(KubeCidrStore, CidrStoreSync), CidrStoreError> {
    let api: Api<ConfigMap> = Api::namespaced(client, &config.namespace);
    let remote = read(&api, &config).await?;
    info!(
        config_map = %format!("{}/{}", config.namespace, config.name),
        nodes = remote.assignments.len(),
        "loaded node pod CIDR assignments"
    );
    let shared = Arc::new(Shared::default());
    shared.state().initial = remote.assignments.clone();
    let store = KubeCidrStore {
        shared: shared.clone(),
    };
    let sync = CidrStoreSync {
        api,
        config,
        shared,
        leadership,
        remote,
        adopted_as_leader: false,
    };
    Ok((store, sync))
}

impl CidrStore for KubeCidrStore {
    fn load(&self) -> Result<Assignments, CidrError> {
        Ok(self.shared.state().initial.clone())
    }

    fn save(&self, assignments: &Assignments) -> Result<(), CidrError> {
        self.shared.state().desired = Some(assignments.clone());
        self.shared.saved.notify_one();
        Ok(())
    }

    fn refresh(&self) -> Option<Assignments> {
        let mut state = self.shared.state();
        let fresh = state.fresh.take()?;
        // The allocator holds exactly these now; a change it makes from here is saved.
        state.desired = Some(fresh.clone());
        drop(state);
        // A new leader writes once its allocator has adopted the latest read.
        self.shared.saved.notify_one();
        Some(fresh)
    }

    fn has_fresh(&self) -> bool {
        self.shared.state().fresh.is_some()
    }
}

/// Keeps the ConfigMap and the store in step: writes the allocator's assignments while
/// leading, reads the leader's while following.
pub struct CidrStoreSync {
    api: Api<ConfigMap>,
    config: CidrStoreConfig,
    shared: Arc<Shared>,
    leadership: Leadership,
    remote: Remote,
    /// While leading: the read made on becoming leader succeeded.
    adopted_as_leader: bool,
}

impl CidrStoreSync {
    /// Runs until dropped.
    pub async fn run(mut self) {
        let mut failures = 0u32;
        let mut elector_alive = true;
        loop {
            let leading = self.leadership.is_leader();
            let result = if leading {
                self.lead().await
            } else {
                self.adopted_as_leader = false;
                self.follow().await
            };
            let wait = match result {
                Ok(()) => {
                    failures = 0;
                    (!leading).then_some(self.config.poll_interval)
                }
                Err(e) => {
                    warn!(error = %e, "keeping node pod CIDR assignments in the API server");
                    failures = failures.saturating_add(1);
                    Some(self.config.retry.delay(failures - 1))
                }
            };
            tokio::select! {
                () = self.shared.saved.notified() => {}
                alive = self.leadership.changed(), if elector_alive => elector_alive = alive,
                () = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {}
            }
        }
    }

    /// Follower: take in what the leader wrote, if anything changed.
    async fn follow(&mut self) -> Result<(), CidrStoreError> {
        let remote = read(&self.api, &self.config).await?;
        self.take_in(remote);
        Ok(())
    }

    /// Leader: read once after taking over, then write whatever the allocator holds that the
    /// ConfigMap does not.
    async fn lead(&mut self) -> Result<(), CidrStoreError> {
        if !self.adopted_as_leader {
            let remote = read(&self.api, &self.config).await?;
            self.take_in(remote);
            self.adopted_as_leader = true;
        }
        let desired = {
            let state = self.shared.state();
            if state.fresh.is_some() {
                // The allocator has not adopted the latest read: what it holds may be older.
                return Ok(());
            }
            match &state.desired {
                Some(d) if *d != self.remote.assignments => d.clone(),
                _ => return Ok(()),
            }
        };
        for _ in 0..CONFLICT_RETRIES {
            match write(&self.api, &self.config, &self.remote, &desired).await {
                Ok(written) => {
                    debug!(nodes = desired.len(), "wrote node pod CIDR assignments");
                    self.remote = written;
                    return Ok(());
                }
                Err(WriteError::Conflict) => {
                    let remote = read(&self.api, &self.config).await?;
                    if remote.assignments != self.remote.assignments {
                        warn!(
                            "node pod CIDR assignments were changed by another writer; \
                             writing this leader's"
                        );
                    }
                    self.remote = remote;
                }
                Err(WriteError::Api(e)) => return Err(e),
            }
        }
        Err(CidrStoreError::Contended {
            namespace: self.config.namespace.clone(),
            name: self.config.name.clone(),
            attempts: CONFLICT_RETRIES,
        })
    }

    /// Records a read; assignments that changed since the previous read are offered to the
    /// allocator.
    fn take_in(&mut self, remote: Remote) {
        if remote.resource_version != self.remote.resource_version
            && remote.assignments != self.remote.assignments
        {
            debug!(
                nodes = remote.assignments.len(),
                "node pod CIDR assignments changed in the API server"
            );
            self.shared.state().fresh = Some(remote.assignments.clone());
        }
        self.remote = remote;
    }
}

fn api_error(
    config: &CidrStoreConfig,
    action: &'static str,
    source: kube::Error,
) -> CidrStoreError {
    CidrStoreError::Api {
        action,
        namespace: config.namespace.clone(),
        name: config.name.clone(),
        source: Box::new(source),
    }
}

async fn read(api: &Api<ConfigMap>, config: &CidrStoreConfig) -> Result<Remote, CidrStoreError> {
    let found = api
        .get_opt(&config.name)
        .await
        .map_err(|e| api_error(config, "reading", e))?;
    Ok(found.map_or_else(Remote::default, |cm| parse(config, &cm)))
}

/// The assignments of a ConfigMap; entries that are not a CIDR are skipped (and logged): a
/// hand-edited mistake must not stop the controller, and the node gets a range anew.
fn parse(config: &CidrStoreConfig, cm: &ConfigMap) -> Remote {
    let mut assignments = BTreeMap::new();
    for (node, value) in cm.data.iter().flatten() {
        match parse_ranges(value) {
            Ok(cidrs) => {
                assignments.insert(node.clone(), cidrs);
            }
            Err(e) => warn!(
                config_map = %format!("{}/{}", config.namespace, config.name),
                %node,
                value,
                error = %e,
                "ignoring an entry that is not a CIDR"
            ),
        }
    }
    Remote {
        assignments,
        resource_version: cm.metadata.resource_version.clone(),
    }
}

/// A node's entry: its ranges, comma-separated (one per family; a single range is what a
/// controller without dual stack wrote).
fn parse_ranges(value: &str) -> Result<Vec<IpNet>, ipnet::AddrParseError> {
    value.split(',').map(|c| c.trim().parse()).collect()
}

fn format_ranges(cidrs: &[IpNet]) -> String {
    cidrs
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

enum WriteError {
    Conflict,
    Api(CidrStoreError),
}

async fn write(
    api: &Api<ConfigMap>,
    config: &CidrStoreConfig,
    remote: &Remote,
    desired: &Assignments,
) -> Result<Remote, WriteError> {
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            namespace: Some(config.namespace.clone()),
            resource_version: remote.resource_version.clone(),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/part-of".to_owned(), "weir".to_owned()),
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    "weir-controller".to_owned(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        data: Some(
            desired
                .iter()
                .map(|(node, cidrs)| (node.clone(), format_ranges(cidrs)))
                .collect(),
        ),
        ..ConfigMap::default()
    };
    let result = match &remote.resource_version {
        None => api.create(&PostParams::default(), &cm).await,
        Some(_) => api.replace(&config.name, &PostParams::default(), &cm).await,
    };
    match result {
        Ok(written) => Ok(Remote {
            assignments: desired.clone(),
            resource_version: written.metadata.resource_version,
        }),
        // Replaced meanwhile (Conflict), or created meanwhile (AlreadyExists).
        Err(kube::Error::Api(s)) if s.code == 409 => Err(WriteError::Conflict),
        Err(e) => Err(WriteError::Api(api_error(config, "writing", e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_hold_one_range_or_one_per_family() {
        let one: Vec<IpNet> = vec!["10.244.1.0/24".parse().unwrap()];
        assert_eq!(parse_ranges(" 10.244.1.0/24 ").unwrap(), one);
        let two: Vec<IpNet> = vec![
            "10.244.1.0/24".parse().unwrap(),
            "fd00:10:244:1::/64".parse().unwrap(),
        ];
        assert_eq!(format_ranges(&two), "10.244.1.0/24,fd00:10:244:1::/64");
        assert_eq!(parse_ranges(&format_ranges(&two)).unwrap(), two);
        assert!(parse_ranges("10.244.1.0/24,nonsense").is_err());
    }
}
