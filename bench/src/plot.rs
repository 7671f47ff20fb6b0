//! Latency percentile plots (SVG) of a run, for the report and the README.

use hdrhistogram::Histogram;
use plotters::prelude::*;

/// Percentiles plotted, as "nines": 0.5, 0.9, 0.99, ... 0.9999.
const QUANTILES: &[f64] = &[
    0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9995, 0.9999,
];

fn nines(q: f64) -> f64 {
    -(1.0 - q).log10()
}

/// Draws latency (µs) by percentile (log scale of nines) for each named histogram to `path`.
pub fn percentiles(
    path: &std::path::Path,
    title: &str,
    series: &[(&str, &Histogram<u64>)],
) -> anyhow::Result<()> {
    let max = series
        .iter()
        .map(|(_, h)| h.value_at_quantile(0.9999))
        .max()
        .unwrap_or(1)
        .max(10);
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(nines(0.5)..nines(0.9999), 0.0..max as f64 * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (µs)")
        .x_labels(40)
        .y_labels(12)
        // Ticks only at whole nines (and at the median).
        .x_label_formatter(&|x| {
            if (x - nines(0.5)).abs() < 0.02 {
                return "50".into();
            }
            if (x - x.round()).abs() > 0.02 || *x < 0.9 {
                return String::new();
            }
            let q = 100.0 * (1.0 - 10f64.powf(-x.round()));
            format!("{q:.2}")
                .trim_end_matches('0')
                .trim_end_matches('.')
                .to_owned()
        })
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    for (i, (name, h)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = QUANTILES
            .iter()
            .map(|q| (nines(*q), h.value_at_quantile(*q) as f64))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
