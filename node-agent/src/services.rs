//! The controller's service table in the `SERVICES` map, and the clean-up of `SERVICE_NAT`
//! when backends go away.
//!
//! Writes are ordered so that a packet never meets a frontend whose count names a slot not
//! yet written: backend slots first, then the frontend; when a frontend shrinks or goes,
//! the frontend first, then the slots it no longer names.
//!
//! A NodePort with `externalTrafficPolicy: Local` names its Service port's ClusterIP
//! frontend in its slot 0 ([`ClusterFrontends`]): the programs pick from that one for
//! clients inside the cluster. ClusterIP frontends sort before NodePorts, so a diff writes
//! the named frontend first; one that is missing (removed first) sends the programs back to
//! the NodePort's own slots.

use std::collections::{BTreeMap, HashSet};

use weir_api::{BackendState, ClusterFrontends, ServiceEntry, ServiceFrontend, TableDiff};
use weir_common::{
    conntrack::CtKey,
    ip::IpKey,
    maps as names,
    service::{NatEntry, ServiceKey, ServiceValue},
};

use crate::maps::{DataplaneMaps, MapsError, Result};

/// Who translates Services on this node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServiceProxy {
    /// weir's programs (the default; kube-proxy must not run).
    #[default]
    Weir,
    /// kube-proxy (or another proxy in the host's netfilter): weir writes no Service and
    /// hands every packet to the host stack after policy, so the host sees both directions
    /// of every flow it translates.
    KubeProxy,
}

impl std::str::FromStr for ServiceProxy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "weir" => Ok(Self::Weir),
            "kube-proxy" => Ok(Self::KubeProxy),
            other => Err(format!(
                "unknown Service proxy {other:?} (weir or kube-proxy)"
            )),
        }
    }
}

/// Entries of `SERVICES` a table takes: each frontend and each of its usable backends.
pub fn service_slots(table: &BTreeMap<ServiceFrontend, ServiceEntry>) -> usize {
    table.values().map(|e| 1 + usable_backends(e).len()).sum()
}

/// Refuses a table that does not fit `SERVICES` (`capacity` entries), before anything is
/// written: half a table would send flows to frontends whose backends are missing.
fn fits(table: &BTreeMap<ServiceFrontend, ServiceEntry>, capacity: u32) -> Result<()> {
    let needed = service_slots(table);
    if needed > capacity as usize {
        return Err(MapsError::Capacity {
            map: names::SERVICES,
            needed,
            capacity,
        });
    }
    Ok(())
}

/// The slot-0 key of a frontend: its address, which for a node port on every address of
/// the node is that family's unspecified one (`0.0.0.0` IPv4-mapped, or `::`), so the two
/// node ports of a dual-stack Service keep apart.
pub fn frontend_key(f: &ServiceFrontend) -> ServiceKey {
    ServiceKey::new(IpKey::from(f.ip), f.port.to_be(), f.proto, 0)
}

/// The backends new flows may go to: the ready ones, or, when none is, the terminating ones
/// the controller listed as the fallback.
pub fn usable_backends(entry: &ServiceEntry) -> Vec<(IpKey, u16)> {
    let ready = entry
        .backends
        .iter()
        .any(|b| b.state == BackendState::Ready);
    entry
        .backends
        .iter()
        .filter(|b| !ready || b.state == BackendState::Ready)
        .map(|b| (IpKey::from(b.ip), b.port))
        .collect()
}

fn frontend_value(
    entry: &ServiceEntry,
    count: u32,
    cluster: Option<ServiceFrontend>,
) -> ServiceValue {
    let mut flags = 0;
    if entry.affinity_timeout_s.is_some() {
        flags |= ServiceValue::FLAG_AFFINITY;
    }
    if entry.masquerade_external {
        flags |= ServiceValue::FLAG_MASQUERADE_EXTERNAL;
    }
    let value = ServiceValue::frontend(
        entry.id,
        count,
        flags,
        entry.affinity_timeout_s.unwrap_or(0),
    );
    match cluster {
        Some(c) => value.with_cluster_frontend(IpKey::from(c.ip), c.port),
        None => value,
    }
}

fn write_err(f: &ServiceFrontend, source: aya::maps::MapError) -> MapsError {
    MapsError::Map {
        map: names::SERVICES,
        action: format!("writing {f:?}"),
        source: Box::new(source),
    }
}

impl DataplaneMaps {
    /// Number of backend slots the map holds for the frontend at `key` (0 if absent).
    fn written_count(&self, key: &ServiceKey) -> u32 {
        self.services.get(key, 0).map(|v| v.count()).unwrap_or(0)
    }

    fn write_frontend(
        &mut self,
        f: &ServiceFrontend,
        entry: &ServiceEntry,
        cluster: Option<ServiceFrontend>,
    ) -> Result<()> {
        let key = frontend_key(f);
        let old = self.written_count(&key);
        let backends = usable_backends(entry);
        for (i, (addr, port)) in backends.iter().enumerate() {
            let slot = key.with_slot(i as u32 + 1);
            self.services
                .insert(slot, ServiceValue::backend(entry.id, *addr, *port), 0)
                .map_err(|e| write_err(f, e))?;
        }
        let count = backends.len() as u32;
        self.services
            .insert(key, frontend_value(entry, count, cluster), 0)
            .map_err(|e| write_err(f, e))?;
        for slot in count + 1..=old {
            let _ = self.services.remove(&key.with_slot(slot));
        }
        Ok(())
    }

