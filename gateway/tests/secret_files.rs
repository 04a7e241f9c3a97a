//! `tend-gateway check` refuses a token file open to group or others: exit 2, naming
//! the config file, the key and the fix, and never the token.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use tend_testkit::config::{fleet_toml, write_secret, FleetDevice};

const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_tend-gateway");

#[test]
fn check_refuses_a_token_file_readable_by_others() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let token = d.join("api.token");
    write_secret(&token, "t0ken-for-the-test\n").unwrap();
    std::fs::write(
        d.join("fleet.toml"),
        fleet_toml(&[FleetDevice {
            id: "icu7-vent",
            serial: "AV5C-21-004417",
            site: "s-main",
            location: "ICU bed 7",
            accepted: "2025-06-01",
        }]),
    )
    .unwrap();
    let config = d.join("gateway.toml");
    std::fs::write(
        &config,
        "gateway_id = \"gw\"\ndata_dir = \"data\"\nfleet = \"fleet.toml\"\n[api]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"api.token\"\n",
    )
    .unwrap();
    let check = || {
        Command::new(GATEWAY_BIN)
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let out = check();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("gateway.toml:6"), "{err}");
    assert!(err.contains("api.token_file"), "{err}");
    assert!(err.contains("mode 0644"), "{err}");
    assert!(
        err.contains(&format!("chmod 600 {}", token.display())),
        "{err}"
    );
    assert!(!err.contains("t0ken"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
