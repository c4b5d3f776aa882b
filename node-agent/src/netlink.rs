//! Kernel networking configuration over rtnetlink: veth pairs, addresses, routes,
//! neighbours, in the agent's namespace and inside pod namespaces.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    path::Path,
};

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::{
    Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        link::{InfoData, InfoVeth, LinkAttribute, LinkMessage},
        neighbour::NeighbourState,
        route::{RouteProtocol, RouteScope},
    },
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("opening netlink socket{}", in_ns(.netns))]
    Connect {
        netns: Option<String>,
        #[source]
        source: std::io::Error,
    },
    #[error("opening network namespace {path}")]
    Netns {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{action}")]
    Request {
        action: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("interface {name} not found")]
    NoSuchLink { name: String },
    #[error("writing sysctl {path}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn in_ns(netns: &Option<String>) -> String {
    netns
        .as_ref()
        .map(|n| format!(" in {n}"))
        .unwrap_or_default()
}

pub type Result<T, E = NetlinkError> = std::result::Result<T, E>;

fn req(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let action = action.into();
    move |source| NetlinkError::Request { action, source }
}

/// Is this the kernel telling us the object already exists / does not exist?
fn errno_is(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

/// A netlink connection bound to one network namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// A connection in the calling thread's namespace (the agent's node namespace).
    pub fn current() -> Result<Self> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|source| NetlinkError::Connect {
                netns: None,
                source,
            })?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// A connection inside the namespace at `netns` (e.g. `/var/run/netns/x` or
    /// `/proc/<pid>/ns/net`). The socket is created on a short-lived thread that has entered
    /// the namespace; a socket stays in the namespace it was created in.
    pub async fn in_netns(netns: &Path) -> Result<Self> {
        let ns = open_netns(netns)?;
        let rt = tokio::runtime::Handle::current();
        let label = netns.display().to_string();
        let (conn, handle) = in_namespace(&ns, move || {
            let _guard = rt.enter();
            rtnetlink::new_connection().map(|(c, h, _)| (c, h))
        })
        .map_err(|source| NetlinkError::Connect {
            netns: Some(label.clone()),
            source,
        })?
        .map_err(|source| NetlinkError::Connect {
            netns: Some(label),
            source,
        })?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(l) => Ok(l),
            Err(e) if errno_is(&e, libc::ENODEV) => Ok(None),
            Err(e) => Err(req(format!("looking up interface {name}"))(e)),
        }
    }

    pub async fn link_by_index(&self, index: u32) -> Result<Option<LinkMessage>> {
        let mut links = self.handle.link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(l) => Ok(l),
            Err(e) if errno_is(&e, libc::ENODEV) => Ok(None),
            Err(e) => Err(req(format!("looking up interface {index}"))(e)),
        }
    }

    /// Indices of every interface in the namespace.
    pub async fn link_indices(&self) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let mut links = self.handle.link().get().execute();
        while let Some(l) = links.try_next().await.map_err(req("listing interfaces"))? {
            out.push(l.header.index);
        }
        Ok(out)
    }

    pub async fn link_index(&self, name: &str) -> Result<u32> {
        self.link_by_name(name)
            .await?
            .map(|l| l.header.index)
            .ok_or_else(|| NetlinkError::NoSuchLink { name: name.into() })
    }

    /// Creates a veth pair: `host_name` here, `peer_name` directly inside `peer_netns`
    /// (so the pod-side name never collides with anything in this namespace).
    pub async fn add_veth_into(
        &self,
        host_name: &str,
        peer_name: &str,
        peer_netns: &File,
        mtu: u32,
    ) -> Result<()> {
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer_name.to_string())
            .mtu(mtu)
            .setns_by_fd(peer_netns.as_raw_fd())
            .build();
        let msg = LinkVeth::new(host_name, peer_name)
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(req(format!("creating veth {host_name} <-> {peer_name}")))
    }

    pub async fn del_link(&self, name: &str) -> Result<bool> {
        let Some(link) = self.link_by_name(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(link.header.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno_is(&e, libc::ENODEV) => Ok(false),
            Err(e) => Err(req(format!("deleting interface {name}"))(e)),
        }
    }

    pub async fn set_up(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(req(format!("setting interface {index} up")))
    }

    pub async fn add_address(&self, index: u32, net: IpNet) -> Result<()> {
        match self
            .handle
            .address()
            .add(index, net.addr(), net.prefix_len())
            .execute()
            .await
        {
            Err(e) if errno_is(&e, libc::EEXIST) => Ok(()),
            r => r.map_err(req(format!("adding address {net} to interface {index}"))),
        }
    }

    /// `dst` directly reachable on interface `index` (scope link), replacing any route.
    pub async fn replace_link_route(&self, dst: IpNet, index: u32) -> Result<()> {
        let msg = match dst {
            IpNet::V4(n) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(n.addr(), n.prefix_len())
                .output_interface(index)
                .scope(RouteScope::Link)
                .protocol(RouteProtocol::Static)
                .build(),
            IpNet::V6(n) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(n.addr(), n.prefix_len())
                .output_interface(index)
                .scope(RouteScope::Link)
                .protocol(RouteProtocol::Static)
                .build(),
        };
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(req(format!("adding route {dst} dev {index}")))
    }

    /// `dst` via `gateway` on interface `index`, the gateway on-link.
    pub async fn replace_gateway_route(
        &self,
        dst: IpNet,
        gateway: IpAddr,
        index: u32,
    ) -> Result<()> {
        let msg = match (dst, gateway) {
            (IpNet::V4(n), IpAddr::V4(gw)) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(n.addr(), n.prefix_len())
                .gateway(gw)
                .output_interface(index)
                .onlink()
                .protocol(RouteProtocol::Static)
                .build(),
            (IpNet::V6(n), IpAddr::V6(gw)) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(n.addr(), n.prefix_len())
                .gateway(gw)
                .output_interface(index)
                .onlink()
                .protocol(RouteProtocol::Static)
                .build(),
            _ => {
                return Err(NetlinkError::Request {
                    action: format!("route {dst} via {gateway}: address families differ"),
                    source: rtnetlink::Error::RequestFailed,
                });
            }
        };
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(req(format!("adding route {dst} via {gateway} dev {index}")))
    }

    pub async fn del_route(&self, dst: IpNet) -> Result<()> {
        let msg = match dst {
            IpNet::V4(n) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(n.addr(), n.prefix_len())
                .build(),
            IpNet::V6(n) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(n.addr(), n.prefix_len())
                .build(),
        };
        match self.handle.route().del(msg).execute().await {
            Err(e) if errno_is(&e, libc::ESRCH) => Ok(()),
            r => r.map_err(req(format!("deleting route {dst}"))),
        }
    }

    /// A route of weir's own (protocol [`ROUTE_PROTOCOL`]): `dst` via `gateway` on `index`,
    /// directly on `index` when there is no gateway, or a blackhole when `index` is None.
    pub async fn replace_owned_route(
        &self,
        dst: IpNet,
        gateway: Option<IpAddr>,
        index: Option<u32>,
    ) -> Result<()> {
        use rtnetlink::packet_route::route::RouteType;
        let family_mismatch = || NetlinkError::Request {
            action: format!("route {dst}: the gateway is of another address family"),
            source: rtnetlink::Error::RequestFailed,
        };
        let msg = match dst {
            IpNet::V4(n) => {
                let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(n.addr(), n.prefix_len())
                    .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
                match (gateway, index) {
                    (Some(IpAddr::V4(gw)), Some(i)) => b = b.gateway(gw).output_interface(i),
                    (None, Some(i)) => b = b.output_interface(i).scope(RouteScope::Link),
                    (_, None) => b = b.kind(RouteType::BlackHole),
                    (Some(IpAddr::V6(_)), Some(_)) => return Err(family_mismatch()),
                }
                b.build()
            }
            IpNet::V6(n) => {
                let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(n.addr(), n.prefix_len())
                    .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
                match (gateway, index) {
                    (Some(IpAddr::V6(gw)), Some(i)) => b = b.gateway(gw).output_interface(i),
                    (None, Some(i)) => b = b.output_interface(i).scope(RouteScope::Link),
                    (_, None) => b = b.kind(RouteType::BlackHole),
                    (Some(IpAddr::V4(_)), Some(_)) => return Err(family_mismatch()),
                }
                b.build()
            }
        };
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(req(format!("adding route {dst}")))
    }

    /// Destinations of every route (IPv4 and IPv6) carrying weir's protocol number.
    pub async fn owned_routes(&self) -> Result<Vec<IpNet>> {
        use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
        let mut out = Vec::new();
        for query in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut routes = self.handle.route().get(query).execute();
            while let Some(r) = routes.try_next().await.map_err(req("listing routes"))? {
                if r.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) {
                    continue;
                }
                for a in &r.attributes {
                    let ip = match a {
                        RouteAttribute::Destination(RouteAddress::Inet(ip)) => IpAddr::V4(*ip),
                        RouteAttribute::Destination(RouteAddress::Inet6(ip)) => IpAddr::V6(*ip),
                        _ => continue,
                    };
                    if let Ok(n) = IpNet::new(ip, r.header.destination_prefix_length) {
                        out.push(n);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Creates the VXLAN device in collect-metadata ("external") mode if it is missing, with
    /// the shared tunnel MAC, no ARP, the given MTU, up. Returns its index.
    pub async fn ensure_vxlan(&self, name: &str, port: u16, mtu: u32, mac: [u8; 6]) -> Result<u32> {
        if self.link_by_name(name).await?.is_none() {
            let msg = rtnetlink::LinkVxlan::new(name, 0)
                .collect_metadata(true)
                .port(port)
                .learning(false)
                .mtu(mtu)
                .address(mac.to_vec())
                .arp(false)
                .build();
            // `new` sets a VNI; collect-metadata devices must not carry one.
            let msg = strip_vxlan_id(msg);
            self.handle
                .link()
                .add(msg)
                .execute()
                .await
                .map_err(req(format!("creating VXLAN device {name}")))?;
        }
        let index = self.link_index(name).await?;
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .mtu(mtu)
                    .address(mac.to_vec())
                    .arp(false)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(req(format!("configuring {name}")))?;
        Ok(index)
    }

    /// A permanent neighbour entry: no ARP/ND needed between pod and host.
    pub async fn replace_neighbour(&self, index: u32, ip: IpAddr, mac: [u8; 6]) -> Result<()> {
        self.handle
            .neighbours()
            .add(index, ip)
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(req(format!("adding neighbour {ip} on interface {index}")))
    }

    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNet>> {
        use rtnetlink::packet_route::address::AddressAttribute;
        let mut out = Vec::new();
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(req(format!("listing addresses of interface {index}")))?
        {
            for attr in &msg.attributes {
                if let AddressAttribute::Address(a) = attr
                    && let Ok(n) = IpNet::new(*a, msg.header.prefix_len)
                {
                    out.push(n);
                }
            }
        }
        Ok(out)
    }
}

/// Protocol number on the routes weir installs, so that it can find and remove its own
/// routes (and only those) after a restart.
pub const ROUTE_PROTOCOL: u8 = 0x77;

fn strip_vxlan_id(mut msg: LinkMessage) -> LinkMessage {
    use rtnetlink::packet_route::link::{InfoVxlan, LinkInfo};
    for attr in &mut msg.attributes {
        if let LinkAttribute::LinkInfo(infos) = attr {
            for info in infos.iter_mut() {
                if let LinkInfo::Data(InfoData::Vxlan(v)) = info {
                    v.retain(|i| !matches!(i, InfoVxlan::Id(_)));
                }
            }
        }
    }
    msg
}

/// The MAC address of a link message.
pub fn link_mac(link: &LinkMessage) -> Option<[u8; 6]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) if m.len() == 6 => {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(m);
            Some(mac)
        }
        _ => None,
    })
}

pub fn open_netns(path: &Path) -> Result<File> {
    File::open(path).map_err(|source| NetlinkError::Netns {
        path: path.display().to_string(),
        source,
    })
}

/// Runs `f` on a fresh thread that has joined the network namespace `ns`. Only that thread
/// switches; sockets created in `f` stay in `ns`.
pub fn in_namespace<T: Send + 'static>(
    ns: &File,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    let ns = ns.try_clone()?;
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        Ok(f())
    })
    .join()
    .map_err(|_| std::io::Error::other("namespace thread panicked"))?
}

/// Writes a sysctl under /proc/sys/net as seen from namespace `ns` (None: our own).
pub fn write_sysctl(ns: Option<&File>, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let write = {
        let path = path.clone();
        let value = value.to_string();
        move || std::fs::write(&path, value)
    };
    let r = match ns {
        Some(ns) => in_namespace(ns, write).and_then(|r| r),
        None => write(),
    };
    r.map_err(|source| NetlinkError::Sysctl { path, source })
}
