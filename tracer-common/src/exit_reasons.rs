//! Names of VMX basic exit reasons (Intel SDM Vol. 3D, Appendix C) and SVM exit codes
//! (AMD APM Vol. 2, Appendix C), including the ones KVM does not handle. `no_std`, so the
//! eBPF-free tools (xtask) and `kvmtrace` share one table.
//!
//! Names follow the kernel's `EXIT_REASON_*` / `SVM_EXIT_*` spellings without the
//! prefix, as the `kvm:kvm_exit` format prints VMX reasons.

use core::fmt;

// The reasons kvmtrace's own logic names (the lab's micro workload, reconcile's
// fastpath and synthetic exits); the tables below name them all.

/// VMX exception or NMI (basic reason 0).
pub const VMX_EXCEPTION_NMI: u32 = 0;
/// VMX CPUID (basic reason 10).
pub const VMX_CPUID: u32 = 10;
/// VMX HLT (12).
pub const VMX_HLT: u32 = 12;
/// VMX I/O instruction (30).
pub const VMX_IO_INSTRUCTION: u32 = 30;
/// VMX control-register access (28).
pub const VMX_CR_ACCESS: u32 = 28;
/// VMX RDMSR (31).
pub const VMX_MSR_READ: u32 = 31;
/// VMX WRMSR (32).
pub const VMX_MSR_WRITE: u32 = 32;
/// VMX INVALID_STATE (33): what `vmx_vcpu_run()` makes up, as a failed entry, when the
/// guest state needs emulation; never traced as a `kvm:kvm_exit`.
pub const VMX_INVALID_STATE: u32 = 33;
/// VMX EPT violation (48).
pub const VMX_EPT_VIOLATION: u32 = 48;
/// VMX preemption timer expired (52).
pub const VMX_PREEMPTION_TIMER: u32 = 52;
/// SVM CPUID (exit code 0x72).
pub const SVM_CPUID: u32 = 0x72;
/// SVM HLT (0x78).
pub const SVM_HLT: u32 = 0x78;
/// SVM IOIO (0x7b).
pub const SVM_IOIO: u32 = 0x7b;
/// SVM MSR, read or write (0x7c).
pub const SVM_MSR: u32 = 0x7c;
/// SVM nested page fault (0x400).
pub const SVM_NPF: u32 = 0x400;

/// VMX basic exit reasons, SDM Vol. 3D Table C-1. Numbers 35, 38 and 42 are unused.
pub const VMX: &[(u32, &str)] = &[
    (0, "EXCEPTION_NMI"),
    (1, "EXTERNAL_INTERRUPT"),
    (2, "TRIPLE_FAULT"),
    (3, "INIT_SIGNAL"),
    (4, "SIPI_SIGNAL"),
    (5, "IO_SMI"),
    (6, "OTHER_SMI"),
    (7, "INTERRUPT_WINDOW"),
    (8, "NMI_WINDOW"),
    (9, "TASK_SWITCH"),
    (10, "CPUID"),
    (11, "GETSEC"),
    (12, "HLT"),
    (13, "INVD"),
    (14, "INVLPG"),
    (15, "RDPMC"),
    (16, "RDTSC"),
    (17, "RSM"),
    (18, "VMCALL"),
    (19, "VMCLEAR"),
    (20, "VMLAUNCH"),
    (21, "VMPTRLD"),
    (22, "VMPTRST"),
    (23, "VMREAD"),
    (24, "VMRESUME"),
    (25, "VMWRITE"),
    (26, "VMOFF"),
    (27, "VMON"),
    (28, "CR_ACCESS"),
    (29, "DR_ACCESS"),
    (30, "IO_INSTRUCTION"),
    (31, "MSR_READ"),
    (32, "MSR_WRITE"),
    (33, "INVALID_STATE"),
    (34, "MSR_LOAD_FAIL"),
    (36, "MWAIT_INSTRUCTION"),
    (37, "MONITOR_TRAP_FLAG"),
    (39, "MONITOR_INSTRUCTION"),
    (40, "PAUSE_INSTRUCTION"),
    (41, "MCE_DURING_VMENTRY"),
    (43, "TPR_BELOW_THRESHOLD"),
    (44, "APIC_ACCESS"),
    (45, "EOI_INDUCED"),
    (46, "GDTR_IDTR"),
    (47, "LDTR_TR"),
    (48, "EPT_VIOLATION"),
    (49, "EPT_MISCONFIG"),
    (50, "INVEPT"),
    (51, "RDTSCP"),
    (52, "PREEMPTION_TIMER"),
    (53, "INVVPID"),
    (54, "WBINVD"),
    (55, "XSETBV"),
    (56, "APIC_WRITE"),
    (57, "RDRAND"),
    (58, "INVPCID"),
    (59, "VMFUNC"),
    (60, "ENCLS"),
    (61, "RDSEED"),
    (62, "PML_FULL"),
    (63, "XSAVES"),
    (64, "XRSTORS"),
    (65, "PCONFIG"),
    (66, "SPP_EVENT"),
    (67, "UMWAIT"),
    (68, "TPAUSE"),
    (69, "LOADIWKEY"),
    (70, "ENCLV"),
    (71, "SGX_CONFLICT"),
    (72, "ENQCMD_PASID_FAIL"),
    (73, "ENQCMDS_PASID_FAIL"),
    (74, "BUS_LOCK"),
    (75, "NOTIFY"),
    (76, "SEAMCALL"),
    (77, "TDCALL"),
    (78, "RDMSRLIST"),
    (79, "WRMSRLIST"),
    (80, "URDMSR"),
    (81, "UWRMSR"),
    (84, "MSR_READ_IMM"),
    (85, "MSR_WRITE_IMM"),
];

