//! The xdplb controller library: configuration, Maglev tables, the data-plane loader and the
//! reports read back from it. The `xdplb` binary is a thin CLI over this.

pub mod config;
pub mod dataplane;
pub mod decap;
pub mod flow_table;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod netlink;
pub mod reconcile;
pub mod run;
pub mod status;
