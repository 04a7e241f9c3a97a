//! `tend-agent run` refuses an `[uplink] password_file` open to group or others, and a
//! credentials file that is missing, open to others, another agent's or garbled: exit 2,
//! naming the config file, the line, the key and the fix, and never the secret.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use tend_testkit::config::write_secret;

const AGENT_BIN: &str = env!("CARGO_BIN_EXE_tend-agent");

#[test]
fn run_refuses_a_password_file_readable_by_others() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tend_testkit::trust::credentials(d, "a1");
    let password = d.join("uplink.pw");
    write_secret(&password, "s3cret-pw\n").unwrap();
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = d.join("agent.toml");
    std::fs::write(
        &config,
        "agent_id = \"a1\"\nsite_id = \"s\"\ndata_dir = \"data\"\n[uplink]\nbroker = \"mqtt://127.0.0.1:1\"\nusername = \"a1\"\npassword_file = \"uplink.pw\"\ncredentials = \"a1.cred\"\n",
    )
    .unwrap();
    let out = Command::new(AGENT_BIN)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("agent.toml:7"), "{err}");
    assert!(err.contains("uplink.password_file"), "{err}");
    assert!(err.contains("mode 0644"), "{err}");
    assert!(
        err.contains(&format!("chmod 600 {}", password.display())),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!d.join("data").exists(), "nothing may start: {err}");
}

#[test]
fn run_refuses_a_client_key_readable_by_group() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tend_testkit::trust::credentials(d, "a1");
    std::fs::write(d.join("ca.pem"), tend_testkit::certs::CA_PEM).unwrap();
    std::fs::write(d.join("client.pem"), tend_testkit::certs::CLIENT_CERT_PEM).unwrap();
    let key = d.join("client.key");
    write_secret(&key, tend_testkit::certs::CLIENT_KEY_PEM).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let config = d.join("agent.toml");
    std::fs::write(
        &config,
        "agent_id = \"a1\"\nsite_id = \"s\"\ndata_dir = \"data\"\n[uplink]\nbroker = \"mqtts://127.0.0.1:1\"\nca_file = \"ca.pem\"\nclient_cert = \"client.pem\"\nclient_key = \"client.key\"\ncredentials = \"a1.cred\"\n",
    )
    .unwrap();
    let out = Command::new(AGENT_BIN)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("agent.toml:8"), "{err}");
    assert!(err.contains("uplink.client_key"), "{err}");
    assert!(err.contains("mode 0640"), "{err}");
    assert!(
        err.contains(&format!("chmod 600 {}", key.display())),
        "{err}"
    );
    assert!(!err.contains("PRIVATE KEY"), "{err}");
}

/// Runs `tend-agent run` on a config naming `credentials` and returns (exit code, stderr).
fn run_with_credentials(d: &std::path::Path, credentials: &std::path::Path) -> (i32, String) {
    let config = d.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "agent_id = \"a1\"\nsite_id = \"s\"\ndata_dir = \"data\"\n[uplink]\nbroker = \"mqtt://127.0.0.1:1\"\ncredentials = {:?}\n",
            credentials.display().to_string()
        ),
    )
    .unwrap();
    let out = Command::new(AGENT_BIN)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), all)
}

#[test]
fn run_refuses_credentials_missing_open_foreign_or_garbled() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (good, key) = tend_testkit::trust::credentials(d, "a1");
    let secret = key.to_hex();
    let (foreign, foreign_key) = tend_testkit::trust::credentials(d, "a2");

    let open = d.join("open.cred");
    std::fs::copy(&good, &open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    // The right agent, a key cut short: the message must not quote what is there.
    let garbled = d.join("garbled.cred");
    write_secret(
        &garbled,
        format!("agent_id = \"a1\"\nkey = \"{}\"\n", &secret[..50]),
    )
    .unwrap();
    // Not TOML at all, with the key on the offending line.
    let not_toml = d.join("not-toml.cred");
    write_secret(&not_toml, format!("agent_id = \"a1\"\n{secret}\n")).unwrap();

    let cases: [(&std::path::Path, &str, &str); 5] = [
        (&d.join("missing.cred"), "missing", "cannot read"),
        (&open, "0644", "mode 0644"),
        (&foreign, "another agent's", "\"a2\""),
        (&garbled, "garbled", "64 hex digits"),
        (&not_toml, "not TOML", "not a credentials file"),
    ];
    for (path, what, why) in cases {
        let (code, err) = run_with_credentials(d, path);
        assert_eq!(code, 2, "{what}: {err}");
        assert!(err.contains("agent.toml:6"), "{what}: {err}");
        assert!(err.contains("uplink.credentials"), "{what}: {err}");
        assert!(err.contains(&path.display().to_string()), "{what}: {err}");
        assert!(err.contains(why), "{what}: {err}");
        assert!(
            !err.contains(&secret[..16]),
            "{what}: the key leaked: {err}"
        );
        assert!(
            !err.contains(&foreign_key.to_hex()[..16]),
            "{what}: a key leaked: {err}"
        );
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert!(!d.join("data").exists(), "{what}: nothing may start: {err}");
    }
    // The fix is named too.
    let (_, err) = run_with_credentials(d, &open);
    assert!(
        err.contains(&format!("chmod 600 {}", open.display())),
        "{err}"
    );
}
