//! Kubernetes syntax rules for label keys, label values and port names, as the API server
//! checks them (`k8s.io/apimachinery/pkg/util/validation`: `IsQualifiedName`,
//! `IsValidLabelValue`, `IsDNS1123Subdomain`, `IsValidPortName`, `IsValidPortNum`).
//!
//! Each check returns the reason a value is refused, worded like the API server's message.

/// Longest label value and name part of a qualified name.
const MAX_NAME_LEN: usize = 63;
/// Longest DNS-1123 subdomain (the prefix of a qualified name).
const MAX_SUBDOMAIN_LEN: usize = 253;
/// Longest port name (an IANA service name).
const MAX_PORT_NAME_LEN: usize = 15;

/// A label key: `[prefix/]name`, the prefix a DNS-1123 subdomain, the name up to 63
/// alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric.
pub fn check_label_key(key: &str) -> Result<(), &'static str> {
    let name = match key.split_once('/') {
        None => key,
        Some((prefix, name)) => {
            if prefix.is_empty() {
                return Err("prefix part must be non-empty");
            }
            check_dns1123_subdomain(prefix)?;
            if name.contains('/') {
                return Err(
                    "a qualified name must consist of an optional DNS subdomain prefix and a name, separated by a single '/'",
                );
            }
            name
        }
    };
    if name.is_empty() {
        return Err("name part must be non-empty");
    }
    check_name_part(name)
}

/// A label value: empty, or up to 63 alphanumerics, `-`, `_`, `.`, starting and ending
/// alphanumeric.
pub fn check_label_value(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Ok(());
    }
    check_name_part(value)
}

fn check_name_part(s: &str) -> Result<(), &'static str> {
    if s.len() > MAX_NAME_LEN {
        return Err("must be no more than 63 characters");
    }
    let bytes = s.as_bytes();
    let alnum = |b: &u8| b.is_ascii_alphanumeric();
    if !bytes.first().is_some_and(alnum) || !bytes.last().is_some_and(alnum) {
        return Err("must begin and end with an alphanumeric character");
    }
    if !bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("must consist of alphanumeric characters, '-', '_' or '.'");
    }
    Ok(())
}

/// A DNS-1123 subdomain: dot-separated lower-case labels, each alphanumeric at both ends.
pub fn check_dns1123_subdomain(s: &str) -> Result<(), &'static str> {
    if s.len() > MAX_SUBDOMAIN_LEN {
        return Err("prefix part must be no more than 253 characters");
    }
    let label_ok = |label: &str| {
        let b = label.as_bytes();
        let lower_alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        b.first().is_some_and(lower_alnum)
            && b.last().is_some_and(lower_alnum)
            && b.iter().all(|c| lower_alnum(c) || *c == b'-')
    };
    if s.split('.').all(label_ok) {
        Ok(())
    } else {
        Err("prefix part must be a lowercase RFC 1123 subdomain")
    }
}

/// A named port: 1 to 15 lower-case alphanumerics and `-`, at least one letter, no leading,
/// trailing or doubled `-`.
pub fn check_port_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_PORT_NAME_LEN {
        return Err("must be no more than 15 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)");
    }
    if !name.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err("must contain at least one letter (a-z)");
    }
    if name.contains("--") {
        return Err("must not contain consecutive hyphens");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err("must not begin or end with a hyphen");
    }
    Ok(())
}

/// A port number: 1 to 65535.
pub fn check_port_number(port: i32) -> Result<u16, &'static str> {
    match u16::try_from(port) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err("must be between 1 and 65535, inclusive"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys_follow_qualified_name_syntax() {
        for ok in [
            "app",
            "kubernetes.io/metadata.name",
            "a.b-c_d",
            "x/y",
            "A9",
            "example.com/Name_1",
        ] {
            assert_eq!(check_label_key(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "/x",
            "x/",
            "-a",
            "a-",
            "a b",
            "Example.com/x",
            "a/b/c",
            &"a".repeat(64),
            "ex_ample.com/x",
        ] {
            assert!(check_label_key(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn label_values_may_be_empty_but_not_malformed() {
        assert_eq!(check_label_value(""), Ok(()));
        assert_eq!(check_label_value("v1.2_x-Y"), Ok(()));
        assert!(check_label_value("-v").is_err());
        assert!(check_label_value("a/b").is_err());
        assert!(check_label_value(&"v".repeat(64)).is_err());
    }

    #[test]
    fn port_names_follow_iana_service_name_syntax() {
        for ok in ["http", "serve-80-tcp", "h2c", "a"] {
            assert_eq!(check_port_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "80",
            "HTTP",
            "a--b",
            "-a",
            "a-",
            "sixteen-chars-xx",
            "a_b",
        ] {
            assert!(check_port_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn port_numbers_are_between_1_and_65535() {
        assert_eq!(check_port_number(1), Ok(1));
        assert_eq!(check_port_number(65535), Ok(65535));
        assert!(check_port_number(0).is_err());
        assert!(check_port_number(65536).is_err());
        assert!(check_port_number(-1).is_err());
    }
}