    fn remove_frontend(&mut self, f: &ServiceFrontend) {
        let key = frontend_key(f);
        let old = self.written_count(&key);
        let _ = self.services.remove(&key);
        for slot in 1..=old {
            let _ = self.services.remove(&key.with_slot(slot));
        }
    }

    /// Applies a service diff. `old` is the table before it (to find the flows of backends
    /// that went away).
    pub fn apply_service_diff(
        &mut self,
        diff: &TableDiff<ServiceFrontend, ServiceEntry>,
        old: &BTreeMap<ServiceFrontend, ServiceEntry>,
    ) -> Result<()> {
        let mut new = old.clone();
        diff.apply_to(&mut new);
        fits(&new, self.capacities.services)?;
        let (was, is) = (ClusterFrontends::new(old), ClusterFrontends::new(&new));
        for (f, entry) in &diff.upsert {
            self.write_frontend(f, entry, is.of(f, entry))?;
        }
        // NodePorts the diff leaves alone whose ClusterIP frontend came, went or changed.
        let upserted: HashSet<&ServiceFrontend> = diff.upsert.iter().map(|(f, _)| f).collect();
        for (f, entry) in &new {
            let before = old.get(f).and_then(|e| was.of(f, e));
            if !upserted.contains(f) && is.of(f, entry) != before {
                self.write_frontend(f, entry, is.of(f, entry))?;
            }
        }
        for f in &diff.remove {
            self.remove_frontend(f);
        }
        self.forget_lost_backends(old, &new);
        Ok(())
    }

    /// Makes `SERVICES` hold exactly `table`, whatever it held before.
    pub fn sync_services(&mut self, table: &BTreeMap<ServiceFrontend, ServiceEntry>) -> Result<()> {
        fits(table, self.capacities.services)?;
        let mut wanted: HashSet<ServiceKey> = HashSet::new();
        let cluster = ClusterFrontends::new(table);
        for (f, entry) in table {
            self.write_frontend(f, entry, cluster.of(f, entry))?;
            let key = frontend_key(f);
            wanted.insert(key);
            for slot in 1..=usable_backends(entry).len() as u32 {
                wanted.insert(key.with_slot(slot));
            }
        }
        let stray: Vec<ServiceKey> = self
            .services
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !wanted.contains(k))
            .collect();
        // Frontends before their slots.
        for k in stray.iter().filter(|k| k.slot() == 0) {
            let _ = self.services.remove(k);
        }
        for k in stray.iter().filter(|k| k.slot() != 0) {
            let _ = self.services.remove(k);
        }
        let all = BTreeMap::new();
        self.forget_lost_backends(&all, table);
        Ok(())
    }

    /// Removes the translations of flows whose backend is no longer one of its Service's
    /// backends, so their next packet picks a live one (a DNS client's UDP flow moves on
    /// instead of talking to a pod that is gone; a TCP flow gets a reset from the new
    /// backend instead of a silent timeout). With `old` empty every translation is checked.
    fn forget_lost_backends(
        &mut self,
        old: &BTreeMap<ServiceFrontend, ServiceEntry>,
        new: &BTreeMap<ServiceFrontend, ServiceEntry>,
    ) {
        let backends = |table: &BTreeMap<ServiceFrontend, ServiceEntry>| {
            table
                .values()
                .flat_map(|e| {
                    e.backends
                        .iter()
                        .map(move |b| (e.id, IpKey::from(b.ip), b.port))
                })
                .collect::<HashSet<(u32, IpKey, u16)>>()
        };
        let live = backends(new);
        if !old.is_empty() && backends(old).is_subset(&live) {
            return;
        }
        let stale: Vec<CtKey> = self
            .service_nat
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, v): &(CtKey, NatEntry)| {
                let service = v.service();
                if v.is_reply() {
                    // Reply direction (backend → client): the key names the backend.
                    !live.contains(&(service, *k.saddr(), k.sport()))
                } else {
                    // Original direction (client → frontend): the value is the backend.
                    !live.contains(&(service, *v.addr(), u16::from_be(v.port_be())))
                }
            })
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            let _ = self.service_nat.remove(&k);
        }
    }

    /// Frontends and backend slots in the `SERVICES` map.
    pub fn service_counts(&self) -> (u64, u64) {
        let (mut frontends, mut backends) = (0, 0);
        for k in self.services.keys().filter_map(|k| k.ok()) {
            if k.slot() == 0 {
                frontends += 1;
            } else {
                backends += 1;
            }
        }
        (frontends, backends)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use weir_api::FrontendKind;

    use super::*;

    fn frontend(kind: FrontendKind, ip: IpAddr) -> ServiceFrontend {
        ServiceFrontend {
            kind,
            ip,
            port: 30080,
            proto: 6,
        }
    }

    #[test]
    fn the_node_ports_of_a_dual_stack_service_have_a_key_each() {
        let v4 = frontend(FrontendKind::NodePort, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let v6 = frontend(FrontendKind::NodePort, IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        assert_ne!(frontend_key(&v4), frontend_key(&v6));
        assert_eq!(*frontend_key(&v4).addr(), IpKey::ANY_V4);
        assert_eq!(*frontend_key(&v6).addr(), IpKey::UNSPECIFIED);
        // What the programs look up for a packet to one of the node's addresses.
        let node_v4 = IpKey::from(IpAddr::V4("10.0.0.1".parse().unwrap()));
        let node_v6 = IpKey::from(IpAddr::V6("fd00::1".parse().unwrap()));
        assert_eq!(IpKey::any_like(&node_v4), *frontend_key(&v4).addr());
        assert_eq!(IpKey::any_like(&node_v6), *frontend_key(&v6).addr());
    }
}
