//! Statistics charts of a host or a workload: CPU, memory, disk and network over a time
//! range the operator picks, each bucket's mean as a line over its shaded min–max band, in
//! one colour per series, with zoom, pan and hover values (egui_plot's) on one time axis
//! that every chart of the window shares, and an export of what is shown to CSV. The data
//! comes from the engine's time-series query, asked again while the window is open; the
//! window never waits for it.

use std::{path::PathBuf, time::Instant};

use egui::Color32;
use egui_plot::{FilledArea, GridInput, GridMark, HoverPosition, Legend, Line, Plot, Span};
use tokio::sync::oneshot;

use super::human_bytes;
use super::{EngineLink, STOPPED};
use crate::{
    api::{
        ApiError,
        ops::{self, subject_text},
        views::{SeriesView, StatsView},
    },
    engine::statistics::series::{Metric, Subject},
};

/// The ranges offered, with the bucket size asked for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeRange {
    Minutes15,
    Hour,
    Day,
    Week,
    Month,
}

impl TimeRange {
    pub const ALL: [TimeRange; 5] = [
        TimeRange::Minutes15,
        TimeRange::Hour,
        TimeRange::Day,
        TimeRange::Week,
        TimeRange::Month,
    ];

    pub fn label(self) -> &'static str {
        match self {
            TimeRange::Minutes15 => "15 min",
            TimeRange::Hour => "1 hour",
            TimeRange::Day => "1 day",
            TimeRange::Week => "7 days",
            TimeRange::Month => "30 days",
        }
    }

    pub fn secs(self) -> u64 {
        match self {
            TimeRange::Minutes15 => 900,
            TimeRange::Hour => 3600,
            TimeRange::Day => 86_400,
            TimeRange::Week => 7 * 86_400,
            TimeRange::Month => 30 * 86_400,
        }
    }

    /// Seconds per bucket: every second up to an hour, minutes up to a week, then hours.
    pub fn resolution_secs(self) -> u64 {
        match self {
            TimeRange::Minutes15 | TimeRange::Hour => 1,
            TimeRange::Day | TimeRange::Week => 60,
            TimeRange::Month => 3600,
        }
    }

    /// How often the chart asks again while open.
    fn refresh_secs(self) -> u64 {
        match self {
            TimeRange::Minutes15 | TimeRange::Hour => 2,
            _ => 30,
        }
    }
}

/// The charts of one metric group: what is drawn together on one plot.
const GROUPS: [(&str, &[Metric]); 6] = [
    ("CPU use", &[Metric::Cpu]),
    ("Memory in use", &[Metric::Memory]),
    ("Disk I/O", &[Metric::DiskRead, Metric::DiskWrite]),
    (
        "Network traffic",
        &[Metric::NetRx, Metric::NetTx, Metric::NetTxOutOfSite],
    ),
    ("Application metric", &[Metric::AppMetric]),
    ("Cost per hour", &[Metric::Cost]),
];

/// The plot of one chart group (by its title), the same in every frame: the charts share
/// their time axis through it, and tests read its bounds.
pub fn plot_id(title: &str) -> egui::Id {
    egui::Id::unique(("chart", title))
}

/// Each series keeps its colour in every chart and every range.
pub fn metric_color(metric: Metric) -> Color32 {
    match metric {
        Metric::Cpu => Color32::from_rgb(88, 166, 255),
        Metric::Memory => Color32::from_rgb(188, 140, 255),
        Metric::DiskRead => Color32::from_rgb(63, 185, 80),
        Metric::DiskWrite => Color32::from_rgb(240, 136, 62),
        Metric::NetRx => Color32::from_rgb(57, 197, 207),
        Metric::NetTx => Color32::from_rgb(88, 166, 255),
        Metric::NetTxOutOfSite => Color32::from_rgb(248, 81, 73),
        Metric::AppMetric => Color32::from_rgb(210, 153, 34),
        Metric::Cost => Color32::from_rgb(227, 179, 65),
    }
}

