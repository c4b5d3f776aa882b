//! A [`Driver`] for a real cluster, through the Kubernetes API, shaped like the upstream
//! NetworkPolicy e2e suite (`test/e2e/network/netpol`: `model.go`, `kubemanager.go`):
//!
//! * every model namespace is created with the model's labels, and in it every model pod,
//!   with one agnhost container per (port, protocol) — `serve-hostname --tcp|--udp` for TCP
//!   and UDP, `porter` with `SERVE_SCTP_PORT_<port>` for SCTP — named `cont-<port>-<proto>`,
//!   its port named `serve-<port>-<proto>` (so named ports in policies resolve);
//! * pods are spread round-robin over the schedulable nodes, so traffic crosses nodes;
//! * policies are applied with server-side apply (create or replace) and deleted through the
//!   API; labels are replaced with merge patches that also remove the keys that go away;
//! * a probe execs `agnhost connect <ip>:<port> --timeout=<ms>ms --protocol=<p>` in the
//!   client pod's first container, as upstream does, many at a time.
//!
//! [`Driver::sync`] waits a fixed settle time: weir publishes no "state applied on every
//! node" status yet. The runner's re-probe rules absorb slower propagation without turning a
//! real failure into a pass (an expected deny that connects is re-probed after a grace period
//! and must then be denied every time).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, Namespace, Node, Pod, PodSpec, SecurityContext,
};
use kube::{
    Api, Client,
    api::{
        ApiResource, AttachParams, DeleteParams, DynamicObject, GroupVersionKind, ListParams,
        Patch, PatchParams,
    },
    core::ObjectMeta,
    discovery::Scope,
    runtime::wait::await_condition,
};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use weir_conformance::{
    Family, Model, PodRef, ProbeOutcome, Protocol,
    cases::{Labels, ObjectRef},
    runner::{Driver, Probe},
};

/// The image upstream's suite uses for servers and probes.
pub const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.53";
/// The field manager of everything the driver applies.
const MANAGER: &str = "weir-e2e";
/// Time an exec may take beyond the probe's own timeout (API round trips, process start).
const EXEC_OVERHEAD: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what} did not happen within {timeout:?}: {detail}")]
    Timeout {
        what: &'static str,
        timeout: Duration,
        detail: String,
    },
    #[error("{what}: {source}")]
    Watch {
        what: String,
        #[source]
        source: kube::runtime::wait::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn api_error(what: impl Into<String>) -> impl FnOnce(kube::Error) -> DriverError {
    let what = what.into();
    move |source| DriverError::Api { what, source }
}

fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404)
}

#[derive(Clone, Debug)]
pub struct DriverOptions {
    /// Wait of [`Driver::sync`].
    pub settle: Duration,
    /// Probes running at once (each is an exec through the API server).
    pub concurrency: usize,
    /// How long pods may take to run, and namespaces to go away.
    pub ready_timeout: Duration,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            settle: Duration::from_secs(2),
            concurrency: 32,
            ready_timeout: Duration::from_secs(300),
        }
    }
}

/// An object created by [`Driver::apply`], to delete on [`Driver::reset`].
#[derive(Clone, Debug)]
struct Applied {
    resource: ApiResource,
    namespaced: bool,
}

pub struct KubeDriver {
    client: Client,
    model: Model,
    /// Each pod's address and the container probes run in.
    pods: BTreeMap<PodRef, (Option<IpAddr>, String)>,
    /// Objects applied since the last reset, by (kind, namespace, name).
    applied: BTreeMap<(String, Option<String>, String), Applied>,
    /// Resolved kinds, by (apiVersion, kind).
    kinds: BTreeMap<(String, String), Applied>,
    options: DriverOptions,
}

