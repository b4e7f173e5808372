//! Only the `lb` binary (the XDP object) matters; this empty library lets `lb-userspace`
//! declare a build-dependency on the crate so cargo rebuilds the object when it changes.
#![no_std]
