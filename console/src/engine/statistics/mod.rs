//! Statistics: time series of the agents' readings, their rollups, cost, capacity and
//! forecasts.

pub mod capacity;
pub mod cost;
pub mod forecast;
pub mod rollup;
pub mod series;
pub(in crate::engine) mod state;
