//! A pod's routed network attachment (no bridge).
//!
//! The pod gets a veth whose pod end carries its address as a /32 (/128) and a default
//! route via a link-local gateway, [`GATEWAY_V4`], reachable on-link. The host end carries
//! no pod-subnet address; the node reaches the pod through a /32 route on the host end.
//! Both sides get permanent neighbour entries, so no ARP is needed (the eBPF program on the
//! host end still answers ARP for pods that flush their neighbour table).

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::netlink::{self, Netlink, NetlinkError, link_mac, open_netns, write_sysctl};

/// The pod's default gateway: link-local, never routed, the same in every pod.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// What the CNI call asks for.
#[derive(Clone, Debug)]
pub struct PodInterfaceSpec {
    pub container_id: String,
    pub netns: PathBuf,
    /// Interface name inside the pod (CNI_IFNAME, usually eth0).
    pub ifname: String,
    pub ips: Vec<IpAddr>,
    pub mtu: u32,
}

/// What was built, as persisted in the agent's endpoint store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInterface {
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: [u8; 6],
    pub pod_mac: [u8; 6],
}

/// Name of the host end of a pod's veth: `weir` + 11 hex digits of a hash of the
/// attachment (interface names have at most 15 characters).
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    // FNV-1a, 64 bit: stable across releases, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("weir{:011x}", h >> 20)
}

fn host_net(ip: IpAddr) -> IpNet {
    IpNet::new(ip, if ip.is_ipv4() { 32 } else { 128 }).unwrap_or_else(|_| IpNet::from(ip))
}

/// Builds the pod's interface. Idempotent: a leftover host end from an interrupted ADD is
/// removed first.
pub async fn setup(node: &Netlink, spec: &PodInterfaceSpec) -> Result<PodInterface, NetlinkError> {
    let host_ifname = host_ifname(&spec.container_id, &spec.ifname);
    node.del_link(&host_ifname).await?;
    let netns = open_netns(&spec.netns)?;
    node.add_veth_into(&host_ifname, &spec.ifname, &netns, spec.mtu)
        .await?;
    let result = configure(node, spec, &host_ifname, &netns).await;
    if result.is_err() {
        // Leave nothing half-built behind; deleting one end deletes both.
        let _ = node.del_link(&host_ifname).await;
    }
    result
}

async fn configure(
    node: &Netlink,
    spec: &PodInterfaceSpec,
    host_ifname: &str,
    netns: &std::fs::File,
) -> Result<PodInterface, NetlinkError> {
    let host = node
        .link_by_name(host_ifname)
        .await?
        .ok_or_else(|| NetlinkError::NoSuchLink {
            name: host_ifname.into(),
        })?;
    let host_ifindex = host.header.index;
    let host_mac = link_mac(&host).ok_or_else(|| NetlinkError::NoSuchLink {
        name: format!("{host_ifname} (no MAC)"),
    })?;

    // Until dual stack lands, neither end speaks IPv6 (no link-local chatter to filter).
    write_sysctl(
        None,
        &format!("net.ipv6.conf.{host_ifname}.disable_ipv6"),
        "1",
    )?;

    let pod = Netlink::in_netns(&spec.netns).await?;
    let pod_link =
        pod.link_by_name(&spec.ifname)
            .await?
            .ok_or_else(|| NetlinkError::NoSuchLink {
                name: format!("{} in {}", spec.ifname, spec.netns.display()),
            })?;
    let pod_ifindex = pod_link.header.index;
    let pod_mac = link_mac(&pod_link).ok_or_else(|| NetlinkError::NoSuchLink {
        name: format!("{} (no MAC)", spec.ifname),
    })?;
    write_sysctl(
        Some(netns),
        &format!("net.ipv6.conf.{}.disable_ipv6", spec.ifname),
        "1",
    )?;
    for ip in spec.ips.iter().filter(|ip| ip.is_ipv4()) {
        pod.add_address(pod_ifindex, host_net(*ip)).await?;
    }
    pod.set_up(pod_ifindex).await?;
    let gw = IpAddr::V4(GATEWAY_V4);
    pod.replace_link_route(host_net(gw), pod_ifindex).await?;
    pod.replace_neighbour(pod_ifindex, gw, host_mac).await?;
    pod.replace_gateway_route("0.0.0.0/0".parse().expect("literal"), gw, pod_ifindex)
        .await?;

    node.set_up(host_ifindex).await?;
    for ip in spec.ips.iter().filter(|ip| ip.is_ipv4()) {
        node.replace_neighbour(host_ifindex, *ip, pod_mac).await?;
        node.replace_link_route(host_net(*ip), host_ifindex).await?;
    }
    Ok(PodInterface {
        host_ifname: host_ifname.to_string(),
        host_ifindex,
        host_mac,
        pod_mac,
    })
}

/// Removes the pod's interface (both ends) and its host routes. Ok(false) if it was gone.
pub async fn teardown(
    node: &Netlink,
    host_ifname: &str,
    ips: &[IpAddr],
) -> Result<bool, NetlinkError> {
    // The kernel drops routes through a deleted device by itself; the explicit delete covers
    // a route left behind by a crash between the two steps of `setup`.
    let existed = node.del_link(host_ifname).await?;
    for ip in ips {
        node.del_route(host_net(*ip)).await?;
    }
    Ok(existed)
}

/// Verifies the pod's interface is as `setup` left it (CNI CHECK).
pub async fn check(
    node: &Netlink,
    spec: &PodInterfaceSpec,
    built: &PodInterface,
) -> Result<(), String> {
    let host = node
        .link_by_name(&built.host_ifname)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("host interface {} is missing", built.host_ifname))?;
    if host.header.index != built.host_ifindex {
        return Err(format!(
            "host interface {} was recreated (index {} instead of {})",
            built.host_ifname, host.header.index, built.host_ifindex
        ));
    }
    let pod = Netlink::in_netns(&spec.netns)
        .await
        .map_err(|e| e.to_string())?;
    let link = pod
        .link_by_name(&spec.ifname)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!(
                "interface {} is missing in {}",
                spec.ifname,
                spec.netns.display()
            )
        })?;
    if link_mac(&link) != Some(built.pod_mac) {
        return Err(format!("interface {} has another MAC address", spec.ifname));
    }
    let addrs = pod
        .addresses(link.header.index)
        .await
        .map_err(|e| e.to_string())?;
    for ip in spec.ips.iter().filter(|ip| ip.is_ipv4()) {
        if !addrs.iter().any(|n| n.addr() == *ip) {
            return Err(format!("address {ip} is missing on {}", spec.ifname));
        }
    }
    Ok(())
}

/// Does a network namespace still exist at `path`?
pub fn netns_exists(path: &Path) -> bool {
    netlink::open_netns(path).is_ok()
}
