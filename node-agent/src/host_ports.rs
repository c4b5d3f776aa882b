//! Pods' `hostPort`s (the CNI `portMappings` capability), served where Services are
//! translated: each mapping is a NodePort-like frontend on this node only, with one backend,
//! the pod's address and container port. Without a `hostIP` the frontends are on the
//! unspecified address of each family the pod has (every address of this node, each family
//! to the pod's address of that family); with one, on that address alone, so
//! the port stays free on the node's other addresses (for other pods' mappings with other
//! `hostIP`s, or the node's own sockets), as the `portmap` plugin does. The programs
//! translate it as they translate a NodePort — from the network, from a pod to its node's
//! address, and at the socket for the node's own processes — and the pod's ingress rules
//! judge the translated flow.
//!
//! The agent writes these frontends itself, next to the controller's: the table it writes
//! into `SERVICES` is the controller's plus the host ports on the ports the controller does
//! not use. A NodePort is on every address of the node, so it shadows every host port of
//! its port and protocol, whatever their `hostIP` (a NodePort created later takes them
//! over, as the controller's state is the cluster's; they come back when the NodePort
//! goes).
//!
//! Service ids: the controller numbers Service ports upwards from 1; host ports take ids
//! from [`IDS`] (the upper half of the id space), so the two never meet. An id stays with
//! its mapping for the mapping's life (it is persisted with the endpoint), so a restarted
//! agent keeps the translations of live flows.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::RangeInclusive,
};

use ipnet::IpNet;

use weir_api::{
    BackendState, FrontendKind, ServiceBackend, ServiceEntry, ServiceFrontend, ServiceRef,
    TableDiff,
};
use weir_cni::spec::PortMapping;

pub use crate::endpoints::HostPort;
use crate::endpoints::LocalEndpoint;

/// Service ids reserved for host ports (the controller's count up from 1).
pub const IDS: RangeInclusive<u32> = 0x8000_0000..=u32::MAX;

/// What the flow events and metrics call a host port's Service: `hostPort/<ns>/<pod>`
/// (`hostPort/<container id>` for a container that is not a Kubernetes pod).
pub const NAME_PREFIX: &str = "hostPort";

/// Why a pod's host ports cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum HostPortError {
    /// The port is already served on this node.
    #[error("host port {port} is already in use on this node by {by}")]
    Conflict { port: String, by: String },
    /// Something the dataplane does not do (yet).
    #[error("host port {port}: {why}")]
    Unsupported { port: String, why: &'static str },
    /// The `hostIP` is none of this node's addresses.
    #[error(
        "host port {port}: hostIP {ip} is not an address of this node (its addresses: {addrs})"
    )]
    NotANodeAddress {
        port: String,
        ip: IpAddr,
        addrs: String,
    },
}

/// The unspecified address of a family: a frontend there is on every address of the node
/// of that family.
fn unspecified(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    }
}

/// The frontend of a mapping on `ip`.
fn frontend_on(m: &PortMapping, ip: IpAddr) -> ServiceFrontend {
    ServiceFrontend {
        kind: FrontendKind::NodePort,
        ip,
        port: m.host_port,
        proto: m.protocol.number(),
    }
}

/// The frontends of a mapping for a pod with addresses `pod_ips` (one per family), each with
/// the pod address it leads to: on its `hostIP`, to the pod's address of that family; or,
/// without one, on every address of each family the pod has (the family's unspecified
/// address), as the `portmap` plugin does on a dual-stack node.
pub fn frontends<'a>(
    m: &'a PortMapping,
    pod_ips: &'a [IpAddr],
) -> impl Iterator<Item = (ServiceFrontend, IpAddr)> + 'a {
    pod_ips
        .iter()
        .filter(move |ip| m.host_ip.is_none_or(|h| h.is_ipv6() == ip.is_ipv6()))
        .map(move |ip| {
            let on = m.host_ip.unwrap_or(unspecified(ip.is_ipv6()));
            (frontend_on(m, on), *ip)
        })
}

