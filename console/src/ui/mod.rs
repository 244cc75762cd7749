//! The egui window. Each panel is a struct with a `..._ui` method; panels read the engine's
//! latest snapshot and send commands with `try_send`, never blocking.

mod audit;
mod capacity;
mod charts;
mod console;
mod details;
mod dialogs;
mod event_log;
mod format;
mod images;
mod link;
mod migrate;
mod plan;
mod screen;
mod service_editor;
mod services;
mod topology;
mod vm_actions;
mod vm_settings;

use std::sync::Arc;

use dunes_shared::model::{AppName, HostId, ServiceName, VmName};
use egui::{Color32, Key, KeyboardShortcut, Modifiers};
use tokio::sync::oneshot;

pub use link::{EngineLink, LinkError, LinkStatus};

use crate::engine::{EngineHandle, LinkState, Published, Snapshot};
use dunes_shared::model::VmState;

pub use audit::AuditWindow;
pub use capacity::CapacityWindow;
pub use charts::{ChartsWindow, TimeRange, plot_id};
pub use details::DetailsPanel;
pub use dialogs::{AddHostDialog, NewVmDialog};
pub use event_log::EventLogPanel;
pub use format::{clock, date_time, human_bytes};
pub use images::ImagesWindow;
pub use migrate::MigrateDialog;
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
    /// Ask before deleting a VM (or say that a running one must be stopped first).
    ConfirmDeleteVm(HostId, VmName),
    /// Ask before something that cannot be taken back, saying what will happen.
    Confirm(Confirm),
    /// Choose the host a VM migrates to, each with the pre-check's verdict.
    MigrateTo(HostId, VmName),
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
    OpenCharts(crate::engine::statistics::series::Subject),
    /// Open a running VM's serial console.
    OpenConsole(HostId, VmName),
    /// Open the VM's screen.
    OpenScreen(HostId, VmName),
    /// Follow the VM's screen in its details.
    WatchScreen {
        uuid: String,
        host: HostId,
        vm: VmName,
    },
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

/// Draws `button`, enabled when `enabled` and the engine would take what it does from this
/// window; else greyed out, with the engine's refusal on hover.
pub fn gated(
    ui: &mut egui::Ui,
    permitted: &Result<(), String>,
    enabled: bool,
    button: egui::Button<'_>,
) -> egui::Response {
    let response = ui.add_enabled(enabled && permitted.is_ok(), button);
    match permitted {
        Err(why) => response.on_disabled_hover_text(why),
        Ok(()) => response,
    }
}

/// Where the window stands with reaching a lost engine again.
struct Tries<'a> {
    retry_at: std::time::Instant,
    attempts: u32,
    /// Why the last try failed.
    last: Option<&'a str>,
}

/// The band under the toolbar while the engine elsewhere cannot be reached: what the window
/// shows is as old as the link's end, and when it tries again.
fn lost_banner(
    ui: &mut egui::Ui,
    address: &str,
    why: &str,
    since: std::time::SystemTime,
    tries: Tries<'_>,
) {
    let Tries {
        retry_at,
        attempts,
        last,
    } = tries;
    let wait = retry_at.saturating_duration_since(std::time::Instant::now());
    egui::Panel::top("link-lost")
        .frame(
            egui::Frame::side_top_panel(ui.style())
                .fill(Color32::from_rgb(110, 30, 30))
                .inner_margin(6.0),
        )
        .show(ui, |ui| {
            ui.horizontal_wrapped(|ui| {
                ui.label(
                    egui::RichText::new(format!("Lost the engine at {address}:"))
                        .strong()
                        .color(Color32::WHITE),
                );
                ui.label(egui::RichText::new(why).color(Color32::from_gray(230)));
                let last = last.map_or(String::new(), |l| format!(", the last: {l}"));
                ui.label(
                    egui::RichText::new(format!(
                        "What you see is as of {} UTC. Trying again in {} s (try {attempts}{last}); changes wait until then.",
                        format::clock(crate::engine::snapshot::unix_ms(since)),
                        wait.as_secs() + 1
                    ))
                    .color(Color32::from_gray(230)),
                );
            });
        });
    // The countdown moves once a second.
    ui.ctx()
        .request_repaint_after(wait.min(std::time::Duration::from_secs(1)));
}

/// What a request whose answer never came says.
const STOPPED: &str = "the engine has stopped";

/// A reply channel polled once a frame; the UI only needs success or the error text.
trait PendingReply: Send {
    fn poll(&mut self) -> Option<Result<(), String>>;
}

impl<T: Send> PendingReply for oneshot::Receiver<Result<T, crate::api::ApiError>> {
    fn poll(&mut self) -> Option<Result<(), String>> {
        match self.try_recv() {
            Ok(result) => Some(result.map(|_| ()).map_err(|e| e.message)),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(STOPPED.to_string())),
        }
    }
}

/// An operation sent to the engine whose answer is still to come.
struct Pending {
    what: String,
    rx: Box<dyn PendingReply>,
}

/// A migration this window asked for, followed until it ends so the status bar can say how.
enum WatchedMigration {
    /// Sent; the engine has not answered yet.
    Asked {
        vm: VmName,
        to: HostId,
        rx: oneshot::Receiver<Result<crate::api::views::MigrationView, crate::api::ApiError>>,
    },
    Running {
        id: u64,
        vm: VmName,
    },
}

