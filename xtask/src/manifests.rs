//! Renders `manifests/` (a kustomization) the way `kubectl kustomize` does, for the few
//! kustomize features weir's manifests use, so that tests and xtask commands can read the
//! objects `kubectl apply -k manifests/` creates without kubectl.
//!
//! Supported (<https://kubectl.docs.kubernetes.io/references/kustomize/kustomization/>):
//!
//! * `resources`: YAML files (several documents each) and directories holding a
//!   `kustomization.yaml` (rendered first, as kustomize does for bases);
//! * `namespace`: set on every namespaced object, replacing what the file says; RoleBinding
//!   subjects are left alone, as kustomize does for every subject not named `default`;
//! * `labels` with `pairs` and `includeTemplates` (`includeSelectors: true` is refused:
//!   selectors of Deployments and DaemonSets are immutable, so weir never changes them);
//! * `images` with `name`, `newName`, `newTag`, `digest`, applied to the `containers` and
//!   `initContainers` of pods and pod templates;
//! * `patches` given inline as JSON 6902 operations (`patch`), with a `target` naming `kind`
//!   and `name` (a target matching no object is an error, as in kustomize).
//!
//! Anything else (another kustomization field, a kind whose scope is unknown here) is an
//! error, so the manifests cannot silently depend on a feature this renderer ignores. The
//! output is sorted like kustomize's default ("legacy") order: Namespaces, ServiceAccounts,
//! RBAC, ConfigMaps, Services, ... before workloads, so the Service exists when the
//! DaemonSet's pods are created.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Yaml {
        path: PathBuf,
        source: serde_norway::Error,
    },
    #[error("{path}: unsupported kustomization: {source}")]
    Kustomization {
        path: PathBuf,
        source: serde_norway::Error,
    },
    #[error("{path}: {field} is not supported by this renderer")]
    Unsupported { path: PathBuf, field: String },
    #[error("{path}: document {index} is not a Kubernetes object: {reason}")]
    NotAnObject {
        path: PathBuf,
        index: usize,
        reason: &'static str,
    },
    #[error("{path}: kind {kind} is unknown to this renderer (its scope decides `namespace`)")]
    UnknownKind { path: PathBuf, kind: String },
    #[error("{dir} has no kustomization.yaml")]
    NoKustomization { dir: PathBuf },
}

/// `kustomization.yaml`, limited to the supported fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    resources: Vec<String>,
    namespace: Option<String>,
    #[serde(default)]
    labels: Vec<LabelSet>,
    #[serde(default)]
    images: Vec<ImageOverride>,
    #[serde(default)]
    patches: Vec<Patch>,
}

/// One `patches:` entry: JSON 6902 operations for the object `target` names.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Patch {
    patch: String,
    target: PatchTarget,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PatchTarget {
    kind: String,
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LabelSet {
    pairs: BTreeMap<String, String>,
    #[serde(default)]
    include_selectors: bool,
    #[serde(default)]
    include_templates: bool,
}

/// One `images:` entry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ImageOverride {
    pub name: String,
    pub new_name: Option<String>,
    pub new_tag: Option<String>,
    pub digest: Option<String>,
}

/// Kinds the manifests may hold, and whether they are namespaced.
const KINDS: &[(&str, bool)] = &[
    ("Namespace", false),
    ("ClusterRole", false),
    ("ClusterRoleBinding", false),
    ("PriorityClass", false),
    ("CustomResourceDefinition", false),
    ("ServiceAccount", true),
    ("Role", true),
    ("RoleBinding", true),
    ("ConfigMap", true),
    ("Secret", true),
    ("Service", true),
    ("Deployment", true),
    ("DaemonSet", true),
    ("PodDisruptionBudget", true),
    ("Pod", true),
];

/// kustomize's legacy resource order (kyaml `resid.Gvk.IsLessThan`).
const ORDER_FIRST: &[&str] = &[
    "Namespace",
    "ResourceQuota",
    "StorageClass",
    "CustomResourceDefinition",
    "ServiceAccount",
    "PodSecurityPolicy",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
    "ConfigMap",
    "Secret",
    "Endpoints",
    "Service",
    "LimitRange",
    "PriorityClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "Deployment",
    "StatefulSet",
    "CronJob",
    "PodDisruptionBudget",
];
const ORDER_LAST: &[&str] = &[
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
];

/// Renders the kustomization in `dir`.
pub fn render(dir: &Path) -> Result<Vec<Value>, RenderError> {
    let mut objects = render_unsorted(dir)?;
    objects.sort_by_key(sort_key);
    Ok(objects)
}

