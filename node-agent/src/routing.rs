//! Routes to other nodes' pods, without BGP: the controller tells every agent which node owns
//! which pod CIDR and at which address; the agent turns that into eBPF route entries (for
//! pod traffic) and kernel routes (for traffic the node itself originates).
//!
//! Per peer node and pod CIDR, the mode is chosen automatically: a node whose address of the
//! CIDR's family is on one of the uplink's subnets is reached directly (`bpf_redirect_neigh`
//! out of the uplink, like flannel's host-gw); any other node through VXLAN (like Calico's
//! VXLAN CrossSubnet).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    str::FromStr,
};

use ipnet::IpNet;
use weir_api::NodeRoute;
use weir_common::{ip::IpKey, route::RouteEntry};

use crate::netlink::{Netlink, NetlinkError, link_mac};

/// Name of the node's VXLAN device.
pub const TUNNEL_IFNAME: &str = "weir.vxlan";
/// IANA VXLAN port (the XDP program's tunnel admission checks datagrams to it).
pub const VXLAN_PORT: u16 = weir_common::TUNNEL_PORT;
/// VXLAN network identifier weir uses.
pub const VNI: u32 = 1;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RoutingMode {
    /// Direct to nodes on the uplink's subnets, VXLAN to the others.
    #[default]
    Auto,
    /// Always direct (every node must be on the same L2 segment).
    Direct,
    /// Always VXLAN.
    Vxlan,
}

impl FromStr for RoutingMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "direct" => Ok(Self::Direct),
            "vxlan" => Ok(Self::Vxlan),
            other => Err(format!(
                "unknown routing mode {other:?} (auto, direct or vxlan)"
            )),
        }
    }
}

/// The interface that connects the node to the other nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uplink {
    pub ifname: String,
    pub ifindex: u32,
    /// Its addresses with their prefix lengths (what is on-link).
    pub subnets: Vec<IpNet>,
    pub mtu: u32,
}

impl Uplink {
    /// The first interface (in index order, or the one named `preferred`) other than
    /// loopback and weir's own that has a global IPv4 address; on a node without one (an
    /// IPv6-only node), the first with a global IPv6 address. Its subnets are its global
    /// addresses of both families.
    pub async fn detect(
        nl: &Netlink,
        preferred: Option<&str>,
    ) -> Result<Option<Uplink>, NetlinkError> {
        use rtnetlink::packet_route::link::LinkAttribute;
        let mut ipv6_only: Option<Uplink> = None;
        for index in nl.link_indices().await? {
            let Some(link) = nl.link_by_index(index).await? else {
                continue;
            };
            let mut name = String::new();
            let mut mtu = 1500;
            for a in &link.attributes {
                match a {
                    LinkAttribute::IfName(n) => name = n.clone(),
                    LinkAttribute::Mtu(m) => mtu = *m,
                    _ => {}
                }
            }
            if name == "lo" || name.starts_with("weir") || link_mac(&link).is_none() {
                continue;
            }
            if preferred.is_some_and(|p| p != name) {
                continue;
            }
            let subnets: Vec<IpNet> = nl
                .addresses(index)
                .await?
                .into_iter()
                .filter(|n| is_global(n.addr()))
                .collect();
            if subnets.is_empty() {
                continue;
            }
            let uplink = Uplink {
                ifname: name,
                ifindex: index,
                subnets,
                mtu,
            };
            if uplink.has_ipv4() {
                return Ok(Some(uplink));
            }
            ipv6_only.get_or_insert(uplink);
        }
        Ok(ipv6_only)
    }

    /// Whether the uplink has an IPv4 address (else the node is IPv6-only).
    pub fn has_ipv4(&self) -> bool {
        self.subnets.iter().any(|n| n.addr().is_ipv4())
    }

    /// Bytes VXLAN adds on this uplink's underlay: 20 more for an IPv6 outer header, which
    /// any uplink with a global IPv6 address may send (its peers may be known by IPv6
    /// addresses), so encapsulated packets never outgrow the uplink whichever family the
    /// peers' addresses are.
    pub fn vxlan_overhead(&self) -> u32 {
        if self.subnets.iter().any(|n| n.addr().is_ipv6()) {
            crate::VXLAN_OVERHEAD + 20
        } else {
            crate::VXLAN_OVERHEAD
        }
    }

    fn on_link(&self, ip: IpAddr) -> bool {
        self.subnets.iter().any(|n| n.trunc().contains(&ip))
    }
}

