//! Strip plots like the earlier tool's: one row per generated sample (or duration),
//! x the attribution score, colour the training song, marker the seed, vertical jitter.
//! Written as SVG and PNG (fonts embedded, so a machine without fonts renders it too).

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

/// One dot.
#[derive(Debug, Clone, PartialEq)]
pub struct StripPoint {
    pub row: usize,
    pub x: f64,
    pub colour: usize,
    pub marker: usize,
}

/// A strip plot.
#[derive(Debug, Clone, PartialEq)]
pub struct StripPlot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Row labels, top to bottom.
    pub rows: Vec<String>,
    /// Legend names of the colours (training songs).
    pub colours: Vec<String>,
    /// Legend names of the markers (seeds).
    pub markers: Vec<String>,
    pub points: Vec<StripPoint>,
}

const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn register_fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
        let _ = plotters::style::register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold());
    });
}

fn truncate(s: &str, n: usize) -> String {
    let s = crate::io::printable(s);
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

/// An axis tick: plain decimals with as many places as the axis span needs, scientific
/// notation for very large or very small magnitudes.
fn tick(x: f64, span: f64, magnitude: f64) -> String {
    if magnitude != 0.0 && !(1e-3..1e5).contains(&magnitude) {
        return format!("{x:.2e}");
    }
    let places = (-(span / 5.0).log10().floor()).clamp(0.0, 8.0) as usize;
    format!("{x:.places$}")
}

/// Deterministic jitter in [−0.22, 0.22] for the i-th point.
fn jitter(i: usize) -> f64 {
    (crate::rng::uniform(17, &[i as u64]) - 0.5) * 0.44
}

const LEGEND_WIDTH: u32 = 260;

fn size(plot: &StripPlot) -> (u32, u32) {
    let rows = plot.rows.len().max(1) as u32;
    let legend_rows = (plot.colours.len() + plot.markers.len() + 3) as u32;
    (1200, (140 + rows * 48).max(160 + legend_rows * 24).max(420))
}

fn draw_marker<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    kind: usize,
    at: (i32, i32),
    style: ShapeStyle,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let r = 6;
    let (x, y) = at;
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing: {e:?}");
    match kind % 6 {
        0 => area.draw(&Circle::new((x, y), r, style)).map_err(err),
        1 => area.draw(&Polygon::new(vec![(x, y - r - 1), (x - r, y + r - 1), (x + r, y + r - 1)], style)).map_err(err),
        2 => area.draw(&Rectangle::new([(x - r + 1, y - r + 1), (x + r - 1, y + r - 1)], style)).map_err(err),
        3 => area.draw(&Polygon::new(vec![(x, y - r - 1), (x + r, y), (x, y + r + 1), (x - r, y)], style)).map_err(err),
        4 => area.draw(&Polygon::new(vec![(x - r, y - r + 1), (x + r, y - r + 1), (x, y + r)], style)).map_err(err),
        _ => {
            let s = style.stroke_width(2);
            area.draw(&PathElement::new(vec![(x - r, y - r), (x + r, y + r)], s)).map_err(err)?;
            area.draw(&PathElement::new(vec![(x - r, y + r), (x + r, y - r)], s)).map_err(err)
        }
    }
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, plot: &StripPlot) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    let (w, _) = root.dim_in_pixel();
    let (main, legend) = root.split_horizontally(w - LEGEND_WIDTH);
    let rows = plot.rows.len().max(1);
    let (mut lo, mut hi) =
        plot.points.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.x), b.max(p.x)));
    if !lo.is_finite() || !hi.is_finite() {
        (lo, hi) = (-1.0, 1.0);
    }
    lo = lo.min(0.0);
    hi = hi.max(0.0);
    let pad = ((hi - lo) * 0.08).max(1e-12);
    let (lo, hi) = if hi - lo < 1e-12 { (lo - 1.0, hi + 1.0) } else { (lo - pad, hi + pad) };
    let labels: Vec<String> = plot.rows.iter().map(|r| truncate(r, 42)).collect();
    let label_px = labels.iter().map(|l| l.chars().count()).max().unwrap_or(4) as u32 * 8 + 30;
    let mut chart = ChartBuilder::on(&main)
        .caption(crate::io::printable(&plot.title), ("sans-serif", 24))
        .margin(18)
        .x_label_area_size(56)
        .y_label_area_size(label_px.min(460))
        .build_cartesian_2d(lo..hi, (rows as f64 - 0.5)..-0.5)
        .map_err(err)?;
    let labels_for_fmt = labels.clone();
    chart
        .configure_mesh()
        .y_labels(rows)
        .y_label_formatter(&move |y: &f64| {
            let i = y.round();
            if (y - i).abs() < 1e-6 && i >= 0.0 {
                labels_for_fmt.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_label_formatter(&move |x: &f64| tick(*x, hi - lo, lo.abs().max(hi.abs())))
        .x_desc(&plot.x_label)
        .y_desc(&plot.y_label)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    // Zero line and row guides.
    chart.draw_series(LineSeries::new(vec![(0.0, -0.5), (0.0, rows as f64 - 0.5)], BLACK.mix(0.5))).map_err(err)?;
    for r in 0..rows {
        chart.draw_series(LineSeries::new(vec![(lo, r as f64), (hi, r as f64)], BLACK.mix(0.08))).map_err(err)?;
    }
    let area = chart.plotting_area();
    for (i, p) in plot.points.iter().enumerate() {
        let (px, py) = area.map_coordinate(&(p.x, p.row as f64 + jitter(i)));
        let (ox, oy) = area.get_base_pixel();
        let colour = PALETTE[p.colour % PALETTE.len()];
        draw_marker(&main, p.marker, (px - ox + ox, py - oy + oy), colour.mix(0.85).filled())?;
    }
    // Legend: colours (training songs), then markers (seeds).
    let mut y = 70;
    let text = |s: &str, x: i32, y: i32, bold: bool| {
        let font =
            if bold { ("sans-serif", 15).into_font().style(FontStyle::Bold) } else { ("sans-serif", 14).into_font() };
        legend.draw(&Text::new(s.to_string(), (x, y - 8), font))
    };
    text("training song", 10, y, true).map_err(err)?;
    y += 24;
    for (i, name) in plot.colours.iter().enumerate() {
        legend.draw(&Circle::new((20, y), 6, PALETTE[i % PALETTE.len()].filled())).map_err(err)?;
        text(&truncate(name, 28), 34, y, false).map_err(err)?;
        y += 22;
    }
    y += 14;
    text("seed", 10, y, true).map_err(err)?;
    y += 24;
    for (i, name) in plot.markers.iter().enumerate() {
        draw_marker(&legend, i, (20, y), BLACK.mix(0.8).filled())?;
        text(&truncate(name, 28), 34, y, false).map_err(err)?;
        y += 22;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Writes `plot` as SVG and PNG (atomically).
pub fn render(plot: &StripPlot, svg: &Path, png: &Path) -> Result<()> {
    register_fonts();
    let (w, h) = size(plot);
    let mut svg_text = String::new();
    {
        let root = SVGBackend::with_string(&mut svg_text, (w, h)).into_drawing_area();
        draw(root, plot)?;
    }
    crate::io::write_atomic(svg, svg_text.as_bytes())?;
    let mut pixels = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        draw(root, plot)?;
    }
    let img = image::RgbImage::from_raw(w, h, pixels).ok_or_else(|| anyhow!("PNG buffer size"))?;
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png).context("PNG encoding")?;
    crate::io::write_atomic(png, &bytes.into_inner())
}

/// Points of one series of a scatter plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A scatter plot of several series (one colour each), written as SVG and PNG.
pub fn render_scatter(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    svg: &Path,
    png: &Path,
) -> Result<()> {
    fn draw_scatter<DB: DrawingBackend>(
        root: DrawingArea<DB, Shift>,
        title: &str,
        x_label: &str,
        y_label: &str,
        series: &[Series],
    ) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing: {e:?}");
        root.fill(&WHITE).map_err(err)?;
        let all = series.iter().flat_map(|s| s.points.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
        for &(x, y) in all {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
        if !(x0.is_finite() && y0.is_finite()) {
            (x0, x1, y0, y1) = (-1.0, 1.0, -1.0, 1.0);
        }
        let pad = |a: f64, b: f64| ((b - a) * 0.08).max(1e-9);
        let (px, py) = (pad(x0, x1), pad(y0, y1));
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(18)
            .x_label_area_size(50)
            .y_label_area_size(80)
            .build_cartesian_2d((x0 - px)..(x1 + px), (y0 - py)..(y1 + py))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 15))
            .x_label_formatter(&move |x: &f64| tick(*x, x1 - x0, x0.abs().max(x1.abs())))
            .y_label_formatter(&move |y: &f64| tick(*y, y1 - y0, y0.abs().max(y1.abs())))
            .draw()
            .map_err(err)?;
        for (i, s) in series.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 5, colour.mix(0.85).filled())))
                .map_err(err)?
                .label(truncate(&s.name, 40))
                .legend(move |(x, y)| Circle::new((x, y), 5, colour.filled()));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
        Ok(())
    }
    register_fonts();
    let (w, h) = (900u32, 640u32);
    let mut svg_text = String::new();
    {
        let root = SVGBackend::with_string(&mut svg_text, (w, h)).into_drawing_area();
        draw_scatter(root, title, x_label, y_label, series)?;
    }
    crate::io::write_atomic(svg, svg_text.as_bytes())?;
    let mut pixels = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        draw_scatter(root, title, x_label, y_label, series)?;
    }
    let img = image::RgbImage::from_raw(w, h, pixels).ok_or_else(|| anyhow!("PNG buffer size"))?;
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png).context("PNG encoding")?;
    crate::io::write_atomic(png, &bytes.into_inner())
}

#[cfg(test)]
mod tests {
    #[test]
    fn labels_in_figures_show_control_characters_escaped() {
        let t = super::truncate("rock\u{1b}[31m\u{7}", 42);
        assert!(!t.chars().any(char::is_control), "{t:?}");
        assert_eq!(t, "rock\\u{1b}[31m\\u{7}");
    }
}