impl KubeDriver {
    /// Creates the model's namespaces and pods and waits until every pod runs and has an IP.
    pub async fn start(
        client: Client,
        model: &Model,
        options: &DriverOptions,
    ) -> Result<KubeDriver, DriverError> {
        let nodes: Api<Node> = Api::all(client.clone());
        let nodes = nodes
            .list(&ListParams::default())
            .await
            .map_err(api_error("listing nodes"))?;
        let mut names = schedulable_nodes(&nodes.items);
        if let Some(wanted) = model.nodes {
            names.truncate(wanted as usize);
        }
        let apply = PatchParams::apply(MANAGER).force();
        for namespace in &model.namespaces {
            let object = namespace_object(model, namespace);
            Api::<Namespace>::all(client.clone())
                .patch(namespace, &apply, &Patch::Apply(&object))
                .await
                .map_err(api_error(format!("creating namespace {namespace}")))?;
        }
        let mut pods = BTreeMap::new();
        for (index, pod) in model.pod_refs().into_iter().enumerate() {
            let node = (!names.is_empty()).then(|| names[index % names.len()].as_str());
            let object = pod_object(model, &pod, node);
            let container = object
                .spec
                .as_ref()
                .and_then(|s| s.containers.first())
                .map(|c| c.name.clone())
                .unwrap_or_default();
            Api::<Pod>::namespaced(client.clone(), &pod.namespace)
                .patch(&pod.name, &apply, &Patch::Apply(&object))
                .await
                .map_err(api_error(format!("creating pod {pod}")))?;
            pods.insert(pod, (None, container));
        }
        let mut driver = KubeDriver {
            client,
            model: model.clone(),
            pods,
            applied: BTreeMap::new(),
            kinds: BTreeMap::new(),
            options: options.clone(),
        };
        driver.wait_for_pods().await?;
        Ok(driver)
    }

    /// Waits (watching each pod, not polling) until every test pod runs, is ready and has
    /// an address.
    async fn wait_for_pods(&mut self) -> Result<(), DriverError> {
        let timeout = self.options.ready_timeout;
        let waits = self.pods.keys().cloned().map(|pod| {
            let api = Api::<Pod>::namespaced(self.client.clone(), &pod.namespace);
            async move {
                let running = |p: Option<&Pod>| p.and_then(running_ip).is_some();
                let found =
                    tokio::time::timeout(timeout, await_condition(api, &pod.name, running)).await;
                (pod, found)
            }
        });
        let mut waiting = Vec::new();
        for (pod, found) in futures::future::join_all(waits).await {
            match found {
                Ok(Ok(Some(object))) => {
                    if let Some(entry) = self.pods.get_mut(&pod) {
                        entry.0 = running_ip(&object);
                    }
                }
                Ok(Err(source)) => {
                    return Err(DriverError::Watch {
                        what: format!("watching pod {pod}"),
                        source,
                    });
                }
                Ok(Ok(None)) | Err(_) => waiting.push(pod.to_string()),
            }
        }
        if waiting.is_empty() {
            Ok(())
        } else {
            Err(DriverError::Timeout {
                what: "test pods running with an IP",
                timeout,
                detail: format!("still waiting for {}", waiting.join(", ")),
            })
        }
    }

