//! The documented service backend ticket API (`service-backend-api.md`, v1.1) as a
//! [`TicketBackend`]: `POST /api/v1/tickets` under an Idempotency-Key,
//! `POST /api/v1/tickets/{ticket_id}/events`, `GET /api/v1/tickets/{ticket_id}`, a bearer
//! token on every request, over reqwest with rustls (ring), native roots plus an optional
//! CA file.
//!
//! [`classify`] and [`classify_status_read`] are the pure part (no I/O, no clock): what an
//! answer means, per the API's table. The token is never logged, nor are bodies.

use super::{clip, parse_retry_after, Reply, StatusRead, TicketBackend};
use crate::config::{read_secret, BackendSection, SecretFileError};
use crate::sla_watch::StatusChange;
use futures::future::BoxFuture;
use jiff::Timestamp;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// At most this much of an answer's body is read.
const MAX_ANSWER: usize = 64 * 1024;
/// Where tickets are created; events and status reads are below it.
const TICKETS: &str = "/api/v1/tickets";

/// How the gateway reaches the service API.
#[derive(Clone)]
pub struct ServiceApiConfig {
    /// Base URL; `/api/v1/tickets` is appended.
    pub url: String,
    /// The bearer token. Never printed (see the `Debug` impl).
    pub token: String,
    /// Extra CA certificates (PEM) to trust.
    pub ca_file: Option<PathBuf>,
    /// Per-request timeout (connect, send and answer).
    pub timeout: Duration,
}

impl std::fmt::Debug for ServiceApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceApiConfig")
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .field("ca_file", &self.ca_file)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Why the service API cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The token file (the message names the file, never the token).
    #[error("backend token: {0}")]
    Token(#[source] SecretFileError),
    #[error("backend url {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot read {}: {source}", path.display())]
    ReadCa {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not PEM certificates: {source}", path.display())]
    NotPem {
        path: PathBuf,
        source: reqwest::Error,
    },
    #[error("{}: no certificate in it", path.display())]
    NoCertificate { path: PathBuf },
    #[error("HTTP client: {0}")]
    Client(reqwest::Error),
}

impl ServiceApiConfig {
    /// `url` and `token` with no extra CA and a 10 s timeout.
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> Self {
        ServiceApiConfig {
            url: url.into(),
            token: token.into(),
            ca_file: None,
            timeout: Duration::from_secs(10),
        }
    }

    /// From the config file's `[backend]` section: reads the token file and checks the URL
    /// and the CA file, so mistakes show at start.
    pub fn from_section(s: &BackendSection) -> Result<Self, SetupError> {
        let token = read_secret(&s.token_file).map_err(SetupError::Token)?;
        let url = reqwest::Url::parse(&s.url).map_err(|e| SetupError::Url {
            url: s.url.clone(),
            reason: e.to_string(),
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(SetupError::Url {
                url: s.url.clone(),
                reason: "must be https:// (or http://)".into(),
            });
        }
        if let Some(p) = &s.ca_file {
            load_ca(p)?;
        }
        Ok(ServiceApiConfig {
            ca_file: s.ca_file.clone(),
            timeout: s.timeout.0,
            ..ServiceApiConfig::new(s.url.clone(), token)
        })
    }

    fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.url.trim_end_matches('/'))
    }
}

/// The service API over HTTP(S).
pub struct ServiceApi {
    cfg: ServiceApiConfig,
    client: reqwest::Client,
}

