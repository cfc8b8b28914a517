//! `reconcile --guest GUEST.json`: parsing a guest readout never panics, and one that
//! parses serializes back to the same readout.

#![no_main]

use kvmtrace_model::guest::GuestReadout;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(readout) = GuestReadout::from_json(text) else {
        return;
    };
    let json = serde_json::to_string(&readout).expect("a parsed readout serializes");
    let again = GuestReadout::from_json(&json).expect("a serialized readout parses");
    assert_eq!(again, readout, "JSON round trip changed the readout");
});
