//! IP families of a run (FORMAT.md, "IP families").
//!
//! A run uses IPv4, IPv6 or both ([`Families`]); it plays every case once per family it
//! uses (a *pass*, [`Family`]). Case files are written with IPv4 in mind; for an IPv6 pass
//! the runner rewrites what has an obvious IPv6 counterpart ([`adapt_object`]: a `/32` right
//! after an `{{ip ...}}` placeholder becomes `/128`, the literal `0.0.0.0/0` becomes `::/0`)
//! and reports cases with any other literal IPv4 address or prefix as IPv4-only
//! ([`ipv4_only_reason`]), skipped, never passed.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use serde_json::Value;

use crate::cases::{Case, Endpoint, PodPattern, Segment, segments, visit_strings};

/// The family of one pass: the addresses placeholders expand to and probes go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    /// Whether `ip` is of this family.
    pub fn holds(self, ip: &IpAddr) -> bool {
        match self {
            Family::Ipv4 => ip.is_ipv4(),
            Family::Ipv6 => ip.is_ipv6(),
        }
    }

    /// The first address of this family in `ips`.
    pub fn pick(self, ips: &[IpAddr]) -> Option<IpAddr> {
        ips.iter().copied().find(|ip| self.holds(ip))
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        })
    }
}

/// The families a run uses (`--ip-family`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Families {
    #[default]
    Ipv4,
    Ipv6,
    /// A dual-stack cluster; every case runs twice, IPv4 pass first.
    Dual,
}

impl Families {
    /// The passes of a run, in order.
    pub fn passes(self) -> &'static [Family] {
        match self {
            Families::Ipv4 => &[Family::Ipv4],
            Families::Ipv6 => &[Family::Ipv6],
            Families::Dual => &[Family::Ipv4, Family::Ipv6],
        }
    }
}

impl fmt::Display for Families {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Families::Ipv4 => "ipv4",
            Families::Ipv6 => "ipv6",
            Families::Dual => "dual",
        })
    }
}

impl FromStr for Families {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "ipv4" => Ok(Families::Ipv4),
            "ipv6" => Ok(Families::Ipv6),
            "dual" => Ok(Families::Dual),
            other => Err(format!("unknown IP family {other:?} (ipv4, ipv6 or dual)")),
        }
    }
}

/// What a case needs of a cluster beyond pods, which a cluster may lack in one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Need {
    /// `svc:` destinations, `backends`, `same_backend`.
    Services,
    /// `nodeport:` destinations.
    NodePorts,
    /// The `external` destination or `{{ip external}}`.
    External,
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Need::Services => "Services",
            Need::NodePorts => "nodePorts",
            Need::External => "the external host",
        })
    }
}

/// Everything in [`Need`] that `case` uses.
pub fn case_needs(case: &Case) -> BTreeSet<Need> {
    let mut needs = BTreeSet::new();
    let mut endpoint = |endpoint: &Endpoint| match endpoint {
        Endpoint::Service(_) => {
            needs.insert(Need::Services);
        }
        Endpoint::NodePort(_) => {
            needs.insert(Need::NodePorts);
        }
        Endpoint::External => {
            needs.insert(Need::External);
        }
        Endpoint::Pod(_) | Endpoint::Node(_) => {}
    };
    for step in &case.steps {
        for block in &step.expect {
            for pattern in block.allow.iter().chain(&block.deny) {
                for side in [&pattern.from, &pattern.to] {
                    if let PodPattern::Other(other) = side {
                        endpoint(other);
                    }
                }
            }
            for (from, to, _) in &block.backends {
                endpoint(from);
                endpoint(to);
            }
            for (from, to) in &block.same_backend {
                endpoint(from);
                endpoint(to);
            }
        }
    }
    if case
        .steps
        .iter()
        .flat_map(|step| &step.apply)
        .any(crate::cases::uses_external_ip)
    {
        needs.insert(Need::External);
    }
    needs
}

/// The prefix that stands for "every IPv4 address"; its IPv6 counterpart is [`ANY_V6`].
pub const ANY_V4: &str = "0.0.0.0/0";
/// What [`ANY_V4`] becomes in an IPv6 pass.
pub const ANY_V6: &str = "::/0";

