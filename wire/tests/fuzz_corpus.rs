//! Replays every committed input of the cargo-fuzz corpus `fuzz/corpus/wire_decode/`
//! through the same function the fuzz target runs, so plain `cargo test` on stable
//! re-checks them on every run. See `fuzz/README.md`.

use std::path::{Path, PathBuf};

#[test]
fn wire_decode_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/wire_decode");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no inputs", dir.display());
    for f in &files {
        let bytes = std::fs::read(f).expect("corpus input readable");
        if let Err(e) = std::panic::catch_unwind(|| tend_wire::fuzzing::wire_decode(&bytes)) {
            std::panic::resume_unwind(Box::new(format!(
                "input {} fails: {:?}",
                f.display(),
                e.downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| e.downcast_ref::<&str>().copied())
                    .unwrap_or("panic")
            )));
        }
    }
}
