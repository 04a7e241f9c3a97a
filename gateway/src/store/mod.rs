//! The gateway's store: everything it must not forget, behind one interface.
//!
//! - which (agent, outbox incarnation, seq) it has stored, with a digest of the content,
//!   so a replayed record is acknowledged again but applied once and other content under
//!   the same key is a conflict, counted on the agent ([`AgentRecord`]);
//! - each device's live picture (identity, state, last readings, open episodes) and its
//!   whole life (every state change, episode change, ticket and maintenance event);
//! - the availability ledger's transitions, keyed by the agent's time;
//! - the tickets with their forwarding state, and the forwarder's outbox of jobs.
//!
//! This module holds the domain types and the [`GatewayStore`] trait that ingest, the
//! ledger, the forwarder and the hotline API use (the CLI reaches the store through the
//! API). [`RedbStore`] (one redb file, the default for one gateway) is its implementation;
//! a shared SQL store implements the same trait. What a store must guarantee is written on the trait; what a batch changes
//! is decided by pure code ([`crate::ingest::plan`], the `TicketRecord` bookkeeping
//! below), so an implementation only loads, writes and commits.

mod postgres;
mod redb;

pub use self::postgres::{pg_config, PgConnect, PgStore};
pub use self::redb::RedbStore;

use crate::backend::StatusRead;
use crate::ingest::{Applied, IngestContext};
use crate::ledger::Ledger;
use crate::sla::Deadlines;
use crate::sla_watch::{DeadlineKind, Promises, SlaStatus, StatusChange};
use crate::ticket::{EventRequest, TicketRequest};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tend_profiles::{DeviceState, FaultClass, SignalKind};
use tend_wire::{EpisodeEvent, UpBatch};

/// Why the store could not do what was asked. Nothing of the operation was committed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed or refused: `store` names it (a file, a database).
    #[error("store {store}: {what}: {detail}")]
    Database {
        store: String,
        what: &'static str,
        detail: String,
    },
    /// The disk failed under the store (full, or an I/O error): the store closes and
    /// reopens its file before the next use, so once space is back it works again with
    /// nothing committed lost; what failed was not committed (and not acknowledged).
    #[error("store {store}: {what}: {detail} (is the disk full? the store is reopened and the write retried when the agent resends)")]
    Io {
        store: String,
        what: &'static str,
        detail: String,
    },
    /// The store's file is damaged (truncated, corrupt, not a store at all): nothing can be
    /// read from it, and nothing was changed in it.
    #[error(
        "store {store} is damaged: {detail}. The gateway cannot start on it: restore the \
         file from a backup, or move it aside (mv {store} {store}.corrupt) to start with an \
         empty store; agents resend only what they have not had acknowledged"
    )]
    Damaged { store: String, detail: String },
    /// A value could not be encoded for storage: nothing is written rather than empty or
    /// null bytes.
    #[error("store: cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl StoreError {
    /// What the store was doing (`read device`, `commit`, ...), for a short message.
    pub fn what(&self) -> &'static str {
        match self {
            StoreError::Database { what, .. }
            | StoreError::Io { what, .. }
            | StoreError::Encode { what, .. } => what,
            StoreError::Damaged { .. } => "open",
        }
    }
}

/// `value` as JSON bytes, or an error naming `what`.
pub(crate) fn encode<T: Serialize + ?Sized>(
    what: &'static str,
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Encode { what, source })
}

/// `value` as a JSON value, or an error naming `what`.
pub(crate) fn to_json<T: Serialize + ?Sized>(
    what: &'static str,
    value: &T,
) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(value).map_err(|source| StoreError::Encode { what, source })
}

/// One reading as last seen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveReading {
    pub name: String,
    /// JSON, not `Value`: a NaN reading is stored (and shown) as null.
    pub value: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub unit: Option<String>,
    pub time: Timestamp,
}

/// What the device said it is (its agent's Identity record).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveIdentity {
    pub model: String,
    pub firmware: String,
    pub serial: Option<String>,
    pub profile: String,
    pub at: Timestamp,
}

/// A device's live picture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceLive {
    pub id: String,
    /// The agent that last reported it.
    pub agent: String,
    pub site_reported: String,
    pub identity: Option<LiveIdentity>,
    pub state: DeviceState,
    /// Agent time of the transition into `state`.
    pub state_since: Option<Timestamp>,
    /// Agent time of the latest record about the device.
    pub last_seen: Option<Timestamp>,
    pub readings: BTreeMap<String, LiveReading>,
    /// Open episodes by episode id: the latest change seen of each.
    pub open_episodes: BTreeMap<String, EpisodeEvent>,
    /// Readings the agent's outbox dropped when full.
    #[serde(default)]
    pub dropped_readings: u64,
}

