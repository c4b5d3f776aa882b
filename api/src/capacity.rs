//! The sizes of an agent's dataplane tables: configured per node (`--map-capacity`), reported
//! to the controller, which checks the node's compiled state against them.

use std::{fmt, str::FromStr};

use weir_common::{capacity, maps};

/// Smallest size a table may be configured to.
pub const MIN_CAPACITY: u32 = 1024;
/// Largest size a table may be configured to (2^24 entries: a preallocated hash map that
/// large already takes gigabytes of kernel memory).
pub const MAX_CAPACITY: u32 = 1 << 24;

/// Entries each configurable table holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MapCapacities {
    /// Local pods' addresses (`ENDPOINTS`).
    pub endpoints: u32,
    /// Peer classes of prefixes shorter than one address (`PEER_CLASSES`).
    pub peer_classes: u32,
    /// Peer classes of single addresses (`PEER_HOSTS`).
    pub peer_hosts: u32,
    /// Verdicts of port ranges, whole protocols and any protocol (`VERDICTS`).
    pub verdicts: u32,
    /// Verdicts of one port of one protocol (`VERDICTS_EXACT`).
    pub verdicts_exact: u32,
    /// Tracked flows (`CONNTRACK`).
    pub conntrack: u32,
    /// Service frontend and backend slots (`SERVICES`).
    pub services: u32,
    /// Translations of Service flows, two per flow (`SERVICE_NAT`).
    pub service_nat: u32,
    /// Routes to other nodes' pod CIDRs (`ROUTES`), and the nodes they lead to
    /// (`TUNNEL_PEERS`).
    pub routes: u32,
}

impl Default for MapCapacities {
    /// The compiled-in sizes (`weir_common::capacity`).
    fn default() -> Self {
        Self {
            endpoints: capacity::ENDPOINTS,
            peer_classes: capacity::PEER_CLASSES,
            peer_hosts: capacity::PEER_HOSTS,
            verdicts: capacity::VERDICTS,
            verdicts_exact: capacity::VERDICTS_EXACT,
            conntrack: capacity::CONNTRACK,
            services: capacity::SERVICES,
            service_nat: capacity::SERVICE_NAT,
            routes: capacity::ROUTES,
        }
    }
}

type Field = fn(&mut MapCapacities) -> &mut u32;

/// Every configurable table: its name in `--map-capacity` and in metrics, and its field.
const TABLES: &[(&str, Field)] = &[
    ("endpoints", |c| &mut c.endpoints),
    ("peer-classes", |c| &mut c.peer_classes),
    ("peer-hosts", |c| &mut c.peer_hosts),
    ("verdicts", |c| &mut c.verdicts),
    ("verdicts-exact", |c| &mut c.verdicts_exact),
    ("conntrack", |c| &mut c.conntrack),
    ("services", |c| &mut c.services),
    ("service-nat", |c| &mut c.service_nat),
    ("routes", |c| &mut c.routes),
];

/// Why a `--map-capacity` value was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CapacityError {
    #[error("{0:?} is not TABLE=ENTRIES")]
    Syntax(String),
    #[error("unknown table {name:?} (tables: {})", table_names().join(", "))]
    UnknownTable { name: String },
    #[error("table {0} is given twice")]
    Duplicate(String),
    #[error("table {table}: {value:?} is not a number of entries")]
    NotANumber { table: String, value: String },
    #[error("table {table}: {value} entries is out of range ({MIN_CAPACITY} to {MAX_CAPACITY})")]
    OutOfRange { table: String, value: u64 },
}

/// The names of the configurable tables.
pub fn table_names() -> Vec<&'static str> {
    TABLES.iter().map(|(n, _)| *n).collect()
}

impl MapCapacities {
    /// Every table, by name, with its size.
    pub fn tables(&self) -> Vec<(&'static str, u32)> {
        let mut c = *self;
        TABLES.iter().map(|(n, f)| (*n, *f(&mut c))).collect()
    }

