//! Details of the selected host or VM, with the actions that fit its state.

use dunes_shared::model::{ServiceName, VmState};
use egui::RichText;

use super::{Actions, Selection, UiAction, human_bytes, link_color, state_color};
use crate::engine::{LinkState, Snapshot, statistics::series::Subject};

#[derive(Debug, Default)]
pub struct DetailsPanel {
    settings: super::vm_settings::VmSettings,
    thumbnail: super::screen::Thumbnail,
}

fn row(ui: &mut egui::Ui, key: &str, value: impl Into<egui::WidgetText>) {
    ui.label(RichText::new(key).weak());
    // Long values (keys, paths) wrap within the panel instead of widening it.
    ui.add(egui::Label::new(value).wrap());
    ui.end_row();
}

/// The width a details grid's value column may take: the panel's, less the key column.
fn value_width(ui: &egui::Ui) -> f32 {
    (ui.available_width() - 110.0).max(120.0)
}

impl DetailsPanel {
    /// Follows the screen of the VM `vm` (`HOST/NAME`) with `uuid` in its details.
    pub fn watch_screen(&mut self, uuid: String, vm: String, link: &super::link::EngineLink) {
        self.thumbnail.watch(uuid, vm, link);
    }

    /// Reverts to or deletes a snapshot of the VM, and shows its snapshots afterwards.
    pub fn snapshot_action(
        &mut self,
        actions: &mut Actions<'_>,
        host: &dunes_shared::model::HostId,
        vm: &dunes_shared::model::VmName,
        action: dunes_shared::protocol::SnapshotAction,
        snapshot: String,
    ) {
        self.settings.act(actions, host, vm, action, snapshot);
    }

