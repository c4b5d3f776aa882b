//! The policy tables of a node as its dataplane holds them: read from the maps the agent
//! pinned under `<bpffs>/weir/<node>/v<ABI>/maps`, decoded into the types the controller
//! compiles (so `weir_api`'s emulation of the kernel lookup runs over exactly these entries).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

use anyhow::{Context, Result};
use aya::maps::{HashMap, LpmTrie, Map, MapData, lpm_trie::Key};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use weir_agent::dataplane::{PinLayout, open_pinned_map};
use weir_api::{Action, EndpointPolicy, PortPrefix, VerdictEntry, VerdictMatch};
use weir_common::{
    endpoint::{EndpointInfo, HostAddr},
    ip::{IpKey, V4_MAPPED_PREFIX},
    maps as names,
    policy::{PeerClass, Verdict, VerdictKey},
};

/// A node's endpoints and policy tables, as read from its maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PinnedTables {
    pub endpoints: BTreeMap<IpAddr, EndpointPolicy>,
    pub host_addrs: BTreeSet<IpAddr>,
    pub peer_classes: BTreeMap<IpNet, u32>,
    pub verdicts: BTreeMap<VerdictMatch, VerdictEntry>,
}

/// An address prefix from a key of the 128-bit trie (IPv4 stored IPv4-mapped).
pub fn trie_net(prefix_len: u32, data: IpKey) -> Option<IpNet> {
    let addr = IpAddr::from(data);
    match addr {
        IpAddr::V4(v4) if prefix_len >= V4_MAPPED_PREFIX => {
            Ipv4Net::new(v4, u8::try_from(prefix_len - V4_MAPPED_PREFIX).ok()?)
                .ok()
                .map(IpNet::V4)
        }
        IpAddr::V4(v4) => Ipv6Net::new(v4.to_ipv6_mapped(), u8::try_from(prefix_len).ok()?)
            .ok()
            .map(IpNet::V6),
        IpAddr::V6(v6) => Ipv6Net::new(v6, u8::try_from(prefix_len).ok()?)
            .ok()
            .map(IpNet::V6),
    }
}

/// The verdict match a key of `VERDICTS` (or, with [`VerdictKey::PREFIX_FULL`],
/// `VERDICTS_EXACT`) stands for.
pub fn verdict_match(prefix_len: u32, k: &VerdictKey) -> Option<VerdictMatch> {
    let (proto, ports) = match prefix_len {
        VerdictKey::PREFIX_ANY_PROTO => (None, None),
        VerdictKey::PREFIX_ANY_PORT => (Some(k.proto()), None),
        l if (VerdictKey::PREFIX_PORT_BASE..=VerdictKey::PREFIX_FULL).contains(&l) => {
            let len = u8::try_from(l - VerdictKey::PREFIX_PORT_BASE).ok()?;
            (Some(k.proto()), Some(PortPrefix::new(k.port(), len)?))
        }
        _ => return None,
    };
    Some(VerdictMatch {
        rule_set: k.policy(),
        class: k.class(),
        proto,
        ports,
    })
}

pub fn verdict_entry(v: &Verdict) -> VerdictEntry {
    VerdictEntry {
        action: if v.is_allow() {
            Action::Allow
        } else {
            Action::Deny
        },
        rule: v.rule(),
    }
}

fn open(pins: &PinLayout, name: &str) -> Result<MapData> {
    open_pinned_map(pins, name).with_context(|| format!("opening the pinned map {name}"))
}

/// Reads the node's tables. Fails if a map is missing (no agent ever ran on that node with
/// this layout version).
pub fn read(bpffs: &Path, node: &str) -> Result<PinnedTables> {
    let pins = PinLayout::new(bpffs, node);
    let mut t = PinnedTables::default();
    let endpoints: HashMap<MapData, IpKey, EndpointInfo> =
        HashMap::try_from(Map::HashMap(open(&pins, names::ENDPOINTS)?))?;
    for (k, v) in endpoints.iter().filter_map(|r| r.ok()) {
        t.endpoints.insert(
            k.into(),
            EndpointPolicy {
                ingress: v.ingress_policy(),
                egress: v.egress_policy(),
            },
        );
    }
    let hosts: HashMap<MapData, IpKey, HostAddr> =
        HashMap::try_from(Map::HashMap(open(&pins, names::HOST_ADDRS)?))?;
    t.host_addrs = hosts
        .keys()
        .filter_map(|k| k.ok())
        .map(IpAddr::from)
        .collect();
    let peer_hosts: HashMap<MapData, IpKey, PeerClass> =
        HashMap::try_from(Map::HashMap(open(&pins, names::PEER_HOSTS)?))?;
    for (k, v) in peer_hosts.iter().filter_map(|r| r.ok()) {
        t.peer_classes
            .insert(IpNet::from(IpAddr::from(k)), v.class());
    }
    let classes: LpmTrie<MapData, IpKey, PeerClass> =
        LpmTrie::try_from(Map::LpmTrie(open(&pins, names::PEER_CLASSES)?))?;
    for (k, v) in classes.iter().filter_map(|r| r.ok()) {
        if let Some(net) = trie_net(k.prefix_len(), k.data()) {
            t.peer_classes.insert(net, v.class());
        }
    }
    let exact: HashMap<MapData, VerdictKey, Verdict> =
        HashMap::try_from(Map::HashMap(open(&pins, names::VERDICTS_EXACT)?))?;
    for (k, v) in exact.iter().filter_map(|r| r.ok()) {
        if let Some(m) = verdict_match(VerdictKey::PREFIX_FULL, &k) {
            t.verdicts.insert(m, verdict_entry(&v));
        }
    }
    let verdicts: LpmTrie<MapData, VerdictKey, Verdict> =
        LpmTrie::try_from(Map::LpmTrie(open(&pins, names::VERDICTS)?))?;
    for (k, v) in verdicts.iter().filter_map(|r| r.ok()) {
        let k: Key<VerdictKey> = k;
        if let Some(m) = verdict_match(k.prefix_len(), &k.data()) {
            // An exact entry shadows the trie's (the kernel looks in the hash map first).
            t.verdicts.entry(m).or_insert_with(|| verdict_entry(&v));
        }
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_agent::maps::{prefix_key, verdict_key};

    #[test]
    fn keys_decode_to_what_the_agent_encoded() {
        for net in [
            "10.244.0.0/16",
            "0.0.0.0/0",
            "10.1.2.3/32",
            "2001:db8::/32",
            "::/0",
        ] {
            let net: IpNet = net.parse().unwrap();
            let k = prefix_key(&net);
            assert_eq!(trie_net(k.prefix_len(), k.data()), Some(net), "{net}");
        }
        for m in [
            VerdictMatch {
                rule_set: 3,
                class: 2,
                proto: None,
                ports: None,
            },
            VerdictMatch {
                rule_set: 3,
                class: 2,
                proto: Some(6),
                ports: None,
            },
            VerdictMatch {
                rule_set: 3,
                class: 2,
                proto: Some(17),
                ports: PortPrefix::new(1024, 6),
            },
            VerdictMatch {
                rule_set: 9,
                class: 0,
                proto: Some(132),
                ports: PortPrefix::new(80, 16),
            },
        ] {
            let k = verdict_key(&m);
            assert_eq!(verdict_match(k.prefix_len(), &k.data()), Some(m));
        }
        assert_eq!(verdict_match(65, &VerdictKey::new(1, 1, 6, 0)), None);
        let deny = verdict_entry(&Verdict::deny(7));
        assert_eq!(deny.action, Action::Deny);
        assert_eq!(deny.rule, 7);
    }
}
