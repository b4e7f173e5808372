//! Forwarding, one module per mode.

pub mod dr;
