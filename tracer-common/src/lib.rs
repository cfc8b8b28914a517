//! Types shared by the eBPF programs (`tracer-ebpf`) and the user side (`tracer`).
//!
//! Every type is `#[repr(C)]`, `Copy` and made of `u32`/`u64` fields only, so that no
//! map key or value has implicit padding (a padded key would hash its garbage bytes).
#![no_std]

pub mod exit_reasons;
pub mod rows;

/// `isa` values of the `kvm:kvm_exit` tracepoint (`KVM_ISA_VMX` / `KVM_ISA_SVM` in
/// `arch/x86/kvm/trace.h`).
pub mod isa {
    pub const VMX: u32 = 1;
    pub const SVM: u32 = 2;
}

/// Map sizes. A full map is never silent: every failed insert bumps a [`drop_kind`] slot.
pub mod limits {
    /// Distinct (phase, isa, reason, failed-entry) keys of the overflow map, which
    /// counts the exits the per-vCPU map had no room for.
    pub const MAX_OVERFLOW_ROWS: u32 = 1024;
    /// Distinct (phase, VM pid, vcpu, isa, reason, failed-entry) keys: every exit is
    /// counted here; per-reason totals are the sums of these rows.
    pub const MAX_VCPU_ROWS: u32 = 16384;
    /// Distinct (isa, reason, failed-entry, bucket) histogram keys.
    pub const MAX_HIST_ROWS: u32 = 4096;
    /// vCPU threads with an exit whose next entry has not been seen yet (a thread's
    /// entry is deleted when the thread exits).
    pub const MAX_PENDING: u32 = 16384;
    /// vCPU threads with a row at once (the count path and the per-VM timing path):
    /// 4 096 VMs of 4 vCPUs. A thread past it is counted in slot 0
    /// (`drop_kind::COUNT_SLOTS_FULL`), never in another VM's row.
    pub const MAX_THREADS: u32 = 16384;
    /// With thread rows: the per-CPU hash maps' entries, which then only take the
    /// reasons without a cell (per VM or vCPU, per reason, and per histogram bucket).
    pub const MAX_UNCELLED_ROWS: u32 = 256;
    /// Live processes in the `-p` / `-- CMD` filter: child processes (not threads) of
    /// traced processes are added, and a process is removed when it exits.
    pub const MAX_FILTER_PIDS: u32 = 8192;
    /// VMs with a row at once for the guest counter reads of `--snapshots`: a VM past
    /// it has none, and its reads are counted as lost snapshots.
    pub const MAX_VMS: u32 = 4096;
    /// Bytes of the CPUID snapshot ring buffer (drained every 100 ms).
    pub const CPUID_RING_BYTES: u32 = 16 << 20;
    /// Bytes of that ring buffer when no snapshots are taken (one page: it stays empty).
    pub const CPUID_RING_MIN_BYTES: u32 = 4096;
    /// Bytes of `struct kvm_vcpu` sent per register-learning sample.
    pub const REGS_WINDOW: u32 = 4096;
    /// Bytes of the learning sample ring buffer.
    pub const LEARN_RING_BYTES: u32 = 1 << 20;
    /// vCPU threads (the thread's `struct kvm_vcpu`, and a guest counter read waiting
    /// for its VM entry), kept only with snapshots.
    pub const MAX_VCPU_THREADS: u32 = 16384;
    /// Bytes of the `kvm:kvm_exit` record read at once (the fields kvmtrace needs lie
    /// within 52 bytes on every kernel since 5.7).
    pub const EXIT_FIELDS_BYTES: u32 = 64;
    /// Distinct (phase, VM, reason, detail sub-key) rows of `--detail`.
    pub const MAX_DETAIL_ROWS: u32 = 16384;
    /// Distinct (VM, reason) counts of detail sub-keys (the cap's bookkeeping); past
    /// it, new sub-keys go to their reason's `other` row.
    pub const MAX_DETAIL_REASONS: u32 = 8192;
    /// Distinct (phase, VM, reason, guest RIP) rows of `--rip`.
    pub const MAX_RIP_ROWS: u32 = 65536;
    /// log2 buckets of the exit-handling time histogram: bucket b holds
    /// durations in [2^b, 2^(b+1)) ns; bucket 0 also holds 0 ns.
    pub const HIST_BUCKETS: u32 = 48;
}

