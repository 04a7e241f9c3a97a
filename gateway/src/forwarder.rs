//! The forwarder: sends the tickets and ticket events that ingest queued in the store's
//! outbox to the ticket backend the config chose ([`TicketBackend`]), and reads back the
//! status of the tickets still open.
//!
//! - Jobs go in outbox order. A ticket is created under its Idempotency-Key with the exact
//!   document stored when it was decided, so a retry (also after a restart) never opens a
//!   second ticket. An event waits until its ticket has a backend id, and the events of one
//!   ticket go in order.
//! - Every outcome is stored before the next job ([`GatewayStore::finish_job`]): sent, failed for
//!   good (the backend refused it: kept and shown with the backend's reason, never resent
//!   unchanged), or to be retried.
//! - A transient outcome pauses the whole backend, not just the job: exponential backoff
//!   with jitter, the backend's `Retry-After` honoured as a lower bound. Refused
//!   credentials keep everything and retry slowly, with an alert.
//! - Logs name the ticket key, the outcome and the backend's reason, never a body.
//!
//! [`schedule`] and [`backoff`] are the pure part (no I/O, no clock): when a reply means
//! the job is tried again.

use crate::app::Gateway;
use crate::backend::{clip, Reply, TicketBackend, MAX_RETRY_AFTER};
use crate::config::BackendSection;
use crate::metrics::Metrics;
use crate::store::{
    ForwardState, Forwarding, GatewayStore, Job, JobOutcome, StoreError, TicketRecord,
};
use jiff::{SignedDuration, Timestamp};
use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Shortest pause after a transient failure.
pub const DEFAULT_MIN_BACKOFF: Duration = Duration::from_millis(500);
/// Longest pause; also the pause after refused credentials.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(300);
/// With nothing due, the forwarder looks at the outbox again after this long anyway.
pub const IDLE_WAKE: Duration = Duration::from_secs(30);

/// How the forwarder paces itself; where it sends is the backend's business.
#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    /// How often the status of open tickets is read back.
    pub status_poll: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// This gateway's id: on a shared store, the owner of the jobs it claims.
    pub gateway_id: String,
}

/// How long a claim on a ticket's jobs lasts without being renewed (every pass renews
/// it): a gateway killed mid-send leaves its jobs to another after this, which resends
/// them under the same Idempotency-Key. Far above a request's timeout.
pub const CLAIM_LEASE: Duration = Duration::from_secs(120);

/// The duty ([`GatewayStore::lead`]) of reading the open tickets' statuses back.
const STATUS_DUTY: &str = "status-read-back";

impl Default for ForwarderConfig {
    /// Status read every 5 min, backoff from 500 ms to 5 min.
    fn default() -> Self {
        ForwarderConfig {
            status_poll: Duration::from_secs(60),
            min_backoff: DEFAULT_MIN_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            gateway_id: "gateway".into(),
        }
    }
}

impl ForwarderConfig {
    /// From the config file's `[backend]` section (its `status_poll`).
    pub fn from_section(s: &BackendSection) -> Self {
        ForwarderConfig {
            status_poll: s.status_poll.0,
            ..ForwarderConfig::default()
        }
    }

