//! `weir-agent install-cni`: puts the `weir-cni` plugin and its network configuration on the
//! node (the DaemonSet's init container runs it with the node's `/opt/cni/bin` and
//! `/etc/cni/net.d` mounted).
//!
//! Every file is written under a hidden temporary name in its final directory and renamed
//! into place. The container runtime may exec the plugin or read `net.d` at any moment, and a
//! rename is atomic: it never sees half a binary or half a configuration, and replacing a
//! plugin that is running works (writing over it in place fails with `ETXTBSY`). libcni
//! ignores the temporary names (they start with `.` and end in neither `.conf`,
//! `.conflist` nor `.json`). A file that already has the wanted contents and mode is left
//! alone, so running it again changes nothing.
//!
//! The configuration has one plugin, `weir-cni`, which forwards every call to the agent on
//! `agentSocket`. It can come from a file instead (a ConfigMap, to chain more plugins),
//! which must be a configuration list that uses `weir-cni`.
//!
//! Its `cniVersion` is [`CNI_VERSION`], 1.0.0, unless `--cni-version` says otherwise. The
//! runtime's CNI library refuses a configuration newer than it knows, and only after the
//! plugin has run: containerd 1.6 and 1.7 (libcni 1.1) fail every sandbox of a 1.1.0
//! configuration with `unsupported CNI result version "1.1.0"`, after ADD has attached the
//! pod. 1.0.0 is read by every runtime Kubernetes still supports; 1.1.0 adds `STATUS` and
//! `GC`, which only runtimes with libcni 1.2 or newer (containerd 2.0) send. The plugin
//! answers in whichever version the configuration names (see `weir_cni::spec::CniVersion`).

use std::{
    fs, io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use serde::Serialize;
use serde_json::Value;
use weir_cni::spec::CniVersion;

/// File name of the plugin, the `type` in the configuration.
pub const PLUGIN: &str = "weir-cni";
/// File name of the configuration: the `10-` prefix sorts it before the configurations of
/// most other networks, since the runtime uses the first in lexical order.
pub const CONFLIST: &str = "10-weir.conflist";
/// The network's name in the configuration.
pub const NETWORK_NAME: &str = "weir";
/// The CNI version of the configuration unless the installer is told another (see the
/// module docs for why not the newest).
pub const CNI_VERSION: CniVersion = CniVersion::V1_0_0;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("locating the running program (to find {PLUGIN} next to it): {0}")]
    CurrentExe(io::Error),
    #[error("{}: not a CNI configuration list for weir: {reason}", path.display())]
    BadConflist { path: PathBuf, reason: String },
    #[error("{}: {source}", path.display())]
    UnsupportedVersion {
        path: PathBuf,
        source: weir_cni::spec::VersionError,
    },
}

/// Where the network configuration comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConflistSource {
    /// weir's own, with the agent listening on this socket.
    Generated { agent_socket: PathBuf },
    /// A file, copied as is after checking it.
    File(PathBuf),
}

/// What to install where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstallCni {
    /// The plugin binary to install.
    pub plugin: PathBuf,
    /// The node's CNI binary directory.
    pub bin_dir: PathBuf,
    /// The node's CNI configuration directory.
    pub conf_dir: PathBuf,
    pub conflist: ConflistSource,
    /// The `cniVersion` to install: of the generated configuration, or written over the
    /// file's. `None`: [`CNI_VERSION`] for the generated one, the file's own for a file.
    pub cni_version: Option<CniVersion>,
}

/// Whether a file had to be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Written,
    Unchanged,
}

/// What [`install`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Installed {
    pub plugin: Outcome,
    pub conflist: Outcome,
    /// The `cniVersion` of the installed configuration.
    pub cni_version: CniVersion,
}

