//! The developer tasks themselves, as a new user meets them: set-up on a machine with
//! empty package lists, a lab that fails when kvmtrace does not build, kernel modules
//! built without a kernel installed on the host, a lab stopped by a signal that
//! takes its emulator with it, and the Debian package `cargo xtask dist` builds.
//!
//! They run `target/release/xtask` (built by `cargo xtask test`, which runs them) and
//! only one emulator at a time (`--test-threads=1`).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| panic!("no workspace above {}", env!("CARGO_MANIFEST_DIR")))
}

/// `target/release/xtask`, as `cargo xtask` builds it.
fn xtask() -> Command {
    let bin = workspace().join("target/release/xtask");
    assert!(
        bin.is_file(),
        "{} is missing: run the tests through `cargo xtask test`",
        bin.display()
    );
    let mut cmd = Command::new(bin);
    cmd.current_dir(workspace());
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A fresh scratch directory under target/.
fn scratch(name: &str) -> PathBuf {
    let dir = workspace().join("target/xtask-tests").join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

#[test]
fn empty_package_lists_are_refreshed_before_a_download() {
    // A private apt configuration whose lists directory is empty, as on a machine
    // that never ran apt-get update.
    let dir = scratch("empty-lists");
    for sub in ["lists/partial", "cache/archives/partial"] {
        fs::create_dir_all(dir.join(sub)).unwrap_or_else(|e| panic!("{e}"));
    }
    let conf = dir.join("apt.conf");
    fs::write(
        &conf,
        format!(
            "Dir::State::Lists \"{0}/lists\";\nDir::Cache \"{0}/cache\";\n",
            dir.display()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = run(xtask()
        .args(["kmod", "--check", "--kernel", "6.1"])
        .env("APT_CONFIG", &conf));
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "kmod --check failed:\n{stderr}");
    assert!(
        stderr.contains("refreshing the package lists (apt-get update)"),
        "{stderr}"
    );
    assert!(stderr.contains("checkpatch --strict clean"), "{stderr}");
    let lists = fs::read_dir(dir.join("lists"))
        .unwrap_or_else(|e| panic!("{e}"))
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with("_InRelease"))
        .count();
    assert!(
        lists > 0,
        "apt-get update wrote no lists in {}",
        dir.display()
    );
}

#[test]
fn a_kvmtrace_that_cannot_build_fails_the_lab_naming_the_step() {
    let out_dir = scratch("broken-linker");
    // A linker that always fails, in a target directory of its own so the real
    // build stays cached.
    let out = run(xtask()
        .args(["lab", "--isa", "amd", "--workload", "micro", "--out"])
        .arg(out_dir.join("lab"))
        .env("CARGO_TARGET_DIR", out_dir.join("target"))
        .env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER", "/bin/false"));
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "the lab passed without kvmtrace:\n{stderr}"
    );
    assert!(
        stderr.contains("step kvmtrace: kvmtrace does not build"),
        "{stderr}"
    );
    assert!(
        !out_dir.join("lab/build/serial.out").exists(),
        "the lab booted although kvmtrace did not build"
    );
}

/// `cargo xtask dist` builds the .deb and checks it (lintian without errors, the unit
/// verified and rated 3.0 or less); the package's man pages render and its bash
/// completion completes subcommands.
#[test]
fn dist_builds_a_deb_that_lintian_passes() {
    let out = run(xtask().arg("dist"));
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "xtask dist failed:\n{stderr}");
    assert!(stderr.contains("lintian: 0 errors"), "{stderr}");
    let deb = PathBuf::from(text(&out.stdout).trim());
    assert!(
        deb.is_file() && deb.starts_with(workspace().join("target/dist")),
        "{}",
        deb.display()
    );
    let root = scratch("dist");
    let x = run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    assert!(x.status.success(), "dpkg-deb -x: {}", text(&x.stderr));

    let man1 = root.join("usr/share/man/man1");
    let pages: Vec<PathBuf> = fs::read_dir(&man1)
        .unwrap_or_else(|e| panic!("{}: {e}", man1.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    for name in [
        "kvmtrace.1.gz",
        "kvmtrace-record.1.gz",
        "kvmtrace-export.1.gz",
    ] {
        assert!(man1.join(name).is_file(), "{name} is not in the package");
    }
    for page in &pages {
        let out = run(Command::new("man")
            .args(["--warnings", "-l", "-Tutf8", "-Z"])
            .arg(page)
            .env("MANWIDTH", "80"));
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "man -l {}: {}",
            page.display(),
            text(&out.stderr)
        );
    }

    let bash = root.join("usr/share/bash-completion/completions/kvmtrace");
    let script = format!(
        "source {}\nCOMP_WORDS=(kvmtrace re)\nCOMP_CWORD=1\n_kvmtrace kvmtrace re kvmtrace\n\
         printf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        bash.display()
    );
    let out = run(Command::new("bash").args(["--norc", "--noprofile", "-c", &script]));
    let mut words: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    words.sort();
    assert_eq!(
        words,
        ["reasons", "reconcile", "record"],
        "{}",
        text(&out.stderr)
    );
    for file in [
        "usr/bin/kvmtrace",
        "usr/share/zsh/vendor-completions/_kvmtrace",
        "usr/share/fish/vendor_completions.d/kvmtrace.fish",
        "lib/systemd/system/kvmtrace-export.service",
        "etc/default/kvmtrace",
        "usr/share/doc/kvmtrace/copyright",
        "usr/share/doc/kvmtrace/changelog.Debian.gz",
    ] {
        assert!(root.join(file).is_file(), "{file} is not in the package");
    }
}

/// Names of the installed packages that a kernel build must not put on the host.
fn kernel_packages() -> Vec<String> {
    let out = run(Command::new("dpkg-query").args(["-W", "-f", "${Status}|${Package}\n"]));
    text(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("install ok installed|"))
        .filter(|p| {
            p.starts_with("linux-image-")
                || p.starts_with("linux-headers-")
                || p.starts_with("linux-kbuild-")
                || *p == "initramfs-tools"
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn kmod_installs_no_kernel_on_the_host() {
    let before = kernel_packages();
    let out = run(xtask().args(["kmod", "--kernel", "6.12"]));
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "kmod --kernel 6.12 failed:\n{stderr}");
    let modules = text(&out.stdout);
    assert_eq!(
        modules.lines().filter(|l| l.ends_with(".ko")).count(),
        3,
        "{modules}"
    );
    let after = kernel_packages();
    assert_eq!(before, after, "kmod changed the host's kernel packages");
    assert!(
        after.iter().all(|p| !p.starts_with("linux-image-")),
        "a kernel image is installed on the host: {after:?}"
    );
}

#[test]
fn setup_installs_the_pinned_nightly() {
    let pin = fs::read_to_string(workspace().join("tracer-ebpf/rust-toolchain.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    let channel = pin
        .lines()
        .find(|l| l.starts_with("channel"))
        .and_then(|l| l.split('"').nth(1))
        .unwrap_or_else(|| panic!("no channel in the pin:\n{pin}"));
    // A dated nightly, never a moving `nightly`.
    let date = channel.strip_prefix("nightly-").unwrap_or_default();
    assert!(
        date.len() == 10 && date.chars().filter(|c| *c == '-').count() == 2,
        "{channel}"
    );
    let out = run(xtask().arg("setup"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(&format!("setup: {channel} (LLVM")));
    let components = run(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        channel,
    ]));
    assert!(
        text(&components.stdout)
            .lines()
            .any(|l| l.starts_with("rust-src")),
        "{channel} has no rust-src"
    );
}

/// Pids whose command line contains every one of `words`.
fn pids_with(words: &[&str]) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let line = text(&c).replace('\0', " ");
                words.iter().all(|w| line.contains(w))
            })
        })
        .collect()
}

fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        sleep(Duration::from_millis(100));
    }
    false
}

/// Starts a lab, waits until its emulator runs, signals the lab's whole process group
/// as a terminal does for Ctrl-C (or xtask alone for SIGTERM), and checks that xtask
/// and the emulator are gone.
fn signal_stops_the_emulator(isa: &str, emulator: &str, signal: i32, whole_group: bool) {
    let dir = scratch(&format!("signal-{isa}"));
    let lab = dir.join("lab");
    let lab_arg = lab.to_string_lossy().into_owned();
    let mut child: Child = xtask()
        .args([
            "lab",
            "--isa",
            isa,
            "--workload",
            "micro",
            "--out",
            &lab_arg,
        ])
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start the lab: {e}"));
    let pid = i32::try_from(child.id()).unwrap_or_else(|e| panic!("{e}"));
    let running = wait_for(Duration::from_secs(900), || {
        !pids_with(&[emulator, &lab_arg]).is_empty()
    });
    if !running {
        let _ = child.kill();
        panic!("{emulator} never started for {lab_arg}");
    }
    sleep(Duration::from_secs(2));
    let target = if whole_group { -pid } else { pid };
    // SAFETY: kill(2) on the child (or its group) this test started.
    assert_eq!(unsafe { libc::kill(target, signal) }, 0);
    let mut status = None;
    let ended = wait_for(Duration::from_secs(30), || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    assert!(ended, "xtask did not end within 30 s of signal {signal}");
    let code = status.and_then(|s| s.code().or_else(|| s.signal().map(|g| 128 + g)));
    assert_eq!(code, Some(128 + signal), "xtask's exit status");
    let gone = wait_for(Duration::from_secs(10), || {
        pids_with(&[emulator, &lab_arg]).is_empty()
    });
    assert!(
        gone,
        "{emulator} outlived xtask: {:?}",
        pids_with(&[emulator])
    );
}

#[test]
fn ctrl_c_stops_bochs_with_the_lab() {
    signal_stops_the_emulator("intel", "bochs-bin", libc::SIGINT, true);
}

#[test]
fn sigterm_stops_qemu_with_the_lab() {
    signal_stops_the_emulator("amd", "qemu-system-x86_64", libc::SIGTERM, false);
}