/// Whether `f` is a frontend on one address of the node (a host port with a `hostIP`).
pub fn on_one_address(f: &ServiceFrontend) -> bool {
    f.kind == FrontendKind::NodePort && !f.ip.is_unspecified()
}

/// The same port and protocol on every address of the node of `f`'s family.
fn on_every_address(f: &ServiceFrontend) -> ServiceFrontend {
    ServiceFrontend {
        ip: unspecified(f.ip.is_ipv6()),
        ..*f
    }
}

/// The controller's frontend that shadows host-port frontend `f`, if any: one on the same
/// key, or a NodePort (every address) on the port and protocol of a host port on one
/// address.
fn holder<'a>(
    f: &ServiceFrontend,
    services: &'a BTreeMap<ServiceFrontend, ServiceEntry>,
) -> Option<&'a ServiceEntry> {
    services.get(f).or_else(|| {
        on_one_address(f)
            .then(|| services.get(&on_every_address(f)))
            .flatten()
    })
}

/// Whether the controller's `services` leave host-port frontend `f` free.
pub fn is_free(f: &ServiceFrontend, services: &BTreeMap<ServiceFrontend, ServiceEntry>) -> bool {
    holder(f, services).is_none()
}

/// The name of an endpoint's host-port Service (see [`NAME_PREFIX`]).
pub fn name(ep: &LocalEndpoint) -> ServiceRef {
    match &ep.pod {
        Some(pod) => ServiceRef {
            namespace: NAME_PREFIX.into(),
            name: format!("{}/{}", pod.namespace, pod.name),
            port_name: String::new(),
        },
        None => ServiceRef {
            namespace: NAME_PREFIX.into(),
            name: ep.container_id.clone(),
            port_name: String::new(),
        },
    }
}

fn describe(ep: &LocalEndpoint) -> String {
    match &ep.pod {
        Some(pod) => format!("pod {pod}"),
        None => format!("container {}", ep.container_id),
    }
}

/// Checks that `mappings` can be served for a new attachment of `owner` (container id,
/// interface), besides every other endpoint's host ports and the controller's `services`,
/// and gives each an id not used by another endpoint. A `hostIP` must be among
/// `node_addrs`, of a family the pod gets an address of (`pod_pools`: the node's pod
/// CIDRs). Nothing is changed.
pub fn claim<'a>(
    mappings: &[PortMapping],
    owner: (&str, &str),
    endpoints: impl IntoIterator<Item = &'a LocalEndpoint>,
    services: &BTreeMap<ServiceFrontend, ServiceEntry>,
    node_addrs: &[IpAddr],
    pod_pools: &[IpNet],
) -> Result<Vec<HostPort>, HostPortError> {
    // A pod address of each family the pod gets one of: the frontends its mappings claim.
    let pod_ips: Vec<IpAddr> = pod_pools.iter().map(|p| p.network()).collect();
    let others: Vec<&LocalEndpoint> = endpoints
        .into_iter()
        .filter(|ep| (ep.container_id.as_str(), ep.ifname.as_str()) != owner)
        .collect();
    let mut used: BTreeSet<u32> = BTreeSet::new();
    for ep in &others {
        used.extend(ep.host_ports.iter().map(|h| h.id));
    }
    let mut out = Vec::with_capacity(mappings.len());
    let mut next = *IDS.start();
    for m in mappings {
        match m.host_ip {
            None => {}
            Some(ip) if !pod_ips.iter().any(|p| p.is_ipv6() == ip.is_ipv6()) => {
                return Err(HostPortError::Unsupported {
                    port: m.host_side(),
                    why: "the pod gets no address of the hostIP's family on this node; leave \
                          hostIP empty or give an address of a family the node's pods have",
                });
            }
            Some(ip) if !node_addrs.contains(&ip) => {
                let addrs: Vec<String> = node_addrs
                    .iter()
                    .filter(|a| a.is_ipv6() == ip.is_ipv6())
                    .map(|a| a.to_string())
                    .collect();
                return Err(HostPortError::NotANodeAddress {
                    port: m.host_side(),
                    ip,
                    addrs: addrs.join(", "),
                });
            }
            Some(_) => {}
        }
        if let Some(ep) = others
            .iter()
            .find(|ep| ep.host_ports.iter().any(|h| h.mapping.overlaps(m)))
        {
            return Err(HostPortError::Conflict {
                port: m.host_side(),
                by: format!("the hostPort of {}", describe(ep)),
            });
        }
        if let Some(entry) = frontends(m, &pod_ips).find_map(|(f, _)| holder(&f, services)) {
            return Err(HostPortError::Conflict {
                port: m.host_side(),
                by: format!("the NodePort of Service {}", entry.service),
            });
        }
        while used.contains(&next) {
            next = next.checked_add(1).ok_or(HostPortError::Unsupported {
                port: m.host_side(),
                why: "no Service id left for host ports",
            })?;
        }
        used.insert(next);
        out.push(HostPort {
            mapping: *m,
            id: next,
        });
    }
    Ok(out)
}

