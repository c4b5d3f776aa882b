//! Container image archives written without a container engine.
//!
//! An archive holds one image in two layouts at once, sharing the same blobs, as
//! `docker save` has written them since Docker 25:
//!
//! * the OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/<hex>`; OCI image spec
//!   v1.1 "image-layout.md"), which `ctr images import`, `kind load image-archive`,
//!   `podman load` and Docker ≥ 25 read;
//! * Docker's `manifest.json` (+ `repositories`), whose `Config`/`Layers` paths point at the
//!   same blobs, which every `docker load` reads.
//!
//! The single layer is an uncompressed tar (`application/vnd.oci.image.layer.v1.tar`), so its
//! digest is also its `diff_id`. Everything is deterministic: entries are sorted by path, every
//! entry has the same mtime, owner root:root and no user or group names, and the JSON documents
//! are serialized from fixed structures. Building twice from the same files gives the same
//! bytes, hence the same image ID and manifest digest.

use std::{collections::BTreeMap, io::Write};

use serde::Serialize;
use serde_json::json;

/// What can go wrong while assembling an image.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        reference: String,
        reason: &'static str,
    },
    #[error("invalid path {path:?} in the image: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("{path:?} is added twice to the image")]
    DuplicatePath { path: String },
    #[error("{path:?} needs {parent:?} to be a directory, but it is not")]
    ParentNotDirectory { path: String, parent: String },
    #[error("creation time {seconds} s after the epoch is past the year 9999")]
    CreatedOutOfRange { seconds: u64 },
    #[error("writing the archive: {0}")]
    Io(#[from] std::io::Error),
}

/// A normalized image reference with a tag (`docker.io/library/weir:dev`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    domain: String,
    path: String,
    tag: String,
}

const DOCKER_HUB: &str = "docker.io";

impl ImageRef {
    /// Parses a reference the way Docker normalizes it
    /// (<https://github.com/distribution/reference>): a first component without `.` or `:`
    /// that is not `localhost` is a Docker Hub repository (`weir` → `docker.io/library/weir`);
    /// a missing tag is `latest`. Digests are refused: an archive names its image by tag.
    pub fn parse(reference: &str) -> Result<ImageRef, ArchiveError> {
        let invalid = |reason| ArchiveError::InvalidReference {
            reference: reference.to_owned(),
            reason,
        };
        if reference.contains('@') {
            return Err(invalid(
                "digests cannot name an image built here; use a tag",
            ));
        }
        let (name, tag) = match reference.rsplit_once(':') {
            Some((name, tag)) if !tag.contains('/') => (name, tag),
            _ => (reference, "latest"),
        };
        if !is_valid_tag(tag) {
            return Err(invalid(
                "a tag is 1-128 characters of [A-Za-z0-9_.-], not starting with . or -",
            ));
        }
        let (domain, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_owned(), rest.to_owned())
            }
            Some(_) => (DOCKER_HUB.to_owned(), name.to_owned()),
            None => (DOCKER_HUB.to_owned(), format!("library/{name}")),
        };
        if domain.is_empty() || domain.contains(|c: char| c.is_whitespace()) {
            return Err(invalid("empty or malformed registry"));
        }
        if !path.split('/').all(is_valid_path_component) {
            return Err(invalid(
                "repository components are lower-case [a-z0-9] separated by '.', '_', '__' or '-'",
            ));
        }
        Ok(ImageRef {
            domain,
            path,
            tag: tag.to_owned(),
        })
    }

    /// The fully qualified name containerd and the CRI use: `docker.io/library/weir:dev`.
    pub fn full(&self) -> String {
        format!("{}/{}:{}", self.domain, self.path, self.tag)
    }

    /// The repository in Docker's short form: `weir` for `docker.io/library/weir`.
    pub fn familiar_repository(&self) -> String {
        if self.domain == DOCKER_HUB {
            self.path
                .strip_prefix("library/")
                .filter(|rest| !rest.contains('/'))
                .unwrap_or(&self.path)
                .to_owned()
        } else {
            format!("{}/{}", self.domain, self.path)
        }
    }

    /// Docker's short form with the tag (`weir:dev`), as in `manifest.json`'s `RepoTags`.
    pub fn familiar(&self) -> String {
        format!("{}:{}", self.familiar_repository(), self.tag)
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }
}