/// Slots of the `DROPS` per-CPU array: why an event could not be recorded in full.
pub mod drop_kind {
    /// The per-vCPU map and the per-reason overflow map were both full: the exit is
    /// counted only here.
    pub const EXIT_MAP_FULL: u32 = 0;
    /// The per-vCPU map was full: the exit is in the per-reason overflow map (or, if that
    /// was full too, only in `EXIT_MAP_FULL`).
    pub const VCPU_MAP_FULL: u32 = 1;
    /// The histogram map was full: the exit's time is in the totals, not the histogram.
    pub const HIST_MAP_FULL: u32 = 2;
    /// The pending-exit map was full when a vCPU thread with an exit being handled left
    /// its CPU: that exit's handling time is unknown (the exit itself is counted).
    pub const PENDING_MAP_FULL: u32 = 3;
    /// A tracepoint field could not be read: the exit is counted only here.
    pub const READ_FAILED: u32 = 4;
    /// The pid filter map was full (or the `task_newtask` record was unreadable): a
    /// child process of a traced process is not traced.
    pub const FILTER_MAP_FULL: u32 = 5;
    /// With snapshots, a map kept beside a VM's own counts was full: an ended VM
    /// missing from `VM_TOTALS`, a synthetic exit missing from `VM_SYNTHETIC`, or an
    /// exit of a reason without a cell missing from its VM's `VM_OVERFLOW` (a guest's
    /// read of that reason then gets a count too low). Or, with thread rows, a VM's
    /// birth missing from `VM_BORN` (a later process with its pid may then share its
    /// rows). The exit itself is counted.
    pub const VM_MAP_FULL: u32 = 6;
    /// The CPUID snapshot ring buffer was full: a guest counter read was not recorded.
    pub const CPUID_RING_FULL: u32 = 7;
    /// An exit still waiting for its entry was overwritten by a later exit on the same
    /// CPU (a `kvm_entry` or `sched_switch` run was missed): its handling time is
    /// unknown (the exit itself is counted).
    pub const PENDING_LOST: u32 = 8;
    /// The map of guest counter reads waiting for their VM entry was full: that read
    /// is not recorded.
    pub const READ_PENDING_FULL: u32 = 9;
    /// A VM had its cap of detail sub-keys for the exit's reason (or the cap's
    /// bookkeeping was full): the exit is in its reason's `other` detail row.
    pub const DETAIL_CAPPED: u32 = 10;
    /// The detail map was full: the exit is counted, but in no detail row (or its
    /// handling time is in none).
    pub const DETAIL_MAP_FULL: u32 = 11;
    /// The guest-RIP map was full: the exit is counted, but its RIP is not.
    pub const RIP_MAP_FULL: u32 = 12;
    /// The thread rows had no free slot: the exit is counted in slot 0, with the
    /// other threads that found none, not under its own VM.
    pub const COUNT_SLOTS_FULL: u32 = 13;
    /// A guest counter read's registers (at its CPUID exit or its next entry) or its
    /// `kvm:kvm_cpuid` record could not be read: that read's snapshot is lost. (The
    /// exit itself is counted.)
    pub const SNAPSHOT_LOST: u32 = 14;
    /// A `kvm:kvm_msr`, `kvm:kvm_page_fault` or `module:module_load` record could not
    /// be read: an exit awaiting its `--detail` sub-key stays undecoded (an emulated
    /// instruction is in no detail row), or a vendor module load starts no new phase.
    /// (The exit itself is counted.)
    pub const RECORD_LOST: u32 = 15;
    /// Number of slots.
    pub const COUNT: u32 = 16;
}

