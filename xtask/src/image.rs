//! `cargo xtask image`: builds weir's container image without a container engine.
//!
//! The image holds the three binaries in [`BIN_DIR`], what the agent's CNI-install init
//! container runs (a static busybox: `/bin/sh`, `cp`, `chmod`, `mv`, ...), and a minimal root
//! file system. It is written as one archive that `docker load`, `podman load`,
//! `ctr images import` and `kind load image-archive` all accept (see [`weir_localcluster::oci`]).
//!
//! # How the binaries run in the image
//!
//! * `weir-agent` and `weir-controller` are release builds linked against the build host's
//!   glibc. The image carries exactly the shared objects `ldd` resolves for them plus their
//!   program interpreter, at the paths the interpreter searches by default (checked with
//!   `ld.so --help`, since the image has no `ld.so.cache`). They run on the libc they were
//!   linked against, whatever the node has.
//! * `weir-cni` is built static (`-C target-feature=+crt-static` for the host's gnu target):
//!   the init container copies it to the node's `/opt/cni/bin`, where the container runtime
//!   execs it on the host, so it must not depend on the node's libc. It only uses sockets and
//!   JSON (no name service lookups, which static glibc cannot do).
//!
//! A musl build would make everything static, but it needs the musl target (`rustup target
//! add`) and a musl C compiler for ring's C code (Debian's musl-tools; without it ring's build
//! script fails to find `x86_64-linux-musl-gcc`), rebuilds every dependency a second time, and
//! musl's allocator is markedly slower for the controller's and agent's allocation-heavy work.
//!
//! # Determinism
//!
//! Entries are sorted, every mtime is `SOURCE_DATE_EPOCH` (0 when unset), owners are root,
//! JSON is serialized from fixed structures: the same binaries give the same image digest.

mod verify;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

pub use weir_localcluster::oci::ImageRef;
use weir_localcluster::{
    elf,
    oci::{self as archive, ImageConfig, Layer},
};

/// The image `cargo xtask image` builds unless told otherwise; `manifests/` runs it.
pub const DEFAULT_TAG: &str = "weir:dev";
/// The repository part of [`DEFAULT_TAG`], as `manifests/` names it in `images:`.
pub const IMAGE_NAME: &str = "weir";
/// Where the binaries are in the image. The manifests' `command`s and the Dockerfile use the
/// same paths.
pub const BIN_DIR: &str = "/usr/local/bin";
/// The binaries, by file name, in [`BIN_DIR`].
pub const BINARIES: [&str; 3] = ["weir-agent", "weir-controller", "weir-cni"];
/// The static busybox is installed here; the applets below are symlinks next to it.
pub const BUSYBOX: &str = "/bin/busybox";
/// Busybox applets linked in `/bin`: what the CNI-install init container runs, and a few
/// for looking around with `kubectl exec`.
pub const APPLETS: [&str; 16] = [
    "sh", "cat", "chmod", "cp", "echo", "env", "ln", "ls", "mkdir", "mount", "mv", "rm", "sleep",
    "test", "umount", "[",
];

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image name and tag (Docker's short names are normalized: weir:dev is
    /// docker.io/library/weir:dev).
    #[arg(long, default_value = DEFAULT_TAG)]
    pub tag: String,
    /// Where to write the archive [default: <target dir>/weir-image.tar].
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Then import the archive into a private containerd (temporary root, state and socket)
    /// and run the binaries and the CNI-install init container from it. Needs root and the
    /// containerd, ctr and runc commands (Debian: apt-get install containerd runc).
    #[arg(long)]
    pub verify: bool,
}

pub fn run(args: Args) -> Result<()> {
    let image = ImageRef::parse(&args.tag)?;
    let output = args
        .output
        .unwrap_or_else(|| crate::target_dir().join("weir-image.tar"));
    let built = build(&image, &output)?;
    if args.verify {
        verify::run(&built)?;
    }
    Ok(())
}

