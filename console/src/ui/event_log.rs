//! The event log: what the console did and what it saw, newest at the bottom.

use egui::{Color32, RichText};

use crate::engine::{Level, Snapshot};

#[derive(Debug, Default)]
pub struct EventLogPanel {
    errors_only: bool,
}

/// `HH:MM:SS` (UTC) of a Unix time in milliseconds.
pub fn clock(time_ms: u64) -> String {
    let secs = time_ms / 1000;
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

/// `YYYY-MM-DD HH:MM` (UTC) of a Unix time in seconds.
pub fn date_time(unix_secs: u64) -> String {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp(unix_secs.min(i64::MAX as u64) as i64)
    else {
        return String::new();
    };
    format!(
        "{}-{:02}-{:02} {:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute()
    )
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
