//! The agent's core: one owner for the dataplane, the IPAM, the endpoint store and the
//! controller's state, so that CNI calls and policy updates apply in a well-defined order.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use ipnet::IpNet;
use thiserror::Error;
use tracing::{info, warn};
use weir_api::{NodeState, PodKey, ServiceEntry, ServiceFrontend};
use weir_common::{
    config::{CtTimeouts, NodeConfig},
    endpoint::EndpointInfo,
    ip::IpKey,
    policy::NOT_ISOLATED,
};
use weir_transport::Applied;

use weir_common::TUNNEL_MAC;

use crate::{
    dataplane::{Dataplane, DataplaneError, PinLayout, XdpMode},
    endpoints::{EndpointStore, EndpointStoreError, LocalEndpoint},
    maps::{CtSweep, DataplaneMaps, MapsError},
    masquerade::{self, MasqueradeConfig, MasqueradeError, MasqueradePlan},
    netlink::{Netlink, NetlinkError},
    podnet::{self, PodInterfaceSpec},
    routing::{self, RoutingMode, TUNNEL_IFNAME, Uplink, VNI, VXLAN_PORT},
    services::ServiceProxy,
};

/// Attaches the socket hooks for the sockets of this process's network namespace (the
/// node's). Without a cgroup v2 hierarchy they stay off: the node's own processes then do
/// not reach ClusterIPs.
fn attach_sockets(
    dp: &mut Dataplane,
    maps: &mut DataplaneMaps,
    cgroup: Option<&std::path::Path>,
) -> Result<()> {
    let cookie = crate::sockets::netns_cookie().map_err(|e| {
        AgentError::Check(format!(
            "reading the cookie of the node's network namespace: {e}"
        ))
    })?;
    maps.set_node_netns(cookie)?;
    let Some(cgroup) = cgroup
        .map(PathBuf::from)
        .or_else(crate::sockets::cgroup2_mount)
    else {
        warn!("no cgroup v2 hierarchy: the node's own processes do not reach Services");
        return Ok(());
    };
    dp.attach_sockets(&cgroup)?;
    info!(cgroup = %cgroup.display(), "socket hooks attached");
    Ok(())
}

/// Logs how copying a map's entries from `from` went.
fn log_carried(
    map: &'static str,
    from: &std::path::Path,
    outcome: std::result::Result<crate::maps::Copied, String>,
) {
    match outcome {
        Ok(c) if c.left_out > 0 => warn!(
            map,
            copied = c.copied,
            left_out = c.left_out,
            first_error = c.first_error.as_deref().unwrap_or(""),
            from = %from.display(),
            "carried over in part: the entries left out did not fit (the map is smaller) or could not be written"
        ),
        Ok(c) => info!(map, entries = c.copied, from = %from.display(), "carried over"),
        Err(e) => warn!(map, error = %e, from = %from.display(), "not carried over"),
    }
}

/// The IPAM owner of the node's IPv6 source address ([`Agent::ensure_ipv6_source`]).
pub const NODE_SOURCE_OWNER: (&str, &str) = ("weir-node", "host");

/// Settings the agent starts with.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    /// Where IPAM and endpoint state live.
    pub state_dir: PathBuf,
    /// The bpffs mount.
    pub bpffs: PathBuf,
    /// This node's pod CIDRs (one per family); empty: take them from the controller.
    pub pod_cidrs: Vec<IpNet>,
    /// How to reach other nodes' pods.
    pub routing_mode: RoutingMode,
    /// The interface towards other nodes; None: detect it.
    pub uplink: Option<String>,
    /// MTU of pod interfaces; 0: the uplink's minus the VXLAN overhead.
    pub pod_mtu: u32,
    /// Sample one in N new flows into flow events (0: none).
    pub flow_sample_rate: u32,
    /// Masquerading of pod traffic that leaves the cluster.
    pub masquerade: MasqueradeConfig,
    /// Who translates Services.
    pub service_proxy: ServiceProxy,
    /// The cgroup v2 directory the socket hooks (Service translation for the node's own
    /// processes) are attached to; None: the root of the cgroup v2 mount, if any.
    pub cgroup: Option<PathBuf>,
    /// Idle timeouts of conntrack entries.
    pub ct_timeouts: CtTimeouts,
    /// What a pod gets while the controller has not named its policies.
    pub pending_pod_policy: PendingPodPolicy,
    /// Sizes of the configurable dataplane tables.
    pub map_capacities: weir_api::MapCapacities,
    /// The XDP prefilter's prefixes, one CIDR per line ([`crate::prefilter`]); None: none.
    pub prefilter_file: Option<PathBuf>,
    /// Ports no host policy closes ([`crate::failsafe`]): the node's, and remote ones the
    /// node connects to; plus the agent's own (its HTTP endpoint, the tunnel).
    pub failsafe_inbound: crate::failsafe::Ports,
    pub failsafe_outbound: crate::failsafe::Ports,
    /// The agent's HTTP port (a failsafe port).
    pub http_port: Option<u16>,
    /// When the XDP program runs on the uplink.
    pub uplink_xdp: UplinkXdp,
}

/// When the XDP program runs on the uplink. It only adds early drops in front of checks the
/// TC programs make anyway, but for two that exist only in XDP: the prefilter and untracked
/// host-policy rules. And XDP has a price on some drivers, paid by every packet: a veth
/// uplink (a node that is a container) strips its peer's segmentation offload, so a TCP
/// stream is cut into MTU-sized packets before it reaches the node; virtio-net turns off its
/// receive offloads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UplinkXdp {
    /// Attached while it has work of its own: a prefix in the prefilter, or an untracked
    /// host-policy rule set; detached when the last goes.
    #[default]
    Auto,
    /// Always attached (early drops of spoofed and untrusted tunnel traffic too).
    Always,
    /// Never attached: the prefilter and untracked host-policy rules are not enforced.
    Off,
}

impl std::str::FromStr for UplinkXdp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "always" => Ok(Self::Always),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "unknown uplink XDP setting {other:?} (auto, always or off)"
            )),
        }
    }
}

/// The policy of a pod whose rule sets the controller has not sent yet (it was away or behind
/// when the pod started).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PendingPodPolicy {
    /// Every new flow to and from the pod is denied (the node itself still reaches it:
    /// kubelet's probes) until its policies arrive: no policy can be bypassed by starting a
    /// pod while the controller is away.
    #[default]
    Deny,
    /// The pod is unisolated until its policies arrive (what a node without a controller,
    /// or a cluster that prefers availability, wants).
    Allow,
}

impl std::str::FromStr for PendingPodPolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "deny" => Ok(Self::Deny),
            "allow" => Ok(Self::Allow),
            other => Err(format!(
                "unknown pending pod policy {other:?} (deny or allow)"
            )),
        }
    }
}

