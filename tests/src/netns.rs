//! Network-namespace guards (filled in below).