    pub fn details_ui(
        &mut self,
        ui: &mut egui::Ui,
        snapshot: &Snapshot,
        selection: &Selection,
        actions: &mut Actions<'_>,
    ) {
        egui::ScrollArea::vertical().auto_shrink([false; 2]).show(ui, |ui| match selection.clone() {
            Selection::None => {
                self.thumbnail.clear();
                ui.heading("Details");
                ui.label("Select a host or a VM in the topology.");
            }
            Selection::Host(id) => {
                self.thumbnail.clear();
                let Some(host) = snapshot.host(&id) else {
                    ui.label(format!("Host {id} is no longer enrolled."));
                    return;
                };
                ui.horizontal(|ui| {
                    ui.heading(format!("Host {id}"));
                    if ui.button("Statistics…").on_hover_text("CPU, memory, disk and network over time").clicked() {
                        actions.push(UiAction::OpenCharts(Subject::Host(id.clone())));
                    }
                });
                // What an operator acts on comes before the facts, which may run long.
                maintenance_ui(ui, snapshot, host, actions);
                ui.separator();
                ui.label(RichText::new(format!("{} VMs", host.vms.len())).strong());
                for vm in &host.vms {
                    ui.horizontal(|ui| {
                        let (dot, _) = ui.allocate_exact_size(egui::vec2(10.0, 10.0), egui::Sense::hover());
                        ui.painter().circle_filled(dot.center(), 4.0, state_color(vm.state));
                        if ui.selectable_label(false, vm.name.as_str()).clicked() {
                            actions.push(UiAction::Select(Selection::Vm(id.clone(), vm.name.clone())));
                        }
                        ui.label(RichText::new(vm.state.as_str()).weak());
                    });
                }
                ui.separator();
                egui::Grid::new("host-details").num_columns(2).striped(true).max_col_width(value_width(ui)).show(ui, |ui| {
                    row(ui, "State", RichText::new(host.link.as_str()).color(link_color(host.link)));
                    if let Some(err) = &host.link_error {
                        row(ui, "Last error", err.as_str());
                    }
                    row(ui, "Address", host.record.address.as_str());
                    row(ui, "Key", host.record.fingerprint.to_string());
                    if !host.skipped_events.is_empty() {
                        let kinds: Vec<String> = host.skipped_events.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
                        row(ui, "Skipped events", format!("{} (from a newer agent: update the console)", kinds.join(", ")));
                    }
                    if let Some(expires) = host.cert_expires() {
                        let text = crate::engine::snapshot::rfc3339(expires);
                        if host.cert_expired() {
                            row(ui, "Certificate", RichText::new(format!("expired {text}: re-enroll")).color(egui::Color32::LIGHT_RED));
                        } else {
                            row(ui, "Certificate", format!("renewed automatically; expires {text}"));
                        }
                    }
                    if let Some(inv) = host.inventory() {
                        row(ui, "Host name", inv.hostname.as_str());
                        row(
                            ui,
                            "Site",
                            format!("{}{}", inv.site.name, if inv.site.remote { " (remote)" } else { "" }),
                        );
                        row(ui, "Link", format!("{} Mbit/s, {} ms", inv.site.link_bandwidth_mbps, inv.site.link_latency_ms));
                        // The demo's hosts are mock hosts: say that their sizes are declared.
                        let declared = if inv.sizes_from == dunes_shared::model::SizesFrom::TestDriver {
                            " (declared by libvirt's test driver)"
                        } else {
                            ""
                        };
                        row(ui, "CPUs", format!("{} × {}{declared}", inv.cpus, inv.cpu_model));
                        row(ui, "Memory", format!("{} MiB{declared}", inv.memory_mib));
                        row(ui, "Storage", format!("{} MiB free of {}", inv.storage_free_mib, inv.storage_total_mib));
                        let runtimes: Vec<String> = inv
                            .runtimes
                            .iter()
                            .map(|r| format!("{} ({} {})", r.kind.as_str(), r.driver, r.version))
                            .collect();
                        row(ui, "Runtimes", runtimes.join(", "));
                        for r in &inv.runtimes {
                            let kind = r.kind.as_str();
                            if let Some(limits) = &r.limits {
                                row(ui, &format!("Limits ({kind})"), limits.clone());
                            }
                            if let Some(users) = &r.users {
                                row(ui, &format!("Users ({kind})"), users.clone());
                            }
                        }
                        row(ui, "Security level", inv.security_level.to_string());
                        row(
                            ui,
                            "Prices",
                            format!(
                                "{:.3}/GB-month stored, {:.3}/GB transferred, {:.3}/CPU-hour",
                                inv.prices.per_gb_month_stored, inv.prices.per_gb_transferred, inv.prices.per_cpu_hour
                            ),
                        );
                        let net: Vec<String> = inv.network.iter().map(|n| n.name.clone()).collect();
                        row(ui, "Network", net.join(", "));
                    }
                    if let Some(status) = host.status {
                        row(ui, "CPU load", format!("{:.0} %", status.cpu_load_percent));
                        row(ui, "Memory used", format!("{} / {} MiB", status.memory_used_mib, status.memory_total_mib));
                        row(ui, "Running VMs", status.vms_running.to_string());
                    }
                });
            }
            Selection::Vm(host_id, name) => {
                let Some(host) = snapshot.host(&host_id) else {
                    ui.label(format!("Host {host_id} is no longer enrolled."));
                    return;
                };
                let Some(vm) = host.vm(&name) else {
                    ui.label(format!("{name} no longer exists on {host_id}."));
                    return;
                };
                let is_process = vm.runtime == dunes_shared::model::RuntimeKind::Process;
                ui.horizontal(|ui| {
                    ui.heading(format!("{} {name}", if is_process { "Process" } else { "VM" }));
                    if ui.button("Statistics…").on_hover_text("CPU, memory, disk and network over time").clicked() {
                        actions.push(UiAction::OpenCharts(Subject::Workload(name.clone())));
                    }
                    if !is_process {
                        let running = matches!(vm.state, VmState::Running | VmState::Paused);
                        let allowed = actions.may::<crate::api::ops::ConsoleVm>(true);
                        let button = ui.add_enabled(running && allowed.is_ok(), egui::Button::new("Console…"));
                        let button = match (&allowed, running) {
                            (Err(why), _) => button.on_disabled_hover_text(why.as_str()),
                            (Ok(()), false) => button.on_disabled_hover_text("Start the VM to open its serial console"),
                            (Ok(()), true) => button.on_hover_text("The VM's serial console"),
                        };
                        if button.clicked() {
                            actions.push(UiAction::OpenConsole(host_id.clone(), name.clone()));
                        }
                        let allowed = actions.may::<crate::api::ops::ScreenVm>(true);
                        let button = ui.add_enabled(running && vm.screen && allowed.is_ok(), egui::Button::new("Screen…"));
                        let button = match (&allowed, running, vm.screen) {
                            (Err(why), _, _) => button.on_disabled_hover_text(why.as_str()),
                            (Ok(()), _, false) => button.on_disabled_hover_text("This VM has no screen: only VMs created under QEMU by this release have one"),
                            (Ok(()), false, true) => button.on_disabled_hover_text("Start the VM to see its screen"),
                            (Ok(()), true, true) => button.on_hover_text("The VM's screen, with its keyboard and mouse"),
                        };
                        if button.clicked() {
                            actions.push(UiAction::OpenScreen(host_id.clone(), name.clone()));
                        }
                    }
                });
                // The actions first: in a small window the facts below may run past the fold.
                let online = host.link == LinkState::Online;
                if !online {
                    ui.colored_label(link_color(host.link), format!("Host {host_id} is {}: actions wait for it.", host.link.as_str()));
                }
                ui.horizontal_wrapped(|ui| {
                    super::vm_actions::vm_actions_ui(ui, snapshot, host, vm, actions, |_| {});
                });
                // A live thumbnail of its screen, for those who may see it.
                let running = matches!(vm.state, VmState::Running | VmState::Paused);
                if vm.screen && running && actions.may::<crate::api::ops::ScreenVm>(true).is_ok() {
                    if self.thumbnail.wants(&vm.uuid) {
                        actions.push(UiAction::WatchScreen {
                            uuid: vm.uuid.clone(),
                            host: host_id.clone(),
                            vm: name.clone(),
                        });
                    }
                    if let Some(picture) = self.thumbnail.thumbnail_ui(ui, &vm.uuid)
                        && picture.on_hover_text("The VM's screen: click to open it").clicked()
                    {
                        actions.push(UiAction::OpenScreen(host_id.clone(), name.clone()));
                    }
                } else {
                    self.thumbnail.clear();
                }
                egui::Grid::new("vm-details").num_columns(2).striped(true).max_col_width(value_width(ui)).show(ui, |ui| {
                    row(ui, "State", RichText::new(vm.state.as_str()).color(state_color(vm.state)));
                    row(ui, "Host", host_id.as_str());
                    match &vm.addresses {
                        Some(addresses) if !addresses.is_empty() => row(ui, "Addresses", addresses.join("\n")),
                        Some(_) => row(ui, "Addresses", "none: its guest has no address yet"),
                        None if vm.state == dunes_shared::model::VmState::Running && !is_process => {
                            row(ui, "Addresses", RichText::new("not known: its guest agent does not answer").weak())
                        }
                        None => {}
                    }
                    row(ui, "vCPUs", vm.vcpus.to_string());
                    row(ui, "Memory", format!("{} MiB", vm.memory_mib));
                    if let Some(next) = vm.next_start {
                        row(ui, "Next start", format!("{} vCPUs, {} MiB", next.vcpus, next.memory_mib));
                    }
                    if let Some(autostart) = vm.autostart {
                        row(ui, "Autostart", if autostart { "with its host's agent" } else { "off" });
                    }
                    if let Some(n) = vm.snapshots.filter(|&n| n > 0) {
                        row(ui, "Snapshots", n.to_string());
                    }
                    row(ui, "Template", vm.template.as_ref().map_or("—".to_string(), |t| t.to_string()));
                    if let Some(image) = &vm.installer {
                        ui.label(RichText::new("CD-ROM").weak());
                        ui.horizontal_wrapped(|ui| {
                            ui.label(format!("installer {image}, booted before the disk"));
                            let allowed = actions.may::<crate::api::ops::EjectVm>(true);
                            let button = ui.add_enabled(online && allowed.is_ok(), egui::Button::new("Eject"));
                            let button = match &allowed {
                                Err(why) => button.on_disabled_hover_text(why.as_str()),
                                Ok(()) => button.on_hover_text("Take the installer out: the VM boots from its disk from then on"),
                            };
                            if button.clicked() {
                                actions.call(
                                    format!("Ejecting the installer of {name}"),
                                    crate::api::ops::EjectVm { vm: format!("{host_id}/{name}") },
                                );
                            }
                        });
                        ui.end_row();
                    }
                    match &vm.disks {
                        Some(disks) if disks.is_empty() && !is_process => {
                            row(ui, "Disks", "none in the agent's storage (defined outside Dunes): it cannot migrate");
                        }
                        Some(disks) => {
                            for disk in disks {
                                let backing = disk.backing.as_ref().map_or(String::new(), |t| format!(" overlay on {t}"));
                                row(
                                    ui,
                                    "Disk",
                                    format!(
                                        "{} ({}{backing})\n{} virtual, {} allocated",
                                        disk.file,
                                        disk.format.as_str(),
                                        human_bytes(disk.virtual_bytes),
                                        human_bytes(disk.allocated_bytes)
                                    ),
                                );
                            }
                        }
                        None => {
                            row(ui, "Disk allocated", human_bytes(vm.disk_bytes));
                            if let Some(base) = &vm.overlay_on {
                                row(ui, "Disk", format!("qcow2 overlay on {} ({} image)", base.template, human_bytes(base.allocated_bytes)));
                            }
                        }
                    }
                    match &vm.nics {
                        Some(nics) if nics.is_empty() && !is_process => row(ui, "NICs", "none"),
                        Some(nics) => {
                            for nic in nics {
                                let mac = nic.mac.as_deref().map_or(String::new(), |m| format!("\n{m}"));
                                row(ui, "NIC", format!("{} on {}{mac}", nic.model, nic.network));
                            }
                        }
                        None => {}
                    }
                    row(ui, "UUID", vm.uuid.as_str());
                });
                guest_apps_ui(ui, snapshot, &host_id, &name, actions);
                if !is_process {
                    ui.separator();
                    self.settings.vm_settings_ui(ui, snapshot, host, vm, actions);
                }
            }
            Selection::Service(name) => {
                self.thumbnail.clear();
                service_details(ui, snapshot, &name, actions);
            }
        });
    }
}

