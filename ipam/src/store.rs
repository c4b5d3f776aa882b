//! The on-disk state: one JSON file, replaced atomically, plus a lock file.
//!
//! Layout of the state directory:
//!
//! * `allocations.json`: the whole state (format below), rewritten on every change.
//! * `.allocations.json.XXXXXX.tmp`: the next version while it is being written; a
//!   leftover from a crash is removed when the store is opened (under the lock).
//! * `lock`: held with `flock(LOCK_EX)` for as long as an [`Ipam`](crate::Ipam) is open.
//!
//! A change is durable before the call that made it returns: [`weir_persist::replace`]
//! writes the new file to the temporary name and fsyncs it, renames it over
//! `allocations.json` (atomic on POSIX file systems), and fsyncs the directory so the
//! rename itself survives a power loss.
//! After a crash the file therefore holds either the state before or after the change,
//! never a mix, and never loses an allocation whose `allocate` returned.
//!
//! ```json
//! {
//!   "format": 1,
//!   "pools": ["10.244.1.0/24"],
//!   "cursors": [{"pool": "10.244.1.0/24", "last": "10.244.1.7"}],
//!   "allocations": [
//!     {"containerId": "…", "ifname": "eth0", "pod": {"namespace": "default", "name": "web"},
//!      "addresses": ["10.244.1.7/24"]}
//!   ]
//! }
//! ```

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{Allocation, IpamError};

/// The version of the file format written by this crate.
pub(crate) const FORMAT: u32 = 1;

const STATE_FILE: &str = "allocations.json";
/// The temporary file of versions before weir-persist, removed when found.
const OLD_TEMP_FILE: &str = "allocations.json.tmp";
const LOCK_FILE: &str = "lock";

/// The serialised state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StateFile {
    pub(crate) format: u32,
    /// The pools configured when the file was written (informational: allocation always
    /// uses the pools given to `open`).
    pub(crate) pools: Vec<IpNet>,
    /// Per pool, the last address handed out: where the round-robin walk resumes.
    pub(crate) cursors: Vec<Cursor>,
    pub(crate) allocations: Vec<Allocation>,
}

/// Where the round-robin walk of one pool resumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Cursor {
    pub(crate) pool: IpNet,
    pub(crate) last: IpAddr,
}

/// An open, locked state directory.
#[derive(Debug)]
pub(crate) struct Store {
    state_path: PathBuf,
    /// Holds the flock; released when the store is dropped (the descriptor closes).
    _lock: File,
}

impl Store {
    /// Creates the directory if needed (mode 0700: the allocations name every pod on the
    /// node) and takes the exclusive lock.
    pub(crate) fn open(dir: &Path) -> Result<Store, IpamError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| IpamError::StateDir {
                dir: dir.to_owned(),
                source,
            })?;
        // Make the directory's own entry durable too, in case it was just created.
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)
                .and_then(|handle| handle.sync_all())
                .map_err(|source| IpamError::StateDir {
                    dir: parent.to_owned(),
                    source,
                })?;
        }
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| IpamError::Lock {
                path: lock_path.clone(),
                source,
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(IpamError::Locked {
                    dir: dir.to_owned(),
                });
            }
            Err(TryLockError::Error(source)) => {
                return Err(IpamError::Lock {
                    path: lock_path,
                    source,
                });
            }
        }
        // Holding the lock, this is the only writer: what a crashed one left can go.
        let state_path = dir.join(STATE_FILE);
        let state_dir_error = |source| IpamError::StateDir {
            dir: dir.to_owned(),
            source,
        };
        weir_persist::remove_leftovers(&state_path).map_err(state_dir_error)?;
        match fs::remove_file(dir.join(OLD_TEMP_FILE)) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => {
                return Err(state_dir_error(error));
            }
            _ => {}
        }
        Ok(Store {
            state_path,
            _lock: lock,
        })
    }

    /// The state file's path.
    pub(crate) fn state_path(&self) -> &Path {
        &self.state_path
    }

    /// Reads the state; `None` when there is no state file yet (first start).
    ///
    /// Anything unreadable or inconsistent is an error, never an empty state: starting
    /// empty would hand out addresses that running pods still use.
    pub(crate) fn load(&self) -> Result<Option<StateFile>, IpamError> {
        let bytes = match fs::read(&self.state_path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(IpamError::ReadState {
                    path: self.state_path.clone(),
                    source,
                });
            }
        };
        // Check the format before the shape, so a newer file gets the precise error.
        let format = serde_json::from_slice::<serde_json::Value>(&bytes)
            .map_err(|error| self.corrupt(error.to_string()))?
            .get("format")
            .and_then(serde_json::Value::as_u64);
        match format {
            Some(found) if found == u64::from(FORMAT) => {}
            Some(found) => {
                return Err(IpamError::UnsupportedFormat {
                    path: self.state_path.clone(),
                    format: found,
                });
            }
            None => return Err(self.corrupt("no \"format\" field".into())),
        }
        let state: StateFile =
            serde_json::from_slice(&bytes).map_err(|error| self.corrupt(error.to_string()))?;
        Ok(Some(state))
    }

    /// Replaces the state durably (see the module docs).
    pub(crate) fn save(&self, state: &StateFile) -> Result<(), IpamError> {
        let write_error = |source| IpamError::WriteState {
            path: self.state_path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(state)
            .map_err(|error| write_error(io::Error::other(error)))?;
        weir_persist::replace(&self.state_path, &bytes, 0o600).map_err(write_error)
    }

    pub(crate) fn corrupt(&self, reason: String) -> IpamError {
        IpamError::CorruptState {
            path: self.state_path.clone(),
            reason,
        }
    }
}
