//! Tests of the renderer, then of `manifests/` itself: every object is a valid typed
//! Kubernetes object, every reference between objects resolves, RBAC is least privilege and
//! names real resources, and the manifests agree with the image `cargo xtask image` builds and
//! with the CNI plugin's configuration parser.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    Resource,
    api::{
        apps::v1::{DaemonSet, Deployment},
        authentication::v1::TokenReview,
        coordination::v1::Lease,
        core::v1::{
            ConfigMap, Container, Namespace, Node, Pod, PodSpec, Secret, Service, ServiceAccount,
        },
        discovery::v1::EndpointSlice,
        events::v1::Event,
        networking::v1::NetworkPolicy,
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use serde_json::{Value, json};

use super::*;
use crate::image;

// ---------------------------------------------------------------------------------------
// The renderer
// ---------------------------------------------------------------------------------------

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

const DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: app
  namespace: elsewhere
spec:
  selector:
    matchLabels: {app: x}
  template:
    metadata:
      labels: {app: x}
    spec:
      initContainers:
        - name: init
          image: registry.example:5000/tools:1
      containers:
        - name: main
          image: weir
        - name: side
          image: other:2
";

#[test]
fn namespace_applies_to_namespaced_objects_only() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "kustomization.yaml",
        "namespace: ns1\nresources: [a.yaml]\n",
    );
    write(
        dir.path(),
        "a.yaml",
        &format!(
            "{DEPLOYMENT}---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\n\
             metadata: {{name: r}}\nrules: []\n---\n"
        ),
    );
    let objects = render(dir.path()).unwrap();
    assert_eq!(objects.len(), 2, "the trailing empty document is skipped");
    let deployment = find(&objects, "Deployment", "app").unwrap();
    assert_eq!(namespace_of(deployment), Some("ns1"));
    let role = find(&objects, "ClusterRole", "r").unwrap();
    assert_eq!(namespace_of(role), None);
}

#[test]
fn labels_reach_templates_but_never_selectors() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "kustomization.yaml",
        "resources: [a.yaml]\nlabels:\n  - pairs: {team: net}\n    includeTemplates: true\n",
    );
    write(dir.path(), "a.yaml", DEPLOYMENT);
    let objects = render(dir.path()).unwrap();
    let deployment = &objects[0];
    assert_eq!(deployment["metadata"]["labels"]["team"], "net");
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["labels"],
        json!({"app": "x", "team": "net"})
    );
    assert_eq!(
        deployment["spec"]["selector"]["matchLabels"],
        json!({"app": "x"})
    );
}

#[test]
fn images_are_overridden_by_name_like_kustomize() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "kustomization.yaml",
        "resources: [a.yaml]\nimages:\n  - name: weir\n    newName: reg.example/weir\n    \
         newTag: v1\n  - name: registry.example:5000/tools\n    digest: sha256:abc\n",
    );
    write(dir.path(), "a.yaml", DEPLOYMENT);
    let objects = render(dir.path()).unwrap();
    let spec = &objects[0]["spec"]["template"]["spec"];
    assert_eq!(spec["containers"][0]["image"], "reg.example/weir:v1");
    assert_eq!(
        spec["containers"][1]["image"], "other:2",
        "unmatched names stay"
    );
    assert_eq!(
        spec["initContainers"][0]["image"],
        "registry.example:5000/tools@sha256:abc"
    );
}

#[test]
fn image_references_split_at_the_tag_not_the_registry_port() {
    assert_eq!(
        split_image("registry.example:5000/weir"),
        ("registry.example:5000/weir", None, None)
    );
    assert_eq!(split_image("weir:dev"), ("weir", Some("dev"), None));
    assert_eq!(
        split_image("a/weir:dev@sha256:1"),
        ("a/weir", Some("dev"), Some("sha256:1"))
    );
}

#[test]
fn an_overlay_directory_is_rendered_after_its_base() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let overlay = dir.path().join("overlay");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::create_dir_all(&overlay).unwrap();
    write(
        &base,
        "kustomization.yaml",
        "resources: [a.yaml]\nimages: [{name: weir, newTag: dev}]\n",
    );
    write(&base, "a.yaml", DEPLOYMENT);
    write(
        &overlay,
        "kustomization.yaml",
        "resources: [../base]\nimages: [{name: weir, newTag: e2e}]\n",
    );
    let objects = render(&overlay).unwrap();
    assert_eq!(
        objects[0]["spec"]["template"]["spec"]["containers"][0]["image"],
        "weir:e2e"
    );
}

#[test]
fn unsupported_kustomize_features_are_refused() {
    for (kustomization, expected) in [
        ("resources: []\ncommonLabels: {a: b}\n", "commonLabels"),
        // Only inline JSON 6902 patches with a kind/name target.
        (
            "resources: []\npatches: [{path: p.yaml, target: {kind: A, name: b}}]\n",
            "patches",
        ),
        (
            "resources: []\npatches: [{patch: '[]', target: {kind: A, name: b}}]\n",
            "no A b to patch",
        ),
        (
            "resources: []\nlabels: [{pairs: {a: b}, includeSelectors: true}]\n",
            "includeSelectors",
        ),
        ("kind: Component\n", "Kustomization"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "kustomization.yaml", kustomization);
        let error = render(dir.path()).unwrap_err().to_string();
        assert!(error.contains(expected), "{kustomization:?}: {error}");
    }
}

#[test]
fn kinds_of_unknown_scope_and_non_objects_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "kustomization.yaml", "resources: [a.yaml]\n");
    write(
        dir.path(),
        "a.yaml",
        "apiVersion: x/v1\nkind: Widget\nmetadata: {name: w}\n",
    );
    assert!(matches!(
        render(dir.path()),
        Err(RenderError::UnknownKind { .. })
    ));
    write(dir.path(), "a.yaml", "- just\n- a list\n");
    assert!(matches!(
        render(dir.path()),
        Err(RenderError::NotAnObject { .. })
    ));
    write(dir.path(), "a.yaml", "apiVersion: v1\nkind: ConfigMap\n");
    assert!(matches!(
        render(dir.path()),
        Err(RenderError::NotAnObject { .. })
    ));
}