/// Names of the eBPF globals the loader sets before loading (`EbpfLoader::set_global`).
pub mod globals {
    /// Where the `kvm:kvm_exit` fields kvmtrace reads begin: one read of
    /// [`EXIT_FIELDS_BYTES`](super::limits::EXIT_FIELDS_BYTES) from here takes them all.
    pub const EXIT_FIELDS_OFF: &str = "EXIT_FIELDS_OFF";
    /// Offset of `exit_reason` in the `kvm:kvm_exit` record, from `EXIT_FIELDS_OFF`.
    pub const EXIT_REASON_OFF: &str = "EXIT_REASON_OFF";
    /// Offset of `guest_rip` in the `kvm:kvm_exit` record, from `EXIT_FIELDS_OFF`.
    pub const EXIT_RIP_OFF: &str = "EXIT_RIP_OFF";
    /// Offset of `isa` in the `kvm:kvm_exit` record, from `EXIT_FIELDS_OFF`.
    pub const EXIT_ISA_OFF: &str = "EXIT_ISA_OFF";
    /// Offset of `vcpu_id` in the `kvm:kvm_exit` record, from `EXIT_FIELDS_OFF`.
    pub const EXIT_VCPU_OFF: &str = "EXIT_VCPU_OFF";
    /// Offset of `pid` (the new task's id) in the `task:task_newtask` record.
    pub const NEWTASK_PID_OFF: &str = "NEWTASK_PID_OFF";
    /// Offset of `clone_flags` in the `task:task_newtask` record (its low 32 bits are
    /// read: `CLONE_THREAD` is among them).
    pub const NEWTASK_FLAGS_OFF: &str = "NEWTASK_FLAGS_OFF";
    /// Offset of `group_dead` in the `sched:sched_process_exit` record, or
    /// [`NO_FIELD`](super::NO_FIELD) on kernels without it: then a process counts as
    /// gone when its group leader (tid == tgid) exits.
    pub const EXIT_GROUP_DEAD_OFF: &str = "EXIT_GROUP_DEAD_OFF";
    /// Non-zero: count only processes in the `FILTER_PIDS` map.
    pub const FILTER_PIDS_ENABLED: &str = "FILTER_PIDS_ENABLED";
    /// Count only this vcpu_id; `u32::MAX` counts all.
    pub const VCPU_FILTER: &str = "VCPU_FILTER";
    /// Non-zero: keep per-VM counts and snapshot them at each guest counter-leaf read.
    pub const SNAPSHOTS: &str = "SNAPSHOTS";
    /// Offsets of `function`, `index`, `rax`, `rbx`, `rcx`, `rdx` in `kvm:kvm_cpuid`.
    pub const CPUID_FUNCTION_OFF: &str = "CPUID_FUNCTION_OFF";
    pub const CPUID_INDEX_OFF: &str = "CPUID_INDEX_OFF";
    pub const CPUID_RAX_OFF: &str = "CPUID_RAX_OFF";
    pub const CPUID_RBX_OFF: &str = "CPUID_RBX_OFF";
    pub const CPUID_RCX_OFF: &str = "CPUID_RCX_OFF";
    pub const CPUID_RDX_OFF: &str = "CPUID_RDX_OFF";
    /// The counter leaves (0: none).
    pub const LEAF_TOTAL: &str = "LEAF_TOTAL";
    pub const LEAF_COUNT: &str = "LEAF_COUNT";
    pub const LEAF_CYCLES: &str = "LEAF_CYCLES";
    /// Offset of `name` (a `__data_loc char[]`) in the `module:module_load` record.
    pub const MODULE_NAME_OFF: &str = "MODULE_NAME_OFF";
    /// Non-zero: count `--detail` sub-keys.
    pub const DETAIL: &str = "DETAIL";
    /// Non-zero: count exits per guest RIP (`--rip`).
    pub const RIPS: &str = "RIPS";
    /// Offsets of `info1` (8 bytes) and `intr_info` (4 bytes) in `kvm:kvm_exit`, from
    /// `EXIT_FIELDS_OFF`; [`NO_FIELD`](super::NO_FIELD) when outside the one read.
    pub const EXIT_INFO1_OFF: &str = "EXIT_INFO1_OFF";
    pub const EXIT_INTR_INFO_OFF: &str = "EXIT_INTR_INFO_OFF";
    /// Offsets of `ecx` and `write` in `kvm:kvm_msr`.
    pub const MSR_ECX_OFF: &str = "MSR_ECX_OFF";
    pub const MSR_WRITE_OFF: &str = "MSR_WRITE_OFF";
    /// The count path's raw `kvm_exit`: offset of `exit_reason` in `struct vcpu_vmx`,
    /// and of `vmcb` in `struct vcpu_svm` ([`NO_FIELD`](super::NO_FIELD): that
    /// vendor's exits go to the overflow map under reason `u32::MAX - 1`).
    pub const VMX_EXIT_REASON_OFF: &str = "VMX_EXIT_REASON_OFF";
    pub const SVM_VMCB_OFF: &str = "SVM_VMCB_OFF";
    /// Offset of `vcpu_id` in `struct kvm_vcpu`, for the timing path's raw exit.
    pub const VCPU_ID_OFF: &str = "VCPU_ID_OFF";
    /// Possible CPUs, for the sums of a counter read.
    pub const NR_CPUS: &str = "NR_CPUS";
    /// 1 when a counter read sums per-CPU cells in the kernel (5.19+); 0: every
    /// exit also adds to shared cells, which the read takes.
    pub const SUM_PER_CPU: &str = "SUM_PER_CPU";
    /// 1: the timing path counts in thread rows (`TIME_ROWS`; no hash lookup at the
    /// exit or the entry).
    pub const VM_TIME: &str = "VM_TIME";
    /// The ISA whose reasons have cells in thread rows and latency cells
    /// ([`rows::cell`](super::rows::cell)): the host's.
    pub const CELL_ISA: &str = "CELL_ISA";
    /// 1: the per-VM timing path keeps a row per vCPU (`--per-vcpu`), keyed by the
    /// thread's `vcpu_id`; 0: per VM (`vcpu_id` is `ALL_VCPUS`).
    pub const VCPU_ROWS: &str = "VCPU_ROWS";
    /// Offset of `fault_address` in `kvm:kvm_page_fault`.
    pub const PF_ADDRESS_OFF: &str = "PF_ADDRESS_OFF";
}