/// An archive [`build`] wrote.
#[derive(Debug)]
pub struct BuiltImage {
    pub path: PathBuf,
    pub image: ImageRef,
    /// The static `weir-cni`, to compare with what the init container installs.
    pub cni_binary: PathBuf,
}

/// Builds the release binaries and writes the image archive to `output`.
pub fn build(image: &ImageRef, output: &Path) -> Result<BuiltImage> {
    let host = host_triple()?;
    let architecture = oci_architecture(&host)?;
    let binaries = build_binaries(&host)?;
    let layer = assemble_layer(&binaries)?;
    let created = source_date_epoch()?;
    let layer_tar = layer.to_tar(created)?;
    let config = ImageConfig {
        architecture: architecture.to_owned(),
        env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
        // The manifests always set `command`; run bare, the image explains itself.
        cmd: vec![format!("{BIN_DIR}/weir-agent"), "--help".into()],
        labels: BTreeMap::from([
            ("org.opencontainers.image.title".into(), "weir".into()),
            (
                "org.opencontainers.image.description".into(),
                "weir eBPF network policy and routing: weir-agent, weir-controller, weir-cni"
                    .into(),
            ),
            (
                "org.opencontainers.image.version".into(),
                env!("CARGO_PKG_VERSION").into(),
            ),
        ]),
        created,
        created_by: "cargo xtask image".into(),
    };
    if let Some(dir) = output.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Replaced atomically, so a reader never sees half an archive.
    let written = weir_persist::replace_with(output, 0o644, |out| {
        archive::write_archive(out, image, &layer_tar, &config).map_err(std::io::Error::other)
    })
    .with_context(|| format!("writing {}", output.display()))?;
    let size = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    println!(
        "Wrote {} ({:.1} MiB): {} ({architecture})",
        output.display(),
        size as f64 / (1024.0 * 1024.0),
        image.full()
    );
    println!("  image ID (config) {}", written.config);
    println!("  manifest          {}", written.manifest);
    println!(
        "Load it with: docker load -i {0} | podman load -i {0} | kind load image-archive {0} | \
         ctr -n k8s.io images import {0}",
        output.display()
    );
    Ok(BuiltImage {
        path: output.to_owned(),
        image: image.clone(),
        cni_binary: binaries.cni,
    })
}

/// Paths of the freshly built binaries on the build host.
struct Binaries {
    agent: PathBuf,
    controller: PathBuf,
    cni: PathBuf,
}

fn host_triple() -> Result<String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc)
        .arg("-vV")
        .output()
        .with_context(|| format!("running {rustc} -vV"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .map(str::to_owned)
        .context("`rustc -vV` names no host triple")
}

/// The OCI (GOARCH) name of a Rust target's architecture.
fn oci_architecture(triple: &str) -> Result<&'static str> {
    match triple.split('-').next() {
        Some("x86_64") => Ok("amd64"),
        Some("aarch64") => Ok("arm64"),
        _ => bail!("no container image architecture known for {triple}"),
    }
}

fn build_binaries(host: &str) -> Result<Binaries> {
    crate::status(crate::cargo().args([
        "build",
        "--release",
        "-p",
        "weir-agent",
        "--bin",
        "weir-agent",
        "-p",
        "weir-controller",
        "--bin",
        "weir-controller",
    ]))?;
    // An explicit --target keeps the static flags off build scripts and proc macros, and its
    // own output directory keeps them from invalidating the ordinary builds.
    crate::status(
        crate::cargo()
            .args([
                "build",
                "--release",
                "-p",
                "weir-cni",
                "--bin",
                "weir-cni",
                "--target",
                host,
            ])
            .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static"),
    )?;
    let release = crate::target_dir().join("release");
    let binaries = Binaries {
        agent: release.join("weir-agent"),
        controller: release.join("weir-controller"),
        cni: crate::target_dir()
            .join(host)
            .join("release")
            .join("weir-cni"),
    };
    let cni = std::fs::read(&binaries.cni)
        .with_context(|| format!("reading {}", binaries.cni.display()))?;
    if let Some(loader) = elf::interpreter(&cni)
        .with_context(|| format!("reading {} as ELF", binaries.cni.display()))?
    {
        bail!(
            "{} is linked dynamically (loader {loader}); the node runs it, so it must be static",
            binaries.cni.display()
        );
    }
    Ok(binaries)
}

