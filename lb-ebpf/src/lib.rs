//! Pieces shared by the XDP objects built from this crate: `lb` (the director) and `decap`
//! (TUN backends). Also a build-dependency of `lb-userspace`, so cargo rebuilds the objects
//! when this crate changes.
#![no_std]

use aya_ebpf::programs::XdpContext;

/// Bounds-checked pointer into the packet. The explicit `data_end` comparison is what
/// lets the verifier accept the later dereference.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Status of an out-of-line function that succeeded (its result is in its `out` argument);
/// any other status is a `reason` slot. Out-of-line functions (kept off the fast path's
/// 512-byte stack) take and return only plain types: a Rust enum such as `Result` in a BPF
/// function signature becomes BTF the kernel rejects (a union member at a non-zero offset),
/// and the whole object then loads without BTF.
pub const STATUS_OK: u32 = u32::MAX;

/// Frame length in bytes.
#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}
