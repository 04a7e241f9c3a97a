//! `tend-gateway agent add | list | revoke`: enrolment from the command line, with only
//! the gateway's config (no running gateway needed; a running one picks the change up
//! within a second).

use crate::config::GatewayConfig;
use crate::trust::{write_private, TrustDir, TrustError};
use jiff::Timestamp;
use std::path::{Path, PathBuf};
use tend_wire::credentials::Credentials;

/// Why an enrolment command failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error("{} exists already; remove it or name another file with --out (nothing was enrolled)", .0.display())]
    OutExists(PathBuf),
}

/// Enrols `agent` and writes its credentials file to `out` (default `<agent>.cred` in the
/// working directory), mode 0600. Returns the file written.
pub fn add(
    cfg: &GatewayConfig,
    agent: &str,
    out: Option<&Path>,
    now: Timestamp,
) -> Result<PathBuf, EnrolError> {
    let out = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(format!("{agent}.cred")));
    // Checked first, so a refused --out leaves no enrolment without its credentials.
    if out.exists() {
        return Err(EnrolError::OutExists(out));
    }
    let dir = TrustDir::new(cfg.trust_dir());
    let e = dir.add(agent, now)?;
    let creds = Credentials {
        agent_id: e.agent.clone(),
        key: e.key,
    };
    if let Err(err) = write_private(&out, creds.to_text(now, &cfg.gateway_id).as_bytes()) {
        // Without its credentials file the enrolment is of no use: undo it.
        let _ = dir.revoke(agent, now);
        return Err(err.into());
    }
    Ok(out)
}

/// One line per agent: id, state, enrolled, revoked.
pub fn list(cfg: &GatewayConfig) -> Result<String, EnrolError> {
    let all = TrustDir::new(cfg.trust_dir()).list()?;
    let mut out = format!(
        "{:<24} {:<9} {:<22} revoked\n",
        "agent", "state", "enrolled"
    );
    for e in all {
        let state = if e.revoked_at.is_some() {
            "revoked"
        } else {
            "enrolled"
        };
        let revoked = e.revoked_at.map(|t| t.to_string()).unwrap_or_default();
        out.push_str(&format!(
            "{:<24} {:<9} {:<22} {revoked}\n",
            e.agent,
            state,
            e.enrolled_at.to_string()
        ));
    }
    Ok(out)
}

/// Revokes `agent`: refused by every gateway reading this trust directory from then on.
pub fn revoke(cfg: &GatewayConfig, agent: &str, now: Timestamp) -> Result<(), EnrolError> {
    TrustDir::new(cfg.trust_dir()).revoke(agent, now)?;
    Ok(())
}
