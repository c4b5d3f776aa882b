//! Drop counters and flow events.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use weir_common::{
    conntrack::CtKey,
    event::{DropReason, FlowEvent},
};

use crate::maps::{DROPS, EVENTS, POLICY_DROPS, count};

/// Counts a drop by reason (and by rule set for policy drops) and reports it as a flow event.
#[inline(always)]
pub fn record_drop(
    ctx: &TcContext,
    flow: Option<&CtKey>,
    reason: DropReason,
    policy: u32,
    rule: u32,
) {
    count(&DROPS, reason as u32);
    if policy != 0 {
        count(&POLICY_DROPS, policy);
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

#[inline(always)]
pub fn emit(
    ctx: &TcContext,
    flow: Option<&CtKey>,
    verdict: u8,
    reason: u32,
    policy: u32,
    rule: u32,
) {
    let Some(mut entry) = EVENTS.reserve::<FlowEvent>(0) else {
        return;
    };
    let mut ev = FlowEvent {
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        verdict,
        reason,
        // SAFETY: the context pointer is valid for the program's lifetime.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        policy,
        rule,
        ..FlowEvent::default()
    };
    if let Some(f) = flow {
        ev.saddr = *f.saddr();
        ev.daddr = *f.daddr();
        ev.sport = f.sport();
        ev.dport = f.dport();
        ev.proto = f.proto();
    }
    entry.write(ev);
    entry.submit(0);
}
