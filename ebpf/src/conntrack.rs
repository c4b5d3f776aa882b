//! Stateful enforcement: a flow is decided once; later packets and replies take the fast
//! path. Entries remember the policy generation they were decided under, so a policy change
//! re-decides established flows on their next packet (revoked access stops existing flows).
//! An entry idle for longer than its protocol's timeout is treated as absent: the packet
//! is decided as a new flow in its own direction (so the reply direction of a flow that
//! went quiet is no longer admitted by default).

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::TcContext,
};
use weir_common::{
    conntrack::{CtEntry, CtKey},
    endpoint::EndpointInfo,
    event::{DropReason, FlowEvent},
    policy::proto,
};

use crate::{
    events::{emit, record_drop},
    maps::{CONNTRACK, RULE_HITS, SCRATCH_KEYS, SERVICE_NAT, count, node_config},
    nat,
    parse::{self, Packet, TCP_FIN, TCP_RST},
    policy::admit,
};

const REFRESH_NS: u64 = 1_000_000_000;

/// Runs conntrack and policy for `pkt`. `src_ep`/`dst_ep` are the local endpoints owning the
/// packet's source and destination addresses, if any; `flags` are [`CtEntry`] flags the
/// caller knows of the flow (a Service translation). Ok: forward; Ok(true) when the packet
/// is the reply of a flow a Service translated on this node, now rewritten to come from the
/// Service's frontend. Err: already counted and reported, drop.
#[inline(always)]
pub fn enforce(
    ctx: &TcContext,
    pkt: &mut Packet,
    src_ep: Option<&EndpointInfo>,
    dst_ep: Option<&EndpointInfo>,
    flags: u32,
) -> Result<bool, ()> {
    let key = pkt.ct_key();
    let config = node_config();
    let generation = config.policy_gen();
    let timeouts = config.ct_timeouts();
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };

    if let Some(entry) = CONNTRACK.get_ptr_mut(&key) {
        // SAFETY: map value pointer; concurrent updates only race on advisory fields.
        let entry = unsafe { &mut *entry };
        if !timeouts.expired(key.proto(), entry.flags(), entry.last_seen_ns(), now) {
            if entry.policy_gen() != generation {
                recheck(ctx, &key, src_ep, dst_ep, entry, generation)?;
            }
            touch(entry, now, pkt.tcp_flags, flags);
            return Ok(false);
        }
        // Expired: decided below as a new flow, whose entry replaces this one.
    }
    let reverse = key.reversed();
    if let Some(entry) = CONNTRACK.get_ptr_mut(&reverse) {
        // SAFETY: as above.
        let entry = unsafe { &mut *entry };
        if !timeouts.expired(reverse.proto(), entry.flags(), entry.last_seen_ns(), now) {
            if entry.policy_gen() != generation {
                // The flow was opened from the other end: decide it in its own direction.
                recheck(ctx, &reverse, dst_ep, src_ep, entry, generation)?;
            }
            touch(entry, now, pkt.tcp_flags, CtEntry::FLAG_REPLIED);
            if entry.flags() & CtEntry::FLAG_SERVICE != 0 {
                return nat::reverse(ctx, pkt).map(|()| true);
            }
            return Ok(false);
        }
        // The reply of a flow that expired: that flow is over.
        let service = entry.flags() & CtEntry::FLAG_SERVICE != 0;
        let _ = CONNTRACK.remove(&reverse);
        if service {
            // Its translation went with it: never deliver it untranslated.
            record_drop(ctx, Some(&key), DropReason::ServiceNatLost, 0, 0);
            return Err(());
        }
    }

    // An ICMP error about a live flow conntrack knows (a port unreachable, fragmentation
    // needed on the path, a TTL exceeded) belongs to that flow: policy admitted the flow, so
    // it admits what the network says about it, from wherever it comes. An expired flow
    // vouches for nothing.
    if related_to_known_flow(ctx, pkt, now) {
        return Ok(false);
    }

    // The reply of a translated flow whose entry is gone (expired and swept): it would
    // reach the client untranslated, from the backend's address.
    if flags & CtEntry::FLAG_SERVICE == 0 {
        // SAFETY: value copied out of the map.
        if let Some(nat) = unsafe { SERVICE_NAT.get(&key) } {
            if nat.is_reply() && !nat.is_snat() {
                record_drop(ctx, Some(&key), DropReason::ServiceNatLost, 0, 0);
                return Err(());
            }
        }
    }

    let admission = match admit(&key, src_ep, dst_ep) {
        Ok(a) => a,
        Err(d) => {
            record_drop(ctx, Some(&key), d.reason, d.policy, d.rule);
            return Err(());
        }
    };
    let mut flags = flags;
    if src_ep.is_some() {
        flags |= CtEntry::FLAG_EGRESS_CHECKED;
    }
    if dst_ep.is_some() {
        flags |= CtEntry::FLAG_INGRESS_CHECKED;
    }
    let entry = CtEntry::new(
        now,
        generation,
        flags,
        admission.egress_rule,
        admission.ingress_rule,
    );
    if CONNTRACK.insert(&key, &entry, 0).is_err() {
        // The table is full of live flows: refuse this one, keep theirs.
        record_drop(ctx, Some(&key), DropReason::ConntrackFull, 0, 0);
        return Err(());
    }
    if admission.egress_rule != 0 {
        count(&RULE_HITS, admission.egress_rule);
    }
    if admission.ingress_rule != 0 {
        count(&RULE_HITS, admission.ingress_rule);
    }
    let rate = node_config().sample_rate();
    // SAFETY: helper without preconditions.
    if rate != 0 && unsafe { bpf_get_prandom_u32() } % rate == 0 {
        let rule = if admission.ingress_rule != 0 {
            admission.ingress_rule
        } else {
            admission.egress_rule
        };
        emit(ctx, Some(&key), FlowEvent::VERDICT_ALLOW, 0, 0, rule);
    }
    Ok(false)
}