/// An error the operator must see and dismiss: a status line can scroll by unread.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub title: String,
    pub body: String,
}

/// What the window sent and waits for, and what it has to say about it.
#[derive(Default)]
pub struct Outbox {
    pending: Vec<Pending>,
    status: Option<(String, bool)>,
    migrations: Vec<WatchedMigration>,
    notices: Vec<Notice>,
}

/// The most notices kept at once; the oldest goes first.
const NOTICES_MAX: usize = 4;

impl Outbox {
    fn say(&mut self, text: String, is_error: bool) {
        self.status = Some((text, is_error));
    }

    fn notice(&mut self, title: String, body: String) {
        if self.notices.len() == NOTICES_MAX {
            self.notices.remove(0);
        }
        self.notices.push(Notice { title, body });
    }

    /// Whether an answer is still to come (the window then looks again soon).
    fn waiting(&self) -> bool {
        !self.pending.is_empty()
            || self
                .migrations
                .iter()
                .any(|m| matches!(m, WatchedMigration::Asked { .. }))
    }

    /// Takes the answers that came, and the ends of the migrations it follows.
    fn poll(&mut self, snapshot: &Snapshot) {
        let mut still = Vec::new();
        for mut p in self.pending.drain(..) {
            match p.rx.poll() {
                Some(Ok(())) => self.status = Some((format!("{}: done", p.what), false)),
                Some(Err(e)) => self.status = Some((format!("{}: {e}", p.what), true)),
                None => still.push(p),
            }
        }
        self.pending = still;
        for watched in std::mem::take(&mut self.migrations) {
            match watched {
                WatchedMigration::Asked { vm, to, mut rx } => match rx.try_recv() {
                    Ok(Ok(journal)) => {
                        self.say(
                            format!("migration {} of {vm} to {to} started", journal.id),
                            false,
                        );
                        self.migrations
                            .push(WatchedMigration::Running { id: journal.id, vm });
                    }
                    Ok(Err(e)) => {
                        let text = format!("migration of {vm} to {to} refused: {}", e.message);
                        self.say(text.clone(), true);
                        self.notice(format!("{vm} cannot migrate to {to}"), e.message);
                    }
                    Err(oneshot::error::TryRecvError::Empty) => {
                        self.migrations.push(WatchedMigration::Asked { vm, to, rx });
                    }
                    Err(oneshot::error::TryRecvError::Closed) => {
                        self.say(format!("migration of {vm}: {STOPPED}"), true);
                    }
                },
                WatchedMigration::Running { id, vm } => {
                    let Some(m) = snapshot.migrations.iter().find(|m| m.id == id) else {
                        self.migrations.push(WatchedMigration::Running { id, vm });
                        continue;
                    };
                    match m.step {
                        crate::engine::migration::MigrationStep::SourceDeleted => self.say(
                            format!("migration {id} of {vm}: done, it runs on {}", m.to),
                            false,
                        ),
                        crate::engine::migration::MigrationStep::RolledBack => {
                            let why = m.error.clone().unwrap_or_else(|| "no reason given".into());
                            self.say(format!("migration {id} of {vm} rolled back: {why}"), true);
                            self.notice(
                                format!("Migration {id} of {vm} to {} rolled back", m.to),
                                format!("{why}. {vm} stays on {}.", m.from),
                            );
                        }
                        _ => self.migrations.push(WatchedMigration::Running { id, vm }),
                    }
                }
            }
        }
    }
}

/// Shared by the panels during one frame: the snapshot and a way to act.
pub struct Actions<'a> {
    link: &'a EngineLink,
    outbox: &'a mut Outbox,
    queue: &'a mut Vec<UiAction>,
}

