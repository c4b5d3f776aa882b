//! weir's eBPF programs. One module per program (`from_pod`, `to_pod`, `from_network`,
//! `to_network`, `from_tunnel`, `to_tunnel`; XDP on the uplink in `xdp`; the socket hooks in `sock`), one
//! per mechanism (`parse`, `conntrack`, `policy`, `nat`,
//! `forward`, `route`, `arp`, `events`), maps in `maps`.
#![no_std]
#![no_main]

mod arp;
mod conntrack;
mod events;
mod forward;
mod from_network;
mod from_pod;
mod from_tunnel;
mod hdr;
mod host;
mod maps;
mod nat;
mod parse;
mod policy;
mod reject;
mod route;
mod sock;
mod to_network;
mod to_pod;
mod to_tunnel;
mod xdp;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    from_pod::run(&ctx)
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    to_pod::run(&ctx)
}

#[classifier]
pub fn from_network(ctx: TcContext) -> i32 {
    from_network::run(&ctx)
}

#[classifier]
pub fn to_network(ctx: TcContext) -> i32 {
    to_network::run(&ctx)
}

#[classifier]
pub fn from_tunnel(ctx: TcContext) -> i32 {
    from_tunnel::run(&ctx)
}

#[classifier]
pub fn to_tunnel(ctx: TcContext) -> i32 {
    to_tunnel::run(&ctx)
}

#[xdp(frags)]
pub fn xdp_uplink(ctx: XdpContext) -> u32 {
    xdp::run(&ctx)
}

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, true)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that can reach this: panics cannot happen at run time.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
