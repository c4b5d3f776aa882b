//! Loading the eBPF object, pinning its maps, attaching programs to interfaces.
//!
//! Everything that must survive an agent restart lives in bpffs under
//! `<bpffs>/weir/<node>/v<ABI>/`: `maps/<NAME>`, `links/<ifname>-<direction>`,
//! `links/<ifname>-xdp-<native|generic>` (the XDP program on the uplink; the name keeps the
//! mode the link was made with, which the kernel does not report for a link) and
//! `links/cgroup-<program>` (the socket hooks on the cgroup v2 root). A restarted agent
//! reopens the maps (so conntrack and policy state carry over) and atomically swaps its
//! freshly loaded programs into the pinned links (`BPF_LINK_UPDATE`), so no packet ever
//! meets an interface, nor a socket call its hook, without a program. The ABI version in the path keeps an agent with
//! another map layout from reusing maps it cannot read.

use std::{
    fs, io,
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData, MapInfo},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SchedClassifier, TcAttachType, Xdp,
        XdpMode as AyaXdpMode,
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        xdp::XdpLink,
    },
};
use thiserror::Error;
use weir_api::MapCapacities;
use weir_common::{ABI_VERSION, maps, programs};

/// The compiled eBPF object.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weir"));

#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error("loading the eBPF object (pins under {pins})")]
    Load {
        pins: String,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("{action} program {program} on {ifname}")]
    Program {
        action: &'static str,
        program: &'static str,
        ifname: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("pinned link {path}")]
    Link {
        path: PathBuf,
        #[source]
        source: Box<aya::programs::links::LinkError>,
    },
    #[error("pinning link at {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    #[error("adding clsact qdisc to {ifname}")]
    Qdisc {
        ifname: String,
        #[source]
        source: Box<tc::TcError>,
    },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = DataplaneError> = std::result::Result<T, E>;

