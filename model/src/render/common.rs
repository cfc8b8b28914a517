//! What every renderer shares: the options, the error, and numbers for people.

use thiserror::Error;

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
}
