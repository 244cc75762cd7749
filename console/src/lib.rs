//! The Dunes console: the management engine (no egui), its local control socket, the
//! opt-in Prometheus endpoint, the demo fleet, and the egui window.

pub mod cli;
pub mod ctl;
pub mod demo;
pub mod engine;
pub mod metrics;
pub mod ui;
