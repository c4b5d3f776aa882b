//! The local cluster: nodes and pods as network namespaces, real agents, real CNI calls.
//!
//! Layout of a run (`<run>` is a short random id, so parallel runs never collide):
//! * namespaces `weir-<run>-sw` (a bridge: the nodes' L2 segment; with the routed topology
//!   two segments `-sw-a`/`-sw-b` joined by a router `-rtr`), `weir-<run>-ctl` (controller),
//!   `weir-<node>` per node, `weir-<run>-<ns>-<pod>` per pod (with `--runtime containerd`
//!   pods' namespaces are containerd's, mounted under the node's containerd state);
//! * node `i` is named `<run>-n<i>`; the controller assigns its pod CIDRs from 10.244.0.0/16
//!   and, with `--ip-family ipv6` or `dual`, fd00:10:244::/56 (a /64 per node); the nodes'
//!   own addresses (the underlay) are IPv4 in every family: IPv6 pods reach other nodes'
//!   pods over VXLAN in IPv4 datagrams;
//! * files under `/run/weir-local/<run>/`: the run record (for `down`), per-node agent state,
//!   sockets and logs, and the manifest directory the controller reads.
//!
//! Nothing is created in the caller's network namespace and no namespace has a route out of
//! the machine: the fabric's only links are between the run's own namespaces.

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use serde_json::json;

use weir_transport::ClusterCa;

use crate::{
    containerd::{self, Cri, Runtime},
    netns::{self, Netns},
    record::{ProcessRecord, RUNS_DIR, RunRecord},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// Every node on one L2 segment.
    L2,
    /// Nodes alternate between two subnets joined by a router.
    Routed,
}

impl std::fmt::Display for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Topology::L2 => "l2",
            Topology::Routed => "routed",
        })
    }
}

impl std::str::FromStr for Topology {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "l2" => Ok(Topology::L2),
            "routed" => Ok(Topology::Routed),
            other => Err(format!("unknown topology {other:?} (l2 or routed)")),
        }
    }
}

/// The address families of the pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IpFamily {
    /// IPv4 pods only (the default).
    #[default]
    Ipv4,
    /// IPv6 pods only.
    Ipv6,
    /// Every pod has an IPv4 and an IPv6 address (IPv4 first).
    Dual,
}

/// The cluster's IPv4 pod CIDR.
pub const POD_CIDR_V4: &str = "10.244.0.0/16";
/// The cluster's IPv6 pod CIDR (a unique local range: never routed beyond the machine).
pub const POD_CIDR_V6: &str = "fd00:10:244::/56";

impl IpFamily {
    /// The controller's `--cluster-cidr`.
    pub fn cluster_cidrs(self) -> &'static str {
        match self {
            IpFamily::Ipv4 => POD_CIDR_V4,
            IpFamily::Ipv6 => POD_CIDR_V6,
            IpFamily::Dual => "10.244.0.0/16,fd00:10:244::/56",
        }
    }
}

impl std::fmt::Display for IpFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IpFamily::Ipv4 => "ipv4",
            IpFamily::Ipv6 => "ipv6",
            IpFamily::Dual => "dual",
        })
    }
}

impl std::str::FromStr for IpFamily {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ipv4" => Ok(IpFamily::Ipv4),
            "ipv6" => Ok(IpFamily::Ipv6),
            "dual" => Ok(IpFamily::Dual),
            other => Err(format!("unknown IP family {other:?} (ipv4, ipv6 or dual)")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub nodes: usize,
    pub topology: Topology,
    /// Directory holding `weir-agent`, `weir-cni` (and `weir-controller`).
    pub bin_dir: PathBuf,
    pub bpffs: PathBuf,
    /// `RUST_LOG` for the agents and the controller.
    pub log: String,
    /// Run the controller (policy) and connect the agents to it.
    pub controller: bool,
    /// Extra arguments for every agent (e.g. `--service-proxy kube-proxy`).
    pub agent_args: Vec<String>,
    /// How pods are created: the plugin called directly, or containers through containerd.
    pub runtime: Runtime,
    /// The pods' address families.
    pub ip_family: IpFamily,
    /// The nodes are known by IPv6 addresses (an IPv6 underlay): the fabric carries IPv6
    /// beside IPv4 (the control plane stays on IPv4), each Node object lists its IPv6
    /// address first, so the controller hands out IPv6 node addresses and VXLAN's outer
    /// header is IPv6.
    pub ipv6_underlay: bool,
    /// The controller checks every incremental compile against a full one and stops at the
    /// first difference (tests; it costs a full compile per change).
    pub check_incremental_compiles: bool,
}

impl ClusterOptions {
    pub fn new(bin_dir: impl Into<PathBuf>) -> Self {
        Self {
            nodes: 1,
            topology: Topology::L2,
            bin_dir: bin_dir.into(),
            bpffs: PathBuf::from("/sys/fs/bpf"),
            log: "info".into(),
            controller: true,
            agent_args: Vec::new(),
            runtime: Runtime::Direct,
            ip_family: IpFamily::Ipv4,
            ipv6_underlay: false,
            check_incremental_compiles: false,
        }
    }
}

pub struct Node {
    pub name: String,
    pub index: usize,
    pub netns: Netns,
    pub ip: Ipv4Addr,
    /// Its IPv6 address on the fabric ([`ClusterOptions::ipv6_underlay`]).
    pub ip6: Option<Ipv6Addr>,
    /// Set only when the cluster runs without a controller (which otherwise assigns it).
    pub pod_cidr: Option<Ipv4Net>,
    pub dir: PathBuf,
    /// Labels of its Node object besides the ones a kubelet sets (see
    /// [`LocalCluster::set_node_labels`]).
    labels: BTreeMap<String, String>,
    agent: Option<(Child, ProcessRecord)>,
    /// The node's containerd (`--runtime containerd`).
    containerd: Option<(Child, ProcessRecord)>,
}

impl Node {
    /// Where the node's containerd keeps everything (`--runtime containerd`).
    pub fn containerd_dir(&self) -> PathBuf {
        self.dir.join("containerd")
    }
    pub fn containerd_socket(&self) -> PathBuf {
        containerd::socket_path(&self.containerd_dir())
    }
    pub fn containerd_log(&self) -> PathBuf {
        self.containerd_dir().join("containerd.log")
    }
    pub fn containerd_pid(&self) -> Option<u32> {
        self.containerd.as_ref().map(|(c, _)| c.id())
    }
    pub fn cni_socket(&self) -> PathBuf {
        self.dir.join("cni.sock")
    }
    pub fn agent_log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|(c, _)| c.id())
    }
}

/// A pod as the cluster created it.
#[derive(Clone, Debug)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub netns: Netns,
    pub container_id: String,
    /// The app container's id (`--runtime containerd`; `container_id` is the sandbox's).
    pub app_container: Option<String>,
    /// The first of its addresses (IPv4 on a dual-stack cluster).
    pub ip: IpAddr,
    /// All its addresses, one per family, as the CNI result lists them.
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    /// (name, port, protocol) container ports, for named ports.
    pub ports: Vec<(String, u16, String)>,
    /// (host port, container port, protocol) hostPorts.
    pub host_ports: Vec<(u16, u16, String)>,
}