#[test]
fn output_follows_kustomize_legacy_order() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "kustomization.yaml",
        "resources: [a.yaml, b.yaml]\n",
    );
    write(
        dir.path(),
        "a.yaml",
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: d}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: s}\n",
    );
    write(
        dir.path(),
        "b.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: n}\n",
    );
    let kinds: Vec<String> = render(dir.path())
        .unwrap()
        .iter()
        .map(|o| kind_of(o).to_owned())
        .collect();
    assert_eq!(kinds, ["Namespace", "ConfigMap", "Service", "DaemonSet"]);
}

// ---------------------------------------------------------------------------------------
// manifests/
// ---------------------------------------------------------------------------------------

const NAMESPACE: &str = "weir-system";

fn rendered() -> Vec<Value> {
    render(&crate::workspace_root().join("manifests")).expect("manifests/ renders")
}

/// Objects the controller creates at run time, which the manifests may refer to: the CA
/// Secret and the ConfigMap its certificate is published in (see controller-rbac.yaml).
const CREATED_AT_RUNTIME: &[(&str, &str)] = &[("Secret", "weir-ca"), ("ConfigMap", "weir-ca")];
/// Selectorless Services whose endpoints a workload writes at run time: the controller's
/// leader writes the EndpointSlice of `weir-controller` with its own address (its pod IP,
/// downward API `POD_IP`) and its container port.
const ENDPOINTS_WRITTEN_BY: &[(&str, &str)] = &[("weir-controller", "weir-controller")];

/// Collects every problem before failing, so one run reports them all.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check(&mut self, ok: bool, problem: impl FnOnce() -> String) {
        if !ok {
            self.0.push(problem());
        }
    }

    fn assert_none(self) {
        assert!(
            self.0.is_empty(),
            "manifests/ has problems:\n  {}",
            self.0.join("\n  ")
        );
    }
}

