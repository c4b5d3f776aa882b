//! Fault tests, bounded: agents killed under traffic between policy-isolated pods on two
//! nodes. `cargo xtask chaos` runs the same scenarios longer and records the figures.

mod support;

use support::*;
use weir_localcluster::{Topology, chaos};

#[tokio::test(flavor = "multi_thread")]
async fn killing_agents_under_traffic_admits_nothing_policy_denies_and_keeps_flows() {
    let mut c = cluster(2, Topology::L2).await;
    let report = chaos::agent_kills(&mut c, 6).await.expect("scenario");
    eprintln!("{report}");
    assert_eq!(report.denied_admitted, 0, "{report}");
    assert!(
        report.denied_attempts > 0 && report.allowed_attempts > 0,
        "{report}"
    );
    assert!(!report.stream_broke, "{report}");
    assert_eq!(report.allowed_refused, 0, "{report}");
    assert_eq!(report.udp_lost, 0, "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_controller_while_policies_change_keeps_the_last_state_then_converges() {
    let mut c = cluster(2, Topology::Routed).await;
    let report = chaos::controller_kills(&mut c, 4).await.expect("scenario");
    eprintln!("{report}");
    assert_eq!(report.denied_admitted, 0, "{report}");
    assert!(report.denied_attempts > 0, "{report}");
    assert_eq!(report.kept_failures, 0, "{report}");
    assert!(report.kept_checks > 0, "{report}");
    assert!(!report.stream_broke, "{report}");
    assert_eq!(report.udp_lost, 0, "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_coming_and_going_across_agent_restarts_leak_nothing() {
    let mut c = cluster(1, Topology::L2).await;
    // A pod that stays, so that "nothing" is not the only state compared.
    pod(&mut c, "default", "stays", 0).await;
    let report = chaos::cni_cycles(&mut c, 40, 5).await.expect("scenario");
    eprintln!("{report}");
    assert_eq!(report.agent_restarts, 8, "{report}");
    assert_eq!(report.leaked_addresses, 0, "{report}");
    assert_eq!(report.leaked_veths, 0, "{report}");
    assert_eq!(report.leaked_endpoint_records, 0, "{report}");
    assert_eq!(report.leaked_dataplane_endpoints, 0, "{report}");
    let (addresses, veths, records, endpoints) = chaos::node_holdings(&c, 0).unwrap();
    // The pod that stays: its address, its veth (beside the node's own uplink veth), its
    // record and its dataplane endpoint.
    assert_eq!((addresses, veths, records, endpoints), (1, 2, 1, 1));
}
