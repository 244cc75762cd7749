//! The "Add host" and "New VM" dialogs. Inputs are checked as they are typed; nothing is sent
//! until they are valid.

use dunes_shared::{
    model::{HostId, MEMORY_MIB_MAX, MEMORY_MIB_MIN, TemplateName, VCPUS_MAX, VmName, VmSpec},
    pki::Fingerprint,
};
use egui::{Color32, Key, RichText};

use tokio::sync::oneshot;

use super::{Actions, STOPPED, Selection};
use crate::{
    api::{
        ApiError, ops,
        views::{self, HostEnrolled},
    },
    engine::{LinkState, Snapshot, fleet::enroll::validate_address},
};

#[derive(Debug, Default)]
pub struct AddHostDialog {
    open: bool,
    address: String,
    token: String,
    fingerprint: String,
    /// Let the agent take over an enrolled host's id despite another key.
    replace: bool,
    focus_address: bool,
    /// The probe or enrollment under way.
    pending: Option<AddHostStep>,
    /// The key the agent at this address presented, waiting for the operator's trust.
    probed: Option<(String, Fingerprint)>,
    /// How the last attempt ended, shown until the dialog is used again.
    outcome: Option<Result<HostEnrolled, String>>,
}

#[derive(Debug)]
enum AddHostStep {
    Probe(
        String,
        oneshot::Receiver<Result<views::ProbedKey, ApiError>>,
    ),
    Enroll(oneshot::Receiver<Result<HostEnrolled, ApiError>>),
}

/// A grid row: a label and the widget it names (for screen readers and tests alike).
fn field(ui: &mut egui::Ui, label: &str, widget: impl egui::Widget) -> egui::Response {
    let label = ui.label(label);
    let response = ui.add(widget).labelled_by(label.id);
    ui.end_row();
    response
}

/// Enter pressed in this text field: it submits the dialog the field belongs to, and only
/// that one (Enter in the filter box or another window submits nothing here).
fn entered_in(response: &egui::Response) -> bool {
    response.lost_focus() && response.ctx.input(|i| i.key_pressed(Key::Enter))
}

fn error_line(ui: &mut egui::Ui, error: &Option<String>) {
    if let Some(e) = error {
        ui.label(RichText::new(e).color(Color32::from_rgb(248, 81, 73)));
    }
}

