//! The BPF file system the agent pins its programs, links and maps in.
//!
//! Pins outlive the process only on a bpffs (`BPF_OBJ_PIN` refuses any other file system), and
//! pinned links and maps are what keep pods connected and policed while no agent runs. Most
//! distributions mount one at `/sys/fs/bpf` at boot (systemd does), but not every node image
//! does: kind's nodes, for one, may come without. The agent then mounts one itself.
//!
//! In the DaemonSet, `/sys/fs/bpf` is the host's directory mounted with `Bidirectional`
//! propagation, so a bpffs the agent mounts there is mounted on the host and outlives the
//! pod: the next agent finds it, with the pins in it. The mount uses `mode=0700`, as systemd
//! mounts it: pinned objects are root's.

use std::{
    io,
    path::{Path, PathBuf},
};

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, FsType, statfs},
};

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("creating the bpffs mount point {}: {source}", path.display())]
    MountPoint { path: PathBuf, source: io::Error },
    #[error("finding the file system at {}: {source}", path.display())]
    Statfs { path: PathBuf, source: nix::Error },
    #[error(
        "mounting a bpf file system at {}: {source}; mounting needs CAP_SYS_ADMIN, and in a \
         container the directory must be the host's, mounted with Bidirectional propagation \
         (or mount it on the node: mount -t bpf bpffs {})",
        path.display(),
        path.display()
    )]
    Mount { path: PathBuf, source: nix::Error },
    #[error(
        "{} is not a bpf file system even after mounting one there (found {found:?})",
        path.display()
    )]
    StillNotBpffs { path: PathBuf, found: FsType },
}

/// What [`ensure_mounted`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BpffsMount {
    /// A bpffs was already mounted there.
    Present,
    /// This call mounted one.
    Mounted,
}

/// Whether `path` is the root of, or inside, a mounted bpf file system.
pub fn is_bpffs(path: &Path) -> Result<bool, BpffsError> {
    Ok(fs_type(path)? == BPF_FS_MAGIC)
}

fn fs_type(path: &Path) -> Result<FsType, BpffsError> {
    let stat = statfs(path).map_err(|source| BpffsError::Statfs {
        path: path.to_owned(),
        source,
    })?;
    Ok(stat.filesystem_type())
}

/// Makes `path` a bpffs: creates the directory if needed and mounts a bpf file system on it
/// unless one is there already. Idempotent.
pub fn ensure_mounted(path: &Path) -> Result<BpffsMount, BpffsError> {
    std::fs::create_dir_all(path).map_err(|source| BpffsError::MountPoint {
        path: path.to_owned(),
        source,
    })?;
    if is_bpffs(path)? {
        return Ok(BpffsMount::Present);
    }
    mount(
        Some("bpffs"),
        path,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(|source| BpffsError::Mount {
        path: path.to_owned(),
        source,
    })?;
    let found = fs_type(path)?;
    if found != BPF_FS_MAGIC {
        return Err(BpffsError::StillNotBpffs {
            path: path.to_owned(),
            found,
        });
    }
    Ok(BpffsMount::Mounted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    /// Runs `f` on a thread of its own in a new, private mount namespace: nothing it mounts
    /// is seen by (or propagates to) the rest of the system, and the namespace, with every
    /// mount in it, goes away when the thread ends.
    fn in_private_mount_namespace<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            // unshare(CLONE_NEWNS) also unshares this thread's file system attributes
            // (CLONE_FS), so it applies to this thread alone.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .expect("making every mount private");
            f()
        })
        .join()
        .expect("the namespace thread")
    }

    #[test]
    fn an_ordinary_directory_is_not_a_bpffs() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_bpffs(dir.path()).unwrap());
    }

    #[test]
    fn detection_agrees_with_the_mount_table() {
        let mounted = std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .any(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                fields.get(1) == Some(&"/sys/fs/bpf") && fields.get(2) == Some(&"bpf")
            });
        assert_eq!(is_bpffs(Path::new("/sys/fs/bpf")).unwrap(), mounted);
    }

    #[test]
    fn a_missing_bpffs_is_mounted_once_and_then_found() {
        assert!(
            is_root(),
            "mounting a bpf file system needs root: run the tests as root (cargo xtask test)"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sys/fs/bpf");
        let inside = path.clone();
        let (first, second, pinnable) = in_private_mount_namespace(move || {
            let first = ensure_mounted(&inside).unwrap();
            let second = ensure_mounted(&inside).unwrap();
            let pinnable = is_bpffs(&inside.join(".")).unwrap();
            nix::mount::umount(&inside).unwrap();
            (first, second, pinnable)
        });
        assert_eq!(first, BpffsMount::Mounted);
        assert_eq!(second, BpffsMount::Present, "idempotent");
        assert!(pinnable);
        assert!(
            !is_bpffs(&path).unwrap(),
            "the mount stayed in the private namespace"
        );
    }

    #[test]
    fn a_mount_point_that_cannot_be_a_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let err = ensure_mounted(&file.join("bpf")).unwrap_err();
        assert!(matches!(err, BpffsError::MountPoint { .. }), "{err}");
        assert!(err.to_string().contains("file/bpf"), "{err}");
    }
}
