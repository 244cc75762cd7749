//! "Full in N days": when a resource's use will cross its capacity, from the daily peaks of
//! its history. Two methods, both named to the operator with their band:
//! - **trend on daily peaks**: a least-squares line through the peaks, with the 80 %
//!   prediction interval of a new peak around it; the band is where the interval's edges
//!   cross the capacity;
//! - **robust trend (Theil–Sen)**: the median of the slopes between every two peaks, through
//!   the median point; the band is the line shifted by the 10th and 90th percentiles of the
//!   residuals. One odd day moves it less.
//!
//! Pure: the caller gives samples and the capacity.

/// How far ahead a forecast looks, in days.
pub const HORIZON_DAYS: f64 = 730.0;
/// Peaks needed before anything is said.
pub const MIN_DAYS: usize = 3;
/// z of the 80 % two-sided interval (10 % each side).
const Z80: f64 = 1.2816;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    PeakTrend,
    TheilSen,
}

impl Method {
    /// As the UI and ctl name it.
    pub fn describe(self) -> &'static str {
        match self {
            Method::PeakTrend => "trend on daily peaks, 80 % prediction interval",
            Method::TheilSen => "robust trend (Theil–Sen) on daily peaks, 10–90 % residuals",
        }
    }
}

/// What a forecast says.
#[derive(Debug, Clone, PartialEq)]
pub enum Outlook {
    /// Fewer than [`MIN_DAYS`] daily peaks.
    TooLittleHistory { days: usize },
    /// The last peak is at or over the capacity.
    AlreadyFull,
    /// Full in `days` (from now); `earliest` and `latest` bound it (`latest` is `None` when
    /// the band's low edge does not reach the capacity within the horizon).
    Full {
        days: f64,
        earliest: f64,
        latest: Option<f64>,
    },
    /// Not full within [`HORIZON_DAYS`] on the trend (flat or shrinking use included).
    NotWithin,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Forecast {
    pub method: Method,
    pub outlook: Outlook,
    /// Growth of the daily peak, per day.
    pub slope_per_day: f64,
    /// Daily peaks it was made from.
    pub points: usize,
    /// The trend's value now (where a chart starts its line), when there is a trend.
    pub trend_now: Option<f64>,
    /// When it was made, in days since the Unix epoch (UTC): where that line starts.
    pub as_of_day: f64,
}

impl Forecast {
    /// "memory full in 23 days (±4)", for `what` = "memory".
    pub fn describe(&self, what: &str) -> String {
        match &self.outlook {
            Outlook::TooLittleHistory { days } => {
                format!("{what}: {days} days of history, {MIN_DAYS} needed for a forecast")
            }
            Outlook::AlreadyFull => format!("{what} full now"),
            Outlook::NotWithin => {
                format!("{what} not full within {HORIZON_DAYS:.0} days on the trend")
            }
            Outlook::Full {
                days,
                earliest,
                latest,
            } => match latest {
                Some(latest) => {
                    let spread = ((latest - days).max(days - earliest)).round();
                    format!("{what} full in {:.0} days (±{spread:.0})", days.round())
                }
                None => format!(
                    "{what} full in {:.0} days (at the earliest {:.0}, maybe never)",
                    days.round(),
                    earliest.round()
                ),
            },
        }
    }
}

/// The peak of each whole day of `samples` (`(unix secs, value)`, any order), as
/// `(day number, peak)` in day order. Days are UTC days.
pub fn daily_peaks(samples: &[(u64, f64)]) -> Vec<(f64, f64)> {
    let mut days: std::collections::BTreeMap<u64, f64> = std::collections::BTreeMap::new();
    for &(at, value) in samples {
        if !value.is_finite() {
            continue;
        }
        let peak = days.entry(at / 86_400).or_insert(value);
        *peak = peak.max(value);
    }
    days.into_iter().map(|(d, v)| (d as f64, v)).collect()
}

/// When `peaks` (from [`daily_peaks`]) cross `capacity`, counted in days from `now_day`.
pub fn forecast(peaks: &[(f64, f64)], capacity: f64, now_day: f64, method: Method) -> Forecast {
    let points = peaks.len();
    let done = |outlook, slope_per_day, trend_now| Forecast {
        method,
        outlook,
        slope_per_day,
        points,
        trend_now,
        as_of_day: now_day,
    };
    if points < MIN_DAYS {
        return done(Outlook::TooLittleHistory { days: points }, 0.0, None);
    }
    if peaks.last().is_some_and(|p| p.1 >= capacity) {
        return done(Outlook::AlreadyFull, 0.0, None);
    }
    let (line, band): (Line, BandEdges) = match method {
        Method::PeakTrend => {
            let fit = least_squares(peaks);
            let line = fit.line;
            (
                line,
                Box::new(move |t| {
                    let half = Z80 * fit.prediction_se(t);
                    (line.at(t) - half, line.at(t) + half)
                }),
            )
        }
        Method::TheilSen => {
            let line = theil_sen(peaks);
            let mut residuals: Vec<f64> = peaks.iter().map(|&(t, y)| y - line.at(t)).collect();
            residuals.sort_by(f64::total_cmp);
            let (low, high) = (quantile(&residuals, 0.1), quantile(&residuals, 0.9));
            (
                line,
                Box::new(move |t| (line.at(t) + low, line.at(t) + high)),
            )
        }
    };
    let now = Some(line.at(now_day));
    if line.slope <= 0.0 {
        return done(Outlook::NotWithin, line.slope, now);
    }
    let crossing = |f: &dyn Fn(f64) -> f64| {
        // Scans a quarter day at a time: a band's edges are not lines.
        let mut d = 0.0;
        while d <= HORIZON_DAYS {
            if f(now_day + d) >= capacity {
                return Some(d);
            }
            d += 0.25;
        }
        None
    };
    let Some(days) = crossing(&|t| line.at(t)) else {
        return done(Outlook::NotWithin, line.slope, now);
    };
    let earliest = crossing(&|t| band(t).1).unwrap_or(days).min(days);
    let latest = crossing(&|t| band(t).0).map(|l| l.max(days));
    done(
        Outlook::Full {
            days,
            earliest,
            latest,
        },
        line.slope,
        now,
    )
}

/// The low and high edge of a forecast's band at a day.
type BandEdges = Box<dyn Fn(f64) -> (f64, f64)>;

#[derive(Debug, Clone, Copy, PartialEq)]
struct Line {
    intercept: f64,
    slope: f64,
}

impl Line {
    fn at(&self, t: f64) -> f64 {
        self.intercept + self.slope * t
    }
}

struct Fit {
    line: Line,
    /// Residual standard error.
    s: f64,
    n: f64,
    mean_t: f64,
    sxx: f64,
}

impl Fit {
    /// Standard error of a new observation at `t`.
    fn prediction_se(&self, t: f64) -> f64 {
        let leverage = if self.sxx > 0.0 {
            (t - self.mean_t).powi(2) / self.sxx
        } else {
            0.0
        };
        self.s * (1.0 + 1.0 / self.n + leverage).sqrt()
    }
}

fn least_squares(points: &[(f64, f64)]) -> Fit {
    let n = points.len() as f64;
    let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_t).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_t) * (p.1 - mean_y)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    let line = Line {
        intercept: mean_y - slope * mean_t,
        slope,
    };
    let sse: f64 = points.iter().map(|p| (p.1 - line.at(p.0)).powi(2)).sum();
    let s = if n > 2.0 {
        (sse / (n - 2.0)).sqrt()
    } else {
        0.0
    };
    Fit {
        line,
        s,
        n,
        mean_t,
        sxx,
    }
}

