//! A check of the built eBPF object: the globals the loader sets (`.rodata` settings
//! such as `DETAIL`) must only ever be loaded from. LLVM may merge a promoted constant
//! (`&0u32` passed as a map key) into a global with the same initial value; once the
//! loader sets that global, the key silently changes. That happened: the all-VMs total
//! was counted under key `DETAIL` (1 with `--detail`) and read under key 0.

use std::collections::BTreeMap;

use object::{
    Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget, SectionKind, SymbolKind,
};

/// `BPF_LD | BPF_IMM | BPF_DW`: the 16-byte instruction that takes a global's address.
const LD_IMM64: u8 = 0x18;
/// The class bits of an opcode, and `BPF_LDX`, the load class.
const CLASS_MASK: u8 = 0x07;
const LDX: u8 = 0x01;
/// The mode bits of an opcode, and `BPF_MEM`, a plain memory access.
const MODE_MASK: u8 = 0xe0;
const MEM: u8 = 0x60;

/// One place a program takes the address of a loader-set global.
#[derive(Debug)]
struct Site {
    global: String,
    program: String,
    /// The offset in the ELF file of the instruction after the address is taken.
    next_at: usize,
    /// That instruction loads from the address, at offset 0, and nothing else does.
    loaded: bool,
}

/// Every place the object takes the address of a `.rodata` global.
fn global_sites(elf: &[u8]) -> Result<Vec<Site>, String> {
    let file = object::File::parse(elf).map_err(|e| format!("parse: {e}"))?;
    let rodata = file.section_by_name(".rodata").ok_or("no .rodata")?.index();
    let globals: BTreeMap<_, _> = file
        .symbols()
        .filter(|s| s.section_index() == Some(rodata) && s.is_global())
        .filter(|s| s.kind() == SymbolKind::Data)
        .filter_map(|s| Some((s.index().0, s.name().ok()?.to_owned())))
        .collect();
    let mut sites = Vec::new();
    for section in file.sections().filter(|s| s.kind() == SectionKind::Text) {
        let program = section.name().unwrap_or("?").to_owned();
        let code = section.data().map_err(|e| format!("{program}: {e}"))?;
        let start = section.file_range().map_or(0, |(start, _)| start);
        for (at, reloc) in section.relocations() {
            let RelocationTarget::Symbol(symbol) = reloc.target() else {
                continue;
            };
            let Some(global) = globals.get(&symbol.0) else {
                continue;
            };
            let at = usize::try_from(at).map_err(|e| e.to_string())?;
            let (Some(ld), Some(next)) = (code.get(at..at + 8), code.get(at + 16..at + 24)) else {
                return Err(format!("{program}: a relocation of {global} past its end"));
            };
            let dst = ld[1] & 0x0f;
            let loaded = ld[0] == LD_IMM64
                && next[0] & CLASS_MASK == LDX
                && next[0] & MODE_MASK == MEM
                && next[1] >> 4 == dst
                && next[2..4] == [0, 0];
            sites.push(Site {
                global: global.clone(),
                program: program.clone(),
                next_at: usize::try_from(start).map_err(|e| e.to_string())? + at + 16,
                loaded,
            });
        }
    }
    Ok(sites)
}

/// `BPF_STX | BPF_ATOMIC` on 32 and 64 bits; an atomic's operation is its `imm`.
const ATOMIC_W: u8 = 0xc3;
const ATOMIC_DW: u8 = 0xdb;
/// `BPF_ADD` without `BPF_FETCH`: the only atomic kernels before 5.12 take (XADD).
const XADD: i32 = 0;

/// Every atomic instruction that is not a plain add, as "program: imm", in the
/// programs of `elf`. Kernels before 5.12 reject the program (EINVAL) otherwise.
fn atomics_newer_than_xadd(elf: &[u8]) -> Result<Vec<String>, String> {
    let file = object::File::parse(elf).map_err(|e| format!("parse: {e}"))?;
    let mut out = Vec::new();
    for section in file.sections().filter(|s| s.kind() == SectionKind::Text) {
        let name = section.name().unwrap_or("?").to_owned();
        let code = section.data().map_err(|e| format!("{name}: {e}"))?;
        for insn in code.chunks_exact(8) {
            let imm = i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
            if [ATOMIC_W, ATOMIC_DW].contains(&insn[0]) && imm != XADD {
                out.push(format!("{name}: atomic op {imm:#x}"));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 5.10 rejected every timing program when an untimed exit's atomic add of 0
    /// time became an atomic OR (LLVM's idempotent form of `add 0`).
    #[test]
    fn every_atomic_is_a_plain_add() {
        let newer = atomics_newer_than_xadd(object()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(newer, Vec::<String>::new());
        // An atomic OR (imm 0x40) is found.
        let mut elf = object().to_vec();
        let at = elf
            .windows(8)
            .position(|w| w[0] == ATOMIC_DW && w[4..] == [0, 0, 0, 0])
            .unwrap_or_else(|| panic!("no atomic add in the object"));
        elf[at + 4] = 0x40;
        let newer = atomics_newer_than_xadd(&elf).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(newer.len(), 1, "{newer:?}");
    }

    fn object() -> &'static [u8] {
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"))
    }

    fn misuses(sites: &[Site]) -> Vec<String> {
        sites
            .iter()
            .filter(|s| !s.loaded)
            .map(|s| format!("{} uses the address of {}", s.program, s.global))
            .collect()
    }

    #[test]
    fn globals_are_only_loaded() {
        let sites = global_sites(object()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(misuses(&sites), Vec::<String>::new());
        // Every setting is read somewhere: fewer than that means the check did not
        // see the programs.
        let read: std::collections::BTreeSet<_> = sites.iter().map(|s| &s.global).collect();
        assert!(
            read.len() >= 28,
            "only {} globals read: {read:?}",
            read.len()
        );
    }

    #[test]
    fn an_address_used_as_a_key_is_found() {
        let sites = global_sites(object()).unwrap_or_else(|e| panic!("{e}"));
        let first = sites.first().unwrap_or_else(|| panic!("no sites"));
        // The load after the first site becomes `call 1` (map_lookup_elem), as when
        // the global's address is passed as a key.
        let mut elf = object().to_vec();
        elf[first.next_at..first.next_at + 8].copy_from_slice(&[0x85, 0, 0, 0, 1, 0, 0, 0]);
        let sites = global_sites(&elf).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            misuses(&sites),
            vec![format!(
                "{} uses the address of {}",
                first.program, first.global
            )]
        );
    }
}
