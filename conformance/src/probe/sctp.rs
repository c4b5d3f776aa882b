//! The few SCTP packets a connectivity check needs (RFC 9260), encoded and decoded in user
//! space.
//!
//! A probe is the association setup, the 4-way handshake of RFC 9260 §5.1:
//! INIT → INIT ACK (with a State Cookie) → COOKIE ECHO → COOKIE ACK. Once the COOKIE ACK
//! arrives, both directions have crossed the dataplane with the association's ports and
//! tags, which is what an SCTP NetworkPolicy rule is about. No DATA is exchanged.

/// Chunk types (RFC 9260 §3.2).
pub const CHUNK_INIT: u8 = 1;
pub const CHUNK_INIT_ACK: u8 = 2;
pub const CHUNK_ABORT: u8 = 6;
pub const CHUNK_COOKIE_ECHO: u8 = 10;
pub const CHUNK_COOKIE_ACK: u8 = 11;

/// ABORT's T bit (RFC 9260 §3.3.7): the verification tag is the one of the packet being
/// answered ("reflected") rather than the peer's own tag.
pub const ABORT_FLAG_T: u8 = 0x01;

/// State Cookie parameter type in INIT ACK (RFC 9260 §3.3.3.1).
pub const PARAM_STATE_COOKIE: u16 = 7;

/// Size of the common header: ports, verification tag, checksum (RFC 9260 §3.1).
pub const COMMON_HEADER_LEN: usize = 12;

/// Fixed part of INIT and INIT ACK values: initiate tag, a_rwnd, outbound streams, inbound
/// streams, initial TSN (RFC 9260 §3.3.2, §3.3.3).
const INIT_FIXED_LEN: usize = 16;

/// The common header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub src_port: u16,
    pub dst_port: u16,
    pub verification_tag: u32,
}

/// One chunk, borrowed from a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk<'a> {
    pub kind: u8,
    pub flags: u8,
    /// The chunk value without type, flags, length and padding.
    pub value: &'a [u8],
}

/// The fixed fields of an INIT or INIT ACK chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitFields {
    /// Tag the sender wants on every packet sent to it; never 0.
    pub initiate_tag: u32,
    pub a_rwnd: u32,
    pub outbound_streams: u16,
    pub inbound_streams: u16,
    pub initial_tsn: u32,
}

/// A parsed packet: the header and its chunks in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet<'a> {
    pub header: Header,
    pub chunks: Vec<Chunk<'a>>,
}

/// CRC32c of a packet as SCTP stores it (RFC 9260 §6.8 and Appendix A): the standard
/// CRC32c (Castagnoli) over the whole packet with the checksum field zeroed, placed in the
/// field least significant byte first — which is what Linux writes (`cpu_to_le32` in
/// `sctp_compute_cksum`) and what Wireshark checks.
fn checksum(packet: &[u8]) -> [u8; 4] {
    let crc = crc32c::crc32c(&packet[..8]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &packet[COMMON_HEADER_LEN..]).to_le_bytes()
}

/// Builds a packet from a header and `(type, flags, value)` chunks, padding each chunk to
/// a multiple of 4 bytes and filling in the checksum.
pub fn build(header: Header, chunks: &[(u8, u8, &[u8])]) -> Vec<u8> {
    let mut packet = Vec::with_capacity(
        COMMON_HEADER_LEN
            + chunks
                .iter()
                .map(|(_, _, value)| 4 + value.len().next_multiple_of(4))
                .sum::<usize>(),
    );
    packet.extend_from_slice(&header.src_port.to_be_bytes());
    packet.extend_from_slice(&header.dst_port.to_be_bytes());
    packet.extend_from_slice(&header.verification_tag.to_be_bytes());
    packet.extend_from_slice(&[0; 4]);
    for &(kind, flags, value) in chunks {
        // Chunk values this module builds are a few dozen bytes; a value that does not fit
        // the 16-bit length would be a programming error, clamped rather than panicking.
        let length = u16::try_from(4 + value.len()).unwrap_or(u16::MAX);
        packet.push(kind);
        packet.push(flags);
        packet.extend_from_slice(&length.to_be_bytes());
        packet.extend_from_slice(value);
        packet.resize(packet.len().next_multiple_of(4), 0);
    }
    let sum = checksum(&packet);
    packet[8..12].copy_from_slice(&sum);
    packet
}

/// Parses an SCTP packet (starting at the common header). Returns `None` for anything
/// malformed or with a wrong checksum: RFC 9260 §6.8 says such packets are silently
/// discarded.
pub fn parse(packet: &[u8]) -> Option<Packet<'_>> {
    if packet.len() < COMMON_HEADER_LEN || checksum(packet) != packet[8..12] {
        return None;
    }
    let header = Header {
        src_port: u16::from_be_bytes([packet[0], packet[1]]),
        dst_port: u16::from_be_bytes([packet[2], packet[3]]),
        verification_tag: u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]),
    };
    let mut chunks = Vec::new();
    let mut rest = &packet[COMMON_HEADER_LEN..];
    while rest.len() >= 4 {
        let length = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        if length < 4 || length > rest.len() {
            return None;
        }
        chunks.push(Chunk {
            kind: rest[0],
            flags: rest[1],
            value: &rest[4..length],
        });
        // The last chunk's padding may be missing (RFC 9260 §3.2: the receiver must accept
        // it), hence `min`.
        rest = &rest[length.next_multiple_of(4).min(rest.len())..];
    }
    if !rest.is_empty() || chunks.is_empty() {
        return None;
    }
    Some(Packet { header, chunks })
}

