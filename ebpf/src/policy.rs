//! The verdict: two LPM lookups per direction, whatever the number of policies and rules.

use aya_ebpf::maps::lpm_trie::Key;
use weir_common::{
    conntrack::CtKey,
    endpoint::EndpointInfo,
    event::DropReason,
    ip::IpKey,
    policy::{CLASS_UNMATCHED, NOT_ISOLATED, VerdictKey},
};

use crate::maps::{HOST_ADDRS, PEER_CLASSES, PEER_HOSTS, VERDICTS, VERDICTS_EXACT};

/// A flow admitted by policy, with the rules that admitted it (0: direction not isolated).
pub struct Admission {
    pub egress_rule: u32,
    pub ingress_rule: u32,
}

/// A flow policy refuses.
pub struct Denial {
    pub reason: DropReason,
    pub policy: u32,
    pub rule: u32,
}

/// Class of `peer` as seen by this node's policies.
#[inline(always)]
fn peer_class(peer: &IpKey) -> u32 {
    // SAFETY: value copied out of the map.
    if let Some(c) = unsafe { PEER_HOSTS.get(peer) } {
        return c.class();
    }
    match PEER_CLASSES.get(Key::new(128, *peer)) {
        Some(c) => c.class(),
        None => CLASS_UNMATCHED,
    }
}

/// Does rule set `policy` let traffic to/from `peer` on `proto`/`port` through?
/// Ok(rule) when allowed, Err(rule) when denied (rule 0: nothing matched, default deny).
#[inline(always)]
pub fn check(policy: u32, peer: &IpKey, proto: u8, port: u16) -> Result<u32, u32> {
    if policy == NOT_ISOLATED {
        return Ok(0);
    }
    let key = VerdictKey::new(policy, peer_class(peer), proto, port);
    // A full-length entry is the longest possible match: look for it first, by hash.
    // SAFETY: value copied out of the map.
    let verdict = match unsafe { VERDICTS_EXACT.get(&key) } {
        Some(v) => Some(*v),
        None => VERDICTS
            .get(Key::new(VerdictKey::PREFIX_FULL, key))
            .copied(),
    };
    match verdict {
        Some(v) if v.is_allow() => Ok(v.rule()),
        Some(v) => Err(v.rule()),
        None => Err(0),
    }
}

/// Decides a new flow (or re-decides an established one after a policy change), given as
/// the key of its first packet: the source's egress policy if the source is a local pod,
/// then the destination's ingress policy if the destination is a local pod. Traffic from
/// this node's own addresses to its pods is always allowed (kubelet probes). That exemption
/// is keyed on the source address, so it relies on `from_network` dropping every packet from
/// the network that claims one of those addresses: the only packets reaching here with such
/// a source are the host stack's own (through `to_pod`, and their replies).
#[inline(always)]
pub fn admit(
    flow: &CtKey,
    src_ep: Option<&EndpointInfo>,
    dst_ep: Option<&EndpointInfo>,
) -> Result<Admission, Denial> {
    let port = flow.dport();
    let mut admission = Admission {
        egress_rule: 0,
        ingress_rule: 0,
    };
    if let Some(src) = src_ep {
        let policy = src.egress_policy();
        let reason = if src.is_host() {
            DropReason::HostPolicy
        } else {
            DropReason::PolicyEgress
        };
        admission.egress_rule =
            check(policy, flow.daddr(), flow.proto(), port).map_err(|rule| Denial {
                reason,
                policy,
                rule,
            })?;
    }
    if let Some(dst) = dst_ep {
        let policy = dst.ingress_policy();
        if policy != NOT_ISOLATED && !is_host(flow.saddr()) {
            let reason = if dst.is_host() {
                DropReason::HostPolicy
            } else {
                DropReason::PolicyIngress
            };
            admission.ingress_rule =
                check(policy, flow.saddr(), flow.proto(), port).map_err(|rule| Denial {
                    reason,
                    policy,
                    rule,
                })?;
        }
    }
    Ok(admission)
}

#[inline(always)]
fn is_host(addr: &IpKey) -> bool {
    // SAFETY: existence check only.
    unsafe { HOST_ADDRS.get(addr).is_some() }
}