fn render_unsorted(dir: &Path) -> Result<Vec<Value>, RenderError> {
    let path = dir.join("kustomization.yaml");
    if !path.is_file() {
        return Err(RenderError::NoKustomization {
            dir: dir.to_owned(),
        });
    }
    let text = read(&path)?;
    let kustomization: Kustomization =
        serde_norway::from_str(&text).map_err(|source| RenderError::Kustomization {
            path: path.clone(),
            source,
        })?;
    let unsupported = |field: &str| RenderError::Unsupported {
        path: path.clone(),
        field: field.to_owned(),
    };
    if kustomization
        .api_version
        .as_deref()
        .is_some_and(|v| v != "kustomize.config.k8s.io/v1beta1")
    {
        return Err(unsupported(
            "apiVersion other than kustomize.config.k8s.io/v1beta1",
        ));
    }
    if kustomization
        .kind
        .as_deref()
        .is_some_and(|k| k != "Kustomization")
    {
        return Err(unsupported("kind other than Kustomization"));
    }
    if kustomization.labels.iter().any(|l| l.include_selectors) {
        return Err(unsupported("labels[].includeSelectors: true"));
    }

    let mut objects = Vec::new();
    for resource in &kustomization.resources {
        let resource_path = dir.join(resource);
        if resource_path.is_dir() {
            objects.extend(render_unsorted(&resource_path)?);
        } else {
            objects.extend(read_objects(&resource_path)?);
        }
    }
    for object in &mut objects {
        let kind = kind_of(object).to_owned();
        let namespaced = KINDS
            .iter()
            .find(|(known, _)| *known == kind)
            .map(|(_, namespaced)| *namespaced)
            .ok_or_else(|| RenderError::UnknownKind {
                path: path.clone(),
                kind: kind.clone(),
            })?;
        if let (Some(namespace), true) = (&kustomization.namespace, namespaced)
            && let Some(metadata) = metadata_mut(object)
        {
            metadata.insert("namespace".into(), Value::String(namespace.clone()));
        }
        for set in &kustomization.labels {
            if let Some(metadata) = metadata_mut(object) {
                add_labels(metadata, &set.pairs);
            }
            if set.include_templates
                && let Some(template) = pod_template_mut(object, &kind)
            {
                let template_metadata = template
                    .entry("metadata")
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(template_metadata) = template_metadata {
                    add_labels(template_metadata, &set.pairs);
                }
            }
        }
        if !kustomization.images.is_empty() {
            for container in containers_mut(object, &kind) {
                if let Some(Value::String(image)) = container.get_mut("image") {
                    *image = override_image(image, &kustomization.images);
                }
            }
        }
    }
    for patch in &kustomization.patches {
        let operations: json_patch::Patch = serde_norway::from_str(&patch.patch)
            .map_err(|e| unsupported(&format!("patches[].patch: {e}")))?;
        let target = objects
            .iter_mut()
            .find(|o| kind_of(o) == patch.target.kind && name_of(o) == patch.target.name)
            .ok_or_else(|| {
                unsupported(&format!(
                    "patches[]: no {} {} to patch",
                    patch.target.kind, patch.target.name
                ))
            })?;
        json_patch::patch(target, &operations)
            .map_err(|e| unsupported(&format!("patches[] on {}: {e}", patch.target.name)))?;
    }
    Ok(objects)
}

