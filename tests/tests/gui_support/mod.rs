//! What the window suites share: stepping the real app until the screen shows something,
//! dragging with the pointer, and the window at a given size.
// Each suite uses its own part of these.
#![allow(dead_code)]

use std::time::Duration;

use dunes_console::{
    demo::{self, DemoFleet},
    engine::EngineHandle,
    ui::ConsoleApp,
};
use egui_kittest::Harness;

/// Steps the UI until `done` holds, like an operator waiting for the screen to update.
pub fn step_until(
    harness: &mut Harness<'_, ConsoleApp>,
    what: &str,
    done: impl Fn(&Harness<'_, ConsoleApp>) -> bool,
) {
    for _ in 0..400 {
        harness.step();
        if done(harness) {
            // Let the layout settle (panels size to their content) before the next click.
            for _ in 0..4 {
                harness.step();
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let _ = harness.render().map(|img| img.save("/tmp/gui-fail.png"));
    panic!("the UI never showed {what}");
}

/// Steps the UI for up to `secs` seconds until `done` holds (readings come every 5 s).
pub fn step_for_until(
    harness: &mut Harness<'_, ConsoleApp>,
    secs: u64,
    what: &str,
    done: impl Fn(&Harness<'_, ConsoleApp>) -> bool,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        harness.step();
        if done(harness) {
            for _ in 0..4 {
                harness.step();
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = harness.render().map(|img| img.save("/tmp/gui-fail.png"));
    panic!("the UI never showed {what}");
}

/// The real app at a window size.
pub fn window_sized(engine: &EngineHandle, size: [f32; 2]) -> Harness<'static, ConsoleApp> {
    let engine = engine.clone();
    Harness::builder()
        .with_size(size)
        .build_eframe(move |cc| ConsoleApp::new(&cc.egui_ctx, engine))
}

/// The real app at the window size of the screenshot.
pub fn window(engine: &EngineHandle) -> Harness<'static, ConsoleApp> {
    window_sized(engine, [1400.0, 900.0])
}

/// Drags with the left button from `from` to `to` in small steps, without dropping.
pub fn drag_to(harness: &mut Harness<'_, ConsoleApp>, from: egui::Pos2, to: egui::Pos2) {
    harness.hover_at(from);
    harness.step();
    harness.drag_at(from);
    harness.step();
    for i in 1..=12 {
        harness.hover_at(from.lerp(to, i as f32 / 12.0));
        harness.step();
    }
    for _ in 0..3 {
        harness.hover_at(to);
        harness.step();
    }
}

/// The demo's fleet under a real engine, with its VMs made and its history in the store; the
/// agents live as long as the fleet.
pub fn demo_engine(dir: &std::path::Path) -> (tokio::runtime::Runtime, EngineHandle, DemoFleet) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (engine, fleet) = runtime.block_on(async {
        let engine = dunes_tests::start_engine(&dir.join("console"))
            .await
            .unwrap();
        let fleet = demo::start(&engine).await.unwrap();
        (engine, fleet)
    });
    (runtime, engine, fleet)
}
