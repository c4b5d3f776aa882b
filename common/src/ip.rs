//! Addresses as map keys.

/// An IPv4 or IPv6 address in network byte order, IPv4 stored IPv4-mapped (`::ffff:a.b.c.d`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct IpKey {
    bytes: [u8; 16],
}

/// Bits an IPv4 prefix length is shifted by when stored IPv4-mapped in a 128-bit trie.
pub const V4_MAPPED_PREFIX: u32 = 96;

impl IpKey {
    pub const UNSPECIFIED: IpKey = IpKey { bytes: [0; 16] };

    pub const fn from_v4(octets: [u8; 4]) -> Self {
        Self {
            bytes: [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2],
                octets[3],
            ],
        }
    }

    pub const fn from_v6(bytes: [u8; 16]) -> Self {
        Self { bytes }
    }

    pub const fn bytes(&self) -> &[u8; 16] {
        &self.bytes
    }

    pub fn is_v4(&self) -> bool {
        self.bytes[..10] == [0; 10] && self.bytes[10] == 0xff && self.bytes[11] == 0xff
    }

    pub fn v4_octets(&self) -> [u8; 4] {
        [
            self.bytes[12],
            self.bytes[13],
            self.bytes[14],
            self.bytes[15],
        ]
    }
}

/// Data of an LPM-trie key over addresses (the trie key is `prefix_len` + this).
pub type IpPrefixData = IpKey;

#[cfg(feature = "user")]
mod user {
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::{IpKey, V4_MAPPED_PREFIX};

    impl From<Ipv4Addr> for IpKey {
        fn from(a: Ipv4Addr) -> Self {
            Self::from_v4(a.octets())
        }
    }

    impl From<Ipv6Addr> for IpKey {
        fn from(a: Ipv6Addr) -> Self {
            match a.to_ipv4_mapped() {
                Some(v4) => Self::from(v4),
                None => Self::from_v6(a.octets()),
            }
        }
    }

    impl From<IpAddr> for IpKey {
        fn from(a: IpAddr) -> Self {
            match a {
                IpAddr::V4(a) => a.into(),
                IpAddr::V6(a) => a.into(),
            }
        }
    }

    impl From<IpKey> for IpAddr {
        fn from(k: IpKey) -> Self {
            if k.is_v4() {
                IpAddr::V4(Ipv4Addr::from(k.v4_octets()))
            } else {
                IpAddr::V6(Ipv6Addr::from(*k.bytes()))
            }
        }
    }

    impl core::fmt::Display for IpKey {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            IpAddr::from(*self).fmt(f)
        }
    }

    /// Prefix length in the 128-bit trie for a prefix of `len` bits of `addr`'s family.
    pub fn trie_prefix_len(addr: IpAddr, len: u8) -> u32 {
        match addr {
            IpAddr::V4(_) => V4_MAPPED_PREFIX + u32::from(len),
            IpAddr::V6(_) => u32::from(len),
        }
    }
}

#[cfg(feature = "user")]
pub use user::trie_prefix_len;
