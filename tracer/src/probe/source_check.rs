//! A check of the eBPF sources: nothing is lost silently. Every failed record or
//! kernel read that gives up counts a drop (`count_drop`), and no result of
//! `add_stats` or `shared_add` (false: the map was full) is thrown away.

use std::path::PathBuf;

/// The eBPF crate's source files, as (name, text).
fn ebpf_sources() -> Vec<(String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tracer-ebpf/src");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            (
                format!("tracer-ebpf/src/{}", name.unwrap_or_default()),
                text,
            )
        })
        .collect();
    files.sort();
    files
}

/// The line of byte `at` in `text`, from 1.
fn line_of(text: &str, at: usize) -> usize {
    text[..at].matches('\n').count() + 1
}

/// The index just past the bracket that closes the one opening at `open`.
fn closing(text: &str, open: usize) -> Option<usize> {
    let mut depth = 0i32;
    for (i, c) in text[open..].char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(open + i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// From `from`, the first `;` or `else {` outside brackets: (its index, whether it is
/// the `else`).
fn statement_end(text: &str, from: usize) -> Option<(usize, bool)> {
    let mut depth = 0i32;
    for (i, c) in text[from..].char_indices() {
        let at = from + i;
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            ';' if depth == 0 => return Some((at, false)),
            'e' if depth == 0 && text[at..].starts_with("else {") => return Some((at, true)),
            _ => {}
        }
    }
    None
}

/// Whether `expr` reads a record or kernel memory: directly, or through the variable
/// it names, bound earlier in `before` from such a read.
fn is_read(expr: &str, before: &str) -> bool {
    let reads = |s: &str| s.contains("read_at") || s.contains("bpf_probe_read");
    if reads(expr) {
        return true;
    }
    let name = expr.trim();
    if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
        return false;
    }
    before
        .rfind(&format!("let {name} ="))
        .and_then(|at| statement_end(before, at).map(|(end, _)| &before[at..end]))
        .is_some_and(reads)
}

/// Every `let Ok(..) = <read> else { .. }` whose `else` does not count a drop, and
/// every `if let Ok(..) = <read>`, as `file:line`.
fn quiet_failed_reads(file: &str, text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (at, _) in text.match_indices("let ") {
        let pattern = text[at + 4..].trim_start();
        if !(pattern.starts_with("Ok(") || pattern.starts_with("(Ok(")) {
            continue;
        }
        let if_let = text[..at].trim_end().ends_with("if");
        let Some(eq) = text[at..].find(" = ").map(|i| at + i + 3) else {
            continue;
        };
        let where_ = format!("{file}:{}", line_of(text, at));
        if if_let {
            // The condition's first line holds the read.
            let line_end = text[eq..].find('\n').map_or(text.len(), |i| eq + i);
            if is_read(&text[eq..line_end], &text[..at]) {
                found.push(where_);
            }
            continue;
        }
        let Some((end, true)) = statement_end(text, eq) else {
            continue;
        };
        if !is_read(&text[eq..end], &text[..at]) {
            continue;
        }
        let open = end + "else ".len();
        let body = closing(text, open).map_or(&text[open..], |close| &text[open..close]);
        if !body.contains("count_drop(") {
            found.push(where_);
        }
    }
    found
}

/// `text` without its trailing blanks and whole-line `//` comments: the code just
/// before a place.
fn code_before(text: &str) -> &str {
    let mut end = text.trim_end();
    while let Some(line_start) = end.rfind('\n').map(|i| i + 1) {
        if !end[line_start..].trim_start().starts_with("//") {
            break;
        }
        end = end[..line_start].trim_end();
    }
    end
}

/// Every call of `add_stats` or `shared_add` whose result is dropped (a statement of
/// its own, or `let _ =`), as `file:line`.
fn ignored_adds(file: &str, text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for call in ["add_stats(", "shared_add("] {
        for (at, _) in text.match_indices(call) {
            let before = code_before(&text[..at]);
            if before.ends_with("fn")
                || text[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_')
            {
                continue;
            }
            let open = at + call.len() - 1;
            let after = closing(text, open).map_or("", |close| text[close..].trim_start());
            let statement = before.ends_with([';', '{', '}']) && after.starts_with(';');
            if statement || before.ends_with("let _ =") {
                found.push(format!("{file}:{}", line_of(text, at)));
            }
        }
    }
    found
}

/// Fails with `what` and the places `check` finds in the eBPF sources, if any.
fn assert_none(check: fn(&str, &str) -> Vec<String>, what: &str) {
    let found: Vec<String> = ebpf_sources()
        .iter()
        .flat_map(|(file, text)| check(file, text))
        .collect();
    assert!(found.is_empty(), "{what}: {found:?}");
}

#[test]
fn every_failed_read_counts_a_drop() {
    assert_none(
        quiet_failed_reads,
        "failed reads that give up without count_drop",
    );
}

#[test]
fn no_add_result_is_ignored() {
    assert_none(ignored_adds, "add results thrown away");
}

#[test]
fn the_checks_catch_what_they_look_for() {
    let quiet = "fn f(ctx: C) -> u32 {
    let Ok(x) = (unsafe { ctx.read_at::<u32>(8) }) else {
        return 0;
    };
    let pair = unsafe { (ctx.read_at::<u32>(0), ctx.read_at::<u32>(4)) };
    let (Ok(a), Ok(b)) = pair else {
        return 0;
    };
    if let Ok(y) = unsafe { ctx.read_at::<u64>(16) } {
        use_it(y);
    }
    let Ok(Some(slot)) = FREE.pop() else {
        return FULL;
    };
    let Ok(z) = (unsafe { ctx.read_at::<u32>(8) }) else {
        count_drop(drop_kind::RECORD_LOST);
        return 0;
    };
    0
}";
    let lines = |v: Vec<String>| -> Vec<String> {
        v.into_iter()
            .map(|w| w.rsplit(':').next().unwrap_or("").to_owned())
            .collect()
    };
    assert_eq!(lines(quiet_failed_reads("f", quiet)), ["2", "6", "9"]);
    let adds = "fn g() -> bool {
    // A comment above it.
    add_stats(&M, &k, &d);
    let _ = shared_add(&S, k, 1);
    if !add_stats(&M, &k, &d) {
        count_drop(1);
    }
    let ok = shared_add(&S, k, 1);
    add_stats(&M, &k, &d)
}
fn add_stats<K>(map: &M) -> bool { true }";
    assert_eq!(lines(ignored_adds("g", adds)), ["3", "4"]);
}
