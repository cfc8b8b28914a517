//! Runs the emulated host and follows its serial console: the L1 init announces each
//! step with a time budget, and the run is killed as soon as a step overruns or the
//! L1 kernel panics.

use std::{
    io::{Read as _, Seek as _, SeekFrom},
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    bochs,
    console::{self, Line},
    inputs::Inputs,
    options::Isa,
    qemu,
    step::Step,
};
use crate::{files::write, process::ChildGuard};

/// The budget of the first step: from power-on to the L1 init's first marker.
const BOOT_BUDGET: Duration = Duration::from_secs(240);
/// How long the emulator may linger after the L1 init printed its result.
const POWEROFF_GRACE: Duration = Duration::from_secs(30);
/// Console lines that mean the L1 kernel is gone.
const PANIC_MARKERS: &[&str] = &["Kernel panic - not syncing", "---[ end Kernel panic"];

pub struct Run {
    pub lines: Vec<Line>,
    /// The text after `KVMLAB result `, if the L1 init got that far.
    pub result: Option<String>,
    /// (step name, host seconds) for each finished L1 step.
    pub steps: Vec<(String, f64)>,
    pub wall: f64,
}

/// An emulated L1 host ready to boot: `isa`'s emulator (Bochs, or QEMU TCG with
/// `cpus` CPUs) booting the L1 kernel of `inputs` with `initrd`, working in `build`.
pub struct Machine<'a> {
    pub isa: Isa,
    pub cpus: u8,
    /// QEMU only: L1's CPUs each in a host thread of their own (multi-threaded TCG).
    /// QEMU 7.2's multi-threaded TCG corrupts L1 under nested SVM with hundreds of
    /// VMs (a 1 024-VM crowd: "corrupted stack end detected inside scheduler", and a
    /// VM shut down with or without kvmtrace); in one thread the same crowd is exact.
    pub parallel: bool,
    pub inputs: &'a Inputs,
    pub initrd: &'a Path,
    pub build: &'a Path,
    /// QEMU only: a network card whose `guest` TCP port is forwarded to the host's
    /// 127.0.0.1:`host`, and nothing else reachable (`(guest, host)`).
    pub forward: Option<(u16, u16)>,
}

impl Machine<'_> {
    /// Boots it under a step named after the emulator, which first notes `what`, and
    /// follows its console, copied to `serial_log`, to L1's result (see [`boot`]).
    pub fn boot(
        &self,
        root: &Path,
        what: String,
        scale: f64,
        serial_log: &Path,
    ) -> anyhow::Result<(Run, String, Duration)> {
        let mut cmd = match self.isa {
            Isa::Intel => bochs::command(root, self.build, &self.inputs.kernel, self.initrd)?,
            Isa::Amd => qemu::command(
                self.build,
                self.inputs,
                self.initrd,
                self.cpus,
                self.parallel,
                self.forward,
            )?,
        };
        let s = Step::start(match self.isa {
            Isa::Intel => "bochs",
            Isa::Amd => "qemu-tcg",
        });
        s.note(what);
        boot(&mut cmd, self.build, s, scale, serial_log)
    }
}

/// Runs the emulator of a lab build directory (`serial.out`, `emulator.log` in
/// `build`), copying the console to `serial_copy`, and closes `step` with the result.
/// Returns the run and its result (`pass`, `fail WHY`, or `none`).
fn boot(
    cmd: &mut Command,
    build: &Path,
    step: Step,
    scale: f64,
    serial_copy: &Path,
) -> anyhow::Result<(Run, String, std::time::Duration)> {
    let run = run(
        cmd,
        &build.join("serial.out"),
        &build.join("emulator.log"),
        &step,
        scale,
        serial_copy,
    )
    .with_context(|| format!("{} died; console in {}", step.name(), serial_copy.display()))?;
    let result = run.result.clone().unwrap_or_else(|| "none".into());
    let took = step.done(format!("result {result} ({:.1} s)", run.wall));
    Ok((run, result, took))
}

