//! kvmtrace's model: everything after the eBPF maps, as pure code with no eBPF, no
//! kernel and no I/O, so the tracer, xtask, the lab tests and the fuzz targets share it.
//!
//! Data flows one way: the tracer's probe fills a [`snapshot::Snapshot`] → a
//! [`report::Report`] (the versioned JSON schema) → [`diff`], [`reconcile`] and
//! [`rates`] → [`render`].
//!
//! - The exit-reason names: [`exit_reasons`].
//! - The leaf contract of a patched KVM: [`leaves`]; the guest's readout of it: [`guest`].
//! - What [`reconcile`] names: each read's causes ([`cause`]), and the one verdict on a
//!   record that its summary, its JSON and `kvmtrace reconcile`'s exit status state
//!   ([`verdict`]).
//! - Kernel text the tracer and the lab read: [`tracefs_format`] (a tracepoint's
//!   format file) and [`kernel_hist`] (the output of a hist trigger).

pub mod cause;
pub mod detail;
pub mod diff;
pub mod exit_reasons;
pub mod guest;
pub mod kernel_hist;
pub mod kernel_trace;
pub mod latency;
pub mod leaves;
pub mod metrics;
pub mod paging;
pub mod parse;
pub mod rates;
pub mod reconcile;
pub mod regs_layout;
pub mod render;
pub mod report;
pub mod snapshot;
pub mod symbols;
pub mod tracefs_format;
pub mod verdict;