/// The applications inside a service instance's VM, as its guest agent shows them.
fn guest_apps_ui(
    ui: &mut egui::Ui,
    snapshot: &Snapshot,
    host: &dunes_shared::model::HostId,
    vm: &dunes_shared::model::VmName,
    actions: &mut Actions<'_>,
) {
    use crate::engine::services::guest_apps::GuestAppState;
    let Some((service, instance)) = snapshot
        .services
        .iter()
        .find_map(|s| s.instance_of_vm(host, vm).map(|i| (s.name(), i)))
    else {
        return;
    };
    if instance.guest_apps.is_empty() {
        return;
    }
    ui.separator();
    ui.label(RichText::new(format!("Applications inside (service {service})")).strong());
    for guest in &instance.guest_apps {
        ui.horizontal_wrapped(|ui| {
            let color = match guest.state {
                GuestAppState::Up => egui::Color32::from_rgb(63, 185, 80),
                GuestAppState::Down => egui::Color32::from_rgb(248, 81, 73),
                GuestAppState::Unknown => egui::Color32::GRAY,
            };
            let (dot, _) = ui.allocate_exact_size(egui::vec2(10.0, 10.0), egui::Sense::hover());
            ui.painter().circle_filled(dot.center(), 4.0, color);
            ui.label(format!("{}: {}", guest.name, guest.state.as_str()));
            let mut usage = Vec::new();
            if let Some(cpu) = guest.cpu_percent {
                usage.push(format!("{cpu:.1} % CPU"));
            }
            if let Some(mib) = guest.memory_mib {
                usage.push(format!("{mib:.1} MiB"));
            }
            if !usage.is_empty() {
                ui.label(RichText::new(usage.join(" · ")).weak());
            }
            if ui
                .small_button("Statistics…")
                .on_hover_text(format!("CPU and memory of {} over time", guest.name))
                .clicked()
            {
                actions.push(UiAction::OpenCharts(Subject::GuestApp(
                    vm.clone(),
                    guest.name.clone(),
                )));
            }
        });
        ui.label(RichText::new(&guest.detail).weak().small());
    }
}

