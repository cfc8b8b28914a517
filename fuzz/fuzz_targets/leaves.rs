//! Leaf presets and leaf numbers as a user writes them (`--preset`, `--count-leaf`, ...):
//! no panics; an error quotes the input; a parsed leaf prints back to the same number.

#![no_main]

use kvmtrace_model::leaves::{self, PRESETS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match leaves::preset(text) {
        Ok(leaves) => assert!(PRESETS.iter().any(|&(n, l)| n == text && l == leaves)),
        Err(e) => assert!(e.contains(text), "the error does not quote the input: {e}"),
    }
    match leaves::parse_leaf(text) {
        Ok(leaf) => {
            assert_eq!(leaves::parse_leaf(&format!("{leaf:#x}")), Ok(leaf));
            assert_eq!(leaves::parse_leaf(&leaf.to_string()), Ok(leaf));
        }
        Err(e) => assert!(e.contains(text), "the error does not quote the input: {e}"),
    }
});
