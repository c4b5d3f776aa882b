//! Where cluster objects come from. Both sources — a directory of manifests and (in a real
//! cluster) the Kubernetes API — produce the same typed [`Change`]s, which the controller
//! applies to its [`weir_compiler::Cluster`].

use std::{
    collections::BTreeMap,
    fmt, fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use serde::Deserialize;
use weir_compiler::{
    cnp::{self, ClusterNetworkPolicy},
    drop_cidrs::{self, DropCidrSet},
    host_policy::{self, HostPolicy},
};

/// A cluster object the controller understands.
#[derive(Clone, Debug, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "objects are moved around boxed inside `Change`; the variants mirror the API types"
)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Node(Node),
    NetworkPolicy(NetworkPolicy),
    ClusterNetworkPolicy(ClusterNetworkPolicy),
    Service(Service),
    EndpointSlice(EndpointSlice),
    DropCidrSet(DropCidrSet),
    HostPolicy(HostPolicy),
}

/// Identity of an object: kind, namespace ("" for cluster-scoped kinds), name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

impl Object {
    pub fn key(&self) -> ObjectKey {
        let (kind, meta) = match self {
            Object::Namespace(o) => ("Namespace", &o.metadata),
            Object::Pod(o) => ("Pod", &o.metadata),
            Object::Node(o) => ("Node", &o.metadata),
            Object::NetworkPolicy(o) => ("NetworkPolicy", &o.metadata),
            Object::ClusterNetworkPolicy(o) => ("ClusterNetworkPolicy", &o.metadata),
            Object::Service(o) => ("Service", &o.metadata),
            Object::EndpointSlice(o) => ("EndpointSlice", &o.metadata),
            Object::DropCidrSet(o) => (drop_cidrs::KIND, &o.metadata),
            Object::HostPolicy(o) => (host_policy::KIND, &o.metadata),
        };
        ObjectKey {
            kind,
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Upsert(Box<Object>),
    Delete(ObjectKey),
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{file}: document {document}: {message}")]
    Invalid {
        file: String,
        document: usize,
        message: String,
    },
    #[error("{file}: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
}

/// Parses a file of YAML (or JSON) documents into objects. Kinds weir does not use
/// (ConfigMaps, Deployments, ...) are skipped; `List` objects are flattened.
pub fn parse_manifests(file: &str, text: &str) -> Result<Vec<Object>, ManifestError> {
    let mut out = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let invalid = |message: String| ManifestError::Invalid {
            file: file.to_string(),
            document: i + 1,
            message,
        };
        let value = serde_json::Value::deserialize(doc).map_err(|e| invalid(e.to_string()))?;
        if value.is_null() {
            continue;
        }
        collect(value, &mut out).map_err(invalid)?;
    }
    Ok(out)
}

fn collect(value: serde_json::Value, out: &mut Vec<Object>) -> Result<(), String> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .ok_or("missing `kind`")?
        .to_string();
    let typed = |v: serde_json::Value| -> Result<Object, String> {
        let o = match kind.as_str() {
            "Namespace" => Object::Namespace(serde_json::from_value(v).map_err(|e| e.to_string())?),
            "Pod" => Object::Pod(serde_json::from_value(v).map_err(|e| e.to_string())?),
            "Node" => Object::Node(serde_json::from_value(v).map_err(|e| e.to_string())?),
            "NetworkPolicy" => {
                Object::NetworkPolicy(serde_json::from_value(v).map_err(|e| e.to_string())?)
            }
            "ClusterNetworkPolicy" => {
                let api_version = v.get("apiVersion").and_then(|a| a.as_str()).unwrap_or("");
                if api_version != cnp::API_VERSION {
                    return Err(format!(
                        "ClusterNetworkPolicy of apiVersion {api_version:?}: only {} is supported",
                        cnp::API_VERSION
                    ));
                }
                Object::ClusterNetworkPolicy(serde_json::from_value(v).map_err(|e| e.to_string())?)
            }
            "Service" => Object::Service(serde_json::from_value(v).map_err(|e| e.to_string())?),
            "EndpointSlice" => {
                Object::EndpointSlice(serde_json::from_value(v).map_err(|e| e.to_string())?)
            }
            host_policy::KIND => {
                let api_version = v.get("apiVersion").and_then(|a| a.as_str()).unwrap_or("");
                if api_version != host_policy::API_VERSION {
                    return Err(format!(
                        "HostPolicy of apiVersion {api_version:?}: only {} is supported",
                        host_policy::API_VERSION
                    ));
                }
                Object::HostPolicy(serde_json::from_value(v).map_err(|e| e.to_string())?)
            }
            drop_cidrs::KIND => {
                let api_version = v.get("apiVersion").and_then(|a| a.as_str()).unwrap_or("");
                if api_version != drop_cidrs::API_VERSION {
                    return Err(format!(
                        "DropCIDRSet of apiVersion {api_version:?}: only {} is supported",
                        drop_cidrs::API_VERSION
                    ));
                }
                Object::DropCidrSet(serde_json::from_value(v).map_err(|e| e.to_string())?)
            }
            _ => unreachable!("filtered below"),
        };
        if o.key().name.is_empty() {
            return Err(format!("{kind} without metadata.name"));
        }
        Ok(o)
    };
    match kind.as_str() {
        "List" => {
            let items = value
                .get("items")
                .and_then(|i| i.as_array())
                .cloned()
                .unwrap_or_default();
            for item in items {
                collect(item, out)?;
            }
        }
        "Namespace"
        | "Pod"
        | "Node"
        | "NetworkPolicy"
        | "ClusterNetworkPolicy"
        | "Service"
        | "EndpointSlice"
        | drop_cidrs::KIND
        | host_policy::KIND => out.push(typed(value)?),
        _ => {}
    }
    Ok(())
}