/// SVM exit codes that are not part of a numbered range (APM Vol. 2, Table C-1, and
/// the GHCB's software-defined VMGEXIT codes the kernel traces).
pub const SVM: &[(u32, &str)] = &[
    (0x60, "INTR"),
    (0x61, "NMI"),
    (0x62, "SMI"),
    (0x63, "INIT"),
    (0x64, "VINTR"),
    (0x65, "CR0_SEL_WRITE"),
    (0x66, "IDTR_READ"),
    (0x67, "GDTR_READ"),
    (0x68, "LDTR_READ"),
    (0x69, "TR_READ"),
    (0x6a, "IDTR_WRITE"),
    (0x6b, "GDTR_WRITE"),
    (0x6c, "LDTR_WRITE"),
    (0x6d, "TR_WRITE"),
    (0x6e, "RDTSC"),
    (0x6f, "RDPMC"),
    (0x70, "PUSHF"),
    (0x71, "POPF"),
    (0x72, "CPUID"),
    (0x73, "RSM"),
    (0x74, "IRET"),
    (0x75, "SWINT"),
    (0x76, "INVD"),
    (0x77, "PAUSE"),
    (0x78, "HLT"),
    (0x79, "INVLPG"),
    (0x7a, "INVLPGA"),
    (0x7b, "IOIO"),
    (0x7c, "MSR"),
    (0x7d, "TASK_SWITCH"),
    (0x7e, "FERR_FREEZE"),
    (0x7f, "SHUTDOWN"),
    (0x80, "VMRUN"),
    (0x81, "VMMCALL"),
    (0x82, "VMLOAD"),
    (0x83, "VMSAVE"),
    (0x84, "STGI"),
    (0x85, "CLGI"),
    (0x86, "SKINIT"),
    (0x87, "RDTSCP"),
    (0x88, "ICEBP"),
    (0x89, "WBINVD"),
    (0x8a, "MONITOR"),
    (0x8b, "MWAIT"),
    (0x8c, "MWAIT_COND"),
    (0x8d, "XSETBV"),
    (0x8e, "RDPRU"),
    (0x8f, "EFER_WRITE_TRAP"),
    (0xa0, "INVLPGB"),
    (0xa1, "INVLPGB_ILLEGAL"),
    (0xa2, "INVPCID"),
    (0xa3, "MCOMMIT"),
    (0xa4, "TLBSYNC"),
    (0xa5, "BUS_LOCK"),
    (0xa6, "IDLE_HLT"),
    (0x400, "NPF"),
    (0x401, "AVIC_INCOMPLETE_IPI"),
    (0x402, "AVIC_UNACCELERATED_ACCESS"),
    (0x403, "VMGEXIT"),
    (0x8000_0001, "VMGEXIT_MMIO_READ"),
    (0x8000_0002, "VMGEXIT_MMIO_WRITE"),
    (0x8000_0003, "VMGEXIT_NMI_COMPLETE"),
    (0x8000_0004, "VMGEXIT_AP_HLT_LOOP"),
    (0x8000_0005, "VMGEXIT_AP_JUMP_TABLE"),
    (0x8000_0010, "VMGEXIT_PSC"),
    (0x8000_0011, "VMGEXIT_GUEST_REQUEST"),
    (0x8000_0012, "VMGEXIT_EXT_GUEST_REQUEST"),
    (0x8000_0013, "VMGEXIT_AP_CREATION"),
    (0x8000_fffd, "VMGEXIT_HV_FEATURES"),
    (0x8000_fffe, "VMGEXIT_TERM_REQUEST"),
    (0x8000_ffff, "VMGEXIT_UNSUPPORTED"),
    (0xffff_ffff, "INVALID"),
];

