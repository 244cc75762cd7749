//! What a VM's details let the operator change besides its power: its vCPUs and memory, its
//! autostart, a copy of it, and its snapshots. Snapshots are asked of its agent when the
//! details open and whenever the VM's state or snapshot count changes.

use dunes_shared::model::{HostId, SnapshotInfo, VmName, VmState, VmStatus};
use dunes_shared::protocol::SnapshotAction;
use egui::RichText;
use tokio::sync::oneshot;

use super::{Actions, Confirm, UiAction};
use crate::{
    api::{ApiError, ops},
    engine::{HostView, LinkState, Snapshot},
};

type Listing = oneshot::Receiver<Result<Vec<SnapshotInfo>, ApiError>>;

/// The VM the fields below belong to, and what its snapshot list was asked for.
#[derive(Debug, Clone, PartialEq)]
struct Shown {
    host: HostId,
    vm: VmName,
    state: VmState,
    snapshots: Option<u32>,
}

#[derive(Debug, Default)]
pub struct VmSettings {
    shown: Option<Shown>,
    vcpus: u32,
    memory_mib: u64,
    snapshot_name: String,
    clone_name: String,
    clone_to: Option<HostId>,
    listing: Option<Listing>,
    /// The VM's snapshots, or why it has none.
    listed: Option<Result<Vec<SnapshotInfo>, String>>,
    /// The change to the snapshots under way, as the status bar names it.
    doing: Option<String>,
}

impl VmSettings {
    /// Takes up `vm`: its fields are reset when another VM is shown, and its snapshots are
    /// asked for again when its state or snapshot count changed.
    fn follow(&mut self, host: &HostView, vm: &VmStatus, actions: &mut Actions<'_>) {
        let now = Shown {
            host: host.id().clone(),
            vm: vm.name.clone(),
            state: vm.state,
            snapshots: vm.snapshots,
        };
        let same_vm = self
            .shown
            .as_ref()
            .is_some_and(|s| s.host == now.host && s.vm == now.vm);
        if !same_vm {
            let next = vm.next_start;
            self.vcpus = next.map_or(vm.vcpus, |n| n.vcpus);
            self.memory_mib = next.map_or(vm.memory_mib, |n| n.memory_mib);
            self.snapshot_name.clear();
            self.clone_name = format!("{}-copy", vm.name);
            self.clone_to = None;
            self.listed = None;
        }
        if self.shown.as_ref() != Some(&now) && host.link == LinkState::Online {
            self.list(actions, &now.host, &now.vm, SnapshotAction::List, None);
        }
        self.shown = Some(now);
    }

    /// Asks for the snapshot list (after `action`); the answer replaces the list shown.
    fn list(
        &mut self,
        actions: &mut Actions<'_>,
        host: &HostId,
        vm: &VmName,
        action: SnapshotAction,
        snapshot: Option<String>,
    ) {
        self.listing = Some(actions.request(ops::SnapshotVm {
            vm: format!("{host}/{vm}"),
            action,
            snapshot,
        }));
    }

    /// Takes, reverts to or deletes a snapshot; the status bar says so, and the list shown
    /// is what the agent answers afterwards.
    pub fn act(
        &mut self,
        actions: &mut Actions<'_>,
        host: &HostId,
        vm: &VmName,
        action: SnapshotAction,
        snapshot: String,
    ) {
        let doing = match action {
            SnapshotAction::Create => format!("Taking snapshot {snapshot} of {vm}"),
            SnapshotAction::Revert => format!("Reverting {vm} to snapshot {snapshot}"),
            SnapshotAction::Delete => format!("Deleting snapshot {snapshot} of {vm}"),
            SnapshotAction::List => format!("Listing the snapshots of {vm}"),
        };
        actions.say(format!("{doing}…"), false);
        self.doing = Some(doing);
        self.list(actions, host, vm, action, Some(snapshot));
    }

    fn receive(&mut self, actions: &mut Actions<'_>) {
        let Some(rx) = &mut self.listing else {
            return;
        };
        match rx.try_recv() {
            Ok(Ok(list)) => {
                if let Some(doing) = self.doing.take() {
                    actions.say(format!("{doing}: done"), false);
                }
                self.listed = Some(Ok(list));
                self.listing = None;
            }
            Ok(Err(e)) => {
                let text = match self.doing.take() {
                    Some(doing) => format!("{doing}: {}", e.message),
                    None => e.message,
                };
                // A failed create keeps the list; the operator reads why in the status bar.
                if self.listed.as_ref().is_none_or(Result::is_err) {
                    self.listed = Some(Err(text.clone()));
                } else {
                    actions.say(text, true);
                }
                self.listing = None;
            }
            Err(oneshot::error::TryRecvError::Empty) => {}
            Err(oneshot::error::TryRecvError::Closed) => self.listing = None,
        }
    }

