//! Section `flood`: a flood of UDP packets from denied sources into a node, dropped by weir's
//! XDP prefilter, by the same lookup in TC, and by nftables (netdev ingress hook, inet input
//! chain), each with 10 and 100k denied prefixes; and benign TCP through the node with and
//! without the flood.
//!
//! **Network.** Per configuration its own namespaces, built by the benchmark: a *wan*
//! namespace (the network in front of the node: the flood sender's interface and a router),
//! the *node* (uplink `eth0` to the wan, `eth1` to a server behind it), a *client* behind
//! the wan and the *server*. Benign TCP (iperf3) goes client → wan → node's uplink → node →
//! server, the same way as the flood; every address is a test host's, and nothing is routed
//! to or from the caller's namespace.
//!
//! **Generator.** The kernel may be built without pktgen, and `BPF_PROG_TEST_RUN` in XDP
//! live-frames mode (the way xdp-tools' `xdp-trafficgen` sends) is refused (`EPERM`) on the
//! virtual machine the figures come from, so the flood is sent by a thread in the wan
//! namespace on an `AF_PACKET` socket with `PACKET_QDISC_BYPASS`, 64 frames per `sendmmsg`,
//! out of the wan's end of the uplink veth. Its frames are 60-byte UDP datagrams to the
//! node's uplink address, each from a source in a random one of the denied prefixes (65,536
//! prebuilt frames cycled through). The veth hands each socket buffer to the node's end,
//! which receives it in softirq (NAPI with an XDP program attached) as from a NIC; the sender has already
//! allocated that buffer, which a NIC would not have, so XDP's saving is smaller here than
//! on hardware (and on a veth, XDP copies a buffer without room for its headroom).
//!
//! **Configurations** (interleaved, A B C D A B C D …):
//! * *weir XDP prefilter*: the real `xdp_uplink` from weir's eBPF object, loaded as the verdict
//!   benchmark loads the programs (no agent), its `PREFILTER` trie filled by the agent's own
//!   [`DataplaneMaps::sync_prefilter`], attached natively to the uplink. Its flow events
//!   (one per drop) are read by a thread, as the agent reads them.
//! * *TC classifier, same trie*: weir's TC ingress program has no prefilter lookup, so the
//!   TC figure is a classifier ([`rawbpf::tc_prefilter`]) on TCX ingress of the uplink doing
//!   the same lookup in the same `PREFILTER` trie and counting the same counters, without the
//!   flow event: a little less work per drop than the XDP program does.
//! * *nftables netdev ingress*: an interval set of the same prefixes, `ip saddr @deny
//!   counter drop` in a chain on the uplink's ingress hook.
//! * *nftables inet input*: the same set and rule in the input chain (after routing).
//!
//! **Figures.** Packets dropped per second (the method's own counter over the wall time),
//! and per core: the drops divided by the CPU time spent in softirq on all CPUs over the
//! same window (`/proc/stat`), which is where the receive path runs — the veth's NAPI poll,
//! XDP, TC, the IP stack and netfilter alike; the sender's own work (socket, buffer, veth
//! transmit) is system time in its thread and is not counted. The drop figures' baseline is the best non-XDP method of
//! the same run. Benign TCP throughput is iperf3 over one stream, at the larger prefix count,
//! without and during the flood (baseline: without).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    maps::{MapData, MapInfo, RingBuf},
    programs::xdp::XdpMode,
};
use ipnet::{IpNet, Ipv4Net};
use weir_agent::{dataplane::Dataplane, maps::DataplaneMaps};
use weir_common::event::DropReason;
use weir_localcluster::netns::{self, Netns};

use super::{
    rawbpf::{self, Prefixes, Program},
    report::{Better, Goal, Report, Stats, num},
    topology::{BenchRun, exec_with_input},
    traffic::{self, IPERF_PORT},
    verdict::count,
};

pub const SECTION: &str = "flood";

pub struct Settings {
    pub runs: usize,
    /// Denied prefixes, smallest first.
    pub sizes: Vec<u32>,
    /// How long each flood run is measured.
    pub flood: Duration,
    pub iperf_seconds: u32,
}

