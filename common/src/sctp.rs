//! SCTP's checksum, updated in place when Service translation changes a port.
//!
//! SCTP's checksum (RFC 9260 §6.8, Appendix A) is CRC32c (Castagnoli: reflected polynomial
//! 0x82F63B78, initial value !0, final xor !0) over the whole SCTP packet — common header
//! with the checksum field zeroed, then the chunks — and is stored in the field least
//! significant byte first (Linux: `cpu_to_le32`). It covers the ports but not the addresses.
//!
//! Recomputing it would mean reading the whole packet; instead the dataplane updates it in
//! O(log n). CRC32c is affine: for two messages of equal length the initial value and the
//! final xor cancel, so `crc(M1) ^ crc(M2) = raw(M1 ^ M2)`, where `raw` has initial value 0
//! and no final xor. Changing the ports (the first 4 bytes) of an `L`-byte packet by `D`
//! (old ^ new) changes the checksum by `raw(D ‖ 0^(L-4))`. With init 0, `raw` of a message
//! `M` is `M(x) · x^32 mod P`, so that is `D(x) · x^(8(L-4)) · x^32 = D(x) · x^(8L) mod P`:
//! one multiplication in GF(2)[x]/P once `x^(8L)` is known, which is a product of at most 16
//! powers `x^(8·2^k)` (one per set bit of `L` < 2^16), taken from [`X_POW_8_POW2`].
//!
//! Polynomials are in the reflected representation CRC registers use: bit 31 is the
//! coefficient of x^0, bit 0 that of x^31. A message's first four bytes read least
//! significant byte first (`u32::from_le_bytes`) are its polynomial in that representation.
//!
//! Everything here is branch-free bit arithmetic in loops of constant bounds, so the eBPF
//! verifier accepts it and the programs and the host tests run the same code.

/// The CRC32c polynomial without its x^32 term, reflected.
pub const POLY: u32 = 0x82F6_3B78;

/// x^0 in the reflected representation.
const ONE: u32 = 1 << 31;

/// `a · b mod P` (reflected representation): 32 steps of shift and conditional xor.
#[inline(always)]
pub const fn mul_mod(a: u32, b: u32) -> u32 {
    let mut b = b;
    let mut product = 0;
    let mut i = 0;
    while i < 32 {
        // The coefficient of x^i in `a` selects b · x^i.
        let bit = (a >> (31 - i)) & 1;
        product ^= b & 0u32.wrapping_sub(bit);
        // b · x: one step to the right, reduced by P when x^31's coefficient overflows.
        b = (b >> 1) ^ (POLY & 0u32.wrapping_sub(b & 1));
        i += 1;
    }
    product
}

/// `x^(8·2^k) mod P` for k = 0..16: the effect on a raw CRC of 2^k zero bytes.
pub const X_POW_8_POW2: [u32; 16] = {
    let mut table = [0; 16];
    // x^8.
    table[0] = ONE >> 8;
    let mut k = 1;
    while k < 16 {
        table[k] = mul_mod(table[k - 1], table[k - 1]);
        k += 1;
    }
    table
};

/// `x^(8n) mod P` for n < 2^16: appending `n` zero bytes multiplies a raw CRC by it.
#[inline(always)]
pub fn x_pow_8n(n: u16) -> u32 {
    let mut power = ONE;
    let mut k = 0;
    while k < 16 {
        let product = mul_mod(power, X_POW_8_POW2[k]);
        let take = 0u32.wrapping_sub((u32::from(n) >> k) & 1);
        power = (product & take) | (power & !take);
        k += 1;
    }
    power
}

/// Raw CRC32c (initial value 0, no final xor) of 4 bytes: their polynomial times x^32.
#[inline(always)]
pub const fn crc_raw4(bytes: [u8; 4]) -> u32 {
    let mut crc = u32::from_le_bytes(bytes);
    let mut i = 0;
    while i < 32 {
        crc = (crc >> 1) ^ (POLY & 0u32.wrapping_sub(crc & 1));
        i += 1;
    }
    crc
}

