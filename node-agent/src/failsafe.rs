//! Failsafe ports: what no `HostPolicy` can close, so a policy never locks an operator or the
//! node's own control plane out (`--failsafe-inbound`, `--failsafe-outbound`).
//!
//! Inbound entries are ports of the node: a new connection to one is let in whatever the
//! host policies say. Outbound entries are ports of remote hosts the node connects to: a
//! packet from one (the reply of such a connection, even one opened before a host policy
//! selected the node) is let in, and a new connection to one leaves whatever the node's
//! egress rules say. The agent adds its own ports: its HTTP endpoint (inbound) and the
//! tunnel's UDP port (both ways: the encapsulated traffic between nodes).

use std::{fmt, str::FromStr};

use weir_common::{endpoint::FailsafeKey, policy::proto};

/// SSH, DNS to the node, DHCP replies, the API server, etcd, kubelet, weir's controller.
pub const DEFAULT_INBOUND: &str =
    "tcp:22,udp:53,tcp:53,udp:68,tcp:6443,tcp:2379,tcp:2380,tcp:10250,tcp:7443";
/// DNS, DHCP, the API server, etcd, weir's controller.
pub const DEFAULT_OUTBOUND: &str = "udp:53,tcp:53,udp:67,tcp:6443,tcp:2379,tcp:2380,tcp:7443";

/// A list of `PROTOCOL:PORT` (tcp, udp or sctp), comma-separated; empty: none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ports(pub Vec<(u8, u16)>);

impl FromStr for Ports {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = Vec::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (p, port) = entry
                .split_once(':')
                .ok_or_else(|| format!("{entry:?}: expected PROTOCOL:PORT, e.g. tcp:22"))?;
            let protocol = match p.to_ascii_lowercase().as_str() {
                "tcp" => proto::TCP,
                "udp" => proto::UDP,
                "sctp" => proto::SCTP,
                other => {
                    return Err(format!(
                        "{entry:?}: protocol {other:?} is not tcp, udp or sctp"
                    ));
                }
            };
            let port: u16 = port
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{entry:?}: the port must be 1 to 65535"))?;
            out.push((protocol, port));
        }
        Ok(Self(out))
    }
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(p, port)| {
                let name = match *p {
                    proto::UDP => "udp",
                    proto::SCTP => "sctp",
                    _ => "tcp",
                };
                format!("{name}:{port}")
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// The `FAILSAFE` map's keys: `inbound` and `outbound`, plus the agent's own ports.
pub fn keys(
    inbound: &Ports,
    outbound: &Ports,
    own_inbound: &[(u8, u16)],
    own_outbound: &[(u8, u16)],
) -> Vec<FailsafeKey> {
    let mut keys: Vec<FailsafeKey> = inbound
        .0
        .iter()
        .chain(own_inbound)
        .map(|&(p, port)| FailsafeKey::new(p, port, true))
        .chain(
            outbound
                .0
                .iter()
                .chain(own_outbound)
                .map(|&(p, port)| FailsafeKey::new(p, port, false)),
        )
        .collect();
    keys.sort_by_key(|k| (k.inbound(), k.proto(), k.port()));
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_print_and_bad_entries_are_named() {
        let p: Ports = DEFAULT_INBOUND.parse().unwrap();
        assert_eq!(p.to_string(), DEFAULT_INBOUND);
        assert_eq!("".parse::<Ports>().unwrap(), Ports::default());
        assert_eq!(
            " SCTP:38412 , udp:53".parse::<Ports>().unwrap().0,
            vec![(proto::SCTP, 38412), (proto::UDP, 53)]
        );
        for bad in ["tcp", "icmp:1", "tcp:0", "tcp:65536", "tcp:ssh"] {
            let e = bad.parse::<Ports>().unwrap_err();
            assert!(e.starts_with(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn keys_hold_both_lists_and_the_agents_own_ports_once() {
        let keys = keys(
            &"tcp:22,udp:4789".parse().unwrap(),
            &"tcp:6443".parse().unwrap(),
            &[(proto::UDP, 4789), (proto::TCP, 9962)],
            &[(proto::UDP, 4789)],
        );
        assert_eq!(
            keys,
            vec![
                FailsafeKey::new(proto::TCP, 6443, false),
                FailsafeKey::new(proto::UDP, 4789, false),
                FailsafeKey::new(proto::TCP, 22, true),
                FailsafeKey::new(proto::TCP, 9962, true),
                FailsafeKey::new(proto::UDP, 4789, true),
            ]
        );
    }
}