/// Parses `object` as `T` and serializes it back: any field the typed API does not know
/// (a typo, a field at the wrong level) is lost on the way and shows as a difference.
fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(
    object: &Value,
) -> Result<T, String> {
    let typed: T = serde_json::from_value(object.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    if &back != object {
        return Err(format!(
            "fields lost in the typed round trip:\n    written:  {object}\n    understood: {back}"
        ));
    }
    Ok(typed)
}

#[test]
fn every_object_is_a_valid_typed_kubernetes_object() {
    let mut problems = Problems::default();
    for object in &rendered() {
        let result = match kind_of(object) {
            "Namespace" => round_trip::<Namespace>(object).map(drop),
            "ServiceAccount" => round_trip::<ServiceAccount>(object).map(drop),
            "ClusterRole" => round_trip::<ClusterRole>(object).map(drop),
            "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(object).map(drop),
            "Role" => round_trip::<Role>(object).map(drop),
            "RoleBinding" => round_trip::<RoleBinding>(object).map(drop),
            "ConfigMap" => round_trip::<ConfigMap>(object).map(drop),
            "Service" => round_trip::<Service>(object).map(drop),
            "Deployment" => round_trip::<Deployment>(object).map(drop),
            "DaemonSet" => round_trip::<DaemonSet>(object).map(drop),
            "PodDisruptionBudget" => round_trip::<PodDisruptionBudget>(object).map(drop),
            // Vendored unchanged from upstream: it must parse as a CRD, but its schema keeps
            // spellings the typed API normalizes (numbers, defaults), so no round trip.
            "CustomResourceDefinition" => {
                serde_json::from_value::<CustomResourceDefinition>(object.clone())
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
            other => Err(format!("no typed check for kind {other}")),
        };
        if let Err(error) = result {
            problems
                .0
                .push(format!("{} {}: {error}", kind_of(object), name_of(object)));
        }
    }
    problems.assert_none();
}

#[test]
fn everything_lives_in_weir_system() {
    let objects = rendered();
    assert!(find(&objects, "Namespace", NAMESPACE).is_some());
    for object in &objects {
        let namespaced = KINDS
            .iter()
            .any(|(kind, namespaced)| *kind == kind_of(object) && *namespaced);
        let expected = namespaced.then_some(NAMESPACE);
        assert_eq!(
            namespace_of(object),
            expected,
            "{} {}",
            kind_of(object),
            name_of(object)
        );
    }
}

/// The workloads: (kind, name, pod template spec, pod template labels).
fn workloads(objects: &[Value]) -> Vec<(String, String, PodSpec, BTreeMap<String, String>)> {
    let mut out = Vec::new();
    for object in objects {
        let template = match kind_of(object) {
            "Deployment" => {
                serde_json::from_value::<Deployment>(object.clone())
                    .unwrap()
                    .spec
                    .unwrap()
                    .template
            }
            "DaemonSet" => {
                serde_json::from_value::<DaemonSet>(object.clone())
                    .unwrap()
                    .spec
                    .unwrap()
                    .template
            }
            _ => continue,
        };
        out.push((
            kind_of(object).to_owned(),
            name_of(object).to_owned(),
            template.spec.unwrap_or_default(),
            template.metadata.and_then(|m| m.labels).unwrap_or_default(),
        ));
    }
    out
}

fn all_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
}

fn exists(objects: &[Value], kind: &str, name: &str) -> bool {
    find(objects, kind, name).is_some() || CREATED_AT_RUNTIME.contains(&(kind, name))
}

fn config_map_has_key(objects: &[Value], name: &str, key: &str) -> bool {
    match find(objects, "ConfigMap", name) {
        Some(map) => map.pointer(&format!("/data/{key}")).is_some(),
        // Created at run time: its keys are the controller's (ca.crt).
        None => CREATED_AT_RUNTIME.contains(&("ConfigMap", name)) && key == "ca.crt",
    }
}

#[test]
fn every_reference_resolves() {
    let objects = rendered();
    let mut problems = Problems::default();
    for (kind, name, spec, labels) in workloads(&objects) {
        let at = format!("{kind} {name}");
        let account = spec.service_account_name.clone().unwrap_or_default();
        problems.check(exists(&objects, "ServiceAccount", &account), || {
            format!("{at}: ServiceAccount {account:?} does not exist")
        });
        let volumes: BTreeMap<String, _> = spec
            .volumes
            .iter()
            .flatten()
            .map(|v| (v.name.clone(), v))
            .collect();
        let mut mounted = BTreeSet::new();
        for container in all_containers(&spec) {
            let at = format!("{at} container {}", container.name);
            for mount in container.volume_mounts.iter().flatten() {
                mounted.insert(mount.name.clone());
                problems.check(volumes.contains_key(&mount.name), || {
                    format!("{at}: mounts undeclared volume {}", mount.name)
                });
            }
            for env in container.env.iter().flatten() {
                let source = env.value_from.as_ref();
                if let Some(key_ref) = source.and_then(|s| s.config_map_key_ref.as_ref()) {
                    problems.check(
                        key_ref.optional == Some(true)
                            || config_map_has_key(&objects, &key_ref.name, &key_ref.key),
                        || {
                            format!(
                                "{at}: env {} reads missing key {} of ConfigMap {}",
                                env.name, key_ref.key, key_ref.name
                            )
                        },
                    );
                }
                if let Some(key_ref) = source.and_then(|s| s.secret_key_ref.as_ref()) {
                    problems.check(exists(&objects, "Secret", &key_ref.name), || {
                        format!(
                            "{at}: env {} reads missing Secret {}",
                            env.name, key_ref.name
                        )
                    });
                }
            }
        }
        for (volume_name, volume) in &volumes {
            let at = format!("{at} volume {volume_name}");
            problems.check(mounted.contains(volume_name), || {
                format!("{at}: declared but never mounted")
            });
            let mut config_maps = Vec::new();
            if let Some(source) = &volume.config_map {
                config_maps.push(source.clone());
            }
            for projection in volume
                .projected
                .iter()
                .flat_map(|p| p.sources.iter().flatten())
            {
                if let Some(source) = &projection.config_map {
                    config_maps.push(k8s_openapi::api::core::v1::ConfigMapVolumeSource {
                        name: source.name.clone(),
                        items: source.items.clone(),
                        optional: source.optional,
                        ..Default::default()
                    });
                }
                problems.check(projection.secret.is_none(), || {
                    format!("{at}: projects a Secret (none is expected)")
                });
            }
            for source in config_maps {
                problems.check(exists(&objects, "ConfigMap", &source.name), || {
                    format!("{at}: ConfigMap {} does not exist", source.name)
                });
                for item in source.items.iter().flatten() {
                    problems.check(
                        config_map_has_key(&objects, &source.name, &item.key),
                        || format!("{at}: ConfigMap {} has no key {}", source.name, item.key),
                    );
                }
                if find(&objects, "ConfigMap", &source.name).is_none() {
                    problems.check(source.optional == Some(true), || {
                        format!(
                            "{at}: ConfigMap {} is created at run time, so its volume must be \
                             optional or the pod cannot start before it exists",
                            source.name
                        )
                    });
                }
            }
            problems.check(volume.secret.is_none(), || {
                format!("{at}: mounts a Secret (none is expected)")
            });
        }
        let selector = objects
            .iter()
            .find(|o| kind_of(o) == kind && name_of(o) == name)
            .and_then(|o| o.pointer("/spec/selector/matchLabels"))
            .cloned()
            .unwrap_or_default();
        let selector: BTreeMap<String, String> = serde_json::from_value(selector).unwrap();
        problems.check(
            !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
            || format!("{at}: selector {selector:?} does not match template labels {labels:?}"),
        );
    }

    for binding in objects
        .iter()
        .filter(|o| matches!(kind_of(o), "RoleBinding" | "ClusterRoleBinding"))
    {
        let at = format!("{} {}", kind_of(binding), name_of(binding));
        let role_kind = binding["roleRef"]["kind"].as_str().unwrap_or("");
        let role_name = binding["roleRef"]["name"].as_str().unwrap_or("");
        problems.check(
            (kind_of(binding) == "RoleBinding" || role_kind == "ClusterRole")
                && exists(&objects, role_kind, role_name)
                && find(&objects, role_kind, role_name).and_then(namespace_of)
                    == namespace_of(binding).filter(|_| role_kind == "Role"),
            || format!("{at}: roleRef {role_kind} {role_name} does not exist where it must"),
        );
        for subject in binding["subjects"].as_array().into_iter().flatten() {
            let subject_name = subject["name"].as_str().unwrap_or("");
            problems.check(
                subject["kind"] == "ServiceAccount"
                    && subject["namespace"] == NAMESPACE
                    && exists(&objects, "ServiceAccount", subject_name),
                || format!("{at}: subject {subject} is not a ServiceAccount of {NAMESPACE}"),
            );
        }
    }

    let workloads = workloads(&objects);
    for service in objects.iter().filter(|o| kind_of(o) == "Service") {
        let at = format!("Service {}", name_of(service));
        let selector: BTreeMap<String, String> =
            serde_json::from_value(service["spec"]["selector"].clone()).unwrap_or_default();
        let target = if selector.is_empty() {
            let writer = ENDPOINTS_WRITTEN_BY
                .iter()
                .find(|(s, _)| *s == name_of(service))
                .map(|(_, w)| *w);
            let found = workloads
                .iter()
                .find(|(kind, name, _, _)| kind == "Deployment" && Some(name.as_str()) == writer);
            if let Some((_, _, spec, _)) = found {
                // The slice holds the pod's own address: the writer must know it.
                problems.check(
                    spec.containers.iter().any(|c| {
                        c.env.iter().flatten().any(|e| {
                            e.name == "POD_IP"
                                && e.value_from
                                    .as_ref()
                                    .and_then(|v| v.field_ref.as_ref())
                                    .is_some_and(|f| f.field_path == "status.podIP")
                        })
                    }),
                    || format!("{at}: the writer of its endpoints does not get POD_IP"),
                );
            }
            found
        } else {
            workloads
                .iter()
                .find(|(_, _, _, labels)| selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
        };
        let Some((_, _, spec, _)) = target else {
            problems.0.push(format!(
                "{at}: selects no workload, and none writes its endpoints"
            ));
            continue;
        };
        for port in service["spec"]["ports"].as_array().into_iter().flatten() {
            // Kubernetes defaults targetPort to port.
            let target_port = match &port["targetPort"] {
                serde_json::Value::Null => &port["port"],
                t => t,
            };
            problems.check(
                spec.containers.iter().any(|c| {
                    c.ports.iter().flatten().any(|p| {
                        Some(p.container_port) == target_port.as_i64().map(|n| n as i32)
                            || (p.name.is_some() && p.name.as_deref() == target_port.as_str())
                    })
                }),
                || format!("{at}: targetPort {target_port} is no container port"),
            );
        }
    }

    for budget in objects
        .iter()
        .filter(|o| kind_of(o) == "PodDisruptionBudget")
    {
        let selector: BTreeMap<String, String> =
            serde_json::from_value(budget["spec"]["selector"]["matchLabels"].clone())
                .unwrap_or_default();
        problems.check(
            workloads
                .iter()
                .any(|(_, _, _, labels)| selector.iter().all(|(k, v)| labels.get(k) == Some(v))),
            || {
                format!(
                    "PodDisruptionBudget {}: selects no workload",
                    name_of(budget)
                )
            },
        );
    }
    problems.assert_none();
}

/// `$(NAME)` references in an env value.
fn env_references(value: &str) -> Vec<&str> {
    value
        .split("$(")
        .skip(1)
        .filter_map(|rest| rest.split_once(')').map(|(name, _)| name))
        .collect()
}

/// The variables the kubelet sets for a Service of the pod's namespace
/// (<https://kubernetes.io/docs/concepts/services-networking/service/#environment-variables>).
fn service_env_names(service: &Value) -> Vec<String> {
    let prefix = name_of(service).to_uppercase().replace('-', "_");
    let mut names = vec![
        format!("{prefix}_SERVICE_HOST"),
        format!("{prefix}_SERVICE_PORT"),
    ];
    for port in service["spec"]["ports"].as_array().into_iter().flatten() {
        if let Some(port_name) = port["name"].as_str() {
            names.push(format!(
                "{prefix}_SERVICE_PORT_{}",
                port_name.to_uppercase().replace('-', "_")
            ));
        }
    }
    names
}

#[test]
fn env_references_resolve_to_earlier_variables_or_services_created_first() {
    let objects = rendered();
    let mut problems = Problems::default();
    for (kind, name, spec, _) in workloads(&objects) {
        let position = |k: &str, n: &str| {
            objects
                .iter()
                .position(|o| kind_of(o) == k && name_of(o) == n)
        };
        let workload_at = position(&kind, &name);
        for container in all_containers(&spec) {
            let mut defined = BTreeSet::new();
            for env in container.env.iter().flatten() {
                for reference in env_references(env.value.as_deref().unwrap_or("")) {
                    let service = objects.iter().enumerate().find(|(_, o)| {
                        kind_of(o) == "Service"
                            && service_env_names(o).iter().any(|n| n == reference)
                    });
                    let ok = defined.contains(reference)
                        || service.is_some_and(|(at, _)| Some(at) < workload_at);
                    problems.check(ok, || {
                        format!(
                            "{kind} {name} container {}: env {} uses $({reference}), which is \
                             neither defined before it nor set by a Service applied earlier",
                            container.name, env.name
                        )
                    });
                }
                defined.insert(env.name.as_str());
            }
        }
    }
    problems.assert_none();
}

#[test]
fn probes_and_ports_name_ports_of_their_container() {
    let objects = rendered();
    let mut problems = Problems::default();
    for (kind, name, spec, _) in workloads(&objects) {
        for container in all_containers(&spec) {
            let at = format!("{kind} {name} container {}", container.name);
            let ports = container.ports.clone().unwrap_or_default();
            for port in &ports {
                // The kubelet copies containerPort to hostPort for host-network pods; a
                // different hostPort is rejected by the API server.
                problems.check(
                    spec.host_network != Some(true)
                        || port.host_port.is_none_or(|h| h == port.container_port),
                    || format!("{at}: hostPort differs from containerPort"),
                );
            }
            let probes = [
                ("readiness", &container.readiness_probe),
                ("liveness", &container.liveness_probe),
                ("startup", &container.startup_probe),
            ];
            for (which, probe) in probes {
                let Some(probe) = probe else { continue };
                let port = probe
                    .http_get
                    .as_ref()
                    .map(|h| h.port.clone())
                    .or_else(|| probe.tcp_socket.as_ref().map(|t| t.port.clone()));
                let Some(port) = port else { continue };
                let found = ports.iter().any(|p| match &port {
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => {
                        p.container_port == *n
                    }
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => {
                        p.name.as_deref() == Some(s)
                    }
                });
                problems.check(found, || {
                    format!("{at}: {which} probe port {port:?} is not a port of the container")
                });
            }
        }
    }
    problems.assert_none();
}

#[test]
fn containers_run_the_image_xtask_builds() {
    let objects = rendered();
    let expected_image = image::ImageRef::parse(image::DEFAULT_TAG).unwrap();
    let mut problems = Problems::default();
    for (kind, name, spec, _) in workloads(&objects) {
        for container in all_containers(&spec) {
            let at = format!("{kind} {name} container {}", container.name);
            let image_text = container.image.clone().unwrap_or_default();
            problems.check(
                image::ImageRef::parse(&image_text).is_ok_and(|i| i == expected_image),
                || format!("{at}: image {image_text:?} is not {}", image::DEFAULT_TAG),
            );
            let command = container.command.clone().unwrap_or_default();
            let program = command.first().map(String::as_str).unwrap_or("");
            let in_image = image::BINARIES
                .iter()
                .any(|b| program == format!("{}/{b}", image::BIN_DIR))
                || image::APPLETS
                    .iter()
                    .any(|a| program == format!("/bin/{a}"));
            problems.check(in_image, || {
                format!("{at}: command {program:?} is not a program of the image")
            });
            // Shell scripts may only run the image's applets (and shell builtins).
            if program == "/bin/sh" {
                let script = command.last().map(String::as_str).unwrap_or("");
                for line in script.lines().map(str::trim).filter(|l| !l.is_empty()) {
                    let word = line.split_whitespace().next().unwrap_or("");
                    problems.check(word == "set" || image::APPLETS.contains(&word), || {
                        format!("{at}: script runs {word:?}, which the image does not have")
                    });
                }
            }
        }
    }
    let kustomization: Value = serde_norway::from_str(
        &std::fs::read_to_string(crate::workspace_root().join("manifests/kustomization.yaml"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(kustomization["images"][0]["name"], image::IMAGE_NAME);
    assert_eq!(
        kustomization["images"][0]["newTag"],
        expected_image.tag(),
        "the kustomization's images: entry sets the tag xtask image builds"
    );
    problems.assert_none();
}

/// What an RBAC API resource supports (from API discovery, `kubectl api-resources -o wide`),
/// named through k8s-openapi so that group and plural cannot be misspelled.
struct ApiResource {
    group: &'static str,
    plural: &'static str,
    namespaced: bool,
    verbs: &'static [&'static str],
}

const ALL_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

fn api<T: Resource>(namespaced: bool, verbs: &'static [&'static str]) -> ApiResource {
    ApiResource {
        group: T::GROUP,
        plural: T::URL_PATH_SEGMENT,
        namespaced,
        verbs,
    }
}

fn api_resources() -> Vec<ApiResource> {
    vec![
        api::<Namespace>(false, ALL_VERBS),
        api::<Node>(false, ALL_VERBS),
        api::<Pod>(true, ALL_VERBS),
        api::<Secret>(true, ALL_VERBS),
        api::<ConfigMap>(true, ALL_VERBS),
        api::<NetworkPolicy>(true, ALL_VERBS),
        api::<Service>(true, ALL_VERBS),
        api::<EndpointSlice>(true, ALL_VERBS),
        api::<Event>(true, ALL_VERBS),
        api::<Lease>(true, ALL_VERBS),
        api::<TokenReview>(false, &["create"]),
        // Served by the CRDs in manifests/ (the kinds weir reads that Kubernetes lacks).
        ApiResource {
            group: "policy.networking.k8s.io",
            plural: "clusternetworkpolicies",
            namespaced: false,
            verbs: ALL_VERBS,
        },
        ApiResource {
            group: "weir.dev",
            plural: "dropcidrsets",
            namespaced: false,
            verbs: ALL_VERBS,
        },
        ApiResource {
            group: "weir.dev",
            plural: "hostpolicies",
            namespaced: false,
            verbs: ALL_VERBS,
        },
    ]
}

/// A permission: (API group, resource, verb, object name or None for create/list/watch).
type Permission = (
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
);

fn allows(rules: &[PolicyRule], (group, resource, verb, name): Permission) -> bool {
    rules.iter().any(|rule| {
        rule.api_groups.iter().flatten().any(|g| g == group)
            && rule.resources.iter().flatten().any(|r| r == resource)
            && rule.verbs.iter().any(|v| v == verb)
            // Rules with resourceNames never authorize requests without a name (create,
            // list, watch of a collection).
            && match (&rule.resource_names, name) {
                (None, _) => true,
                (Some(names), _) if names.is_empty() => true,
                (Some(names), Some(name)) => names.iter().any(|n| n == name),
                (Some(_), None) => false,
            }
    })
}

/// The rules bound to a ServiceAccount: (cluster-wide rules, rules in weir-system).
fn rules_of(objects: &[Value], account: &str) -> (Vec<PolicyRule>, Vec<PolicyRule>) {
    let mut cluster = Vec::new();
    let mut namespaced = Vec::new();
    for binding in objects {
        let bound = binding["subjects"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["kind"] == "ServiceAccount" && s["name"] == account);
        if !bound {
            continue;
        }
        let role = find(
            objects,
            binding["roleRef"]["kind"].as_str().unwrap(),
            binding["roleRef"]["name"].as_str().unwrap(),
        )
        .expect("roleRef resolves (checked elsewhere)");
        let rules: Vec<PolicyRule> =
            serde_json::from_value(role["rules"].clone()).unwrap_or_default();
        match kind_of(binding) {
            "ClusterRoleBinding" => cluster.extend(rules),
            _ => namespaced.extend(rules),
        }
    }
    (cluster, namespaced)
}

#[test]
fn rbac_rules_name_real_resources_and_verbs() {
    let objects = rendered();
    let resources = api_resources();
    let mut problems = Problems::default();
    for role in objects
        .iter()
        .filter(|o| matches!(kind_of(o), "Role" | "ClusterRole"))
    {
        let rules: Vec<PolicyRule> = serde_json::from_value(role["rules"].clone()).unwrap();
        for rule in &rules {
            let at = format!("{} {}", kind_of(role), name_of(role));
            problems.check(rule.non_resource_urls.is_none(), || {
                format!("{at}: nonResourceURLs are not expected")
            });
            for group in rule.api_groups.iter().flatten() {
                for resource in rule.resources.iter().flatten() {
                    let known = resources
                        .iter()
                        .find(|r| r.group == group && r.plural == resource);
                    let Some(known) = known else {
                        problems
                            .0
                            .push(format!("{at}: no resource {resource:?} in group {group:?}"));
                        continue;
                    };
                    for verb in &rule.verbs {
                        problems.check(known.verbs.contains(&verb.as_str()), || {
                            format!("{at}: {resource} ({group:?}) has no verb {verb:?}")
                        });
                    }
                    problems.check(kind_of(role) == "ClusterRole" || known.namespaced, || {
                        format!("{at}: cluster-scoped {resource} in a namespaced Role")
                    });
                    if rule.resource_names.as_ref().is_some_and(|n| !n.is_empty()) {
                        problems.check(!rule.verbs.iter().any(|v| v == "create"), || {
                            format!(
                                "{at}: resourceNames cannot restrict create (the name is not \
                                 known when it is authorized), so that rule grants nothing"
                            )
                        });
                    }
                }
            }
            problems.check(
                !rule
                    .verbs
                    .iter()
                    .chain(rule.resources.iter().flatten())
                    .chain(rule.api_groups.iter().flatten())
                    .any(|s| s == "*"),
                || format!("{at}: wildcards are not least privilege"),
            );
        }
    }
    problems.assert_none();
}

#[test]
fn the_controller_may_do_what_it_does() {
    let (cluster, namespaced) = rules_of(&rendered(), "weir-controller");
    let cluster_needs: &[Permission] = &[
        ("", "namespaces", "list", None),
        ("", "namespaces", "watch", None),
        ("", "pods", "list", None),
        ("", "pods", "watch", None),
        ("", "nodes", "list", None),
        ("", "nodes", "watch", None),
        ("networking.k8s.io", "networkpolicies", "list", None),
        ("networking.k8s.io", "networkpolicies", "watch", None),
        (
            "policy.networking.k8s.io",
            "clusternetworkpolicies",
            "list",
            None,
        ),
        (
            "policy.networking.k8s.io",
            "clusternetworkpolicies",
            "watch",
            None,
        ),
        ("weir.dev", "dropcidrsets", "list", None),
        ("weir.dev", "dropcidrsets", "watch", None),
        ("weir.dev", "hostpolicies", "list", None),
        ("weir.dev", "hostpolicies", "watch", None),
        ("", "services", "list", None),
        ("", "services", "watch", None),
        ("discovery.k8s.io", "endpointslices", "list", None),
        ("discovery.k8s.io", "endpointslices", "watch", None),
        ("events.k8s.io", "events", "create", None),
        ("events.k8s.io", "events", "patch", Some("any-event")),
        ("authentication.k8s.io", "tokenreviews", "create", None),
        // The token reviewer reads the token's pod.
        ("", "pods", "get", Some("weir-agent-abcde")),
    ];
    let namespace_needs: &[Permission] = &[
        ("coordination.k8s.io", "leases", "create", None),
        (
            "coordination.k8s.io",
            "leases",
            "get",
            Some("weir-controller"),
        ),
        (
            "coordination.k8s.io",
            "leases",
            "update",
            Some("weir-controller"),
        ),
        ("", "secrets", "create", None),
        ("", "secrets", "get", Some("weir-ca")),
        ("", "configmaps", "create", None),
        ("", "configmaps", "get", Some("weir-ca")),
        ("", "configmaps", "update", Some("weir-ca")),
        // The leader's EndpointSlice, written by server-side apply.
        ("discovery.k8s.io", "endpointslices", "create", None),
        (
            "discovery.k8s.io",
            "endpointslices",
            "patch",
            Some("weir-controller-leader"),
        ),
        (
            "discovery.k8s.io",
            "endpointslices",
            "get",
            Some("weir-controller-leader"),
        ),
    ];
    let mut problems = Problems::default();
    for need in cluster_needs {
        problems.check(allows(&cluster, *need), || {
            format!("cluster-wide {need:?} is not granted")
        });
    }
    for need in namespace_needs {
        problems.check(
            allows(&namespaced, *need) || allows(&cluster, *need),
            || format!("{need:?} in {NAMESPACE} is not granted"),
        );
    }
    // Least privilege where it matters most: the CA key is readable only by name, and no
    // Node can be changed.
    problems.check(
        !allows(&namespaced, ("", "secrets", "get", Some("another-secret")))
            && !allows(&namespaced, ("", "secrets", "list", None)),
        || "the controller can read Secrets other than weir-ca".into(),
    );
    problems.check(
        !allows(&cluster, ("", "nodes", "patch", Some("node-1"))),
        || "the controller can patch Nodes".into(),
    );
    // No pod can be changed (the agents' pods are privileged), and no EndpointSlice but its
    // own (another Service's endpoints would redirect its traffic).
    for verb in ["patch", "update", "delete"] {
        for pod in ["weir-agent-abcde", "weir-controller-abcde"] {
            problems.check(
                !allows(&namespaced, ("", "pods", verb, Some(pod)))
                    && !allows(&cluster, ("", "pods", verb, Some(pod))),
                || format!("the controller can {verb} pod {pod}"),
            );
        }
        problems.check(
            !allows(
                &namespaced,
                (
                    "discovery.k8s.io",
                    "endpointslices",
                    verb,
                    Some("other-abcde"),
                ),
            ) && !allows(
                &cluster,
                (
                    "discovery.k8s.io",
                    "endpointslices",
                    verb,
                    Some("other-abcde"),
                ),
            ),
            || format!("the controller can {verb} EndpointSlices other than its own"),
        );
    }
    problems.assert_none();
}

#[test]
fn the_agent_reads_only_where_the_controller_is() {
    let (cluster, namespaced) = rules_of(&rendered(), "weir-agent");
    let granted = |rules: &[PolicyRule]| -> Vec<(Vec<String>, Vec<String>, Vec<String>)> {
        rules
            .iter()
            .map(|r| {
                (
                    r.api_groups.clone().unwrap_or_default(),
                    r.resources.clone().unwrap_or_default(),
                    r.verbs.clone(),
                )
            })
            .collect()
    };
    assert!(granted(&cluster).is_empty(), "nothing cluster-wide");
    // Only in weir-system (a Role), only listing.
    assert_eq!(
        granted(&namespaced),
        [(
            vec!["discovery.k8s.io".to_owned()],
            vec!["endpointslices".to_owned()],
            vec!["list".to_owned()]
        )]
    );
}

fn daemon_set(objects: &[Value]) -> DaemonSet {
    serde_json::from_value(find(objects, "DaemonSet", "weir-agent").unwrap().clone()).unwrap()
}

#[test]
fn the_cni_configuration_is_one_the_plugin_accepts_and_reaches_the_agent() {
    let objects = rendered();
    let config_map = find(&objects, "ConfigMap", "weir-cni-config").unwrap();
    let text = config_map["data"]["10-weir.conflist"].as_str().unwrap();
    let list: Value = serde_json::from_str(text).expect("the conflist is JSON");
    // Read by every runtime Kubernetes supports; containerd 1.6 and 1.7 refuse 1.1.0.
    assert_eq!(list["cniVersion"], "1.0.0");
    let plugins = list["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 1);
    // The runtime hands each plugin its entry plus the list's name and cniVersion (CNI spec
    // section 3, "Deriving execution configuration from plugin configuration").
    let mut derived = plugins[0].clone();
    derived["name"] = list["name"].clone();
    derived["cniVersion"] = list["cniVersion"].clone();
    let input = weir_cni::spec::PluginInput::parse(derived.to_string().as_bytes())
        .expect("weir-cni accepts the configuration");
    assert!(image::BINARIES.contains(&input.config.plugin_type.as_str()));
    assert_eq!(
        input.config.agent_socket,
        Path::new(weir_cni::spec::DEFAULT_AGENT_SOCKET),
        "the agent serves --cni-socket's default, the plugin's default"
    );

    // The socket's directory is the same host directory at the same path in the agent.
    let socket_dir = input.config.agent_socket.parent().unwrap();
    let spec = daemon_set(&objects).spec.unwrap().template.spec.unwrap();
    let host_volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| {
            v.host_path
                .as_ref()
                .is_some_and(|h| Path::new(&h.path) == socket_dir)
        })
        .expect("a hostPath volume for the socket directory");
    let agent = spec.containers.iter().find(|c| c.name == "agent").unwrap();
    assert!(
        agent
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == host_volume.name && Path::new(&m.mount_path) == socket_dir)
    );

    // The init container installs exactly this file, and the plugin the list names (the
    // agent's install-cni takes the weir-cni next to it, in the image's binary directory).
    let install = spec.init_containers.iter().flatten().next().unwrap();
    let command = install.command.as_ref().unwrap();
    assert_eq!(
        command[..2],
        [
            format!("{}/weir-agent", image::BIN_DIR),
            "install-cni".to_owned()
        ]
    );
    assert_eq!(input.config.plugin_type, "weir-cni");
    let flag = |name: &str| {
        command
            .iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .unwrap_or_else(|| panic!("install-cni without --{name}"))
            .to_owned()
    };
    assert_eq!(flag("cni-bin-dir"), "/host/opt/cni/bin");
    assert_eq!(flag("cni-conf-dir"), "/host/etc/cni/net.d");
    let conflist_from = flag("conflist-from");
    let config_volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.config_map.is_some())
        .expect("the CNI configuration ConfigMap volume");
    let config_mount = install
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == config_volume.name)
        .expect("install-cni mounts the CNI configuration");
    assert_eq!(
        Path::new(&conflist_from),
        Path::new(&config_mount.mount_path).join("10-weir.conflist")
    );
    let mounted_at = |host: &str| {
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.host_path.as_ref().is_some_and(|h| h.path == host))?;
        install
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == volume.name)
            .map(|m| m.mount_path.clone())
    };
    assert_eq!(
        mounted_at("/opt/cni/bin").as_deref(),
        Some("/host/opt/cni/bin")
    );
    assert_eq!(
        mounted_at("/etc/cni/net.d").as_deref(),
        Some("/host/etc/cni/net.d")
    );
}

