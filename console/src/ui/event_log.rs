//! The event log: what the console did and what it saw, newest at the bottom.

use egui::{Color32, RichText};

use super::clock;
use crate::engine::{Level, Snapshot};

#[derive(Debug, Default)]
pub struct EventLogPanel {
    errors_only: bool,
}

impl EventLogPanel {
    pub fn event_log_ui(&mut self, ui: &mut egui::Ui, snapshot: &Snapshot) {
        ui.horizontal(|ui| {
            ui.strong("Events");
            ui.checkbox(&mut self.errors_only, "Warnings and errors only");
        });
        let events: Vec<_> = snapshot
            .events
            .iter()
            .filter(|e| !self.errors_only || e.level != Level::Info)
            .collect();
        let row_height = ui.text_style_height(&egui::TextStyle::Monospace) + 2.0;
        egui::ScrollArea::vertical()
            .id_salt("event-log")
            .auto_shrink([false; 2])
            .stick_to_bottom(true)
            .show_rows(ui, row_height, events.len(), |ui, range| {
                for event in &events[range] {
                    let color = match event.level {
                        Level::Info => ui.visuals().text_color(),
                        Level::Warning => Color32::from_rgb(210, 153, 34),
                        Level::Error => Color32::from_rgb(248, 81, 73),
                    };
                    ui.horizontal(|ui| {
                        ui.monospace(clock(event.time_ms));
                        ui.label(RichText::new(event.level.as_str()).color(color).monospace());
                        if let Some(host) = &event.host {
                            ui.label(RichText::new(host.as_str()).strong());
                        }
                        ui.label(RichText::new(&event.message).color(color));
                    });
                }
            });
    }
}
