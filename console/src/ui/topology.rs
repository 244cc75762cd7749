//! The topology: sites as regions (a remote site dashed, like the seed's dotted line), hosts
//! as cards with capacity bars and runtime badges, VMs as chips coloured by state.
//! Only what is inside the viewport is painted, so thousands of hosts stay cheap.

use std::collections::BTreeMap;

use dunes_shared::model::{HostId, RuntimeKind, ServiceName, VmName};
use egui::{
    Align2, Color32, CornerRadius, FontId, Pos2, Rect, Role, Sense, Shape, Stroke, StrokeKind,
    WidgetInfo, pos2, vec2,
};

use super::{Actions, Selection, UiAction, VmDrag, link_color, service_tag_color, state_color};

/// The service each instance belongs to, by host and VM name.
/// Each service instance's VM: its service, and the applications inside it.
type Tags<'a> = BTreeMap<(HostId, VmName), (&'a ServiceName, &'a [GuestAppView])>;
use crate::engine::{
    HostView, LinkState, Snapshot,
    services::guest_apps::{GuestAppState, GuestAppView},
};

const CARD_W: f32 = 236.0;
const CARD_BASE_H: f32 = 112.0;
const CHIP_H: f32 = 20.0;
const CHIP_GAP: f32 = 4.0;
/// A chip's name at 11.5 points: a generous width per character, so that a name is not cut
/// (the layout runs for every host each frame, without shaping text).
const CHIP_CHAR_W: f32 = 6.6;
const CHIP_MIN_W: f32 = 64.0;
/// One line per migration under way to or from the host.
const MIGRATION_LINE_H: f32 = 28.0;
const GAP: f32 = 12.0;
const SITE_PAD: f32 = 12.0;
const SITE_HEADER: f32 = 28.0;

const FILTER: egui::KeyboardShortcut =
    egui::KeyboardShortcut::new(egui::Modifiers::COMMAND, egui::Key::F);

#[derive(Debug, Default)]
pub struct TopologyPanel {
    filter: String,
}

/// The filter as typed, matched without regard to case.
struct Filter(String);

impl Filter {
    fn new(text: &str) -> Self {
        Filter(text.trim().to_lowercase())
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn matches(&self, text: &str) -> bool {
        self.0.is_empty() || text.to_lowercase().contains(&self.0)
    }

    /// Whether the host shows at all: by its name, its site or one of its VMs.
    fn shows(&self, host: &HostView) -> bool {
        self.matches_host(host) || host.vms.iter().any(|v| self.matches(v.name.as_str()))
    }

    /// Whether the host itself matches (then every chip on it counts as matching).
    fn matches_host(&self, host: &HostView) -> bool {
        self.matches(host.id().as_str()) || self.matches(host.site_name())
    }
}

/// What sits on a chip besides its name, in points: the service stripe, the process badge
/// and a dot per application inside.
fn chip_extras_w(vm: &dunes_shared::model::VmStatus, guests: usize, tagged: bool) -> f32 {
    let mut w = 12.0 + guests as f32 * 10.0;
    if tagged {
        w += 4.0;
    }
    if vm.runtime == RuntimeKind::Process {
        w += 37.0;
    }
    w
}

/// Chips flow left to right and wrap, each as wide as its name and badges (never wider than
/// the card): the rectangles relative to the first chip's top left corner.
fn chip_rects(widths: impl Iterator<Item = f32>, inner_w: f32) -> Vec<Rect> {
    let (mut x, mut y) = (0.0, 0.0);
    let mut out = Vec::new();
    for w in widths {
        let w = w.clamp(CHIP_MIN_W, inner_w);
        if x > 0.0 && x + w > inner_w {
            x = 0.0;
            y += CHIP_H + CHIP_GAP;
        }
        out.push(Rect::from_min_size(pos2(x, y), vec2(w, CHIP_H)));
        x += w + CHIP_GAP;
    }
    out
}

/// The chips of a host, laid out for its card.
fn host_chips(host: &HostView, tags: &Tags<'_>, inner_w: f32) -> Vec<Rect> {
    chip_rects(
        host.vms.iter().map(|vm| {
            let tag = tags.get(&(host.id().clone(), vm.name.clone()));
            let guests = tag.map_or(0, |(_, g)| g.len());
            vm.name.as_str().chars().count() as f32 * CHIP_CHAR_W
                + chip_extras_w(vm, guests, tag.is_some())
        }),
        inner_w,
    )
}

/// Migrations under way to or from a host.
fn open_migrations<'a>(
    snapshot: &'a Snapshot,
    host: &'a HostId,
) -> impl Iterator<Item = &'a crate::engine::migration::MigrationJournal> + 'a {
    snapshot
        .migrations
        .iter()
        .filter(move |m| !m.step.is_finished() && (&m.from == host || &m.to == host))
}

