//! What `--detail` sub-keys mean: each (isa, reason, kind, sub-key) the eBPF side
//! counted, as a stable machine key and a label for people. Pure.
//!
//! The sub-keys are raw bits (see `tracer_common::detail_kind` and
//! `tracer_common::detail_plan`): VMX exit qualifications and `intr_info`, SVM
//! `exit_info_1`, and values of the tracepoints that fire while KVM handles the exit.

use std::collections::BTreeMap;

use tracer_common::{DetailPlan, ExitKey, detail_kind, detail_plan, exit_reasons::EXCEPTIONS};

use crate::{
    exit_reasons::Isa,
    kernel_hist::{self, ParseError},
};

/// One decoded sub-key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// What the sub-key is: `vector`, `cr`, `port`, `msr`, `cpuid`, `gpa`, `other`.
    pub kind: &'static str,
    /// Stable and machine-readable, unique within its reason (e.g. `0x3f8:out:1`).
    pub key: String,
    /// For people (e.g. `out 0x3f8 (COM1), 1 byte`).
    pub label: String,
}

/// The sub-key of the row that holds a reason's exits no sub-key was counted for.
pub const UNDECODED_KEY: &str = "undecoded";

/// The key suffix of an emulated instruction's row.
pub const EMULATED_SUFFIX: &str = ":emulated";

/// Decodes one sub-key of `kind` (a `detail_kind`, perhaps flagged
/// [`detail_kind::EMULATED`]) of an exit of `isa`.
pub fn decode(isa: Isa, kind: u32, sub: u64) -> Decoded {
    let mut d = decode_plain(isa, kind & !detail_kind::EMULATED, sub);
    if kind & detail_kind::EMULATED != 0 {
        d.key.push_str(EMULATED_SUFFIX);
        d.label.push_str(", emulated (no exit of its own)");
    }
    d
}

fn decode_plain(isa: Isa, kind: u32, sub: u64) -> Decoded {
    let (kind_name, key, label) = match kind {
        detail_kind::VECTOR => {
            let (key, label) = vector(sub);
            ("vector", key, label)
        }
        detail_kind::CR => {
            let (key, label) = cr(sub);
            ("cr", key, label)
        }
        detail_kind::PORT => {
            let (key, label) = port(isa, sub);
            ("port", key, label)
        }
        detail_kind::MSR => {
            let index = sub as u32;
            let write = sub >> 32 & 1 != 0;
            let op = if write { "write" } else { "read" };
            let label = match msr_name(index) {
                Some(name) => format!(
                    "{} {name} ({index:#x})",
                    if write { "wrmsr" } else { "rdmsr" }
                ),
                None => format!("{} {index:#x}", if write { "wrmsr" } else { "rdmsr" }),
            };
            ("msr", format!("{index:#x}:{op}"), label)
        }
        detail_kind::CPUID => {
            let leaf = sub as u32;
            let label = match cpuid_name(leaf) {
                Some(name) => format!("leaf {leaf:#x} ({name})"),
                None => format!("leaf {leaf:#x}"),
            };
            ("cpuid", format!("{leaf:#x}"), label)
        }
        detail_kind::GPA => {
            let base = sub << detail_kind::GPA_REGION_SHIFT;
            let end = base.saturating_add((1 << detail_kind::GPA_REGION_SHIFT) - 1);
            let label = match gpa_window(base) {
                Some(name) => format!("{base:#x}-{end:#x} ({name})"),
                None => format!("{base:#x}-{end:#x}"),
            };
            ("gpa", format!("{base:#x}"), label)
        }
        detail_kind::OTHER => (
            "other",
            "other".to_owned(),
            format!(
                "other sub-keys (past the cap of {} per VM and reason)",
                detail_kind::MAX_DETAIL_KEYS_PER_REASON
            ),
        ),
        k => (
            "unknown",
            format!("kind{k}:{sub:#x}"),
            format!("kind {k}, {sub:#x}"),
        ),
    };
    Decoded {
        kind: kind_name,
        key,
        label,
    }
}

