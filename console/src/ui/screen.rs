//! A VM's screen in the window: the engine's RFB session on the VM's display, drawn as a
//! texture scaled to the window (or at its own size, with scroll bars). While the picture has
//! the focus, keys go to the guest as X11 keysyms and the pointer's moves, buttons and wheel
//! as the display's pointer.

use std::time::Duration;

use egui::{Key, Sense, TextureHandle, TextureOptions};

use super::link::{Answer, EngineLink, take};
use crate::{
    api::{ops, views::ScreenSession},
    engine::consoles::{ScreenAttach, ScreenFrame, ScreenInput},
};

/// How often the window looks for a new picture while a screen is open.
const POLL: Duration = Duration::from_millis(50);

/// A screen being watched.
struct Live {
    attach: ScreenAttach,
    /// Audits the session's end when the window lets go of it.
    _end: Option<crate::api::SessionEnd>,
    texture: Option<TextureHandle>,
    /// The picture's size in pixels, and its generation (what the texture shows).
    size: [usize; 2],
    generation: u64,
    /// Whether the last picture has anything but one colour (for tests).
    has_content: bool,
    /// The session ended (the VM stopped): the last picture stays.
    ended: bool,
    /// The last pointer state sent: moves are sent only when it changes.
    pointer: Option<(u16, u16, u8)>,
    focus_first: bool,
}

impl Live {
    fn new(attach: ScreenAttach, end: Option<crate::api::SessionEnd>, focus_first: bool) -> Live {
        Live {
            attach,
            _end: end,
            texture: None,
            size: [0, 0],
            generation: 0,
            has_content: false,
            ended: false,
            pointer: None,
            focus_first,
        }
    }

    /// Takes the session's new picture into the texture, if there is one.
    fn refresh(&mut self, ctx: &egui::Context, name: &str) {
        match self.attach.frames.has_changed() {
            Ok(true) => {}
            Ok(false) => return,
            Err(_) => {
                self.ended = true;
                return;
            }
        }
        let frame = self.attach.frames.borrow_and_update().clone();
        if frame.width == 0 || frame.height == 0 {
            return;
        }
        let size = [frame.width as usize, frame.height as usize];
        let image = egui::ColorImage::from_rgba_unmultiplied(size, &frame.rgba);
        // Sharp pixels when scaled up (text modes), smooth when scaled down.
        let options = TextureOptions {
            magnification: egui::TextureFilter::Nearest,
            minification: egui::TextureFilter::Linear,
            ..TextureOptions::default()
        };
        match &mut self.texture {
            Some(texture) => texture.set(image, options),
            None => self.texture = Some(ctx.load_texture(name, image, options)),
        }
        self.size = size;
        self.generation = frame.generation;
        self.has_content = frame.has_content();
    }
}

#[derive(Default)]
pub struct ScreenWindow {
    open: bool,
    /// `HOST/NAME`.
    vm: String,
    pending: Option<Answer<ScreenSession>>,
    live: Option<Live>,
    note: Option<String>,
    /// Draw the picture at its own size instead of fitting the window.
    actual_size: bool,
}

impl std::fmt::Debug for ScreenWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScreenWindow")
            .field("vm", &self.vm)
            .field("open", &self.open)
            .finish_non_exhaustive()
    }
}

