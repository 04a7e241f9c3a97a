//! An agent's credentials file, written by `tend-gateway agent add` and named by the
//! agent's `[uplink] credentials`: the agent id and its key, as TOML. One secret serves
//! both sealing messages and (derived from it) logging in to an embedded broker.

use crate::seal::AgentKey;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// What a credentials file holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Credentials {
    pub agent_id: String,
    pub key: AgentKey,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    agent_id: String,
    key: String,
}

/// What is wrong with a credentials file: the key at fault (for file:line:key messages)
/// and why. Never quotes the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct CredentialsError {
    pub key: &'static str,
    pub message: String,
}

impl Credentials {
    /// The file's text; `issued` and `by` go in a comment for whoever finds the file.
    pub fn to_text(&self, issued: Timestamp, by: &str) -> String {
        format!(
            "# tend agent credentials for {:?}, issued {issued} by gateway {by:?}.\n\
             # Copy to the agent, name it in [uplink] credentials, and keep it private\n\
             # (chmod 600, owned by the agent's user): whoever holds it can speak as the agent.\n\
             agent_id = {:?}\n\
             key = \"{}\"\n",
            self.agent_id,
            self.agent_id,
            self.key.to_hex()
        )
    }

    /// Parses a credentials file's text.
    pub fn parse(text: &str) -> Result<Credentials, CredentialsError> {
        let f: File = toml::from_str(text).map_err(|e| CredentialsError {
            key: "agent_id",
            // toml's message quotes the offending line, which may be the key: keep only
            // its first line (what was wrong and where).
            message: format!(
                "not a credentials file from `tend-gateway agent add`: {}",
                e.message().lines().next().unwrap_or("invalid TOML")
            ),
        })?;
        if !crate::topic::valid_agent_id(&f.agent_id) {
            return Err(CredentialsError {
                key: "agent_id",
                message: format!("{:?} is not a valid agent id", f.agent_id),
            });
        }
        let key = AgentKey::from_hex(&f.key).ok_or(CredentialsError {
            key: "key",
            message: "must be 64 hex digits, as `tend-gateway agent add` writes it".into(),
        })?;
        Ok(Credentials {
            agent_id: f.agent_id,
            key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let c = Credentials {
            agent_id: "icu-a".into(),
            key: AgentKey::generate().unwrap(),
        };
        let text = c.to_text("2026-12-02T00:00:00Z".parse().unwrap(), "gw1");
        assert_eq!(Credentials::parse(&text), Ok(c.clone()));
        let e = Credentials::parse("agent_id = \"a/b\"\nkey = \"00\"").unwrap_err();
        assert_eq!(e.key, "agent_id");
        let e = Credentials::parse("agent_id = \"a\"\nkey = \"zz\"").unwrap_err();
        assert_eq!(e.key, "key");
        let secret = c.key.to_hex();
        let e = Credentials::parse(&format!("agent_id = \"a\"\nkey = \"{secret}\"\nextra = 1"))
            .unwrap_err();
        assert!(!e.to_string().contains(&secret), "{e}");
        assert!(Credentials::parse("").is_err());
    }
}