/// The host-port frontends of `endpoints`, as Service table entries: each mapping on each
/// family it covers ([`frontends`]), both families sharing the mapping's id.
pub fn table<'a>(
    endpoints: impl Iterator<Item = &'a LocalEndpoint>,
) -> BTreeMap<ServiceFrontend, ServiceEntry> {
    let mut out = BTreeMap::new();
    for ep in endpoints {
        for h in &ep.host_ports {
            for (frontend, ip) in frontends(&h.mapping, &ep.ips) {
                out.insert(
                    frontend,
                    ServiceEntry {
                        service: name(ep),
                        id: h.id,
                        backends: vec![ServiceBackend {
                            ip,
                            port: h.mapping.container_port,
                            node: String::new(),
                            state: BackendState::Ready,
                        }],
                        affinity_timeout_s: None,
                        masquerade_external: false,
                    },
                );
            }
        }
    }
    out
}

/// The table the agent writes: the controller's `services`, and the host ports on the
/// frontends it leaves free.
pub fn merged(
    services: &BTreeMap<ServiceFrontend, ServiceEntry>,
    host_ports: &BTreeMap<ServiceFrontend, ServiceEntry>,
) -> BTreeMap<ServiceFrontend, ServiceEntry> {
    let mut out = services.clone();
    for (f, e) in host_ports {
        match holder(f, services) {
            Some(owner) => taken_over(f, e, owner),
            None => {
                out.insert(*f, e.clone());
            }
        }
    }
    out
}

/// Logs that a Service's NodePort took a pod's host port over (the cluster's Services win;
/// the host port comes back when the NodePort goes).
fn taken_over(f: &ServiceFrontend, host_port: &ServiceEntry, owner: &ServiceEntry) {
    tracing::warn!(
        port = f.port,
        proto = ?f.proto,
        address = %f.ip,
        host_port = %host_port.service,
        service = %owner.service,
        "a Service's NodePort takes over a pod's hostPort on this node; the hostPort is not served until the NodePort goes"
    );
}

/// The controller's diff, from its table `services` (before the diff), as it applies to the
/// [`merged`] table: a NodePort that comes removes the host ports it shadows on one address
/// (one on its own key is overwritten), and a frontend the controller gives up goes back to
/// the host ports it shadowed.
pub fn merge_diff(
    diff: &TableDiff<ServiceFrontend, ServiceEntry>,
    services: &BTreeMap<ServiceFrontend, ServiceEntry>,
    host_ports: &BTreeMap<ServiceFrontend, ServiceEntry>,
) -> TableDiff<ServiceFrontend, ServiceEntry> {
    let mut after = services.clone();
    diff.apply_to(&mut after);
    // Host ports shadowed by `f`: on its key, and, for a NodePort, on one address.
    let shadowed_by = |f: &ServiceFrontend| {
        let f = *f;
        host_ports.iter().filter(move |(h, _)| {
            **h == f
                || (f.kind == FrontendKind::NodePort
                    && f.ip.is_unspecified()
                    && on_one_address(h)
                    && on_every_address(h) == f)
        })
    };
    let mut out = diff.clone();
    for (f, owner) in &diff.upsert {
        for (h, e) in shadowed_by(f) {
            if is_free(h, services) {
                taken_over(h, e, owner);
                if h != f {
                    out.remove.push(*h);
                }
            }
        }
    }
    out.remove
        .retain(|f| !(host_ports.contains_key(f) && is_free(f, &after)));
    for f in &diff.remove {
        for (h, e) in shadowed_by(f) {
            if is_free(h, &after) {
                out.upsert.push((*h, e.clone()));
            }
        }
    }
    out
}

