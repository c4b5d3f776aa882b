//! Masquerade for pod traffic that leaves the cluster: a connection from a pod to an address
//! outside the cluster's pod and node ranges leaves with the node's address, so the outside
//! (which has no route to pod addresses) can answer it.
//!
//! weir's programs do not translate these packets: `from_pod` checks egress policy on the
//! pod's own address and hands the packet to the host stack, which routes it out of the
//! node. The kernel's `masquerade` in a `nat` chain at the `postrouting` hook rewrites the
//! source there, and the kernel's conntrack rewrites the replies back before they are routed
//! to the pod's veth, where `to_pod` sees the pod's address again. So policy on both sides
//! sees the pod, and the translation needs no state of weir's own. (Services are the
//! opposite case: their translation happens on the redirect paths that bypass the host
//! stack, so it lives in the programs.)
//!
//! The agent owns one nftables table per family, [`TABLE`] (families `ip` and `ip6`), and
//! replaces them whole in one nf_tables transaction whenever the inputs change:
//!
//! ```text
//! table ip weir-masquerade {
//!     chain postrouting {
//!         type nat hook postrouting priority srcnat; policy accept;
//!         ip daddr 10.244.0.0/16 return        # every pod CIDR, node address and
//!         ip daddr 172.30.0.11 return          #   configured non-masquerade CIDR
//!         ip saddr 10.244.1.0/24 masquerade    # this node's pod CIDRs
//!     }
//! }
//! table ip6 weir-masquerade { ... the same for the IPv6 pod CIDRs ... }
//! ```
//!
//! The exempt prefixes are aggregated, and a nat chain is walked only by the first packet of
//! a connection (conntrack remembers the verdict), so the linear rule list costs nothing per
//! packet. The tables are programmed over netlink (`NETLINK_NETFILTER`, the same messages
//! `nft -f` sends), because the node image has no `nft` binary. IPv6 pod CIDRs are
//! masqueraded like IPv4 ones (they are usually unique local addresses the outside cannot
//! answer); pods with globally routed IPv6 addresses list `::/0` as a non-masquerade CIDR.

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, NLMSG_ERROR, NetlinkBuffer,
    NetlinkMessage,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterProtoFamily,
    nftables::{
        Bitwise, ChainAttribute, Cmp, DataAttribute, ExpressionAttribute, Expressions, Hook,
        Immediate, InetHookNumber, ListAttribute, NfTablesMessage, Operator, Payload, Register,
        RuleAttribute, RuleMessage, TableAttribute, TableMessage, Verdict, VerdictAttribute,
    },
    none::ControlMessage,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use thiserror::Error;
use weir_api::NodeRoute;

/// The nftables table weir owns (family `ip`).
pub const TABLE: &str = "weir-masquerade";
/// Its only chain.
pub const CHAIN: &str = "postrouting";
/// `srcnat`, the priority nft gives source NAT at `postrouting`
/// (<https://wiki.nftables.org/wiki-nftables/index.php/Netfilter_hooks#Priority_within_hook>).
const SRCNAT_PRIORITY: u32 = 100;
/// `NFNL_SUBSYS_NFTABLES` (`include/uapi/linux/netfilter/nfnetlink.h`): batches carry it in
/// the resource id of their begin and end messages.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `NFT_PAYLOAD_NETWORK_HEADER`: payload offsets count from the IP header.
const NETWORK_HEADER: u32 = 1;
/// Offsets of the IPv4 and IPv6 source and destination addresses.
const IPV4_SADDR: u32 = 12;
const IPV4_DADDR: u32 = 16;
const IPV6_SADDR: u32 = 8;
const IPV6_DADDR: u32 = 24;
/// `NF_ACCEPT`, the base chain's policy.
const POLICY_ACCEPT: u32 = 1;

