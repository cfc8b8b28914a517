//! kvmtrace's exit statuses: documented in every `--help`, and `reconcile`'s own ones.
//! Runs as any user. The others are tested where their cause is: 1 (an error) and 4
//! (the command after `--` failed) in record.rs, 2 (bad input) in bad_input.rs, 3 (not
//! patched) in record.rs (`guest` on this unpatched KVM).

mod common;

use std::path::{Path, PathBuf};

use common::{kvmtrace, run, stderr, stdout};

const SUCCESS: i32 = 0;
const UNEXPLAINED: i32 = 5;
const NO_COUNTER_READS: i32 = 6;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/record-v1.json");

fn fixture_json() -> serde_json::Value {
    let text = std::fs::read_to_string(FIXTURE).unwrap_or_else(|e| panic!("read {FIXTURE}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {FIXTURE}: {e}"))
}

fn write_json(dir: &Path, name: &str, value: &serde_json::Value) -> PathBuf {
    let path = dir.join(name);
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

#[test]
fn every_help_documents_its_exit_statuses() {
    let all = [
        "  0  success",
        "  1  error: kvmtrace could not do its job",
        "  2  bad input or usage",
        "  3  guest: this KVM is not patched",
        "  4  record -- CMD: the report is written, but CMD failed",
        "  5  reconcile: a difference with no known cause",
        "  6  reconcile: the record has no guest counter reads",
    ];
    let own: [(&str, &[usize]); 8] = [
        ("", &[3, 4, 5, 6]),
        ("record", &[4]),
        ("show", &[]),
        ("reasons", &[]),
        ("diff", &[]),
        ("guest", &[3, 5]),
        ("reconcile", &[5, 6]),
        ("top", &[]),
    ];
    for (cmd, statuses) in own {
        let out = run(kvmtrace().args([cmd, "--help"].iter().filter(|a| !a.is_empty())));
        assert_eq!(out.status.code(), Some(0), "kvmtrace {cmd} --help");
        let help = stdout(&out);
        let section = help
            .split_once("\nExit status:\n")
            .map(|(_, s)| s)
            .unwrap_or_else(|| panic!("kvmtrace {cmd} --help has no exit statuses:\n{help}"));
        for (i, line) in all.iter().enumerate() {
            let documented = section.lines().any(|l| l.starts_with(line));
            let expected = i < 3 || statuses.contains(&i);
            assert_eq!(
                documented, expected,
                "kvmtrace {cmd} --help, {line:?}:\n{section}"
            );
        }
    }
}

#[test]
fn reconcile_exits_5_on_an_unexplained_difference() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut record = fixture_json();
    // The guest read 98 IO_INSTRUCTION exits where the host counted 100: short by 2,
    // which no known cause explains (not this query's own exit, not a fastpath reason,
    // and a VM of one vCPU cannot lose updates to another).
    let reads = record["cpuid_reads"]
        .as_array_mut()
        .unwrap_or_else(|| panic!("no cpuid_reads"));
    let read = reads
        .iter_mut()
        .find(|r| r["kind"] == "count" && r["pid"] == 4300 && r["index"] == 30)
        .unwrap_or_else(|| panic!("no read of reason 30"));
    assert_eq!(read["eax"], 100);
    read["eax"] = 98.into();
    let path = write_json(dir.path(), "unexplained.json", &record);
    let out = run(kvmtrace().arg("reconcile").arg(&path));
    assert_eq!(out.status.code(), Some(UNEXPLAINED), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("17 guest counter reads: 15 exact, 1 undefined reason, answered as such, 1 unexplained; 1 unexplained\n"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.contains("IO_INSTRUCTION")
            && l.contains("100")
            && l.contains("98")
            && l.contains("-2")
            && l.contains("unexplained")),
        "{text}"
    );
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));

    // The JSON says the same, with the same status.
    let out = run(kvmtrace().args(["reconcile", "-f", "json"]).arg(&path));
    assert_eq!(out.status.code(), Some(UNEXPLAINED), "{}", stderr(&out));
    let v: serde_json::Value =
        serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (v["reads"].as_u64(), v["unexplained"].as_u64()),
        (Some(17), Some(1))
    );

    // And the untouched fixture reconciles exactly.
    let out = run(kvmtrace().args(["reconcile", FIXTURE]));
    assert_eq!(out.status.code(), Some(SUCCESS), "{}", stderr(&out));
}

#[test]
fn reconcile_exits_6_without_counter_reads() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut record = fixture_json();
    record["cpuid_reads"] = serde_json::json!([]);
    let path = write_json(dir.path(), "no-reads.json", &record);
    let out = run(kvmtrace().arg("reconcile").arg(&path));
    assert_eq!(
        out.status.code(),
        Some(NO_COUNTER_READS),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).is_empty(), "{}", stdout(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "kvmtrace: {} has no guest counter reads: 1740 CPUID exits were traced, none asking the count leaf 0x4ffffffe, total leaf 0x4fffffff, cycles leaf 0x4ffffffd: check that the guest reads these leaves while the record runs (e.g. `kvmtrace guest` with the same leaf options) and that -p / -- names its VMM\n",
            path.display()
        )
    );
    // A record without --snapshots at all (no `leaves`, no `cpuid_reads`): the same.
    let obj = record
        .as_object_mut()
        .unwrap_or_else(|| panic!("not an object"));
    obj.remove("cpuid_reads");
    obj.remove("leaves");
    let path = write_json(dir.path(), "no-snapshots.json", &record);
    let out = run(kvmtrace().arg("reconcile").arg(&path));
    assert_eq!(
        out.status.code(),
        Some(NO_COUNTER_READS),
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
}
