//! xdplb XDP programs. `xdplb` is the director; the others are helpers the controller,
//! tests and benchmarks attach next to it. Each entry point reads like the packet's path.
#![no_std]
#![no_main]

mod flow;
mod fwd;
mod parse;
mod select;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{mode, reason};
use network_types::eth::EthHdr;

#[xdp]
pub fn xdplb(ctx: XdpContext) -> u32 {
    match try_xdplb(&ctx) {
        Ok(action) => action,
        Err(slot) => {
            stats::reason(slot);
            xdp_action::XDP_PASS
        }
    }
}

#[inline(always)]
fn try_xdplb(ctx: &XdpContext) -> Result<u32, u32> {
    let pkt = parse::parse(ctx)?;
    let svc = select::service(&pkt.key)?;
    let choice = flow::lookup_or_schedule(&svc, &pkt.key)?;
    let (action, slot) = match svc.mode {
        mode::DR => (fwd::dr::forward(ctx, choice.backend)?, reason::FWD_DR),
        _ => return Err(reason::PASS_NO_BACKEND),
    };
    stats::forwarded(svc.id, choice.id, pkt.len, choice.new);
    stats::reason(slot);
    Ok(action)
}

/// Pass-through: attached to the peer of a veth that receives `XDP_TX`/`XDP_REDIRECT`
/// frames, because veth drops them unless the receiving end runs XDP (PITFALLS.md).
#[xdp]
pub fn xdplb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Benchmark floor: the cheapest useful forwarder (swap MACs, `XDP_TX`), measured next to
/// the director in the same run by `cargo xtask bench`.
#[xdp]
pub fn xdplb_floor(ctx: XdpContext) -> u32 {
    match parse::ptr_at::<EthHdr>(&ctx, 0) {
        Some(eth) => {
            unsafe {
                let eth = &mut *eth;
                core::mem::swap(&mut eth.dst_addr, &mut eth.src_addr);
            }
            xdp_action::XDP_TX
        }
        None => xdp_action::XDP_PASS,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
