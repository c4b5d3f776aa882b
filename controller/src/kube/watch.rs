//! Watches of the eight kinds the compiler reads, merged into one stream of [`KindEvent`]s.
//!
//! Each kind is a kube-runtime [`watcher`] (list, then watch from the list's
//! `resourceVersion`; on a dropped connection it re-watches from the last version it saw,
//! bookmarks included; on `410 Gone` it lists again, announced by [`Event::Init`]), with
//! kube-runtime's default backoff on errors (0.8s doubling to 30s with jitter, reset after
//! two quiet minutes, as client-go's reflector) so a slow or failing API server is not
//! hammered. Errors are logged and never end the stream.
//!
//! # Kinds without their CRD
//!
//! `ClusterNetworkPolicy` (`policy.networking.k8s.io/v1alpha2`) and weir's own
//! `DropCIDRSet` (`weir.dev/v1alpha1`) are served only where their CRD is installed. Where
//! one is not, the API server answers `404 Not Found` to the list; the controller must not
//! wait for a kind that will never list. So a `404` on such a kind counts as a complete,
//! empty list ([`Event::Init`] then [`Event::InitDone`], which also deletes every object of
//! the kind the store held: a CRD that is deleted takes its objects with it). It is logged
//! once per disappearance, not at every retry, and the watcher keeps retrying with the same
//! backoff as any failed watch (at most 30 s apart), so a CRD installed later is picked up
//! without a restart: its list then arrives as an ordinary (re)list. Only `404` is taken for
//! "not installed": any other error (`403` from missing RBAC, a server error) keeps the kind
//! unsynced as for every other kind, so the
//! controller never publishes a state that silently lacks the cluster's guardrails.
//!
//! # Memory
//!
//! The controller keeps no API objects: the typed [`weir_compiler::Cluster`] stores only what policy
//! needs. Objects are still slimmed as they arrive ([`slim_pod`] and friends), so the
//! batches between two compiles stay small:
//!
//! * Pods are watched with the field selector [`POD_FIELD_SELECTOR`]: host-network pods and
//!   terminal pods (phase Succeeded or Failed) are neither endpoints nor peers
//!   (see [`weir_compiler::cluster`]), so the API server does not send them at all. A pod that
//!   becomes terminal leaves the selection, which the API server reports as a deletion
//!   (<https://kubernetes.io/docs/concepts/overview/working-with-objects/field-selectors/>,
//!   selectable pod fields: `spec.hostNetwork`, `status.phase`). Of the rest only name,
//!   namespace, labels, node, IPs, phase and container ports are kept.
//! * All objects lose `managedFields` and annotations (`kubectl`'s last-applied copy of the
//!   object is often its largest part); Nodes also lose their image list.
//!
//! A metadata-only watch would be cheaper still, but pods' IPs, node and ports are in spec
//! and status.

use std::{borrow::Cow, fmt, time::Duration};

use futures::{Stream, StreamExt, stream::BoxStream};
use k8s_openapi::{
    api::{
        core::v1::{Container, Namespace, Node, NodeStatus, Pod, PodSpec, PodStatus, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    runtime::{
        WatchStreamExt,
        watcher::{self, Event},
    },
};
use tracing::{debug, info, warn};
use weir_compiler::{
    cnp::{self, ClusterNetworkPolicy},
    drop_cidrs::{self, DropCidrSet},
    host_policy::{self, HostPolicy},
    policy::CLUSTER_NETWORK_POLICY_KIND,
};

use crate::source::Object;

/// The kinds the compiler reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Pod,
    Node,
    NetworkPolicy,
    Service,
    EndpointSlice,
    ClusterNetworkPolicy,
    DropCidrSet,
    HostPolicy,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::Node,
        Kind::NetworkPolicy,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::ClusterNetworkPolicy,
        Kind::DropCidrSet,
        Kind::HostPolicy,
    ];

    /// The kind's name, as in [`crate::source::ObjectKey::kind`].
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Node => "Node",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::ClusterNetworkPolicy => CLUSTER_NETWORK_POLICY_KIND,
            Kind::DropCidrSet => drop_cidrs::KIND,
            Kind::HostPolicy => host_policy::KIND,
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Kind::Namespace => 0,
            Kind::Pod => 1,
            Kind::Node => 2,
            Kind::NetworkPolicy => 3,
            Kind::Service => 4,
            Kind::EndpointSlice => 5,
            Kind::ClusterNetworkPolicy => 6,
            Kind::DropCidrSet => 7,
            Kind::HostPolicy => 8,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One watcher event of one kind, objects already wrapped and slimmed.
#[derive(Debug)]
pub struct KindEvent {
    pub kind: Kind,
    pub event: Event<Object>,
}

/// Server-side filter of the pod watch: no host-network pods, no terminal pods.
pub const POD_FIELD_SELECTOR: &str =
    "spec.hostNetwork=false,status.phase!=Succeeded,status.phase!=Failed";

/// How the watches are made.
#[derive(Clone, Debug)]
pub struct WatchOptions {
    /// Server-side timeout of each watch request (the watcher re-watches after it). Also
    /// bounds how long a silently dead connection goes unnoticed (plus 5 s).
    pub watch_timeout: Duration,
    /// Objects per page of a list.
    pub page_size: u32,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            // client-go's reflector picks 5–10 minutes; kube-runtime's default is 290 s.
            watch_timeout: Duration::from_secs(290),
            page_size: 500,
        }
    }
}