impl Actions<'_> {
    /// Queues a UI action for the end of the frame.
    pub fn push(&mut self, action: UiAction) {
        self.queue.push(action);
    }

    /// Shows a line in the status bar.
    pub fn say(&mut self, text: String, is_error: bool) {
        self.outbox.say(text, is_error);
    }

    /// Runs an operation of the engine's API, checked and audited as any operator's request;
    /// its answer comes back on the channel, which the caller follows itself.
    pub fn request<O: crate::api::Operation>(
        &mut self,
        request: O,
    ) -> oneshot::Receiver<Result<O::Response, crate::api::ApiError>> {
        self.link.ask(request)
    }

    /// Whether this window's role allows operations of kind `O` at all; if not, why.
    pub fn may<O: crate::api::Operation>(&self, changes: bool) -> Result<(), String> {
        self.link.may::<O>(changes)
    }

    /// Whether the engine would run `request` for this window; if not, why.
    pub fn permits<O: crate::api::Operation>(
        &self,
        request: &O,
        snapshot: &Snapshot,
    ) -> Result<(), String> {
        self.link.permits(request, snapshot)
    }

    /// Asks for a change through the engine's API; the answer shows in the status line.
    pub fn call<O: crate::api::Operation>(&mut self, what: String, request: O) {
        let rx = self.request(request);
        self.outbox.say(format!("{what}…"), false);
        self.outbox.pending.push(Pending {
            what,
            rx: Box::new(rx),
        });
    }

    /// Reboots, pauses or resumes a VM.
    pub fn power_vm(
        &mut self,
        host: &HostId,
        name: &VmName,
        action: dunes_shared::protocol::PowerAction,
    ) {
        use dunes_shared::protocol::PowerAction as P;
        let what = match action {
            P::Reboot => format!("Rebooting {name}"),
            P::Pause => format!("Pausing {name}"),
            P::Resume => format!("Resuming {name}"),
        };
        self.call(
            what,
            crate::api::ops::PowerVm {
                vm: format!("{host}/{name}"),
                action,
            },
        );
    }

    /// Starts a migration and follows it: the status bar says when it started and how it
    /// ended, and a rollback is also a notice.
    pub fn migrate(&mut self, host: &HostId, vm: &VmName, to: &HostId) {
        let rx = self.request(crate::api::ops::MigrateVm {
            vm: format!("{host}/{vm}"),
            to: to.to_string(),
            limit_mbps: None,
            compress: None,
        });
        self.outbox
            .say(format!("asking to migrate {vm} to {to}…"), false);
        self.outbox.migrations.push(WatchedMigration::Asked {
            vm: vm.clone(),
            to: to.clone(),
            rx,
        });
    }

    pub fn start_vm(&mut self, host: &HostId, name: &VmName) {
        self.call(
            format!("Starting {name}"),
            crate::api::ops::StartVm {
                vm: format!("{host}/{name}"),
            },
        );
    }

    pub fn stop_vm(&mut self, host: &HostId, name: &VmName, force: bool) {
        let (host, name) = (host.clone(), name.clone());
        let what = if force {
            format!("Forcing {name} off")
        } else {
            format!("Stopping {name}")
        };
        self.call(
            what,
            crate::api::ops::StopVm {
                vm: format!("{host}/{name}"),
                force,
            },
        );
    }
}

/// What waits for the operator's word, with what will happen.
#[derive(Debug, Clone, PartialEq)]
pub enum Confirm {
    DeleteVm(HostId, VmName),
    DeleteService(ServiceName),
    /// Pulling the plug: the guest gets no chance to shut down.
    ForceOff(HostId, VmName),
    /// The guest restarts: what runs in it stops.
    Reboot(HostId, VmName),
    /// A graceful stop that takes an instance of a service down.
    StopInstance {
        host: HostId,
        vm: VmName,
        service: ServiceName,
    },
    /// Nothing to confirm: a running VM cannot be deleted, and the operator is told why.
    StopFirst(HostId, VmName),
    /// The VM goes back to the snapshot: what it wrote since is lost.
    RevertSnapshot {
        host: HostId,
        vm: VmName,
        snapshot: String,
        /// Taken while the VM ran: it runs from there after the revert.
        running: bool,
    },
    DeleteSnapshot {
        host: HostId,
        vm: VmName,
        snapshot: String,
    },
}

pub struct ConsoleApp {
    /// The engine, in this process or elsewhere: its API, through which the window's
    /// changes go (checked and audited), and its snapshot.
    link: EngineLink,
    snapshot: Arc<Snapshot>,
    /// What the window shows in place of the engine's snapshot, when set.
    pinned: Option<Arc<Snapshot>>,
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
    images: ImagesWindow,
    console: console::ConsoleWindow,
    screen: screen::ScreenWindow,
    audit: AuditWindow,
    migrate: MigrateDialog,
    confirm: Option<Confirm>,
    /// A migration waiting for the operator's word: VM, from, to.
    confirm_migrate: Option<(VmName, HostId, HostId)>,
    outbox: Outbox,
    queue: Vec<UiAction>,
    layout: Layout,
    /// Whether a host's details (with its live readings) are on screen: only then do the
    /// readings' changes repaint the window.
    watching_readings: Arc<std::sync::Mutex<Option<HostId>>>,
    frame_stats: Option<FrameStats>,
}

/// Which panels are open. A side panel is docked in a wide window and a strip in a narrow
/// one, where opening it lays it over the topology as a drawer.
#[derive(Debug)]
struct Layout {
    /// `None` until the operator chooses: open in a wide window, closed in a narrow one.
    services_open: Option<bool>,
    details_open: Option<bool>,
    events_open: bool,
    /// Whether the last frame was wide.
    wide: bool,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            services_open: None,
            details_open: None,
            events_open: true,
            wide: true,
        }
    }
}

/// Below this width the side panels fold to strips, so the topology keeps its room.
const WIDE_MIN_W: f32 = 1100.0;
const STRIP_W: f32 = 26.0;
const DRAWER_W: f32 = 320.0;

impl ConsoleApp {
    /// A window on the engine in this process.
    pub fn new(ctx: &egui::Context, engine: EngineHandle) -> Self {
        Self::with_link(ctx, EngineLink::in_process(engine))
    }