#[test]
fn the_agent_runs_everywhere_with_what_it_needs() {
    let objects = rendered();
    let spec = daemon_set(&objects).spec.unwrap().template.spec.unwrap();
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        spec.tolerations.iter().flatten().any(|t| t.key.is_none()
            && t.operator.as_deref() == Some("Exists")
            && t.effect.is_none()),
        "tolerates every taint"
    );
    let agent = spec.containers.iter().find(|c| c.name == "agent").unwrap();
    let mounts: BTreeMap<&str, &str> = agent
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.mount_path.as_str(), m.name.as_str()))
        .collect();
    let host_path = |mount: &str| {
        let name = mounts.get(mount)?;
        spec.volumes
            .iter()
            .flatten()
            .find(|v| &v.name == name)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.clone())
    };
    for (mount, host) in [
        ("/sys/fs/bpf", "/sys/fs/bpf"),
        ("/run/weir", "/run/weir"),
        ("/var/lib/weir", "/var/lib/weir"),
        ("/var/run/netns", "/var/run/netns"),
    ] {
        assert_eq!(host_path(mount).as_deref(), Some(host), "{mount}");
    }
    let bpffs = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .unwrap();
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("Bidirectional"));
    // Bidirectional propagation is only allowed for privileged containers.
    assert_eq!(
        agent.security_context.as_ref().and_then(|s| s.privileged),
        Some(true)
    );
    let env: BTreeMap<&str, &k8s_openapi::api::core::v1::EnvVar> = agent
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.as_str(), e))
        .collect();
    assert_eq!(
        env["NODE_NAME"]
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );
    // The bootstrap token: bound to the pod, for the audience the controller reviews.
    let token = spec
        .volumes
        .iter()
        .flatten()
        .flat_map(|v| v.projected.iter().flat_map(|p| p.sources.iter().flatten()))
        .find_map(|s| s.service_account_token.as_ref())
        .expect("a projected service account token");
    assert_eq!(token.audience.as_deref(), Some("weir-controller"));
    assert_eq!(
        spec.service_account_name.as_deref(),
        Some("weir-agent"),
        "the controller issues node certificates to tokens of weir-system/weir-agent"
    );
    assert!(agent.readiness_probe.as_ref().is_some_and(|p| {
        p.http_get
            .as_ref()
            .is_some_and(|h| h.path.as_deref() == Some("/readyz"))
    }));
}

