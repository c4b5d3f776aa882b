//! Named network namespaces (`/run/netns/<name>`) and running things inside them.

use std::{
    fs::File,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetnsError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("running `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("entering network namespace {path}")]
    Enter {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = NetnsError> = std::result::Result<T, E>;

/// Runs a command to completion; its stderr becomes the error on failure.
pub fn run(cmd: &mut Command) -> Result<String> {
    let command = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetnsError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace. It is not deleted on drop: the cluster owns teardown, so
/// that `down` can also remove namespaces left by a crashed run.
///
/// A namespace a container runtime created (a pod's, under the runtime's state directory)
/// is known by its path instead; it is then named by that path.
#[derive(Clone, Debug)]
pub struct Netns {
    name: String,
    path: Option<PathBuf>,
}

impl Netns {
    pub fn create(name: &str) -> Result<Self> {
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Self {
            name: name.into(),
            path: None,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A handle to an existing namespace.
    pub fn existing(name: &str) -> Self {
        Self {
            name: name.into(),
            path: None,
        }
    }

    /// A namespace bind-mounted at `path` by someone else (a container runtime).
    pub fn at_path(path: &Path) -> Self {
        Self {
            name: path.display().to_string(),
            path: Some(path.to_path_buf()),
        }
    }

    /// Is this a named namespace under `/run/netns` (one this crate creates and deletes)?
    pub fn is_named(&self) -> bool {
        self.path.is_none()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        match &self.path {
            Some(path) => path.clone(),
            None => Path::new("/run/netns").join(&self.name),
        }
    }

    /// `ip -n <ns> <args>` (`nsenter --net=<path> ip <args>` for a namespace known by path).
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        match &self.path {
            Some(path) => run(Command::new("nsenter")
                .arg(format!("--net={}", path.display()))
                .arg("ip")
                .args(args)),
            None => run(Command::new("ip").arg("-n").arg(&self.name).args(args)),
        }
    }

    /// Writes `/proc/sys/<key with dots as slashes>` as seen from inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_string();
        let r = self.within(move || std::fs::write(&path, value))?;
        r.map_err(|source| NetnsError::Enter {
            path: format!("{} ({key})", self.name),
            source,
        })
    }

    /// Runs `f` on a thread inside the namespace. Sockets made there stay in it.
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        weir_conformance::netns::run_in(&self.path(), f).map_err(|e| NetnsError::Enter {
            path: self.name.clone(),
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// Starts `cmd` inside the namespace. Unlike `ip netns exec`, this only switches the
    /// network namespace: mounts (bpffs, cgroups, /sys) stay the host's, which the agent and
    /// container runtimes need.
    pub fn spawn(&self, cmd: &mut Command) -> Result<Child> {
        let path = self.path();
        let file = File::open(&path).map_err(|source| NetnsError::Enter {
            path: path.display().to_string(),
            source,
        })?;
        // SAFETY: setns is async-signal-safe; the closure touches nothing else.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
        let command = format!("{cmd:?}");
        cmd.spawn()
            .map_err(|source| NetnsError::Spawn { command, source })
    }
}

/// Deletes a named namespace; a missing one is not an error.
pub fn delete(name: &str) {
    let _ = run(Command::new("ip").args(["netns", "del", name]));
}

/// Names of every named namespace.
pub fn list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Connects `a` and `b` with a veth pair (`a_if` in a, `b_if` in b), created directly in
/// the two namespaces: nothing ever appears in the caller's namespace.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    run(Command::new("ip").args([
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]))?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}