/// `weir-cni` in the directory of the running program (the image keeps all binaries in one
/// directory).
pub fn plugin_next_to_current_exe() -> Result<PathBuf, InstallError> {
    let exe = std::env::current_exe().map_err(InstallError::CurrentExe)?;
    Ok(exe.with_file_name(PLUGIN))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PluginEntry<'a> {
    #[serde(rename = "type")]
    plugin_type: &'a str,
    agent_socket: &'a Path,
    /// `portMappings`: the runtime passes the pod's hostPorts, which the agent serves
    /// itself (no `portmap` plugin needed).
    capabilities: Capabilities,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Capabilities {
    port_mappings: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Conflist<'a> {
    cni_version: CniVersion,
    name: &'a str,
    plugins: [PluginEntry<'a>; 1],
}

/// weir's network configuration list (CNI spec section 1, "Network configuration format").
pub fn conflist(agent_socket: &Path, cni_version: CniVersion) -> String {
    let list = Conflist {
        cni_version,
        name: NETWORK_NAME,
        plugins: [PluginEntry {
            plugin_type: PLUGIN,
            agent_socket,
            capabilities: Capabilities {
                port_mappings: true,
            },
        }],
    };
    let mut text = serde_json::to_string_pretty(&list).expect("a fixed structure serializes");
    text.push('\n');
    text
}

/// Checks that `text` is a configuration list with a version the plugin speaks, a name, and
/// `weir-cni` among its plugins; returns it parsed, and its version.
fn check_conflist(path: &Path, text: &[u8]) -> Result<(Value, CniVersion), InstallError> {
    let bad = |reason: &str| InstallError::BadConflist {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let list: Value = serde_json::from_slice(text).map_err(|e| bad(&e.to_string()))?;
    let version = list["cniVersion"]
        .as_str()
        .ok_or_else(|| bad("no cniVersion"))?;
    let version =
        version
            .parse::<CniVersion>()
            .map_err(|source| InstallError::UnsupportedVersion {
                path: path.to_owned(),
                source,
            })?;
    if !list["name"].is_string() {
        return Err(bad("no name"));
    }
    let plugins = list["plugins"]
        .as_array()
        .ok_or_else(|| bad("no plugins list"))?;
    if !plugins.iter().any(|p| p["type"] == PLUGIN) {
        return Err(bad(&format!("no plugin of type {PLUGIN}")));
    }
    Ok((list, version))
}

/// Installs the plugin and the configuration. Idempotent.
pub fn install(spec: &InstallCni) -> Result<Installed, InstallError> {
    let plugin_bytes = fs::read(&spec.plugin).map_err(|source| InstallError::Read {
        path: spec.plugin.clone(),
        source,
    })?;
    let (conflist_bytes, cni_version) = match &spec.conflist {
        ConflistSource::Generated { agent_socket } => {
            let version = spec.cni_version.unwrap_or(CNI_VERSION);
            (conflist(agent_socket, version).into_bytes(), version)
        }
        ConflistSource::File(path) => {
            let bytes = fs::read(path).map_err(|source| InstallError::Read {
                path: path.clone(),
                source,
            })?;
            let (mut list, version) = check_conflist(path, &bytes)?;
            match spec.cni_version {
                // Keys come out sorted; the runtime reads the same configuration.
                Some(wanted) if wanted != version => {
                    list["cniVersion"] = wanted.as_str().into();
                    let mut text =
                        serde_json::to_string_pretty(&list).expect("parsed JSON serializes");
                    text.push('\n');
                    (text.into_bytes(), wanted)
                }
                _ => (bytes, version),
            }
        }
    };
    // The init container is the only writer of these files: what one that died left can go.
    for target in [spec.bin_dir.join(PLUGIN), spec.conf_dir.join(CONFLIST)] {
        weir_persist::remove_leftovers(&target).map_err(|source| InstallError::Write {
            path: target.clone(),
            source,
        })?;
    }
    // The configuration last: a runtime that finds it must find the plugin too.
    let plugin = replace_file(&spec.bin_dir, PLUGIN, &plugin_bytes, 0o755)?;
    let conflist = replace_file(&spec.conf_dir, CONFLIST, &conflist_bytes, 0o644)?;
    Ok(Installed {
        plugin,
        conflist,
        cni_version,
    })
}

/// Makes `dir/name` hold `contents` with permissions `mode`, atomically and durably
/// ([`weir_persist::replace`]): readers see the old file or the new one, never a mix.
/// Leaves the file alone if it already has these contents and mode.
pub fn replace_file(
    dir: &Path,
    name: &str,
    contents: &[u8],
    mode: u32,
) -> Result<Outcome, InstallError> {
    let target = dir.join(name);
    if let Ok(meta) = fs::metadata(&target)
        && meta.is_file()
        && meta.permissions().mode() & 0o7777 == mode
        && fs::read(&target).is_ok_and(|current| current == contents)
    {
        return Ok(Outcome::Unchanged);
    }
    weir_persist::replace(&target, contents, mode).map_err(|source| InstallError::Write {
        path: target,
        source,
    })?;
    Ok(Outcome::Written)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Node {
        _root: tempfile::TempDir,
        bin: PathBuf,
        net_d: PathBuf,
        plugin: PathBuf,
    }

    fn node() -> Node {
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("opt/cni/bin");
        let net_d = root.path().join("etc/cni/net.d");
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(&net_d).unwrap();
        let plugin = root.path().join("image-weir-cni");
        fs::write(&plugin, b"\x7fELF plugin v1").unwrap();
        Node {
            _root: root,
            bin,
            net_d,
            plugin,
        }
    }

    fn spec(n: &Node, conflist: ConflistSource) -> InstallCni {
        InstallCni {
            plugin: n.plugin.clone(),
            bin_dir: n.bin.clone(),
            conf_dir: n.net_d.clone(),
            conflist,
            cni_version: None,
        }
    }

    /// What the runtime hands the plugin from the installed list: the list's first plugin
    /// entry plus the list's name and version (CNI spec section 3), as the plugin parses it.
    fn derived_config(n: &Node) -> weir_cni::spec::PluginInput {
        let list: Value =
            serde_json::from_slice(&fs::read(n.net_d.join(CONFLIST)).unwrap()).unwrap();
        let mut derived = list["plugins"][0].clone();
        derived["name"] = list["name"].clone();
        derived["cniVersion"] = list["cniVersion"].clone();
        weir_cni::spec::PluginInput::parse(derived.to_string().as_bytes()).unwrap()
    }

    fn generated() -> ConflistSource {
        ConflistSource::Generated {
            agent_socket: PathBuf::from("/run/weir/cni.sock"),
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn hidden_files(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect()
    }

    #[test]
    fn installs_the_plugin_and_a_conflist_the_plugin_accepts() {
        let n = node();
        let done = install(&spec(&n, generated())).unwrap();
        assert_eq!(
            done,
            Installed {
                plugin: Outcome::Written,
                conflist: Outcome::Written,
                cni_version: CniVersion::V1_0_0,
            }
        );
        assert_eq!(fs::read(n.bin.join(PLUGIN)).unwrap(), b"\x7fELF plugin v1");
        assert_eq!(mode(&n.bin.join(PLUGIN)), 0o755);
        assert_eq!(mode(&n.net_d.join(CONFLIST)), 0o644);
        assert!(hidden_files(&n.bin).is_empty() && hidden_files(&n.net_d).is_empty());

        let input = derived_config(&n);
        // Not 1.1.0: containerd 1.6 and 1.7 refuse every sandbox of a 1.1.0 configuration.
        assert_eq!(input.config.cni_version, CniVersion::V1_0_0);
        assert_eq!(input.config.plugin_type, PLUGIN);
        assert_eq!(
            input.config.agent_socket,
            Path::new(weir_cni::spec::DEFAULT_AGENT_SOCKET)
        );
    }

    #[test]
    fn the_generated_conflist_is_the_one_the_manifests_ship() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/config.yaml");
        let yaml = fs::read_to_string(path).unwrap();
        let shipped = serde_norway::Deserializer::from_str(&yaml)
            .map(|doc| <Value as serde::Deserialize>::deserialize(doc).unwrap())
            .find(|o| o["metadata"]["name"] == "weir-cni-config")
            .expect("ConfigMap weir-cni-config");
        assert_eq!(
            shipped["data"][CONFLIST].as_str(),
            Some(conflist(Path::new(weir_cni::spec::DEFAULT_AGENT_SOCKET), CNI_VERSION).as_str())
        );
    }

    #[test]
    fn a_second_run_changes_nothing() {
        let n = node();
        install(&spec(&n, generated())).unwrap();
        let before = fs::metadata(n.bin.join(PLUGIN)).unwrap();
        let again = install(&spec(&n, generated())).unwrap();
        assert_eq!(
            again,
            Installed {
                plugin: Outcome::Unchanged,
                conflist: Outcome::Unchanged,
                cni_version: CNI_VERSION,
            }
        );
        let after = fs::metadata(n.bin.join(PLUGIN)).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(before.ino(), after.ino(), "the file was not replaced");
    }

    #[test]
    fn a_new_plugin_replaces_the_old_one_by_rename() {
        let n = node();
        install(&spec(&n, generated())).unwrap();
        // Someone holds the old binary open (the runtime running it): it stays intact.
        let mut running = fs::File::open(n.bin.join(PLUGIN)).unwrap();
        fs::write(&n.plugin, b"\x7fELF plugin v2").unwrap();
        let done = install(&spec(&n, generated())).unwrap();
        assert_eq!(done.plugin, Outcome::Written);
        assert_eq!(done.conflist, Outcome::Unchanged);
        assert_eq!(fs::read(n.bin.join(PLUGIN)).unwrap(), b"\x7fELF plugin v2");
        let mut old = Vec::new();
        io::Read::read_to_end(&mut running, &mut old).unwrap();
        assert_eq!(old, b"\x7fELF plugin v1");
    }

    #[test]
    fn a_wrong_mode_is_repaired_and_leftover_temporary_files_are_replaced() {
        let n = node();
        install(&spec(&n, generated())).unwrap();
        fs::set_permissions(n.bin.join(PLUGIN), fs::Permissions::from_mode(0o644)).unwrap();
        let leftover = n.bin.join(format!(".{PLUGIN}.Xq3v9Z.tmp"));
        fs::write(&leftover, b"half a binary").unwrap();
        assert_eq!(
            install(&spec(&n, generated())).unwrap().plugin,
            Outcome::Written
        );
        assert_eq!(mode(&n.bin.join(PLUGIN)), 0o755);
        assert!(
            hidden_files(&n.bin).is_empty(),
            "{:?}",
            hidden_files(&n.bin)
        );
    }

    #[test]
    fn a_conflist_file_is_copied_verbatim_if_it_uses_weir() {
        let n = node();
        let source = n.net_d.parent().unwrap().join("from-configmap.conflist");
        let text = "{\"cniVersion\":\"1.1.0\",\"name\":\"weir\",\"plugins\":[{\"type\":\"weir-cni\"},{\"type\":\"portmap\",\"capabilities\":{\"portMappings\":true}}]}";
        fs::write(&source, text).unwrap();
        install(&spec(&n, ConflistSource::File(source.clone()))).unwrap();
        assert_eq!(fs::read_to_string(n.net_d.join(CONFLIST)).unwrap(), text);

        fs::write(
            &source,
            "{\"cniVersion\":\"1.1.0\",\"name\":\"x\",\"plugins\":[{\"type\":\"bridge\"}]}",
        )
        .unwrap();
        let err = install(&spec(&n, ConflistSource::File(source))).unwrap_err();
        assert!(
            err.to_string().contains("no plugin of type weir-cni"),
            "{err}"
        );
        assert_eq!(
            fs::read_to_string(n.net_d.join(CONFLIST)).unwrap(),
            text,
            "a refused configuration replaces nothing"
        );
    }

    #[test]
    fn the_installer_writes_the_cni_version_it_is_given() {
        for version in [CniVersion::V0_4_0, CniVersion::V1_1_0] {
            let n = node();
            let mut wanted = spec(&n, generated());
            wanted.cni_version = Some(version);
            assert_eq!(install(&wanted).unwrap().cni_version, version);
            assert_eq!(derived_config(&n).config.cni_version, version);
        }
    }

    #[test]
    fn a_cni_version_is_written_over_a_conflist_files_and_the_rest_is_kept() {
        let n = node();
        let source = n.net_d.parent().unwrap().join("from-configmap.conflist");
        let text = "{\"cniVersion\":\"1.1.0\",\"name\":\"weir\",\"plugins\":[{\"type\":\"weir-cni\",\"agentSocket\":\"/run/x.sock\"},{\"type\":\"portmap\",\"capabilities\":{\"portMappings\":true}}]}";
        fs::write(&source, text).unwrap();
        let mut wanted = spec(&n, ConflistSource::File(source));
        wanted.cni_version = Some(CniVersion::V0_4_0);
        let done = install(&wanted).unwrap();
        assert_eq!(done.cni_version, CniVersion::V0_4_0);

        let installed: Value =
            serde_json::from_slice(&fs::read(n.net_d.join(CONFLIST)).unwrap()).unwrap();
        let mut expected: Value = serde_json::from_str(text).unwrap();
        expected["cniVersion"] = "0.4.0".into();
        assert_eq!(installed, expected);
        assert_eq!(
            install(&wanted).unwrap().conflist,
            Outcome::Unchanged,
            "a second run changes nothing"
        );
    }

    #[test]
    fn a_conflist_file_in_a_version_the_plugin_does_not_speak_is_refused() {
        for version in ["0.2.0", "1.2.0", "latest"] {
            let n = node();
            let source = n.net_d.parent().unwrap().join("from-configmap.conflist");
            fs::write(
                &source,
                format!(
                    "{{\"cniVersion\":\"{version}\",\"name\":\"weir\",\"plugins\":[{{\"type\":\"weir-cni\"}}]}}"
                ),
            )
            .unwrap();
            let err = install(&spec(&n, ConflistSource::File(source))).unwrap_err();
            assert!(
                matches!(err, InstallError::UnsupportedVersion { .. }),
                "{version}: {err}"
            );
            assert!(!n.net_d.join(CONFLIST).exists(), "{version}");
        }
    }

    #[test]
    fn a_missing_plugin_installs_nothing() {
        let n = node();
        fs::remove_file(&n.plugin).unwrap();
        let err = install(&spec(&n, generated())).unwrap_err();
        assert!(matches!(err, InstallError::Read { .. }), "{err}");
        assert!(!n.net_d.join(CONFLIST).exists());
    }
}
