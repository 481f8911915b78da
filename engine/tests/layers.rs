//! The engine's layers import one way only (`docs/storage-server.md`):
//! disk, then error, config, store, repl, service. A `crate::` path in a
//! file that names a layer above its own fails this test.

use std::path::{Path, PathBuf};

/// Each layer, bottom first, with the paths that lead into it.
const LAYERS: &[(&str, &[&str])] = &[
    ("disk", &["crate::disk"]),
    ("error", &["crate::error", "crate::EngineError"]),
    ("config", &["crate::config"]),
    ("store", &["crate::store"]),
    ("repl", &["crate::repl"]),
    // The crate root re-exports `run` from the service: below it, only
    // `crate::error::EngineError` is used, never the root's re-export.
    ("service", &["crate::service", "crate::run"]),
];

fn layer_of(src: &Path, file: &Path) -> Option<usize> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    LAYERS.iter().position(|(layer, _)| *layer == name)
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read engine/src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_layer_imports_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut checked = 0;
    let mut upward = Vec::new();
    for file in &files {
        let Some(own) = layer_of(&src, file) else {
            continue; // lib.rs, which declares every layer
        };
        checked += 1;
        let text = std::fs::read_to_string(file).expect("read source");
        for (number, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for (layer, paths) in &LAYERS[own + 1..] {
                if paths.iter().any(|p| code.contains(p)) {
                    upward.push(format!(
                        "{}:{}: {} uses {layer}: {}",
                        file.display(),
                        number + 1,
                        LAYERS[own].0,
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(checked >= 20, "only {checked} engine files found");
    assert!(
        upward.is_empty(),
        "imports that run up:\n{}",
        upward.join("\n")
    );
}
