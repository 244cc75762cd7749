//! The egui window. Each panel is a struct with a `..._ui` method; panels read the engine's
//! latest snapshot and send commands with `try_send`, never blocking.

mod capacity;
mod charts;
mod details;
mod dialogs;
mod event_log;
mod plan;
mod service_editor;
mod services;
mod topology;

use std::sync::Arc;

use dunes_shared::model::{AppName, HostId, ServiceName, VmName};
use egui::{Color32, Key, KeyboardShortcut, Modifiers};
use tokio::sync::oneshot;

use crate::engine::{Command, EngineError, EngineHandle, LinkState, Snapshot};
use dunes_shared::model::VmState;

pub use capacity::CapacityWindow;
pub use charts::{ChartsWindow, TimeRange};
pub use details::DetailsPanel;
pub use dialogs::{AddHostDialog, NewVmDialog};
pub use event_log::EventLogPanel;
pub use event_log::clock;
pub use plan::PlanDialog;
pub use service_editor::ServiceEditor;
pub use services::{AdoptDialog, ServicesPanel};
pub use topology::TopologyPanel;

const NEW_VM: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::N);
const ADD_HOST: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::H);

/// What the operator has selected.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Selection {
    #[default]
    None,
    Host(HostId),
    Vm(HostId, VmName),
    Service(ServiceName),
}

/// What a panel asks of the app; handled once, at the end of the frame, so that panels never
/// reach into each other.
#[derive(Debug, Clone, PartialEq)]
pub enum UiAction {
    Select(Selection),
    /// Ask before deleting a VM.
    ConfirmDeleteVm(HostId, VmName),
    /// A VM chip dropped onto a service: ask which application it becomes.
    Adopt {
        service: ServiceName,
        host: HostId,
        vm: VmName,
    },
    /// Open the service editor, on a new service or an existing one.
    EditService(Option<ServiceName>),
    OpenPlan(ServiceName),
    /// Ask before deleting a service and every instance in it.
    ConfirmDeleteService(ServiceName),
    /// A VM chip dropped onto another host: show the pre-check and the estimate, then migrate.
    ConfirmMigrate {
        host: HostId,
        vm: VmName,
        to: HostId,
    },
    /// Show the statistics charts of a host or a workload.
    OpenCharts(crate::engine::stats::Subject),
}

/// A VM chip being dragged.
#[derive(Debug, Clone, PartialEq)]
pub struct VmDrag {
    pub host: HostId,
    pub vm: VmName,
}

/// A planned instance being dragged in the plan dialog.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedDrag {
    pub app: AppName,
    pub index: u32,
}

/// A reply channel polled once a frame; the UI only needs success or the error text.
trait PendingReply: Send {
    fn poll(&mut self) -> Option<Result<(), EngineError>>;
}

impl<T: Send> PendingReply for oneshot::Receiver<Result<T, EngineError>> {
    fn poll(&mut self) -> Option<Result<(), EngineError>> {
        match self.try_recv() {
            Ok(result) => Some(result.map(|_| ())),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(EngineError::Stopped)),
        }
    }
}

/// An operation sent to the engine whose answer is still to come.
struct Pending {
    what: String,
    rx: Box<dyn PendingReply>,
}

/// Shared by the panels during one frame: the snapshot and a way to act.
pub struct Actions<'a> {
    engine: &'a EngineHandle,
    pending: &'a mut Vec<Pending>,
    status: &'a mut Option<(String, bool)>,
    queue: &'a mut Vec<UiAction>,
}

