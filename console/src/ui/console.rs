//! A VM's serial console in the window: the engine's console of the VM, parsed as a VT100
//! terminal by the `vt100` crate and drawn here as a grid of monospace cells. Keys typed
//! while the terminal has focus go to the guest (if this window holds the keyboard); the
//! wheel scrolls back; Copy takes the screen's text and Paste types the clipboard's.

use std::time::Duration;

use bytes::Bytes;
use egui::{Color32, FontId, Key, Sense, Stroke, text::LayoutJob};
use tokio::sync::broadcast::error::TryRecvError;

use super::link::{Answer, EngineLink, take};
use crate::{
    api::{ops, views::ConsoleSession},
    engine::consoles::ConsoleAttach,
};

/// Lines kept above the screen for scrolling back.
const SCROLLBACK_LINES: usize = 2000;
const FONT_SIZE: f32 = 13.0;
/// How often the window looks for output while a console is open.
const POLL: Duration = Duration::from_millis(50);

/// A console being watched.
struct Live {
    attach: ConsoleAttach,
    /// Audits the session's end when the window lets go of it.
    _end: Option<crate::api::SessionEnd>,
    parser: vt100::Parser,
    /// The console ended (the VM stopped): what it last showed stays.
    ended: bool,
    /// Lines scrolled back from the live screen.
    scrolled: usize,
    /// The terminal takes the focus once, when the console opens, as virt-manager's does.
    focus_first: bool,
}

#[derive(Default)]
pub struct ConsoleWindow {
    open: bool,
    /// `HOST/NAME`.
    vm: String,
    pending: Option<Answer<ConsoleSession>>,
    live: Option<Live>,
    /// Why there is no console, or what this window may not do with it.
    note: Option<String>,
}

impl std::fmt::Debug for ConsoleWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleWindow")
            .field("vm", &self.vm)
            .field("open", &self.open)
            .finish_non_exhaustive()
    }
}

impl ConsoleWindow {
    /// Opens the console of `vm` (`HOST/NAME`): the engine attaches this window to it.
    pub fn open(&mut self, vm: String, link: &EngineLink) {
        *self = ConsoleWindow {
            open: true,
            pending: Some(link.open_session(ops::ConsoleVm {
                vm: vm.clone(),
                read_only: false,
            })),
            vm,
            live: None,
            note: None,
        };
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    pub fn close(&mut self) {
        // Dropping the session gives the keyboard back and leaves the console.
        *self = ConsoleWindow::default();
    }

    /// What the terminal shows now, one line a row (for tests and Copy).
    pub fn screen_text(&self) -> Option<String> {
        self.live.as_ref().map(|l| l.parser.screen().contents())
    }

    /// Takes the engine's answer and the console's new output.
    fn refresh(&mut self) {
        match take(&mut self.pending) {
            Some(Ok(mut session)) => match session.attach.take() {
                Some(attach) => {
                    let mut parser = vt100::Parser::new(24, 80, SCROLLBACK_LINES);
                    parser.process(&attach.backlog);
                    self.note = (!session.typing)
                        .then(|| "Watching only: another viewer types.".to_string());
                    self.live = Some(Live {
                        attach,
                        _end: session.end.take(),
                        parser,
                        ended: false,
                        scrolled: 0,
                        focus_first: true,
                    });
                }
                None => {
                    self.note = Some("The engine sent no console to attach to.".into());
                }
            },
            Some(Err(e)) => self.note = Some(e),
            None => {}
        }
        let Some(live) = &mut self.live else {
            return;
        };
        loop {
            match live.attach.output.try_recv() {
                Ok(bytes) => live.parser.process(&bytes),
                Err(TryRecvError::Lagged(_)) => {}
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Closed) => {
                    live.ended = true;
                    break;
                }
            }
        }
    }

    pub fn console_ui(&mut self, ctx: &egui::Context) {
        if !self.open {
            return;
        }
        self.refresh();
        if self.pending.is_some() || self.live.as_ref().is_some_and(|l| !l.ended) {
            ctx.request_repaint_after(POLL);
        }
        let mut open = true;
        let title = format!("Console: {}", self.vm);
        egui::Window::new(title)
            .open(&mut open)
            .default_size([720.0, 420.0])
            .min_size([320.0, 160.0])
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
                    (Some(_), _) => "Opening the console…",
                    (None, Some(note)) => note.as_str(),
                    (None, None) => "",
                });
                return;
            };
            if ui
                .button("Copy")
                .on_hover_text("The screen's text")
                .clicked()
            {
                ui.ctx().copy_text(live.parser.screen().contents());
            }
            let typing = live.attach.keyboard.is_some();
            let status = if live.ended {
                "The console closed: the VM stopped.".to_string()
            } else if typing {
                "Click the terminal, then type; Ctrl+V pastes, Ctrl+C interrupts.".to_string()
            } else {
                self.note.clone().unwrap_or_default()
            };
            ui.label(egui::RichText::new(status).weak());
        });
        let Some(live) = &mut self.live else {
            return;
        };
        terminal_ui(ui, live);
    }
}

