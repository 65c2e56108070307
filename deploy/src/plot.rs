//! The deploy report's plot: p50 latency against top-1 agreement with the original, one point per
//! model variant and runtime, drawn as SVG with plotters (text as SVG `<text>`; no fonts needed).

use plotters::prelude::*;

use crate::report::PlotError;

/// One measured row.
pub struct Point {
    /// The variant's label (`original`, `pruned (...)`).
    pub variant: String,
    /// `ort-cpu`, `tract`, ...
    pub runtime: String,
    /// Top-1 agreement with the original, 0 to 1.
    pub agreement: f64,
    /// Median latency in milliseconds.
    pub p50_ms: f64,
}

/// The SVG text of the plot: one filled circle per point, coloured by runtime (a legend names the
/// runtimes), labelled with its variant.
pub fn svg(title: &str, points: &[Point]) -> Result<String, PlotError> {
    draw(title, points, &[], None).map_err(|e| PlotError(e.to_string()))
}

/// [`svg`] with a Pareto front drawn as a line through `front` ((agreement, p50 ms) points) and
/// the `chosen` point ringed.
pub fn front_svg(
    title: &str,
    points: &[Point],
    front: &[(f64, f64)],
    chosen: Option<(f64, f64)>,
) -> Result<String, PlotError> {
    draw(title, points, front, chosen).map_err(|e| PlotError(e.to_string()))
}

fn draw(
    title: &str,
    points: &[Point],
    front: &[(f64, f64)],
    chosen: Option<(f64, f64)>,
) -> Result<String, Box<dyn std::error::Error>> {
    let mut runtimes: Vec<&str> = Vec::new();
    for p in points {
        if !runtimes.contains(&p.runtime.as_str()) {
            runtimes.push(&p.runtime);
        }
    }
    let finite = |v: f64| v.is_finite();
    let lowest = points
        .iter()
        .map(|p| p.agreement)
        .filter(|&v| finite(v))
        .fold(1.0f64, f64::min);
    let x0 = (lowest - 0.05).clamp(0.0, 0.95);
    let ymax = points
        .iter()
        .map(|p| p.p50_ms)
        .filter(|&v| finite(v))
        .fold(0.0f64, f64::max);
    let ymax = if ymax > 0.0 { ymax * 1.2 } else { 1.0 };
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (800, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..1.06f64, 0f64..ymax)?;
        chart
            .configure_mesh()
            .x_desc("top-1 agreement with the original")
            .y_desc("p50 latency (ms)")
            // The axis runs a little past 100% so that points there are not cut; no label there.
            .x_label_formatter(&|v| {
                if *v > 1.0 + 1e-9 {
                    String::new()
                } else {
                    format!("{:.0}%", v * 100.0)
                }
            })
            .draw()?;
        for (i, rt) in runtimes.iter().enumerate() {
            let colour = Palette99::pick(i).to_rgba();
            chart
                .draw_series(
                    points
                        .iter()
                        .filter(|p| p.runtime == *rt && finite(p.agreement) && finite(p.p50_ms))
                        .map(|p| {
                            EmptyElement::at((p.agreement, p.p50_ms))
                                + Circle::new((0, 0), 5, colour.filled())
                                + Text::new(p.variant.clone(), (8, -14), ("sans-serif", 12))
                        }),
                )?
                .label(*rt)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled())
                });
        }
        if !front.is_empty() {
            let mut line = front.to_vec();
            line.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(line, BLACK.stroke_width(2)))?
                .label("front")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 10, y)], BLACK));
        }
        if let Some(c) = chosen {
            chart
                .draw_series([Circle::new(c, 10, RED.stroke_width(3))])?
                .label("chosen")
                .legend(|(x, y)| Circle::new((x + 5, y), 5, RED.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.85))
            .draw()?;
        root.present()?;
    }
    Ok(out)
}