#[test]
fn the_controller_is_highly_available_and_unprivileged() {
    let objects = rendered();
    let deployment: Deployment = serde_json::from_value(
        find(&objects, "Deployment", "weir-controller")
            .unwrap()
            .clone(),
    )
    .unwrap();
    let spec = deployment.spec.unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.unwrap();
    assert_eq!(
        pod.host_network,
        Some(true),
        "it must run before pod networking"
    );
    assert!(
        pod.affinity
            .and_then(|a| a.pod_anti_affinity)
            .and_then(|a| a.required_during_scheduling_ignored_during_execution)
            .is_some_and(|terms| terms
                .iter()
                .any(|t| t.topology_key == "kubernetes.io/hostname")),
        "replicas are kept on different nodes"
    );
    let tolerated: BTreeSet<&str> = pod
        .tolerations
        .iter()
        .flatten()
        .filter_map(|t| t.key.as_deref())
        .collect();
    for key in [
        "node.kubernetes.io/not-ready",
        "node-role.kubernetes.io/control-plane",
    ] {
        assert!(tolerated.contains(key), "{key}");
    }
    let pod_security = pod.security_context.unwrap();
    assert_eq!(pod_security.run_as_non_root, Some(true));
    let container = &pod.containers[0];
    let security = container.security_context.clone().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(
        security.capabilities.and_then(|c| c.drop),
        Some(vec!["ALL".to_owned()])
    );
    assert!(
        container
            .resources
            .as_ref()
            .is_some_and(|r| r.requests.is_some())
    );
    assert!(container.liveness_probe.is_some() && container.readiness_probe.is_some());
    // The Service agents dial exposes the gRPC port.
    let service = find(&objects, "Service", "weir-controller").unwrap();
    assert_eq!(service["spec"]["ports"][0]["port"], 7443);
}

