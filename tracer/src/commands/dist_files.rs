//! `kvmtrace dist-files DIR`: the man pages and shell completions, made from the
//! command line's own clap definitions ([`Cli`]) so that they cannot drift from
//! `--help`. `cargo xtask dist` runs it on the binary it packages.
//!
//! It is not a subcommand of [`Cli`]: `main` asks [`run_if_asked`] first, so it is in
//! neither the help nor the pages and completions it writes (clap's completions list
//! hidden subcommands too).
//!
//! It writes `DIR/man/kvmtrace.1` and a `kvmtrace-SUBCOMMAND.1` per visible subcommand,
//! and `DIR/completions/` `kvmtrace.bash`, `_kvmtrace` (zsh) and `kvmtrace.fish`.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser};
use clap_complete::Shell;

use crate::{cli::Cli, exit_status::Status};

/// The word that asks for it, in place of a subcommand.
const WORD: &str = "dist-files";

/// The shells completed, with each one's file name.
const SHELLS: [(Shell, &str); 3] = [
    (Shell::Bash, "kvmtrace.bash"),
    (Shell::Zsh, "_kvmtrace"),
    (Shell::Fish, "kvmtrace.fish"),
];

/// Write kvmtrace's man pages and shell completions into a directory (for packaging).
#[derive(Debug, Parser)]
#[command(name = "kvmtrace-dist-files", bin_name = "kvmtrace dist-files")]
struct DistFiles {
    /// The directory to write into: man/ and completions/ are made in it.
    #[arg(value_name = "DIR")]
    out: PathBuf,
}

/// Runs `kvmtrace dist-files DIR` when the command line is that (or
/// `kvmtrace dist-files --help`), and says with what exit status; `None` otherwise.
pub fn run_if_asked() -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next().is_none_or(|word| word != WORD) {
        return None;
    }
    let parsed = match DistFiles::try_parse_from(std::iter::once(WORD.into()).chain(args)) {
        Ok(parsed) => parsed,
        Err(err) if err.kind() == clap::error::ErrorKind::DisplayHelp => {
            let _ = err.print();
            return Some(Status::Success.into());
        }
        Err(_) => {
            let _ = writeln!(
                std::io::stderr(),
                "kvmtrace: {WORD} takes one argument, the directory to write into \
                 (see `kvmtrace {WORD} --help`)"
            );
            return Some(Status::BadInput.into());
        }
    };
    let code = match write_all(&parsed.out) {
        Ok(written) => {
            let mut stdout = std::io::stdout().lock();
            for path in written {
                let _ = writeln!(stdout, "{}", path.display());
            }
            Status::Success
        }
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "kvmtrace: {err:#}");
            Status::Error
        }
    };
    Some(code.into())
}

/// Writes every page and completion under `out`; returns the files written.
pub fn write_all(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let cannot = |dir: &Path| format!("cannot write into {}", dir.display());
    let man = out.join("man");
    let completions = out.join("completions");
    for dir in [&man, &completions] {
        fs::create_dir_all(dir).with_context(|| cannot(dir))?;
    }
    clap_mangen::generate_to(Cli::command(), &man).with_context(|| cannot(&man))?;
    let mut written = Vec::new();
    for (shell, name) in SHELLS {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "kvmtrace", &mut script);
        let path = completions.join(name);
        fs::write(&path, script).with_context(|| cannot(&completions))?;
        written.push(path);
    }
    let mut pages: Vec<PathBuf> = fs::read_dir(&man)
        .with_context(|| cannot(&man))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    pages.sort();
    written.splice(0..0, pages);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// The pages and completions, written once into a fresh directory.
    fn written() -> (tempfile::TempDir, Vec<PathBuf>) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temporary directory: {e}"));
        let files = write_all(dir.path()).unwrap_or_else(|e| panic!("dist-files: {e:#}"));
        (dir, files)
    }

    fn file_names(files: &[PathBuf]) -> Vec<String> {
        files
            .iter()
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn a_page_per_visible_subcommand_and_three_completions() {
        let (_dir, files) = written();
        let mut want: Vec<String> = Cli::command()
            .get_subcommands()
            .filter(|c| !c.is_hide_set())
            .map(|c| format!("kvmtrace-{}.1", c.get_name()))
            .collect();
        want.push("kvmtrace.1".to_owned());
        want.sort();
        want.extend(SHELLS.iter().map(|&(_, name)| name.to_owned()));
        assert_eq!(file_names(&files), want);
        assert!(
            !file_names(&files).iter().any(|n| n.contains("dist-files")),
            "the hidden subcommand has no page"
        );
    }

    /// `man -l` renders each page with no warning from groff (as lintian checks them).
    #[test]
    fn man_renders_each_page() {
        let (_dir, files) = written();
        let pages: Vec<&PathBuf> = files
            .iter()
            .filter(|p| p.extension().is_some_and(|x| x == "1"))
            .collect();
        assert!(pages.len() > 1, "{files:?}");
        for page in pages {
            let out = Command::new("man")
                .args(["--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z"])
                .arg(page)
                .env("MANWIDTH", "80")
                .output()
                .unwrap_or_else(|e| {
                    panic!("cannot run man ({e}): install man-db (apt-get install man-db)")
                });
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && stderr.trim().is_empty(),
                "man -l {}: {}\n{stderr}",
                page.display(),
                out.status
            );
            let rendered = Command::new("man")
                .arg("-l")
                .arg(page)
                .env("MANWIDTH", "80")
                .env("MANPAGER", "cat")
                .output()
                .unwrap_or_else(|e| panic!("cannot run man: {e}"));
            let text = String::from_utf8_lossy(&rendered.stdout);
            let name = page
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            assert!(
                text.contains("NAME") && text.contains(&name),
                "{name}:\n{text}"
            );
        }
    }

    /// Completions of `kvmtrace WORD` from the bash script, as bash-completion asks.
    fn bash_complete(script: &Path, words: &[&str]) -> Vec<String> {
        let cword = words.len() - 1;
        let program = format!(
            "source {script}\nCOMP_WORDS=({words})\nCOMP_CWORD={cword}\nCOMP_LINE=\"{line}\"\n\
             COMP_POINT=${{#COMP_LINE}}\n_kvmtrace kvmtrace '{last}' '{prev}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
            script = script.display(),
            words = words
                .iter()
                .map(|w| format!("'{w}'"))
                .collect::<Vec<_>>()
                .join(" "),
            line = words.join(" "),
            last = words[cword],
            prev = words[cword.saturating_sub(1)],
        );
        let out = Command::new("bash")
            .args(["--norc", "--noprofile", "-c", &program])
            .output()
            .unwrap_or_else(|e| panic!("cannot run bash: {e}"));
        assert!(
            out.status.success(),
            "bash: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .filter(|l| !l.is_empty())
            .collect()
    }

    #[test]
    fn bash_completes_subcommands_and_options() {
        let (dir, _files) = written();
        let script = dir.path().join("completions/kvmtrace.bash");
        let mut re = bash_complete(&script, &["kvmtrace", "re"]);
        re.sort();
        assert_eq!(re, ["reasons", "reconcile", "record"]);
        let export = bash_complete(&script, &["kvmtrace", "export", "--li"]);
        assert_eq!(export, ["--listen"]);
        let all = bash_complete(&script, &["kvmtrace", ""]);
        assert!(all.iter().any(|w| w == "top"), "{all:?}");
        assert!(!all.iter().any(|w| w == "dist-files"), "hidden: {all:?}");
    }
}
