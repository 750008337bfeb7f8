//! The report's plots, drawn as SVG text with plotters.

use plotters::prelude::*;

/// Plot size in pixels.
const WIDTH: u32 = 520;
const HEIGHT: u32 = 380;
/// Bins of a score histogram.
const HISTOGRAM_BINS: usize = 30;

/// Line colours by output name, fixed so every plot uses the same ones.
fn colour(name: &str) -> RGBColor {
    match name {
        "fused" => RGBColor(0x1b, 0x1b, 0x1b),
        "object" => RGBColor(0x1f, 0x77, 0xb4),
        "attribution" => RGBColor(0xd6, 0x27, 0x28),
        "texture" => RGBColor(0x2c, 0xa0, 0x2c),
        _ => RGBColor(0x7f, 0x7f, 0x7f),
    }
}

/// Curves `(x, y)` per named output on `[0, x_max] × [0, 1]`.
pub fn curves(
    title: &str,
    x_label: &str,
    y_label: &str,
    x_max: f64,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .build_cartesian_2d(0.0..x_max, 0.0..1.0)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .draw()
            .map_err(|e| e.to_string())?;
        for (name, points) in series {
            let c = colour(name);
            let width = if name == "fused" { 3 } else { 2 };
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    c.stroke_width(width),
                ))
                .map_err(|e| e.to_string())?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(width))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// Histograms of normal and anomalous image scores with vertical lines at
/// the given thresholds.
pub fn score_histogram(
    normal: &[f64],
    anomalous: &[f64],
    thresholds: &[(&str, f64, RGBColor)],
) -> Result<String, String> {
    let all = normal
        .iter()
        .chain(anomalous)
        .chain(thresholds.iter().map(|t| &t.1));
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
        (a.min(v), b.max(v))
    });
    let span = if hi > lo { hi - lo } else { 1.0 };
    let (lo, hi) = (lo - 0.02 * span, hi + 0.02 * span);
    let width = (hi - lo) / HISTOGRAM_BINS as f64;
    let counts = |values: &[f64]| {
        let mut c = vec![0usize; HISTOGRAM_BINS];
        for &v in values {
            c[(((v - lo) / width) as usize).min(HISTOGRAM_BINS - 1)] += 1;
        }
        c
    };
    let (cn, ca) = (counts(normal), counts(anomalous));
    let y_max = cn.iter().chain(&ca).copied().max().unwrap_or(1).max(1) as f64 * 1.1;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Image scores (fused)", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .build_cartesian_2d(lo..hi, 0.0..y_max)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("image score")
            .y_desc("images")
            .draw()
            .map_err(|e| e.to_string())?;
        let bars = |c: &[usize], colour: RGBColor, label: &'static str| {
            (
                c.iter()
                    .enumerate()
                    .map(|(i, &n)| {
                        let x0 = lo + i as f64 * width;
                        Rectangle::new(
                            [(x0, 0.0), (x0 + width, n as f64)],
                            colour.mix(0.45).filled(),
                        )
                    })
                    .collect::<Vec<_>>(),
                colour,
                label,
            )
        };
        for (rects, c, label) in [
            bars(&cn, RGBColor(0x1f, 0x77, 0xb4), "normal"),
            bars(&ca, RGBColor(0xd6, 0x27, 0x28), "anomalous"),
        ] {
            chart
                .draw_series(rects)
                .map_err(|e| e.to_string())?
                .label(label)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.mix(0.45).filled())
                });
        }
        for &(label, t, c) in thresholds {
            chart
                .draw_series(LineSeries::new([(t, 0.0), (t, y_max)], c.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// One sweep: metric values against a parameter.
pub fn sweep(
    title: &str,
    parameter: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<String, String> {
    let xs = series.iter().flat_map(|(_, p)| p.iter().map(|q| q.0));
    let (lo, hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let pad = if hi > lo { 0.03 * (hi - lo) } else { 1.0 };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .build_cartesian_2d((lo - pad)..(hi + pad), 0.0..1.0)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc(parameter)
            .y_desc("metric")
            .draw()
            .map_err(|e| e.to_string())?;
        let palette = [
            RGBColor(0x1b, 0x1b, 0x1b),
            RGBColor(0x1f, 0x77, 0xb4),
            RGBColor(0xd6, 0x27, 0x28),
        ];
        for ((name, points), c) in series.iter().zip(palette.iter().cycle()) {
            let c = *c;
            chart
                .draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, c.filled())))
                .map_err(|e| e.to_string())?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_are_svg_with_every_series_named() {
        let series = vec![
            (
                "fused".to_string(),
                vec![(0.0, 0.0), (0.5, 0.9), (1.0, 1.0)],
            ),
            ("texture".to_string(), vec![(0.0, 0.0), (1.0, 1.0)]),
        ];
        let svg = curves("ROC", "FPR", "TPR", 1.0, &series).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("fused") && svg.contains("texture"));
    }

    #[test]
    fn histogram_handles_identical_scores() {
        let svg = score_histogram(&[1.0, 1.0], &[1.0], &[("threshold", 1.0, RED)]).unwrap();
        assert!(svg.contains("threshold"));
    }
}