fn card_height(chips: &[Rect], migrations: usize) -> f32 {
    let rows_h = chips
        .last()
        .map_or(CHIP_H + CHIP_GAP, |r| r.bottom() + CHIP_GAP);
    CARD_BASE_H + rows_h + migrations as f32 * MIGRATION_LINE_H
}

struct SiteBox {
    rect: Rect,
    name: String,
    remote: bool,
    link: Option<(u32, u32)>,
    cards: Vec<(usize, Rect)>,
}

impl TopologyPanel {
    /// Lays out sites and cards from the top-left corner, for a given width.
    fn layout(&self, snapshot: &Snapshot, tags: &Tags<'_>, width: f32) -> (Vec<SiteBox>, f32) {
        let filter = Filter::new(&self.filter);
        let mut groups: Vec<(bool, &str, Vec<usize>)> = Vec::new();
        for (i, host) in snapshot.hosts.iter().enumerate() {
            if !filter.shows(host) {
                continue;
            }
            match groups.iter_mut().find(|g| g.1 == host.site_name()) {
                Some(g) => g.2.push(i),
                None => groups.push((host.is_remote(), host.site_name(), vec![i])),
            }
        }
        // Local sites first, remote ones after, as in the seed's figure.
        groups.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        // Cards share the width: as many columns as fit, each card stretched to fill the row,
        // and one card at full width where even one does not fit.
        let room = (width - 2.0 * SITE_PAD).max(120.0);
        let per_row = (((room + GAP) / (CARD_W + GAP)).floor() as usize).max(1);
        let card_w = ((room + GAP) / per_row as f32 - GAP).min(CARD_W * 1.6);
        let height_of = |i: usize| {
            let host = &snapshot.hosts[i];
            let chips = host_chips(host, tags, card_w - 16.0);
            card_height(&chips, open_migrations(snapshot, host.id()).count())
        };
        let mut y = 0.0;
        let mut sites = Vec::new();
        for (remote, name, members) in groups {
            let top = y;
            let mut cards = Vec::new();
            let mut row_y = top + SITE_HEADER;
            for row in members.chunks(per_row) {
                let heights: Vec<f32> = row.iter().map(|&i| height_of(i)).collect();
                let row_h = heights.iter().copied().fold(0.0, f32::max);
                for (col, (&i, h)) in row.iter().zip(heights).enumerate() {
                    let min = pos2(SITE_PAD + col as f32 * (card_w + GAP), row_y);
                    cards.push((i, Rect::from_min_size(min, vec2(card_w, h))));
                }
                row_y += row_h + GAP;
            }
            let used_w =
                (members.len().min(per_row) as f32) * (card_w + GAP) - GAP + 2.0 * SITE_PAD;
            let rect = Rect::from_min_max(
                pos2(0.0, top),
                pos2(used_w.max(card_w + 2.0 * SITE_PAD), row_y),
            );
            let link = snapshot.hosts[members[0]]
                .inventory()
                .map(|i| (i.site.link_bandwidth_mbps, i.site.link_latency_ms));
            sites.push(SiteBox {
                rect,
                name: name.to_string(),
                remote,
                link,
                cards,
            });
            y = row_y + GAP;
        }
        (sites, y)
    }