impl Actions<'_> {
    /// Queues a UI action for the end of the frame.
    pub fn push(&mut self, action: UiAction) {
        self.queue.push(action);
    }

    /// Shows a line in the status bar.
    pub fn say(&mut self, text: String, is_error: bool) {
        *self.status = Some((text, is_error));
    }

    /// Sends a command built around a reply channel; the answer shows in the status line.
    pub fn send<T: Send + 'static>(
        &mut self,
        what: String,
        make: impl FnOnce(oneshot::Sender<Result<T, EngineError>>) -> Command,
    ) {
        let (tx, rx) = oneshot::channel::<Result<T, EngineError>>();
        match self.engine.try_send(make(tx)) {
            Ok(()) => {
                *self.status = Some((format!("{what}…"), false));
                self.pending.push(Pending {
                    what,
                    rx: Box::new(rx),
                });
            }
            Err(e) => *self.status = Some((format!("{what}: {e}"), true)),
        }
    }

    pub fn start_vm(&mut self, host: &HostId, name: &VmName) {
        let (host, name) = (host.clone(), name.clone());
        self.send(format!("Starting {name}"), |reply| Command::StartVm {
            host,
            name,
            reply,
        });
    }

    pub fn stop_vm(&mut self, host: &HostId, name: &VmName, force: bool) {
        let (host, name) = (host.clone(), name.clone());
        let what = if force {
            format!("Forcing {name} off")
        } else {
            format!("Stopping {name}")
        };
        self.send(what, |reply| Command::StopVm {
            host,
            name,
            force,
            reply,
        });
    }
}

/// What the operator asked to delete, waiting for confirmation.
#[derive(Debug, Clone)]
enum ConfirmDelete {
    Vm(HostId, VmName),
    Service(ServiceName),
}

pub struct ConsoleApp {
    engine: EngineHandle,
    snapshot: Arc<Snapshot>,
    selection: Selection,
    topology: TopologyPanel,
    services: ServicesPanel,
    details: DetailsPanel,
    event_log: EventLogPanel,
    add_host: AddHostDialog,
    new_vm: NewVmDialog,
    editor: ServiceEditor,
    plan: PlanDialog,
    adopt: AdoptDialog,
    charts: ChartsWindow,
    capacity: CapacityWindow,
    confirm_delete: Option<ConfirmDelete>,
    /// A migration waiting for the operator's word: VM, from, to.
    confirm_migrate: Option<(VmName, HostId, HostId)>,
    pending: Vec<Pending>,
    status: Option<(String, bool)>,
    queue: Vec<UiAction>,
}

impl ConsoleApp {
    pub fn new(ctx: &egui::Context, engine: EngineHandle) -> Self {
        let repaint_ctx = ctx.clone();
        engine.set_repaint(move || repaint_ctx.request_repaint());
        let exports = engine.data_dir().join("exports");
        ConsoleApp {
            snapshot: engine.snapshot(),
            engine,
            selection: Selection::None,
            topology: TopologyPanel::default(),
            services: ServicesPanel,
            details: DetailsPanel,
            event_log: EventLogPanel::default(),
            add_host: AddHostDialog::default(),
            new_vm: NewVmDialog::default(),
            editor: ServiceEditor::default(),
            plan: PlanDialog::default(),
            adopt: AdoptDialog::default(),
            charts: ChartsWindow::new(exports),
            capacity: CapacityWindow::default(),
            confirm_delete: None,
            confirm_migrate: None,
            pending: Vec::new(),
            status: None,
            queue: Vec::new(),
        }
    }

    pub fn selection(&self) -> &Selection {
        &self.selection
    }