/// What to create.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    /// Index into the cluster's nodes.
    pub node: usize,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<(String, u16, String)>,
    /// (host port, container port, protocol): the containers' `hostPort`s, passed to the
    /// plugin as `runtimeConfig.portMappings`, as kubelet does (direct runtime only).
    pub host_ports: Vec<(u16, u16, String)>,
}

/// The result of one plugin invocation.
#[derive(Debug)]
pub struct CniOutcome {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CniOutcome {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or(serde_json::Value::Null)
    }
}

pub struct LocalCluster {
    opts: ClusterOptions,
    record: RunRecord,
    controller: Option<Controller>,
    ca: Option<ClusterCa>,
    segments: Vec<Segment>,
    external: Option<ExternalHost>,
    /// Router namespace (routed topology).
    router: Option<Netns>,
    sync_token: u64,
    nodes: Vec<Node>,
    pods: BTreeMap<(String, String), Pod>,
    torn_down: bool,
}

/// The controller's sync file in the manifest directory (see the controller's `source`).
const SYNC_FILE_NAME: &str = ".weir-sync";

/// A node's client certificate for the controller connection, in `<node dir>/tls`.
fn issue_node_certificate(ca: &ClusterCa, node: &Node) -> Result<()> {
    let dir = node.dir.join("tls");
    fs::create_dir_all(&dir)?;
    fs::write(dir.join("ca.crt"), ca.cert_pem())?;
    ca.issue_node_cert(&node.name)?
        .write(&dir.join("tls.crt"), &dir.join("tls.key"))?;
    Ok(())
}

/// A host outside the cluster: neither a node nor a pod, reachable only through the nodes
/// (it has no route to pod addresses), the way an internet server is. Conformance runs serve
/// the model's ports there (`external` destinations).
#[derive(Clone, Debug)]
pub struct ExternalHost {
    pub netns: Netns,
    pub ip: Ipv4Addr,
    /// Its IPv6 address, on an IPv6 underlay ([`EXTERNAL_IP6`]).
    pub ip6: Option<Ipv6Addr>,
}

/// The external host's address: in TEST-NET-3 (RFC 5737), which is never routed anywhere,
/// so nothing sent to it can leave the machine even by mistake.
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The router's address on the external host's segment (routed topology).
const EXTERNAL_GATEWAY: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const EXTERNAL_NET: &str = "203.0.113.0/24";
/// The external host's IPv6 address on an IPv6 underlay: in the documentation prefix
/// (RFC 3849), never routed anywhere either.
pub const EXTERNAL_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x203, 0, 0, 0, 0, 0x10);
const EXTERNAL_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x203, 0, 0, 0, 0, 1);
const EXTERNAL_NET6: &str = "2001:db8:203::/64";
/// The fabric's IPv6 range ([`ClusterOptions::ipv6_underlay`]): a /64 per segment.
const FABRIC_NET_V6: &str = "fd00:172:30::/48";

/// Host `host` of fabric segment `subnet` in [`FABRIC_NET_V6`] (`fd00:172:30:<subnet>::<host>`,
/// the IPv6 twin of `172.30.<subnet>.<host>`).
fn fabric_ipv6(subnet: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x172, 0x30, subnet.into(), 0, 0, 0, host.into())
}

/// A node's `status.addresses`: its IPv6 InternalIP first on an IPv6 underlay (the address
/// the controller hands out), then its IPv4 one.
fn node_addresses(node: &Node) -> Vec<serde_json::Value> {
    node.ip6
        .map(IpAddr::V6)
        .into_iter()
        .chain([IpAddr::V4(node.ip)])
        .map(|ip| json!({"type": "InternalIP", "address": ip.to_string()}))
        .collect()
}

/// The range ClusterIPs are allocated from when a Service leaves `clusterIP` unset (the
/// local cluster has no API server to do it; kubeadm's default range starts here too).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The range nodePorts are allocated from when a Service leaves `nodePort` unset
/// (Kubernetes' default `--service-node-port-range`).
pub const NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 30000..=32767;

/// One L2 segment of the fabric: a bridge in its own namespace.
struct Segment {
    switch: Netns,
    /// Third octet of the segment's 172.30.x.0/24.
    subnet: u8,
    /// The router's address on the segment (routed topology).
    gateway: Option<Ipv4Addr>,
}

/// The controller process and where it lives.
pub struct Controller {
    pub netns: Netns,
    pub ip: Ipv4Addr,
    pub dir: PathBuf,
    process: Option<(Child, ProcessRecord)>,
}

fn random_run_id() -> String {
    format!("w{:06x}", fastrand::u32(..1 << 24))
}

