//! Enrolment for the suites: agents enrolled the way an operator does it (the gateway's
//! `agent add` command), credentials for agents that talk to a fake gateway, and the
//! sealed messages a fake gateway or an attacker sends.

use std::path::{Path, PathBuf};
use std::process::Command;
use tend_wire::credentials::Credentials;
use tend_wire::{Ack, AgentKey, Purpose, SeqRange, UpBatch};

/// Enrols `agent` with the gateway binary `gateway_bin` (`agent add ID --config ...
/// --out ...`), as an operator would; the credentials go to `out` (replaced if there).
/// Returns the agent's key.
pub fn enrol(gateway_bin: &Path, gateway_toml: &Path, agent: &str, out: &Path) -> AgentKey {
    let _ = std::fs::remove_file(out);
    let done = Command::new(gateway_bin)
        .args(["agent", "add", agent, "--config"])
        .arg(gateway_toml)
        .arg("--out")
        .arg(out)
        .output()
        .expect("run `agent add`");
    assert!(
        done.status.success(),
        "agent add {agent}: {}{}",
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
    read_credentials(out).key
}

/// Revokes `agent` with the gateway binary, as an operator would.
pub fn revoke(gateway_bin: &Path, gateway_toml: &Path, agent: &str) {
    let done = Command::new(gateway_bin)
        .args(["agent", "revoke", agent, "--config"])
        .arg(gateway_toml)
        .output()
        .expect("run `agent revoke`");
    assert!(
        done.status.success(),
        "agent revoke {agent}: {}",
        String::from_utf8_lossy(&done.stderr)
    );
}

/// Reads a credentials file.
pub fn read_credentials(path: &Path) -> Credentials {
    let text = std::fs::read_to_string(path).expect("read credentials");
    Credentials::parse(&text).expect("parse credentials")
}

/// Credentials for an agent that talks to a fake gateway: a fresh key written to
/// `<dir>/<agent>.cred` (mode 0600), where [`crate::sims::sims_agent_toml`]'s config
/// looks. Returns the file and the key.
pub fn credentials(dir: &Path, agent: &str) -> (PathBuf, AgentKey) {
    let path = dir.join(format!("{agent}.cred"));
    let c = Credentials {
        agent_id: agent.to_string(),
        key: AgentKey::generate().expect("random key"),
    };
    let text = c.to_text(jiff::Timestamp::now(), "test");
    crate::config::write_secret(&path, text).expect("write credentials");
    (path, c.key)
}

/// An ack sealed with `key` as a gateway sends it, stamped with the gateway time now.
pub fn sealed_ack(
    key: &AgentKey,
    agent: &str,
    incarnation: &str,
    ranges: Vec<SeqRange>,
) -> Vec<u8> {
    let ack = Ack {
        v: tend_wire::VERSION,
        incarnation: incarnation.to_string(),
        ranges,
        gateway_time: jiff::Timestamp::now(),
    };
    tend_wire::encode_sealed(key, Purpose::Ack, agent, &ack).expect("encode ack")
}

/// The batch in a payload on `agent`'s `up` topic, if sealed with `key`.
pub fn open_batch(key: &AgentKey, agent: &str, payload: &[u8]) -> Option<UpBatch> {
    let body = tend_wire::seal::open(key, Purpose::Up, agent, payload).ok()?;
    UpBatch::decode(body).ok()
}