impl Settings {
    pub fn new(quick: bool, runs: usize) -> Self {
        Self {
            runs,
            sizes: vec![10, 100_000],
            flood: Duration::from_secs(if quick { 2 } else { 5 }),
            iperf_seconds: if quick { 2 } else { 5 },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Method {
    Xdp,
    Tc,
    NftNetdev,
    NftInet,
}

impl Method {
    const ALL: [Method; 4] = [Method::Xdp, Method::Tc, Method::NftNetdev, Method::NftInet];
    fn id(self) -> &'static str {
        match self {
            Method::Xdp => "xdp",
            Method::Tc => "tc",
            Method::NftNetdev => "nft-netdev",
            Method::NftInet => "nft-inet",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Method::Xdp => "weir XDP prefilter",
            Method::Tc => "TC classifier, same trie",
            Method::NftNetdev => "nftables netdev ingress",
            Method::NftInet => "nftables inet input",
        }
    }
}

/// The denied prefixes: /28s back to back from 100.64.0.0 (shared address space, RFC 6598;
/// only ever a map key and a source inside the benchmark's namespaces).
fn prefixes(count: u32) -> Prefixes {
    Prefixes {
        base: u32::from(Ipv4Addr::new(100, 64, 0, 0)),
        len: 28,
        count,
    }
}

const NODE_UPLINK: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
const WAN_UPLINK: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 254);
const CLIENT: Ipv4Addr = Ipv4Addr::new(172, 30, 1, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(172, 30, 2, 2);
/// The flood's destination port on the node (nothing listens there).
const FLOOD_PORT: u16 = 9;

/// One configuration's namespaces.
struct FloodNet {
    method: Method,
    size: u32,
    wan: Netns,
    node: Netns,
    client: Netns,
    /// The flood sender's interface, in `wan`.
    wan_ifindex: u32,
    wan_mac: [u8; 6],
    node_mac: [u8; 6],
}

impl FloodNet {
    fn build(run: &mut BenchRun, method: Method, size: u32) -> Result<Self> {
        let tag = format!("{}-{}", method.id(), count(size as usize));
        let wan = run.netns(&format!("{tag}-wan"))?;
        let node = run.netns(&format!("{tag}-node"))?;
        let client = run.netns(&format!("{tag}-cli"))?;
        let server = run.netns(&format!("{tag}-srv"))?;
        for (ns, forward) in [
            (&wan, true),
            (&node, true),
            (&client, false),
            (&server, false),
        ] {
            ns.sysctl("net.ipv4.ip_forward", if forward { "1" } else { "0" })?;
            ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        }
        netns::veth(&wan, "up0", &node, "eth0")?;
        netns::veth(&client, "eth0", &wan, "cli0")?;
        netns::veth(&node, "eth1", &server, "eth0")?;
        wan.ip(&["addr", "add", &format!("{WAN_UPLINK}/24"), "dev", "up0"])?;
        wan.ip(&["addr", "add", "172.30.1.1/24", "dev", "cli0"])?;
        wan.ip(&[
            "route",
            "add",
            "172.30.2.0/24",
            "via",
            &NODE_UPLINK.to_string(),
        ])?;
        node.ip(&["addr", "add", &format!("{NODE_UPLINK}/24"), "dev", "eth0"])?;
        node.ip(&["addr", "add", "172.30.2.1/24", "dev", "eth1"])?;
        node.ip(&[
            "route",
            "add",
            "172.30.1.0/24",
            "via",
            &WAN_UPLINK.to_string(),
        ])?;
        client.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "eth0"])?;
        server.ip(&["addr", "add", &format!("{SERVER}/24"), "dev", "eth0"])?;
        for (ns, ifs) in [
            (&wan, &["up0", "cli0"][..]),
            (&node, &["eth0", "eth1"][..]),
            (&client, &["eth0"][..]),
            (&server, &["eth0"][..]),
        ] {
            for i in ifs {
                ns.ip(&["link", "set", i, "up"])?;
            }
        }
        client.ip(&["route", "add", "default", "via", "172.30.1.1"])?;
        server.ip(&["route", "add", "default", "via", "172.30.2.1"])?;
        // The veth's NAPI receive path, as with an XDP program, for every configuration.
        node.within(|| set_gro("eth0"))??;
        let wan_ifindex = ifindex(&wan, "up0")?;
        let (wan_mac, node_mac) = (mac(&wan, "up0")?, mac(&node, "eth0")?);
        let mut iperf = Command::new("iperf3");
        iperf
            .args(["-s", "-p", &IPERF_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        run.spawn(
            &server,
            &mut iperf,
            &format!("iperf3 server in {}", server.name()),
        )?;
        Ok(Self {
            method,
            size,
            wan,
            node,
            client,
            wan_ifindex,
            wan_mac,
            node_mac,
        })
    }
}

fn ifindex(ns: &Netns, ifname: &'static str) -> Result<u32> {
    Ok(ns.within(move || nix::net::if_::if_nametoindex(ifname))??)
}

fn mac(ns: &Netns, ifname: &str) -> Result<[u8; 6]> {
    let out = ns.ip(&["-o", "link", "show", "dev", ifname])?;
    let text = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .with_context(|| format!("no MAC for {ifname} in {}: {out}", ns.name()))?;
    let mut m = [0u8; 6];
    for (b, part) in m.iter_mut().zip(text.split(':')) {
        *b = u8::from_str_radix(part, 16)?;
    }
    Ok(m)
}

/// Turns GRO on for `ifname` of the calling thread's namespace (`ETHTOOL_SGRO`).
fn set_gro(ifname: &str) -> Result<()> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_SGRO: u32 = 0x2c;
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut libc::c_void,
        _pad: [u8; 16],
    }
    let mut value: [u32; 2] = [ETHTOOL_SGRO, 1];
    let mut req = IfReq {
        name: [0; 16],
        data: value.as_mut_ptr().cast(),
        _pad: [0; 16],
    };
    for (d, s) in req.name.iter_mut().zip(ifname.bytes().take(15)) {
        *d = s;
    }
    let sock = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    // SAFETY: a struct ifreq whose data points at a live struct ethtool_value.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
    if r < 0 {
        bail!(
            "turning GRO on for {ifname}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// A flood frame: UDP from `src` to the node's uplink address, 18 bytes of payload (a
/// 60-byte frame, the Ethernet minimum without its checksum), valid checksums.
fn flood_frame(src_mac: [u8; 6], dst_mac: [u8; 6], src: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.octets(), NODE_UPLINK.octets(), 64)
        .udp(40_000, FLOOD_PORT)
        .write(&mut f, &[0u8; 18])
        .expect("a frame within IPv4's size");
    f
}

/// weir's programs and maps for one prefix count, shared by the XDP and the TC
/// configuration of that count (their runs never overlap).
struct Loaded {
    dp: Dataplane,
    maps: DataplaneMaps,
    classifier: Program,
    /// Reads the XDP program's flow events while it runs, as the agent does (until dropped).
    _events: EventReader,
}

impl Loaded {
    fn new(size: u32) -> Result<Self> {
        let started = Instant::now();
        let mut dp = Dataplane::load(None).context("loading weir's eBPF programs")?;
        let mut maps = DataplaneMaps::take(&mut dp)?;
        let p = prefixes(size);
        let nets: std::collections::BTreeSet<IpNet> = (0..size)
            .map(|i| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(p.network(i)), p.len).expect("a /28")))
            .collect();
        maps.sync_prefilter(&nets, false)
            .context("filling the prefilter")?;
        maps.sync_host_addrs(&[
            IpAddr::V4(NODE_UPLINK),
            IpAddr::V4(Ipv4Addr::new(172, 30, 2, 1)),
        ])?;
        let events_map = dp.take_map(weir_common::maps::EVENTS)?;
        let events = EventReader::start(events_map)?;
        let ids = dp
            .xdp()?
            .info()
            .context("the XDP program's info")?
            .map_ids()
            .context("the XDP program's maps")?
            .context("this kernel does not list a program's maps")?;
        let mut by_name = BTreeMap::new();
        for id in ids {
            let name = MapInfo::from_id(id)?
                .name_as_str()
                .unwrap_or_default()
                .to_string();
            by_name.insert(name, MapData::from_id(id)?);
        }
        let fd = |name: &str| {
            by_name
                .get(name)
                .map(|m| m.fd().as_fd().as_raw_fd())
                .with_context(|| format!("the XDP program uses no map {name}"))
        };
        let insns = rawbpf::tc_prefilter(
            fd(weir_common::maps::PREFILTER)?,
            fd(weir_common::maps::PREFILTER_DROPS)?,
            fd(weir_common::maps::DROPS)?,
            DropReason::Prefilter as u32,
        );
        let classifier = Program::load_classifier("tc_prefilter", &insns)?;
        println!(
            "  loaded weir's programs with {} prefilter prefixes in {:.1?}",
            count(size as usize),
            started.elapsed()
        );
        Ok(Self {
            dp,
            maps,
            classifier,
            _events: events,
        })
    }

