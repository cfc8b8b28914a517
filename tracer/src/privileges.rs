//! Whether this process may load and attach eBPF tracepoint programs.

use caps::{CapSet, Capability};

/// One line saying what is missing, or `None` when the process has what it needs:
/// CAP_SYS_ADMIN, or both CAP_BPF and CAP_PERFMON (Linux 5.8+).
pub fn missing() -> Option<String> {
    let has = |cap| caps::has_cap(None, CapSet::Effective, cap).unwrap_or(false);
    if has(Capability::CAP_SYS_ADMIN) || (has(Capability::CAP_BPF) && has(Capability::CAP_PERFMON))
    {
        return None;
    }
    Some(
        "root (or CAP_BPF and CAP_PERFMON) is needed to load eBPF programs: run kvmtrace with sudo"
            .to_owned(),
    )
}