impl ScreenWindow {
    /// Opens the screen of `vm` (`HOST/NAME`).
    pub fn open(&mut self, vm: String, link: &EngineLink) {
        *self = ScreenWindow {
            open: true,
            pending: Some(link.open_session(ops::ScreenVm {
                vm: vm.clone(),
                read_only: false,
            })),
            vm,
            ..ScreenWindow::default()
        };
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    pub fn close(&mut self) {
        // Dropping the session's end leaves the screen; the engine closes it when nobody
        // watches any more.
        *self = ScreenWindow::default();
    }

    /// The generation of the picture on screen and whether it shows anything but one colour
    /// (for tests), once a picture has come.
    pub fn picture(&self) -> Option<(u64, bool)> {
        self.live
            .as_ref()
            .filter(|l| l.generation > 0)
            .map(|l| (l.generation, l.has_content))
    }

    /// The picture on screen as pixels (for tests).
    pub fn frame(&self) -> Option<std::sync::Arc<ScreenFrame>> {
        self.live.as_ref().map(|l| l.attach.frames.borrow().clone())
    }

    fn refresh(&mut self, ctx: &egui::Context) {
        match take(&mut self.pending) {
            Some(Ok(mut session)) => match session.attach.take() {
                Some(attach) => {
                    self.note = attach.input.is_none().then(|| {
                        "Watching only: another viewer has the keys and the pointer.".to_string()
                    });
                    self.live = Some(Live::new(attach, session.end.take(), true));
                }
                None => {
                    self.note = Some("The engine sent no screen to show.".into());
                }
            },
            Some(Err(e)) => self.note = Some(e),
            None => {}
        }
        if let Some(live) = &mut self.live {
            live.refresh(ctx, "vm-screen");
        }
    }

    pub fn screen_ui(&mut self, ctx: &egui::Context) {
        if !self.open {
            return;
        }
        self.refresh(ctx);
        if self.pending.is_some() || self.live.as_ref().is_some_and(|l| !l.ended) {
            ctx.request_repaint_after(POLL);
        }
        let mut open = true;
        egui::Window::new(format!("Screen: {}", self.vm))
            .open(&mut open)
            .default_size([760.0, 500.0])
            .min_size([320.0, 200.0])
            .resizable(true)
            .show(ctx, |ui| self.window_ui(ui));
        if !open {
            self.close();
        }
    }

    fn window_ui(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            let Some(live) = &mut self.live else {
                ui.label(match (&self.pending, &self.note) {
                    (Some(_), _) => "Connecting to the screen…",
                    (None, Some(note)) => note.as_str(),
                    (None, None) => "",
                });
                return;
            };
            ui.checkbox(&mut self.actual_size, "Actual size")
                .on_hover_text("Draw the screen pixel for pixel instead of fitting the window");
            let typing = live.attach.input.is_some();
            if ui
                .add_enabled(typing && !live.ended, egui::Button::new("Ctrl+Alt+Del"))
                .on_hover_text("Sends Ctrl+Alt+Delete to the guest")
                .clicked()
                && let Some(input) = &live.attach.input
            {
                for (keysym, down) in CTRL_ALT_DEL {
                    input.try_send(ScreenInput::Key { keysym, down });
                }
            }
            let status = if live.ended {
                "The screen closed: the VM stopped.".to_string()
            } else if live.generation == 0 {
                "Waiting for the first picture…".to_string()
            } else if typing {
                format!(
                    "{}×{}. Click the screen, then type and point.",
                    live.size[0], live.size[1]
                )
            } else {
                self.note.clone().unwrap_or_default()
            };
            ui.label(egui::RichText::new(status).weak());
        });
        let actual_size = self.actual_size;
        let Some(live) = &mut self.live else {
            return;
        };
        if actual_size {
            egui::ScrollArea::both()
                .auto_shrink([false; 2])
                .show(ui, |ui| picture_ui(ui, live, 1.0));
        } else {
            let space = ui.available_size();
            let [w, h] = live.size;
            let scale = if w == 0 || h == 0 {
                1.0
            } else {
                (space.x / w as f32).min(space.y / h as f32).max(0.05)
            };
            picture_ui(ui, live, scale);
        }
    }
}

/// Control, Alt and Delete down, then up.
const CTRL_ALT_DEL: [(u32, bool); 6] = [
    (0xffe3, true),
    (0xffe9, true),
    (0xffff, true),
    (0xffff, false),
    (0xffe9, false),
    (0xffe3, false),
];

/// The picture at `scale`, with the keyboard and the pointer when it has the focus.
fn picture_ui(ui: &mut egui::Ui, live: &mut Live, scale: f32) {
    let [w, h] = live.size;
    let size = egui::vec2(w as f32 * scale, h as f32 * scale);
    let (rect, response) = ui.allocate_exact_size(size, Sense::click_and_drag());
    let painter = ui.painter_at(rect);
    painter.rect_filled(rect, 0.0, egui::Color32::BLACK);
    if let Some(texture) = &live.texture {
        painter.image(
            texture.id(),
            rect,
            egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
            egui::Color32::WHITE,
        );
    }
    let Some(input) = &live.attach.input else {
        return;
    };
    if live.ended {
        return;
    }
    if response.clicked() || response.drag_started() || std::mem::take(&mut live.focus_first) {
        response.request_focus();
    }
    if !response.has_focus() {
        return;
    }
    ui.memory_mut(|m| {
        m.set_focus_lock_filter(
            response.id,
            egui::EventFilter {
                tab: true,
                horizontal_arrows: true,
                vertical_arrows: true,
                escape: true,
            },
        );
    });
    let events = ui.input(|i| i.events.clone());
    for event in &events {
        for (keysym, down) in key_events(event) {
            // A full queue drops keys rather than stall the window.
            input.try_send(ScreenInput::Key { keysym, down });
        }
    }
    if let Some(pos) = response.hover_pos().filter(|_| w > 0 && h > 0) {
        let x = ((pos.x - rect.min.x) / scale).clamp(0.0, (w - 1) as f32) as u16;
        let y = ((pos.y - rect.min.y) / scale).clamp(0.0, (h - 1) as f32) as u16;
        let buttons = ui.input(|i| {
            let mut buttons = 0u8;
            for (bit, button) in [
                (0, egui::PointerButton::Primary),
                (1, egui::PointerButton::Middle),
                (2, egui::PointerButton::Secondary),
            ] {
                if i.pointer.button_down(button) {
                    buttons |= 1 << bit;
                }
            }
            buttons
        });
        let wheel: f32 = events
            .iter()
            .map(|e| match e {
                egui::Event::MouseWheel { delta, .. } => delta.y,
                _ => 0.0,
            })
            .sum();
        if live.pointer != Some((x, y, buttons)) {
            live.pointer = Some((x, y, buttons));
            input.try_send(ScreenInput::Pointer { x, y, buttons });
        }
        // The wheel is a press and release of button 4 (up) or 5 (down).
        if wheel != 0.0 {
            let bit = if wheel > 0.0 { 1 << 3 } else { 1 << 4 };
            input.try_send(ScreenInput::Pointer {
                x,
                y,
                buttons: buttons | bit,
            });
            input.try_send(ScreenInput::Pointer { x, y, buttons });
        }
    }
}