/// Where one node's pins live.
#[derive(Clone, Debug)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    /// `bpffs` is the bpffs mount (normally `/sys/fs/bpf`).
    pub fn new(bpffs: &Path, node: &str) -> Self {
        Self {
            root: bpffs
                .join("weir")
                .join(node)
                .join(format!("v{ABI_VERSION}")),
        }
    }
    /// The node's directory (parent of every ABI version).
    pub fn node_dir(&self) -> &Path {
        self.root.parent().unwrap_or(&self.root)
    }
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }
    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }
    /// Where the pins of maps found with another size than configured wait until their
    /// entries are copied into the maps that replace them.
    pub fn resized_dir(&self) -> PathBuf {
        self.root.join("resized")
    }
    /// Moves the pins of the maps `capacities` sizes whose pinned size differs into
    /// [`Self::resized_dir`], so that loading creates them anew with the configured size.
    /// A pin already set aside (by an agent that stopped before copying it) is kept: it holds
    /// the entries from before that resize.
    fn set_aside_resized(&self, capacities: &MapCapacities) -> Result<Vec<Resized>> {
        let mut out = Vec::new();
        for (map, to) in capacities.maps() {
            let pin = self.maps_dir().join(map);
            if !pin.exists() {
                continue;
            }
            let from = MapInfo::from_pin(&pin)
                .map_err(|e| DataplaneError::Io {
                    action: "reading the size of pinned map",
                    path: pin.clone(),
                    source: io::Error::other(e.to_string()),
                })?
                .max_entries();
            if from == to {
                continue;
            }
            let dir = self.resized_dir();
            fs::create_dir_all(&dir).map_err(|source| DataplaneError::Io {
                action: "creating pin directory",
                path: dir.clone(),
                source,
            })?;
            let aside = dir.join(map);
            let result = if aside.exists() {
                fs::remove_file(&pin)
            } else {
                fs::rename(&pin, &aside)
            };
            result.map_err(|source| DataplaneError::Io {
                action: "setting aside pinned map of another size",
                path: pin.clone(),
                source,
            })?;
            out.push(Resized { map, from, to });
        }
        Ok(out)
    }
    fn link_path(&self, ifname: &str, dir: TcAttachType) -> PathBuf {
        let suffix = match dir {
            TcAttachType::Ingress => "ingress",
            TcAttachType::Egress => "egress",
            TcAttachType::Custom(_) => "custom",
        };
        // bpffs refuses names with dots (e.g. the tunnel device `weir.vxlan`).
        let name = ifname.replace('.', "_");
        self.links_dir().join(format!("{name}-{suffix}"))
    }
    fn xdp_link_path(&self, ifname: &str, mode: XdpMode) -> PathBuf {
        let name = ifname.replace('.', "_");
        self.links_dir()
            .join(format!("{name}-xdp-{}", mode.as_str()))
    }
    /// The XDP link pinned for `ifname` by this version or, failing that, another one, with
    /// the mode it was attached in.
    fn pinned_xdp_link(&self, ifname: &str) -> Option<(PathBuf, XdpMode)> {
        let modes = [XdpMode::Native, XdpMode::Generic];
        let mine = modes
            .iter()
            .map(|m| (self.xdp_link_path(ifname, *m), *m))
            .find(|(p, _)| p.exists());
        mine.or_else(|| {
            self.other_versions().into_iter().find_map(|v| {
                modes.iter().find_map(|m| {
                    let file = self.xdp_link_path(ifname, *m);
                    let p = v.join("links").join(file.file_name()?);
                    p.exists().then_some((p, *m))
                })
            })
        })
    }
    fn sock_link_path(&self, program: &str) -> PathBuf {
        self.links_dir().join(format!("cgroup-{program}"))
    }
    fn create_dirs(&self) -> Result<()> {
        for dir in [self.maps_dir(), self.links_dir()] {
            fs::create_dir_all(&dir).map_err(|source| DataplaneError::Io {
                action: "creating pin directory",
                path: dir.clone(),
                source,
            })?;
        }
        Ok(())
    }
    /// Pin directories of other ABI versions of this node (left by an agent of another
    /// release), newest first.
    pub fn other_versions(&self) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(self.node_dir()) else {
            return Vec::new();
        };
        let mut found: Vec<(u32, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name();
                let v: u32 = name.to_str()?.strip_prefix('v')?.parse().ok()?;
                (v != ABI_VERSION).then(|| (v, e.path()))
            })
            .collect();
        found.sort_by_key(|f| std::cmp::Reverse(f.0));
        found.into_iter().map(|(_, p)| p).collect()
    }
    /// The same link pinned by another ABI version, if any.
    fn other_version_link(&self, ifname: &str, dir: TcAttachType) -> Option<PathBuf> {
        let mine = self.link_path(ifname, dir);
        let name = mine.file_name()?;
        self.other_versions()
            .into_iter()
            .map(|v| v.join("links").join(name))
            .find(|p| p.exists())
    }
    /// Removes the pins of other ABI versions once this agent's programs own every link:
    /// their maps are freed when the last program using them is gone.
    pub fn remove_other_versions(&self) -> Result<()> {
        for dir in self.other_versions() {
            fs::remove_dir_all(&dir).map_err(|source| DataplaneError::Io {
                action: "removing pins of another version",
                path: dir.clone(),
                source,
            })?;
        }
        Ok(())
    }
    /// Removes every pin of this node (all ABI versions): detaches its links, frees its maps
    /// once no program uses them.
    pub fn remove_all(&self) -> Result<()> {
        match fs::remove_dir_all(self.node_dir()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DataplaneError::Io {
                action: "removing pins",
                path: self.node_dir().to_path_buf(),
                source,
            }),
        }
    }
}

/// A pinned map the agent found with another size than configured: it is created anew with
/// the configured size, and the entries of the old one are copied over
/// ([`crate::maps::DataplaneMaps::carry_over_resized`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resized {
    pub map: &'static str,
    /// Its size when pinned.
    pub from: u32,
    /// The configured size.
    pub to: u32,
}