/// Names of the eBPF maps.
pub mod maps {
    pub const OVERFLOW_EXITS: &str = "OVERFLOW_EXITS";
    pub const VCPU_EXITS: &str = "VCPU_EXITS";
    pub const LATENCY_HIST: &str = "LATENCY_HIST";
    pub const LATENCY_CELLS: &str = "LATENCY_CELLS";
    pub const PENDING: &str = "PENDING";
    pub const CPU_PENDING: &str = "CPU_PENDING";
    pub const FILTER_PIDS: &str = "FILTER_PIDS";
    pub const DROPS: &str = "DROPS";
    pub const VM_TOTALS: &str = "VM_TOTALS";
    pub const CPUID_EVENTS: &str = "CPUID_EVENTS";
    pub const PHASE: &str = "PHASE";
    pub const REGS: &str = "REGS";
    pub const REGS_SAMPLES: &str = "REGS_SAMPLES";
    pub const VCPU_OF: &str = "VCPU_OF";
    pub const VM_SYNTHETIC: &str = "VM_SYNTHETIC";
    pub const RUN_STARTED: &str = "RUN_STARTED";
    pub const PENDING_READS: &str = "PENDING_READS";
    pub const DETAIL_EXITS: &str = "DETAIL_EXITS";
    pub const DETAIL_KEYS: &str = "DETAIL_KEYS";
    pub const RIP_EXITS: &str = "RIP_EXITS";
    pub const COUNT_OVERFLOW: &str = "COUNT_OVERFLOW";
    pub const VM_ROWS: &str = "VM_ROWS";
    pub const VM_EXITS: &str = "VM_EXITS";
    pub const VM_FREE: &str = "VM_FREE";
    pub const VM_ENDED: &str = "VM_ENDED";
    pub const VM_OVERFLOW: &str = "VM_OVERFLOW";
    pub const SHARED_ALL: &str = "SHARED_ALL";
    pub const VM_SLOTS: &str = "VM_SLOTS";
    pub const SLOT_OWNERS: &str = "SLOT_OWNERS";
    pub const COUNT_EPOCH: &str = "COUNT_EPOCH";
    pub const THREAD_SLOTS: &str = "THREAD_SLOTS";
    pub const SLOT_THREADS: &str = "SLOT_THREADS";
    pub const VM_BORN: &str = "VM_BORN";
    pub const FREE_SLOTS: &str = "FREE_SLOTS";
    pub const ENDED_SLOTS: &str = "ENDED_SLOTS";
    pub const COUNT_ROWS: &str = "COUNT_ROWS";
    pub const TIME_ROWS: &str = "TIME_ROWS";
    pub const CPU_THREAD: &str = "CPU_THREAD";
}

/// The kvm vendor modules whose load starts a new phase. A module cannot be removed
/// while a VM holds `/dev/kvm`, so every exit of a phase ran under one load of it.
pub mod vendor {
    /// NUL-terminated, as the `module:module_load` record holds them.
    pub const INTEL: &[u8; 10] = b"kvm_intel\0";
    pub const AMD: &[u8; 8] = b"kvm_amd\0";
}

/// The value of an offset global whose field this kernel's tracepoint does not have.
pub const NO_FIELD: u32 = u32::MAX;

/// `CLONE_THREAD` of `clone(2)`: the new task is a thread of its parent's process.
pub const CLONE_THREAD: u32 = 0x0001_0000;

/// Low 16 bits of a VMX exit reason: the basic exit reason (SDM Vol. 3C, 28.2.1).
pub const VMX_BASIC_REASON_MASK: u32 = 0xffff;
/// Bit 31 of a VMX exit reason: VM-entry failure.
pub const VMX_FAILED_VMENTRY: u32 = 1 << 31;

