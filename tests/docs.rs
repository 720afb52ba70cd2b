//! The documentation stays true: every relative link in `README.md` and `docs/*.md` reaches a
//! file (and a heading, for `#anchor` links into markdown), every key the config parser accepts
//! has a row in `docs/configuration.md`, and the README stays a newcomer's page (and names every
//! variable that enables tests).
//!
//! The keys come from `config::KEY_SECTIONS`, the lists the parser itself warns about unknown
//! keys with, so a key added to the parser without a documentation row fails here.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use openai_api_route::config::KEY_SECTIONS;

/// The README is a newcomer's page; the reference lives in `docs/`.
const README_MAX_BYTES: usize = 25 * 1024;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `README.md` and every `docs/*.md`.
fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let docs = root().join("docs");
    let mut guides: Vec<PathBuf> = std::fs::read_dir(&docs)
        .unwrap_or_else(|e| panic!("{}: {e}", docs.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    guides.sort();
    files.extend(guides);
    files
}

/// The lines of `text` outside fenced code blocks, with their 1-based line numbers.
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut in_fence = false;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if !in_fence {
            out.push((i + 1, line));
        }
    }
    out
}

/// `line` without its inline code spans (`` `…` ``), whose brackets are not links.
fn without_code_spans(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    for (i, part) in line.split('`').enumerate() {
        if i % 2 == 0 {
            out.push_str(part);
        }
    }
    out
}

/// The targets of `[text](target)` and `![alt](target)` links in one line of prose, and of a
/// reference definition `[label]: target`.
fn link_targets(line: &str) -> Vec<String> {
    let line = without_code_spans(line);
    let mut targets = Vec::new();
    let mut rest = line.as_str();
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let Some(end) = after.find(')') else { break };
        // `[x](path "title")`: the target ends at the first space.
        let target = after[..end].split_whitespace().next().unwrap_or("");
        targets.push(target.trim_matches(|c| c == '<' || c == '>').to_string());
        rest = &after[end + 1..];
    }
    let trimmed = line.trim_start();
    if trimmed.starts_with('[') {
        if let Some(colon) = trimmed.find("]: ") {
            if let Some(target) = trimmed[colon + 3..].split_whitespace().next() {
                targets.push(target.to_string());
            }
        }
    }
    targets
}

/// GitHub's anchor for a heading: lower case, punctuation other than `-` and `_` dropped, each
/// space a `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every anchor of a markdown file; a repeated heading gets `-1`, `-2`… as on GitHub.
fn anchors(text: &str) -> HashSet<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = HashSet::new();
    for (_, line) in prose_lines(text) {
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let base = slug(line[hashes..].trim_end_matches('#'));
        let n = seen.entry(base.clone()).or_insert(0);
        out.insert(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    }
    out
}

/// Every broken relative link of the given files, as `file:line: target: why`.
fn broken_links(files: &[PathBuf]) -> Vec<String> {
    let mut anchor_cache: HashMap<PathBuf, HashSet<String>> = HashMap::new();
    let mut broken = Vec::new();
    for file in files {
        let text = read(file);
        let dir = file.parent().unwrap();
        let name = file
            .strip_prefix(root())
            .unwrap_or(file)
            .display()
            .to_string();
        for (n, line) in prose_lines(&text) {
            for target in link_targets(line) {
                let lower = target.to_ascii_lowercase();
                if ["http://", "https://", "mailto:"]
                    .iter()
                    .any(|s| lower.starts_with(s))
                {
                    continue;
                }
                let (path, anchor) = match target.split_once('#') {
                    Some((p, a)) => (p, Some(a)),
                    None => (target.as_str(), None),
                };
                let resolved = if path.is_empty() {
                    file.clone()
                } else {
                    dir.join(path)
                };
                if path.is_empty() && anchor.is_none() {
                    broken.push(format!("{name}:{n}: empty link target"));
                    continue;
                }
                if !resolved.exists() {
                    broken.push(format!("{name}:{n}: {target}: no such file"));
                    continue;
                }
                let Some(anchor) = anchor else { continue };
                if resolved.extension().is_none_or(|e| e != "md") {
                    continue;
                }
                let known = anchor_cache
                    .entry(resolved.clone())
                    .or_insert_with(|| anchors(&read(&resolved)));
                if !known.contains(anchor) {
                    broken.push(format!("{name}:{n}: {target}: no heading with that anchor"));
                }
            }
        }
    }
    broken
}

