//! Renderers: a [`Report`] in, bytes out. No I/O here, so every format is tested with
//! fixed reports.

mod chart;
mod csv;
pub mod diff;
pub mod guest;
mod json;
pub mod metrics;
pub mod rates;
pub mod reconcile;
mod table;

use std::str::FromStr;

use thiserror::Error;

use crate::report::Report;

/// Output formats of `kvmtrace record`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A table for people (comfy-table).
    Table,
    /// The versioned JSON report (schema kvmtrace.record.v1).
    Json,
    /// One row per reason (or per VM, vCPU and reason with --per-vcpu).
    Csv,
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        <Self as clap::ValueEnum>::from_str(s, true)
            .map_err(|_| format!("unknown format '{s}': use table, json or csv"))
    }
}

/// How to render.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Rows per VM and vCPU instead of per reason.
    pub per_vcpu: bool,
    /// Under each reason, its `--detail` rows.
    pub detail: bool,
}

/// A renderer failed (only CSV and JSON serialization can).
#[derive(Debug, Error)]
pub enum RenderError {
    #[error("cannot write CSV: {0}")]
    Csv(#[from] ::csv::Error),
    #[error("cannot write JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot draw the chart: {0}")]
    Chart(String),
}

/// Renders `report` as `format`.
pub fn render(report: &Report, format: Format, opts: Options) -> Result<Vec<u8>, RenderError> {
    match format {
        Format::Table => Ok(table::render(report, opts).into_bytes()),
        Format::Json => json::render(report),
        Format::Csv => csv::render(report, opts),
    }
}

/// A duration in ns for people: `812 ns`, `3.40 µs`, `12.5 ms`, `2.00 s`.
pub fn human_ns(ns: u64) -> String {
    let n = ns as f64;
    match ns {
        0..1_000 => format!("{ns} ns"),
        1_000..1_000_000 => format!("{:.2} µs", n / 1e3),
        1_000_000..1_000_000_000 => format!("{:.2} ms", n / 1e6),
        _ => format!("{:.2} s", n / 1e9),
    }
}

/// `part` as a percentage of `whole`, one decimal.
pub fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".to_owned();
    }
    format!("{:.1}", part as f64 * 100.0 / whole as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_ns(0), "0 ns");
        assert_eq!(human_ns(999), "999 ns");
        assert_eq!(human_ns(3_400), "3.40 µs");
        assert_eq!(human_ns(12_500_000), "12.50 ms");
        assert_eq!(human_ns(2_000_000_000), "2.00 s");
        assert_eq!(percent(1, 3), "33.3");
        assert_eq!(percent(1, 0), "-");
    }

    #[test]
    fn formats_parse() {
        assert_eq!("JSON".parse::<Format>(), Ok(Format::Json));
        assert!("xml".parse::<Format>().is_err());
    }
}
