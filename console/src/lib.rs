//! The Dunes console: the management engine (no egui), its typed API and the client that
//! carries it, its local control socket, the opt-in Prometheus endpoint, the demo fleet, and
//! the egui window.

pub mod api;
pub mod cli;
pub mod ctl;
pub mod demo;
pub mod engine;
pub mod metrics;
pub mod ui;
