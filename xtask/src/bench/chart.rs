//! The PNG chart: one panel per headline figure, a bar per path on each route (the median)
//! with a whisker from min to max.

use super::path::{Path, Route};
use super::results::{Metric, Results};
use anyhow::{Context, Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Debian's fonts-dejavu-core (installed by `cargo xtask setup`).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (1500, 950);
const CHARTED: [Metric; 6] = [
    Metric::Throughput1,
    Metric::Throughput8,
    Metric::LatencyP50,
    Metric::LatencyP99,
    Metric::ConnectRate,
    Metric::CpuPerGb8,
];
/// Legend entries are this far apart.
const LEGEND_STEP: i32 = 200;

fn drawing(error: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the chart: {error}")
}

pub fn draw(results: &Results, paths: &[Path], file: &std::path::Path, title: &str) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(file, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(drawing)?;
    let (head, body) = root.split_vertically(80);
    head.draw(&Text::new(title, (20, 10), (FAMILY, 26).into_font()))
        .map_err(drawing)?;
    for (index, &path) in paths.iter().enumerate() {
        let x = 20 + index as i32 * LEGEND_STEP;
        let square = Rectangle::new([(x, 48), (x + 18, 66)], colour(path).filled());
        head.draw(&square).map_err(drawing)?;
        let label = Text::new(path.name(), (x + 26, 47), (FAMILY, 20).into_font());
        head.draw(&label).map_err(drawing)?;
    }
    let note = "bars: median of the runs; whiskers: min to max";
    head.draw(&Text::new(
        note,
        (20 + paths.len() as i32 * LEGEND_STEP, 49),
        (FAMILY, 16).into_font(),
    ))
    .map_err(drawing)?;
    for (panel, metric) in body.split_evenly((2, 3)).iter().zip(CHARTED) {
        draw_panel(&root, panel, results, paths, metric)?;
    }
    root.present()
        .map_err(drawing)
        .with_context(|| format!("writing {}", file.display()))
}

fn colour(path: Path) -> RGBColor {
    match path {
        Path::Direct => RGBColor(96, 125, 160),
        Path::Mesh => RGBColor(232, 120, 40),
        // The mesh's colour, lighter.
        Path::MeshBaseline(_) => RGBColor(245, 190, 140),
        Path::Iptables => RGBColor(70, 160, 95),
        Path::Relay => RGBColor(150, 90, 170),
    }
}

/// Routes side by side, a bar per path within each. Text goes on `root` in absolute pixels,
/// so labels may sit outside the plotting area.
fn draw_panel<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    panel: &DrawingArea<DB, Shift>,
    results: &Results,
    paths: &[Path],
    metric: Metric,
) -> Result<()> {
    let bar_width = 0.8 / paths.len() as f64;
    let top = Route::ALL
        .iter()
        .flat_map(|&route| {
            paths
                .iter()
                .map(move |&path| results.spread(path, route, metric))
        })
        .flatten()
        .map(|spread| spread.max)
        .fold(0.0, f64::max);
    let top = if top > 0.0 { top * 1.18 } else { 1.0 };
    let mut chart = ChartBuilder::on(panel)
        .caption(metric.label(), (FAMILY, 20))
        .margin(14)
        .x_label_area_size(28)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..Route::ALL.len() as f64, 0.0..top)
        .map_err(drawing)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_labels(6)
        .label_style((FAMILY, 14))
        .draw()
        .map_err(drawing)?;
    let centred = |size| {
        (FAMILY, size)
            .into_font()
            .into_text_style(root)
            .pos(Pos::new(HPos::Center, VPos::Bottom))
    };
    for (group, route) in Route::ALL.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(group as f64 + 0.5, 0.0));
        let label = centred(15).pos(Pos::new(HPos::Center, VPos::Top));
        root.draw(&Text::new(route.name(), (x, y + 6), label))
            .map_err(drawing)?;
        for (index, &path) in paths.iter().enumerate() {
            let Some(spread) = results.spread(path, *route, metric) else {
                continue;
            };
            let left = group as f64 + 0.1 + index as f64 * bar_width;
            let right = left + bar_width * 0.9;
            let middle = (left + right) / 2.0;
            let bar = Rectangle::new([(left, 0.0), (right, spread.median)], colour(path).filled());
            chart.draw_series([bar]).map_err(drawing)?;
            let whisker = PathElement::new(
                [(middle, spread.min), (middle, spread.max)],
                BLACK.stroke_width(2),
            );
            chart.draw_series([whisker]).map_err(drawing)?;
            let (x, y) = chart.backend_coord(&(middle, spread.max));
            let value = format!("{:.*}", metric.digits(), spread.median);
            root.draw(&Text::new(value, (x, y - 6), centred(14)))
                .map_err(drawing)?;
        }
    }
    Ok(())
}

fn register_font() -> Result<()> {
    let bytes = std::fs::read(FONT).with_context(|| {
        format!(
            "reading the chart's font {FONT} (Debian's fonts-dejavu-core: run `cargo xtask setup`)"
        )
    })?;
    // plotters keeps the font for the life of the process.
    plotters::style::register_font(
        FAMILY,
        FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    )
    .map_err(|_| anyhow!("{FONT} is not a usable font"))
}