/// VMX `intr_info` bits 10:0: vector (7:0) and event type (10:8).
fn vector(sub: u64) -> (String, String) {
    let vector = (sub & 0xff) as usize;
    let kind = (sub >> 8) & 7;
    let name = match (kind, vector) {
        (2, _) => "NMI".to_owned(),
        (_, v) => match EXCEPTIONS.get(v) {
            Some(n) if n.bytes().all(|b| b.is_ascii_alphabetic()) => format!("#{n}"),
            _ => format!("vector {v}"),
        },
    };
    let what = match kind {
        0 => "external interrupt",
        2 => "NMI",
        3 => "hardware exception",
        4 => "software interrupt",
        5 => "privileged software exception",
        6 => "software exception",
        _ => "event",
    };
    let key = if kind == 2 {
        "nmi".to_owned()
    } else {
        format!("{vector}")
    };
    let label = if kind == 2 {
        name
    } else {
        format!("{name} ({what})")
    };
    (key, label)
}

/// VMX CR_ACCESS qualification bits 5:0: register (3:0), access type (5:4).
fn cr(sub: u64) -> (String, String) {
    let n = sub & 0xf;
    match (sub >> 4) & 3 {
        0 => (format!("cr{n}:write"), format!("mov to CR{n}")),
        1 => (format!("cr{n}:read"), format!("mov from CR{n}")),
        2 => ("clts".to_owned(), "CLTS".to_owned()),
        _ => ("lmsw".to_owned(), "LMSW".to_owned()),
    }
}

/// A port I/O sub-key: port in bits 31:16, then VMX (size - 1 in 2:0, IN in 3,
/// string in 4) or SVM (IN in 0, string in 2, one-hot size in 6:4) bits.
fn port(isa: Isa, sub: u64) -> (String, String) {
    let port = (sub >> 16) as u16;
    let (input, string, size) = match isa {
        Isa::Svm => (
            sub & 1 != 0,
            sub & 4 != 0,
            match (sub >> 4) & 7 {
                1 => 1,
                2 => 2,
                _ => 4,
            },
        ),
        _ => (sub & 8 != 0, sub & 0x10 != 0, (sub & 7) + 1),
    };
    let dir = if input { "in" } else { "out" };
    let string_key = if string { ":string" } else { "" };
    let bytes = if size == 1 { "byte" } else { "bytes" };
    let op = match (input, string) {
        (true, true) => "ins",
        (true, false) => "in",
        (false, true) => "outs",
        (false, false) => "out",
    };
    let label = match port_name(port) {
        Some(name) => format!("{op} {port:#x} ({name}), {size} {bytes}"),
        None => format!("{op} {port:#x}, {size} {bytes}"),
    };
    (format!("{port:#x}:{dir}:{size}{string_key}"), label)
}

/// The PC ports every x86 VMM emulates, and QEMU's own.
fn port_name(port: u16) -> Option<&'static str> {
    Some(match port {
        0x20 | 0x21 => "PIC master",
        0xa0 | 0xa1 => "PIC slave",
        0x40..=0x43 => "PIT",
        0x60 | 0x64 => "i8042 keyboard controller",
        0x61 => "system control port B",
        0x70 | 0x71 => "CMOS/RTC",
        0x80 => "POST/delay port",
        0x92 => "fast A20",
        0xb2 | 0xb3 => "APM/SMI control",
        0xe9 => "debug console",
        0x1f0..=0x1f7 | 0x3f6 => "ATA primary",
        0x2e8..=0x2ef => "COM4",
        0x2f8..=0x2ff => "COM2",
        0x3c0..=0x3df => "VGA",
        0x3e8..=0x3ef => "COM3",
        0x3f8..=0x3ff => "COM1",
        0x402 => "QEMU debugcon",
        0x4d0 | 0x4d1 => "ELCR",
        0x510..=0x51b => "QEMU fw_cfg",
        0x600..=0x63f | 0xb000..=0xb03f => "ACPI PM",
        0xcf8..=0xcff => "PCI config",
        _ => return None,
    })
}