/// A value of a metric at a human scale, with its unit.
pub fn format_value(metric: Metric, value: f64) -> String {
    // A grid mark a rounding error below zero reads 0, not -0.
    let value = if value.abs() < 1e-9 { 0.0 } else { value };
    match metric {
        Metric::Cpu => format!("{value:.0} %"),
        Metric::Memory => human_bytes((value.max(0.0) * 1048576.0) as u64),
        Metric::Cost => format!("{value:.3}/h"),
        Metric::AppMetric => {
            if value.abs() >= 100.0 {
                format!("{value:.0}")
            } else {
                format!("{value:.1}")
            }
        }
        _ => format!("{}/s", human_bytes(value.max(0.0) as u64)),
    }
}

/// Steps of the time axis, in seconds: round minutes, hours and days.
const TIME_STEPS: [u64; 16] = [
    1,
    5,
    15,
    30,
    60,
    300,
    900,
    1800,
    3600,
    3 * 3600,
    6 * 3600,
    12 * 3600,
    86_400,
    2 * 86_400,
    7 * 86_400,
    30 * 86_400,
];

/// Grid marks of the time axis at round times, about one per 100 points of width.
fn time_marks(input: GridInput) -> Vec<GridMark> {
    let (min, max) = input.bounds;
    let span = (max - min).max(1.0);
    let wanted = (span / input.base_step_size.max(1e-9) / 10.0).max(1.0);
    let per_mark = span / wanted.min(8.0);
    let step = TIME_STEPS
        .iter()
        .copied()
        .find(|&s| s as f64 >= per_mark)
        .unwrap_or(30 * 86_400) as f64;
    let mut marks = Vec::new();
    let mut at = (min / step).ceil() * step;
    while at <= max && marks.len() < 64 {
        marks.push(GridMark {
            value: at,
            step_size: step,
        });
        at += step;
    }
    marks
}

/// Grid marks of a value axis: three to six of them at round values, powers of two for
/// bytes (so memory reads 2 GiB, 4 GiB) and 1, 2, 5 times a power of ten otherwise.
fn value_marks(binary: bool) -> impl Fn(GridInput) -> Vec<GridMark> {
    move |input: GridInput| {
        let (min, max) = input.bounds;
        let span = max - min;
        if !(span.is_finite() && span > 0.0) {
            return Vec::new();
        }
        // egui_plot hides a y label closer than 20 points to the next and shows it fully from
        // 30; `base_step_size` is its grid's 8-point minimum in data units. A short chart
        // gets fewer marks, each labelled, rather than more that fade away.
        let readable = input.base_step_size * (32.0 / 8.0);
        let target = (span / 4.0).max(readable);
        let step = if binary {
            2f64.powf(target.log2().ceil())
        } else {
            let decade = 10f64.powf(target.log10().floor());
            [1.0, 2.0, 5.0, 10.0]
                .into_iter()
                .map(|m| m * decade)
                .find(|s| *s >= target)
                .unwrap_or(10.0 * decade)
        };
        let mut marks = Vec::new();
        let mut at = (min / step).ceil() * step;
        while at <= max && marks.len() < 16 {
            marks.push(GridMark {
                value: at,
                step_size: step,
            });
            at += step;
        }
        marks
    }
}

/// A time (unix seconds, UTC) as the chart's range needs it: seconds for minutes, hours and
/// minutes within a day, the date beyond.
pub fn format_time(unix_secs: f64, span_secs: f64) -> String {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp(unix_secs.max(0.0) as i64) else {
        return String::new();
    };
    let month = &t.month().to_string()[..3];
    if span_secs <= 1800.0 {
        format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second())
    } else if span_secs <= 2.0 * 86_400.0 {
        format!("{:02}:{:02}", t.hour(), t.minute())
    } else if t.hour() == 0 && t.minute() == 0 {
        format!("{} {month}", t.day())
    } else {
        format!("{} {month} {:02}:{:02}", t.day(), t.hour(), t.minute())
    }
}

