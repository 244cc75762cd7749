//! The Audit view: every change asked of the engine and every refusal, newest first, filtered
//! by operator and time, with a check of the log's hash chain.

use std::time::{Duration, Instant};

use egui::RichText;
use tokio::sync::oneshot;

use super::link::{Answer, take};
use crate::api::{
    EngineClient, Operation, ops,
    views::{AuditCheck, AuditView},
};

/// How often the view asks again while open.
const REFRESH: Duration = Duration::from_secs(5);

/// How far back the view shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Since {
    Hour,
    #[default]
    Day,
    Week,
    All,
}

impl Since {
    const ALL: [Since; 4] = [Since::Hour, Since::Day, Since::Week, Since::All];

    fn label(self) -> &'static str {
        match self {
            Since::Hour => "last hour",
            Since::Day => "last day",
            Since::Week => "last 7 days",
            Since::All => "all",
        }
    }

    fn secs(self) -> Option<u64> {
        match self {
            Since::Hour => Some(3600),
            Since::Day => Some(86_400),
            Since::Week => Some(7 * 86_400),
            Since::All => None,
        }
    }
}

#[derive(Default)]
pub struct AuditWindow {
    open: bool,
    operator: String,
    since: Since,
    lines: Option<Vec<AuditView>>,
    check: Option<AuditCheck>,
    listing: Option<Answer<Vec<AuditView>>>,
    checking: Option<Answer<AuditCheck>>,
    asked_at: Option<Instant>,
    /// The filter the lines shown were asked with.
    asked_for: (String, Since),
    error: Option<String>,
}

fn ask<O: Operation>(
    client: &EngineClient,
    runtime: &tokio::runtime::Handle,
    request: O,
) -> Answer<O::Response> {
    let (tx, rx) = oneshot::channel();
    let client = client.clone();
    runtime.spawn(async move {
        let _ = tx.send(client.call(request).await);
    });
    rx
}

impl AuditWindow {
    pub fn open(&mut self) {
        self.open = true;
        self.asked_at = None;
        self.check = None;
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    pub fn close(&mut self) {
        self.open = false;
        self.listing = None;
        self.checking = None;
    }

    fn refresh(&mut self, client: &EngineClient, runtime: &tokio::runtime::Handle) {
        match take(&mut self.listing) {
            Some(Ok(lines)) => {
                self.lines = Some(lines);
                self.error = None;
            }
            Some(Err(e)) => self.error = Some(e),
            None => {}
        }
        match take(&mut self.checking) {
            Some(Ok(check)) => self.check = Some(check),
            Some(Err(e)) => self.error = Some(e),
            None => {}
        }
        let wanted = (self.operator.trim().to_string(), self.since);
        let due = self.asked_at.is_none_or(|t| t.elapsed() >= REFRESH) || wanted != self.asked_for;
        if self.listing.is_none() && due {
            self.listing = Some(ask(
                client,
                runtime,
                ops::ListAudit {
                    since_secs: self.since.secs(),
                    operator: Some(wanted.0.clone()).filter(|o| !o.is_empty()),
                },
            ));
            self.asked_at = Some(Instant::now());
            self.asked_for = wanted;
        }
    }

    pub fn audit_ui(
        &mut self,
        ctx: &egui::Context,
        client: &EngineClient,
        runtime: &tokio::runtime::Handle,
    ) {
        if !self.open {
            return;
        }
        self.refresh(client, runtime);
        ctx.request_repaint_after(if self.listing.is_some() || self.checking.is_some() {
            Duration::from_millis(50)
        } else {
            REFRESH
        });
        let mut open = true;
        let screen = ctx.content_rect();
        egui::Window::new("Audit log")
            .id(egui::Id::unique("audit"))
            .open(&mut open)
            .default_size([
                (screen.width() * 0.6).clamp(300.0, 900.0),
                (screen.height() - 160.0).clamp(200.0, 700.0),
            ])
            .max_height((screen.height() - 40.0).max(200.0))
            .show(ctx, |ui| {
                ui.horizontal_wrapped(|ui| {
                    let label = ui.label("Operator");
                    ui.add(
                        egui::TextEdit::singleline(&mut self.operator)
                            .hint_text("anyone")
                            .desired_width(110.0),
                    )
                    .labelled_by(label.id)
                    .on_hover_text(
                        "An operator's name, or local for the control socket and this window",
                    );
                    egui::ComboBox::from_id_salt("audit-since")
                        .selected_text(self.since.label())
                        .show_ui(ui, |ui| {
                            for since in Since::ALL {
                                ui.selectable_value(&mut self.since, since, since.label());
                            }
                        });
                    if ui
                        .add_enabled(self.checking.is_none(), egui::Button::new("Verify chain"))
                        .on_hover_text("Check that no record was changed or removed")
                        .clicked()
                    {
                        self.checking = Some(ask(client, runtime, ops::VerifyAudit {}));
                    }
                });
                match &self.check {
                    Some(c) if c.intact => {
                        ui.label(
                            RichText::new(format!("The chain of {} records is intact.", c.records))
                                .color(egui::Color32::from_rgb(63, 185, 80)),
                        );
                    }
                    Some(c) => {
                        ui.label(
                            RichText::new(format!(
                                "The chain is broken: {}",
                                c.problem.as_deref().unwrap_or("no reason given")
                            ))
                            .color(egui::Color32::from_rgb(248, 81, 73)),
                        );
                    }
                    None => {}
                }
                if let Some(e) = &self.error {
                    ui.colored_label(ui.visuals().error_fg_color, e);
                }
                ui.separator();
                let Some(lines) = &self.lines else {
                    ui.label(RichText::new("reading the log…").weak());
                    return;
                };
                if lines.is_empty() {
                    ui.label("Nothing recorded in that range: changes and refusals appear here.");
                    return;
                }
                egui::ScrollArea::both()
                    .auto_shrink([false, false])
                    .show(ui, |ui| {
                        egui::Grid::new("audit-lines")
                            .striped(true)
                            .num_columns(6)
                            .show(ui, |ui| {
                                for header in
                                    ["Time", "Operator", "Operation", "Target", "Outcome", "ms"]
                                {
                                    ui.label(RichText::new(header).strong());
                                }
                                ui.end_row();
                                for line in lines.iter().rev() {
                                    // To the second, in UTC as the log keeps it.
                                    ui.label(line.time.replace('T', " ").trim_end_matches('Z'));
                                    ui.label(&line.operator).on_hover_text(
                                        line.fingerprint
                                            .as_deref()
                                            .unwrap_or("the control socket or this window"),
                                    );
                                    ui.label(&line.operation).on_hover_text(&line.parameters);
                                    ui.label(&line.target);
                                    let outcome = RichText::new(&line.outcome);
                                    ui.label(if line.outcome == "ok" {
                                        outcome
                                    } else if line.outcome.starts_with("refused")
                                        || line.outcome.starts_with("failed")
                                    {
                                        outcome.color(ui.visuals().error_fg_color)
                                    } else {
                                        outcome.color(ui.visuals().warn_fg_color)
                                    });
                                    ui.label(
                                        line.duration_ms
                                            .map_or_else(|| "-".to_string(), |d| d.to_string()),
                                    );
                                    ui.end_row();
                                }
                            });
                    });
            });
        if !open {
            self.close();
        }
    }
}