    /// Draws the topology. A VM chip can be dragged onto a service (in the services panel).
    pub fn topology_ui(
        &mut self,
        ui: &mut egui::Ui,
        snapshot: &Snapshot,
        selection: &Selection,
        actions: &mut Actions<'_>,
    ) {
        ui.horizontal(|ui| {
            let label = ui.label("Filter");
            let field = ui
                .add(
                    egui::TextEdit::singleline(&mut self.filter)
                        .hint_text("hosts, sites or VMs (Ctrl+F)")
                        .desired_width(240.0),
                )
                .labelled_by(label.id);
            if ui.input_mut(|i| i.consume_shortcut(&FILTER)) {
                field.request_focus();
            }
            if !self.filter.is_empty() && ui.button("Clear").clicked() {
                self.filter.clear();
            }
        });
        if snapshot.hosts.is_empty() {
            ui.add_space(40.0);
            ui.vertical_centered(|ui| {
                ui.label("No hosts yet. Use \"Add host…\" with the address and join token an agent printed.");
            });
            return;
        }
        let tags: Tags = snapshot
            .services
            .iter()
            .flat_map(|s| {
                s.instances.iter().map(|i| {
                    (
                        (i.record.host.clone(), i.record.vm.clone()),
                        (s.name(), i.guest_apps.as_slice()),
                    )
                })
            })
            .collect();
        let width = ui.available_width();
        let (sites, height) = self.layout(snapshot, &tags, width);
        let filter = Filter::new(&self.filter);
        egui::ScrollArea::vertical()
            .auto_shrink([false; 2])
            .show_viewport(ui, |ui, viewport| {
                let (area, _) = ui.allocate_exact_size(vec2(width, height), Sense::hover());
                let origin = area.min.to_vec2();
                let visible = viewport.translate(origin).expand(8.0);
                for site in &sites {
                    let rect = site.rect.translate(origin);
                    if rect.intersects(visible) {
                        paint_site(ui, site, rect);
                    }
                    for &(i, card) in &site.cards {
                        let card = card.translate(origin);
                        if card.intersects(visible) {
                            let host = &snapshot.hosts[i];
                            let online = host.link == LinkState::Online;
                            let shown = Card {
                                host,
                                snapshot,
                                selection,
                                tags: &tags,
                                filter: &filter,
                                online,
                                text: if online {
                                    ui.visuals().text_color()
                                } else {
                                    ui.visuals().weak_text_color()
                                },
                            };
                            host_card(ui, &shown, card, actions);
                        }
                    }
                }
            });
        // The chip being dragged follows the pointer.
        if let (Some(drag), Some(pos)) = (
            egui::DragAndDrop::payload::<VmDrag>(ui.ctx()),
            ui.ctx().pointer_latest_pos(),
        ) {
            let painter = ui.ctx().layer_painter(egui::LayerId::new(
                egui::Order::Tooltip,
                egui::Id::unique("dragged-chip"),
            ));
            let galley = painter.layout_no_wrap(
                format!("{} from {}", drag.vm, drag.host),
                FontId::proportional(12.0),
                Color32::WHITE,
            );
            let rect = Rect::from_min_size(pos + vec2(12.0, 8.0), galley.size() + vec2(12.0, 6.0));
            painter.rect_filled(rect, CornerRadius::same(4), Color32::from_rgb(31, 111, 235));
            painter.galley(rect.min + vec2(6.0, 3.0), galley, Color32::WHITE);
        }
    }
}

fn paint_site(ui: &egui::Ui, site: &SiteBox, rect: Rect) {
    let painter = ui.painter();
    let visuals = ui.visuals();
    let text = visuals.text_color();
    if site.remote {
        painter.rect_filled(
            rect,
            CornerRadius::same(8),
            visuals.faint_bg_color.gamma_multiply(0.6),
        );
        let c = [
            rect.left_top(),
            rect.right_top(),
            rect.right_bottom(),
            rect.left_bottom(),
            rect.left_top(),
        ];
        painter.extend(Shape::dashed_line(
            &c,
            Stroke::new(1.5, Color32::from_rgb(88, 166, 255)),
            8.0,
            5.0,
        ));
    } else {
        painter.rect(
            rect,
            CornerRadius::same(8),
            visuals.faint_bg_color,
            Stroke::new(1.0, visuals.widgets.noninteractive.bg_stroke.color),
            StrokeKind::Inside,
        );
    }
    let mut title = format!("site {}", site.name);
    if site.remote {
        title.push_str(" · remote");
    }
    if let Some((bandwidth, latency)) = site.link {
        title.push_str(&format!(" · link {bandwidth} Mbit/s, {latency} ms"));
    }
    painter.text(
        rect.left_top() + vec2(SITE_PAD, 8.0),
        Align2::LEFT_TOP,
        title,
        FontId::proportional(13.0),
        text,
    );
}

