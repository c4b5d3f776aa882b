//! Map capacities: pinned maps found with another size than configured are created anew
//! with the configured size and keep their entries (as far as they fit).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::maps::MapInfo;
use weir_agent::{
    bpffs,
    dataplane::{Dataplane, PinLayout, Resized},
    maps::DataplaneMaps,
};
use weir_api::MapCapacities;
use weir_common::{
    capacity,
    conntrack::{CtEntry, CtKey},
    ip::IpKey,
    maps as names,
};

/// The pins of one test node, removed however the test ends.
struct Pins(PinLayout);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = self.0.remove_all();
    }
}

fn pins(test: &str) -> Pins {
    let bpffs = PathBuf::from("/sys/fs/bpf");
    assert!(
        bpffs::is_bpffs(&bpffs).unwrap_or(false),
        "/sys/fs/bpf must be a bpf file system: run the tests as root (cargo xtask test)"
    );
    let node = format!("cap-{test}-{}", std::process::id());
    let layout = PinLayout::new(&bpffs, &node);
    let _ = layout.remove_all();
    Pins(layout)
}

fn flow(i: u32) -> (CtKey, CtEntry) {
    let src = Ipv4Addr::from(0x0a00_0000 + i);
    let key = CtKey::new(
        IpKey::from(src),
        IpKey::from(Ipv4Addr::new(10, 244, 0, 5)),
        (1024 + (i % 60000) as u16).to_be(),
        80u16.to_be(),
        6,
    );
    (
        key,
        CtEntry::new(u64::from(i) + 1, 7, CtEntry::FLAG_REPLIED, i, 0),
    )
}

fn load(pins: &PinLayout, caps: &MapCapacities) -> (Dataplane, DataplaneMaps) {
    let mut dp = Dataplane::load_with(Some(pins.clone()), caps).expect("loading the programs");
    let maps = DataplaneMaps::take(&mut dp).expect("taking the maps");
    (dp, maps)
}

fn pinned_size(pins: &PinLayout, map: &str) -> u32 {
    MapInfo::from_pin(pins.maps_dir().join(map))
        .expect("the pinned map")
        .max_entries()
}

fn conntrack(conntrack: u32) -> MapCapacities {
    MapCapacities {
        conntrack,
        ..MapCapacities::default()
    }
}

#[test]
fn a_pinned_conntrack_table_of_another_size_is_recreated_and_keeps_its_flows() {
    let pins = pins("resize");
    let flows = 3000u32;
    {
        let (dp, mut maps) = load(&pins.0, &MapCapacities::default());
        assert!(dp.resized().is_empty(), "nothing pinned yet");
        for i in 0..flows {
            let (k, v) = flow(i);
            maps.conntrack.insert(k, v, 0).unwrap();
        }
        assert_eq!(maps.capacities.conntrack, capacity::CONNTRACK);
    }
    assert_eq!(pinned_size(&pins.0, names::CONNTRACK), capacity::CONNTRACK);

    // Restarted with a smaller table that still holds every flow.
    {
        let (dp, mut maps) = load(&pins.0, &conntrack(4096));
        assert_eq!(
            dp.resized(),
            [Resized {
                map: names::CONNTRACK,
                from: capacity::CONNTRACK,
                to: 4096
            }]
        );
        let carried = maps.carry_over_resized(&pins.0);
        assert_eq!(carried.len(), 1);
        assert_eq!(carried[0].0, names::CONNTRACK);
        let c = carried[0].1.as_ref().unwrap();
        assert_eq!((c.copied, c.left_out), (flows as usize, 0), "{c}");
        assert_eq!(maps.capacities.conntrack, 4096, "what the kernel holds");
        for i in 0..flows {
            let (k, v) = flow(i);
            assert_eq!(maps.conntrack.get(&k, 0).unwrap(), v, "flow {i}");
        }
        assert!(!pins.0.resized_dir().exists(), "the old map's pin is gone");
    }
    assert_eq!(pinned_size(&pins.0, names::CONNTRACK), 4096);
    // Every other table kept its map (and size).
    assert_eq!(pinned_size(&pins.0, names::VERDICTS), capacity::VERDICTS);

    // Restarted with a table too small for them: what fits is kept, the rest counted.
    {
        let (dp, mut maps) = load(&pins.0, &conntrack(2048));
        assert_eq!(dp.resized().len(), 1);
        let carried = maps.carry_over_resized(&pins.0);
        let c = carried[0].1.as_ref().unwrap();
        assert_eq!((c.copied, c.left_out), (2048, flows as usize - 2048), "{c}");
        assert_eq!(c.first_error, None, "room, not errors");
        assert_eq!(maps.conntrack.keys().count(), 2048);
    }
    // The same size again: the pinned map is reused as it is.
    let (dp, maps) = load(&pins.0, &conntrack(2048));
    assert!(dp.resized().is_empty());
    assert_eq!(maps.conntrack.keys().count(), 2048);
}

/// An agent that stopped after setting a map aside and before copying it: the next one
/// copies it (keeping what the new map already holds), whatever it is configured with.
#[test]
fn a_map_left_set_aside_is_copied_by_the_next_agent() {
    let pins = pins("leftover");
    {
        let (_, mut maps) = load(&pins.0, &MapCapacities::default());
        for i in 0..10 {
            let (k, v) = flow(i);
            maps.conntrack.insert(k, v, 0).unwrap();
        }
    }
    {
        // Resized, then "stopped" before the copy, after one flow was written anew.
        let (dp, mut maps) = load(&pins.0, &conntrack(4096));
        assert_eq!(dp.resized().len(), 1);
        let (k, mut v) = flow(3);
        v.set_last_seen_ns(999);
        maps.conntrack.insert(k, v, 0).unwrap();
    }
    assert!(pins.0.resized_dir().join(names::CONNTRACK).exists());
    let (dp, mut maps) = load(&pins.0, &conntrack(4096));
    assert!(dp.resized().is_empty());
    let carried = maps.carry_over_resized(&pins.0);
    let c = carried[0].1.as_ref().unwrap();
    assert_eq!((c.copied, c.present), (9, 1), "{c}");
    assert_eq!(
        maps.conntrack.get(&flow(3).0, 0).unwrap().last_seen_ns(),
        999,
        "the newer entry is kept"
    );
    assert!(!Path::new(&pins.0.resized_dir()).exists());
}
