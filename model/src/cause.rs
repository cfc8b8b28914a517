//! The causes `kvmtrace reconcile` names for a difference between what a guest read
//! from the patched KVM's counter leaves and the host's own count: each read's
//! [`Verdict`], its name (in the JSON and for `--accept`) and what it says.

use serde::Serialize;

/// What a difference between the guest's and the host's count means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The guest read exactly the host's count.
    Exact,
    /// A reason the specification does not define, answered as undefined.
    Undefined,
    /// The guest is short by exactly the CPUID exit of this very query: the KVM counts
    /// an exit only after handling it.
    CpuidSelfExit,
    /// The guest value is the host count's low 32 bits: the high half was lost.
    Truncated32,
    /// The guest is short in a reason KVM handles on its fastpath (MSR writes of the
    /// TSC deadline, preemption timer), or a total is short by no more than those
    /// reasons' deficit: the KVM counts in the slow exit handler only.
    FastpathNotCounted,
    /// The guest counted KVM's synthetic INVALID_STATE exits (VMX reason 33), which
    /// `vmx_vcpu_run()` makes up when the guest needs emulation and which are not VM
    /// exits (`kvm:kvm_exit` never shows them): the KVM counts at the top of the exit
    /// handler.
    SyntheticCounted,
    /// The guest read the count of every VM running at the time: counters shared by
    /// all VMs (e.g. kvm.ko globals).
    SharedAcrossVms,
    /// The guest counted more than the host saw for this VM: counts carried over from an
    /// earlier VM or module load.
    CarriedOver,
    /// The guest is short in a VM with two or more vCPUs and nothing else explains it:
    /// updates lost to counters the vCPUs share without synchronisation.
    LostUpdates,
    /// The total leaf answers like an unpatched KVM (or zeros) while the count leaf
    /// works: the total is not reaching the guest (e.g. a missing `else` after it).
    TotalLeafWrong,
    /// EBX or EDX were not set (or ECX echoes the asked reason) while EAX is right.
    RegistersUnset,
    /// The cycles leaf answers like an unpatched KVM (zeros, or data in EAX) about a
    /// reason with exits: it is not implemented.
    CyclesNotImplemented,
    /// Undefined answered for a defined reason, or the other way round.
    WrongUndefinedAnswer,
    /// The guest received another answer than `kvm:kvm_cpuid` reported: the patch sets
    /// it after that tracepoint (e.g. once `kvm_cpuid()` has returned), so the kernel's
    /// own trace shows values the guest never got.
    AnswerAfterTracepoint,
    /// None of the above.
    Unexplained,
}

impl Verdict {
    /// Every verdict, in order.
    pub const ALL: [Self; 15] = [
        Self::Exact,
        Self::Undefined,
        Self::CpuidSelfExit,
        Self::Truncated32,
        Self::FastpathNotCounted,
        Self::SyntheticCounted,
        Self::SharedAcrossVms,
        Self::CarriedOver,
        Self::LostUpdates,
        Self::TotalLeafWrong,
        Self::RegistersUnset,
        Self::CyclesNotImplemented,
        Self::WrongUndefinedAnswer,
        Self::AnswerAfterTracepoint,
        Self::Unexplained,
    ];

    /// The answer the contract asks for: exact, or an undefined reason answered as such.
    pub fn is_ok(self) -> bool {
        matches!(self, Self::Exact | Self::Undefined)
    }

    /// A named fault of the patch: the counters are wrong for this cause. Not the right
    /// answers ([`Self::is_ok`]), not a count short by only this query's own CPUID exit
    /// (a KVM that counts an exit once it is handled is right), not
    /// [`Self::Unexplained`]. These are the causes a user may accept (`--accept`).
    pub fn is_fault(self) -> bool {
        !matches!(
            self,
            Self::Exact | Self::Undefined | Self::CpuidSelfExit | Self::Unexplained
        )
    }

