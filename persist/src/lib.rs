//! Durable, atomic replacement of a file: the one way weir persists state (IPAM allocations,
//! the agent's endpoints, the controller's node CIDRs and sync status, installed CNI files,
//! local cluster records and manifests, image archives).
//!
//! The new contents go to a temporary file in the target's directory (`.NAME.XXXXXX.tmp`,
//! created with `O_EXCL` by [`tempfile`]), which is given its mode, fsync'd, renamed over the
//! target (atomic on POSIX file systems), and then the directory is fsync'd so the rename
//! itself survives a power loss. A reader, or the same program after a crash, therefore
//! sees the old contents or the new ones, never a mix. When any step fails, the temporary
//! file is removed and the target is left as it was.
//!
//! Only a crash between creating the temporary file and renaming it can leave a
//! `.NAME.XXXXXX.tmp` behind; nothing reads those files, and a writer that knows it is the
//! only one (it holds a lock, or it is the only process that writes there) removes them
//! with [`remove_leftovers`].

use std::{
    fs::{File, Permissions},
    io::{self, BufWriter, Write},
    os::unix::fs::PermissionsExt,
    path::Path,
};

/// Random characters in a temporary file's name (tempfile's default).
const RANDOM_LEN: usize = 6;

/// Replaces `path` with `contents`, with permission bits `mode` (exactly, whatever the
/// umask). See the crate docs for the guarantees.
pub fn replace(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    replace_with(path, mode, |out| out.write_all(contents))
}

/// Replaces `path` with what `write` writes (buffered), with permission bits `mode`. If
/// `write` fails, its error is returned and `path` is left as it was.
pub fn replace_with<T>(
    path: &Path,
    mode: u32,
    write: impl FnOnce(&mut dyn Write) -> io::Result<T>,
) -> io::Result<T> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} does not name a file", path.display()),
        )
    })?;
    let dir = parent(path);
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".");
    // Dropping the temporary file (on any early return below) deletes it.
    let temp = tempfile::Builder::new()
        .prefix(&prefix)
        .rand_bytes(RANDOM_LEN)
        .suffix(".tmp")
        .tempfile_in(dir)?;
    // fchmod, not the creation mode: the umask must not change what the caller asked for.
    temp.as_file()
        .set_permissions(Permissions::from_mode(mode & 0o7777))?;
    let value = {
        let mut out = BufWriter::new(temp.as_file());
        let value = write(&mut out)?;
        out.flush()?;
        value
    };
    temp.as_file().sync_all()?;
    temp.persist(path).map_err(|error| error.error)?;
    File::open(dir)?.sync_all()?;
    Ok(value)
}

/// Removes the temporary files a crashed [`replace`] of `path` left (`.NAME.XXXXXX.tmp`),
/// and returns how many. Only for a caller that is the only writer of `path`: another
/// writer's temporary file in flight would be removed too.
pub fn remove_leftovers(path: &Path) -> io::Result<usize> {
    let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
        return Ok(0);
    };
    let prefix = format!(".{name}.");
    let mut removed = 0;
    for entry in std::fs::read_dir(parent(path))? {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(random) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|n| n.strip_suffix(".tmp"))
        else {
            continue;
        };
        if random.len() == RANDOM_LEN && random.bytes().all(|b| b.is_ascii_alphanumeric()) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
        }
    }
    Ok(removed)
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::PermissionsExt};

    use super::*;

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_new_file_gets_its_contents_and_exact_mode_and_no_temp_file_remains() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        for mode in [0o600, 0o755, 0o644] {
            replace(&path, format!("mode {mode:o}").as_bytes(), mode).unwrap();
            assert_eq!(fs::read_to_string(&path).unwrap(), format!("mode {mode:o}"));
            let actual = fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
            assert_eq!(actual, mode, "{actual:o} instead of {mode:o}");
        }
        assert_eq!(names_in(dir.path()), ["state.json"]);
    }

    #[test]
    fn a_failing_writer_leaves_the_old_contents_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        replace(&path, b"old", 0o600).unwrap();
        let error = replace_with(&path, 0o600, |out| {
            out.write_all(b"half a wri")?;
            Err::<(), _>(io::Error::other("serializer failed"))
        })
        .unwrap_err();
        assert_eq!(error.to_string(), "serializer failed");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(names_in(dir.path()), ["state.json"]);
    }

    #[test]
    fn a_failing_rename_leaves_the_target_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // A non-empty directory cannot be replaced by a file.
        let path = dir.path().join("taken");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("inside"), b"x").unwrap();
        assert!(replace(&path, b"new", 0o644).is_err());
        assert!(path.join("inside").is_file());
        assert_eq!(names_in(dir.path()), ["taken"]);
    }

    #[test]
    fn a_missing_directory_is_an_error_not_a_created_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("state.json");
        let error = replace(&path, b"x", 0o644).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert!(names_in(dir.path()).is_empty());
    }

    #[test]
    fn the_writer_value_is_returned_and_a_path_without_a_file_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("archive.tar");
        let written = replace_with(&path, 0o644, |out| {
            out.write_all(b"abc")?;
            Ok(3)
        })
        .unwrap();
        assert_eq!(written, 3);
        assert_eq!(fs::read(&path).unwrap(), b"abc");
        assert!(replace(Path::new("/"), b"x", 0o644).is_err());
    }

    #[test]
    fn leftovers_of_this_file_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        replace(&path, b"kept", 0o600).unwrap();
        for name in [
            ".state.json.a1B2c3.tmp",
            ".state.json.zzzzzz.tmp",
            ".state.json.short.tmp",
            ".other.json.a1B2c3.tmp",
            "state.json.tmp",
        ] {
            fs::write(dir.path().join(name), b"half").unwrap();
        }
        assert_eq!(remove_leftovers(&path).unwrap(), 2);
        assert_eq!(
            names_in(dir.path()),
            [
                ".other.json.a1B2c3.tmp",
                ".state.json.short.tmp",
                "state.json",
                "state.json.tmp"
            ]
        );
        assert_eq!(fs::read(&path).unwrap(), b"kept");
    }
}