/// Left Shift, pressed around a character that needs it on a US keyboard.
const SHIFT: u32 = 0xffe1;
const CONTROL: u32 = 0xffe3;
const ALT: u32 = 0xffe9;

/// The X11 keysyms (pressed, released) an egui event becomes: text as the characters'
/// keysyms (with Shift where a US keyboard needs it), the editing and function keys as
/// theirs, and Ctrl or Alt with a letter as that chord.
pub fn key_events(event: &egui::Event) -> Vec<(u32, bool)> {
    let tap = |keysym: u32| [(keysym, true), (keysym, false)];
    match event {
        egui::Event::Text(text) => text
            .chars()
            .flat_map(|c| {
                let keysym = char_keysym(c);
                let shifted = c.is_ascii_uppercase() || "~!@#$%^&*()_+{}|:\"<>?".contains(c);
                let mut keys = Vec::with_capacity(4);
                if shifted {
                    keys.push((SHIFT, true));
                }
                keys.extend(tap(keysym));
                if shifted {
                    keys.push((SHIFT, false));
                }
                keys
            })
            .collect(),
        // The window turns Ctrl+C and Ctrl+X into copy and cut; the guest gets the chord.
        egui::Event::Copy => vec![
            (CONTROL, true),
            (0x63, true),
            (0x63, false),
            (CONTROL, false),
        ],
        egui::Event::Cut => vec![
            (CONTROL, true),
            (0x78, true),
            (0x78, false),
            (CONTROL, false),
        ],
        egui::Event::Key {
            key,
            pressed,
            modifiers,
            ..
        } => {
            if let Some(keysym) = special_keysym(*key) {
                return vec![(keysym, *pressed)];
            }
            // Letters and digits come as text, but not with Ctrl or Alt held.
            let name = key.name();
            if (modifiers.ctrl || modifiers.alt) && *pressed && name.len() == 1 {
                let c = name.as_bytes()[0].to_ascii_lowercase();
                let held = if modifiers.ctrl { CONTROL } else { ALT };
                return vec![
                    (held, true),
                    (u32::from(c), true),
                    (u32::from(c), false),
                    (held, false),
                ];
            }
            Vec::new()
        }
        _ => Vec::new(),
    }
}

/// A character's keysym: Latin-1 as itself, the rest of Unicode as 0x0100_0000 + its code.
fn char_keysym(c: char) -> u32 {
    match u32::from(c) {
        code @ 0x20..=0x7e | code @ 0xa0..=0xff => code,
        code => 0x0100_0000 + code,
    }
}

