//! Weft's overlay classifiers, attached to the TUN device by the agent.
//!
//! Network policy: [`policy`] (`weft_policy_ingress`, `weft_policy_egress`).
//!
//! The counting classifiers only count: packets and bytes per direction into the
//! per-CPU array [`WEFT_COUNTERS`], and they never drop or redirect
//! (`TC_ACT_UNSPEC`, -1: "no verdict", the next program or the stack
//! decides; with tcx links it is `TCX_NEXT`, the only value that lets the
//! next program on the hook run, e.g. the policy classifiers).
//!
//! One entry point per hook because a TC program cannot tell which hook
//! ran it: `skb->ingress_ifindex` equals the device's own index on egress
//! too when the kernel forwards a packet back out of the device it came in
//! on (overlay hairpin through a relay node).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    macros::{classifier, map},
    maps::PerCpuArray,
    programs::TcContext,
};
use weft_ebpf_common::{COUNTER_SLOTS, Counters, Direction};

mod policy;

/// Per-CPU [`Counters`], indexed by [`Direction::index`]; the agent sums the
/// CPUs. Named as `weft_ebpf_common::COUNTERS_MAP` says.
#[map(name = "WEFT_COUNTERS")]
static WEFT_COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Counts what enters the kernel from the device.
#[classifier]
fn weft_count_ingress(ctx: TcContext) -> i32 {
    verdict(try_classify(&ctx, Direction::Ingress))
}

/// Counts what the kernel sends out of the device.
#[classifier]
fn weft_count_egress(ctx: TcContext) -> i32 {
    verdict(try_classify(&ctx, Direction::Egress))
}

/// Why a packet could not be counted. It still passes: a counter must never
/// cost traffic (policy, unlike counting, will fail closed).
#[derive(Clone, Copy)]
enum Error {
    /// The map has no slot for the direction (a map/common mismatch).
    NoCounterSlot,
}

#[inline(always)]
fn verdict(result: Result<(), Error>) -> i32 {
    match result {
        Ok(()) | Err(Error::NoCounterSlot) => TC_ACT_UNSPEC,
    }
}

#[inline(always)]
fn try_classify(ctx: &TcContext, direction: Direction) -> Result<(), Error> {
    let slot = WEFT_COUNTERS
        .get_ptr_mut(direction.index())
        .ok_or(Error::NoCounterSlot)?;
    // SAFETY: the kernel returned a pointer to this CPU's value of the slot,
    // valid and exclusively ours while the program runs (per-CPU map; BPF
    // programs run with migration disabled).
    unsafe { (*slot).record(ctx.len()) };
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never loaded.
    loop {}
}

/// Declared to the kernel; no GPL-only helper is used.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
