//! The plan dialog: what a deploy would create, keep and remove, where, at what cost, and why
//! every other host was left out. A planned instance dragged onto a host is placed there by
//! hand: while it hovers, the verdict is worked out live from the snapshot (green, or the
//! rule it breaks); when it is dropped, the engine plans again with it.

use dunes_shared::model::{HostId, ServiceName};
use egui::{Color32, RichText, Role, WidgetInfo};
use tokio::sync::oneshot;

use super::{Actions, PlannedDrag, STOPPED};
use crate::{
    api::{ApiError, ops, views::PlanView},
    engine::{
        Snapshot,
        services::placement::{Override, place_instances_with},
        services::views::plan_inputs,
    },
};

const GREEN: Color32 = Color32::from_rgb(63, 185, 80);
const RED: Color32 = Color32::from_rgb(248, 81, 73);

#[derive(Debug, Default)]
pub struct PlanDialog {
    service: Option<ServiceName>,
    /// Instances placed by hand, sent with every plan and the deploy.
    overrides: Vec<Override>,
    pending: Option<oneshot::Receiver<Result<PlanView, ApiError>>>,
    plan: Option<Result<PlanView, String>>,
}

impl PlanDialog {
    pub fn open(&mut self, service: ServiceName, actions: &mut Actions<'_>) {
        self.service = Some(service);
        self.overrides.clear();
        self.plan = None;
        self.request(actions);
    }

    pub fn close(&mut self) {
        self.service = None;
        self.pending = None;
    }

    pub fn is_open(&self) -> bool {
        self.service.is_some()
    }

    /// Asks the engine for the plan with the overrides as they are now.
    fn request(&mut self, actions: &mut Actions<'_>) {
        let Some(name) = self.service.clone() else {
            return;
        };
        self.pending = Some(actions.request(ops::PlanService {
            name: name.to_string(),
            place: self.overrides.iter().map(override_text).collect(),
        }));
    }

    fn poll(&mut self) {
        let Some(rx) = &mut self.pending else {
            return;
        };
        match rx.try_recv() {
            Ok(result) => {
                self.plan = Some(result.map_err(|e| e.message));
                self.pending = None;
            }
            Err(oneshot::error::TryRecvError::Empty) => {}
            Err(oneshot::error::TryRecvError::Closed) => {
                self.plan = Some(Err(STOPPED.to_string()));
                self.pending = None;
            }
        }
    }

    /// What placing `drag` on `host` by hand would give, from the snapshot.
    fn live_verdict(
        &self,
        snapshot: &Snapshot,
        drag: &PlannedDrag,
        host: &HostId,
    ) -> Option<Result<(), String>> {
        let view = snapshot
            .services
            .iter()
            .find(|s| Some(s.name()) == self.service.as_ref())?;
        let spec = view.spec.as_ref().ok()?;
        let records: Vec<_> = view.instances.iter().map(|i| i.record.clone()).collect();
        let (offers, existing) =
            plan_inputs(spec, snapshot.hosts.iter().map(|h| h.as_ref()), &records);
        let mut overrides: Vec<Override> = self
            .overrides
            .iter()
            .filter(|o| !(o.app == drag.app && o.index == drag.index))
            .cloned()
            .collect();
        overrides.push(Override {
            app: drag.app.clone(),
            index: drag.index,
            host: host.clone(),
        });
        let plan = place_instances_with(spec, &offers, &existing, &overrides, &snapshot.images);
        plan.overrides
            .into_iter()
            .find(|o| o.placement.app == drag.app && o.placement.index == drag.index)
            .map(|o| o.verdict)
    }

