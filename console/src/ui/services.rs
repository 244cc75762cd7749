//! The services panel: every service with its status, applications, instances and cost per
//! hour, and the actions that fit it. A service row is also where a VM chip is dropped to
//! adopt the VM into that service.

use dunes_shared::model::{AppName, HostId, ServiceName, VmName};
use egui::{Color32, CornerRadius, RichText, Role, Sense, Stroke, StrokeKind, WidgetInfo};

use super::{Actions, Selection, UiAction, VmDrag, service_color, service_tag_color, state_color};
use crate::engine::{ServiceStatus, ServiceView, Snapshot, records::InstanceState};

#[derive(Debug, Default)]
pub struct ServicesPanel;

impl ServicesPanel {
    pub fn services_ui(
        &mut self,
        ui: &mut egui::Ui,
        snapshot: &Snapshot,
        selection: &Selection,
        actions: &mut Actions<'_>,
    ) {
        ui.horizontal(|ui| {
            ui.heading("Services");
            let may_define = actions.may::<crate::api::ops::DefineService>(true);
            if super::gated(ui, &may_define, true, egui::Button::new("New service…"))
                .on_hover_text("Write a service: applications, dependencies and rules")
                .clicked()
            {
                actions.push(UiAction::EditService(None));
            }
        });
        ui.separator();
        if snapshot.services.is_empty() {
            ui.label("No services yet. \"New service…\" defines one; drop VMs onto a service to adopt them.");
            migrations_ui(ui, snapshot, actions);
            return;
        }
        egui::ScrollArea::vertical()
            .auto_shrink([false; 2])
            .show(ui, |ui| {
                for view in snapshot.services.iter() {
                    service_card(ui, snapshot, view, selection, actions);
                    ui.add_space(6.0);
                }
                migrations_ui(ui, snapshot, actions);
            });
    }
}

