//! Where the count path's raw `kvm_exit` program finds the exit reason: from the
//! running vendor module's BTF, checked before use.
//!
//! - The tracepoint's prototype (`btf_trace_kvm_exit` in the kvm module's BTF) must
//!   be `(void *, struct kvm_vcpu *, u32)`: the vCPU, then the isa (5.10 passes the
//!   reason first; it has no module BTF anyway).
//! - kvm_intel: `struct vcpu_vmx` starts with its `struct kvm_vcpu vcpu`, and
//!   `exit_reason` is 4 bytes: the raw reason is read at that offset from the vCPU.
//! - kvm_amd: `struct vcpu_svm` starts with `vcpu`, `vmcb` is a pointer to
//!   `struct vmcb`, whose `control.exit_code` is the 4 bytes at 0x70 that the hardware
//!   defines.
//!
//! Anything else (no BTF, another shape) leaves the count path on the classic
//! tracepoint, and [`Choice::reason`] says why.

use std::path::Path;

/// The offsets the raw program reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    /// `offsetof(struct vcpu_vmx, exit_reason)`, with kvm_intel loaded.
    pub vmx_exit_reason: Option<u32>,
    /// `offsetof(struct vcpu_svm, vmcb)`, with kvm_amd loaded.
    pub svm_vmcb: Option<u32>,
    /// `offsetof(struct kvm_vcpu, vcpu_id)` (the timing path's raw exit).
    pub vcpu_id: u32,
}

/// How the count path reads exits on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// A raw tracepoint, reading the reason at `offsets` (from `module`'s BTF).
    Raw { offsets: Offsets, module: String },
    /// The classic tracepoint, because of `reason`.
    Classic { reason: String },
}

impl Choice {
    /// The offsets, where the raw tracepoint can be used.
    pub fn offsets(&self) -> Option<Offsets> {
        match self {
            Choice::Raw { offsets, .. } => Some(*offsets),
            Choice::Classic { .. } => None,
        }
    }

    /// One line for the log and the record: which program and why.
    pub fn describe(&self) -> String {
        match self {
            Choice::Raw { offsets, module } => {
                let at = match (offsets.vmx_exit_reason, offsets.svm_vmcb) {
                    (Some(off), _) => format!("vcpu_vmx.exit_reason at +{off:#x}"),
                    (None, Some(off)) => format!("vcpu_svm.vmcb at +{off:#x}, exit_code at +0x70"),
                    (None, None) => "no offsets".to_owned(),
                };
                format!("raw tracepoint kvm_exit, {at} ({module} BTF)")
            }
            Choice::Classic { reason } => format!("classic tracepoint kvm:kvm_exit ({reason})"),
        }
    }
}

/// The hardware's offset of `exit_code` in the VMCB (AMD APM vol. 2, table B-1).
const VMCB_EXIT_CODE: u32 = 0x70;

/// Reads the layout of the vendor module loaded now from `btf_dir`
/// (`/sys/kernel/btf`), or says why the classic tracepoint must do.
pub fn choose(btf_dir: &Path) -> Choice {
    match read(btf_dir) {
        Ok(choice) => choice,
        Err(reason) => Choice::Classic { reason },
    }
}

fn read(btf_dir: &Path) -> Result<Choice, String> {
    let vendor = ["kvm_intel", "kvm_amd"]
        .into_iter()
        .find(|m| Path::new("/sys/module").join(m).is_dir() || btf_dir.join(m).is_file())
        .ok_or("neither kvm_intel nor kvm_amd is loaded")?;
    let module_file = btf_dir.join(vendor);
    let kvm_file = btf_dir.join("kvm");
    for file in [&module_file, &kvm_file] {
        if !file.is_file() {
            return Err(format!("{} has no BTF", file.display()));
        }
    }
    let open_err = |f: &Path, e: &dyn std::fmt::Display| format!("{}: {e}", f.display());
    let base = crate::btf_base::open(btf_dir)?;
    let kvm =
        btf_rs::Btf::from_split_file(&kvm_file, &base).map_err(|e| open_err(&kvm_file, &e))?;
    check_prototype(&kvm)?;
    let (vcpu_id, m) = member(&kvm, "kvm_vcpu", "vcpu_id")?;
    if size_of_member(&kvm, &m) != Some(4) || vcpu_id % 4 != 0 {
        return Err("kvm_vcpu.vcpu_id is not 4 aligned bytes".to_owned());
    }
    let btf = btf_rs::Btf::from_split_file(&module_file, &base)
        .map_err(|e| open_err(&module_file, &e))?;
    let offsets = if vendor == "kvm_intel" {
        Offsets {
            vmx_exit_reason: Some(vmx_exit_reason(&btf)?),
            svm_vmcb: None,
            vcpu_id,
        }
    } else {
        Offsets {
            vmx_exit_reason: None,
            svm_vmcb: Some(svm_vmcb(&btf)?),
            vcpu_id,
        }
    };
    Ok(Choice::Raw {
        offsets,
        module: vendor.to_owned(),
    })
}

