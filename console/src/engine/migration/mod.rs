//! Cold migration of one VM between hosts: the journaled state machine (`machine`: pure, no
//! I/O, unit-tested) and its driver (`driver`: the effects on the two agents, and the
//! outcomes fed back).

mod driver;
mod machine;
pub(in crate::engine) mod state;

pub use machine::*;
pub(in crate::engine) use state::{Learned, MigrationsState};
