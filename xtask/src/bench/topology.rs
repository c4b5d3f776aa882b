//! The network the data-path baselines run on, built from namespaces without weir: pods
//! attached to their node by routed veths exactly as weir's CNI attaches them (a /32 or /128
//! on the pod end, a default route via a link-local gateway, permanent neighbour entries, a
//! /32 or /128 route on the node), nodes joined by a bridge like the local cluster's L2
//! fabric, static routes between nodes. One network carries one address family ([`Family`]):
//! the IPv4 and IPv6 baselines are the same topology built twice. On top of an IPv4 network,
//! optionally, the same rule set as weir's policies in the server node's `FORWARD` path as
//! iptables rules, an ipset or an nftables set.
//!
//! Everything lives in namespaces recorded in a run record under the local clusters' run
//! directory, so that teardown on drop — or `cargo xtask down` after a crash — removes it;
//! nothing is created in the caller's namespace.

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use weir_agent::podnet::{gateway_for, ipv6_sysctls};
use weir_localcluster::{
    netns::{self, Netns},
    record::{ProcessRecord, RUNS_DIR, RunRecord},
};

use super::traffic::{CRR_PORTS, IPERF_PORT, RR_PORT};

/// Namespaces and processes of the benchmark's own (non-weir) networks.
pub struct BenchRun {
    record: RunRecord,
}

impl BenchRun {
    pub fn new() -> Result<Self> {
        let run = format!("wb{:06x}", fastrand::u32(..1 << 24));
        let dir = Path::new(RUNS_DIR).join(&run);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let record = RunRecord {
            run,
            dir,
            bpffs: PathBuf::from("/sys/fs/bpf"),
            ..Default::default()
        };
        record.save()?;
        Ok(Self { record })
    }

    pub fn dir(&self) -> &Path {
        &self.record.dir
    }

    /// A namespace `weir-<run>-<what>`, recorded before it is created.
    pub fn netns(&mut self, what: &str) -> Result<Netns> {
        let name = format!("weir-{}-{what}", self.record.run);
        self.record.namespaces.push(name.clone());
        self.record.save()?;
        Ok(Netns::create(&name)?)
    }

    /// Starts a long-running process in `ns`, recorded so that teardown stops it.
    pub fn spawn(&mut self, ns: &Netns, cmd: &mut Command, what: &str) -> Result<Child> {
        let child = ns.spawn(cmd)?;
        self.record
            .processes
            .push(ProcessRecord::new(child.id(), what));
        self.record.save()?;
        Ok(child)
    }
}

impl BenchRun {
    /// Stops the recorded processes now (before the namespaces they serve go away).
    pub fn stop_processes(&mut self) {
        for p in self.record.processes.drain(..).rev() {
            p.stop(std::time::Duration::from_secs(3));
        }
        let _ = self.record.save();
    }
}

impl Drop for BenchRun {
    fn drop(&mut self) {
        self.record.teardown();
    }
}

/// The address family of a baseline network and of the traffic measured on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn label(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    pub fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    /// `ip`'s family flag.
    fn flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }

    fn host_prefix_len(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    /// Address `host` of the baseline's pod range of node `node` (10.250.N.0/24,
    /// fd00:250:0:N::/64).
    fn pod_ip(self, node: u8, host: u8) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::new(10, 250, node, host).into(),
            Family::V6 => Ipv6Addr::new(0xfd00, 0x250, 0, node.into(), 0, 0, 0, host.into()).into(),
        }
    }

    fn pod_range(self, node: u8) -> String {
        match self {
            Family::V4 => format!("10.250.{node}.0/24"),
            Family::V6 => format!("fd00:250:0:{node}::/64"),
        }
    }

    /// Node `node`'s address on the fabric between the nodes, and the fabric's prefix length.
    fn fabric_ip(self, node: u8) -> (IpAddr, u8) {
        match self {
            Family::V4 => (Ipv4Addr::new(172, 31, 0, node).into(), 24),
            Family::V6 => (
                Ipv6Addr::new(0xfd00, 0x172, 0x31, 0, 0, 0, 0, node.into()).into(),
                64,
            ),
        }
    }
}

/// A pod of a baseline network.
#[derive(Clone, Debug)]
pub struct PlainPod {
    pub netns: Netns,
    pub ip: IpAddr,
}

/// A baseline network of one address family: a server pod and a client on its node, and
/// with `cross` a second node with another client.
pub struct PlainNetwork {
    pub family: Family,
    pub server: PlainPod,
    pub client: PlainPod,
    pub remote_client: Option<PlainPod>,
    /// The server's node, where rule sets go.
    pub server_node: Netns,
}