impl std::fmt::Display for PendingPodPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Deny => "deny",
            Self::Allow => "allow",
        })
    }
}

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Endpoints(#[from] EndpointStoreError),
    #[error(transparent)]
    Masquerade(#[from] MasqueradeError),
    #[error(transparent)]
    Ipam(#[from] weir_ipam::IpamError),
    #[error("creating state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the dataplane's maps are not pinned")]
    Unpinned,
    #[error("network namespace {0} does not exist")]
    NoNetns(String),
    #[error(transparent)]
    HostPort(#[from] crate::host_ports::HostPortError),
    #[error("{0}")]
    Check(String),
    #[error(
        "{missing} policy entries could not be written ({first}): the endpoints of rule sets \
         {rule_sets:?} deny every new flow until they are"
    )]
    PolicyIncomplete {
        missing: usize,
        first: String,
        rule_sets: std::collections::BTreeSet<u32>,
    },
    #[error("this node has no pod CIDR yet: waiting for the controller to assign one")]
    NoPodCidr,
    #[error("no uplink: no interface with a global IPv4 address{}", .0.as_ref().map(|n| format!(" named {n}")).unwrap_or_default())]
    NoUplink(Option<String>),
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

/// An attachment request (CNI ADD).
#[derive(Clone, Debug)]
pub struct Attach {
    pub container_id: String,
    pub ifname: String,
    pub netns: PathBuf,
    pub pod: Option<PodKey>,
    /// The pod's hostPorts (CNI `portMappings`).
    pub port_mappings: Vec<weir_cni::spec::PortMapping>,
}

/// What ADD built, for the CNI result (the gateways are [`podnet::gateway_for`] its
/// addresses).
#[derive(Clone, Debug)]
pub struct Attached {
    pub endpoint: LocalEndpoint,
}

pub struct Agent {
    cfg: AgentConfig,
    dp: Dataplane,
    maps: DataplaneMaps,
    /// Opened once the node's pod CIDR is known.
    ipam: Option<weir_ipam::Ipam>,
    uplink: Uplink,
    tunnel_ifindex: u32,
    endpoints: EndpointStore,
    node: Netlink,
    /// The controller's latest state for this node, in the ids written into the maps (see
    /// [`crate::renumber`]).
    policy: NodeState,
    /// The controller's ids → the maps' ids, for the current controller stream.
    ids: crate::renumber::IdTranslation,
    /// Whether `policy` came from the controller since this agent started. Until it has, the
    /// rule sets already in the (pinned) map stay in force: a restart never opens a hole.
    have_controller_state: bool,
    /// Counts controller states applied; CNI ADD waits on it for a new pod's rule sets.
    policy_applied: tokio::sync::watch::Sender<u64>,
    /// Pods whose ADD gave up waiting for their policies (they started unisolated).
    pods_started_before_policy: u64,
    /// The masquerade table as last written (None: not written by this agent yet).
    masquerade: Option<MasqueradePlan>,
    /// Node addresses left out of `HOST_ADDRS` for lack of room.
    host_addrs_left_out: usize,
    /// The last conntrack sweep's outcome, and the expired entries removed since the start.
    ct_sweep: CtSweep,
    ct_swept_total: u64,
    /// How the controller's states fared.
    apply_status: ApplyStatus,
    /// Rule sets of `policy` whose entries could not all be written: their endpoints point at
    /// [`weir_common::policy::FAIL_CLOSED`] instead.
    incomplete_rule_sets: std::collections::BTreeSet<u32>,
    /// The interface the XDP program runs on and its mode; None: not attached (not wanted,
    /// or it could not be: the TC programs still make the same checks, but for the
    /// prefilter's and untracked rules').
    xdp: Option<(String, XdpMode)>,
    /// The last attempt to attach it failed; not tried again while it stays wanted.
    xdp_refused: bool,
    /// The uplink is known to hold no XDP program of weir's (a previous run's pinned link
    /// included): nothing to detach until one is attached.
    xdp_detached: bool,
    /// With `--uplink-xdp off`, the warning that the prefilter or untracked host rules are
    /// not enforced was given for the present state; given again only once they went away
    /// and came back.
    xdp_off_warned: bool,
    /// The prefilter file as last read.
    prefilter: Option<crate::prefilter::PrefilterList>,
    /// The controller's prefilter (its DropCIDRSets), once a state has been applied: until
    /// then the prefixes a previous agent left stay.
    prefilter_cluster: Option<std::sync::Arc<BTreeMap<IpNet, String>>>,
    /// Every prefix in the prefilter with its entry id.
    prefilter_ids: BTreeMap<IpNet, u32>,
    /// The host-port frontends as last written (see [`crate::host_ports`]).
    host_ports: BTreeMap<ServiceFrontend, ServiceEntry>,
}

/// How the last attempt to apply the controller's state went, for readiness and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyStatus {
    /// States (snapshots or diffs) that could not be applied in full.
    pub errors_total: u64,
    /// Why the last state could not be applied in full; None when it was (or none came yet).
    pub last_error: Option<String>,
    /// When a state was last applied in full (seconds since the epoch).
    pub last_success_unix: Option<u64>,
}

impl ApplyStatus {
    /// Records the outcome of one attempt.
    pub fn record<E: std::fmt::Display>(&mut self, outcome: Result<(), &E>) {
        match outcome {
            Ok(()) => {
                self.last_error = None;
                self.last_success_unix = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs());
            }
            Err(e) => {
                self.errors_total += 1;
                self.last_error = Some(e.to_string());
            }
        }
    }
}

