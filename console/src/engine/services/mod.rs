//! Services: their files, where their instances go, their lifecycle on the agents, and the
//! questions asked of each running instance (readiness, guest applications, metrics).

pub mod app_metrics;
pub mod driver;
pub mod guest_apps;
pub mod placement;
pub(super) mod probes;
pub(super) mod readiness;
pub mod service_file;
pub(in crate::engine) mod state;
pub(in crate::engine) mod user_data;
pub mod views;
