//! What the lab checks in each mode's results: kvmtrace against the kernel hist, per
//! reason and per vCPU; the micro workload's exits known in advance; and the guest's
//! counter reads against `kvmtrace reconcile`.

pub mod crowd;
pub mod detail;
pub mod guest;
pub mod micro;
pub mod reasons;
pub mod vcpus;