    /// Deletes the model's namespaces and waits until they are gone (so a next case file
    /// can create them again).
    pub async fn shutdown(self) -> Result<(), DriverError> {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        for namespace in &self.model.namespaces {
            match namespaces.delete(namespace, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(error) if is_not_found(&error) => {}
                Err(error) => {
                    return Err(api_error(format!("deleting namespace {namespace}"))(error));
                }
            }
        }
        let timeout = self.options.ready_timeout;
        for namespace in &self.model.namespaces {
            let gone = |n: Option<&Namespace>| n.is_none();
            match tokio::time::timeout(
                timeout,
                await_condition(namespaces.clone(), namespace, gone),
            )
            .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(source)) => {
                    return Err(DriverError::Watch {
                        what: format!("watching namespace {namespace}"),
                        source,
                    });
                }
                Err(_) => {
                    return Err(DriverError::Timeout {
                        what: "test namespaces deleted",
                        timeout,
                        detail: format!("{namespace} still exists"),
                    });
                }
            }
        }
        Ok(())
    }

    /// The API resource of `api_version`/`kind`, from discovery (cached).
    async fn resolve(&mut self, api_version: &str, kind: &str) -> Result<Applied, DriverError> {
        let key = (api_version.to_owned(), kind.to_owned());
        if let Some(found) = self.kinds.get(&key) {
            return Ok(found.clone());
        }
        let (group, version) = match api_version.split_once('/') {
            Some((group, version)) => (group, version),
            None => ("", api_version),
        };
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let (resource, capabilities) = kube::discovery::pinned_kind(&self.client, &gvk)
            .await
            .map_err(api_error(format!(
                "finding {api_version} {kind} in the API"
            )))?;
        let applied = Applied {
            resource,
            namespaced: capabilities.scope == Scope::Namespaced,
        };
        self.kinds.insert(key, applied.clone());
        Ok(applied)
    }

    fn dynamic_api(&self, applied: &Applied, namespace: Option<&str>) -> Api<DynamicObject> {
        match (applied.namespaced, namespace) {
            (true, Some(namespace)) => {
                Api::namespaced_with(self.client.clone(), namespace, &applied.resource)
            }
            _ => Api::all_with(self.client.clone(), &applied.resource),
        }
    }

    async fn replace_labels<K>(
        &self,
        api: Api<K>,
        name: &str,
        desired: &Labels,
    ) -> Result<(), DriverError>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let current = api
            .get(name)
            .await
            .map_err(api_error(format!("reading {name}")))?;
        let patch = labels_patch(current.meta().labels.as_ref(), desired);
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(api_error(format!("labelling {name}")))?;
        Ok(())
    }

    async fn probe_one(&self, probe: &Probe) -> ProbeOutcome {
        let Some((_, container)) = self.pods.get(&probe.from) else {
            return ProbeOutcome::Error(format!("{} is not a pod of the model", probe.from));
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &probe.from.namespace);
        let command = connect_command(probe.target, probe.protocol, probe.timeout);
        let params = AttachParams::default()
            .container(container.as_str())
            .stdout(false)
            .stderr(true);
        let exec = async {
            let mut process = pods.exec(&probe.from.name, command, &params).await?;
            let mut stderr = String::new();
            if let Some(mut reader) = process.stderr() {
                // A broken stream only loses the message; the status still tells.
                let _ = reader.read_to_string(&mut stderr).await;
            }
            let status = match process.take_status() {
                Some(status) => status.await,
                None => None,
            };
            // The status arrived; an error tearing down the stream changes nothing.
            let _ = process.join().await;
            Ok::<_, kube::Error>((status, stderr))
        };
        match tokio::time::timeout(probe.timeout + EXEC_OVERHEAD, exec).await {
            Err(_) => ProbeOutcome::Error(format!(
                "exec in {} did not finish within {:?}",
                probe.from,
                probe.timeout + EXEC_OVERHEAD
            )),
            Ok(Err(error)) => ProbeOutcome::Error(format!("exec in {}: {error}", probe.from)),
            Ok(Ok((status, stderr))) => {
                let status = status.unwrap_or_default();
                match (status.status.as_deref(), status.reason.as_deref()) {
                    (Some("Success"), _) => ProbeOutcome::Connected,
                    (_, Some("NonZeroExitCode")) => classify_failure(&stderr),
                    _ => ProbeOutcome::Error(format!(
                        "exec in {} failed: {} {}",
                        probe.from,
                        status.message.unwrap_or_default(),
                        stderr.trim()
                    )),
                }
            }
        }
    }
}

impl Driver for KubeDriver {
    type Error = DriverError;

    /// The kind cluster is IPv4 (its pods' IPv4 address is the one recorded).
    async fn pod_ip(&self, pod: &PodRef, family: Family) -> Option<IpAddr> {
        self.pods
            .get(pod)
            .and_then(|(ip, _)| *ip)
            .filter(|ip| family.holds(ip))
    }