/// Why `case` cannot run in an IPv6 pass, if it cannot: a literal IPv4 address or prefix
/// other than [`ANY_V4`] in an applied object, or a placeholder followed by a prefix length
/// other than `/32` (neither has an IPv6 counterpart the runner could pick).
pub fn ipv4_only_reason(case: &Case) -> Option<String> {
    let mut reason = None;
    for object in case.steps.iter().flat_map(|step| &step.apply) {
        let _: Result<(), ()> = visit_strings(object, &mut |text| {
            if reason.is_none() {
                reason = ipv4_only_text(text);
            }
            Ok(())
        });
        if reason.is_some() {
            break;
        }
    }
    reason
}

fn ipv4_only_text(text: &str) -> Option<String> {
    let trimmed = text.trim();
    if trimmed != ANY_V4 && is_ipv4_literal(trimmed) {
        return Some(format!("IPv4-only: literal IPv4 address {trimmed:?}"));
    }
    let parts = segments(text).ok()?;
    let mut after_placeholder = false;
    for part in parts {
        match part {
            Segment::Text(rest) => {
                if after_placeholder
                    && let Some(length) = prefix_length(rest)
                    && length != "32"
                {
                    return Some(format!(
                        "IPv4-only: prefix /{length} after an address placeholder in {text:?}"
                    ));
                }
                after_placeholder = false;
            }
            Segment::PodIp(_) | Segment::ExternalIp => after_placeholder = true,
        }
    }
    None
}

/// `a.b.c.d` or `a.b.c.d/n`.
fn is_ipv4_literal(text: &str) -> bool {
    let (address, length) = match text.split_once('/') {
        Some((address, length)) => (address, Some(length)),
        None => (text, None),
    };
    address.parse::<Ipv4Addr>().is_ok()
        && length.is_none_or(|length| length.parse::<u8>().is_ok_and(|length| length <= 32))
}

/// The digits of a `/n` at the start of `text`.
fn prefix_length(text: &str) -> Option<&str> {
    let rest = text.strip_prefix('/')?;
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    (end > 0).then(|| &rest[..end])
}

/// `object` as the `family` pass applies it (placeholders not yet substituted). IPv4 passes
/// take objects as written. IPv6 passes turn a `/32` right after an `{{ip ...}}` placeholder
/// into `/128` and a string that is exactly [`ANY_V4`] into [`ANY_V6`]; when the latter
/// makes a list hold `::/0` twice (lists that name both), the repeat is dropped.
pub fn adapt_object(object: &Value, family: Family) -> Value {
    match family {
        Family::Ipv4 => object.clone(),
        Family::Ipv6 => to_ipv6(object),
    }
}

fn to_ipv6(object: &Value) -> Value {
    match object {
        Value::String(text) => Value::String(text_to_ipv6(text)),
        Value::Array(items) => {
            let mut out: Vec<Value> = Vec::with_capacity(items.len());
            for item in items {
                let adapted = to_ipv6(item);
                if adapted.as_str() == Some(ANY_V6) && out.contains(&adapted) {
                    continue;
                }
                out.push(adapted);
            }
            Value::Array(out)
        }
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, item)| (key.clone(), to_ipv6(item)))
                .collect(),
        ),
        Value::Null | Value::Bool(_) | Value::Number(_) => object.clone(),
    }
}

