//! The source layout rules contributors rely on (issue "House in order"): no source file over 600
//! lines before its test module, and the attempt loop in `src/proxy/mod.rs` kept short (no
//! function over 90 lines), so that deciding stays in `src/policy.rs`.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Lines before the file's `#[cfg(test)]` module (all of them when it has none).
fn lines_before_tests(text: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with("#[cfg(test)]"))
        .unwrap_or_else(|| text.lines().count())
}

#[test]
fn no_source_file_is_over_600_lines_before_its_tests() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 20, "found only {} files", files.len());
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let n = lines_before_tests(&std::fs::read_to_string(f).unwrap());
            (n > 600).then(|| format!("{} ({n} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "split these files: {long:?}");
}

/// Top-level functions and their lengths, from `fn` to the closing brace in column 0.
fn function_lengths(text: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let mut open: Option<(String, usize)> = None;
    for (i, line) in text.lines().enumerate() {
        let head = line
            .trim_start_matches("pub ")
            .trim_start_matches("pub(crate) ")
            .trim_start_matches("async ");
        if open.is_none() && head.starts_with("fn ") {
            open = Some((head.to_string(), i));
        } else if line == "}" {
            if let Some((name, start)) = open.take() {
                out.push((name, i - start + 1));
            }
        }
    }
    out
}

#[test]
fn the_attempt_loop_stays_short() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/proxy/mod.rs");
    let lengths = function_lengths(&std::fs::read_to_string(path).unwrap());
    assert!(
        lengths
            .iter()
            .any(|(name, _)| name.starts_with("fn forward")),
        "{lengths:?}"
    );
    let long: Vec<_> = lengths.iter().filter(|(_, n)| *n > 90).collect();
    assert!(
        long.is_empty(),
        "over 90 lines in src/proxy/mod.rs: {long:?}"
    );
}

#[test]
fn the_checkers_see_what_they_measure() {
    assert_eq!(lines_before_tests("a\nb\n#[cfg(test)]\nmod tests {}\n"), 2);
    assert_eq!(lines_before_tests("a\nb\nc\n"), 3);
    let text = "fn short() {\n}\n\npub async fn long(\n    x: u8,\n) {\n    x;\n}\n";
    assert_eq!(
        function_lengths(text),
        vec![("fn short() {".to_string(), 2), ("fn long(".to_string(), 5)]
    );
}