/// `btf_trace_kvm_exit` is `void (*)(void *, struct kvm_vcpu *, u32)`.
fn check_prototype(btf: &btf_rs::Btf) -> Result<(), String> {
    let wrong = || "kvm_exit's prototype is not (struct kvm_vcpu *, u32)".to_owned();
    let ty = btf
        .resolve_types_by_name("btf_trace_kvm_exit")
        .map_err(|_| "the kvm BTF has no btf_trace_kvm_exit".to_owned())?
        .into_iter()
        .next()
        .ok_or_else(wrong)?;
    let btf_rs::Type::Typedef(def) = ty else {
        return Err(wrong());
    };
    let btf_rs::Type::Ptr(ptr) = btf.resolve_chained_type(&def).map_err(|_| wrong())? else {
        return Err(wrong());
    };
    let btf_rs::Type::FuncProto(proto) = btf.resolve_chained_type(&ptr).map_err(|_| wrong())?
    else {
        return Err(wrong());
    };
    let [_, vcpu, isa] = proto.parameters.as_slice() else {
        return Err(wrong());
    };
    let vcpu_ok = match btf.resolve_chained_type(vcpu) {
        Ok(btf_rs::Type::Ptr(p)) => struct_named(btf, &p, "kvm_vcpu"),
        _ => false,
    };
    let isa_ok = matches!(int_size(btf, isa), Some(4));
    if vcpu_ok && isa_ok {
        Ok(())
    } else {
        Err(wrong())
    }
}

/// Whether `ty` points at (or is) `struct name`.
fn struct_named(btf: &btf_rs::Btf, ty: &dyn btf_rs::BtfType, name: &str) -> bool {
    match btf.resolve_chained_type(ty) {
        Ok(btf_rs::Type::Struct(st)) => btf.resolve_name(&st).is_ok_and(|n| n == name),
        _ => false,
    }
}

/// The size of an integer type, through typedefs (`u32` -> `__u32` -> `unsigned int`).
fn int_size(btf: &btf_rs::Btf, ty: &dyn btf_rs::BtfType) -> Option<usize> {
    let mut t = btf.resolve_chained_type(ty).ok()?;
    for _ in 0..8 {
        t = match t {
            btf_rs::Type::Int(i) => return Some(i.size()),
            btf_rs::Type::Typedef(d) => btf.resolve_chained_type(&d).ok()?,
            _ => return None,
        };
    }
    None
}

/// The members of `struct name` (the first struct of that name).
fn members(btf: &btf_rs::Btf, name: &str) -> Result<(btf_rs::Struct, Vec<String>), String> {
    for ty in btf.resolve_types_by_name(name).unwrap_or_default() {
        if let btf_rs::Type::Struct(st) = ty {
            let names = st
                .members
                .iter()
                .map(|m| btf.resolve_name(m).unwrap_or_default())
                .collect();
            return Ok((st, names));
        }
    }
    Err(format!("the BTF has no struct {name}"))
}

/// `(byte offset, member)` of `member` in `struct name`.
fn member(btf: &btf_rs::Btf, name: &str, member: &str) -> Result<(u32, btf_rs::Member), String> {
    let (st, names) = members(btf, name)?;
    let i = names
        .iter()
        .position(|n| n == member)
        .ok_or_else(|| format!("struct {name} has no {member}"))?;
    let m = st.members[i].clone();
    if m.bit_offset() % 8 != 0 {
        return Err(format!("{name}.{member} is a bit field"));
    }
    Ok((m.bit_offset() / 8, m))
}

/// The size of a struct or union member's type.
fn size_of_member(btf: &btf_rs::Btf, m: &btf_rs::Member) -> Option<usize> {
    match btf.resolve_chained_type(m).ok()? {
        btf_rs::Type::Union(u) | btf_rs::Type::Struct(u) => Some(u.size()),
        btf_rs::Type::Int(i) => Some(i.size()),
        btf_rs::Type::Typedef(_) => int_size(btf, m),
        _ => None,
    }
}

fn vmx_exit_reason(btf: &btf_rs::Btf) -> Result<u32, String> {
    let (vcpu_at, _) = member(btf, "vcpu_vmx", "vcpu")?;
    if vcpu_at != 0 {
        return Err(format!("vcpu_vmx.vcpu is at {vcpu_at}, not 0"));
    }
    let (at, m) = member(btf, "vcpu_vmx", "exit_reason")?;
    match size_of_member(btf, &m) {
        Some(4) if at % 4 == 0 => Ok(at),
        size => Err(format!(
            "vcpu_vmx.exit_reason is {size:?} bytes at {at}, not 4 aligned ones"
        )),
    }
}

fn svm_vmcb(btf: &btf_rs::Btf) -> Result<u32, String> {
    let (vcpu_at, _) = member(btf, "vcpu_svm", "vcpu")?;
    if vcpu_at != 0 {
        return Err(format!("vcpu_svm.vcpu is at {vcpu_at}, not 0"));
    }
    let (at, m) = member(btf, "vcpu_svm", "vmcb")?;
    match btf.resolve_chained_type(&m) {
        Ok(btf_rs::Type::Ptr(p)) if struct_named(btf, &p, "vmcb") => {}
        _ => return Err("vcpu_svm.vmcb is not a struct vmcb pointer".to_owned()),
    }
    let (control, _) = member(btf, "vmcb", "control")?;
    let (code, m) = member(btf, "vmcb_control_area", "exit_code")?;
    if control + code != VMCB_EXIT_CODE || size_of_member(btf, &m) != Some(4) {
        return Err(format!(
            "vmcb.control.exit_code is at {:#x}, not the hardware's {VMCB_EXIT_CODE:#x}",
            control + code
        ));
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_btf_is_the_classic_tracepoint() {
        let dir = tempfile::tempdir().expect("temp dir");
        let choice = choose(dir.path());
        assert!(matches!(choice, Choice::Classic { .. }), "{choice:?}");
        assert!(choice.describe().starts_with("classic tracepoint"));
    }
}
