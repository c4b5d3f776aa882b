//! What a run created, written down as it is created, so that `down` can remove it all
//! even after the process that built it crashed.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::netns;

/// Where runs keep their state (tmpfs: gone after a reboot, like the namespaces).
pub const RUNS_DIR: &str = "/run/weir-local";

/// A process started by a run, identified by PID *and* start time, so that teardown never
/// signals an unrelated process that reused the PID.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub pid: u32,
    pub start_time: u64,
    pub what: String,
}

impl ProcessRecord {
    pub fn new(pid: u32, what: impl Into<String>) -> Self {
        Self {
            pid,
            start_time: process_start_time(pid).unwrap_or(0),
            what: what.into(),
        }
    }

    /// Is the recorded process still the one running under that PID?
    pub fn alive(&self) -> bool {
        process_start_time(self.pid).is_some_and(|t| t == self.start_time)
    }

    /// SIGTERM, then SIGKILL after `grace`. Only if it is still our process.
    pub fn stop(&self, grace: Duration) {
        use nix::{sys::signal, unistd::Pid};
        if !self.alive() {
            return;
        }
        let pid = Pid::from_raw(self.pid as i32);
        let _ = signal::kill(pid, signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + grace;
        while self.alive() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.alive() {
            let _ = signal::kill(pid, signal::Signal::SIGKILL);
            while self.alive() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Field 22 of /proc/<pid>/stat (start time in clock ticks since boot); None for a dead or
/// zombie process.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it are space separated.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunRecord {
    pub run: String,
    pub dir: PathBuf,
    pub bpffs: PathBuf,
    /// Named network namespaces, in creation order.
    pub namespaces: Vec<String>,
    pub processes: Vec<ProcessRecord>,
    /// Node names, whose pins live under `<bpffs>/weir/<node>`.
    pub nodes: Vec<String>,
    /// Directories of the nodes' containerds (`--runtime containerd`), whose pods are
    /// removed through CRI before anything else stops.
    #[serde(default)]
    pub containerd: Vec<PathBuf>,
}

impl RunRecord {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("run.json")
    }

    pub fn save(&self) -> std::io::Result<()> {
        let path = Self::path(&self.dir);
        let bytes = serde_json::to_vec_pretty(self).expect("record serialises");
        weir_persist::replace(&path, &bytes, 0o644)
    }

    pub fn load(dir: &Path) -> std::io::Result<Self> {
        let bytes = fs::read(Self::path(dir))?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }

    /// Removes everything the run created: containerd's pods (through its CRI: the plugin's
    /// DEL for each), processes (newest first), what containerd left (shims, mounts),
    /// namespaces (which takes their interfaces with them), bpffs pins, the run directory.
    pub fn teardown(&self) {
        for dir in &self.containerd {
            let _ = crate::containerd::remove_all_sandboxes(&crate::containerd::socket_path(dir));
        }
        for p in self.processes.iter().rev() {
            p.stop(Duration::from_secs(3));
        }
        for dir in &self.containerd {
            crate::containerd::cleanup_after_daemon(&crate::containerd::socket_path(dir), dir);
        }
        // Anything still mounted under the run (a runtime's namespace or rootfs mounts).
        crate::containerd::unmount_under(&self.dir);
        for ns in self.namespaces.iter().rev() {
            netns::delete(ns);
        }
        for node in &self.nodes {
            let _ = fs::remove_dir_all(self.bpffs.join("weir").join(node));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Every run whose directory still exists.
pub fn all_runs() -> Vec<RunRecord> {
    let Ok(dir) = fs::read_dir(RUNS_DIR) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| RunRecord::load(&e.path()).ok())
        .collect()
}