    /// A window on the engine `link` reaches.
    pub fn with_link(ctx: &egui::Context, link: EngineLink) -> Self {
        let repaint_ctx = ctx.clone();
        let watching_readings: Arc<std::sync::Mutex<Option<HostId>>> = Arc::default();
        let watching = watching_readings.clone();
        match link.local() {
            // Hosts' live readings change every second; they are drawn only in the details
            // of the host selected.
            Some(engine) => engine.set_repaint(move |published: Published| {
                let shown = || {
                    let watched = watching.lock().unwrap_or_else(|p| p.into_inner());
                    watched
                        .as_ref()
                        .is_some_and(|h| published.readings_of.contains(h))
                };
                if !published.readings_only || shown() {
                    repaint_ctx.request_repaint();
                }
            }),
            // An engine elsewhere sends at most 20 snapshots a second.
            None => {
                let (mut snapshots, mut status) = link.watchers();
                link.runtime().spawn(async move {
                    loop {
                        tokio::select! {
                            changed = snapshots.changed() => if changed.is_err() { break },
                            changed = status.changed() => if changed.is_err() { break },
                        }
                        repaint_ctx.request_repaint();
                    }
                });
            }
        }
        let exports = link.exports_dir().to_path_buf();
        ConsoleApp {
            snapshot: link.snapshot(),
            pinned: None,
            link,
            selection: Selection::None,
            topology: TopologyPanel::default(),
            services: ServicesPanel,
            details: DetailsPanel::default(),
            event_log: EventLogPanel::default(),
            add_host: AddHostDialog::default(),
            new_vm: NewVmDialog::default(),
            editor: ServiceEditor::default(),
            plan: PlanDialog::default(),
            adopt: AdoptDialog::default(),
            charts: ChartsWindow::new(exports),
            capacity: CapacityWindow::default(),
            images: ImagesWindow::default(),
            console: console::ConsoleWindow::default(),
            screen: screen::ScreenWindow::default(),
            audit: AuditWindow::default(),
            migrate: MigrateDialog::default(),
            confirm: None,
            confirm_migrate: None,
            outbox: Outbox::default(),
            queue: Vec::new(),
            layout: Layout::default(),
            watching_readings,
            frame_stats: std::env::var_os("DUNES_FRAME_STATS").map(|_| FrameStats {
                since: std::time::Instant::now(),
                frames: 0,
            }),
        }
    }

    pub fn selection(&self) -> &Selection {
        &self.selection
    }

    /// What the console window's terminal shows now, if one is open on a console.
    pub fn console_screen(&self) -> Option<String> {
        self.console.screen_text()
    }

    /// The VM screen window's picture: its generation and whether it shows anything but one
    /// colour, once one has come.
    pub fn screen_picture(&self) -> Option<(u64, bool)> {
        self.screen.picture()
    }

    /// The pixels the VM screen window shows.
    pub fn screen_frame(&self) -> Option<std::sync::Arc<crate::engine::consoles::ScreenFrame>> {
        self.screen.frame()
    }