    pub fn vm_settings_ui(
        &mut self,
        ui: &mut egui::Ui,
        snapshot: &Snapshot,
        host: &HostView,
        vm: &VmStatus,
        actions: &mut Actions<'_>,
    ) {
        self.follow(host, vm, actions);
        self.receive(actions);
        if self.listing.is_some() {
            ui.ctx()
                .request_repaint_after(std::time::Duration::from_millis(100));
        }
        let online = host.link == LinkState::Online;
        let (host_id, name) = (host.id(), &vm.name);

        egui::CollapsingHeader::new("Resources and autostart")
            .id_salt("vm-resources")
            .default_open(true)
            .show(ui, |ui| {
                ui.horizontal_wrapped(|ui| {
                    let label = ui.label("vCPUs");
                    ui.add(egui::DragValue::new(&mut self.vcpus).range(1..=256))
                        .labelled_by(label.id);
                    let label = ui.label("Memory");
                    ui.add(
                        egui::DragValue::new(&mut self.memory_mib)
                            .range(16..=4 * 1024 * 1024)
                            .speed(16)
                            .suffix(" MiB"),
                    )
                    .labelled_by(label.id);
                    let current = vm.next_start.map_or((vm.vcpus, vm.memory_mib), |n| {
                        (n.vcpus, n.memory_mib)
                    });
                    let changed = (self.vcpus, self.memory_mib) != current;
                    let hint = if vm.state.is_active() {
                        "It runs: the new vCPUs and memory apply at its next start"
                    } else {
                        "Applied now: it is off"
                    };
                    if ui
                        .add_enabled(online && changed, egui::Button::new("Apply"))
                        .on_hover_text(hint)
                        .clicked()
                    {
                        actions.call(
                            format!("Resizing {name}"),
                            crate::api::ops::ConfigureVm {
                                vm: format!("{host_id}/{name}"),
                                vcpus: (self.vcpus != current.0).then_some(self.vcpus),
                                memory_mib: (self.memory_mib != current.1)
                                    .then_some(self.memory_mib),
                                autostart: None,
                            },
                        );
                    }
                });
                if let Some(next) = vm.next_start {
                    ui.label(
                        RichText::new(format!(
                            "At its next start: {} vCPUs, {} MiB (it runs with {} and {} MiB now)",
                            next.vcpus, next.memory_mib, vm.vcpus, vm.memory_mib
                        ))
                        .color(ui.visuals().warn_fg_color),
                    );
                } else if vm.state.is_active() {
                    ui.label(
                        RichText::new("A change applies at its next start: it runs now.").weak(),
                    );
                }
                match vm.autostart {
                    Some(on) => {
                        let mut wanted = on;
                        if ui
                            .add_enabled(
                                online,
                                egui::Checkbox::new(&mut wanted, "Start with its host's agent"),
                            )
                            .changed()
                        {
                            let what = format!(
                                "Turning autostart of {name} {}",
                                if wanted { "on" } else { "off" }
                            );
                            actions.call(
                                what,
                                crate::api::ops::ConfigureVm {
                                    vm: format!("{host_id}/{name}"),
                                    vcpus: None,
                                    memory_mib: None,
                                    autostart: Some(wanted),
                                },
                            );
                        }
                    }
                    None => {
                        ui.label(RichText::new("Autostart: not known (an older agent, or a VM Dunes did not create)").weak());
                    }
                }
            });

        egui::CollapsingHeader::new("Clone")
            .id_salt("vm-clone")
            .show(ui, |ui| {
                ui.horizontal_wrapped(|ui| {
                    let label = ui.label("Copy's name");
                    ui.add(egui::TextEdit::singleline(&mut self.clone_name).desired_width(140.0))
                        .labelled_by(label.id);
                    ui.label("on");
                    let shown = self.clone_to.clone().unwrap_or_else(|| host_id.clone());
                    egui::ComboBox::from_id_salt("vm-clone-to")
                        .selected_text(shown.as_str())
                        .show_ui(ui, |ui| {
                            for h in &snapshot.hosts {
                                let id = h.id();
                                let label = if id == host_id {
                                    format!("{id} (here)")
                                } else {
                                    id.to_string()
                                };
                                if ui.selectable_label(&shown == id, label).clicked() {
                                    self.clone_to = (id != host_id).then(|| id.clone());
                                }
                            }
                        });
                    let off = vm.state == VmState::Shutoff;
                    let parsed = VmName::new(self.clone_name.trim());
                    let button = ui
                        .add_enabled(online && off && parsed.is_ok(), egui::Button::new("Clone"))
                        .on_hover_text("Copy its disks, vCPUs and memory, with a new name, UUID and MAC; the copy stays off (made here, then migrated when another host is chosen)")
                        .on_disabled_hover_text(if off {
                            "Give the copy a valid name (letters, digits, '-')"
                        } else {
                            "Stop it first: a clone copies its disks at rest"
                        });
                    if button.clicked()
                        && let Ok(new_name) = parsed
                    {
                        actions.call(
                            format!("Cloning {name} as {new_name}"),
                            crate::api::ops::CloneVm {
                                vm: format!("{host_id}/{name}"),
                                name: new_name.to_string(),
                                to: self.clone_to.as_ref().map(|h| h.to_string()),
                            },
                        );
                    }
                });
            });

        let listed = self.listed.clone();
        egui::CollapsingHeader::new("Snapshots")
            .id_salt("vm-snapshots")
            .default_open(true)
            .show(ui, |ui| match listed {
                None => {
                    ui.label(RichText::new("asking its agent…").weak());
                }
                Some(Err(why)) => {
                    ui.add(egui::Label::new(RichText::new(why.as_str()).weak()).wrap());
                }
                Some(Ok(list)) => {
                    if list.is_empty() {
                        ui.label(RichText::new("None yet.").weak());
                    }
                    // One snapshot a few short lines: the panel keeps its width.
                    for s in &list {
                        ui.horizontal_wrapped(|ui| {
                            let mark = if s.current { " (current)" } else { "" };
                            ui.label(RichText::new(format!("{}{mark}", s.name)).strong());
                            let memory = match s.memory_state_bytes {
                                Some(b) if b > 0 => {
                                    format!(", {} of memory", super::human_bytes(b))
                                }
                                _ => String::new(),
                            };
                            ui.label(
                                RichText::new(format!(
                                    "{} UTC, {}{memory}",
                                    super::date_time(s.created_unix_secs),
                                    s.state.as_str()
                                ))
                                .weak(),
                            );
                        });
                        ui.horizontal(|ui| {
                            if ui
                                .add_enabled(online, egui::Button::new("Revert…"))
                                .on_hover_text("Put the VM back as it was then")
                                .clicked()
                            {
                                actions.push(UiAction::Confirm(Confirm::RevertSnapshot {
                                    host: host_id.clone(),
                                    vm: name.clone(),
                                    snapshot: s.name.clone(),
                                    running: s.state == VmState::Running,
                                }));
                            }
                            if ui
                                .add_enabled(online, egui::Button::new("Delete…"))
                                .on_hover_text("Remove this snapshot; the VM stays as it is")
                                .clicked()
                            {
                                actions.push(UiAction::Confirm(Confirm::DeleteSnapshot {
                                    host: host_id.clone(),
                                    vm: name.clone(),
                                    snapshot: s.name.clone(),
                                }));
                            }
                        });
                    }
                    ui.horizontal_wrapped(|ui| {
                        let label = ui.label("New snapshot");
                        ui.add(
                            egui::TextEdit::singleline(&mut self.snapshot_name)
                                .hint_text("name")
                                .desired_width(140.0),
                        )
                        .labelled_by(label.id);
                        let valid =
                            dunes_shared::model::validate_snapshot_name(self.snapshot_name.trim());
                        let taken = list.iter().any(|s| s.name == self.snapshot_name.trim());
                        let hint = match (&valid, taken) {
                            (Err(e), _) if !self.snapshot_name.is_empty() => e.to_string(),
                            (_, true) => format!(
                                "{} has a snapshot named {} already",
                                name,
                                self.snapshot_name.trim()
                            ),
                            _ => "Its disks, and its memory when it runs, as they are now"
                                .to_string(),
                        };
                        if ui
                            .add_enabled(
                                online && valid.is_ok() && !taken,
                                egui::Button::new("Take snapshot"),
                            )
                            .on_hover_text(hint.clone())
                            .on_disabled_hover_text(hint)
                            .clicked()
                        {
                            let snapshot = self.snapshot_name.trim().to_string();
                            self.snapshot_name.clear();
                            self.act(actions, host_id, name, SnapshotAction::Create, snapshot);
                        }
                    });
                }
            });
    }
}