/// Encodes an INIT or INIT ACK value: the fixed fields, then `(type, value)` parameters.
pub fn init_value(fields: InitFields, params: &[(u16, &[u8])]) -> Vec<u8> {
    let mut value = Vec::with_capacity(INIT_FIXED_LEN + 32);
    value.extend_from_slice(&fields.initiate_tag.to_be_bytes());
    value.extend_from_slice(&fields.a_rwnd.to_be_bytes());
    value.extend_from_slice(&fields.outbound_streams.to_be_bytes());
    value.extend_from_slice(&fields.inbound_streams.to_be_bytes());
    value.extend_from_slice(&fields.initial_tsn.to_be_bytes());
    for &(kind, param) in params {
        let length = u16::try_from(4 + param.len()).unwrap_or(u16::MAX);
        value.extend_from_slice(&kind.to_be_bytes());
        value.extend_from_slice(&length.to_be_bytes());
        value.extend_from_slice(param);
        value.resize(value.len().next_multiple_of(4), 0);
    }
    value
}

/// Decodes an INIT or INIT ACK value into its fixed fields and the value of the first
/// parameter of type `wanted` (if any). Rejects an initiate tag of 0 (RFC 9260 §3.3.2).
pub fn parse_init(value: &[u8], wanted: u16) -> Option<(InitFields, Option<&[u8]>)> {
    if value.len() < INIT_FIXED_LEN {
        return None;
    }
    let u32_at =
        |at: usize| u32::from_be_bytes([value[at], value[at + 1], value[at + 2], value[at + 3]]);
    let u16_at = |at: usize| u16::from_be_bytes([value[at], value[at + 1]]);
    let fields = InitFields {
        initiate_tag: u32_at(0),
        a_rwnd: u32_at(4),
        outbound_streams: u16_at(8),
        inbound_streams: u16_at(10),
        initial_tsn: u32_at(12),
    };
    if fields.initiate_tag == 0 {
        return None;
    }
    let mut found = None;
    let mut rest = &value[INIT_FIXED_LEN..];
    while rest.len() >= 4 {
        let kind = u16::from_be_bytes([rest[0], rest[1]]);
        let length = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        if length < 4 || length > rest.len() {
            return None;
        }
        if kind == wanted && found.is_none() {
            found = Some(&rest[4..length]);
        }
        rest = &rest[length.next_multiple_of(4).min(rest.len())..];
    }
    Some((fields, found))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_is_crc32c_stored_least_significant_byte_first() {
        // COOKIE ACK from port 5000 to port 80 with tag 0x01020304. The expected field was
        // computed with an independent bitwise CRC32c (polynomial 0x82F63B78, check value
        // 0xE3069283): CRC 0x9FFE6BFF, written as ff 6b fe 9f like Linux does.
        let packet = build(
            Header {
                src_port: 5000,
                dst_port: 80,
                verification_tag: 0x0102_0304,
            },
            &[(CHUNK_COOKIE_ACK, 0, &[])],
        );
        assert_eq!(
            packet,
            [
                0x13, 0x88, 0x00, 0x50, 0x01, 0x02, 0x03, 0x04, 0xff, 0x6b, 0xfe, 0x9f, 0x0b, 0x00,
                0x00, 0x04
            ]
        );
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn built_packets_parse_back() {
        let header = Header {
            src_port: 50000,
            dst_port: 80,
            verification_tag: 0,
        };
        let value = init_value(
            InitFields {
                initiate_tag: 0x1234_5678,
                a_rwnd: 65535,
                outbound_streams: 1,
                inbound_streams: 1,
                initial_tsn: 7,
            },
            &[(PARAM_STATE_COOKIE, b"abcde")],
        );
        let packet = build(
            header,
            &[(CHUNK_INIT, 0, &value), (CHUNK_COOKIE_ACK, 0, &[])],
        );
        assert_eq!(packet.len() % 4, 0);
        let parsed = parse(&packet).expect("valid packet");
        assert_eq!(parsed.header, header);
        assert_eq!(parsed.chunks.len(), 2);
        assert_eq!(parsed.chunks[0].kind, CHUNK_INIT);
        let (fields, cookie) =
            parse_init(parsed.chunks[0].value, PARAM_STATE_COOKIE).expect("init");
        assert_eq!(fields.initiate_tag, 0x1234_5678);
        assert_eq!(fields.initial_tsn, 7);
        assert_eq!(cookie, Some(&b"abcde"[..]));
        assert_eq!(parsed.chunks[1].kind, CHUNK_COOKIE_ACK);
    }

    #[test]
    fn corrupted_or_truncated_packets_are_discarded() {
        let header = Header {
            src_port: 1,
            dst_port: 2,
            verification_tag: 3,
        };
        let packet = build(header, &[(CHUNK_COOKIE_ECHO, 0, b"cookie")]);
        let mut corrupted = packet.clone();
        corrupted[13] ^= 0xff;
        assert!(parse(&corrupted).is_none());
        assert!(parse(&packet[..packet.len() - 4]).is_none());
        assert!(parse(&packet[..8]).is_none());
        let empty = build(header, &[]);
        assert!(
            parse(&empty).is_none(),
            "a packet without chunks is malformed"
        );
    }

    #[test]
    fn init_with_zero_tag_is_rejected() {
        let value = init_value(
            InitFields {
                initiate_tag: 0,
                a_rwnd: 1,
                outbound_streams: 1,
                inbound_streams: 1,
                initial_tsn: 1,
            },
            &[],
        );
        assert!(parse_init(&value, PARAM_STATE_COOKIE).is_none());
    }
}