/// Names of the MSRs guests touch most (SDM Vol. 4; the kernel's msr-index.h and
/// kvm_para.h spellings).
fn msr_name(index: u32) -> Option<&'static str> {
    Some(match index {
        0x10 => "IA32_TIME_STAMP_COUNTER",
        0x11 => "KVM_WALL_CLOCK",
        0x12 => "KVM_SYSTEM_TIME",
        0x1b => "IA32_APIC_BASE",
        0x3a => "IA32_FEATURE_CONTROL",
        0x3b => "IA32_TSC_ADJUST",
        0x48 => "IA32_SPEC_CTRL",
        0x49 => "IA32_PRED_CMD",
        0x8b => "IA32_UCODE_REV",
        0xe7 => "IA32_MPERF",
        0xe8 => "IA32_APERF",
        0xfe => "IA32_MTRRCAP",
        0x10a => "IA32_ARCH_CAPABILITIES",
        0x174 => "IA32_SYSENTER_CS",
        0x175 => "IA32_SYSENTER_ESP",
        0x176 => "IA32_SYSENTER_EIP",
        0x179 => "IA32_MCG_CAP",
        0x17a => "IA32_MCG_STATUS",
        0x1a0 => "IA32_MISC_ENABLE",
        0x1d9 => "IA32_DEBUGCTL",
        0x277 => "IA32_PAT",
        0x2ff => "IA32_MTRR_DEF_TYPE",
        0x6e0 => "IA32_TSC_DEADLINE",
        0x802 => "x2APIC ID",
        0x803 => "x2APIC version",
        0x808 => "x2APIC TPR",
        0x80b => "x2APIC EOI",
        0x80d => "x2APIC LDR",
        0x80f => "x2APIC SVR",
        0x828 => "x2APIC ESR",
        0x830 => "x2APIC ICR",
        0x832 => "x2APIC LVT timer",
        0x838 => "x2APIC timer initial count",
        0x839 => "x2APIC timer current count",
        0x83e => "x2APIC timer divide",
        0xc000_0080 => "EFER",
        0xc000_0081 => "STAR",
        0xc000_0082 => "LSTAR",
        0xc000_0083 => "CSTAR",
        0xc000_0084 => "SYSCALL_MASK",
        0xc000_0100 => "FS_BASE",
        0xc000_0101 => "GS_BASE",
        0xc000_0102 => "KERNEL_GS_BASE",
        0xc000_0103 => "TSC_AUX",
        0x4b56_4d00 => "KVM_SYSTEM_TIME_NEW",
        0x4b56_4d01 => "KVM_WALL_CLOCK_NEW",
        0x4b56_4d02 => "KVM_ASYNC_PF_EN",
        0x4b56_4d03 => "KVM_STEAL_TIME",
        0x4b56_4d04 => "KVM_PV_EOI_EN",
        0x4b56_4d05 => "KVM_POLL_CONTROL",
        0x4b56_4d06 => "KVM_ASYNC_PF_INT",
        0x4b56_4d07 => "KVM_ASYNC_PF_ACK",
        0x4b56_4d08 => "KVM_MIGRATION_CONTROL",
        _ => return None,
    })
}

/// What the common CPUID leaves report (SDM Vol. 2A, CPUID; KVM's paravirt leaves).
fn cpuid_name(leaf: u32) -> Option<&'static str> {
    Some(match leaf {
        0 => "vendor, max leaf",
        1 => "features",
        2 => "TLB/cache",
        4 => "cache parameters",
        6 => "thermal and power",
        7 => "extended features",
        0xa => "performance monitoring",
        0xb => "topology",
        0xd => "XSAVE",
        0x1f => "topology v2",
        0x4000_0000 => "hypervisor",
        0x4000_0001 => "KVM features",
        0x8000_0000 => "max extended leaf",
        0x8000_0001 => "extended features",
        0x8000_0002..=0x8000_0004 => "brand string",
        0x8000_0007 => "power management",
        0x8000_0008 => "address sizes",
        _ => return None,
    })
}

/// The device windows of a PC at their usual guest-physical addresses.
fn gpa_window(base: u64) -> Option<&'static str> {
    Some(match base {
        0 => "low 1 MiB: BIOS, VGA window at 0xa0000",
        0xfec0_0000 => "IOAPIC",
        0xfed0_0000 => "HPET",
        0xfee0_0000 => "local APIC",
        0xfff0_0000 => "BIOS flash",
        _ => return None,
    })
}

/// Exits per (kind, key), summed over reasons: the shape both sides of the lab's
/// comparison are brought to.
pub type KeyCounts = BTreeMap<(String, String), u64>;

