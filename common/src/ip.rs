//! Addresses as map keys.

/// An IPv4 or IPv6 address in network byte order, IPv4 stored IPv4-mapped (`::ffff:a.b.c.d`).
///
/// Held as four 32-bit words (each the address's bytes in network order, read natively):
/// the same 16 bytes in memory as a byte array, but the compiler keeps it in four registers
/// instead of sixteen, which matters in eBPF programs whose stack is 512 bytes (a byte array
/// is split into one spilled register per byte).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpKey {
    words: [u32; 4],
}

/// Bits an IPv4 prefix length is shifted by when stored IPv4-mapped in a 128-bit trie.
pub const V4_MAPPED_PREFIX: u32 = 96;

/// `::ffff:0:0/96` as the third word.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl IpKey {
    /// `::`: no address; also any IPv6 address of the node (the key of IPv6 node ports).
    pub const UNSPECIFIED: IpKey = IpKey { words: [0; 4] };
    /// `0.0.0.0`, IPv4-mapped: any IPv4 address of the node (the key of IPv4 node ports).
    pub const ANY_V4: IpKey = IpKey::from_v4([0; 4]);

    /// "Any address" of `addr`'s family: [`IpKey::ANY_V4`] or [`IpKey::UNSPECIFIED`].
    #[inline(always)]
    pub fn any_like(addr: &IpKey) -> IpKey {
        if addr.is_v4() {
            Self::ANY_V4
        } else {
            Self::UNSPECIFIED
        }
    }

    pub const fn from_v4(octets: [u8; 4]) -> Self {
        Self {
            words: [0, 0, V4_MAPPED_WORD, u32::from_ne_bytes(octets)],
        }
    }

    pub const fn from_v6(b: [u8; 16]) -> Self {
        Self {
            words: [
                u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
                u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
                u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
                u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
            ],
        }
    }

    pub const fn bytes(&self) -> &[u8; 16] {
        // SAFETY: [u32; 4] and [u8; 16] have the same size, every bit pattern is valid for
        // both, and the byte array's alignment (1) is less strict.
        unsafe { &*(self.words.as_ptr() as *const [u8; 16]) }
    }

    pub fn is_v4(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == V4_MAPPED_WORD
    }

    /// An IPv6 link-local address (`fe80::/10`).
    pub fn is_v6_link_local(&self) -> bool {
        let [a, b, _, _] = self.words[0].to_ne_bytes();
        a == 0xfe && b & 0xc0 == 0x80
    }

    /// `::`, the source of a node that has no address yet (IPv6 duplicate address detection).
    pub fn is_unspecified(&self) -> bool {
        self.words == [0; 4]
    }

    pub fn v4_octets(&self) -> [u8; 4] {
        self.words[3].to_ne_bytes()
    }

    /// The IPv4 address as the 32-bit word it is in a packet header (network byte order,
    /// read natively).
    pub const fn v4_word(&self) -> u32 {
        self.words[3]
    }

    /// Word `i` (0..4) of [`IpKey::words`], read in place.
    #[inline(always)]
    pub const fn word(&self, i: usize) -> u32 {
        self.words[i]
    }

    /// The address as the four 32-bit words of an `in6_addr` (network byte order, read
    /// natively), as the kernel's tunnel metadata holds an IPv6 address.
    pub const fn words(&self) -> [u32; 4] {
        self.words
    }

    /// The address whose `in6_addr` words are `words` (see [`IpKey::words`]).
    pub const fn from_words(words: [u32; 4]) -> Self {
        Self { words }
    }
}

/// Addresses order by their bytes (numerically), whatever the machine's byte order.
impl PartialOrd for IpKey {
    fn partial_cmp(&self, other: &Self) -> Option<core::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for IpKey {
    fn cmp(&self, other: &Self) -> core::cmp::Ordering {
        self.bytes().cmp(other.bytes())
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