    async fn reset(&mut self) -> Result<(), DriverError> {
        let applied = std::mem::take(&mut self.applied);
        for ((kind, namespace, name), resource) in applied {
            match self
                .dynamic_api(&resource, namespace.as_deref())
                .delete(&name, &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(error) if is_not_found(&error) => {}
                Err(error) => return Err(api_error(format!("deleting {kind} {name}"))(error)),
            }
        }
        // Like upstream's cleanNetworkPolicies: nothing left from a case that failed midway.
        for namespace in &self.model.namespaces {
            let policies: Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
                Api::namespaced(self.client.clone(), namespace);
            let listed = policies
                .list(&ListParams::default())
                .await
                .map_err(api_error(format!("listing policies of {namespace}")))?;
            for policy in listed.items {
                let name = policy.metadata.name.unwrap_or_default();
                match policies.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(error) if is_not_found(&error) => {}
                    Err(error) => {
                        return Err(api_error(format!("deleting policy {namespace}/{name}"))(
                            error,
                        ));
                    }
                }
            }
        }
        for namespace in self.model.namespaces.clone() {
            let labels = self.model.namespace_labels(&namespace);
            self.set_namespace_labels(&namespace, labels).await?;
        }
        for pod in self.model.pod_refs() {
            let labels = self.model.pod_labels(&pod);
            self.set_pod_labels(&pod, labels).await?;
        }
        Ok(())
    }

    async fn set_pod_labels(&mut self, pod: &PodRef, labels: Labels) -> Result<(), DriverError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        self.replace_labels(api, &pod.name, &labels).await
    }

    async fn set_namespace_labels(
        &mut self,
        namespace: &str,
        labels: Labels,
    ) -> Result<(), DriverError> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        self.replace_labels(api, namespace, &labels).await
    }

    async fn apply(&mut self, object: Value) -> Result<(), DriverError> {
        let field = |path: &str| {
            object
                .pointer(path)
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let (Some(api_version), Some(kind), Some(name)) = (
            field("/apiVersion"),
            field("/kind"),
            field("/metadata/name"),
        ) else {
            return Err(DriverError::Invalid(
                "an applied object needs apiVersion, kind and metadata.name".into(),
            ));
        };
        let namespace = field("/metadata/namespace");
        let resolved = self.resolve(&api_version, &kind).await?;
        if resolved.namespaced && namespace.is_none() {
            return Err(DriverError::Invalid(format!(
                "{kind} {name} is namespaced but names no namespace"
            )));
        }
        let namespace = namespace.filter(|_| resolved.namespaced);
        self.dynamic_api(&resolved, namespace.as_deref())
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&object),
            )
            .await
            .map_err(api_error(format!("applying {kind} {name}")))?;
        self.applied.insert((kind, namespace, name), resolved);
        Ok(())
    }

    async fn delete(&mut self, object: &ObjectRef) -> Result<(), DriverError> {
        let key = (
            object.kind.clone(),
            object.namespace.clone(),
            object.name.clone(),
        );
        let resolved = match self.applied.remove(&key) {
            Some(resolved) => resolved,
            None => {
                let known = self
                    .kinds
                    .iter()
                    .find(|((_, kind), _)| *kind == object.kind)
                    .map(|(_, resolved)| resolved.clone());
                match known {
                    Some(resolved) => resolved,
                    None if object.kind == "NetworkPolicy" => {
                        self.resolve("networking.k8s.io/v1", "NetworkPolicy")
                            .await?
                    }
                    None => {
                        return Err(DriverError::Invalid(format!(
                            "cannot delete {object}: kind {} was never applied",
                            object.kind
                        )));
                    }
                }
            }
        };
        self.dynamic_api(&resolved, object.namespace.as_deref())
            .delete(&object.name, &DeleteParams::default())
            .await
            .map_err(api_error(format!("deleting {object}")))?;
        Ok(())
    }

    async fn sync(&mut self) -> Result<(), DriverError> {
        tokio::time::sleep(self.options.settle).await;
        Ok(())
    }

    async fn probe(&self, probes: &[Probe]) -> Vec<ProbeOutcome> {
        // Owned probes: a closure over borrowed ones trips the compiler's check that the
        // future is Send for every lifetime.
        stream::iter(probes.to_vec())
            .map(|probe| async move { self.probe_one(&probe).await })
            .buffered(self.options.concurrency.max(1))
            .collect()
            .await
    }
}

