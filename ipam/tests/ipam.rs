//! Behaviour of `weir_ipam::Ipam` through its public API, on real state directories.

use std::collections::HashSet;
use std::fs;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::thread;

use ipnet::IpNet;
use weir_ipam::{Allocation, Ipam, IpamError, Owner, PodRef};

fn net(text: &str) -> IpNet {
    text.parse().unwrap()
}

fn owner(container_id: &str) -> Owner {
    Owner {
        container_id: container_id.into(),
        ifname: "eth0".into(),
        pod: Some(PodRef {
            namespace: "default".into(),
            name: format!("pod-{container_id}"),
        }),
    }
}

fn addr(allocation: &Allocation) -> IpAddr {
    allocation.addresses[0].addr()
}

fn open(dir: &Path, pools: &[&str]) -> Ipam {
    let pools: Vec<IpNet> = pools.iter().map(|p| net(p)).collect();
    Ipam::open(dir, &pools).unwrap()
}

#[test]
fn first_allocation_skips_the_network_address() {
    let dir = tempfile::tempdir().unwrap();
    let ipam = open(dir.path(), &["10.244.1.0/24"]);
    let allocation = ipam.allocate(&owner("c1")).unwrap();
    assert_eq!(allocation.addresses, vec![net("10.244.1.1/24")]);
    assert_eq!(allocation.pod.as_ref().unwrap().name, "pod-c1");
}

#[test]
fn dual_stack_allocation_gets_one_address_per_pool() {
    let dir = tempfile::tempdir().unwrap();
    let ipam = open(dir.path(), &["10.244.1.0/24", "fd00:10:244:1::/64"]);
    let allocation = ipam.allocate(&owner("c1")).unwrap();
    assert_eq!(allocation.ipv4(), Some(net("10.244.1.1/24")));
    assert_eq!(allocation.ipv6(), Some(net("fd00:10:244:1::1/64")));
}

#[test]
fn allocate_is_idempotent_for_the_same_attachment() {
    let dir = tempfile::tempdir().unwrap();
    let ipam = open(dir.path(), &["10.0.0.0/24"]);
    let first = ipam.allocate(&owner("c1")).unwrap();
    let again = ipam.allocate(&owner("c1")).unwrap();
    assert_eq!(first, again);
    assert_eq!(ipam.allocations().len(), 1);
    let other_interface = ipam
        .allocate(&Owner {
            ifname: "net1".into(),
            ..owner("c1")
        })
        .unwrap();
    assert_ne!(addr(&first), addr(&other_interface));
}

