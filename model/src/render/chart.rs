//! The diff as an SVG grouped bar chart on a log axis (plotters' SVG backend; text is
//! left to the SVG viewer, so no font files are needed).

use plotters::{prelude::*, style::RGBColor};

use crate::diff::Diff;

const A_COLOR: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const B_COLOR: RGBColor = RGBColor(0xd6, 0x27, 0x28);

/// How many reasons the chart shows (the largest moves first).
pub const MAX_BARS: usize = 16;

/// Renders the `MAX_BARS` reasons that moved most as an SVG document.
pub fn render(d: &Diff) -> Result<String, String> {
    let rows: Vec<_> = d.rows.iter().take(MAX_BARS).collect();
    let max = rows.iter().map(|r| r.a.max(r.b)).max().unwrap_or(1).max(1);
    let mut svg = String::new();
    {
        let height = 120 + 30 * rows.len().max(1) as u32;
        let root = SVGBackend::with_string(&mut svg, (900, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let title = format!("VM exits by reason: {} vs {}", d.a_label, d.b_label);
        // Horizontal bars, so the reason names read left to right; the log axis starts
        // below 1 so a single exit still shows.
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(180)
            .build_cartesian_2d(
                (0.5f64..(max as f64) * 2.0).log_scale(),
                (0..rows.len().max(1)).into_segmented(),
            )
            .map_err(|e| e.to_string())?;
        let names: Vec<String> = rows.iter().map(|r| r.name.clone()).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_desc("exits (log scale)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_labels(rows.len().max(1))
            .y_label_formatter(&|y| match y {
                SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                    names.get(*i).cloned().unwrap_or_default()
                }
                SegmentValue::Last => String::new(),
            })
            .draw()
            .map_err(|e| e.to_string())?;
        for (series, color, label) in [(0, A_COLOR, &d.a_label), (1, B_COLOR, &d.b_label)] {
            let bars = rows.iter().enumerate().filter_map(move |(i, r)| {
                let v = if series == 0 { r.a } else { r.b };
                (v > 0).then(|| {
                    let mut bar = Rectangle::new(
                        [
                            (0.5, SegmentValue::Exact(i)),
                            (v as f64, SegmentValue::Exact(i + 1)),
                        ],
                        color.filled(),
                    );
                    // Two bars one above the other in each row.
                    let (top, bottom) = if series == 0 { (3, 15) } else { (15, 3) };
                    bar.set_margin(top, bottom, 0, 0);
                    bar
                })
            });
            chart
                .draw_series(bars)
                .map_err(|e| e.to_string())?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{diff::diff, report::tests::sample_report};

    #[test]
    fn draws_two_series_with_names() {
        let a = sample_report();
        let mut b = sample_report();
        for r in &mut b.reasons {
            r.totals.count *= 10;
        }
        let d = diff(&a, "ept=1".into(), &b, "ept=0".into());
        let svg = render(&d).unwrap_or_else(|e| panic!("{e}"));
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.contains("EPT_VIOLATION") && svg.contains("ept=0"));
        // One bar per non-zero count per series, plus two legend swatches.
        let a_bars = svg.matches("fill=\"#1F77B4\"").count();
        let b_bars = svg.matches("fill=\"#D62728\"").count();
        assert_eq!((a_bars, b_bars), (4 + 1, 4 + 1), "{svg}");
    }
}
