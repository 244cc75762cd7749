//! Backtest of the "full in N days" forecasts (`console/src/engine/statistics/forecast.rs`): on synthetic
//! histories with a known trend, a daily swing and noise, each method forecasts from 28 days
//! of hourly samples when the daily peak reaches the capacity, and is compared with the day
//! the same history, carried on, really reaches it. Run: `cargo bench -p dunes-tests --bench
//! forecast`. Method and results: docs/BENCHMARKS.md.

use dunes_console::engine::statistics::forecast::{
    Method, Outlook, daily_peaks, forecast, synthetic_hourly,
};

const HISTORY_DAYS: u64 = 28;
const BASE: f64 = 100.0;
const CAPACITY: f64 = 300.0;

/// One history: its forecast error in days, whether the band held the truth, the band's
/// width; `None` when the method gave no date.
#[derive(Default)]
struct Tally {
    errors: Vec<f64>,
    covered: usize,
    widths: Vec<f64>,
    no_date: usize,
}

fn run(method: Method, spikes: bool) -> Tally {
    let mut tally = Tally::default();
    for &slope in &[0.5, 1.0, 2.0, 4.0] {
        for &amplitude in &[5.0, 20.0] {
            for &noise in &[1.0, 5.0] {
                for seed in 1..=10u64 {
                    let mut long = synthetic_hourly(1200, BASE, slope, amplitude, noise, seed);
                    if spikes {
                        // A backup run every 9th day: a peak 40 above the trend for an hour.
                        for (at, value) in long.iter_mut() {
                            if (*at / 86_400) % 9 == 4 && (*at / 3600) % 24 == 2 {
                                *value += 40.0;
                            }
                        }
                    }
                    let truth = daily_peaks(&long)
                        .into_iter()
                        .find(|p| p.1 >= CAPACITY)
                        .map(|p| p.0);
                    let history: Vec<(u64, f64)> = long
                        .iter()
                        .copied()
                        .filter(|(at, _)| *at < HISTORY_DAYS * 86_400)
                        .collect();
                    let f = forecast(
                        &daily_peaks(&history),
                        CAPACITY,
                        HISTORY_DAYS as f64,
                        method,
                    );
                    let (
                        Some(truth),
                        Outlook::Full {
                            days,
                            earliest,
                            latest,
                        },
                    ) = (truth, f.outlook)
                    else {
                        tally.no_date += 1;
                        continue;
                    };
                    let truth_days = truth - HISTORY_DAYS as f64;
                    tally.errors.push(days - truth_days);
                    let latest = latest.unwrap_or(f64::INFINITY);
                    if earliest <= truth_days && truth_days <= latest {
                        tally.covered += 1;
                    }
                    tally.widths.push(latest - earliest);
                }
            }
        }
    }
    tally
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    println!(
        "| histories | method | forecasts | mean error (days) | mean abs. error | 90th pct abs. error | truth in band | median band width |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for spikes in [false, true] {
        for method in [Method::PeakTrend, Method::TheilSen] {
            let t = run(method, spikes);
            let n = t.errors.len();
            let mut abs: Vec<f64> = t.errors.iter().map(|e| e.abs()).collect();
            abs.sort_by(f64::total_cmp);
            let mut widths = t.widths.clone();
            widths.sort_by(f64::total_cmp);
            println!(
                "| {} | {} | {n} (+{} without a date) | {:+.2} | {:.2} | {:.2} | {:.0} % | {:.1} |",
                if spikes {
                    "with a spike every 9th day"
                } else {
                    "trend, swing, noise"
                },
                method.describe(),
                t.no_date,
                t.errors.iter().sum::<f64>() / n.max(1) as f64,
                abs.iter().sum::<f64>() / n.max(1) as f64,
                percentile(&abs, 0.9),
                100.0 * t.covered as f64 / n.max(1) as f64,
                percentile(&widths, 0.5),
            );
        }
    }
}
