//! Drop counters and flow events.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use weir_common::{
    conntrack::CtKey,
    event::{DropReason, FlowEvent},
    ip::IpKey,
    policy::FAIL_CLOSED,
};

use crate::maps::{DROPS, EVENTS, POLICY_DROPS, RULE_HITS, count};

/// Counts a drop by reason, and a policy drop once more: by the rule that denied it (a
/// ClusterNetworkPolicy Deny rule, in the same per-rule counters that count what allowing
/// rules admit), or, when no rule denied it (nothing allowed it), by its rule set. So every
/// policy drop costs the same two counter updates, whatever decided it. Reports the drop as a
/// flow event.
#[inline(always)]
pub fn record_drop(
    ctx: &TcContext,
    flow: Option<&CtKey>,
    reason: DropReason,
    policy: u32,
    rule: u32,
) {
    count(&DROPS, reason as u32);
    // Only policy drops name a rule set; other drops may carry another id in `rule` (a
    // Service port's).
    if policy != 0 {
        if rule != 0 {
            count(&RULE_HITS, rule);
        } else if policy == FAIL_CLOSED {
            // No rule set has id 0 (it means "not isolated"): its slot counts fail-closed
            // drops.
            count(&POLICY_DROPS, 0);
        } else {
            count(&POLICY_DROPS, policy);
        }
    }
    emit(
        ctx,
        flow,
        FlowEvent::VERDICT_DROP,
        reason as u32,
        policy,
        rule,
    );
}

/// [`record_drop`] for the XDP program: counts the drop by reason and reports it as a flow
/// event on `ifindex`: `policy` is the rule set of an untracked host-policy rule `id`, 0 when
/// `id` is a prefilter entry (or nothing).
#[inline(always)]
pub fn record_xdp_drop(ifindex: u32, flow: &CtKey, reason: DropReason, policy: u32, id: u32) {
    count(&DROPS, reason as u32);
    emit_on(
        ifindex,
        Some(flow),
        FlowEvent::VERDICT_DROP,
        reason as u32,
        policy,
        id,
    );
}

#[inline(always)]
pub fn emit(
    ctx: &TcContext,
    flow: Option<&CtKey>,
    verdict: u8,
    reason: u32,
    policy: u32,
    rule: u32,
) {
    // SAFETY: the skb the kernel passed this program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    emit_on(ifindex, flow, verdict, reason, policy, rule);
}

/// [`emit`] for programs without a packet (the socket hooks: interface 0).
#[inline(always)]
pub fn emit_on(
    ifindex: u32,
    flow: Option<&CtKey>,
    verdict: u8,
    reason: u32,
    policy: u32,
    rule: u32,
) {
    let Some(mut entry) = EVENTS.reserve::<FlowEvent>(0) else {
        return;
    };
    // Written field by field into the ring buffer: a FlowEvent built on the stack first
    // would cost 64 of the programs' 512 bytes at every call site.
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, exclusively owned FlowEvent; every field is written
    // (padding included) before the entry is submitted.
    unsafe {
        match flow {
            Some(f) => {
                (*ev).saddr = *f.saddr();
                (*ev).daddr = *f.daddr();
                (*ev).sport = f.sport();
                (*ev).dport = f.dport();
                (*ev).proto = f.proto();
            }
            None => {
                (*ev).saddr = IpKey::UNSPECIFIED;
                (*ev).daddr = IpKey::UNSPECIFIED;
                (*ev).sport = 0;
                (*ev).dport = 0;
                (*ev).proto = 0;
            }
        }
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).verdict = verdict;
        (*ev)._pad = [0; 2];
        (*ev).reason = reason;
        (*ev).ifindex = ifindex;
        (*ev).policy = policy;
        (*ev).rule = rule;
    }
    entry.submit(0);
}
