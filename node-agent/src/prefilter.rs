//! The prefilter file (`--prefilter-file`): address prefixes whose packets the XDP program
//! drops on the uplink.
//!
//! One CIDR per line (an address alone means the one address); `#` starts a comment; blank
//! lines are ignored. A line that is not a CIDR is reported (log, metric) and left out: it
//! never keeps the other lines from applying. The agent reads the file at start and again
//! whenever its contents change (checked every 10 seconds).

use std::{collections::BTreeSet, net::IpAddr};

use ipnet::IpNet;

/// A prefilter file's prefixes, and its lines that are not prefixes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefilterList {
    pub nets: BTreeSet<IpNet>,
    /// (line number from 1, the text) of each line that is not a CIDR.
    pub invalid: Vec<(usize, String)>,
}

/// Parses a prefilter file's text.
pub fn parse(text: &str) -> PrefilterList {
    let mut out = PrefilterList::default();
    for (i, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or_default().trim();
        if entry.is_empty() {
            continue;
        }
        let net = entry
            .parse::<IpNet>()
            .ok()
            .or_else(|| entry.parse::<IpAddr>().ok().map(IpNet::from));
        match net {
            Some(n) => {
                out.nets.insert(n.trunc());
            }
            None => out.invalid.push((i + 1, entry.to_string())),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_addresses_comments_and_blank_lines() {
        let list = parse(
            "# deny lists\n\
             192.0.2.0/24\n\
             \n\
             198.51.100.7   # one host\n\
             2001:db8::/32\n\
             203.0.113.9/24\n",
        );
        let nets: Vec<String> = list.nets.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            nets,
            [
                "192.0.2.0/24",
                "198.51.100.7/32",
                "203.0.113.0/24",
                "2001:db8::/32"
            ]
        );
        assert!(list.invalid.is_empty());
    }

    #[test]
    fn a_line_that_is_not_a_cidr_is_reported_and_the_others_still_apply() {
        let list = parse("192.0.2.0/24\n10.0.0.0/33\nnot-an-address\n198.51.100.0/24\n");
        assert_eq!(list.nets.len(), 2);
        assert_eq!(
            list.invalid,
            [
                (2, "10.0.0.0/33".to_string()),
                (3, "not-an-address".to_string())
            ]
        );
    }
}