/// One exit reason, as counted. VMX reasons are split into the basic reason and the
/// failed-VM-entry flag; SVM exit codes are kept whole.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExitKey {
    pub isa: u32,
    pub reason: u32,
    /// 1 when VMX reported a failed VM entry (bit 31), else 0.
    pub failed_entry: u32,
}

impl ExitKey {
    /// Splits a raw `kvm:kvm_exit` (isa, exit_reason) pair.
    #[inline(always)]
    pub fn from_raw(isa: u32, raw_reason: u32) -> Self {
        if isa == isa::VMX {
            Self {
                isa,
                reason: raw_reason & VMX_BASIC_REASON_MASK,
                failed_entry: u32::from(raw_reason & VMX_FAILED_VMENTRY != 0),
            }
        } else {
            Self {
                isa,
                reason: raw_reason,
                failed_entry: 0,
            }
        }
    }
}

/// Key of the per-reason map: the reason within one phase (phase `n` began with the
/// `n`-th load of a kvm vendor module since the probe attached; 0 is what was loaded
/// before).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PhaseExitKey {
    pub phase: u32,
    pub exit: ExitKey,
}

/// Count and handling time of one key. `timed` counts the exits whose next
/// `kvm:kvm_entry` was seen; `time_ns` sums their exit→entry time, and `max_ns` is
/// the longest of them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitStats {
    pub count: u64,
    pub timed: u64,
    pub time_ns: u64,
    pub max_ns: u64,
}

/// Key of the per-VM, per-vCPU map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VcpuKey {
    /// Process id (tgid) of the VMM that owns the vCPU.
    pub pid: u32,
    /// How many earlier VM processes with the same pid the trace saw (0: the first).
    /// Only thread rows tell them apart; elsewhere it is 0.
    pub reuse: u32,
    pub vcpu_id: u32,
    pub exit: ExitKey,
}

/// Key of the per-vCPU map on the eBPF side: one row of one phase, packed into 16
/// bytes (the map hashes and compares every key byte on every exit).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PhaseVcpuKey {
    pub pid: u32,
    pub vcpu_id: u32,
    pub reason: u32,
    /// isa (bits 7:0), failed entry (bit 8), phase (bits 31:16, saturated).
    pub meta: u32,
}

/// Packs isa, the failed-entry flag and a 16-bit value (bits 31:16, saturated).
#[inline(always)]
fn pack_meta(exit: &ExitKey, high: u32) -> u32 {
    let high = if high > 0xffff { 0xffff } else { high };
    (exit.isa & 0xff) | ((exit.failed_entry & 1) << 8) | (high << 16)
}

#[inline(always)]
fn unpack_exit(reason: u32, meta: u32) -> ExitKey {
    ExitKey {
        isa: meta & 0xff,
        reason,
        failed_entry: (meta >> 8) & 1,
    }
}

impl PhaseVcpuKey {
    /// The row of `vcpu` in `phase` (phases past 65535 share the last one).
    #[inline(always)]
    pub fn new(phase: u32, vcpu: &VcpuKey) -> Self {
        Self {
            pid: vcpu.pid,
            vcpu_id: vcpu.vcpu_id,
            reason: vcpu.exit.reason,
            meta: pack_meta(&vcpu.exit, phase),
        }
    }

    #[inline(always)]
    pub fn exit(&self) -> ExitKey {
        unpack_exit(self.reason, self.meta)
    }

    pub fn phase(&self) -> u32 {
        self.meta >> 16
    }

    pub fn vcpu(&self) -> VcpuKey {
        VcpuKey {
            pid: self.pid,
            reuse: 0,
            vcpu_id: self.vcpu_id,
            exit: self.exit(),
        }
    }
}

/// Key of the time histogram, packed into 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HistKey {
    pub reason: u32,
    /// isa (bits 7:0), failed entry (bit 8), bucket (bits 31:16).
    pub meta: u32,
}

impl HistKey {
    #[inline(always)]
    pub fn new(exit: &ExitKey, bucket: u32) -> Self {
        Self {
            reason: exit.reason,
            meta: pack_meta(exit, bucket),
        }
    }

    pub fn exit(&self) -> ExitKey {
        unpack_exit(self.reason, self.meta)
    }

    pub fn bucket(&self) -> u32 {
        self.meta >> 16
    }
}

