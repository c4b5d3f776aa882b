//! A pod's routed network attachment (no bridge).
//!
//! The pod gets a veth whose pod end carries its addresses as /32 and /128 and a default
//! route per family via a link-local gateway, [`GATEWAY_V4`] and [`GATEWAY_V6`], reachable
//! on-link. The host end carries no pod-subnet address; the node reaches the pod through a
//! /32 (/128) route on the host end. Both sides get permanent neighbour entries for every
//! family, so no ARP or neighbour discovery is needed (the eBPF program on the host end still
//! answers ARP for pods that flush their neighbour table; for IPv6 the host end carries the
//! gateway address `fe80::1/64`, so the host stack answers a pod's neighbour solicitations).
//!
//! # IPv6 in the pod
//!
//! A pod with an IPv6 address gets IPv6 enabled on its interface with:
//!
//! * `accept_dad=0`: duplicate address detection would hold the address tentative for a
//!   second and send neighbour solicitations from `::`, which the host end's program drops
//!   as spoofed. Addresses come from the node's IPAM, which never hands one out twice, so
//!   there is nothing to detect.
//! * `accept_ra=0` and `router_solicitations=0`: the default route is the one set here. No
//!   router advertisement may add another one, or addresses from a prefix (a pod's
//!   addresses are the IPAM's alone), and the pod does not ask for any.
//!
//! The pod keeps its link-local address (the kernel needs one on an IPv6 interface); what
//! it sends from it (neighbour discovery, MLD) is not pod traffic: the host end's program
//! hands it to the host stack without policy. The gateway `fe80::1` is resolved by the
//! permanent entry, so unicast traffic does not wait for neighbour discovery. A pod without an IPv6 address keeps IPv6 disabled on both ends,
//! as before dual stack: no link-local chatter to filter.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::netlink::{self, Netlink, NetlinkError, link_mac, open_netns, write_sysctl};

/// The pod's default gateway: link-local, never routed, the same in every pod.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The pod's IPv6 default gateway: link-local, the same in every pod.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The pod's gateway for the family of `ip`.
pub fn gateway_for(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(GATEWAY_V4),
        IpAddr::V6(_) => IpAddr::V6(GATEWAY_V6),
    }
}

/// The default route of the family of `ip`.
pub fn default_route_for(ip: IpAddr) -> IpNet {
    match ip {
        IpAddr::V4(_) => "0.0.0.0/0".parse().expect("literal"),
        IpAddr::V6(_) => "::/0".parse().expect("literal"),
    }
}

/// The sysctls of an interface with IPv6 addresses from IPAM (see the module docs), or of
/// one without any (IPv6 off). In the order they are written: IPv6 is enabled last, so no
/// address is ever configured under the kernel's defaults.
pub fn ipv6_sysctls(ifname: &str, has_ipv6: bool) -> Vec<(String, &'static str)> {
    let key = |k: &str| format!("net.ipv6.conf.{ifname}.{k}");
    if !has_ipv6 {
        return vec![(key("disable_ipv6"), "1")];
    }
    vec![
        (key("accept_dad"), "0"),
        (key("accept_ra"), "0"),
        (key("router_solicitations"), "0"),
        (key("disable_ipv6"), "0"),
    ]
}

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

    // IPv6 only where the pod has an IPv6 address (see the module docs).
    let has_ipv6 = spec.ips.iter().any(|ip| ip.is_ipv6());
    for (key, value) in ipv6_sysctls(host_ifname, has_ipv6) {
        write_sysctl(None, &key, value)?;
    }

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
    for (key, value) in ipv6_sysctls(&spec.ifname, has_ipv6) {
        write_sysctl(Some(netns), &key, value)?;
    }
    for ip in &spec.ips {
        pod.add_address(pod_ifindex, host_net(*ip)).await?;
    }
    pod.set_up(pod_ifindex).await?;
    // One gateway per family the pod has an address of.
    let mut families: Vec<IpAddr> = Vec::new();
    for ip in &spec.ips {
        if !families.iter().any(|f| f.is_ipv4() == ip.is_ipv4()) {
            families.push(*ip);
        }
    }
    for ip in &families {
        let gw = gateway_for(*ip);
        pod.replace_link_route(host_net(gw), pod_ifindex).await?;
        pod.replace_neighbour(pod_ifindex, gw, host_mac).await?;
        pod.replace_gateway_route(default_route_for(*ip), gw, pod_ifindex)
            .await?;
    }

    node.set_up(host_ifindex).await?;
    if has_ipv6 {
        // The host end answers neighbour solicitations for the pod's gateway (a pod that
        // flushed its permanent entry resolves it again, as ARP does for IPv4).
        node.add_address(
            host_ifindex,
            IpNet::new(IpAddr::V6(GATEWAY_V6), 64).expect("/64"),
        )
        .await?;
    }
    for ip in &spec.ips {
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
    for ip in &spec.ips {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_family_has_its_link_local_gateway_and_default_route() {
        let v4: IpAddr = "10.244.0.5".parse().unwrap();
        let v6: IpAddr = "fd00:10:244::5".parse().unwrap();
        assert_eq!(gateway_for(v4).to_string(), "169.254.1.1");
        assert_eq!(gateway_for(v6).to_string(), "fe80::1");
        assert_eq!(default_route_for(v4).to_string(), "0.0.0.0/0");
        assert_eq!(default_route_for(v6).to_string(), "::/0");
        assert_eq!(host_net(v6).to_string(), "fd00:10:244::5/128");
    }

    #[test]
    fn ipv6_is_off_without_an_ipv6_address_and_quiet_with_one() {
        assert_eq!(
            ipv6_sysctls("eth0", false),
            [("net.ipv6.conf.eth0.disable_ipv6".to_string(), "1")]
        );
        let on = ipv6_sysctls("eth0", true);
        assert_eq!(
            on.last().unwrap(),
            &("net.ipv6.conf.eth0.disable_ipv6".to_string(), "0"),
            "enabled after the rest is set"
        );
        for key in ["accept_dad", "accept_ra", "router_solicitations"] {
            assert!(
                on.contains(&(format!("net.ipv6.conf.eth0.{key}"), "0")),
                "{key} off: {on:?}"
            );
        }
    }
}