    /// The time range the charts show.
    pub fn charts_range(&self) -> TimeRange {
        self.charts.range()
    }

    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snapshot
    }

    /// Opens the charts of `subject` on `answer` at `range`, without asking the engine:
    /// fixed data.
    pub fn show_stats(
        &mut self,
        subject: crate::engine::statistics::series::Subject,
        answer: crate::api::views::StatsView,
        range: TimeRange,
    ) {
        self.charts.show_answer(subject, answer, range);
    }

    /// Opens the capacity view on `sites`, without asking the engine: fixed data.
    pub fn show_capacity(&mut self, sites: Vec<crate::api::views::SiteCapacityView>) {
        self.capacity.show_answer(sites);
    }

    /// Shows `snapshot` from now on instead of the engine's latest: a screen that does not
    /// move, for layout snapshots. Commands still go to the engine.
    pub fn pin_snapshot(&mut self, snapshot: Arc<Snapshot>) {
        self.snapshot = snapshot.clone();
        self.pinned = Some(snapshot);
    }

    /// Whether a dialog is in front (Escape and Delete then belong to it).
    fn dialog_open(&self) -> bool {
        self.add_host.is_open()
            || self.new_vm.is_open()
            || self.console.is_open()
            || self.screen.is_open()
            || self.editor.is_open()
            || self.plan.is_open()
            || self.adopt.is_open()
            || self.migrate.is_open()
            || self.confirm.is_some()
            || self.confirm_migrate.is_some()
    }

    /// Draws one frame.
    pub fn frame_ui(&mut self, ui: &mut egui::Ui) {
        self.snapshot = match &self.pinned {
            Some(pinned) => pinned.clone(),
            None => self.link.snapshot(),
        };
        self.outbox.poll(&self.snapshot);
        // Escape closes the dialog in front, then the charts; only with none open does it
        // clear the selection.
        if ui.input(|i| i.key_pressed(Key::Escape)) && !self.dialog_open() {
            let drawer = !self.layout.wide
                && (self.layout.services_open == Some(true)
                    || self.layout.details_open == Some(true));
            if drawer {
                self.layout.services_open = Some(false);
                self.layout.details_open = Some(false);
            } else if self.charts.is_open() {
                self.charts.close();
            } else if self.capacity.is_open() {
                self.capacity.close();
            } else if self.audit.is_open() {
                self.audit.close();
            } else if self.images.is_open() {
                self.images.close();
            } else {
                self.selection = Selection::None;
            }
        }
        // A confirmation is modal: no other dialog opens beneath it.
        let modal = self.confirm.is_some();
        let may_add_host = self.link.may::<crate::api::ops::AddHost>(true);
        let may_create_vm = self.link.may::<crate::api::ops::CreateVm>(true);
        if !modal && may_create_vm.is_ok() && ui.input_mut(|i| i.consume_shortcut(&NEW_VM)) {
            open_new_vm(
                &mut self.new_vm,
                &mut self.add_host,
                &self.snapshot,
                &self.selection,
            );
        }
        if !modal && may_add_host.is_ok() && ui.input_mut(|i| i.consume_shortcut(&ADD_HOST)) {
            open_add_host(&mut self.add_host, &mut self.new_vm);
        }
        let snapshot = self.snapshot.clone();
        let link_status = self.link.status();
        let dialog_open = self.dialog_open();
        let mut actions = Actions {
            link: &self.link,
            outbox: &mut self.outbox,
            queue: &mut self.queue,
        };

        let screen = ui.ctx().content_rect();
        let wide = screen.width() >= WIDE_MIN_W;
        egui::Panel::top("toolbar").show(ui, |ui| {
            ui.horizontal_wrapped(|ui| {
                ui.heading("Dunes");
                ui.separator();
                if gated(ui, &may_add_host, true, egui::Button::new("Add host…"))
                    .on_hover_text("Enroll an agent (Ctrl+H)")
                    .clicked()
                {
                    open_add_host(&mut self.add_host, &mut self.new_vm);
                }
                if gated(ui, &may_create_vm, true, egui::Button::new("New VM…"))
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
                if ui
                    .button("Images…")
                    .on_hover_text("The image library: operating system disks and installers")
                    .clicked()
                {
                    self.images.open();
                }
                if ui
                    .button("Audit…")
                    .on_hover_text("Every change asked of the engine and every refusal: who, what, and how it ended")
                    .clicked()
                {
                    self.audit.open();
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
                if !snapshot.image_transfers.is_empty() {
                    // Images on their way to hosts: the slowest one, and all on hover.
                    let transfers = &snapshot.image_transfers;
                    let least = transfers
                        .iter()
                        .map(images::fraction)
                        .fold(1.0f32, f32::min);
                    ui.separator();
                    let bar = ui
                        .add(
                            egui::ProgressBar::new(least)
                                .desired_width(150.0)
                                .text(format!(
                                    "sending {} image{}",
                                    transfers.len(),
                                    if transfers.len() == 1 { "" } else { "s" }
                                )),
                        )
                        .interact(egui::Sense::click())
                        .on_hover_text(
                            transfers
                                .iter()
                                .map(|t| {
                                    format!(
                                        "{} -> {}: {:.0}%",
                                        t.image,
                                        t.host,
                                        images::fraction(t) * 100.0
                                    )
                                })
                                .collect::<Vec<_>>()
                                .join("\n"),
                        );
                    if bar.clicked() {
                        self.images.open();
                    }
                }
                if let LinkStatus::Connected { address, welcome } = &link_status {
                    ui.separator();
                    // Cut short in a narrow window rather than wrapped over two lines.
                    ui.add(
                        egui::Label::new(format!(
                            "engine {} at {address} · {} {}",
                            welcome.engine, welcome.role, welcome.operator
                        ))
                        .truncate(),
                    )
                    .on_hover_text(if welcome.scopes.is_empty() {
                        "What this window may change is what the engine lets this operator do; the rest is greyed out".to_string()
                    } else {
                        format!("Changes limited to {}", welcome.scopes.join(", "))
                    });
                }
            });
        });
        if let LinkStatus::Lost {
            address,
            why,
            last_try,
            since,
            retry_at,
            attempts,
        } = &link_status
        {
            let tries = Tries {
                retry_at: *retry_at,
                attempts: *attempts,
                last: last_try.as_deref(),
            };
            lost_banner(ui, address, why, *since, tries);
        }
        // The status bar: what the last thing asked did.
        egui::Panel::bottom("status-bar").show(ui, |ui| {
            ui.horizontal(|ui| {
                let events = if self.layout.events_open {
                    "Hide events"
                } else {
                    "Show events"
                };
                if ui
                    .selectable_label(self.layout.events_open, events)
                    .on_hover_text("Show or hide the event log")
                    .clicked()
                {
                    self.layout.events_open = !self.layout.events_open;
                }
                ui.separator();
                match &actions.outbox.status {
                    Some((text, is_error)) => {
                        let color = if *is_error {
                            Color32::from_rgb(248, 81, 73)
                        } else {
                            ui.visuals().text_color()
                        };
                        ui.add(egui::Label::new(egui::RichText::new(text).color(color)).truncate())
                            .on_hover_text(text);
                    }
                    None => {
                        ui.weak("Ready");
                    }
                }
            });
        });
        egui::Panel::bottom("event-log")
            .resizable(true)
            .default_size((screen.height() * 0.22).clamp(80.0, 170.0))
            .min_size(60.0)
            .max_size((screen.height() * 0.3).max(80.0))
            .show_collapsible(ui, &mut self.layout.events_open, |ui| {
                self.event_log.event_log_ui(ui, &snapshot)
            });
        let services_docked = wide && self.layout.services_open.unwrap_or(true);
        let details_docked = wide && self.layout.details_open.unwrap_or(true);
        let services_strip = if services_docked {
            egui::Panel::left("services")
                .resizable(true)
                .default_size(290.0)
                .min_size(200.0)
                .max_size((screen.width() * 0.3).max(200.0))
                .show(ui, |ui| {
                    if collapse_button(ui, "«", "Fold the services panel") {
                        self.layout.services_open = Some(false);
                    }
                    self.services
                        .services_ui(ui, &snapshot, &self.selection, &mut actions)
                });
            None
        } else {
            let strip = egui::Panel::left("services-strip")
                .resizable(false)
                .exact_size(STRIP_W)
                .show(ui, |ui| strip_ui(ui, "Services", "»"));
            if strip.inner {
                let open = wide || self.layout.services_open != Some(true);
                self.layout.services_open = Some(open);
                // One drawer at a time: two would cover the topology.
                if open && !wide {
                    self.layout.details_open = Some(false);
                }
            }
            Some(strip.response.rect)
        };
        let details_strip = if details_docked {
            egui::Panel::right("details")
                .resizable(true)
                .default_size(300.0)
                .min_size(200.0)
                .max_size((screen.width() * 0.3).max(200.0))
                .show(ui, |ui| {
                    if collapse_button(ui, "»", "Fold the details panel") {
                        self.layout.details_open = Some(false);
                    }
                    self.details
                        .details_ui(ui, &snapshot, &self.selection, &mut actions)
                });
            None
        } else {
            let strip = egui::Panel::right("details-strip")
                .resizable(false)
                .exact_size(STRIP_W)
                .show(ui, |ui| strip_ui(ui, "Details", "«"));
            if strip.inner {
                let open = wide || self.layout.details_open != Some(true);
                self.layout.details_open = Some(open);
                if open && !wide {
                    self.layout.services_open = Some(false);
                }
            }
            Some(strip.response.rect)
        };
        let central = egui::CentralPanel::default().show(ui, |ui| {
            self.topology
                .topology_ui(ui, &snapshot, &self.selection, &mut actions)
        });
        // In a narrow window an opened panel lies over the topology, as a drawer.
        let area = central.response.rect;
        if let Some(strip) = services_strip
            && self.layout.services_open == Some(true)
        {
            let rect = egui::Rect::from_min_size(
                egui::pos2(strip.right(), area.top()),
                egui::vec2(DRAWER_W.min(area.width()), area.height()),
            );
            if drawer_ui(ui.ctx(), "services-drawer", rect, |ui| {
                self.services
                    .services_ui(ui, &snapshot, &self.selection, &mut actions)
            }) {
                self.layout.services_open = Some(false);
            }
        }
        if let Some(strip) = details_strip
            && self.layout.details_open == Some(true)
        {
            let w = DRAWER_W.min(area.width());
            let rect = egui::Rect::from_min_size(
                egui::pos2(strip.left() - w, area.top()),
                egui::vec2(w, area.height()),
            );
            if drawer_ui(ui.ctx(), "details-drawer", rect, |ui| {
                self.details
                    .details_ui(ui, &snapshot, &self.selection, &mut actions)
            }) {
                self.layout.details_open = Some(false);
            }
        }
        self.layout.wide = wide;
        let details_shown = if wide {
            self.layout.details_open.unwrap_or(true)
        } else {
            self.layout.details_open == Some(true)
        };
        let watched = match &self.selection {
            Selection::Host(id) if details_shown => Some(id.clone()),
            _ => None,
        };
        let mut watching = self
            .watching_readings
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *watching != watched {
            *watching = watched;
        }
        drop(watching);
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
        self.charts
            .set_generated_until(snapshot.generated_until_secs);
        self.charts.charts_ui(ui.ctx(), &self.link);
        let shared_machine = snapshot.hosts.iter().any(|h| {
            h.inventory()
                .is_some_and(|i| i.sizes_from == dunes_shared::model::SizesFrom::TestDriver)
        });
        self.capacity
            .capacity_ui(ui.ctx(), &self.link, actions.queue, shared_machine);
        self.audit
            .audit_ui(ui.ctx(), &self.link.client(), self.link.runtime());
        // A file dropped onto the window is offered for import.
        let dropped = ui.input(|i| {
            i.raw
                .dropped_files
                .iter()
                .map(|f| f.path().to_path_buf())
                .find(|p| !p.as_os_str().is_empty())
        });
        if let Some(path) = dropped {
            self.images.import_dropped(&path);
        }
        self.images
            .images_ui(ui.ctx(), &self.link, &snapshot.image_transfers);
        self.console.console_ui(ui.ctx());
        self.screen.screen_ui(ui.ctx());
        self.migrate.migrate_ui(ui.ctx(), &snapshot, actions.queue);
        notices_ui(ui.ctx(), &mut actions.outbox.notices);
        self.confirm_ui(ui.ctx());
        self.confirm_migrate_ui(ui.ctx());
        self.handle_actions();
    }

    /// Carries out what the panels asked for during the frame.
    fn handle_actions(&mut self) {
        for action in std::mem::take(&mut self.queue) {
            match action {
                UiAction::Select(selection) => {
                    // In a narrow window the details open over the topology to show it.
                    if !self.layout.wide && selection != Selection::None {
                        self.layout.details_open = Some(true);
                        self.layout.services_open = Some(false);
                    }
                    self.selection = selection;
                }
                UiAction::ConfirmDeleteVm(host, name) => {
                    let running = self
                        .snapshot
                        .host(&host)
                        .and_then(|h| h.vm(&name))
                        .is_some_and(|v| v.state.is_active());
                    self.confirm = Some(if running {
                        Confirm::StopFirst(host, name)
                    } else {
                        Confirm::DeleteVm(host, name)
                    });
                }
                UiAction::ConfirmDeleteService(name) => {
                    self.confirm = Some(Confirm::DeleteService(name));
                }
                UiAction::Confirm(confirm) => self.confirm = Some(confirm),
                UiAction::MigrateTo(host, vm) => self.migrate.open(host, vm),
                UiAction::ConfirmMigrate { host, vm, to } => {
                    self.confirm_migrate = Some((vm, host, to));
                }
                UiAction::OpenCharts(subject) => self.charts.open(subject),
                UiAction::OpenConsole(host, vm) => {
                    self.console.open(format!("{host}/{vm}"), &self.link);
                }
                UiAction::OpenScreen(host, vm) => {
                    self.screen.open(format!("{host}/{vm}"), &self.link);
                }
                UiAction::WatchScreen { uuid, host, vm } => {
                    self.details
                        .watch_screen(uuid, format!("{host}/{vm}"), &self.link);
                }
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
                        link: &self.link,
                        outbox: &mut self.outbox,
                        queue: &mut Vec::new(),
                    };
                    self.plan.open(name, &mut actions);
                }
            }
        }
    }

    fn confirm_ui(&mut self, ctx: &egui::Context) {
        let Some(confirm) = self.confirm.clone() else {
            return;
        };
        let mut actions = Actions {
            link: &self.link,
            outbox: &mut self.outbox,
            queue: &mut self.queue,
        };
        let (title, what, button) = match &confirm {
            Confirm::DeleteVm(host, name) => (
                format!("Delete VM {name}?"),
                format!("The VM and its disks on host {host} are removed. This cannot be undone."),
                Some("Delete"),
            ),
            Confirm::DeleteService(name) => (
                format!("Delete service {name}?"),
                "Every instance is forced off and removed with its disks, then the definition. This cannot be undone.".to_string(),
                Some("Delete"),
            ),
            Confirm::ForceOff(host, name) => (
                format!("Force {name} off?"),
                format!("{name} on {host} is cut off at once, like pulling its power cord: the guest cannot shut down cleanly, and what it had not written to disk is lost."),
                Some("Force off"),
            ),
            Confirm::Reboot(host, name) => (
                format!("Reboot {name}?"),
                format!("The guest of {name} on {host} is asked to restart: what runs in it stops and starts again, and work it has not saved is lost."),
                Some("Reboot"),
            ),
            Confirm::StopInstance { host, vm, service } => (
                format!("Stop {vm}?"),
                format!("{vm} on {host} is an instance of service {service}: the guest is asked to shut down (forced off after the agent's stop timeout), and the service loses this instance until it is started again."),
                Some("Stop the instance"),
            ),
            Confirm::StopFirst(host, name) => (
                format!("{name} is running"),
                format!("Stop {name} on {host} first: only a stopped VM can be deleted."),
                None,
            ),
            Confirm::RevertSnapshot {
                host,
                vm,
                snapshot,
                running,
            } => (
                format!("Revert {vm} to {snapshot}?"),
                format!(
                    "{vm} on {host} goes back to how it was at snapshot {snapshot}: everything it wrote and did since is lost. {}",
                    if *running {
                        "It was running then, so it runs from that moment on."
                    } else {
                        "It was off then, so it is off afterwards."
                    }
                ),
                Some("Revert"),
            ),
            Confirm::DeleteSnapshot { host, vm, snapshot } => (
                format!("Delete snapshot {snapshot}?"),
                format!(
                    "Snapshot {snapshot} of {vm} on {host} is removed, and {vm} can no longer go back to it. The VM itself stays as it is."
                ),
                Some("Delete"),
            ),
        };
        let response = egui::Modal::new(egui::Id::unique("confirm")).show(ctx, |ui| {
            ui.set_max_width(420.0);
            ui.heading(title);
            ui.label(what);
            ui.add_space(6.0);
            ui.horizontal(|ui| {
                if let Some(button) = button {
                    if ui.button(button).clicked() {
                        match confirm.clone() {
                            Confirm::DeleteVm(host, name) => {
                                actions.call(
                                    format!("Deleting {name}"),
                                    crate::api::ops::DeleteVm {
                                        vm: format!("{host}/{name}"),
                                    },
                                );
                            }
                            Confirm::DeleteService(name) => {
                                actions.call(
                                    format!("Deleting service {name}"),
                                    crate::api::ops::DeleteService {
                                        name: name.to_string(),
                                    },
                                );
                            }
                            Confirm::ForceOff(host, name) => actions.stop_vm(&host, &name, true),
                            Confirm::Reboot(host, name) => actions.power_vm(
                                &host,
                                &name,
                                dunes_shared::protocol::PowerAction::Reboot,
                            ),
                            Confirm::StopInstance { host, vm, .. } => {
                                actions.stop_vm(&host, &vm, false)
                            }
                            Confirm::StopFirst(..) => {}
                            Confirm::RevertSnapshot {
                                host, vm, snapshot, ..
                            } => {
                                self.details.snapshot_action(
                                    &mut actions,
                                    &host,
                                    &vm,
                                    dunes_shared::protocol::SnapshotAction::Revert,
                                    snapshot,
                                );
                            }
                            Confirm::DeleteSnapshot { host, vm, snapshot } => {
                                self.details.snapshot_action(
                                    &mut actions,
                                    &host,
                                    &vm,
                                    dunes_shared::protocol::SnapshotAction::Delete,
                                    snapshot,
                                );
                            }
                        }
                        ui.close();
                    }
                    if ui.button("Cancel").clicked() {
                        ui.close();
                    }
                } else if ui.button("OK").clicked() {
                    ui.close();
                }
            });
        });
        if response.should_close() {
            self.confirm = None;
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
            link: &self.link,
            outbox: &mut self.outbox,
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
                let go = ui.add_enabled(checked.is_ok(), egui::Button::new("Migrate"));
                // Enter confirms, for those who chose the host by keyboard.
                if go.enabled() && ui.ctx().memory(|m| m.focused().is_none()) {
                    go.request_focus();
                }
                if go.clicked() {
                    actions.migrate(&from, &vm, &to);
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
}

/// A small button at the top of a docked panel that folds it to a strip.
fn collapse_button(ui: &mut egui::Ui, arrow: &str, hint: &str) -> bool {
    ui.horizontal(|ui| {
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Min), |ui| {
            ui.small_button(arrow).on_hover_text(hint).clicked()
        })
        .inner
    })
    .inner
}

