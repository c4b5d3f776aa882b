//! `cargo xtask setup`: everything a fresh Linux machine lacks to build and test weir,
//! installed idempotently. A second run changes nothing and says so.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// Debian packages the tests and the local cluster use.
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("nft", "nftables"),
    ("iptables", "iptables"),
    ("ipset", "ipset"),
    ("iperf3", "iperf3"),
    ("ping", "iputils-ping"),
    // `--runtime containerd` of the local cluster, and `cargo xtask image --verify`.
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("runc", "runc"),
    // containerd's CRI sets up every pod's loopback with the reference plugin.
    ("/usr/lib/cni/loopback", "containernetworking-plugins"),
    // The local cluster's pod image (and the weir image's shell) is a static busybox.
    ("busybox", "busybox-static"),
];

struct Report {
    changed: Vec<String>,
}

impl Report {
    fn ok(&self, what: &str, detail: &str) {
        println!("  ok       {what}: {detail}");
    }
    fn did(&mut self, what: &str, detail: &str) {
        println!("  install  {what}: {detail}");
        self.changed.push(what.to_string());
    }
}

pub fn run() -> Result<()> {
    println!("Checking what weir needs on this machine:");
    let mut r = Report { changed: vec![] };
    if !nix_is_root() {
        bail!("setup installs packages and mounts bpffs: run it as root");
    }
    packages(&mut r)?;
    nightly(&mut r)?;
    bpf_linker(&mut r)?;
    bpffs(&mut r)?;
    if r.changed.is_empty() {
        println!("Nothing to do: everything is in place.");
    } else {
        println!("Installed: {}.", r.changed.join(", "));
    }
    Ok(())
}

fn nix_is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn packages(r: &mut Report) -> Result<()> {
    // One package may provide several commands (listed next to each other).
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        let mut all: Vec<&str> = PACKAGES.iter().map(|p| p.1).collect();
        all.dedup();
        r.ok("packages", &all.join(" "));
        return Ok(());
    }
    sh(Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    r.did("packages", &missing.join(" "));
    Ok(())
}

fn nightly(r: &mut Report) -> Result<()> {
    let toolchains = sh(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        sh(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
        r.did("nightly toolchain", "installed");
    }
    let installed = sh(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        r.ok("nightly rust-src", "installed");
    } else {
        sh(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
        r.did("nightly rust-src", "added");
    }
    Ok(())
}

/// The nightly's LLVM major version, from `rustc +nightly -vV`.
fn nightly_llvm_major() -> Result<u32> {
    let v = sh(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let line = v
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` prints no LLVM version")?;
    line.split('.')
        .next()
        .and_then(|m| m.trim().parse().ok())
        .with_context(|| format!("unparseable LLVM version {line:?}"))
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cargo")
        })
}

/// Features bpf-linker was installed with, from cargo's install registry.
fn installed_bpf_linker_features() -> Option<Vec<String>> {
    let raw = std::fs::read(cargo_home().join(".crates2.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&raw).ok()?;
    v["installs"].as_object()?.iter().find_map(|(k, info)| {
        k.starts_with("bpf-linker ").then(|| {
            info["features"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|f| f.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        })
    })
}

/// bpf-linker must be built against the nightly's own LLVM (the one that emits the bitcode
/// it links), found through a prefix directory whose lib/ points into the toolchain.
fn bpf_linker(r: &mut Report) -> Result<()> {
    let major = nightly_llvm_major()?;
    let feature = format!("llvm-{major}");
    let works = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if works && installed_bpf_linker_features().is_some_and(|f| f.contains(&feature)) {
        r.ok("bpf-linker", &format!("built against LLVM {major}"));
        return Ok(());
    }
    let sysroot =
        PathBuf::from(sh(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim());
    let lib = sysroot.join("lib");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(&format!("libLLVM.so.{major}")))
        .with_context(|| format!("no libLLVM.so.{major}* in {}", lib.display()))?;
    // Kept for good: the linker's RUNPATH points here.
    let prefix = cargo_home().join("weir-llvm").join(&feature);
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", llvm.as_str()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&llvm), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    println!("  building bpf-linker against LLVM {major} (about 90 s)...");
    sh(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &feature,
        ])
        .env("LLVM_PREFIX", &prefix))?;
    r.did("bpf-linker", &format!("built against LLVM {major}"));
    Ok(())
}

fn bpffs(r: &mut Report) -> Result<()> {
    let path = Path::new("/sys/fs/bpf");
    let mounted = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&"/sys/fs/bpf") && f.get(2) == Some(&"bpf")
        });
    if mounted {
        r.ok("bpffs", "mounted at /sys/fs/bpf");
        return Ok(());
    }
    weir_localcluster::cluster::ensure_bpffs(path)?;
    r.did("bpffs", "mounted at /sys/fs/bpf");
    Ok(())
}