/// How programs get onto an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// TCX links (kernel ≥ 6.6): pinned, atomically replaceable.
    Tcx,
    /// clsact qdisc + cls_bpf filters (older kernels): filters persist with the qdisc.
    Netlink,
}

/// Where the XDP program runs on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// In the driver, before any socket buffer exists (veth, most physical NICs).
    Native,
    /// Generic (SKB) mode, in the core receive path after the socket buffer is allocated:
    /// any driver, the same checks, less of the saving.
    Generic,
}

impl XdpMode {
    pub fn as_str(self) -> &'static str {
        match self {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        }
    }
    fn aya(self) -> AyaXdpMode {
        match self {
            XdpMode::Native => AyaXdpMode::Driver,
            XdpMode::Generic => AyaXdpMode::Skb,
        }
    }
}

/// The loaded programs and the maps they share.
pub struct Dataplane {
    ebpf: Ebpf,
    pins: Option<PinLayout>,
    mode: AttachMode,
    /// Attach XDP in generic mode even where the driver has native XDP (tests).
    force_generic_xdp: bool,
    /// The uplink's XDP link when there is no pin directory (tests): owned by the program.
    xdp_unpinned: Option<aya::programs::xdp::XdpLinkId>,
    capacities: MapCapacities,
    resized: Vec<Resized>,
}

impl Dataplane {
    /// Loads the programs with the compiled-in map sizes. With `pins`, maps are reopened
    /// from (or pinned to) the node's pin directory; without, they are private to this
    /// instance (tests, benchmarks).
    pub fn load(pins: Option<PinLayout>) -> Result<Self> {
        Self::load_with(pins, &MapCapacities::default())
    }

    /// [`Self::load`] with the configurable tables sized by `capacities`.
    pub fn load_with(pins: Option<PinLayout>, capacities: &MapCapacities) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        for (name, entries) in capacities.maps() {
            loader.map_max_entries(name, entries);
        }
        let mut resized = Vec::new();
        let map_paths: Vec<(&'static str, PathBuf)> = match &pins {
            Some(p) => {
                p.create_dirs()?;
                // aya reuses a pinned map whatever its size: one of another size is set
                // aside, to be created anew.
                resized = p.set_aside_resized(capacities)?;
                maps::ALL
                    .iter()
                    .map(|name| (*name, p.maps_dir().join(name)))
                    .collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|source| DataplaneError::Load {
                pins: pins
                    .as_ref()
                    .map(|p| p.root.display().to_string())
                    .unwrap_or_else(|| "none".into()),
                source: Box::new(source),
            })?;
        for name in [
            programs::FROM_POD,
            programs::TO_POD,
            programs::FROM_NETWORK,
            programs::TO_NETWORK,
            programs::FROM_TUNNEL,
            programs::TO_TUNNEL,
        ] {
            let prog = classifier(&mut ebpf, name)?;
            load_retrying(name, || prog.load())?;
        }
        for &name in programs::SOCK {
            let prog = sock_program(&mut ebpf, name)?;
            load_retrying(name, || prog.load())?;
        }
        let prog = xdp_program(&mut ebpf)?;
        load_retrying(programs::XDP_UPLINK, || prog.load())?;
        let mode = if tcx_supported() {
            AttachMode::Tcx
        } else {
            AttachMode::Netlink
        };
        Ok(Self {
            ebpf,
            pins,
            mode,
            force_generic_xdp: false,
            xdp_unpinned: None,
            capacities: *capacities,
            resized,
        })
    }

    /// The sizes the configurable tables were created with.
    pub fn capacities(&self) -> &MapCapacities {
        &self.capacities
    }

    /// The pinned maps this load found with another size and created anew.
    pub fn resized(&self) -> &[Resized] {
        &self.resized
    }