    /// Every eBPF map these capacities size, by map name, with its size.
    pub fn maps(&self) -> [(&'static str, u32); 10] {
        [
            (maps::ENDPOINTS, self.endpoints),
            (maps::PEER_CLASSES, self.peer_classes),
            (maps::PEER_HOSTS, self.peer_hosts),
            (maps::VERDICTS, self.verdicts),
            (maps::VERDICTS_EXACT, self.verdicts_exact),
            (maps::CONNTRACK, self.conntrack),
            (maps::SERVICES, self.services),
            (maps::SERVICE_NAT, self.service_nat),
            (maps::ROUTES, self.routes),
            // A node has at least one pod CIDR: no more nodes than routes.
            (maps::TUNNEL_PEERS, self.routes),
        ]
    }

    /// The size of one map, if these capacities size it.
    pub fn of_map(&self, map: &str) -> Option<u32> {
        self.maps()
            .into_iter()
            .find(|(name, _)| *name == map)
            .map(|(_, n)| n)
    }
}

impl FromStr for MapCapacities {
    type Err = CapacityError;

    /// `TABLE=ENTRIES[,TABLE=ENTRIES…]`; tables not named keep their default size. An empty
    /// string is the defaults.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = Self::default();
        let mut seen: Vec<&str> = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (name, value) = item
                .split_once('=')
                .ok_or_else(|| CapacityError::Syntax(item.to_string()))?;
            let (name, value) = (name.trim(), value.trim());
            let (table, field) = TABLES.iter().find(|(n, _)| *n == name).ok_or_else(|| {
                CapacityError::UnknownTable {
                    name: name.to_string(),
                }
            })?;
            if seen.contains(table) {
                return Err(CapacityError::Duplicate(name.to_string()));
            }
            seen.push(table);
            let n: u64 = value
                .replace('_', "")
                .parse()
                .map_err(|_| CapacityError::NotANumber {
                    table: name.to_string(),
                    value: value.to_string(),
                })?;
            if !(u64::from(MIN_CAPACITY)..=u64::from(MAX_CAPACITY)).contains(&n) {
                return Err(CapacityError::OutOfRange {
                    table: name.to_string(),
                    value: n,
                });
            }
            *field(&mut out) = n as u32;
        }
        Ok(out)
    }
}

impl fmt::Display for MapCapacities {
    /// The `--map-capacity` form of every table.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self
            .tables()
            .into_iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        f.write_str(&items.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unnamed_tables_keep_their_default() {
        let c: MapCapacities = "conntrack=1000000, verdicts-exact=1_048_576"
            .parse()
            .unwrap();
        assert_eq!(c.conntrack, 1_000_000);
        assert_eq!(c.verdicts_exact, 1 << 20);
        assert_eq!(
            MapCapacities {
                conntrack: capacity::CONNTRACK,
                verdicts_exact: capacity::VERDICTS_EXACT,
                ..c
            },
            MapCapacities::default()
        );
        assert_eq!(
            "".parse::<MapCapacities>().unwrap(),
            MapCapacities::default()
        );
    }

    #[test]
    fn display_parses_back() {
        let c: MapCapacities = "routes=2048,services=4096".parse().unwrap();
        assert_eq!(c.to_string().parse::<MapCapacities>().unwrap(), c);
        assert_eq!(c.tables().len(), table_names().len());
    }

    #[test]
    fn routes_size_the_tunnel_peers_too() {
        let c: MapCapacities = "routes=2048".parse().unwrap();
        assert_eq!(c.of_map(maps::ROUTES), Some(2048));
        assert_eq!(c.of_map(maps::TUNNEL_PEERS), Some(2048));
        assert_eq!(c.of_map(maps::HOST_ADDRS), None);
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let err = |s: &str| s.parse::<MapCapacities>().unwrap_err().to_string();
        assert!(
            err("conntrack=0").contains("out of range (1024 to 16777216)"),
            "{}",
            err("conntrack=0")
        );
        assert!(err("conntrack=99999999999").contains("out of range"));
        assert!(err("conntrack=lots").contains("not a number"));
        assert!(err("contrack=4096").contains("unknown table \"contrack\""));
        assert!(
            err("contrack=4096").contains("conntrack"),
            "lists the tables"
        );
        assert!(err("conntrack").contains("TABLE=ENTRIES"));
        assert!(err("routes=2048,routes=4096").contains("given twice"));
        assert!(err("conntrack=-5").contains("not a number"));
    }
}