/// The merged watches of Namespaces, Pods, Nodes, NetworkPolicies, Services and
/// EndpointSlices (all namespaces), and of ClusterNetworkPolicies and DropCIDRSets (empty
/// while their CRD is not installed, see the module documentation).
/// Never ends; errors are logged and retried with backoff.
pub fn watch_cluster(
    client: Client,
    opts: &WatchOptions,
) -> impl Stream<Item = KindEvent> + Send + use<> {
    let config = watcher::Config::default()
        .timeout(u32::try_from(opts.watch_timeout.as_secs()).unwrap_or(290))
        .page_size(opts.page_size);
    let streams: Vec<BoxStream<'static, KindEvent>> = vec![
        kind_stream(
            Kind::Namespace,
            Api::<Namespace>::all(client.clone()),
            config.clone(),
            |o| Object::Namespace(slim_namespace(o)),
        ),
        kind_stream(
            Kind::Pod,
            Api::<Pod>::all(client.clone()),
            config.clone().fields(POD_FIELD_SELECTOR),
            |o| Object::Pod(slim_pod(o)),
        ),
        kind_stream(
            Kind::Node,
            Api::<Node>::all(client.clone()),
            config.clone(),
            |o| Object::Node(slim_node(o)),
        ),
        kind_stream(
            Kind::NetworkPolicy,
            Api::<NetworkPolicy>::all(client.clone()),
            config.clone(),
            |o| Object::NetworkPolicy(slim_policy(o)),
        ),
        kind_stream(
            Kind::Service,
            Api::<Service>::all(client.clone()),
            config.clone(),
            |o| Object::Service(slim_service(o)),
        ),
        kind_stream(
            Kind::EndpointSlice,
            Api::<EndpointSlice>::all(client.clone()),
            config.clone(),
            |o| Object::EndpointSlice(slim_endpoint_slice(o)),
        ),
        crd_stream(
            Kind::ClusterNetworkPolicy,
            Api::<Crd<ClusterNetworkPolicy>>::all(client.clone()),
            config.clone(),
            |Crd(o)| Object::ClusterNetworkPolicy(slim_cluster_policy(o)),
        ),
        crd_stream(
            Kind::DropCidrSet,
            Api::<Crd<DropCidrSet>>::all(client.clone()),
            config.clone(),
            |Crd(o)| {
                Object::DropCidrSet(DropCidrSet {
                    metadata: slim_meta(o.metadata),
                    ..o
                })
            },
        ),
        crd_stream(
            Kind::HostPolicy,
            Api::<Crd<HostPolicy>>::all(client),
            config,
            |Crd(o)| {
                Object::HostPolicy(HostPolicy {
                    metadata: slim_meta(o.metadata),
                    ..o
                })
            },
        ),
    ];
    futures::stream::select_all(streams)
}

fn kind_stream<K>(
    kind: Kind,
    api: Api<K>,
    config: watcher::Config,
    wrap: fn(K) -> Object,
) -> BoxStream<'static, KindEvent>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + fmt::Debug + Send + 'static,
{
    watcher::watcher(api, config)
        .default_backoff()
        .filter_map(move |item| async move {
            match item {
                Ok(event) => Some(KindEvent {
                    kind,
                    event: map_event(event, wrap),
                }),
                Err(e) => {
                    warn!(%kind, error = %e, "watch failed; retrying with backoff");
                    None
                }
            }
        })
        .boxed()
}

