//! Shared helpers for the agent's integration tests.
#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod packet;

use std::net::{Ipv4Addr, Ipv6Addr};

/// TC verdicts (`TC_ACT_*`).
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// The test node's two pods (A and B): their MACs, their gateway MACs and their addresses;
/// the node's address and its uplink's MAC.
pub const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
pub const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
pub const GW_A: [u8; 6] = [0xee, 0, 0, 0, 0, 0x0a];
pub const GW_B: [u8; 6] = [0xee, 0, 0, 0, 0, 0x0b];
pub const IP_A: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
pub const IP_B: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
pub const IP6_A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0x0a);
pub const IP6_B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0x0b);
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
pub const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// Moves the calling test thread into a fresh, private network namespace (only this thread:
/// libtest runs each test on its own thread), so interfaces a test creates never touch the
/// host. Fails loudly when not root: these tests must not pass by skipping.
pub fn private_netns() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (CAP_NET_ADMIN, CAP_BPF); run it through `cargo xtask test`"
    );
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
}

/// Creates an interface (one end of a veth pair; the dummy driver may be missing) in the
/// current thread's namespace and returns its ifindex.
pub fn dummy_interface(name: &str) -> u32 {
    let peer = format!("{name}-p");
    let status = std::process::Command::new("ip")
        .args(["link", "add", name, "type", "veth", "peer", "name", &peer])
        .status()
        .expect("running ip");
    assert!(status.success(), "ip link add {name} failed");
    nix::net::if_::if_nametoindex(name).expect("if_nametoindex")
}

/// Runs `program` on `frame` through `BPF_PROG_TEST_RUN` as if it arrived on `ifindex`;
/// returns the program's verdict and the frame as it left.
pub fn test_run(
    dp: &mut weir_agent::dataplane::Dataplane,
    program: &'static str,
    ifindex: u32,
    frame: &[u8],
) -> (u32, Vec<u8>) {
    use aya::programs::{TestRun, TestRunOptions};
    // struct __sk_buff up to and including `ifindex` (offset 40).
    let mut ctx = [0u8; 44];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0u8; frame.len() + 64];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.ctx_in = Some(&ctx);
    let prog = dp.program(program).unwrap();
    let res = prog.test_run(opts).unwrap_or_else(|e| {
        panic!(
            "BPF_PROG_TEST_RUN of {} bytes {frame:02x?}: {e:?}",
            frame.len()
        )
    });
    out.truncate(res.data_size_out as usize);
    (res.return_value, out)
}

/// XDP verdicts (`XDP_*`).
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// Runs the XDP program on `frame` through `BPF_PROG_TEST_RUN` as if it arrived on
/// `ifindex` (an interface of the calling thread's namespace); returns the verdict and the
/// frame as it left.
pub fn test_run_xdp(
    dp: &mut weir_agent::dataplane::Dataplane,
    ifindex: u32,
    frame: &[u8],
) -> (u32, Vec<u8>) {
    use aya::programs::{TestRun, TestRunOptions};
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex. The kernel wants data 0 and data_end the frame's length.
    let mut ctx = [0u32; 6];
    ctx[1] = frame.len() as u32;
    ctx[3] = ifindex;
    let ctx: Vec<u8> = ctx.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.ctx_in = Some(&ctx);
    let prog = dp.xdp().unwrap();
    let res = prog.test_run(opts).unwrap_or_else(|e| {
        panic!(
            "BPF_PROG_TEST_RUN (XDP) of {} bytes {frame:02x?}: {e:?}",
            frame.len()
        )
    });
    out.truncate(res.data_size_out as usize);
    (res.return_value, out)
}
