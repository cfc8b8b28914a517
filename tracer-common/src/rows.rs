//! Thread rows: the count path's and the per-VM timing path's cells, one row per vCPU
//! thread.
//!
//! A vCPU thread runs on one CPU at a time, and every `kvm_exit` and `kvm_entry` of a
//! vCPU fires on the thread that runs it. So a row that only its thread writes needs
//! neither a copy per CPU nor an atomic add: kernel memory follows the threads traced,
//! not the CPU count. A thread takes a row (a slot) on its first exit, from a queue of
//! free slots that user space fills; at its end it puts the slot on the queue of ended
//! slots, and user space reads the row, zeroes it and frees the slot.
//!
//! A row has [`CELLS`] cells, for the reasons of the host's ISA ([`cell`]): VMX basic
//! reasons 0..64, and 64 SVM exit codes ([`SVM_CODES`]). Any other exit (a failed VMX
//! entry, a rarer code, an exit of another ISA) goes, with its raw code, to the
//! overflow map: exact, but with a hash lookup and an atomic add.

use crate::{ExitKey, VMX_BASIC_REASON_MASK, VMX_FAILED_VMENTRY, isa};

/// Cells per row: the mask `cell & (CELLS - 1)` shows the verifier the bound.
pub const CELLS: u32 = 64;
/// Not a cell: the exit goes to the overflow map.
pub const NONE: u32 = CELLS;
/// Slot 0 holds the exits of threads that found no free slot (counted as such in
/// `drop_kind::COUNT_SLOTS_FULL`): its row is never any VM's.
pub const FULL_SLOT: u32 = 0;
/// The per-CPU cache's slot value for a thread the pid filter does not trace.
pub const NOT_TRACED: u32 = u32::MAX;

/// The SVM exit codes with a cell, in cell order (AMD APM vol. 2, appendix C): the
/// CR0/3/4/8 reads and writes, DR7's, the exceptions KVM intercepts, the intercepts
/// 0x60..0x8f but SKINIT and FERR_FREEZE, CR0 write trap, INVPCID, NPF, the AVIC
/// codes, VMGEXIT and `SVM_EXIT_ERR` (-1).
pub const SVM_CODES: [u32; CELLS as usize] = [
    0x00,
    0x03,
    0x04,
    0x08,
    0x10,
    0x13,
    0x14,
    0x18, // CR reads and writes
    0x27,
    0x37, // DR7 read, write
    0x40,
    0x41,
    0x43,
    0x46,
    0x47,
    0x4d,
    0x4e,
    0x51,
    0x52, // #DE #DB #BP #UD #NM #GP #PF #AC #MC
    0x60,
    0x61,
    0x62,
    0x63,
    0x64,
    0x65, // INTR NMI SMI INIT VINTR CR0_SEL_WRITE
    0x6e,
    0x6f,
    0x70,
    0x71,
    0x72,
    0x73,
    0x74,
    0x75,
    0x76,
    0x77,
    0x78,
    0x79,
    0x7a,
    0x7b,
    0x7c,
    0x7d,
    0x7f,
    0x80,
    0x81,
    0x82,
    0x83,
    0x84,
    0x85,
    0x87,
    0x88,
    0x89,
    0x8a,
    0x8b,
    0x8c,
    0x8d,
    0x8e,
    0x8f, // RDTSC .. EFER_WRITE_TRAP
    0x90,
    0xa2, // CR0 write trap, INVPCID
    0x400,
    0x401,
    0x402,
    0x403,    // NPF, AVIC_INCOMPLETE_IPI, AVIC_NOACCEL, VMGEXIT
    u32::MAX, // SVM_EXIT_ERR
];

/// SVM codes below this are looked up in [`SVM_LOW`]: a power of two, so that the
/// index's mask alone shows the verifier the bound (a reason a guest asks about,
/// from its ECX, can be anything).
pub const SVM_LOW_CODES: u32 = 0x100;
/// SVM code `0..SVM_LOW_CODES` -> its cell, or [`NONE`].
pub static SVM_LOW: [u8; SVM_LOW_CODES as usize] = svm_low();

const fn svm_low() -> [u8; SVM_LOW_CODES as usize] {
    let mut out = [NONE as u8; SVM_LOW_CODES as usize];
    let mut i = 0;
    while i < SVM_CODES.len() {
        if SVM_CODES[i] < SVM_LOW_CODES {
            out[SVM_CODES[i] as usize] = i as u8;
        }
        i += 1;
    }
    out
}

