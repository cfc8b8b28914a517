//! `kvmtrace top`: rates between two snapshots, per reason and per VM. Pure.

use std::collections::BTreeMap;

use tracer_common::ExitKey;

use crate::{
    exit_reasons::{self, Isa},
    snapshot::Snapshot,
};

/// One line of the live view.
#[derive(Clone, Debug, PartialEq)]
pub struct RateRow {
    pub label: String,
    /// Exits per second over the last interval.
    pub rate: f64,
    /// Exits since the view started.
    pub total: u64,
}

/// The live view at one refresh.
#[derive(Clone, Debug, PartialEq)]
pub struct View {
    pub reasons: Vec<RateRow>,
    pub vms: Vec<RateRow>,
    pub total: u64,
    pub rate: f64,
}

fn rate(now: u64, before: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        0.0
    } else {
        now.saturating_sub(before) as f64 / secs
    }
}

fn per_vm(s: &Snapshot) -> BTreeMap<u32, u64> {
    let mut m = BTreeMap::new();
    for (k, v) in &s.vcpus {
        *m.entry(k.pid).or_insert(0u64) += v.count;
    }
    m
}

/// The view from the snapshot at start, the previous one and the current one, `secs`
/// apart. Rows are sorted by rate, then total, highest first.
pub fn view(
    start: &Snapshot,
    prev: &Snapshot,
    cur: &Snapshot,
    secs: f64,
    comms: &BTreeMap<u32, String>,
) -> View {
    let count = |s: &Snapshot, k: &ExitKey| s.exits.get(k).map_or(0, |v| v.count);
    let mut reasons: Vec<RateRow> = cur
        .exits
        .iter()
        .map(|(k, v)| {
            let isa = Isa::from_raw(k.isa);
            RateRow {
                label: format!("{isa} {} {}", k.reason, exit_reasons::name(isa, k.reason)),
                rate: rate(v.count, count(prev, k), secs),
                total: v.count.saturating_sub(count(start, k)),
            }
        })
        .filter(|r| r.total > 0)
        .collect();
    let (vm_start, vm_prev) = (per_vm(start), per_vm(prev));
    let mut vms: Vec<RateRow> = per_vm(cur)
        .into_iter()
        .map(|(pid, n)| RateRow {
            label: match comms.get(&pid) {
                Some(c) => format!("{pid} {c}"),
                None => pid.to_string(),
            },
            rate: rate(n, vm_prev.get(&pid).copied().unwrap_or(0), secs),
            total: n.saturating_sub(vm_start.get(&pid).copied().unwrap_or(0)),
        })
        .filter(|r| r.total > 0)
        .collect();
    let by_rate = |a: &RateRow, b: &RateRow| {
        b.rate
            .total_cmp(&a.rate)
            .then(b.total.cmp(&a.total))
            .then(a.label.cmp(&b.label))
    };
    reasons.sort_by(by_rate);
    vms.sort_by(by_rate);
    let sum = |s: &Snapshot| s.exits.values().map(|v| v.count).sum::<u64>();
    View {
        total: sum(cur).saturating_sub(sum(start)),
        rate: rate(sum(cur), sum(prev), secs),
        reasons,
        vms,
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::{ExitStats, VcpuKey};

    use super::*;

    fn snap(io: u64, cpuid: u64) -> Snapshot {
        let mut s = Snapshot::default();
        for (reason, n) in [(30, io), (10, cpuid)] {
            let exit = ExitKey::from_raw(1, reason);
            let st = ExitStats {
                count: n,
                ..ExitStats::default()
            };
            s.exits.insert(exit, st);
            s.vcpus.insert(
                VcpuKey {
                    pid: 9,
                    reuse: 0,
                    vcpu_id: 0,
                    exit,
                },
                st,
            );
        }
        s
    }

    #[test]
    fn rates_and_totals_since_start() {
        let comms = [(9, "qemu".to_owned())].into();
        let v = view(&snap(100, 10), &snap(150, 10), &snap(250, 12), 2.0, &comms);
        assert_eq!(v.total, 152);
        assert_eq!(v.rate, 51.0);
        assert_eq!(v.reasons[0].label, "vmx 30 IO_INSTRUCTION");
        assert_eq!((v.reasons[0].rate, v.reasons[0].total), (50.0, 150));
        assert_eq!((v.reasons[1].rate, v.reasons[1].total), (1.0, 2));
        assert_eq!(
            v.vms,
            vec![RateRow {
                label: "9 qemu".into(),
                rate: 51.0,
                total: 152
            }]
        );
    }

    #[test]
    fn quiet_reasons_are_hidden() {
        let v = view(&snap(5, 5), &snap(5, 5), &snap(5, 5), 1.0, &BTreeMap::new());
        assert!(v.reasons.is_empty() && v.vms.is_empty());
        assert_eq!(v.rate, 0.0);
    }
}