fn text_to_ipv6(text: &str) -> String {
    if text.trim() == ANY_V4 {
        return ANY_V6.to_owned();
    }
    let Ok(parts) = segments(text) else {
        return text.to_owned();
    };
    if !parts.iter().any(|part| !matches!(part, Segment::Text(_))) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 8);
    let mut after_placeholder = false;
    for part in parts {
        match part {
            Segment::Text(rest) => {
                match prefix_length(rest) {
                    Some("32") if after_placeholder => {
                        out.push_str("/128");
                        out.push_str(&rest[3..]);
                    }
                    _ => out.push_str(rest),
                }
                after_placeholder = false;
            }
            Segment::PodIp(pod) => {
                out.push_str(&format!("{{{{ip {pod}}}}}"));
                after_placeholder = true;
            }
            Segment::ExternalIp => {
                out.push_str("{{ip external}}");
                after_placeholder = true;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::cases::CaseFile;

    #[test]
    fn slash_32_after_a_placeholder_becomes_slash_128() {
        let object = json!({
            "cidr": "{{ip x/b}}/32",
            "spaced": "{{ ip y/a }}/32",
            "external": "{{ip external}}/32",
            "except": ["{{ip x/b}}/32", "{{ip x/c}}"],
            "literal": "/32",
            "longer": "{{ip x/b}}/320",
        });
        assert_eq!(
            adapt_object(&object, Family::Ipv6),
            json!({
                "cidr": "{{ip x/b}}/128",
                "spaced": "{{ip y/a}}/128",
                "external": "{{ip external}}/128",
                "except": ["{{ip x/b}}/128", "{{ip x/c}}"],
                "literal": "/32",
                "longer": "{{ip x/b}}/320",
            })
        );
        assert_eq!(adapt_object(&object, Family::Ipv4), object);
    }

    #[test]
    fn any_ipv4_becomes_any_ipv6_once() {
        let object = json!({
            "ipBlock": {"cidr": "0.0.0.0/0", "except": ["{{ip x/b}}/32"]},
            "networks": ["0.0.0.0/0", "::/0"],
            "name": "0.0.0.0/0-policy",
        });
        assert_eq!(
            adapt_object(&object, Family::Ipv6),
            json!({
                "ipBlock": {"cidr": "::/0", "except": ["{{ip x/b}}/128"]},
                "networks": ["::/0"],
                "name": "0.0.0.0/0-policy",
            })
        );
    }

    fn case_applying(object: &str) -> Case {
        let text = format!(
            "format: weir-reachability/v1\nmodel: {{namespaces: [x], pods: [a, b], ports: [80], protocols: [TCP]}}\ncases:\n  - name: c\n    steps:\n      - apply:\n          - {object}\n"
        );
        let file: CaseFile = text.parse().expect("case file");
        file.cases[0].clone()
    }

    #[test]
    fn literal_ipv4_prefixes_make_a_case_ipv4_only() {
        let policy = |cidr: &str| {
            format!(
                "{{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {{name: p, namespace: x}}, spec: {{podSelector: {{}}, egress: [{{to: [{{ipBlock: {{cidr: \"{cidr}\"}}}}]}}]}}}}"
            )
        };
        for cidr in ["{{ip x/b}}/32", "0.0.0.0/0", "::/0", "fd00::/8"] {
            assert_eq!(
                ipv4_only_reason(&case_applying(&policy(cidr))),
                None,
                "{cidr}"
            );
        }
        for cidr in ["10.0.0.0/8", "192.168.1.1", "0.0.0.0/1", "{{ip x/b}}/24"] {
            let reason = ipv4_only_reason(&case_applying(&policy(cidr)));
            assert!(
                reason
                    .as_deref()
                    .is_some_and(|r| r.starts_with("IPv4-only")),
                "{cidr}: {reason:?}"
            );
        }
    }

    #[test]
    fn needs_follow_destinations_and_placeholders() {
        let case = case_applying(
            "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: p, namespace: x}, spec: {podSelector: {}, egress: [{to: [{ipBlock: {cidr: \"{{ip external}}/32\"}}]}]}}",
        );
        assert_eq!(case_needs(&case), BTreeSet::from([Need::External]));
    }

    #[test]
    fn families_parse_and_order_their_passes() {
        assert_eq!("dual".parse(), Ok(Families::Dual));
        assert_eq!(Families::Dual.passes(), &[Family::Ipv4, Family::Ipv6]);
        assert_eq!(Families::default().passes(), &[Family::Ipv4]);
        assert!("ipv5".parse::<Families>().is_err());
        let ips: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()];
        assert_eq!(Family::Ipv6.pick(&ips), Some(ips[1]));
    }
}