/// The cell of a raw `kvm_exit` (exit isa, reason) in a row of `row_isa`, or [`NONE`].
#[inline(always)]
pub fn cell(row_isa: u32, exit_isa: u32, raw: u32) -> u32 {
    if exit_isa != row_isa {
        return NONE;
    }
    if exit_isa == isa::VMX {
        // Bits 30:16 are flags (e.g. 27: enclave mode): only the basic reason counts.
        let basic = raw & VMX_BASIC_REASON_MASK;
        if raw & VMX_FAILED_VMENTRY == 0 && basic < CELLS {
            return basic;
        }
        return NONE;
    }
    if exit_isa == isa::SVM {
        if raw < SVM_LOW_CODES {
            return u32::from(SVM_LOW[(raw & (SVM_LOW_CODES - 1)) as usize]);
        }
        // The few high codes: a compare each, no table.
        let mut i = 0;
        while i < 5 {
            let at = CELLS - 5 + i;
            if SVM_CODES[at as usize] == raw {
                return at;
            }
            i += 1;
        }
    }
    NONE
}

/// The exit counted in cell `c` of a row of `row_isa`; `None` for no such cell.
pub fn exit_of(row_isa: u32, c: u32) -> Option<ExitKey> {
    if c >= CELLS {
        return None;
    }
    match row_isa {
        isa::VMX => Some(ExitKey::from_raw(isa::VMX, c)),
        isa::SVM => Some(ExitKey::from_raw(isa::SVM, SVM_CODES[c as usize])),
        _ => None,
    }
}

/// `THREAD_SLOTS`' value: the slot of a vCPU thread, and whose it is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadSlot {
    pub slot: u32,
    pub phase: u32,
    /// The thread's process (the VM).
    pub tgid: u32,
    pub vcpu_id: u32,
}

/// `SLOT_THREADS`' value: who owns a taken slot, for user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ThreadOwner {
    pub phase: u32,
    pub tgid: u32,
    pub tid: u32,
    /// `kvm:kvm_exit`'s `vcpu_id` at the thread's first exit (a VMM runs one vCPU per
    /// thread).
    pub vcpu_id: u32,
    /// When the process first took a slot (`bpf_ktime_get_ns`; `VM_BORN`): a later
    /// process with the same pid has a later one, so it is another VM. 0 when
    /// `VM_BORN` was full (counted in `drop_kind::VM_MAP_FULL`).
    pub born_ns: u64,
}

/// This CPU's last vCPU thread: while the thread, phase and epoch match, its slot is
/// known without a hash lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedThread {
    pub tid: u32,
    pub phase: u32,
    /// `COUNT_EPOCH` when cached: bumped when a thread ends or the pid filter grows.
    pub epoch: u32,
    /// The slot, or [`NOT_TRACED`].
    pub slot: u32,
    pub vcpu_id: u32,
    pub tgid: u32,
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    #[test]
    fn every_cell_is_one_reason_and_back() {
        for row_isa in [isa::VMX, isa::SVM] {
            let mut seen = std::collections::BTreeSet::new();
            for c in 0..CELLS {
                let exit = exit_of(row_isa, c).expect("every cell has a reason");
                let raw = exit.reason | (exit.failed_entry << 31);
                assert_eq!(cell(row_isa, row_isa, raw), c, "{exit:?}");
                assert!(seen.insert(exit), "{exit:?} twice");
            }
            assert_eq!(seen.len(), CELLS as usize);
        }
    }

    #[test]
    fn the_rest_has_no_cell() {
        assert_eq!(cell(isa::VMX, isa::VMX, 64), NONE, "VMX reasons from 64");
        assert_eq!(
            cell(isa::VMX, isa::VMX, 0x8000_0021),
            NONE,
            "a failed entry"
        );
        assert_eq!(
            cell(isa::VMX, isa::VMX, 0x0800_000a),
            10,
            "flags 30:16 ignored"
        );
        assert_eq!(cell(isa::VMX, isa::SVM, 0x72), NONE, "another ISA's exit");
        assert_eq!(cell(isa::SVM, isa::SVM, 0x20), NONE, "DR0 read");
        assert_eq!(cell(isa::SVM, isa::SVM, 0x86), NONE, "SKINIT");
        assert_eq!(cell(isa::SVM, isa::SVM, 0xa8), NONE);
        assert_eq!(cell(isa::SVM, isa::SVM, 0x404), NONE);
        assert_eq!(cell(isa::SVM, isa::SVM, 0x72), 29, "CPUID");
        assert_eq!(cell(isa::SVM, isa::SVM, 0x400), CELLS - 5, "NPF");
        assert_eq!(cell(isa::SVM, isa::SVM, u32::MAX), CELLS - 1, "ERR");
        assert_eq!(cell(3, 3, 1), NONE, "an unknown isa");
        assert_eq!(exit_of(isa::SVM, CELLS), None);
    }
}
