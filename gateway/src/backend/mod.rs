//! The seam between the forwarder and a ticket system: what the forwarder needs from a
//! backend (open a ticket, add an event to it, read its status) and what each answer means
//! for it, whatever the wire underneath.
//!
//! A backend turns its own answers (HTTP statuses, headers, bodies, ...) into a [`Reply`];
//! the forwarder keeps the queue, the back-off with jitter and the job bookkeeping, and
//! honours a reply's `retry_after`. The documented service backend API is
//! [`service_api`]; another ticket system is one more module here, a [`BackendKind`] and
//! an arm in [`from_section`].

pub mod service_api;

use crate::config::BackendSection;
use jiff::Timestamp;
use serde::Deserialize;
use std::time::Duration;

/// The future a [`TicketBackend`] method returns (re-exported: a backend needs no other
/// crate for it).
pub use futures::future::BoxFuture;

/// A backend's text (an error, a status) is kept up to this many characters.
pub const MAX_ERROR_TEXT: usize = 300;
/// A `Retry-After` longer than this is taken as this (a broken header must not stop the
/// forwarder for weeks).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Which ticket system `[backend]` names (`kind`, default `"service-api"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// The documented service backend ticket API (`/api/v1/tickets`), [`service_api`].
    #[default]
    ServiceApi,
}

/// What a backend made of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<T> {
    /// Done: for a ticket, the backend's ticket id (also when the key had been seen
    /// before); for a status read, the status.
    Accepted(T),
    /// Not now (the backend is busy, down or unreachable, or answered oddly): keep the
    /// request and try again, not before `retry_after` when the backend named a pause.
    RetryLater {
        retry_after: Option<Duration>,
        reason: String,
    },
    /// Never as it is (the body is wrong, the key was reused, the ticket is unknown):
    /// keep it, show the backend's reason, do not resend it unchanged.
    Refused { reason: String },
    /// The backend refused the credentials: keep everything, retry slowly, alert.
    Unauthorized {
        retry_after: Option<Duration>,
        reason: String,
    },
}

impl<T> Reply<T> {
    /// The same reply with the accepted value mapped.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Reply<U> {
        match self {
            Reply::Accepted(v) => Reply::Accepted(f(v)),
            Reply::RetryLater {
                retry_after,
                reason,
            } => Reply::RetryLater {
                retry_after,
                reason,
            },
            Reply::Refused { reason } => Reply::Refused { reason },
            Reply::Unauthorized {
                retry_after,
                reason,
            } => Reply::Unauthorized {
                retry_after,
                reason,
            },
        }
    }
}

/// A ticket system the forwarder sends to. Documents are what the ticket decision built
/// (`crate::ticket`, the service API's `service-ticket/1` schema and event bodies) and the
/// store kept; a key always goes with the same document, so a backend with another schema
/// must translate the same document the same way every time. Statuses are in the service
/// API's words (`open`, `acknowledged`, ..., `resolved`, `closed`: the last two close the
/// ticket); a backend with other words translates.
///
/// Futures are boxed so the forwarder can hold whichever backend the config chose.
pub trait TicketBackend: Send + Sync {
    /// Where the backend is, for logs (never a secret).
    fn location(&self) -> &str;

    /// Opens the ticket `document` under its Idempotency-Key `key` (the same key again is
    /// the same ticket). Accepted with the backend's ticket id.
    fn create_ticket<'a>(
        &'a self,
        key: &'a str,
        document: &'a serde_json::Value,
    ) -> BoxFuture<'a, Reply<String>>;

    /// Adds the event `document` under its own key `key` to the ticket `ticket_id`.
    fn add_event<'a>(
        &'a self,
        ticket_id: &'a str,
        key: &'a str,
        document: &'a serde_json::Value,
    ) -> BoxFuture<'a, Reply<()>>;

    /// Reads the status of the ticket `ticket_id` (and its history, from a v1.1 backend).
    fn ticket_status<'a>(&'a self, ticket_id: &'a str) -> BoxFuture<'a, Reply<StatusRead>>;
}

/// What a read of a ticket gave: its status now and, from a v1.1 backend, every change
/// with its time (oldest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusRead {
    pub status: String,
    pub history: Option<Vec<crate::sla_watch::StatusChange>>,
}

impl StatusRead {
    /// A status without history (a v1 backend).
    pub fn bare(status: &str) -> StatusRead {
        StatusRead {
            status: status.to_string(),
            history: None,
        }
    }
}

/// Why a backend cannot be set up from its config section.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    ServiceApi(#[from] service_api::SetupError),
}

/// The backend `[backend]` describes, its settings checked (token read, URL and CA file
/// checked, so mistakes show at start).
pub fn from_section(section: &BackendSection) -> Result<Box<dyn TicketBackend>, BackendError> {
    match section.kind {
        BackendKind::ServiceApi => Ok(Box::new(service_api::ServiceApi::new(
            service_api::ServiceApiConfig::from_section(section)?,
        )?)),
    }
}

/// At most [`MAX_ERROR_TEXT`] characters, control characters as spaces: a backend's text
/// is safe to log and to show.
pub fn clip(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(MAX_ERROR_TEXT)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.chars().nth(MAX_ERROR_TEXT).is_some() {
        out.pop();
        out.push('…');
    }
    out
}

/// An HTTP `Retry-After` as a pause from `now`: delta-seconds or an HTTP date (a date in
/// the past is no pause). At most [`MAX_RETRY_AFTER`]. `None` when unreadable.
pub fn parse_retry_after(value: &str, now: Timestamp) -> Option<Duration> {
    let v = value.trim();
    let d = if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for a u64 is surely more than the cap.
        Duration::from_secs(v.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = jiff::fmt::rfc2822::DateTimeParser::new()
            .parse_timestamp(v)
            .ok()?;
        Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO)
    };
    Some(d.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_values() {
        let now: Timestamp = "2026-11-28T02:15:02Z".parse().unwrap();
        assert_eq!(parse_retry_after("0", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("1.5", now), None);
        assert_eq!(parse_retry_after("", now), None);
        assert_eq!(
            parse_retry_after("Sat, 28 Nov 2026 02:15:12 GMT", now),
            Some(Duration::from_secs(10))
        );
        // In the past: no pause.
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("99999999", now), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn clip_blanks_control_characters_and_truncates() {
        assert_eq!(clip("a\r\nb"), "a  b");
        let long = "é".repeat(MAX_ERROR_TEXT + 1);
        let c = clip(&long);
        assert_eq!(c.chars().count(), MAX_ERROR_TEXT);
        assert!(c.ends_with('…'));
        let exactly = "x".repeat(MAX_ERROR_TEXT);
        assert_eq!(clip(&exactly), exactly);
    }

    #[test]
    fn a_reply_maps_only_what_was_accepted() {
        assert_eq!(Reply::Accepted(2).map(|x| x * 2), Reply::Accepted(4));
        let r: Reply<u8> = Reply::Refused {
            reason: "no".into(),
        };
        assert_eq!(
            r.map(|x| x * 2),
            Reply::Refused {
                reason: "no".into()
            }
        );
    }
}