/// An exit whose handling has not ended yet, keyed by the vCPU thread id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingExit {
    /// 0 once the exit's entry was seen (the entry stays, for the thread's next exit).
    pub start_ns: u64,
    /// The row the exit was counted in.
    pub row: PhaseVcpuKey,
    /// The vCPU thread (in the per-CPU slot; unused in the per-thread map).
    pub tid: u32,
    /// The per-VM timing path: the thread's slot, whose `TIME_ROWS` row the exit is
    /// counted in.
    pub vm_slot: u32,
    /// Unused (kept for the layout).
    pub epoch: u32,
    /// With `--detail`: the [`detail_kind`] a later tracepoint of this thread is
    /// expected to give the exit (0: none, or already given).
    pub awaiting: u32,
    /// With `--detail`: the detail row the exit was counted in, which its entry adds
    /// the handling time to; `kind` 0 when it has none.
    pub detail: DetailKey,
}

/// Key of the `--detail` map: one sub-key of one reason, per VM and phase.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DetailKey {
    pub pid: u32,
    pub reason: u32,
    /// isa (bits 7:0), failed entry (bit 8), phase (bits 31:16, saturated).
    pub meta: u32,
    /// What `sub` is: a [`detail_kind`].
    pub kind: u32,
    pub sub: u64,
}

impl DetailKey {
    #[inline(always)]
    pub fn new(row: &PhaseVcpuKey, kind: u32, sub: u64) -> Self {
        Self {
            pid: row.pid,
            reason: row.reason,
            meta: row.meta,
            kind,
            sub,
        }
    }

    pub fn exit(&self) -> ExitKey {
        unpack_exit(self.reason, self.meta)
    }

    pub fn phase(&self) -> u32 {
        self.meta >> 16
    }
}

/// Key of the `--rip` map: one guest instruction pointer of one reason, per VM and
/// phase.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RipKey {
    pub pid: u32,
    pub reason: u32,
    /// As [`DetailKey::meta`].
    pub meta: u32,
    pub _pad: u32,
    pub rip: u64,
}

impl RipKey {
    pub fn exit(&self) -> ExitKey {
        unpack_exit(self.reason, self.meta)
    }

    pub fn phase(&self) -> u32 {
        self.meta >> 16
    }
}

/// What a [`DetailKey::sub`] holds, and where it comes from.
pub mod detail_kind {
    /// VMX EXCEPTION_NMI: `kvm_exit`'s `intr_info` bits 10:0 (vector, and the event
    /// type in bits 10:8).
    pub const VECTOR: u32 = 1;
    /// VMX CR_ACCESS: exit qualification bits 5:0 (control register in 3:0, access
    /// type in 5:4), from `kvm_exit`'s `info1`.
    pub const CR: u32 = 2;
    /// VMX IO_INSTRUCTION, SVM IOIO: the port in bits 31:16 and the ISA's own
    /// direction, size, string and REP bits below, from `kvm_exit`'s `info1`.
    pub const PORT: u32 = 3;
    /// MSR exits: `kvm:kvm_msr`'s `ecx`, with `write` in bit 32.
    pub const MSR: u32 = 4;
    /// CPUID exits: `kvm:kvm_cpuid`'s `function`.
    pub const CPUID: u32 = 5;
    /// EPT violations and SVM nested page faults: the 1 MiB region of
    /// `kvm:kvm_page_fault`'s `fault_address` (the address shifted right by 20).
    pub const GPA: u32 = 6;
    /// The VM already had [`MAX_DETAIL_KEYS_PER_REASON`] sub-keys of the reason:
    /// the rest are counted here, and in `DETAIL_CAPPED`.
    pub const OTHER: u32 = 7;
    /// Flag on a `kind`: an instruction KVM emulated without an exit of its own,
    /// counted under that instruction's reason.
    pub const EMULATED: u32 = 0x100;
    /// The cap on one VM's distinct sub-keys of one reason (its phases together).
    pub const MAX_DETAIL_KEYS_PER_REASON: u64 = 512;
    /// The shift of [`GPA`].
    pub const GPA_REGION_SHIFT: u32 = 20;
}

/// Key of the per-VM count map that CPUID snapshots read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VmExitKey {
    pub pid: u32,
    pub exit: ExitKey,
}

