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
    /// A template of the host's, or an image of the library.
    from_image: bool,
    template: String,
    image: Option<String>,
    /// 0: the image's size.
    disk_gib: u64,
    uefi: bool,
    vcpus: u32,
    memory_mib: u64,
    start: bool,
    focus_name: bool,
    /// The library, asked for when the dialog opens.
    images: Vec<views::ImageView>,
    listing: Option<super::link::Answer<Vec<views::ImageView>>>,
    wants_images: bool,
}

impl Default for NewVmDialog {
    fn default() -> Self {
        NewVmDialog {
            open: false,
            name: String::new(),
            host: None,
            from_image: false,
            template: "tiny".into(),
            image: None,
            disk_gib: 0,
            uefi: false,
            vcpus: 1,
            memory_mib: 256,
            start: true,
            focus_name: false,
            images: Vec::new(),
            listing: None,
            wants_images: false,
        }
    }
}

impl NewVmDialog {
    pub fn open(&mut self, snapshot: &Snapshot, selection: &Selection) {
        self.open = true;
        self.focus_name = true;
        self.wants_images = true;
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
        let template = if self.from_image {
            let image = self.image.as_deref().ok_or("choose an image")?;
            let view = self.images.iter().find(|i| i.name.as_str() == image);
            if view.is_some_and(|i| i.format == "iso") && self.disk_gib == 0 {
                return Err(format!(
                    "image {image} is an installer: give the size of the disk it installs to"
                ));
            }
            TemplateName::new(image).map_err(|e| e.to_string())?
        } else {
            TemplateName::new(self.template.trim()).map_err(|e| e.to_string())?
        };
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
        if std::mem::take(&mut self.wants_images) {
            self.listing = Some(actions.request(ops::ListImages {}));
        }
        match super::link::take(&mut self.listing) {
            Some(Ok(images)) => self.images = images,
            Some(Err(e)) => actions.say(format!("Listing images failed: {e}"), true),
            None if self.listing.is_some() => ctx.request_repaint(),
            None => {}
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
                        ui.label("Boot from");
                        ui.horizontal(|ui| {
                            ui.radio_value(&mut self.from_image, false, "Template");
                            ui.radio_value(&mut self.from_image, true, "Image");
                        });
                        ui.end_row();
                        let template = if self.from_image {
                            self.image_rows(ui);
                            None
                        } else {
                            Some(field(
                                ui,
                                "Template",
                                egui::TextEdit::singleline(&mut self.template)
                                    .hint_text("tiny")
                                    .desired_width(220.0),
                            ))
                        };
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
                        entered_in(&name_field) || template.as_ref().is_some_and(entered_in)
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
                    template: if self.from_image {
                        String::new()
                    } else {
                        spec.template.to_string()
                    },
                    host: host.to_string(),
                    vcpus: spec.vcpus,
                    memory_mib: spec.memory_mib,
                    start: self.start,
                    image: self.from_image.then(|| spec.template.to_string()),
                    disk_gib: (self.from_image && self.disk_gib > 0).then_some(self.disk_gib),
                    uefi: self.from_image && self.uefi,
                    user_data: None,
                    user: None,
                    ssh_key: None,
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

    /// The rows of a VM from an image: which image, its disk's size and the firmware.
    fn image_rows(&mut self, ui: &mut egui::Ui) {
        let label = ui.label("Image");
        if self.images.is_empty() {
            ui.label(
                RichText::new(if self.listing.is_some() {
                    "reading the library…"
                } else {
                    "no image in the library: import one with Images…"
                })
                .weak(),
            );
        } else {
            let describe = |i: &views::ImageView| {
                format!(
                    "{} ({}, {})",
                    i.name,
                    i.format,
                    super::format::human_bytes(i.virtual_bytes)
                )
            };
            let shown = self
                .image
                .as_deref()
                .and_then(|n| self.images.iter().find(|i| i.name.as_str() == n))
                .map_or("choose…".to_string(), describe);
            egui::ComboBox::from_id_salt("new-vm-image")
                .selected_text(shown)
                .width(220.0)
                .show_ui(ui, |ui| {
                    for i in &self.images {
                        ui.selectable_value(&mut self.image, Some(i.name.to_string()), describe(i));
                    }
                })
                .response
                .labelled_by(label.id);
        }
        ui.end_row();
        field(
            ui,
            "Disk",
            egui::DragValue::new(&mut self.disk_gib)
                .range(0..=dunes_shared::model::DISK_GIB_MAX)
                .custom_formatter(|v, _| {
                    if v < 1.0 {
                        "image's size".into()
                    } else {
                        format!("{v} GiB")
                    }
                }),
        );
        let label = ui.label("Firmware");
        egui::ComboBox::from_id_salt("new-vm-firmware")
            .selected_text(if self.uefi { "UEFI (OVMF)" } else { "BIOS" })
            .show_ui(ui, |ui| {
                ui.selectable_value(&mut self.uefi, false, "BIOS");
                ui.selectable_value(&mut self.uefi, true, "UEFI (OVMF)");
            })
            .response
            .labelled_by(label.id);
        ui.end_row();
    }
}
