//! `--plot`: the delay CDF and continuity over time of a report, side by side, as SVG.

use std::path::Path;

use plotters::prelude::*;

use super::report::Report;
use super::SimError;

/// Draws `report` into an SVG file at `path`.
pub fn draw(report: &Report, path: &Path) -> Result<(), SimError> {
    let err = |e: &dyn std::fmt::Display| SimError::Plot(format!("{}: {e}", path.display()));
    let root = SVGBackend::new(path, (1100, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(550);

    // Delay behind source: share of pieces at or below each delay (log time axis).
    let max_ms = report
        .delay_cdf
        .last()
        .map_or(1000.0, |(ms, _)| ms.max(10.0));
    let mut chart = ChartBuilder::on(&left)
        .caption(
            format!("{}: delay behind source (CDF)", report.scenario),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d((1.0f64..max_ms * 1.2).log_scale(), 0.0f64..1.0)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("delay, ms")
        .y_desc("share of pieces")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(
            report.delay_cdf.iter().map(|(ms, p)| (ms.max(1.0), *p)),
            &BLUE,
        ))
        .map_err(|e| err(&e))?;

    // Continuity by second of the stream.
    let secs = report.continuity_by_second.len().max(1) as f64;
    let low = report
        .continuity_by_second
        .iter()
        .copied()
        .fold(1.0f64, f64::min)
        .min(0.99)
        - 0.01;
    let mut chart = ChartBuilder::on(&right)
        .caption("continuity by second", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0f64..secs, low.max(0.0)..1.001)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("second of the stream")
        .y_desc("pieces on time")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(
            report
                .continuity_by_second
                .iter()
                .enumerate()
                .map(|(s, c)| (s as f64, *c)),
            &RED,
        ))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
