//! `kvmtrace top`'s screen: exit rates per reason and per VM.

use comfy_table::{CellAlignment, Table, presets::UTF8_FULL_CONDENSED};

use crate::rates::{RateRow, View};

fn rows_table(title: &str, rows: &[RateRow], limit: usize) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header([title, "exits/s", "total"]);
    for r in rows.iter().take(limit) {
        t.add_row([
            r.label.clone(),
            format!("{:.0}", r.rate),
            r.total.to_string(),
        ]);
    }
    for i in [1, 2] {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// One screen of `top`: the header line, then the reasons and VMs tables (at most
/// `limit` rows each).
pub fn screen(v: &View, secs: f64, paging: &str, limit: usize) -> String {
    format!(
        "kvmtrace top — {paging}, {:.0} exits/s, {} exits in {secs:.0} s   (q quits)\n{}\n{}\n",
        v.rate,
        v.total,
        rows_table("reason", &v.reasons, limit),
        rows_table("VM", &v.vms, limit)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_and_vms() {
        let row = |label: &str, rate, total| RateRow {
            label: label.to_owned(),
            rate,
            total,
        };
        let v = View {
            rate: 1500.0,
            total: 30_000,
            reasons: vec![
                row("48 EPT_VIOLATION", 1000.0, 20_000),
                row("30 IO_INSTRUCTION", 400.0, 8_000),
                row("12 HLT", 100.0, 2_000),
            ],
            vms: vec![row("4242 qemu", 1500.0, 30_000)],
        };
        insta::assert_snapshot!(screen(&v, 20.0, "ept=1", 2));
    }
}