/// A host's maintenance: drain it (everything moved off, nothing new lands), pause or resume
/// the drain, end the maintenance; what the drain has done and what cannot move, and why.
fn maintenance_ui(
    ui: &mut egui::Ui,
    snapshot: &Snapshot,
    host: &crate::engine::HostView,
    actions: &mut Actions<'_>,
) {
    let id = host.id().clone();
    // Maintenance is an admin's.
    let may = actions.may::<crate::api::ops::DrainHost>(true);
    let Some(maintenance) = host.record.maintenance else {
        ui.horizontal_wrapped(|ui| {
            ui.label("In service: takes new VMs and instances.");
            if super::gated(ui, &may, true, egui::Button::new("Drain"))
                .on_hover_text(
                    "Maintenance: move every VM to the hosts placement picks, and take nothing new",
                )
                .clicked()
            {
                actions.call(
                    format!("Draining {id}"),
                    crate::api::ops::DrainHost {
                        host: id.to_string(),
                    },
                );
            }
        });
        return;
    };
    ui.label(
        RichText::new("In maintenance: takes nothing new")
            .strong()
            .color(egui::Color32::from_rgb(230, 180, 60)),
    );
    if let Some(drain) = snapshot.drain(&id) {
        let total = drain.moved + drain.remaining;
        let done = if total == 0 {
            1.0
        } else {
            drain.moved as f32 / total as f32
        };
        let state = if drain.paused {
            "paused".to_string()
        } else if let Some(m) = drain.migrating {
            format!("migration {m} under way")
        } else if drain.is_settled() {
            "nothing more can move".to_string()
        } else {
            "choosing the next VM".to_string()
        };
        ui.add(egui::ProgressBar::new(done).text(format!(
            "{} moved, {} left: {state}",
            drain.moved, drain.remaining
        )));
        for b in &drain.blocked {
            ui.label(
                RichText::new(format!("{} cannot move: {}", b.vm, b.reason))
                    .color(egui::Color32::LIGHT_RED),
            );
        }
    }
    ui.horizontal_wrapped(|ui| {
        if maintenance.paused {
            if super::gated(ui, &may, true, egui::Button::new("Resume drain")).clicked() {
                actions.call(
                    format!("Resuming the drain of {id}"),
                    crate::api::ops::DrainHost {
                        host: id.to_string(),
                    },
                );
            }
        } else if super::gated(ui, &may, true, egui::Button::new("Pause drain"))
            .on_hover_text("The migration under way finishes")
            .clicked()
        {
            actions.call(
                format!("Pausing the drain of {id}"),
                crate::api::ops::PauseDrain {
                    host: id.to_string(),
                },
            );
        }
        if super::gated(ui, &may, true, egui::Button::new("End maintenance"))
            .on_hover_text("The host takes new work again")
            .clicked()
        {
            actions.call(
                format!("Ending the maintenance of {id}"),
                crate::api::ops::UndrainHost {
                    host: id.to_string(),
                },
            );
        }
    });
}