impl DeviceLive {
    pub fn new(id: &str, agent: &str, site: &str) -> Self {
        DeviceLive {
            id: id.into(),
            agent: agent.into(),
            site_reported: site.into(),
            identity: None,
            state: DeviceState::Unknown,
            state_since: None,
            last_seen: None,
            readings: BTreeMap::new(),
            open_episodes: BTreeMap::new(),
            dropped_readings: 0,
        }
    }
}

/// A record that came with the key of a stored one and other content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub incarnation: String,
    pub seq: u64,
    /// Gateway time it was first seen.
    pub at: Timestamp,
}

/// What the store keeps about an agent, besides its devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub id: String,
    /// The outbox incarnation of its latest batch: a new one means its outbox was
    /// replaced (lost, damaged, a re-imaged box).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub incarnation: Option<String>,
    /// Gateway time that incarnation was first heard.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub incarnation_since: Option<Timestamp>,
    /// Records that came with the (agent, incarnation, seq) of a stored one and other
    /// content: not applied.
    #[serde(default)]
    pub conflicting_records: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_conflict: Option<Conflict>,
    /// The agent's clock minus the gateway's, in seconds, as its latest batches showed
    /// (written when it moves by more than a few seconds).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub clock_offset_s: Option<i64>,
    /// Off by more than the gateway's `clock_tolerance`: its records' times are taken
    /// in gateway time.
    #[serde(default)]
    pub clock_skewed: bool,
}

impl AgentRecord {
    pub fn new(id: &str) -> Self {
        AgentRecord {
            id: id.to_string(),
            incarnation: None,
            incarnation_since: None,
            conflicting_records: 0,
            last_conflict: None,
            clock_offset_s: None,
            clock_skewed: false,
        }
    }
}

/// One line of a device's life record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LifeEvent {
    Identified {
        at: Timestamp,
        firmware: String,
        serial: Option<String>,
        profile: String,
    },
    State {
        at: Timestamp,
        from: DeviceState,
        to: DeviceState,
    },
    Episode {
        at: Timestamp,
        event: EpisodeEvent,
    },
    TicketOpened {
        at: Timestamp,
        ticket_key: String,
        kind: SignalKind,
        code: String,
        class: FaultClass,
    },
    TicketEvent {
        at: Timestamp,
        ticket_key: String,
        event: String,
    },
    ReadingsDropped {
        at: Timestamp,
        count: u64,
    },
    /// The hotline excluded a stretch of time from the device's availability.
    Excluded {
        at: Timestamp,
        exclusion: Exclusion,
    },
    /// The hotline took an exclusion back.
    ExclusionRemoved {
        at: Timestamp,
        exclusion: Exclusion,
    },
    /// Preventive maintenance done (recorded through the hotline, or a maintenance ticket
    /// resolved in the backend).
    Maintenance {
        at: Timestamp,
        maintenance: MaintenanceDone,
    },
}

/// Why a stretch of time does not count against the service organisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExclusionReason {
    /// The customer caused it (misuse, power cut in the ward, refused access).
    CustomerCaused,
    ForceMajeure,
    /// Agreed with the customer beforehand.
    Planned,
}

impl ExclusionReason {
    pub const ALL: [&'static str; 3] = ["customer_caused", "force_majeure", "planned"];

    pub fn parse(s: &str) -> Option<ExclusionReason> {
        match s {
            "customer_caused" => Some(ExclusionReason::CustomerCaused),
            "force_majeure" => Some(ExclusionReason::ForceMajeure),
            "planned" => Some(ExclusionReason::Planned),
            _ => None,
        }
    }
}

/// A stretch `[from, to)` of a device's time excluded from its availability: neither up
/// nor down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exclusion {
    /// Assigned by the store, unique per device.
    pub id: u64,
    pub device: String,
    pub from: Timestamp,
    pub to: Timestamp,
    pub reason: ExclusionReason,
    #[serde(default)]
    pub note: String,
    /// Gateway time it was recorded.
    pub recorded_at: Timestamp,
}

impl Exclusion {
    /// Whether the two stretches share time (`[from, to)`: touching ends do not): what
    /// every store refuses for two exclusions of one device.
    pub fn overlaps(&self, other: &Exclusion) -> bool {
        other.from < self.to && self.from < other.to
    }
}

