//! The Images view: the console's library of operating system images, an import from a path
//! (or a file dropped onto the window), and a confirmed delete.

use std::time::{Duration, Instant};

use egui::RichText;

use super::{
    format::human_bytes,
    gated,
    link::{Answer, EngineLink, LinkStatus, take},
};
use crate::{
    api::{ops, views::ImageView},
    engine::images::ImageTransferProgress,
};

/// How often the view asks again while open: hosts may get copies meanwhile.
const REFRESH: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct ImagesWindow {
    open: bool,
    images: Option<Vec<ImageView>>,
    listing: Option<Answer<Vec<ImageView>>>,
    asked_at: Option<Instant>,
    path: String,
    name: String,
    /// The name is the file's, made from it as it was typed.
    name_follows: bool,
    importing: Option<Answer<ImageView>>,
    importing_name: String,
    /// The bytes sent of the file being imported into an engine elsewhere.
    uploaded: Option<tokio::sync::watch::Receiver<(u64, u64)>>,
    /// The image whose delete waits for the operator's word.
    confirm_delete: Option<String>,
    deleting: Option<Answer<ImageView>>,
    /// What the last import or delete came to: good news, or the engine's refusal.
    outcome: Option<Result<String, String>>,
}

/// A name for an image from its file's name: lower case, other characters as dashes.
pub fn name_from_path(path: &str) -> String {
    let file = std::path::Path::new(path.trim())
        .file_stem()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let name: String = file
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut collapsed = String::new();
    for c in name.chars() {
        if !(c == '-' && collapsed.ends_with('-')) {
            collapsed.push(c);
        }
    }
    collapsed.trim_matches('-').chars().take(63).collect()
}