/// Starts `cmd` (stdout/stderr into `log`), follows `serial`, and returns the console.
/// On a panic or an overrun step the emulator is killed and the error names the step;
/// the console so far is still written to `serial_copy`.
fn run(
    cmd: &mut Command,
    serial: &Path,
    log: &Path,
    step: &Step,
    scale: f64,
    serial_copy: &Path,
) -> anyhow::Result<Run> {
    let _ = std::fs::remove_file(serial);
    std::fs::write(serial, b"").with_context(|| format!("cannot create {}", serial.display()))?;
    let out =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out
        .try_clone()
        .with_context(|| format!("cannot reopen {}", log.display()))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);

    let mut watch = Watch {
        started: Instant::now(),
        lines: Vec::new(),
        partial: Vec::new(),
        result: None,
        steps: Vec::new(),
        current: ("l1-boot".into(), 0.0, BOOT_BUDGET.mul_f64(scale)),
        scale,
    };
    let outcome = watch.follow(cmd, serial, step);
    write(serial_copy, console::transcript(&watch.lines))?;
    outcome?;
    Ok(Run {
        wall: watch.started.elapsed().as_secs_f64(),
        lines: watch.lines,
        result: watch.result,
        steps: watch.steps,
    })
}

struct Watch {
    started: Instant,
    lines: Vec<Line>,
    partial: Vec<u8>,
    result: Option<String>,
    steps: Vec<(String, f64)>,
    /// (name, started at, budget)
    current: (String, f64, Duration),
    scale: f64,
}

impl Watch {
    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn follow(&mut self, cmd: &mut Command, serial: &Path, step: &Step) -> anyhow::Result<()> {
        let mut child = ChildGuard::spawn(cmd)?;
        let mut file = std::fs::File::open(serial)
            .with_context(|| format!("cannot open {}", serial.display()))?;
        let mut offset = 0u64;
        let mut result_at: Option<Instant> = None;
        loop {
            let exited = child.try_wait()?;
            // Read after try_wait so nothing written before the exit is missed.
            offset = self.read_new(&mut file, offset, serial)?;
            for line in self.take_lines() {
                self.on_line(&line, step)?;
                if line.starts_with("KVMLAB result ") {
                    result_at = Some(Instant::now());
                }
            }
            if let Some(status) = exited {
                self.end_step();
                // Power-off makes Bochs exit 1: the console says whether the run passed.
                step.note(format!("{} exited: {status}", child.what()));
                return Ok(());
            }
            if result_at.is_some_and(|t| t.elapsed() > POWEROFF_GRACE) {
                self.end_step();
                step.note("the emulator did not exit after the result; killed it");
                return Ok(());
            }
            let (name, since, budget) = &self.current;
            if self.now() - since > budget.as_secs_f64() {
                let what = format!("step {name} did not finish within {} s", budget.as_secs());
                child.kill();
                bail!(what);
            }
            step.message(format!("{name} ({:.0} s)", self.now() - since));
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn read_new(
        &mut self,
        file: &mut std::fs::File,
        offset: u64,
        serial: &Path,
    ) -> anyhow::Result<u64> {
        file.seek(SeekFrom::Start(offset))
            .with_context(|| format!("cannot read {}", serial.display()))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)
            .with_context(|| format!("cannot read {}", serial.display()))?;
        self.partial.extend_from_slice(&buf);
        Ok(offset + buf.len() as u64)
    }

    fn take_lines(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(nl) = self.partial.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.partial.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&raw)
                .trim_end_matches(['\n', '\r'])
                .replace('\r', "");
            out.push(text);
        }
        out
    }

    fn end_step(&mut self) {
        let (name, since, _) = &self.current;
        let took = self.now() - since;
        self.steps.push((name.clone(), took));
    }

    fn on_line(&mut self, text: &str, step: &Step) -> anyhow::Result<()> {
        let at = self.now();
        self.lines.push(Line {
            at,
            text: text.to_owned(),
        });
        // L2's console is prefixed: its panics are the workload's failure, not L1's.
        if !text.starts_with("L2| ") && PANIC_MARKERS.iter().any(|m| text.contains(m)) {
            bail!(
                "the L1 kernel panicked during step {}: {text}",
                self.current.0
            );
        }
        if let Some(rest) = text.strip_prefix("KVMLAB step ") {
            let mut it = rest.split_whitespace();
            let name = it.next().unwrap_or("?").to_owned();
            let budget: u64 = it.next().and_then(|b| b.parse().ok()).unwrap_or(300);
            self.end_step();
            let (prev, _) = self.steps.last().cloned().unwrap_or_default();
            let took = self.steps.last().map_or(0.0, |s| s.1);
            step.note(format!("{prev}: {took:.1} s"));
            self.current = (name, at, Duration::from_secs(budget).mul_f64(self.scale));
        } else if let Some(result) = text.strip_prefix("KVMLAB result ") {
            self.result = Some(result.to_owned());
        }
        Ok(())
    }
}
