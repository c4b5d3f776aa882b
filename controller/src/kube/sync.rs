//! From watcher events to [`Change`]s, and the gate that keeps the controller from publishing
//! before it has seen the whole cluster.
//!
//! # Relists and missed deletions
//!
//! A watch that falls out of the API server's history (`410 Gone`) or a restarted controller
//! lists the kind again: [`Event::Init`], one [`Event::InitApply`] per object, then
//! [`Event::InitDone`]. Objects deleted while the watch was down are simply absent from the
//! list — no deletion event will ever come for them. So every kind keeps the keys (and
//! `resourceVersion`s) it has passed on; an object listed with an unchanged
//! `resourceVersion` is not passed on again, and at `InitDone` every known key that the list
//! did not contain becomes a [`Change::Delete`].
//!
//! Listed objects are passed on as they arrive (not held back until `InitDone`): until the
//! deletions at `InitDone`, the store holds the old objects next to the new ones, which is
//! the same as a watch that is a little behind and never loses a policy mid-relist.
//!
//! # The first compile
//!
//! A compile over a partial cluster would publish states without some policies — pods would
//! be open until the rest arrived. So nothing is compiled (and nothing published) until the
//! initial list of every kind is complete ([`ClusterSync::is_synced`]).

use std::collections::{BTreeMap, HashMap, HashSet};

use kube::runtime::watcher::Event;
use tracing::{debug, info};
use weir_compiler::policy::PolicyKind;

use super::watch::{Kind, KindEvent};

use crate::{
    events::{ObjectRef, ReportedDiagnostic},
    run::Controller,
    source::{Change, Object, ObjectKey},
};

/// What we passed on about one object.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Known {
    resource_version: String,
}

/// One kind's view: keys passed on, and the keys seen by a relist in progress.
#[derive(Debug, Default)]
struct KindTracker {
    known: HashMap<ObjectKey, Known>,
    /// Keys seen since the last `Init`; `Some` while a (re)list is in progress.
    relisting: Option<HashSet<ObjectKey>>,
    /// The initial list completed at least once.
    synced: bool,
}

impl KindTracker {
    fn on_event(&mut self, event: Event<Object>, out: &mut Vec<Change>) {
        match event {
            Event::Init => self.relisting = Some(HashSet::new()),
            Event::InitApply(o) => {
                let key = o.key();
                if let Some(seen) = &mut self.relisting {
                    seen.insert(key);
                }
                self.upsert(o, out);
            }
            Event::InitDone => {
                let seen = self.relisting.take().unwrap_or_default();
                let gone: Vec<ObjectKey> = self
                    .known
                    .keys()
                    .filter(|k| !seen.contains(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    debug!(%key, "gone while unwatched");
                    self.known.remove(&key);
                    out.push(Change::Delete(key));
                }
                self.synced = true;
            }
            Event::Apply(o) => self.upsert(o, out),
            Event::Delete(o) => {
                let key = o.key();
                self.known.remove(&key);
                out.push(Change::Delete(key));
            }
        }
    }

    fn upsert(&mut self, o: Object, out: &mut Vec<Change>) {
        let key = o.key();
        let resource_version = meta(&o).resource_version.clone().unwrap_or_default();
        let known = Known { resource_version };
        // Same key, same non-empty version: the very object we already passed on.
        if !known.resource_version.is_empty() && self.known.get(&key) == Some(&known) {
            return;
        }
        self.known.insert(key, known);
        out.push(Change::Upsert(Box::new(o)));
    }
}

fn meta(o: &Object) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
    match o {
        Object::Namespace(o) => &o.metadata,
        Object::Pod(o) => &o.metadata,
        Object::Node(o) => &o.metadata,
        Object::NetworkPolicy(o) => &o.metadata,
        Object::ClusterNetworkPolicy(o) => &o.metadata,
        Object::Service(o) => &o.metadata,
        Object::EndpointSlice(o) => &o.metadata,
        Object::DropCidrSet(o) => &o.metadata,
        Object::HostPolicy(o) => &o.metadata,
    }
}

/// What one [`ClusterSync::flush`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flushed {
    /// Changes applied to the store.
    pub changes: usize,
    /// Node versions after the compile; `None` if nothing was compiled (not yet synced).
    pub versions: Option<BTreeMap<String, u64>>,
}

/// Feeds a [`Controller`] from watcher events: turns them into changes, remembers what it
/// passed on (for relists), and compiles only once every kind completed its initial list.
pub struct ClusterSync {
    controller: Controller,
    trackers: [KindTracker; Kind::ALL.len()],
    pending: Vec<Change>,
    /// Identities of the objects diagnostics may be about.
    refs: BTreeMap<ObjectKey, ObjectRef>,
    compiled_once: bool,
}

