//! The forwarder: sends the tickets and ticket events that ingest queued in the store's
//! outbox to the service backend (`service-backend-api.md`), and reads back the status of
//! the tickets still open.
//!
//! - Jobs go in outbox order. A ticket is created with `POST /api/v1/tickets` under its
//!   Idempotency-Key and the exact body stored when it was decided, so a retry (also after
//!   a restart) never opens a second ticket. An event waits until its ticket has a backend
//!   id, and the events of one ticket go in order.
//! - Every outcome is stored before the next job ([`GatewayStore::finish_job`]): sent, failed for
//!   good (400, 409, 413, 404 for an event: kept and shown with the backend's reason, never
//!   resent unchanged), or to be retried.
//! - A transient outcome (5xx, 429, no answer, timeout) pauses the whole backend, not just
//!   the job: exponential backoff with jitter, `Retry-After` honoured as a lower bound.
//!   Wrong credentials (401, 403) keep everything and retry slowly, with an alert.
//! - The token is never logged, nor are bodies: logs name the ticket key, the status and
//!   the backend's error text.
//!
//! [`classify`] and [`backoff`] are the pure part (no I/O, no clock): what an answer means.

use crate::app::Gateway;
use crate::config::{read_secret, BackendSection};
use crate::metrics::Metrics;
use crate::store::{ForwardState, GatewayStore, Job, JobOutcome, StoreError};
use jiff::{SignedDuration, Timestamp};
use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Shortest pause after a transient failure.
pub const DEFAULT_MIN_BACKOFF: Duration = Duration::from_millis(500);
/// Longest pause; also the pause after 401/403.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(300);
/// A `Retry-After` longer than this is taken as this (a broken header must not stop the
/// forwarder for weeks).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);
/// The backend's error text is kept up to this many characters.
pub const MAX_ERROR_TEXT: usize = 300;
/// With nothing due, the forwarder looks at the outbox again after this long anyway.
pub const IDLE_WAKE: Duration = Duration::from_secs(30);
/// At most this much of an answer's body is read.
const MAX_ANSWER: usize = 64 * 1024;

/// How the forwarder reaches the backend.
#[derive(Clone)]
pub struct ForwarderConfig {
    /// Base URL; `/api/v1/tickets` is appended.
    pub url: String,
    /// The bearer token. Never printed (see the `Debug` impl).
    pub token: String,
    /// Extra CA certificates (PEM) to trust.
    pub ca_file: Option<PathBuf>,
    /// Per-request timeout (connect, send and answer).
    pub timeout: Duration,
    /// How often the status of open tickets is read back.
    pub status_poll: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl std::fmt::Debug for ForwarderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwarderConfig")
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .field("ca_file", &self.ca_file)
            .field("timeout", &self.timeout)
            .field("status_poll", &self.status_poll)
            .field("min_backoff", &self.min_backoff)
            .field("max_backoff", &self.max_backoff)
            .finish()
    }
}

impl ForwarderConfig {
    /// `url` and `token` with the defaults: 10 s timeout, status read every 5 min,
    /// backoff from 500 ms to 5 min.
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> Self {
        ForwarderConfig {
            url: url.into(),
            token: token.into(),
            ca_file: None,
            timeout: Duration::from_secs(10),
            status_poll: Duration::from_secs(300),
            min_backoff: DEFAULT_MIN_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
        }
    }

    /// From the config file's `[backend]` section: reads the token file and checks the URL
    /// and the CA file, so mistakes show at start.
    pub fn from_section(s: &BackendSection) -> Result<Self, String> {
        let token = read_secret(&s.token_file)?;
        let url =
            reqwest::Url::parse(&s.url).map_err(|e| format!("backend url {:?}: {e}", s.url))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "backend url {:?}: must be https:// (or http://)",
                s.url
            ));
        }
        if let Some(p) = &s.ca_file {
            load_ca(p)?;
        }
        Ok(ForwarderConfig {
            ca_file: s.ca_file.clone(),
            timeout: s.timeout.0,
            status_poll: s.status_poll.0,
            ..ForwarderConfig::new(s.url.clone(), token)
        })
    }

    pub fn backoff(&self) -> Backoff {
        Backoff {
            min: self.min_backoff,
            max: self.max_backoff,
        }
    }

    fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.url.trim_end_matches('/'))
    }
}