/// Preventive maintenance done on a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceDone {
    /// Assigned by the store, unique per device.
    pub id: u64,
    pub device: String,
    /// When it was done.
    pub done_at: Timestamp,
    /// `hotline`, or `ticket <key>` for a maintenance ticket resolved in the backend.
    pub source: String,
    #[serde(default)]
    pub note: String,
    pub recorded_at: Timestamp,
}

/// Where a page of a device's life record starts: the entry's (time, n) key. Written as
/// `<ns>.<n>` in the API's `before`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HistoryCursor {
    pub at_ns: i128,
    pub n: u64,
}

impl std::fmt::Display for HistoryCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.at_ns, self.n)
    }
}

impl std::str::FromStr for HistoryCursor {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let (a, n) = s.split_once('.').ok_or(())?;
        Ok(HistoryCursor {
            at_ns: a.parse().map_err(|_| ())?,
            n: n.parse().map_err(|_| ())?,
        })
    }
}

/// Where a ticket or an event stands with the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForwardState {
    /// Waiting to be sent (or no backend is configured: kept by the gateway).
    Pending,
    /// The backend has it.
    Sent,
    /// The backend refused it for good (400, 409, 413, 404): kept, shown, not resent.
    Failed,
}

/// Forwarding bookkeeping of a ticket or an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Forwarding {
    pub state: ForwardState,
    pub attempts: u32,
    /// The backend's last error (status and body) or the transport error.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub next_attempt: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sent_at: Option<Timestamp>,
}

impl Forwarding {
    pub fn pending() -> Self {
        Forwarding {
            state: ForwardState::Pending,
            attempts: 0,
            last_error: None,
            next_attempt: None,
            sent_at: None,
        }
    }
}

/// An event on a ticket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TicketEventRecord {
    pub idempotency_key: String,
    /// `fault_cleared`, `fault_recurred`, `escalated`, `note`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The exact body sent (built once: a key resent with another body is a 409).
    pub body: serde_json::Value,
    pub forward: Forwarding,
}

/// A ticket the gateway opened (or is opening).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TicketRecord {
    /// The Idempotency-Key.
    pub key: String,
    pub device: String,
    pub agent: String,
    pub kind: SignalKind,
    pub code: String,
    /// The class now (after escalations).
    pub class: FaultClass,
    /// The episode that opened it, then every recurrence attached.
    pub episodes: Vec<String>,
    /// Open in the backend (not resolved or closed) as far as the gateway knows.
    pub open: bool,
    /// Agent time the fault was detected.
    pub detected_at: Timestamp,
    /// Gateway time the ticket was decided.
    pub created_at: Timestamp,
    /// The exact body of `POST /api/v1/tickets`.
    pub body: serde_json::Value,
    /// The backend's ticket id once created.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ticket_id: Option<String>,
    /// The backend's status (`open`, `acknowledged`, ...) when last read.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub backend_status: Option<String>,
    pub forward: Forwarding,
    pub events: Vec<TicketEventRecord>,
    /// The deadlines that apply now (a rise of the class replaces them). `None` in records
    /// written before the SLA watch: then the body's `sla` holds them.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub deadlines: Option<DeadlineRecord>,
    /// Every status change the backend reported (v1.1), or the gateway's reads of a
    /// changed status with their time (v1), oldest first.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub status_history: Vec<StatusChange>,
    /// Gateway time of the last successful status read.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub status_read_at: Option<Timestamp>,
}

/// A ticket's deadlines as the SLA watch judges them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadlineRecord {
    pub respond_by: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub onsite_by: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub plan_by: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub resolve_by: Option<Timestamp>,
    /// Detection, or the moment the class last rose: the class's deadlines count from
    /// here unless one of its own is set below.
    pub class_from: Timestamp,
    /// Where each class deadline counts from when that differs from `class_from`: a
    /// deadline kept through a rise of the class keeps the start it had.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub onsite_from: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub plan_from: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub resolve_from: Option<Timestamp>,
}

impl DeadlineRecord {
    pub fn new(d: &Deadlines, class_from: Timestamp) -> DeadlineRecord {
        DeadlineRecord {
            respond_by: d.respond_by,
            onsite_by: d.onsite_by,
            plan_by: d.plan_by,
            resolve_by: d.resolve_by,
            class_from,
            onsite_from: None,
            plan_from: None,
            resolve_from: None,
        }
    }

