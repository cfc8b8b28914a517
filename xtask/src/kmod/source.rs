//! The kernel source tree a build compiles: the few directories and headers it needs,
//! extracted from the Debian tarball, copied, patched and pointed at itself.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, ensure};

use super::options::{KernelLine, Variant};
use crate::{exec::exec, files::write};

/// Bump when the build recipe changes, so earlier outputs are rebuilt.
pub const RECIPE: &str = "kmod-recipe-1";

/// Source directories the modules are built from; everything else comes from the headers.
const SOURCE_DIRS: [&str; 2] = ["arch/x86/kvm", "virt/kvm"];
/// The kvm Makefile's line that puts `arch/x86/kvm` on the include path: 6.1 and later,
/// then 5.10.
const KVM_INCLUDE_LINES: [&str; 2] = [
    "ccflags-y += -I $(srctree)/arch/x86/kvm",
    "ccflags-y += -Iarch/x86/kvm",
];
/// How the kvm Makefile adds `virt/kvm`: an include of `Makefile.kvm` by absolute path
/// (6.1 and later), or objects named relative to the Makefile (5.10), which the copy
/// keeps working as they are.
const VIRT_KVM_INCLUDE: &str = "include $(srctree)/virt/kvm/Makefile.kvm";
const VIRT_KVM_RELATIVE: &str = "KVM := ../../../virt/kvm";
/// checkpatch.pl and the data files it reads from its own directory.
const CHECKPATCH_FILES: [&str; 3] = [
    "scripts/checkpatch.pl",
    "scripts/spelling.txt",
    "scripts/const_structs.checkpatch",
];

/// The patch files to apply for `variant`: the series, then the variant's own.
pub fn series(root: &Path, kernel: KernelLine, variant: Variant) -> anyhow::Result<Vec<PathBuf>> {
    if variant == Variant::Unpatched {
        return Ok(Vec::new());
    }
    let mut patches = patch_files(&root.join("kernel").join(kernel.as_str()))?;
    if variant != Variant::Good {
        let dir = variant_dir(root, kernel, variant);
        ensure!(
            dir.is_dir(),
            "the {variant} variant has no patches for {kernel} ({} is missing): pick a kernel line that has it",
            dir.display()
        );
        patches.extend(patch_files(&dir)?);
    }
    Ok(patches)
}

pub fn variant_dir(root: &Path, kernel: KernelLine, variant: Variant) -> PathBuf {
    root.join("kernel/variants")
        .join(kernel.as_str())
        .join(variant.as_str())
}

/// `*.patch` in `dir`, sorted by name (the `git format-patch` numbering).
pub fn patch_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        if path.extension().is_some_and(|e| e == "patch") {
            files.push(path);
        }
    }
    files.sort();
    ensure!(
        !files.is_empty(),
        "{} holds no *.patch files",
        dir.display()
    );
    Ok(files)
}

/// Files a patch modifies, from its `+++ b/...` lines.
fn touched_files(patch: &str) -> Vec<String> {
    patch
        .lines()
        .filter_map(|l| l.strip_prefix("+++ b/"))
        .map(|p| p.trim_end().to_owned())
        .collect()
}

/// The headers outside [`SOURCE_DIRS`] that the patches modify: they are extracted
/// too and take precedence over the installed headers. Anything else outside those
/// directories would not be rebuilt, so it is an error.
fn patched_headers(patches: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let mut headers = Vec::new();
    for patch in patches {
        let text = fs::read_to_string(patch)
            .with_context(|| format!("cannot read {}", patch.display()))?;
        for file in touched_files(&text) {
            if SOURCE_DIRS
                .iter()
                .any(|d| file.starts_with(&format!("{d}/")))
            {
                continue;
            }
            ensure!(
                file.ends_with(".h") && include_root(&file).is_some(),
                "{} changes {file}, which the out-of-tree build cannot rebuild \
                 (only {} and headers under include/ or arch/x86/include/)",
                patch.display(),
                SOURCE_DIRS.join(", ")
            );
            if !headers.contains(&file) {
                headers.push(file);
            }
        }
    }
    headers.sort();
    Ok(headers)
}