/// Name of the file a writer bumps after a batch of changes; see [`ManifestDir::sync_token`].
pub const SYNC_FILE: &str = ".weir-sync";

#[derive(Debug)]
struct FileState {
    stamp: (SystemTime, u64),
    /// The file's objects by key (a later document wins over an earlier one).
    objects: BTreeMap<ObjectKey, Object>,
}

/// A directory of manifests, scanned incrementally: only files whose modification time or
/// size changed are parsed again, and only the objects those files declare (or declared)
/// are compared, so a change costs the changed files, not the directory. A file that fails
/// to parse keeps its previous objects (a typo in one file never removes what other files,
/// or the last good version, declared).
#[derive(Debug)]
pub struct ManifestDir {
    root: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// The files that declare each object; the last in path order wins.
    declared_in: BTreeMap<ObjectKey, std::collections::BTreeSet<PathBuf>>,
    current: BTreeMap<ObjectKey, Object>,
}

/// The outcome of one scan.
#[derive(Debug, Default)]
pub struct Scan {
    pub changes: Vec<Change>,
    pub errors: Vec<ManifestError>,
}

impl ManifestDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            files: BTreeMap::new(),
            declared_in: BTreeMap::new(),
            current: BTreeMap::new(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The number in the directory's sync file (0 if none): writers bump it after a batch
    /// of changes and wait until the controller reports it enforced.
    pub fn sync_token(&self) -> u64 {
        fs::read_to_string(self.root.join(SYNC_FILE))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Rescans the directory and returns what changed since the last scan.
    pub fn scan(&mut self) -> Scan {
        let mut scan = Scan::default();
        let mut seen = std::collections::HashSet::new();
        let mut paths = Vec::new();
        walk(&self.root, &mut paths);
        // The objects whose declaring files changed: only they can have changed.
        let mut touched = std::collections::BTreeSet::new();
        for path in paths {
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            let stamp = (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            );
            seen.insert(path.clone());
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let name = path.display().to_string();
            let parsed = fs::read_to_string(&path)
                .map_err(|source| ManifestError::Read {
                    file: name.clone(),
                    source,
                })
                .and_then(|text| parse_manifests(&name, &text));
            match parsed {
                Ok(objects) => {
                    let objects: BTreeMap<ObjectKey, Object> =
                        objects.into_iter().map(|o| (o.key(), o)).collect();
                    self.forget_file(&path, &mut touched);
                    for k in objects.keys() {
                        self.declared_in
                            .entry(k.clone())
                            .or_default()
                            .insert(path.clone());
                        touched.insert(k.clone());
                    }
                    self.files.insert(path, FileState { stamp, objects });
                }
                Err(e) => scan.errors.push(e),
            }
        }
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !seen.contains(*p))
            .cloned()
            .collect();
        for path in gone {
            self.forget_file(&path, &mut touched);
            self.files.remove(&path);
        }
        for k in touched {
            // Later files win when two declare the same object.
            let desired = self
                .declared_in
                .get(&k)
                .and_then(|paths| paths.last())
                .and_then(|p| self.files.get(p))
                .and_then(|f| f.objects.get(&k));
            match desired {
                Some(o) if self.current.get(&k) != Some(o) => {
                    scan.changes.push(Change::Upsert(Box::new(o.clone())));
                    self.current.insert(k, o.clone());
                }
                Some(_) => {}
                None => {
                    if self.current.remove(&k).is_some() {
                        scan.changes.push(Change::Delete(k));
                    }
                }
            }
        }
        scan
    }

    /// Drops `path`'s objects from the index of declaring files, noting them as touched.
    fn forget_file(&mut self, path: &Path, touched: &mut std::collections::BTreeSet<ObjectKey>) {
        let Some(old) = self.files.get(path) else {
            return;
        };
        for k in old.objects.keys() {
            if let Some(paths) = self.declared_in.get_mut(k) {
                paths.remove(path);
                if paths.is_empty() {
                    self.declared_in.remove(k);
                }
            }
            touched.insert(k.clone());
        }
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(|e| e.ok()).collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            walk(&path, out);
        } else if name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json") {
            out.push(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_files_and_lists_parse_and_unknown_kinds_are_skipped() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: a}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: x}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: List