fn is_valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 128
        && !tag.starts_with(['.', '-'])
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// `[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*` without a regex engine.
fn is_valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.first().is_none_or(|b| !alnum(b)) || bytes.last().is_none_or(|b| !alnum(b)) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(&bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(&bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let ok = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// One entry of the image's file system.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
}

/// The image's file system: one layer, paths relative to `/`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layer {
    entries: BTreeMap<String, Node>,
}

impl Layer {
    /// Adds a directory (and its missing parents, mode 0755). Adding an existing directory
    /// again with the same mode is allowed (several files share parents).
    pub fn add_dir(&mut self, path: &str, mode: u32) -> Result<(), ArchiveError> {
        let path = normalize(path)?;
        self.add_parents(&path)?;
        match self.entries.get(&path) {
            Some(Node::Dir { mode: existing }) if *existing == mode => Ok(()),
            Some(_) => Err(ArchiveError::DuplicatePath { path }),
            None => {
                self.entries.insert(path, Node::Dir { mode });
                Ok(())
            }
        }
    }

    /// Adds a regular file (and its missing parent directories).
    pub fn add_file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> Result<(), ArchiveError> {
        self.add_leaf(path, Node::File { mode, data })
    }

    /// Adds a symbolic link (and its missing parent directories).
    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<(), ArchiveError> {
        self.add_leaf(
            path,
            Node::Symlink {
                target: target.to_owned(),
            },
        )
    }

    /// Paths in the layer, sorted (as written to the tar).
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    fn add_leaf(&mut self, path: &str, node: Node) -> Result<(), ArchiveError> {
        let path = normalize(path)?;
        self.add_parents(&path)?;
        if self.entries.contains_key(&path) {
            return Err(ArchiveError::DuplicatePath { path });
        }
        self.entries.insert(path, node);
        Ok(())
    }

    fn add_parents(&mut self, path: &str) -> Result<(), ArchiveError> {
        let mut parent = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for component in &components[..components.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(component);
            match self.entries.get(&parent) {
                Some(Node::Dir { .. }) => {}
                Some(_) => {
                    return Err(ArchiveError::ParentNotDirectory {
                        path: path.to_owned(),
                        parent,
                    });
                }
                None => {
                    self.entries
                        .insert(parent.clone(), Node::Dir { mode: 0o755 });
                }
            }
        }
        Ok(())
    }

    /// The layer as an uncompressed tar with every entry's mtime set to `mtime`.
    pub fn to_tar(&self, mtime: u64) -> Result<Vec<u8>, ArchiveError> {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, node) in &self.entries {
            match node {
                Node::Dir { mode } => append_dir(&mut tar, path, *mode, mtime)?,
                Node::File { mode, data } => append_file(&mut tar, path, *mode, mtime, data)?,
                Node::Symlink { target } => append_symlink(&mut tar, path, target, mtime)?,
            }
        }
        Ok(tar.into_inner()?)
    }
}

/// `/usr/bin/x` → `usr/bin/x`; refuses empty, `.`/`..` components and trailing slashes.
fn normalize(path: &str) -> Result<String, ArchiveError> {
    let invalid = |reason| ArchiveError::InvalidPath {
        path: path.to_owned(),
        reason,
    };
    let relative = path.trim_start_matches('/');
    if relative.is_empty() {
        return Err(invalid("empty"));
    }
    if relative
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(invalid("empty, '.' or '..' component"));
    }
    Ok(relative.to_owned())
}

/// A tar header for one entry: owner root:root without user or group names, the given mode
/// and mtime. GNU format, whose long-name and long-link extensions (`././@LongLink`) the
/// `tar` crate writes for paths and link targets that do not fit in 100 bytes; every runtime's
/// tar reader (Go's `archive/tar` in containerd and Docker, GNU tar, libarchive) reads them.
fn tar_header(kind: tar::EntryType, mode: u32, size: u64, mtime: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode & 0o7777);
    header.set_uid(0);
    header.set_gid(0);
    header.set_size(size);
    header.set_mtime(mtime);
    header
}