#[test]
fn settings_come_from_the_config_map() {
    let objects = rendered();
    let config = find(&objects, "ConfigMap", "weir-config").unwrap();
    let cidr: ipnet::IpNet = config["data"]["cluster-cidr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let mask: u8 = config["data"]["node-cidr-mask"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(mask > cidr.prefix_len() && mask <= cidr.max_prefix_len());
    assert!(
        ["auto", "direct", "vxlan"].contains(&config["data"]["routing-mode"].as_str().unwrap())
    );
    // The controller allocates node ranges; the agents route; both may be told where the
    // API server is (optional keys, unset by default: the `kubernetes` Service then applies).
    let api_server = ["kubernetes-service-host", "kubernetes-service-port"];
    for key in api_server {
        assert!(
            config["data"].get(key).is_none(),
            "{key} is unset by default"
        );
    }
    for (name, expected) in [
        (
            "weir-controller",
            vec![
                "cluster-cidr",
                "node-cidr-mask",
                api_server[0],
                api_server[1],
            ],
        ),
        (
            "weir-agent",
            vec!["routing-mode", "map-capacity", api_server[0], api_server[1]],
        ),
    ] {
        let (_, _, spec, _) = workloads(&objects)
            .into_iter()
            .find(|(_, workload, _, _)| workload == name)
            .unwrap();
        let keys: BTreeSet<String> = spec.containers[0]
            .env
            .iter()
            .flatten()
            .filter_map(|e| e.value_from.as_ref()?.config_map_key_ref.clone())
            .filter(|r| r.name == "weir-config")
            .map(|r| r.key)
            .collect();
        assert_eq!(
            keys,
            expected.into_iter().map(str::to_owned).collect(),
            "{name}"
        );
    }
}

/// The renderer agrees with kustomize itself (as built into kubectl), object for object and
/// in the same order. Needs kubectl, which no Debian package provides: run it with
/// `cargo test -p xtask -- --ignored` where kubectl is installed.
#[test]
#[ignore = "needs kubectl"]
fn rendering_matches_kubectl_kustomize() {
    let dir = crate::workspace_root().join("manifests");
    let output = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "kubectl kustomize manifests/ failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let theirs: Vec<Value> = serde_norway::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).unwrap())
        .collect();
    let ours = rendered();
    let names = |objects: &[Value]| -> Vec<String> {
        objects
            .iter()
            .map(|o| format!("{} {}", kind_of(o), name_of(o)))
            .collect()
    };
    assert_eq!(
        names(&ours),
        names(&theirs),
        "same objects in the same order"
    );
    for (mine, reference) in ours.iter().zip(&theirs) {
        assert_eq!(mine, reference, "{} {}", kind_of(mine), name_of(mine));
    }
}
