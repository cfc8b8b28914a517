//! Guest kernel symbols for `--rip`: a guest's `/proc/kallsyms`, or its `System.map`
//! plus the KASLR offset the guest booted with. Pure: the caller reads the file.

use thiserror::Error;

/// The guest's text symbols, sorted by address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Symbols {
    sorted: Vec<(u64, String)>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SymbolsError {
    #[error("line {line}: expected `ADDRESS TYPE NAME` as in /proc/kallsyms or System.map")]
    Line { line: usize },
    #[error(
        "no text symbols with a non-zero address: read /proc/kallsyms as root in the guest (or pass System.map)"
    )]
    Empty,
}

/// Guest RIPs below this are user space (the lower canonical half).
pub const USER_SPACE_END: u64 = 1 << 47;

/// What [`Symbols::describe`] says of a lower-half RIP.
pub const USER_SPACE: &str = "user space";

/// Whether a RIP's description is [`USER_SPACE`]'s.
pub fn user_space_label(description: &str) -> bool {
    description == USER_SPACE
}

/// Whether `rip` is a user-space address.
pub fn user_space(rip: u64) -> bool {
    rip < USER_SPACE_END
}

/// Offsets past a symbol beyond this are not attributed to it (the last symbol of a
/// section would otherwise take every address after it).
const MAX_OFFSET: u64 = 1 << 20;

impl Symbols {
    /// Parses `kallsyms` / `System.map` text: `ADDRESS TYPE NAME [\[module\]]` lines.
    /// Text symbols (`t`, `T`, `w`, `W`) are kept, each moved by `offset` (the KASLR
    /// slide: 0 for `/proc/kallsyms`, which already holds run-time addresses).
    pub fn parse(text: &str, offset: u64) -> Result<Self, SymbolsError> {
        let mut sorted = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(SymbolsError::Line { line: i + 1 });
            };
            let addr =
                u64::from_str_radix(addr, 16).map_err(|_| SymbolsError::Line { line: i + 1 })?;
            if addr != 0 && matches!(kind, "t" | "T" | "w" | "W") {
                sorted.push((addr.wrapping_add(offset), name.to_owned()));
            }
        }
        if sorted.is_empty() {
            return Err(SymbolsError::Empty);
        }
        sorted.sort();
        Ok(Self { sorted })
    }

    /// `function+0xoff` of `rip`, or `None` where no symbol covers it.
    pub fn lookup(&self, rip: u64) -> Option<String> {
        let i = self
            .sorted
            .partition_point(|(a, _)| *a <= rip)
            .checked_sub(1)?;
        let (addr, name) = &self.sorted[i];
        let off = rip - addr;
        (off < MAX_OFFSET).then(|| format!("{name}+{off:#x}"))
    }

    /// What a report shows for `rip`.
    pub fn describe(&self, rip: u64) -> Option<String> {
        if user_space(rip) {
            Some(USER_SPACE.to_owned())
        } else {
            self.lookup(rip)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KALLSYMS: &str = "\
ffffffff81000000 T _stext
ffffffff81000000 T startup_64
ffffffff81071b20 T native_write_cr3
ffffffff81072000 t native_read_msr
ffffffff810a0000 D some_data
ffffffff81e4c8a0 T switch_mm_irqs_off
ffffffffc0002000 t vmx_foo\t[kvm_intel]
";

    #[test]
    fn looks_up_function_and_offset() {
        let s = Symbols::parse(KALLSYMS, 0).expect("parses");
        assert_eq!(
            s.lookup(0xffff_ffff_8107_1b2f).as_deref(),
            Some("native_write_cr3+0xf")
        );
        assert_eq!(
            s.lookup(0xffff_ffff_81e4_c8a0).as_deref(),
            Some("switch_mm_irqs_off+0x0")
        );
        assert_eq!(s.lookup(0xffff_ffff_8000_0000), None, "before every symbol");
        assert_eq!(
            s.lookup(0xffff_ffff_c000_2004).as_deref(),
            Some("vmx_foo+0x4"),
            "module symbols too"
        );
        assert_eq!(s.describe(0x7f00_1234_5678).as_deref(), Some("user space"));
    }

    #[test]
    fn system_map_takes_the_kaslr_offset() {
        let s = Symbols::parse(KALLSYMS, 0x1e0_0000).expect("parses");
        assert_eq!(
            s.lookup(0xffff_ffff_82e7_1b20).as_deref(),
            Some("native_write_cr3+0x0")
        );
    }

    #[test]
    fn bad_files_are_refused() {
        assert_eq!(
            Symbols::parse("ffffffff81000000 T\n", 0),
            Err(SymbolsError::Line { line: 1 })
        );
        assert_eq!(
            Symbols::parse("zz T x\n", 0),
            Err(SymbolsError::Line { line: 1 })
        );
        // kallsyms read without privileges shows zeros.
        assert_eq!(
            Symbols::parse("0000000000000000 T startup_64\n", 0),
            Err(SymbolsError::Empty)
        );
    }
}