fn append_dir<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    mode: u32,
    mtime: u64,
) -> Result<(), ArchiveError> {
    let name = format!("{}/", path.trim_end_matches('/'));
    let mut header = tar_header(tar::EntryType::Directory, mode, 0, mtime);
    tar.append_data(&mut header, name, std::io::empty())?;
    Ok(())
}

fn append_file<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    mode: u32,
    mtime: u64,
    data: &[u8],
) -> Result<(), ArchiveError> {
    let mut header = tar_header(tar::EntryType::Regular, mode, data.len() as u64, mtime);
    tar.append_data(&mut header, path, data)?;
    Ok(())
}

fn append_symlink<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    target: &str,
    mtime: u64,
) -> Result<(), ArchiveError> {
    let mut header = tar_header(tar::EntryType::Symlink, 0o777, 0, mtime);
    tar.append_link(&mut header, path, target)?;
    Ok(())
}

/// The image configuration (OCI image spec "config.md").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageConfig {
    /// GOARCH spelling: `amd64`, `arm64`.
    pub architecture: String,
    pub env: Vec<String>,
    pub cmd: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// Seconds since the Unix epoch, for `created` and every file's mtime.
    pub created: u64,
    /// What built the image, for `history`.
    pub created_by: String,
}

/// Digests of what [`write_archive`] wrote (`sha256:<hex>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenImage {
    /// The manifest digest: what a registry would call the image.
    pub manifest: String,
    /// The config digest: the image ID `docker images` shows.
    pub config: String,
    pub layer: String,
}

pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut text = String::with_capacity(7 + 64);
    text.push_str("sha256:");
    for byte in digest.as_ref() {
        text.push_str(&format!("{byte:02x}"));
    }
    text
}

fn blob_path(digest: &str) -> String {
    format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))
}

#[derive(Serialize)]
struct Descriptor<'a> {
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    digest: &'a str,
    size: usize,
}

/// Writes the archive (see the module docs) holding one image made of `layer_tar`.
pub fn write_archive(
    out: impl Write,
    image: &ImageRef,
    layer_tar: &[u8],
    config: &ImageConfig,
) -> Result<WrittenImage, ArchiveError> {
    let created = rfc3339(config.created)?;
    let layer_digest = sha256_digest(layer_tar);
    // `json!` objects serialize their keys in a fixed order (sorted, or insertion order if
    // serde_json's preserve_order feature is on), so the documents are byte-stable.
    let config_json = serde_json::to_vec(&json!({
        "architecture": config.architecture,
        "os": "linux",
        "created": created,
        "config": {
            "Env": config.env,
            "Cmd": config.cmd,
            "Labels": config.labels,
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created": created, "created_by": config.created_by}],
    }))
    .map_err(std::io::Error::other)?;
    let config_digest = sha256_digest(&config_json);
    let manifest_json = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": Descriptor {
            media_type: MEDIA_TYPE_CONFIG,
            digest: &config_digest,
            size: config_json.len(),
        },
        "layers": [Descriptor {
            media_type: MEDIA_TYPE_LAYER,
            digest: &layer_digest,
            size: layer_tar.len(),
        }],
    }))
    .map_err(std::io::Error::other)?;
    let manifest_digest = sha256_digest(&manifest_json);
    let index_json = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_INDEX,
        "manifests": [{
            "mediaType": MEDIA_TYPE_MANIFEST,
            "digest": manifest_digest,
            "size": manifest_json.len(),
            "platform": {"architecture": config.architecture, "os": "linux"},
            "annotations": {
                // containerd names imported images after this annotation.
                "io.containerd.image.name": image.full(),
                "org.opencontainers.image.ref.name": image.tag(),
            },
        }],
    }))
    .map_err(std::io::Error::other)?;
    let docker_manifest = serde_json::to_vec(&json!([{
        "Config": blob_path(&config_digest),
        "RepoTags": [image.familiar()],
        "Layers": [blob_path(&layer_digest)],
    }]))
    .map_err(std::io::Error::other)?;
    let repositories = serde_json::to_vec(&json!({
        image.familiar_repository(): {
            image.tag(): layer_digest.trim_start_matches("sha256:"),
        },
    }))
    .map_err(std::io::Error::other)?;

    let mut files: BTreeMap<String, &[u8]> = BTreeMap::new();
    files.insert(blob_path(&layer_digest), layer_tar);
    files.insert(blob_path(&config_digest), &config_json);
    files.insert(blob_path(&manifest_digest), &manifest_json);
    files.insert("index.json".into(), &index_json);
    files.insert("manifest.json".into(), &docker_manifest);
    files.insert("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#);
    files.insert("repositories".into(), &repositories);

    let mut tar = tar::Builder::new(out);
    append_dir(&mut tar, "blobs", 0o755, config.created)?;
    append_dir(&mut tar, "blobs/sha256", 0o755, config.created)?;
    for (path, data) in files {
        append_file(&mut tar, &path, 0o644, config.created, data)?;
    }
    tar.into_inner()?.flush()?;
    Ok(WrittenImage {
        manifest: manifest_digest,
        config: config_digest,
        layer: layer_digest,
    })
}

