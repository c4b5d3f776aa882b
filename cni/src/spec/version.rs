//! CNI specification versions and which commands each of them knows.
//!
//! The runtime picks one version per network configuration (SPEC.md §1 "Version
//! considerations") and passes it as `cniVersion`; the plugin must answer in that same
//! version (§5 "ADD Success": "`cniVersion`: The same version supplied on input").

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A CNI specification version this plugin can speak.
///
/// Versions before 0.3.0 use a different result shape (`ip4`/`ip6` instead of `ips`) and
/// no runtime that Kubernetes supports still sends them, so they are refused with
/// [`code::INCOMPATIBLE_VERSION`](crate::spec::code::INCOMPATIBLE_VERSION).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    /// 0.3.0: the rich `ips`/`interfaces`/`routes` result and plugin chaining.
    V0_3_0,
    /// 0.3.1: a typo fix over 0.3.0, same wire format.
    V0_3_1,
    /// 0.4.0: introduces `CHECK` and `prevResult` on `DEL`.
    V0_4_0,
    /// 1.0.0: drops the `version` field of `ips` entries.
    V1_0_0,
    /// 1.1.0: introduces `STATUS` and `GC`, and interface `mtu`/`socketPath`/`pciID` and
    /// route `mtu`/`advmss`/`priority`/`table`/`scope` in results.
    V1_1_0,
}

/// What is wrong with a `cniVersion` string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    /// Not a `MAJOR.MINOR.PATCH` version at all (SPEC.md §1 requires Semantic Versioning
    /// 2.0); libcni reports this as a decoding failure.
    #[error("cniVersion {version:?} is not a semantic version (MAJOR.MINOR.PATCH)")]
    Malformed {
        /// The string that was given.
        version: String,
    },
    /// A well-formed version this plugin does not implement.
    #[error(
        "cniVersion {version} is not supported by weir-cni (supported: {})",
        CniVersion::supported_list()
    )]
    Unsupported {
        /// The string that was given.
        version: String,
    },
}

impl CniVersion {
    /// Every version this plugin speaks, oldest first: the `supportedVersions` answer of
    /// `VERSION`.
    pub const SUPPORTED: [CniVersion; 5] = [
        CniVersion::V0_3_0,
        CniVersion::V0_3_1,
        CniVersion::V0_4_0,
        CniVersion::V1_0_0,
        CniVersion::V1_1_0,
    ];

    /// The newest version this plugin implements; used when no version is known yet (an
    /// error before the configuration could be read).
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    /// The version as it appears on the wire, e.g. `"0.4.0"`.
    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// Whether `CHECK` exists in this version (introduced in 0.4.0).
    pub fn supports_check(self) -> bool {
        self >= CniVersion::V0_4_0
    }

    /// Whether `STATUS` and `GC` exist in this version (both introduced in 1.1.0).
    pub fn supports_status_and_gc(self) -> bool {
        self >= CniVersion::V1_1_0
    }

    /// Whether results of this version carry the `version` ("4"/"6") field in `ips`
    /// entries (0.3.x and 0.4.0; removed in 1.0.0).
    pub fn has_ip_version_field(self) -> bool {
        self < CniVersion::V1_0_0
    }

    fn supported_list() -> String {
        let names: Vec<&str> = Self::SUPPORTED.iter().map(|v| v.as_str()).collect();
        names.join(", ")
    }
}

/// Checks that `version` is `MAJOR.MINOR.PATCH` with numeric parts (pre-release and build
/// suffixes are accepted as SemVer allows, and make the version unsupported).
pub fn is_well_formed(version: &str) -> bool {
    let core = version.split(['-', '+']).next().unwrap_or_default();
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

impl FromStr for CniVersion {
    type Err = VersionError;

    fn from_str(version: &str) -> Result<Self, Self::Err> {
        if let Some(known) = Self::SUPPORTED.iter().find(|v| v.as_str() == version) {
            return Ok(*known);
        }
        if is_well_formed(version) {
            Err(VersionError::Unsupported {
                version: version.to_owned(),
            })
        } else {
            Err(VersionError::Malformed {
                version: version.to_owned(),
            })
        }
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for CniVersion {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for CniVersion {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_version_round_trips_through_its_string() {
        for version in CniVersion::SUPPORTED {
            assert_eq!(version.as_str().parse::<CniVersion>(), Ok(version));
        }
    }

    #[test]
    fn pre_0_3_versions_are_well_formed_but_unsupported() {
        for old in ["0.1.0", "0.2.0"] {
            assert!(matches!(
                old.parse::<CniVersion>(),
                Err(VersionError::Unsupported { .. })
            ));
        }
    }

    #[test]
    fn future_versions_are_unsupported_not_malformed() {
        assert!(matches!(
            "1.2.0".parse::<CniVersion>(),
            Err(VersionError::Unsupported { .. })
        ));
        assert!(matches!(
            "1.1.0-rc1".parse::<CniVersion>(),
            Err(VersionError::Unsupported { .. })
        ));
    }

    #[test]
    fn non_semver_strings_are_malformed() {
        for bad in ["", "1", "1.0", "1.0.0.0", "one.two.three", "1..0", "v1.0.0"] {
            assert!(
                matches!(
                    bad.parse::<CniVersion>(),
                    Err(VersionError::Malformed { .. })
                ),
                "{bad:?} should be malformed"
            );
        }
    }

    #[test]
    fn check_exists_from_0_4_0_and_status_gc_from_1_1_0() {
        assert!(!CniVersion::V0_3_1.supports_check());
        assert!(CniVersion::V0_4_0.supports_check());
        assert!(!CniVersion::V1_0_0.supports_status_and_gc());
        assert!(CniVersion::V1_1_0.supports_status_and_gc());
    }
}
