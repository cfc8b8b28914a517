//! `cargo xtask VERB`: everything around the `kvmtrace` build that is not the product.

mod apt;
mod bench;
mod dist;
mod exec;
mod files;
mod fuzz;
mod kmod;
mod lab;
mod lock;
mod process;
mod setup;
mod test;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "kvmtrace developer tasks", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install everything the build needs on a fresh Debian 12 machine: the nightly's
    /// rust-src, bpf-linker against the nightly's LLVM, and apt packages.
    Setup(setup::Options),
    /// Run every check, as CI does (`.ci/run`); ends with `total: N passed, N failed`.
    ///
    /// Setup, fmt, clippy, unit and integration tests (as root, with CI=true so that
    /// none is skipped), fuzzing, checkpatch and the KVM patch built for each kernel
    /// line, the lab end-to-end tests (an Intel and an AMD stream side by side), and the
    /// tests of the xtask verbs. Each step says its time; the line before the total
    /// gives the whole run's.
    ///
    /// A clean clone's `.ci/run` took 24 min 05 s on a 2-core Debian 12 machine
    /// (2026-12-08: 354 passed, 0 failed; the toolchain and host packages were installed).
    Test(test::Options),
    /// Build the patched KVM modules (CPUID exit-counter leaves) out of tree.
    Kmod(kmod::Options),
    /// Boot the emulated lab (Bochs VMX / QEMU SVM) and trace a real KVM in it.
    Lab(lab::Options),
    /// Fuzz the parsers (record and guest JSON, reasons, leaves, tracefs format files)
    /// with cargo-fuzz for a bounded time each; fails on a crash, naming the input.
    Fuzz(fuzz::Options),
    /// Measure what tracing costs an exit-bound guest in the Bochs lab: kvmtrace,
    /// perf kvm stat, the hist trigger and the patched modules against stock, untraced.
    Bench(bench::Options),
    /// Build the Debian package, target/dist/kvmtrace_<version>_amd64.deb, and check it.
    ///
    /// The static kvmtrace the lab uses, its man pages and bash, zsh and fish
    /// completions (made from its own command line), and the kvmtrace-export service
    /// (installed, not enabled; its flags in /etc/default/kvmtrace). The checks:
    /// systemd-analyze verify and security on the unit, and lintian (installed if
    /// missing), which must report no error.
    Dist(dist::Options),
}

/// The checkout xtask runs in: `cargo xtask` (`cargo run`) names the package it runs
/// in `CARGO_MANIFEST_DIR` at run time; run otherwise, the nearest directory from the
/// current one up that holds `xtask/Cargo.toml`. Never the checkout the binary was
/// built in: a binary built in one checkout must not write into that one's target/.
fn workspace_root() -> anyhow::Result<PathBuf> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from);
    checkout_root(manifest_dir.as_deref(), &cwd).with_context(|| {
        format!(
            "{} is not in a kvmtrace checkout (no xtask/Cargo.toml here or above): \
             run cargo xtask inside one",
            cwd.display()
        )
    })
}

/// [`workspace_root`]: the parent of `manifest_dir` (xtask's own directory), else the
/// first of `cwd` and its ancestors that holds `xtask/Cargo.toml`.
fn checkout_root(manifest_dir: Option<&Path>, cwd: &Path) -> Option<PathBuf> {
    let is_checkout = |dir: &Path| dir.join("xtask/Cargo.toml").is_file();
    manifest_dir
        .and_then(Path::parent)
        .filter(|dir| is_checkout(dir))
        .or_else(|| cwd.ancestors().find(|dir| is_checkout(dir)))
        .map(Path::to_path_buf)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = process::stop_children_on_signals()
        .and_then(|()| workspace_root())
        .and_then(|root| match cli.command {
            Command::Setup(opts) => setup::run(&opts, &root),
            Command::Test(opts) => test::run(&opts, &root),
            Command::Kmod(opts) => kmod::run(&opts, &root),
            Command::Lab(opts) => lab::run(&opts, &root),
            Command::Fuzz(opts) => fuzz::run(&opts, &root),
            Command::Bench(opts) => bench::run(&opts, &root),
            Command::Dist(opts) => dist::run(&opts, &root),
        });
    process::wait_if_stopping();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The test run has said what failed, and ends with its total line.
        Err(err) if err.is::<test::Reported>() => std::process::ExitCode::FAILURE,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checkout_is_the_one_xtask_runs_in() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (a, b) = (tmp.path().join("a"), tmp.path().join("moved/b"));
        for checkout in [&a, &b] {
            std::fs::create_dir_all(checkout.join("xtask/src")).unwrap_or_else(|e| panic!("{e}"));
            std::fs::write(checkout.join("xtask/Cargo.toml"), "").unwrap_or_else(|e| panic!("{e}"));
        }
        let deep = b.join("xtask/src");
        assert_eq!(
            checkout_root(Some(&a.join("xtask")), &deep),
            Some(a.clone())
        );
        assert_eq!(checkout_root(None, &deep), Some(b.clone()));
        // A CARGO_MANIFEST_DIR that is not a checkout's xtask/ is passed over.
        assert_eq!(checkout_root(Some(tmp.path()), &b), Some(b.clone()));
        assert_eq!(checkout_root(None, tmp.path()), None);
    }
}
