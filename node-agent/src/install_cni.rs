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
//! The configuration is CNI 1.1.0 with one plugin, `weir-cni`, which forwards every call to
//! the agent on `agentSocket`. It can come from a file instead (a ConfigMap, to chain more
//! plugins), which must be a configuration list that uses `weir-cni`.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use serde::Serialize;
use serde_json::Value;

/// File name of the plugin, the `type` in the configuration.
pub const PLUGIN: &str = "weir-cni";
/// File name of the configuration: the `10-` prefix sorts it before the configurations of
/// most other networks, since the runtime uses the first in lexical order.
pub const CONFLIST: &str = "10-weir.conflist";
/// The network's name in the configuration.
pub const NETWORK_NAME: &str = "weir";
/// The CNI version of the configuration.
pub const CNI_VERSION: &str = "1.1.0";

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
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Conflist<'a> {
    cni_version: &'a str,
    name: &'a str,
    plugins: [PluginEntry<'a>; 1],
}

/// weir's network configuration list (CNI spec section 1, "Network configuration format").
pub fn conflist(agent_socket: &Path) -> String {
    let list = Conflist {
        cni_version: CNI_VERSION,
        name: NETWORK_NAME,
        plugins: [PluginEntry {
            plugin_type: PLUGIN,
            agent_socket,
        }],
    };
    let mut text = serde_json::to_string_pretty(&list).expect("a fixed structure serializes");
    text.push('\n');
    text
}

/// Checks that `text` is a configuration list with a version, a name, and `weir-cni` among
/// its plugins.
fn check_conflist(path: &Path, text: &[u8]) -> Result<(), InstallError> {
    let bad = |reason: &str| InstallError::BadConflist {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let list: Value = serde_json::from_slice(text).map_err(|e| bad(&e.to_string()))?;
    if !list["cniVersion"].is_string() {
        return Err(bad("no cniVersion"));
    }
    if !list["name"].is_string() {
        return Err(bad("no name"));
    }
    let plugins = list["plugins"]
        .as_array()
        .ok_or_else(|| bad("no plugins list"))?;
    if !plugins.iter().any(|p| p["type"] == PLUGIN) {
        return Err(bad(&format!("no plugin of type {PLUGIN}")));
    }
    Ok(())
}

/// Installs the plugin and the configuration. Idempotent.
pub fn install(spec: &InstallCni) -> Result<Installed, InstallError> {
    let plugin_bytes = fs::read(&spec.plugin).map_err(|source| InstallError::Read {
        path: spec.plugin.clone(),
        source,
    })?;
    let conflist_bytes = match &spec.conflist {
        ConflistSource::Generated { agent_socket } => conflist(agent_socket).into_bytes(),
        ConflistSource::File(path) => {
            let bytes = fs::read(path).map_err(|source| InstallError::Read {
                path: path.clone(),
                source,
            })?;
            check_conflist(path, &bytes)?;
            bytes
        }
    };
    // The configuration last: a runtime that finds it must find the plugin too.
    let plugin = replace_file(&spec.bin_dir, PLUGIN, &plugin_bytes, 0o755)?;
    let conflist = replace_file(&spec.conf_dir, CONFLIST, &conflist_bytes, 0o644)?;
    Ok(Installed { plugin, conflist })
}

/// Makes `dir/name` hold `contents` with permissions `mode`, atomically: the file is written
/// and flushed under a hidden temporary name in `dir`, then renamed over `name`, and the
/// directory is flushed so the rename survives a crash. Readers see the old file or the new
/// one, never a mix. Leaves the file alone if it already has these contents and mode.
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
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = write_new(&tmp, contents, mode)
        .and_then(|()| fs::rename(&tmp, &target))
        .and_then(|()| fs::File::open(dir)?.sync_all());
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|source| InstallError::Write {
        path: target,
        source,
    })?;
    Ok(Outcome::Written)
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    // A file of the same name left by a run that died (in a container the process id is
    // often the same every time) is replaced, never written through.
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(contents)?;
    // The umask may have narrowed the mode given at creation.
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    file.sync_all()
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
        }
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
                conflist: Outcome::Written
            }
        );
        assert_eq!(fs::read(n.bin.join(PLUGIN)).unwrap(), b"\x7fELF plugin v1");
        assert_eq!(mode(&n.bin.join(PLUGIN)), 0o755);
        assert_eq!(mode(&n.net_d.join(CONFLIST)), 0o644);
        assert!(hidden_files(&n.bin).is_empty() && hidden_files(&n.net_d).is_empty());

        // What the runtime hands the plugin: its entry plus the list's name and version.
        let list: Value =
            serde_json::from_slice(&fs::read(n.net_d.join(CONFLIST)).unwrap()).unwrap();
        assert_eq!(list["cniVersion"], "1.1.0");
        let mut derived = list["plugins"][0].clone();
        derived["name"] = list["name"].clone();
        derived["cniVersion"] = list["cniVersion"].clone();
        let input = weir_cni::spec::PluginInput::parse(derived.to_string().as_bytes()).unwrap();
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
            Some(conflist(Path::new(weir_cni::spec::DEFAULT_AGENT_SOCKET)).as_str())
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
                conflist: Outcome::Unchanged
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
        let leftover = n.bin.join(format!(".{PLUGIN}.tmp-{}", std::process::id()));
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
    fn a_missing_plugin_installs_nothing() {
        let n = node();
        fs::remove_file(&n.plugin).unwrap();
        let err = install(&spec(&n, generated())).unwrap_err();
        assert!(matches!(err, InstallError::Read { .. }), "{err}");
        assert!(!n.net_d.join(CONFLIST).exists());
    }
}
