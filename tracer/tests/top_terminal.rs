//! `kvmtrace top` on a terminal: run inside a pseudo-terminal, it must leave the
//! terminal's modes exactly as it found them, however it ends (`q`, Ctrl-C, SIGINT,
//! SIGTERM, a panic), and leave the alternate screen. Root, with kvm loaded.

mod common;

use std::{
    io::{Read as _, Write as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    process::{Child, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread::{JoinHandle, sleep},
    time::{Duration, Instant},
};

use common::{has_kvm_tracepoints, is_root, kvmtrace};

/// The variable that makes `top` panic after its first frame (test-only).
const PANIC_ENV: &str = "KVMTRACE_TEST_ONLY_PANIC_IN_TOP";

const ENTER_ALTERNATE: &str = "\x1b[?1049h";
const LEAVE_ALTERNATE: &str = "\x1b[?1049l";
const SHOW_CURSOR: &str = "\x1b[?25h";

/// A pseudo-terminal pair.
struct Pty {
    master: std::fs::File,
    slave: OwnedFd,
}

fn openpty() -> Pty {
    let (mut master, mut slave) = (-1, -1);
    let size = libc::winsize {
        ws_row: 40,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty fills two fds; the name buffer may be null; the termios is null
    // (the kernel's defaults: canonical mode with echo) and the size points to a winsize.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just opened and are owned by nobody else.
    unsafe {
        Pty {
            master: std::fs::File::from_raw_fd(master),
            slave: OwnedFd::from_raw_fd(slave),
        }
    }
}

/// The terminal modes, as `stty -g` would show them.
#[derive(Debug, PartialEq, Eq)]
struct Modes {
    iflag: libc::tcflag_t,
    oflag: libc::tcflag_t,
    cflag: libc::tcflag_t,
    lflag: libc::tcflag_t,
    cc: Vec<libc::cc_t>,
    ispeed: libc::speed_t,
    ospeed: libc::speed_t,
}

impl Modes {
    fn of(fd: &OwnedFd) -> Self {
        // SAFETY: tcgetattr fills a termios for a valid fd.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) };
        assert_eq!(rc, 0, "tcgetattr: {}", std::io::Error::last_os_error());
        Self {
            iflag: t.c_iflag,
            oflag: t.c_oflag,
            cflag: t.c_cflag,
            lflag: t.c_lflag,
            cc: t.c_cc.to_vec(),
            // SAFETY: reads a field of a valid termios.
            ispeed: unsafe { libc::cfgetispeed(&t) },
            ospeed: unsafe { libc::cfgetospeed(&t) },
        }
    }

    fn canonical_with_echo(&self) -> bool {
        self.lflag & libc::ICANON != 0 && self.lflag & libc::ECHO != 0
    }
}

/// What the terminal showed, read from the master side until the slave side closes.
struct Screen {
    text: Arc<Mutex<Vec<u8>>>,
    reader: JoinHandle<()>,
}

impl Screen {
    fn watch(master: &std::fs::File) -> Self {
        let mut master = master
            .try_clone()
            .unwrap_or_else(|e| panic!("dup the pty master: {e}"));
        let text = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&text);
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once every slave fd is closed.
            while let Ok(n @ 1..) = master.read(&mut buf) {
                if let Ok(mut t) = sink.lock() {
                    t.extend_from_slice(&buf[..n]);
                }
            }
        });
        Self { text, reader }
    }

    fn text(&self) -> String {
        let bytes = self.text.lock().map(|t| t.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Everything shown, once the slave side is closed.
    fn finish(self) -> String {
        let Self { text, reader } = self;
        let _ = reader.join();
        let bytes = text.lock().map(|t| t.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn wait_for(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.text().contains(what) {
            assert!(
                Instant::now() < deadline,
                "no {what:?} on the terminal in 30 s: {:?}",
                self.text()
            );
            sleep(Duration::from_millis(20));
        }
    }
}

fn wait_with_timeout(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("kvmtrace top did not end within 20 s");
            }
            Ok(None) => sleep(Duration::from_millis(20)),
            Err(e) => panic!("wait: {e}"),
        }
    }
}

/// How a run of top is ended.
#[derive(Clone, Copy, Debug)]
enum Ending {
    Key(&'static [u8]),
    Signal(i32),
    Panic,
}

/// Runs `kvmtrace top` on a fresh pty (its controlling terminal, as in a login shell),
/// ends it as `ending` says once it has drawn a frame, and checks the terminal after.
fn top_restores_the_terminal(ending: Ending) {
    let mut pty = openpty();
    let before = Modes::of(&pty.slave);
    assert!(
        before.canonical_with_echo(),
        "a new pty is in canonical mode with echo: {before:?}"
    );
    let stdio = || {
        Stdio::from(
            pty.slave
                .try_clone()
                .unwrap_or_else(|e| panic!("dup the pty slave: {e}")),
        )
    };
    let mut cmd = kvmtrace();
    cmd.args(["top", "-i", "0.2"])
        .stdin(stdio())
        .stdout(stdio())
        .stderr(stdio())
        .env("TERM", "xterm")
        .env_remove(PANIC_ENV);
    if matches!(ending, Ending::Panic) {
        cmd.env(PANIC_ENV, "1");
    }
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let screen = Screen::watch(&pty.master);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn kvmtrace top: {e}"));
    // It holds copies of the slave side: the reader sees the end only once all are closed.
    drop(cmd);
    screen.wait_for("kvmtrace top —");
    // (With a panic, top may already be gone.)
    if !matches!(ending, Ending::Panic) {
        let during = Modes::of(&pty.slave);
        assert!(
            during.lflag & (libc::ICANON | libc::ECHO) == 0,
            "{ending:?}: top reads single keys without echo while it runs: {during:?}"
        );
    }
    match ending {
        Ending::Key(bytes) => pty
            .master
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("type {bytes:?}: {e}")),
        Ending::Signal(sig) => {
            let pid = i32::try_from(child.id()).unwrap_or_else(|e| panic!("pid: {e}"));
            // SAFETY: kill(2) on our own child.
            assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
        }
        Ending::Panic => {}
    }
    let status = wait_with_timeout(&mut child);
    let after = Modes::of(&pty.slave);
    drop(pty.slave);
    let text = screen.finish();
    match ending {
        Ending::Panic => {
            assert_eq!(status.code(), Some(101), "a panic: {text:?}");
            let message = text
                .find(&format!("{PANIC_ENV} is set"))
                .unwrap_or_else(|| panic!("no panic message: {text:?}"));
            let left = text
                .rfind(LEAVE_ALTERNATE)
                .unwrap_or_else(|| panic!("never left the alternate screen: {text:?}"));
            assert!(
                left < message,
                "the panic message is printed after the terminal is restored: {text:?}"
            );
        }
        _ => assert!(status.success(), "{ending:?}: {status:?}: {text:?}"),
    }
    assert_eq!(before, after, "{ending:?}: the terminal modes changed");
    assert!(text.contains(ENTER_ALTERNATE), "{ending:?}: {text:?}");
    let left = text.rfind(LEAVE_ALTERNATE);
    let entered = text.rfind(ENTER_ALTERNATE);
    assert!(left > entered, "{ending:?}: left the alternate screen last");
    assert!(
        text.contains(SHOW_CURSOR),
        "{ending:?}: the cursor is shown"
    );
}

#[test]
fn top_restores_the_terminal_on_q() {
    if !is_root() || !has_kvm_tracepoints() {
        return;
    }
    top_restores_the_terminal(Ending::Key(b"q"));
}

#[test]
fn top_restores_the_terminal_on_ctrl_c() {
    if !is_root() || !has_kvm_tracepoints() {
        return;
    }
    // Raw mode: Ctrl-C arrives as a key, not as SIGINT.
    top_restores_the_terminal(Ending::Key(b"\x03"));
}

#[test]
fn top_restores_the_terminal_on_sigint() {
    if !is_root() || !has_kvm_tracepoints() {
        return;
    }
    top_restores_the_terminal(Ending::Signal(libc::SIGINT));
}

#[test]
fn top_restores_the_terminal_on_sigterm() {
    if !is_root() || !has_kvm_tracepoints() {
        return;
    }
    top_restores_the_terminal(Ending::Signal(libc::SIGTERM));
}

#[test]
fn top_restores_the_terminal_on_panic() {
    if !is_root() || !has_kvm_tracepoints() {
        return;
    }
    top_restores_the_terminal(Ending::Panic);
}
