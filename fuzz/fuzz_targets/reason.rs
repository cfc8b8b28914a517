//! Exit reasons and isas as a user writes them (`exit_reasons::parse`, `Isa::from_str`):
//! no panics; an error is one line that quotes the input; a name parses to a reason of
//! that name.

#![no_main]

use kvmtrace_model::exit_reasons::{self, Isa};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for isa in [Isa::Vmx, Isa::Svm] {
        match exit_reasons::parse(isa, text) {
            Ok(reason) => {
                let name = exit_reasons::name(isa, reason);
                let back = exit_reasons::parse(isa, &name);
                if exit_reasons::known_name(isa, reason).is_some() {
                    let back = back.expect("a known reason's name parses");
                    assert_eq!(exit_reasons::name(isa, back), name);
                }
            }
            Err(e) => {
                assert!(e.contains(text), "the error does not quote the input: {e}");
                assert!(
                    text.contains('\n') || !e.contains('\n'),
                    "a multi-line error: {e}"
                );
            }
        }
    }
    if let Ok(isa) = text.parse::<Isa>() {
        assert_eq!(isa.to_string().parse::<Isa>(), Ok(isa));
    }
});