    /// The time range the charts show.
    pub fn charts_range(&self) -> TimeRange {
        self.charts.range()
    }

    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snapshot
    }

    /// Whether a dialog is in front (Escape and Delete then belong to it).
    fn dialog_open(&self) -> bool {
        self.add_host.is_open()
            || self.new_vm.is_open()
            || self.editor.is_open()
            || self.plan.is_open()
            || self.adopt.is_open()
            || self.confirm_delete.is_some()
            || self.confirm_migrate.is_some()
    }

    /// Draws one frame.
    pub fn frame_ui(&mut self, ui: &mut egui::Ui) {
        self.snapshot = self.engine.snapshot();
        self.poll_pending();
        // Escape closes the dialog in front, then the charts; only with none open does it
        // clear the selection.
        if ui.input(|i| i.key_pressed(Key::Escape)) && !self.dialog_open() {
            if self.charts.is_open() {
                self.charts.close();
            } else if self.capacity.is_open() {
                self.capacity.close();
            } else {
                self.selection = Selection::None;
            }
        }
        // The delete confirmation is modal: no other dialog opens beneath it.
        let modal = self.confirm_delete.is_some();
        if !modal && ui.input_mut(|i| i.consume_shortcut(&NEW_VM)) {
            open_new_vm(
                &mut self.new_vm,
                &mut self.add_host,
                &self.snapshot,
                &self.selection,
            );
        }
        if !modal && ui.input_mut(|i| i.consume_shortcut(&ADD_HOST)) {
            open_add_host(&mut self.add_host, &mut self.new_vm);
        }
        let snapshot = self.snapshot.clone();
        let dialog_open = self.dialog_open();
        let mut actions = Actions {
            engine: &self.engine,
            pending: &mut self.pending,
            status: &mut self.status,
            queue: &mut self.queue,
        };

        egui::Panel::top("toolbar").show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.heading("Dunes");
                ui.separator();
                if ui
                    .button("Add host…")
                    .on_hover_text("Enroll an agent (Ctrl+H)")
                    .clicked()
                {
                    open_add_host(&mut self.add_host, &mut self.new_vm);
                }
                if ui
                    .button("New VM…")
                    .on_hover_text("Create a VM (Ctrl+N)")
                    .clicked()
                {
                    open_new_vm(
                        &mut self.new_vm,
                        &mut self.add_host,
                        &snapshot,
                        &self.selection,
                    );
                }
                if ui
                    .button("Capacity…")
                    .on_hover_text("Capacity per site, and when it is full")
                    .clicked()
                {
                    self.capacity.open();
                }
                ui.separator();
                let online = snapshot
                    .hosts
                    .iter()
                    .filter(|h| h.link == LinkState::Online)
                    .count();
                let vms: usize = snapshot.hosts.iter().map(|h| h.vms.len()).sum();
                let running: usize = snapshot
                    .hosts
                    .iter()
                    .map(|h| h.vms.iter().filter(|v| v.state == VmState::Running).count())
                    .sum();
                ui.label(format!(
                    "{online}/{} hosts online · {running}/{vms} VMs running",
                    snapshot.hosts.len()
                ));
                if let Some((text, is_error)) = &*actions.status {
                    ui.separator();
                    let color = if *is_error {
                        Color32::LIGHT_RED
                    } else {
                        ui.visuals().text_color()
                    };
                    ui.colored_label(color, text);
                }
            });
        });
        egui::Panel::bottom("event-log")
            .resizable(true)
            .default_size(170.0)
            .show(ui, |ui| self.event_log.event_log_ui(ui, &snapshot));
        egui::Panel::left("services")
            .resizable(true)
            .default_size(290.0)
            .show(ui, |ui| {
                self.services
                    .services_ui(ui, &snapshot, &self.selection, &mut actions)
            });
        egui::Panel::right("details")
            .resizable(true)
            .default_size(300.0)
            .show(ui, |ui| {
                self.details
                    .details_ui(ui, &snapshot, &self.selection, &mut actions)
            });
        egui::CentralPanel::default().show(ui, |ui| {
            self.topology
                .topology_ui(ui, &snapshot, &self.selection, &mut actions)
        });
        // Delete in a text field edits the text; it only means "delete the VM" elsewhere.
        if ui.input(|i| i.key_pressed(Key::Delete))
            && !ui.ctx().egui_wants_keyboard_input()
            && !dialog_open
            && let Selection::Vm(host, name) = &self.selection
        {
            actions.push(UiAction::ConfirmDeleteVm(host.clone(), name.clone()));
        }
        self.add_host.add_host_ui(ui.ctx(), &mut actions);
        self.new_vm.new_vm_ui(ui.ctx(), &snapshot, &mut actions);
        self.editor.editor_ui(ui.ctx(), &snapshot, &mut actions);
        self.plan.plan_ui(ui.ctx(), &snapshot, &mut actions);
        self.adopt.adopt_ui(ui.ctx(), &snapshot, &mut actions);
        self.charts.charts_ui(ui.ctx(), &self.engine);
        self.capacity
            .capacity_ui(ui.ctx(), &self.engine, actions.queue);
        self.confirm_delete_ui(ui.ctx());
        self.confirm_migrate_ui(ui.ctx());
        self.handle_actions();
    }

    /// Carries out what the panels asked for during the frame.
    fn handle_actions(&mut self) {
        for action in std::mem::take(&mut self.queue) {
            match action {
                UiAction::Select(selection) => self.selection = selection,
                UiAction::ConfirmDeleteVm(host, name) => {
                    self.confirm_delete = Some(ConfirmDelete::Vm(host, name));
                }
                UiAction::ConfirmDeleteService(name) => {
                    self.confirm_delete = Some(ConfirmDelete::Service(name));
                }
                UiAction::ConfirmMigrate { host, vm, to } => {
                    self.confirm_migrate = Some((vm, host, to));
                }
                UiAction::OpenCharts(subject) => self.charts.open(subject),
                UiAction::Adopt { service, host, vm } => {
                    self.adopt.open(&self.snapshot, service, host, vm);
                }
                UiAction::EditService(name) => {
                    self.plan.close();
                    self.editor.open(&self.snapshot, name.as_ref());
                }
                UiAction::OpenPlan(name) => {
                    self.editor.close();
                    let mut actions = Actions {
                        engine: &self.engine,
                        pending: &mut self.pending,
                        status: &mut self.status,
                        queue: &mut Vec::new(),
                    };
                    self.plan.open(name, &mut actions);
                }
            }
        }
    }

    fn confirm_delete_ui(&mut self, ctx: &egui::Context) {
        let Some(confirm) = self.confirm_delete.clone() else {
            return;
        };
        let mut actions = Actions {
            engine: &self.engine,
            pending: &mut self.pending,
            status: &mut self.status,
            queue: &mut self.queue,
        };
        let response = egui::Modal::new(egui::Id::unique("confirm-delete")).show(ctx, |ui| {
            match &confirm {
                ConfirmDelete::Vm(host, name) => {
                    ui.heading(format!("Delete VM {name}?"));
                    ui.label(format!(
                        "The VM and its disks on host {host} are removed. This cannot be undone."
                    ));
                }
                ConfirmDelete::Service(name) => {
                    ui.heading(format!("Delete service {name}?"));
                    ui.label(
                        "Every instance is forced off and removed with its disks, then the definition. This cannot be undone.",
                    );
                }
            }
            ui.horizontal(|ui| {
                if ui.button("Delete").clicked() {
                    match confirm.clone() {
                        ConfirmDelete::Vm(host, name) => {
                            actions.send(format!("Deleting {name}"), |reply| Command::DeleteVm {
                                host,
                                name,
                                reply,
                            });
                        }
                        ConfirmDelete::Service(name) => {
                            actions.send(format!("Deleting service {name}"), |reply| {
                                Command::DeleteService { name, reply }
                            });
                        }
                    }
                    ui.close();
                }
                if ui.button("Cancel").clicked() {
                    ui.close();
                }
            });
        });
        if response.should_close() {
            self.confirm_delete = None;
        }
    }

    /// The pre-check and the estimate of a dropped VM, and the operator's go.
    fn confirm_migrate_ui(&mut self, ctx: &egui::Context) {
        let Some((vm, from, to)) = self.confirm_migrate.clone() else {
            return;
        };
        let snapshot = self.snapshot.clone();
        let checked = match (snapshot.host(&from), snapshot.host(&to)) {
            (Some(f), Some(t)) => match f.vm(&vm) {
                Some(status) => crate::engine::migration::precheck(
                    status,
                    f,
                    t,
                    &snapshot.services,
                    &snapshot.migrations,
                ),
                None => Err(vec![format!("{vm} is no longer on {from}")]),
            },
            _ => Err(vec!["a host is no longer enrolled".to_string()]),
        };
        let mut actions = Actions {
            engine: &self.engine,
            pending: &mut self.pending,
            status: &mut self.status,
            queue: &mut self.queue,
        };
        let response = egui::Modal::new(egui::Id::unique("confirm-migrate")).show(ctx, |ui| {
            ui.heading(format!("Migrate {vm} to {to}?"));
            match &checked {
                Ok(e) => {
                    ui.label(format!(
                        "{vm} stops on {from}, its disk ({:.1} MiB allocated) is streamed to {to} and verified, and it starts there; it is deleted on {from} only after that.",
                        e.bytes as f64 / 1048576.0
                    ));
                    ui.label(format!(
                        "About {:.0} s over {} Mbit/s{}, which is also the downtime.",
                        e.seconds.ceil(),
                        e.link_mbps,
                        if e.crosses_sites { " between sites" } else { "" }
                    ));
                    ui.label(format!("Disk: {}.", e.disk_move.describe()));
                    if let Some(limit) = e.site_limit_mbps {
                        ui.label(format!("The sites limit the stream to {limit} Mbit/s."));
                    }
                    if e.compress {
                        ui.label(
                            "The stream is compressed (a remote site); chunks that do not shrink travel as they are.",
                        );
                    }
                    ui.label(format!("Transfer cost: {:.4}", e.cost));
                }
                Err(reasons) => {
                    ui.label(format!("{vm} cannot go to {to}:"));
                    for r in reasons {
                        ui.colored_label(Color32::from_rgb(248, 81, 73), r);
                    }
                }
            }
            ui.horizontal(|ui| {
                if ui
                    .add_enabled(checked.is_ok(), egui::Button::new("Migrate"))
                    .clicked()
                {
                    let (v, f, t) = (vm.clone(), from.clone(), to.clone());
                    actions.send(format!("Migrating {vm} to {to}"), |reply| {
                        Command::MigrateVm {
                            host: f,
                            vm: v,
                            to: t,
                            options: Default::default(),
                            reply,
                        }
                    });
                    ui.close();
                }
                if ui.button("Cancel").clicked() {
                    ui.close();
                }
            });
        });
        if response.should_close() {
            self.confirm_migrate = None;
        }
    }

    fn poll_pending(&mut self) {
        let mut still = Vec::new();
        for mut p in self.pending.drain(..) {
            match p.rx.poll() {
                Some(Ok(())) => self.status = Some((format!("{}: done", p.what), false)),
                Some(Err(e)) => self.status = Some((format!("{}: {e}", p.what), true)),
                None => still.push(p),
            }
        }
        self.pending = still;
    }
}