    /// Attaches through clsact/cls_bpf even where TCX exists (tests of the fallback).
    pub fn force_netlink_attach(&mut self) {
        self.mode = AttachMode::Netlink;
    }

    /// Attaches XDP in generic mode even where the driver has native XDP (tests of the
    /// fallback).
    pub fn force_generic_xdp(&mut self) {
        self.force_generic_xdp = true;
    }

    pub fn attach_mode(&self) -> AttachMode {
        self.mode
    }

    pub fn pins(&self) -> Option<&PinLayout> {
        self.pins.as_ref()
    }

    /// Takes a map out of the object, for the map writers.
    pub fn take_map(&mut self, name: &'static str) -> Result<Map> {
        self.ebpf
            .take_map(name)
            .ok_or(DataplaneError::MissingMap { name })
    }

    /// A program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn program(&mut self, name: &'static str) -> Result<&mut SchedClassifier> {
        classifier(&mut self.ebpf, name)
    }

    /// Attaches the pod programs to a pod's host-side veth: `from_pod` on ingress (what the
    /// pod sends), `to_pod` on egress. Reuses pinned links left by a previous agent,
    /// swapping in this agent's programs, so re-attaching is hitless and idempotent.
    pub fn attach_pod_interface(&mut self, ifname: &str) -> Result<()> {
        self.attach(ifname, programs::FROM_POD, TcAttachType::Ingress)?;
        self.attach(ifname, programs::TO_POD, TcAttachType::Egress)
    }

    /// Attaches `from_network` to the ingress of the node's uplink (traffic from other nodes
    /// for local pods is checked and delivered straight to them; traffic to the node meets
    /// its host policy) and `to_network` to its egress (the node's replies for NodePort flows
    /// served by its own stack are translated back; the node's own flows are tracked while a
    /// host policy isolates the node).
    pub fn attach_uplink(&mut self, ifname: &str) -> Result<()> {
        self.attach(ifname, programs::FROM_NETWORK, TcAttachType::Ingress)?;
        self.attach(ifname, programs::TO_NETWORK, TcAttachType::Egress)
    }

    /// The XDP program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn xdp(&mut self) -> Result<&mut Xdp> {
        xdp_program(&mut self.ebpf)
    }

    /// Attaches the XDP program to the uplink: natively where the driver supports it,
    /// generic (SKB) mode otherwise; returns the mode. A link pinned by a previous agent
    /// (this version or another) gets this agent's program swapped in (`BPF_LINK_UPDATE`)
    /// and keeps its mode, so the uplink is never without the checks.
    pub fn attach_uplink_xdp(&mut self, ifname: &str) -> Result<XdpMode> {
        let pins = self.pins.clone();
        let force_generic = self.force_generic_xdp;
        let prog = xdp_program(&mut self.ebpf)?;
        let err = |action, source| DataplaneError::Program {
            action,
            program: programs::XDP_UPLINK,
            ifname: ifname.to_string(),
            source: Box::new(source),
        };
        if let Some((path, mode)) = pins.as_ref().and_then(|p| p.pinned_xdp_link(ifname)) {
            let link_err = |source| DataplaneError::Link {
                path: path.clone(),
                source: Box::new(source),
            };
            let pinned = PinnedLink::from_pin(&path).map_err(link_err)?;
            let link = XdpLink::try_from(FdLink::from(pinned)).map_err(link_err)?;
            let id = prog.attach_to_link(link).map_err(|e| err("replacing", e))?;
            let link = prog.take_link(id).map_err(|e| err("releasing", e))?;
            let new = pins.as_ref().map(|p| p.xdp_link_path(ifname, mode));
            if let Some(new) = new.filter(|n| *n != path) {
                // Another version's link: pin it under this version.
                let fd = FdLink::try_from(link).map_err(|source| DataplaneError::Link {
                    path: new.clone(),
                    source: Box::new(source),
                })?;
                fd.pin(&new).map_err(|source| DataplaneError::Pin {
                    path: new.clone(),
                    source: Box::new(source),
                })?;
                fs::remove_file(&path).map_err(|source| DataplaneError::Io {
                    action: "unpinning the link of another version",
                    path: path.clone(),
                    source,
                })?;
            }
            // Otherwise the pin keeps the link attached; our fd can go.
            return Ok(mode);
        }
        let modes: &[XdpMode] = if force_generic {
            &[XdpMode::Generic]
        } else {
            &[XdpMode::Native, XdpMode::Generic]
        };
        let mut failure = None;
        for &mode in modes {
            match prog.attach(ifname, mode.aya()) {
                Ok(id) => {
                    match pins.as_ref().map(|p| p.xdp_link_path(ifname, mode)) {
                        Some(path) => {
                            let link = prog.take_link(id).map_err(|e| err("releasing", e))?;
                            let fd =
                                FdLink::try_from(link).map_err(|source| DataplaneError::Link {
                                    path: path.clone(),
                                    source: Box::new(source),
                                })?;
                            fd.pin(&path).map_err(|source| DataplaneError::Pin {
                                path,
                                source: Box::new(source),
                            })?;
                        }
                        // Unpinned (tests): attached as long as the program is loaded.
                        None => self.xdp_unpinned = Some(id),
                    }
                    return Ok(mode);
                }
                // The driver has no native XDP (EOPNOTSUPP), or the like: try the next mode.
                Err(e) => failure = Some(e),
            }
        }
        Err(err(
            "attaching",
            failure.expect("at least one mode was tried"),
        ))
    }

    /// Detaches the XDP program from the uplink: unpins its link (this version's or another
    /// one's), which was the link's last reference. Nothing attached: nothing to do.
    pub fn detach_uplink_xdp(&mut self, ifname: &str) -> Result<()> {
        if let Some(id) = self.xdp_unpinned.take() {
            xdp_program(&mut self.ebpf)?
                .detach(id)
                .map_err(|source| DataplaneError::Program {
                    action: "detaching",
                    program: programs::XDP_UPLINK,
                    ifname: ifname.to_string(),
                    source: Box::new(source),
                })?;
        }
        let Some(pins) = self.pins.clone() else {
            return Ok(());
        };
        while let Some((path, _)) = pins.pinned_xdp_link(ifname) {
            fs::remove_file(&path).map_err(|source| DataplaneError::Io {
                action: "unpinning the uplink's XDP link",
                path,
                source,
            })?;
        }
        Ok(())
    }

    /// Attaches the tunnel programs to the VXLAN device: `from_tunnel` on ingress (decapsulated
    /// traffic from other nodes only), `to_tunnel` on egress (picks the remote node).
    pub fn attach_tunnel(&mut self, ifname: &str) -> Result<()> {
        self.attach(ifname, programs::FROM_TUNNEL, TcAttachType::Ingress)?;
        self.attach(ifname, programs::TO_TUNNEL, TcAttachType::Egress)
    }

    /// Attaches the socket hooks (Service translation for the node's own processes) to the
    /// cgroup v2 hierarchy at `cgroup`, normally its root, next to other programs there
    /// (a link: multi-attach). The programs act only on sockets of the namespace whose cookie is in
    /// `NODE_NETNS`. Links pinned by a previous agent get this agent's programs swapped in
    /// (`BPF_LINK_UPDATE`): no socket call meets the hook empty, none meets it twice.
    pub fn attach_sockets(&mut self, cgroup: &Path) -> Result<()> {
        for &name in programs::SOCK {
            let link_path = self.pins.as_ref().map(|p| p.sock_link_path(name));
            let previous = match (&self.pins, &link_path) {
                (Some(pins), Some(path)) if !path.exists() => {
                    let file = path.file_name().map(PathBuf::from).unwrap_or_default();
                    pins.other_versions()
                        .into_iter()
                        .map(|v| v.join("links").join(&file))
                        .find(|p| p.exists())
                }
                _ => None,
            };
            let prog = sock_program(&mut self.ebpf, name)?;
            let err = |action, source| DataplaneError::Program {
                action,
                program: name,
                ifname: cgroup.display().to_string(),
                source: Box::new(source),
            };
            let existing = link_path
                .as_ref()
                .filter(|p| p.exists())
                .or(previous.as_ref());
            if let Some(path) = existing {
                let prog_fd = prog
                    .fd()
                    .map_err(|e| err("replacing", e))?
                    .as_fd()
                    .as_raw_fd();
                update_pinned_link(path, prog_fd).map_err(|source| DataplaneError::Io {
                    action: "swapping the program of pinned link",
                    path: path.clone(),
                    source,
                })?;
                if let (Some(old), Some(new)) = (&previous, &link_path) {
                    // Same link, pinned under this version: bpffs renames within one mount.
                    fs::rename(old, new).map_err(|source| DataplaneError::Io {
                        action: "moving the pin of another version's link",
                        path: old.clone(),
                        source,
                    })?;
                }
                continue;
            }
            let file = fs::File::open(cgroup).map_err(|source| DataplaneError::Io {
                action: "opening the cgroup",
                path: cgroup.to_path_buf(),
                source,
            })?;
            // A BPF link (kernel ≥ 5.7, which the hooks' helpers need anyway) always sits
            // next to the cgroup's other programs, and the kernel refuses attach flags on
            // one: "single" means no flags here, not exclusive.
            let id = prog
                .attach(&file, CgroupAttachMode::Single)
                .map_err(|e| err("attaching", e))?;
            let link = prog.take_link(id).map_err(|e| err("releasing", e))?;
            let fd = FdLink::try_from(link).map_err(|source| DataplaneError::Link {
                path: cgroup.to_path_buf(),
                source: Box::new(source),
            })?;
            match link_path {
                Some(path) => {
                    fd.pin(&path).map_err(|source| DataplaneError::Pin {
                        path,
                        source: Box::new(source),
                    })?;
                }
                // Unpinned (tests): attached as long as the process lives.
                None => std::mem::forget(fd),
            }
        }
        Ok(())
    }

    /// Detaches the pod programs (removing their pins). Missing links are not an error:
    /// deleting a veth already detached them.
    pub fn detach_pod_interface(&mut self, ifname: &str) -> Result<()> {
        let Some(pins) = &self.pins else {
            return Ok(());
        };
        for dir in [TcAttachType::Ingress, TcAttachType::Egress] {
            let path = pins.link_path(ifname, dir);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(DataplaneError::Io {
                        action: "unpinning link",
                        path,
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    fn attach(&mut self, ifname: &str, program: &'static str, dir: TcAttachType) -> Result<()> {
        let link_path = self.pins.as_ref().map(|p| p.link_path(ifname, dir));
        let mode = self.mode;
        let prog = classifier(&mut self.ebpf, program)?;
        let err = |action, source| DataplaneError::Program {
            action,
            program,
            ifname: ifname.to_string(),
            source: Box::new(source),
        };
        // A link pinned by an agent of another ABI version: take it over (swap our program
        // in, move the pin), so an upgrade never leaves the interface without a program nor
        // with two.
        let previous = match (&self.pins, &link_path) {
            (Some(pins), Some(path)) if !path.exists() => pins.other_version_link(ifname, dir),
            _ => None,
        };
        match mode {
            AttachMode::Tcx => {
                let existing = link_path
                    .as_ref()
                    .filter(|p| p.exists())
                    .or(previous.as_ref());
                if let Some(path) = existing {
                    // A previous agent's link: swap our program in, keep (or move) the pin.
                    let pinned =
                        PinnedLink::from_pin(path).map_err(|source| DataplaneError::Link {
                            path: path.clone(),
                            source: Box::new(source),
                        })?;
                    let link =
                        SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|source| {
                            DataplaneError::Link {
                                path: path.clone(),
                                source: Box::new(source),
                            }
                        })?;
                    let id = prog.attach_to_link(link).map_err(|e| err("replacing", e))?;
                    let link = prog.take_link(id).map_err(|e| err("releasing", e))?;
                    if let (Some(old), Some(new)) = (&previous, &link_path) {
                        let fd = FdLink::try_from(link).map_err(|source| DataplaneError::Link {
                            path: new.clone(),
                            source: Box::new(source),
                        })?;
                        fd.pin(new).map_err(|source| DataplaneError::Pin {
                            path: new.clone(),
                            source: Box::new(source),
                        })?;
                        fs::remove_file(old).map_err(|source| DataplaneError::Io {
                            action: "unpinning the link of another version",
                            path: old.clone(),
                            source,
                        })?;
                    }
                    // Otherwise the pin keeps the link attached; our fd can go.
                    return Ok(());
                }
                let id = prog
                    .attach_with_options(
                        ifname,
                        dir,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(|e| err("attaching", e))?;
                let link = prog.take_link(id).map_err(|e| err("releasing", e))?;
                match link_path {
                    Some(path) => {
                        let fd = FdLink::try_from(link).map_err(|source| DataplaneError::Link {
                            path: path.clone(),
                            source: Box::new(source),
                        })?;
                        fd.pin(&path).map_err(|source| DataplaneError::Pin {
                            path,
                            source: Box::new(source),
                        })?;
                    }
                    // Unpinned (tests): keep the link alive as long as the process.
                    None => std::mem::forget(link),
                }
                Ok(())
            }
            AttachMode::Netlink => {
                if let Err(source) = tc::qdisc_add_clsact(ifname) {
                    // EEXIST: the qdisc is already there.
                    let exists = matches!(&source, tc::TcError::NetlinkError(e)
                        if e.raw_os_error() == Some(libc::EEXIST));
                    if !exists {
                        return Err(DataplaneError::Qdisc {
                            ifname: ifname.to_string(),
                            source: Box::new(source),
                        });
                    }
                }
                // weir's filter has a fixed place (priority and handle), so a restarted or
                // upgraded agent replaces its predecessor's program there instead of adding a
                // filter in front of it.
                let options = || {
                    TcAttachOptions::Netlink(NlOptions {
                        priority: NETLINK_PRIORITY,
                        handle: NETLINK_HANDLE,
                        ..Default::default()
                    })
                };
                let id = match prog.attach_with_options(ifname, dir, options()) {
                    Ok(id) => id,
                    Err(ProgramError::TcError(tc::TcError::NetlinkError(e)))
                        if e.raw_os_error() == Some(libc::EEXIST) =>
                    {
                        let existing = SchedClassifierLink::attached(
                            ifname,
                            dir,
                            NETLINK_PRIORITY,
                            NETLINK_HANDLE,
                            None,
                        )
                        .map_err(|e| {
                            err("finding the existing filter", ProgramError::IOError(e))
                        })?;
                        prog.attach_to_link(existing)
                            .map_err(|e| err("replacing", e))?
                    }
                    Err(e) => return Err(err("attaching", e)),
                };
                // Filters stay with the qdisc when the agent exits.
                std::mem::forget(prog.take_link(id).map_err(|e| err("releasing", e))?);
                Ok(())
            }
        }
    }
}

/// Where weir's cls_bpf filter sits on an interface's clsact hook (fallback mode).
const NETLINK_PRIORITY: u16 = 0x7765;
const NETLINK_HANDLE: TcHandle = TcHandle::new(0, 0x7765);

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
        .ok_or(DataplaneError::MissingProgram { name })
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    let name = programs::XDP_UPLINK;
    ebpf.program_mut(name)
        .and_then(|p| <&mut Xdp>::try_from(p).ok())
        .ok_or(DataplaneError::MissingProgram { name })
}

fn sock_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut CgroupSockAddr> {
    ebpf.program_mut(name)
        .and_then(|p| <&mut CgroupSockAddr>::try_from(p).ok())
        .ok_or(DataplaneError::MissingProgram { name })
}

/// `BPF_LINK_UPDATE` of the link pinned at `path` to program `prog_fd` (aya has no update
/// for cgroup links).
fn update_pinned_link(path: &Path, prog_fd: i32) -> io::Result<()> {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_UPDATE: libc::c_long = 29;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let get = ObjGet {
        pathname: cpath.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: `get` is a valid bpf_attr prefix for BPF_OBJ_GET and outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &get as *const ObjGet,
            size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: BPF_OBJ_GET returned a new file descriptor we own.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let update = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog_fd as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: `update` is a valid bpf_attr prefix for BPF_LINK_UPDATE and outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &update as *const LinkUpdate,
            size_of::<LinkUpdate>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// TCX needs Linux 6.6.
fn tcx_supported() -> bool {
    let Ok(u) = nix::sys::utsname::uname() else {
        return false;
    };
    let release = u.release().to_string_lossy().into_owned();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (6, 6)
}

/// Opens a map of the node's pins without loading programs (read-only tools).
pub fn open_pinned_map(pins: &PinLayout, name: &str) -> Result<MapData> {
    let path = pins.maps_dir().join(name);
    MapData::from_pin(&path).map_err(|e| DataplaneError::Io {
        action: "opening pinned map",
        path,
        source: io::Error::other(e.to_string()),
    })
}

/// Loads a program; again when the verifier gave up because a signal arrived meanwhile. A
/// long verification checks for pending signals and fails with EAGAIN, and a process that
/// reaps its children through a SIGCHLD handler (tokio does) gets one whenever a child exits.
/// libbpf retries the same way.
fn load_retrying(
    name: &'static str,
    mut load: impl FnMut() -> std::result::Result<(), aya::programs::ProgramError>,
) -> Result<()> {
    const ATTEMPTS: u32 = 5;
    let mut attempt = 1;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.kind() == std::io::ErrorKind::WouldBlock && attempt < ATTEMPTS =>
            {
                attempt += 1;
            }
            r => {
                return r.map_err(|source| DataplaneError::Program {
                    action: "loading",
                    program: name,
                    ifname: String::new(),
                    source: Box::new(source),
                });
            }
        }
    }
}

#[cfg(test)]
mod load_tests {
    use std::cell::Cell;

    use aya::programs::ProgramError;

    use super::*;

    fn interrupted() -> ProgramError {
        ProgramError::LoadError {
            io_error: std::io::Error::from_raw_os_error(11),
            verifier_log: aya_obj::VerifierLog::new(String::new()),
        }
    }

    #[test]
    fn a_load_interrupted_by_a_signal_is_tried_again() {
        let calls = Cell::new(0);
        let r = load_retrying("p", || {
            calls.set(calls.get() + 1);
            if calls.get() < 3 {
                Err(interrupted())
            } else {
                Ok(())
            }
        });
        assert!(r.is_ok());
        assert_eq!(calls.get(), 3);
    }

    #[test]
    fn a_load_that_keeps_failing_or_is_rejected_gives_up() {
        let calls = Cell::new(0);
        let r = load_retrying("p", || {
            calls.set(calls.get() + 1);
            Err(interrupted())
        });
        assert!(r.is_err());
        assert_eq!(calls.get(), 5);
        calls.set(0);
        let r = load_retrying("p", || {
            calls.set(calls.get() + 1);
            Err(ProgramError::LoadError {
                io_error: std::io::Error::from_raw_os_error(13),
                verifier_log: aya_obj::VerifierLog::new("R1 invalid mem access".into()),
            })
        });
        assert!(r.is_err());
        assert_eq!(calls.get(), 1, "a verifier rejection is not retried");
    }
}