fn read(path: &Path) -> Result<String, RenderError> {
    std::fs::read_to_string(path).map_err(|source| RenderError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every non-empty document of a YAML file, each checked to be an object with apiVersion,
/// kind and metadata.name.
fn read_objects(path: &Path) -> Result<Vec<Value>, RenderError> {
    let text = read(path)?;
    let mut objects = Vec::new();
    for (index, document) in serde_norway::Deserializer::from_str(&text).enumerate() {
        let value = Value::deserialize(document).map_err(|source| RenderError::Yaml {
            path: path.to_owned(),
            source,
        })?;
        let not_object = |reason| RenderError::NotAnObject {
            path: path.to_owned(),
            index: index + 1,
            reason,
        };
        match &value {
            Value::Null => continue, // an empty document (a trailing `---`)
            Value::Object(map) => {
                for key in ["apiVersion", "kind"] {
                    if !map.get(key).is_some_and(Value::is_string) {
                        return Err(not_object("apiVersion and kind must be strings"));
                    }
                }
                if !map
                    .get("metadata")
                    .and_then(|m| m.get("name"))
                    .is_some_and(Value::is_string)
                {
                    return Err(not_object("metadata.name must be a string"));
                }
            }
            _ => return Err(not_object("not a mapping")),
        }
        objects.push(value);
    }
    Ok(objects)
}

pub fn kind_of(object: &Value) -> &str {
    object.get("kind").and_then(Value::as_str).unwrap_or("")
}

pub fn name_of(object: &Value) -> &str {
    object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
}

pub fn namespace_of(object: &Value) -> Option<&str> {
    object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
}

/// The object of `kind` named `name`.
pub fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objects
        .iter()
        .find(|o| kind_of(o) == kind && name_of(o) == name)
}

fn sort_key(object: &Value) -> (i64, String, String, String) {
    let kind = kind_of(object);
    let rank = if let Some(i) = ORDER_FIRST.iter().position(|k| *k == kind) {
        i as i64 - ORDER_FIRST.len() as i64
    } else if let Some(i) = ORDER_LAST.iter().position(|k| *k == kind) {
        1 + i as i64
    } else {
        0
    };
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    (
        rank,
        format!("{api_version}/{kind}"),
        namespace_of(object).unwrap_or("").to_owned(),
        name_of(object).to_owned(),
    )
}

/// `metadata` of an object (always a mapping: [`read_objects`] checked it).
fn metadata_mut(object: &mut Value) -> Option<&mut Map<String, Value>> {
    object.get_mut("metadata").and_then(Value::as_object_mut)
}

fn add_labels(metadata: &mut Map<String, Value>, pairs: &BTreeMap<String, String>) {
    let labels = metadata
        .entry("labels")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(labels) = labels {
        for (key, value) in pairs {
            labels.insert(key.clone(), Value::String(value.clone()));
        }
    }
}

/// The pod template of a workload (`spec.template`), if `kind` has one.
fn pod_template_mut<'a>(object: &'a mut Value, kind: &str) -> Option<&'a mut Map<String, Value>> {
    match kind {
        "Deployment" | "DaemonSet" | "StatefulSet" | "ReplicaSet" | "Job" => object
            .pointer_mut("/spec/template")
            .and_then(Value::as_object_mut),
        _ => None,
    }
}

/// The containers and init containers of a pod or pod template.
fn containers_mut<'a>(
    object: &'a mut Value,
    kind: &str,
) -> impl Iterator<Item = &'a mut Map<String, Value>> {
    let pod_spec = match kind {
        "Pod" => object.get_mut("spec"),
        _ => pod_template_mut(object, kind).and_then(|t| t.get_mut("spec")),
    };
    let mut lists = Vec::new();
    if let Some(Value::Object(spec)) = pod_spec {
        for (key, value) in spec.iter_mut() {
            if key == "containers" || key == "initContainers" {
                lists.push(value);
            }
        }
    }
    lists
        .into_iter()
        .filter_map(Value::as_array_mut)
        .flat_map(|list| list.iter_mut())
        .filter_map(Value::as_object_mut)
}

/// Splits `registry/name:tag@digest` into (name, tag, digest); the tag's `:` is the last one
/// after the last `/`, so a registry port is not a tag.
pub fn split_image(image: &str) -> (&str, Option<&str>, Option<&str>) {
    let (rest, digest) = match image.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (image, None),
    };
    let slash = rest.rfind('/').map_or(0, |i| i + 1);
    match rest[slash..].rfind(':') {
        Some(colon) => (
            &rest[..slash + colon],
            Some(&rest[slash + colon + 1..]),
            digest,
        ),
        None => (rest, None, digest),
    }
}

/// kustomize's image transformer: the first entry whose `name` is the image's name replaces
/// the name (`newName`) and the tag (`newTag`) or pins a digest (`digest`); an entry without
/// `newTag`/`digest` keeps the original tag and digest.
fn override_image(image: &str, overrides: &[ImageOverride]) -> String {
    let (name, tag, digest) = split_image(image);
    let Some(entry) = overrides.iter().find(|o| o.name == name) else {
        return image.to_owned();
    };
    let name = entry.new_name.as_deref().unwrap_or(name);
    let (tag, digest) = if entry.new_tag.is_some() || entry.digest.is_some() {
        (entry.new_tag.as_deref(), entry.digest.as_deref())
    } else {
        (tag, digest)
    };
    let mut out = name.to_owned();
    if let Some(tag) = tag {
        out.push(':');
        out.push_str(tag);
    }
    if let Some(digest) = digest {
        out.push('@');
        out.push_str(digest);
    }
    out
}

#[cfg(test)]
mod tests;