    /// Packets counted under the drop reason `prefilter`, all CPUs.
    fn prefilter_drops(&self) -> Result<u64> {
        let per_cpu = self
            .maps
            .drops
            .get(&(DropReason::Prefilter as u32), 0)
            .context("reading the drop counters")?;
        Ok(per_cpu.iter().sum())
    }
}

/// A thread that empties the flow events ring until dropped.
struct EventReader {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EventReader {
    fn start(map: aya::maps::Map) -> Result<Self> {
        let mut ring = RingBuf::try_from(map).context("the flow events map is not a ring")?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        // The ring is read where it was opened: moved into the thread whole.
        let thread = std::thread::Builder::new()
            .name("flood-events".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    while ring.next().is_some() {}
                    std::thread::sleep(Duration::from_millis(5));
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EventReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Everything the section runs on. Dropping it detaches and tears everything down.
pub struct FloodNetworks {
    nets: Vec<FloodNet>,
    /// TC links (detached on drop), before the programs.
    tc_links: Vec<OwnedFd>,
    loaded: BTreeMap<u32, Loaded>,
    run: BenchRun,
}

impl Drop for FloodNetworks {
    fn drop(&mut self) {
        self.tc_links.clear();
        self.loaded.clear();
        self.run.stop_processes();
    }
}

impl FloodNetworks {
    pub fn up(settings: &Settings) -> Result<Self> {
        let mut run = BenchRun::new()?;
        let mut nets = Vec::new();
        let mut loaded = BTreeMap::new();
        let mut tc_links = Vec::new();
        for &size in &settings.sizes {
            loaded.insert(size, Loaded::new(size)?);
        }
        for &size in &settings.sizes {
            for method in Method::ALL {
                let net = FloodNet::build(&mut run, method, size).with_context(|| {
                    format!("building the {}, {size} prefixes network", method.label())
                })?;
                let l = loaded.get_mut(&size).expect("loaded above");
                install(&net, l, &mut tc_links, run.dir())
                    .with_context(|| format!("installing {}, {size} prefixes", method.label()))?;
                println!(
                    "  network ready: {}, {} prefixes",
                    method.label(),
                    count(size as usize)
                );
                nets.push(net);
            }
        }
        Ok(Self {
            nets,
            tc_links,
            loaded,
            run,
        })
    }
}

/// Puts `net`'s method in place on its node's uplink.
fn install(
    net: &FloodNet,
    loaded: &mut Loaded,
    tc_links: &mut Vec<OwnedFd>,
    dir: &std::path::Path,
) -> Result<()> {
    match net.method {
        Method::Xdp => {
            let prog = loaded.dp.xdp()?;
            in_netns(&net.node, || {
                prog.attach("eth0", XdpMode::Driver)
                    .map(|_| ())
                    .context("attaching weir's XDP program natively to the uplink")
            })?
        }
        Method::Tc => {
            let classifier = &loaded.classifier;
            let link = in_netns(&net.node, || {
                let ifindex = nix::net::if_::if_nametoindex("eth0")?;
                classifier.attach_tcx_ingress(ifindex)
            })??;
            tc_links.push(link);
            Ok(())
        }
        Method::NftNetdev | Method::NftInet => {
            let p = prefixes(net.size);
            let mut elements = String::with_capacity(net.size as usize * 20);
            for i in 0..net.size {
                if i > 0 {
                    elements.push_str(",\n");
                }
                elements.push_str(&format!("{}/{}", Ipv4Addr::from(p.network(i)), p.len));
            }
            let (family, hook) = match net.method {
                Method::NftNetdev => (
                    "netdev",
                    "type filter hook ingress device \"eth0\" priority -500; policy accept;",
                ),
                _ => (
                    "inet",
                    "type filter hook input priority filter; policy accept;",
                ),
            };
            let rules = format!(
                "table {family} weirflood {{\n  set deny {{\n    type ipv4_addr\n    flags interval\n    elements = {{\n{elements}\n    }}\n  }}\n  chain drop_denied {{\n    {hook}\n    ip saddr @deny counter drop\n  }}\n}}\n"
            );
            exec_with_input(&net.node, dir, "nft", &["-f", "-"], &rules)
        }
    }
}

/// Runs `f` on a thread inside `ns` (borrowing is fine: the thread is joined).
fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = ns.path();
    std::thread::scope(|s| {
        s.spawn(|| {
            weir_conformance::netns::enter(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a thread in {} panicked", ns.name()))?
    })
}

/// The flood's sender: threads inside the wan namespace sending prebuilt frames out of the
/// uplink's wan end on an `AF_PACKET` socket with `PACKET_QDISC_BYPASS`, 64 per
/// `sendmmsg`, until stopped.
struct Flood {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<u64>>>,
}

/// Frames per `sendmmsg` call.
const FRAMES_PER_CALL: usize = 64;
/// Distinct frames (sources) a sender cycles through.
const FRAME_POOL: u32 = 65_536;
/// Sender threads.
const SENDERS: usize = 1;
/// The prefixes the flood's sources are drawn from, in every configuration: the traffic
/// stays the same while the table grows.
const FLOOD_PREFIXES: u32 = 10;

impl Flood {
    fn start(net: &FloodNet) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let p = prefixes(net.size);
        let pool: Arc<Vec<Vec<u8>>> = Arc::new(
            (0..FRAME_POOL)
                .map(|_| {
                    // The same traffic whatever the prefix count: any host of the first
                    // FLOOD_PREFIXES prefixes.
                    let prefix = fastrand::u32(..p.count.min(FLOOD_PREFIXES));
                    let host = fastrand::u32(1..p.step() - 1);
                    let src = Ipv4Addr::from(p.network(prefix) + host);
                    flood_frame(net.wan_mac, net.node_mac, src)
                })
                .collect(),
        );
        let mut threads = Vec::new();
        for _ in 0..SENDERS {
            let flag = stop.clone();
            let path = net.wan.path();
            let ifindex = net.wan_ifindex;
            let pool = pool.clone();
            threads.push(std::thread::Builder::new().name("flood".into()).spawn(
                move || -> Result<u64> {
                    weir_conformance::netns::enter(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
                    send_frames(ifindex, &pool, &flag)
                },
            )?);
        }
        Ok(Self { stop, threads })
    }

    /// Stops the senders; the frames they sent.
    fn stop(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let mut sent = 0;
        for t in self.threads.drain(..) {
            match t.join() {
                Ok(r) => sent += r?,
                Err(_) => bail!("a flood sender panicked"),
            }
        }
        Ok(sent)
    }
}

/// Sends `pool`'s frames round and round out of interface `ifindex` of the calling thread's
/// namespace until `stop`; the frames sent.
fn send_frames(ifindex: u32, pool: &[Vec<u8>], stop: &AtomicBool) -> Result<u64> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    ensure!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new fd owned by no one else.
    let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: an int option of the right size.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    ensure!(
        r == 0,
        "PACKET_QDISC_BYPASS: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: a sockaddr_ll of its own size.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    ensure!(
        r == 0,
        "binding the AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    let mut iovecs: Vec<libc::iovec> = pool
        .iter()
        .map(|f| libc::iovec {
            iov_base: f.as_ptr() as *mut libc::c_void,
            iov_len: f.len(),
        })
        .collect();
    let mut sent = 0u64;
    let mut at = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let n = FRAMES_PER_CALL.min(iovecs.len() - at);
        // SAFETY: all-zero is a valid msghdr; the iovecs outlive the call.
        let mut msgs: Vec<libc::mmsghdr> = (0..n)
            .map(|i| {
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = &mut iovecs[at + i];
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: `msgs` holds `n` initialised headers pointing at live frames.
        let r = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), n as u32, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // A full queue on the receiving side: try again.
            if e.raw_os_error() != Some(libc::ENOBUFS) && e.raw_os_error() != Some(libc::EAGAIN) {
                bail!("sendmmsg: {e}");
            }
        } else {
            sent += r as u64;
        }
        at = (at + n) % iovecs.len();
    }
    Ok(sent)
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// CPU time spent in softirq on all CPUs so far, in seconds.
fn softirq_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat without a cpu line")?;
    // cpu user nice system idle iowait irq softirq …
    let ticks: f64 = line
        .split_whitespace()
        .nth(7)
        .context("/proc/stat cpu line too short")?
        .parse()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks / hz)
}

/// The drop counter of `net`'s method.
fn drops(nets: &FloodNetworks, net: &FloodNet) -> Result<u64> {
    match net.method {
        Method::Xdp | Method::Tc => nets.loaded[&net.size].prefilter_drops(),
        Method::NftNetdev | Method::NftInet => {
            let family = if net.method == Method::NftNetdev {
                "netdev"
            } else {
                "inet"
            };
            let out = Command::new("ip")
                .args(["netns", "exec", net.node.name(), "nft", "list", "chain"])
                .args([family, "weirflood", "drop_denied"])
                .output()
                .context("running nft")?;
            ensure!(
                out.status.success(),
                "nft list chain in {}: {}",
                net.node.name(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            let text = String::from_utf8_lossy(&out.stdout);
            text.split_whitespace()
                .skip_while(|w| *w != "packets")
                .nth(1)
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("no packet counter in: {text}"))
        }
    }
}

struct Snapshot {
    at: Instant,
    drops: u64,
    softirq: f64,
}

fn snapshot(nets: &FloodNetworks, net: &FloodNet) -> Result<Snapshot> {
    Ok(Snapshot {
        drops: drops(nets, net)?,
        softirq: softirq_seconds()?,
        at: Instant::now(),
    })
}

/// One flood run: (packets dropped per second, per core of softirq time).
fn flood_run(nets: &FloodNetworks, net: &FloodNet, window: Duration) -> Result<(f64, f64)> {
    let flood = Flood::start(net)?;
    // Let the rings and caches fill before measuring.
    std::thread::sleep(Duration::from_millis(300));
    let a = snapshot(nets, net)?;
    std::thread::sleep(window);
    let b = snapshot(nets, net)?;
    flood.stop()?;
    let dropped = b.drops.saturating_sub(a.drops) as f64;
    let secs = (b.at - a.at).as_secs_f64();
    let cpu = b.softirq - a.softirq;
    Ok((
        dropped / secs,
        if cpu > 0.0 { dropped / cpu } else { f64::NAN },
    ))
}

fn key(kind: &str, method: Method, size: u32) -> String {
    format!("{SECTION}.{kind}.{}.{}", method.id(), count(size as usize))
}

pub fn run(report: &mut Report, nets: &mut FloodNetworks, settings: &Settings) -> Result<()> {
    let largest = *settings.sizes.last().context("no prefix counts")?;
    // Every configuration drops the flood and carries benign TCP before anything counts.
    for net in &nets.nets {
        let (rate, _) = flood_run(nets, net, Duration::from_millis(300))
            .with_context(|| format!("{}, {} prefixes", net.method.label(), net.size))?;
        ensure!(
            rate > 0.0,
            "{}, {} prefixes: nothing of the flood was dropped",
            net.method.label(),
            net.size
        );
        ensure!(
            traffic::can_connect(
                &net.client.path(),
                SERVER,
                IPERF_PORT,
                Duration::from_secs(2)
            ),
            "{}, {} prefixes: the client cannot reach the server through the node",
            net.method.label(),
            net.size
        );
    }
    let mut runs: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in 1..=settings.runs {
        let mut line = format!("  [flood run {r}/{}] dropped/s, per core:", settings.runs);
        for net in &nets.nets {
            let (rate, per_core) = flood_run(nets, net, settings.flood)
                .with_context(|| format!("{}, {} prefixes", net.method.label(), net.size))?;
            runs.entry(key("drops", net.method, net.size))
                .or_default()
                .push(rate);
            runs.entry(key("per-core", net.method, net.size))
                .or_default()
                .push(per_core);
            line.push_str(&format!(
                " {}-{}={}/{}",
                net.method.id(),
                count(net.size as usize),
                num(rate),
                num(per_core)
            ));
        }
        println!("{line}");
        let mut line = format!(
            "  [flood run {r}/{}] benign TCP Gbit/s, calm/flood:",
            settings.runs
        );
        for net in nets.nets.iter().filter(|n| n.size == largest) {
            let what = || format!("benign TCP, {}", net.method.label());
            let calm = traffic::iperf3(&net.client, SERVER, 1, settings.iperf_seconds, 0)
                .with_context(what)?;
            let flood = Flood::start(net)?;
            std::thread::sleep(Duration::from_millis(300));
            let during = traffic::iperf3(&net.client, SERVER, 1, settings.iperf_seconds, 0)
                .with_context(what);
            flood.stop()?;
            let during = during?;
            runs.entry(key("benign-calm", net.method, net.size))
                .or_default()
                .push(calm);
            runs.entry(key("benign-flood", net.method, net.size))
                .or_default()
                .push(during);
            line.push_str(&format!(
                " {}={}/{}",
                net.method.id(),
                num(calm),
                num(during)
            ));
        }
        println!("{line}");
    }
    record(report, &runs, settings);
    Ok(())
}

/// The non-XDP method with the highest median of `kind` at `size`.
fn best_other(runs: &BTreeMap<String, Vec<f64>>, kind: &str, size: u32) -> Option<Method> {
    Method::ALL
        .into_iter()
        .filter(|&m| m != Method::Xdp)
        .filter_map(|m| Some((m, Stats::of(runs.get(&key(kind, m, size))?)?.median)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(m, _)| m)
}

fn record(report: &mut Report, runs: &BTreeMap<String, Vec<f64>>, settings: &Settings) {
    let largest = *settings.sizes.last().expect("sizes");
    let smallest = settings.sizes[0];
    for (kind, what, unit) in [
        ("drops", "flood packets dropped", "packets/s"),
        (
            "per-core",
            "dropped per core of softirq time",
            "packets/s per core",
        ),
    ] {
        for &size in &settings.sizes {
            let best = best_other(runs, kind, size);
            for m in Method::ALL {
                let k = key(kind, m, size);
                let Some(values) = runs.get(&k) else { continue };
                let baseline = best.map(|b| key(kind, b, size));
                let label = format!(
                    "{}{}, {} prefixes: {what}",
                    m.label(),
                    if Some(m) == best {
                        " (best non-XDP)"
                    } else {
                        ""
                    },
                    count(size as usize)
                );
                report.define(SECTION, &k, label, unit, Better::Higher, baseline);
                for &v in values {
                    report.record(&k, v);
                }
            }
        }
    }
    for m in Method::ALL {
        let calm = key("benign-calm", m, largest);
        let during = key("benign-flood", m, largest);
        let (Some(c), Some(d)) = (runs.get(&calm), runs.get(&during)) else {
            continue;
        };
        let prefix = format!("{}, {} prefixes", m.label(), count(largest as usize));
        report.define(
            SECTION,
            &calm,
            format!("{prefix}: benign TCP throughput, no flood"),
            "Gbit/s",
            Better::Higher,
            None,
        );
        report.define(
            SECTION,
            &during,
            format!("{prefix}: benign TCP throughput during the flood"),
            "Gbit/s",
            Better::Higher,
            Some(calm.clone()),
        );
        for &v in c {
            report.record(&calm, v);
        }
        for &v in d {
            report.record(&during, v);
        }
    }
    let median = |k: &str| runs.get(k).and_then(|v| Stats::of(v)).map(|s| s.median);
    // XDP against the best of the rest, per core (the sender shares the receiving CPU,
    // so the raw rate is partly the sender's; the per-core figure is the receive side's).
    for &size in &settings.sizes {
        let best = best_other(runs, "per-core", size);
        let xdp = median(&key("per-core", Method::Xdp, size));
        let other = best.and_then(|b| median(&key("per-core", b, size)));
        let (measured, met) = match (xdp, other, best) {
            (Some(x), Some(o), Some(b)) if o > 0.0 => (
                format!(
                    "{} vs {} ({}) packets/s per core: {:.2}×",
                    num(x),
                    num(o),
                    b.label(),
                    x / o
                ),
                Some(x / o >= 2.0),
            ),
            _ => ("—".into(), None),
        };
        report.goals.push(Goal {
            goal: format!(
                "XDP drops a flood ≥ 2× the rate of the best non-XDP method ({} prefixes, per core)",
                count(size as usize)
            ),
            measured,
            met,
        });
    }
    for m in Method::ALL {
        let (Some(a), Some(b)) = (
            median(&key("per-core", m, smallest)),
            median(&key("per-core", m, largest)),
        ) else {
            continue;
        };
        let r = b / a;
        report.note(
            SECTION,
            format!(
                "Flatness, {}: drops per core with {} prefixes {:.2}× those with {}.",
                m.label(),
                count(largest as usize),
                r,
                count(smallest as usize)
            ),
        );
        if m == Method::Xdp {
            report.goals.push(Goal {
                goal: format!(
                    "XDP prefilter cost flat from {} to {} prefixes (drops per core within 1.1× of each other)",
                    count(smallest as usize),
                    count(largest as usize)
                ),
                measured: format!("{} → {} packets/s per core ({r:.2}×)", num(a), num(b)),
                met: Some(r >= 1.0 / 1.1),
            });
        }
    }
    let ratio = |m: Method| {
        Some(median(&key("benign-flood", m, largest))? / median(&key("benign-calm", m, largest))?)
    };
    if let Some(r) = ratio(Method::Xdp) {
        let others: Vec<String> = Method::ALL
            .into_iter()
            .filter(|&m| m != Method::Xdp)
            .filter_map(|m| Some(format!("{} {:.2}×", m.label(), ratio(m)?)))
            .collect();
        report.goals.push(Goal {
            goal: format!(
                "benign TCP throughput during the flood ≥ 0.9× of its value without ({} prefixes, weir XDP)",
                count(largest as usize)
            ),
            measured: format!("{r:.2}× (others: {})", others.join(", ")),
            met: Some(r >= 0.9),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flood_frame_is_60_bytes_of_valid_udp_to_the_node() {
        let f = flood_frame(
            [2, 0, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 2],
            Ipv4Addr::new(100, 64, 0, 1),
        );
        assert_eq!(f.len(), 60);
        let (ip, rest) = etherparse::Ipv4Header::from_slice(&f[14..]).unwrap();
        assert_eq!(ip.header_checksum, ip.calc_header_checksum());
        assert_eq!(ip.destination, NODE_UPLINK.octets());
        let (udp, _) = etherparse::UdpHeader::from_slice(rest).unwrap();
        assert_eq!(udp.destination_port, FLOOD_PORT);
        assert_eq!(usize::from(udp.length), 8 + 18);
    }

    #[test]
    fn the_best_other_method_is_never_xdp() {
        let mut runs = BTreeMap::new();
        runs.insert(key("drops", Method::Xdp, 10), vec![9.0]);
        runs.insert(key("drops", Method::Tc, 10), vec![3.0]);
        runs.insert(key("drops", Method::NftNetdev, 10), vec![4.0]);
        assert_eq!(best_other(&runs, "drops", 10), Some(Method::NftNetdev));
        assert_eq!(best_other(&runs, "drops", 100), None);
    }
}
