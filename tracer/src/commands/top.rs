//! `kvmtrace top`: a live view of exit rates, redrawn every interval (plain text, so it
//! works over a serial console). `q` quits when standard input is a terminal.

use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    io::{IsTerminal as _, Read as _, Write as _},
    process::ExitCode,
    sync::mpsc,
    time::Instant,
};

use anyhow::{Context as _, bail};
use comfy_table::{CellAlignment, Table, presets::UTF8_FULL_CONDENSED};
use kvmtrace::{
    host, privileges,
    probe::{Probe, ProbeConfig},
    top::{RateRow, View, view},
    tracefs::Tracefs,
};

use crate::cli::TopArgs;

/// Puts the terminal in non-canonical, no-echo mode so single keys arrive, and puts it
/// back on drop. Output processing stays on, so newlines still work.
struct KeyMode {
    saved: libc::termios,
}

impl KeyMode {
    fn enable() -> Option<Self> {
        if !std::io::stdin().is_terminal() {
            return None;
        }
        // SAFETY: tcgetattr fills the struct; fd 0 is a terminal.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return None;
        }
        let saved = t;
        t.c_lflag &= !(libc::ICANON | libc::ECHO);
        t.c_cc[libc::VMIN] = 1;
        t.c_cc[libc::VTIME] = 0;
        // SAFETY: a valid termios for fd 0.
        (unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) } == 0).then_some(Self { saved })
    }
}

impl Drop for KeyMode {
    fn drop(&mut self) {
        // SAFETY: restores what tcgetattr returned.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

fn rows_table(title: &str, rows: &[RateRow], limit: usize) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header([title, "exits/s", "total"]);
    for r in rows.iter().take(limit) {
        t.add_row([
            r.label.clone(),
            format!("{:.0}", r.rate),
            r.total.to_string(),
        ]);
    }
    for i in [1, 2] {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

fn render(v: &View, secs: f64, paging: &str, limit: usize) -> String {
    format!(
        "kvmtrace top — {paging}, {:.0} exits/s, {} exits in {secs:.0} s   (q quits)\n{}\n{}\n",
        v.rate,
        v.total,
        rows_table("reason", &v.reasons, limit),
        rows_table("VM", &v.vms, limit)
    )
}

pub fn run(args: &TopArgs) -> anyhow::Result<ExitCode> {
    if let Some(missing) = privileges::missing() {
        bail!(missing);
    }
    let tracefs = Tracefs::find_or_mount()?;
    let config = ProbeConfig {
        pids: args.pids.iter().copied().collect::<BTreeSet<_>>(),
        ..ProbeConfig::default()
    };
    let probe = Probe::attach(&tracefs, &config)?;
    let _keys = KeyMode::enable();
    let (tx, quit) = mpsc::channel();
    if std::io::stdin().is_terminal() {
        std::thread::spawn(move || {
            let mut byte = [0u8; 1];
            while std::io::stdin().read(&mut byte).is_ok_and(|n| n == 1) {
                if matches!(byte[0], b'q' | b'Q') {
                    let _ = tx.send(());
                    return;
                }
            }
        });
    }
    let redraw = std::io::stdout().is_terminal();
    let started = Instant::now();
    let start = probe.snapshot()?;
    let mut prev = start.clone();
    let mut prev_at = Instant::now();
    let mut comms = BTreeMap::new();
    for n in 1.. {
        if quit.recv_timeout(args.interval).is_ok() {
            break;
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
        let mut out = std::io::stdout().lock();
        if redraw {
            out.write_all(b"\x1b[H\x1b[2J")?;
        }
        out.write_all(render(&v, started.elapsed().as_secs_f64(), &paging, args.rows).as_bytes())
            .context("cannot write to standard output")?;
        out.flush()?;
        prev = cur;
        prev_at = now;
        if args.iterations.is_some_and(|max| n >= max) {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}
