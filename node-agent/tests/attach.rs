//! Attaching to interfaces, on the real kernel: what a restarted agent leaves behind.

mod support;

use weir_agent::dataplane::Dataplane;
use weir_common::programs::FROM_NETWORK;

/// The cls_bpf filters on `ifname`'s ingress hook, one line each (`tc filter show`).
fn ingress_filters(ifname: &str) -> Vec<String> {
    let out = std::process::Command::new("tc")
        .args(["filter", "show", "dev", ifname, "ingress"])
        .output()
        .expect("running tc");
    assert!(out.status.success(), "tc filter show failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("direct-action"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn with_cls_bpf_a_restarted_agent_replaces_its_predecessors_filter() {
    support::private_netns();
    let _ = support::dummy_interface("uplink");
    let mut ids = Vec::new();
    // Three agents in turn, as restarts or upgrades would run them.
    for _ in 0..3 {
        let mut dp = Dataplane::load(None).expect("loading the programs");
        dp.force_netlink_attach();
        dp.attach_uplink("uplink").expect("attaching");
        let id = dp
            .program(FROM_NETWORK)
            .unwrap()
            .info()
            .expect("program info")
            .id();
        ids.push(id);
        let filters = ingress_filters("uplink");
        assert_eq!(
            filters.len(),
            1,
            "one filter, not one per agent: {filters:#?}"
        );
        assert!(
            filters[0].contains(&format!(" id {id} ")),
            "the newest agent's program runs: {filters:#?}"
        );
        // The agent exits; its filter stays with the qdisc.
        std::mem::forget(dp);
    }
    assert_eq!(
        ids.iter().collect::<std::collections::BTreeSet<_>>().len(),
        3
    );
}
