//! Comparing two records reason by reason, e.g. the same guest under nested paging
//! (`ept=1`/`npt=1`) and shadow paging (`ept=0`/`npt=0`). Pure: reports in, rows out.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    exit_reasons::Isa,
    report::{ReasonRow, Report},
};

/// One reason in both records.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DiffRow {
    pub isa: Isa,
    pub reason: u32,
    pub failed_entry: bool,
    pub name: String,
    /// Exits in A and in B.
    pub a: u64,
    pub b: u64,
    /// `b - a`.
    pub delta: i128,
    /// `b / a`; `None` when `a` is 0.
    pub ratio: Option<f64>,
    /// Share of all exits of the record, percent.
    pub share_a: f64,
    pub share_b: f64,
    /// Why this reason moves between nested and shadow paging, when it is one that does.
    pub why: Option<&'static str>,
    /// What the data says moved: the sub-key with the largest change, and where the
    /// record with more of these exits took most of them (with `--detail` and `--rip`
    /// records), e.g. `mov to CR3 +17574 (switch_mm_irqs_off)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence: Option<String>,
    /// The reason's sub-keys in both records (records made with `--detail`), largest
    /// change first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub detail: Vec<DetailDiff>,
}

/// One sub-key of a reason in both records.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DetailDiff {
    pub kind: String,
    pub key: String,
    pub label: String,
    pub a: u64,
    pub b: u64,
    pub delta: i128,
}

type ReasonKey = (Isa, u32, bool);

/// The detail rows of each reason of `r`.
fn detail_of(r: &Report) -> BTreeMap<ReasonKey, &ReasonRow> {
    r.reasons
        .iter()
        .map(|x| ((x.isa, x.reason, x.failed_entry), x))
        .collect()
}

/// The sub-keys of one reason in both records, largest change first.
fn detail_diff(a: Option<&ReasonRow>, b: Option<&ReasonRow>) -> Vec<DetailDiff> {
    let mut keys: BTreeMap<(String, String), (String, u64, u64)> = BTreeMap::new();
    for (side, row) in [(0, a), (1, b)] {
        for d in row.into_iter().flat_map(|r| &r.detail) {
            let e = keys
                .entry((d.kind.clone(), d.key.clone()))
                .or_insert_with(|| (d.label.clone(), 0, 0));
            let n = if side == 0 { &mut e.1 } else { &mut e.2 };
            *n = n.saturating_add(d.totals.count);
        }
    }
    let mut rows: Vec<DetailDiff> = keys
        .into_iter()
        .map(|((kind, key), (label, a, b))| DetailDiff {
            kind,
            key,
            label,
            a,
            b,
            delta: i128::from(b) - i128::from(a),
        })
        .collect();
    rows.sort_by(|x, y| y.delta.abs().cmp(&x.delta.abs()).then(x.key.cmp(&y.key)));
    rows
}

/// The evidence line of a reason: its largest-moving sub-key, and the function of the
/// top RIP of the record that has more of its exits.
fn evidence(
    detail: &[DetailDiff],
    a: Option<&ReasonRow>,
    b: Option<&ReasonRow>,
    delta: i128,
) -> Option<String> {
    let more = if delta >= 0 { b } else { a };
    let function = more
        .and_then(|r| r.rips.first())
        .and_then(|x| x.symbol.as_deref())
        // A function names the cause; the lower half (user space, firmware) does not.
        .filter(|s| !crate::symbols::user_space_label(s))
        .map(|s| s.split('+').next().unwrap_or(s).to_owned());
    let top = detail
        .first()
        .filter(|d| d.delta != 0 && d.kind != crate::detail::UNDECODED_KEY);
    match (top, function) {
        (Some(d), Some(f)) => Some(format!("{} {:+} ({f})", d.label, d.delta)),
        (Some(d), None) => Some(format!("{} {:+}", d.label, d.delta)),
        (None, Some(f)) if delta != 0 => Some(format!("mostly at {f}")),
        _ => None,
    }
}

/// Two records compared.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Diff {
    pub schema: &'static str,
    pub a_label: String,
    pub b_label: String,
    pub a_total: u64,
    pub b_total: u64,
    /// Sorted by |delta|, largest first.
    pub rows: Vec<DiffRow>,
}

