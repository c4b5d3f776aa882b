//! Typed access to the dataplane maps, and the translation of the controller's
//! [`NodeState`] into map entries.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
};

use aya::maps::{
    Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuHashMap, lpm_trie::Key,
};
use ipnet::IpNet;
use thiserror::Error;
use weir_api::{Action, NodeState, NodeStateDiff, VerdictEntry, VerdictMatch};
use weir_common::{
    config::NodeConfig,
    conntrack::{CtEntry, CtKey},
    endpoint::{EndpointInfo, HostAddr},
    event::DropReason,
    ip::{IpKey, trie_prefix_len},
    maps as names,
    policy::{PeerClass, Verdict, VerdictKey},
    route::RouteEntry,
};

use crate::dataplane::{Dataplane, DataplaneError};

#[derive(Debug, Error)]
pub enum MapsError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("map {map}: {action}")]
    Map {
        map: &'static str,
        action: String,
        #[source]
        source: Box<MapError>,
    },
}

pub type Result<T, E = MapsError> = std::result::Result<T, E>;

fn map_err(map: &'static str, action: impl Into<String>) -> impl FnOnce(MapError) -> MapsError {
    let action = action.into();
    move |source| MapsError::Map {
        map,
        action,
        source: Box::new(source),
    }
}

/// The LPM key of an address prefix.
pub fn prefix_key(net: &IpNet) -> Key<IpKey> {
    Key::new(
        trie_prefix_len(net.addr(), net.prefix_len()),
        IpKey::from(net.network()),
    )
}

/// The LPM key of a verdict match.
pub fn verdict_key(m: &VerdictMatch) -> Key<VerdictKey> {
    let (prefix, proto, port) = match (m.proto, m.ports) {
        (None, _) => (VerdictKey::PREFIX_ANY_PROTO, 0, 0),
        (Some(p), None) => (VerdictKey::PREFIX_ANY_PORT, p, 0),
        (Some(p), Some(ports)) => (
            VerdictKey::PREFIX_PORT_BASE + u32::from(ports.len),
            p,
            ports.port,
        ),
    };
    Key::new(prefix, VerdictKey::new(m.rule_set, m.class, proto, port))
}

pub fn verdict_value(v: &VerdictEntry) -> Verdict {
    match v.action {
        Action::Allow => Verdict::allow(v.rule),
        Action::Deny => Verdict::deny(v.rule),
    }
}

/// Handles to every map the agent writes or reads.
pub struct DataplaneMaps {
    pub endpoints: HashMap<MapData, IpKey, EndpointInfo>,
    pub host_addrs: HashMap<MapData, IpKey, HostAddr>,
    pub peer_classes: LpmTrie<MapData, IpKey, PeerClass>,
    pub verdicts: LpmTrie<MapData, VerdictKey, Verdict>,
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    pub routes: LpmTrie<MapData, IpKey, RouteEntry>,
    pub config: Array<MapData, NodeConfig>,
    pub drops: PerCpuArray<MapData, u64>,
    pub rule_hits: PerCpuHashMap<MapData, u32, u64>,
    pub policy_drops: PerCpuHashMap<MapData, u32, u64>,
}

macro_rules! take {
    ($dp:expr, $name:expr) => {
        $dp.take_map($name)?
            .try_into()
            .map_err(map_err($name, "opening"))?
    };
}

impl DataplaneMaps {
    pub fn take(dp: &mut Dataplane) -> Result<Self> {
        Ok(Self {
            endpoints: take!(dp, names::ENDPOINTS),
            host_addrs: take!(dp, names::HOST_ADDRS),
            peer_classes: take!(dp, names::PEER_CLASSES),
            verdicts: take!(dp, names::VERDICTS),
            conntrack: take!(dp, names::CONNTRACK),
            routes: take!(dp, names::ROUTES),
            config: take!(dp, names::NODE_CONFIG),
            drops: take!(dp, names::DROPS),
            rule_hits: take!(dp, names::RULE_HITS),
            policy_drops: take!(dp, names::POLICY_DROPS),
        })
    }

    pub fn config(&self) -> Result<NodeConfig> {
        self.config
            .get(&0, 0)
            .map_err(map_err(names::NODE_CONFIG, "reading"))
    }

    pub fn set_config(&mut self, c: NodeConfig) -> Result<()> {
        self.config
            .set(0, c, 0)
            .map_err(map_err(names::NODE_CONFIG, "writing"))
    }

    /// Makes every conntrack entry re-check policy on its next packet.
    pub fn bump_policy_generation(&mut self) -> Result<u32> {
        let mut c = self.config()?;
        let g = c.policy_gen().wrapping_add(1);
        c.set_policy_gen(g);
        self.set_config(c)?;
        Ok(g)
    }

    /// Makes the map hold exactly `desired` (a small map: compared in full).
    pub fn sync_endpoints(&mut self, desired: &BTreeMap<IpKey, EndpointInfo>) -> Result<()> {
        let current: Vec<IpKey> = self.endpoints.keys().filter_map(|k| k.ok()).collect();
        for (k, v) in desired {
            if self.endpoints.get(k, 0).ok().as_ref() != Some(v) {
                self.endpoints
                    .insert(k, v, 0)
                    .map_err(map_err(names::ENDPOINTS, format!("writing {k}")))?;
            }
        }
        for k in current {
            if !desired.contains_key(&k) {
                let _ = self.endpoints.remove(&k);
            }
        }
        Ok(())
    }