    /// The record after the class rose at `rose` to the deadlines `new`: a deadline that
    /// did not move keeps its start, a new or moved one counts from the rise.
    pub fn after_rise(
        old: Option<&DeadlineRecord>,
        new: &Deadlines,
        rose: Timestamp,
    ) -> DeadlineRecord {
        let start = |kind: DeadlineKind, due: Option<Timestamp>| -> Option<Timestamp> {
            let o = old?;
            (o.due(kind) == due && due.is_some()).then(|| o.starts(kind))
        };
        DeadlineRecord {
            onsite_from: start(DeadlineKind::Onsite, new.onsite_by),
            plan_from: start(DeadlineKind::Plan, new.plan_by),
            resolve_from: start(DeadlineKind::Resolve, new.resolve_by),
            ..DeadlineRecord::new(new, rose)
        }
    }

    pub fn due(&self, kind: DeadlineKind) -> Option<Timestamp> {
        match kind {
            DeadlineKind::Respond => Some(self.respond_by),
            DeadlineKind::Onsite => self.onsite_by,
            DeadlineKind::Plan => self.plan_by,
            DeadlineKind::Resolve => self.resolve_by,
        }
    }

    /// Where a class deadline of `kind` counts from (`class_from` for the response).
    pub fn starts(&self, kind: DeadlineKind) -> Timestamp {
        match kind {
            DeadlineKind::Respond => self.class_from,
            DeadlineKind::Onsite => self.onsite_from.unwrap_or(self.class_from),
            DeadlineKind::Plan => self.plan_from.unwrap_or(self.class_from),
            DeadlineKind::Resolve => self.resolve_from.unwrap_or(self.class_from),
        }
    }

    pub fn deadlines(&self) -> Deadlines {
        Deadlines {
            respond_by: self.respond_by,
            onsite_by: self.onsite_by,
            plan_by: self.plan_by,
            resolve_by: self.resolve_by,
        }
    }
}

/// A forwarder job: create the ticket `ticket_key`, or send its event `event` (an event's
/// Idempotency-Key). The bodies live in the ticket record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    pub ticket_key: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub event: Option<String>,
}

/// What became of a job when the forwarder tried it.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutcome {
    /// Created (or already existed: 200) with this backend ticket id; or the event was
    /// accepted (`ticket_id` is then the ticket's).
    Sent { ticket_id: String },
    /// Transient: try again at `next_attempt`.
    Retry {
        error: String,
        next_attempt: Timestamp,
    },
    /// Permanent: kept and shown as failed, not resent.
    Failed { error: String },
}

impl TicketRecord {
    /// A new ticket for `req` about `device`, reported by `agent`, detected at `detected`
    /// (agent time) and decided at `now` (gateway time): pending, no events yet.
    pub fn new(
        req: &TicketRequest,
        device: &str,
        agent: &str,
        detected: Timestamp,
        now: Timestamp,
    ) -> Result<TicketRecord, StoreError> {
        Ok(TicketRecord {
            key: req.idempotency_key.clone(),
            device: device.to_string(),
            agent: agent.to_string(),
            kind: req.body.kind,
            code: req.body.fault.code.clone(),
            class: req.body.fault.class,
            episodes: vec![req.episode.clone()],
            open: true,
            detected_at: detected,
            created_at: now,
            body: to_json("ticket body", &req.body)?,
            ticket_id: None,
            backend_status: None,
            forward: Forwarding::pending(),
            events: Vec::new(),
            deadlines: Some(DeadlineRecord::new(&req.deadlines, detected)),
            status_history: Vec::new(),
            status_read_at: None,
        })
    }

    /// What the ticket decision needs to know of it.
    pub fn known(&self) -> crate::ticket::KnownTicket {
        crate::ticket::KnownTicket {
            key: self.key.clone(),
            device: self.device.clone(),
            code: self.code.clone(),
            kind: self.kind,
            class: self.class,
            episodes: self.episodes.clone(),
            open: self.open,
            deadlines: self.current_deadlines().map(|d| d.deadlines()),
        }
    }

