//! How long the console takes to draw a statistics window: one frame is building the
//! window's UI (egui, egui_plot) and tessellating what it drew into triangles, both on the
//! CPU, as the real window does before the GPU paints. The window shows a host's seven
//! series (mean line over a min–max band each) for:
//! - 30 days of 1-minute buckets (43,200 per series: more than any view asks; the issue's
//!   case);
//! - 7 days of 1-minute buckets (10,080: what the 7-day view shows);
//! - 30 days of 1-hour buckets (720: what the 30-day view shows).
//!
//! Run with `cargo bench -p dunes-tests --bench charts` (release); method and results in
//! docs/BENCHMARKS.md.

use std::time::Instant;

use dunes_console::{
    api::views::StatsView,
    engine::{
        statistics::rollup::Bucket,
        statistics::series::{Metric, SeriesPoints, StatsAnswer, Subject},
    },
    ui::{ChartsWindow, EngineLink, TimeRange},
};
use dunes_shared::model::HostId;
use dunes_tests::start_engine;

const FRAMES: usize = 60;

/// A day's swing on a slow trend, with a band around it: the shape of real use.
fn series(metric: Metric, points: u64, step_secs: u64, end_secs: u64) -> SeriesPoints {
    let start = end_secs - points * step_secs;
    SeriesPoints {
        metric,
        points: (0..points)
            .map(|i| {
                let t = start + i * step_secs;
                let day = (t % 86_400) as f64 / 86_400.0 * std::f64::consts::TAU;
                let mean = 40.0 + 20.0 * day.sin() + i as f64 * 0.0001;
                Bucket {
                    start_secs: t,
                    min: mean - 5.0,
                    max: mean + 5.0,
                    sum: mean * 60.0,
                    count: 60,
                }
            })
            .collect(),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // The window asks the engine nothing while it holds fixed data; it needs one anyway.
    let engine = start_engine(&dir.path().join("console")).await?;
    let link = EngineLink::in_process(engine);
    let now_secs = 1_800_000_000;
    let cases = [
        (
            "30 days of 1-minute buckets",
            30 * 1440,
            60,
            TimeRange::Month,
        ),
        ("7 days of 1-minute buckets", 7 * 1440, 60, TimeRange::Week),
        ("30 days of 1-hour buckets", 30 * 24, 3600, TimeRange::Month),
    ];
    println!("| data | points per series | frame p50 | frame p99 | slowest |");
    println!("|---|---|---|---|---|");
    for (what, points, step, range) in cases {
        let answer = StatsAnswer {
            subject: Subject::Host(HostId::new("bench")?),
            resolution_secs: step,
            from_secs: now_secs - points * step,
            to_secs: now_secs,
            series: Metric::ALL
                .iter()
                .chain(&[Metric::Cost])
                .map(|&m| series(m, points, step, now_secs))
                .collect(),
        };
        let mut window = ChartsWindow::new(dir.path().join("exports"));
        window.show_answer(answer.subject.clone(), StatsView::from(&answer), range);
        let ctx = egui::Context::default();
        let input = || egui::RawInput {
            screen_rect: Some(egui::Rect::from_min_size(
                egui::Pos2::ZERO,
                egui::vec2(1280.0, 900.0),
            )),
            ..Default::default()
        };
        let mut times = Vec::with_capacity(FRAMES);
        // The first frames lay the window out: measured after them.
        for frame in 0..FRAMES + 5 {
            let at = Instant::now();
            let output = ctx.run_pass(input(), |ctx| window.charts_ui(ctx, &link));
            let meshes = ctx.tessellate(output.shapes, output.pixels_per_point);
            std::hint::black_box(meshes);
            if frame >= 5 {
                times.push(at.elapsed().as_secs_f64() * 1000.0);
            }
        }
        times.sort_by(f64::total_cmp);
        println!(
            "| {what} | {points} | {:.1} ms | {:.1} ms | {:.1} ms |",
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            times.last().copied().unwrap_or_default(),
        );
    }
    Ok(())
}