impl Agent {
    /// Loads (or reopens) the dataplane and re-adopts the pods a previous agent attached.
    pub async fn start(mut cfg: AgentConfig) -> Result<Self> {
        std::fs::create_dir_all(&cfg.state_dir).map_err(|source| AgentError::StateDir {
            path: cfg.state_dir.clone(),
            source,
        })?;
        let pins = PinLayout::new(&cfg.bpffs, &cfg.node_name);
        let mut dp = Dataplane::load_with(Some(pins), &cfg.map_capacities)?;
        let mut maps = DataplaneMaps::take(&mut dp)?;
        // An agent of another release left maps of another layout version: carry their state
        // over before our programs replace theirs.
        if let Some(previous) = dp
            .pins()
            .and_then(|p| p.other_versions().into_iter().next())
        {
            for (map, outcome) in maps.carry_over(&previous.join("maps")) {
                log_carried(map, &previous, outcome);
            }
        }
        // Pinned maps of another size than configured were created anew: their entries
        // follow.
        if let Some(pins) = dp.pins().cloned() {
            for r in dp.resized() {
                info!(
                    map = r.map,
                    from = r.from,
                    to = r.to,
                    "pinned map has another size than configured: created anew"
                );
            }
            for (map, outcome) in maps.carry_over_resized(&pins) {
                log_carried(map, &pins.resized_dir(), outcome);
            }
        }
        let previous = maps.config()?;
        let mut config = if previous == NodeConfig::default() {
            NodeConfig::new(1, cfg.flow_sample_rate, VNI)
        } else {
            NodeConfig::new(previous.policy_gen(), cfg.flow_sample_rate, VNI)
        };
        config = config.with_ct_timeouts(cfg.ct_timeouts);
        // The bits that describe what the maps hold stay as the previous agent left them
        // until this one rewrites those maps; an untracked rule set left by an agent that
        // did not set its bit is found in the map.
        let untracked = maps.untracked_rule_set()? != weir_common::policy::NOT_ISOLATED;
        config = config
            .with_flags(previous.flags() & NodeConfig::DERIVED_FLAGS)
            .with_flag(NodeConfig::FLAG_HOST_UNTRACKED, untracked)
            .with_flag(
                NodeConfig::FLAG_HOST_PATH,
                cfg.service_proxy == ServiceProxy::KubeProxy,
            );
        maps.set_config(config)?;
        let tunnel = (weir_common::policy::proto::UDP, weir_common::TUNNEL_PORT);
        let own: Vec<(u8, u16)> = [tunnel]
            .into_iter()
            .chain(cfg.http_port.map(|p| (weir_common::policy::proto::TCP, p)))
            .collect();
        maps.sync_failsafe(&crate::failsafe::keys(
            &cfg.failsafe_inbound,
            &cfg.failsafe_outbound,
            &own,
            &[tunnel],
        ))?;
        attach_sockets(&mut dp, &mut maps, cfg.cgroup.as_deref())?;
        // Pod CIDRs: configured, or as the controller last assigned them (so a restarted
        // agent can attach pods while the controller is away).
        let pools = if cfg.pod_cidrs.is_empty() {
            load_assigned_cidrs(&cfg.state_dir)
        } else {
            cfg.pod_cidrs.clone()
        };
        let ipam = if pools.is_empty() {
            None
        } else {
            Some(weir_ipam::Ipam::open(&cfg.state_dir.join("ipam"), &pools)?)
        };
        let endpoints = EndpointStore::open(&cfg.state_dir)?;
        let node = Netlink::current()?;
        let uplink = Uplink::detect(&node, cfg.uplink.as_deref())
            .await?
            .ok_or_else(|| AgentError::NoUplink(cfg.uplink.clone()))?;
        let tunnel_ifindex = node
            .ensure_vxlan(
                TUNNEL_IFNAME,
                VXLAN_PORT,
                uplink.mtu.saturating_sub(uplink.vxlan_overhead()),
                TUNNEL_MAC,
            )
            .await?;
        if cfg.pod_mtu == 0 {
            // One MTU for both families: inner IPv4 and IPv6 packets ride the same underlay,
            // so they have the same room.
            cfg.pod_mtu = uplink.mtu.saturating_sub(uplink.vxlan_overhead());
        }
        dp.attach_uplink(&uplink.ifname)?;
        dp.attach_tunnel(TUNNEL_IFNAME)?;
        info!(uplink = %uplink.ifname, subnets = ?uplink.subnets, "attached to the uplink and the tunnel");
        let mut agent = Self {
            cfg,
            dp,
            maps,
            ipam,
            uplink,
            tunnel_ifindex,
            endpoints,
            node,
            policy: NodeState::default(),
            ids: Default::default(),
            have_controller_state: false,
            policy_applied: tokio::sync::watch::Sender::new(0),
            pods_started_before_policy: 0,
            masquerade: None,
            host_addrs_left_out: 0,
            ct_sweep: CtSweep::default(),
            ct_swept_total: 0,
            apply_status: ApplyStatus::default(),
            incomplete_rule_sets: Default::default(),
            xdp: None,
            xdp_refused: false,
            xdp_detached: false,
            xdp_off_warned: false,
            prefilter: None,
            prefilter_cluster: None,
            prefilter_ids: BTreeMap::new(),
            host_ports: BTreeMap::new(),
        };
        if let Err(e) = agent.refresh_prefilter() {
            warn!(error = %e, "loading the prefilter; it stays as a previous agent left it");
        }
        // A link a previous agent pinned gets this agent's program (or goes, when no longer
        // wanted) before anything else changes.
        agent.sync_xdp();
        if !agent.cfg.masquerade.enabled {
            // Turning masquerade off removes what an earlier agent programmed.
            masquerade::remove()?;
        }
        agent.readopt().await?;
        agent.sync_host_ports()?;
        agent.ensure_ipv6_source().await?;
        agent.refresh_host_addrs().await?;
        // Every link this agent knows is ours now; what another version pinned besides is
        // released with its maps.
        if let Some(pins) = agent.dp.pins()
            && let Err(e) = pins.remove_other_versions()
        {
            warn!(error = %e, "pins of another version left in place");
        }
        Ok(agent)
    }

    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    pub fn maps(&self) -> &DataplaneMaps {
        &self.maps
    }

    pub fn policy(&self) -> &NodeState {
        &self.policy
    }

    pub fn endpoints(&self) -> &EndpointStore {
        &self.endpoints
    }

    /// Swaps this agent's programs into the links of every pod it knows, and rewrites their
    /// map entries. Pods whose interface vanished while no agent ran are left for DEL/GC.
    async fn readopt(&mut self) -> Result<()> {
        let known: Vec<LocalEndpoint> = self.endpoints.iter().cloned().collect();
        for ep in &known {
            match self.node.link_by_name(&ep.interface.host_ifname).await? {
                Some(link) if link.header.index == ep.interface.host_ifindex => {
                    self.dp.attach_pod_interface(&ep.interface.host_ifname)?;
                }
                _ => warn!(
                    container = %ep.container_id,
                    ifname = %ep.interface.host_ifname,
                    "interface of a known pod is gone; waiting for DEL or GC"
                ),
            }
        }
        info!(pods = known.len(), "re-adopted pods");
        self.sync_endpoint_map()
    }

    /// Addresses of this node, for "traffic from the node to its pods is always allowed". The
    /// uplink's come first, then by interface: if there are more than the map holds (IPVS
    /// binds every ClusterIP to the node), the ones kubelet probes come from are kept.
    /// Returns the addresses read.
    pub async fn refresh_host_addrs(&mut self) -> Result<Vec<IpAddr>> {
        let addrs = self.node_addresses().await?;
        let left_out = self.maps.sync_host_addrs(&addrs)?;
        if left_out != self.host_addrs_left_out {
            if left_out > 0 {
                warn!(
                    left_out,
                    capacity = weir_common::capacity::HOST_ADDRS,
                    "more node addresses than the dataplane holds: traffic from the ones left \
                     out to local pods is subject to policy"
                );
            } else {
                info!("every node address fits in the dataplane again");
            }
            self.host_addrs_left_out = left_out;
        }
        Ok(addrs)
    }

