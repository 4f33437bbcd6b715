//! The shape of `src/`, checked: no import cycle between its files, and no file grown past
//! the size where it is usually two ideas.
//!
//! A file depends on another when it names a path into it (`use crate::proxy::io::…`,
//! `super::request::Request`, or such a path inline). Paths are resolved to the deepest
//! module that has a file of its own. Unit-test modules at the end of a file
//! (`#[cfg(test)] mod tests`) are left out: they may reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lines a file of `src/` may have (DESIGN: files stay small; past ~500 lines a file is
/// usually two ideas).
const MAX_LINES: usize = 550;

#[test]
fn no_import_cycle_between_files_of_src() {
    let graph = dependency_graph();
    let cycles = strongly_connected(&graph)
        .into_iter()
        .filter(|c| c.len() > 1)
        .collect::<Vec<_>>();
    assert!(
        cycles.is_empty(),
        "files of src/ that import each other (move the shared type to a module both import):\n{}",
        cycles
            .iter()
            .map(|c| format!("  {}", c.join(" <-> ")))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn no_file_of_src_is_too_long() {
    let long: Vec<String> = rust_files(&src())
        .into_iter()
        .filter_map(|f| {
            let lines = std::fs::read_to_string(&f).ok()?.lines().count();
            (lines > MAX_LINES).then(|| format!("{} ({lines} lines)", rel(&f)))
        })
        .collect();
    assert!(long.is_empty(), "split by idea: {long:?}");
}

#[test]
fn the_checker_sees_a_cycle() {
    // The graph code itself, on a made-up cycle a -> b -> c -> a plus a leaf.
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        g.entry(from.into()).or_default().insert(to.into());
        g.entry(to.into()).or_default();
    }
    let sccs = strongly_connected(&g);
    assert!(sccs.iter().any(|c| c.len() == 3));
    // And it resolves real paths: the request loop depends on the phases.
    let real = dependency_graph();
    let serve = &real["src/proxy/serve.rs"];
    assert!(serve.contains("src/proxy/authenticate.rs"), "{serve:?}");
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rel(p: &Path) -> String {
    p.strip_prefix(env!("CARGO_MANIFEST_DIR"))
        .unwrap_or(p)
        .display()
        .to_string()
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// The module path of a file: src/proxy/serve.rs → [proxy, serve]; src/proxy/mod.rs →
/// [proxy]; src/lib.rs → [].
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src()).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// The file of the deepest module along `path` (module names; the rest are items).
fn file_of(path: &[String]) -> Option<PathBuf> {
    let mut best = None;
    let mut dir = src();
    for name in path {
        let as_file = dir.join(format!("{name}.rs"));
        let as_dir = dir.join(name).join("mod.rs");
        if as_file.is_file() {
            best = Some(as_file);
        } else if as_dir.is_file() {
            best = Some(as_dir);
        } else {
            break;
        }
        dir = dir.join(name);
    }
    best.or_else(|| path.is_empty().then(|| src().join("lib.rs")))
}

/// The text that counts: comments and the trailing unit-test module removed.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod ") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(at) => &l[..at],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A path into the crate: how many `super`s it climbs from the file's module (0 = it
/// starts at `crate`), then its segments.
struct CratePath {
    supers: usize,
    segments: Vec<String>,
}

/// Every `crate::…` and `super::…` path in `code`, with `{a, b::c}` groups expanded one
/// level deep (enough for this crate's `use` lines).
fn paths_in(code: &str) -> Vec<CratePath> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    for prefix in ["crate::", "super::"] {
        for (start, _) in code.match_indices(prefix) {
            let after_ident = start > 0
                && (bytes[start - 1].is_ascii_alphanumeric()
                    || bytes[start - 1] == b'_'
                    || (prefix == "super::" && code[..start].ends_with("super::")));
            if after_ident {
                continue;
            }
            let mut cursor = &code[start + prefix.len()..];
            let mut supers = usize::from(prefix == "super::");
            while let Some(r) = cursor.strip_prefix("super::") {
                supers += 1;
                cursor = r;
            }
            let mut segments: Vec<String> = Vec::new();
            loop {
                let ident: String = cursor
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if ident.is_empty() {
                    break;
                }
                cursor = &cursor[ident.len()..];
                segments.push(ident);
                match cursor.strip_prefix("::") {
                    Some(r) => cursor = r,
                    None => break,
                }
            }
            let Some(group) = cursor.strip_prefix('{') else {
                out.push(CratePath { supers, segments });
                continue;
            };
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                let mut full = segments.clone();
                full.extend(
                    item.split("::")
                        .map(|x| x.trim().trim_start_matches('{').to_string())
                        .filter(|x| !x.is_empty() && x != "self"),
                );
                out.push(CratePath {
                    supers,
                    segments: full,
                });
            }
        }
    }
    out
}

fn dependency_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in rust_files(&src()) {
        if file.ends_with("main.rs") {
            continue; // the binary's crate root: it reaches the library as `cubegate::`
        }
        let me = rel(&file);
        let module = module_of(&file);
        let code = code_of(&std::fs::read_to_string(&file).unwrap());
        let deps = graph.entry(me.clone()).or_default();
        for path in paths_in(&code) {
            // `super` climbs from the file's module (for a mod.rs, the module itself).
            let mut full = module.clone();
            full.truncate(if path.supers == 0 {
                0
            } else {
                module.len().saturating_sub(path.supers)
            });
            full.extend(path.segments);
            if let Some(target) = file_of(&full) {
                let target = rel(&target);
                if target != me {
                    deps.insert(target);
                }
            }
        }
    }
    graph
}

/// Tarjan's strongly connected components, each sorted.
fn strongly_connected(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'g> {
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'g>(s: &mut State<'g>, v: &'g str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            comp.sort();
            s.out.push(comp);
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}
