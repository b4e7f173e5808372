//! Pieces shared by the XDP objects built from this crate: `lb` (the director) and `decap`
//! (TUN backends). Also a build-dependency of `lb-userspace`, so cargo rebuilds the objects
//! when this crate changes.
#![no_std]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

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

/// Loads and stores of packet bytes as one word, whatever their alignment (IP headers sit at
/// 2-byte offsets). Rust's `read_unaligned` makes LLVM's BPF backend assemble the word from
/// single bytes (an IPv4 address: 4 loads, 3 shifts, 3 ors; an IPv6 one: 30 instructions).
/// The kernel allows misaligned packet access on the architectures it has efficient
/// unaligned access on (x86-64, arm64), so one instruction does. (LLVM 22's
/// `allows-misaligned-mem-access` feature does this everywhere, but also for the stack,
/// where the verifier rejects it.) Elsewhere (this crate is also built for the host) these
/// are plain unaligned reads and writes. Stores write `v` in memory order as it is (convert
/// with `to_be` for network order).
macro_rules! packet_load {
    ($(($name:ident, $t:ty, $size:literal)),+) => {$(
        #[doc = concat!("Load a `", stringify!($t), "` from packet memory (see `packet_load`).")]
        ///
        /// # Safety
        /// The bytes at `p` must be readable (for packet data: bounds-checked against
        /// `data_end`).
        #[inline(always)]
        pub unsafe fn $name(p: *const u8) -> $t {
            #[cfg(target_arch = "bpf")]
            {
                let v: u64;
                unsafe {
                    core::arch::asm!(concat!("{v} = *(", $size, " *)({p} + 0)"),
                        p = in(reg) p, v = lateout(reg) v,
                        options(pure, readonly, nostack, preserves_flags));
                }
                v as $t
            }
            #[cfg(not(target_arch = "bpf"))]
            unsafe {
                (p as *const $t).read_unaligned()
            }
        }
    )+};
}

/// The stores of [`packet_load`]'s kind.
macro_rules! packet_store {
    ($(($name:ident, $t:ty, $size:literal)),+) => {$(
        #[doc = concat!("Store a `", stringify!($t), "` into packet memory (see `packet_load`).")]
        ///
        /// # Safety
        /// The bytes at `p` must be writable (for packet data: bounds-checked against
        /// `data_end`).
        #[inline(always)]
        pub unsafe fn $name(p: *mut u8, v: $t) {
            #[cfg(target_arch = "bpf")]
            unsafe {
                core::arch::asm!(concat!("*(", $size, " *)({p} + 0) = {v}"),
                    p = in(reg) p, v = in(reg) v as u64, options(nostack, preserves_flags));
            }
            #[cfg(not(target_arch = "bpf"))]
            unsafe {
                (p as *mut $t).write_unaligned(v)
            }
        }
    )+};
}

packet_load!(
    (load_u16, u16, "u16"),
    (load_u32, u32, "u32"),
    (load_u64, u64, "u64")
);
packet_store!(
    (store_u16, u16, "u16"),
    (store_u32, u32, "u32"),
    (store_u64, u64, "u64")
);

/// Write host-order words as big-endian bytes at `p` (one store each).
///
/// # Safety
/// `p .. p + 4 * N` must be bounds-checked packet memory.
#[inline(always)]
pub unsafe fn put_words<const N: usize>(p: *mut u8, words: &[u32; N]) {
    let mut i = 0;
    while i < N {
        unsafe { store_u32(p.add(4 * i), words[i].to_be()) };
        i += 1;
    }
}

/// Copy a 16-byte address as four 4-byte words, one load and one store instruction each (an
/// array assignment becomes a call of a byte-loop `memmove`, see [`zeroed_in_place`], and
/// `read_unaligned` assembles each word from single bytes). Packet memory may sit at any
/// offset; on the stack both sides must be 4-aligned (the verifier rejects misaligned stack
/// access): addresses in our `repr(C)` structs are.
#[inline(always)]
pub fn copy16(dst: &mut [u8; 16], src: &[u8; 16]) {
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    // SAFETY: 16 bytes each.
    unsafe {
        store_u32(d, load_u32(s));
        store_u32(d.add(4), load_u32(s.add(4)));
        store_u32(d.add(8), load_u32(s.add(8)));
        store_u32(d.add(12), load_u32(s.add(12)));
    }
}

/// 16-byte equality as two word compares (an array `==` becomes a `bcmp` call). Both sides
/// are map values or 8-aligned stack slots: one load instruction per word (`read_unaligned`
/// assembled each word from 8 byte loads, 45 instructions per side).
#[inline(always)]
pub fn eq16(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let (a, b) = (a.as_ptr(), b.as_ptr());
    // SAFETY: 16 bytes each.
    unsafe { load_u64(a) == load_u64(b) && load_u64(a.add(8)) == load_u64(b.add(8)) }
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

/// Zero a stack slot in place and hand out the value. bpf-linker has LLVM lower every
/// `memset` (even `Default` or `mem::zeroed()` of a small struct) to a call of an out-of-line
/// byte loop (`--bpf-expand-memcpy-in-order`): that cost the fast path 67 one-byte stores
/// per packet for the packet summary alone. Volatile word stores cannot be merged back into
/// a memset, and zeroing in place (no move out of a temporary) keeps LLVM from making one.
///
/// # Safety
/// All-zero bytes must be a valid `T`; `T`'s size must be a multiple of 4 (of 8 when it is
/// 8-aligned) and its alignment at least 4.
#[inline(always)]
pub unsafe fn zeroed_in_place<T>(slot: &mut core::mem::MaybeUninit<T>) -> &mut T {
    use core::mem::{align_of, size_of};
    use core::ptr::write_volatile;
    let p = slot.as_mut_ptr();
    if align_of::<T>() >= 8 {
        let words = p as *mut u64;
        for i in 0..size_of::<T>() / 8 {
            unsafe { write_volatile(words.add(i), 0) };
        }
    } else {
        let words = p as *mut u32;
        for i in 0..size_of::<T>() / 4 {
            unsafe { write_volatile(words.add(i), 0) };
        }
    }
    // SAFETY: every byte was written, and zero is a valid `T` (caller's promise).
    unsafe { &mut *p }
}