impl std::fmt::Debug for ServiceApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceApi")
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl ServiceApi {
    /// The HTTP client for `cfg`: rustls, native roots plus the CA file's certificates, the
    /// timeout. Warns when the token would travel in clear text to another machine.
    pub fn new(cfg: ServiceApiConfig) -> Result<Self, SetupError> {
        if cfg.url.starts_with("http://") && !is_loopback(&cfg.url) {
            tracing::warn!(url = %cfg.url, "the backend URL is plain http: the token travels unencrypted");
        }
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .user_agent(concat!("tend-gateway/", env!("CARGO_PKG_VERSION")));
        if let Some(p) = &cfg.ca_file {
            for c in load_ca(p)? {
                b = b.add_root_certificate(c);
            }
        }
        let client = b.build().map_err(SetupError::Client)?;
        Ok(ServiceApi { cfg, client })
    }

    /// A POST of `document` under `key`, the answer classified.
    async fn post(
        &self,
        target: Target<'_>,
        path: &str,
        key: &str,
        document: &serde_json::Value,
    ) -> Reply<String> {
        if !valid_key(key) {
            return Reply::Refused {
                reason: "the Idempotency-Key is not 1-128 printable ASCII characters".into(),
            };
        }
        let body = match serde_json::to_vec(document) {
            Ok(b) => b,
            // Never an empty body in its place: the key would then stand for that.
            Err(e) => {
                return Reply::Refused {
                    reason: clip(&format!("the body cannot be serialised: {e}")),
                }
            }
        };
        let req = self
            .client
            .post(self.cfg.endpoint(path))
            .bearer_auth(&self.cfg.token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", key)
            .body(body);
        let answered = self.answer_of(req).await;
        let now = Timestamp::now();
        match &answered {
            Ok(a) => classify(target, a.as_answer(), now),
            Err(e) => classify(
                target,
                Answer::NoAnswer {
                    error: &describe(e),
                },
                now,
            ),
        }
    }

    /// Sends `req` and reads what came back.
    async fn answer_of(&self, req: reqwest::RequestBuilder) -> Result<HttpAnswer, reqwest::Error> {
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = read_body(resp).await?;
        Ok(HttpAnswer {
            status,
            retry_after,
            body,
        })
    }
}

impl TicketBackend for ServiceApi {
    fn location(&self) -> &str {
        &self.cfg.url
    }

    fn create_ticket<'a>(
        &'a self,
        key: &'a str,
        document: &'a serde_json::Value,
    ) -> BoxFuture<'a, Reply<String>> {
        Box::pin(self.post(Target::Create, TICKETS, key, document))
    }

    fn add_event<'a>(
        &'a self,
        ticket_id: &'a str,
        key: &'a str,
        document: &'a serde_json::Value,
    ) -> BoxFuture<'a, Reply<()>> {
        Box::pin(async move {
            let path = format!("{TICKETS}/{}/events", segment(ticket_id));
            self.post(Target::Event { ticket_id }, &path, key, document)
                .await
                .map(|_| ())
        })
    }

    fn ticket_status<'a>(&'a self, ticket_id: &'a str) -> BoxFuture<'a, Reply<StatusRead>> {
        Box::pin(async move {
            let url = self
                .cfg
                .endpoint(&format!("{TICKETS}/{}", segment(ticket_id)));
            let req = self.client.get(url).bearer_auth(&self.cfg.token);
            let answered = self.answer_of(req).await;
            let now = Timestamp::now();
            match &answered {
                Ok(a) => classify_status_read(a.as_answer(), now),
                Err(e) => classify_status_read(
                    Answer::NoAnswer {
                        error: &describe(e),
                    },
                    now,
                ),
            }
        })
    }
}

/// An answer as read off the wire.
struct HttpAnswer {
    status: u16,
    retry_after: Option<String>,
    body: String,
}

impl HttpAnswer {
    fn as_answer(&self) -> Answer<'_> {
        Answer::Http {
            status: self.status,
            retry_after: self.retry_after.as_deref(),
            body: &self.body,
        }
    }
}

/// What a request was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// `POST /api/v1/tickets`.
    Create,
    /// `POST /api/v1/tickets/{ticket_id}/events`.
    Event { ticket_id: &'a str },
}

/// What came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer<'a> {
    Http {
        status: u16,
        /// The `Retry-After` header.
        retry_after: Option<&'a str>,
        body: &'a str,
    },
    /// Connection refused, timeout, reset, TLS failure, ...
    NoAnswer { error: &'a str },
}

