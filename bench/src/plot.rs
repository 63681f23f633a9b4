//! PNG plots of a run: fan-out throughput against offered load (with the
//! floor), and latency percentiles against rate.
//!
//! plotters is built without a font backend so the tool needs no system
//! fonts (its stand-in font panics on text): every label is drawn here from
//! the font8x8 bitmap glyphs instead, pixel by pixel, at twice their size.

use std::path::Path;

use font8x8::UnicodeFonts;
use plotters::coord::Shift;
use plotters::prelude::*;

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw {path}: {detail}")]
pub struct Error {
    path: String,
    detail: String,
}

/// Result with this module's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One line on a chart.
#[derive(Debug, Clone)]
pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) color: RGBColor,
    pub(crate) points: Vec<(f64, f64)>,
}

/// Colours for successive series.
pub(crate) const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
];

const W: u32 = 960;
const H: u32 = 600;
const SCALE: i32 = 2;
const GLYPH: i32 = 8 * SCALE;

fn text(area: &DrawingArea<BitMapBackend<'_>, Shift>, x: i32, y: i32, s: &str, color: &RGBColor) {
    for (i, c) in s.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS.get(c).unwrap_or([0; 8]);
        let gx = x + i as i32 * GLYPH;
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    for dy in 0..SCALE {
                        for dx in 0..SCALE {
                            let _ = area.draw_pixel(
                                (gx + col * SCALE + dx, y + row as i32 * SCALE + dy),
                                color,
                            );
                        }
                    }
                }
            }
        }
    }
}

fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Draws `series` into a PNG at `path`, both axes from zero.
pub(crate) fn chart(
    path: &Path,
    title: &str,
    x_name: &str,
    y_name: &str,
    series: &[Series],
) -> Result<()> {
    let err = |detail: String| Error {
        path: path.display().to_string(),
        detail,
    };
    let points = || series.iter().flat_map(|s| s.points.iter());
    let x_max = points().map(|p| p.0).fold(0.0, f64::max).max(1e-9) * 1.05;
    let y_max = points().map(|p| p.1).fold(0.0, f64::max).max(1e-9) * 1.1;
    let root = BitMapBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let (left, top, right, bottom) = (110i32, 60i32, 30i32, 70i32);
    let mut chart = ChartBuilder::on(&root)
        .margin_left(left as u32)
        .margin_top(top as u32)
        .margin_right(right as u32)
        .margin_bottom(bottom as u32)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_labels(0)
        .y_labels(0)
        .light_line_style(WHITE)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for s in series {
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), &s.color))
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(
                s.points
                    .iter()
                    .map(|&p| Circle::new(p, 4, s.color.filled())),
            )
            .map_err(|e| err(e.to_string()))?;
    }
    // Grid labels: five steps on each axis, placed where plotters maps them.
    let black = RGBColor(0, 0, 0);
    for i in 0..=5 {
        let xv = x_max / 1.05 * f64::from(i) / 5.0;
        let (px, _) = chart.backend_coord(&(xv, 0.0));
        let label = short(xv);
        text(
            &root,
            px - label.len() as i32 * GLYPH / 2,
            H as i32 - bottom + 8,
            &label,
            &black,
        );
        let yv = y_max / 1.1 * f64::from(i) / 5.0;
        let (_, py) = chart.backend_coord(&(0.0, yv));
        let label = short(yv);
        text(
            &root,
            left - 8 - label.len() as i32 * GLYPH,
            py - GLYPH / 2,
            &label,
            &black,
        );
    }
    text(&root, left, 12, title, &black);
    text(&root, left, 12 + GLYPH + 4, y_name, &RGBColor(90, 90, 90));
    let xw = x_name.len() as i32 * GLYPH;
    text(
        &root,
        W as i32 - right - xw,
        H as i32 - GLYPH - 8,
        x_name,
        &RGBColor(90, 90, 90),
    );
    // Legend, top right inside the plot.
    for (i, s) in series.iter().enumerate() {
        let y = top + 10 + i as i32 * (GLYPH + 6);
        let x = W as i32 - right - 10 - (s.name.len() as i32 + 2) * GLYPH;
        root.draw(&Rectangle::new(
            [(x, y + 2), (x + GLYPH - 4, y + GLYPH - 2)],
            s.color.filled(),
        ))
        .map_err(|e| err(e.to_string()))?;
        text(&root, x + GLYPH + 4, y, &s.name, &s.color);
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png_without_fonts() {
        let dir = std::env::temp_dir().join(format!("herald-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.png");
        chart(
            &path,
            "title",
            "x",
            "y",
            &[Series {
                name: "a".to_owned(),
                color: COLORS[0],
                points: vec![(1.0, 2.0), (2.0, 3.5)],
            }],
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