pub struct ChartsWindow {
    subject: Option<Subject>,
    range: TimeRange,
    answer: Option<StatsView>,
    pending: Option<oneshot::Receiver<Result<StatsView, ApiError>>>,
    asked_at: Option<Instant>,
    message: Option<(String, bool)>,
    export_dir: PathBuf,
    /// The next frame puts every chart back to the whole range (a new range or subject).
    reset_view: bool,
    /// Readings before this time (unix seconds) were generated (the demo's history).
    generated_until_secs: Option<u64>,
}

impl ChartsWindow {
    /// Exports go to `export_dir` (the console's data dir's `exports`).
    pub fn new(export_dir: PathBuf) -> Self {
        ChartsWindow {
            subject: None,
            range: TimeRange::Hour,
            answer: None,
            pending: None,
            asked_at: None,
            message: None,
            export_dir,
            reset_view: true,
            generated_until_secs: None,
        }
    }

    /// Says on the window that the readings before `until_secs` were generated.
    pub fn set_generated_until(&mut self, until_secs: Option<u64>) {
        self.generated_until_secs = until_secs;
    }

    pub fn open(&mut self, subject: Subject) {
        if self.subject.as_ref() != Some(&subject) {
            self.answer = None;
            self.message = None;
        }
        self.subject = Some(subject);
        self.asked_at = None;
        self.reset_view = true;
    }

    /// Shows `answer` as it is, at `range`, and asks the engine nothing for an hour: fixed
    /// data, for a benchmark of the drawing.
    pub fn show_answer(&mut self, subject: Subject, answer: StatsView, range: TimeRange) {
        self.subject = Some(subject);
        self.range = range;
        self.answer = Some(answer);
        self.pending = None;
        self.asked_at = Instant::now().checked_add(std::time::Duration::from_secs(3600));
    }

    pub fn is_open(&self) -> bool {
        self.subject.is_some()
    }

    pub fn close(&mut self) {
        self.subject = None;
        self.pending = None;
    }

    pub fn range(&self) -> TimeRange {
        self.range
    }

    /// Asks the engine again when the range changed or the last answer is old.
    fn refresh(&mut self, link: &EngineLink) {
        if let Some(rx) = &mut self.pending {
            match rx.try_recv() {
                Ok(Ok(answer)) => {
                    self.answer = Some(answer);
                    self.pending = None;
                }
                Ok(Err(e)) => {
                    self.message = Some((format!("statistics: {}", e.message), true));
                    self.pending = None;
                }
                Err(oneshot::error::TryRecvError::Empty) => return,
                Err(oneshot::error::TryRecvError::Closed) => {
                    self.message = Some((format!("statistics: {STOPPED}"), true));
                    self.pending = None;
                }
            }
        }
        let Some(subject) = self.subject.clone() else {
            return;
        };
        let due = self
            .asked_at
            .is_none_or(|t| t.elapsed().as_secs() >= self.range.refresh_secs());
        if !due || self.pending.is_some() {
            return;
        }
        self.pending = Some(link.ask(ops::Stats {
            subject: subject_text(&subject),
            since_secs: self.range.secs(),
            resolution_secs: Some(self.range.resolution_secs()),
        }));
        self.asked_at = Some(Instant::now());
    }