/// A folded side panel: its name written upwards, the whole strip a button.
fn strip_ui(ui: &mut egui::Ui, name: &str, arrow: &str) -> bool {
    let rect = ui.available_rect_before_wrap();
    let response = ui.interact(rect, ui.scope_id().with("strip"), egui::Sense::click());
    response.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Button, true, name));
    let response = response.on_hover_text(format!("Open {name}"));
    let visuals = ui.visuals();
    let color = if response.hovered() {
        visuals.strong_text_color()
    } else {
        visuals.text_color()
    };
    let painter = ui.painter();
    if response.hovered() {
        painter.rect_filled(rect, 0.0, visuals.widgets.hovered.weak_bg_fill);
    }
    painter.text(
        egui::pos2(rect.center().x, rect.top() + 10.0),
        egui::Align2::CENTER_CENTER,
        arrow,
        egui::FontId::proportional(12.0),
        color,
    );
    let galley = painter.layout_no_wrap(name.to_string(), egui::FontId::proportional(13.0), color);
    let at = egui::pos2(
        rect.center().x - galley.size().y / 2.0,
        rect.top() + 28.0 + galley.size().x,
    );
    painter.add(
        egui::epaint::TextShape::new(at, galley, color).with_angle(-std::f32::consts::FRAC_PI_2),
    );
    response.clicked()
}