/// The terminal: sized to the space it has, drawn cell by cell, with the keyboard when it has
/// focus.
fn terminal_ui(ui: &mut egui::Ui, live: &mut Live) {
    let font = FontId::monospace(FONT_SIZE);
    let (cell_w, cell_h) = ui.fonts_mut(|f| (f.glyph_width(&font, 'M'), f.row_height(&font)));
    let space = ui.available_size();
    let cols = ((space.x / cell_w).floor() as u16).clamp(20, 400);
    let rows = ((space.y / cell_h).floor() as u16).clamp(4, 200);
    if live.parser.screen().size() != (rows, cols) {
        live.parser.screen_mut().set_size(rows, cols);
    }
    let size = egui::vec2(f32::from(cols) * cell_w, f32::from(rows) * cell_h);
    let (rect, response) = ui.allocate_exact_size(size, Sense::click());
    let response = response.on_hover_cursor(egui::CursorIcon::Text);
    if response.clicked() || std::mem::take(&mut live.focus_first) {
        response.request_focus();
    }
    let focused = response.has_focus();
    if focused {
        // Tab, arrows and Escape belong to the guest while the terminal has focus.
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
        let mut typed = Vec::new();
        for event in &events {
            if let Some(bytes) = key_bytes(event) {
                typed.extend_from_slice(&bytes);
            }
        }
        if !typed.is_empty()
            && let Some(keyboard) = &live.attach.keyboard
        {
            live.scrolled = 0;
            live.parser.screen_mut().set_scrollback(0);
            // A full queue drops keys rather than stall the window.
            let _ = keyboard.try_send(Bytes::from(typed));
        }
    }
    if response.hovered() {
        let lines = ui.input(|i| i.smooth_scroll_delta.y / cell_h).round() as i64;
        if lines != 0 {
            live.scrolled = (live.scrolled as i64 + lines).max(0) as usize;
            live.parser.screen_mut().set_scrollback(live.scrolled);
            live.scrolled = live.parser.screen().scrollback();
        }
    }
    let painter = ui.painter_at(rect);
    painter.rect_filled(rect, 2.0, Color32::from_gray(12));
    let screen = live.parser.screen();
    for row in 0..rows {
        let mut job = LayoutJob::default();
        for col in 0..cols {
            let Some(cell) = screen.cell(row, col) else {
                continue;
            };
            if cell.is_wide_continuation() {
                continue;
            }
            let text = if cell.has_contents() {
                cell.contents()
            } else {
                " "
            };
            let (mut fg, mut bg) = (color(cell.fgcolor(), true), color(cell.bgcolor(), false));
            if cell.inverse() {
                std::mem::swap(&mut fg, &mut bg);
                if bg == Color32::TRANSPARENT {
                    bg = Color32::from_gray(200);
                }
            }
            job.append(
                text,
                0.0,
                egui::TextFormat {
                    font_id: font.clone(),
                    color: fg,
                    background: bg,
                    ..Default::default()
                },
            );
        }
        let galley = ui.fonts_mut(|f| f.layout_job(job));
        let at = rect.min + egui::vec2(0.0, f32::from(row) * cell_h);
        painter.galley(at, galley, Color32::WHITE);
    }
    if live.scrolled == 0 && !screen.hide_cursor() {
        let (row, col) = screen.cursor_position();
        let cursor = egui::Rect::from_min_size(
            rect.min + egui::vec2(f32::from(col) * cell_w, f32::from(row) * cell_h),
            egui::vec2(cell_w, cell_h),
        );
        if focused {
            painter.rect_filled(cursor, 0.0, Color32::from_white_alpha(110));
        } else {
            painter.rect_stroke(
                cursor,
                0.0,
                Stroke::new(1.0, Color32::from_gray(160)),
                egui::StrokeKind::Inside,
            );
        }
    }
    if focused {
        painter.rect_stroke(
            rect,
            2.0,
            Stroke::new(1.0, ui.visuals().selection.stroke.color),
            egui::StrokeKind::Inside,
        );
    }
}

/// The 16 colours of a VT100 palette as xterm draws them.
const PALETTE: [(u8, u8, u8); 16] = [
    (0, 0, 0),
    (205, 49, 49),
    (13, 188, 121),
    (229, 229, 16),
    (36, 114, 200),
    (188, 63, 188),
    (17, 168, 205),
    (229, 229, 229),
    (102, 102, 102),
    (241, 76, 76),
    (35, 209, 139),
    (245, 245, 67),
    (59, 142, 234),
    (214, 112, 214),
    (41, 184, 219),
    (255, 255, 255),
];