/// What changes in the CRC32c of an SCTP packet of `len` bytes (common header included)
/// when its first four bytes, the ports, change by `ports_xor` (old ^ new, as they are in
/// the packet). The new checksum is the old one xor this; in the packet's field (least
/// significant byte first) that is `field ^ delta.to_le_bytes()`.
#[inline(always)]
pub fn checksum_delta(ports_xor: [u8; 4], len: u16) -> u32 {
    mul_mod(u32::from_le_bytes(ports_xor), x_pow_8n(len))
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::{vec, vec::Vec};

    use proptest::prelude::*;

    use super::*;

    /// The checksum as SCTP computes it: CRC32c over the packet with the field zeroed.
    fn sctp_checksum(packet: &[u8]) -> u32 {
        let crc = crc32c::crc32c(&packet[..8]);
        let crc = crc32c::crc32c_append(crc, &[0; 4]);
        crc32c::crc32c_append(crc, &packet[12..])
    }

    /// A straightforward bitwise raw CRC32c, for the definitions.
    fn crc_raw(bytes: &[u8]) -> u32 {
        let mut crc = 0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ POLY
                } else {
                    crc >> 1
                };
            }
        }
        crc
    }

    #[test]
    fn the_crate_is_crc32c_and_crc32c_is_affine() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        // crc(M) = raw(M) with initial value !0 and final xor !0; for equal lengths the
        // initial value and the final xor cancel.
        let a = b"weir sctp checksum, first";
        let b = b"WEIR SCTP checksum, other";
        let xor: Vec<u8> = a.iter().zip(b).map(|(x, y)| x ^ y).collect();
        assert_eq!(crc32c::crc32c(a) ^ crc32c::crc32c(b), crc_raw(&xor));
    }

    #[test]
    fn the_table_is_powers_of_x() {
        // Against repeated multiplication by x^8.
        let mut power = ONE;
        for n in 0u32..=4096 {
            assert_eq!(x_pow_8n(n as u16), power, "x^(8·{n})");
            power = mul_mod(power, X_POW_8_POW2[0]);
        }
        for (k, &p) in X_POW_8_POW2.iter().enumerate() {
            assert_eq!(x_pow_8n(1 << k), p);
        }
        // raw(0x01 ‖ 0^n) = x^7 · x^(8n) · x^32, and x^7 · x^32 = raw(0x01).
        for n in [0u16, 1, 5, 64, 1000] {
            let mut msg = vec![1u8];
            msg.resize(1 + usize::from(n), 0);
            assert_eq!(mul_mod(crc_raw(&[1]), x_pow_8n(n)), crc_raw(&msg));
        }
    }

    #[test]
    fn mul_mod_is_the_raw_crc_of_zero_bytes() {
        // raw(M ‖ 0^n) = raw(M) · x^(8n).
        let m = [0xde, 0xad, 0xbe, 0xef];
        for n in [0usize, 1, 2, 3, 7, 100, 1500, 9000, 65531] {
            let mut msg = m.to_vec();
            msg.resize(4 + n, 0);
            assert_eq!(
                mul_mod(crc_raw4(m), x_pow_8n(n as u16)),
                crc_raw(&msg),
                "{n}"
            );
        }
        assert_eq!(crc_raw4(m), crc_raw(&m));
    }

    #[test]
    fn the_checksum_field_is_least_significant_byte_first() {
        // The same COOKIE ACK as the conformance probe's test: CRC 0x9FFE6BFF, on the wire
        // ff 6b fe 9f (what Linux writes and Wireshark checks).
        let packet = [
            0x13, 0x88, 0x00, 0x50, 0x01, 0x02, 0x03, 0x04, 0, 0, 0, 0, 0x0b, 0x00, 0x00, 0x04,
        ];
        assert_eq!(sctp_checksum(&packet), 0x9FFE_6BFF);
        assert_eq!(
            sctp_checksum(&packet).to_le_bytes(),
            [0xff, 0x6b, 0xfe, 0x9f]
        );
    }

    /// Rewrites the ports of `packet` (whose checksum field is right) the way the dataplane
    /// does: ports, then the field xor the delta.
    fn translate(packet: &mut [u8], sport: u16, dport: u16) {
        let old: [u8; 4] = packet[..4].try_into().unwrap();
        let mut new = [0; 4];
        new[..2].copy_from_slice(&sport.to_be_bytes());
        new[2..].copy_from_slice(&dport.to_be_bytes());
        let xor = core::array::from_fn(|i| old[i] ^ new[i]);
        let delta = checksum_delta(xor, packet.len() as u16).to_le_bytes();
        packet[..4].copy_from_slice(&new);
        for i in 0..4 {
            packet[8 + i] ^= delta[i];
        }
    }

    fn packet(len: usize, seed: &[u8]) -> Vec<u8> {
        let mut p: Vec<u8> = seed.iter().copied().cycle().take(len).collect();
        p.resize(len, 0x5a);
        let sum = sctp_checksum(&p).to_le_bytes();
        p[8..12].copy_from_slice(&sum);
        p
    }

    #[test]
    fn translated_packets_have_the_checksum_of_the_new_packet() {
        for len in [12, 13, 16, 17, 99, 1500, 1501, 9000, 65535] {
            let mut p = packet(len, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 200, 13]);
            translate(&mut p, 40000, 8080);
            assert_eq!(
                p[8..12],
                sctp_checksum(&p).to_le_bytes(),
                "{len} bytes, both ports"
            );
            // Only the destination, then only the source.
            translate(&mut p, 40000, 100);
            assert_eq!(p[8..12], sctp_checksum(&p).to_le_bytes(), "{len}");
            translate(&mut p, 61234, 100);
            assert_eq!(p[8..12], sctp_checksum(&p).to_le_bytes(), "{len}");
        }
    }

    proptest! {
        #[test]
        fn random_packets_and_ports(
            len in 12usize..=9000,
            seed in proptest::collection::vec(any::<u8>(), 1..64),
            sport in any::<u16>(),
            dport in any::<u16>(),
        ) {
            let mut p = packet(len, &seed);
            translate(&mut p, sport, dport);
            prop_assert_eq!(&p[..4], &[
                sport.to_be_bytes()[0], sport.to_be_bytes()[1],
                dport.to_be_bytes()[0], dport.to_be_bytes()[1],
            ]);
            prop_assert_eq!(&p[8..12], &sctp_checksum(&p).to_le_bytes()[..]);
        }
    }
}