/// The selected service: status, applications with their cost, and every instance.
fn service_details(
    ui: &mut egui::Ui,
    snapshot: &Snapshot,
    name: &ServiceName,
    actions: &mut Actions<'_>,
) {
    let Some(view) = snapshot.services.iter().find(|s| s.name() == name) else {
        ui.label(format!("Service {name} no longer exists."));
        return;
    };
    ui.horizontal(|ui| {
        ui.heading(format!("Service {name}"));
        if ui
            .button("Statistics…")
            .on_hover_text("Its instances' CPU (mean), memory, disk and network (sums) over time")
            .clicked()
        {
            actions.push(UiAction::OpenCharts(Subject::Service(name.clone())));
        }
    });
    egui::Grid::new("service-details")
        .num_columns(2)
        .striped(true)
        .show(ui, |ui| {
            row(
                ui,
                "Status",
                RichText::new(view.status.as_str()).color(super::service_color(view.status)),
            );
            row(ui, "Cost", format!("{:.3}/h", view.cost_per_hour()));
            row(
                ui,
                "Instances",
                format!(
                    "{} ({} ready)",
                    view.instances.len(),
                    view.instances.iter().filter(|i| i.ready).count()
                ),
            );
        });
    if let Err(e) = &view.spec {
        ui.colored_label(
            egui::Color32::LIGHT_RED,
            format!("The stored file no longer reads: {e}"),
        );
        return;
    }
    // Each application's charts: its instances together (inside VMs: from the guests).
    if let Ok(spec) = &view.spec {
        ui.horizontal_wrapped(|ui| {
            ui.label("Statistics of");
            let names = spec
                .applications
                .iter()
                .flat_map(|a| std::iter::once(&a.name).chain(a.guest_apps.iter().map(|g| &g.name)));
            for app in names {
                if ui
                    .small_button(app.as_str())
                    .on_hover_text(format!(
                        "Charts of application {app}: its instances together"
                    ))
                    .clicked()
                {
                    actions.push(UiAction::OpenCharts(Subject::Application(
                        name.clone(),
                        app.clone(),
                    )));
                }
            }
        });
    }
    ui.separator();
    for inst in &view.instances {
        ui.horizontal(|ui| {
            let color = inst.vm_state.map_or(egui::Color32::GRAY, state_color);
            let (dot, _) = ui.allocate_exact_size(egui::vec2(10.0, 10.0), egui::Sense::hover());
            ui.painter().circle_filled(dot.center(), 4.0, color);
            let label = format!(
                "{}-{} on {}",
                inst.record.app, inst.record.index, inst.record.host
            );
            if ui.selectable_label(false, label).clicked() {
                actions.push(UiAction::Select(Selection::Vm(
                    inst.record.host.clone(),
                    inst.record.vm.clone(),
                )));
            }
            let state = inst.vm_state.map_or("missing", |s| s.as_str());
            let ready = if inst.ready { ", ready" } else { "" };
            ui.label(RichText::new(format!("{state}{ready}")).weak());
        });
    }
}