/// An object of a CRD the compiler reads, as kube-rs lists and watches it. The compiler's
/// types know nothing of kube-rs, so the `kube::Resource` impls (which the orphan rule lets
/// live only beside the trait or the type) are on this wrapper, which deserializes as the
/// object itself.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(transparent)]
struct Crd<T>(T);

/// The API server's names for a cluster-scoped CRD type, so that kube-rs can list and watch
/// it (`/apis/GROUP/VERSION/PLURAL`), from the constants of the type's module.
macro_rules! cluster_scoped_crd {
    ($ty:ty, $module:ident) => {
        impl kube::Resource for Crd<$ty> {
            type DynamicType = ();
            type Scope = k8s_openapi::ClusterResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($module::KIND)
            }

            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($module::GROUP)
            }

            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($module::VERSION)
            }

            fn api_version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($module::API_VERSION)
            }

            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($module::PLURAL)
            }

            fn meta(&self) -> &ObjectMeta {
                &self.0.metadata
            }

            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.0.metadata
            }
        }
    };
}

cluster_scoped_crd!(ClusterNetworkPolicy, cnp);
cluster_scoped_crd!(DropCidrSet, drop_cidrs);
cluster_scoped_crd!(HostPolicy, host_policy);

/// The watch of a kind a CRD serves (ClusterNetworkPolicy, DropCIDRSet, HostPolicy): a `404` (no CRD) is
/// an empty list (module documentation).
fn crd_stream<K>(
    kind: Kind,
    api: Api<K>,
    config: watcher::Config,
    wrap: fn(K) -> Object,
) -> BoxStream<'static, KindEvent>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + fmt::Debug
        + Send
        + 'static,
{
    let served = format!("{} {}", K::api_version(&()), K::plural(&()));
    // The CRD was found missing and no answer has come since.
    let mut absent = false;
    watcher::watcher(api, config)
        .default_backoff()
        .map(move |item| match item {
            // Every retry of the list starts with `Init`; while the CRD is missing that
            // announces nothing (the empty list was announced), so it is held back until the
            // list brings something.
            Ok(Event::Init) if absent => Vec::new(),
            Ok(event) => {
                let mut out = Vec::new();
                if std::mem::take(&mut absent) {
                    info!(%kind, "the CRD is served now");
                    if matches!(event, Event::InitApply(_) | Event::InitDone) {
                        out.push(KindEvent {
                            kind,
                            event: Event::Init,
                        });
                    }
                }
                out.push(KindEvent {
                    kind,
                    event: map_event(event, wrap),
                });
                out
            }
            Err(e) if crd_missing(&e) => {
                if absent {
                    debug!(%kind, error = %e, "still not served; retrying with backoff");
                    return Vec::new();
                }
                absent = true;
                warn!(
                    %kind,
                    "the API server does not serve {served} (CRD not installed): running \
                     without them, and watching for the CRD with backoff"
                );
                vec![
                    KindEvent {
                        kind,
                        event: Event::Init,
                    },
                    KindEvent {
                        kind,
                        event: Event::InitDone,
                    },
                ]
            }
            Err(e) => {
                warn!(%kind, error = %e, "watch failed; retrying with backoff");
                Vec::new()
            }
        })
        .flat_map(futures::stream::iter)
        .boxed()
}

/// Is this the API server saying it does not serve the resource at all?
fn crd_missing(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.is_not_found(),
        watcher::Error::WatchError(s) => s.is_not_found(),
        _ => false,
    }
}

fn map_event<K>(event: Event<K>, wrap: fn(K) -> Object) -> Event<Object> {
    match event {
        Event::Apply(o) => Event::Apply(wrap(o)),
        Event::Delete(o) => Event::Delete(wrap(o)),
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(wrap(o)),
        Event::InitDone => Event::InitDone,
    }
}

/// The metadata every kind keeps: identity, version, labels.
fn slim_meta(meta: ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        generation: meta.generation,
        labels: meta.labels,
        ..ObjectMeta::default()
    }
}

pub fn slim_namespace(ns: Namespace) -> Namespace {
    Namespace {
        metadata: slim_meta(ns.metadata),
        ..Namespace::default()
    }
}

