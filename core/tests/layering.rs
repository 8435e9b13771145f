//! The layout holds: no import cycle between the server's modules, and the load generator uses
//! only the server's public client calls (`tether_core::client`); the connection machinery it
//! shares with the server is the `tether-net` crate. Read from the sources, so a change that
//! breaks the layering fails here with the offending path.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without its comments (line comments only; the project uses no block
/// comments), so a doc link does not count as an import.
fn code(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `prefix` + identifier in `text`.
fn paths_after<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        out.push(&rest[..end]);
    }
    out
}

/// The module a file of `core/src` belongs to: its first path component (`shard/agent.rs` →
/// `shard`), or `None` for the binary.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    match first.trim_end_matches(".rs") {
        "main" | "lib" => None,
        m => Some(m.to_string()),
    }
}

fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == m).unwrap();
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(m, g, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(c) = visit(n, graph, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn the_server_modules_import_each_other_without_a_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let Some(m) = module_of(&src, f) else {
            continue;
        };
        let deps = graph.entry(m.clone()).or_default();
        for d in paths_after(&code(f), "crate::") {
            if d != m && !d.is_empty() {
                deps.insert(d.to_string());
            }
        }
    }
    assert!(
        graph.contains_key("shard") && graph["server"].contains("shard"),
        "the scan sees the modules: {graph:?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle in core/src: {}", cycle.join(" → "));
    }
}

#[test]
fn loadgen_uses_only_the_servers_client_calls() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    rust_files(&root.join("loadgen/src"), &mut files);
    let mut seen = 0;
    let mut bad = Vec::new();
    for f in &files {
        for p in paths_after(&code(f), "tether_core::") {
            seen += 1;
            if p != "client" {
                bad.push(format!("{}: tether_core::{p}", f.display()));
            }
        }
    }
    assert!(seen > 0, "loadgen calls the server's client API somewhere");
    assert!(bad.is_empty(), "loadgen reaches into the server: {bad:#?}");
}

#[test]
fn the_connection_machinery_knows_nothing_of_the_server() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../net");
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    assert!(!files.is_empty());
    for f in &files {
        assert!(
            paths_after(&code(f), "tether_core").is_empty(),
            "{} names the server",
            f.display()
        );
    }
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(
        !manifest.contains("tether-core"),
        "net/Cargo.toml depends on the server"
    );
}