#[test]
fn every_relative_link_in_the_readme_and_guides_resolves() {
    let files = markdown_files();
    assert!(
        files.len() > 5,
        "expected the README and the guides: {files:?}"
    );
    let broken = broken_links(&files);
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_link_checker_finds_a_broken_file_a_broken_anchor_and_accepts_good_ones() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("page.md");
    std::fs::write(
        dir.path().join("other.md"),
        "# Other page\n\n## Models and token usage (0.2)\n\n## `cooldown`: nested keys\n",
    )
    .unwrap();
    std::fs::write(
        &page,
        "# Page\n\n[ok](other.md) [ok](other.md#models-and-token-usage-02) \
         [ok](other.md#cooldown-nested-keys) [ok](#page) [web](https://example.com/x#y)\n\
         `[not a link](nowhere.md)`\n\n```\n[in a code block](nowhere.md)\n```\n\n\
         [gone](missing.md) [bad anchor](other.md#no-such-heading) [bad](#nope)\n",
    )
    .unwrap();
    let broken = broken_links(&[page]);
    assert_eq!(broken.len(), 3, "{broken:#?}");
    assert!(
        broken[0].ends_with("missing.md: no such file"),
        "{broken:#?}"
    );
    assert!(
        broken[1].contains("other.md#no-such-heading"),
        "{broken:#?}"
    );
    assert!(broken[2].contains("#nope"), "{broken:#?}");
}

/// The keys written in the first cell of each table row of `text`, split by the heading
/// "Per-upstream keys" (its section, up to the next heading as high) and the rest of the file.
fn documented_keys(text: &str) -> (HashSet<String>, HashSet<String>) {
    let (mut global, mut upstream) = (HashSet::new(), HashSet::new());
    let mut in_upstream: Option<usize> = None;
    for (_, line) in prose_lines(text) {
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if (1..=6).contains(&hashes) && line[hashes..].starts_with(' ') {
            if in_upstream.is_some_and(|level| hashes <= level) {
                in_upstream = None;
            }
            if line[hashes..].trim().starts_with("Per-upstream keys") {
                in_upstream = Some(hashes);
            }
            continue;
        }
        let Some(first_cell) = line.strip_prefix('|').and_then(|l| l.split('|').next()) else {
            continue;
        };
        let set = if in_upstream.is_some() {
            &mut upstream
        } else {
            &mut global
        };
        for (i, part) in first_cell.split('`').enumerate() {
            if i % 2 == 1 {
                set.insert(part.to_string());
            }
        }
    }
    (global, upstream)
}