/// The pods' MTU, as weir's agent sets it on a 1500-byte fabric (room for VXLAN).
const POD_MTU: &str = "1450";

impl PlainNetwork {
    pub fn build(run: &mut BenchRun, tag: &str, cross: bool, family: Family) -> Result<Self> {
        let n1 = node(run, &format!("{tag}-n1"), family)?;
        let server = attach_pod(run, &n1, &format!("{tag}-srv"), family, 1, 2)?;
        let client = attach_pod(run, &n1, &format!("{tag}-cli"), family, 1, 3)?;
        let remote_client = if cross {
            let n2 = node(run, &format!("{tag}-n2"), family)?;
            let sw = run.netns(&format!("{tag}-sw"))?;
            sw.ip(&["link", "add", "br0", "type", "bridge"])?;
            sw.ip(&["link", "set", "br0", "up"])?;
            for (n, index, other) in [(&n1, 1, 2), (&n2, 2, 1)] {
                let port = format!("n{index}");
                netns::veth(n, "eth0", &sw, &port)?;
                sw.ip(&["link", "set", &port, "master", "br0"])?;
                let (ip, len) = family.fabric_ip(index);
                // No duplicate address detection: the address is usable at once.
                n.ip(&[
                    "addr",
                    "add",
                    &format!("{ip}/{len}"),
                    "dev",
                    "eth0",
                    "nodad",
                ])?;
                let (via, _) = family.fabric_ip(other);
                n.ip(&[
                    family.flag(),
                    "route",
                    "add",
                    &family.pod_range(other),
                    "via",
                    &via.to_string(),
                ])?;
            }
            Some(attach_pod(run, &n2, &format!("{tag}-clx"), family, 2, 3)?)
        } else {
            None
        };
        Ok(Self {
            family,
            server,
            client,
            remote_client,
            server_node: n1,
        })
    }
}

fn node(run: &mut BenchRun, what: &str, family: Family) -> Result<Netns> {
    let n = run.netns(what)?;
    match family {
        Family::V4 => {
            n.sysctl("net.ipv4.ip_forward", "1")?;
            n.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            n.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        }
        Family::V6 => n.sysctl("net.ipv6.conf.all.forwarding", "1")?,
    }
    Ok(n)
}

/// A pod namespace attached to `node` the way weir's CNI attaches pods (see
/// `weir_agent::podnet`), with address `host` of node `node_index`'s pod range of `family`:
/// the pod's address as /32 or /128, a default route via the link-local gateway with a
/// permanent neighbour entry, IPv6 set up as the agent sets it (or off on an IPv4 pod); on
/// the node a /32 or /128 route and a permanent neighbour entry, and on an IPv6 pod's host
/// end the gateway address.
fn attach_pod(
    run: &mut BenchRun,
    node: &Netns,
    what: &str,
    family: Family,
    node_index: u8,
    host: u8,
) -> Result<PlainPod> {
    let ip = family.pod_ip(node_index, host);
    let pod = run.netns(what)?;
    // Interface names are per namespace; the host number keeps the node's unique.
    let host_if = format!("veth{node_index}-{host}");
    netns::veth(node, &host_if, &pod, "eth0")?;
    node.ip(&["link", "set", &host_if, "mtu", POD_MTU])?;
    pod.ip(&["link", "set", "eth0", "mtu", POD_MTU])?;
    let has_ipv6 = family == Family::V6;
    for (key, value) in ipv6_sysctls(&host_if, has_ipv6) {
        node.sysctl(&key, value)?;
    }
    for (key, value) in ipv6_sysctls("eth0", has_ipv6) {
        pod.sysctl(&key, value)?;
    }
    let host_mac = mac(node, &host_if)?;
    let pod_mac = mac(&pod, "eth0")?;
    let gateway = gateway_for(ip).to_string();
    let cidr = format!("{ip}/{}", family.host_prefix_len());
    pod.ip(&["addr", "add", &cidr, "dev", "eth0"])?;
    pod.ip(&["route", "replace", &gateway, "dev", "eth0", "scope", "link"])?;
    pod.ip(&[
        "neigh",
        "replace",
        &gateway,
        "lladdr",
        &host_mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    pod.ip(&[
        family.flag(),
        "route",
        "add",
        "default",
        "via",
        &gateway,
        "dev",
        "eth0",
    ])?;
    if has_ipv6 {
        node.ip(&["addr", "add", &format!("{gateway}/64"), "dev", &host_if])?;
    }
    node.ip(&[
        "neigh",
        "replace",
        &ip.to_string(),
        "lladdr",
        &pod_mac,
        "dev",
        &host_if,
        "nud",
        "permanent",
    ])?;
    node.ip(&["route", "add", &cidr, "dev", &host_if])?;
    Ok(PlainPod { netns: pod, ip })
}

fn mac(ns: &Netns, ifname: &str) -> Result<String> {
    let out = ns.ip(&["-o", "link", "show", "dev", ifname])?;
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(str::to_string)
        .with_context(|| format!("no MAC for {ifname} in {}: {out}", ns.name()))
}

/// The rule set every compared dataplane enforces for the server: `count` allowing rules,
/// `count − 1` of them for peers that are not the measured clients (one /32 each, on a port
/// the benchmark does not use), and one, last, for the clients on the measured ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleSet {
    pub count: usize,
}

/// The port the non-matching rules allow.
pub const OTHER_PORT: u16 = 9000;

impl RuleSet {
    /// Sources of the rules that never match the measured traffic, in `family`
    /// (10.200.0.0/16 and up, fd00:200::/64).
    pub fn other_peers(&self, family: Family) -> impl Iterator<Item = IpAddr> {
        let v4 = u32::from(Ipv4Addr::new(10, 200, 0, 0));
        let v6 = u128::from(Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0));
        (0..self.count.saturating_sub(1) as u32).map(move |i| match family {
            Family::V4 => Ipv4Addr::from(v4 + i).into(),
            Family::V6 => Ipv6Addr::from(v6 + u128::from(i)).into(),
        })
    }
}

