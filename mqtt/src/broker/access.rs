//! Who may use the embedded broker: the login check every CONNECT must pass, the TLS
//! files of the listener, the count of refused connections, and the rule that keeps
//! their log short (one line a minute per user name).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Decides a CONNECT from (client id, user name, password); must be cheap (no I/O).
pub type Login = Arc<dyn Fn(&str, &str, &str) -> bool + Send + Sync>;

/// The certificate chain and private key (PEM) of a listener that speaks only TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Who may connect to the embedded broker. The default is open access: no login, no
/// TLS, as a simulator on one machine wants.
#[derive(Clone, Default)]
pub struct BrokerAccess {
    /// With a login, a CONNECT without user name and password, or one it refuses, gets
    /// no session.
    pub login: Option<Login>,
    /// With TLS, the listener speaks only TLS.
    pub tls: Option<ServerTls>,
    /// CONNECTs refused (no credentials, or credentials the login refused), for a
    /// metric.
    pub refused: Arc<AtomicU64>,
}

impl BrokerAccess {
    /// Neither login nor TLS: anyone who reaches the port may connect.
    pub fn is_open(&self) -> bool {
        self.login.is_none() && self.tls.is_none()
    }
}

impl std::fmt::Debug for BrokerAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerAccess")
            .field("login", &self.login.is_some())
            .field("tls", &self.tls)
            .field("refused", &self.refused)
            .finish()
    }
}

/// How often one user name's refusals are logged.
pub const LOG_EVERY: Duration = Duration::from_secs(60);
/// User names remembered for [`LOG_EVERY`]; past this, new names go unlogged (still
/// counted) until old ones expire, so a flood of names cannot grow memory.
const MAX_NAMES: usize = 1024;

/// When a refused CONNECT is worth a log line: the first for a user name, then at most
/// one per [`LOG_EVERY`]. Pure: the caller passes the time.
#[derive(Debug, Default)]
pub struct RefusalLog {
    /// User name -> when it was last logged, and the refusals since.
    names: HashMap<String, (Instant, u64)>,
}

impl RefusalLog {
    /// Notes a refusal for `user` (empty: anonymous) at `now`. Returns the refusals
    /// to report in a log line now (this one and those held back since the last line),
    /// or `None` to stay quiet.
    pub fn refused(&mut self, user: &str, now: Instant) -> Option<u64> {
        if let Some((last, held)) = self.names.get_mut(user) {
            *held += 1;
            if now.duration_since(*last) < LOG_EVERY {
                return None;
            }
            let n = *held;
            *last = now;
            *held = 0;
            return Some(n);
        }
        if self.names.len() >= MAX_NAMES {
            self.names
                .retain(|_, (last, _)| now.duration_since(*last) < LOG_EVERY);
            if self.names.len() >= MAX_NAMES {
                return None;
            }
        }
        self.names.insert(user.to_string(), (now, 0));
        Some(1)
    }
}

/// A user name fit for a log line: at most 64 characters, control characters escaped
/// (it comes from whoever connected).
pub fn shown_user(user: &str) -> String {
    if user.is_empty() {
        return "(none)".to_string();
    }
    let cut: String = user.chars().take(64).collect();
    let more = if cut.len() < user.len() { "…" } else { "" };
    format!("{:?}{more}", cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_minute_per_user_name() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        assert_eq!(log.refused("x", t0), Some(1));
        assert_eq!(log.refused("x", t0 + Duration::from_secs(1)), None);
        assert_eq!(log.refused("", t0 + Duration::from_secs(2)), Some(1));
        assert_eq!(log.refused("x", t0 + Duration::from_secs(59)), None);
        // The line a minute later reports the two held back and this one.
        assert_eq!(log.refused("x", t0 + Duration::from_secs(60)), Some(3));
        assert_eq!(log.refused("x", t0 + Duration::from_secs(61)), None);
    }

    #[test]
    fn a_flood_of_names_is_bounded() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        for i in 0..MAX_NAMES {
            assert_eq!(log.refused(&format!("u{i}"), t0), Some(1));
        }
        assert_eq!(log.refused("one-more", t0), None);
        assert_eq!(log.names.len(), MAX_NAMES);
        // Once the old names expire, new ones are logged again.
        assert_eq!(log.refused("one-more", t0 + LOG_EVERY), Some(1));
        assert_eq!(log.names.len(), 1);
    }

    #[test]
    fn user_names_are_escaped_and_cut() {
        assert_eq!(shown_user(""), "(none)");
        assert_eq!(shown_user("a\nb"), "\"a\\nb\"");
        let long = "x".repeat(100);
        assert_eq!(shown_user(&long), format!("{:?}…", "x".repeat(64)));
    }
}