/// `SOURCE_DATE_EPOCH` (<https://reproducible-builds.org/specs/source-date-epoch/>), else 0.
fn source_date_epoch() -> Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(text) => text
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={text:?} is not a number of seconds")),
        Err(_) => Ok(0),
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn assemble_layer(binaries: &Binaries) -> Result<Layer> {
    let mut layer = Layer::default();
    for (name, path) in BINARIES
        .iter()
        .zip([&binaries.agent, &binaries.controller, &binaries.cni])
    {
        layer.add_file(&format!("{BIN_DIR}/{name}"), 0o755, read(path)?)?;
    }
    let mut runtime_files = BTreeMap::new();
    for path in [&binaries.agent, &binaries.controller] {
        for (image_path, host_path) in shared_objects(path)? {
            runtime_files.insert(image_path, host_path);
        }
    }
    for (image_path, host_path) in &runtime_files {
        // The loader must be executable; libraries need only be readable.
        let mode = if image_path.contains("ld-linux") {
            0o755
        } else {
            0o644
        };
        // Copies the file a symlink chain ends at: the image has no /lib -> /usr/lib.
        let real = std::fs::canonicalize(host_path)
            .with_context(|| format!("resolving {}", host_path.display()))?;
        layer.add_file(image_path, mode, read(&real)?)?;
    }

    let busybox = weir_localcluster::containerd::static_busybox()
        .context("the image's /bin/sh for the CNI-install init container")?;
    layer.add_file(BUSYBOX, 0o755, read(&busybox)?)?;
    let available = Command::new(&busybox)
        .arg("--list")
        .output()
        .with_context(|| format!("running {} --list", busybox.display()))?;
    let available = String::from_utf8_lossy(&available.stdout).into_owned();
    for applet in APPLETS {
        if !available.lines().any(|line| line.trim() == applet) {
            bail!("{} has no {applet} applet", busybox.display());
        }
        layer.add_symlink(&format!("/bin/{applet}"), "busybox")?;
    }

    layer.add_file(
        "/etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
            .to_vec(),
    )?;
    layer.add_file(
        "/etc/group",
        0o644,
        b"root:x:0:\nnonroot:x:65532:\n".to_vec(),
    )?;
    // glibc's default without this file asks DNS before /etc/hosts.
    layer.add_file("/etc/nsswitch.conf", 0o644, b"hosts: files dns\n".to_vec())?;
    layer.add_dir("/root", 0o700)?;
    layer.add_dir("/home/nonroot", 0o755)?;
    layer.add_dir("/tmp", 0o1777)?;
    layer.add_dir("/run", 0o755)?;
    // As on Debian: the pod netns paths runtimes pass (/var/run/netns/…) and the service
    // account mount (/var/run/secrets/…) resolve under /run.
    layer.add_symlink("/var/run", "/run")?;
    Ok(layer)
}