/// A cell's colour: the terminal's default (light text on no background), one of the 256
/// indexed colours, or a true colour.
fn color(c: vt100::Color, foreground: bool) -> Color32 {
    match c {
        vt100::Color::Default if foreground => Color32::from_gray(220),
        vt100::Color::Default => Color32::TRANSPARENT,
        vt100::Color::Idx(i) if usize::from(i) < PALETTE.len() => {
            let (r, g, b) = PALETTE[usize::from(i)];
            Color32::from_rgb(r, g, b)
        }
        // The 6×6×6 cube, then 24 greys.
        vt100::Color::Idx(i) if i < 232 => {
            let i = i - 16;
            let level = |v: u8| if v == 0 { 0 } else { 55 + v * 40 };
            Color32::from_rgb(level(i / 36), level(i / 6 % 6), level(i % 6))
        }
        vt100::Color::Idx(i) => Color32::from_gray(8 + (i - 232) * 10),
        vt100::Color::Rgb(r, g, b) => Color32::from_rgb(r, g, b),
    }
}

/// The bytes a terminal sends for a key or text event: text as it is, Enter as CR, the
/// arrows and editing keys as VT100 sequences, Ctrl+letter as its control code.
pub fn key_bytes(event: &egui::Event) -> Option<Vec<u8>> {
    match event {
        egui::Event::Text(text) => Some(text.as_bytes().to_vec()),
        // The window turns Ctrl+C and Ctrl+X into copy and cut; a terminal sends them on.
        egui::Event::Copy => Some(vec![0x03]),
        egui::Event::Cut => Some(vec![0x18]),
        // A pasted newline is Enter, as a terminal types it.
        egui::Event::Paste(text) => {
            Some(text.replace("\r\n", "\r").replace('\n', "\r").into_bytes())
        }
        egui::Event::Key {
            key,
            pressed: true,
            modifiers,
            ..
        } => {
            if modifiers.ctrl && !modifiers.shift {
                let name = key.name();
                if name.len() == 1 && name.as_bytes()[0].is_ascii_uppercase() {
                    return Some(vec![name.as_bytes()[0] - b'A' + 1]);
                }
            }
            let bytes: &[u8] = match key {
                Key::Enter => b"\r",
                Key::Backspace => b"\x7f",
                Key::Tab => b"\t",
                Key::Escape => b"\x1b",
                Key::ArrowUp => b"\x1b[A",
                Key::ArrowDown => b"\x1b[B",
                Key::ArrowRight => b"\x1b[C",
                Key::ArrowLeft => b"\x1b[D",
                Key::Home => b"\x1b[H",
                Key::End => b"\x1b[F",
                Key::Delete => b"\x1b[3~",
                Key::PageUp => b"\x1b[5~",
                Key::PageDown => b"\x1b[6~",
                _ => return None,
            };
            Some(bytes.to_vec())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(key: Key, modifiers: egui::Modifiers) -> egui::Event {
        egui::Event::Key {
            key,
            physical_key: None,
            pressed: true,
            repeat: false,
            modifiers,
        }
    }

    #[test]
    fn keys_become_what_a_vt100_sends() {
        let none = egui::Modifiers::NONE;
        assert_eq!(
            key_bytes(&egui::Event::Text("ls -l".into())),
            Some(b"ls -l".to_vec())
        );
        assert_eq!(key_bytes(&key(Key::Enter, none)), Some(b"\r".to_vec()));
        assert_eq!(key_bytes(&key(Key::Backspace, none)), Some(vec![0x7f]));
        assert_eq!(
            key_bytes(&key(Key::ArrowUp, none)),
            Some(b"\x1b[A".to_vec())
        );
        assert_eq!(
            key_bytes(&key(Key::C, egui::Modifiers::CTRL)),
            Some(vec![3])
        );
        assert_eq!(
            key_bytes(&key(Key::D, egui::Modifiers::CTRL)),
            Some(vec![4])
        );
        assert_eq!(key_bytes(&key(Key::F5, none)), None);
        assert_eq!(key_bytes(&egui::Event::Copy), Some(vec![3]));
        assert_eq!(
            key_bytes(&egui::Event::Paste("a\nb\r\nc".into())),
            Some(b"a\rb\rc".to_vec())
        );
        let released = egui::Event::Key {
            key: Key::Enter,
            physical_key: None,
            pressed: false,
            repeat: false,
            modifiers: none,
        };
        assert_eq!(key_bytes(&released), None);
    }

    #[test]
    fn a_guests_output_is_drawn_as_a_terminal_shows_it() {
        let mut parser = vt100::Parser::new(4, 20, 10);
        parser.process(b"login: \x1b[31mred\x1b[m\r\nline two\r\n\x1b[2J\x1b[Hcleared");
        assert_eq!(parser.screen().contents(), "cleared");
        assert_eq!(
            color(vt100::Color::Idx(1), true),
            Color32::from_rgb(205, 49, 49)
        );
        assert_eq!(color(vt100::Color::Default, false), Color32::TRANSPARENT);
        assert_eq!(
            color(vt100::Color::Idx(231), true),
            Color32::from_rgb(255, 255, 255)
        );
    }
}
