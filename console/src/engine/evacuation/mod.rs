//! Drains and service moves: where each VM goes next (`plan`: pure, no I/O, unit-tested) and
//! the ticks that take those steps and keep their state in the store (`driver`).

mod driver;
mod plan;
pub(in crate::engine) mod state;

pub use plan::*;
pub(in crate::engine) use state::{AfterMoveOperation, DrainsState};