    pub fn backoff(&self) -> Backoff {
        Backoff {
            min: self.min_backoff,
            max: self.max_backoff,
        }
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

/// What a backend's reply to a job means for the job (`ticket_id` of an accepted reply is
/// the ticket's backend id):
///
/// - accepted → sent;
/// - refused → failed for good, with the backend's reason;
/// - retry later → retry after the backoff, or the backend's `retry_after` (at most
///   [`MAX_RETRY_AFTER`]) when that is later;
/// - unauthorized → retry after `max` (credentials are wrong: keep everything, retry
///   slowly), or the backend's `retry_after` when that is later.
///
/// `failures_in_a_row` counts this one (1 after the first failure); `jitter` is in 0..1.
pub fn schedule(
    reply: Reply<String>,
    failures_in_a_row: u32,
    now: Timestamp,
    jitter: f64,
    policy: &Backoff,
) -> JobOutcome {
    let lower =
        |retry_after: Option<Duration>| retry_after.unwrap_or_default().min(MAX_RETRY_AFTER);
    match reply {
        Reply::Accepted(ticket_id) => JobOutcome::Sent { ticket_id },
        Reply::Refused { reason } => JobOutcome::Failed { error: reason },
        Reply::RetryLater {
            retry_after,
            reason,
        } => {
            let d = backoff(policy, failures_in_a_row, jitter).max(lower(retry_after));
            JobOutcome::Retry {
                error: reason,
                next_attempt: add(now, d),
            }
        }
        Reply::Unauthorized {
            retry_after,
            reason,
        } => {
            let d = policy.max.max(policy.min).max(lower(retry_after));
            JobOutcome::Retry {
                error: reason,
                next_attempt: add(now, d),
            }
        }
    }
}

fn add(now: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| now.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
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

/// The forwarder could not use the store.
#[derive(Debug, thiserror::Error)]
enum OutboxError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("store task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

async fn blocking<T: Send + 'static>(
    store: &Arc<dyn GatewayStore>,
    f: impl FnOnce(&dyn GatewayStore) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, OutboxError> {
    let s = store.clone();
    Ok(tokio::task::spawn_blocking(move || f(s.as_ref())).await??)
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

/// What became of one job in a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The backend has it or refused it for good: it left the outbox.
    Done,
    /// It left the outbox without reaching the backend (its ticket is gone).
    Dropped,
    /// Still queued (its outcome could not be stored): the next pass tries again.
    Kept,
    /// Not sendable yet: its ticket's later jobs wait too.
    Blocked,
    /// The pass ends here (the backend or the store is paused).
    Stop,
}

/// A job that is due, and what it asks of the backend.
struct Due<'a> {
    forwarding: &'a Forwarding,
    /// `ticket`, or the event's type: for logs.
    what: &'a str,
    /// The Idempotency-Key.
    key: &'a str,
    request: Request<'a>,
}

enum Request<'a> {
    Create {
        document: &'a serde_json::Value,
    },
    Event {
        ticket_id: &'a str,
        document: &'a serde_json::Value,
    },
}

struct Forwarder {
    gw: Gateway,
    backend: Box<dyn TicketBackend>,
    cfg: ForwarderConfig,
    policy: Backoff,
    /// Consecutive transient failures, backend-wide.
    failures: u32,
    /// The backend is left alone until then.
    pause_until: Option<Timestamp>,
    jitter: Jitter,
}

pub(crate) fn outcome_label(o: &JobOutcome) -> &'static str {
    match o {
        JobOutcome::Sent { .. } => "sent",
        JobOutcome::Retry { .. } => "retry",
        JobOutcome::Failed { .. } => "failed",
    }
}

fn earliest(a: Option<Timestamp>, b: Timestamp) -> Option<Timestamp> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// What a job asks for, or `None` while it must wait: an event whose ticket has no backend
/// id yet, or that its ticket does not have.
fn due_of<'a>(job: &Job, ticket: &'a TicketRecord) -> Option<Due<'a>> {
    let Some(ek) = &job.event else {
        return Some(Due {
            forwarding: &ticket.forward,
            what: "ticket",
            key: &ticket.key,
            request: Request::Create {
                document: &ticket.body,
            },
        });
    };
    let Some(ev) = ticket.events.iter().find(|e| &e.idempotency_key == ek) else {
        tracing::warn!(ticket = %ticket.key, event = %ek, "job names an event the ticket does not have; skipped");
        return None;
    };
    // Not before its ticket exists in the backend.
    let ticket_id = ticket.ticket_id.as_deref()?;
    Some(Due {
        forwarding: &ev.forward,
        what: &ev.kind,
        key: &ev.idempotency_key,
        request: Request::Event {
            ticket_id,
            document: &ev.body,
        },
    })
}