impl AddHostDialog {
    pub fn open(&mut self) {
        self.open = true;
        self.focus_address = true;
        if self.pending.is_none() {
            self.outcome = None;
        }
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    fn problem(&self) -> Option<String> {
        if let Err(e) = validate_address(self.address.trim()) {
            return Some(e.to_string());
        }
        if self.token.trim().is_empty() {
            return Some("enter the join token the agent printed".into());
        }
        if !self.fingerprint.trim().is_empty()
            && let Err(e) = self.fingerprint.trim().parse::<Fingerprint>()
        {
            return Some(e.to_string());
        }
        None
    }

    /// Takes the answer of the step under way, if it has come.
    fn poll(&mut self, ctx: &egui::Context) {
        let Some(step) = &mut self.pending else {
            return;
        };
        let done = match step {
            AddHostStep::Probe(address, rx) => match rx.try_recv() {
                Ok(Ok(probed)) => {
                    match probed.fingerprint.parse::<Fingerprint>() {
                        Ok(fingerprint) => self.probed = Some((address.clone(), fingerprint)),
                        Err(e) => self.outcome = Some(Err(format!("the agent's key: {e}"))),
                    }
                    true
                }
                Ok(Err(e)) => {
                    self.outcome = Some(Err(e.message));
                    true
                }
                Err(oneshot::error::TryRecvError::Empty) => false,
                Err(oneshot::error::TryRecvError::Closed) => {
                    self.outcome = Some(Err(STOPPED.to_string()));
                    true
                }
            },
            AddHostStep::Enroll(rx) => match rx.try_recv() {
                Ok(result) => {
                    if result.is_ok() {
                        self.address.clear();
                        self.token.clear();
                        self.fingerprint.clear();
                        self.replace = false;
                    }
                    self.outcome = Some(result.map_err(|e| e.message));
                    self.probed = None;
                    true
                }
                Err(oneshot::error::TryRecvError::Empty) => false,
                Err(oneshot::error::TryRecvError::Closed) => {
                    self.outcome = Some(Err(STOPPED.to_string()));
                    true
                }
            },
        };
        if done {
            self.pending = None;
        } else {
            ctx.request_repaint_after(std::time::Duration::from_millis(100));
        }
    }

    /// Enrolls with the key the operator vouched for: typed in, or probed and trusted.
    fn enroll(&mut self, actions: &mut Actions<'_>, expected_fingerprint: Fingerprint) {
        let rx = actions.request(ops::AddHost {
            address: self.address.trim().to_string(),
            token: self.token.trim().to_string(),
            fingerprint: Some(expected_fingerprint.to_string()),
            replace: self.replace,
        });
        self.pending = Some(AddHostStep::Enroll(rx));
        self.outcome = None;
    }

    fn probe(&mut self, actions: &mut Actions<'_>) {
        let address = self.address.trim().to_string();
        let rx = actions.request(ops::ProbeHost {
            address: address.clone(),
        });
        self.pending = Some(AddHostStep::Probe(address, rx));
        self.outcome = None;
    }

    pub fn add_host_ui(&mut self, ctx: &egui::Context, actions: &mut Actions<'_>) {
        if !self.open {
            return;
        }
        self.poll(ctx);
        // A key probed at another address vouches for nothing here, and a fingerprint typed in
        // takes over from the probed one.
        if self.probed.as_ref().is_some_and(|(address, _)| {
            address != self.address.trim() || !self.fingerprint.trim().is_empty()
        }) {
            self.probed = None;
        }
        let mut open = true;
        let (mut submit, mut trust, mut distrust) = (false, false, false);
        egui::Window::new("Add host")
            .open(&mut open)
            .collapsible(false)
            .resizable(false)
            .show(ctx, |ui| {
                ui.label("Start dunes-agent on the host: it prints its address, key fingerprint and a one-time join token.");
                let entered = egui::Grid::new("add-host").num_columns(2).show(ui, |ui| {
                    let address = field(ui, "Address", egui::TextEdit::singleline(&mut self.address).hint_text("host:port").desired_width(260.0));
                    if std::mem::take(&mut self.focus_address) {
                        address.request_focus();
                    }
                    let token = field(ui, "Join token", egui::TextEdit::singleline(&mut self.token).hint_text("xxxx-xxxx-…").desired_width(260.0));
                    let fingerprint = field(ui, "Fingerprint",
                        egui::TextEdit::singleline(&mut self.fingerprint)
                            .hint_text("sha256:… (optional: else shown to compare)")
                            .desired_width(260.0),
                    );
                    [address, token, fingerprint].iter().any(entered_in)
                }).inner;
                ui.checkbox(&mut self.replace, "Replace an enrolled host with the same id (a reinstalled machine)");
                let problem = self.problem();
                if !self.address.is_empty() {
                    error_line(ui, &problem);
                }
                let ready = problem.is_none() && self.pending.is_none();
                if let Some((address, fingerprint)) = &self.probed {
                    ui.separator();
                    ui.label(format!("The agent at {address} presents this key. Compare it with the fingerprint the agent printed:"));
                    ui.label(RichText::new(fingerprint.to_string()).monospace().strong());
                    ui.horizontal(|ui| {
                        trust = ui.add_enabled(ready, egui::Button::new("Trust and enroll")).clicked();
                        distrust = ui.button("Cancel").clicked();
                    });
                } else {
                    ui.label(
                        RichText::new("Without a fingerprint the console first shows the key the agent presents, and enrolls only once you trust it.")
                            .weak()
                            .small(),
                    );
                    ui.horizontal(|ui| {
                        submit = ui.add_enabled(ready, egui::Button::new("Enroll")).clicked() || (entered && ready);
                    });
                }
                if let Some(step) = &self.pending {
                    ui.horizontal(|ui| {
                        ui.spinner();
                        ui.label(match step {
                            AddHostStep::Probe(..) => "reading the agent's key…",
                            AddHostStep::Enroll(_) => "enrolling…",
                        });
                    });
                }
                match &self.outcome {
                    Some(Ok(added)) => {
                        ui.label(RichText::new(format!("Enrolled host {}.", added.id)).strong());
                        field(ui, "Pinned key:", egui::Label::new(RichText::new(added.fingerprint.as_str()).monospace()).wrap());
                    }
                    Some(Err(e)) => error_line(ui, &Some(e.clone())),
                    None => {}
                }
            });
        if submit {
            match self.fingerprint.trim().parse::<Fingerprint>() {
                Ok(given) => self.enroll(actions, given),
                Err(_) => self.probe(actions),
            }
        }
        if trust && let Some((_, fingerprint)) = self.probed {
            self.enroll(actions, fingerprint);
        }
        if distrust {
            self.probed = None;
        }
        if !open || ctx.input(|i| i.key_pressed(Key::Escape)) {
            self.close();
        }
    }

    pub fn close(&mut self) {
        self.open = false;
        self.probed = None;
    }
}

#[derive(Debug)]
pub struct NewVmDialog {
    open: bool,
    name: String,
    host: Option<HostId>,
    template: String,
    vcpus: u32,
    memory_mib: u64,
    start: bool,
    focus_name: bool,
}

impl Default for NewVmDialog {
    fn default() -> Self {
        NewVmDialog {
            open: false,
            name: String::new(),
            host: None,
            template: "tiny".into(),
            vcpus: 1,
            memory_mib: 256,
            start: true,
            focus_name: false,
        }
    }
}

impl NewVmDialog {
    pub fn open(&mut self, snapshot: &Snapshot, selection: &Selection) {
        self.open = true;
        self.focus_name = true;
        let preferred = match selection {
            Selection::Host(h) | Selection::Vm(h, _) => Some(h.clone()),
            Selection::None | Selection::Service(_) => None,
        };
        self.host = preferred.or_else(|| {
            snapshot
                .hosts
                .iter()
                .find(|h| h.link == LinkState::Online)
                .map(|h| h.id().clone())
        });
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    fn spec(&self, snapshot: &Snapshot) -> Result<(HostId, VmSpec), String> {
        let name = VmName::new(self.name.trim()).map_err(|e| e.to_string())?;
        let template = TemplateName::new(self.template.trim()).map_err(|e| e.to_string())?;
        let host = self.host.clone().ok_or("choose a host")?;
        let view = snapshot
            .host(&host)
            .ok_or_else(|| format!("host {host} is not enrolled"))?;
        if view.link != LinkState::Online {
            return Err(format!("host {host} is {}", view.link.as_str()));
        }
        if view.vm(&name).is_some() {
            return Err(format!("{host} already has a VM named {name}"));
        }
        let spec = VmSpec {
            name,
            template,
            vcpus: Some(self.vcpus),
            memory_mib: Some(self.memory_mib),
        };
        spec.validate().map_err(|e| e.to_string())?;
        Ok((host, spec))
    }

    pub fn new_vm_ui(
        &mut self,
        ctx: &egui::Context,
        snapshot: &Snapshot,
        actions: &mut Actions<'_>,
    ) {
        if !self.open {
            return;
        }
        let mut open = true;
        let mut submit = None;
        egui::Window::new("New VM")
            .open(&mut open)
            .collapsible(false)
            .resizable(false)
            .show(ctx, |ui| {
                let entered = egui::Grid::new("new-vm")
                    .num_columns(2)
                    .show(ui, |ui| {
                        let name_label = ui.label("Name");
                        let name_field = ui
                            .add(
                                egui::TextEdit::singleline(&mut self.name)
                                    .hint_text("a-z, 0-9 and -")
                                    .desired_width(220.0),
                            )
                            .labelled_by(name_label.id);
                        ui.end_row();
                        // Typing starts right away after Ctrl+N.
                        if std::mem::take(&mut self.focus_name) {
                            name_field.request_focus();
                        }
                        let host_label = ui.label("Host");
                        let shown = self
                            .host
                            .as_ref()
                            .map_or("choose…".to_string(), |h| h.to_string());
                        egui::ComboBox::from_id_salt("new-vm-host")
                            .selected_text(shown)
                            .show_ui(ui, |ui| {
                                for h in &snapshot.hosts {
                                    let label = format!(
                                        "{} ({}, {})",
                                        h.id(),
                                        h.site_name(),
                                        h.link.as_str()
                                    );
                                    ui.selectable_value(
                                        &mut self.host,
                                        Some(h.id().clone()),
                                        label,
                                    );
                                }
                            })
                            .response
                            .labelled_by(host_label.id);
                        ui.end_row();
                        let template = field(
                            ui,
                            "Template",
                            egui::TextEdit::singleline(&mut self.template)
                                .hint_text("tiny")
                                .desired_width(220.0),
                        );
                        field(
                            ui,
                            "vCPUs",
                            egui::DragValue::new(&mut self.vcpus)
                                .range(1..=VCPUS_MAX)
                                .suffix(" vCPU"),
                        );
                        field(
                            ui,
                            "Memory",
                            egui::DragValue::new(&mut self.memory_mib)
                                .range(MEMORY_MIB_MIN..=MEMORY_MIB_MAX)
                                .speed(16.0)
                                .suffix(" MiB"),
                        );
                        entered_in(&name_field) || entered_in(&template)
                    })
                    .inner;
                ui.checkbox(&mut self.start, "Start after creating");
                let spec = self.spec(snapshot);
                if !self.name.is_empty() {
                    error_line(ui, &spec.as_ref().err().cloned());
                }
                if ui
                    .add_enabled(spec.is_ok(), egui::Button::new("Create"))
                    .clicked()
                    || (entered && spec.is_ok())
                {
                    submit = spec.ok();
                }
            });
        if let Some((host, spec)) = submit {
            actions.call(
                format!("Creating {} on {host}", spec.name),
                crate::api::ops::CreateVm {
                    name: spec.name.to_string(),
                    template: spec.template.to_string(),
                    host: host.to_string(),
                    vcpus: spec.vcpus,
                    memory_mib: spec.memory_mib,
                    start: self.start,
                },
            );
            let keep_host = self.host.clone();
            *self = NewVmDialog {
                host: keep_host,
                ..NewVmDialog::default()
            };
            return;
        }
        if !open || ctx.input(|i| i.key_pressed(Key::Escape)) {
            self.close();
        }
    }

    pub fn close(&mut self) {
        self.open = false;
    }
}