    pub fn plan_ui(&mut self, ctx: &egui::Context, snapshot: &Snapshot, actions: &mut Actions<'_>) {
        let Some(name) = self.service.clone() else {
            return;
        };
        self.poll();
        if self.pending.is_some() {
            ctx.request_repaint_after(std::time::Duration::from_millis(50));
        }
        let mut open = true;
        let mut close = false;
        let mut dropped: Option<(PlannedDrag, HostId)> = None;
        let mut replan = false;
        egui::Window::new(format!("Plan for {name}"))
            .id(egui::Id::unique("plan-dialog"))
            .open(&mut open)
            .default_size([820.0, 520.0])
            .collapsible(false)
            .show(ctx, |ui| {
                let plan = match &self.plan {
                    None => {
                        ui.label("Planning…");
                        return;
                    }
                    Some(Err(e)) => {
                        ui.colored_label(RED, e);
                        if ui.button("Close").clicked() {
                            close = true;
                        }
                        return;
                    }
                    Some(Ok(plan)) => plan.clone(),
                };
                let p = &plan;
                let creates = p.placements.iter().filter(|x| x.action == "create").count();
                let keeps = p.placements.len() - creates;
                ui.label(format!(
                    "{creates} to create, {keeps} kept, {} to remove, {} cannot be placed · {:.3}/h · fingerprint {}",
                    p.removals.len(),
                    p.unplaced.len(),
                    p.cost_per_hour,
                    plan.fingerprint
                ));
                ui.label(
                    RichText::new("Drag an instance onto a host to place it there by hand.").weak(),
                );
                ui.separator();
                let hover = egui::DragAndDrop::payload::<PlannedDrag>(ctx);
                ui.columns(2, |cols| {
                    let ui = &mut cols[0];
                    ui.label(RichText::new("Instances").strong());
                    for x in &p.placements {
                        let image = x.image_transfer.as_ref().map_or(String::new(), |t| {
                            let time = t.secs.map_or(String::new(), |s| format!(", ~{s} s"));
                            format!(" · sends image {} ({} MiB{time})", t.image, t.mib)
                        });
                        let label = format!(
                            "{} -> {} · {} · {:.3}/h{image}",
                            x.instance,
                            x.host,
                            x.action,
                            x.cost_per_hour
                        );
                        drag_row(ui, &x.application, x.index, label, None);
                    }
                    for r in &p.removals {
                        ui.label(format!("{} on {} · remove", r.instance, r.host));
                    }
                    for u in &p.unplaced {
                        let label = format!("{} cannot be placed: {}", u.instance, u.would_fit);
                        drag_row(ui, &u.application, u.index, label, Some(RED));
                    }
                    if !p.overrides.is_empty() {
                        ui.separator();
                        ui.label(RichText::new("Placed by hand").strong());
                        for o in &p.overrides {
                            let (text, color) = match &o.breaks {
                                None => (format!("{} on {}: holds", o.instance, o.host), GREEN),
                                Some(why) => (
                                    format!("{} on {}: breaks {why}", o.instance, o.host),
                                    RED,
                                ),
                            };
                            ui.colored_label(color, text);
                        }
                        if ui.button("Clear hand placements").clicked() {
                            self.overrides.clear();
                            replan = true;
                        }
                    }
                    if !p.rejections.is_empty() {
                        ui.separator();
                        egui::CollapsingHeader::new("Hosts left out")
                            .default_open(true)
                            .show(ui, |ui| {
                                for (app, list) in &p.rejections {
                                    for reason in list {
                                        ui.label(format!("{app}: {reason}"));
                                    }
                                }
                            });
                    }

                    let ui = &mut cols[1];
                    ui.label(RichText::new("Hosts").strong());
                    for host in snapshot.hosts.iter() {
                        let Some(inv) = host.inventory() else {
                            continue;
                        };
                        let id = host.id().clone();
                        let (inner, released) = ui.dnd_drop_zone::<PlannedDrag, ()>(
                            egui::Frame::default().inner_margin(4.0),
                            |ui| {
                                ui.set_width(ui.available_width());
                                ui.label(RichText::new(id.as_str()).strong());
                                ui.label(
                                    RichText::new(format!(
                                        "site {} · security {} · {} runtimes",
                                        inv.site.name,
                                        inv.security_level,
                                        inv.runtimes.len()
                                    ))
                                    .small(),
                                );
                            },
                        );
                        let label = format!("host {id}");
                        inner
                            .response
                            .widget_info(|| WidgetInfo::labeled(Role::Group, true, &label));
                        if let Some(drag) = inner.response.dnd_hover_payload::<PlannedDrag>()
                            && let Some(verdict) = self.live_verdict(snapshot, &drag, &id)
                        {
                            let (text, color) = match verdict {
                                Ok(()) => (format!("{}-{} fits on {id}", drag.app, drag.index), GREEN),
                                Err(why) => (format!("{}-{} breaks a rule: {why}", drag.app, drag.index), RED),
                            };
                            ui.painter().rect_stroke(
                                inner.response.rect,
                                egui::CornerRadius::same(4),
                                egui::Stroke::new(2.5, color),
                                egui::StrokeKind::Inside,
                            );
                            ui.colored_label(color, text);
                        }
                        if let Some(drag) = released {
                            dropped = Some(((*drag).clone(), id));
                        }
                    }
                });
                if hover.is_some() {
                    ctx.request_repaint();
                }
                ui.separator();
                ui.horizontal(|ui| {
                    let can_deploy = p.feasible && p.changes && self.pending.is_none();
                    let why_not = if !p.feasible {
                        "something cannot be placed"
                    } else if !p.changes {
                        "nothing to change"
                    } else {
                        ""
                    };
                    let deploy = ui
                        .add_enabled(can_deploy, egui::Button::new("Deploy"))
                        .on_disabled_hover_text(why_not);
                    if deploy.clicked() {
                        actions.call(
                            format!("Deploying service {name}"),
                            ops::DeployService {
                                name: name.to_string(),
                                fingerprint: Some(plan.fingerprint.clone()),
                                place: self.overrides.iter().map(override_text).collect(),
                            },
                        );
                        close = true;
                    }
                    if ui.button("Plan again").clicked() {
                        replan = true;
                    }
                    if ui.button("Close").clicked() {
                        close = true;
                    }
                });
            });
        if let Some((drag, host)) = dropped {
            self.overrides
                .retain(|o| !(o.app == drag.app && o.index == drag.index));
            self.overrides.push(Override {
                app: drag.app,
                index: drag.index,
                host,
            });
            replan = true;
        }
        if replan {
            self.request(actions);
        }
        // Escape closes it like the other dialogs; nothing is deployed without Deploy.
        if !open || close || ctx.input(|i| i.key_pressed(egui::Key::Escape)) {
            self.close();
        }
    }
}

/// An instance placed by hand as the API takes it: `APP-INDEX=HOST`.
fn override_text(o: &Override) -> String {
    format!("{}-{}={}", o.app, o.index, o.host)
}

/// A planned instance that can be dragged onto a host.
fn drag_row(
    ui: &mut egui::Ui,
    app: &dunes_shared::model::AppName,
    index: u32,
    label: String,
    color: Option<Color32>,
) {
    let id = egui::Id::unique(("planned", app.as_str(), index));
    let payload = PlannedDrag {
        app: app.clone(),
        index,
    };
    ui.dnd_drag_source(id, payload, |ui| {
        let text = RichText::new(label);
        let text = match color {
            Some(c) => text.color(c),
            None => text,
        };
        ui.add(egui::Label::new(text).selectable(false));
    });
}
