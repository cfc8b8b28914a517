//! Rendering a [`Diff`]: table, JSON or Markdown.

use std::fmt::Write as _;

use comfy_table::{CellAlignment, ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};

use super::common::RenderError;
use crate::diff::{DetailDiff, Diff, DiffRow};

/// Output formats of `kvmtrace diff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiffFormat {
    /// A table for people.
    Table,
    /// JSON (schema kvmtrace.diff.v1).
    Json,
    /// A Markdown table, for reports.
    Md,
    /// An SVG grouped bar chart on a log axis.
    Svg,
}

fn ratio(r: &DiffRow) -> String {
    match r.ratio {
        Some(x) if x >= 100.0 => format!("{x:.0}×"),
        Some(x) => format!("{x:.2}×"),
        None => "new".to_owned(),
    }
}

fn cells(r: &DiffRow) -> [String; 8] {
    let reason = if r.failed_entry {
        format!("{} (failed entry)", r.reason)
    } else {
        r.reason.to_string()
    };
    [
        reason,
        r.name.clone(),
        r.a.to_string(),
        r.b.to_string(),
        format!("{:+}", r.delta),
        ratio(r),
        format!("{:.1} → {:.1}", r.share_a, r.share_b),
        match (&r.evidence, r.why) {
            (Some(e), Some(w)) => format!("{e}: {w}"),
            (Some(e), None) => e.clone(),
            (None, w) => w.unwrap_or("").to_owned(),
        },
    ]
}

/// The rows of one sub-key of a reason, under it.
fn detail_cells(x: &DetailDiff) -> [String; 8] {
    [
        String::new(),
        format!("  {}", x.label),
        x.a.to_string(),
        x.b.to_string(),
        format!("{:+}", x.delta),
        match x.a {
            0 => "new".to_owned(),
            a => format!("{:.2}×", x.b as f64 / a as f64),
        },
        String::new(),
        String::new(),
    ]
}

/// A reason's row, and with `detail` its sub-keys that moved (at most [`MAX_SUB_ROWS`]).
fn rows_of(r: &DiffRow, detail: bool) -> Vec<[String; 8]> {
    let mut rows = vec![cells(r)];
    if detail {
        rows.extend(
            r.detail
                .iter()
                .filter(|x| x.delta != 0)
                .take(MAX_SUB_ROWS)
                .map(detail_cells),
        );
    }
    rows
}

/// Sub-key rows shown per reason in tables (JSON has them all).
pub const MAX_SUB_ROWS: usize = 8;

fn header(d: &Diff) -> [String; 8] {
    [
        "reason".into(),
        "name".into(),
        d.a_label.clone(),
        d.b_label.clone(),
        "delta".into(),
        "ratio".into(),
        "% of exits".into(),
        "why".into(),
    ]
}

fn title(d: &Diff) -> String {
    format!(
        "{} → {}: {} → {} exits",
        d.a_label, d.b_label, d.a_total, d.b_total
    )
}

/// Renders `d`; with `detail`, tables show each reason's sub-keys that moved.
pub fn render(d: &Diff, format: DiffFormat, detail: bool) -> Result<Vec<u8>, RenderError> {
    let text = match format {
        DiffFormat::Json => {
            let mut v = serde_json::to_vec_pretty(d)?;
            v.push(b'\n');
            return Ok(v);
        }
        DiffFormat::Svg => super::chart::render(d).map_err(RenderError::Chart)?,
        DiffFormat::Table => {
            let mut t = Table::new();
            // The why column wraps to keep the table readable in a terminal.
            t.load_preset(UTF8_FULL_CONDENSED)
                .set_content_arrangement(ContentArrangement::Dynamic)
                .set_width(140)
                .set_header(header(d));
            for r in &d.rows {
                for row in rows_of(r, detail) {
                    t.add_row(row);
                }
            }
            for i in [0, 2, 3, 4, 5, 6] {
                if let Some(c) = t.column_mut(i) {
                    c.set_cell_alignment(CellAlignment::Right);
                }
            }
            format!("{}\n{t}\n", title(d))
        }
        DiffFormat::Md => {
            let mut s = format!("**{}**\n\n", title(d));
            let _ = writeln!(s, "| {} |", header(d).join(" | "));
            let _ = writeln!(s, "|---:|---|---:|---:|---:|---:|---:|---|");
            for r in &d.rows {
                for row in rows_of(r, detail) {
                    let _ = writeln!(s, "| {} |", row.join(" | "));
                }
            }
            s
        }
    };
    Ok(text.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{diff::diff, report::tests::sample_report};

    fn sample() -> Diff {
        let a = sample_report();
        let mut b = sample_report();
        for r in &mut b.reasons {
            r.totals.count *= 3;
        }
        b.total.count *= 3;
        diff(&a, "ept=1".into(), &b, "ept=0".into())
    }

    fn text(format: DiffFormat) -> String {
        let bytes = render(&sample(), format, true).unwrap_or_else(|e| panic!("{e}"));
        String::from_utf8(bytes).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn markdown() {
        insta::assert_snapshot!(text(DiffFormat::Md));
    }

    #[test]
    fn table() {
        insta::assert_snapshot!(text(DiffFormat::Table));
    }

    #[test]
    fn json() {
        insta::assert_snapshot!(text(DiffFormat::Json));
    }
}