#[test]
fn concurrent_allocations_are_distinct_and_persisted() {
    let dir = tempfile::tempdir().unwrap();
    let ipam = Arc::new(open(dir.path(), &["10.1.0.0/23", "fd00::/112"]));
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let ipam = Arc::clone(&ipam);
            thread::spawn(move || {
                (0..13)
                    .map(|i| ipam.allocate(&owner(&format!("t{t}-{i}"))).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let allocations: Vec<Allocation> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(allocations.len(), 208);
    let addresses: HashSet<IpAddr> = allocations
        .iter()
        .flat_map(|a| a.addresses.iter().map(IpNet::addr))
        .collect();
    assert_eq!(addresses.len(), 2 * 208, "every address is distinct");

    let in_memory = ipam.allocations();
    drop(ipam);
    let reopened = open(dir.path(), &["10.1.0.0/23", "fd00::/112"]);
    assert_eq!(reopened.allocations(), in_memory);
    assert_eq!(reopened.allocations().len(), 208);
}

#[test]
fn allocations_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (kept, released) = {
        let ipam = open(dir.path(), &["10.0.0.0/24"]);
        let kept = ipam.allocate(&owner("keep")).unwrap();
        let released = ipam.allocate(&owner("gone")).unwrap();
        ipam.release("gone", "eth0").unwrap();
        (kept, released)
    };
    let ipam = open(dir.path(), &["10.0.0.0/24"]);
    assert_eq!(ipam.get("keep", "eth0"), Some(kept.clone()));
    assert_eq!(ipam.get("gone", "eth0"), None);
    assert_eq!(ipam.allocations(), vec![kept]);
    // The round-robin position survives too: the next address follows the last one
    // handed out before the restart, not the released one.
    let next = ipam.allocate(&owner("new")).unwrap();
    assert_eq!(addr(&next), "10.0.0.3".parse::<IpAddr>().unwrap());
    assert_ne!(addr(&next), addr(&released));
}

#[test]
fn a_full_pool_is_exhausted_until_an_address_is_released() {
    let dir = tempfile::tempdir().unwrap();
    let ipam = open(dir.path(), &["192.168.7.0/29"]);
    let all: Vec<Allocation> = (0..6)
        .map(|i| ipam.allocate(&owner(&format!("c{i}"))).unwrap())
        .collect();
    let mut addresses: Vec<String> = all.iter().map(|a| addr(a).to_string()).collect();
    addresses.sort();
    assert_eq!(
        addresses,
        [
            "192.168.7.1",
            "192.168.7.2",
            "192.168.7.3",
            "192.168.7.4",
            "192.168.7.5",
            "192.168.7.6"
        ]
    );
    match ipam.allocate(&owner("one-too-many")) {
        Err(IpamError::Exhausted { pool }) => assert_eq!(pool, net("192.168.7.0/29")),
        other => panic!("expected Exhausted, got {other:?}"),
    }
    let released = ipam.release("c3", "eth0").unwrap().unwrap();
    let reused = ipam.allocate(&owner("one-too-many")).unwrap();
    assert_eq!(addr(&reused), addr(&released));
}

#[test]
fn exhaustion_of_one_pool_allocates_nothing_from_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let ipam = open(dir.path(), &["fd00::/64", "10.0.0.0/30"]);
    ipam.allocate(&owner("a")).unwrap();
    ipam.allocate(&owner("b")).unwrap();
    let error = ipam.allocate(&owner("c")).unwrap_err();
    assert!(matches!(error, IpamError::Exhausted { pool } if pool == net("10.0.0.0/30")));
    assert_eq!(ipam.allocations().len(), 2);
    // The IPv6 walk did not advance for the failed allocation.
    ipam.release("a", "eth0").unwrap();
    let c = ipam.allocate(&owner("c")).unwrap();
    assert_eq!(c.ipv6(), Some(net("fd00::3/64")));
}

#[test]
fn released_address_is_not_reused_immediately() {
    let dir = tempfile::tempdir().unwrap();
    let ipam = open(dir.path(), &["10.0.0.0/24"]);
    let first = ipam.allocate(&owner("c1")).unwrap();
    ipam.release("c1", "eth0").unwrap();
    let mut seen = HashSet::new();
    for i in 0..200 {
        let next = ipam.allocate(&owner(&format!("n{i}"))).unwrap();
        assert_ne!(addr(&next), addr(&first), "reused after {i} allocations");
        assert!(seen.insert(addr(&next)));
        ipam.release(&next.container_id, "eth0").unwrap();
    }
}

#[test]
fn broadcast_address_is_never_handed_out() {
    let dir = tempfile::tempdir().unwrap();
    let ipam = open(dir.path(), &["10.9.0.0/28"]);
    for round in 0..3 {
        for i in 0..14 {
            let allocation = ipam.allocate(&owner(&format!("r{round}-{i}"))).unwrap();
            let address = addr(&allocation);
            assert_ne!(address, "10.9.0.15".parse::<IpAddr>().unwrap());
            assert_ne!(address, "10.9.0.0".parse::<IpAddr>().unwrap());
        }
        assert!(ipam.allocate(&owner("overflow")).is_err());
        ipam.gc(&[]).unwrap();
    }
}

#[test]
fn release_of_unknown_attachment_is_none() {
    let dir = tempfile::tempdir().unwrap();
    let ipam = open(dir.path(), &["10.0.0.0/24"]);
    assert!(ipam.release("never", "eth0").unwrap().is_none());
    ipam.allocate(&owner("c1")).unwrap();
    assert!(ipam.release("c1", "eth0").unwrap().is_some());
    assert!(ipam.release("c1", "eth0").unwrap().is_none());
}

#[test]
fn gc_keeps_valid_attachments_and_releases_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let ipam = open(dir.path(), &["10.0.0.0/24"]);
    for id in ["a", "b", "c", "d"] {
        ipam.allocate(&owner(id)).unwrap();
    }
    let valid = vec![
        ("a".to_owned(), "eth0".to_owned()),
        ("c".to_owned(), "eth0".to_owned()),
        ("not-allocated".to_owned(), "eth0".to_owned()),
    ];
    let mut released: Vec<String> = ipam
        .gc(&valid)
        .unwrap()
        .into_iter()
        .map(|a| a.container_id)
        .collect();
    released.sort();
    assert_eq!(released, ["b", "d"]);
    let kept: Vec<String> = ipam
        .allocations()
        .into_iter()
        .map(|a| a.container_id)
        .collect();
    assert_eq!(kept, ["a", "c"]);
    assert!(ipam.gc(&valid).unwrap().is_empty());
    drop(ipam);
    let reopened = open(dir.path(), &["10.0.0.0/24"]);
    assert_eq!(reopened.allocations().len(), 2);
}

#[test]
fn second_open_of_the_same_state_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path(), &["10.0.0.0/24"]);
    let error = Ipam::open(dir.path(), &[net("10.0.0.0/24")]).unwrap_err();
    assert!(matches!(&error, IpamError::Locked { dir: d } if d == dir.path()));
    assert!(error.to_string().contains("another weir agent"), "{error}");
    drop(first);
    Ipam::open(dir.path(), &[net("10.0.0.0/24")]).expect("lock is released on drop");
}

#[test]
fn corrupt_state_file_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    {
        let ipam = open(dir.path(), &["10.0.0.0/24"]);
        ipam.allocate(&owner("c1")).unwrap();
    }
    let state_file = dir.path().join("allocations.json");
    for garbage in [&b"{\"format\": 1, \"allocations\": [tru"[..], b"", b"[]"] {
        fs::write(&state_file, garbage).unwrap();
        let error = Ipam::open(dir.path(), &[net("10.0.0.0/24")]).unwrap_err();
        assert!(
            matches!(&error, IpamError::CorruptState { path, .. } if *path == state_file),
            "{error:?}"
        );
        assert!(
            error
                .to_string()
                .contains(&state_file.display().to_string())
        );
    }
}