impl ImagesWindow {
    pub fn open(&mut self) {
        self.open = true;
        self.asked_at = None;
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    pub fn close(&mut self) {
        self.open = false;
        self.listing = None;
        self.confirm_delete = None;
    }

    /// Opens the view with an import of `path` ready to confirm.
    pub fn import_dropped(&mut self, path: &std::path::Path) {
        self.open();
        self.path = path.display().to_string();
        self.name = name_from_path(&self.path);
        self.name_follows = true;
        self.outcome = None;
    }

    fn refresh(&mut self, link: &EngineLink) {
        match take(&mut self.listing) {
            Some(Ok(images)) => self.images = Some(images),
            Some(Err(e)) => self.outcome = Some(Err(e)),
            None => {}
        }
        match take(&mut self.importing) {
            Some(Ok(image)) => {
                self.outcome = Some(Ok(format!(
                    "Image {} imported: {}, {} for the guest",
                    image.name,
                    image.format,
                    human_bytes(image.virtual_bytes)
                )));
                self.path.clear();
                self.name.clear();
                self.asked_at = None;
            }
            Some(Err(e)) => {
                self.outcome = Some(Err(format!(
                    "Importing {} failed: {e}",
                    self.importing_name
                )));
            }
            None => {}
        }
        match take(&mut self.deleting) {
            Some(Ok(image)) => {
                self.outcome = Some(Ok(format!("Image {} deleted", image.name)));
                self.asked_at = None;
            }
            Some(Err(e)) => self.outcome = Some(Err(e)),
            None => {}
        }
        let due = self.asked_at.is_none_or(|t| t.elapsed() >= REFRESH);
        if self.listing.is_none() && due {
            self.listing = Some(link.ask(ops::ListImages {}));
            self.asked_at = Some(Instant::now());
        }
    }

    pub fn images_ui(
        &mut self,
        ctx: &egui::Context,
        link: &EngineLink,
        transfers: &[ImageTransferProgress],
    ) {
        if !self.open {
            return;
        }
        self.refresh(link);
        let waiting = self.listing.is_some() || self.importing.is_some() || self.deleting.is_some();
        ctx.request_repaint_after(if waiting {
            Duration::from_millis(100)
        } else {
            REFRESH
        });
        let may_import = link.may::<ops::ImportImage>(true);
        let may_delete = link.may::<ops::DeleteImage>(true);
        let remote = !matches!(link.status(), LinkStatus::InProcess);
        let mut open = true;
        let screen = ctx.content_rect();
        egui::Window::new("Images")
            .id(egui::Id::unique("images"))
            .open(&mut open)
            .default_width((screen.width() * 0.6).clamp(300.0, 820.0))
            .max_height((screen.height() - 40.0).max(200.0))
            .show(ctx, |ui| {
                ui.label(
                    RichText::new(
                        if remote {
                            "Operating system disks (qcow2, raw) and installers (ISO) the console keeps. An import sends a file of this machine to the engine; or drop it onto the window."
                        } else {
                            "Operating system disks (qcow2, raw) and installers (ISO) the console keeps. Import one by its path, or drop it onto the window."
                        },
                    )
                    .weak(),
                );
                self.import_ui(ui, link, &may_import, remote);
                transfers_ui(ui, transfers);
                match &self.outcome {
                    Some(Ok(news)) => {
                        ui.label(RichText::new(news).color(egui::Color32::from_rgb(63, 185, 80)));
                    }
                    Some(Err(e)) => {
                        ui.colored_label(ui.visuals().error_fg_color, e);
                    }
                    None => {}
                }
                ui.separator();
                self.list_ui(ui, link, &may_delete);
            });
        if !open {
            self.close();
        }
    }

    fn import_ui(
        &mut self,
        ui: &mut egui::Ui,
        link: &EngineLink,
        may_import: &Result<(), String>,
        remote: bool,
    ) {
        egui::Grid::new("image-import")
            .num_columns(2)
            .show(ui, |ui| {
                let label = ui.label("File");
                let path = ui
                    .add(
                        egui::TextEdit::singleline(&mut self.path)
                            .hint_text("a .qcow2, .raw or .iso file")
                            .desired_width(320.0),
                    )
                    .labelled_by(label.id)
                    .on_hover_text(if remote {
                        "A path on this machine: the file goes to the engine; or drop it onto the window"
                    } else {
                        "A path on this machine; or drop a file onto the window"
                    });
                // The name follows the file's until the operator types one.
                if path.changed() && (self.name.is_empty() || self.name_follows) {
                    self.name = name_from_path(&self.path);
                    self.name_follows = true;
                }
                ui.end_row();
                let label = ui.label("Name");
                if ui
                    .add(egui::TextEdit::singleline(&mut self.name).desired_width(200.0))
                    .labelled_by(label.id)
                    .changed()
                {
                    self.name_follows = false;
                }
                ui.end_row();
            });
        ui.horizontal(|ui| {
            let ready = !self.path.trim().is_empty()
                && !self.name.trim().is_empty()
                && self.importing.is_none();
            if gated(ui, may_import, ready, egui::Button::new("Import"))
                .on_hover_text("Copied and checked: its format, its BLAKE3, no file outside it")
                .clicked()
            {
                let path = std::path::PathBuf::from(self.path.trim());
                let name = self.name.trim().to_string();
                self.outcome = None;
                self.importing_name = name.clone();
                let (answer, uploaded) = link.import_image(name, path);
                self.importing = Some(answer);
                self.uploaded = remote.then_some(uploaded);
            }
            if self.importing.is_some() {
                let sent = self.uploaded.as_ref().map(|u| *u.borrow());
                match sent {
                    Some((sent, total)) if total > 0 && sent < total => {
                        ui.add(
                            egui::ProgressBar::new(sent as f32 / total as f32)
                                .desired_width(240.0)
                                .text(format!(
                                    "sending {}: {} of {}",
                                    self.importing_name,
                                    human_bytes(sent),
                                    human_bytes(total)
                                )),
                        );
                    }
                    _ => {
                        ui.spinner();
                        ui.label(format!(
                            "Importing {}: copying and checking…",
                            self.importing_name
                        ));
                    }
                }
            }
        });
    }

    fn list_ui(&mut self, ui: &mut egui::Ui, link: &EngineLink, may_delete: &Result<(), String>) {
        let Some(images) = &self.images else {
            ui.label(RichText::new("reading the library…").weak());
            return;
        };
        if images.is_empty() {
            ui.label("No image yet: import a disk or an installer above.");
            return;
        }
        let mut delete = None;
        egui::ScrollArea::both()
            .auto_shrink([false, true])
            .show(ui, |ui| {
                egui::Grid::new("images-list")
                    .striped(true)
                    .num_columns(7)
                    .show(ui, |ui| {
                        for header in ["Name", "Format", "Size", "On disk", "Hosts", "BLAKE3", ""] {
                            ui.label(RichText::new(header).strong());
                        }
                        ui.end_row();
                        for image in images {
                            ui.label(image.name.as_str())
                                .on_hover_text(format!("imported {}", image.imported));
                            ui.label(&image.format);
                            ui.label(human_bytes(image.virtual_bytes))
                                .on_hover_text("what a guest sees");
                            ui.label(human_bytes(image.allocated_bytes))
                                .on_hover_text("what the console's copy takes");
                            ui.label(if image.hosts.is_empty() {
                                "-".to_string()
                            } else {
                                image.hosts.join(", ")
                            });
                            ui.label(
                                RichText::new(&image.blake3[..16.min(image.blake3.len())])
                                    .monospace(),
                            )
                            .on_hover_text(&image.blake3);
                            let name = image.name.to_string();
                            if self.confirm_delete.as_deref() == Some(name.as_str()) {
                                ui.horizontal(|ui| {
                                    let sure = ui.add(egui::Button::new(
                                        RichText::new("Delete").color(ui.visuals().error_fg_color),
                                    ));
                                    sure.request_focus();
                                    if sure.clicked() {
                                        delete = Some(name.clone());
                                    }
                                    if ui.button("Keep").clicked()
                                        || ui.input(|i| i.key_pressed(egui::Key::Escape))
                                    {
                                        self.confirm_delete = None;
                                    }
                                });
                            } else if gated(
                                ui,
                                may_delete,
                                self.deleting.is_none(),
                                egui::Button::new("Delete…"),
                            )
                            .on_hover_text(
                                "Removes it and the console's copy; refused while a VM uses it",
                            )
                            .clicked()
                            {
                                self.confirm_delete = Some(name);
                            }
                            ui.end_row();
                        }
                    });
            });
        if let Some(name) = delete {
            self.confirm_delete = None;
            self.outcome = None;
            self.deleting = Some(link.ask(ops::DeleteImage { name }));
        }
    }
}

/// A bar for each image on its way to a host.
pub fn transfers_ui(ui: &mut egui::Ui, transfers: &[ImageTransferProgress]) {
    if transfers.is_empty() {
        return;
    }
    ui.separator();
    ui.label(RichText::new("Sending to hosts").strong());
    for t in transfers {
        ui.add(
            egui::ProgressBar::new(fraction(t))
                .desired_width(ui.available_width().min(480.0))
                .text(format!(
                    "{} -> {}: {} of {}",
                    t.image,
                    t.host,
                    human_bytes(t.done_bytes),
                    human_bytes(t.total_bytes)
                )),
        );
    }
}

/// How far a transfer got, from 0 to 1.
pub fn fraction(t: &ImageTransferProgress) -> f32 {
    if t.total_bytes == 0 {
        1.0
    } else {
        (t.done_bytes as f64 / t.total_bytes as f64).clamp(0.0, 1.0) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_name_becomes_an_image_name() {
        assert_eq!(
            name_from_path("/srv/Debian-12_GenericCloud.qcow2"),
            "debian-12-genericcloud"
        );
        assert_eq!(name_from_path("ubuntu 24.04.iso"), "ubuntu-24-04");
        assert_eq!(name_from_path("  /x/--a__b--.raw "), "a-b");
        assert_eq!(name_from_path(""), "");
    }
}
