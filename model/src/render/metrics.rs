//! An [`Exposition`] in the OpenMetrics or Prometheus text format, through
//! `prometheus-client`: a collector that encodes one scrape's series. Names follow
//! node_exporter and ebpf_exporter: a `kvmtrace_` prefix, snake_case, base units
//! (seconds), `_total` on counters.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};

use crate::metrics::Exposition;

/// The `Content-Type` of each format.
pub const OPENMETRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const PROMETHEUS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves one [`Exposition`] as a collector.
#[derive(Debug)]
struct Scrape(Exposition);

type Labels = Vec<(&'static str, String)>;

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &self.0;
        let mut m = encoder.encode_descriptor(
            "kvmtrace_exits",
            "VM exits by exit reason and VM (and vCPU with --per-vcpu), from kvm:kvm_exit",
            None,
            MetricType::Counter,
        )?;
        for (l, &n) in &e.exits {
            let mut labels: Labels = vec![
                ("isa", l.isa.clone()),
                ("reason", l.reason.to_string()),
                ("reason_name", l.reason_name.clone()),
                ("vm", l.vm.clone()),
            ];
            if let Some(vcpu) = l.vcpu {
                labels.push(("vcpu", vcpu.to_string()));
            }
            ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
        }
        if !e.handling.is_empty() {
            let mut m = encoder.encode_descriptor(
                "kvmtrace_exit_handling",
                "Time KVM spent handling each exit, from the exit to the next VM entry",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for h in &e.handling {
                let labels: Labels = vec![
                    ("isa", h.isa.clone()),
                    ("reason", h.reason.to_string()),
                    ("reason_name", h.reason_name.clone()),
                ];
                m.encode_family(&labels)?.encode_histogram::<Labels>(
                    h.sum_seconds,
                    h.count,
                    &per_bucket(&h.buckets),
                    None,
                )?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "kvmtrace_dropped_events",
            "Events kvmtrace could not record in full, by kind (see README: dropped)",
            None,
            MetricType::Counter,
        )?;
        for (kind, n) in &e.dropped {
            ConstCounter::new(*n).encode(m.encode_family(&vec![("kind", kind.clone())])?)?;
        }
        let m = encoder.encode_descriptor(
            "kvmtrace_series_over_cap",
            "Exit series summed into vm=\"_other\" at this scrape because of --max-series",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::try_from(e.series_over_cap).unwrap_or(i64::MAX)).encode(m)?;
        let mut m = encoder.encode_descriptor(
            "kvmtrace_nested_paging",
            "1 when the KVM vendor module uses nested paging (EPT/NPT), 0 for shadow paging",
            None,
            MetricType::Gauge,
        )?;
        for (module, parameter, nested) in &e.paging {
            let labels: Labels = vec![("module", module.clone()), ("parameter", parameter.clone())];
            ConstGauge::new(i64::from(*nested)).encode(m.encode_family(&labels)?)?;
        }
        let mut m = encoder.encode_descriptor(
            "kvmtrace_vm",
            "The pid of each VM's process, by its vm label",
            None,
            MetricType::Info,
        )?;
        for (vm, pid) in &e.vms {
            let labels: Labels = vec![("vm", vm.clone()), ("pid", pid.to_string())];
            m.encode_info(&labels)?;
        }
        let mut m = encoder.encode_descriptor(
            "kvmtrace_build",
            "kvmtrace's version",
            None,
            MetricType::Info,
        )?;
        m.encode_info(&vec![("version", e.version.clone())])?;
        Ok(())
    }
}

/// Cumulative bucket counts as `prometheus-client` takes them: per bucket.
fn per_bucket(cumulative: &[(f64, u64)]) -> Vec<(f64, u64)> {
    let mut below = 0;
    cumulative
        .iter()
        .map(|&(le, n)| {
            let own = n.saturating_sub(below);
            below = n;
            (le, own)
        })
        .collect()
}

/// The text of one scrape: OpenMetrics (with `# EOF`) or the Prometheus text format.
pub fn text(e: &Exposition, openmetrics: bool) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(e.clone())));
    let mut out = String::new();
    if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        metrics::{expose, tests as m},
        paging::Paging,
    };

    fn exposition() -> Exposition {
        let snap = m::snapshot();
        let vms = BTreeMap::from([((100, 0), "web".to_owned())]);
        let paging = [Paging {
            module: "kvm_intel".to_owned(),
            parameter: "ept".to_owned(),
            nested: true,
        }];
        expose(&m::scrape_of(&snap, &vms, &paging)).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn openmetrics() {
        let text = text(&exposition(), true).unwrap_or_else(|e| panic!("{e}"));
        insta::assert_snapshot!(text);
    }

    #[test]
    fn prometheus_text() {
        let text = text(&exposition(), false).unwrap_or_else(|e| panic!("{e}"));
        insta::assert_snapshot!(text);
    }
}