/// Exception mnemonics by vector, for the SVM 0x40..=0x5f range.
pub const EXCEPTIONS: [&str; 32] = [
    "DE", "DB", "NMI", "BP", "OF", "BR", "UD", "NM", "DF", "09", "TS", "NP", "SS", "GP", "PF",
    "15", "MF", "AC", "MC", "XM", "VE", "CP", "22", "23", "24", "25", "26", "27", "HV", "VC", "SX",
    "31",
];

/// The name of an exit reason: a fixed name, or one of the numbered SVM ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReasonName {
    Fixed(&'static str),
    ReadCr(u32),
    WriteCr(u32),
    ReadDr(u32),
    WriteDr(u32),
    Exception(&'static str),
    CrWriteTrap(u32),
}

impl fmt::Display for ReasonName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(s) => f.write_str(s),
            Self::ReadCr(n) => write!(f, "READ_CR{n}"),
            Self::WriteCr(n) => write!(f, "WRITE_CR{n}"),
            Self::ReadDr(n) => write!(f, "READ_DR{n}"),
            Self::WriteDr(n) => write!(f, "WRITE_DR{n}"),
            Self::Exception(m) => write!(f, "EXCP_{m}"),
            Self::CrWriteTrap(n) => write!(f, "CR{n}_WRITE_TRAP"),
        }
    }
}

fn lookup(table: &[(u32, &'static str)], reason: u32) -> Option<&'static str> {
    table
        .binary_search_by_key(&reason, |&(n, _)| n)
        .ok()
        .map(|i| table[i].1)
}

/// The name of VMX basic exit reason `reason`, if the SDM defines it.
pub fn vmx(reason: u32) -> Option<ReasonName> {
    lookup(VMX, reason).map(ReasonName::Fixed)
}

/// The name of SVM exit code `code`, if the APM (or the GHCB spec) defines it.
pub fn svm(code: u32) -> Option<ReasonName> {
    let n = code & 0xf;
    match code {
        0x00..=0x0f => Some(ReasonName::ReadCr(n)),
        0x10..=0x1f => Some(ReasonName::WriteCr(n)),
        0x20..=0x2f => Some(ReasonName::ReadDr(n)),
        0x30..=0x3f => Some(ReasonName::WriteDr(n)),
        0x40..=0x5f => Some(ReasonName::Exception(EXCEPTIONS[(code - 0x40) as usize])),
        0x90..=0x9f => Some(ReasonName::CrWriteTrap(n)),
        _ => lookup(SVM, code).map(ReasonName::Fixed),
    }
}

/// The name of `reason` for the `kvm:kvm_exit` `isa` value (1 VMX, 2 SVM).
pub fn name(isa: u32, reason: u32) -> Option<ReasonName> {
    match isa {
        crate::isa::VMX => vmx(reason),
        crate::isa::SVM => svm(reason),
        _ => None,
    }
}

/// Every SVM code in the numbered ranges, in order.
pub fn svm_range_codes() -> impl Iterator<Item = u32> {
    (0x00..=0x5f).chain(0x90..=0x9f)
}

/// Whether the SDM (VMX) or the APM (SVM) defines `reason` as a hardware exit reason.
/// The GHCB's software VMGEXIT codes (0x8000_xxxx) have names, since KVM traces them
/// for SEV-ES guests, but hardware reports all of them as VMGEXIT (0x403).
pub fn defined_by_spec(isa: u32, reason: u32) -> bool {
    let ghcb = isa == crate::isa::SVM && reason & 0xffff_0000 == 0x8000_0000;
    !ghcb && name(isa, reason).is_some()
}