/// Whether `pkt` is an ICMP error about a flow conntrack knows and that has not expired (in
/// either direction). The keys live in per-CPU scratch space: the stack has no room left for
/// two more.
#[inline(always)]
fn related_to_known_flow(ctx: &TcContext, pkt: &Packet, now: u64) -> bool {
    if pkt.proto != proto::ICMP && pkt.proto != proto::ICMPV6 {
        return false;
    }
    let (Some(quoted), Some(reversed)) = (SCRATCH_KEYS.get_ptr_mut(0), SCRATCH_KEYS.get_ptr_mut(1))
    else {
        return false;
    };
    // SAFETY: per-CPU scratch values, used by this program run alone.
    let (quoted, reversed) = unsafe { (&mut *quoted, &mut *reversed) };
    if !parse::quoted(ctx, pkt, quoted) {
        return false;
    }
    if live(quoted, now) {
        return true;
    }
    *reversed = quoted.reversed();
    live(reversed, now)
}

/// Whether conntrack has an entry for `key` that has not expired.
#[inline(always)]
fn live(key: &CtKey, now: u64) -> bool {
    match CONNTRACK.get_ptr(key) {
        Some(entry) => {
            // SAFETY: map value pointer, read only.
            let entry = unsafe { &*entry };
            !node_config().ct_timeouts().expired(
                key.proto(),
                entry.flags(),
                entry.last_seen_ns(),
                now,
            )
        }
        None => false,
    }
}

#[inline(always)]
fn recheck(
    ctx: &TcContext,
    flow: &CtKey,
    src_ep: Option<&EndpointInfo>,
    dst_ep: Option<&EndpointInfo>,
    entry: &mut CtEntry,
    generation: u32,
) -> Result<(), ()> {
    match admit(flow, src_ep, dst_ep) {
        Ok(_) => {
            entry.set_policy_gen(generation);
            Ok(())
        }
        Err(d) => {
            let _ = CONNTRACK.remove(flow);
            record_drop(ctx, Some(flow), DropReason::PolicyRevoked, d.policy, d.rule);
            Err(())
        }
    }
}

#[inline(always)]
fn touch(entry: &mut CtEntry, now: u64, tcp_flags: u8, seen: u32) {
    let mut flags = entry.flags() | seen;
    if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        flags |= CtEntry::FLAG_CLOSING;
    }
    if flags != entry.flags() {
        entry.set_flags(flags);
    }
    if now.wrapping_sub(entry.last_seen_ns()) > REFRESH_NS {
        entry.set_last_seen_ns(now);
    }
}
