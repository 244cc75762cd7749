//! Statistics charts of a host or a workload: CPU, memory, disk and network over a time
//! range the operator picks, each bucket's mean as a line over its min–max band, with zoom,
//! pan and hover values (egui_plot's), and an export of what is shown to CSV. The data comes
//! from the engine's time-series query, asked again while the window is open; the window
//! never waits for it.

use std::{path::PathBuf, time::Instant};

use egui_plot::{HoverPosition, Legend, Line, Plot};
use tokio::sync::oneshot;

use super::clock;
use crate::engine::{
    Command, EngineError, EngineHandle,
    stats::{Metric, StatsAnswer, Subject},
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
    ("CPU %", &[Metric::Cpu]),
    ("Memory MiB", &[Metric::Memory]),
    ("Disk bytes/s", &[Metric::DiskRead, Metric::DiskWrite]),
    (
        "Network bytes/s",
        &[Metric::NetRx, Metric::NetTx, Metric::NetTxOutOfSite],
    ),
    ("Application metric", &[Metric::AppMetric]),
    ("Cost per hour", &[Metric::Cost]),
];

pub struct ChartsWindow {
    subject: Option<Subject>,
    range: TimeRange,
    answer: Option<StatsAnswer>,
    pending: Option<oneshot::Receiver<Result<StatsAnswer, EngineError>>>,
    asked_at: Option<Instant>,
    message: Option<(String, bool)>,
    export_dir: PathBuf,
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
        }
    }

    pub fn open(&mut self, subject: Subject) {
        if self.subject.as_ref() != Some(&subject) {
            self.answer = None;
            self.message = None;
        }
        self.subject = Some(subject);
        self.asked_at = None;
    }

    /// Shows `answer` as it is, at `range`, and asks the engine nothing for an hour: fixed
    /// data, for a benchmark of the drawing.
    pub fn show_answer(&mut self, answer: StatsAnswer, range: TimeRange) {
        self.subject = Some(answer.subject.clone());
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
    fn refresh(&mut self, engine: &EngineHandle) {
        if let Some(rx) = &mut self.pending {
            match rx.try_recv() {
                Ok(Ok(answer)) => {
                    self.answer = Some(answer);
                    self.pending = None;
                }
                Ok(Err(e)) => {
                    self.message = Some((format!("statistics: {e}"), true));
                    self.pending = None;
                }
                Err(oneshot::error::TryRecvError::Empty) => return,
                Err(oneshot::error::TryRecvError::Closed) => self.pending = None,
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
        let (tx, rx) = oneshot::channel();
        let command = Command::Stats {
            subject,
            since_secs: self.range.secs(),
            resolution_secs: Some(self.range.resolution_secs()),
            reply: tx,
        };
        // A busy engine is asked again at the next refresh.
        if engine.try_send(command).is_ok() {
            self.pending = Some(rx);
        }
        self.asked_at = Some(Instant::now());
    }

    pub fn charts_ui(&mut self, ctx: &egui::Context, engine: &EngineHandle) {
        let Some(subject) = self.subject.clone() else {
            return;
        };
        self.refresh(engine);
        let title = match &subject {
            Subject::Workload(v) => format!("Statistics of {v}"),
            other => format!("Statistics of {}", other.describe()),
        };
        let mut open = true;
        egui::Window::new(title)
            .id(egui::Id::unique("charts"))
            .open(&mut open)
            .default_size([560.0, 640.0])
            .min_width(320.0)
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
                if answer.series.is_empty() {
                    ui.label(
                        "No readings in this range yet: agents send them every 5 s once connected.",
                    );
                    return;
                }
                ui.label(
                    egui::RichText::new(format!(
                        "Every {} s · mean with min–max band · drag to pan, scroll or pinch to zoom, double-click to reset",
                        answer.resolution_secs
                    ))
                    .weak(),
                );
                egui::ScrollArea::vertical().show(ui, |ui| {
                    for (title, metrics) in GROUPS {
                        let shown: Vec<_> = answer
                            .series
                            .iter()
                            .filter(|s| metrics.contains(&s.metric))
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
                        Plot::new(("chart", title))
                            .height(120.0)
                            .legend(Legend::default())
                            .x_axis_formatter(|mark, _| clock((mark.value.max(0.0) * 1000.0) as u64))
                            .label_formatter(|hover| {
                                let at = |x: f64| clock((x.max(0.0) * 1000.0) as u64);
                                Some(match hover {
                                    HoverPosition::NearDataPoint {
                                        plot_name,
                                        position,
                                        ..
                                    } => format!("{plot_name}\n{} · {:.1}", at(position.x), position.y),
                                    HoverPosition::Elsewhere { position } => at(position.x),
                                })
                            })
                            .include_y(0.0)
                            .show(ui, |plot| {
                                for series in shown {
                                    let name = series.metric.as_str();
                                    let mean: Vec<[f64; 2]> = series
                                        .points
                                        .iter()
                                        .map(|b| [b.start_secs as f64, b.mean()])
                                        .collect();
                                    let band_low: Vec<[f64; 2]> = series
                                        .points
                                        .iter()
                                        .map(|b| [b.start_secs as f64, b.min])
                                        .collect();
                                    let band_high: Vec<[f64; 2]> = series
                                        .points
                                        .iter()
                                        .map(|b| [b.start_secs as f64, b.max])
                                        .collect();
                                    if answer.resolution_secs > 1 {
                                        plot.line(Line::new(format!("{name} min"), band_low).width(0.5));
                                        plot.line(Line::new(format!("{name} max"), band_high).width(0.5));
                                    }
                                    plot.line(Line::new(name, mean).width(1.5));
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
            answer.to_secs
        ));
        let mut text = String::from("time_unix_secs,metric,unit,min,mean,max\n");
        for series in &answer.series {
            for b in &series.points {
                text.push_str(&format!(
                    "{},{},{},{},{},{}\n",
                    b.start_secs,
                    series.metric.as_str(),
                    series.metric.unit(),
                    b.min,
                    b.mean(),
                    b.max
                ));
            }
        }
        std::fs::write(&path, text)?;
        Ok(path)
    }
}