/// What an answer to a create or an event means, per the API's table:
///
/// - 200/201 with a `ticket_id` → accepted with it (for an event any 2xx is, with the
///   event's ticket id; a create answered without a ticket id is retried);
/// - 400, 409, 413, and 404 for an event → refused, with the status and the backend's
///   `error` text;
/// - 401, 403 → unauthorized (credentials are wrong: keep everything, retry slowly);
/// - 429, 5xx, any other status, no answer → retry later, not before `Retry-After` when
///   given (read at `now`).
pub fn classify(target: Target<'_>, answer: Answer<'_>, now: Timestamp) -> Reply<String> {
    let (status, retry_after, body) = match answer {
        Answer::NoAnswer { error } => {
            return Reply::RetryLater {
                retry_after: None,
                reason: clip(&format!("no answer: {error}")),
            }
        }
        Answer::Http {
            status,
            retry_after,
            body,
        } => (status, retry_after, body),
    };
    let retry_after = retry_after.and_then(|v| parse_retry_after(v, now));
    match (status, target) {
        (200..=299, Target::Create) => match ticket_id_of(body) {
            Some(id) => Reply::Accepted(id),
            None => Reply::RetryLater {
                retry_after,
                reason: clip(&format!(
                    "{status} without a ticket_id: {}",
                    error_text(body)
                )),
            },
        },
        (200..=299, Target::Event { ticket_id }) => Reply::Accepted(ticket_id.to_string()),
        (400 | 409 | 413, _) | (404, Target::Event { .. }) => Reply::Refused {
            reason: status_error(status, body),
        },
        (401 | 403, _) => Reply::Unauthorized {
            retry_after,
            reason: status_error(status, body),
        },
        _ => Reply::RetryLater {
            retry_after,
            reason: status_error(status, body),
        },
    }
}

/// What an answer to `GET /api/v1/tickets/{ticket_id}` means: 200 with a `status` →
/// accepted with it; 401, 403 → unauthorized; 429, 5xx, no answer → retry later (the other
/// tickets' reads are no use now); any other status, or a 200 without a status → refused
/// (this ticket's read; the next ticket's may work).
pub fn classify_status_read(answer: Answer<'_>, now: Timestamp) -> Reply<StatusRead> {
    let (status, retry_after, body) = match answer {
        Answer::NoAnswer { error } => {
            return Reply::RetryLater {
                retry_after: None,
                reason: clip(error),
            }
        }
        Answer::Http {
            status,
            retry_after,
            body,
        } => (status, retry_after, body),
    };
    let retry_after = retry_after.and_then(|v| parse_retry_after(v, now));
    match status {
        200 => serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| status_read(&v))
            .map_or_else(
                || Reply::Refused {
                    reason: "the backend's status answer has no status".into(),
                },
                Reply::Accepted,
            ),
        401 | 403 => Reply::Unauthorized {
            retry_after,
            reason: status_error(status, body),
        },
        429 | 500..=599 => Reply::RetryLater {
            retry_after,
            reason: status_error(status, body),
        },
        _ => Reply::Refused {
            reason: status_error(status, body),
        },
    }
}

/// The status of a read answer and, when the backend sends one (v1.1), its history. An
/// entry of the history that cannot be read (no status, a time that is not RFC 3339) is
/// left out rather than failing the read: the status itself is what matters most.
fn status_read(v: &serde_json::Value) -> Option<StatusRead> {
    let status = v.get("status")?.as_str()?.to_string();
    let history = v.get("history").and_then(|h| h.as_array()).map(|items| {
        items
            .iter()
            .filter_map(|c| {
                Some(StatusChange {
                    status: c.get("status")?.as_str()?.to_string(),
                    at: c.get("at")?.as_str()?.parse().ok()?,
                })
            })
            .collect::<Vec<_>>()
    });
    Some(StatusRead { status, history })
}

