//! xdplb XDP programs. `xdplb` is the director; the others are helpers the controller,
//! tests and benchmarks attach next to it. Each entry point reads like the packet's path.
#![no_std]
#![no_main]

mod csum;
mod flow;
mod fwd;
mod icmp;
mod parse;
mod select;
mod stats;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::{Array, DevMapHash, PerCpuArray, ProgramArray},
    programs::XdpContext,
    Global,
};
use aya_log_ebpf::debug;
use icmp::Icmp;
use lb_common::{
    mode, reason, stage, Backend, IPPROTO_ICMP, IPPROTO_ICMPV6, SERVICE_F_DROP_NO_BACKEND,
};
use network_types::eth::EthHdr;

/// Per-packet debug logging (aya-log), set by `xdplb run --debug-log`. A read-only global:
/// the verifier knows its value, so with 0 the logging branches are removed from the
/// program and the fast path pays nothing.
#[unsafe(no_mangle)]
static DEBUG_LOG: Global<u8> = Global::new(0);

/// Benchmark only (`cargo xtask bench`'s stage breakdown, [`lb_common::stage`]): end an
/// established flow's packet with `XDP_TX` after this stage. A read-only global like
/// `DEBUG_LOG`: 0 in every real load, and the verifier then removes the cuts.
#[unsafe(no_mangle)]
static STOP_AFTER: Global<u8> = Global::new(0);

/// Set at load time when a service has `ring_fast_path: true`: TCP packets try the ring
/// before the flow table ([`select::ring_fast`]). A read-only global: with 0 the
/// verifier removes the branch, so directors without such services pay nothing.
#[unsafe(no_mangle)]
static RING_FAST: Global<u8> = Global::new(0);

/// Whether the stage breakdown ends the packet after `stage`.
#[inline(always)]
pub(crate) fn stop_after(stage: u8) -> bool {
    STOP_AFTER.load() == stage
}

/// Whether the stage breakdown cut the packet at the end of the forwarding or inside it
/// (the NAT and TUN stages): it ends before the counters, so every cut's time leaves them
/// out and the tables' last step ("the whole path") is what they cost. (Until 2026-11-24
/// only the `FORWARD` cut did: the NAT and TUN cuts inside counted them, which moved their
/// cost into the step of the first such cut.)
#[inline(always)]
fn cut_in_forward() -> bool {
    STOP_AFTER.load() >= stage::FORWARD
}

#[xdp]
pub fn xdplb(ctx: XdpContext) -> u32 {
    match try_xdplb(&ctx) {
        Ok(action) => action,
        Err(slot) => {
            stats::reason(slot);
            if DEBUG_LOG.load() != 0 {
                log_pass(&ctx, slot);
            }
            xdp_action::XDP_PASS
        }
    }
}