/// One service: a header that is selected by a click and takes dropped VM chips, then its
/// applications, then its actions.
fn service_card(
    ui: &mut egui::Ui,
    snapshot: &Snapshot,
    view: &ServiceView,
    selection: &Selection,
    actions: &mut Actions<'_>,
) {
    let name = view.name();
    let selected = matches!(selection, Selection::Service(s) if s == name);
    // The card's own response is made before its buttons, from where the card was last frame,
    // so that the buttons on top keep their clicks.
    let card_id = ui.scope_id().with(("service-card", name.as_str()));
    let last_rect: Option<egui::Rect> = ui.ctx().data(|d| d.get_temp(card_id));
    let card = last_rect.map(|rect| ui.interact(rect, card_id, Sense::click()));
    let frame = egui::Frame::group(ui.style()).inner_margin(6.0);
    let shown = frame.show(ui, |ui| {
        ui.set_width(ui.available_width());
        ui.horizontal(|ui| {
            let (tag, _) = ui.allocate_exact_size(egui::vec2(6.0, 18.0), Sense::hover());
            ui.painter()
                .rect_filled(tag, CornerRadius::same(2), service_tag_color(name));
            ui.label(RichText::new(name.as_str()).strong());
            ui.label(RichText::new(view.status.as_str()).color(service_color(view.status)));
            if let Some(moving) = &view.record.moving {
                ui.label(
                    RichText::new(format!(
                        "moving to {}: {}",
                        moving.site,
                        moving.phase.as_str()
                    ))
                    .color(Color32::from_rgb(230, 180, 60)),
                );
            }
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                ui.label(format!("{:.3}/h", view.cost_per_hour()));
            });
        });
        match &view.spec {
            Err(e) => {
                ui.colored_label(Color32::LIGHT_RED, format!("no longer reads: {e}"));
            }
            Ok(spec) => {
                for app in &spec.applications {
                    let instances: Vec<_> = view
                        .instances
                        .iter()
                        .filter(|i| i.record.app == app.name)
                        .collect();
                    let ready = instances.iter().filter(|i| i.ready).count();
                    let cost = instances.iter().fold(0.0, |sum, i| sum + i.cost_per_hour);
                    ui.horizontal(|ui| {
                        ui.label(format!(
                            "{} · {} · {ready}/{} ready",
                            app.name,
                            app.runtime.as_str(),
                            app.instances.max(instances.len() as u32)
                        ));
                        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                            ui.label(RichText::new(format!("{cost:.3}/h")).weak());
                        });
                    });
                    // The applications inside this application's VMs: how many are up.
                    if !app.guest_apps.is_empty() {
                        let counts: Vec<String> = app
                            .guest_apps
                            .iter()
                            .map(|g| {
                                let up = instances
                                    .iter()
                                    .flat_map(|i| &i.guest_apps)
                                    .filter(|v| {
                                        v.name == g.name
                                            && v.state
                                                == crate::engine::services::guest_apps::GuestAppState::Up
                                    })
                                    .count();
                                format!("{} {up}/{} up", g.name, instances.len())
                            })
                            .collect();
                        ui.label(
                            RichText::new(format!("inside: {}", counts.join(", ")))
                                .small()
                                .weak(),
                        );
                    }
                    ui.horizontal_wrapped(|ui| {
                        for inst in instances {
                            let color = inst.vm_state.map_or(Color32::GRAY, state_color);
                            // A deploy cut short leaves its journal: shown as it stands.
                            let journal = match inst.record.state {
                                InstanceState::Created => "",
                                InstanceState::Creating => " (creating)",
                                InstanceState::Removing => " (removing)",
                            };
                            let text = format!(
                                "{}-{}@{}{journal}",
                                inst.record.app, inst.record.index, inst.record.host
                            );
                            let state = inst.vm_state.map_or("missing", |s| s.as_str());
                            ui.label(RichText::new(text).small().color(color))
                                .on_hover_text(format!(
                                    "VM {} · {state} ({}){}{}{}",
                                    inst.record.vm,
                                    inst.record.state.as_str(),
                                    if inst.ready { " · ready" } else { "" },
                                    inst.ready_detail
                                        .as_ref()
                                        .map_or(String::new(), |d| format!(" · {d}")),
                                    if inst.record.adopted {
                                        " · adopted"
                                    } else {
                                        ""
                                    }
                                ));
                        }
                    });
                }
            }
        }
        let idle = !matches!(
            view.status,
            ServiceStatus::Deploying
                | ServiceStatus::Starting
                | ServiceStatus::Stopping
                | ServiceStatus::Deleting
        );
        let readable = view.spec.is_ok();
        ui.horizontal_wrapped(|ui| {
            if ui
                .add_enabled(idle && readable, egui::Button::new("Plan…"))
                .on_hover_text("Where every instance would run, and why hosts are left out")
                .clicked()
            {
                actions.push(UiAction::OpenPlan(name.clone()));
            }
            let deployed = !view.instances.is_empty();
            let service = name.to_string();
            let may_run = actions.permits(
                &crate::api::ops::StartService {
                    name: service.clone(),
                },
                snapshot,
            );
            let may_delete = actions.permits(
                &crate::api::ops::DeleteService {
                    name: service.clone(),
                },
                snapshot,
            );
            let may_define = actions.may::<crate::api::ops::DefineService>(true);
            if super::gated(ui, &may_run, idle && deployed, egui::Button::new("Start"))
                .on_hover_text("In dependency order, each application once what it needs is ready")
                .clicked()
            {
                actions.call(
                    format!("Starting service {name}"),
                    crate::api::ops::StartService {
                        name: name.to_string(),
                    },
                );
            }
            if super::gated(ui, &may_run, idle && deployed, egui::Button::new("Stop"))
                .on_hover_text("In reverse dependency order")
                .clicked()
            {
                actions.call(
                    format!("Stopping service {name}"),
                    crate::api::ops::StopService {
                        name: name.to_string(),
                    },
                );
            }
            if super::gated(ui, &may_define, idle, egui::Button::new("Edit…")).clicked() {
                actions.push(UiAction::EditService(Some(name.clone())));
            }
            if super::gated(ui, &may_delete, idle, egui::Button::new("Delete…")).clicked() {
                actions.push(UiAction::ConfirmDeleteService(name.clone()));
            }
        });
    });
    // The whole card: a click selects the service, a VM chip dropped on it is adopted.
    let rect = shown.response.rect;
    ui.ctx().data_mut(|d| d.insert_temp(card_id, rect));
    let Some(response) = card else {
        ui.ctx().request_repaint();
        return;
    };
    let label = format!("service {name}");
    response.widget_info(|| WidgetInfo::selected(Role::Button, true, selected, &label));
    if response.clicked() {
        actions.push(UiAction::Select(Selection::Service(name.clone())));
    }
    let hovering = response.dnd_hover_payload::<VmDrag>().is_some();
    if let Some(drag) = response.dnd_release_payload::<VmDrag>() {
        actions.push(UiAction::Adopt {
            service: name.clone(),
            host: drag.host.clone(),
            vm: drag.vm.clone(),
        });
    }
    let stroke = if hovering {
        Some(Stroke::new(2.5, Color32::from_rgb(88, 166, 255)))
    } else if selected {
        Some(Stroke::new(2.0, ui.visuals().selection.stroke.color))
    } else {
        None
    };
    if let Some(stroke) = stroke {
        ui.painter()
            .rect_stroke(rect, CornerRadius::same(4), stroke, StrokeKind::Inside);
    }
}