impl Forwarder {
    /// Whether the backend is being left alone after a transient failure.
    fn paused(&self) -> bool {
        self.pause_until.is_some_and(|p| p > Timestamp::now())
    }

    /// A short pause after the store failed.
    fn pause_briefly(&mut self) {
        self.pause_until = Some(add(Timestamp::now(), self.policy.min));
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
                self.pause_briefly();
                return pass;
            }
        };
        // On a store other gateways share, only the tickets this one holds a claim on
        // are its to send: each job goes out from one gateway.
        let (jobs, theirs) = match self.claims(jobs).await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("forwarder cannot claim its jobs: {e}");
                self.pause_briefly();
                return pass;
            }
        };
        let mut queued = jobs.len();
        self.metrics().forward_queue.set(queued as i64);
        // Tickets whose later jobs must wait: a job of theirs is not due yet.
        let mut blocked: HashSet<String> = HashSet::new();
        for job in jobs {
            if blocked.contains(&job.ticket_key) || theirs.contains(&job.ticket_key) {
                continue;
            }
            match self.try_job(&job, &mut pass).await {
                Step::Done | Step::Dropped => queued -= 1,
                Step::Kept => continue,
                Step::Blocked => {
                    blocked.insert(job.ticket_key.clone());
                    continue;
                }
                Step::Stop => return pass,
            }
            self.metrics().forward_queue.set(queued as i64);
        }
        pass
    }

    /// The jobs to go through and the tickets among them another gateway holds (none
    /// unless the store is shared); claims or renews the rest for this one.
    ///
    /// On a shared store the jobs are read again once the claims are held: the first
    /// read may predate another gateway sending a job and releasing its claim, and a job
    /// from that read would be sent a second time.
    async fn claims(&self, jobs: Vec<Job>) -> Result<(Vec<Job>, HashSet<String>), OutboxError> {
        if !self.gw.store.shared() || jobs.is_empty() {
            return Ok((jobs, HashSet::new()));
        }
        let keys: Vec<String> = jobs
            .iter()
            .map(|j| j.ticket_key.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let owner = self.cfg.gateway_id.clone();
        let (jobs, mine) = blocking(&self.gw.store, move |s| {
            let mine = s.claim_jobs(&keys, &owner, CLAIM_LEASE)?;
            Ok((s.jobs()?, mine))
        })
        .await?;
        let theirs = jobs
            .iter()
            .filter(|j| !mine.contains(&j.ticket_key))
            .map(|j| j.ticket_key.clone())
            .collect();
        Ok((jobs, theirs))
    }

    /// Sends `job` when it is due; notes in `pass` what it found.
    async fn try_job(&mut self, job: &Job, pass: &mut Pass) -> Step {
        let key = job.ticket_key.clone();
        let ticket = match blocking(&self.gw.store, move |s| s.ticket(&key)).await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("forwarder cannot read ticket {}: {e}", job.ticket_key);
                self.pause_briefly();
                return Step::Stop;
            }
        };
        let Some(ticket) = ticket else {
            tracing::warn!(ticket = %job.ticket_key, "job without its ticket dropped");
            let out = JobOutcome::Failed {
                error: "ticket not in the store".into(),
            };
            return if self.finish(job, &out).await {
                Step::Dropped
            } else {
                Step::Kept
            };
        };
        let Some(due) = due_of(job, &ticket) else {
            return Step::Blocked;
        };
        if let Some(next) = due
            .forwarding
            .next_attempt
            .filter(|&n| n > Timestamp::now())
        {
            pass.earliest = earliest(pass.earliest, next);
            return Step::Blocked;
        }
        let outcome = self.deliver(&due.request, due.key).await;
        self.report(&ticket.key, due.key, due.what, &outcome);
        Metrics::outcome(&self.metrics().forward_attempts, outcome_label(&outcome));
        if !self.finish(job, &outcome).await {
            self.pause_briefly();
            return Step::Stop;
        }
        match outcome {
            JobOutcome::Retry { next_attempt, .. } => {
                self.pause_until = Some(next_attempt);
                Step::Stop
            }
            JobOutcome::Sent { .. } | JobOutcome::Failed { .. } => {
                self.failures = 0;
                pass.progressed = true;
                Step::Done
            }
        }
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

    /// One request to the backend under `key`; its reply scheduled.
    async fn deliver(&mut self, request: &Request<'_>, key: &str) -> JobOutcome {
        let reply = match *request {
            Request::Create { document } => self.backend.create_ticket(key, document).await,
            Request::Event {
                ticket_id,
                document,
            } => self
                .backend
                .add_event(ticket_id, key, document)
                .await
                .map(|()| ticket_id.to_string()),
        };
        if let Reply::Unauthorized { .. } = reply {
            tracing::error!(
                url = %self.backend.location(),
                "ALERT: the service backend refused the forwarder's credentials; tickets are kept and retried every {:?}",
                self.policy.max
            );
        }
        let failures = self.failures + 1;
        let jitter = self.jitter.next();
        let outcome = schedule(reply, failures, Timestamp::now(), jitter, &self.policy);
        if let JobOutcome::Retry { .. } = outcome {
            self.failures = failures;
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
    /// Stops at the first read the backend cannot answer now.
    async fn poll_statuses(&self) {
        // Gateways sharing a store take turns: one reads the statuses back for all
        // (the backend is asked once per ticket and poll, not once per gateway), another
        // takes over when it stops.
        let owner = self.cfg.gateway_id.clone();
        let lease = self.cfg.status_poll.saturating_mul(2) + Duration::from_secs(10);
        match blocking(&self.gw.store, move |s| s.lead(STATUS_DUTY, &owner, lease)).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::error!("forwarder cannot tell whether it reads the statuses back: {e}");
                return;
            }
        }
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
            let read = match self.backend.ticket_status(id).await {
                Reply::Accepted(status) => status,
                Reply::Refused { reason } => {
                    tracing::warn!(ticket = %t.key, ticket_id = %id, "reading the ticket's status: {reason}");
                    continue;
                }
                Reply::RetryLater { reason, .. } | Reply::Unauthorized { reason, .. } => {
                    tracing::warn!(ticket = %t.key, ticket_id = %id, "reading the ticket's status: {reason}");
                    return;
                }
            };
            let now = Timestamp::now();
            let changed = t.backend_status.as_deref() != Some(read.status.as_str())
                || read
                    .history
                    .as_ref()
                    .is_some_and(|h| *h != t.status_history);
            if changed {
                tracing::info!(ticket = %t.key, ticket_id = %id, status = %clip(&read.status), "ticket status changed in the backend");
            }
            if !changed {
                // Nothing new: no write (every open ticket, every poll, would be a commit).
                continue;
            }
            let key = t.key.clone();
            let stored = blocking(&self.gw.store, move |s| {
                s.update_ticket(&key, &mut |t| {
                    t.record_status(&read, now);
                    Ok(Vec::new())
                })
            })
            .await;
            if let Err(e) = stored {
                tracing::error!(ticket = %t.key, "cannot store the ticket's status: {e}");
            }
        }
    }
}

