//! Autoscaling: a rule and the decision it makes from measured periods (`rule`: pure,
//! unit-tested, also used for replays), and the engine's side that measures the periods and
//! carries decisions out (`driver`).

mod driver;
mod rule;
pub(in crate::engine) mod state;

pub use driver::{AutoscaleView, ReplayAnswer};
pub use rule::*;
pub(in crate::engine) use state::{AutoscaleEntry, AutoscalingState};