/// The include directory a header path is found under (`<asm/x.h>`, `<linux/x.h>`).
fn include_root(header: &str) -> Option<&'static str> {
    ["arch/x86/include", "include"]
        .into_iter()
        .find(|root| header.starts_with(&format!("{root}/")))
}

/// Extracts what the build and checkpatch need from the source tarball into `src`,
/// unless `src` already holds exactly that from the same source version.
pub fn extract(
    kernel: KernelLine,
    tarball: &Path,
    source_version: &str,
    patches: &[PathBuf],
    src: &Path,
) -> anyhow::Result<()> {
    let mut members: Vec<String> = SOURCE_DIRS.iter().map(|d| (*d).to_owned()).collect();
    members.extend(CHECKPATCH_FILES.iter().map(|f| (*f).to_owned()));
    members.extend(patched_headers(patches)?);
    let stamp_path = src.join(".kmod-extracted");
    let stamp = format!("{RECIPE}\n{source_version}\n{}\n", members.join("\n"));
    if fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        return Ok(());
    }

    let staging = src.with_extension("tmp");
    for dir in [src, staging.as_path()] {
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        }
    }
    fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    let prefix = kernel.source_package();
    exec(
        Command::new("tar")
            .arg("-C")
            .arg(&staging)
            .args(["--strip-components=1", "-xJf"])
            .arg(tarball)
            .args(members.iter().map(|m| format!("{prefix}/{m}"))),
    )?;
    fs::write(staging.join(".kmod-extracted"), stamp)
        .with_context(|| format!("cannot write the stamp in {}", staging.display()))?;
    fs::rename(&staging, src)
        .with_context(|| format!("cannot rename {} to {}", staging.display(), src.display()))
}

/// Copies `src` to `tree`, applies `patches` and adapts the kvm Makefile to an
/// external-module build.
pub fn prepare_tree(src: &Path, tree: &Path, patches: &[PathBuf]) -> anyhow::Result<()> {
    let tree_str = tree.to_str().context("the build path is not UTF-8")?;
    ensure!(
        !tree_str.contains(char::is_whitespace),
        "make cannot build in {tree_str}: the path contains whitespace"
    );
    if tree.exists() {
        fs::remove_dir_all(tree).with_context(|| format!("cannot remove {}", tree.display()))?;
    }
    exec(Command::new("cp").arg("-a").arg(src).arg(tree))?;
    for patch in patches {
        exec(
            Command::new("patch")
                .arg("-d")
                .arg(tree)
                .args(["-p1", "--forward", "--batch", "--fuzz=0", "--quiet", "-i"])
                .arg(patch),
        )?;
    }

    // The headers the series changes shadow the installed ones; NOSTDINC_FLAGS comes
    // before LINUXINCLUDE on the compiler command line (backports use the same hook).
    let mut overlays: Vec<&str> = patched_headers(patches)?
        .iter()
        .filter_map(|h| include_root(h))
        .collect();
    overlays.dedup();
    let makefile = tree.join("arch/x86/kvm/Makefile");
    let text = fs::read_to_string(&makefile)
        .with_context(|| format!("cannot read {}", makefile.display()))?;
    let text = rewrite_makefile(&text, tree_str, &overlays)
        .with_context(|| format!("{} is not laid out as expected", makefile.display()))?;
    write(&makefile, text)
}

/// The kvm Makefile `text` for a build in `tree`: its include line pointed at the
/// tree, with the patched header directories `overlays` first, and `virt/kvm` taken
/// from the tree too.
fn rewrite_makefile(text: &str, tree: &str, overlays: &[&str]) -> anyhow::Result<String> {
    let mut rules = format!(
        // trace.h includes itself as "../../arch/x86/kvm/trace.h": -I arch/x86 resolves it.
        "ccflags-y += -I {tree}/arch/x86/kvm -I {tree}/arch/x86\n"
    );
    for dir in overlays {
        rules.push_str(&format!("NOSTDINC_FLAGS += -I {tree}/{dir}\n"));
    }
    let include = KVM_INCLUDE_LINES
        .into_iter()
        .find(|l| has_line(text, l))
        .with_context(|| format!("no line '{}'", KVM_INCLUDE_LINES.join("' or '")))?;
    let text = replace_line(text, include, rules.trim_end())?;
    if has_line(&text, VIRT_KVM_RELATIVE) {
        return Ok(text);
    }
    replace_line(
        &text,
        VIRT_KVM_INCLUDE,
        &format!("include {tree}/virt/kvm/Makefile.kvm"),
    )
}

fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l.trim_end() == line)
}

/// `text` with its one line equal to `old` replaced by `new`.
fn replace_line(text: &str, old: &str, new: &str) -> anyhow::Result<String> {
    let hits = text.lines().filter(|l| l.trim_end() == old).count();
    ensure!(hits == 1, "expected one line '{old}', found {hits}");
    Ok(text
        .lines()
        .map(|l| if l.trim_end() == old { new } else { l })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_outside_the_kvm_dirs() {
        let patch = "--- a/arch/x86/kvm/x86.c\n+++ b/arch/x86/kvm/x86.c\n\
                     --- a/arch/x86/include/asm/kvm_host.h\n+++ b/arch/x86/include/asm/kvm_host.h\n";
        assert_eq!(
            touched_files(patch),
            ["arch/x86/kvm/x86.c", "arch/x86/include/asm/kvm_host.h"]
        );
        assert_eq!(
            include_root("arch/x86/include/asm/kvm_host.h"),
            Some("arch/x86/include")
        );
        assert_eq!(include_root("include/linux/kvm_host.h"), Some("include"));
        assert_eq!(include_root("kernel/entry/kvm.c"), None);
    }

    #[test]
    fn makefile_rewrite() {
        let text =
            "ccflags-y += -I $(srctree)/arch/x86/kvm\ninclude $(srctree)/virt/kvm/Makefile.kvm\n";
        let out = replace_line(text, "ccflags-y += -I $(srctree)/arch/x86/kvm", "A\nB");
        assert_eq!(
            out.ok().as_deref(),
            Some("A\nB\ninclude $(srctree)/virt/kvm/Makefile.kvm\n")
        );
        assert!(replace_line(text, "missing", "x").is_err());
    }

    #[test]
    fn makefile_of_each_layout() {
        let v6 = "ccflags-y += -I $(srctree)/arch/x86/kvm\n\
                  include $(srctree)/virt/kvm/Makefile.kvm\n";
        assert_eq!(
            rewrite_makefile(v6, "/t", &["arch/x86/include"])
                .ok()
                .as_deref(),
            Some(
                "ccflags-y += -I /t/arch/x86/kvm -I /t/arch/x86\n\
                 NOSTDINC_FLAGS += -I /t/arch/x86/include\n\
                 include /t/virt/kvm/Makefile.kvm\n"
            )
        );
        let v5 = "ccflags-y += -Iarch/x86/kvm\nKVM := ../../../virt/kvm\n";
        assert_eq!(
            rewrite_makefile(v5, "/t", &[]).ok().as_deref(),
            Some("ccflags-y += -I /t/arch/x86/kvm -I /t/arch/x86\nKVM := ../../../virt/kvm\n")
        );
        assert!(rewrite_makefile("ccflags-y += -Iarch/x86/kvm\n", "/t", &[]).is_err());
        assert!(rewrite_makefile("KVM := ../../../virt/kvm\n", "/t", &[]).is_err());
    }

    #[test]
    fn every_variant_has_patches_for_every_line() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        for kernel in [KernelLine::V5_10, KernelLine::V6_1, KernelLine::V6_12] {
            for variant in std::iter::once(Variant::Good).chain(Variant::TEST_ONLY) {
                let patches = series(&root, kernel, variant);
                assert!(patches.is_ok(), "{kernel} {variant}: {patches:?}");
                let headers = patches.and_then(|p| patched_headers(&p));
                assert!(headers.is_ok(), "{kernel} {variant}: {headers:?}");
            }
        }
    }
}
