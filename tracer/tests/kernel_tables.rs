//! The exit-reason tables against the running kernel's own: the `print fmt` of
//! `kvm:kvm_exit` lists every VMX reason and SVM code the kernel names. Root, with kvm
//! loaded (tracefs is mounted if it is not).

mod common;

use common::{has_kvm_tracepoints, is_root};
use kvmtrace::tracefs::Tracefs;
use kvmtrace_model::exit_reasons::{self, Isa};

/// The `{ 48, "EPT_VIOLATION" }` pairs in `text`.
fn symbolic_pairs(text: &str) -> Vec<(i64, String)> {
    let mut pairs = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find("{ ") {
        let Some(close) = rest[open..].find(" }") else {
            break;
        };
        let inner = &rest[open + 2..open + close];
        rest = &rest[open + close + 2..];
        let Some((num, name)) = inner.split_once(", ") else {
            continue;
        };
        let num = num.replace(' ', "");
        let value = match num.split_once('+') {
            Some((a, b)) => parse(a).zip(parse(b)).map(|(a, b)| a + b),
            None => parse(&num),
        };
        if let Some(v) = value {
            pairs.push((v, name.trim_matches('"').to_owned()));
        }
    }
    pairs
}

fn parse(t: &str) -> Option<i64> {
    match t.strip_prefix("0x") {
        Some(h) => i64::from_str_radix(h, 16).ok(),
        None => t.parse().ok(),
    }
}

#[test]
fn every_reason_the_kernel_names_is_in_our_tables() {
    if !is_root() || !has_kvm_tracepoints() {
        return;
    }
    // As kvmtrace finds it: mounted if it is not yet.
    let tracefs = Tracefs::find_or_mount().unwrap_or_else(|e| panic!("tracefs: {e}"));
    let path = tracefs.root().join("events/kvm/kvm_exit/format");
    let format =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let fmt = format
        .split("print fmt:")
        .nth(1)
        .unwrap_or_else(|| panic!("no print fmt in {format}"));
    // The VMX table comes first, the SVM one after the second __print_symbolic.
    let mut parts = fmt.split("__print_symbolic(");
    let vmx = parts.nth(1).unwrap_or_else(|| panic!("no VMX table"));
    let svm = parts.next().unwrap_or_else(|| panic!("no SVM table"));
    let vmx = symbolic_pairs(vmx);
    // The VMX failed-entry flag table (__print_flags) follows; it is not an exit code.
    let svm = symbolic_pairs(svm.split("__print_flags").next().unwrap_or(svm));
    assert!(
        vmx.len() > 50 && svm.len() > 80,
        "{} {}",
        vmx.len(),
        svm.len()
    );
    for (n, name) in &vmx {
        let n = u32::try_from(*n).unwrap_or_else(|_| panic!("VMX {n}"));
        assert_eq!(
            exit_reasons::name(Isa::Vmx, n),
            name.as_str(),
            "VMX reason {n}"
        );
    }
    for (n, name) in &svm {
        let code = *n as u32; // -1 is the INVALID code 0xffffffff
        assert!(
            exit_reasons::known_name(Isa::Svm, code).is_some(),
            "SVM code {code:#x} ({name}) is missing"
        );
    }
}