/// Seconds since the epoch as RFC 3339 UTC (`1970-01-01T00:00:00Z`).
pub fn rfc3339(seconds: u64) -> Result<String, ArchiveError> {
    i64::try_from(seconds)
        .ok()
        .and_then(|seconds| jiff::Timestamp::from_second(seconds).ok())
        .map(|instant| instant.to_string())
        .ok_or(ArchiveError::CreatedOutOfRange { seconds })
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn short_names_normalize_like_docker() {
        let image = ImageRef::parse("weir").unwrap();
        assert_eq!(image.full(), "docker.io/library/weir:latest");
        assert_eq!(image.familiar(), "weir:latest");
        let image = ImageRef::parse("weir:dev").unwrap();
        assert_eq!(image.full(), "docker.io/library/weir:dev");
        assert_eq!(image.familiar_repository(), "weir");
        let image = ImageRef::parse("someone/weir:v1").unwrap();
        assert_eq!(image.full(), "docker.io/someone/weir:v1");
        assert_eq!(image.familiar(), "someone/weir:v1");
    }

    #[test]
    fn registries_with_ports_keep_their_domain() {
        let image = ImageRef::parse("localhost:5000/weir:dev").unwrap();
        assert_eq!(image.full(), "localhost:5000/weir:dev");
        assert_eq!(image.familiar(), "localhost:5000/weir:dev");
        let image = ImageRef::parse("registry.example/team/weir").unwrap();
        assert_eq!(image.full(), "registry.example/team/weir:latest");
        // A port without a tag is not mistaken for a tag.
        let image = ImageRef::parse("registry.example:5000/weir").unwrap();
        assert_eq!(image.full(), "registry.example:5000/weir:latest");
    }

    #[test]
    fn malformed_references_are_refused() {
        for reference in [
            "Weir:dev",
            "weir:",
            "weir:-x",
            "weir@sha256:0123",
            "we//ir",
            "weir-:dev",
            "",
        ] {
            assert!(
                ImageRef::parse(reference).is_err(),
                "{reference:?} was accepted"
            );
        }
    }

    #[test]
    fn parents_are_added_and_entries_sorted() {
        let mut layer = Layer::default();
        layer
            .add_file("/usr/local/bin/weir-agent", 0o755, b"x".to_vec())
            .unwrap();
        layer.add_symlink("/bin/sh", "busybox").unwrap();
        layer.add_dir("/tmp", 0o1777).unwrap();
        let paths: Vec<&str> = layer.paths().collect();
        assert_eq!(
            paths,
            [
                "bin",
                "bin/sh",
                "tmp",
                "usr",
                "usr/local",
                "usr/local/bin",
                "usr/local/bin/weir-agent"
            ]
        );
    }

    #[test]
    fn a_file_under_a_file_is_refused() {
        let mut layer = Layer::default();
        layer.add_file("/etc/passwd", 0o644, vec![]).unwrap();
        assert!(matches!(
            layer.add_file("/etc/passwd/x", 0o644, vec![]),
            Err(ArchiveError::ParentNotDirectory { .. })
        ));
        assert!(matches!(
            layer.add_file("/etc/passwd", 0o644, vec![]),
            Err(ArchiveError::DuplicatePath { .. })
        ));
        assert!(matches!(
            layer.add_file("/etc/../x", 0o644, vec![]),
            Err(ArchiveError::InvalidPath { .. })
        ));
    }

    /// One entry as read back: (path, type, mode, mtime, data, link target).
    type ReadEntry = (String, tar::EntryType, u32, u64, Vec<u8>, Option<String>);

    /// Reads the tar back with an independent implementation (the `tar` crate).
    fn read_back(bytes: &[u8]) -> Vec<ReadEntry> {
        let mut archive = tar::Archive::new(bytes);
        archive
            .entries()
            .unwrap()
            .map(|entry| {
                let mut entry = entry.unwrap();
                let header = entry.header().clone();
                let path = entry.path().unwrap().to_string_lossy().into_owned();
                let link = entry
                    .link_name()
                    .unwrap()
                    .map(|l| l.to_string_lossy().into_owned());
                let mut data = Vec::new();
                entry.read_to_end(&mut data).unwrap();
                (
                    path,
                    header.entry_type(),
                    header.mode().unwrap(),
                    header.mtime().unwrap(),
                    data,
                    link,
                )
            })
            .collect()
    }

    #[test]
    fn layer_tar_reads_back_with_modes_links_and_mtime() {
        let mut layer = Layer::default();
        layer.add_file("/bin/busybox", 0o755, vec![7; 700]).unwrap();
        layer.add_symlink("/bin/sh", "busybox").unwrap();
        layer.add_dir("/tmp", 0o1777).unwrap();
        let bytes = layer.to_tar(1_700_000_000).unwrap();
        assert_eq!(bytes.len() % 512, 0);
        let entries = read_back(&bytes);
        let summary: Vec<_> = entries
            .iter()
            .map(|(path, kind, mode, mtime, data, link)| {
                (
                    path.as_str(),
                    *kind,
                    *mode,
                    *mtime,
                    data.len(),
                    link.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "bin/",
                    tar::EntryType::Directory,
                    0o755,
                    1_700_000_000,
                    0,
                    None
                ),
                (
                    "bin/busybox",
                    tar::EntryType::Regular,
                    0o755,
                    1_700_000_000,
                    700,
                    None
                ),
                (
                    "bin/sh",
                    tar::EntryType::Symlink,
                    0o777,
                    1_700_000_000,
                    0,
                    Some("busybox")
                ),
                (
                    "tmp/",
                    tar::EntryType::Directory,
                    0o1777,
                    1_700_000_000,
                    0,
                    None
                ),
            ]
        );
        assert_eq!(entries[1].4, vec![7; 700]);
    }

    #[test]
    fn names_over_255_bytes_and_link_targets_over_100_read_back() {
        let deep = format!("{}/{}/{}", "d".repeat(120), "e".repeat(120), "f".repeat(60));
        let flat = "x".repeat(120);
        let target = format!("/{}/{}", "t".repeat(120), "busybox");
        let mut layer = Layer::default();
        layer.add_file(&deep, 0o644, b"deep".to_vec()).unwrap();
        layer.add_file(&flat, 0o600, b"flat".to_vec()).unwrap();
        layer.add_symlink("/bin/long", &target).unwrap();
        layer
            .add_symlink(&format!("{deep}-link"), "busybox")
            .unwrap();
        let bytes = layer.to_tar(7).unwrap();
        assert_eq!(bytes, layer.to_tar(7).unwrap(), "the tar is deterministic");
        let entries = read_back(&bytes);
        let find = |path: &str| {
            entries
                .iter()
                .find(|entry| entry.0 == path)
                .unwrap_or_else(|| panic!("{path} is not in the tar"))
        };
        assert!(deep.len() > 255);
        let file = find(&deep);
        assert_eq!(
            (file.1, file.2, file.3),
            (tar::EntryType::Regular, 0o644, 7)
        );
        assert_eq!(file.4, b"deep");
        assert_eq!(find(&flat).4, b"flat");
        assert!(target.len() > 100);
        let link = find("bin/long");
        assert_eq!(link.1, tar::EntryType::Symlink);
        assert_eq!(link.5.as_deref(), Some(target.as_str()));
        let link = find(&format!("{deep}-link"));
        assert_eq!(link.5.as_deref(), Some("busybox"));
        // Parents of the deep path are directories named in full.
        let parent = format!("{}/{}/", "d".repeat(120), "e".repeat(120));
        assert_eq!(find(&parent).1, tar::EntryType::Directory);
    }

    fn sample_config() -> ImageConfig {
        ImageConfig {
            architecture: "amd64".into(),
            env: vec!["PATH=/usr/local/bin:/bin".into()],
            cmd: vec!["/usr/local/bin/weir-agent".into(), "--help".into()],
            labels: BTreeMap::from([("org.opencontainers.image.title".into(), "weir".into())]),
            created: 0,
            created_by: "test".into(),
        }
    }

    fn sample_layer() -> Vec<u8> {
        let mut layer = Layer::default();
        layer
            .add_file("/usr/local/bin/weir-agent", 0o755, b"#!agent".to_vec())
            .unwrap();
        layer.to_tar(0).unwrap()
    }

    #[test]
    fn archives_are_byte_identical_across_builds() {
        let image = ImageRef::parse("weir:dev").unwrap();
        let mut first = Vec::new();
        let mut second = Vec::new();
        let a = write_archive(&mut first, &image, &sample_layer(), &sample_config()).unwrap();
        let b = write_archive(&mut second, &image, &sample_layer(), &sample_config()).unwrap();
        assert_eq!(a, b);
        assert_eq!(first, second);
        // A different tag is a different index, not a different image.
        let mut third = Vec::new();
        let other = ImageRef::parse("weir:other").unwrap();
        let c = write_archive(&mut third, &other, &sample_layer(), &sample_config()).unwrap();
        assert_eq!(c.manifest, a.manifest);
        assert_ne!(first, third);
    }

    #[test]
    fn oci_index_and_docker_manifest_name_the_same_blobs() {
        let image = ImageRef::parse("weir:dev").unwrap();
        let mut bytes = Vec::new();
        let layer = sample_layer();
        let written = write_archive(&mut bytes, &image, &layer, &sample_config()).unwrap();
        let files: BTreeMap<String, Vec<u8>> = read_back(&bytes)
            .into_iter()
            .filter(|entry| entry.1 == tar::EntryType::Regular)
            .map(|entry| (entry.0, entry.4))
            .collect();
        // Every blob is stored under its own digest.
        for (path, data) in &files {
            if let Some(hex) = path.strip_prefix("blobs/sha256/") {
                assert_eq!(sha256_digest(data), format!("sha256:{hex}"));
            }
        }
        let json =
            |name: &str| -> serde_json::Value { serde_json::from_slice(&files[name]).unwrap() };
        assert_eq!(json("oci-layout")["imageLayoutVersion"], "1.0.0");
        let index = json("index.json");
        let entry = &index["manifests"][0];
        assert_eq!(entry["digest"], written.manifest.as_str());
        assert_eq!(
            entry["annotations"]["io.containerd.image.name"],
            "docker.io/library/weir:dev"
        );
        assert_eq!(
            entry["annotations"]["org.opencontainers.image.ref.name"],
            "dev"
        );
        let manifest = json(&blob_path(&written.manifest));
        assert_eq!(manifest["config"]["digest"], written.config.as_str());
        assert_eq!(manifest["layers"][0]["digest"], written.layer.as_str());
        assert_eq!(manifest["layers"][0]["size"], layer.len());
        let docker = json("manifest.json");
        assert_eq!(docker[0]["Config"], blob_path(&written.config));
        assert_eq!(docker[0]["Layers"][0], blob_path(&written.layer));
        assert_eq!(docker[0]["RepoTags"][0], "weir:dev");
        let config = json(&blob_path(&written.config));
        assert_eq!(config["rootfs"]["diff_ids"][0], written.layer.as_str());
        assert_eq!(config["created"], "1970-01-01T00:00:00Z");
        assert_eq!(config["os"], "linux");
        assert_eq!(
            json("repositories")["weir"]["dev"],
            written.layer.trim_start_matches("sha256:")
        );
    }

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339(0).unwrap(), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400).unwrap(), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000).unwrap(), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(4_102_444_799).unwrap(), "2099-12-31T23:59:59Z");
        assert!(matches!(
            rfc3339(u64::MAX),
            Err(ArchiveError::CreatedOutOfRange { .. })
        ));
    }
}