/// A guest read of a counter leaf, with the host's count for that VM at that instant.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidEvent {
    pub ts_ns: u64,
    /// What the guest received: the vCPU's registers at its next VM entry when
    /// `source` has [`read_source::REGISTERS`], else `kvm:kvm_cpuid`'s values.
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    /// `kvm:kvm_cpuid`'s values, when `source` has [`read_source::KVM_CPUID`].
    pub tp_rax: u64,
    pub tp_rbx: u64,
    pub tp_rcx: u64,
    pub tp_rdx: u64,
    /// Count leaf: the VM's exits with reason `index` (of `isa`), this one included.
    pub host_reason_count: u64,
    /// The VM's exits of every reason, this one included.
    pub host_total: u64,
    /// Every traced VM's exits since the record began, this one included.
    pub host_all_vms: u64,
    /// The same three at the vCPU's next VM entry, when the guest has its answer: the
    /// answer was made between the two (other vCPUs and VMs run meanwhile).
    pub host_reason_count_entry: u64,
    pub host_total_entry: u64,
    pub host_all_vms_entry: u64,
    /// The exits of traced VMs that had ended (their processes gone) by the exit.
    pub host_ended_vms: u64,
    /// The VM's synthetic exits by the exit: runs of `vmx_vcpu_run()` that made up an
    /// INVALID_STATE exit instead of entering the guest; [`UNKNOWN`] where they are not
    /// counted (not VMX, or the vendor module was reloaded since attach).
    pub host_synthetic: u64,
    pub pid: u32,
    pub tid: u32,
    /// The leaf (EAX) and subleaf (ECX) the guest asked.
    pub function: u32,
    pub index: u32,
    /// isa of the CPUID exit being handled (0 if unknown).
    pub isa: u32,
    /// Who saw the read: bits of [`read_source`].
    pub source: u32,
}

/// A [`CpuidEvent`] count the host does not know.
pub const UNKNOWN: u64 = u64::MAX;

/// Special keys of the eBPF side's per-VM totals map (keyed by pid otherwise).
pub mod vm_totals_key {
    /// Every traced VM's exits (no VM has pid 0).
    pub const ALL: u32 = 0;
    /// The exits of traced VMs whose processes have ended (no pid is `u32::MAX`).
    pub const ENDED: u32 = u32::MAX;
}

/// Bits of [`CpuidEvent::source`].
pub mod read_source {
    /// The vCPU's registers: EAX and ECX at the CPUID exit, EAX..EDX at the next entry.
    pub const REGISTERS: u32 = 1;
    /// The `kvm:kvm_cpuid` tracepoint, which fires only inside `kvm_cpuid()`.
    pub const KVM_CPUID: u32 = 2;
}

/// One exit of the register-layout learning (see tracer/src/vcpu_regs.rs): its
/// `guest_rip` and the first [`limits::REGS_WINDOW`] bytes of its `struct kvm_vcpu`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RegsSample {
    pub guest_rip: u64,
    pub window: [u8; limits::REGS_WINDOW as usize],
}

/// Slots of the `REGS` array map, which user space writes while the programs run.
pub mod regs_slot {
    /// Byte offset of `kvm_vcpu.arch.regs[0]` plus one; 0 while it is not known.
    pub const OFFSET_PLUS_ONE: u32 = 0;
    /// Learning samples the programs may still send (user space sets it; the programs
    /// count it down).
    pub const LEARN_BUDGET: u32 = 1;
    /// CPUID exits of traced VMs while the offset was not known (their leaf is unknown).
    pub const CPUID_BEFORE_LAYOUT: u32 = 2;
    /// Guest counter reads waiting for their VM entry (0: an entry looks none up).
    pub const READS_OUTSTANDING: u32 = 3;
    /// 1 once the probe on `vmx_vcpu_run()` is attached: synthetic exits are counted.
    pub const SYNTHETIC_TRACKED: u32 = 4;
    pub const COUNT: u32 = 5;
}

/// The CPUID exit reason of `isa`: VMX basic reason 10, SVM exit code 0x72.
pub fn cpuid_exit(isa: u32, reason: u32) -> bool {
    (isa == isa::VMX && reason == exit_reasons::VMX_CPUID)
        || (isa == isa::SVM && reason == exit_reasons::SVM_CPUID)
}

/// How `--detail` keys one exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DetailPlan {
    /// From the exit's own fields: this [`detail_kind`] and sub-key.
    Now(u32, u64),
    /// From a later tracepoint of the same vCPU thread, of this [`detail_kind`].
    Await(u32),
    /// The reason has no sub-key.
    None,
}