/// The backend's reason from an answer body: its `error` field when it is JSON with one,
/// else the text itself; control characters blanked, at most
/// [`MAX_ERROR_TEXT`](super::MAX_ERROR_TEXT) characters.
pub fn error_text(body: &str) -> String {
    let from_json = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| match v.get("error") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(other) => Some(other.to_string()),
            None => None,
        });
    clip(from_json.as_deref().unwrap_or(body).trim())
}

fn status_error(status: u16, body: &str) -> String {
    let text = error_text(body);
    let reason = reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason());
    let line = match (text.is_empty(), reason) {
        (false, _) => format!("{status}: {text}"),
        (true, Some(r)) => format!("{status} {r}"),
        (true, None) => format!("{status}"),
    };
    clip(&line)
}

fn ticket_id_of(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let id = v.get("ticket_id")?.as_str()?;
    (!id.is_empty()).then(|| id.to_string())
}

/// An Idempotency-Key the backend accepts: 1–128 printable ASCII characters.
fn valid_key(k: &str) -> bool {
    (1..=128).contains(&k.len()) && k.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// A path segment with everything but unreserved characters percent-encoded.
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn load_ca(path: &Path) -> Result<Vec<reqwest::Certificate>, SetupError> {
    let pem = std::fs::read(path).map_err(|source| SetupError::ReadCa {
        path: path.to_path_buf(),
        source,
    })?;
    let certs =
        reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| SetupError::NotPem {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(SetupError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn is_loopback(url: &str) -> bool {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .is_some_and(|h| h == "localhost" || h == "127.0.0.1" || h == "[::1]")
}

/// Up to [`MAX_ANSWER`] bytes of the answer, as text.
async fn read_body(mut resp: reqwest::Response) -> Result<String, reqwest::Error> {
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = MAX_ANSWER.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if buf.len() >= MAX_ANSWER {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// A transport error with its causes ("timed out", "connection refused", ...).
fn describe(e: &reqwest::Error) -> String {
    let mut s = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(c) = source {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = c.source();
    }
    clip(&s)
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{MAX_ERROR_TEXT, MAX_RETRY_AFTER};
    use crate::forwarder::{backoff, outcome_label, schedule, Backoff};
    use crate::store::JobOutcome;
    use tend_testkit::config::write_secret;

    /// The answer classified and scheduled as the forwarder does: what a job becomes.
    fn classify(
        target: Target<'_>,
        answer: Answer<'_>,
        failures_in_a_row: u32,
        now: Timestamp,
        jitter: f64,
        policy: &Backoff,
    ) -> JobOutcome {
        schedule(
            super::classify(target, answer, now),
            failures_in_a_row,
            now,
            jitter,
            policy,
        )
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    const NOW: &str = "2026-11-28T02:15:02Z";

    fn policy() -> Backoff {
        Backoff {
            min: Duration::from_millis(500),
            max: Duration::from_secs(300),
        }
    }

    fn http<'a>(status: u16, retry_after: Option<&'a str>, body: &'a str) -> Answer<'a> {
        Answer::Http {
            status,
            retry_after,
            body,
        }
    }

    fn after(o: &JobOutcome) -> Duration {
        match o {
            JobOutcome::Retry { next_attempt, .. } => {
                Duration::try_from(next_attempt.duration_since(ts(NOW))).unwrap()
            }
            other => panic!("not a retry: {other:?}"),
        }
    }

    #[test]
    fn every_status_has_a_meaning() {
        let p = policy();
        let now = ts(NOW);
        let ok = r#"{"ticket_id": "T-2026-000123", "created": true}"#;
        for status in 100..=599u16 {
            for target in [Target::Create, Target::Event { ticket_id: "T-9" }] {
                let o = classify(target, http(status, None, ok), 1, now, 0.5, &p);
                let want = match (status, target) {
                    (200..=299, Target::Create) => "sent",
                    (200..=299, Target::Event { .. }) => "sent",
                    (400 | 409 | 413, _) => "failed",
                    (404, Target::Event { .. }) => "failed",
                    _ => "retry",
                };
                assert_eq!(outcome_label(&o), want, "status {status} {target:?}");
                match (&o, target) {
                    (JobOutcome::Sent { ticket_id }, Target::Create) => {
                        assert_eq!(ticket_id, "T-2026-000123")
                    }
                    (JobOutcome::Sent { ticket_id }, Target::Event { .. }) => {
                        assert_eq!(ticket_id, "T-9")
                    }
                    (JobOutcome::Retry { error, .. } | JobOutcome::Failed { error }, _) => {
                        assert!(error.starts_with(&status.to_string()), "{error}")
                    }
                }
                if let JobOutcome::Retry { .. } = o {
                    let d = after(&o);
                    if matches!(status, 401 | 403) {
                        assert_eq!(d, p.max, "status {status}");
                    } else {
                        assert_eq!(d, p.min, "status {status}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_create_answered_without_a_ticket_id_is_retried() {
        let p = policy();
        let now = ts(NOW);
        for body in [
            "",
            "{}",
            r#"{"ticket_id": ""}"#,
            r#"{"ticket_id": 7}"#,
            "<html>ok</html>",
        ] {
            for status in [200, 201, 202, 204] {
                let o = classify(Target::Create, http(status, None, body), 1, now, 0.0, &p);
                assert_eq!(outcome_label(&o), "retry", "{status} {body:?}");
                let JobOutcome::Retry { error, .. } = o else {
                    unreachable!()
                };
                assert!(error.contains("without a ticket_id"), "{error}");
            }
        }
        // 200 is "already existed": a success like 201.
        let o = classify(
            Target::Create,
            http(200, None, r#"{"ticket_id":"T-1","created":false}"#),
            1,
            now,
            0.0,
            &p,
        );
        assert_eq!(
            o,
            JobOutcome::Sent {
                ticket_id: "T-1".into()
            }
        );
    }

    #[test]
    fn permanent_refusals_keep_the_backends_reason() {
        let p = policy();
        let now = ts(NOW);
        let o = classify(
            Target::Create,
            http(
                400,
                None,
                r#"{"error": "fault.class: unknown value \"huge\""}"#,
            ),
            3,
            now,
            0.5,
            &p,
        );
        assert_eq!(
            o,
            JobOutcome::Failed {
                error: "400: fault.class: unknown value \"huge\"".into()
            }
        );
        let o = classify(
            Target::Create,
            http(409, None, r#"{"error":"key reused with another body"}"#),
            1,
            now,
            0.5,
            &p,
        );
        assert_eq!(
            o,
            JobOutcome::Failed {
                error: "409: key reused with another body".into()
            }
        );
        // No body: the reason phrase.
        let o = classify(Target::Create, http(413, None, ""), 1, now, 0.5, &p);
        assert_eq!(
            o,
            JobOutcome::Failed {
                error: "413 Payload Too Large".into()
            }
        );
        let o = classify(
            Target::Event { ticket_id: "T-1" },
            http(404, None, r#"{"error":"no ticket T-1"}"#),
            1,
            now,
            0.5,
            &p,
        );
        assert_eq!(
            o,
            JobOutcome::Failed {
                error: "404: no ticket T-1".into()
            }
        );
        // A 404 on create means a wrong base URL: kept and retried, not failed.
        let o = classify(
            Target::Create,
            http(404, None, "not found"),
            1,
            now,
            0.5,
            &p,
        );
        assert_eq!(outcome_label(&o), "retry");
        // Not JSON: the text itself; a non-string error: its JSON.
        assert_eq!(error_text("  bad things\n"), "bad things");
        assert_eq!(
            error_text(r#"{"error": {"field": "kind"}}"#),
            r#"{"field":"kind"}"#
        );
        assert_eq!(error_text(r#"{"message": "x"}"#), r#"{"message": "x"}"#);
    }

    #[test]
    fn error_text_is_truncated_and_has_no_control_characters() {
        let long = format!(r#"{{"error": "{}"}}"#, "é".repeat(5000));
        let e = error_text(&long);
        assert_eq!(e.chars().count(), MAX_ERROR_TEXT);
        assert!(e.ends_with('…'));
        let e = error_text("line one\r\nline\ttwo\u{1b}[31m");
        assert!(!e.chars().any(char::is_control), "{e:?}");
        let exactly = "x".repeat(MAX_ERROR_TEXT);
        assert_eq!(error_text(&exactly), exactly);
        let o = classify(
            Target::Create,
            http(400, None, &long),
            1,
            ts(NOW),
            0.0,
            &policy(),
        );
        let JobOutcome::Failed { error } = o else {
            panic!()
        };
        assert!(error.chars().count() <= MAX_ERROR_TEXT);
    }

    #[test]
    fn retry_after_is_a_lower_bound() {
        let p = policy();
        let now = ts(NOW);
        // 429: the later of Retry-After and the backoff.
        let o = classify(Target::Create, http(429, Some("2"), ""), 1, now, 0.5, &p);
        assert_eq!(after(&o), Duration::from_secs(2));
        let o = classify(Target::Create, http(429, Some("2"), ""), 10, now, 1.0, &p);
        assert_eq!(after(&o), backoff(&p, 10, 1.0));
        assert!(after(&o) > Duration::from_secs(2));
        let o = classify(Target::Create, http(429, None, ""), 1, now, 0.5, &p);
        assert_eq!(after(&o), p.min);
        let o = classify(Target::Create, http(429, Some("soon"), ""), 1, now, 0.5, &p);
        assert_eq!(after(&o), p.min);
        // An HTTP date.
        let o = classify(
            Target::Create,
            http(429, Some("Sat, 28 Nov 2026 02:16:02 GMT"), ""),
            1,
            now,
            0.5,
            &p,
        );
        assert_eq!(after(&o), Duration::from_secs(60));
        // 503 with Retry-After too.
        let o = classify(Target::Create, http(503, Some("30"), ""), 1, now, 0.5, &p);
        assert_eq!(after(&o), Duration::from_secs(30));
        // 401 waits max, or longer when told.
        let o = classify(Target::Create, http(401, Some("1"), ""), 1, now, 0.5, &p);
        assert_eq!(after(&o), p.max);
        let o = classify(Target::Create, http(403, Some("600"), ""), 1, now, 0.5, &p);
        assert_eq!(after(&o), Duration::from_secs(600));
        // Absurd values are capped.
        let o = classify(
            Target::Create,
            http(429, Some("99999999999999999999999"), ""),
            1,
            now,
            0.5,
            &p,
        );
        assert_eq!(after(&o), MAX_RETRY_AFTER);
    }

    #[test]
    fn no_answer_is_transient() {
        let p = policy();
        let now = ts(NOW);
        for n in 1..20 {
            let o = classify(
                Target::Create,
                Answer::NoAnswer {
                    error: "cannot connect: Connection refused (os error 111)",
                },
                n,
                now,
                0.5,
                &p,
            );
            assert_eq!(after(&o), backoff(&p, n, 0.5));
            let JobOutcome::Retry { error, .. } = o else {
                unreachable!()
            };
            assert!(error.contains("Connection refused"), "{error}");
        }
    }

    #[test]
    fn a_status_read_stops_the_round_only_when_the_backend_cannot_answer_now() {
        let now = ts(NOW);
        let read = |status, body| classify_status_read(http(status, None, body), now);
        assert_eq!(
            read(200, r#"{"ticket_id": "T-1", "status": "on_site"}"#),
            Reply::Accepted(StatusRead::bare("on_site"))
        );
        // A v1.1 answer: the history, an unreadable entry left out.
        let Reply::Accepted(r) = read(
            200,
            r#"{"ticket_id": "T-1", "status": "on_site", "history": [
                {"status": "open", "at": "2026-11-28T10:40:12+08:00"},
                {"status": "acknowledged", "at": "yesterday"},
                {"status": "on_site", "at": "2026-11-28T12:02:00+08:00"}]}"#,
        ) else {
            panic!("not accepted")
        };
        let h = r.history.unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(
            (h[1].status.as_str(), h[1].at.to_string().as_str()),
            ("on_site", "2026-11-28T04:02:00Z")
        );
        // This ticket's read failed; the next ticket's may work.
        for (status, body) in [
            (200, "{}"),
            (200, "<html/>"),
            (404, ""),
            (400, ""),
            (302, ""),
        ] {
            assert!(
                matches!(read(status, body), Reply::Refused { .. }),
                "{status} {body:?}"
            );
        }
        // No use reading the other tickets now.
        for status in [401, 403] {
            assert!(matches!(read(status, ""), Reply::Unauthorized { .. }));
        }
        for status in [429, 500, 503, 599] {
            let Reply::RetryLater { reason, .. } = read(status, "") else {
                panic!("{status}")
            };
            assert!(reason.starts_with(&status.to_string()), "{reason}");
        }
        let o = classify_status_read(Answer::NoAnswer { error: "timed out" }, now);
        assert_eq!(
            o,
            Reply::RetryLater {
                retry_after: None,
                reason: "timed out".into()
            }
        );
    }

    #[test]
    fn an_unusable_key_is_refused_without_a_request() {
        let api = ServiceApi::new(ServiceApiConfig::new("http://127.0.0.1:9", "t")).unwrap();
        let doc = serde_json::json!({});
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let r = rt.block_on(api.create_ticket("ключ", &doc));
        let Reply::Refused { reason } = r else {
            panic!("{r:?}")
        };
        assert!(reason.contains("Idempotency-Key"), "{reason}");
    }

    #[test]
    fn debug_hides_the_token() {
        let cfg = ServiceApiConfig::new("https://service.example.com", "s3cr3t-t0ken");
        let text = format!("{cfg:?}");
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(text.contains("service.example.com"));
    }

    #[test]
    fn from_section_reads_the_token_file() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        write_secret(&token, "  abc123\n").unwrap();
        let mut s = BackendSection {
            kind: crate::backend::BackendKind::ServiceApi,
            url: "https://service.example.com/".into(),
            token_file: token.clone(),
            ca_file: None,
            timeout: tend_profiles::units::Dur(Duration::from_secs(3)),
            status_poll: tend_profiles::units::Dur(Duration::from_secs(60)),
        };
        let cfg = ServiceApiConfig::from_section(&s).unwrap();
        assert_eq!(cfg.token, "abc123");
        assert_eq!(cfg.timeout, Duration::from_secs(3));
        assert_eq!(
            cfg.endpoint("/api/v1/tickets"),
            "https://service.example.com/api/v1/tickets"
        );
        s.url = "ftp://x".into();
        assert!(ServiceApiConfig::from_section(&s).is_err());
        s.url = "https://service.example.com".into();
        s.ca_file = Some(token.clone());
        let e = ServiceApiConfig::from_section(&s).unwrap_err().to_string();
        assert!(e.contains("certificate"), "{e}");
        assert!(!e.contains("abc123"), "{e}");
        s.ca_file = None;
        s.token_file = dir.path().join("missing");
        assert!(ServiceApiConfig::from_section(&s).is_err());
    }

    #[test]
    fn keys_and_segments() {
        assert!(valid_key("tend-t:agent/dev/ALM1.4/1"));
        assert!(!valid_key(""));
        assert!(!valid_key(&"k".repeat(129)));
        assert!(!valid_key("bad\u{7f}"));
        assert!(!valid_key("ключ"));
        assert_eq!(segment("T-2026-000001"), "T-2026-000001");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
    }
}