/// The kernel's own hist triggers keyed as `--detail` keys exits (the lab arms them
/// beside kvmtrace), as `cat hist` printed them.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelTriggers<'a> {
    /// `kvm:kvm_exit`: `keys=exit_reason,intr_info if isa == 1 && exit_reason == 0`
    /// and `keys=isa,exit_reason,info1` for the reasons keyed by `info1`.
    pub exit: &'a str,
    /// `kvm:kvm_msr`: `keys=ecx,write`.
    pub msr: &'a str,
    /// `kvm:kvm_cpuid`: `keys=function`.
    pub cpuid: &'a str,
    /// `kvm:kvm_page_fault`: `keys=fault_address.buckets=1048576`; `None` under
    /// shadow paging, where a #PF exit keeps its vector.
    pub page_fault: Option<&'a str>,
}

/// Exit reasons are below this in both numberings (VMX basic reasons; SVM exit codes,
/// NPF 0x400 and VMGEXIT 0x403 the highest).
const REASONS_BELOW: u32 = 0x1000;

/// The (isa, reason) pairs whose `--detail` sub-key [`detail_plan`] takes from
/// `kvm_exit`'s `info1` (`info1`: `Some`) or `intr_info` (`intr_info`: `Some`) at the
/// exit itself.
fn keyed_at_exit(info1: Option<u64>, intr_info: Option<u32>) -> Vec<(u32, u32)> {
    [tracer_common::isa::VMX, tracer_common::isa::SVM]
        .into_iter()
        .flat_map(|isa| (0..REASONS_BELOW).map(move |reason| (isa, reason)))
        .filter(|&(isa, reason)| {
            let exit = ExitKey::from_raw(isa, reason);
            matches!(detail_plan(&exit, info1, intr_info), DetailPlan::Now(..))
        })
        .collect()
}

/// The filter of the kernel's `keys=isa,exit_reason,info1` trigger
/// ([`KernelTriggers::exit`]): the reasons keyed by `info1`, of either isa (the key
/// holds the isa), e.g. `exit_reason == 28 || exit_reason == 30 || exit_reason == 123`.
pub fn info1_trigger_filter() -> String {
    let mut reasons: Vec<u32> = keyed_at_exit(Some(0), None)
        .into_iter()
        .map(|(_, reason)| reason)
        .collect();
    reasons.sort_unstable();
    reasons.dedup();
    let terms: Vec<String> = reasons
        .iter()
        .map(|reason| format!("exit_reason == {reason}"))
        .collect();
    terms.join(" || ")
}

/// The filter of the kernel's `keys=exit_reason,intr_info` trigger
/// ([`KernelTriggers::exit`]): the exits keyed by `intr_info`, each with its isa (the
/// key has none), e.g. `isa == 1 && exit_reason == 0`.
pub fn intr_info_trigger_filter() -> String {
    let terms: Vec<String> = keyed_at_exit(None, Some(0))
        .iter()
        .map(|(isa, reason)| format!("isa == {isa} && exit_reason == {reason}"))
        .collect();
    terms.join(" || ")
}

