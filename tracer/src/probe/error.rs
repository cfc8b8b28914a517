//! What can go wrong loading, attaching or reading the eBPF side.

use aya::{maps::MapError, programs::ProgramError};
use kvmtrace_model::snapshot::Overflow;
use thiserror::Error;

use crate::tracefs::TracefsError;

/// How many verifier lines an error shows (the end of the log says what failed).
const VERIFIER_TAIL: usize = 12;

/// Failures of loading, attaching or reading the eBPF side.
#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error("cannot load the eBPF object: {0}")]
    Object(#[source] aya::EbpfError),
    #[error(
        "the kernel rejected eBPF program {program} ({io_error}); the verifier's last lines:\n{tail}"
    )]
    Verifier {
        program: String,
        io_error: std::io::Error,
        tail: String,
    },
    #[error("cannot {action} eBPF program {program}: {source}")]
    Program {
        action: &'static str,
        program: String,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error(
        "the fields of {tracepoint} lie {span} bytes apart, kvmtrace reads them in one {max}-byte read: this kernel's tracepoint is not supported"
    )]
    FieldsApart {
        tracepoint: String,
        span: u32,
        max: u32,
    },
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error(transparent)]
    Overflow(#[from] Overflow),
    #[error("count cell {0} stands for no exit reason: the eBPF object and this kvmtrace disagree")]
    CellWithoutReason(u32),
    #[error(
        "the kvm vendor module was reloaded and its layout changed: the counts read {was}, it now needs the {now}; restart kvmtrace, or record with time (without --counts-only)"
    )]
    LayoutChanged { was: String, now: String },
    #[error("cannot read the maps of the eBPF object: {0}")]
    ObjectMaps(String),
    #[error("cannot tell how many CPUs this host has: {0}")]
    Cpus(#[source] std::io::Error),
    #[error(
        "cannot attach eBPF program {program}: the kernel refuses perf events to all but CAP_SYS_ADMIN (kernel.perf_event_paranoid is {paranoid}, Debian's restriction): set it to 2 (sysctl kernel.perf_event_paranoid=2, or a file in /etc/sysctl.d), then CAP_PERFMON suffices; or run kvmtrace as root"
    )]
    PerfRestricted { program: String, paranoid: i32 },
}

/// A failed attach of `program` (to a tracepoint, through perf_event_open): named as
/// Debian's perf restriction when that is what refused it (EACCES, with
/// `kernel.perf_event_paranoid` above 2 and no CAP_SYS_ADMIN), so that the line says
/// what to change.
pub(super) fn attach_error(program: String, source: ProgramError) -> ProbeError {
    let paranoid = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok());
    let admin = caps::has_cap(
        None,
        caps::CapSet::Effective,
        caps::Capability::CAP_SYS_ADMIN,
    )
    .unwrap_or(false);
    match paranoid {
        Some(paranoid) if paranoid > 2 && !admin && denied(&source) => {
            ProbeError::PerfRestricted { program, paranoid }
        }
        _ => ProbeError::Program {
            action: "attach",
            program,
            source,
        },
    }
}

/// Whether an error, or one it was caused by, is an EACCES.
fn denied(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut at = Some(err);
    while let Some(e) = at {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::EACCES))
        {
            return true;
        }
        at = e.source();
    }
    false
}

/// A failed operation on map `map`, as a [`ProbeError`].
pub(super) fn map_err(map: &'static str) -> impl FnOnce(MapError) -> ProbeError {
    move |source| ProbeError::Map { map, source }
}

/// A failed load of `program`: the verifier's last lines when it refused the program.
pub(super) fn load_error(program: &str, err: ProgramError) -> ProbeError {
    match err {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
            let tail = lines[lines.len().saturating_sub(VERIFIER_TAIL)..].join("\n");
            ProbeError::Verifier {
                program: program.to_owned(),
                io_error,
                tail,
            }
        }
        source => ProbeError::Program {
            action: "load",
            program: program.to_owned(),
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eacces_is_found_down_the_chain() {
        let io = std::io::Error::from_raw_os_error(libc::EACCES);
        let wrapped = ProgramError::SyscallError(aya::sys::SyscallError {
            call: "perf_event_open_trace_point",
            io_error: io,
        });
        assert!(denied(&wrapped));
        let other = ProgramError::SyscallError(aya::sys::SyscallError {
            call: "perf_event_open_trace_point",
            io_error: std::io::Error::from_raw_os_error(libc::ENOENT),
        });
        assert!(!denied(&other));
    }
}