impl LocalCluster {
    /// Builds the fabric and the nodes and starts an agent on each.
    pub async fn up(opts: ClusterOptions) -> Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            bail!("the local cluster needs root (network namespaces, eBPF)");
        }
        ensure_bpffs(&opts.bpffs)?;
        let run = random_run_id();
        let dir = Path::new(RUNS_DIR).join(&run);
        fs::create_dir_all(dir.join("manifests"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let record = RunRecord {
            run: run.clone(),
            dir: dir.clone(),
            bpffs: opts.bpffs.clone(),
            ..Default::default()
        };
        record.save()?;
        let mut cluster = Self {
            opts,
            record,
            controller: None,
            ca: None,
            segments: Vec::new(),
            external: None,
            router: None,
            sync_token: 0,
            nodes: Vec::new(),
            pods: BTreeMap::new(),
            torn_down: false,
        };
        // On any error below, Drop tears down what exists.
        cluster.build_fabric()?;
        if cluster.opts.controller {
            cluster.issue_certificates()?;
            cluster.start_controller()?;
        }
        for i in 1..=cluster.opts.nodes {
            cluster.write_node_manifest(i - 1)?;
            cluster.start_agent(i - 1).await?;
        }
        if cluster.opts.controller {
            cluster.sync().await?;
        }
        Ok(cluster)
    }

    pub fn run_id(&self) -> &str {
        &self.record.run
    }

    pub fn dir(&self) -> &Path {
        &self.record.dir
    }

    pub fn topology(&self) -> Topology {
        self.opts.topology
    }

    pub fn controller(&self) -> Option<&Controller> {
        self.controller.as_ref()
    }

    /// The host outside the cluster.
    pub fn external(&self) -> Option<&ExternalHost> {
        self.external.as_ref()
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.values()
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pods.get(&(namespace.to_string(), name.to_string()))
    }

    fn ns_name(&self, what: &str) -> String {
        format!("weir-{}-{what}", self.record.run)
    }

    /// A namespace recorded for teardown, named `weir-<run>-<what>`.
    pub fn create_netns(&mut self, what: &str) -> Result<Netns> {
        let name = self.ns_name(what);
        self.new_netns(&name)
    }

    fn new_netns(&mut self, name: &str) -> Result<Netns> {
        // Record first: a crash between the two steps still gets cleaned up.
        self.record.namespaces.push(name.to_string());
        self.record.save()?;
        Ok(Netns::create(name)?)
    }

    /// The nodes' network: one L2 segment, or two joined by a router (no way out of either).
    fn build_fabric(&mut self) -> Result<()> {
        match self.opts.topology {
            Topology::L2 => {
                let sw = self.new_segment("sw")?;
                self.add_controller_netns(&sw, Ipv4Addr::new(172, 30, 0, 2), None)?;
                self.segments.push(Segment {
                    switch: sw,
                    subnet: 0,
                    gateway: None,
                });
            }
            Topology::Routed => {
                let rtr = self.new_netns(&self.ns_name("rtr"))?;
                rtr.sysctl("net.ipv4.ip_forward", "1")?;
                if self.opts.ipv6_underlay {
                    rtr.sysctl("net.ipv6.conf.all.forwarding", "1")?;
                }
                for (leg, subnet) in [("a", 1u8), ("b", 2u8)] {
                    let sw = self.new_segment(&format!("sw-{leg}"))?;
                    let port = format!("rtr-{leg}");
                    netns::veth(&rtr, &format!("eth-{leg}"), &sw, &port)?;
                    sw.ip(&["link", "set", &port, "master", "br0"])?;
                    rtr.ip(&[
                        "addr",
                        "add",
                        &format!("172.30.{subnet}.1/24"),
                        "dev",
                        &format!("eth-{leg}"),
                    ])?;
                    if self.opts.ipv6_underlay {
                        rtr.ip(&[
                            "addr",
                            "add",
                            &format!("{}/64", fabric_ipv6(subnet, 1)),
                            "dev",
                            &format!("eth-{leg}"),
                            "nodad",
                        ])?;
                    }
                    self.segments.push(Segment {
                        switch: sw,
                        subnet,
                        gateway: Some(Ipv4Addr::new(172, 30, subnet, 1)),
                    });
                }
                let first = self.segments[0].switch.clone();
                self.add_controller_netns(
                    &first,
                    Ipv4Addr::new(172, 30, 1, 2),
                    Some(Ipv4Addr::new(172, 30, 1, 1)),
                )?;
                self.router = Some(rtr);
            }
        }
        self.add_external_host()?;
        for i in 1..=self.opts.nodes {
            self.add_node_netns(i)?;
        }
        Ok(())
    }

    /// The external host: on the nodes' segment (l2) or behind the router (routed), with
    /// routes to the node addresses only.
    fn add_external_host(&mut self) -> Result<()> {
        let ext = self.new_netns(&self.ns_name("ext"))?;
        match &self.router {
            Some(rtr) => {
                netns::veth(rtr, "eth-ext", &ext, "eth0")?;
                rtr.ip(&[
                    "addr",
                    "add",
                    &format!("{EXTERNAL_GATEWAY}/24"),
                    "dev",
                    "eth-ext",
                ])?;
                ext.ip(&["addr", "add", &format!("{EXTERNAL_IP}/24"), "dev", "eth0"])?;
                ext.ip(&[
                    "route",
                    "add",
                    "172.30.0.0/16",
                    "via",
                    &EXTERNAL_GATEWAY.to_string(),
                ])?;
            }
            None => {
                let sw = self.segments[0].switch.clone();
                netns::veth(&ext, "eth0", &sw, "ext")?;
                sw.ip(&["link", "set", "ext", "master", "br0"])?;
                ext.ip(&["addr", "add", &format!("{EXTERNAL_IP}/24"), "dev", "eth0"])?;
                ext.ip(&["route", "add", "172.30.0.0/16", "dev", "eth0"])?;
            }
        }
        let ip6 = self.opts.ipv6_underlay.then_some(EXTERNAL_IP6);
        if ip6.is_some() {
            let cidr6 = format!("{EXTERNAL_IP6}/64");
            ext.ip(&["addr", "add", &cidr6, "dev", "eth0", "nodad"])?;
            match &self.router {
                Some(rtr) => {
                    let gw = format!("{EXTERNAL_GATEWAY6}/64");
                    rtr.ip(&["addr", "add", &gw, "dev", "eth-ext", "nodad"])?;
                    ext.ip(&[
                        "-6",
                        "route",
                        "add",
                        FABRIC_NET_V6,
                        "via",
                        &EXTERNAL_GATEWAY6.to_string(),
                    ])?;
                }
                None => {
                    ext.ip(&["-6", "route", "add", FABRIC_NET_V6, "dev", "eth0"])?;
                }
            }
        }
        self.external = Some(ExternalHost {
            netns: ext,
            ip: EXTERNAL_IP,
            ip6,
        });
        Ok(())
    }

    fn new_segment(&mut self, what: &str) -> Result<Netns> {
        let sw = self.new_netns(&self.ns_name(what))?;
        sw.ip(&["link", "add", "br0", "type", "bridge"])?;
        sw.ip(&["link", "set", "br0", "up"])?;
        Ok(sw)
    }

    /// Adds a node to a running cluster (it joins the segments round-robin) and starts its
    /// agent. Returns its index in [`Self::nodes`].
    pub async fn add_node(&mut self) -> Result<usize> {
        let i = self.nodes.iter().map(|n| n.index).max().unwrap_or(0) + 1;
        self.add_node_netns(i)?;
        let idx = self.nodes.len() - 1;
        if let Some(ca) = &self.ca {
            issue_node_certificate(ca, &self.nodes[idx])?;
        }
        self.write_node_manifest(idx)?;
        self.start_agent(idx).await?;
        self.sync().await?;
        Ok(idx)
    }

    /// Removes a node as a cluster would when it is deleted: its agent and pods go away, its
    /// Node object is deleted, and the others stop routing to it.
    pub async fn remove_node(&mut self, idx: usize) -> Result<()> {
        // Its containers go first, while its agent still answers their plugin's DEL.
        self.stop_containerd(idx, true);
        self.kill_agent(idx);
        let node = self.nodes.remove(idx);
        let pods: Vec<(String, String)> = self
            .pods
            .iter()
            .filter(|(_, p)| p.node == node.name)
            .map(|(k, _)| k.clone())
            .collect();
        for key in pods {
            if let Some(pod) = self.pods.remove(&key) {
                let _ = fs::remove_file(
                    self.record
                        .dir
                        .join(format!("manifests/pods/{}.{}.yaml", key.0, key.1)),
                );
                if pod.netns.is_named() {
                    netns::delete(pod.netns.name());
                }
            }
        }
        let _ = fs::remove_file(
            self.record
                .dir
                .join(format!("manifests/nodes/{}.yaml", node.name)),
        );
        netns::delete(node.netns.name());
        let _ = fs::remove_dir_all(self.opts.bpffs.join("weir").join(&node.name));
        self.sync().await
    }

    /// The controller's namespace, on the first segment. It runs only if enabled.
    fn add_controller_netns(
        &mut self,
        sw: &Netns,
        ip: Ipv4Addr,
        gateway: Option<Ipv4Addr>,
    ) -> Result<()> {
        if !self.opts.controller {
            return Ok(());
        }
        let ns = self.new_netns(&self.ns_name("ctl"))?;
        netns::veth(&ns, "eth0", sw, "ctl")?;
        sw.ip(&["link", "set", "ctl", "master", "br0"])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        if let Some(gw) = gateway {
            ns.ip(&["route", "add", "172.30.0.0/16", "via", &gw.to_string()])?;
        }
        let dir = self.record.dir.join("controller");
        fs::create_dir_all(&dir)?;
        self.controller = Some(Controller {
            netns: ns,
            ip,
            dir,
            process: None,
        });
        Ok(())
    }

    /// A cluster CA, the controller's serving certificate and one client certificate per
    /// node, as files (in a real cluster they come from a Secret or the bootstrap).
    fn issue_certificates(&mut self) -> Result<()> {
        let ctl = self
            .controller
            .as_ref()
            .context("no controller namespace")?;
        let ca = ClusterCa::generate(&format!("weir-local-{}", self.record.run))?;
        let tls = ctl.dir.join("tls");
        fs::create_dir_all(&tls)?;
        ca.save(&tls.join("ca.crt"), &tls.join("ca.key"))?;
        ca.issue_controller_cert(&["weir-controller"], &[IpAddr::V4(ctl.ip)])?
            .write(&tls.join("tls.crt"), &tls.join("tls.key"))?;
        for node in &self.nodes {
            issue_node_certificate(&ca, node)?;
        }
        self.ca = Some(ca);
        Ok(())
    }

    fn start_controller(&mut self) -> Result<()> {
        let bin = self.opts.bin_dir.join("weir-controller");
        let manifests = self.record.dir.join("manifests");
        let log_filter = self.opts.log.clone();
        let cluster_cidrs = self.opts.ip_family.cluster_cidrs();
        let ctl = self
            .controller
            .as_mut()
            .context("no controller namespace")?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(ctl.dir.join("controller.log"))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("--manifests")
            .arg(&manifests)
            .arg("--state-dir")
            .arg(&ctl.dir)
            .args(["--cluster-cidr", cluster_cidrs, "--node-cidr-mask", "24"])
            .args(["--node-cidr-mask-ipv6", "64"])
            .arg("--tls-dir")
            .arg(ctl.dir.join("tls"))
            .arg("--status-file")
            .arg(ctl.dir.join("status.json"))
            .args(["--listen", &format!("{}:7443", ctl.ip)])
            .env("RUST_LOG", log_filter)
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if self.opts.check_incremental_compiles {
            cmd.arg("--check-incremental-compiles");
        }
        let child = ctl
            .netns
            .spawn(&mut cmd)
            .with_context(|| format!("starting {}", bin.display()))?;
        let rec = ProcessRecord::new(child.id(), "controller");
        ctl.process = Some((child, rec.clone()));
        self.record.processes.push(rec);
        self.record.save()?;
        Ok(())
    }

    /// Stops the controller abruptly; agents keep enforcing what they have.
    pub fn kill_controller(&mut self) {
        if let Some((mut child, rec)) = self.controller.as_mut().and_then(|c| c.process.take()) {
            let _ = child.kill();
            let _ = child.wait();
            self.record.processes.retain(|p| p != &rec);
            let _ = self.record.save();
        }
    }

    /// The controller's process, while it runs.
    pub fn controller_pid(&self) -> Option<u32> {
        self.controller
            .as_ref()
            .and_then(|c| c.process.as_ref())
            .map(|(child, _)| child.id())
    }

    /// Freezes the controller (SIGSTOP) or thaws it (SIGCONT): a controller that is slow to
    /// catch up, without losing its state.
    pub fn freeze_controller(&self, frozen: bool) {
        let signal = if frozen {
            nix::sys::signal::Signal::SIGSTOP
        } else {
            nix::sys::signal::Signal::SIGCONT
        };
        if let Some(pid) = self.controller_pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
        }
    }

    /// Starts the controller again (after [`Self::kill_controller`]).
    pub fn restart_controller(&mut self) -> Result<()> {
        self.kill_controller();
        self.start_controller()
    }

    /// Bumps the sync token in the manifest directory and waits until every agent enforces
    /// the state compiled from the manifests written so far.
    pub async fn sync(&mut self) -> Result<()> {
        let Some(ctl) = &self.controller else {
            return Ok(());
        };
        self.sync_token += 1;
        let token = self.sync_token;
        self.write_manifest(SYNC_FILE_NAME, &token.to_string())?;
        let status = ctl.dir.join("status.json");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let synced = fs::read(&status)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["synced"].as_u64())
                .unwrap_or(0);
            if synced >= token {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the dataplane did not catch up with the manifests within 30 s (sync token {token}, reached {synced}); controller log:\n{}",
                    tail(&ctl.dir.join("controller.log"), 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The Node object of node `idx`, as a kubelet would register it, with the labels
    /// [`Self::set_node_labels`] gave it.
    fn write_node_manifest(&self, idx: usize) -> Result<()> {
        let node = &self.nodes[idx];
        let mut labels = node.labels.clone();
        labels.insert("kubernetes.io/hostname".to_owned(), node.name.clone());
        labels.insert("kubernetes.io/os".to_owned(), "linux".to_owned());
        let obj = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node.name, "labels": labels},
            "status": {"addresses": node_addresses(node)},
        });
        self.write_manifest(
            &format!("nodes/{}.yaml", node.name),
            &serde_norway::to_string(&obj)?,
        )
    }

    /// Replaces node `idx`'s own labels (as `kubectl label node --overwrite` would; the
    /// kubelet's `kubernetes.io/hostname` and `kubernetes.io/os` stay).
    pub fn set_node_labels(&mut self, idx: usize, labels: BTreeMap<String, String>) -> Result<()> {
        self.nodes
            .get_mut(idx)
            .with_context(|| format!("no node {idx}"))?
            .labels = labels;
        self.write_node_manifest(idx)
    }

    /// Creates or relabels a namespace (its `kubernetes.io/metadata.name` label is implied).
    pub fn set_namespace_labels(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<()> {
        let obj = json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": labels},
        });
        self.write_manifest(
            &format!("namespaces/{name}.yaml"),
            &serde_norway::to_string(&obj)?,
        )
    }

    /// Replaces a pod's labels (as `kubectl label --overwrite` would).
    pub fn set_pod_labels(
        &mut self,
        namespace: &str,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        let key = (namespace.to_string(), name.to_string());
        let pod = self
            .pods
            .get_mut(&key)
            .with_context(|| format!("no pod {namespace}/{name}"))?;
        pod.labels = labels;
        let pod = pod.clone();
        self.write_pod_manifest(&pod)
    }

    fn write_pod_manifest(&self, pod: &Pod) -> Result<()> {
        self.write_pod_object(
            (&pod.namespace, &pod.name),
            &pod.node,
            &pod.labels,
            &pod.ports,
            &pod.host_ports,
            &pod.ips,
        )
    }

    /// The Pod object as the API server has it: scheduled to `node`, and running with `ip`
    /// once the plugin gave it one (Pending before, as when kubelet calls the plugin).
    fn write_pod_object(
        &self,
        (namespace, name): (&str, &str),
        node: &str,
        labels: &BTreeMap<String, String>,
        ports: &[(String, u16, String)],
        host_ports: &[(u16, u16, String)],
        ips: &[IpAddr],
    ) -> Result<()> {
        let mut ports: Vec<serde_json::Value> = ports
            .iter()
            .map(|(name, port, proto)| json!({"name": name, "containerPort": port, "protocol": proto}))
            .collect();
        for (host, container, proto) in host_ports {
            let same = ports
                .iter_mut()
                .find(|p| p["containerPort"] == json!(container) && p["protocol"] == json!(proto));
            match same {
                Some(p) => p["hostPort"] = json!(host),
                None => ports
                    .push(json!({"containerPort": container, "hostPort": host, "protocol": proto})),
            }
        }
        let status = match ips.first() {
            Some(ip) => {
                let all: Vec<serde_json::Value> =
                    ips.iter().map(|i| json!({"ip": i.to_string()})).collect();
                json!({"phase": "Running", "podIP": ip.to_string(), "podIPs": all})
            }
            None => json!({"phase": "Pending"}),
        };
        let obj = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "main", "image": "none", "ports": ports}]},
            "status": status,
        });
        self.write_manifest(
            &format!("pods/{namespace}.{name}.yaml"),
            &serde_norway::to_string(&obj)?,
        )
    }

    /// Writes a Kubernetes object (e.g. a NetworkPolicy) into the manifest directory.
    pub fn apply_object(&self, object: &serde_json::Value) -> Result<()> {
        let kind = object["kind"].as_str().unwrap_or("Object");
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("_cluster");
        let name = object["metadata"]["name"]
            .as_str()
            .context("object without metadata.name")?;
        self.write_manifest(
            &format!("objects/{kind}.{ns}.{name}.yaml"),
            &serde_norway::to_string(object)?,
        )
    }

    /// Removes an object written by [`Self::apply_object`]. A missing one is not an error.
    pub fn delete_object(&self, kind: &str, namespace: Option<&str>, name: &str) -> Result<()> {
        let ns = namespace.unwrap_or("_cluster");
        let path = self
            .record
            .dir
            .join("manifests")
            .join(format!("objects/{kind}.{ns}.{name}.yaml"));
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Every object written by [`Self::apply_object`], as (kind, namespace, name).
    pub fn objects(&self) -> Vec<(String, Option<String>, String)> {
        let dir = self.record.dir.join("manifests/objects");
        let Ok(entries) = fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let stem = name.strip_suffix(".yaml")?;
                let mut parts = stem.splitn(3, '.');
                let (kind, ns, obj) = (parts.next()?, parts.next()?, parts.next()?);
                let ns = (ns != "_cluster").then(|| ns.to_string());
                Some((kind.to_string(), ns, obj.to_string()))
            })
            .collect()
    }

    fn add_node_netns(&mut self, i: usize) -> Result<()> {
        // Node addresses are .11 to .254 of the segment's /24.
        let host = u8::try_from(10 + i)
            .ok()
            .filter(|h| *h < 255)
            .with_context(|| format!("a local cluster holds at most 244 nodes (node {i})"))?;
        let seg = &self.segments[(i - 1) % self.segments.len()];
        let (sw, subnet, gateway) = (seg.switch.clone(), seg.subnet, seg.gateway);
        let ip = Ipv4Addr::new(172, 30, subnet, host);
        let name = format!("{}-n{i}", self.record.run);
        self.record.nodes.push(name.clone());
        let ns = self.new_netns(&format!("weir-{name}"))?;
        let port = format!("n{i}");
        netns::veth(&ns, "eth0", &sw, &port)?;
        sw.ip(&["link", "set", &port, "master", "br0"])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        if let Some(gw) = gateway {
            // The router is the nodes' only way to the other subnet and to the external
            // host; it has no way out.
            ns.ip(&["route", "add", "172.30.0.0/16", "via", &gw.to_string()])?;
            ns.ip(&["route", "add", EXTERNAL_NET, "via", &gw.to_string()])?;
        } else {
            // The external host shares the nodes' segment.
            ns.ip(&["route", "add", EXTERNAL_NET, "dev", "eth0"])?;
        }
        let ip6 = self.opts.ipv6_underlay.then(|| fabric_ipv6(subnet, host));
        if let Some(ip6) = ip6 {
            ns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
            if gateway.is_some() {
                let gw6 = fabric_ipv6(subnet, 1).to_string();
                ns.ip(&["-6", "route", "add", FABRIC_NET_V6, "via", &gw6])?;
                ns.ip(&["-6", "route", "add", EXTERNAL_NET6, "via", &gw6])?;
            } else {
                ns.ip(&["-6", "route", "add", EXTERNAL_NET6, "dev", "eth0"])?;
            }
            // The kernel forwards IPv6 pod traffic to nodes on the uplink's IPv6 subnet.
            ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        let dir = self.record.dir.join(&name);
        fs::create_dir_all(&dir)?;
        // Without a controller nobody assigns pod CIDRs: use a fixed one per node.
        let pod_cidr = (!self.opts.controller)
            .then(|| Ipv4Net::new(Ipv4Addr::new(10, 244, i as u8, 0), 24).expect("valid prefix"));
        self.nodes.push(Node {
            name,
            index: i,
            netns: ns,
            ip,
            ip6,
            pod_cidr,
            dir,
            labels: BTreeMap::new(),
            agent: None,
            containerd: None,
        });
        Ok(())
    }

    /// Starts (or restarts) the agent of node `idx` and waits until it reports ready.
    /// Extra arguments of every agent started from now on (a restart with other flags).
    pub fn set_agent_args(&mut self, args: Vec<String>) {
        self.opts.agent_args = args;
    }

    pub async fn start_agent(&mut self, idx: usize) -> Result<()> {
        let bin = self.opts.bin_dir.join("weir-agent");
        let node = &self.nodes[idx];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.agent_log())?;
        let mut cmd = Command::new(&bin);
        cmd.args(["--node-name", &node.name])
            .arg("--state-dir")
            .arg(node.dir.join("state"))
            .arg("--cni-socket")
            .arg(node.cni_socket())
            .arg("--bpffs")
            .arg(&self.opts.bpffs)
            .env("RUST_LOG", &self.opts.log)
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(cidr) = node.pod_cidr {
            cmd.args(["--pod-cidr", &cidr.to_string()]);
        }
        cmd.args(&self.opts.agent_args);
        if let Some(ctl) = &self.controller {
            cmd.args(["--controller", &format!("https://{}:7443", ctl.ip)])
                .arg("--tls-dir")
                .arg(node.dir.join("tls"));
        }
        let child = node
            .netns
            .spawn(&mut cmd)
            .with_context(|| format!("starting {}", bin.display()))?;
        let rec = ProcessRecord::new(child.id(), format!("agent {}", node.name));
        self.record.processes.push(rec.clone());
        self.record.save()?;
        self.nodes[idx].agent = Some((child, rec));
        self.wait_agent_ready(idx, Duration::from_secs(30)).await?;
        if self.opts.runtime == Runtime::Containerd && self.nodes[idx].containerd.is_none() {
            self.start_containerd(idx).await?;
        }
        Ok(())
    }

    /// Starts node `idx`'s containerd in the node's namespace (only the network namespace
    /// changes, as with `nsenter --net`) with the node's CNI configuration, imports the pod
    /// image into it the first time, and waits until its CRI reports ready.
    pub async fn start_containerd(&mut self, idx: usize) -> Result<()> {
        containerd::check_tools()?;
        let node = &self.nodes[idx];
        let dir = node.containerd_dir();
        let conf_dir = node.dir.join("net.d");
        fs::create_dir_all(&dir)?;
        fs::create_dir_all(&conf_dir)?;
        // containerd 1.6's CNI library knows results up to 1.0.0.
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": "weir",
            "plugins": [{
                "type": "weir-cni",
                "agentSocket": node.cni_socket(),
                "capabilities": {"portMappings": true},
            }],
        });
        fs::write(conf_dir.join("10-weir.conflist"), conflist.to_string())?;
        // containerd takes one plugin directory, and sets up every pod's loopback with the
        // reference `loopback` plugin: both plugins, linked into one directory per node.
        let cni_bin = node.dir.join("cni-bin");
        fs::create_dir_all(&cni_bin)?;
        for (name, target) in [
            ("weir-cni", self.opts.bin_dir.join("weir-cni")),
            ("loopback", PathBuf::from(containerd::LOOPBACK_PLUGIN)),
        ] {
            let link = cni_bin.join(name);
            let _ = fs::remove_file(&link);
            std::os::unix::fs::symlink(&target, &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
        fs::write(
            dir.join("config.toml"),
            containerd::config_toml(&dir, &cni_bin, &conf_dir),
        )?;
        if !self.record.containerd.contains(&dir) {
            self.record.containerd.push(dir.clone());
            self.record.save()?;
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.containerd_log())?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = node
            .netns
            .spawn(&mut cmd)
            .with_context(|| format!("starting containerd on {}", node.name))?;
        let rec = ProcessRecord::new(child.id(), format!("containerd {}", node.name));
        self.record.processes.push(rec.clone());
        self.record.save()?;
        self.nodes[idx].containerd = Some((child, rec));
        let socket = self.nodes[idx].containerd_socket();
        let log = self.nodes[idx].containerd_log();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut cri = loop {
            if let Some((child, _)) = self.nodes[idx].containerd.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!("containerd exited ({status}); log:\n{}", tail(&log, 30));
            }
            if socket.exists()
                && let Ok(mut cri) = Cri::connect(&socket).await
                && cri.version().await.is_ok()
            {
                break cri;
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "containerd did not answer on {} within 30 s; log:\n{}",
                    socket.display(),
                    tail(&log, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if !cri.image_present(containerd::POD_IMAGE).await? {
            let archive = self.record.dir.join("pod-image.tar");
            if !archive.exists() {
                containerd::write_pod_image(&archive)?;
            }
            let archive = archive.display().to_string();
            let socket = socket.clone();
            tokio::task::spawn_blocking(move || {
                containerd::ctr(
                    &socket,
                    &["images", "import", "--snapshotter", "native", &archive],
                )
            })
            .await??;
        }
        loop {
            if cri.ready().await? && cri.image_present(containerd::POD_IMAGE).await? {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "containerd on {} not ready (runtime and network) within 30 s; log:\n{}",
                    self.nodes[idx].name,
                    tail(&log, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops node `idx`'s containerd (SIGTERM, then SIGKILL). With `remove_pods`, its pod
    /// sandboxes are removed first (the plugin's DEL for each) and whatever the daemon
    /// leaves (shims, mounts) after it; without, the pods keep running, as across a
    /// restart of the runtime.
    pub fn stop_containerd(&mut self, idx: usize, remove_pods: bool) {
        let socket = self.nodes[idx].containerd_socket();
        let dir = self.nodes[idx].containerd_dir();
        let Some((mut child, rec)) = self.nodes[idx].containerd.take() else {
            return;
        };
        if remove_pods && let Err(e) = containerd::remove_all_sandboxes(&socket) {
            tracing::warn!("removing the pods of {}: {e:#}", self.nodes[idx].name);
        }
        rec.stop(Duration::from_secs(5));
        let _ = child.wait();
        self.record.processes.retain(|p| p != &rec);
        if remove_pods {
            containerd::cleanup_after_daemon(&socket, &dir);
            self.record.containerd.retain(|d| d != &dir);
        }
        let _ = self.record.save();
    }

    /// Restarts node `idx`'s containerd; running pods keep running.
    pub async fn restart_containerd(&mut self, idx: usize) -> Result<()> {
        self.stop_containerd(idx, false);
        self.start_containerd(idx).await
    }

    /// A CRI client of node `idx`'s containerd.
    pub async fn cri(&self, idx: usize) -> Result<Cri> {
        Cri::connect(&self.nodes[idx].containerd_socket()).await
    }

    /// GET `path` from node `idx`'s agent HTTP endpoint (from inside the node's namespace).
    /// Returns the status code and body.
    pub fn agent_http(&self, idx: usize, path: &str) -> Result<(u16, String)> {
        let agent = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, AGENT_HTTP_PORT));
        crate::http::get_in(&self.nodes[idx].netns, agent, path)
    }

    /// Kills node `idx`'s agent abruptly (SIGKILL), as a crash or OOM would.
    pub fn kill_agent(&mut self, idx: usize) {
        if let Some((mut child, rec)) = self.nodes[idx].agent.take() {
            let _ = child.kill();
            let _ = child.wait();
            self.record.processes.retain(|p| p != &rec);
            let _ = self.record.save();
        }
    }

    /// Waits until the node's agent answers the plugin's STATUS.
    pub async fn wait_agent_ready(&mut self, idx: usize, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some((child, _)) = self.nodes[idx].agent.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!(
                    "agent on {} exited ({status}); log: {}\n{}",
                    self.nodes[idx].name,
                    self.nodes[idx].agent_log().display(),
                    tail(&self.nodes[idx].agent_log(), 30)
                );
            }
            let out = self.cni(idx, "STATUS", "", None, None).await?;
            if out.success {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                let controller_log = self
                    .controller
                    .as_ref()
                    .map(|c| tail(&c.dir.join("controller.log"), 20))
                    .unwrap_or_default();
                bail!(
                    "agent on {} not ready after {timeout:?}: {}{}\nagent log:\n{}\ncontroller log:\n{controller_log}",
                    self.nodes[idx].name,
                    out.stdout,
                    out.stderr,
                    tail(&self.nodes[idx].agent_log(), 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The network configuration the plugin gets on stdin.
    pub fn cni_config(&self, idx: usize) -> serde_json::Value {
        json!({
            "cniVersion": "1.1.0",
            "name": "weir",
            "type": "weir-cni",
            "agentSocket": self.nodes[idx].cni_socket(),
        })
    }

    /// Runs the plugin binary exactly as a container runtime does: command and attachment in
    /// `CNI_*` variables, network configuration on stdin, result on stdout.
    pub async fn cni(
        &self,
        idx: usize,
        command: &str,
        container_id: &str,
        netns: Option<&Path>,
        pod: Option<(&str, &str)>,
    ) -> Result<CniOutcome> {
        let config = self.cni_config(idx);
        self.cni_with_config(idx, command, container_id, netns, pod, config)
            .await
    }

    /// [`Self::cni`] with a given network configuration (e.g. carrying `prevResult`).
    pub async fn cni_with_config(
        &self,
        idx: usize,
        command: &str,
        container_id: &str,
        netns: Option<&Path>,
        pod: Option<(&str, &str)>,
        mut config: serde_json::Value,
    ) -> Result<CniOutcome> {
        if command == "GC" {
            let valid: Vec<serde_json::Value> = self
                .pods
                .values()
                .filter(|p| p.node == self.nodes[idx].name)
                .map(|p| json!({"containerID": p.container_id, "ifname": "eth0"}))
                .collect();
            config["cni.dev/valid-attachments"] = json!(valid);
        }
        let mut cmd = tokio::process::Command::new(self.opts.bin_dir.join("weir-cni"));
        cmd.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_PATH", &self.opts.bin_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !container_id.is_empty() {
            cmd.env("CNI_CONTAINERID", container_id)
                .env("CNI_IFNAME", "eth0");
        }
        if let Some(ns) = netns {
            cmd.env("CNI_NETNS", ns);
        }
        if let Some((namespace, name)) = pod {
            cmd.env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={container_id}"
                ),
            );
        }
        let mut child = cmd.spawn().context("running weir-cni")?;
        {
            use tokio::io::AsyncWriteExt as _;
            let mut stdin = child.stdin.take().expect("piped");
            stdin.write_all(config.to_string().as_bytes()).await?;
        }
        let out = child.wait_with_output().await?;
        Ok(CniOutcome {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Creates a pod: a namespace, then the plugin's ADD through the node's agent; with
    /// `--runtime containerd`, a pod sandbox and an app container through the node's CRI.
    pub async fn add_pod(&mut self, spec: PodSpec) -> Result<Pod> {
        if self.opts.runtime == Runtime::Containerd {
            return self.add_container_pod(spec).await;
        }
        self.add_direct_pod(spec, None).await
    }

    /// Creates a pod as [`Self::add_pod`] does (direct runtime), its hostPorts opened on
    /// node address `host_ip` alone (the ports' `hostIP`).
    pub async fn add_pod_with_host_ip(&mut self, spec: PodSpec, host_ip: IpAddr) -> Result<Pod> {
        if self.opts.runtime == Runtime::Containerd {
            bail!("a hostIP is passed to the plugin by the direct runtime only");
        }
        self.add_direct_pod(spec, Some(host_ip)).await
    }

    async fn add_direct_pod(&mut self, spec: PodSpec, host_ip: Option<IpAddr>) -> Result<Pod> {
        let idx = spec.node;
        let ns_name = self.ns_name(&format!("{}-{}", spec.namespace, spec.name));
        let netns = self.new_netns(&ns_name)?;
        let container_id = format!(
            "{}{}",
            self.record.run,
            random_run_id().trim_start_matches('w')
        ) + &format!("{:x}", self.pods.len());
        // Scheduled before the runtime calls the plugin, as in Kubernetes: the controller
        // compiles the pod's policies while ADD runs, and ADD waits for them.
        self.schedule_pod(&spec)?;
        let mut config = self.cni_config(idx);
        if !spec.host_ports.is_empty() {
            // What kubelet derives from the containers' ports with a hostPort.
            let mappings: Vec<serde_json::Value> = spec
                .host_ports
                .iter()
                .map(|(host, container, proto)| {
                    json!({"hostPort": host, "containerPort": container,
                           "protocol": proto.to_lowercase(),
                           "hostIP": host_ip.map(|ip| ip.to_string()).unwrap_or_default()})
                })
                .collect();
            config["runtimeConfig"] = json!({"portMappings": mappings});
        }
        let out = self
            .cni_with_config(
                idx,
                "ADD",
                &container_id,
                Some(&netns.path()),
                Some((&spec.namespace, &spec.name)),
                config,
            )
            .await?;
        if !out.success {
            let _ = fs::remove_file(self.record.dir.join(format!(
                "manifests/pods/{}.{}.yaml",
                spec.namespace, spec.name
            )));
            // As a runtime does with the sandbox of a failed ADD.
            netns::delete(netns.name());
            self.record.namespaces.retain(|n| n != netns.name());
            self.record.save()?;
            bail!(
                "CNI ADD for {}/{} failed: {}{}\nagent log:\n{}",
                spec.namespace,
                spec.name,
                out.stdout,
                out.stderr,
                tail(&self.nodes[idx].agent_log(), 20)
            );
        }
        let result = out.json();
        let ips: Vec<IpAddr> = result["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| {
                c["address"]
                    .as_str()
                    .and_then(|a| a.split('/').next())
                    .and_then(|a| a.parse().ok())
            })
            .collect();
        let ip = *ips
            .first()
            .with_context(|| format!("no address in the CNI result {}", out.stdout))?;
        let pod = Pod {
            namespace: spec.namespace,
            name: spec.name,
            node: self.nodes[idx].name.clone(),
            netns,
            container_id,
            app_container: None,
            ip,
            ips,
            labels: spec.labels,
            ports: spec.ports,
            host_ports: spec.host_ports,
        };
        self.write_pod_manifest(&pod)?;
        self.pods
            .insert((pod.namespace.clone(), pod.name.clone()), pod.clone());
        Ok(pod)
    }

    /// The pod object first (Pending), as the scheduler leaves it for kubelet.
    fn schedule_pod(&mut self, spec: &PodSpec) -> Result<()> {
        if !self
            .record
            .dir
            .join(format!("manifests/namespaces/{}.yaml", spec.namespace))
            .exists()
        {
            self.set_namespace_labels(&spec.namespace, &BTreeMap::new())?;
        }
        let node_name = self.nodes[spec.node].name.clone();
        self.write_pod_object(
            (&spec.namespace, &spec.name),
            &node_name,
            &spec.labels,
            &spec.ports,
            &spec.host_ports,
            &[],
        )
    }

    /// `--runtime containerd`: RunPodSandbox (containerd creates the namespace and calls the
    /// plugin's ADD), then an app container, as kubelet does.
    async fn add_container_pod(&mut self, spec: PodSpec) -> Result<Pod> {
        if !spec.host_ports.is_empty() {
            bail!("hostPorts are not passed to containerd's pod sandboxes yet");
        }
        let idx = spec.node;
        self.schedule_pod(&spec)?;
        let uid = format!(
            "{}-{}",
            self.record.run,
            random_run_id().trim_start_matches('w')
        );
        let log_dir = self.nodes[idx]
            .containerd_dir()
            .join("pods")
            .join(format!("{}_{}_{uid}", spec.namespace, spec.name));
        fs::create_dir_all(&log_dir)?;
        let config =
            containerd::sandbox_config(&spec.namespace, &spec.name, &uid, &spec.labels, &log_dir);
        let mut cri = self.cri(idx).await?;
        let started = async {
            let sandbox = cri.run_pod_sandbox(&config).await.map_err(|e| {
                anyhow::anyhow!(
                    "RunPodSandbox for {}/{} failed: {e:#}\nagent log:\n{}\ncontainerd log:\n{}",
                    spec.namespace,
                    spec.name,
                    tail(&self.nodes[idx].agent_log(), 20),
                    tail(&self.nodes[idx].containerd_log(), 20)
                )
            })?;
            let app = async {
                let app = cri
                    .start_container(&sandbox, &config, "main", &containerd::APP_COMMAND)
                    .await?;
                let status = cri.sandbox_status(&sandbox).await?;
                anyhow::Ok((app, status))
            }
            .await;
            match app {
                Ok((app, status)) => anyhow::Ok((sandbox, app, status)),
                Err(e) => {
                    let _ = cri.remove_pod_sandbox(&sandbox).await;
                    Err(e)
                }
            }
        }
        .await;
        let (sandbox, app, status) = match started {
            Ok(s) => s,
            Err(e) => {
                let _ = fs::remove_file(self.record.dir.join(format!(
                    "manifests/pods/{}.{}.yaml",
                    spec.namespace, spec.name
                )));
                return Err(e);
            }
        };
        let (Some(ip), Some(netns)) = (status.ip, status.netns.clone()) else {
            let _ = cri.remove_pod_sandbox(&sandbox).await;
            bail!(
                "pod {}/{} has no address or network namespace in its sandbox status {status:?}",
                spec.namespace,
                spec.name
            );
        };
        let pod = Pod {
            namespace: spec.namespace,
            name: spec.name,
            node: self.nodes[idx].name.clone(),
            netns: Netns::at_path(&netns),
            container_id: sandbox,
            app_container: Some(app),
            ip,
            ips: status.ips.clone(),
            labels: spec.labels,
            ports: spec.ports,
            host_ports: spec.host_ports,
        };
        self.write_pod_manifest(&pod)?;
        self.pods
            .insert((pod.namespace.clone(), pod.name.clone()), pod.clone());
        Ok(pod)
    }

    /// Deletes a pod: the plugin's DEL, then its namespace (with `--runtime containerd`:
    /// StopPodSandbox, which calls DEL, and RemovePodSandbox).
    pub async fn remove_pod(&mut self, namespace: &str, name: &str) -> Result<()> {
        let Some(pod) = self.pods.remove(&(namespace.to_string(), name.to_string())) else {
            return Ok(());
        };
        let idx = self.node_index(&pod.node)?;
        if pod.app_container.is_some() {
            let mut cri = self.cri(idx).await?;
            cri.remove_pod_sandbox(&pod.container_id).await?;
            let _ = fs::remove_file(
                self.record
                    .dir
                    .join(format!("manifests/pods/{namespace}.{name}.yaml")),
            );
            return Ok(());
        }
        let out = self
            .cni(
                idx,
                "DEL",
                &pod.container_id,
                Some(&pod.netns.path()),
                Some((namespace, name)),
            )
            .await?;
        if !out.success {
            bail!("CNI DEL for {namespace}/{name} failed: {}", out.stdout);
        }
        let _ = fs::remove_file(
            self.record
                .dir
                .join(format!("manifests/pods/{namespace}.{name}.yaml")),
        );
        netns::delete(pod.netns.name());
        self.record.namespaces.retain(|n| n != pod.netns.name());
        self.record.save()?;
        Ok(())
    }

    pub fn node_index(&self, name: &str) -> Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no node {name}"))
    }

    /// Writes a file under the manifest directory atomically (the controller watches it).
    pub fn write_manifest(&self, rel: &str, contents: &str) -> Result<()> {
        let path = self.record.dir.join("manifests").join(rel);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        weir_persist::replace(&path, contents.as_bytes(), 0o644)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Leaves the cluster running when this handle goes away; `cargo xtask down` (or
    /// [`down_all`]) removes it later from the run record.
    pub fn detach(mut self) {
        if let Some((child, _)) = self.controller.as_mut().and_then(|c| c.process.take()) {
            std::mem::forget(child);
        }
        for node in &mut self.nodes {
            // The agents and containerds keep running; their PIDs are in the run record.
            if let Some((child, _)) = node.agent.take() {
                std::mem::forget(child);
            }
            if let Some((child, _)) = node.containerd.take() {
                std::mem::forget(child);
            }
        }
        self.torn_down = true;
    }

    /// Tears everything down now (Drop does the same).
    pub fn down(mut self) {
        self.teardown();
    }

    fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        // Containers first, while the agents still answer their plugin's DEL.
        for idx in 0..self.nodes.len() {
            self.stop_containerd(idx, true);
        }
        self.kill_controller();
        for node in &mut self.nodes {
            if let Some((mut child, _)) = node.agent.take() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(child.id() as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
                let deadline = std::time::Instant::now() + Duration::from_secs(3);
                while std::time::Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.record.teardown();
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Mounts bpffs at `path` if nothing is mounted there.
pub fn ensure_bpffs(path: &Path) -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let target = path.to_string_lossy();
    if mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == Some(&target) && l.split_whitespace().nth(2) == Some("bpf")
    }) {
        return Ok(());
    }
    fs::create_dir_all(path)?;
    nix::mount::mount(
        Some("bpffs"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting bpffs at {}", path.display()))
}

/// Port of the agent's HTTP endpoint.
pub const AGENT_HTTP_PORT: u16 = 9962;

/// The last `n` lines of a file, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Tears down every run left on this machine (after crashes). Returns their ids.
pub fn down_all() -> Vec<String> {
    let runs = crate::record::all_runs();
    let ids = runs.iter().map(|r| r.run.clone()).collect();
    for r in runs {
        r.teardown();
    }
    ids
}
