//! The eBPF programs: one row each, with its name, its kind, what it attaches to and
//! when it is wanted. Everything that names a program reads it from here.

use aya::programs::{KProbe, ProgramError, RawTracePoint, TracePoint};
use kvmtrace_model::tracefs_format::Tracepoint;

use super::{
    config::ProbeConfig,
    error::{ProbeError, load_error},
    loaded::Loaded,
};
use crate::exit_layout::Choice;

/// How a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// A raw tracepoint: it needs no field of the record.
    Raw,
    /// A classic tracepoint: it reads the record's fields.
    Classic,
    /// A kprobe on a kernel function.
    KProbe,
}

/// What a program attaches to.
#[derive(Clone, Copy, Debug)]
pub(super) enum Target {
    /// The exit tracepoint ([`ProbeConfig::exit_tracepoint`]).
    Exit,
    /// The entry tracepoint ([`ProbeConfig::entry_tracepoint`]).
    Entry,
    /// This tracepoint (category, name).
    Tracepoint(&'static str, &'static str),
    /// This kernel function.
    Symbol(&'static str),
}

/// One eBPF program.
pub(super) struct Program {
    pub name: &'static str,
    pub kind: Kind,
    pub target: Target,
    /// Whether `config` uses it.
    pub wanted: fn(&ProbeConfig) -> bool,
}

impl Program {
    /// The tracepoint it attaches to; `None` for a kprobe.
    pub fn tracepoint(&self, config: &ProbeConfig) -> Option<Tracepoint> {
        match self.target {
            Target::Exit => Some(config.exit_tracepoint.clone()),
            Target::Entry => Some(config.entry_tracepoint.clone()),
            Target::Tracepoint(category, name) => Some(Tracepoint::new(category, name)),
            Target::Symbol(_) => None,
        }
    }

    /// Loads it and attaches it to `tp` (a tracepoint program).
    pub fn attach(&self, loaded: &mut Loaded, tp: &Tracepoint) -> Result<(), ProbeError> {
        let name = self.name;
        let prog = loaded.program_mut(name)?;
        let attached = match self.kind {
            Kind::Raw => {
                let raw: &mut RawTracePoint = prog.try_into().map_err(unusable(name))?;
                raw.load().map_err(|e| load_error(name, e))?;
                raw.attach(&tp.name).map(drop)
            }
            Kind::Classic => {
                let tracepoint: &mut TracePoint = prog.try_into().map_err(unusable(name))?;
                tracepoint.load().map_err(|e| load_error(name, e))?;
                tracepoint.attach(&tp.category, &tp.name).map(drop)
            }
            Kind::KProbe => return Err(unusable(name)(ProgramError::UnexpectedProgramType)),
        };
        attached.map_err(|source| super::error::attach_error(format!("{name} to {tp}"), source))
    }

    /// Loads it and attaches it to its function (a kprobe). The attach's own failure
    /// is returned inside: the caller decides whether that is fatal.
    pub fn attach_kprobe(
        &self,
        loaded: &mut Loaded,
    ) -> Result<Result<(), ProgramError>, ProbeError> {
        let name = self.name;
        let Target::Symbol(symbol) = self.target else {
            return Err(unusable(name)(ProgramError::UnexpectedProgramType));
        };
        let kprobe: &mut KProbe = loaded
            .program_mut(name)?
            .try_into()
            .map_err(unusable(name))?;
        kprobe.load().map_err(|e| load_error(name, e))?;
        Ok(kprobe.attach(symbol, 0).map(drop))
    }
}

/// A program that is not of the kind its row says.
fn unusable(program: &str) -> impl FnOnce(ProgramError) -> ProbeError + '_ {
    move |source| ProbeError::Program {
        action: "use",
        program: program.to_owned(),
        source,
    }
}

/// The count path (`--counts-only`): one exit program, and process and module
/// tracking only.
fn counting(c: &ProbeConfig) -> bool {
    c.counts.is_some()
}

/// The count path reading the exit from the vCPU (a raw tracepoint).
fn counting_raw(c: &ProbeConfig) -> bool {
    matches!(c.counts, Some(Choice::Raw { .. })) && !c.empty_exit
}