/// The backoff policy: exponential from `min`, doubling per consecutive failure, never
/// above `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn delay(&self, failures_in_a_row: u32, jitter: f64) -> Duration {
        backoff(self, failures_in_a_row, jitter)
    }
}

/// The pause after the `failures_in_a_row`-th consecutive transient failure (1 for the
/// first): the ceiling `min · 2^(n-1)` (at most `max`), with "equal jitter": somewhere
/// between half the ceiling and the ceiling as `jitter` goes from 0 to 1, and never below
/// `min` nor above `max`.
pub fn backoff(policy: &Backoff, failures_in_a_row: u32, jitter: f64) -> Duration {
    let max = policy.max.max(policy.min);
    let doublings = failures_in_a_row.saturating_sub(1).min(31);
    let ceiling = policy.min.saturating_mul(1u32 << doublings).min(max);
    let jitter = if jitter.is_nan() {
        0.0
    } else {
        jitter.clamp(0.0, 1.0)
    };
    let half = ceiling / 2;
    let d = half + (ceiling - half).mul_f64(jitter);
    d.clamp(policy.min, max)
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

/// What an answer means, per the API's table:
///
/// - 200/201 with a `ticket_id` → sent (for an event any 2xx is; a create answered without
///   a ticket id is retried);
/// - 400, 409, 413, and 404 for an event → failed for good, with the status and the
///   backend's `error` text;
/// - 401, 403 → retry after `max` (credentials are wrong: keep everything, retry slowly);
/// - 429 → retry after `Retry-After` or the backoff, whichever is later;
/// - 5xx, any other status, no answer → retry with backoff (`Retry-After` as a lower bound).
///
/// `failures_in_a_row` counts this one (1 after the first failure); `jitter` is in 0..1.
pub fn classify(
    target: Target<'_>,
    answer: Answer<'_>,
    failures_in_a_row: u32,
    now: Timestamp,
    jitter: f64,
    policy: &Backoff,
) -> JobOutcome {
    let wait = |lower: Option<Duration>, error: String| {
        let d = backoff(policy, failures_in_a_row, jitter).max(lower.unwrap_or_default());
        JobOutcome::Retry {
            error,
            next_attempt: add(now, d),
        }
    };
    let (status, retry_after, body) = match answer {
        Answer::NoAnswer { error } => return wait(None, clip(&format!("no answer: {error}"))),
        Answer::Http {
            status,
            retry_after,
            body,
        } => (status, retry_after, body),
    };
    let lower = retry_after.and_then(|v| parse_retry_after(v, now));
    match (status, target) {
        (200..=299, Target::Create) => match ticket_id_of(body) {
            Some(id) => JobOutcome::Sent { ticket_id: id },
            None => wait(
                lower,
                clip(&format!(
                    "{status} without a ticket_id: {}",
                    error_text(body)
                )),
            ),
        },
        (200..=299, Target::Event { ticket_id }) => JobOutcome::Sent {
            ticket_id: ticket_id.to_string(),
        },
        (400 | 409 | 413, _) | (404, Target::Event { .. }) => JobOutcome::Failed {
            error: status_error(status, body),
        },
        (401 | 403, _) => {
            let d = policy.max.max(policy.min).max(lower.unwrap_or_default());
            JobOutcome::Retry {
                error: status_error(status, body),
                next_attempt: add(now, d),
            }
        }
        _ => wait(lower, status_error(status, body)),
    }
}

/// `Retry-After` as a pause from `now`: delta-seconds or an HTTP date (a date in the past
/// is no pause). At most [`MAX_RETRY_AFTER`]. `None` when unreadable.
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

/// The backend's reason from an answer body: its `error` field when it is JSON with one,
/// else the text itself; control characters blanked, at most [`MAX_ERROR_TEXT`] characters.
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

/// At most [`MAX_ERROR_TEXT`] characters, control characters as spaces.
fn clip(s: &str) -> String {
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

fn ticket_id_of(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let id = v.get("ticket_id")?.as_str()?;
    (!id.is_empty()).then(|| id.to_string())
}

fn add(now: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| now.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
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

fn load_ca(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

/// The HTTP client: rustls, native roots plus the CA file's certificates, the timeout.
pub fn client(cfg: &ForwarderConfig) -> Result<reqwest::Client, String> {
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
    b.build().map_err(|e| format!("HTTP client: {e}"))
}

/// Randomness for jitter without a crate: `RandomState` keys are random per process.
struct Jitter {
    state: RandomState,
    n: u64,
}

impl Jitter {
    fn new() -> Self {
        Jitter {
            state: RandomState::new(),
            n: 0,
        }
    }

    /// In 0..1.
    fn next(&mut self) -> f64 {
        let mut h = self.state.build_hasher();
        h.write_u64(self.n);
        self.n += 1;
        (h.finish() >> 11) as f64 / (1u64 << 53) as f64
    }
}

async fn blocking<T: Send + 'static>(
    store: &Arc<dyn GatewayStore>,
    f: impl FnOnce(&dyn GatewayStore) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, String> {
    let s = store.clone();
    match tokio::task::spawn_blocking(move || f(s.as_ref())).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("store task: {e}")),
    }
}

/// What one pass over the outbox found.
#[derive(Debug, Default)]
struct Pass {
    /// Some job left the outbox (sent or failed): look again at once, an event may have
    /// become sendable.
    progressed: bool,
    /// The earliest future `next_attempt` of a job skipped.
    earliest: Option<Timestamp>,
}

struct Forwarder {
    gw: Gateway,
    cfg: ForwarderConfig,
    client: reqwest::Client,
    policy: Backoff,
    /// Consecutive transient failures, backend-wide.
    failures: u32,
    /// The backend is left alone until then.
    pause_until: Option<Timestamp>,
    jitter: Jitter,
}

fn outcome_label(o: &JobOutcome) -> &'static str {
    match o {
        JobOutcome::Sent { .. } => "sent",
        JobOutcome::Retry { .. } => "retry",
        JobOutcome::Failed { .. } => "failed",
    }
}

fn earliest(a: Option<Timestamp>, b: Timestamp) -> Option<Timestamp> {
    Some(a.map_or(b, |a| a.min(b)))
}

impl Forwarder {
    /// Whether the backend is being left alone after a transient failure.
    fn paused(&self) -> bool {
        self.pause_until.is_some_and(|p| p > Timestamp::now())
    }

    fn metrics(&self) -> &Metrics {
        &self.gw.metrics
    }

    /// Sends every due job in order until one is to be retried.
    async fn pass(&mut self) -> Pass {
        let mut pass = Pass::default();
        let jobs = match blocking(&self.gw.store, |s| s.jobs()).await {
            Ok(j) => j,
            Err(e) => {
                tracing::error!("forwarder cannot read its outbox: {e}");
                self.pause_until = Some(add(Timestamp::now(), self.policy.min));
                return pass;
            }
        };
        let mut queued = jobs.len();
        self.metrics().forward_queue.set(queued as i64);
        // Tickets whose later jobs must wait: a job of theirs is not due yet.
        let mut blocked: HashSet<String> = HashSet::new();
        for job in jobs {
            if blocked.contains(&job.ticket_key) {
                continue;
            }
            let key = job.ticket_key.clone();
            let ticket = match blocking(&self.gw.store, move |s| s.ticket(&key)).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!("forwarder cannot read ticket {}: {e}", job.ticket_key);
                    self.pause_until = Some(add(Timestamp::now(), self.policy.min));
                    return pass;
                }
            };
            let Some(ticket) = ticket else {
                tracing::warn!(ticket = %job.ticket_key, "job without its ticket dropped");
                let out = JobOutcome::Failed {
                    error: "ticket not in the store".into(),
                };
                if self.finish(&job, &out).await {
                    queued -= 1;
                    self.metrics().forward_queue.set(queued as i64);
                }
                continue;
            };
            let (forwarding, body, target, path, key, what) = match &job.event {
                None => (
                    &ticket.forward,
                    &ticket.body,
                    Target::Create,
                    "/api/v1/tickets".to_string(),
                    ticket.key.as_str(),
                    "ticket",
                ),
                Some(ek) => {
                    let Some(ev) = ticket.events.iter().find(|e| &e.idempotency_key == ek) else {
                        tracing::warn!(ticket = %ticket.key, event = %ek, "job names an event the ticket does not have; skipped");
                        blocked.insert(job.ticket_key.clone());
                        continue;
                    };
                    let Some(id) = ticket.ticket_id.as_deref() else {
                        // Not before its ticket exists in the backend.
                        blocked.insert(job.ticket_key.clone());
                        continue;
                    };
                    (
                        &ev.forward,
                        &ev.body,
                        Target::Event { ticket_id: id },
                        format!("/api/v1/tickets/{}/events", segment(id)),
                        ev.idempotency_key.as_str(),
                        ev.kind.as_str(),
                    )
                }
            };
            let now = Timestamp::now();
            if let Some(next) = forwarding.next_attempt.filter(|&n| n > now) {
                pass.earliest = earliest(pass.earliest, next);
                blocked.insert(job.ticket_key.clone());
                continue;
            }
            let outcome = if valid_key(key) {
                let bytes = serde_json::to_vec(body).unwrap_or_default();
                self.send(target, &path, key, bytes).await
            } else {
                JobOutcome::Failed {
                    error: "the Idempotency-Key is not 1-128 printable ASCII characters".into(),
                }
            };
            self.report(&ticket.key, key, what, &outcome);
            Metrics::outcome(&self.metrics().forward_attempts, outcome_label(&outcome));
            if !self.finish(&job, &outcome).await {
                self.pause_until = Some(add(Timestamp::now(), self.policy.min));
                return pass;
            }
            match outcome {
                JobOutcome::Retry { next_attempt, .. } => {
                    self.pause_until = Some(next_attempt);
                    return pass;
                }
                JobOutcome::Sent { .. } | JobOutcome::Failed { .. } => {
                    self.failures = 0;
                    pass.progressed = true;
                    queued -= 1;
                    self.metrics().forward_queue.set(queued as i64);
                }
            }
        }
        pass
    }

    /// Stores the outcome; false when the store failed (the job stays and is resent: the
    /// key makes that harmless).
    async fn finish(&self, job: &Job, outcome: &JobOutcome) -> bool {
        let (j, o) = (job.clone(), outcome.clone());
        match blocking(&self.gw.store, move |s| {
            s.finish_job(&j, &o, Timestamp::now())
        })
        .await
        {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(ticket = %job.ticket_key, "forwarder cannot store an outcome: {e}");
                false
            }
        }
    }

    /// One request; the answer classified.
    async fn send(
        &mut self,
        target: Target<'_>,
        path: &str,
        key: &str,
        body: Vec<u8>,
    ) -> JobOutcome {
        let req = self
            .client
            .post(self.cfg.endpoint(path))
            .bearer_auth(&self.cfg.token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", key)
            .body(body);
        let answered = match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                read_body(resp)
                    .await
                    .map(|body| (status, retry_after, body))
            }
            Err(e) => Err(describe(&e)),
        };
        let failures = self.failures + 1;
        let jitter = self.jitter.next();
        let now = Timestamp::now();
        let outcome = match &answered {
            Ok((status, retry_after, body)) => classify(
                target,
                Answer::Http {
                    status: *status,
                    retry_after: retry_after.as_deref(),
                    body,
                },
                failures,
                now,
                jitter,
                &self.policy,
            ),
            Err(error) => classify(
                target,
                Answer::NoAnswer { error },
                failures,
                now,
                jitter,
                &self.policy,
            ),
        };
        if let JobOutcome::Retry { .. } = outcome {
            self.failures = failures;
            if let Ok((401 | 403, _, _)) = answered {
                tracing::error!(
                    url = %self.cfg.url,
                    "ALERT: the service backend refused the forwarder's credentials; tickets are kept and retried every {:?}",
                    self.policy.max
                );
            }
        }
        outcome
    }

    fn report(&self, ticket: &str, key: &str, what: &str, outcome: &JobOutcome) {
        match outcome {
            JobOutcome::Sent { ticket_id } => {
                tracing::info!(ticket = %ticket, key = %key, ticket_id = %ticket_id, "{what} sent to the backend")
            }
            JobOutcome::Retry {
                error,
                next_attempt,
            } => {
                tracing::warn!(ticket = %ticket, key = %key, next_attempt = %next_attempt, "{what} not sent, will retry: {error}")
            }
            JobOutcome::Failed { error } => {
                tracing::error!(ticket = %ticket, key = %key, "ALERT: the backend refused {what} for good (kept, not resent): {error}")
            }
        }
    }

    /// Reads back the status of every ticket sent and still open; stores what changed.
    async fn poll_statuses(&mut self) {
        let tickets = match blocking(&self.gw.store, |s| s.tickets()).await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("forwarder cannot read the tickets: {e}");
                return;
            }
        };
        for t in tickets {
            let Some(id) = t.ticket_id.as_deref() else {
                continue;
            };
            if !t.open || t.forward.state != ForwardState::Sent {
                continue;
            }
            let url = self
                .cfg
                .endpoint(&format!("/api/v1/tickets/{}", segment(id)));
            let resp = match self
                .client
                .get(url)
                .bearer_auth(&self.cfg.token)
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(ticket = %t.key, "reading the ticket's status: {}", describe(&e));
                    return;
                }
            };
            let status = resp.status().as_u16();
            let body = read_body(resp).await.unwrap_or_default();
            if status != 200 {
                tracing::warn!(ticket = %t.key, ticket_id = %id, "reading the ticket's status: {}", status_error(status, &body));
                if matches!(status, 401 | 403 | 429 | 500..=599) {
                    return;
                }
                continue;
            }
            let read = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("status")?.as_str().map(str::to_string));
            let Some(read) = read else {
                tracing::warn!(ticket = %t.key, ticket_id = %id, "the backend's status answer has no status");
                continue;
            };
            if t.backend_status.as_deref() == Some(read.as_str()) {
                continue;
            }
            tracing::info!(ticket = %t.key, ticket_id = %id, status = %clip(&read), "ticket status changed in the backend");
            let key = t.key.clone();
            if let Err(e) =
                blocking(&self.gw.store, move |s| s.set_backend_status(&key, &read)).await
            {
                tracing::error!(ticket = %t.key, "cannot store the ticket's status: {e}");
            }
        }
    }
}

