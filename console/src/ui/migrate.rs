//! "Migrate to…": every other host with the pre-check's verdict, for those who don't drag.
//! Keyboard first: the first host that fits has the focus, Tab moves, Enter chooses, and the
//! choice opens the same confirmation as a drop.

use dunes_shared::model::{HostId, VmName};
use egui::{Color32, RichText};

use super::UiAction;
use crate::engine::{Snapshot, migration::precheck};

#[derive(Debug, Default)]
pub struct MigrateDialog {
    /// The VM to move, from its host.
    open: Option<(HostId, VmName)>,
    /// The focus goes to the first host that fits once, when the dialog opens.
    focus_pending: bool,
}

impl MigrateDialog {
    pub fn open(&mut self, host: HostId, vm: VmName) {
        self.open = Some((host, vm));
        self.focus_pending = true;
    }

    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    pub fn migrate_ui(
        &mut self,
        ctx: &egui::Context,
        snapshot: &Snapshot,
        queue: &mut Vec<UiAction>,
    ) {
        let Some((from_id, vm_name)) = self.open.clone() else {
            return;
        };
        let mut chosen = None;
        let response = egui::Modal::new(egui::Id::unique("migrate-to")).show(ctx, |ui| {
            ui.set_max_width(520.0);
            ui.heading(format!("Migrate {vm_name} to…"));
            let from = snapshot.host(&from_id);
            let Some((from, vm)) = from.and_then(|f| f.vm(&vm_name).map(|v| (f, v))) else {
                ui.label(format!("{vm_name} is no longer on {from_id}."));
                if ui.button("Close").clicked() {
                    ui.close();
                }
                return;
            };
            ui.label(
                RichText::new(format!(
                    "From {from_id}. It moves cold: it stops, its disk is streamed and verified, and it starts on the host you choose."
                ))
                .weak(),
            );
            ui.add_space(4.0);
            let mut focus_given = !self.focus_pending;
            egui::ScrollArea::vertical()
                .max_height(320.0)
                .show(ui, |ui| {
                    for host in snapshot.hosts.iter().filter(|h| h.id() != &from_id) {
                        let verdict =
                            precheck(vm, from, host, &snapshot.services, &snapshot.migrations);
                        ui.horizontal(|ui| {
                            let button = ui.add_enabled(
                                verdict.is_ok(),
                                egui::Button::new(RichText::new(host.id().as_str()).strong())
                                    .min_size(egui::vec2(110.0, 0.0)),
                            );
                            if verdict.is_ok() && !focus_given {
                                button.request_focus();
                                focus_given = true;
                            }
                            if button.clicked() {
                                chosen = Some(host.id().clone());
                            }
                            match &verdict {
                                Ok(e) => ui.label(format!(
                                    "site {} · {:.0} MiB · about {:.0} s · cost {:.4}",
                                    host.site_name(),
                                    e.bytes as f64 / 1048576.0,
                                    e.seconds.ceil(),
                                    e.cost
                                )),
                                Err(reasons) => ui.colored_label(
                                    Color32::from_rgb(248, 81, 73),
                                    reasons.join("; "),
                                ),
                            };
                        });
                    }
                });
            self.focus_pending = false;
            ui.add_space(4.0);
            if ui.button("Cancel").clicked() {
                ui.close();
            }
        });
        if let Some(to) = chosen {
            queue.push(UiAction::ConfirmMigrate {
                host: from_id,
                vm: vm_name,
                to,
            });
            self.open = None;
        } else if response.should_close() {
            self.open = None;
        }
    }
}