/// What `--detail` must show, from the kernel's triggers, decoded by the same
/// [`tracer_common::detail_plan`] and [`decode`] as kvmtrace's own rows.
pub fn reference(t: &KernelTriggers<'_>) -> Result<KeyCounts, ParseError> {
    let mut out = KeyCounts::new();
    let mut add = |isa: Isa, kind: u32, sub: u64, n: u64| {
        let d = decode(isa, kind, sub);
        *out.entry((d.kind.to_owned(), d.key)).or_default() += n;
    };
    for (keys, n) in kernel_hist::rows(t.exit)? {
        let get = |k: &str| keys.get(k).copied();
        let (Some(reason), plan_from) = (get("exit_reason"), (get("info1"), get("intr_info")))
        else {
            continue;
        };
        let isa = match (get("isa"), plan_from) {
            (Some(isa), (Some(_), None)) => isa,
            (None, (None, Some(_))) => u64::from(tracer_common::isa::VMX),
            _ => continue,
        };
        let (Ok(isa32), Ok(reason32)) = (u32::try_from(isa), u32::try_from(reason)) else {
            continue;
        };
        let exit = ExitKey::from_raw(isa32, reason32);
        let intr = plan_from.1.and_then(|i| u32::try_from(i).ok());
        if let DetailPlan::Now(kind, sub) = detail_plan(&exit, plan_from.0, intr) {
            add(Isa::from_raw(isa32), kind, sub, n);
        }
    }
    for (keys, n) in kernel_hist::rows(t.msr)? {
        if let (Some(&ecx), Some(&write)) = (keys.get("ecx"), keys.get("write")) {
            add(
                Isa::Vmx,
                detail_kind::MSR,
                (ecx & 0xffff_ffff) | (u64::from(write != 0) << 32),
                n,
            );
        }
    }
    for (keys, n) in kernel_hist::rows(t.cpuid)? {
        if let Some(&f) = keys.get("function") {
            add(Isa::Vmx, detail_kind::CPUID, f & 0xffff_ffff, n);
        }
    }
    if let Some(pf) = t.page_fault {
        for (keys, n) in kernel_hist::rows(pf)? {
            if let Some(&a) = keys.get("fault_address") {
                add(
                    Isa::Vmx,
                    detail_kind::GPA,
                    a >> detail_kind::GPA_REGION_SHIFT,
                    n,
                );
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::isa;

    #[test]
    fn the_kernel_triggers_filter_the_exits_keyed_at_the_exit() {
        assert_eq!(
            info1_trigger_filter(),
            "exit_reason == 28 || exit_reason == 30 || exit_reason == 123",
            "VMX CR_ACCESS and IO_INSTRUCTION, SVM IOIO"
        );
        assert_eq!(
            intr_info_trigger_filter(),
            "isa == 1 && exit_reason == 0",
            "VMX EXCEPTION_NMI"
        );
    }

    #[test]
    fn the_kernel_reference_decodes_like_kvmtrace() {
        let exit = "\
{ exit_reason:          0, intr_info: 2147486478 } hitcount:          5
{ isa:          1, exit_reason:         30, info1:   66584640 } hitcount:         12
{ isa:          1, exit_reason:         30, info1:   66584576 } hitcount:          1
{ isa:          1, exit_reason:         28, info1:          3 } hitcount:          7
{ isa:          1, exit_reason:         10 } hitcount:        651
";
        let msr = "{ ecx:       1760, write:          1 } hitcount:          9\n";
        let cpuid = "{ function:          1 } hitcount:          3\n";
        let pf = "{ fault_address: ~ 4276092928-4277141503 } hitcount:          4\n";
        let r = reference(&KernelTriggers {
            exit,
            msr,
            cpuid,
            page_fault: Some(pf),
        })
        .expect("parses");
        let get = |k: &str, key: &str| r.get(&(k.to_owned(), key.to_owned())).copied();
        assert_eq!(get("vector", "14"), Some(5));
        assert_eq!(
            get("port", "0x3f8:out:1"),
            Some(13),
            "the REP/encoding bits fold"
        );
        assert_eq!(get("cr", "cr3:write"), Some(7));
        assert_eq!(get("msr", "0x6e0:write"), Some(9));
        assert_eq!(get("cpuid", "0x1"), Some(3));
        assert_eq!(get("gpa", "0xfee00000"), Some(4));
        assert_eq!(r.len(), 6, "the count trigger's line is not a detail row");
    }

    fn plan(isa: u32, reason: u32, info1: u64, intr: u32) -> DetailPlan {
        detail_plan(&ExitKey::from_raw(isa, reason), Some(info1), Some(intr))
    }

    /// The eBPF side's plan and this decoding agree, from real exit fields.
    #[test]
    fn vmx_io_qualification_decodes() {
        // OUT DX, AL to 0x3f8: size 0 (1 byte), OUT, DX-encoded (bit 6).
        let DetailPlan::Now(kind, sub) = plan(isa::VMX, 30, 0x03f8_0040, 0) else {
            panic!("IO is keyed at the exit");
        };
        let d = decode(Isa::Vmx, kind, sub);
        assert_eq!(d.key, "0x3f8:out:1");
        assert_eq!(d.label, "out 0x3f8 (COM1), 1 byte");
        // REP INSW from 0x1f0: size 1 (2 bytes), IN, string, REP.
        let DetailPlan::Now(kind, sub) = plan(isa::VMX, 30, 0x01f0_0039, 0) else {
            panic!()
        };
        let d = decode(Isa::Vmx, kind, sub);
        assert_eq!(d.key, "0x1f0:in:2:string");
        assert_eq!(d.label, "ins 0x1f0 (ATA primary), 2 bytes");
    }

    #[test]
    fn svm_ioio_decodes_the_same() {
        // IN AL, 0x71: TYPE=1 (in), SZ8 (bit 4), A16 (bit 7), port 0x71.
        let DetailPlan::Now(kind, sub) = plan(isa::SVM, 0x7b, 0x0071_0091, 0) else {
            panic!()
        };
        let d = decode(Isa::Svm, kind, sub);
        assert_eq!(d.key, "0x71:in:1");
        assert_eq!(d.label, "in 0x71 (CMOS/RTC), 1 byte");
        // OUT DX, EAX to 0xcfc: SZ32 (bit 6).
        let DetailPlan::Now(_, sub) = plan(isa::SVM, 0x7b, 0x0cfc_0040, 0) else {
            panic!()
        };
        assert_eq!(decode(Isa::Svm, kind, sub).key, "0xcfc:out:4");
    }

    #[test]
    fn vectors_and_crs_decode() {
        // #PF: vector 14, type 3, error code valid (bit 11, masked), valid (bit 31).
        let DetailPlan::Now(kind, sub) = plan(isa::VMX, 0, 0, 0x8000_0b0e) else {
            panic!()
        };
        let d = decode(Isa::Vmx, kind, sub);
        assert_eq!((d.kind, d.key.as_str()), ("vector", "14"));
        assert_eq!(d.label, "#PF (hardware exception)");
        assert_eq!(decode(Isa::Vmx, kind, 0x202).key, "nmi");
        assert_eq!(
            decode(Isa::Vmx, kind, 0x306).label,
            "#UD (hardware exception)"
        );
        // mov to CR3 from RAX: CR 3, type 0; mov from CR3: type 1; LMSW: type 3.
        let DetailPlan::Now(kind, sub) = plan(isa::VMX, 28, 0x0003, 0) else {
            panic!()
        };
        assert_eq!(decode(Isa::Vmx, kind, sub).label, "mov to CR3");
        assert_eq!(decode(Isa::Vmx, kind, 0x13).key, "cr3:read");
        assert_eq!(decode(Isa::Vmx, kind, 0x30).key, "lmsw");
        assert_eq!(decode(Isa::Vmx, kind, 0x24).label, "CLTS");
    }

    #[test]
    fn tracepoint_keys_decode() {
        assert_eq!(
            plan(isa::VMX, 32, 0, 0),
            DetailPlan::Await(detail_kind::MSR)
        );
        assert_eq!(
            plan(isa::SVM, 0x7c, 1, 0),
            DetailPlan::Await(detail_kind::MSR)
        );
        assert_eq!(
            plan(isa::SVM, 0x400, 0, 0),
            DetailPlan::Await(detail_kind::GPA)
        );
        assert_eq!(plan(isa::VMX, 12, 0, 0), DetailPlan::None, "HLT has none");
        assert_eq!(
            detail_plan(&ExitKey::from_raw(isa::VMX, 0x8000_0021), Some(0), Some(0)),
            DetailPlan::None,
            "a failed entry has none"
        );
        assert_eq!(
            detail_plan(&ExitKey::from_raw(isa::VMX, 0), None, None),
            DetailPlan::None,
            "no intr_info field: not keyed"
        );
        let msr = decode(Isa::Vmx, detail_kind::MSR, 0x1_0000_06e0);
        assert_eq!(msr.key, "0x6e0:write");
        assert_eq!(msr.label, "wrmsr IA32_TSC_DEADLINE (0x6e0)");
        assert_eq!(
            decode(Isa::Vmx, detail_kind::MSR, 0x4b56_4d99).label,
            "rdmsr 0x4b564d99"
        );
        assert_eq!(
            decode(Isa::Vmx, detail_kind::CPUID, 1).label,
            "leaf 0x1 (features)"
        );
        let apic = decode(Isa::Vmx, detail_kind::GPA, 0xfee);
        assert_eq!(apic.key, "0xfee00000");
        assert_eq!(apic.label, "0xfee00000-0xfeefffff (local APIC)");
        assert_eq!(decode(Isa::Vmx, detail_kind::OTHER, 0).key, "other");
        assert_eq!(
            decode(Isa::Vmx, 99, 5).key,
            "kind99:0x5",
            "unknown kinds stay numbers"
        );
        let emulated = decode(Isa::Vmx, detail_kind::CPUID | detail_kind::EMULATED, 1);
        assert_eq!(
            (emulated.kind, emulated.key.as_str()),
            ("cpuid", "0x1:emulated")
        );
        assert_eq!(
            emulated.label,
            "leaf 0x1 (features), emulated (no exit of its own)"
        );
    }
}