/// A side panel laid over the topology; true when its close button was used.
fn drawer_ui(
    ctx: &egui::Context,
    id: &str,
    rect: egui::Rect,
    add_contents: impl FnOnce(&mut egui::Ui),
) -> bool {
    let mut close = false;
    egui::Area::new(egui::Id::unique(id))
        .order(egui::Order::Middle)
        .fixed_pos(rect.min)
        .show(ctx, |ui| {
            egui::Frame::window(ui.style()).show(ui, |ui| {
                let inner = rect.size() - egui::vec2(16.0, 16.0);
                ui.set_min_size(inner);
                ui.set_max_size(inner);
                if collapse_button(ui, "Close", "Close (Esc)") {
                    close = true;
                }
                add_contents(ui);
            });
        });
    close
}

/// The notices the operator has not dismissed, stacked in the top right corner.
fn notices_ui(ctx: &egui::Context, notices: &mut Vec<Notice>) {
    let mut dismissed = None;
    for (n, notice) in notices.iter().enumerate() {
        egui::Area::new(egui::Id::unique(("notice", n)))
            .order(egui::Order::Foreground)
            .anchor(
                egui::Align2::RIGHT_TOP,
                egui::vec2(-12.0, 48.0 + n as f32 * 96.0),
            )
            .show(ctx, |ui| {
                egui::Frame::popup(ui.style())
                    .stroke(egui::Stroke::new(2.0, Color32::from_rgb(248, 81, 73)))
                    .show(ui, |ui| {
                        ui.set_max_width(360.0);
                        ui.label(
                            egui::RichText::new(&notice.title)
                                .strong()
                                .color(Color32::from_rgb(248, 81, 73)),
                        );
                        ui.label(&notice.body);
                        if ui.button("Dismiss").clicked() {
                            dismissed = Some(n);
                        }
                    });
            });
    }
    if let Some(n) = dismissed {
        notices.remove(n);
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

/// Frames drawn, counted for `DUNES_FRAME_STATS=1` (docs/BENCHMARKS.md: the idle window).
struct FrameStats {
    since: std::time::Instant,
    frames: u64,
}

impl FrameStats {
    /// Counts a frame; every 10 s prints the rate to stderr.
    fn frame(&mut self) {
        self.frames += 1;
        let elapsed = self.since.elapsed().as_secs_f64();
        if elapsed >= 10.0 {
            eprintln!(
                "dunes-console: {} frames in {elapsed:.1} s ({:.2}/s)",
                self.frames,
                self.frames as f64 / elapsed
            );
            *self = FrameStats {
                since: std::time::Instant::now(),
                frames: 0,
            };
        }
    }
}

impl eframe::App for ConsoleApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        if let Some(stats) = &mut self.frame_stats {
            stats.frame();
        }
        self.frame_ui(ui);
        if self.outbox.waiting() {
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
        S::Defined | S::Stopped => Color32::from_rgb(110, 118, 129),
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