#[test]
fn every_config_key_the_parser_accepts_has_a_row_in_the_configuration_reference() {
    let path = root().join("docs/configuration.md");
    let (global, upstream) = documented_keys(&read(&path));
    let mut missing = Vec::new();
    let mut count = 0;
    for (section, keys) in KEY_SECTIONS {
        for key in *keys {
            count += 1;
            let (set, label, table) = match *section {
                "" => (&global, key.to_string(), "a global table"),
                "upstreams[]" => (
                    &upstream,
                    key.to_string(),
                    "the \"Per-upstream keys\" table",
                ),
                prefix => (&global, format!("{prefix}.{key}"), "a global table"),
            };
            if !set.contains(&label) {
                missing.push(format!("`{label}` (in {table})"));
            }
        }
    }
    assert!(
        count > 40,
        "the parser's key lists look empty: {count} keys"
    );
    assert!(
        missing.is_empty(),
        "config keys the parser accepts without a row in docs/configuration.md (write the key \
         as `key` in the first cell of a table row):\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_key_checker_sees_rows_only_in_their_table() {
    let (global, upstream) = documented_keys(
        "# C\n\n### Global keys\n\n| key | m |\n|---|---|\n| `timeout` | `retries` in the text |\n\n\
         ### Per-upstream keys\n\n| key | m |\n|---|---|\n| `allow` / `deny` | x |\n\n\
         ```\n| `name` | in a code block |\n```\n\n## Later\n\n| `cooldown.seconds` | x |\n",
    );
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<HashSet<_>>();
    assert_eq!(global, set(&["timeout", "cooldown.seconds"]));
    assert_eq!(upstream, set(&["allow", "deny"]));
}

#[test]
fn the_readme_stays_a_newcomers_page() {
    let readme = read(&root().join("README.md"));
    assert!(
        readme.len() <= README_MAX_BYTES,
        "README.md is {} bytes (at most {README_MAX_BYTES}): move reference text into docs/",
        readme.len()
    );
    // The two commands a newcomer needs, and the way to every guide.
    assert!(
        readme.contains("cargo run --release"),
        "the build-and-run command"
    );
    assert!(readme.contains("cargo test --locked"), "the test command");
    assert!(
        readme.contains("target/release/openai-api-route"),
        "where the built binary is"
    );
    // Every variable that turns on tests that are otherwise ignored (build.rs), in the table a
    // newcomer reads next to the test command.
    for (var, _) in crate::support::test_services() {
        assert!(
            readme.contains(&format!("| `{var}` |")),
            "the README's test section does not name {var}"
        );
    }
    // Every guide is linked from the README's Documentation section and from the docs index.
    let index = read(&root().join("docs/README.md"));
    for guide in markdown_files().iter().skip(1) {
        let name = guide.file_name().unwrap().to_string_lossy();
        if name == "README.md" {
            assert!(
                readme.contains("](docs/README.md)"),
                "README.md links docs/README.md"
            );
            continue;
        }
        assert!(
            readme.contains(&format!("](docs/{name})")),
            "README.md does not link docs/{name}"
        );
        assert!(
            index.contains(&format!("]({name})")),
            "docs/README.md does not link {name}"
        );
    }
}

/// Whether every key `small` sets is set to the same value in `big` (lists item by item).
fn sets_the_same(small: &serde_yaml::Value, big: &serde_yaml::Value, at: &str) -> Vec<String> {
    use serde_yaml::Value;
    match (small, big) {
        (Value::Mapping(s), Value::Mapping(b)) => s
            .iter()
            .flat_map(|(k, v)| {
                let key = format!("{at}.{}", k.as_str().unwrap_or("?"));
                match b.get(k) {
                    Some(w) => sets_the_same(v, w, &key),
                    None => vec![format!("{key}: set in the README, not in the example file")],
                }
            })
            .collect(),
        (Value::Sequence(s), Value::Sequence(b)) if s.len() == b.len() => s
            .iter()
            .zip(b)
            .enumerate()
            .flat_map(|(i, (v, w))| sets_the_same(v, w, &format!("{at}[{i}]")))
            .collect(),
        _ if small == big => vec![],
        _ => vec![format!(
            "{at}: {small:?} in the README, {big:?} in the example file"
        )],
    }
}

#[test]
fn the_readme_config_excerpt_sets_only_what_the_example_file_sets() {
    let readme = read(&root().join("README.md"));
    let section = readme
        .split("## A config to start from")
        .nth(1)
        .expect("the README's config section");
    let excerpt = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("its YAML block");
    let example = read(&root().join("upstreams.example.yaml"));
    let (excerpt, example): (serde_yaml::Value, serde_yaml::Value) = (
        serde_yaml::from_str(excerpt).unwrap(),
        serde_yaml::from_str(&example).unwrap(),
    );
    let differences = sets_the_same(&excerpt, &example, "");
    assert!(differences.is_empty(), "{differences:#?}");
}