#[inline(always)]
fn try_xdplb(ctx: &XdpContext) -> Result<u32, u32> {
    let mut slot = core::mem::MaybeUninit::<parse::Parsed>::uninit();
    // SAFETY: all zeros is a valid summary (56 bytes, 8-aligned).
    let pkt = unsafe { lb_ebpf::zeroed_in_place(&mut slot) };
    parse::parse(ctx, pkt)?;
    let stop = STOP_AFTER.load();
    if stop_after(stage::PARSE)
        || (stop > stage::PARSE && stop < stage::LIVENESS && bench_stage(pkt))
    {
        return Ok(xdp_action::XDP_TX);
    }
    if pkt.key.proto == IPPROTO_ICMP || pkt.key.proto == IPPROTO_ICMPV6 {
        let (action, slot) = match icmp::handle(ctx, pkt)? {
            Icmp::Done(action, slot) => (action, slot),
            Icmp::Steer(mode, id) => {
                let backend = select::backend(id).ok_or(reason::PASS_NO_BACKEND)?;
                let choice = flow::Choice {
                    id,
                    ..flow::Choice::default()
                };
                (
                    forward(ctx, pkt, mode, backend, &choice)?.0,
                    reason::ICMP_ERROR_STEERED,
                )
            }
        };
        stats::reason(slot);
        return Ok(action);
    }
    // The ring fast path, where the service has it: TCP packets on clean slots, SYNs too.
    let fast = if RING_FAST.load() != 0 && pkt.key.proto == lb_common::IPPROTO_TCP {
        match select::fast_service(&pkt.key) {
            Some(_) if stop_after(stage::RING_SERVICE) => return Ok(xdp_action::XDP_TX),
            Some(svc) => select::ring_fast(svc, &pkt.key).map(|(id, b)| (svc, id, b)),
            None => None,
        }
    } else {
        None
    };
    // Established flows first: one table lookup (FLOWS) instead of two (SERVICES, FLOWS).
    // The backend's entry, where the way here already looked it up (`None`: look it up).
    let (svc, choice, known) = match fast {
        Some(_) if stop_after(stage::RING_SLOT) => return Ok(xdp_action::XDP_TX),
        Some((svc, id, backend)) => {
            // A FIN or RST ends the entry the table may hold (a connection begun while the
            // slot was dirty): on a clean slot its backend is the ring's.
            if pkt.tcp_end {
                flow::end(&pkt.key);
            }
            (
                svc,
                flow::Choice {
                    id,
                    new: pkt.tcp_syn,
                    ..flow::Choice::default()
                },
                Some(backend),
            )
        }
        None => match flow::established(&pkt.key, pkt.tcp_end, pkt.tcp_syn) {
            flow::Established::Hit(..) if stop_after(stage::LIVENESS) => {
                return Ok(xdp_action::XDP_TX);
            }
            flow::Established::Hit(svc, choice, backend) => (svc, choice, Some(backend)),
            // For no VIP address: no service; perhaps a backend's reply to a NAT flow.
            flow::Established::NotVip => {
                return not_for_a_vip(ctx, pkt, reason::PASS_NON_VIP);
            }
            miss => {
                let svc = match select::service(&pkt.key) {
                    Ok(svc) => svc,
                    // Not for a VIP after all (another address shares its filter bit).
                    Err(slot) => return not_for_a_vip(ctx, pkt, slot),
                };
                let mut how = flow::how::RECORD;
                if flow::client_ends(svc, pkt.tcp_end) {
                    how |= flow::how::ENDING;
                }
                if matches!(miss, flow::Established::Absent) {
                    how |= flow::how::ABSENT;
                }
                if pkt.tcp_syn {
                    how |= flow::how::OPENING;
                }
                match flow::lookup_or_schedule(svc, &pkt.key, how) {
                    Ok(c) => (svc, c, None),
                    // Every backend is down or drained, and the service prefers a drop to the kernel.
                    Err(reason::PASS_NO_BACKEND) if svc.flags & SERVICE_F_DROP_NO_BACKEND != 0 => {
                        stats::reason(reason::DROP_NO_BACKEND);
                        return Ok(xdp_action::XDP_DROP);
                    }
                    Err(slot) => return Err(slot),
                }
            }
        },
    };
    let backend = match known {
        Some(backend) => backend,
        None => select::backend(choice.id).ok_or(reason::PASS_NO_BACKEND)?,
    };
    let (action, slot) = forward(ctx, pkt, svc.mode, backend, &choice)?;
    if cut_in_forward() {
        return Ok(action);
    }
    stats::forwarded(svc.id, choice.id, pkt.len, choice.new);
    stats::reason(match slot {
        reason::FWD_DR if fast.is_some() => reason::FWD_DR_RING,
        reason::FWD_TUN if fast.is_some() => reason::FWD_TUN_RING,
        slot => slot,
    });
    if DEBUG_LOG.load() != 0 {
        log_forward(ctx, svc.id, choice.id, choice.new as u32);
    }
    Ok(action)
}

/// A packet for no service (`slot`: why): a backend's reply to a NAT flow, or the kernel's.
#[inline(always)]
fn not_for_a_vip(ctx: &XdpContext, pkt: &parse::Parsed, slot: u32) -> Result<u32, u32> {
    if stop_after(stage::NOT_VIP) {
        return Ok(xdp_action::XDP_TX);
    }
    let action =
        fwd::nat::reply(ctx, pkt).map_err(|e| if e == reason::PASS_NON_VIP { slot } else { e })?;
    if cut_in_forward() {
        return Ok(action);
    }
    stats::reason(reason::FWD_NAT_REPLY);
    Ok(action)
}

/// The stage breakdown's first cuts: after parsing, after the flow-table lookup, after the
/// service check (the work [`flow::established`] does up to there). False when the flow is
/// not established yet: the packet goes on and creates it.
#[inline(never)]
fn bench_stage(pkt: &parse::Parsed) -> bool {
    let s = STOP_AFTER.load();
    if s >= stage::FLOW_LOOKUP {
        let Some((service, _)) = flow::found(&pkt.key) else {
            return false;
        };
        if s >= stage::SERVICE {
            return select::service_by_id(service, &pkt.key).is_some();
        }
    }
    true
}

