//! A tracepoint `format` file (read from tracefs when `record` and `top` attach) and a
//! `category:name` tracepoint name: no panics, and every field found has a name.

#![no_main]

use kvmtrace_model::tracefs_format::{Tracepoint, parse_format};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // `Tracefs::fields` reads the file with `read_to_string`.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for field in parse_format(text) {
        assert!(
            text.contains(field.name.as_str()),
            "field {field:?} is not in the text"
        );
    }
    if let Ok(tp) = Tracepoint::parse(text) {
        assert_eq!(Tracepoint::parse(&tp.to_string()), Ok(tp));
    }
});