/// Up to [`MAX_ANSWER`] bytes of the answer, as text.
async fn read_body(mut resp: reqwest::Response) -> Result<String, String> {
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| describe(&e))? {
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

/// Runs the forwarder until `shutdown`: sends due jobs, pauses the backend after a
/// transient failure, sleeps until woken by ingest (`gw.forwarder_wake`), the next job
/// falls due, the next status read, or [`IDLE_WAKE`].
pub async fn run(gw: Gateway, cfg: ForwarderConfig, shutdown: CancellationToken) {
    if cfg.url.starts_with("http://") && !is_loopback(&cfg.url) {
        tracing::warn!(url = %cfg.url, "the backend URL is plain http: the token travels unencrypted");
    }
    let client = loop {
        match client(&cfg) {
            Ok(c) => break c,
            Err(e) => {
                tracing::error!(
                    "forwarder cannot start: {e}; trying again in {:?}",
                    cfg.max_backoff
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(cfg.max_backoff) => {}
                }
            }
        }
    };
    let mut f = Forwarder {
        policy: cfg.backoff(),
        gw,
        client,
        cfg,
        failures: 0,
        pause_until: None,
        jitter: Jitter::new(),
    };
    let poll_every = f.cfg.status_poll.max(Duration::from_millis(10));
    let mut next_poll = tokio::time::Instant::now() + poll_every;
    loop {
        let wake = f.gw.forwarder_wake.clone();
        let notified = wake.notified();
        tokio::pin!(notified);
        // Registered before the pass: a wake during it is not lost.
        notified.as_mut().enable();

        if !f.paused() {
            // Over: forget it (else an elapsed pause would wake the loop at once, forever).
            f.pause_until = None;
        }
        let mut due = None;
        if !f.paused() {
            let pass = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                p = f.pass() => p,
            };
            if pass.progressed && !f.paused() {
                continue;
            }
            due = pass.earliest;
            if tokio::time::Instant::now() >= next_poll && !f.paused() {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    _ = f.poll_statuses() => {}
                }
                next_poll = tokio::time::Instant::now() + poll_every;
            }
        }
        // Sleep until the pause ends, the next job falls due, or the idle wake-up. A pause
        // or a job that fell due meanwhile (a slow machine) means no sleep at all.
        let now = Timestamp::now();
        let mut wait = IDLE_WAKE;
        for t in [f.pause_until, due].into_iter().flatten() {
            let d = Duration::try_from(t.duration_since(now)).unwrap_or(Duration::ZERO);
            wait = wait.min(d);
        }
        let mut wake_at = tokio::time::Instant::now() + wait;
        // An overdue status read (skipped while paused) waits for the pause to end.
        if next_poll > tokio::time::Instant::now() {
            wake_at = wake_at.min(next_poll);
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(wake_at) => {}
        }
    }
}

