//! One module per `kvmtrace` subcommand.

pub mod diff;
pub mod dist_files;
pub mod export;
pub mod guest;
pub mod reasons;
pub mod reconcile;
pub mod record;
pub mod show;
pub mod top;

use std::{
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use kvmtrace_model::{guest::GuestReadout, render::Options, report::Report, symbols::Symbols};
use thiserror::Error;

use kvmtrace::{host, privileges};

use crate::{
    cli::{ReportArgs, SymbolArgs},
    exit_status::Status,
};

/// Input the user gave that kvmtrace cannot use; `main` exits with status 2 for it.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// An error with an exit status of its own (neither 1, an error, nor 2, bad input).
#[derive(Debug, Error)]
#[error("{message}")]
pub struct Failure {
    pub status: Status,
    pub message: String,
}

/// Fails with one line unless this process may trace: the privileges to load eBPF
/// programs, in the host's pid namespace.
pub fn check_can_trace() -> anyhow::Result<()> {
    match privileges::missing().or_else(host::pid_namespace_problem) {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => Ok(()),
    }
}

/// Reads a text file the user named; every failure is [`BadInput`] naming the file.
pub fn read_input(path: &Path, what: &str) -> Result<String, BadInput> {
    let bytes = std::fs::read(path)
        .map_err(|e| BadInput(format!("cannot read {}: {e}", path.display())))?;
    String::from_utf8(bytes).map_err(|e| {
        BadInput(format!(
            "{}: not {what}: not UTF-8 text (byte {} is invalid)",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })
}

/// Reads a record written by `kvmtrace record --format json`.
pub fn load_report(path: &Path) -> anyhow::Result<Report> {
    let text = read_input(path, "a kvmtrace record")?;
    Report::from_json(&text).map_err(|e| BadInput(format!("{}: {e}", path.display())).into())
}

/// Reads `--guest-symbols`, when given.
pub fn load_symbols(args: &SymbolArgs) -> anyhow::Result<Option<Symbols>> {
    let Some(path) = &args.guest_symbols else {
        return Ok(None);
    };
    let text = read_input(path, "a kallsyms or System.map file")?;
    Symbols::parse(&text, args.kaslr_offset)
        .map(Some)
        .map_err(|e| BadInput(format!("{}: {e}", path.display())).into())
}

/// The render options `args` asks for.
pub fn render_options(args: &ReportArgs) -> Options {
    Options {
        per_vcpu: args.per_vcpu,
        detail: args.detail,
    }
}

/// Reads the output of `kvmtrace guest --format json`.
pub fn load_guest_readout(path: &Path) -> anyhow::Result<GuestReadout> {
    let text = read_input(path, "a kvmtrace guest readout")?;
    GuestReadout::from_json(&text).map_err(|e| BadInput(format!("{}: {e}", path.display())).into())
}

/// Writes `bytes` to `output`, or to standard output.
pub fn write_output(output: Option<&Path>, bytes: &[u8]) -> anyhow::Result<()> {
    match output {
        Some(path) => OutputFile::prepare(path)?.commit(bytes),
        None => Ok(std::io::stdout().write_all(bytes)?),
    }
}

/// A `-o FILE` to be written once the output is complete. The output goes to a
/// temporary file beside FILE that is renamed over it at the end, so a run that fails
/// (or is killed) leaves an existing FILE as it was, and a reader never sees half a
/// report. Paths under /dev and /proc (`-o /dev/stdout`) and existing files that are
/// not regular files (a FIFO) are written in place instead.
pub struct OutputFile {
    /// The path as the user gave it, for messages.
    path: PathBuf,
    target: Target,
}

enum Target {
    /// Replaced through a temporary file in its directory; symlinks are followed, so
    /// this is the file a symlink points to.
    Replace(PathBuf),
    InPlace,
}

impl OutputFile {
    /// Checks that `path` can be written, without touching it: called before a long run
    /// so that a bad path fails at once.
    pub fn prepare(path: &Path) -> Result<Self, BadInput> {
        let cannot = |why: String| {
            BadInput(format!(
                "cannot write {}: {why}: give -o a file in a writable directory",
                path.display()
            ))
        };
        let special = path.starts_with("/dev") || path.starts_with("/proc");
        let existing = match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => {
                return Err(BadInput(format!(
                    "cannot write {}: it is a directory: give -o a file name",
                    path.display()
                )));
            }
            Ok(m) if special || !m.is_file() => {
                return Ok(Self {
                    path: path.to_owned(),
                    target: Target::InPlace,
                });
            }
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(cannot(e.to_string())),
        };
        // Replace what a symlink points to, as writing through it would.
        let target = if existing {
            std::fs::canonicalize(path).map_err(|e| cannot(e.to_string()))?
        } else {
            path.to_owned()
        };
        let dir = parent_dir(&target);
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(cannot(format!("{} is not a directory", dir.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(cannot(format!(
                    "directory {} does not exist",
                    dir.display()
                )));
            }
            Err(e) => return Err(cannot(format!("{}: {e}", dir.display()))),
        }
        // Can a file be created there? (Removed at once: nothing is left behind if
        // kvmtrace is killed during the run.)
        temp_beside(&target).map_err(|e| cannot(io_reason(&e)))?;
        Ok(Self {
            path: path.to_owned(),
            target: Target::Replace(target),
        })
    }

    /// Writes `bytes` and puts them in place.
    pub fn commit(self, bytes: &[u8]) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let what = || format!("cannot write {}", self.path.display());
        match &self.target {
            Target::Replace(target) => {
                let mut temp = temp_beside(target)
                    .map_err(|e| anyhow::anyhow!(io_reason(&e)))
                    .with_context(what)?;
                temp.write_all(bytes).with_context(what)?;
                temp.as_file().sync_all().with_context(what)?;
                temp.persist(target)
                    .map_err(|e| e.error)
                    .with_context(what)?;
            }
            Target::InPlace => std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&self.path)
                .and_then(|mut f| f.write_all(bytes))
                .with_context(what)?,
        }
        Ok(())
    }
}

/// The directory of `file` (`.` for a bare name).
fn parent_dir(file: &Path) -> &Path {
    match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// An empty temporary file in the directory of `target`, with the mode `target` has,
/// or the mode `File::create` would give a new file (0666 less the umask).
fn temp_beside(target: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    let name = target
        .file_name()
        .map_or_else(|| "output".into(), |n| n.to_string_lossy());
    let existing = std::fs::metadata(target).ok().map(|m| m.permissions());
    let temp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(parent_dir(target))?;
    if let Some(mode) = existing {
        // Not subject to the umask, unlike the mode given at creation.
        std::fs::set_permissions(temp.path(), mode)?;
    }
    Ok(temp)
}

/// The operating system's reason of an I/O error, without the temporary file's name
/// that tempfile adds.
fn io_reason(e: &std::io::Error) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|r| r as _);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return io.to_string();
        }
        source = s.source();
    }
    e.to_string()
}

/// How exits can be read: the raw tracepoint where the vendor module's BTF shows the
/// layout (unless `classic` asks otherwise), or the classic one; logged.
pub fn count_choice(classic: bool) -> kvmtrace::exit_layout::Choice {
    let choice = if classic {
        kvmtrace::exit_layout::Choice::Classic {
            reason: "asked for".to_owned(),
        }
    } else {
        kvmtrace::exit_layout::choose(std::path::Path::new(kvmtrace::probe::BTF_DIR))
    };
    log::info!("exits can be read through the {}", choice.describe());
    choice
}
