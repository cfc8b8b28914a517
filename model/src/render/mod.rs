//! Renderers: a [`Report`] in, bytes out. No I/O here, so every format is tested with
//! fixed reports.

mod chart;
mod common;
mod csv;
pub mod diff;
pub mod guest;
mod json;
pub mod metrics;
pub mod rates;
pub mod reconcile;
mod table;

pub use self::common::{Options, RenderError, human_ns, percent};
use crate::report::Report;

/// Output formats of `kvmtrace record`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A table for people (comfy-table).
    Table,
    /// The versioned JSON report (schema kvmtrace.record.v1).
    Json,
    /// One row per reason (or per VM, vCPU and reason with --per-vcpu).
    Csv,
}

/// Renders `report` as `format`.
pub fn render(report: &Report, format: Format, opts: Options) -> Result<Vec<u8>, RenderError> {
    match format {
        Format::Table => Ok(table::render(report, opts).into_bytes()),
        Format::Json => json::render(report),
        Format::Csv => csv::render(report, opts),
    }
}