/// How `--detail` keys an exit of `exit`, given `kvm_exit`'s `info1` and
/// `intr_info` (`None` where this kernel's record lacks them).
#[inline(always)]
pub fn detail_plan(exit: &ExitKey, info1: Option<u64>, intr_info: Option<u32>) -> DetailPlan {
    use exit_reasons as r;
    if exit.failed_entry != 0 {
        return DetailPlan::None;
    }
    let from = |kind: u32, value: Option<u64>| match value {
        Some(v) => DetailPlan::Now(kind, v),
        None => DetailPlan::None,
    };
    if exit.isa == isa::VMX {
        match exit.reason {
            r::VMX_EXCEPTION_NMI => {
                from(detail_kind::VECTOR, intr_info.map(|i| u64::from(i & 0x7ff)))
            }
            r::VMX_CR_ACCESS => from(detail_kind::CR, info1.map(|q| q & 0x3f)),
            // Port (31:16); string (4), direction (3), size - 1 (2:0). REP (5) is
            // left out: it does not change what was accessed.
            r::VMX_IO_INSTRUCTION => from(detail_kind::PORT, info1.map(|q| q & 0xffff_001f)),
            r::VMX_CPUID => DetailPlan::Await(detail_kind::CPUID),
            r::VMX_MSR_READ | r::VMX_MSR_WRITE => DetailPlan::Await(detail_kind::MSR),
            r::VMX_EPT_VIOLATION => DetailPlan::Await(detail_kind::GPA),
            _ => DetailPlan::None,
        }
    } else if exit.isa == isa::SVM {
        match exit.reason {
            // Port (31:16); size (6:4, one-hot), string (2), direction (0: 1 is IN).
            r::SVM_IOIO => from(detail_kind::PORT, info1.map(|q| q & 0xffff_0075)),
            r::SVM_CPUID => DetailPlan::Await(detail_kind::CPUID),
            r::SVM_MSR => DetailPlan::Await(detail_kind::MSR),
            r::SVM_NPF => DetailPlan::Await(detail_kind::GPA),
            _ => DetailPlan::None,
        }
    } else {
        DetailPlan::None
    }
}

/// log2 bucket of a duration in nanoseconds, clamped to the last bucket.
#[inline(always)]
pub fn hist_bucket(ns: u64) -> u32 {
    let b = if ns == 0 { 0 } else { 63 - ns.leading_zeros() };
    if b >= limits::HIST_BUCKETS {
        limits::HIST_BUCKETS - 1
    } else {
        b
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, and made of u32/u64 with no padding.
    unsafe impl aya::Pod for super::ExitKey {}
    unsafe impl aya::Pod for super::PhaseExitKey {}
    unsafe impl aya::Pod for super::ExitStats {}
    unsafe impl aya::Pod for super::VcpuKey {}
    unsafe impl aya::Pod for super::PhaseVcpuKey {}
    unsafe impl aya::Pod for super::HistKey {}
    unsafe impl aya::Pod for super::PendingExit {}
    unsafe impl aya::Pod for super::VmExitKey {}
    unsafe impl aya::Pod for super::CpuidEvent {}
    unsafe impl aya::Pod for super::DetailKey {}
    unsafe impl aya::Pod for super::RipKey {}
    unsafe impl aya::Pod for super::rows::ThreadSlot {}
    unsafe impl aya::Pod for super::rows::ThreadOwner {}
    unsafe impl aya::Pod for super::rows::CachedThread {}
}

/// The snapshots' VM slots (`--snapshots`): each VM's row of counts, which a guest
/// counter read is compared with, and each CPU's cache of its last VM's slot. (The
/// count path and the timing path count in thread rows: [`rows`].)
pub mod count {
    /// CPUs a counter read sums the all-VMs count over at most.
    pub const MAX_CPUS: u32 = 1024;
    /// The `vcpu_id` of a count-path row: the count path does not tell vCPUs apart.
    pub const ALL_VCPUS: u32 = u32::MAX;

    /// A VM's slot key in `VM_SLOTS`: the phase in the high half, the tgid below.
    #[inline(always)]
    pub fn slot_key(phase: u32, tgid: u32) -> u64 {
        (u64::from(phase) << 32) | u64::from(tgid)
    }

    /// This CPU's last VM: while the thread, phase and epoch match, its slot is
    /// known without a hash lookup.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct CachedSlot {
        pub tgid: u32,
        pub phase: u32,
        /// `COUNT_EPOCH` when cached: user space bumps it when it frees a slot or
        /// adds a pid to the filter, which empties every CPU's cache.
        pub epoch: u32,
        /// The slot, or `rows::FULL_SLOT` when none was free.
        pub slot: u32,
    }
}
