//! `tend-agent run` refuses an `[uplink] password_file` open to group or others: exit 2,
//! naming the config file, the key and the fix, and never the password.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use tend_testkit::config::write_secret;

const AGENT_BIN: &str = env!("CARGO_BIN_EXE_tend-agent");

#[test]
fn run_refuses_a_password_file_readable_by_others() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let password = d.join("uplink.pw");
    write_secret(&password, "s3cret-pw\n").unwrap();
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = d.join("agent.toml");
    std::fs::write(
        &config,
        "agent_id = \"a1\"\nsite_id = \"s\"\ndata_dir = \"data\"\n[uplink]\nbroker = \"mqtt://127.0.0.1:1\"\nusername = \"a1\"\npassword_file = \"uplink.pw\"\n",
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
    std::fs::write(d.join("ca.pem"), tend_testkit::certs::CA_PEM).unwrap();
    std::fs::write(d.join("client.pem"), tend_testkit::certs::CLIENT_CERT_PEM).unwrap();
    let key = d.join("client.key");
    write_secret(&key, tend_testkit::certs::CLIENT_KEY_PEM).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let config = d.join("agent.toml");
    std::fs::write(
        &config,
        "agent_id = \"a1\"\nsite_id = \"s\"\ndata_dir = \"data\"\n[uplink]\nbroker = \"mqtts://127.0.0.1:1\"\nca_file = \"ca.pem\"\nclient_cert = \"client.pem\"\nclient_key = \"client.key\"\n",
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
