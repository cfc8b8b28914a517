//! Whether this process may load and attach eBPF tracepoint programs.

use caps::{CapSet, Capability};

/// One line saying what is missing, or `None` when the process has what it needs:
/// CAP_SYS_ADMIN, or both CAP_BPF and CAP_PERFMON (Linux 5.8+). tracefs, which is
/// root's, is checked where it is read ([`crate::tracefs`]): a tracefs mounted for a
/// group needs no capability of its own.
pub fn missing() -> Option<String> {
    missing_of(|cap| caps::has_cap(None, CapSet::Effective, cap).unwrap_or(false))
}

/// [`missing`], with `has` telling which capabilities the process has.
fn missing_of(has: impl Fn(Capability) -> bool) -> Option<String> {
    if has(Capability::CAP_SYS_ADMIN) {
        return None;
    }
    let (bpf, perfmon) = (has(Capability::CAP_BPF), has(Capability::CAP_PERFMON));
    let (lacks, has_other) = match (bpf, perfmon) {
        (true, true) => return None,
        (false, false) => {
            return Some(
                "root (or CAP_BPF and CAP_PERFMON) is needed to load eBPF programs: run kvmtrace with sudo"
                    .to_owned(),
            );
        }
        (true, false) => ("CAP_PERFMON", "CAP_BPF"),
        (false, true) => ("CAP_BPF", "CAP_PERFMON"),
    };
    Some(format!(
        "{lacks} is missing (kvmtrace has {has_other}): loading eBPF programs needs both, or root: \
         run kvmtrace with sudo, or give it {lacks} too"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(caps: &[Capability]) -> Option<String> {
        missing_of(|c| caps.contains(&c))
    }

    #[test]
    fn names_the_missing_capability() {
        use Capability::*;
        assert_eq!(with(&[CAP_BPF, CAP_PERFMON]), None);
        assert_eq!(with(&[CAP_SYS_ADMIN]), None);
        let none = with(&[]).unwrap_or_default();
        assert!(none.contains("CAP_BPF and CAP_PERFMON"), "{none}");
        let no_perfmon = with(&[CAP_BPF, CAP_DAC_READ_SEARCH]).unwrap_or_default();
        assert!(
            no_perfmon.starts_with("CAP_PERFMON is missing (kvmtrace has CAP_BPF)"),
            "{no_perfmon}"
        );
        let no_bpf = with(&[CAP_PERFMON]).unwrap_or_default();
        assert!(no_bpf.starts_with("CAP_BPF is missing"), "{no_bpf}");
        assert!(!no_bpf.contains('\n'), "one line: {no_bpf}");
    }
}