    /// Records what the forwarder's attempt at `job` gave: the ticket's (or the event's)
    /// forwarding state, and the backend's ticket id once a create is sent. Returns
    /// whether the job stays in the outbox (only a retry does).
    pub fn record_outcome(&mut self, job: &Job, outcome: &JobOutcome, now: Timestamp) -> bool {
        let f = match &job.event {
            None => &mut self.forward,
            Some(k) => match self.events.iter_mut().find(|e| &e.idempotency_key == k) {
                Some(e) => &mut e.forward,
                None => &mut self.forward,
            },
        };
        f.attempts += 1;
        let keep = match outcome {
            JobOutcome::Sent { .. } => {
                // The last error stays: "sent after 503s" is worth seeing.
                f.state = ForwardState::Sent;
                f.sent_at = Some(now);
                f.next_attempt = None;
                false
            }
            JobOutcome::Retry {
                error,
                next_attempt,
            } => {
                f.last_error = Some(error.clone());
                f.next_attempt = Some(*next_attempt);
                true
            }
            JobOutcome::Failed { error } => {
                f.state = ForwardState::Failed;
                f.last_error = Some(error.clone());
                f.next_attempt = None;
                false
            }
        };
        if let (JobOutcome::Sent { ticket_id }, None) = (outcome, &job.event) {
            self.ticket_id = Some(ticket_id.clone());
        }
        keep
    }

    /// Sets what the backend refused for good back to pending: an operator's decision
    /// after fixing the cause. Returns the jobs to queue, in order: `None` for the
    /// ticket's create, `Some(key)` for each event.
    pub fn requeue_failed(&mut self) -> Vec<Option<String>> {
        let mut jobs = Vec::new();
        if self.forward.state == ForwardState::Failed {
            self.forward.state = ForwardState::Pending;
            jobs.push(None);
        }
        for e in self.events.iter_mut() {
            if e.forward.state == ForwardState::Failed {
                e.forward.state = ForwardState::Pending;
                jobs.push(Some(e.idempotency_key.clone()));
            }
        }
        jobs
    }

    /// Notes the backend's status (`resolved` and `closed` end the ticket: a fault that
    /// returns afterwards opens a new ticket rather than a recurrence) and its history
    /// ([`crate::sla_watch::merge_history`]), read at `read_at`.
    pub fn record_status(&mut self, read: &StatusRead, read_at: Timestamp) {
        self.status_history = crate::sla_watch::merge_history(
            &self.status_history,
            &read.status,
            read.history.clone(),
            read_at,
        );
        self.backend_status = Some(read.status.clone());
        self.status_read_at = Some(read_at);
        self.open = !matches!(read.status.as_str(), "resolved" | "closed");
    }

    /// The deadlines that apply now: the stored ones, else (a record from before the SLA
    /// watch) those of the body sent.
    pub fn current_deadlines(&self) -> Option<DeadlineRecord> {
        if self.deadlines.is_some() {
            return self.deadlines;
        }
        let sla = self.body.get("sla")?;
        let at = |k: &str| sla.get(k)?.as_str()?.parse::<Timestamp>().ok();
        Some(DeadlineRecord {
            respond_by: at("respond_by")?,
            onsite_by: at("onsite_by"),
            plan_by: at("plan_by"),
            resolve_by: at("resolve_by"),
            class_from: self.detected_at,
            onsite_from: None,
            plan_from: None,
            resolve_from: None,
        })
    }

    /// The ticket's promises, for the SLA watch.
    pub fn promises(&self) -> Promises {
        let d = self.current_deadlines();
        let from = |k: DeadlineKind| d.map_or(self.detected_at, |d| d.starts(k));
        Promises {
            detected: self.detected_at,
            onsite_from: from(DeadlineKind::Onsite),
            plan_from: from(DeadlineKind::Plan),
            resolve_from: from(DeadlineKind::Resolve),
            respond_by: d.map(|d| d.respond_by),
            onsite_by: d.and_then(|d| d.onsite_by),
            plan_by: d.and_then(|d| d.plan_by),
            resolve_by: d.and_then(|d| d.resolve_by),
        }
    }

    /// Every deadline judged as of `now`.
    pub fn sla_status(&self, now: Timestamp) -> SlaStatus {
        self.promises().judge(&self.status_history, now)
    }

    /// Adds `event` unless one with its key is there; true when added (queue its job).
    pub fn add_event(&mut self, event: &EventRequest) -> Result<bool, StoreError> {
        if self
            .events
            .iter()
            .any(|e| e.idempotency_key == event.idempotency_key)
        {
            return Ok(false);
        }
        let body = to_json("ticket event", &event.body)?;
        self.events.push(TicketEventRecord {
            idempotency_key: event.idempotency_key.clone(),
            kind: event.body.kind.as_str().to_string(),
            body,
            forward: Forwarding::pending(),
        });
        Ok(true)
    }
}