fn bar(
    painter: &egui::Painter,
    rect: Rect,
    label: &str,
    fraction: f32,
    detail: String,
    text: Color32,
) {
    let label_w = 38.0;
    painter.text(
        rect.left_center(),
        Align2::LEFT_CENTER,
        label,
        FontId::monospace(10.0),
        text,
    );
    let track = Rect::from_min_max(
        pos2(rect.left() + label_w, rect.top() + 3.0),
        pos2(rect.right() - 78.0, rect.bottom() - 3.0),
    );
    painter.rect_filled(track, CornerRadius::same(3), Color32::from_gray(60));
    let f = fraction.clamp(0.0, 1.0);
    let color = if f > 0.9 {
        Color32::from_rgb(218, 54, 51)
    } else if f > 0.7 {
        Color32::from_rgb(210, 153, 34)
    } else {
        Color32::from_rgb(56, 139, 253)
    };
    let filled = Rect::from_min_max(
        track.min,
        pos2(track.left() + track.width() * f, track.bottom()),
    );
    painter.rect_filled(filled, CornerRadius::same(3), color);
    painter.text(
        rect.right_center(),
        Align2::RIGHT_CENTER,
        detail,
        FontId::monospace(10.0),
        text,
    );
}

fn badge(painter: &egui::Painter, at: Pos2, text: &str, color: Color32) -> f32 {
    let galley =
        painter.layout_no_wrap(text.to_string(), FontId::proportional(10.5), Color32::WHITE);
    let rect = Rect::from_min_size(at, galley.size() + vec2(10.0, 4.0));
    painter.rect_filled(rect, CornerRadius::same(4), color);
    painter.galley(rect.min + vec2(5.0, 2.0), galley, Color32::WHITE);
    rect.width() + 4.0
}

/// One host card with its VM chips, each tagged with its service's colour.
/// What every part of a host card reads.
struct Card<'a, 'b> {
    host: &'a HostView,
    snapshot: &'a Snapshot,
    selection: &'a Selection,
    tags: &'a Tags<'b>,
    filter: &'a Filter,
    online: bool,
    /// The colour of the card's text: dimmer while the host is not online.
    text: Color32,
}

/// A host's card: its frame, its header, its resources, its VMs' chips and the migrations
/// under way.
fn host_card(ui: &mut egui::Ui, card: &Card<'_, '_>, rect: Rect, actions: &mut Actions<'_>) {
    let (host, snapshot, tags) = (card.host, card.snapshot, card.tags);
    let painter = ui.painter().clone();
    card_frame(ui, &painter, card, rect, actions);
    let inner = rect.shrink(8.0);
    card_header(&painter, card, inner);
    card_resources(&painter, card, inner);
    let chips_top = rect.top() + CARD_BASE_H - 6.0;
    let chip_rects = host_chips(host, tags, inner.width());
    let chips_bottom = chip_rects
        .last()
        .map_or(chips_top, |r| chips_top + r.bottom());
    migration_lines(
        &painter,
        snapshot,
        host,
        pos2(inner.left(), chips_bottom + 6.0),
        inner.width(),
        card.text,
    );
    for (vm, chip) in host.vms.iter().zip(chip_rects) {
        vm_chip(
            ui,
            &painter,
            card,
            vm,
            chip.translate(vec2(inner.left(), chips_top)),
            actions,
        );
    }
}