    /// The node's addresses as they are now: the uplink's first, then by interface.
    async fn node_addresses(&self) -> Result<Vec<IpAddr>> {
        let mut addrs: Vec<IpAddr> = self.uplink.subnets.iter().map(|n| n.addr()).collect();
        for link in self.node.link_indices().await? {
            for net in self.node.addresses(link).await? {
                addrs.push(net.addr());
            }
        }
        Ok(addrs)
    }

    /// Reads the prefilter file (if one is configured) and, when its contents changed since
    /// the last read, makes the `PREFILTER` map hold its prefixes with the controller's. A file
    /// that cannot be read keeps the prefixes last read (at start: the ones a previous agent
    /// left in the map).
    pub fn refresh_prefilter(&mut self) -> Result<()> {
        let list = match self.cfg.prefilter_file.clone() {
            None => crate::prefilter::PrefilterList::default(),
            Some(path) => match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let list = crate::prefilter::parse(&text);
                    if self.prefilter.as_ref() != Some(&list) {
                        for (line, entry) in &list.invalid {
                            warn!(file = %path.display(), line, entry, "not a CIDR: left out of the prefilter");
                        }
                        info!(file = %path.display(), prefixes = list.nets.len(), invalid = list.invalid.len(), "prefilter file read");
                    }
                    list
                }
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "reading the prefilter file; the prefilter stays as it was");
                    return Ok(());
                }
            },
        };
        if self.prefilter.as_ref() == Some(&list) {
            return Ok(());
        }
        self.prefilter = Some(list);
        self.sync_prefilter()
    }

    /// Takes the controller's prefilter (its DropCIDRSets) from `state`.
    pub fn apply_prefilter(&mut self, state: &NodeState) -> Result<()> {
        if self
            .prefilter_cluster
            .as_ref()
            .is_some_and(|p| std::sync::Arc::ptr_eq(p, &state.prefilter) || **p == *state.prefilter)
        {
            return Ok(());
        }
        info!(
            prefixes = state.prefilter.len(),
            "prefilter from the cluster's DropCIDRSets"
        );
        self.prefilter_cluster = Some(state.prefilter.clone());
        self.sync_prefilter()
    }

    /// Makes the `PREFILTER` map hold the controller's prefixes and the file's (as many of
    /// the file's as fit after the controller's). Until the controller's are known, what the
    /// map holds stays too.
    fn sync_prefilter(&mut self) -> Result<()> {
        let max = weir_common::capacity::PREFILTER as usize - 1;
        let mut nets: std::collections::BTreeSet<IpNet> = self
            .prefilter_cluster
            .iter()
            .flat_map(|p| p.keys().copied())
            .collect();
        let mut left_out = 0usize;
        for net in self.prefilter.iter().flat_map(|l| &l.nets) {
            if nets.len() < max || nets.contains(net) {
                nets.insert(*net);
            } else {
                left_out += 1;
            }
        }
        if left_out > 0 {
            warn!(
                left_out,
                capacity = max,
                "the prefilter is full: prefixes of the file left out"
            );
        }
        self.prefilter_ids = self
            .maps
            .sync_prefilter(&nets, self.prefilter_cluster.is_none())?;
        self.sync_xdp();
        Ok(())
    }

    /// Attaches or detaches the uplink's XDP program as [`UplinkXdp`] says, for the
    /// prefilter and host policy the maps hold now. An uplink that takes no XDP program
    /// (another one's there) is reported, not a reason to leave the node without pod
    /// networking.
    fn sync_xdp(&mut self) {
        let untracked = match self.maps.untracked_rule_set() {
            Ok(set) => set != weir_common::policy::NOT_ISOLATED,
            Err(e) => {
                warn!(error = %e, "reading the untracked host rule set; XDP stays as it is");
                return;
            }
        };
        let want = match self.cfg.uplink_xdp {
            UplinkXdp::Always => true,
            UplinkXdp::Off => false,
            UplinkXdp::Auto => !self.prefilter_ids.is_empty() || untracked,
        };
        let ifname = self.uplink.ifname.clone();
        if want && self.xdp.is_none() && !self.xdp_refused {
            match self.dp.attach_uplink_xdp(&ifname) {
                Ok(mode) => {
                    info!(uplink = %ifname, mode = mode.as_str(), prefixes = self.prefilter_ids.len(), untracked, "XDP program attached to the uplink");
                    self.xdp = Some((ifname, mode));
                    self.xdp_detached = false;
                }
                Err(e) => {
                    warn!(uplink = %ifname, error = %e, "no XDP on the uplink: the prefilter and untracked host rules are off; TC checks the rest");
                    self.xdp_refused = true;
                }
            }
        } else if !want {
            self.xdp_refused = false;
            let had = self.xdp.take();
            if had.is_some() || !self.xdp_detached {
                match self.dp.detach_uplink_xdp(&ifname) {
                    Ok(()) => {
                        self.xdp_detached = true;
                        if had.is_some() {
                            info!(uplink = %ifname, "XDP program detached from the uplink: nothing left for it to drop");
                        }
                    }
                    Err(e) => {
                        warn!(uplink = %ifname, error = %e, "detaching the uplink's XDP program")
                    }
                }
            }
            let unenforced = self.cfg.uplink_xdp == UplinkXdp::Off
                && (!self.prefilter_ids.is_empty() || untracked);
            if unenforced && !self.xdp_off_warned {
                warn!(
                    prefixes = self.prefilter_ids.len(),
                    untracked,
                    "XDP is off on the uplink: the prefilter and untracked host rules are not enforced"
                );
            }
            self.xdp_off_warned = unenforced;
        }
    }

    /// The prefilter's prefixes with their entry ids and where each comes from (the
    /// DropCIDRSet that lists it, or `file`), and the lines of the file that are not
    /// prefixes.
    pub fn prefilter(&self) -> (Vec<(IpNet, u32, String)>, usize) {
        let source = |net: &IpNet| {
            self.prefilter_cluster
                .as_ref()
                .and_then(|p| p.get(net).cloned())
                .unwrap_or_else(|| {
                    if self
                        .prefilter
                        .as_ref()
                        .is_some_and(|l| l.nets.contains(net))
                    {
                        "file".to_string()
                    } else {
                        // Left by a previous agent, until the controller's state arrives.
                        String::new()
                    }
                })
        };
        (
            self.prefilter_ids
                .iter()
                .map(|(net, id)| (*net, *id, source(net)))
                .collect(),
            self.prefilter.as_ref().map_or(0, |l| l.invalid.len()),
        )
    }

    /// The interface the XDP program runs on, and its mode.
    pub fn xdp(&self) -> Option<(&str, XdpMode)> {
        self.xdp.as_ref().map(|(i, m)| (i.as_str(), *m))
    }

    /// Node addresses that did not fit in the dataplane at the last refresh.
    /// Deletes expired conntrack entries (at most `max`).
    pub fn sweep_conntrack(&mut self, max: usize) -> Result<CtSweep> {
        let sweep = self
            .maps
            .sweep_conntrack(crate::maps::monotonic_ns(), max)?;
        self.record_sweep(sweep);
        Ok(sweep)
    }

    /// Handles on conntrack of their own, to sweep it without holding the agent.
    pub fn conntrack_sweeper(&self) -> Result<crate::maps::ConntrackSweeper> {
        let pins = self.dp.pins().ok_or(AgentError::Unpinned)?;
        let open = |name| crate::dataplane::open_pinned_map(pins, name);
        Ok(crate::maps::ConntrackSweeper::new(
            open(weir_common::maps::CONNTRACK)?,
            open(weir_common::maps::NODE_CONFIG)?,
        )?)
    }

    /// Takes in what a sweep on a [`crate::maps::ConntrackSweeper`] did.
    pub fn record_sweep(&mut self, sweep: CtSweep) {
        self.ct_sweep = sweep;
        self.ct_swept_total += sweep.removed as u64;
    }

    /// Conntrack entries after the last sweep, and expired entries removed by all sweeps.
    pub fn conntrack_counts(&self) -> (usize, u64) {
        (self.ct_sweep.entries, self.ct_swept_total)
    }

    pub fn host_addrs_left_out(&self) -> usize {
        self.host_addrs_left_out
    }

    /// CNI ADD: address, interface, programs, map entries.
    ///
    /// A repeated ADD for an attachment that is still intact (same container, interface
    /// name and netns; host end, pod end and addresses as built) is a retry: the runtime
    /// timed out or lost the answer (SPEC.md §2 `ADD` lets a plugin treat it so). It
    /// leaves the pod's traffic alone and answers what the first ADD answered. Anything
    /// else known under the same attachment is torn down and built anew.
    ///
    /// A failed ADD leaves nothing behind: no endpoint, address, interface, pinned link or
    /// map entry, so that the runtime's DEL and a later ADD start from a clean node.
    pub async fn add(&mut self, req: Attach) -> Result<Attached> {
        if !podnet::netns_exists(&req.netns) {
            return Err(AgentError::NoNetns(req.netns.display().to_string()));
        }
        if let Some(existing) = self.endpoints.get(&req.container_id, &req.ifname).cloned() {
            if existing.netns == req.netns && self.is_intact(&existing).await {
                return self.readd(existing).await;
            }
            warn!(
                container = %existing.container_id,
                ifname = %existing.ifname,
                netns = %req.netns.display(),
                "repeated ADD of an attachment that is no longer as built: building it anew"
            );
            self.remove_attachment(&existing.container_id, &existing.ifname, &existing.ips)
                .await?;
        }
        // Checked before anything is built: a port already taken, or a hostIP that is not
        // the node's, fails the ADD whole.
        let node_addrs = if req.port_mappings.iter().any(|m| m.host_ip.is_some()) {
            // Read now (an address added since the last periodic refresh counts), and into
            // the dataplane too, which must know the address as the node's.
            self.refresh_host_addrs().await?
        } else {
            Vec::new()
        };
        let host_ports = self.claim_host_ports(&req, &node_addrs)?;
        let owner = weir_ipam::Owner {
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
            pod: req.pod.as_ref().map(|p| weir_ipam::PodRef {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
            }),
        };
        let allocation = self
            .ipam
            .as_ref()
            .ok_or(AgentError::NoPodCidr)?
            .allocate(&owner)?;
        let ips: Vec<IpAddr> = allocation.addresses.iter().map(|n| n.addr()).collect();
        let (container_id, ifname) = (req.container_id.clone(), req.ifname.clone());
        match self.build(req, ips.clone(), host_ports).await {
            Ok(ep) => {
                info!(container = %ep.container_id, pod = ?ep.pod, ips = ?ep.ips, ifname = %ep.interface.host_ifname, "pod attached");
                Ok(Attached { endpoint: ep })
            }
            Err(e) => {
                if let Err(undo) = self.remove_attachment(&container_id, &ifname, &ips).await {
                    warn!(container = %container_id, error = %undo, "undoing a failed ADD");
                }
                Err(e)
            }
        }
    }

    /// The interface, programs, endpoint record and map entries of a new attachment with
    /// addresses `ips`. The caller undoes what a failure left.
    async fn build(
        &mut self,
        req: Attach,
        ips: Vec<IpAddr>,
        host_ports: Vec<crate::host_ports::HostPort>,
    ) -> Result<LocalEndpoint> {
        // `setup` replaces a host end of the same name; links still pinned for the old one
        // are severed, and swapping a program into them fails.
        self.dp
            .detach_pod_interface(&podnet::host_ifname(&req.container_id, &req.ifname))?;
        let spec = PodInterfaceSpec {
            container_id: req.container_id.clone(),
            netns: req.netns.clone(),
            ifname: req.ifname.clone(),
            ips: ips.clone(),
            mtu: self.cfg.pod_mtu,
        };
        let built = podnet::setup(&self.node, &spec).await?;
        self.dp.attach_pod_interface(&built.host_ifname)?;
        let ep = LocalEndpoint {
            container_id: req.container_id,
            ifname: req.ifname,
            pod: req.pod,
            netns: req.netns,
            ips,
            mtu: self.cfg.pod_mtu,
            interface: built,
            host_ports,
        };
        self.endpoints.insert(ep.clone())?;
        self.sync_endpoint_map()?;
        self.sync_host_ports()?;
        Ok(ep)
    }

    /// The host ports `req` asks for, with their ids, if this node can serve them all.
    /// Under another Service proxy they are left to it (a chained `portmap` plugin).
    fn claim_host_ports(
        &self,
        req: &Attach,
        node_addrs: &[IpAddr],
    ) -> Result<Vec<crate::host_ports::HostPort>> {
        if req.port_mappings.is_empty() {
            return Ok(Vec::new());
        }
        if self.cfg.service_proxy != ServiceProxy::Weir {
            info!(
                container = %req.container_id,
                "hostPorts left to the host's Service proxy (--service-proxy is not weir)"
            );
            return Ok(Vec::new());
        }
        let pools = self.ipam.as_ref().map(|i| i.pools()).unwrap_or_default();
        Ok(crate::host_ports::claim(
            &req.port_mappings,
            (&req.container_id, &req.ifname),
            self.endpoints.iter(),
            &self.policy.services,
            node_addrs,
            &pools,
        )?)
    }

    /// Writes the host-port frontends of the endpoints as they are now, and removes those
    /// of endpoints that are gone.
    fn sync_host_ports(&mut self) -> Result<()> {
        if self.cfg.service_proxy != ServiceProxy::Weir {
            return Ok(());
        }
        let new = crate::host_ports::table(self.endpoints.iter());
        let diff = crate::host_ports::diff(&self.host_ports, &new, &self.policy.services);
        if diff.upsert.is_empty() && diff.remove.is_empty() {
            return Ok(());
        }
        let old = crate::host_ports::merged(&self.policy.services, &self.host_ports);
        self.maps.apply_service_diff(&diff, &old)?;
        // Set once the frontends are written (a packet meanwhile is not translated yet, as
        // before the ADD); cleared once they are gone (a packet meanwhile costs a lookup
        // that finds nothing).
        let on_one_address = new.keys().any(crate::host_ports::on_one_address);
        self.maps
            .set_flag(NodeConfig::FLAG_HOST_ADDR_FRONTENDS, on_one_address)?;
        self.host_ports = new;
        Ok(())
    }

    /// The host-port frontends in effect (those the controller's Services do not shadow).
    pub fn host_port_count(&self) -> usize {
        self.host_ports
            .keys()
            .filter(|f| crate::host_ports::is_free(f, &self.policy.services))
            .count()
    }

    /// Names of the host-port Services by id, for flow events.
    pub fn host_port_names(&self) -> BTreeMap<u32, String> {
        self.host_ports
            .values()
            .map(|e| (e.id, e.service.to_string()))
            .collect()
    }

    /// Whether `ep`'s interface is still the one ADD built (same host link, pod end and
    /// addresses).
    async fn is_intact(&self, ep: &LocalEndpoint) -> bool {
        let spec = PodInterfaceSpec {
            container_id: ep.container_id.clone(),
            netns: ep.netns.clone(),
            ifname: ep.ifname.clone(),
            ips: ep.ips.clone(),
            mtu: ep.mtu,
        };
        podnet::check(&self.node, &spec, &ep.interface)
            .await
            .is_ok()
    }

    /// A repeated ADD of an intact attachment: make sure its programs and map entries are
    /// in place (the interface is, `is_intact` said so) and answer as the first ADD did.
    async fn readd(&mut self, ep: LocalEndpoint) -> Result<Attached> {
        // Swapping the program into the live links is what an agent restart does; the
        // pod's traffic does not notice.
        self.dp.attach_pod_interface(&ep.interface.host_ifname)?;
        self.sync_endpoint_map()?;
        info!(container = %ep.container_id, pod = ?ep.pod, "repeated ADD of an attached pod: same result");
        Ok(Attached { endpoint: ep })
    }

    /// Removes everything an attachment may have on this node, whether or not ADD got as
    /// far as recording it: pinned links, interface, host routes to `ips`, the endpoint
    /// record and its map entries, and the addresses. Every step is tried even when one
    /// fails (the first error is returned), so a failure leaves as little as possible.
    async fn remove_attachment(
        &mut self,
        container_id: &str,
        ifname: &str,
        ips: &[IpAddr],
    ) -> Result<()> {
        let host = self.endpoints.get(container_id, ifname).map_or_else(
            || podnet::host_ifname(container_id, ifname),
            |ep| ep.interface.host_ifname.clone(),
        );
        let detached = self
            .dp
            .detach_pod_interface(&host)
            .map_err(AgentError::from);
        let torn_down = podnet::teardown(&self.node, &host, ips)
            .await
            .map(|_| ())
            .map_err(AgentError::from);
        let forgotten = self
            .endpoints
            .remove(container_id, ifname)
            .map(|_| ())
            .map_err(AgentError::from);
        let synced = self.sync_endpoint_map();
        let host_ports = self.sync_host_ports();
        let released = match &self.ipam {
            Some(ipam) => ipam
                .release(container_id, ifname)
                .map(|_| ())
                .map_err(AgentError::from),
            None => Ok(()),
        };
        detached
            .and(torn_down)
            .and(forgotten)
            .and(synced)
            .and(host_ports)
            .and(released)
    }

    /// CNI DEL: undoes ADD. Succeeds for unknown attachments (an ADD that failed half-way
    /// is cleaned up all the same) and vanished namespaces.
    pub async fn del(&mut self, container_id: &str, ifname: &str) -> Result<()> {
        let known = self.endpoints.get(container_id, ifname).cloned();
        let ips = known.as_ref().map(|ep| ep.ips.clone()).unwrap_or_default();
        self.remove_attachment(container_id, ifname, &ips).await?;
        if let Some(ep) = known {
            info!(container = %container_id, pod = ?ep.pod, "pod detached");
        }
        Ok(())
    }

    /// Whether the controller's state has been applied since this agent started.
    pub fn has_controller_state(&self) -> bool {
        self.have_controller_state
    }

    /// How the controller's states fared (the last one decides readiness).
    pub fn apply_status(&self) -> &ApplyStatus {
        &self.apply_status
    }

    /// Records the outcome of applying one controller state (policy, services and routes).
    pub fn record_apply(&mut self, outcome: Result<(), &AgentError>) {
        if let Err(e) = outcome {
            warn!(error = %e, "the controller's state could not be applied in full");
        }
        self.apply_status.record(outcome);
    }

    /// The flow-event ring buffer, for the reader task (once).
    pub fn take_flow_events(&mut self) -> Result<aya::maps::RingBuf<aya::maps::MapData>> {
        let map = self.dp.take_map(weir_common::maps::EVENTS)?;
        aya::maps::RingBuf::try_from(map)
            .map_err(|e| AgentError::Check(format!("opening the flow event ring buffer: {e}")))
    }

    /// Whether ADD can be served now (the node's pod CIDR is known).
    pub fn ready(&self) -> bool {
        self.ipam.is_some()
    }

    /// CNI CHECK: the attachment exists and looks as ADD left it.
    pub async fn check(
        &mut self,
        container_id: &str,
        ifname: &str,
        netns: &std::path::Path,
    ) -> Result<LocalEndpoint> {
        let ep = self
            .endpoints
            .get(container_id, ifname)
            .cloned()
            .ok_or_else(|| {
                AgentError::Check(format!(
                    "no attachment {container_id}/{ifname} on this node"
                ))
            })?;
        let spec = PodInterfaceSpec {
            container_id: ep.container_id.clone(),
            netns: netns.to_path_buf(),
            ifname: ep.ifname.clone(),
            ips: ep.ips.clone(),
            mtu: ep.mtu,
        };
        podnet::check(&self.node, &spec, &ep.interface)
            .await
            .map_err(AgentError::Check)?;
        for ip in &ep.ips {
            let present = self.maps.endpoints.get(&IpKey::from(*ip), 0).ok();
            if present.map(|e| e.ifindex()) != Some(ep.interface.host_ifindex) {
                return Err(AgentError::Check(format!(
                    "dataplane entry for {ip} is missing or points elsewhere"
                )));
            }
        }
        Ok(ep)
    }

    /// CNI GC: removes every attachment not in `valid`. Returns how many were removed.
    pub async fn gc(&mut self, valid: &[(String, String)]) -> Result<usize> {
        let stale: Vec<(String, String)> = self
            .endpoints
            .iter()
            .map(|e| (e.container_id.clone(), e.ifname.clone()))
            .filter(|id| !valid.contains(id))
            .collect();
        for (c, i) in &stale {
            self.del(c, i).await?;
        }
        // The node's own reservation is no attachment a runtime knows of.
        let mut valid = valid.to_vec();
        valid.push((
            NODE_SOURCE_OWNER.0.to_string(),
            NODE_SOURCE_OWNER.1.to_string(),
        ));
        let released = match &self.ipam {
            Some(ipam) => ipam.gc(&valid)?.len(),
            None => 0,
        };
        Ok(stale.len().max(released))
    }

    /// Makes the dataplane enforce the controller's state `state`; `change` says how it
    /// differs from the previously applied one. Conntrack entries re-check policy afterwards.
    ///
    /// The order is safe at every instant: new classes and verdicts first, then the
    /// endpoints are pointed at them, then what the state no longer has goes. When an entry
    /// does not fit, stale entries go first and it is tried again. Rule sets whose entries
    /// still could not all be written fail closed (their endpoints deny every new flow);
    /// everything else is applied, and the error says what is missing.
    pub fn apply_controller_state(&mut self, change: &Applied, state: &NodeState) -> Result<()> {
        let (written, services) = match change {
            Applied::Unchanged => return Ok(()),
            Applied::Snapshot => {
                // A snapshot may number classes and rule sets afresh (a restarted controller,
                // a new leader): match it to what the maps hold so that no id changes meaning.
                let applied = if self.have_controller_state {
                    crate::renumber::PolicyTables::of(&self.policy)
                } else {
                    self.maps.read_policy_tables()
                };
                self.ids = crate::renumber::IdTranslation::for_snapshot(state, &applied);
                let local = self.ids.state(state);
                if !self.ids.is_identity() {
                    info!(
                        "the controller's snapshot numbers policy ids differently from the maps; translating its ids"
                    );
                }
                let written = self.maps.sync_policy(&local, &self.policy)?;
                self.incomplete_rule_sets = written.failed_rule_sets(&local);
                self.policy = local;
                self.sync_endpoint_map()?;
                self.maps.prune_policy(&self.policy);
                let services = if self.cfg.service_proxy == ServiceProxy::Weir {
                    self.maps.sync_services(&crate::host_ports::merged(
                        &state.services,
                        &self.host_ports,
                    ))
                } else {
                    // Left to the host's proxy; what an earlier agent wrote goes.
                    self.maps.sync_services(&Default::default())
                };
                (written, services)
            }
            Applied::Diff(diff) => {
                let diff = &self.ids.diff(diff);
                let written = self.maps.apply_policy_diff(diff)?;
                let services = if self.cfg.service_proxy == ServiceProxy::Weir {
                    self.maps.apply_service_diff(
                        &crate::host_ports::merge_diff(
                            &diff.services,
                            &self.policy.services,
                            &self.host_ports,
                        ),
                        &crate::host_ports::merged(&self.policy.services, &self.host_ports),
                    )
                } else {
                    Ok(())
                };
                self.policy.apply(diff);
                // Rule sets incomplete before stay so until a snapshot rewrites them.
                let failed = written.failed_rule_sets(&self.policy);
                self.incomplete_rule_sets.extend(failed);
                self.sync_endpoint_map()?;
                self.maps.remove_policy_entries(diff);
                (written, services)
            }
        };
        self.have_controller_state = true;
        self.maps.bump_policy_generation()?;
        // The untracked host rule set may have come or gone.
        self.sync_xdp();
        self.policy_applied.send_modify(|n| *n += 1);
        services?;
        if written.is_complete() && self.incomplete_rule_sets.is_empty() {
            return Ok(());
        }
        Err(AgentError::PolicyIncomplete {
            missing: written.missing(),
            first: written
                .first_error
                .unwrap_or_else(|| "left from an earlier state".into()),
            rule_sets: self.incomplete_rule_sets.clone(),
        })
    }

    /// Counts a pod whose ADD gave up waiting for its policies.
    pub fn count_pod_started_before_policy(&mut self) {
        self.pods_started_before_policy += 1;
    }

    pub fn pods_started_before_policy(&self) -> u64 {
        self.pods_started_before_policy
    }

    /// Whether the controller's state says which policies select `pod` (then its endpoint
    /// entries carry them).
    pub fn has_policy_for(&self, pod: &PodKey) -> bool {
        self.policy.endpoints.contains_key(pod)
    }

    /// Changes each time a controller state has been applied.
    pub fn policy_updates(&self) -> tokio::sync::watch::Receiver<u64> {
        self.policy_applied.subscribe()
    }

    /// Programs routes to other nodes from the controller's route table, and opens IPAM
    /// on this node's pod CIDRs once the controller has assigned them.
    pub async fn apply_routes(&mut self, state: &NodeState) -> Result<()> {
        let plan = routing::plan(
            &state.routes,
            &self.cfg.node_name,
            &self.uplink,
            self.tunnel_ifindex,
            self.cfg.routing_mode,
        );
        self.maps.sync_tunnel_peers(&plan.tunnel_peers)?;
        self.maps.sync_routes(&plan.map)?;
        routing::apply_kernel_routes(&self.node, &plan).await?;
        self.apply_masquerade(state)?;
        if self.cfg.pod_cidrs.is_empty() && !plan.own_cidrs.is_empty() {
            let current = self.ipam.as_ref().map(|i| i.pools());
            if current.as_ref() != Some(&plan.own_cidrs) {
                // One IPAM per state directory at a time: close the old one first, and reopen
                // it if the new ranges cannot be opened.
                self.ipam = None;
                let dir = self.cfg.state_dir.join("ipam");
                match weir_ipam::Ipam::open(&dir, &plan.own_cidrs) {
                    Ok(ipam) => self.ipam = Some(ipam),
                    Err(e) => {
                        if let Some(old) = current {
                            self.ipam = weir_ipam::Ipam::open(&dir, &old).ok();
                        }
                        return Err(e.into());
                    }
                }
                if let Err(e) = save_assigned_cidrs(&self.cfg.state_dir, &plan.own_cidrs) {
                    // IPAM is open on the new ranges; only a restart without the controller
                    // would miss them.
                    warn!(error = %e, "remembering the assigned pod CIDRs");
                }
                info!(pod_cidrs = ?plan.own_cidrs, "pod CIDR assigned by the controller");
                self.ensure_ipv6_source().await?;
                self.refresh_host_addrs().await?;
            }
        }
        Ok(())
    }

    /// Gives the node an IPv6 address its own connections to other nodes' pods can come
    /// from, when its uplink has none (IPv6 pods on an IPv4 underlay): without one the kernel
    /// sends from a link-local address, which a remote pod cannot answer. The address comes
    /// from the node's IPv6 pool (reserved in IPAM for [`NODE_SOURCE_OWNER`], so no pod gets
    /// it) and sits on `lo` as a /128, where no duplicate address detection delays it; the
    /// other nodes route it to this node with the rest of its pod CIDR.
    pub async fn ensure_ipv6_source(&mut self) -> Result<()> {
        if self.uplink.subnets.iter().any(|n| n.addr().is_ipv6()) {
            return Ok(());
        }
        let Some(ipam) = &self.ipam else {
            return Ok(());
        };
        if !ipam.pools().iter().any(|p| p.addr().is_ipv6()) {
            return Ok(());
        }
        let alloc = ipam.allocate(&weir_ipam::Owner {
            container_id: NODE_SOURCE_OWNER.0.to_string(),
            ifname: NODE_SOURCE_OWNER.1.to_string(),
            pod: None,
        })?;
        let lo = self.node.link_index("lo").await?;
        for a in alloc.addresses.iter().filter(|a| a.addr().is_ipv6()) {
            let host = ipnet::IpNet::new(a.addr(), 128).expect("a /128");
            self.node.add_address(lo, host).await?;
            info!(address = %host, "the node's IPv6 source address for other nodes' pods");
        }
        Ok(())
    }

    /// Keeps the masquerade table in step with the cluster's pod CIDRs and node addresses.
    /// The table stays when the agent exits, like the pinned programs: pods keep reaching the
    /// outside while no agent runs, and the next agent replaces it whole.
    fn apply_masquerade(&mut self, state: &NodeState) -> Result<()> {
        if !self.cfg.masquerade.enabled {
            return Ok(());
        }
        let plan = masquerade::plan(&state.routes, &self.cfg.node_name, &self.cfg.masquerade);
        if self.masquerade.as_ref() != Some(&plan) {
            masquerade::apply(&plan)?;
            info!(sources = ?plan.sources, exempt = plan.exempt.len(), "masquerade table written");
            self.masquerade = Some(plan);
        }
        Ok(())
    }

    /// The `ENDPOINTS` map as it should be: every local pod address, with the rule sets the
    /// controller assigned to the pod (policy pending until it has: denied both ways or
    /// unisolated, as [`PendingPodPolicy`] says). Before the first state from the controller,
    /// rule sets already in the map are kept.
    fn endpoint_entries(&self) -> BTreeMap<IpKey, EndpointInfo> {
        let mut out = BTreeMap::new();
        for ep in self.endpoints.iter() {
            let base = EndpointInfo::new(
                ep.interface.host_ifindex,
                ep.interface.pod_mac,
                ep.interface.host_mac,
            );
            let assigned = ep.pod.as_ref().and_then(|k| self.policy.endpoints.get(k));
            // A container that is not a Kubernetes pod (no pod name in its CNI arguments)
            // cannot be selected by any policy: it never waits for one.
            let pending = match (&ep.pod, self.cfg.pending_pod_policy) {
                (Some(_), PendingPodPolicy::Deny) => base.failing_closed_until_assigned(),
                _ => base,
            };
            for ip in &ep.ips {
                let key = IpKey::from(*ip);
                let info = match assigned {
                    Some(p) => {
                        let (ingress, egress) =
                            fail_closed(p.ingress, p.egress, &self.incomplete_rule_sets);
                        base.with_policies(ingress, egress)
                    }
                    None if !self.have_controller_state => {
                        match self.maps.endpoints.get(&key, 0).ok() {
                            Some(old) if !old.policy_pending() => {
                                base.with_policies(old.ingress_policy(), old.egress_policy())
                            }
                            _ => pending,
                        }
                    }
                    None => pending,
                };
                out.insert(key, info);
            }
        }
        out
    }

    fn sync_endpoint_map(&mut self) -> Result<()> {
        let desired = self.endpoint_entries();
        self.maps.sync_endpoints(&desired)?;
        // The node itself: its host policy, as the controller last said (until it has, the
        // map keeps what a previous agent left).
        if self.have_controller_state {
            let (ingress, egress) = self
                .policy
                .endpoints
                .get(&weir_api::PodKey::host())
                .map_or((NOT_ISOLATED, NOT_ISOLATED), |p| {
                    fail_closed(p.ingress, p.egress, &self.incomplete_rule_sets)
                });
            // Untracked rules only drop: until their rule set is complete, none apply.
            let untracked = self
                .policy
                .endpoints
                .get(&weir_api::PodKey::host_untracked())
                .map(|p| p.ingress)
                .filter(|rs| !self.incomplete_rule_sets.contains(rs))
                .unwrap_or(NOT_ISOLATED);
            self.maps.set_host_policy(ingress, egress, untracked)?;
        }
        Ok(())
    }
}

/// The rule sets an endpoint gets: [`weir_common::policy::FAIL_CLOSED`] in place of one
/// whose entries are not all in the dataplane.
pub fn fail_closed(
    ingress: u32,
    egress: u32,
    incomplete: &std::collections::BTreeSet<u32>,
) -> (u32, u32) {
    let pick = |id: u32| {
        if incomplete.contains(&id) {
            weir_common::policy::FAIL_CLOSED
        } else {
            id
        }
    };
    (pick(ingress), pick(egress))
}

const ASSIGNED_CIDRS: &str = "pod-cidrs.json";

fn load_assigned_cidrs(state_dir: &std::path::Path) -> Vec<IpNet> {
    std::fs::read(state_dir.join(ASSIGNED_CIDRS))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save_assigned_cidrs(
    state_dir: &std::path::Path,
    cidrs: &[IpNet],
) -> Result<(), crate::install_cni::InstallError> {
    let bytes = serde_json::to_vec(cidrs).expect("serialisable");
    crate::install_cni::replace_file(state_dir, ASSIGNED_CIDRS, &bytes, 0o600).map(|_| ())
}
