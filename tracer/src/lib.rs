//! kvmtrace's loader: the eBPF programs on `kvm:kvm_exit` and `kvm:kvm_entry` and
//! what they need from the running kernel (tracefs, BTF, privileges, host facts).
//!
//! Data flows one way: [`probe`] (eBPF maps) → `kvmtrace_model::snapshot::Snapshot`
//! (plain data) → the report, diff, reconcile and renderers of `kvmtrace_model`, which
//! are pure and tested without a kernel. Nothing here imports from further down.

pub mod btf_base;
pub mod cpu;
pub mod exit_layout;
pub mod host;
pub mod privileges;
pub mod probe;
pub mod tracefs;
pub mod vcpu_regs;