/// Asks which application a dropped VM becomes an instance of.
#[derive(Debug, Default)]
pub struct AdoptDialog {
    target: Option<(ServiceName, HostId, VmName)>,
    app: Option<AppName>,
}

impl AdoptDialog {
    /// Opens on a VM dropped onto `service`; the first application of the VM's runtime is
    /// chosen.
    pub fn open(&mut self, snapshot: &Snapshot, service: ServiceName, host: HostId, vm: VmName) {
        let runtime = snapshot
            .host(&host)
            .and_then(|h| h.vm(&vm))
            .map(|v| v.runtime);
        self.app = snapshot
            .services
            .iter()
            .find(|s| s.name() == &service)
            .and_then(|s| s.spec.as_ref().ok())
            .and_then(|spec| {
                spec.applications
                    .iter()
                    .find(|a| Some(a.runtime) == runtime)
                    .map(|a| a.name.clone())
            });
        self.target = Some((service, host, vm));
    }

    pub fn is_open(&self) -> bool {
        self.target.is_some()
    }

    pub fn adopt_ui(
        &mut self,
        ctx: &egui::Context,
        snapshot: &Snapshot,
        actions: &mut Actions<'_>,
    ) {
        let Some((service, host, vm)) = self.target.clone() else {
            return;
        };
        let view = snapshot.services.iter().find(|s| s.name() == &service);
        let spec = view.and_then(|v| v.spec.as_ref().ok());
        let current = snapshot.host(&host).and_then(|h| h.vm(&vm));
        let owner = snapshot
            .services
            .iter()
            .find_map(|s| s.instance_of_vm(&host, &vm).map(|_| s.name().clone()));
        let mut close = false;
        let response = egui::Modal::new(egui::Id::unique("adopt-vm")).show(ctx, |ui| {
            ui.heading(format!("Adopt {vm} into {service}?"));
            ui.label(format!(
                "{vm} on {host} becomes an instance of the application you choose. A deploy never removes it; deleting the service does."
            ));
            let problem = match (spec, current, &owner) {
                (None, _, _) => Some(format!("service {service} no longer reads or exists")),
                (_, None, _) => Some(format!("{vm} no longer exists on {host}")),
                (_, _, Some(owner)) => Some(format!("{vm} already belongs to service {owner}")),
                _ => None,
            };
            if let (Some(spec), Some(vm_status)) = (spec, current) {
                egui::ComboBox::from_label("Application")
                    .selected_text(self.app.as_ref().map_or("choose…".into(), |a| a.to_string()))
                    .show_ui(ui, |ui| {
                        for app in &spec.applications {
                            let fits = app.runtime == vm_status.runtime;
                            let text = format!("{} ({})", app.name, app.runtime.as_str());
                            ui.add_enabled_ui(fits, |ui| {
                                ui.selectable_value(&mut self.app, Some(app.name.clone()), text);
                            });
                        }
                    });
            }
            if let Some(problem) = &problem {
                ui.colored_label(Color32::from_rgb(248, 81, 73), problem);
            }
            ui.horizontal(|ui| {
                let ready = problem.is_none() && self.app.is_some();
                if ui.add_enabled(ready, egui::Button::new("Adopt")).clicked()
                    && let Some(app) = self.app.clone()
                {
                    actions.call(
                        format!("Adopting {vm} into {service}"),
                        crate::api::ops::AdoptVm {
                            name: service.to_string(),
                            app: app.to_string(),
                            vm: format!("{host}/{vm}"),
                        },
                    );
                    close = true;
                }
                if ui.button("Cancel").clicked() {
                    close = true;
                }
            });
        });
        if close || response.should_close() {
            self.target = None;
        }
    }
}