    pub fn charts_ui(&mut self, ctx: &egui::Context, link: &EngineLink) {
        let Some(subject) = self.subject.clone() else {
            return;
        };
        self.refresh(link);
        // Drawn again for the answer, and when a new one is due: about once a second at
        // most for the short ranges, never for readings nobody looks at.
        ctx.request_repaint_after(if self.pending.is_some() {
            std::time::Duration::from_millis(50)
        } else {
            std::time::Duration::from_secs(self.range.refresh_secs())
        });
        let title = match &subject {
            Subject::Workload(v) => format!("Statistics of {v}"),
            other => format!("Statistics of {}", other.describe()),
        };
        let mut open = true;
        // Never taller than the screen: the charts scroll inside.
        let screen = ctx.content_rect();
        let max_h = (screen.height() - 40.0).max(200.0);
        egui::Window::new(title)
            .id(egui::Id::unique("charts"))
            .open(&mut open)
            .default_size([
                (screen.width() * 0.5).clamp(300.0, 760.0),
                (screen.height() - 120.0).clamp(200.0, 900.0),
            ])
            .max_height(max_h)
            .max_width((screen.width() - 20.0).max(300.0))
            .min_width(300.0)
            .constrain(true)
            .show(ctx, |ui| {
                ui.horizontal_wrapped(|ui| {
                    for range in TimeRange::ALL {
                        if ui
                            .selectable_label(self.range == range, range.label())
                            .clicked()
                            && self.range != range
                        {
                            self.range = range;
                            self.answer = None;
                            self.pending = None;
                            self.asked_at = None;
                            self.reset_view = true;
                        }
                    }
                    ui.separator();
                    if ui
                        .add_enabled(self.answer.is_some(), egui::Button::new("Export CSV"))
                        .on_hover_text("Write what is shown to a CSV file in the data dir")
                        .clicked()
                    {
                        self.message = Some(match self.export() {
                            Ok(path) => (format!("Exported to {}", path.display()), false),
                            Err(e) => (format!("Export failed: {e}"), true),
                        });
                    }
                });
                if let Some((text, is_error)) = &self.message {
                    let color = if *is_error {
                        egui::Color32::LIGHT_RED
                    } else {
                        ui.visuals().weak_text_color()
                    };
                    ui.colored_label(color, text);
                }
                let Some(answer) = &self.answer else {
                    ui.label("Loading…");
                    return;
                };
                if let Some(until) = self.generated_until_secs
                    && answer.from < until
                {
                    ui.colored_label(
                        Color32::from_rgb(210, 153, 34),
                        format!(
                            "demo history (generated) until {} UTC; measured after",
                            format_time(until as f64, 3.0 * 86_400.0)
                        ),
                    );
                }
                if answer.series.is_empty() {
                    ui.label(
                        "No readings in this range yet: agents send them every 5 s once connected.",
                    );
                    return;
                }
                ui.label(
                    egui::RichText::new(format!(
                        "Every {} s · times in UTC · mean over its min–max band · drag to pan, scroll to zoom (every chart follows), double-click to reset",
                        answer.resolution_secs
                    ))
                    .weak(),
                );
                // Every chart spans the chosen range, whatever data it has.
                let (from, to) = (answer.from as f64, answer.to as f64);
                let span = to - from;
                let first = answer
                    .series
                    .iter()
                    .filter_map(|s| s.points.first())
                    .map(|b| b.t)
                    .min();
                let gap_before = first
                    .map(|f| f as f64)
                    .filter(|&f| f > from + 2.0 * answer.resolution_secs as f64);
                if let Some(first) = gap_before {
                    ui.label(
                        egui::RichText::new(format!(
                            "no data before {}",
                            format_time(first, span.min(86_400.0))
                        ))
                        .weak(),
                    );
                }
                let reset = std::mem::take(&mut self.reset_view);
                let axis_group = egui::Id::unique("charts-time-axis");
                egui::ScrollArea::vertical().show(ui, |ui| {
                    for (title, metrics) in GROUPS {
                        let shown: Vec<(Metric, &SeriesView)> = answer
                            .series
                            .iter()
                            .filter_map(|s| Some((Metric::from_name(&s.metric)?, s)))
                            .filter(|(metric, _)| metrics.contains(metric))
                            .collect();
                        // Only applications with a `metric` have one, and only workloads a
                        // cost: no empty plot for them.
                        if shown.is_empty()
                            && (metrics == [Metric::AppMetric] || metrics == [Metric::Cost])
                        {
                            continue;
                        }
                        ui.label(egui::RichText::new(title).strong());
                        if shown.is_empty() {
                            ui.label(egui::RichText::new("no readings").weak());
                            continue;
                        }
                        let unit_of = metrics[0];
                        let mut plot = Plot::new(("chart", title))
                            .id(plot_id(title))
                            .height(130.0)
                            .legend(Legend::default())
                            .link_axis(axis_group, [true, false])
                            .link_cursor(axis_group, [true, false])
                            .default_x_bounds(from, to)
                            .x_grid_spacer(time_marks)
                            .x_axis_formatter(move |mark, _| format_time(mark.value, span))
                            .y_grid_spacer(value_marks(!matches!(
                                unit_of,
                                Metric::Cpu | Metric::Cost | Metric::AppMetric
                            )))
                            .y_axis_formatter(move |mark, _| format_value(unit_of, mark.value))
                            .y_axis_min_width(56.0)
                            .label_formatter(move |hover| {
                                Some(match hover {
                                    HoverPosition::NearDataPoint {
                                        plot_name,
                                        position,
                                        ..
                                    } => format!(
                                        "{plot_name}\n{} · {}",
                                        format_time(position.x, span.min(86_400.0)),
                                        format_value(unit_of, position.y)
                                    ),
                                    HoverPosition::Elsewhere { position } => {
                                        format_time(position.x, span.min(86_400.0))
                                    }
                                })
                            })
                            .include_y(0.0);
                        if reset {
                            plot = plot.reset();
                        }
                        plot.show(ui, |plot| {
                            if let Some(first) = gap_before {
                                plot.add(
                                    Span::new("", from..=first)
                                        .fill(Color32::from_gray(128).gamma_multiply(0.12)),
                                );
                            }
                            for (metric, series) in shown {
                                let name = metric.as_str();
                                let color = metric_color(metric);
                                let xs: Vec<f64> =
                                    series.points.iter().map(|b| b.t as f64).collect();
                                if answer.resolution_secs > 1 && !xs.is_empty() {
                                    let lows: Vec<f64> = series.points.iter().map(|b| b.min).collect();
                                    let highs: Vec<f64> = series.points.iter().map(|b| b.max).collect();
                                    plot.add(
                                        FilledArea::new(name, &xs, &lows, &highs)
                                            .fill_color(color.gamma_multiply(0.22)),
                                    );
                                }
                                let mean: Vec<[f64; 2]> = series
                                    .points
                                    .iter()
                                    .map(|b| [b.t as f64, b.mean])
                                    .collect();
                                plot.line(Line::new(name, mean).color(color).width(1.5));
                            }
                        });
                    }
                });
            });
        if !open {
            self.close();
        }
    }