/// The card itself: a click selects the host, a VM chip dragged over it shows the
/// pre-check's verdict, and one dropped asks to confirm the migration.
fn card_frame(
    ui: &mut egui::Ui,
    painter: &egui::Painter,
    card: &Card<'_, '_>,
    rect: Rect,
    actions: &mut Actions<'_>,
) {
    let host = card.host;
    let id = ui.scope_id().with(("host-card", host.id().as_str()));
    let response = ui.interact(rect, id, Sense::click());
    let label = host.id().to_string();
    response.widget_info(|| WidgetInfo::labeled(Role::Button, true, &label));
    if response.clicked() {
        actions.push(UiAction::Select(Selection::Host(host.id().clone())));
    }
    let dragged = response
        .dnd_hover_payload::<VmDrag>()
        .filter(|d| &d.host != host.id());
    let verdict = dragged.as_ref().and_then(|drag| {
        let from = card.snapshot.host(&drag.host)?;
        let vm = from.vm(&drag.vm)?;
        Some(crate::engine::migration::precheck(
            vm,
            from,
            host,
            &card.snapshot.services,
            &card.snapshot.migrations,
        ))
    });
    if let Some(drag) = response.dnd_release_payload::<VmDrag>()
        && &drag.host != host.id()
    {
        actions.push(UiAction::ConfirmMigrate {
            host: drag.host.clone(),
            vm: drag.vm.clone(),
            to: host.id().clone(),
        });
    }
    let selected = matches!(card.selection, Selection::Host(h) if h == host.id());
    let visuals = ui.visuals();
    let fill = if card.online {
        visuals.extreme_bg_color
    } else {
        visuals.extreme_bg_color.gamma_multiply(0.6)
    };
    let stroke = match &verdict {
        Some(Ok(_)) => Stroke::new(3.0, Color32::from_rgb(63, 185, 80)),
        Some(Err(_)) => Stroke::new(3.0, Color32::from_rgb(248, 81, 73)),
        None if selected => Stroke::new(2.0, visuals.selection.stroke.color),
        None if response.hovered() => Stroke::new(1.0, visuals.widgets.hovered.bg_stroke.color),
        None => Stroke::new(1.0, visuals.widgets.noninteractive.bg_stroke.color),
    };
    painter.rect(
        rect,
        CornerRadius::same(6),
        fill,
        stroke,
        StrokeKind::Inside,
    );
    if let Some(verdict) = &verdict {
        drag_verdict(ui, rect, verdict);
    }
}

/// The pre-check's verdict on a card a VM chip is dragged over: above the chips and the
/// other cards, on a layer of its own, wrapped to the card.
fn drag_verdict(
    ui: &egui::Ui,
    rect: Rect,
    verdict: &Result<crate::engine::migration::MigrationEstimate, Vec<String>>,
) {
    let text = match verdict {
        Ok(estimate) => format!(
            "migrate here: {}, about {:.0} s",
            super::human_bytes(estimate.bytes),
            estimate.seconds.ceil()
        ),
        Err(reasons) => reasons.first().cloned().unwrap_or_default(),
    };
    let top = ui.ctx().layer_painter(egui::LayerId::new(
        egui::Order::Tooltip,
        egui::Id::unique("migration-verdict"),
    ));
    let galley = top.layout(
        text,
        FontId::proportional(12.0),
        Color32::WHITE,
        rect.width() - 20.0,
    );
    let size = galley.size() + vec2(12.0, 8.0);
    let boxed = Rect::from_min_size(
        pos2(rect.center().x - size.x / 2.0, rect.bottom() - size.y - 6.0),
        size,
    );
    let fill = if verdict.is_ok() {
        Color32::from_rgb(26, 127, 55)
    } else {
        Color32::from_rgb(176, 36, 36)
    };
    top.rect_filled(boxed, CornerRadius::same(4), fill);
    top.galley(boxed.min + vec2(6.0, 4.0), galley, Color32::WHITE);
}

/// The host's link dot and name, and its state on the right: the link's, or its
/// maintenance with its drain's progress.
fn card_header(painter: &egui::Painter, card: &Card<'_, '_>, inner: Rect) {
    let host = card.host;
    painter.circle_filled(
        inner.left_top() + vec2(5.0, 8.0),
        5.0,
        link_color(host.link),
    );
    painter.text(
        inner.left_top() + vec2(16.0, 0.0),
        Align2::LEFT_TOP,
        host.id().as_str(),
        FontId::proportional(15.0),
        card.text,
    );
    let (state, shown_color) = match (host.record.maintenance, card.snapshot.drain(host.id())) {
        (Some(m), Some(d)) if !m.paused && !d.is_settled() => (
            format!("draining {}/{}", d.moved, d.moved + d.remaining),
            Color32::from_rgb(230, 180, 60),
        ),
        (Some(_), _) => ("maintenance".to_string(), Color32::from_rgb(230, 180, 60)),
        (None, _) => (host.link.as_str().to_string(), link_color(host.link)),
    };
    painter.text(
        inner.right_top(),
        Align2::RIGHT_TOP,
        state,
        FontId::proportional(11.0),
        shown_color,
    );
}

