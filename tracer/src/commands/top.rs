//! `kvmtrace top`: a live view of exit rates, redrawn every interval. On a terminal it
//! uses the alternate screen, and reads single keys in raw mode (`q` or Ctrl-C quits);
//! otherwise it prints plain text frames, so it works over a serial console or a pipe.
//! The terminal is put back however top ends: `q`, Ctrl-C, SIGINT, SIGTERM, an error
//! or a panic.

use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    io::{IsTerminal as _, Write as _},
    process::ExitCode,
    sync::{
        Once,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Instant,
};

use anyhow::Context as _;
use crossterm::{
    cursor,
    event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    execute, queue, terminal,
};
use kvmtrace::{
    host,
    probe::{Probe, ProbeConfig},
    tracefs::Tracefs,
};
use kvmtrace_model::rates::view;
use signal_hook::{consts::signal, iterator::Signals};

use crate::{cli::TopArgs, exit_status::Status};

/// Set to make `top` panic after its first frame: for the test that the terminal is
/// restored on a panic (tracer/tests/top_terminal.rs). Test-only: never set it.
const TEST_PANIC_ENV: &str = "KVMTRACE_TEST_ONLY_PANIC_IN_TOP";

/// What top changed on the terminal, for [`restore_terminal`].
static RAW_MODE: AtomicBool = AtomicBool::new(false);
static ALTERNATE_SCREEN: AtomicBool = AtomicBool::new(false);

/// Puts back whatever top changed on the terminal; safe to call more than once, from
/// the guard's drop and from the panic hook.
fn restore_terminal() {
    if ALTERNATE_SCREEN.swap(false, Ordering::SeqCst) {
        let _ = execute!(
            std::io::stdout(),
            cursor::Show,
            terminal::LeaveAlternateScreen
        );
    }
    if RAW_MODE.swap(false, Ordering::SeqCst) {
        let _ = terminal::disable_raw_mode();
    }
}

/// Restores the terminal before the panic message is printed, so that it is readable.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
    });
}

/// The terminal while top runs: raw mode when standard input is a terminal (so single
/// keys arrive), the alternate screen with the cursor hidden when standard output is
/// one. Dropping it restores both.
struct Screen {
    keys: bool,
    alternate: bool,
}

impl Screen {
    fn enter() -> anyhow::Result<Self> {
        install_panic_hook();
        let screen = Self {
            keys: std::io::stdin().is_terminal(),
            alternate: std::io::stdout().is_terminal(),
        };
        if screen.keys {
            terminal::enable_raw_mode().context("cannot put the terminal in raw mode")?;
            RAW_MODE.store(true, Ordering::SeqCst);
        }
        if screen.alternate {
            ALTERNATE_SCREEN.store(true, Ordering::SeqCst);
            execute!(
                std::io::stdout(),
                terminal::EnterAlternateScreen,
                cursor::Hide
            )
            .context("cannot switch the terminal to the alternate screen")?;
        }
        Ok(screen)
    }

    /// Writes one frame: redrawn in place on a terminal (raw mode needs "\r\n"), plain
    /// text otherwise.
    fn draw(&self, frame: &str) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        if self.alternate {
            queue!(
                out,
                cursor::MoveTo(0, 0),
                terminal::Clear(terminal::ClearType::All)
            )?;
            out.write_all(frame.replace('\n', "\r\n").as_bytes())?;
        } else {
            out.write_all(frame.as_bytes())?;
        }
        out.flush()
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Why top stops before its last refresh.
#[derive(Debug)]
enum Quit {
    Key,
    Signal,
}

/// Sends [`Quit::Signal`] on SIGINT or SIGTERM. Installed before the terminal changes,
/// so neither can kill top with the terminal still in raw mode.
fn watch_signals(tx: mpsc::Sender<Quit>) -> anyhow::Result<()> {
    let mut signals = Signals::new([signal::SIGINT, signal::SIGTERM])
        .context("cannot handle SIGINT and SIGTERM")?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            let _ = tx.send(Quit::Signal);
        }
    });
    Ok(())
}

/// Sends [`Quit::Key`] on `q` or Ctrl-C (raw mode turns Ctrl-C into a key).
fn watch_keys(tx: mpsc::Sender<Quit>) {
    std::thread::spawn(move || {
        while let Ok(e) = event::read() {
            let Event::Key(k) = e else { continue };
            let quit = k.kind != KeyEventKind::Release
                && (matches!(k.code, KeyCode::Char('q' | 'Q'))
                    || (k.code == KeyCode::Char('c')
                        && k.modifiers.contains(KeyModifiers::CONTROL)));
            if quit {
                let _ = tx.send(Quit::Key);
                return;
            }
        }
    });
}

pub fn run(args: &TopArgs) -> anyhow::Result<ExitCode> {
    super::check_can_trace()?;
    let tracefs = Tracefs::find_or_mount()?;
    let config = ProbeConfig {
        pids: args.pids.iter().copied().collect::<BTreeSet<_>>(),
        counts: Some(super::count_choice(false)),
        ..ProbeConfig::default()
    };
    let mut probe = Probe::attach(&tracefs, &config)?;
    let (tx, quit) = mpsc::channel();
    watch_signals(tx.clone())?;
    let screen = Screen::enter()?;
    if screen.keys {
        watch_keys(tx.clone());
    }
    let started = Instant::now();
    let start = probe.snapshot()?;
    let mut prev = start.clone();
    let mut prev_at = Instant::now();
    let mut comms = BTreeMap::new();
    for n in 1.. {
        match quit.recv_timeout(args.interval) {
            Ok(_) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // `tx` is still here, so the channel cannot close.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let cur = probe.snapshot()?;
        let now = Instant::now();
        for pid in cur.vcpus.keys().map(|k| k.pid) {
            if let Entry::Vacant(e) = comms.entry(pid)
                && let Some(c) = host::comm(pid)
            {
                e.insert(c);
            }
        }
        let v = view(&start, &prev, &cur, (now - prev_at).as_secs_f64(), &comms);
        let paging =
            host::paging().map_or_else(|| "no kvm vendor module".to_owned(), |p| p.label());
        screen
            .draw(&kvmtrace_model::render::rates::screen(
                &v,
                started.elapsed().as_secs_f64(),
                &paging,
                args.rows,
            ))
            .context("cannot write to standard output")?;
        if std::env::var_os(TEST_PANIC_ENV).is_some() {
            panic!("{TEST_PANIC_ENV} is set: panicking to test that the terminal is restored");
        }
        prev = cur;
        prev_at = now;
        if args.iterations.is_some_and(|max| n >= max) {
            break;
        }
    }
    drop(tx);
    Ok(Status::Success.into())
}
