//! The service editor: the service file (TOML) with what it defines beside it, checked as it
//! is typed. Nothing is sent until it reads; a refusal names the line.

use dunes_shared::{model::ServiceName, service::ServiceSpec};
use egui::{Color32, RichText};

use super::Actions;
use crate::engine::{Snapshot, services::service_file::parse_service_file};

/// The e-commerce example, offered to start from.
const EXAMPLE: &str = include_str!("../../../assets/examples/shop.toml");

#[derive(Debug, Default)]
pub struct ServiceEditor {
    open: bool,
    /// The service being changed, or `None` for a new one.
    editing: Option<ServiceName>,
    source: String,
    /// The text last checked and what it gave, so that checking runs once per change.
    checked: Option<(String, Result<ServiceSpec, String>)>,
}

impl ServiceEditor {
    pub fn open(&mut self, snapshot: &Snapshot, name: Option<&ServiceName>) {
        self.open = true;
        self.editing = name.cloned();
        self.source = match name {
            Some(name) => snapshot
                .services
                .iter()
                .find(|s| s.name() == name)
                .map(|s| s.record.source.clone())
                .unwrap_or_default(),
            None => String::new(),
        };
        self.checked = None;
    }

    pub fn close(&mut self) {
        self.open = false;
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    fn check(&mut self) -> Result<ServiceSpec, String> {
        if self.checked.as_ref().is_none_or(|(s, _)| *s != self.source) {
            let result = if self.source.trim().is_empty() {
                Err("write the service: a name, then [[application]] tables".to_string())
            } else {
                parse_service_file(&self.source).map_err(|e| e.to_string())
            };
            self.checked = Some((self.source.clone(), result));
        }
        self.checked
            .as_ref()
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| Err(String::new()))
    }

    pub fn editor_ui(
        &mut self,
        ctx: &egui::Context,
        snapshot: &Snapshot,
        actions: &mut Actions<'_>,
    ) {
        if !self.open {
            return;
        }
        let title = match &self.editing {
            Some(name) => format!("Edit service {name}"),
            None => "New service".to_string(),
        };
        let mut open = true;
        let mut close = false;
        egui::Window::new(title)
            .id(egui::Id::unique("service-editor"))
            .open(&mut open)
            .default_size([760.0, 520.0])
            .collapsible(false)
            .show(ctx, |ui| {
                let checked = self.check();
                ui.horizontal(|ui| {
                    if self.editing.is_none()
                        && ui
                            .button("Start from the shop example")
                            .on_hover_text("assets/examples/shop.toml")
                            .clicked()
                    {
                        self.source = EXAMPLE.to_string();
                    }
                    match &checked {
                        Ok(spec) => {
                            let order = spec
                                .start_order()
                                .map(|o| {
                                    o.iter()
                                        .map(|a| a.name.as_str())
                                        .collect::<Vec<_>>()
                                        .join(" -> ")
                                })
                                .unwrap_or_default();
                            ui.label(
                                RichText::new(format!(
                                    "reads: {} applications, start order {order}",
                                    spec.applications.len()
                                ))
                                .color(Color32::from_rgb(63, 185, 80)),
                            );
                        }
                        Err(e) => {
                            ui.label(RichText::new(e).color(Color32::from_rgb(248, 81, 73)));
                        }
                    }
                });
                ui.separator();
                ui.columns(2, |columns| {
                    let label = columns[0].label("Service file");
                    egui::ScrollArea::vertical()
                        .id_salt("service-source")
                        .max_height(400.0)
                        .show(&mut columns[0], |ui| {
                            ui.add(
                                egui::TextEdit::multiline(&mut self.source)
                                    .code_editor()
                                    .desired_rows(22)
                                    .desired_width(f32::INFINITY),
                            )
                            .labelled_by(label.id);
                        });
                    egui::ScrollArea::vertical()
                        .id_salt("service-outline")
                        .max_height(420.0)
                        .show(&mut columns[1], |ui| outline(ui, checked.as_ref().ok()));
                });
                ui.separator();
                ui.horizontal(|ui| {
                    let exists = self.editing.is_none()
                        && checked.as_ref().is_ok_and(|spec| {
                            snapshot.services.iter().any(|s| s.name() == &spec.name)
                        });
                    let verb = if self.editing.is_some() {
                        "Save"
                    } else {
                        "Define"
                    };
                    let can = checked.is_ok() && !exists;
                    if ui.add_enabled(can, egui::Button::new(verb)).clicked() {
                        let source = self.source.clone();
                        let replace = self.editing.is_some();
                        actions.call(
                            format!("{verb} service"),
                            crate::api::ops::DefineService { source, replace },
                        );
                        close = true;
                    }
                    if exists {
                        ui.colored_label(
                            Color32::from_rgb(248, 81, 73),
                            "a service of this name exists: edit that one",
                        );
                    }
                    if ui.button("Cancel").clicked() {
                        close = true;
                    }
                });
            });
        if !open || close {
            self.open = false;
        }
    }
}

/// What the file defines: applications with their needs and dependencies, then the rules.
fn outline(ui: &mut egui::Ui, spec: Option<&ServiceSpec>) {
    let Some(spec) = spec else {
        ui.label(RichText::new("The outline shows once the file reads.").weak());
        return;
    };
    ui.label(RichText::new(format!("service {}", spec.name)).strong());
    for app in &spec.applications {
        let needs = if app.depends_on.is_empty() {
            String::new()
        } else {
            format!(
                " · after {}",
                app.depends_on
                    .iter()
                    .map(|d| d.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        ui.label(format!(
            "{} × {} · {} · {} vCPU, {} MiB{needs}",
            app.instances,
            app.name,
            app.runtime.as_str(),
            app.vcpus,
            app.memory_mib
        ));
    }
    let rules = &spec.rules;
    let mut lines = Vec::new();
    for app in &rules.distinct_hosts {
        lines.push(format!("{app}: instances on different hosts"));
    }
    for [a, b] in &rules.anti_affinity {
        lines.push(format!("{a} and {b} on different hosts"));
    }
    for [a, b] in &rules.affinity {
        lines.push(format!("{b} beside {a}"));
    }
    for pin in &rules.pin {
        lines.push(format!("{} pinned", pin.application));
    }
    for app in &rules.never_relocate {
        lines.push(format!("{app} never relocates"));
    }
    for rule in &rules.min_security_level {
        lines.push(format!(
            "{}: security level >= {}",
            rule.application
                .as_ref()
                .map_or("every application".to_string(), |a| a.to_string()),
            rule.level
        ));
    }
    if !rules.allowed_sites.is_empty() {
        lines.push(format!(
            "sites: {}",
            rules
                .allowed_sites
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if let Some(max) = rules.max_cost_per_hour {
        lines.push(format!("at most {max:.3}/h"));
    }
    if !lines.is_empty() {
        ui.separator();
        ui.label(RichText::new("Rules").strong());
        for line in lines {
            ui.label(line);
        }
    }
}
