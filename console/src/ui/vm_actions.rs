//! The actions on one VM, the same in its context menu and in its details: what cannot be
//! taken back is confirmed first, saying what will happen.

use dunes_shared::model::VmStatus;

use super::{Actions, Confirm, UiAction, gated};
use crate::{
    api::ops,
    engine::{HostView, LinkState, Snapshot},
};

/// Draws the VM's action buttons; `close` is called after one was used (a menu closes).
pub fn vm_actions_ui(
    ui: &mut egui::Ui,
    snapshot: &Snapshot,
    host: &HostView,
    vm: &VmStatus,
    actions: &mut Actions<'_>,
    mut close: impl FnMut(&mut egui::Ui),
) {
    let online = host.link == LinkState::Online;
    let active = vm.state.is_active();
    let (host_id, name) = (host.id(), &vm.name);
    // What this window's operator may do to it, as the engine would answer.
    let reference = format!("{host_id}/{name}");
    let may_power = actions.permits(
        &ops::StopVm {
            vm: reference.clone(),
            force: false,
        },
        snapshot,
    );
    let may_migrate = actions.permits(
        &ops::MigrateVm {
            vm: reference.clone(),
            to: host_id.to_string(),
            limit_mbps: None,
            compress: None,
        },
        snapshot,
    );
    let may_delete = actions.permits(&ops::DeleteVm { vm: reference }, snapshot);
    if gated(
        ui,
        &may_power,
        online && !active,
        egui::Button::new("Start"),
    )
    .clicked()
    {
        actions.start_vm(host_id, name);
        close(ui);
    }
    if gated(ui, &may_power, online && active, egui::Button::new("Stop"))
        .on_hover_text("Ask the guest to shut down; forced off after the agent's stop timeout")
        .clicked()
    {
        // Taking a service's instance down is asked first; any other VM just stops.
        let service = snapshot
            .services
            .iter()
            .find(|s| s.instance_of_vm(host_id, name).is_some())
            .map(|s| s.name().clone());
        match service {
            Some(service) => actions.push(UiAction::Confirm(Confirm::StopInstance {
                host: host_id.clone(),
                vm: name.clone(),
                service,
            })),
            None => actions.stop_vm(host_id, name, false),
        }
        close(ui);
    }
    // Only VMs reboot, pause and resume.
    let is_vm = vm.runtime == dunes_shared::model::RuntimeKind::Libvirt;
    let running = is_vm && vm.state == dunes_shared::model::VmState::Running;
    let paused = is_vm && vm.state == dunes_shared::model::VmState::Paused;
    if gated(
        ui,
        &may_power,
        online && running,
        egui::Button::new("Reboot…"),
    )
    .on_hover_text("Ask the guest to restart")
    .clicked()
    {
        actions.push(UiAction::Confirm(Confirm::Reboot(
            host_id.clone(),
            name.clone(),
        )));
        close(ui);
    }
    if paused {
        if gated(ui, &may_power, online, egui::Button::new("Resume"))
            .on_hover_text("Let the paused VM go on")
            .clicked()
        {
            actions.power_vm(host_id, name, dunes_shared::protocol::PowerAction::Resume);
            close(ui);
        }
    } else if gated(
        ui,
        &may_power,
        online && running,
        egui::Button::new("Pause"),
    )
    .on_hover_text("Stop its vCPUs; its memory stays")
    .clicked()
    {
        actions.power_vm(host_id, name, dunes_shared::protocol::PowerAction::Pause);
        close(ui);
    }
    if gated(
        ui,
        &may_power,
        online && active,
        egui::Button::new("Force off…"),
    )
    .on_hover_text("Cut the VM off at once, without a shutdown")
    .clicked()
    {
        actions.push(UiAction::Confirm(Confirm::ForceOff(
            host_id.clone(),
            name.clone(),
        )));
        close(ui);
    }
    if gated(
        ui,
        &may_migrate,
        online && vm.runtime == dunes_shared::model::RuntimeKind::Libvirt,
        egui::Button::new("Migrate to…"),
    )
    .on_hover_text("Choose a host, each with what the pre-check says (or drag the chip)")
    .clicked()
    {
        actions.push(UiAction::MigrateTo(host_id.clone(), name.clone()));
        close(ui);
    }
    let delete = gated(
        ui,
        &may_delete,
        online && !active,
        egui::Button::new("Delete…"),
    )
    .on_hover_text("Delete the VM and its disks (Del)");
    let delete = match may_delete {
        Ok(()) => delete.on_disabled_hover_text("Stop it first: only a stopped VM can be deleted"),
        Err(_) => delete,
    };
    if delete.clicked() {
        actions.push(UiAction::ConfirmDeleteVm(host_id.clone(), name.clone()));
        close(ui);
    }
}