/// The host's runtimes, security level and price as badges, then its CPU, memory and disk
/// in use as bars; or why they are not known yet.
fn card_resources(painter: &egui::Painter, card: &Card<'_, '_>, inner: Rect) {
    let host = card.host;
    let badge_y = inner.top() + 21.0;
    let Some(inv) = host.inventory() else {
        painter.text(
            pos2(inner.left(), badge_y),
            Align2::LEFT_TOP,
            host.link_error
                .as_deref()
                .unwrap_or("waiting for the agent's inventory"),
            FontId::proportional(11.0),
            card.text,
        );
        return;
    };
    let mut x = inner.left();
    for runtime in &inv.runtimes {
        x += badge(
            painter,
            pos2(x, badge_y),
            runtime.kind.as_str(),
            Color32::from_rgb(31, 111, 235),
        );
    }
    x += badge(
        painter,
        pos2(x, badge_y),
        &format!("security {}", inv.security_level),
        Color32::from_rgb(110, 64, 201),
    );
    badge(
        painter,
        pos2(x, badge_y),
        &format!("{:.3}/CPU-h", inv.prices.per_cpu_hour),
        Color32::from_rgb(87, 96, 106),
    );
    let active: Vec<_> = host.vms.iter().filter(|v| v.state.is_active()).collect();
    // Agents report these; a wild value must not overflow the UI thread.
    let vcpus = active.iter().fold(0u32, |n, v| n.saturating_add(v.vcpus));
    let mem = active
        .iter()
        .fold(0u64, |n, v| n.saturating_add(v.memory_mib));
    let used_storage = inv.storage_total_mib.saturating_sub(
        host.status
            .map_or(inv.storage_free_mib, |s| s.storage_free_mib),
    );
    let row = |n: f32| {
        Rect::from_min_size(
            pos2(inner.left(), inner.top() + 42.0 + n * 15.0),
            vec2(inner.width(), 14.0),
        )
    };
    bar(
        painter,
        row(0.0),
        "CPU",
        vcpus as f32 / inv.cpus.max(1) as f32,
        format!("{vcpus}/{} vCPU", inv.cpus),
        card.text,
    );
    bar(
        painter,
        row(1.0),
        "MEM",
        mem as f32 / inv.memory_mib.max(1) as f32,
        format!(
            "{:.1}/{:.0} GiB",
            mem as f32 / 1024.0,
            inv.memory_mib as f32 / 1024.0
        ),
        card.text,
    );
    bar(
        painter,
        row(2.0),
        "DISK",
        used_storage as f32 / inv.storage_total_mib.max(1) as f32,
        format!(
            "{:.0}/{:.0} GiB",
            used_storage as f32 / 1024.0,
            inv.storage_total_mib as f32 / 1024.0
        ),
        card.text,
    );
}

