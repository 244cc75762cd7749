//! The Capacity view: per site and per resource, what the hosts have, what is allocated,
//! what is used and what is free, and when CPU and memory are full, with the forecast's
//! method named and its line drawn through the daily peaks up to the capacity.

use std::time::Instant;

use egui_plot::{HLine, Legend, Line, Plot, Points};
use tokio::sync::oneshot;

use super::{EngineLink, STOPPED, UiAction};
use crate::{
    api::{
        ApiError, ops,
        views::{ResourceView, SiteCapacityView},
    },
    engine::statistics::series::Subject,
};

/// How often the view asks again while open.
const REFRESH_SECS: u64 = 10;

#[derive(Default)]
pub struct CapacityWindow {
    open: bool,
    answer: Option<Vec<SiteCapacityView>>,
    pending: Option<oneshot::Receiver<Result<Vec<SiteCapacityView>, ApiError>>>,
    asked_at: Option<Instant>,
    error: Option<String>,
}

impl CapacityWindow {
    pub fn open(&mut self) {
        self.open = true;
        self.asked_at = None;
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    pub fn close(&mut self) {
        self.open = false;
        self.pending = None;
    }

    /// Shows `sites` as they are and asks the engine nothing for an hour: fixed data, for
    /// layout snapshots.
    pub fn show_answer(&mut self, sites: Vec<SiteCapacityView>) {
        self.open = true;
        self.answer = Some(sites);
        self.pending = None;
        self.error = None;
        self.asked_at = Instant::now().checked_add(std::time::Duration::from_secs(3600));
    }

    fn refresh(&mut self, link: &EngineLink) {
        if let Some(rx) = &mut self.pending {
            match rx.try_recv() {
                Ok(Ok(sites)) => {
                    self.answer = Some(sites);
                    self.error = None;
                    self.pending = None;
                }
                Ok(Err(e)) => {
                    self.error = Some(e.message);
                    self.pending = None;
                }
                Err(oneshot::error::TryRecvError::Empty) => return,
                Err(oneshot::error::TryRecvError::Closed) => {
                    self.error = Some(STOPPED.to_string());
                    self.pending = None;
                }
            }
        }
        if self
            .asked_at
            .is_some_and(|t| t.elapsed().as_secs() < REFRESH_SECS)
        {
            return;
        }
        self.pending = Some(link.ask(ops::Forecast { site: None }));
        self.asked_at = Some(Instant::now());
    }

    /// Draws the view; a site's **Statistics…** asks for its charts in `queue`.
    /// `shared_machine`: hosts on libvirt's test driver (the demo's) run on this one
    /// machine, so what they use is this machine's.
    pub fn capacity_ui(
        &mut self,
        ctx: &egui::Context,
        link: &EngineLink,
        queue: &mut Vec<UiAction>,
        shared_machine: bool,
    ) {
        if !self.open {
            return;
        }
        self.refresh(link);
        // Drawn again for the answer, and when it is due for a new one; not every frame.
        ctx.request_repaint_after(if self.pending.is_some() {
            std::time::Duration::from_millis(50)
        } else {
            std::time::Duration::from_secs(REFRESH_SECS)
        });
        let mut open = true;
        let screen = ctx.content_rect();
        let max_h = (screen.height() - 40.0).max(200.0);
        egui::Window::new("Capacity")
            .id(egui::Id::unique("capacity"))
            .open(&mut open)
            .default_size([
                (screen.width() * 0.5).clamp(300.0, 720.0),
                (screen.height() - 120.0).clamp(200.0, 860.0),
            ])
            .max_height(max_h)
            .max_width((screen.width() - 20.0).max(300.0))
            .min_width(300.0)
            .constrain(true)
            .show(ctx, |ui| {
                ui.label(
                    egui::RichText::new(
                        "Allocated: what the VMs and processes placed there were given (their vCPUs, memory and disks). Used: what the hosts measure in use.",
                    )
                    .weak(),
                );
                if shared_machine {
                    ui.colored_label(
                        egui::Color32::from_rgb(210, 153, 34),
                        "These hosts run on libvirt's test driver on this one machine (the demo): their capacity is what they declare, and what each of them reports as used is this machine's.",
                    );
                }
                if let Some(e) = &self.error {
                    ui.colored_label(egui::Color32::LIGHT_RED, e);
                }
                let Some(sites) = &self.answer else {
                    ui.label("Loading…");
                    return;
                };
                if sites.is_empty() {
                    ui.label("No host has told its size yet.");
                    return;
                }
                egui::ScrollArea::vertical().show(ui, |ui| {
                    for site in sites {
                        site_ui(ui, site, queue);
                        ui.separator();
                    }
                });
            });
        if !open {
            self.close();
        }
    }
}

fn site_ui(ui: &mut egui::Ui, site: &SiteCapacityView, queue: &mut Vec<UiAction>) {
    ui.horizontal(|ui| {
        ui.heading(format!(
            "{} · {} host{}",
            site.site,
            site.hosts.len(),
            if site.hosts.len() == 1 { "" } else { "s" }
        ));
        if ui
            .button("Statistics…")
            .on_hover_text("The site's hosts over time, summed (CPU averaged)")
            .clicked()
        {
            queue.push(UiAction::OpenCharts(Subject::Site(site.site.clone())));
        }
    });
    egui::Grid::new(("capacity", site.site.as_str()))
        .num_columns(6)
        .striped(true)
        .show(ui, |ui| {
            for h in ["Resource", "Capacity", "Allocated", "Used", "Free", ""] {
                ui.label(egui::RichText::new(h).weak());
            }
            ui.end_row();
            for r in &site.resources {
                let unit = &r.unit;
                ui.label(&r.resource);
                ui.label(format!("{:.0} {unit}", r.capacity));
                let over = r.allocated > r.capacity;
                let allocated = format!("{:.0} {unit}", r.allocated);
                if over {
                    ui.colored_label(egui::Color32::LIGHT_RED, format!("{allocated} (over)"));
                } else {
                    ui.label(allocated);
                }
                ui.label(r.used.map_or("—".into(), |u| format!("{u:.0} {unit}")));
                ui.label(format!("{:.0} {unit}", r.free));
                let fraction = if r.capacity > 0.0 {
                    (r.allocated.max(r.used.unwrap_or(0.0)) / r.capacity).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                ui.add(egui::ProgressBar::new(fraction as f32).desired_width(90.0));
                ui.end_row();
            }
        });
    for r in &site.resources {
        let Some(f) = &r.forecast else {
            continue;
        };
        ui.label(egui::RichText::new(&f.text).strong());
        ui.label(egui::RichText::new(format!("Method: {}", f.method)).weak());
        if r.peaks.len() >= 2 {
            forecast_plot(ui, site, r);
        }
    }
}

/// The daily peaks, the trend from now to where it crosses the capacity, and the capacity.
fn forecast_plot(ui: &mut egui::Ui, site: &SiteCapacityView, r: &ResourceView) {
    let Some(f) = &r.forecast else {
        return;
    };
    // The trend's line starts where the forecast was made.
    let now_day = f.as_of_day;
    let peaks = r.peaks.clone();
    let ahead = match f.full_in_days {
        Some(days) if days > 0.0 => days.max(1.0),
        _ => 30.0,
    };
    Plot::new(("forecast", site.site.as_str(), r.resource.as_str()))
        .height(110.0)
        .legend(Legend::default())
        .x_axis_formatter(|mark, _| {
            // Day numbers since the epoch, shown as dates.
            let at = std::time::UNIX_EPOCH
                + std::time::Duration::from_secs_f64(mark.value.max(0.0) * 86_400.0);
            crate::engine::snapshot::rfc3339(at)
                .chars()
                .take(10)
                .collect()
        })
        .include_y(0.0)
        .include_y(r.capacity)
        .show(ui, |plot| {
            plot.points(Points::new("daily peaks", peaks).radius(2.5));
            if let Some(start) = f.trend_now {
                let end = start + f.slope_per_day * ahead;
                plot.line(
                    Line::new("forecast", vec![[now_day, start], [now_day + ahead, end]])
                        .width(1.5),
                );
            }
            plot.hline(HLine::new("capacity", r.capacity));
        });
}