    pub fn sync_host_addrs(&mut self, addrs: &[IpAddr]) -> Result<()> {
        let desired: Vec<IpKey> = addrs.iter().map(|a| IpKey::from(*a)).collect();
        let current: Vec<IpKey> = self.host_addrs.keys().filter_map(|k| k.ok()).collect();
        for k in &desired {
            self.host_addrs
                .insert(k, HostAddr::new(), 0)
                .map_err(map_err(names::HOST_ADDRS, format!("writing {k}")))?;
        }
        for k in current {
            if !desired.contains(&k) {
                let _ = self.host_addrs.remove(&k);
            }
        }
        Ok(())
    }

    /// Applies a policy diff: additions before the endpoint changes that use them, removals
    /// after, so a packet never meets a rule set whose verdicts are half-written.
    pub fn apply_policy_diff(&mut self, diff: &NodeStateDiff) -> Result<()> {
        for (m, v) in &diff.verdicts.upsert {
            self.verdicts
                .insert(&verdict_key(m), verdict_value(v), 0)
                .map_err(map_err(names::VERDICTS, format!("writing {m:?}")))?;
        }
        for (net, class) in &diff.peer_classes.upsert {
            self.peer_classes
                .insert(&prefix_key(net), PeerClass::new(*class), 0)
                .map_err(map_err(names::PEER_CLASSES, format!("writing {net}")))?;
        }
        for net in &diff.peer_classes.remove {
            let _ = self.peer_classes.remove(&prefix_key(net));
        }
        for m in &diff.verdicts.remove {
            let _ = self.verdicts.remove(&verdict_key(m));
        }
        Ok(())
    }

    /// Makes the policy maps hold exactly `state`'s classes and verdicts, whatever they held
    /// before (a restarted agent does not know what its predecessor wrote).
    pub fn sync_policy(&mut self, state: &NodeState) -> Result<()> {
        let full = NodeState::default().diff(state, 0, 0);
        self.apply_policy_diff(&full)?;
        let wanted: HashSet<(u32, IpKey)> = state
            .peer_classes
            .keys()
            .map(|n| {
                let k = prefix_key(n);
                (k.prefix_len(), k.data())
            })
            .collect();
        let stray_classes: Vec<Key<IpKey>> = self
            .peer_classes
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !wanted.contains(&(k.prefix_len(), k.data())))
            .collect();
        for k in stray_classes {
            let _ = self.peer_classes.remove(&k);
        }
        let wanted: HashSet<(u32, VerdictKey)> = state
            .verdicts
            .keys()
            .map(|m| {
                let k = verdict_key(m);
                (k.prefix_len(), k.data())
            })
            .collect();
        let stray_verdicts: Vec<Key<VerdictKey>> = self
            .verdicts
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !wanted.contains(&(k.prefix_len(), k.data())))
            .collect();
        for k in stray_verdicts {
            let _ = self.verdicts.remove(&k);
        }
        Ok(())
    }

    /// Makes the route map hold exactly `desired` (remote pod CIDR → node).
    pub fn sync_routes(&mut self, desired: &BTreeMap<IpNet, RouteEntry>) -> Result<()> {
        let wanted: HashSet<(u32, IpKey)> = desired
            .keys()
            .map(|n| {
                let k = prefix_key(n);
                (k.prefix_len(), k.data())
            })
            .collect();
        for (net, entry) in desired {
            self.routes
                .insert(&prefix_key(net), *entry, 0)
                .map_err(map_err(names::ROUTES, format!("writing {net}")))?;
        }
        let stray: Vec<Key<IpKey>> = self
            .routes
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !wanted.contains(&(k.prefix_len(), k.data())))
            .collect();
        for k in stray {
            let _ = self.routes.remove(&k);
        }
        Ok(())
    }

    /// Per-reason drop counters, summed over CPUs.
    pub fn drop_counts(&self) -> Vec<(DropReason, u64)> {
        drop_counts(&self.drops)
    }

    /// Sum over CPUs of a per-CPU counter map.
    pub fn counter_totals(map: &PerCpuHashMap<MapData, u32, u64>) -> BTreeMap<u32, u64> {
        map.iter()
            .filter_map(|r| r.ok())
            .map(|(k, v)| (k, v.iter().sum()))
            .collect()
    }
}

/// Per-reason drop counters of a node, read from its pinned map (no agent needed).
pub fn pinned_drop_counts(pins: &crate::dataplane::PinLayout) -> Result<Vec<(DropReason, u64)>> {
    let data = crate::dataplane::open_pinned_map(pins, names::DROPS)?;
    let drops: PerCpuArray<MapData, u64> = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
        .map_err(map_err(names::DROPS, "opening"))?;
    Ok(drop_counts(&drops))
}

fn drop_counts(drops: &PerCpuArray<MapData, u64>) -> Vec<(DropReason, u64)> {
    DropReason::ALL
        .iter()
        .map(|r| {
            let n = drops
                .get(&(*r as u32), 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0);
            (*r, n)
        })
        .collect()
}