    /// The name in the JSON and on the command line (`--accept`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Undefined => "undefined",
            Self::CpuidSelfExit => "cpuid_self_exit",
            Self::Truncated32 => "truncated32",
            Self::FastpathNotCounted => "fastpath_not_counted",
            Self::SyntheticCounted => "synthetic_counted",
            Self::SharedAcrossVms => "shared_across_vms",
            Self::CarriedOver => "carried_over",
            Self::LostUpdates => "lost_updates",
            Self::TotalLeafWrong => "total_leaf_wrong",
            Self::RegistersUnset => "registers_unset",
            Self::CyclesNotImplemented => "cycles_not_implemented",
            Self::WrongUndefinedAnswer => "wrong_undefined_answer",
            Self::AnswerAfterTracepoint => "answer_after_tracepoint",
            Self::Unexplained => "unexplained",
        }
    }

    /// The names of every fault, comma-separated: what `--accept` takes.
    pub fn fault_names() -> String {
        Self::ALL
            .iter()
            .filter(|v| v.is_fault())
            .map(|v| v.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A fault by its [`Self::name`] (or with `-` for `_`), for `--accept`; the error
    /// names the faults there are.
    pub fn parse_fault(text: &str) -> Result<Self, String> {
        let wanted = text.trim().replace('-', "_");
        match Self::ALL.into_iter().find(|v| v.name() == wanted) {
            Some(v) if v.is_fault() => Ok(v),
            Some(_) => Err(format!(
                "'{text}' is not a fault to accept; the causes are: {}",
                Self::fault_names()
            )),
            None => Err(format!(
                "unknown cause '{text}'; the causes are: {}",
                Self::fault_names()
            )),
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Undefined => "undefined reason answered as such",
            Self::CpuidSelfExit => "short by this query's own CPUID exit",
            Self::Truncated32 => "32-bit truncation",
            Self::FastpathNotCounted => "fastpath exits not counted",
            Self::SyntheticCounted => "synthetic INVALID_STATE exits counted",
            Self::SharedAcrossVms => "counters shared by all VMs",
            Self::CarriedOver => "counts carried over from an earlier VM or module load",
            Self::LostUpdates => "updates lost to unsynchronised counters (2+ vCPUs)",
            Self::TotalLeafWrong => "the total leaf answers wrongly (the count leaf works)",
            Self::RegistersUnset => "EBX/EDX not set or ECX echoing the input",
            Self::CyclesNotImplemented => "the cycles leaf is not implemented",
            Self::WrongUndefinedAnswer => "wrong undefined/not-handled answer",
            Self::AnswerAfterTracepoint => "answer set after kvm_cpuid's tracepoint",
            Self::Unexplained => "unexplained",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_json_names() {
        for v in Verdict::ALL {
            assert_eq!(
                serde_json::to_value(v).ok(),
                Some(serde_json::Value::from(v.name())),
                "{v:?}"
            );
        }
        let mut sorted = Verdict::ALL;
        sorted.sort();
        assert_eq!(sorted, Verdict::ALL, "in order, each once");
    }

    #[test]
    fn faults_are_every_named_wrong_cause() {
        let faults: Vec<Verdict> = Verdict::ALL.into_iter().filter(|v| v.is_fault()).collect();
        assert_eq!(faults.len(), 11);
        assert!(faults.iter().all(|v| !v.is_ok()));
        assert_eq!(
            Verdict::fault_names(),
            "truncated32, fastpath_not_counted, synthetic_counted, shared_across_vms, \
             carried_over, lost_updates, total_leaf_wrong, registers_unset, \
             cycles_not_implemented, wrong_undefined_answer, answer_after_tracepoint"
        );
    }

    #[test]
    fn parses_faults_by_name() {
        assert_eq!(
            Verdict::parse_fault("fastpath_not_counted"),
            Ok(Verdict::FastpathNotCounted)
        );
        assert_eq!(
            Verdict::parse_fault("registers-unset"),
            Ok(Verdict::RegistersUnset)
        );
        assert_eq!(
            Verdict::parse_fault(" answer_after_tracepoint "),
            Ok(Verdict::AnswerAfterTracepoint)
        );
        assert_eq!(
            Verdict::parse_fault("fastpath").err(),
            Some(format!(
                "unknown cause 'fastpath'; the causes are: {}",
                Verdict::fault_names()
            ))
        );
        for right in ["exact", "undefined", "cpuid_self_exit", "unexplained"] {
            let e = Verdict::parse_fault(right).err().unwrap_or_default();
            assert!(
                e.starts_with(&format!(
                    "'{right}' is not a fault to accept; the causes are: truncated32, "
                )),
                "{e}"
            );
        }
    }
}