/// An address another node can reach this one at: not loopback, not link-local.
fn is_global(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => !a.is_link_local() && !a.is_loopback(),
        IpAddr::V6(a) => !a.is_loopback() && !a.is_unicast_link_local() && !a.is_multicast(),
    }
}

/// Kernel route for traffic the node originates to a remote pod CIDR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelRoute {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    /// None: a blackhole.
    pub ifindex: Option<u32>,
}

/// Everything routing needs on this node, computed from the controller's route table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutePlan {
    /// This node's own pod CIDRs (the IPAM pools).
    pub own_cidrs: Vec<IpNet>,
    /// `ROUTES` map: remote pod CIDR → node.
    pub map: BTreeMap<IpNet, RouteEntry>,
    pub kernel: Vec<KernelRoute>,
    /// `TUNNEL_PEERS` map: every other node, whatever the mode this node uses towards it (a
    /// peer decides on its own whether to encapsulate towards this node).
    pub tunnel_peers: BTreeSet<IpKey>,
}

/// Computes the plan. Pure: no I/O.
pub fn plan(
    routes: &BTreeMap<IpNet, NodeRoute>,
    me: &str,
    uplink: &Uplink,
    tunnel_ifindex: u32,
    mode: RoutingMode,
) -> RoutePlan {
    let mut plan = RoutePlan::default();
    for (cidr, route) in routes {
        if route.node == me {
            plan.own_cidrs.push(*cidr);
            // Addresses of the own CIDR that no pod holds go nowhere (not out of a default
            // route: that would loop between nodes).
            plan.kernel.push(KernelRoute {
                dst: *cidr,
                gateway: None,
                ifindex: None,
            });
            continue;
        }
        plan.tunnel_peers.insert(IpKey::from(route.node_ip));
        // A direct route's next hop is the node's address, and it must be of the pod CIDR's
        // family: neither the kernel (an IPv6 route via an IPv4 gateway) nor
        // `bpf_redirect_neigh` (an IPv6 packet takes an IPv6 next hop only) forwards across
        // families. A dual-stack node has an address of each family (`node_ip` and its
        // other addresses): each pod CIDR goes directly via the address of its own family.
        // A CIDR of a family the node has no address of (IPv6 pods over an IPv4-only
        // underlay) is reached over VXLAN to `node_ip`, which carries either family,
        // whatever the mode says.
        let hop = route
            .addresses()
            .find(|a| a.is_ipv4() == cidr.addr().is_ipv4());
        let direct = hop.filter(|hop| match mode {
            RoutingMode::Direct => true,
            RoutingMode::Vxlan => false,
            RoutingMode::Auto => uplink.on_link(*hop),
        });
        if let Some(hop) = direct {
            plan.map.insert(
                *cidr,
                RouteEntry::new(IpKey::from(hop), RouteEntry::MODE_DIRECT, uplink.ifindex),
            );
            plan.kernel.push(KernelRoute {
                dst: *cidr,
                gateway: Some(hop),
                ifindex: Some(uplink.ifindex),
            });
        } else {
            plan.map.insert(
                *cidr,
                RouteEntry::new(
                    IpKey::from(route.node_ip),
                    RouteEntry::MODE_VXLAN,
                    tunnel_ifindex,
                ),
            );
            plan.kernel.push(KernelRoute {
                dst: *cidr,
                gateway: None,
                ifindex: Some(tunnel_ifindex),
            });
        }
    }
    plan
}