/// What [`weir_compiler::PodInfo::from_pod`] reads: labels, node, host network, phase, IPs,
/// and the named ports of containers and restartable init containers (sidecars).
pub fn slim_pod(pod: Pod) -> Pod {
    let container = |c: Container| Container {
        name: c.name,
        ports: c.ports,
        restart_policy: c.restart_policy,
        ..Container::default()
    };
    Pod {
        metadata: ObjectMeta {
            // Terminating pods are still Service backends, in their own state.
            deletion_timestamp: pod.metadata.deletion_timestamp.clone(),
            ..slim_meta(pod.metadata)
        },
        spec: pod.spec.map(|s| PodSpec {
            node_name: s.node_name,
            host_network: s.host_network,
            containers: s.containers.into_iter().map(container).collect(),
            init_containers: s.init_containers.map(|cs| {
                cs.into_iter()
                    .filter(|c| c.restart_policy.as_deref() == Some("Always"))
                    .map(container)
                    .collect()
            }),
            ..PodSpec::default()
        }),
        status: pod.status.map(|s| PodStatus {
            phase: s.phase,
            pod_ip: s.pod_ip,
            pod_ips: s.pod_ips,
            // Readiness decides whether the pod is a Service backend.
            conditions: s
                .conditions
                .map(|cs| cs.into_iter().filter(|c| c.type_ == "Ready").collect()),
            ..PodStatus::default()
        }),
    }
}

/// Nodes keep spec (pod CIDRs, taints) and status addresses; the image list, volume lists
/// and conditions go.
pub fn slim_node(node: Node) -> Node {
    Node {
        metadata: slim_meta(node.metadata),
        spec: node.spec,
        status: node.status.map(|s| NodeStatus {
            addresses: s.addresses,
            daemon_endpoints: s.daemon_endpoints,
            node_info: s.node_info,
            ..NodeStatus::default()
        }),
    }
}

/// ClusterNetworkPolicies keep their spec (unknown fields included, so that validation can
/// fail closed on them); the status, written by implementations, is not read.
pub fn slim_cluster_policy(cnp: ClusterNetworkPolicy) -> ClusterNetworkPolicy {
    ClusterNetworkPolicy {
        metadata: slim_meta(cnp.metadata),
        status: None,
        ..cnp
    }
}

pub fn slim_policy(np: NetworkPolicy) -> NetworkPolicy {
    NetworkPolicy {
        metadata: slim_meta(np.metadata),
        spec: np.spec,
    }
}

/// Services keep their spec; the status (load-balancer ingress) is not read.
pub fn slim_service(svc: Service) -> Service {
    Service {
        metadata: slim_meta(svc.metadata),
        spec: svc.spec,
        status: None,
    }
}

pub fn slim_endpoint_slice(slice: EndpointSlice) -> EndpointSlice {
    EndpointSlice {
        metadata: slim_meta(slice.metadata),
        ..slice
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slim_pod_keeps_what_the_compiler_reads() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web", "namespace": "prod", "uid": "u1", "resourceVersion": "7",
                "labels": {"app": "web"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"},
                "managedFields": [{"manager": "kubectl"}],
            },
            "spec": {
                "nodeName": "node-1",
                "containers": [{"name": "c", "image": "nginx", "env": [{"name": "A", "value": "b"}],
                                "ports": [{"name": "http", "containerPort": 80}]}],
                "initContainers": [
                    {"name": "setup", "image": "busybox"},
                    {"name": "proxy", "image": "envoy", "restartPolicy": "Always",
                     "ports": [{"name": "admin", "containerPort": 9901}]},
                ],
                "volumes": [{"name": "v", "emptyDir": {}}],
            },
            "status": {"phase": "Running", "podIP": "10.0.0.2", "podIPs": [{"ip": "10.0.0.2"}],
                       "conditions": [{"type": "Ready", "status": "False"},
                                      {"type": "PodScheduled", "status": "True"}]},
        }))
        .unwrap();
        let before = weir_compiler::PodInfo::from_pod(&pod).unwrap();
        let slim = slim_pod(pod);
        assert_eq!(weir_compiler::PodInfo::from_pod(&slim).unwrap(), before);
        assert!(slim.metadata.annotations.is_none());
        assert!(slim.metadata.managed_fields.is_none());
        let spec = slim.spec.unwrap();
        assert!(spec.volumes.is_none());
        assert_eq!(spec.containers[0].image, None);
        assert_eq!(spec.init_containers.unwrap().len(), 1, "only the sidecar");
        assert_eq!(
            slim.status.unwrap().conditions.unwrap().len(),
            1,
            "only the Ready condition"
        );
    }
}