pub(super) const KVM_EXIT_RAW: Program = Program {
    name: "kvm_exit_raw",
    kind: Kind::Raw,
    target: Target::Exit,
    wanted: |c| !counting(c) && c.raw_exit.is_some(),
};
pub(super) const KVM_EXIT_COUNT: Program = Program {
    name: "kvm_exit_count",
    kind: Kind::Raw,
    target: Target::Exit,
    wanted: counting_raw,
};
pub(super) const KVM_EXIT_COUNT_TP: Program = Program {
    name: "kvm_exit_count_tp",
    kind: Kind::Classic,
    target: Target::Exit,
    wanted: |c| counting(c) && !counting_raw(c) && !c.empty_exit,
};
/// The floor: an empty program where the count path's would be (for the bench).
pub(super) const KVM_EXIT_EMPTY: Program = Program {
    name: "kvm_exit_empty",
    kind: Kind::Raw,
    target: Target::Exit,
    wanted: |c| counting(c) && c.empty_exit,
};
pub(super) const KVM_ENTRY: Program = Program {
    name: "kvm_entry",
    kind: Kind::Raw,
    target: Target::Entry,
    wanted: |c| !counting(c),
};
pub(super) const SCHED_SWITCH: Program = Program {
    name: "sched_switch",
    kind: Kind::Raw,
    target: Target::Tracepoint("sched", "sched_switch"),
    wanted: |c| !counting(c),
};
pub(super) const SCHED_PROCESS_EXIT: Program = Program {
    name: "sched_process_exit",
    kind: Kind::Classic,
    target: Target::Tracepoint("sched", "sched_process_exit"),
    wanted: |_| true,
};
pub(super) const TASK_NEWTASK: Program = Program {
    name: "task_newtask",
    kind: Kind::Classic,
    target: Target::Tracepoint("task", "task_newtask"),
    wanted: |_| true,
};
/// Its tracepoint fires on every CPUID exit: only paid for when used.
pub(super) const KVM_CPUID: Program = Program {
    name: "kvm_cpuid",
    kind: Kind::Classic,
    target: Target::Tracepoint("kvm", "kvm_cpuid"),
    wanted: |c| !counting(c) && (c.snapshots.is_some() || c.detail),
};
pub(super) const KVM_MSR: Program = Program {
    name: "kvm_msr",
    kind: Kind::Classic,
    target: Target::Tracepoint("kvm", "kvm_msr"),
    wanted: |c| !counting(c) && c.detail,
};
pub(super) const KVM_PAGE_FAULT: Program = Program {
    name: "kvm_page_fault",
    kind: Kind::Classic,
    target: Target::Tracepoint("kvm", "kvm_page_fault"),
    wanted: |c| !counting(c) && c.detail,
};
/// Optional: kernels without `module:module_load` have everything in phase 0.
pub(super) const MODULE_LOAD: Program = Program {
    name: "module_load",
    kind: Kind::Classic,
    target: Target::Tracepoint("module", "module_load"),
    wanted: |_| true,
};
pub(super) const KVM_EXIT: Program = Program {
    name: "kvm_exit",
    kind: Kind::Classic,
    target: Target::Exit,
    wanted: |c| !counting(c) && c.raw_exit.is_none(),
};
/// The synthetic-exit counter on `vmx_vcpu_run()` (with snapshots, where kvm_intel
/// is loaded).
pub(super) const VCPU_RUN_VMX: Program = Program {
    name: "vcpu_run_vmx",
    kind: Kind::KProbe,
    target: Target::Symbol("vmx_vcpu_run"),
    wanted: |c| c.snapshots.is_some(),
};

/// The programs, in attach order: the entry, exit-cleanup and new-task programs first,
/// so an exit is only timed once its entry program is attached, threads that exit from
/// now on are forgotten, and child processes created from now on are followed. The
/// kprobe comes last, once every tracepoint is attached.
pub(super) const PROGRAMS: [Program; 14] = [
    KVM_EXIT_RAW,
    KVM_EXIT_COUNT,
    KVM_EXIT_COUNT_TP,
    KVM_EXIT_EMPTY,
    KVM_ENTRY,
    SCHED_SWITCH,
    SCHED_PROCESS_EXIT,
    TASK_NEWTASK,
    KVM_CPUID,
    KVM_MSR,
    KVM_PAGE_FAULT,
    MODULE_LOAD,
    KVM_EXIT,
    VCPU_RUN_VMX,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_path_has_one_exit_program() {
        let exit_programs = |c: &ProbeConfig| -> Vec<&str> {
            PROGRAMS
                .iter()
                .filter(|p| matches!(p.target, Target::Exit) && (p.wanted)(c))
                .map(|p| p.name)
                .collect()
        };
        let timing = ProbeConfig::default();
        assert_eq!(exit_programs(&timing), ["kvm_exit"]);
        let offsets = crate::exit_layout::Offsets {
            vmx_exit_reason: Some(0),
            svm_vmcb: None,
            vcpu_id: 0,
        };
        let raw_exit = ProbeConfig {
            raw_exit: Some(offsets),
            ..ProbeConfig::default()
        };
        assert_eq!(exit_programs(&raw_exit), ["kvm_exit_raw"]);
        let counts = |counts| ProbeConfig {
            counts: Some(counts),
            ..ProbeConfig::default()
        };
        assert_eq!(
            exit_programs(&counts(raw_choice(offsets))),
            ["kvm_exit_count"]
        );
        let classic = Choice::Classic {
            reason: "no BTF".to_owned(),
        };
        assert_eq!(
            exit_programs(&counts(classic.clone())),
            ["kvm_exit_count_tp"]
        );
        for choice in [raw_choice(offsets), classic] {
            let floor = ProbeConfig {
                empty_exit: true,
                ..counts(choice)
            };
            assert_eq!(exit_programs(&floor), ["kvm_exit_empty"]);
        }
    }

    fn raw_choice(offsets: crate::exit_layout::Offsets) -> Choice {
        Choice::Raw {
            offsets,
            module: "kvm_intel".to_owned(),
        }
    }

    #[test]
    fn names_are_unique() {
        let mut names: Vec<&str> = PROGRAMS.iter().map(|p| p.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), PROGRAMS.len());
    }
}
