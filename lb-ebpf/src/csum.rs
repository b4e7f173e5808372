//! Internet checksums (RFC 1071) over words, and the incremental update of RFC 1624.

/// One's-complement sum of host-order 32-bit words standing for big-endian bytes (each
/// counts as its two 16-bit halves), added to `sum` (not folded).
#[inline(always)]
pub fn add_u32s<const N: usize>(mut sum: u32, words: &[u32; N]) -> u32 {
    let mut i = 0;
    // Fixed bound (N is a constant): the verifier sees a finite loop.
    while i < N {
        sum += (words[i] >> 16) + (words[i] & 0xffff);
        i += 1;
    }
    sum
}

/// Fold a 32-bit sum into the 16-bit one's complement checksum (big-endian bytes).
#[inline(always)]
pub fn finish(mut sum: u32) -> [u8; 2] {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// RFC 1624 eq. 3: checksum after one 16-bit word of the covered data changed.
#[inline(always)]
pub fn replace_word(check: [u8; 2], old: u16, new: u16) -> [u8; 2] {
    let sum = u32::from(!u16::from_be_bytes(check)) + u32::from(!old) + u32::from(new);
    finish(sum)
}

/// Incremental checksum updates over packet words (RFC 1624), tested in `lb-common`.
pub use lb_common::CsumDelta as Delta;