/// One VM's chip: coloured by state, dragged to migrate, clicked to select, its context
/// menu the VM's actions.
fn vm_chip(
    ui: &mut egui::Ui,
    painter: &egui::Painter,
    card: &Card<'_, '_>,
    vm: &dunes_shared::model::VmStatus,
    chip: Rect,
    actions: &mut Actions<'_>,
) {
    let host = card.host;
    // With a filter, the chips it matches stand out and the others fade.
    let host_matches = card.filter.is_empty() || card.filter.matches_host(host);
    let dimmed = !host_matches && !card.filter.matches(vm.name.as_str());
    let highlighted = !card.filter.is_empty() && !dimmed;
    let chip_id = ui
        .scope_id()
        .with(("vm-chip", host.id().as_str(), vm.name.as_str()));
    let chip_response = ui.interact(chip, chip_id, Sense::click_and_drag());
    chip_response.dnd_set_drag_payload(VmDrag {
        host: host.id().clone(),
        vm: vm.name.clone(),
    });
    let name = vm.name.to_string();
    let selected_vm =
        matches!(card.selection, Selection::Vm(h, v) if h == host.id() && v == &vm.name);
    chip_response.widget_info(|| WidgetInfo::selected(Role::Button, true, selected_vm, &name));
    if chip_response.clicked() {
        actions.push(UiAction::Select(Selection::Vm(
            host.id().clone(),
            vm.name.clone(),
        )));
    }
    let mut color = state_color(vm.state);
    if !card.online {
        color = color.gamma_multiply(0.45);
    }
    if dimmed {
        color = color.gamma_multiply(0.3);
    }
    painter.rect_filled(chip, CornerRadius::same(4), color);
    let tag = card.tags.get(&(host.id().clone(), vm.name.clone()));
    let service = tag.map(|(s, _)| *s);
    let guests = tag.map_or(&[][..], |(_, g)| *g);
    // A migration under way shows on the chip: its transfer's progress along the bottom.
    let migrating = card.snapshot.migrations.iter().find(|m| {
        !m.step.is_finished() && m.vm == vm.name && (&m.from == host.id() || &m.to == host.id())
    });
    let (text_left, text_right) = chip_marks(painter, chip, vm, service, guests, migrating);
    if selected_vm || chip_response.hovered() {
        painter.rect_stroke(
            chip,
            CornerRadius::same(4),
            Stroke::new(2.0, Color32::WHITE),
            StrokeKind::Inside,
        );
    } else if highlighted {
        painter.rect_stroke(
            chip,
            CornerRadius::same(4),
            Stroke::new(2.0, Color32::from_rgb(255, 214, 102)),
            StrokeKind::Outside,
        );
    }
    painter.text(
        pos2(text_left, chip.center().y),
        Align2::LEFT_CENTER,
        elide(&name, text_right - text_left),
        FontId::proportional(11.5),
        if dimmed {
            Color32::from_gray(150)
        } else {
            Color32::WHITE
        },
    );
    chip_response
        .on_hover_text(chip_hover_text(vm, service, guests, migrating))
        .context_menu(|ui| {
            let what = if vm.runtime == RuntimeKind::Process {
                "Process"
            } else {
                "VM"
            };
            ui.label(format!("{what} {} on {}", vm.name, host.id()));
            ui.separator();
            super::vm_actions::vm_actions_ui(ui, card.snapshot, host, vm, actions, |ui| ui.close());
        });
}

