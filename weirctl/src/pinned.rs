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
use ipnet::IpNet;
use weir_agent::{
    dataplane::{PinLayout, open_pinned_map},
    maps::{trie_net, verdict_entry, verdict_match},
};
use weir_api::{EndpointPolicy, VerdictEntry, VerdictMatch};
use weir_common::{
    endpoint::{EndpointInfo, HostAddr},
    ip::IpKey,
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
