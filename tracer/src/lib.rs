//! kvmtrace: counts KVM VM exits by reason, per VM and per vCPU, with the time KVM spent
//! handling each, from eBPF programs on `kvm:kvm_exit` and `kvm:kvm_entry`.
//!
//! Data flows one way: [`probe`] (eBPF maps) → [`snapshot::Snapshot`] (plain data) →
//! [`report::Report`] (the versioned JSON schema) → [`render`]. Everything after the
//! snapshot is pure and tested without a kernel.

pub mod diff;
pub mod exit_reasons;
pub mod guest;
pub mod histogram;
pub mod host;
pub mod parse;
pub mod privileges;
pub mod probe;
pub mod reconcile;
pub mod render;
pub mod report;
pub mod snapshot;
pub mod top;
pub mod tracefs;
pub mod vcpu_regs;