/// Migrations: those under way with their step and bytes (and a cancel while it can roll
/// back), then the last finished ones with how they ended.
fn migrations_ui(ui: &mut egui::Ui, snapshot: &Snapshot, actions: &mut Actions<'_>) {
    if snapshot.migrations.is_empty() {
        return;
    }
    ui.separator();
    ui.heading("Migrations");
    let open = snapshot.migrations.iter().filter(|m| !m.step.is_finished());
    let finished: Vec<_> = snapshot
        .migrations
        .iter()
        .filter(|m| m.step.is_finished())
        .rev()
        .take(5)
        .collect();
    for m in open.chain(finished) {
        let failed = m.step == crate::engine::migration::MigrationStep::RolledBack;
        let color = if failed {
            Color32::from_rgb(248, 81, 73)
        } else if m.step.is_finished() {
            Color32::from_rgb(63, 185, 80)
        } else {
            Color32::from_rgb(88, 166, 255)
        };
        ui.horizontal(|ui| {
            ui.label(RichText::new(format!("#{} {}", m.id, m.vm)).strong());
            ui.label(format!("{} -> {}", m.from, m.to));
            ui.colored_label(color, m.step.label());
            match &m.origin {
                crate::engine::migration::MigrationOrigin::Operator => {}
                crate::engine::migration::MigrationOrigin::Drain(h) => {
                    ui.label(RichText::new(format!("drain of {h}")).weak());
                }
                crate::engine::migration::MigrationOrigin::ServiceMove(s) => {
                    ui.label(RichText::new(format!("move of {s}")).weak());
                }
            }
            if let Some(template) = m.disk_move.template() {
                ui.label(RichText::new(format!("{} on {template}", m.disk_move.kind())).weak())
                    .on_hover_text(m.disk_move.describe());
            }
        });
        if !m.step.is_finished() {
            let fraction = if m.bytes_total > 0 {
                m.bytes_done as f32 / m.bytes_total as f32
            } else {
                0.0
            };
            let rate = m.rate_bps.map_or(String::new(), |r| {
                format!(" · {:.1} MiB/s", r as f64 / 1048576.0)
            });
            let eta = m
                .eta_secs()
                .map_or(String::new(), |s| format!(" · {s} s left"));
            ui.add(egui::ProgressBar::new(fraction).text(format!("{}{rate}{eta}", m.step.label())));
            if !m.step.is_committed() && ui.button("Cancel migration").clicked() {
                let id = m.id;
                actions.call(
                    format!("Cancelling migration {id}"),
                    crate::api::ops::CancelMigration { id },
                );
            }
        }
        if let Some(e) = &m.error {
            ui.label(RichText::new(e).small().color(color));
        }
        if let Some(w) = &m.waiting {
            ui.label(
                RichText::new(format!("waiting: {w}"))
                    .small()
                    .color(Color32::from_rgb(230, 180, 60)),
            );
        }
    }
}