fn theil_sen(points: &[(f64, f64)]) -> Line {
    let mut slopes = Vec::new();
    for (i, a) in points.iter().enumerate() {
        for b in &points[i + 1..] {
            if b.0 != a.0 {
                slopes.push((b.1 - a.1) / (b.0 - a.0));
            }
        }
    }
    slopes.sort_by(f64::total_cmp);
    let slope = if slopes.is_empty() {
        0.0
    } else {
        quantile(&slopes, 0.5)
    };
    let mut intercepts: Vec<f64> = points.iter().map(|&(t, y)| y - slope * t).collect();
    intercepts.sort_by(f64::total_cmp);
    Line {
        intercept: quantile(&intercepts, 0.5),
        slope,
    }
}

/// The `q` quantile of sorted `values` (linear between neighbours); 0 for none.
fn quantile(values: &[f64], q: f64) -> f64 {
    match values.len() {
        0 => 0.0,
        n => {
            let at = q.clamp(0.0, 1.0) * (n - 1) as f64;
            let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
            values[lo] + (values[hi] - values[lo]) * (at - lo as f64)
        }
    }
}

/// A synthetic history for tests and the backtest: hourly samples of a use that grows by
/// `slope_per_day`, swings by `amplitude` over each day, and has noise of about `noise`,
/// from a fixed seed.
pub fn synthetic_hourly(
    days: u64,
    base: f64,
    slope_per_day: f64,
    amplitude: f64,
    noise: f64,
    seed: u64,
) -> Vec<(u64, f64)> {
    let mut state = seed | 1;
    let mut uniform = move || {
        // xorshift64*: reproducible without a dependency.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..days * 24)
        .map(|h| {
            let t = h as f64 / 24.0;
            let daily = (std::f64::consts::TAU * (h % 24) as f64 / 24.0).sin();
            let jitter = (uniform() * 2.0 - 1.0) * noise;
            (
                h * 3600,
                base + slope_per_day * t + amplitude * daily + jitter,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first day whose peak reaches `capacity` when the same history goes on.
    fn truth(history: &[(u64, f64)], capacity: f64) -> f64 {
        daily_peaks(history)
            .into_iter()
            .find(|p| p.1 >= capacity)
            .expect("the history reaches the capacity")
            .0
    }

    #[test]
    fn a_known_slope_is_found_by_both_methods_with_its_band() {
        // 28 days of memory growing 2 GiB a day from 100 GiB, swinging ±10, noise ±3;
        // capacity 256 GiB: full on day 73 by the truth.
        let samples = synthetic_hourly(28, 100.0, 2.0, 10.0, 3.0, 7);
        let peaks = daily_peaks(&samples);
        assert_eq!(peaks.len(), 28);
        let now = 28.0;
        let expected = truth(&synthetic_hourly(200, 100.0, 2.0, 10.0, 3.0, 7), 256.0) - now;
        for method in [Method::PeakTrend, Method::TheilSen] {
            let f = forecast(&peaks, 256.0, now, method);
            let Outlook::Full {
                days,
                earliest,
                latest,
            } = f.outlook
            else {
                panic!("{method:?}: {f:?}");
            };
            assert!(
                (days - expected).abs() <= 2.0,
                "{method:?}: {days} vs {expected}"
            );
            assert!((f.slope_per_day - 2.0).abs() < 0.1, "{f:?}");
            let latest = latest.expect("the band closes");
            assert!(earliest <= days && days <= latest, "{f:?}");
            assert!(
                earliest <= expected + 1.0 && expected - 1.0 <= latest,
                "{f:?}"
            );
            assert!(
                f.describe("memory").starts_with("memory full in "),
                "{}",
                f.describe("memory")
            );
        }
    }

    #[test]
    fn flat_shrinking_short_and_full_histories_say_so() {
        let flat = daily_peaks(&synthetic_hourly(14, 50.0, 0.0, 5.0, 0.0, 1));
        assert_eq!(
            forecast(&flat, 100.0, 14.0, Method::PeakTrend).outlook,
            Outlook::NotWithin
        );
        let shrinking = daily_peaks(&synthetic_hourly(14, 90.0, -1.0, 5.0, 0.5, 2));
        for m in [Method::PeakTrend, Method::TheilSen] {
            assert_eq!(
                forecast(&shrinking, 100.0, 14.0, m).outlook,
                Outlook::NotWithin
            );
        }
        let short = daily_peaks(&synthetic_hourly(2, 50.0, 1.0, 5.0, 0.0, 3));
        let f = forecast(&short, 100.0, 2.0, Method::TheilSen);
        assert_eq!(f.outlook, Outlook::TooLittleHistory { days: 2 });
        assert!(f.describe("cpu").contains("3 needed"));
        let full = daily_peaks(&synthetic_hourly(5, 98.0, 1.0, 5.0, 0.0, 4));
        assert_eq!(
            forecast(&full, 100.0, 5.0, Method::PeakTrend).outlook,
            Outlook::AlreadyFull
        );
        // Very slow growth: beyond the horizon.
        let slow = daily_peaks(&synthetic_hourly(30, 10.0, 0.01, 1.0, 0.0, 5));
        assert_eq!(
            forecast(&slow, 1000.0, 30.0, Method::PeakTrend).outlook,
            Outlook::NotWithin
        );
    }

    #[test]
    fn one_odd_day_moves_the_robust_trend_less() {
        let mut peaks = daily_peaks(&synthetic_hourly(21, 100.0, 1.0, 5.0, 0.5, 9));
        // A spike on the last day (a backup run), not growth.
        let last = peaks.len() - 1;
        peaks[last].1 += 60.0;
        let expected = truth(&synthetic_hourly(200, 100.0, 1.0, 5.0, 0.5, 9), 200.0) - 21.0;
        let days = |m| match forecast(&peaks, 200.0, 21.0, m).outlook {
            Outlook::Full { days, .. } => days,
            other => panic!("{m:?}: {other:?}"),
        };
        let robust = (days(Method::TheilSen) - expected).abs();
        let plain = (days(Method::PeakTrend) - expected).abs();
        assert!(
            robust < plain,
            "robust off by {robust}, least squares by {plain}"
        );
        assert!(robust <= 3.0, "{robust}");
    }

    #[test]
    fn peaks_are_per_utc_day_and_skip_nonsense() {
        let samples = [
            (86_400 * 3 + 10, 5.0),
            (86_400 * 3 + 20, 7.0),
            (86_400 * 4, f64::NAN),
            (86_400 * 4 + 1, 1.0),
            (86_400 * 2, 9.0),
        ];
        assert_eq!(
            daily_peaks(&samples),
            vec![(2.0, 9.0), (3.0, 7.0), (4.0, 1.0)]
        );
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.5);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
