//! Just enough network namespace handling for the probes and their tests: create and delete
//! named namespaces (the `ip netns` convention, bind mounts under `/run/netns/<name>`), and
//! run code inside one.
//!
//! Code runs inside a namespace on a dedicated, short-lived thread: `setns(CLONE_NEWNET)`
//! changes only the calling thread, so nothing else in the process (in particular no async
//! runtime worker) ever changes namespace, and the namespace is not kept alive by a thread
//! after the work is done. A socket keeps the namespace it was created in for its whole
//! life, so creating sockets this way and using them from any thread afterwards is sound.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sched::{CloneFlags, setns};

use crate::{Error, Result};

/// Directory where `ip netns` keeps its named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Runs `work` on a new thread that has joined the network namespace at `netns`, and
/// returns its result.
pub fn run_in<T, F>(netns: &Path, work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let name = netns.display().to_string();
    let netns = netns.to_owned();
    let thread = std::thread::Builder::new()
        .name("netns-run".to_owned())
        .spawn(move || enter(&netns).map(|()| work()))
        .map_err(|error| Error::Netns {
            operation: "spawning a thread for",
            name: name.clone(),
            reason: error.to_string(),
        })?;
    thread.join().map_err(|_| Error::Netns {
        operation: "running code in",
        name,
        reason: "the work panicked".to_owned(),
    })?
}

/// Moves the *calling thread* into the network namespace at `netns`. Only for threads that
/// exist to work in that namespace (see the module docs).
pub fn enter(netns: &Path) -> Result<()> {
    let file = File::open(netns).map_err(|error| Error::Netns {
        operation: "opening",
        name: netns.display().to_string(),
        reason: error.to_string(),
    })?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|errno| Error::Netns {
        operation: "entering",
        name: netns.display().to_string(),
        reason: errno.desc().to_owned(),
    })
}

/// A named network namespace created with `ip netns add`, deleted on drop.
#[derive(Debug)]
pub struct NamedNetns {
    name: String,
}

impl NamedNetns {
    /// Creates `/run/netns/<name>` (fails if it exists), with its loopback device up.
    pub fn create(name: &str) -> Result<Self> {
        ip(&["netns", "add", name]).map_err(|reason| Error::Netns {
            operation: "creating",
            name: name.to_owned(),
            reason,
        })?;
        let netns = NamedNetns {
            name: name.to_owned(),
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.name)
    }

    /// Runs `ip -n <name> <args...>` (iproute2) inside this namespace.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full).map_err(|reason| Error::Netns {
            operation: "configuring",
            name: self.name.clone(),
            reason,
        })
    }

    /// Runs `ip netns exec <name> <program> <args...>` (e.g. `nft`) inside this namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<()> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        ip(&full).map_err(|reason| Error::Netns {
            operation: "running a command in",
            name: self.name.clone(),
            reason,
        })
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        // Deleting removes the bind mount; the namespace itself (and any veth end inside
        // it, with its peer) goes away once no process or socket holds it any more.
        if let Err(reason) = ip(&["netns", "del", &self.name]) {
            eprintln!(
                "warning: deleting network namespace {}: {reason}",
                self.name
            );
        }
    }
}

/// Runs iproute2's `ip` with `args`; the error is its stderr.
fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|error| format!("running ip {}: {error}", args.join(" ")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}