#[derive(Debug, Error)]
pub enum MasqueradeError {
    #[error("opening a netfilter netlink socket")]
    Socket(#[source] io::Error),
    #[error("sending the nf_tables transaction")]
    Send(#[source] io::Error),
    #[error("reading the kernel's answer to the nf_tables transaction")]
    Receive(#[source] io::Error),
    #[error("the kernel refused {what} of table {TABLE}: {source}")]
    Refused {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What the agent is told on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MasqueradeConfig {
    /// Masquerade pod traffic to destinations outside the cluster (on by default).
    pub enabled: bool,
    /// Destinations never masqueraded, besides the cluster's pod CIDRs and node addresses
    /// (like ip-masq-agent's `nonMasqueradeCIDRs`: e.g. a peered network that routes pod
    /// addresses back).
    pub non_masquerade_cidrs: Vec<IpNet>,
}

impl Default for MasqueradeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            non_masquerade_cidrs: Vec::new(),
        }
    }
}

/// The tables' contents: whose traffic is masqueraded and which destinations are exempt,
/// both families together.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MasqueradePlan {
    /// This node's pod CIDRs.
    pub sources: Vec<IpNet>,
    /// Every pod CIDR and node address of the cluster and the configured non-masquerade
    /// CIDRs, aggregated per family.
    pub exempt: Vec<IpNet>,
}

impl MasqueradePlan {
    /// The part of the plan of one family (`ip` or `ip6`).
    fn family(&self, v6: bool) -> (Vec<IpNet>, Vec<IpNet>) {
        let of = |nets: &[IpNet]| -> Vec<IpNet> {
            nets.iter()
                .filter(|n| matches!(n, IpNet::V6(_)) == v6)
                .copied()
                .collect()
        };
        (of(&self.sources), of(&self.exempt))
    }
}

/// Computes the plan from the controller's route table. Pure: no I/O.
pub fn plan(
    routes: &BTreeMap<IpNet, NodeRoute>,
    me: &str,
    config: &MasqueradeConfig,
) -> MasqueradePlan {
    let sources: BTreeSet<IpNet> = routes
        .iter()
        .filter(|(_, route)| route.node == me)
        .map(|(cidr, _)| cidr.trunc())
        .collect();
    let exempt: Vec<IpNet> = routes
        .iter()
        .flat_map(|(cidr, route)| std::iter::once(*cidr).chain(route.addresses().map(IpNet::from)))
        .chain(config.non_masquerade_cidrs.iter().copied())
        .map(|net| net.trunc())
        .collect();
    MasqueradePlan {
        sources: sources.into_iter().collect(),
        exempt: IpNet::aggregate(&exempt),
    }
}

/// Makes the kernel's [`TABLE`]s (`ip` and `ip6`) exactly `plan`, in one transaction (so no
/// packet ever sees a half-written table). A family without sources has no table.
pub fn apply(plan: &MasqueradePlan) -> Result<(), MasqueradeError> {
    let mut batch = Batch::default();
    for v6 in [false, true] {
        let family = if v6 {
            NetfilterProtoFamily::IPv6
        } else {
            NetfilterProtoFamily::IPv4
        };
        let (sources, exempt) = plan.family(v6);
        // "add table; delete table; add table ...": the first add makes the delete succeed
        // whether or not the table exists, as `nft -f` scripts do.
        batch.push(family, new_table(), NLM_F_CREATE, "creating");
        batch.push(family, delete_table(), 0, "replacing");
        if sources.is_empty() {
            continue;
        }
        batch.push(family, new_table(), NLM_F_CREATE, "creating");
        batch.push(family, new_chain(), NLM_F_CREATE, "creating the chain");
        for net in exempt {
            batch.push(
                family,
                rule(
                    match_prefix(Field::Destination, net),
                    verdict(Verdict::Return),
                ),
                NLM_F_CREATE | NLM_F_APPEND,
                "adding an exemption rule",
            );
        }
        for net in sources {
            batch.push(
                family,
                rule(match_prefix(Field::Source, net), masquerade()),
                NLM_F_CREATE | NLM_F_APPEND,
                "adding a masquerade rule",
            );
        }
    }
    batch.commit()
}

/// Removes the [`TABLE`]s (nothing to do where they are absent).
pub fn remove() -> Result<(), MasqueradeError> {
    apply(&MasqueradePlan::default())
}

/// An nf_tables transaction: the messages between a batch begin and a batch end, each
/// asking for an acknowledgement so that the first refusal can be reported.
#[derive(Default)]
struct Batch {
    messages: Vec<(NetfilterProtoFamily, NfTablesMessage, u16, &'static str)>,
}

impl Batch {
    fn push(
        &mut self,
        family: NetfilterProtoFamily,
        message: NfTablesMessage,
        flags: u16,
        what: &'static str,
    ) {
        self.messages.push((family, message, flags, what));
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut emit = |mut message: NetlinkMessage<NetfilterMessage>, flags: u16, seq: u32| {
            message.header.flags = NLM_F_REQUEST | flags;
            message.header.sequence_number = seq;
            message.finalize();
            let start = out.len();
            out.resize(start + message.buffer_len(), 0);
            message.serialize(&mut out[start..]);
        };
        let control = |inner| {
            NetlinkMessage::from(NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
                inner,
            ))
        };
        emit(control(ControlMessage::BatchBegin), 0, 0);
        for (seq, (family, message, flags, _)) in (1..).zip(&self.messages) {
            let message = NetlinkMessage::from(NetfilterMessage::new(
                NetfilterHeader::new(*family, 0, 0),
                message.clone(),
            ));
            emit(message, NLM_F_ACK | flags, seq);
        }
        emit(
            control(ControlMessage::BatchEnd),
            0,
            u32::try_from(self.messages.len() + 1).unwrap_or(u32::MAX),
        );
        out
    }