fn is_loopback(url: &str) -> bool {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .is_some_and(|h| h == "localhost" || h == "127.0.0.1" || h == "[::1]")
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn backoff_doubles_from_min_to_max_within_equal_jitter() {
        let p = policy();
        for n in 0..=200u32 {
            let ceiling = if n <= 1 {
                p.min
            } else {
                p.min.saturating_mul(1u32 << (n - 1).min(31)).min(p.max)
            };
            for j in [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999_999, 1.0] {
                let d = backoff(&p, n, j);
                assert!(d >= p.min && d <= p.max, "n={n} j={j} d={d:?}");
                assert!(d <= ceiling, "n={n} j={j}: {d:?} above {ceiling:?}");
                assert!(d >= (ceiling / 2).max(p.min), "n={n} j={j}: {d:?}");
                assert_eq!(d, p.delay(n, j));
            }
            // Jitter 0 is the floor, 1 the ceiling.
            assert_eq!(backoff(&p, n, 1.0), ceiling, "n={n}");
            assert_eq!(backoff(&p, n, 0.0), (ceiling / 2).max(p.min), "n={n}");
        }
        assert_eq!(backoff(&p, 1, 0.3), Duration::from_millis(500));
        assert_eq!(backoff(&p, 2, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(&p, 4, 1.0), Duration::from_secs(4));
        assert_eq!(backoff(&p, 4, 0.0), Duration::from_secs(2));
        assert_eq!(backoff(&p, 11, 1.0), Duration::from_secs(300));
        assert_eq!(backoff(&p, u32::MAX, 1.0), Duration::from_secs(300));
        assert_eq!(backoff(&p, u32::MAX, 0.5), Duration::from_secs(225));
        // Monotone in the failure count at a fixed jitter.
        for j in [0.0, 0.5, 1.0] {
            for n in 1..40 {
                assert!(backoff(&p, n, j) <= backoff(&p, n + 1, j));
            }
        }
        // Out-of-range jitter is clamped, NaN is 0.
        assert_eq!(backoff(&p, 4, -3.0), backoff(&p, 4, 0.0));
        assert_eq!(backoff(&p, 4, 7.0), backoff(&p, 4, 1.0));
        assert_eq!(backoff(&p, 4, f64::NAN), backoff(&p, 4, 0.0));
        // A policy with max below min never goes below min.
        let odd = Backoff {
            min: Duration::from_secs(2),
            max: Duration::from_secs(1),
        };
        assert_eq!(backoff(&odd, 5, 0.5), Duration::from_secs(2));
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
    fn retry_after_values() {
        let now = ts(NOW);
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
    fn jitter_is_in_range_and_varies() {
        let mut j = Jitter::new();
        let xs: Vec<f64> = (0..1000).map(|_| j.next()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((0.4..0.6).contains(&mean), "{mean}");
        assert!(xs.windows(2).any(|w| w[0] != w[1]));
    }

    #[test]
    fn debug_hides_the_token() {
        let cfg = ForwarderConfig::new("https://service.example.com", "s3cr3t-t0ken");
        let text = format!("{cfg:?}");
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(text.contains("service.example.com"));
    }

    #[test]
    fn from_section_reads_the_token_file() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "  abc123\n").unwrap();
        let mut s = BackendSection {
            url: "https://service.example.com/".into(),
            token_file: token.clone(),
            ca_file: None,
            timeout: tend_profiles::units::Dur(Duration::from_secs(3)),
            status_poll: tend_profiles::units::Dur(Duration::from_secs(60)),
        };
        let cfg = ForwarderConfig::from_section(&s).unwrap();
        assert_eq!(cfg.token, "abc123");
        assert_eq!(cfg.timeout, Duration::from_secs(3));
        assert_eq!(cfg.status_poll, Duration::from_secs(60));
        assert_eq!(cfg.min_backoff, DEFAULT_MIN_BACKOFF);
        assert_eq!(cfg.max_backoff, DEFAULT_MAX_BACKOFF);
        assert_eq!(
            cfg.endpoint("/api/v1/tickets"),
            "https://service.example.com/api/v1/tickets"
        );
        s.url = "ftp://x".into();
        assert!(ForwarderConfig::from_section(&s).is_err());
        s.url = "https://service.example.com".into();
        s.ca_file = Some(token.clone());
        let e = ForwarderConfig::from_section(&s).unwrap_err();
        assert!(e.contains("certificate"), "{e}");
        assert!(!e.contains("abc123"), "{e}");
        s.ca_file = None;
        s.token_file = dir.path().join("missing");
        assert!(ForwarderConfig::from_section(&s).is_err());
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