fn special_keysym(key: Key) -> Option<u32> {
    Some(match key {
        Key::Enter => 0xff0d,
        Key::Backspace => 0xff08,
        Key::Tab => 0xff09,
        Key::Escape => 0xff1b,
        Key::Insert => 0xff63,
        Key::Delete => 0xffff,
        Key::Home => 0xff50,
        Key::ArrowLeft => 0xff51,
        Key::ArrowUp => 0xff52,
        Key::ArrowRight => 0xff53,
        Key::ArrowDown => 0xff54,
        Key::PageUp => 0xff55,
        Key::PageDown => 0xff56,
        Key::End => 0xff57,
        Key::F1 => 0xffbe,
        Key::F2 => 0xffbf,
        Key::F3 => 0xffc0,
        Key::F4 => 0xffc1,
        Key::F5 => 0xffc2,
        Key::F6 => 0xffc3,
        Key::F7 => 0xffc4,
        Key::F8 => 0xffc5,
        Key::F9 => 0xffc6,
        Key::F10 => 0xffc7,
        Key::F11 => 0xffc8,
        Key::F12 => 0xffc9,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(key: Key, pressed: bool, modifiers: egui::Modifiers) -> egui::Event {
        egui::Event::Key {
            key,
            physical_key: None,
            pressed,
            repeat: false,
            modifiers,
        }
    }

    #[test]
    fn keys_become_the_keysyms_a_vnc_display_takes() {
        assert_eq!(
            key_events(&egui::Event::Text("a".into())),
            vec![(0x61, true), (0x61, false)]
        );
        // Capitals and shifted symbols are typed with Shift.
        assert_eq!(
            key_events(&egui::Event::Text("A!".into())),
            vec![
                (SHIFT, true),
                (0x41, true),
                (0x41, false),
                (SHIFT, false),
                (SHIFT, true),
                (0x21, true),
                (0x21, false),
                (SHIFT, false)
            ]
        );
        assert_eq!(
            key_events(&egui::Event::Text("é€".into())),
            vec![
                (0xe9, true),
                (0xe9, false),
                (0x0100_20ac, true),
                (0x0100_20ac, false)
            ]
        );
        let none = egui::Modifiers::NONE;
        assert_eq!(
            key_events(&key(Key::Enter, true, none)),
            vec![(0xff0d, true)]
        );
        assert_eq!(
            key_events(&key(Key::Enter, false, none)),
            vec![(0xff0d, false)]
        );
        assert_eq!(key_events(&key(Key::F2, true, none)), vec![(0xffbf, true)]);
        // A plain letter's key event is its text's business.
        assert!(key_events(&key(Key::A, true, none)).is_empty());
        assert_eq!(
            key_events(&key(Key::D, true, egui::Modifiers::CTRL)),
            vec![
                (CONTROL, true),
                (0x64, true),
                (0x64, false),
                (CONTROL, false)
            ]
        );
        assert_eq!(
            key_events(&egui::Event::Copy),
            vec![
                (CONTROL, true),
                (0x63, true),
                (0x63, false),
                (CONTROL, false)
            ]
        );
    }
}

/// How often a thumbnail looks for a new picture.
const THUMBNAIL_POLL: Duration = Duration::from_secs(1);
/// A thumbnail's width at most, in points.
const THUMBNAIL_WIDTH: f32 = 240.0;

/// A small live picture of the selected VM's screen in its details, watching only. A VM
/// whose screen cannot be had (no display, or through `--connect`) is not asked again.
#[derive(Default)]
pub struct Thumbnail {
    /// The VM it follows, by its UUID (a VM made again under the same name is another).
    uuid: Option<String>,
    pending: Option<Answer<ScreenSession>>,
    live: Option<Live>,
    refused: std::collections::BTreeSet<String>,
}

impl std::fmt::Debug for Thumbnail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Thumbnail")
            .field("uuid", &self.uuid)
            .finish_non_exhaustive()
    }
}

impl Thumbnail {
    /// Whether the thumbnail of the VM with `uuid` is to be asked for.
    pub fn wants(&self, uuid: &str) -> bool {
        self.uuid.as_deref() != Some(uuid) && !self.refused.contains(uuid)
    }

    /// Starts following the VM `vm` (`HOST/NAME`) with `uuid`.
    pub fn watch(&mut self, uuid: String, vm: String, link: &EngineLink) {
        self.live = None;
        self.pending = Some(link.open_session(ops::ScreenVm {
            vm,
            read_only: true,
        }));
        self.uuid = Some(uuid);
    }

    /// Lets go of the picture (another selection, or the VM stopped).
    pub fn clear(&mut self) {
        self.uuid = None;
        self.pending = None;
        self.live = None;
    }

    /// The picture, as wide as the details allow up to [`THUMBNAIL_WIDTH`]; its response
    /// (a click opens the screen), once there is one.
    pub fn thumbnail_ui(&mut self, ui: &mut egui::Ui, uuid: &str) -> Option<egui::Response> {
        match take(&mut self.pending) {
            Some(Ok(mut session)) => match session.attach.take() {
                Some(attach) => {
                    self.live = Some(Live::new(attach, session.end.take(), false));
                }
                None => self.refused.extend(self.uuid.clone()),
            },
            Some(Err(_)) => self.refused.extend(self.uuid.clone()),
            None => {}
        }
        if self.pending.is_some() {
            ui.ctx().request_repaint_after(POLL);
        }
        if self.uuid.as_deref() != Some(uuid) {
            return None;
        }
        let live = self.live.as_mut()?;
        live.refresh(ui.ctx(), "vm-thumbnail");
        if !live.ended {
            ui.ctx().request_repaint_after(THUMBNAIL_POLL);
        }
        let texture = live.texture.as_ref()?;
        let [w, h] = live.size;
        let width = ui.available_width().min(THUMBNAIL_WIDTH);
        let size = egui::vec2(width, width * h as f32 / w.max(1) as f32);
        Some(
            ui.add(
                egui::Image::new((texture.id(), size))
                    .sense(Sense::click())
                    .alt_text("The VM's screen"),
            ),
        )
    }
}