/// The gateway's durable store, as ingest, the ledger, the forwarder, the hotline API and
/// the CLI see it.
///
/// Every method is one transaction: it is done entirely or not at all, and a write has
/// reached the disk (or the database's commit) when it returns `Ok`. Methods block; async
/// callers run them on the blocking pool. Unreadable rows are skipped by the reads (one
/// damaged entry must not hide a whole fleet).
///
/// A SQL store implements [`GatewayStore::apply_many`] the way [`RedbStore`] does: in one
/// transaction, load what the batches touch ([`crate::ingest::Needs`]), let
/// [`crate::ingest::plan`] decide the changes, write them, commit.
pub trait GatewayStore: Send + Sync + std::fmt::Debug {
    /// Applies several batches, in order, in one durable transaction (group commit: one
    /// fsync for all of them): all are stored or none is. A record that comes twice, in
    /// the same group or after, is applied once. `now` is the gateway's clock, used only
    /// to stamp when a ticket was decided. One [`Applied`] per batch, in order.
    fn apply_many(
        &self,
        batches: &[UpBatch],
        cx: &IngestContext,
        now: Timestamp,
    ) -> Result<Vec<Applied>, StoreError>;

    /// Applies one batch in one durable transaction.
    fn apply(
        &self,
        batch: &UpBatch,
        cx: &IngestContext,
        now: Timestamp,
    ) -> Result<Applied, StoreError> {
        let mut all = self.apply_many(std::slice::from_ref(batch), cx, now)?;
        Ok(all.pop().unwrap_or_default())
    }

    /// How many (agent, incarnation, seq) records are stored.
    fn records_stored(&self) -> Result<u64, StoreError>;

    /// How many records of `agent` (all its incarnations) are stored, those forgotten
    /// under a watermark included: the exact count of distinct records it delivered.
    fn records_stored_of(&self, agent: &str) -> Result<u64, StoreError>;

    /// Whether seq `seq` of `agent` is stored, in any of its outbox incarnations. A seq at
    /// or below an incarnation's watermark answers yes (its row is forgotten): to tell
    /// that nothing went missing there, compare [`GatewayStore::records_stored_of`].
    fn has_record(&self, agent: &str, seq: u64) -> Result<bool, StoreError>;

    /// Whether (agent, incarnation, seq) is stored.
    fn has_record_in(&self, agent: &str, incarnation: &str, seq: u64) -> Result<bool, StoreError>;

    /// Every agent the store has a record of (its latest incarnation, its conflicts).
    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError>;

    /// Every device the gateway has heard of.
    fn devices(&self) -> Result<Vec<DeviceLive>, StoreError>;

    fn device(&self, id: &str) -> Result<Option<DeviceLive>, StoreError>;

    /// The device's availability ledger, rebuilt from its stored transitions and heard up
    /// to its last record (one consistent read).
    fn ledger(&self, id: &str) -> Result<Ledger, StoreError>;

    /// The device's life record, oldest first (at most `limit` newest entries).
    fn history(&self, id: &str, limit: usize) -> Result<Vec<LifeEvent>, StoreError> {
        Ok(self
            .history_page(id, None, limit)?
            .into_iter()
            .map(|(_, e)| e)
            .collect())
    }

    /// A page of the device's life record: at most `limit` entries before `before` (all
    /// the newest without it), oldest first, each with its cursor.
    fn history_page(
        &self,
        id: &str,
        before: Option<HistoryCursor>,
        limit: usize,
    ) -> Result<Vec<(HistoryCursor, LifeEvent)>, StoreError>;

    /// The device's exclusions, by start.
    fn exclusions(&self, device: &str) -> Result<Vec<Exclusion>, StoreError>;

    /// Stores an exclusion under the next id (its `id` is ignored) with a life-record
    /// line, unless it overlaps one of the device's exclusions: then that one comes back
    /// as `Err` and nothing is stored.
    fn add_exclusion(&self, ex: Exclusion) -> Result<Result<Exclusion, Exclusion>, StoreError>;

    /// Removes exclusion `id` of `device` with a life-record line at `at`; the exclusion
    /// removed, `None` when there is none.
    fn remove_exclusion(
        &self,
        device: &str,
        id: u64,
        at: Timestamp,
    ) -> Result<Option<Exclusion>, StoreError>;

    /// The maintenance done on the device, oldest first.
    fn maintenance_done(&self, device: &str) -> Result<Vec<MaintenanceDone>, StoreError>;

