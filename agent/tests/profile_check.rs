//! `tend-agent profile check` as a user runs it: exit 0 for valid profiles, exit 2 with
//! file, line and key for an invalid one.

use std::path::Path;
use std::process::Command;

fn check(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tend-agent"))
        .arg("profile")
        .arg("check")
        .args(args)
        .output()
        .expect("run tend-agent");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn shipped() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../firmware-profiles/profiles")
        .display()
        .to_string()
}

#[test]
fn builtin_and_shipped_profiles_are_valid() {
    let (code, out, err) = check(&[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok ")).count(),
        8,
        "{out}"
    );
    let (code, out, err) = check(&[&shipped()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok ")).count(),
        8,
        "{out}"
    );
}

#[test]
fn invalid_profile_exits_2_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let src = std::fs::read_to_string(format!("{}/aeris/av-500-5.x.toml", shipped())).unwrap();
    let bad = src.replacen("max_registers = 32", "max_registers = 32\nmax_regs = 40", 1);
    let line = bad.lines().position(|l| l == "max_regs = 40").unwrap() + 1;
    let file = dir.path().join("av-500-5.x.toml");
    std::fs::write(&file, bad).unwrap();
    let good = dir.path().join("hm-2-2.x.toml");
    std::fs::write(
        &good,
        std::fs::read(format!("{}/cryosense/hm-2-2.x.toml", shipped())).unwrap(),
    )
    .unwrap();

    let (code, out, err) = check(&[dir.path().to_str().unwrap()]);
    assert_eq!(code, 2, "{out}{err}");
    let want = format!("{}:{line}: key `transport.max_regs`", file.display());
    assert!(err.contains(&want), "expected {want:?} in {err}");
    // The valid file beside it is still checked and reported.
    assert!(out.contains("hm-2-2.x.toml"), "{out}");
}

#[test]
fn two_profiles_for_one_firmware_family_conflict() {
    let a = format!("{}/aeris/av-500-5.x.toml", shipped());
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.toml");
    std::fs::copy(&a, &copy).unwrap();
    let (code, _, err) = check(&[&a, copy.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("already covered"), "{err}");
}

#[test]
fn missing_path_and_garbage_exit_2() {
    let (code, _, err) = check(&["/nonexistent/profile.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/profile.toml"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("junk.toml");
    std::fs::write(&f, [0xff, 0xfe, 0x00, 0x41]).unwrap();
    let (code, _, err) = check(&[f.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("junk.toml"), "{err}");
}

/// One shipped profile with `from` replaced by `to`, checked: exit 2 naming the file,
/// the line of `to` and `key`.
fn check_edited(shipped_file: &str, from: &str, to: &str, key: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let src = std::fs::read_to_string(format!("{}/{shipped_file}", shipped())).unwrap();
    assert!(src.contains(from), "{from:?} not in {shipped_file}");
    let bad = src.replacen(from, to, 1);
    let line = bad.lines().position(|l| l == to).unwrap() + 1;
    let file = dir.path().join("edited.toml");
    std::fs::write(&file, bad).unwrap();
    let (code, out, err) = check(&[file.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}{err}");
    let want = format!("{}:{line}: key `{key}`", file.display());
    assert!(err.contains(&want), "expected {want:?} in {err}");
    err
}

#[test]
fn an_identity_pointer_reading_phi_exits_2() {
    let err = check_edited(
        "vistara/vm-12-7.x.toml",
        "serial_pointers = [\"/serial\", \"/sn\"]",
        "serial_pointers = [\"/patient/mrn\"]",
        "identify.serial_pointers[0]",
    );
    assert!(err.contains("personal health information"), "{err}");
}

#[test]
fn a_device_command_that_is_not_a_read_exits_2() {
    let err = check_edited(
        "vistara/vm-12-7.x.toml",
        "command = \"selftest\"",
        "command = \"factory_reset\"",
        "diagnostic[0].command",
    );
    assert!(err.contains("not a read-only request"), "{err}");
}