/// Nodes test pods may run on: not cordoned, no NoSchedule/NoExecute taint (the kind
/// control plane has one), sorted by name; all nodes if none qualifies.
fn schedulable_nodes(nodes: &[Node]) -> Vec<String> {
    let name = |node: &Node| node.metadata.name.clone().unwrap_or_default();
    let mut names: Vec<String> = nodes
        .iter()
        .filter(|node| {
            let spec = node.spec.clone().unwrap_or_default();
            spec.unschedulable != Some(true)
                && !spec
                    .taints
                    .iter()
                    .flatten()
                    .any(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        })
        .map(name)
        .collect();
    if names.is_empty() {
        names = nodes.iter().map(name).collect();
    }
    names.sort();
    names
}

fn namespace_object(model: &Model, namespace: &str) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(namespace.to_owned()),
            labels: Some(model.namespace_labels(namespace)),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

/// Upstream's container name for a (port, protocol): `cont-80-tcp`.
fn container_name(port: u16, protocol: Protocol) -> String {
    format!("cont-{port}-{}", protocol.as_str().to_lowercase())
}

/// A model pod as upstream's `Pod.KubePod` builds it, pinned to `node` when given.
fn pod_object(model: &Model, pod: &PodRef, node: Option<&str>) -> Pod {
    let containers = model
        .container_ports()
        .into_iter()
        .map(|(port_name, port, protocol)| {
            let (command, env) = match protocol {
                Protocol::Tcp | Protocol::Udp => (
                    vec![
                        "/agnhost".to_owned(),
                        "serve-hostname".to_owned(),
                        if protocol == Protocol::Tcp {
                            "--tcp"
                        } else {
                            "--udp"
                        }
                        .to_owned(),
                        "--http=false".to_owned(),
                        "--port".to_owned(),
                        port.to_string(),
                    ],
                    None,
                ),
                Protocol::Sctp => (
                    vec!["/agnhost".to_owned(), "porter".to_owned()],
                    Some(vec![EnvVar {
                        name: format!("SERVE_SCTP_PORT_{port}"),
                        value: Some("foo".to_owned()),
                        ..EnvVar::default()
                    }]),
                ),
            };
            Container {
                name: container_name(port, protocol),
                image: Some(AGNHOST.to_owned()),
                image_pull_policy: Some("IfNotPresent".to_owned()),
                command: Some(command),
                env,
                ports: Some(vec![ContainerPort {
                    container_port: i32::from(port),
                    name: Some(port_name),
                    protocol: Some(protocol.as_str().to_owned()),
                    ..ContainerPort::default()
                }]),
                security_context: Some(SecurityContext::default()),
                ..Container::default()
            }
        })
        .collect();
    Pod {
        metadata: ObjectMeta {
            name: Some(pod.name.clone()),
            namespace: Some(pod.namespace.clone()),
            labels: Some(model.pod_labels(pod)),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            termination_grace_period_seconds: Some(0),
            containers,
            node_selector: node.map(|node| {
                BTreeMap::from([("kubernetes.io/hostname".to_owned(), node.to_owned())])
            }),
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

/// The pod's IP (its IPv4 one in a dual-stack cluster) once it runs with every container
/// ready.
fn running_ip(pod: &Pod) -> Option<IpAddr> {
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready {
        return None;
    }
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        ips.extend(
            status
                .pod_ip
                .as_deref()
                .and_then(|ip| ip.parse::<IpAddr>().ok()),
        );
    }
    ips.iter().find(|ip| ip.is_ipv4()).or(ips.first()).copied()
}

/// Upstream's probe: `agnhost connect <ip>:<port> --timeout=… --protocol=…`.
fn connect_command(target: SocketAddr, protocol: Protocol, timeout: Duration) -> Vec<String> {
    vec![
        "/agnhost".to_owned(),
        "connect".to_owned(),
        // SocketAddr brackets IPv6 addresses, like Go's net.JoinHostPort.
        target.to_string(),
        format!("--timeout={}ms", timeout.as_millis().max(1)),
        format!("--protocol={}", protocol.as_str().to_lowercase()),
    ]
}

/// The outcome of an `agnhost connect` that exited non-zero, from the fixed prefixes it
/// prints (`test/images/agnhost/connect/connect.go`): TIMEOUT, REFUSED, and OTHER/UNKNOWN
/// with the Go error text (SCTP aborts and UDP ICMP errors arrive that way).
fn classify_failure(stderr: &str) -> ProbeOutcome {
    let text = stderr.trim();
    let lower = text.to_lowercase();
    if text.starts_with("TIMEOUT") || lower.contains("i/o timeout") {
        ProbeOutcome::TimedOut
    } else if text.starts_with("REFUSED") || lower.contains("connection refused") {
        ProbeOutcome::Refused
    } else if lower.contains("no route to host")
        || lower.contains("network is unreachable")
        || lower.contains("host is unreachable")
    {
        ProbeOutcome::Unreachable
    } else {
        ProbeOutcome::Error(format!("agnhost connect: {text}"))
    }
}

/// A merge patch that makes a label map exactly `desired`: keys that go away are set to
/// null (RFC 7386), the others to their value.
fn labels_patch(current: Option<&BTreeMap<String, String>>, desired: &Labels) -> Value {
    let mut labels = serde_json::Map::new();
    for key in current.into_iter().flat_map(|c| c.keys()) {
        if !desired.contains_key(key) {
            labels.insert(key.clone(), Value::Null);
        }
    }
    for (key, value) in desired {
        labels.insert(key.clone(), Value::String(value.clone()));
    }
    json!({"metadata": {"labels": labels}})
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeSpec, PodCondition, PodIP, PodStatus, Taint};

    use super::*;

    fn model() -> Model {
        Model {
            namespaces: vec!["x".into(), "y".into()],
            pods: vec!["a".into(), "b".into()],
            ports: vec![80, 81],
            protocols: vec![Protocol::Tcp, Protocol::Udp, Protocol::Sctp],
            nodes: None,
            topology: None,
        }
    }

    #[test]
    fn probes_are_upstreams_agnhost_connect() {
        let target: SocketAddr = "10.244.1.5:80".parse().unwrap();
        assert_eq!(
            connect_command(target, Protocol::Sctp, Duration::from_secs(1)),
            [
                "/agnhost",
                "connect",
                "10.244.1.5:80",
                "--timeout=1000ms",
                "--protocol=sctp"
            ]
        );
        let v6: SocketAddr = "[fd00::5]:81".parse().unwrap();
        assert_eq!(
            connect_command(v6, Protocol::Udp, Duration::from_millis(1500))[2..],
            ["[fd00::5]:81", "--timeout=1500ms", "--protocol=udp"]
        );
    }

    #[test]
    fn agnhost_failures_map_to_outcomes() {
        assert_eq!(classify_failure("TIMEOUT\n"), ProbeOutcome::TimedOut);
        assert_eq!(
            classify_failure("TIMEOUT: read udp 10.0.0.1:5->10.0.0.2:80: i/o timeout"),
            ProbeOutcome::TimedOut
        );
        assert_eq!(classify_failure("REFUSED\n"), ProbeOutcome::Refused);
        assert_eq!(
            classify_failure("OTHER: connection refused"),
            ProbeOutcome::Refused,
            "an SCTP ABORT"
        );
        assert_eq!(
            classify_failure("OTHER: dial tcp 10.0.0.2:80: connect: no route to host"),
            ProbeOutcome::Unreachable
        );
        assert!(matches!(
            classify_failure("DNS: lookup nowhere: no such host"),
            ProbeOutcome::Error(message) if message.contains("no such host")
        ));
    }

    #[test]
    fn pods_serve_every_port_and_protocol_like_upstream() {
        let model = model();
        let pod = pod_object(&model, &PodRef::new("x", "a"), Some("worker-2"));
        assert_eq!(
            pod.metadata.labels,
            Some(model.pod_labels(&PodRef::new("x", "a")))
        );
        let spec = pod.spec.unwrap();
        assert_eq!(
            spec.node_selector.unwrap()["kubernetes.io/hostname"],
            "worker-2"
        );
        let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "cont-80-tcp",
                "cont-80-udp",
                "cont-80-sctp",
                "cont-81-tcp",
                "cont-81-udp",
                "cont-81-sctp"
            ]
        );
        let udp = &spec.containers[1];
        assert_eq!(
            udp.command.as_deref().unwrap(),
            [
                "/agnhost",
                "serve-hostname",
                "--udp",
                "--http=false",
                "--port",
                "80"
            ]
        );
        let port = &udp.ports.as_ref().unwrap()[0];
        assert_eq!(port.name.as_deref(), Some("serve-80-udp"));
        assert_eq!(port.protocol.as_deref(), Some("UDP"));
        let sctp = &spec.containers[5];
        assert_eq!(sctp.command.as_deref().unwrap(), ["/agnhost", "porter"]);
        assert_eq!(sctp.env.as_ref().unwrap()[0].name, "SERVE_SCTP_PORT_81");
        assert!(
            spec.containers
                .iter()
                .all(|c| c.image.as_deref() == Some(AGNHOST))
        );
    }

    #[test]
    fn namespaces_carry_the_model_labels() {
        let namespace = namespace_object(&model(), "y");
        assert_eq!(
            namespace.metadata.labels.unwrap(),
            BTreeMap::from([
                ("ns".to_owned(), "y".to_owned()),
                ("kubernetes.io/metadata.name".to_owned(), "y".to_owned()),
            ])
        );
    }

    #[test]
    fn label_patches_remove_keys_that_go_away() {
        let current = BTreeMap::from([
            ("pod".to_owned(), "a".to_owned()),
            ("extra".to_owned(), "1".to_owned()),
        ]);
        let desired = Labels::from([("pod".to_owned(), "b".to_owned())]);
        assert_eq!(
            labels_patch(Some(&current), &desired),
            json!({"metadata": {"labels": {"pod": "b", "extra": null}}})
        );
    }

    fn node(name: &str, taint: Option<&str>, cordoned: bool) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                unschedulable: cordoned.then_some(true),
                taints: taint.map(|effect| {
                    vec![Taint {
                        key: "node-role.kubernetes.io/control-plane".into(),
                        effect: effect.into(),
                        ..Taint::default()
                    }]
                }),
                ..NodeSpec::default()
            }),
            ..Node::default()
        }
    }

    #[test]
    fn test_pods_avoid_tainted_and_cordoned_nodes() {
        let nodes = [
            node("worker-2", None, false),
            node("control-plane", Some("NoSchedule"), false),
            node("worker", Some("PreferNoSchedule"), false),
            node("cordoned", None, true),
        ];
        assert_eq!(schedulable_nodes(&nodes), ["worker", "worker-2"]);
        let only_tainted = [node("control-plane", Some("NoSchedule"), false)];
        assert_eq!(schedulable_nodes(&only_tainted), ["control-plane"]);
    }

    fn pod_with(phase: &str, ready: bool, ips: &[&str]) -> Pod {
        Pod {
            status: Some(PodStatus {
                phase: Some(phase.to_owned()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..PodCondition::default()
                }]),
                pod_ips: Some(
                    ips.iter()
                        .map(|ip| PodIP {
                            ip: (*ip).to_owned(),
                        })
                        .collect(),
                ),
                ..PodStatus::default()
            }),
            ..Pod::default()
        }
    }

    #[test]
    fn a_pod_counts_once_running_and_ready_with_its_ipv4_address() {
        assert_eq!(
            running_ip(&pod_with("Running", true, &["fd00::7", "10.244.1.7"])),
            Some("10.244.1.7".parse().unwrap())
        );
        assert_eq!(
            running_ip(&pod_with("Running", false, &["10.244.1.7"])),
            None
        );
        assert_eq!(
            running_ip(&pod_with("Pending", true, &["10.244.1.7"])),
            None
        );
        assert_eq!(
            running_ip(&pod_with("Running", true, &["fd00::7"])),
            Some("fd00::7".parse().unwrap())
        );
    }
}
