//! Synthetic frames for `BPF_PROG_TEST_RUN`, built with valid checksums.

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, Icmpv4Header, IpNumber, PacketBuilder,
};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const SCTP: u8 = 132;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;

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
    let ip = PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(src.octets(), dst.octets(), 64);
    let mut f = Vec::with_capacity(64);
    match proto {
        TCP => {
            let mut tcp = ip.tcp(sport, dport, 0, 64240);
            if tcp_flags & TCP_SYN != 0 {
                tcp = tcp.syn();
            }
            if tcp_flags & TCP_ACK != 0 {
                tcp = tcp.ack(0);
            }
            if tcp_flags & TCP_FIN != 0 {
                tcp = tcp.fin();
            }
            if tcp_flags & TCP_RST != 0 {
                tcp = tcp.rst();
            }
            if tcp_flags & TCP_PSH != 0 {
                tcp = tcp.psh();
            }
            tcp.write(&mut f, &[])
        }
        UDP => ip.udp(sport, dport).write(&mut f, &[]),
        ICMP => ip.icmpv4_echo_request(sport, 0).write(&mut f, &[]),
        SCTP => {
            // The common header: ports, a zero verification tag and checksum.
            let mut sctp = [0u8; 12];
            sctp[0..2].copy_from_slice(&sport.to_be_bytes());
            sctp[2..4].copy_from_slice(&dport.to_be_bytes());
            ip.write(&mut f, IpNumber::SCTP, &sctp)
        }
        other => ip.write(&mut f, IpNumber(other), &[0u8; 8]),
    }
    .expect("a frame within IPv4's size");
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
    let (header, _) = Icmpv4Header::from_slice(&[ty, code, 0, 0, 0, 0, 0, 0])
        .expect("eight bytes make an ICMP header");
    let mut f = Vec::with_capacity(14 + 20 + 8 + 28);
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.octets(), dst.octets(), 64)
        .icmpv4(header.icmp_type)
        .write(&mut f, &quoted[14..quoted.len().min(14 + 28)])
        .expect("a frame within IPv4's size");
    f
}

/// An Ethernet header alone, for frames whose payload a test writes itself.
pub fn eth(src: [u8; 6], dst: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    etherparse::Ethernet2Header {
        source: src,
        destination: dst,
        ether_type: EtherType(ethertype),
    }
    .write(&mut f)
    .expect("writing to a vector");
    f
}

/// An ARP request: who has `target`? tell `sender`.
pub fn arp_request(sender_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let arp = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REQUEST,
        &sender_mac,
        &sender.octets(),
        &[0; 6],
        &target.octets(),
    )
    .expect("Ethernet and IPv4 address lengths");
    let mut f = Vec::with_capacity(42);
    PacketBuilder::ethernet2(sender_mac, [0xff; 6])
        .arp(arp)
        .write(&mut f)
        .expect("writing to a vector");
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
    let mut f = Vec::with_capacity(14 + 20 + 8 + payload.len());
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(sport, dport)
        .write(&mut f, payload)
        .expect("a frame within IPv4's size");
    f
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

/// An Ethernet + IPv6 + UDP frame carrying `payload`.
pub fn udp6(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 40 + 8 + payload.len());
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv6(src.octets(), dst.octets(), 64)
        .udp(sport, dport)
        .write(&mut f, payload)
        .expect("a frame within IPv6's size");
    f
}

/// IPv6 next-header values of the extension headers the tests build.
pub const HOP_BY_HOP: u8 = 0;
pub const DEST_OPTS: u8 = 60;
pub const FRAGMENT: u8 = 44;
pub const ICMPV6: u8 = 58;

/// An Ethernet + IPv6 frame around `payload` (extension headers and upper-layer header as
/// bytes), `next` naming its first header. The payload length is the payload's; checksums
/// are not computed (the programs do not verify them).
pub fn ipv6_raw(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = eth(src_mac, dst_mac, 0x86dd);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
    f.extend_from_slice(&[next, 64]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(payload);
    f
}

/// An options extension header (hop-by-hop or destination options) of `units` × 8 bytes
/// (at least 1), filled with Pad1 options, followed by header `next`.
pub fn ext_options(next: u8, units: u8) -> Vec<u8> {
    let mut h = vec![next, units.max(1) - 1];
    h.resize(usize::from(units.max(1)) * 8, 0);
    h
}

/// A fragment header: `offset` in 8-byte units, the more-fragments flag, identification.
pub fn ext_fragment(next: u8, offset: u16, more: bool, id: u32) -> Vec<u8> {
    let mut h = vec![next, 0];
    h.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h
}

/// A 20-byte TCP header.
pub fn tcp_header(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = Vec::with_capacity(20);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&[0; 8]);
    h.extend_from_slice(&[0x50, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    h
}

/// An ICMPv6 message: type, code, a zero checksum and `body`.
pub fn icmpv6(ty: u8, code: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(body);
    m
}