    /// Writes the answer shown: one line per bucket and metric.
    fn export(&self) -> std::io::Result<PathBuf> {
        let (Some(subject), Some(answer)) = (&self.subject, &self.answer) else {
            return Err(std::io::Error::other("nothing is shown"));
        };
        std::fs::create_dir_all(&self.export_dir)?;
        let name = subject.key().replace('/', "-");
        let path = self.export_dir.join(format!(
            "stats-{name}-{}-{}.csv",
            self.range.secs(),
            answer.to
        ));
        let mut text = String::from("time_unix_secs,metric,unit,min,mean,max\n");
        for series in &answer.series {
            for b in &series.points {
                text.push_str(&format!(
                    "{},{},{},{},{},{}\n",
                    b.t, series.metric, series.unit, b.min, b.mean, b.max
                ));
            }
        }
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_marks_stay_far_enough_apart_to_be_labelled() {
        let marks = |binary, bounds, base_step_size| {
            value_marks(binary)(GridInput {
                bounds,
                base_step_size,
            })
            .into_iter()
            .map(|m| m.value)
            .collect::<Vec<_>>()
        };
        // Plenty of room: about four marks at a round step.
        assert_eq!(marks(false, (0.0, 55.0), 0.1), vec![0.0, 20.0, 40.0]);
        // A short chart: 8 points are 4.6 %, so a labelled step is at least 18.4 %.
        assert_eq!(marks(false, (0.0, 55.0), 4.6), vec![0.0, 20.0, 40.0]);
        assert_eq!(marks(false, (0.0, 100.0), 8.0), vec![0.0, 50.0, 100.0]);
        // Bytes step in powers of two.
        let gib = 1024.0 * 1024.0 * 1024.0;
        assert_eq!(
            marks(true, (0.0, 20.0 * gib), gib),
            vec![0.0, 8.0 * gib, 16.0 * gib]
        );
    }
}