#[test]
fn state_with_a_duplicated_address_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let state = serde_json::json!({
        "format": 1,
        "pools": ["10.0.0.0/24"],
        "cursors": [],
        "allocations": [
            {"containerId": "a", "ifname": "eth0", "addresses": ["10.0.0.5/24"]},
            {"containerId": "b", "ifname": "eth0", "addresses": ["10.0.0.5/24"]}
        ]
    });
    fs::write(dir.path().join("allocations.json"), state.to_string()).unwrap();
    let error = Ipam::open(dir.path(), &[net("10.0.0.0/24")]).unwrap_err();
    assert!(matches!(error, IpamError::CorruptState { .. }), "{error:?}");
    assert!(error.to_string().contains("10.0.0.5"), "{error}");
}

#[test]
fn state_of_a_newer_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("allocations.json"),
        r#"{"format": 2, "whatever": true}"#,
    )
    .unwrap();
    let error = Ipam::open(dir.path(), &[net("10.0.0.0/24")]).unwrap_err();
    assert!(
        matches!(error, IpamError::UnsupportedFormat { format: 2, .. }),
        "{error:?}"
    );
}

#[test]
fn leftover_temp_files_from_a_crash_are_ignored_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let kept = {
        let ipam = open(dir.path(), &["10.0.0.0/24"]);
        ipam.allocate(&owner("c1")).unwrap()
    };
    // What a crash mid-write leaves: the temporary file (and that of older versions).
    for leftover in [".allocations.json.x7Yq2Z.tmp", "allocations.json.tmp"] {
        fs::write(dir.path().join(leftover), b"{half a wri").unwrap();
    }
    let ipam = open(dir.path(), &["10.0.0.0/24"]);
    assert_eq!(ipam.allocations(), vec![kept]);
    let mut names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["allocations.json", "lock"]);
    ipam.allocate(&owner("c2")).unwrap();
    drop(ipam);
    assert_eq!(open(dir.path(), &["10.0.0.0/24"]).allocations().len(), 2);
}

#[test]
fn changed_pools_keep_old_allocations_releasable_and_allocate_from_the_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let old = {
        let ipam = open(dir.path(), &["10.0.0.0/24"]);
        ipam.allocate(&owner("old")).unwrap()
    };
    let ipam = open(dir.path(), &["10.5.0.0/24"]);
    assert_eq!(ipam.get("old", "eth0"), Some(old.clone()));
    assert_eq!(ipam.stale_allocations(), vec![old.clone()]);
    let new = ipam.allocate(&owner("new")).unwrap();
    assert_eq!(new.addresses, vec![net("10.5.0.1/24")]);
    assert_eq!(ipam.release("old", "eth0").unwrap(), Some(old));
    assert!(ipam.stale_allocations().is_empty());
}

#[test]
fn grown_pool_does_not_hand_out_addresses_still_held() {
    let dir = tempfile::tempdir().unwrap();
    let held: Vec<IpAddr> = {
        let ipam = open(dir.path(), &["10.0.0.0/30"]);
        vec![
            addr(&ipam.allocate(&owner("a")).unwrap()),
            addr(&ipam.allocate(&owner("b")).unwrap()),
        ]
    };
    let ipam = open(dir.path(), &["10.0.0.0/29"]);
    for i in 0..4 {
        let allocation = ipam.allocate(&owner(&format!("n{i}"))).unwrap();
        assert!(!held.contains(&addr(&allocation)), "{allocation:?}");
    }
    assert!(matches!(
        ipam.allocate(&owner("full")),
        Err(IpamError::Exhausted { .. })
    ));
}

#[test]
fn invalid_pool_configurations_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        Ipam::open(dir.path(), &[]),
        Err(IpamError::NoPools)
    ));
    assert!(matches!(
        Ipam::open(dir.path(), &[net("10.0.0.0/31")]),
        Err(IpamError::PoolTooSmall { .. })
    ));
    assert!(matches!(
        Ipam::open(dir.path(), &[net("10.0.0.0/16"), net("10.0.3.0/24")]),
        Err(IpamError::OverlappingPools { .. })
    ));
}

#[test]
fn empty_owner_fields_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ipam = open(dir.path(), &["10.0.0.0/24"]);
    let error = ipam
        .allocate(&Owner {
            container_id: String::new(),
            ifname: "eth0".into(),
            pod: None,
        })
        .unwrap_err();
    assert!(matches!(error, IpamError::InvalidOwner { .. }));
    assert!(ipam.allocations().is_empty());
}

#[test]
fn state_dir_is_created_when_missing() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("var/lib/weir/ipam");
    let ipam = open(&nested, &["10.0.0.0/24"]);
    ipam.allocate(&owner("c1")).unwrap();
    assert!(nested.join("allocations.json").is_file());
    assert_eq!(ipam.state_file(), nested.join("allocations.json"));
}