/// What a chip carries beside its name: its service's stripe on the left, a `proc` badge
/// and a dot per application inside on the right, a migration's progress along the
/// bottom. Answers where the name may go, from left to right.
fn chip_marks(
    painter: &egui::Painter,
    chip: Rect,
    vm: &dunes_shared::model::VmStatus,
    service: Option<&ServiceName>,
    guests: &[GuestAppView],
    migrating: Option<&crate::engine::migration::MigrationJournal>,
) -> (f32, f32) {
    let mut text_left = chip.left() + 6.0;
    if let Some(service) = service {
        let stripe = Rect::from_min_size(chip.min, vec2(5.0, chip.height()));
        painter.rect_filled(stripe, CornerRadius::same(2), service_tag_color(service));
        text_left += 4.0;
    }
    let mut text_right = chip.right() - 6.0;
    if vm.runtime == RuntimeKind::Process {
        let badge_rect = Rect::from_min_size(
            pos2(chip.right() - 34.0, chip.top() + 3.0),
            vec2(30.0, chip.height() - 6.0),
        );
        painter.rect_filled(
            badge_rect,
            CornerRadius::same(3),
            Color32::from_rgb(40, 44, 52),
        );
        painter.text(
            badge_rect.center(),
            Align2::CENTER_CENTER,
            "proc",
            FontId::monospace(9.5),
            Color32::from_rgb(230, 237, 243),
        );
        text_right = badge_rect.left() - 3.0;
    }
    // Green when up, red when down.
    for guest in guests.iter().rev() {
        let centre = pos2(text_right - 4.0, chip.center().y);
        let fill = match guest.state {
            GuestAppState::Up => Color32::from_rgb(63, 185, 80),
            GuestAppState::Down => Color32::from_rgb(248, 81, 73),
            GuestAppState::Unknown => Color32::from_gray(150),
        };
        painter.circle(
            centre,
            3.5,
            fill,
            Stroke::new(1.0, Color32::from_black_alpha(160)),
        );
        text_right -= 10.0;
    }
    if let Some(m) = migrating {
        let fraction = if m.bytes_total > 0 {
            (m.bytes_done as f32 / m.bytes_total as f32).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let track = Rect::from_min_max(pos2(chip.left(), chip.bottom() - 4.0), chip.max);
        painter.rect_filled(track, CornerRadius::ZERO, Color32::from_black_alpha(120));
        let done = Rect::from_min_size(track.min, vec2(track.width() * fraction, track.height()));
        painter.rect_filled(done, CornerRadius::ZERO, Color32::from_rgb(88, 166, 255));
    }
    (text_left, text_right)
}

/// A chip's tooltip: the VM's sizes and addresses, its service, the applications inside it
/// and a migration under way.
fn chip_hover_text(
    vm: &dunes_shared::model::VmStatus,
    service: Option<&ServiceName>,
    guests: &[GuestAppView],
    migrating: Option<&crate::engine::migration::MigrationJournal>,
) -> String {
    let mut service_note = service.map_or(String::new(), |s| format!(" · service {s}"));
    for guest in guests {
        service_note.push_str(&format!(
            "\n{} {}: {}",
            guest.name,
            guest.state.as_str(),
            guest.detail
        ));
    }
    if let Some(m) = migrating {
        service_note.push_str(&format!(
            " · migration {} to {}: {}",
            m.id,
            m.to,
            m.step.as_str()
        ));
    }
    let addresses = vm
        .addresses
        .as_ref()
        .filter(|a| !a.is_empty())
        .map_or(String::new(), |a| format!(" · {}", a.join(", ")));
    format!(
        "{} · {} · {} vCPU · {} MiB · {}{addresses}{service_note}",
        vm.name,
        vm.state,
        vm.vcpus,
        vm.memory_mib,
        vm.runtime.as_str()
    )
}

/// A line per migration under way to or from the host: where to, how far, how fast, how
/// long still.
fn migration_lines(
    painter: &egui::Painter,
    snapshot: &Snapshot,
    host: &HostView,
    at: Pos2,
    width: f32,
    text: Color32,
) {
    for (n, m) in open_migrations(snapshot, host.id()).enumerate() {
        let top = at.y + n as f32 * MIGRATION_LINE_H;
        let arrow = if &m.from == host.id() {
            format!("{} to {}", m.vm, m.to)
        } else {
            format!("{} from {}", m.vm, m.from)
        };
        let fraction = if m.bytes_total > 0 {
            (m.bytes_done as f32 / m.bytes_total as f32).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let mut detail = m.step.label().to_string();
        if m.step == crate::engine::migration::MigrationStep::Transferring {
            detail = format!("{:.0} %", fraction * 100.0);
            if let Some(rate) = m.rate_bps {
                detail.push_str(&format!(" · {}/s", super::human_bytes(rate)));
            }
            if let Some(eta) = m.eta_secs() {
                detail.push_str(&format!(" · {eta} s left"));
            }
        }
        // The progress on the right, whole; the VM and its peer in what room is left.
        let detail = painter.layout_no_wrap(
            detail,
            FontId::proportional(11.0),
            Color32::from_rgb(88, 166, 255),
        );
        let left_w = (width - detail.size().x - 8.0).max(30.0);
        painter.galley(
            pos2(at.x + width - detail.size().x, top),
            detail,
            Color32::from_rgb(88, 166, 255),
        );
        painter.text(
            pos2(at.x, top),
            Align2::LEFT_TOP,
            elide(&arrow, left_w),
            FontId::proportional(11.0),
            text,
        );
        let track = Rect::from_min_size(pos2(at.x, top + 15.0), vec2(width, 5.0));
        painter.rect_filled(track, CornerRadius::same(2), Color32::from_gray(60));
        painter.rect_filled(
            Rect::from_min_size(track.min, vec2(width * fraction, 5.0)),
            CornerRadius::same(2),
            Color32::from_rgb(88, 166, 255),
        );
    }
}

/// Shortens a name to fit a width, by a rough per-character estimate (cheap for many chips).
fn elide(name: &str, width: f32) -> String {
    let max = (width / 6.5).floor().max(3.0) as usize;
    if name.chars().count() <= max {
        name.to_string()
    } else {
        let mut s: String = name.chars().take(max - 1).collect();
        s.push('…');
        s
    }
}