/// `(path in the image, path on this host)` of the program interpreter and every shared
/// object a dynamic executable loads, as `ldd` resolves them.
fn shared_objects(binary: &Path) -> Result<Vec<(String, PathBuf)>> {
    let bytes = read(binary)?;
    let Some(loader) =
        elf::interpreter(&bytes).with_context(|| format!("reading {} as ELF", binary.display()))?
    else {
        return Ok(Vec::new());
    };
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("running ldd {}", binary.display()))?;
    let libraries = parse_ldd(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| format!("ldd {}", binary.display()))?;
    let search_path = loader_search_path(&loader);
    let mut files = vec![(loader.clone(), PathBuf::from(&loader))];
    for library in libraries {
        let dir = library.parent().unwrap_or(Path::new("/"));
        match &search_path {
            Some(dirs) if !dirs.iter().any(|d| d == dir) => bail!(
                "{} is loaded from {}, which {loader} does not search by default (it has no \
                 ld.so.cache in the image); searched: {}",
                library.display(),
                dir.display(),
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => {}
        }
        files.push((library.display().to_string(), library));
    }
    Ok(files)
}

/// The shared objects in `ldd` output (`libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6
/// (0x…)`), without the vDSO (provided by the kernel) and the interpreter line.
fn parse_ldd(output: &str) -> Result<Vec<PathBuf>> {
    let mut libraries = Vec::new();
    for line in output.lines().map(str::trim) {
        if line.is_empty() || line.contains("statically linked") {
            continue;
        }
        let Some((name, rest)) = line.split_once("=>") else {
            continue; // the vDSO or the interpreter
        };
        let rest = rest.trim();
        if rest.starts_with("not found") {
            bail!("shared object {} not found", name.trim());
        }
        let path = rest.split_whitespace().next().unwrap_or_default();
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        } else if !path.is_empty() {
            bail!("unexpected ldd line {line:?}");
        }
    }
    Ok(libraries)
}

/// The directories `loader` searches without a cache (`ld.so --help`, glibc ≥ 2.33), or
/// `None` if it does not say.
fn loader_search_path(loader: &str) -> Option<Vec<PathBuf>> {
    let out = Command::new(loader).arg("--help").output().ok()?;
    let dirs = parse_loader_search_path(&String::from_utf8_lossy(&out.stdout));
    (!dirs.is_empty()).then_some(dirs)
}

fn parse_loader_search_path(help: &str) -> Vec<PathBuf> {
    help.lines()
        .filter_map(|line| line.trim().strip_suffix("(system search path)"))
        .map(|dir| PathBuf::from(dir.trim()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_yields_libraries_without_vdso_and_loader() {
        let output = "\tlinux-vdso.so.1 (0x00007ffc5a1f6000)\n\
            \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        assert_eq!(
            parse_ldd(output).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
            ]
        );
        assert!(
            parse_ldd("\tstatically linked\n").unwrap().is_empty(),
            "a static binary needs nothing"
        );
    }

    #[test]
    fn a_missing_library_fails_the_build() {
        let error = parse_ldd("\tlibssl.so.3 => not found\n").unwrap_err();
        assert!(error.to_string().contains("libssl.so.3"), "{error}");
    }

    #[test]
    fn loader_help_lists_its_default_directories() {
        let help = "Shared library search path:\n  (libraries located via /etc/ld.so.cache)\n  \
            /lib/x86_64-linux-gnu (system search path)\n  /usr/lib (system search path)\n\n\
            Subdirectories of glibc-hwcaps directories, in priority order:\n  x86-64-v3 \
            (supported, searched)\n";
        assert_eq!(
            parse_loader_search_path(help),
            [
                PathBuf::from("/lib/x86_64-linux-gnu"),
                PathBuf::from("/usr/lib")
            ]
        );
    }

    #[test]
    fn architectures_use_oci_names() {
        assert_eq!(
            oci_architecture("x86_64-unknown-linux-gnu").unwrap(),
            "amd64"
        );
        assert_eq!(
            oci_architecture("aarch64-unknown-linux-gnu").unwrap(),
            "arm64"
        );
        assert!(oci_architecture("riscv64gc-unknown-linux-gnu").is_err());
    }

    #[test]
    fn the_default_tag_is_the_name_the_manifests_use() {
        let image = ImageRef::parse(DEFAULT_TAG).unwrap();
        assert_eq!(image.familiar_repository(), IMAGE_NAME);
    }
}
