//! Replays every committed input of the cargo-fuzz corpora (`fuzz/corpus/<target>/`)
//! through the same function the fuzz target runs, so plain `cargo test` on stable
//! re-checks them on every run. See `fuzz/README.md`.

use std::path::{Path, PathBuf};
use tend_profiles::fuzzing;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no inputs", dir.display());
    for f in &files {
        let bytes = std::fs::read(f).expect("corpus input readable");
        if let Err(e) = std::panic::catch_unwind(|| run(&bytes)) {
            std::panic::resume_unwind(Box::new(format!(
                "{target}: input {} fails: {:?}",
                f.display(),
                e.downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| e.downcast_ref::<&str>().copied())
                    .unwrap_or("panic")
            )));
        }
    }
}

#[test]
fn serial_frame_corpus() {
    replay("serial_frame", fuzzing::serial_frame);
}

#[test]
fn modbus_registers_corpus() {
    replay("modbus_registers", fuzzing::modbus_registers);
}

#[test]
fn json_status_corpus() {
    replay("json_status", fuzzing::json_status);
}

#[test]
fn profile_loader_corpus() {
    replay("profile_loader", fuzzing::profile_loader);
}

/// Found by `profile_loader`: toml reports a control character in a comment with an empty
/// message, so the error said `file:line: key ...: ` and nothing more.
#[test]
fn control_character_in_a_comment_is_explained() {
    let e = tend_profiles::parse_profile("p.toml", "[device]\n# a \u{e} b\n").unwrap_err();
    assert_eq!(e.line, 2, "{e}");
    assert_eq!(
        e.message, "invalid TOML: unexpected character '\\u{e}'",
        "{e}"
    );
}