    fn commit(&self) -> Result<(), MasqueradeError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(MasqueradeError::Socket)?;
        socket.bind_auto().map_err(MasqueradeError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(MasqueradeError::Socket)?;
        socket
            .send(&self.encode(), 0)
            .map_err(MasqueradeError::Send)?;
        // nfnetlink processes a batch synchronously in the sender's context: when send
        // returns, every acknowledgement and error is already queued on the socket.
        socket
            .set_non_blocking(true)
            .map_err(MasqueradeError::Receive)?;
        loop {
            let mut buf = vec![0u8; 64 * 1024];
            let len = match socket.recv(&mut &mut buf[..], 0) {
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(MasqueradeError::Receive(e)),
            };
            let mut rest = &buf[..len];
            while let Ok(message) = NetlinkBuffer::new_checked(rest) {
                let length = (message.length() as usize).max(16);
                if message.message_type() == NLMSG_ERROR
                    && let Some(code) = message.payload().get(..4)
                {
                    let code = i32::from_ne_bytes([code[0], code[1], code[2], code[3]]);
                    if code != 0 {
                        let seq = message.sequence_number() as usize;
                        let what = self
                            .messages
                            .get(seq.wrapping_sub(1))
                            .map_or("a message", |(_, _, _, what)| *what);
                        return Err(MasqueradeError::Refused {
                            what,
                            source: io::Error::from_raw_os_error(-code),
                        });
                    }
                }
                rest = rest.get(length.next_multiple_of(4)..).unwrap_or_default();
            }
        }
    }
}

fn new_table() -> NfTablesMessage {
    NfTablesMessage::NewTable(TableMessage {
        attributes: vec![TableAttribute::Name(TABLE.to_owned())],
    })
}

fn delete_table() -> NfTablesMessage {
    NfTablesMessage::DeleteTable(TableMessage {
        attributes: vec![TableAttribute::Name(TABLE.to_owned())],
    })
}

fn new_chain() -> NfTablesMessage {
    NfTablesMessage::NewChain(netlink_packet_netfilter::nftables::ChainMessage {
        attributes: vec![
            ChainAttribute::Table(TABLE.to_owned()),
            ChainAttribute::Name(CHAIN.to_owned()),
            ChainAttribute::Type("nat".to_owned()),
            ChainAttribute::Hook(vec![
                Hook::Number(InetHookNumber::PostRouting.into()),
                Hook::Priority(SRCNAT_PRIORITY),
            ]),
            ChainAttribute::Policy(POLICY_ACCEPT),
        ],
    })
}

fn rule(
    matching: Vec<ListAttribute<ExpressionAttribute>>,
    action: ListAttribute<ExpressionAttribute>,
) -> NfTablesMessage {
    let mut expressions = matching;
    expressions.push(action);
    NfTablesMessage::NewRule(RuleMessage {
        attributes: vec![
            RuleAttribute::Table(TABLE.to_owned()),
            RuleAttribute::Chain(CHAIN.to_owned()),
            RuleAttribute::Expressions(expressions),
        ],
    })
}

/// Which address a rule matches.
#[derive(Clone, Copy)]
enum Field {
    Source,
    Destination,
}

/// `ip saddr|daddr <net>` (or `ip6 …`): load the address, mask it, compare with the network.
fn match_prefix(field: Field, net: IpNet) -> Vec<ListAttribute<ExpressionAttribute>> {
    let (offset, len, mask, network) = match (field, net) {
        (Field::Source, IpNet::V4(n)) => (
            IPV4_SADDR,
            4,
            n.netmask().octets().to_vec(),
            n.network().octets().to_vec(),
        ),
        (Field::Destination, IpNet::V4(n)) => (
            IPV4_DADDR,
            4,
            n.netmask().octets().to_vec(),
            n.network().octets().to_vec(),
        ),
        (Field::Source, IpNet::V6(n)) => (
            IPV6_SADDR,
            16,
            n.netmask().octets().to_vec(),
            n.network().octets().to_vec(),
        ),
        (Field::Destination, IpNet::V6(n)) => (
            IPV6_DADDR,
            16,
            n.netmask().octets().to_vec(),
            n.network().octets().to_vec(),
        ),
    };
    vec![
        Expressions::Payload(vec![
            Payload::DestinationRegister(Register::Reg1),
            Payload::Base(NETWORK_HEADER),
            Payload::Offset(offset),
            Payload::Len(len),
        ])
        .into(),
        Expressions::Bitwise(vec![
            Bitwise::SourceRegister(Register::Reg1),
            Bitwise::DestinationRegister(Register::Reg1),
            Bitwise::Length(len),
            Bitwise::Mask(DataAttribute::Value(mask)),
            Bitwise::Xor(DataAttribute::Value(vec![0; len as usize])),
        ])
        .into(),
        Expressions::Cmp(vec![
            Cmp::SourceRegister(Register::Reg1),
            Cmp::Op(Operator::Equal),
            Cmp::Data(DataAttribute::Value(network)),
        ])
        .into(),
    ]
}

fn verdict(code: Verdict) -> ListAttribute<ExpressionAttribute> {
    Expressions::Immediate(vec![
        Immediate::DestinationRegister(Register::Verdict),
        Immediate::Data(DataAttribute::Verdict(vec![VerdictAttribute::Code(code)])),
    ])
    .into()
}

/// `masquerade`: the kernel's `nft_masq` takes no attributes for the plain form.
fn masquerade() -> ListAttribute<ExpressionAttribute> {
    Expressions::Other {
        expression_type: "masq".to_owned(),
        attributes: Vec::new(),
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> BTreeMap<IpNet, NodeRoute> {
        [
            ("10.244.1.0/24", "n1", "172.30.1.11"),
            ("10.244.2.0/24", "n2", "172.30.2.12"),
            ("10.244.3.0/24", "n3", "172.30.1.13"),
            ("fd00:10:244:1::/64", "n1", "172.30.1.11"),
        ]
        .into_iter()
        .map(|(cidr, node, ip)| {
            (
                cidr.parse().expect("cidr"),
                NodeRoute::new(node, ip.parse().expect("ip")),
            )
        })
        .collect()
    }

    fn nets(texts: &[&str]) -> Vec<IpNet> {
        texts.iter().map(|t| t.parse().expect("net")).collect()
    }

    #[test]
    fn own_pod_cidrs_are_masqueraded_except_towards_pods_nodes_and_configured_ranges() {
        let config = MasqueradeConfig {
            enabled: true,
            non_masquerade_cidrs: vec![
                "192.168.7.9/16".parse().expect("net"),
                "fd00::/8".parse().expect("net"),
            ],
        };
        let plan = plan(&routes(), "n1", &config);
        assert_eq!(plan.sources, nets(&["10.244.1.0/24", "fd00:10:244:1::/64"]));
        assert_eq!(
            plan.exempt,
            nets(&[
                "10.244.1.0/24",
                "10.244.2.0/23",
                "172.30.1.11/32",
                "172.30.1.13/32",
                "172.30.2.12/32",
                "192.168.0.0/16",
                "fd00::/8",
            ]),
            "pod CIDRs and node addresses aggregated per family, host bits dropped"
        );
        assert_eq!(
            plan.family(true),
            (nets(&["fd00:10:244:1::/64"]), nets(&["fd00::/8"]))
        );
    }

    #[test]
    fn ipv4_addresses_of_nodes_known_by_ipv6_are_exempt() {
        // An IPv6 underlay: nodes reach each other at IPv6 addresses, but pods still answer
        // the nodes' IPv4 addresses (a node's own connections to remote pods come from it).
        let routes: BTreeMap<IpNet, NodeRoute> = [
            ("10.244.1.0/24", "n1", "fd00:172:30::11", "172.30.0.11"),
            ("10.244.2.0/24", "n2", "fd00:172:30::12", "172.30.0.12"),
        ]
        .into_iter()
        .map(|(cidr, node, ip, v4)| {
            let mut route = NodeRoute::new(node, ip.parse().expect("ip"));
            route.other_ips.push(v4.parse().expect("ip"));
            (cidr.parse().expect("cidr"), route)
        })
        .collect();
        let plan = plan(&routes, "n1", &MasqueradeConfig::default());
        assert_eq!(
            plan.exempt,
            nets(&[
                "10.244.1.0/24",
                "10.244.2.0/24",
                "172.30.0.11/32",
                "172.30.0.12/32",
                "fd00:172:30::11/128",
                "fd00:172:30::12/128",
            ])
        );
    }

    #[test]
    fn a_node_without_a_pod_cidr_masquerades_nothing() {
        let plan = plan(&routes(), "n9", &MasqueradeConfig::default());
        assert!(plan.sources.is_empty());
    }

    #[test]
    fn the_transaction_is_framed_by_a_batch_and_every_message_asks_for_an_ack() {
        let mut batch = Batch::default();
        batch.push(
            NetfilterProtoFamily::IPv4,
            new_table(),
            NLM_F_CREATE,
            "creating",
        );
        batch.push(
            NetfilterProtoFamily::IPv4,
            rule(
                match_prefix(Field::Source, "10.244.1.0/24".parse().expect("net")),
                masquerade(),
            ),
            NLM_F_CREATE | NLM_F_APPEND,
            "rule",
        );
        let bytes = batch.encode();
        let mut headers = Vec::new();
        let mut rest = &bytes[..];
        while let Ok(message) = NetlinkBuffer::new_checked(rest) {
            headers.push((
                message.message_type(),
                message.flags(),
                message.sequence_number(),
            ));
            rest = &rest[(message.length() as usize).next_multiple_of(4)..];
        }
        // NFNL_MSG_BATCH_BEGIN/END are 16/17; nf_tables messages are (10 << 8) | NFT_MSG_*.
        assert_eq!(headers.len(), 4);
        assert_eq!(headers[0], (16, NLM_F_REQUEST, 0));
        assert_eq!(
            headers[1],
            (10 << 8, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE, 1)
        );
        assert_eq!(
            headers[2],
            (
                (10 << 8) | 6,
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND,
                2
            )
        );
        assert_eq!(headers[3], (17, NLM_F_REQUEST, 3));
        let masq = b"masq\0";
        assert!(
            bytes.windows(masq.len()).any(|w| w == masq),
            "the rule names the masq expression"
        );
    }

    /// Runs `work` on a thread in a fresh network namespace of its own (needs root).
    fn in_new_netns<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test programs nf_tables in a new network namespace and needs root"
        );
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            work()
        })
        .join()
        .expect("thread")
    }

    /// Whether the kernel has the table, asked with NFT_MSG_GETTABLE (outside a batch: a
    /// batch takes only changes).
    fn table_exists() -> bool {
        let mut message = NetlinkMessage::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
            NfTablesMessage::GetTable(TableMessage {
                attributes: vec![TableAttribute::Name(TABLE.to_owned())],
            }),
        ));
        message.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        message.header.sequence_number = 1;
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        let mut socket = Socket::new(NETLINK_NETFILTER).expect("socket");
        socket.bind_auto().expect("bind");
        socket.connect(&SocketAddr::new(0, 0)).expect("connect");
        socket.send(&bytes, 0).expect("send");
        let mut buf = vec![0u8; 64 * 1024];
        let len = socket.recv(&mut &mut buf[..], 0).expect("recv");
        let reply = NetlinkBuffer::new_checked(&buf[..len]).expect("reply");
        // A table comes back as NFT_MSG_NEWTABLE; a missing one as an error (ENOENT).
        reply.message_type() != NLMSG_ERROR
    }

    #[test]
    fn the_kernel_accepts_the_table_replaces_it_and_removes_it() {
        in_new_netns(|| {
            assert!(!table_exists(), "a new namespace has no table");
            let plan = plan(&routes(), "n1", &MasqueradeConfig::default());
            apply(&plan).expect("first write");
            assert!(table_exists());
            apply(&plan).expect("replacing the table");
            remove().expect("removing");
            assert!(!table_exists());
            remove().expect("removing an absent table");
        });
    }
}
