//! The serial console protocol: the markers L1's init (lab/l1-init.sh) and the L2
//! workload print, and how the lab reads results back from `serial.log`.

/// One line of the console, with the host wall time since the emulator started.
pub struct Line {
    pub at: f64,
    pub text: String,
}

/// Marks the end of the workload on its console; the L1 init looks for it.
pub const END_MARKER: &str = "KVMLAB-L2 end";

/// The CPUs L1 has online, from its init's `KVMLAB l1 up ... cpus=N` line.
pub fn l1_cpus_up(lines: &[Line]) -> Option<u64> {
    lines
        .iter()
        .find_map(|l| l.text.strip_prefix("KVMLAB l1 up "))?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("cpus="))?
        .parse()
        .ok()
}

/// Host seconds between `run MODE start` and `run MODE end` on the console.
pub fn run_seconds(lines: &[Line], tag: &str) -> f64 {
    let start = lines
        .iter()
        .find(|l| l.text.starts_with(&format!("KVMLAB run {tag} start")));
    let end = lines
        .iter()
        .find(|l| l.text.starts_with(&format!("KVMLAB run {tag} end")));
    match (start, end) {
        (Some(s), Some(e)) => e.at - s.at,
        _ => f64::NAN,
    }
}

/// What L2 printed between `MARKER begin` and `MARKER end`.
pub fn l2_section(lines: &[Line], marker: &str) -> Option<String> {
    let text: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.text.strip_prefix("L2| "))
        .skip_while(|t| !t.starts_with(&format!("{marker} begin")))
        .skip(1)
        .take_while(|t| !t.starts_with(&format!("{marker} end")))
        .collect();
    (!text.is_empty()).then(|| text.join("\n"))
}

/// The text between `KVMLAB begin KIND MODE` and `KVMLAB end KIND MODE`.
pub fn section(lines: &[Line], kind: &str, mode: &str) -> Option<String> {
    let begin = format!("KVMLAB begin {kind} {mode}");
    let end = format!("KVMLAB end {kind} {mode}");
    let start = lines.iter().position(|l| l.text == begin)?;
    let len = lines[start + 1..].iter().position(|l| l.text == end)?;
    let mut text = String::new();
    for l in &lines[start + 1..start + 1 + len] {
        text.push_str(&l.text);
        text.push('\n');
    }
    Some(text)
}

/// The console lines of one mode: from its `load` step to the next mode's.
pub fn mode_lines<'a>(lines: &'a [Line], mode: &str) -> &'a [Line] {
    let first = format!("KVMLAB step {mode}:load ");
    let Some(start) = lines.iter().position(|l| l.text.starts_with(&first)) else {
        return &[];
    };
    let len = lines[start + 1..]
        .iter()
        .position(|l| l.text.starts_with("KVMLAB step ") && !l.text.contains(&format!(" {mode}:")))
        .map_or(lines.len() - start, |n| n + 1);
    &lines[start..start + len]
}

/// One mode's console as `serial.log` holds it: each line with its host time.
pub fn transcript(lines: &[Line]) -> String {
    lines
        .iter()
        .map(|l| format!("[{:8.2}] {}\n", l.at, l.text))
        .collect()
}

/// Whether L2 printed its end marker.
pub fn reached_end(lines: &[Line]) -> bool {
    lines
        .iter()
        .any(|l| l.text.starts_with(&format!("L2| {END_MARKER}")))
}

/// The one warning the lab allows: 6.12 under Bochs warns once at boot that the
/// emulated CPU's legacy topology leaves look wrong (shared/LAB-NOTES.md).
pub const BOCHS_TOPOLOGY_WARNING: &str = "topology_common.c:57 parse_legacy";

/// The complaints in a `dmesg-bad` section: its first line counts dmesg's lines;
/// anything after it is a complaint. With `allow` (see [`BOCHS_TOPOLOGY_WARNING`]),
/// exactly one `WARNING:` line that names it is allowed, with the `Call Trace:` line
/// of that splat right after it; a second one, or any other line, is a complaint.
pub fn dmesg_complaints<'a>(bad: &'a str, allow: Option<&str>) -> Vec<&'a str> {
    let mut lines: Vec<&str> = bad
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .collect();
    let allowed = allow.and_then(|what| {
        lines
            .iter()
            .position(|l| l.contains("WARNING:") && l.contains(what))
    });
    if let Some(at) = allowed {
        let trace = lines.get(at + 1).is_some_and(|l| l.contains("Call Trace:"));
        lines.drain(at..at + 1 + usize::from(trace));
    }
    lines
}

/// What the micro guests received from the counter leaves: `(cpuid, io)` from each
/// `micro: leaves cpuid=C io=I total=T` line on L2's console.
pub fn micro_leaves_received(lines: &[Line]) -> Vec<(u64, u64)> {
    lines
        .iter()
        .filter_map(|l| l.text.strip_prefix("L2| micro: leaves "))
        .filter_map(|t| {
            let field = |name: &str| {
                t.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .and_then(|v| v.parse::<u64>().ok())
            };
            Some((field("cpuid=")?, field("io=")?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_known_warning_is_allowed_and_no_more() {
        let warn = "[    0.1] WARNING: CPU: 0 PID: 0 at arch/x86/kernel/cpu/topology_common.c:57 parse_legacy+0x1b/0x90";
        let trace = "[    0.1] Call Trace:";
        let bad = format!("dmesg lines=900\n{warn}\n{trace}\n");
        assert_eq!(dmesg_complaints(&bad, None), [warn, trace]);
        assert!(dmesg_complaints(&bad, Some(BOCHS_TOPOLOGY_WARNING)).is_empty());
        let twice = format!("dmesg lines=900\n{warn}\n{trace}\n{warn}\n{trace}\n");
        assert_eq!(
            dmesg_complaints(&twice, Some(BOCHS_TOPOLOGY_WARNING)),
            [warn, trace]
        );
        let other = "[    9.2] WARNING: CPU: 0 PID: 77 at arch/x86/kvm/x86.c:1 kvm_foo";
        let mixed = format!("dmesg lines=900\n{warn}\n{trace}\n{other}\n{trace}\n");
        assert_eq!(
            dmesg_complaints(&mixed, Some(BOCHS_TOPOLOGY_WARNING)),
            [other, trace]
        );
        assert_eq!(
            dmesg_complaints("dmesg lines=3\n", None),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn l1_says_how_many_cpus_it_has() {
        let line = |text: &str| Line {
            at: 0.0,
            text: text.to_owned(),
        };
        let lines = [
            line("KVMLAB step l1-modules 120"),
            line("KVMLAB l1 up uptime=1.5 kernel=6.1.0-41-cloud-amd64 cpus=2 cpu= AMD EPYC"),
        ];
        assert_eq!(l1_cpus_up(&lines), Some(2));
        assert_eq!(l1_cpus_up(&lines[..1]), None);
    }
}