/// Makes the kernel's weir-owned routes exactly `plan.kernel`.
pub async fn apply_kernel_routes(nl: &Netlink, plan: &RoutePlan) -> Result<(), NetlinkError> {
    for r in &plan.kernel {
        nl.replace_owned_route(r.dst, r.gateway, r.ifindex).await?;
    }
    for dst in nl.owned_routes().await? {
        if !plan.kernel.iter().any(|r| r.dst == dst) {
            nl.del_route(dst).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uplink() -> Uplink {
        Uplink {
            ifname: "eth0".into(),
            ifindex: 2,
            subnets: vec!["172.30.1.11/24".parse().unwrap()],
            mtu: 1500,
        }
    }

    fn routes() -> BTreeMap<IpNet, NodeRoute> {
        [
            ("10.244.1.0/24", "n1", "172.30.1.11"),
            ("10.244.2.0/24", "n2", "172.30.2.12"),
            ("10.244.3.0/24", "n3", "172.30.1.13"),
        ]
        .into_iter()
        .map(|(c, n, ip)| (c.parse().unwrap(), NodeRoute::new(n, ip.parse().unwrap())))
        .collect()
    }

    #[test]
    fn auto_mode_goes_direct_on_link_and_tunnels_across_subnets() {
        let p = plan(&routes(), "n1", &uplink(), 9, RoutingMode::Auto);
        assert_eq!(p.own_cidrs, vec!["10.244.1.0/24".parse::<IpNet>().unwrap()]);
        let n2 = p.map[&"10.244.2.0/24".parse().unwrap()];
        assert_eq!((n2.mode(), n2.ifindex()), (RouteEntry::MODE_VXLAN, 9));
        let n3 = p.map[&"10.244.3.0/24".parse().unwrap()];
        assert_eq!((n3.mode(), n3.ifindex()), (RouteEntry::MODE_DIRECT, 2));
        assert_eq!(
            n3.node_ip(),
            &IpKey::from("172.30.1.13".parse::<IpAddr>().unwrap())
        );
        assert!(
            !p.map.contains_key(&"10.244.1.0/24".parse().unwrap()),
            "no route to itself"
        );
        let peers: BTreeSet<IpKey> = ["172.30.2.12", "172.30.1.13"]
            .into_iter()
            .map(|a| IpKey::from(a.parse::<IpAddr>().unwrap()))
            .collect();
        assert_eq!(
            p.tunnel_peers, peers,
            "every other node may tunnel to this one, whichever way this one reaches it"
        );
        let own = p
            .kernel
            .iter()
            .find(|r| r.dst == "10.244.1.0/24".parse().unwrap())
            .unwrap();
        assert_eq!(
            own.ifindex, None,
            "own CIDR is blackholed below the pods' /32 routes"
        );
    }

    #[test]
    fn forced_modes_override_the_subnet_test() {
        let direct = plan(&routes(), "n1", &uplink(), 9, RoutingMode::Direct);
        assert!(
            direct
                .map
                .values()
                .all(|r| r.mode() == RouteEntry::MODE_DIRECT)
        );
        let vxlan = plan(&routes(), "n1", &uplink(), 9, RoutingMode::Vxlan);
        assert!(
            vxlan
                .map
                .values()
                .all(|r| r.mode() == RouteEntry::MODE_VXLAN)
        );
    }

    fn dual_routes() -> BTreeMap<IpNet, NodeRoute> {
        let mut r = routes();
        for (c, n, ip) in [
            ("fd00:10:244:1::/64", "n1", "172.30.1.11"),
            ("fd00:10:244:2::/64", "n2", "172.30.2.12"),
            ("fd00:10:244:3::/64", "n3", "172.30.1.13"),
            ("fd00:10:244:4::/64", "n4", "fd00:172:30::14"),
            ("fd00:10:244:5::/64", "n5", "fd00:172:31::15"),
        ] {
            r.insert(c.parse().unwrap(), NodeRoute::new(n, ip.parse().unwrap()));
        }
        r
    }

    #[test]
    fn ipv6_pod_cidrs_of_ipv4_nodes_are_tunnelled_in_every_mode() {
        for mode in [RoutingMode::Auto, RoutingMode::Direct, RoutingMode::Vxlan] {
            let p = plan(&dual_routes(), "n1", &uplink(), 9, mode);
            assert!(
                p.own_cidrs
                    .contains(&"fd00:10:244:1::/64".parse::<IpNet>().unwrap())
            );
            for c in ["fd00:10:244:2::/64", "fd00:10:244:3::/64"] {
                let cidr: IpNet = c.parse().unwrap();
                let r = p.map[&cidr];
                assert_eq!(
                    (r.mode(), r.ifindex()),
                    (RouteEntry::MODE_VXLAN, 9),
                    "{c} {mode:?}"
                );
                let k = p.kernel.iter().find(|k| k.dst == cidr).unwrap();
                assert_eq!((k.gateway, k.ifindex), (None, Some(9)), "{c} {mode:?}");
            }
        }
        // The IPv4 CIDR of the on-link node stays direct in auto mode.
        let p = plan(&dual_routes(), "n1", &uplink(), 9, RoutingMode::Auto);
        assert_eq!(
            p.map[&"10.244.3.0/24".parse().unwrap()].mode(),
            RouteEntry::MODE_DIRECT
        );
        let own6 = p
            .kernel
            .iter()
            .find(|r| r.dst == "fd00:10:244:1::/64".parse().unwrap())
            .unwrap();
        assert_eq!(own6.ifindex, None, "own IPv6 CIDR is blackholed too");
    }

    #[test]
    fn ipv6_pod_cidrs_of_nodes_on_an_ipv6_link_are_direct() {
        let mut up = uplink();
        up.subnets.push("fd00:172:30::11/64".parse().unwrap());
        let p = plan(&dual_routes(), "n1", &up, 9, RoutingMode::Auto);
        let n4: IpNet = "fd00:10:244:4::/64".parse().unwrap();
        assert_eq!(p.map[&n4].mode(), RouteEntry::MODE_DIRECT);
        let k = p.kernel.iter().find(|k| k.dst == n4).unwrap();
        assert_eq!(
            (k.gateway, k.ifindex),
            (Some("fd00:172:30::14".parse().unwrap()), Some(2))
        );
        let n5: IpNet = "fd00:10:244:5::/64".parse().unwrap();
        assert_eq!(p.map[&n5].mode(), RouteEntry::MODE_VXLAN, "another subnet");
        assert!(up.has_ipv4());
        assert_eq!(
            up.vxlan_overhead(),
            70,
            "a dual-stack underlay may carry IPv6 outers"
        );
        assert_eq!(uplink().vxlan_overhead(), 50, "IPv4 only");
        let v6_only = Uplink {
            subnets: vec!["fd00:172:30::11/64".parse().unwrap()],
            ..uplink()
        };
        assert_eq!(v6_only.vxlan_overhead(), 70);
    }

    #[test]
    fn each_family_goes_directly_via_the_dual_stack_nodes_address_of_that_family() {
        // Nodes known by IPv6 addresses that have IPv4 ones too: on one segment, both pod
        // CIDRs are routed directly, each via the address of its own family; across
        // subnets both go through VXLAN to the IPv6 address.
        let mut up = uplink();
        up.subnets.push("fd00:172:30:1::11/64".parse().unwrap());
        let mut r = BTreeMap::new();
        for (node, v6, v4, cidrs) in [
            (
                "n2",
                "fd00:172:30:1::12",
                "172.30.1.12",
                ["10.244.2.0/24", "fd00:10:244:2::/64"],
            ),
            (
                "n3",
                "fd00:172:30:2::13",
                "172.30.2.13",
                ["10.244.3.0/24", "fd00:10:244:3::/64"],
            ),
        ] {
            let mut route = NodeRoute::new(node, v6.parse().unwrap());
            route.other_ips.push(v4.parse().unwrap());
            for c in cidrs {
                r.insert(c.parse::<IpNet>().unwrap(), route.clone());
            }
        }
        let p = plan(&r, "n1", &up, 9, RoutingMode::Auto);
        let via = |c: &str| {
            let cidr: IpNet = c.parse().unwrap();
            let k = p.kernel.iter().find(|k| k.dst == cidr).unwrap();
            (p.map[&cidr].mode(), k.gateway.map(|g| g.to_string()))
        };
        let direct = |hop: &str| (RouteEntry::MODE_DIRECT, Some(hop.to_string()));
        assert_eq!(via("10.244.2.0/24"), direct("172.30.1.12"));
        assert_eq!(via("fd00:10:244:2::/64"), direct("fd00:172:30:1::12"));
        assert_eq!(via("10.244.3.0/24"), (RouteEntry::MODE_VXLAN, None));
        assert_eq!(via("fd00:10:244:3::/64"), (RouteEntry::MODE_VXLAN, None));
        let tunnel = p.map[&"10.244.3.0/24".parse().unwrap()];
        assert_eq!(
            *tunnel.node_ip(),
            IpKey::from("fd00:172:30:2::13".parse::<IpAddr>().unwrap()),
            "VXLAN to the address the node is known by"
        );
    }

    #[test]
    fn only_global_addresses_make_an_uplink() {
        for (ip, global) in [
            ("172.30.0.1", true),
            ("169.254.0.1", false),
            ("127.0.0.1", false),
            ("fd00::1", true),
            ("2001:db8::1", true),
            ("fe80::1", false),
            ("::1", false),
        ] {
            assert_eq!(is_global(ip.parse().unwrap()), global, "{ip}");
        }
    }
}