impl ClusterSync {
    pub fn new(controller: Controller) -> Self {
        Self {
            controller,
            trackers: Default::default(),
            pending: Vec::new(),
            refs: BTreeMap::new(),
            compiled_once: false,
        }
    }

    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    /// Takes in one event; its changes wait for [`Self::flush`].
    pub fn observe(&mut self, event: KindEvent) {
        if matches!(
            event.kind,
            Kind::NetworkPolicy
                | Kind::ClusterNetworkPolicy
                | Kind::Service
                | Kind::EndpointSlice
                | Kind::DropCidrSet
                | Kind::HostPolicy
        ) {
            self.track_ref(event.kind, &event.event);
        }
        let tracker = &mut self.trackers[event.kind.index()];
        let was_synced = tracker.synced;
        tracker.on_event(event.event, &mut self.pending);
        if !was_synced && tracker.synced {
            info!(kind = %event.kind, objects = tracker.known.len(), "initial list complete");
        }
    }

    /// Changes waiting for the next flush.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The changes waiting for the next flush, in order.
    pub fn pending_changes(&self) -> &[Change] {
        &self.pending
    }

    /// True once the initial list of every kind has completed.
    pub fn is_synced(&self) -> bool {
        self.trackers.iter().all(|t| t.synced)
    }

    /// Applies pending changes; once synced, compiles and publishes what changed (the first
    /// time even without pending changes, so an empty cluster gets its node states).
    pub fn flush(&mut self) -> Flushed {
        let changes = std::mem::take(&mut self.pending);
        let count = changes.len();
        if !changes.is_empty() {
            self.controller.apply(changes);
        }
        let versions = if self.is_synced() && (count > 0 || !self.compiled_once) {
            if !self.compiled_once {
                info!("initial lists complete: compiling and publishing");
            }
            self.compiled_once = true;
            Some(self.controller.recompute())
        } else {
            None
        };
        Flushed {
            changes: count,
            versions,
        }
    }

    /// Compiles when the node pod-CIDR store offers assignments the allocator has not adopted,
    /// or an agent reported other map capacities (no object changed, but what agents get
    /// may have).
    pub fn adopt_node_cidrs(&mut self) -> Option<BTreeMap<String, u64>> {
        (self.compiled_once
            && (self.controller.node_cidrs_pending() || self.controller.capacities_pending()))
        .then(|| self.controller.recompute())
    }

    /// Every diagnostic of every stored policy, and of the Services and EndpointSlices the
    /// last compile used, and every policy too large for a node's dataplane, with the
    /// object's identity.
    pub fn reported_diagnostics(&self) -> Vec<ReportedDiagnostic> {
        let object = |kind: Kind, namespace: &str, name: &str| {
            let key = ObjectKey {
                kind: kind.as_str(),
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            };
            self.refs.get(&key).cloned().unwrap_or_default()
        };
        let policies = self.controller.cluster().diagnostics().map(|d| {
            let kind = match d.policy.kind {
                PolicyKind::NetworkPolicy => Kind::NetworkPolicy,
                PolicyKind::ClusterNetworkPolicy => Kind::ClusterNetworkPolicy,
                PolicyKind::HostPolicy | PolicyKind::UntrackedHostPolicy => Kind::HostPolicy,
            };
            ReportedDiagnostic::policy(d, object(kind, &d.policy.namespace, &d.policy.name))
        });
        let services = self
            .controller
            .service_diagnostics()
            .iter()
            .filter_map(|d| {
                let kind = if d.kind == Kind::EndpointSlice.as_str() {
                    Kind::EndpointSlice
                } else {
                    Kind::Service
                };
                ReportedDiagnostic::service(d, object(kind, &d.object.namespace, &d.object.name))
            });
        let too_large = self.controller.too_large().iter().flat_map(|t| {
            t.policies.iter().filter_map(move |p| {
                let kind = [
                    Kind::NetworkPolicy,
                    Kind::ClusterNetworkPolicy,
                    Kind::HostPolicy,
                ]
                .into_iter()
                .find(|k| *p.kind == *k.as_str())?;
                Some(ReportedDiagnostic::too_large(
                    t,
                    p,
                    object(kind, &p.namespace, &p.name),
                ))
            })
        });
        let drop_sets = self
            .controller
            .drop_set_diagnostics()
            .iter()
            .filter_map(|d| {
                ReportedDiagnostic::service(d, object(Kind::DropCidrSet, "", &d.object.name))
            });
        policies
            .chain(services)
            .chain(too_large)
            .chain(drop_sets)
            .collect()
    }

    fn track_ref(&mut self, kind: Kind, event: &Event<Object>) {
        match event {
            Event::Apply(o) | Event::InitApply(o) => {
                let m = meta(o);
                self.refs.insert(
                    o.key(),
                    ObjectRef {
                        uid: m.uid.clone(),
                        generation: m.generation,
                    },
                );
            }
            Event::Delete(o) => {
                self.refs.remove(&o.key());
            }
            Event::Init => {}
            Event::InitDone => {
                let tracker = &self.trackers[kind.index()];
                // Runs before the tracker drops the keys the relist did not see; drop those
                // that are not in the relist either.
                let relisted = tracker.relisting.as_ref();
                self.refs.retain(|key, _| {
                    key.kind != kind.as_str()
                        || relisted
                            .map_or(tracker.known.contains_key(key), |seen| seen.contains(key))
                });
            }
        }
    }
}