    /// Records maintenance done under the next id (its `id` is ignored), with a
    /// life-record line. A maintenance with the same `source` as one stored (a resolved
    /// ticket read twice) is not stored again: the stored one comes back.
    fn record_maintenance(&self, m: MaintenanceDone) -> Result<MaintenanceDone, StoreError>;

    /// Stores a ticket the gateway decided outside ingest (maintenance due from the
    /// contract) with its create job and a life-record line, unless its key is stored:
    /// false then.
    fn open_ticket(&self, t: TicketRecord) -> Result<bool, StoreError>;

    /// Every ticket, oldest detection first (then by key).
    fn tickets(&self) -> Result<Vec<TicketRecord>, StoreError>;

    fn ticket(&self, key: &str) -> Result<Option<TicketRecord>, StoreError>;

    /// The forwarder's jobs in the order they were queued.
    fn jobs(&self) -> Result<Vec<Job>, StoreError>;

    /// Keeps a line of the hotline's audit log (JSON, [`crate::audit::AuditEntry`]) of
    /// gateway `gateway`, on a store several gateways share; a store of one gateway keeps
    /// none (its log is the file beside it).
    fn audit(&self, gateway: &str, at: Timestamp, line: &str) -> Result<(), StoreError> {
        let _ = (gateway, at, line);
        Ok(())
    }

    /// The audit lines kept in the store, oldest first, at most `limit` newest.
    fn audit_lines(&self, limit: usize) -> Result<Vec<(String, String)>, StoreError> {
        let _ = limit;
        Ok(Vec::new())
    }

    /// The enrolments kept in the store (a shared store: every gateway's), by agent.
    fn trust_entries(&self) -> Result<Vec<crate::trust::Enrolment>, StoreError> {
        Ok(Vec::new())
    }

    /// Keeps each enrolment of `entries` (at most one per agent) unless the store holds
    /// the same or a newer state of that agent ([`crate::trust::supersedes`]), in one
    /// transaction. A store of one gateway keeps none.
    fn keep_trust_entries(&self, entries: &[crate::trust::Enrolment]) -> Result<(), StoreError> {
        let _ = entries;
        Ok(())
    }

    /// Whether other gateways use this store too (then the forwarder claims jobs before
    /// sending them).
    fn shared(&self) -> bool {
        false
    }

    /// Whether gateway `owner` does `duty` (a fleet-wide chore one gateway is enough
    /// for, such as reading the tickets' statuses back from the backend) for the next
    /// `lease`: it did it last, or whoever did let its lease run out. A store only one
    /// gateway uses always says yes.
    fn lead(
        &self,
        duty: &str,
        owner: &str,
        lease: std::time::Duration,
    ) -> Result<bool, StoreError> {
        let _ = (duty, owner, lease);
        Ok(true)
    }

    /// Claims the jobs of `tickets` for the forwarder of gateway `owner` for `lease`:
    /// the tickets whose jobs are now its own to send (no other gateway holds them, or
    /// its lease ran out). A store only one gateway uses gives all of them.
    fn claim_jobs(
        &self,
        tickets: &[String],
        owner: &str,
        lease: std::time::Duration,
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        let _ = (owner, lease);
        Ok(tickets.iter().cloned().collect())
    }

    /// Records what the forwarder's attempt at `job` gave ([`TicketRecord::record_outcome`]),
    /// in one transaction with the job leaving the outbox unless it is to be retried. A job
    /// whose ticket is not stored is dropped.
    fn finish_job(&self, job: &Job, outcome: &JobOutcome, now: Timestamp)
        -> Result<(), StoreError>;

    /// Puts a failed ticket (and its failed events) back in the outbox
    /// ([`TicketRecord::requeue_failed`]). False when no such ticket is stored.
    fn requeue(&self, key: &str) -> Result<bool, StoreError>;

    /// Changes the ticket `key` with `change` in one transaction, and queues a forwarder
    /// job for each event key `change` returns (in order). The ticket after the change;
    /// `None` when no such ticket is stored (nothing done).
    fn update_ticket(
        &self,
        key: &str,
        change: &mut dyn FnMut(&mut TicketRecord) -> Result<Vec<String>, StoreError>,
    ) -> Result<Option<TicketRecord>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn ticket() -> TicketRecord {
        TicketRecord {
            key: "tend-t:1".into(),
            device: "vent".into(),
            agent: "a1".into(),
            kind: SignalKind::Fault,
            code: "ALM1.4".into(),
            class: FaultClass::Major,
            episodes: vec!["a1/vent/ALM1.4/1".into()],
            open: true,
            detected_at: at(0),
            created_at: at(1),
            body: serde_json::json!({}),
            ticket_id: None,
            backend_status: None,
            forward: Forwarding::pending(),
            events: vec![TicketEventRecord {
                idempotency_key: "tend-e:1".into(),
                kind: "fault_cleared".into(),
                body: serde_json::json!({}),
                forward: Forwarding::pending(),
            }],
            deadlines: None,
            status_history: Vec::new(),
            status_read_at: None,
        }
    }

