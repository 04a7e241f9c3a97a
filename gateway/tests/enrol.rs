//! `tend-gateway agent add | list | revoke` as an operator runs them: with only the
//! gateway's config (no running gateway, no fleet or token files yet), private files,
//! clear refusals with exit code 2.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use tend_wire::credentials::Credentials;

fn gateway(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tend-gateway"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A config naming files that do not exist yet: enrolment needs none of them.
const CONFIG: &str = r#"gateway_id = "gw-1"
data_dir = "data"
fleet = "fleet.toml"

[api]
listen = "127.0.0.1:0"
token_file = "api.token"
"#;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn enrol_list_revoke_with_only_the_config() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("gw.toml"), CONFIG).unwrap();
    let cfg = d.path().join("gw.toml");
    let cfg = cfg.to_str().unwrap();

    let o = gateway(&["agent", "add", "icu-a", "--config", cfg], d.path());
    assert!(o.status.success(), "{}", text(&o));
    let cred = d.path().join("icu-a.cred");
    assert_eq!(mode(&cred), 0o600);
    let c = Credentials::parse(&std::fs::read_to_string(&cred).unwrap()).unwrap();
    assert_eq!(c.agent_id, "icu-a");
    // The key goes to the file, never to the terminal.
    assert!(!text(&o).contains(&c.key.to_hex()), "{}", text(&o));
    // The trust store is private, in <data_dir>/trust by default.
    let entry = d.path().join("data/trust/agents/icu-a.toml");
    assert_eq!(mode(&entry), 0o600);
    assert_eq!(mode(&d.path().join("data/trust")), 0o700);

    // --out elsewhere; an existing file is never overwritten, and nothing is enrolled.
    let out = d.path().join("b.cred");
    let o = gateway(
        &[
            "agent",
            "add",
            "icu-b",
            "--config",
            cfg,
            "--out",
            out.to_str().unwrap(),
        ],
        d.path(),
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = gateway(
        &[
            "agent",
            "add",
            "icu-c",
            "--config",
            cfg,
            "--out",
            out.to_str().unwrap(),
        ],
        d.path(),
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("exists already"), "{}", text(&o));

    // Enrolled twice, or a name that is no agent id: refused.
    let o = gateway(
        &["agent", "add", "icu-a", "--config", cfg, "--out", "x.cred"],
        d.path(),
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("already enrolled"), "{}", text(&o));
    let o = gateway(&["agent", "add", "a/#", "--config", cfg], d.path());
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("not a valid agent id"), "{}", text(&o));

    let o = gateway(&["agent", "revoke", "icu-a", "--config", cfg], d.path());
    assert!(o.status.success(), "{}", text(&o));
    let o = gateway(&["agent", "revoke", "nobody", "--config", cfg], d.path());
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("not enrolled"), "{}", text(&o));

    let o = gateway(&["agent", "list", "--config", cfg], d.path());
    assert!(o.status.success(), "{}", text(&o));
    let listing = String::from_utf8_lossy(&o.stdout).to_string();
    let line = |id: &str| {
        listing
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("{id} not listed:\n{listing}"))
            .to_string()
    };
    assert!(line("icu-a").contains("revoked"), "{listing}");
    assert!(line("icu-b").contains("enrolled"), "{listing}");
    assert!(!listing.contains("icu-c"), "{listing}");

    // A revoked agent can be enrolled again, with a new key.
    let o = gateway(
        &["agent", "add", "icu-a", "--config", cfg, "--out", "a2.cred"],
        d.path(),
    );
    assert!(o.status.success(), "{}", text(&o));
    let c2 =
        Credentials::parse(&std::fs::read_to_string(d.path().join("a2.cred")).unwrap()).unwrap();
    assert_ne!(c2.key, c.key);
}

#[test]
fn trust_dir_key_and_bad_config() {
    let d = tempfile::tempdir().unwrap();
    let shared = d.path().join("fleet-trust");
    std::fs::write(
        d.path().join("gw.toml"),
        format!(
            "{CONFIG}\n[trust]\ndir = {:?}\n",
            shared.display().to_string()
        ),
    )
    .unwrap();
    let cfg = d.path().join("gw.toml");
    let o = gateway(
        &["agent", "add", "a1", "--config", cfg.to_str().unwrap()],
        d.path(),
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(shared.join("agents/a1.toml").is_file());

    std::fs::write(
        d.path().join("bad.toml"),
        format!("{CONFIG}\n[trust]\ndirr = \"x\"\n"),
    )
    .unwrap();
    let o = gateway(&["agent", "list", "--config", "bad.toml"], d.path());
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("bad.toml:10"), "{}", text(&o));
    assert!(text(&o).contains("dirr"), "{}", text(&o));
}
