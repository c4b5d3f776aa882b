//! Synthetic frames for `BPF_PROG_TEST_RUN`.

use std::net::Ipv4Addr;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const SCTP: u8 = 132;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_FIN: u8 = 0x01;

/// An Ethernet + IPv4 frame with a TCP/UDP/SCTP header carrying `sport`/`dport`, or an ICMP
/// echo request with identifier `sport`.
#[expect(
    clippy::too_many_arguments,
    reason = "one argument per header field under test"
)]
pub fn ipv4(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    sport: u16,
    dport: u16,
    tcp_flags: u8,
) -> Vec<u8> {
    let l4: Vec<u8> = match proto {
        TCP => {
            let mut h = vec![0u8; 20];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            h[12] = 5 << 4;
            h[13] = tcp_flags;
            h
        }
        UDP => {
            let mut h = vec![0u8; 8];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            h[4..6].copy_from_slice(&8u16.to_be_bytes());
            h
        }
        SCTP => {
            let mut h = vec![0u8; 12];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            h
        }
        ICMP => {
            let mut h = vec![0u8; 8];
            h[0] = 8;
            h[4..6].copy_from_slice(&sport.to_be_bytes());
            h
        }
        _ => vec![0u8; 8],
    };
    ipv4_frame(src_mac, dst_mac, src, dst, proto, &l4)
}

/// An Ethernet frame carrying an IPv4 header (no options) and `payload`.
fn ipv4_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = eth(src_mac, dst_mac, 0x0800);
    let total = 20 + payload.len();
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    f.extend_from_slice(&ip);
    f.extend_from_slice(payload);
    f
}

pub fn tcp(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    flags: u8,
) -> Vec<u8> {
    ipv4(src_mac, dst_mac, src, dst, TCP, sport, dport, flags)
}

/// An ICMPv4 error of type `ty` from `src` to `dst`, quoting `quoted` (a frame as it was sent:
/// its Ethernet header is left out, its IP header and the start of its payload quoted).
pub fn icmp_error(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ty: u8,
    code: u8,
    quoted: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![ty, code, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quoted[14..quoted.len().min(14 + 28)]);
    ipv4_frame(src_mac, dst_mac, src, dst, ICMP, &icmp)
}

pub fn eth(src: [u8; 6], dst: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// An ARP request: who has `target`? tell `sender`.
pub fn arp_request(sender_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = eth(sender_mac, [0xff; 6], 0x0806);
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

pub fn dst_mac(frame: &[u8]) -> [u8; 6] {
    frame[0..6].try_into().unwrap()
}

pub fn src_mac(frame: &[u8]) -> [u8; 6] {
    frame[6..12].try_into().unwrap()
}

/// An Ethernet + IPv4 + UDP frame carrying `payload` (UDP length and IP total length right).
pub fn udp_with(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut udp = Vec::with_capacity(8 + payload.len());
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    ipv4_frame(src_mac, dst_mac, src, dst, UDP, &udp)
}

/// A VXLAN datagram (UDP to 4789, VNI 1) from `outer_src` to `outer_dst` carrying the
/// Ethernet frame `inner`.
pub fn vxlan(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    inner: &[u8],
) -> Vec<u8> {
    let mut payload = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    payload.extend_from_slice(inner);
    udp_with(
        src_mac,
        dst_mac,
        outer_src,
        outer_dst,
        40000,
        weir_common::TUNNEL_PORT,
        &payload,
    )
}