/// How long to sleep at `now`: until the pause ends or the next job falls due, at most
/// [`IDLE_WAKE`]; nothing when either is already past (a slow machine).
fn sleep_for(pause_until: Option<Timestamp>, due: Option<Timestamp>, now: Timestamp) -> Duration {
    [pause_until, due]
        .into_iter()
        .flatten()
        .map(|t| Duration::try_from(t.duration_since(now)).unwrap_or(Duration::ZERO))
        .fold(IDLE_WAKE, Duration::min)
}

/// Runs the forwarder until `shutdown`: sends due jobs to `backend`, pauses the backend
/// after a transient failure, sleeps until woken by ingest (`gw.forwarder_wake`), the next
/// job falls due, the next status read, or [`IDLE_WAKE`].
pub async fn run(
    gw: Gateway,
    backend: Box<dyn TicketBackend>,
    cfg: ForwarderConfig,
    shutdown: CancellationToken,
) {
    let mut f = Forwarder {
        policy: cfg.backoff(),
        gw,
        backend,
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
        let mut wake_at =
            tokio::time::Instant::now() + sleep_for(f.pause_until, due, Timestamp::now());
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
    fn every_reply_has_a_schedule() {
        let p = policy();
        let now = ts(NOW);
        let o = schedule(Reply::Accepted("T-1".into()), 3, now, 0.5, &p);
        assert_eq!(
            o,
            JobOutcome::Sent {
                ticket_id: "T-1".into()
            }
        );
        let o = schedule(
            Reply::Refused {
                reason: "400: bad".into(),
            },
            3,
            now,
            0.5,
            &p,
        );
        assert_eq!(
            o,
            JobOutcome::Failed {
                error: "400: bad".into()
            }
        );
        for n in 1..20 {
            let retry = |retry_after| Reply::RetryLater {
                retry_after,
                reason: "503 Service Unavailable".into(),
            };
            let o = schedule(retry(None), n, now, 0.5, &p);
            assert_eq!(after(&o), backoff(&p, n, 0.5));
            let JobOutcome::Retry { error, .. } = &o else {
                unreachable!()
            };
            assert_eq!(error, "503 Service Unavailable");
            // Retry-After is a lower bound, never a ceiling.
            let o = schedule(retry(Some(Duration::from_secs(2))), n, now, 0.5, &p);
            assert_eq!(after(&o), backoff(&p, n, 0.5).max(Duration::from_secs(2)));
            // And capped, whichever backend sent it.
            let o = schedule(retry(Some(Duration::MAX)), n, now, 0.5, &p);
            assert_eq!(after(&o), MAX_RETRY_AFTER);
        }
        // Refused credentials wait max, or longer when told.
        let unauthorized = |retry_after| Reply::Unauthorized {
            retry_after,
            reason: "401 Unauthorized".into(),
        };
        assert_eq!(after(&schedule(unauthorized(None), 1, now, 0.0, &p)), p.max);
        assert_eq!(
            after(&schedule(
                unauthorized(Some(Duration::from_secs(1))),
                1,
                now,
                0.0,
                &p
            )),
            p.max
        );
        assert_eq!(
            after(&schedule(
                unauthorized(Some(Duration::from_secs(600))),
                1,
                now,
                0.0,
                &p
            )),
            Duration::from_secs(600)
        );
    }

    #[test]
    fn sleep_is_until_the_earliest_of_pause_and_due_at_most_idle() {
        let now = ts(NOW);
        let at = |s: u64| add(now, Duration::from_secs(s));
        assert_eq!(sleep_for(None, None, now), IDLE_WAKE);
        assert_eq!(sleep_for(Some(at(5)), None, now), Duration::from_secs(5));
        assert_eq!(
            sleep_for(Some(at(5)), Some(at(2)), now),
            Duration::from_secs(2)
        );
        assert_eq!(sleep_for(None, Some(at(3600)), now), IDLE_WAKE);
        // Already past: no sleep at all.
        let past = ts("2026-11-28T02:15:00Z");
        assert_eq!(sleep_for(Some(past), Some(at(2)), now), Duration::ZERO);
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
    fn from_section_takes_the_status_poll_and_default_backoffs() {
        let s = BackendSection {
            kind: crate::backend::BackendKind::ServiceApi,
            url: "https://service.example.com/".into(),
            token_file: "token".into(),
            ca_file: None,
            timeout: tend_profiles::units::Dur(Duration::from_secs(3)),
            status_poll: tend_profiles::units::Dur(Duration::from_secs(60)),
        };
        let cfg = ForwarderConfig::from_section(&s);
        assert_eq!(cfg.status_poll, Duration::from_secs(60));
        assert_eq!(cfg.min_backoff, DEFAULT_MIN_BACKOFF);
        assert_eq!(cfg.max_backoff, DEFAULT_MAX_BACKOFF);
    }
}