/// The `schema` of `kvmtrace diff --format json`.
pub const DIFF_SCHEMA: &str = "kvmtrace.diff.v1";

/// The one-line reason why an exit reason's count depends on the paging mode.
pub fn paging_why(isa: Isa, reason: u32) -> Option<&'static str> {
    match (isa, reason) {
        (Isa::Vmx, 48) => Some(
            "EPT only: first guest access to a guest-physical page (or MMIO) not yet in the EPT",
        ),
        (Isa::Vmx, 49) => Some(
            "EPT only: KVM marks MMIO pages as misconfigured EPT entries so MMIO exits are fast",
        ),
        (Isa::Vmx, 0) | (Isa::Svm, 0x4e) => Some(
            "shadow paging intercepts guest #PF to build and sync shadow page tables; with EPT/NPT the guest takes its own faults",
        ),
        (Isa::Vmx, 28) => Some(
            "shadow paging intercepts CR3 writes (every address-space switch) and CR0/CR4 paging bits; with EPT/NPT they are guest-owned",
        ),
        (Isa::Svm, 0x03 | 0x13) => {
            Some("shadow paging intercepts CR3 reads/writes; with NPT CR3 is guest-owned")
        }
        (Isa::Svm, 0x00 | 0x04 | 0x10 | 0x14 | 0x65) => {
            Some("shadow paging intercepts CR0/CR4 paging bits; with NPT they are guest-owned")
        }
        (Isa::Vmx, 14) | (Isa::Svm, 0x79) => Some(
            "shadow paging intercepts INVLPG to drop shadow entries; with EPT/NPT the guest flushes its own TLB",
        ),
        (Isa::Vmx, 58) | (Isa::Svm, 0xa2) => {
            Some("INVPCID is intercepted under shadow paging, like INVLPG")
        }
        (Isa::Svm, 0x400) => {
            Some("NPT only: nested page fault on a guest-physical page (or MMIO) not yet mapped")
        }
        _ => None,
    }
}

/// A label for a record: its paging mode, else `fallback` (e.g. the file name).
pub fn label(report: &Report, fallback: &str) -> String {
    report
        .paging
        .as_ref()
        .map(|p| p.label())
        .unwrap_or_else(|| fallback.to_owned())
}

fn share(n: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        n as f64 * 100.0 / total as f64
    }
}