items:
  - apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: {name: deny, namespace: x}
    spec: {podSelector: {}}
"#;
        let objs = parse_manifests("f.yaml", text).unwrap();
        let keys: Vec<String> = objs.iter().map(|o| o.key().to_string()).collect();
        assert_eq!(
            keys,
            ["Namespace x", "Service x/web", "NetworkPolicy x/deny"]
        );
    }

    #[test]
    fn cluster_network_policies_of_another_api_version_are_refused() {
        let err = parse_manifests(
            "f.yaml",
            "apiVersion: policy.networking.k8s.io/v1alpha1\nkind: ClusterNetworkPolicy\nmetadata: {name: x}\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("v1alpha2"), "{err}");
    }

    #[test]
    fn a_broken_document_is_an_error_naming_file_and_document() {
        let err = parse_manifests(
            "f.yaml",
            "kind: Namespace\nmetadata: {name: a}\n---\nkind: [\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("f.yaml: document 2"), "{err}");
    }

    #[test]
    fn the_last_file_declaring_an_object_wins_and_the_earlier_one_takes_over_when_it_goes() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| fs::write(dir.path().join(name), text).unwrap();
        let ns = |labels: &str| {
            format!("kind: Namespace\nmetadata: {{name: x, labels: {{{labels}}}}}\n")
        };
        let labels_of = |c: &Change| match c {
            Change::Upsert(o) => match &**o {
                Object::Namespace(n) => n.metadata.labels.clone().unwrap_or_default(),
                other => panic!("not a namespace: {other:?}"),
            },
            other => panic!("not an upsert: {other:?}"),
        };
        write("a.yaml", &ns("from: a"));
        write("b.yaml", &ns("from: b"));
        write("c.yaml", "kind: Namespace\nmetadata: {name: other}\n");
        let mut m = ManifestDir::new(dir.path());
        let first = m.scan();
        assert_eq!(first.changes.len(), 2, "{:?}", first.changes);
        assert_eq!(labels_of(&first.changes[1])["from"], "b");

        // Editing the file that lost changes nothing.
        write("a.yaml", &ns("from: a2"));
        assert!(m.scan().changes.is_empty());

        // The winner goes: the other declaration takes over; then it goes too.
        fs::remove_file(dir.path().join("b.yaml")).unwrap();
        let fallback = m.scan();
        assert_eq!(fallback.changes.len(), 1, "{:?}", fallback.changes);
        assert_eq!(labels_of(&fallback.changes[0])["from"], "a2");
        fs::remove_file(dir.path().join("a.yaml")).unwrap();
        assert_eq!(
            m.scan().changes,
            vec![Change::Delete(ObjectKey {
                kind: "Namespace",
                namespace: String::new(),
                name: "x".into()
            })]
        );
    }

    #[test]
    fn scans_report_upserts_and_deletes_and_keep_objects_of_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| fs::write(dir.path().join(name), text).unwrap();
        write("a.yaml", "kind: Namespace\nmetadata: {name: a}\n");
        write("b.yaml", "kind: Namespace\nmetadata: {name: b}\n");
        let mut m = ManifestDir::new(dir.path());
        let first = m.scan();
        assert_eq!(first.changes.len(), 2);
        assert!(m.scan().changes.is_empty(), "nothing changed");

        // A broken edit keeps the last good objects of that file.
        write("b.yaml", "kind: Namespace\nmetadata: {name: b\n  oops: [\n");
        let broken = m.scan();
        assert_eq!(broken.errors.len(), 1);
        assert!(broken.changes.is_empty(), "{:?}", broken.changes);

        fs::remove_file(dir.path().join("a.yaml")).unwrap();
        let removed = m.scan();
        assert_eq!(
            removed.changes,
            vec![Change::Delete(ObjectKey {
                kind: "Namespace",
                namespace: String::new(),
                name: "a".into()
            })]
        );
    }
}
