//! The network the data-path baselines run on, built from namespaces without weir: pods
//! attached to their node by routed veths exactly as weir's CNI attaches them (a /32 on the
//! pod end, a default route via a link-local gateway, permanent neighbour entries, a /32
//! route on the node), nodes joined by a bridge like the local cluster's L2 fabric, static
//! routes between nodes. On top of it, optionally, the same rule set as weir's policies in
//! the server node's `FORWARD` path as iptables rules, an ipset or an nftables set.
//!
//! Everything lives in namespaces recorded in a run record under the local clusters' run
//! directory, so that teardown on drop — or `cargo xtask down` after a crash — removes it;
//! nothing is created in the caller's namespace.

use std::{
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
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

/// A pod of a baseline network.
#[derive(Clone, Debug)]
pub struct PlainPod {
    pub netns: Netns,
    pub ip: Ipv4Addr,
}

/// A baseline network: a server pod and a client on its node, and with `cross` a second
/// node with another client.
pub struct PlainNetwork {
    pub server: PlainPod,
    pub client: PlainPod,
    pub remote_client: Option<PlainPod>,
    /// The server's node, where rule sets go.
    pub server_node: Netns,
}

/// The pods' MTU, as weir's agent sets it on a 1500-byte fabric (room for VXLAN).
const POD_MTU: &str = "1450";
const GATEWAY: &str = "169.254.1.1";

impl PlainNetwork {
    pub fn build(run: &mut BenchRun, tag: &str, cross: bool) -> Result<Self> {
        let n1 = node(run, &format!("{tag}-n1"))?;
        let server = attach_pod(
            run,
            &n1,
            &format!("{tag}-srv"),
            Ipv4Addr::new(10, 250, 1, 2),
        )?;
        let client = attach_pod(
            run,
            &n1,
            &format!("{tag}-cli"),
            Ipv4Addr::new(10, 250, 1, 3),
        )?;
        let remote_client = if cross {
            let n2 = node(run, &format!("{tag}-n2"))?;
            let sw = run.netns(&format!("{tag}-sw"))?;
            sw.ip(&["link", "add", "br0", "type", "bridge"])?;
            sw.ip(&["link", "set", "br0", "up"])?;
            for (n, port, ip, other_pods, other_ip) in [
                (&n1, "n1", "172.31.0.1/24", "10.250.2.0/24", "172.31.0.2"),
                (&n2, "n2", "172.31.0.2/24", "10.250.1.0/24", "172.31.0.1"),
            ] {
                netns::veth(n, "eth0", &sw, port)?;
                sw.ip(&["link", "set", port, "master", "br0"])?;
                n.ip(&["addr", "add", ip, "dev", "eth0"])?;
                n.ip(&["route", "add", other_pods, "via", other_ip])?;
            }
            Some(attach_pod(
                run,
                &n2,
                &format!("{tag}-clx"),
                Ipv4Addr::new(10, 250, 2, 3),
            )?)
        } else {
            None
        };
        Ok(Self {
            server,
            client,
            remote_client,
            server_node: n1,
        })
    }
}

fn node(run: &mut BenchRun, what: &str) -> Result<Netns> {
    let n = run.netns(what)?;
    n.sysctl("net.ipv4.ip_forward", "1")?;
    n.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
    n.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
    Ok(n)
}

/// A pod namespace attached to `node` the way weir's CNI attaches pods.
fn attach_pod(run: &mut BenchRun, node: &Netns, what: &str, ip: Ipv4Addr) -> Result<PlainPod> {
    let pod = run.netns(what)?;
    // Interface names are per namespace; the last octet keeps the node's unique.
    let host_if = format!("veth{}-{}", ip.octets()[2], ip.octets()[3]);
    netns::veth(node, &host_if, &pod, "eth0")?;
    node.ip(&["link", "set", &host_if, "mtu", POD_MTU])?;
    pod.ip(&["link", "set", "eth0", "mtu", POD_MTU])?;
    node.sysctl(&format!("net.ipv6.conf.{host_if}.disable_ipv6"), "1")?;
    pod.sysctl("net.ipv6.conf.eth0.disable_ipv6", "1")?;
    let host_mac = mac(node, &host_if)?;
    let pod_mac = mac(&pod, "eth0")?;
    let cidr = format!("{ip}/32");
    pod.ip(&["addr", "add", &cidr, "dev", "eth0"])?;
    pod.ip(&["route", "add", GATEWAY, "dev", "eth0", "scope", "link"])?;
    pod.ip(&[
        "neigh",
        "replace",
        GATEWAY,
        "lladdr",
        &host_mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    pod.ip(&["route", "add", "default", "via", GATEWAY, "dev", "eth0"])?;
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
    /// Sources of the rules that never match the measured traffic.
    pub fn other_peers(&self) -> impl Iterator<Item = Ipv4Addr> {
        let base = u32::from(Ipv4Addr::new(10, 200, 0, 0));
        (0..self.count.saturating_sub(1) as u32).map(move |i| Ipv4Addr::from(base + i))
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
    pub fn install(
        &self,
        node: &Netns,
        dir: &Path,
        server: Ipv4Addr,
        clients: &[Ipv4Addr],
    ) -> Result<()> {
        let crr = format!("{}:{}", CRR_PORTS.start(), CRR_PORTS.end());
        match self {
            Filter::Iptables(rules) => {
                let mut s = String::from(
                    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:BENCH-INGRESS - [0:0]\n",
                );
                s.push_str("-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
                let _ = writeln!(s, "-A FORWARD -d {server}/32 -j BENCH-INGRESS");
                for peer in rules.other_peers() {
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
                for peer in rules.other_peers() {
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
                    .other_peers()
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
        let peers: Vec<Ipv4Addr> = r.other_peers().collect();
        assert_eq!(peers.len(), 999);
        assert!(peers.iter().all(|p| p.octets()[0..2] == [10, 200]));
        let unique: std::collections::BTreeSet<_> = peers.iter().collect();
        assert_eq!(unique.len(), peers.len());
        assert_eq!(RuleSet { count: 0 }.other_peers().count(), 0);
    }
}
