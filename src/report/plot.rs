//! Line charts as inline SVG (plotters' SVG backend, no fonts or files needed): one chart per
//! quantity, one line per run.

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// One line of a chart.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Line colours, in run order (colour-blind-safe Tableau order).
const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

pub fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

/// A padded `[lo, hi]` over `values` (a flat range is widened so the line is visible).
fn range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() || !hi.is_finite() {
        return None;
    }
    let pad = if hi > lo {
        (hi - lo) * 0.05
    } else {
        lo.abs().max(1.0) * 0.05
    };
    Some((lo - pad, hi + pad))
}

/// An SVG line chart `size` pixels large; `None` when no series has a point.
pub fn line_chart(
    title: &str,
    x_label: &str,
    series: &[Series],
    size: (u32, u32),
) -> Result<Option<String>> {
    let all = || series.iter().flat_map(|s| s.points.iter());
    let (Some(xr), Some(yr)) = (range(all().map(|p| p.0)), range(all().map(|p| p.1))) else {
        return Ok(None);
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        let err = |e: &dyn std::fmt::Debug| anyhow!("drawing the chart {title:?}: {e:?}");
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(52)
            .build_cartesian_2d(xr.0..xr.1, yr.0..yr.1)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .x_labels(6)
            .y_labels(6)
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, s) in series.iter().enumerate() {
            let c = colour(i);
            let style = c.stroke_width(2);
            let drawn = chart
                .draw_series(LineSeries::new(s.points.iter().copied(), style))
                .map_err(|e| err(&e))?;
            if series.len() > 1 {
                drawn.label(s.name.clone()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                });
            }
            if s.points.len() <= 40 {
                chart
                    .draw_series(s.points.iter().map(|p| Circle::new(*p, 3, c.filled())))
                    .map_err(|e| err(&e))?;
            }
        }
        if series.len() > 1 {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(200, 200, 200))
                .draw()
                .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    Ok(Some(svg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_draw_lines_and_legends() {
        let s = |name: &str, k: f64| Series {
            name: name.into(),
            points: (0..10).map(|i| (i as f64, k * i as f64)).collect(),
        };
        let svg = line_chart(
            "geneval",
            "step",
            &[s("dgpo", 1.0), s("flow_grpo", 0.5)],
            (400, 250),
        )
        .unwrap()
        .unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("geneval"), "{svg}");
        assert!(svg.contains("flow_grpo") && svg.contains("polyline"));
        // A single point and a flat line still draw; no points at all is no chart.
        let one = Series {
            name: "a".into(),
            points: vec![(3.0, 0.5)],
        };
        assert!(line_chart("t", "x", &[one], (300, 200)).unwrap().is_some());
        let none = Series {
            name: "a".into(),
            points: vec![],
        };
        assert!(line_chart("t", "x", &[none], (300, 200)).unwrap().is_none());
    }
}