/// How the baseline's node filters: the ways iptables-based dataplanes implement policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// One iptables rule per allowed peer, walked linearly: the allowing rule comes after
    /// the `count − 1` that do not match.
    Iptables(RuleSet),
    /// One iptables rule matching an ipset (`hash:ip,port`) of every allowed (peer, port).
    Ipset(RuleSet),
    /// An nftables set of (address . port) looked up by one rule.
    Nft(RuleSet),
}

impl Filter {
    pub fn id(&self) -> String {
        let (kind, r) = match self {
            Filter::Iptables(r) => ("iptables", r),
            Filter::Ipset(r) => ("ipset", r),
            Filter::Nft(r) => ("nft", r),
        };
        format!("{kind}-{}", super::verdict::count(r.count))
    }

    pub fn label(&self) -> String {
        match self {
            Filter::Iptables(r) => format!(
                "iptables, {} rules (linear)",
                super::verdict::count(r.count)
            ),
            Filter::Ipset(r) => format!(
                "iptables + ipset, {} entries",
                super::verdict::count(r.count)
            ),
            Filter::Nft(r) => format!("nftables set, {} entries", super::verdict::count(r.count)),
        }
    }

    /// Installs the filter in `node`'s FORWARD path for traffic to `server`. Established
    /// flows are accepted first, as every conntrack-based implementation does.
    /// IPv4 only, as the rule sets are written (`iptables`, `hash:ip,port family inet`,
    /// `ipv4_addr`).
    pub fn install(
        &self,
        node: &Netns,
        dir: &Path,
        server: IpAddr,
        clients: &[IpAddr],
    ) -> Result<()> {
        if !server.is_ipv4() || !clients.iter().all(IpAddr::is_ipv4) {
            bail!("{}: the filters are written for IPv4 only", self.label());
        }
        let crr = format!("{}:{}", CRR_PORTS.start(), CRR_PORTS.end());
        match self {
            Filter::Iptables(rules) => {
                let mut s = String::from(
                    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:BENCH-INGRESS - [0:0]\n",
                );
                s.push_str("-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
                let _ = writeln!(s, "-A FORWARD -d {server}/32 -j BENCH-INGRESS");
                for peer in rules.other_peers(Family::V4) {
                    let _ = writeln!(
                        s,
                        "-A BENCH-INGRESS -s {peer}/32 -p tcp -m tcp --dport {OTHER_PORT} -j ACCEPT"
                    );
                }
                for c in clients {
                    let _ = writeln!(
                        s,
                        "-A BENCH-INGRESS -s {c}/32 -p tcp -m multiport --dports {IPERF_PORT},{RR_PORT},{crr} -j ACCEPT"
                    );
                }
                s.push_str("-A BENCH-INGRESS -j DROP\nCOMMIT\n");
                exec_with_input(node, dir, "iptables-restore", &[], &s)
            }
            Filter::Ipset(rules) => {
                let mut set = String::from(
                    "create bench-allow hash:ip,port family inet hashsize 16384 maxelem 1048576\n",
                );
                for peer in rules.other_peers(Family::V4) {
                    let _ = writeln!(set, "add bench-allow {peer},tcp:{OTHER_PORT}");
                }
                for c in clients {
                    let _ = writeln!(set, "add bench-allow {c},tcp:{IPERF_PORT}");
                    let _ = writeln!(set, "add bench-allow {c},tcp:{RR_PORT}");
                    let _ = writeln!(
                        set,
                        "add bench-allow {c},tcp:{}-{}",
                        CRR_PORTS.start(),
                        CRR_PORTS.end()
                    );
                }
                exec_with_input(node, dir, "ipset", &["restore"], &set)?;
                let mut s = String::from(
                    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n",
                );
                s.push_str("-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
                let _ = writeln!(
                    s,
                    "-A FORWARD -d {server}/32 -m set --match-set bench-allow src,dst -j ACCEPT"
                );
                let _ = writeln!(s, "-A FORWARD -d {server}/32 -j DROP");
                s.push_str("COMMIT\n");
                exec_with_input(node, dir, "iptables-restore", &[], &s)
            }
            Filter::Nft(rules) => {
                let mut elements: Vec<String> = rules
                    .other_peers(Family::V4)
                    .map(|p| format!("{p} . {OTHER_PORT}"))
                    .collect();
                for c in clients {
                    for port in [IPERF_PORT, RR_PORT].into_iter().chain(CRR_PORTS) {
                        elements.push(format!("{c} . {port}"));
                    }
                }
                let s = format!(
                    "table ip bench {{\n  set allow {{\n    type ipv4_addr . inet_service\n    size 1048576\n    elements = {{\n      {}\n    }}\n  }}\n  chain forward {{\n    type filter hook forward priority filter; policy accept;\n    ct state established,related accept\n    ip daddr {server} ip saddr . tcp dport @allow accept\n    ip daddr {server} drop\n  }}\n}}\n",
                    elements.join(",\n      ")
                );
                exec_with_input(node, dir, "nft", &["-f", "-"], &s)
            }
        }
    }
}

/// Runs `program args` inside `ns` (`ip netns exec`) with `input` on stdin (kept in a file
/// in the run directory, for reading after the fact).
pub fn exec_with_input(
    ns: &Netns,
    dir: &Path,
    program: &str,
    args: &[&str],
    input: &str,
) -> Result<()> {
    let file = dir.join(format!("{}-{program}.rules", ns.name()));
    fs::write(&file, input).with_context(|| format!("writing {}", file.display()))?;
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), program])
        .args(args)
        .stdin(fs::File::open(&file)?)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {program} in {}", ns.name()))?;
    if !out.status.success() {
        bail!(
            "{program} {} in {} failed ({}): {} (input: {})",
            args.join(" "),
            ns.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            file.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_set_of_n_has_n_minus_one_other_peers_none_of_them_a_client() {
        let r = RuleSet { count: 1000 };
        for family in Family::ALL {
            let peers: Vec<IpAddr> = r.other_peers(family).collect();
            assert_eq!(peers.len(), 999);
            assert!(peers.iter().all(|p| Family::of(*p) == family));
            let unique: std::collections::BTreeSet<_> = peers.iter().collect();
            assert_eq!(unique.len(), peers.len());
            let clients = [family.pod_ip(1, 3), family.pod_ip(2, 3)];
            assert!(peers.iter().all(|p| !clients.contains(p)));
            assert_eq!(RuleSet { count: 0 }.other_peers(family).count(), 0);
        }
        assert_eq!(
            r.other_peers(Family::V4).nth(256),
            Some("10.200.1.0".parse().unwrap())
        );
        assert_eq!(
            r.other_peers(Family::V6).nth(256),
            Some("fd00:200::100".parse().unwrap())
        );
    }

    #[test]
    fn baseline_addresses_of_both_families_follow_node_and_host() {
        assert_eq!(Family::V4.pod_ip(2, 3).to_string(), "10.250.2.3");
        assert_eq!(Family::V6.pod_ip(2, 3).to_string(), "fd00:250:0:2::3");
        for family in Family::ALL {
            let range: ipnet::IpNet = family.pod_range(2).parse().unwrap();
            assert!(range.contains(&family.pod_ip(2, 3)));
            assert!(!range.contains(&family.pod_ip(1, 3)));
            let (fabric, len) = family.fabric_ip(1);
            let fabric = ipnet::IpNet::new(fabric, len).unwrap().trunc();
            assert!(fabric.contains(&family.fabric_ip(2).0));
        }
    }
}
