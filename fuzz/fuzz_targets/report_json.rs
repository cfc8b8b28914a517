//! A record JSON (`show`, `diff`, `reconcile` read one): parsing never panics, and a
//! record that parses renders in every format, reconciles and diffs without panicking.
//! What the JSON renderer writes must parse back to the same record.

#![no_main]

use kvmtrace_model::{
    diff::diff,
    reconcile::reconcile,
    render::{self, Format, Options, diff::DiffFormat},
    report::Report,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // `load_report` rejects non-UTF-8 files before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(report) = Report::from_json(text) else {
        return;
    };
    for (per_vcpu, detail) in [(false, false), (true, false), (false, true)] {
        let opts = Options { per_vcpu, detail };
        let _ = render::render(&report, Format::Table, opts);
        let _ = render::render(&report, Format::Csv, opts);
    }
    let json = render::render(&report, Format::Json, Options::default())
        .expect("a parsed record serializes");
    let json = std::str::from_utf8(&json).expect("JSON output is UTF-8");
    let again = Report::from_json(json).expect("the JSON renderer's output parses");
    assert_eq!(again, report, "JSON round trip changed the record");

    let _ = reconcile(&report);
    let d = diff(&report, "a".to_owned(), &report, "b".to_owned());
    for format in [DiffFormat::Table, DiffFormat::Md, DiffFormat::Json] {
        let _ = render::diff::render(&d, format, true);
    }
});
