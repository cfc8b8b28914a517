//! Finding tracefs, and reading a tracepoint's `format` file.
//!
//! Field offsets are read at load time instead of being compiled in: a patched kernel
//! may append fields, and the layout of `kvm:kvm_exit` has changed across releases.

use std::{
    fs,
    path::{Path, PathBuf},
};

use kvmtrace_model::tracefs_format::{DEBUGFS_TRACING, Field, TRACEFS, Tracepoint, parse_format};
use thiserror::Error;

/// Problems with tracefs or a tracepoint.
#[derive(Debug, Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted at {TRACEFS} and mounting it failed ({0}): run `mount -t tracefs nodev {TRACEFS}` as root"
    )]
    NotMounted(#[source] std::io::Error),
    #[error(
        "cannot read tracefs at {root}: permission denied (it is root's, mode 0700): run kvmtrace as root, or give it CAP_DAC_READ_SEARCH",
        root = .0.display()
    )]
    Unreadable(PathBuf),
    #[error(
        "tracepoint {category}:{name} not found in {root}/events: {hint}",
        root = .root.display()
    )]
    NoTracepoint {
        category: String,
        name: String,
        root: PathBuf,
        hint: &'static str,
    },
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{category}:{name} has no field '{field}' in its format file (fields: {fields})")]
    NoField {
        category: String,
        name: String,
        field: String,
        fields: String,
    },
}

/// A mounted tracefs.
#[derive(Clone, Debug)]
pub struct Tracefs {
    root: PathBuf,
}

impl Tracefs {
    /// Finds tracefs, mounting it at [`TRACEFS`] if it is not mounted anywhere.
    /// A tracefs this process may not read is said so, not mounted again.
    pub fn find_or_mount() -> Result<Self, TracefsError> {
        let mut unreadable = None;
        for root in [TRACEFS, DEBUGFS_TRACING] {
            match fs::metadata(Path::new(root).join("events")) {
                Ok(m) if m.is_dir() => return Ok(Self { root: root.into() }),
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    unreadable.get_or_insert(root);
                }
                _ => {}
            }
        }
        if let Some(root) = unreadable {
            return Err(TracefsError::Unreadable(root.into()));
        }
        mount_tracefs().map_err(TracefsError::NotMounted)?;
        Ok(Self {
            root: TRACEFS.into(),
        })
    }

    /// A tracefs at another path (tests).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn event_dir(&self, tp: &Tracepoint) -> PathBuf {
        self.root.join("events").join(&tp.category).join(&tp.name)
    }

    /// Fails with a hint when the tracepoint does not exist.
    pub fn require(&self, tp: &Tracepoint) -> Result<(), TracefsError> {
        if self.event_dir(tp).is_dir() {
            return Ok(());
        }
        let hint = if tp.category == "kvm" && !self.root.join("events/kvm").is_dir() {
            "kvm is not loaded: run `modprobe kvm_intel` (Intel) or `modprobe kvm_amd` (AMD)"
        } else {
            "this kernel does not have it: check the name with `ls /sys/kernel/tracing/events/<category>`"
        };
        Err(TracefsError::NoTracepoint {
            category: tp.category.clone(),
            name: tp.name.clone(),
            root: self.root.clone(),
            hint,
        })
    }

    /// The fields of a tracepoint, from its `format` file.
    pub fn fields(&self, tp: &Tracepoint) -> Result<Vec<Field>, TracefsError> {
        self.require(tp)?;
        let path = self.event_dir(tp).join("format");
        let text =
            fs::read_to_string(&path).map_err(|source| TracefsError::Read { path, source })?;
        Ok(parse_format(&text))
    }

    /// The offset of `field` in `tp`'s records.
    pub fn offset(&self, tp: &Tracepoint, field: &str) -> Result<u32, TracefsError> {
        let fields = self.fields(tp)?;
        fields
            .iter()
            .find(|f| f.name == field)
            .map(|f| f.offset)
            .ok_or_else(|| TracefsError::NoField {
                category: tp.category.clone(),
                name: tp.name.clone(),
                field: field.to_owned(),
                fields: fields
                    .iter()
                    .map(|f| f.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

fn mount_tracefs() -> std::io::Result<()> {
    let path = std::ffi::CString::new(TRACEFS).map_err(std::io::Error::other)?;
    let fstype = c"tracefs";
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            path.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KVM_EXIT_6_1: &str = "name: kvm_exit
ID: 1234
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned int exit_reason;\toffset:8;\tsize:4;\tsigned:0;
\tfield:unsigned long guest_rip;\toffset:16;\tsize:8;\tsigned:0;
\tfield:u32 isa;\toffset:24;\tsize:4;\tsigned:0;
\tfield:unsigned int vcpu_id;\toffset:56;\tsize:4;\tsigned:0;
\tfield:char parent_comm[16];\toffset:60;\tsize:16;\tsigned:0;

print fmt: \"vcpu %u reason %s\", REC->vcpu_id";

    #[test]
    fn parses_offsets_and_array_names() {
        let fields = parse_format(KVM_EXIT_6_1);
        let get = |n: &str| {
            fields
                .iter()
                .find(|f| f.name == n)
                .map(|f| (f.offset, f.size))
        };
        assert_eq!(get("exit_reason"), Some((8, 4)));
        assert_eq!(get("isa"), Some((24, 4)));
        assert_eq!(get("vcpu_id"), Some((56, 4)));
        assert_eq!(get("parent_comm"), Some((60, 16)));
        assert_eq!(fields.len(), 7);
    }

    #[test]
    fn missing_tracepoint_names_kvm() {
        let dir = std::env::temp_dir().join(format!("kvmtrace-tracefs-{}", std::process::id()));
        fs::create_dir_all(dir.join("events/sched")).ok();
        let err = Tracefs::at(&dir)
            .require(&Tracepoint::new("kvm", "kvm_exit"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("kvm:kvm_exit"), "{err}");
        assert!(err.contains("modprobe kvm_intel"), "{err}");
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn tracepoint_names_parse() {
        assert_eq!(
            Tracepoint::parse("kvm:kvm_exit"),
            Ok(Tracepoint::new("kvm", "kvm_exit"))
        );
        assert!(Tracepoint::parse("kvm_exit").is_err());
        assert!(Tracepoint::parse("a:b:c").is_err());
    }
}