    fn job(event: Option<&str>) -> Job {
        Job {
            id: 1,
            ticket_key: "tend-t:1".into(),
            event: event.map(str::to_string),
        }
    }

    #[test]
    fn a_retry_keeps_the_job_and_a_later_send_keeps_the_last_error() {
        let mut t = ticket();
        let retry = JobOutcome::Retry {
            error: "503".into(),
            next_attempt: at(10),
        };
        assert!(t.record_outcome(&job(None), &retry, at(5)));
        assert_eq!(t.forward.state, ForwardState::Pending);
        assert_eq!(t.forward.next_attempt, Some(at(10)));
        let sent = JobOutcome::Sent {
            ticket_id: "T-9".into(),
        };
        assert!(!t.record_outcome(&job(None), &sent, at(11)));
        assert_eq!(t.forward.state, ForwardState::Sent);
        assert_eq!((t.forward.attempts, t.forward.sent_at), (2, Some(at(11))));
        assert_eq!(t.forward.last_error.as_deref(), Some("503"));
        assert_eq!(t.ticket_id.as_deref(), Some("T-9"));
    }

    #[test]
    fn an_events_outcome_is_its_own_and_never_changes_the_ticket_id() {
        let mut t = ticket();
        let sent = JobOutcome::Sent {
            ticket_id: "T-9".into(),
        };
        assert!(!t.record_outcome(&job(Some("tend-e:1")), &sent, at(3)));
        assert_eq!(t.events[0].forward.state, ForwardState::Sent);
        assert_eq!(t.forward, Forwarding::pending());
        assert_eq!(t.ticket_id, None);
    }

    #[test]
    fn requeue_puts_back_only_what_failed_create_first() {
        let mut t = ticket();
        let failed = JobOutcome::Failed {
            error: "400".into(),
        };
        t.record_outcome(&job(None), &failed, at(2));
        t.record_outcome(&job(Some("tend-e:1")), &failed, at(3));
        assert_eq!(t.requeue_failed(), [None, Some("tend-e:1".to_string())]);
        assert_eq!(t.forward.state, ForwardState::Pending);
        assert_eq!(t.events[0].forward.state, ForwardState::Pending);
        assert!(t.requeue_failed().is_empty(), "nothing failed any more");
    }

    #[test]
    fn a_deadline_kept_through_a_rise_keeps_its_start() {
        let d = Deadlines {
            respond_by: at(3600),
            onsite_by: Some(at(3 * 3600)),
            plan_by: Some(at(48 * 3600)),
            resolve_by: None,
        };
        let old = DeadlineRecord::new(&d, at(0));
        // Risen to major at 2 h: on site stays 3 h (from 0), the fix is new (from 2 h).
        let new = Deadlines {
            plan_by: None,
            resolve_by: Some(at(74 * 3600)),
            ..d
        };
        let r = DeadlineRecord::after_rise(Some(&old), &new, at(7200));
        assert_eq!(r.starts(DeadlineKind::Onsite), at(0));
        assert_eq!(r.starts(DeadlineKind::Resolve), at(7200));
        assert_eq!(r.due(DeadlineKind::Plan), None);
        // Serialised without the starts it does not need; read back the same.
        let back: DeadlineRecord =
            serde_json::from_value(serde_json::to_value(r).unwrap()).unwrap();
        assert_eq!(back, r);
        let plain = serde_json::to_value(old).unwrap();
        assert!(plain.get("onsite_from").is_none(), "{plain}");
    }

    #[test]
    fn resolved_or_closed_in_the_backend_ends_the_ticket() {
        let mut t = ticket();
        t.record_status(&StatusRead::bare("acknowledged"), at(1));
        assert!(t.open);
        t.record_status(&StatusRead::bare("closed"), at(2));
        assert!(!t.open);
        assert_eq!(t.backend_status.as_deref(), Some("closed"));
    }
}
