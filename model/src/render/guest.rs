//! `kvmtrace guest`'s table: the counters as the guest read them.

use comfy_table::{CellAlignment, Table, presets::UTF8_FULL_CONDENSED};

use crate::guest::GuestReadout;

/// The leaves, the detection, the total and one row per reason.
pub fn table(r: &GuestReadout) -> String {
    let mut out = format!(
        "{} guest, leaves count {:#x} total {} cycles {}: {}\n",
        r.isa,
        r.leaves.count,
        r.leaves
            .total
            .map(|t| format!("{t:#x}"))
            .unwrap_or_else(|| "-".into()),
        r.leaves
            .cycles
            .map(|t| format!("{t:#x}"))
            .unwrap_or_else(|| "-".into()),
        r.detection
    );
    if !r.patched {
        return out;
    }
    if let (Some(e), Some(c)) = (r.total_exits, r.total_cycles) {
        out.push_str(&format!("total: {e} exits (low 32 bits), {c} cycles\n"));
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header(["reason", "name", "exits", "cycles", "note"]);
    for x in &r.reasons {
        t.add_row([
            x.reason.to_string(),
            x.name.clone(),
            x.count.to_string(),
            x.cycles
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            if x.undefined {
                "KVM says: undefined".into()
            } else {
                String::new()
            },
        ]);
    }
    for i in [0, 2, 3] {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    out.push_str(&format!("{t}\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        exit_reasons::Isa,
        guest::{GUEST_SCHEMA, GuestReason},
        leaves::preset,
    };

    fn readout(patched: bool) -> GuestReadout {
        let reason = |reason: u32, name: &str, count, cycles, undefined| GuestReason {
            reason,
            name: name.to_owned(),
            count,
            cycles,
            undefined,
            queries_before: u64::from(reason),
        };
        GuestReadout {
            schema: GUEST_SCHEMA.to_owned(),
            isa: Isa::Vmx,
            leaves: preset("kvmtrace").unwrap_or_else(|e| panic!("{e}")),
            patched,
            detection: "the count leaf answers CPUID exits".to_owned(),
            total_exits: Some(6801),
            total_cycles: Some(12_345_678),
            reasons: vec![
                reason(10, "CPUID", 651, Some(80_000), false),
                reason(35, "35", 0, None, true),
                reason(48, "EPT_VIOLATION", 544, Some(1_000_000), false),
            ],
            queries: 200,
            leaf_status: None,
        }
    }

    #[test]
    fn patched() {
        insta::assert_snapshot!(table(&readout(true)));
    }

    #[test]
    fn unpatched_stops_after_the_detection() {
        insta::assert_snapshot!(table(&readout(false)));
    }
}