/// The change of the written table when the host ports go from `old` to `new` and the
/// controller's `services` stay.
pub fn diff(
    old: &BTreeMap<ServiceFrontend, ServiceEntry>,
    new: &BTreeMap<ServiceFrontend, ServiceEntry>,
    services: &BTreeMap<ServiceFrontend, ServiceEntry>,
) -> TableDiff<ServiceFrontend, ServiceEntry> {
    let mut out = TableDiff::default();
    for (f, e) in new {
        if is_free(f, services) && old.get(f) != Some(e) {
            out.upsert.push((*f, e.clone()));
        }
    }
    for f in old.keys() {
        if is_free(f, services) && !new.contains_key(f) {
            out.remove.push(*f);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use weir_api::PodKey;
    use weir_cni::spec::PortProtocol;

    use super::*;
    use crate::podnet::PodInterface;

    /// The frontend of an IPv4 pod's mapping.
    fn frontend(m: &PortMapping) -> ServiceFrontend {
        frontend_on(m, m.host_ip.unwrap_or(unspecified(false)))
    }

    /// The node's pod CIDRs: IPv4 alone, and dual-stack.
    fn v4_pools() -> Vec<IpNet> {
        vec!["10.0.0.0/24".parse().unwrap()]
    }
    /// [`claim`] for a pod on an IPv4 node beside endpoint `a`, no `hostIP`s.
    fn claim_v4(
        mappings: &[PortMapping],
        owner: (&str, &str),
        a: &LocalEndpoint,
        services: &BTreeMap<ServiceFrontend, ServiceEntry>,
    ) -> Result<Vec<HostPort>, HostPortError> {
        claim(mappings, owner, [a], services, &[], &v4_pools())
    }

    fn dual_pools() -> Vec<IpNet> {
        vec![
            "10.0.0.0/24".parse().unwrap(),
            "fd00:10::/64".parse().unwrap(),
        ]
    }

    fn mapping(host_port: u16, container_port: u16) -> PortMapping {
        PortMapping {
            host_port,
            container_port,
            protocol: PortProtocol::Tcp,
            host_ip: None,
        }
    }

    fn endpoint(container: &str, ip: &str, host_ports: Vec<HostPort>) -> LocalEndpoint {
        LocalEndpoint {
            container_id: container.into(),
            ifname: "eth0".into(),
            pod: Some(PodKey::new("default", container)),
            netns: PathBuf::from("/run/netns/x"),
            ips: vec![ip.parse().unwrap()],
            mtu: 1450,
            interface: PodInterface {
                host_ifname: "w".into(),
                host_ifindex: 1,
                host_mac: [0; 6],
                pod_mac: [0; 6],
            },
            host_ports,
        }
    }

    fn node_port(port: u16) -> (ServiceFrontend, ServiceEntry) {
        (
            frontend(&mapping(port, port)),
            ServiceEntry {
                service: ServiceRef {
                    namespace: "default".into(),
                    name: "np".into(),
                    port_name: String::new(),
                },
                id: 7,
                backends: vec![],
                affinity_timeout_s: None,
                masquerade_external: true,
            },
        )
    }

    #[test]
    fn claims_get_distinct_ids_from_the_reserved_range() {
        let a = endpoint(
            "a",
            "10.0.0.2",
            vec![HostPort {
                mapping: mapping(80, 80),
                id: *IDS.start(),
            }],
        );
        let claimed = claim_v4(
            &[mapping(81, 80), mapping(82, 80)],
            ("b", "eth0"),
            &a,
            &BTreeMap::new(),
        )
        .unwrap();
        let ids: Vec<u32> = claimed.iter().map(|h| h.id).collect();
        assert_eq!(ids, vec![IDS.start() + 1, IDS.start() + 2]);
    }

    #[test]
    fn a_taken_port_or_a_node_port_is_refused() {
        let a = endpoint(
            "a",
            "10.0.0.2",
            vec![HostPort {
                mapping: mapping(80, 80),
                id: *IDS.start(),
            }],
        );
        let err = claim_v4(&[mapping(80, 8080)], ("b", "eth0"), &a, &BTreeMap::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "host port 80/tcp is already in use on this node by the hostPort of pod default/a"
        );
        // The same attachment again (a rebuilt ADD) does not conflict with itself.
        claim_v4(&[mapping(80, 80)], ("a", "eth0"), &a, &BTreeMap::new()).unwrap();
        // Another protocol is another port.
        let udp = PortMapping {
            protocol: PortProtocol::Udp,
            ..mapping(80, 80)
        };
        claim_v4(&[udp], ("b", "eth0"), &a, &BTreeMap::new()).unwrap();
        let services = BTreeMap::from([node_port(30080)]);
        let err = claim_v4(&[mapping(30080, 80)], ("b", "eth0"), &a, &services).unwrap_err();
        assert!(
            err.to_string().contains("NodePort of Service default/np"),
            "{err}"
        );
    }

    fn on(ip: &str, host_port: u16, container_port: u16) -> PortMapping {
        PortMapping {
            host_ip: Some(ip.parse().unwrap()),
            ..mapping(host_port, container_port)
        }
    }

    const NODE_ADDRS: [IpAddr; 3] = [
        IpAddr::V4(Ipv4Addr::new(192, 168, 1, 1)),
        IpAddr::V4(Ipv4Addr::new(192, 168, 1, 2)),
        IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
    ];

    #[test]
    fn a_host_ip_claims_its_port_on_that_node_address_alone() {
        let a = endpoint(
            "a",
            "10.0.0.2",
            vec![HostPort {
                mapping: on("192.168.1.1", 80, 80),
                id: *IDS.start(),
            }],
        );
        let claim_one = |m: PortMapping, services: &BTreeMap<_, _>| {
            claim(
                &[m],
                ("b", "eth0"),
                [&a],
                services,
                &NODE_ADDRS,
                &v4_pools(),
            )
        };
        let none = BTreeMap::new();
        // The same port on the node's other address is free.
        let claimed = claim_one(on("192.168.1.2", 80, 8080), &none).unwrap();
        assert_eq!(claimed[0].mapping.host_ip, Some(NODE_ADDRS[1]));
        // The same address, or every address, is not.
        let err = claim_one(on("192.168.1.1", 80, 8080), &none).unwrap_err();
        assert_eq!(
            err.to_string(),
            "host port 192.168.1.1:80/tcp is already in use on this node by the hostPort of pod default/a"
        );
        let err = claim_one(mapping(80, 8080), &none).unwrap_err();
        assert!(err.to_string().contains("pod default/a"), "{err}");
        // Neither is a port a NodePort holds on every address.
        let services = BTreeMap::from([node_port(30080)]);
        let err = claim_one(on("192.168.1.2", 30080, 80), &services).unwrap_err();
        assert!(
            err.to_string().contains("NodePort of Service default/np"),
            "{err}"
        );
        // An address the node does not have, and IPv6, are refused with what to do.
        let err = claim_one(on("192.168.1.9", 81, 80), &none).unwrap_err();
        assert_eq!(
            err.to_string(),
            "host port 192.168.1.9:81/tcp: hostIP 192.168.1.9 is not an address of this node \
             (its addresses: 192.168.1.1, 192.168.1.2)"
        );
        let err = claim_one(on("fd00::1", 81, 80), &none).unwrap_err();
        assert!(
            err.to_string()
                .contains("no address of the hostIP's family"),
            "{err}"
        );
        // A mapping on every address conflicts with one on any address.
        let b = endpoint(
            "b",
            "10.0.0.3",
            vec![HostPort {
                mapping: mapping(90, 90),
                id: IDS.start() + 1,
            }],
        );
        let err = claim(
            &[on("192.168.1.2", 90, 90)],
            ("c", "eth0"),
            [&a, &b],
            &none,
            &NODE_ADDRS,
            &v4_pools(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("pod default/b"), "{err}");
    }

    #[test]
    fn a_dual_stack_pod_gets_its_host_port_on_both_families() {
        let claim_one = |m: PortMapping, services: &BTreeMap<_, _>| {
            claim(
                &[m],
                ("a", "eth0"),
                [],
                services,
                &NODE_ADDRS,
                &dual_pools(),
            )
        };
        let none = BTreeMap::new();
        let every = claim_one(mapping(80, 8080), &none).unwrap();
        let on_v6 = claim_one(on("fd00::1", 81, 8081), &none).unwrap();
        let a = LocalEndpoint {
            ips: vec!["10.0.0.2".parse().unwrap(), "fd00:10::2".parse().unwrap()],
            ..endpoint("a", "10.0.0.2", [every, on_v6].concat())
        };
        let host = table([&a].into_iter());
        let routes: Vec<(String, String)> = host
            .iter()
            .map(|(f, e)| {
                let b = &e.backends[0];
                (
                    std::net::SocketAddr::new(f.ip, f.port).to_string(),
                    std::net::SocketAddr::new(b.ip, b.port).to_string(),
                )
            })
            .collect();
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(
            routes,
            pairs(&[
                ("0.0.0.0:80", "10.0.0.2:8080"),
                ("[::]:80", "[fd00:10::2]:8080"),
                ("[fd00::1]:81", "[fd00:10::2]:8081"),
            ]),
            "each family's frontend leads to the pod's address of that family"
        );
        assert_eq!(
            host[&frontend_on(&mapping(80, 8080), unspecified(false))].id,
            host[&frontend_on(&mapping(80, 8080), unspecified(true))].id,
            "one mapping, one id"
        );
        // An IPv6 NodePort holds its port on every IPv6 address: an IPv6 hostIP on it is
        // refused, and so is a mapping without hostIP (it would be on IPv6 too).
        let (_, entry) = node_port(30080);
        let services = BTreeMap::from([(
            frontend_on(&mapping(30080, 30080), unspecified(true)),
            entry,
        )]);
        for m in [on("fd00::1", 30080, 80), mapping(30080, 80)] {
            let err = claim_one(m, &services).unwrap_err();
            assert!(err.to_string().contains("NodePort of Service"), "{err}");
        }
        claim_one(on("192.168.1.1", 30080, 80), &services)
            .expect("an IPv4 hostIP: the IPv6 NodePort is another family's");
    }

    #[test]
    fn host_ips_have_their_own_frontends_and_a_node_port_shadows_them_all() {
        let a = endpoint(
            "a",
            "10.0.0.2",
            vec![HostPort {
                mapping: on("192.168.1.1", 30080, 80),
                id: *IDS.start(),
            }],
        );
        let b = endpoint(
            "b",
            "10.0.0.3",
            vec![HostPort {
                mapping: on("192.168.1.2", 30080, 80),
                id: IDS.start() + 1,
            }],
        );
        let host = table([&a, &b].into_iter());
        let (fa, fb) = (
            frontend(&on("192.168.1.1", 30080, 80)),
            frontend(&on("192.168.1.2", 30080, 80)),
        );
        assert_eq!(host.keys().copied().collect::<Vec<_>>(), vec![fa, fb]);
        assert!(on_one_address(&fa) && !on_one_address(&frontend(&mapping(1, 1))));
        // In the dataplane: keyed by the address itself, not the unspecified one.
        assert_eq!(
            *crate::services::frontend_key(&fa).addr(),
            weir_common::ip::IpKey::from(NODE_ADDRS[0])
        );
        assert_eq!(
            *crate::services::frontend_key(&frontend(&mapping(1, 1))).addr(),
            weir_common::ip::IpKey::ANY_V4
        );
        let none = BTreeMap::new();
        assert_eq!(merged(&none, &host), host);

        // A NodePort on the port comes: both host ports leave the written table.
        let (np, np_entry) = node_port(30080);
        let came = TableDiff {
            upsert: vec![(np, np_entry.clone())],
            remove: vec![],
        };
        let d = merge_diff(&came, &none, &host);
        assert_eq!(d.upsert, vec![(np, np_entry.clone())]);
        assert_eq!(d.remove, vec![fa, fb]);
        let services = BTreeMap::from([(np, np_entry.clone())]);
        assert_eq!(merged(&services, &host), services);
        // A later change of the NodePort removes nothing more.
        let d = merge_diff(&came, &services, &host);
        assert!(d.remove.is_empty(), "{d:?}");
        // Host ports that change under the NodePort are not written.
        let d = diff(&host, &BTreeMap::new(), &services);
        assert!(d.remove.is_empty() && d.upsert.is_empty(), "{d:?}");

        // The NodePort goes: both come back.
        let gone = TableDiff {
            upsert: vec![],
            remove: vec![np],
        };
        let d = merge_diff(&gone, &services, &host);
        assert_eq!(d.remove, vec![np]);
        assert_eq!(
            d.upsert,
            vec![(fa, host[&fa].clone()), (fb, host[&fb].clone())]
        );
        // Another port's NodePort leaves them alone.
        let (other, other_entry) = node_port(30081);
        let d = merge_diff(
            &TableDiff {
                upsert: vec![(other, other_entry)],
                remove: vec![],
            },
            &none,
            &host,
        );
        assert!(d.remove.is_empty(), "{d:?}");
    }

    #[test]
    fn the_controller_keeps_its_frontends_and_gives_them_back() {
        let a = endpoint(
            "a",
            "10.0.0.2",
            vec![
                HostPort {
                    mapping: mapping(30080, 80),
                    id: *IDS.start(),
                },
                HostPort {
                    mapping: mapping(8080, 80),
                    id: IDS.start() + 1,
                },
            ],
        );
        let host = table([&a].into_iter());
        assert_eq!(host.len(), 2);
        let hp = &host[&frontend(&mapping(8080, 80))];
        assert_eq!(hp.service.to_string(), "hostPort/default/a");
        assert_eq!(hp.backends[0].ip, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(hp.backends[0].port, 80);

        let services = BTreeMap::from([node_port(30080)]);
        let written = merged(&services, &host);
        assert_eq!(written.len(), 2);
        assert_eq!(written[&node_port(30080).0].id, 7);

        // The NodePort goes: the host port takes its frontend back.
        let gone = TableDiff {
            upsert: vec![],
            remove: vec![node_port(30080).0],
        };
        let d = merge_diff(&gone, &services, &host);
        assert!(d.remove.is_empty());
        assert_eq!(
            d.upsert,
            vec![(node_port(30080).0, host[&node_port(30080).0].clone())]
        );
        assert_eq!(d.upsert[0].1.id, *IDS.start());

        // Host ports change: what the controller holds is left alone.
        let d = diff(&host, &BTreeMap::new(), &services);
        assert_eq!(d.remove, vec![frontend(&mapping(8080, 80))]);
        assert!(d.upsert.is_empty());
        let d = diff(&BTreeMap::new(), &host, &services);
        assert_eq!(d.upsert.len(), 1);
    }
}
