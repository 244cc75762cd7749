//! What the statistics domain holds: the open part of every time series (what closed is in
//! the store).

use crate::engine::statistics::series::TimeSeries;

/// Statistics: the open part of every time series (what closed is in the store).
#[derive(Default)]
pub(in crate::engine) struct StatisticsState {
    pub(in crate::engine) series: TimeSeries,
    /// Readings before this time (unix seconds) were made up (the demo's history).
    pub(in crate::engine) generated_until_secs: Option<u64>,
}