/// Send toward `backend` (`choice.id`) by the service's mode: (XDP action, counter slot).
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    pkt: &parse::Parsed,
    mode: u8,
    backend: &Backend,
    choice: &flow::Choice,
) -> Result<(u32, u32), u32> {
    match mode {
        mode::DR => Ok((fwd::dr::forward(ctx, backend)?, reason::FWD_DR)),
        mode::TUN => match fwd::tun::forward(ctx, pkt, backend, choice.id)? {
            fwd::tun::Tun::Sent(action) => Ok((action, reason::FWD_TUN)),
            fwd::tun::Tun::TooBig(mtu) => icmp::too_big(ctx, pkt, mtu),
        },
        mode::NAT => Ok((fwd::nat::forward(ctx, pkt, choice, false)?, reason::FWD_NAT)),
        mode::FULLNAT => Ok((fwd::nat::forward(ctx, pkt, choice, true)?, reason::FWD_NAT)),
        _ => Err(reason::PASS_NO_BACKEND),
    }
}

/// Out of line so the logging code's stack use stays out of the fast path's frame.
#[inline(never)]
fn log_pass(ctx: &XdpContext, slot: u32) {
    debug!(ctx, "pass reason {}", slot);
}

/// Out of line so the logging code's stack use stays out of the fast path's frame.
#[inline(never)]
fn log_forward(ctx: &XdpContext, service: u32, backend: u32, new: u32) {
    debug!(
        ctx,
        "service {} -> backend {} new_flow {}", service, backend, new
    );
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
    match lb_ebpf::ptr_at::<EthHdr>(&ctx, 0) {
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

/// Benchmark floor for encapsulation, behind the driver that strips the outer header
/// (`BENCH_STRIP_OUTER`/`BENCH_STRIP_OUTER6`): room for it made again
/// (`bpf_xdp_adjust_head`: 20 bytes before an IPv4 packet, 40 before an IPv6 one, as IPIP
/// and IPv6-in-IPv6 carry them), the Ethernet header written in front with its MACs
/// swapped, `XDP_TX`. The old outer header's bytes are still in the buffer, so each run
/// leaves the frame as it found it. What any forwarder that adds an outer header pays in
/// this harness: the driver's strip and the room, two helper calls.
#[xdp]
pub fn xdplb_floor_encap(ctx: XdpContext) -> u32 {
    let Some(eth) = lb_ebpf::ptr_at::<EthHdr>(&ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: 14 bytes, bounds-checked; copied before the head moves.
    let eth = unsafe { *eth };
    let room: i32 = if eth.ether_type == 0x86ddu16.to_be() {
        40
    } else {
        20
    };
    if unsafe { aya_ebpf::helpers::bpf_xdp_adjust_head(ctx.ctx, -room) } != 0 {
        return xdp_action::XDP_PASS;
    }
    let Some(front) = lb_ebpf::ptr_at::<EthHdr>(&ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: 14 bytes, bounds-checked after the move.
    unsafe {
        (*front).dst_addr = eth.src_addr;
        (*front).src_addr = eth.dst_addr;
        (*front).ether_type = eth.ether_type;
    }
    xdp_action::XDP_TX
}

/// End-to-end benchmark receiver: counts every frame (per CPU) and drops it.
#[map]
static SINK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn xdplb_sink(_ctx: XdpContext) -> u32 {
    if let Some(c) = SINK.get_ptr_mut(0) {
        unsafe { *c += 1 };
    }
    xdp_action::XDP_DROP
}

/// What [`xdplb_respond`] answers and counts: [0] the service port (host order), [1] the
/// VIP (its four bytes as they sit in the packet, read as one native word).
#[map]
static BENCH_RESPOND: Array<u32> = Array::with_max_entries(2, 0);

/// End-to-end benchmark backend and client in one (the two-way rows): on the generator's
/// veth, a TCP/IPv4 frame to the service port (`BENCH_RESPOND[0]`) is a client packet the
/// director forwarded, and is answered as its backend would: MACs, addresses, ports, and
/// sequence and acknowledgement numbers swapped (swaps leave both checksums as they are),
/// then `XDP_TX` back to the director. A frame from the VIP's service port is that answer
/// as the director returned it: counted in [`SINK`] and dropped. Anything else (a reply
/// that left the director unrewritten) is dropped uncounted: a loss.
#[xdp]
pub fn xdplb_respond(ctx: XdpContext) -> u32 {
    const ETH_IPV4: u16 = 0x0800;
    let (Some(port), Some(vip), Some(h)) = (
        BENCH_RESPOND.get(0).copied(),
        BENCH_RESPOND.get(1).copied(),
        lb_ebpf::ptr_at::<[u8; 14 + 20 + 16]>(&ctx, 0),
    ) else {
        return xdp_action::XDP_DROP;
    };
    let h = h as *mut u8;
    // SAFETY: 50 bytes from the frame's start, bounds-checked; word loads and stores.
    unsafe {
        use lb_ebpf::{load_u16, load_u32, store_u16, store_u32};
        if load_u16(h.add(12)) != ETH_IPV4.to_be()
            || *h.add(14) != 0x45
            || *h.add(23) != lb_common::IPPROTO_TCP
        {
            return xdp_action::XDP_DROP;
        }
        let port = (port as u16).to_be();
        if load_u16(h.add(36)) == port {
            let swap32 = |a: usize, b: usize| {
                let (x, y) = (load_u32(h.add(a)), load_u32(h.add(b)));
                store_u32(h.add(a), y);
                store_u32(h.add(b), x);
            };
            let swap16 = |a: usize, b: usize| {
                let (x, y) = (load_u16(h.add(a)), load_u16(h.add(b)));
                store_u16(h.add(a), y);
                store_u16(h.add(b), x);
            };
            // MACs (a word and a half-word each), addresses, ports, seq and ack.
            swap32(0, 6);
            swap16(4, 10);
            swap32(26, 30);
            swap16(34, 36);
            swap32(38, 42);
            return xdp_action::XDP_TX;
        }
        if load_u16(h.add(34)) == port && load_u32(h.add(26)) == vip {
            if let Some(c) = SINK.get_ptr_mut(0) {
                *c += 1;
            }
        }
    }
    xdp_action::XDP_DROP
}

/// Where [`xdplb_relay`] sends a frame: by the ifindex it came in on, the interface to
/// redirect it out of.
#[map]
static BENCH_RELAY: DevMapHash = DevMapHash::with_max_entries(16, 0);

/// End-to-end benchmark generator where the kernel refuses live frames: the AF_PACKET
/// socket's frames (skbs) arrive here, on the generator's side, and go on to the director as
/// XDP frames, as live frames reach it (not as skbs, whose handling its core would pay).
#[xdp]
pub fn xdplb_relay(ctx: XdpContext) -> u32 {
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    BENCH_RELAY
        .redirect(ingress, 0)
        .unwrap_or(xdp_action::XDP_DROP)
}

/// End-to-end benchmark generator tail: transmit the frame as it is (live-frames mode sends
/// `XDP_TX` out of the interface given as ingress).
#[xdp]
pub fn xdplb_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

/// Program under test for [`xdplb_bench_new_flow`] (slot 0), set by the benchmark.
#[map]
static BENCH_NEXT: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Sequence number of [`xdplb_bench_new_flow`]. Shared, not per-CPU: a benchmark thread that
/// moves to another CPU must not replay tuples still in the table.
#[map]
static BENCH_SEQ: Array<u32> = Array::with_max_entries(1, 0);

/// Benchmark driver settings (`BENCH_CFG[0]`): bits of what to do before the tail call.
const BENCH_STRIP_OUTER: u32 = 1;
const BENCH_NEW_FLOW: u32 = 2;
const BENCH_RESTORE: u32 = 4;
const BENCH_STRIP_OUTER6: u32 = 8;
const BENCH_CYCLE_DST: u32 = 16;

/// Bytes of the packet template `BENCH_RESTORE` writes back before each run.
const BENCH_TEMPLATE_LEN: usize = 128;

/// The packet the NAT rows start every run from (`BENCH_RESTORE`).
#[map]
static BENCH_TEMPLATE: Array<[u8; BENCH_TEMPLATE_LEN]> = Array::with_max_entries(1, 0);

/// `BENCH_CFG`: [0] the bits above; [1] the 5-tuple cycle of `BENCH_NEW_FLOW`; [2] pacing,
/// the gap in ns between two frames (0: none); [3] the step through the cycle (0: 1).
#[map]
static BENCH_CFG: Array<u32> = Array::with_max_entries(4, 0);

/// Pacing state of the driver: when (`bpf_ktime_get_ns`) the next frame is due.
#[map]
static BENCH_PACE: Array<u64> = Array::with_max_entries(1, 0);

/// Wait (spinning on the clock, bounded) until the next frame is due, `gap` ns after the last
/// one's due time. A generator behind schedule (live frames pause every 64 frames to send
/// them) catches up back to back, by at most 64 frames: the asked rate is the rate sent.
#[inline(never)]
fn pace(gap: u32) {
    let Some(due) = BENCH_PACE.get_ptr_mut(0) else {
        return;
    };
    let mut now = unsafe { bpf_ktime_get_ns() };
    let target = unsafe { *due };
    // Each clock read is ~20-30 ns here: 4096 reads bound the wait to ~100 µs (10 kpps).
    for _ in 0..4096 {
        if now >= target {
            break;
        }
        now = unsafe { bpf_ktime_get_ns() };
    }
    let behind_limit = target.saturating_add(64 * u64::from(gap));
    unsafe { *due = if now > behind_limit { now } else { target } + u64::from(gap) };
}

/// Give the untagged TCP/UDP frame in `ctx` the 5-tuple `(address, port)`: into the low 16
/// bits of its source address (at `SRC`) and its source port (at `SPORT`), or with `dst` of
/// its destination ones (`DST`, `DPORT`); the IPv4 header checksum (at `IP_CHECK`; 0: none,
/// IPv6) and a TCP checksum (the last 2 of the `N` bytes checked, when the protocol byte at
/// `PROTO` says TCP) follow, so the kernel's own path, the nftables peer, accepts the frames
/// too. Constant offsets (the verifier takes a packet pointer moved by a variable for
/// unchecked). None: the frame is shorter than `N`.
#[inline(always)]
fn cycle_tuple<
    const N: usize,
    const PROTO: usize,
    const IP_CHECK: usize,
    const SRC: usize,
    const SPORT: usize,
    const DST: usize,
    const DPORT: usize,
>(
    ctx: &XdpContext,
    dst: bool,
    (addr, port): (u16, u16),
) -> Option<()> {
    // SAFETY: N bytes of the packet, bounds-checked.
    let h = unsafe { &mut *lb_ebpf::ptr_at::<[u8; N]>(ctx, 0)? };
    let (at, port_at) = if dst { (DST, DPORT) } else { (SRC, SPORT) };
    let word = |h: &[u8; N], at: usize| u16::from_be_bytes([h[at], h[at + 1]]);
    let (old_addr, old_port) = (word(h, at), word(h, port_at));
    [h[at], h[at + 1]] = addr.to_be_bytes();
    [h[port_at], h[port_at + 1]] = port.to_be_bytes();
    if IP_CHECK != 0 {
        [h[IP_CHECK], h[IP_CHECK + 1]] =
            csum::replace_word([h[IP_CHECK], h[IP_CHECK + 1]], old_addr, addr);
    }
    if h[PROTO] == lb_common::IPPROTO_TCP {
        let c = csum::replace_word([h[N - 2], h[N - 1]], old_addr, addr);
        [h[N - 2], h[N - 1]] = csum::replace_word(c, old_port, port);
    }
    Some(())
}

/// Benchmark driver: `BPF_PROG_TEST_RUN` with `repeat` reuses one packet buffer, so paths
/// that rewrite the packet would measure themselves on their own output. Before tail-calling
/// the program under test (`BENCH_NEXT[0]`) this can
/// - strip an outer IPv4 (`BENCH_STRIP_OUTER`) or IPv6 (`BENCH_STRIP_OUTER6`) header: the TUN path re-adds it, so every run
///   sees the same client packet (the strip's cost is included in what is measured);
/// - write back a 128-byte template packet (`BENCH_RESTORE`): NAT rewrites in place;
/// - give the packet a 5-tuple never seen before (`BENCH_NEW_FLOW`): the (inner) source
///   address's low 16 bits, IPv4 or IPv6, and the source port come from a sequence — or, with `BENCH_CYCLE_DST`, the
///   destination's and the destination port (a NAT reply to the clients the client packets
///   of the same sequence came from).
/// Expects untagged IPv4 TCP/UDP without options or IPv6 TCP without extension headers
/// (optionally inside one outer header, which it strips first).
#[xdp]
pub fn xdplb_bench_driver(ctx: XdpContext) -> u32 {
    let cfg = BENCH_CFG.get(0).copied().unwrap_or(0);
    let gap = BENCH_CFG.get(2).copied().unwrap_or(0);
    if gap != 0 {
        pace(gap);
    }
    if cfg & BENCH_RESTORE != 0 {
        // NAT rewrites in place: put the original packet back (a 128-byte frame).
        let (Some(t), Some(p)) = (
            BENCH_TEMPLATE.get(0),
            lb_ebpf::ptr_at::<[u8; BENCH_TEMPLATE_LEN]>(&ctx, 0),
        ) else {
            return xdp_action::XDP_ABORTED;
        };
        // Word by word: an array assignment is a byte-loop memmove (see
        // `lb_ebpf::zeroed_in_place`) that cost this driver ~90 ns per run, more than the
        // NAT path it stands in front of.
        let (t, p) = (t.as_ptr() as *const u64, p as *mut u8);
        for i in 0..BENCH_TEMPLATE_LEN / 8 {
            // SAFETY: map values are 8-aligned; the packet has these 128 bytes (checked).
            unsafe { lb_ebpf::store_u64(p.add(8 * i), t.add(i).read()) };
        }
    }
    if cfg & BENCH_STRIP_OUTER != 0 && strip_outer::<20>(&ctx).is_none() {
        return xdp_action::XDP_ABORTED;
    }
    if cfg & BENCH_STRIP_OUTER6 != 0 && strip_outer::<40>(&ctx).is_none() {
        return xdp_action::XDP_ABORTED;
    }
    if cfg & BENCH_NEW_FLOW != 0 {
        let Some(seq) = BENCH_SEQ.get_ptr_mut(0) else {
            return xdp_action::XDP_ABORTED;
        };
        // `BENCH_CFG[1]` > 0: cycle through that many 5-tuples (flow-hit rows with N
        // established flows); 0: a new one every run.
        let cycle = BENCH_CFG.get(1).copied().unwrap_or(0);
        // `BENCH_CFG[3]`: the step through the cycle (0: 1). A step coprime with the cycle
        // visits every flow once per pass, in an order unlike the one that made them.
        let step = BENCH_CFG.get(3).copied().unwrap_or(0).max(1);
        let seq = unsafe {
            let next = (*seq).wrapping_add(step);
            *seq = next.checked_rem(cycle).unwrap_or(next);
            *seq
        };
        let to = (seq as u16, (seq >> 16) as u16 | 1024);
        let ipv6 = lb_ebpf::ptr_at::<[u8; 14]>(&ctx, 0)
            .is_some_and(|e| unsafe { (*e)[12] == 0x86 && (*e)[13] == 0xdd });
        let dst = cfg & BENCH_CYCLE_DST != 0;
        let cycled = if ipv6 {
            // Ethernet (14) + IPv6: next header at 6, addresses at 8 and 24 (their low 16
            // bits at 22 and 38), the ports after the 40-byte header, TCP's checksum at 16.
            cycle_tuple::<72, 20, 0, 36, 54, 52, 56>(&ctx, dst, to)
        } else {
            // Ethernet (14) + IPv4: protocol at 9, checksum at 10, addresses at 12 and 16,
            // the ports after the 20-byte header, TCP's checksum at 16.
            cycle_tuple::<52, 23, 24, 28, 34, 32, 36>(&ctx, dst, to)
        };
        if cycled.is_none() {
            return xdp_action::XDP_ABORTED;
        }
    }
    unsafe { BENCH_NEXT.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// Move the Ethernet header forward over an outer IP header of `N` bytes and cut it. The
/// 14 bytes move as three loads and stores (a struct copy here was a call of bpf-linker's
/// byte-loop `memmove`, which every TUN row paid inside the driver until 2026-12-06).
#[inline(always)]
fn strip_outer<const N: usize>(ctx: &XdpContext) -> Option<()> {
    let old = lb_ebpf::ptr_at::<EthHdr>(ctx, 0)? as *mut u8;
    let new = lb_ebpf::ptr_at::<EthHdr>(ctx, N)? as *mut u8;
    // SAFETY: 14 bytes at 0 and at N (N >= 14: no overlap), bounds-checked.
    unsafe {
        use lb_ebpf::{load_u16, load_u32, load_u64, store_u16, store_u32, store_u64};
        let (a, b, c) = (load_u64(old), load_u32(old.add(8)), load_u16(old.add(12)));
        store_u64(new, a);
        store_u32(new.add(8), b);
        store_u16(new.add(12), c);
        (aya_ebpf::helpers::bpf_xdp_adjust_head(ctx.ctx, N as i32) == 0).then_some(())
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