/// One dialog at a time, so Enter and Escape can only mean the one in front.
fn open_add_host(add_host: &mut AddHostDialog, new_vm: &mut NewVmDialog) {
    new_vm.close();
    add_host.open();
}

fn open_new_vm(
    new_vm: &mut NewVmDialog,
    add_host: &mut AddHostDialog,
    snapshot: &Snapshot,
    selection: &Selection,
) {
    add_host.close();
    new_vm.open(snapshot, selection);
}

impl eframe::App for ConsoleApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.frame_ui(ui);
        if !self.pending.is_empty() {
            ui.ctx()
                .request_repaint_after(std::time::Duration::from_millis(100));
        }
    }
}

/// Colour of a service status.
pub fn service_color(status: crate::engine::ServiceStatus) -> Color32 {
    use crate::engine::ServiceStatus as S;
    match status {
        S::Available => Color32::from_rgb(46, 160, 67),
        S::Degraded => Color32::from_rgb(210, 153, 34),
        S::Down | S::Unreadable => Color32::from_rgb(218, 54, 51),
        S::Defined => Color32::from_rgb(110, 118, 129),
        S::Deploying | S::Starting | S::Stopping | S::Deleting => Color32::from_rgb(88, 166, 255),
    }
}

/// A service's own colour, for the chips of its instances: a hue from its name, the same on
/// every run.
pub fn service_tag_color(name: &ServiceName) -> Color32 {
    let hash = name.as_str().bytes().fold(2166136261u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(16777619)
    });
    let hue = (hash % 360) as f32 / 360.0;
    egui::ecolor::Hsva::new(hue, 0.75, 0.95, 1.0).into()
}

/// Colour of a VM state, used for chips and labels.
pub fn state_color(state: VmState) -> Color32 {
    match state {
        VmState::Running => Color32::from_rgb(46, 160, 67),
        VmState::Shutoff => Color32::from_rgb(110, 118, 129),
        VmState::Paused | VmState::Suspended => Color32::from_rgb(210, 153, 34),
        VmState::ShuttingDown => Color32::from_rgb(219, 109, 40),
        VmState::Crashed => Color32::from_rgb(218, 54, 51),
        _ => Color32::from_rgb(130, 80, 223),
    }
}

pub fn link_color(link: LinkState) -> Color32 {
    match link {
        LinkState::Online => Color32::from_rgb(46, 160, 67),
        LinkState::Connecting => Color32::from_rgb(210, 153, 34),
        LinkState::Unreachable => Color32::from_rgb(218, 54, 51),
    }
}