/// Compares `a` and `b` reason by reason (the union of both records' reasons).
pub fn diff(a: &Report, a_label: String, b: &Report, b_label: String) -> Diff {
    let mut counts: BTreeMap<(Isa, u32, bool), (String, u64, u64)> = BTreeMap::new();
    for r in &a.reasons {
        let e = counts
            .entry((r.isa, r.reason, r.failed_entry))
            .or_insert_with(|| (r.name.clone(), 0, 0));
        // A record may repeat a row (hand-made, or merged): saturate, never wrap.
        e.1 = e.1.saturating_add(r.totals.count);
    }
    for r in &b.reasons {
        let e = counts
            .entry((r.isa, r.reason, r.failed_entry))
            .or_insert_with(|| (r.name.clone(), 0, 0));
        e.2 = e.2.saturating_add(r.totals.count);
    }
    let (a_total, b_total) = (a.total.count, b.total.count);
    let (rows_a, rows_b) = (detail_of(a), detail_of(b));
    let mut rows: Vec<DiffRow> = counts
        .into_iter()
        .map(|((isa, reason, failed_entry), (name, ca, cb))| {
            let key = (isa, reason, failed_entry);
            let (ra, rb) = (rows_a.get(&key).copied(), rows_b.get(&key).copied());
            let delta = i128::from(cb) - i128::from(ca);
            let detail = detail_diff(ra, rb);
            DiffRow {
                isa,
                reason,
                failed_entry,
                name,
                a: ca,
                b: cb,
                delta,
                ratio: (ca > 0).then(|| cb as f64 / ca as f64),
                share_a: share(ca, a_total),
                share_b: share(cb, b_total),
                why: paging_why(isa, reason),
                evidence: evidence(&detail, ra, rb, delta),
                detail,
            }
        })
        .collect();
    rows.sort_by(|x, y| {
        y.delta
            .abs()
            .cmp(&x.delta.abs())
            .then((x.isa, x.reason).cmp(&(y.isa, y.reason)))
    });
    Diff {
        schema: DIFF_SCHEMA,
        a_label,
        b_label,
        a_total,
        b_total,
        rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample_report;

    #[test]
    fn repeated_rows_saturate_instead_of_wrapping() {
        let mut a = sample_report();
        let mut row = a.reasons[0].clone();
        row.totals.count = u64::MAX;
        a.reasons.push(row.clone());
        a.reasons.push(row);
        let d = diff(&a, "a".into(), &sample_report(), "b".into());
        assert!(d.rows.iter().any(|r| r.a == u64::MAX), "{:?}", d.rows);
    }

    #[test]
    fn detail_moves_are_cited() {
        use crate::report::{DetailRow, RipRow, Totals};
        let cr3 = |count| DetailRow {
            kind: "cr".into(),
            key: "cr3:write".into(),
            label: "mov to CR3".into(),
            emulated: false,
            totals: Totals {
                count,
                ..Totals::default()
            },
            mean_ns: None,
        };
        let mut a = sample_report();
        let mut b = sample_report();
        for (r, n) in [(&mut a, 10), (&mut b, 17584)] {
            let mut row = r.reasons[0].clone();
            row.reason = 28;
            row.name = "CR_ACCESS".into();
            row.totals.count = n + 1;
            row.detail = vec![cr3(n), {
                let mut clts = cr3(1);
                clts.key = "clts".into();
                clts.label = "CLTS".into();
                clts
            }];
            row.rips = vec![RipRow {
                rip: 0xffff_ffff_8107_1b2f,
                count: n,
                symbol: Some("switch_mm_irqs_off+0x1af".into()),
            }];
            r.reasons.push(row);
        }
        let d = diff(&a, "ept=1".into(), &b, "ept=0".into());
        let cr = d.rows.iter().find(|r| r.reason == 28);
        assert_eq!(
            cr.and_then(|r| r.evidence.as_deref()),
            Some("mov to CR3 +17574 (switch_mm_irqs_off)")
        );
        let keys: Vec<_> = cr
            .map(|r| r.detail.iter().map(|x| (x.key.as_str(), x.delta)).collect())
            .unwrap_or_default();
        assert_eq!(keys, [("cr3:write", 17574), ("clts", 0)]);
        let io = d.rows.iter().find(|r| r.reason == 30);
        assert!(io.is_some_and(|r| r.evidence.is_none() && r.detail.is_empty()));
    }

    #[test]
    fn diff_pairs_reasons_and_explains_paging() {
        let a = sample_report();
        let mut b = sample_report();
        if let Some(p) = b.paging.as_mut() {
            p.nested = false;
        }
        // Shadow paging: no EPT violations, many #PF and CR exits.
        b.reasons.retain(|r| r.name != "EPT_VIOLATION");
        let mut pf = b.reasons[0].clone();
        pf.reason = 0;
        pf.name = "EXCEPTION_NMI".into();
        pf.totals.count = 100;
        b.reasons.push(pf);
        b.total.count = b.reasons.iter().map(|r| r.totals.count).sum();

        let d = diff(&a, label(&a, "a"), &b, label(&b, "b"));
        assert_eq!((d.a_label.as_str(), d.b_label.as_str()), ("ept=1", "ept=0"));
        assert_eq!(d.rows[0].name, "EXCEPTION_NMI");
        assert_eq!((d.rows[0].a, d.rows[0].b, d.rows[0].delta), (0, 100, 100));
        assert_eq!(d.rows[0].ratio, None);
        assert!(d.rows[0].why.is_some_and(|w| w.contains("#PF")));
        let ept = d.rows.iter().find(|r| r.name == "EPT_VIOLATION");
        assert_eq!(ept.map(|r| (r.a, r.b, r.delta)), Some((6, 0, -6)));
        assert_eq!(ept.and_then(|r| r.ratio), Some(0.0));
        let io = d.rows.iter().find(|r| r.name == "IO_INSTRUCTION");
        assert_eq!(io.and_then(|r| r.ratio), Some(1.0));
        assert!(io.is_some_and(|r| r.why.is_none()));
        assert_eq!(d.rows.len(), 5, "union of both records' reasons");
    }
}
